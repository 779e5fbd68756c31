//! Issue 5, must-show 1: `natscope lab matrix` over every preset passes — the probe, run as a real
//! process behind each preset's NAT, agrees with the NAT's configured behavior on every verdict.

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
