//! The punch protocol's messages, written and read with the STUN codec ([`crate::stun`]).
//!
//! Every message is an RFC 8489 message with the magic cookie. Methods are ours (0x0C1-0x0C8,
//! far from Binding 0x001 and TURN's 0x003-0x00C); every attribute of ours sits in the
//! comprehension-optional range 0xC001-0xC00A (RFC 8489 §14), so a STUN server that receives one
//! by mistake ignores the attributes instead of answering 420. Decoding is strict: unknown
//! methods, missing or malformed attributes, ids outside [`valid_id`], more than
//! [`MAX_CANDIDATES`] candidates or payloads over [`MAX_PAYLOAD`] are errors, never panics.

use std::net::SocketAddr;

use crate::stun::attr::{decode_address, decode_xor_address, ErrorCode};
use crate::stun::{
    attr_type, Class, EncodeError, Message, MessageType, MessageWriter, ParseError, TransactionId,
};

use super::identity::{KeyProof, PeerKey, MAX_HANDSHAKE};
use super::{valid_id, SessionId, MAX_CANDIDATES, MAX_ID_LEN, MAX_PAYLOAD};

/// Method numbers (12 bits).
pub mod method {
    /// Register (or refresh) an id: request / success / error.
    pub const REGISTER: u16 = 0x0C1;
    /// Leave: indication, no answer.
    pub const UNREGISTER: u16 = 0x0C2;
    /// Ask to be introduced to a registered peer: request / success / error.
    pub const CONNECT: u16 = 0x0C3;
    /// Server to listener: a connector wants you: request / success.
    pub const INTRODUCE: u16 = 0x0C4;
    /// Peer to peer connectivity check: request / success.
    pub const PROBE: u16 = 0x0C5;
    /// Application data and acks, direct or through the relay: indication.
    pub const DATA: u16 = 0x0C6;
    /// Connector keeps its session alive at the server: request / success / error.
    pub const REFRESH: u16 = 0x0C7;
    /// End of a session: indication.
    pub const CLOSE: u16 = 0x0C8;
    /// Peer identity (issue 14): a sealed peer-to-peer message, or a Noise handshake message,
    /// direct or through the relay: indication.
    pub const SEALED: u16 = 0x0C9;
}

/// Attribute types (all comprehension-optional).
pub mod attr {
    /// Peer id, UTF-8 `[A-Za-z0-9._-]`, 1..=64 bytes.
    pub const PEER_ID: u16 = 0xC001;
    /// A local (host) candidate, plain address layout; repeated, at most 8.
    pub const CANDIDATE: u16 = 0xC002;
    /// Session id, 8 bytes.
    pub const SESSION: u16 = 0xC003;
    /// Milliseconds until both sides start punching, u32.
    pub const START_IN: u16 = 0xC004;
    /// Sequence number of the payload, u64.
    pub const SEQ: u16 = 0xC005;
    /// Cumulative ack: next sequence number expected, u64.
    pub const ACK: u16 = 0xC006;
    /// Application payload, at most 1200 bytes.
    pub const PAYLOAD: u16 = 0xC007;
    /// The other peer's server-reflexive address (as the server saw it), plain layout.
    pub const PEER_REFLEXIVE: u16 = 0xC008;
    /// The allocation delta the peer measured (port prediction), i32.
    pub const PORT_DELTA: u16 = 0xC009;
    /// The connector's punch window in milliseconds, u32, so both sides punch equally long.
    pub const PUNCH_WINDOW: u16 = 0xC00A;
    // Peer identity (issue 14), one block: see `punch::identity`.
    /// A Noise handshake message (IK msg1 or msg2), at most 128 bytes.
    pub const HANDSHAKE: u16 = 0xC00B;
    /// A sealed message: 8-byte nonce, then the Noise transport ciphertext of a whole message.
    pub const SEALED_BOX: u16 = 0xC00C;
    /// An Ed25519 public key, 32 bytes (REGISTER, UNREGISTER, and the listener's in CONNECT's
    /// answer).
    pub const PEER_KEY: u16 = 0xC00D;
    /// The Ed25519 signature proving PEER-KEY, 64 bytes.
    pub const SIGNATURE: u16 = 0xC00E;
}

/// Why bytes are not a punch message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Stun(#[from] ParseError),
    #[error("not an rfc 8489 message (no magic cookie)")]
    NoCookie,
    #[error("unknown method {0:#05x} or class")]
    UnknownMethod(u16),
    #[error("missing attribute {0:#06x}")]
    Missing(u16),
    #[error("attribute {0:#06x} is malformed")]
    Malformed(u16),
    #[error(
        "peer id is empty, longer than {MAX_ID_LEN} bytes or has characters outside [A-Za-z0-9._-]"
    )]
    BadId,
    #[error("more than {MAX_CANDIDATES} candidates")]
    TooManyCandidates,
    #[error("payload longer than {MAX_PAYLOAD} bytes")]
    PayloadTooLong,
}

/// What the server tells each side about the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The address the server saw the peer's messages come from.
    pub reflexive: SocketAddr,
    /// The peer's own local addresses.
    pub candidates: Vec<SocketAddr>,
    /// Port allocation delta the peer measured, if it did (port prediction).
    pub port_delta: Option<i32>,
    /// How long the connector punches (told to the listener so both use the same window).
    pub punch_window_ms: Option<u32>,
    /// The listener's registered key (CONNECT's answer only): the key the connector's Noise
    /// handshake expects unless `--peer-key` names one.
    pub key: Option<PeerKey>,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PunchMessage {
    Register {
        tid: TransactionId,
        id: String,
        candidates: Vec<SocketAddr>,
        port_delta: Option<i32>,
        proof: KeyProof,
    },
    RegisterOk {
        tid: TransactionId,
        mapped: SocketAddr,
    },
    Unregister {
        tid: TransactionId,
        id: String,
        proof: KeyProof,
    },
    Connect {
        tid: TransactionId,
        target: String,
        candidates: Vec<SocketAddr>,
        port_delta: Option<i32>,
        punch_window_ms: Option<u32>,
    },
    ConnectOk {
        tid: TransactionId,
        session: SessionId,
        mapped: SocketAddr,
        peer: PeerInfo,
        start_in_ms: u32,
    },
    Introduce {
        tid: TransactionId,
        session: SessionId,
        peer: PeerInfo,
        start_in_ms: u32,
    },
    IntroduceOk {
        tid: TransactionId,
        session: SessionId,
    },
    Probe {
        tid: TransactionId,
        session: SessionId,
    },
    ProbeOk {
        tid: TransactionId,
        session: SessionId,
        mapped: SocketAddr,
    },
    Data {
        tid: TransactionId,
        session: SessionId,
        /// `None` for an ack-only message.
        seq: Option<u64>,
        ack: u64,
        payload: Vec<u8>,
    },
    Refresh {
        tid: TransactionId,
        session: SessionId,
    },
    RefreshOk {
        tid: TransactionId,
    },
    Close {
        tid: TransactionId,
        session: SessionId,
    },
    /// A Noise handshake message and/or a sealed peer-to-peer message (issue 14).
    Sealed {
        tid: TransactionId,
        session: SessionId,
        handshake: Option<Vec<u8>>,
        sealed: Option<Vec<u8>>,
    },
    /// An error response to `method` (400 bad request, 404 unknown peer, 437 unknown session).
    Error {
        tid: TransactionId,
        method: u16,
        code: u16,
        reason: String,
    },
}

/// Error codes the server uses (RFC 8489 §14.8 classes).
pub mod code {
    pub const BAD_REQUEST: u16 = 400;
    pub const UNKNOWN_PEER: u16 = 404;
    /// REGISTER of an id another key holds, or a key proof that does not verify (issue 14).
    pub const FORBIDDEN: u16 = 403;
    pub const UNKNOWN_SESSION: u16 = 437;
}

/// Largest encoded message: a DATA with a full payload plus headers fits well under this.
pub const MAX_MESSAGE: usize = 1400;

impl PunchMessage {
    pub fn tid(&self) -> TransactionId {
        match self {
            PunchMessage::Register { tid, .. }
            | PunchMessage::RegisterOk { tid, .. }
            | PunchMessage::Unregister { tid, .. }
            | PunchMessage::Connect { tid, .. }
            | PunchMessage::ConnectOk { tid, .. }
            | PunchMessage::Introduce { tid, .. }
            | PunchMessage::IntroduceOk { tid, .. }
            | PunchMessage::Probe { tid, .. }
            | PunchMessage::ProbeOk { tid, .. }
            | PunchMessage::Data { tid, .. }
            | PunchMessage::Refresh { tid, .. }
            | PunchMessage::RefreshOk { tid }
            | PunchMessage::Close { tid, .. }
            | PunchMessage::Sealed { tid, .. }
            | PunchMessage::Error { tid, .. } => *tid,
        }
    }

    /// The session a message belongs to, when it carries one.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            PunchMessage::ConnectOk { session, .. }
            | PunchMessage::Introduce { session, .. }
            | PunchMessage::IntroduceOk { session, .. }
            | PunchMessage::Probe { session, .. }
            | PunchMessage::ProbeOk { session, .. }
            | PunchMessage::Data { session, .. }
            | PunchMessage::Refresh { session, .. }
            | PunchMessage::Close { session, .. }
            | PunchMessage::Sealed { session, .. } => Some(*session),
            _ => None,
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, EncodeError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = self.encode(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Encodes into `buf`; returns the length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        use PunchMessage as M;
        let (class, m) = match self {
            M::Register { .. } => (Class::Request, method::REGISTER),
            M::RegisterOk { .. } => (Class::SuccessResponse, method::REGISTER),
            M::Unregister { .. } => (Class::Indication, method::UNREGISTER),
            M::Connect { .. } => (Class::Request, method::CONNECT),
            M::ConnectOk { .. } => (Class::SuccessResponse, method::CONNECT),
            M::Introduce { .. } => (Class::Request, method::INTRODUCE),
            M::IntroduceOk { .. } => (Class::SuccessResponse, method::INTRODUCE),
            M::Probe { .. } => (Class::Request, method::PROBE),
            M::ProbeOk { .. } => (Class::SuccessResponse, method::PROBE),
            M::Data { .. } => (Class::Indication, method::DATA),
            M::Refresh { .. } => (Class::Request, method::REFRESH),
            M::RefreshOk { .. } => (Class::SuccessResponse, method::REFRESH),
            M::Close { .. } => (Class::Indication, method::CLOSE),
            M::Sealed { .. } => (Class::Indication, method::SEALED),
            M::Error { method, .. } => (Class::ErrorResponse, *method),
        };
        let tid = self.tid();
        let mut w = MessageWriter::new(buf, MessageType::new(class, m), &tid)?;
        match self {
            M::Register {
                id,
                candidates,
                port_delta,
                proof,
                ..
            } => {
                w.add_raw(attr::PEER_ID, id.as_bytes())?;
                add_candidates(&mut w, candidates)?;
                if let Some(d) = port_delta {
                    w.add_raw(attr::PORT_DELTA, &d.to_be_bytes())?;
                }
                add_proof(&mut w, proof)?;
            }
            M::RegisterOk { mapped, .. } => {
                w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, *mapped)?;
            }
            M::Unregister { id, proof, .. } => {
                w.add_raw(attr::PEER_ID, id.as_bytes())?;
                add_proof(&mut w, proof)?;
            }
            M::Connect {
                target,
                candidates,
                port_delta,
                punch_window_ms,
                ..
            } => {
                w.add_raw(attr::PEER_ID, target.as_bytes())?;
                add_candidates(&mut w, candidates)?;
                if let Some(d) = port_delta {
                    w.add_raw(attr::PORT_DELTA, &d.to_be_bytes())?;
                }
                if let Some(ms) = punch_window_ms {
                    w.add_raw(attr::PUNCH_WINDOW, &ms.to_be_bytes())?;
                }
            }
            M::ConnectOk {
                session,
                mapped,
                peer,
                start_in_ms,
                ..
            } => {
                w.add_raw(attr::SESSION, &session.0.to_be_bytes())?;
                w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, *mapped)?;
                add_peer(&mut w, peer)?;
                w.add_raw(attr::START_IN, &start_in_ms.to_be_bytes())?;
            }
            M::Introduce {
                session,
                peer,
                start_in_ms,
                ..
            } => {
                w.add_raw(attr::SESSION, &session.0.to_be_bytes())?;
                add_peer(&mut w, peer)?;
                w.add_raw(attr::START_IN, &start_in_ms.to_be_bytes())?;
            }
            M::IntroduceOk { session, .. }
            | M::Probe { session, .. }
            | M::Refresh { session, .. }
            | M::Close { session, .. } => {
                w.add_raw(attr::SESSION, &session.0.to_be_bytes())?;
            }
            M::ProbeOk {
                session, mapped, ..
            } => {
                w.add_raw(attr::SESSION, &session.0.to_be_bytes())?;
                w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, *mapped)?;
            }
            M::Data {
                session,
                seq,
                ack,
                payload,
                ..
            } => {
                w.add_raw(attr::SESSION, &session.0.to_be_bytes())?;
                if let Some(s) = seq {
                    w.add_raw(attr::SEQ, &s.to_be_bytes())?;
                }
                w.add_raw(attr::ACK, &ack.to_be_bytes())?;
                if seq.is_some() {
                    w.add_raw(attr::PAYLOAD, payload)?;
                }
            }
            M::RefreshOk { .. } => {}
            M::Sealed {
                session,
                handshake,
                sealed,
                ..
            } => {
                w.add_raw(attr::SESSION, &session.0.to_be_bytes())?;
                if let Some(h) = handshake {
                    w.add_raw(attr::HANDSHAKE, h)?;
                }
                if let Some(b) = sealed {
                    w.add_raw(attr::SEALED_BOX, b)?;
                }
            }
            M::Error { code, reason, .. } => w.add_error_code(*code, reason)?,
        }
        Ok(w.finish())
    }

    /// Decodes one message (a datagram, or a frame cut from a stream by
    /// [`crate::stun::framing`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let msg = Message::parse(bytes)?;
        if !msg.is_rfc8489() {
            return Err(DecodeError::NoCookie);
        }
        let tid = msg.transaction_id();
        let typ = msg.message_type();
        use PunchMessage as M;
        let out = match (typ.class, typ.method) {
            (Class::Request, method::REGISTER) => M::Register {
                tid,
                id: id(&msg)?,
                candidates: candidates(&msg)?,
                port_delta: port_delta(&msg)?,
                proof: proof(&msg)?,
            },
            (Class::SuccessResponse, method::REGISTER) => M::RegisterOk {
                tid,
                mapped: xor_mapped(&msg)?,
            },
            (Class::Indication, method::UNREGISTER) => M::Unregister {
                tid,
                id: id(&msg)?,
                proof: proof(&msg)?,
            },
            (Class::Request, method::CONNECT) => M::Connect {
                tid,
                target: id(&msg)?,
                candidates: candidates(&msg)?,
                port_delta: port_delta(&msg)?,
                punch_window_ms: punch_window(&msg)?,
            },
            (Class::SuccessResponse, method::CONNECT) => M::ConnectOk {
                tid,
                session: session(&msg)?,
                mapped: xor_mapped(&msg)?,
                peer: peer(&msg)?,
                start_in_ms: u32_attr(&msg, attr::START_IN)?,
            },
            (Class::Request, method::INTRODUCE) => M::Introduce {
                tid,
                session: session(&msg)?,
                peer: peer(&msg)?,
                start_in_ms: u32_attr(&msg, attr::START_IN)?,
            },
            (Class::SuccessResponse, method::INTRODUCE) => M::IntroduceOk {
                tid,
                session: session(&msg)?,
            },
            (Class::Request, method::PROBE) => M::Probe {
                tid,
                session: session(&msg)?,
            },
            (Class::SuccessResponse, method::PROBE) => M::ProbeOk {
                tid,
                session: session(&msg)?,
                mapped: xor_mapped(&msg)?,
            },
            (Class::Indication, method::DATA) => {
                let seq = match msg.attribute(attr::SEQ) {
                    Some(a) => Some(u64_value(a.value).ok_or(DecodeError::Malformed(attr::SEQ))?),
                    None => None,
                };
                let payload = match (seq, msg.attribute(attr::PAYLOAD)) {
                    (Some(_), Some(p)) if p.value.len() > MAX_PAYLOAD => {
                        return Err(DecodeError::PayloadTooLong)
                    }
                    (Some(_), Some(p)) => p.value.to_vec(),
                    (Some(_), None) => return Err(DecodeError::Missing(attr::PAYLOAD)),
                    (None, _) => Vec::new(),
                };
                M::Data {
                    tid,
                    session: session(&msg)?,
                    seq,
                    ack: u64_attr(&msg, attr::ACK)?,
                    payload,
                }
            }
            (Class::Request, method::REFRESH) => M::Refresh {
                tid,
                session: session(&msg)?,
            },
            (Class::SuccessResponse, method::REFRESH) => M::RefreshOk { tid },
            (Class::Indication, method::CLOSE) => M::Close {
                tid,
                session: session(&msg)?,
            },
            (Class::Indication, method::SEALED) => {
                let handshake = msg.attribute(attr::HANDSHAKE).map(|a| a.value.to_vec());
                if handshake.as_ref().is_some_and(|h| h.len() > MAX_HANDSHAKE) {
                    return Err(DecodeError::Malformed(attr::HANDSHAKE));
                }
                let sealed = msg.attribute(attr::SEALED_BOX).map(|a| a.value.to_vec());
                if handshake.is_none() && sealed.is_none() {
                    return Err(DecodeError::Missing(attr::SEALED_BOX));
                }
                M::Sealed {
                    tid,
                    session: session(&msg)?,
                    handshake,
                    sealed,
                }
            }
            (
                Class::ErrorResponse,
                m @ (method::REGISTER | method::CONNECT | method::REFRESH | method::INTRODUCE),
            ) => {
                let a = msg
                    .attribute(attr_type::ERROR_CODE)
                    .ok_or(DecodeError::Missing(attr_type::ERROR_CODE))?;
                let e = ErrorCode::decode(a.value)
                    .map_err(|_| DecodeError::Malformed(attr_type::ERROR_CODE))?;
                M::Error {
                    tid,
                    method: m,
                    code: e.code,
                    reason: String::from_utf8_lossy(e.reason)
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(128)
                        .collect(),
                }
            }
            (_, m) => return Err(DecodeError::UnknownMethod(m)),
        };
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Return routability and refusals (issue 14, the server's part). A block of its own so it merges
// beside other changes to the messages: the cookie travels as one extra attribute that the
// decoder above never looks at, so no message variant changes.

/// The server's stateless cookie (see `punch::cookie`), echoed by REGISTER and CONNECT.
/// Comprehension-optional like every attribute of ours.
pub const COOKIE_ATTR: u16 = 0xC0F1;
/// Bytes in a cookie: a 4-byte time slot and a 12-byte truncated HMAC-SHA256.
pub const COOKIE_LEN: usize = 16;

/// The refusal codes of the server (RFC 8489 §14.8 classes, TURN's numbers where one fits).
pub mod refusal {
    /// No valid cookie: the error carries one ([`super::COOKIE_ATTR`]); resend with it.
    pub const COOKIE: u16 = 401;
    /// The address may not be used (loopback, multicast, unspecified, outside the session).
    pub const FORBIDDEN: u16 = 403;
    /// This source's quota (registrations, sessions, rate) is used up (TURN's 486).
    pub const QUOTA: u16 = 486;
    /// A relay circuit ran out of bytes, time or rate (the peers report it).
    pub const CIRCUIT: u16 = 487;
    /// The server as a whole is full (TURN's 508).
    pub const CAPACITY: u16 = 508;
}

/// The cookie in `bytes`, if it carries one of the right length.
pub fn cookie(bytes: &[u8]) -> Option<[u8; COOKIE_LEN]> {
    let m = Message::parse(bytes).ok()?;
    m.attribute(COOKIE_ATTR)?.value.try_into().ok()
}

/// `bytes` (one encoded message without a cookie) with `cookie` appended as the last attribute.
/// The punch messages carry no MESSAGE-INTEGRITY or FINGERPRINT, so appending only means fixing
/// the header's length. `None` if `bytes` is not a message or already holds a cookie.
pub fn with_cookie(bytes: &[u8], cookie: &[u8; COOKIE_LEN]) -> Option<Vec<u8>> {
    let m = Message::parse(bytes).ok()?;
    if m.attribute(COOKIE_ATTR).is_some() || bytes.len() < 20 {
        return None;
    }
    let mut out = bytes.to_vec();
    out.extend_from_slice(&COOKIE_ATTR.to_be_bytes());
    out.extend_from_slice(&(COOKIE_LEN as u16).to_be_bytes());
    out.extend_from_slice(cookie);
    let len = u16::try_from(out.len() - 20).ok()?;
    out[2..4].copy_from_slice(&len.to_be_bytes());
    Some(out)
}

/// `bytes` with its cookie replaced by `cookie` (or one appended).
pub fn replace_cookie(bytes: &[u8], cookie: &[u8; COOKIE_LEN]) -> Option<Vec<u8>> {
    let m = Message::parse(bytes).ok()?;
    match m.attribute(COOKIE_ATTR) {
        None => with_cookie(bytes, cookie),
        Some(_) => {
            // The cookie attribute is the last one (`with_cookie` puts it there).
            let at = bytes.len().checked_sub(COOKIE_LEN)?;
            let mut out = bytes.to_vec();
            out[at..].copy_from_slice(cookie);
            (self::cookie(&out) == Some(*cookie)).then_some(out)
        }
    }
}

/// The server's challenge to a REGISTER/CONNECT without a valid cookie: an error response
/// (`refusal::COOKIE`, no reason text) carrying the cookie to echo; 48 bytes, never more than
/// a request that carries a cookie attribute (a peer's first request carries a zero one).
pub fn challenge(tid: TransactionId, m: u16, cookie: &[u8; COOKIE_LEN]) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    let mut w =
        MessageWriter::new(&mut buf, MessageType::new(Class::ErrorResponse, m), &tid).ok()?;
    w.add_error_code(refusal::COOKIE, "").ok()?;
    w.add_raw(COOKIE_ATTR, cookie).ok()?;
    let n = w.finish();
    Some(buf[..n].to_vec())
}

/// The cookie of a server's challenge: `Some` when `bytes` is a `refusal::COOKIE` error.
pub fn challenged(bytes: &[u8], m: &PunchMessage) -> Option<[u8; COOKIE_LEN]> {
    match m {
        PunchMessage::Error { code, .. } if *code == refusal::COOKIE => cookie(bytes),
        _ => None,
    }
}

fn add_candidates(w: &mut MessageWriter<'_>, c: &[SocketAddr]) -> Result<(), EncodeError> {
    for a in c.iter().take(MAX_CANDIDATES) {
        w.add_address(attr::CANDIDATE, *a)?;
    }
    Ok(())
}

fn add_peer(w: &mut MessageWriter<'_>, p: &PeerInfo) -> Result<(), EncodeError> {
    w.add_address(attr::PEER_REFLEXIVE, p.reflexive)?;
    add_candidates(w, &p.candidates)?;
    if let Some(d) = p.port_delta {
        w.add_raw(attr::PORT_DELTA, &d.to_be_bytes())?;
    }
    if let Some(ms) = p.punch_window_ms {
        w.add_raw(attr::PUNCH_WINDOW, &ms.to_be_bytes())?;
    }
    if let Some(k) = p.key {
        w.add_raw(attr::PEER_KEY, &k.0)?;
    }
    Ok(())
}

fn add_proof(w: &mut MessageWriter<'_>, p: &KeyProof) -> Result<(), EncodeError> {
    w.add_raw(attr::PEER_KEY, &p.key.0)?;
    w.add_raw(attr::SIGNATURE, &p.signature)
}

fn key(m: &Message<'_>) -> Result<Option<PeerKey>, DecodeError> {
    match m.attribute(attr::PEER_KEY) {
        None => Ok(None),
        Some(a) => a
            .value
            .try_into()
            .map(|k| Some(PeerKey(k)))
            .map_err(|_| DecodeError::Malformed(attr::PEER_KEY)),
    }
}

fn proof(m: &Message<'_>) -> Result<KeyProof, DecodeError> {
    let key = key(m)?.ok_or(DecodeError::Missing(attr::PEER_KEY))?;
    let a = m
        .attribute(attr::SIGNATURE)
        .ok_or(DecodeError::Missing(attr::SIGNATURE))?;
    let signature = a
        .value
        .try_into()
        .map_err(|_| DecodeError::Malformed(attr::SIGNATURE))?;
    Ok(KeyProof { key, signature })
}

fn id(m: &Message<'_>) -> Result<String, DecodeError> {
    let a = m
        .attribute(attr::PEER_ID)
        .ok_or(DecodeError::Missing(attr::PEER_ID))?;
    let s = std::str::from_utf8(a.value).map_err(|_| DecodeError::BadId)?;
    if !valid_id(s) {
        return Err(DecodeError::BadId);
    }
    Ok(s.to_string())
}

fn candidates(m: &Message<'_>) -> Result<Vec<SocketAddr>, DecodeError> {
    let mut out = Vec::new();
    for a in m.attributes().filter(|a| a.typ == attr::CANDIDATE) {
        if out.len() == MAX_CANDIDATES {
            return Err(DecodeError::TooManyCandidates);
        }
        out.push(decode_address(a.value).map_err(|_| DecodeError::Malformed(attr::CANDIDATE))?);
    }
    Ok(out)
}

fn peer(m: &Message<'_>) -> Result<PeerInfo, DecodeError> {
    let a = m
        .attribute(attr::PEER_REFLEXIVE)
        .ok_or(DecodeError::Missing(attr::PEER_REFLEXIVE))?;
    Ok(PeerInfo {
        reflexive: decode_address(a.value)
            .map_err(|_| DecodeError::Malformed(attr::PEER_REFLEXIVE))?,
        candidates: candidates(m)?,
        port_delta: port_delta(m)?,
        punch_window_ms: punch_window(m)?,
        key: key(m)?,
    })
}

fn punch_window(m: &Message<'_>) -> Result<Option<u32>, DecodeError> {
    match m.attribute(attr::PUNCH_WINDOW) {
        None => Ok(None),
        Some(_) => u32_attr(m, attr::PUNCH_WINDOW).map(Some),
    }
}

fn port_delta(m: &Message<'_>) -> Result<Option<i32>, DecodeError> {
    match m.attribute(attr::PORT_DELTA) {
        None => Ok(None),
        Some(a) => match a.value {
            [b0, b1, b2, b3] => Ok(Some(i32::from_be_bytes([*b0, *b1, *b2, *b3]))),
            _ => Err(DecodeError::Malformed(attr::PORT_DELTA)),
        },
    }
}

fn xor_mapped(m: &Message<'_>) -> Result<SocketAddr, DecodeError> {
    let t = attr_type::XOR_MAPPED_ADDRESS;
    let a = m.attribute(t).ok_or(DecodeError::Missing(t))?;
    decode_xor_address(a.value, &m.transaction_id()).map_err(|_| DecodeError::Malformed(t))
}

fn session(m: &Message<'_>) -> Result<SessionId, DecodeError> {
    u64_attr(m, attr::SESSION).map(SessionId)
}

fn u64_value(v: &[u8]) -> Option<u64> {
    let b: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

fn u64_attr(m: &Message<'_>, t: u16) -> Result<u64, DecodeError> {
    let a = m.attribute(t).ok_or(DecodeError::Missing(t))?;
    u64_value(a.value).ok_or(DecodeError::Malformed(t))
}

fn u32_attr(m: &Message<'_>, t: u16) -> Result<u32, DecodeError> {
    let a = m.attribute(t).ok_or(DecodeError::Missing(t))?;
    let b: [u8; 4] = a.value.try_into().map_err(|_| DecodeError::Malformed(t))?;
    Ok(u32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn all() -> Vec<PunchMessage> {
        let tid = TransactionId::random();
        let s = SessionId(0x0123_4567_89ab_cdef);
        let peer = PeerInfo {
            reflexive: sa("203.0.113.1:4000"),
            candidates: vec![sa("10.1.0.2:4000"), sa("[fd00::1]:9")],
            port_delta: Some(-2),
            punch_window_ms: Some(1500),
            key: Some(PeerKey([7; 32])),
        };
        let proof = KeyProof {
            key: PeerKey([9; 32]),
            signature: [3; 64],
        };
        use PunchMessage as M;
        vec![
            M::Register {
                tid,
                id: "alice".into(),
                candidates: vec![sa("10.1.0.2:5000")],
                port_delta: Some(2),
                proof,
            },
            M::RegisterOk {
                tid,
                mapped: sa("203.0.113.1:5000"),
            },
            M::Unregister {
                tid,
                id: "a.b_c-d".into(),
                proof,
            },
            M::Sealed {
                tid,
                session: s,
                handshake: Some(vec![1; 48]),
                sealed: Some(vec![2; 100]),
            },
            M::Sealed {
                tid,
                session: s,
                handshake: None,
                sealed: Some(vec![2; 30]),
            },
            M::Connect {
                tid,
                target: "alice".into(),
                candidates: vec![],
                port_delta: Some(1),
                punch_window_ms: None,
            },
            M::ConnectOk {
                tid,
                session: s,
                mapped: sa("203.0.113.2:7"),
                peer: peer.clone(),
                start_in_ms: 20,
            },
            M::Introduce {
                tid,
                session: s,
                peer: PeerInfo {
                    port_delta: None,
                    punch_window_ms: None,
                    ..peer
                },
                start_in_ms: 0,
            },
            M::IntroduceOk { tid, session: s },
            M::Probe { tid, session: s },
            M::ProbeOk {
                tid,
                session: s,
                mapped: sa("203.0.113.9:1"),
            },
            M::Data {
                tid,
                session: s,
                seq: Some(7),
                ack: 3,
                payload: b"hello".to_vec(),
            },
            M::Data {
                tid,
                session: s,
                seq: None,
                ack: 99,
                payload: vec![],
            },
            M::Refresh { tid, session: s },
            M::RefreshOk { tid },
            M::Close { tid, session: s },
            M::Error {
                tid,
                method: method::CONNECT,
                code: code::UNKNOWN_PEER,
                reason: "no peer registered as bob".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let bytes = m.to_vec().expect("encode");
            assert_eq!(PunchMessage::decode(&bytes).expect("decode"), m);
        }
    }

    #[test]
    fn attributes_are_comprehension_optional() {
        for t in [
            attr::PEER_ID,
            attr::CANDIDATE,
            attr::SESSION,
            attr::START_IN,
            attr::SEQ,
            attr::ACK,
            attr::PAYLOAD,
            attr::PEER_REFLEXIVE,
            attr::PORT_DELTA,
            attr::PUNCH_WINDOW,
        ] {
            assert!(!attr_type::is_comprehension_required(t), "{t:#x}");
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for m in all() {
            let bytes = m.to_vec().expect("encode");
            for n in 0..bytes.len() {
                assert!(PunchMessage::decode(&bytes[..n]).is_err());
            }
        }
    }

    #[test]
    fn bit_flips_never_panic() {
        for m in all() {
            let bytes = m.to_vec().expect("encode");
            for i in 0..bytes.len() {
                for bit in 0..8 {
                    let mut b = bytes.clone();
                    b[i] ^= 1 << bit;
                    let _ = PunchMessage::decode(&b);
                }
            }
        }
    }

    fn raw(class: Class, m: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut w = MessageWriter::new(
            &mut buf,
            MessageType::new(class, m),
            &TransactionId::random(),
        )
        .expect("writer");
        for (t, v) in attrs {
            w.add_raw(*t, v).expect("attr");
        }
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    #[test]
    fn malformed_input_is_rejected() {
        let bad_id = raw(
            Class::Request,
            method::REGISTER,
            &[(attr::PEER_ID, b"a b".to_vec())],
        );
        assert_eq!(PunchMessage::decode(&bad_id), Err(DecodeError::BadId));
        let long_id = raw(
            Class::Request,
            method::REGISTER,
            &[(attr::PEER_ID, vec![b'a'; MAX_ID_LEN + 1])],
        );
        assert_eq!(PunchMessage::decode(&long_id), Err(DecodeError::BadId));
        let no_id = raw(Class::Request, method::REGISTER, &[]);
        assert_eq!(
            PunchMessage::decode(&no_id),
            Err(DecodeError::Missing(attr::PEER_ID))
        );
        let mut cands = vec![(attr::PEER_ID, b"x".to_vec())];
        let one = vec![0, 1, 0, 1, 10, 0, 0, 1];
        for _ in 0..=MAX_CANDIDATES {
            cands.push((attr::CANDIDATE, one.clone()));
        }
        let many = raw(Class::Request, method::REGISTER, &cands);
        assert_eq!(
            PunchMessage::decode(&many),
            Err(DecodeError::TooManyCandidates)
        );
        let short_session = raw(
            Class::Request,
            method::PROBE,
            &[(attr::SESSION, vec![1, 2])],
        );
        assert_eq!(
            PunchMessage::decode(&short_session),
            Err(DecodeError::Malformed(attr::SESSION))
        );
        let big = raw(
            Class::Indication,
            method::DATA,
            &[
                (attr::SESSION, vec![0; 8]),
                (attr::SEQ, vec![0; 8]),
                (attr::ACK, vec![0; 8]),
                (attr::PAYLOAD, vec![0; MAX_PAYLOAD + 1]),
            ],
        );
        assert_eq!(PunchMessage::decode(&big), Err(DecodeError::PayloadTooLong));
        let binding = raw(Class::Request, crate::stun::METHOD_BINDING, &[]);
        assert_eq!(
            PunchMessage::decode(&binding),
            Err(DecodeError::UnknownMethod(1))
        );
        assert!(PunchMessage::decode(b"hello world, not stun").is_err());
    }
}
