//! RFC 5780 §5 pacing of the probe machines against the simulated network, on a virtual clock:
//! with pacing on, no one-second window of the datagrams the machine really sent holds more than
//! ten first transmissions (a transaction ID seen for the first time), and the verdicts still equal
//! the simulated truth. Without pacing the same check must fail (the probe starts 22 transactions
//! within a few round trips), or it would prove nothing. Also prints the virtual time a full
//! classification costs paced and unpaced (docs/probe.md, "Pacing").

use std::collections::HashSet;
use std::time::Duration;

use natscope_probes::nat::{
    FilteringBehavior as F, MappingBehavior as M, NatBehavior, PortAllocation,
};
use natscope_probes::probe::pacing::{MAX_NEW_PER_SECOND, WINDOW};
use natscope_probes::probe::sim::{self, Path, SentDatagram, SimConfig, SimRun};
use natscope_probes::probe::{Behavior, Classic, PaceChoice, Pacing};

fn nat(m: M, f: F) -> Path {
    let mut b = NatBehavior::new(m, f);
    b.allocation = PortAllocation::Preserve;
    b.hairpinning = true;
    Path::Nat(b)
}

/// The nine mapping × filtering NATs (preserving ports, hairpinning: all 14 transactions run),
/// open internet, a port-restricted firewall and blocked UDP.
fn worlds() -> Vec<Path> {
    let mut paths = Vec::new();
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
            paths.push(nat(m, f));
        }
    }
    paths.extend([
        Path::Open,
        Path::Firewall(F::AddressAndPortDependent),
        Path::UdpBlocked,
    ]);
    paths
}

/// (udp_blocked, nat_detected, mapping, filtering, classic) a correct probe reports.
type Truth = (bool, Option<bool>, Behavior, Behavior, Classic);

fn truth(path: &Path) -> Truth {
    use Behavior::*;
    match path {
        Path::Nat(b) => {
            let (m, f) = (Behavior::from(b.mapping), Behavior::from(b.filtering));
            let classic = match (m, f) {
                (EndpointIndependent, EndpointIndependent) => Classic::FullCone,
                (EndpointIndependent, AddressDependent) => Classic::RestrictedCone,
                (EndpointIndependent, _) => Classic::PortRestrictedCone,
                (_, EndpointIndependent) => Classic::NoClassicName,
                _ => Classic::Symmetric,
            };
            (false, Some(true), m, f, classic)
        }
        Path::Open => (
            false,
            Some(false),
            EndpointIndependent,
            EndpointIndependent,
            Classic::OpenInternet,
        ),
        Path::Firewall(f) => (
            false,
            Some(false),
            EndpointIndependent,
            Behavior::from(*f),
            Classic::SymmetricUdpFirewall,
        ),
        Path::UdpBlocked => (true, None, Unknown, Unknown, Classic::UdpBlocked),
        Path::Nptv6(_) => unreachable!("an IPv6 world: probes/tests/probe_ipv6_sim.rs"),
    }
}

fn run(path: &Path, choice: PaceChoice) -> SimRun {
    let cfg = SimConfig::new(path.clone(), 7);
    let mut probe = sim::probe_config(11);
    probe.pacing = Pacing::decide(&[probe.server], choice);
    let r = sim::run_probe(&cfg, probe);
    assert!(r.completed, "{path:?} {choice:?}: {:?}", r.virtual_time);
    r
}

/// The send instants of first transmissions: a retransmission repeats its transaction ID.
fn first_transmissions(sent: &[SentDatagram]) -> Vec<Duration> {
    let mut seen = HashSet::new();
    sent.iter()
        .filter(|d| d.payload.len() >= 20 && seen.insert(d.payload[8..20].to_vec()))
        .map(|d| d.at)
        .collect()
}

/// The most first transmissions any half-open window [t, t + 1 s) holds.
fn busiest_window(starts: &[Duration]) -> usize {
    starts
        .iter()
        .map(|&t| starts.iter().filter(|&&s| s >= t && s < t + WINDOW).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn paced_runs_start_at_most_ten_transactions_per_second_and_keep_their_verdicts() {
    for path in worlds() {
        let r = run(&path, PaceChoice::On);
        let got = (
            r.report.udp_blocked,
            r.report.nat_detected,
            r.report.mapping,
            r.report.filtering,
            r.report.classic,
        );
        assert_eq!(got, truth(&path), "{path:?}: {:#?}", r.report);
        let starts = first_transmissions(&r.sent);
        let busiest = busiest_window(&starts);
        assert!(
            busiest <= MAX_NEW_PER_SECOND as usize,
            "{path:?}: {busiest} new transactions in one second: {starts:?}"
        );
        assert!(r.report.pacing.enabled, "{path:?}");
        assert_eq!(r.report.pacing.max_new_per_second, Some(10));
    }
}

#[test]
fn unpaced_runs_break_the_limit_so_the_check_can_fail() {
    let r = run(
        &nat(M::EndpointIndependent, F::EndpointIndependent),
        PaceChoice::Off,
    );
    let starts = first_transmissions(&r.sent);
    assert_eq!(
        starts.len(),
        22,
        "12 reachability (unpaced), 4 behavior, 1 hairpin, 5 allocation"
    );
    assert_eq!(busiest_window(&starts), 22, "{starts:?}");
    assert!(!r.report.pacing.enabled);
}

#[test]
fn waiting_for_a_slot_is_not_taken_for_a_round_trip_or_a_loss() {
    // Four allocation samples wait about a second for a slot, far beyond any RTO (20–200 ms here).
    // Their clocks start at their first real transmission, so nothing is retransmitted, no RTT
    // sample includes the wait and no loss is estimated.
    let r = run(
        &nat(M::EndpointIndependent, F::EndpointIndependent),
        PaceChoice::On,
    );
    assert!(r.virtual_time >= WINDOW, "{:?}", r.virtual_time);
    assert_eq!(
        r.report.requests_sent, 14,
        "no retransmission: {:#?}",
        r.report
    );
    assert_eq!(r.sent.len(), 14);
    assert_eq!(r.report.retry_budget_ms, 0.0);
    assert_eq!(r.report.loss_estimate, 0.0);
    for t in &r.report.tests {
        if t.name != "port allocation" {
            assert!(t.duration_ms < 100.0, "a few 10 ms round trips: {t:?}");
        }
    }
}

#[test]
fn classification_time_paced_and_unpaced() {
    for (name, path) in [
        (
            "full cone",
            nat(M::EndpointIndependent, F::EndpointIndependent),
        ),
        (
            "port-restricted cone",
            nat(M::EndpointIndependent, F::AddressAndPortDependent),
        ),
    ] {
        let fast = run(&path, PaceChoice::Off);
        let paced = run(&path, PaceChoice::On);
        eprintln!(
            "{name}, 5 ms one-way: unpaced {:?}, paced {:?} virtual ({} / {} datagrams)",
            fast.virtual_time,
            paced.virtual_time,
            fast.sent.len(),
            paced.sent.len()
        );
        assert!(paced.virtual_time >= fast.virtual_time, "{name}");
        // 14 transactions, 10 per second: the 11th starts a second after the first.
        assert!(
            paced.virtual_time >= WINDOW,
            "{name}: {:?}",
            paced.virtual_time
        );
        assert!(
            paced.virtual_time < fast.virtual_time + WINDOW + Duration::from_millis(100),
            "{name}: pacing costs at most about one window: {:?} vs {:?}",
            paced.virtual_time,
            fast.virtual_time
        );
    }
}

#[test]
fn paced_lifetime_measurement_brackets_the_same_timeout() {
    let mut b = NatBehavior::new(M::EndpointIndependent, F::AddressAndPortDependent);
    b.udp_timeout = Duration::from_secs(30);
    let mut cfg = SimConfig::new(Path::Nat(b), 3);
    cfg.max_virtual_time = Duration::from_secs(4 * 3600);
    let mut lt = sim::lifetime_config(5);
    lt.pacing = Pacing::decide(&[lt.server], PaceChoice::On);
    let run = sim::run_lifetime(&cfg, lt);
    assert!(run.completed);
    let r = run.machine.report();
    let (Some(lo), Some(hi)) = (r.lower_s, r.upper_s) else {
        panic!("no bounds: {r:?}");
    };
    assert!(lo <= 30.0 && 30.0 <= hi, "{lo} ≤ 30 ≤ {hi}: {r:?}");
    assert_eq!(r.inbound_refresh, Some(false), "{:?}", r.tests);
    let starts = first_transmissions(&run.sent);
    assert!(busiest_window(&starts) <= MAX_NEW_PER_SECOND as usize);
}

#[test]
fn paced_parallel_lifetime_search_keeps_the_rate_with_every_clock_busy() {
    // 16 X sockets refreshed together and a burst of checks once the bracket is known: the
    // pacer spreads them, the bounds stay measured, and the search stays fast.
    for (timeout, seed) in [(7u64, 8u64), (120, 9)] {
        let mut b = NatBehavior::new(M::EndpointIndependent, F::AddressAndPortDependent);
        b.udp_timeout = Duration::from_secs(timeout);
        let mut cfg = SimConfig::new(Path::Nat(b), seed);
        cfg.max_virtual_time = Duration::from_secs(4 * 3600);
        let mut lt = sim::lifetime_config(seed);
        lt.pacing = Pacing::decide(&[lt.server], PaceChoice::On);
        let run = sim::run_lifetime(&cfg, lt);
        assert!(run.completed);
        let r = run.machine.report();
        let (Some(lo), Some(hi)) = (r.lower_s, r.upper_s) else {
            panic!("no bounds: {r:?}");
        };
        let t = timeout as f64;
        assert!(lo <= t && t <= hi, "{lo} ≤ {t} ≤ {hi}: {r:?}");
        assert!(r.tests[0].duration_ms / 1e3 <= 3.0 * t + 5.0, "{r:?}");
        let starts = first_transmissions(&run.sent);
        assert!(busiest_window(&starts) <= MAX_NEW_PER_SECOND as usize);
    }
}

#[test]
fn retransmissions_pass_a_full_pacer_new_transactions_wait_for_their_slot() {
    use natscope_probes::probe::{Pacer, Probe};
    use std::time::Instant;
    let t0 = Instant::now();
    let mut cfg = sim::probe_config(3);
    cfg.reach_requests = 4;
    let mut p = Probe::new(t0, cfg).with_pacer(Pacer::new(2, WINDOW));
    let first: Vec<_> = std::iter::from_fn(|| p.poll_transmit(t0)).collect();
    assert_eq!(first.len(), 2, "two slots");
    // The RTO (200 ms before any sample) comes before the pacer's slot (1 s).
    let rto = p.poll_timeout().expect("a timer");
    assert_eq!(rto, t0 + Duration::from_millis(200));
    p.handle_timeout(rto);
    let again: Vec<_> = std::iter::from_fn(|| p.poll_transmit(rto)).collect();
    assert_eq!(again, first, "the two retransmissions, and nothing new");
    // Nothing answers: retransmissions keep their own timer, the two waiting requests the slot.
    let mut now;
    loop {
        now = p.poll_timeout().expect("a timer");
        if now >= t0 + WINDOW {
            break;
        }
        p.handle_timeout(now);
        while let Some(t) = p.poll_transmit(now) {
            assert!(
                first.iter().any(|f| f.payload == t.payload),
                "a new transaction before its slot at {:?}",
                now - t0
            );
        }
    }
    assert_eq!(now, t0 + WINDOW, "woken for the slot");
    p.handle_timeout(now);
    let new: Vec<_> = std::iter::from_fn(|| p.poll_transmit(now))
        .filter(|t| !first.iter().any(|f| f.payload == t.payload))
        .collect();
    assert_eq!(
        new.len(),
        2,
        "both slots free again one second after the first two"
    );
}
