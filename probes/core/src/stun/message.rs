//! Borrowed, validate-once parsing of one STUN message.

use super::{attr_type, MessageType, TransactionId, FINGERPRINT_XOR, HEADER_LEN};

/// Why bytes are not a STUN message. Lowercase, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than a stun header ({0} bytes)")]
    TooShort(usize),
    #[error("first two bits are not zero: not stun")]
    NotStun,
    #[error("message length {0} is not a multiple of 4")]
    UnalignedLength(u16),
    #[error("message length says {expected} bytes, datagram has {actual}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("attribute at offset {offset} runs past the end of the message")]
    AttributeOverrun { offset: usize },
}

/// A parsed STUN message borrowing its bytes. Construct with [`Message::parse`].
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    bytes: &'a [u8],
    typ: MessageType,
    tid: TransactionId,
}

/// One attribute as it stands on the wire: type and unpadded value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    pub typ: u16,
    pub value: &'a [u8],
    /// Offset of the attribute header from the start of the message.
    pub offset: usize,
}

impl<'a> Message<'a> {
    /// Parses exactly one message that fills `bytes` (a UDP datagram, or a frame cut by
    /// [`super::framing`]). Every attribute boundary is checked here, so iteration cannot fail.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        if bytes.len() < HEADER_LEN {
            return Err(ParseError::TooShort(bytes.len()));
        }
        if bytes[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        let length = u16::from_be_bytes([bytes[2], bytes[3]]);
        if length % 4 != 0 {
            return Err(ParseError::UnalignedLength(length));
        }
        let total = HEADER_LEN + length as usize;
        if total != bytes.len() {
            return Err(ParseError::LengthMismatch {
                expected: total,
                actual: bytes.len(),
            });
        }
        let mut offset = HEADER_LEN;
        while offset < total {
            if offset + 4 > total {
                return Err(ParseError::AttributeOverrun { offset });
            }
            let len = u16::from_be_bytes([bytes[offset + 2], bytes[offset + 3]]) as usize;
            let next = offset + 4 + padded(len);
            if next > total {
                return Err(ParseError::AttributeOverrun { offset });
            }
            offset = next;
        }
        let typ = MessageType::from_u16(u16::from_be_bytes([bytes[0], bytes[1]]));
        let mut tid = [0u8; 16];
        tid.copy_from_slice(&bytes[4..20]);
        Ok(Self {
            bytes,
            typ,
            tid: TransactionId(tid),
        })
    }

    pub fn message_type(&self) -> MessageType {
        self.typ
    }

    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// The whole message, header included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// RFC 5389/8489 message (true) or classic RFC 3489 message (false).
    pub fn is_rfc8489(&self) -> bool {
        self.tid.has_magic_cookie()
    }

    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            bytes: self.bytes,
            offset: HEADER_LEN,
        }
    }

    /// The first attribute of type `typ`. RFC 8489 §14: later duplicates are ignored.
    pub fn attribute(&self, typ: u16) -> Option<RawAttribute<'a>> {
        self.attributes().find(|a| a.typ == typ)
    }

    /// `None` when there is no FINGERPRINT; otherwise whether it is the last attribute and
    /// matches CRC-32 of everything before it (RFC 8489 §14.7).
    pub fn fingerprint_valid(&self) -> Option<bool> {
        let fp = self.attribute(attr_type::FINGERPRINT)?;
        if fp.value.len() != 4 || fp.offset + 8 != self.bytes.len() {
            return Some(false);
        }
        let want = u32::from_be_bytes([fp.value[0], fp.value[1], fp.value[2], fp.value[3]]);
        Some(fingerprint(&self.bytes[..fp.offset]) == want)
    }
}

/// CRC-32 (ISO HDLC) of `bytes` XOR 0x5354554E.
pub(crate) fn fingerprint(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes) ^ FINGERPRINT_XOR
}

pub(crate) fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// Iterator over the attributes of a parsed message, in wire order.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttribute<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        // Bounds were validated by `Message::parse`; `get` keeps this panic-free regardless.
        let head = self.bytes.get(self.offset..self.offset + 4)?;
        let typ = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let start = self.offset + 4;
        let value = self.bytes.get(start..start + len)?;
        let attr = RawAttribute {
            typ,
            value,
            offset: self.offset,
        };
        self.offset = start + padded(len);
        Some(attr)
    }
}
