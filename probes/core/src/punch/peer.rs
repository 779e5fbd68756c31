//! What the two peer machines — the [`Listener`](super::listener::Listener) and the
//! [`Connector`](super::connector::Connector) — share: their error type, one request to the
//! rendezvous server retransmitted until answered, port prediction's measurement
//! ([`PortMeasurement`]), the addresses a session probes (the peer's candidates, ports predicted
//! from its allocation delta, birthday ports), and the commands that
//! ask a driver to open or stop a direct TCP stream (RFC 5382 simultaneous open needs the
//! driver's sockets; when to try, how long each attempt may take, when to retry, and which stream
//! to keep, are decided here: [`OpenAttempts`] paces the driver's connects).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::codec::{PeerInfo, PunchMessage};
use super::identity::PeerKey;
use super::session::SessionConfig;
use super::{SessionId, Transport};
use crate::client::{
    build_request, AnswerFrom, RequestOptions, Rto, Transaction, TransactionEvent,
};
use crate::net::Transmit;
use crate::stun::TransactionId;

use super::codec::COOKIE_LEN;

/// Errors of the punch peers. `exit_code` maps them onto natscope's 1/2 convention.
#[derive(Debug, thiserror::Error)]
pub enum PunchError {
    #[error("rendezvous server {0} is unreachable over {1} (no answer within {2:?}); is `natscope punch serve` running there?")]
    Unreachable(SocketAddr, Transport, Duration),
    #[error("rendezvous server {0} is unreachable over tcp (connection refused); is `natscope punch serve` running there?")]
    ConnectionRefused(SocketAddr),
    #[error("rendezvous server {0} refused: {1}")]
    Refused(SocketAddr, String),
    #[error("no peer registered as `{0}` at {1} over {2}")]
    UnknownPeer(String, SocketAddr, Transport),
    #[error("rendezvous server {0} stopped answering (killed or unreachable) for {1:.1?}")]
    ServerGone(SocketAddr, Duration),
    #[error("rendezvous server {0} closed the connection")]
    ServerClosed(SocketAddr),
    #[error("rendezvous server {1} introduced `{0}` with key {2}, not the --peer-key {3}: refusing (the id is held by someone else, or the server substitutes peers)")]
    WrongKey(String, SocketAddr, PeerKey, PeerKey),
    #[error("rendezvous server {0} does not vouch for any key for `{1}` (an old server?); pass --peer-key")]
    NoKey(SocketAddr, String),
    #[error("gave up after {0:?} with {1} of {2} sessions served")]
    ListenTimeout(Duration, u64, u64),
    /// A socket error in the driver (the machines themselves never produce one).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl PunchError {
    /// 1: the check ran and the session failed; 2: could not run (server unreachable, I/O).
    pub fn exit_code(&self) -> u8 {
        match self {
            PunchError::Unreachable(..)
            | PunchError::ConnectionRefused(_)
            | PunchError::Refused(..)
            | PunchError::Io(_) => 2,
            _ => 1,
        }
    }
}

/// How many predicted ports (peer_port + k·delta, k = 1..=PREDICT_STEPS) a peer probes.
pub const PREDICT_STEPS: i32 = 16;

/// Port prediction as measured by the driver: the mapped ports of fresh sockets, in the order
/// they were opened, and the allocation delta they show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Prediction {
    pub measured_ports: Vec<u16>,
    pub delta: Option<i32>,
    /// How many ports the peer probes ahead of our server-reflexive port.
    pub predicted_ports: usize,
}

impl Prediction {
    /// The prediction from the mapped ports of consecutive fresh sockets (three, or fewer when
    /// a measurement failed): a constant, small, non-zero difference is a sequential NAT's delta.
    pub fn from_ports(measured_ports: Vec<u16>) -> Self {
        let delta = match measured_ports[..] {
            [a, b, c] => {
                let d1 = i32::from(b) - i32::from(a);
                let d2 = i32::from(c) - i32::from(b);
                (d1 == d2 && d1 != 0 && d1.abs() <= 64).then_some(d1)
            }
            _ => None,
        };
        Self {
            measured_ports,
            delta,
            predicted_ports: 0,
        }
    }
}

/// Fresh sockets port prediction measures with: three mapped ports give two differences.
pub const MEASURE_SOCKETS: usize = 3;
/// Each measuring socket's Binding request goes three times, 300 ms apart, and waits 300 ms after
/// the last (900 ms in all).
const MEASURE_RTO: Rto = Rto {
    initial: Duration::from_millis(300),
    max_transmits: 3,
    last_wait_multiplier: 1,
    max_rto: Duration::from_millis(300),
};

/// Port prediction's measurement (RFC 4787 §4.1, port assignment), as a machine with no I/O:
/// fresh sockets, one after another, send the rendezvous server a Binding request (RFC 8489; the
/// server answers it with XOR-MAPPED-ADDRESS) and read the mapping it saw. Each socket's request is
/// one [`Transaction`], so only the answer to that socket's transaction, from the server itself,
/// counts; a socket that gets none ends the measurement with the ports it has. Transmits name
/// their socket by index, `0..MEASURE_SOCKETS`, which the driver binds fresh.
#[derive(Debug)]
pub struct PortMeasurement {
    server: SocketAddr,
    tids: [TransactionId; MEASURE_SOCKETS],
    socket: usize,
    tx: Transaction,
    ports: Vec<u16>,
    out: VecDeque<Transmit<usize>>,
    done: bool,
}

impl PortMeasurement {
    pub fn new(now: Instant, server: SocketAddr, rng: &mut impl Rng) -> Self {
        let tids: [TransactionId; MEASURE_SOCKETS] =
            std::array::from_fn(|_| TransactionId::from_rng(rng));
        let mut m = Self {
            server,
            tids,
            socket: 0,
            tx: Transaction::new(now, tids[0], AnswerFrom::Exactly(server), MEASURE_RTO),
            ports: Vec::new(),
            out: VecDeque::new(),
            done: false,
        };
        m.handle_timeout(now);
        m
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit<usize>> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            None
        } else {
            self.tx.poll_timeout()
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.done {
            return;
        }
        if self.tx.poll_transmit(now) {
            let mut buf = [0u8; 64];
            match build_request(
                &mut buf,
                &self.tx.transaction_id(),
                &RequestOptions::default(),
            ) {
                Ok(n) => self.out.push_back(Transmit {
                    source: self.socket,
                    destination: self.server,
                    payload: buf[..n].to_vec(),
                }),
                Err(_) => self.done = true,
            }
        }
        self.tx.handle_timeout(now);
        if matches!(self.tx.event(), TransactionEvent::TimedOut { .. }) {
            self.done = true;
        }
    }

    /// A datagram that arrived on measuring socket `socket` from `from`.
    pub fn handle_datagram(&mut self, now: Instant, socket: usize, from: SocketAddr, bytes: &[u8]) {
        if self.done || socket != self.socket || !self.tx.handle_datagram(from, bytes) {
            return;
        }
        let TransactionEvent::Done(r) = self.tx.event() else {
            return;
        };
        let Some(mapped) = r.xor_mapped else {
            // An error answer, or one without the mapping: nothing to measure with.
            self.done = true;
            return;
        };
        self.ports.push(mapped.port());
        if self.socket + 1 == MEASURE_SOCKETS {
            self.done = true;
            return;
        }
        self.socket += 1;
        self.tx = Transaction::new(
            now,
            self.tids[self.socket],
            AnswerFrom::Exactly(self.server),
            MEASURE_RTO,
        );
        self.handle_timeout(now);
    }

    /// Whether socket `socket` is the one measuring now (the one an answer can arrive on).
    pub fn is_measuring(&self, socket: usize) -> bool {
        !self.done && socket == self.socket
    }

    /// The prediction, once the measurement is over.
    pub fn result(&self) -> Option<Prediction> {
        self.done
            .then(|| Prediction::from_ports(self.ports.clone()))
    }
}

/// The peer's server-reflexive port advanced by its delta, up to [`PREDICT_STEPS`] times.
fn predicted(peer: &PeerInfo) -> Vec<SocketAddr> {
    let Some(d) = peer.port_delta else {
        return Vec::new();
    };
    (1..=PREDICT_STEPS)
        .filter_map(|k| {
            let p = i32::from(peer.reflexive.port()) + k * d;
            u16::try_from(p)
                .ok()
                .filter(|p| *p >= 1024)
                .map(|p| SocketAddr::new(peer.reflexive.ip(), p))
        })
        .collect()
}

/// Where a session probes: the server-reflexive address first, then local candidates, then
/// predicted ports.
pub fn targets(peer: &PeerInfo) -> Vec<SocketAddr> {
    let mut t = vec![peer.reflexive];
    t.extend(peer.candidates.iter().copied());
    t.extend(predicted(peer));
    t
}

/// Birthday targets: `n` distinct random ports on the peer's IP (excluding what is already probed).
pub fn birthday_targets(peer: &PeerInfo, n: usize, rng: &mut impl Rng) -> Vec<SocketAddr> {
    if n == 0 {
        return Vec::new();
    }
    let span = usize::from(u16::MAX) - 1024 + 1;
    rand::seq::index::sample(rng, span, n.min(span))
        .into_iter()
        .filter_map(|i| u16::try_from(1024 + i).ok())
        .filter(|p| *p != peer.reflexive.port())
        .map(|p| SocketAddr::new(peer.reflexive.ip(), p))
        .collect()
}

/// Whether our allocation looked random: three fresh sockets' mapped ports with no delta between
/// them (a sequential NAT has one; a preserving one is seen by the reflexive port itself).
pub fn random_allocation(p: Option<&Prediction>) -> bool {
    p.is_some_and(|p| p.measured_ports.len() == MEASURE_SOCKETS && p.delta.is_none())
}

/// This side's part in the birthday technique for a session with `peer`
/// ([`super::session::Birthday`]), from what each side knows without asking the other: a side
/// whose server-reflexive port is its socket's own port keeps ports (an endpoint-independent
/// NAT in practice, or none) and is *easy*; one whose fresh sockets got unrelated ports
/// (`random`, no delta) and whose port was not kept is *hard*. The peer's ports: its host
/// candidate against its reflexive address; no delta from it and no kept port makes it hard.
/// Both easy or both hard: no part (the plain punch, prediction or the relay decide). `probes`:
/// random ports the easy side tries (the hard side opens [`super::session::BIRTHDAY_SOCKETS`]).
pub fn birthday_part(
    local: SocketAddr,
    reflexive: SocketAddr,
    random: bool,
    peer: &PeerInfo,
    probes: usize,
    rng: &mut impl Rng,
) -> Option<super::session::Birthday> {
    use super::session::Birthday;
    let me_easy = reflexive.port() == local.port();
    let me_hard = !me_easy && random;
    let peer_easy = peer
        .candidates
        .iter()
        .any(|c| c.port() == peer.reflexive.port() && c.is_ipv4() == peer.reflexive.is_ipv4());
    let peer_hard = !peer_easy && peer.port_delta.is_none();
    if me_hard && peer_easy {
        Some(Birthday::Hard { to: peer.reflexive })
    } else if me_easy && peer_hard {
        Some(Birthday::Easy {
            targets: birthday_targets(peer, probes, rng),
        })
    } else {
        None
    }
}

/// Random ports the easy side probes: enough for a 95 % chance against
/// [`super::session::BIRTHDAY_SOCKETS`] mappings (`traversal::birthday_probes_for`).
pub fn birthday_probes() -> usize {
    crate::traversal::birthday_probes_for(0.95) as usize
}

/// The session settings of a peer: UDP sessions probe; over TCP the driver opens the stream.
pub(crate) fn session_config(
    transport: Transport,
    relay_first: bool,
    window: Duration,
) -> SessionConfig {
    SessionConfig {
        relay_first,
        probe: transport == Transport::Udp,
        punch_window: window,
        ..SessionConfig::default()
    }
}

/// What a machine asks its driver to do with direct TCP streams (RFC 5382 simultaneous open from
/// the registered port). The driver reports back with the machine's `handle_stream_*` inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamCommand {
    /// Connect to `peer` from the registered port from `start` until `until`, the attempts
    /// paced by [`OpenAttempts`]; report a stream that came up or the attempts that failed.
    Open {
        session: SessionId,
        peer: SocketAddr,
        start: Instant,
        until: Instant,
    },
    /// Stop the attempts of `session`: it has its direct stream.
    Stop { session: SessionId },
}

/// The interface a driver runs either peer through: datagrams and stream reports in, transmits,
/// stream commands and a timeout out (DESIGN.md, "sans-IO at the core").
pub trait PeerMachine {
    fn poll_transmit(&mut self) -> Option<Transmit<SocketAddr>>;
    fn poll_stream(&mut self) -> Option<StreamCommand>;
    /// The hard side's birthday opening ([`super::session::BirthdayOpen`]): the driver opens one
    /// socket per payload, sends it from there, feeds what those sockets receive like any
    /// datagram, and sends to each source from the socket it arrived on.
    fn poll_birthday(&mut self) -> Option<super::session::BirthdayOpen> {
        None
    }
    /// When [`PeerMachine::handle_timeout`] must run next; `None`: only input wakes it.
    fn poll_timeout(&self) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant);
    /// A datagram (UDP) or one framed message (TCP) from `from`.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]);
    /// The attempts of [`StreamCommand::Open`] for `session` opened a stream to `peer`, after
    /// `attempts` connects; the driver now sends to `peer` on it.
    fn handle_stream_up(
        &mut self,
        now: Instant,
        session: SessionId,
        peer: SocketAddr,
        attempts: u32,
    );
    /// The attempts ran out of window after `attempts` connects.
    fn handle_stream_failed(&mut self, now: Instant, attempts: u32);
    /// The registered port accepted a connection from `peer`: `true` if the driver must take it
    /// as a session's direct stream, `false` to drop it.
    fn handle_accepted(&mut self, now: Instant, peer: SocketAddr) -> bool;
    /// The stream to `addr` (the server's or a peer's) closed.
    fn handle_stream_down(&mut self, now: Instant, addr: SocketAddr);
}

/// Each session's direct-open target and window end, so a stream that closed before it was
/// confirmed is tried again while the window lasts.
#[derive(Debug, Default)]
pub(crate) struct DirectStreams {
    windows: HashMap<SessionId, (SocketAddr, Instant)>,
    out: VecDeque<StreamCommand>,
}

impl DirectStreams {
    pub(crate) fn open(
        &mut self,
        session: SessionId,
        peer: SocketAddr,
        start: Instant,
        until: Instant,
    ) {
        self.windows.insert(session, (peer, until));
        self.out.push_back(StreamCommand::Open {
            session,
            peer,
            start,
            until,
        });
    }

    pub(crate) fn stop(&mut self, session: SessionId) {
        self.windows.remove(&session);
        self.out.push_back(StreamCommand::Stop { session });
    }

    /// A stream to `peer` closed before it carried anything of its session (the peer's kernel
    /// completed the handshake on its listening socket, then the peer refused the stream because
    /// it came from an unexpected address): try again shortly while the window lasts.
    pub(crate) fn retry(&mut self, now: Instant, peer: SocketAddr) {
        let found = self
            .windows
            .iter()
            .find(|(_, (p, _))| *p == peer)
            .map(|(id, (_, until))| (*id, *until));
        if let Some((session, until)) = found {
            let start = now + RETRY_AFTER_RESET;
            if start < until {
                self.open(session, peer, start, until);
            }
        }
    }

    pub(crate) fn poll(&mut self) -> Option<StreamCommand> {
        self.out.pop_front()
    }
}

/// Longest one simultaneous-open connect waits for its handshake before the next attempt: a SYN
/// that a NAT dropped silently (RFC 5382 REQ-4 allows the peer's NAT to drop our SYN until its
/// own SYN has gone out) is not retransmitted by the kernel for a second, so a fresh attempt
/// sooner puts a new SYN on the wire while the peer's mapping is open.
pub const CONNECT_ATTEMPT: Duration = Duration::from_millis(700);
/// Pause after an attempt ended with RST (the peer's SYN was not out yet, or its NAT refused
/// ours) before the next one.
pub const RETRY_AFTER_RESET: Duration = Duration::from_millis(40);
/// Pause after the registered port could not be bound for an attempt (the previous attempt's
/// socket still held it).
pub const RETRY_AFTER_BIND_ERROR: Duration = Duration::from_millis(50);

/// How one connect attempt of [`OpenAttempts`] ended without a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The socket could not be bound to the registered port.
    BindFailed,
    /// The connect failed, usually with RST (the peer's SYN was not out yet, or its NAT answers
    /// unsolicited SYNs with RST).
    Refused,
    /// The attempt's time ([`OpenAttempts::next`]) ran out.
    TimedOut,
}

/// The pacing of one [`StreamCommand::Open`]'s simultaneous-open attempts (RFC 5382): the driver
/// asks [`next`](Self::next) whether to connect and for how long, and, when an attempt ends
/// without a stream, [`pause`](Self::pause) how long to wait before asking again. No I/O and no
/// clock: the driver passes `now`.
#[derive(Clone, Debug)]
pub struct OpenAttempts {
    until: Instant,
    attempts: u32,
}

impl OpenAttempts {
    /// Attempts that may start until `until` (the end of the punch window).
    pub fn new(until: Instant) -> Self {
        Self { until, attempts: 0 }
    }

    /// At `now`: how long the next connect attempt may take (counted as an attempt), or `None`
    /// once the window is over.
    pub fn next(&mut self, now: Instant) -> Option<Duration> {
        let left = self
            .until
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())?;
        self.attempts += 1;
        Some(left.min(CONNECT_ATTEMPT))
    }

    /// How long to wait after an attempt ended with `end` before asking [`next`](Self::next)
    /// again: a timed-out attempt is followed at once, a refused one shortly.
    pub fn pause(&self, end: AttemptEnd) -> Duration {
        match end {
            AttemptEnd::BindFailed => RETRY_AFTER_BIND_ERROR,
            AttemptEnd::Refused => RETRY_AFTER_RESET,
            AttemptEnd::TimedOut => Duration::ZERO,
        }
    }

    /// Connect attempts started so far (bind failures included).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// One request to the rendezvous server, retransmitted (UDP: 250 ms doubling to 1 s; TCP: sent
/// once, the stream is reliable) until an answer with its transaction id arrives or `wait` passes.
#[derive(Debug)]
pub(crate) struct Request {
    tid: TransactionId,
    bytes: Vec<u8>,
    wait: Duration,
    deadline: Instant,
    next: Instant,
    rto: Duration,
    transport: Transport,
}

impl Request {
    /// `None` when the message cannot be encoded (an id or candidate list out of bounds).
    pub(crate) fn new(
        now: Instant,
        msg: &PunchMessage,
        wait: Duration,
        transport: Transport,
    ) -> Option<Self> {
        // A zero cookie until the server hands out one: it keeps the request at least as large
        // as the server's challenge, which is then all a first request gets over UDP.
        let bytes = super::codec::with_cookie(&msg.to_vec().ok()?, &[0; COOKIE_LEN])?;
        Some(Self {
            tid: msg.tid(),
            bytes,
            wait,
            deadline: now + wait,
            next: now,
            rto: Duration::from_millis(250),
            transport,
        })
    }

    /// Whether `m` answers this request.
    pub(crate) fn answered_by(&self, m: &PunchMessage) -> bool {
        m.tid() == self.tid
    }

    /// The server's cookie challenge (`raw` decoded as `m`, an answer to this request): takes
    /// the cookie and makes the request due again at once. The one place the peers handle the
    /// server's return-routability check (issue 14); `false` for any other answer.
    pub(crate) fn on_challenge(&mut self, now: Instant, raw: &[u8], m: &PunchMessage) -> bool {
        let Some(c) = super::codec::challenged(raw, m) else {
            return false;
        };
        if let Some(b) = super::codec::replace_cookie(&self.bytes, &c) {
            // A duplicated challenge (the same cookie again) changes nothing.
            if b != self.bytes {
                self.bytes = b;
                self.next = now;
            }
        }
        true
    }

    /// The bytes to (re)send at `now`, or `Err(wait)` once the wait is over unanswered.
    pub(crate) fn poll(&mut self, now: Instant) -> Result<Option<Vec<u8>>, Duration> {
        if now >= self.deadline {
            return Err(self.wait);
        }
        if now < self.next {
            return Ok(None);
        }
        self.next = match self.transport {
            Transport::Udp => now + self.rto,
            Transport::Tcp => self.deadline,
        };
        self.rto = (self.rto * 2).min(Duration::from_secs(1));
        Ok(Some(self.bytes.clone()))
    }

    pub(crate) fn poll_timeout(&self) -> Instant {
        self.next.min(self.deadline)
    }
}

// ---------------------------------------------------------------------------------------------
// Both address families (issue 13)

/// Which address families a peer punches over: `--family 4|6|both`. A session probes a target
/// only when its family is allowed here *and* the driver has a socket of that family (the
/// driver narrows this set to the sockets it could open, [`DualStack::families`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeFamilies {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl ProbeFamilies {
    pub const BOTH: Self = Self {
        ipv4: true,
        ipv6: true,
    };
    pub const IPV4: Self = Self {
        ipv4: true,
        ipv6: false,
    };
    pub const IPV6: Self = Self {
        ipv4: false,
        ipv6: true,
    };

    /// `4`, `6` or `both` (also `ipv4`, `ipv6`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "4" | "ipv4" => Ok(Self::IPV4),
            "6" | "ipv6" => Ok(Self::IPV6),
            "both" => Ok(Self::BOTH),
            _ => Err(format!("{s:?}: expected 4, 6 or both")),
        }
    }

    pub fn allows(self, a: SocketAddr) -> bool {
        if a.is_ipv4() {
            self.ipv4
        } else {
            self.ipv6
        }
    }

    /// Both sets at once (the families asked for and the families the driver has sockets for).
    pub fn and(self, o: Self) -> Self {
        Self {
            ipv4: self.ipv4 && o.ipv4,
            ipv6: self.ipv6 && o.ipv6,
        }
    }
}

impl Default for ProbeFamilies {
    fn default() -> Self {
        Self::BOTH
    }
}

/// A peer's second address family, as its driver found it (issue 13): the families it may punch
/// over and the candidates of its other socket. The machines stay one-socket-agnostic: a
/// `Transmit`'s source is the main socket's address, and the driver sends each datagram from its
/// socket of the destination's family, so only the candidate lists and the probe filter know
/// about the second family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DualStack {
    /// The families this side punches over: `--family`, narrowed to the sockets the driver has.
    /// `None`: only the rendezvous server's family (a peer without a second socket).
    pub families: Option<ProbeFamilies>,
    /// The other socket's candidates: its host address (a global one, the address it is bound
    /// to) and its server-reflexive address when the server was reachable over that family
    /// (behind NPTv6 only the latter reaches this host).
    pub candidates: Vec<SocketAddr>,
}

impl DualStack {
    /// The candidates this side announces: `ours` (the main socket's, in order: its port mapping,
    /// then its host address, [`super::mapping::candidates`]) and the other socket's, those of
    /// excluded families left out, no duplicates, the codec's limit kept (CANDIDATE×≤8).
    pub fn announce(&self, ours: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
        let allowed = |a: &SocketAddr| self.families.is_none_or(|f| f.allows(*a));
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in ours.into_iter().chain(self.candidates.iter().copied()) {
            if allowed(&a) && !out.contains(&a) && out.len() < super::MAX_CANDIDATES {
                out.push(a);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// The birthday roles come from what each side sees of itself and of the peer: a kept port is
    /// easy, random fresh ports without a kept port are hard; both hard or both easy: none.
    #[test]
    fn birthday_roles_pair_a_random_side_with_a_port_keeping_one() {
        use super::super::session::Birthday;
        let sa = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let peer = |reflexive: &str, host: &str, delta: Option<i32>| PeerInfo {
            reflexive: sa(reflexive),
            candidates: vec![sa(host)],
            port_delta: delta,
            punch_window_ms: None,
            key: None,
        };
        let keeps = peer("203.0.113.2:5000", "10.2.0.2:5000", None);
        let random = peer("203.0.113.2:41234", "10.2.0.2:5000", None);
        let sequential = peer("203.0.113.2:41234", "10.2.0.2:5000", Some(1));
        let rng = &mut StdRng::seed_from_u64(3);
        let (local, kept, moved) = (
            sa("10.1.0.2:4000"),
            sa("203.0.113.1:4000"),
            sa("203.0.113.1:1717"),
        );
        // We allocate at random and the peer keeps ports: we open the sockets towards it.
        assert_eq!(
            birthday_part(local, moved, true, &keeps, 754, rng),
            Some(Birthday::Hard {
                to: keeps.reflexive
            })
        );
        // We keep ports and the peer does not (no delta): we probe its address's random ports.
        match birthday_part(local, kept, false, &random, 754, rng) {
            Some(Birthday::Easy { targets }) => {
                assert_eq!(targets.len(), 754);
                assert!(targets.iter().all(|t| t.ip() == random.reflexive.ip()));
                assert!(!targets.contains(&random.reflexive));
            }
            other => panic!("{other:?}"),
        }
        // A sequential peer is prediction's; two random sides or two keeping sides: nothing.
        assert_eq!(
            birthday_part(local, kept, false, &sequential, 754, rng),
            None
        );
        assert_eq!(birthday_part(local, moved, true, &random, 754, rng), None);
        assert_eq!(birthday_part(local, kept, false, &keeps, 754, rng), None);
        // Without a measurement we cannot call ourselves random.
        assert_eq!(birthday_part(local, moved, false, &keeps, 754, rng), None);
    }

    /// Runs `OpenAttempts` over a window of `window_ms` against a peer whose every attempt ends
    /// with `end` (a timed-out attempt takes its whole time, a reset one 1 ms): the start of each
    /// attempt and its time limit, in ms from the start.
    fn attempts_against(window_ms: u64, end: AttemptEnd) -> (Vec<(u64, u64)>, u32) {
        let t0 = Instant::now();
        let mut a = OpenAttempts::new(t0 + Duration::from_millis(window_ms));
        let mut now = t0;
        let mut seen = Vec::new();
        while let Some(limit) = a.next(now) {
            seen.push(((now - t0).as_millis() as u64, limit.as_millis() as u64));
            now += match end {
                AttemptEnd::TimedOut => limit,
                _ => Duration::from_millis(1),
            };
            now += a.pause(end);
        }
        (seen, a.attempts())
    }

    #[test]
    fn silent_drops_get_a_fresh_attempt_every_700_ms_until_the_window_ends() {
        let (seen, n) = attempts_against(1500, AttemptEnd::TimedOut);
        assert_eq!(seen, [(0, 700), (700, 700), (1400, 100)]);
        assert_eq!(n, 3);
    }

    #[test]
    fn a_refused_attempt_is_retried_after_40_ms_and_a_bind_failure_after_50() {
        let (seen, n) = attempts_against(100, AttemptEnd::Refused);
        assert_eq!(seen, [(0, 100), (41, 59), (82, 18)]);
        assert_eq!(n, 3);
        let (seen, _) = attempts_against(120, AttemptEnd::BindFailed);
        assert_eq!(seen, [(0, 120), (51, 69), (102, 18)]);
    }

    #[test]
    fn no_attempt_starts_once_the_window_is_over() {
        let t0 = Instant::now();
        let mut a = OpenAttempts::new(t0);
        assert_eq!(a.next(t0), None);
        assert_eq!(a.next(t0 + Duration::from_millis(5)), None);
        assert_eq!(a.attempts(), 0);
    }

    fn info(reflexive: &str, delta: Option<i32>) -> PeerInfo {
        PeerInfo {
            reflexive: reflexive.parse().expect("addr"),
            candidates: vec!["10.2.0.2:5000".parse().expect("addr")],
            port_delta: delta,
            punch_window_ms: None,
            key: None,
        }
    }

    #[test]
    fn a_constant_small_step_is_a_delta_and_anything_else_is_not() {
        assert_eq!(
            Prediction::from_ports(vec![4000, 4002, 4004]).delta,
            Some(2)
        );
        assert_eq!(
            Prediction::from_ports(vec![4000, 3999, 3998]).delta,
            Some(-1)
        );
        assert_eq!(Prediction::from_ports(vec![4000, 4002, 4005]).delta, None);
        assert_eq!(Prediction::from_ports(vec![4000, 4000, 4000]).delta, None);
        assert_eq!(Prediction::from_ports(vec![4000, 4100, 4200]).delta, None);
        assert_eq!(Prediction::from_ports(vec![4000, 4002]).delta, None);
    }

    #[test]
    fn targets_lead_with_the_reflexive_address_then_candidates_then_predictions() {
        let t = targets(&info("203.0.113.2:5000", Some(3)));
        assert_eq!(t.len(), 2 + PREDICT_STEPS as usize);
        assert_eq!(t[0], "203.0.113.2:5000".parse().expect("addr"));
        assert_eq!(t[1], "10.2.0.2:5000".parse().expect("addr"));
        assert_eq!(t[2].port(), 5003);
        // Predictions below 1024 are not probed.
        assert_eq!(targets(&info("203.0.113.2:1030", Some(-3))).len(), 2 + 2);
    }

    #[test]
    fn birthday_ports_are_distinct_seeded_and_skip_the_known_port() {
        let peer = info("203.0.113.2:5000", None);
        let a = birthday_targets(&peer, 256, &mut StdRng::seed_from_u64(9));
        let b = birthday_targets(&peer, 256, &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b, "the same seed gives the same ports");
        let mut ports: Vec<u16> = a.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), a.len());
        assert!(a.iter().all(|t| t.port() >= 1024 && t.port() != 5000));
    }

    /// The server's answer to the measurement's request `t`, seen from `mapped`.
    fn answer(t: &Transmit<usize>, mapped: SocketAddr) -> Vec<u8> {
        let req = crate::stun::Message::parse(&t.payload).expect("request");
        crate::client::binding_success(&req.transaction_id(), mapped)
    }

    #[test]
    fn the_measurement_reads_three_fresh_mappings_in_turn_from_the_server_only() {
        let t0 = Instant::now();
        let server: SocketAddr = "198.51.100.1:3490".parse().expect("addr");
        let mut m = PortMeasurement::new(t0, server, &mut StdRng::seed_from_u64(4));
        for (k, port) in [40000u16, 40002, 40004].into_iter().enumerate() {
            let t = m.poll_transmit().expect("request");
            assert_eq!((t.source, t.destination), (k, server));
            let mapped = SocketAddr::new([203, 0, 113, 1].into(), port);
            // From anyone else, or on another socket, an answer is ignored: the wait goes on.
            m.handle_datagram(
                t0,
                k,
                "203.0.113.66:3490".parse().expect("addr"),
                &answer(&t, mapped),
            );
            m.handle_datagram(t0, (k + 1) % 3, server, &answer(&t, mapped));
            assert!(m.result().is_none() && m.poll_transmit().is_none());
            m.handle_datagram(t0, k, server, &answer(&t, mapped));
        }
        let p = m.result().expect("done");
        assert_eq!(p.measured_ports, [40000, 40002, 40004]);
        assert_eq!(p.delta, Some(2));
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn an_unanswered_socket_ends_the_measurement_after_three_tries() {
        let t0 = Instant::now();
        let server: SocketAddr = "198.51.100.1:3490".parse().expect("addr");
        let mut m = PortMeasurement::new(t0, server, &mut StdRng::seed_from_u64(4));
        let (mut sent, mut now) = (Vec::new(), t0);
        loop {
            while let Some(x) = m.poll_transmit() {
                sent.push(((now - t0).as_millis(), x.source));
            }
            let Some(t) = m.poll_timeout() else { break };
            now = t;
            m.handle_timeout(now);
        }
        assert_eq!(now - t0, Duration::from_millis(900));
        assert_eq!(sent, [(0, 0), (300, 0), (600, 0)]);
        let p = m.result().expect("done");
        assert!(p.measured_ports.is_empty() && p.delta.is_none());
    }

    #[test]
    fn a_udp_request_backs_off_and_gives_up_after_its_wait() {
        let t0 = Instant::now();
        let m = PunchMessage::RefreshOk {
            tid: TransactionId::from_rng(&mut StdRng::seed_from_u64(1)),
        };
        let mut r = Request::new(t0, &m, Duration::from_secs(2), Transport::Udp).expect("enc");
        let mut sent = Vec::new();
        let mut now = t0;
        while let Ok(b) = r.poll(now) {
            if b.is_some() {
                sent.push((now - t0).as_millis());
            }
            now = r.poll_timeout();
        }
        assert_eq!(sent, [0, 250, 750, 1750]);
        assert_eq!(now - t0, Duration::from_secs(2));
    }
}
