//! Neighbor discovery (RFC 4861) for the engine, as `arp` is for IPv4: the router answers
//! neighbor solicitations for its own addresses with advertisements (router flag set), resolves
//! next hops by soliciting their solicited-node multicast group, and learns link-layer addresses
//! from solicitations, advertisements and forwarded packets. No router advertisements: lab
//! routes are static (docs/lab.md, "IPv6").
//!
//! Hand-written (the messages are a fixed 24-byte body plus one link-layer option); NDP's own
//! rule that a valid message arrives with hop limit 255 (RFC 4861 §7.1.1) keeps off-link forgeries
//! out.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::Instant;

use super::arp::CACHE_CAP;
use super::ipv6_packet::{self, ICMPV6, NEIGHBOR_ADVERT, NEIGHBOR_SOLICIT};

/// NDP option types (RFC 4861 §4.6.1).
const SOURCE_LL: u8 = 1;
const TARGET_LL: u8 = 2;
/// Advertisement flags (RFC 4861 §4.4): router, solicited, override.
const FLAG_ROUTER: u8 = 0x80;
const FLAG_SOLICITED: u8 = 0x40;
const FLAG_OVERRIDE: u8 = 0x20;

/// A neighbor solicitation or advertisement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ndp {
    pub solicit: bool,
    pub target: Ipv6Addr,
    /// The source (solicitation) or target (advertisement) link-layer address option.
    pub link: Option<[u8; 6]>,
}

impl Ndp {
    /// `kind` is the ICMPv6 type, `body` the message after type, code and checksum; `hop_limit`
    /// the IPv6 header's, which must be 255.
    pub fn parse(kind: u8, hop_limit: u8, body: &[u8]) -> Option<Self> {
        if hop_limit != 255 || !(kind == NEIGHBOR_SOLICIT || kind == NEIGHBOR_ADVERT) {
            return None;
        }
        // 4 bytes of flags/reserved, then the target address, then options.
        let target: [u8; 16] = body.get(4..20)?.try_into().ok()?;
        let mut opts = body.get(20..)?;
        let wanted = if kind == NEIGHBOR_SOLICIT {
            SOURCE_LL
        } else {
            TARGET_LL
        };
        let mut link = None;
        while opts.len() >= 2 {
            let len = usize::from(opts[1]) * 8;
            // A zero-length option is invalid and would loop forever (§4.6).
            if len == 0 || len > opts.len() {
                return None;
            }
            if opts[0] == wanted && len >= 8 {
                link = opts[2..8].try_into().ok();
            }
            opts = &opts[len..];
        }
        Some(Self {
            solicit: kind == NEIGHBOR_SOLICIT,
            target: Ipv6Addr::from(target),
            link,
        })
    }
}

/// The solicited-node multicast address of `ip` (RFC 4291 §2.7.1).
pub(crate) fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Ethernet multicast address of an IPv6 multicast group (RFC 2464 §7).
pub(crate) fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// An IPv6 packet carrying an NDP message with a link-layer option.
fn message(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    flags: u8,
    target: Ipv6Addr,
    option: u8,
    mac: [u8; 6],
) -> Vec<u8> {
    let body_len = 32usize; // type..checksum (4) + flags (4) + target (16) + option (8)
    let mut b = vec![0u8; ipv6_packet::HEADER + body_len];
    b[0] = 0x60;
    b[4..6].copy_from_slice(&(body_len as u16).to_be_bytes());
    b[6] = ICMPV6;
    b[7] = 255;
    b[8..24].copy_from_slice(&src.octets());
    b[24..40].copy_from_slice(&dst.octets());
    let m = &mut b[40..];
    m[0] = kind;
    m[4] = flags;
    m[8..24].copy_from_slice(&target.octets());
    m[24] = option;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    let sum = ipv6_packet::checksum(src, dst, ICMPV6, &b[40..]);
    b[42..44].copy_from_slice(&sum.to_be_bytes());
    b
}

/// The advertisement answering a solicitation from `asker` at `asker_mac` (unspecified for a DAD
/// probe, which is answered to all nodes, unsolicited: RFC 4861 §7.2.4) for our address `target`:
/// the packet and the Ethernet destination.
pub(crate) fn advertisement(
    target: Ipv6Addr,
    mac: [u8; 6],
    asker: Ipv6Addr,
    asker_mac: [u8; 6],
) -> (Vec<u8>, [u8; 6]) {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let (dst, dst_mac, solicited) = if asker.is_unspecified() {
        (all_nodes, multicast_mac(all_nodes), 0)
    } else {
        (asker, asker_mac, FLAG_SOLICITED)
    };
    let flags = FLAG_ROUTER | FLAG_OVERRIDE | solicited;
    let packet = message(target, dst, NEIGHBOR_ADVERT, flags, target, TARGET_LL, mac);
    (packet, dst_mac)
}

/// A solicitation for `target` from our address `src`, to its solicited-node group.
pub(crate) fn solicitation(src: Ipv6Addr, mac: [u8; 6], target: Ipv6Addr) -> (Vec<u8>, [u8; 6]) {
    let group = solicited_node(target);
    let packet = message(src, group, NEIGHBOR_SOLICIT, 0, target, SOURCE_LL, mac);
    (packet, multicast_mac(group))
}

/// Link-layer addresses of IPv6 neighbors on one port, bounded like the ARP cache.
#[derive(Debug, Default)]
pub(crate) struct Neighbors {
    entries: HashMap<Ipv6Addr, ([u8; 6], Instant)>,
}

impl Neighbors {
    pub fn get(&self, ip: Ipv6Addr) -> Option<[u8; 6]> {
        self.entries.get(&ip).map(|(m, _)| *m)
    }

    pub fn learn(&mut self, now: Instant, ip: Ipv6Addr, mac: [u8; 6]) {
        if ip.is_unspecified() || ip.is_multicast() || mac[0] & 1 != 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ipv6_packet::Packet6;

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_solicitation_round_trips_and_verifies() {
        let mac = [2, 0, 0, 0, 0, 1];
        let (bytes, dst_mac) = solicitation(ip("2001:db8:101::1"), mac, ip("2001:db8:101::2"));
        assert_eq!(dst_mac, [0x33, 0x33, 0xff, 0, 0, 2]);
        let p = Packet6::parse(&bytes).expect("valid");
        assert_eq!(p.dst(), ip("ff02::1:ff00:2"));
        assert_eq!(
            ipv6_packet::checksum(p.src(), p.dst(), ICMPV6, &p.bytes()[40..]),
            0
        );
        let n = Ndp::parse(NEIGHBOR_SOLICIT, p.hop_limit(), p.icmp_body()).expect("ndp");
        assert_eq!(
            n,
            Ndp {
                solicit: true,
                target: ip("2001:db8:101::2"),
                link: Some(mac)
            }
        );
        // Hop limit below 255: forwarded from off-link, refused (RFC 4861 §7.1.1).
        assert_eq!(Ndp::parse(NEIGHBOR_SOLICIT, 254, p.icmp_body()), None);
    }

    #[test]
    fn an_advertisement_answers_the_asker_or_all_nodes() {
        let mac = [2, 0, 0, 0, 0, 9];
        let (bytes, _) = advertisement(ip("2001:db8:0:2::1"), mac, ip("2001:db8:0:1::1"), [2; 6]);
        let p = Packet6::parse(&bytes).expect("valid");
        assert_eq!(
            (p.src(), p.dst()),
            (ip("2001:db8:0:2::1"), ip("2001:db8:0:1::1"))
        );
        let body = p.icmp_body();
        assert_eq!(body[0], FLAG_ROUTER | FLAG_SOLICITED | FLAG_OVERRIDE);
        let n = Ndp::parse(NEIGHBOR_ADVERT, 255, body).expect("ndp");
        assert_eq!(n.link, Some(mac));
        let (dad, to) = advertisement(ip("2001:db8:0:2::1"), mac, Ipv6Addr::UNSPECIFIED, [2; 6]);
        assert_eq!(to, [0x33, 0x33, 0, 0, 0, 1]);
        let p = Packet6::parse(&dad).expect("valid");
        assert_eq!(p.dst(), ip("ff02::1"));
        assert_eq!(p.icmp_body()[0] & FLAG_SOLICITED, 0);
    }

    #[test]
    fn malformed_options_are_refused() {
        let (bytes, _) = solicitation(ip("2001:db8:101::1"), [2; 6], ip("2001:db8:101::2"));
        let p = Packet6::parse(&bytes).expect("valid");
        let mut body = p.icmp_body().to_vec();
        body[21] = 0; // option length 0
        assert_eq!(Ndp::parse(NEIGHBOR_SOLICIT, 255, &body), None);
        body[21] = 9; // past the end
        assert_eq!(Ndp::parse(NEIGHBOR_SOLICIT, 255, &body), None);
        assert_eq!(Ndp::parse(NEIGHBOR_SOLICIT, 255, &body[..10]), None);
    }
}
