//! `natscope punch` end to end in labs: each peer behind its own userspace NAT, the rendezvous +
//! relay server on the reflector node. Outcomes follow NAT-REFERENCE.md "Hole punching outcomes".

use natscope_lab::topology::{RouterKind, UnsolicitedSyn};
use natscope_probes::punch::connector::{ConnectReport, SCHEMA};
use natscope_probes::punch::{PathTaken, Transport};
use natscope_tests::lab::require_root;
use natscope_tests::punch::{report, router, PunchLab};
use natscope_tests::ChildProcess;

fn assert_all_echoed(r: &ConnectReport, c: &ChildProcess) {
    assert_eq!(r.schema, SCHEMA);
    assert!(r.messages_sent > 0, "{}", c.diagnostics());
    assert_eq!(r.messages_echoed, r.messages_sent, "{}", c.diagnostics());
    assert!(r.in_order, "{}", c.diagnostics());
}

/// EIM on both sides: each side's probes to the other's server-reflexive address open its own
/// filter for the other's probes, so a direct path appears within a few probe rounds.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn udp_direct_through_two_port_restricted_cones() {
    require_root();
    let lab = PunchLab::up(
        "pudp",
        router("port-restricted-cone"),
        router("port-restricted-cone"),
    );
    let mut l = lab.listener("bob", &["--count", "1"]);
    let (code, c) = lab.connect("bob", &["--messages", "50"]);
    let r = report(&c);
    assert_eq!(code, 0, "{}", c.diagnostics());
    assert_eq!(r.path, PathTaken::Direct, "{}", c.diagnostics());
    assert_eq!(r.transport, Transport::Udp);
    assert_all_echoed(&r, &c);
    assert!(r.time_to_direct_ms.is_some());
    assert!(r.rtt_ms.is_some());
    // The direct peer is b's NAT's external address (203.0.113.x), not the relay.
    let peer = r.peer.map(|p| p.to_string()).unwrap_or_default();
    assert!(peer.starts_with("203.0.113."), "peer {peer}");
    eprintln!(
        "udp prc<->prc: time to direct {:?} ms, first byte {:?} ms, rtt {:?} ms",
        r.time_to_direct_ms, r.time_to_first_byte_ms, r.rtt_ms
    );
    assert!(
        l.wait_timeout(std::time::Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "listener serves one session and exits 0\n{}",
        l.diagnostics()
    );
    lab.down();
}

/// Two random symmetric NATs: each gives the other a different port than the server saw, and
/// each filter admits only the ports it sent to; neither keeps ports, so the birthday technique
/// has no easy side either (symmetric × port-restricted-cone is its case: `lab_grid.rs`). No
/// direct path, so the relay carries the data.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn udp_symmetric_to_symmetric_is_relayed() {
    require_root();
    let lab = PunchLab::up("psym", router("symmetric"), router("symmetric"));
    let _l = lab.listener("bob", &["--count", "1"]);
    let (code, c) = lab.connect("bob", &["--messages", "50"]);
    let r = report(&c);
    assert_eq!(code, 0, "{}", c.diagnostics());
    assert_eq!(r.path, PathTaken::Relayed, "{}", c.diagnostics());
    assert_eq!(r.time_to_direct_ms, None);
    assert_all_echoed(&r, &c);
    eprintln!(
        "udp sym<->sym relayed: first byte {:?} ms, rtt {:?} ms",
        r.time_to_first_byte_ms, r.rtt_ms
    );
    lab.down();
}

/// RFC 5382 simultaneous open: both sides connect from the port the server saw to each other's
/// server-reflexive address; EIM makes those the right addresses.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn tcp_simultaneous_open_through_two_eim_nats() {
    require_root();
    let lab = PunchLab::up(
        "ptcp",
        router("port-restricted-cone"),
        router("port-restricted-cone"),
    );
    let _l = lab.listener("bob", &["--count", "1", "--tcp"]);
    let (code, c) = lab.connect("bob", &["--tcp", "--messages", "50"]);
    let r = report(&c);
    assert_eq!(code, 0, "{}", c.diagnostics());
    assert_eq!(r.transport, Transport::Tcp);
    assert_eq!(r.path, PathTaken::Direct, "{}", c.diagnostics());
    assert_all_echoed(&r, &c);
    eprintln!(
        "tcp prc<->prc: time to direct {:?} ms, rtt {:?} ms",
        r.time_to_direct_ms, r.rtt_ms
    );
    lab.down();
}

/// An unknown id is a failed session (exit 1) with one clear line, not a hang.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn unknown_peer_is_a_clear_failure() {
    require_root();
    let lab = PunchLab::up("punk", router("full-cone"), router("full-cone"));
    let (code, c) = lab.connect("nobody", &[]);
    assert_eq!(code, 1, "{}", c.diagnostics());
    assert!(
        c.stderr().contains("no peer registered as `nobody`"),
        "{}",
        c.diagnostics()
    );
    lab.down();
}

/// Port prediction, on by default (issue 14, item 5): the sequential symmetric NAT gives the next
/// mapping the next port, so the cone side probes the measured delta ahead of the
/// server-reflexive port and hits the mapping the symmetric side opened toward it. With
/// `--no-predict` the same pair is relayed; `--predict` is still accepted and changes nothing.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn udp_port_prediction_through_a_sequential_symmetric_nat() {
    require_root();
    // Connector behind the sequential symmetric NAT predicts its own ports.
    let lab = PunchLab::up(
        "pred",
        router("symmetric-sequential"),
        router("port-restricted-cone"),
    );
    let _l = lab.listener("bob", &["--count", "3"]);
    let (code, c) = lab.connect("bob", &["--messages", "20", "--no-predict"]);
    assert_eq!(code, 0, "{}", c.diagnostics());
    let r = report(&c);
    assert_eq!(r.path, PathTaken::Relayed, "{}", c.diagnostics());
    assert!(r.attempts.predict.is_none(), "{}", c.diagnostics());
    for extra in [&[][..], &["--predict"][..]] {
        let (code, c) = lab.connect("bob", &[&["--messages", "20"][..], extra].concat());
        let r = report(&c);
        assert_eq!(code, 0, "{}", c.diagnostics());
        assert_eq!(r.path, PathTaken::Direct, "{}", c.diagnostics());
        let delta = r.attempts.predict.as_ref().and_then(|p| p.delta);
        assert_eq!(delta, Some(1), "{}", c.diagnostics());
        assert_all_echoed(&r, &c);
    }
    lab.down();

    // Listener behind it: it registers its delta (by default) and the connector probes ahead of
    // its port; `--no-predict` on the listener relays.
    let lab = PunchLab::up(
        "pred",
        router("port-restricted-cone"),
        router("symmetric-sequential"),
    );
    let mut l = lab.listener("bob", &["--count", "1"]);
    let (code, c) = lab.connect("bob", &["--messages", "20", "--no-predict"]);
    let r = report(&c);
    assert_eq!(code, 0, "{}", c.diagnostics());
    assert_eq!(r.path, PathTaken::Direct, "{}", c.diagnostics());
    assert_eq!(r.attempts.peer_port_delta, Some(1), "{}", c.diagnostics());
    let _ = l.wait_timeout(std::time::Duration::from_secs(10));
    let _l = lab.listener("carol", &["--count", "1", "--no-predict"]);
    let (code, c) = lab.connect("carol", &["--messages", "20", "--no-predict"]);
    let r = report(&c);
    assert_eq!(code, 0, "{}", c.diagnostics());
    assert_eq!(r.path, PathTaken::Relayed, "{}", c.diagnostics());
    assert_eq!(r.attempts.peer_port_delta, None, "{}", c.diagnostics());
    lab.down();
}

/// TCP through a symmetric NAT: the direct SYN leaves from a new external port that the cone's
/// filter never saw, so simultaneous open fails and the relay (over the server's TCP
/// connections) carries the data.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn tcp_symmetric_to_port_restricted_cone_is_relayed() {
    require_root();
    let lab = PunchLab::up("ptcr", router("symmetric"), router("port-restricted-cone"));
    let _l = lab.listener("bob", &["--count", "1", "--tcp"]);
    let (code, c) = lab.connect("bob", &["--tcp", "--messages", "50"]);
    let r = report(&c);
    assert_eq!(code, 0, "{}", c.diagnostics());
    assert_eq!(r.transport, Transport::Tcp);
    assert_eq!(r.path, PathTaken::Relayed, "{}", c.diagnostics());
    assert_all_echoed(&r, &c);
    lab.down();
}

/// A NAT that answers unsolicited SYNs with RST (against RFC 5382 REQ-4) kills the first
/// simultaneous-open attempt that reaches it early; the peer's SYN that follows is accepted on
/// the registered port (the listening socket beside the attempts), so the pair still goes direct.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn tcp_direct_when_both_nats_reset_unsolicited_syns() {
    require_root();
    let resetting = || match router("port-restricted-cone") {
        RouterKind::Engine(mut cfg) => {
            cfg.unsolicited_syn = UnsolicitedSyn::Reset;
            RouterKind::Engine(cfg)
        }
        other => other,
    };
    let lab = PunchLab::up("ptrs", resetting(), resetting());
    let _l = lab.listener("bob", &["--count", "3", "--tcp"]);
    for _ in 0..3 {
        let (code, c) = lab.connect("bob", &["--tcp", "--messages", "20"]);
        let r = report(&c);
        assert_eq!(code, 0, "{}", c.diagnostics());
        assert_eq!(r.path, PathTaken::Direct, "{}", c.diagnostics());
        assert_all_echoed(&r, &c);
        eprintln!(
            "tcp with resetting nats: direct after {:?} ms, accepted {}, connect attempts {}",
            r.time_to_direct_ms, r.attempts.tcp_accepted, r.attempts.tcp_connect_attempts
        );
    }
    let resets = |n: &str| lab.lab.nat_stats(n).map_or(0, |s| s.tcp_resets);
    eprintln!("resets sent by na {} nb {}", resets("na"), resets("nb"));
    lab.down();
}
