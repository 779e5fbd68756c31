//! The measurement's STUN transactions (RFC 8489 §6.2.1): refreshes, checks and scouts, each one
//! Binding request retransmitted on its own schedule; the hard bounds on how many the measurement
//! may start and send; and how a transaction ends (answered, or given up).
//!
//! A transaction is only bookkeeping here: what its answer or its silence means is decided by the
//! stage that sent it ([`super::check`], [`super::pooling`], [`super::search`]).

use std::time::{Duration, Instant};

use super::search::ClockState;
use super::{LifetimeProbe, Stage, MAX_REQUESTS, MAX_TRANSACTIONS};
use crate::client::RequestOptions;
use crate::probe::evidence::{binding_request, Schedule};
use crate::probe::socket::SocketId;
use crate::stun::TransactionId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A Binding from X: refreshes the binding and reports its external port.
    Refresh,
    /// A Binding from a fresh Y with RESPONSE-PORT = X's external port.
    Check,
    /// Under arbitrary pooling, before a check: a plain Binding from a fresh Y, to learn the
    /// external address its mapping got (only a Y on X's address may check X).
    Scout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TxState {
    Pending,
    Answered,
    /// Given up or abandoned; what its silence means was decided when it ended (`gave_up`).
    GaveUp,
}

#[derive(Clone, Debug)]
pub(super) struct Tx {
    pub(super) kind: Kind,
    pub(super) stage: Stage,
    pub(super) socket: SocketId,
    /// The clock (X) the transaction refreshes or checks.
    pub(super) clock: usize,
    pub(super) tid: TransactionId,
    pub(super) payload: Vec<u8>,
    pub(super) sched: Schedule,
    pub(super) state: TxState,
    /// A check from a Y whose mapping is known to use X's external address (scouted).
    pub(super) verified: bool,
}

impl LifetimeProbe {
    pub(super) fn add_tx(
        &mut self,
        kind: Kind,
        socket: SocketId,
        clock: usize,
        response_port: Option<u16>,
    ) {
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

    pub(super) fn out_of_budget(&mut self, now: Instant) -> bool {
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

    pub(super) fn rto(&self) -> Duration {
        self.rtt.rto(&self.cfg.timing)
    }

    /// When the last answer to a request sent as `sched` can still arrive: two RTOs after its
    /// last transmission (`None` for a request sent once and answered: nothing is left).
    pub(super) fn quiet_after(&self, sched: &Schedule) -> Option<Instant> {
        let last = sched.last_sent?;
        (sched.transmits > 1 || sched.done_at.is_none()).then(|| last + self.rto() * 2)
    }

    pub(super) fn finish_tx(&mut self, now: Instant, i: usize, answered: bool) {
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
            tx.state = TxState::GaveUp;
        }
    }

    /// Ends every pending transaction: their answers are no longer evidence of anything.
    pub(super) fn abandon_pending(&mut self, now: Instant) {
        self.queue.clear();
        for tx in &mut self.txs {
            if tx.state == TxState::Pending {
                tx.state = TxState::GaveUp;
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
}
