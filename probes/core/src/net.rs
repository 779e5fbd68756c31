//! The vocabulary every state machine in this crate shares, kept in a leaf module so no machine
//! imports another to name a datagram (DESIGN.md, "One vocabulary across machines").
//!
//! A machine queues [`Transmit`]s and its driver drains them with `poll_transmit()`; it says when it
//! next needs the clock with `poll_timeout() -> Option<Instant>` (`None`: only new input wakes it)
//! and is called back with `handle_timeout(now)`. The source of a transmit is the machine's own
//! name for a socket — a logical [`SocketId`](crate::probe::SocketId) for the probe, a local
//! transport address for the punch machines — because in NAT work which socket sends matters as
//! much as where to.

use std::fmt;
use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The transport a socket, registration, session, request or grid cell uses.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// The lowercase name used on the command line, in JSON and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One datagram (or one framed message on a stream) a machine wants sent: from which of its
/// sockets, to whom, and the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit<S> {
    /// The machine's name for the socket that must send it.
    pub source: S,
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
}
