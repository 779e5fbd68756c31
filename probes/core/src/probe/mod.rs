//! `natscope probe`: RFC 5780 NAT behavior discovery as a sans-IO state machine.
//!
//! [`Probe`] runs the whole plan — reachability, mapping, filtering, hairpinning, port allocation —
//! without touching a socket or a clock. Its drivers (real sockets, and the in-memory simulator,
//! both in `natscope-probes`) feed it `now` and datagrams and sends what [`Probe::poll_transmit`] returns, from the
//! socket the transmit names. See [`plan`] for the test procedure and [`report`] for the result.
//! [`LifetimeProbe`] (RFC 5780 §4.6 binding lifetime, RFC 4787 REQ-6 inbound refresh) is a second
//! machine behind the same [`ProbeMachine`] interface, so the same drivers run it. Both start new
//! transactions only as their shared [`Pacer`] allows (RFC 5780 §5, see [`pacing`]).
//!
//! Imports point one way, from the machines down to what they share, never between machines:
//! [`socket`] (socket names and [`Transmit`]), [`evidence`] (timing, round trips, loss) and
//! [`pacing`] name nothing else here; [`machine`] (the driver interface) names only [`socket`];
//! [`report`] (the result rows and the mapping comparison) names only [`evidence`] and [`pacing`];
//! the machines — [`plan`], [`lifetime`], [`tcp`] — build on those and never on each other, nor
//! does [`comparison`] (one socket's mapping across several servers, on [`evidence`] and
//! [`report`]). The `layering` tests read these files and fail on a cycle.

pub mod comparison;
pub mod evidence;
pub mod family;
#[cfg(test)]
mod layering;
pub mod lifetime;
pub mod machine;
pub mod pacing;
pub mod plan;
pub mod report;
pub mod socket;
pub mod tcp;

pub use comparison::{ComparedServer, MappingComparison};
pub use evidence::Timing;
pub use family::{Families, Family, FamilyChoice, Ipv6Report, Translation};
pub use lifetime::{LifetimeConfig, LifetimeProbe, LifetimeReport};
pub use machine::ProbeMachine;
pub use pacing::{PaceChoice, Pacer, Pacing};
pub use plan::{Probe, ProbeConfig};
pub use report::{AddressPooling, AllocationPattern, Behavior, Classic, ProbeReport};
pub use socket::{SocketId, Transmit};

/// The `natscope probe --json` document (`natscope.probe/v1`, docs/schema/probe.v1.json): the
/// report, plus the mapping comparison when several servers were named. Here, not in [`report`],
/// because [`comparison`] builds on [`report`] and not the other way round.
#[derive(Clone, Debug, serde::Serialize, schemars::JsonSchema)]
#[schemars(rename = "ProbeDocument")]
pub struct ProbeDocument<'a> {
    #[serde(flatten)]
    pub report: &'a ProbeReport,
    /// One socket's mapped address as several servers saw it (`--server` given more than once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_comparison: Option<&'a MappingComparison>,
    // Issue 13, both families: the top-level fields stay one family's report (IPv4 when it was
    // probed, else IPv6), so v1 readers keep working; `family` says which, and `ipv6` carries the
    // IPv6 run whenever there was one (docs/probe.md, "Both families").
    /// The family the top-level fields describe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// The IPv6 run: its whole report, the translation verdict and the IPv6 outlook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<&'a Ipv6Report>,
}
