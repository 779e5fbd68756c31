//! The engine's small-packet forwarding rate through a real lab, IPv4 next to IPv6 (issue 13's
//! benchmark note): 64-byte UDP from `h1` to `stun` through `dual-stack`'s router, the families
//! interleaved so machine load hits both alike. Prints the rates; asserts only that both paths
//! forward. Run: `cargo test -p natscope-tests --test lab_ipv6_bench -- --ignored --nocapture`.

use std::time::Duration;

use natscope_lab::bench::udp_flood_over;
use natscope_lab::presets;
use natscope_lab::Lab;
use natscope_tests::lab::*;

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn engine_forwards_small_ipv4_and_ipv6_packets() {
    require_root();
    let plan = presets::preset("dual-stack")
        .expect("preset")
        .plan()
        .expect("plan");
    let lab = Lab::up(&lab_name("v6la"), plan, options()).expect("lab up");
    let secs = Duration::from_secs(2);
    for round in 0..2 {
        for (family, ipv6) in [("ipv4", false), ("ipv6", true)] {
            for rate in [None, Some(20_000)] {
                let u = udp_flood_over(&lab, "dual-stack", secs, rate, ipv6).expect("flood");
                println!(
                    "round {round} {family} offered {:>6}: sent {:>7.0}/s received {:>7.0}/s engine forwarded {:?}",
                    rate.map_or("flood".to_string(), |r| r.to_string()),
                    u.sent_per_second,
                    u.received_per_second,
                    u.nat_forwarded.map(|n| (n as f64 / u.seconds).round())
                );
                assert!(u.received > 0, "{family}: nothing arrived");
            }
        }
    }
    lab.down();
}
