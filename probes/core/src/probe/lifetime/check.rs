//! The checks (RFC 5780 §4.6: a Binding from a fresh Y with RESPONSE-PORT = X's external port)
//! and what each one's answer or silence concludes: a check's [`Outcome`], the single-check
//! silence rule, and the search's step on each verdict.
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

use std::time::{Duration, Instant};

use super::pooling::{MAX_SCOUTS, MAX_VOID};
use super::search::{ClockState, MAX_REFRESH_FAILURES};
use super::transaction::Kind;
use super::{LifetimeProbe, Stage, POOL};
use crate::probe::socket::SocketId;

/// Checks in a row too lossy to conclude before the search gives up.
pub const MAX_UNSURE: u32 = 16;

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Outcome {
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

impl LifetimeProbe {
    /// Starts the check of clock `c` now (its idle time is measured from the real transmissions):
    /// at once from a fresh Y while one external address is seen, else after a scout.
    pub(super) fn check(&mut self, now: Instant, c: usize) {
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

    pub(super) fn fresh_socket(&mut self) -> SocketId {
        let y = SocketId(self.next_socket);
        self.next_socket = self.next_socket.saturating_add(1);
        y
    }

    /// The RESPONSE-PORT request of clock `c`'s check, from `y`; `verified` when `y`'s mapping
    /// is known to use X's external address.
    pub(super) fn send_check(&mut self, c: usize, y: SocketId, verified: bool) {
        let port = self.clocks[c].mapped.map(|m| m.port());
        self.add_tx(Kind::Check, y, c, port);
        if let Some(tx) = self.txs.last_mut() {
            tx.verified = verified;
        }
    }

    pub(super) fn gave_up(&mut self, now: Instant, i: usize, miss: f64) {
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

    pub(super) fn idle_at(&self, c: usize, t: Instant) -> Duration {
        t.saturating_duration_since(self.clocks[c].last_sent.unwrap_or(self.started))
    }

    pub(super) fn check_done(&mut self, now: Instant, stage: Stage, c: usize, outcome: Outcome) {
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
}
