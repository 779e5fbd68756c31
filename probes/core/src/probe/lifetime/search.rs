//! Parallel search (RFC 5780 §4.6 allows several X sockets and values of T at once). Every X is a
//! *clock*: once refreshed it can test any idle time it has not yet passed, and which one is
//! chosen only when its check is sent. At most [`POOL`] clocks exist (socket ids `0..POOL`; checks
//! use ids above); a clock whose check has ended is refreshed and runs again. Monotonicity (alive
//! at T ⇒ alive below T, expired at T ⇒ expired above) keeps one interval `(lo, hi]`, and whenever
//! it changes (and every resolution step) the free clocks are re-planned:
//! - `hi` unknown: the targets are a geometric grid from [`LifetimeConfig::first_wait`] to
//!   [`LifetimeConfig::max`] (at most [`POOL`] points, ratio ≥ 1.25: 1.46 for 1–300 s), one per
//!   clock, all clocks starting together ([`CALIBRATION`](super::CALIBRATION) of them first, the rest with the first
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
//! when a binding outlives the maximum, or at a hard bound ([`MAX_CHECKS`], [`MAX_TRANSACTIONS`](super::MAX_TRANSACTIONS),
//! [`MAX_REQUESTS`](super::MAX_REQUESTS), [`LifetimeConfig::search_limit`], too many verdicts that narrow nothing).
//!
//! Each X socket is a [`Clock`]; a refresh restarts it ([`LifetimeProbe::refresh`]), its answer
//! sets it running ([`LifetimeProbe::refreshed`]), and [`LifetimeProbe::plan`] decides when each
//! running clock is checked.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::transaction::Kind;
use super::{LifetimeConfig, LifetimeProbe, Stage, MAX_CHECKS, POOL};
use crate::probe::socket::SocketId;

/// Verdicts in a row that did not narrow the interval before the search stops where it is.
const MAX_STALE: u32 = 3 * POOL as u32;

/// Unanswered refreshes in a row before a clock is retired.
pub(super) const MAX_REFRESH_FAILURES: u32 = 3;

/// Bounds of the ratio of the first geometric grid.
const MIN_RATIO: f64 = 1.25;
const MAX_RATIO: f64 = 2.0;

impl LifetimeConfig {
    fn first(&self) -> Duration {
        self.first_wait
            .max(Duration::from_millis(100))
            .min(self.max)
    }

    /// The first grid: `first · rⁱ` below `max`, then `max`; at most [`POOL`] points.
    pub(super) fn grid(&self) -> (Vec<Duration>, f64) {
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
}

/// The search resolution at idle time `d`: max(1 s, 5 % of `d`).
pub fn resolution(d: Duration) -> Duration {
    (d / 20).max(Duration::from_secs(1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ClockState {
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
pub(super) struct Clock {
    pub(super) socket: SocketId,
    pub(super) state: ClockState,
    /// When X last sent: the binding's idle time counts from here.
    pub(super) last_sent: Option<Instant>,
    /// X's external address from its latest refresh (Pp is its port).
    pub(super) mapped: Option<SocketAddr>,
    /// When its check is planned (re-planned at every change; not a commitment).
    pub(super) due: Option<Instant>,
    /// The idle time its pending check tests (nominal, for planning only).
    pub(super) testing: Option<Duration>,
    pub(super) refresh_failures: u32,
    /// Scouts sent for its pending check.
    pub(super) scouts: u32,
    /// Not refreshed before this: late answers to a retransmitted check may still arrive, and
    /// on a NAT that inbound traffic refreshes they would restart the next idle period unseen.
    pub(super) quiet_until: Option<Instant>,
}

impl LifetimeProbe {
    /// Starts a refresh from clock `c`: its binding's timer restarts with the first transmission.
    pub(super) fn refresh(&mut self, c: usize) {
        let clock = &mut self.clocks[c];
        clock.state = ClockState::Refreshing;
        clock.quiet_until = None;
        clock.due = None;
        clock.testing = None;
        let socket = clock.socket;
        self.add_tx(Kind::Refresh, socket, c, None);
    }

    /// A refresh of clock `c` was answered: its binding was just refreshed and has external
    /// address `mapped`.
    pub(super) fn refreshed(&mut self, now: Instant, c: usize, mapped: SocketAddr) {
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

    /// Whether the search has its answer (or cannot improve it within its bounds).
    fn search_over(&self) -> bool {
        let converged = self
            .hi
            .is_some_and(|hi| hi.saturating_sub(self.lo) <= resolution(self.lo));
        converged || self.lo >= self.cfg.max || self.checks >= MAX_CHECKS || self.stale >= MAX_STALE
    }

    /// Re-plans every free clock for the interval `(lo, hi]` (see the module comment).
    pub(super) fn plan(&mut self, now: Instant) {
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
    pub(super) fn start_due(&mut self, now: Instant) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const SERVER: &str = "198.51.100.1:3478";

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
    fn resolution_is_one_second_or_five_percent() {
        assert_eq!(resolution(Duration::from_secs(4)), Duration::from_secs(1));
        assert_eq!(resolution(Duration::from_secs(120)), Duration::from_secs(6));
    }
}
