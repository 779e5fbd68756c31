//! A rendezvous server killed mid-session, or a listener killed mid-session, ends the connect
//! with one clear error line and exit 1 within bounded time — never a hang (issue 5,
//! must-show 4).

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use natscope_probes::punch::PathTaken;
use natscope_tests::lab::require_root;
use natscope_tests::punch::{report, router, serve, wait_for, PunchLab};
use natscope_tests::ChildProcess;

/// Generous bound on how long after the kill the connector must have exited.
const BOUND: Duration = Duration::from_secs(15);

/// A long, paced stream (100 messages/s for up to 60 s) so the kill lands mid-session.
const LONG: &[&str] = &[
    "--messages",
    "6000",
    "--interval-ms",
    "10",
    "--timeout",
    "60",
];

/// Waits for the connector to exit; panics if it still runs [`BOUND`] after `what`.
fn exit_within_bound(c: &mut ChildProcess, what: &str) -> ExitStatus {
    c.wait_timeout(BOUND).unwrap_or_else(|| {
        panic!(
            "connect still running {BOUND:?} after the {what}\n{}",
            c.diagnostics()
        )
    })
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn rendezvous_server_killed_mid_relayed_session() {
    require_root();
    // Symmetric <-> symmetric: the session runs on the relay, so it needs the server (with a
    // port-keeping side the birthday technique could open a direct path).
    let mut lab = PunchLab::up("pkls", router("symmetric"), router("symmetric"));
    let _l = lab.listener("bob", &[]);
    // Relay-first: data flows through the relay from the start (and stays there: no direct path
    // exists between these two NATs).
    let mut args = vec!["--relay-first"];
    args.extend_from_slice(LONG);
    let mut c = lab.connector("bob", &args);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(c.exited().is_none(), "still running\n{}", c.diagnostics());
    let killed = Instant::now();
    lab.server.kill();
    let status = exit_within_bound(&mut c, "kill");
    let took = killed.elapsed();
    let d = c.diagnostics();
    assert_eq!(status.code(), Some(1), "{d}");
    let err = c.stderr();
    assert!(
        err.contains("rendezvous server 198.51.100.1:3490 stopped answering"),
        "{d}"
    );
    assert_eq!(err.lines().count(), 1, "one clear line\n{d}");
    let r = report(&c);
    assert_eq!(r.path, PathTaken::Failed, "{d}");
    assert!(r.messages_echoed > 0, "data flowed before\n{d}");
    eprintln!(
        "server killed: connect exited 1 after {took:?}: {}",
        err.trim()
    );
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn listener_killed_mid_direct_session() {
    require_root();
    let lab = PunchLab::up(
        "pkll",
        router("port-restricted-cone"),
        router("port-restricted-cone"),
    );
    let mut l = lab.listener("bob", &[]);
    let mut c = lab.connector("bob", LONG);
    wait_for(&mut l, |l| l.stdout().contains("punching"), "in a session");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(c.exited().is_none(), "still running\n{}", c.diagnostics());
    let killed = Instant::now();
    l.kill();
    let status = exit_within_bound(&mut c, "kill");
    let took = killed.elapsed();
    let d = c.diagnostics();
    assert_eq!(status.code(), Some(1), "{d}");
    let err = c.stderr();
    assert!(err.contains("peer stopped answering"), "{d}");
    assert_eq!(err.lines().count(), 1, "one clear line\n{d}");
    eprintln!(
        "listener killed: connect exited 1 after {took:?}: {}",
        err.trim()
    );
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn tcp_listener_killed_mid_session() {
    require_root();
    let lab = PunchLab::up("pklt", router("full-cone"), router("full-cone"));
    let mut l = lab.listener("bob", &["--tcp"]);
    let mut args = vec!["--tcp"];
    args.extend_from_slice(LONG);
    let mut c = lab.connector("bob", &args);
    wait_for(&mut l, |l| l.stdout().contains("punching"), "in a session");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(c.exited().is_none(), "still running\n{}", c.diagnostics());
    let killed = Instant::now();
    l.kill();
    let status = exit_within_bound(&mut c, "kill");
    let d = c.diagnostics();
    assert_eq!(status.code(), Some(1), "{d}");
    assert!(c.stderr().contains("peer"), "{d}");
    eprintln!(
        "tcp listener killed: connect exited 1 after {:?}: {}",
        killed.elapsed(),
        c.stderr().trim()
    );
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn rendezvous_server_restarted_mid_relayed_session() {
    require_root();
    let mut lab = PunchLab::up("pkrs", router("symmetric"), router("symmetric"));
    let _l = lab.listener("bob", &[]);
    let mut args = vec!["--relay-first"];
    args.extend_from_slice(LONG);
    let mut c = lab.connector("bob", &args);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(c.exited().is_none(), "still running\n{}", c.diagnostics());
    let killed = Instant::now();
    lab.server.kill();
    // A fresh server on the same address: it knows neither the registration nor the session.
    lab.server = serve(&lab.lab);
    let status = exit_within_bound(&mut c, "restart");
    let d = c.diagnostics();
    assert_eq!(status.code(), Some(1), "{d}");
    let err = c.stderr();
    assert!(
        err.contains("no longer knows this session (it restarted"),
        "{d}"
    );
    eprintln!(
        "server restarted: connect exited 1 after {:?}: {}",
        killed.elapsed(),
        err.trim()
    );
    lab.down();
}
