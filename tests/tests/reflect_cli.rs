//! `natscope reflect` as an operator runs it: it stops cleanly on SIGTERM and Ctrl-C (SIGINT),
//! exits 0, and logs its final counters, including the request this test made.

use std::process::Command;
use std::time::Duration;

use natscope_tests::{free_ports, sa, spawn_natscope_reflect, A1, A2};

fn stops_cleanly_on(signal: &str) {
    let (mut child, ()) = spawn_natscope_reflect(3, || {
        let [p1, p2] = free_ports::<2>(&[A1, A2]);
        let (primary, alternate) = (sa(A1, p1), sa(A2, p2));
        let args = vec![
            "--primary".into(),
            primary.to_string(),
            "--alternate".into(),
            alternate.to_string(),
        ];
        (args, Vec::new(), vec![primary], ())
    });
    let sent = Command::new("kill")
        .args([format!("-{signal}"), child.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{signal} failed");
    let status = child
        .wait_timeout(Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "still running 5 s after SIG{signal}\n{}",
                child.diagnostics()
            )
        });
    assert_eq!(
        status.code(),
        Some(0),
        "after SIG{signal}\n{}",
        child.diagnostics()
    );
    let log = child.stderr();
    let stopped = log
        .lines()
        .find(|l| l.contains("stopped"))
        .unwrap_or_else(|| panic!("no final counters after SIG{signal}:\n{log}"));
    // The readiness probe made at least one Binding request; the counters must show it.
    assert!(!stopped.contains("requests=0 "), "{stopped}");
    assert!(stopped.contains("requests="), "{stopped}");
}

#[test]
fn sigterm_stops_with_final_counters() {
    stops_cleanly_on("TERM");
}

#[test]
fn sigint_stops_with_final_counters() {
    stops_cleanly_on("INT");
}
