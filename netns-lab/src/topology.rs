//! A lab's topology as plain data: which nodes exist, who sits behind whom, and every NAT's
//! settings. Presets and TOML files both produce a [`Topology`]; [`Topology::plan`] turns it into
//! concrete addresses (DESIGN.md address plan) before anything is created, so bad input is rejected
//! while the root namespace has not been touched yet.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use natscope_core::nat::{FilteringBehavior, NatBehavior};
pub use natscope_core::portmap::PortMappingService;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An IPv4 prefix, `addr/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        Self { addr, len }
    }

    fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len.min(32)))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The last address of the prefix (host bits set).
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    pub fn overlaps(self, other: Ipv4Net) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The `n`-th address of the prefix (`n = 1` is the first host address).
    pub fn host(self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len.min(32)));
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.network()) + n))
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a prefix like 10.1.0.0/24"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("`{l}` is not a prefix length (0..=32)"))?;
        Ok(Self { addr, len })
    }
}

/// An IPv6 prefix, `addr/len`: a node's address with the prefix length of its segment, or a
/// routed prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Net {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Ipv6Net {
    pub fn new(addr: Ipv6Addr, len: u8) -> Self {
        Self { addr, len }
    }

    fn mask(self) -> u128 {
        if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len.min(128)))
        }
    }

    /// The prefix itself (interface-identifier bits cleared).
    pub fn network(self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    pub fn contains(self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.addr) & self.mask()
    }

    pub fn overlaps(self, other: Ipv6Net) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The `n`-th address of the prefix (`n = 1` is `prefix::1`), `None` past its end.
    pub fn host(self, n: u128) -> Option<Ipv6Addr> {
        let bits = 128 - u32::from(self.len.min(128));
        let fits = bits >= 128 || n < (1u128 << bits);
        fits.then(|| Ipv6Addr::from(u128::from(self.network()) | n))
    }
}

impl std::fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Ipv6Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a prefix like 2001:db8:1::/64"))?;
        let addr: Ipv6Addr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv6 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("`{l}` is not a prefix length (0..=128)"))?;
        Ok(Self { addr, len })
    }
}

/// What a router does with IPv6 (docs/lab.md, "IPv6"). Every mode but `none` filters inbound
/// traffic with the RFC 6092 stateful firewall configured by the `ipv6_*` knobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Ipv6Mode {
    /// No IPv6 on the LAN: the LAN's nodes get no IPv6 addresses and the router drops IPv6.
    None,
    /// Hosts have global addresses from the router's routed prefix; the router forwards without
    /// translation through its RFC 6092 firewall (the home gateway IPv6 gives most people).
    #[default]
    Firewall,
    /// RFC 6296 stateless 1:1 prefix translation of a ULA LAN to the router's routed prefix,
    /// checksum-neutral, ports untouched; plus the firewall.
    Nptv6,
    /// Stateful NAT66: the RFC 4787 knobs of `behavior` applied to IPv6, onto the router's own
    /// WAN addresses; plus the firewall's timers.
    Nat66,
}

/// What an IPv6 firewall does with an unsolicited inbound TCP SYN (RFC 6092 REC-36/REC-37 allow
/// silently dropping it or answering with ICMPv6 destination unreachable, administratively
/// prohibited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Ipv6UnsolicitedSyn {
    #[default]
    Drop,
    AdminProhibited,
}

/// RFC 6092 REC-11/REC-17/REC-33: filtering in an unmanaged gateway is endpoint-independent.
pub const IPV6_DEFAULT_FILTERING: FilteringBehavior = FilteringBehavior::EndpointIndependent;
/// RFC 6092 REC-30 / RFC 4787 REQ-5: UDP state lives at least 2 minutes; 5 is the recommended
/// default.
pub const IPV6_MIN_UDP_TIMEOUT: Duration = Duration::from_secs(120);
pub const IPV6_DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(300);
/// RFC 6092 REC-35 / RFC 5382 REQ-5: an established TCP connection lives at least 2 h 4 min.
pub const IPV6_MIN_TCP_TIMEOUT: Duration = Duration::from_secs(7440);

fn default_ipv6_filtering() -> FilteringBehavior {
    IPV6_DEFAULT_FILTERING
}
fn default_ipv6_udp_timeout() -> Duration {
    IPV6_DEFAULT_UDP_TIMEOUT
}
fn default_ipv6_tcp_timeout() -> Duration {
    IPV6_MIN_TCP_TIMEOUT
}

/// What a NAT router does with an unsolicited inbound TCP SYN (RFC 5382 §5 REQ-4 asks for silence;
/// some NATs answer with a reset, which defeats TCP simultaneous open).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UnsolicitedSyn {
    Drop,
    Reset,
}

/// Settings of the userspace NAT engine of one router.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EngineConfig {
    /// The RFC 4787 knobs (mapping, filtering, allocation, range, parity, hairpinning, timeouts,
    /// refresh direction, pooling). With `translate == false` only filtering and timeouts apply.
    pub behavior: NatBehavior,
    /// `false`: a stateful firewall in front of public hosts (no address translation).
    pub translate: bool,
    /// Drop every UDP packet in both directions ("UDP blocked").
    pub block_udp: bool,
    pub unsolicited_syn: UnsolicitedSyn,
    /// Number of external addresses in the pool (RFC 4787 §4.1; pooling is in `behavior`).
    pub external_addresses: u8,
    /// Seeded loss probability per forwarded packet, 0.0..=1.0.
    pub loss: f64,
    /// Fixed one-way delay added to every forwarded packet.
    pub delay: Duration,
    /// Seed for port choice and loss, so a lab run is reproducible (REQ-11).
    pub seed: u64,
    /// What the router does with IPv6.
    #[serde(default)]
    pub ipv6: Ipv6Mode,
    /// Inbound filtering of the IPv6 firewall (RFC 6092; endpoint-independent by default).
    #[serde(default = "default_ipv6_filtering")]
    pub ipv6_filtering: FilteringBehavior,
    /// Idle lifetime of IPv6 UDP state (RFC 6092 REC-30: at least 2 min, default 5).
    #[serde(default = "default_ipv6_udp_timeout")]
    pub ipv6_udp_timeout: Duration,
    /// Idle lifetime of an established IPv6 TCP connection (REC-35: at least 2 h 4 min).
    #[serde(default = "default_ipv6_tcp_timeout")]
    pub ipv6_tcp_timeout: Duration,
    /// An unsolicited inbound IPv6 SYN: dropped, or answered with ICMPv6 admin-prohibited.
    #[serde(default)]
    pub ipv6_unsolicited_syn: Ipv6UnsolicitedSyn,
    /// Port-mapping services the router offers on its LAN address (NAT-PMP and PCP on UDP 5351,
    /// UPnP IGD over SSDP and HTTP); empty: none, as most routers in the presets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mapping: Vec<PortMappingService>,
}

impl EngineConfig {
    pub fn new(behavior: NatBehavior) -> Self {
        Self {
            behavior,
            translate: true,
            block_udp: false,
            unsolicited_syn: UnsolicitedSyn::Drop,
            external_addresses: 1,
            loss: 0.0,
            delay: Duration::ZERO,
            seed: 1,
            ipv6: Ipv6Mode::default(),
            ipv6_filtering: IPV6_DEFAULT_FILTERING,
            ipv6_udp_timeout: IPV6_DEFAULT_UDP_TIMEOUT,
            ipv6_tcp_timeout: IPV6_MIN_TCP_TIMEOUT,
            ipv6_unsolicited_syn: Ipv6UnsolicitedSyn::Drop,
            port_mapping: Vec::new(),
        }
    }
}

/// How a router translates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum RouterKind {
    /// natscope's userspace RFC 4787 engine.
    Engine(EngineConfig),
    /// The kernel's nftables masquerade: what a stock Linux router does.
    Linux,
}

/// One node of a topology. `parent` names the NAT router whose LAN the node sits on; `None` puts
/// it on the internet segment.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "role")]
pub enum NodeSpec {
    /// A STUN server with two public addresses running `natscope reflect`.
    Reflector { name: String },
    /// A NAT router (or firewall); its LAN subnet is chosen by the planner unless given.
    Nat {
        name: String,
        parent: Option<String>,
        lan: Option<Ipv4Net>,
        router: RouterKind,
        /// Port-mapping services the router offers on its LAN (issue 12); empty: none.
        port_mapping: Vec<PortMappingService>,
    },
    /// An end host.
    Host {
        name: String,
        parent: Option<String>,
    },
}

impl NodeSpec {
    pub fn name(&self) -> &str {
        match self {
            NodeSpec::Reflector { name }
            | NodeSpec::Nat { name, .. }
            | NodeSpec::Host { name, .. } => name,
        }
    }

    pub fn parent(&self) -> Option<&str> {
        match self {
            NodeSpec::Reflector { .. } => None,
            NodeSpec::Nat { parent, .. } | NodeSpec::Host { parent, .. } => parent.as_deref(),
        }
    }
}

/// A whole lab: nodes in an order where every parent comes before its children.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Topology {
    /// The preset this topology came from, if any (reported by `lab status`).
    pub preset: Option<String>,
    pub nodes: Vec<NodeSpec>,
}

/// What a node is, as reported by `lab status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Internet,
    Reflector,
    Nat,
    Host,
}

/// Name of the implicit internet node (a bridge every top-level node attaches to). Reserved.
pub const INTERNET: &str = "internet";
/// The internet segments (documentation ranges, DESIGN.md): reflectors live in the first, NAT
/// external addresses and public hosts in the second. Both are on-link on the internet bridge.
pub const REFLECTOR_NET: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(198, 51, 100, 0),
    len: 24,
};
pub const PUBLIC_NET: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(203, 0, 113, 0),
    len: 24,
};
/// The internet segments' IPv6 prefixes (inside 2001:db8::/32, RFC 3849): reflectors in the
/// first, NAT WAN addresses and public hosts in the second; both on-link on the internet bridge.
pub const REFLECTOR_NET6: Ipv6Net = Ipv6Net {
    addr: Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0),
    len: 64,
};
pub const PUBLIC_NET6: Ipv6Net = Ipv6Net {
    addr: Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 0),
    len: 64,
};
/// Shared address space between carrier and home NATs (RFC 6598).
pub const CGNAT_NET: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(100, 64, 0, 0),
    len: 10,
};
/// Private LAN space.
pub const PRIVATE_NET: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(10, 0, 0, 0),
    len: 8,
};
/// STUN ports of every reflector: primary and alternate.
pub const STUN_PORT: u16 = 3478;
pub const STUN_ALT_PORT: u16 = 3479;

/// One node with concrete addresses, produced by [`Topology::plan`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedNode {
    pub name: String,
    pub role: Role,
    /// The segment this node's uplink (`eth0`, or `wan0` on a router) attaches to: the parent NAT's
    /// name or [`INTERNET`]. `None` only for the internet node itself.
    pub upstream: Option<String>,
    /// Addresses on the uplink, primary first, each with the prefix length of its segment.
    /// For an engine NAT these are its external addresses, answered by the engine (the kernel of
    /// a userspace router holds no addresses). For the internet node: its own bridge addresses.
    pub uplink: Vec<Ipv4Net>,
    /// Next hop towards the internet, or `None` when every internet address is on-link (nodes on
    /// the internet segment).
    pub gateway: Option<Ipv4Addr>,
    /// NAT routers: the LAN prefix, with `addr` = the router's own LAN address (first host).
    pub lan: Option<Ipv4Net>,
    /// NAT routers: how they translate.
    pub router: Option<RouterKind>,
    /// IPv6 addresses on the uplink (two per node, `/64` of the segment); empty when the node's
    /// segment has no IPv6 (behind an `ipv6 = "none"` router).
    #[serde(default)]
    pub uplink6: Vec<Ipv6Net>,
    /// IPv6 next hop (the parent router's LAN address); `None` on the internet segment, where
    /// routes are static (docs/lab.md, "IPv6").
    #[serde(default)]
    pub gateway6: Option<Ipv6Addr>,
    /// NAT routers with IPv6 on the LAN: the LAN's `/64`, `addr` = the router's own LAN address.
    #[serde(default)]
    pub lan6: Option<Ipv6Net>,
    /// NAT routers with IPv6: the global `/48` routed to the router's first WAN address (the
    /// LAN's prefix in `firewall` mode, the external prefix in `nptv6` mode).
    #[serde(default)]
    pub routed6: Option<Ipv6Net>,
    /// Static IPv6 routes this node holds besides its default: on the internet node, every
    /// reachable routed prefix via the top-level router in front of it; on a firewall-mode router,
    /// the routed prefixes of routers behind it via the next router down (docs/lab.md, "IPv6").
    #[serde(default)]
    pub routes6: Vec<(Ipv6Net, Ipv6Addr)>,
    /// NAT routers: the port-mapping services they offer on their LAN (issue 12).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mapping: Vec<PortMappingService>,
}

/// A validated topology with addresses: what [`crate::Lab`] builds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub preset: Option<String>,
    /// The internet node first, then the topology's nodes with parents before children.
    pub nodes: Vec<PlannedNode>,
}

/// Why a topology cannot be built. Raised before anything is created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("node name `{0}` is used twice")]
    DuplicateName(String),
    #[error("node name `{0}` is invalid: use 1-12 characters a-z, 0-9, '-', not `internet`")]
    BadName(String),
    #[error("node `{node}` sits behind `{parent}`, which is not a nat node of this lab")]
    UnknownParent { node: String, parent: String },
    #[error("subnet {a} of `{a_node}` overlaps {b} of `{b_node}`")]
    Overlap {
        a_node: String,
        a: Ipv4Net,
        b_node: String,
        b: Ipv4Net,
    },
    #[error("subnet {subnet} of `{node}` is not usable: {why}")]
    BadSubnet {
        node: String,
        subnet: Ipv4Net,
        why: String,
    },
    #[error("nat `{node}`: {why}")]
    BadNat { node: String, why: String },
    #[error("the lab has too many {what} for its address plan (at most {max})")]
    TooMany { what: &'static str, max: usize },
    #[error("nat nesting under `{0}` forms a cycle")]
    Cycle(String),
}
