//! PCP (RFC 6887) messages, both directions: ANNOUNCE and MAP requests and responses.
//!
//! Every message is a 24-byte common header (RFC 6887 §7.1, §7.2), the opcode's fields (MAP: 36
//! bytes, §11.1; ANNOUNCE: none, §14.1) and options (§7.3). Addresses are 128 bits; an IPv4 address
//! is written IPv4-mapped (`::ffff:a.b.c.d`) and read back as [`IpAddr::V4`], so `::ffff:0.0.0.0`
//! ("any IPv4 address") and `::` ("any IPv6 address") stay distinct.
//!
//! Lengths (§7, §8.3): a message is a multiple of 4 bytes and at most [`MAX_MESSAGE`] (1100) long;
//! anything else is an error, so a parser never holds more than 1100 bytes' worth of options.
//!
//! Options (§7.3): every option's framing (code, reserved, length, data padded to 4) is checked, and
//! options are kept raw in [`PcpOption`]. This codec implements none of them (THIRD_PARTY,
//! PREFER_FAILURE, FILTER are for a later session), so the **request** parser **rejects** a
//! mandatory-to-process option (code 0–127) with [`Error::UnsupportedOption`] — the server's
//! answer is UNSUPP_OPTION — and **keeps** optional ones (128–255) for the server to ignore. The
//! **response** parser keeps every option: a client ignores what it did not ask for.
//!
//! PEER (opcode 2) is not implemented: a request with it is [`Error::UnsupportedOpcode`], and a
//! response to it (which a client that never sends PEER does not expect) likewise.
//!
//! Version negotiation (§9): a request whose version is not 2 is [`Error::UnsupportedVersion`]
//! (version 0 is NAT-PMP: hand those bytes to [`super::natpmp`]); [`Error::server_result`] says
//! which result code a server answers each error with, or that it stays silent. A client that gets
//! a version-0 answer (a NAT-PMP-only gateway's Unsupported Version) sees
//! [`Error::UnsupportedVersion`]`(0)` and falls back to NAT-PMP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The PCP version this codec speaks.
pub const VERSION: u8 = 2;
/// The largest PCP message (RFC 6887 §7).
pub const MAX_MESSAGE: usize = 1100;
/// The common header's length (requests and responses alike).
pub const HEADER_LEN: usize = 24;
/// The MAP opcode's fields' length.
pub const MAP_LEN: usize = 36;
/// Opcode ANNOUNCE (RFC 6887 §14.1).
pub const OP_ANNOUNCE: u8 = 0;
/// Opcode MAP (RFC 6887 §11).
pub const OP_MAP: u8 = 1;
/// Opcode PEER (RFC 6887 §12), not implemented here.
pub const OP_PEER: u8 = 2;
/// The R bit: set in responses.
pub const RESPONSE_BIT: u8 = 0x80;

/// A PCP result code (RFC 6887 §7.4). Unknown values are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    /// 0
    Success,
    /// 1: the version is not supported.
    UnsuppVersion,
    /// 2: the client is not authorized for this request.
    NotAuthorized,
    /// 3: the request could not be parsed.
    MalformedRequest,
    /// 4: the opcode is not supported.
    UnsuppOpcode,
    /// 5: a mandatory option is not supported.
    UnsuppOption,
    /// 6: an option is malformed.
    MalformedOption,
    /// 7: the server or the network has a problem.
    NetworkFailure,
    /// 8: out of resources (short-lived).
    NoResources,
    /// 9: the protocol is not supported.
    UnsuppProtocol,
    /// 10: the user's quota is exceeded (long-lived).
    UserExQuota,
    /// 11: the suggested external address or port cannot be provided (PREFER_FAILURE).
    CannotProvideExternal,
    /// 12: the client address in the header is not the packet's source: there is a NAT between
    /// client and server (double NAT).
    AddressMismatch,
    /// 13: too many remote peers (FILTER).
    ExcessiveRemotePeers,
    /// Any other value.
    Other(u8),
}

impl ResultCode {
    /// The code's number on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::UnsuppVersion => 1,
            Self::NotAuthorized => 2,
            Self::MalformedRequest => 3,
            Self::UnsuppOpcode => 4,
            Self::UnsuppOption => 5,
            Self::MalformedOption => 6,
            Self::NetworkFailure => 7,
            Self::NoResources => 8,
            Self::UnsuppProtocol => 9,
            Self::UserExQuota => 10,
            Self::CannotProvideExternal => 11,
            Self::AddressMismatch => 12,
            Self::ExcessiveRemotePeers => 13,
            Self::Other(c) => c,
        }
    }

    /// The typed code for a wire number.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Success,
            1 => Self::UnsuppVersion,
            2 => Self::NotAuthorized,
            3 => Self::MalformedRequest,
            4 => Self::UnsuppOpcode,
            5 => Self::UnsuppOption,
            6 => Self::MalformedOption,
            7 => Self::NetworkFailure,
            8 => Self::NoResources,
            9 => Self::UnsuppProtocol,
            10 => Self::UserExQuota,
            11 => Self::CannotProvideExternal,
            12 => Self::AddressMismatch,
            13 => Self::ExcessiveRemotePeers,
            c => Self::Other(c),
        }
    }
}

/// Why bytes are not a PCP message of the expected direction, or cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the message needs.
    #[error("PCP message truncated: {got} bytes, need {need}")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Longer than 1100 bytes.
    #[error("PCP message of {0} bytes exceeds 1100")]
    Oversized(usize),
    /// Not a multiple of 4 bytes.
    #[error("PCP message of {0} bytes is not a multiple of 4")]
    Misaligned(usize),
    /// The version is not 2.
    #[error("PCP version {0} (this codec speaks 2)")]
    UnsupportedVersion(u8),
    /// An opcode this codec does not implement (PEER or unknown).
    #[error("PCP opcode {0} is not supported")]
    UnsupportedOpcode(u8),
    /// A mandatory-to-process option (code < 128) in a request.
    #[error("PCP option {0} is mandatory and not supported")]
    UnsupportedOption(u8),
    /// An option's length runs past the message.
    #[error("PCP option {code} is malformed")]
    MalformedOption {
        /// The option's code.
        code: u8,
    },
    /// A request parser got a response (R bit set): dropped silently (RFC 6887 §8.3).
    #[error("PCP message is a response, not a request")]
    NotARequest,
    /// A response parser got a request (R bit clear).
    #[error("PCP message is a request, not a response")]
    NotAResponse,
}

impl Error {
    /// What a server answers a request that failed with this error (RFC 6887 §8.3), or `None` when
    /// it must stay silent (a response, or fewer than 2 bytes).
    pub fn server_result(&self) -> Option<ResultCode> {
        match *self {
            Self::NotARequest | Self::NotAResponse => None,
            Self::Truncated { got, .. } if got < 2 => None,
            Self::Truncated { .. } | Self::Oversized(_) | Self::Misaligned(_) => {
                Some(ResultCode::MalformedRequest)
            }
            Self::UnsupportedVersion(_) => Some(ResultCode::UnsuppVersion),
            Self::UnsupportedOpcode(_) => Some(ResultCode::UnsuppOpcode),
            Self::UnsupportedOption(_) => Some(ResultCode::UnsuppOption),
            Self::MalformedOption { .. } => Some(ResultCode::MalformedOption),
        }
    }
}

/// The MAP opcode's 96-bit nonce (RFC 6887 §11.1): the client picks it at random and only the
/// holder of the nonce may change or delete the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Nonce(pub [u8; 12]);

/// An option, kept raw (RFC 6887 §7.3). `data` excludes padding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PcpOption {
    /// 0–127 mandatory to process, 128–255 optional.
    pub code: u8,
    /// The option's data, at most what fits in a 1100-byte message.
    pub data: Vec<u8>,
}

/// The MAP opcode's fields in a request (RFC 6887 §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapRequest {
    /// Mapping nonce.
    pub nonce: Nonce,
    /// IANA protocol number (6 TCP, 17 UDP); 0 means every protocol.
    pub protocol: u8,
    /// The client's port; 0 (with protocol 0) means every port.
    pub internal_port: u16,
    /// The external port the client would like; 0 for no preference.
    pub suggested_external_port: u16,
    /// The external address the client would like: `0.0.0.0` or `::` for no preference.
    pub suggested_external_address: IpAddr,
}

/// The MAP opcode's fields in a response (RFC 6887 §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapResponse {
    /// The request's nonce, echoed: a response with another nonce is not ours.
    pub nonce: Nonce,
    /// IANA protocol number, echoed.
    pub protocol: u8,
    /// The client's port, echoed.
    pub internal_port: u16,
    /// The external port assigned.
    pub assigned_external_port: u16,
    /// The external address assigned.
    pub assigned_external_address: IpAddr,
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestOp {
    /// ANNOUNCE: no fields.
    Announce,
    /// MAP: create, refresh or (lifetime 0) delete.
    Map(MapRequest),
}

/// A PCP request (client → server).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// Requested lifetime in seconds; 0 deletes (MAP) and is what ANNOUNCE sends.
    pub lifetime: u32,
    /// The client's address as the client sees it; a server compares it with the packet's source
    /// ([`address_mismatch`]).
    pub client_address: IpAddr,
    /// The opcode and its fields.
    pub op: RequestOp,
    /// Optional (code ≥ 128) options.
    pub options: Vec<PcpOption>,
}

/// What a response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseOp {
    /// ANNOUNCE.
    Announce,
    /// MAP.
    Map(MapResponse),
    /// An error answer with only the common header (the server could not copy the request, e.g.
    /// UNSUPP_VERSION or UNSUPP_OPCODE); `opcode` is the one answered, never ANNOUNCE (whose
    /// answer is always just the header, so it parses as [`ResponseOp::Announce`]).
    Bare {
        /// The opcode answered.
        opcode: u8,
    },
}

/// A PCP response (server → client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Response {
    /// Result code.
    pub result: ResultCode,
    /// Granted lifetime on success; on error, how long the error is expected to last.
    pub lifetime: u32,
    /// The server's epoch (seconds); a jump backwards means it lost its mappings (§8.5).
    pub epoch: u32,
    /// The opcode's fields.
    pub op: ResponseOp,
    /// Every option, kept raw.
    pub options: Vec<PcpOption>,
}

impl Request {
    /// Parses a request, as a server does. See the module comment for option handling.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let (version, opcode) = header(bytes)?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        if opcode & RESPONSE_BIT != 0 {
            return Err(Error::NotARequest);
        }
        check_length(bytes)?;
        let lifetime = be32(bytes, 4);
        let client_address = addr(bytes, 8);
        let (op, rest) = match opcode {
            OP_ANNOUNCE => (RequestOp::Announce, &bytes[HEADER_LEN..]),
            OP_MAP => {
                let body = need(bytes, HEADER_LEN + MAP_LEN)?;
                let map = MapRequest {
                    nonce: nonce(body),
                    protocol: body[12],
                    internal_port: be16(body, 16),
                    suggested_external_port: be16(body, 18),
                    suggested_external_address: addr(body, 20),
                };
                (RequestOp::Map(map), &bytes[HEADER_LEN + MAP_LEN..])
            }
            other => return Err(Error::UnsupportedOpcode(other)),
        };
        let options = parse_options(rest)?;
        if let Some(o) = options.iter().find(|o| o.code < 128) {
            return Err(Error::UnsupportedOption(o.code));
        }
        Ok(Self {
            lifetime,
            client_address,
            op,
            options,
        })
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        match self.op {
            RequestOp::Announce => OP_ANNOUNCE,
            RequestOp::Map(_) => OP_MAP,
        }
    }

    /// True for a MAP that deletes (lifetime 0, RFC 6887 §15).
    pub fn is_delete(&self) -> bool {
        matches!(self.op, RequestOp::Map(_)) && self.lifetime == 0
    }

    /// The request's bytes; [`Error::Oversized`] if the options do not fit in 1100 bytes.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(HEADER_LEN + MAP_LEN);
        out.extend_from_slice(&[VERSION, self.opcode(), 0, 0]);
        out.extend_from_slice(&self.lifetime.to_be_bytes());
        out.extend_from_slice(&addr_bytes(self.client_address));
        if let RequestOp::Map(m) = &self.op {
            out.extend_from_slice(&m.nonce.0);
            out.extend_from_slice(&[m.protocol, 0, 0, 0]);
            out.extend_from_slice(&m.internal_port.to_be_bytes());
            out.extend_from_slice(&m.suggested_external_port.to_be_bytes());
            out.extend_from_slice(&addr_bytes(m.suggested_external_address));
        }
        encode_options(&mut out, &self.options)?;
        Ok(out)
    }
}

impl Response {
    /// Parses a response, as a client does. Every option is kept.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let (version, opcode) = header(bytes)?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        if opcode & RESPONSE_BIT == 0 {
            return Err(Error::NotAResponse);
        }
        let opcode = opcode & !RESPONSE_BIT;
        check_length(bytes)?;
        let result = ResultCode::from_code(bytes[3]);
        let lifetime = be32(bytes, 4);
        let epoch = be32(bytes, 8);
        // Bytes 12..24 are reserved. An ANNOUNCE answer is complete at 24 bytes whatever its
        // result, so only other opcodes have a bare form.
        let bare =
            bytes.len() == HEADER_LEN && result != ResultCode::Success && opcode != OP_ANNOUNCE;
        let (op, rest) = match opcode {
            _ if bare => (ResponseOp::Bare { opcode }, &bytes[HEADER_LEN..]),
            OP_ANNOUNCE => (ResponseOp::Announce, &bytes[HEADER_LEN..]),
            OP_MAP => {
                let body = need(bytes, HEADER_LEN + MAP_LEN)?;
                let map = MapResponse {
                    nonce: nonce(body),
                    protocol: body[12],
                    internal_port: be16(body, 16),
                    assigned_external_port: be16(body, 18),
                    assigned_external_address: addr(body, 20),
                };
                (ResponseOp::Map(map), &bytes[HEADER_LEN + MAP_LEN..])
            }
            other => return Err(Error::UnsupportedOpcode(other)),
        };
        Ok(Self {
            result,
            lifetime,
            epoch,
            op,
            options: parse_options(rest)?,
        })
    }

    /// The opcode answered.
    pub fn opcode(&self) -> u8 {
        match self.op {
            ResponseOp::Announce => OP_ANNOUNCE,
            ResponseOp::Map(_) => OP_MAP,
            ResponseOp::Bare { opcode } => opcode & !RESPONSE_BIT,
        }
    }

    /// The response's bytes; [`Error::Oversized`] if the options do not fit in 1100 bytes.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(HEADER_LEN + MAP_LEN);
        out.extend_from_slice(&[VERSION, RESPONSE_BIT | self.opcode(), 0, self.result.code()]);
        out.extend_from_slice(&self.lifetime.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        if let ResponseOp::Map(m) = &self.op {
            out.extend_from_slice(&m.nonce.0);
            out.extend_from_slice(&[m.protocol, 0, 0, 0]);
            out.extend_from_slice(&m.internal_port.to_be_bytes());
            out.extend_from_slice(&m.assigned_external_port.to_be_bytes());
            out.extend_from_slice(&addr_bytes(m.assigned_external_address));
        }
        encode_options(&mut out, &self.options)?;
        Ok(out)
    }
}

impl MapRequest {
    /// The MAP fields of the answer to this request (server side): nonce, protocol and internal
    /// port echoed, and the assigned external port and address — on an error, the suggested ones,
    /// since an error answer copies the request's fields (RFC 6887 §7.2, §11.4).
    pub fn answer(&self, assigned: Option<(u16, IpAddr)>) -> MapResponse {
        let (port, address) = assigned.unwrap_or((
            self.suggested_external_port,
            self.suggested_external_address,
        ));
        MapResponse {
            nonce: self.nonce,
            protocol: self.protocol,
            internal_port: self.internal_port,
            assigned_external_port: port,
            assigned_external_address: address,
        }
    }
}

impl MapResponse {
    /// True when this answers `request` (client side, RFC 6887 §11.4): same nonce, protocol and
    /// internal port. Anything else is someone else's answer (or a forgery) and is dropped.
    pub fn answers(&self, request: &MapRequest) -> bool {
        self.nonce == request.nonce
            && self.protocol == request.protocol
            && self.internal_port == request.internal_port
    }
}

/// True when the request's client address is not the packet's source address: the server then
/// answers ADDRESS_MISMATCH (RFC 6887 §8.3), which tells the client a NAT sits between them.
pub fn address_mismatch(request: &Request, source: IpAddr) -> bool {
    request.client_address != source.to_canonical()
}

fn header(bytes: &[u8]) -> Result<(u8, u8), Error> {
    match bytes {
        [version, opcode, ..] => Ok((*version, *opcode)),
        _ => Err(Error::Truncated {
            got: bytes.len(),
            need: 2,
        }),
    }
}

fn check_length(bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() > MAX_MESSAGE {
        return Err(Error::Oversized(bytes.len()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(Error::Truncated {
            got: bytes.len(),
            need: HEADER_LEN,
        });
    }
    if bytes.len() % 4 != 0 {
        return Err(Error::Misaligned(bytes.len()));
    }
    Ok(())
}

/// The opcode fields, `HEADER_LEN..len`, or `Truncated`.
fn need(bytes: &[u8], len: usize) -> Result<&[u8], Error> {
    bytes.get(HEADER_LEN..len).ok_or(Error::Truncated {
        got: bytes.len(),
        need: len,
    })
}

fn parse_options(mut rest: &[u8]) -> Result<Vec<PcpOption>, Error> {
    let mut options = Vec::new();
    while let [code, _reserved, l0, l1, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        let padded = len.div_ceil(4) * 4;
        let Some(data) = tail.get(..len) else {
            return Err(Error::MalformedOption { code: *code });
        };
        options.push(PcpOption {
            code: *code,
            data: data.to_vec(),
        });
        // The message length is a multiple of 4, so the padded option fits when its data does
        // and the padding is there; otherwise the option is malformed.
        rest = tail
            .get(padded..)
            .ok_or(Error::MalformedOption { code: *code })?;
    }
    // `check_length` made the message a multiple of 4 and every option is too: nothing is left.
    Ok(options)
}

fn encode_options(out: &mut Vec<u8>, options: &[PcpOption]) -> Result<(), Error> {
    for o in options {
        let len = u16::try_from(o.data.len())
            .map_err(|_| Error::Oversized(out.len() + 4 + o.data.len()))?;
        out.extend_from_slice(&[o.code, 0]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&o.data);
        out.resize(out.len() + (4 - o.data.len() % 4) % 4, 0);
        if out.len() > MAX_MESSAGE {
            return Err(Error::Oversized(out.len()));
        }
    }
    Ok(())
}

fn nonce(body: &[u8]) -> Nonce {
    let mut n = [0; 12];
    if let Some(b) = body.get(..12) {
        n.copy_from_slice(b);
    }
    Nonce(n)
}

/// A 128-bit address at `at`, IPv4-mapped ones as IPv4.
fn addr(b: &[u8], at: usize) -> IpAddr {
    let mut a = [0; 16];
    if let Some(s) = b.get(at..at + 16) {
        a.copy_from_slice(s);
    }
    IpAddr::V6(Ipv6Addr::from(a)).to_canonical()
}

fn addr_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Callers check the length first; out-of-range reads give 0 rather than panic.
fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[a, b2, c, d]) => u32::from_be_bytes([a, b2, c, d]),
        _ => 0,
    }
}

/// The IPv4 "no preference" address for a MAP request's suggested external address.
pub const ANY_V4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: Nonce = Nonce([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);

    /// RFC 6887 Figure 2 + Figure 9, written out: MAP UDP 192.168.1.10:5000, suggest port 6000,
    /// any IPv4 address, lifetime 7200.
    fn map_request_bytes() -> Vec<u8> {
        let mut b = vec![2, 1, 0, 0, 0, 0, 0x1c, 0x20];
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 10]);
        b.extend_from_slice(&NONCE.0);
        b.extend_from_slice(&[17, 0, 0, 0, 0x13, 0x88, 0x17, 0x70]);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]);
        b
    }

    fn map_request() -> Request {
        Request {
            lifetime: 7200,
            client_address: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
            op: RequestOp::Map(MapRequest {
                nonce: NONCE,
                protocol: 17,
                internal_port: 5000,
                suggested_external_port: 6000,
                suggested_external_address: ANY_V4,
            }),
            options: vec![],
        }
    }

    #[test]
    fn map_request_written_out_from_rfc_figures() {
        let bytes = map_request_bytes();
        assert_eq!(bytes.len(), 60);
        assert_eq!(Request::parse(&bytes), Ok(map_request()));
        assert_eq!(map_request().encode(), Ok(bytes));
    }

    #[test]
    fn map_response_written_out() {
        // Figure 3 + Figure 10: success, lifetime 3600, epoch 99, assigned 203.0.113.7:40000.
        let mut b = vec![2, 0x81, 0, 0, 0, 0, 0x0e, 0x10, 0, 0, 0, 99];
        b.extend_from_slice(&[0; 12]);
        b.extend_from_slice(&NONCE.0);
        b.extend_from_slice(&[17, 0, 0, 0, 0x13, 0x88, 0x9c, 0x40]);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7]);
        let want = Response {
            result: ResultCode::Success,
            lifetime: 3600,
            epoch: 99,
            op: ResponseOp::Map(MapResponse {
                nonce: NONCE,
                protocol: 17,
                internal_port: 5000,
                assigned_external_port: 40000,
                assigned_external_address: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
            }),
            options: vec![],
        };
        assert_eq!(Response::parse(&b), Ok(want.clone()));
        assert_eq!(want.encode(), Ok(b));
    }

    #[test]
    fn announce_round_trips_and_is_the_bare_header() {
        let req = Request {
            lifetime: 0,
            client_address: IpAddr::V6("2001:db8::1".parse().unwrap_or(Ipv6Addr::LOCALHOST)),
            op: RequestOp::Announce,
            options: vec![],
        };
        let bytes = req.encode();
        assert_eq!(bytes.as_ref().map(Vec::len), Ok(HEADER_LEN));
        assert_eq!(bytes.and_then(|b| Request::parse(&b)), Ok(req));
        let resp = Response {
            result: ResultCode::Success,
            lifetime: 0,
            epoch: 5,
            op: ResponseOp::Announce,
            options: vec![],
        };
        assert_eq!(resp.encode().and_then(|b| Response::parse(&b)), Ok(resp));
    }

    #[test]
    fn address_mismatch_answer_round_trips() {
        // A NAT between client and server rewrote the source: the server says ADDRESS_MISMATCH.
        let req = map_request();
        assert!(address_mismatch(
            &req,
            IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2))
        ));
        assert!(!address_mismatch(
            &req,
            IpAddr::V6(Ipv4Addr::new(192, 168, 1, 10).to_ipv6_mapped())
        ));
        let mut resp =
            Response::parse(&[&[2u8, 0x81, 0, 12, 0, 0, 0, 30, 0, 0, 0, 1][..], &[0; 12]].concat());
        assert_eq!(
            resp.as_ref().map(|r| (r.result, r.op)),
            Ok((ResultCode::AddressMismatch, ResponseOp::Bare { opcode: 1 }))
        );
        if let Ok(r) = resp.as_mut() {
            assert_eq!(r.encode().and_then(|b| Response::parse(&b)), Ok(r.clone()));
        }
    }

    #[test]
    fn answers_echo_the_request_and_match_only_it() {
        let RequestOp::Map(m) = map_request().op else {
            panic!("map_request is a MAP");
        };
        let ext = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        let ok = m.answer(Some((40000, ext)));
        assert!(ok.answers(&m));
        assert_eq!(
            (ok.assigned_external_port, ok.assigned_external_address),
            (40000, ext)
        );
        let refused = m.answer(None);
        assert_eq!(
            (
                refused.assigned_external_port,
                refused.assigned_external_address
            ),
            (6000, ANY_V4)
        );
        let mut other = m;
        other.nonce.0[11] ^= 1;
        assert!(!ok.answers(&other));
        other = m;
        other.internal_port += 1;
        assert!(!ok.answers(&other));
        other = m;
        other.protocol = 6;
        assert!(!ok.answers(&other));
    }

    #[test]
    fn options_optional_kept_mandatory_rejected_in_requests() {
        let mut req = map_request();
        req.options = vec![PcpOption {
            code: 200,
            data: vec![1, 2, 3, 4, 5],
        }];
        let bytes = req.encode();
        assert_eq!(bytes.as_ref().map(Vec::len), Ok(60 + 4 + 8));
        assert_eq!(bytes.and_then(|b| Request::parse(&b)), Ok(req.clone()));
        // PREFER_FAILURE (2) is mandatory and not implemented: UNSUPP_OPTION.
        req.options = vec![PcpOption {
            code: 2,
            data: vec![],
        }];
        let err = req.encode().and_then(|b| Request::parse(&b));
        assert_eq!(err, Err(Error::UnsupportedOption(2)));
        assert_eq!(
            err.err().and_then(|e| e.server_result()),
            Some(ResultCode::UnsuppOption)
        );
        // Responses keep every option.
        let mut b = map_request_bytes();
        b[1] |= RESPONSE_BIT;
        b.extend_from_slice(&[2, 0, 0, 0]);
        assert_eq!(
            Response::parse(&b).map(|r| r.options),
            Ok(vec![PcpOption {
                code: 2,
                data: vec![]
            }])
        );
    }

    #[test]
    fn encoders_refuse_more_than_1100_bytes() {
        let mut req = map_request();
        req.options = vec![PcpOption {
            code: 128,
            data: vec![0; 1100 - 60 - 4 + 1],
        }];
        assert_eq!(req.encode(), Err(Error::Oversized(1100 + 4)));
        req.options[0].data.pop();
        assert_eq!(req.encode().map(|b| b.len()), Ok(1100));
        req.options[0].data = vec![0; 70_000];
        assert_eq!(req.encode(), Err(Error::Oversized(60 + 4 + 70_000)));
    }

    #[test]
    fn malformed_option_is_typed() {
        let mut b = map_request_bytes();
        b.extend_from_slice(&[200, 0, 0, 9, 1, 2, 3, 4]);
        assert_eq!(
            Request::parse(&b),
            Err(Error::MalformedOption { code: 200 })
        );
        assert_eq!(
            Error::MalformedOption { code: 200 }.server_result(),
            Some(ResultCode::MalformedOption)
        );
    }

    #[test]
    fn bad_requests_give_typed_errors() {
        let good = map_request_bytes();
        assert_eq!(
            Request::parse(&good[..1]),
            Err(Error::Truncated { got: 1, need: 2 })
        );
        assert_eq!(Error::Truncated { got: 1, need: 2 }.server_result(), None);
        assert_eq!(
            Request::parse(&good[..20]),
            Err(Error::Truncated { got: 20, need: 24 })
        );
        assert_eq!(
            Request::parse(&good[..40]),
            Err(Error::Truncated { got: 40, need: 60 })
        );
        assert_eq!(Request::parse(&good[..59]), Err(Error::Misaligned(59)));
        let mut big = good.clone();
        big.resize(1104, 0);
        assert_eq!(Request::parse(&big), Err(Error::Oversized(1104)));
        let mut v = good.clone();
        v[0] = 0;
        assert_eq!(Request::parse(&v), Err(Error::UnsupportedVersion(0)));
        v[0] = 3;
        assert_eq!(
            Request::parse(&v).err().and_then(|e| e.server_result()),
            Some(ResultCode::UnsuppVersion)
        );
        let mut op = good.clone();
        op[1] = OP_PEER;
        assert_eq!(Request::parse(&op), Err(Error::UnsupportedOpcode(2)));
        op[1] = 0x81;
        assert_eq!(Request::parse(&op), Err(Error::NotARequest));
        assert_eq!(Error::NotARequest.server_result(), None);
    }

    #[test]
    fn bad_responses_give_typed_errors() {
        assert_eq!(
            Response::parse(&map_request_bytes()),
            Err(Error::NotAResponse)
        );
        // A NAT-PMP gateway's Unsupported Version answer: fall back to NAT-PMP.
        assert_eq!(
            Response::parse(&[0, 0x81, 0, 1, 0, 0, 0, 9]),
            Err(Error::UnsupportedVersion(0))
        );
        let mut short = vec![2, 0x81, 0, 0];
        short.resize(24, 0);
        assert_eq!(
            Response::parse(&short),
            Err(Error::Truncated { got: 24, need: 60 })
        );
        short[1] = 0x85;
        short[3] = 0;
        short.resize(28, 0);
        assert_eq!(Response::parse(&short), Err(Error::UnsupportedOpcode(5)));
    }

    #[test]
    fn result_codes_keep_their_rfc_numbers() {
        for code in 0..=20u8 {
            assert_eq!(ResultCode::from_code(code).code(), code);
        }
        assert_eq!(ResultCode::AddressMismatch.code(), 12);
        assert_eq!(ResultCode::UnsuppVersion.code(), 1);
        assert_eq!(ResultCode::from_code(13), ResultCode::ExcessiveRemotePeers);
    }
}
