//! The connecting peer of `natscope punch connect`, as a state machine with no I/O: CONNECT to
//! the rendezvous server (retransmitted until answered), then one [`Session`] toward the listener
//! carrying `messages` numbered application messages that the listener echoes, and finally the
//! [`ConnectReport`]: which path carried the data, how fast, and whether the echoes came back
//! complete, once each, in order.
//!
//! Inputs: [`Connector::start`] (once the driver has its socket and, with prediction, its
//! measured ports), [`Connector::handle_datagram`], [`Connector::handle_timeout`] and, over TCP,
//! the `handle_stream_*` reports of the direct streams the machine asked for. Outputs:
//! [`Connector::poll_transmit`], [`Connector::poll_stream`], [`Connector::poll_timeout`] and the
//! final [`Connector::poll_outcome`]. Randomness (transaction ids, birthday ports) comes from the
//! generator it is built with.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::codec::{code, PeerInfo, PunchMessage};
use super::identity::{Channel, Identity, PeerKey};
use super::peer::{
    birthday_part, random_allocation, session_config, targets, DirectStreams, DualStack,
    PeerMachine, Prediction, PunchError, Request, StreamCommand, PREDICT_STEPS,
};
use super::session::{
    Birthday, PunchPlan, Role, Route, Session, SessionError, BIRTHDAY_SOCKETS, MAX_TARGETS,
};
use super::{PathTaken, SessionId, Transport};
use crate::ms;
use crate::net::Transmit;
use crate::probe::family::Family;
use crate::stun::TransactionId;

#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub id: String,
    pub server: SocketAddr,
    pub transport: Transport,
    pub relay_first: bool,
    /// Port prediction (UDP): measure our allocation delta and send it, so the listener probes
    /// ahead of our server-reflexive port. On by default ([`crate::traversal::Techniques::PUNCH`]).
    pub predict: bool,
    /// The birthday technique (UDP): the random ports of the peer's address probed when this side
    /// is the easy one ([`super::session::Birthday`]); 0 turns the technique off, both parts.
    pub birthday: usize,
    pub messages: u64,
    /// Pause between application messages (0: send as fast as the window allows).
    pub interval: Duration,
    /// Bound on the whole connect.
    pub timeout: Duration,
    pub punch_window: Duration,
    /// Our key pair (ephemeral unless `--key` names a file).
    pub identity: Identity,
    /// `--peer-key`: the only key we accept for the peer, whatever the server says.
    pub peer_key: Option<PeerKey>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            id: String::new(),
            server: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), super::DEFAULT_PORT),
            transport: Transport::Udp,
            relay_first: false,
            // UDP only: the driver measures nothing over TCP.
            predict: crate::traversal::Techniques::PUNCH.port_prediction,
            birthday: super::peer::birthday_probes(),
            messages: 20,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(5),
            punch_window: Duration::from_millis(1500),
            identity: Identity::generate(&mut rand::thread_rng()),
            peer_key: None,
        }
    }
}

/// Most random ports the easy side of the birthday technique may probe (each once).
pub const MAX_BIRTHDAY: usize = 4096;

/// Details of how the connection was made (`attempts` in the JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Attempts {
    pub session: Option<String>,
    /// From the start to the server's answer to CONNECT.
    pub rendezvous_ms: Option<f64>,
    /// Our server-reflexive address, as the server saw the CONNECT.
    pub reflexive: Option<SocketAddr>,
    pub peer_reflexive: Option<SocketAddr>,
    pub peer_candidates: Vec<SocketAddr>,
    pub punch_window_ms: f64,
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// Round trip of the probe that found the direct path.
    pub probe_rtt_ms: Option<f64>,
    /// Upper bound on probe packets this connect could send (targets × rounds).
    pub probe_packet_bound: u64,
    pub tcp_connect_attempts: u32,
    /// The direct TCP stream was the peer's connection, accepted on our registered port.
    pub tcp_accepted: bool,
    pub predict: Option<Prediction>,
    /// The allocation delta the listener registered (we probe ahead of its port).
    pub peer_port_delta: Option<i32>,
    pub birthday_ports: usize,
    pub data_sent_direct: u64,
    pub data_sent_relayed: u64,
    pub echoes_received_direct: u64,
    pub echoes_received_relayed: u64,
    pub retransmissions: u64,
    pub duplicates_dropped: u64,
    pub server_lost: bool,
    pub error: Option<String>,
    /// The mapping of our socket's port the gateway granted (PCP, NAT-PMP, UPnP IGD), or why
    /// none was made (issue 12; `punch::mapping`). `null` when the driver did not ask.
    #[serde(default)]
    pub port_mapping: Option<super::mapping::PunchMapping>,
}

/// The `schema` of a connect report.
pub const SCHEMA: &str = "natscope.punch/v1";

/// The connect report: the `natscope.punch/v1` document (docs/punch.md). It serializes in the
/// documented field order and reads back typed, so callers (the grid, the tests) compare fields,
/// not JSON keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConnectReport {
    /// Always [`SCHEMA`]: a document of another schema does not deserialize.
    #[serde(deserialize_with = "schema_v1")]
    #[schemars(extend("const" = SCHEMA))]
    pub schema: Static,
    /// The version of natscope that wrote the report ([`crate::document`]); empty when read
    /// from a report written before it was added.
    #[serde(default)]
    pub natscope_version: String,
    pub transport: Transport,
    /// What carried the data at the end ([`PathTaken::Failed`]: no data flowed or the session
    /// broke).
    pub path: PathTaken,
    /// The address family of that path (issue 13: both are punched at once, this one won); the
    /// relay's family when relayed, `None` when failed or read from an older report.
    #[serde(default)]
    pub family: Option<crate::probe::family::Family>,
    /// The connector's local socket address (its host candidate).
    pub local: SocketAddr,
    /// The direct peer address, or the peer's server-reflexive address when relayed; `None`
    /// when failed.
    pub peer: Option<SocketAddr>,
    pub time_to_first_byte_ms: Option<f64>,
    pub time_to_direct_ms: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub messages_sent: u64,
    pub messages_echoed: u64,
    /// The echoes came back in exactly the order sent, each once (checked on the numbers the
    /// listener echoed, not on our own sequence numbers).
    pub in_order: bool,
    pub switched_to_direct: bool,
    pub attempts: Attempts,
}

impl ConnectReport {
    /// The path in words, with its family when there is one: `direct over IPv6`.
    pub fn path_words(&self) -> String {
        match self.family {
            Some(f) => format!("{} over {}", self.path, f.label()),
            None => self.path.to_string(),
        }
    }

    /// The session error, if the session failed after it started.
    pub fn failed(&self) -> bool {
        self.path == PathTaken::Failed || self.messages_echoed < self.messages_sent
    }
}

/// The schema's type, spelled through an alias so serde does not take `&'static str` as a string
/// borrowed from the input (which would tie every report to a `'static` document).
type Static = &'static str;

/// Reads `schema`, which must be [`SCHEMA`].
fn schema_v1<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let s = String::deserialize(d)?;
    if s == SCHEMA {
        Ok(SCHEMA)
    } else {
        Err(serde::de::Error::custom(format!(
            "schema `{s}` is not {SCHEMA}"
        )))
    }
}

/// Application message `i`: its number, big-endian, so the echo can be checked for order.
pub fn app_message(i: u64) -> Vec<u8> {
    let mut m = b"natscope-punch ".to_vec();
    m.extend_from_slice(&i.to_be_bytes());
    m
}

fn app_number(m: &[u8]) -> Option<u64> {
    let rest = m.strip_prefix(b"natscope-punch ")?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// The session and the application stream over it.
#[derive(Debug)]
struct Running {
    session: Session,
    peer: PeerInfo,
    pushed: u64,
    next_push: Instant,
    echoed: HashSet<u64>,
    expect_next: u64,
    in_order: bool,
    first_byte: Option<Instant>,
    /// Failover: the CONNECT that re-introduces this session through another server.
    moving: Option<(SocketAddr, Request)>,
    /// Servers not tried yet for failover.
    fallback: VecDeque<SocketAddr>,
}

/// How long a failover CONNECT waits for one server before the next is tried.
const FAILOVER_WAIT: Duration = Duration::from_secs(2);
/// How long a relayed session may be without a relay before failover gives up: inside the 8 s
/// a listener registered with several servers waits for a silent relayed peer
/// ([`crate::punch::listener::FAILOVER_PEER_IDLE`]).
const FAILOVER_GIVE_UP: Duration = Duration::from_secs(6);

#[derive(Debug)]
enum Phase {
    /// Waiting for [`Connector::start`].
    Idle,
    Rendezvous(Request),
    Session(Box<Running>),
    Done,
}

/// The one error line of a session that failed: when the peer never proved its key, or packets
/// failed authentication, that is the news (a substituted peer or a tampering relay), not the
/// timeout it caused.
fn authentication_failure(id: &str, key: Option<PeerKey>, s: &Session, error: String) -> String {
    let rejected = s.rejected_packets();
    let key = key.map_or_else(|| "?".to_string(), |k| k.to_string());
    match s.channel() {
        Some(c) if !c.is_ready() => format!(
            "peer `{id}` never proved key {key} (no valid Noise handshake; {rejected} forged or tampered packets dropped): refusing to talk to anyone else ({error})"
        ),
        Some(_) if rejected > 0 => format!(
            "{rejected} packets of this session failed authentication (tampered with or injected on the way, e.g. by the relay) and were dropped: {error}"
        ),
        _ => error,
    }
}

/// One `punch connect`, from CONNECT to the report.
#[derive(Debug)]
pub struct Connector {
    opts: ConnectOptions,
    rng: StdRng,
    started: Instant,
    deadline: Instant,
    local: SocketAddr,
    attempts: Attempts,
    phase: Phase,
    out: VecDeque<Transmit<SocketAddr>>,
    streams: DirectStreams,
    outcome: Option<Result<ConnectReport, PunchError>>,
    /// The key the session's handshake expects.
    peer_key: Option<PeerKey>,
    /// The second family's socket and `--family` (issue 13).
    dual: DualStack,
    /// See [`Connector::set_fallback`].
    fallback: Vec<SocketAddr>,
}

impl Connector {
    /// A connect that began at `started` (its timeout and report times count from there).
    pub fn new(started: Instant, opts: ConnectOptions, rng: StdRng) -> Self {
        let attempts = Attempts {
            punch_window_ms: ms(opts.punch_window),
            ..Attempts::default()
        };
        Self {
            deadline: started + opts.timeout,
            local: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            opts,
            rng,
            started,
            attempts,
            phase: Phase::Idle,
            out: VecDeque::new(),
            streams: DirectStreams::default(),
            outcome: None,
            peer_key: None,
            dual: DualStack::default(),
            fallback: Vec::new(),
        }
    }

    /// Punches over `dual.families` and announces `dual.candidates` too (issue 13: the driver's
    /// socket of the other family); before [`start`](Self::start).
    pub fn dual_stack(&mut self, dual: DualStack) {
        self.dual = dual;
    }

    /// Other rendezvous servers the listener is registered with, in the order to try: when the
    /// relay of a relayed UDP session stops answering, the session moves to the first of them
    /// that introduces the same key (relay failover, issue 14 item 2). None: no failover.
    pub fn set_fallback(&mut self, servers: Vec<SocketAddr>) {
        self.fallback = servers;
    }

    /// Sends CONNECT from `local` (the socket every datagram of this connect uses; over TCP the
    /// registered port). `prediction`: this side's measured allocation (UDP, `--predict`).
    pub fn start(&mut self, now: Instant, local: SocketAddr, prediction: Option<Prediction>) {
        if !matches!(self.phase, Phase::Idle) {
            return;
        }
        self.local = local;
        let port_delta = prediction.as_ref().and_then(|p| p.delta);
        self.attempts.predict = prediction;
        let req = PunchMessage::Connect {
            tid: TransactionId::from_rng(&mut self.rng),
            target: self.opts.id.clone(),
            candidates: self
                .dual
                .announce(super::mapping::candidates(local, self.mapped_candidate())),
            port_delta,
            punch_window_ms: Some(self.opts.punch_window.as_millis().min(60_000) as u32),
        };
        let wait = self
            .deadline
            .saturating_duration_since(now)
            .min(Duration::from_secs(2));
        match Request::new(now, &req, wait, self.opts.transport) {
            Some(r) => {
                self.phase = Phase::Rendezvous(r);
                self.handle_timeout(now);
            }
            None => self.fail(PunchError::Refused(
                self.opts.server,
                "the connect request cannot be encoded".into(),
            )),
        }
    }

    /// Records the mapping of our socket's port (issue 12), before [`Connector::start`]: its
    /// external address is sent as our first candidate when `offered`, and the report carries it.
    pub fn set_port_mapping(&mut self, mapping: super::mapping::PunchMapping) {
        self.attempts.port_mapping = Some(mapping);
    }

    fn mapped_candidate(&self) -> Option<SocketAddr> {
        let m = self.attempts.port_mapping.as_ref()?;
        m.external.filter(|_| m.offered)
    }

    /// The report (or why the connect could not start) once it is over; taken once.
    pub fn poll_outcome(&mut self) -> Option<Result<ConnectReport, PunchError>> {
        self.outcome.take()
    }

    /// The connect is over (its outcome may already have been taken).
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn send(&mut self, destination: SocketAddr, payload: Vec<u8>) {
        self.out.push_back(Transmit {
            source: self.local,
            destination,
            payload,
        });
    }

    fn fail(&mut self, e: PunchError) {
        self.phase = Phase::Done;
        self.outcome = Some(Err(e));
    }

    fn rendezvous_answer(&mut self, now: Instant, m: PunchMessage) {
        let server = self.opts.server;
        let (session_id, mapped, peer, start_in) = match m {
            PunchMessage::ConnectOk {
                session,
                mapped,
                peer,
                start_in_ms,
                ..
            } => (
                session,
                mapped,
                peer,
                Duration::from_millis(u64::from(start_in_ms).min(2000)),
            ),
            PunchMessage::Error { code: c, .. } if c == code::UNKNOWN_PEER => {
                let e = PunchError::UnknownPeer(self.opts.id.clone(), server, self.opts.transport);
                return self.fail(e);
            }
            PunchMessage::Error {
                code: c, reason, ..
            } => return self.fail(PunchError::Refused(server, format!("{c} {reason}"))),
            _ => return self.fail(PunchError::Refused(server, "unexpected answer".into())),
        };
        // Whom the handshake must reach: the pinned key, else the one the server vouches for.
        let key = match (self.opts.peer_key, peer.key) {
            (Some(pinned), Some(said)) if pinned != said => {
                let e = PunchError::WrongKey(self.opts.id.clone(), server, said, pinned);
                return self.fail(e);
            }
            (Some(pinned), _) => pinned,
            (None, Some(said)) => said,
            (None, None) => return self.fail(PunchError::NoKey(server, self.opts.id.clone())),
        };
        let Some(channel) = Channel::initiator(&self.opts.identity, &key, &mut self.rng) else {
            return self.fail(PunchError::NoKey(server, self.opts.id.clone()));
        };
        self.peer_key = Some(key);
        let a = &mut self.attempts;
        a.session = Some(session_id.to_string());
        a.rendezvous_ms = Some(ms(now - self.started));
        a.reflexive = Some(mapped);
        if let Some(m) = a.port_mapping.as_mut() {
            // The gateway's claim against what the server saw (issue 12: reported, not believed).
            let claim = m
                .external
                .and_then(|e| super::mapping::check_external(e, mapped));
            m.problems.extend(claim);
        }
        a.peer_reflexive = Some(peer.reflexive);
        a.peer_candidates = peer.candidates.clone();
        let opts = &self.opts;
        let plan = PunchPlan {
            local: self.local,
            start_in,
            targets: targets(&peer),
        };
        let session_rng = StdRng::seed_from_u64(self.rng.gen());
        let mut config = session_config(opts.transport, opts.relay_first, opts.punch_window);
        // Over UDP the same socket reaches every server; a TCP relay is the server's connection.
        let fallback: VecDeque<SocketAddr> = self
            .fallback
            .iter()
            .copied()
            .filter(|a| *a != server && opts.transport == Transport::Udp)
            .collect();
        config.relay_failover = !fallback.is_empty();
        let mut s = Session::new(
            now,
            session_id,
            Role::Connector,
            config,
            server,
            plan,
            session_rng,
        )
        .secure(channel);
        if let Some(f) = self.dual.families {
            s = s.probe_families(f, targets(&peer));
        }
        if opts.transport == Transport::Udp {
            let random = random_allocation(a.predict.as_ref());
            let probes = opts.birthday.min(MAX_BIRTHDAY);
            let part = (probes > 0)
                .then(|| birthday_part(self.local, mapped, random, &peer, probes, &mut self.rng))
                .flatten();
            a.birthday_ports = match &part {
                Some(Birthday::Hard { .. }) => BIRTHDAY_SOCKETS,
                Some(Birthday::Easy { targets }) => targets.len(),
                None => 0,
            };
            s = s.with_birthday(part);
            // Rounds every 50 ms in the window; relay-first keeps probing every 250 ms after it.
            let mut rounds = (opts.punch_window.as_millis() / 50).max(1) as u64;
            if opts.relay_first {
                rounds += (opts.timeout.saturating_sub(opts.punch_window).as_millis() / 250) as u64;
            }
            a.probe_packet_bound = MAX_TARGETS as u64 * rounds + a.birthday_ports as u64;
        } else {
            let start = now + start_in;
            self.streams
                .open(session_id, peer.reflexive, start, start + opts.punch_window);
        }
        if let Some(p) = a.predict.as_mut() {
            // The peer probes this many ports ahead of our server-reflexive port.
            p.predicted_ports = if p.delta.is_some() {
                PREDICT_STEPS as usize
            } else {
                0
            };
        }
        a.peer_port_delta = peer.port_delta;
        self.phase = Phase::Session(Box::new(Running {
            session: s,
            peer,
            pushed: 0,
            next_push: now,
            echoed: HashSet::new(),
            expect_next: 0,
            in_order: true,
            first_byte: None,
            moving: None,
            fallback,
        }));
        self.step(now, None);
    }

    /// Failover: asks the next server to introduce us to the same peer again (the listener is
    /// registered there too); `false` when no server is left to try.
    fn start_move(&mut self, now: Instant) -> bool {
        let Phase::Session(run) = &mut self.phase else {
            return false;
        };
        while let Some(server) = run.fallback.pop_front() {
            let req = PunchMessage::Connect {
                tid: TransactionId::from_rng(&mut self.rng),
                target: self.opts.id.clone(),
                candidates: vec![self.local],
                port_delta: self.attempts.predict.as_ref().and_then(|p| p.delta),
                punch_window_ms: Some(self.opts.punch_window.as_millis().min(60_000) as u32),
            };
            if let Some(mut r) = Request::new(now, &req, FAILOVER_WAIT, self.opts.transport) {
                if let Ok(Some(bytes)) = r.poll(now) {
                    self.out.push_back(Transmit {
                        source: self.local,
                        destination: server,
                        payload: bytes,
                    });
                }
                run.moving = Some((server, r));
                return true;
            }
        }
        false
    }

    /// The answer of the server a failover CONNECT went to: on an introduction of the key this
    /// session authenticated, the session moves there; anything else tries the next server.
    fn move_answer(&mut self, now: Instant, server: SocketAddr, m: PunchMessage) {
        let Phase::Session(run) = &mut self.phase else {
            return;
        };
        run.moving = None;
        if !matches!(m, PunchMessage::ConnectOk { .. }) {
            // Refused or does not know the peer (yet): tried again after the others.
            run.fallback.push_back(server);
        }
        if let PunchMessage::ConnectOk { session, peer, .. } = m {
            if peer.key.is_some() && peer.key == self.peer_key {
                let targets = targets(&peer);
                // The relay we leave is tried again last (it may only have been slow).
                run.fallback.push_back(run.session.server());
                run.session.rehome(now, server, None, session, &targets);
            } else {
                // Another key: this server would put someone else in the middle. Our channel
                // would refuse them anyway; say so rather than time out.
                let said = peer.key.map_or_else(|| "none".into(), |k| k.to_string());
                let want = self.peer_key.map_or_else(|| "?".into(), |k| k.to_string());
                let e = format!(
                    "relay failover: rendezvous server {server} introduced `{}` with key {said}, not the key {want} this session authenticated: refusing",
                    self.opts.id
                );
                return self.step(now, Some(e));
            }
        }
        self.step(now, None);
    }

    /// Pushes due messages, runs the session, takes its echoes, and ends the connect when every
    /// echo is in, the session failed, the deadline passed, or `error` says it must end.
    fn step(&mut self, now: Instant, error: Option<String>) {
        let Phase::Session(run) = &mut self.phase else {
            return;
        };
        let n = self.opts.messages;
        let mut error = error;
        if error.is_none() {
            // Paced by the interval, and held back while the send queue is full.
            while run.pushed < n && now >= run.next_push && run.session.has_room() {
                run.session.push(app_message(run.pushed));
                run.pushed += 1;
                run.next_push += self.opts.interval;
            }
            run.session.handle_timeout(now);
            self.out
                .extend(std::iter::from_fn(|| run.session.poll_transmit()));
            if run.session.relay_lost() && run.moving.is_none() {
                let (server, silent) = (run.session.server(), run.session.server_silence(now));
                // Bounded: servers are tried in turn (one that failed goes to the back of the
                // list) until the relay has been gone for FAILOVER_GIVE_UP.
                if silent > FAILOVER_GIVE_UP {
                    let e = SessionError::ServerGone(server, silent).to_string();
                    return self.finish(Some(e));
                }
                if self.start_move(now) {
                    return self.step(now, None);
                }
            }
            let Phase::Session(run) = &mut self.phase else {
                return;
            };
            while let Some(m) = run.session.poll_deliver() {
                run.first_byte.get_or_insert(now);
                match app_number(&m) {
                    Some(i) if i < run.pushed => {
                        if i != run.expect_next || !run.echoed.insert(i) {
                            run.in_order = false;
                        }
                        run.expect_next = i + 1;
                    }
                    _ => run.in_order = false,
                }
            }
            if run.echoed.len() as u64 != n {
                if let Some(e) = run.session.error() {
                    error = Some(e.to_string());
                } else if now >= self.deadline {
                    error = Some(format!(
                        "timed out after {:?} with {} of {n} messages echoed",
                        self.opts.timeout,
                        run.echoed.len()
                    ));
                } else {
                    return;
                }
                error = error
                    .map(|e| authentication_failure(&self.opts.id, self.peer_key, &run.session, e));
            }
        }
        self.finish(error);
    }

    fn finish(&mut self, error: Option<String>) {
        let Phase::Session(run) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        let mut run = *run;
        let s = &mut run.session;
        // Tell the peer (and the server) the session is over; best effort.
        s.close();
        self.out.extend(std::iter::from_fn(|| s.poll_transmit()));
        let st = s.stats();
        let route = s.route();
        let direct = route.is_some_and(Route::is_direct);
        let a = &mut self.attempts;
        a.probes_sent = st.probes_sent;
        a.probes_answered = st.probes_answered;
        a.probe_rtt_ms = st.probe_rtt.map(ms);
        a.data_sent_direct = st.data_sent_direct;
        a.data_sent_relayed = st.data_sent_relayed;
        a.echoes_received_direct = st.data_received_direct;
        a.echoes_received_relayed = st.data_received_relayed;
        a.retransmissions = st.retransmissions;
        a.duplicates_dropped = st.duplicates_dropped;
        a.server_lost = st.server_lost;
        a.error = error.clone();
        // The path's RTT: the smallest send-to-ack time of a message never retransmitted on the
        // final path (the smallest, because a burst of messages queues behind itself).
        let rtt = st
            .rtt_samples
            .iter()
            .filter(|(d, _)| *d == direct)
            .map(|(_, r)| *r)
            .min()
            .or(if direct { st.probe_rtt } else { None });
        let path = if error.is_some() || run.echoed.is_empty() {
            PathTaken::Failed
        } else if direct {
            PathTaken::Direct
        } else {
            PathTaken::Relayed
        };
        let peer = match route {
            Some(Route::Direct(a)) => Some(a),
            _ if path != PathTaken::Failed => Some(run.peer.reflexive),
            _ => None,
        };
        let t0 = self.started;
        let echoed = run.echoed.len() as u64;
        self.outcome = Some(Ok(ConnectReport {
            schema: SCHEMA,
            natscope_version: crate::document::version(),
            transport: self.opts.transport,
            path,
            family: match route {
                Some(Route::Direct(a)) if path == PathTaken::Direct => Some(Family::of(a)),
                _ if path == PathTaken::Relayed => Some(Family::of(self.opts.server)),
                _ => None,
            },
            local: self.local,
            peer,
            time_to_first_byte_ms: run.first_byte.map(|t| ms(t - t0)),
            time_to_direct_ms: s.direct_at().map(|t| ms(t - t0)),
            rtt_ms: rtt.map(ms),
            messages_sent: run.pushed,
            messages_echoed: echoed,
            in_order: run.in_order && run.expect_next == echoed,
            switched_to_direct: s.switched_to_direct(),
            attempts: std::mem::take(&mut self.attempts),
        }));
    }
}

impl PeerMachine for Connector {
    fn poll_transmit(&mut self) -> Option<Transmit<SocketAddr>> {
        self.out.pop_front()
    }

    fn poll_birthday(&mut self) -> Option<super::session::BirthdayOpen> {
        match &mut self.phase {
            Phase::Session(run) => run.session.poll_birthday(),
            _ => None,
        }
    }

    fn poll_stream(&mut self) -> Option<StreamCommand> {
        self.streams.poll()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Idle | Phase::Done => None,
            Phase::Rendezvous(r) => Some(r.poll_timeout()),
            Phase::Session(run) => {
                let mut wake = run
                    .session
                    .poll_timeout()
                    .map_or(self.deadline, |t| t.min(self.deadline));
                if run.pushed < self.opts.messages {
                    wake = wake.min(run.next_push);
                }
                if let Some((_, r)) = &run.moving {
                    wake = wake.min(r.poll_timeout());
                }
                Some(wake)
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Rendezvous(r) => match r.poll(now) {
                Ok(Some(bytes)) => self.send(self.opts.server, bytes),
                Ok(None) => {}
                Err(wait) => {
                    self.fail(PunchError::Unreachable(
                        self.opts.server,
                        self.opts.transport,
                        wait,
                    ));
                }
            },
            Phase::Session(run) => {
                if let Some((server, r)) = &mut run.moving {
                    match r.poll(now) {
                        Ok(Some(payload)) => self.out.push_back(Transmit {
                            source: self.local,
                            destination: *server,
                            payload,
                        }),
                        Ok(None) => {}
                        // Unanswered: the next server (step starts it, or ends the session);
                        // this one is tried again after the others.
                        Err(_) => {
                            run.fallback.push_back(*server);
                            run.moving = None;
                        }
                    }
                }
                self.step(now, None)
            }
            Phase::Idle | Phase::Done => {}
        }
    }

    /// A datagram (UDP) or a framed message (TCP) from `from`.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok(m) = PunchMessage::decode(bytes) else {
            if matches!(self.phase, Phase::Session(_)) {
                self.step(now, None);
            }
            return;
        };
        match &mut self.phase {
            Phase::Rendezvous(r) => {
                // Anything but the answer (from the server, with our transaction id) is dropped.
                if from == self.opts.server && r.answered_by(&m) {
                    if r.on_challenge(now, bytes, &m) {
                        return self.handle_timeout(now);
                    }
                    self.rendezvous_answer(now, m);
                }
            }
            Phase::Session(run) => {
                if let Some((server, r)) = &mut run.moving {
                    if from == *server && r.answered_by(&m) {
                        if r.on_challenge(now, bytes, &m) {
                            return self.handle_timeout(now);
                        }
                        let server = *server;
                        return self.move_answer(now, server, m);
                    }
                }
                run.session.handle_message(now, from, m);
                self.step(now, None);
            }
            Phase::Idle | Phase::Done => {}
        }
    }

    /// The driver's attempts opened a direct TCP stream to `peer` (it now sends there): say hello
    /// on it; it is the direct path once the peer answers on it.
    fn handle_stream_up(
        &mut self,
        now: Instant,
        _session: SessionId,
        peer: SocketAddr,
        attempts: u32,
    ) {
        self.attempts.tcp_connect_attempts += attempts;
        if let Phase::Session(run) = &mut self.phase {
            run.session.hello(peer);
            self.step(now, None);
        }
    }

    /// The driver's attempts to open the direct stream ran out of window.
    fn handle_stream_failed(&mut self, _now: Instant, attempts: u32) {
        self.attempts.tcp_connect_attempts += attempts;
    }

    /// Our registered port accepted a connection from `peer`: whether the driver should take it
    /// as the session's direct stream (else it drops it).
    fn handle_accepted(&mut self, now: Instant, peer: SocketAddr) -> bool {
        let Phase::Session(run) = &mut self.phase else {
            return false;
        };
        // Only from the address the server saw the peer at: the same rule as a connected socket
        // (see docs/punch.md), so outcomes do not depend on timing.
        let adopt =
            peer == run.peer.reflexive && !run.session.route().is_some_and(Route::is_direct);
        if adopt {
            self.attempts.tcp_accepted = true;
            self.streams.stop(run.session.id());
            self.step(now, None);
        }
        adopt
    }

    /// A TCP stream (to the server or to the peer) closed.
    fn handle_stream_down(&mut self, now: Instant, addr: SocketAddr) {
        let server = self.opts.server;
        match &mut self.phase {
            Phase::Rendezvous(_) if addr == server => self.fail(PunchError::ServerClosed(server)),
            Phase::Session(run) => {
                let s = &mut run.session;
                if addr == server {
                    if !s.route().is_some_and(Route::is_direct) {
                        let e = PunchError::ServerClosed(server).to_string();
                        return self.step(now, Some(e));
                    }
                } else if s.route() == Some(Route::Direct(addr))
                    && run.echoed.len() as u64 != self.opts.messages
                {
                    s.abort(SessionError::PeerConnectionClosed);
                    let e = s.error().map(|e| e.to_string());
                    return self.step(now, e);
                } else if s.direct_at().is_none() {
                    self.streams.retry(now, addr);
                }
                self.step(now, None);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    const SERVER: &str = "198.51.100.1:3490";
    const PEER: &str = "203.0.113.2:5000";

    /// A TCP connector whose CONNECT the server answered at `t0`.
    fn in_session(t0: Instant) -> Connector {
        let opts = ConnectOptions {
            id: "bob".into(),
            server: sa(SERVER),
            transport: Transport::Tcp,
            messages: 3,
            ..ConnectOptions::default()
        };
        let mut c = Connector::new(t0, opts, StdRng::seed_from_u64(1));
        c.start(t0, sa("10.1.0.2:4000"), None);
        let req = c.poll_transmit().expect("connect");
        let tid = PunchMessage::decode(&req.payload).expect("decode").tid();
        let ok = PunchMessage::ConnectOk {
            tid,
            session: SessionId(9),
            mapped: sa("203.0.113.1:4000"),
            peer: PeerInfo {
                reflexive: sa(PEER),
                candidates: vec![],
                port_delta: None,
                punch_window_ms: None,
                key: Some(super::super::identity::Identity::from_seed([5; 32]).public()),
            },
            start_in_ms: 20,
        };
        c.handle_datagram(t0, sa(SERVER), &ok.to_vec().expect("enc"));
        c
    }

    #[test]
    fn over_tcp_only_the_peers_reflexive_address_is_accepted() {
        let t0 = Instant::now();
        let mut c = in_session(t0);
        assert!(
            matches!(c.poll_stream(), Some(StreamCommand::Open { peer, .. }) if peer == sa(PEER))
        );
        assert!(!c.handle_accepted(t0, sa("203.0.113.2:5001")));
        assert!(c.handle_accepted(t0, sa(PEER)));
        assert_eq!(
            c.poll_stream(),
            Some(StreamCommand::Stop {
                session: SessionId(9)
            })
        );
    }

    #[test]
    fn the_server_connection_closing_fails_a_session_without_a_direct_path() {
        let t0 = Instant::now();
        let mut c = in_session(t0);
        c.handle_stream_down(t0 + Duration::from_millis(5), sa(SERVER));
        let Some(Ok(r)) = c.poll_outcome() else {
            panic!("no report");
        };
        assert_eq!(r.path, PathTaken::Failed);
        assert!(r.failed());
        let e = r.attempts.error.unwrap_or_default();
        assert!(e.contains("closed the connection"), "{e}");
        // The CLOSE goes to the server and the machine is done.
        let close = std::iter::from_fn(|| c.poll_transmit())
            .filter_map(|t| PunchMessage::decode(&t.payload).ok())
            .any(|m| matches!(m, PunchMessage::Close { .. }));
        assert!(close);
        assert!(c.is_done() && c.poll_timeout().is_none());
    }

    /// The report the machine ends with reads back as itself, and its JSON survives the trip
    /// byte for byte (what `punch connect --json` prints is what the grid and the tests read).
    #[test]
    fn a_report_round_trips_through_its_json() {
        let t0 = Instant::now();
        let mut c = in_session(t0);
        c.handle_stream_down(t0 + Duration::from_millis(5), sa(SERVER));
        let Some(Ok(r)) = c.poll_outcome() else {
            panic!("no report");
        };
        assert_eq!(r.attempts.reflexive, Some(sa("203.0.113.1:4000")));
        assert_eq!(r.attempts.peer_reflexive, Some(sa(PEER)));
        let text = serde_json::to_string_pretty(&r).expect("json");
        let back: ConnectReport = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, r);
        assert_eq!(serde_json::to_string_pretty(&back).expect("json"), text);
        assert!(text.contains("\"path\": \"failed\""), "{text}");
    }

    /// Every quoted string of a JSON text that is an object key, in order.
    fn keys(json: &str) -> Vec<&str> {
        let parts: Vec<&str> = json.split('"').collect();
        (1..parts.len())
            .step_by(2)
            .filter(|&i| {
                parts
                    .get(i + 1)
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
            })
            .map(|i| parts[i])
            .collect()
    }

    /// The `natscope.punch/v1` example in docs/punch.md.
    fn documented_example() -> &'static str {
        include_str!("../../../../docs/punch.md")
            .split("```json\n")
            .map(|rest| rest.split("\n```").next().unwrap_or_default())
            .find(|block| block.contains("\"natscope.punch/v1\""))
            .expect("docs/punch.md has the connect report example")
    }

    /// docs/punch.md's `natscope.punch/v1` example is a report: it reads back typed, and the
    /// report writes the same fields, in the documented order, with the same values.
    #[test]
    fn the_documented_example_is_a_report_field_for_field() {
        let example = documented_example();
        let r: ConnectReport = serde_json::from_str(example).expect("the example is a report");
        assert_eq!(r.path, PathTaken::Direct);
        assert_eq!(r.transport, Transport::Udp);
        assert_eq!(r.peer, Some(sa("203.0.113.2:34026")));
        let out = serde_json::to_string(&r).expect("json");
        assert_eq!(keys(&out), keys(example));
        assert_eq!(
            keys(&out).len(),
            15 + 24 + 9,
            "every field of the report, its attempts and their port mapping"
        );
        let value = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");
        assert_eq!(value(&out), value(example));
    }

    #[test]
    fn a_document_of_another_schema_or_path_is_no_report() {
        let example = documented_example();
        for (from, to) in [
            ("natscope.punch/v1", "natscope.punch/v2"),
            ("\"path\": \"direct\"", "\"path\": \"sideways\""),
            ("\"local\": \"10.1.0.2:43512\"", "\"local\": \"10.1.0.2\""),
        ] {
            let bad = example.replace(from, to);
            assert_ne!(bad, example);
            assert!(serde_json::from_str::<ConnectReport>(&bad).is_err(), "{to}");
        }
    }

    #[test]
    fn an_unanswered_connect_is_unreachable_after_its_wait() {
        let t0 = Instant::now();
        let opts = ConnectOptions {
            id: "bob".into(),
            server: sa(SERVER),
            ..ConnectOptions::default()
        };
        let mut c = Connector::new(t0, opts, StdRng::seed_from_u64(1));
        c.start(t0, sa("10.1.0.2:4000"), None);
        let mut sent = 0;
        while let Some(t) = c.poll_timeout() {
            sent += std::iter::from_fn(|| c.poll_transmit()).count();
            c.handle_timeout(t);
        }
        assert_eq!(sent, 4, "sent at 0, 250, 750 and 1750 ms");
        assert!(matches!(
            c.poll_outcome(),
            Some(Err(PunchError::Unreachable(_, Transport::Udp, w))) if w == Duration::from_secs(2)
        ));
    }
}
