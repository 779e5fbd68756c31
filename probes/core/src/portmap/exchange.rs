//! What the NAT-PMP and PCP client machines share: the retransmission schedule of one request, the
//! epoch check, and the [`Outcome`] each machine reports (issue 12).
//!
//! Retransmission (RFC 6886 §3.1, which RFC 6887 §8.1.1 follows in spirit): the first request is
//! resent after 250 ms, then at doubling intervals, for up to about a minute. A probe cannot wait a
//! minute for a service most networks lack, so [`Retransmit`] keeps the doubling and cuts it at the
//! probe's budget: [`Retransmit::DISCOVERY`] gives each service 250 ms, as the best clients do
//! (a gateway on the link answers in a millisecond or two), and starts the doubling at 60 ms so a
//! lost datagram still gets two more tries within it; [`Retransmit::MAPPING`] is the RFC's own
//! 250 ms start, cut at 2 s, for `--map`, where a mapping is being asked for in earnest.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A retransmission schedule: resend after `initial_rto`, doubling, and give up at `budget` after
/// the first transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    /// The wait before the first resend; each later wait doubles (RFC 6886 §3.1).
    pub initial_rto: Duration,
    /// The whole time one request may take, first transmission to giving up.
    pub budget: Duration,
}

impl Retransmit {
    /// Discovery in a probe: sends at 0, 60 and 180 ms, gives up at 250 ms.
    pub const DISCOVERY: Self = Self {
        initial_rto: Duration::from_millis(60),
        budget: Duration::from_millis(250),
    };
    /// Creating, and deleting, a mapping: RFC 6886's 250 ms start, cut at 2 s (sends at 0, 250,
    /// 750 and 1750 ms).
    pub const MAPPING: Self = Self {
        initial_rto: Duration::from_millis(250),
        budget: Duration::from_secs(2),
    };
}

impl Default for Retransmit {
    fn default() -> Self {
        Self::DISCOVERY
    }
}

/// One request in flight: its bytes, when it is next due, when to give up.
#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    pub(crate) payload: Vec<u8>,
    next: Instant,
    rto: Duration,
    deadline: Instant,
    pub(crate) sent: u32,
}

impl Exchange {
    pub(crate) fn new(now: Instant, payload: Vec<u8>, schedule: Retransmit) -> Self {
        Self {
            payload,
            next: now,
            rto: schedule.initial_rto.max(Duration::from_millis(1)),
            deadline: now + schedule.budget,
            sent: 0,
        }
    }

    /// The bytes to send now, if a (re)transmission is due.
    pub(crate) fn due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if now >= self.next && now < self.deadline {
            self.sent += 1;
            self.next = now + self.rto;
            self.rto = self.rto.saturating_mul(2);
            Some(self.payload.clone())
        } else {
            None
        }
    }

    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    pub(crate) fn timeout(&self) -> Instant {
        self.next.min(self.deadline)
    }
}

/// RFC 6886 §3.6 / RFC 6887 §8.5: the gateway's epoch (seconds since its mapping table started)
/// must advance with the client's clock. `prev` is the last epoch seen and when; a new epoch
/// smaller than the old one less a second, or one that moved more than 1/16 plus 2 s away from
/// the client's elapsed time, means the gateway restarted and lost its mappings.
pub fn epoch_plausible(prev: (u32, Instant), epoch: u32, now: Instant) -> bool {
    let (old, at) = prev;
    if u64::from(epoch) + 1 < u64::from(old) {
        return false;
    }
    let client = now.saturating_duration_since(at).as_secs();
    let server = u64::from(epoch).saturating_sub(u64::from(old));
    !(client + 2 < server.saturating_sub(server / 16) || server + 2 < client - client / 16)
}

/// A mapping a gateway granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantedMapping {
    /// The local port the mapping forwards to.
    pub internal_port: u16,
    /// The external address and port the gateway assigned.
    pub external: SocketAddr,
    /// The lifetime granted, in seconds (servers clamp what they are asked for).
    pub lifetime_s: u32,
}

/// What one protocol's client learned. Tri-state where it matters: `available` is `None` until
/// the machine has an answer or has given up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// The gateway speaks the protocol (answered in it, whatever the result code); `Some(false)`:
    /// no answer within the budget, the port is closed, or it answered in another protocol.
    pub available: Option<bool>,
    /// The external address the gateway claims, as claimed (the report decides whether to believe
    /// it).
    pub external_address: Option<IpAddr>,
    /// The mapping granted, if one was asked for and granted (and not yet deleted).
    pub mapping: Option<GrantedMapping>,
    /// `Some(true)` once a requested deletion was confirmed, `Some(false)` if it failed.
    pub deleted: Option<bool>,
    /// PCP said ADDRESS_MISMATCH: a NAT sits between this host and the PCP server.
    pub address_mismatch: bool,
    /// The last epoch the gateway sent.
    pub epoch: Option<u32>,
    /// Datagrams sent, retransmissions included.
    pub requests_sent: u32,
    /// Well-formed answers from the gateway that were accepted.
    pub answers: u32,
    /// Time from the first request to the first accepted answer, or to giving up, in ms.
    pub duration_ms: f64,
    /// What went wrong or looked wrong, in words (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<String>,
}

/// The most problem lines one machine keeps: a gateway (or anyone on the link) sending garbage
/// must not grow the report without bound.
pub const MAX_PROBLEMS: usize = 8;

impl Outcome {
    pub(crate) fn problem(&mut self, p: String) {
        if self.problems.len() < MAX_PROBLEMS && !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }
}

/// Shared bookkeeping of both machines: the request in flight, the clock of the first send and
/// the epoch history.
#[derive(Clone, Debug)]
pub(crate) struct Clock {
    pub(crate) started: Instant,
    pub(crate) first_answer: Option<Instant>,
    pub(crate) epoch: Option<(u32, Instant)>,
}

impl Clock {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            started: now,
            first_answer: None,
            epoch: None,
        }
    }

    /// Records an accepted answer's epoch; says in `out` when it is implausible.
    pub(crate) fn answered(&mut self, now: Instant, epoch: u32, out: &mut Outcome, name: &str) {
        if self.first_answer.is_none() {
            self.first_answer = Some(now);
            out.duration_ms = crate::ms(now.saturating_duration_since(self.started));
        }
        if let Some(prev) = self.epoch {
            if !epoch_plausible(prev, epoch, now) {
                out.problem(format!(
                    "{name} epoch went from {} to {epoch}: the gateway restarted and lost its mappings (RFC 6886 §3.6)",
                    prev.0
                ));
            }
        }
        self.epoch = Some((epoch, now));
        out.epoch = Some(epoch);
        out.answers += 1;
    }

    pub(crate) fn gave_up(&self, now: Instant, out: &mut Outcome) {
        if self.first_answer.is_none() {
            out.duration_ms = crate::ms(now.saturating_duration_since(self.started));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_double_and_stop_at_the_budget() {
        let t0 = Instant::now();
        for (schedule, want) in [
            (Retransmit::DISCOVERY, vec![0, 60, 180]),
            (Retransmit::MAPPING, vec![0, 250, 750, 1750]),
        ] {
            let mut x = Exchange::new(t0, vec![1], schedule);
            let mut sent = Vec::new();
            let mut now = t0;
            while !x.expired(now) {
                if x.due(now).is_some() {
                    sent.push(now.duration_since(t0).as_millis() as u64);
                }
                now = x.timeout();
            }
            assert_eq!(sent, want);
            assert_eq!(now.duration_since(t0), schedule.budget);
        }
    }

    #[test]
    fn epochs_must_follow_the_clients_clock() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert!(epoch_plausible((100, t0), 100, t0));
        assert!(epoch_plausible((100, t0), 110, t0 + s(10)));
        assert!(epoch_plausible((100, t0), 99, t0), "a second of rounding");
        assert!(!epoch_plausible((100, t0), 3, t0 + s(1)), "went backwards");
        assert!(!epoch_plausible((100, t0), 100, t0 + s(60)), "stood still");
        assert!(!epoch_plausible((100, t0), 400, t0 + s(10)), "ran ahead");
    }
}
