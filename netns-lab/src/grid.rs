//! `lab grid`: which peer-to-peer path two peers behind two presets should get — the outcome
//! derived from RFC 4787 / RFC 5382 reasoning, with its reason in words — and the two-peer
//! topology the grid runs it in. The runner (CLI) compares these expectations with what
//! `natscope punch` reports.
//!
//! The reasoning (NAT-REFERENCE.md, "Hole punching outcomes"): each peer registers with the
//! rendezvous server from one socket, so its *reflexive* address is its mapping towards the
//! server. Both then send to each other's reflexive address. A packet from A reaches B only if it
//! is aimed at a mapping B's NAT still routes to B (B's mapping towards the server; with an
//! address- or port-dependent mapping that one only admits the server) and B's filter admits A's
//! actual source — A's reflexive address when A's mapping is endpoint-independent, a fresh port
//! otherwise. Once a packet gets through, the receiver answers its real source, and that answer
//! must pass the first sender's filter. TCP adds that a socket in simultaneous open only accepts
//! segments from the exact address it connected to, so both mappings must be endpoint-independent.
//! Port prediction and the birthday technique are not assumed (they are off by default).

use natscope_core::nat::{FilteringBehavior as F, MappingBehavior as M};
use natscope_core::probe::Classic;
use serde::{Deserialize, Serialize};

use crate::presets;
use crate::topology::{NodeSpec, Topology};

/// How a pair connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Direct,
    Relayed,
    Failed,
}

/// One cell of `lab grid --json`: a pair of presets over one transport, what the reasoning
/// expects and what `natscope punch` did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GridCell {
    pub a: String,
    pub b: String,
    pub transport: Transport,
    pub expected: Outcome,
    /// `None` when the cell could not run.
    pub observed: Option<Outcome>,
    pub time_to_direct_ms: Option<f64>,
    pub messages_sent: u64,
    pub messages_echoed: u64,
    /// The expected outcome's reason (RFC 4787 / RFC 5382).
    pub reason: String,
    pub pass: bool,
    pub error: Option<String>,
    /// stderr of the two peers, kept for cells that did not go direct.
    pub diagnostics: Option<String>,
    /// The connector's full `natscope.punch/v1` report, kept for cells that did not pass.
    pub report: Option<serde_json::Value>,
    pub duration_ms: f64,
}

/// The `natscope.grid/v1` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GridDocument {
    pub schema: String,
    pub cells: Vec<GridCell>,
    pub pass: bool,
    pub duration_ms: f64,
}

/// Transport of a grid cell: the core's one [`Transport`].
pub use natscope_core::net::Transport;

/// The default grid (issue 5 must-show 2): the presets the preset table marks `grid`.
pub const DEFAULT_PRESETS: &[&str] = presets::GRID_PRESETS;

/// One peer's path to the internet, end to end (a nested NAT counts as its composition).
#[derive(Clone, Copy, Debug)]
struct Side {
    mapping: M,
    filtering: F,
    udp_blocked: bool,
}

fn side(preset: &str) -> Option<Side> {
    let e = presets::expected(preset)?;
    Some(Side {
        // No translation: the mapping is the identity, which is endpoint-independent.
        mapping: e.mapping.unwrap_or(M::EndpointIndependent),
        filtering: e.filtering.unwrap_or(F::EndpointIndependent),
        udp_blocked: e.classic == Classic::UdpBlocked,
    })
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

/// Whether `from`'s packets, sent to `to`'s reflexive address, reach `to`'s host; and why not.
fn opens(from: Side, to: Side) -> Result<(), String> {
    if to.filtering == F::EndpointIndependent {
        return Ok(());
    }
    if to.mapping != M::EndpointIndependent {
        return Err(format!(
            "its {} mapping towards the server admits only the server ({})",
            short_m(to.mapping),
            short_f(to.filtering)
        ));
    }
    match to.filtering {
        F::AddressDependent => Ok(()),
        _ if from.mapping == M::EndpointIndependent => Ok(()),
        _ => Err(format!(
            "its APDF filter admits only the reflexive port it sent to, and the {} sender uses a new port",
            short_m(from.mapping)
        )),
    }
}

/// Whether the answer of `to` (to the source it saw) passes `from`'s filter.
fn answer_passes(from: Side, to: Side) -> bool {
    to.mapping == M::EndpointIndependent || from.filtering != F::AddressAndPortDependent
}

/// The expected outcome of `punch connect` from a peer behind `a` to a peer behind `b`, and why.
pub fn expected(a: &str, b: &str, transport: Transport) -> Option<(Outcome, String)> {
    let (sa, sb) = (side(a)?, side(b)?);
    if transport == Transport::Udp && (sa.udp_blocked || sb.udp_blocked) {
        return Some((
            Outcome::Failed,
            "UDP is blocked, so neither a direct path nor the UDP relay exists".into(),
        ));
    }
    if transport == Transport::Tcp {
        return Some(
            if sa.mapping == M::EndpointIndependent && sb.mapping == M::EndpointIndependent {
                (
                    Outcome::Direct,
                    "both mappings are endpoint-independent, so each SYN comes from the address the other side connects to, and each filter admits it once its own SYN left (RFC 5382 simultaneous open)".into(),
                )
            } else {
                let sym = if sa.mapping != M::EndpointIndependent {
                    a
                } else {
                    b
                };
                (
                    Outcome::Relayed,
                    format!("{sym} maps the peer connection to a new port, and a TCP socket accepts segments only from the exact address it connected to"),
                )
            },
        );
    }
    let ab = opens(sa, sb);
    let ba = opens(sb, sa);
    let direct_ab = ab.is_ok() && answer_passes(sa, sb);
    let direct_ba = ba.is_ok() && answer_passes(sb, sa);
    Some(match (direct_ab, direct_ba) {
        (true, true) => (Outcome::Direct, "both directions open".into()),
        (true, false) => (
            Outcome::Direct,
            format!("{a} → {b} opens and the answer returns; {b} → {a} alone would not"),
        ),
        (false, true) => (
            Outcome::Direct,
            format!("{b} → {a} opens and the answer returns; {a} → {b} alone would not"),
        ),
        (false, false) => {
            let why = |r: Result<(), String>, to: &str| {
                match r {
                Err(e) => format!("towards {to}: {e}"),
                Ok(()) => format!("towards {to}: the packet passes but the answer comes from a new port the APDF sender's filter refuses"),
            }
            };
            (Outcome::Relayed, format!("{}; {}", why(ab, b), why(ba, a)))
        }
    })
}

/// A pair topology: reflector `stun`, and each preset's routers with `a`/`b` appended to their
/// names (`nat` → `nata`, `carrier` → `carriera`), its `h1` renamed to the peer (`a` or `b`).
pub fn pair_topology(a: &str, b: &str) -> Option<Topology> {
    let mut nodes = vec![NodeSpec::Reflector {
        name: "stun".into(),
    }];
    for (preset, peer) in [(a, "a"), (b, "b")] {
        let rename = |n: &str| {
            if n == "h1" {
                peer.to_string()
            } else {
                format!("{n}{peer}")
            }
        };
        for node in presets::preset(preset)?.nodes {
            match node {
                NodeSpec::Reflector { .. } => {}
                NodeSpec::Host { name, parent } if name == "h1" => nodes.push(NodeSpec::Host {
                    name: rename(&name),
                    parent: parent.as_deref().map(rename),
                }),
                NodeSpec::Host { .. } => {}
                NodeSpec::Nat {
                    name,
                    parent,
                    lan,
                    router,
                } => nodes.push(NodeSpec::Nat {
                    name: rename(&name),
                    parent: parent.as_deref().map(rename),
                    lan,
                    router,
                }),
            }
        }
    }
    Some(Topology {
        preset: Some(format!("grid:{a}+{b}")),
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    fn udp(a: &str, b: &str) -> Outcome {
        expected(a, b, Transport::Udp).unwrap().0
    }

    #[test]
    fn the_classic_udp_table() {
        // RFC 4787 reasoning; symmetric ↔ port-restricted fails (the cone admits only the port it
        // sent to), symmetric ↔ restricted works (ADF admits the symmetric NAT's new port).
        let rows = [
            ("full-cone", "symmetric", Direct),
            ("restricted-cone", "symmetric", Direct),
            ("port-restricted-cone", "symmetric", Relayed),
            ("port-restricted-cone", "port-restricted-cone", Direct),
            ("symmetric", "symmetric", Relayed),
            ("symmetric-sequential", "port-restricted-cone", Relayed),
            ("cgnat", "port-restricted-cone", Direct),
            ("cgnat", "symmetric", Relayed),
            ("address-dependent", "port-restricted-cone", Relayed),
            ("address-dependent", "full-cone", Direct),
            ("open", "symmetric", Direct),
            ("firewall", "symmetric", Relayed),
        ];
        for (a, b, want) in rows {
            assert_eq!(
                udp(a, b),
                want,
                "{a} ↔ {b}: {}",
                expected(a, b, Transport::Udp).unwrap().1
            );
            assert_eq!(udp(b, a), want, "{b} ↔ {a} (the table is symmetric)");
        }
        assert_eq!(udp("blocked", "full-cone"), Failed);
    }

    #[test]
    fn tcp_needs_two_endpoint_independent_mappings() {
        let tcp = |a, b| expected(a, b, Transport::Tcp).unwrap().0;
        assert_eq!(tcp("port-restricted-cone", "cgnat"), Direct);
        assert_eq!(tcp("full-cone", "symmetric"), Relayed);
        assert_eq!(tcp("symmetric-sequential", "symmetric-sequential"), Relayed);
    }

    #[test]
    fn every_reason_is_said() {
        for a in presets::names() {
            for b in presets::names() {
                for t in [Transport::Udp, Transport::Tcp] {
                    let (_, why) = expected(a, b, t).unwrap();
                    assert!(why.len() > 10, "{a} {b} {t:?}");
                }
            }
        }
        assert!(expected("nope", "open", Transport::Udp).is_none());
    }

    #[test]
    fn pair_topologies_plan() {
        for a in DEFAULT_PRESETS {
            for b in DEFAULT_PRESETS {
                let t = pair_topology(a, b).unwrap();
                let plan = t.plan().unwrap_or_else(|e| panic!("{a}+{b}: {e}"));
                let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
                assert!(names.contains(&"a") && names.contains(&"b") && names.contains(&"stun"));
            }
        }
        let t = pair_topology("cgnat", "open").unwrap().plan().unwrap();
        let a = t.nodes.iter().find(|n| n.name == "a").unwrap();
        assert_eq!(a.upstream.as_deref(), Some("nata"));
        let b = t.nodes.iter().find(|n| n.name == "b").unwrap();
        assert_eq!(b.upstream.as_deref(), Some("internet"));
    }
}
