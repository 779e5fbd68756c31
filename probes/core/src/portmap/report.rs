//! The probe's `port_mapping` section and the `double_nat` / `cgnat` verdicts (issue 12), as data.
//!
//! Each protocol's client (NAT-PMP, PCP, and UPnP IGD once its client lands) ends in an
//! [`Outcome`]; [`PortMappingReport::new`] lists them as [`ServiceReport`]s, whatever the protocol,
//! so a third protocol plugs in as one more `(service, outcome)` pair. [`PortMappingReport::judge`]
//! then decides which external address to believe and what it says about the path, against the
//! address STUN saw (NAT-REFERENCE.md, "Double NAT / CGNAT signs"):
//!
//! - A claim that no gateway could hold (unspecified, loopback, multicast, broadcast, link-local,
//!   this host's own address) is a problem line and is not believed; so is a global address that
//!   differs from the STUN-mapped one — a NAT beyond the gateway would translate from private or
//!   shared space (RFC 1918, RFC 6598), not from another global address — and two protocols that
//!   disagree with each other and with STUN.
//! - `double_nat`: the believed external address is private or shared, or differs from the STUN
//!   mapped address, or PCP answered ADDRESS_MISMATCH → `true`; it equals the STUN-mapped address
//!   → `false`; otherwise `null`.
//! - `cgnat`: the STUN-mapped or the believed external address is in 100.64.0.0/10, or a second
//!   translation is seen beyond an address that is not RFC 1918 (a home router's would be) →
//!   `true`; the gateway's address is the STUN-mapped one → `false`; otherwise `null`.

use std::net::{IpAddr, SocketAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::exchange::Outcome;
use super::PortMappingService;

/// The problem line while the UPnP IGD client is not part of the probe.
pub const UPNP_NOT_PROBED: &str = "UPnP not probed";

/// One protocol's answer, as the report shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceReport {
    /// `nat-pmp`, `pcp` or `upnp`.
    pub service: PortMappingService,
    /// The gateway speaks it; `null` when not asked.
    pub available: Option<bool>,
    /// The external address this protocol claims, as claimed (`external_address` above is the one
    /// believed).
    pub external_address: Option<IpAddr>,
    /// PCP's ADDRESS_MISMATCH: a NAT between this host and the PCP server.
    pub address_mismatch: bool,
    /// Datagrams (or HTTP requests) sent, retransmissions included.
    pub requests_sent: u32,
    /// Answers accepted.
    pub answers: u32,
    /// Time to the first answer, or to giving up, in ms.
    pub duration_ms: f64,
}

/// The mapping `--map` created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MappedPort {
    /// The protocol that created it.
    pub protocol: PortMappingService,
    /// The local socket it forwards to.
    pub internal: SocketAddr,
    /// The external address and port the gateway assigned.
    pub external: SocketAddr,
    /// The lifetime granted, in seconds.
    pub lifetime_s: u32,
    /// A STUN answer sent to the external port (RESPONSE-PORT, from another local socket's
    /// request) arrived on the mapped socket.
    pub inbound_verified: bool,
}

/// The probe's `port_mapping` section (natscope.probe/v1, docs/probe.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PortMappingReport {
    /// UPnP IGD answered; `null` when not probed.
    pub upnp: Option<bool>,
    /// NAT-PMP answered; `null` when not probed.
    pub nat_pmp: Option<bool>,
    /// PCP answered; `null` when not probed.
    pub pcp: Option<bool>,
    /// The default gateway the services were asked at; `null` when none was found.
    pub gateway: Option<IpAddr>,
    /// The gateway's external address, when a protocol claimed one and it is believed.
    pub external_address: Option<IpAddr>,
    /// The mapping `--map` created (and deleted again), `null` without `--map` or a mapping.
    pub mapped: Option<MappedPort>,
    /// What went wrong or looked wrong, in words.
    pub problems: Vec<String>,
    /// Each protocol asked, in the order `upnp`, `nat-pmp`, `pcp`.
    pub services: Vec<ServiceReport>,
}

/// What the external addresses say about the path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathVerdicts {
    pub double_nat: Option<bool>,
    pub cgnat: Option<bool>,
}

/// How an address is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressScope {
    /// RFC 1918 (IPv4) or a unique local address (IPv6, RFC 4193).
    Private,
    /// 100.64.0.0/10, the carrier-grade NAT space (RFC 6598).
    Shared,
    /// No gateway's external address: unspecified, loopback, multicast, broadcast, link-local.
    Unusable,
    /// Anything else (documentation ranges included: the lab's internet uses them).
    Global,
}

/// The scope of `ip`.
pub fn scope(ip: IpAddr) -> AddressScope {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_private() {
                AddressScope::Private
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                AddressScope::Shared
            } else if v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
                || o[0] == 0
            {
                AddressScope::Unusable
            } else {
                AddressScope::Global
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if (s[0] & 0xfe00) == 0xfc00 {
                AddressScope::Private
            } else if v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
            {
                AddressScope::Unusable
            } else {
                AddressScope::Global
            }
        }
    }
}

impl PortMappingReport {
    /// The section for the services asked at `gateway`, each with its client's outcome. A service
    /// missing from `outcomes` is `null`; UPnP's absence is said in a problem line.
    pub fn new(gateway: Option<IpAddr>, outcomes: &[(PortMappingService, &Outcome)]) -> Self {
        let mut r = Self {
            upnp: None,
            nat_pmp: None,
            pcp: None,
            gateway,
            external_address: None,
            mapped: None,
            problems: Vec::new(),
            services: Vec::new(),
        };
        for service in PortMappingService::ALL {
            let Some((_, o)) = outcomes.iter().find(|(s, _)| *s == service) else {
                if service == PortMappingService::Upnp {
                    r.problems.push(UPNP_NOT_PROBED.into());
                }
                continue;
            };
            *r.slot(service) = o.available;
            r.problems.extend(o.problems.iter().cloned());
            r.services.push(ServiceReport {
                service,
                available: o.available,
                external_address: o.external_address,
                address_mismatch: o.address_mismatch,
                requests_sent: o.requests_sent,
                answers: o.answers,
                duration_ms: o.duration_ms,
            });
        }
        r
    }

    /// The section when no gateway was found (or port mapping could not start): every service
    /// `null`, and why.
    pub fn not_run(gateway: Option<IpAddr>, why: String) -> Self {
        let mut r = Self::new(gateway, &[]);
        r.problems.insert(0, why);
        r
    }

    fn slot(&mut self, s: PortMappingService) -> &mut Option<bool> {
        match s {
            PortMappingService::Upnp => &mut self.upnp,
            PortMappingService::NatPmp => &mut self.nat_pmp,
            PortMappingService::Pcp => &mut self.pcp,
        }
    }

    /// Decides which claimed external address to believe (setting `external_address`, adding
    /// problem lines for the rest) and what it says about the path, given the address STUN saw
    /// (`stun_mapped`) and this host's own address (`local`). See the module comment.
    pub fn judge(&mut self, stun_mapped: Option<IpAddr>, local: Option<IpAddr>) -> PathVerdicts {
        let stun = stun_mapped.map(|a| a.to_canonical());
        let mut believed: Vec<IpAddr> = Vec::new();
        for s in &self.services {
            let Some(claim) = s.external_address.map(|a| a.to_canonical()) else {
                continue;
            };
            let why = match scope(claim) {
                AddressScope::Unusable => Some("no gateway can hold that address"),
                _ if Some(claim) == local.map(|l| l.to_canonical()) => {
                    Some("it is this host's own address")
                }
                AddressScope::Global if stun.is_some_and(|m| m != claim) => Some(
                    "STUN sees another global address, and a NAT beyond the gateway would translate from private or shared space",
                ),
                _ => None,
            };
            match why {
                Some(why) => self.problems.push(format!(
                    "{} claims the external address {claim}, not believed: {why}",
                    s.service
                )),
                None if !believed.contains(&claim) => believed.push(claim),
                None => {}
            }
        }
        if believed.len() > 1 {
            // Protocols disagree: keep the one STUN confirms, if any.
            let confirmed = believed.iter().copied().find(|b| Some(*b) == stun);
            self.problems.push(format!(
                "the protocols claim different external addresses ({}){}",
                believed
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                if confirmed.is_some() {
                    "; keeping the one STUN confirms"
                } else {
                    "; believing none"
                }
            ));
            believed = confirmed.into_iter().collect();
        }
        self.external_address = believed.first().copied();
        let mismatch = self.services.iter().any(|s| s.address_mismatch);
        let mut v = PathVerdicts::default();
        let shared = |a: Option<IpAddr>| a.is_some_and(|a| scope(a) == AddressScope::Shared);
        if let Some(ext) = self.external_address {
            let differs = stun.is_some_and(|m| m != ext);
            let inner = matches!(scope(ext), AddressScope::Private | AddressScope::Shared);
            v.double_nat = if inner || differs {
                Some(true)
            } else if stun == Some(ext) {
                Some(false)
            } else {
                None
            };
            // A second translation beyond an address that is not a home network's.
            v.cgnat = if shared(Some(ext))
                || shared(stun)
                || (differs && scope(ext) != AddressScope::Private)
            {
                Some(true)
            } else if stun == Some(ext) {
                Some(false)
            } else {
                None
            };
        } else if shared(stun) {
            v.cgnat = Some(true);
        }
        if mismatch {
            v.double_nat = Some(true);
        }
        v
    }

    /// The best protocol to create a mapping with: PCP, then NAT-PMP, then UPnP IGD (a SOAP
    /// exchange over TCP, the slowest), among those that answered.
    pub fn best_service(&self) -> Option<PortMappingService> {
        [
            PortMappingService::Pcp,
            PortMappingService::NatPmp,
            PortMappingService::Upnp,
        ]
        .into_iter()
        .find(|s| {
            self.services
                .iter()
                .any(|r| r.service == *s && r.available == Some(true) && !r.address_mismatch)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::exchange::Outcome;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn answered(external: Option<&str>) -> Outcome {
        Outcome {
            available: Some(true),
            external_address: external.map(ip),
            answers: 1,
            ..Outcome::default()
        }
    }

    fn silent() -> Outcome {
        Outcome {
            available: Some(false),
            ..Outcome::default()
        }
    }

    /// (NAT-PMP claim, PCP claim, STUN mapped) → (believed, double NAT, CGNAT, problem words).
    #[test]
    fn external_addresses_are_judged_against_stun() {
        type Row<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<bool>,
            Option<bool>,
            &'a str,
        );
        let rows: [Row; 11] = [
            // One NAT with a public address: what STUN sees.
            (
                Some("203.0.113.7"),
                None,
                Some("203.0.113.7"),
                Some("203.0.113.7"),
                Some(false),
                Some(false),
                "",
            ),
            // The gateway's WAN is private: a second NAT upstream (at home, not known to be a carrier).
            (
                Some("192.168.1.2"),
                None,
                Some("203.0.113.7"),
                Some("192.168.1.2"),
                Some(true),
                None,
                "",
            ),
            // Carrier-grade NAT space.
            (
                Some("100.64.0.9"),
                Some("100.64.0.9"),
                Some("203.0.113.7"),
                Some("100.64.0.9"),
                Some(true),
                Some(true),
                "",
            ),
            // A mapped address in 100.64/10 is CGNAT whatever the gateway says.
            (None, None, Some("100.72.1.1"), None, None, Some(true), ""),
            // No service, no evidence.
            (None, None, Some("203.0.113.7"), None, None, None, ""),
            // Lies: addresses no gateway holds.
            (
                Some("0.0.0.0"),
                None,
                Some("203.0.113.7"),
                None,
                None,
                None,
                "not believed",
            ),
            (
                Some("127.0.0.1"),
                None,
                None,
                None,
                None,
                None,
                "not believed",
            ),
            (
                Some("10.0.0.2"),
                None,
                Some("203.0.113.7"),
                None,
                None,
                None,
                "own address",
            ),
            // A global address that is not the one STUN sees.
            (
                Some("198.51.100.99"),
                None,
                Some("203.0.113.7"),
                None,
                None,
                None,
                "another global address",
            ),
            // The protocols disagree; STUN settles it.
            (
                Some("198.51.100.99"),
                Some("203.0.113.7"),
                Some("203.0.113.7"),
                Some("203.0.113.7"),
                Some(false),
                Some(false),
                "not believed",
            ),
            // Without STUN, a public claim stands but proves nothing about a second NAT.
            (
                Some("203.0.113.7"),
                None,
                None,
                Some("203.0.113.7"),
                None,
                None,
                "",
            ),
        ];
        for (pmp, pcp, stun, believed, double, cgnat, words) in rows {
            let (a, b) = (answered(pmp), answered(pcp));
            let mut r = PortMappingReport::new(
                Some(ip("10.0.0.1")),
                &[
                    (PortMappingService::NatPmp, &a),
                    (PortMappingService::Pcp, &b),
                ],
            );
            let v = r.judge(stun.map(ip), Some(ip("10.0.0.2")));
            let row = format!("{pmp:?} {pcp:?} {stun:?}: {r:?}");
            assert_eq!(r.external_address, believed.map(ip), "{row}");
            assert_eq!(v.double_nat, double, "double NAT: {row}");
            assert_eq!(v.cgnat, cgnat, "cgnat: {row}");
            assert_eq!(r.problems[0], UPNP_NOT_PROBED, "{row}");
            if words.is_empty() {
                assert_eq!(r.problems.len(), 1, "{row}");
            } else {
                assert!(r.problems.iter().any(|p| p.contains(words)), "{row}");
            }
        }
    }

    #[test]
    fn address_mismatch_is_double_nat_and_rules_out_mapping_over_pcp() {
        let pmp = silent();
        let pcp = Outcome {
            address_mismatch: true,
            ..answered(None)
        };
        let mut r = PortMappingReport::new(
            Some(ip("10.0.0.1")),
            &[
                (PortMappingService::NatPmp, &pmp),
                (PortMappingService::Pcp, &pcp),
            ],
        );
        assert_eq!(
            r.judge(Some(ip("203.0.113.7")), None).double_nat,
            Some(true)
        );
        assert_eq!((r.nat_pmp, r.pcp, r.upnp), (Some(false), Some(true), None));
        assert_eq!(r.best_service(), None);
    }

    #[test]
    fn pcp_is_preferred_for_mapping() {
        let (a, b) = (answered(Some("203.0.113.7")), answered(Some("203.0.113.7")));
        let r = PortMappingReport::new(
            None,
            &[
                (PortMappingService::NatPmp, &a),
                (PortMappingService::Pcp, &b),
            ],
        );
        assert_eq!(r.best_service(), Some(PortMappingService::Pcp));
        let r = PortMappingReport::new(None, &[(PortMappingService::NatPmp, &a)]);
        assert_eq!(r.best_service(), Some(PortMappingService::NatPmp));
    }

    #[test]
    fn the_json_has_the_contracts_names() {
        let a = answered(Some("203.0.113.7"));
        let mut r = PortMappingReport::new(Some(ip("10.0.0.1")), &[(PortMappingService::Pcp, &a)]);
        r.judge(Some(ip("203.0.113.7")), None);
        r.mapped = Some(MappedPort {
            protocol: PortMappingService::Pcp,
            internal: "10.0.0.2:4000".parse().unwrap(),
            external: "203.0.113.7:5000".parse().unwrap(),
            lifetime_s: 120,
            inbound_verified: true,
        });
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "upnp",
            "nat_pmp",
            "pcp",
            "gateway",
            "external_address",
            "mapped",
            "problems",
        ] {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        assert_eq!(v["upnp"], serde_json::Value::Null);
        assert_eq!(v["pcp"], true);
        assert_eq!(v["gateway"], "10.0.0.1");
        assert_eq!(v["mapped"]["protocol"], "pcp");
        assert_eq!(v["mapped"]["external"], "203.0.113.7:5000");
        assert_eq!(v["mapped"]["inbound_verified"], true);
        let back: PortMappingReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn scopes() {
        use AddressScope::*;
        for (a, s) in [
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("192.168.0.1", Private),
            ("100.64.0.1", Shared),
            ("100.127.255.255", Shared),
            ("100.128.0.1", Global),
            ("0.0.0.0", Unusable),
            ("224.0.0.1", Unusable),
            ("255.255.255.255", Unusable),
            ("169.254.1.1", Unusable),
            ("198.51.100.1", Global),
            ("::ffff:100.64.0.1", Shared),
            ("fd00::1", Private),
            ("fe80::1", Unusable),
            ("2001:db8::1", Global),
        ] {
            assert_eq!(scope(ip(a)), s, "{a}");
        }
    }
}
