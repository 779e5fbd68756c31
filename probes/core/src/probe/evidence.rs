//! What every probe machine needs to time its requests and to trust a missing answer: its
//! [`Timing`] parameters, the RFC 6298 round-trip estimator behind the retransmission timeout, and
//! the loss evidence behind the give-up rule (the Beta(1,1)-posterior predictive chance that `k`
//! transmissions in a row were all lost), plus fresh Binding requests with seeded transaction IDs.
//! It names no machine: the plan and the lifetime machine both build on it.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::client::{build_request, RequestOptions};
use crate::stun::TransactionId;

/// Retransmission and confidence parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// RTO before any round trip has been measured.
    pub initial_rto: Duration,
    /// Floor of the measured RTO (absorbs scheduling jitter on fast paths). 5 ms: well above a
    /// LAN round trip and a timer's usual lateness, so answers on a fast path are rarely taken for
    /// losses; and since a negative verdict also needs its liveness control answered (the
    /// plan's `TxState::Held`), a host stalled for longer than the evidence window no longer turns a
    /// late positive into a wrong negative, which is what held the floor at 20 ms before. Lower
    /// floors gain little: the window is then bounded by the round trips themselves.
    pub min_rto: Duration,
    /// Ceiling of any single wait.
    pub max_rto: Duration,
    /// Transmissions of the first request before concluding "UDP blocked" (RFC 8489 Rc).
    pub reach_transmits: u32,
    /// Hard cap on transmissions of any later request.
    pub max_transmits: u32,
    /// Largest accepted chance that a negative verdict is an artefact of loss.
    pub target_miss: f64,
}

impl Timing {
    /// `natscope probe --timeout MS --retries N` as engine timing: MS is the initial RTO (the
    /// floor drops to it, the cap rises to twice it); N caps every request at 1+N transmissions.
    pub fn apply_flags(&mut self, timeout_ms: Option<u64>, retries: Option<u32>) {
        if let Some(ms) = timeout_ms {
            let rto = Duration::from_millis(ms);
            self.initial_rto = rto;
            self.min_rto = self.min_rto.min(rto);
            self.max_rto = self.max_rto.max(rto * 2);
        }
        if let Some(n) = retries {
            self.reach_transmits = n + 1;
            self.max_transmits = n + 1;
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            initial_rto: Duration::from_millis(200),
            min_rto: Duration::from_millis(5),
            max_rto: Duration::from_secs(3),
            reach_transmits: 7,
            max_transmits: 24,
            target_miss: 1e-6,
        }
    }
}

/// RFC 6298 smoothed round-trip time and variance.
#[derive(Clone, Copy, Debug, Default)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimator {
    /// Adds one unambiguous sample (Karn: from a request sent once).
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                self.rttvar = (self.rttvar * 3 + s.abs_diff(r)) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// SRTT + 4·RTTVAR within the timing's bounds; the initial RTO until a sample exists.
    pub fn rto(&self, t: &Timing) -> Duration {
        match self.srtt {
            None => t.initial_rto,
            Some(s) => (s + self.rttvar * 4).clamp(t.min_rto, t.max_rto),
        }
    }

    /// SRTT + RTTVAR within the timing's bounds: when an answer is usually back, not when the
    /// slowest one is. It spaces the transmissions of a request whose silence is the result (a
    /// negative test), so that they are not sent back to back; the tail of the delay is covered
    /// once, by waiting a full [`Self::rto`] after the last one (see [`Schedule::sent_spaced`]).
    pub fn spacing(&self, t: &Timing) -> Duration {
        match self.srtt {
            None => t.initial_rto,
            Some(s) => (s + self.rttvar).clamp(t.min_rto, t.max_rto),
        }
    }
}

/// One request's transmissions: how many, when, and when the next is due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    pub transmits: u32,
    pub first_sent: Option<Instant>,
    pub last_sent: Option<Instant>,
    pub next_at: Option<Instant>,
    /// When the request was answered or given up.
    pub done_at: Option<Instant>,
}

impl Schedule {
    /// Records a transmission at `now`. RFC 8489 §6.2.1 backs off by doubling; on the paths a probe
    /// sees, twice the RTO bounds it, so the next is due after one RTO, later ones after two.
    pub fn sent(&mut self, now: Instant, rto: Duration, max_rto: Duration) {
        let wait = if self.transmits == 0 { rto } else { rto * 2 };
        self.record(now, wait.min(max_rto));
    }

    /// Records a transmission at `now` of a request whose silence is evidence (a negative test):
    /// the next is due after `spacing`. Whether silence is concluded is decided by the caller,
    /// which must also wait until [`Self::last_sent`] is a full RTO old (see
    /// [`RttEstimator::spacing`]): answers to earlier transmissions have had longer than that.
    pub fn sent_spaced(&mut self, now: Instant, spacing: Duration, max_rto: Duration) {
        self.record(now, spacing.min(max_rto));
    }

    /// Records a transmission at `now` with RFC 8489 §6.2.1's full doubling: the `n`th waits
    /// `rto · 2^(n-1)`. For requests whose silence is no evidence, only a liveness failure, so
    /// waiting longer costs time only when something is wrong.
    pub fn sent_doubling(&mut self, now: Instant, rto: Duration, max_rto: Duration) {
        let wait = rto.saturating_mul(1 << self.transmits.min(16));
        self.record(now, wait.min(max_rto));
    }

    /// Records a transmission at `now`, the next due after `wait`.
    fn record(&mut self, now: Instant, wait: Duration) {
        self.transmits += 1;
        self.first_sent.get_or_insert(now);
        self.last_sent = Some(now);
        self.next_at = Some(now + wait);
    }
}

/// Transmissions and answers of the requests that were answered. An answer that arrives after
/// its request was retransmitted is *late*, not a loss: the server answers every transmission, so
/// each further answer to an already answered request marks one more transmission that arrived.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossEvidence {
    /// Transmissions of answered requests.
    sent: u32,
    /// Answers received to them (first answers and late ones).
    received: u32,
    /// Requests answered.
    answered: u32,
}

impl LossEvidence {
    /// Records a request answered after `transmits` transmissions.
    pub fn answered_after(&mut self, transmits: u32) {
        self.sent += transmits;
        self.received += 1;
        self.answered += 1;
    }

    /// Records one more answer to a request already answered (the caller bounds these by the
    /// request's transmissions minus one).
    pub fn late_answer(&mut self) {
        self.received = (self.received + 1).min(self.sent);
    }

    /// Transmissions of answered requests: what [`Self::loss`] is measured over.
    pub fn transmissions(&self) -> u32 {
        self.sent
    }

    /// Requests answered.
    pub fn answered(&self) -> u32 {
        self.answered
    }

    /// Chance that `k` transmissions in a row were all lost, given the evidence so far.
    pub fn miss(&self, k: u32) -> f64 {
        let lost = f64::from(self.sent - self.received);
        let n = f64::from(self.sent);
        (0..k).fold(1.0, |acc, i| {
            acc * (lost + 1.0 + f64::from(i)) / (n + 2.0 + f64::from(i))
        })
    }

    /// Point estimate of round-trip loss.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            f64::from(self.sent - self.received) / f64::from(self.sent)
        }
    }
}

/// The generator of transaction IDs: seeded for reproducible tests, from the OS otherwise.
pub fn transaction_rng(seed: Option<u64>) -> StdRng {
    match seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_entropy(),
    }
}

/// A Binding request with FINGERPRINT and a transaction ID drawn from `rng`.
pub fn binding_request(rng: &mut StdRng, opts: RequestOptions) -> (TransactionId, Vec<u8>) {
    let tid = TransactionId::from_rng(rng);
    let mut buf = [0u8; 128];
    let opts = RequestOptions {
        fingerprint: true,
        ..opts
    };
    // A request this small always fits; an encoding error would be a bug, not an input.
    let len = build_request(&mut buf, &tid, &opts).unwrap_or(0);
    (tid, buf[..len].to_vec())
}

#[cfg(test)]
mod tests {
    use super::LossEvidence;

    #[test]
    fn late_answers_are_not_counted_as_loss() {
        let mut e = LossEvidence::default();
        e.answered_after(2);
        assert_eq!(
            e.loss(),
            0.5,
            "without the late answer: one of two looks lost"
        );
        e.late_answer();
        assert_eq!(e.loss(), 0.0);
        e.late_answer(); // a third answer to two transmissions cannot add evidence
        assert_eq!(e.loss(), 0.0);
        assert_eq!(e.answered(), 1);
        assert!(
            e.miss(3)
                < LossEvidence {
                    sent: 2,
                    received: 1,
                    answered: 1
                }
                .miss(3)
        );
    }
}
