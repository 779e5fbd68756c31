//! The sans-IO core of the lab's userspace NAT router (DESIGN.md, "Lab"). A router namespace has
//! two interfaces, `wan0` and `lan0`, with no kernel addresses; an I/O driver reads Ethernet frames
//! from each, hands them to [`Router::handle_frame`], calls [`Router::handle_timeout`] when
//! [`Router::poll_timeout`] says and at least every 50 ms, and writes every [`Emit`] out of its port
//! at `Emit::at`. This core owns everything else: ARP (RFC 826, with
//! proxy ARP for the external pool), IPv4 forwarding, RFC 4787 translation of UDP, RFC 5382 of TCP
//! and RFC 5508 of ICMP through the shared [`NatTable`] (so the lab emulates exactly the model the
//! probe's simulator is tested against), hairpinning (REQ-9), seeded loss and fixed delay. It never
//! reads a clock or touches a socket: `now` is an input, so tests drive it on a virtual clock.
//!
//! ```text
//! Router::new(EngineConfig, RouterAddrs) -> Router
//! Router::handle_frame(&mut self, now, Port, frame: &[u8], out: &mut Vec<Emit>)
//! Router::handle_timeout(&mut self, now, out: &mut Vec<Emit>)
//! Router::poll_timeout(&self) -> Option<Instant>       // next ARP retry / give-up
//! Router::mappings(&self, now) -> Vec<MappingRow>      // Serialize
//! Router::stats(&self) -> Stats                          // Serialize
//! Router::flows(&self) -> Vec<FlowRow>                   // Serialize
//! ```
//!
//! Flow counters ([`FlowRow`]) are the lab's own evidence of which path a program's traffic took
//! (`lab grid --app`): per inside endpoint and remote endpoint, packets and bytes forwarded out,
//! delivered in, and refused by the filter, so a judgment never has to trust the program.
//!
//! IPv6 (neighbor discovery, the RFC 6092 firewall, NPTv6, NAT66) is the `ipv6` module's; this
//! module dispatches IPv6 frames to it.
//!
//! Deliberate limits: IP fragments are dropped (translating them needs reassembly, as
//! only the first fragment carries ports); frames over 1514 bytes are dropped, so the driver must
//! turn off GRO/GSO-sized frames on the lab links; the router answers no pings itself and sends no
//! ICMP errors of its own (TTL expiry is a silent drop).

mod arp;
pub mod fuzzing;
mod ipv6;
mod ipv6_packet;
#[cfg(test)]
mod ipv6_tests;
mod ndp;
mod packet;
mod portmap;
#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use natscope_core::nat::firewall::Firewall;
use natscope_core::nat::table::NatTable;
use natscope_core::nat::{Protocol, RemoteKey};
use natscope_core::portmap::PortMappingService;
use pnet::packet::arp::ArpOperations;
use pnet::packet::ethernet::{EtherTypes, EthernetPacket};
use pnet::packet::ip::{IpNextHeaderProtocol, IpNextHeaderProtocols};
use pnet::packet::tcp::TcpFlags;
use pnet::packet::Packet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::topology::{EngineConfig, Ipv4Net, UnsolicitedSyn};
use arp::{Arp, Cache, Waiting};
pub use ipv6::{Ipv6Stats, RouterAddrs6, SYN_GRACE};
use packet::{Datagram, Quoted, Reject, Transport};

/// Largest frame accepted: a 1500-byte MTU plus the Ethernet header.
pub const MAX_FRAME: usize = 1514;

/// A router interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Port {
    Lan,
    Wan,
}

/// The router's link-layer and IP identity; its interfaces carry no kernel addresses.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterAddrs {
    pub wan_mac: [u8; 6],
    pub lan_mac: [u8; 6],
    /// The router's LAN address and the LAN prefix (addr = router's own LAN IP, len = prefix).
    pub lan: Ipv4Net,
    /// External addresses (NAT pool) on the WAN side; the engine answers ARP for them on WAN.
    pub external: Vec<Ipv4Addr>,
    /// Next hop for everything on the WAN side; `None` = destinations are on-link (ARP for them).
    pub wan_gateway: Option<Ipv4Addr>,
    /// IPv6 addresses and prefixes (empty: the router has no IPv6).
    pub ipv6: RouterAddrs6,
}

/// A frame to write out of `port`, not before `at`. It is not a `natscope_core::net::Transmit`:
/// the router owns no sockets, and what it sends is a whole link-layer frame (its own ARP, or a
/// translated IP packet) out of an interface at a delayed time, not a datagram from a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emit {
    pub port: Port,
    pub frame: Vec<u8>,
    pub at: Instant,
}

/// One live mapping (or, in firewall mode, one open pinhole) for `natscope lab nat-table`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MappingRow {
    pub proto: Protocol,
    pub internal: SocketAddr,
    /// Equal to `internal` in firewall mode.
    pub external: SocketAddr,
    pub expires_in_ms: u64,
    /// Remotes the filter admits: `ip:port`, with `*` for a part the filtering ignores.
    pub admits: Vec<String>,
    /// The port-mapping protocol whose request made (or took over) this mapping; absent for a
    /// mapping made by traffic alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<PortMappingService>,
}

/// Flows kept per router: enough for every socket a grid cell's programs open; past it new flows
/// are counted in [`Stats::flows_untracked`] only, so a flood cannot grow the table without bound.
pub const MAX_FLOWS: usize = 4096;

/// Traffic of one flow through the router: an inside endpoint and a remote endpoint, with the
/// external endpoint the NAT gave it. Counted after the NAT decision and before loss, so `in_*`
/// is what the filter admitted into the LAN, and `in_refused` what it dropped (RFC 4787 §5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FlowRow {
    pub proto: Protocol,
    pub internal: SocketAddr,
    /// The mapping's external endpoint (equal to `internal` in firewall mode); `None` when only
    /// refused packets were seen.
    pub external: Option<SocketAddr>,
    pub remote: SocketAddr,
    pub out_packets: u64,
    pub out_bytes: u64,
    pub in_packets: u64,
    pub in_bytes: u64,
    /// Inbound packets the filter refused on this flow's mapping.
    pub in_refused: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: Protocol,
    internal: SocketAddr,
    remote: SocketAddr,
}

/// What the engine did with the frames it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// LAN to WAN, translated (or passed by the firewall).
    pub forwarded_out: u64,
    /// WAN to LAN, admitted by the filter.
    pub forwarded_in: u64,
    /// LAN to one of our external addresses and back into the LAN (REQ-9).
    pub hairpinned: u64,
    /// Inbound packets on a live mapping whose sender the filter refuses (RFC 4787 §5).
    pub filtered: u64,
    /// Inbound packets (and hairpins) to an external address:port with no live mapping.
    pub no_mapping: u64,
    /// Hairpin packets dropped because `hairpinning` is off.
    pub hairpin_refused: u64,
    pub dropped_loss: u64,
    /// UDP dropped by `block_udp`.
    pub dropped_blocked: u64,
    pub dropped_malformed: u64,
    pub dropped_oversize: u64,
    pub dropped_fragment: u64,
    pub dropped_ttl: u64,
    /// IPv6 and other ethertypes.
    pub dropped_not_ipv4: u64,
    /// IP protocols (or ICMP types) the NAT does not translate.
    pub dropped_unsupported: u64,
    /// Addressed to the router itself, to the wrong side, or from outside the LAN prefix.
    pub dropped_unroutable: u64,
    /// The NAT's port range is full (RFC 4787 REQ-3 exhaustion).
    pub dropped_ports_exhausted: u64,
    /// The next hop never answered ARP, or its queue was full.
    pub dropped_unresolved: u64,
    /// ICMP errors whose quoted packet was translated (RFC 5508).
    pub icmp_errors_translated: u64,
    pub arp_replies: u64,
    pub arp_requests: u64,
    /// RST|ACK sent for an unsolicited inbound SYN (`unsolicited_syn = reset`).
    pub tcp_resets: u64,
    /// Packets of flows beyond [`MAX_FLOWS`], not in the flow counters.
    #[serde(default)]
    pub flows_untracked: u64,
    /// The IPv6 half (`dropped_not_ipv4` counts only other ethertypes now).
    #[serde(default)]
    pub ipv6: Ipv6Stats,
    /// NAT-PMP, PCP and UPnP requests answered with success, and with an error result.
    #[serde(default)]
    pub port_mapping_answered: u64,
    #[serde(default)]
    pub port_mapping_refused: u64,
}

/// The NAT router.
#[derive(Debug)]
pub struct Router {
    config: EngineConfig,
    addrs: RouterAddrs,
    table: NatTable,
    firewall: Firewall,
    lan_arp: Cache,
    wan_arp: Cache,
    waiting: HashMap<(Port, Ipv4Addr), Waiting>,
    waiting_total: usize,
    /// Loss decisions only; port choice has the table's own generator.
    rng: StdRng,
    stats: Stats,
    flows: HashMap<FlowKey, FlowRow>,
    v6: ipv6::State,
    /// The NAT-PMP/PCP server, made at the first request (its epoch starts there).
    portmap: Option<natscope_core::portmap::server::Server>,
    /// The UPnP IGD, made at the first SSDP or HTTP request.
    igd: Option<natscope_core::portmap::igd_server::Igd>,
}

/// What to do with a datagram after the NAT decision.
enum Verdict {
    Forward(Port, Datagram),
    Drop,
}

impl Router {
    pub fn new(config: EngineConfig, addrs: RouterAddrs) -> Self {
        let external = addrs.external.iter().map(|ip| IpAddr::V4(*ip)).collect();
        Self {
            v6: ipv6::State::new(&config, addrs.ipv6.clone()),
            table: NatTable::new(config.behavior.clone(), external, config.seed),
            firewall: Firewall::new(config.behavior.clone()),
            // A different stream from the table's, so loss does not shift port choices.
            rng: StdRng::seed_from_u64(config.seed ^ 0x6c6f_7373),
            config,
            addrs,
            lan_arp: Cache::default(),
            wan_arp: Cache::default(),
            waiting: HashMap::new(),
            waiting_total: 0,
            stats: Stats::default(),
            flows: HashMap::new(),
            portmap: None,
            igd: None,
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            ipv6: self.v6.stats,
            ..self.stats
        }
    }

    /// Every flow's counters, sorted for stable output.
    pub fn flows(&self) -> Vec<FlowRow> {
        let mut rows: Vec<FlowRow> = self.flows.values().cloned().collect();
        rows.sort_by_key(|r| (proto_rank(r.proto), r.internal, r.remote));
        rows
    }

    /// Counts one packet of the flow `internal` ↔ `remote`: `out` (LAN to WAN) or in, delivered
    /// (with the external endpoint it used) or refused.
    fn count_flow(
        &mut self,
        proto: Protocol,
        internal: SocketAddr,
        remote: SocketAddr,
        external: Option<SocketAddr>,
        out: bool,
        bytes: usize,
    ) {
        let key = FlowKey {
            proto,
            internal,
            remote,
        };
        // One hash lookup per packet: this runs for every forwarded or refused packet.
        let full = self.flows.len() >= MAX_FLOWS;
        let row = match self.flows.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if full => {
                self.stats.flows_untracked += 1;
                return;
            }
            Entry::Vacant(e) => e.insert(FlowRow {
                proto,
                internal,
                external: None,
                remote,
                out_packets: 0,
                out_bytes: 0,
                in_packets: 0,
                in_bytes: 0,
                in_refused: 0,
            }),
        };
        let bytes = bytes as u64;
        match (out, external) {
            (true, _) => {
                row.out_packets += 1;
                row.out_bytes += bytes;
            }
            (false, Some(_)) => {
                row.in_packets += 1;
                row.in_bytes += bytes;
            }
            (false, None) => row.in_refused += 1,
        }
        if external.is_some() {
            row.external = external;
        }
    }

    fn mac(&self, port: Port) -> [u8; 6] {
        match port {
            Port::Lan => self.addrs.lan_mac,
            Port::Wan => self.addrs.wan_mac,
        }
    }

    fn cache(&mut self, port: Port) -> &mut Cache {
        match port {
            Port::Lan => &mut self.lan_arp,
            Port::Wan => &mut self.wan_arp,
        }
    }

    /// One received frame. Appends frames to send (possibly none) to `out`.
    pub fn handle_frame(&mut self, now: Instant, port: Port, frame: &[u8], out: &mut Vec<Emit>) {
        let Some(eth) = EthernetPacket::new(frame) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let (src, dst) = (eth.get_source().octets(), eth.get_destination().octets());
        // A packet socket also sees our own transmissions, and promiscuous mode other hosts'
        // unicast: neither is ours to route.
        if src == self.mac(port) || (dst != self.mac(port) && dst[0] & 1 == 0) {
            return;
        }
        if frame.len() > MAX_FRAME {
            self.stats.dropped_oversize += 1;
            return;
        }
        match eth.get_ethertype() {
            EtherTypes::Arp => self.handle_arp(now, port, eth.payload(), out),
            EtherTypes::Ipv4 => {
                if dst != self.mac(port) {
                    // Broadcast or multicast IP is not routed.
                    self.stats.dropped_unroutable += 1;
                    return;
                }
                match Datagram::parse(eth.payload()) {
                    Ok(d) => {
                        // Behind a WAN gateway this records the gateway's MAC for remote IPs,
                        // which is where replies to them go anyway.
                        if port == Port::Wan || self.addrs.lan.contains(d.src()) {
                            self.cache(port).learn(now, d.src(), src);
                            self.flush(now, port, d.src(), out);
                        }
                        self.route(now, port, d, out);
                    }
                    Err(Reject::Fragment) => self.stats.dropped_fragment += 1,
                    Err(Reject::Malformed) => self.stats.dropped_malformed += 1,
                }
            }
            EtherTypes::Ipv6 => {
                let ours = dst == self.mac(port);
                self.handle_ipv6(now, port, src, ours, eth.payload(), out);
            }
            _ => self.stats.dropped_not_ipv4 += 1,
        }
    }

    /// Whether the router answers ARP for `ip` on `port`.
    fn owns(&self, port: Port, ip: Ipv4Addr) -> bool {
        match port {
            Port::Lan => ip == self.addrs.lan.addr,
            Port::Wan => {
                self.addrs.external.contains(&ip)
                    // Firewall mode: proxy ARP (RFC 1027) so on-link peers reach the public hosts.
                    || (!self.config.translate && self.lan_host(ip))
            }
        }
    }

    /// A host address of the LAN prefix other than the router's own.
    fn lan_host(&self, ip: Ipv4Addr) -> bool {
        let lan = self.addrs.lan;
        // A /31 or /32 has no network or broadcast address (RFC 3021).
        let special = lan.len < 31 && (ip == lan.network() || ip == lan.broadcast());
        lan.contains(ip) && ip != lan.addr && !special
    }

    fn handle_arp(&mut self, now: Instant, port: Port, payload: &[u8], out: &mut Vec<Emit>) {
        let Some(a) = Arp::parse(payload) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        if !a.sender_ip.is_unspecified() {
            self.cache(port).learn(now, a.sender_ip, a.sender_mac);
            self.flush(now, port, a.sender_ip, out);
        }
        // A gratuitous ARP (sender == target) announces, it does not ask.
        if a.op == ArpOperations::Request
            && a.sender_ip != a.target_ip
            && self.owns(port, a.target_ip)
        {
            let frame = arp::arp_frame(
                ArpOperations::Reply,
                (self.mac(port), a.target_ip),
                (a.sender_mac, a.sender_ip),
            );
            self.stats.arp_replies += 1;
            out.push(Emit {
                port,
                frame,
                at: now,
            });
        }
    }

    /// The time [`Router::poll_timeout`] named has come (or the driver's housekeeping tick): ARP
    /// retries and give-up for queued packets, and expired mapping sweeps. Like every machine's
    /// `handle_timeout`, it may be called early or late; it does what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Emit>) {
        let mut gone = Vec::new();
        let mut ask = Vec::new();
        for (key, w) in &mut self.waiting {
            if now.saturating_duration_since(w.since) >= arp::GIVE_UP {
                gone.push(*key);
            } else if now.saturating_duration_since(w.last_request) >= arp::RETRY {
                w.last_request = now;
                ask.push(*key);
            }
        }
        for key in gone {
            if let Some(w) = self.waiting.remove(&key) {
                self.waiting_total -= w.packets.len();
                self.stats.dropped_unresolved += w.packets.len() as u64;
            }
        }
        for (port, ip) in ask {
            self.request(now, port, ip, out);
        }
        self.table.sweep(now);
        self.firewall.sweep(now);
        self.handle_timeout6(now, out);
    }

    /// When [`Router::handle_timeout`] next has work to do (an ARP retry or give-up); `None` while
    /// nothing waits for ARP. Mapping expiry is lazy, so the sweep in `handle_timeout` is only
    /// about memory and needs no deadline of its own.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let v4 = self
            .waiting
            .values()
            .map(|w| (w.last_request + arp::RETRY).min(w.since + arp::GIVE_UP))
            .min();
        match (v4, self.v6.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn request(&mut self, now: Instant, port: Port, target: Ipv4Addr, out: &mut Vec<Emit>) {
        let sender_ip = match port {
            Port::Lan => self.addrs.lan.addr,
            // RFC 5227's probe form (sender 0.0.0.0) when there is no pool, in firewall mode.
            Port::Wan => self
                .addrs
                .external
                .first()
                .copied()
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        let frame = arp::arp_frame(
            ArpOperations::Request,
            (self.mac(port), sender_ip),
            ([0; 6], target),
        );
        self.stats.arp_requests += 1;
        out.push(Emit {
            port,
            frame,
            at: now,
        });
    }

    /// Sends what waited for `ip` on `port`, now that its MAC is known.
    fn flush(&mut self, now: Instant, port: Port, ip: Ipv4Addr, out: &mut Vec<Emit>) {
        let Some(mac) = self.cache(port).get(ip) else {
            return;
        };
        let Some(w) = self.waiting.remove(&(port, ip)) else {
            return;
        };
        self.waiting_total -= w.packets.len();
        for (dg, at) in w.packets {
            let frame = arp::frame(mac, self.mac(port), EtherTypes::Ipv4, &dg);
            out.push(Emit {
                port,
                frame,
                at: at.max(now),
            });
        }
    }

    /// Writes `dg` out of `port` towards its next hop, resolving it first if need be.
    fn transmit(
        &mut self,
        now: Instant,
        at: Instant,
        port: Port,
        dg: Vec<u8>,
        dst: Ipv4Addr,
        out: &mut Vec<Emit>,
    ) {
        let hop = match port {
            Port::Lan => dst,
            Port::Wan => self.addrs.wan_gateway.unwrap_or(dst),
        };
        if let Some(mac) = self.cache(port).get(hop) {
            let frame = arp::frame(mac, self.mac(port), EtherTypes::Ipv4, &dg);
            out.push(Emit { port, frame, at });
            return;
        }
        if let Some(w) = self.waiting.get_mut(&(port, hop)) {
            if w.packets.len() >= arp::QUEUE_PER_HOP {
                // Keep the newest, as a neighbour table does: the oldest is the likeliest stale.
                w.packets.pop_front();
                self.waiting_total -= 1;
                self.stats.dropped_unresolved += 1;
            }
            if self.waiting_total >= arp::QUEUE_TOTAL {
                self.stats.dropped_unresolved += 1;
                return;
            }
            w.packets.push_back((dg, at));
            self.waiting_total += 1;
            return;
        }
        if self.waiting_total >= arp::QUEUE_TOTAL {
            self.stats.dropped_unresolved += 1;
            return;
        }
        let mut w = Waiting {
            packets: Default::default(),
            since: now,
            last_request: now,
        };
        w.packets.push_back((dg, at));
        self.waiting_total += 1;
        self.waiting.insert((port, hop), w);
        self.request(now, port, hop, out);
    }

    /// Forwards a translated datagram: TTL, checksums, then loss and delay, which act after the
    /// NAT decision as on the access link behind it (as in the probe simulator).
    fn forward(&mut self, now: Instant, port: Port, mut d: Datagram, out: &mut Vec<Emit>) {
        d.decrement_ttl();
        d.finish();
        if self.config.loss > 0.0 && self.rng.gen::<f64>() < self.config.loss {
            self.stats.dropped_loss += 1;
            return;
        }
        let dst = d.dst();
        self.transmit(now, now + self.config.delay, port, d.into_bytes(), dst, out);
    }

    fn route(&mut self, now: Instant, port: Port, d: Datagram, out: &mut Vec<Emit>) {
        let transport = match d.transport() {
            Ok(t) => t,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        let (src, dst) = (d.src(), d.dst());
        let lan = self.addrs.lan;
        if port == Port::Lan && dst == lan.addr && self.serve_port_mapping(now, &d, transport, out)
        {
            return;
        }
        let ours = |ip| self.config.translate && self.addrs.external.contains(&ip);
        let special = |ip: Ipv4Addr| {
            ip.is_multicast() || ip.is_broadcast() || ip.is_unspecified() || ip.is_loopback()
        };
        // Nothing is addressed to the router itself: it has no IP stack to deliver to.
        let valid = !special(src)
            && !special(dst)
            && match port {
                Port::Lan => self.lan_host(src) && (ours(dst) || !lan.contains(dst)),
                Port::Wan => ours(dst) || (!self.config.translate && self.lan_host(dst)),
            };
        if !valid {
            self.stats.dropped_unroutable += 1;
            return;
        }
        if d.ttl() <= 1 {
            self.stats.dropped_ttl += 1;
            return;
        }
        if self.config.block_udp
            && (matches!(transport, Transport::Udp { .. })
                || matches!(transport, Transport::Error(q) if q.proto == IpNextHeaderProtocols::Udp))
        {
            self.stats.dropped_blocked += 1;
            return;
        }
        let verdict = match (port, self.config.translate) {
            (Port::Lan, _) if ours(dst) => self.hairpin(now, d, transport),
            (Port::Lan, true) => self.outbound(now, d, transport),
            (Port::Lan, false) => self.firewall_out(now, d, transport),
            (Port::Wan, true) => self.inbound(now, d, transport, out),
            (Port::Wan, false) => self.firewall_in(now, d, transport, out),
        };
        if let Verdict::Forward(to, d) = verdict {
            match (port, to) {
                (Port::Lan, Port::Lan) => self.stats.hairpinned += 1,
                (Port::Lan, Port::Wan) => self.stats.forwarded_out += 1,
                _ => self.stats.forwarded_in += 1,
            }
            // A flow's endpoints: before translation on the way out, after it on the way in.
            if let (Some((proto, sp, dp)), Ok(after)) =
                (flow(transport, port == Port::Lan), d.transport())
            {
                let bytes = d.len();
                match (port, to, flow(after, port == Port::Lan)) {
                    (Port::Lan, Port::Wan, Some((_, xp, _))) => self.count_flow(
                        proto,
                        sa(src, sp),
                        sa(dst, dp),
                        Some(sa(d.src(), xp)),
                        true,
                        bytes,
                    ),
                    (Port::Wan, Port::Lan, Some((_, _, ip))) => self.count_flow(
                        proto,
                        sa(d.dst(), ip),
                        sa(src, sp),
                        Some(sa(dst, dp)),
                        false,
                        bytes,
                    ),
                    _ => {}
                }
            }
            self.forward(now, to, d, out);
        }
    }

    fn exhausted(&mut self) -> Verdict {
        self.stats.dropped_ports_exhausted += 1;
        Verdict::Drop
    }

    fn unsupported(&mut self) -> Verdict {
        self.stats.dropped_unsupported += 1;
        Verdict::Drop
    }

    fn outbound(&mut self, now: Instant, mut d: Datagram, t: Transport) -> Verdict {
        if let Transport::Error(q) = t {
            return self.error_out(now, d, q);
        }
        let Some((proto, sp, dp)) = flow(t, true) else {
            return self.unsupported();
        };
        let (src, dst) = (d.src(), d.dst());
        let Ok(SocketAddr::V4(ext)) = self.table.outbound(now, proto, sa(src, sp), sa(dst, dp))
        else {
            return self.exhausted();
        };
        d.set_src(*ext.ip());
        d.set_src_port(ext.port());
        Verdict::Forward(Port::Wan, d)
    }

    /// An inside host's ICMP error about a packet it received: the quoted packet went remote →
    /// external → internal, so its destination (and the outer source) become the external side.
    fn error_out(&mut self, now: Instant, mut d: Datagram, q: Quoted) -> Verdict {
        let Some(proto) = l4_protocol(q.proto).filter(|p| *p != Protocol::Icmp) else {
            return self.unsupported();
        };
        let Some(SocketAddr::V4(ext)) =
            self.table
                .external_of(now, proto, SocketAddr::V4(q.dst), SocketAddr::V4(q.src))
        else {
            self.stats.no_mapping += 1;
            return Verdict::Drop;
        };
        d.set_src(*ext.ip());
        d.set_quoted(false, ext);
        self.stats.icmp_errors_translated += 1;
        Verdict::Forward(Port::Wan, d)
    }

    fn inbound(
        &mut self,
        now: Instant,
        mut d: Datagram,
        t: Transport,
        out: &mut Vec<Emit>,
    ) -> Verdict {
        if let Transport::Error(q) = t {
            return self.error_in(now, d, q);
        }
        let Some((proto, sp, dp)) = flow(t, false) else {
            return self.unsupported();
        };
        let (src, dst) = (d.src(), d.dst());
        let external = sa(dst, dp);
        match self.table.inbound(now, proto, sa(src, sp), external) {
            Some(SocketAddr::V4(internal)) => {
                d.set_dst(*internal.ip());
                d.set_dst_port(internal.port());
                Verdict::Forward(Port::Lan, d)
            }
            _ => {
                if let Some(internal) = self.table.internal_of(now, proto, external) {
                    self.stats.filtered += 1;
                    let bytes = d.len();
                    self.count_flow(proto, internal, sa(src, sp), None, false, bytes);
                } else {
                    self.stats.no_mapping += 1;
                }
                self.refuse_syn(now, t, src, dst, out);
                Verdict::Drop
            }
        }
    }

    /// An ICMP error from the outside about a packet one of our mappings sent (RFC 5508): the
    /// quoted source is the external endpoint. Filtering is not applied, since the error may come
    /// from any router on the path (traceroute, PMTU discovery), not from the remote we sent to.
    fn error_in(&mut self, now: Instant, mut d: Datagram, q: Quoted) -> Verdict {
        let Some(proto) = l4_protocol(q.proto) else {
            return self.unsupported();
        };
        let Some(SocketAddr::V4(internal)) =
            self.table.internal_of(now, proto, SocketAddr::V4(q.src))
        else {
            self.stats.no_mapping += 1;
            return Verdict::Drop;
        };
        d.set_dst(*internal.ip());
        d.set_quoted(true, internal);
        self.stats.icmp_errors_translated += 1;
        Verdict::Forward(Port::Lan, d)
    }

    /// RFC 5382 REQ-4: an unsolicited SYN is met with silence, or (a non-compliant NAT) RST|ACK.
    fn refuse_syn(
        &mut self,
        now: Instant,
        t: Transport,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        out: &mut Vec<Emit>,
    ) {
        let Transport::Tcp {
            src: sp,
            dst: dp,
            flags,
            seq,
            len,
        } = t
        else {
            return;
        };
        let syn_only = flags & TcpFlags::SYN != 0 && flags & (TcpFlags::ACK | TcpFlags::RST) == 0;
        if !syn_only || self.config.unsolicited_syn != UnsolicitedSyn::Reset {
            return;
        }
        let rst = packet::tcp_reset(
            SocketAddrV4::new(dst, dp),
            SocketAddrV4::new(src, sp),
            seq.wrapping_add(len),
        );
        self.stats.tcp_resets += 1;
        self.transmit(
            now,
            now + self.config.delay,
            Port::Wan,
            rst.into_bytes(),
            src,
            out,
        );
    }

    /// REQ-9: the sender is translated as for any outbound packet, and the packet goes to the
    /// internal endpoint mapped on the destination without inbound filtering, as the probe
    /// simulator (probes/src/probe/sim.rs, `send`) models it: the NAT trusts its own inside.
    fn hairpin(&mut self, now: Instant, mut d: Datagram, t: Transport) -> Verdict {
        if !self.config.behavior.hairpinning {
            self.stats.hairpin_refused += 1;
            return Verdict::Drop;
        }
        let Some((proto, sp, dp)) = flow(t, true).filter(|(p, ..)| *p != Protocol::Icmp) else {
            return self.unsupported();
        };
        let (src, dst) = (d.src(), d.dst());
        let Ok(SocketAddr::V4(from)) = self.table.outbound(now, proto, sa(src, sp), sa(dst, dp))
        else {
            return self.exhausted();
        };
        let Some(SocketAddr::V4(to)) = self.table.internal_of(now, proto, sa(dst, dp)) else {
            self.stats.no_mapping += 1;
            return Verdict::Drop;
        };
        d.set_src(*from.ip());
        d.set_src_port(from.port());
        d.set_dst(*to.ip());
        d.set_dst_port(to.port());
        Verdict::Forward(Port::Lan, d)
    }

    fn firewall_out(&mut self, now: Instant, d: Datagram, t: Transport) -> Verdict {
        match flow(t, true) {
            Some((proto, sp, dp)) => {
                self.firewall
                    .outbound(now, proto, sa(d.src(), sp), sa(d.dst(), dp))
            }
            None if matches!(t, Transport::Error(_)) => {}
            None => return self.unsupported(),
        }
        Verdict::Forward(Port::Wan, d)
    }

    fn firewall_in(
        &mut self,
        now: Instant,
        d: Datagram,
        t: Transport,
        out: &mut Vec<Emit>,
    ) -> Verdict {
        let (src, dst) = (d.src(), d.dst());
        let admitted = match (t, flow(t, false)) {
            (_, Some((proto, sp, dp))) => {
                self.firewall.inbound(now, proto, sa(src, sp), sa(dst, dp))
            }
            (Transport::Error(q), _) => match l4_protocol(q.proto) {
                Some(p) => self.firewall.has_internal(now, p, SocketAddr::V4(q.src)),
                None => return self.unsupported(),
            },
            _ => return self.unsupported(),
        };
        if !admitted {
            self.stats.filtered += 1;
            if let Some((proto, sp, dp)) = flow(t, false) {
                self.count_flow(proto, sa(dst, dp), sa(src, sp), None, false, d.len());
            }
            self.refuse_syn(now, t, src, dst, out);
            return Verdict::Drop;
        }
        Verdict::Forward(Port::Lan, d)
    }

    /// Live mappings (firewall mode: open pinholes), sorted for stable output.
    pub fn mappings(&self, now: Instant) -> Vec<MappingRow> {
        let ms = |t: Instant| t.saturating_duration_since(now).as_millis() as u64;
        let mut rows: Vec<MappingRow> = if self.config.translate {
            self.table
                .mappings(now)
                .map(|m| MappingRow {
                    proto: m.proto,
                    internal: m.internal,
                    external: m.external,
                    expires_in_ms: ms(m.expires),
                    admits: m.admits(now).map(remote_key).collect(),
                    requested_by: m.requested_at(now).map(|r| r.service),
                })
                .collect()
        } else {
            self.firewall
                .pinholes(now)
                .map(|p| MappingRow {
                    proto: p.proto,
                    internal: p.internal,
                    external: p.internal,
                    expires_in_ms: ms(p.expires),
                    admits: vec![remote_key(p.remote)],
                    requested_by: None,
                })
                .collect()
        };
        rows.extend(self.mappings6(now));
        rows.sort_by_key(|r| (r.internal, r.external, proto_rank(r.proto)));
        rows
    }
}

/// The flow a UDP, TCP or echo packet belongs to: protocol, source and destination port. Echo
/// requests travel outbound and replies inbound (`outbound` says which one is expected); the
/// identifier stands in for the inside host's port, the remote side's is 0. ICMP errors and
/// untranslated packets have none.
fn flow(t: Transport, outbound: bool) -> Option<(Protocol, u16, u16)> {
    match t {
        Transport::Udp { src, dst } => Some((Protocol::Udp, src, dst)),
        Transport::Tcp { src, dst, .. } => Some((Protocol::Tcp, src, dst)),
        Transport::Echo { request, id } if request == outbound => Some(if outbound {
            (Protocol::Icmp, id, 0)
        } else {
            (Protocol::Icmp, 0, id)
        }),
        _ => None,
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn l4_protocol(p: IpNextHeaderProtocol) -> Option<Protocol> {
    match p {
        IpNextHeaderProtocols::Udp => Some(Protocol::Udp),
        IpNextHeaderProtocols::Tcp => Some(Protocol::Tcp),
        IpNextHeaderProtocols::Icmp => Some(Protocol::Icmp),
        _ => None,
    }
}

fn proto_rank(p: Protocol) -> u8 {
    match p {
        Protocol::Udp => 0,
        Protocol::Tcp => 1,
        Protocol::Icmp => 2,
    }
}

fn remote_key(k: RemoteKey) -> String {
    let ip = k.ip.map_or("*".to_string(), |ip| ip.to_string());
    let port = k.port.map_or("*".to_string(), |p| p.to_string());
    format!("{ip}:{port}")
}
