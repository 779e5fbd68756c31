//! Frame-level tests of the router's IPv6 half on a virtual clock: neighbor discovery, the RFC 6092
//! firewall per filtering behavior, NPTv6, NAT66, ICMPv6 errors and the admin-prohibited knob.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use natscope_core::nat::{FilteringBehavior as F, MappingBehavior as M, NatBehavior};
use pnet::packet::ethernet::EtherTypes;

use super::ipv6_packet::{self, Packet6, Upper, ICMPV6, TCP, UDP};
use super::ndp;
use super::*;
use crate::topology::{EngineConfig, Ipv4Net, Ipv6Mode, Ipv6Net, Ipv6UnsolicitedSyn};

const LAN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const WAN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const R1_MAC: [u8; 6] = [2, 0, 0, 0, 9, 1];
const R2_MAC: [u8; 6] = [2, 0, 0, 0, 9, 2];

fn ip(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

fn ep(s: &str) -> SocketAddrV6 {
    s.parse().expect("test endpoint")
}

const WAN1: &str = "2001:db8:0:2::1";
/// The reflector's two addresses and a third host on the internet.
const R1: &str = "2001:db8:0:1::1";
const R1B: &str = "2001:db8:0:1::2";
const R3: &str = "2001:db8:0:1::3";

fn router(
    mode: Ipv6Mode,
    filtering: F,
    tweak: impl FnOnce(&mut EngineConfig),
) -> (Router, Ipv6Addr) {
    let mut c = EngineConfig::new(NatBehavior::new(
        M::EndpointIndependent,
        F::AddressAndPortDependent,
    ));
    c.ipv6 = mode;
    c.ipv6_filtering = filtering;
    tweak(&mut c);
    let host = match mode {
        Ipv6Mode::Nptv6 | Ipv6Mode::Nat66 => ip("fd00:1::2"),
        _ => ip("2001:db8:101::2"),
    };
    let lan = Ipv6Net::new(
        if host.segments()[0] == 0xfd00 {
            ip("fd00:1::1")
        } else {
            ip("2001:db8:101::1")
        },
        64,
    );
    let addrs = RouterAddrs {
        wan_mac: WAN_MAC,
        lan_mac: LAN_MAC,
        lan: Ipv4Net::new("10.0.0.1".parse().expect("v4"), 24),
        external: vec!["203.0.113.1".parse().expect("v4")],
        wan_gateway: None,
        ipv6: RouterAddrs6 {
            wan: vec![ip(WAN1), ip("2001:db8:0:2::2")],
            lan: Some(lan),
            routed: Some(Ipv6Net::new(ip("2001:db8:101::"), 48)),
            wan_gateway: None,
            // A router behind this one, at ::9 of the LAN, with its own routed prefix.
            routes: vec![(
                Ipv6Net::new(ip("2001:db8:102::"), 48),
                ip("2001:db8:101::9"),
            )],
            wan_routes: Vec::new(),
        },
    };
    let mut r = Router::new(c, addrs);
    // Neighbors known in advance: the host solicits the router, the remotes advertise.
    let t0 = Instant::now();
    let mut out = Vec::new();
    let (ns, _) = ndp::solicitation(host, HOST_MAC, lan.addr);
    r.handle_frame(t0, Port::Lan, &frame(LAN_MAC, HOST_MAC, &ns), &mut out);
    for (addr, mac) in [(R1, R1_MAC), (R1B, R1_MAC), (R3, R2_MAC)] {
        let (na, _) = ndp::advertisement(ip(addr), mac, ip(WAN1), WAN_MAC);
        r.handle_frame(t0, Port::Wan, &frame(WAN_MAC, mac, &na), &mut out);
    }
    (r, host)
}

fn frame(dst: [u8; 6], src: [u8; 6], packet: &[u8]) -> Vec<u8> {
    arp::frame(dst, src, EtherTypes::Ipv6, packet)
}

fn packet(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 40];
    b[0] = 0x60;
    b[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    b[6] = proto;
    b[7] = 64;
    b[8..24].copy_from_slice(&src.octets());
    b[24..40].copy_from_slice(&dst.octets());
    b.extend_from_slice(l4);
    let mut p = Packet6::parse(&b).expect("test packet");
    p.finish();
    p.into_bytes()
}

fn udp(src: SocketAddrV6, dst: SocketAddrV6) -> Vec<u8> {
    let mut l4 = vec![0u8; 12];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&12u16.to_be_bytes());
    l4[8..12].copy_from_slice(b"ping");
    packet(*src.ip(), *dst.ip(), UDP, &l4)
}

fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    packet(*src.ip(), *dst.ip(), TCP, &l4)
}

/// Sends `bytes` in on `port` at `now`; the IPv6 packets that come out, with their port.
fn send(r: &mut Router, now: Instant, port: Port, bytes: &[u8]) -> Vec<(Port, Packet6)> {
    let (mac, from) = match port {
        Port::Lan => (LAN_MAC, HOST_MAC),
        Port::Wan => (WAN_MAC, R1_MAC),
    };
    let mut out = Vec::new();
    r.handle_frame(now, port, &frame(mac, from, bytes), &mut out);
    decode(out)
}

fn decode(out: Vec<Emit>) -> Vec<(Port, Packet6)> {
    out.into_iter()
        .filter(|e| e.frame.get(12..14) == Some(&[0x86, 0xdd]))
        .map(|e| {
            (
                e.port,
                Packet6::parse(&e.frame[14..]).expect("router emits valid IPv6"),
            )
        })
        .collect()
}

fn verifies(p: &Packet6) -> bool {
    let l4 = &p.bytes()[40..];
    let proto = p.bytes()[6];
    ipv6_packet::checksum(p.src(), p.dst(), proto, l4) == 0
}

fn ports(p: &Packet6) -> (u16, u16) {
    match p.upper().expect("upper") {
        Upper::Udp { src, dst } | Upper::Tcp { src, dst, .. } => (src, dst),
        other => panic!("not udp/tcp: {other:?}"),
    }
}

#[test]
fn answers_neighbor_solicitations_for_its_own_addresses_only() {
    let (mut r, host) = router(Ipv6Mode::Firewall, F::EndpointIndependent, |_| {});
    let t = Instant::now();
    let (ns, group_mac) = ndp::solicitation(host, HOST_MAC, ip("2001:db8:101::1"));
    let mut out = Vec::new();
    r.handle_frame(t, Port::Lan, &frame(group_mac, HOST_MAC, &ns), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0].frame[0..6], &HOST_MAC);
    let na = Packet6::parse(&out[0].frame[14..]).expect("valid");
    assert_eq!((na.src(), na.dst()), (ip("2001:db8:101::1"), host));
    assert!(verifies(&na));
    // Another host's address, and our WAN address asked on the LAN: no answer.
    for target in ["2001:db8:101::9", WAN1] {
        let (ns, m) = ndp::solicitation(host, HOST_MAC, ip(target));
        let mut out = Vec::new();
        r.handle_frame(t, Port::Lan, &frame(m, HOST_MAC, &ns), &mut out);
        assert!(out.is_empty(), "{target}");
    }
    // On the WAN, for both WAN addresses.
    for target in [WAN1, "2001:db8:0:2::2"] {
        let (ns, m) = ndp::solicitation(ip(R1), R1_MAC, ip(target));
        let mut out = Vec::new();
        r.handle_frame(t, Port::Wan, &frame(m, R1_MAC, &ns), &mut out);
        assert_eq!(out.len(), 1, "{target}");
    }
    assert_eq!(r.stats().ipv6.neighbor_advertisements, 4);
}

/// Firewall mode routes a nested router's prefix: out from behind it, and back to it via its
/// WAN address on our LAN, through the same firewall.
#[test]
fn a_nested_routers_prefix_is_routed_via_that_router() {
    const CHILD_MAC: [u8; 6] = [2, 0, 0, 0, 1, 9];
    let (mut r, _) = router(Ipv6Mode::Firewall, F::AddressAndPortDependent, |_| {});
    let t = Instant::now();
    let (na, _) = ndp::advertisement(
        ip("2001:db8:101::9"),
        CHILD_MAC,
        ip("2001:db8:101::1"),
        LAN_MAC,
    );
    let mut out = Vec::new();
    r.handle_frame(t, Port::Lan, &frame(LAN_MAC, CHILD_MAC, &na), &mut out);
    let deep = ep("[2001:db8:102::5]:4000");
    let remote = ep("[2001:db8:0:1::1]:3478");
    let mut out = Vec::new();
    r.handle_frame(
        t,
        Port::Lan,
        &frame(LAN_MAC, CHILD_MAC, &udp(deep, remote)),
        &mut out,
    );
    assert_eq!(decode(out).len(), 1, "out from behind the child router");
    let mut out = Vec::new();
    r.handle_frame(
        t,
        Port::Wan,
        &frame(WAN_MAC, R1_MAC, &udp(remote, deep)),
        &mut out,
    );
    assert_eq!(out.len(), 1, "the reply goes back");
    assert_eq!(&out[0].frame[0..6], &CHILD_MAC, "via the child router");
    // Unsolicited to the nested prefix: the firewall still applies.
    let never = ep("[2001:db8:102::5]:4001");
    let mut out = Vec::new();
    r.handle_frame(
        t,
        Port::Wan,
        &frame(WAN_MAC, R1_MAC, &udp(remote, never)),
        &mut out,
    );
    assert!(out.is_empty());
}

#[test]
fn resolves_an_unknown_next_hop_and_sends_what_waited() {
    let (mut r, host) = router(Ipv6Mode::Firewall, F::EndpointIndependent, |_| {});
    let t = Instant::now();
    let far = ip("2001:db8:0:2::77");
    let mut out = Vec::new();
    let bytes = udp(
        SocketAddrV6::new(host, 5000, 0, 0),
        SocketAddrV6::new(far, 9, 0, 0),
    );
    r.handle_frame(t, Port::Lan, &frame(LAN_MAC, HOST_MAC, &bytes), &mut out);
    let sent = decode(out);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].1.dst(),
        ndp::solicited_node(far),
        "a solicitation, not the packet"
    );
    assert_eq!(r.poll_timeout(), Some(t + arp::RETRY));
    let (na, _) = ndp::advertisement(far, [2, 0, 0, 0, 7, 7], ip(WAN1), WAN_MAC);
    let got = send(&mut r, t, Port::Wan, &na);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.dst(), far);
    // Unanswered: retried, then given up.
    let other = ip("2001:db8:0:2::78");
    let bytes = udp(
        SocketAddrV6::new(host, 5000, 0, 0),
        SocketAddrV6::new(other, 9, 0, 0),
    );
    send(&mut r, t, Port::Lan, &bytes);
    let mut out = Vec::new();
    r.handle_timeout(t + arp::GIVE_UP, &mut out);
    assert_eq!(r.stats().ipv6.dropped_unresolved, 1);
}

/// RFC 6092 filtering, per knob: unsolicited inbound to a never-used port is dropped; after the
/// host sent to R1, inbound is admitted from R1 always, from R1's other port under ADF and EIF,
/// and from a third host under EIF only.
#[test]
fn the_firewall_admits_exactly_what_its_filtering_says() {
    for (filtering, same_ip_other_port, third_host) in [
        (F::EndpointIndependent, true, true),
        (F::AddressDependent, true, false),
        (F::AddressAndPortDependent, false, false),
    ] {
        let (mut r, host) = router(Ipv6Mode::Firewall, filtering, |_| {});
        let t = Instant::now();
        let inside = SocketAddrV6::new(host, 5000, 0, 0);
        let never = SocketAddrV6::new(host, 6000, 0, 0);
        assert!(send(&mut r, t, Port::Wan, &udp(ep("[2001:db8:0:1::3]:7"), never)).is_empty());

        let out = send(
            &mut r,
            t,
            Port::Lan,
            &udp(inside, ep("[2001:db8:0:1::1]:3478")),
        );
        assert_eq!(out.len(), 1);
        let (port, p) = &out[0];
        assert_eq!(*port, Port::Wan);
        assert_eq!(p.src(), host, "no translation");
        assert_eq!(p.hop_limit(), 63);
        assert!(verifies(p));

        let back = send(
            &mut r,
            t,
            Port::Wan,
            &udp(ep("[2001:db8:0:1::1]:3478"), inside),
        );
        assert_eq!(back.len(), 1, "{filtering:?}: the reply");
        let other_port = send(
            &mut r,
            t,
            Port::Wan,
            &udp(ep("[2001:db8:0:1::1]:3479"), inside),
        );
        assert_eq!(other_port.len() == 1, same_ip_other_port, "{filtering:?}");
        let third = send(
            &mut r,
            t,
            Port::Wan,
            &udp(ep("[2001:db8:0:1::3]:9999"), inside),
        );
        assert_eq!(third.len() == 1, third_host, "{filtering:?}");
        // The pinhole lives the RFC 6092 default of 5 minutes, not IPv4's 2.
        let later = t + Duration::from_secs(299);
        assert_eq!(
            send(
                &mut r,
                later,
                Port::Wan,
                &udp(ep("[2001:db8:0:1::1]:3478"), inside)
            )
            .len(),
            1
        );
        let expired = later + Duration::from_secs(301);
        assert!(send(
            &mut r,
            expired,
            Port::Wan,
            &udp(ep("[2001:db8:0:1::1]:3478"), inside)
        )
        .is_empty());
    }
}

#[test]
fn nptv6_keeps_ports_and_maps_the_prefix_one_to_one_both_ways() {
    let (mut r, host) = router(Ipv6Mode::Nptv6, F::EndpointIndependent, |_| {});
    let t = Instant::now();
    let inside = SocketAddrV6::new(host, 5000, 0, 0);
    // Unsolicited: dropped by the firewall even though the prefix maps.
    let npt = ipv6_packet::Nptv6::new(ip("fd00:1::"), ip("2001:db8:101::"), 48).expect("/48");
    let outside = npt.to_external(host).expect("maps");
    assert!(send(
        &mut r,
        t,
        Port::Wan,
        &udp(
            ep("[2001:db8:0:1::3]:7"),
            SocketAddrV6::new(outside, 5000, 0, 0)
        )
    )
    .is_empty());

    let out = send(
        &mut r,
        t,
        Port::Lan,
        &udp(inside, ep("[2001:db8:0:1::1]:3478")),
    );
    let p = &out[0].1;
    assert_eq!(p.src(), outside);
    assert_eq!(
        p.src().segments()[..3],
        ip("2001:db8:101::").segments()[..3]
    );
    assert_eq!(
        p.src().segments()[4..],
        host.segments()[4..],
        "interface id kept"
    );
    assert_eq!(ports(p), (5000, 3478), "ports kept");
    assert!(verifies(p));
    let back = send(
        &mut r,
        t,
        Port::Wan,
        &udp(
            ep("[2001:db8:0:1::1]:3478"),
            SocketAddrV6::new(outside, 5000, 0, 0),
        ),
    );
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].1.dst(), host);
    assert_eq!(ports(&back[0].1), (3478, 5000));
    assert!(verifies(&back[0].1));
}

#[test]
fn nat66_maps_per_the_rfc_4787_knobs() {
    let symmetric = |c: &mut EngineConfig| {
        c.behavior = NatBehavior::new(M::AddressAndPortDependent, F::AddressAndPortDependent);
    };
    let (mut r, host) = router(Ipv6Mode::Nat66, F::EndpointIndependent, symmetric);
    let t = Instant::now();
    let inside = SocketAddrV6::new(host, 5000, 0, 0);
    let a = send(
        &mut r,
        t,
        Port::Lan,
        &udp(inside, ep("[2001:db8:0:1::1]:3478")),
    );
    let b = send(
        &mut r,
        t,
        Port::Lan,
        &udp(inside, ep("[2001:db8:0:1::2]:3478")),
    );
    let (pa, pb) = (&a[0].1, &b[0].1);
    assert_eq!(pa.src(), ip(WAN1));
    assert_eq!(pb.src(), ip(WAN1), "paired pooling");
    assert_ne!(
        ports(pa).0,
        ports(pb).0,
        "APDM: one mapping per destination"
    );
    assert!(verifies(pa) && verifies(pb));
    let ext_a = SocketAddrV6::new(ip(WAN1), ports(pa).0, 0, 0);
    let back = send(
        &mut r,
        t,
        Port::Wan,
        &udp(ep("[2001:db8:0:1::1]:3478"), ext_a),
    );
    assert_eq!(back[0].1.dst(), host);
    assert_eq!(ports(&back[0].1).1, 5000);
    // APDF: the mapping for R1 refuses R1's other port and a third host.
    assert!(send(
        &mut r,
        t,
        Port::Wan,
        &udp(ep("[2001:db8:0:1::1]:3479"), ext_a)
    )
    .is_empty());
    assert!(send(&mut r, t, Port::Wan, &udp(ep("[2001:db8:0:1::3]:1"), ext_a)).is_empty());

    // EIM + EIF: one port for every destination, and anyone may send to it.
    let cone = |c: &mut EngineConfig| {
        c.behavior = NatBehavior::new(M::EndpointIndependent, F::EndpointIndependent);
    };
    let (mut r, host) = router(Ipv6Mode::Nat66, F::AddressAndPortDependent, cone);
    let inside = SocketAddrV6::new(host, 5000, 0, 0);
    let a = send(
        &mut r,
        t,
        Port::Lan,
        &udp(inside, ep("[2001:db8:0:1::1]:3478")),
    );
    let b = send(
        &mut r,
        t,
        Port::Lan,
        &udp(inside, ep("[2001:db8:0:1::3]:3478")),
    );
    assert_eq!(ports(&a[0].1).0, ports(&b[0].1).0);
    let ext = SocketAddrV6::new(ip(WAN1), ports(&a[0].1).0, 0, 0);
    assert_eq!(
        send(&mut r, t, Port::Wan, &udp(ep("[2001:db8:0:1::2]:1"), ext)).len(),
        1
    );
}

/// An ICMPv6 error quoting what the host sent comes back with the quote translated to the
/// inside addresses, in every mode.
#[test]
fn icmpv6_errors_come_back_translated() {
    for mode in [Ipv6Mode::Firewall, Ipv6Mode::Nptv6, Ipv6Mode::Nat66] {
        let (mut r, host) = router(mode, F::AddressAndPortDependent, |_| {});
        let t = Instant::now();
        let inside = SocketAddrV6::new(host, 5000, 0, 0);
        let out = send(
            &mut r,
            t,
            Port::Lan,
            &udp(inside, ep("[2001:db8:0:1::1]:3478")),
        );
        let sent = out[0].1.bytes().to_vec();
        let outer_src = out[0].1.src();
        // A router on the path (R3) says the port is unreachable.
        let mut l4 = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&sent);
        let err = packet(ip(R3), outer_src, ICMPV6, &l4);
        let back = send(&mut r, t, Port::Wan, &err);
        assert_eq!(back.len(), 1, "{mode:?}");
        let p = &back[0].1;
        assert_eq!(p.dst(), host, "{mode:?}");
        assert!(verifies(p), "{mode:?}");
        let Ok(Upper::Error(q)) = p.upper() else {
            panic!("{mode:?}: not an error");
        };
        assert_eq!(
            q.src, inside,
            "{mode:?}: the quote names the inside endpoint"
        );
        assert_eq!(r.stats().ipv6.icmp_errors_translated, 1);
        // An error about an endpoint with no state is dropped.
        let mut stale = sent.clone();
        stale[40..42].copy_from_slice(&6001u16.to_be_bytes());
        let mut l4 = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&stale);
        assert!(
            send(
                &mut r,
                t,
                Port::Wan,
                &packet(ip(R3), outer_src, ICMPV6, &l4)
            )
            .is_empty(),
            "{mode:?}"
        );
    }
}

#[test]
fn an_unsolicited_syn_is_dropped_or_answered_after_the_grace_period() {
    let inside_port = 8080;
    // Default: silence.
    let (mut r, host) = router(Ipv6Mode::Firewall, F::AddressAndPortDependent, |_| {});
    let t = Instant::now();
    let to = SocketAddrV6::new(host, inside_port, 0, 0);
    assert!(send(
        &mut r,
        t,
        Port::Wan,
        &tcp(ep("[2001:db8:0:1::1]:4000"), to, 0x02)
    )
    .is_empty());
    assert_eq!(r.poll_timeout(), None);

    let prohibit =
        |c: &mut EngineConfig| c.ipv6_unsolicited_syn = Ipv6UnsolicitedSyn::AdminProhibited;
    let (mut r, host) = router(Ipv6Mode::Firewall, F::AddressAndPortDependent, prohibit);
    let to = SocketAddrV6::new(host, inside_port, 0, 0);
    let syn = tcp(ep("[2001:db8:0:1::1]:4000"), to, 0x02);
    assert!(send(&mut r, t, Port::Wan, &syn).is_empty(), "not at once");
    assert_eq!(r.poll_timeout(), Some(t + SYN_GRACE));
    let mut out = Vec::new();
    r.handle_timeout(t + SYN_GRACE - Duration::from_millis(1), &mut out);
    assert!(decode(out).is_empty());
    let mut out = Vec::new();
    r.handle_timeout(t + SYN_GRACE, &mut out);
    let sent = decode(out);
    assert_eq!(sent.len(), 1);
    let p = &sent[0].1;
    assert_eq!((p.src(), p.dst()), (ip(WAN1), ip(R1)));
    assert_eq!(
        &p.bytes()[40..42],
        &[1, 1],
        "destination unreachable, admin prohibited"
    );
    assert!(verifies(p));

    // A simultaneous open: the host's own SYN within the grace period cancels the error.
    let (mut r, host) = router(Ipv6Mode::Firewall, F::AddressAndPortDependent, prohibit);
    let to = SocketAddrV6::new(host, inside_port, 0, 0);
    send(
        &mut r,
        t,
        Port::Wan,
        &tcp(ep("[2001:db8:0:1::1]:4000"), to, 0x02),
    );
    send(
        &mut r,
        t + Duration::from_secs(1),
        Port::Lan,
        &tcp(to, ep("[2001:db8:0:1::1]:4000"), 0x02),
    );
    let mut out = Vec::new();
    r.handle_timeout(t + SYN_GRACE, &mut out);
    assert!(decode(out).is_empty());
}

#[test]
fn hop_limit_fragments_and_disabled_ipv6_are_dropped() {
    let (mut r, host) = router(Ipv6Mode::Firewall, F::EndpointIndependent, |_| {});
    let t = Instant::now();
    let mut last_hop = udp(
        SocketAddrV6::new(host, 1, 0, 0),
        ep("[2001:db8:0:1::1]:3478"),
    );
    last_hop[7] = 1;
    assert!(send(&mut r, t, Port::Lan, &last_hop).is_empty());
    let mut frag = udp(
        SocketAddrV6::new(host, 1, 0, 0),
        ep("[2001:db8:0:1::1]:3478"),
    );
    frag[6] = 44;
    assert!(send(&mut r, t, Port::Lan, &frag).is_empty());
    // Spoofed: a LAN packet from outside the LAN prefix.
    let spoofed = udp(ep("[2001:db8:0:1::9]:1"), ep("[2001:db8:0:1::1]:3478"));
    assert!(send(&mut r, t, Port::Lan, &spoofed).is_empty());
    let s = r.stats().ipv6;
    assert_eq!(
        (
            s.dropped_hop_limit,
            s.dropped_fragment,
            s.dropped_unroutable
        ),
        (1, 1, 1)
    );

    let (mut r, host) = router(Ipv6Mode::None, F::EndpointIndependent, |_| {});
    let ok = udp(
        SocketAddrV6::new(host, 1, 0, 0),
        ep("[2001:db8:0:1::1]:3478"),
    );
    assert!(send(&mut r, t, Port::Lan, &ok).is_empty());
    assert_eq!(r.stats().ipv6.dropped_disabled, 1);
}

/// The engine's own forwarding rate for 64-byte UDP payloads, IPv4 next to IPv6, on one core with
/// no sockets (`cargo test -p natscope-lab --lib engine_rate -- --ignored --nocapture`). A debug
/// build's numbers: compare the two families, not with `natscope bench lab`.
#[test]
#[ignore = "a benchmark: prints rates, asserts nothing about speed"]
fn engine_rate_ipv4_and_ipv6() {
    use pnet::packet::arp::ArpOperations;
    let (mut r, host) = router(Ipv6Mode::Firewall, F::EndpointIndependent, |_| {});
    let t = Instant::now();
    let mut out = Vec::new();
    let v4 = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("v4");
    let dst4 = v4("198.51.100.1");
    // Both next hops known.
    r.handle_frame(
        t,
        Port::Lan,
        &arp::arp_frame(
            ArpOperations::Request,
            (HOST_MAC, v4("10.0.0.2")),
            ([0; 6], v4("10.0.0.1")),
        ),
        &mut out,
    );
    r.handle_frame(
        t,
        Port::Wan,
        &arp::arp_frame(
            ArpOperations::Request,
            (R1_MAC, dst4),
            ([0; 6], v4("203.0.113.1")),
        ),
        &mut out,
    );
    let mut dg4 = vec![0u8; 20 + 8 + 64];
    dg4[0] = 0x45;
    dg4[2..4].copy_from_slice(&92u16.to_be_bytes());
    dg4[8] = 64;
    dg4[9] = 17;
    dg4[12..16].copy_from_slice(&v4("10.0.0.2").octets());
    dg4[16..20].copy_from_slice(&dst4.octets());
    dg4[20..22].copy_from_slice(&5000u16.to_be_bytes());
    dg4[22..24].copy_from_slice(&9000u16.to_be_bytes());
    dg4[24..26].copy_from_slice(&72u16.to_be_bytes());
    let f4 = arp::frame(LAN_MAC, HOST_MAC, EtherTypes::Ipv4, &dg4);
    let mut l4 = vec![0u8; 8 + 64];
    l4[0..2].copy_from_slice(&5000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&9000u16.to_be_bytes());
    l4[4..6].copy_from_slice(&72u16.to_be_bytes());
    let f6 = frame(LAN_MAC, HOST_MAC, &packet(host, ip(R1), UDP, &l4));
    let n = 200_000u32;
    for (family, f) in [("ipv4", &f4), ("ipv6", &f6), ("ipv4", &f4), ("ipv6", &f6)] {
        let start = std::time::Instant::now();
        for _ in 0..n {
            out.clear();
            r.handle_frame(t, Port::Lan, f, &mut out);
            assert_eq!(out.len(), 1, "{family}: forwarded");
        }
        let rate = f64::from(n) / start.elapsed().as_secs_f64();
        println!("{family}: {rate:.0} frames/s");
    }
}

/// Untrusted input never panics the IPv6 path: valid frames of every kind, truncated and with
/// random bytes flipped (a seeded generator, so a failure reproduces), through every mode; and
/// whatever comes out re-parses with a correct upper-layer checksum.
#[test]
fn mangled_ipv6_frames_never_panic_and_every_emitted_packet_verifies() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(13);
    let mut emitted = 0;
    for mode in [
        Ipv6Mode::None,
        Ipv6Mode::Firewall,
        Ipv6Mode::Nptv6,
        Ipv6Mode::Nat66,
    ] {
        let prohibit = |c: &mut EngineConfig| {
            c.ipv6_unsolicited_syn = Ipv6UnsolicitedSyn::AdminProhibited;
        };
        let (mut r, host) = router(mode, F::AddressDependent, prohibit);
        let inside = SocketAddrV6::new(host, 5000, 0, 0);
        let remote = ep("[2001:db8:0:1::1]:3478");
        let outside = SocketAddrV6::new(ip(WAN1), 5000, 0, 0);
        let mut err = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&udp(remote, inside));
        let (ns, _) = ndp::solicitation(host, HOST_MAC, ip("2001:db8:101::1"));
        let seeds = [
            udp(inside, remote),
            udp(remote, outside),
            tcp(remote, inside, 0x02),
            tcp(inside, remote, 0x12),
            packet(ip(R3), host, ICMPV6, &err),
            ns,
        ];
        let mut t = Instant::now();
        for i in 0..4000 {
            let mut b = seeds[i % seeds.len()].clone();
            match rng.gen_range(0..3) {
                0 => b.truncate(rng.gen_range(0..=b.len())),
                1 => {
                    for _ in 0..rng.gen_range(1..4) {
                        let at = rng.gen_range(0..b.len());
                        b[at] = rng.gen();
                    }
                }
                _ => {}
            }
            let (port, to, from) = if rng.gen() {
                (Port::Lan, LAN_MAC, HOST_MAC)
            } else {
                (Port::Wan, WAN_MAC, R1_MAC)
            };
            t += Duration::from_millis(rng.gen_range(0..2000));
            let mut out = Vec::new();
            r.handle_frame(t, port, &frame(to, from, &b), &mut out);
            r.handle_timeout(t, &mut out);
            for e in out {
                assert!(e.frame.len() <= MAX_FRAME);
                if e.frame.get(12..14) != Some(&[0x86, 0xdd]) {
                    continue;
                }
                let p = Packet6::parse(&e.frame[14..]).expect("emitted IPv6 re-parses");
                assert!(verifies(&p), "{mode:?}: bad checksum on {p:?}");
                emitted += 1;
            }
        }
    }
    assert!(
        emitted > 1000,
        "the mangled inputs must reach forwarding: {emitted}"
    );
}
