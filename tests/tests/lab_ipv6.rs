//! Issue 13, must-show 1: for every IPv6 router mode, plain sockets (not the probe) show the
//! configured behavior. Unsolicited inbound to a never-used port is dropped; after the host has
//! sent to a reflector address, inbound from the reflector's other port, its other address and a
//! third host is admitted exactly as the filtering knob says; NPTv6 keeps ports and maps the
//! prefix 1:1 both ways; NAT66 maps per its RFC 4787 knobs; ICMPv6 errors come back translated.
//! Plus: `ipv4-only` gives the LAN no IPv6 at all. Needs root: `#[ignore]`d, run with
//! `--include-ignored`.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};

use natscope_lab::presets;
use natscope_lab::topology::{EngineConfig, Ipv6Mode, RouterKind};
use natscope_lab::Lab;
use natscope_probes::nat::FilteringBehavior;
use natscope_tests::lab::*;
use natscope_tests::natscope_bin;
use rand::Rng;

/// A lab with reflector `stun` (two IPv6 addresses), router `nat` and `h1` behind it, and a third
/// host `peer` on the internet.
fn up(router: RouterKind) -> Lab {
    Lab::builder(&lab_name("v6la"))
        .natscope_bin(natscope_bin())
        .reflector("stun")
        .router("nat", None, router)
        .host("h1", Some("nat"))
        .host("peer", None)
        .up()
        .expect("lab up")
}

fn preset_router(name: &str) -> RouterKind {
    presets::router(name).unwrap_or_else(|| panic!("preset {name}"))
}

/// A node's first IPv6 address.
fn v6(lab: &Lab, node: &str) -> Ipv6Addr {
    lab.node(node).expect("node").addresses6()[0]
}

fn v6_2(lab: &Lab, node: &str) -> Ipv6Addr {
    lab.node(node).expect("node").addresses6()[1]
}

fn sa(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

fn port() -> u16 {
    rand::thread_rng().gen_range(40_000..50_000)
}

/// What the sockets saw through one router.
#[derive(Debug)]
struct Seen {
    inside: SocketAddr,
    /// Where the reflector saw `inside`'s datagram come from.
    outside: SocketAddr,
}

/// The common part: `h1` socket on its first address sends to `stun` A1:p; returns the
/// observation, the h1 socket and the three reflector-side sockets (A1:p, A1:p+1, A2:p).
fn exchange(lab: &Lab) -> (Seen, UdpSocket, [UdpSocket; 3]) {
    let p = port();
    let (a1, a2) = (v6(lab, "stun"), v6_2(lab, "stun"));
    let r = [
        udp(lab, "stun", sa(a1, p)),
        udp(lab, "stun", sa(a1, p + 1)),
        udp(lab, "stun", sa(a2, p)),
    ];
    let inside = sa(v6(lab, "h1"), port());
    let h = udp(lab, "h1", inside);
    let outside = observed_source(&h, &r[0]);
    (Seen { inside, outside }, h, r)
}

/// Unsolicited traffic from `peer` to a port `h1` never used, at the address the outside sees
/// for `h1`, is dropped; and the lab's own positive control (the same path works once solicited)
/// is the caller's.
fn unsolicited_is_dropped(lab: &Lab, outside_ip: IpAddr) {
    let peer = udp(lab, "peer", sa(v6(lab, "peer"), port()));
    let never = port();
    let probe = udp(lab, "h1", sa(v6(lab, "h1"), never));
    let to = SocketAddr::new(outside_ip, never);
    assert!(
        !reaches(&peer, to, &probe, false),
        "unsolicited inbound to {to} must be dropped"
    );
}

/// Inbound admission after `h1` sent to R1 only: (R1's other port, R1's other address, a third
/// host) as the filtering knob says.
fn admitted(lab: &Lab, seen: &Seen, h: &UdpSocket, r: &[UdpSocket; 3]) -> [bool; 4] {
    let peer = udp(lab, "peer", sa(v6(lab, "peer"), port()));
    [
        reaches(&r[0], seen.outside, h, true),
        reaches(&r[1], seen.outside, h, false),
        reaches(&r[2], seen.outside, h, false),
        reaches(&peer, seen.outside, h, false),
    ]
}

/// An ICMPv6 port unreachable from the reflector about `h1`'s datagram reaches `h1`'s socket:
/// the kernel only matches it to the socket if the quoted packet was translated back.
fn icmp_error_comes_back(lab: &Lab) {
    let closed = sa(v6(lab, "stun"), port());
    let inside = sa(v6(lab, "h1"), port());
    let refused = lab
        .node("h1")
        .expect("h1")
        .run(move || -> std::io::Result<bool> {
            let s = UdpSocket::bind(inside)?;
            s.connect(closed)?;
            s.set_read_timeout(Some(ARRIVAL))?;
            let mut buf = [0u8; 16];
            for _ in 0..3 {
                s.send(b"anyone?")?;
                match s.recv(&mut buf) {
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(true),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    _ => {}
                }
            }
            Ok(false)
        })
        .expect("ns")
        .expect("socket");
    assert!(
        refused,
        "the ICMPv6 port unreachable did not reach h1's socket"
    );
}

fn firewall(filtering: FilteringBehavior, want: [bool; 4]) {
    let mut cfg = match preset_router("dual-stack") {
        RouterKind::Engine(c) => c,
        RouterKind::Linux => unreachable!(),
    };
    cfg.ipv6_filtering = filtering;
    let lab = up(RouterKind::Engine(cfg));
    let (seen, h, r) = exchange(&lab);
    assert_eq!(seen.outside, seen.inside, "a firewall does not translate");
    unsolicited_is_dropped(&lab, seen.outside.ip());
    assert_eq!(admitted(&lab, &seen, &h, &r), want, "{filtering:?}");
    icmp_error_comes_back(&lab);
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn ipv6_firewall_endpoint_independent() {
    require_root();
    firewall(FilteringBehavior::EndpointIndependent, [true; 4]);
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn ipv6_firewall_address_dependent() {
    require_root();
    firewall(
        FilteringBehavior::AddressDependent,
        [true, true, false, false],
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn ipv6_firewall_address_and_port_dependent() {
    require_root();
    firewall(
        FilteringBehavior::AddressAndPortDependent,
        [true, false, false, false],
    );
}

/// The `dual-stack-strict` preset is the APDF firewall.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn dual_stack_strict_preset_filters_apdf() {
    require_root();
    let lab = up(preset_router("dual-stack-strict"));
    let (seen, h, r) = exchange(&lab);
    assert_eq!(admitted(&lab, &seen, &h, &r), [true, false, false, false]);
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn nptv6_keeps_ports_and_maps_the_prefix_both_ways() {
    require_root();
    let lab = up(preset_router("nptv6"));
    let nat = lab.node("nat").expect("nat").plan().clone();
    let routed = nat.routed6.expect("a routed prefix");
    let (seen, h, r) = exchange(&lab);
    let (IpAddr::V6(inside), IpAddr::V6(outside)) = (seen.inside.ip(), seen.outside.ip()) else {
        panic!("ipv6");
    };
    assert!(
        inside.segments()[0] == 0xfd00,
        "h1 is on unique local space: {inside}"
    );
    assert!(routed.contains(outside), "{outside} outside {routed}");
    assert_eq!(seen.outside.port(), seen.inside.port(), "NPTv6 keeps ports");
    assert_eq!(
        inside.segments()[4..],
        outside.segments()[4..],
        "1:1: the interface identifier is kept"
    );
    // A second inside address maps to a different outside address (1:1, not many:1).
    let other = sa(v6_2(&lab, "h1"), port());
    let h2 = udp(&lab, "h1", other);
    let seen2 = observed_source(&h2, &r[0]);
    assert_ne!(seen2.ip(), seen.outside.ip());
    assert_eq!(seen2.port(), other.port());
    // Both ways: the reply to the outside address reaches the inside socket.
    unsolicited_is_dropped(&lab, seen.outside.ip());
    assert_eq!(admitted(&lab, &seen, &h, &r), [true; 4], "EIF behind NPTv6");
    icmp_error_comes_back(&lab);
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn nat66_maps_per_its_knobs() {
    require_root();
    // The preset: symmetric on both families.
    let lab = up(preset_router("nat66"));
    let wan = v6(&lab, "nat");
    let (seen, h, r) = exchange(&lab);
    assert_eq!(
        seen.outside.ip(),
        IpAddr::V6(wan),
        "translated to the router's address"
    );
    // APDM: the other reflector address sees another mapping.
    let second = observed_source(&h, &r[2]);
    assert_eq!(second.ip(), IpAddr::V6(wan));
    assert_ne!(
        second.port(),
        seen.outside.port(),
        "address-and-port-dependent mapping"
    );
    unsolicited_is_dropped(&lab, seen.outside.ip());
    let got = admitted(&lab, &seen, &h, &r);
    assert_eq!(got, [true, false, false, false], "APDF");
    icmp_error_comes_back(&lab);
    lab.down();

    // The knobs, not the preset: EIM + EIF NAT66 keeps one mapping and admits anyone.
    let mut cfg = EngineConfig::new(natscope_probes::nat::NatBehavior::new(
        natscope_probes::nat::MappingBehavior::EndpointIndependent,
        FilteringBehavior::EndpointIndependent,
    ));
    cfg.ipv6 = Ipv6Mode::Nat66;
    let lab = up(RouterKind::Engine(cfg));
    let (seen, h, r) = exchange(&lab);
    assert_eq!(seen.outside.port(), seen.inside.port(), "port preserved");
    assert_eq!(
        observed_source(&h, &r[2]),
        seen.outside,
        "endpoint-independent"
    );
    assert_eq!(admitted(&lab, &seen, &h, &r), [true; 4]);
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn ipv4_only_lan_has_no_ipv6() {
    require_root();
    let lab = up(preset_router("ipv4-only"));
    assert!(lab.node("h1").expect("h1").plan().uplink6.is_empty());
    let to = sa(v6(&lab, "stun"), port());
    let sent = lab
        .node("h1")
        .expect("h1")
        .run(move || UdpSocket::bind("[::]:0").and_then(|s| s.send_to(b"x", to)))
        .expect("ns");
    assert!(sent.is_err(), "no IPv6 route on an ipv4-only lan: {sent:?}");
    lab.down();
}

/// The kernel router (`linux`) routes IPv6 through an nftables conntrack firewall in its own
/// namespace: replies only (address-and-port-dependent), ICMPv6 errors about its flows included.
#[test]
#[ignore = "needs root, network namespaces and nft; run with --include-ignored (scripts/test does)"]
fn linux_router_is_an_ipv6_conntrack_firewall() {
    require_root();
    natscope_tests::require_tool("nft", "nftables");
    let lab = up(RouterKind::Linux);
    let (seen, h, r) = exchange(&lab);
    assert_eq!(seen.outside, seen.inside, "routed, not translated");
    unsolicited_is_dropped(&lab, seen.outside.ip());
    assert_eq!(admitted(&lab, &seen, &h, &r), [true, false, false, false]);
    icmp_error_comes_back(&lab);
    lab.down();
}

/// `cgnat`: the home router's prefix is routed through the carrier (both firewall-mode for
/// IPv6), so `h1`'s global address works end to end, untranslated, through both filters.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn ipv6_passes_two_nested_firewalls_untranslated() {
    require_root();
    let plan = presets::preset("cgnat")
        .expect("preset")
        .plan()
        .expect("plan");
    let lab = Lab::up(&lab_name("v6la"), plan, options()).expect("lab up");
    let p = port();
    let r1 = udp(&lab, "stun", sa(v6(&lab, "stun"), p));
    let inside = sa(v6(&lab, "h1"), port());
    let h = udp(&lab, "h1", inside);
    assert_eq!(observed_source(&h, &r1), inside, "routed, not translated");
    assert!(reaches(&r1, inside, &h, true), "the reply comes back");
    let never = udp(&lab, "h1", sa(v6(&lab, "h1"), port()));
    let never_addr = never.local_addr().expect("addr");
    assert!(
        !reaches(&r1, never_addr, &never, false),
        "unsolicited is dropped"
    );
    lab.down();
}
