//! The measurement's result: the `binding lifetime` and `inbound refresh` rows (verdict, evidence,
//! requests, duration) and the bounds behind them, as a [`LifetimeReport`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{LifetimeProbe, Stage, X};
use crate::ms;
use crate::probe::report::{ProbeReport, TestReport};

/// What the lifetime probe concluded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifetimeReport {
    /// `local ≠ mapped` for X; `None` without an answer.
    pub nat_detected: Option<bool>,
    /// The lower bound, in seconds, when the search converged (or the binding outlived the
    /// maximum); `None` when not applicable or unknown.
    pub binding_lifetime_s: Option<f64>,
    /// Longest idle time the binding was seen to survive.
    pub lower_s: Option<f64>,
    /// Shortest idle time after which it was seen expired; `None` if it never expired.
    pub upper_s: Option<f64>,
    /// RFC 4787 REQ-6: inbound traffic alone keeps the binding alive; `None` when not known.
    pub inbound_refresh: Option<bool>,
    /// The `binding lifetime` and `inbound refresh` rows.
    pub tests: Vec<TestReport>,
    pub problems: Vec<String>,
    /// Checks (RESPONSE-PORT requests, each possibly retransmitted) of the search.
    pub checks: u32,
    pub requests_sent: u32,
    pub duration_ms: f64,
}

impl LifetimeReport {
    /// The result of a measurement that did not run, both rows `unknown` for `why`.
    pub fn not_run(why: &str) -> Self {
        let row = |name: &str| TestReport {
            name: name.into(),
            verdict: "unknown".into(),
            evidence: why.into(),
            requests_sent: 0,
            duration_ms: 0.0,
            answers: None,
            miss_chance: None,
        };
        Self {
            nat_detected: None,
            binding_lifetime_s: None,
            lower_s: None,
            upper_s: None,
            inbound_refresh: None,
            tests: vec![row("binding lifetime"), row("inbound refresh")],
            problems: Vec::new(),
            checks: 0,
            requests_sent: 0,
            duration_ms: 0.0,
        }
    }

    /// Adds the result to the probe's report: `binding_lifetime_s`, the two rows, the requests
    /// and any server problem it found (as the TCP test's `apply_to` does).
    pub fn apply_to(self, report: &mut ProbeReport) {
        report.binding_lifetime_s = self.binding_lifetime_s;
        report.requests_sent += self.requests_sent;
        report.tests.extend(self.tests);
        for p in self.problems {
            let p = format!("binding lifetime: {p}");
            if !report.server.problems.contains(&p) {
                report.server.problems.push(p);
            }
        }
    }
}

impl LifetimeProbe {
    /// The result (complete once `is_done`).
    pub fn report(&self) -> LifetimeReport {
        let end = self.finished.unwrap_or(self.started);
        let s = |d: Duration| (d.as_secs_f64() * 1e3).round() / 1e3;
        let nat = match (self.first_mapped, self.local_of(X)) {
            (Some(m), Some(l)) => Some(m != l),
            _ => None,
        };
        let row = |name: &str, stage: Stage, verdict: String, evidence: String| {
            let txs = self.txs.iter().filter(|t| t.stage == stage);
            TestReport::over(name, verdict, evidence, txs.map(|t| &t.sched))
        };
        let lower = (self.alive_seen > 0).then(|| s(self.lo));
        let upper = self.hi.map(s);
        let show = |a: Option<SocketAddr>| a.map_or("-".into(), |a| a.to_string());
        let (lifetime, verdict, evidence) = match nat {
            None => (
                None,
                "unknown".to_string(),
                self.search_failed
                    .clone()
                    .unwrap_or_else(|| "no answer".into()),
            ),
            Some(false) => (
                None,
                "not applicable".into(),
                format!(
                    "no nat: no binding to expire (local {} mapped {})",
                    show(self.local_of(X)),
                    show(self.first_mapped)
                ),
            ),
            Some(true) => {
                let alive = lower.map_or("never seen alive after the first wait".into(), |l| {
                    format!("alive after {l:.1} s idle")
                });
                let expired = upper.map_or("never seen expired".into(), |u| {
                    format!("expired by {u:.1} s idle")
                });
                let mut seen = format!(
                    "{alive}, {expired} ({} checks on up to {} sockets at once, outbound refresh before each)",
                    self.checks, self.peak_clocks
                );
                seen.push_str(&self.pooling_note());
                match (&self.search_failed, self.hi) {
                    (Some(why), _) => (None, "unknown".into(), format!("{why}; {seen}")),
                    (None, None) if self.lo >= self.cfg.max => (
                        Some(s(self.lo)),
                        format!("≥ {:.0} s", self.lo.as_secs_f64().floor()),
                        format!(
                            "alive after {:.1} s idle, the --lifetime-max bound ({} checks){}",
                            self.lo.as_secs_f64(),
                            self.checks,
                            self.pooling_note()
                        ),
                    ),
                    (None, Some(hi)) if self.alive_seen == 0 => (
                        None,
                        format!("< {:.1} s", hi.as_secs_f64()),
                        format!("{seen}; shorter than the first wait"),
                    ),
                    (None, Some(hi)) if self.is_done() => (
                        Some(s(self.lo)),
                        format!("{:.1}–{:.1} s", self.lo.as_secs_f64(), hi.as_secs_f64()),
                        format!("{seen}; the lower bound is reported"),
                    ),
                    _ => (None, "unknown".into(), format!("not finished; {seen}")),
                }
            }
        };
        let lifetime_row = row("binding lifetime", Stage::Search, verdict, evidence);
        let inbound_evidence = match nat {
            Some(false) => "no nat: no binding to refresh".to_string(),
            None => "no answer".into(),
            Some(true) if self.inbound_note.is_empty() => "not tested".into(),
            Some(true) if self.arbitrary() && self.inbound.is_some() => format!(
                "{} (each from a socket mapped to the tested socket's address)",
                self.inbound_note
            ),
            Some(true) => self.inbound_note.clone(),
        };
        let inbound_row = row(
            "inbound refresh",
            Stage::Inbound,
            match (nat, self.inbound) {
                (Some(false), _) => "not applicable".into(),
                (_, Some(true)) => "yes".into(),
                (_, Some(false)) => "no".into(),
                _ => "unknown".into(),
            },
            inbound_evidence,
        );
        LifetimeReport {
            nat_detected: nat,
            binding_lifetime_s: lifetime,
            lower_s: lower,
            upper_s: upper,
            inbound_refresh: self.inbound,
            tests: vec![lifetime_row, inbound_row],
            problems: self.problems.clone(),
            checks: self.checks,
            requests_sent: self.requests_sent(),
            duration_ms: ms(end.saturating_duration_since(self.started)),
        }
    }
}
