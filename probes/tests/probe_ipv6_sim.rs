//! The probe over IPv6 against the simulated network (issue 13, must-show 5): no translation behind
//! an RFC 6092 firewall of each filtering behavior, stateless prefix translation (RFC 6296) behind
//! each, every stateful NAT66 of the RFC 4787 grid, and blocked UDP. Without loss every IPv6
//! verdict — mapping, filtering (the firewall's), port preservation, hairpinning and translation —
//! equals the simulated truth; at 10 % loss each is the truth or `unknown`, never wrong.

use std::time::Duration;

use natscope_probes::nat::{
    FilteringBehavior as F, MappingBehavior as M, NatBehavior, PortAllocation,
};
use natscope_probes::probe::family::{self, Ipv6Report, Translation};
use natscope_probes::probe::sim::{self, Path, SimConfig};
use natscope_probes::probe::Behavior;

const FILTERINGS: [F; 3] = [
    F::EndpointIndependent,
    F::AddressDependent,
    F::AddressAndPortDependent,
];

fn grid() -> Vec<Path> {
    let mut paths = vec![Path::Open, Path::UdpBlocked];
    for f in FILTERINGS {
        paths.push(Path::Firewall(f));
        paths.push(Path::Nptv6(f));
    }
    for m in [
        M::EndpointIndependent,
        M::AddressDependent,
        M::AddressAndPortDependent,
    ] {
        for f in FILTERINGS {
            for a in [
                PortAllocation::Preserve,
                PortAllocation::Sequential { step: 1 },
                PortAllocation::Random,
            ] {
                for hp in [false, true] {
                    let mut b = NatBehavior::new(m, f);
                    b.allocation = a;
                    b.hairpinning = hp;
                    paths.push(Path::Nat(b));
                }
            }
        }
    }
    paths
}

/// The IPv6 verdicts, in one comparable value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verdicts {
    udp_blocked: bool,
    mapping: Behavior,
    filtering: Behavior,
    port_preservation: Option<bool>,
    hairpinning: Option<bool>,
    translation: Translation,
}

const FIELDS: [&str; 6] = [
    "udp_blocked",
    "mapping",
    "filtering",
    "port_preservation",
    "hairpinning",
    "translation",
];

fn observed(r: &Ipv6Report) -> Verdicts {
    Verdicts {
        udp_blocked: r.report.udp_blocked,
        mapping: r.report.mapping,
        filtering: r.report.filtering,
        port_preservation: r.report.port_preservation,
        hairpinning: r.report.hairpinning,
        translation: r.translation,
    }
}

/// What a correct probe concludes, written out independently of the probe.
fn truth(path: &Path) -> Verdicts {
    use Behavior::*;
    match path {
        Path::Open | Path::Firewall(_) => Verdicts {
            udp_blocked: false,
            mapping: EndpointIndependent,
            filtering: match path {
                Path::Firewall(f) => Behavior::from(*f),
                _ => EndpointIndependent,
            },
            port_preservation: Some(true),
            hairpinning: None,
            translation: Translation::None,
        },
        Path::Nptv6(f) => Verdicts {
            udp_blocked: false,
            mapping: EndpointIndependent,
            filtering: Behavior::from(*f),
            port_preservation: Some(true),
            hairpinning: Some(false),
            translation: Translation::Nptv6,
        },
        Path::Nat(b) => Verdicts {
            udp_blocked: false,
            mapping: Behavior::from(b.mapping),
            filtering: Behavior::from(b.filtering),
            port_preservation: Some(b.allocation == PortAllocation::Preserve),
            hairpinning: Some(b.hairpinning),
            translation: Translation::Nat66,
        },
        Path::UdpBlocked => Verdicts {
            udp_blocked: true,
            mapping: Unknown,
            filtering: Unknown,
            port_preservation: None,
            hairpinning: None,
            translation: Translation::Unknown,
        },
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

fn grades(got: &Verdicts, want: &Verdicts) -> [Grade; 6] {
    [
        if got.udp_blocked == want.udp_blocked {
            Grade::Correct
        } else {
            Grade::Wrong
        },
        grade(got.mapping, want.mapping, Behavior::Unknown),
        grade(got.filtering, want.filtering, Behavior::Unknown),
        grade(got.port_preservation, want.port_preservation, None),
        grade(got.hairpinning, want.hairpinning, None),
        grade(got.translation, want.translation, Translation::Unknown),
    ]
}

fn run(cfg: &SimConfig) -> Ipv6Report {
    let r = sim::run_probe(cfg, sim::probe_config6(cfg.seed.wrapping_mul(0x9E37_79B9)));
    assert!(r.completed, "the probe did not finish: {:?}", r.stats);
    Ipv6Report::new(r.report)
}

/// Runs the grid at `loss` over `seeds`; fails on any wrong verdict; returns (correct, unknown)
/// per field.
fn loss_grid(loss: f64, seeds: std::ops::Range<u64>) -> [(u32, u32); 6] {
    let mut per_field = [(0u32, 0u32); 6];
    let mut wrong = Vec::new();
    let mut runs = 0;
    let mut longest = Duration::ZERO;
    let mut loss_seen = 0.0;
    for seed in seeds {
        for path in grid() {
            let mut cfg = SimConfig::new(path.clone(), 6000 + seed);
            cfg.ipv6 = true;
            cfg.loss = loss;
            let r = run(&cfg);
            longest = longest.max(Duration::from_secs_f64(r.report.duration_ms / 1000.0));
            loss_seen += r.report.loss_estimate;
            runs += 1;
            let (got, want) = (observed(&r), truth(&path));
            for (i, g) in grades(&got, &want).iter().enumerate() {
                match g {
                    Grade::Correct => per_field[i].0 += 1,
                    Grade::Unknown => per_field[i].1 += 1,
                    Grade::Wrong => wrong.push(format!(
                        "{path:?} seed {seed}: {} got {got:?} want {want:?}\n{}\n{:#?}",
                        FIELDS[i], r.translation_evidence, r.report
                    )),
                }
            }
        }
    }
    eprintln!(
        "ipv6, loss {:.0}% one-way, {runs} runs, mean round-trip loss estimate {:.1}%, longest report {longest:?}:",
        loss * 100.0,
        loss_seen * 100.0 / f64::from(runs)
    );
    for (name, (c, u)) in FIELDS.iter().zip(per_field) {
        eprintln!("  {name:<18} correct {c:>5}  unknown {u:>4}");
    }
    assert!(
        wrong.is_empty(),
        "{} wrong verdict(s); first:\n{}",
        wrong.len(),
        wrong[0]
    );
    per_field
}

#[test]
fn lossless_ipv6_verdicts_equal_the_simulated_truth() {
    for (c, u) in loss_grid(0.0, 0..3) {
        assert_eq!(u, 0, "no unknown verdict without loss");
        assert!(c > 0);
    }
}

#[test]
fn ten_percent_loss_ipv6_verdicts_are_correct_or_unknown() {
    let per_field = loss_grid(0.10, 0..40);
    let (c, u) = per_field
        .iter()
        .fold((0, 0), |(c, u), (fc, fu)| (c + fc, u + fu));
    assert!(
        f64::from(c) / f64::from(c + u) > 0.9,
        "at 10% loss most verdicts must still be made: {c} correct, {u} unknown"
    );
}

#[test]
fn the_outlook_says_what_ipv6_filtering_means() {
    let outlook = |path: Path| {
        let mut cfg = SimConfig::new(path, 7);
        cfg.ipv6 = true;
        run(&cfg).outlook
    };
    assert_eq!(
        outlook(Path::Firewall(F::EndpointIndependent)),
        "IPv6: direct connections work with peers that have IPv6 — your firewall admits anyone you have talked to (EIF)"
    );
    let apdf = outlook(Path::Firewall(F::AddressAndPortDependent));
    assert!(
        apdf.contains("only the exact address and port (APDF): both sides must punch"),
        "{apdf}"
    );
    let npt = outlook(Path::Nptv6(F::EndpointIndependent));
    assert!(
        npt.contains("(EIF)") && npt.contains("prefix translation"),
        "{npt}"
    );
    let mut sym = NatBehavior::new(M::AddressAndPortDependent, F::AddressAndPortDependent);
    sym.allocation = PortAllocation::Random;
    assert!(outlook(Path::Nat(sym)).contains("NAT66 maps per destination"));
}

#[test]
fn side_by_side_rows_show_both_families() {
    let mut v4 = SimConfig::new(Path::Firewall(F::AddressAndPortDependent), 3);
    v4.loss = 0.0;
    let r4 = sim::run_probe(&v4, sim::probe_config(3)).report;
    let mut v6 = SimConfig::new(Path::Nptv6(F::EndpointIndependent), 3);
    v6.ipv6 = true;
    let r6 = run(&v6);
    let rows = family::rows(Some(&r4), Some(&r6));
    let get = |name: &str| rows.iter().find(|r| r[0] == name).unwrap().clone();
    assert_eq!(
        get("filtering")[1..],
        ["address-and-port-dependent", "endpoint-independent"]
    );
    assert_eq!(get("translation")[1..], ["-", "nptv6"]);
    let only6 = family::rows(None, Some(&r6));
    assert!(only6.iter().all(|r| r[1] == "-"));
}

#[test]
fn thirty_percent_loss_ipv6_verdicts_are_still_never_wrong() {
    // Beyond must-show 5's 10 %: here evidence does go missing, and must turn into `unknown`.
    loss_grid(0.30, 0..10);
}

/// The translation verdict rests on each piece of its evidence: take one away or contradict it,
/// and `nptv6` becomes `unknown` (missing) or `nat66` (contradicted), never stays a guess.
#[test]
fn translation_needs_every_piece_of_its_evidence() {
    use natscope_probes::probe::family::translation;
    let mut cfg = SimConfig::new(Path::Nptv6(F::AddressAndPortDependent), 11);
    cfg.ipv6 = true;
    let base = sim::run_probe(&cfg, sim::probe_config6(11)).report;
    assert_eq!(
        translation(&base).0,
        Translation::Nptv6,
        "{}",
        translation(&base).1
    );
    let with = |f: &dyn Fn(&mut natscope_probes::probe::ProbeReport)| {
        let mut r = base.clone();
        f(&mut r);
        translation(&r).0
    };
    assert_eq!(
        with(&|r| r.mapping = Behavior::Unknown),
        Translation::Unknown
    );
    assert_eq!(with(&|r| r.port_preservation = None), Translation::Unknown);
    assert_eq!(with(&|r| r.nat_detected = None), Translation::Unknown);
    assert_eq!(
        with(&|r| r.mapping = Behavior::AddressDependent),
        Translation::Nat66
    );
    assert_eq!(
        with(&|r| r.port_allocation.samples[0].1 ^= 1),
        Translation::Nat66
    );
    // Two interface-identifier words rewritten: no stateless prefix translator does that.
    assert_eq!(
        with(&|r| {
            let p = r.public_address.unwrap();
            let std::net::IpAddr::V6(ip) = p.ip() else {
                unreachable!()
            };
            let mut w = ip.segments();
            w[6] ^= 1;
            w[7] ^= 2;
            r.public_address = Some(std::net::SocketAddr::new(
                std::net::Ipv6Addr::from(w).into(),
                p.port(),
            ));
        }),
        Translation::Nat66
    );
}
