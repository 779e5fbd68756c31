//! Binding lifetime discovery (RFC 5780 §4.6) and the inbound-refresh question (RFC 4787 REQ-6),
//! as a sans-IO state machine with the same driver interface as [`super::Probe`].
//!
//! Sockets: `X` (id 0) holds the binding under test; every check uses a fresh socket `Y` (ids 1..).
//! One round: a Binding from X to A1:P1 refreshes the binding (outbound always refreshes, REQ-6)
//! and reports its external port Pp; X then stays silent for T; at last-X-send + T, Y sends a
//! Binding to A1:P1 with RESPONSE-PORT = Pp, so the server answers to the NAT's external IP, port
//! Pp. The answer arriving on X proves the binding outlived T; no answer (concluded with the same
//! Beta-posterior rule as the main probe, so loss cannot fake an expiry) or an answer on Y (the NAT
//! handed the freed port to Y) means it expired. T grows exponentially from
//! [`LifetimeConfig::first_wait`] until a binding expires or [`LifetimeConfig::max`] is reached,
//! then a binary search narrows the interval to max(1 s, 5 % of the lower bound).
//!
//! Bounds are measured, not nominal: "alive" gives the idle time at the answer's arrival (a lower
//! bound), "expired" the idle time by which the last check's answer was due (an upper bound).
//!
//! Inbound refresh (REQ-6 MAY): with the lifetime known, X is refreshed once and then kept idle
//! while answers are aimed into it via RESPONSE-PORT every half lower bound. An answer still
//! arriving later than the upper bound after the last outbound packet means inbound traffic
//! refreshes the binding; an expiry despite the answers means it does not.
//!
//! Pacing (RFC 5780 §5): a request's first transmission waits for a slot of the [`Pacer`]. Idle
//! times are measured from X's real last transmission to a check's real answer (or its last real
//! transmission), so a wait for a slot lengthens a round but never skews its bounds.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;

use super::evidence::{binding_request, transaction_rng, LossEvidence, RttEstimator, Schedule};
use super::machine::LocalSockets;
use super::pacing::{PaceChoice, Pacer, Pacing};
use super::plan::{SocketId, Timing, Transmit};
use super::report::TestReport;
use crate::client::{BindingResponse, RequestOptions};
use crate::stun::{Message, TransactionId};

/// The socket whose binding is measured.
pub const X: SocketId = SocketId(0);

/// Parallel first refreshes: several answers at once give the loss estimate its first samples.
const CALIBRATION: usize = 4;
/// Hard bound on search rounds (each is one refresh and one check).
const MAX_ROUNDS: u32 = 64;
/// Repetitions of a round whose check was lost too often to conclude.
const MAX_UNSURE_RETRIES: u32 = 2;
/// Hard bound on inbound-refresh keepalives.
const MAX_KEEPALIVES: u32 = 64;

/// What to measure and how.
#[derive(Clone, Debug, PartialEq)]
pub struct LifetimeConfig {
    /// The server's primary address A1:P1 (must honor RESPONSE-PORT, RFC 5780 §7.5).
    pub server: SocketAddr,
    /// Longest idle time tried (`--lifetime-max`); a binding outliving it is reported as ≥ max.
    pub max: Duration,
    /// The first idle time tried; each round doubles it until a binding expires.
    pub first_wait: Duration,
    /// Also test whether inbound traffic refreshes the binding (RFC 4787 REQ-6).
    pub inbound_refresh: bool,
    pub timing: Timing,
    /// Seed for transaction IDs (tests); `None` draws from the OS.
    pub seed: Option<u64>,
    /// RFC 5780 §5 pacing of new transactions; by default [`Pacing::decide`] for `server`.
    pub pacing: Pacing,
}

impl LifetimeConfig {
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            max: Duration::from_secs(300),
            first_wait: Duration::from_secs(1),
            inbound_refresh: true,
            // An "expired" check is concluded from silence without a liveness control, so it
            // keeps the 20 ms RTO floor the main probe had before it got one (a stalled host must
            // not turn a late answer into an expiry). The checks are seconds apart: it costs
            // nothing.
            timing: Timing {
                min_rto: Duration::from_millis(20),
                ..Timing::default()
            },
            seed: None,
            pacing: Pacing::decide(&[server], PaceChoice::Default),
        }
    }
}

/// The search resolution at idle time `d`: max(1 s, 5 % of `d`).
pub fn resolution(d: Duration) -> Duration {
    (d / 20).max(Duration::from_secs(1))
}

/// What the lifetime probe concluded.
#[derive(Clone, Debug, PartialEq)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A Binding from X: refreshes the binding and reports its external port.
    Refresh,
    /// A Binding from a fresh Y with RESPONSE-PORT = X's external port.
    Check,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Search,
    Inbound,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TxState {
    Pending,
    Answered,
    GaveUp { miss: f64 },
}

#[derive(Clone, Debug)]
struct Tx {
    kind: Kind,
    stage: Stage,
    socket: SocketId,
    tid: TransactionId,
    payload: Vec<u8>,
    sched: Schedule,
    state: TxState,
}

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// The answer reached X after this much idle time.
    Alive(Duration),
    /// Expired no later than this idle time.
    Expired(Duration),
    /// Too much loss to tell.
    Unsure,
}

/// The binding-lifetime state machine. Drive it like [`super::Probe`]: `poll_transmit` /
/// `handle_datagram` / `handle_timeout` / `poll_timeout` until `is_done`, then read `report`.
#[derive(Debug)]
pub struct LifetimeProbe {
    cfg: LifetimeConfig,
    started: Instant,
    finished: Option<Instant>,
    stage: Stage,
    txs: Vec<Tx>,
    queue: VecDeque<usize>,
    local: LocalSockets,
    next_socket: u16,
    rtt: RttEstimator,
    evidence: LossEvidence,
    /// When X last sent: the binding's idle time counts from here.
    x_last: Option<Instant>,
    /// X's external address from the latest refresh (Pp is its port).
    x_mapped: Option<SocketAddr>,
    first_mapped: Option<SocketAddr>,
    /// When the next check starts.
    wake: Option<Instant>,
    /// The idle time the current round tests.
    wait: Duration,
    lo: Duration,
    hi: Option<Duration>,
    rounds: u32,
    checks: u32,
    unsure_retries: u32,
    alive_seen: u32,
    expired_seen: u32,
    /// Why the search ended without a result.
    search_failed: Option<String>,
    /// Inbound stage: the refresh it starts from, the keepalive interval, keepalives answered.
    base: Option<Instant>,
    interval: Duration,
    keepalives: u32,
    inbound: Option<bool>,
    inbound_note: String,
    problems: Vec<String>,
    rng: StdRng,
    pacer: Pacer,
}

impl LifetimeProbe {
    pub fn new(now: Instant, cfg: LifetimeConfig) -> Self {
        let rng = transaction_rng(cfg.seed);
        let wait = cfg.first_wait.max(Duration::from_millis(100)).min(cfg.max);
        let pacer = cfg.pacing.pacer();
        let mut p = Self {
            started: now,
            finished: None,
            stage: Stage::Search,
            txs: Vec::new(),
            queue: VecDeque::new(),
            local: LocalSockets::default(),
            next_socket: 1,
            rtt: RttEstimator::default(),
            evidence: LossEvidence::default(),
            x_last: None,
            x_mapped: None,
            first_mapped: None,
            wake: None,
            wait,
            lo: Duration::ZERO,
            hi: None,
            rounds: 0,
            checks: 0,
            unsure_retries: 0,
            alive_seen: 0,
            expired_seen: 0,
            search_failed: None,
            base: None,
            interval: Duration::ZERO,
            keepalives: 0,
            inbound: None,
            inbound_note: String::new(),
            problems: Vec::new(),
            rng,
            pacer,
            cfg,
        };
        for _ in 0..CALIBRATION {
            p.add_tx(Kind::Refresh, X, None);
        }
        p
    }

    /// Continues `pacer` (its limit and the starts it has seen) instead of a fresh one from the
    /// configuration, so the machines of one run share one RFC 5780 §5 budget.
    pub fn with_pacer(mut self, pacer: Pacer) -> Self {
        self.pacer = pacer;
        self
    }

    /// The pacer, with every transaction this measurement started.
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// The driver reports the local address of a socket it bound for `id`.
    pub fn socket_bound(&mut self, id: SocketId, local: SocketAddr) {
        self.local.bound(id, local);
    }

    fn local_of(&self, id: SocketId) -> Option<SocketAddr> {
        self.local.get(id)
    }

    fn add_tx(&mut self, kind: Kind, socket: SocketId, response_port: Option<u16>) {
        let opts = RequestOptions {
            response_port,
            ..Default::default()
        };
        let (tid, payload) = binding_request(&mut self.rng, opts);
        self.txs.push(Tx {
            kind,
            stage: self.stage,
            socket,
            tid,
            payload,
            sched: Schedule::default(),
            state: TxState::Pending,
        });
        self.queue.push_back(self.txs.len() - 1);
    }

    fn rto(&self) -> Duration {
        self.rtt.rto(&self.cfg.timing)
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        // Retransmissions go out at once; a first transmission only when the pacer has a slot.
        let may_start = self.pacer.may_start(now);
        while let Some(pos) = self.queue.iter().position(|&i| {
            let t = &self.txs[i];
            t.state != TxState::Pending || t.sched.transmits > 0 || may_start
        }) {
            let Some(i) = self.queue.remove(pos) else {
                break;
            };
            let rto = self.rto();
            let max_rto = self.cfg.timing.max_rto;
            let tx = &mut self.txs[i];
            if tx.state != TxState::Pending {
                continue;
            }
            if tx.sched.transmits == 0 {
                self.pacer.started(now);
            }
            tx.sched.sent(now, rto, max_rto);
            let out = Transmit {
                socket: tx.socket,
                to: self.cfg.server,
                payload: tx.payload.clone(),
            };
            if out.socket == X {
                // Any packet from X restarts the binding's timer: so does the idle period.
                self.x_last = Some(now);
                if self.wake.is_some() {
                    match self.stage {
                        Stage::Search => self.wake = Some(now + self.wait),
                        Stage::Inbound => {
                            self.base = Some(now);
                            self.wake = Some(now + self.interval);
                        }
                        Stage::Done => {}
                    }
                }
            }
            return Some(out);
        }
        None
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stage == Stage::Done {
            return None;
        }
        let waiting_to_start = self.queue.iter().any(|&i| {
            let t = &self.txs[i];
            t.state == TxState::Pending && t.sched.transmits == 0
        });
        let slot = waiting_to_start.then(|| self.pacer.next_start()).flatten();
        self.txs
            .iter()
            .filter(|t| t.state == TxState::Pending)
            .filter_map(|t| t.sched.next_at)
            .chain(self.wake)
            .chain(slot)
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stage == Stage::Done {
            return;
        }
        for i in 0..self.txs.len() {
            let tx = &self.txs[i];
            let Some(at) = tx.sched.next_at else { continue };
            if tx.state != TxState::Pending || now < at || self.queue.contains(&i) {
                continue;
            }
            let k = tx.sched.transmits;
            let first_refresh = self.evidence.answered() == 0;
            let cap = if first_refresh {
                self.cfg.timing.reach_transmits
            } else {
                self.cfg.timing.max_transmits
            };
            let miss = if first_refresh {
                // Nothing answered yet: no loss estimate; the RFC 8489 budget decides alone.
                if k >= cap {
                    0.0
                } else {
                    1.0
                }
            } else {
                self.evidence.miss(k)
            };
            if k >= cap || miss < self.cfg.timing.target_miss {
                self.txs[i].state = TxState::GaveUp { miss };
                self.txs[i].sched.done_at = Some(now);
                self.gave_up(now, i, miss);
            } else {
                self.queue.push_back(i);
            }
        }
        if self.wake.is_some_and(|w| w <= now) && self.stage != Stage::Done {
            self.wake = None;
            let y = SocketId(self.next_socket);
            self.next_socket = self.next_socket.saturating_add(1);
            let port = self.x_mapped.map(|m| m.port());
            if self.stage == Stage::Search {
                self.checks += 1;
            }
            self.add_tx(Kind::Check, y, port);
        }
    }

    fn gave_up(&mut self, now: Instant, i: usize, miss: f64) {
        let tx = &self.txs[i];
        match tx.kind {
            Kind::Refresh => {
                let progressing = self.wake.is_some()
                    || self
                        .txs
                        .iter()
                        .any(|t| t.kind == Kind::Check && t.state == TxState::Pending);
                if progressing {
                    // Another refresh of this round was answered: this one was only evidence.
                    return;
                }
                let why = if self.first_mapped.is_none() {
                    format!("no answer from {} within the retry budget", self.cfg.server)
                } else {
                    format!(
                        "{} stopped answering refreshes from the socket under test",
                        self.cfg.server
                    )
                };
                self.fail(now, why);
            }
            Kind::Check => {
                let outcome = if miss < self.cfg.timing.target_miss {
                    let due = tx.sched.last_sent.unwrap_or(now)
                        + self.rtt.srtt().unwrap_or(Duration::ZERO);
                    Outcome::Expired(self.idle_at(due))
                } else {
                    Outcome::Unsure
                };
                self.check_done(now, outcome);
            }
        }
    }

    fn idle_at(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.x_last.unwrap_or(self.started))
    }

    pub fn handle_datagram(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) {
        if self.stage == Stage::Done {
            return;
        }
        let Ok(msg) = Message::parse(bytes) else {
            return;
        };
        let tid = msg.transaction_id();
        let Some(i) = self.txs.iter().position(|t| t.tid == tid) else {
            return;
        };
        if self.txs[i].state != TxState::Pending {
            return;
        }
        let Ok(resp) = BindingResponse::parse(bytes, &tid, Some(from)) else {
            return;
        };
        let server = self.cfg.server;
        let kind = self.txs[i].kind;
        let tx_socket = self.txs[i].socket;
        if socket != X && socket != tx_socket {
            return;
        }
        if from != server || resp.response_origin.is_some_and(|o| o != server) {
            self.problem(format!(
                "answer expected from {server} came from {from} (RESPONSE-ORIGIN {})",
                resp.response_origin
                    .map_or("absent".into(), |o| o.to_string())
            ));
            return;
        }
        if let Some(code) = resp.error_code {
            let what = if kind == Kind::Check {
                "a RESPONSE-PORT request"
            } else {
                "a Binding request"
            };
            self.problem(format!("the server answered {what} with error {code}"));
            self.finish_tx(now, i, false);
            self.fail(now, format!("the server refused {what} (error {code})"));
            return;
        }
        match (kind, socket == X) {
            (Kind::Refresh, true) => {
                let Some(mapped) = resp.reflexive() else {
                    self.problem("answer without a mapped address".into());
                    return;
                };
                self.finish_tx(now, i, true);
                self.refreshed(now, mapped);
            }
            (Kind::Refresh, false) => {}
            (Kind::Check, true) => {
                self.finish_tx(now, i, true);
                let idle = self.idle_at(now);
                self.check_done(now, Outcome::Alive(idle));
            }
            (Kind::Check, false) => {
                // The answer came back to Y. Aimed at Pp, it reaches Y only if the NAT gave X's
                // freed port to Y's new mapping; otherwise the server ignored RESPONSE-PORT.
                let pp = self.x_mapped;
                let ym = resp.reflexive();
                self.finish_tx(now, i, false);
                if ym.is_some() && ym == pp {
                    let idle = self.idle_at(now);
                    self.check_done(now, Outcome::Expired(idle));
                } else {
                    self.problem(format!(
                        "the server ignored RESPONSE-PORT: the answer aimed at port {} came back to the requesting socket ({})",
                        pp.map_or("-".into(), |p| p.port().to_string()),
                        ym.map_or("-".into(), |m| m.to_string())
                    ));
                    self.fail(now, "the server does not honor RESPONSE-PORT".into());
                }
            }
        }
    }

    fn finish_tx(&mut self, now: Instant, i: usize, answered: bool) {
        let tx = &mut self.txs[i];
        tx.sched.done_at = Some(now);
        if answered {
            tx.state = TxState::Answered;
            let (k, first) = (tx.sched.transmits, tx.sched.first_sent);
            // Karn: only unambiguous samples (one transmission) feed the RTT estimate.
            if k == 1 {
                if let Some(sent) = first {
                    self.rtt.sample(now.saturating_duration_since(sent));
                }
            }
            self.evidence.answered_after(k);
        } else {
            tx.state = TxState::GaveUp { miss: 1.0 };
        }
    }

    fn problem(&mut self, p: String) {
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    fn fail(&mut self, now: Instant, why: String) {
        match self.stage {
            Stage::Search => self.search_failed = Some(why),
            Stage::Inbound => self.inbound_note = why,
            Stage::Done => {}
        }
        self.finish(now);
    }

    fn finish(&mut self, now: Instant) {
        self.stage = Stage::Done;
        self.wake = None;
        self.queue.clear();
        self.finished.get_or_insert(now);
    }

    /// A refresh was answered: X's binding was just refreshed and has external address `mapped`.
    fn refreshed(&mut self, now: Instant, mapped: SocketAddr) {
        if self.first_mapped.is_none() {
            self.first_mapped = Some(mapped);
            if self.local_of(X) == Some(mapped) {
                self.finish(now);
                return;
            }
        }
        self.x_mapped = Some(mapped);
        let x_last = self.x_last.unwrap_or(now);
        match self.stage {
            Stage::Search => self.wake = Some(x_last + self.wait),
            Stage::Inbound => {
                self.base = Some(x_last);
                self.wake = Some(x_last + self.interval);
            }
            Stage::Done => {}
        }
    }

    fn check_done(&mut self, now: Instant, outcome: Outcome) {
        match self.stage {
            Stage::Search => self.search_step(now, outcome),
            Stage::Inbound => self.inbound_step(now, outcome),
            Stage::Done => {}
        }
    }

    fn search_step(&mut self, now: Instant, outcome: Outcome) {
        let before = (self.lo, self.hi);
        match outcome {
            Outcome::Alive(idle) => {
                self.alive_seen += 1;
                self.lo = self.lo.max(idle);
            }
            Outcome::Expired(by) => {
                self.expired_seen += 1;
                self.hi = Some(self.hi.map_or(by, |h| h.min(by)));
            }
            Outcome::Unsure if self.unsure_retries < MAX_UNSURE_RETRIES => {
                // No verdict is no evidence either way: measure the same idle time again, now
                // with a better loss estimate.
                self.unsure_retries += 1;
                self.add_tx(Kind::Refresh, X, None);
                return;
            }
            Outcome::Unsure => {
                self.fail(
                    now,
                    format!(
                        "too much loss to tell whether the binding outlived {:.1} s",
                        self.wait.as_secs_f64()
                    ),
                );
                return;
            }
        }
        self.rounds += 1;
        self.unsure_retries = 0;
        if let Some(hi) = self.hi {
            if hi < self.lo {
                self.fail(
                    now,
                    format!(
                        "inconsistent: alive after {:.1} s idle but expired by {:.1} s",
                        self.lo.as_secs_f64(),
                        hi.as_secs_f64()
                    ),
                );
                return;
            }
            let converged = hi - self.lo <= resolution(self.lo);
            // A check's retry budget can keep `hi` from shrinking further: stop rather than loop.
            let stuck = (self.lo, self.hi) == before;
            if converged || stuck || self.rounds >= MAX_ROUNDS {
                self.search_done(now);
                return;
            }
            self.wait = (self.lo + hi) / 2;
        } else {
            if self.lo >= self.cfg.max || self.rounds >= MAX_ROUNDS {
                self.search_done(now);
                return;
            }
            self.wait = (self.wait * 2).min(self.cfg.max);
        }
        // Refresh X before each new idle period: outbound traffic restarts the binding's timer.
        self.add_tx(Kind::Refresh, X, None);
    }

    fn search_done(&mut self, now: Instant) {
        let Some(hi) = self.hi else {
            self.inbound_note = format!(
                "not tested: the binding outlived --lifetime-max ({} s)",
                self.cfg.max.as_secs()
            );
            self.finish(now);
            return;
        };
        if !self.cfg.inbound_refresh {
            self.inbound_note = "not tested".into();
            self.finish(now);
            return;
        }
        if self.lo < Duration::from_secs(2) {
            self.inbound_note =
                "not tested: the lifetime is too short to aim answers inside it".into();
            self.finish(now);
            return;
        }
        if hi - self.lo > resolution(self.lo) * 4 {
            self.inbound_note = "not tested: the lifetime is not known precisely enough".into();
            self.finish(now);
            return;
        }
        self.stage = Stage::Inbound;
        self.interval = self.lo / 2;
        self.add_tx(Kind::Refresh, X, None);
    }

    fn inbound_step(&mut self, now: Instant, outcome: Outcome) {
        let hi = self.hi.unwrap_or(self.cfg.max);
        let base = self.base.unwrap_or(self.started);
        let since = now.saturating_duration_since(base);
        let every = self.interval.as_secs_f64();
        match outcome {
            Outcome::Alive(_) => {
                self.keepalives += 1;
                if since >= hi + resolution(hi) {
                    self.inbound = Some(true);
                    self.inbound_note = format!(
                        "an answer still reached the socket {:.1} s after its last outbound packet (expires by {:.1} s without traffic), with {} answer(s) aimed into it every {every:.1} s",
                        since.as_secs_f64(),
                        hi.as_secs_f64(),
                        self.keepalives
                    );
                    self.finish(now);
                } else if self.keepalives >= MAX_KEEPALIVES {
                    self.fail(now, "too many keepalives without a conclusion".into());
                } else {
                    self.wake = Some(now + self.interval);
                }
            }
            Outcome::Expired(by) => {
                if by < self.lo {
                    self.fail(
                        now,
                        format!(
                            "inconsistent: the binding expired by {:.1} s although it had lived {:.1} s",
                            by.as_secs_f64(),
                            self.lo.as_secs_f64()
                        ),
                    );
                    return;
                }
                self.inbound = Some(false);
                self.inbound_note = format!(
                    "the binding expired by {:.1} s after its last outbound packet although {} answer(s) were aimed into it every {every:.1} s",
                    by.as_secs_f64(),
                    self.keepalives
                );
                self.finish(now);
            }
            Outcome::Unsure => self.fail(now, "too much loss to conclude".into()),
        }
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Requests sent so far.
    pub fn requests_sent(&self) -> u32 {
        self.txs.iter().map(|t| t.sched.transmits).sum()
    }

    /// Virtual or real time since the start.
    pub fn elapsed(&self, now: Instant) -> Duration {
        self.finished
            .unwrap_or(now)
            .saturating_duration_since(self.started)
    }

    /// A pessimistic estimate of the time still needed (for a progress bar): assumes every
    /// remaining question takes its longest plausible path.
    pub fn remaining(&self, now: Instant) -> Duration {
        if self.stage == Stage::Done {
            return Duration::ZERO;
        }
        let pending = self
            .wake
            .map_or(self.wait, |w| w.saturating_duration_since(now));
        let max = self.cfg.max;
        if self.stage == Stage::Inbound {
            let hi = self.hi.unwrap_or(max);
            let since = self
                .base
                .map_or(Duration::ZERO, |b| now.saturating_duration_since(b));
            return (hi + resolution(hi)).saturating_sub(since) + self.interval;
        }
        let mut total = pending;
        let (lo, hi) = match self.hi {
            Some(h) => (self.lo, h),
            None => {
                let mut t = self.wait;
                while t < max {
                    t = (t * 2).min(max);
                    total += t;
                }
                (max / 2, max)
            }
        };
        let mut width = hi.saturating_sub(lo);
        let mut mid = (lo + hi) / 2;
        let mut n = 0;
        while width > resolution(lo) && n < MAX_ROUNDS {
            total += mid;
            width /= 2;
            mid = lo + width / 2;
            n += 1;
        }
        if self.cfg.inbound_refresh {
            total += hi + resolution(hi) + lo / 2;
        }
        total
    }

    /// The longest the whole measurement can take with this configuration (a driver's deadline).
    pub fn time_bound(cfg: &LifetimeConfig) -> Duration {
        let max = cfg.max;
        let rounds = max.as_secs().max(1).ilog2() + 2;
        let retry = cfg.timing.max_rto * cfg.timing.max_transmits;
        max * 2 + max * rounds + max * 2 + retry * (rounds * 2 + 8) + Duration::from_secs(60)
    }

    /// The result (complete once `is_done`).
    pub fn report(&self) -> LifetimeReport {
        let end = self.finished.unwrap_or(self.started);
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let s = |d: Duration| (d.as_secs_f64() * 1e3).round() / 1e3;
        let nat = match (self.first_mapped, self.local_of(X)) {
            (Some(m), Some(l)) => Some(m != l),
            _ => None,
        };
        let row = |name: &str, stage: Stage, verdict: String, evidence: String| {
            let txs: Vec<&Tx> = self.txs.iter().filter(|t| t.stage == stage).collect();
            let start = txs.iter().filter_map(|t| t.sched.first_sent).min();
            let stop = txs.iter().filter_map(|t| t.sched.done_at).max();
            TestReport {
                name: name.into(),
                verdict,
                evidence,
                requests_sent: txs.iter().map(|t| t.sched.transmits).sum(),
                duration_ms: match (start, stop) {
                    (Some(a), Some(b)) => ms(b.saturating_duration_since(a)),
                    _ => 0.0,
                },
            }
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
                let seen = format!(
                    "{alive}, {expired} ({} checks, outbound refresh before each)",
                    self.checks
                );
                match (&self.search_failed, self.hi) {
                    (Some(why), _) => (None, "unknown".into(), format!("{why}; {seen}")),
                    (None, None) if self.lo >= self.cfg.max => (
                        Some(s(self.lo)),
                        format!("≥ {:.0} s", self.lo.as_secs_f64().floor()),
                        format!(
                            "alive after {:.1} s idle, the --lifetime-max bound ({} checks)",
                            self.lo.as_secs_f64(),
                            self.checks
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reflector::{Action, Reflector, ReflectorConfig, Transport, MAX_RESPONSE};

    const SERVER: &str = "198.51.100.1:3478";
    const X_LOCAL: &str = "10.0.0.2:40000";
    const PP: &str = "203.0.113.1:40000";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The reflector's answer to `req` sent from external address `from`.
    fn answer(req: &[u8], from: SocketAddr) -> Vec<u8> {
        let core = Reflector::new(ReflectorConfig {
            primary: addr(SERVER),
            alternate: Some(addr("198.51.100.2:3479")),
            partner: None,
        });
        let mut out = [0u8; MAX_RESPONSE];
        let (action, _) = core.answer(Transport::Udp, from, addr(SERVER), req, &mut out, 0);
        let Action::Send { len, .. } = action else {
            panic!("no answer: {action:?}");
        };
        out[..len].to_vec()
    }

    /// A probe whose refreshes were answered (X's binding is PP) and whose first check is out,
    /// sent from socket Y; returns the probe, the check and the time.
    fn at_first_check() -> (LifetimeProbe, Transmit, Instant) {
        let t0 = Instant::now();
        let mut cfg = LifetimeConfig::new(addr(SERVER));
        cfg.seed = Some(1);
        let mut p = LifetimeProbe::new(t0, cfg);
        p.socket_bound(X, addr(X_LOCAL));
        let mut now = t0;
        let sent: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit(t0)).collect();
        assert_eq!(sent.len(), CALIBRATION);
        for t in &sent {
            assert_eq!((t.socket, t.to), (X, addr(SERVER)));
            now += Duration::from_millis(10);
            p.handle_datagram(now, X, addr(SERVER), &answer(&t.payload, addr(PP)));
        }
        assert!(p.poll_transmit(now).is_none(), "X stays idle");
        let wake = p.poll_timeout().expect("the first check is scheduled");
        assert_eq!(wake, t0 + Duration::from_secs(1), "T after X's last packet");
        p.handle_timeout(wake);
        let check = p.poll_transmit(wake).expect("the check");
        assert_ne!(check.socket, X);
        p.socket_bound(check.socket, addr("10.0.0.2:41000"));
        (p, check, wake)
    }

    #[test]
    fn the_check_asks_for_xs_external_port() {
        let (_, check, _) = at_first_check();
        let msg = Message::parse(&check.payload).unwrap();
        let port = msg
            .attributes()
            .find(|a| a.typ == crate::stun::attr_type::RESPONSE_PORT)
            .map(|a| crate::stun::attr::decode_response_port(a.value).unwrap());
        assert_eq!(port, Some(40000));
    }

    #[test]
    fn an_answer_on_y_at_xs_old_port_means_expired() {
        let (mut p, check, now) = at_first_check();
        // The NAT gave the freed port to Y: the answer aimed at PP lands on Y.
        let bytes = answer(&check.payload, addr(PP));
        p.handle_datagram(
            now + Duration::from_millis(10),
            check.socket,
            addr(SERVER),
            &bytes,
        );
        let r = p.report();
        assert_eq!(r.upper_s, Some(1.01));
        assert_eq!(r.lower_s, None);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        // Binary search below the first wait continues with a refresh from X.
        let next = p.poll_transmit(now + Duration::from_millis(10)).unwrap();
        assert_eq!(next.socket, X);
    }

    #[test]
    fn a_server_ignoring_response_port_is_a_server_problem() {
        let (mut p, check, now) = at_first_check();
        // Y's own mapping is another port; the answer still came back to Y.
        let bytes = answer(&check.payload, addr("203.0.113.1:41000"));
        p.handle_datagram(
            now + Duration::from_millis(10),
            check.socket,
            addr(SERVER),
            &bytes,
        );
        assert!(p.is_done());
        let r = p.report();
        assert_eq!(r.binding_lifetime_s, None);
        assert_eq!(r.tests[0].verdict, "unknown");
        assert!(
            r.problems[0].starts_with("the server ignored RESPONSE-PORT"),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn an_answer_on_x_from_elsewhere_is_not_evidence() {
        let (mut p, check, now) = at_first_check();
        let bytes = answer(&check.payload, addr("203.0.113.1:41000"));
        p.handle_datagram(now, X, addr("198.51.100.9:3478"), &bytes);
        assert!(!p.is_done());
        assert_eq!(p.report().lower_s, None);
        assert_eq!(p.problems.len(), 1);
    }

    #[test]
    fn resolution_is_one_second_or_five_percent() {
        assert_eq!(resolution(Duration::from_secs(4)), Duration::from_secs(1));
        assert_eq!(resolution(Duration::from_secs(120)), Duration::from_secs(6));
    }
}
