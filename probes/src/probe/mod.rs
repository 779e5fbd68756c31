//! `natscope probe` over real sockets and over the simulated network. The probe's state machines,
//! its report and its pacing are [`natscope_core::probe`], re-exported here; this module adds what
//! needs I/O or a harness: [`driver`] (tokio UDP sockets), [`tcp`] (the TCP mapping test's
//! connections), [`comparison`] (one socket's mapping across several servers), [`families`] (both address families at once) and [`sim`] (an in-memory NAT network on a virtual clock).

pub use natscope_core::probe::*;

pub mod comparison;
pub mod driver;
pub mod families;
pub mod sim;
pub mod tcp;
