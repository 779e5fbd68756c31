//! STUN wire format: RFC 8489 messages, RFC 5780 attributes and RFC 3489 classic messages.
//!
//! Hand-written on purpose. We evaluated the `stun-types` crate first (it is well kept and fuzzed, and
//! it is our cross-check dev-dependency), but it cannot serve here: its header parser rejects every
//! message without the magic cookie and its writer always emits one, so it can neither read nor answer
//! the classic RFC 3489 requests the reflector must serve (old clients such as Debian's `stun`).
//! The reflector's hot path also needs to parse a borrowed datagram and write the answer into a
//! caller-owned buffer with no allocation at all, which this module does: [`Message::parse`] borrows,
//! [`MessageWriter`] writes into `&mut [u8]`.
//!
//! Parsing validates every length once, up front; after a successful parse no accessor can panic or
//! read out of bounds, whatever bytes arrived (property-tested, and fuzzed under `fuzz/`).

pub mod attr;
pub mod framing;
mod message;
mod writer;

pub use attr::{AttrError, ChangeRequest, ErrorCode};
pub use message::{Attributes, Message, ParseError, RawAttribute};
pub use writer::{EncodeError, MessageWriter};

/// RFC 8489 §5: the fixed value in bytes 4..8 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Every STUN message starts with a 20-byte header.
pub const HEADER_LEN: usize = 20;
/// The Binding method (RFC 8489 §18.2); the only one natscope speaks.
pub const METHOD_BINDING: u16 = 0x001;
/// RFC 8489 §14.7: FINGERPRINT is CRC-32 of the message XORed with this constant.
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// The four STUN message classes (RFC 8489 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    SuccessResponse,
    ErrorResponse,
}

/// A message type: class plus 12-bit method, interleaved on the wire (RFC 8489 §5, figure 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageType {
    pub class: Class,
    pub method: u16,
}

impl MessageType {
    pub const BINDING_REQUEST: Self = Self::new(Class::Request, METHOD_BINDING);
    pub const BINDING_RESPONSE: Self = Self::new(Class::SuccessResponse, METHOD_BINDING);
    pub const BINDING_ERROR: Self = Self::new(Class::ErrorResponse, METHOD_BINDING);

    pub const fn new(class: Class, method: u16) -> Self {
        Self { class, method }
    }

    /// Decodes the 14 significant bits; the top two bits must already be known to be zero.
    pub fn from_u16(v: u16) -> Self {
        let class = match ((v >> 7) & 0b10) | ((v >> 4) & 0b1) {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::SuccessResponse,
            _ => Class::ErrorResponse,
        };
        let method = (v & 0x000F) | ((v >> 1) & 0x0070) | ((v >> 2) & 0x0F80);
        Self { class, method }
    }

    pub fn to_u16(self) -> u16 {
        let c: u16 = match self.class {
            Class::Request => 0,
            Class::Indication => 1,
            Class::SuccessResponse => 2,
            Class::ErrorResponse => 3,
        };
        let m = self.method & 0x0FFF;
        (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
    }
}

/// Bytes 4..20 of the header. For RFC 5389/8489 messages the first four are the magic cookie and
/// the other twelve the transaction ID; for classic RFC 3489 messages all sixteen are the ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 16]);

impl TransactionId {
    /// A fresh RFC 8489 transaction ID (cookie + 96 bits) drawn from `rng`: the machines pass their
    /// injected (and in tests seeded) generator.
    pub fn from_rng(rng: &mut impl rand::Rng) -> Self {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        rng.fill(&mut id[4..]);
        Self(id)
    }

    /// A fresh random RFC 8489 transaction ID from the thread's generator, for drivers and tests;
    /// the sans-IO machines use [`TransactionId::from_rng`].
    pub fn random() -> Self {
        Self::from_rng(&mut rand::thread_rng())
    }

    /// A fresh random classic (RFC 3489) transaction ID: 128 random bits that are not the cookie.
    pub fn random_classic() -> Self {
        let mut id = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut id[..]);
        if id[..4] == MAGIC_COOKIE.to_be_bytes() {
            id[0] ^= 0xFF;
        }
        Self(id)
    }

    /// Whether bytes 4..8 hold the magic cookie, i.e. the message follows RFC 5389/8489.
    pub fn has_magic_cookie(&self) -> bool {
        self.0[..4] == MAGIC_COOKIE.to_be_bytes()
    }
}

/// Attribute type codes used by natscope (RFC 8489 §18.3, RFC 5780 §7, RFC 3489 §11.2).
pub mod attr_type {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// RFC 3489 only; natscope never honours it (it would aim responses at third parties).
    pub const RESPONSE_ADDRESS: u16 = 0x0002;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const SOURCE_ADDRESS: u16 = 0x0004;
    pub const CHANGED_ADDRESS: u16 = 0x0005;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;

    /// RFC 8489 §14: types 0x0000–0x7FFF are comprehension-required.
    pub fn is_comprehension_required(t: u16) -> bool {
        t < 0x8000
    }
}
