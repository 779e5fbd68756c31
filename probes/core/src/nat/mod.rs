//! The RFC 4787 NAT behavior model, shared by the probe's in-memory simulator and the lab's
//! packet-level NAT engine, so the behavior natscope is tested against and the behavior its lab
//! emulates are one piece of code (DESIGN.md, "probes: sans-IO at the core").
//!
//! One enum per RFC 4787 dimension; each behavior's `key` blanks the parts of a remote endpoint it
//! ignores, so one table serves 2-, 3- and 4-tuple behaviors. [`table::NatTable`] holds the mappings,
//! expires them lazily against an injected `now`, and never reads a clock. [`firewall::Firewall`] is
//! the same filtering without translation (a stateful firewall in front of public hosts).

pub mod firewall;
pub mod table;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// RFC 4787 §4.1 mapping behavior: what makes two outbound flows share an external address:port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MappingBehavior {
    /// One mapping per internal address:port, whatever the destination (REQ-1).
    EndpointIndependent,
    /// A new mapping per destination IP.
    AddressDependent,
    /// A new mapping per destination IP:port ("symmetric").
    AddressAndPortDependent,
}

/// RFC 4787 §5 filtering behavior: which inbound senders a mapping admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FilteringBehavior {
    /// Anyone, once the mapping exists ("full cone").
    EndpointIndependent,
    /// Only IPs the internal endpoint has sent to ("restricted cone").
    AddressDependent,
    /// Only IP:ports the internal endpoint has sent to ("port-restricted cone").
    AddressAndPortDependent,
}

/// The part of a remote endpoint a behavior looks at. `None` fields are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteKey {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl RemoteKey {
    /// The remote endpoint with the address and/or port blanked out.
    fn of(remote: SocketAddr, keep_ip: bool, keep_port: bool) -> Self {
        Self {
            ip: keep_ip.then(|| remote.ip()),
            port: keep_port.then(|| remote.port()),
        }
    }
}

impl MappingBehavior {
    pub fn key(self, remote: SocketAddr) -> RemoteKey {
        match self {
            Self::EndpointIndependent => RemoteKey::of(remote, false, false),
            Self::AddressDependent => RemoteKey::of(remote, true, false),
            Self::AddressAndPortDependent => RemoteKey::of(remote, true, true),
        }
    }
}

impl FilteringBehavior {
    pub fn key(self, remote: SocketAddr) -> RemoteKey {
        match self {
            Self::EndpointIndependent => RemoteKey::of(remote, false, false),
            Self::AddressDependent => RemoteKey::of(remote, true, false),
            Self::AddressAndPortDependent => RemoteKey::of(remote, true, true),
        }
    }
}

/// RFC 4787 §4.2.2 port assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PortAllocation {
    /// Keep the internal port when it is free; otherwise fall back to the next free port.
    Preserve,
    /// Each new mapping takes the previous external port plus `step` (predictable).
    Sequential { step: u16 },
    /// Uniformly random within the range.
    Random,
}

/// RFC 4787 §4.1 / REQ-2 IP address pooling when the NAT has several external addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// All mappings of one internal IP use the same external IP (recommended).
    Paired,
    /// Each mapping may use any external IP.
    Arbitrary,
}

/// Transport protocol of a mapping; UDP and TCP mappings are separate (RFC 4787, RFC 5382).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Udp,
    Tcp,
    /// ICMP query (echo): the identifier plays the port's role (RFC 5508).
    Icmp,
}

/// Every RFC 4787 knob of one NAT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NatBehavior {
    pub mapping: MappingBehavior,
    pub filtering: FilteringBehavior,
    pub allocation: PortAllocation,
    /// External ports are taken from this inclusive range (REQ-3: keep 1024..=65535 by default).
    pub port_range: (u16, u16),
    /// REQ-4: keep the parity of the internal port.
    pub port_parity: bool,
    /// REQ-9: packets from inside to the NAT's own external address are looped back.
    pub hairpinning: bool,
    /// REQ-5: idle time after which a UDP mapping is removed.
    pub udp_timeout: Duration,
    /// RFC 5382 REQ-5: idle time for TCP mappings.
    pub tcp_timeout: Duration,
    /// REQ-6: whether inbound packets refresh a mapping (outbound always does).
    pub inbound_refresh: bool,
    pub pooling: Pooling,
}

impl NatBehavior {
    /// A behavior with RFC 4787-recommended defaults for everything but mapping and filtering.
    pub fn new(mapping: MappingBehavior, filtering: FilteringBehavior) -> Self {
        Self {
            mapping,
            filtering,
            allocation: PortAllocation::Preserve,
            port_range: (1024, 65535),
            port_parity: false,
            hairpinning: false,
            udp_timeout: Duration::from_secs(120),
            tcp_timeout: Duration::from_secs(7440),
            inbound_refresh: false,
            pooling: Pooling::Paired,
        }
    }

    /// Idle time after which a `proto` mapping (or a firewall's pinhole) is removed: the UDP and
    /// TCP knobs, and RFC 5508 REQ-1's 60 s floor for ICMP query mappings.
    pub fn timeout(&self, proto: Protocol) -> Duration {
        match proto {
            Protocol::Udp => self.udp_timeout,
            Protocol::Tcp => self.tcp_timeout,
            Protocol::Icmp => ICMP_QUERY_TIMEOUT,
        }
    }
}

/// RFC 5508 REQ-1: an ICMP query mapping must not expire in less than 60 s.
const ICMP_QUERY_TIMEOUT: Duration = Duration::from_secs(60);
