//! The fuzzing entry point for the router (`fuzz/fuzz_targets/engine_frames.rs`): arbitrary bytes
//! become a router configuration and a sequence of frames on either port and clock steps, and every
//! frame the router emits is checked the way the receiving kernel would check it. Like
//! `natscope_core::fuzzing`, it panics on purpose when an invariant breaks; not for production
//! paths.
//!
//! Invariants: no input panics; every emitted frame is at most [`MAX_FRAME`] bytes, leaves from the
//! port's own MAC, and is either an ARP packet the engine itself accepts or an IPv4 datagram that
//! re-parses, whose header checksum is right and whose UDP (unless 0, "none"), TCP or ICMP checksum
//! is right over the length the transport header states (RFC 768, RFC 793, RFC 792); in translating
//! mode everything leaving on the WAN comes from the external pool.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use natscope_core::nat::{FilteringBehavior as F, MappingBehavior as M, NatBehavior};
use pnet::packet::arp::ArpOperations;
use pnet::packet::ethernet::{EtherTypes, EthernetPacket};
use pnet::packet::ip::IpNextHeaderProtocols;
use pnet::packet::ipv4::{self, Ipv4Packet};
use pnet::packet::Packet;

use super::arp::{self, Arp};
use super::packet::Datagram;
use super::{Emit, Port, Router, RouterAddrs, MAX_FRAME};
use crate::topology::{EngineConfig, Ipv4Net, UnsolicitedSyn};

const LAN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const WAN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const GW_MAC: [u8; 6] = [2, 0, 0, 0, 9, 9];
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);

/// Runs `data` through a router; panics if the router panics or emits a frame a receiver would drop.
/// Returns how many emitted frames were checked.
///
/// Layout: byte 0 picks mapping and filtering, byte 1 firewall mode, RST for unsolicited SYNs and
/// hairpinning; then records of `[op, len_hi, len_lo, bytes...]`, where `op & 3` is a raw frame on
/// the LAN, a raw frame on the WAN, an IPv4 datagram from the LAN host, or one from the WAN
/// gateway (the last two get a correct Ethernet header, so the fuzzer reaches the NAT quickly), and
/// `op >> 2` milliseconds pass before it (a multiple of 64 also runs the timers).
pub fn exercise(data: &[u8]) -> usize {
    let (Some(&b0), Some(&b1)) = (data.first(), data.get(1)) else {
        return 0;
    };
    let mapping = [
        M::EndpointIndependent,
        M::AddressDependent,
        M::AddressAndPortDependent,
    ][usize::from(b0 % 3)];
    let filtering = [
        F::EndpointIndependent,
        F::AddressDependent,
        F::AddressAndPortDependent,
    ][usize::from(b0 / 3 % 3)];
    let mut behavior = NatBehavior::new(mapping, filtering);
    behavior.hairpinning = b1 & 4 != 0;
    let mut cfg = EngineConfig::new(behavior);
    cfg.translate = b1 & 1 == 0;
    if b1 & 2 != 0 {
        cfg.unsolicited_syn = UnsolicitedSyn::Reset;
    }
    let translate = cfg.translate;
    let addrs = RouterAddrs {
        wan_mac: WAN_MAC,
        lan_mac: LAN_MAC,
        lan: Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 1), 24),
        external: vec![EXT],
        wan_gateway: Some(GW),
        ipv6: Default::default(),
    };
    let mut r = Router::new(cfg, addrs);
    let mut now = Instant::now();
    let mut out = Vec::new();
    let mut checked = 0;
    // Both neighbours known, so translated packets are emitted rather than queued for ARP.
    let lan_hello = arp::arp_frame(
        ArpOperations::Request,
        (HOST_MAC, HOST),
        ([0; 6], Ipv4Addr::new(10, 0, 0, 1)),
    );
    r.handle_frame(now, Port::Lan, &lan_hello, &mut out);
    let wan_hello = arp::arp_frame(ArpOperations::Request, (GW_MAC, GW), ([0; 6], EXT));
    r.handle_frame(now, Port::Wan, &wan_hello, &mut out);

    let mut rest = &data[2..];
    while let [op, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        let step = u64::from(op >> 2);
        now += Duration::from_millis(step);
        if step % 64 == 0 && step > 0 {
            r.handle_timeout(now, &mut out);
        }
        let (port, frame) = match op & 3 {
            0 => (Port::Lan, bytes.to_vec()),
            1 => (Port::Wan, bytes.to_vec()),
            2 => (
                Port::Lan,
                arp::frame(LAN_MAC, HOST_MAC, EtherTypes::Ipv4, bytes),
            ),
            _ => (
                Port::Wan,
                arp::frame(WAN_MAC, GW_MAC, EtherTypes::Ipv4, bytes),
            ),
        };
        r.handle_frame(now, port, &frame, &mut out);
        for e in out.drain(..) {
            check_emit(&e, translate);
            checked += 1;
        }
    }
    r.handle_timeout(now + Duration::from_secs(2), &mut out);
    for e in out.drain(..) {
        check_emit(&e, translate);
        checked += 1;
    }
    let _ = r.poll_timeout();
    let _ = r.mappings(now);
    checked
}

fn check_emit(e: &Emit, translate: bool) {
    let f = &e.frame;
    assert!(f.len() <= MAX_FRAME, "emitted a {}-byte frame", f.len());
    let eth = EthernetPacket::new(f).expect("emitted frame has an Ethernet header");
    let own = match e.port {
        Port::Lan => LAN_MAC,
        Port::Wan => WAN_MAC,
    };
    assert_eq!(
        eth.get_source().octets(),
        own,
        "frame not from the port's MAC"
    );
    match eth.get_ethertype() {
        EtherTypes::Arp => {
            assert!(Arp::parse(eth.payload()).is_some(), "emitted ARP re-parses");
        }
        EtherTypes::Ipv4 => check_ipv4(eth.payload(), e.port, translate),
        other => panic!("emitted ethertype {other:?}"),
    }
}

fn check_ipv4(payload: &[u8], port: Port, translate: bool) {
    let d = Datagram::parse(payload).expect("emitted datagram re-parses");
    assert!(d.ttl() >= 1, "emitted with ttl 0");
    let ip = Ipv4Packet::new(payload).expect("checked by Datagram::parse");
    assert_eq!(
        ip.get_checksum(),
        ipv4::checksum(&ip),
        "ipv4 header checksum"
    );
    if translate && port == Port::Wan {
        assert_eq!(
            d.src(),
            EXT,
            "leaves the WAN from outside the external pool"
        );
    }
    let hl = usize::from(ip.get_header_length()) * 4;
    let total = usize::from(ip.get_total_length());
    let l4 = &payload[hl..total];
    let (src, dst) = (ip.get_source(), ip.get_destination());
    match ip.get_next_level_protocol() {
        IpNextHeaderProtocols::Udp => {
            assert!(d.transport().is_ok(), "emitted udp re-parses");
            let stated = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
            let sum = u16::from_be_bytes([l4[6], l4[7]]);
            if sum != 0 {
                let seg = &l4[..stated];
                assert_eq!(transport_sum(src, dst, 17, seg), 0, "udp checksum");
            }
        }
        IpNextHeaderProtocols::Tcp => {
            assert!(d.transport().is_ok(), "emitted tcp re-parses");
            assert_eq!(transport_sum(src, dst, 6, l4), 0, "tcp checksum");
        }
        IpNextHeaderProtocols::Icmp => {
            assert_eq!(fold(sum16(l4)), 0xffff, "icmp checksum");
        }
        _ => {}
    }
}

/// The ones'-complement sum of pseudo-header and segment, checksum included: 0 when it verifies.
fn transport_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut s = sum16(&src.octets()) + sum16(&dst.octets());
    s += u32::from(proto) + seg.len() as u32 + sum16(seg);
    !fold(s)
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_translated_udp_exchange_passes_the_checks() {
        // A UDP datagram from the host out, then the answer in, through a full-cone NAT.
        let mut udp_out = vec![
            0x45, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 198, 51, 100, 1,
        ];
        udp_out.extend_from_slice(&[0x9c, 0x40, 0x0d, 0x96, 0, 12, 0, 0, b'p', b'i', b'n', b'g']);
        let mut data = vec![0, 0, 2 | (1 << 2), 0, udp_out.len() as u8];
        data.extend_from_slice(&udp_out);
        // Two ARP replies to the neighbours, then the translated datagram on the WAN.
        assert_eq!(exercise(&data), 3);
        assert_eq!(
            exercise(&data[..data.len() - 1]),
            2,
            "a truncated datagram is dropped"
        );
        // Arbitrary records never panic.
        for seed in 0..64u8 {
            let junk: Vec<u8> = (0..200u16).map(|i| (i as u8).wrapping_mul(seed)).collect();
            exercise(&junk);
        }
    }
}
