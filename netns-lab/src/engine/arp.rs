//! ARP for a router whose interfaces have no kernel addresses (RFC 826): the engine answers for
//! its own LAN address and its external pool itself, learns neighbours, and holds packets for an
//! unresolved next hop in a small bounded queue while it asks, as a host's neighbour table does
//! (RFC 1122 §2.3.2.2: queue at least one packet per unresolved destination).

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use pnet::packet::arp::{
    ArpHardwareTypes, ArpOperation, ArpOperations, ArpPacket, MutableArpPacket,
};
use pnet::packet::ethernet::{EtherType, EtherTypes, MutableEthernetPacket};
use pnet::util::MacAddr;

/// Neighbours remembered per port; the least recently seen one is forgotten first.
pub(crate) const CACHE_CAP: usize = 1024;
/// Packets held per unresolved next hop (Linux's default `unres_qlen_bytes` holds a similar few).
pub(crate) const QUEUE_PER_HOP: usize = 16;
/// Packets held for all unresolved next hops together.
pub(crate) const QUEUE_TOTAL: usize = 256;
/// Interval between ARP requests for one next hop.
pub(crate) const RETRY: Duration = Duration::from_millis(250);
/// Queued packets are dropped when the next hop has not answered after this long.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(1);

pub(crate) const ETH_HEADER: usize = 14;
const ARP_LEN: usize = 28;

/// An ARP packet this engine cares about (Ethernet/IPv4 only).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arp {
    pub op: ArpOperation,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let a = ArpPacket::new(payload)?;
        if a.get_hardware_type() != ArpHardwareTypes::Ethernet
            || a.get_protocol_type() != EtherTypes::Ipv4
            || a.get_hw_addr_len() != 6
            || a.get_proto_addr_len() != 4
        {
            return None;
        }
        Some(Self {
            op: a.get_operation(),
            sender_mac: a.get_sender_hw_addr().octets(),
            sender_ip: a.get_sender_proto_addr(),
            target_ip: a.get_target_proto_addr(),
        })
    }
}

/// An Ethernet frame around `payload`.
pub(crate) fn frame(dst: [u8; 6], src: [u8; 6], ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; ETH_HEADER + payload.len()];
    if let Some(mut e) = MutableEthernetPacket::new(&mut buf) {
        e.set_destination(mac(dst));
        e.set_source(mac(src));
        e.set_ethertype(ethertype);
        e.set_payload(payload);
    }
    buf
}

fn mac(b: [u8; 6]) -> MacAddr {
    MacAddr::new(b[0], b[1], b[2], b[3], b[4], b[5])
}

/// An ARP request (broadcast) or reply (unicast to `target_mac`) frame.
pub(crate) fn arp_frame(
    op: ArpOperation,
    sender: ([u8; 6], Ipv4Addr),
    target: ([u8; 6], Ipv4Addr),
) -> Vec<u8> {
    let mut arp = [0u8; ARP_LEN];
    if let Some(mut a) = MutableArpPacket::new(&mut arp) {
        a.set_hardware_type(ArpHardwareTypes::Ethernet);
        a.set_protocol_type(EtherTypes::Ipv4);
        a.set_hw_addr_len(6);
        a.set_proto_addr_len(4);
        a.set_operation(op);
        a.set_sender_hw_addr(mac(sender.0));
        a.set_sender_proto_addr(sender.1);
        a.set_target_hw_addr(mac(target.0));
        a.set_target_proto_addr(target.1);
    }
    let dst = if op == ArpOperations::Request {
        [0xff; 6]
    } else {
        target.0
    };
    frame(dst, sender.0, EtherTypes::Arp, &arp)
}

/// One port's neighbour cache, bounded.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    entries: HashMap<Ipv4Addr, ([u8; 6], Instant)>,
}

impl Cache {
    pub fn get(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.entries.get(&ip).map(|(m, _)| *m)
    }

    pub fn learn(&mut self, now: Instant, ip: Ipv4Addr, mac: [u8; 6]) {
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || mac[0] & 1 != 0 {
            return;
        }
        if !self.entries.contains_key(&ip) && self.entries.len() >= CACHE_CAP {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(ip, _)| *ip);
            if let Some(o) = oldest {
                self.entries.remove(&o);
            }
        }
        self.entries.insert(ip, (mac, now));
    }
}

/// Packets waiting for one next hop's MAC.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// IPv4 datagrams with the time each is due out.
    pub packets: VecDeque<(Vec<u8>, Instant)>,
    pub since: Instant,
    pub last_request: Instant,
}
