//! natscope-core: every protocol core of natscope, with no I/O and no clock.
//!
//! - [`net`]: the shared vocabulary — one [`net::Transmit`], one [`net::Transport`].
//! - [`stun`]: the STUN wire format (RFC 8489, RFC 5780, classic RFC 3489), borrowed and allocation-free.
//! - [`client`]: one Binding request and its typed answer, and the RFC 8489 §6.2.1 retransmission machine.
//! - [`nat`]: the RFC 4787 NAT behavior model and mapping table (the simulator's and the lab engine's NAT).
//! - [`reflector`]: the RFC 5780 Binding server's answer logic.
//! - [`probe`]: the probe's state machines (mapping, filtering, hairpinning, allocation, lifetime) and report.
//! - [`punch`]: the rendezvous/relay server, peer sessions and the reliable message layer.
//! - [`traversal`]: the traversal model — which path two peers behind two NATs should get, and why.
//! - [`document`]: what every `--json` document shares (its schema tag and `natscope_version`).
//!
//! Every machine takes `now` and bytes and queues what it wants sent; the drivers that own sockets
//! and timers live in `natscope-probes` and `natscope-lab`. This crate depends on neither tokio,
//! socket2, nix nor pnet, so the rule is the compiler's, not a convention (docs/architecture.md).

#![forbid(unsafe_code)]

pub mod client;
pub mod document;
/// Test and fuzz support: runs untrusted bytes through every decoder and asserts invariants.
#[doc(hidden)]
pub mod fuzzing;
pub mod nat;
pub mod net;
pub mod portmap;
pub mod probe;
pub mod punch;
pub mod reflector;
pub mod stun;
pub mod traversal;

/// Milliseconds with microsecond resolution, as every report gives durations: finer digits are
/// noise, not evidence.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
