//! `lab matrix`: the lab's configured NAT is ground truth for the probe. This module turns a
//! preset's truth ([`crate::presets::expected`]) into the values `natscope probe --json` should
//! print (docs/probe.md's schema), and compares them field by field with what the probe printed.
//! Pure data in and out, so the comparison itself is unit-tested without a lab.

use natscope_core::nat::PortAllocation;
use serde::Serialize;
use serde_json::{json, Value};

use crate::presets::{self, Expected};
use crate::topology::RouterKind;

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

/// One field of one preset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub field: &'static str,
    pub expected: Value,
    pub observed: Value,
    pub pass: bool,
}

/// What `natscope probe --json` run from `h1` should print for `preset`, in the probe's own terms:
/// with no NAT the mapping is the identity (`endpoint-independent`) and hairpinning is not tested
/// (`null`); with UDP blocked every behavior is `unknown` and every tri-state is `null`. Every
/// preset's NATs have one external address each, so the pooling a host sees is `paired`.
pub fn expected_probe(preset: &str) -> Option<Value> {
    let e: Expected = presets::expected(preset)?;
    let blocked = e.classic == "udp-blocked";
    let kebab = |v: Option<Value>| v.unwrap_or_else(|| json!("unknown"));
    let mapping = match (e.mapping, blocked) {
        (_, true) => json!("unknown"),
        (None, false) => json!("endpoint-independent"),
        (Some(m), false) => serde_json::to_value(m).ok()?,
    };
    let delta = match presets::router(preset) {
        Some(RouterKind::Engine(cfg)) => match cfg.behavior.allocation {
            PortAllocation::Sequential { step } => json!(step),
            _ => Value::Null,
        },
        _ => Value::Null,
    };
    Some(json!({
        "udp_blocked": blocked,
        "nat_detected": if blocked { Value::Null } else { json!(e.mapping.is_some()) },
        "mapping": mapping,
        "filtering": kebab(e.filtering.and_then(|f| serde_json::to_value(f).ok())),
        "port_preservation": if blocked { Value::Null } else { json!(e.port_preservation) },
        "port_allocation": serde_json::to_value(e.allocation).ok()?,
        "allocation_delta": delta,
        "hairpinning": if blocked || e.mapping.is_none() { Value::Null } else { json!(e.hairpinning) },
        "address_pooling": if blocked || e.mapping.is_none() { Value::Null } else { json!("paired") },
        "classic": e.classic,
    }))
}

/// The same fields picked out of a `natscope.probe/v1` document.
pub fn observed_probe(doc: &Value) -> Value {
    json!({
        "udp_blocked": doc["udp_blocked"],
        "nat_detected": doc["nat_detected"],
        "mapping": doc["mapping"],
        "filtering": doc["filtering"],
        "port_preservation": doc["port_preservation"],
        "port_allocation": doc["port_allocation"]["pattern"],
        "allocation_delta": doc["port_allocation"]["delta"],
        "hairpinning": doc["hairpinning"],
        "address_pooling": doc["address_pooling"],
        "classic": doc["classic"],
    })
}

/// Field-by-field comparison. `allocation_delta` is only checked where the preset allocates
/// sequentially (elsewhere the probe's delta is whatever it measured, or null).
pub fn compare(expected: &Value, observed: &Value) -> Vec<Check> {
    FIELDS
        .iter()
        .filter(|f| **f != "allocation_delta" || !expected[**f].is_null())
        .map(|f| Check {
            field: f,
            expected: expected[*f].clone(),
            observed: observed[*f].clone(),
            pass: expected[*f] == observed[*f],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_doc(classic: &str, mapping: &str, filtering: &str, hairpin: Value) -> Value {
        json!({
            "schema": "natscope.probe/v1", "udp_blocked": false, "nat_detected": true,
            "mapping": mapping, "filtering": filtering, "port_preservation": true,
            "port_allocation": {"pattern": "preserving", "delta": null},
            "hairpinning": hairpin, "address_pooling": "paired", "classic": classic,
        })
    }

    #[test]
    fn every_preset_has_an_expectation_in_probe_terms() {
        for p in presets::names() {
            let e = expected_probe(p).unwrap_or_else(|| panic!("{p}"));
            for f in FIELDS {
                assert!(e.get(*f).is_some(), "{p}: {f}");
            }
        }
        assert!(expected_probe("no-such").is_none());
    }

    #[test]
    fn a_matching_probe_passes_and_each_wrong_field_fails_alone() {
        let want = expected_probe("port-restricted-cone").unwrap();
        let good = probe_doc(
            "port-restricted-cone",
            "endpoint-independent",
            "address-and-port-dependent",
            json!(false),
        );
        let checks = compare(&want, &observed_probe(&good));
        assert!(checks.iter().all(|c| c.pass), "{checks:?}");
        assert!(!checks.iter().any(|c| c.field == "allocation_delta"));

        let wrong = probe_doc(
            "restricted-cone",
            "endpoint-independent",
            "address-dependent",
            json!(false),
        );
        let failed: Vec<&str> = compare(&want, &observed_probe(&wrong))
            .into_iter()
            .filter(|c| !c.pass)
            .map(|c| c.field)
            .collect();
        assert_eq!(failed, ["filtering", "classic"]);
        // Not testing hairpinning (null) is not the same as "no hairpinning".
        let untested = probe_doc(
            "port-restricted-cone",
            "endpoint-independent",
            "address-and-port-dependent",
            Value::Null,
        );
        let failed: Vec<&str> = compare(&want, &observed_probe(&untested))
            .into_iter()
            .filter(|c| !c.pass)
            .map(|c| c.field)
            .collect();
        assert_eq!(failed, ["hairpinning"]);
    }

    #[test]
    fn no_nat_means_identity_mapping_and_untested_hairpinning() {
        let open = expected_probe("open").unwrap();
        assert_eq!(open["mapping"], "endpoint-independent");
        assert_eq!(open["nat_detected"], false);
        assert_eq!(open["hairpinning"], Value::Null);
        assert_eq!(open["address_pooling"], Value::Null);
        assert_eq!(
            expected_probe("cgnat").unwrap()["address_pooling"],
            "paired"
        );
        let blocked = expected_probe("blocked").unwrap();
        assert_eq!(blocked["udp_blocked"], true);
        assert_eq!(blocked["mapping"], "unknown");
        assert_eq!(blocked["port_preservation"], Value::Null);
        let seq = expected_probe("symmetric-sequential").unwrap();
        assert_eq!(seq["allocation_delta"], 1);
        assert_eq!(seq["port_allocation"], "sequential");
    }
}
