//! Typed views of attribute values: addresses (plain and XOR), CHANGE-REQUEST, RESPONSE-PORT,
//! ERROR-CODE. Decoders take the raw value and never panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::TransactionId;

const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// Why an attribute value could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    #[error("attribute value has length {0}, which is not valid for its type")]
    BadLength(usize),
    #[error("unknown address family {0:#04x}")]
    BadFamily(u8),
    #[error("error code class {0} is outside 3..=6")]
    BadErrorClass(u8),
    #[error("error code number {0} is outside 0..=99")]
    BadErrorNumber(u8),
}

/// RFC 8489 §14.1 MAPPED-ADDRESS layout, shared by every plain address attribute
/// (RESPONSE-ORIGIN, OTHER-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS, ALTERNATE-SERVER).
pub fn decode_address(value: &[u8]) -> Result<SocketAddr, AttrError> {
    if value.len() < 4 {
        return Err(AttrError::BadLength(value.len()));
    }
    let port = u16::from_be_bytes([value[2], value[3]]);
    let ip = match (value[1], value.len()) {
        (FAMILY_IPV4, 8) => IpAddr::V4(Ipv4Addr::new(value[4], value[5], value[6], value[7])),
        (FAMILY_IPV6, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&value[4..20]);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        (FAMILY_IPV4 | FAMILY_IPV6, n) => return Err(AttrError::BadLength(n)),
        (f, _) => return Err(AttrError::BadFamily(f)),
    };
    Ok(SocketAddr::new(ip, port))
}

/// RFC 8489 §14.2 XOR-MAPPED-ADDRESS: port XOR the cookie's top half, address XOR cookie (IPv4)
/// or cookie ‖ transaction ID (IPv6) — exactly bytes 4..20 of the header.
pub fn decode_xor_address(value: &[u8], tid: &TransactionId) -> Result<SocketAddr, AttrError> {
    let plain = decode_address(value)?;
    Ok(xor_address(plain, tid))
}

/// XOR is its own inverse: the same function encodes and decodes.
pub(crate) fn xor_address(addr: SocketAddr, tid: &TransactionId) -> SocketAddr {
    let k = &tid.0;
    let port = addr.port() ^ u16::from_be_bytes([k[0], k[1]]);
    let ip = match addr.ip() {
        IpAddr::V4(v4) => {
            let mut o = v4.octets();
            for (b, x) in o.iter_mut().zip(&k[..4]) {
                *b ^= x;
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            for (b, x) in o.iter_mut().zip(&k[..16]) {
                *b ^= x;
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    };
    SocketAddr::new(ip, port)
}

/// Writes the plain address layout into `out`, which must be [`address_len`] bytes (panics
/// otherwise: callers size `out` with [`address_len`]).
pub fn encode_address(addr: SocketAddr, out: &mut [u8]) {
    out[0] = 0;
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(v4) => {
            out[1] = FAMILY_IPV4;
            out[4..8].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out[1] = FAMILY_IPV6;
            out[4..20].copy_from_slice(&v6.octets());
        }
    }
}

/// Length of the plain address layout (RFC 8489 §14.1) for `addr`'s family: 8 or 20 bytes.
pub fn address_len(addr: SocketAddr) -> usize {
    if addr.is_ipv4() {
        8
    } else {
        20
    }
}

/// RFC 5780 §7.2 CHANGE-REQUEST flags (the same layout as RFC 3489's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChangeRequest {
    pub change_ip: bool,
    pub change_port: bool,
}

impl ChangeRequest {
    pub const NONE: Self = Self {
        change_ip: false,
        change_port: false,
    };
    pub const IP: Self = Self {
        change_ip: true,
        change_port: false,
    };
    pub const PORT: Self = Self {
        change_ip: false,
        change_port: true,
    };
    pub const BOTH: Self = Self {
        change_ip: true,
        change_port: true,
    };

    pub fn decode(value: &[u8]) -> Result<Self, AttrError> {
        if value.len() != 4 {
            return Err(AttrError::BadLength(value.len()));
        }
        Ok(Self {
            change_ip: value[3] & 0x04 != 0,
            change_port: value[3] & 0x02 != 0,
        })
    }

    pub fn to_bytes(self) -> [u8; 4] {
        [
            0,
            0,
            0,
            (u8::from(self.change_ip) << 2) | (u8::from(self.change_port) << 1),
        ]
    }

    pub fn is_none(self) -> bool {
        !self.change_ip && !self.change_port
    }
}

/// RFC 5780 §7.5 RESPONSE-PORT: a 16-bit port followed by two bytes of padding. Some
/// implementations declare length 2 and some 4 (NAT-REFERENCE.md); both are accepted.
pub fn decode_response_port(value: &[u8]) -> Result<u16, AttrError> {
    match value.len() {
        2 | 4 => Ok(u16::from_be_bytes([value[0], value[1]])),
        n => Err(AttrError::BadLength(n)),
    }
}

/// RFC 8489 §14.8 ERROR-CODE, reason borrowed as raw bytes (it is peer text: escape before logging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorCode<'a> {
    pub code: u16,
    pub reason: &'a [u8],
}

impl<'a> ErrorCode<'a> {
    pub fn decode(value: &'a [u8]) -> Result<Self, AttrError> {
        if value.len() < 4 {
            return Err(AttrError::BadLength(value.len()));
        }
        let class = value[2] & 0x07;
        if !(3..=6).contains(&class) {
            return Err(AttrError::BadErrorClass(class));
        }
        let number = value[3];
        if number > 99 {
            return Err(AttrError::BadErrorNumber(number));
        }
        Ok(Self {
            code: u16::from(class) * 100 + u16::from(number),
            reason: &value[4..],
        })
    }
}

/// Iterates the 16-bit types listed in an UNKNOWN-ATTRIBUTES value (RFC 8489 §14.9).
pub fn decode_unknown_attributes(value: &[u8]) -> impl Iterator<Item = u16> + '_ {
    value
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
}
