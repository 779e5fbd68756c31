//! The traversal model: given the NATs in front of two peers, which path a connection between them
//! should take — direct, direct with port prediction, relayed, or none — for UDP and for TCP, and
//! why, in words. It is the one place this reasoning lives: the probe's outlook
//! ([`crate::probe::report::outlook`]), the lab grid's expectations (`natscope_lab::grid`) and the
//! docs' tables (docs/probe.md, docs/lab.md, checked by tests against it) all come from here.
//!
//! The reasoning (RFC 4787 §4–5, RFC 5382; NAT-REFERENCE.md, "Hole punching outcomes"): each peer
//! registers with a rendezvous server from one socket, so its *reflexive* address is its mapping
//! towards that server. Both then send to each other's reflexive address. A packet from A reaches B
//! only if B's NAT forwards it on that mapping: an endpoint-independent filter (RFC 4787 §5) admits
//! anyone on any mapping; otherwise B's mapping must be the one B also uses towards A (B's mapping
//! is endpoint-independent — an address- or port-dependent one towards the server admits only the
//! server), and its filter must admit A's actual source: any port of A's address for an
//! address-dependent filter, exactly A's reflexive address — so A's mapping must be
//! endpoint-independent — for an address-and-port-dependent one. Once a packet gets through, the
//! receiver answers the source it saw; that answer leaves from the receiver's reflexive address when
//! its mapping is endpoint-independent (which the first sender's filter admits, having sent there),
//! and otherwise from a new port, which only a filter that is not address-and-port-dependent admits.
//! One direction that opens and answers is enough: each side then knows the other's real source.
//!
//! Filtering is per mapping, as in the NAT model ([`crate::nat::table::NatTable`]) and in Linux
//! conntrack; each NAT has one external address (paired pooling, RFC 4787 REQ-2).
//!
//! Port prediction ([`Techniques::port_prediction`]; on in `natscope punch`, [`Techniques::PUNCH`]): a peer whose mapping is not
//! endpoint-independent but whose next external port is predictable lets the other aim at the
//! mapping it will use; that opens when its filter admits the other's source on it.
//!
//! A mapped port (issue 12): a peer whose gateway granted it a port over PCP, NAT-PMP or UPnP IGD
//! ([`PeerNat::port_mapping`]) is reachable on that port from anywhere, and its outbound packets
//! leave from it (RFC 6887 §11: a MAP mapping serves both directions), so for UDP it behaves like
//! an open host, whatever its NAT does to other ports: a symmetric NAT that speaks PCP is as good
//! as no NAT. One reachable side is enough for a direct path (the other learns its real source
//! from the first packet). The mapping is for UDP only, so TCP is unchanged.
//!
//! TCP (RFC 5382 simultaneous open): a socket in simultaneous open accepts segments only from the
//! exact address it connected to, so both mappings must be endpoint-independent; then each SYN comes
//! from that address and each filter admits it once its own SYN has left.

use serde::Serialize;

use crate::nat::{FilteringBehavior as F, MappingBehavior as M};
use crate::portmap::PortMappingService;

/// What the model knows of the NAT (or firewall, or nothing) in front of one peer. `None` is
/// unknown. No translation at all counts as an endpoint-independent mapping.
///
/// New knowledge (IPv6 mode, port-mapping services, hairpinning) is added as fields with a
/// default, so `PeerNat { mapping, filtering, ..Default::default() }` keeps compiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PeerNat {
    /// RFC 4787 §4.1 mapping behavior (the same for UDP and TCP here).
    pub mapping: Option<M>,
    /// RFC 4787 §5 filtering behavior.
    pub filtering: Option<F>,
    /// The next external port is known to be predictable (sequential or preserving allocation on
    /// a single external address); `false` when it is random or was not measured.
    pub predictable_ports: bool,
    /// The path drops all UDP (so there is no UDP relay either).
    pub udp_blocked: bool,
    /// The peer's gateway granted it a working UDP port over this protocol (and no second NAT
    /// undoes it): the peer is reachable there like an open host.
    pub port_mapping: Option<PortMappingService>,
}

impl PeerNat {
    pub fn new(mapping: M, filtering: F) -> Self {
        Self {
            mapping: Some(mapping),
            filtering: Some(filtering),
            ..Self::default()
        }
    }
}

/// Which traversal techniques the peers use beyond sending to each other's reflexive address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Techniques {
    /// Aim at the peer's predicted next port when its mapping is not endpoint-independent.
    pub port_prediction: bool,
    /// Ask the gateway for a mapping of the punch socket's port (PCP, NAT-PMP, UPnP IGD) and
    /// offer its external address as a candidate, so a side with a working mapping
    /// ([`PeerNat::port_mapping`]) is reachable like an open host. Without it the model ignores
    /// `port_mapping`: a gateway's service helps only a peer that asks.
    pub port_mapping: bool,
}

impl Techniques {
    /// What `natscope punch` does by default: both peers measure their allocation and register
    /// it over UDP (`--no-predict` turns it off), so the other aims at the predicted ports; and
    /// both ask their gateway to map their socket's port and send the mapped address as a
    /// candidate (`--no-port-mapping` turns it off). The punch machines' default options
    /// (`punch::connector::ConnectOptions`, `punch::listener::ListenOptions`), the punch driver
    /// (`natscope_probes::punch::mapping`), the probe's outlook and the lab grid's expectations
    /// all come from here.
    pub const PUNCH: Techniques = Techniques {
        port_prediction: true,
        port_mapping: true,
    };
}

/// One of the two peers of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

/// The path a connection should take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Peer to peer, by sending to each other's reflexive address.
    Direct,
    /// Peer to peer, once a peer aims at the other's predicted port.
    PortPrediction,
    /// Through the relay.
    Relayed,
    /// Neither directly nor through the (UDP) relay.
    Blocked,
    /// An input the answer depends on is unknown.
    Unknown,
}

/// Why a packet sent to a peer's reflexive address does not lead to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Refusal {
    /// The receiver's mapping towards the server is not the one it uses towards the sender, and
    /// its filter admits only the server there.
    ServerMappingOnly { mapping: M, filtering: F },
    /// The receiver's address-and-port-dependent filter admits only the sender's reflexive port,
    /// and the sender's mapping gives it a new one.
    NewSourcePort { sender_mapping: M },
    /// The packet passes, but the answer leaves the receiver from a new port, which the sender's
    /// address-and-port-dependent filter refuses.
    AnswerFiltered,
}

/// The reason for a [`Path`], as data; [`Expectation::words`] says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Reason {
    /// `side`'s mapping or filtering is unknown.
    UnknownBehavior { side: Side },
    /// `side`'s mapping is unknown (TCP).
    UnknownMapping { side: Side },
    /// A side drops all UDP.
    UdpBlocked,
    /// Packets sent either way get through and are answered.
    BothDirections,
    /// Packets from `from` get through and are answered; the other way alone would not.
    OneDirection { from: Side },
    /// `predicted`'s mapping changes per destination, but its next port is predictable and its
    /// filter admits the other's packets there.
    Predicted { predicted: Side },
    /// Neither direction opens: why not towards B, and why not towards A.
    NoDirection {
        towards_b: Refusal,
        towards_a: Refusal,
    },
    /// Both mappings are endpoint-independent: RFC 5382 simultaneous open.
    SimultaneousOpen,
    /// `side` maps the peer connection to a new port (TCP).
    NewPortPerConnection { side: Side },
    /// `side`'s gateway granted it a port over `service`, which makes it reachable like an open
    /// host; without it the path would not be direct.
    MappedPort {
        side: Side,
        service: PortMappingService,
    },
}

/// The expected path for one transport and its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Expectation {
    pub path: Path,
    pub reason: Reason,
}

/// Both transports' expectations for a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PairExpectation {
    pub udp: Expectation,
    pub tcp: Expectation,
}

/// The expected paths between a peer behind `a` and a peer behind `b`.
pub fn expect(a: PeerNat, b: PeerNat, techniques: Techniques) -> PairExpectation {
    PairExpectation {
        udp: udp(a, b, techniques),
        tcp: tcp(a, b),
    }
}

fn short_m(m: M) -> &'static str {
    match m {
        M::EndpointIndependent => "EIM",
        M::AddressDependent => "ADM",
        M::AddressAndPortDependent => "APDM",
    }
}

fn short_f(f: F) -> &'static str {
    match f {
        F::EndpointIndependent => "EIF",
        F::AddressDependent => "ADF",
        F::AddressAndPortDependent => "APDF",
    }
}

/// A peer whose every input is known.
#[derive(Clone, Copy)]
struct Known {
    mapping: M,
    filtering: F,
    predictable_ports: bool,
}

fn known(p: PeerNat) -> Option<Known> {
    Some(Known {
        mapping: p.mapping?,
        filtering: p.filtering?,
        predictable_ports: p.predictable_ports,
    })
}

/// Whether `from`'s packets, sent to `to`'s reflexive address, reach `to`'s host.
fn reaches(from: Known, to: Known) -> Result<(), Refusal> {
    if to.filtering == F::EndpointIndependent {
        return Ok(());
    }
    if to.mapping != M::EndpointIndependent {
        return Err(Refusal::ServerMappingOnly {
            mapping: to.mapping,
            filtering: to.filtering,
        });
    }
    match to.filtering {
        F::AddressDependent => Ok(()),
        _ if from.mapping == M::EndpointIndependent => Ok(()),
        _ => Err(Refusal::NewSourcePort {
            sender_mapping: from.mapping,
        }),
    }
}

/// Whether `to`'s answer to the source it saw passes `from`'s filter.
fn answer_passes(from: Known, to: Known) -> bool {
    to.mapping == M::EndpointIndependent || from.filtering != F::AddressAndPortDependent
}

/// Whether packets from `from` to `to` open a path.
fn opens(from: Known, to: Known) -> Result<(), Refusal> {
    reaches(from, to)?;
    if answer_passes(from, to) {
        Ok(())
    } else {
        Err(Refusal::AnswerFiltered)
    }
}

/// Whether `other` can reach `predicted` by aiming at its predicted next port: `predicted`'s
/// mapping changes per destination, its next port is predictable, its filter admits `other`'s
/// source on that mapping (the one `predicted` opens towards `other`'s reflexive address), and
/// `predicted`'s answers leave from that same mapping so that `other`'s filter admits them.
///
/// When `other`'s mapping is endpoint-independent, it sends from the very address `predicted`
/// aimed at and every filter agrees. Otherwise `other` sends from a port nobody could name in
/// advance: the predicted mapping must admit any port of `other`'s address (filtering not
/// address-and-port-dependent), and `predicted`'s answer to that new port must reuse the mapping,
/// which only an address-dependent mapping does — an address-and-port-dependent one opens yet
/// another port, from which `other`'s filter drops it.
fn prediction_opens(other: Known, predicted: Known) -> bool {
    predicted.mapping != M::EndpointIndependent
        && predicted.predictable_ports
        && (other.mapping == M::EndpointIndependent
            || (predicted.mapping == M::AddressDependent
                && predicted.filtering != F::AddressAndPortDependent))
}

/// The expected UDP path between `a` and `b`.
pub fn udp(a: PeerNat, b: PeerNat, techniques: Techniques) -> Expectation {
    let e = |path, reason| Expectation { path, reason };
    if a.udp_blocked || b.udp_blocked {
        return e(Path::Blocked, Reason::UdpBlocked);
    }
    let unmapped = |p: PeerNat| PeerNat {
        port_mapping: None,
        ..p
    };
    let (a, b) = match techniques.port_mapping {
        true => (a, b),
        false => (unmapped(a), unmapped(b)),
    };
    let mapped = match (a.port_mapping, b.port_mapping) {
        (Some(service), _) => Some((Side::A, service)),
        (None, Some(service)) => Some((Side::B, service)),
        (None, None) => None,
    };
    if let Some((side, service)) = mapped {
        let plain = udp(unmapped(a), unmapped(b), techniques);
        return if plain.path == Path::Direct {
            plain
        } else {
            e(Path::Direct, Reason::MappedPort { side, service })
        };
    }
    let (ka, kb) = match (known(a), known(b)) {
        (Some(ka), Some(kb)) => (ka, kb),
        (None, _) => return e(Path::Unknown, Reason::UnknownBehavior { side: Side::A }),
        (_, None) => return e(Path::Unknown, Reason::UnknownBehavior { side: Side::B }),
    };
    match (opens(ka, kb), opens(kb, ka)) {
        (Ok(()), Ok(())) => e(Path::Direct, Reason::BothDirections),
        (Ok(()), Err(_)) => e(Path::Direct, Reason::OneDirection { from: Side::A }),
        (Err(_), Ok(())) => e(Path::Direct, Reason::OneDirection { from: Side::B }),
        (Err(towards_b), Err(towards_a)) => {
            if techniques.port_prediction && prediction_opens(kb, ka) {
                e(
                    Path::PortPrediction,
                    Reason::Predicted { predicted: Side::A },
                )
            } else if techniques.port_prediction && prediction_opens(ka, kb) {
                e(
                    Path::PortPrediction,
                    Reason::Predicted { predicted: Side::B },
                )
            } else {
                e(
                    Path::Relayed,
                    Reason::NoDirection {
                        towards_b,
                        towards_a,
                    },
                )
            }
        }
    }
}

/// Sockets the hard side of a birthday opening binds, each sending once to the easy side's
/// reflexive address (the classic 256).
pub const BIRTHDAY_SOCKETS: u32 = 256;
/// The ports a random allocation draws from (1024-65535).
const BIRTHDAY_PORT_RANGE: f64 = 64_512.0;

/// The birthday technique for one pair (issue 14, item 5): which side is "hard", how many packets
/// the opening may cost, and how likely it is to find the path. `natscope punch` runs it
/// (`punch::session::Birthday`) and the grid accepts its direct path where this says it applies.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BirthdayPlan {
    /// The side whose mapping changes per destination at random ports: it binds
    /// [`BIRTHDAY_SOCKETS`] sockets and sends once from each to the other's reflexive address,
    /// so its NAT holds that many mappings that admit the other side.
    pub hard: Side,
    pub sockets: u32,
    /// Random ports of the hard side's address the easy side (endpoint-independent mapping, so
    /// it sends from the very address the hard side's mappings admit) probes.
    pub probes: u32,
    /// Most packets the opening sends, both sides together: `sockets + probes`.
    pub packet_bound: u32,
    /// The chance a probe hits one of the hard side's mappings:
    /// `1 - (1 - sockets / 64512)^probes` (ports drawn uniformly, probes distinct or not).
    pub success: f64,
}

/// The birthday plan for a UDP pair that would otherwise relay: one side's mapping is not
/// endpoint-independent and its ports are not predictable (random symmetric), the other's mapping
/// is endpoint-independent (its port-dependent filter is what stops the plain punch). `None` when
/// the pair goes direct without it, when both sides are hard (each probe then opens yet another
/// mapping on the prober's own NAT), or an input is unknown.
pub fn birthday(a: PeerNat, b: PeerNat, probes: u32) -> Option<BirthdayPlan> {
    if udp(a, b, Techniques::PUNCH).path != Path::Relayed {
        return None;
    }
    let (ka, kb) = (known(a)?, known(b)?);
    let hard = |k: Known| k.mapping != M::EndpointIndependent && !k.predictable_ports;
    let easy = |k: Known| k.mapping == M::EndpointIndependent;
    let side = match (hard(ka) && easy(kb), hard(kb) && easy(ka)) {
        (true, _) => Side::A,
        (_, true) => Side::B,
        _ => return None,
    };
    let sockets = BIRTHDAY_SOCKETS;
    let miss = 1.0 - f64::from(sockets) / BIRTHDAY_PORT_RANGE;
    Some(BirthdayPlan {
        hard: side,
        sockets,
        probes,
        packet_bound: sockets + probes,
        success: 1.0 - miss.powf(f64::from(probes)),
    })
}

/// The fewest easy-side probes for which a birthday opening with [`BIRTHDAY_SOCKETS`] succeeds
/// with at least probability `p` (0 < p < 1).
pub fn birthday_probes_for(p: f64) -> u32 {
    let miss = 1.0 - f64::from(BIRTHDAY_SOCKETS) / BIRTHDAY_PORT_RANGE;
    ((1.0 - p.clamp(0.0, 0.999_999)).ln() / miss.ln())
        .ceil()
        .max(0.0) as u32
}

/// The expected TCP path between `a` and `b` (RFC 5382 simultaneous open, or the relay).
pub fn tcp(a: PeerNat, b: PeerNat) -> Expectation {
    let e = |path, reason| Expectation { path, reason };
    match (a.mapping, b.mapping) {
        (None, _) => e(Path::Unknown, Reason::UnknownMapping { side: Side::A }),
        (_, None) => e(Path::Unknown, Reason::UnknownMapping { side: Side::B }),
        (Some(M::EndpointIndependent), Some(M::EndpointIndependent)) => {
            e(Path::Direct, Reason::SimultaneousOpen)
        }
        (Some(ma), _) => e(
            Path::Relayed,
            Reason::NewPortPerConnection {
                side: if ma != M::EndpointIndependent {
                    Side::A
                } else {
                    Side::B
                },
            },
        ),
    }
}

/// A port-mapping protocol's name in prose.
fn service_name(s: PortMappingService) -> &'static str {
    match s {
        PortMappingService::Pcp => "PCP",
        PortMappingService::NatPmp => "NAT-PMP",
        PortMappingService::Upnp => "UPnP IGD",
    }
}

impl Refusal {
    fn words(self) -> String {
        match self {
            Self::ServerMappingOnly { mapping, filtering } => format!(
                "its {} mapping towards the server admits only the server ({})",
                short_m(mapping),
                short_f(filtering)
            ),
            Self::NewSourcePort { sender_mapping } => format!(
                "its APDF filter admits only the reflexive port it sent to, and the {} sender uses a new port",
                short_m(sender_mapping)
            ),
            Self::AnswerFiltered => "the packet passes but the answer comes from a new port the APDF sender's filter refuses".into(),
        }
    }
}

impl Expectation {
    /// The reason in words, naming the peers' NATs `a` and `b`.
    pub fn words(&self, a: &str, b: &str) -> String {
        let name = |s: Side| if s == Side::A { a } else { b };
        let other = |s: Side| if s == Side::A { b } else { a };
        match self.reason {
            Reason::UnknownBehavior { side } => {
                format!("{}'s mapping or filtering is unknown", name(side))
            }
            Reason::UnknownMapping { side } => format!("{}'s mapping is unknown", name(side)),
            Reason::UdpBlocked => {
                "UDP is blocked, so neither a direct path nor the UDP relay exists".into()
            }
            Reason::BothDirections => "both directions open".into(),
            Reason::OneDirection { from } => format!(
                "{} → {} opens and the answer returns; {} → {} alone would not",
                name(from),
                other(from),
                other(from),
                name(from)
            ),
            Reason::Predicted { predicted } => format!(
                "{p} maps each destination to a new port, but predictably: {o} aims at the predicted port, and {p}'s filter admits {o}'s source there",
                p = name(predicted),
                o = other(predicted)
            ),
            Reason::NoDirection {
                towards_b,
                towards_a,
            } => format!(
                "towards {b}: {}; towards {a}: {}",
                towards_b.words(),
                towards_a.words()
            ),
            Reason::SimultaneousOpen => "both mappings are endpoint-independent, so each SYN comes from the address the other side connects to, and each filter admits it once its own SYN left (RFC 5382 simultaneous open)".into(),
            Reason::NewPortPerConnection { side } => format!(
                "{} maps the peer connection to a new port, and a TCP socket accepts segments only from the exact address it connected to",
                name(side)
            ),
            Reason::MappedPort { side, service } => format!(
                "{}'s gateway maps it a port over {}, so {} reaches it there like an open host",
                name(side),
                service_name(service),
                other(side)
            ),
        }
    }

    /// The reason in a few words that name no peer, said from A's side (the probe's outlook,
    /// where A is the probing host and the row names the peer).
    pub fn summary(&self) -> &'static str {
        match self.reason {
            Reason::UnknownBehavior { side: Side::A } => "our mapping or filtering is unknown",
            Reason::UnknownBehavior { side: Side::B } => "the peer's mapping or filtering is unknown",
            Reason::UnknownMapping { side: Side::A } => "our mapping is unknown",
            Reason::UnknownMapping { side: Side::B } => "the peer's mapping is unknown",
            Reason::UdpBlocked => "UDP is blocked, so neither a direct path nor the UDP relay exists",
            Reason::BothDirections | Reason::OneDirection { .. } => {
                "at least one direction opens; the other side learns the real source from it"
            }
            Reason::Predicted { .. } => {
                "a mapping changes per destination but its next port is predictable"
            }
            Reason::NoDirection { .. } => "each side's packets miss the other's per-destination mapping or are filtered; use a relay",
            Reason::SimultaneousOpen => "both mappings are endpoint-independent (RFC 5382 simultaneous open)",
            Reason::NewPortPerConnection { .. } => "a mapping changes per connection, and a TCP socket accepts segments only from the address it connected to",
            Reason::MappedPort { side: Side::A, service } => match service {
                PortMappingService::Pcp => "PCP available: our gateway maps us a port, so the peer reaches us there like an open host",
                PortMappingService::NatPmp => "NAT-PMP available: our gateway maps us a port, so the peer reaches us there like an open host",
                PortMappingService::Upnp => "UPnP available: our gateway maps us a port, so the peer reaches us there like an open host",
            },
            Reason::MappedPort { side: Side::B, .. } => {
                "the peer's gateway maps it a port, so we reach it there like an open host"
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn birthday_is_for_a_random_symmetric_side_facing_an_endpoint_independent_mapping() {
        let sym = PeerNat::new(M::AddressAndPortDependent, F::AddressAndPortDependent);
        let prc = PeerNat::new(M::EndpointIndependent, F::AddressAndPortDependent);
        let plan = birthday(sym, prc, 1024).expect("symmetric × port-restricted");
        assert_eq!(plan.hard, Side::A);
        assert_eq!(plan.packet_bound, 256 + 1024);
        assert!((plan.success - 0.983).abs() < 0.001, "{plan:?}");
        assert_eq!(birthday(prc, sym, 1024).map(|p| p.hard), Some(Side::B));
        // Two hard sides: no birthday; a pair that goes direct anyway: none needed.
        assert_eq!(birthday(sym, sym, 1024), None);
        assert_eq!(birthday(prc, prc, 1024), None);
        // A predictable symmetric side goes direct through prediction instead.
        let seq = PeerNat {
            predictable_ports: true,
            ..sym
        };
        assert_eq!(birthday(seq, prc, 1024), None);
        // ≥ 90 % needs 580 probes; ≥ 99 %, 1,159.
        assert_eq!(birthday_probes_for(0.9), 580);
        assert!(birthday(sym, prc, 580).expect("plan").success >= 0.9);
        assert!(birthday(sym, prc, 579).expect("plan").success < 0.9);
        assert_eq!(birthday_probes_for(0.99), 1159);
    }
    use super::*;
    use F::{AddressAndPortDependent as Apdf, AddressDependent as Adf, EndpointIndependent as Eif};
    use M::{AddressAndPortDependent as Apdm, AddressDependent as Adm, EndpointIndependent as Eim};

    fn nat(m: M, f: F, predictable: bool) -> PeerNat {
        PeerNat {
            predictable_ports: predictable,
            ..PeerNat::new(m, f)
        }
    }

    const PREDICT: Techniques = Techniques {
        port_prediction: true,
        port_mapping: false,
    };
    const MAPPED: Techniques = Techniques {
        port_prediction: false,
        port_mapping: true,
    };

    #[test]
    fn udp_table_rfc4787() {
        use Path::*;
        // (a, b, without prediction, with prediction)
        let full = nat(Eim, Eif, true);
        let restricted = nat(Eim, Adf, true);
        let port_restricted = nat(Eim, Apdf, true);
        let sym_random = nat(Apdm, Apdf, false);
        let sym_seq = nat(Apdm, Apdf, true);
        let ad = nat(Adm, Adf, true);
        // Symmetric mapping with endpoint-independent filtering: the packet passes on the server
        // mapping; the answer comes from a new port, admitted by an ADF or EIF sender only.
        let apdm_eif = nat(Apdm, Eif, false);
        // The same with predictable ports: prediction reaches it, but its answer to a symmetric
        // peer's unpredictable port leaves from a new mapping that the peer's filter drops.
        let apdm_eif_seq = nat(Apdm, Eif, true);
        let rows = [
            (full, sym_random, Direct, Direct),
            (restricted, sym_random, Direct, Direct),
            (port_restricted, port_restricted, Direct, Direct),
            (port_restricted, sym_random, Relayed, Relayed),
            (port_restricted, sym_seq, Relayed, PortPrediction),
            (sym_random, sym_random, Relayed, Relayed),
            (sym_seq, sym_seq, Relayed, Relayed),
            (ad, port_restricted, Relayed, PortPrediction),
            (ad, full, Direct, Direct),
            (apdm_eif, ad, Direct, Direct),
            (apdm_eif, apdm_eif, Direct, Direct),
            (apdm_eif, sym_random, Relayed, Relayed),
            (apdm_eif, port_restricted, Relayed, Relayed),
            (apdm_eif_seq, sym_random, Relayed, Relayed),
            (apdm_eif_seq, port_restricted, Relayed, PortPrediction),
            (ad, sym_random, Relayed, PortPrediction),
        ];
        for (a, b, plain, predicted) in rows {
            for (x, y) in [(a, b), (b, a)] {
                assert_eq!(udp(x, y, Techniques::default()).path, plain, "{x:?} {y:?}");
                assert_eq!(udp(x, y, PREDICT).path, predicted, "{x:?} {y:?} predicting");
            }
        }
    }

    #[test]
    fn unknown_and_blocked_inputs() {
        let full = nat(Eim, Eif, true);
        let unknown = PeerNat::default();
        let e = udp(unknown, full, PREDICT);
        assert_eq!(e.path, Path::Unknown);
        assert_eq!(e.summary(), "our mapping or filtering is unknown");
        assert_eq!(
            udp(
                full,
                PeerNat {
                    filtering: None,
                    ..full
                },
                PREDICT
            )
            .reason,
            Reason::UnknownBehavior { side: Side::B }
        );
        assert_eq!(tcp(full, unknown).path, Path::Unknown);
        let blocked = PeerNat {
            udp_blocked: true,
            ..full
        };
        assert_eq!(udp(full, blocked, PREDICT).path, Path::Blocked);
        assert_eq!(udp(unknown, blocked, PREDICT).path, Path::Blocked);
        assert_eq!(tcp(full, blocked).path, Path::Direct, "TCP still passes");
    }

    #[test]
    fn tcp_needs_two_endpoint_independent_mappings() {
        for ma in [Eim, Adm, Apdm] {
            for mb in [Eim, Adm, Apdm] {
                for f in [Eif, Adf, Apdf] {
                    let e = tcp(nat(ma, f, true), nat(mb, Apdf, false));
                    let direct = ma == Eim && mb == Eim;
                    assert_eq!(e.path == Path::Direct, direct, "{ma:?} {mb:?} {f:?}");
                    assert_eq!(e.path == Path::Relayed, !direct);
                }
            }
        }
        let e = tcp(nat(Eim, Eif, true), nat(Apdm, Apdf, true));
        assert_eq!(e.reason, Reason::NewPortPerConnection { side: Side::B });
        assert!(e
            .words("cone", "sym")
            .starts_with("sym maps the peer connection"));
    }

    #[test]
    fn the_model_is_symmetric_in_its_peers() {
        let all: Vec<PeerNat> = [Eim, Adm, Apdm]
            .into_iter()
            .flat_map(|m| [Eif, Adf, Apdf].map(|f| (m, f)))
            .flat_map(|(m, f)| [true, false].map(|p| nat(m, f, p)))
            .collect();
        for &a in &all {
            for &b in &all {
                for t in [Techniques::default(), PREDICT] {
                    assert_eq!(udp(a, b, t).path, udp(b, a, t).path, "{a:?} {b:?} {t:?}");
                }
                assert_eq!(tcp(a, b).path, tcp(b, a).path);
                // Prediction only ever adds a path.
                let plain = udp(a, b, Techniques::default()).path;
                let predicted = udp(a, b, PREDICT).path;
                assert!(
                    plain == predicted
                        || (plain, predicted) == (Path::Relayed, Path::PortPrediction)
                );
            }
        }
    }

    fn mapped(p: PeerNat, service: PortMappingService) -> PeerNat {
        PeerNat {
            port_mapping: Some(service),
            ..p
        }
    }

    /// Issue 12: a side with a working mapped port is reachable like an open host, so the pairs
    /// that were relayed become direct, with the mapped port as the reason; pairs already direct
    /// keep their reason, blocked UDP stays blocked, and TCP (the mapping is UDP) is unchanged.
    #[test]
    fn a_mapped_port_makes_its_side_reachable() {
        let sym_random = nat(Apdm, Apdf, false);
        let port_restricted = nat(Eim, Apdf, true);
        let sym_pcp = mapped(sym_random, PortMappingService::Pcp);
        // A peer that does not ask its gateway gains nothing from the service.
        for t in [Techniques::default(), PREDICT] {
            assert_eq!(udp(sym_pcp, sym_random, t).path, Path::Relayed, "{t:?}");
            assert_eq!(udp(sym_random, sym_pcp, t).path, Path::Relayed, "{t:?}");
        }
        for t in [MAPPED, Techniques::PUNCH] {
            assert_eq!(udp(sym_random, sym_random, t).path, Path::Relayed);
            let e = udp(sym_pcp, sym_random, t);
            assert_eq!(e.path, Path::Direct);
            assert_eq!(
                e.reason,
                Reason::MappedPort {
                    side: Side::A,
                    service: PortMappingService::Pcp
                }
            );
            assert_eq!(
                e.words("sym+pcp", "sym"),
                "sym+pcp's gateway maps it a port over PCP, so sym reaches it there like an open host"
            );
            assert!(e.summary().starts_with("PCP available:"));
            let e = udp(sym_random, sym_pcp, t);
            assert_eq!(e.path, Path::Direct);
            assert_eq!(
                e.summary(),
                "the peer's gateway maps it a port, so we reach it there like an open host"
            );
            let upnp = mapped(sym_random, PortMappingService::Upnp);
            assert_eq!(udp(upnp, port_restricted, t).path, Path::Direct);
            // Already direct: the model's own reason stays.
            let full = mapped(nat(Eim, Eif, true), PortMappingService::NatPmp);
            assert_eq!(
                udp(full, sym_random, t).reason,
                udp(nat(Eim, Eif, true), sym_random, t).reason
            );
            // Our own behavior unknown, but the mapped port is enough.
            let unknown = mapped(PeerNat::default(), PortMappingService::Pcp);
            assert_eq!(udp(unknown, sym_random, t).path, Path::Direct);
            let blocked = PeerNat {
                udp_blocked: true,
                ..sym_pcp
            };
            assert_eq!(udp(blocked, sym_random, t).path, Path::Blocked);
        }
        assert_eq!(
            tcp(sym_pcp, sym_random).path,
            Path::Relayed,
            "the mapping is UDP"
        );
    }

    #[test]
    fn the_model_with_mapped_ports_is_symmetric_and_only_adds_paths() {
        let all: Vec<PeerNat> = [Eim, Adm, Apdm]
            .into_iter()
            .flat_map(|m| [Eif, Adf, Apdf].map(|f| (m, f)))
            .flat_map(|(m, f)| [true, false].map(|p| nat(m, f, p)))
            .collect();
        for &a in &all {
            for &b in &all {
                for t in [MAPPED, Techniques::PUNCH] {
                    let am = mapped(a, PortMappingService::Pcp);
                    assert_eq!(udp(am, b, t).path, Path::Direct, "{a:?} {b:?}");
                    assert_eq!(udp(am, b, t).path, udp(b, am, t).path);
                    if udp(a, b, t).path == Path::Direct {
                        assert_eq!(
                            udp(am, b, t),
                            udp(a, b, t),
                            "a direct pair keeps its reason"
                        );
                    }
                }
            }
        }
    }

    /// Issue 12, must-show 4: the grid's port-mapping cells, from the one model with punch's own
    /// techniques: symmetric+pcp ↔ symmetric and symmetric+upnp ↔ port-restricted-cone go
    /// direct through the mapped port (and say so), while the same pairs without the service,
    /// and symmetric ↔ symmetric, stay relayed.
    #[test]
    fn punch_goes_direct_through_a_mapped_port_in_the_grids_cells() {
        const { assert!(Techniques::PUNCH.port_mapping && Techniques::PUNCH.port_prediction) };
        let sym = nat(Apdm, Apdf, false);
        let prc = nat(Eim, Apdf, true);
        let t = Techniques::PUNCH;
        let e = udp(mapped(sym, PortMappingService::Pcp), sym, t);
        assert_eq!(
            (e.path, e.reason),
            (
                Path::Direct,
                Reason::MappedPort {
                    side: Side::A,
                    service: PortMappingService::Pcp
                }
            )
        );
        let e = udp(prc, mapped(sym, PortMappingService::Upnp), t);
        assert_eq!(
            (e.path, e.reason),
            (
                Path::Direct,
                Reason::MappedPort {
                    side: Side::B,
                    service: PortMappingService::Upnp
                }
            )
        );
        assert_eq!(
            e.words("port-restricted-cone", "symmetric+upnp"),
            "symmetric+upnp's gateway maps it a port over UPnP IGD, so port-restricted-cone reaches it there like an open host"
        );
        assert_eq!(udp(sym, sym, t).path, Path::Relayed);
        assert_eq!(udp(prc, sym, t).path, Path::Relayed);
        // Two mapped sides: direct, A's mapping named.
        let both = udp(
            mapped(sym, PortMappingService::NatPmp),
            mapped(sym, PortMappingService::Upnp),
            t,
        );
        assert_eq!(
            both.reason,
            Reason::MappedPort {
                side: Side::A,
                service: PortMappingService::NatPmp
            }
        );
    }

    #[test]
    fn words_name_the_sides() {
        let e = udp(nat(Eim, Apdf, true), nat(Apdm, Apdf, false), PREDICT);
        assert_eq!(
            e.words("cone", "sym"),
            "towards sym: its APDM mapping towards the server admits only the server (APDF); \
             towards cone: its APDF filter admits only the reflexive port it sent to, and the APDM sender uses a new port"
        );
        let e = udp(nat(Eim, Apdf, true), nat(Apdm, Eif, false), PREDICT);
        assert_eq!(
            e.words("cone", "x"),
            "towards x: the packet passes but the answer comes from a new port the APDF sender's filter refuses; \
             towards cone: its APDF filter admits only the reflexive port it sent to, and the APDM sender uses a new port"
        );
        let e = udp(nat(Eim, Eif, true), nat(Apdm, Apdf, false), PREDICT);
        assert_eq!(
            e.words("full", "sym"),
            "sym → full opens and the answer returns; full → sym alone would not"
        );
        let e = udp(nat(Apdm, Adf, true), nat(Eim, Apdf, true), PREDICT);
        assert_eq!(e.reason, Reason::Predicted { predicted: Side::A });
        assert!(e
            .words("s", "c")
            .starts_with("s maps each destination to a new port"));
    }
}
