//! The rendezvous + relay server core: takes a message and where it came from, answers, and
//! queues what must be sent to whom. No sockets, no clock (DESIGN.md, "sans-IO at the core").
//!
//! - REGISTER records the sender's reflexive endpoint and its local candidates (and refreshes).
//! - CONNECT creates a session: the connector gets the listener's candidates in the response, the
//!   listener gets the connector's in an INTRODUCE sent at the same moment, both told to start in
//!   [`ServerConfig::start_in`]. INTRODUCE is retransmitted until the listener answers.
//! - DATA and CLOSE with a session id are relayed verbatim to the session's other side.
//! - Anything malformed is dropped; requests that parse but cannot be served get an error.
//!
//! Abuse (issue 14, H3/H4/M1): over UDP a REGISTER or CONNECT must echo the cookie of
//! [`super::cookie`]; without it the only answer is a challenge no larger than the request and
//! nothing is stored, so a spoofed source can neither create state nor aim answers at anyone.
//! Verified sources are rate-limited and held to quotas (registrations and sessions per source,
//! sessions per listener); relayed sessions are circuits with byte, duration and rate limits,
//! refused from then on with [`refusal::CIRCUIT`]; sources and candidates that no peer can have
//! (unspecified, multicast, broadcast, port 0, loopback unless the server itself is) are dropped.
//! [`ServerCounters`] counts what was served and refused, by reason.
//!
//! Session ids (the capability that admits a packet into a session) and the transaction ids of
//! INTRODUCE come from the generator the server is built with: from entropy in `punch serve`,
//! seeded in tests.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use super::identity::{self, KeyProof, Purpose};
use serde::Serialize;

use super::codec::{self, code, method, refusal, PeerInfo, PunchMessage};
use super::cookie::{CookieJar, COOKIE_SLOT};
use super::table::{Endpoint, RendezvousTable, TableConfig, TableError};
use super::{SessionId, Transport};
use crate::net::Transmit;
use crate::reflector::rate_limit::{RateLimit, RateLimiter};
use crate::stun::TransactionId;

/// Every limit of the server in one place (`punch serve` has a flag for each).
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    pub table: TableConfig,
    /// How long after the introduction both sides start punching (absorbs the path difference).
    pub start_in: Duration,
    pub intro_rto: Duration,
    pub intro_retries: u32,
    /// Cookie slot length: a cookie is good for one to two of these.
    pub cookie_slot: Duration,
    /// REGISTER/CONNECT/REFRESH per verified source (IPv4 address or IPv6 /64).
    pub request_rate: RateLimit,
    /// Binding requests per source (their answer is 12 bytes larger than the request).
    pub binding_rate: RateLimit,
    /// Challenges per second, all sources together (each no larger than its request).
    pub challenge_rate: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            table: TableConfig::default(),
            start_in: Duration::from_millis(20),
            intro_rto: Duration::from_millis(150),
            intro_retries: 6,
            cookie_slot: COOKIE_SLOT,
            request_rate: RateLimit {
                per_second: 20,
                burst: 40,
            },
            binding_rate: RateLimit {
                per_second: 50,
                burst: 100,
            },
            challenge_rate: 5_000,
        }
    }
}

/// What the server did, by kind, and what it refused, by reason (logged by `punch serve`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServerCounters {
    pub registrations: u64,
    pub connects: u64,
    pub bindings: u64,
    pub challenges: u64,
    pub relayed_packets: u64,
    pub relayed_bytes: u64,
    pub refused: Refused,
}

/// Refusals by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// Not a punch message.
    pub malformed: u64,
    /// A source or address no peer can have.
    pub forbidden: u64,
    /// No valid cookie and no challenge sent (over the challenge rate or larger than the request).
    pub unverified: u64,
    /// Over a per-source rate.
    pub rate: u64,
    /// A per-source or per-listener quota, or the table is full.
    pub quota: u64,
    pub unknown_peer: u64,
    pub unknown_session: u64,
    /// Relayed data over a circuit's bytes, duration or rate.
    pub circuit: u64,
}

/// Sessions the relay ended over a circuit limit, remembered so their peers hear why.
const RECENT_REFUSED: usize = 1024;

/// One of the server's sockets, the source of a [`Transmit`]: the UDP socket or the TCP listener
/// at `local`. A TCP transmit goes on the connection accepted from its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerSocket {
    pub transport: Transport,
    pub local: SocketAddr,
}

impl Endpoint {
    /// The server socket this endpoint talks to.
    pub fn socket(&self) -> ServerSocket {
        ServerSocket {
            transport: self.transport,
            local: self.local,
        }
    }
}

fn transmit(to: Endpoint, payload: Vec<u8>) -> Transmit<ServerSocket> {
    Transmit {
        source: to.socket(),
        destination: to.remote,
        payload,
    }
}

#[derive(Debug)]
struct PendingIntro {
    to: Endpoint,
    bytes: Vec<u8>,
    session: SessionId,
    next: Instant,
    left: u32,
}

#[derive(Debug)]
struct Guards {
    cookies: CookieJar,
    requests: RateLimiter,
    bindings: RateLimiter,
}

/// Recently answered CONNECT transactions, so a retransmitted request gets the same session.
const RECENT_CONNECTS: usize = 256;

#[derive(Debug)]
pub struct RendezvousServer {
    config: ServerConfig,
    table: RendezvousTable,
    out: VecDeque<Transmit<ServerSocket>>,
    intros: Vec<PendingIntro>,
    recent: VecDeque<(TransactionId, Endpoint, Vec<u8>)>,
    rng: StdRng,
    guards: Option<Guards>,
    challenge_tokens: f64,
    challenge_at: Option<Instant>,
    circuit_ended: VecDeque<(SessionId, &'static str)>,
    counters: ServerCounters,
}

impl RendezvousServer {
    /// A server drawing session and transaction ids from `rng`.
    /// Its cookie key comes from `rng` now; its cookie slots and rate buckets count from the
    /// first `now` it is given (it never reads the clock).
    pub fn new(config: ServerConfig, rng: StdRng) -> Self {
        Self {
            config,
            table: RendezvousTable::new(config.table),
            out: VecDeque::new(),
            intros: Vec::new(),
            recent: VecDeque::new(),
            guards: None,
            challenge_tokens: f64::from(config.challenge_rate),
            challenge_at: None,
            circuit_ended: VecDeque::new(),
            counters: ServerCounters::default(),
            rng,
        }
    }

    /// The cookie jar and the rate limiters, made at the first `now` (their epoch).
    fn guards(&mut self, now: Instant) -> &mut Guards {
        let (config, rng) = (&self.config, &mut self.rng);
        self.guards.get_or_insert_with(|| Guards {
            cookies: CookieJar::new(now, config.cookie_slot, rng),
            requests: RateLimiter::new(config.request_rate, now),
            bindings: RateLimiter::new(config.binding_rate, now),
        })
    }

    pub fn counters(&self) -> &ServerCounters {
        &self.counters
    }

    pub fn table(&self) -> &RendezvousTable {
        &self.table
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit<ServerSocket>> {
        self.out.pop_front()
    }

    /// A TCP connection closed: its registrations and sessions go with it.
    pub fn connection_closed(&mut self, endpoint: Endpoint) {
        self.table.drop_endpoint(endpoint);
        self.intros.retain(|p| p.to != endpoint);
    }

    fn send(&mut self, to: Endpoint, msg: &PunchMessage) {
        if let Ok(bytes) = msg.to_vec() {
            self.out.push_back(transmit(to, bytes));
        }
    }

    fn error(&mut self, to: Endpoint, tid: TransactionId, m: u16, code: u16, reason: String) {
        self.send(
            to,
            &PunchMessage::Error {
                tid,
                method: m,
                code,
                reason,
            },
        );
    }

    /// Whether `a` is an address a peer can have, as seen from the server socket `local`:
    /// not unspecified, multicast or broadcast, not port 0, and loopback only when the server
    /// itself serves on loopback (a test or a one-host setup).
    pub fn admissible(local: SocketAddr, a: SocketAddr) -> bool {
        let ip = a.ip().to_canonical();
        a.port() != 0
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
            && (!ip.is_loopback() || local.ip().to_canonical().is_loopback())
    }

    /// A peer's candidates, without those no peer can have (they are handed to the other side,
    /// which probes them).
    fn filter(&mut self, local: SocketAddr, mut c: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let n = c.len();
        c.retain(|a| Self::admissible(local, *a));
        self.counters.refused.forbidden += (n - c.len()) as u64;
        c
    }

    /// Whether a UDP request echoes a valid cookie; if not, challenges it (once the challenge is
    /// no larger than the request and within the global challenge rate). TCP needs no cookie:
    /// its handshake already proved the source receives.
    fn verified(&mut self, now: Instant, from: Endpoint, bytes: &[u8], m: &PunchMessage) -> bool {
        if from.transport == Transport::Tcp {
            return true;
        }
        let method = match m {
            PunchMessage::Register { .. } => method::REGISTER,
            _ => method::CONNECT,
        };
        let jar = &self.guards(now).cookies;
        if codec::cookie(bytes).is_some_and(|c| jar.verify(now, &from, &c)) {
            return true;
        }
        let fresh = jar.mint(now, &from);
        // Global token bucket for challenges.
        let rate = f64::from(self.config.challenge_rate);
        let elapsed = self
            .challenge_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.challenge_tokens = (self.challenge_tokens + elapsed * rate).min(rate.max(1.0));
        self.challenge_at = Some(now);
        match codec::challenge(m.tid(), method, &fresh) {
            Some(c) if c.len() <= bytes.len() && self.challenge_tokens >= 1.0 => {
                self.challenge_tokens -= 1.0;
                self.counters.challenges += 1;
                self.out.push_back(transmit(from, c));
            }
            _ => self.counters.refused.unverified += 1,
        }
        false
    }

    /// `msg` with a fresh cookie for `to` appended (UDP), so a peer's next request has one.
    fn send_with_cookie(&mut self, now: Instant, to: Endpoint, msg: &PunchMessage) {
        let Ok(bytes) = msg.to_vec() else { return };
        let bytes = match to.transport {
            Transport::Udp => {
                let c = self.guards(now).cookies.mint(now, &to);
                codec::with_cookie(&bytes, &c).unwrap_or(bytes)
            }
            Transport::Tcp => bytes,
        };
        self.out.push_back(transmit(to, bytes));
    }

    /// An error answer to a source that may not have proved it receives: sent only when it is
    /// no larger than the request (no reason text then), so it amplifies nothing.
    fn small_error(
        &mut self,
        to: Endpoint,
        request_len: usize,
        tid: TransactionId,
        m: u16,
        c: u16,
    ) {
        let e = PunchMessage::Error {
            tid,
            method: m,
            code: c,
            reason: String::new(),
        };
        if let Ok(b) = e.to_vec() {
            if b.len() <= request_len {
                self.out.push_back(transmit(to, b));
            }
        }
    }

    fn refuse(&mut self, e: &TableError) {
        let r = &mut self.counters.refused;
        match e {
            TableError::UnknownPeer(_) => r.unknown_peer += 1,
            TableError::UnknownSession(_) => r.unknown_session += 1,
            TableError::Full | TableError::SourceQuota(_) | TableError::PeerQuota => r.quota += 1,
            TableError::IdHeld(_) => r.forbidden += 1,
            TableError::Circuit(_) => r.circuit += 1,
        }
    }

    fn table_error_code(e: &TableError) -> u16 {
        match e {
            TableError::UnknownPeer(_) => code::UNKNOWN_PEER,
            TableError::UnknownSession(_) => code::UNKNOWN_SESSION,
            TableError::Full => refusal::CAPACITY,
            TableError::IdHeld(_) => code::FORBIDDEN,
            TableError::SourceQuota(_) | TableError::PeerQuota => refusal::QUOTA,
            TableError::Circuit(_) => refusal::CIRCUIT,
        }
    }

    /// One message from `from`.
    pub fn handle(&mut self, now: Instant, from: Endpoint, bytes: &[u8]) {
        if !Self::admissible(from.local, from.remote) {
            // A source no peer can have (spoofed, or a martian): nothing is answered.
            self.counters.refused.forbidden += 1;
            return;
        }
        if self.binding(now, from, bytes) {
            return;
        }
        let Ok(msg) = PunchMessage::decode(bytes) else {
            self.counters.refused.malformed += 1;
            return;
        };
        if matches!(
            msg,
            PunchMessage::Register { .. } | PunchMessage::Connect { .. }
        ) {
            if !self.verified(now, from, bytes, &msg) {
                return;
            }
            if !self.guards(now).requests.allow(now, from.remote.ip()) {
                self.counters.refused.rate += 1;
                let (tid, m) = match &msg {
                    PunchMessage::Register { tid, .. } => (*tid, method::REGISTER),
                    _ => (msg.tid(), method::CONNECT),
                };
                self.error(from, tid, m, refusal::QUOTA, "request rate".into());
                return;
            }
        }
        match msg {
            PunchMessage::Register {
                tid,
                id,
                candidates,
                port_delta,
                proof,
            } => {
                let candidates = self.filter(from.local, candidates);
                match self.register(now, from, tid, &id, candidates, port_delta, proof) {
                    Ok(()) => {
                        self.counters.registrations += 1;
                        self.send_with_cookie(
                            now,
                            from,
                            &PunchMessage::RegisterOk {
                                tid,
                                mapped: from.remote,
                            },
                        )
                    }
                    Err((c, e)) => self.error(from, tid, method::REGISTER, c, e),
                }
            }
            PunchMessage::Unregister { tid, id, proof }
                if identity::verify(&proof, Purpose::Unregister, &tid, &id) =>
            {
                self.table.unregister_as(&id, from, &proof.key);
            }
            PunchMessage::Connect {
                tid,
                target,
                candidates,
                port_delta,
                punch_window_ms,
            } => {
                let info = PeerInfo {
                    reflexive: from.remote,
                    candidates: self.filter(from.local, candidates),
                    port_delta,
                    punch_window_ms,
                    key: None,
                };
                self.connect(now, from, tid, &target, info)
            }
            PunchMessage::IntroduceOk { session, .. } => {
                self.intros
                    .retain(|p| !(p.session == session && p.to == from));
            }
            PunchMessage::Refresh { tid, session } => {
                if let Some(&(_, why)) = self.circuit_ended.iter().find(|(s, _)| *s == session) {
                    // Only a side of the session ever knew its id; the answer names the limit.
                    self.counters.refused.circuit += 1;
                    let reason = format!("relay circuit limit reached: {why}");
                    self.error(from, tid, method::REFRESH, refusal::CIRCUIT, reason);
                    return;
                }
                match self.table.refresh_session(now, session, from) {
                    Ok(()) => self.send(from, &PunchMessage::RefreshOk { tid }),
                    Err(e) => {
                        self.refuse(&e);
                        let n = bytes.len();
                        self.small_error(from, n, tid, method::REFRESH, code::UNKNOWN_SESSION)
                    }
                }
            }
            PunchMessage::Data { session, .. } | PunchMessage::Sealed { session, .. } => {
                match self.table.relay(now, session, from, bytes.len()) {
                    Ok(to) if to.transport == from.transport => {
                        self.counters.relayed_packets += 1;
                        self.counters.relayed_bytes += bytes.len() as u64;
                        self.out.push_back(transmit(to, bytes.to_vec()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.refuse(&e);
                        if let TableError::Circuit(why @ ("bytes" | "duration")) = e {
                            self.circuit_ended(session, why);
                        }
                    }
                }
            }
            PunchMessage::Close { session, .. } => {
                if let Ok(to) = self.table.relay_target(now, session, from) {
                    self.out.push_back(transmit(to, bytes.to_vec()));
                }
                self.table.close_session(session, from);
            }
            // Responses and peer-to-peer messages have no business at the server.
            _ => {}
        }
    }

    /// Peer identity (issue 14): REGISTER with a key proof that verifies, for an id no other key
    /// holds. The error is the code and reason to answer with.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        now: Instant,
        from: Endpoint,
        tid: TransactionId,
        id: &str,
        candidates: Vec<SocketAddr>,
        port_delta: Option<i32>,
        proof: KeyProof,
    ) -> Result<(), (u16, String)> {
        if !identity::verify(&proof, Purpose::Register, &tid, id) {
            self.counters.refused.forbidden += 1;
            return Err((code::FORBIDDEN, "the key proof does not verify".into()));
        }
        self.table
            .register_as(now, id, from, candidates, port_delta, proof.key)
            .map_err(|e| {
                self.refuse(&e);
                (Self::table_error_code(&e), e.to_string())
            })
    }

    fn circuit_ended(&mut self, session: SessionId, why: &'static str) {
        if self.circuit_ended.len() == RECENT_REFUSED {
            self.circuit_ended.pop_front();
        }
        self.circuit_ended.push_back((session, why));
    }

    /// A plain RFC 8489 Binding request gets XOR-MAPPED-ADDRESS, so a peer can measure its own
    /// port allocation (port prediction) against the rendezvous server itself. The answer is
    /// 12 bytes larger than a bare request, so it is rate-limited per source.
    fn binding(&mut self, now: Instant, from: Endpoint, bytes: &[u8]) -> bool {
        let Ok(m) = crate::stun::Message::parse(bytes) else {
            return false;
        };
        if m.message_type() != crate::stun::MessageType::BINDING_REQUEST || !m.is_rfc8489() {
            return false;
        }
        if !self.guards(now).bindings.allow(now, from.remote.ip()) {
            self.counters.refused.rate += 1;
            return true;
        }
        self.counters.bindings += 1;
        let mut buf = [0u8; 64];
        let tid = m.transaction_id();
        if let Ok(mut w) = crate::stun::MessageWriter::new(
            &mut buf,
            crate::stun::MessageType::BINDING_RESPONSE,
            &tid,
        ) {
            if w.add_xor_address(crate::stun::attr_type::XOR_MAPPED_ADDRESS, from.remote)
                .is_ok()
            {
                let n = w.finish();
                self.out.push_back(transmit(from, buf[..n].to_vec()));
            }
        }
        true
    }

    fn connect(
        &mut self,
        now: Instant,
        from: Endpoint,
        tid: TransactionId,
        target: &str,
        info: PeerInfo,
    ) {
        if let Some((_, _, resp)) = self.recent.iter().find(|(t, e, _)| *t == tid && *e == from) {
            let bytes = resp.clone();
            self.out.push_back(transmit(from, bytes));
            return;
        }
        let session = SessionId(self.rng.gen());
        match self.table.introduce(now, target, from, info, session) {
            Ok(intro) => {
                let start_in_ms = self.config.start_in.as_millis().min(u32::MAX as u128) as u32;
                let resp = PunchMessage::ConnectOk {
                    tid,
                    session,
                    mapped: from.remote,
                    peer: intro.listener_info,
                    start_in_ms,
                };
                let introduce = PunchMessage::Introduce {
                    tid: TransactionId::from_rng(&mut self.rng),
                    session,
                    peer: intro.connector_info,
                    start_in_ms,
                };
                self.counters.connects += 1;
                let r = resp.to_vec().map(|r| match from.transport {
                    Transport::Udp => {
                        let c = self.guards(now).cookies.mint(now, &from);
                        codec::with_cookie(&r, &c).unwrap_or(r)
                    }
                    Transport::Tcp => r,
                });
                if let (Ok(r), Ok(i)) = (r, introduce.to_vec()) {
                    // Both sides hear at the same moment, so they start together.
                    self.out.push_back(transmit(intro.listener, i.clone()));
                    self.out.push_back(transmit(from, r.clone()));
                    self.intros.push(PendingIntro {
                        to: intro.listener,
                        bytes: i,
                        session,
                        next: now + self.config.intro_rto,
                        left: self.config.intro_retries,
                    });
                    if self.recent.len() == RECENT_CONNECTS {
                        self.recent.pop_front();
                    }
                    self.recent.push_back((tid, from, r));
                }
            }
            Err(TableError::UnknownPeer(p)) => {
                self.counters.refused.unknown_peer += 1;
                self.error(
                    from,
                    tid,
                    method::CONNECT,
                    code::UNKNOWN_PEER,
                    format!("no peer registered as {p} over {}", from.transport),
                )
            }
            Err(e) => {
                self.refuse(&e);
                let c = Self::table_error_code(&e);
                self.error(from, tid, method::CONNECT, c, e.to_string())
            }
        }
    }

    /// Retransmits unanswered introductions and expires the table.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.table.expire(now);
        let mut resend = Vec::new();
        for p in &mut self.intros {
            if p.next <= now && p.left > 0 {
                p.left -= 1;
                p.next = now + self.config.intro_rto;
                resend.push(transmit(p.to, p.bytes.clone()));
            }
        }
        self.out.extend(resend);
        self.intros.retain(|p| p.left > 0);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let i = self.intros.iter().map(|p| p.next).min();
        match (i, self.table.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn server() -> RendezvousServer {
        RendezvousServer::new(ServerConfig::default(), StdRng::seed_from_u64(3))
    }

    fn ep(remote: &str) -> Endpoint {
        Endpoint {
            transport: Transport::Udp,
            local: "198.51.100.1:3490".parse().expect("addr"),
            remote: remote.parse().expect("addr"),
        }
    }

    fn drain(s: &mut RendezvousServer) -> Vec<(Endpoint, PunchMessage)> {
        std::iter::from_fn(|| s.poll_transmit())
            .map(|t| {
                let to = Endpoint {
                    transport: t.source.transport,
                    local: t.source.local,
                    remote: t.destination,
                };
                (to, PunchMessage::decode(&t.payload).expect("decode"))
            })
            .collect()
    }

    /// `msg` as a peer sends it once challenged: the first copy (with a zero cookie) gets a
    /// challenge and nothing else; the bytes returned echo the challenge's cookie.
    pub(crate) fn with_cookie(
        s: &mut RendezvousServer,
        now: Instant,
        from: Endpoint,
        msg: &PunchMessage,
    ) -> Vec<u8> {
        let first = codec::with_cookie(&msg.to_vec().expect("enc"), &[0; codec::COOKIE_LEN])
            .expect("cookie");
        s.handle(now, from, &first);
        let out: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
        assert_eq!(out.len(), 1, "one challenge");
        assert!(
            out[0].payload.len() <= first.len(),
            "no larger than the request"
        );
        let c = codec::cookie(&out[0].payload).expect("a cookie");
        codec::replace_cookie(&first, &c).expect("replace")
    }

    #[test]
    fn connect_introduces_both_sides_and_relays_data() {
        let t0 = Instant::now();
        let mut s = server();
        let l = ep("203.0.113.1:4000");
        let c = ep("203.0.113.2:5000");
        let tid = TransactionId::random();
        let me = crate::punch::identity::Identity::from_seed([1; 32]);
        let reg = PunchMessage::Register {
            tid,
            id: "alice".into(),
            candidates: vec!["10.1.0.2:4000".parse().expect("addr")],
            port_delta: None,
            proof: me.prove(crate::punch::identity::Purpose::Register, &tid, "alice"),
        };
        let reg = with_cookie(&mut s, t0, l, &reg);
        s.handle(t0, l, &reg);
        let out = drain(&mut s);
        assert!(
            matches!(&out[..], [(to, PunchMessage::RegisterOk { mapped, .. })] if *to == l && *mapped == l.remote)
        );
        let conn = PunchMessage::Connect {
            tid: TransactionId::random(),
            target: "alice".into(),
            candidates: vec![],
            port_delta: None,
            punch_window_ms: None,
        };
        let conn_bytes = with_cookie(&mut s, t0, c, &conn);
        s.handle(t0, c, &conn_bytes);
        let out = drain(&mut s);
        assert_eq!(out.len(), 2);
        let Some(id) = out[1].1.session() else {
            panic!("no session in {out:?}");
        };
        assert!(
            matches!(&out[0], (to, PunchMessage::Introduce { session, peer, .. })
            if *to == l && *session == id && peer.reflexive == c.remote)
        );
        assert!(
            matches!(&out[1], (to, PunchMessage::ConnectOk { session, peer, .. })
            if *to == c && *session == id && peer.reflexive == l.remote
               && peer.candidates.len() == 1)
        );
        // A retransmitted CONNECT gets the same answer, not a second session.
        s.handle(t0, c, &conn_bytes);
        let out = drain(&mut s);
        assert!(
            matches!(&out[..], [(_, PunchMessage::ConnectOk { session, .. })] if *session == id)
        );
        // INTRODUCE is retransmitted until acknowledged.
        s.handle_timeout(t0 + Duration::from_secs(1));
        assert!(matches!(
            &drain(&mut s)[..],
            [(_, PunchMessage::Introduce { .. })]
        ));
        let ack = PunchMessage::IntroduceOk {
            tid: TransactionId::random(),
            session: id,
        };
        s.handle(t0, l, &ack.to_vec().expect("enc"));
        s.handle_timeout(t0 + Duration::from_secs(2));
        assert!(drain(&mut s).is_empty());
        // Relay, verbatim, both ways; strangers are dropped.
        let data = PunchMessage::Data {
            tid: TransactionId::random(),
            session: id,
            seq: Some(0),
            ack: 0,
            payload: b"x".to_vec(),
        }
        .to_vec()
        .expect("enc");
        s.handle(t0, c, &data);
        assert_eq!(s.poll_transmit(), Some(transmit(l, data.clone())));
        s.handle(t0, l, &data);
        assert_eq!(s.poll_transmit(), Some(transmit(c, data.clone())));
        s.handle(t0, ep("203.0.113.66:1"), &data);
        assert_eq!(s.poll_transmit(), None);
    }

    #[test]
    fn unknown_peer_and_session_get_errors_and_garbage_is_dropped() {
        let t0 = Instant::now();
        let mut s = server();
        let c = ep("203.0.113.2:5000");
        let conn = PunchMessage::Connect {
            tid: TransactionId::random(),
            target: "nobody".into(),
            candidates: vec![],
            port_delta: None,
            punch_window_ms: None,
        };
        let conn = with_cookie(&mut s, t0, c, &conn);
        s.handle(t0, c, &conn);
        assert!(matches!(
            &drain(&mut s)[..],
            [(_, PunchMessage::Error { code: 404, .. })]
        ));
        let r = PunchMessage::Refresh {
            tid: TransactionId::random(),
            session: SessionId(9),
        };
        s.handle(t0, c, &r.to_vec().expect("enc"));
        assert!(matches!(
            &drain(&mut s)[..],
            [(_, PunchMessage::Error { code: 437, .. })]
        ));
        s.handle(t0, c, b"\x00\x01garbage");
        s.handle(t0, c, &[0u8; 20]);
        assert!(drain(&mut s).is_empty());
    }
    #[test]
    fn a_circuit_over_its_bytes_ends_and_its_peers_hear_why() {
        let t0 = Instant::now();
        let mut config = ServerConfig::default();
        config.table.circuit.bytes = 1000;
        let mut s = RendezvousServer::new(config, StdRng::seed_from_u64(5));
        let (l, c) = (ep("203.0.113.1:4000"), ep("203.0.113.2:5000"));
        let tid = TransactionId::random();
        let bob = crate::punch::identity::Identity::from_seed([2; 32]);
        let reg = PunchMessage::Register {
            tid,
            id: "bob".into(),
            candidates: vec![],
            port_delta: None,
            proof: bob.prove(crate::punch::identity::Purpose::Register, &tid, "bob"),
        };
        let reg = with_cookie(&mut s, t0, l, &reg);
        s.handle(t0, l, &reg);
        let conn = PunchMessage::Connect {
            tid: TransactionId::random(),
            target: "bob".into(),
            candidates: vec![],
            port_delta: None,
            punch_window_ms: None,
        };
        drain(&mut s);
        let conn = with_cookie(&mut s, t0, c, &conn);
        s.handle(t0, c, &conn);
        let id = drain(&mut s)
            .iter()
            .find_map(|(_, m)| m.session())
            .expect("session");
        let data = PunchMessage::Data {
            tid: TransactionId::random(),
            session: id,
            seq: Some(0),
            ack: 0,
            payload: vec![0; 300],
        }
        .to_vec()
        .expect("enc");
        let mut relayed = 0;
        for _ in 0..10 {
            s.handle(t0, c, &data);
            relayed += drain(&mut s).len();
        }
        assert_eq!(relayed, 1000 / data.len(), "as many as fit in 1000 bytes");
        assert_eq!(s.counters().refused.circuit, 1);
        assert_eq!(s.table().session_count(), 0, "the circuit ended");
        let r = PunchMessage::Refresh {
            tid: TransactionId::random(),
            session: id,
        };
        s.handle(t0, c, &r.to_vec().expect("enc"));
        assert!(matches!(
            &drain(&mut s)[..],
            [(_, PunchMessage::Error { code: refusal::CIRCUIT, reason, .. })] if reason.contains("bytes")
        ));
    }
}
