//! `natscope probe`: RFC 5780 NAT behavior discovery as a sans-IO state machine.
//!
//! [`Probe`] runs the whole plan — reachability, mapping, filtering, hairpinning, port allocation —
//! without touching a socket or a clock. Its drivers (real sockets, and the in-memory simulator,
//! both in `natscope-probes`) feed it `now` and datagrams and sends what [`Probe::poll_transmit`] returns, from the
//! socket the transmit names. See [`plan`] for the test procedure and [`report`] for the result.
//! [`LifetimeProbe`] (RFC 5780 §4.6 binding lifetime, RFC 4787 REQ-6 inbound refresh) is a second
//! machine behind the same [`ProbeMachine`] interface, so the same drivers run it. Both start new
//! transactions only as their shared [`Pacer`] allows (RFC 5780 §5, see [`pacing`]).

pub mod comparison;
pub mod evidence;
pub mod lifetime;
pub mod machine;
pub mod pacing;
pub mod plan;
pub mod report;
pub mod tcp;

pub use comparison::{ComparedServer, MappingComparison};
pub use lifetime::{LifetimeConfig, LifetimeProbe, LifetimeReport};
pub use machine::ProbeMachine;
pub use pacing::{PaceChoice, Pacer, Pacing};
pub use plan::{Probe, ProbeConfig, SocketId, Timing, Transmit};
pub use report::{AddressPooling, AllocationPattern, Behavior, Classic, ProbeReport};
