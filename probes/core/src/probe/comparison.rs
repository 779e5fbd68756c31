//! The multi-server mapping comparison: one socket's mapped address as each of several STUN
//! servers sees it. With an endpoint-independent mapping (RFC 4787 §4.1) every destination sees
//! the same address and port; a difference proves the mapping depends on the destination. Unlike
//! the RFC 5780 tests this needs nothing but plain Binding answers, so it works against any server
//! (the public ones `natscope probe --public` names included).
//!
//! This is the sans-IO half: which servers to ask ([`MappingComparison::to_ask`]), the
//! retransmission budget ([`MappingComparison::rto`]), what each transaction's end means
//! ([`MappingComparison::record`]), the verdict and the report row. The driver that sends one
//! transaction at a time from one socket is `natscope_probes::probe::comparison`.

use std::net::SocketAddr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;

use super::evidence::Timing;
use super::report::TestReport;
use crate::client::{Rto, TransactionEvent};

/// One socket's mapped address as seen by each server (RFC 4787 §4.1: with an endpoint-independent
/// mapping every destination sees the same address and port).
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct MappingComparison {
    /// The socket every Binding request was sent from.
    pub local_address: Option<SocketAddr>,
    /// `true`: the mapped address differs between destinations (not endpoint-independent);
    /// `false`: every answering server saw the same one; `null`: fewer than two answers.
    pub varies_by_destination: Option<bool>,
    pub servers: Vec<ComparedServer>,
    #[serde(skip)]
    pub requests_sent: u32,
    #[serde(skip)]
    pub duration_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct ComparedServer {
    pub address: SocketAddr,
    pub mapped_address: Option<SocketAddr>,
    /// Why this server gave no usable answer.
    pub problem: Option<String>,
}

impl MappingComparison {
    /// Every server marked with `why` (the comparison could not start).
    pub fn not_run(servers: &[SocketAddr], why: &str) -> Self {
        Self {
            local_address: None,
            varies_by_destination: None,
            servers: servers
                .iter()
                .map(|&address| ComparedServer {
                    address,
                    mapped_address: None,
                    problem: Some(why.to_string()),
                })
                .collect(),
            requests_sent: 0,
            duration_ms: 0.0,
        }
    }

    /// A comparison from the socket at `local` over `servers`, in order. Servers that cannot be
    /// asked already carry their problem: a repeat says nothing new (one socket keeps one mapping
    /// under test), and another address family has another mapping.
    pub fn plan(local: Option<SocketAddr>, servers: &[SocketAddr]) -> Self {
        let asked = asked(servers);
        let family = servers.first().map(SocketAddr::is_ipv4);
        let rows = servers
            .iter()
            .zip(&asked)
            .map(|(&address, &ask)| ComparedServer {
                address,
                mapped_address: None,
                problem: (!ask).then(|| {
                    if Some(address.is_ipv4()) != family {
                        "other address family than the first server".to_string()
                    } else {
                        "listed twice".to_string()
                    }
                }),
            })
            .collect();
        Self {
            local_address: local,
            varies_by_destination: None,
            servers: rows,
            requests_sent: 0,
            duration_ms: 0.0,
        }
    }

    /// The rows to ask, as (row index, server), in order: one transaction each, never two at once.
    pub fn to_ask(&self) -> Vec<(usize, SocketAddr)> {
        let addrs: Vec<SocketAddr> = self.servers.iter().map(|s| s.address).collect();
        asked(&addrs)
            .into_iter()
            .enumerate()
            .filter(|&(_, ask)| ask)
            .map(|(i, _)| (i, addrs[i]))
            .collect()
    }

    /// The retransmission budget of each transaction: the probe's reachability budget, with short
    /// waits (a comparison row is worth less than the classification it follows).
    pub fn rto(timing: &Timing) -> Rto {
        Rto {
            initial: timing.initial_rto,
            max_transmits: timing.reach_transmits.max(1),
            last_wait_multiplier: 2,
            max_rto: (timing.initial_rto * 2).min(timing.max_rto.max(timing.initial_rto)),
        }
    }

    /// Records how the transaction to row `index` ended after `transmits` transmissions. An answer
    /// counts only if it names the server as RESPONSE-ORIGIN (when present) and carries a mapped
    /// address; the transaction itself accepted it only from the server's address.
    pub fn record(&mut self, index: usize, end: TransactionEvent, transmits: u32) {
        self.requests_sent += transmits;
        let Some(row) = self.servers.get_mut(index) else {
            return;
        };
        match end {
            TransactionEvent::Done(r) => match r.response_origin {
                Some(o) if o != row.address => {
                    row.problem = Some(format!("RESPONSE-ORIGIN {o} is not the server's address"));
                }
                _ => match r.reflexive() {
                    Some(m) => row.mapped_address = Some(m),
                    None => row.problem = Some("answer without a mapped address".into()),
                },
            },
            TransactionEvent::TimedOut {
                wrong_source: Some(f),
                ..
            } => row.problem = Some(format!("the answer came from {f}, not from the server")),
            TransactionEvent::TimedOut {
                transmits,
                wrong_source: None,
            } => row.problem = Some(format!("no answer after {transmits} transmissions")),
            TransactionEvent::Pending => {}
        }
    }

    /// Ends the comparison after `elapsed`: decides, and keeps the time for the report row.
    pub fn finish(&mut self, elapsed: Duration) {
        self.conclude();
        self.duration_ms = elapsed.as_secs_f64() * 1e3;
    }

    /// Decides from the answers collected in `servers`.
    pub fn conclude(&mut self) {
        let seen: Vec<SocketAddr> = self
            .servers
            .iter()
            .filter(|s| s.problem.is_none())
            .filter_map(|s| s.mapped_address)
            .collect();
        self.varies_by_destination = match seen.split_first() {
            Some((first, rest)) if !rest.is_empty() => Some(rest.iter().any(|m| m != first)),
            _ => None,
        };
    }

    /// The row this comparison adds to the report's `tests`.
    pub fn test_row(&self) -> TestReport {
        let verdict = match self.varies_by_destination {
            Some(true) => "varies by destination",
            Some(false) => "same for every destination",
            None => "unknown",
        };
        let each: Vec<String> = self
            .servers
            .iter()
            .map(|s| match (&s.problem, s.mapped_address) {
                (Some(p), _) => format!("{}: {p}", s.address),
                (None, Some(m)) => format!("{} saw {m}", s.address),
                (None, None) => format!("{}: no mapped address", s.address),
            })
            .collect();
        let meaning = match self.varies_by_destination {
            Some(true) => "the mapping is not endpoint-independent",
            Some(false) => "endpoint-independent as far as these servers show",
            None => "needs answers from at least two servers",
        };
        let from = self
            .local_address
            .map_or_else(String::new, |l| format!("from {l}: "));
        TestReport {
            name: "mapping comparison".into(),
            verdict: verdict.into(),
            evidence: format!("{from}{}; {meaning}", each.join(", ")),
            requests_sent: self.requests_sent,
            duration_ms: self.duration_ms,
            answers: None,
            miss_chance: None,
        }
    }
}

/// Which of `servers` get a transaction: those of the first server's family, each once.
fn asked(servers: &[SocketAddr]) -> Vec<bool> {
    let family = servers.first().map(SocketAddr::is_ipv4);
    let mut done: Vec<SocketAddr> = Vec::new();
    servers
        .iter()
        .map(|&s| {
            if done.contains(&s) || Some(s.is_ipv4()) != family {
                return false;
            }
            done.push(s);
            true
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::BindingResponse;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn comparison(varies: Option<bool>) -> MappingComparison {
        let m1 = addr("198.51.100.7:61000");
        let m2 = if varies == Some(true) {
            addr("198.51.100.7:61001")
        } else {
            m1
        };
        let mut c = MappingComparison {
            local_address: Some(addr("10.0.0.2:5000")),
            varies_by_destination: None,
            servers: vec![
                ComparedServer {
                    address: addr("127.0.0.1:3478"),
                    mapped_address: Some(m1),
                    problem: None,
                },
                ComparedServer {
                    address: addr("127.0.0.5:3478"),
                    mapped_address: varies.map(|_| m2),
                    problem: varies
                        .is_none()
                        .then(|| "no answer after 7 transmissions".into()),
                },
            ],
            requests_sent: 2,
            duration_ms: 0.5,
        };
        c.conclude();
        c
    }

    #[test]
    fn mapping_comparison_verdicts() {
        assert_eq!(comparison(Some(true)).varies_by_destination, Some(true));
        assert_eq!(comparison(Some(false)).varies_by_destination, Some(false));
        let unknown = comparison(None);
        assert_eq!(unknown.varies_by_destination, None);
        let r = unknown.test_row();
        assert_eq!(r.verdict, "unknown");
        assert_eq!(
            r.evidence,
            "from 10.0.0.2:5000: 127.0.0.1:3478 saw 198.51.100.7:61000, 127.0.0.5:3478: no answer after 7 transmissions; needs answers from at least two servers"
        );
        let same = comparison(Some(false)).test_row();
        assert_eq!(same.verdict, "same for every destination");
        assert!(same
            .evidence
            .ends_with("; endpoint-independent as far as these servers show"));
        // A server listed twice says nothing new: it must not count as a second destination.
        let mut twice = comparison(Some(false));
        twice.servers[1].problem = Some("listed twice".into());
        twice.conclude();
        assert_eq!(twice.varies_by_destination, None);
    }

    /// Repeats and other-family servers are never asked and say why; the rest are asked in order.
    #[test]
    fn the_plan_skips_repeats_and_other_families() {
        let servers = [
            addr("192.0.2.1:3478"),
            addr("[2001:db8::1]:3478"),
            addr("192.0.2.2:3478"),
            addr("192.0.2.1:3478"),
            addr("[2001:db8::1]:3478"),
        ];
        let c = MappingComparison::plan(Some(addr("10.0.0.2:5000")), &servers);
        assert_eq!(c.to_ask(), vec![(0, servers[0]), (2, servers[2])]);
        let problems: Vec<Option<&str>> = c.servers.iter().map(|s| s.problem.as_deref()).collect();
        let family = Some("other address family than the first server");
        assert_eq!(
            problems,
            vec![None, family, None, Some("listed twice"), family]
        );
    }

    /// How each end of a transaction reads in the row, and that only answers count.
    #[test]
    fn recorded_ends_become_rows_and_a_verdict() {
        let servers = [
            addr("192.0.2.1:3478"),
            addr("192.0.2.2:3478"),
            addr("192.0.2.3:3478"),
            addr("192.0.2.4:3478"),
            addr("192.0.2.5:3478"),
        ];
        let mut c = MappingComparison::plan(None, &servers);
        let done = |mapped: Option<&str>, origin: Option<&str>| {
            TransactionEvent::Done(Box::new(BindingResponse {
                xor_mapped: mapped.map(addr),
                response_origin: origin.map(addr),
                ..Default::default()
            }))
        };
        c.record(0, done(Some("198.51.100.7:1"), Some("192.0.2.1:3478")), 1);
        c.record(1, done(Some("198.51.100.7:2"), Some("192.0.2.9:3478")), 2);
        c.record(2, done(None, None), 1);
        let wrong = TransactionEvent::TimedOut {
            transmits: 3,
            wrong_source: Some(addr("192.0.2.66:3478")),
        };
        c.record(3, wrong, 3);
        let silent = TransactionEvent::TimedOut {
            transmits: 3,
            wrong_source: None,
        };
        c.record(4, silent, 3);
        c.finish(Duration::from_millis(40));
        let problems: Vec<Option<&str>> = c.servers.iter().map(|s| s.problem.as_deref()).collect();
        assert_eq!(
            problems,
            vec![
                None,
                Some("RESPONSE-ORIGIN 192.0.2.9:3478 is not the server's address"),
                Some("answer without a mapped address"),
                Some("the answer came from 192.0.2.66:3478, not from the server"),
                Some("no answer after 3 transmissions"),
            ]
        );
        assert_eq!(c.requests_sent, 10);
        assert_eq!(c.duration_ms, 40.0);
        assert_eq!(c.varies_by_destination, None, "one answer is no comparison");
        c.record(1, done(Some("198.51.100.7:2"), None), 0);
        c.servers[1].problem = None;
        c.conclude();
        assert_eq!(c.varies_by_destination, Some(true));
    }
}
