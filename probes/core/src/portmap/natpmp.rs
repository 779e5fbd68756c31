//! NAT-PMP (RFC 6886) messages, both directions: the client's requests and the gateway's responses.
//!
//! Four messages exist (RFC 6886 §3.2, §3.3), all big-endian, version 0:
//!
//! | message | layout | length |
//! |---|---|---|
//! | external-address request | vers, op=0 | 2 |
//! | external-address response | vers, op=128, result, epoch, external IPv4 | 12 |
//! | map request (UDP op=1, TCP op=2) | vers, op, reserved, internal port, suggested external port, lifetime | 12 |
//! | map response | vers, op=128+op, result, epoch, internal port, mapped external port, lifetime | 16 |
//!
//! A mapping is deleted by a map request with lifetime 0 (RFC 6886 §3.4); internal port 0 as well means
//! "every mapping of this protocol". Lengths are checked exactly: a known opcode with extra or missing bytes
//! is an error, not something to guess about. An error answer may also be only the 8-byte common part
//! (vers, op, result, epoch), as RFC 6886 §3.5's Unsupported Version answer is; [`Response::Error`] is
//! that form, for any opcode (known or not) with a non-zero result code.

use std::net::Ipv4Addr;

use super::MapProtocol;

/// The only NAT-PMP version (RFC 6886 §3).
pub const VERSION: u8 = 0;
/// The UDP port a NAT-PMP (and PCP) server listens on (RFC 6886 §3.1; RFC 6887 §19.1).
pub const SERVER_PORT: u16 = 5351;
/// The port a client listens on for the gateway's external-address announcements (RFC 6886 §3.2.1).
pub const CLIENT_ANNOUNCE_PORT: u16 = 5350;
/// Opcode of the external-address request.
pub const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode of the UDP map request.
pub const OP_MAP_UDP: u8 = 1;
/// Opcode of the TCP map request.
pub const OP_MAP_TCP: u8 = 2;
/// Added to the request's opcode in every response (RFC 6886 §3.2).
pub const RESPONSE_BIT: u8 = 128;
/// The lifetime RFC 6886 §3.3 recommends a client asks for: two hours.
pub const RECOMMENDED_LIFETIME: u32 = 7200;

/// A NAT-PMP result code (RFC 6886 §3.5). Unknown codes are kept, not rejected: a client treats
/// them as a failure it can still report by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    /// 0
    Success,
    /// 1: the request's version is not 0.
    UnsupportedVersion,
    /// 2: not authorized or refused (the box supports mapping but it is turned off).
    NotAuthorized,
    /// 3: network failure (the gateway has no DHCP address yet, …).
    NetworkFailure,
    /// 4: out of resources (no ports left, too many mappings).
    OutOfResources,
    /// 5: unsupported opcode.
    UnsupportedOpcode,
    /// Any other value.
    Other(u16),
}

impl ResultCode {
    /// The code's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            Self::Success => 0,
            Self::UnsupportedVersion => 1,
            Self::NotAuthorized => 2,
            Self::NetworkFailure => 3,
            Self::OutOfResources => 4,
            Self::UnsupportedOpcode => 5,
            Self::Other(c) => c,
        }
    }

    /// The typed code for a wire number.
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Success,
            1 => Self::UnsupportedVersion,
            2 => Self::NotAuthorized,
            3 => Self::NetworkFailure,
            4 => Self::OutOfResources,
            5 => Self::UnsupportedOpcode,
            c => Self::Other(c),
        }
    }
}

/// Why bytes are not a NAT-PMP message of the expected direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the message needs.
    #[error("NAT-PMP message truncated: {got} bytes, need {need}")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the message needs.
        need: usize,
    },
    /// More bytes than the opcode's message has.
    #[error("NAT-PMP message too long: {got} bytes, opcode {opcode} has {expected}")]
    Oversized {
        /// The opcode (without the response bit).
        opcode: u8,
        /// Bytes received.
        got: usize,
        /// The opcode's length.
        expected: usize,
    },
    /// The version byte is not 0. A server answers a request with [`ResultCode::UnsupportedVersion`]
    /// (version 2 is PCP: RFC 6887 §9 hands those to the PCP codec).
    #[error("NAT-PMP version {0} (only 0 exists)")]
    UnsupportedVersion(u8),
    /// A request's opcode is not 0, 1 or 2: a server answers [`ResultCode::UnsupportedOpcode`].
    #[error("NAT-PMP opcode {0} is not supported")]
    UnsupportedOpcode(u8),
    /// A request parser got a response (opcode ≥ 128): RFC 6886 §3.5 says ignore it silently.
    #[error("NAT-PMP message is a response, not a request")]
    NotARequest,
    /// A response parser got a request (opcode < 128).
    #[error("NAT-PMP message is a request, not a response")]
    NotAResponse,
}

impl Error {
    /// What a gateway answers a request that failed with this error (RFC 6886 §3.5), or `None` when
    /// it stays silent: a response sent to it, or bytes too short or long to be a request (RFC 6886
    /// has no "malformed" code).
    pub fn server_result(&self) -> Option<ResultCode> {
        match self {
            Self::UnsupportedVersion(_) => Some(ResultCode::UnsupportedVersion),
            Self::UnsupportedOpcode(_) => Some(ResultCode::UnsupportedOpcode),
            Self::Truncated { .. }
            | Self::Oversized { .. }
            | Self::NotARequest
            | Self::NotAResponse => None,
        }
    }
}

/// A NAT-PMP request (client → gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// "What is your external address?" (op 0).
    ExternalAddress,
    /// Create, refresh or (lifetime 0) delete a mapping (op 1 UDP, op 2 TCP).
    Map {
        /// UDP (op 1) or TCP (op 2).
        protocol: MapProtocol,
        /// The client's port; 0 with lifetime 0 deletes every mapping of `protocol`.
        internal_port: u16,
        /// The external port the client would like; 0 for no preference.
        suggested_external_port: u16,
        /// Requested lifetime in seconds; 0 deletes.
        lifetime: u32,
    },
}

impl Request {
    /// Parses a request, as a gateway does.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let (version, opcode) = header(bytes)?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        if opcode >= RESPONSE_BIT {
            return Err(Error::NotARequest);
        }
        match opcode {
            OP_EXTERNAL_ADDRESS => {
                exact(bytes, opcode, 2)?;
                Ok(Self::ExternalAddress)
            }
            OP_MAP_UDP | OP_MAP_TCP => {
                exact(bytes, opcode, 12)?;
                // Bytes 2..4 are reserved: zero on transmission, ignored on reception.
                Ok(Self::Map {
                    protocol: protocol_of(opcode),
                    internal_port: be16(bytes, 4),
                    suggested_external_port: be16(bytes, 6),
                    lifetime: be32(bytes, 8),
                })
            }
            other => Err(Error::UnsupportedOpcode(other)),
        }
    }

    /// The request's opcode.
    pub fn opcode(&self) -> u8 {
        match self {
            Self::ExternalAddress => OP_EXTERNAL_ADDRESS,
            Self::Map { protocol, .. } => opcode_of(*protocol),
        }
    }

    /// True for a map request that deletes (lifetime 0, RFC 6886 §3.4).
    pub fn is_delete(&self) -> bool {
        matches!(self, Self::Map { lifetime: 0, .. })
    }

    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Self::ExternalAddress => vec![VERSION, OP_EXTERNAL_ADDRESS],
            Self::Map {
                protocol,
                internal_port,
                suggested_external_port,
                lifetime,
            } => {
                let mut out = Vec::with_capacity(12);
                out.extend_from_slice(&[VERSION, opcode_of(protocol), 0, 0]);
                out.extend_from_slice(&internal_port.to_be_bytes());
                out.extend_from_slice(&suggested_external_port.to_be_bytes());
                out.extend_from_slice(&lifetime.to_be_bytes());
                out
            }
        }
    }
}

/// A NAT-PMP response (gateway → client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Response {
    /// Answer to [`Request::ExternalAddress`] (op 128). With a non-zero result the address is
    /// undefined (RFC 6886 §3.2) and parsed as sent.
    ExternalAddress {
        /// Result code.
        result: ResultCode,
        /// Seconds since the gateway's mapping table was (re)initialised.
        epoch: u32,
        /// The gateway's external IPv4 address.
        address: Ipv4Addr,
    },
    /// Answer to [`Request::Map`] (op 129 or 130).
    Map {
        /// Result code.
        result: ResultCode,
        /// Seconds since the gateway's mapping table was (re)initialised.
        epoch: u32,
        /// UDP or TCP.
        protocol: MapProtocol,
        /// The client's port, echoed.
        internal_port: u16,
        /// The external port the gateway assigned (0 after a deletion).
        external_port: u16,
        /// The granted lifetime in seconds (0 after a deletion).
        lifetime: u32,
    },
    /// The 8-byte error form: the common part only, result non-zero (e.g. Unsupported Version).
    Error {
        /// The opcode answered, without the response bit.
        opcode: u8,
        /// Result code (never [`ResultCode::Success`]).
        result: ResultCode,
        /// Seconds since the gateway's mapping table was (re)initialised.
        epoch: u32,
    },
}

impl Response {
    /// Parses a response, as a client does.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let (version, op) = header(bytes)?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        if op < RESPONSE_BIT {
            // RFC 6886 §3.5's figure showed the Unsupported Version answer with OP = 0; erratum
            // 3618 corrected it to 128, but gateways built from the figure send 0. That exact
            // 8-byte form is read as the answer it is; every other op < 128 is a request.
            if op == OP_EXTERNAL_ADDRESS && bytes.len() == 8 && be16(bytes, 2) == 1 {
                return Ok(Self::Error {
                    opcode: OP_EXTERNAL_ADDRESS,
                    result: ResultCode::UnsupportedVersion,
                    epoch: be32(bytes, 4),
                });
            }
            return Err(Error::NotAResponse);
        }
        let opcode = op - RESPONSE_BIT;
        if bytes.len() < 8 {
            return Err(Error::Truncated {
                got: bytes.len(),
                need: 8,
            });
        }
        let result = ResultCode::from_code(be16(bytes, 2));
        let epoch = be32(bytes, 4);
        let full = match opcode {
            OP_EXTERNAL_ADDRESS => 12,
            OP_MAP_UDP | OP_MAP_TCP => 16,
            _ => 8,
        };
        if bytes.len() == 8 && result != ResultCode::Success {
            return Ok(Self::Error {
                opcode,
                result,
                epoch,
            });
        }
        if full == 8 {
            // An opcode this codec does not know: only its error form is meaningful.
            return if result == ResultCode::Success {
                Err(Error::UnsupportedOpcode(opcode))
            } else {
                Err(Error::Oversized {
                    opcode,
                    got: bytes.len(),
                    expected: 8,
                })
            };
        }
        exact(bytes, opcode, full)?;
        if opcode == OP_EXTERNAL_ADDRESS {
            Ok(Self::ExternalAddress {
                result,
                epoch,
                address: Ipv4Addr::new(bytes[8], bytes[9], bytes[10], bytes[11]),
            })
        } else {
            Ok(Self::Map {
                result,
                epoch,
                protocol: protocol_of(opcode),
                internal_port: be16(bytes, 8),
                external_port: be16(bytes, 10),
                lifetime: be32(bytes, 12),
            })
        }
    }

    /// The response's result code.
    pub fn result(&self) -> ResultCode {
        match *self {
            Self::ExternalAddress { result, .. }
            | Self::Map { result, .. }
            | Self::Error { result, .. } => result,
        }
    }

    /// The gateway's epoch (seconds since its table started): a drop means it rebooted and lost
    /// every mapping (RFC 6886 §3.6).
    pub fn epoch(&self) -> u32 {
        match *self {
            Self::ExternalAddress { epoch, .. }
            | Self::Map { epoch, .. }
            | Self::Error { epoch, .. } => epoch,
        }
    }

    /// The opcode answered, without the response bit.
    pub fn opcode(&self) -> u8 {
        match *self {
            Self::ExternalAddress { .. } => OP_EXTERNAL_ADDRESS,
            Self::Map { protocol, .. } => opcode_of(protocol),
            Self::Error { opcode, .. } => opcode & !RESPONSE_BIT,
        }
    }

    /// The response's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&[VERSION, RESPONSE_BIT | self.opcode()]);
        out.extend_from_slice(&self.result().code().to_be_bytes());
        out.extend_from_slice(&self.epoch().to_be_bytes());
        match *self {
            Self::ExternalAddress { address, .. } => out.extend_from_slice(&address.octets()),
            Self::Map {
                internal_port,
                external_port,
                lifetime,
                ..
            } => {
                out.extend_from_slice(&internal_port.to_be_bytes());
                out.extend_from_slice(&external_port.to_be_bytes());
                out.extend_from_slice(&lifetime.to_be_bytes());
            }
            Self::Error { .. } => {}
        }
        out
    }
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

fn exact(bytes: &[u8], opcode: u8, len: usize) -> Result<(), Error> {
    if bytes.len() < len {
        Err(Error::Truncated {
            got: bytes.len(),
            need: len,
        })
    } else if bytes.len() > len {
        Err(Error::Oversized {
            opcode,
            got: bytes.len(),
            expected: len,
        })
    } else {
        Ok(())
    }
}

fn protocol_of(opcode: u8) -> MapProtocol {
    if opcode == OP_MAP_TCP {
        MapProtocol::Tcp
    } else {
        MapProtocol::Udp
    }
}

fn opcode_of(protocol: MapProtocol) -> u8 {
    match protocol {
        MapProtocol::Udp => OP_MAP_UDP,
        MapProtocol::Tcp => OP_MAP_TCP,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_address_request_is_two_bytes() {
        assert_eq!(Request::ExternalAddress.encode(), [0, 0]);
        assert_eq!(Request::parse(&[0, 0]), Ok(Request::ExternalAddress));
    }

    #[test]
    fn public_address_response_written_out_from_rfc_figure() {
        // RFC 6886 §3.2: vers 0, op 128, result 0, epoch, external address 203.0.113.7.
        let bytes = [0, 128, 0, 0, 0, 0, 0x0e, 0x10, 203, 0, 113, 7];
        let r = Response::parse(&bytes);
        assert_eq!(
            r,
            Ok(Response::ExternalAddress {
                result: ResultCode::Success,
                epoch: 3600,
                address: Ipv4Addr::new(203, 0, 113, 7),
            })
        );
        assert_eq!(r.map(|r| r.encode()), Ok(bytes.to_vec()));
    }

    #[test]
    fn map_request_and_response_written_out() {
        // RFC 6886 §3.3: UDP map of internal 5000, suggested 6000, lifetime 7200.
        let req = [0, 1, 0, 0, 0x13, 0x88, 0x17, 0x70, 0, 0, 0x1c, 0x20];
        let parsed = Request::parse(&req);
        assert_eq!(
            parsed,
            Ok(Request::Map {
                protocol: MapProtocol::Udp,
                internal_port: 5000,
                suggested_external_port: 6000,
                lifetime: 7200,
            })
        );
        assert_eq!(parsed.map(|r| r.encode()), Ok(req.to_vec()));
        // Response, TCP (op 130), mapped to 40000, lifetime 3600, epoch 42.
        let resp = [
            0, 130, 0, 0, 0, 0, 0, 42, 0x13, 0x88, 0x9c, 0x40, 0, 0, 0x0e, 0x10,
        ];
        let parsed = Response::parse(&resp);
        assert_eq!(
            parsed,
            Ok(Response::Map {
                result: ResultCode::Success,
                epoch: 42,
                protocol: MapProtocol::Tcp,
                internal_port: 5000,
                external_port: 40000,
                lifetime: 3600,
            })
        );
        assert_eq!(parsed.map(|r| r.encode()), Ok(resp.to_vec()));
    }

    #[test]
    fn deletion_is_lifetime_zero() {
        let del = Request::Map {
            protocol: MapProtocol::Tcp,
            internal_port: 0,
            suggested_external_port: 0,
            lifetime: 0,
        };
        assert!(del.is_delete());
        assert_eq!(del.encode(), [0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!Request::ExternalAddress.is_delete());
    }

    #[test]
    fn bad_requests_give_typed_errors() {
        assert_eq!(
            Request::parse(&[0]),
            Err(Error::Truncated { got: 1, need: 2 })
        );
        assert_eq!(
            Request::parse(&[0, 1, 0, 0]),
            Err(Error::Truncated { got: 4, need: 12 })
        );
        assert_eq!(
            Request::parse(&[0, 0, 0]),
            Err(Error::Oversized {
                opcode: 0,
                got: 3,
                expected: 2
            })
        );
        assert_eq!(
            Request::parse(&[2, 1, 0, 0]),
            Err(Error::UnsupportedVersion(2))
        );
        assert_eq!(Request::parse(&[0, 3]), Err(Error::UnsupportedOpcode(3)));
        assert_eq!(Request::parse(&[0, 128]), Err(Error::NotARequest));
        assert_eq!(
            Error::UnsupportedVersion(2).server_result(),
            Some(ResultCode::UnsupportedVersion)
        );
        assert_eq!(
            Error::UnsupportedOpcode(9).server_result(),
            Some(ResultCode::UnsupportedOpcode)
        );
        assert_eq!(Error::NotARequest.server_result(), None);
    }

    #[test]
    fn bad_responses_give_typed_errors() {
        assert_eq!(Response::parse(&[0, 0]), Err(Error::NotAResponse));
        assert_eq!(
            Response::parse(&[0, 128, 0, 0]),
            Err(Error::Truncated { got: 4, need: 8 })
        );
        // A success must be complete: 8 bytes of op 128 with result 0 is truncated.
        assert_eq!(
            Response::parse(&[0, 128, 0, 0, 0, 0, 0, 1]),
            Err(Error::Truncated { got: 8, need: 12 })
        );
        let mut long = vec![0, 129, 0, 0, 0, 0, 0, 1];
        long.extend_from_slice(&[0; 9]);
        assert_eq!(
            Response::parse(&long),
            Err(Error::Oversized {
                opcode: 1,
                got: 17,
                expected: 16
            })
        );
        assert_eq!(
            Response::parse(&[2, 128, 0, 0, 0, 0, 0, 1]),
            Err(Error::UnsupportedVersion(2))
        );
        assert_eq!(
            Response::parse(&[0, 131, 0, 0, 0, 0, 0, 1]),
            Err(Error::UnsupportedOpcode(3))
        );
    }

    #[test]
    fn short_error_answer_round_trips() {
        // RFC 6886 §3.5: Unsupported Version, epoch 7.
        let bytes = [0, 128, 0, 1, 0, 0, 0, 7];
        let r = Response::parse(&bytes);
        assert_eq!(
            r,
            Ok(Response::Error {
                opcode: 0,
                result: ResultCode::UnsupportedVersion,
                epoch: 7
            })
        );
        assert_eq!(r.map(|r| r.encode()), Ok(bytes.to_vec()));
    }

    #[test]
    fn erratum_3618_unsupported_version_with_op_zero_is_accepted() {
        let r = Response::parse(&[0, 0, 0, 1, 0, 0, 1, 0]);
        assert_eq!(
            r,
            Ok(Response::Error {
                opcode: 0,
                result: ResultCode::UnsupportedVersion,
                epoch: 256
            })
        );
        // Encoded the corrected way (OP = 128), which reads back the same.
        assert_eq!(r.map(|r| r.encode()), Ok(vec![0, 128, 0, 1, 0, 0, 1, 0]));
        // Other results with op 0 are still requests, not answers.
        assert_eq!(
            Response::parse(&[0, 0, 0, 2, 0, 0, 1, 0]),
            Err(Error::NotAResponse)
        );
    }

    #[test]
    fn result_codes_keep_their_rfc_numbers() {
        for code in 0..=7u16 {
            assert_eq!(ResultCode::from_code(code).code(), code);
        }
        assert_eq!(ResultCode::NotAuthorized.code(), 2);
        assert_eq!(ResultCode::OutOfResources.code(), 4);
        assert_eq!(ResultCode::from_code(5), ResultCode::UnsupportedOpcode);
        assert_eq!(ResultCode::from_code(99), ResultCode::Other(99));
    }
}
