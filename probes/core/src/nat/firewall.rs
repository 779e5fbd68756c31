//! A stateful firewall in front of public hosts: nothing is rewritten (the mapping is the
//! identity), and inbound packets are admitted by the same RFC 4787 §5 filtering keys, timeouts
//! (REQ-5, RFC 5382 REQ-5) and refresh rule (REQ-6) a NAT uses ("symmetric UDP firewall" for ADF
//! and APDF). The lab engine's firewall mode and the probe simulator's firewall path both run this,
//! so the probe is tested against the firewall the lab emulates. It is a small table of its own
//! rather than [`NatTable`](super::table::NatTable) with an identity mapping, because `NatTable`
//! allocates external ports and an identity "allocation" would fight its port bookkeeping. Time is
//! an input; nothing here reads a clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use super::{NatBehavior, Protocol, RemoteKey};

/// Cap on open (internal, remote key) pairs; at the cap, expired ones are swept first and then new
/// flows are forwarded but not remembered (their replies are filtered).
const CAP: usize = 65536;

#[derive(Debug)]
pub struct Firewall {
    behavior: NatBehavior,
    open: HashMap<(Protocol, SocketAddr, RemoteKey), Instant>,
}

/// One open pinhole, for `lab nat-table`.
pub struct Pinhole {
    pub proto: Protocol,
    pub internal: SocketAddr,
    pub remote: RemoteKey,
    pub expires: Instant,
}

impl Firewall {
    /// A firewall filtering by `behavior`'s filtering, timeouts and refresh rule (its mapping,
    /// allocation and pooling are unused: nothing is translated).
    pub fn new(behavior: NatBehavior) -> Self {
        Self {
            behavior,
            open: HashMap::new(),
        }
    }

    /// An outbound packet opens (or refreshes, REQ-6) the pinhole towards `remote`.
    pub fn outbound(
        &mut self,
        now: Instant,
        proto: Protocol,
        internal: SocketAddr,
        remote: SocketAddr,
    ) {
        let key = (proto, internal, self.behavior.filtering.key(remote));
        if !self.open.contains_key(&key) && self.open.len() >= CAP {
            self.sweep(now);
            if self.open.len() >= CAP {
                return;
            }
        }
        self.open.insert(key, now + self.behavior.timeout(proto));
    }

    /// Whether an inbound packet from `remote` to `internal` is admitted.
    pub fn inbound(
        &mut self,
        now: Instant,
        proto: Protocol,
        remote: SocketAddr,
        internal: SocketAddr,
    ) -> bool {
        let key = (proto, internal, self.behavior.filtering.key(remote));
        let timeout = self.behavior.timeout(proto);
        let refresh = self.behavior.inbound_refresh;
        match self.open.get_mut(&key) {
            Some(exp) if *exp > now => {
                if refresh {
                    *exp = now + timeout;
                }
                true
            }
            _ => false,
        }
    }

    /// Whether `internal` has any live pinhole (an ICMP error about its traffic may come from any
    /// router on the path).
    pub fn has_internal(&self, now: Instant, proto: Protocol, internal: SocketAddr) -> bool {
        self.open
            .iter()
            .any(|((p, i, _), exp)| *p == proto && *i == internal && *exp > now)
    }

    /// Forgets expired pinholes.
    pub fn sweep(&mut self, now: Instant) {
        self.open.retain(|_, exp| *exp > now);
    }

    /// The live pinholes at `now`, in no particular order.
    pub fn pinholes(&self, now: Instant) -> impl Iterator<Item = Pinhole> + '_ {
        self.open.iter().filter(move |(_, exp)| **exp > now).map(
            |((proto, internal, remote), expires)| Pinhole {
                proto: *proto,
                internal: *internal,
                remote: *remote,
                expires: *expires,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::nat::{FilteringBehavior as F, MappingBehavior as M};

    const HOST: &str = "203.0.113.2:40000";
    const S1: &str = "198.51.100.1:3478";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn firewall(f: F) -> Firewall {
        Firewall::new(NatBehavior::new(M::EndpointIndependent, f))
    }

    #[test]
    fn filtering_rows_rfc4787_section5() {
        // The host sent only to S1. (filtering, inbound sender, admitted?)
        let rows = [
            (F::EndpointIndependent, S1, true),
            (F::EndpointIndependent, "198.51.100.2:3479", true),
            (F::AddressDependent, S1, true),
            (F::AddressDependent, "198.51.100.1:3479", true),
            (F::AddressDependent, "198.51.100.2:3478", false),
            (F::AddressAndPortDependent, S1, true),
            (F::AddressAndPortDependent, "198.51.100.1:3479", false),
            (F::AddressAndPortDependent, "198.51.100.2:3478", false),
        ];
        let t0 = Instant::now();
        for (f, from, admitted) in rows {
            let mut fw = firewall(f);
            assert!(
                !fw.inbound(t0, Protocol::Udp, sa(S1), sa(HOST)),
                "nothing sent yet"
            );
            fw.outbound(t0, Protocol::Udp, sa(HOST), sa(S1));
            assert_eq!(
                fw.inbound(t0, Protocol::Udp, sa(from), sa(HOST)),
                admitted,
                "{f:?} {from}"
            );
            assert!(
                !fw.inbound(t0, Protocol::Tcp, sa(S1), sa(HOST)),
                "TCP has its own pinholes"
            );
            assert!(
                !fw.inbound(t0, Protocol::Udp, sa(S1), sa("203.0.113.2:40001")),
                "another host port has none"
            );
        }
    }

    #[test]
    fn pinholes_expire_and_refresh_by_rfc4787_req5_req6() {
        let t0 = Instant::now();
        let udp = Duration::from_secs(120);
        let mut fw = firewall(F::AddressAndPortDependent);
        fw.outbound(t0, Protocol::Udp, sa(HOST), sa(S1));
        fw.outbound(t0, Protocol::Tcp, sa(HOST), sa(S1));
        // Inbound does not refresh by default; outbound does.
        assert!(fw.inbound(t0 + udp / 2, Protocol::Udp, sa(S1), sa(HOST)));
        assert!(!fw.inbound(t0 + udp, Protocol::Udp, sa(S1), sa(HOST)));
        assert!(
            fw.inbound(t0 + udp, Protocol::Tcp, sa(S1), sa(HOST)),
            "TCP lasts longer"
        );
        fw.outbound(t0 + udp, Protocol::Udp, sa(HOST), sa(S1));
        assert!(fw.inbound(t0 + udp + udp / 2, Protocol::Udp, sa(S1), sa(HOST)));
        assert!(fw.has_internal(t0 + udp, Protocol::Udp, sa(HOST)));
        fw.sweep(t0 + 2 * udp + Duration::from_secs(1));
        assert_eq!(
            fw.pinholes(t0).filter(|p| p.proto == Protocol::Udp).count(),
            0
        );

        let mut refreshing = Firewall::new(NatBehavior {
            inbound_refresh: true,
            ..NatBehavior::new(M::EndpointIndependent, F::AddressAndPortDependent)
        });
        refreshing.outbound(t0, Protocol::Udp, sa(HOST), sa(S1));
        assert!(refreshing.inbound(t0 + udp / 2, Protocol::Udp, sa(S1), sa(HOST)));
        assert!(
            refreshing.inbound(t0 + udp, Protocol::Udp, sa(S1), sa(HOST)),
            "refreshed inbound"
        );
        let hole = refreshing.pinholes(t0 + udp).next().unwrap();
        assert_eq!(hole.expires, t0 + udp + udp);
        assert_eq!((hole.proto, hole.internal), (Protocol::Udp, sa(HOST)));
    }

    #[test]
    fn a_full_table_sweeps_then_forwards_without_remembering() {
        let t0 = Instant::now();
        let mut fw = firewall(F::AddressAndPortDependent);
        let remote =
            |i: usize| SocketAddr::from(([198, 51, 100, (i >> 16) as u8 + 1], (i & 0xffff) as u16));
        for i in 0..CAP {
            fw.outbound(t0, Protocol::Udp, sa(HOST), remote(i));
        }
        fw.outbound(t0, Protocol::Udp, sa(HOST), remote(CAP));
        assert!(
            !fw.inbound(t0, Protocol::Udp, remote(CAP), sa(HOST)),
            "not remembered at the cap"
        );
        assert!(
            fw.inbound(t0, Protocol::Udp, remote(0), sa(HOST)),
            "older pinholes stay"
        );
        let later = t0 + Duration::from_secs(121);
        fw.outbound(later, Protocol::Udp, sa(HOST), remote(CAP));
        assert!(
            fw.inbound(later, Protocol::Udp, remote(CAP), sa(HOST)),
            "expired ones were swept"
        );
        assert_eq!(fw.pinholes(later).count(), 1);
    }
}
