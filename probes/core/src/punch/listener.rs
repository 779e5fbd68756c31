//! The listening peer of `natscope punch listen`, as a state machine with no I/O: REGISTER with
//! the rendezvous server (retransmitted until answered), then serve every session the server
//! introduces — concurrently, each a [`Session`] that echoes what it delivers — while
//! re-registering every [`KEEPALIVE`] (which also restores the registration after a server
//! restart) and noticing a server that stopped answering.
//!
//! The session table is bounded ([`MAX_LISTEN_SESSIONS`]) and INTRODUCE is idempotent: the
//! server retransmits it until answered, so every copy is answered but only the first starts a
//! session, and a late copy of an ended session's introduction (remembered, bounded) does not
//! restart it.
//!
//! Inputs: [`Listener::start`], [`Listener::handle_datagram`], [`Listener::handle_timeout`],
//! [`Listener::shutdown`] and, over TCP, the `handle_stream_*` reports. Outputs:
//! [`Listener::poll_transmit`], [`Listener::poll_stream`], [`Listener::poll_event`] (what the
//! CLI prints), [`Listener::poll_timeout`] and the final [`Listener::poll_outcome`].

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::codec::{method, PunchMessage};
use super::identity::{Channel, Identity, Purpose};
use super::peer::{
    session_config, targets, DirectStreams, DualStack, PeerMachine, Prediction, PunchError,
    Request, StreamCommand,
};
use super::session::{ProbeBudget, PunchPlan, Role, Route, Session};
use super::{PathTaken, SessionId, Transport};
use crate::net::Transmit;
use crate::stun::TransactionId;

#[derive(Clone, Debug)]
pub struct ListenOptions {
    pub id: String,
    pub server: SocketAddr,
    pub transport: Transport,
    /// Exit after serving this many sessions (`None`: forever).
    pub count: Option<u64>,
    /// Give up after this long (`None`: no limit).
    pub timeout: Option<Duration>,
    pub punch_window: Duration,
    /// Port prediction: measure our allocation delta and register it, so connectors probe
    /// ahead of our server-reflexive port (UDP; on in `natscope punch`,
    /// [`crate::traversal::Techniques::PUNCH`], unless `--no-predict`).
    pub predict: bool,
    /// Our key pair: it proves the registration and answers connectors' Noise handshakes.
    pub identity: Identity,
}

/// What the listener reports as it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ListenEvent {
    /// `--predict`: the mapped ports of fresh sockets and the allocation delta they show.
    Predicted {
        measured_ports: Vec<u16>,
        delta: Option<i32>,
    },
    /// The server answered REGISTER: our host (`local`) and server-reflexive addresses.
    Registered {
        id: String,
        transport: Transport,
        local: String,
        reflexive: String,
        /// Our public key: what a connector passes as `--peer-key` to accept only us.
        key: String,
    },
    /// The mapping of our socket's port the gateway granted, or why none was made (issue 12),
    /// with what the reflexive address says of the gateway's claim; printed once, after
    /// `registered`.
    PortMapping(super::mapping::PunchMapping),
    /// The server introduced a connecting peer; punching towards it has begun.
    SessionStarted { session: String, peer: String },
    /// A session is over: what carried its data and how many messages were echoed.
    SessionEnded {
        session: String,
        path: PathTaken,
        peer: Option<String>,
        messages_echoed: u64,
        switched_to_direct: bool,
        error: Option<String>,
    },
}

/// The `schema` of each line `punch listen --json` prints.
pub const LISTEN_SCHEMA: &str = "natscope.punch-listen/v1";

/// One line of `punch listen --json` (`natscope.punch-listen/v1`, docs/schema/punch-listen.v1.json):
/// an event, tagged with the schema and the version of natscope that printed it.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct ListenLine {
    /// Always [`LISTEN_SCHEMA`].
    #[schemars(extend("const" = LISTEN_SCHEMA))]
    pub schema: &'static str,
    /// The version of natscope that printed the line ([`crate::document`]).
    pub natscope_version: String,
    #[serde(flatten)]
    pub event: ListenEvent,
}

impl ListenLine {
    pub fn new(event: ListenEvent) -> Self {
        Self {
            schema: LISTEN_SCHEMA,
            natscope_version: crate::document::version(),
            event,
        }
    }
}

/// Sessions a listener serves at once (bounded memory); introductions beyond it are ignored and
/// their connectors fail with "peer stopped answering".
pub const MAX_LISTEN_SESSIONS: usize = 64;
/// Ended sessions remembered, so a late INTRODUCE retransmission does not restart one.
const RECENT_ENDED: usize = 1024;

/// Keepalive (re-REGISTER) period; the server forgets a peer after about three missed ones.
pub const KEEPALIVE: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Phase {
    /// Waiting for [`Listener::start`].
    Idle,
    Registering(Request),
    Serving,
    Done,
}

/// The human line of an event (`punch listen` without `--json`); here rather than in the CLI,
/// whose line budget is spent.
impl std::fmt::Display for ListenEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenEvent::Predicted {
                measured_ports,
                delta: Some(d),
            } => write!(f, "port allocation delta {d} (ports {measured_ports:?})"),
            ListenEvent::Predicted { measured_ports, .. } => {
                write!(
                    f,
                    "no predictable port allocation (ports {measured_ports:?})"
                )
            }
            ListenEvent::Registered {
                id,
                transport,
                local,
                reflexive,
                key,
            } => write!(
                f,
                "registered {id} over {transport}: local {local}, reflexive {reflexive}, key {key}"
            ),
            ListenEvent::PortMapping(m) => match (m.protocol, m.external) {
                (Some(p), Some(e)) => write!(
                    f,
                    "port mapping over {p}: {e} for {} s{}",
                    m.lifetime_s.unwrap_or(0),
                    m.problems
                        .iter()
                        .map(|p| format!("; {p}"))
                        .collect::<String>()
                ),
                _ => write!(
                    f,
                    "no port mapping: {}",
                    m.why_none.as_deref().unwrap_or("none made")
                ),
            },
            ListenEvent::SessionStarted { session, peer } => {
                write!(f, "session {session}: peer {peer}, punching")
            }
            ListenEvent::SessionEnded {
                session,
                path,
                peer,
                messages_echoed,
                switched_to_direct,
                error,
            } => {
                write!(f, "session {session}: {path}")?;
                if let Some(p) = peer {
                    write!(f, " via {p}")?;
                }
                if *switched_to_direct {
                    write!(f, " (switched from relay)")?;
                }
                write!(f, ", {messages_echoed} messages echoed")?;
                if let Some(e) = error {
                    write!(f, ", ended: {e}")?;
                }
                Ok(())
            }
        }
    }
}

/// One `punch listen`, from REGISTER to UNREGISTER.
#[derive(Debug)]
pub struct Listener {
    opts: ListenOptions,
    rng: StdRng,
    /// The server's latest return-routability cookie, echoed by every keepalive REGISTER.
    cookie: [u8; super::codec::COOKIE_LEN],
    started: Instant,
    local: SocketAddr,
    port_delta: Option<i32>,
    phase: Phase,
    /// Live sessions and how many messages each echoed (ordered: deterministic transmit order).
    sessions: BTreeMap<SessionId, (Session, u64)>,
    ended: VecDeque<SessionId>,
    served: u64,
    next_keepalive: Instant,
    last_server: Instant,
    out: VecDeque<Transmit<SocketAddr>>,
    events: VecDeque<ListenEvent>,
    streams: DirectStreams,
    outcome: Option<Result<u64, PunchError>>,
    /// The second family's socket and `--family` (issue 13).
    dual: DualStack,
    /// The one probe budget of all our sessions (and of our sibling machines, one per server).
    budget: ProbeBudget,
    /// Relayed boxes our fresh sessions could not open: perhaps a session of a sibling machine
    /// moving here from a relay that died ([`hand_over`]).
    resumes: VecDeque<Resume>,
    /// How many such boxes each fresh session offered since when (bounded: [`MAX_RESUME_TRIES`]
    /// per [`RELEASE_QUIET`]).
    resume_tries: BTreeMap<SessionId, (u8, Instant)>,
    /// Sibling machines (other servers) may take over our relayed sessions: those wait
    /// [`FAILOVER_PEER_IDLE`] for a silent peer, long enough for its connector to move.
    failover: bool,
    /// The gateway's mapping of our socket's port (issue 12; `punch::mapping`): its external
    /// address is registered as our first candidate, and the report is a line after the first
    /// `registered`.
    mapping: Option<super::mapping::PunchMapping>,
    /// That line is still to come.
    mapping_line: bool,
    /// Our allocation looked random ([`super::peer::random_allocation`]) and our server-reflexive
    /// address: what decides our part in the birthday technique.
    random_allocation: bool,
    reflexive: Option<SocketAddr>,
}

/// How long a listener with sibling machines keeps a session whose peer went silent: the
/// connector may be moving it to another relay (detection 1 s, then up to a few CONNECTs of 2 s
/// until it gives up after 6 s).
pub const FAILOVER_PEER_IDLE: Duration = Duration::from_secs(8);

/// A sealed box relayed into one of our fresh sessions (introduced, no handshake yet) without a
/// handshake: the connector of a session that began through another server, now moving it here
/// ([`hand_over`]).
#[derive(Debug)]
pub struct Resume {
    /// The session this server introduced (its id for the moved session from now on).
    pub session: SessionId,
    from: SocketAddr,
    bytes: Vec<u8>,
    sealed: Vec<u8>,
}

/// A session released by one listener machine to another ([`hand_over`]).
#[derive(Debug)]
pub struct Moved {
    session: Session,
    echoed: u64,
}

/// Boxes a fresh session may offer for a hand-over per [`RELEASE_QUIET`]: each costs one trial
/// open per quiet relayed session of the sibling machines (at most [`MAX_LISTEN_SESSIONS`]
/// each).
const MAX_RESUME_TRIES: u8 = 8;
/// Hand-overs waiting at once.
const MAX_RESUMES: usize = 16;
/// A session is handed over only after its peer has been this quiet on its current path: a
/// connector moves only once its relay has been silent for a second, and a box replayed by
/// someone who saw the session's traffic cannot pull a session whose path still works.
const RELEASE_QUIET: Duration = Duration::from_millis(500);

/// Relay failover on the listener's side (issue 14, item 2): a listener registered with several
/// servers runs one machine per server, and a connector whose relay died moves its session
/// through another server — that server introduces a new session to our machine there, and the
/// connector's next sealed messages come through it without a handshake. Each such box is
/// offered to the sibling machines; the one whose relayed session's channel opens it releases
/// that session, which continues in the new machine under the new server's id: same Noise
/// channel, same reliable stream, the unacked echoes sent again through the new relay. A server
/// cannot splice in: only the holder of the session's keys makes a box that opens. Returns
/// whether a session moved.
pub fn hand_over(now: Instant, listeners: &mut [&mut Listener]) -> bool {
    let mut moved = false;
    for i in 0..listeners.len() {
        while let Some(r) = listeners[i].resumes.pop_front() {
            let found = (0..listeners.len())
                .filter(|&j| j != i)
                .find_map(|j| listeners[j].release(now, &r));
            if let Some(m) = found {
                listeners[i].adopt(now, r, m);
                moved = true;
            }
        }
    }
    moved
}

impl Listener {
    /// A listener that began at `started` (its `timeout` counts from there).
    pub fn new(started: Instant, opts: ListenOptions, rng: StdRng) -> Self {
        Self {
            opts,
            rng,
            cookie: [0; super::codec::COOKIE_LEN],
            started,
            local: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            port_delta: None,
            phase: Phase::Idle,
            sessions: BTreeMap::new(),
            ended: VecDeque::new(),
            served: 0,
            next_keepalive: started,
            last_server: started,
            out: VecDeque::new(),
            events: VecDeque::new(),
            streams: DirectStreams::default(),
            outcome: None,
            dual: DualStack::default(),
            budget: ProbeBudget::default(),
            resumes: VecDeque::new(),
            resume_tries: BTreeMap::new(),
            failover: false,
            mapping: None,
            mapping_line: false,
            random_allocation: false,
            reflexive: None,
        }
    }

    /// Punches over `dual.families` and registers `dual.candidates` too (issue 13: the driver's
    /// socket of the other family); before [`start`](Self::start).
    pub fn dual_stack(&mut self, dual: DualStack) {
        self.dual = dual;
    }

    /// This machine is one of several of one listener (one per server, joined by
    /// [`hand_over`]): its sessions wait [`FAILOVER_PEER_IDLE`] for a silent peer.
    pub fn enable_failover(&mut self) {
        self.failover = true;
    }

    /// Shares `budget` among this listener's sessions (by default each listener has its own
    /// [`ProbeBudget::default`]); give the machines of one `punch listen` the same one.
    pub fn set_probe_budget(&mut self, budget: ProbeBudget) {
        self.budget = budget;
    }

    /// Whether `m` (raw `bytes`, from `from`) is a box for a fresh session that only a session
    /// moving here could have sealed; if so it waits for [`hand_over`].
    fn offer_resume(
        &mut self,
        now: Instant,
        from: SocketAddr,
        m: &PunchMessage,
        bytes: &[u8],
    ) -> bool {
        let PunchMessage::Sealed {
            session,
            handshake: None,
            sealed: Some(sealed),
            ..
        } = m
        else {
            return false;
        };
        let fresh = self
            .sessions
            .get(session)
            .is_some_and(|(s, _)| s.channel().is_some_and(|c| !c.is_ready()));
        if from != self.opts.server || !fresh {
            return false;
        }
        let (tries, since) = self.resume_tries.entry(*session).or_insert((0, now));
        if now.saturating_duration_since(*since) >= RELEASE_QUIET {
            (*tries, *since) = (0, now);
        }
        if *tries < MAX_RESUME_TRIES && self.resumes.len() < MAX_RESUMES {
            *tries += 1;
            self.resumes.push_back(Resume {
                session: *session,
                from,
                bytes: bytes.to_vec(),
                sealed: sealed.clone(),
            });
        }
        true
    }

    /// Releases the relayed session whose channel opens `r`'s box (it is moving to a sibling).
    fn release(&mut self, now: Instant, r: &Resume) -> Option<Moved> {
        let id = self.sessions.iter().find_map(|(id, (s, _))| {
            let relayed =
                !s.route().is_some_and(Route::is_direct) && s.peer_quiet(now) >= RELEASE_QUIET;
            let theirs = s.channel().is_some_and(|c| c.verifies(&r.sealed));
            (relayed && theirs).then_some(*id)
        })?;
        let (session, echoed) = self.sessions.remove(&id)?;
        self.streams.stop(id);
        self.resume_tries.remove(&id);
        Some(Moved { session, echoed })
    }

    /// Continues `m` here in place of the fresh session `r` named, under that id, and hands it
    /// the box that brought it.
    fn adopt(&mut self, now: Instant, r: Resume, m: Moved) {
        let Moved {
            mut session,
            echoed,
        } = m;
        self.resume_tries.remove(&r.session);
        let server = self.opts.server;
        session.rehome(now, server, Some(self.local), r.session, &[]);
        self.sessions.insert(r.session, (session, echoed));
        self.handle_datagram(now, r.from, &r.bytes);
    }

    /// Registers from `local` (the socket every datagram uses; over TCP the registered port).
    /// `prediction`: this side's measured allocation (UDP, `--predict`), reported and registered.
    pub fn start(&mut self, now: Instant, local: SocketAddr, prediction: Option<Prediction>) {
        if !matches!(self.phase, Phase::Idle) {
            return;
        }
        self.local = local;
        self.random_allocation = super::peer::random_allocation(prediction.as_ref());
        if let Some(p) = prediction {
            self.port_delta = p.delta;
            self.events.push_back(ListenEvent::Predicted {
                measured_ports: p.measured_ports,
                delta: p.delta,
            });
        }
        let reg = self.register();
        match Request::new(now, &reg, Duration::from_secs(2), self.opts.transport) {
            Some(r) => {
                self.phase = Phase::Registering(r);
                self.handle_timeout(now);
            }
            None => self.finish(Err(PunchError::Refused(
                self.opts.server,
                "the registration cannot be encoded".into(),
            ))),
        }
    }

    /// The gateway's mapping of our socket's port (issue 12): its external address, when offered,
    /// is registered as our first candidate (in the first REGISTER if called before
    /// [`Listener::start`], else from the next keepalive on), and after the first `registered`
    /// comes a `port-mapping` event with it, a problem added when the gateway's claimed address
    /// is not the one the server saw.
    pub fn set_port_mapping(&mut self, mapping: super::mapping::PunchMapping) {
        self.mapping = Some(mapping);
        self.mapping_line = true;
    }

    fn mapped_candidate(&self) -> Option<SocketAddr> {
        let m = self.mapping.as_ref()?;
        m.external.filter(|_| m.offered)
    }

    fn register(&mut self) -> PunchMessage {
        let tid = TransactionId::from_rng(&mut self.rng);
        PunchMessage::Register {
            tid,
            id: self.opts.id.clone(),
            candidates: self.dual.announce(super::mapping::candidates(
                self.local,
                self.mapped_candidate(),
            )),
            port_delta: self.port_delta,
            proof: self
                .opts
                .identity
                .prove(Purpose::Register, &tid, &self.opts.id),
        }
    }

    /// A REGISTER with the server's cookie: the keepalive, and the answer to a new challenge.
    fn keepalive(&mut self) {
        let r = self.register();
        if let Some(payload) = r
            .to_vec()
            .ok()
            .and_then(|b| super::codec::with_cookie(&b, &self.cookie))
        {
            let destination = self.opts.server;
            self.out.push_back(Transmit {
                source: self.local,
                destination,
                payload,
            });
        }
    }

    pub fn poll_event(&mut self) -> Option<ListenEvent> {
        self.events.pop_front()
    }

    /// How many sessions were served (`Ok`) or why the listener stopped; taken once.
    pub fn poll_outcome(&mut self) -> Option<Result<u64, PunchError>> {
        self.outcome.take()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn send(&mut self, destination: SocketAddr, m: &PunchMessage) {
        if let Ok(payload) = m.to_vec() {
            self.out.push_back(Transmit {
                source: self.local,
                destination,
                payload,
            });
        }
    }

    /// Stops serving: the driver's shutdown signal. Counts as success.
    pub fn shutdown(&mut self) {
        if !matches!(self.phase, Phase::Done) {
            self.finish(Ok(self.served));
        }
    }

    /// Ends the listener: stops pending direct opens and, once registered, unregisters (best
    /// effort).
    fn finish(&mut self, outcome: Result<u64, PunchError>) {
        let registered = matches!(self.phase, Phase::Serving);
        self.phase = Phase::Done;
        for id in self.sessions.keys().copied().collect::<Vec<_>>() {
            self.streams.stop(id);
        }
        if registered {
            let tid = TransactionId::from_rng(&mut self.rng);
            let bye = PunchMessage::Unregister {
                tid,
                id: self.opts.id.clone(),
                proof: self
                    .opts
                    .identity
                    .prove(Purpose::Unregister, &tid, &self.opts.id),
            };
            let server = self.opts.server;
            self.send(server, &bye);
        }
        self.outcome = Some(outcome);
    }

    fn registered(&mut self, now: Instant, m: PunchMessage) {
        let server = self.opts.server;
        match m {
            PunchMessage::RegisterOk { mapped, .. } => {
                self.reflexive = Some(mapped);
                self.events.push_back(ListenEvent::Registered {
                    id: self.opts.id.clone(),
                    transport: self.opts.transport,
                    local: self.local.to_string(),
                    reflexive: mapped.to_string(),
                    key: self.opts.identity.public().to_string(),
                });
                if std::mem::take(&mut self.mapping_line) {
                    if let Some(mut m) = self.mapping.clone() {
                        let claim = m
                            .external
                            .map(|e| super::mapping::check_external(e, mapped));
                        m.problems.extend(claim.flatten());
                        self.events.push_back(ListenEvent::PortMapping(m));
                    }
                }
                self.phase = Phase::Serving;
                self.next_keepalive = now + KEEPALIVE;
                self.last_server = now;
                self.step(now);
            }
            PunchMessage::Error {
                code: c, reason, ..
            } => self.finish(Err(PunchError::Refused(server, format!("{c} {reason}")))),
            _ => self.finish(Err(PunchError::Refused(server, "unexpected answer".into()))),
        }
    }

    fn message(&mut self, now: Instant, from: SocketAddr, m: PunchMessage) {
        if from == self.opts.server {
            match m {
                PunchMessage::RegisterOk { .. } => {
                    self.last_server = now;
                    return;
                }
                PunchMessage::Error {
                    method: method::REGISTER,
                    code,
                    ..
                } => {
                    self.last_server = now;
                    if code == super::codec::refusal::COOKIE {
                        // A new cookie (taken in `handle_datagram`): register again with it.
                        self.keepalive();
                    }
                    return;
                }
                PunchMessage::Introduce {
                    tid,
                    session,
                    peer,
                    start_in_ms,
                } => {
                    self.last_server = now;
                    // Every copy is answered, so the server stops retransmitting.
                    self.send(from, &PunchMessage::IntroduceOk { tid, session });
                    if self.sessions.contains_key(&session)
                        || self.ended.contains(&session)
                        || self.sessions.len() >= MAX_LISTEN_SESSIONS
                    {
                        return;
                    }
                    let start_in = Duration::from_millis(u64::from(start_in_ms).min(2000));
                    // Punch as long as the connector does (bounded), else our default.
                    let window = peer.punch_window_ms.map_or(self.opts.punch_window, |w| {
                        Duration::from_millis(u64::from(w).clamp(50, 60_000))
                    });
                    let mut config = session_config(self.opts.transport, false, window);
                    if self.failover {
                        config.peer_idle = FAILOVER_PEER_IDLE;
                    }
                    let s = Session::new(
                        now,
                        session,
                        Role::Listener,
                        config,
                        self.opts.server,
                        PunchPlan {
                            local: self.local,
                            start_in,
                            targets: targets(&peer),
                        },
                        StdRng::seed_from_u64(self.rng.gen()),
                    );
                    // Every session answers the connector's Noise handshake with our key.
                    let Some(channel) = Channel::responder(&self.opts.identity, &mut self.rng)
                    else {
                        return;
                    };
                    let mut s = s.secure(channel).with_budget(self.budget.clone());
                    if let Some(f) = self.dual.families {
                        s = s.probe_families(f, targets(&peer));
                    }
                    if let (Transport::Udp, Some(reflexive)) = (self.opts.transport, self.reflexive)
                    {
                        let part = super::peer::birthday_part(
                            self.local,
                            reflexive,
                            self.random_allocation,
                            &peer,
                            super::peer::birthday_probes(),
                            &mut self.rng,
                        );
                        s = s.with_birthday(part);
                    }
                    if self.opts.transport == Transport::Tcp {
                        let start = now + start_in;
                        self.streams
                            .open(session, peer.reflexive, start, start + window);
                    }
                    self.events.push_back(ListenEvent::SessionStarted {
                        session: session.to_string(),
                        peer: peer.reflexive.to_string(),
                    });
                    self.sessions.insert(session, (s, 0));
                    return;
                }
                _ => {}
            }
        }
        if let Some(id) = m.session() {
            if let Some((s, _)) = self.sessions.get_mut(&id) {
                s.handle_message(now, from, m);
            }
        }
    }

    /// Runs every session (echoing what each delivered), retires the ended ones, keeps the
    /// registration alive and decides whether the listener is done.
    fn step(&mut self, now: Instant) {
        let mut done = Vec::new();
        for (id, (s, echoed)) in self.sessions.iter_mut() {
            s.handle_timeout(now);
            // Echo exactly what was delivered, in delivery order, while the echo queue has
            // room; the rest stays in the receiver, whose window closes until the peer acks.
            while s.has_room() {
                let Some(m) = s.poll_deliver() else { break };
                if s.push(m).is_some() {
                    *echoed += 1;
                }
            }
            s.handle_timeout(now);
            self.out.extend(std::iter::from_fn(|| s.poll_transmit()));
            if s.is_closed() || s.error().is_some() {
                done.push(*id);
            }
        }
        for id in done {
            let Some((s, echoed)) = self.sessions.remove(&id) else {
                continue;
            };
            self.resume_tries.remove(&id);
            let path = match s.route() {
                Some(Route::Direct(_)) => PathTaken::Direct,
                Some(Route::Relay) => PathTaken::Relayed,
                None => PathTaken::Failed,
            };
            self.events.push_back(ListenEvent::SessionEnded {
                session: id.to_string(),
                path,
                peer: match s.route() {
                    Some(Route::Direct(a)) => Some(a.to_string()),
                    _ => None,
                },
                messages_echoed: echoed,
                switched_to_direct: s.switched_to_direct(),
                error: s.error().map(|e| match s.rejected_packets() {
                    0 => e.to_string(),
                    n => format!("{n} packets of this session failed authentication (tampered with or injected on the way) and were dropped: {e}"),
                }),
            });
            if self.ended.len() == RECENT_ENDED {
                self.ended.pop_front();
            }
            self.ended.push_back(id);
            self.served += 1;
        }
        if self.opts.count.is_some_and(|c| self.served >= c) {
            return self.finish(Ok(self.served));
        }
        if let Some(t) = self.opts.timeout {
            if now >= self.started + t {
                let e = PunchError::ListenTimeout(t, self.served, self.opts.count.unwrap_or(0));
                return self.finish(Err(e));
            }
        }
        if now >= self.next_keepalive {
            // Re-registering is the keepalive; it also re-creates the entry after a server restart.
            self.keepalive();
            self.next_keepalive = now + KEEPALIVE;
        }
        let server_idle = KEEPALIVE * 3 + Duration::from_millis(500);
        if now.saturating_duration_since(self.last_server) > server_idle {
            let e = PunchError::ServerGone(self.opts.server, now - self.last_server);
            self.finish(Err(e));
        }
    }
}

impl PeerMachine for Listener {
    fn poll_transmit(&mut self) -> Option<Transmit<SocketAddr>> {
        self.out.pop_front()
    }

    fn poll_birthday(&mut self) -> Option<super::session::BirthdayOpen> {
        self.sessions
            .values_mut()
            .find_map(|(s, _)| s.poll_birthday())
    }

    fn poll_stream(&mut self) -> Option<StreamCommand> {
        self.streams.poll()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Idle | Phase::Done => None,
            Phase::Registering(r) => Some(r.poll_timeout()),
            Phase::Serving => {
                let mut wake = self.next_keepalive;
                for t in self.sessions.values().filter_map(|(s, _)| s.poll_timeout()) {
                    wake = wake.min(t);
                }
                if let Some(t) = self.opts.timeout {
                    wake = wake.min(self.started + t);
                }
                Some(wake)
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Registering(r) => match r.poll(now) {
                Ok(Some(payload)) => self.out.push_back(Transmit {
                    source: self.local,
                    destination: self.opts.server,
                    payload,
                }),
                Ok(None) => {}
                Err(wait) => self.finish(Err(PunchError::Unreachable(
                    self.opts.server,
                    self.opts.transport,
                    wait,
                ))),
            },
            Phase::Serving => self.step(now),
            Phase::Idle | Phase::Done => {}
        }
    }

    /// A datagram (UDP) or a framed message (TCP) from `from`.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let m = PunchMessage::decode(bytes);
        if from == self.opts.server {
            if let Some(c) = super::codec::cookie(bytes) {
                self.cookie = c;
            }
        }
        match &mut self.phase {
            Phase::Registering(r) => {
                // Anything but the answer (from the server, with our transaction id) is dropped.
                if let Ok(m) = m {
                    if from == self.opts.server && r.answered_by(&m) {
                        if r.on_challenge(now, bytes, &m) {
                            return self.handle_timeout(now);
                        }
                        self.registered(now, m);
                    }
                }
            }
            Phase::Serving => {
                if let Ok(m) = m {
                    if !self.offer_resume(now, from, &m, bytes) {
                        self.message(now, from, m);
                    }
                }
                self.step(now);
            }
            Phase::Idle | Phase::Done => {}
        }
    }

    /// The driver's attempts opened a direct TCP stream for `session` to `peer`: say hello on it.
    fn handle_stream_up(
        &mut self,
        now: Instant,
        session: SessionId,
        peer: SocketAddr,
        _attempts: u32,
    ) {
        if let Some((s, _)) = self.sessions.get_mut(&session) {
            s.hello(peer);
        }
        if matches!(self.phase, Phase::Serving) {
            self.step(now);
        }
    }

    /// Our registered port accepted a connection from `peer`: whether the driver should take it
    /// as a session's direct stream — the session whose peer the server saw at that address and
    /// that has no direct path yet (else the driver drops it).
    fn handle_accepted(&mut self, now: Instant, peer: SocketAddr) -> bool {
        let owner = self
            .sessions
            .iter()
            .find(|(_, (s, _))| {
                s.targets().first() == Some(&peer) && !s.route().is_some_and(Route::is_direct)
            })
            .map(|(id, _)| *id);
        let Some(id) = owner else {
            return false;
        };
        self.streams.stop(id);
        if matches!(self.phase, Phase::Serving) {
            self.step(now);
        }
        true
    }

    /// A TCP stream (to the server or to a peer) closed.
    fn handle_stream_down(&mut self, now: Instant, addr: SocketAddr) {
        if matches!(self.phase, Phase::Done | Phase::Idle) {
            return;
        }
        if addr == self.opts.server {
            return self.finish(Err(PunchError::ServerClosed(self.opts.server)));
        }
        let unconfirmed = self
            .sessions
            .values()
            .any(|(s, _)| s.targets().first() == Some(&addr) && s.direct_at().is_none());
        if unconfirmed {
            self.streams.retry(now, addr);
        }
        if matches!(self.phase, Phase::Serving) {
            self.step(now);
        }
    }

    fn handle_stream_failed(&mut self, _now: Instant, _attempts: u32) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::codec::PeerInfo;
    use crate::punch::identity::TestPeer;
    use crate::punch::reliable::{ReliableConfig, SEND_QUEUE_WINDOWS};

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    const SERVER: &str = "198.51.100.1:3490";

    /// A TCP listener registered at `t0`, as its driver would see it.
    fn registered(t0: Instant) -> Listener {
        registered_over(t0, Transport::Tcp)
    }

    fn registered_over(t0: Instant, transport: Transport) -> Listener {
        let opts = ListenOptions {
            id: "bob".into(),
            server: sa(SERVER),
            transport,
            count: None,
            timeout: None,
            punch_window: Duration::from_millis(1500),
            predict: false,
            identity: Identity::from_seed([1; 32]),
        };
        let mut l = Listener::new(t0, opts, StdRng::seed_from_u64(1));
        l.start(t0, sa("10.1.0.2:4000"), None);
        let reg = l.poll_transmit().expect("register");
        assert_eq!(reg.destination, sa(SERVER));
        let tid = PunchMessage::decode(&reg.payload).expect("decode").tid();
        let ok = PunchMessage::RegisterOk {
            tid,
            mapped: sa("203.0.113.1:4000"),
        };
        l.handle_datagram(t0, sa(SERVER), &ok.to_vec().expect("enc"));
        assert!(matches!(
            l.poll_event(),
            Some(ListenEvent::Registered { .. })
        ));
        l
    }

    fn introduce(l: &mut Listener, now: Instant, session: SessionId, peer: SocketAddr) {
        let m = PunchMessage::Introduce {
            tid: TransactionId::from_rng(&mut StdRng::seed_from_u64(session.0)),
            session,
            peer: PeerInfo {
                reflexive: peer,
                candidates: vec![],
                port_delta: None,
                punch_window_ms: Some(1000),
                key: None,
            },
            start_in_ms: 20,
        };
        l.handle_datagram(now, sa(SERVER), &m.to_vec().expect("enc"));
    }

    /// [`introduce`], then the connector's Noise handshake through the relay: the peer that can
    /// seal what the session accepts. The listener's transmits so far are left queued.
    fn introduce_secure(
        l: &mut Listener,
        now: Instant,
        session: SessionId,
        peer: SocketAddr,
    ) -> TestPeer {
        introduce(l, now, session, peer);
        let mut c = TestPeer::new(&l.opts.identity.public(), session);
        l.handle_datagram(now, sa(SERVER), &c.msg1());
        let mut queued = Vec::new();
        while let Some(t) = l.poll_transmit() {
            c.take_msg2(&t.payload);
            queued.push(t);
        }
        assert!(c.take_msg2(&[]), "the listener answered the handshake");
        l.out.extend(queued);
        c
    }

    #[test]
    fn over_tcp_the_listener_asks_for_streams_and_keeps_only_the_peers() {
        let t0 = Instant::now();
        let mut l = registered(t0);
        let (s, peer) = (SessionId(7), sa("203.0.113.2:5000"));
        let mut c = introduce_secure(&mut l, t0, s, peer);
        let start = t0 + Duration::from_millis(20);
        let until = start + Duration::from_millis(1000);
        let open = StreamCommand::Open {
            session: s,
            peer,
            start,
            until,
        };
        assert_eq!(l.poll_stream(), Some(open));
        assert_eq!(l.poll_stream(), None);
        // A stream that closes before it carried the session is tried again, in its window.
        let now = t0 + Duration::from_millis(100);
        l.handle_stream_down(now, peer);
        let retry = StreamCommand::Open {
            session: s,
            peer,
            start: now + Duration::from_millis(40),
            until,
        };
        assert_eq!(l.poll_stream(), Some(retry));
        // Our attempts opened one: a hello PROBE of the session goes on it.
        while l.poll_transmit().is_some() {}
        l.handle_stream_up(now, s, peer, 1);
        let hello = std::iter::from_fn(|| l.poll_transmit()).find(|t| t.destination == peer);
        let hello = hello.and_then(|t| c.open(&t.payload));
        assert!(matches!(hello, Some(PunchMessage::Probe { session, .. }) if session == s));
        // A connection accepted from anyone but the peer's server-reflexive address is refused;
        // the peer's is taken and the attempts stop, and no retry follows after that.
        assert!(!l.handle_accepted(now, sa("203.0.113.2:5001")));
        assert!(l.handle_accepted(now, peer));
        assert_eq!(l.poll_stream(), Some(StreamCommand::Stop { session: s }));
        l.handle_stream_down(now, peer);
        assert_eq!(l.poll_stream(), None);
        // The server's connection closing ends the listener.
        l.handle_stream_down(now, sa(SERVER));
        assert!(matches!(
            l.poll_outcome(),
            Some(Err(PunchError::ServerClosed(_)))
        ));
    }

    #[test]
    fn a_full_session_table_ignores_introductions_but_answers_them() {
        let t0 = Instant::now();
        let mut l = registered(t0);
        for i in 0..=MAX_LISTEN_SESSIONS as u64 {
            introduce(&mut l, t0, SessionId(i + 1), sa("203.0.113.2:5000"));
        }
        let started = std::iter::from_fn(|| l.poll_event())
            .filter(|e| matches!(e, ListenEvent::SessionStarted { .. }))
            .count();
        assert_eq!(started, MAX_LISTEN_SESSIONS);
        let answers = std::iter::from_fn(|| l.poll_transmit())
            .filter(|t| {
                matches!(
                    PunchMessage::decode(&t.payload),
                    Ok(PunchMessage::IntroduceOk { .. })
                )
            })
            .count();
        assert_eq!(answers, MAX_LISTEN_SESSIONS + 1);
    }

    #[test]
    fn a_peer_that_never_acknowledges_cannot_grow_the_listeners_memory() {
        // Issue 14, H5: the listener echoes what it receives; a connector that sends and never
        // acknowledges the echoes used to grow the echo queue by one message per message sent.
        let t0 = Instant::now();
        let mut l = registered_over(t0, Transport::Udp);
        let (session, peer) = (SessionId(7), sa("203.0.113.2:5000"));
        let mut c = introduce_secure(&mut l, t0, session, peer);
        let sent = 20_000u64;
        let mut now = t0;
        for seq in 0..sent {
            if seq % 100 == 0 {
                now += Duration::from_millis(1);
                l.handle_timeout(now);
                while l.poll_transmit().is_some() {}
            }
            let data = PunchMessage::Data {
                tid: TransactionId::from_rng(&mut StdRng::seed_from_u64(seq)),
                session,
                seq: Some(seq),
                ack: 0,
                payload: vec![0xab; 1000],
            };
            l.handle_datagram(now, peer, &c.seal(&data));
        }
        l.handle_timeout(now);
        let (s, echoed) = l.sessions.get(&session).expect("the session is alive");
        let window = ReliableConfig::default().window;
        let bound = (SEND_QUEUE_WINDOWS + 2) * window;
        assert!(
            s.held_messages() <= bound,
            "the session holds {} messages after {sent} unacknowledged ones (bound {bound})",
            s.held_messages()
        );
        // It did echo until its queue filled, and then stopped.
        assert_eq!(*echoed, (SEND_QUEUE_WINDOWS * window) as u64);
        // Once the peer acknowledges the echoes, the messages that waited in the receiver are
        // echoed too: flow control held them back, it did not drop them.
        let ack = PunchMessage::Data {
            tid: TransactionId::from_rng(&mut StdRng::seed_from_u64(sent)),
            session,
            seq: None,
            ack: *echoed,
            payload: vec![],
        };
        l.handle_datagram(now, peer, &c.seal(&ack));
        l.handle_timeout(now);
        let (_, echoed) = l.sessions.get(&session).expect("the session is alive");
        assert_eq!(*echoed, ((SEND_QUEUE_WINDOWS + 1) * window) as u64);
    }
}
