//! Issue 13, must-show 3: `natscope lab grid --family ipv4,ipv6` over `dual-stack`,
//! `dual-stack-strict`, `nptv6` and `symmetric` (a symmetric IPv4 NAT whose IPv6 side is the
//! default RFC 6092 firewall, endpoint-independent filtering): every cell carries its family, the
//! IPv6 cells match the traversal model fed with the presets' IPv6 behavior, the lab saw the path
//! (its routers counted the IPv6 packets), and a pair relayed over IPv4 goes direct over IPv6.

use natscope_lab::grid::{self, Family, GridCell, PathTaken, Transport};
use natscope_lab::presets::{self, Ipv6Truth};
use natscope_tests::lab::{require_root, run_grid};

const PRESETS: [&str; 4] = ["dual-stack", "dual-stack-strict", "nptv6", "symmetric"];

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn ipv6_cells_match_the_model_and_a_relayed_ipv4_pair_goes_direct_over_ipv6() {
    require_root();
    // `symmetric` is the symmetric IPv4 NAT with an IPv6 firewall this must-show names.
    let sym = presets::expected("symmetric").expect("preset");
    assert!(
        matches!(sym.ipv6, Ipv6Truth::Present { .. }),
        "{:?}",
        sym.ipv6
    );
    let presets = PRESETS.join(",");
    let (doc, out) = run_grid(&[
        "--lab-prefix",
        "v6pu",
        "--presets",
        &presets,
        "--transport",
        "udp",
        "--family",
        "ipv4,ipv6",
    ]);
    let n = PRESETS.len();
    assert_eq!(
        doc.cells.len(),
        n * (n + 1) / 2 * 2,
        "every pair, both families"
    );
    let bad: Vec<&GridCell> = doc.cells.iter().filter(|c| !c.pass).collect();
    assert!(
        bad.is_empty(),
        "unexpected outcomes:\n{}",
        serde_json::to_string_pretty(&bad).unwrap()
    );
    for c in &doc.cells {
        let family = c.family.expect("every cell has its family");
        let (want, _) = grid::expected_in(&c.a, &c.b, Transport::Udp, family).unwrap();
        assert_eq!(c.expected, want, "{c:#?}");
        let accepted = grid::path_accepted(&c.a, &c.b, c.transport, c.family, want, c.observed);
        assert!(accepted, "{c:#?}");
        assert_eq!(c.messages_echoed, c.messages_sent, "{c:#?}");
        // The lab judged the same path from what its routers forwarded.
        assert_eq!(c.lab_observed, c.observed, "{c:#?}");
        let e = c.evidence.as_ref().expect("evidence");
        let report_family = |r: &GridCell| r.report.as_ref().and_then(|r| r.family);
        if c.observed == Some(PathTaken::Direct) {
            assert!(e.direct_a_to_b.packets > 0 && e.direct_b_to_a.packets > 0);
            // The direct flows the routers counted are of the cell's family.
            let direct_v6 = e.a.flows.iter().any(|f| {
                f.remote.is_ipv6() && !e.rendezvous6.contains(&ip6(f.remote)) && f.in_packets > 0
            });
            assert_eq!(direct_v6, family == Family::Ipv6, "{e:#?}");
        }
        // A passing cell keeps no report; a kept one says which family won.
        if let Some(f) = report_family(c) {
            assert_eq!(f, family);
        }
    }
    // The must-show: relayed on IPv4, direct on IPv6, for the same pair.
    let cell = |a: &str, b: &str, f: Family| {
        doc.cell(Transport::Udp, f, a, b)
            .and_then(|c| c.observed)
            .unwrap_or_else(|| panic!("no {a} × {b} cell in {f:?}"))
    };
    assert_eq!(
        cell("symmetric", "symmetric", Family::Ipv4),
        PathTaken::Relayed
    );
    assert_eq!(
        cell("symmetric", "symmetric", Family::Ipv6),
        PathTaken::Direct
    );
    // APDF on both sides (dual-stack-strict): direct only because both peers punch.
    assert_eq!(
        cell("dual-stack-strict", "dual-stack-strict", Family::Ipv6),
        PathTaken::Direct
    );
    assert_eq!(out.status.code(), Some(0));
}

fn ip6(a: std::net::SocketAddr) -> std::net::Ipv6Addr {
    match a.ip() {
        std::net::IpAddr::V6(ip) => ip,
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped(),
    }
}
