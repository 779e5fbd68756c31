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
//! Session ids (the capability that admits a packet into a session) and the transaction ids of
//! INTRODUCE come from the generator the server is built with: from entropy in `punch serve`,
//! seeded in tests.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use super::codec::{code, method, PeerInfo, PunchMessage};
use super::identity::{self, KeyProof, Purpose};
use super::table::{Endpoint, RendezvousTable, TableConfig, TableError};
use super::{SessionId, Transport};
use crate::net::Transmit;
use crate::stun::TransactionId;

#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    pub table: TableConfig,
    /// How long after the introduction both sides start punching (absorbs the path difference).
    pub start_in: Duration,
    pub intro_rto: Duration,
    pub intro_retries: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            table: TableConfig::default(),
            start_in: Duration::from_millis(20),
            intro_rto: Duration::from_millis(150),
            intro_retries: 6,
        }
    }
}

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
}

impl RendezvousServer {
    /// A server drawing session and transaction ids from `rng`.
    pub fn new(config: ServerConfig, rng: StdRng) -> Self {
        Self {
            config,
            table: RendezvousTable::new(config.table),
            out: VecDeque::new(),
            intros: Vec::new(),
            recent: VecDeque::new(),
            rng,
        }
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

    /// One message from `from`.
    pub fn handle(&mut self, now: Instant, from: Endpoint, bytes: &[u8]) {
        if self.binding(from, bytes) {
            return;
        }
        let Ok(msg) = PunchMessage::decode(bytes) else {
            return;
        };
        match msg {
            PunchMessage::Register {
                tid,
                id,
                candidates,
                port_delta,
                proof,
            } => match self.register(now, from, tid, &id, candidates, port_delta, proof) {
                Ok(()) => self.send(
                    from,
                    &PunchMessage::RegisterOk {
                        tid,
                        mapped: from.remote,
                    },
                ),
                Err((c, e)) => self.error(from, tid, method::REGISTER, c, e),
            },
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
                    candidates,
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
                match self.table.refresh_session(now, session, from) {
                    Ok(()) => self.send(from, &PunchMessage::RefreshOk { tid }),
                    Err(e) => self.error(
                        from,
                        tid,
                        method::REFRESH,
                        code::UNKNOWN_SESSION,
                        e.to_string(),
                    ),
                }
            }
            PunchMessage::Data { session, .. } | PunchMessage::Sealed { session, .. } => {
                if let Ok(to) = self.table.relay_target(now, session, from) {
                    if to.transport == from.transport {
                        self.out.push_back(transmit(to, bytes.to_vec()));
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
            return Err((code::FORBIDDEN, "the key proof does not verify".into()));
        }
        match self
            .table
            .register_as(now, id, from, candidates, port_delta, proof.key)
        {
            Ok(()) => Ok(()),
            Err(e @ TableError::IdHeld(_)) => Err((code::FORBIDDEN, e.to_string())),
            Err(e) => Err((code::BAD_REQUEST, e.to_string())),
        }
    }

    /// A plain RFC 8489 Binding request gets XOR-MAPPED-ADDRESS, so a peer can measure its own
    /// port allocation (port prediction) against the rendezvous server itself.
    fn binding(&mut self, from: Endpoint, bytes: &[u8]) -> bool {
        let Ok(m) = crate::stun::Message::parse(bytes) else {
            return false;
        };
        if m.message_type() != crate::stun::MessageType::BINDING_REQUEST || !m.is_rfc8489() {
            return false;
        }
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
                if let (Ok(r), Ok(i)) = (resp.to_vec(), introduce.to_vec()) {
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
            Err(TableError::UnknownPeer(p)) => self.error(
                from,
                tid,
                method::CONNECT,
                code::UNKNOWN_PEER,
                format!("no peer registered as {p} over {}", from.transport),
            ),
            Err(e) => self.error(from, tid, method::CONNECT, code::BAD_REQUEST, e.to_string()),
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
        s.handle(t0, l, &reg.to_vec().expect("enc"));
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
        let conn_bytes = conn.to_vec().expect("enc");
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
        s.handle(t0, c, &conn.to_vec().expect("enc"));
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
}
