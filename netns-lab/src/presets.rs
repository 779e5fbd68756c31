//! Named labs for the common NAT types, so `natscope lab up <preset>` needs no topology file, and
//! the truth each one should produce in a NAT probe ([`expected`]), so `lab matrix` can check the
//! probe against a known answer. One table, [`PRESETS`], holds each preset's name, summary,
//! layout, truth and grid role; the name list, the router behaviors a topology file may name, the
//! topologies, the truth and `lab grid`'s default set are all read from it (and a test checks
//! docs/lab.md's tables against it).
//!
//! Every preset has one reflector `stun`, a router `nat` directly in front of the hosts, and two
//! hosts `h1` and `h2` on its LAN (`open`: `h1` and `h2` on the internet, no router). Settings not
//! named below keep RFC 4787's recommendations ([`NatBehavior::new`]): port preservation, port
//! range 1024-65535, no parity, UDP timeout 120 s (REQ-5), TCP 7440 s, outbound refresh only,
//! paired pooling, one external address, no loss or delay, seed 1. Only `full-cone` hairpins.

use natscope_core::nat::{FilteringBehavior, MappingBehavior, NatBehavior, PortAllocation};
use natscope_core::probe::{AllocationPattern, Classic, Translation};
use serde::{Deserialize, Serialize};

use crate::topology::{EngineConfig, Ipv4Net, Ipv6Mode, NodeSpec, RouterKind, Topology};
use natscope_core::portmap::PortMappingService as S;

use FilteringBehavior as F;
use MappingBehavior as M;

/// How a preset's routers are laid out.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// No NAT at all: `h1` and `h2` have public addresses.
    NoNat,
    /// One router `nat` in front of the hosts; its settings are also what `behavior = "<name>"`
    /// means in a topology file.
    Router(fn() -> RouterKind),
    /// A `carrier` router on the internet and a `nat` router behind it; `carrier_lan` pins the
    /// carrier's LAN (default: the planner's 100.64/10 shared space, RFC 6598).
    Nested {
        carrier: fn() -> EngineConfig,
        nat: fn() -> EngineConfig,
        carrier_lan: Option<Ipv4Net>,
    },
}

/// One preset: its name, what it is, how it is built, the truth a probe in it should see, and
/// where it takes part. Every preset is a row of `lab matrix`; `grid` marks the ones in `lab
/// grid`'s default set.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    pub name: &'static str,
    /// One line for `lab up --list` and docs/lab.md.
    pub summary: &'static str,
    pub layout: Layout,
    /// What a NAT probe from `h1` against `stun` should report ([`expected`]).
    pub truth: Expected,
    /// In `lab grid`'s default set (issue 5 must-show 2).
    pub grid: bool,
}

/// Name and summary of a preset, as `lab up --list` shows them.
pub type PresetInfo = Preset;

const EIM: Option<MappingBehavior> = Some(M::EndpointIndependent);
const APDM: Option<MappingBehavior> = Some(M::AddressAndPortDependent);

const fn truth(
    mapping: Option<MappingBehavior>,
    filtering: Option<FilteringBehavior>,
    port_preservation: bool,
    allocation: AllocationPattern,
    hairpinning: bool,
    classic: Classic,
) -> Expected {
    Expected {
        mapping,
        filtering,
        port_preservation,
        allocation,
        hairpinning,
        classic,
        port_mapping: None,
        ipv6: Ipv6Truth::NotCompared,
    }
}

impl Expected {
    /// This truth with the port-mapping verdicts a probe should reach through the preset's
    /// mapping router (the services themselves are the router's `port_mapping`).
    const fn mapped(mut self, double_nat: bool, cgnat: Option<bool>) -> Self {
        self.port_mapping = Some(PortMappingTruth { double_nat, cgnat });
        self
    }

    /// This truth with what a probe over IPv6 should see.
    const fn v6(mut self, ipv6: Ipv6Truth) -> Self {
        self.ipv6 = ipv6;
        self
    }
}

/// The RFC 6092 firewall without translation, endpoint-independent filtering (REC-11).
const V6_EIF: Ipv6Truth = Ipv6Truth::Present {
    mapping: M::EndpointIndependent,
    filtering: F::EndpointIndependent,
    translation: Translation::None,
};

/// Every preset, in listing order: the one table the names, the topologies, `behavior = ...`,
/// the matrix's truth and the grid's default set come from.
///
/// `linux`: nftables masquerade is conntrack-based: a socket whose source port is free keeps it
/// and reuses one mapping for every destination (endpoint-independent in effect), and inbound
/// packets are only admitted when they match a conntrack entry, i.e. the exact remote address
/// and port (address-and-port-dependent filtering); no hairpinning without extra rules. So a
/// port-restricted cone. `cgnat`: the composition of EIM+EIF carrier and EIM+APDF home NAT, both
/// preserving ports: EIM + APDF, port preserved, port-restricted cone.
pub const PRESETS: &[Preset] = {
    use AllocationPattern as A;
    &[
        Preset {
            name: "open",
            summary: "no nat: h1 and h2 on the internet",
            layout: Layout::NoNat,
            truth: truth(
                None,
                Some(F::EndpointIndependent),
                true,
                A::Preserving,
                false,
                Classic::OpenInternet,
            )
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "full-cone",
            summary: "endpoint-independent mapping and filtering, hairpinning",
            layout: Layout::Router(|| RouterKind::Engine(full_cone())),
            truth: truth(
                EIM,
                Some(F::EndpointIndependent),
                true,
                A::Preserving,
                true,
                Classic::FullCone,
            )
            .v6(V6_EIF),
            grid: true,
        },
        Preset {
            name: "restricted-cone",
            summary: "endpoint-independent mapping, address-dependent filtering",
            layout: Layout::Router(|| RouterKind::Engine(restricted_cone())),
            truth: truth(
                EIM,
                Some(F::AddressDependent),
                true,
                A::Preserving,
                false,
                Classic::RestrictedCone,
            )
            .v6(V6_EIF),
            grid: true,
        },
        Preset {
            name: "port-restricted-cone",
            summary: "endpoint-independent mapping, address-and-port-dependent filtering",
            layout: Layout::Router(|| RouterKind::Engine(port_restricted_cone())),
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .v6(V6_EIF),
            grid: true,
        },
        Preset {
            name: "symmetric",
            summary: "address-and-port-dependent mapping and filtering, random ports",
            layout: Layout::Router(|| RouterKind::Engine(symmetric())),
            truth: truth(
                APDM,
                Some(F::AddressAndPortDependent),
                false,
                A::Random,
                false,
                Classic::Symmetric,
            )
            .v6(V6_EIF),
            grid: true,
        },
        Preset {
            name: "symmetric-sequential",
            summary: "address-and-port-dependent mapping and filtering, sequential ports (step 1)",
            layout: Layout::Router(|| RouterKind::Engine(symmetric_sequential())),
            truth: truth(
                APDM,
                Some(F::AddressAndPortDependent),
                false,
                A::Sequential,
                false,
                Classic::Symmetric,
            )
            .v6(V6_EIF),
            grid: true,
        },
        Preset {
            name: "address-dependent",
            summary: "address-dependent mapping and filtering",
            layout: Layout::Router(|| RouterKind::Engine(address_dependent())),
            truth: truth(
                Some(M::AddressDependent),
                Some(F::AddressDependent),
                true,
                A::Preserving,
                false,
                Classic::Symmetric,
            )
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "cgnat",
            summary: "full-cone carrier nat in front of a port-restricted-cone home nat",
            layout: Layout::Nested {
                carrier,
                nat: port_restricted_cone,
                carrier_lan: None,
            },
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .v6(V6_EIF),
            grid: true,
        },
        Preset {
            name: "firewall",
            summary: "no translation: hosts with public addresses behind an \
                      address-and-port-dependent stateful firewall",
            layout: Layout::Router(|| RouterKind::Engine(firewall())),
            truth: truth(
                None,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::SymmetricUdpFirewall,
            )
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "blocked",
            summary: "a nat that drops all udp",
            layout: Layout::Router(|| RouterKind::Engine(blocked())),
            truth: truth(None, None, false, A::Unknown, false, Classic::UdpBlocked)
                .v6(Ipv6Truth::NoPath),
            grid: false,
        },
        Preset {
            name: "linux",
            summary: "the kernel's nftables masquerade (a stock linux router)",
            layout: Layout::Router(|| RouterKind::Linux),
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .v6(Ipv6Truth::Present {
                mapping: M::EndpointIndependent,
                filtering: F::AddressAndPortDependent,
                translation: Translation::None,
            }),
            grid: false,
        },
        Preset {
            name: "full-cone+nat-pmp",
            summary: "full-cone that serves nat-pmp on its lan address",
            layout: Layout::Router(|| RouterKind::Engine(mapping(full_cone(), &[S::NatPmp]))),
            truth: truth(
                EIM,
                Some(F::EndpointIndependent),
                true,
                A::Preserving,
                true,
                Classic::FullCone,
            )
            .mapped(false, Some(false))
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "port-restricted-cone+upnp",
            summary: "port-restricted-cone that serves upnp igd on its lan address",
            layout: Layout::Router(|| {
                RouterKind::Engine(mapping(port_restricted_cone(), &[S::Upnp]))
            }),
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .mapped(false, Some(false))
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "symmetric+pcp",
            summary: "symmetric that serves pcp on its lan address",
            layout: Layout::Router(|| RouterKind::Engine(mapping(symmetric(), &[S::Pcp]))),
            truth: truth(
                APDM,
                Some(F::AddressAndPortDependent),
                false,
                A::Random,
                false,
                Classic::Symmetric,
            )
            .mapped(false, Some(false))
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "symmetric+upnp",
            summary: "symmetric that serves upnp igd on its lan address",
            layout: Layout::Router(|| RouterKind::Engine(mapping(symmetric(), &[S::Upnp]))),
            truth: truth(
                APDM,
                Some(F::AddressAndPortDependent),
                false,
                A::Random,
                false,
                Classic::Symmetric,
            )
            .mapped(false, Some(false))
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "double-nat+all",
            summary: "a private home nat (192.168.1.0/24 lan, no port mapping) in front of a \
                      port-restricted-cone nat serving nat-pmp, pcp and upnp",
            layout: Layout::Nested {
                carrier: port_restricted_cone,
                nat: all_services,
                carrier_lan: Some(DOUBLE_NAT_LAN),
            },
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .mapped(true, None)
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "cgnat+all",
            summary: "cgnat whose home nat serves nat-pmp, pcp and upnp (the carrier maps nothing)",
            layout: Layout::Nested {
                carrier,
                nat: all_services,
                carrier_lan: None,
            },
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .mapped(true, Some(true))
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "dual-stack",
            summary: "ipv4 port-restricted cone; ipv6 global addresses behind an \
                      endpoint-independent rfc 6092 firewall (the default home)",
            layout: Layout::Router(|| RouterKind::Engine(dual_stack())),
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .v6(V6_EIF),
            grid: false,
        },
        Preset {
            name: "dual-stack-strict",
            summary: "ipv4 port-restricted cone; ipv6 behind an address-and-port-dependent \
                      firewall",
            layout: Layout::Router(|| RouterKind::Engine(dual_stack_strict())),
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .v6(Ipv6Truth::Present {
                mapping: M::EndpointIndependent,
                filtering: F::AddressAndPortDependent,
                translation: Translation::None,
            }),
            grid: false,
        },
        Preset {
            name: "nptv6",
            summary: "ipv4 port-restricted cone; ipv6 ula lan behind rfc 6296 prefix \
                      translation and an endpoint-independent firewall",
            layout: Layout::Router(|| RouterKind::Engine(nptv6())),
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .v6(Ipv6Truth::Present {
                mapping: M::EndpointIndependent,
                filtering: F::EndpointIndependent,
                translation: Translation::Nptv6,
            }),
            grid: false,
        },
        Preset {
            name: "nat66",
            summary: "symmetric nat on both families: ipv4 napt and ipv6 nat66 \
                      (address-and-port-dependent mapping and filtering, random ports)",
            layout: Layout::Router(|| RouterKind::Engine(nat66())),
            truth: truth(
                APDM,
                Some(F::AddressAndPortDependent),
                false,
                A::Random,
                false,
                Classic::Symmetric,
            )
            .v6(Ipv6Truth::Present {
                mapping: M::AddressAndPortDependent,
                filtering: F::AddressAndPortDependent,
                translation: Translation::Nat66,
            }),
            grid: false,
        },
        Preset {
            name: "ipv4-only",
            summary: "ipv4 port-restricted cone; no ipv6 on the lan",
            layout: Layout::Router(|| RouterKind::Engine(ipv4_only())),
            truth: truth(
                EIM,
                Some(F::AddressAndPortDependent),
                true,
                A::Preserving,
                false,
                Classic::PortRestrictedCone,
            )
            .v6(Ipv6Truth::NoPath),
            grid: false,
        },
    ]
};

/// The preset named `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The preset names, in listing order.
pub fn names() -> &'static [&'static str] {
    const NAMES: [&str; PRESETS.len()] = {
        let mut names = [""; PRESETS.len()];
        let mut i = 0;
        while i < PRESETS.len() {
            names[i] = PRESETS[i].name;
            i += 1;
        }
        names
    };
    &NAMES
}

/// The presets of `lab grid`'s default set, in listing order.
pub const GRID_PRESETS: &[&str] = {
    const N: usize = {
        let (mut n, mut i) = (0, 0);
        while i < PRESETS.len() {
            n += PRESETS[i].grid as usize;
            i += 1;
        }
        n
    };
    const GRID: [&str; N] = {
        let mut grid = [""; N];
        let (mut n, mut i) = (0, 0);
        while i < PRESETS.len() {
            if PRESETS[i].grid {
                grid[n] = PRESETS[i].name;
                n += 1;
            }
            i += 1;
        }
        grid
    };
    &GRID
};

/// Name and summary of every preset.
pub fn infos() -> &'static [PresetInfo] {
    PRESETS
}

fn engine(mapping: M, filtering: F) -> EngineConfig {
    EngineConfig::new(NatBehavior::new(mapping, filtering))
}

/// `full-cone`: EIM + EIF, port preservation, hairpinning on (the one preset that hairpins, so
/// the hairpinning test has a positive case).
fn full_cone() -> EngineConfig {
    let mut cfg = engine(M::EndpointIndependent, F::EndpointIndependent);
    cfg.behavior.hairpinning = true;
    cfg
}

/// `restricted-cone`: EIM + ADF, port preservation.
fn restricted_cone() -> EngineConfig {
    engine(M::EndpointIndependent, F::AddressDependent)
}

/// `port-restricted-cone`: EIM + APDF, port preservation.
fn port_restricted_cone() -> EngineConfig {
    engine(M::EndpointIndependent, F::AddressAndPortDependent)
}

/// `symmetric`: APDM + APDF, random port allocation.
fn symmetric() -> EngineConfig {
    let mut cfg = engine(M::AddressAndPortDependent, F::AddressAndPortDependent);
    cfg.behavior.allocation = PortAllocation::Random;
    cfg
}

/// `symmetric-sequential`: APDM + APDF, sequential allocation with step 1 (predictable ports).
fn symmetric_sequential() -> EngineConfig {
    let mut cfg = engine(M::AddressAndPortDependent, F::AddressAndPortDependent);
    cfg.behavior.allocation = PortAllocation::Sequential { step: 1 };
    cfg
}

/// `address-dependent`: ADM + ADF, port preservation (the first mapping keeps the port).
fn address_dependent() -> EngineConfig {
    engine(M::AddressDependent, F::AddressDependent)
}

/// `config` serving the port-mapping `services` on its LAN address.
fn mapping(mut config: EngineConfig, services: &[S]) -> EngineConfig {
    config.port_mapping = services.to_vec();
    config
}

/// The inner router of `double-nat+all` and `cgnat+all`: port-restricted-cone serving all three.
fn all_services() -> EngineConfig {
    mapping(port_restricted_cone(), &[S::NatPmp, S::Pcp, S::Upnp])
}

/// The outer router's LAN in `double-nat+all`: RFC 1918 space, as an ISP's home gateway hands out,
/// so the inner router's external address (what its port-mapping services report) is private.
pub const DOUBLE_NAT_LAN: Ipv4Net = Ipv4Net {
    addr: std::net::Ipv4Addr::new(192, 168, 1, 0),
    len: 24,
};

/// `cgnat`'s carrier: EIM + EIF, port preservation.
fn carrier() -> EngineConfig {
    engine(M::EndpointIndependent, F::EndpointIndependent)
}

/// `firewall`: no translation (`translate = false`), APDF, hosts have public addresses.
fn firewall() -> EngineConfig {
    let mut cfg = engine(M::EndpointIndependent, F::AddressAndPortDependent);
    cfg.translate = false;
    cfg
}

/// `blocked`: drops every UDP packet (`block_udp = true`); EIM + APDF otherwise (TCP passes).
fn blocked() -> EngineConfig {
    let mut cfg = engine(M::EndpointIndependent, F::AddressAndPortDependent);
    cfg.block_udp = true;
    cfg
}

/// `dual-stack`: IPv4 EIM + APDF; IPv6 without translation behind the RFC 6092 firewall with
/// its recommended endpoint-independent filtering (REC-11) and timers (UDP 5 min, TCP 2 h 4 min).
/// Every other engine preset has the same IPv6 side; this name says so.
fn dual_stack() -> EngineConfig {
    let mut cfg = port_restricted_cone();
    cfg.ipv6 = Ipv6Mode::Firewall;
    cfg.ipv6_filtering = F::EndpointIndependent;
    cfg
}

/// `dual-stack-strict`: as `dual-stack`, with address-and-port-dependent IPv6 filtering (what
/// many ISP routers and patchbay's firewall do).
fn dual_stack_strict() -> EngineConfig {
    let mut cfg = dual_stack();
    cfg.ipv6_filtering = F::AddressAndPortDependent;
    cfg
}

/// `nptv6`: IPv4 EIM + APDF; the IPv6 LAN is unique local space, translated 1:1 to the routed
/// prefix (RFC 6296), behind an endpoint-independent firewall.
fn nptv6() -> EngineConfig {
    let mut cfg = dual_stack();
    cfg.ipv6 = Ipv6Mode::Nptv6;
    cfg
}

/// `nat66`: `symmetric` on both families: NAT66 applies the same RFC 4787 knobs to IPv6.
fn nat66() -> EngineConfig {
    let mut cfg = symmetric();
    cfg.ipv6 = Ipv6Mode::Nat66;
    cfg
}

/// `ipv4-only`: `port-restricted-cone` with no IPv6 on the LAN.
fn ipv4_only() -> EngineConfig {
    let mut cfg = port_restricted_cone();
    cfg.ipv6 = Ipv6Mode::None;
    cfg
}

/// The router settings of the `nat` node of preset `name` (`linux`: the kernel's masquerade).
/// Also the meaning of `behavior = "<name>"` in a topology file. `None` for `open`, `cgnat`
/// (two routers: use `port-restricted-cone` or `full-cone`) and unknown names.
pub fn router(name: &str) -> Option<RouterKind> {
    match find(name)?.layout {
        Layout::Router(router) => Some(router()),
        Layout::NoNat | Layout::Nested { .. } => None,
    }
}

/// Router behaviors accepted by [`router`], in listing order.
pub const ROUTER_BEHAVIORS: &[&str] = {
    const N: usize = {
        let (mut n, mut i) = (0, 0);
        while i < PRESETS.len() {
            n += matches!(PRESETS[i].layout, Layout::Router(_)) as usize;
            i += 1;
        }
        n
    };
    const ROUTERS: [&str; N] = {
        let mut routers = [""; N];
        let (mut n, mut i) = (0, 0);
        while i < PRESETS.len() {
            if matches!(PRESETS[i].layout, Layout::Router(_)) {
                routers[n] = PRESETS[i].name;
                n += 1;
            }
            i += 1;
        }
        routers
    };
    &ROUTERS
};

fn reflector() -> NodeSpec {
    NodeSpec::Reflector {
        name: "stun".to_string(),
    }
}

fn host(name: &str, parent: Option<&str>) -> NodeSpec {
    NodeSpec::Host {
        name: name.to_string(),
        parent: parent.map(str::to_string),
    }
}

fn nat(name: &str, parent: Option<&str>, router: RouterKind) -> NodeSpec {
    NodeSpec::Nat {
        name: name.to_string(),
        parent: parent.map(str::to_string),
        lan: None,
        router,
        port_mapping: Vec::new(),
    }
}

/// The topology of preset `name`, or `None` when there is no such preset.
///
/// | preset | router `nat` (RFC 4787) |
/// |---|---|
/// | `open` | none: `h1`, `h2` on the internet |
/// | `full-cone` | EIM + EIF, preserve ports, hairpinning |
/// | `restricted-cone` | EIM + ADF, preserve ports |
/// | `port-restricted-cone` | EIM + APDF, preserve ports |
/// | `symmetric` | APDM + APDF, random ports |
/// | `symmetric-sequential` | APDM + APDF, sequential ports, step 1 |
/// | `address-dependent` | ADM + ADF, preserve ports |
/// | `cgnat` | `carrier` EIM + EIF on the internet; `nat` EIM + APDF behind it |
/// | `firewall` | no translation, APDF; hosts have public addresses |
/// | `blocked` | drops all UDP; EIM + APDF otherwise |
/// | `linux` | nftables masquerade |
/// | `full-cone+nat-pmp` | `full-cone`, serving NAT-PMP |
/// | `port-restricted-cone+upnp` | `port-restricted-cone`, serving UPnP IGD |
/// | `symmetric+pcp` | `symmetric`, serving PCP |
/// | `symmetric+upnp` | `symmetric`, serving UPnP IGD |
/// | `double-nat+all` | `carrier` EIM + APDF with LAN 192.168.1.0/24; `nat` EIM + APDF serving all three |
/// | `cgnat+all` | `cgnat` whose `nat` serves NAT-PMP, PCP and UPnP IGD |
/// | `dual-stack` | EIM + APDF; IPv6 EIF firewall |
/// | `dual-stack-strict` | EIM + APDF; IPv6 APDF firewall |
/// | `nptv6` | EIM + APDF; IPv6 NPTv6 + EIF firewall |
/// | `nat66` | APDM + APDF, random ports, on both families |
/// | `ipv4-only` | EIM + APDF; no IPv6 on the LAN |
pub fn preset(name: &str) -> Option<Topology> {
    let nodes = match find(name)?.layout {
        Layout::NoNat => vec![reflector(), host("h1", None), host("h2", None)],
        Layout::Nested {
            carrier,
            nat: home,
            carrier_lan,
        } => vec![
            reflector(),
            NodeSpec::Nat {
                name: "carrier".to_string(),
                parent: None,
                lan: carrier_lan,
                router: RouterKind::Engine(carrier()),
                port_mapping: Vec::new(),
            },
            nat("nat", Some("carrier"), RouterKind::Engine(home())),
            host("h1", Some("nat")),
            host("h2", Some("nat")),
        ],
        Layout::Router(router) => vec![
            reflector(),
            nat("nat", None, router()),
            host("h1", Some("nat")),
            host("h2", Some("nat")),
        ],
    };
    Some(Topology {
        preset: Some(name.to_string()),
        nodes,
    })
}

/// How `natscope lab up` names a two-NAT lab: `pair:A,B`.
pub const PAIR_PREFIX: &str = "pair:";

/// The public host of a pair lab on which a P2P program's rendezvous (or relay, or lighthouse)
/// runs.
pub const RENDEZVOUS: &str = "rendezvous";

/// Why a `pair:A,B` source names no lab.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    #[error("`pair:{0}` needs two presets separated by a comma, e.g. pair:full-cone,symmetric")]
    Shape(String),
    #[error("unknown preset `{name}` in pair:{spec}; presets: {known}")]
    UnknownPreset {
        name: String,
        spec: String,
        known: String,
    },
}

/// The topology `lab up pair:A,B` builds: one cell of `lab grid` ([`crate::grid::pair_topology`]:
/// reflector `stun`, peer `a` behind preset A's routers, `b` behind B's), plus the public host
/// [`RENDEZVOUS`] when the cell has none, so one cell can be reproduced by hand. `spec` is what
/// follows `pair:`.
pub fn pair(spec: &str) -> Result<Topology, PairError> {
    let shape = || PairError::Shape(spec.to_string());
    let (a, b) = spec.split_once(',').ok_or_else(shape)?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() || b.is_empty() || b.contains(',') {
        return Err(shape());
    }
    for name in [a, b] {
        if find(name).is_none() {
            return Err(PairError::UnknownPreset {
                name: name.to_string(),
                spec: spec.to_string(),
                known: names().join(", "),
            });
        }
    }
    let mut topology = crate::grid::pair_topology(a, b).ok_or_else(shape)?;
    if !topology.nodes.iter().any(|n| n.name() == RENDEZVOUS) {
        topology.nodes.push(host(RENDEZVOUS, None));
    }
    topology.preset = Some(format!("{PAIR_PREFIX}{a},{b}"));
    Ok(topology)
}

/// What a NAT probe run from `h1` against `stun` should report for a preset: the ground truth
/// `lab matrix` compares the probe with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// End-to-end mapping behavior; `None` when nothing translates (`open`, `firewall`) or when
    /// nothing can be observed (`blocked`).
    pub mapping: Option<MappingBehavior>,
    /// End-to-end filtering behavior; `open` is endpoint-independent (nothing filters, which is
    /// what the probe reports); `None` for `blocked`.
    pub filtering: Option<FilteringBehavior>,
    /// Whether the external port equals the local port (for a fresh socket whose port is free).
    pub port_preservation: bool,
    /// The probe's port allocation pattern (`unknown` when UDP is blocked).
    pub allocation: AllocationPattern,
    /// Whether the path hairpins; `false` where there is no translation to hairpin through.
    pub hairpinning: bool,
    /// The classic RFC 3489 name the probe reports.
    pub classic: Classic,
    /// What the probe's port-mapping discovery should conclude; `None` where no router of the
    /// preset serves a port-mapping protocol (not compared: with nothing answering, UPnP's
    /// silence within the probe's short wait is `unknown`, not `false`).
    pub port_mapping: Option<PortMappingTruth>,
    /// What a probe over IPv6 from `h1` against `stun`'s IPv6 address should see.
    pub ipv6: Ipv6Truth,
}

/// The port-mapping verdicts of a preset whose (inner) router serves NAT-PMP, PCP or UPnP IGD.
/// Which protocols answer and the external address they claim come from the router's settings
/// and the address plan, so they are not repeated here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMappingTruth {
    /// A second NAT beyond the mapping router (`double-nat+all`, `cgnat+all`).
    pub double_nat: bool,
    /// That second NAT is a carrier's: the mapping router's external address is in 100.64/10
    /// (RFC 6598). `None` where the probe cannot tell (`double-nat+all`: an RFC 1918 external
    /// address behind another public one is a home router's or a carrier's that uses private
    /// space, so the probe says `null`, not `false`).
    pub cgnat: Option<bool>,
}

/// What a probe over IPv6 from `h1` should see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ipv6Truth {
    /// Not part of the matrix for this preset.
    NotCompared,
    /// IPv6 carries no UDP from `h1` to the reflector: no IPv6 route (`ipv4-only`), or the
    /// router drops UDP on both families (`blocked`).
    NoPath,
    /// IPv6 reaches the reflector through the router's IPv6 mode.
    Present {
        mapping: MappingBehavior,
        filtering: FilteringBehavior,
        translation: Translation,
    },
}

/// The truth a probe from `h1` should observe in preset `name` (its [`Preset::truth`]).
pub fn expected(name: &str) -> Option<Expected> {
    Some(find(name)?.truth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Role, INTERNET};

    #[test]
    fn pair_is_a_grid_cell_with_a_public_rendezvous() {
        let t = pair("full-cone, symmetric").unwrap();
        assert_eq!(t.preset.as_deref(), Some("pair:full-cone,symmetric"));
        let plan = t.plan().unwrap();
        let node = |name: &str| plan.nodes.iter().find(|n| n.name == name).unwrap();
        assert_eq!(node("a").upstream.as_deref(), Some("nata"));
        assert_eq!(node("b").upstream.as_deref(), Some("natb"));
        // A public host of its own, or the cell's own `rendezvous` (which may be its reflector).
        assert!(matches!(
            node(RENDEZVOUS).role,
            Role::Host | Role::Reflector
        ));
        assert_eq!(node(RENDEZVOUS).upstream.as_deref(), Some(INTERNET));
        // The cell itself, node for node, then the rendezvous host if the cell has none.
        let cell = crate::grid::pair_topology("full-cone", "symmetric").unwrap();
        let has_rendezvous = cell.nodes.iter().any(|n| n.name() == RENDEZVOUS);
        assert_eq!(t.nodes[..cell.nodes.len()], cell.nodes[..]);
        assert_eq!(
            t.nodes.len(),
            cell.nodes.len() + usize::from(!has_rendezvous)
        );
    }

    #[test]
    fn bad_pairs_are_one_line_errors() {
        for spec in ["", "full-cone", "full-cone,", ",symmetric", "a,b,c"] {
            let e = pair(spec).unwrap_err();
            assert!(matches!(e, PairError::Shape(_)), "{spec}: {e}");
        }
        let e = pair("full-cone,nope").unwrap_err().to_string();
        assert!(e.starts_with("unknown preset `nope` in pair:full-cone,nope; presets: open, "));
        assert!(!e.contains('\n'));
    }

    #[test]
    fn every_name_has_a_preset_info_and_expectation() {
        assert_eq!(names().len(), PRESETS.len());
        for (name, info) in names().iter().zip(infos()) {
            assert_eq!(*name, info.name);
            let t = preset(name).expect("preset exists");
            assert_eq!(t.preset.as_deref(), Some(*name));
            assert!(expected(name).is_some(), "{name}");
        }
        assert!(preset("nope").is_none());
        assert!(expected("nope").is_none());
    }

    #[test]
    fn every_preset_plans_with_stun_nat_h1_h2() {
        for name in names() {
            let plan = preset(name)
                .expect("preset")
                .plan()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let find = |n: &str| plan.nodes.iter().find(|p| p.name == n);
            let stun = find("stun").expect("stun");
            assert_eq!(stun.role, Role::Reflector);
            let reflectors = plan.nodes.iter().filter(|n| n.role == Role::Reflector);
            assert_eq!(reflectors.count(), 1, "{name}");
            let h1 = find("h1").expect("h1");
            let h2 = find("h2").expect("h2");
            if *name == "open" {
                assert!(find("nat").is_none());
                assert_eq!(h1.upstream.as_deref(), Some(INTERNET));
                assert_eq!(h2.upstream.as_deref(), Some(INTERNET));
            } else {
                assert_eq!(find("nat").expect("nat").role, Role::Nat, "{name}");
                assert_eq!(h1.upstream.as_deref(), Some("nat"), "{name}");
                assert_eq!(h2.upstream.as_deref(), Some("nat"), "{name}");
            }
        }
    }

    fn nat_config(name: &str) -> EngineConfig {
        let t = preset(name).expect("preset");
        let router = t.nodes.into_iter().find_map(|n| match n {
            NodeSpec::Nat {
                name,
                router: RouterKind::Engine(cfg),
                ..
            } if name == "nat" => Some(cfg),
            _ => None,
        });
        router.expect("engine nat")
    }

    #[test]
    fn preset_settings_match_their_names() {
        for name in names() {
            if matches!(*name, "open" | "linux") {
                continue;
            }
            let cfg = nat_config(name);
            let b = &cfg.behavior;
            assert_eq!(b.udp_timeout.as_secs(), 120, "{name}");
            assert_eq!(b.hairpinning, name.starts_with("full-cone"), "{name}");
            assert_eq!(cfg.translate, *name != "firewall", "{name}");
            assert_eq!(cfg.block_udp, *name == "blocked", "{name}");
            let want = expected(name).expect("expected");
            match *name {
                "firewall" | "blocked" => {}
                "cgnat" | "cgnat+all" | "double-nat+all" => {
                    assert_eq!(b.mapping, M::EndpointIndependent);
                    assert_eq!(b.filtering, F::AddressAndPortDependent);
                }
                _ => {
                    assert_eq!(Some(b.mapping), want.mapping, "{name}");
                    assert_eq!(Some(b.filtering), want.filtering, "{name}");
                }
            }
            let allocation = match b.allocation {
                PortAllocation::Preserve => AllocationPattern::Preserving,
                PortAllocation::Sequential { step } => {
                    assert_eq!(step, 1);
                    AllocationPattern::Sequential
                }
                PortAllocation::Random => AllocationPattern::Random,
            };
            if *name != "blocked" {
                assert_eq!(allocation, want.allocation, "{name}");
            }
        }
        assert_eq!(router("linux"), Some(RouterKind::Linux));
        assert_eq!(
            nat_config("firewall").behavior.filtering,
            F::AddressAndPortDependent
        );
    }

    #[test]
    fn cgnat_has_a_full_cone_carrier_in_front_of_nat() {
        let t = preset("cgnat").expect("preset");
        let carrier = t
            .nodes
            .iter()
            .find(|n| n.name() == "carrier")
            .expect("carrier");
        let NodeSpec::Nat {
            parent: None,
            router: RouterKind::Engine(cfg),
            ..
        } = carrier
        else {
            panic!("carrier must be a top-level engine nat: {carrier:?}");
        };
        assert_eq!(cfg.behavior.mapping, M::EndpointIndependent);
        assert_eq!(cfg.behavior.filtering, F::EndpointIndependent);
        let nat = t.nodes.iter().find(|n| n.name() == "nat").expect("nat");
        assert_eq!(nat.parent(), Some("carrier"));
    }

    /// The example in docs/lab.md, "Address plan".
    #[test]
    fn cgnat_addresses_match_the_docs() {
        let plan = preset("cgnat").expect("preset").plan().expect("plans");
        let show: Vec<String> = plan
            .nodes
            .iter()
            .map(|n| {
                let uplink: Vec<String> = n.uplink.iter().map(ToString::to_string).collect();
                let lan = n.lan.map(|l| format!(" lan {l}")).unwrap_or_default();
                let via = n.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                format!("{} {}{via}{lan}", n.name, uplink.join(","))
            })
            .collect();
        assert_eq!(
            show,
            [
                "internet 198.51.100.254/24,203.0.113.254/24",
                "stun 198.51.100.1/24,198.51.100.2/24",
                "carrier 203.0.113.1/24 lan 100.64.0.1/24",
                "nat 100.64.0.2/24 via 100.64.0.1 lan 10.1.0.1/24",
                "h1 10.1.0.2/24 via 10.1.0.1",
                "h2 10.1.0.3/24 via 10.1.0.1",
            ]
        );
    }

    #[test]
    fn the_lists_come_from_the_table() {
        assert_eq!(
            GRID_PRESETS,
            [
                "full-cone",
                "restricted-cone",
                "port-restricted-cone",
                "symmetric",
                "symmetric-sequential",
                "cgnat"
            ],
            "issue 5's grid"
        );
        let routers: Vec<&str> = names()
            .iter()
            .copied()
            .filter(|n| !matches!(*n, "open" | "cgnat" | "double-nat+all" | "cgnat+all"))
            .collect();
        assert_eq!(ROUTER_BEHAVIORS, routers);
        for p in PRESETS {
            assert_eq!(find(p.name).map(|f| f.name), Some(p.name));
            assert_eq!(expected(p.name), Some(p.truth));
        }
    }

    /// A preset's name says which services its (inner) router offers, and no other router maps.
    #[test]
    fn port_mapping_presets_serve_what_their_names_say() {
        for name in names() {
            let want: Vec<S> = match name.split_once('+') {
                Some((_, "all")) => vec![S::NatPmp, S::Pcp, S::Upnp],
                Some((_, words)) => words.split('+').map(|w| w.parse().expect(w)).collect(),
                None => vec![],
            };
            let topology = preset(name).expect("preset");
            for node in &topology.nodes {
                if let NodeSpec::Nat {
                    name: node,
                    router: RouterKind::Engine(cfg),
                    ..
                } = node
                {
                    let expect = if node == "nat" { &want[..] } else { &[] };
                    assert_eq!(cfg.port_mapping, expect, "{name}: {node}");
                }
            }
        }
        let plan = preset("double-nat+all")
            .expect("preset")
            .plan()
            .expect("plans");
        let carrier = plan
            .nodes
            .iter()
            .find(|n| n.name == "carrier")
            .expect("carrier");
        assert_eq!(carrier.lan.map(|l| l.network()), Some(DOUBLE_NAT_LAN.addr));
        let nat = plan.nodes.iter().find(|n| n.name == "nat").expect("nat");
        // docs/lab.md, "Port mapping", names this address.
        assert_eq!(nat.uplink[0].addr, std::net::Ipv4Addr::new(192, 168, 1, 2));
        let plan = preset("cgnat+all").expect("preset").plan().expect("plans");
        let nat = plan.nodes.iter().find(|n| n.name == "nat").expect("nat");
        assert!(crate::topology::CGNAT_NET.contains(nat.uplink[0].addr));
    }

    /// docs/lab.md's truth table and grid description are this table, row for row.
    #[test]
    fn the_docs_show_the_table() {
        let docs = include_str!("../../docs/lab.md");
        let kebab = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let yes = |b: bool| if b { "yes" } else { "no" };
        for p in PRESETS {
            let t = p.truth;
            let mapping = match t.mapping {
                Some(m) => kebab(serde_json::to_value(m).unwrap()),
                None if t.classic == Classic::UdpBlocked => "—".into(),
                None => "none".into(),
            };
            let filtering = t
                .filtering
                .map_or("—".into(), |f| kebab(serde_json::to_value(f).unwrap()));
            let row = format!(
                "| `{}` | {mapping} | {filtering} | {} | {} | {} | `{}` |",
                p.name,
                yes(t.port_preservation),
                kebab(serde_json::to_value(t.allocation).unwrap()),
                yes(t.hairpinning),
                kebab(serde_json::to_value(t.classic).unwrap()),
            );
            assert!(docs.lines().any(|l| l == row), "docs/lab.md lacks {row}");
        }
        let words: Vec<&str> = docs.split_whitespace().collect();
        let default = format!("default {})", GRID_PRESETS.join(", "));
        assert!(
            words.join(" ").contains(&default),
            "docs/lab.md lacks `{default}`"
        );
        let header = format!("| UDP | {} |", GRID_PRESETS.join(" | "));
        assert!(
            docs.lines().any(|l| l == header),
            "docs/lab.md lacks {header}"
        );
    }

    #[test]
    fn router_behaviors_are_accepted() {
        for b in ROUTER_BEHAVIORS {
            assert!(router(b).is_some(), "{b}");
        }
        assert!(router("open").is_none());
        assert!(router("cgnat").is_none());
    }
}
