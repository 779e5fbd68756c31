//! Inbound refresh (REQ-6 MAY): with the lifetime known, one X is refreshed once and then kept
//! idle while answers are aimed into it via RESPONSE-PORT at [`keepalive_interval`] (at most ¾ of
//! the lower bound, the last one due right after the upper bound plus the resolution). An answer
//! still arriving later than the upper bound (plus the resolution) after the last outbound packet
//! means inbound traffic refreshes the binding; an expiry despite the answers means it does not.
//!
//! The test starts when the search is over and its result allows it
//! ([`LifetimeProbe::search_done`]); each keepalive is a check of X (see [`super::check`]).

use std::time::{Duration, Instant};

use super::check::Outcome;
use super::pooling::MAX_SCOUTS;
use super::search::resolution;
use super::{LifetimeProbe, Stage};

/// Hard bound on inbound-refresh keepalives.
const MAX_KEEPALIVES: u32 = 64;

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

impl LifetimeProbe {
    pub(super) fn search_done(&mut self, now: Instant) {
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

    pub(super) fn inbound_step(&mut self, now: Instant, outcome: Outcome) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
