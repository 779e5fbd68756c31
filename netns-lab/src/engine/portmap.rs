//! The router's port-mapping services (issue 12, the `port_mapping` knob): NAT-PMP and PCP
//! requests a LAN host sends to the router's LAN address on UDP 5351 are answered here, inside
//! the engine, by the sans-IO [`natscope_core::portmap::server::Server`], which installs the
//! mappings in the same [`natscope_core::nat::table::NatTable`] the router translates with. This
//! is the engine's only local service, so it is one hook in `Router::route` and nothing else.
//!
//! UPnP IGD needs TCP (HTTP and SOAP); the engine does not terminate TCP. Its answer logic is the
//! sans-IO [`natscope_core::portmap::igd`] machine, called through [`Router::upnp`] by the
//! driver's kernel sockets (see `crate::driver`'s `upnp` module for why the kernel owns those).

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use natscope_core::portmap::igd_server::{Http, Igd};
use natscope_core::portmap::natpmp::SERVER_PORT;
use natscope_core::portmap::server::{Served, Server};
use natscope_core::portmap::PortMappingService;
use pnet::packet::ip::IpNextHeaderProtocols;
use pnet::packet::ipv4::MutableIpv4Packet;
use pnet::packet::udp::MutableUdpPacket;

use super::packet::{Datagram, Transport};
use super::{Emit, MappingRow, Port, Router};

impl Router {
    /// Whether the router serves UPnP IGD (the driver then opens its kernel sockets).
    pub fn serves_upnp(&self) -> bool {
        self.config.port_mapping.contains(&PortMappingService::Upnp)
    }

    fn igd(&mut self, now: Instant) -> Option<&mut Igd> {
        if !self.serves_upnp() {
            return None;
        }
        let (lan, seed) = (self.addrs.lan.addr, self.config.seed);
        Some(self.igd.get_or_insert_with(|| Igd::new(lan, seed, now)))
    }

    /// An SSDP datagram the driver received on the LAN: the M-SEARCH answer to send back, if any.
    pub fn upnp_ssdp(&mut self, now: Instant, datagram: &[u8]) -> Option<Vec<u8>> {
        self.igd(now)?.ssdp(datagram)
    }

    /// The bytes of one HTTP request received so far from `client` on the LAN address.
    pub fn upnp_http(&mut self, now: Instant, client: SocketAddr, request: &[u8]) -> Http {
        if self.igd(now).is_none() {
            return Http::Respond(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec());
        }
        let Some(igd) = self.igd.as_mut() else {
            return Http::Incomplete;
        };
        let answer = igd.http(now, &mut self.table, client, request);
        if let Http::Respond(bytes) = &answer {
            if bytes.starts_with(b"HTTP/1.1 200") {
                self.stats.port_mapping_answered += 1;
            } else {
                self.stats.port_mapping_refused += 1;
            }
        }
        answer
    }

    /// Answers a NAT-PMP or PCP request addressed to the router's LAN address. Returns whether the
    /// datagram was consumed (it was a request to the service and the service is on).
    pub(super) fn serve_port_mapping(
        &mut self,
        now: Instant,
        d: &Datagram,
        t: Transport,
        out: &mut Vec<Emit>,
    ) -> bool {
        let Transport::Udp { src, dst } = t else {
            return false;
        };
        if dst != SERVER_PORT || !self.lan_host(d.src()) {
            return false;
        }
        let services = &self.config.port_mapping;
        let server = self
            .portmap
            .get_or_insert_with(|| Server::new(services, now));
        if !server.serves() {
            return false;
        }
        let Some(payload) = d.udp_payload() else {
            return false;
        };
        let source = SocketAddr::new(IpAddr::V4(d.src()), src);
        let (answer, served) = server.handle_datagram(now, &mut self.table, source, payload);
        match served {
            Served::Success(_) => self.stats.port_mapping_answered += 1,
            Served::Refused(_) => self.stats.port_mapping_refused += 1,
            Served::Silent => {}
        }
        if let Some(answer) = answer {
            let from = SocketAddrV4::new(self.addrs.lan.addr, SERVER_PORT);
            let to = SocketAddrV4::new(d.src(), src);
            if let Some(dg) = udp_datagram(from, to, &answer) {
                self.transmit(now, now, Port::Lan, dg, d.src(), out);
            }
        }
        true
    }
}

impl MappingRow {
    /// The external endpoint as `lab nat-table` shows it: with ` via PROTOCOL` when a
    /// port-mapping request made the mapping.
    pub fn external_via(&self) -> String {
        match self.requested_by {
            Some(s) => format!("{} via {s}", self.external),
            None => self.external.to_string(),
        }
    }
}

/// A UDP datagram from the router itself, checksummed.
fn udp_datagram(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Option<Vec<u8>> {
    let len = 28 + payload.len();
    let mut bytes = vec![0u8; len];
    {
        let mut ip = MutableIpv4Packet::new(&mut bytes)?;
        ip.set_version(4);
        ip.set_header_length(5);
        ip.set_total_length(u16::try_from(len).ok()?);
        ip.set_ttl(64);
        ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
        ip.set_source(*from.ip());
        ip.set_destination(*to.ip());
    }
    {
        let mut u = MutableUdpPacket::new(&mut bytes[20..])?;
        u.set_source(from.port());
        u.set_destination(to.port());
        u.set_length(u16::try_from(8 + payload.len()).ok()?);
        // Non-zero so `finish` computes it (0 means "no checksum", RFC 768).
        u.set_checksum(1);
        u.set_payload(payload);
    }
    let mut d = Datagram::parse(&bytes).ok()?;
    d.finish();
    Some(d.into_bytes())
}
