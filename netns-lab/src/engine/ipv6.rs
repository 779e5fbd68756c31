//! The engine's IPv6 half (issue 13, docs/lab.md "IPv6"): neighbor discovery for its own
//! addresses and next hops, hop limit, and the router's `ipv6` mode:
//!
//! - `firewall`: no translation; the RFC 6092 stateful firewall (`nat::firewall::Firewall`, the
//!   same code as the IPv4 firewall mode) with `ipv6_filtering` and the RFC 6092 timers.
//! - `nptv6`: RFC 6296 stateless, checksum-neutral 1:1 prefix translation of the ULA LAN to the
//!   routed /48, ports untouched, behind the same firewall (keyed on inside addresses).
//! - `nat66`: the RFC 4787 knobs of `behavior` (mapping, filtering, allocation, pooling) applied
//!   to IPv6 by the shared `nat::table::NatTable`, onto the router's WAN addresses, with the
//!   RFC 6092 timers.
//! - `none`: IPv6 is dropped (the router still answers neighbor discovery for its WAN addresses).
//!
//! ICMPv6 errors about a flow are translated back (RFC 4443 quotes, like RFC 5508 for IPv4) and,
//! like IPv4 errors, admitted for any inside endpoint with live state. An unsolicited inbound TCP
//! SYN is dropped or, with `ipv6_unsolicited_syn = "admin-prohibited"`, answered with ICMPv6
//! destination unreachable code 1 after [`SYN_GRACE`] unless the inside host opened the
//! connection meanwhile (simultaneous open, RFC 6092 REC-36/REC-37 and RFC 5382 REQ-4).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use natscope_core::nat::firewall::Firewall;
use natscope_core::nat::table::NatTable;
use natscope_core::nat::{NatBehavior, Protocol};
use pnet::packet::ethernet::EtherTypes;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::arp::{self, Waiting};
use super::ipv6_packet::{
    self, Nptv6, Packet6, Upper, ADMIN_PROHIBITED, DEST_UNREACHABLE, ICMPV6, MIN_MTU,
    NEIGHBOR_ADVERT, NEIGHBOR_SOLICIT, TCP, UDP,
};
use super::ndp::{self, Ndp, Neighbors};
use super::packet::Reject;
use super::{remote_key, Emit, MappingRow, Port, Router};
use crate::topology::{EngineConfig, Ipv6Mode, Ipv6Net, Ipv6UnsolicitedSyn};

/// How long an unsolicited SYN waits before it is answered with admin-prohibited: a SYN from the
/// inside within this time is a simultaneous open, and the error is not sent (RFC 5382 REQ-4's
/// 6 seconds, which RFC 6092 REC-37 defers to).
pub const SYN_GRACE: Duration = Duration::from_secs(6);
/// Admin-prohibited errors waiting for their grace period, at most.
const PENDING_MAX: usize = 256;

/// The router's IPv6 identity; empty (the default) for a router without IPv6.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterAddrs6 {
    /// WAN addresses, primary first: the engine answers neighbor discovery for them, and NAT66
    /// maps onto them.
    pub wan: Vec<Ipv6Addr>,
    /// The LAN's /64 with `addr` = the router's own LAN address; `None`: no IPv6 on the LAN.
    pub lan: Option<Ipv6Net>,
    /// The global /48 routed to the router: the LAN's prefix (`firewall`) or the external
    /// prefix of NPTv6.
    pub routed: Option<Ipv6Net>,
    /// Next hop on the WAN side; `None`: destinations are on-link.
    pub wan_gateway: Option<Ipv6Addr>,
    /// `firewall` mode: prefixes of routers behind this one, via their WAN address on our LAN.
    pub routes: Vec<(Ipv6Net, Ipv6Addr)>,
    /// On the internet segment: the other top-level routers' routed prefixes, via their WAN
    /// address (the static routes every internet-segment node has), so one router's hosts reach
    /// another's (two peers behind two routers, issue 13's grid). Empty: on-link or the gateway.
    pub wan_routes: Vec<(Ipv6Net, Ipv6Addr)>,
}

/// What the engine did with IPv6 frames (a part of [`super::Stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Stats {
    pub forwarded_out: u64,
    pub forwarded_in: u64,
    /// Inbound packets the firewall (or NAT66 filter) refused.
    pub filtered: u64,
    /// Inbound packets with no state at all (no pinhole, no mapping).
    pub no_mapping: u64,
    pub dropped_malformed: u64,
    pub dropped_fragment: u64,
    /// Not addressed across the router, or from outside the LAN prefix.
    pub dropped_unroutable: u64,
    /// Protocols (or hairpins) the router does not forward.
    pub dropped_unsupported: u64,
    pub dropped_hop_limit: u64,
    /// `ipv6 = "none"`.
    pub dropped_disabled: u64,
    /// The next hop never answered a neighbor solicitation.
    pub dropped_unresolved: u64,
    pub dropped_loss: u64,
    pub icmp_errors_translated: u64,
    pub admin_prohibited_sent: u64,
    pub neighbor_advertisements: u64,
    pub neighbor_solicitations: u64,
}

/// An admin-prohibited error waiting for [`SYN_GRACE`].
#[derive(Debug)]
struct Pending {
    due: Instant,
    /// The inside endpoint the SYN was for (after reverse translation), and its remote.
    internal: SocketAddr,
    error: Vec<u8>,
    to: Ipv6Addr,
}

/// IPv6 state of one router.
#[derive(Debug)]
pub(crate) struct State {
    addrs: RouterAddrs6,
    firewall: Firewall,
    table: Option<NatTable>,
    npt: Option<Nptv6>,
    lan_nd: Neighbors,
    wan_nd: Neighbors,
    waiting: HashMap<(Port, Ipv6Addr), Waiting>,
    waiting_total: usize,
    pending: Vec<Pending>,
    pub(crate) stats: Ipv6Stats,
}

/// The behavior of the IPv6 firewall: `ipv6_filtering` and the RFC 6092 timers.
fn firewall_behavior(config: &EngineConfig) -> NatBehavior {
    let mut b = config.behavior.clone();
    b.filtering = config.ipv6_filtering;
    b.udp_timeout = config.ipv6_udp_timeout;
    b.tcp_timeout = config.ipv6_tcp_timeout;
    b
}

impl State {
    pub(crate) fn new(config: &EngineConfig, addrs: RouterAddrs6) -> Self {
        let table = (config.ipv6 == Ipv6Mode::Nat66).then(|| {
            let mut b = config.behavior.clone();
            b.udp_timeout = config.ipv6_udp_timeout;
            b.tcp_timeout = config.ipv6_tcp_timeout;
            let pool = addrs
                .wan
                .iter()
                .take(usize::from(config.external_addresses.max(1)))
                .map(|a| IpAddr::V6(*a))
                .collect();
            NatTable::new(b, pool, config.seed ^ 0x0606)
        });
        let npt = match (config.ipv6, addrs.lan, addrs.routed) {
            (Ipv6Mode::Nptv6, Some(lan), Some(routed)) => {
                Nptv6::new(lan.network(), routed.network(), routed.len)
            }
            _ => None,
        };
        Self {
            firewall: Firewall::new(firewall_behavior(config)),
            table,
            npt,
            addrs,
            lan_nd: Neighbors::default(),
            wan_nd: Neighbors::default(),
            waiting: HashMap::new(),
            waiting_total: 0,
            pending: Vec::new(),
            stats: Ipv6Stats::default(),
        }
    }

    fn neighbors(&mut self, port: Port) -> &mut Neighbors {
        match port {
            Port::Lan => &mut self.lan_nd,
            Port::Wan => &mut self.wan_nd,
        }
    }

    /// Our address on `port` (the source of our solicitations and errors).
    fn own(&self, port: Port) -> Option<Ipv6Addr> {
        match port {
            Port::Lan => self.addrs.lan.map(|l| l.addr),
            Port::Wan => self.addrs.wan.first().copied(),
        }
    }

    fn owns(&self, port: Port, ip: Ipv6Addr) -> bool {
        match port {
            Port::Lan => self.addrs.lan.is_some_and(|l| l.addr == ip),
            Port::Wan => self.addrs.wan.contains(&ip),
        }
    }

    /// The next hop on the LAN for an address of a router behind this one (firewall mode).
    fn delegated(&self, ip: Ipv6Addr) -> Option<Ipv6Addr> {
        self.addrs
            .routes
            .iter()
            .find(|(prefix, _)| prefix.contains(ip))
            .map(|(_, via)| *via)
    }

    /// An inside address: a host of the LAN prefix other than the router itself, or (firewall
    /// mode) an address behind a router on the LAN.
    fn inside(&self, ip: Ipv6Addr) -> bool {
        self.lan_host(ip) || self.delegated(ip).is_some()
    }

    /// A host of the LAN prefix other than the router itself.
    fn lan_host(&self, ip: Ipv6Addr) -> bool {
        self.addrs
            .lan
            .is_some_and(|l| l.contains(ip) && ip != l.addr && ip != l.network())
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let nd = self
            .waiting
            .values()
            .map(|w| (w.last_request + arp::RETRY).min(w.since + arp::GIVE_UP));
        nd.chain(self.pending.iter().map(|p| p.due)).min()
    }

    pub(crate) fn sweep(&mut self, now: Instant) {
        self.firewall.sweep(now);
        if let Some(t) = &mut self.table {
            t.sweep(now);
        }
    }
}

fn special(ip: Ipv6Addr) -> bool {
    ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_loopback()
        // fe80::/10: link-local traffic is never routed (RFC 4291 §2.5.6).
        || ip.segments()[0] & 0xffc0 == 0xfe80
}

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

fn v6(a: SocketAddr) -> Option<SocketAddrV6> {
    match a {
        SocketAddr::V6(a) => Some(a),
        SocketAddr::V4(_) => None,
    }
}

/// The flow of a UDP, TCP or echo packet, as `super::flow` does for IPv4.
fn flow6(u: Upper, outbound: bool) -> Option<(Protocol, u16, u16)> {
    match u {
        Upper::Udp { src, dst } => Some((Protocol::Udp, src, dst)),
        Upper::Tcp { src, dst, .. } => Some((Protocol::Tcp, src, dst)),
        Upper::Echo { request, id } if request == outbound => Some(if outbound {
            (Protocol::Icmp, id, 0)
        } else {
            (Protocol::Icmp, 0, id)
        }),
        _ => None,
    }
}

fn l4_protocol6(p: u8) -> Option<Protocol> {
    match p {
        UDP => Some(Protocol::Udp),
        TCP => Some(Protocol::Tcp),
        ICMPV6 => Some(Protocol::Icmp),
        _ => None,
    }
}

/// An ICMPv6 destination unreachable, administratively prohibited, from `from` to the sender of
/// `invoking`, quoting as much of it as fits in the minimum MTU (RFC 4443 §2.4 (c), §3.1).
fn admin_prohibited(from: Ipv6Addr, invoking: &Packet6) -> Vec<u8> {
    let quote = &invoking.bytes()[..invoking.len().min(MIN_MTU - ipv6_packet::HEADER - 8)];
    let len = 8 + quote.len();
    let mut b = vec![0u8; ipv6_packet::HEADER + len];
    b[0] = 0x60;
    b[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    b[6] = ICMPV6;
    b[7] = 64;
    b[8..24].copy_from_slice(&from.octets());
    b[24..40].copy_from_slice(&invoking.src().octets());
    b[40] = DEST_UNREACHABLE;
    b[41] = ADMIN_PROHIBITED;
    b[48..].copy_from_slice(quote);
    let sum = ipv6_packet::checksum(from, invoking.src(), ICMPV6, &b[40..]);
    b[42..44].copy_from_slice(&sum.to_be_bytes());
    b
}

/// What to do with an IPv6 packet after the firewall or translation decided.
enum Verdict6 {
    Forward(Port, Packet6),
    Drop,
}

impl Router {
    /// One IPv6 frame's payload (dispatched from `handle_frame`); `dst_mac_ours` is false for
    /// multicast frames, which only neighbor discovery may use.
    pub(super) fn handle_ipv6(
        &mut self,
        now: Instant,
        port: Port,
        src_mac: [u8; 6],
        dst_mac_ours: bool,
        payload: &[u8],
        out: &mut Vec<Emit>,
    ) {
        let p = match Packet6::parse(payload) {
            Ok(p) => p,
            Err(Reject::Fragment) => {
                self.v6.stats.dropped_fragment += 1;
                return;
            }
            Err(Reject::Malformed) => {
                self.v6.stats.dropped_malformed += 1;
                return;
            }
        };
        let Ok(upper) = p.upper() else {
            self.v6.stats.dropped_malformed += 1;
            return;
        };
        if let Upper::Icmp {
            kind: kind @ (NEIGHBOR_SOLICIT | NEIGHBOR_ADVERT),
        } = upper
        {
            self.handle_ndp(now, port, src_mac, kind, &p, out);
            return;
        }
        if !dst_mac_ours {
            // MLD reports, router solicitations, multicast applications: not routed.
            self.v6.stats.dropped_unroutable += 1;
            return;
        }
        let src = p.src();
        if port == Port::Wan || self.v6.lan_host(src) {
            self.v6.neighbors(port).learn(now, src, src_mac);
            self.flush6(now, port, src, out);
        }
        self.route6(now, port, p, upper, out);
    }

    fn handle_ndp(
        &mut self,
        now: Instant,
        port: Port,
        src_mac: [u8; 6],
        kind: u8,
        p: &Packet6,
        out: &mut Vec<Emit>,
    ) {
        let Some(n) = Ndp::parse(kind, p.hop_limit(), p.icmp_body()) else {
            self.v6.stats.dropped_malformed += 1;
            return;
        };
        if n.solicit {
            if !p.src().is_unspecified() {
                if let Some(mac) = n.link {
                    self.v6.neighbors(port).learn(now, p.src(), mac);
                    self.flush6(now, port, p.src(), out);
                }
            }
            if self.v6.owns(port, n.target) {
                let (packet, dst) = ndp::advertisement(n.target, self.mac(port), p.src(), src_mac);
                self.v6.stats.neighbor_advertisements += 1;
                let frame = arp::frame(dst, self.mac(port), EtherTypes::Ipv6, &packet);
                out.push(Emit {
                    port,
                    frame,
                    at: now,
                });
            }
        } else {
            self.v6
                .neighbors(port)
                .learn(now, n.target, n.link.unwrap_or(src_mac));
            self.flush6(now, port, n.target, out);
        }
    }

    /// Neighbor solicitation retries and give-ups, and admin-prohibited errors whose grace has
    /// passed (part of `handle_timeout`).
    pub(super) fn handle_timeout6(&mut self, now: Instant, out: &mut Vec<Emit>) {
        let mut gone = Vec::new();
        let mut ask = Vec::new();
        for (key, w) in &mut self.v6.waiting {
            if now.saturating_duration_since(w.since) >= arp::GIVE_UP {
                gone.push(*key);
            } else if now.saturating_duration_since(w.last_request) >= arp::RETRY {
                w.last_request = now;
                ask.push(*key);
            }
        }
        for key in gone {
            if let Some(w) = self.v6.waiting.remove(&key) {
                self.v6.waiting_total -= w.packets.len();
                self.v6.stats.dropped_unresolved += w.packets.len() as u64;
            }
        }
        for (port, ip) in ask {
            self.solicit(now, port, ip, out);
        }
        let (due, waiting): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.v6.pending)
            .into_iter()
            .partition(|p| p.due <= now);
        self.v6.pending = waiting;
        for p in due {
            // Opened from the inside meanwhile: a simultaneous open, no error (REQ-4).
            let opened = match &self.v6.table {
                Some(t) => t.internal_of(now, Protocol::Tcp, p.internal).is_some(),
                None => self
                    .v6
                    .firewall
                    .has_internal(now, Protocol::Tcp, p.internal),
            };
            if !opened {
                self.v6.stats.admin_prohibited_sent += 1;
                self.transmit6(now, now, Port::Wan, p.error, p.to, out);
            }
        }
        self.v6.sweep(now);
    }

    fn solicit(&mut self, now: Instant, port: Port, target: Ipv6Addr, out: &mut Vec<Emit>) {
        let Some(src) = self.v6.own(port) else {
            return;
        };
        let (packet, dst) = ndp::solicitation(src, self.mac(port), target);
        self.v6.stats.neighbor_solicitations += 1;
        let frame = arp::frame(dst, self.mac(port), EtherTypes::Ipv6, &packet);
        out.push(Emit {
            port,
            frame,
            at: now,
        });
    }

    fn flush6(&mut self, now: Instant, port: Port, ip: Ipv6Addr, out: &mut Vec<Emit>) {
        let Some(mac) = self.v6.neighbors(port).get(ip) else {
            return;
        };
        let Some(w) = self.v6.waiting.remove(&(port, ip)) else {
            return;
        };
        self.v6.waiting_total -= w.packets.len();
        for (packet, at) in w.packets {
            let frame = arp::frame(mac, self.mac(port), EtherTypes::Ipv6, &packet);
            out.push(Emit {
                port,
                frame,
                at: at.max(now),
            });
        }
    }

    /// Writes `packet` out of `port` towards its next hop, soliciting it first if need be.
    fn transmit6(
        &mut self,
        now: Instant,
        at: Instant,
        port: Port,
        packet: Vec<u8>,
        dst: Ipv6Addr,
        out: &mut Vec<Emit>,
    ) {
        let hop = match port {
            Port::Lan => self.v6.delegated(dst).unwrap_or(dst),
            Port::Wan => self
                .v6
                .addrs
                .wan_routes
                .iter()
                .find(|(prefix, _)| prefix.contains(dst))
                .map(|(_, via)| *via)
                .or(self.v6.addrs.wan_gateway)
                .unwrap_or(dst),
        };
        if let Some(mac) = self.v6.neighbors(port).get(hop) {
            let frame = arp::frame(mac, self.mac(port), EtherTypes::Ipv6, &packet);
            out.push(Emit { port, frame, at });
            return;
        }
        if self.v6.waiting_total >= arp::QUEUE_TOTAL {
            self.v6.stats.dropped_unresolved += 1;
            return;
        }
        if let Some(w) = self.v6.waiting.get_mut(&(port, hop)) {
            if w.packets.len() >= arp::QUEUE_PER_HOP {
                w.packets.pop_front();
                self.v6.waiting_total -= 1;
                self.v6.stats.dropped_unresolved += 1;
            }
            w.packets.push_back((packet, at));
            self.v6.waiting_total += 1;
            return;
        }
        let mut w = Waiting {
            packets: Default::default(),
            since: now,
            last_request: now,
        };
        w.packets.push_back((packet, at));
        self.v6.waiting_total += 1;
        self.v6.waiting.insert((port, hop), w);
        self.solicit(now, port, hop, out);
    }

    fn forward6(&mut self, now: Instant, port: Port, mut p: Packet6, out: &mut Vec<Emit>) {
        p.decrement_hop_limit();
        p.finish();
        if self.config.loss > 0.0 && self.rng.gen::<f64>() < self.config.loss {
            self.v6.stats.dropped_loss += 1;
            return;
        }
        let dst = p.dst();
        self.transmit6(now, now + self.config.delay, port, p.into_bytes(), dst, out);
    }

    fn route6(&mut self, now: Instant, port: Port, p: Packet6, upper: Upper, out: &mut Vec<Emit>) {
        let mode = self.config.ipv6;
        if mode == Ipv6Mode::None || self.v6.addrs.lan.is_none() {
            self.v6.stats.dropped_disabled += 1;
            return;
        }
        let (src, dst) = (p.src(), p.dst());
        let inbound_ok = match mode {
            Ipv6Mode::Firewall => self.v6.inside(dst),
            Ipv6Mode::Nptv6 => self.v6.npt.is_some_and(|n| n.is_external(dst)),
            Ipv6Mode::Nat66 => self.v6.addrs.wan.contains(&dst),
            Ipv6Mode::None => false,
        };
        let lan = self.v6.addrs.lan;
        let valid = !special(src)
            && !special(dst)
            && match port {
                Port::Lan => {
                    (self.v6.lan_host(src) || mode == Ipv6Mode::Firewall && self.v6.inside(src))
                        && !lan.is_some_and(|l| l.contains(dst))
                        && self.v6.delegated(dst).is_none()
                        && !self.v6.addrs.wan.contains(&dst)
                }
                Port::Wan => inbound_ok,
            };
        if !valid {
            self.v6.stats.dropped_unroutable += 1;
            return;
        }
        if p.hop_limit() <= 1 {
            self.v6.stats.dropped_hop_limit += 1;
            return;
        }
        let is_udp = matches!(upper, Upper::Udp { .. })
            || matches!(upper, Upper::Error(q) if q.proto == UDP);
        if self.config.block_udp && is_udp {
            self.stats.dropped_blocked += 1;
            return;
        }
        if matches!(upper, Upper::Icmp { .. } | Upper::Other(_)) {
            self.v6.stats.dropped_unsupported += 1;
            return;
        }
        let verdict = match port {
            Port::Lan => self.outbound6(now, p, upper),
            Port::Wan => self.inbound6(now, p, upper),
        };
        let Verdict6::Forward(to, q) = verdict else {
            return;
        };
        // A flow's endpoints: before translation on the way out, after it on the way in.
        if let (Some((proto, sp, dp)), Ok(after)) = (flow6(upper, port == Port::Lan), q.upper()) {
            let bytes = q.len();
            match (to, flow6(after, port == Port::Lan)) {
                (Port::Wan, Some((_, xp, _))) => self.count_flow(
                    proto,
                    sa6(src, sp),
                    sa6(dst, dp),
                    Some(sa6(q.src(), xp)),
                    true,
                    bytes,
                ),
                (Port::Lan, Some((_, _, ip))) => self.count_flow(
                    proto,
                    sa6(q.dst(), ip),
                    sa6(src, sp),
                    Some(sa6(dst, dp)),
                    false,
                    bytes,
                ),
                _ => {}
            }
        }
        match to {
            Port::Wan => self.v6.stats.forwarded_out += 1,
            Port::Lan => self.v6.stats.forwarded_in += 1,
        }
        self.forward6(now, to, q, out);
    }

    fn outbound6(&mut self, now: Instant, mut p: Packet6, upper: Upper) -> Verdict6 {
        let (src, dst) = (p.src(), p.dst());
        if let Upper::Error(q) = upper {
            // An inside host's error about a packet it received: the quoted destination (and
            // the outer source) are inside addresses.
            match self.config.ipv6 {
                Ipv6Mode::Nptv6 => {
                    let Some(n) = self.v6.npt else {
                        return Verdict6::Drop;
                    };
                    let (Some(outer), Some(quoted)) =
                        (n.to_external(src), n.to_external(*q.dst.ip()))
                    else {
                        self.v6.stats.dropped_unsupported += 1;
                        return Verdict6::Drop;
                    };
                    p.set_src(outer);
                    p.set_quoted(false, SocketAddrV6::new(quoted, q.dst.port(), 0, 0));
                }
                Ipv6Mode::Nat66 => {
                    let Some(proto) = l4_protocol6(q.proto) else {
                        self.v6.stats.dropped_unsupported += 1;
                        return Verdict6::Drop;
                    };
                    let ext = self.v6.table.as_ref().and_then(|t| {
                        t.external_of(now, proto, SocketAddr::V6(q.dst), SocketAddr::V6(q.src))
                    });
                    let Some(ext) = ext.and_then(v6) else {
                        self.v6.stats.no_mapping += 1;
                        return Verdict6::Drop;
                    };
                    p.set_src(*ext.ip());
                    p.set_quoted(false, ext);
                }
                _ => {}
            }
            self.v6.stats.icmp_errors_translated += 1;
            return Verdict6::Forward(Port::Wan, p);
        }
        let Some((proto, sp, dp)) = flow6(upper, true) else {
            self.v6.stats.dropped_unsupported += 1;
            return Verdict6::Drop;
        };
        match self.config.ipv6 {
            Ipv6Mode::Nat66 => {
                let ext = self
                    .v6
                    .table
                    .as_mut()
                    .and_then(|t| t.outbound(now, proto, sa6(src, sp), sa6(dst, dp)).ok());
                let Some(ext) = ext.and_then(v6) else {
                    self.stats.dropped_ports_exhausted += 1;
                    return Verdict6::Drop;
                };
                p.set_src(*ext.ip());
                p.set_src_port(ext.port());
            }
            mode => {
                self.v6
                    .firewall
                    .outbound(now, proto, sa6(src, sp), sa6(dst, dp));
                if mode == Ipv6Mode::Nptv6 {
                    let Some(x) = self.v6.npt.and_then(|n| n.to_external(src)) else {
                        self.v6.stats.dropped_unsupported += 1;
                        return Verdict6::Drop;
                    };
                    p.set_src(x);
                }
            }
        }
        Verdict6::Forward(Port::Wan, p)
    }

    fn inbound6(&mut self, now: Instant, mut p: Packet6, upper: Upper) -> Verdict6 {
        let (src, dst) = (p.src(), p.dst());
        let mode = self.config.ipv6;
        // NPTv6 is stateless: the destination is translated first, and the firewall sees inside
        // addresses in both directions.
        if mode == Ipv6Mode::Nptv6 {
            let Some(inside) = self.v6.npt.and_then(|n| n.to_internal(dst)) else {
                self.v6.stats.dropped_unroutable += 1;
                return Verdict6::Drop;
            };
            if !self.v6.lan_host(inside) {
                self.v6.stats.dropped_unroutable += 1;
                return Verdict6::Drop;
            }
            p.set_dst(inside);
        }
        if let Upper::Error(q) = upper {
            let Some(proto) = l4_protocol6(q.proto) else {
                self.v6.stats.dropped_unsupported += 1;
                return Verdict6::Drop;
            };
            // The quoted source is what we sent: an outside address under NPTv6 and NAT66.
            let internal = match mode {
                Ipv6Mode::Nat66 => self
                    .v6
                    .table
                    .as_ref()
                    .and_then(|t| t.internal_of(now, proto, SocketAddr::V6(q.src)))
                    .and_then(v6),
                Ipv6Mode::Nptv6 => self
                    .v6
                    .npt
                    .and_then(|n| n.to_internal(*q.src.ip()))
                    .map(|ip| SocketAddrV6::new(ip, q.src.port(), 0, 0)),
                _ => Some(q.src),
            };
            let Some(internal) = internal else {
                self.v6.stats.no_mapping += 1;
                return Verdict6::Drop;
            };
            if mode != Ipv6Mode::Nat66
                && !self
                    .v6
                    .firewall
                    .has_internal(now, proto, SocketAddr::V6(internal))
            {
                self.v6.stats.filtered += 1;
                return Verdict6::Drop;
            }
            if mode == Ipv6Mode::Nat66 {
                p.set_dst(*internal.ip());
            }
            p.set_quoted(true, internal);
            self.v6.stats.icmp_errors_translated += 1;
            return Verdict6::Forward(Port::Lan, p);
        }
        let Some((proto, sp, dp)) = flow6(upper, false) else {
            self.v6.stats.dropped_unsupported += 1;
            return Verdict6::Drop;
        };
        let remote = sa6(src, sp);
        let (admitted, internal) = match mode {
            Ipv6Mode::Nat66 => {
                let external = sa6(dst, dp);
                let Some(t) = self.v6.table.as_mut() else {
                    return Verdict6::Drop;
                };
                match t.inbound(now, proto, remote, external) {
                    Some(SocketAddr::V6(i)) => {
                        p.set_dst(*i.ip());
                        p.set_dst_port(i.port());
                        (true, Some(SocketAddr::V6(i)))
                    }
                    _ => (false, t.internal_of(now, proto, external)),
                }
            }
            _ => {
                let internal = sa6(p.dst(), dp);
                let ok = self.v6.firewall.inbound(now, proto, remote, internal);
                let known = ok || self.v6.firewall.has_internal(now, proto, internal);
                (ok, known.then_some(internal))
            }
        };
        if admitted {
            return Verdict6::Forward(Port::Lan, p);
        }
        match internal {
            Some(i) => {
                self.v6.stats.filtered += 1;
                let bytes = p.len();
                self.count_flow(proto, i, remote, None, false, bytes);
            }
            None => self.v6.stats.no_mapping += 1,
        }
        self.refuse_syn6(now, &p, upper, mode, dp);
        Verdict6::Drop
    }

    /// IPv6 rows of `mappings`: NAT66 mappings, or the firewall's pinholes.
    pub(super) fn mappings6(&self, now: Instant) -> Vec<MappingRow> {
        let ms = |t: Instant| t.saturating_duration_since(now).as_millis() as u64;
        match &self.v6.table {
            Some(t) => t
                .mappings(now)
                .map(|m| MappingRow {
                    proto: m.proto,
                    internal: m.internal,
                    external: m.external,
                    expires_in_ms: ms(m.expires),
                    admits: m.admits(now).map(remote_key).collect(),
                    requested_by: m.requested_at(now).map(|r| r.service),
                })
                .collect(),
            None => self
                .v6
                .firewall
                .pinholes(now)
                .map(|p| MappingRow {
                    proto: p.proto,
                    internal: p.internal,
                    external: p.internal,
                    expires_in_ms: ms(p.expires),
                    admits: vec![remote_key(p.remote)],
                    requested_by: None,
                })
                .collect(),
        }
    }

    /// Queues an admin-prohibited error for an unsolicited SYN, if the knob asks for one.
    fn refuse_syn6(&mut self, now: Instant, p: &Packet6, upper: Upper, mode: Ipv6Mode, dp: u16) {
        let Upper::Tcp { flags, .. } = upper else {
            return;
        };
        let syn_only = flags & 0x02 != 0 && flags & (0x10 | 0x04) == 0;
        if !syn_only
            || self.config.ipv6_unsolicited_syn != Ipv6UnsolicitedSyn::AdminProhibited
            || self.v6.pending.len() >= PENDING_MAX
        {
            return;
        }
        let Some(from) = self.v6.own(Port::Wan) else {
            return;
        };
        // The invoking packet as it arrived (NPTv6 rewrote the destination already: restore it).
        let mut invoking = p.clone();
        if mode == Ipv6Mode::Nptv6 {
            if let Some(x) = self.v6.npt.and_then(|n| n.to_external(p.dst())) {
                invoking.set_dst(x);
            }
        }
        self.v6.pending.push(Pending {
            due: now + SYN_GRACE,
            internal: sa6(p.dst(), dp),
            error: admin_prohibited(from, &invoking),
            to: p.src(),
        });
    }
}
