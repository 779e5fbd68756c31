//! The gateway side of NAT-PMP (RFC 6886) and PCP (RFC 6887), sans-IO: the lab's userspace NAT
//! router hands it every UDP datagram a LAN host sends to its LAN address on port 5351, and it
//! answers from the same [`NatTable`] the router translates with, so a mapping it grants is a
//! real mapping of that router (admitting inbound from anyone, see [`crate::nat::table::Requested`]).
//!
//! Both protocols share the port (RFC 6887 §9): the first byte is the version, 0 for NAT-PMP and
//! 2 for PCP. A router that serves only one of them answers the other's requests with that
//! protocol's "unsupported version" so a client falls back at once instead of timing out.
//!
//! What is served: NAT-PMP external address and UDP/TCP map (create, refresh, delete one, delete
//! all of a client's mappings of a protocol); PCP ANNOUNCE and MAP (create, refresh, delete, the
//! nonce owning the mapping, ADDRESS_MISMATCH when the claimed client address is not the packet's
//! source). Not served: PCP PEER, THIRD_PARTY, PREFER_FAILURE and FILTER (the codec rejects them as
//! unsupported, which is the answer RFC 6887 asks of a server without them), and the unsolicited
//! ANNOUNCE multicasts after a restart (the lab's routers never lose state while running).
//!
//! The epoch is seconds since the machine was made; lifetimes are capped at [`MAX_LIFETIME`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::{natpmp, pcp, MapProtocol, PortMappingService};
use crate::nat::table::{MapRequest, NatTable, RequestError};
use crate::nat::Protocol;

/// The longest lifetime granted (RFC 6887 §15 lets a server shorten what is asked); a day, as
/// common gateways do.
pub const MAX_LIFETIME: u32 = 86_400;
/// The lifetime an error answer carries: how long the client should wait before asking again
/// (RFC 6887 §7.2; long-lived errors like NOT_AUTHORIZED get more).
const ERROR_LIFETIME: u32 = 30;
const LONG_ERROR_LIFETIME: u32 = 1800;

/// What the server did, for the router's counters and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// An answer with a success result.
    Success(PortMappingService),
    /// An answer with an error result.
    Refused(PortMappingService),
    /// Nothing sent (a response, or bytes too short to answer).
    Silent,
}

/// NAT-PMP and PCP server of one gateway.
#[derive(Clone, Debug)]
pub struct Server {
    natpmp: bool,
    pcp: bool,
    started: Instant,
}

impl Server {
    /// A server offering the UDP protocols among `services` (UPnP is another machine); its epoch
    /// starts at `now`.
    pub fn new(services: &[PortMappingService], now: Instant) -> Self {
        Self {
            natpmp: services.contains(&PortMappingService::NatPmp),
            pcp: services.contains(&PortMappingService::Pcp),
            started: now,
        }
    }

    /// Whether any UDP service is on (the router only passes datagrams when one is).
    pub fn serves(&self) -> bool {
        self.natpmp || self.pcp
    }

    /// Seconds since the mapping table was (re)initialised (RFC 6886 §3.6, RFC 6887 §8.5).
    pub fn epoch(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.started).as_secs()).unwrap_or(u32::MAX)
    }

    /// One request from `source` (a LAN host) to the server port. Returns the answer to send back
    /// to `source`, if any, and what was done.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        table: &mut NatTable,
        source: SocketAddr,
        payload: &[u8],
    ) -> (Option<Vec<u8>>, Served) {
        match payload.first() {
            Some(&natpmp::VERSION) if self.natpmp => self.natpmp(now, table, source, payload),
            Some(&pcp::VERSION) if self.pcp => self.pcp(now, table, source, payload),
            // The other protocol is off: answer with the one that is on, whose parser reports
            // an unsupported version, so the client falls back (RFC 6887 §9).
            Some(_) if self.pcp => self.pcp(now, table, source, payload),
            Some(_) if self.natpmp => self.natpmp(now, table, source, payload),
            _ => (None, Served::Silent),
        }
    }

    fn natpmp(
        &mut self,
        now: Instant,
        table: &mut NatTable,
        source: SocketAddr,
        payload: &[u8],
    ) -> (Option<Vec<u8>>, Served) {
        const S: PortMappingService = PortMappingService::NatPmp;
        let epoch = self.epoch(now);
        let request = match natpmp::Request::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                let Some(result) = e.server_result() else {
                    return (None, Served::Silent);
                };
                let opcode = payload.get(1).copied().unwrap_or(0) & !natpmp::RESPONSE_BIT;
                let resp = natpmp::Response::Error {
                    opcode,
                    result,
                    epoch,
                };
                return (Some(resp.encode()), Served::Refused(S));
            }
        };
        let resp = match request {
            natpmp::Request::ExternalAddress => match table.external_ip_for(source.ip()) {
                Ok(IpAddr::V4(address)) => natpmp::Response::ExternalAddress {
                    result: natpmp::ResultCode::Success,
                    epoch,
                    address,
                },
                _ => natpmp::Response::ExternalAddress {
                    result: natpmp::ResultCode::NetworkFailure,
                    epoch,
                    address: Ipv4Addr::UNSPECIFIED,
                },
            },
            natpmp::Request::Map {
                protocol,
                internal_port,
                suggested_external_port,
                lifetime,
            } => {
                let proto = nat_protocol(protocol);
                let answer = |result, external_port, lifetime| natpmp::Response::Map {
                    result,
                    epoch,
                    protocol,
                    internal_port,
                    external_port,
                    lifetime,
                };
                if lifetime == 0 {
                    // RFC 6886 §3.4: port 0 deletes every mapping of the client for the protocol.
                    let internals = if internal_port == 0 {
                        table.requested_of_host(now, proto, source.ip())
                    } else {
                        vec![SocketAddr::new(source.ip(), internal_port)]
                    };
                    for internal in internals {
                        // NAT-PMP has no nonce: the client's own address is its authority.
                        let _ = table.unmap_requested(now, proto, internal, None);
                    }
                    answer(natpmp::ResultCode::Success, 0, 0)
                } else if internal_port == 0 {
                    // Only a deletion may name port 0.
                    answer(natpmp::ResultCode::NotAuthorized, 0, 0)
                } else {
                    let lifetime = lifetime.min(MAX_LIFETIME);
                    let r = MapRequest {
                        proto,
                        internal: SocketAddr::new(source.ip(), internal_port),
                        external_port: suggested_external_port,
                        exact: false,
                        lifetime: Duration::from_secs(lifetime.into()),
                        service: S,
                        nonce: None,
                    };
                    match table.map_requested(now, r) {
                        Ok(ext) => answer(natpmp::ResultCode::Success, ext.port(), lifetime),
                        Err(RequestError::NotOwner) => {
                            answer(natpmp::ResultCode::NotAuthorized, 0, 0)
                        }
                        Err(_) => answer(natpmp::ResultCode::OutOfResources, 0, 0),
                    }
                }
            }
        };
        let served = if resp.result() == natpmp::ResultCode::Success {
            Served::Success(S)
        } else {
            Served::Refused(S)
        };
        (Some(resp.encode()), served)
    }

    fn pcp(
        &mut self,
        now: Instant,
        table: &mut NatTable,
        source: SocketAddr,
        payload: &[u8],
    ) -> (Option<Vec<u8>>, Served) {
        const S: PortMappingService = PortMappingService::Pcp;
        let epoch = self.epoch(now);
        let request = match pcp::Request::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                let Some(result) = e.server_result() else {
                    return (None, Served::Silent);
                };
                // RFC 6887 §7.2: when the request cannot be copied, the answer is the header.
                let opcode = payload.get(1).copied().unwrap_or(0) & !pcp::RESPONSE_BIT;
                let resp = pcp::Response {
                    result,
                    lifetime: ERROR_LIFETIME,
                    epoch,
                    op: if opcode == pcp::OP_ANNOUNCE {
                        pcp::ResponseOp::Announce
                    } else {
                        pcp::ResponseOp::Bare { opcode }
                    },
                    options: vec![],
                };
                return (resp.encode().ok(), Served::Refused(S));
            }
        };
        let respond = |result, lifetime, op| pcp::Response {
            result,
            lifetime,
            epoch,
            op,
            options: vec![],
        };
        let resp = match (request.op, pcp::address_mismatch(&request, source.ip())) {
            (pcp::RequestOp::Announce, false) => {
                respond(pcp::ResultCode::Success, 0, pcp::ResponseOp::Announce)
            }
            (pcp::RequestOp::Announce, true) => respond(
                pcp::ResultCode::AddressMismatch,
                ERROR_LIFETIME,
                pcp::ResponseOp::Announce,
            ),
            (pcp::RequestOp::Map(m), true) => respond(
                pcp::ResultCode::AddressMismatch,
                ERROR_LIFETIME,
                pcp::ResponseOp::Map(m.answer(None)),
            ),
            (pcp::RequestOp::Map(m), false) => self.pcp_map(now, table, source, &request, m),
        };
        let served = if resp.result == pcp::ResultCode::Success {
            Served::Success(S)
        } else {
            Served::Refused(S)
        };
        (resp.encode().ok(), served)
    }

    fn pcp_map(
        &mut self,
        now: Instant,
        table: &mut NatTable,
        source: SocketAddr,
        request: &pcp::Request,
        m: pcp::MapRequest,
    ) -> pcp::Response {
        let epoch = self.epoch(now);
        let error = |result, lifetime| pcp::Response {
            result,
            lifetime,
            epoch,
            op: pcp::ResponseOp::Map(m.answer(None)),
            options: vec![],
        };
        let proto = match m.protocol {
            17 => Protocol::Udp,
            6 => Protocol::Tcp,
            // Protocol 0 ("all protocols") and others are not mapped by this NAT (§11.1).
            _ => return error(pcp::ResultCode::UnsuppProtocol, LONG_ERROR_LIFETIME),
        };
        if m.internal_port == 0 {
            // Port 0 means "all ports", only with protocol 0 (§11.1).
            return error(pcp::ResultCode::MalformedRequest, ERROR_LIFETIME);
        }
        let internal = SocketAddr::new(source.ip(), m.internal_port);
        let nonce = Some(m.nonce.0);
        if request.lifetime == 0 {
            // §15: deleting what does not exist succeeds too; a foreign nonce does not.
            return match table.unmap_requested(now, proto, internal, nonce) {
                Ok(_) => pcp::Response {
                    result: pcp::ResultCode::Success,
                    lifetime: 0,
                    epoch,
                    op: pcp::ResponseOp::Map(m.answer(Some((0, m.suggested_external_address)))),
                    options: vec![],
                },
                Err(_) => error(pcp::ResultCode::NotAuthorized, LONG_ERROR_LIFETIME),
            };
        }
        let lifetime = request.lifetime.min(MAX_LIFETIME);
        let r = MapRequest {
            proto,
            internal,
            external_port: m.suggested_external_port,
            exact: false,
            lifetime: Duration::from_secs(lifetime.into()),
            service: PortMappingService::Pcp,
            nonce,
        };
        match table.map_requested(now, r) {
            Ok(ext) => pcp::Response {
                result: pcp::ResultCode::Success,
                lifetime,
                epoch,
                op: pcp::ResponseOp::Map(m.answer(Some((ext.port(), ext.ip())))),
                options: vec![],
            },
            Err(RequestError::NotOwner) => {
                error(pcp::ResultCode::NotAuthorized, LONG_ERROR_LIFETIME)
            }
            Err(RequestError::Quota) => error(pcp::ResultCode::UserExQuota, ERROR_LIFETIME),
            Err(_) => error(pcp::ResultCode::NoResources, ERROR_LIFETIME),
        }
    }
}

fn nat_protocol(p: MapProtocol) -> Protocol {
    match p {
        MapProtocol::Udp => Protocol::Udp,
        MapProtocol::Tcp => Protocol::Tcp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{FilteringBehavior, MappingBehavior, NatBehavior};

    const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn setup(services: &[PortMappingService]) -> (Server, NatTable, Instant) {
        let now = Instant::now();
        let behavior = NatBehavior::new(
            MappingBehavior::AddressAndPortDependent,
            FilteringBehavior::AddressAndPortDependent,
        );
        let table = NatTable::new(behavior, vec![IpAddr::V4(EXT)], 7);
        (Server::new(services, now), table, now)
    }

    fn natpmp_ask(
        s: &mut Server,
        t: &mut NatTable,
        now: Instant,
        from: &str,
        r: natpmp::Request,
    ) -> natpmp::Response {
        let (bytes, _) = s.handle_datagram(now, t, sa(from), &r.encode());
        natpmp::Response::parse(&bytes.expect("an answer")).expect("a NAT-PMP response")
    }

    fn map(internal_port: u16, suggested: u16, lifetime: u32) -> natpmp::Request {
        natpmp::Request::Map {
            protocol: MapProtocol::Udp,
            internal_port,
            suggested_external_port: suggested,
            lifetime,
        }
    }

    fn mapped_port(r: &natpmp::Response) -> u16 {
        match r {
            natpmp::Response::Map {
                result: natpmp::ResultCode::Success,
                external_port,
                ..
            } => *external_port,
            other => panic!("not a successful map answer: {other:?}"),
        }
    }

    #[test]
    fn natpmp_external_address_and_epoch() {
        let (mut s, mut t, now) = setup(&[PortMappingService::NatPmp]);
        let later = now + Duration::from_secs(42);
        let r = natpmp_ask(
            &mut s,
            &mut t,
            later,
            "10.0.0.2:5000",
            natpmp::Request::ExternalAddress,
        );
        assert_eq!(
            r,
            natpmp::Response::ExternalAddress {
                result: natpmp::ResultCode::Success,
                epoch: 42,
                address: EXT
            }
        );
    }

    #[test]
    fn natpmp_mapping_admits_anyone_until_its_lifetime_ends() {
        let (mut s, mut t, now) = setup(&[PortMappingService::NatPmp]);
        let r = natpmp_ask(&mut s, &mut t, now, "10.0.0.2:999", map(4000, 4000, 60));
        let port = mapped_port(&r);
        assert_eq!(port, 4000);
        let ext = SocketAddr::new(IpAddr::V4(EXT), port);
        // The table's filtering is port-restricted, yet any remote gets in.
        for remote in ["198.51.100.1:1", "198.51.100.9:3478"] {
            assert_eq!(
                t.inbound(
                    now + Duration::from_secs(59),
                    Protocol::Udp,
                    sa(remote),
                    ext
                ),
                Some(sa("10.0.0.2:4000"))
            );
        }
        assert_eq!(
            t.inbound(
                now + Duration::from_secs(60),
                Protocol::Udp,
                sa("198.51.100.1:1"),
                ext
            ),
            None,
            "expired with its lifetime"
        );
    }

    #[test]
    fn natpmp_taken_port_gets_another_and_delete_stops_inbound() {
        let (mut s, mut t, now) = setup(&[PortMappingService::NatPmp]);
        let a = mapped_port(&natpmp_ask(
            &mut s,
            &mut t,
            now,
            "10.0.0.2:1",
            map(4000, 5000, 60),
        ));
        assert_eq!(a, 5000);
        let b = mapped_port(&natpmp_ask(
            &mut s,
            &mut t,
            now,
            "10.0.0.3:1",
            map(4000, 5000, 60),
        ));
        assert_ne!(b, 5000, "another host's port is never handed out twice");
        // Refresh keeps the port.
        let again = mapped_port(&natpmp_ask(
            &mut s,
            &mut t,
            now,
            "10.0.0.2:1",
            map(4000, 0, 60),
        ));
        assert_eq!(again, 5000);
        let del = natpmp_ask(&mut s, &mut t, now, "10.0.0.2:1", map(4000, 0, 0));
        assert!(matches!(
            del,
            natpmp::Response::Map {
                result: natpmp::ResultCode::Success,
                lifetime: 0,
                ..
            }
        ));
        let ext = SocketAddr::new(IpAddr::V4(EXT), 5000);
        assert_eq!(
            t.inbound(now, Protocol::Udp, sa("198.51.100.1:1"), ext),
            None
        );
        // Delete-all (port 0) removes the other host's mapping only when it asks.
        natpmp_ask(&mut s, &mut t, now, "10.0.0.3:1", map(0, 0, 0));
        assert!(t
            .requested_of_host(now, Protocol::Udp, sa("10.0.0.3:0").ip())
            .is_empty());
    }

    #[test]
    fn natpmp_unsupported_version_when_only_pcp_and_the_reverse() {
        let (mut s, mut t, now) = setup(&[PortMappingService::Pcp]);
        let (bytes, _) = s.handle_datagram(
            now,
            &mut t,
            sa("10.0.0.2:1"),
            &natpmp::Request::ExternalAddress.encode(),
        );
        let r = pcp::Response::parse(&bytes.expect("answer")).expect("PCP answer");
        assert_eq!(r.result, pcp::ResultCode::UnsuppVersion);
        let (mut s, mut t, now) = setup(&[PortMappingService::NatPmp]);
        let (bytes, _) = s.handle_datagram(
            now,
            &mut t,
            sa("10.0.0.2:1"),
            &pcp_map([1; 12], "10.0.0.2", 60).encode().expect("encodes"),
        );
        let r = natpmp::Response::parse(&bytes.expect("answer")).expect("NAT-PMP answer");
        assert_eq!(r.result(), natpmp::ResultCode::UnsupportedVersion);
        // A response sent to the server is ignored.
        let resp = natpmp::Response::ExternalAddress {
            result: natpmp::ResultCode::Success,
            epoch: 0,
            address: EXT,
        };
        assert_eq!(
            s.handle_datagram(now, &mut t, sa("10.0.0.2:1"), &resp.encode()),
            (None, Served::Silent)
        );
    }

    fn pcp_map(nonce: [u8; 12], client: &str, lifetime: u32) -> pcp::Request {
        pcp::Request {
            lifetime,
            client_address: client.parse().expect("ip"),
            op: pcp::RequestOp::Map(pcp::MapRequest {
                nonce: pcp::Nonce(nonce),
                protocol: 17,
                internal_port: 4000,
                suggested_external_port: 4000,
                suggested_external_address: pcp::ANY_V4,
            }),
            options: vec![],
        }
    }

    fn pcp_ask(
        s: &mut Server,
        t: &mut NatTable,
        now: Instant,
        from: &str,
        r: &pcp::Request,
    ) -> pcp::Response {
        let (bytes, _) = s.handle_datagram(now, t, sa(from), &r.encode().expect("encodes"));
        pcp::Response::parse(&bytes.expect("an answer")).expect("a PCP response")
    }

    #[test]
    fn pcp_map_nonce_owns_the_mapping_and_lifetime_zero_deletes() {
        let (mut s, mut t, now) = setup(&[PortMappingService::Pcp]);
        let r = pcp_ask(
            &mut s,
            &mut t,
            now,
            "10.0.0.2:7",
            &pcp_map([1; 12], "10.0.0.2", 100_000),
        );
        assert_eq!(r.result, pcp::ResultCode::Success);
        assert_eq!(r.lifetime, MAX_LIFETIME, "lifetime capped");
        let pcp::ResponseOp::Map(m) = r.op else {
            panic!("not a MAP answer: {r:?}")
        };
        assert_eq!(m.nonce, pcp::Nonce([1; 12]));
        assert_eq!(
            (m.assigned_external_port, m.assigned_external_address),
            (4000, IpAddr::V4(EXT))
        );
        // Another nonce may neither refresh nor delete it.
        for lifetime in [60, 0] {
            let r = pcp_ask(
                &mut s,
                &mut t,
                now,
                "10.0.0.2:7",
                &pcp_map([2; 12], "10.0.0.2", lifetime),
            );
            assert_eq!(r.result, pcp::ResultCode::NotAuthorized);
        }
        // Another host asking for the same external port gets another one.
        let r = pcp_ask(
            &mut s,
            &mut t,
            now,
            "10.0.0.3:7",
            &pcp_map([3; 12], "10.0.0.3", 60),
        );
        let pcp::ResponseOp::Map(other) = r.op else {
            panic!("not a MAP answer")
        };
        assert_ne!(other.assigned_external_port, 4000);
        let r = pcp_ask(
            &mut s,
            &mut t,
            now,
            "10.0.0.2:7",
            &pcp_map([1; 12], "10.0.0.2", 0),
        );
        assert_eq!((r.result, r.lifetime), (pcp::ResultCode::Success, 0));
        assert!(t
            .requested(now, Protocol::Udp, sa("10.0.0.2:4000"))
            .is_none());
    }

    #[test]
    fn pcp_address_mismatch_and_announce() {
        let (mut s, mut t, now) = setup(&[PortMappingService::Pcp]);
        let r = pcp_ask(
            &mut s,
            &mut t,
            now,
            "10.0.0.2:7",
            &pcp_map([1; 12], "192.168.1.5", 60),
        );
        assert_eq!(r.result, pcp::ResultCode::AddressMismatch);
        assert!(t
            .requested(now, Protocol::Udp, sa("10.0.0.2:4000"))
            .is_none());
        let announce = pcp::Request {
            lifetime: 0,
            client_address: "10.0.0.2".parse().expect("ip"),
            op: pcp::RequestOp::Announce,
            options: vec![],
        };
        let r = pcp_ask(
            &mut s,
            &mut t,
            now + Duration::from_secs(5),
            "10.0.0.2:7",
            &announce,
        );
        assert_eq!(
            (r.result, r.epoch, r.op),
            (pcp::ResultCode::Success, 5, pcp::ResponseOp::Announce)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let (mut s, mut t, now) = setup(&PortMappingService::ALL);
        for len in 0..64 {
            for fill in [0u8, 1, 2, 0x80, 0xff] {
                let mut b = vec![fill; len];
                if let Some(first) = b.first_mut() {
                    *first = (len % 3) as u8;
                }
                let _ = s.handle_datagram(now, &mut t, sa("10.0.0.2:7"), &b);
            }
        }
    }
}
