//! The NAT mapping table: outbound translation with RFC 4787 port allocation, inbound translation
//! with filtering, lazy expiry. Time is an input; randomness comes from a seeded generator, so every
//! run with the same seed and inputs makes the same choices (REQ-11, and reproducible tests).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{NatBehavior, Pooling, PortAllocation, Protocol, RemoteKey};
use crate::portmap::PortMappingService;

/// Cap on remembered filter permissions per mapping; the oldest is forgotten first.
const MAX_PERMISSIONS: usize = 64;
/// Attempts at finding a free random port before scanning linearly.
const RANDOM_TRIES: usize = 64;

/// Identifies a mapping: protocol, internal endpoint, and the part of the remote the mapping
/// behavior distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MapKey {
    proto: Protocol,
    internal: SocketAddr,
    remote: RemoteKey,
}

/// One live mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub proto: Protocol,
    pub internal: SocketAddr,
    pub external: SocketAddr,
    /// When it expires unless refreshed.
    pub expires: Instant,
    /// Remotes the filter admits, with their own expiry.
    permissions: Vec<(RemoteKey, Instant)>,
    /// Set when a port-mapping request (NAT-PMP, PCP, UPnP IGD) made or took over this mapping.
    pub requested: Option<Requested>,
}

/// What a port-mapping request asked of a mapping: while `until` has not passed, the mapping
/// admits inbound from anyone whatever the filtering (RFC 6886 §3.3, RFC 6887 §11: an explicit
/// mapping is endpoint-independent), and outbound traffic of its internal endpoint uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requested {
    pub service: PortMappingService,
    /// The PCP MAP nonce of the client that owns it (RFC 6887 §11.1); `None` for NAT-PMP and UPnP.
    pub nonce: Option<[u8; 12]>,
    /// End of the granted lifetime.
    pub until: Instant,
}

impl Mapping {
    /// The filter keys this mapping admits at `now` (blank fields match anything; a requested
    /// mapping admits everyone, one fully blank key).
    pub fn admits(&self, now: Instant) -> impl Iterator<Item = RemoteKey> + '_ {
        let anyone = self.requested_at(now).is_some().then_some(RemoteKey {
            ip: None,
            port: None,
        });
        anyone.into_iter().chain(
            self.permissions
                .iter()
                .filter(move |(_, exp)| *exp > now && anyone.is_none())
                .map(|(k, _)| *k),
        )
    }

    /// The port-mapping request behind this mapping, if its lifetime has not run out at `now`.
    pub fn requested_at(&self, now: Instant) -> Option<&Requested> {
        self.requested.as_ref().filter(|r| r.until > now)
    }
}

/// A port-mapping request for [`NatTable::map_requested`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    pub proto: Protocol,
    pub internal: SocketAddr,
    /// The external port asked for; 0 for no preference.
    pub external_port: u16,
    /// `true`: the exact port or nothing (UPnP AddPortMapping); `false`: another port when that
    /// one is taken (NAT-PMP, PCP MAP without PREFER_FAILURE, UPnP AddAnyPortMapping).
    pub exact: bool,
    pub lifetime: std::time::Duration,
    pub service: PortMappingService,
    pub nonce: Option<[u8; 12]>,
}

/// Why a port-mapping request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Nat(#[from] NatError),
    /// The exact external port asked for is in use (UPnP ConflictInMappingEntry).
    #[error("the external port is in use")]
    PortTaken,
    /// Another PCP client's nonce owns the mapping (RFC 6887 §11.3 NOT_AUTHORIZED).
    #[error("the mapping belongs to another nonce")]
    NotOwner,
    /// The internal host holds [`MAX_REQUESTED_PER_HOST`] requested mappings already.
    #[error("too many requested mappings for this host")]
    Quota,
}

/// Requested mappings one internal host may hold: bounds what a LAN client can make the table hold.
pub const MAX_REQUESTED_PER_HOST: usize = 128;

/// Why an outbound packet could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    #[error("no free external port in the configured range")]
    PortsExhausted,
    #[error("the nat has no external address of the packet's family")]
    NoExternalAddress,
}

/// The table of one NAT.
#[derive(Debug)]
pub struct NatTable {
    behavior: NatBehavior,
    external_ips: Vec<IpAddr>,
    mappings: HashMap<MapKey, Mapping>,
    by_external: HashMap<(Protocol, SocketAddr), MapKey>,
    /// Paired pooling: the external IP each internal IP was given.
    paired: HashMap<IpAddr, IpAddr>,
    last_port: Option<u16>,
    rng: StdRng,
}

impl NatTable {
    pub fn new(behavior: NatBehavior, external_ips: Vec<IpAddr>, seed: u64) -> Self {
        Self {
            behavior,
            external_ips,
            mappings: HashMap::new(),
            by_external: HashMap::new(),
            paired: HashMap::new(),
            last_port: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn behavior(&self) -> &NatBehavior {
        &self.behavior
    }

    pub fn external_ips(&self) -> &[IpAddr] {
        &self.external_ips
    }

    /// Whether `addr` is one of this NAT's external IPs (hairpin detection).
    pub fn is_external_ip(&self, ip: IpAddr) -> bool {
        self.external_ips.contains(&ip)
    }

    /// Translates an outbound packet from `internal` to `remote`: finds or creates the mapping,
    /// refreshes it (REQ-6), and opens the filter towards `remote`. Returns the external source.
    pub fn outbound(
        &mut self,
        now: Instant,
        proto: Protocol,
        internal: SocketAddr,
        remote: SocketAddr,
    ) -> Result<SocketAddr, NatError> {
        // A requested mapping is endpoint-independent, so its internal endpoint's traffic to any
        // remote leaves through it, whatever the mapping behavior (RFC 6887 §11.1).
        let explicit = Self::explicit_key(proto, internal);
        let key = match self.mappings.get(&explicit) {
            Some(m) if m.requested_at(now).is_some() => explicit,
            _ => MapKey {
                proto,
                internal,
                remote: self.behavior.mapping.key(remote),
            },
        };
        self.expire_key(now, &key);
        let timeout = self.behavior.timeout(proto);
        let filter_key = self.behavior.filtering.key(remote);
        if !self.mappings.contains_key(&key) {
            let external = self.allocate(now, proto, internal)?;
            self.by_external.insert((proto, external), key);
            self.mappings.insert(
                key,
                Mapping {
                    proto,
                    internal,
                    external,
                    expires: now + timeout,
                    permissions: Vec::new(),
                    requested: None,
                },
            );
        }
        let Some(m) = self.mappings.get_mut(&key) else {
            return Err(NatError::PortsExhausted);
        };
        // Traffic never shortens a requested lifetime.
        m.expires = m.expires.max(now + timeout);
        if let Some(p) = m.permissions.iter_mut().find(|(k, _)| *k == filter_key) {
            p.1 = now + timeout;
        } else {
            if m.permissions.len() >= MAX_PERMISSIONS {
                m.permissions.remove(0);
            }
            m.permissions.push((filter_key, now + timeout));
        }
        Ok(m.external)
    }

    /// Translates an inbound packet from `remote` to `external`. Returns the internal destination,
    /// or `None` when there is no live mapping or the filter refuses the sender.
    pub fn inbound(
        &mut self,
        now: Instant,
        proto: Protocol,
        remote: SocketAddr,
        external: SocketAddr,
    ) -> Option<SocketAddr> {
        let key = *self.by_external.get(&(proto, external))?;
        if self.expire_key(now, &key) {
            return None;
        }
        let filter_key = self.behavior.filtering.key(remote);
        let timeout = self.behavior.timeout(proto);
        let refresh = self.behavior.inbound_refresh;
        let m = self.mappings.get_mut(&key)?;
        let admitted = m.requested_at(now).is_some()
            || m.permissions
                .iter()
                .any(|(k, exp)| *k == filter_key && *exp > now);
        if !admitted {
            return None;
        }
        if refresh {
            m.expires = m.expires.max(now + timeout);
            for p in m.permissions.iter_mut().filter(|(k, _)| *k == filter_key) {
                p.1 = now + timeout;
            }
        }
        Some(m.internal)
    }

    /// The internal endpoint of the live mapping on `external`, filters ignored: hairpinning
    /// (REQ-9) treats the inside as trusted, and ICMP errors about a mapping's own traffic come
    /// from routers on the path, not from the filtered remote. Read-only: refreshes nothing.
    pub fn internal_of(
        &self,
        now: Instant,
        proto: Protocol,
        external: SocketAddr,
    ) -> Option<SocketAddr> {
        let key = self.by_external.get(&(proto, external))?;
        let m = self.mappings.get(key).filter(|m| m.expires > now)?;
        Some(m.internal)
    }

    /// The external endpoint of the live mapping `internal` uses towards `remote`, without
    /// creating or refreshing one (translating an ICMP error an inside host sends about a packet
    /// it received).
    pub fn external_of(
        &self,
        now: Instant,
        proto: Protocol,
        internal: SocketAddr,
        remote: SocketAddr,
    ) -> Option<SocketAddr> {
        let key = MapKey {
            proto,
            internal,
            remote: self.behavior.mapping.key(remote),
        };
        let m = self.mappings.get(&key).filter(|m| m.expires > now)?;
        Some(m.external)
    }

    fn explicit_key(proto: Protocol, internal: SocketAddr) -> MapKey {
        MapKey {
            proto,
            internal,
            remote: RemoteKey {
                ip: None,
                port: None,
            },
        }
    }

    /// The live mapping a port-mapping request made for `internal`, if any.
    pub fn requested(
        &self,
        now: Instant,
        proto: Protocol,
        internal: SocketAddr,
    ) -> Option<&Mapping> {
        self.mappings
            .get(&Self::explicit_key(proto, internal))
            .filter(|m| m.expires > now && m.requested_at(now).is_some())
    }

    /// The live requested mapping on `external`, if any (UPnP addresses mappings by external port).
    pub fn requested_on(
        &self,
        now: Instant,
        proto: Protocol,
        external: SocketAddr,
    ) -> Option<&Mapping> {
        let key = self.by_external.get(&(proto, external))?;
        self.mappings
            .get(key)
            .filter(|m| m.expires > now && m.requested_at(now).is_some())
    }

    /// Creates, refreshes or takes over the mapping of `r.internal` as a requested one (NAT-PMP
    /// RFC 6886 §3.3, PCP RFC 6887 §11.3, UPnP AddPortMapping). An existing mapping of that
    /// internal endpoint keeps its external port unless the request names another port that is
    /// free; a port held by someone else is refused when `exact` and replaced otherwise. The
    /// granted lifetime is `r.lifetime` from `now`. Returns the external endpoint.
    pub fn map_requested(
        &mut self,
        now: Instant,
        r: MapRequest,
    ) -> Result<SocketAddr, RequestError> {
        let key = Self::explicit_key(r.proto, r.internal);
        self.expire_key(now, &key);
        let existing = self
            .mappings
            .get(&key)
            .map(|m| (m.external, m.requested_at(now).copied()));
        if let Some((_, Some(owner))) = existing {
            if let (Some(have), Some(asked)) = (owner.nonce, r.nonce) {
                if have != asked {
                    return Err(RequestError::NotOwner);
                }
            }
        }
        if existing.is_none() {
            let held = self
                .mappings
                .values()
                .filter(|m| m.internal.ip() == r.internal.ip() && m.requested_at(now).is_some())
                .count();
            if held >= MAX_REQUESTED_PER_HOST {
                return Err(RequestError::Quota);
            }
        }
        let want_port =
            r.external_port != 0 && existing.is_none_or(|(ext, _)| ext.port() != r.external_port);
        let external = if want_port {
            let ip = match existing {
                Some((ext, _)) => ext.ip(),
                None => self.external_ip_for(r.internal.ip())?,
            };
            let port = r.external_port;
            if self.port_free(now, r.proto, ip, port, port) {
                Some(SocketAddr::new(ip, port))
            } else if r.exact {
                return Err(RequestError::PortTaken);
            } else {
                None
            }
        } else {
            None
        };
        let external = match (external, existing) {
            (Some(ext), _) => {
                if let Some((old, _)) = existing {
                    self.by_external.remove(&(r.proto, old));
                }
                ext
            }
            (None, Some((old, _))) => old,
            (None, None) => self.allocate(now, r.proto, r.internal)?,
        };
        self.by_external.insert((r.proto, external), key);
        let until = now + r.lifetime;
        let requested = Some(Requested {
            service: r.service,
            nonce: r
                .nonce
                .or(existing.and_then(|(_, q)| q.and_then(|q| q.nonce))),
            until,
        });
        let m = self.mappings.entry(key).or_insert_with(|| Mapping {
            proto: r.proto,
            internal: r.internal,
            external,
            expires: until,
            permissions: Vec::new(),
            requested: None,
        });
        m.external = external;
        m.expires = until;
        m.requested = requested;
        Ok(external)
    }

    /// Deletes the requested mapping of `internal` (lifetime 0: RFC 6886 §3.4, RFC 6887 §15,
    /// UPnP DeletePortMapping). A mapping made by traffic alone is left alone; a PCP nonce must
    /// match the owner's. Returns whether a mapping was deleted.
    pub fn unmap_requested(
        &mut self,
        now: Instant,
        proto: Protocol,
        internal: SocketAddr,
        nonce: Option<[u8; 12]>,
    ) -> Result<bool, RequestError> {
        let key = Self::explicit_key(proto, internal);
        let Some(owner) = self
            .mappings
            .get(&key)
            .and_then(|m| m.requested_at(now).copied())
        else {
            return Ok(false);
        };
        if let (Some(have), Some(asked)) = (owner.nonce, nonce) {
            if have != asked {
                return Err(RequestError::NotOwner);
            }
        }
        if let Some(m) = self.mappings.remove(&key) {
            self.by_external.remove(&(m.proto, m.external));
        }
        Ok(true)
    }

    /// Internal endpoints of `host`'s live requested `proto` mappings (NAT-PMP's delete-all).
    pub fn requested_of_host(
        &self,
        now: Instant,
        proto: Protocol,
        host: IpAddr,
    ) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .mappings
            .values()
            .filter(|m| {
                m.proto == proto && m.internal.ip() == host && m.requested_at(now).is_some()
            })
            .map(|m| m.internal)
            .collect();
        v.sort();
        v
    }

    /// Removes the mapping under `key` if it has expired; returns whether it did.
    fn expire_key(&mut self, now: Instant, key: &MapKey) -> bool {
        match self.mappings.get(key) {
            Some(m) if m.expires <= now => {
                let ext = (m.proto, m.external);
                self.mappings.remove(key);
                self.by_external.remove(&ext);
                true
            }
            _ => false,
        }
    }

    /// Drops every expired mapping (callers may do this periodically to bound memory).
    pub fn sweep(&mut self, now: Instant) {
        let dead: Vec<MapKey> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            self.expire_key(now, &k);
        }
    }

    /// Live mappings, for `lab nat-table` and tests.
    pub fn mappings(&self, now: Instant) -> impl Iterator<Item = &Mapping> {
        self.mappings.values().filter(move |m| m.expires > now)
    }

    /// The external IP `internal`'s mappings use (paired pooling keeps it per host): what a
    /// port-mapping server reports as the external address.
    pub fn external_ip_for(&mut self, internal: IpAddr) -> Result<IpAddr, NatError> {
        let family: Vec<IpAddr> = self
            .external_ips
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv4() == internal.is_ipv4())
            .collect();
        if family.is_empty() {
            return Err(NatError::NoExternalAddress);
        }
        Ok(match self.behavior.pooling {
            Pooling::Paired => {
                if let Some(ip) = self.paired.get(&internal) {
                    *ip
                } else {
                    let ip = family[self.rng.gen_range(0..family.len())];
                    self.paired.insert(internal, ip);
                    ip
                }
            }
            Pooling::Arbitrary => family[self.rng.gen_range(0..family.len())],
        })
    }

    /// Whether `ip:port` may be handed out now; a port held by an expired mapping is reclaimed.
    fn port_free(
        &mut self,
        now: Instant,
        proto: Protocol,
        ip: IpAddr,
        port: u16,
        parity_of: u16,
    ) -> bool {
        let (lo, hi) = self.behavior.port_range;
        if !(lo..=hi).contains(&port) || (self.behavior.port_parity && port % 2 != parity_of % 2) {
            return false;
        }
        match self
            .by_external
            .get(&(proto, SocketAddr::new(ip, port)))
            .copied()
        {
            None => true,
            Some(key) => self.expire_key(now, &key),
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        proto: Protocol,
        internal: SocketAddr,
    ) -> Result<SocketAddr, NatError> {
        let ip = self.external_ip_for(internal.ip())?;
        let (lo, hi) = self.behavior.port_range;
        let want = internal.port();
        let span = u32::from(hi - lo) + 1;
        let start = match self.behavior.allocation {
            PortAllocation::Preserve => {
                if self.port_free(now, proto, ip, want, want) {
                    return Ok(SocketAddr::new(ip, want));
                }
                want
            }
            PortAllocation::Sequential { step } => {
                let step = u32::from(step.max(1));
                let next = match self.last_port {
                    Some(p) => lo as u32 + (u32::from(p - lo) + step) % span,
                    None => u32::from(want.clamp(lo, hi)),
                };
                next as u16
            }
            PortAllocation::Random => {
                for _ in 0..RANDOM_TRIES {
                    let p = self.rng.gen_range(lo..=hi);
                    if self.port_free(now, proto, ip, p, want) {
                        self.last_port = Some(p);
                        return Ok(SocketAddr::new(ip, p));
                    }
                }
                self.rng.gen_range(lo..=hi)
            }
        };
        // Scan forward from `start` for the first free port (bounded by the range size).
        let step = match self.behavior.allocation {
            PortAllocation::Sequential { step } => u32::from(step.max(1)),
            _ => 1,
        };
        let base = u32::from(start.clamp(lo, hi) - lo);
        for i in 0..span {
            let p = (lo as u32 + (base + i * step) % span) as u16;
            if self.port_free(now, proto, ip, p, want) {
                self.last_port = Some(p);
                return Ok(SocketAddr::new(ip, p));
            }
        }
        Err(NatError::PortsExhausted)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FilteringBehavior as F, MappingBehavior as M};
    use super::*;
    use std::time::Duration;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const INSIDE: &str = "10.0.0.2:5000";
    const S1: &str = "198.51.100.1:3478";
    const S1_P2: &str = "198.51.100.1:3479";
    const S2: &str = "198.51.100.2:3478";
    const S2_P2: &str = "198.51.100.2:3479";

    fn table(m: M, f: F) -> NatTable {
        NatTable::new(
            NatBehavior::new(m, f),
            vec!["203.0.113.1".parse().unwrap()],
            7,
        )
    }

    fn request(port: u16, exact: bool, secs: u64, nonce: Option<[u8; 12]>) -> MapRequest {
        MapRequest {
            proto: Protocol::Udp,
            internal: sa(INSIDE),
            external_port: port,
            exact,
            lifetime: Duration::from_secs(secs),
            service: PortMappingService::Pcp,
            nonce,
        }
    }

    #[test]
    fn requested_mappings_are_endpoint_independent_for_their_lifetime() {
        let t0 = Instant::now();
        let mut t = table(M::AddressAndPortDependent, F::AddressAndPortDependent);
        let ext = t
            .map_requested(t0, request(6000, false, 30, Some([1; 12])))
            .unwrap();
        assert_eq!(ext, sa("203.0.113.1:6000"));
        // Outbound to any remote leaves through it, though the mapping behavior is APDM.
        assert_eq!(t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S1)), Ok(ext));
        assert_eq!(
            t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S2_P2)),
            Ok(ext)
        );
        // Inbound from a remote never sent to, though the filter is APDF.
        assert_eq!(
            t.inbound(t0, Protocol::Udp, sa(S1_P2), ext),
            Some(sa(INSIDE))
        );
        let row = t.mappings(t0).find(|m| m.external == ext).unwrap();
        assert_eq!(
            row.admits(t0).collect::<Vec<_>>(),
            [RemoteKey {
                ip: None,
                port: None
            }]
        );
        // Another nonce owns nothing; the owner refreshes.
        assert_eq!(
            t.map_requested(t0, request(0, false, 30, Some([2; 12]))),
            Err(RequestError::NotOwner)
        );
        assert_eq!(
            t.unmap_requested(t0, Protocol::Udp, sa(INSIDE), Some([2; 12])),
            Err(RequestError::NotOwner)
        );
        // Past the lifetime, traffic keeps it as an ordinary mapping: the filter is back.
        let later = t0 + Duration::from_secs(31);
        assert_eq!(
            t.outbound(
                t0 + Duration::from_secs(29),
                Protocol::Udp,
                sa(INSIDE),
                sa(S1)
            ),
            Ok(ext)
        );
        assert_eq!(t.inbound(later, Protocol::Udp, sa(S2), ext), None);
        assert_eq!(
            t.inbound(later, Protocol::Udp, sa(S1), ext),
            Some(sa(INSIDE))
        );
        assert!(t.requested(later, Protocol::Udp, sa(INSIDE)).is_none());
    }

    #[test]
    fn a_taken_port_is_refused_or_replaced_and_deletion_frees_it() {
        let t0 = Instant::now();
        let mut t = table(M::EndpointIndependent, F::AddressAndPortDependent);
        // Another host's traffic holds 6000.
        t.outbound(t0, Protocol::Udp, sa("10.0.0.3:6000"), sa(S1))
            .unwrap();
        assert_eq!(
            t.map_requested(t0, request(6000, true, 30, None)),
            Err(RequestError::PortTaken)
        );
        let other = t.map_requested(t0, request(6000, false, 30, None)).unwrap();
        assert_ne!(other.port(), 6000);
        assert_eq!(
            t.unmap_requested(t0, Protocol::Udp, sa(INSIDE), None),
            Ok(true)
        );
        assert_eq!(t.inbound(t0, Protocol::Udp, sa(S1), other), None);
        assert_eq!(
            t.unmap_requested(t0, Protocol::Udp, sa(INSIDE), None),
            Ok(false)
        );
        // A mapping made by traffic alone is not deleted by a request.
        let implicit = t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S1)).unwrap();
        assert_eq!(
            t.unmap_requested(t0, Protocol::Udp, sa(INSIDE), None),
            Ok(false)
        );
        assert_eq!(
            t.inbound(t0, Protocol::Udp, sa(S1), implicit),
            Some(sa(INSIDE))
        );
    }

    #[test]
    fn a_host_holds_a_bounded_number_of_requested_mappings() {
        let t0 = Instant::now();
        let mut t = table(M::EndpointIndependent, F::EndpointIndependent);
        for port in 0..MAX_REQUESTED_PER_HOST as u16 {
            let mut r = request(0, false, 30, None);
            r.internal = SocketAddr::new(r.internal.ip(), 2000 + port);
            t.map_requested(t0, r).unwrap();
        }
        let mut r = request(0, false, 30, None);
        r.internal = sa("10.0.0.2:9999");
        assert_eq!(t.map_requested(t0, r), Err(RequestError::Quota));
    }

    #[test]
    fn mapping_rows_rfc4787_section4_1() {
        // (behavior, second destination, same external as towards S1?)
        let rows = [
            (M::EndpointIndependent, S2_P2, true),
            (M::AddressDependent, S1_P2, true),
            (M::AddressDependent, S2, false),
            (M::AddressAndPortDependent, S1_P2, false),
            (M::AddressAndPortDependent, S1, true),
        ];
        for (m, dst, same) in rows {
            let t0 = Instant::now();
            let mut t = table(m, F::AddressAndPortDependent);
            let e1 = t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S1)).unwrap();
            let e2 = t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(dst)).unwrap();
            assert_eq!(e1 == e2, same, "{m:?} towards {dst}");
            // Return path: each destination's reply reaches the inside host through its mapping.
            assert_eq!(
                t.inbound(t0, Protocol::Udp, sa(dst), e2),
                Some(sa(INSIDE)),
                "{m:?}"
            );
        }
    }

    #[test]
    fn filtering_rows_rfc4787_section5() {
        // Inside sent only to S1. (behavior, inbound sender, admitted?)
        let rows = [
            (F::EndpointIndependent, S2_P2, true),
            (F::AddressDependent, S1_P2, true),
            (F::AddressDependent, S2, false),
            (F::AddressAndPortDependent, S1, true),
            (F::AddressAndPortDependent, S1_P2, false),
        ];
        for (f, from, admitted) in rows {
            let t0 = Instant::now();
            let mut t = table(M::EndpointIndependent, f);
            let ext = t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S1)).unwrap();
            assert_eq!(
                t.inbound(t0, Protocol::Udp, sa(from), ext).is_some(),
                admitted,
                "{f:?} from {from}"
            );
        }
    }

    #[test]
    fn mappings_expire_and_refresh_on_virtual_clock() {
        let t0 = Instant::now();
        let mut b = NatBehavior::new(M::EndpointIndependent, F::EndpointIndependent);
        b.udp_timeout = Duration::from_secs(30);
        let mut t = NatTable::new(b.clone(), vec!["203.0.113.1".parse().unwrap()], 1);
        let ext = t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S1)).unwrap();
        // Inbound does not refresh (REQ-6 default), outbound does.
        let t20 = t0 + Duration::from_secs(20);
        assert!(t.inbound(t20, Protocol::Udp, sa(S1), ext).is_some());
        assert!(t
            .inbound(t0 + Duration::from_secs(31), Protocol::Udp, sa(S1), ext)
            .is_none());
        let ext2 = t
            .outbound(
                t0 + Duration::from_secs(31),
                Protocol::Udp,
                sa(INSIDE),
                sa(S1),
            )
            .unwrap();
        assert!(t
            .inbound(t0 + Duration::from_secs(60), Protocol::Udp, sa(S1), ext2)
            .is_some());
        // With inbound refresh, inbound traffic alone keeps it alive.
        b.inbound_refresh = true;
        let mut t = NatTable::new(b, vec!["203.0.113.1".parse().unwrap()], 1);
        let ext = t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S1)).unwrap();
        for s in [20, 40, 60, 80] {
            assert!(
                t.inbound(t0 + Duration::from_secs(s), Protocol::Udp, sa(S1), ext)
                    .is_some(),
                "at {s}s"
            );
        }
    }

    #[test]
    fn port_allocation_patterns() {
        let t0 = Instant::now();
        let ext_ip: IpAddr = "203.0.113.1".parse().unwrap();
        // Preserve: the internal port when free, something else when taken.
        let mut t = table(M::EndpointIndependent, F::EndpointIndependent);
        assert_eq!(
            t.outbound(t0, Protocol::Udp, sa("10.0.0.2:5000"), sa(S1))
                .unwrap()
                .port(),
            5000
        );
        assert_ne!(
            t.outbound(t0, Protocol::Udp, sa("10.0.0.3:5000"), sa(S1))
                .unwrap()
                .port(),
            5000
        );
        // Sequential: constant delta between consecutive new mappings.
        let mut b = NatBehavior::new(M::AddressAndPortDependent, F::AddressAndPortDependent);
        b.allocation = PortAllocation::Sequential { step: 3 };
        let mut t = NatTable::new(b, vec![ext_ip], 1);
        let ports: Vec<u16> = (0..5)
            .map(|i| {
                t.outbound(
                    t0,
                    Protocol::Udp,
                    sa(INSIDE),
                    SocketAddr::new("198.51.100.1".parse().unwrap(), 4000 + i),
                )
                .unwrap()
                .port()
            })
            .collect();
        assert!(ports.windows(2).all(|w| w[1] == w[0] + 3), "{ports:?}");
        // Random with parity: all distinct, all the internal port's parity, all in range.
        let mut b = NatBehavior::new(M::AddressAndPortDependent, F::AddressAndPortDependent);
        b.allocation = PortAllocation::Random;
        b.port_parity = true;
        b.port_range = (40000, 40999);
        let mut t = NatTable::new(b, vec![ext_ip], 9);
        let mut seen = std::collections::HashSet::new();
        for i in 0..200 {
            let p = t
                .outbound(
                    t0,
                    Protocol::Udp,
                    sa("10.0.0.2:5001"),
                    SocketAddr::new("198.51.100.1".parse().unwrap(), 1000 + i),
                )
                .unwrap()
                .port();
            assert!(
                (40000..=40999).contains(&p) && p % 2 == 1 && seen.insert(p),
                "{p}"
            );
        }
    }

    #[test]
    fn read_only_lookups_ignore_filters_and_refresh_nothing() {
        let t0 = Instant::now();
        let mut t = table(M::AddressDependent, F::AddressAndPortDependent);
        let ext = t.outbound(t0, Protocol::Icmp, sa(INSIDE), sa(S1)).unwrap();
        assert_eq!(t.internal_of(t0, Protocol::Icmp, ext), Some(sa(INSIDE)));
        assert_eq!(t.internal_of(t0, Protocol::Udp, ext), None);
        assert_eq!(
            t.external_of(t0, Protocol::Icmp, sa(INSIDE), sa(S1_P2)),
            Some(ext)
        );
        assert_eq!(t.external_of(t0, Protocol::Icmp, sa(INSIDE), sa(S2)), None);
        let m = t.mappings(t0).next().unwrap();
        assert_eq!(m.admits(t0).count(), 1);
        // ICMP query mappings last 60 s (RFC 5508 REQ-1), and lookups did not extend that.
        let t61 = t0 + Duration::from_secs(61);
        assert_eq!(t.internal_of(t61, Protocol::Icmp, ext), None);
        assert_eq!(t.external_of(t61, Protocol::Icmp, sa(INSIDE), sa(S1)), None);
    }

    #[test]
    fn exhaustion_is_an_error_not_a_reuse() {
        let t0 = Instant::now();
        let mut b = NatBehavior::new(M::AddressAndPortDependent, F::AddressAndPortDependent);
        b.port_range = (50000, 50003);
        let mut t = NatTable::new(b, vec!["203.0.113.1".parse().unwrap()], 1);
        for i in 0..4 {
            t.outbound(
                t0,
                Protocol::Udp,
                sa(INSIDE),
                SocketAddr::new("198.51.100.1".parse().unwrap(), 10 + i),
            )
            .unwrap();
        }
        assert_eq!(
            t.outbound(t0, Protocol::Udp, sa(INSIDE), sa(S2)),
            Err(NatError::PortsExhausted)
        );
        // Once they expire the ports come back.
        let later = t0 + Duration::from_secs(121);
        assert!(
            t.outbound(later, Protocol::Udp, sa(INSIDE), sa(S2)).is_ok() || {
                t.sweep(later);
                t.outbound(later, Protocol::Udp, sa(INSIDE), sa(S2)).is_ok()
            }
        );
    }
}
