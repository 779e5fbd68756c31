//! STUN over TCP (RFC 8489 §6.2.2): messages back to back on the stream, each one's length read
//! from its header. No extra framing is added.

use super::HEADER_LEN;

/// Largest frame natscope accepts on a stream; anything longer is hostile or broken and the
/// connection is closed rather than buffered (memory stays bounded).
pub const MAX_FRAME: usize = 2048;

/// What the bytes at the front of a stream buffer hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole message of this many bytes is available at the front.
    Complete(usize),
    /// More bytes are needed (at least this many in total).
    Partial(usize),
    /// The stream cannot be STUN (bad leading bits, unaligned or oversized length).
    Invalid,
}

/// Looks at the front of a stream buffer.
pub fn frame(buf: &[u8]) -> Frame {
    if let Some(&b) = buf.first() {
        if b & 0xC0 != 0 {
            return Frame::Invalid;
        }
    }
    if buf.len() < 4 {
        return Frame::Partial(HEADER_LEN);
    }
    let body = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let total = HEADER_LEN + body;
    if body % 4 != 0 || total > MAX_FRAME {
        return Frame::Invalid;
    }
    if buf.len() >= total {
        Frame::Complete(total)
    } else {
        Frame::Partial(total)
    }
}
