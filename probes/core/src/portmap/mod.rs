//! Port-mapping protocols' wire formats, sans-IO, for both sides: the probe's client and the lab
//! router's server encode and parse with the same code (issue 12).
//!
//! - [`natpmp`]: NAT-PMP (RFC 6886): external-address and UDP/TCP map requests and responses.
//! - [`pcp`]: PCP (RFC 6887): ANNOUNCE and MAP requests and responses, options, version negotiation.
//! - [`pmp_client`], [`pcp_client`]: the probe's client machines over those codecs (one per
//!   protocol, sans-IO, on the [`exchange`] retransmission schedule), ending in an [`Outcome`].
//! - [`report`]: the probe's `port_mapping` section and the `double_nat` / `cgnat` verdicts.
//! - [`igd`]: UPnP IGD, client direction: SSDP search, device description, SOAP actions.
//! - [`igd_server`]: the gateway side of UPnP IGD (SSDP answers, description, WANIPConnection:2
//!   SOAP); it reads XML with [`igd`]'s reader and escapes with its escaper. The HTTP heads are
//!   still read two ways (`httparse` for the gateway's requests, [`igd`]'s own reader for the
//!   client's responses).
//! - [`server`]: the gateway side of NAT-PMP and PCP, answering from a
//!   [`crate::nat::table::NatTable`] (the lab router's port-mapping service).
//!
//! Every parser takes `&[u8]` and returns a typed message or a typed error; none panics, and none
//! allocates more than its (bounded) input. Every encoder's bytes parse back to the same value
//! (`fuzzing::natpmp_parse` / `fuzzing::pcp_parse` and the seeded round-trip test below check it).
//!
//! # Why hand-written (evaluated December 2026)
//!
//! The core may not depend on tokio, socket2, nix, pnet or mio, and the lab engine needs the
//! *server* direction (parse requests, encode responses), which no crate offers:
//!
//! - `portmapper` 0.16 (n0/iroh, the most used): tokio, socket2, netwatch, igd-next and hyper are
//!   normal dependencies; its `nat_pmp`/`pcp` protocol modules are private (the public API is
//!   `Client`/`Service`/`ProbeOutput`) and client-only (requests encode, responses decode).
//! - `crab_nat` 0.7.3: an async client on tokio's `UdpSocket` (tokio unconditional); no
//!   request parsing or response encoding, no ANNOUNCE, no options.
//! - `igd-next` 0.16: UPnP IGD only (SSDP + SOAP client, tokio/hyper behind features); no
//!   NAT-PMP/PCP. Evaluated for the UPnP side and not used: [`igd`] says why.
//! - `natpmp` 0.5: a NAT-PMP client that owns a `std::net::UdpSocket` (tokio/async-std optional);
//!   client direction only, no PCP.
//!
//! The formats are fixed-layout and small (two NAT-PMP messages each way, a 24-byte PCP header,
//! 36 bytes of MAP fields, TLV options), so owning them costs less than an adapter around any of
//! these, and keeps the core's "no socket" rule a compiler fact.

pub mod exchange;
pub mod igd;
pub mod igd_server;
pub mod natpmp;
pub mod pcp;
pub mod pcp_client;
pub mod pmp_client;
pub mod report;
pub mod server;

#[cfg(test)]
mod client_tests;

pub use exchange::{GrantedMapping, Outcome, Retransmit};
pub use pcp_client::PcpClient;
pub use pmp_client::NatPmpClient;
pub use report::{MappedPort, PathVerdicts, PortMappingReport, ServiceReport};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The transport a NAT-PMP mapping is for (PCP carries the IANA protocol number instead:
/// [`MapProtocol::iana`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapProtocol {
    /// UDP (NAT-PMP opcode 1, IANA 17).
    Udp,
    /// TCP (NAT-PMP opcode 2, IANA 6).
    Tcp,
}

impl MapProtocol {
    /// The IANA protocol number, as PCP's MAP opcode carries it.
    pub fn iana(self) -> u8 {
        match self {
            Self::Udp => 17,
            Self::Tcp => 6,
        }
    }
}

/// A port-mapping service a gateway may offer: the lab router's `port_mapping` knob, the probe's
/// `port_mapping` report and the grid's presets name the three with these words.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum PortMappingService {
    /// NAT-PMP (RFC 6886).
    #[serde(rename = "nat-pmp")]
    NatPmp,
    /// PCP (RFC 6887).
    #[serde(rename = "pcp")]
    Pcp,
    /// UPnP IGD (WANIPConnection/WANPPPConnection over SSDP and SOAP).
    #[serde(rename = "upnp")]
    Upnp,
}

impl PortMappingService {
    /// All three, in the order reports list them.
    pub const ALL: [Self; 3] = [Self::Upnp, Self::NatPmp, Self::Pcp];

    /// The word used in files and JSON: `nat-pmp`, `pcp` or `upnp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NatPmp => "nat-pmp",
            Self::Pcp => "pcp",
            Self::Upnp => "upnp",
        }
    }
}

impl std::fmt::Display for PortMappingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PortMappingService {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown port-mapping service {s:?} (expected nat-pmp, pcp or upnp)")
            })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn ip(rng: &mut StdRng) -> IpAddr {
        if rng.gen_bool(0.5) {
            IpAddr::V4(Ipv4Addr::from(rng.gen::<u32>()))
        } else {
            // Not IPv4-mapped: those read back as IPv4 by design.
            let mut a: u128 = rng.gen();
            if Ipv6Addr::from(a).to_ipv4_mapped().is_some() {
                a ^= 1 << 100;
            }
            IpAddr::V6(Ipv6Addr::from(a))
        }
    }

    fn options(rng: &mut StdRng) -> Vec<pcp::PcpOption> {
        (0..rng.gen_range(0..4))
            .map(|_| pcp::PcpOption {
                code: rng.gen_range(128..=255),
                data: (0..rng.gen_range(0..40)).map(|_| rng.gen()).collect(),
            })
            .collect()
    }

    #[test]
    fn service_words_round_trip_and_unknown_words_are_refused() {
        for p in PortMappingService::ALL {
            assert_eq!(p.as_str().parse::<PortMappingService>(), Ok(p));
            let json = serde_json::to_string(&p).expect("serializes");
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        assert!("natpmp".parse::<PortMappingService>().is_err());
    }

    #[test]
    fn seeded_random_messages_round_trip() {
        let mut rng = StdRng::seed_from_u64(12);
        for _ in 0..2000 {
            let proto = if rng.gen() {
                MapProtocol::Udp
            } else {
                MapProtocol::Tcp
            };
            let req = if rng.gen_bool(0.2) {
                natpmp::Request::ExternalAddress
            } else {
                natpmp::Request::Map {
                    protocol: proto,
                    internal_port: rng.gen(),
                    suggested_external_port: rng.gen(),
                    lifetime: rng.gen(),
                }
            };
            assert_eq!(natpmp::Request::parse(&req.encode()), Ok(req));
            let result = natpmp::ResultCode::from_code(rng.gen_range(0..8));
            let resp = match rng.gen_range(0..3) {
                0 => natpmp::Response::ExternalAddress {
                    result,
                    epoch: rng.gen(),
                    address: Ipv4Addr::from(rng.gen::<u32>()),
                },
                1 => natpmp::Response::Map {
                    result,
                    epoch: rng.gen(),
                    protocol: proto,
                    internal_port: rng.gen(),
                    external_port: rng.gen(),
                    lifetime: rng.gen(),
                },
                _ => natpmp::Response::Error {
                    opcode: rng.gen_range(0..128),
                    result: natpmp::ResultCode::from_code(rng.gen_range(1..=u16::MAX)),
                    epoch: rng.gen(),
                },
            };
            assert_eq!(natpmp::Response::parse(&resp.encode()), Ok(resp));

            let nonce = pcp::Nonce(rng.gen());
            let req = pcp::Request {
                lifetime: rng.gen(),
                client_address: ip(&mut rng),
                op: if rng.gen_bool(0.3) {
                    pcp::RequestOp::Announce
                } else {
                    pcp::RequestOp::Map(pcp::MapRequest {
                        nonce,
                        protocol: rng.gen(),
                        internal_port: rng.gen(),
                        suggested_external_port: rng.gen(),
                        suggested_external_address: ip(&mut rng),
                    })
                },
                options: options(&mut rng),
            };
            let bytes = req.encode();
            assert_eq!(bytes.and_then(|b| pcp::Request::parse(&b)), Ok(req));
            let result = pcp::ResultCode::from_code(rng.gen());
            let op = match rng.gen_range(0..3) {
                0 => pcp::ResponseOp::Announce,
                1 => pcp::ResponseOp::Map(pcp::MapResponse {
                    nonce,
                    protocol: rng.gen(),
                    internal_port: rng.gen(),
                    assigned_external_port: rng.gen(),
                    assigned_external_address: ip(&mut rng),
                }),
                _ => pcp::ResponseOp::Bare {
                    opcode: rng.gen_range(1..128),
                },
            };
            let bare = matches!(op, pcp::ResponseOp::Bare { .. });
            let resp = pcp::Response {
                result: if bare && result == pcp::ResultCode::Success {
                    pcp::ResultCode::NoResources
                } else {
                    result
                },
                lifetime: rng.gen(),
                epoch: rng.gen(),
                op,
                options: if bare { vec![] } else { options(&mut rng) },
            };
            let bytes = resp.encode();
            assert_eq!(bytes.and_then(|b| pcp::Response::parse(&b)), Ok(resp));
        }
    }

    /// Valid messages of every kind, mutated (bytes flipped, truncated, extended) and raw random
    /// bytes through both fuzz entry points; the counts make sure the mutations still reach the
    /// re-encode path instead of all failing at the version byte.
    #[test]
    fn seeded_mutations_never_panic_and_reparse_equal() {
        let mut rng = StdRng::seed_from_u64(6887);
        let seeds: Vec<Vec<u8>> = vec![
            natpmp::Request::ExternalAddress.encode(),
            natpmp::Request::Map {
                protocol: MapProtocol::Udp,
                internal_port: 5000,
                suggested_external_port: 0,
                lifetime: 7200,
            }
            .encode(),
            natpmp::Response::Map {
                result: natpmp::ResultCode::Success,
                epoch: 1,
                protocol: MapProtocol::Tcp,
                internal_port: 1,
                external_port: 2,
                lifetime: 3,
            }
            .encode(),
            pcp::Request {
                lifetime: 60,
                client_address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                op: pcp::RequestOp::Map(pcp::MapRequest {
                    nonce: pcp::Nonce([7; 12]),
                    protocol: 17,
                    internal_port: 4000,
                    suggested_external_port: 0,
                    suggested_external_address: pcp::ANY_V4,
                }),
                options: vec![pcp::PcpOption {
                    code: 130,
                    data: vec![1, 2, 3],
                }],
            }
            .encode()
            .unwrap_or_default(),
        ];
        let (mut natpmp_ok, mut pcp_ok) = (0, 0);
        for i in 0..20_000 {
            let mut b = if i % 4 == 0 {
                (0..rng.gen_range(0..80)).map(|_| rng.gen()).collect()
            } else {
                seeds[rng.gen_range(0..seeds.len())].clone()
            };
            for _ in 0..rng.gen_range(0..3) {
                if let Some(len) = std::num::NonZeroUsize::new(b.len()) {
                    let at = rng.gen_range(0..len.get());
                    b[at] = rng.gen();
                }
            }
            match rng.gen_range(0..4) {
                0 => b.truncate(rng.gen_range(0..=b.len())),
                1 => b.extend((0..rng.gen_range(0..12)).map(|_| rng.gen::<u8>())),
                _ => {}
            }
            crate::fuzzing::natpmp_parse(&b);
            crate::fuzzing::pcp_parse(&b);
            natpmp_ok += usize::from(
                natpmp::Request::parse(&b).is_ok() || natpmp::Response::parse(&b).is_ok(),
            );
            pcp_ok +=
                usize::from(pcp::Request::parse(&b).is_ok() || pcp::Response::parse(&b).is_ok());
        }
        assert!(natpmp_ok > 1000, "only {natpmp_ok} NAT-PMP inputs parsed");
        assert!(pcp_ok > 500, "only {pcp_ok} PCP inputs parsed");
    }
}
