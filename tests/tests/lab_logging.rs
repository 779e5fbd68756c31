//! Issue 16: the lab supervisor is logged like every natscope command. `lab up` starts it with
//! its own `-v`/`-q`, and its stderr is the lab's log (`natscope_lab::control::launch`), so what
//! the supervisor logs — its start, and warnings such as a namespace it could not remove — lands
//! in /run/natscope/labs/NAME.log at the level the user asked for.

use std::process::Command;

use natscope_lab::registry;
use natscope_tests::lab::*;
use natscope_tests::natscope_bin;

/// Brings preset `open` up with `flags`, returns the supervisor's log, takes the lab down.
fn supervisor_log(flags: &[&str]) -> String {
    let name = lab_name("clilg");
    let out = Command::new(natscope_bin())
        .args(flags)
        .args(["lab", "up", "open", "--name", &name])
        .env_remove("RUST_LOG")
        .output()
        .expect("run natscope lab up");
    let log = std::fs::read_to_string(registry::log_path(&name)).unwrap_or_default();
    let down = natscope(&["lab", "down", &name]);
    assert!(out.status.success(), "lab up {flags:?}: {}", text(&out));
    assert!(down.status.success(), "lab down: {}", text(&down));
    log
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn the_supervisor_logs_to_the_lab_log_at_the_level_lab_up_was_given() {
    require_root();
    // A server logs at info by default: the supervisor says it is up.
    let log = supervisor_log(&[]);
    assert!(
        log.contains("INFO") && log.contains("supervising"),
        "log:\n{log}"
    );
    assert!(!log.contains('\x1b'), "colours in a log file:\n{log:?}");
    // One -q on `lab up` reaches the supervisor: warnings only.
    let log = supervisor_log(&["-q"]);
    assert!(
        !log.contains("supervising"),
        "-q did not reach the supervisor:\n{log}"
    );
    // -vv: more than the default, never less.
    let log = supervisor_log(&["-vv"]);
    assert!(log.contains("supervising"), "log:\n{log}");
}
