//! How a probe machine names its sockets and what it asks its driver to send: the vocabulary the
//! plan, the lifetime machine, the [`ProbeMachine`](super::ProbeMachine) interface and the drivers
//! share, kept in a leaf module so that no machine imports another to name a socket.
//!
//! A probe never owns a socket. It names each one by a [`SocketId`], the driver binds a fresh local
//! port the first time it sees an id (RFC 5780 §4 runs its tests from distinct local ports, and a
//! fresh port is a fresh NAT mapping), reports the bound address back, and sends each
//! [`Transmit`] from the socket it names.

use std::net::SocketAddr;

/// A local socket of a probe machine; the driver binds a fresh one the first time it sees an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u16);

/// One datagram a probe machine wants sent: the crate's one [`Transmit`](crate::net::Transmit),
/// its source named by [`SocketId`].
pub type Transmit = crate::net::Transmit<SocketId>;

/// The local address the driver bound for each of a machine's sockets.
#[derive(Clone, Debug, Default)]
pub struct LocalSockets(Vec<(SocketId, SocketAddr)>);

impl LocalSockets {
    /// Records the driver's report; the first address for an id wins.
    pub fn bound(&mut self, id: SocketId, local: SocketAddr) {
        if self.get(id).is_none() {
            self.0.push((id, local));
        }
    }

    pub fn get(&self, id: SocketId) -> Option<SocketAddr> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, a)| *a)
    }
}
