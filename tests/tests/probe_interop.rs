//! `natscope probe` against two RFC 5780 servers on 127.0.0.1 + 127.0.0.2: coturn 4.6.1
//! (`turnserver --stun-only`, started the way coturn_interop.rs does) and `natscope reflect`.
//! Loopback has no NAT and no filter, so both must yield the same verdict: open internet, mapping
//! and filtering endpoint-independent, no server problem. Checked through the engine
//! (`driver::run`) and through the binary's `--json` output.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use natscope_probes::probe::{report::SCHEMA, AllocationPattern, Behavior, Classic, ProbeReport};
use natscope_tests::{
    natscope_bin, probe_engine, require_tool, run_tool, Coturn, ReflectorUnderTest, ToolRun,
};

/// The verdicts that must not depend on which RFC 5780 server answered.
fn verdicts(r: &ProbeReport) -> String {
    format!(
        "udp_blocked={} nat={:?} mapping={:?} filtering={:?} classic={:?} preservation={:?} \
         allocation={:?} hairpinning={:?} alg={:?} problems={:?}",
        r.udp_blocked,
        r.nat_detected,
        r.mapping,
        r.filtering,
        r.classic,
        r.port_preservation,
        r.port_allocation.pattern,
        r.hairpinning,
        r.alg_detected,
        r.server.problems
    )
}

fn assert_open_internet(r: &ProbeReport, alternate: SocketAddr, why: &str) {
    let json = serde_json::to_string_pretty(r).unwrap_or_default();
    let ctx = format!("{json}\n{why}");
    assert!(!r.udp_blocked, "{ctx}");
    assert_eq!(r.nat_detected, Some(false), "{ctx}");
    assert_eq!(r.mapping, Behavior::EndpointIndependent, "{ctx}");
    assert_eq!(r.filtering, Behavior::EndpointIndependent, "{ctx}");
    assert_eq!(r.classic, Classic::OpenInternet, "{ctx}");
    assert_eq!(
        r.port_allocation.pattern,
        AllocationPattern::Preserving,
        "{ctx}"
    );
    assert!(r.server.problems.is_empty(), "{ctx}");
    assert_eq!(r.server.other_address, Some(alternate), "{ctx}");
    assert_eq!(r.public_address, r.local_address, "{ctx}");
}

/// `natscope probe SERVER --json`, bounded by a hang guard, read into the library's report.
fn probe_json(server: SocketAddr) -> (ToolRun, ProbeReport) {
    let mut cmd = Command::new(natscope_bin());
    cmd.args(["probe", &server.to_string(), "--json"]);
    let run = run_tool(cmd, Duration::from_secs(60));
    let report = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one natscope.probe/v1 document: {e}\n{}",
            run.report()
        )
    });
    natscope_tests::schema::assert_valid_text(&run.stdout);
    (run, report)
}

fn assert_open_internet_json(
    r: &ProbeReport,
    primary: SocketAddr,
    alternate: SocketAddr,
    why: &str,
) {
    assert_eq!(r.schema, SCHEMA, "{why}");
    assert!(!r.udp_blocked, "{why}");
    assert_eq!(r.nat_detected, Some(false), "{why}");
    assert_eq!(r.mapping, Behavior::EndpointIndependent, "{why}");
    assert_eq!(r.filtering, Behavior::EndpointIndependent, "{why}");
    assert_eq!(r.classic, Classic::OpenInternet, "{why}");
    assert_eq!(r.server.address, primary, "{why}");
    assert_eq!(r.server.other_address, Some(alternate), "{why}");
    assert!(r.server.problems.is_empty(), "{why}");
}

#[test]
#[ignore = "needs coturn's turnserver (package coturn); run with --include-ignored (scripts/test does)"]
fn engine_verdicts_against_coturn_equal_those_against_natscope_reflect() {
    require_tool("turnserver", "coturn");
    let coturn = Coturn::start();
    let ours = ReflectorUnderTest::start();
    let theirs = probe_engine(coturn.primary);
    let mine = probe_engine(ours.primary());
    let why = format!("{}\n{}", coturn.child.diagnostics(), ours.diagnostics());
    assert_open_internet(&theirs, coturn.alternate, &why);
    assert_open_internet(&mine, ours.alternate(), &why);
    assert_eq!(verdicts(&theirs), verdicts(&mine), "{why}");
}

#[test]
#[ignore = "needs coturn's turnserver (package coturn); run with --include-ignored (scripts/test does)"]
fn binary_json_against_coturn_is_open_internet() {
    require_tool("turnserver", "coturn");
    let coturn = Coturn::start();
    let (run, doc) = probe_json(coturn.primary);
    let why = format!("{}\n{}", run.report(), coturn.child.diagnostics());
    assert_eq!(run.code(), Some(0), "{why}");
    assert_open_internet_json(&doc, coturn.primary, coturn.alternate, &why);
}

#[test]
fn binary_json_against_natscope_reflect_is_open_internet() {
    let ours = ReflectorUnderTest::start();
    let (run, doc) = probe_json(ours.primary());
    let why = format!("{}\n{}", run.report(), ours.diagnostics());
    assert_eq!(run.code(), Some(0), "{why}");
    assert_eq!(run.stderr, "", "{why}");
    assert_open_internet_json(&doc, ours.primary(), ours.alternate(), &why);
}
