//! Relay-first upgrade: a stream of numbered messages that starts on the relay and moves to the
//! direct path when one appears arrives complete, once each, in order (issue 5, must-show 3).

use natscope_probes::punch::PathTaken;
use natscope_tests::lab::require_root;
use natscope_tests::punch::{report, router, PunchLab};

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn relay_first_stream_survives_the_switch_to_direct() {
    require_root();
    let lab = PunchLab::up("pup", router("full-cone"), router("port-restricted-cone"));
    let _l = lab.listener("bob", &["--count", "1"]);
    // 400 messages 4 ms apart: the stream is well under way on the relay when the direct path
    // appears, and goes on for more than a second after the switch.
    let (code, c) = lab.connect(
        "bob",
        &[
            "--relay-first",
            "--messages",
            "400",
            "--interval-ms",
            "4",
            "--timeout",
            "20",
        ],
    );
    let r = report(&c);
    let d = c.diagnostics();
    assert_eq!(code, 0, "{d}");
    assert_eq!(r.path, PathTaken::Direct, "{d}");
    assert!(r.switched_to_direct, "{d}");
    assert_eq!(r.messages_sent, 400, "{d}");
    assert_eq!(r.messages_echoed, r.messages_sent, "{d}");
    // Computed by the connector from the numbers inside the echoed payloads, in the order the
    // listener echoed them: any loss, duplicate or reordering across the switch makes it false.
    assert!(r.in_order, "{d}");
    let a = &r.attempts;
    assert!(
        a.data_sent_relayed > 0,
        "some messages went through the relay\n{d}"
    );
    assert!(a.data_sent_direct > 0, "and later ones went direct\n{d}");
    // Whether an echo also came back through the relay before the switch is a real-time race here:
    // the direct path opens about one round trip after the first relayed byte (89.8 vs 89.9 ms in
    // one measured run), so on a loaded host the listener may switch first (seen once in 37 runs).
    // That property is asserted deterministically on the virtual clock instead
    // (natscope-core punch::testnet, relay_first_upgrade_…).
    eprintln!(
        "relay-first: first byte {:?} ms, direct after {:?} ms, sent relayed {} / direct {}, \
         retransmissions {}, duplicates dropped {}",
        r.time_to_first_byte_ms,
        r.time_to_direct_ms,
        a.data_sent_relayed,
        a.data_sent_direct,
        a.retransmissions,
        a.duplicates_dropped
    );
    lab.down();
}
