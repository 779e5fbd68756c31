//! natscope-probes: the protocol half of natscope.
//!
//! - [`stun`]: the STUN wire format (RFC 8489, RFC 5780, classic RFC 3489), borrowed and allocation-free.
//! - [`reflector`]: the RFC 5780 Binding server — a sans-IO core plus a tokio driver.
//! - [`client`]: one Binding transaction with RFC 8489 retransmission, and a typed view of responses.
//! - [`bench`](mod@bench): a closed-loop Binding load generator with a fixed-memory latency histogram.
//!
//! Protocol logic never reads the clock or touches a socket; drivers feed it `now` and bytes
//! (DESIGN.md, "probes: sans-IO at the core").

pub mod bench;
pub mod client;
/// Test and fuzz support: runs untrusted bytes through every decoder and asserts invariants.
#[doc(hidden)]
pub mod fuzzing;
pub mod nat;
pub mod probe;
pub mod punch;
pub mod reflector;
pub mod stun;
