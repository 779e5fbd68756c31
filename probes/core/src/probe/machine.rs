//! The driver interface every sans-IO probe state machine offers, so one driver loop (real sockets
//! in `natscope_probes::probe::driver`, the virtual network in `natscope_probes::probe::sim`) can
//! run any of them: the machine names sockets by [`SocketId`], the driver binds a fresh local socket
//! the first time it sees one, sends what `poll_transmit` returns, feeds back datagrams and
//! timeouts, and stops at `is_done`. The machines implement it next to their own code
//! ([`Probe`](super::Probe), [`LifetimeProbe`](super::LifetimeProbe)), so this module names none
//! of them.

use std::net::SocketAddr;
use std::time::Instant;

use super::socket::{SocketId, Transmit};

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
