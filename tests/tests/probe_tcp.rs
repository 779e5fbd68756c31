//! `natscope probe --tcp`: the TCP mapping test (RFC 5382 §4.1 over STUN-over-TCP) against an
//! in-process reflector on 127.0.0.1 + 127.0.0.2. Loopback has no NAT, so every connection from
//! the shared local port must be mapped to itself: endpoint-independent, port preserved. A
//! one-address reflector gives no OTHER-ADDRESS, so the verdict must be `unknown` with that reason.

use std::process::Command;
use std::time::Duration;

use natscope_probes::probe::tcp::tcp_mapping;
use natscope_probes::probe::{Behavior, ProbeReport};
use natscope_tests::{natscope_bin, run_tool, TestReflector, A1};

/// Per-step bound: loopback answers in microseconds, so this only guards against a hang.
const STEP: Duration = Duration::from_secs(3);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn loopback_tcp_mapping_is_endpoint_independent_and_preserves_the_port() {
    let r = TestReflector::start();
    let res = runtime().block_on(tcp_mapping(r.primary, A1, STEP));
    let why = format!("{res:#?}\ncounters {:?}", r.counters());
    assert_eq!(res.behavior, Behavior::EndpointIndependent, "{why}");
    let local = res.local_address.expect("a local address");
    assert_eq!(local.ip(), A1, "{why}");
    assert_eq!(res.m1, Some(local), "no NAT on loopback: {why}");
    assert_eq!(res.m2, Some(local), "{why}");
    assert_eq!(res.m3, Some(local), "{why}");
    assert_eq!(res.port_preserved, Some(true), "{why}");
    assert_eq!(res.other_address, r.alternate, "{why}");
    assert_eq!(res.reason, None, "{why}");
    assert_eq!(res.requests_sent, 3, "{why}");
    assert!(r.counters().tcp_connections >= 3, "{why}");
    let row = res.test_row();
    assert_eq!(row.name, "tcp mapping");
    assert_eq!(row.verdict, "endpoint-independent");
    assert!(
        row.evidence.contains(&format!("via A2:P2 {local}")),
        "{}",
        row.evidence
    );
}

#[test]
fn one_address_reflector_gives_unknown_for_want_of_other_address() {
    let r = TestReflector::start_with(false, |_| {});
    let res = runtime().block_on(tcp_mapping(r.primary, A1, STEP));
    let why = format!("{res:#?}");
    assert_eq!(res.behavior, Behavior::Unknown, "{why}");
    assert!(
        res.reason
            .as_deref()
            .is_some_and(|s| s.contains("no OTHER-ADDRESS")),
        "{why}"
    );
    assert_eq!(res.other_address, None, "{why}");
    assert!(res.m1.is_some(), "the primary answered: {why}");
    assert_eq!(res.m2, None, "{why}");
    assert_eq!(res.requests_sent, 1, "{why}");
}

#[test]
fn reflector_without_tcp_gives_unknown_with_the_connect_error() {
    let r = TestReflector::start_with(true, |c| c.tcp = false);
    let res = runtime().block_on(tcp_mapping(r.primary, A1, STEP));
    let why = format!("{res:#?}");
    assert_eq!(res.behavior, Behavior::Unknown, "{why}");
    assert!(
        res.reason
            .as_deref()
            .is_some_and(|s| s.contains("cannot connect to")),
        "{why}"
    );
    assert_eq!(res.requests_sent, 0, "{why}");
}

#[test]
fn binary_probe_tcp_json_reports_endpoint_independent() {
    let r = TestReflector::start();
    let mut cmd = Command::new(natscope_bin());
    cmd.args(["probe", &r.primary.to_string(), "--tcp", "--json"]);
    let run = run_tool(cmd, Duration::from_secs(60));
    let why = run.report();
    assert_eq!(run.code(), Some(0), "{why}");
    let report: ProbeReport = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one natscope.probe/v1 document: {e}\n{why}"));
    natscope_tests::schema::assert_valid_text(&run.stdout);
    assert_eq!(report.tcp_mapping, Behavior::EndpointIndependent, "{why}");
    assert_eq!(report.tcp_port_preservation, Some(true), "{why}");
    assert_eq!(report.mapping, Behavior::EndpointIndependent, "{why}");
    let row = report
        .tests
        .iter()
        .find(|t| t.name == "tcp mapping")
        .unwrap_or_else(|| panic!("no tcp mapping row: {why}"));
    assert_eq!(row.verdict, "endpoint-independent", "{why}");
    assert_eq!(row.requests_sent, 3, "{why}");
}

#[test]
#[ignore = "needs coturn's turnserver (package coturn); run with --include-ignored (scripts/test does)"]
fn coturn_over_tcp_is_endpoint_independent_like_natscope_reflect() {
    natscope_tests::require_tool("turnserver", "coturn");
    let coturn = natscope_tests::Coturn::start_with_tcp();
    let res = runtime().block_on(tcp_mapping(coturn.primary, A1, STEP));
    let why = format!("{res:#?}\n{}", coturn.child.diagnostics());
    assert_eq!(res.behavior, Behavior::EndpointIndependent, "{why}");
    let local = res.local_address.expect("a local address");
    assert_eq!(
        [res.m1, res.m2, res.m3],
        [Some(local); 3],
        "no NAT on loopback: {why}"
    );
    assert_eq!(res.other_address, Some(coturn.alternate), "{why}");
    assert_eq!(res.port_preserved, Some(true), "{why}");
    assert_eq!(res.reason, None, "{why}");
}
