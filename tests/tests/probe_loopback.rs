//! `natscope probe`'s engine over real sockets against `natscope reflect` on 127.0.0.1 + 127.0.0.2:
//! loopback has no NAT and no filter, so every test must conclude "open internet" with no problem.

use natscope_probes::probe::{AllocationPattern, Behavior, Classic};
use natscope_tests::{probe_engine, TestReflector};

#[test]
fn loopback_reflector_is_open_internet_with_every_test_passing() {
    let r = TestReflector::start();
    let report = probe_engine(r.primary);
    let json = serde_json::to_string_pretty(&report).unwrap();
    assert!(!report.udp_blocked, "{json}");
    assert_eq!(report.nat_detected, Some(false), "{json}");
    assert_eq!(report.mapping, Behavior::EndpointIndependent, "{json}");
    assert_eq!(report.filtering, Behavior::EndpointIndependent, "{json}");
    assert_eq!(report.classic, Classic::OpenInternet, "{json}");
    assert_eq!(
        report.port_allocation.pattern,
        AllocationPattern::Preserving,
        "{json}"
    );
    assert_eq!(report.port_preservation, Some(true), "{json}");
    assert_eq!(
        report.hairpinning, None,
        "not applicable without a NAT: {json}"
    );
    assert_eq!(report.alg_detected, Some(false), "{json}");
    assert!(report.server.problems.is_empty(), "{json}");
    assert_eq!(report.server.other_address, r.alternate);
    assert_eq!(report.public_address, report.local_address);
}
