//! The RFC 5780 Binding server ("reflector").
//!
//! [`Reflector`] is the sans-IO core: given the bytes of a request, who sent it and which local
//! address received it, it writes the answer into a caller buffer and says which local address must
//! send it and to whom ([`Action`]). It reads no clock and owns no socket. `natscope_probes::reflector::driver` runs it over
//! real UDP/TCP sockets with tokio; [`rate_limit`], [`link`] and [`tcp`] (the TCP connection bounds)
//! are the other pure pieces.
//!
//! Deployments (RFC 5780 §2.3, §6):
//! - two IPs on one host: `primary` A1:P1 and `alternate` A2:P2, four local addresses;
//! - two single-IP hosts cooperating: each serves its own IP × {P1, P2}; a request whose answer must
//!   leave from the other IP is forwarded to the partner over an authenticated [`link`];
//! - one IP: no alternate, so no OTHER-ADDRESS, and CHANGE-REQUEST is answered with 420.
//!
//! Anti-abuse (RFC 5780 §9): answers go back to the requester's IP only (RESPONSE-PORT may change the
//! port, never the address; classic RESPONSE-ADDRESS is not honoured); PADDING is capped so a response
//! is never more than [`MAX_AMPLIFICATION_BYTES`] larger than the request that caused it; malformed
//! input is dropped without an answer.

pub mod link;
pub mod rate_limit;
pub mod tcp;

use std::net::SocketAddr;

use crate::stun::{
    attr, attr_type, ChangeRequest, Class, Message, MessageType, MessageWriter, TransactionId,
    HEADER_LEN, METHOD_BINDING,
};

/// Largest PADDING (RFC 5780 §7.6) the reflector will echo; larger requests get 400.
pub const MAX_PADDING: usize = 1500;
/// Output buffer size that fits every answer the core can produce.
pub const MAX_RESPONSE: usize = 2048;
/// SOFTWARE attribute value sent in every answer.
pub const SOFTWARE: &str = concat!("natscope ", env!("CARGO_PKG_VERSION"));
/// Upper bound on (response bytes − request bytes) for any request the reflector answers. The
/// largest answer is an IPv6 success: XOR-MAPPED, MAPPED, RESPONSE-ORIGIN, OTHER-ADDRESS (24 bytes
/// each) and SOFTWARE (20); PADDING and FINGERPRINT are only echoed when the request carried the same
/// bytes. A request is at least its 20-byte header, so the worst byte amplification is
/// (20 + 116) / 20 = 6.8×, one answer per request (docs/reflector.md; checked by a test).
pub const MAX_AMPLIFICATION_BYTES: usize = 4 * 24 + 4 + padded_len(SOFTWARE.len());

const fn padded_len(n: usize) -> usize {
    (n + 3) & !3
}

/// Which addresses the server answers from, and which of them live in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReflectorConfig {
    /// A1:P1, the address clients are told about.
    pub primary: SocketAddr,
    /// A2:P2, the alternate (RFC 5780 OTHER-ADDRESS). `None`: a one-address server.
    pub alternate: Option<SocketAddr>,
    /// `Some` when the alternate IP belongs to a cooperating partner process rather than this one.
    pub partner: Option<link::LinkConfig>,
}

impl ReflectorConfig {
    /// The server's address space: {A1, A2} × {P1, P2}, or just A1:P1 with no alternate.
    pub fn server_addresses(&self) -> Vec<SocketAddr> {
        match self.alternate {
            None => vec![self.primary],
            Some(alt) => {
                let (a1, p1, a2, p2) =
                    (self.primary.ip(), self.primary.port(), alt.ip(), alt.port());
                vec![
                    SocketAddr::new(a1, p1),
                    SocketAddr::new(a1, p2),
                    SocketAddr::new(a2, p1),
                    SocketAddr::new(a2, p2),
                ]
            }
        }
    }

    /// The addresses this process binds: all of them, or with a partner only those on A1.
    pub fn local_addresses(&self) -> Vec<SocketAddr> {
        let all = self.server_addresses();
        match self.partner {
            None => all,
            Some(_) => all
                .into_iter()
                .filter(|a| a.ip() == self.primary.ip())
                .collect(),
        }
    }

    /// Checks the shape before anything is bound. Messages are lowercase one-liners for the CLI.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(alt) = self.alternate {
            if alt.ip() == self.primary.ip() {
                return Err(format!(
                    "alternate {alt} has the primary's ip; rfc 5780 needs a second ip (omit --alternate for a one-address server)"
                ));
            }
            if alt.port() == self.primary.port() {
                return Err(format!(
                    "alternate port {} equals the primary port; rfc 5780 needs two ports",
                    alt.port()
                ));
            }
            if alt.is_ipv4() != self.primary.is_ipv4() {
                return Err("primary and alternate must be the same address family".into());
            }
            if self.primary.port() == 0 || alt.port() == 0 {
                return Err(
                    "ports must be given explicitly (0 is not allowed with an alternate)".into(),
                );
            }
        } else if self.partner.is_some() {
            return Err("a cooperating partner needs --alternate naming the partner's ip and the second port".into());
        }
        Ok(())
    }

    /// The tests a client cannot run against this deployment (logged at start).
    pub fn missing_capabilities(&self) -> &'static [&'static str] {
        if self.alternate.is_some() {
            &[]
        } else {
            &[
                "mapping behavior (rfc 5780 §4.3: needs a second ip)",
                "filtering behavior (rfc 5780 §4.4: needs change-ip and change-port)",
                "classic rfc 3489 classification",
            ]
        }
    }
}

/// What kind of test a request serves; counted by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Binding,
    ChangeIp,
    ChangePort,
    ChangeBoth,
    ResponsePort,
    Padding,
    Classic,
    Other,
}

/// Why a datagram got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("not a well-formed stun message")]
    Malformed,
    #[error("not a request")]
    NotRequest,
    #[error("fingerprint does not match")]
    BadFingerprint,
    #[error("answer would leave from an address this process does not own")]
    NotLocal,
    #[error("output buffer too small")]
    NoRoom,
}

/// The core's decision for one request. Answer bytes are in the caller's buffer, `out[..len]`.
/// It is not a [`net::Transmit`](crate::net::Transmit), which owns its payload: answering writes
/// into the driver's buffer so that the hot path allocates nothing (`tests/reflector_alloc.rs`),
/// and it schedules nothing, so the reflector has no `poll_timeout` either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `out[..len]` from local address `from` to `to`.
    Send {
        from: SocketAddr,
        to: SocketAddr,
        len: usize,
        /// Whether this is an error response (4xx).
        error: bool,
    },
    /// Send `out[..len]` (a [`link`] message) to the partner, who answers from its own address.
    Forward { len: usize },
    /// No answer.
    Drop(DropReason),
}

/// Transport a request arrived on (CHANGE-REQUEST and RESPONSE-PORT only make sense over UDP):
/// the crate's one [`crate::net::Transport`].
pub use crate::net::Transport;

/// The stateless RFC 5780 answer logic.
#[derive(Clone, Debug)]
pub struct Reflector {
    cfg: ReflectorConfig,
    /// For each server address a request can reach: the encoded attributes of a success answer
    /// that depend only on that address and the CHANGE-REQUEST flags (see [`Tails`]).
    tails: Vec<(SocketAddr, Tails)>,
}

/// RESPONSE-ORIGIN, OTHER-ADDRESS and SOFTWARE, encoded once per (address reached, CHANGE-REQUEST)
/// at construction, indexed by `change_ip | change_port << 1`. A success answer is then its header,
/// the two client addresses and one copy: what a bare Binding responder does, plus one `memcpy`,
/// instead of five attribute encodings per request.
type Tails = [Vec<u8>; 4];

/// A parsed, validated request: everything the answer depends on.
struct Plan {
    tid: TransactionId,
    classic: bool,
    change: ChangeRequest,
    response_port: Option<u16>,
    padding: Option<usize>,
    fingerprint: bool,
}

enum Refusal {
    Drop(DropReason),
    Error { code: u16, reason: &'static str },
    Unknown,
}

impl Reflector {
    pub fn new(cfg: ReflectorConfig) -> Self {
        let mut r = Self {
            cfg,
            tails: Vec::new(),
        };
        r.tails = r
            .cfg
            .server_addresses()
            .into_iter()
            .map(|at| {
                let tails = [0, 1, 2, 3].map(|i| {
                    let change = ChangeRequest {
                        change_ip: i & 1 != 0,
                        change_port: i & 2 != 0,
                    };
                    r.encode_tail(at, r.select_source(at, change))
                });
                (at, tails)
            })
            .collect();
        r
    }

    /// The fixed attributes of a success answer to a request that reached `received_on`, answered
    /// from `source`, as [`write_success`](Self::write_success) would write them.
    fn encode_tail(&self, received_on: SocketAddr, source: SocketAddr) -> Vec<u8> {
        let mut buf = [0u8; MAX_RESPONSE];
        let written = (|| {
            let tid = TransactionId([0; 16]);
            let mut w = MessageWriter::new(&mut buf, MessageType::BINDING_RESPONSE, &tid)?;
            w.add_address(attr_type::RESPONSE_ORIGIN, source)?;
            if let Some(o) = self.other_address(received_on) {
                w.add_address(attr_type::OTHER_ADDRESS, o)?;
            }
            w.add_software(SOFTWARE)?;
            Ok::<_, crate::stun::EncodeError>(w.finish())
        })();
        // Fewer than 100 bytes into a 2 KiB buffer: cannot fail; an empty tail disables the
        // shortcut for this address rather than panicking.
        written.map_or_else(|_| Vec::new(), |n| buf[HEADER_LEN..n].to_vec())
    }

    /// The shortcut for the common success answer (RFC 8489, no PADDING): header, XOR-MAPPED-
    /// ADDRESS and MAPPED-ADDRESS of the client, the precomputed tail, and FINGERPRINT if asked.
    /// Byte for byte what the general path writes (checked by a test); `None` falls back to it.
    fn write_common(
        &self,
        plan: &Plan,
        client: SocketAddr,
        received_on: SocketAddr,
        out: &mut [u8],
    ) -> Option<usize> {
        if plan.classic || plan.padding.is_some() {
            return None;
        }
        let tails = &self.tails.iter().find(|(at, _)| *at == received_on)?.1;
        let tail =
            &tails[usize::from(plan.change.change_ip) | usize::from(plan.change.change_port) << 1];
        if tail.is_empty() {
            return None;
        }
        let a = attr::address_len(client);
        let len = HEADER_LEN + 2 * (4 + a) + tail.len();
        let total = len + if plan.fingerprint { 8 } else { 0 };
        let out = out.get_mut(..total)?;
        out[..2].copy_from_slice(&MessageType::BINDING_RESPONSE.to_u16().to_be_bytes());
        out[2..4].copy_from_slice(&u16::try_from(total - HEADER_LEN).ok()?.to_be_bytes());
        out[4..HEADER_LEN].copy_from_slice(&plan.tid.0);
        let mut at = HEADER_LEN;
        for (typ, addr) in [
            (
                attr_type::XOR_MAPPED_ADDRESS,
                attr::xor_address(client, &plan.tid),
            ),
            (attr_type::MAPPED_ADDRESS, client),
        ] {
            out[at..at + 2].copy_from_slice(&typ.to_be_bytes());
            out[at + 2..at + 4].copy_from_slice(&(a as u16).to_be_bytes());
            attr::encode_address(addr, &mut out[at + 4..at + 4 + a]);
            at += 4 + a;
        }
        out[at..len].copy_from_slice(tail);
        if plan.fingerprint {
            // RFC 8489 §14.7: the CRC covers the header whose length already counts FINGERPRINT.
            let crc = crc32fast::hash(&out[..len]) ^ crate::stun::FINGERPRINT_XOR;
            out[len..len + 2].copy_from_slice(&attr_type::FINGERPRINT.to_be_bytes());
            out[len + 2..len + 4].copy_from_slice(&4u16.to_be_bytes());
            out[len + 4..total].copy_from_slice(&crc.to_be_bytes());
        }
        Some(total)
    }

    pub fn config(&self) -> &ReflectorConfig {
        &self.cfg
    }

    /// Answers one request received by local address `received_on` from `from`.
    /// `unix_ms` is wall-clock time, used only to stamp partner link messages.
    pub fn answer(
        &self,
        transport: Transport,
        from: SocketAddr,
        received_on: SocketAddr,
        request: &[u8],
        out: &mut [u8],
        unix_ms: u64,
    ) -> (Action, RequestKind) {
        let msg = match Message::parse(request) {
            Ok(m) => m,
            Err(_) => return (Action::Drop(DropReason::Malformed), RequestKind::Other),
        };
        let plan = match self.plan(&msg, transport) {
            Ok(p) => p,
            Err(Refusal::Drop(r)) => return (Action::Drop(r), RequestKind::Other),
            Err(Refusal::Error { code, reason }) => {
                return (
                    error_response(out, &msg, from, received_on, code, reason, &[]),
                    RequestKind::Other,
                );
            }
            Err(Refusal::Unknown) => {
                let mut unknown = [0u16; 8];
                let n = collect_unknown(&msg, &mut unknown, self.cfg.alternate.is_some());
                return (
                    error_response(
                        out,
                        &msg,
                        from,
                        received_on,
                        420,
                        "Unknown Attribute",
                        &unknown[..n],
                    ),
                    RequestKind::Other,
                );
            }
        };
        let kind = plan.kind();
        let source = self.select_source(received_on, plan.change);
        if self.cfg.partner.is_some() && source.ip() != self.cfg.primary.ip() {
            // RFC 5780 §2.3: the partner answers from its own address.
            let Some(link) = &self.cfg.partner else {
                return (Action::Drop(DropReason::NotLocal), kind);
            };
            return match link.encode_forward(out, unix_ms, received_on, from, request) {
                Some(len) => (Action::Forward { len }, kind),
                None => (Action::Drop(DropReason::NoRoom), kind),
            };
        }
        (
            self.write_success(&plan, from, received_on, source, out),
            kind,
        )
    }

    /// Answers a request the partner forwarded: it must leave from one of this process's addresses.
    pub fn answer_forwarded(
        &self,
        fwd: &link::Forwarded<'_>,
        out: &mut [u8],
    ) -> (Action, RequestKind) {
        let msg = match Message::parse(fwd.request) {
            Ok(m) => m,
            Err(_) => return (Action::Drop(DropReason::Malformed), RequestKind::Other),
        };
        let plan = match self.plan(&msg, Transport::Udp) {
            Ok(p) => p,
            // The partner already answered every error itself; anything else is a bug or an attack.
            Err(_) => return (Action::Drop(DropReason::Malformed), RequestKind::Other),
        };
        // From the partner's view, the request came to its address; ours is the "other" IP.
        let source = self.select_source(fwd.received_on, plan.change);
        if source.ip() != self.cfg.primary.ip() {
            return (Action::Drop(DropReason::NotLocal), plan.kind());
        }
        (
            self.write_success(&plan, fwd.client, fwd.received_on, source, out),
            plan.kind(),
        )
    }

    fn plan(&self, msg: &Message<'_>, transport: Transport) -> Result<Plan, Refusal> {
        let mt = msg.message_type();
        if mt.class != Class::Request {
            return Err(Refusal::Drop(DropReason::NotRequest));
        }
        if msg.fingerprint_valid() == Some(false) {
            // RFC 8489 §7.3: a bad FINGERPRINT means "not STUN"; discard silently.
            return Err(Refusal::Drop(DropReason::BadFingerprint));
        }
        if mt.method != METHOD_BINDING {
            return Err(Refusal::Error {
                code: 400,
                reason: "Only Binding is supported",
            });
        }
        let mut plan = Plan {
            tid: msg.transaction_id(),
            classic: !msg.is_rfc8489(),
            change: ChangeRequest::NONE,
            response_port: None,
            padding: None,
            fingerprint: false,
        };
        let mut unknown = false;
        let mut seen_change = false;
        let mut seen_port = false;
        let mut seen_padding = false;
        for a in msg.attributes() {
            match a.typ {
                attr_type::CHANGE_REQUEST if !seen_change => {
                    seen_change = true;
                    plan.change = ChangeRequest::decode(a.value).map_err(|_| Refusal::Error {
                        code: 400,
                        reason: "Malformed CHANGE-REQUEST",
                    })?;
                }
                attr_type::RESPONSE_PORT if !seen_port => {
                    seen_port = true;
                    plan.response_port = Some(attr::decode_response_port(a.value).map_err(
                        |_| Refusal::Error {
                            code: 400,
                            reason: "Malformed RESPONSE-PORT",
                        },
                    )?);
                }
                attr_type::PADDING if !seen_padding => {
                    seen_padding = true;
                    plan.padding = Some(a.value.len());
                }
                attr_type::FINGERPRINT => plan.fingerprint = !plan.classic,
                t if is_understood(t) => {}
                t if attr_type::is_comprehension_required(t) => unknown = true,
                _ => {}
            }
        }
        if unknown {
            return Err(Refusal::Unknown);
        }
        if !plan.change.is_none() && self.cfg.alternate.is_none() {
            // RFC 5780 §6.1: a server without an alternate address treats CHANGE-REQUEST as unknown.
            return Err(Refusal::Unknown);
        }
        if transport == Transport::Tcp && (!plan.change.is_none() || plan.response_port.is_some()) {
            // Over TCP the answer can only travel on the connection it came in on.
            return Err(Refusal::Error {
                code: 400,
                reason: "CHANGE-REQUEST and RESPONSE-PORT need UDP",
            });
        }
        if plan.response_port.is_some() && plan.padding.is_some() {
            // RFC 5780 §7.5: the two together would make an aimable amplifier.
            return Err(Refusal::Error {
                code: 400,
                reason: "RESPONSE-PORT with PADDING",
            });
        }
        if plan.response_port == Some(0) {
            return Err(Refusal::Error {
                code: 400,
                reason: "RESPONSE-PORT 0",
            });
        }
        if plan.padding.is_some_and(|p| p > MAX_PADDING) {
            return Err(Refusal::Error {
                code: 400,
                reason: "PADDING too large",
            });
        }
        Ok(plan)
    }

    /// RFC 5780 §6: change-IP swaps A1/A2 keeping the port, change-port swaps P1/P2 keeping the IP.
    fn select_source(&self, received_on: SocketAddr, change: ChangeRequest) -> SocketAddr {
        let Some(alt) = self.cfg.alternate else {
            return received_on;
        };
        let (a1, p1, a2, p2) = (
            self.cfg.primary.ip(),
            self.cfg.primary.port(),
            alt.ip(),
            alt.port(),
        );
        let ip = if change.change_ip {
            swap(received_on.ip(), a1, a2)
        } else {
            received_on.ip()
        };
        let port = if change.change_port {
            swap(received_on.port(), p1, p2)
        } else {
            received_on.port()
        };
        SocketAddr::new(ip, port)
    }

    /// OTHER-ADDRESS (RFC 5780 §7.4): where change-IP + change-port answers would come from,
    /// relative to the address the request reached (A2:P2 for requests to A1:P1).
    fn other_address(&self, received_on: SocketAddr) -> Option<SocketAddr> {
        self.cfg.alternate?;
        Some(self.select_source(received_on, ChangeRequest::BOTH))
    }

    fn write_success(
        &self,
        plan: &Plan,
        client: SocketAddr,
        received_on: SocketAddr,
        source: SocketAddr,
        out: &mut [u8],
    ) -> Action {
        let to = match plan.response_port {
            // RFC 5780 §7.5: only the port may change; the IP stays the requester's.
            Some(p) => SocketAddr::new(client.ip(), p),
            None => client,
        };
        if let Some(len) = self.write_common(plan, client, received_on, out) {
            return Action::Send {
                from: source,
                to,
                len,
                error: false,
            };
        }
        let other = self.other_address(received_on);
        let result = (|| {
            let mut w = MessageWriter::new(out, MessageType::BINDING_RESPONSE, &plan.tid)?;
            if plan.classic {
                // RFC 3489 §11.2: MAPPED-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS.
                w.add_address(attr_type::MAPPED_ADDRESS, client)?;
                w.add_address(attr_type::SOURCE_ADDRESS, source)?;
                if let Some(o) = other {
                    w.add_address(attr_type::CHANGED_ADDRESS, o)?;
                }
            } else {
                w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, client)?;
                w.add_address(attr_type::MAPPED_ADDRESS, client)?;
                w.add_address(attr_type::RESPONSE_ORIGIN, source)?;
                if let Some(o) = other {
                    w.add_address(attr_type::OTHER_ADDRESS, o)?;
                }
            }
            if let Some(p) = plan.padding {
                w.add_padding(p)?;
            }
            if !plan.classic {
                // RFC 3489's SERVER (same type) must be a multiple of 4 long, and old parsers such
                // as Debian's stun client reject anything else: classic answers go without it.
                w.add_software(SOFTWARE)?;
            }
            if plan.fingerprint {
                w.finish_with_fingerprint()
            } else {
                Ok(w.finish())
            }
        })();
        match result {
            Ok(len) => Action::Send {
                from: source,
                to,
                len,
                error: false,
            },
            Err(_) => Action::Drop(DropReason::NoRoom),
        }
    }
}

impl Plan {
    fn kind(&self) -> RequestKind {
        if self.classic {
            return RequestKind::Classic;
        }
        match (self.change.change_ip, self.change.change_port) {
            (true, true) => return RequestKind::ChangeBoth,
            (true, false) => return RequestKind::ChangeIp,
            (false, true) => return RequestKind::ChangePort,
            _ => {}
        }
        if self.response_port.is_some() {
            RequestKind::ResponsePort
        } else if self.padding.is_some() {
            RequestKind::Padding
        } else {
            RequestKind::Binding
        }
    }
}

fn swap<T: PartialEq>(v: T, a: T, b: T) -> T {
    if v == a {
        b
    } else {
        a
    }
}

/// Comprehension-required attributes a Binding server may meet and safely ignore: credentials
/// (this server needs none), ICE attributes on connectivity checks, and RFC 3489 RESPONSE-ADDRESS,
/// which is deliberately not honoured (it would aim answers at third parties).
fn is_understood(t: u16) -> bool {
    matches!(
        t,
        attr_type::MAPPED_ADDRESS
            | attr_type::RESPONSE_ADDRESS
            | attr_type::CHANGE_REQUEST
            | attr_type::SOURCE_ADDRESS
            | attr_type::CHANGED_ADDRESS
            | attr_type::USERNAME
            | attr_type::MESSAGE_INTEGRITY
            | attr_type::ERROR_CODE
            | attr_type::UNKNOWN_ATTRIBUTES
            | attr_type::REALM
            | attr_type::NONCE
            | attr_type::MESSAGE_INTEGRITY_SHA256
            | attr_type::USERHASH
            | attr_type::XOR_MAPPED_ADDRESS
            | attr_type::PADDING
            | attr_type::RESPONSE_PORT
            | 0x0024 // PRIORITY (RFC 8445)
            | 0x0025 // USE-CANDIDATE (RFC 8445)
    )
}

fn collect_unknown(msg: &Message<'_>, out: &mut [u16; 8], has_alternate: bool) -> usize {
    let mut n = 0;
    for a in msg.attributes() {
        let unknown = (attr_type::is_comprehension_required(a.typ) && !is_understood(a.typ))
            || (a.typ == attr_type::CHANGE_REQUEST && !has_alternate);
        if unknown && n < out.len() && !out[..n].contains(&a.typ) {
            out[n] = a.typ;
            n += 1;
        }
    }
    n
}

/// An error response to `req` (RFC 8489 §6.3.4): same method and transaction, sent from the address
/// the request reached back to its source; CHANGE-REQUEST and RESPONSE-PORT are not honoured.
fn error_response(
    out: &mut [u8],
    req: &Message<'_>,
    to: SocketAddr,
    received_on: SocketAddr,
    code: u16,
    reason: &str,
    unknown: &[u16],
) -> Action {
    let typ = MessageType::new(Class::ErrorResponse, req.message_type().method);
    let classic = !req.is_rfc8489();
    let fingerprint = req.attribute(attr_type::FINGERPRINT).is_some();
    let result = (|| {
        let mut w = MessageWriter::new(out, typ, &req.transaction_id())?;
        w.add_error_code(code, reason)?;
        if !unknown.is_empty() {
            w.add_unknown_attributes(unknown)?;
        }
        if !classic {
            w.add_software(SOFTWARE)?;
        }
        if fingerprint && !classic {
            w.finish_with_fingerprint()
        } else {
            Ok(w.finish())
        }
    })();
    match result {
        Ok(len) => Action::Send {
            from: received_on,
            to,
            len,
            error: true,
        },
        Err(_) => Action::Drop(DropReason::NoRoom),
    }
}

#[cfg(test)]
mod tests {
    use super::link::{LinkConfig, LinkVerifier};
    use super::*;
    use crate::client::{build_request, BindingResponse, RequestOptions};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn two_ip() -> Reflector {
        Reflector::new(ReflectorConfig {
            primary: sa("192.0.2.1:3478"),
            alternate: Some(sa("192.0.2.2:3479")),
            partner: None,
        })
    }

    fn request(opts: RequestOptions) -> (TransactionId, Vec<u8>) {
        let tid = TransactionId::random();
        let mut buf = [0u8; 2048];
        let n = build_request(&mut buf, &tid, &opts).unwrap();
        (tid, buf[..n].to_vec())
    }

    fn ask(
        r: &Reflector,
        t: Transport,
        to: &str,
        opts: RequestOptions,
    ) -> (Action, Option<BindingResponse>) {
        let client = sa("198.51.100.7:40000");
        let (tid, req) = request(opts);
        let mut out = [0u8; MAX_RESPONSE];
        let (action, _) = r.answer(t, client, sa(to), &req, &mut out, 0);
        let resp = match action {
            Action::Send { len, from, .. } => {
                Some(BindingResponse::parse(&out[..len], &tid, Some(from)).unwrap())
            }
            _ => None,
        };
        (action, resp)
    }

    #[test]
    fn change_request_selects_the_source_rfc5780_section6() {
        let r = two_ip();
        // (received on, change, expected source, expected OTHER-ADDRESS)
        let rows = [
            (
                "192.0.2.1:3478",
                ChangeRequest::NONE,
                "192.0.2.1:3478",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.1:3478",
                ChangeRequest::PORT,
                "192.0.2.1:3479",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.1:3478",
                ChangeRequest::IP,
                "192.0.2.2:3478",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.1:3478",
                ChangeRequest::BOTH,
                "192.0.2.2:3479",
                "192.0.2.2:3479",
            ),
            (
                "192.0.2.2:3479",
                ChangeRequest::BOTH,
                "192.0.2.1:3478",
                "192.0.2.1:3478",
            ),
            (
                "192.0.2.2:3478",
                ChangeRequest::PORT,
                "192.0.2.2:3479",
                "192.0.2.1:3479",
            ),
        ];
        for (to, change, want_from, want_other) in rows {
            let (action, resp) = ask(
                &r,
                Transport::Udp,
                to,
                RequestOptions {
                    change,
                    ..Default::default()
                },
            );
            let resp = resp.unwrap();
            match action {
                Action::Send {
                    from,
                    to: dest,
                    error,
                    ..
                } => {
                    assert_eq!(from, sa(want_from), "{to} {change:?}");
                    assert_eq!(dest, sa("198.51.100.7:40000"));
                    assert!(!error);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(resp.response_origin, Some(sa(want_from)));
            assert_eq!(resp.other_address, Some(sa(want_other)));
            assert_eq!(resp.xor_mapped, Some(sa("198.51.100.7:40000")));
            assert_eq!(resp.mapped, resp.xor_mapped);
        }
    }

    #[test]
    fn response_port_changes_only_the_port() {
        let (action, _) = ask(
            &two_ip(),
            Transport::Udp,
            "192.0.2.1:3478",
            RequestOptions {
                response_port: Some(5555),
                ..Default::default()
            },
        );
        assert!(matches!(action, Action::Send { to, .. } if to == sa("198.51.100.7:5555")));
    }

    #[test]
    fn refusals_use_the_right_error_codes() {
        let r = two_ip();
        let code = |t, opts| {
            ask(&r, t, "192.0.2.1:3478", opts)
                .1
                .and_then(|b| b.error_code)
        };
        let rp_pad = RequestOptions {
            response_port: Some(9),
            padding: Some(8),
            ..Default::default()
        };
        assert_eq!(code(Transport::Udp, rp_pad), Some(400));
        let big = RequestOptions {
            padding: Some(MAX_PADDING + 4),
            ..Default::default()
        };
        assert_eq!(code(Transport::Udp, big), Some(400));
        let tcp_change = RequestOptions {
            change: ChangeRequest::IP,
            ..Default::default()
        };
        assert_eq!(code(Transport::Tcp, tcp_change), Some(400));
        // One-address server: CHANGE-REQUEST is unknown to it (420 naming 0x0003), and no OTHER-ADDRESS.
        let single = Reflector::new(ReflectorConfig {
            primary: sa("192.0.2.1:3478"),
            alternate: None,
            partner: None,
        });
        let (_, resp) = ask(&single, Transport::Udp, "192.0.2.1:3478", tcp_change);
        let resp = resp.unwrap();
        assert_eq!(
            (resp.error_code, resp.unknown_attributes.clone()),
            (Some(420), vec![0x0003])
        );
        let (_, plain) = ask(
            &single,
            Transport::Udp,
            "192.0.2.1:3478",
            RequestOptions::default(),
        );
        assert_eq!(plain.unwrap().other_address, None);
    }

    #[test]
    fn unknown_comprehension_required_attribute_gets_420() {
        let tid = TransactionId::random();
        let mut buf = [0u8; 128];
        let mut w = MessageWriter::new(&mut buf, MessageType::BINDING_REQUEST, &tid).unwrap();
        w.add_raw(0x0042, b"abcd").unwrap();
        w.add_raw(0x8042, b"ok").unwrap(); // comprehension-optional: ignored
        let n = w.finish();
        let mut out = [0u8; MAX_RESPONSE];
        let (action, _) = two_ip().answer(
            Transport::Udp,
            sa("198.51.100.7:1"),
            sa("192.0.2.1:3478"),
            &buf[..n],
            &mut out,
            0,
        );
        let Action::Send {
            len, error: true, ..
        } = action
        else {
            panic!("{action:?}")
        };
        let r = BindingResponse::parse(&out[..len], &tid, None).unwrap();
        assert_eq!(
            (r.error_code, r.unknown_attributes),
            (Some(420), vec![0x0042])
        );
    }

    #[test]
    fn malformed_and_non_requests_are_dropped_silently() {
        let r = two_ip();
        let mut out = [0u8; MAX_RESPONSE];
        let from = sa("198.51.100.7:1");
        let to = sa("192.0.2.1:3478");
        assert!(matches!(
            r.answer(
                Transport::Udp,
                from,
                to,
                b"hello world, not stun",
                &mut out,
                0
            )
            .0,
            Action::Drop(DropReason::Malformed)
        ));
        let (tid, mut req) = request(RequestOptions {
            fingerprint: true,
            ..Default::default()
        });
        let last = req.len() - 1;
        req[last] ^= 1;
        assert!(matches!(
            r.answer(Transport::Udp, from, to, &req, &mut out, 0).0,
            Action::Drop(DropReason::BadFingerprint)
        ));
        let mut resp = [0u8; 64];
        let n = MessageWriter::new(&mut resp, MessageType::BINDING_RESPONSE, &tid)
            .unwrap()
            .finish();
        assert!(matches!(
            r.answer(Transport::Udp, from, to, &resp[..n], &mut out, 0)
                .0,
            Action::Drop(DropReason::NotRequest)
        ));
    }

    #[test]
    fn cooperating_pair_forwards_change_ip_and_partner_answers() {
        let secret = b"0123456789abcdef".to_vec();
        let a = Reflector::new(ReflectorConfig {
            primary: sa("192.0.2.1:3478"),
            alternate: Some(sa("192.0.2.2:3479")),
            partner: Some(LinkConfig {
                listen: sa("192.0.2.1:3480"),
                partner: sa("192.0.2.2:3480"),
                secret: secret.clone(),
            }),
        });
        let b_link = LinkConfig {
            listen: sa("192.0.2.2:3480"),
            partner: sa("192.0.2.1:3480"),
            secret,
        };
        let b = Reflector::new(ReflectorConfig {
            primary: sa("192.0.2.2:3478"),
            alternate: Some(sa("192.0.2.1:3479")),
            partner: Some(b_link.clone()),
        });
        let client = sa("198.51.100.7:40000");
        for (change, want_from) in [
            (ChangeRequest::IP, "192.0.2.2:3478"),
            (ChangeRequest::BOTH, "192.0.2.2:3479"),
        ] {
            let (tid, req) = request(RequestOptions {
                change,
                ..Default::default()
            });
            let mut link = [0u8; MAX_RESPONSE];
            let (action, _) = a.answer(
                Transport::Udp,
                client,
                sa("192.0.2.1:3478"),
                &req,
                &mut link,
                1_000,
            );
            let Action::Forward { len } = action else {
                panic!("{action:?}")
            };
            let mut v = LinkVerifier::new(b_link.clone(), 1_000);
            let fwd = v.verify(sa("192.0.2.1:3480"), &link[..len], 1_000).unwrap();
            let mut out = [0u8; MAX_RESPONSE];
            let (action, _) = b.answer_forwarded(&fwd, &mut out);
            let Action::Send { from, to, len, .. } = action else {
                panic!("{action:?}")
            };
            assert_eq!((from, to), (sa(want_from), client));
            let r = BindingResponse::parse(&out[..len], &tid, Some(from)).unwrap();
            assert_eq!(r.response_origin, Some(sa(want_from)));
            assert_eq!(
                r.other_address,
                Some(sa("192.0.2.2:3479")),
                "the pair names the partner as OTHER-ADDRESS"
            );
            assert_eq!(r.xor_mapped, Some(client));
        }
        // Requests answered from A's own IP never touch the link.
        let (action, _) = ask(
            &a,
            Transport::Udp,
            "192.0.2.1:3478",
            RequestOptions {
                change: ChangeRequest::PORT,
                ..Default::default()
            },
        );
        assert!(matches!(action, Action::Send { from, .. } if from == sa("192.0.2.1:3479")));
    }

    #[test]
    fn the_common_answer_shortcut_writes_what_the_general_path_writes() {
        let v6 = Reflector::new(ReflectorConfig {
            primary: sa("[2001:db8::1]:3478"),
            alternate: Some(sa("[2001:db8::2]:3479")),
            partner: None,
        });
        let single = Reflector::new(ReflectorConfig {
            primary: sa("192.0.2.1:3478"),
            alternate: None,
            partner: None,
        });
        let mut shortcuts = 0;
        for r in [two_ip(), v6, single] {
            for received_on in r.config().server_addresses() {
                for client in [sa("198.51.100.7:40000"), sa("[2001:db8::99]:1")] {
                    for i in 0..4u8 {
                        for fingerprint in [false, true] {
                            let plan = Plan {
                                tid: TransactionId::random(),
                                classic: false,
                                change: ChangeRequest {
                                    change_ip: i & 1 != 0,
                                    change_port: i & 2 != 0,
                                },
                                response_port: None,
                                padding: None,
                                fingerprint,
                            };
                            let source = r.select_source(received_on, plan.change);
                            let mut fast = [0u8; MAX_RESPONSE];
                            let Some(n) = r.write_common(&plan, client, received_on, &mut fast)
                            else {
                                panic!("no shortcut for {received_on}")
                            };
                            shortcuts += 1;
                            // The general path, with the shortcut's tails taken away.
                            let general = Reflector {
                                cfg: r.cfg.clone(),
                                tails: Vec::new(),
                            };
                            let mut slow = [0u8; MAX_RESPONSE];
                            let Action::Send { len, .. } = general.write_success(
                                &plan,
                                client,
                                received_on,
                                source,
                                &mut slow,
                            ) else {
                                panic!("general path refused")
                            };
                            assert_eq!(
                                &fast[..n],
                                &slow[..len],
                                "{received_on} {client} {i} {fingerprint}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(shortcuts, (4 + 4 + 1) * 2 * 4 * 2);
    }

    #[test]
    fn amplification_is_bounded_for_every_kind_of_request() {
        let v6 = Reflector::new(ReflectorConfig {
            primary: sa("[2001:db8::1]:3478"),
            alternate: Some(sa("[2001:db8::2]:3479")),
            partner: None,
        });
        let mut worst: f64 = 0.0;
        for r in [two_ip(), v6] {
            let to = r.config().primary;
            let client = if to.is_ipv4() {
                sa("198.51.100.7:1")
            } else {
                sa("[2001:db8::99]:1")
            };
            for change in [
                ChangeRequest::NONE,
                ChangeRequest::IP,
                ChangeRequest::PORT,
                ChangeRequest::BOTH,
            ] {
                for fingerprint in [false, true] {
                    for padding in [None, Some(0), Some(1), Some(MAX_PADDING)] {
                        for classic in [false, true] {
                            let tid = if classic {
                                TransactionId::random_classic()
                            } else {
                                TransactionId::random()
                            };
                            let mut req = [0u8; 2048];
                            let opts = RequestOptions {
                                change,
                                padding,
                                fingerprint,
                                ..Default::default()
                            };
                            let n = build_request(&mut req, &tid, &opts).unwrap();
                            let mut out = [0u8; MAX_RESPONSE];
                            if let (Action::Send { len, .. }, _) =
                                r.answer(Transport::Udp, client, to, &req[..n], &mut out, 0)
                            {
                                assert!(
                                    len <= n + MAX_AMPLIFICATION_BYTES,
                                    "{len} vs {n}: {opts:?}"
                                );
                                worst = worst.max(len as f64 / n as f64);
                            }
                        }
                    }
                }
            }
        }
        assert!(worst <= 6.8, "worst amplification {worst}");
        assert!(worst > 6.0, "the documented worst case is reached: {worst}");
    }
}
