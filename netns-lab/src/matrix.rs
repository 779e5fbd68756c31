//! `lab matrix`: the lab's configured NAT is ground truth for the probe. This module turns a
//! preset's truth ([`crate::presets::expected`]) into the [`Verdicts`] `natscope probe --json`
//! should report (docs/probe.md's schema), reads the same verdicts out of a [`ProbeReport`], and
//! compares them field by field. It also holds the typed `natscope.matrix/v1` document, so a
//! reader of `lab matrix --json` gets [`MatrixDocument`] rather than JSON to pick keys out of.
//! Pure data in and out, so the comparison itself is unit-tested without a lab.

use std::net::IpAddr;

use natscope_core::nat::PortAllocation;
use natscope_core::portmap::PortMappingService;
use natscope_core::probe::report::{
    AddressPooling, AllocationPattern, Behavior, Classic, ProbeReport,
};
use natscope_core::probe::{Ipv6Report, Translation};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::presets::{self, Ipv6Truth};
use crate::topology::{NodeSpec, RouterKind};

/// The `schema` of `lab matrix --json`.
pub const SCHEMA: &str = "natscope.matrix/v1";

/// The probe verdicts the matrix compares, in table order.
pub const FIELDS: &[&str] = &[
    "udp_blocked",
    "nat_detected",
    "mapping",
    "filtering",
    "port_preservation",
    "port_allocation",
    "allocation_delta",
    "hairpinning",
    "address_pooling",
    "classic",
    "port_mapping",
    "external_address",
    "double_nat",
    "cgnat",
    "mapped_inbound",
    "ipv6",
    "ipv6_mapping",
    "ipv6_filtering",
    "ipv6_translation",
];

/// The fields compared only where a router of the preset serves a port-mapping protocol.
const PORT_MAPPING_FIELDS: &[&str] = &[
    "port_mapping",
    "external_address",
    "double_nat",
    "cgnat",
    "mapped_inbound",
];

/// The fields compared only where the preset's truth says what IPv6 should show.
const IPV6_FIELDS: &[&str] = &["ipv6", "ipv6_mapping", "ipv6_filtering", "ipv6_translation"];

/// The verdicts of one probe run (or of a preset's truth), with the probe's own types: a field's
/// JSON is exactly the probe report's, except `port_allocation` (the report's
/// `port_allocation.pattern`) and `allocation_delta` (its `port_allocation.delta`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Verdicts {
    pub udp_blocked: bool,
    pub nat_detected: Option<bool>,
    pub mapping: Behavior,
    pub filtering: Behavior,
    pub port_preservation: Option<bool>,
    pub port_allocation: AllocationPattern,
    /// Compared only where the truth has one (sequential allocation's step).
    pub allocation_delta: Option<i32>,
    pub hairpinning: Option<bool>,
    pub address_pooling: Option<AddressPooling>,
    pub classic: Classic,
    // Port mapping (issue 12; added to v1 after `classic`). Compared only where the preset's
    // router maps. These and the IPv6 fields are left out of the JSON when `null`, so documents
    // written before them still match the v1 schema.
    /// Which protocols answered the probe's discovery (`null` for one: no answer in time to
    /// say either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mapping: Option<Services>,
    /// The external address the gateway claimed and the probe believed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_address: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub double_nat: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgnat: Option<bool>,
    /// `--map`'s mapping proved inbound (`port_mapping.mapped.inbound_verified`): `true` behind
    /// one NAT, `false` behind a second one that the mapping does not reach through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_inbound: Option<bool>,
    // IPv6 (issue 13; added to v1 after `cgnat`): a second probe from `h1` against the
    // reflector's IPv6 address. Compared only where the preset's truth has an IPv6 side.
    /// Whether IPv6 reached the reflector (`false`: `h1` has no IPv6 route, or UDP was blocked;
    /// the other IPv6 fields are then `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_mapping: Option<Behavior>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_filtering: Option<Behavior>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_translation: Option<Translation>,
}

impl Verdicts {
    /// What `natscope probe --json` run from `h1` should report for `preset`, in the probe's own
    /// terms: with no NAT the mapping is the identity (`endpoint-independent`) and hairpinning is
    /// not tested (`null`); with UDP blocked every behavior is `unknown` and every tri-state is
    /// `null`. Every preset's NATs have one external address each, so the pooling a host sees is
    /// `paired`.
    pub fn expected(preset: &str) -> Option<Self> {
        let e = presets::expected(preset)?;
        let blocked = e.classic == Classic::UdpBlocked;
        let translates = !blocked && e.mapping.is_some();
        let delta = match presets::router(preset) {
            Some(RouterKind::Engine(cfg)) => match cfg.behavior.allocation {
                PortAllocation::Sequential { step } => Some(i32::from(step)),
                _ => None,
            },
            _ => None,
        };
        let (services, external) = mapping_router(preset);
        let v6 = match e.ipv6 {
            Ipv6Truth::Present {
                mapping,
                filtering,
                translation,
            } => Some((mapping, filtering, translation)),
            Ipv6Truth::NotCompared | Ipv6Truth::NoPath => None,
        };
        Some(Self {
            udp_blocked: blocked,
            nat_detected: (!blocked).then_some(e.mapping.is_some()),
            mapping: match (e.mapping, blocked) {
                (_, true) => Behavior::Unknown,
                (None, false) => Behavior::EndpointIndependent,
                (Some(m), false) => m.into(),
            },
            filtering: e.filtering.map_or(Behavior::Unknown, Behavior::from),
            port_preservation: (!blocked).then_some(e.port_preservation),
            port_allocation: e.allocation,
            allocation_delta: delta,
            hairpinning: translates.then_some(e.hairpinning),
            address_pooling: translates.then_some(AddressPooling::Paired),
            classic: e.classic,
            port_mapping: e
                .port_mapping
                .and(services.as_deref().map(Services::serving)),
            external_address: e.port_mapping.and(external),
            double_nat: e.port_mapping.map(|p| p.double_nat),
            cgnat: e.port_mapping.and_then(|p| p.cgnat),
            mapped_inbound: e.port_mapping.map(|p| !p.double_nat),
            ipv6: match e.ipv6 {
                Ipv6Truth::NotCompared => None,
                Ipv6Truth::NoPath => Some(false),
                Ipv6Truth::Present { .. } => Some(true),
            },
            ipv6_mapping: v6.map(|(m, _, _)| m.into()),
            ipv6_filtering: v6.map(|(_, f, _)| f.into()),
            ipv6_translation: v6.map(|(_, _, t)| t),
        })
    }

    /// Whether this truth has a port-mapping side to compare.
    pub fn compares_port_mapping(&self) -> bool {
        self.port_mapping.is_some()
    }

    /// Whether this truth says what a probe over IPv6 should see.
    pub fn compares_ipv6(&self) -> bool {
        self.ipv6.is_some()
    }

    /// Adds what the IPv6 probe saw (`None`: `h1` had no IPv6 route to the reflector). A run
    /// that reached nothing (UDP blocked) leaves the IPv6 verdicts `null`, as no route does.
    pub fn observe_ipv6(&mut self, v6: Option<&Ipv6Report>) {
        let reached = v6.filter(|v| !v.report.udp_blocked);
        self.ipv6 = Some(reached.is_some());
        self.ipv6_mapping = reached.map(|v| v.report.mapping);
        self.ipv6_filtering = reached.map(|v| v.report.filtering);
        self.ipv6_translation = reached.map(|v| v.translation);
    }

    /// The same verdicts as a probe reported them.
    pub fn observed(report: &ProbeReport) -> Self {
        Self {
            udp_blocked: report.udp_blocked,
            nat_detected: report.nat_detected,
            mapping: report.mapping,
            filtering: report.filtering,
            port_preservation: report.port_preservation,
            port_allocation: report.port_allocation.pattern,
            allocation_delta: report.port_allocation.delta,
            hairpinning: report.hairpinning,
            address_pooling: report.address_pooling,
            classic: report.classic,
            port_mapping: report.port_mapping.as_ref().map(|pm| Services {
                nat_pmp: pm.nat_pmp,
                pcp: pm.pcp,
                upnp: pm.upnp,
            }),
            external_address: report
                .port_mapping
                .as_ref()
                .and_then(|p| p.external_address),
            double_nat: report.double_nat,
            cgnat: report.cgnat,
            mapped_inbound: report
                .port_mapping
                .as_ref()
                .and_then(|p| p.mapped.as_ref())
                .map(|m| m.inbound_verified),
            ipv6: None,
            ipv6_mapping: None,
            ipv6_filtering: None,
            ipv6_translation: None,
        }
    }

    /// Each field's name ([`FIELDS`] order) and JSON value, for the table and the document.
    fn cells(&self) -> Vec<(&'static str, Value)> {
        let v = |x: Result<Value, serde_json::Error>| x.unwrap_or(Value::Null);
        vec![
            ("udp_blocked", Value::Bool(self.udp_blocked)),
            ("nat_detected", v(serde_json::to_value(self.nat_detected))),
            ("mapping", v(serde_json::to_value(self.mapping))),
            ("filtering", v(serde_json::to_value(self.filtering))),
            (
                "port_preservation",
                v(serde_json::to_value(self.port_preservation)),
            ),
            (
                "port_allocation",
                v(serde_json::to_value(self.port_allocation)),
            ),
            (
                "allocation_delta",
                v(serde_json::to_value(self.allocation_delta)),
            ),
            ("hairpinning", v(serde_json::to_value(self.hairpinning))),
            (
                "address_pooling",
                v(serde_json::to_value(self.address_pooling)),
            ),
            ("classic", v(serde_json::to_value(self.classic))),
            ("port_mapping", v(serde_json::to_value(self.port_mapping))),
            (
                "external_address",
                v(serde_json::to_value(self.external_address)),
            ),
            ("double_nat", v(serde_json::to_value(self.double_nat))),
            ("cgnat", v(serde_json::to_value(self.cgnat))),
            (
                "mapped_inbound",
                v(serde_json::to_value(self.mapped_inbound)),
            ),
            ("ipv6", v(serde_json::to_value(self.ipv6))),
            ("ipv6_mapping", v(serde_json::to_value(self.ipv6_mapping))),
            (
                "ipv6_filtering",
                v(serde_json::to_value(self.ipv6_filtering)),
            ),
            (
                "ipv6_translation",
                v(serde_json::to_value(self.ipv6_translation)),
            ),
        ]
    }
}

/// The port-mapping services of preset `name`'s mapping router and that router's
/// external address (its uplink, from the address plan); `(None, None)` when no router maps.
fn mapping_router(name: &str) -> (Option<Vec<PortMappingService>>, Option<IpAddr>) {
    let Some(topology) = presets::preset(name) else {
        return (None, None);
    };
    let mapper = topology.nodes.iter().find_map(|n| match n {
        NodeSpec::Nat {
            name,
            router: RouterKind::Engine(cfg),
            ..
        } if !cfg.port_mapping.is_empty() => Some((name.clone(), cfg.port_mapping.clone())),
        _ => None,
    });
    let Some((node, services)) = mapper else {
        return (None, None);
    };
    let external = topology.plan().ok().and_then(|plan| {
        let n = plan.nodes.iter().find(|p| p.name == node)?;
        n.uplink.first().map(|u| IpAddr::V4(u.addr))
    });
    (Some(services), external)
}

/// Per port-mapping protocol: answered, did not, or unknown (`null`), as the probe's
/// `port_mapping` section says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Services {
    pub nat_pmp: Option<bool>,
    pub pcp: Option<bool>,
    pub upnp: Option<bool>,
}

impl Services {
    /// Exactly `served` answer; the others do not.
    pub fn serving(served: &[PortMappingService]) -> Self {
        let has = |s| Some(served.contains(&s));
        Self {
            nat_pmp: has(PortMappingService::NatPmp),
            pcp: has(PortMappingService::Pcp),
            upnp: has(PortMappingService::Upnp),
        }
    }
}

/// One field of one preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Check {
    /// One of [`FIELDS`].
    #[serde(deserialize_with = "field_name")]
    #[schemars(extend("enum" = FIELDS))]
    pub field: FieldName,
    pub expected: Value,
    pub observed: Value,
    pub pass: bool,
}

/// Spelled through an alias so serde reads the name with [`field_name`] rather than borrowing
/// it from a `'static` input.
type FieldName = &'static str;

fn field_name<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let s = String::deserialize(d)?;
    FIELDS
        .iter()
        .find(|f| **f == s)
        .copied()
        .ok_or_else(|| serde::de::Error::unknown_variant(&s, FIELDS))
}

/// Field-by-field comparison; `None` for `observed` (no probe report) fails every field.
/// `allocation_delta` is only checked where the preset allocates sequentially (elsewhere the
/// probe's delta is whatever it measured, or null).
pub fn compare_verdicts(expected: &Verdicts, observed: Option<&Verdicts>) -> Vec<Check> {
    let seen = observed.map(Verdicts::cells);
    expected
        .cells()
        .into_iter()
        .enumerate()
        .filter(|(_, (field, want))| *field != "allocation_delta" || !want.is_null())
        .filter(|(_, (field, _))| {
            !PORT_MAPPING_FIELDS.contains(field) || expected.compares_port_mapping()
        })
        .filter(|(_, (field, _))| !IPV6_FIELDS.contains(field) || expected.compares_ipv6())
        .map(|(i, (field, want))| {
            let got = seen.as_ref().map_or(Value::Null, |s| s[i].1.clone());
            Check {
                field,
                pass: seen.is_some() && want == got,
                expected: want,
                observed: got,
            }
        })
        .collect()
}

/// One row of `lab matrix --json`: a preset, its truth, what the probe in `h1` reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MatrixRow {
    pub preset: String,
    pub expected: Verdicts,
    /// `None` when the lab or the probe could not run.
    pub observed: Option<Verdicts>,
    pub pass: bool,
    pub checks: Vec<Check>,
    /// Set when the lab or the probe could not run at all.
    pub error: Option<String>,
    /// The probe's whole `natscope.probe/v1` document, kept for rows that did not pass.
    pub probe: Option<ProbeReport>,
    /// The IPv6 probe's `ipv6` object (translation verdict and whole report), kept likewise
    /// (added to v1 after `probe`; left out when `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_ipv6: Option<Ipv6Report>,
    pub duration_ms: f64,
}

/// The `natscope.matrix/v1` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MatrixDocument {
    /// Always [`SCHEMA`].
    #[schemars(extend("const" = SCHEMA))]
    pub schema: String,
    /// The version of natscope that wrote the document; empty when read from a document
    /// written before it was added.
    #[serde(default)]
    pub natscope_version: String,
    pub rows: Vec<MatrixRow>,
    pub pass: bool,
    pub duration_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use Behavior::*;

    /// The verdicts of a NAT'd probe that saw `classic`, `mapping`, `filtering`, `hairpin`.
    fn seen(
        classic: Classic,
        mapping: Behavior,
        filtering: Behavior,
        hairpin: Option<bool>,
    ) -> Verdicts {
        Verdicts {
            udp_blocked: false,
            nat_detected: Some(true),
            mapping,
            filtering,
            port_preservation: Some(true),
            port_allocation: AllocationPattern::Preserving,
            allocation_delta: None,
            hairpinning: hairpin,
            address_pooling: Some(AddressPooling::Paired),
            classic,
            port_mapping: Some(Services::default()),
            external_address: None,
            double_nat: None,
            cgnat: None,
            mapped_inbound: None,
            ipv6: Some(true),
            ipv6_mapping: Some(EndpointIndependent),
            ipv6_filtering: Some(EndpointIndependent),
            ipv6_translation: Some(Translation::None),
        }
    }

    fn failed(want: &Verdicts, got: &Verdicts) -> Vec<&'static str> {
        compare_verdicts(want, Some(got))
            .into_iter()
            .filter(|c| !c.pass)
            .map(|c| c.field)
            .collect()
    }

    #[test]
    fn every_preset_has_an_expectation_in_probe_terms() {
        for p in presets::names() {
            let e = serde_json::to_value(Verdicts::expected(p).unwrap_or_else(|| panic!("{p}")))
                .unwrap();
            let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
            // One value per field; the port-mapping and IPv6 ones only where not null.
            let optional = |f: &&str| PORT_MAPPING_FIELDS.contains(f) || IPV6_FIELDS.contains(f);
            for f in FIELDS {
                assert_eq!(
                    keys.contains(f),
                    !optional(f) || !e[f].is_null(),
                    "{p}: {f}"
                );
            }
            assert!(keys.iter().all(|k| FIELDS.contains(k)), "{p}: {keys:?}");
        }
        assert!(Verdicts::expected("no-such").is_none());
        let cells = Verdicts::expected("open").unwrap().cells();
        let names: Vec<&str> = cells.iter().map(|(f, _)| *f).collect();
        assert_eq!(names, FIELDS, "cells in table order");
    }

    #[test]
    fn a_matching_probe_passes_and_each_wrong_field_fails_alone() {
        let want = Verdicts::expected("port-restricted-cone").unwrap();
        let good = seen(
            Classic::PortRestrictedCone,
            EndpointIndependent,
            AddressAndPortDependent,
            Some(false),
        );
        let checks = compare_verdicts(&want, Some(&good));
        assert!(checks.iter().all(|c| c.pass), "{checks:?}");
        assert!(!checks.iter().any(|c| c.field == "allocation_delta"));

        let wrong = seen(
            Classic::RestrictedCone,
            EndpointIndependent,
            AddressDependent,
            Some(false),
        );
        assert_eq!(failed(&want, &wrong), ["filtering", "classic"]);
        // Not testing hairpinning (null) is not the same as "no hairpinning".
        let untested = seen(
            Classic::PortRestrictedCone,
            EndpointIndependent,
            AddressAndPortDependent,
            None,
        );
        assert_eq!(failed(&want, &untested), ["hairpinning"]);
        // No report at all fails every field it would have compared.
        let none = compare_verdicts(&want, None);
        assert_eq!(none.len(), 13, "9 IPv4 verdicts and 4 IPv6 ones");
        assert!(none.iter().all(|c| !c.pass && c.observed.is_null()));
    }

    #[test]
    fn no_nat_means_identity_mapping_and_untested_hairpinning() {
        let open = Verdicts::expected("open").unwrap();
        assert_eq!(open.mapping, EndpointIndependent);
        assert_eq!(open.nat_detected, Some(false));
        assert_eq!(open.hairpinning, None);
        assert_eq!(open.address_pooling, None);
        assert_eq!(
            Verdicts::expected("cgnat").unwrap().address_pooling,
            Some(AddressPooling::Paired)
        );
        let blocked = Verdicts::expected("blocked").unwrap();
        assert!(blocked.udp_blocked);
        assert_eq!(blocked.mapping, Unknown);
        assert_eq!(blocked.port_preservation, None);
        let seq = Verdicts::expected("symmetric-sequential").unwrap();
        assert_eq!(seq.allocation_delta, Some(1));
        assert_eq!(seq.port_allocation, AllocationPattern::Sequential);
        // The JSON of the truth is the probe's: the same strings and nulls.
        let json = serde_json::to_value(Verdicts::expected("open").unwrap()).unwrap();
        assert_eq!(json["mapping"], "endpoint-independent");
        assert_eq!(json["hairpinning"], Value::Null);
        assert_eq!(serde_json::to_value(seq).unwrap()["allocation_delta"], 1);
    }

    #[test]
    fn port_mapping_truth_names_services_address_and_path() {
        use PortMappingService::*;
        let pmp = Verdicts::expected("full-cone+nat-pmp").unwrap();
        assert_eq!(pmp.port_mapping, Some(Services::serving(&[NatPmp])));
        let served = pmp.port_mapping.unwrap();
        assert_eq!(
            (served.nat_pmp, served.pcp, served.upnp),
            (Some(true), Some(false), Some(false))
        );
        assert_eq!(pmp.external_address, Some("203.0.113.1".parse().unwrap()));
        assert_eq!((pmp.double_nat, pmp.cgnat), (Some(false), Some(false)));
        let double = Verdicts::expected("double-nat+all").unwrap();
        assert_eq!(
            double.port_mapping,
            Some(Services::serving(&[Upnp, Pcp, NatPmp]))
        );
        assert_eq!(
            double.external_address,
            Some("192.168.1.2".parse().unwrap())
        );
        // A private address behind a public one: the probe cannot tell home from carrier.
        assert_eq!((double.double_nat, double.cgnat), (Some(true), None));
        let cgnat = Verdicts::expected("cgnat+all").unwrap();
        assert_eq!(cgnat.external_address, Some("100.64.0.2".parse().unwrap()));
        assert_eq!((cgnat.double_nat, cgnat.cgnat), (Some(true), Some(true)));
        // `--map`'s mapping is made on the inner router: it proves inbound behind one NAT only.
        assert_eq!(pmp.mapped_inbound, Some(true));
        assert_eq!(cgnat.mapped_inbound, Some(false));
        // Presets that map nothing compare none of the port-mapping fields.
        let plain = Verdicts::expected("symmetric").unwrap();
        assert!(!plain.compares_port_mapping());
        let fields = |v: &Verdicts| -> Vec<&str> {
            compare_verdicts(v, Some(v))
                .iter()
                .map(|c| c.field)
                .collect()
        };
        assert!(!fields(&plain).contains(&"cgnat"));
        let f = fields(&double);
        assert!(PORT_MAPPING_FIELDS.iter().all(|p| f.contains(p)), "{f:?}");
        // A probe that saw no service, or another address, fails exactly those fields.
        let mut seen = pmp.clone();
        seen.port_mapping = Some(Services::serving(&[]));
        seen.external_address = Some("203.0.113.9".parse().unwrap());
        assert_eq!(failed(&pmp, &seen), ["port_mapping", "external_address"]);
        // UPnP silent within the short wait is unknown, not "not served".
        let mut seen = pmp.clone();
        seen.port_mapping = Some(Services {
            upnp: None,
            ..Services::serving(&[NatPmp])
        });
        assert_eq!(failed(&pmp, &seen), ["port_mapping"]);
        let mut seen = double.clone();
        seen.cgnat = Some(false);
        assert_eq!(failed(&double, &seen), ["cgnat"]);
    }

    #[test]
    fn ipv6_truth_is_compared_per_family() {
        let strict = Verdicts::expected("dual-stack-strict").unwrap();
        assert_eq!(strict.ipv6, Some(true));
        assert_eq!(strict.ipv6_filtering, Some(AddressAndPortDependent));
        assert_eq!(strict.ipv6_translation, Some(Translation::None));
        let nat66 = Verdicts::expected("nat66").unwrap();
        assert_eq!(nat66.ipv6_mapping, Some(AddressAndPortDependent));
        assert_eq!(nat66.ipv6_translation, Some(Translation::Nat66));
        assert_eq!(
            Verdicts::expected("nptv6").unwrap().ipv6_translation,
            Some(Translation::Nptv6)
        );
        let v4only = Verdicts::expected("ipv4-only").unwrap();
        assert_eq!(v4only.ipv6, Some(false));
        assert_eq!(v4only.ipv6_mapping, None);
        assert!(v4only.compares_ipv6());

        // An IPv4 verdict that matches does not hide an IPv6 one that does not.
        let mut seen = strict.clone();
        seen.ipv6_filtering = Some(EndpointIndependent);
        assert_eq!(failed(&strict, &seen), ["ipv6_filtering"]);
        // No IPv6 route where the truth has IPv6: every IPv6 field fails.
        let mut seen = strict.clone();
        seen.observe_ipv6(None);
        assert_eq!(
            failed(&strict, &seen),
            ["ipv6", "ipv6_mapping", "ipv6_filtering", "ipv6_translation"]
        );
        // ... and is exactly what `ipv4-only` must show.
        let mut seen = v4only.clone();
        seen.observe_ipv6(None);
        assert!(failed(&v4only, &seen).is_empty());
    }

    /// docs/lab.md's port-mapping and IPv6 truth tables, row for row.
    fn docs_rows() -> (Vec<String>, Vec<String>) {
        let word = |v: Value| match v {
            Value::Null => "—".to_string(),
            Value::Bool(true) => "yes".into(),
            Value::Bool(false) => "no".into(),
            Value::String(s) => s,
            other => other.to_string(),
        };
        let (mut pm, mut v6) = (Vec::new(), Vec::new());
        for p in presets::names() {
            let e = Verdicts::expected(p).unwrap();
            if let Some(s) = e.port_mapping {
                let answers: Vec<&str> = [("nat-pmp", s.nat_pmp), ("pcp", s.pcp), ("upnp", s.upnp)]
                    .into_iter()
                    .filter(|(_, on)| *on == Some(true))
                    .map(|(n, _)| n)
                    .collect();
                pm.push(format!(
                    "| `{p}` | {} | {} | {} | {} | {} |",
                    answers.join(", "),
                    word(serde_json::to_value(e.external_address).unwrap()),
                    word(serde_json::to_value(e.double_nat).unwrap()),
                    word(serde_json::to_value(e.cgnat).unwrap()),
                    word(serde_json::to_value(e.mapped_inbound).unwrap()),
                ));
            }
            if e.compares_ipv6() {
                let v = |x: Result<Value, serde_json::Error>| word(x.unwrap());
                v6.push(format!(
                    "| `{p}` | {} | {} | {} | {} |",
                    v(serde_json::to_value(e.ipv6)),
                    v(serde_json::to_value(e.ipv6_mapping)),
                    v(serde_json::to_value(e.ipv6_filtering)),
                    v(serde_json::to_value(e.ipv6_translation)),
                ));
            }
        }
        (pm, v6)
    }

    #[test]
    fn the_docs_show_the_port_mapping_and_ipv6_truth() {
        let docs = include_str!("../../docs/lab.md");
        let (pm, v6) = docs_rows();
        if std::env::var_os("NATSCOPE_PRINT_ROWS").is_some() {
            println!("{}\n\n{}", pm.join("\n"), v6.join("\n"));
        }
        assert_eq!(pm.len(), 6, "the six port-mapping presets");
        assert!(v6.len() >= 5, "at least the five IPv6 presets");
        for row in pm.iter().chain(&v6) {
            assert!(docs.lines().any(|l| l == row), "docs/lab.md lacks {row}");
        }
    }
}
