//! Benchmark harness: how long a full classification through a port-restricted cone takes on the
//! simulator's virtual clock, for a few path delays and jitters, over 41 seeds each (deterministic:
//! the same numbers on every machine). Run with
//! `cargo run --release -p natscope-probes --example probe_sim_times`.

use std::time::Duration;

use natscope_probes::nat::{FilteringBehavior, MappingBehavior, NatBehavior, PortAllocation};
use natscope_probes::probe::sim::{self, Path, SimConfig, Stall};

const SEEDS: u64 = 41;

fn main() {
    let mut nat = NatBehavior::new(
        MappingBehavior::EndpointIndependent,
        FilteringBehavior::AddressAndPortDependent,
    );
    nat.allocation = PortAllocation::Preserve;
    nat.hairpinning = false;
    println!("port-restricted cone, no loss, {SEEDS} seeds: virtual time of a full classification");
    // (one way, jitter, a stall of every socket's receive path at the start), in µs.
    let cases = [
        (1000u64, 0u64, 0u64),
        (250, 0, 0),
        (250, 0, 30_000),
        (250, 12_000, 0),
        (1000, 60_000, 0),
    ];
    for (one_way_us, jitter_us, stall_us) in cases {
        let mut times = Vec::new();
        let mut sent = Vec::new();
        for seed in 0..SEEDS {
            let mut cfg = SimConfig::new(Path::Nat(nat.clone()), 100 + seed);
            cfg.one_way_delay = Duration::from_micros(one_way_us);
            cfg.jitter = Duration::from_micros(jitter_us);
            cfg.stall = (stall_us > 0).then(|| Stall {
                at: Duration::ZERO,
                len: Duration::from_micros(stall_us),
                socket: None,
            });
            let r = sim::run_probe(&cfg, sim::probe_config(cfg.seed.wrapping_mul(0x9E37_79B9)));
            assert!(r.completed, "seed {seed} did not finish");
            times.push(r.virtual_time.as_secs_f64() * 1000.0);
            sent.push(r.stats.client_sent);
        }
        times.sort_by(f64::total_cmp);
        sent.sort_unstable();
        let q = |p: usize| times[(times.len() - 1) * p / 100];
        println!(
            "  one way {:>5.2} ms, jitter up to {:>4.1} ms, start stall {:>4.1} ms: p10 {:7.1} ms  median {:7.1} ms  p90 {:7.1} ms  ({} datagrams, median)",
            one_way_us as f64 / 1000.0,
            jitter_us as f64 / 1000.0,
            stall_us as f64 / 1000.0,
            q(10),
            q(50),
            q(90),
            sent[sent.len() / 2]
        );
    }
}
