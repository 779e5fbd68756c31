//! Binding lifetime discovery (RFC 5780 §4.6) and the inbound-refresh question (RFC 4787 REQ-6),
//! as a sans-IO state machine with the same driver interface as [`super::Probe`].
//!
//! One measurement: a Binding from a socket X to A1:P1 refreshes X's binding (outbound always
//! refreshes, REQ-6) and reports its external port Pp; X then stays silent; after an idle time T a
//! fresh socket Y sends a Binding to A1:P1 with RESPONSE-PORT = Pp, so the server answers to the
//! NAT's external IP, port Pp. The answer arriving on X proves the binding outlived T; no answer
//! (concluded with the same Beta-posterior rule as the main probe, so loss cannot fake an expiry)
//! or an answer on Y (the NAT handed the freed port to Y) means it expired.
//!
//! The machine is split by job:
//! - `search`: the parallel search over up to [`POOL`] X sockets (*clocks*): the first grid,
//!   the targets inside the bracket `(lo, hi]`, when each clock is refreshed and checked.
//! - `check`: the checks and their verdicts: alive, expired, the silence rule and pooled silence
//!   under loss.
//! - `pooling`: under arbitrary address pooling (RFC 4787 REQ-2), the scouts that find a Y mapped
//!   to X's external address.
//! - `inbound`: the inbound-refresh test (RFC 4787 REQ-6) once the lifetime is known.
//! - `transaction`: the STUN transactions underneath, their retransmissions and hard bounds.
//! - `report`: the result rows.
//!
//! This file holds the configuration, the public constants and the driver-facing interface
//! (`poll_transmit` / `poll_timeout` / `handle_timeout` / `handle_datagram`), where each answer
//! is matched to its transaction and handed to the stage that sent it.
//!
//! Pacing (RFC 5780 §5): a request's first transmission waits for a slot of the [`Pacer`]. Idle
//! times are measured from X's real last transmission to a check's real answer (or its last real
//! transmission), so a wait for a slot lengthens a measurement but never skews its bounds.

mod check;
mod inbound;
mod pooling;
mod report;
mod search;
mod transaction;

#[cfg(test)]
mod tests;

pub use check::MAX_UNSURE;
pub use inbound::keepalive_interval;
pub use pooling::MAX_SCOUTS;
pub use report::LifetimeReport;
pub use search::resolution;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;

use check::Outcome;
use search::{Clock, ClockState};
use transaction::{Kind, Tx, TxState};

use super::evidence::{transaction_rng, LossEvidence, RttEstimator, Timing};
use super::machine::ProbeMachine;
use super::pacing::{PaceChoice, Pacer, Pacing};
use super::socket::{LocalSockets, SocketId, Transmit};
use crate::client::BindingResponse;
use crate::stun::Message;

/// The first socket whose binding is measured (and the one the inbound-refresh test uses).
pub const X: SocketId = SocketId(0);

/// Clocks started before the first answer (the rest wait for it: no NAT, no server, no point).
pub const CALIBRATION: usize = 4;

/// Hard bound on X sockets (clocks) of the search; they are ids `0..POOL`, checks use ids above.
pub const POOL: usize = 16;

/// Hard bound on checks of the search.
pub const MAX_CHECKS: u32 = 160;

/// Hard bound on transactions (refreshes, checks, keepalives) of the whole measurement; each is
/// sent at most [`Timing::max_transmits`] times.
pub const MAX_TRANSACTIONS: usize = 480;

/// Hard bound on requests (transmissions, retransmissions included) of the whole measurement.
pub const MAX_REQUESTS: u32 = 1000;

/// What to measure and how.
#[derive(Clone, Debug, PartialEq)]
pub struct LifetimeConfig {
    /// The server's primary address A1:P1 (must honor RESPONSE-PORT, RFC 5780 §7.5).
    pub server: SocketAddr,
    /// Longest idle time tried (`--lifetime-max`); a binding outliving it is reported as ≥ max.
    pub max: Duration,
    /// The first idle time tried: the smallest point of the first grid.
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

    /// The longest the search may take: the first grid's longest wait, then refinement rounds.
    /// Enforced by the machine (it stops the search there with the interval it has).
    pub fn search_limit(&self) -> Duration {
        self.max * 4 + Duration::from_secs(60)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Search,
    Inbound,
    Done,
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
    clocks: Vec<Clock>,
    first_mapped: Option<SocketAddr>,
    /// The first grid (ascending) and its ratio.
    grid: Vec<Duration>,
    ratio: f64,
    /// When the search re-plans even without news (clocks age into the interval).
    replan_at: Option<Instant>,
    /// The search's hard time bound.
    search_deadline: Instant,
    /// Inbound stage: when the next keepalive check starts.
    wake: Option<Instant>,
    lo: Duration,
    hi: Option<Duration>,
    checks: u32,
    stale: u32,
    unsure: u32,
    alive_seen: u32,
    expired_seen: u32,
    /// Most X sockets with a refreshed, not yet concluded binding at once.
    peak_clocks: usize,
    /// Checks of the search too lossy to conclude alone: (idle their last answer was due by,
    /// transmissions).
    silent: Vec<(Duration, u32)>,
    /// External addresses seen on our mappings, in order: more than one means the NAT pools
    /// its addresses arbitrarily (RFC 4787 REQ-2 not met), and checks are then scouted.
    ips: Vec<IpAddr>,
    /// Scouts the search sent, those discarded (mapped to another address than their X's), and
    /// those sent from a spare Y.
    scouts: u32,
    discarded: u32,
    /// Checks in a row that spent their scouts without finding a Y on X's address.
    void: u32,
    /// Ys with a live mapping on a known address: (socket, address, last transmission).
    spares: Vec<(SocketId, IpAddr, Instant)>,
    reused: u32,
    /// A hard bound on transactions or requests was reached.
    budget_spent: bool,
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
        let pacer = cfg.pacing.pacer();
        let (grid, ratio) = cfg.grid();
        let clocks = (0..grid.len())
            .map(|i| Clock {
                socket: SocketId(i as u16),
                state: ClockState::Idle,
                last_sent: None,
                mapped: None,
                due: None,
                testing: None,
                refresh_failures: 0,
                scouts: 0,
                quiet_until: None,
            })
            .collect::<Vec<_>>();
        let mut p = Self {
            started: now,
            finished: None,
            stage: Stage::Search,
            txs: Vec::new(),
            queue: VecDeque::new(),
            local: LocalSockets::default(),
            next_socket: POOL as u16,
            rtt: RttEstimator::default(),
            evidence: LossEvidence::default(),
            clocks,
            first_mapped: None,
            grid,
            ratio,
            replan_at: None,
            search_deadline: now + cfg.search_limit(),
            wake: None,
            lo: Duration::ZERO,
            hi: None,
            checks: 0,
            stale: 0,
            unsure: 0,
            alive_seen: 0,
            expired_seen: 0,
            peak_clocks: 0,
            silent: Vec::new(),
            ips: Vec::new(),
            scouts: 0,
            discarded: 0,
            void: 0,
            spares: Vec::new(),
            reused: 0,
            budget_spent: false,
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
        // A few clocks first: their answers give the loss estimate its first samples and show
        // whether there is a NAT at all; the others start with the first answer.
        for c in 0..p.clocks.len().min(CALIBRATION) {
            p.refresh(c);
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

    /// Most X sockets whose bindings were measured at once (never above [`POOL`]).
    pub fn peak_clocks(&self) -> usize {
        self.peak_clocks
    }

    /// The driver reports the local address of a socket it bound for `id`.
    pub fn socket_bound(&mut self, id: SocketId, local: SocketAddr) {
        self.local.bound(id, local);
    }

    fn local_of(&self, id: SocketId) -> Option<SocketAddr> {
        self.local.get(id)
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.stage != Stage::Done && self.requests_sent() >= MAX_REQUESTS {
            self.out_of_budget(now);
            return None;
        }
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
                source: tx.socket,
                destination: self.cfg.server,
                payload: tx.payload.clone(),
            };
            if tx.kind == Kind::Refresh {
                // Any packet from X restarts the binding's timer: so does the idle period.
                let c = tx.clock;
                self.clocks[c].last_sent = Some(now);
                if self.stage == Stage::Inbound && c == 0 && self.wake.is_some() {
                    self.base = Some(now);
                    self.wake = Some(now + self.interval);
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
        let search = (self.stage == Stage::Search).then(|| {
            self.clocks
                .iter()
                .filter_map(|c| c.due)
                .chain(self.replan_at)
                .chain([self.search_deadline])
                .min()
        });
        self.txs
            .iter()
            .filter(|t| t.state == TxState::Pending)
            .filter_map(|t| t.sched.next_at)
            .chain(self.wake)
            .chain(slot)
            .chain(search.flatten())
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
                self.txs[i].state = TxState::GaveUp;
                self.txs[i].sched.done_at = Some(now);
                self.gave_up(now, i, miss);
                if self.stage == Stage::Done {
                    return;
                }
            } else {
                self.queue.push_back(i);
            }
        }
        match self.stage {
            Stage::Search => {
                if now >= self.search_deadline {
                    self.search_done(now);
                } else if self.replan_at.is_some_and(|r| r <= now) {
                    self.plan(now);
                } else {
                    self.start_due(now);
                }
            }
            Stage::Inbound if self.wake.is_some_and(|w| w <= now) => {
                self.wake = None;
                if !self.out_of_budget(now) {
                    self.check(now, 0);
                }
            }
            _ => {}
        }
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
        let (kind, stage, c) = (self.txs[i].kind, self.txs[i].stage, self.txs[i].clock);
        let tx_socket = self.txs[i].socket;
        let x = self.clocks[c].socket;
        let xm = self.clocks[c].mapped;
        // Only X itself and the requesting socket count: an answer aimed at Pp that lands on
        // another socket means Pp changed hands, which the check's silence will conclude;
        // unless the answer (it carries Y's mapped address) shows that Y left from another
        // address than X's: then it was aimed at Pp on that address and says nothing of X.
        if socket != x && socket != tx_socket {
            let ym = resp.reflexive();
            if kind == Kind::Check && from == server {
                if let (Some(ym), Some(xm)) = (ym, xm) {
                    if ym.ip() != xm.ip() {
                        self.saw_ip(now, ym.ip());
                        if self.txs[i].state == TxState::Pending && stage == self.stage {
                            self.finish_tx(now, i, true);
                            self.clocks[c].quiet_until = self.quiet_after(&self.txs[i].sched);
                            self.check_done(now, stage, c, Outcome::Void);
                        }
                    }
                }
            }
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
        match (kind, socket == x) {
            (Kind::Refresh, true) => {
                let Some(mapped) = resp.reflexive() else {
                    self.problem("answer without a mapped address".into());
                    return;
                };
                self.finish_tx(now, i, true);
                self.saw_ip(now, mapped.ip());
                if self.stage == Stage::Done {
                    return;
                }
                self.refreshed(now, c, mapped);
            }
            (Kind::Refresh, false) => {}
            (Kind::Scout, _) if socket == tx_socket => {
                let Some(ym) = resp.reflexive() else {
                    self.problem("answer without a mapped address".into());
                    return;
                };
                self.finish_tx(now, i, true);
                self.saw_ip(now, ym.ip());
                if stage != self.stage || self.clocks[c].state != ClockState::Checking {
                    return;
                }
                match xm {
                    // The NAT gave X's external address to Y's new mapping: X's binding is gone.
                    Some(xm) if ym == xm => {
                        let idle = self.idle_at(c, now);
                        self.check_done(now, stage, c, Outcome::Expired(idle));
                    }
                    Some(xm) if ym.ip() == xm.ip() => {
                        if !self.out_of_budget(now) {
                            self.send_check(c, tx_socket, true);
                        }
                    }
                    _ => {
                        // Mapped elsewhere: no use to this X, perhaps to another on its address.
                        if stage == Stage::Search {
                            self.discarded += 1;
                        }
                        self.keep_spare(i, ym.ip());
                        self.scout_missed(now, stage, c);
                    }
                }
            }
            (Kind::Scout, _) => {}
            (Kind::Check, true) => {
                // After a retransmission, an earlier answer may have passed the NAT and been lost
                // behind it; on a NAT that inbound traffic refreshes, that restarted the timer.
                // The binding was then alive when that answer passed, which was after the first
                // transmission: only that much idle time is proven.
                let sched = self.txs[i].sched;
                let proven = match (sched.transmits, sched.first_sent) {
                    (k, Some(first)) if k > 1 => first,
                    _ => now,
                };
                self.finish_tx(now, i, true);
                if let (true, Some(m)) = (self.txs[i].verified, xm) {
                    self.keep_spare(i, m.ip());
                }
                let idle = self.idle_at(c, proven);
                self.clocks[c].quiet_until = self.quiet_after(&sched);
                self.check_done(now, stage, c, Outcome::Alive(idle));
            }
            (Kind::Check, false) => {
                // The answer came back to Y. Aimed at Pp on Y's address, it reaches Y only if
                // Y's mapping is that port: on X's address, the NAT gave X's freed port to Y
                // (expired); on another (arbitrary pooling), Y merely holds the same port there
                // and nothing is known of X. Otherwise the server ignored RESPONSE-PORT.
                let pp = self.clocks[c].mapped;
                let ym = resp.reflexive();
                if let Some(ym) = ym {
                    self.saw_ip(now, ym.ip());
                }
                if self.stage == Stage::Done {
                    return;
                }
                let same_port = ym.is_some() && ym.map(|m| m.port()) == pp.map(|p| p.port());
                if ym.is_some() && ym == pp {
                    self.finish_tx(now, i, false);
                    let idle = self.idle_at(c, now);
                    self.check_done(now, stage, c, Outcome::Expired(idle));
                } else if same_port {
                    self.finish_tx(now, i, true);
                    self.check_done(now, stage, c, Outcome::Void);
                } else {
                    self.finish_tx(now, i, false);
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
        self.abandon_pending(now);
        self.finished.get_or_insert(now);
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

    /// A pessimistic estimate of the time still needed (for a progress bar): the longest path
    /// the search can take without loss (every grid point alive up to `max`, then two full
    /// refinement rounds), then the inbound test; never more than what the hard bounds allow.
    pub fn remaining(&self, now: Instant) -> Duration {
        if self.stage == Stage::Done {
            return Duration::ZERO;
        }
        let max = self.cfg.max;
        let inbound = |lo: Duration, hi: Duration| hi + resolution(hi) + lo / 2;
        if self.stage == Stage::Inbound {
            let hi = self.hi.unwrap_or(max);
            let since = self
                .base
                .map_or(Duration::ZERO, |b| now.saturating_duration_since(b));
            return (hi + resolution(hi)).saturating_sub(since) + self.interval;
        }
        let hard = self.search_deadline.saturating_duration_since(now);
        let planned = self
            .clocks
            .iter()
            .filter_map(|c| c.due)
            .max()
            .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
        let (search, lo, hi) = match self.hi {
            // The grid may run to `max`; its bracket is then refined in up to two rounds.
            None => {
                let grid = max.saturating_sub(self.elapsed(now)).max(planned);
                (grid + max * 2, max / 2, max)
            }
            Some(hi) => (planned + hi * 2, self.lo, hi),
        };
        let mut total = search.min(hard);
        if self.cfg.inbound_refresh {
            total += inbound(lo, hi);
        }
        total
    }

    /// The longest the whole measurement can take with this configuration (a driver's deadline):
    /// the search's hard time bound, then the inbound test (one refresh, idle up to the upper
    /// bound, one keepalive interval, each request within its retry budget).
    pub fn time_bound(cfg: &LifetimeConfig) -> Duration {
        let retry = cfg.timing.max_rto * cfg.timing.max_transmits;
        cfg.search_limit() + (cfg.max + retry) * 2 + retry * 4 + Duration::from_secs(60)
    }
}

impl ProbeMachine for LifetimeProbe {
    fn socket_bound(&mut self, id: SocketId, local: SocketAddr) {
        LifetimeProbe::socket_bound(self, id, local);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        LifetimeProbe::poll_transmit(self, now)
    }
    fn handle_datagram(&mut self, now: Instant, socket: SocketId, from: SocketAddr, bytes: &[u8]) {
        LifetimeProbe::handle_datagram(self, now, socket, from, bytes);
    }
    fn handle_timeout(&mut self, now: Instant) {
        LifetimeProbe::handle_timeout(self, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        LifetimeProbe::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        LifetimeProbe::is_done(self)
    }
}
