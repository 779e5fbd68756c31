//! `lab matrix`: the lab's configured NAT is ground truth for the probe. This module turns a
//! preset's truth ([`crate::presets::expected`]) into the [`Verdicts`] `natscope probe --json`
//! should report (docs/probe.md's schema), reads the same verdicts out of a [`ProbeReport`], and
//! compares them field by field. It also holds the typed `natscope.matrix/v1` document, so a
//! reader of `lab matrix --json` gets [`MatrixDocument`] rather than JSON to pick keys out of.
//! Pure data in and out, so the comparison itself is unit-tested without a lab.

use natscope_core::nat::PortAllocation;
use natscope_core::probe::report::{
    AddressPooling, AllocationPattern, Behavior, Classic, ProbeReport,
};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::presets;
use crate::topology::RouterKind;

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
];

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
        })
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
        }
    }

    /// Each field's name ([`FIELDS`] order) and JSON value, for the table and the document.
    fn cells(&self) -> [(&'static str, Value); 10] {
        let v = |x: Result<Value, serde_json::Error>| x.unwrap_or(Value::Null);
        [
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
        ]
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
            let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            let mut fields = FIELDS.to_vec();
            fields.sort_unstable();
            assert_eq!(keys, fields, "{p}: one value per field");
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
        assert_eq!(none.len(), 9);
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
}
