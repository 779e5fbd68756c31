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
//! Parallel search (RFC 5780 §4.6 allows several X sockets and values of T at once). Every X is a
//! *clock*: once refreshed it can test any idle time it has not yet passed, and which one is
//! chosen only when its check is sent. At most [`POOL`] clocks exist (socket ids `0..POOL`; checks
//! use ids above); a clock whose check has ended is refreshed and runs again. Monotonicity (alive
//! at T ⇒ alive below T, expired at T ⇒ expired above) keeps one interval `(lo, hi]`, and whenever
//! it changes (and every resolution step) the free clocks are re-planned:
//! - `hi` unknown: the targets are a geometric grid from [`LifetimeConfig::first_wait`] to
//!   [`LifetimeConfig::max`] (at most [`POOL`] points, ratio ≥ 1.25: 1.46 for 1–300 s), one per
//!   clock, all clocks starting together ([`CALIBRATION`] of them first, the rest with the first
//!   answer). The first expiry brackets the lifetime with the alive point below it, at about the
//!   lifetime times that ratio.
//! - `hi` known: the clocks refreshed after their own grid checks are then at ages spread over the
//!   bracket (densest towards `hi`); each free clock already well inside `(lo, hi)` is checked at
//!   once. The rest of the interval is cut by evenly spaced targets (as many as the resolution
//!   needs, at most [`POOL`]), each given to the oldest free clock that has not passed it, so the
//!   slowest of them finishes as early as possible. Clocks past `hi` can no longer help and are
//!   refreshed; points already being tested are not planned twice.
//!
//! Without loss the bracket is known by the first grid point above the lifetime, and refined by
//! the clocks already running, or by one more round of at most `hi`: the search takes under twice
//! that grid point (1.0–1.5 × the lifetime in the simulator, against 5.8 × for the old sequential
//! doubling and binary search). The search ends when `hi − lo ≤ max(1 s, 5 % of lo)` (as before),
//! when a binding outlives the maximum, or at a hard bound ([`MAX_CHECKS`], [`MAX_TRANSACTIONS`],
//! [`MAX_REQUESTS`], [`LifetimeConfig::search_limit`], too many verdicts that narrow nothing).
//!
//! Loss: a check too lossy to conclude alone is no verdict and its point is planned again, but its
//! silence is kept: were the binding alive at `B`, every silent check due by `B` would have been
//! answered, so their transmissions together may make an expiry by `B` as unlikely an artefact of
//! loss as the single-check rule demands (with the target divided by the number of `B` tried).
//! [`MAX_UNSURE`] inconclusive checks in a row end the search as unknown.
//!
//! Bounds are measured, not nominal, counted from that X's real last transmission: "alive" gives
//! the idle time at the answer's arrival (a lower bound), "expired" the idle time by which the
//! last check's answer was due (an upper bound). A check answered only after a retransmission
//! proves less: an earlier answer may have crossed the NAT and been lost behind it, and on a NAT
//! that inbound traffic refreshes that restarted the timer, so its lower bound is the idle time at
//! its first transmission. For the same reason a clock is not refreshed until late answers to its
//! retransmitted check can no longer arrive.
//!
//! Inbound refresh (REQ-6 MAY): with the lifetime known, one X is refreshed once and then kept
//! idle while answers are aimed into it via RESPONSE-PORT at [`keepalive_interval`] (at most ¾ of
//! the lower bound, the last one due right after the upper bound plus the resolution). An answer
//! still arriving later than the upper bound (plus the resolution) after the last outbound packet
//! means inbound traffic refreshes the binding; an expiry despite the answers means it does not.
//!
//! Address pooling (RFC 4787 REQ-2): the server sends a check's answer to Y's external IP, port
//! Pp, which is X's binding only if Y's mapping uses X's external address: always with one
//! address or "paired" pooling, by chance with "arbitrary" pooling over several addresses, where
//! a silent check would fake an expiry. Every refresh answer tells X's mapped address; while all
//! are on one address (16 clocks on 2 addresses all land on one with probability 3·10⁻⁵) nothing
//! changes, not one extra request. Once a second address is seen (on a refresh, a scout, or a
//! check's answer, which carries Y's mapped address), each check first *scouts*: a plain Binding
//! from Y tells the address Y's mapping has right then; only a Y on X's address then sends the
//! RESPONSE-PORT request (from the same socket: the same mapping, an RTT later). A Y mapped
//! elsewhere is kept as a spare and another Y tried, at most [`MAX_SCOUTS`] per check; then the
//! check ends without a verdict and is planned again ([`MAX_VOID`] such in a row end the search as
//! unknown, saying why). The scout's Y is the spare last seen on X's address if there is one (a
//! discarded scout or an earlier check's Y), else a fresh socket: with spares a check costs one
//! extra request, not one per address. A spare is scouted again, never trusted: its mapping may
//! have expired and come back on another address (mappings need not share X's timeout: conntrack
//! gives a flow that saw replies for 2 s a longer one). Expiries counted before the
//! second address was seen no longer stand (the upper bound is dropped, unscouted checks still out
//! end without a verdict; seen only in the inbound stage, the lifetime is reported unknown). An
//! answer reaching Y at port Pp of another address than X's says nothing of X (on X's address it
//! still means the NAT gave X's freed port to Y: expired), nor does one reaching a third socket
//! from a Y on another address. A scout only delays a check: idle times count from real packets.
//!
//! Pacing (RFC 5780 §5): a request's first transmission waits for a slot of the [`Pacer`]. Idle
//! times are measured from X's real last transmission to a check's real answer (or its last real
//! transmission), so a wait for a slot lengthens a measurement but never skews its bounds.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;

use super::evidence::{binding_request, transaction_rng, LossEvidence, RttEstimator, Schedule};
use super::machine::LocalSockets;
use super::pacing::{PaceChoice, Pacer, Pacing};
use super::plan::{SocketId, Timing, Transmit};
use super::report::TestReport;
use crate::client::{BindingResponse, RequestOptions};
use crate::stun::{Message, TransactionId};

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
/// Verdicts in a row that did not narrow the interval before the search stops where it is.
const MAX_STALE: u32 = 3 * POOL as u32;
/// Checks in a row too lossy to conclude before the search gives up.
pub const MAX_UNSURE: u32 = 16;
/// Unanswered refreshes in a row before a clock is retired.
const MAX_REFRESH_FAILURES: u32 = 3;
/// Bounds of the ratio of the first geometric grid.
const MIN_RATIO: f64 = 1.25;
const MAX_RATIO: f64 = 2.0;
/// Hard bound on inbound-refresh keepalives.
const MAX_KEEPALIVES: u32 = 64;
/// Under arbitrary pooling: fresh sockets tried per check for one mapped to X's address (with
/// 2 addresses all miss with probability 6·10⁻⁸, with 4 about 0.1 %).
pub const MAX_SCOUTS: u32 = 24;
/// Most Ys kept as spares (sockets whose mapping's external address was last seen).
const MAX_SPARES: usize = 64;
/// Checks in a row that found no such socket before the search gives up.
const MAX_VOID: u32 = 8;

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

    fn first(&self) -> Duration {
        self.first_wait
            .max(Duration::from_millis(100))
            .min(self.max)
    }

    /// The first grid: `first · rⁱ` below `max`, then `max`; at most [`POOL`] points.
    fn grid(&self) -> (Vec<Duration>, f64) {
        let (first, max) = (self.first(), self.max);
        let span = max.as_secs_f64() / first.as_secs_f64();
        let ratio = span
            .powf(1.0 / (POOL - 1) as f64)
            .clamp(MIN_RATIO, MAX_RATIO);
        let mut grid = Vec::new();
        let mut t = first.as_secs_f64();
        while t < max.as_secs_f64() * 0.999 && grid.len() < POOL - 1 {
            grid.push(Duration::from_secs_f64(t));
            t *= ratio;
        }
        grid.push(max);
        (grid, ratio)
    }

    /// The longest the search may take: the first grid's longest wait, then refinement rounds.
    /// Enforced by the machine (it stops the search there with the interval it has).
    pub fn search_limit(&self) -> Duration {
        self.max * 4 + Duration::from_secs(60)
    }
}

/// The search resolution at idle time `d`: max(1 s, 5 % of `d`).
pub fn resolution(d: Duration) -> Duration {
    (d / 20).max(Duration::from_secs(1))
}

/// The inbound test's keepalive interval for a lifetime in `(lo, hi]`: the time the test must
/// reach, `hi + resolution(hi)`, split into the fewest (≥ 2) equal parts of at most ¾ of `lo`,
/// so an inbound-refreshed binding never idles near its lifetime between two keepalives and the
/// last one lands right after `hi + resolution(hi)` (half the lower bound reached it only at
/// 1.5 × `lo`).
pub fn keepalive_interval(lo: Duration, hi: Duration) -> Duration {
    let reach = hi + resolution(hi);
    let most = lo.mul_f64(0.75);
    let mut n = 2u32;
    while reach / n > most && n < MAX_KEEPALIVES {
        n += 1;
    }
    reach / n
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
    /// Under arbitrary pooling, before a check: a plain Binding from a fresh Y, to learn the
    /// external address its mapping got (only a Y on X's address may check X).
    Scout,
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
    /// The clock (X) the transaction refreshes or checks.
    clock: usize,
    tid: TransactionId,
    payload: Vec<u8>,
    sched: Schedule,
    state: TxState,
    /// A check from a Y whose mapping is known to use X's external address (scouted).
    verified: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClockState {
    /// Needs a refresh before it measures anything.
    Idle,
    /// A refresh is pending.
    Refreshing,
    /// Refreshed and silent since `last_sent`: its age is the idle time a check would test.
    Running,
    /// A check aimed at it is pending.
    Checking,
    /// Given up (its refreshes went unanswered).
    Retired,
}

/// One X socket and its binding.
#[derive(Clone, Debug)]
struct Clock {
    socket: SocketId,
    state: ClockState,
    /// When X last sent: the binding's idle time counts from here.
    last_sent: Option<Instant>,
    /// X's external address from its latest refresh (Pp is its port).
    mapped: Option<SocketAddr>,
    /// When its check is planned (re-planned at every change; not a commitment).
    due: Option<Instant>,
    /// The idle time its pending check tests (nominal, for planning only).
    testing: Option<Duration>,
    refresh_failures: u32,
    /// Scouts sent for its pending check.
    scouts: u32,
    /// Not refreshed before this: late answers to a retransmitted check may still arrive, and
    /// on a NAT that inbound traffic refreshes they would restart the next idle period unseen.
    quiet_until: Option<Instant>,
}

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// The answer reached X after this much idle time.
    Alive(Duration),
    /// Expired no later than this idle time.
    Expired(Duration),
    /// Too much loss to tell: the idle time by which its last answer was due, and how many
    /// transmissions went unanswered.
    Unsure { by: Duration, transmits: u32 },
    /// No evidence about X: no fresh socket on X's address was found, or the check turned out to
    /// have left from another address.
    Void,
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

    fn add_tx(&mut self, kind: Kind, socket: SocketId, clock: usize, response_port: Option<u16>) {
        let opts = RequestOptions {
            response_port,
            ..Default::default()
        };
        let (tid, payload) = binding_request(&mut self.rng, opts);
        self.txs.push(Tx {
            kind,
            stage: self.stage,
            socket,
            clock,
            tid,
            payload,
            sched: Schedule::default(),
            state: TxState::Pending,
            verified: false,
        });
        self.queue.push_back(self.txs.len() - 1);
    }

    fn out_of_budget(&mut self, now: Instant) -> bool {
        if self.txs.len() < MAX_TRANSACTIONS && self.requests_sent() < MAX_REQUESTS {
            return false;
        }
        self.budget_spent = true;
        match self.stage {
            Stage::Search => self.search_done(now),
            _ => self.fail(now, "too many requests without a conclusion".into()),
        }
        true
    }

    /// Starts a refresh from clock `c`: its binding's timer restarts with the first transmission.
    fn refresh(&mut self, c: usize) {
        let clock = &mut self.clocks[c];
        clock.state = ClockState::Refreshing;
        clock.quiet_until = None;
        clock.due = None;
        clock.testing = None;
        let socket = clock.socket;
        self.add_tx(Kind::Refresh, socket, c, None);
    }

    /// Starts the check of clock `c` now (its idle time is measured from the real transmissions):
    /// at once from a fresh Y while one external address is seen, else after a scout.
    fn check(&mut self, now: Instant, c: usize) {
        let clock = &mut self.clocks[c];
        clock.state = ClockState::Checking;
        clock.due = None;
        clock.testing = clock.last_sent.map(|l| now.saturating_duration_since(l));
        clock.scouts = 0;
        if self.stage == Stage::Search {
            self.checks += 1;
        }
        if self.arbitrary() {
            self.next_y(c);
        } else {
            let y = self.fresh_socket();
            self.send_check(c, y, false);
        }
    }

    fn fresh_socket(&mut self) -> SocketId {
        let y = SocketId(self.next_socket);
        self.next_socket = self.next_socket.saturating_add(1);
        y
    }

    /// The RESPONSE-PORT request of clock `c`'s check, from `y`; `verified` when `y`'s mapping
    /// is known to use X's external address.
    fn send_check(&mut self, c: usize, y: SocketId, verified: bool) {
        let port = self.clocks[c].mapped.map(|m| m.port());
        self.add_tx(Kind::Check, y, c, port);
        if let Some(tx) = self.txs.last_mut() {
            tx.verified = verified;
        }
    }

    /// Under arbitrary pooling, the scout of clock `c`'s check: from the spare Y last seen on X's
    /// address (its mapping is most likely still there, which the scout checks), else from a
    /// fresh Y.
    fn next_y(&mut self, c: usize) {
        let ip = self.clocks[c].mapped.map(|m| m.ip());
        let spare = self
            .spares
            .iter()
            .enumerate()
            .filter(|(_, &(_, i, _))| Some(i) == ip)
            .max_by_key(|(_, &(_, _, last))| last)
            .map(|(pos, _)| pos);
        let y = match spare {
            Some(pos) => {
                if self.stage == Stage::Search {
                    self.reused += 1;
                }
                self.spares.remove(pos).0
            }
            None => self.fresh_socket(),
        };
        self.scout(c, y);
    }

    /// Keeps transaction `i`'s socket as a spare Y, last seen mapped on address `ip`.
    fn keep_spare(&mut self, i: usize, ip: IpAddr) {
        let tx = &self.txs[i];
        if let Some(last) = tx.sched.last_sent {
            if self.spares.len() >= MAX_SPARES {
                self.spares.remove(0);
            }
            self.spares.push((tx.socket, ip, last));
        }
    }

    /// A plain Binding from Y for clock `c`'s check (arbitrary pooling): its answer tells the
    /// external address Y's mapping has now.
    fn scout(&mut self, c: usize, y: SocketId) {
        self.clocks[c].scouts += 1;
        if self.stage == Stage::Search {
            self.scouts += 1;
        }
        self.add_tx(Kind::Scout, y, c, None);
    }

    /// A scout of clock `c`'s check found nothing usable: another fresh Y, within the bound.
    fn scout_missed(&mut self, now: Instant, stage: Stage, c: usize) {
        if stage != self.stage || self.clocks[c].state != ClockState::Checking {
            return;
        }
        if self.clocks[c].scouts >= MAX_SCOUTS {
            self.check_done(now, stage, c, Outcome::Void);
        } else if !self.out_of_budget(now) {
            self.next_y(c);
        }
    }

    /// Whether the NAT was seen to map our sockets to more than one external address.
    fn arbitrary(&self) -> bool {
        self.ips.len() > 1
    }

    /// One of our mappings uses external address `ip`. A second address means arbitrary
    /// pooling: from then on checks are scouted, and the expiries counted so far, all from
    /// unscouted checks (whose Y may have left from another address), no longer stand.
    fn saw_ip(&mut self, now: Instant, ip: IpAddr) {
        if self.ips.contains(&ip) {
            return;
        }
        self.ips.push(ip);
        if self.ips.len() != 2 {
            return;
        }
        self.silent.clear();
        if self.hi.is_none() {
            return;
        }
        match self.stage {
            Stage::Search => {
                self.hi = None;
                self.expired_seen = 0;
                self.stale = 0;
            }
            Stage::Inbound => {
                self.search_failed = Some(format!(
                    "external addresses pooled arbitrarily ({}), found only after the search: its expiries may have come from sockets mapped to another address",
                    self.ips_text()
                ));
                self.finish(now);
            }
            Stage::Done => {}
        }
    }

    fn ips_text(&self) -> String {
        let ips: Vec<String> = self.ips.iter().map(|ip| ip.to_string()).collect();
        format!("{} seen", ips.join(", "))
    }

    fn rto(&self) -> Duration {
        self.rtt.rto(&self.cfg.timing)
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
                socket: tx.socket,
                to: self.cfg.server,
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
                self.txs[i].state = TxState::GaveUp { miss };
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

    fn gave_up(&mut self, now: Instant, i: usize, miss: f64) {
        let tx = &self.txs[i];
        let c = tx.clock;
        match (tx.kind, tx.stage) {
            (Kind::Refresh, Stage::Search) => {
                self.clocks[c].refresh_failures += 1;
                self.clocks[c].state = ClockState::Idle;
                if self.first_mapped.is_none()
                    || self.clocks[c].refresh_failures >= MAX_REFRESH_FAILURES
                {
                    self.clocks[c].state = ClockState::Retired;
                }
                let starting = self.first_mapped.is_none()
                    && !self
                        .clocks
                        .iter()
                        .any(|c| c.state == ClockState::Refreshing);
                if starting || self.clocks.iter().all(|c| c.state == ClockState::Retired) {
                    let why = if self.first_mapped.is_none() {
                        format!("no answer from {} within the retry budget", self.cfg.server)
                    } else {
                        format!(
                            "{} stopped answering refreshes from the sockets under test",
                            self.cfg.server
                        )
                    };
                    self.fail(now, why);
                } else if self.first_mapped.is_some() {
                    self.plan(now);
                }
            }
            (Kind::Refresh, _) => {
                let why = format!(
                    "{} stopped answering refreshes from the socket under test",
                    self.cfg.server
                );
                self.fail(now, why);
            }
            (Kind::Scout, stage) => self.scout_missed(now, stage, c),
            (Kind::Check, stage) => {
                self.clocks[c].quiet_until = self.quiet_after(&tx.sched);
                if let (true, Some(m)) = (tx.verified, self.clocks[c].mapped) {
                    self.keep_spare(i, m.ip());
                }
                let tx = &self.txs[i];
                let due =
                    tx.sched.last_sent.unwrap_or(now) + self.rtt.srtt().unwrap_or(Duration::ZERO);
                let by = self.idle_at(c, due);
                let outcome = if !tx.verified && self.arbitrary() {
                    // Sent before arbitrary pooling was seen: its Y may have left from another
                    // address, where X's port means nothing. Its silence proves nothing.
                    Outcome::Void
                } else if miss < self.cfg.timing.target_miss {
                    Outcome::Expired(by)
                } else {
                    Outcome::Unsure {
                        by,
                        transmits: tx.sched.transmits,
                    }
                };
                self.check_done(now, stage, c, outcome);
            }
        }
    }

    /// When the last answer to a request sent as `sched` can still arrive: two RTOs after its
    /// last transmission (`None` for a request sent once and answered: nothing is left).
    fn quiet_after(&self, sched: &Schedule) -> Option<Instant> {
        let last = sched.last_sent?;
        (sched.transmits > 1 || sched.done_at.is_none()).then(|| last + self.rto() * 2)
    }

    fn idle_at(&self, c: usize, t: Instant) -> Duration {
        t.saturating_duration_since(self.clocks[c].last_sent.unwrap_or(self.started))
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

    /// Ends every pending transaction: their answers are no longer evidence of anything.
    fn abandon_pending(&mut self, now: Instant) {
        self.queue.clear();
        for tx in &mut self.txs {
            if tx.state == TxState::Pending {
                tx.state = TxState::GaveUp { miss: 1.0 };
                if tx.sched.transmits > 0 {
                    tx.sched.done_at = Some(now);
                }
            }
        }
        for c in &mut self.clocks {
            c.due = None;
            if c.state != ClockState::Retired {
                c.state = ClockState::Idle;
            }
        }
        self.replan_at = None;
    }

    fn finish(&mut self, now: Instant) {
        self.stage = Stage::Done;
        self.wake = None;
        self.abandon_pending(now);
        self.finished.get_or_insert(now);
    }

    /// A refresh of clock `c` was answered: its binding was just refreshed and has external
    /// address `mapped`.
    fn refreshed(&mut self, now: Instant, c: usize, mapped: SocketAddr) {
        if self.first_mapped.is_none() {
            self.first_mapped = Some(mapped);
            if self.local_of(self.clocks[c].socket) == Some(mapped) {
                self.finish(now);
                return;
            }
        }
        let clock = &mut self.clocks[c];
        clock.mapped = Some(mapped);
        clock.refresh_failures = 0;
        clock.state = ClockState::Running;
        let last = clock.last_sent.unwrap_or(now);
        match self.stage {
            Stage::Search => {
                let live = self
                    .clocks
                    .iter()
                    .filter(|c| matches!(c.state, ClockState::Running | ClockState::Checking))
                    .count();
                self.peak_clocks = self.peak_clocks.max(live);
                self.plan(now);
            }
            Stage::Inbound => {
                self.base = Some(last);
                self.wake = Some(last + self.interval);
            }
            Stage::Done => {}
        }
    }

    fn check_done(&mut self, now: Instant, stage: Stage, c: usize, outcome: Outcome) {
        if stage != self.stage {
            return;
        }
        match self.stage {
            Stage::Search => self.search_step(now, c, outcome),
            Stage::Inbound => self.inbound_step(now, outcome),
            Stage::Done => {}
        }
    }

    fn search_step(&mut self, now: Instant, c: usize, outcome: Outcome) {
        let tested = self.clocks[c].testing.take();
        self.clocks[c].state = ClockState::Idle;
        if outcome == Outcome::Void {
            // No evidence: the point is planned again. Only checks that spent their scouts count
            // towards giving up (not the unscouted ones voided together when pooling is seen).
            if self.clocks[c].scouts >= MAX_SCOUTS {
                self.void += 1;
            }
            if self.void >= MAX_VOID {
                let why = format!(
                    "external addresses pooled arbitrarily ({}): {} checks in a row found no socket mapped to their X's address in {MAX_SCOUTS} tries",
                    self.ips_text(),
                    self.void
                );
                self.fail(now, why);
            } else {
                self.plan(now);
            }
            return;
        }
        self.void = 0;
        let narrowed = match outcome {
            Outcome::Alive(idle) => {
                self.alive_seen += 1;
                self.unsure = 0;
                let narrowed = idle > self.lo;
                self.lo = self.lo.max(idle);
                narrowed
            }
            Outcome::Expired(by) => {
                self.expired_seen += 1;
                self.unsure = 0;
                let narrowed = self.hi.is_none_or(|h| by < h);
                self.hi = Some(self.hi.map_or(by, |h| h.min(by)));
                narrowed
            }
            Outcome::Void => false,
            Outcome::Unsure { by, transmits } => {
                self.silent.push((by, transmits));
                if let Some(by) = self.pooled_expiry() {
                    self.expired_seen += 1;
                    self.unsure = 0;
                    let narrowed = self.hi.is_none_or(|h| by < h);
                    self.hi = Some(self.hi.map_or(by, |h| h.min(by)));
                    narrowed
                } else {
                    // No verdict is no evidence either way; the interval's points are planned again,
                    // now with a better loss estimate.
                    self.unsure += 1;
                    if self.unsure >= MAX_UNSURE {
                        let t = tested.unwrap_or(self.lo);
                        self.fail(
                            now,
                            format!(
                                "too much loss to tell whether the binding outlived {:.1} s",
                                t.as_secs_f64()
                            ),
                        );
                        return;
                    }
                    false
                }
            }
        };
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
        }
        if narrowed {
            self.stale = 0;
        } else if !matches!(outcome, Outcome::Unsure { .. }) {
            self.stale += 1;
        }
        self.plan(now);
    }

    /// Silent checks pooled (monotonicity): were the binding alive at `B`, every silent check
    /// whose answer was due by idle `B` would have been answered, so all their transmissions
    /// were lost. The smallest `B` for which that is unlikely enough is an upper bound. Several
    /// `B` are tried, so each must clear the target divided by [`POOL`] (more than the
    /// candidates any one decision sees): the rule never adds more than the target to the
    /// chance of a wrong expiry. Checks due by `lo` are left out: they were alive.
    fn pooled_expiry(&self) -> Option<Duration> {
        let mut silent: Vec<(Duration, u32)> = self
            .silent
            .iter()
            .copied()
            .filter(|&(by, _)| by > self.lo)
            .collect();
        silent.sort();
        let target = self.cfg.timing.target_miss / POOL as f64;
        let mut transmits = 0;
        for (by, k) in silent.into_iter().take(POOL) {
            transmits += k;
            if self.evidence.miss(transmits) < target {
                return Some(by);
            }
        }
        None
    }

    /// Whether the search has its answer (or cannot improve it within its bounds).
    fn search_over(&self) -> bool {
        let converged = self
            .hi
            .is_some_and(|hi| hi.saturating_sub(self.lo) <= resolution(self.lo));
        converged || self.lo >= self.cfg.max || self.checks >= MAX_CHECKS || self.stale >= MAX_STALE
    }

    /// Re-plans every free clock for the interval `(lo, hi]` (see the module comment).
    fn plan(&mut self, now: Instant) {
        if self.stage != Stage::Search {
            return;
        }
        if self.search_over() {
            self.search_done(now);
            return;
        }
        let lo = self.lo;
        let age = |c: &Clock| now.saturating_duration_since(c.last_sent.unwrap_or(now));
        // Idle times already being tested.
        let testing: Vec<Duration> = self.clocks.iter().filter_map(|c| c.testing).collect();
        let mut free: Vec<(usize, Duration)> = self
            .clocks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.state == ClockState::Running)
            .map(|(i, c)| (i, age(c)))
            .collect();
        // Oldest first.
        free.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for &(i, _) in &free {
            self.clocks[i].due = None;
        }
        let mut now_reads: Vec<usize> = Vec::new();
        let (targets, near, top) = match self.hi {
            None => {
                // The first grid: each point once, apart from a point already being tested.
                let near = |p: Duration| p.mul_f64((self.ratio - 1.0) / 2.0);
                let targets: Vec<Duration> = self
                    .grid
                    .iter()
                    .copied()
                    .filter(|&p| p > lo)
                    .filter(|&p| !testing.iter().any(|&q| q.abs_diff(p) <= near(p)))
                    .collect();
                (targets, Duration::ZERO, self.cfg.max)
            }
            Some(hi) => {
                let width = hi.saturating_sub(lo);
                let res = resolution(lo);
                let needed = (width.as_secs_f64() / res.as_secs_f64()).ceil() as usize;
                let n = needed.saturating_sub(1).clamp(1, POOL);
                let step = width / (n as u32 + 1);
                let near = step / 2;
                // A free clock already inside the interval is a point for free: check it now
                // (not one that has only just aged past `lo`: it is worth more at a target).
                let mut taken = testing.clone();
                for &(i, a) in free.iter().rev() {
                    let inside = a > lo + near && a + near < hi;
                    if inside && !taken.iter().any(|&q| q.abs_diff(a) < near) {
                        taken.push(a);
                        now_reads.push(i);
                    }
                }
                let targets: Vec<Duration> = (1..=n as u32)
                    .map(|k| lo + step * k)
                    .filter(|&p| !taken.iter().any(|&q| q.abs_diff(p) < near))
                    .collect();
                (targets, near, hi)
            }
        };
        free.retain(|(i, _)| !now_reads.contains(i));
        // Largest target first, each to the oldest free clock that has not passed it.
        for &p in targets.iter().rev() {
            if let Some(pos) = free.iter().position(|&(_, a)| a <= p + near / 2) {
                let (i, _) = free.remove(pos);
                let c = &mut self.clocks[i];
                c.due = c.last_sent.map(|l| (l + p).max(now));
            }
        }
        // Clocks past the interval can no longer tell anything: they start again.
        for (i, a) in free {
            if a >= top {
                self.refresh(i);
            }
        }
        let mut replan = now + resolution(lo);
        for i in 0..self.clocks.len() {
            if self.clocks[i].state == ClockState::Idle {
                match self.clocks[i].quiet_until {
                    Some(q) if q > now => replan = replan.min(q),
                    _ => self.refresh(i),
                }
            }
        }
        for i in now_reads {
            self.clocks[i].due = Some(now);
        }
        self.replan_at = Some(replan);
        self.start_due(now);
    }

    /// Sends the checks whose time has come.
    fn start_due(&mut self, now: Instant) {
        for i in 0..self.clocks.len() {
            let c = &self.clocks[i];
            if c.state == ClockState::Running && c.due.is_some_and(|d| d <= now) {
                if self.out_of_budget(now) {
                    return;
                }
                self.check(now, i);
            }
        }
    }

    fn search_done(&mut self, now: Instant) {
        self.abandon_pending(now);
        let Some(hi) = self.hi else {
            self.inbound_note = format!(
                "not tested: the binding outlived --lifetime-max ({} s)",
                self.cfg.max.as_secs()
            );
            self.finish(now);
            return;
        };
        if self.budget_spent {
            self.inbound_note = "not tested: the request budget is spent".into();
            self.finish(now);
            return;
        }
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
        self.interval = keepalive_interval(self.lo, hi);
        self.refresh(0);
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
            Outcome::Unsure { .. } => self.fail(now, "too much loss to conclude".into()),
            Outcome::Void => self.fail(
                now,
                format!(
                    "not tested: external addresses pooled arbitrarily ({}) and a keepalive found no fresh socket mapped to the tested socket's address in {MAX_SCOUTS} tries (or left from another address)",
                    self.ips_text()
                ),
            ),
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

    /// What the search found about address pooling, for the evidence ("" with one address).
    fn pooling_note(&self) -> String {
        if !self.arbitrary() {
            return String::new();
        }
        format!(
            "; external addresses pooled arbitrarily ({}): each check used a socket mapped to its X's address ({} scouts, {} of them reused sockets, {} mapped elsewhere)",
            self.ips_text(),
            self.scouts,
            self.reused,
            self.discarded
        )
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

    /// X socket `i`'s local address and its binding (external port 40000 + i).
    fn x_local(i: u16) -> SocketAddr {
        SocketAddr::new(addr(X_LOCAL).ip(), 40000 + i)
    }
    fn x_mapped(i: u16) -> SocketAddr {
        SocketAddr::new(addr(PP).ip(), 40000 + i)
    }

    /// A probe whose refreshes were answered (X socket `i` has binding `x_mapped(i)`) and whose
    /// first check is out, sent from socket Y; returns the probe, the check, the socket it checks
    /// and the time.
    fn at_first_check() -> (LifetimeProbe, Transmit, SocketId, Instant) {
        let (p, check, now) = at_first_request(x_mapped);
        let port = response_port(&check.payload).expect("RESPONSE-PORT");
        (p, check, SocketId(port - 40000), now)
    }

    /// X socket `i` on one of two external addresses (arbitrary pooling).
    fn x_mapped_two(i: u16) -> SocketAddr {
        let ip = if i % 2 == 0 {
            "203.0.113.1"
        } else {
            "203.0.113.2"
        };
        SocketAddr::new(ip.parse().unwrap(), 40000 + i)
    }

    /// As [`at_first_check`] with X socket `i` mapped to `mapped(i)`: the first request from a
    /// fresh socket (a check, or a scout) and the time.
    fn at_first_request(mapped: fn(u16) -> SocketAddr) -> (LifetimeProbe, Transmit, Instant) {
        let t0 = Instant::now();
        let mut cfg = LifetimeConfig::new(addr(SERVER));
        cfg.seed = Some(1);
        let mut p = LifetimeProbe::new(t0, cfg);
        let ms10 = Duration::from_millis(10);
        let first: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit(t0)).collect();
        assert_eq!(
            first.len(),
            CALIBRATION,
            "a few X sockets until the first answer"
        );
        let answer_all = |p: &mut LifetimeProbe, sent: &[Transmit], now: Instant| {
            for t in sent {
                assert_eq!(t.to, addr(SERVER));
                assert!((t.socket.0 as usize) < POOL);
                p.socket_bound(t.socket, x_local(t.socket.0));
            }
            for t in sent {
                let bytes = answer(&t.payload, mapped(t.socket.0));
                p.handle_datagram(now, t.socket, addr(SERVER), &bytes);
            }
        };
        let mut now = t0 + ms10;
        answer_all(&mut p, &first, now);
        let rest: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit(now)).collect();
        assert_eq!(
            rest.len(),
            POOL - CALIBRATION,
            "the others start with the first answer"
        );
        let started = now;
        now += ms10;
        answer_all(&mut p, &rest, now);
        assert!(p.poll_transmit(now).is_none(), "X stays idle");
        let wake = p.poll_timeout().expect("the first check is scheduled");
        // The youngest clocks take the shortest grid points.
        assert_eq!(
            wake,
            started + Duration::from_secs(1),
            "T after X's last packet"
        );
        p.handle_timeout(wake);
        let check = p.poll_transmit(wake).expect("the check");
        assert!(check.socket.0 as usize >= POOL, "checks use fresh sockets");
        assert!(p.poll_transmit(wake).is_none(), "one grid point is due");
        p.socket_bound(check.socket, addr("10.0.0.2:41000"));
        (p, check, wake)
    }

    fn response_port(payload: &[u8]) -> Option<u16> {
        let msg = Message::parse(payload).unwrap();
        let port = msg
            .attributes()
            .find(|a| a.typ == crate::stun::attr_type::RESPONSE_PORT)
            .map(|a| crate::stun::attr::decode_response_port(a.value).unwrap());
        port
    }

    #[test]
    fn the_check_asks_for_xs_external_port() {
        let (p, check, x, _) = at_first_check();
        assert!((x.0 as usize) < POOL);
        assert_eq!(
            response_port(&check.payload),
            p.clocks[x.0 as usize].mapped.map(|m| m.port())
        );
    }

    #[test]
    fn the_first_grid_spans_first_wait_to_max_within_the_pool() {
        let cfg = LifetimeConfig::new(addr(SERVER));
        let (grid, ratio) = cfg.grid();
        assert!(grid.len() <= POOL);
        assert_eq!(grid[0], Duration::from_secs(1));
        assert_eq!(grid.last(), Some(&Duration::from_secs(300)));
        assert!((MIN_RATIO..=MAX_RATIO).contains(&ratio));
        assert!(grid
            .windows(2)
            .all(|w| w[1] > w[0] && w[1] <= w[0].mul_f64(ratio * 1.001)));
    }

    #[test]
    fn an_answer_on_y_at_xs_old_port_means_expired() {
        let (mut p, check, x, now) = at_first_check();
        // The NAT gave the freed port to Y: the answer aimed at X's port lands on Y.
        let bytes = answer(&check.payload, x_mapped(x.0));
        p.handle_datagram(
            now + Duration::from_millis(10),
            check.socket,
            addr(SERVER),
            &bytes,
        );
        let r = p.report();
        assert_eq!(
            r.upper_s,
            Some(1.01),
            "idle from X's refresh to the answer on Y"
        );
        assert_eq!(r.lower_s, None);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        // The search continues below the first wait: the clocks, all past it, start again.
        let next = p.poll_transmit(now + Duration::from_millis(10)).unwrap();
        assert!((next.socket.0 as usize) < POOL);
        assert_eq!(response_port(&next.payload), None, "a refresh");
    }

    #[test]
    fn a_server_ignoring_response_port_is_a_server_problem() {
        let (mut p, check, _, now) = at_first_check();
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
        let (mut p, check, x, now) = at_first_check();
        let bytes = answer(&check.payload, addr("203.0.113.1:41000"));
        p.handle_datagram(now, x, addr("198.51.100.9:3478"), &bytes);
        assert!(!p.is_done());
        assert_eq!(p.report().lower_s, None);
        assert_eq!(p.problems.len(), 1);
    }

    #[test]
    fn an_answer_on_another_x_is_not_evidence() {
        // The port changed hands: the answer aimed at X's old port reached another X socket.
        let (mut p, check, x, now) = at_first_check();
        let other = SocketId((x.0 + 1) % POOL as u16);
        let bytes = answer(&check.payload, x_mapped(x.0));
        p.handle_datagram(now + Duration::from_millis(10), other, addr(SERVER), &bytes);
        assert!(!p.is_done());
        let r = p.report();
        assert_eq!((r.lower_s, r.upper_s), (None, None));
        assert!(p.problems.is_empty(), "{:?}", p.problems);
    }

    #[test]
    fn with_a_second_address_only_a_socket_on_xs_address_checks_it() {
        let (mut p, scout, mut now) = at_first_request(x_mapped_two);
        assert!(p.arbitrary());
        assert_eq!(response_port(&scout.payload), None, "a scout first");
        let c = p.txs.last().unwrap().clock;
        let xm = x_mapped_two(c as u16);
        let other = if xm.ip() == addr(PP).ip() {
            "203.0.113.2"
        } else {
            "203.0.113.1"
        };
        // Mapped elsewhere: discarded, another fresh socket tried.
        now += Duration::from_millis(10);
        let bytes = answer(
            &scout.payload,
            SocketAddr::new(other.parse().unwrap(), 41000),
        );
        p.handle_datagram(now, scout.socket, addr(SERVER), &bytes);
        let scout2 = p.poll_transmit(now).expect("another scout");
        assert_eq!(response_port(&scout2.payload), None);
        assert!(scout2.socket.0 > scout.socket.0, "a fresh socket");
        // Mapped to X's address: the check goes out from that very socket.
        now += Duration::from_millis(10);
        let bytes = answer(&scout2.payload, SocketAddr::new(xm.ip(), 41001));
        p.handle_datagram(now, scout2.socket, addr(SERVER), &bytes);
        let check = p.poll_transmit(now).expect("the check");
        assert_eq!(check.socket, scout2.socket);
        assert_eq!(response_port(&check.payload), Some(xm.port()));
        now += Duration::from_millis(10);
        let bytes = answer(&check.payload, SocketAddr::new(xm.ip(), 41001));
        p.handle_datagram(now, SocketId(c as u16), addr(SERVER), &bytes);
        let r = p.report();
        assert!(r.lower_s.is_some_and(|l| l > 1.0), "{r:?}");
        assert!(
            r.tests[0]
                .evidence
                .contains("pooled arbitrarily (203.0.113.1, 203.0.113.2 seen)"),
            "{}",
            r.tests[0].evidence
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
    }

    #[test]
    fn no_socket_on_xs_address_ends_unknown_with_the_reason() {
        // Every scout lands on a third address: no check can be made, none may conclude.
        let (mut p, first, mut now) = at_first_request(x_mapped_two);
        let mut out = vec![first];
        for _ in 0..10_000 {
            for t in out.drain(..) {
                let bytes = if (t.socket.0 as usize) < POOL {
                    answer(&t.payload, x_mapped_two(t.socket.0))
                } else {
                    assert_eq!(response_port(&t.payload), None, "never a check");
                    p.socket_bound(t.socket, SocketAddr::new(addr(X_LOCAL).ip(), t.socket.0));
                    answer(
                        &t.payload,
                        SocketAddr::new("203.0.113.3".parse().unwrap(), t.socket.0),
                    )
                };
                p.handle_datagram(now, t.socket, addr(SERVER), &bytes);
            }
            if p.is_done() {
                break;
            }
            out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
            if out.is_empty() {
                now = p.poll_timeout().expect("a deadline").max(now);
                p.handle_timeout(now);
                out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
            }
        }
        assert!(p.is_done());
        let r = p.report();
        assert_eq!((r.lower_s, r.upper_s), (None, None), "{r:?}");
        assert_eq!(r.tests[0].verdict, "unknown");
        assert!(
            r.tests[0].evidence.starts_with(
                "external addresses pooled arbitrarily (203.0.113.1, 203.0.113.2, 203.0.113.3 seen): 8 checks in a row found no socket mapped to their X's address in 24 tries"
            ),
            "{}",
            r.tests[0].evidence
        );
    }

    #[test]
    fn expiries_counted_before_a_second_address_is_seen_are_dropped() {
        // Unanswered checks from sockets that, unknown to the probe, left from another address.
        let (mut p, check, _, mut now) = at_first_check();
        let mut out = vec![check];
        let mut refreshes = Vec::new();
        for _ in 0..10_000 {
            if p.report().upper_s.is_some() {
                break;
            }
            for t in out.drain(..) {
                if (t.socket.0 as usize) < POOL {
                    refreshes.push(t);
                }
            }
            for t in refreshes.drain(..) {
                let bytes = answer(&t.payload, x_mapped(t.socket.0));
                p.handle_datagram(now, t.socket, addr(SERVER), &bytes);
            }
            out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
            if out.is_empty() {
                now = p.poll_timeout().expect("a deadline").max(now);
                p.handle_timeout(now);
                out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
            }
        }
        assert!(p.report().upper_s.is_some(), "an expiry was counted");
        assert!(!p.arbitrary());
        // The next refresh answer shows a second address: that expiry no longer stands.
        let refresh = std::iter::from_fn(|| p.poll_transmit(now))
            .chain(out)
            .find(|t| (t.socket.0 as usize) < POOL)
            .expect("clocks past the upper bound are refreshed");
        let other = SocketAddr::new("203.0.113.2".parse().unwrap(), 40000 + refresh.socket.0);
        let bytes = answer(&refresh.payload, other);
        p.handle_datagram(now, refresh.socket, addr(SERVER), &bytes);
        assert!(p.arbitrary());
        assert!(!p.is_done());
        assert_eq!(p.report().upper_s, None);
    }

    #[test]
    fn an_answer_on_y_at_xs_port_of_another_address_is_no_expiry() {
        // Arbitrary pooling unseen so far: Y left from another address, where it holds Pp.
        let (mut p, check, x, now) = at_first_check();
        let ym = SocketAddr::new("203.0.113.2".parse().unwrap(), x_mapped(x.0).port());
        let bytes = answer(&check.payload, ym);
        p.handle_datagram(
            now + Duration::from_millis(10),
            check.socket,
            addr(SERVER),
            &bytes,
        );
        assert!(!p.is_done());
        let r = p.report();
        assert_eq!((r.lower_s, r.upper_s), (None, None), "no verdict");
        assert!(
            p.problems.is_empty(),
            "not a server problem: {:?}",
            p.problems
        );
        assert!(p.arbitrary(), "the second address was seen");
    }

    #[test]
    fn an_answer_on_a_third_socket_from_another_address_voids_the_check() {
        let (mut p, check, x, now) = at_first_check();
        let other = SocketId((x.0 + 1) % POOL as u16);
        let bytes = answer(&check.payload, addr("203.0.113.2:41000"));
        p.handle_datagram(now + Duration::from_millis(10), other, addr(SERVER), &bytes);
        assert!(!p.is_done());
        assert!(p.arbitrary());
        assert_ne!(p.clocks[x.0 as usize].state, ClockState::Checking);
        let r = p.report();
        assert_eq!((r.lower_s, r.upper_s), (None, None));
        // Its silence will not be counted either: the transaction is over.
        assert!(p
            .txs
            .iter()
            .all(|t| t.kind != Kind::Check || t.state != TxState::Pending));
    }

    #[test]
    fn keepalives_reach_past_the_upper_bound_without_idling_near_the_lifetime() {
        let s = Duration::from_secs;
        for (lo, hi) in [
            (2.0, 3.0),
            (2.0, 6.0),
            (29.4, 30.8),
            (119.4, 123.0),
            (100.0, 120.0),
        ] {
            let (lo, hi) = (Duration::from_secs_f64(lo), Duration::from_secs_f64(hi));
            let i = keepalive_interval(lo, hi);
            assert!(i <= lo.mul_f64(0.75), "{lo:?} {hi:?}: {i:?}");
            let n = (hi + resolution(hi)).as_secs_f64() / i.as_secs_f64();
            assert!((n - n.round()).abs() < 1e-6 && n >= 2.0, "{n}");
        }
        assert_eq!(keepalive_interval(s(120), s(120)), s(63));
    }

    #[test]
    fn resolution_is_one_second_or_five_percent() {
        assert_eq!(resolution(Duration::from_secs(4)), Duration::from_secs(1));
        assert_eq!(resolution(Duration::from_secs(120)), Duration::from_secs(6));
    }
}
