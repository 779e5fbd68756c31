//! Issue 5, must-show 1: `natscope lab matrix` over every preset passes — the probe, run as a real
//! process behind each preset's NAT, agrees with the NAT's configured behavior on every verdict.
//! Issue 12, must-show 3: the port-mapping presets' rows compare the protocols served, the external
//! address, `double_nat` and `cgnat`. Issue 13, must-show 2: the IPv6 presets' rows compare both
//! families (IPv6 reachability, mapping, filtering and translation).

use std::process::Command;

use natscope_lab::matrix::{self, MatrixDocument, MatrixRow};
use natscope_lab::presets;
use natscope_tests::lab::require_root;
use natscope_tests::natscope_bin;

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn matrix_over_every_preset_passes() {
    require_root();
    let out = Command::new(natscope_bin())
        .args(["lab", "matrix", "--json"])
        .output()
        .expect("run natscope lab matrix");
    let stdout = String::from_utf8_lossy(&out.stdout);
    natscope_tests::schema::assert_valid_text(&stdout);
    let doc: MatrixDocument = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a natscope.matrix/v1 document ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(doc.schema, matrix::SCHEMA);
    let names: Vec<&str> = doc.rows.iter().map(|r| r.preset.as_str()).collect();
    assert_eq!(names, presets::names(), "one row per preset, in order");
    let failed: Vec<&MatrixRow> = doc.rows.iter().filter(|r| !r.pass).collect();
    assert!(
        failed.is_empty(),
        "mismatches:\n{}",
        serde_json::to_string_pretty(&failed).unwrap()
    );
    assert!(doc.pass);
    assert_eq!(out.status.code(), Some(0));
    // Every row compared every field it could (nothing silently skipped).
    for r in &doc.rows {
        assert!(r.checks.len() >= 9, "{r:?}");
    }
    let compared = |preset: &str, fields: &[&str]| {
        let row = doc.rows.iter().find(|r| r.preset == preset).expect(preset);
        for f in fields {
            assert!(
                row.checks.iter().any(|c| c.field == *f && c.pass),
                "{preset}: {f} not compared: {row:?}"
            );
        }
    };
    let port_mapping = [
        "port_mapping",
        "external_address",
        "double_nat",
        "cgnat",
        "mapped_inbound",
    ];
    for p in [
        "full-cone+nat-pmp",
        "port-restricted-cone+upnp",
        "symmetric+pcp",
        "symmetric+upnp",
        "double-nat+all",
        "cgnat+all",
    ] {
        compared(p, &port_mapping);
    }
    let ipv6 = ["ipv6", "ipv6_mapping", "ipv6_filtering", "ipv6_translation"];
    for p in [
        "dual-stack",
        "dual-stack-strict",
        "nptv6",
        "nat66",
        "ipv4-only",
    ] {
        compared(p, &ipv6);
    }
    // The truths those checks hold: what each preset serves and where it sits.
    let cgnat = doc
        .rows
        .iter()
        .find(|r| r.preset == "cgnat+all")
        .expect("row");
    assert_eq!(cgnat.expected.cgnat, Some(true));
    assert_eq!(
        cgnat.observed.as_ref().and_then(|o| o.external_address),
        Some("100.64.0.2".parse().expect("ip"))
    );
    let v4only = doc
        .rows
        .iter()
        .find(|r| r.preset == "ipv4-only")
        .expect("row");
    assert_eq!(v4only.observed.as_ref().and_then(|o| o.ipv6), Some(false));
}

#[test]
fn matrix_rejects_an_unknown_preset_before_building_anything() {
    let out = Command::new(natscope_bin())
        .args(["lab", "matrix", "--presets", "full-cone,nonsense"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset `nonsense`"));
}
