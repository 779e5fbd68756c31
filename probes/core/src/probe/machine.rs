//! The driver interface every sans-IO probe state machine offers, so one driver loop (real sockets
//! in [`super::driver`], the virtual network in [`super::sim`]) can run any of them: the machine
//! names sockets by [`SocketId`], the driver binds a fresh local socket the first time it sees one,
//! sends what `poll_transmit` returns, feeds back datagrams and timeouts, and stops at `is_done`.

use std::net::SocketAddr;
use std::time::Instant;

use super::lifetime::LifetimeProbe;
use super::plan::{Probe, SocketId, Transmit};

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

/// A sans-IO probe: never reads a clock, never touches a socket; every entry point takes `now`.
pub trait ProbeMachine {
    /// The driver reports the local address of a socket it bound for `id`.
    fn socket_bound(&mut self, id: SocketId, local: SocketAddr);
    /// The next datagram to send now, if any.
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit>;
    /// A datagram arrived on `socket` from `from`.
    fn handle_datagram(&mut self, now: Instant, socket: SocketId, from: SocketAddr, bytes: &[u8]);
    /// Called when the time `poll_timeout` named has come.
    fn handle_timeout(&mut self, now: Instant);
    /// When to call `handle_timeout` next; `None` when nothing is scheduled.
    fn poll_timeout(&self) -> Option<Instant>;
    fn is_done(&self) -> bool;
}

impl ProbeMachine for Probe {
    fn socket_bound(&mut self, id: SocketId, local: SocketAddr) {
        Probe::socket_bound(self, id, local);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        Probe::poll_transmit(self, now)
    }
    fn handle_datagram(&mut self, now: Instant, socket: SocketId, from: SocketAddr, bytes: &[u8]) {
        Probe::handle_datagram(self, now, socket, from, bytes);
    }
    fn handle_timeout(&mut self, now: Instant) {
        Probe::handle_timeout(self, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Probe::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        Probe::is_done(self)
    }
}

impl ProbeMachine for LifetimeProbe {
    fn socket_bound(&mut self, id: SocketId, local: SocketAddr) {
        LifetimeProbe::socket_bound(self, id, local);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        LifetimeProbe::poll_transmit(self, now)
    }
    fn handle_datagram(&mut self, now: Instant, socket: SocketId, from: SocketAddr, bytes: &[u8]) {
        LifetimeProbe::handle_datagram(self, now, socket, from, bytes);
    }
    fn handle_timeout(&mut self, now: Instant) {
        LifetimeProbe::handle_timeout(self, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        LifetimeProbe::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        LifetimeProbe::is_done(self)
    }
}
