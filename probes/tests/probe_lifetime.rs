//! The binding-lifetime probe (RFC 5780 §4.6, RFC 4787 REQ-6) against the simulated network, on a
//! virtual clock: the measured lifetime must bracket the NAT's configured UDP timeout to the
//! search resolution, inbound refresh must be reported as configured, a host without a NAT gets
//! "not applicable", and under loss every verdict is the truth or unknown.

use std::time::Duration;

use natscope_probes::nat::{FilteringBehavior as F, MappingBehavior as M, NatBehavior};
use natscope_probes::probe::lifetime::{resolution, MAX_REQUESTS, POOL};
use natscope_probes::probe::sim::{self, MachineRun, Path, SimConfig};
use natscope_probes::probe::{LifetimeProbe, LifetimeReport};

fn nat(timeout_s: u64, inbound_refresh: bool) -> Path {
    let mut b = NatBehavior::new(M::EndpointIndependent, F::AddressAndPortDependent);
    b.udp_timeout = Duration::from_secs(timeout_s);
    b.inbound_refresh = inbound_refresh;
    Path::Nat(b)
}

fn world(path: Path, seed: u64) -> SimConfig {
    let mut c = SimConfig::new(path, seed);
    c.max_virtual_time = Duration::from_secs(4 * 3600);
    c
}

fn run(cfg: &SimConfig, seed: u64) -> (MachineRun<LifetimeProbe>, LifetimeReport) {
    let run = sim::run_lifetime(cfg, sim::lifetime_config(seed));
    let report = run.machine.report();
    eprintln!(
        "{:?}: completed {} in {:.1} s virtual, {} steps, {} requests, {} checks: {:?} [{:?}, {:?}] inbound {:?}\n  {:?}",
        cfg.path,
        run.completed,
        run.virtual_time.as_secs_f64(),
        run.steps,
        report.requests_sent,
        report.checks,
        report.binding_lifetime_s,
        report.lower_s,
        report.upper_s,
        report.inbound_refresh,
        report.tests
    );
    (run, report)
}

/// The configured timeout lies in [lower, upper] and the interval is within the resolution (plus
/// the retry budget of the last expired check).
fn assert_brackets(r: &LifetimeReport, timeout_s: u64) {
    let t = timeout_s as f64;
    let (Some(lo), Some(hi)) = (r.lower_s, r.upper_s) else {
        panic!("no bounds: {r:?}");
    };
    assert_eq!(
        r.binding_lifetime_s,
        Some(lo),
        "the lower bound is reported"
    );
    assert!(lo <= t && t <= hi, "{lo} ≤ {t} ≤ {hi}");
    let res = resolution(Duration::from_secs_f64(lo)).as_secs_f64();
    assert!(
        hi - lo <= res + 0.5,
        "interval {lo}–{hi} wider than {res} s"
    );
    assert!(t - lo <= res, "lower bound {lo} within {res} s of {t}");
}

#[test]
fn lifetime_30s_and_120s_with_outbound_refresh_only() {
    for (timeout, seed) in [(30, 1), (120, 2)] {
        let (run, r) = run(&world(nat(timeout, false), seed), seed);
        assert!(run.completed);
        assert_eq!(r.nat_detected, Some(true));
        assert_brackets(&r, timeout);
        assert_eq!(r.inbound_refresh, Some(false), "{:?}", r.tests);
        assert_eq!(r.tests[0].name, "binding lifetime");
        assert_eq!(r.tests[1].name, "inbound refresh");
        assert_eq!(r.tests[1].verdict, "no");
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }
}

#[test]
fn inbound_refresh_is_reported() {
    for (timeout, seed) in [(30, 3), (120, 4)] {
        let (run, r) = run(&world(nat(timeout, true), seed), seed);
        assert!(run.completed);
        assert_brackets(&r, timeout);
        assert_eq!(r.inbound_refresh, Some(true), "{:?}", r.tests);
        assert_eq!(r.tests[1].verdict, "yes");
    }
}

#[test]
fn no_nat_has_no_binding_to_expire() {
    for path in [Path::Open, Path::Firewall(F::AddressAndPortDependent)] {
        let (run, r) = run(&world(path, 5), 5);
        assert!(run.completed);
        assert_eq!(r.nat_detected, Some(false));
        assert_eq!(r.binding_lifetime_s, None);
        assert_eq!(r.inbound_refresh, None);
        assert_eq!(r.tests[0].verdict, "not applicable");
        assert!(
            r.tests[0]
                .evidence
                .starts_with("no nat: no binding to expire"),
            "{}",
            r.tests[0].evidence
        );
        assert!(run.virtual_time < Duration::from_secs(1), "stops at once");
    }
}

#[test]
fn udp_blocked_is_unknown() {
    let (run, r) = run(&world(Path::UdpBlocked, 6), 6);
    assert!(run.completed);
    assert_eq!(r.nat_detected, None);
    assert_eq!(r.binding_lifetime_s, None);
    assert_eq!(r.tests[0].verdict, "unknown");
}

#[test]
fn lifetime_longer_than_the_maximum_is_a_lower_bound() {
    let cfg = world(nat(120, false), 7);
    let mut lc = sim::lifetime_config(7);
    lc.max = Duration::from_secs(60);
    let run = sim::run_lifetime(&cfg, lc);
    let r = run.machine.report();
    assert!(run.completed);
    assert!(r.binding_lifetime_s.is_some_and(|l| l >= 60.0), "{r:?}");
    assert_eq!(r.upper_s, None);
    assert_eq!(r.inbound_refresh, None);
    assert!(r.tests[0].verdict.starts_with("≥ 60"), "{:?}", r.tests[0]);
}

#[test]
fn under_loss_every_verdict_is_the_truth_or_unknown() {
    for loss in [0.10, 0.30] {
        let mut found = 0;
        for seed in 10..16u64 {
            for (timeout, refresh) in [(30, false), (30, true), (120, false)] {
                let mut cfg = world(nat(timeout, refresh), seed);
                cfg.loss = loss;
                let (run, r) = run(&cfg, seed);
                let why = format!("loss {loss} seed {seed} timeout {timeout}: {r:?}");
                assert!(run.completed, "{why}");
                assert!(run.stats.lost > 0, "{why}");
                if let Some(l) = r.binding_lifetime_s {
                    let hi = r.upper_s.expect("a converged lifetime has an upper bound");
                    assert!(l <= timeout as f64 && timeout as f64 <= hi, "{why}");
                    found += 1;
                } else {
                    assert_eq!(r.tests[0].verdict, "unknown", "{why}");
                }
                assert!(r.inbound_refresh.is_none_or(|b| b == refresh), "{why}");
                assert!(r.requests_sent <= MAX_REQUESTS, "{why}");
                assert!(x_sockets(&run.sent).len() <= POOL, "{why}");
            }
        }
        if loss <= 0.10 {
            assert_eq!(found, 18, "10% loss: every run converges");
        }
        eprintln!("loss {loss}: {found}/18 converged");
    }
}

#[test]
fn every_mapping_filtering_and_allocation_gives_the_same_lifetime() {
    use natscope_probes::nat::PortAllocation;
    let mut seed = 100;
    for m in [
        M::EndpointIndependent,
        M::AddressDependent,
        M::AddressAndPortDependent,
    ] {
        for f in [
            F::EndpointIndependent,
            F::AddressDependent,
            F::AddressAndPortDependent,
        ] {
            for a in [
                PortAllocation::Preserve,
                PortAllocation::Sequential { step: 1 },
                PortAllocation::Random,
            ] {
                seed += 1;
                let mut b = NatBehavior::new(m, f);
                b.allocation = a;
                b.udp_timeout = Duration::from_secs(45);
                let run = sim::run_lifetime(&world(Path::Nat(b), seed), sim::lifetime_config(seed));
                let r = run.machine.report();
                assert!(run.completed, "{m:?} {f:?} {a:?}");
                assert_brackets(&r, 45);
                assert_eq!(r.inbound_refresh, Some(false), "{m:?} {f:?} {a:?}: {r:?}");
            }
        }
    }
}

/// Sockets that sent a plain Binding (no RESPONSE-PORT): the X sockets whose bindings are measured.
fn x_sockets(sent: &[sim::SentDatagram]) -> std::collections::BTreeSet<u16> {
    use natscope_probes::stun::{attr_type, Message};
    sent.iter()
        .filter(|d| {
            Message::parse(&d.payload)
                .is_ok_and(|m| !m.attributes().any(|a| a.typ == attr_type::RESPONSE_PORT))
        })
        .map(|d| d.socket.0)
        .collect()
}

/// The first grid point at or above `timeout_s` for the default configuration (1 s … 300 s in at
/// most `POOL` points): where the parallel search first sees the binding expire.
fn first_grid_point_above(timeout_s: f64) -> f64 {
    let ratio = 300f64.powf(1.0 / (POOL - 1) as f64);
    let mut g = 1.0;
    while g < timeout_s {
        g *= ratio;
    }
    g.min(300.0)
}

#[test]
fn parallel_search_brackets_every_timeout_fast_within_the_pool() {
    for timeout in [3u64, 7, 30, 65, 120, 250] {
        for seed in [21u64, 22, 23] {
            let mut cfg = world(nat(timeout, false), seed);
            // Seeded jitter (up to 3 ms each way): every seed a different run.
            cfg.jitter = Duration::from_millis(3);
            let (run, r) = run(&cfg, seed);
            let why = format!("timeout {timeout} seed {seed}: {r:?}");
            assert!(run.completed, "{why}");
            assert_brackets(&r, timeout);
            // The first grid point above the timeout expires at about that point; its bracket is
            // refined by the clocks already running plus at most one more round of at most the
            // upper bound: the search is over by twice that point (plus retry budgets).
            let search = r.tests[0].duration_ms / 1e3;
            let bound = 2.0 * first_grid_point_above(timeout as f64) + 3.0;
            assert!(
                search <= bound,
                "search {search:.1} s > {bound:.1} s: {why}"
            );
            assert!(search <= 3.0 * timeout as f64 + 3.0, "{why}");
            let xs = x_sockets(&run.sent);
            assert!(xs.len() <= POOL, "{} X sockets: {why}", xs.len());
            assert!(xs.iter().all(|&s| (s as usize) < POOL), "{xs:?}");
            assert!(run.machine.peak_clocks() <= POOL, "{why}");
            assert!(r.requests_sent <= MAX_REQUESTS, "{why}");
            eprintln!("timeout {timeout} seed {seed}: search {search:.1} s (bound {bound:.1} s), total {:.1} s, {} requests", run.virtual_time.as_secs_f64(), r.requests_sent);
        }
    }
}

#[test]
fn a_120s_nat_costs_a_fraction_of_the_sequential_search() {
    // The sequential search took 700 s for the lifetime and 875 s in all.
    let (run, r) = run(&world(nat(120, false), 2), 2);
    assert!(run.completed);
    assert_brackets(&r, 120);
    let search = r.tests[0].duration_ms / 1e3;
    assert!(
        search <= 2.0 * first_grid_point_above(120.0) + 3.0,
        "{search}"
    );
    // Then the inbound test: idle up to the upper bound (plus the resolution) and one interval.
    let hi = r.upper_s.unwrap();
    let lo = r.lower_s.unwrap();
    let inbound = hi + resolution(Duration::from_secs_f64(hi)).as_secs_f64() + lo / 2.0 + 3.0;
    assert!(
        run.virtual_time.as_secs_f64() <= search + inbound,
        "{:?} > {search} + {inbound}",
        run.virtual_time
    );
    assert!(
        run.virtual_time < Duration::from_secs(400),
        "{:?}",
        run.virtual_time
    );
}

/// Wraps the machine to record, at every event, when it promised to be done at the latest.
struct Watched {
    p: LifetimeProbe,
    promises: Vec<(std::time::Instant, std::time::Instant)>,
}

impl Watched {
    fn note(&mut self, now: std::time::Instant) {
        self.promises.push((now, now + self.p.remaining(now)));
    }
}

impl natscope_probes::probe::ProbeMachine for Watched {
    fn socket_bound(&mut self, id: natscope_probes::probe::SocketId, local: std::net::SocketAddr) {
        self.p.socket_bound(id, local);
    }
    fn poll_transmit(
        &mut self,
        now: std::time::Instant,
    ) -> Option<natscope_probes::probe::Transmit> {
        self.note(now);
        self.p.poll_transmit(now)
    }
    fn handle_datagram(
        &mut self,
        now: std::time::Instant,
        socket: natscope_probes::probe::SocketId,
        from: std::net::SocketAddr,
        bytes: &[u8],
    ) {
        self.p.handle_datagram(now, socket, from, bytes);
        self.note(now);
    }
    fn handle_timeout(&mut self, now: std::time::Instant) {
        self.p.handle_timeout(now);
        self.note(now);
    }
    fn poll_timeout(&self) -> Option<std::time::Instant> {
        self.p.poll_timeout()
    }
    fn is_done(&self) -> bool {
        self.p.is_done()
    }
}

#[test]
fn remaining_and_time_bound_are_upper_bounds() {
    for (timeout, refresh, seed) in [
        (3u64, false, 31u64),
        (30, true, 32),
        (120, false, 33),
        (250, true, 34),
    ] {
        let cfg = world(nat(timeout, refresh), seed);
        let lc = sim::lifetime_config(seed);
        let bound = LifetimeProbe::time_bound(&lc);
        let run = sim::run_machine(&cfg, |epoch| Watched {
            p: LifetimeProbe::new(epoch, lc),
            promises: Vec::new(),
        });
        assert!(run.completed);
        assert!(
            run.virtual_time <= bound,
            "{:?} > {bound:?}",
            run.virtual_time
        );
        let end = run.machine.promises.last().unwrap().0;
        for &(at, done_by) in &run.machine.promises {
            assert!(
                done_by >= end,
                "timeout {timeout}: at {:?} promised {:?}, done at {:?}",
                at - run.machine.promises[0].0,
                done_by - run.machine.promises[0].0,
                end - run.machine.promises[0].0
            );
        }
    }
}

fn pooled(timeout_s: u64, pooling: natscope_probes::nat::Pooling, ips: u8, seed: u64) -> SimConfig {
    let mut b = NatBehavior::new(M::EndpointIndependent, F::AddressAndPortDependent);
    b.udp_timeout = Duration::from_secs(timeout_s);
    b.pooling = pooling;
    let mut c = world(Path::Nat(b), seed);
    c.nat_external_ips = ips;
    c
}

#[test]
fn arbitrary_pooling_brackets_the_lifetime_with_sockets_on_xs_address() {
    use natscope_probes::nat::Pooling;
    let mut measured = 0;
    for ips in [2u8, 4] {
        for (timeout, seed) in [
            (3u64, 41u64),
            (7, 42),
            (30, 43),
            (120, 44),
            (45, 45),
            (3, 46),
        ] {
            let cfg = pooled(timeout, Pooling::Arbitrary, ips, seed);
            let (run, r) = run(&cfg, seed);
            let why = format!("{ips} addresses, timeout {timeout}, seed {seed}: {r:?}");
            assert!(run.completed, "{why}");
            assert_eq!(r.nat_detected, Some(true), "{why}");
            if r.binding_lifetime_s.is_none() {
                // Unknown is allowed, with its reason; a wrong bracket never.
                assert_eq!(r.tests[0].verdict, "unknown", "{why}");
                assert!(r.tests[0].evidence.contains("pooled arbitrarily"), "{why}");
                continue;
            }
            measured += 1;
            assert_brackets(&r, timeout);
            assert!(
                r.tests[0].evidence.contains("pooled arbitrarily"),
                "the report says what was found: {why}"
            );
            assert_eq!(r.inbound_refresh, Some(false), "{why}");
            assert!(r.requests_sent <= MAX_REQUESTS, "{why}");
            assert!(
                x_sockets(&run.sent)
                    .iter()
                    .filter(|&&s| (s as usize) < POOL)
                    .count()
                    <= POOL
            );
        }
    }
    assert_eq!(measured, 12, "without loss every run measures the lifetime");
}

#[test]
fn paired_pooling_with_several_addresses_costs_no_extra_requests() {
    use natscope_probes::nat::Pooling;
    for (timeout, seed) in [(30u64, 51u64), (120, 52)] {
        let (one_run, one) = run(&pooled(timeout, Pooling::Paired, 1, seed), seed);
        for ips in [2u8, 4] {
            let (run_n, r) = run(&pooled(timeout, Pooling::Paired, ips, seed), seed);
            assert!(run_n.completed);
            assert_brackets(&r, timeout);
            assert_eq!(r.requests_sent, one.requests_sent, "{ips} addresses: {r:?}");
            assert_eq!(r.checks, one.checks);
            assert_eq!(run_n.virtual_time, one_run.virtual_time);
            assert!(!r.tests[0].evidence.contains("pooled arbitrarily"), "{r:?}");
        }
    }
}

#[test]
fn arbitrary_pooling_under_loss_every_verdict_is_the_truth_or_unknown() {
    use natscope_probes::nat::Pooling;
    let mut found = 0;
    let mut runs = 0;
    for loss in [0.10, 0.30] {
        for ips in [2u8, 4] {
            for seed in 60..64u64 {
                for (timeout, refresh) in [(7u64, true), (30, false), (120, true)] {
                    let mut cfg = pooled(timeout, Pooling::Arbitrary, ips, seed);
                    if let Path::Nat(b) = &mut cfg.path {
                        b.inbound_refresh = refresh;
                    }
                    cfg.loss = loss;
                    let (run, r) = run(&cfg, seed);
                    runs += 1;
                    let why =
                        format!("loss {loss} {ips} addresses seed {seed} timeout {timeout}: {r:?}");
                    assert!(run.completed, "{why}");
                    if let Some(l) = r.binding_lifetime_s {
                        let hi = r.upper_s.expect("a converged lifetime has an upper bound");
                        assert!(l <= timeout as f64 && timeout as f64 <= hi, "{why}");
                        found += 1;
                    } else {
                        assert_eq!(r.tests[0].verdict, "unknown", "{why}");
                    }
                    assert!(r.inbound_refresh.is_none_or(|b| b == refresh), "{why}");
                    assert!(r.requests_sent <= MAX_REQUESTS, "{why}");
                }
            }
        }
    }
    eprintln!("arbitrary pooling under loss: {found}/{runs} converged");
    assert!(found * 2 >= runs, "{found}/{runs} converged");
}

#[test]
fn arbitrary_pooling_keeps_remaining_and_time_bound_upper_bounds() {
    use natscope_probes::nat::Pooling;
    for (timeout, ips, seed) in [(3u64, 4u8, 71u64), (30, 2, 72), (120, 4, 73)] {
        let cfg = pooled(timeout, Pooling::Arbitrary, ips, seed);
        let lc = sim::lifetime_config(seed);
        let bound = LifetimeProbe::time_bound(&lc);
        let run = sim::run_machine(&cfg, |epoch| Watched {
            p: LifetimeProbe::new(epoch, lc),
            promises: Vec::new(),
        });
        assert!(run.completed);
        assert!(
            run.virtual_time <= bound,
            "{:?} > {bound:?}",
            run.virtual_time
        );
        let end = run.machine.promises.last().unwrap().0;
        let t0 = run.machine.promises[0].0;
        for &(at, done_by) in &run.machine.promises {
            assert!(
                done_by >= end,
                "timeout {timeout}: at {:?} promised {:?}, done at {:?}",
                at - t0,
                done_by - t0,
                end - t0
            );
        }
    }
}

#[test]
fn paced_arbitrary_pooling_keeps_the_rfc5780_rate_and_the_bracket() {
    use natscope_probes::nat::Pooling;
    use natscope_probes::probe::pacing::{PaceChoice, Pacing, MAX_NEW_PER_SECOND, WINDOW};
    for (timeout, ips, seed) in [(4u64, 4u8, 81u64), (7, 2, 82), (120, 4, 83)] {
        let cfg = pooled(timeout, Pooling::Arbitrary, ips, seed);
        let mut lc = sim::lifetime_config(seed);
        lc.pacing = Pacing::decide(&[lc.server], PaceChoice::On);
        let run = sim::run_lifetime(&cfg, lc);
        assert!(run.completed);
        let r = run.machine.report();
        assert_brackets(&r, timeout);
        // First transmissions (a retransmission repeats its transaction ID) in any 1 s window.
        let mut seen = std::collections::HashSet::new();
        let starts: Vec<Duration> = run
            .sent
            .iter()
            .filter(|d| seen.insert(d.payload[8..20].to_vec()))
            .map(|d| d.at)
            .collect();
        let busiest = starts
            .iter()
            .map(|&t| starts.iter().filter(|&&s| s >= t && s < t + WINDOW).count())
            .max()
            .unwrap_or(0);
        assert!(busiest <= MAX_NEW_PER_SECOND as usize, "{busiest}: {r:?}");
        eprintln!(
            "paced, {ips} addresses, timeout {timeout}: {} requests, search {:.1} s, total {:.1} s",
            r.requests_sent,
            r.tests[0].duration_ms / 1e3,
            run.virtual_time.as_secs_f64()
        );
    }
}
