//! `natscope punch`: connecting two peers through NATs — rendezvous, UDP hole punching, TCP
//! simultaneous open (RFC 5382), port prediction, relay fallback and relay-first upgrade.
//!
//! The wire format is STUN framing (RFC 8489 §5) with methods and attributes of our own, all
//! attributes in the comprehension-optional range so a plain STUN stack ignores them ([`codec`]).
//! The protocol cores do no I/O, never read the clock and draw every random number (session ids,
//! transaction ids, birthday ports) from a generator they are given: the rendezvous table
//! ([`table`]), the server around it ([`server`]), the reliable ordered message layer
//! ([`reliable`]), one peer session ([`session`]), and the two peers that run sessions — the
//! [`listener`] (registration, keepalive, the session table, de-duplication of introductions) and
//! the [`connector`] (rendezvous, prediction targets, the data it sends and the report). All take
//! `now` and bytes and queue [`Transmit`](crate::net::Transmit)s. The tokio drivers in
//! `natscope_probes::punch::driver` only move bytes between those cores and sockets, and run
//! their timers. docs/punch.md has the protocol.

pub mod codec;
pub mod connector;
pub mod cookie;
pub mod identity;
pub mod listener;
pub mod mapping;
pub mod peer;
pub mod reliable;
pub mod server;
pub mod session;
pub mod table;
#[cfg(test)]
mod testnet;

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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

/// What carried a punch session's data at the end: the `path` of the connect report and of the
/// listener's `session-ended` event, and the grid's expected and observed outcome of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PathTaken {
    /// A path straight between the peers (a punched hole or a simultaneous open).
    Direct,
    /// The rendezvous server's relay.
    Relayed,
    /// Nothing: no echo came back, or the session broke.
    Failed,
}

impl PathTaken {
    /// The word the JSON documents use: `direct`, `relayed` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for PathTaken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
