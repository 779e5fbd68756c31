//! A running lab: builds a [`Plan`] into namespaces, veth links, addresses and routes (all from
//! inside lab namespaces), starts the NAT engines and the reflectors' `natscope reflect`, and tears
//! everything down on [`Lab::down`] or `Drop` — including during a panic's unwind.
//!
//! Segments are bridges: the internet is `br0` in the `internet` node; every router's LAN is the
//! bridge `lan0` in the router's own namespace, and a node attaches to its segment through a veth
//! whose upstream end `p-<node>` is a bridge port. A userspace router's kernel holds no address:
//! its engine reads `wan0` and `lan0` with packet sockets and answers ARP itself.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natscope_core::client::{build_request, RequestOptions};
use natscope_core::nat::PortAllocation;
use natscope_core::portmap::PortMappingService;
use natscope_core::stun::{Message, MessageType, TransactionId};
use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::driver::{self, EngineHandle};
use crate::engine::{FlowRow, MappingRow, Stats};
use crate::links::{self, LinkError};
use crate::netns::{self, Netns, NetnsError};
use crate::registry::{self, Record};
use crate::topology::{
    Ipv6Mode, NodeSpec, Plan, PlannedNode, Role, RouterKind, Topology, TopologyError, INTERNET,
    STUN_ALT_PORT, STUN_PORT,
};

/// How long a reflector gets to answer its first Binding request after it is started.
const REFLECTOR_READY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("lab name `{0}` is invalid: use 1-10 characters a-z and 0-9")]
    BadName(String),
    #[error("a lab named `{0}` is already running (natscope lab down {0})")]
    Exists(String),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("node {node}: {step}: {source}")]
    Link {
        node: String,
        step: &'static str,
        source: LinkError,
    },
    #[error("node {node}: nat engine: {source}")]
    Engine {
        node: String,
        source: driver::DriverError,
    },
    #[error("node {node}: {what}: {source}")]
    Process {
        node: String,
        what: String,
        source: std::io::Error,
    },
    #[error("node {0}: the reflector did not answer within {1:?}")]
    ReflectorNotReady(String, Duration),
    #[error("no node named `{0}` in this lab")]
    NoSuchNode(String),
    #[error("cannot write the lab record {path}: {source}")]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Options of [`Lab::up`].
#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    /// The `natscope` binary reflector nodes run; by default the current executable when it is
    /// `natscope`, else a `natscope` next to it (or in its parent directory, as cargo lays out
    /// test binaries), else `natscope` on PATH.
    pub natscope_bin: Option<PathBuf>,
    /// Set by the `natscope lab up` supervisor: the record says SIGTERM tears the lab down.
    pub supervisor: bool,
    /// The supervisor's control socket, recorded for `lab status` / `lab nat-table`.
    pub control: Option<PathBuf>,
}

/// One node of a running lab.
pub struct LabNode {
    plan: PlannedNode,
    namespace: String,
    ns: Netns,
}

impl std::fmt::Debug for LabNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabNode")
            .field("name", &self.plan.name)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl LabNode {
    pub fn name(&self) -> &str {
        &self.plan.name
    }
    pub fn role(&self) -> Role {
        self.plan.role
    }
    pub fn plan(&self) -> &PlannedNode {
        &self.plan
    }
    /// The namespace name (`nsc-<lab>-<node>`), for `ip netns exec` and friends.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The primary address: a host's or reflector's own, a NAT's first external address.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.plan.uplink.first().map(|n| n.addr)
    }
    /// The node's IPv6 addresses on its uplink, primary first (two per node; none behind an
    /// `ipv6 = "none"` router). A reflector's are where an IPv6 STUN server belongs.
    pub fn addresses6(&self) -> Vec<std::net::Ipv6Addr> {
        self.plan.uplink6.iter().map(|n| n.addr).collect()
    }
    /// Runs `f` inside the node's namespace (sockets created there belong to the node).
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.ns.run(f)
    }
    /// Runs an async task to completion on the node's current-thread runtime.
    pub fn block_on<T, F, Fut>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        self.ns.block_on(f)
    }
    /// Starts a program inside the node, with the lab's names in its `/etc/hosts` and no
    /// outside DNS ([`crate::resolver`]). The caller owns the child (and must stop it); a lab's
    /// teardown also kills anything left in its namespaces.
    pub fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        // A thread of its own: it enters the node's network namespace and a new mount namespace,
        // which the child inherits, and ends with the spawn.
        let namespace = self.namespace.clone();
        let node = self.plan.name.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                netns::enter(&namespace).map_err(|e| std::io::Error::other(e.to_string()))?;
                let lab = registry::lab_of_namespace(&namespace).unwrap_or_default();
                crate::resolver::enter(lab, &node)
                    .map_err(|e| std::io::Error::other(format!("lab resolver: {e}")))?;
                cmd.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
        })
    }
    /// A UDP socket bound inside the node.
    pub fn udp_bind(&self, addr: SocketAddr) -> std::io::Result<UdpSocket> {
        self.ns
            .run(move || UdpSocket::bind(addr))
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

/// A running lab.
pub struct Lab {
    name: String,
    plan: Plan,
    nodes: Vec<LabNode>,
    engines: Vec<(String, EngineHandle)>,
    children: Vec<(String, Child)>,
    finished: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("name", &self.name).finish()
    }
}

/// A topology under construction, in the spirit of patchbay's `Lab::new().add_router(..)`.
#[derive(Debug, Default)]
pub struct LabBuilder {
    name: String,
    topology: Topology,
    options: LabOptions,
}

impl LabBuilder {
    pub fn reflector(mut self, name: &str) -> Self {
        self.topology
            .nodes
            .push(NodeSpec::Reflector { name: name.into() });
        self
    }
    /// A router on the internet (`parent = None`) or behind another router.
    pub fn router(mut self, name: &str, parent: Option<&str>, router: RouterKind) -> Self {
        self.topology.nodes.push(NodeSpec::Nat {
            name: name.into(),
            parent: parent.map(Into::into),
            lan: None,
            router,
            port_mapping: Vec::new(),
        });
        self
    }
    /// The port-mapping services of the router added last (a `linux` router runs miniupnpd).
    pub fn port_mapping(mut self, services: &[PortMappingService]) -> Self {
        if let Some(NodeSpec::Nat { port_mapping, .. }) = self
            .topology
            .nodes
            .iter_mut()
            .rev()
            .find(|n| matches!(n, NodeSpec::Nat { .. }))
        {
            *port_mapping = services.to_vec();
        }
        self
    }
    pub fn host(mut self, name: &str, parent: Option<&str>) -> Self {
        self.topology.nodes.push(NodeSpec::Host {
            name: name.into(),
            parent: parent.map(Into::into),
        });
        self
    }
    pub fn natscope_bin(mut self, path: PathBuf) -> Self {
        self.options.natscope_bin = Some(path);
        self
    }
    pub fn up(self) -> Result<Lab, LabError> {
        let plan = self.topology.plan()?;
        Lab::up(&self.name, plan, self.options)
    }
}

/// Checks `name` as a lab name (1-10 characters a-z, 0-9: namespaces are `nsc-NAME-NODE`).
pub fn check_lab_name(name: &str) -> Result<(), LabError> {
    let ok = (1..=10).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::BadName(name.to_string()))
    }
}

/// The namespace of `node` in `lab`.
pub fn namespace_name(lab: &str, node: &str) -> String {
    format!("{}{lab}-{node}", netns::PREFIX)
}

/// The error of link step `step` on node `node`, for `map_err`.
fn link_err(node: &str, step: &'static str) -> impl FnOnce(LinkError) -> LabError {
    let node = node.to_string();
    move |source| LabError::Link { node, step, source }
}

fn random_mac() -> [u8; 6] {
    let mut m: [u8; 6] = rand::thread_rng().gen();
    m[0] = (m[0] & 0xfe) | 0x02; // unicast, locally administered
    m
}

fn default_natscope_bin() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_stem().is_some_and(|s| s == "natscope") {
            return exe;
        }
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("natscope");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("natscope")
}

impl Lab {
    pub fn builder(name: &str) -> LabBuilder {
        LabBuilder {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Brings `plan` up as lab `name`. On any error, whatever was created is removed again.
    pub fn up(name: &str, plan: Plan, options: LabOptions) -> Result<Self, LabError> {
        check_lab_name(name)?;
        netns::check_privileges()?;
        let me = std::process::id() as i32;
        let record = Record {
            name: name.to_string(),
            preset: plan.preset.clone(),
            owner_pid: me,
            owner_start: registry::start_time(me).unwrap_or(0),
            supervisor: options.supervisor,
            control: options.control.clone(),
            nodes: plan.nodes.clone(),
            userns: if crate::rootless::entered() {
                crate::rootless::userns_self()
            } else {
                None
            },
        };
        // Stale labs removed and the record created exclusively: of two `up`s of one name, the
        // loser returns here, before it owns anything, so its teardown cannot remove the
        // winner's record or namespaces.
        registry::claim(&record).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                LabError::Exists(name.to_string())
            } else if source.kind() == std::io::ErrorKind::PermissionDenied {
                LabError::Netns(NetnsError::Permission(format!(
                    "writing {}: {source}",
                    registry::dir().display()
                )))
            } else {
                LabError::Record {
                    path: registry::path_of(name),
                    source,
                }
            }
        })?;
        let mut lab = Lab {
            name: name.to_string(),
            plan,
            nodes: Vec::new(),
            engines: Vec::new(),
            children: Vec::new(),
            finished: false,
        };
        // On error `lab` drops here and tears down what exists.
        lab.build(&options)?;
        Ok(lab)
    }

    fn build(&mut self, options: &LabOptions) -> Result<(), LabError> {
        let plan_nodes = self.plan.nodes.clone();
        crate::resolver::write(&self.name, &plan_nodes).map_err(|e| LabError::Process {
            node: INTERNET.to_string(),
            what: "writing the lab's hosts files".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for p in &plan_nodes {
            let namespace = namespace_name(&self.name, &p.name);
            let ns = Netns::create(&namespace)?;
            let userspace_router = matches!(p.router, Some(RouterKind::Engine(_)));
            ns.run(move || ipv6_sysctls(userspace_router))?;
            ns.block_on(|| async {
                let h = links::connect()?;
                links::set_up(&h, "lo").await.map(|_| ())
            })?
            .map_err(link_err(&p.name, "bringing up lo"))?;
            self.nodes.push(LabNode {
                plan: p.clone(),
                namespace,
                ns,
            });
        }
        for p in &plan_nodes {
            self.wire(p)?;
        }
        for p in &plan_nodes {
            self.configure(p)?;
        }
        let bin = options
            .natscope_bin
            .clone()
            .unwrap_or_else(default_natscope_bin);
        for p in &plan_nodes {
            if p.role == Role::Reflector {
                self.start_reflector(p, &bin)?;
            }
        }
        Ok(())
    }

    fn node_index(&self, name: &str) -> Result<usize, LabError> {
        self.nodes
            .iter()
            .position(|n| n.plan.name == name)
            .ok_or_else(|| LabError::NoSuchNode(name.to_string()))
    }

    /// Creates the node's segment bridge (if it has one) and its uplink veth.
    fn wire(&self, p: &PlannedNode) -> Result<(), LabError> {
        let node = &self.nodes[self.node_index(&p.name)?];
        let bridge = match p.role {
            Role::Internet => Some("br0"),
            Role::Nat => Some(driver::LAN),
            _ => None,
        };
        if let Some(br) = bridge {
            let mac = random_mac();
            node.ns
                .block_on(move || async move {
                    let h = links::connect()?;
                    links::add_bridge(&h, br, mac).await.map(|_| ())
                })?
                .map_err(link_err(&p.name, "creating the segment bridge"))?;
        }
        let Some(upstream) = &p.upstream else {
            return Ok(());
        };
        let up_node = &self.nodes[self.node_index(upstream)?];
        let up_bridge = if upstream == INTERNET {
            "br0"
        } else {
            driver::LAN
        };
        let port = format!("p-{}", p.name);
        let uplink = if p.role == Role::Nat {
            driver::WAN
        } else {
            "eth0"
        };
        let ns_file = File::open(netns::path_of(&node.namespace)).map_err(|source| {
            LabError::Netns(NetnsError::Io {
                name: node.namespace.clone(),
                step: "opening",
                source,
            })
        })?;
        let fd = ns_file.as_raw_fd();
        up_node
            .ns
            .block_on(move || async move {
                let h = links::connect()?;
                links::add_veth(&h, &port, uplink, fd).await?;
                links::attach(&h, &port, up_bridge).await
            })?
            .map_err(link_err(&p.name, "creating the uplink veth"))?;
        drop(ns_file);
        Ok(())
    }

    /// Addresses, routes and translation for one node.
    fn configure(&mut self, p: &PlannedNode) -> Result<(), LabError> {
        let idx = self.node_index(&p.name)?;
        let kernel_addresses = !matches!(p.router, Some(RouterKind::Engine(_)));
        // A userspace router serving UPnP IGD answers HTTP from its kernel (crate::upnp).
        let kernel_lan = matches!(&p.router, Some(RouterKind::Engine(c))
            if c.port_mapping.contains(&natscope_core::portmap::PortMappingService::Upnp));
        let uplink = if p.role == Role::Nat {
            driver::WAN
        } else {
            "eth0"
        };
        let plan = p.clone();
        let routes6 = self.routes6();
        self.nodes[idx]
            .ns
            .block_on(move || async move {
                let h = links::connect()?;
                if plan.role == Role::Internet {
                    for a in &plan.uplink {
                        links::add_address(&h, "br0", a.addr, a.len).await?;
                    }
                    for a in &plan.uplink6 {
                        links::add_address6(&h, "br0", a.addr, a.len).await?;
                    }
                    add_routes6(&h, "br0", &plan, &routes6).await?;
                    return Ok(());
                }
                links::set_up(&h, uplink).await?;
                if kernel_addresses {
                    for a in &plan.uplink {
                        links::add_address(&h, uplink, a.addr, a.len).await?;
                    }
                    if let Some(lan) = plan.lan {
                        links::add_address(&h, driver::LAN, lan.addr, lan.len).await?;
                    }
                    links::add_default_route(&h, uplink, plan.gateway).await?;
                    for a in &plan.uplink6 {
                        links::add_address6(&h, uplink, a.addr, a.len).await?;
                    }
                    if let Some(lan) = plan.lan6 {
                        links::add_address6(&h, driver::LAN, lan.addr, lan.len).await?;
                    }
                    add_routes6(&h, uplink, &plan, &routes6).await?;
                } else if let (true, Some(lan)) = (kernel_lan, plan.lan) {
                    links::add_address(&h, driver::LAN, lan.addr, lan.len).await?;
                }
                Ok(())
            })?
            .map_err(link_err(&p.name, "addresses and routes"))?;
        match &p.router {
            Some(RouterKind::Engine(config)) => {
                let lan = p.lan.ok_or_else(|| LabError::Engine {
                    node: p.name.clone(),
                    source: driver::DriverError::NoInterface(driver::LAN),
                })?;
                let external = p.uplink.iter().map(|n| n.addr).collect();
                let ipv6 = crate::engine::RouterAddrs6 {
                    wan: p.uplink6.iter().map(|n| n.addr).collect(),
                    lan: p.lan6,
                    routed: p.routed6,
                    wan_gateway: p.gateway6,
                    routes: p.routes6.clone(),
                    // A top-level router copies the internet segment's routes, as every other
                    // node there does, except its own prefix.
                    wan_routes: match p.upstream.as_deref() {
                        Some(INTERNET) => self
                            .routes6()
                            .into_iter()
                            .filter(|((net, _), _)| p.routed6.is_none_or(|r| r.network() != *net))
                            .map(|((net, len), via)| (crate::topology::Ipv6Net::new(net, len), via))
                            .collect(),
                        _ => Vec::new(),
                    },
                };
                let engine = driver::start(
                    &self.nodes[idx].ns,
                    config.clone(),
                    lan,
                    external,
                    p.gateway,
                    ipv6,
                )
                .map_err(|source| LabError::Engine {
                    node: p.name.clone(),
                    source,
                })?;
                self.engines.push((p.name.clone(), engine));
            }
            Some(RouterKind::Linux) => {
                self.start_kernel_nat(idx)?;
                if !p.port_mapping.is_empty() {
                    self.start_miniupnpd(idx)?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// The static IPv6 routes of the internet segment: each reachable routed prefix via the
    /// top-level router in front of it (docs/lab.md, "IPv6": no router advertisements, no routing
    /// daemon). The planner puts them on the internet node; every internet-segment node copies
    /// them.
    fn routes6(&self) -> Vec<((std::net::Ipv6Addr, u8), std::net::Ipv6Addr)> {
        self.plan
            .nodes
            .iter()
            .filter(|n| n.role == Role::Internet)
            .flat_map(|n| n.routes6.iter())
            .map(|(prefix, via)| ((prefix.network(), prefix.len), *via))
            .collect()
    }

    /// The `linux` preset: forwarding plus nftables masquerade, exactly what a stock Linux router
    /// runs, inside the router's namespace only.
    fn start_kernel_nat(&mut self, idx: usize) -> Result<(), LabError> {
        let node = &self.nodes[idx];
        let name = node.plan.name.clone();
        let err = |what: &str, source| LabError::Process {
            node: name.clone(),
            what: what.to_string(),
            source,
        };
        node.ns
            .run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
            .map_err(|e| err("enabling forwarding", e))?;
        let ipv6 = node.plan.lan6.is_some();
        if ipv6 {
            node.ns
                .run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1"))?
                .map_err(|e| err("enabling IPv6 forwarding", e))?;
        }
        // IPv6 is routed, not translated: a conntrack firewall admits replies (and the ICMPv6
        // errors about them) only, i.e. address-and-port-dependent filtering, as a stock Linux
        // router with this common rule set does.
        let rules6 = if ipv6 {
            format!(
                "table inet natscope6 {{\n\
                 chain forward {{ type filter hook forward priority filter; policy accept; meta nfproto ipv6 ct state established,related accept; meta nfproto ipv6 iifname \"{l}\" oifname \"{w}\" accept; meta nfproto ipv6 drop; }}\n\
                 }}\n",
                w = driver::WAN,
                l = driver::LAN
            )
        } else {
            String::new()
        };
        // `ct status dnat accept`: inbound that a port mapping admitted (miniupnpd's DNAT rules,
        // [`crate::miniupnpd`]); without a port-mapping service there are no DNAT rules.
        let rules = format!(
            "table ip natscope {{\n\
             chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; oifname \"{w}\" masquerade; }}\n\
             chain forward {{ type filter hook forward priority filter; policy drop; ct state established,related accept; iifname \"{l}\" oifname \"{w}\" accept; ct status dnat accept; }}\n\
             }}\n{rules6}",
            w = driver::WAN,
            l = driver::LAN
        );
        let mut cmd = Command::new("nft");
        cmd.arg("-f")
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = node
            .spawn(cmd)
            .map_err(|e| err("running nft (install nftables)", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin
                .write_all(rules.as_bytes())
                .map_err(|e| err("writing nft rules", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| err("running nft", e))?;
        if !out.status.success() {
            return Err(err(
                "nft rejected the masquerade rules",
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            ));
        }
        Ok(())
    }

    /// miniupnpd on a `linux` router with `port_mapping` ([`crate::miniupnpd`]), tracked and
    /// stopped by pid like the reflectors.
    fn start_miniupnpd(&mut self, idx: usize) -> Result<(), LabError> {
        let node = &self.nodes[idx];
        let name = node.plan.name.clone();
        let lan = node.plan.lan.ok_or_else(|| LabError::Engine {
            node: name.clone(),
            source: driver::DriverError::NoInterface(driver::LAN),
        })?;
        let router = crate::miniupnpd::Router {
            lab: &self.name,
            node: &name,
            lan_if: driver::LAN,
            wan_if: driver::WAN,
            lan_addr: lan.addr,
            services: &node.plan.port_mapping,
        };
        let child = crate::miniupnpd::start(
            &router,
            |cmd| node.spawn(cmd),
            |check| node.run(check).unwrap_or(false),
        )
        .map_err(|e| LabError::Process {
            node: name.clone(),
            what: "miniupnpd".to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.children.push((name, child));
        Ok(())
    }

    fn start_reflector(&mut self, p: &PlannedNode, bin: &std::path::Path) -> Result<(), LabError> {
        let idx = self.node_index(&p.name)?;
        let (Some(a1), Some(a2)) = (p.uplink.first(), p.uplink.get(1)) else {
            return Err(LabError::NoSuchNode(format!(
                "{} (reflector without two addresses)",
                p.name
            )));
        };
        let primary = SocketAddr::from((a1.addr, STUN_PORT));
        let alternate = SocketAddr::from((a2.addr, STUN_ALT_PORT));
        let mut cmd = Command::new(bin);
        cmd.args([
            "reflect",
            "--workers",
            "1",
            "--rate-limit",
            "0",
            "--primary",
        ])
        .arg(primary.to_string())
        .arg("--alternate")
        .arg(alternate.to_string());
        // Dual-stack labs: the same RFC 5780 service on the reflector's two IPv6 addresses.
        if let (Some(b1), Some(b2)) = (p.uplink6.first(), p.uplink6.get(1)) {
            cmd.arg("--primary")
                .arg(SocketAddr::from((b1.addr, STUN_PORT)).to_string())
                .arg("--alternate")
                .arg(SocketAddr::from((b2.addr, STUN_ALT_PORT)).to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let what = format!("starting {} reflect", bin.display());
        let child = self.nodes[idx]
            .spawn(cmd)
            .map_err(|source| LabError::Process {
                node: p.name.clone(),
                what,
                source,
            })?;
        self.children.push((p.name.clone(), child));
        let ready = self.nodes[idx].run(move || wait_for_stun(primary, REFLECTOR_READY))?;
        if !ready {
            return Err(LabError::ReflectorNotReady(p.name.clone(), REFLECTOR_READY));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }
    pub fn node(&self, name: &str) -> Result<&LabNode, LabError> {
        Ok(&self.nodes[self.node_index(name)?])
    }
    /// A reflector's primary and alternate STUN addresses.
    pub fn stun_addresses(&self, reflector: &str) -> Result<(SocketAddr, SocketAddr), LabError> {
        let n = self.node(reflector)?;
        match (n.plan.uplink.first(), n.plan.uplink.get(1)) {
            (Some(a), Some(b)) if n.role() == Role::Reflector => Ok((
                SocketAddr::from((a.addr, STUN_PORT)),
                SocketAddr::from((b.addr, STUN_ALT_PORT)),
            )),
            _ => Err(LabError::NoSuchNode(format!(
                "{reflector} (not a reflector)"
            ))),
        }
    }
    /// The IPv6 primary and alternate STUN addresses of `reflector` (dual-stack labs).
    pub fn stun_addresses6(&self, reflector: &str) -> Result<(SocketAddr, SocketAddr), LabError> {
        let n = self.node(reflector)?;
        match (n.plan.uplink6.first(), n.plan.uplink6.get(1)) {
            (Some(a), Some(b)) if n.role() == Role::Reflector => Ok((
                SocketAddr::from((a.addr, STUN_PORT)),
                SocketAddr::from((b.addr, STUN_ALT_PORT)),
            )),
            _ => Err(LabError::NoSuchNode(format!(
                "{reflector} (not a reflector with IPv6)"
            ))),
        }
    }
    /// A NAT router's live mappings: a userspace NAT's own table, or a `linux` router's
    /// conntrack entries and miniupnpd leases ([`crate::conntrack`]); `None` for other nodes.
    pub fn nat_table(&self, node: &str) -> Option<Vec<MappingRow>> {
        if let Some((_, e)) = self.engines.iter().find(|(n, _)| n == node) {
            let now = Instant::now();
            return Some(e.with_router(|r| r.mappings(now)));
        }
        let n = self.node(node).ok()?;
        let p = &n.plan;
        if !matches!(p.router, Some(RouterKind::Linux)) {
            return None;
        }
        let conntrack = n
            .run(|| std::fs::read_to_string("/proc/thread-self/net/nf_conntrack"))
            .ok()?
            .unwrap_or_default();
        let leases = std::fs::read_to_string(crate::miniupnpd::leases_path(&self.name, node))
            .unwrap_or_default();
        let mut own: Vec<IpAddr> = p.uplink.iter().map(|n| IpAddr::V4(n.addr)).collect();
        own.extend(p.lan.map(|n| IpAddr::V4(n.addr)));
        own.extend(p.uplink6.iter().map(|n| IpAddr::V6(n.addr)));
        own.extend(p.lan6.map(|n| IpAddr::V6(n.addr)));
        let (lan, lan6) = (p.lan, p.lan6.or(p.routed6));
        let inside = move |ip: IpAddr| match ip {
            IpAddr::V4(v4) => lan.is_some_and(|n| n.contains(v4)),
            IpAddr::V6(v6) => lan6.is_some_and(|n| n.contains(v6)),
        };
        let view = crate::conntrack::RouterView {
            own: &own,
            external: *own.first()?,
            inside: &inside,
        };
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(crate::conntrack::mappings(
            &conntrack,
            &crate::conntrack::parse_leases(&leases),
            &view,
            now_unix,
        ))
    }
    /// A userspace NAT's per-flow counters (the grid's path evidence).
    pub fn nat_flows(&self, node: &str) -> Option<Vec<FlowRow>> {
        let (_, e) = self.engines.iter().find(|(n, _)| n == node)?;
        Some(e.with_router(|r| r.flows()))
    }
    /// A userspace NAT's counters.
    pub fn nat_stats(&self, node: &str) -> Option<Stats> {
        let (_, e) = self.engines.iter().find(|(n, _)| n == node)?;
        Some(e.with_router(|r| r.stats()))
    }

    /// Stops every engine and process and removes every namespace and the record.
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        for (_, mut e) in self.engines.drain(..) {
            e.stop();
        }
        let pids: Vec<i32> = self.children.iter().map(|(_, c)| c.id() as i32).collect();
        registry::kill_all(&pids);
        for (_, mut c) in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let inodes: Vec<u64> = self
            .nodes
            .iter()
            .filter_map(|n| netns::inode_of(&n.namespace))
            .collect();
        registry::kill_in(&inodes);
        for n in self.nodes.drain(..).rev() {
            let name = n.namespace.clone();
            if let Err(e) = n.ns.delete() {
                tracing::warn!(namespace = %name, error = %e, "could not remove namespace");
            }
        }
        registry::remove(&self.name);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Per-namespace IPv6 settings before any link exists, so every link inherits them. Runs on the
/// namespace's thread, where /proc/sys/net is the namespace's own (never the root's).
///
/// Nothing waits on the network: no router advertisements are accepted and no solicitations sent
/// (routes are static), and no duplicate address detection (addresses are added `nodad` too). A
/// userspace router's kernel has IPv6 off altogether: its engine answers neighbor discovery on
/// `wan0` and `lan0` itself, and a kernel link-local address there would only add noise.
fn ipv6_sysctls(userspace_router: bool) {
    let settings: &[(&str, &str)] = if userspace_router {
        &[("disable_ipv6", "1")]
    } else {
        &[
            ("accept_ra", "0"),
            ("router_solicitations", "0"),
            ("accept_dad", "0"),
            ("dad_transmits", "0"),
            ("disable_ipv6", "0"),
        ]
    };
    for key in ["default", "all"] {
        for (name, value) in settings {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/{name}"), value);
        }
    }
}

/// A node's IPv6 routes: a default via its gateway behind a router; on the internet segment an
/// on-link default plus each top-level router's routed prefix via that router.
async fn add_routes6(
    h: &rtnetlink::Handle,
    link: &str,
    plan: &PlannedNode,
    routes6: &[((std::net::Ipv6Addr, u8), std::net::Ipv6Addr)],
) -> Result<(), links::LinkError> {
    if plan.uplink6.is_empty() {
        return Ok(());
    }
    let default = (std::net::Ipv6Addr::UNSPECIFIED, 0);
    if plan.gateway6.is_some() {
        return links::add_route6(h, link, default, plan.gateway6).await;
    }
    links::add_route6(h, link, default, None).await?;
    for (prefix, via) in routes6 {
        // A router's own prefix is not routed back to itself.
        if !plan.uplink6.iter().any(|a| a.addr == *via) {
            links::add_route6(h, link, *prefix, Some(*via)).await?;
        }
    }
    Ok(())
}

/// Sends STUN Binding requests to `server` until one is answered or `limit` passes.
fn wait_for_stun(server: SocketAddr, limit: Duration) -> bool {
    let Ok(sock) = UdpSocket::bind(("0.0.0.0", 0)) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(20)));
    let deadline = Instant::now() + limit;
    let tid = TransactionId::random();
    let mut req = [0u8; 20];
    let Ok(len) = build_request(&mut req, &tid, &RequestOptions::default()) else {
        return false;
    };
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = sock.send_to(&req[..len], server);
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if Message::parse(&buf[..n]).is_ok_and(|m| {
                m.message_type() == MessageType::BINDING_RESPONSE && m.transaction_id() == tid
            }) {
                return true;
            }
        }
    }
    false
}

/// The `schema` of `natscope lab status --json` (and `lab up --json`).
pub const STATUS_SCHEMA: &str = "natscope.lab/v1";

/// The `natscope.lab/v1` document: every lab `lab status` lists (docs/lab.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatusDocument {
    /// Always [`STATUS_SCHEMA`].
    #[schemars(extend("const" = STATUS_SCHEMA))]
    pub schema: String,
    /// The version of natscope that wrote the document; empty when read from a document
    /// written before it was added.
    #[serde(default)]
    pub natscope_version: String,
    pub labs: Vec<LabStatus>,
}

impl StatusDocument {
    pub fn new(labs: Vec<LabStatus>) -> Self {
        Self {
            schema: STATUS_SCHEMA.to_string(),
            natscope_version: natscope_core::document::version(),
            labs,
        }
    }
}

/// One lab as `lab status` reports it: its record, whether its owner lives, and per node what
/// the owner's engines say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LabStatus {
    pub name: String,
    /// `None` for a lab built from a topology file or in Rust.
    pub preset: Option<String>,
    /// Whether the owner process is alive; a lab without one is stale.
    pub running: bool,
    pub owner_pid: i32,
    pub nodes: Vec<NodeStatus>,
}

impl LabStatus {
    /// The status of the lab `rec` records, with each node's live mapping count from `mappings`
    /// (`None` for nodes without a userspace engine, or when the owner serves no counters).
    pub fn of(rec: &Record, mappings: impl Fn(&str) -> Option<usize>) -> Self {
        Self {
            name: rec.name.clone(),
            preset: rec.preset.clone(),
            running: registry::owner_alive(rec),
            owner_pid: rec.owner_pid,
            nodes: rec
                .nodes
                .iter()
                .map(|p| NodeStatus::of(&rec.name, p, mappings(&p.name)))
                .collect(),
        }
    }
}

/// One node of a [`LabStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeStatus {
    pub name: String,
    pub role: Role,
    /// `nsc-<lab>-<node>`.
    pub namespace: String,
    /// CIDR strings: IPv4 first, the primary address first (a NAT's first external address, then
    /// its LAN address), then IPv6 in the same order.
    pub addresses: Vec<String>,
    /// NAT nodes: how they translate.
    pub router: Option<RouterKind>,
    /// Live mappings of a userspace NAT.
    pub mappings: Option<usize>,
    /// NAT nodes: the port-mapping services they offer on their LAN (the engine's own, or
    /// miniupnpd's on a `linux` router); left out when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mapping: Vec<PortMappingService>,
}

/// A serde enum's wire name (`endpoint-independent`), so prose and JSON use the same words.
pub fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

impl NodeStatus {
    /// A router's settings in words, for `lab status`'s table: how it maps and filters IPv4, what
    /// it does with IPv6, and the port-mapping services it offers. Empty for other nodes.
    pub fn settings(&self) -> String {
        let mut parts = vec![];
        match &self.router {
            None => return String::new(),
            // Its IPv6 is the conntrack firewall of `table inet natscope6`: admits replies only.
            Some(RouterKind::Linux) => parts.extend([
                "linux nftables masquerade".to_string(),
                "ipv6 conntrack firewall (address-and-port-dependent)".to_string(),
            ]),
            Some(RouterKind::Engine(c)) => {
                let b = &c.behavior;
                if c.translate {
                    parts.push(format!("mapping {}", wire_name(&b.mapping)));
                } else {
                    parts.push("firewall (no translation)".to_string());
                }
                parts.push(format!("filtering {}", wire_name(&b.filtering)));
                if c.translate {
                    parts.push(match b.allocation {
                        PortAllocation::Preserve => "ports preserve".to_string(),
                        PortAllocation::Sequential { step } => {
                            format!("ports sequential (step {step})")
                        }
                        PortAllocation::Random => "ports random".to_string(),
                    });
                    let on = if b.hairpinning { "on" } else { "off" };
                    parts.push(format!("hairpinning {on}"));
                }
                if c.block_udp {
                    parts.push("udp blocked".into());
                }
                parts.push(match c.ipv6 {
                    Ipv6Mode::None => "no ipv6".to_string(),
                    mode => format!(
                        "ipv6 {} (filtering {})",
                        wire_name(&mode),
                        wire_name(&c.ipv6_filtering)
                    ),
                });
            }
        }
        if !self.port_mapping.is_empty() {
            let names: Vec<String> = self.port_mapping.iter().map(wire_name).collect();
            parts.push(format!("port mapping {}", names.join(" ")));
        }
        parts.join(", ")
    }

    pub fn of(lab: &str, p: &PlannedNode, mappings: Option<usize>) -> Self {
        let mut addresses: Vec<String> = p.uplink.iter().map(|n| n.to_string()).collect();
        addresses.extend(p.lan.map(|l| l.to_string()));
        addresses.extend(p.uplink6.iter().map(|n| n.to_string()));
        addresses.extend(p.lan6.map(|l| l.to_string()));
        Self {
            name: p.name.clone(),
            role: p.role,
            namespace: namespace_name(lab, &p.name),
            addresses,
            router: p.router.clone(),
            mappings,
            port_mapping: match &p.router {
                Some(RouterKind::Engine(c)) => c.port_mapping.clone(),
                _ => p.port_mapping.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// The `settings` column of `lab status` for the router of `preset`.
    fn settings(preset: &str, router: &str) -> String {
        let plan = presets::preset(preset)
            .expect("preset")
            .plan()
            .expect("plan");
        let node = plan
            .nodes
            .iter()
            .find(|n| n.name == router)
            .expect("router");
        NodeStatus::of("t", node, None).settings()
    }

    #[test]
    fn status_names_each_family_and_the_port_mapping_services() {
        assert_eq!(
            settings("symmetric+pcp", "nat"),
            "mapping address-and-port-dependent, filtering address-and-port-dependent, \
             ports random, hairpinning off, ipv6 firewall (filtering endpoint-independent), \
             port mapping pcp"
        );
        assert!(
            settings("dual-stack-strict", "nat")
                .ends_with("ipv6 firewall (filtering address-and-port-dependent)"),
            "{}",
            settings("dual-stack-strict", "nat")
        );
        assert!(settings("ipv4-only", "nat").ends_with("no ipv6"));
        assert!(settings("nptv6", "nat").contains("ipv6 nptv6"));
        // A kernel router's services are miniupnpd's: they live on the node, not in an engine.
        let linux = presets::preset("linux")
            .expect("preset")
            .plan()
            .expect("plan");
        let mut node = linux
            .nodes
            .iter()
            .find(|n| n.name == "nat")
            .unwrap()
            .clone();
        node.port_mapping = vec![PortMappingService::Pcp, PortMappingService::Upnp];
        assert_eq!(
            NodeStatus::of("t", &node, None).settings(),
            "linux nftables masquerade, ipv6 conntrack firewall (address-and-port-dependent), \
             port mapping pcp upnp"
        );
        let host = linux.nodes.iter().find(|n| n.name == "h1").unwrap();
        assert_eq!(NodeStatus::of("t", host, None).settings(), "");
    }
}
