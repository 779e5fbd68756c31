//! The probe plan (RFC 5780 §4) and its evidence rules.
//!
//! Sockets, each a fresh local port the driver binds on first use:
//! - `S0` (id 0): reachability (§4.2, several parallel Binding requests for RTT and loss samples),
//!   then mapping (§4.3): Binding to A2:P1 and A2:P2 from the same socket.
//! - `SF` (id 1): filtering (§4.4) on a socket that has sent nothing to the alternate address
//!   (§3.2): change-IP+port and change-port requests to A1:P1, concurrently (both go to A1:P1, so
//!   neither opens the filter for the other's answer).
//! - `SY` (id 2): hairpinning (§4.5): a Binding request to S0's mapped address; S0 seeing it arrive
//!   means the NAT hairpins.
//! - ids 3..: port allocation: fresh sockets, one after another (so their mappings are allocated
//!   consecutively), each a Binding to A1:P1; their external ports give the pattern and delta.
//!
//! Mapping and filtering run on separate sockets, so no unsolicited inbound ever hits the mapping
//! under test: a NAT that re-maps a port after unsolicited inbound (Linux conntrack) cannot make a
//! cone look symmetric, the trap RFC 3489-style tools fall into.
//!
//! Evidence: an answer counts only if its transaction ID matches and it came from the address the
//! test expects — both the real source and RESPONSE-ORIGIN. Anything else is a server problem,
//! reported, and the verdict that needed the answer becomes `unknown`.
//!
//! Timing: the retransmission timeout follows RFC 6298 from measured round trips (floored at
//! [`Timing::min_rto`]) and backs off to twice that, so a LAN run takes well under a second. The
//! transmissions of a negative test are spaced by about one round trip instead (SRTT + RTTVAR,
//! [`RttEstimator::spacing`]), and its silence counts only once the last of them is 2·RTO old: the
//! tail of the delay is waited out once, not after every transmission. A
//! negative result ("no answer") is concluded only when the chance that every transmission was lost
//! falls below [`Timing::target_miss`]. That chance is the Beta-posterior predictive of `k`
//! consecutive losses given the losses and answers seen so far, so high loss automatically widens the
//! retry budget; if the cap on transmissions is reached first, the verdict is `unknown`. A negative
//! also needs a liveness control answered: a plain Binding request to A1:P1 on the socket the
//! missing answers would arrive on, sent after the test's last transmission (`TxState::Held`), so a
//! stalled host can delay a negative verdict but not fake one; unanswered, the verdict is `unknown`.
//!
//! Under loss the probe spends time rather than give up, within [`ProbeConfig::max_time`]:
//! requests may go past their usual caps while the measured loss asks for more
//! ([`ProbeConfig::widen_with_loss`]), heavy loss adds loss samples so the estimate rests on more
//! transmissions ([`LOSS_SAMPLE_MIN_LOSS`]) and retransmits answered-for requests after about a
//! round trip instead of 2·RTO, and at the bound every open request is given up: its verdict is
//! `unknown`, and the report says the bound was reached.
//!
//! Pacing (RFC 5780 §5): a request's first transmission waits for a slot of the [`Pacer`]
//! (retransmissions never do); its schedule starts when it really leaves, so a slot's wait is never
//! taken for a round trip or for silence.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;

use super::evidence::{
    binding_request, transaction_rng, LossEvidence, RttEstimator, Schedule, Timing,
};
use super::machine::ProbeMachine;
use super::pacing::{PaceChoice, Pacer, Pacing};
use super::report::{
    self, compare_mappings, AddressPooling, AllocationPattern, Behavior, Classic, NatShape,
    PortAllocationReport, ProbeReport, ServerReport, TestReport,
};
use super::socket::{LocalSockets, SocketId, Transmit};
use crate::client::{BindingResponse, RequestOptions};
use crate::ms;
use crate::stun::{ChangeRequest, Class, Message, TransactionId, METHOD_BINDING};

/// The plan's fixed sockets (see the module doc): reachability and mapping, filtering, hairpinning.
pub const S0: SocketId = SocketId(0);
pub const SF: SocketId = SocketId(1);
pub const SY: SocketId = SocketId(2);
const ALLOC_BASE: u16 = 3;

/// What to probe and how.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    /// The RFC 5780 server's primary address A1:P1.
    pub server: SocketAddr,
    pub hairpin: bool,
    /// Fresh sockets sampled for the allocation pattern (at least 3 for a delta).
    pub allocation_samples: u16,
    /// Parallel reachability requests (more RTT and loss samples, same cost in time). Every
    /// answer is evidence that the path delivers, so the negative tests need fewer transmissions
    /// to reach `target_miss`: 12 instead of 4 took a port-restricted cone from 832 ms to 352 ms
    /// (sim, 1 ms one-way) and sent fewer datagrams in all (46 instead of 74). A paced run
    /// (RFC 5780 §5) sends at most [`PACED_REACH_REQUESTS`], which would otherwise use up the
    /// first second's ten new transactions on their own.
    pub reach_requests: u16,
    pub timing: Timing,
    /// Seed for transaction IDs (tests); `None` draws from the OS.
    pub seed: Option<u64>,
    /// RFC 5780 §5 pacing of new transactions; by default [`Pacing::decide`] for `server`.
    pub pacing: Pacing,
    /// The bound on the whole run (`--max-time`, default [`DEFAULT_MAX_TIME`]): at `start +
    /// max_time` every request still open is given up, its verdict becomes `unknown` (never a
    /// guess), and the report says the bound was reached.
    pub max_time: Duration,
    /// Let a later request go past [`Timing::max_transmits`] — up to [`WIDEN_FACTOR`] times as
    /// many transmissions — while the measured loss still asks for more before its silence can
    /// count, and keep a liveness control going past [`Timing::reach_transmits`] until its own
    /// silence is unlikely to be loss ([`LIVENESS_MISS`]). `--retries N` turns it off: the
    /// user's cap is then exact.
    pub widen_with_loss: bool,
}

/// The default [`ProbeConfig::max_time`]: 5 s. A user waits a few seconds for an answer rather
/// than get `unknown`; it holds RFC 8489's whole reachability budget at the default 200 ms
/// initial RTO (7 transmissions, 2.6 s) with room to classify, and in the simulator every run
/// of the whole grid at 30 % one-way loss (51 % round-trip) ends within 2.6 s (see
/// `probes/tests/probe_sim.rs`, `thirty_percent_loss_verdicts_are_correct_or_unknown`).
pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(5);

impl ProbeConfig {
    /// Reads a [`max_time`](Self::max_time) given in seconds (`--max-time SECS`): a number from
    /// 0.1 to 600, fractions allowed.
    pub fn parse_max_time(s: &str) -> Result<Duration, String> {
        match s.parse::<f64>() {
            Ok(v) if (0.1..=600.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
            _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 600")),
        }
    }
}

/// How far [`ProbeConfig::widen_with_loss`] may take a request's transmissions beyond its
/// usual cap: 4 × 24 = 96 for a test, enough for the 10⁻⁶ miss target up to about 85 %
/// round-trip loss; 4 × 7 = 28 for a liveness control.
pub const WIDEN_FACTOR: u32 = 4;

/// A liveness control (a positive request whose silence only withholds a verdict) keeps being
/// retransmitted, when widening, until the chance that all its transmissions were lost is below
/// this: at most about one run in a thousand loses a negative verdict to an unlucky control.
pub const LIVENESS_MISS: f64 = 1e-3;

/// While a negative test retransmits, an unpaced run whose measured round-trip loss is at least
/// this adds loss samples (`Step::LossSample`), up to [`LOSS_SAMPLES_MAX`] in all and
/// [`LOSS_SAMPLES_OPEN`] at a time. The miss chance is the Beta posterior's predictive, whose
/// tail is heavy while the estimate rests on few transmissions: at 50 % loss the 10⁻⁶ target
/// needs 32 silent transmissions when the estimate rests on 30, 23 when it rests on 120. One
/// sample costs one datagram (two, or more, under loss) and saves the negative tests several.
pub const LOSS_SAMPLE_MIN_LOSS: f64 = 0.2;
/// See [`LOSS_SAMPLE_MIN_LOSS`].
pub const LOSS_SAMPLES_MAX: usize = 48;
/// See [`LOSS_SAMPLE_MIN_LOSS`].
pub const LOSS_SAMPLES_OPEN: usize = 4;

/// At most this many distinct problems are kept in the report; further ones are only counted
/// (`server.problems_omitted`). Each problem is one line for a person; a server (or an attacker
/// who sees our transaction IDs) answering from ever new addresses must not grow the list, nor
/// the time to check a new line against it, without bound.
pub const MAX_PROBLEMS: usize = 16;

/// Reachability requests of a paced run (see [`ProbeConfig::reach_requests`]).
pub const PACED_REACH_REQUESTS: u16 = 4;

impl ProbeConfig {
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            hairpin: true,
            allocation_samples: 5,
            reach_requests: 12,
            timing: Timing::default(),
            seed: None,
            pacing: Pacing::decide(&[server], PaceChoice::Default),
            max_time: DEFAULT_MAX_TIME,
            widen_with_loss: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Reach,
    MapII,
    MapIII,
    FiltII,
    FiltIII,
    Hairpin,
    /// Liveness controls: a plain Binding request to A1:P1 on the socket a negative test's answers
    /// would arrive on (SF for filtering, S0 for hairpinning), sent after that test's last
    /// transmission. See [`TxState::Held`].
    FiltCtrl,
    HairpinCtrl,
    /// A plain Binding request to A1:P1 on S0 sent only to measure loss: under heavy loss the
    /// negative tests need the loss estimate to rest on many transmissions (see
    /// [`LOSS_SAMPLE_MIN_LOSS`]); its answers feed nothing else.
    LossSample,
    Alloc(u16),
}

impl Step {
    /// A test whose silence is its verdict (filtering, hairpinning).
    fn is_negative(self) -> bool {
        matches!(self, Step::FiltII | Step::FiltIII | Step::Hairpin)
    }
}

/// The tests whose silence is a verdict, each with its liveness control and that control's socket.
const NEGATIVE_GROUPS: [(&[Step], Step, SocketId); 2] = [
    (&[Step::FiltII, Step::FiltIII], Step::FiltCtrl, SF),
    (&[Step::Hairpin], Step::HairpinCtrl, S0),
];

#[derive(Clone, Debug)]
enum TxState {
    Pending,
    Answered(Box<BindingResponse>),
    /// Silent long enough (`miss` met the target), no more transmissions, but not yet given up: the
    /// liveness control must be answered first. The kernel hands a socket's datagrams over in order
    /// and the server answers in order, so once the control's answer is processed, every answer to
    /// this request that the server sent before it has been processed too: a stalled host (or a
    /// starved receive path) can delay the verdict but not fake it. An answer that still arrives
    /// while held wins, as one to a pending request would.
    Held {
        miss: f64,
    },
    /// Gave up; `miss` is the chance every transmission was lost although an answer was due.
    GaveUp {
        miss: f64,
    },
}

#[derive(Clone, Debug)]
struct Tx {
    step: Step,
    socket: SocketId,
    to: SocketAddr,
    tid: TransactionId,
    payload: Vec<u8>,
    /// Where the answer must come from (real source and RESPONSE-ORIGIN).
    expect_from: SocketAddr,
    sched: Schedule,
    state: TxState,
    /// Answers received after the first one (late answers to earlier transmissions).
    late_answers: u32,
}

impl Tx {
    fn pending(&self) -> bool {
        matches!(self.state, TxState::Pending)
    }
    /// Still takes an answer: pending or held for its liveness control.
    fn open(&self) -> bool {
        matches!(self.state, TxState::Pending | TxState::Held { .. })
    }
    /// Answers received: the first and every late one.
    fn answers(&self) -> u32 {
        match self.state {
            TxState::Answered(_) => 1 + self.late_answers,
            _ => 0,
        }
    }
    fn answer(&self) -> Option<&BindingResponse> {
        match &self.state {
            TxState::Answered(r) => Some(r),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Reach,
    Behavior,
    Allocation,
    Done,
}

/// The probe state machine. Drive it with `poll_transmit` / `handle_datagram` / `handle_timeout` /
/// `poll_timeout` until `is_done`, then read `report`.
#[derive(Debug)]
pub struct Probe {
    cfg: ProbeConfig,
    started: Instant,
    finished: Option<Instant>,
    phase: Phase,
    txs: Vec<Tx>,
    queue: VecDeque<usize>,
    local: LocalSockets,
    /// Round trips of requests sent once the path had answered (see [`Probe::estimator`]).
    rtt: RttEstimator,
    /// Round trips of the first flight: requests sent before the run's first answer arrived.
    first_flight: RttEstimator,
    /// The slowest first-flight round trip.
    first_flight_max: Duration,
    /// When the run's first answer arrived.
    first_answer: Option<Instant>,
    evidence: LossEvidence,
    other: Option<SocketAddr>,
    /// At most [`MAX_PROBLEMS`] lines for the report.
    problems: Vec<String>,
    /// Problems seen after `problems` was full (repeats of a dropped one included).
    problems_omitted: u32,
    /// The tests a problem was seen for, kept whether or not its line fit in `problems`: a
    /// verdict that needed such an answer is withheld ([`Probe::server_problem_for`]).
    problem_steps: Vec<&'static str>,
    /// The run stopped at [`ProbeConfig::max_time`] with requests still open.
    bound_reached: bool,
    alg: Option<bool>,
    rng: StdRng,
    pacer: Pacer,
}

impl Probe {
    pub fn new(now: Instant, cfg: ProbeConfig) -> Self {
        let rng = transaction_rng(cfg.seed);
        let pacer = cfg.pacing.pacer();
        let mut p = Self {
            started: now,
            finished: None,
            phase: Phase::Reach,
            txs: Vec::new(),
            queue: VecDeque::new(),
            local: LocalSockets::default(),
            rtt: RttEstimator::default(),
            first_flight: RttEstimator::default(),
            first_flight_max: Duration::ZERO,
            first_answer: None,
            evidence: LossEvidence::default(),
            other: None,
            problems: Vec::new(),
            problems_omitted: 0,
            problem_steps: Vec::new(),
            bound_reached: false,
            alg: None,
            rng,
            pacer,
            cfg,
        };
        let reach = if p.cfg.pacing.enabled {
            p.cfg.reach_requests.min(PACED_REACH_REQUESTS)
        } else {
            p.cfg.reach_requests
        };
        for _ in 0..reach.max(1) {
            let server = p.cfg.server;
            p.add_tx(Step::Reach, S0, server, ChangeRequest::NONE, server);
        }
        p
    }

    /// Continues `pacer` (its limit and the starts it has seen) instead of a fresh one from the
    /// configuration, so the machines of one run share one RFC 5780 §5 budget.
    pub fn with_pacer(mut self, pacer: Pacer) -> Self {
        self.pacer = pacer;
        self
    }

    /// The pacer, with every transaction this probe started: hand it to the run's next machine.
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

    fn add_tx(
        &mut self,
        step: Step,
        socket: SocketId,
        to: SocketAddr,
        change: ChangeRequest,
        expect_from: SocketAddr,
    ) {
        let opts = RequestOptions {
            change,
            ..Default::default()
        };
        let (tid, payload) = binding_request(&mut self.rng, opts);
        self.txs.push(Tx {
            step,
            socket,
            to,
            tid,
            payload,
            expect_from,
            sched: Schedule::default(),
            state: TxState::Pending,
            late_answers: 0,
        });
        self.queue.push_back(self.txs.len() - 1);
    }

    /// The estimator behind every timer: the first flight's until a later request has been
    /// answered, then only the later ones'. The first requests of a run meet a cold path — ARP, a
    /// NAT creating the mapping in its slow path, processes on either side woken from sleep, on a
    /// busy host a scheduler's delay — and all of them wait for the same event, so their round
    /// trips are one observation of how long the *first* answer takes, counted a dozen times.
    /// Fed into RFC 6298 with the rest they dominate SRTT and RTTVAR for the whole run (seen in
    /// the lab: a 33 ms first flight, 0.5 ms afterwards, and every negative test spaced for
    /// 33 ms). A negative test still allows for the first flight's delay: see [`Probe::settled`].
    fn estimator(&self) -> &RttEstimator {
        if self.rtt.srtt().is_some() {
            &self.rtt
        } else {
            &self.first_flight
        }
    }

    fn rto(&self) -> Duration {
        self.estimator().rto(&self.cfg.timing)
    }

    /// How old a negative test's last transmission must be before its silence counts: twice the
    /// RTO, what RFC 8489's backoff gives any retransmission after the first.
    fn final_wait(&self) -> Duration {
        (self.rto() * 2).min(self.cfg.timing.max_rto)
    }

    /// When a negative test's silence may count: its last transmission is [`Self::final_wait`]
    /// old, and its first is twice the slowest first-flight round trip old — its first
    /// transmissions may have met the same cold path (a fresh socket is a new mapping), and an
    /// answer that slow could otherwise be overtaken by the liveness control's on a path that
    /// reorders (a NAT's slow path beside its fast path).
    fn settled(&self, sched: &Schedule) -> Option<Instant> {
        let last = sched.last_sent? + self.final_wait();
        let first = sched.first_sent? + (self.first_flight_max * 2).min(self.cfg.timing.max_rto);
        Some(last.max(first))
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if now >= self.deadline() {
            // Nothing leaves after the bound; `poll_timeout` names it, so the driver's next
            // `handle_timeout` ends the run.
            return None;
        }
        // Retransmissions go out at once; a first transmission only when the pacer has a slot
        // (it then holds back every later first transmission too, so their order is kept).
        let may_start = self.pacer.may_start(now);
        while let Some(pos) = self.queue.iter().position(|&i| {
            let t = &self.txs[i];
            !t.pending() || t.sched.transmits > 0 || may_start
        }) {
            let Some(i) = self.queue.remove(pos) else {
                break;
            };
            let rto = self.rto();
            let spacing = self.estimator().spacing(&self.cfg.timing);
            // Under measured loss a liveness control is retransmitted every 2·RTO, as a test
            // is, instead of doubling: silence is then mostly loss, not a stall, and doubling
            // would spend seconds on the fourth or fifth transmission that loss makes common.
            let lossy = self.cfg.widen_with_loss && self.evidence.loss() > 0.0;
            // Under heavy measured loss (and only then) a request that waits for an answer is
            // retransmitted after one round trip and a bit (2·(SRTT + RTTVAR)) rather than after
            // 2·RTO: the silence is mostly loss, not queueing, and an answer to any transmission
            // counts (a late one as an arrival, not a loss), so the verdict cannot change — only
            // how long it takes. On a busy host RTTVAR is large and 2·RTO several times longer.
            let heavy = self.cfg.widen_with_loss && self.evidence.loss() >= LOSS_SAMPLE_MIN_LOSS;
            let tx = &mut self.txs[i];
            if !tx.pending() {
                continue;
            }
            if tx.sched.transmits == 0 {
                self.pacer.started(now);
            }
            if matches!(tx.step, Step::FiltCtrl | Step::HairpinCtrl) && !lossy {
                tx.sched.sent_doubling(now, rto, self.cfg.timing.max_rto);
            } else if tx.step.is_negative() {
                tx.sched.sent_spaced(now, spacing, self.cfg.timing.max_rto);
            } else if heavy {
                let wait = (spacing * 2).min(rto * 2);
                tx.sched.sent_spaced(now, wait, self.cfg.timing.max_rto);
            } else {
                tx.sched.sent(now, rto, self.cfg.timing.max_rto);
            }
            return Some(Transmit {
                source: tx.socket,
                destination: tx.to,
                payload: tx.payload.clone(),
            });
        }
        None
    }

    /// Whether a request waits for its first transmission (queued, never sent).
    fn waiting_to_start(&self) -> bool {
        self.queue.iter().any(|&i| {
            let t = &self.txs[i];
            t.pending() && t.sched.transmits == 0
        })
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Done {
            return None;
        }
        let slot = self
            .waiting_to_start()
            .then(|| self.pacer.next_start())
            .flatten();
        self.txs
            .iter()
            .filter(|t| t.pending())
            .filter_map(|t| t.sched.next_at)
            .chain(slot)
            .chain(Some(self.deadline()))
            .min()
    }

    /// When the run must end: its start plus [`ProbeConfig::max_time`].
    pub fn deadline(&self) -> Instant {
        self.started + self.cfg.max_time
    }

    /// Ends the run at its time bound: every open request is given up with the miss chance it
    /// has reached (a held negative keeps its own, but without its control's answer it is no
    /// verdict), and the run is done; verdicts that needed more evidence are `unknown`. It ends
    /// *at* the bound even when the driver calls late (a loaded host wakes timers late): nothing
    /// that arrived after the bound is taken into account, so the report is what the run knew
    /// by then and its duration never exceeds the bound.
    fn stop_at_bound(&mut self) {
        let now = self.deadline();
        for i in 0..self.txs.len() {
            let miss = match self.txs[i].state {
                TxState::Held { miss } => miss,
                TxState::Pending if self.txs[i].sched.transmits == 0 => 1.0,
                TxState::Pending => self.evidence.miss(self.txs[i].sched.transmits),
                _ => continue,
            };
            let tx = &mut self.txs[i];
            tx.state = TxState::GaveUp { miss };
            tx.sched.done_at = Some(now);
            tx.sched.next_at = None;
        }
        self.queue.clear();
        self.bound_reached = true;
        self.phase = Phase::Done;
        self.finished.get_or_insert(now);
    }

    /// Transmissions after which request `step` is given up whatever the evidence says.
    fn transmit_cap(&self, step: Step) -> u32 {
        let t = &self.cfg.timing;
        let widen = self.cfg.widen_with_loss;
        match step {
            Step::Reach | Step::LossSample => t.reach_transmits,
            Step::FiltCtrl | Step::HairpinCtrl if widen && self.evidence.answered() > 0 => {
                let ceiling = t.reach_transmits.saturating_mul(WIDEN_FACTOR);
                let needed = (1..=ceiling)
                    .find(|&k| self.evidence.miss(k) < LIVENESS_MISS)
                    .unwrap_or(ceiling);
                needed.max(t.reach_transmits)
            }
            Step::FiltCtrl | Step::HairpinCtrl => t.reach_transmits,
            _ if widen => t.max_transmits.saturating_mul(WIDEN_FACTOR),
            _ => t.max_transmits,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase != Phase::Done && now >= self.deadline() {
            self.stop_at_bound();
            return;
        }
        for i in 0..self.txs.len() {
            let tx = &self.txs[i];
            let Some(at) = tx.sched.next_at else { continue };
            if !tx.pending() || now < at || self.queue.contains(&i) {
                continue;
            }
            let k = tx.sched.transmits;
            let control = matches!(tx.step, Step::FiltCtrl | Step::HairpinCtrl);
            let cap = self.transmit_cap(tx.step);
            let miss = if control || (tx.step == Step::Reach && self.evidence.answered() == 0) {
                // Reachability with nothing answered yet: no loss estimate; the RFC 8489 budget
                // decides alone. A liveness control likewise: its silence is no evidence about the
                // nat, only a liveness failure, so it backs off by doubling for that budget.
                if k >= cap {
                    0.0
                } else {
                    1.0
                }
            } else {
                self.evidence.miss(k)
            };
            let negative = tx.step.is_negative();
            // Enough silence, but the last transmission's answer may still be on its way: wait
            // until it is a full RTO old (the earlier ones are older still) before holding.
            let settled = self.settled(&tx.sched).unwrap_or(now);
            if negative && miss < self.cfg.timing.target_miss && now < settled {
                self.txs[i].sched.next_at = Some(settled);
            } else if negative && miss < self.cfg.timing.target_miss {
                self.txs[i].state = TxState::Held { miss };
                self.txs[i].sched.next_at = None;
            } else if k >= cap || miss < self.cfg.timing.target_miss {
                self.txs[i].state = TxState::GaveUp { miss };
                self.txs[i].sched.done_at = Some(now);
            } else {
                self.queue.push_back(i);
                if negative {
                    self.add_loss_sample();
                }
            }
        }
        self.advance(now);
    }

    /// Adds a loss sample when the measured loss is high and the limits allow (see
    /// [`LOSS_SAMPLE_MIN_LOSS`]); never in a paced run, whose new transactions are scarce.
    fn add_loss_sample(&mut self) {
        if !self.cfg.widen_with_loss
            || self.cfg.pacing.enabled
            || self.evidence.loss() < LOSS_SAMPLE_MIN_LOSS
        {
            return;
        }
        let samples = self.txs.iter().filter(|t| t.step == Step::LossSample);
        let (all, open) = samples.fold((0, 0), |(a, o), t| (a + 1, o + usize::from(t.pending())));
        if all < LOSS_SAMPLES_MAX && open < LOSS_SAMPLES_OPEN {
            let server = self.cfg.server;
            self.add_tx(Step::LossSample, S0, server, ChangeRequest::NONE, server);
        }
    }

    pub fn handle_datagram(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) {
        if self.phase != Phase::Done && now >= self.deadline() {
            // Late: the bound passed before this datagram was handed over.
            self.stop_at_bound();
            return;
        }
        let Ok(msg) = Message::parse(bytes) else {
            return;
        };
        let tid = msg.transaction_id();
        let Some(i) = self.txs.iter().position(|t| t.tid == tid) else {
            return;
        };
        if !self.txs[i].open() {
            self.count_late_answer(i, socket, from, bytes);
            return;
        }
        let mt = msg.message_type();
        if self.txs[i].step == Step::Hairpin {
            // The hairpin "answer" is our own request arriving on S0.
            if socket == S0 && mt.class == Class::Request && mt.method == METHOD_BINDING {
                let tx = &mut self.txs[i];
                tx.state = TxState::Answered(Box::new(BindingResponse {
                    source: Some(from),
                    ..Default::default()
                }));
                tx.sched.done_at = Some(now);
            }
            self.advance(now);
            return;
        }
        if socket != self.txs[i].socket {
            return;
        }
        let Ok(resp) = BindingResponse::parse(bytes, &tid, Some(from)) else {
            return;
        };
        let expect = self.txs[i].expect_from;
        let origin_ok = resp.response_origin.is_none_or(|o| o == expect);
        if from != expect || !origin_ok {
            let step = self.txs[i].step;
            let what = step_name(step);
            self.problem(
                Some(step),
                format!(
                    "{what}: answer expected from {expect} came from {from} (RESPONSE-ORIGIN {})",
                    resp.response_origin
                        .map_or("absent".into(), |o| o.to_string())
                ),
            );
            return;
        }
        if resp.error_code.is_some() {
            let step = self.txs[i].step;
            let what = step_name(step);
            self.problem(
                Some(step),
                format!(
                    "{what}: server answered error {} {}",
                    resp.error_code.unwrap_or(0),
                    resp.error_reason.as_deref().map(escape).unwrap_or_default()
                ),
            );
            let tx = &mut self.txs[i];
            tx.state = TxState::GaveUp { miss: 1.0 };
            tx.sched.done_at = Some(now);
            self.advance(now);
            return;
        }
        if let Some(alg) = resp.alg_rewrite() {
            if alg && self.alg != Some(true) {
                self.problem(None, format!(
                    "MAPPED-ADDRESS {} differs from XOR-MAPPED-ADDRESS {}: something on the path rewrites payloads (an ALG); verdicts use XOR-MAPPED-ADDRESS",
                    resp.mapped.map_or("-".into(), |a| a.to_string()),
                    resp.xor_mapped.map_or("-".into(), |a| a.to_string())
                ));
            }
            self.alg = Some(self.alg.unwrap_or(false) || alg);
        }
        let tx = &mut self.txs[i];
        // Karn: only unambiguous samples (one transmission) feed the RTT estimate.
        if tx.sched.transmits == 1 {
            if let Some(sent) = tx.sched.first_sent {
                let r = now.saturating_duration_since(sent);
                if self.first_answer.is_none_or(|a| sent < a) {
                    self.first_flight.sample(r);
                    self.first_flight_max = self.first_flight_max.max(r);
                } else {
                    self.rtt.sample(r);
                }
            }
        }
        self.first_answer.get_or_insert(now);
        self.evidence.answered_after(tx.sched.transmits);
        tx.state = TxState::Answered(Box::new(resp));
        tx.sched.done_at = Some(now);
        self.advance(now);
    }

    /// A further answer to an answered request, from where its first answer came: one more of its
    /// transmissions arrived, so it was late rather than lost.
    fn count_late_answer(&mut self, i: usize, socket: SocketId, from: SocketAddr, bytes: &[u8]) {
        let tx = &mut self.txs[i];
        if tx.step == Step::Hairpin
            || socket != tx.socket
            || from != tx.expect_from
            || tx.answer().is_none()
            || tx.late_answers + 1 >= tx.sched.transmits
        {
            return;
        }
        let ok = BindingResponse::parse(bytes, &tx.tid, Some(from))
            .is_ok_and(|r| r.error_code.is_none());
        if ok {
            tx.late_answers += 1;
            self.evidence.late_answer();
        }
    }

    /// Records a problem of test `step` (`None`: of the server as a whole). The list holds at
    /// most [`MAX_PROBLEMS`] lines, so checking a new one against it is bounded too; which
    /// tests had problems is kept apart and in full, since their verdicts depend on it.
    fn problem(&mut self, step: Option<Step>, p: String) {
        if let Some(name) = step.map(step_name) {
            if !self.problem_steps.contains(&name) {
                self.problem_steps.push(name);
            }
        }
        if self.problems.contains(&p) {
            return;
        }
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        } else {
            self.problems_omitted = self.problems_omitted.saturating_add(1);
        }
    }

    fn first_answer(&self, step: Step) -> Option<&BindingResponse> {
        self.txs
            .iter()
            .filter(|t| t.step == step)
            .find_map(|t| t.answer())
    }

    fn step_pending(&self, step: Step) -> bool {
        self.txs.iter().any(|t| t.step == step && t.pending())
    }

    /// Pending or held: the step's verdict is not final yet.
    fn step_open(&self, step: Step) -> bool {
        self.txs.iter().any(|t| t.step == step && t.open())
    }

    /// Sends each negative group's liveness control once all its requests have stopped
    /// transmitting and one of them is held; gives the held ones up once the control is done
    /// (answered or given up itself — then the verdict is `unknown`, see `control_answered`).
    fn liveness(&mut self, now: Instant) {
        for (steps, ctrl, socket) in NEGATIVE_GROUPS {
            let mine = |t: &Tx| steps.contains(&t.step);
            let held = self
                .txs
                .iter()
                .any(|t| mine(t) && matches!(t.state, TxState::Held { .. }));
            if !held || self.txs.iter().any(|t| mine(t) && t.pending()) {
                continue;
            }
            match self.txs.iter().find(|t| t.step == ctrl) {
                None => {
                    let server = self.cfg.server;
                    self.add_tx(ctrl, socket, server, ChangeRequest::NONE, server);
                }
                Some(c) if !c.pending() => {
                    for t in self.txs.iter_mut().filter(|t| mine(t)) {
                        if let TxState::Held { miss } = t.state {
                            t.state = TxState::GaveUp { miss };
                            t.sched.done_at = Some(now);
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Whether the liveness control `ctrl` was answered (the condition of a negative verdict).
    fn control_answered(&self, ctrl: Step) -> bool {
        self.first_answer(ctrl).is_some()
    }

    fn mapped_s0(&self) -> Option<SocketAddr> {
        self.first_answer(Step::Reach)
            .and_then(BindingResponse::reflexive)
    }

    fn nat_detected(&self) -> Option<bool> {
        Some(self.mapped_s0()? != self.local_of(S0)?)
    }

    /// The alternate address if the server is a usable RFC 5780 server.
    fn usable_other(&self) -> Option<SocketAddr> {
        let o = self.other?;
        (o.ip() != self.cfg.server.ip() && o.port() != self.cfg.server.port()).then_some(o)
    }

    fn advance(&mut self, now: Instant) {
        loop {
            let before = self.phase;
            match self.phase {
                Phase::Reach => {
                    if let Some(r) = self.first_answer(Step::Reach).cloned() {
                        self.start_behavior(&r);
                    } else if !self.step_pending(Step::Reach) {
                        self.phase = Phase::Done;
                    }
                }
                Phase::Behavior => {
                    self.liveness(now);
                    let busy = [
                        Step::MapII,
                        Step::MapIII,
                        Step::FiltII,
                        Step::FiltIII,
                        Step::Hairpin,
                        Step::FiltCtrl,
                        Step::HairpinCtrl,
                    ]
                    .iter()
                    .any(|s| self.step_open(*s));
                    if !busy {
                        self.phase = Phase::Allocation;
                        self.next_alloc();
                    }
                }
                Phase::Allocation => {
                    let pending = self
                        .txs
                        .iter()
                        .any(|t| matches!(t.step, Step::Alloc(_)) && t.pending());
                    if !pending && !self.next_alloc() {
                        self.phase = Phase::Done;
                    }
                }
                Phase::Done => {
                    self.finished.get_or_insert(now);
                    return;
                }
            }
            if self.phase == before {
                return;
            }
        }
    }

    fn start_behavior(&mut self, first: &BindingResponse) {
        self.phase = Phase::Behavior;
        let a1p1 = self.cfg.server;
        self.other = first.other_address;
        match first.other_address {
            None => self.problem(
                None,
                "no OTHER-ADDRESS: not an RFC 5780 server, so mapping and filtering cannot be tested".into(),
            ),
            Some(o) if o.ip() == a1p1.ip() => self.problem(None, format!(
                "OTHER-ADDRESS {o} has the primary's IP: the server has no second address, so mapping and filtering cannot be tested"
            )),
            Some(o) if o.port() == a1p1.port() => self.problem(None, format!(
                "OTHER-ADDRESS {o} has the primary's port: change-port tests are impossible"
            )),
            Some(_) => {}
        }
        if let Some(o) = self.usable_other() {
            let (a2p1, a2p2, a1p2) = (
                SocketAddr::new(o.ip(), a1p1.port()),
                o,
                SocketAddr::new(a1p1.ip(), o.port()),
            );
            self.add_tx(Step::MapII, S0, a2p1, ChangeRequest::NONE, a2p1);
            self.add_tx(Step::MapIII, S0, a2p2, ChangeRequest::NONE, a2p2);
            self.add_tx(Step::FiltII, SF, a1p1, ChangeRequest::BOTH, a2p2);
            self.add_tx(Step::FiltIII, SF, a1p1, ChangeRequest::PORT, a1p2);
        }
        if self.cfg.hairpin && self.nat_detected() == Some(true) {
            if let Some(m1) = self.mapped_s0() {
                self.add_tx(Step::Hairpin, SY, m1, ChangeRequest::NONE, m1);
            }
        }
    }

    /// Starts the next allocation sample; false when all have run.
    fn next_alloc(&mut self) -> bool {
        let done = self
            .txs
            .iter()
            .filter(|t| matches!(t.step, Step::Alloc(_)))
            .count() as u16;
        if done >= self.cfg.allocation_samples {
            return false;
        }
        let server = self.cfg.server;
        self.add_tx(
            Step::Alloc(done),
            SocketId(ALLOC_BASE + done),
            server,
            ChangeRequest::NONE,
            server,
        );
        true
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Requests sent so far, all tests together.
    pub fn requests_sent(&self) -> u32 {
        self.txs.iter().map(|t| t.sched.transmits).sum()
    }

    /// The result (complete once `is_done`; partial, with `unknown`s, before).
    pub fn report(&self) -> ProbeReport {
        let end = self.finished.unwrap_or(self.started);
        let reach_answered = self.first_answer(Step::Reach).is_some();
        // Blocked only once the reachability budget ran out, not because the time bound did.
        let udp_blocked = !reach_answered && self.phase == Phase::Done && !self.bound_reached;
        let nat = self.nat_detected();
        let mut tests = Vec::new();
        let row = |name: &str, steps: &[Step], verdict: String, evidence: String| {
            let txs: Vec<&Tx> = self
                .txs
                .iter()
                .filter(|t| steps.contains(&t.step))
                .collect();
            let mut r = TestReport::over(name, verdict, evidence, txs.iter().map(|t| &t.sched));
            r.answers = (!txs.is_empty()).then(|| txs.iter().map(|t| t.answers()).sum());
            r
        };

        // 1. Reachability and NAT presence.
        let m1 = self.mapped_s0();
        let local = self.local_of(S0);
        tests.push(row(
            "udp reachability",
            &[Step::Reach, Step::LossSample],
            if reach_answered {
                "reachable".into()
            } else if udp_blocked {
                "blocked".into()
            } else {
                "unknown".into()
            },
            match self.first_answer(Step::Reach) {
                Some(r) => format!("answer from {}", show(r.source)),
                None if self.bound_reached => format!(
                    "no answer from {} before the time bound ({})",
                    self.cfg.server,
                    self.bound_phrase()
                ),
                None => format!("no answer from {} within the retry budget", self.cfg.server),
            },
        ));
        tests.push(row(
            "nat presence",
            &[],
            match nat {
                Some(true) => "nat".into(),
                Some(false) => "no nat".into(),
                None => "unknown".into(),
            },
            format!("local {} mapped {}", show(local), show(m1)),
        ));

        // 2. Mapping.
        let (mapping, mapping_evidence) = self.mapping_verdict(nat, m1);
        tests.push(row(
            "mapping",
            &[Step::Reach, Step::MapII, Step::MapIII],
            mapping.short().into(),
            self.why_unknown(mapping == Behavior::Unknown, mapping_evidence),
        ));

        // 3. Filtering.
        let (filtering, filtering_evidence, filt_miss) = self.filtering_verdict();
        let mut filtering_row = row(
            "filtering",
            &[Step::FiltII, Step::FiltIII, Step::FiltCtrl],
            filtering.short().into(),
            self.why_unknown(filtering == Behavior::Unknown, filtering_evidence),
        );
        filtering_row.miss_chance = filt_miss;
        tests.push(filtering_row);

        // 4. Hairpinning.
        let (hairpinning, hairpin_evidence, hp_miss) = self.hairpin_verdict(nat, m1);
        let mut hairpin_row = row(
            "hairpinning",
            &[Step::Hairpin, Step::HairpinCtrl],
            tri(hairpinning).into(),
            self.why_unknown(
                hairpinning.is_none() && self.cfg.hairpin && nat == Some(true),
                hairpin_evidence,
            ),
        );
        hairpin_row.miss_chance = hp_miss;
        tests.push(hairpin_row);

        // 5. Allocation, and the addresses the mappings got.
        let alloc = self.allocation();
        let addresses = self.mapped_addresses();
        let pooling = match (nat, addresses.len()) {
            (Some(true), 1) if self.mapped_answers() >= 2 => Some(AddressPooling::Paired),
            (Some(true), n) if n >= 2 => Some(AddressPooling::Arbitrary),
            _ => None,
        };
        let alloc_steps: Vec<Step> = (0..self.cfg.allocation_samples).map(Step::Alloc).collect();
        let preserved = match (m1, local) {
            (Some(m), Some(l)) if !alloc.samples.is_empty() => {
                Some(m.port() == l.port() && alloc.samples.iter().all(|(l, e)| l == e))
            }
            _ => None,
        };
        tests.push(row(
            "port allocation",
            &alloc_steps,
            match alloc.pattern {
                AllocationPattern::Sequential => {
                    format!("sequential (delta {})", alloc.delta.unwrap_or(0))
                }
                p => serde_plain(p),
            },
            if alloc.samples.is_empty() {
                format!("no samples; {}", alloc.predictability)
            } else {
                let pairs: Vec<String> = alloc
                    .samples
                    .iter()
                    .map(|(l, e)| format!("{l}→{e}"))
                    .collect();
                let pooled = if pooling == Some(AddressPooling::Arbitrary) {
                    let ips: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
                    format!(
                        "; mappings of this host got different external addresses ({}): pooling is arbitrary, not paired (RFC 4787 REQ-2), so a peer must guess the address as well as the port",
                        ips.join(", ")
                    )
                } else {
                    String::new()
                };
                format!(
                    "local→external {}; {}{pooled}",
                    pairs.join(" "),
                    alloc.predictability
                )
            },
        ));

        // 6. Server and path checks.
        tests.push(row(
            "server checks",
            &[],
            if !self.problems.is_empty() {
                format!(
                    "{} problem(s)",
                    self.problems.len() + self.problems_omitted as usize
                )
            } else if reach_answered {
                "ok".into()
            } else {
                "unknown".into()
            },
            if !reach_answered && self.problems.is_empty() {
                "no answers to check".into()
            } else if self.problems.is_empty() {
                format!(
                    "OTHER-ADDRESS {}, every answer from the expected address, RESPONSE-ORIGIN consistent",
                    show(self.other)
                )
            } else if self.problems_omitted > 0 {
                format!(
                    "{}; and {} more left out (at most {MAX_PROBLEMS} are listed)",
                    self.problems.join("; "),
                    self.problems_omitted
                )
            } else {
                self.problems.join("; ")
            },
        ));

        let classic = Classic::derive(udp_blocked, nat, mapping, filtering);
        let shape = NatShape {
            mapping,
            filtering,
            // A predicted port is of little use when the address it will be on is a guess too.
            predictable: matches!(
                alloc.pattern,
                AllocationPattern::Sequential | AllocationPattern::Preserving
            ) && pooling != Some(AddressPooling::Arbitrary),
        };
        let outlook = report::outlook(shape);
        let negative_confidence = [filt_miss, hp_miss]
            .into_iter()
            .flatten()
            .fold(None, |acc: Option<f64>, m| {
                Some(acc.unwrap_or(1.0) * (1.0 - m))
            });
        let budget = self
            .txs
            .iter()
            .filter(|t| matches!(t.state, TxState::GaveUp { .. }))
            .filter_map(|t| {
                Some(
                    t.sched
                        .done_at?
                        .saturating_duration_since(t.sched.first_sent?),
                )
            })
            .max()
            .map_or(0.0, ms);
        let summary = summarize(
            classic,
            mapping,
            filtering,
            port_phrases(&alloc, preserved, pooling),
            hairpinning,
            &outlook,
        );
        ProbeReport {
            schema: report::SCHEMA,
            natscope_version: crate::document::version(),
            local_address: local,
            public_address: m1,
            nat_detected: nat,
            udp_blocked,
            mapping,
            filtering,
            port_preservation: preserved,
            port_allocation: alloc,
            hairpinning,
            binding_lifetime_s: None,
            tcp_mapping: Behavior::Unknown,
            alg_detected: self.alg,
            classic,
            server: ServerReport {
                address: self.cfg.server,
                other_address: self.other,
                problems: self.problems.clone(),
                problems_omitted: self.problems_omitted,
            },
            tests,
            outlook,
            loss_estimate: self.evidence.loss(),
            negative_confidence,
            retry_budget_ms: budget,
            summary,
            requests_sent: self.requests_sent(),
            duration_ms: ms(end.saturating_duration_since(self.started)),
            pacing: self.cfg.pacing.clone(),
            address_pooling: pooling,
            tcp_port_preservation: None,
            max_time_ms: ms(self.cfg.max_time),
            time_bound_reached: self.bound_reached,
            loss_transmissions: self.evidence.transmissions(),
            port_mapping: None,
            double_nat: None,
            cgnat: None,
        }
    }

    /// The time bound in words, for evidence strings.
    fn bound_phrase(&self) -> String {
        format!(
            "--max-time {}",
            crate::probe::report::seconds(self.cfg.max_time)
        )
    }

    /// `evidence`, and when the verdict is `unknown` because the run hit its time bound, that too.
    fn why_unknown(&self, unknown: bool, evidence: String) -> String {
        if unknown && self.bound_reached {
            format!(
                "{evidence}; stopped at the time bound ({})",
                self.bound_phrase()
            )
        } else {
            evidence
        }
    }

    fn gave_up_miss(&self, step: Step) -> Option<f64> {
        self.txs
            .iter()
            .filter(|t| t.step == step)
            .find_map(|t| match t.state {
                TxState::GaveUp { miss } => Some(miss),
                _ => None,
            })
    }

    /// A negative is trusted only if its miss chance met the target and its group's liveness
    /// control was answered after it.
    fn confident_negative(&self, step: Step) -> Option<f64> {
        let ctrl = if step == Step::Hairpin {
            Step::HairpinCtrl
        } else {
            Step::FiltCtrl
        };
        self.gave_up_miss(step)
            .filter(|m| *m < self.cfg.timing.target_miss)
            .filter(|_| self.control_answered(ctrl))
    }

    /// The silence of `step` met the miss target but its liveness control went unanswered.
    fn liveness_failed(&self, step: Step, ctrl: Step) -> bool {
        self.gave_up_miss(step)
            .is_some_and(|m| m < self.cfg.timing.target_miss)
            && !self.control_answered(ctrl)
    }

    fn server_problem_for(&self, step: Step) -> bool {
        self.problem_steps.contains(&step_name(step))
    }

    fn mapping_verdict(&self, nat: Option<bool>, m1: Option<SocketAddr>) -> (Behavior, String) {
        let Some(m1) = m1 else {
            return (Behavior::Unknown, "no mapped address".into());
        };
        if self.usable_other().is_none() {
            return (
                Behavior::Unknown,
                "needs an RFC 5780 server with a second address".into(),
            );
        }
        let get = |s| self.first_answer(s).and_then(BindingResponse::reflexive);
        let (m2, m3) = (get(Step::MapII), get(Step::MapIII));
        let ev = format!(
            "via A1:P1 {m1}, via A2:P1 {}, via A2:P2 {}",
            show(m2),
            show(m3)
        );
        if nat == Some(false) {
            // No NAT: the mapping is the identity, which RFC 4787 counts as endpoint-independent.
            return if m2.is_none_or(|m| m == m1) {
                (Behavior::EndpointIndependent, format!("no nat: {ev}"))
            } else {
                (
                    Behavior::Unknown,
                    format!("mapped address changed without a nat: {ev}"),
                )
            };
        }
        match compare_mappings(m1, m2, m3) {
            (b, "") => (b, ev),
            (b, why) => (b, format!("{why}: {ev}")),
        }
    }

    fn filtering_verdict(&self) -> (Behavior, String, Option<f64>) {
        if self.usable_other().is_none() {
            return (
                Behavior::Unknown,
                "needs an RFC 5780 server with a second address".into(),
                None,
            );
        }
        if self.server_problem_for(Step::FiltII) || self.server_problem_for(Step::FiltIII) {
            return (
                Behavior::Unknown,
                "the server answered a change request from the wrong address".into(),
                None,
            );
        }
        // The alternate must be reachable at all, or silence says nothing about the NAT.
        if self.first_answer(Step::MapII).is_none() && self.first_answer(Step::MapIII).is_none() {
            return (
                Behavior::Unknown,
                "the server's alternate address never answered".into(),
                None,
            );
        }
        let ii = self.first_answer(Step::FiltII).is_some();
        let iii = self.first_answer(Step::FiltIII).is_some();
        let neg_ii = self.confident_negative(Step::FiltII);
        let neg_iii = self.confident_negative(Step::FiltIII);
        let o = self.other.map_or("-".into(), |o| o.to_string());
        let a1p2 = self.other.map_or("-".into(), |o| {
            SocketAddr::new(self.cfg.server.ip(), o.port()).to_string()
        });
        match (ii, iii) {
            (true, true) => (
                Behavior::EndpointIndependent,
                format!("answers from {o} (change ip+port) and {a1p2} (change port) both arrived"),
                None,
            ),
            (true, false) => (
                Behavior::Unknown,
                format!("inconsistent: {o} got through but {a1p2} did not"),
                None,
            ),
            (false, true) => match neg_ii {
                Some(m) => (
                    Behavior::AddressDependent,
                    format!(
                        "answer from {a1p2} (change port) arrived; from {o} (change ip+port) none"
                    ),
                    Some(m),
                ),
                None if self.liveness_failed(Step::FiltII, Step::FiltCtrl) => {
                    (Behavior::Unknown, LIVENESS_UNANSWERED.into(), None)
                }
                None => (
                    Behavior::Unknown,
                    "too much loss to conclude that the change ip+port answer was filtered".into(),
                    None,
                ),
            },
            (false, false) => match (neg_ii, neg_iii) {
                (Some(a), Some(b)) => (
                    Behavior::AddressAndPortDependent,
                    format!("no answer from {o} (change ip+port) nor {a1p2} (change port)"),
                    Some(1.0 - (1.0 - a) * (1.0 - b)),
                ),
                _ if self.liveness_failed(Step::FiltII, Step::FiltCtrl)
                    || self.liveness_failed(Step::FiltIII, Step::FiltCtrl) =>
                {
                    (Behavior::Unknown, LIVENESS_UNANSWERED.into(), None)
                }
                _ => (
                    Behavior::Unknown,
                    "too much loss to conclude that the change answers were filtered".into(),
                    None,
                ),
            },
        }
    }

    fn hairpin_verdict(
        &self,
        nat: Option<bool>,
        m1: Option<SocketAddr>,
    ) -> (Option<bool>, String, Option<f64>) {
        if !self.cfg.hairpin {
            return (None, "not tested (--no-hairpin)".into(), None);
        }
        match nat {
            None => return (None, "nat presence unknown".into(), None),
            Some(false) => return (None, "not applicable without a nat".into(), None),
            Some(true) => {}
        }
        let m1 = show(m1);
        if let Some(r) = self.first_answer(Step::Hairpin) {
            return (
                Some(true),
                format!(
                    "a request to {m1} from inside came back from {}",
                    show(r.source)
                ),
                None,
            );
        }
        match self.confident_negative(Step::Hairpin) {
            Some(m) => (
                Some(false),
                format!("a request to {m1} from inside never arrived"),
                Some(m),
            ),
            None if self.liveness_failed(Step::Hairpin, Step::HairpinCtrl) => {
                (None, LIVENESS_UNANSWERED.into(), None)
            }
            None => (None, "too much loss to conclude".into(), None),
        }
    }

    /// Answers that reported a mapped address.
    fn mapped_answers(&self) -> usize {
        self.txs
            .iter()
            .filter_map(|t| t.answer()?.reflexive())
            .count()
    }

    /// The distinct external addresses this host's mappings got, in the order first seen (every
    /// answered request counts: each shows its socket's mapping towards that server address).
    fn mapped_addresses(&self) -> Vec<IpAddr> {
        let mut seen = Vec::new();
        for a in self.txs.iter().filter_map(|t| t.answer()?.reflexive()) {
            if !seen.contains(&a.ip()) {
                seen.push(a.ip());
            }
        }
        seen
    }

    fn allocation(&self) -> PortAllocationReport {
        let samples: Vec<(u16, u16)> = (0..self.cfg.allocation_samples)
            .filter_map(|i| {
                let tx = self.txs.iter().find(|t| t.step == Step::Alloc(i))?;
                let ext = tx.answer()?.reflexive()?;
                Some((self.local_of(tx.socket)?.port(), ext.port()))
            })
            .collect();
        let unknown = |why: &str| PortAllocationReport {
            pattern: AllocationPattern::Unknown,
            delta: None,
            samples: samples.clone(),
            predictability: why.into(),
        };
        if samples.len() < 3 {
            return unknown("too few samples");
        }
        if samples.iter().all(|(l, e)| l == e) {
            return PortAllocationReport {
                pattern: AllocationPattern::Preserving,
                delta: None,
                samples,
                predictability: "the external port equals the local port".into(),
            };
        }
        let deltas: Vec<i32> = samples
            .windows(2)
            .map(|w| i32::from(w[1].1) - i32::from(w[0].1))
            .collect();
        if deltas.iter().all(|d| *d == deltas[0]) && deltas[0] != 0 {
            let d = deltas[0];
            let last = samples.last().map_or(0, |s| s.1);
            return PortAllocationReport {
                pattern: AllocationPattern::Sequential,
                delta: Some(d),
                predictability: format!(
                    "predictable: the next new mapping should get port {} (last {last} {} {})",
                    (i32::from(last) + d).rem_euclid(65536),
                    if d < 0 { '-' } else { '+' },
                    d.abs()
                ),
                samples,
            };
        }
        PortAllocationReport {
            pattern: AllocationPattern::Random,
            delta: None,
            samples,
            predictability: "unpredictable: consecutive mappings show no constant delta".into(),
        }
    }
}

impl ProbeMachine for Probe {
    fn socket_bound(&mut self, id: SocketId, local: SocketAddr) {
        Probe::socket_bound(self, id, local);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        Probe::poll_transmit(self, now)
    }
    fn handle_datagram(&mut self, now: Instant, socket: SocketId, from: SocketAddr, bytes: &[u8]) {
        Probe::handle_datagram(self, now, socket, from, bytes);
    }
    fn handle_timeout(&mut self, now: Instant) {
        Probe::handle_timeout(self, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Probe::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        Probe::is_done(self)
    }
}

/// Why a silence that met the miss target is still no verdict.
const LIVENESS_UNANSWERED: &str = "silent long enough, but the liveness control (a plain Binding request to the primary address on the same socket, sent after the last request) was never answered, so the silence may be a stalled host rather than the nat";

fn step_name(s: Step) -> &'static str {
    match s {
        Step::Reach => "reachability",
        Step::LossSample => "loss sample",
        Step::MapII => "mapping test II",
        Step::MapIII => "mapping test III",
        Step::FiltII => "filtering test II",
        Step::FiltIII => "filtering test III",
        Step::Hairpin => "hairpinning",
        Step::FiltCtrl => "filtering liveness control",
        Step::HairpinCtrl => "hairpinning liveness control",
        Step::Alloc(_) => "allocation",
    }
}

fn show(a: Option<SocketAddr>) -> String {
    a.map_or("-".into(), |a| a.to_string())
}

fn tri(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}

fn serde_plain(p: AllocationPattern) -> String {
    match p {
        AllocationPattern::Preserving => "preserving",
        AllocationPattern::Sequential => "sequential",
        AllocationPattern::Random => "random",
        AllocationPattern::Unknown => "unknown",
    }
    .into()
}

/// Peer text for a report line: control characters escaped.
fn escape(s: &str) -> String {
    s.chars()
        .take(128)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The summary's words on ports and addresses.
fn port_phrases(
    alloc: &PortAllocationReport,
    preserved: Option<bool>,
    pooling: Option<AddressPooling>,
) -> Vec<String> {
    let mut parts = Vec::new();
    match (preserved, alloc.pattern) {
        (Some(true), _) => parts.push("ports preserved".into()),
        (_, AllocationPattern::Sequential) => parts.push(format!(
            "sequential ports (delta {})",
            alloc.delta.unwrap_or(0)
        )),
        (_, AllocationPattern::Random) => parts.push("random ports".into()),
        _ => {}
    }
    if pooling == Some(AddressPooling::Arbitrary) {
        parts.push("external addresses pooled arbitrarily".into());
    }
    parts
}

fn summarize(
    classic: Classic,
    mapping: Behavior,
    filtering: Behavior,
    ports: Vec<String>,
    hairpin: Option<bool>,
    outlook: &[report::OutlookRow],
) -> String {
    let abbrev = |b: Behavior, suffix: &str| match b {
        Behavior::EndpointIndependent => format!("EI{suffix}"),
        Behavior::AddressDependent => format!("AD{suffix}"),
        Behavior::AddressAndPortDependent => format!("APD{suffix}"),
        Behavior::Unknown => format!("?{suffix}"),
    };
    let mut parts = vec![format!(
        "{} ({} + {})",
        classic.describe(),
        abbrev(mapping, "M"),
        abbrev(filtering, "F")
    )];
    parts.extend(ports);
    match hairpin {
        Some(true) => parts.push("hairpinning".into()),
        Some(false) => parts.push("no hairpinning".into()),
        None => {}
    }
    let yes: Vec<&str> = outlook
        .iter()
        .filter(|r| r.direct_udp == "yes")
        .map(|r| r.peer)
        .collect();
    let no: Vec<&str> = outlook
        .iter()
        .filter(|r| r.direct_udp == "no")
        .map(|r| r.peer)
        .collect();
    let tail = if outlook.iter().all(|r| r.direct_udp == "unknown") {
        "peer-to-peer outlook unknown".to_string()
    } else if no.is_empty() {
        "direct connections should work with every common NAT".into()
    } else if yes.is_empty() {
        "direct connections are unlikely; expect to need a relay".into()
    } else {
        format!(
            "direct connections work with most peers, not with {}",
            no.join(" or ")
        )
    };
    format!("{} — {tail}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    use crate::client::binding_success as answer;

    /// Someone who sees the probe's transaction IDs answers the first request from 20,000
    /// addresses: the report keeps [`MAX_PROBLEMS`] lines and counts the rest, a repeat is not
    /// counted twice, and a test's problem still withholds its verdict once the list is full.
    #[test]
    fn a_flood_of_wrong_origin_answers_keeps_the_problem_list_bounded() {
        let t0 = Instant::now();
        let server: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let mut p = Probe::new(t0, ProbeConfig::new(server));
        let local: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        p.socket_bound(S0, local);
        let first = p.poll_transmit(t0).expect("the first reachability request");
        let tid = Message::parse(&first.payload).unwrap().transaction_id();
        let flood: u32 = 20_000;
        let from = |i: u32| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i)), 3478);
        for i in 0..flood {
            p.handle_datagram(t0, S0, from(i), &answer(&tid, local));
        }
        let r = p.report();
        assert_eq!(r.server.problems.len(), MAX_PROBLEMS, "{:?}", r.server);
        assert_eq!(
            r.server.problems_omitted,
            flood - MAX_PROBLEMS as u32,
            "every distinct problem past the cap is counted"
        );
        // A repeat of a listed problem is the same problem, not a new one.
        p.handle_datagram(t0, S0, from(0), &answer(&tid, local));
        assert_eq!(
            p.report().server.problems_omitted,
            flood - MAX_PROBLEMS as u32
        );
        let checks = r.tests.iter().find(|t| t.name == "server checks").unwrap();
        assert_eq!(checks.verdict, format!("{flood} problem(s)"));
        assert!(
            checks.evidence.ends_with(&format!(
                "and {} more left out (at most 16 are listed)",
                flood - 16
            )),
            "{}",
            checks.evidence
        );
        // None of them was an answer: the request is still open, and the filtering tests had no
        // problem yet; one that comes now, with the list full, still withholds their verdict.
        assert!(p.txs[0].pending());
        assert!(!p.server_problem_for(Step::FiltII));
        p.problem(Some(Step::FiltII), "filtering test II: a problem".into());
        assert!(p.server_problem_for(Step::FiltII));
        assert_eq!(p.problems.len(), MAX_PROBLEMS);
    }

    /// A driver that wakes the machine late (a loaded host) cannot stretch the bound: the run
    /// ends at the bound, and an answer handed over after it is not taken into account.
    #[test]
    fn a_late_driver_cannot_stretch_the_time_bound() {
        let t0 = Instant::now();
        let server: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let mut cfg = ProbeConfig::new(server);
        cfg.max_time = Duration::from_millis(500);
        let local: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        for late_timer in [false, true] {
            let mut p = Probe::new(t0, cfg.clone());
            p.socket_bound(S0, local);
            let first = p.poll_transmit(t0).expect("a first request");
            let tid = Message::parse(&first.payload).unwrap().transaction_id();
            assert_eq!(p.poll_timeout().map(|t| t <= t0 + cfg.max_time), Some(true));
            let late = t0 + Duration::from_millis(1700);
            assert!(
                p.poll_transmit(late).is_none(),
                "nothing leaves after the bound"
            );
            if late_timer {
                p.handle_timeout(late);
            }
            p.handle_datagram(late, S0, server, &answer(&tid, local));
            assert!(p.is_done());
            let r = p.report();
            assert!(r.time_bound_reached);
            assert_eq!(r.duration_ms, 500.0, "late timer {late_timer}");
            assert_eq!(r.public_address, None, "the answer came after the bound");
            assert!(!r.udp_blocked);
            assert_eq!(r.tests[0].verdict, "unknown");
        }
    }
}
