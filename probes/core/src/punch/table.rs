//! The rendezvous table: who is registered under which id, from where, and which sessions the
//! relay carries. Plain data driven by an injected clock; it never reads time itself.
//!
//! A registration lives until its peer unregisters, its TCP connection closes, or
//! [`TableConfig::peer_ttl`] passes without a refresh (three missed keepalives). A session lives
//! while either side refreshes it or sends data through the relay, and dies with its listener.
//! Everything is in memory only; sizes are bounded so a flood of strangers cannot grow it.
//!
//! Expiry is amortized O(log n) per entry, not a scan per packet (issue 14, M1): every entry has
//! exactly one deadline in a min-heap, pushed when it is created. A refresh only moves the entry's
//! own `expires`; when its old deadline comes up, the entry is found fresh and its deadline pushed
//! again. A generation number tells a deadline of a removed-and-recreated entry from the live one.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::codec::PeerInfo;
use super::identity::{self, PeerKey};
use super::{SessionId, Transport};

/// Where a peer is reachable from the server: the transport, the server's own socket address the
/// peer talks to, and the peer's address as the server sees it (its server-reflexive address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// A registration not refreshed for this long is gone (keepalives every 2 s: three missed).
    pub peer_ttl: Duration,
    /// A session neither refreshed nor used for this long is gone.
    pub session_ttl: Duration,
    pub max_peers: usize,
    pub max_sessions: usize,
    /// Registrations held at once per source (IPv4 address or IPv6 /64).
    pub peers_per_source: usize,
    /// Sessions a source may hold open as a connector at once.
    pub sessions_per_source: usize,
    /// Sessions one registration may be introduced to at once (a listener's own table holds
    /// 64; the server never asks it for more than this).
    pub sessions_per_peer: usize,
    /// Relay circuit limits: bytes relayed in a session (both ways), its lifetime, and its rate.
    pub circuit: CircuitLimits,
}

/// What one relayed session (a circuit) may use before the relay ends it with
/// `codec::refusal::CIRCUIT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitLimits {
    /// Bytes relayed, both directions together.
    pub bytes: u64,
    /// From the introduction on, however busy.
    pub duration: Duration,
    /// Sustained bytes per second (a token bucket of [`CircuitLimits::burst`] bytes).
    pub rate: u64,
    pub burst: u64,
}

impl Default for CircuitLimits {
    fn default() -> Self {
        Self {
            bytes: 64 << 20,
            duration: Duration::from_secs(30 * 60),
            rate: 1 << 20,
            burst: 256 << 10,
        }
    }
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            peer_ttl: Duration::from_secs(7),
            session_ttl: Duration::from_secs(10),
            max_peers: 10_000,
            max_sessions: 10_000,
            peers_per_source: 8,
            sessions_per_source: 16,
            sessions_per_peer: 32,
            circuit: CircuitLimits::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("no peer registered as `{0}`")]
    UnknownPeer(String),
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    #[error("table full")]
    Full,
    #[error("id `{0}` is held by another key")]
    IdHeld(String),
    #[error("quota of this source reached: {0}")]
    SourceQuota(&'static str),
    #[error("the peer has as many sessions as it may hold")]
    PeerQuota,
    #[error("relay circuit limit reached: {0}")]
    Circuit(&'static str),
}

/// The source a quota is keyed on: the IPv4 address, or the IPv6 /64 (one host usually owns a
/// whole /64); an IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    crate::reflector::tcp::source_key(ip)
}

#[derive(Clone, Copy, Debug, Default)]
struct SourceUse {
    peers: usize,
    sessions: usize,
}

#[derive(Clone, Debug)]
struct PeerEntry {
    endpoint: Endpoint,
    candidates: Vec<SocketAddr>,
    port_delta: Option<i32>,
    expires: Instant,
    generation: u64,
}

/// What a deadline in the expiry heap belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Peer(Transport, String),
    Session(SessionId),
}

/// One side of a session, as the server knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    pub listener: Endpoint,
    pub connector: Endpoint,
    pub expires: Instant,
}

/// A session's relay accounting (its circuit).
#[derive(Clone, Copy, Debug)]
struct Circuit {
    created: Instant,
    bytes: u64,
    tokens: u64,
    last: Instant,
}

/// What [`RendezvousTable::introduce`] decided: a session and what to tell each side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Introduction {
    pub session: SessionId,
    pub listener: Endpoint,
    /// Told to the connector: the listener's addresses.
    pub listener_info: PeerInfo,
    /// Told to the listener: the connector's addresses.
    pub connector_info: PeerInfo,
}

#[derive(Debug, Default)]
pub struct RendezvousTable {
    config: TableConfig,
    peers: HashMap<(Transport, String), PeerEntry>,
    /// Each session with its listener's id and its generation.
    sessions: HashMap<SessionId, (String, SessionEntry, u64)>,
    circuits: HashMap<SessionId, Circuit>,
    /// Registrations and sessions by the endpoints they involve, so a closed TCP connection
    /// takes its entries along without a scan of the table.
    by_endpoint: HashMap<Endpoint, (HashSet<String>, HashSet<SessionId>)>,
    /// Registrations and connector sessions per source, for the quotas.
    per_source: HashMap<IpAddr, SourceUse>,
    /// Sessions by their listener's registration, so a registration's end takes its sessions
    /// along without a scan (entries of sessions already gone are skipped).
    by_listener: HashMap<(Transport, String), HashSet<SessionId>>,
    /// One deadline per live entry: (when, generation, what).
    deadlines: BinaryHeap<Reverse<(Instant, u64, Due)>>,
    generation: u64,
    /// The key each registration proved (issue 14), beside `peers` so the entry stays as it was.
    keys: HashMap<(Transport, String), PeerKey>,
}

impl RendezvousTable {
    pub fn new(config: TableConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Registers or refreshes `id` on `endpoint.transport`. A newer registration of the same id
    /// replaces the old one (a peer that restarted comes back from a new port).
    pub fn register(
        &mut self,
        now: Instant,
        id: &str,
        endpoint: Endpoint,
        candidates: Vec<SocketAddr>,
        port_delta: Option<i32>,
    ) -> Result<(), TableError> {
        self.expire(now);
        let key = (endpoint.transport, id.to_string());
        let expires = now + self.config.peer_ttl;
        let src = source_key(endpoint.remote.ip());
        if let Some(p) = self.peers.get(&key) {
            let old = p.endpoint;
            if old != endpoint {
                if source_key(old.remote.ip()) != src
                    && self.used(src).peers >= self.config.peers_per_source
                {
                    return Err(TableError::SourceQuota("registrations"));
                }
                self.unindex_peer(old, &key.1);
                self.index_peer(endpoint, &key.1);
            }
            let Some(p) = self.peers.get_mut(&key) else {
                return Err(TableError::UnknownPeer(key.1));
            };
            // Its deadline is already in the heap: moving `expires` is the whole refresh.
            p.endpoint = endpoint;
            p.candidates = candidates;
            p.port_delta = port_delta;
            p.expires = expires;
            return Ok(());
        }
        if self.peers.len() >= self.config.max_peers {
            return Err(TableError::Full);
        }
        if self.used(src).peers >= self.config.peers_per_source {
            return Err(TableError::SourceQuota("registrations"));
        }
        self.index_peer(endpoint, &key.1);
        let generation = self.schedule(expires, Due::Peer(key.0, key.1.clone()));
        self.peers.insert(
            key,
            PeerEntry {
                endpoint,
                candidates,
                port_delta,
                expires,
                generation,
            },
        );
        Ok(())
    }

    /// Removes `id` if `from` is the endpoint it registered from (strangers cannot evict it),
    /// with the sessions introduced to that registration — not those of the same id on the other
    /// transport, which may be another peer's (issue 14, H2).
    pub fn unregister(&mut self, id: &str, from: Endpoint) -> bool {
        let key = (from.transport, id.to_string());
        if self.peers.get(&key).is_some_and(|p| p.endpoint == from) {
            self.remove_peer(&key);
            return true;
        }
        false
    }

    // Peer identity (issue 14): the server verified `key`'s signature; these bind the id to it.

    /// [`register`](Self::register) by the holder of `key` (whose proof the server verified):
    /// refused while the id is registered on this transport by another key (H1).
    #[allow(clippy::too_many_arguments)]
    pub fn register_as(
        &mut self,
        now: Instant,
        id: &str,
        endpoint: Endpoint,
        candidates: Vec<SocketAddr>,
        port_delta: Option<i32>,
        key: PeerKey,
    ) -> Result<(), TableError> {
        self.expire(now);
        let k = (endpoint.transport, id.to_string());
        if let Some(held) = self.keys.get(&k) {
            if !identity::may_hold(held, &key) {
                return Err(TableError::IdHeld(id.to_string()));
            }
        }
        self.register(now, id, endpoint, candidates, port_delta)?;
        self.keys.insert(k, key);
        Ok(())
    }

    /// [`unregister`](Self::unregister) only by the key that holds the id, from its endpoint (H2).
    pub fn unregister_as(&mut self, id: &str, from: Endpoint, key: &PeerKey) -> bool {
        let k = (from.transport, id.to_string());
        self.keys.get(&k).is_some_and(|held| held == key) && self.unregister(id, from)
    }

    /// The key that holds `id` on `transport`.
    pub fn key_of(&self, transport: Transport, id: &str) -> Option<PeerKey> {
        self.keys.get(&(transport, id.to_string())).copied()
    }

    /// Forgets everything registered from `endpoint` (its TCP connection closed).
    /// Looks up the endpoint's own entries in an index: no scan of the table (issue 14, M1).
    pub fn drop_endpoint(&mut self, endpoint: Endpoint) {
        let Some((ids, sessions)) = self.by_endpoint.remove(&endpoint) else {
            return;
        };
        for id in ids {
            self.unregister(&id, endpoint);
        }
        for id in sessions {
            self.remove_session(id);
        }
    }

    /// How many registrations and connector sessions `ip`'s source holds.
    fn used(&self, src: IpAddr) -> SourceUse {
        self.per_source.get(&src).copied().unwrap_or_default()
    }

    fn source_delta(&mut self, ep: Endpoint, peers: isize, sessions: isize) {
        let src = source_key(ep.remote.ip());
        let u = self.per_source.entry(src).or_default();
        u.peers = u.peers.saturating_add_signed(peers);
        u.sessions = u.sessions.saturating_add_signed(sessions);
        if u.peers == 0 && u.sessions == 0 {
            self.per_source.remove(&src);
        }
    }

    fn index_peer(&mut self, ep: Endpoint, id: &str) {
        self.by_endpoint
            .entry(ep)
            .or_default()
            .0
            .insert(id.to_string());
        self.source_delta(ep, 1, 0);
    }

    fn unindex_peer(&mut self, ep: Endpoint, id: &str) {
        if let Some(e) = self.by_endpoint.get_mut(&ep) {
            e.0.remove(id);
            if e.0.is_empty() && e.1.is_empty() {
                self.by_endpoint.remove(&ep);
            }
        }
        self.source_delta(ep, -1, 0);
    }

    fn index_session(&mut self, ep: Endpoint, id: SessionId) {
        self.by_endpoint.entry(ep).or_default().1.insert(id);
    }

    fn unindex_session(&mut self, ep: Endpoint, id: SessionId) {
        if let Some(e) = self.by_endpoint.get_mut(&ep) {
            e.1.remove(&id);
            if e.0.is_empty() && e.1.is_empty() {
                self.by_endpoint.remove(&ep);
            }
        }
    }

    /// Registrations, sessions, and index entries held (the bounded-memory tests compare them).
    pub fn index_sizes(&self) -> (usize, usize) {
        (self.by_endpoint.len(), self.per_source.len())
    }

    /// Whether `id` is registered on `transport` (for tests and status).
    pub fn registered(&self, now: Instant, transport: Transport, id: &str) -> Option<Endpoint> {
        self.peers
            .get(&(transport, id.to_string()))
            .filter(|p| p.expires > now)
            .map(|p| p.endpoint)
    }

    /// Creates a session between the connector at `from` and the peer registered as `target` on
    /// the same transport. `session` is the new id (the caller draws it at random).
    pub fn introduce(
        &mut self,
        now: Instant,
        target: &str,
        from: Endpoint,
        connector: PeerInfo,
        session: SessionId,
    ) -> Result<Introduction, TableError> {
        self.expire(now);
        let key = (from.transport, target.to_string());
        let peer = self
            .peers
            .get(&key)
            .ok_or_else(|| TableError::UnknownPeer(target.to_string()))?;
        if self.sessions.len() >= self.config.max_sessions {
            return Err(TableError::Full);
        }
        if self.used(source_key(from.remote.ip())).sessions >= self.config.sessions_per_source {
            return Err(TableError::SourceQuota("sessions"));
        }
        if self
            .by_listener
            .get(&key)
            .is_some_and(|s| s.len() >= self.config.sessions_per_peer)
        {
            return Err(TableError::PeerQuota);
        }
        let entry = SessionEntry {
            listener: peer.endpoint,
            connector: from,
            expires: now + self.config.session_ttl,
        };
        let intro = Introduction {
            session,
            listener: peer.endpoint,
            listener_info: PeerInfo {
                reflexive: peer.endpoint.remote,
                candidates: peer.candidates.clone(),
                port_delta: peer.port_delta,
                punch_window_ms: None,
                key: self.keys.get(&key).copied(),
            },
            connector_info: connector,
        };
        let generation = self.schedule(entry.expires, Due::Session(session));
        self.sessions
            .insert(session, (target.to_string(), entry, generation));
        self.by_listener.entry(key).or_default().insert(session);
        self.index_session(entry.listener, session);
        self.index_session(from, session);
        self.source_delta(from, 0, 1);
        self.circuits.insert(
            session,
            Circuit {
                created: now,
                bytes: 0,
                tokens: self.config.circuit.burst,
                last: now,
            },
        );
        Ok(intro)
    }

    /// Keeps a session alive; only its two sides may.
    pub fn refresh_session(
        &mut self,
        now: Instant,
        session: SessionId,
        from: Endpoint,
    ) -> Result<(), TableError> {
        self.expire(now);
        let ttl = self.config.session_ttl;
        match self.sessions.get_mut(&session) {
            Some((_, s, _)) if s.listener == from || s.connector == from => {
                s.expires = now + ttl;
                Ok(())
            }
            _ => Err(TableError::UnknownSession(session)),
        }
    }

    /// Where the relay forwards data that `from` sent in `session`: the other side, if `from` is
    /// one of the two. Using the relay keeps the session alive.
    pub fn relay_target(
        &mut self,
        now: Instant,
        session: SessionId,
        from: Endpoint,
    ) -> Result<Endpoint, TableError> {
        self.refresh_session(now, session, from)?;
        match self.sessions.get(&session) {
            Some((_, s, _)) if s.listener == from => Ok(s.connector),
            Some((_, s, _)) => Ok(s.listener),
            None => Err(TableError::UnknownSession(session)),
        }
    }

    /// [`relay_target`](Self::relay_target) for `len` bytes of relayed data, within the session's
    /// circuit limits. Over a limit the session ends here (`TableError::Circuit`): the server
    /// refuses it from then on and the peers report the refusal.
    pub fn relay(
        &mut self,
        now: Instant,
        session: SessionId,
        from: Endpoint,
        len: usize,
    ) -> Result<Endpoint, TableError> {
        let to = self.relay_target(now, session, from)?;
        let limits = self.config.circuit;
        let len = len as u64;
        let Some(c) = self.circuits.get_mut(&session) else {
            return Ok(to);
        };
        let over = if now.saturating_duration_since(c.created) >= limits.duration {
            Some("duration")
        } else if c.bytes.saturating_add(len) > limits.bytes {
            Some("bytes")
        } else {
            let dt = now.saturating_duration_since(c.last);
            let refill = (dt.as_nanos().saturating_mul(u128::from(limits.rate)) / 1_000_000_000)
                .min(u128::from(u64::MAX)) as u64;
            if refill > 0 {
                c.tokens = c.tokens.saturating_add(refill).min(limits.burst);
                c.last = now;
            }
            if c.tokens < len {
                // Over the rate: this packet is dropped, the circuit stays.
                return Err(TableError::Circuit("rate"));
            }
            c.tokens -= len;
            None
        };
        if let Some(why) = over {
            self.remove_session(session);
            return Err(TableError::Circuit(why));
        }
        if let Some(c) = self.circuits.get_mut(&session) {
            c.bytes += len;
        }
        Ok(to)
    }

    /// Removes a session if `from` is one of its sides.
    pub fn close_session(&mut self, session: SessionId, from: Endpoint) -> bool {
        if self
            .sessions
            .get(&session)
            .is_some_and(|(_, s, _)| s.listener == from || s.connector == from)
        {
            self.remove_session(session);
            return true;
        }
        false
    }

    /// Drops expired registrations, and sessions whose time ran out or whose listener is gone.
    /// Looks only at deadlines that came up, and at stale ones on top: nothing is scanned.
    pub fn expire(&mut self, now: Instant) {
        while let Some(Reverse((when, generation, due))) = self.deadlines.peek() {
            let (when, generation) = (*when, *generation);
            let expires = match due {
                Due::Peer(t, id) => self
                    .peers
                    .get(&(*t, id.clone()))
                    .filter(|p| p.generation == generation)
                    .map(|p| p.expires),
                Due::Session(id) => self
                    .sessions
                    .get(id)
                    .filter(|(_, _, g)| *g == generation)
                    .map(|(_, s, _)| s.expires),
            };
            if expires.is_some() && when > now {
                break;
            }
            let Some(Reverse((_, _, due))) = self.deadlines.pop() else {
                break;
            };
            match (expires, due) {
                // A removed (or removed and recreated) entry's deadline.
                (None, _) => {}
                // Refreshed since: its deadline goes back in at the new time.
                (Some(e), due) if e > now => self.deadlines.push(Reverse((e, generation, due))),
                (Some(_), Due::Peer(t, id)) => self.remove_peer(&(t, id)),
                (Some(_), Due::Session(id)) => self.remove_session(id),
            }
        }
        // Deadlines of entries removed early (unregistered, closed) wait in the heap until they
        // come up; rebuild it when they outnumber the live ones, so churn cannot grow it.
        let live = self.peers.len() + self.sessions.len();
        if self.deadlines.len() > 2 * live + 64 {
            self.rebuild_deadlines();
        }
    }

    /// The earliest instant something may expire, for a driver's timer. It can be early (an
    /// entry refreshed or removed since), never late; waking then costs one heap step.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((when, _, _))| *when)
    }

    fn rebuild_deadlines(&mut self) {
        let peers = self
            .peers
            .iter()
            .map(|((t, id), p)| Reverse((p.expires, p.generation, Due::Peer(*t, id.clone()))));
        let sessions = self
            .sessions
            .iter()
            .map(|(id, (_, s, g))| Reverse((s.expires, *g, Due::Session(*id))));
        self.deadlines = peers.chain(sessions).collect();
    }

    /// Puts a new entry's deadline in the heap; returns the entry's generation.
    fn schedule(&mut self, when: Instant, due: Due) -> u64 {
        self.generation += 1;
        self.deadlines.push(Reverse((when, self.generation, due)));
        self.generation
    }

    /// Removes the registration under `key` and every session introduced to it (sessions die
    /// with their listener's registration). Its deadline stays in the heap and is skipped there.
    fn remove_peer(&mut self, key: &(Transport, String)) {
        if let Some(p) = self.peers.remove(key) {
            self.unindex_peer(p.endpoint, &key.1);
        }
        self.keys.remove(key);
        for id in self.by_listener.remove(key).into_iter().flatten() {
            self.remove_session(id);
        }
    }

    /// Removes a session and its entry in `by_listener`; its deadline is skipped in the heap.
    fn remove_session(&mut self, session: SessionId) {
        let Some((listener_id, s, _)) = self.sessions.remove(&session) else {
            return;
        };
        self.circuits.remove(&session);
        self.unindex_session(s.listener, session);
        self.unindex_session(s.connector, session);
        self.source_delta(s.connector, 0, -1);
        let key = (s.listener.transport, listener_id);
        if let Some(ids) = self.by_listener.get_mut(&key) {
            ids.remove(&session);
            if ids.is_empty() {
                self.by_listener.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(t: Transport, remote: &str) -> Endpoint {
        Endpoint {
            transport: t,
            local: "198.51.100.1:3490".parse().expect("addr"),
            remote: remote.parse().expect("addr"),
        }
    }

    fn info(r: &str) -> PeerInfo {
        PeerInfo {
            reflexive: r.parse().expect("addr"),
            candidates: vec![],
            port_delta: None,
            punch_window_ms: None,
            key: None,
        }
    }

    #[test]
    fn register_then_introduce_tells_each_side_the_other() {
        let t0 = Instant::now();
        let mut t = RendezvousTable::new(TableConfig::default());
        let l = ep(Transport::Udp, "203.0.113.1:4000");
        let local: SocketAddr = "10.1.0.2:4000".parse().expect("addr");
        t.register(t0, "alice", l, vec![local], None)
            .expect("register");
        let c = ep(Transport::Udp, "203.0.113.2:5000");
        let intro = t
            .introduce(t0, "alice", c, info("203.0.113.2:5000"), SessionId(7))
            .expect("introduce");
        assert_eq!(intro.listener, l);
        assert_eq!(intro.listener_info.reflexive, l.remote);
        assert_eq!(intro.listener_info.candidates, vec![local]);
        assert_eq!(intro.connector_info.reflexive, c.remote);
        assert_eq!(t.relay_target(t0, SessionId(7), c), Ok(l));
        assert_eq!(t.relay_target(t0, SessionId(7), l), Ok(c));
        let stranger = ep(Transport::Udp, "203.0.113.3:1");
        assert_eq!(
            t.relay_target(t0, SessionId(7), stranger),
            Err(TableError::UnknownSession(SessionId(7)))
        );
    }

    #[test]
    fn unknown_peer_and_transport_are_separate() {
        let t0 = Instant::now();
        let mut t = RendezvousTable::new(TableConfig::default());
        t.register(
            t0,
            "alice",
            ep(Transport::Tcp, "203.0.113.1:4000"),
            vec![],
            None,
        )
        .expect("register");
        let c = ep(Transport::Udp, "203.0.113.2:5000");
        assert_eq!(
            t.introduce(t0, "alice", c, info("203.0.113.2:5000"), SessionId(1)),
            Err(TableError::UnknownPeer("alice".into()))
        );
    }

    #[test]
    fn registrations_expire_without_keepalives_and_take_sessions_along() {
        let t0 = Instant::now();
        let cfg = TableConfig::default();
        let mut t = RendezvousTable::new(cfg);
        let l = ep(Transport::Udp, "203.0.113.1:4000");
        t.register(t0, "alice", l, vec![], None).expect("register");
        // Keepalives every 2 s keep it.
        for k in 1..=5 {
            t.register(t0 + Duration::from_secs(2 * k), "alice", l, vec![], None)
                .expect("refresh");
        }
        let last = t0 + Duration::from_secs(10);
        let c = ep(Transport::Udp, "203.0.113.2:5000");
        t.introduce(last, "alice", c, info("203.0.113.2:5000"), SessionId(3))
            .expect("introduce");
        assert!(t
            .registered(
                last + cfg.peer_ttl - Duration::from_millis(1),
                Transport::Udp,
                "alice"
            )
            .is_some());
        // The connector keeps the session fresh, but the listener stops: both go.
        t.refresh_session(last + Duration::from_secs(5), SessionId(3), c)
            .expect("fresh");
        t.expire(last + cfg.peer_ttl);
        assert_eq!(t.peer_count(), 0);
        assert_eq!(t.session_count(), 0);
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn sessions_expire_unless_refreshed() {
        let t0 = Instant::now();
        let cfg = TableConfig {
            peer_ttl: Duration::from_secs(100),
            ..TableConfig::default()
        };
        let mut t = RendezvousTable::new(cfg);
        let l = ep(Transport::Udp, "203.0.113.1:4000");
        let c = ep(Transport::Udp, "203.0.113.2:5000");
        t.register(t0, "a", l, vec![], None).expect("register");
        t.introduce(t0, "a", c, info("203.0.113.2:5000"), SessionId(1))
            .expect("introduce");
        t.introduce(t0, "a", c, info("203.0.113.2:5000"), SessionId(2))
            .expect("introduce");
        let mid = t0 + cfg.session_ttl - Duration::from_secs(1);
        t.relay_target(mid, SessionId(1), c)
            .expect("relay refreshes");
        t.expire(t0 + cfg.session_ttl);
        assert!(t
            .relay_target(t0 + cfg.session_ttl, SessionId(1), l)
            .is_ok());
        assert_eq!(
            t.refresh_session(t0 + cfg.session_ttl, SessionId(2), c),
            Err(TableError::UnknownSession(SessionId(2)))
        );
    }

    #[test]
    fn only_the_owner_unregisters_and_tcp_close_drops_everything() {
        let t0 = Instant::now();
        let mut t = RendezvousTable::new(TableConfig::default());
        let l = ep(Transport::Tcp, "203.0.113.1:4000");
        t.register(t0, "a", l, vec![], None).expect("register");
        assert!(!t.unregister("a", ep(Transport::Tcp, "203.0.113.9:4000")));
        assert!(t.registered(t0, Transport::Tcp, "a").is_some());
        let c = ep(Transport::Tcp, "203.0.113.2:5000");
        t.introduce(t0, "a", c, info("203.0.113.2:5000"), SessionId(1))
            .expect("introduce");
        t.drop_endpoint(c);
        assert_eq!(t.session_count(), 0);
        t.drop_endpoint(l);
        assert_eq!(t.peer_count(), 0);
        t.register(t0, "a", l, vec![], None).expect("register");
        assert!(t.unregister("a", l));
        assert_eq!(t.peer_count(), 0);
    }

    #[test]
    fn unregistering_one_transport_leaves_the_same_id_on_the_other_alone() {
        // The id "a" is held over UDP by one peer; someone else registers "a" over TCP (allowed:
        // the transports are separate namespaces) and unregisters it again.
        let t0 = Instant::now();
        let mut t = RendezvousTable::new(TableConfig::default());
        let owner = ep(Transport::Udp, "203.0.113.1:4000");
        t.register(t0, "a", owner, vec![], None).expect("register");
        let c = ep(Transport::Udp, "203.0.113.2:5000");
        t.introduce(t0, "a", c, info("203.0.113.2:5000"), SessionId(1))
            .expect("introduce");
        let other = ep(Transport::Tcp, "198.51.100.66:6000");
        t.register(t0, "a", other, vec![], None).expect("register");
        assert!(t.unregister("a", other));
        assert_eq!(t.session_count(), 1, "the UDP owner's session survives");
        assert!(t.registered(t0, Transport::Udp, "a").is_some());
        t.drop_endpoint(other);
        assert_eq!(t.session_count(), 1);
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut t = RendezvousTable::new(TableConfig {
            max_peers: 2,
            ..TableConfig::default()
        });
        t.register(t0, "a", ep(Transport::Udp, "203.0.113.1:1"), vec![], None)
            .expect("a");
        t.register(t0, "b", ep(Transport::Udp, "203.0.113.1:2"), vec![], None)
            .expect("b");
        assert_eq!(
            t.register(t0, "c", ep(Transport::Udp, "203.0.113.1:3"), vec![], None),
            Err(TableError::Full)
        );
        // Refreshing an existing id is always allowed.
        t.register(t0, "a", ep(Transport::Udp, "203.0.113.1:1"), vec![], None)
            .expect("a again");
    }

    /// The table's rules written the obvious way (a scan per call), to check the heap against.
    #[derive(Default)]
    struct Model {
        peers: HashMap<(Transport, String), (Endpoint, Instant)>,
        sessions: HashMap<SessionId, (String, SessionEntry)>,
    }

    impl Model {
        fn expire(&mut self, now: Instant) {
            self.peers.retain(|_, (_, e)| *e > now);
            let peers = &self.peers;
            self.sessions.retain(|_, (id, s)| {
                s.expires > now && peers.contains_key(&(s.listener.transport, id.clone()))
            });
        }
    }

    #[test]
    fn the_expiry_heap_agrees_with_a_scan_of_the_whole_table() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let cfg = TableConfig {
            peer_ttl: Duration::from_millis(700),
            session_ttl: Duration::from_millis(1000),
            max_peers: 1000,
            max_sessions: 1000,
            peers_per_source: 1000,
            sessions_per_source: 1000,
            sessions_per_peer: 1000,
            ..TableConfig::default()
        };
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut t = RendezvousTable::new(cfg);
            let mut m = Model::default();
            let t0 = Instant::now();
            let mut now = t0;
            let mut next_session = 0u64;
            for _ in 0..3000 {
                now += Duration::from_millis(rng.gen_range(0..60));
                let transport = if rng.gen_bool(0.5) {
                    Transport::Udp
                } else {
                    Transport::Tcp
                };
                let id = format!("p{}", rng.gen_range(0..6));
                let e = ep(
                    transport,
                    &format!("203.0.113.{}:4000", rng.gen_range(1..4)),
                );
                match rng.gen_range(0..6) {
                    0 | 1 => {
                        t.register(now, &id, e, vec![], None).expect("room");
                        m.expire(now);
                        m.peers.insert((transport, id), (e, now + cfg.peer_ttl));
                    }
                    2 => {
                        next_session += 1;
                        let sid = SessionId(next_session);
                        let got = t.introduce(now, &id, e, info("203.0.113.9:9"), sid);
                        m.expire(now);
                        let key = (transport, id.clone());
                        match m.peers.get(&key) {
                            Some((l, _)) => {
                                assert!(got.is_ok());
                                let entry = SessionEntry {
                                    listener: *l,
                                    connector: e,
                                    expires: now + cfg.session_ttl,
                                };
                                m.sessions.insert(sid, (id, entry));
                            }
                            None => assert!(got.is_err()),
                        }
                    }
                    3 if next_session > 0 => {
                        let sid = SessionId(rng.gen_range(1..=next_session));
                        let from = m.sessions.get(&sid).map_or(e, |(_, s)| s.connector);
                        let got = t.refresh_session(now, sid, from);
                        m.expire(now);
                        match m.sessions.get_mut(&sid) {
                            Some((_, s)) => {
                                assert!(got.is_ok());
                                s.expires = now + cfg.session_ttl;
                            }
                            None => assert!(got.is_err()),
                        }
                    }
                    4 if next_session > 0 => {
                        let sid = SessionId(rng.gen_range(1..=next_session));
                        let from = m.sessions.get(&sid).map_or(e, |(_, s)| s.listener);
                        let closed = t.close_session(sid, from);
                        assert_eq!(closed, m.sessions.remove(&sid).is_some());
                    }
                    _ => {
                        let removed = t.unregister(&id, e);
                        let key = (transport, id.clone());
                        let owner = m.peers.get(&key).is_some_and(|(p, _)| *p == e);
                        assert_eq!(removed, owner);
                        if owner {
                            m.peers.remove(&key);
                            m.sessions
                                .retain(|_, (l, s)| !(*l == id && s.listener == e));
                        }
                    }
                }
                t.expire(now);
                m.expire(now);
                assert_eq!(t.peer_count(), m.peers.len(), "seed {seed}");
                assert_eq!(t.session_count(), m.sessions.len(), "seed {seed}");
                let earliest = m
                    .peers
                    .values()
                    .map(|(_, e)| *e)
                    .chain(m.sessions.values().map(|(_, s)| s.expires))
                    .min();
                // Never late: the heap's deadline is at or before the real earliest expiry.
                match (t.next_expiry(), earliest) {
                    (Some(h), Some(e)) => assert!(h <= e, "seed {seed}"),
                    (h, e) => assert_eq!(h.is_some(), e.is_some(), "seed {seed}"),
                }
            }
        }
    }

    #[test]
    fn churn_does_not_grow_the_expiry_heap() {
        let t0 = Instant::now();
        let mut t = RendezvousTable::new(TableConfig::default());
        let l = ep(Transport::Udp, "203.0.113.1:4000");
        t.register(t0, "a", l, vec![], None).expect("register");
        let c = ep(Transport::Udp, "203.0.113.2:5000");
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_micros(i);
            t.introduce(now, "a", c, info("203.0.113.2:5000"), SessionId(i))
                .expect("introduce");
            assert!(t.close_session(SessionId(i), c));
        }
        assert_eq!(t.session_count(), 0);
        assert!(t.deadlines.len() <= 2 * t.peer_count() + 64 + 1);
        assert!(t.by_listener.is_empty());
    }
}
