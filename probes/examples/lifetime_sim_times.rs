//! Benchmark harness: numbers of the binding-lifetime search in the simulator (virtual time,
//! deterministic), the table quoted in docs/probe.md. Run with
//! `cargo run --release -p natscope-probes --example lifetime_sim_times` (`VERBOSE=1` for one line
//! per run).

use std::collections::HashSet;
use std::time::Duration;

use natscope_probes::nat::{FilteringBehavior as F, MappingBehavior as M, NatBehavior};
use natscope_probes::probe::sim::{self, Path, SentDatagram, SimConfig};
use natscope_probes::probe::{PaceChoice, Pacing, SocketId};
use natscope_probes::stun::{attr_type, Message};

fn nat(timeout_s: u64, inbound_refresh: bool) -> Path {
    let mut b = NatBehavior::new(M::EndpointIndependent, F::AddressAndPortDependent);
    b.udp_timeout = Duration::from_secs(timeout_s);
    b.inbound_refresh = inbound_refresh;
    Path::Nat(b)
}

fn has_response_port(payload: &[u8]) -> bool {
    Message::parse(payload).is_ok_and(|m| m.attributes().any(|a| a.typ == attr_type::RESPONSE_PORT))
}

/// Sockets that sent a plain Binding (no RESPONSE-PORT): the sockets whose binding is measured.
fn x_sockets(sent: &[SentDatagram]) -> HashSet<SocketId> {
    sent.iter()
        .filter(|d| !has_response_port(&d.payload))
        .map(|d| d.socket)
        .collect()
}

fn main() {
    println!("| NAT | loss | seeds | virtual s (lifetime row / total) | requests | checks | X sockets | bracket / converged-unknown-wrong |");
    for paced in [false, true] {
        for timeout in [30u64, 120] {
            let seed = if timeout == 30 { 1 } else { 2 };
            let mut cfg = SimConfig::new(nat(timeout, false), seed);
            cfg.max_virtual_time = Duration::from_secs(4 * 3600);
            let mut lt = sim::lifetime_config(seed);
            if paced {
                lt.pacing = Pacing::decide(&[lt.server], PaceChoice::On);
            }
            let run = sim::run_lifetime(&cfg, lt);
            let r = run.machine.report();
            println!(
                "| {timeout} s{} | 0 | {seed} | {:.1} / {:.1} | {} | {} | {} | {:?}–{:?} |",
                if paced { " paced" } else { "" },
                r.tests[0].duration_ms / 1e3,
                run.virtual_time.as_secs_f64(),
                r.requests_sent,
                r.checks,
                x_sockets(&run.sent).len(),
                r.lower_s,
                r.upper_s
            );
        }
    }
    for loss in [0.10, 0.30] {
        for timeout in [30u64, 120] {
            let (mut conv, mut unknown, mut wrong) = (0, 0, 0);
            let (mut vt, mut req, mut xs) = (0.0f64, 0u32, 0usize);
            for seed in 10..16u64 {
                for refresh in [false, true] {
                    let mut cfg = SimConfig::new(nat(timeout, refresh), seed);
                    cfg.max_virtual_time = Duration::from_secs(4 * 3600);
                    cfg.loss = loss;
                    let run = sim::run_lifetime(&cfg, sim::lifetime_config(seed));
                    let r = run.machine.report();
                    if std::env::var("VERBOSE").is_ok() {
                        println!(
                            "  loss {loss} timeout {timeout} seed {seed} refresh {refresh}: {:.1} s, {} requests, {} checks, {:?}–{:?}, inbound {:?}",
                            r.tests[0].duration_ms / 1e3,
                            r.requests_sent,
                            r.checks,
                            r.lower_s,
                            r.upper_s,
                            r.inbound_refresh
                        );
                    }
                    vt = vt.max(r.tests[0].duration_ms / 1e3);
                    req = req.max(r.requests_sent);
                    xs = xs.max(x_sockets(&run.sent).len());
                    match (r.binding_lifetime_s, r.upper_s) {
                        (Some(l), Some(h)) if l <= timeout as f64 && timeout as f64 <= h => {
                            conv += 1
                        }
                        (Some(_), _) => {
                            wrong += 1;
                            println!("WRONG seed {seed} refresh {refresh}: {r:?}");
                        }
                        (None, _) => unknown += 1,
                    }
                    if r.inbound_refresh.is_some_and(|b| b != refresh) {
                        println!("WRONG inbound seed {seed} refresh {refresh}: {r:?}");
                        wrong += 1;
                    }
                }
            }
            println!(
                "| {timeout} s | {loss} | 10..16 × refresh yes/no | max {vt:.1} | max {req} | - | max {xs} | {conv}/{unknown}/{wrong} |"
            );
        }
    }
}
