//! Writing a STUN message into a caller-owned buffer, with no allocation: the reflector answers
//! every request from a stack or per-socket buffer.

use std::net::SocketAddr;

use super::attr::{address_len, encode_address, xor_address, ChangeRequest};
use super::message::{fingerprint, padded};
use super::{attr_type, MessageType, TransactionId, HEADER_LEN};

/// Why a message could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("output buffer too small: need {need} bytes, have {have}")]
    BufferTooSmall { need: usize, have: usize },
    #[error("attribute value of {0} bytes exceeds the 65535-byte limit")]
    ValueTooLong(usize),
    #[error("error code {0} is outside 300..=699")]
    BadErrorCode(u16),
    #[error("message body of {0} bytes exceeds the 65535-byte length field")]
    MessageTooLong(usize),
}

/// Builds one message in `buf`. The header's length field is kept current after every call.
#[derive(Debug)]
pub struct MessageWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> MessageWriter<'b> {
    pub fn new(
        buf: &'b mut [u8],
        typ: MessageType,
        tid: &TransactionId,
    ) -> Result<Self, EncodeError> {
        if buf.len() < HEADER_LEN {
            return Err(EncodeError::BufferTooSmall {
                need: HEADER_LEN,
                have: buf.len(),
            });
        }
        buf[..2].copy_from_slice(&typ.to_u16().to_be_bytes());
        buf[2..4].copy_from_slice(&[0, 0]);
        buf[4..20].copy_from_slice(&tid.0);
        Ok(Self {
            buf,
            len: HEADER_LEN,
        })
    }

    fn tid(&self) -> TransactionId {
        let mut t = [0u8; 16];
        t.copy_from_slice(&self.buf[4..20]);
        TransactionId(t)
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Whether the message may grow to `need` bytes: within the 16-bit length field and the buffer.
    fn check_room(&self, need: usize) -> Result<(), EncodeError> {
        if need - HEADER_LEN > u16::MAX as usize {
            return Err(EncodeError::MessageTooLong(need - HEADER_LEN));
        }
        if need > self.buf.len() {
            return Err(EncodeError::BufferTooSmall {
                need,
                have: self.buf.len(),
            });
        }
        Ok(())
    }

    /// Appends an attribute of `value_len` bytes whose value `fill` writes; pads with zeros.
    pub fn add_with(
        &mut self,
        typ: u16,
        value_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), EncodeError> {
        if value_len > u16::MAX as usize {
            return Err(EncodeError::ValueTooLong(value_len));
        }
        let need = self.len + 4 + padded(value_len);
        self.check_room(need)?;
        let at = self.len;
        self.buf[at..at + 2].copy_from_slice(&typ.to_be_bytes());
        self.buf[at + 2..at + 4].copy_from_slice(&(value_len as u16).to_be_bytes());
        fill(&mut self.buf[at + 4..at + 4 + value_len]);
        self.buf[at + 4 + value_len..need].fill(0);
        self.len = need;
        let body = (self.len - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
        Ok(())
    }

    pub fn add_raw(&mut self, typ: u16, value: &[u8]) -> Result<(), EncodeError> {
        self.add_with(typ, value.len(), |out| out.copy_from_slice(value))
    }

    /// A plain address attribute (MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS, ...).
    pub fn add_address(&mut self, typ: u16, addr: SocketAddr) -> Result<(), EncodeError> {
        self.add_with(typ, address_len(addr), |out| encode_address(addr, out))
    }

    /// An XOR address attribute (XOR-MAPPED-ADDRESS), keyed by this message's header.
    pub fn add_xor_address(&mut self, typ: u16, addr: SocketAddr) -> Result<(), EncodeError> {
        let x = xor_address(addr, &self.tid());
        self.add_address(typ, x)
    }

    pub fn add_change_request(&mut self, cr: ChangeRequest) -> Result<(), EncodeError> {
        self.add_raw(attr_type::CHANGE_REQUEST, &cr.to_bytes())
    }

    /// RESPONSE-PORT as RFC 5780 §7.5 draws it: port plus two bytes of padding, length 2.
    pub fn add_response_port(&mut self, port: u16) -> Result<(), EncodeError> {
        self.add_raw(attr_type::RESPONSE_PORT, &port.to_be_bytes())
    }

    /// PADDING of `len` zero bytes (RFC 5780 §7.6).
    pub fn add_padding(&mut self, len: usize) -> Result<(), EncodeError> {
        self.add_with(attr_type::PADDING, len, |out| out.fill(0))
    }

    pub fn add_software(&mut self, text: &str) -> Result<(), EncodeError> {
        self.add_raw(attr_type::SOFTWARE, text.as_bytes())
    }

    pub fn add_error_code(&mut self, code: u16, reason: &str) -> Result<(), EncodeError> {
        if !(300..700).contains(&code) {
            return Err(EncodeError::BadErrorCode(code));
        }
        self.add_with(attr_type::ERROR_CODE, 4 + reason.len(), |out| {
            out[..2].fill(0);
            out[2] = (code / 100) as u8;
            out[3] = (code % 100) as u8;
            out[4..].copy_from_slice(reason.as_bytes());
        })
    }

    pub fn add_unknown_attributes(&mut self, types: &[u16]) -> Result<(), EncodeError> {
        self.add_with(attr_type::UNKNOWN_ATTRIBUTES, types.len() * 2, |out| {
            for (c, t) in out.chunks_exact_mut(2).zip(types) {
                c.copy_from_slice(&t.to_be_bytes());
            }
        })
    }

    /// Ends the message; returns its length.
    pub fn finish(self) -> usize {
        self.len
    }

    /// Appends FINGERPRINT (RFC 8489 §14.7) and ends the message.
    pub fn finish_with_fingerprint(mut self) -> Result<usize, EncodeError> {
        // The CRC covers the header with a length that already counts the FINGERPRINT attribute.
        let need = self.len + 8;
        self.check_room(need)?;
        let body = (need - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
        let crc = fingerprint(&self.buf[..self.len]);
        self.add_raw(attr_type::FINGERPRINT, &crc.to_be_bytes())?;
        Ok(self.len)
    }
}
