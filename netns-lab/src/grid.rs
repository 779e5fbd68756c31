//! `lab grid`: which peer-to-peer path two peers behind two presets should get — the outcome
//! derived from RFC 4787 / RFC 5382 reasoning, with its reason in words — and the two-peer
//! topology the grid runs it in. The runner (CLI) compares these expectations with what
//! `natscope punch` reports.
//!
//! The reasoning is the traversal model's (`natscope_core::traversal`, RFC 4787 / RFC 5382), the
//! same the probe's outlook uses; this module only names the presets' end-to-end behaviors and
//! runs the model without port prediction (the grid's peers do not predict).

use natscope_core::nat::{FilteringBehavior as F, MappingBehavior as M};
use natscope_core::portmap::PortMappingService;
use natscope_core::probe::{AllocationPattern, Classic};
use natscope_core::punch::connector::ConnectReport;
use natscope_core::traversal::{self, Path, PeerNat, Techniques};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::presets;
use crate::topology::{NodeSpec, RouterKind, Topology};

/// How a pair connected: the path `natscope punch` reports, expected from the traversal model or
/// observed in a lab.
pub use natscope_core::punch::PathTaken;

/// One cell of `lab grid --json`: a pair of presets over one transport, what the reasoning
/// expects and what `natscope punch` did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GridCell {
    pub a: String,
    pub b: String,
    pub transport: Transport,
    pub expected: PathTaken,
    /// `None` when the cell could not run.
    pub observed: Option<PathTaken>,
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
    pub report: Option<ConnectReport>,
    pub duration_ms: f64,
    /// The path the lab saw its routers forward, judged as `lab grid --app` judges any program
    /// (`crate::app_run::observed_path`); a cell passes only when it agrees with `observed`.
    #[serde(default)]
    pub lab_observed: Option<PathTaken>,
    /// What the routers forwarded while `punch connect` ran.
    #[serde(default)]
    pub evidence: Option<crate::app_run::Evidence>,
    /// Where the cell's time went.
    #[serde(default)]
    pub durations: crate::app_run::Durations,
    /// The address family punch was restricted to in this cell (`lab grid --family`, issue 13);
    /// `None` in documents written before it was added (they were IPv4).
    #[serde(default)]
    pub family: Option<Family>,
}

impl GridCell {
    /// The cell's word in tables: ✓/✗, punch's path (with its time to direct), the expected
    /// path when it differs, and the lab's path when it saw another one.
    pub fn mark(&self) -> String {
        let o = match self.observed {
            Some(PathTaken::Direct) => match self.time_to_direct_ms {
                Some(ms) => format!("direct {ms:.0} ms"),
                None => "direct".into(),
            },
            Some(p) => p.to_string(),
            None => "error".into(),
        };
        let lab = match self.lab_observed {
            l if l == self.observed || self.observed.is_none() => String::new(),
            Some(l) => format!(" ⚑ lab saw {l}"),
            None => " ⚑ lab saw nothing".into(),
        };
        if self.pass {
            format!("✓ {o}{lab}")
        } else {
            format!("✗ {o} (want {}){lab}", self.expected)
        }
    }
}

/// The schema name of `lab grid --json`.
pub const SCHEMA: &str = "natscope.grid/v1";

/// The `natscope.grid/v1` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GridDocument {
    /// Always [`SCHEMA`].
    #[schemars(extend("const" = SCHEMA))]
    pub schema: String,
    /// The version of natscope that wrote the document; empty when read from a document
    /// written before it was added.
    #[serde(default)]
    pub natscope_version: String,
    pub cells: Vec<GridCell>,
    pub pass: bool,
    pub duration_ms: f64,
}

/// Transport of a grid cell: the core's one [`Transport`].
pub use natscope_core::net::Transport;

/// The default grid (issue 5 must-show 2): the presets the preset table marks `grid`.
pub const DEFAULT_PRESETS: &[&str] = presets::GRID_PRESETS;

/// The presets a grid pairs: `given`, or [`DEFAULT_PRESETS`] when none are given; an unknown
/// one is an error naming the known ones.
pub fn preset_names(given: &[String]) -> Result<Vec<String>, String> {
    if given.is_empty() {
        return Ok(DEFAULT_PRESETS.iter().map(|s| s.to_string()).collect());
    }
    match given.iter().find(|n| pair_topology(n, n).is_none()) {
        Some(n) => Err(format!(
            "unknown preset `{n}`; presets: {}",
            presets::names().join(", ")
        )),
        None => Ok(given.to_vec()),
    }
}

/// Checks a grid's lab name prefix (`--lab-prefix`): 1-4 characters a-z, 0-9, so every cell's lab
/// name stays within the lab name rules.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = (1..=4).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err("--lab-prefix must be 1-4 characters a-z, 0-9".into())
    }
}

/// The techniques the grid's peers use: `natscope punch`'s own defaults (port prediction on both
/// sides over UDP), from the one place the punch machines take them too.
const TECHNIQUES: Techniques = Techniques::PUNCH;

/// One peer's path to the internet, end to end (a nested NAT counts as its composition), as the
/// traversal model sees it: no translation is the identity mapping, which is endpoint-independent,
/// and no filter is endpoint-independent filtering.
pub fn side(preset: &str) -> Option<PeerNat> {
    let e = presets::expected(preset)?;
    Some(PeerNat {
        mapping: Some(e.mapping.unwrap_or(M::EndpointIndependent)),
        filtering: Some(e.filtering.unwrap_or(F::EndpointIndependent)),
        // Every preset's NAT has a single external address, so a preserving or sequential
        // allocation is predictable (the rule the probe applies for its outlook).
        predictable_ports: matches!(
            e.allocation,
            AllocationPattern::Preserving | AllocationPattern::Sequential
        ),
        udp_blocked: e.classic == Classic::UdpBlocked,
        port_mapping: mapped_service(preset),
    })
}

/// An address family of a grid cell (`lab grid --family`): the core's one [`Family`].
pub use natscope_core::probe::family::Family;

/// `--family`'s values: `ipv4` or `ipv6` (also `4`, `6`).
pub fn parse_family(s: &str) -> Result<Family, String> {
    match s {
        "ipv4" | "4" => Ok(Family::Ipv4),
        "ipv6" | "6" => Ok(Family::Ipv6),
        _ => Err(format!("{s:?}: expected ipv4 or ipv6")),
    }
}

/// One peer's path to the IPv6 internet, as the traversal model sees it: the preset's IPv6 truth
/// (the matrix's, [`presets::Expected::ipv6`]) — an RFC 6092 firewall or NPTv6 is an
/// endpoint-independent mapping plus its filtering, NAT66 the preset's RFC 4787 knobs — and no
/// IPv6 path at all is a blocked side. `None` where the table does not say.
pub fn side6(preset: &str) -> Option<PeerNat> {
    let e = presets::expected(preset)?;
    match e.ipv6 {
        presets::Ipv6Truth::NotCompared => None,
        presets::Ipv6Truth::NoPath => Some(PeerNat {
            udp_blocked: true,
            ..PeerNat::default()
        }),
        presets::Ipv6Truth::Present {
            mapping,
            filtering,
            translation,
        } => Some(PeerNat {
            mapping: Some(mapping),
            filtering: Some(filtering),
            // No translation and NPTv6 keep every port; NAT66 allocates as the preset's IPv4 side.
            predictable_ports: translation != natscope_core::probe::Translation::Nat66
                || matches!(
                    e.allocation,
                    AllocationPattern::Preserving | AllocationPattern::Sequential
                ),
            ..PeerNat::default()
        }),
    }
}

/// [`expected`] in one address family: the same traversal model fed with the routers' behavior
/// in that family ([`side`] for IPv4, [`side6`] for IPv6).
pub fn expected_in(
    a: &str,
    b: &str,
    transport: Transport,
    family: Family,
) -> Option<(PathTaken, String)> {
    if family == Family::Ipv4 {
        return expected(a, b, transport);
    }
    let v6 = expected_between((a, side6(a)?), (b, side6(b)?), transport)?;
    // No IPv6 path on a side blocks only the direct path: the relay is the server's, over IPv4.
    let no_path = |p: &str| side6(p).is_some_and(|s| s.udp_blocked);
    if v6.0 == PathTaken::Failed && (no_path(a) || no_path(b)) {
        if let Some((PathTaken::Direct | PathTaken::Relayed, _)) = expected(a, b, transport) {
            let why = format!("{}; the relay, over IPv4, carries the data", v6.1);
            return Some((PathTaken::Relayed, why));
        }
    }
    Some(v6)
}

/// A grid table's corner and a failed cell's tag: the transport (`udp`), with the family when
/// the grid has several (`udp ipv6`).
pub fn section(t: Transport, family: Family, with_family: bool) -> String {
    if with_family {
        format!("{} {}", t.as_str(), family.label().to_lowercase())
    } else {
        t.as_str().to_string()
    }
}

/// A failed cell's family after its transport (` IPv6`), when the grid has several families.
pub fn family_tag(c: &GridCell, with_family: bool) -> String {
    match c.family {
        Some(f) if with_family => format!(" {}", f.label()),
        _ => String::new(),
    }
}

impl GridDocument {
    /// The cell of `x` × `y` (either order) over `t` in `family` (a cell without a family is
    /// IPv4's).
    pub fn cell(&self, t: Transport, family: Family, x: &str, y: &str) -> Option<&GridCell> {
        self.cells.iter().find(|c| {
            c.transport == t
                && c.family.unwrap_or(Family::Ipv4) == family
                && ((c.a == x && c.b == y) || (c.a == y && c.b == x))
        })
    }
}

/// The port-mapping service a peer behind `preset` gets a working mapping from (issue 12): the
/// best its routers serve (PCP > NAT-PMP > UPnP IGD, the order `natscope punch` asks in), and
/// none when a second NAT beyond the mapping router undoes it (`double-nat+all`, `cgnat+all`:
/// the carrier maps nothing).
pub fn mapped_service(preset: &str) -> Option<PortMappingService> {
    let truth = presets::expected(preset)?.port_mapping?;
    if truth.double_nat {
        return None;
    }
    let mut served: Vec<PortMappingService> = presets::preset(preset)?
        .nodes
        .into_iter()
        .flat_map(|n| match n {
            NodeSpec::Nat {
                port_mapping,
                router,
                ..
            } => match router {
                RouterKind::Engine(cfg) => [port_mapping, cfg.port_mapping].concat(),
                RouterKind::Linux => port_mapping,
            },
            _ => Vec::new(),
        })
        .collect();
    served.sort_by_key(|s| match s {
        PortMappingService::Pcp => 0,
        PortMappingService::NatPmp => 1,
        PortMappingService::Upnp => 2,
    });
    served.first().copied()
}

/// The grid's outcome for a traversal path; `None` when the model cannot say.
fn outcome(path: Path) -> Option<PathTaken> {
    match path {
        // A predicted port is a direct path too.
        Path::Direct | Path::PortPrediction => Some(PathTaken::Direct),
        Path::Relayed => Some(PathTaken::Relayed),
        Path::Blocked => Some(PathTaken::Failed),
        Path::Unknown => None,
    }
}

/// The expected outcome of `punch connect` from a peer behind `a` to a peer behind `b` (NATs
/// named `a.0` and `b.0` in the reason), and why: the traversal model's path with the techniques
/// `natscope punch` uses by default ([`Techniques::PUNCH`]).
pub fn expected_between(
    a: (&str, PeerNat),
    b: (&str, PeerNat),
    transport: Transport,
) -> Option<(PathTaken, String)> {
    let e = match transport {
        Transport::Udp => traversal::udp(a.1, b.1, TECHNIQUES),
        Transport::Tcp => traversal::tcp(a.1, b.1),
    };
    Some((outcome(e.path)?, e.words(a.0, b.0)))
}

/// The expected outcome of `punch connect` from a peer behind preset `a` to a peer behind preset
/// `b`, and why.
pub fn expected(a: &str, b: &str, transport: Transport) -> Option<(PathTaken, String)> {
    let (path, why) = expected_between((a, side(a)?), (b, side(b)?), transport)?;
    match birthday(a, b, transport) {
        Some(plan) => Some((
            path,
            format!(
                "{why}; the birthday technique may open it directly: {} opens {} sockets, the other \
                 probes {} random ports, P(direct) = {:.0} %, at most {} packets",
                if plan.hard == traversal::Side::A { a } else { b },
                plan.sockets,
                plan.probes,
                plan.success * 100.0,
                plan.packet_bound
            ),
        )),
        None => Some((path, why)),
    }
}

/// Whether `observed` is a passing path for the cell `a` × `b` expected to take `expected`: that
/// path, or — in an IPv4 cell the model relays where the birthday technique applies
/// ([`birthday`]) — a direct one. The built-in grid, the app grid and the tests judge with this.
pub fn path_accepted(
    a: &str,
    b: &str,
    transport: Transport,
    family: Option<Family>,
    expected: PathTaken,
    observed: Option<PathTaken>,
) -> bool {
    observed == Some(expected)
        || (observed == Some(PathTaken::Direct)
            && expected == PathTaken::Relayed
            && family != Some(Family::Ipv6)
            && birthday(a, b, transport).is_some())
}

/// The birthday opening `natscope punch` tries between peers behind `a` and `b` (UDP, IPv4: a
/// random-symmetric side facing an endpoint-independent one, a pair the plain punch relays), with
/// the probes punch sends by default. A cell it applies to passes relayed or direct: the technique
/// succeeds with the plan's probability, and the relay carries the rest.
pub fn birthday(a: &str, b: &str, transport: Transport) -> Option<traversal::BirthdayPlan> {
    if transport != Transport::Udp {
        return None;
    }
    let probes = u32::try_from(natscope_core::punch::peer::birthday_probes()).ok()?;
    traversal::birthday(side(a)?, side(b)?, probes)
}

/// A pair topology: the public host `rendezvous` (a reflector, so it also answers STUN), and each
/// preset's routers with `a`/`b` appended to their
/// names (`nat` → `nata`, `carrier` → `carriera`), its `h1` renamed to the peer (`a` or `b`).
pub fn pair_topology(a: &str, b: &str) -> Option<Topology> {
    let mut nodes = vec![NodeSpec::Reflector {
        name: "rendezvous".into(),
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
                    port_mapping,
                } => nodes.push(NodeSpec::Nat {
                    name: rename(&name),
                    parent: parent.as_deref().map(rename),
                    lan,
                    router,
                    port_mapping,
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
    use natscope_core::probe::report::{outlook_row, outlook_with, Behavior, NatShape, PEERS};
    use PathTaken::*;

    fn udp(a: &str, b: &str) -> PathTaken {
        expected(a, b, Transport::Udp).unwrap().0
    }

    /// What a probe run behind preset `name` feeds its outlook (`presets::expected` is the truth
    /// `lab matrix` holds the probe to): no translation reads as endpoint-independent, a blocked
    /// path shows no behavior at all.
    fn probe_view(name: &str) -> NatShape {
        let e = presets::expected(name).unwrap();
        let blocked = e.classic == Classic::UdpBlocked;
        NatShape {
            mapping: match e.mapping {
                Some(m) => m.into(),
                None if blocked => Behavior::Unknown,
                None => Behavior::EndpointIndependent,
            },
            filtering: e.filtering.map_or(Behavior::Unknown, Behavior::from),
            predictable: matches!(
                e.allocation,
                AllocationPattern::Preserving | AllocationPattern::Sequential
            ),
        }
    }

    /// Whether the outlook's `direct_udp` word and the grid's outcome say the same thing. Punch
    /// predicts ports by default, so where the outlook needs prediction the grid goes direct; a
    /// probe behind a blocked path knows no behavior, where the grid knows nothing connects.
    fn agree(direct_udp: &str, grid: Option<PathTaken>) -> bool {
        matches!(
            (direct_udp, grid),
            ("yes" | "with-port-prediction", Some(Direct))
                | ("no", Some(Relayed))
                | ("unknown", Some(Failed) | None)
        )
    }

    /// Issue 12, must-show 4: the port-mapping presets' expectations come from the traversal
    /// model with punch's techniques; a second NAT beyond the mapping router gets no credit.
    #[test]
    fn port_mapping_presets_expect_direct_through_the_mapped_port() {
        let (path, reason) = expected("symmetric+pcp", "symmetric", Transport::Udp).unwrap();
        assert_eq!(path, Direct);
        assert_eq!(
            reason,
            "symmetric+pcp's gateway maps it a port over PCP, so symmetric reaches it there like an open host"
        );
        let (path, reason) =
            expected("symmetric+upnp", "port-restricted-cone", Transport::Udp).unwrap();
        assert_eq!(path, Direct);
        assert!(reason.contains("over UPnP IGD"), "{reason}");
        assert_eq!(udp("symmetric", "symmetric"), Relayed);
        assert_eq!(udp("symmetric", "port-restricted-cone"), Relayed);
        assert_eq!(
            expected("symmetric+pcp", "symmetric", Transport::Tcp)
                .unwrap()
                .0,
            Relayed,
            "the mapping is UDP"
        );
        assert_eq!(
            mapped_service("symmetric+pcp"),
            Some(PortMappingService::Pcp)
        );
        assert_eq!(
            mapped_service("full-cone+nat-pmp"),
            Some(PortMappingService::NatPmp)
        );
        assert_eq!(mapped_service("double-nat+all"), None);
        assert_eq!(mapped_service("cgnat+all"), None);
        assert_eq!(mapped_service("symmetric"), None);
        assert!(preset_names(&["symmetric+pcp".into(), "symmetric+upnp".into()]).is_ok());
    }

    #[test]
    fn outlook_and_grid_agree_on_every_behavior_pair() {
        let behaviors = [
            Behavior::EndpointIndependent,
            Behavior::AddressDependent,
            Behavior::AddressAndPortDependent,
            Behavior::Unknown,
        ];
        let mut shapes = Vec::new();
        for mapping in behaviors {
            for filtering in behaviors {
                for predictable in [true, false] {
                    shapes.push(NatShape {
                        mapping,
                        filtering,
                        predictable,
                    });
                }
            }
        }
        let mut compared = 0;
        for &us in &shapes {
            for &them in &shapes {
                let row = outlook_row(us, "them", them);
                let grid =
                    expected_between(("us", us.into()), ("them", them.into()), Transport::Udp);
                assert!(
                    agree(row.direct_udp, grid.as_ref().map(|g| g.0)),
                    "us {us:?}, them {them:?}: outlook {row:?}, grid {grid:?}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 32 * 32);
    }

    #[test]
    fn outlook_and_grid_agree_on_every_preset_pair() {
        for a in presets::names() {
            // The probe reports its own gateway's mapping (`port_mapping`), and its outlook
            // counts it (issue 12); the outlook's peers are NATs that map nothing.
            let rows = outlook_with(probe_view(a), mapped_service(a));
            for (row, &(peer, shape)) in rows.iter().zip(PEERS.iter()) {
                assert_eq!(row.peer, peer);
                // Every preset whose probe would report this outlook peer's NAT.
                let bs: Vec<&str> = presets::names()
                    .iter()
                    .copied()
                    .filter(|b| probe_view(b) == shape && mapped_service(b).is_none())
                    .collect();
                assert!(!bs.is_empty(), "no preset is the outlook's {peer}");
                for b in bs {
                    let grid = expected(a, b, Transport::Udp);
                    assert!(
                        agree(row.direct_udp, grid.as_ref().map(|g| g.0)),
                        "{a} with peer {peer} ({b}): outlook {row:?}, grid {grid:?}"
                    );
                }
            }
        }
    }

    /// The generated part of docs/lab.md's "Grid" section: both transports' outcome tables over
    /// the default presets and every cell's reason, all from [`expected`].
    fn doc_tables() -> String {
        let names = DEFAULT_PRESETS;
        let word = PathTaken::as_str;
        let mut out = String::new();
        for (label, t) in [("UDP", Transport::Udp), ("TCP", Transport::Tcp)] {
            out += &format!("| {label} | {} |\n", names.join(" | "));
            out += &format!("|---|{}\n", "---|".repeat(names.len()));
            for (i, a) in names.iter().enumerate() {
                out += &format!("| {a} |");
                for (j, b) in names.iter().enumerate() {
                    match j < i {
                        true => out += " |",
                        false => out += &format!(" {} |", word(expected(a, b, t).unwrap().0)),
                    }
                }
                out += "\n";
            }
            out += "\n";
        }
        out += "| a | b | transport | expected | reason |\n|---|---|---|---|---|\n";
        for (label, t) in [("udp", Transport::Udp), ("tcp", Transport::Tcp)] {
            for (i, a) in names.iter().enumerate() {
                for b in &names[i..] {
                    let (o, why) = expected(a, b, t).unwrap();
                    out += &format!("| {a} | {b} | {label} | {} | {why} |\n", word(o));
                }
            }
        }
        out
    }

    /// docs/lab.md's grid tables are the model's: regenerate them with
    /// `NATSCOPE_BLESS_DOCS=1 cargo test -p natscope-lab --lib grid_docs`.
    #[test]
    fn grid_docs_are_the_models() {
        const BEGIN: &str = "<!-- grid tables: generated from natscope_core::traversal by natscope-lab's grid_docs_are_the_models test -->\n";
        const END: &str = "<!-- end of grid tables -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/lab.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let start = doc
            .find(BEGIN)
            .expect("docs/lab.md has the grid tables' begin marker")
            + BEGIN.len();
        let len = doc[start..]
            .find(END)
            .expect("docs/lab.md has the end marker");
        let want = doc_tables();
        if doc[start..start + len] != want {
            if std::env::var_os("NATSCOPE_BLESS_DOCS").is_some() {
                let new = format!("{}{want}{}", &doc[..start], &doc[start + len..]);
                std::fs::write(path, new).unwrap();
            } else {
                panic!(
                    "docs/lab.md's grid tables differ from the model; they should read:\n{want}"
                );
            }
        }
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
            // Punch predicts by default: the cone aims at the sequential NAT's next port.
            ("symmetric-sequential", "port-restricted-cone", Direct),
            // Two address-and-port-dependent mappings: no prediction joins them.
            ("symmetric-sequential", "symmetric", Relayed),
            ("symmetric-sequential", "symmetric-sequential", Relayed),
            ("cgnat", "port-restricted-cone", Direct),
            ("cgnat", "symmetric", Relayed),
            // Its allocation is predictable, so prediction opens it too.
            ("address-dependent", "port-restricted-cone", Direct),
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
                assert!(
                    names.contains(&"a") && names.contains(&"b") && names.contains(&"rendezvous")
                );
            }
        }
        let t = pair_topology("cgnat", "open").unwrap().plan().unwrap();
        let a = t.nodes.iter().find(|n| n.name == "a").unwrap();
        assert_eq!(a.upstream.as_deref(), Some("nata"));
        let b = t.nodes.iter().find(|n| n.name == "b").unwrap();
        assert_eq!(b.upstream.as_deref(), Some("internet"));
    }

    /// Issue 13: the IPv6 cells' expectations come from the same model, fed with the presets'
    /// IPv6 truth: a pair relayed on IPv4 (symmetric both sides) is direct on IPv6 behind the
    /// default EIF firewalls; APDF firewalls (EIM, no translation) are direct because both
    /// punch; NPTv6 keeps ports (EIM); no IPv6 on a side leaves the relay.
    #[test]
    fn ipv6_cells_follow_the_model_on_the_presets_ipv6_behavior() {
        let path = |a, b, f| expected_in(a, b, Transport::Udp, f).unwrap().0;
        let v4 = Family::Ipv4;
        let v6 = Family::Ipv6;
        assert_eq!(path("symmetric", "symmetric", v4), Relayed);
        assert_eq!(path("symmetric", "symmetric", v6), Direct);
        for p in ["dual-stack", "dual-stack-strict", "nptv6", "symmetric"] {
            for q in ["dual-stack", "dual-stack-strict", "nptv6", "symmetric"] {
                assert_eq!(path(p, q, v6), Direct, "{p} × {q}");
            }
        }
        assert_eq!(path("ipv4-only", "dual-stack", v6), Relayed);
        // IPv4 cells are the grid's as before.
        for p in DEFAULT_PRESETS {
            for q in DEFAULT_PRESETS {
                let t = Transport::Udp;
                assert_eq!(expected_in(p, q, t, v4), expected(p, q, t), "{p} × {q}");
            }
        }
        // The IPv6 side is the matrix's truth, not a second table.
        let strict = side6("dual-stack-strict").unwrap();
        assert_eq!(strict.filtering, Some(F::AddressAndPortDependent));
        assert_eq!(
            side6("dual-stack").unwrap().filtering,
            Some(F::EndpointIndependent)
        );
    }
}
