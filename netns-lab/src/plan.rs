//! [`Topology::plan`]: checks every rule a lab relies on, then gives each node its addresses.
//!
//! This is pure computation, kept apart from the code that creates namespaces so that a bad
//! topology (from a preset or a TOML file) is rejected before anything exists, and so that the
//! address plan is deterministic and testable without privileges. The plan itself is documented
//! in docs/lab.md ("Topology files", "Address plan").

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use natscope_core::nat::PortAllocation;

use crate::topology::{
    EngineConfig, Ipv4Net, Ipv6Mode, Ipv6Net, NodeSpec, Plan, PlannedNode, Role, RouterKind,
    Topology, TopologyError, INTERNET, IPV6_MIN_TCP_TIMEOUT, IPV6_MIN_UDP_TIMEOUT, PUBLIC_NET,
    PUBLIC_NET6, REFLECTOR_NET, REFLECTOR_NET6,
};

/// Most nodes a lab may have (each is a namespace with a thread and links).
pub const MAX_NODES: usize = 64;
/// Most reflectors a lab may have (two addresses each in [`REFLECTOR_NET`]).
pub const MAX_REFLECTORS: usize = 16;
/// Public addresses below .128 of [`PUBLIC_NET`] available to top-level NATs and public hosts.
pub const MAX_PUBLIC_ADDRESSES: usize = 127;
/// Longest fixed delay a NAT engine may add.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Where firewall LANs (hosts with public addresses) live: the upper half of [`PUBLIC_NET`].
pub const FIREWALL_NET: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(203, 0, 113, 128),
    len: 25,
};

/// Internet-side addresses of the internet node itself (one per internet range).
const INTERNET_REFLECTOR_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const INTERNET_PUBLIC_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);

impl Topology {
    /// Validates the topology and assigns every address (docs/lab.md, "Address plan").
    /// Nothing is created; every error is raised before a lab is touched.
    pub fn plan(&self) -> Result<Plan, TopologyError> {
        validate(self)?;
        assign(self)
    }
}

/// Indices of `nodes` with every parent before its children, otherwise in input order (the first
/// node whose parent is already placed goes next). Nodes whose parent never gets placed (unknown
/// parent, cycle) come last in input order; [`Topology::plan`] rejects those anyway.
pub(crate) fn parents_first(nodes: &[NodeSpec]) -> Vec<usize> {
    let mut order = Vec::with_capacity(nodes.len());
    let mut placed = vec![false; nodes.len()];
    let mut placed_names: HashSet<&str> = HashSet::new();
    loop {
        let next = (0..nodes.len())
            .find(|&i| !placed[i] && nodes[i].parent().is_none_or(|p| placed_names.contains(p)));
        let Some(i) = next else { break };
        placed[i] = true;
        placed_names.insert(nodes[i].name());
        order.push(i);
    }
    order.extend((0..nodes.len()).filter(|&i| !placed[i]));
    order
}

fn valid_name(name: &str) -> bool {
    (1..=12).contains(&name.len())
        && !name.starts_with('-')
        && name != INTERNET
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A firewall: an engine router that filters without translating.
fn is_firewall(router: &RouterKind) -> bool {
    matches!(router, RouterKind::Engine(cfg) if !cfg.translate)
}

/// How many addresses a node takes on its uplink segment.
fn uplink_count(node: &NodeSpec) -> usize {
    match node {
        NodeSpec::Reflector { .. } => 2,
        NodeSpec::Host { .. } => 1,
        NodeSpec::Nat { router, .. } => match router {
            RouterKind::Engine(cfg) => usize::from(cfg.external_addresses),
            RouterKind::Linux => 1,
        },
    }
}

/// A `linux` router with port mapping runs miniupnpd 2.3.1, which needs a WAN address it does not
/// call reserved: only the internet segment's [`crate::miniupnpd::WAN_NET`] has one.
fn check_miniupnpd(
    name: &str,
    nested: bool,
    services: &[natscope_core::portmap::PortMappingService],
) -> Result<(), TopologyError> {
    if services.is_empty() {
        return Ok(());
    }
    let bad = |why: String| TopologyError::BadNat {
        node: name.to_string(),
        why,
    };
    if nested {
        return Err(bad(
            "a `linux` router with port_mapping runs miniupnpd 2.3.1, which \
                        refuses private and shared WAN addresses: it must sit on the internet"
                .to_string(),
        ));
    }
    crate::miniupnpd::check(services).map_err(bad)
}

/// Whether `node` is a `linux` router running miniupnpd (its WAN address comes from
/// [`crate::miniupnpd::WAN_NET`]).
fn runs_miniupnpd(node: &NodeSpec) -> bool {
    matches!(node, NodeSpec::Nat { router: RouterKind::Linux, port_mapping, .. } if !port_mapping.is_empty())
}

fn validate(topology: &Topology) -> Result<(), TopologyError> {
    let nodes = &topology.nodes;
    if nodes.len() > MAX_NODES {
        return Err(TopologyError::TooMany {
            what: "nodes",
            max: MAX_NODES,
        });
    }

    let mut seen = HashSet::new();
    for node in nodes {
        if !valid_name(node.name()) {
            return Err(TopologyError::BadName(node.name().to_string()));
        }
        if !seen.insert(node.name()) {
            return Err(TopologyError::DuplicateName(node.name().to_string()));
        }
    }

    let find = |name: &str| nodes.iter().find(|n| n.name() == name);
    for node in nodes {
        if let Some(parent) = node.parent() {
            if !matches!(find(parent), Some(NodeSpec::Nat { .. })) {
                return Err(TopologyError::UnknownParent {
                    node: node.name().to_string(),
                    parent: parent.to_string(),
                });
            }
        }
    }

    // Every parent is a nat of this lab; walking up from any node must reach the internet.
    for node in nodes {
        let mut path: HashSet<&str> = HashSet::new();
        let mut at = node.name();
        while let Some(parent) = find(at).and_then(NodeSpec::parent) {
            if !path.insert(at) {
                return Err(TopologyError::Cycle(at.to_string()));
            }
            at = parent;
        }
    }

    for node in nodes {
        if let NodeSpec::Nat {
            name,
            parent,
            router: RouterKind::Engine(cfg),
            ..
        } = node
        {
            check_engine(name, cfg)?;
            if !cfg.translate && parent.is_some() {
                return Err(TopologyError::BadNat {
                    node: name.clone(),
                    why: "a firewall (translate = false) must sit on the internet: its lan \
                          holds public addresses"
                        .to_string(),
                });
            }
        }
    }

    for node in nodes {
        if let NodeSpec::Nat {
            name,
            parent,
            router: RouterKind::Linux,
            port_mapping,
            ..
        } = node
        {
            check_miniupnpd(name, parent.is_some(), port_mapping)?;
        }
    }

    let mut explicit: Vec<(&str, Ipv4Net)> = Vec::new();
    for node in nodes {
        if let NodeSpec::Nat {
            name,
            lan: Some(lan),
            router,
            ..
        } = node
        {
            check_lan(name, *lan, is_firewall(router))?;
            if let Some((other, other_lan)) = explicit.iter().find(|(_, l)| l.overlaps(*lan)) {
                return Err(TopologyError::Overlap {
                    a_node: name.clone(),
                    a: *lan,
                    b_node: other.to_string(),
                    b: *other_lan,
                });
            }
            explicit.push((name, *lan));
        }
    }

    let reflectors = nodes
        .iter()
        .filter(|n| matches!(n, NodeSpec::Reflector { .. }))
        .count();
    if reflectors > MAX_REFLECTORS {
        return Err(TopologyError::TooMany {
            what: "reflectors",
            max: MAX_REFLECTORS,
        });
    }
    let public: usize = nodes
        .iter()
        .filter(|n| !matches!(n, NodeSpec::Reflector { .. }) && n.parent().is_none())
        .map(uplink_count)
        .sum();
    if public > MAX_PUBLIC_ADDRESSES {
        return Err(TopologyError::TooMany {
            what: "public addresses (nat external addresses and public hosts)",
            max: MAX_PUBLIC_ADDRESSES,
        });
    }
    Ok(())
}

fn check_engine(name: &str, cfg: &EngineConfig) -> Result<(), TopologyError> {
    let bad = |why: &str| {
        Err(TopologyError::BadNat {
            node: name.to_string(),
            why: why.to_string(),
        })
    };
    let b = &cfg.behavior;
    if cfg.external_addresses == 0 {
        return bad("external_addresses must be at least 1");
    }
    if !(0.0..=1.0).contains(&cfg.loss) {
        return bad("loss must be a probability within 0..=1");
    }
    if cfg.delay > MAX_DELAY {
        return bad("delay must be at most 10 s");
    }
    let (lo, hi) = b.port_range;
    if lo == 0 || lo > hi {
        return bad("port_range must be [low, high] with 1 <= low <= high");
    }
    if let PortAllocation::Sequential { step: 0 } = b.allocation {
        return bad("sequential allocation needs step >= 1");
    }
    if b.udp_timeout.is_zero() || b.tcp_timeout.is_zero() {
        return bad("udp and tcp timeouts must be positive");
    }
    if cfg.ipv6_udp_timeout < IPV6_MIN_UDP_TIMEOUT {
        return bad("ipv6_udp_timeout must be at least 2 min (RFC 6092 REC-30)");
    }
    if cfg.ipv6_tcp_timeout < IPV6_MIN_TCP_TIMEOUT {
        return bad("ipv6_tcp_timeout must be at least 2 h 4 min (RFC 6092 REC-35)");
    }
    Ok(())
}

fn check_lan(name: &str, lan: Ipv4Net, firewall: bool) -> Result<(), TopologyError> {
    let bad = |why: String| {
        Err(TopologyError::BadSubnet {
            node: name.to_string(),
            subnet: lan,
            why,
        })
    };
    if lan.len > 30 {
        return bad("a prefix longer than /30 leaves no room for hosts".to_string());
    }
    if lan.len < 8 {
        return bad("a prefix shorter than /8 is too wide for a lab lan".to_string());
    }
    if lan.addr != lan.network() {
        return bad(format!(
            "host bits are set; the network is {}/{}",
            lan.network(),
            lan.len
        ));
    }
    let reserved = [
        Ipv4Net::new(Ipv4Addr::new(0, 0, 0, 0), 8),
        Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8),
        Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16),
        Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 3),
    ];
    if reserved.iter().any(|r| r.overlaps(lan)) {
        return bad("not unicast space usable for a lan".to_string());
    }
    if REFLECTOR_NET.overlaps(lan) {
        return Err(TopologyError::Overlap {
            a_node: name.to_string(),
            a: lan,
            b_node: INTERNET.to_string(),
            b: REFLECTOR_NET,
        });
    }
    let inside_firewall_net = lan.len >= FIREWALL_NET.len && FIREWALL_NET.contains(lan.network());
    if firewall {
        if !inside_firewall_net {
            return bad(format!(
                "a firewall's lan holds public addresses and must lie inside {FIREWALL_NET}"
            ));
        }
    } else if PUBLIC_NET.overlaps(lan) {
        return Err(TopologyError::Overlap {
            a_node: name.to_string(),
            a: lan,
            b_node: INTERNET.to_string(),
            b: PUBLIC_NET,
        });
    }
    Ok(())
}

/// The first candidate subnet that overlaps none of `taken`.
fn first_free(candidates: impl IntoIterator<Item = Ipv4Net>, taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    candidates
        .into_iter()
        .find(|c| taken.iter().all(|t| !t.overlaps(*c)))
}

/// `count` consecutive addresses of `net` from host number `*next`, advancing `*next`; `None`
/// when they would reach `last` (exclusive).
fn take(net: Ipv4Net, next: &mut u32, count: usize, last: u32) -> Option<Vec<Ipv4Net>> {
    let count = u32::try_from(count).ok()?;
    let end = next.checked_add(count)?;
    if end > last {
        return None;
    }
    let addrs = (*next..end)
        .map(|n| net.host(n).map(|a| Ipv4Net::new(a, net.len)))
        .collect::<Option<Vec<_>>>()?;
    *next = end;
    Some(addrs)
}

fn assign(topology: &Topology) -> Result<Plan, TopologyError> {
    let nodes = &topology.nodes;
    let order = parents_first(nodes);

    // LANs: explicit ones first, then automatic ones in plan order, skipping explicit subnets.
    let mut taken: Vec<Ipv4Net> = nodes
        .iter()
        .filter_map(|n| match n {
            NodeSpec::Nat { lan: Some(lan), .. } => Some(*lan),
            _ => None,
        })
        .collect();
    let is_carrier = |name: &str| {
        nodes
            .iter()
            .any(|n| matches!(n, NodeSpec::Nat { parent: Some(p), .. } if p == name))
    };
    let firewall_lans = [128u8, 192].map(|b| Ipv4Net::new(Ipv4Addr::new(203, 0, 113, b), 26));
    let carrier_lans = (0..=255u8).map(|k| Ipv4Net::new(Ipv4Addr::new(100, 64, k, 0), 24));
    let home_lans = (1..=255u8).map(|k| Ipv4Net::new(Ipv4Addr::new(10, k, 0, 0), 24));
    let mut lans: Vec<Option<Ipv4Net>> = vec![None; nodes.len()];
    for &i in &order {
        let NodeSpec::Nat {
            name, lan, router, ..
        } = &nodes[i]
        else {
            continue;
        };
        let net = match lan {
            Some(lan) => *lan,
            None => {
                let (candidates, what, max): (Box<dyn Iterator<Item = Ipv4Net>>, _, _) =
                    if is_firewall(router) {
                        (
                            Box::new(firewall_lans.into_iter()),
                            "firewalls without an explicit lan",
                            2,
                        )
                    } else if is_carrier(name) {
                        (
                            Box::new(carrier_lans.clone()),
                            "carrier nats without an explicit lan",
                            256,
                        )
                    } else {
                        (
                            Box::new(home_lans.clone()),
                            "nats without an explicit lan",
                            255,
                        )
                    };
                let net =
                    first_free(candidates, &taken).ok_or(TopologyError::TooMany { what, max })?;
                taken.push(net);
                net
            }
        };
        lans[i] = Some(net);
    }

    let mut planned = vec![PlannedNode {
        name: INTERNET.to_string(),
        role: Role::Internet,
        upstream: None,
        uplink: vec![
            Ipv4Net::new(INTERNET_REFLECTOR_SIDE, REFLECTOR_NET.len),
            Ipv4Net::new(INTERNET_PUBLIC_SIDE, PUBLIC_NET.len),
        ],
        gateway: None,
        lan: None,
        router: None,
        uplink6: vec![
            Ipv6Net::new(internet_side6(REFLECTOR_NET6), REFLECTOR_NET6.len),
            Ipv6Net::new(internet_side6(PUBLIC_NET6), PUBLIC_NET6.len),
        ],
        gateway6: None,
        lan6: None,
        routed6: None,
        routes6: Vec::new(),
        port_mapping: Vec::new(),
    }];
    let mut next_reflector = 1u32;
    let mut next_miniupnpd = 1u32;
    let mut next_public = 1u32;
    // Next free host number on each nat's lan, indexed like `nodes`.
    let mut next_on_lan: Vec<u32> = vec![2; nodes.len()];
    let index_of = |name: &str| nodes.iter().position(|n| n.name() == name);

    for &i in &order {
        let node = &nodes[i];
        let count = uplink_count(node);
        let (uplink, upstream, gateway) = match (node, node.parent()) {
            (NodeSpec::Reflector { .. }, _) => {
                let addrs = take(REFLECTOR_NET, &mut next_reflector, count, 254).ok_or(
                    TopologyError::TooMany {
                        what: "reflectors",
                        max: MAX_REFLECTORS,
                    },
                )?;
                (addrs, INTERNET.to_string(), None)
            }
            (_, None) if runs_miniupnpd(node) => {
                let addrs = take(crate::miniupnpd::WAN_NET, &mut next_miniupnpd, count, 254)
                    .ok_or(TopologyError::TooMany {
                        what: "linux routers with port_mapping",
                        max: 253,
                    })?;
                (addrs, INTERNET.to_string(), None)
            }
            (_, None) => {
                let last = MAX_PUBLIC_ADDRESSES as u32 + 1;
                let addrs = take(PUBLIC_NET, &mut next_public, count, last).ok_or(
                    TopologyError::TooMany {
                        what: "public addresses (nat external addresses and public hosts)",
                        max: MAX_PUBLIC_ADDRESSES,
                    },
                )?;
                (addrs, INTERNET.to_string(), None)
            }
            (_, Some(parent)) => {
                // Validation guarantees the parent is a nat with a lan.
                let p = index_of(parent).ok_or_else(|| TopologyError::UnknownParent {
                    node: node.name().to_string(),
                    parent: parent.to_string(),
                })?;
                let net = lans[p].ok_or_else(|| TopologyError::UnknownParent {
                    node: node.name().to_string(),
                    parent: parent.to_string(),
                })?;
                let size = 1u32 << (32 - u32::from(net.len));
                // Host numbers 2 ..= size - 2 (.1 is the router, the last is broadcast).
                let addrs = take(net, &mut next_on_lan[p], count, size - 1).ok_or(
                    TopologyError::TooMany {
                        what: "addresses on one nat's lan",
                        max: (size as usize).saturating_sub(3),
                    },
                )?;
                let gateway = net.host(1);
                (addrs, parent.to_string(), gateway)
            }
        };
        let (role, lan, router, port_mapping) = match node {
            NodeSpec::Reflector { .. } => (Role::Reflector, None, None, Vec::new()),
            NodeSpec::Host { .. } => (Role::Host, None, None, Vec::new()),
            NodeSpec::Nat {
                router,
                port_mapping,
                ..
            } => {
                let lan = lans[i].and_then(|net| net.host(1).map(|a| Ipv4Net::new(a, net.len)));
                (Role::Nat, lan, Some(router.clone()), port_mapping.clone())
            }
        };
        planned.push(PlannedNode {
            name: node.name().to_string(),
            role,
            upstream: Some(upstream),
            uplink,
            gateway,
            lan,
            router,
            uplink6: Vec::new(),
            gateway6: None,
            lan6: None,
            routed6: None,
            routes6: Vec::new(),
            port_mapping,
        });
    }
    assign_ipv6(nodes, &order, &mut planned)?;
    route_ipv6(&mut planned);
    Ok(Plan {
        preset: topology.preset.clone(),
        nodes: planned,
    })
}

/// IPv6 addresses per node (docs/lab.md, "IPv6"): always two, so a program can be tested for
/// binding one global address; the `k`-th nat of the plan (from 1) gets the routed prefix
/// `2001:db8:(0x100 + k)::/48`. Static routes only: nothing waits for router advertisements.
fn lan6_of(router: &RouterKind, k: u16) -> (Option<Ipv6Net>, Option<Ipv6Net>) {
    let mode = match router {
        RouterKind::Engine(cfg) => cfg.ipv6,
        // The kernel router forwards IPv6 through a conntrack firewall (nft, in its namespace).
        RouterKind::Linux => Ipv6Mode::Firewall,
    };
    let routed = Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0x100 + k, 0, 0, 0, 0, 0), 48);
    // RFC 4193 unique local space behind the translators (DESIGN.md: ULA behind NAT66/NPTv6).
    let ula = Ipv6Addr::new(0xfd00, k, 0, 0, 0, 0, 0, 0);
    let lan = match mode {
        Ipv6Mode::None => return (None, None),
        Ipv6Mode::Firewall => routed.network(),
        Ipv6Mode::Nptv6 | Ipv6Mode::Nat66 => ula,
    };
    let own = Ipv6Net::new(lan, 64).host(1).map(|a| Ipv6Net::new(a, 64));
    (own, Some(routed))
}

/// The internet node's own address on an internet segment: `::fe`, as .254 in IPv4.
fn internet_side6(net: Ipv6Net) -> Ipv6Addr {
    net.host(0xfe).unwrap_or(net.addr)
}

/// Addresses a node takes on its IPv6 uplink: two, or a nat's pool when that is larger.
fn uplink6_count(node: &NodeSpec) -> u128 {
    match node {
        NodeSpec::Nat {
            router: RouterKind::Engine(cfg),
            ..
        } => u128::from(cfg.external_addresses.max(2)),
        _ => 2,
    }
}

fn assign_ipv6(
    nodes: &[NodeSpec],
    order: &[usize],
    planned: &mut [PlannedNode],
) -> Result<(), TopologyError> {
    let too_many = TopologyError::TooMany {
        what: "ipv6 addresses on one segment",
        max: 250,
    };
    let mut next_reflector = 1u128;
    let mut next_public = 1u128;
    let mut next_on_lan: Vec<u128> = vec![2; nodes.len()];
    let mut k = 0u16;
    // `planned` is the internet node followed by `nodes` in `order`.
    for (slot, &i) in order.iter().enumerate() {
        let node = &nodes[i];
        let count = uplink6_count(node);
        let (net, next) = match node.parent() {
            _ if matches!(node, NodeSpec::Reflector { .. }) => {
                (Some(REFLECTOR_NET6), &mut next_reflector)
            }
            None => (Some(PUBLIC_NET6), &mut next_public),
            Some(parent) => {
                let p = order
                    .iter()
                    .position(|&j| nodes[j].name() == parent)
                    .ok_or_else(|| TopologyError::UnknownParent {
                        node: node.name().to_string(),
                        parent: parent.to_string(),
                    })?;
                let parent_lan = planned[p + 1].lan6;
                planned[slot + 1].gateway6 = parent_lan.map(|l| l.addr);
                (
                    parent_lan.map(|l| Ipv6Net::new(l.network(), l.len)),
                    &mut next_on_lan[order[p]],
                )
            }
        };
        if let Some(net) = net {
            let mut addrs = Vec::new();
            for _ in 0..count {
                // Below ::fe, which is the internet node's on the internet segments.
                let addr = net
                    .host(*next)
                    .filter(|_| *next < 0xfe)
                    .ok_or(too_many.clone())?;
                addrs.push(Ipv6Net::new(addr, net.len));
                *next += 1;
            }
            planned[slot + 1].uplink6 = addrs;
        }
        if let NodeSpec::Nat { router, .. } = node {
            k += 1;
            // Without IPv6 upstream a router cannot offer it downstream.
            if !planned[slot + 1].uplink6.is_empty() {
                let (lan6, routed6) = lan6_of(router, k);
                planned[slot + 1].lan6 = lan6;
                planned[slot + 1].routed6 = routed6;
            }
        }
    }
    Ok(())
}

/// Whether a router passes other routers' global prefixes through unchanged: an engine in
/// `firewall` mode (translators rewrite them; the kernel router keeps no delegated routes).
fn routes_through(node: &PlannedNode) -> bool {
    matches!(&node.router, Some(RouterKind::Engine(cfg)) if cfg.ipv6 == Ipv6Mode::Firewall)
        && node.lan6.is_some()
}

/// Static routes for every routed prefix (docs/lab.md, "IPv6"): the internet node (whose routes
/// every internet-segment node copies) reaches a prefix via the top-level router in front of it,
/// and each firewall router on the way down via the next router. A prefix behind a translating
/// or kernel router further up is not routed (it is unreachable from the internet, as in life).
fn route_ipv6(planned: &mut [PlannedNode]) {
    let index = |name: &str, planned: &[PlannedNode]| planned.iter().position(|n| n.name == name);
    for i in 0..planned.len() {
        let Some(prefix) = planned[i].routed6 else {
            continue;
        };
        // Walk up from the owner: (router, its first WAN address) pairs, owner first.
        let mut chain = vec![i];
        let mut at = i;
        while let Some(up) = planned[at].upstream.as_deref() {
            if up == INTERNET {
                break;
            }
            let Some(p) = index(up, planned) else { break };
            chain.push(p);
            at = p;
        }
        if planned[at].upstream.as_deref() != Some(INTERNET) {
            continue;
        }
        // Every router above the owner must pass the prefix through.
        if !chain[1..].iter().all(|&r| routes_through(&planned[r])) {
            continue;
        }
        for pair in chain.windows(2) {
            let (below, above) = (pair[0], pair[1]);
            if let Some(via) = planned[below].uplink6.first().map(|a| a.addr) {
                planned[above].routes6.push((prefix, via));
            }
        }
        if let (Some(via), Some(inet)) = (
            planned[at].uplink6.first().map(|a| a.addr),
            index(INTERNET, planned),
        ) {
            planned[inet].routes6.push((prefix, via));
        }
    }
}

#[cfg(test)]
mod tests {
    use natscope_core::nat::{FilteringBehavior, MappingBehavior, NatBehavior};

    use super::*;

    fn engine() -> RouterKind {
        RouterKind::Engine(EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::AddressAndPortDependent,
        )))
    }

    fn firewall() -> RouterKind {
        let mut cfg = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::AddressAndPortDependent,
        ));
        cfg.translate = false;
        RouterKind::Engine(cfg)
    }

    fn refl(name: &str) -> NodeSpec {
        NodeSpec::Reflector { name: name.into() }
    }

    fn nat(name: &str, parent: Option<&str>, lan: Option<&str>, router: RouterKind) -> NodeSpec {
        NodeSpec::Nat {
            name: name.into(),
            parent: parent.map(Into::into),
            lan: lan.map(|l| l.parse().expect("test subnet")),
            router,
            port_mapping: Vec::new(),
        }
    }

    fn host(name: &str, parent: Option<&str>) -> NodeSpec {
        NodeSpec::Host {
            name: name.into(),
            parent: parent.map(Into::into),
        }
    }

    fn topo(nodes: Vec<NodeSpec>) -> Topology {
        Topology {
            preset: None,
            nodes,
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test subnet")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn node<'a>(plan: &'a Plan, name: &str) -> &'a PlannedNode {
        plan.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("node in plan")
    }

    #[test]
    fn cgnat_address_plan_is_exact() {
        let mut two = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::EndpointIndependent,
        ));
        two.external_addresses = 2;
        let t = topo(vec![
            refl("stun"),
            refl("stun2"),
            nat("carrier", None, None, RouterKind::Engine(two)),
            nat("nat", Some("carrier"), None, engine()),
            host("h1", Some("nat")),
            host("h2", Some("nat")),
            host("c1", Some("carrier")),
            host("pub", None),
        ]);
        let plan = t.plan().expect("valid");
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            ["internet", "stun", "stun2", "carrier", "nat", "h1", "h2", "c1", "pub"]
        );

        let inet = &plan.nodes[0];
        assert_eq!(inet.role, Role::Internet);
        assert_eq!(inet.upstream, None);
        assert_eq!(
            inet.uplink,
            [net("198.51.100.254/24"), net("203.0.113.254/24")]
        );
        assert_eq!((inet.gateway, inet.lan, &inet.router), (None, None, &None));

        let stun = node(&plan, "stun");
        assert_eq!(stun.role, Role::Reflector);
        assert_eq!(
            stun.uplink,
            [net("198.51.100.1/24"), net("198.51.100.2/24")]
        );
        assert_eq!(stun.upstream.as_deref(), Some(INTERNET));
        assert_eq!(stun.gateway, None);
        let stun2 = node(&plan, "stun2");
        assert_eq!(
            stun2.uplink,
            [net("198.51.100.3/24"), net("198.51.100.4/24")]
        );

        let carrier = node(&plan, "carrier");
        assert_eq!(carrier.role, Role::Nat);
        assert_eq!(
            carrier.uplink,
            [net("203.0.113.1/24"), net("203.0.113.2/24")]
        );
        assert_eq!(carrier.gateway, None);
        assert_eq!(carrier.upstream.as_deref(), Some(INTERNET));
        assert_eq!(carrier.lan, Some(net("100.64.0.1/24")));
        assert!(carrier.router.is_some());

        let home = node(&plan, "nat");
        assert_eq!(home.uplink, [net("100.64.0.2/24")]);
        assert_eq!(home.gateway, Some(ip("100.64.0.1")));
        assert_eq!(home.upstream.as_deref(), Some("carrier"));
        assert_eq!(home.lan, Some(net("10.1.0.1/24")));

        let h1 = node(&plan, "h1");
        assert_eq!(h1.role, Role::Host);
        assert_eq!(h1.uplink, [net("10.1.0.2/24")]);
        assert_eq!(h1.gateway, Some(ip("10.1.0.1")));
        assert_eq!(h1.upstream.as_deref(), Some("nat"));
        assert_eq!((h1.lan, &h1.router), (None, &None));
        assert_eq!(node(&plan, "h2").uplink, [net("10.1.0.3/24")]);
        assert_eq!(node(&plan, "c1").uplink, [net("100.64.0.3/24")]);

        let public = node(&plan, "pub");
        assert_eq!(public.uplink, [net("203.0.113.3/24")]);
        assert_eq!(public.gateway, None);
    }

    fn net6(s: &str) -> Ipv6Net {
        s.parse().expect("test prefix")
    }

    #[test]
    fn ipv6_address_plan_is_exact() {
        let mut nat66 = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::EndpointIndependent,
        ));
        nat66.ipv6 = Ipv6Mode::Nat66;
        let mut v4only = nat66.clone();
        v4only.ipv6 = Ipv6Mode::None;
        let t = topo(vec![
            refl("stun"),
            nat("home", None, None, engine()),
            host("h1", Some("home")),
            nat("nat66", None, None, RouterKind::Engine(nat66)),
            host("h2", Some("nat66")),
            nat("v4", None, None, RouterKind::Engine(v4only)),
            host("h3", Some("v4")),
            nat("kernel", None, None, RouterKind::Linux),
            host("pub", None),
        ]);
        let plan = t.plan().expect("valid");
        assert_eq!(
            node(&plan, "internet").uplink6,
            [net6("2001:db8:0:1::fe/64"), net6("2001:db8:0:2::fe/64")]
        );
        let stun = node(&plan, "stun");
        assert_eq!(
            stun.uplink6,
            [net6("2001:db8:0:1::1/64"), net6("2001:db8:0:1::2/64")]
        );
        assert_eq!((stun.gateway6, stun.lan6, stun.routed6), (None, None, None));

        // A firewall-mode router: its lan is subnet 0 of its routed /48.
        let home = node(&plan, "home");
        assert_eq!(
            home.uplink6,
            [net6("2001:db8:0:2::1/64"), net6("2001:db8:0:2::2/64")]
        );
        assert_eq!(home.lan6, Some(net6("2001:db8:101::1/64")));
        assert_eq!(home.routed6, Some(net6("2001:db8:101::/48")));
        let h1 = node(&plan, "h1");
        assert_eq!(
            h1.uplink6,
            [net6("2001:db8:101::2/64"), net6("2001:db8:101::3/64")]
        );
        assert_eq!(h1.gateway6, Some("2001:db8:101::1".parse().expect("ip")));

        // A translator's lan is unique local space.
        let n66 = node(&plan, "nat66");
        assert_eq!(n66.lan6, Some(net6("fd00:2::1/64")));
        assert_eq!(n66.routed6, Some(net6("2001:db8:102::/48")));
        assert_eq!(node(&plan, "h2").uplink6[0], net6("fd00:2::2/64"));

        // No IPv6 behind `ipv6 = "none"`.
        let v4 = node(&plan, "v4");
        assert_eq!((v4.lan6, v4.routed6), (None, None));
        assert_eq!(v4.uplink6.len(), 2);
        let h3 = node(&plan, "h3");
        assert!(h3.uplink6.is_empty() && h3.gateway6.is_none());
        // The kernel router is an IPv6 firewall with a global lan.
        assert_eq!(node(&plan, "kernel").lan6, Some(net6("2001:db8:104::1/64")));
        assert_eq!(node(&plan, "pub").uplink6[0], net6("2001:db8:0:2::9/64"));
        // Every top-level router's prefix is routed from the internet, via the router.
        let inet = node(&plan, "internet");
        assert!(inet.routes6.contains(&(
            net6("2001:db8:101::/48"),
            "2001:db8:0:2::1".parse().expect("ip")
        )));
        assert_eq!(
            inet.routes6.len(),
            3,
            "home, nat66 and kernel: {:?}",
            inet.routes6
        );
    }

    /// A router behind a firewall-mode carrier gets its prefix routed down the chain; behind a
    /// translating carrier it does not.
    #[test]
    fn nested_prefixes_are_routed_through_firewall_routers_only() {
        let t = topo(vec![
            nat("carrier", None, None, engine()),
            nat("home", Some("carrier"), None, engine()),
            host("h1", Some("home")),
        ]);
        let plan = t.plan().expect("valid");
        let home = node(&plan, "home");
        assert_eq!(home.routed6, Some(net6("2001:db8:102::/48")));
        let home_wan: Ipv6Addr = home.uplink6[0].addr;
        assert_eq!(home_wan, "2001:db8:101::2".parse::<Ipv6Addr>().expect("ip"));
        assert_eq!(
            node(&plan, "carrier").routes6,
            [(net6("2001:db8:102::/48"), home_wan)]
        );
        let carrier_wan = node(&plan, "carrier").uplink6[0].addr;
        assert!(node(&plan, "internet")
            .routes6
            .contains(&(net6("2001:db8:102::/48"), carrier_wan)));

        let mut nat66 = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::EndpointIndependent,
        ));
        nat66.ipv6 = Ipv6Mode::Nat66;
        let t = topo(vec![
            nat("carrier", None, None, RouterKind::Engine(nat66)),
            nat("home", Some("carrier"), None, engine()),
        ]);
        let plan = t.plan().expect("valid");
        assert!(node(&plan, "carrier").routes6.is_empty());
        assert_eq!(
            node(&plan, "internet").routes6.len(),
            1,
            "only the carrier's own"
        );
    }

    #[test]
    fn parents_come_first_and_order_is_stable_otherwise() {
        let t = topo(vec![
            host("h1", Some("nat")),
            host("h0", None),
            nat("nat", Some("carrier"), None, engine()),
            refl("stun"),
            nat("carrier", None, None, engine()),
        ]);
        let plan = t.plan().expect("valid");
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["internet", "h0", "stun", "carrier", "nat", "h1"]);
        // Addresses follow plan order: h0 takes .1 before carrier.
        assert_eq!(node(&plan, "h0").uplink, [net("203.0.113.1/24")]);
        assert_eq!(node(&plan, "carrier").uplink, [net("203.0.113.2/24")]);
    }

    #[test]
    fn plan_is_deterministic() {
        let t = topo(vec![
            refl("stun"),
            nat("a", None, None, engine()),
            nat("b", None, Some("10.1.0.0/24"), engine()),
            host("x", Some("a")),
            host("y", Some("b")),
        ]);
        let first = t.plan().expect("valid");
        for _ in 0..5 {
            assert_eq!(t.plan().expect("valid"), first);
        }
        // The automatic lan skips the explicit 10.1.0.0/24.
        assert_eq!(node(&first, "a").lan, Some(net("10.2.0.1/24")));
        assert_eq!(node(&first, "b").lan, Some(net("10.1.0.1/24")));
    }

    #[test]
    fn firewall_lans_are_public() {
        let t = topo(vec![
            nat("fw", None, None, firewall()),
            nat("fw2", None, None, firewall()),
            host("h1", Some("fw")),
            nat("inner", Some("fw"), None, engine()),
            host("h2", Some("inner")),
        ]);
        let plan = t.plan().expect("valid");
        assert_eq!(node(&plan, "fw").lan, Some(net("203.0.113.129/26")));
        assert_eq!(node(&plan, "fw2").lan, Some(net("203.0.113.193/26")));
        assert_eq!(node(&plan, "h1").uplink, [net("203.0.113.130/26")]);
        assert_eq!(node(&plan, "h1").gateway, Some(ip("203.0.113.129")));
        // A nat behind a firewall is allowed; it gets a home lan.
        assert_eq!(node(&plan, "inner").uplink, [net("203.0.113.131/26")]);
        assert_eq!(node(&plan, "inner").lan, Some(net("10.1.0.1/24")));

        let third = topo(vec![
            nat("fw", None, None, firewall()),
            nat("fw2", None, None, firewall()),
            nat("fw3", None, None, firewall()),
        ]);
        assert!(matches!(
            third.plan(),
            Err(TopologyError::TooMany { max: 2, .. })
        ));
        let explicit = topo(vec![nat("fw", None, Some("203.0.113.160/27"), firewall())]);
        assert_eq!(
            node(&explicit.plan().expect("valid"), "fw").lan,
            Some(net("203.0.113.161/27"))
        );
    }

    #[test]
    fn bad_names() {
        for bad in ["", "thirteen-char", "-x", "internet", "Upper", "a_b", "é"] {
            let t = topo(vec![host(bad, None)]);
            assert_eq!(
                t.plan(),
                Err(TopologyError::BadName(bad.to_string())),
                "{bad:?}"
            );
        }
        assert!(topo(vec![host("twelve-chars", None), host("a-0", None)])
            .plan()
            .is_ok());
    }

    #[test]
    fn duplicate_names() {
        let t = topo(vec![refl("x"), host("x", None)]);
        assert_eq!(t.plan(), Err(TopologyError::DuplicateName("x".into())));
    }

    #[test]
    fn unknown_parent_and_parent_that_is_not_a_nat() {
        let t = topo(vec![host("h1", Some("nope"))]);
        assert_eq!(
            t.plan(),
            Err(TopologyError::UnknownParent {
                node: "h1".into(),
                parent: "nope".into()
            })
        );
        let t = topo(vec![host("h0", None), host("h1", Some("h0"))]);
        assert!(matches!(t.plan(), Err(TopologyError::UnknownParent { .. })));
    }

    #[test]
    fn cycles() {
        let t = topo(vec![
            nat("a", Some("b"), None, engine()),
            nat("b", Some("a"), None, engine()),
        ]);
        assert!(matches!(t.plan(), Err(TopologyError::Cycle(_))));
        let t = topo(vec![nat("a", Some("a"), None, engine())]);
        assert_eq!(t.plan(), Err(TopologyError::Cycle("a".into())));
    }

    #[test]
    fn bad_nat_settings() {
        let with = |f: &dyn Fn(&mut EngineConfig)| {
            let mut cfg = EngineConfig::new(NatBehavior::new(
                MappingBehavior::EndpointIndependent,
                FilteringBehavior::EndpointIndependent,
            ));
            f(&mut cfg);
            topo(vec![nat("n", None, None, RouterKind::Engine(cfg))]).plan()
        };
        let is_bad =
            |r: Result<Plan, TopologyError>| matches!(r, Err(TopologyError::BadNat { .. }));
        assert!(is_bad(with(&|c| c.external_addresses = 0)));
        assert!(is_bad(with(&|c| c.loss = 1.5)));
        assert!(is_bad(with(&|c| c.loss = -0.1)));
        assert!(is_bad(with(&|c| c.loss = f64::NAN)));
        assert!(is_bad(with(&|c| c.delay = Duration::from_secs(11))));
        assert!(is_bad(with(&|c| c.behavior.port_range = (2000, 1000))));
        assert!(is_bad(with(&|c| c.behavior.port_range = (0, 1000))));
        assert!(is_bad(with(
            &|c| c.behavior.allocation = PortAllocation::Sequential { step: 0 }
        )));
        assert!(is_bad(with(&|c| c.behavior.udp_timeout = Duration::ZERO)));
        assert!(with(&|c| c.loss = 1.0).is_ok());

        // A firewall must sit on the internet.
        let t = topo(vec![
            nat("c", None, None, engine()),
            nat("fw", Some("c"), None, firewall()),
        ]);
        assert!(is_bad(t.plan()));
    }

    #[test]
    fn bad_subnets() {
        let bad = |lan: &str, router: RouterKind| {
            let r = topo(vec![nat("n", None, Some(lan), router)]).plan();
            assert!(
                matches!(r, Err(TopologyError::BadSubnet { .. })),
                "{lan}: {r:?}"
            );
        };
        bad("10.1.0.0/31", engine());
        bad("10.0.0.0/7", engine());
        bad("10.1.0.5/24", engine());
        bad("127.0.0.0/24", engine());
        bad("224.1.0.0/24", engine());
        bad("10.1.0.0/24", firewall());
        bad("203.0.113.0/26", firewall());
        bad("203.0.113.0/24", firewall());
        assert!(topo(vec![nat("n", None, Some("10.1.0.0/30"), engine())])
            .plan()
            .is_ok());
    }

    #[test]
    fn overlaps() {
        let t = topo(vec![
            nat("a", None, Some("10.0.0.0/16"), engine()),
            nat("b", None, Some("10.0.5.0/24"), engine()),
        ]);
        assert_eq!(
            t.plan(),
            Err(TopologyError::Overlap {
                a_node: "b".into(),
                a: net("10.0.5.0/24"),
                b_node: "a".into(),
                b: net("10.0.0.0/16"),
            })
        );
        for internet in ["198.51.100.0/25", "203.0.113.128/26", "203.0.0.0/16"] {
            let t = topo(vec![nat("a", None, Some(internet), engine())]);
            assert!(
                matches!(t.plan(), Err(TopologyError::Overlap { ref b_node, .. }) if b_node == INTERNET),
                "{internet}"
            );
        }
        // Adjacent subnets do not overlap.
        let t = topo(vec![
            nat("a", None, Some("10.0.0.0/24"), engine()),
            nat("b", None, Some("10.0.1.0/24"), engine()),
        ]);
        assert!(t.plan().is_ok());
    }

    #[test]
    fn limits() {
        let many: Vec<NodeSpec> = (0..=MAX_NODES)
            .map(|i| host(&format!("h{i}"), None))
            .collect();
        assert_eq!(
            topo(many).plan(),
            Err(TopologyError::TooMany {
                what: "nodes",
                max: MAX_NODES
            })
        );
        let reflectors: Vec<NodeSpec> = (0..=MAX_REFLECTORS)
            .map(|i| refl(&format!("r{i}")))
            .collect();
        assert!(matches!(
            topo(reflectors).plan(),
            Err(TopologyError::TooMany {
                what: "reflectors",
                ..
            })
        ));
        let mut big = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::EndpointIndependent,
        ));
        big.external_addresses = 100;
        let t = topo(vec![
            nat("a", None, None, RouterKind::Engine(big.clone())),
            nat("b", None, None, RouterKind::Engine(big)),
        ]);
        assert!(matches!(t.plan(), Err(TopologyError::TooMany { .. })));
        // A /30 lan has room for exactly one address besides the router.
        let t = topo(vec![
            nat("n", None, Some("10.9.0.0/30"), engine()),
            host("h1", Some("n")),
        ]);
        assert_eq!(
            node(&t.plan().expect("fits"), "h1").uplink,
            [net("10.9.0.2/30")]
        );
        let t = topo(vec![
            nat("n", None, Some("10.9.0.0/30"), engine()),
            host("h1", Some("n")),
            host("h2", Some("n")),
        ]);
        assert_eq!(
            t.plan(),
            Err(TopologyError::TooMany {
                what: "addresses on one nat's lan",
                max: 1
            })
        );
    }
}
