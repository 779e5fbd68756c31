//! The operator files under examples/deploy/ are checked by systemd's own tools, so a typo in the
//! unit or a sandboxing option dropped by accident fails CI instead of a deployment.

use std::path::{Path, PathBuf};
use std::process::Command;

use natscope_tests::{natscope_bin, require_tool, TempDir};

const UNIT: &str = "natscope-reflect.service";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The shipped unit, with ExecStart pointing at the binary this test run built (systemd-analyze
/// checks that the command exists), in a fresh directory.
fn unit_for_this_build() -> (TempDir, PathBuf) {
    let text = std::fs::read_to_string(repo_file("examples/deploy/natscope-reflect.service"))
        .expect("examples/deploy/natscope-reflect.service is readable");
    assert!(
        text.contains("ExecStart=/usr/local/bin/natscope reflect "),
        "the unit's ExecStart changed; update this test"
    );
    let text = text.replace(
        "/usr/local/bin/natscope",
        natscope_bin().to_str().expect("a UTF-8 path"),
    );
    let dir = TempDir::new("deploy");
    let path = dir.path().join(UNIT);
    std::fs::write(&path, text).expect("the unit copy is written");
    (dir, path)
}

#[test]
#[ignore = "needs systemd-analyze (Debian package systemd); run with --include-ignored (scripts/test does)"]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let tool = require_tool("systemd-analyze", "systemd");
    let (_dir, unit) = unit_for_this_build();
    let out = Command::new(tool)
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 even for unknown keys; every complaint is a line on stderr.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify complained ({}):\n{stderr}",
        out.status
    );
}

#[test]
#[ignore = "needs systemd-analyze (Debian package systemd); run with --include-ignored (scripts/test does)"]
fn the_systemd_unit_keeps_its_sandbox() {
    let tool = require_tool("systemd-analyze", "systemd");
    let (_dir, unit) = unit_for_this_build();
    // systemd's exposure score, 0 (locked down) to 10; the unit scores 1.2 with systemd 252.
    // --threshold is in tenths: more than 1.5 fails (dropping DynamicUser= alone gives 1.6).
    let out = Command::new(tool)
        .args(["security", "--offline=true", "--threshold=15", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let overall = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no overall exposure line");
    assert!(
        out.status.success(),
        "the unit's sandbox got weaker: {overall}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
