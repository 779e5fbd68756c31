//! Punch's port mapping (issue 12, "Punch and grid"), the sans-IO part: which candidates a peer
//! sends once its gateway granted it a port over PCP, NAT-PMP or UPnP IGD, when the mapping is
//! renewed, how far the gateway's claim is believed, and what the connect and listen JSON say
//! about it. The driver (`natscope_probes::punch::mapping`) asks the gateway and keeps the
//! mapping; the traversal model ([`crate::traversal`], `PeerNat::port_mapping`) says which pairs
//! go direct through it.
//!
//! Candidate order: the server puts the reflexive address it saw first (`punch::peer::targets`),
//! then our CANDIDATEs in the order we send them; the mapped external address goes first among
//! ours, right after the reflexive one. The reflexive address is still tried first because it
//! costs nothing and is the path for every pair the model calls direct without a mapping; the
//! mapped address comes before the host address because it is the one that crosses the NAT (the
//! host address only helps on a shared LAN), and so that the cap of eight candidates never drops
//! it. When the gateway also uses the mapping for the socket's outbound traffic (RFC 6887 §11,
//! what the lab's routers do), the reflexive address already is the mapped one and the candidate
//! is left out as a duplicate.
//!
//! A gateway that lies: the external address a gateway claims is compared with the reflexive
//! address the rendezvous server saw. When they differ (a second NAT beyond the gateway, or a
//! gateway reporting a wrong address) the mapped address is still offered — a wrong candidate
//! only costs the probes sent to it, and a second NAT that forwards the port would make it right
//! — but the report says so in `problems`, and the model counts a mapping as working only when
//! no second NAT undoes it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::portmap::PortMappingService;

/// The lifetime punch asks for, in seconds. Long enough that a listener renews rarely; short
/// enough that a mapping whose deletion was lost (the process killed with SIGKILL) goes away by
/// itself within minutes.
pub const LIFETIME_S: u32 = 120;

/// The shortest renewal interval, whatever lifetime a gateway grants (a gateway granting 1 s
/// must not make us send a request per second forever).
pub const MIN_REFRESH: Duration = Duration::from_secs(5);

/// What the connect report (`port_mapping`) and the listener's `port-mapping` line say about the
/// mapping of the punch socket's port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PunchMapping {
    /// The protocol that granted the mapping; `null` when none was made.
    pub protocol: Option<PortMappingService>,
    /// The gateway asked; `null` when none was (off, TCP, no gateway on the server's path).
    pub gateway: Option<std::net::IpAddr>,
    /// The punch socket's local address the mapping forwards to.
    pub internal: Option<SocketAddr>,
    /// The external address and port the gateway granted (as it claims them).
    pub external: Option<SocketAddr>,
    /// The granted lifetime in seconds (renewed at half of it while the session lives).
    pub lifetime_s: Option<u32>,
    /// Whether the external address was sent as a candidate.
    pub offered: bool,
    /// How long asking took, from the start of the request to the answer or giving up, in ms.
    pub duration_ms: f64,
    /// Why no mapping was made (`--no-port-mapping`, TCP, no gateway, no protocol answered,
    /// refused); `null` when one was.
    pub why_none: Option<String>,
    /// What looked wrong: the gateway's claim disagrees with what the server saw, renewal or
    /// deletion failed.
    pub problems: Vec<String>,
}

impl PunchMapping {
    /// No mapping, and why.
    pub fn none(why: impl Into<String>) -> Self {
        Self {
            why_none: Some(why.into()),
            ..Self::default()
        }
    }
}

/// The main socket's candidates in the order a peer sends them: the mapped external address
/// first (see the module comment), then the host address; [`DualStack::announce`] adds the other
/// family's, drops duplicates and keeps the codec's limit.
///
/// [`DualStack::announce`]: super::peer::DualStack::announce
pub fn candidates(local: SocketAddr, mapped: Option<SocketAddr>) -> Vec<SocketAddr> {
    mapped.into_iter().chain([local]).collect()
}

/// When a mapping granted at `granted_at` for `lifetime_s` seconds is renewed: at half its
/// lifetime (RFC 6886 §3.3 renews at half; RFC 6887 §11.2.1 between 1/2 and 5/8), never sooner
/// than [`MIN_REFRESH`] after it was granted.
pub fn refresh_at(granted_at: Instant, lifetime_s: u32) -> Instant {
    let half = Duration::from_secs(u64::from(lifetime_s)) / 2;
    granted_at + half.max(MIN_REFRESH)
}

/// Compares the gateway's claimed `external` address with the `reflexive` address the rendezvous
/// server saw: a problem line when the IP addresses differ (a second NAT beyond the gateway, or
/// a gateway that reports a wrong address). The candidate is offered either way.
pub fn check_external(external: SocketAddr, reflexive: SocketAddr) -> Option<String> {
    (external.ip().to_canonical() != reflexive.ip().to_canonical()).then(|| {
        format!(
            "the gateway claims external address {}, but the rendezvous server saw {}: a second NAT \
             beyond the gateway, or a gateway reporting a wrong address; the mapped address is \
             still offered as a candidate (a wrong one only costs probes)",
            external.ip(),
            reflexive.ip()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn the_mapped_address_leads_our_candidates_once() {
        let local = a("10.1.0.2:40000");
        let mapped = a("203.0.113.1:40000");
        assert_eq!(candidates(local, Some(mapped)), vec![mapped, local]);
        assert_eq!(candidates(local, None), vec![local]);
        // A gateway that maps to the host address itself (no NAT) adds nothing.
        let announced =
            crate::punch::peer::DualStack::default().announce(candidates(local, Some(local)));
        assert_eq!(announced, vec![local]);
        // The server puts the reflexive address before ours: the mapped one comes right after.
        let peer = crate::punch::codec::PeerInfo {
            reflexive: a("203.0.113.1:1234"),
            candidates: candidates(local, Some(mapped)),
            port_delta: None,
            punch_window_ms: None,
            key: None,
        };
        assert_eq!(
            crate::punch::peer::targets(&peer)[..2],
            [a("203.0.113.1:1234"), mapped]
        );
    }

    #[test]
    fn renewal_at_half_the_lifetime_never_sooner_than_the_floor() {
        let t0 = Instant::now();
        assert_eq!(refresh_at(t0, 120), t0 + Duration::from_secs(60));
        assert_eq!(refresh_at(t0, 7200), t0 + Duration::from_secs(3600));
        assert_eq!(refresh_at(t0, 1), t0 + MIN_REFRESH);
        assert_eq!(refresh_at(t0, 0), t0 + MIN_REFRESH);
        assert_eq!(
            refresh_at(t0, u32::MAX) - t0,
            Duration::from_millis(2_147_483_647_500)
        );
    }

    #[test]
    fn a_claim_the_server_contradicts_is_reported_not_dropped() {
        let ext = a("203.0.113.7:5000");
        assert_eq!(check_external(ext, a("203.0.113.7:6000")), None);
        let p = check_external(ext, a("198.51.100.9:6000")).expect("a problem");
        assert!(
            p.contains("203.0.113.7") && p.contains("198.51.100.9"),
            "{p}"
        );
        assert!(check_external(a("[::ffff:203.0.113.7]:1"), a("203.0.113.7:2")).is_none());
    }
}
