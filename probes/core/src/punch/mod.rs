//! `natscope punch`: connecting two peers through NATs — rendezvous, UDP hole punching, TCP
//! simultaneous open (RFC 5382), port prediction, relay fallback and relay-first upgrade.
//!
//! The wire format is STUN framing (RFC 8489 §5) with methods and attributes of our own, all
//! attributes in the comprehension-optional range so a plain STUN stack ignores them ([`codec`]).
//! The protocol cores do no I/O and never read the clock: the rendezvous table ([`table`]), the
//! server around it ([`server`]), the reliable ordered message layer ([`reliable`]) and one peer
//! session ([`session`]) all take `now` and bytes and queue their transmits. The tokio drivers in
//! `natscope_probes::punch::driver` only move bytes between those cores and sockets. docs/punch.md has
//! the protocol.

pub mod codec;
pub mod reliable;
pub mod server;
pub mod session;
pub mod table;

use std::fmt;

/// Longest peer id accepted anywhere (bytes); ids are `[A-Za-z0-9._-]`.
pub const MAX_ID_LEN: usize = 64;
/// Most candidates a peer may report; more are a protocol error (bounded work per message).
pub const MAX_CANDIDATES: usize = 8;
/// Largest application payload in one DATA message.
pub const MAX_PAYLOAD: usize = 1200;
/// Default rendezvous/relay port of `natscope punch serve`.
pub const DEFAULT_PORT: u16 = 3490;

/// The transport a registration or session uses: the crate's one [`crate::net::Transport`].
pub use crate::net::Transport;

/// A session's identifier: 64 random bits chosen by the server. It is also the capability that
/// lets a packet into a session, so peers drop anything carrying a session they do not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Whether `id` is an acceptable peer id: 1..=[`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
