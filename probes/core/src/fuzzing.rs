//! The "parse everything" routine shared by the cargo-fuzz target (`fuzz/fuzz_targets/parse_message.rs`)
//! and the property tests (`probes/core/tests/codec_props.rs`), so both hammer exactly the same code.
//!
//! It feeds untrusted bytes to every entry point a peer can reach — stream framing, message parsing,
//! attribute iteration, every typed attribute decoder (whatever the attribute's type, so each
//! decoder also sees values meant for others), FINGERPRINT checking and [`BindingResponse::parse`](crate::client::BindingResponse::parse) —
//! and then checks the invariants the module documentation promises. Unlike the rest of the crate it
//! panics on purpose: a panic here is either a codec panic or a broken invariant, and both are bugs
//! for the fuzzer to report. Not for production paths.

use std::net::SocketAddr;

use crate::client::BindingResponse;
use crate::stun::framing::{self, Frame, MAX_FRAME};
use crate::stun::{
    attr, ChangeRequest, ErrorCode, Message, MessageType, MessageWriter, HEADER_LEN,
};

/// Runs `bytes` through every parser and decoder; panics if any of them panics or breaks an invariant.
pub fn exercise(bytes: &[u8]) {
    check_framing(bytes);
    let Ok(msg) = Message::parse(bytes) else {
        return;
    };
    check_message(&msg);
}

fn check_framing(bytes: &[u8]) {
    match framing::frame(bytes) {
        Frame::Complete(n) => {
            assert!(
                n <= bytes.len(),
                "frame: Complete({n}) beyond {} bytes",
                bytes.len()
            );
            assert!(
                (HEADER_LEN..=MAX_FRAME).contains(&n),
                "frame: Complete({n}) out of range"
            );
            // Whatever the frame holds, parsing it must not panic.
            if let Ok(m) = Message::parse(&bytes[..n]) {
                check_message(&m);
            }
        }
        Frame::Partial(n) => {
            assert!(
                n > bytes.len(),
                "frame: Partial({n}) with {} bytes at hand",
                bytes.len()
            );
            assert!(n <= MAX_FRAME, "frame: Partial({n}) above MAX_FRAME");
        }
        Frame::Invalid => {}
    }
}

fn check_message(msg: &Message<'_>) {
    let bytes = msg.as_bytes();
    let len = bytes.len();
    assert!(
        len >= HEADER_LEN && len % 4 == 0,
        "parsed a {len}-byte message"
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([bytes[2], bytes[3]])) + HEADER_LEN,
        len,
        "header length field disagrees with the parsed size"
    );

    // The message type must survive decode + encode unchanged (RFC 8489 §5, figure 3).
    let raw_type = u16::from_be_bytes([bytes[0], bytes[1]]);
    assert_eq!(
        msg.message_type().to_u16(),
        raw_type,
        "message type round trip"
    );
    assert_eq!(MessageType::from_u16(raw_type), msg.message_type());
    assert_eq!(msg.transaction_id().0[..], bytes[4..HEADER_LEN]);

    if len <= MAX_FRAME {
        assert_eq!(
            framing::frame(bytes),
            Frame::Complete(len),
            "frame of a whole message"
        );
    }

    // Attributes tile the body exactly: aligned, contiguous, in bounds, ending at the end.
    let tid = msg.transaction_id();
    let mut expect_offset = HEADER_LEN;
    let mut count = 0usize;
    for a in msg.attributes() {
        assert_eq!(
            a.offset, expect_offset,
            "attribute offsets are not contiguous"
        );
        assert_eq!(a.offset % 4, 0);
        let end = a.offset + 4 + a.value.len();
        assert!(end <= len, "attribute value runs past the message");
        assert_eq!(a.value, &bytes[a.offset + 4..end]);
        expect_offset = a.offset + 4 + ((a.value.len() + 3) & !3);
        count += 1;
        check_decoders(a.typ, a.value, &tid);
    }
    assert_eq!(
        expect_offset, len,
        "iteration stopped before the end of the message"
    );
    assert_eq!(msg.attributes().count(), count);

    // Rebuilding the message attribute by attribute reproduces it, up to padding bytes (which
    // RFC 8489 §14 lets a sender fill with anything; our writer uses zeros).
    let mut rebuilt = vec![0u8; len];
    let Ok(mut w) = MessageWriter::new(&mut rebuilt, msg.message_type(), &tid) else {
        panic!("writer refused a {len}-byte buffer");
    };
    for a in msg.attributes() {
        if let Err(e) = w.add_raw(a.typ, a.value) {
            panic!("writer refused an attribute the parser accepted: {e}");
        }
    }
    assert_eq!(w.finish(), len, "rebuilt message has a different length");
    let mut zero_padded = bytes.to_vec();
    for a in msg.attributes() {
        let pad_start = a.offset + 4 + a.value.len();
        let pad_end = a.offset + 4 + ((a.value.len() + 3) & !3);
        zero_padded[pad_start..pad_end].fill(0);
    }
    assert_eq!(rebuilt, zero_padded, "parse + write is not the identity");

    // FINGERPRINT: valid implies it is the last attribute and 4 bytes long (RFC 8489 §14.7).
    let fp = msg.fingerprint_valid();
    if fp == Some(true) {
        let last = msg.attributes().last();
        assert!(
            matches!(last, Some(a) if a.typ == crate::stun::attr_type::FINGERPRINT && a.value.len() == 4),
            "a valid FINGERPRINT must be the last attribute"
        );
    }
    assert_eq!(
        fp.is_some(),
        msg.attribute(crate::stun::attr_type::FINGERPRINT).is_some()
    );

    // The client's view must not panic, and must agree with the raw view when it succeeds.
    if let Ok(r) = BindingResponse::parse(bytes, &tid, None) {
        assert_eq!(r.fingerprint_ok, fp);
        assert_eq!(r.classic, !msg.is_rfc8489());
        let first_xor = msg
            .attribute(crate::stun::attr_type::XOR_MAPPED_ADDRESS)
            .and_then(|a| attr::decode_xor_address(a.value, &tid).ok());
        assert_eq!(r.xor_mapped, first_xor);
    }
    // A different transaction ID is never accepted as the answer.
    let mut other = tid;
    other.0[15] ^= 1;
    assert!(BindingResponse::parse(bytes, &other, None).is_err());
}

/// Runs every typed decoder on one value and checks what each one claims.
fn check_decoders(typ: u16, value: &[u8], tid: &crate::stun::TransactionId) {
    if let Ok(addr) = attr::decode_address(value) {
        assert_eq!(value.len(), if addr.is_ipv4() { 8 } else { 20 });
        assert_eq!(
            reencode(typ, addr, false, tid)[1..],
            value[1..],
            "address round trip"
        );
    }
    match (
        attr::decode_xor_address(value, tid),
        attr::decode_address(value),
    ) {
        (Ok(x), Ok(_)) => {
            assert_eq!(
                reencode(typ, x, true, tid)[1..],
                value[1..],
                "xor address round trip"
            );
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "xor and plain decoders disagree on the error"),
        (x, p) => panic!("xor decode {x:?} but plain decode {p:?}"),
    }
    if let Ok(cr) = ChangeRequest::decode(value) {
        assert_eq!(value.len(), 4);
        assert_eq!(cr.to_bytes()[3], value[3] & 0x06);
    }
    if let Ok(port) = attr::decode_response_port(value) {
        assert!(value.len() == 2 || value.len() == 4);
        assert_eq!(port.to_be_bytes(), value[..2]);
    }
    if let Ok(e) = ErrorCode::decode(value) {
        assert!(
            (300..700).contains(&e.code),
            "error code {} out of range",
            e.code
        );
        assert_eq!(e.reason, &value[4..]);
        assert_eq!(e.code / 100, u16::from(value[2] & 0x07));
        assert_eq!(e.code % 100, u16::from(value[3]));
    }
    let unknown: Vec<u16> = attr::decode_unknown_attributes(value).collect();
    assert_eq!(unknown.len(), value.len() / 2);
}

/// Writes `addr` as an attribute with our writer and returns the value bytes.
fn reencode(typ: u16, addr: SocketAddr, xor: bool, tid: &crate::stun::TransactionId) -> Vec<u8> {
    let mut buf = [0u8; HEADER_LEN + 4 + 20];
    let Ok(mut w) = MessageWriter::new(&mut buf, MessageType::BINDING_RESPONSE, tid) else {
        panic!("writer refused a header-sized buffer");
    };
    let written = if xor {
        w.add_xor_address(typ, addr)
    } else {
        w.add_address(typ, addr)
    };
    if let Err(e) = written {
        panic!("writer refused address {addr}: {e}");
    }
    let n = w.finish();
    let vlen = usize::from(u16::from_be_bytes([
        buf[HEADER_LEN + 2],
        buf[HEADER_LEN + 3],
    ]));
    assert_eq!(n, HEADER_LEN + 4 + vlen);
    buf[HEADER_LEN + 4..n].to_vec()
}

/// A cooperating pair's shared test secret and link endpoints (A = 192.0.2.1, B = 192.0.2.2).
const LINK_SECRET: &[u8] = b"natscope-fuzz-link-secret";
const LINK_NOW_MS: u64 = 1_700_000_000_000;

fn link_config(listen: &str, partner: &str) -> crate::reflector::link::LinkConfig {
    crate::reflector::link::LinkConfig {
        listen: parse_addr(listen),
        partner: parse_addr(partner),
        secret: LINK_SECRET.to_vec(),
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("fuzz fixture address {s}: {e}"),
    }
}

/// Feeds `bytes` to the cooperating link's verifier twice: as they are, and signed with the shared
/// secret behind a fresh header, so the fuzzer reaches the address parsing the HMAC guards. Checks
/// that an accepted message's parts re-encode to a message the verifier accepts with the same
/// parts, that nothing is accepted twice, and that only the partner is heard. Returns whether the
/// signed message was accepted.
pub fn exercise_link(bytes: &[u8]) -> bool {
    use crate::reflector::link::{LinkError, LinkVerifier};
    use hmac::Mac;

    let b_cfg = link_config("192.0.2.2:3480", "192.0.2.1:3480");
    let a_cfg = link_config("192.0.2.1:3480", "192.0.2.2:3480");
    let partner = a_cfg.listen;
    let mut v = LinkVerifier::new(b_cfg.clone(), LINK_NOW_MS);
    let _ = v.verify(partner, bytes, LINK_NOW_MS);

    let mut signed = Vec::with_capacity(bytes.len() + 44);
    signed.extend_from_slice(b"NSL1");
    signed.extend_from_slice(&LINK_NOW_MS.to_be_bytes());
    signed.extend_from_slice(bytes);
    let mut mac = a_cfg.mac();
    mac.update(&signed);
    signed.extend_from_slice(&mac.finalize().into_bytes());

    let mut v = LinkVerifier::new(b_cfg.clone(), LINK_NOW_MS);
    assert_eq!(
        v.verify(parse_addr("192.0.2.9:3480"), &signed, LINK_NOW_MS),
        Err(LinkError::NotPartner)
    );
    let fwd = match v.verify(partner, &signed, LINK_NOW_MS) {
        Ok(f) => f,
        Err(LinkError::Malformed) => return false,
        Err(e) => panic!("a correctly signed, fresh message refused as {e:?}"),
    };
    assert_eq!(
        v.verify(partner, &signed, LINK_NOW_MS),
        Err(LinkError::Replayed)
    );
    let mut again = vec![0u8; signed.len() + 64];
    let Some(n) = a_cfg.encode_forward(
        &mut again,
        LINK_NOW_MS,
        fwd.received_on,
        fwd.client,
        fwd.request,
    ) else {
        panic!("re-encoding an accepted message does not fit");
    };
    let mut v = LinkVerifier::new(b_cfg, LINK_NOW_MS);
    let back = match v.verify(partner, &again[..n], LINK_NOW_MS) {
        Ok(f) => f,
        Err(e) => panic!("re-encoded message refused: {e:?}"),
    };
    assert_eq!(back, fwd, "link message round trip");
    true
}

/// Runs one request through [`Reflector::answer`](crate::reflector::Reflector::answer) as a whole.
/// Byte 0 picks the deployment (one address, two IPv4 addresses, two IPv6 addresses, a
/// cooperating pair), the transport, which local address received it and the client; the rest is
/// the request. Checks RFC 5780 §9's promises: an answer goes only to the requester's IP, leaves
/// from an address this process owns, is a well-formed STUN message answering the same
/// transaction, and is at most [`MAX_AMPLIFICATION_BYTES`](crate::reflector::MAX_AMPLIFICATION_BYTES)
/// larger than the request; a forward verifies at the partner, which answers from its own IP.
pub fn exercise_reflector(bytes: &[u8]) {
    use crate::reflector::link::LinkVerifier;
    use crate::reflector::{
        Action, Reflector, ReflectorConfig, Transport, MAX_AMPLIFICATION_BYTES, MAX_RESPONSE,
    };

    let Some((&sel, request)) = bytes.split_first() else {
        return;
    };
    let v6 = sel & 3 == 2;
    let (primary, alternate) = if v6 {
        ("[2001:db8::1]:3478", Some("[2001:db8::2]:3479"))
    } else if sel & 3 == 0 {
        ("192.0.2.1:3478", None)
    } else {
        ("192.0.2.1:3478", Some("192.0.2.2:3479"))
    };
    let cooperating = sel & 3 == 3;
    let cfg = ReflectorConfig {
        primary: parse_addr(primary),
        alternate: alternate.map(parse_addr),
        partner: cooperating.then(|| link_config("192.0.2.1:3480", "192.0.2.2:3480")),
    };
    let local = cfg.local_addresses();
    let received_on = local[usize::from(sel >> 2 & 3) % local.len()];
    let transport = if sel & 0x10 != 0 {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let client = match (v6, sel & 0x20 != 0) {
        (true, _) => parse_addr("[2001:db8:1::7]:40000"),
        (false, false) => parse_addr("198.51.100.7:40000"),
        (false, true) => parse_addr("198.51.100.7:1"),
    };
    let core = Reflector::new(cfg.clone());
    let mut out = [0u8; MAX_RESPONSE];
    let (action, _kind) = core.answer(
        transport,
        client,
        received_on,
        request,
        &mut out,
        LINK_NOW_MS,
    );
    match action {
        Action::Send { from, to, len, .. } => {
            check_answer(&out[..len], request, from, to, client, &local, transport);
            assert!(
                len <= request.len() + MAX_AMPLIFICATION_BYTES,
                "{len}-byte answer to a {}-byte request",
                request.len()
            );
        }
        Action::Forward { len } => {
            assert!(cooperating, "forwarded without a partner");
            assert_eq!(transport, Transport::Udp, "forwarded a TCP request");
            let partner_cfg = ReflectorConfig {
                primary: parse_addr("192.0.2.2:3478"),
                alternate: Some(parse_addr("192.0.2.1:3479")),
                partner: Some(link_config("192.0.2.2:3480", "192.0.2.1:3480")),
            };
            let mut v =
                LinkVerifier::new(link_config("192.0.2.2:3480", "192.0.2.1:3480"), LINK_NOW_MS);
            let fwd = match v.verify(parse_addr("192.0.2.1:3480"), &out[..len], LINK_NOW_MS) {
                Ok(f) => f,
                Err(e) => panic!("the partner refuses our forward: {e:?}"),
            };
            assert_eq!((fwd.client, fwd.received_on), (client, received_on));
            let partner = Reflector::new(partner_cfg.clone());
            let mut answer = [0u8; MAX_RESPONSE];
            match partner.answer_forwarded(&fwd, &mut answer).0 {
                Action::Send { from, to, len, .. } => check_answer(
                    &answer[..len],
                    request,
                    from,
                    to,
                    client,
                    &partner_cfg.local_addresses(),
                    Transport::Udp,
                ),
                other => panic!("the partner does not answer a forward: {other:?}"),
            }
        }
        Action::Drop(_) => {}
    }
}

fn check_answer(
    answer: &[u8],
    request: &[u8],
    from: SocketAddr,
    to: SocketAddr,
    client: SocketAddr,
    local: &[SocketAddr],
    transport: crate::reflector::Transport,
) {
    assert_eq!(to.ip(), client.ip(), "answer aimed at another ip");
    if transport == crate::reflector::Transport::Tcp {
        assert_eq!(to, client, "a tcp answer must go back on its connection");
    }
    assert!(local.contains(&from), "answer from {from}, not one of ours");
    let msg = match Message::parse(answer) {
        Ok(m) => m,
        Err(e) => panic!("the answer does not parse: {e:?}"),
    };
    check_message(&msg);
    assert_eq!(
        msg.transaction_id().0[..],
        request[4..HEADER_LEN],
        "answer to another transaction"
    );
}

/// Fuzz entry point for NAT-PMP (issue 12): parses `bytes` as a request and as a response; whatever
/// parses must re-encode to bytes that parse to the same value.
pub fn natpmp_parse(bytes: &[u8]) {
    use crate::portmap::natpmp::{Request, Response};
    if let Ok(req) = Request::parse(bytes) {
        assert_eq!(Request::parse(&req.encode()), Ok(req));
    }
    if let Ok(resp) = Response::parse(bytes) {
        assert_eq!(Response::parse(&resp.encode()), Ok(resp));
    }
}

/// Fuzz entry point for PCP (issue 12): parses `bytes` as a request and as a response; whatever
/// parses must re-encode (within 1100 bytes) to bytes that parse to the same value.
pub fn pcp_parse(bytes: &[u8]) {
    use crate::portmap::pcp::{Request, Response, MAX_MESSAGE};
    if let Ok(req) = Request::parse(bytes) {
        let Ok(again) = req.encode() else {
            panic!("a parsed PCP request does not encode: {req:?}");
        };
        assert!(again.len() <= MAX_MESSAGE);
        assert_eq!(Request::parse(&again), Ok(req));
    }
    if let Ok(resp) = Response::parse(bytes) {
        let Ok(again) = resp.encode() else {
            panic!("a parsed PCP response does not encode: {resp:?}");
        };
        assert!(again.len() <= MAX_MESSAGE);
        assert_eq!(Response::parse(&again), Ok(resp));
    }
}

// ---------------------------------------------------------------------------------------------
// Punch (issue 14): the codec, message sequences into the rendezvous server, and into the
// listener and connector machines. Inputs are read as a little program so the fuzzer reaches
// deep states (a valid cookie, a live session) that random bytes never would.

/// A reader of fuzzer bytes that yields zeros once they run out.
struct Ops<'a>(&'a [u8]);

impl<'a> Ops<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// Decodes `bytes` as a punch message; what decodes re-encodes to something that decodes to the
/// same message, and the cookie helpers never panic and keep the message what it was.
pub fn punch_codec(bytes: &[u8]) {
    use crate::punch::codec::{self, PunchMessage, COOKIE_LEN, MAX_MESSAGE};
    let c = codec::cookie(bytes);
    if let Ok(m) = PunchMessage::decode(bytes) {
        let Ok(again) = m.to_vec() else {
            panic!("a decoded punch message does not encode: {m:?}");
        };
        assert!(again.len() <= MAX_MESSAGE);
        assert_eq!(PunchMessage::decode(&again).as_ref(), Ok(&m));
        let k = [0x5a; COOKIE_LEN];
        if let Some(with) = codec::with_cookie(&again, &k) {
            assert_eq!(codec::cookie(&with), Some(k));
            assert_eq!(PunchMessage::decode(&with).as_ref(), Ok(&m));
            let k2 = [0xa5; COOKIE_LEN];
            let Some(re) = codec::replace_cookie(&with, &k2) else {
                panic!("cannot replace the cookie just added");
            };
            assert_eq!(codec::cookie(&re), Some(k2));
            assert_eq!(PunchMessage::decode(&re).as_ref(), Ok(&m));
        }
        let _ = codec::challenged(bytes, &m);
    }
    if let Some(c) = c {
        let _ = codec::replace_cookie(bytes, &c);
    }
}

/// A sequence of datagrams from a few sources into the rendezvous server, with time passing
/// and TCP connections closing. Invariants: the server never answers a source that has not
/// proved it receives with more bytes than it was sent, never sends to an address no peer can
/// have, and its tables stay within their bounds.
pub fn punch_server(bytes: &[u8]) {
    use crate::punch::codec::{self, PunchMessage, COOKIE_LEN};
    use crate::punch::identity::{Identity, Purpose};
    use crate::punch::server::{RendezvousServer, ServerConfig};
    use crate::punch::table::{Endpoint, TableConfig};
    use crate::punch::{SessionId, Transport};
    use rand::SeedableRng;
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    let mut ops = Ops(bytes);
    let config = ServerConfig {
        table: TableConfig {
            max_peers: 8,
            max_sessions: 8,
            peers_per_source: 3,
            sessions_per_source: 3,
            sessions_per_peer: 4,
            ..TableConfig::default()
        },
        ..ServerConfig::default()
    };
    let mut s = RendezvousServer::new(config, rand::rngs::StdRng::seed_from_u64(1));
    let local: SocketAddr = "198.51.100.1:3490".parse().expect("addr");
    let sources: [SocketAddr; 6] = [
        "203.0.113.1:4000".parse().expect("addr"),
        "203.0.113.1:4001".parse().expect("addr"),
        "203.0.113.2:5000".parse().expect("addr"),
        "[2001:db8::1]:6000".parse().expect("addr"),
        "127.0.0.1:7000".parse().expect("addr"),
        "0.0.0.0:1".parse().expect("addr"),
    ];
    let mut now = Instant::now();
    let mut cookies: [Option<[u8; COOKIE_LEN]>; 12] = [None; 12];
    let mut proved: HashSet<Endpoint> = HashSet::new();
    let mut sessions: Vec<SessionId> = Vec::new();
    let ids = ["a", "b", "c"];
    while !ops.done() {
        let op = ops.byte();
        let si = usize::from(ops.byte()) % 12;
        let from = Endpoint {
            transport: if si >= 6 {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            local,
            remote: sources[si % 6],
        };
        let tid = {
            let mut t = [ops.byte(); 16];
            t[..4].copy_from_slice(&crate::stun::MAGIC_COOKIE.to_be_bytes());
            crate::stun::TransactionId(t)
        };
        let msg = match op % 8 {
            0 => None,
            1 => {
                // Three keys over three ids: a REGISTER may be the holder's, a hijack, or a
                // proof for another id (which must not verify).
                let id = ids[usize::from(ops.byte()) % 3];
                let key = Identity::from_seed([ops.byte() % 3; 32]);
                let proven = if ops.byte() % 4 == 0 { "other" } else { id };
                Some(PunchMessage::Register {
                    tid,
                    id: id.into(),
                    candidates: vec![sources[usize::from(ops.byte()) % 6]],
                    port_delta: None,
                    proof: key.prove(Purpose::Register, &tid, proven),
                })
            }
            2 => Some(PunchMessage::Connect {
                tid,
                target: ids[usize::from(ops.byte()) % 3].into(),
                candidates: vec![sources[usize::from(ops.byte()) % 6]],
                port_delta: None,
                punch_window_ms: Some(u32::from(ops.byte()) * 100),
            }),
            3 | 4 => {
                let session = sessions
                    .get(usize::from(ops.byte()) % sessions.len().max(1))
                    .copied()
                    .unwrap_or(SessionId(0));
                let n = usize::from(ops.byte()) * 4;
                Some(match op % 8 {
                    3 => PunchMessage::Data {
                        tid,
                        session,
                        seq: Some(0),
                        ack: 0,
                        payload: vec![0; n.min(crate::punch::MAX_PAYLOAD)],
                    },
                    _ => PunchMessage::Refresh { tid, session },
                })
            }
            5 => {
                now += Duration::from_millis(u64::from(ops.byte()) * 250);
                s.handle_timeout(now);
                None
            }
            6 => {
                s.connection_closed(from);
                None
            }
            _ => Some(PunchMessage::Close {
                tid,
                session: sessions.first().copied().unwrap_or(SessionId(0)),
            }),
        };
        let input = match (op % 8, msg) {
            (0, _) => {
                let n = usize::from(ops.byte());
                ops.bytes(n).to_vec()
            }
            (_, Some(m)) => {
                let Ok(b) = m.to_vec() else { continue };
                let k = cookies[si].unwrap_or([0; COOKIE_LEN]);
                codec::with_cookie(&b, &k).unwrap_or(b)
            }
            (_, None) => Vec::new(),
        };
        if !input.is_empty() {
            s.handle(now, from, &input);
        }
        let mut answered = 0usize;
        while let Some(t) = s.poll_transmit() {
            assert!(
                RendezvousServer::admissible(t.source.local, t.destination),
                "sent to {}",
                t.destination
            );
            let to = Endpoint {
                transport: t.source.transport,
                local: t.source.local,
                remote: t.destination,
            };
            if to == from {
                answered += t.payload.len();
            } else {
                assert!(
                    proved.contains(&to),
                    "sent to {to:?}, which never proved it receives"
                );
            }
            if let Some(c) = codec::cookie(&t.payload) {
                if to == from {
                    cookies[si] = Some(c);
                }
            }
            if let Ok(m) = PunchMessage::decode(&t.payload) {
                if let PunchMessage::ConnectOk { session, .. } = m {
                    if sessions.len() < 16 {
                        sessions.push(session);
                    }
                }
                if matches!(
                    m,
                    PunchMessage::RegisterOk { .. } | PunchMessage::ConnectOk { .. }
                ) {
                    proved.insert(to);
                }
            }
        }
        if from.transport == Transport::Tcp {
            proved.insert(from);
        }
        if !proved.contains(&from) {
            assert!(
                answered <= input.len(),
                "{answered} bytes answered to {input_len} from an unproved source",
                input_len = input.len()
            );
        }
        assert!(s.table().peer_count() <= 8);
        assert!(s.table().session_count() <= 8);
    }
}

/// Datagrams into a listener and a connector from their server and from strangers; answers
/// from "the server" echo the transaction id of the machine's latest request, so sessions start.
/// Invariants: no panic, every transmit goes to an address a peer can have, and the queues and
/// tables stay bounded however long the input.
pub fn punch_peers(bytes: &[u8]) {
    use crate::punch::codec::{PeerInfo, PunchMessage};
    use crate::punch::connector::{ConnectOptions, Connector};
    use crate::punch::identity::Identity;
    use crate::punch::listener::{ListenOptions, Listener};
    use crate::punch::peer::PeerMachine;
    use crate::punch::{SessionId, Transport};
    use rand::SeedableRng;
    use std::time::{Duration, Instant};

    let server: SocketAddr = "198.51.100.1:3490".parse().expect("addr");
    let me: SocketAddr = "203.0.113.1:4000".parse().expect("addr");
    let addrs: [SocketAddr; 6] = [
        "203.0.113.2:5000".parse().expect("addr"),
        "10.0.0.2:5000".parse().expect("addr"),
        "127.0.0.1:5000".parse().expect("addr"),
        "224.0.0.1:5000".parse().expect("addr"),
        "0.0.0.0:5000".parse().expect("addr"),
        "203.0.113.3:0".parse().expect("addr"),
    ];
    let mut ops = Ops(bytes);
    let mut now = Instant::now();
    let listener = ListenOptions {
        id: "bob".into(),
        server,
        transport: Transport::Udp,
        count: None,
        timeout: None,
        punch_window: Duration::from_millis(1500),
        predict: false,
        identity: Identity::from_seed([2; 32]),
    };
    let listener_key = listener.identity.public();
    let connector = ConnectOptions {
        id: "bob".into(),
        server,
        messages: 5,
        timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    };
    let mut l = Listener::new(now, listener, rand::rngs::StdRng::seed_from_u64(2));
    let mut c = Connector::new(now, connector, rand::rngs::StdRng::seed_from_u64(3));
    l.start(now, me, None);
    c.start(now, me, None);
    let mut last_tid = [crate::stun::TransactionId([0; 16]); 2];
    let mut sent = 0u64;
    while !ops.done() {
        let which = ops.byte();
        let op = ops.byte();
        let tid = last_tid[usize::from(which & 1)];
        let session = SessionId(u64::from(ops.byte() % 4));
        let peer = PeerInfo {
            reflexive: addrs[usize::from(ops.byte()) % 6],
            candidates: (0..ops.byte() % 9)
                .map(|i| addrs[usize::from(i) % 6])
                .collect(),
            port_delta: Some(i32::from(ops.byte() as i8)),
            punch_window_ms: Some(u32::from(ops.byte()) * 1000),
            // The listener's real key, another key, or none (a server that names no key).
            key: match ops.byte() % 3 {
                0 => Some(listener_key),
                1 => Some(Identity::from_seed([9; 32]).public()),
                _ => None,
            },
        };
        let (from, m) = match op % 8 {
            0 => (
                server,
                Some(PunchMessage::RegisterOk {
                    tid,
                    mapped: peer.reflexive,
                }),
            ),
            1 => (
                server,
                Some(PunchMessage::ConnectOk {
                    tid,
                    session,
                    mapped: me,
                    peer,
                    start_in_ms: u32::from(ops.byte()),
                }),
            ),
            2 => (
                server,
                Some(PunchMessage::Introduce {
                    tid,
                    session,
                    peer,
                    start_in_ms: u32::from(ops.byte()),
                }),
            ),
            // A datagram's source is a real address (the kernel delivers nothing from port 0,
            // multicast or unspecified); the bad ones only come as candidates.
            3 => (
                addrs[usize::from(ops.byte()) % 3],
                Some(PunchMessage::Data {
                    tid,
                    session,
                    seq: Some(u64::from(ops.byte())),
                    ack: u64::from(ops.byte()),
                    payload: vec![1; usize::from(ops.byte())],
                }),
            ),
            4 => (
                addrs[usize::from(ops.byte()) % 3],
                Some(PunchMessage::Probe { tid, session }),
            ),
            5 => {
                now += Duration::from_millis(u64::from(ops.byte()) * 20);
                (server, None)
            }
            6 => {
                let n = usize::from(ops.byte());
                let raw = ops.bytes(n).to_vec();
                l.handle_datagram(now, server, &raw);
                c.handle_datagram(now, server, &raw);
                (server, None)
            }
            _ => (
                if which & 2 == 0 { server } else { addrs[0] },
                Some(PunchMessage::Error {
                    tid,
                    method: crate::punch::codec::method::REFRESH,
                    code: 400 + u16::from(ops.byte()),
                    reason: String::new(),
                }),
            ),
        };
        if let Some(m) = m {
            if let Ok(b) = m.to_vec() {
                if which & 1 == 0 {
                    l.handle_datagram(now, from, &b);
                } else {
                    c.handle_datagram(now, from, &b);
                }
            }
        }
        l.handle_timeout(now);
        c.handle_timeout(now);
        for (i, t) in std::iter::from_fn(|| l.poll_transmit())
            .map(|t| (0, t))
            .chain(std::iter::from_fn(|| c.poll_transmit()).map(|t| (1, t)))
        {
            sent += 1;
            let ip = t.destination.ip();
            assert!(
                !ip.is_unspecified() && !ip.is_multicast() && t.destination.port() != 0,
                "sent to {}",
                t.destination
            );
            if t.destination == server {
                if let Ok(m) = PunchMessage::decode(&t.payload) {
                    last_tid[i] = m.tid();
                }
            }
        }
        while l.poll_stream().is_some() || c.poll_stream().is_some() {}
        while l.poll_event().is_some() {}
    }
    // Bounded work: far fewer packets than a flood (a sanity bound per input byte).
    assert!(sent <= 1_000 + 200 * bytes.len() as u64, "{sent} packets");
}

/// Fuzz entry point for the UPnP IGD's SSDP side (issue 12): any datagram; an answer, when there
/// is one, is a 200 with the description's location, and nothing panics.
pub fn igd_ssdp(bytes: &[u8]) {
    use crate::portmap::igd_server::Igd;
    use std::net::Ipv4Addr;
    let igd = Igd::new(Ipv4Addr::new(10, 1, 0, 1), 1, std::time::Instant::now());
    if let Some(answer) = igd.ssdp(bytes) {
        assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(answer.windows(9).any(|w| w == b"LOCATION:"));
    }
}

/// Fuzz entry point for the UPnP IGD's HTTP and SOAP side (issue 12): `bytes` as a SOAP body on
/// its own, and as a whole HTTP request (also prefixed with a valid control head, so the SOAP
/// parser is reached) against a NAT table. Every answer is a complete HTTP response; nothing panics.
pub fn igd_http(bytes: &[u8]) {
    use crate::nat::table::NatTable;
    use crate::nat::{FilteringBehavior, MappingBehavior, NatBehavior};
    use crate::portmap::igd_server::{parse_soap, Http, Igd};
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let _ = parse_soap(bytes);
    let now = std::time::Instant::now();
    let mut igd = Igd::new(Ipv4Addr::new(10, 1, 0, 1), 1, now);
    let behavior = NatBehavior::new(
        MappingBehavior::EndpointIndependent,
        FilteringBehavior::AddressAndPortDependent,
    );
    let mut table = NatTable::new(behavior, vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))], 1);
    let client = SocketAddr::from(([10, 1, 0, 2], 40000));
    let action = [
        "AddPortMapping",
        "DeletePortMapping",
        "GetSpecificPortMappingEntry",
    ][usize::from(bytes.first().copied().unwrap_or(0)) % 3];
    let mut framed = format!(
        "POST /ctl/IPConn HTTP/1.1\r\nContent-Length: {}\r\nSOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:2#{action}\"\r\n\r\n",
        bytes.len()
    )
    .into_bytes();
    framed.extend_from_slice(bytes);
    for request in [bytes, &framed[..]] {
        if let Http::Respond(answer) = igd.http(now, &mut table, client, request) {
            assert!(answer.starts_with(b"HTTP/1.1 "));
            assert!(answer.windows(4).any(|w| w == b"\r\n\r\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{build_request, RequestOptions};
    use crate::stun::TransactionId;

    #[test]
    fn the_reflector_and_link_entry_points_accept_real_traffic() {
        let tid = TransactionId::random();
        let mut req = [0u8; 256];
        let opts = RequestOptions {
            change: ChangeRequest::IP,
            fingerprint: true,
            ..Default::default()
        };
        let n = build_request(&mut req, &tid, &opts).unwrap();
        for sel in 0..=255u8 {
            let mut input = vec![sel];
            input.extend_from_slice(&req[..n]);
            exercise_reflector(&input);
            exercise_reflector(&input[..input.len() / 2]);
        }
        // A well-formed link body: two addresses and a request.
        let mut body = vec![8, 0, 1];
        body.extend_from_slice(&3478u16.to_be_bytes());
        body.extend_from_slice(&[192, 0, 2, 1, 8, 0, 1]);
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&[198, 51, 100, 7]);
        body.extend_from_slice(&req[..n]);
        assert!(exercise_link(&body));
        for cut in 0..body.len() {
            assert_eq!(exercise_link(&body[..cut]), cut >= 18, "{cut}");
        }
    }

    #[test]
    fn punch_entry_points_run_on_simple_programs() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let input: Vec<u8> = (0..256)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            punch_codec(&input);
            punch_server(&input);
            punch_peers(&input);
        }
    }
}
