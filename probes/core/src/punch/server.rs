//! The rendezvous + relay server core: takes a message and where it came from, answers, and
//! queues what must be sent to whom. No sockets, no clock (DESIGN.md, "sans-IO at the core").
//!
//! - REGISTER records the sender's reflexive endpoint and its local candidates (and refreshes).
//! - CONNECT creates a session: the connector gets the listener's candidates in the response, the
//!   listener gets the connector's in an INTRODUCE sent at the same moment, both told to start in
//!   [`ServerConfig::start_in`]. INTRODUCE is retransmitted until the listener answers.
//! - DATA and CLOSE with a session id are relayed verbatim to the session's other side.
//! - Anything malformed is dropped; requests that parse but cannot be served get an error.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::codec::{code, method, PeerInfo, PunchMessage};
use super::table::{Endpoint, RendezvousTable, TableConfig, TableError};
use super::SessionId;
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

/// A datagram or frame to send: to `to.remote`, from the server socket `to.local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: Endpoint,
    pub bytes: Vec<u8>,
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
    out: VecDeque<Transmit>,
    intros: Vec<PendingIntro>,
    recent: VecDeque<(TransactionId, Endpoint, Vec<u8>)>,
}

impl RendezvousServer {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config,
            table: RendezvousTable::new(config.table),
            out: VecDeque::new(),
            intros: Vec::new(),
            recent: VecDeque::new(),
        }
    }

    pub fn table(&self) -> &RendezvousTable {
        &self.table
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// A TCP connection closed: its registrations and sessions go with it.
    pub fn connection_closed(&mut self, endpoint: Endpoint) {
        self.table.drop_endpoint(endpoint);
        self.intros.retain(|p| p.to != endpoint);
    }

    fn send(&mut self, to: Endpoint, msg: &PunchMessage) {
        if let Ok(bytes) = msg.to_vec() {
            self.out.push_back(Transmit { to, bytes });
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

    /// One message from `from`. `random` supplies session ids (injected for determinism).
    pub fn handle(&mut self, now: Instant, from: Endpoint, bytes: &[u8], random: u64) {
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
            } => match self.table.register(now, &id, from, candidates, port_delta) {
                Ok(()) => self.send(
                    from,
                    &PunchMessage::RegisterOk {
                        tid,
                        mapped: from.remote,
                    },
                ),
                Err(e) => self.error(
                    from,
                    tid,
                    method::REGISTER,
                    code::BAD_REQUEST,
                    e.to_string(),
                ),
            },
            PunchMessage::Unregister { id, .. } => {
                self.table.unregister(&id, from);
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
                };
                self.connect(now, from, tid, &target, info, random)
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
            PunchMessage::Data { session, .. } => {
                if let Ok(to) = self.table.relay_target(now, session, from) {
                    if to.transport == from.transport {
                        self.out.push_back(Transmit {
                            to,
                            bytes: bytes.to_vec(),
                        });
                    }
                }
            }
            PunchMessage::Close { session, .. } => {
                if let Ok(to) = self.table.relay_target(now, session, from) {
                    self.out.push_back(Transmit {
                        to,
                        bytes: bytes.to_vec(),
                    });
                }
                self.table.close_session(session, from);
            }
            // Responses and peer-to-peer messages have no business at the server.
            _ => {}
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
                self.out.push_back(Transmit {
                    to: from,
                    bytes: buf[..n].to_vec(),
                });
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
        random: u64,
    ) {
        if let Some((_, _, resp)) = self.recent.iter().find(|(t, e, _)| *t == tid && *e == from) {
            let bytes = resp.clone();
            self.out.push_back(Transmit { to: from, bytes });
            return;
        }
        let session = SessionId(random);
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
                    tid: TransactionId::random(),
                    session,
                    peer: intro.connector_info,
                    start_in_ms,
                };
                if let (Ok(r), Ok(i)) = (resp.to_vec(), introduce.to_vec()) {
                    // Both sides hear at the same moment, so they start together.
                    self.out.push_back(Transmit {
                        to: intro.listener,
                        bytes: i.clone(),
                    });
                    self.out.push_back(Transmit {
                        to: from,
                        bytes: r.clone(),
                    });
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
                resend.push(Transmit {
                    to: p.to,
                    bytes: p.bytes.clone(),
                });
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
    use crate::punch::Transport;

    fn ep(remote: &str) -> Endpoint {
        Endpoint {
            transport: Transport::Udp,
            local: "198.51.100.1:3490".parse().expect("addr"),
            remote: remote.parse().expect("addr"),
        }
    }

    fn drain(s: &mut RendezvousServer) -> Vec<(Endpoint, PunchMessage)> {
        std::iter::from_fn(|| s.poll_transmit())
            .map(|t| (t.to, PunchMessage::decode(&t.bytes).expect("decode")))
            .collect()
    }

    #[test]
    fn connect_introduces_both_sides_and_relays_data() {
        let t0 = Instant::now();
        let mut s = RendezvousServer::new(ServerConfig::default());
        let l = ep("203.0.113.1:4000");
        let c = ep("203.0.113.2:5000");
        let reg = PunchMessage::Register {
            tid: TransactionId::random(),
            id: "alice".into(),
            candidates: vec!["10.1.0.2:4000".parse().expect("addr")],
            port_delta: None,
        };
        s.handle(t0, l, &reg.to_vec().expect("enc"), 0);
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
        s.handle(t0, c, &conn_bytes, 42);
        let out = drain(&mut s);
        assert_eq!(out.len(), 2);
        assert!(
            matches!(&out[0], (to, PunchMessage::Introduce { session, peer, .. })
            if *to == l && *session == SessionId(42) && peer.reflexive == c.remote)
        );
        assert!(
            matches!(&out[1], (to, PunchMessage::ConnectOk { session, peer, .. })
            if *to == c && *session == SessionId(42) && peer.reflexive == l.remote
               && peer.candidates.len() == 1)
        );
        // A retransmitted CONNECT gets the same answer, not a second session.
        s.handle(t0, c, &conn_bytes, 43);
        let out = drain(&mut s);
        assert!(
            matches!(&out[..], [(_, PunchMessage::ConnectOk { session, .. })] if *session == SessionId(42))
        );
        // INTRODUCE is retransmitted until acknowledged.
        s.handle_timeout(t0 + Duration::from_secs(1));
        assert!(matches!(
            &drain(&mut s)[..],
            [(_, PunchMessage::Introduce { .. })]
        ));
        let ack = PunchMessage::IntroduceOk {
            tid: TransactionId::random(),
            session: SessionId(42),
        };
        s.handle(t0, l, &ack.to_vec().expect("enc"), 0);
        s.handle_timeout(t0 + Duration::from_secs(2));
        assert!(drain(&mut s).is_empty());
        // Relay, verbatim, both ways; strangers are dropped.
        let data = PunchMessage::Data {
            tid: TransactionId::random(),
            session: SessionId(42),
            seq: Some(0),
            ack: 0,
            payload: b"x".to_vec(),
        }
        .to_vec()
        .expect("enc");
        s.handle(t0, c, &data, 0);
        assert_eq!(
            s.poll_transmit(),
            Some(Transmit {
                to: l,
                bytes: data.clone()
            })
        );
        s.handle(t0, l, &data, 0);
        assert_eq!(
            s.poll_transmit(),
            Some(Transmit {
                to: c,
                bytes: data.clone()
            })
        );
        s.handle(t0, ep("203.0.113.66:1"), &data, 0);
        assert_eq!(s.poll_transmit(), None);
    }

    #[test]
    fn unknown_peer_and_session_get_errors_and_garbage_is_dropped() {
        let t0 = Instant::now();
        let mut s = RendezvousServer::new(ServerConfig::default());
        let c = ep("203.0.113.2:5000");
        let conn = PunchMessage::Connect {
            tid: TransactionId::random(),
            target: "nobody".into(),
            candidates: vec![],
            port_delta: None,
            punch_window_ms: None,
        };
        s.handle(t0, c, &conn.to_vec().expect("enc"), 1);
        assert!(matches!(
            &drain(&mut s)[..],
            [(_, PunchMessage::Error { code: 404, .. })]
        ));
        let r = PunchMessage::Refresh {
            tid: TransactionId::random(),
            session: SessionId(9),
        };
        s.handle(t0, c, &r.to_vec().expect("enc"), 1);
        assert!(matches!(
            &drain(&mut s)[..],
            [(_, PunchMessage::Error { code: 437, .. })]
        ));
        s.handle(t0, c, b"\x00\x01garbage", 1);
        s.handle(t0, c, &[0u8; 20], 1);
        assert!(drain(&mut s).is_empty());
    }
}
