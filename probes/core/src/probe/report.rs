//! What a probe concludes, as data: the `natscope.probe/v1` document (docs/probe.md), the classic
//! RFC 3489 name derived from the RFC 5780 results, and the traversal outlook (the traversal
//! model's UDP path towards common peer NATs, [`crate::traversal`]). Every verdict is a named value
//! or `unknown` with a reason; nothing is guessed.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::evidence::Schedule;
use super::pacing::Pacing;
use crate::nat::{FilteringBehavior, MappingBehavior};
use crate::portmap::{PortMappingReport, PortMappingService};
use crate::traversal::{self, Path, PeerNat, Techniques};

pub const SCHEMA: &str = "natscope.probe/v1";

/// A mapping or filtering verdict (RFC 4787 terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Behavior {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
    Unknown,
}

impl Behavior {
    pub fn short(self) -> &'static str {
        match self {
            Self::EndpointIndependent => "endpoint-independent",
            Self::AddressDependent => "address-dependent",
            Self::AddressAndPortDependent => "address-and-port-dependent",
            Self::Unknown => "unknown",
        }
    }
}

impl From<MappingBehavior> for Behavior {
    fn from(m: MappingBehavior) -> Self {
        match m {
            MappingBehavior::EndpointIndependent => Self::EndpointIndependent,
            MappingBehavior::AddressDependent => Self::AddressDependent,
            MappingBehavior::AddressAndPortDependent => Self::AddressAndPortDependent,
        }
    }
}

impl From<FilteringBehavior> for Behavior {
    fn from(f: FilteringBehavior) -> Self {
        match f {
            FilteringBehavior::EndpointIndependent => Self::EndpointIndependent,
            FilteringBehavior::AddressDependent => Self::AddressDependent,
            FilteringBehavior::AddressAndPortDependent => Self::AddressAndPortDependent,
        }
    }
}

/// RFC 5780 §4.3 behind a NAT, from the mapped addresses seen via A1:P1, A2:P1 and A2:P2: M2 == M1
/// → endpoint-independent; else M3 == M2 → address-dependent; else address-and-port-dependent.
/// Missing or self-contradicting answers give `unknown`; the string says why (empty for a clean
/// verdict). The UDP plan and the TCP test ([`super::tcp::classify`]) both compare with it.
pub(crate) fn compare_mappings(
    m1: SocketAddr,
    m2: Option<SocketAddr>,
    m3: Option<SocketAddr>,
) -> (Behavior, &'static str) {
    match (m2, m3) {
        (Some(m2), Some(m3)) if m2 == m1 && m3 == m1 => (Behavior::EndpointIndependent, ""),
        (Some(m2), Some(_)) if m2 == m1 => (
            Behavior::Unknown,
            "inconsistent: same mapping for A2:P1 but not A2:P2",
        ),
        (Some(m2), Some(m3)) if m3 == m2 => (Behavior::AddressDependent, ""),
        (Some(_), Some(m3)) if m3 != m1 => (Behavior::AddressAndPortDependent, ""),
        (Some(_), Some(_)) => (Behavior::Unknown, "inconsistent: A2:P2 saw M1 again"),
        _ => (Behavior::Unknown, "the alternate address did not answer"),
    }
}

/// RFC 3489 §10.1 names, plus the cases it has none for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Classic {
    OpenInternet,
    FullCone,
    RestrictedCone,
    PortRestrictedCone,
    Symmetric,
    SymmetricUdpFirewall,
    UdpBlocked,
    NoClassicName,
    Unknown,
}

impl Classic {
    /// Derives the classic name. `nat` is `None` when NAT presence is unknown.
    pub fn derive(
        udp_blocked: bool,
        nat: Option<bool>,
        mapping: Behavior,
        filtering: Behavior,
    ) -> Self {
        use Behavior::*;
        if udp_blocked {
            return Self::UdpBlocked;
        }
        match (nat, mapping, filtering) {
            (None, _, _) => Self::Unknown,
            (Some(false), _, EndpointIndependent) => Self::OpenInternet,
            (Some(false), _, AddressDependent | AddressAndPortDependent) => {
                Self::SymmetricUdpFirewall
            }
            (Some(false), _, Unknown) => Self::Unknown,
            (Some(true), EndpointIndependent, EndpointIndependent) => Self::FullCone,
            (Some(true), EndpointIndependent, AddressDependent) => Self::RestrictedCone,
            (Some(true), EndpointIndependent, AddressAndPortDependent) => Self::PortRestrictedCone,
            (Some(true), AddressDependent | AddressAndPortDependent, EndpointIndependent) => {
                Self::NoClassicName
            }
            (
                Some(true),
                AddressDependent | AddressAndPortDependent,
                AddressDependent | AddressAndPortDependent,
            ) => Self::Symmetric,
            (Some(true), _, _) => Self::Unknown,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::OpenInternet => "Open internet (no NAT, no filtering)",
            Self::FullCone => "Full cone NAT",
            Self::RestrictedCone => "Restricted cone NAT",
            Self::PortRestrictedCone => "Port-restricted cone NAT",
            Self::Symmetric => "Symmetric NAT",
            Self::SymmetricUdpFirewall => "No NAT, behind a stateful UDP firewall",
            Self::UdpBlocked => "UDP blocked",
            Self::NoClassicName => "NAT with no classic RFC 3489 name",
            Self::Unknown => "Unknown",
        }
    }
}

/// How external ports are chosen (RFC 4787 §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AllocationPattern {
    Preserving,
    Sequential,
    Random,
    Unknown,
}

/// RFC 4787 §4.1 / REQ-2 IP address pooling as seen from one host: whether its mappings all got
/// the same external address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AddressPooling {
    /// Every mapping of this host got the same external address (REQ-2's "paired", which a NAT
    /// with a single external address meets trivially).
    Paired,
    /// Fresh sockets of this host were mapped to different external addresses.
    Arbitrary,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortAllocationReport {
    pub pattern: AllocationPattern,
    /// The constant difference between consecutive new mappings, for `sequential`.
    pub delta: Option<i32>,
    /// (local port, external port) of each sample, in allocation order.
    pub samples: Vec<(u16, u16)>,
    /// Plain statement of how predictable the next external port is.
    pub predictability: String,
}

/// One test's row: verdict, the evidence behind it, and its cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TestReport {
    pub name: String,
    pub verdict: String,
    pub evidence: String,
    pub requests_sent: u32,
    pub duration_ms: f64,
    /// Answers this test's requests received (first answers and late ones to retransmissions;
    /// a hairpinned request that arrived counts as one); `None` for rows derived from other
    /// tests' answers and for rows that do not count them.
    #[serde(default)]
    pub answers: Option<u32>,
    /// For a verdict that rests on missing answers (filtering dependent, hairpinning `no`): the
    /// chance that every transmission was lost although an answer was due; `None` otherwise.
    #[serde(default)]
    pub miss_chance: Option<f64>,
}

/// `d` in seconds for people: `5 s`, `2.5 s`.
pub fn seconds(d: std::time::Duration) -> String {
    format!("{} s", (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

impl TestReport {
    /// The row of a test made of the transactions scheduled as `scheds`: their transmissions, and
    /// the time from the first transmission of any of them to the end of the last.
    pub(crate) fn over<'a>(
        name: &str,
        verdict: String,
        evidence: String,
        scheds: impl Iterator<Item = &'a Schedule>,
    ) -> Self {
        let scheds: Vec<&Schedule> = scheds.collect();
        let start = scheds.iter().filter_map(|s| s.first_sent).min();
        let stop = scheds.iter().filter_map(|s| s.done_at).max();
        Self {
            name: name.into(),
            verdict,
            evidence,
            requests_sent: scheds.iter().map(|s| s.transmits).sum(),
            duration_ms: match (start, stop) {
                (Some(a), Some(b)) => ms(b.saturating_duration_since(a)),
                _ => 0.0,
            },
            answers: None,
            miss_chance: None,
        }
    }
}

use crate::ms;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServerReport {
    pub address: SocketAddr,
    pub other_address: Option<SocketAddr>,
    /// Problems of the server (or of something rewriting its answers); each one withholds the
    /// verdicts that depended on it.
    pub problems: Vec<String>,
    /// Problems left out of `problems`, which lists at most 16 (added to v1 after `problems`).
    #[serde(default)]
    pub problems_omitted: u32,
}

/// Whether a direct UDP path should open between us and a peer behind `peer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OutlookRow {
    /// One of the common peer NATs ([`PEERS`]).
    #[serde(deserialize_with = "peer_name")]
    #[schemars(schema_with = "peer_names")]
    pub peer: Static,
    /// `yes`, `no`, `with-port-prediction`, or `unknown`.
    #[serde(deserialize_with = "direct_udp_value")]
    #[schemars(extend("enum" = DIRECT_UDP))]
    pub direct_udp: Static,
    pub reason: String,
}

/// The whole probe result (`natscope.probe/v1`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProbeReport {
    /// Always [`SCHEMA`]: a document of another schema does not deserialize.
    #[serde(deserialize_with = "schema_v1")]
    #[schemars(extend("const" = SCHEMA))]
    pub schema: Static,
    /// The version of natscope that wrote the document ([`crate::document`]); empty when read
    /// from a document written before it was added.
    #[serde(default)]
    pub natscope_version: String,
    pub local_address: Option<SocketAddr>,
    pub public_address: Option<SocketAddr>,
    pub nat_detected: Option<bool>,
    pub udp_blocked: bool,
    pub mapping: Behavior,
    pub filtering: Behavior,
    pub port_preservation: Option<bool>,
    pub port_allocation: PortAllocationReport,
    pub hairpinning: Option<bool>,
    pub binding_lifetime_s: Option<f64>,
    pub tcp_mapping: Behavior,
    pub alg_detected: Option<bool>,
    pub classic: Classic,
    pub server: ServerReport,
    pub tests: Vec<TestReport>,
    pub outlook: Vec<OutlookRow>,
    /// Estimated round-trip loss and the chance a negative verdict is wrong because of it.
    pub loss_estimate: f64,
    pub negative_confidence: Option<f64>,
    /// Time the negative tests waited before concluding, in ms (the retry budget).
    pub retry_budget_ms: f64,
    pub summary: String,
    /// Every request the probe sent, all tests together (rows may share requests).
    pub requests_sent: u32,
    pub duration_ms: f64,
    /// RFC 5780 §5 pacing of new transactions during the run (added to v1 last, after
    /// `duration_ms`, so documents keep their field order).
    pub pacing: Pacing,
    /// External address pooling seen across this host's mappings; `None` without a NAT or
    /// with fewer than two mapped addresses to compare (added to v1 after `pacing`).
    pub address_pooling: Option<AddressPooling>,
    /// `--tcp`: whether every TCP mapping kept the local port (`None` without `--tcp` or an
    /// answer; added to v1 after `address_pooling`).
    pub tcp_port_preservation: Option<bool>,
    /// The bound the run was held to (`--max-time`), in ms (added to v1 after
    /// `tcp_port_preservation`).
    pub max_time_ms: f64,
    /// The run stopped at `max_time_ms` with tests still open; their verdicts are `unknown`.
    pub time_bound_reached: bool,
    /// Transmissions of answered requests that `loss_estimate` is measured over.
    pub loss_transmissions: u32,
    // Port mapping (issue 12; added to v1 after `loss_transmissions`).
    /// What the default gateway's port-mapping services said (`null` with `--no-port-mapping`).
    #[serde(default)]
    pub port_mapping: Option<PortMappingReport>,
    /// Two NATs in a row: the gateway's external address is private or shared, differs from the
    /// STUN-mapped address, or PCP said ADDRESS_MISMATCH; `null` without evidence either way.
    #[serde(default)]
    pub double_nat: Option<bool>,
    /// A carrier-grade NAT: the mapped or external address is in 100.64.0.0/10, or a second
    /// translation is seen beyond a non-private address; `null` without evidence either way.
    #[serde(default)]
    pub cgnat: Option<bool>,
}

impl ProbeReport {
    /// `natscope probe`'s exit status: 0 when a classification was made; 1 when UDP is blocked or
    /// the classic name is unknown.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.udp_blocked || self.classic == Classic::Unknown)
    }
}

// Port mapping (issue 12): the section's verdicts and table rows.
impl ProbeReport {
    /// Adds the port-mapping section: judges the claimed external addresses against the STUN
    /// mapped address ([`PortMappingReport::judge`]), sets `double_nat` and `cgnat`, and adds a
    /// working mapped port to the outlook's reasoning ([`outlook_with`]): one `--map` verified
    /// inbound, or without `--map` a protocol that can map, answering behind a single NAT.
    pub fn apply_port_mapping(&mut self, mut pm: PortMappingReport) {
        let v = pm.judge(
            self.public_address.map(|a| a.ip()),
            self.local_address.map(|a| a.ip()),
        );
        self.double_nat = v.double_nat;
        self.cgnat = v.cgnat;
        // A mapping `--map` verified; without one, a service that can map behind a single NAT.
        let working = match &pm.mapped {
            Some(m) => m.inbound_verified.then_some(m.protocol),
            None => pm.best_service().filter(|_| v.double_nat == Some(false)),
        };
        if let Some(service) = working {
            let us = NatShape {
                mapping: self.mapping,
                filtering: self.filtering,
                predictable: matches!(
                    self.port_allocation.pattern,
                    AllocationPattern::Preserving | AllocationPattern::Sequential
                ),
            };
            self.outlook = outlook_with(us, Some(service));
            let name = match service {
                PortMappingService::Pcp => "PCP",
                PortMappingService::NatPmp => "NAT-PMP",
                PortMappingService::Upnp => "UPnP",
            };
            self.summary += &format!(
                "; {name} available: the gateway hands out mappings, so direct connections work with every peer type"
            );
        }
        match (v.double_nat, v.cgnat) {
            (_, Some(true)) => {
                self.summary += "; carrier-grade NAT (RFC 6598 space or a second translation)"
            }
            (Some(true), _) => self.summary += "; double NAT (the gateway is behind another NAT)",
            _ => {}
        }
        self.port_mapping = Some(pm);
    }

    /// The port-mapping section as rows of the tests table: one per protocol, one for the mapped
    /// port, one for the path verdicts (problems in its evidence). Empty without the section.
    pub fn port_mapping_rows(&self) -> Vec<TestReport> {
        let Some(pm) = &self.port_mapping else {
            return Vec::new();
        };
        let row = |name: String, verdict: &str, evidence: String| TestReport {
            name,
            verdict: verdict.into(),
            evidence,
            requests_sent: 0,
            duration_ms: 0.0,
            answers: None,
            miss_chance: None,
        };
        let mut rows = Vec::new();
        for service in crate::portmap::PortMappingService::ALL {
            let Some(s) = pm.services.iter().find(|s| s.service == service) else {
                rows.push(row(service.to_string(), "not probed", "-".into()));
                continue;
            };
            let verdict = match s.available {
                Some(true) => "available",
                Some(false) => "no",
                None => "unknown",
            };
            let evidence = match (s.external_address, s.address_mismatch) {
                (_, true) => "answered ADDRESS_MISMATCH: a NAT between us and it".to_string(),
                (Some(a), _) => format!("external address {a}"),
                (None, _) if s.available == Some(true) => "answered".into(),
                (None, _) => format!("no answer from {}", show_ip(pm.gateway)),
            };
            rows.push(TestReport {
                requests_sent: s.requests_sent,
                duration_ms: s.duration_ms,
                answers: Some(s.answers),
                ..row(service.to_string(), verdict, evidence)
            });
        }
        if let Some(m) = &pm.mapped {
            rows.push(row(
                "mapped port".into(),
                if m.inbound_verified {
                    "inbound verified"
                } else {
                    "inbound not verified"
                },
                format!(
                    "{} {} → {} for {} s, deleted after the check",
                    m.protocol, m.internal, m.external, m.lifetime_s
                ),
            ));
        }
        let word = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        let mut evidence = format!(
            "gateway {}, external address {}, cgnat {}",
            show_ip(pm.gateway),
            show_ip(pm.external_address),
            word(self.cgnat)
        );
        for p in &pm.problems {
            evidence += &format!("; {p}");
        }
        rows.push(row("double nat".into(), word(self.double_nat), evidence));
        rows
    }
}

fn show_ip(a: Option<std::net::IpAddr>) -> String {
    a.map_or_else(|| "-".into(), |a| a.to_string())
}

/// A field whose value is one of a closed set of names, read by one of the `deserialize_with`
/// functions below. (Spelled through an alias so serde does not take `&'static str` as a string
/// borrowed from the input, which would tie every report to a `'static` document.)
type Static = &'static str;

/// The `direct_udp` values of an outlook row.
pub const DIRECT_UDP: [&str; 4] = ["yes", "no", "with-port-prediction", "unknown"];

/// Reads a string that must be one of `allowed`, as the `'static` member it equals, so the
/// report's closed sets of names stay `&'static str` and a document naming anything else is an
/// error rather than a new value.
fn one_of<'de, D: Deserializer<'de>>(
    d: D,
    allowed: &[&'static str],
) -> Result<&'static str, D::Error> {
    let s = String::deserialize(d)?;
    allowed.iter().find(|a| **a == s).copied().ok_or_else(|| {
        serde::de::Error::custom(format!("unknown value `{s}`, expected one of {allowed:?}"))
    })
}

fn schema_v1<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    one_of(d, &[SCHEMA])
}

fn peer_name<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let names: Vec<&'static str> = PEERS.iter().map(|(name, _)| *name).collect();
    one_of(d, &names)
}

/// The outlook's `peer` as a closed set of names in the JSON Schema.
fn peer_names(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = PEERS.iter().map(|(name, _)| *name).collect();
    schemars::json_schema!({ "type": "string", "enum": names })
}

fn direct_udp_value<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    one_of(d, &DIRECT_UDP)
}

/// A NAT as the outlook reasons about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatShape {
    pub mapping: Behavior,
    pub filtering: Behavior,
    /// Ports predictable from a known delta (sequential allocation).
    pub predictable: bool,
}

/// Common peer NATs the outlook is computed against.
pub const PEERS: [(&str, NatShape); 6] = [
    (
        "open internet",
        NatShape {
            mapping: Behavior::EndpointIndependent,
            filtering: Behavior::EndpointIndependent,
            predictable: true,
        },
    ),
    (
        "full cone",
        NatShape {
            mapping: Behavior::EndpointIndependent,
            filtering: Behavior::EndpointIndependent,
            predictable: true,
        },
    ),
    (
        "restricted cone",
        NatShape {
            mapping: Behavior::EndpointIndependent,
            filtering: Behavior::AddressDependent,
            predictable: true,
        },
    ),
    (
        "port-restricted cone",
        NatShape {
            mapping: Behavior::EndpointIndependent,
            filtering: Behavior::AddressAndPortDependent,
            predictable: true,
        },
    ),
    (
        "symmetric (sequential ports)",
        NatShape {
            mapping: Behavior::AddressAndPortDependent,
            filtering: Behavior::AddressAndPortDependent,
            predictable: true,
        },
    ),
    (
        "symmetric (random ports)",
        NatShape {
            mapping: Behavior::AddressAndPortDependent,
            filtering: Behavior::AddressAndPortDependent,
            predictable: false,
        },
    ),
];

impl Behavior {
    fn mapping(self) -> Option<MappingBehavior> {
        match self {
            Self::EndpointIndependent => Some(MappingBehavior::EndpointIndependent),
            Self::AddressDependent => Some(MappingBehavior::AddressDependent),
            Self::AddressAndPortDependent => Some(MappingBehavior::AddressAndPortDependent),
            Self::Unknown => None,
        }
    }

    fn filtering(self) -> Option<FilteringBehavior> {
        match self {
            Self::EndpointIndependent => Some(FilteringBehavior::EndpointIndependent),
            Self::AddressDependent => Some(FilteringBehavior::AddressDependent),
            Self::AddressAndPortDependent => Some(FilteringBehavior::AddressAndPortDependent),
            Self::Unknown => None,
        }
    }
}

impl From<NatShape> for PeerNat {
    fn from(s: NatShape) -> Self {
        Self {
            mapping: s.mapping.mapping(),
            filtering: s.filtering.filtering(),
            predictable_ports: s.predictable,
            ..Self::default()
        }
    }
}

/// The outlook's `direct_udp` word for a traversal path.
fn direct_udp(path: Path) -> &'static str {
    match path {
        Path::Direct => "yes",
        Path::PortPrediction => "with-port-prediction",
        Path::Relayed | Path::Blocked => "no",
        Path::Unknown => "unknown",
    }
}

/// The outlook row for a peer named `peer` behind `them`: the traversal model's UDP path from
/// `us` (side A), port prediction allowed, with its peer-free reason.
pub fn outlook_row(us: NatShape, peer: &'static str, them: NatShape) -> OutlookRow {
    outlook_row_mapped(us, None, peer, them)
}

/// [`outlook_row`] for a host whose gateway grants it a working mapped port over `mapped`.
fn outlook_row_mapped(
    us: NatShape,
    mapped: Option<PortMappingService>,
    peer: &'static str,
    them: NatShape,
) -> OutlookRow {
    let us = PeerNat {
        port_mapping: mapped,
        ..us.into()
    };
    // natscope punch's techniques (prediction and port mapping), as the grid's expectations.
    let e = traversal::udp(us, them.into(), Techniques::PUNCH);
    OutlookRow {
        peer,
        direct_udp: direct_udp(e.path),
        reason: e.summary().into(),
    }
}

/// Direct UDP outlook between `us` and each common peer NAT ([`crate::traversal`]).
pub fn outlook(us: NatShape) -> Vec<OutlookRow> {
    outlook_with(us, None)
}

/// The outlook of a host whose gateway grants it a working mapped port over `mapped` (issue 12):
/// the traversal model makes that host reachable like an open host.
pub fn outlook_with(us: NatShape, mapped: Option<PortMappingService>) -> Vec<OutlookRow> {
    PEERS
        .iter()
        .map(|&(peer, them)| outlook_row_mapped(us, mapped, peer, them))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Behavior::*;

    #[test]
    fn classic_names_rfc3489_section10_1() {
        let rows = [
            (
                false,
                Some(true),
                EndpointIndependent,
                EndpointIndependent,
                Classic::FullCone,
            ),
            (
                false,
                Some(true),
                EndpointIndependent,
                AddressDependent,
                Classic::RestrictedCone,
            ),
            (
                false,
                Some(true),
                EndpointIndependent,
                AddressAndPortDependent,
                Classic::PortRestrictedCone,
            ),
            (
                false,
                Some(true),
                AddressDependent,
                AddressDependent,
                Classic::Symmetric,
            ),
            (
                false,
                Some(true),
                AddressAndPortDependent,
                AddressAndPortDependent,
                Classic::Symmetric,
            ),
            (
                false,
                Some(true),
                AddressAndPortDependent,
                EndpointIndependent,
                Classic::NoClassicName,
            ),
            (
                false,
                Some(true),
                AddressDependent,
                EndpointIndependent,
                Classic::NoClassicName,
            ),
            (
                false,
                Some(true),
                AddressAndPortDependent,
                Unknown,
                Classic::Unknown,
            ),
            (
                false,
                Some(false),
                EndpointIndependent,
                EndpointIndependent,
                Classic::OpenInternet,
            ),
            (
                false,
                Some(false),
                EndpointIndependent,
                AddressAndPortDependent,
                Classic::SymmetricUdpFirewall,
            ),
            (true, None, Unknown, Unknown, Classic::UdpBlocked),
            (false, None, Unknown, Unknown, Classic::Unknown),
        ];
        for (blocked, nat, m, f, want) in rows {
            assert_eq!(
                Classic::derive(blocked, nat, m, f),
                want,
                "{nat:?} {m:?} {f:?}"
            );
        }
    }

    fn shape(m: Behavior, f: Behavior, predictable: bool) -> NatShape {
        NatShape {
            mapping: m,
            filtering: f,
            predictable,
        }
    }

    /// The generated part of docs/probe.md's outlook section: the outlook of a host behind each
    /// kind of NAT towards each common peer, and what each answer means.
    fn outlook_doc_table() -> String {
        let ours = [
            (
                "EIM + EIF (open internet, full cone)",
                shape(EndpointIndependent, EndpointIndependent, true),
            ),
            (
                "EIM + ADF (restricted cone)",
                shape(EndpointIndependent, AddressDependent, true),
            ),
            (
                "EIM + APDF (port-restricted cone)",
                shape(EndpointIndependent, AddressAndPortDependent, true),
            ),
            (
                "ADM + ADF, predictable ports",
                shape(AddressDependent, AddressDependent, true),
            ),
            (
                "APDM + APDF, predictable ports",
                shape(AddressAndPortDependent, AddressAndPortDependent, true),
            ),
            (
                "APDM + APDF, random ports",
                shape(AddressAndPortDependent, AddressAndPortDependent, false),
            ),
            (
                "APDM + EIF, random ports",
                shape(AddressAndPortDependent, EndpointIndependent, false),
            ),
            ("unknown", shape(Unknown, Unknown, false)),
        ];
        let peers: Vec<&str> = PEERS.iter().map(|p| p.0).collect();
        let mut out = format!(
            "| our NAT | {} |\n|---|{}\n",
            peers.join(" | "),
            "---|".repeat(peers.len())
        );
        let mut reasons: Vec<(&str, String)> = Vec::new();
        // Issue 12: a symmetric NAT whose gateway maps a port over PCP.
        let pcp = (
            "APDM + APDF, random ports, PCP mapped port",
            shape(AddressAndPortDependent, AddressAndPortDependent, false),
            Some(PortMappingService::Pcp),
        );
        let ours = ours.into_iter().map(|(l, s)| (l, s, None));
        for (label, us, mapped) in ours.chain([pcp]) {
            let rows = outlook_with(us, mapped);
            let words: Vec<&str> = rows.iter().map(|r| r.direct_udp).collect();
            out += &format!("| {label} | {} |\n", words.join(" | "));
            for r in rows {
                if !reasons.contains(&(r.direct_udp, r.reason.clone())) {
                    reasons.push((r.direct_udp, r.reason));
                }
            }
        }
        out += "\n| direct UDP | reason |\n|---|---|\n";
        for (word, reason) in reasons {
            out += &format!("| `{word}` | {reason} |\n");
        }
        out
    }

    /// docs/probe.md's outlook table is the model's (regenerate it with
    /// `NATSCOPE_BLESS_DOCS=1 cargo test -p natscope-core --lib outlook_docs`), and every outlook
    /// row of its example output (a host on the open internet) is the one the model gives.
    #[test]
    fn outlook_docs_are_the_models() {
        const BEGIN: &str = "<!-- outlook table: generated from natscope_core::traversal by natscope-core's outlook_docs_are_the_models test -->\n";
        const END: &str = "<!-- end of outlook table -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/probe.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let start = doc
            .find(BEGIN)
            .expect("docs/probe.md has the outlook table's begin marker")
            + BEGIN.len();
        let len = doc[start..]
            .find(END)
            .expect("docs/probe.md has the end marker");
        let want = outlook_doc_table();
        if doc[start..start + len] != want {
            if std::env::var_os("NATSCOPE_BLESS_DOCS").is_some() {
                std::fs::write(
                    path,
                    format!("{}{want}{}", &doc[..start], &doc[start + len..]),
                )
                .unwrap();
            } else {
                panic!(
                    "docs/probe.md's outlook table differs from the model; it should read:\n{want}"
                );
            }
        }
        let open = outlook(shape(EndpointIndependent, EndpointIndependent, true));
        let mut checked = 0;
        for line in doc.lines().filter(|l| l.contains('┆')) {
            let cells: Vec<&str> = line.trim_matches('│').split('┆').map(str::trim).collect();
            if let Some(row) = open.iter().find(|r| r.peer == cells[0]) {
                assert_eq!(
                    cells[1..],
                    [row.direct_udp, row.reason.as_str()],
                    "docs/probe.md: {line}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, PEERS.len(), "the example's outlook rows");
    }

    #[test]
    fn outlook_follows_rfc4787_reasoning() {
        let row = |us: NatShape, peer: &str| {
            outlook(us)
                .into_iter()
                .find(|r| r.peer == peer)
                .unwrap()
                .direct_udp
        };
        let prc = shape(EndpointIndependent, AddressAndPortDependent, true);
        let sym_random = shape(AddressAndPortDependent, AddressAndPortDependent, false);
        let sym_seq = shape(AddressAndPortDependent, AddressAndPortDependent, true);
        let full = shape(EndpointIndependent, EndpointIndependent, true);
        assert_eq!(row(prc, "port-restricted cone"), "yes");
        assert_eq!(
            row(prc, "symmetric (random ports)"),
            "no",
            "the cone's filter only admits the port it sent to"
        );
        assert_eq!(
            row(prc, "symmetric (sequential ports)"),
            "with-port-prediction"
        );
        assert_eq!(row(sym_random, "symmetric (random ports)"), "no");
        assert_eq!(
            row(sym_random, "restricted cone"),
            "yes",
            "the restricted cone admits any port of an ip it sent to"
        );
        assert_eq!(row(sym_seq, "port-restricted cone"), "with-port-prediction");
        assert_eq!(row(full, "symmetric (random ports)"), "yes");
        assert_eq!(row(shape(Unknown, Unknown, false), "full cone"), "unknown");
    }
    /// A report with every field set (the floats exact in binary, so the JSON round trip is exact).
    fn full_report() -> ProbeReport {
        use super::super::pacing::{PaceChoice, Pacing};
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let us = shape(EndpointIndependent, AddressAndPortDependent, true);
        ProbeReport {
            schema: SCHEMA,
            natscope_version: crate::document::version(),
            local_address: Some(a("10.1.0.2:40000")),
            public_address: Some(a("203.0.113.1:40000")),
            nat_detected: Some(true),
            udp_blocked: false,
            mapping: EndpointIndependent,
            filtering: AddressAndPortDependent,
            port_preservation: Some(true),
            port_allocation: PortAllocationReport {
                pattern: AllocationPattern::Sequential,
                delta: Some(2),
                samples: vec![(40000, 40002), (40001, 40004)],
                predictability: "next port is the last plus 2".into(),
            },
            hairpinning: None,
            binding_lifetime_s: Some(30.5),
            tcp_mapping: Unknown,
            alg_detected: Some(false),
            classic: Classic::PortRestrictedCone,
            server: ServerReport {
                address: a("198.51.100.1:3478"),
                other_address: Some(a("198.51.100.2:3479")),
                problems: vec!["a problem".into()],
                problems_omitted: 3,
            },
            tests: vec![TestReport {
                name: "mapping".into(),
                verdict: "endpoint-independent".into(),
                evidence: "M1 = M2".into(),
                requests_sent: 3,
                duration_ms: 1.25,
                answers: Some(3),
                miss_chance: Some(0.25),
            }],
            outlook: outlook(us),
            loss_estimate: 0.125,
            negative_confidence: Some(0.5),
            retry_budget_ms: 1100.0,
            summary: "a summary".into(),
            requests_sent: 9,
            duration_ms: 2.5,
            pacing: Pacing::decide(&[a("198.51.100.1:3478")], PaceChoice::Default),
            address_pooling: Some(AddressPooling::Paired),
            tcp_port_preservation: None,
            max_time_ms: 5000.0,
            time_bound_reached: true,
            loss_transmissions: 24,
            port_mapping: None,
            double_nat: None,
            cgnat: None,
        }
    }

    #[test]
    fn the_json_document_reads_back_into_the_same_report() {
        let report = full_report();
        let json = serde_json::to_string(&report).unwrap();
        let back: ProbeReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        // Every outlook row of every shape the outlook can see reads back too.
        let kinds = [
            EndpointIndependent,
            AddressDependent,
            AddressAndPortDependent,
            Unknown,
        ];
        for m in kinds {
            for f in kinds {
                for p in [false, true] {
                    let rows = outlook(shape(m, f, p));
                    let json = serde_json::to_string(&rows).unwrap();
                    let back: Vec<OutlookRow> = serde_json::from_str(&json).unwrap();
                    assert_eq!(back, rows);
                }
            }
        }
    }

    #[test]
    fn closed_sets_reject_values_outside_them() {
        let json = serde_json::to_value(full_report()).unwrap();
        let with = |pointer: &str, v: serde_json::Value| {
            let mut doc = json.clone();
            *doc.pointer_mut(pointer).unwrap() = v;
            serde_json::from_value::<ProbeReport>(doc)
        };
        assert!(with("/schema", "natscope.probe/v2".into()).is_err());
        assert!(with("/mapping", "endpoint-dependent".into()).is_err());
        assert!(with("/classic", "cone".into()).is_err());
        assert!(with("/outlook/0/direct_udp", "maybe".into()).is_err());
        assert!(with("/outlook/0/peer", "a friend".into()).is_err());
        assert!(with("/port_allocation/pattern", "wild".into()).is_err());
        assert!(with("/address_pooling", "arbitrary".into()).is_ok());
    }
}

#[cfg(test)]
mod port_mapping_tests {
    use super::*;
    use crate::portmap::{MappedPort, Outcome};

    fn symmetric_report() -> ProbeReport {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let us = NatShape {
            mapping: Behavior::AddressAndPortDependent,
            filtering: Behavior::AddressAndPortDependent,
            predictable: false,
        };
        let mut r: ProbeReport = serde_json::from_value(serde_json::json!({
            "schema": SCHEMA, "local_address": "10.0.0.2:4000", "public_address": "203.0.113.7:6000",
            "nat_detected": true, "udp_blocked": false, "mapping": "address-and-port-dependent",
            "filtering": "address-and-port-dependent", "port_preservation": false,
            "port_allocation": {"pattern": "random", "delta": null, "samples": [], "predictability": ""},
            "hairpinning": null, "binding_lifetime_s": null, "tcp_mapping": "unknown",
            "alg_detected": false, "classic": "symmetric",
            "server": {"address": "198.51.100.1:3478", "other_address": null, "problems": []},
            "tests": [], "outlook": [], "loss_estimate": 0.0, "negative_confidence": null,
            "retry_budget_ms": 0.0, "summary": "Symmetric NAT", "requests_sent": 0, "duration_ms": 0.0,
            "pacing": {"enabled": false, "max_new_per_second": null, "reason": ""},
            "address_pooling": null, "tcp_port_preservation": null, "max_time_ms": 5000.0,
            "time_bound_reached": false, "loss_transmissions": 0
        }))
        .expect("an older document without the port-mapping fields reads");
        assert_eq!(r.port_mapping, None);
        r.outlook = outlook(us);
        assert_eq!(r.public_address, Some(a("203.0.113.7:6000")));
        r
    }

    fn pm(external: &str, verified: Option<bool>) -> PortMappingReport {
        let o = Outcome {
            available: Some(true),
            external_address: Some(external.parse().unwrap()),
            ..Outcome::default()
        };
        let mut pm = PortMappingReport::new(
            Some("10.0.0.1".parse().unwrap()),
            &[(PortMappingService::Pcp, &o)],
        );
        pm.mapped = verified.map(|inbound_verified| MappedPort {
            protocol: PortMappingService::Pcp,
            internal: "10.0.0.2:5000".parse().unwrap(),
            external: "203.0.113.7:5000".parse().unwrap(),
            lifetime_s: 120,
            inbound_verified,
        });
        pm
    }

    #[test]
    fn a_working_mapping_opens_the_outlook_and_a_failed_one_does_not() {
        let plain = symmetric_report();
        let direct = |r: &ProbeReport| r.outlook.iter().filter(|o| o.direct_udp == "yes").count();
        assert!(direct(&plain) < PEERS.len());
        for (verified, opens) in [(None, true), (Some(true), true), (Some(false), false)] {
            let mut r = symmetric_report();
            r.apply_port_mapping(pm("203.0.113.7", verified));
            assert_eq!(r.double_nat, Some(false));
            assert_eq!(r.cgnat, Some(false));
            assert_eq!(direct(&r) == PEERS.len(), opens, "{verified:?}");
            assert_eq!(r.summary.contains("PCP available"), opens, "{}", r.summary);
            if opens {
                assert!(r
                    .outlook
                    .iter()
                    .any(|o| o.reason.starts_with("PCP available:")));
            }
        }
        // Behind a second NAT the inner gateway's mapping does not help.
        let mut r = symmetric_report();
        r.apply_port_mapping(pm("100.64.0.9", None));
        assert_eq!((r.double_nat, r.cgnat), (Some(true), Some(true)));
        assert_eq!(direct(&r), direct(&plain));
        assert!(r
            .summary
            .ends_with("; carrier-grade NAT (RFC 6598 space or a second translation)"));
        let rows = r.port_mapping_rows();
        let names: Vec<&str> = rows.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["upnp", "nat-pmp", "pcp", "double nat"]);
        assert_eq!(rows[0].verdict, "not probed");
        assert_eq!(rows[2].evidence, "external address 100.64.0.9");
        assert!(
            rows[3].evidence.contains("UPnP not probed"),
            "{:?}",
            rows[3]
        );
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ProbeReport>(&json).unwrap(), r);
    }
}
