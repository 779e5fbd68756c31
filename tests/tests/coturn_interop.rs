//! Interop with coturn 4.6.1 in both directions, on 127.0.0.1 + 127.0.0.2 only.
//!
//! (a) coturn's RFC 5780 client, `turnutils_natdiscovery`, against our reflector (the `natscope`
//!     binary when built, else in-process). Its real output against natscope on loopback:
//!
//! ```text
//! -= Mapping Behavior Discovery =-
//! ========================================
//! RFC 5780 response 1
//! No ALG: Mapped == XOR-Mapped
//! 0: : IPv4. Response origin: : 127.0.0.1:P1
//! 0: : IPv4. Response origin: : 127.0.0.1:P1
//! 0: : IPv4. Other addr: : 127.0.0.2:P2
//! 0: : IPv4. UDP reflexive addr: 127.0.0.1:40106
//! 0: : IPv4. Local addr: : 127.0.0.1:40106
//! ========================================
//! No NAT! (Endpoint Independent Mapping)
//! ========================================
//! RFC 5780 response 2
//! No ALG: Mapped == XOR-Mapped
//! 0: : IPv4. Response origin: : 127.0.0.2:P1
//! 0: : IPv4. Other addr: : 127.0.0.1:P2
//! ...
//! NAT with Endpoint Independent Mapping!
//! -= Filtering Behavior Discovery =-
//! RFC 5780 response 3  ... Response origin: : 127.0.0.1:P1 ... No NAT! (Endpoint Independent Mapping)
//! RFC 5780 response 4  ... Response origin: : 127.0.0.2:P2 ... NAT with Endpoint Independent Filtering!
//! ```
//!
//! ("No NAT! (Endpoint Independent Mapping)" is what it prints after *each* test I, filtering
//! included; the filtering verdict is the last line.) It exits 0 whatever it finds, so the test
//! matches the text. Test II of its mapping run goes to OTHER-ADDRESS's IP at P1 (A2:P1), and the
//! filtering run's change-IP+port answer must come from A2:P2.
//!
//! (b) natscope's client (`transact_udp`) against `turnserver --stun-only`. `-n` is essential:
//!     Debian's /etc/turnserver.conf sets `no-rfc5780` (and `syslog`), and without two `-L`
//!     addresses coturn has no alternate IP, hence no OTHER-ADDRESS.

use std::process::Command;
use std::time::Duration;

use natscope_probes::client::{transact_udp, RequestOptions};
use natscope_probes::stun::{ChangeRequest, TransactionId};
use natscope_tests::{
    expected_source, require_tool, run_tool, sa, udp_client, Coturn, ReflectorUnderTest, A1,
    FAST_RTO,
};

#[test]
#[ignore = "needs coturn's turnutils_natdiscovery (package coturn); run with --include-ignored (scripts/test does)"]
fn natdiscovery_finds_endpoint_independent_mapping_and_filtering_on_our_reflector() {
    require_tool("turnutils_natdiscovery", "coturn");
    let r = ReflectorUnderTest::start();
    let (p1, alt) = (r.primary(), r.alternate());
    let mut cmd = Command::new("turnutils_natdiscovery");
    cmd.args(["-m", "-f", "-L", "127.0.0.1", "-p"])
        .arg(p1.port().to_string())
        .arg(p1.ip().to_string());
    // Each of its four receives waits at most 3 s; 40 s is a hang guard only.
    let run = run_tool(cmd, Duration::from_secs(40));
    let out = &run.stdout;
    let why = format!("{}\n{}", run.report(), r.diagnostics());

    assert_eq!(run.code(), Some(0), "{why}");
    assert_eq!(
        out.matches("RFC 5780 response").count(),
        4,
        "four RFC 5780 answers (OTHER-ADDRESS present):\n{why}"
    );
    assert!(
        out.contains("NAT with Endpoint Independent Mapping!"),
        "mapping verdict:\n{why}"
    );
    assert!(
        out.contains("NAT with Endpoint Independent Filtering!"),
        "filtering verdict:\n{why}"
    );
    for bad in [
        "STUN receive timeout",
        "The response is an error",
        "ALG detected",
        "not a STUN message",
        "Address Dependent",
        "Cannot read the response",
    ] {
        assert!(!out.contains(bad), "unexpected {bad:?}:\n{why}");
    }
    assert_eq!(
        out.matches("No ALG: Mapped == XOR-Mapped").count(),
        4,
        "{why}"
    );
    // Test I's answer names A2:P2; the mapping run's test II reached A2:P1; the filtering run's
    // change-IP+port answer came from A2:P2.
    assert!(out.contains(&format!("Other addr: : {alt}")), "{why}");
    let a2p1 = sa(alt.ip(), p1.port());
    assert!(out.contains(&format!("Response origin: : {a2p1}")), "{why}");
    assert!(out.contains(&format!("Response origin: : {alt}")), "{why}");
    if let Some(c) = r.counters() {
        assert!(c.change_both >= 1 && c.binding >= 3, "{c:?}\n{why}");
    }
}

#[tokio::test]
#[ignore = "needs coturn's turnserver (package coturn); run with --include-ignored (scripts/test does)"]
async fn our_client_reads_rfc5780_answers_from_coturn() {
    require_tool("turnserver", "coturn");
    let coturn = Coturn::start();
    let (primary, alternate) = (coturn.primary, coturn.alternate);
    let why = || coturn.child.diagnostics();

    for change in [
        ChangeRequest::NONE,
        ChangeRequest::IP,
        ChangeRequest::PORT,
        ChangeRequest::BOTH,
    ] {
        // A fresh socket per test, as RFC 5780 §3.2 asks of filtering tests.
        let client = udp_client(A1).await;
        let me = client.local_addr().unwrap();
        let o = RequestOptions {
            change,
            fingerprint: true,
            ..Default::default()
        };
        let resp = transact_udp(&client, primary, TransactionId::random(), &o, FAST_RTO)
            .await
            .unwrap_or_else(|e| panic!("{change:?} to coturn at {primary}: {e}\n{}", why()));
        let want = expected_source(
            primary,
            alternate,
            primary,
            change.change_ip,
            change.change_port,
        );
        let ctx = format!("{change:?}: {resp:?}\n{}", why());
        assert_eq!(resp.error_code, None, "{ctx}");
        assert_eq!(
            resp.source,
            Some(want),
            "answered from the changed address: {ctx}"
        );
        assert_eq!(resp.response_origin, Some(want), "RESPONSE-ORIGIN: {ctx}");
        assert_eq!(resp.other_address, Some(alternate), "OTHER-ADDRESS: {ctx}");
        assert_eq!(resp.xor_mapped, Some(me), "XOR-MAPPED-ADDRESS: {ctx}");
        assert!(
            resp.mapped.is_none() || resp.mapped == Some(me),
            "MAPPED-ADDRESS: {ctx}"
        );
        // coturn 4.6.1 fingerprints only some of its answers (not the change-IP ones); when it
        // does, our parser must agree the CRC is right.
        assert_ne!(resp.fingerprint_ok, Some(false), "FINGERPRINT: {ctx}");
        assert!(
            resp.software
                .as_deref()
                .is_some_and(|s| s.contains("Coturn")),
            "it really is coturn: {ctx}"
        );
    }
}

#[test]
#[ignore = "needs coturn's turnserver (package coturn); run with --include-ignored (scripts/test does)"]
fn coturn_pid_file_names_the_process_we_kill() {
    require_tool("turnserver", "coturn");
    let coturn = Coturn::start();
    let pid_file = coturn.dir.path().join("turnserver.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n{}",
            pid_file.display(),
            coturn.child.diagnostics()
        )
    });
    assert_eq!(
        pid.trim(),
        coturn.child.pid().to_string(),
        "{}",
        coturn.child.diagnostics()
    );
    let pid = coturn.child.pid();
    drop(coturn);
    let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.starts_with("turnserver"));
    assert!(!alive, "turnserver {pid} survived its guard");
}
