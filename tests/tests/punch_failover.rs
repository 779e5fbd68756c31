//! Relay failover through the binary, on loopback (issue 14, must-show 2): three `punch serve`,
//! a listener registered with all three; one server is killed before the connect (the connector
//! skips it) and the one relaying the session is killed mid-stream: the session moves to the
//! surviving relay and every message comes back, in order, exactly once.
//!
//! Loopback always has a direct path, so the connector runs with `NATSCOPE_PUNCH_RELAY_ONLY`
//! (its socket talks only to the servers, as if two NATs no punch gets through stood between
//! the peers) and `--relay-first`: the session is relayed from its first message to its last.

use std::process::Command;
use std::time::{Duration, Instant};

use natscope_probes::punch::connector::ConnectReport;
use natscope_probes::punch::driver::RELAY_ONLY_ENV;
use natscope_probes::punch::PathTaken;
use natscope_tests::lab::require_root;
use natscope_tests::punch::{
    finish, loopback_server, natscope_here, report, router, spawn_in, wait_for, PunchLab,
};
use natscope_tests::{natscope_bin, ChildProcess};

const MESSAGES: u64 = 600;

#[test]
fn a_relayed_session_moves_to_the_surviving_relay_when_its_server_is_killed() {
    let (mut dead_before, c_addr) = loopback_server();
    let (mut relaying, a_addr) = loopback_server();
    let (_survivor, b_addr) = loopback_server();
    let mut l = natscope_here(&[
        "punch", "listen", "--id", "bob", "--via", &a_addr, "--via", &b_addr, "--via", &c_addr,
        "--count", "1",
    ]);
    wait_for(
        &mut l,
        |p| p.stdout().matches("registered").count() == 3,
        "registered with all three",
    );
    // Killed before the session: the connector asks it first and goes on to the next.
    dead_before.kill();
    let mut cmd = Command::new(natscope_bin());
    cmd.env(RELAY_ONLY_ENV, "1").args([
        "punch",
        "connect",
        "bob",
        "--via",
        &c_addr,
        "--via",
        &a_addr,
        "--via",
        &b_addr,
        "--relay-first",
        "--messages",
        &MESSAGES.to_string(),
        "--interval-ms",
        "10",
        "--timeout",
        "40",
        "--json",
    ]);
    let mut c = ChildProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    wait_for(&mut l, |p| p.stdout().contains("punching"), "in a session");
    // About a second of data through A's relay, then A dies by pid mid-stream.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(c.exited().is_none(), "still sending\n{}", c.diagnostics());
    let killed = Instant::now();
    relaying.kill();
    let code = finish(&mut c, Duration::from_secs(45));
    let took = killed.elapsed();
    let d = format!("{}\nlistener:\n{}", c.diagnostics(), l.diagnostics());
    assert_eq!(code, 0, "{d}");
    let r: ConnectReport =
        serde_json::from_str(&c.stdout()).unwrap_or_else(|e| panic!("not a report: {e}\n{d}"));
    assert_eq!(r.path, PathTaken::Relayed, "{d}");
    assert_eq!(r.attempts.data_sent_direct, 0, "relayed throughout\n{d}");
    assert_eq!(
        (r.messages_sent, r.messages_echoed),
        (MESSAGES, MESSAGES),
        "{d}"
    );
    // Each echo exactly once and in order, from the numbers inside the echoes.
    assert!(r.in_order, "{d}");
    assert_eq!(r.attempts.error, None, "{d}");
    // The listener served the one session (moved from its machine at A to the one at B) and
    // echoed every message once.
    assert_eq!(finish(&mut l, Duration::from_secs(10)), 0, "{d}");
    assert!(
        l.stdout()
            .contains(&format!("relayed, {MESSAGES} messages echoed")),
        "{d}"
    );
    eprintln!(
        "relay killed mid-session: the connect ended {took:?} later, {} retransmissions, {} relayed sends",
        r.attempts.retransmissions, r.attempts.data_sent_relayed
    );
}

/// The same across real NATs in a lab: symmetric ↔ port-restricted cone has no direct path, so
/// the session is relayed by the first server; a second `punch serve` (its own process and
/// port on the same node, no shared state) takes over when the first is killed mid-session.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn across_nats_a_relayed_session_moves_to_the_second_server() {
    require_root();
    // Two random symmetric NATs: no direct path, not even by the birthday technique.
    let mut lab = PunchLab::up("fail", router("symmetric"), router("symmetric"));
    let second = "198.51.100.1:3491";
    let mut s2 = spawn_in(&lab.lab, "stun", &["punch", "serve", "--listen", second]);
    wait_for(
        &mut s2,
        |p| p.stderr().contains("punch server on"),
        "serving",
    );
    let mut l = lab.listener("bob", &["--via", second, "--count", "1"]);
    wait_for(
        &mut l,
        |p| p.stdout().matches("registered").count() == 2,
        "registered with both",
    );
    let n = MESSAGES.to_string();
    let args = [
        "--via",
        second,
        "--relay-first",
        "--messages",
        &n,
        "--interval-ms",
        "10",
        "--timeout",
        "40",
    ];
    let mut c = lab.connector("bob", &args);
    wait_for(&mut l, |p| p.stdout().contains("punching"), "in a session");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(c.exited().is_none(), "still sending\n{}", c.diagnostics());
    let killed = Instant::now();
    lab.server.kill();
    let code = finish(&mut c, Duration::from_secs(45));
    let took = killed.elapsed();
    let d = format!("{}\nlistener:\n{}", c.diagnostics(), l.diagnostics());
    assert_eq!(code, 0, "{d}");
    let r = report(&c);
    assert_eq!(r.path, PathTaken::Relayed, "{d}");
    assert_eq!(
        (r.messages_sent, r.messages_echoed),
        (MESSAGES, MESSAGES),
        "{d}"
    );
    assert!(r.in_order, "{d}");
    assert_eq!(finish(&mut l, Duration::from_secs(10)), 0, "{d}");
    eprintln!(
        "lab: relay killed mid-session, the connect ended {took:?} later, {} retransmissions",
        r.attempts.retransmissions
    );
    drop(s2);
    lab.down();
}
