//! natscope-probes: the drivers around [`natscope_core`]'s sans-IO machines.
//!
//! - [`client`]: tokio drivers for one Binding transaction (UDP with RFC 8489 retransmissions, TCP).
//! - [`reflector`]: the RFC 5780 reflector on real UDP/TCP sockets.
//! - [`probe`]: the probe on real sockets, the TCP mapping test, and the simulated NAT network.
//! - [`punch`]: the punch server and peers on real sockets.
//! - [`resolve`]: `HOST:PORT` as users type it to one server address (`probe`, `punch --via`).
//! - [`upnp`]: the UPnP IGD client (SSDP, device description, SOAP port mapping).
//! - [`selfcheck`]: the loopback RFC 5780 self-check of the reflector (`natscope demo`).
//! - [`bench`](mod@bench): a closed-loop Binding load generator with a fixed-memory latency histogram.
//!
//! The codec, the NAT model and every state machine are [`natscope_core`]'s; the modules that need
//! no driver are re-exported under their usual names so callers have one path for each concept.

#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod portmap;
pub mod probe;
pub mod punch;
pub mod reflector;
pub mod resolve;
pub mod selfcheck;
pub mod upnp;

pub use natscope_core::{document, fuzzing, nat, stun};
