//! One peer's side of a punch session: hole punching, path choice, relay fallback, relay-first
//! upgrade and the reliable ordered message stream, as a state machine with no I/O.
//!
//! Inputs: [`Session::handle_message`] (a message and where it came from) and
//! [`Session::handle_timeout`]; outputs: [`Session::poll_transmit`] (a
//! [`Transmit`] from the peer's socket; the relay is simply the server's
//! address), [`Session::poll_deliver`] (application messages, in
//! order, once each) and [`Session::poll_timeout`].
//!
//! Punching (UDP): from the agreed start, every `probe_interval` until the punch window closes,
//! a PROBE goes to every candidate of the peer (its server-reflexive address, its local
//! addresses, predicted ports). A PROBE is answered to wherever it came from, and that source
//! joins the candidates (peer-reflexive: what makes a one-directional opening enough, as with a
//! cone on one side and a symmetric NAT on the other), with an immediate probe back. A PROBE
//! answered from the address it was sent to proves the path both ways: the first such address
//! becomes the direct path. A PROBE that arrives after the window is still answered and probed
//! back once: the peer takes the path on the answer, so this side takes it too when the probe back
//! is answered (a relay fallback then upgrades like relay-first). Over TCP the driver establishes the direct stream itself and calls
//! [`Session::set_direct`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;

use super::codec::{code, method, PunchMessage};
use super::identity::{Channel, Handshake};
use super::reliable::{ReliableConfig, ReliableReceiver, ReliableSender};
use super::SessionId;
use crate::net::Transmit;
use crate::stun::TransactionId;

/// Most addresses a session probes (candidates, peer-reflexive sources, predicted ports).
pub const MAX_TARGETS: usize = 48;
/// After the punch window, a relay-first session probes this many times less often.
pub const RELAY_FIRST_SLOWDOWN: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Connector,
    Listener,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Relay,
    Direct(SocketAddr),
}

impl Route {
    pub fn is_direct(self) -> bool {
        matches!(self, Route::Direct(_))
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SessionConfig {
    /// How long direct paths are tried before falling back to the relay (and how long probes
    /// go out in relay-first mode).
    pub punch_window: Duration,
    pub probe_interval: Duration,
    /// Data flows through the relay at once and moves to a direct path when one appears.
    pub relay_first: bool,
    /// Send UDP probes (false over TCP: the driver opens the direct stream).
    pub probe: bool,
    /// Keepalive on the direct path, and the connector's refresh of its session at the server.
    pub keepalive: Duration,
    /// Nothing heard from the peer for this long (after the punch window): the peer is gone.
    pub peer_idle: Duration,
    /// The connector's refreshes unanswered for this long: the server is gone.
    pub server_idle: Duration,
    /// Connector, UDP, with other servers to move to: a relayed session whose server left its
    /// refreshes unanswered for [`relay_idle`](Self::relay_idle) is marked
    /// [`relay_lost`](Session::relay_lost) instead of failing, and the connector moves it to
    /// another relay ([`Session::rehome`]).
    pub relay_failover: bool,
    /// How long the relay may leave refreshes unanswered before it counts as lost (failover).
    pub relay_idle: Duration,
    pub reliable: ReliableConfig,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            punch_window: Duration::from_millis(1500),
            probe_interval: Duration::from_millis(50),
            relay_first: false,
            probe: true,
            keepalive: Duration::from_millis(500),
            peer_idle: Duration::from_secs(4),
            server_idle: Duration::from_secs(3),
            relay_failover: false,
            // Two refreshes (every 500 ms) unanswered: well inside the listener's 4 s of
            // patience with a silent peer, so the session moves before either side gives up.
            relay_idle: Duration::from_millis(1000),
            reliable: ReliableConfig::default(),
        }
    }
}

/// Why a session ended without the application closing it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("peer stopped answering for {0:.1?} (it left or its path died)")]
    PeerGone(Duration),
    #[error("rendezvous server {0} stopped answering for {1:.1?} (killed or unreachable); the relayed session cannot continue")]
    ServerGone(SocketAddr, Duration),
    #[error("rendezvous server {0} no longer knows this session (it restarted or the peer left)")]
    ServerLostSession(SocketAddr),
    #[error("peer closed the session before every message was echoed")]
    PeerClosed,
    #[error("peer closed its direct connection (it left)")]
    PeerConnectionClosed,
    #[error("rendezvous server {0} refused the relay: {1} {2}")]
    RelayRefused(SocketAddr, u16, String),
}

/// Counters for the report.
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub data_sent_direct: u64,
    pub data_sent_relayed: u64,
    pub data_received_direct: u64,
    pub data_received_relayed: u64,
    pub retransmissions: u64,
    pub duplicates_dropped: u64,
    /// Clean (never retransmitted) send-to-ack times, by whether they went direct.
    pub rtt_samples: Vec<(bool, Duration)>,
    pub probe_rtt: Option<Duration>,
    pub server_lost: bool,
    /// Probes not sent because the listener's global probe budget was spent.
    pub probes_denied: u64,
    /// Times the session moved to another relay (failover).
    pub relay_moves: u64,
    /// Birthday-technique packets sent: the hard side's sockets' probes, or the easy side's
    /// probes of random ports.
    pub birthday_sent: u64,
}

/// Probes per second a listener's sessions may send together, by default (`--probe-budget`).
/// One honest session probes a few targets every 50 ms (60-400 probes/s with prediction); the
/// budget lets a few punch at full speed at once and caps what many sessions together send, so
/// N introductions cannot make the listener send N times one session's rate (issue 14, item 4).
pub const DEFAULT_PROBE_BUDGET: u32 = 1000;

/// One token bucket shared by every session of a listener (and by its machines, one per
/// server): each probe a session starts takes a token; without one the probe is skipped. The
/// per-session bounds (targets, window, `Session::may_probe`) still apply on top. Shared
/// through a lock so the sessions of one listener need not be stepped together.
#[derive(Clone, Debug)]
pub struct ProbeBudget(Arc<Mutex<Bucket>>);

#[derive(Debug)]
struct Bucket {
    per_second: u32,
    tokens: f64,
    last: Option<Instant>,
}

impl Default for ProbeBudget {
    fn default() -> Self {
        Self::new(DEFAULT_PROBE_BUDGET)
    }
}

impl ProbeBudget {
    /// `per_second` probes per second, with a burst of one second's worth (at least 1).
    pub fn new(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        Self(Arc::new(Mutex::new(Bucket {
            per_second,
            tokens: f64::from(per_second),
            last: None,
        })))
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes one probe's token at `now`; `false` (and counted) when the budget is spent.
    pub fn take(&self, now: Instant) -> bool {
        let mut b = self.bucket();
        let rate = f64::from(b.per_second);
        if let Some(last) = b.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * rate;
            b.tokens = (b.tokens + refill).min(rate);
        }
        b.last = Some(b.last.map_or(now, |l| l.max(now)));
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// From where, toward what and when a session punches: the peer's own socket, and what the
/// server told it (CONNECT's answer or INTRODUCE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PunchPlan {
    /// The peer's socket every message of the session leaves from (over TCP, the registered port).
    pub local: SocketAddr,
    /// From the introduction to the first probe round (both sides start together).
    pub start_in: Duration,
    /// The peer's addresses to probe, best first (the server-reflexive address leads).
    pub targets: Vec<SocketAddr>,
}

#[derive(Debug)]
pub struct Session {
    id: SessionId,
    /// The id the current server knows the session by: [`id`](Self::id) until the session moved
    /// to another relay, then that relay's id (the outer id of every sealed message; the sealed
    /// messages inside keep `id`, which both peers bound to their channel).
    wire: SessionId,
    /// Failover: the relay stopped answering (see [`SessionConfig::relay_failover`]).
    relay_lost: bool,
    /// The listener's global probe budget, when it set one.
    budget: Option<ProbeBudget>,
    role: Role,
    config: SessionConfig,
    server: SocketAddr,
    start_at: Instant,
    punch_until: Instant,
    targets: Vec<SocketAddr>,
    next_probe: Instant,
    probes: HashMap<TransactionId, (SocketAddr, Instant)>,
    direct: Option<SocketAddr>,
    direct_at: Option<Instant>,
    route: Option<Route>,
    switched: bool,
    tx: ReliableSender,
    rx: ReliableReceiver,
    first_route: HashMap<u64, bool>,
    local: SocketAddr,
    out: VecDeque<Transmit<SocketAddr>>,
    ack_due: bool,
    last_peer: Instant,
    next_keepalive: Instant,
    last_server: Instant,
    refreshes: Vec<TransactionId>,
    closed: bool,
    error: Option<SessionError>,
    stats: SessionStats,
    /// Transaction ids of probes, data and close messages.
    rng: StdRng,
    /// The end-to-end channel (issue 14): with one, every peer-to-peer message is sealed and
    /// anything unsealed, forged, tampered or replayed is dropped. `None` only in the unit tests
    /// of the punching logic below.
    channel: Option<Channel>,
    /// Connector: when msg1 goes to the relay again while the handshake is not done.
    next_handshake: Instant,
    /// A TCP hello that waits for the handshake.
    pending_hello: Option<SocketAddr>,
    /// Peer-to-peer messages that came unsealed while the session is secure: dropped.
    unsealed_dropped: u64,
    /// The families probed (issue 13); `None`: the server's family only.
    families: Option<super::peer::ProbeFamilies>,
    /// The birthday technique's part this side plays when the window closes without a path.
    birthday: Option<Birthday>,
    /// The hard side's opening, for the driver's sockets ([`Session::poll_birthday`]).
    birthday_out: Option<BirthdayOpen>,
}

/// The birthday technique (issue 14, item 5; `traversal::birthday`): when the plain punch has
/// found no path 250 ms (`BIRTHDAY_AFTER`) into the window between a side whose mapping changes
/// per destination at random ports ("hard") and one with an endpoint-independent mapping
/// ("easy"), the hard side opens
/// [`BIRTHDAY_SOCKETS`] sockets and sends one probe from each to the easy side's reflexive
/// address, so its NAT holds that many mappings admitting it, and the easy side probes random
/// ports of the hard side's address, once each, paced. A probe that lands in one of those
/// mappings is answered through it, and the path is a direct one like any other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Birthday {
    /// Open the sockets toward `to` (the easy side's reflexive address).
    Hard { to: SocketAddr },
    /// Probe these addresses (random ports of the hard side's address), once each.
    Easy { targets: Vec<SocketAddr> },
}

/// Sockets the hard side opens: the classic 256 ([`crate::traversal::BIRTHDAY_SOCKETS`]).
pub const BIRTHDAY_SOCKETS: usize = crate::traversal::BIRTHDAY_SOCKETS as usize;
/// The technique starts this long into the punch window when the plain punch found no path by
/// then (a path that exists is found in one or two rounds); both sides count from the start the
/// server gave them, so the hard side's mappings exist when the easy side's probes arrive.
const BIRTHDAY_AFTER: Duration = Duration::from_millis(250);
/// The easy side starts probing this much later than the hard side opens its sockets.
const BIRTHDAY_EASY_DELAY: Duration = Duration::from_millis(100);
/// One easy-side probe per this interval (~670 per second, within the listener's default probe
/// budget beside its plain probes: a 754-port opening takes 1.1 s, inside a 1.5 s window).
const BIRTHDAY_PACE: Duration = Duration::from_micros(1500);

/// What the hard side asks its driver to do: open one socket per payload and send that payload
/// (a sealed probe of this session) from it to `to`; a datagram arriving on one of those sockets
/// is the session's, and replies to its source leave from that socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BirthdayOpen {
    pub to: SocketAddr,
    pub payloads: Vec<Vec<u8>>,
}

/// How often the connector repeats its handshake message through the relay until answered.
const HANDSHAKE_RTO: Duration = Duration::from_millis(200);

impl Session {
    /// A session told by the server at `now` to start punching `plan.start_in` later toward
    /// `plan.targets`; `rng` supplies its transaction ids.
    pub fn new(
        now: Instant,
        id: SessionId,
        role: Role,
        config: SessionConfig,
        server: SocketAddr,
        plan: PunchPlan,
        rng: StdRng,
    ) -> Self {
        let PunchPlan {
            local,
            start_in,
            targets,
        } = plan;
        let start_at = now + start_in;
        let mut s = Self {
            id,
            wire: id,
            relay_lost: false,
            budget: None,
            role,
            config,
            server,
            start_at,
            punch_until: start_at + config.punch_window,
            targets: Vec::new(),
            next_probe: start_at,
            probes: HashMap::new(),
            direct: None,
            direct_at: None,
            route: None,
            switched: false,
            tx: ReliableSender::new(config.reliable),
            rx: ReliableReceiver::new(config.reliable),
            first_route: HashMap::new(),
            local,
            out: VecDeque::new(),
            ack_due: false,
            last_peer: now,
            next_keepalive: now + config.keepalive,
            last_server: now,
            refreshes: Vec::new(),
            closed: false,
            error: None,
            stats: SessionStats::default(),
            rng,
            channel: None,
            next_handshake: now,
            pending_hello: None,
            unsealed_dropped: 0,
            families: None,
            birthday: None,
            birthday_out: None,
        };
        for t in targets {
            s.add_target(t);
        }
        if config.relay_first {
            s.route = Some(Route::Relay);
        }
        s
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Runs the session over an end-to-end channel: nothing goes to the peer before the Noise
    /// handshake completed, and nothing from it counts unless it opens (issue 14).
    pub fn secure(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Probes over `families` (issue 13: the driver has a socket of each), toward `targets`
    /// (the peer's candidates of both families); targets of other families are dropped.
    pub fn probe_families(
        mut self,
        families: super::peer::ProbeFamilies,
        targets: impl IntoIterator<Item = SocketAddr>,
    ) -> Self {
        self.families = Some(families);
        self.targets.retain(|t| families.allows(*t));
        for t in targets {
            self.add_target(t);
        }
        self
    }

    /// Every probe this session starts takes a token from `budget` (shared by the listener's
    /// sessions); without a token the probe is skipped.
    pub fn with_budget(mut self, budget: ProbeBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Plays `part` of the birthday technique if the plain punch finds no path early in the
    /// window.
    pub fn with_birthday(mut self, part: Option<Birthday>) -> Self {
        self.birthday = part;
        self
    }

    /// The hard side's opening, once, when its plain punch found no path early in the window.
    pub fn poll_birthday(&mut self) -> Option<BirthdayOpen> {
        self.birthday_out.take()
    }

    /// The server this session uses for its relay (and the connector's refreshes).
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Failover: the relay left the connector's refreshes unanswered for
    /// [`SessionConfig::relay_idle`] while the data depends on it; the connector should move the
    /// session with [`Session::rehome`] (or end it).
    pub fn relay_lost(&self) -> bool {
        self.relay_lost
    }

    /// How long nothing came from the peer.
    pub fn peer_quiet(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_peer)
    }

    /// How long the server has not answered the connector's refreshes.
    pub fn server_silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_server)
    }

    /// Moves the session to another relay: `server`, which knows it as `wire` (the session its
    /// CONNECT created there, or introduced), reached from `local` (the listener's socket
    /// registered there; the connector keeps its one socket). The end-to-end channel and the
    /// reliable stream go on unchanged: everything unacknowledged is sent again through the new
    /// relay at once and the receiver drops copies, so the move loses, duplicates and reorders
    /// nothing. `targets`: the peer's addresses as the new server saw them (probed like any).
    pub fn rehome(
        &mut self,
        now: Instant,
        server: SocketAddr,
        local: Option<SocketAddr>,
        wire: SessionId,
        targets: &[SocketAddr],
    ) {
        self.server = server;
        if let Some(l) = local {
            self.local = l;
        }
        self.wire = wire;
        self.relay_lost = false;
        self.last_server = now;
        self.last_peer = now;
        self.refreshes.clear();
        // Refresh at once: the new server confirms it relays for us.
        self.next_keepalive = now;
        self.probes.clear();
        for t in targets {
            self.add_target(*t);
        }
        if !self.route.is_some_and(Route::is_direct) {
            self.tx.path_changed();
            // Something sealed goes through the new relay even with nothing unacked: it is how
            // the peer learns where the session went.
            self.ack_due = true;
        }
        self.stats.relay_moves += 1;
    }

    /// The end-to-end channel, if the session has one.
    pub fn channel(&self) -> Option<&Channel> {
        self.channel.as_ref()
    }

    /// Packets for this session that failed authentication (forged, tampered, replayed, or sent
    /// unsealed): all dropped.
    pub fn rejected_packets(&self) -> u64 {
        self.unsealed_dropped + self.channel.as_ref().map_or(0, Channel::auth_failures)
    }

    /// Whether messages may go to the peer: always without a channel, else once it is up.
    fn can_send(&self) -> bool {
        self.channel.as_ref().is_none_or(Channel::is_ready)
    }
    pub fn route(&self) -> Option<Route> {
        self.route
    }
    pub fn direct_at(&self) -> Option<Instant> {
        self.direct_at
    }
    pub fn switched_to_direct(&self) -> bool {
        self.switched
    }
    pub fn error(&self) -> Option<&SessionError> {
        self.error.as_ref()
    }
    pub fn is_closed(&self) -> bool {
        self.closed
    }
    /// Every message pushed so far was acknowledged by the peer.
    pub fn all_acked(&self) -> bool {
        self.tx.unacked() == 0
    }
    pub fn targets(&self) -> &[SocketAddr] {
        &self.targets
    }
    pub fn stats(&self) -> SessionStats {
        let mut s = self.stats.clone();
        s.retransmissions = self.tx.retransmissions();
        s.duplicates_dropped = self.rx.duplicates();
        s
    }

    fn add_target(&mut self, a: SocketAddr) {
        self.add_target_capped(a, MAX_TARGETS);
    }

    fn add_target_capped(&mut self, a: SocketAddr, cap: usize) {
        if self.may_probe(a) && !self.targets.contains(&a) && self.targets.len() < cap {
            self.targets.push(a);
        }
    }

    /// Whether this session may aim its probes at `target`. Targets come from the server and
    /// the peer, either of which may be hostile (issue 14, H3), so an introduction must not turn
    /// the session into a packet source towards addresses no peer can have: unspecified,
    /// multicast, broadcast, port 0, the other address family, and loopback unless this side or
    /// its server is itself on loopback (a test or a one-host setup).
    fn may_probe(&self, target: SocketAddr) -> bool {
        let ip = target.ip();
        let on_loopback = self.local.ip().is_loopback() || self.server.ip().is_loopback();
        target.port() != 0
            && self
                .families
                .map_or(ip.is_ipv4() == self.server.is_ipv4(), |f| f.allows(target))
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && (on_loopback || !ip.is_loopback())
            && !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
    }

    /// Adds addresses to probe beyond [`MAX_TARGETS`] (birthday ports), up to `cap` in total.
    pub fn add_targets_capped(&mut self, extra: impl IntoIterator<Item = SocketAddr>, cap: usize) {
        for a in extra {
            self.add_target_capped(a, cap);
        }
    }

    /// Ends the session with `e` (the driver saw the peer's connection close).
    pub fn abort(&mut self, e: SessionError) {
        self.fail(e);
    }

    /// Queues an application message; `None` (nothing queued) while the send queue is full.
    pub fn push(&mut self, payload: Vec<u8>) -> Option<u64> {
        self.tx.push(payload)
    }

    /// Whether [`push`](Self::push) would queue another message now.
    pub fn has_room(&self) -> bool {
        self.tx.has_room()
    }

    /// Application messages this session holds: unacknowledged sends, and received messages not
    /// yet taken or waiting for a gap to fill. Bounded by the reliable layer's windows.
    pub fn held_messages(&self) -> usize {
        self.tx.unacked() + self.rx.buffered()
    }

    pub fn poll_deliver(&mut self) -> Option<Vec<u8>> {
        self.rx.poll_deliver()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit<SocketAddr>> {
        self.out.pop_front()
    }

    fn send(&mut self, to: SocketAddr, m: &PunchMessage) {
        let Some(payload) = self.wire_bytes(m) else {
            return;
        };
        self.out.push_back(Transmit {
            source: self.local,
            destination: to,
            payload,
        });
    }

    /// `m` as it goes on the wire: sealed when it is for the peer and the session has a channel.
    fn wire_bytes(&mut self, m: &PunchMessage) -> Option<Vec<u8>> {
        let payload = m.to_vec().ok()?;
        let peer_bound = matches!(
            m,
            PunchMessage::Probe { .. }
                | PunchMessage::ProbeOk { .. }
                | PunchMessage::Data { .. }
                | PunchMessage::Close { .. }
        );
        let payload = match self.channel.as_mut() {
            Some(ch) if peer_bound => {
                // Sealed whole (header, transaction id, session, sequence numbers, payload),
                // with our handshake message beside it until the peer proved it has the keys.
                let sealed = ch.seal(&payload)?;
                let outer = PunchMessage::Sealed {
                    tid: TransactionId::from_rng(&mut self.rng),
                    session: self.wire,
                    handshake: ch.handshake_out().map(<[u8]>::to_vec),
                    sealed: Some(sealed),
                };
                outer.to_vec().ok()?
            }
            _ => payload,
        };
        Some(payload)
    }

    /// Our handshake message alone (msg1 from the connector, msg2 from the listener) to `to`.
    fn send_handshake(&mut self, to: SocketAddr) {
        let Some(h) = self
            .channel
            .as_ref()
            .and_then(|c| c.handshake_out().map(<[u8]>::to_vec))
        else {
            return;
        };
        let m = PunchMessage::Sealed {
            tid: TransactionId::from_rng(&mut self.rng),
            session: self.wire,
            handshake: Some(h),
            sealed: None,
        };
        if let Ok(payload) = m.to_vec() {
            self.out.push_back(Transmit {
                source: self.local,
                destination: to,
                payload,
            });
        }
    }

    fn fail(&mut self, e: SessionError) {
        if self.error.is_none() && !self.closed {
            self.error = Some(e);
        }
    }

    /// The direct path is up (TCP: the simultaneous open completed; UDP: a probe was answered).
    pub fn set_direct(&mut self, now: Instant, addr: SocketAddr) {
        if self.direct.is_some() {
            return;
        }
        self.direct = Some(addr);
        self.direct_at = Some(now);
        self.last_peer = now;
        let upgrade = match self.route {
            None => true,
            // Relay-first upgrades; over UDP so does a relay fallback whose peer proved a path
            // after the window (see the PROBE handling), the same way: nothing lost or repeated.
            Some(Route::Relay) => self.config.relay_first || self.config.probe,
            Some(Route::Direct(_)) => false,
        };
        if upgrade {
            if self.route == Some(Route::Relay) {
                self.switched = true;
            }
            self.route = Some(Route::Direct(addr));
            // Whatever is unacked goes again on the new path; the receiver drops copies.
            self.tx.path_changed();
        }
    }

    /// Ends the session: tells the peer on the current path and through the server.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        let m = PunchMessage::Close {
            tid: TransactionId::from_rng(&mut self.rng),
            session: self.id,
        };
        if let Some(Route::Direct(a)) = self.route {
            self.send(a, &m);
        }
        let server = self.server;
        self.send(server, &m);
        if self.channel.is_some() {
            // The sealed copy above is relayed to the peer; the server itself needs it in clear
            // to forget the session (the peer ignores the relayed clear copy).
            let m = PunchMessage::Close {
                tid: TransactionId::from_rng(&mut self.rng),
                session: self.wire,
            };
            if let Ok(payload) = m.to_vec() {
                self.out.push_back(Transmit {
                    source: self.local,
                    destination: server,
                    payload,
                });
            }
        }
        self.closed = true;
    }

    pub fn handle_message(&mut self, now: Instant, from: SocketAddr, msg: PunchMessage) {
        if self.closed || self.error.is_some() {
            return;
        }
        let Some(ch) = self.channel.as_mut() else {
            return self.handle_inner(now, from, msg);
        };
        match msg {
            PunchMessage::Sealed {
                session,
                handshake,
                sealed,
                ..
            } if session == self.wire || session == self.id => {
                if let Some(h) = handshake {
                    let answer = match (self.role, ch.is_ready()) {
                        (Role::Listener, _) => ch.handle_handshake(&h),
                        (Role::Connector, false) => ch.handle_handshake(&h),
                        // The listener repeats msg2 until it hears from us: nothing to do.
                        (Role::Connector, true) => None,
                    };
                    if self.role == Role::Listener
                        && matches!(answer, Some(Handshake::Completed | Handshake::Repeated))
                    {
                        // msg2 back where msg1 came from (the relay); our probes carry it too.
                        self.send_handshake(from);
                    }
                }
                let Some(ch) = self.channel.as_mut() else {
                    return;
                };
                let Some(plain) = sealed.and_then(|b| ch.open(&b)) else {
                    return;
                };
                match PunchMessage::decode(&plain) {
                    Ok(
                        inner @ (PunchMessage::Probe { .. }
                        | PunchMessage::ProbeOk { .. }
                        | PunchMessage::Data { .. }
                        | PunchMessage::Close { .. }),
                    ) if inner.session() == Some(self.id) => self.handle_inner(now, from, inner),
                    _ => self.unsealed_dropped += 1,
                }
            }
            PunchMessage::Probe { .. }
            | PunchMessage::ProbeOk { .. }
            | PunchMessage::Data { .. }
            | PunchMessage::Close { .. }
            | PunchMessage::Sealed { .. } => {
                // Unsealed peer-to-peer messages (or another session's): whoever knows the
                // session id can send them, so they count for nothing (issue 14, M2).
                self.unsealed_dropped += 1;
            }
            other => self.handle_inner(now, from, other),
        }
    }

    /// A message from the peer (opened, when the session is secure) or from the server.
    fn handle_inner(&mut self, now: Instant, from: SocketAddr, msg: PunchMessage) {
        let from_server = from == self.server;
        // Over TCP every message not from the server arrives on a direct stream: the first one
        // of this session (the hello PROBE, its answer, or data) makes that stream the direct
        // path — a stream the peer refused closes before carrying anything and never counts.
        if !self.config.probe
            && !from_server
            && self.direct.is_none()
            && msg.session() == Some(self.id)
            && matches!(
                msg,
                PunchMessage::Probe { .. }
                    | PunchMessage::ProbeOk { .. }
                    | PunchMessage::Data { .. }
            )
        {
            self.set_direct(now, from);
        }
        match msg {
            PunchMessage::Probe { tid, session } if session == self.id && !from_server => {
                self.last_peer = now;
                self.send(
                    from,
                    &PunchMessage::ProbeOk {
                        tid,
                        session,
                        mapped: from,
                    },
                );
                // Peer-reflexive: the peer's real source toward us joins the candidates.
                self.add_target(from);
                // Triggered check (RFC 8445 §7.3.1.4): the peer's probe just came through, so
                // our side's filter may only now admit its answers; probing back at once finds
                // the path without waiting for the next round (bounded by the peer's probes).
                // After the window too: the peer proved its probes reach us, and it goes direct
                // on our answer, so we must be able to take that path as well, or the two sides
                // would end on different paths (the peer direct, we relayed). One probe back per
                // probe of the authenticated peer: nothing an outsider can trigger or amplify.
                if self.config.probe && self.direct.is_none() && self.may_probe(from) {
                    self.probe(now, from);
                }
            }
            PunchMessage::ProbeOk { tid, session, .. } if session == self.id => {
                // Accepted only from the address the probe went to (DESIGN.md: check the source).
                let Some(&(to, sent)) = self.probes.get(&tid) else {
                    return;
                };
                if to != from {
                    return;
                }
                self.probes.remove(&tid);
                self.last_peer = now;
                self.stats.probes_answered += 1;
                // Any time: after the window only the probes back above are answered, and the
                // path they prove is the one the peer has taken (set_direct upgrades the relay).
                if self.direct.is_none() {
                    self.stats.probe_rtt = Some(now - sent);
                    self.set_direct(now, from);
                }
            }
            PunchMessage::Data {
                session,
                seq,
                ack,
                payload,
                ..
            } if session == self.id => {
                self.last_peer = now;
                if from_server && self.route.is_none() && now < self.punch_until {
                    // Relay data before the window closed: the peer is relay-first. Answer there
                    // at once and move to the direct path too when one appears.
                    self.route = Some(Route::Relay);
                    self.config.relay_first = true;
                }
                if from_server {
                    self.stats.data_received_relayed += u64::from(seq.is_some());
                } else {
                    self.stats.data_received_direct += u64::from(seq.is_some());
                }
                for a in self.tx.on_ack(ack) {
                    if let Some(direct) = self.first_route.remove(&a.seq) {
                        if a.transmissions == 1 {
                            self.stats.rtt_samples.push((direct, now - a.first_sent));
                        }
                    }
                }
                if let Some(seq) = seq {
                    self.rx.on_data(seq, payload);
                    self.ack_due = true;
                }
            }
            PunchMessage::Close { session, .. } if session == self.id => {
                self.last_peer = now;
                self.closed = true;
                if self.role == Role::Connector && !self.all_acked() {
                    self.closed = false;
                    self.fail(SessionError::PeerClosed);
                }
            }
            PunchMessage::RefreshOk { tid } if from_server => {
                if let Some(i) = self.refreshes.iter().position(|t| *t == tid) {
                    self.refreshes.drain(..=i);
                    self.last_server = now;
                }
            }
            PunchMessage::Error {
                tid,
                method: method::REFRESH,
                code: code::UNKNOWN_SESSION,
                ..
            } if from_server && self.refreshes.contains(&tid) => {
                self.stats.server_lost = true;
                if !self.route.is_some_and(Route::is_direct) {
                    self.fail(SessionError::ServerLostSession(from));
                }
            }
            // The relay ended this session's circuit (bytes or time): say so, unless direct.
            PunchMessage::Error {
                tid,
                method: method::REFRESH,
                code,
                reason,
            } if from_server
                && code == super::codec::refusal::CIRCUIT
                && self.refreshes.contains(&tid) =>
            {
                self.stats.server_lost = true;
                if !self.route.is_some_and(Route::is_direct) {
                    self.fail(SessionError::RelayRefused(from, code, reason));
                }
            }
            _ => {}
        }
    }

    /// Whether probes go out at `now`: during the punch window, and after it while a
    /// relay-first session has not found its direct path.
    fn probing(&self, now: Instant) -> bool {
        now < self.punch_until || self.config.relay_first
    }

    fn probe(&mut self, now: Instant, to: SocketAddr) {
        let tid = TransactionId::from_rng(&mut self.rng);
        // Bounded: old unanswered probes are forgotten.
        if self.probes.len() >= 4 * MAX_TARGETS {
            let oldest = self
                .probes
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.probes.remove(&k);
            }
        }
        if let Some(b) = &self.budget {
            if !b.take(now) {
                self.stats.probes_denied += 1;
                return;
            }
        }
        self.probes.insert(tid, (to, now));
        self.stats.probes_sent += 1;
        let id = self.id;
        self.send(to, &PunchMessage::Probe { tid, session: id });
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed || self.error.is_some() {
            return;
        }
        // The connector's handshake goes through the relay until the listener answers it.
        if self.role == Role::Connector
            && !self.can_send()
            && self.channel.is_some()
            && now >= self.next_handshake
        {
            self.next_handshake = now + HANDSHAKE_RTO;
            let server = self.server;
            self.send_handshake(server);
        }
        if let (true, Some(p)) = (self.can_send(), self.pending_hello) {
            self.pending_hello = None;
            self.hello(p);
        }
        // Probe rounds during the punch window.
        if self.config.probe
            && self.can_send()
            && now >= self.start_at
            && self.probing(now)
            && self.direct.is_none()
            && now >= self.next_probe
        {
            for t in self.targets.clone() {
                self.probe(now, t);
            }
            // After the window a relay-first session keeps looking, five times slower.
            let interval = if now < self.punch_until {
                self.config.probe_interval
            } else {
                self.config.probe_interval * RELAY_FIRST_SLOWDOWN
            };
            self.next_probe = now + interval;
        }
        // Fallback: no direct path when the window closes.
        if self.route.is_none() && now >= self.punch_until {
            self.route = Some(Route::Relay);
        }
        self.birthday_step(now);
        // Keepalives: the direct path (keeps the NAT mappings), and the connector's session at
        // the server (which is how a dead or restarted server is noticed).
        if now >= self.next_keepalive {
            self.next_keepalive = now + self.config.keepalive;
            if let (true, Some(d)) = (self.config.probe, self.direct) {
                self.probe(now, d);
            }
            if self.role == Role::Connector {
                let tid = TransactionId::from_rng(&mut self.rng);
                self.refreshes.push(tid);
                if self.refreshes.len() > 16 {
                    self.refreshes.remove(0);
                }
                let (server, id) = (self.server, self.wire);
                self.send(server, &PunchMessage::Refresh { tid, session: id });
            }
        }
        let direct = self.route.is_some_and(Route::is_direct);
        if self.role == Role::Connector
            && self.config.relay_failover
            && !direct
            && now.saturating_duration_since(self.last_server) > self.config.relay_idle
        {
            // The connector moves the session or ends it (it knows the other servers).
            self.stats.server_lost = true;
            self.relay_lost = true;
        } else if self.role == Role::Connector
            && now.saturating_duration_since(self.last_server) > self.config.server_idle
        {
            self.stats.server_lost = true;
            if !self.route.is_some_and(Route::is_direct) {
                let idle = now - self.last_server;
                self.fail(SessionError::ServerGone(self.server, idle));
                return;
            }
        }
        let quiet_since = self.last_peer.max(self.punch_until);
        if now.saturating_duration_since(quiet_since) > self.config.peer_idle {
            self.fail(SessionError::PeerGone(now - quiet_since));
            return;
        }
        self.flush_data(now);
    }

    /// The birthday technique, once the plain punch found no path early in the window (see
    /// [`Birthday`]).
    fn birthday_step(&mut self, now: Instant) {
        let due = self.config.probe
            && self.can_send()
            && self.direct.is_none()
            && now >= self.start_at + BIRTHDAY_AFTER;
        if !due {
            return;
        }
        match self.birthday.take() {
            Some(Birthday::Hard { to }) => {
                let id = self.id;
                let payloads = (0..BIRTHDAY_SOCKETS)
                    .filter_map(|_| {
                        let tid = TransactionId::from_rng(&mut self.rng);
                        self.wire_bytes(&PunchMessage::Probe { tid, session: id })
                    })
                    .collect();
                self.stats.birthday_sent += BIRTHDAY_SOCKETS as u64;
                self.birthday_out = Some(BirthdayOpen { to, payloads });
            }
            Some(Birthday::Easy { mut targets }) => {
                let start = self.start_at + BIRTHDAY_AFTER + BIRTHDAY_EASY_DELAY;
                if now < start {
                    self.birthday = Some(Birthday::Easy { targets });
                    return;
                }
                // Every probe due by now, one per BIRTHDAY_PACE since the start.
                let sent = self.stats.birthday_sent;
                let due = ((now - start).as_micros() / BIRTHDAY_PACE.as_micros()) as u64 + 1;
                let n = due.saturating_sub(sent).min(targets.len() as u64) as usize;
                for t in targets.drain(..n) {
                    self.stats.birthday_sent += 1;
                    self.probe(now, t);
                }
                if !targets.is_empty() {
                    self.birthday = Some(Birthday::Easy { targets });
                }
            }
            None => {}
        }
    }

    /// When the birthday technique next needs the clock.
    fn birthday_wake(&self) -> Option<Instant> {
        if self.direct.is_some() || !self.config.probe {
            return None;
        }
        match &self.birthday {
            Some(Birthday::Hard { .. }) => Some(self.start_at + BIRTHDAY_AFTER),
            Some(Birthday::Easy { .. }) => {
                let start = self.start_at + BIRTHDAY_AFTER + BIRTHDAY_EASY_DELAY;
                let sent = u32::try_from(self.stats.birthday_sent).unwrap_or(u32::MAX);
                Some(start + BIRTHDAY_PACE * sent)
            }
            None => None,
        }
    }

    fn flush_data(&mut self, now: Instant) {
        let Some(route) = self.route else { return };
        if !self.can_send() {
            return;
        }
        let (to, direct) = match route {
            Route::Relay => (self.server, false),
            Route::Direct(a) => (a, true),
        };
        while let Some((seq, payload)) = self.tx.poll_send(now) {
            self.first_route.entry(seq).or_insert(direct);
            if direct {
                self.stats.data_sent_direct += 1;
            } else {
                self.stats.data_sent_relayed += 1;
            }
            let m = PunchMessage::Data {
                tid: TransactionId::from_rng(&mut self.rng),
                session: self.id,
                seq: Some(seq),
                ack: self.rx.ack(),
                payload,
            };
            self.send(to, &m);
            self.ack_due = false;
        }
        if self.ack_due {
            self.ack_due = false;
            let m = PunchMessage::Data {
                tid: TransactionId::from_rng(&mut self.rng),
                session: self.id,
                seq: None,
                ack: self.rx.ack(),
                payload: Vec::new(),
            };
            self.send(to, &m);
        }
    }

    /// When [`Session::handle_timeout`] should run next (`None` once it ended).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed || self.error.is_some() {
            return None;
        }
        let mut t = self.next_keepalive;
        if self.role == Role::Connector && self.channel.is_some() && !self.can_send() {
            t = t.min(self.next_handshake);
        }
        if self.config.probe && self.direct.is_none() && self.probing(self.next_probe) {
            t = t.min(self.next_probe.max(self.start_at));
        }
        if self.route.is_none() {
            t = t.min(self.punch_until);
        }
        if let Some(r) = self.tx.poll_timeout() {
            t = t.min(r);
        }
        if let Some(b) = self.birthday_wake() {
            t = t.min(b);
        }
        Some(t.min(
            self.last_peer.max(self.punch_until) + self.config.peer_idle + Duration::from_millis(1),
        ))
    }

    /// A hello on a new direct TCP stream: a PROBE, so the peer's session takes the stream as
    /// its direct path when it arrives (see [`Session::handle_message`]).
    pub fn hello(&mut self, peer: SocketAddr) {
        if !self.can_send() {
            self.pending_hello = Some(peer);
            return;
        }
        let m = PunchMessage::Probe {
            tid: TransactionId::from_rng(&mut self.rng),
            session: self.id,
        };
        self.send(peer, &m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    const SERVER: &str = "198.51.100.1:3490";

    /// Two sessions joined by a virtual network: `a_to_b_direct`/`b_to_a_direct` say whether a
    /// datagram between them gets through; the relay always works.
    struct Pair {
        a: Session,
        b: Session,
        a_addr: SocketAddr,
        b_addr: SocketAddr,
        direct_ok: bool,
        now: Instant,
        delivered_b: Vec<Vec<u8>>,
        delivered_a: Vec<Vec<u8>>,
    }

    /// The birthday technique's timing: nothing while the plain punch may still find the path;
    /// at [`BIRTHDAY_AFTER`] the hard side hands its driver 256 sealed-or-plain probes for its
    /// sockets, once; the easy side probes its random ports once each, paced, from
    /// [`BIRTHDAY_EASY_DELAY`] later; a session that went direct plays no part.
    #[test]
    fn the_birthday_opening_starts_early_in_the_window_once_and_paced() {
        let now = Instant::now();
        let (a, b) = (sa("203.0.113.1:4000"), sa("203.0.113.2:5000"));
        let session = |part: Birthday| {
            Session::new(
                now,
                SessionId(9),
                Role::Connector,
                SessionConfig::default(),
                sa(SERVER),
                PunchPlan {
                    local: a,
                    start_in: Duration::ZERO,
                    targets: vec![b],
                },
                StdRng::seed_from_u64(4),
            )
            .with_birthday(Some(part))
        };
        let mut hard = session(Birthday::Hard { to: b });
        hard.handle_timeout(now + BIRTHDAY_AFTER - Duration::from_millis(1));
        assert!(hard.poll_birthday().is_none());
        assert_eq!(
            hard.poll_timeout().map(|t| t <= now + BIRTHDAY_AFTER),
            Some(true)
        );
        hard.handle_timeout(now + BIRTHDAY_AFTER);
        let open = hard.poll_birthday().expect("the opening");
        assert_eq!((open.to, open.payloads.len()), (b, BIRTHDAY_SOCKETS));
        hard.handle_timeout(now + BIRTHDAY_AFTER * 2);
        assert!(hard.poll_birthday().is_none(), "once");

        let targets: Vec<SocketAddr> = (0..100)
            .map(|p| sa(&format!("203.0.113.2:{}", 2000 + p)))
            .collect();
        let mut easy = session(Birthday::Easy {
            targets: targets.clone(),
        });
        let start = now + BIRTHDAY_AFTER + BIRTHDAY_EASY_DELAY;
        let sent_to = |s: &mut Session| {
            std::iter::from_fn(|| s.poll_transmit())
                .map(|t| t.destination)
                .filter(|d| targets.contains(d))
                .count()
        };
        easy.handle_timeout(start - Duration::from_millis(1));
        assert_eq!(sent_to(&mut easy), 0);
        easy.handle_timeout(start + BIRTHDAY_PACE * 9);
        assert_eq!(
            sent_to(&mut easy),
            10,
            "one per pace, the first at the start"
        );
        easy.handle_timeout(start + BIRTHDAY_PACE * 500);
        assert_eq!(sent_to(&mut easy), 90, "each port once");
        easy.handle_timeout(start + BIRTHDAY_PACE * 1000);
        assert_eq!(sent_to(&mut easy), 0);
    }

    impl Pair {
        fn new(relay_first: bool, direct_ok: bool) -> Self {
            let now = Instant::now();
            let cfg = SessionConfig {
                relay_first,
                ..SessionConfig::default()
            };
            let a_addr = sa("203.0.113.1:4000");
            let b_addr = sa("203.0.113.2:5000");
            let id = SessionId(5);
            let a = Session::new(
                now,
                id,
                Role::Connector,
                cfg,
                sa(SERVER),
                PunchPlan {
                    local: a_addr,
                    start_in: Duration::from_millis(20),
                    targets: vec![b_addr],
                },
                StdRng::seed_from_u64(1),
            );
            let b = Session::new(
                now,
                id,
                Role::Listener,
                cfg,
                sa(SERVER),
                PunchPlan {
                    local: b_addr,
                    start_in: Duration::from_millis(20),
                    targets: vec![a_addr],
                },
                StdRng::seed_from_u64(2),
            );
            Self {
                a,
                b,
                a_addr,
                b_addr,
                direct_ok,
                now,
                delivered_a: vec![],
                delivered_b: vec![],
            }
        }

        /// Steps 1 ms at a time for `ms`; the listener echoes what it receives.
        fn step(&mut self, ms: u64) {
            for _ in 0..ms {
                self.now += Duration::from_millis(1);
                let now = self.now;
                self.a.handle_timeout(now);
                self.b.handle_timeout(now);
                for _ in 0..4 {
                    while let Some(Transmit {
                        destination: to,
                        payload: bytes,
                        ..
                    }) = self.a.poll_transmit()
                    {
                        let m = PunchMessage::decode(&bytes).expect("decode");
                        if to == sa(SERVER) {
                            match m {
                                PunchMessage::Refresh { tid, .. } => self.a.handle_message(
                                    now,
                                    sa(SERVER),
                                    PunchMessage::RefreshOk { tid },
                                ),
                                m @ (PunchMessage::Data { .. } | PunchMessage::Close { .. }) => {
                                    self.b.handle_message(now, sa(SERVER), m)
                                }
                                _ => {}
                            }
                        } else if to == self.b_addr && self.direct_ok {
                            self.b.handle_message(now, self.a_addr, m);
                        }
                    }
                    while let Some(Transmit {
                        destination: to,
                        payload: bytes,
                        ..
                    }) = self.b.poll_transmit()
                    {
                        let m = PunchMessage::decode(&bytes).expect("decode");
                        if to == sa(SERVER) {
                            if let m @ (PunchMessage::Data { .. } | PunchMessage::Close { .. }) = m
                            {
                                self.a.handle_message(now, sa(SERVER), m);
                            }
                        } else if to == self.a_addr && self.direct_ok {
                            self.a.handle_message(now, self.b_addr, m);
                        }
                    }
                    while let Some(m) = self.b.poll_deliver() {
                        self.delivered_b.push(m.clone());
                        self.b.push(m);
                    }
                    while let Some(m) = self.a.poll_deliver() {
                        self.delivered_a.push(m);
                    }
                    self.a.handle_timeout(now);
                    self.b.handle_timeout(now);
                }
            }
        }
    }

    fn msgs(n: u64) -> Vec<Vec<u8>> {
        (0..n).map(|i| i.to_be_bytes().to_vec()).collect()
    }

    #[test]
    fn direct_path_is_found_and_carries_the_data() {
        let mut p = Pair::new(false, true);
        for m in msgs(50) {
            p.a.push(m);
        }
        p.step(200);
        assert_eq!(p.a.route(), Some(Route::Direct(p.b_addr)));
        assert_eq!(p.delivered_a, msgs(50));
        assert!(!p.a.switched_to_direct());
        assert_eq!(p.a.stats().data_sent_relayed, 0);
    }

    #[test]
    fn no_direct_path_falls_back_to_the_relay_after_the_window() {
        let mut p = Pair::new(false, false);
        for m in msgs(50) {
            p.a.push(m);
        }
        p.step(1400);
        assert_eq!(p.a.route(), None, "data waits during the punch window");
        p.step(300);
        assert_eq!(p.a.route(), Some(Route::Relay));
        assert_eq!(p.delivered_a, msgs(50));
        assert!(p.a.error().is_none());
    }

    #[test]
    fn relay_first_moves_to_direct_without_loss_duplication_or_reordering() {
        let mut p = Pair::new(true, false);
        let all = msgs(300);
        for m in &all[..100] {
            p.a.push(m.clone());
        }
        p.step(10);
        assert_eq!(p.a.route(), Some(Route::Relay));
        // The direct path opens mid-stream (as when the NATs' filters open).
        p.direct_ok = true;
        for m in &all[100..] {
            p.a.push(m.clone());
        }
        p.step(300);
        assert_eq!(p.a.route(), Some(Route::Direct(p.b_addr)));
        assert!(p.a.switched_to_direct());
        assert_eq!(p.delivered_b, all);
        assert_eq!(p.delivered_a, all);
    }

    #[test]
    fn relay_first_keeps_looking_after_the_window_and_switches_late() {
        let mut p = Pair::new(true, false);
        let all = msgs(100);
        for m in &all[..50] {
            p.a.push(m.clone());
        }
        p.step(2500);
        assert_eq!(p.a.route(), Some(Route::Relay));
        p.direct_ok = true;
        for m in &all[50..] {
            p.a.push(m.clone());
        }
        p.step(600);
        assert!(p.a.switched_to_direct(), "found after the window");
        assert_eq!(p.delivered_a, all);
    }

    #[test]
    fn without_relay_first_the_relay_is_final_after_the_window() {
        let mut p = Pair::new(false, false);
        p.a.push(vec![1]);
        p.step(1600);
        assert_eq!(p.a.route(), Some(Route::Relay));
        p.direct_ok = true;
        let sent = p.a.stats().probes_sent;
        p.step(600);
        assert_eq!(p.a.route(), Some(Route::Relay));
        assert_eq!(p.a.stats().probes_sent, sent, "no probes after the window");
        assert_eq!(
            p.b.route(),
            Some(Route::Relay),
            "the listener stays on the relay too"
        );
    }

    #[test]
    fn over_tcp_the_first_session_message_on_a_stream_makes_it_direct() {
        let now = Instant::now();
        let cfg = SessionConfig {
            probe: false,
            ..SessionConfig::default()
        };
        let peer = sa("203.0.113.2:5000");
        let mut s = Session::new(
            now,
            SessionId(1),
            Role::Listener,
            cfg,
            sa(SERVER),
            PunchPlan {
                local: sa("10.0.0.1:4000"),
                start_in: Duration::ZERO,
                targets: vec![peer],
            },
            StdRng::seed_from_u64(1),
        );
        s.handle_timeout(now);
        assert!(s.poll_transmit().is_none(), "no probes over tcp");
        // Another session's message, or one from the server, does not count.
        let other = PunchMessage::Probe {
            tid: TransactionId::random(),
            session: SessionId(2),
        };
        s.handle_message(now, peer, other);
        let relayed = PunchMessage::Data {
            tid: TransactionId::random(),
            session: SessionId(1),
            seq: None,
            ack: 0,
            payload: vec![],
        };
        s.handle_message(now, sa(SERVER), relayed);
        assert_eq!(s.direct_at(), None);
        let hello = PunchMessage::Probe {
            tid: TransactionId::random(),
            session: SessionId(1),
        };
        s.handle_message(now, peer, hello);
        assert_eq!(s.route(), Some(Route::Direct(peer)));
    }

    #[test]
    fn introductions_cannot_aim_probes_at_addresses_no_peer_has() {
        let now = Instant::now();
        let good = sa("203.0.113.2:5000");
        let hostile = [
            "127.0.0.1:22",
            "224.0.0.251:5353",
            "0.0.0.0:9",
            "255.255.255.255:9",
            "203.0.113.3:0",
            "[::1]:5000",
            "[2001:db8::1]:5000",
        ];
        let mut targets: Vec<SocketAddr> = hostile.iter().map(|a| sa(a)).collect();
        targets.push(good);
        let s = Session::new(
            now,
            SessionId(1),
            Role::Listener,
            SessionConfig::default(),
            sa(SERVER),
            PunchPlan {
                local: sa("10.1.0.2:4000"),
                start_in: Duration::ZERO,
                targets,
            },
            StdRng::seed_from_u64(1),
        );
        assert_eq!(s.targets, vec![good]);
        // On loopback (tests, one-host setups) loopback peers are fine.
        let s = Session::new(
            now,
            SessionId(1),
            Role::Listener,
            SessionConfig::default(),
            sa("127.0.0.1:3490"),
            PunchPlan {
                local: sa("127.0.0.1:4000"),
                start_in: Duration::ZERO,
                targets: vec![sa("127.0.0.1:5000")],
            },
            StdRng::seed_from_u64(1),
        );
        assert_eq!(s.targets, vec![sa("127.0.0.1:5000")]);
    }

    #[test]
    fn a_silent_peer_is_an_error_within_bounds() {
        let mut p = Pair::new(false, true);
        p.step(100);
        p.a.push(vec![1]);
        // The listener vanishes: stop stepping it.
        let start = p.now;
        let mut now = p.now;
        while p.a.error().is_none() {
            now += Duration::from_millis(10);
            p.a.handle_timeout(now);
            while let Some(Transmit {
                destination: to,
                payload: b,
                ..
            }) = p.a.poll_transmit()
            {
                if to == sa(SERVER) {
                    if let Ok(PunchMessage::Refresh { tid, .. }) = PunchMessage::decode(&b) {
                        p.a.handle_message(now, to, PunchMessage::RefreshOk { tid });
                    }
                }
            }
            assert!(now - start < Duration::from_secs(7));
        }
        assert!(matches!(p.a.error(), Some(SessionError::PeerGone(_))));
    }

    #[test]
    fn a_silent_server_ends_a_relayed_session() {
        let mut p = Pair::new(true, false);
        p.step(50);
        let mut now = p.now;
        while p.a.error().is_none() {
            now += Duration::from_millis(10);
            p.a.handle_timeout(now);
            while p.a.poll_transmit().is_some() {}
            assert!(now - p.now < Duration::from_secs(4));
        }
        assert!(matches!(p.a.error(), Some(SessionError::ServerGone(..))));
    }

    #[test]
    fn probe_answers_are_accepted_only_from_where_the_probe_went() {
        let now = Instant::now();
        let mut s = Session::new(
            now,
            SessionId(1),
            Role::Connector,
            SessionConfig::default(),
            sa(SERVER),
            PunchPlan {
                local: sa("10.0.0.1:4000"),
                start_in: Duration::ZERO,
                targets: vec![sa("203.0.113.2:5000")],
            },
            StdRng::seed_from_u64(1),
        );
        s.handle_timeout(now);
        let t = s.poll_transmit().expect("probe");
        let (to, bytes) = (t.destination, t.payload);
        let PunchMessage::Probe { tid, session } = PunchMessage::decode(&bytes).expect("decode")
        else {
            panic!("not a probe");
        };
        let ok = PunchMessage::ProbeOk {
            tid,
            session,
            mapped: sa("203.0.113.1:4000"),
        };
        s.handle_message(now, sa("203.0.113.66:5000"), ok.clone());
        assert_eq!(s.route(), None);
        let wrong = PunchMessage::ProbeOk {
            tid,
            session: SessionId(2),
            mapped: sa("203.0.113.1:4000"),
        };
        s.handle_message(now, to, wrong);
        assert_eq!(s.route(), None);
        s.handle_message(now, to, ok);
        assert_eq!(s.route(), Some(Route::Direct(to)));
    }

    #[test]
    fn a_probe_from_a_new_source_is_answered_and_probed_back() {
        let now = Instant::now();
        let mut s = Session::new(
            now,
            SessionId(1),
            Role::Listener,
            SessionConfig::default(),
            sa(SERVER),
            PunchPlan {
                local: sa("10.0.0.1:4000"),
                start_in: Duration::ZERO,
                targets: vec![sa("203.0.113.2:5000")],
            },
            StdRng::seed_from_u64(1),
        );
        let prflx = sa("203.0.113.2:31337");
        s.handle_message(
            now,
            prflx,
            PunchMessage::Probe {
                tid: TransactionId::random(),
                session: SessionId(1),
            },
        );
        let out: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
        assert!(out.iter().any(|t| t.destination == prflx && matches!(PunchMessage::decode(&t.payload), Ok(PunchMessage::ProbeOk { mapped, .. }) if mapped == prflx)));
        assert!(out.iter().any(|t| t.destination == prflx
            && matches!(
                PunchMessage::decode(&t.payload),
                Ok(PunchMessage::Probe { .. })
            )));
        assert!(s.targets().contains(&prflx));
    }
}
