//! The probe against the simulated network (`natscope_probes::probe::sim`): every RFC 4787
//! mapping × filtering × port allocation × hairpinning combination, no NAT, a stateful firewall and
//! blocked UDP, on a virtual clock. Without loss the verdicts must equal the simulated truth; with
//! loss each verdict must be the truth or `unknown`, never something else. Also the NAT quirks and
//! broken servers that fool other tools.

use std::time::Duration;

use natscope_probes::nat::{
    FilteringBehavior as F, MappingBehavior as M, NatBehavior, PortAllocation,
};
use natscope_probes::probe::sim::{self, Path, ServerMode, SimConfig, SimRun};
use natscope_probes::probe::{AllocationPattern, Behavior, Classic, ProbeReport};

const MAPPINGS: [M; 3] = [
    M::EndpointIndependent,
    M::AddressDependent,
    M::AddressAndPortDependent,
];
const FILTERINGS: [F; 3] = [
    F::EndpointIndependent,
    F::AddressDependent,
    F::AddressAndPortDependent,
];
const ALLOCATIONS: [PortAllocation; 3] = [
    PortAllocation::Preserve,
    PortAllocation::Sequential { step: 1 },
    PortAllocation::Random,
];

fn nat(m: M, f: F, allocation: PortAllocation, hairpinning: bool) -> NatBehavior {
    let mut b = NatBehavior::new(m, f);
    b.allocation = allocation;
    b.hairpinning = hairpinning;
    b
}

/// The 54 NATs, then open internet, two firewalls and blocked UDP.
fn grid() -> Vec<Path> {
    let mut paths = Vec::new();
    for m in MAPPINGS {
        for f in FILTERINGS {
            for a in ALLOCATIONS {
                for hp in [false, true] {
                    paths.push(Path::Nat(nat(m, f, a, hp)));
                }
            }
        }
    }
    paths.extend([
        Path::Open,
        Path::Firewall(F::AddressAndPortDependent),
        Path::Firewall(F::AddressDependent),
        Path::UdpBlocked,
    ]);
    paths
}

fn label(p: &Path) -> String {
    match p {
        Path::Nat(b) => format!(
            "nat {:?}+{:?} {:?} hairpin={}",
            b.mapping, b.filtering, b.allocation, b.hairpinning
        ),
        other => format!("{other:?}"),
    }
}

/// Every verdict the probe gives, in one comparable value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verdicts {
    udp_blocked: bool,
    nat: Option<bool>,
    mapping: Behavior,
    filtering: Behavior,
    classic: Classic,
    allocation: AllocationPattern,
    delta: Option<i32>,
    hairpinning: Option<bool>,
}

fn observed(r: &ProbeReport) -> Verdicts {
    Verdicts {
        udp_blocked: r.udp_blocked,
        nat: r.nat_detected,
        mapping: r.mapping,
        filtering: r.filtering,
        classic: r.classic,
        allocation: r.port_allocation.pattern,
        delta: r.port_allocation.delta,
        hairpinning: r.hairpinning,
    }
}

/// What a correct probe must conclude about `path`, written out independently of the probe.
fn truth(path: &Path) -> Verdicts {
    use Behavior::*;
    match path {
        Path::Nat(b) => {
            let (mapping, filtering) = (Behavior::from(b.mapping), Behavior::from(b.filtering));
            // RFC 3489 §10.1 names via RFC 5780 §10 (NAT-REFERENCE.md).
            let classic = match (mapping, filtering) {
                (EndpointIndependent, EndpointIndependent) => Classic::FullCone,
                (EndpointIndependent, AddressDependent) => Classic::RestrictedCone,
                (EndpointIndependent, _) => Classic::PortRestrictedCone,
                (_, EndpointIndependent) => Classic::NoClassicName,
                _ => Classic::Symmetric,
            };
            // The allocation samples are fresh sockets' first mappings, made one after another:
            // a preserving NAT keeps each (free) local port whatever the mapping behavior; a
            // sequential one hands them consecutive ports `step` apart (nothing else allocates in
            // between); a random one shows no constant delta.
            let (allocation, delta) = match b.allocation {
                PortAllocation::Preserve => (AllocationPattern::Preserving, None),
                PortAllocation::Sequential { step } => {
                    (AllocationPattern::Sequential, Some(i32::from(step)))
                }
                PortAllocation::Random => (AllocationPattern::Random, None),
            };
            Verdicts {
                udp_blocked: false,
                nat: Some(true),
                mapping,
                filtering,
                classic,
                allocation,
                delta,
                hairpinning: Some(b.hairpinning),
            }
        }
        Path::Open | Path::Firewall(_) => {
            let filtering = match path {
                Path::Firewall(f) => Behavior::from(*f),
                _ => EndpointIndependent,
            };
            Verdicts {
                udp_blocked: false,
                nat: Some(false),
                // No NAT: the identity mapping, which RFC 4787 counts as endpoint-independent.
                mapping: EndpointIndependent,
                filtering,
                classic: if filtering == EndpointIndependent {
                    Classic::OpenInternet
                } else {
                    Classic::SymmetricUdpFirewall
                },
                // The "external" port is the local port.
                allocation: AllocationPattern::Preserving,
                delta: None,
                hairpinning: None,
            }
        }
        Path::Nptv6(_) => unreachable!("an IPv6 world: probes/tests/probe_ipv6_sim.rs"),
        Path::UdpBlocked => Verdicts {
            udp_blocked: true,
            nat: None,
            mapping: Unknown,
            filtering: Unknown,
            classic: Classic::UdpBlocked,
            allocation: AllocationPattern::Unknown,
            delta: None,
            hairpinning: None,
        },
    }
}

fn run(cfg: &SimConfig) -> SimRun {
    let r = sim::run_probe(cfg, sim::probe_config(cfg.seed.wrapping_mul(0x9E37_79B9)));
    assert!(
        r.completed,
        "the probe did not finish within the simulation bounds: {:?} after {} steps, {:?}",
        r.virtual_time, r.steps, r.stats
    );
    r
}

fn dump(r: &ProbeReport) -> String {
    format!("{r:#?}")
}

#[test]
fn lossless_grid_verdicts_equal_the_simulated_truth() {
    let paths = grid();
    assert_eq!(paths.len(), 54 + 4);
    for seed in 1..=10 {
        for path in &paths {
            let cfg = SimConfig::new(path.clone(), seed);
            let r = run(&cfg);
            let want = truth(path);
            assert_eq!(
                observed(&r.report),
                want,
                "{} seed {seed}\n{}",
                label(path),
                dump(&r.report)
            );
            assert!(
                r.report.server.problems.is_empty(),
                "{}: {:?}",
                label(path),
                r.report.server.problems
            );
            // Port preservation: the NAT kept S0's port and every sample's (or there is no NAT).
            let preserving = match path {
                Path::Nat(b) => b.allocation == PortAllocation::Preserve,
                Path::Open | Path::Firewall(_) | Path::Nptv6(_) => true,
                Path::UdpBlocked => false,
            };
            if *path != Path::UdpBlocked {
                assert_eq!(
                    r.report.port_preservation,
                    Some(preserving),
                    "{}",
                    label(path)
                );
                assert_eq!(r.report.alg_detected, Some(false), "{}", label(path));
                assert_eq!(r.stats.lost, 0);
            }
            // Hairpinning through the NAT really happened exactly when it should have.
            if let Path::Nat(b) = path {
                assert_eq!(r.stats.hairpinned > 0, b.hairpinning, "{}", label(path));
            }
        }
    }
}

#[test]
fn sequential_allocation_reports_its_step() {
    for step in [2u16, 7, 100] {
        for m in MAPPINGS {
            for seed in [4, 5] {
                let path = Path::Nat(nat(
                    m,
                    F::AddressAndPortDependent,
                    PortAllocation::Sequential { step },
                    true,
                ));
                let r = run(&SimConfig::new(path.clone(), seed));
                assert_eq!(observed(&r.report), truth(&path), "{}", label(&path));
                assert_eq!(r.report.port_allocation.delta, Some(i32::from(step)));
            }
        }
    }
}

#[test]
fn verdicts_hold_with_jitter_that_reorders_datagrams() {
    for seed in 20..24 {
        for path in grid() {
            let mut cfg = SimConfig::new(path.clone(), seed);
            cfg.one_way_delay = Duration::from_millis(3);
            cfg.jitter = Duration::from_millis(8);
            let r = run(&cfg);
            assert_eq!(
                observed(&r.report),
                truth(&path),
                "{} seed {seed}\n{}",
                label(&path),
                dump(&r.report)
            );
        }
    }
}

#[test]
fn simulation_is_deterministic_per_seed() {
    let path = Path::Nat(nat(
        M::AddressAndPortDependent,
        F::AddressDependent,
        PortAllocation::Random,
        true,
    ));
    let mut cfg = SimConfig::new(path, 9);
    cfg.loss = 0.2;
    cfg.jitter = Duration::from_millis(3);
    let (a, b) = (run(&cfg), run(&cfg));
    assert_eq!(a.report, b.report);
    assert_eq!((a.stats, a.virtual_time), (b.stats, b.virtual_time));
    cfg.seed = 10;
    assert_ne!(run(&cfg).report.port_allocation, a.report.port_allocation);
}

/// Linux conntrack: after an unsolicited inbound packet is filtered on a mapping, that endpoint's
/// next packet leaves from a new port. RFC 3489-style tools test filtering on the mapping socket
/// and then see "a new mapping per destination"; natscope tests filtering on its own socket.
#[test]
fn conntrack_remap_after_unsolicited_inbound_does_not_fool_the_mapping_test() {
    let mut remaps = 0;
    for f in [F::AddressDependent, F::AddressAndPortDependent] {
        for m in MAPPINGS {
            for a in ALLOCATIONS {
                for seed in [1, 2] {
                    let path = Path::Nat(nat(m, f, a, true));
                    let mut cfg = SimConfig::new(path.clone(), seed);
                    cfg.conntrack_remap = true;
                    let r = run(&cfg);
                    assert_eq!(
                        observed(&r.report),
                        truth(&path),
                        "{}\n{}",
                        label(&path),
                        dump(&r.report)
                    );
                    assert!(r.report.server.problems.is_empty());
                    assert!(
                        r.stats.remapped > 0,
                        "the quirk must have acted: {:?}",
                        r.stats
                    );
                    remaps += r.stats.remapped;
                }
            }
        }
    }
    eprintln!("conntrack remap: {remaps} re-mappings across the lossless runs, every verdict true");
    // With loss too, the quirk never turns into a wrong verdict.
    for loss in [0.1, 0.3] {
        for seed in 0..10 {
            for m in MAPPINGS {
                let path = Path::Nat(nat(
                    m,
                    F::AddressAndPortDependent,
                    PortAllocation::Preserve,
                    true,
                ));
                let mut cfg = SimConfig::new(path.clone(), 500 + seed);
                cfg.conntrack_remap = true;
                cfg.loss = loss;
                let r = run(&cfg);
                let (got, want) = (observed(&r.report), truth(&path));
                for (name, g) in FIELDS.iter().zip(grades(&got, &want)) {
                    assert_ne!(
                        g,
                        Grade::Wrong,
                        "{name} at loss {loss}: {}\n{}",
                        label(&path),
                        dump(&r.report)
                    );
                }
            }
        }
    }
}

/// The same quirk against the RFC 3489 §10.1 order (filtering on the mapping socket, then Test I
/// to the changed address), driven by hand through the simulator: the endpoint-independent NAT
/// shows a different mapping for the second server, so a classic tool says "symmetric".
#[test]
fn conntrack_remap_does_fool_a_classic_rfc3489_sequence() {
    use natscope_probes::client::{build_request, BindingResponse, RequestOptions};
    use natscope_probes::stun::{ChangeRequest, TransactionId};
    use std::time::Instant;

    fn classic_mappings(remap: bool) -> (std::net::SocketAddr, std::net::SocketAddr) {
        let mut cfg = SimConfig::new(
            Path::Nat(NatBehavior::new(
                M::EndpointIndependent,
                F::AddressAndPortDependent,
            )),
            1,
        );
        cfg.conntrack_remap = remap;
        let mut net = sim::SimNet::new(&cfg);
        let x = net.bind();
        let mut now = Instant::now();
        let mut ask = |net: &mut sim::SimNet, to, change| {
            let tid = TransactionId::random();
            let mut buf = [0u8; 128];
            let opts = RequestOptions {
                change,
                ..Default::default()
            };
            let n = build_request(&mut buf, &tid, &opts).unwrap();
            net.send(now, x, to, buf[..n].to_vec());
            let mut answer = None;
            while let Some(t) = net.next_event() {
                now = now.max(t);
                for d in net.deliver_due(now) {
                    answer = BindingResponse::parse(&d.payload, &tid, Some(d.from)).ok();
                }
            }
            answer.and_then(|r| r.xor_mapped)
        };
        let m1 = ask(&mut net, sim::SERVER_PRIMARY, ChangeRequest::NONE).unwrap();
        // Test II: change IP and port; the port-restricted filter drops the answer.
        assert_eq!(
            ask(&mut net, sim::SERVER_PRIMARY, ChangeRequest::BOTH),
            None
        );
        // Test I again, to the changed address.
        let m2 = ask(&mut net, sim::SERVER_ALTERNATE, ChangeRequest::NONE).unwrap();
        (m1, m2)
    }
    let (m1, m2) = classic_mappings(false);
    assert_eq!(
        m1, m2,
        "without the quirk the classic sequence sees the cone"
    );
    let (m1, m2) = classic_mappings(true);
    assert_ne!(
        m1, m2,
        "with it, the classic sequence is fooled into 'symmetric'"
    );
}

#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    correct: u32,
    unknown: u32,
    wrong: u32,
}

impl Tally {
    fn add(&mut self, g: Grade) {
        match g {
            Grade::Correct => self.correct += 1,
            Grade::Unknown => self.unknown += 1,
            Grade::Wrong => self.wrong += 1,
        }
    }
    fn total(&self) -> u32 {
        self.correct + self.unknown + self.wrong
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grade {
    Correct,
    Unknown,
    Wrong,
}

fn grade<T: PartialEq>(got: T, want: T, unknown: T) -> Grade {
    if got == want {
        Grade::Correct
    } else if got == unknown {
        Grade::Unknown
    } else {
        Grade::Wrong
    }
}

const FIELDS: [&str; 7] = [
    "udp_blocked",
    "nat",
    "mapping",
    "filtering",
    "classic",
    "allocation",
    "hairpinning",
];

/// Grades each verdict of `got` against `want`.
fn grades(got: &Verdicts, want: &Verdicts) -> [Grade; 7] {
    let alloc_got = (got.allocation, got.delta);
    let alloc_want = (want.allocation, want.delta);
    let allocation = if alloc_got == alloc_want {
        Grade::Correct
    } else if got.allocation == AllocationPattern::Unknown {
        Grade::Unknown
    } else {
        Grade::Wrong
    };
    let hairpinning = match (got.hairpinning, want.hairpinning) {
        (g, w) if g == w => Grade::Correct,
        (None, Some(_)) => Grade::Unknown,
        _ => Grade::Wrong,
    };
    [
        if got.udp_blocked == want.udp_blocked {
            Grade::Correct
        } else {
            Grade::Wrong
        },
        grade(got.nat, want.nat, None),
        grade(got.mapping, want.mapping, Behavior::Unknown),
        grade(got.filtering, want.filtering, Behavior::Unknown),
        grade(got.classic, want.classic, Classic::Unknown),
        allocation,
        hairpinning,
    ]
}

/// Runs the whole grid at `loss` over `seeds`; asserts no verdict is wrong; returns the totals.
fn loss_grid(loss: f64, seeds: std::ops::Range<u64>) -> Tally {
    let mut per_field = [Tally::default(); 7];
    let mut runs_all_correct = 0;
    let mut runs = 0;
    let mut wrong = Vec::new();
    let mut max_virtual = Duration::ZERO;
    let mut times = Vec::new();
    let mut datagrams = 0u64;
    let mut bound_reached = 0u32;
    for seed in seeds {
        for path in grid() {
            let mut cfg = SimConfig::new(path.clone(), 1000 + seed);
            cfg.loss = loss;
            let r = run(&cfg);
            max_virtual = max_virtual.max(r.virtual_time);
            times.push(r.virtual_time);
            datagrams += r.stats.client_sent;
            bound_reached += u32::from(r.report.time_bound_reached);
            // Each run ends within the bound it reports (a correctness check, virtual time).
            assert!(
                r.report.duration_ms <= r.report.max_time_ms,
                "{} seed {seed}: ran {} ms past its bound of {} ms",
                label(&path),
                r.report.duration_ms,
                r.report.max_time_ms
            );
            let (got, want) = (observed(&r.report), truth(&path));
            let g = grades(&got, &want);
            runs += 1;
            if g.iter().all(|g| *g == Grade::Correct) {
                runs_all_correct += 1;
            }
            for (i, g) in g.iter().enumerate() {
                per_field[i].add(*g);
                if *g == Grade::Wrong {
                    wrong.push(format!(
                        "{} seed {seed}: {} got {got:?} want {want:?}\n{}",
                        label(&path),
                        FIELDS[i],
                        dump(&r.report)
                    ));
                }
            }
        }
    }
    let mut total = Tally::default();
    times.sort();
    let pct = |p: usize| {
        times
            .get(times.len() * p / 100)
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "loss {:.0}% one-way, {runs} runs ({runs_all_correct} with every verdict correct), virtual time median {:?} p99 {:?} longest {:?}, {bound_reached} stopped at the time bound, {:.1} datagrams sent per run:",
        loss * 100.0,
        pct(50),
        pct(99),
        max_virtual,
        datagrams as f64 / f64::from(runs.max(1))
    );
    for (name, t) in FIELDS.iter().zip(per_field) {
        eprintln!(
            "  {name:<12} correct {:>5}  unknown {:>4}  wrong {}",
            t.correct, t.unknown, t.wrong
        );
        total.correct += t.correct;
        total.unknown += t.unknown;
        total.wrong += t.wrong;
    }
    eprintln!(
        "  {:<12} correct {:>5}  unknown {:>4}  wrong {}",
        "all", total.correct, total.unknown, total.wrong
    );
    assert!(
        wrong.is_empty(),
        "{} wrong verdict(s); first:\n{}",
        wrong.len(),
        wrong[0]
    );
    total
}

#[test]
fn ten_percent_loss_verdicts_are_correct_or_unknown() {
    let t = loss_grid(0.10, 0..100);
    // Measured: 40,600 correct of 40,600 (before the budget widened with the measured loss:
    // 40,506 correct, 94 `unknown`).
    let correct = f64::from(t.correct) / f64::from(t.total());
    assert!(
        correct >= 0.995,
        "at 10% loss nearly every verdict must be correct: {t:?}"
    );
}

#[test]
fn thirty_percent_loss_verdicts_are_correct_or_unknown() {
    let t = loss_grid(0.30, 0..100);
    // Measured: 40,600 correct of 40,600, longest run 2.6 s virtual, a blocked path (before the budget widened
    // with the measured loss, within fixed caps of 24 and 7 transmissions: 32,508 correct,
    // 8,092 `unknown`, longest 3.6 s).
    let correct = f64::from(t.correct) / f64::from(t.total());
    assert!(correct >= 0.98, "{t:?}");
}

/// Beyond what the bound can hold: at 60 % one-way loss (84 % of round trips fail) and a 1.5 s
/// bound, some runs reach it (with the default 5 s none of these did). Every run ends within the
/// bound it reports, says whether it reached it, and every verdict is still the truth or
/// `unknown`.
#[test]
fn every_run_ends_within_its_time_bound_and_stays_right_or_unknown() {
    let bound = Duration::from_millis(1500);
    let mut reached = 0;
    let mut t = Tally::default();
    let mut runs = 0;
    for seed in 0..4 {
        // Blocked UDP cut short is `unknown`, not `blocked`: the short-bound test checks that.
        for path in grid().into_iter().filter(|p| *p != Path::UdpBlocked) {
            let mut cfg = SimConfig::new(path.clone(), 3000 + seed);
            cfg.loss = 0.6;
            let mut probe = sim::probe_config(seed);
            probe.max_time = bound;
            let r = sim::run_probe(&cfg, probe);
            assert!(r.completed);
            runs += 1;
            assert_eq!(r.report.max_time_ms, 1500.0);
            assert!(
                r.report.duration_ms <= r.report.max_time_ms && r.virtual_time <= bound,
                "{} seed {seed}: {:?} virtual, {} ms reported, bound {bound:?}",
                label(&path),
                r.virtual_time,
                r.report.duration_ms
            );
            reached += u32::from(r.report.time_bound_reached);
            for (i, g) in grades(&observed(&r.report), &truth(&path))
                .iter()
                .enumerate()
            {
                t.add(*g);
                assert_ne!(
                    *g,
                    Grade::Wrong,
                    "{} seed {seed}: {} wrong\n{}",
                    label(&path),
                    FIELDS[i],
                    dump(&r.report)
                );
            }
        }
    }
    eprintln!("loss 60% one-way, {runs} runs: {reached} reached the 1.5 s bound; verdicts {t:?}");
    assert!(reached > 0, "the bound was never exercised");
}

/// A bound shorter than the run: whatever is still open is `unknown` and says why; silence cut
/// short is never `blocked`; a verdict already complete stands.
#[test]
fn a_short_bound_leaves_open_tests_unknown_and_never_calls_udp_blocked() {
    let blocked = SimConfig::new(Path::UdpBlocked, 1);
    let mut short = sim::probe_config(1);
    short.max_time = Duration::from_secs(1);
    let r = sim::run_probe(&blocked, short.clone());
    assert!(r.completed);
    assert!(r.report.time_bound_reached, "{}", dump(&r.report));
    assert!(
        !r.report.udp_blocked,
        "RFC 8489's budget (2.6 s) never ran out"
    );
    assert_eq!(r.report.classic, Classic::Unknown);
    let reach = &r.report.tests[0];
    assert_eq!(reach.verdict, "unknown");
    assert!(
        reach
            .evidence
            .contains("before the time bound (--max-time 1 s)"),
        "{reach:?}"
    );
    assert!(r.report.duration_ms <= 1000.0);
    // The default bound holds RFC 8489's budget: blocked is concluded.
    let r = run(&blocked);
    assert!(r.report.udp_blocked && !r.report.time_bound_reached);

    // A port-restricted cone with 60 ms of bound: reachability and mapping are done by then,
    // the negative filtering test is not.
    let cone = Path::Nat(nat(
        M::EndpointIndependent,
        F::AddressAndPortDependent,
        PortAllocation::Preserve,
        false,
    ));
    let cfg = SimConfig::new(cone.clone(), 2);
    let mut short = sim::probe_config(2);
    short.max_time = Duration::from_millis(60);
    let r = sim::run_probe(&cfg, short);
    assert!(r.report.time_bound_reached, "{}", dump(&r.report));
    assert_eq!(r.report.mapping, Behavior::EndpointIndependent);
    assert_eq!(r.report.filtering, Behavior::Unknown);
    let filtering = r
        .report
        .tests
        .iter()
        .find(|t| t.name == "filtering")
        .unwrap();
    assert!(
        filtering
            .evidence
            .ends_with("stopped at the time bound (--max-time 0.06 s)"),
        "{filtering:?}"
    );
    assert_eq!(filtering.miss_chance, None);
    assert_eq!(r.report.port_allocation.pattern, AllocationPattern::Unknown);
    for g in grades(&observed(&r.report), &truth(&cone)) {
        assert_ne!(g, Grade::Wrong, "{}", dump(&r.report));
    }
    assert!(r.report.duration_ms <= 60.0);
}

/// How sure: each row says how many answers it rests on, and a negative verdict the chance that
/// its silence was only loss.
#[test]
fn rows_say_how_many_answers_and_how_likely_a_silence_was_loss() {
    let cone = Path::Nat(nat(
        M::EndpointIndependent,
        F::AddressAndPortDependent,
        PortAllocation::Preserve,
        false,
    ));
    let mut cfg = SimConfig::new(cone, 4);
    cfg.loss = 0.3;
    let r = run(&cfg);
    let row = |n: &str| r.report.tests.iter().find(|t| t.name == n).unwrap();
    assert_eq!(r.report.filtering, Behavior::AddressAndPortDependent);
    let f = row("filtering");
    // Only the liveness control answered; the two change requests were silent.
    assert!(f.answers.is_some_and(|a| a >= 1), "{f:?}");
    let miss = f.miss_chance.expect("a negative verdict has a miss chance");
    // Two silent requests, each below the 1e-6 target: their combined chance is below 2e-6.
    assert!(miss < 2e-6 && miss > 0.0, "{f:?}");
    assert_eq!(r.report.negative_confidence.map(|c| c < 1.0), Some(true));
    let reach = row("udp reachability");
    assert!(reach.answers.is_some_and(|a| a > 0) && reach.miss_chance.is_none());
    assert_eq!(row("nat presence").answers, None);
    assert!(r.report.loss_transmissions >= reach.answers.unwrap_or(0));
    assert!(r.report.loss_estimate > 0.2, "{}", r.report.loss_estimate);
}

/// Broken servers: the problem is reported and no NAT verdict is invented from it. Verdicts that
/// rest on the primary address alone (reachability, NAT presence, port allocation) stay exact;
/// hairpinning may become `unknown` (with fewer answered requests there is less evidence that its
/// silence is not loss) but never wrong.
#[test]
fn broken_servers_are_reported_not_turned_into_verdicts() {
    use Behavior::Unknown;
    let paths = [
        Path::Nat(nat(
            M::EndpointIndependent,
            F::EndpointIndependent,
            PortAllocation::Preserve,
            true,
        )),
        Path::Nat(nat(
            M::EndpointIndependent,
            F::AddressAndPortDependent,
            PortAllocation::Sequential { step: 1 },
            false,
        )),
        Path::Nat(nat(
            M::AddressAndPortDependent,
            F::AddressDependent,
            PortAllocation::Random,
            true,
        )),
        Path::Nat(nat(
            M::AddressDependent,
            F::EndpointIndependent,
            PortAllocation::Preserve,
            false,
        )),
        Path::Open,
        Path::Firewall(F::AddressAndPortDependent),
    ];
    for mode in [
        ServerMode::OtherAddressSameIp,
        ServerMode::SingleAddress,
        ServerMode::IgnoresChangeRequest,
        ServerMode::ChangeFromWrongSource,
    ] {
        for path in &paths {
            for (seed, loss) in [(1, 0.0), (2, 0.0), (3, 0.1), (4, 0.3)] {
                let mut cfg = SimConfig::new(path.clone(), seed);
                cfg.server = mode;
                cfg.loss = loss;
                let r = run(&cfg);
                let (got, want) = (observed(&r.report), truth(path));
                let ctx = format!("{mode:?} {} loss {loss}\n{}", label(path), dump(&r.report));
                let problems = &r.report.server.problems;
                assert!(!problems.is_empty(), "{ctx}");
                for (name, g) in FIELDS.iter().zip(grades(&got, &want)) {
                    assert_ne!(g, Grade::Wrong, "{name}: {ctx}");
                }
                assert_eq!((got.udp_blocked, got.nat), (false, want.nat), "{ctx}");
                assert_eq!(
                    (got.allocation, got.delta),
                    (want.allocation, want.delta),
                    "{ctx}"
                );
                // Filtering needs change requests answered from the right place: never a verdict.
                assert_eq!(got.filtering, Unknown, "{ctx}");
                assert_eq!(got.classic, Classic::Unknown, "{ctx}");
                match mode {
                    // No usable second address: no mapping test either.
                    ServerMode::OtherAddressSameIp | ServerMode::SingleAddress => {
                        assert_eq!(got.mapping, Unknown, "{ctx}");
                        assert!(problems[0].contains("OTHER-ADDRESS"), "{ctx}");
                    }
                    // Plain Binding requests to the alternate are answered correctly, so the
                    // mapping verdict stands on sound evidence.
                    _ => {
                        if loss == 0.0 {
                            assert_eq!(got.mapping, want.mapping, "{ctx}");
                        }
                        assert!(
                            problems.iter().all(|p| p.starts_with("filtering test")),
                            "{ctx}"
                        );
                    }
                }
            }
        }
    }
}

/// An ALG rewriting MAPPED-ADDRESS: reported, and the verdicts rest on XOR-MAPPED-ADDRESS, which it
/// cannot touch, so they are still the truth.
#[test]
fn alg_rewriting_mapped_address_is_reported() {
    for path in grid() {
        let Path::Nat(_) = path else { continue };
        let mut cfg = SimConfig::new(path.clone(), 7);
        cfg.alg = true;
        let r = run(&cfg);
        let ctx = format!("{}\n{}", label(&path), dump(&r.report));
        assert!(r.stats.alg_rewrites > 0, "{ctx}");
        assert_eq!(r.report.alg_detected, Some(true), "{ctx}");
        assert!(
            r.report
                .server
                .problems
                .iter()
                .any(|p| p.contains("MAPPED-ADDRESS") && p.contains("ALG")),
            "{ctx}"
        );
        assert_eq!(observed(&r.report), truth(&path), "{ctx}");
        assert_eq!(
            r.report.public_address.map(|a| a.ip()),
            Some(std::net::IpAddr::V4(sim::NAT_EXTERNAL_IP)),
            "{ctx}"
        );
    }
}

#[test]
fn port_restricted_cone_classification_time_at_1ms() {
    let path = Path::Nat(nat(
        M::EndpointIndependent,
        F::AddressAndPortDependent,
        PortAllocation::Preserve,
        false,
    ));
    let mut cfg = SimConfig::new(path.clone(), 1);
    cfg.one_way_delay = Duration::from_millis(1);
    let r = run(&cfg);
    assert_eq!(observed(&r.report), truth(&path));
    eprintln!(
        "port-restricted cone, 1 ms one-way, no loss: classified in {:?} virtual (report duration {:.1} ms, retry budget {:.1} ms, {} datagrams sent)",
        r.virtual_time, r.report.duration_ms, r.report.retry_budget_ms, r.stats.client_sent
    );
    for t in &r.report.tests {
        eprintln!(
            "  {:<18} {:>7.1} ms  {:>3} requests  {}",
            t.name, t.duration_ms, t.requests_sent, t.verdict
        );
    }
    assert!(
        r.virtual_time < Duration::from_secs(2),
        "{:?}",
        r.virtual_time
    );
}

/// A negative test (here filtering on SF) spaces its transmissions by about one round trip
/// (SRTT + RTTVAR), not by the RFC 8489 backoff of 2·RTO, and only then waits out the tail: its
/// liveness control goes out no sooner than 2·RTO after the last transmission. At 4 ms one way
/// (RTT 8 ms, no jitter) the gaps must stay under 1.5 RTT — the backoff would give 2·RTO ≥ 16 ms —
/// and the control must trail the last transmission by at least 2 RTT.
#[test]
fn negative_transmissions_are_spaced_by_a_round_trip_and_the_control_waits_the_tail() {
    use natscope_probes::probe::plan::SF;
    use natscope_probes::probe::sim::SentDatagram;
    let path = Path::Nat(nat(
        M::EndpointIndependent,
        F::AddressAndPortDependent,
        PortAllocation::Preserve,
        false,
    ));
    let rtt = Duration::from_millis(8);
    let mut cfg = SimConfig::new(path.clone(), 11);
    cfg.one_way_delay = rtt / 2;
    let r = run(&cfg);
    assert_eq!(observed(&r.report), truth(&path));
    let on_sf: Vec<&SentDatagram> = r.sent.iter().filter(|d| d.socket == SF).collect();
    // STUN message length 16: a Binding with CHANGE-REQUEST (+ FINGERPRINT); 8: a plain one.
    let change = |d: &&&SentDatagram| d.payload[2..4] == [0, 16];
    let first_tid = on_sf
        .iter()
        .find(change)
        .expect("a filtering request")
        .payload[8..20]
        .to_vec();
    let times: Vec<Duration> = on_sf
        .iter()
        .filter(|d| d.payload[8..20] == first_tid[..])
        .map(|d| d.at)
        .collect();
    assert!(times.len() >= 3, "{times:?}");
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] < rtt * 3 / 2,
            "gap {:?} in {times:?}",
            w[1] - w[0]
        );
    }
    let last_change = on_sf.iter().filter(change).map(|d| d.at).max().unwrap();
    let control = on_sf
        .iter()
        .filter(|d| d.payload[2..4] == [0, 8] && d.at > last_change)
        .map(|d| d.at)
        .next()
        .expect("the liveness control follows the filtering requests");
    assert!(
        control - last_change >= rtt * 2,
        "control {:?} after the last filtering request",
        control - last_change
    );
}

/// A cold start: every answer of the first 30 ms waits until then (the lab on a busy host: the
/// NAT engine and the reflector woken from sleep; a real NAT's slow path for new mappings), then
/// the path answers in 0.5 ms. The first flight's round trips (~30 ms, a dozen copies of one
/// event) must not set the pace of the whole run: once a later request has been answered, a
/// negative test's transmissions are spaced by the warm round trip (under 10 ms apart after the
/// first gap), while its silence still waits twice the first flight's delay (≥ 60 ms) after its
/// first transmission before the liveness control goes out.
#[test]
fn a_cold_first_flight_does_not_set_the_pace_but_is_still_allowed_for() {
    use natscope_probes::probe::plan::SF;
    use natscope_probes::probe::sim::{SentDatagram, Stall};
    for f in [F::EndpointIndependent, F::AddressAndPortDependent] {
        let path = Path::Nat(nat(
            M::EndpointIndependent,
            f,
            PortAllocation::Preserve,
            false,
        ));
        let mut cfg = SimConfig::new(path.clone(), 12);
        cfg.one_way_delay = Duration::from_micros(250);
        cfg.stall = Some(Stall {
            at: Duration::ZERO,
            len: Duration::from_millis(30),
            socket: None,
        });
        let r = run(&cfg);
        assert_eq!(observed(&r.report), truth(&path), "{}", dump(&r.report));
        if f == F::EndpointIndependent {
            continue; // answered at once: nothing to space
        }
        let on_sf: Vec<&SentDatagram> = r.sent.iter().filter(|d| d.socket == SF).collect();
        let change = |d: &&&SentDatagram| d.payload[2..4] == [0, 16];
        let tid = on_sf
            .iter()
            .find(change)
            .expect("a filtering request")
            .payload[8..20]
            .to_vec();
        let times: Vec<Duration> = on_sf
            .iter()
            .filter(|d| d.payload[8..20] == tid[..])
            .map(|d| d.at)
            .collect();
        assert!(times.len() >= 4, "{times:?}");
        for w in times[1..].windows(2) {
            assert!(
                w[1] - w[0] < Duration::from_millis(10),
                "gap {:?} in {times:?}",
                w[1] - w[0]
            );
        }
        let control = on_sf
            .iter()
            .filter(|d| d.payload[2..4] == [0, 8] && d.at > times[0])
            .map(|d| d.at)
            .next()
            .expect("the liveness control follows the filtering requests");
        assert!(
            control - times[0] >= Duration::from_millis(60),
            "control {:?} after the first filtering request",
            control - times[0]
        );
        eprintln!(
            "cold first flight: filtering transmissions at {times:?}, control at {control:?}, done in {:?}",
            r.virtual_time
        );
    }
}

/// RFC 4787 REQ-2: a NAT with several external addresses that pools them arbitrarily gives this
/// host's fresh sockets different addresses. The probe reports `arbitrary` (and says so in the
/// port allocation row and the summary), stops calling the ports predictable, and every other
/// verdict stays the truth. Paired pooling, or a single address, is `paired`; no NAT, `None`.
#[test]
fn address_pooling_is_reported() {
    use natscope_probes::nat::Pooling;
    use natscope_probes::probe::AddressPooling;
    for seed in 0..8 {
        for (ips, pooling, want) in [
            (1, Pooling::Paired, AddressPooling::Paired),
            (4, Pooling::Paired, AddressPooling::Paired),
            (3, Pooling::Arbitrary, AddressPooling::Arbitrary),
            (4, Pooling::Arbitrary, AddressPooling::Arbitrary),
        ] {
            let mut b = nat(
                M::EndpointIndependent,
                F::AddressAndPortDependent,
                PortAllocation::Preserve,
                false,
            );
            b.pooling = pooling;
            let path = Path::Nat(b);
            let mut cfg = SimConfig::new(path.clone(), 9000 + seed);
            cfg.nat_external_ips = ips;
            let r = run(&cfg);
            let what = format!("{ips} address(es), {pooling:?}, seed {seed}");
            assert_eq!(observed(&r.report), truth(&path), "{what}");
            assert_eq!(
                r.report.address_pooling,
                Some(want),
                "{what}\n{}",
                dump(&r.report)
            );
            let alloc_row = r
                .report
                .tests
                .iter()
                .find(|t| t.name == "port allocation")
                .unwrap();
            let arbitrary = want == AddressPooling::Arbitrary;
            assert_eq!(
                alloc_row.evidence.contains("pooling is arbitrary"),
                arbitrary,
                "{what}"
            );
            assert_eq!(
                r.report.summary.contains("pooled arbitrarily"),
                arbitrary,
                "{what}"
            );
        }
    }
    let r = run(&SimConfig::new(Path::Open, 1));
    assert_eq!(r.report.address_pooling, None);

    // A sequential symmetric NAT's next port is predictable — unless its address is a guess too.
    for (pooling, predicted) in [(Pooling::Paired, true), (Pooling::Arbitrary, false)] {
        let mut b = nat(
            M::AddressAndPortDependent,
            F::AddressAndPortDependent,
            PortAllocation::Sequential { step: 1 },
            false,
        );
        b.pooling = pooling;
        let mut cfg = SimConfig::new(Path::Nat(b), 9100);
        cfg.nat_external_ips = 4;
        let r = run(&cfg);
        let prediction = r
            .report
            .outlook
            .iter()
            .any(|o| o.direct_udp == "with-port-prediction");
        assert_eq!(prediction, predicted, "{pooling:?}\n{}", dump(&r.report));
    }
}

/// A lossless path whose delay spikes past the RTO (CPU contention on a busy host, a queue
/// somewhere): an answer that arrives after its request was retransmitted is late, not lost, and
/// must not count as loss evidence — otherwise the negative tests ask for ever more
/// transmissions, hit their cap, and report `unknown` on a path that lost nothing (seen in
/// `natscope lab matrix` with six labs sharing two cores).
#[test]
fn late_answers_are_not_loss() {
    let mut unknown = Vec::new();
    for seed in 0..6 {
        for path in grid() {
            let mut cfg = SimConfig::new(path.clone(), 5000 + seed);
            cfg.one_way_delay = Duration::from_millis(1);
            cfg.jitter = Duration::from_millis(60);
            let r = run(&cfg);
            let (got, want) = (observed(&r.report), truth(&path));
            for (i, g) in grades(&got, &want).iter().enumerate() {
                assert_ne!(
                    *g,
                    Grade::Wrong,
                    "{} seed {seed}: {}\n{}",
                    label(&path),
                    FIELDS[i],
                    dump(&r.report)
                );
                if *g == Grade::Unknown {
                    unknown.push(format!("{} seed {seed}: {}", label(&path), FIELDS[i]));
                }
            }
            assert!(
                r.report.loss_estimate < 0.05,
                "{} seed {seed}: a lossless path estimated at {:?} loss",
                label(&path),
                r.report.loss_estimate
            );
        }
    }
    assert!(
        unknown.is_empty(),
        "{} unknown verdicts on a lossless path, e.g. {:?}",
        unknown.len(),
        &unknown[..unknown.len().min(5)]
    );
}

/// A stalled receive path (CPU contention: the task reading a socket is not scheduled while the
/// timers run on): from just after the first request of the test under stall, for 300 ms, every
/// datagram to the stalled socket queues and is handed over in order at the end. The evidence
/// window of a negative verdict is far shorter than that at a 5 ms RTO floor, so without the
/// liveness control a NAT whose answers do come (EIF, hairpinning) would be reported as filtering
/// (APDF) or not hairpinning: wrong. With it the negative waits for the control's answer, which
/// queues behind the late positives, so the verdicts stay true; an APDF NAT and one that does not
/// hairpin must still be reported as such. Stalling every socket may cost verdicts (`unknown`),
/// never make one wrong.
#[test]
fn a_stalled_receive_path_delays_negative_verdicts_but_cannot_fake_them() {
    use natscope_probes::probe::plan::{S0, SF};
    use natscope_probes::probe::sim::Stall;
    use natscope_probes::probe::SocketId;
    let cases: [(F, bool, Option<SocketId>); 8] = [
        (F::EndpointIndependent, false, Some(SF)),
        (F::AddressAndPortDependent, false, Some(SF)),
        (F::AddressDependent, false, Some(SF)),
        (F::EndpointIndependent, true, Some(S0)),
        (F::AddressAndPortDependent, false, Some(S0)),
        (F::EndpointIndependent, true, None),
        (F::AddressAndPortDependent, false, None),
        (F::AddressDependent, true, None),
    ];
    for seed in 0..4 {
        for (f, hairpin, socket) in cases {
            let path = Path::Nat(nat(
                M::EndpointIndependent,
                f,
                PortAllocation::Preserve,
                hairpin,
            ));
            let mut cfg = SimConfig::new(path.clone(), 7000 + seed);
            cfg.one_way_delay = Duration::from_millis(1);
            // The stall starts 1 ms after the first request of the test whose answers (or
            // hairpinned request) arrive on the stalled socket, before any of them can arrive.
            let first_send = run(&cfg)
                .sent
                .iter()
                .find(|d| d.socket == if socket == Some(S0) { SocketId(2) } else { SF })
                .map(|d| d.at)
                .expect("the test was sent");
            cfg.stall = Some(Stall {
                at: first_send + Duration::from_millis(1),
                len: Duration::from_millis(300),
                socket,
            });
            let r = run(&cfg);
            let (got, want) = (observed(&r.report), truth(&path));
            eprintln!(
                "stall {socket:?} {} seed {seed}: filtering {:?} hairpinning {:?} in {:?}",
                label(&path),
                got.filtering,
                got.hairpinning,
                r.virtual_time
            );
            for (i, g) in grades(&got, &want).iter().enumerate() {
                assert_ne!(
                    *g,
                    Grade::Wrong,
                    "stall on {socket:?}, {} seed {seed}: {} wrong\n{}",
                    label(&path),
                    FIELDS[i],
                    dump(&r.report)
                );
            }
            match socket {
                Some(s) if s == SF => {
                    assert_eq!(got.filtering, want.filtering, "{}", dump(&r.report))
                }
                Some(_) => assert_eq!(got.hairpinning, want.hairpinning, "{}", dump(&r.report)),
                None => {}
            }
        }
    }
}
