//! Issue 4, must-show 1 and 2: every preset, measured with plain sockets (not the NAT probe),
//! shows its configured RFC 4787 behavior — mapping as seen from the reflector's addresses and
//! ports, which inbound senders get through, port allocation, hairpinning — and carries TCP and
//! ICMP errors; plus mapping expiry, nested NAT and TCP simultaneous open. Needs root: the tests
//! are `#[ignore]`d and run with `--include-ignored` (scripts/test does), failing without root.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use natscope_lab::presets::{self, Expected};
use natscope_lab::topology::{EngineConfig, RouterKind, UnsolicitedSyn};
use natscope_lab::Lab;
use natscope_probes::nat::{FilteringBehavior, MappingBehavior, NatBehavior};
use natscope_probes::probe::AllocationPattern;
use natscope_tests::lab::*;
use rand::Rng;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn random_port() -> u16 {
    rand::thread_rng().gen_range(40_000..50_000)
}

/// What plain sockets observed in one lab.
#[derive(Debug, PartialEq)]
struct Observed {
    mapping: Option<MappingBehavior>,
    filtering: Option<FilteringBehavior>,
    port_preservation: bool,
    allocation: AllocationPattern,
    hairpinning: bool,
}

/// Measures the path from `h1` (and `h2` for hairpinning) to the reflector node, with observer
/// sockets R1 = A1:p, R2 = A1:p+1, R3 = A2:p bound on the reflector's two addresses.
fn measure(lab: &Lab) -> Observed {
    let (a1, a2) = reflector_ips(lab);
    let p = random_port();
    let r1 = udp(lab, "stun", sa(a1, p));
    let r2 = udp(lab, "stun", sa(a1, p + 1));
    let r3 = udp(lab, "stun", sa(a2, p));
    let h1_ip = lab.node("h1").unwrap().address().unwrap();

    // UDP at all? (blocked: nothing arrives; positive controls elsewhere prove the lab is up)
    let s = udp(lab, "h1", sa(Ipv4Addr::UNSPECIFIED, random_port()));
    if !reaches(&s, r1.local_addr().unwrap(), &r1, true) {
        return Observed {
            mapping: None,
            filtering: None,
            port_preservation: false,
            allocation: AllocationPattern::Unknown,
            hairpinning: false,
        };
    }

    // Mapping (RFC 4787 §4.1): one socket to R1, R2 (same IP, other port), R3 (other IP).
    let e1 = observed_source(&s, &r1);
    let e2 = observed_source(&s, &r2);
    let e3 = observed_source(&s, &r3);
    let translated = e1.ip() != IpAddr::V4(h1_ip);
    let mapping = translated.then(|| {
        if e1 == e2 && e1 == e3 {
            MappingBehavior::EndpointIndependent
        } else if e1 == e2 {
            MappingBehavior::AddressDependent
        } else {
            MappingBehavior::AddressAndPortDependent
        }
    });

    // Filtering (RFC 4787 §5) on a fresh socket that has sent only to R1.
    let f = udp(lab, "h1", sa(Ipv4Addr::UNSPECIFIED, random_port()));
    let ef = observed_source(&f, &r1);
    let from_r1 = reaches(&r1, ef, &f, true);
    assert!(from_r1, "positive control: R1 answers through the filter");
    let from_r2 = reaches(&r2, ef, &f, false);
    let from_r3 = reaches(&r3, ef, &f, false);
    let filtering = Some(match (from_r2, from_r3) {
        (true, true) => FilteringBehavior::EndpointIndependent,
        (true, false) => FilteringBehavior::AddressDependent,
        (false, false) => FilteringBehavior::AddressAndPortDependent,
        (false, true) => panic!("other IP admitted but other port refused: not an RFC 4787 filter"),
    });

    // Port allocation (RFC 4787 §4.2): four fresh sockets on consecutive local ports.
    let base = random_port();
    let samples: Vec<(u16, u16)> = (0..4)
        .map(|i| {
            let local = base + i * 2;
            let so = udp(lab, "h1", sa(Ipv4Addr::UNSPECIFIED, local));
            (local, observed_source(&so, &r1).port())
        })
        .collect();
    let port_preservation = samples.iter().all(|(l, e)| l == e);
    let deltas: Vec<i32> = samples
        .windows(2)
        .map(|w| i32::from(w[1].1) - i32::from(w[0].1))
        .collect();
    let allocation = if port_preservation {
        AllocationPattern::Preserving
    } else if deltas.iter().all(|d| *d == deltas[0] && *d != 0) {
        AllocationPattern::Sequential
    } else {
        AllocationPattern::Random
    };

    // Hairpinning (REQ-9): h2 sends to h1's mapping e1; h1 must see h2's *external* address.
    let hairpinning = translated && {
        let t = udp(lab, "h2", sa(Ipv4Addr::UNSPECIFIED, random_port()));
        let token: u64 = rand::thread_rng().gen();
        t.send_to(&token.to_be_bytes(), e1).unwrap();
        let mut got = None;
        while let Some((m, from)) = recv_within(&s, SILENCE) {
            if m == token.to_be_bytes() {
                got = Some(from);
                break;
            }
        }
        if let Some(from) = got {
            assert_eq!(
                from.ip(),
                e1.ip(),
                "a hairpinned packet carries the sender's external address (REQ-9)"
            );
        }
        got.is_some()
    };

    Observed {
        mapping,
        filtering,
        port_preservation,
        allocation,
        hairpinning,
    }
}

fn expected_observation(e: &Expected) -> Observed {
    Observed {
        mapping: e.mapping,
        filtering: e.filtering,
        port_preservation: e.port_preservation,
        allocation: e.allocation,
        hairpinning: e.hairpinning,
    }
}

/// TCP out to an echo server on the reflector node.
fn tcp_round_trip(lab: &Lab) {
    let (a1, _) = reflector_ips(lab);
    let to = sa(a1, random_port());
    let server = tcp_echo(lab, "stun", to, 1);
    let mut c = tcp_connect(lab, "h1", to).expect("tcp connect through the nat");
    c.set_read_timeout(Some(ARRIVAL)).unwrap();
    let msg = vec![0x5a_u8; 20_000];
    c.write_all(&msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).expect("echo");
    assert_eq!(back, msg);
    drop(c);
    server.join().unwrap();
}

/// A UDP datagram to a closed port comes back as ICMP port unreachable, translated to the
/// inside socket (a connected UDP socket then reports ECONNREFUSED).
fn icmp_unreachable_comes_back(lab: &Lab) {
    let (a1, _) = reflector_ips(lab);
    let s = udp(lab, "h1", sa(Ipv4Addr::UNSPECIFIED, random_port()));
    s.connect(sa(a1, 9)).unwrap();
    let mut refused = false;
    for _ in 0..3 {
        let _ = s.send(b"anyone?");
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        if let Err(e) = s.recv(&mut buf) {
            if e.kind() == ErrorKind::ConnectionRefused {
                refused = true;
                break;
            }
        }
    }
    assert!(
        refused,
        "ICMP port unreachable was not delivered to the inside socket"
    );
}

fn check_preset(preset: &str) {
    require_root();
    let lab = up_preset(preset);
    let want = expected_observation(&presets::expected(preset).expect("expected"));
    let got = measure(&lab);
    assert_eq!(got, want, "preset {preset}: observed vs configured");
    tcp_round_trip(&lab);
    if preset != "blocked" {
        icmp_unreachable_comes_back(&lab);
    }
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn open() {
    check_preset("open");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn full_cone() {
    check_preset("full-cone");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn restricted_cone() {
    check_preset("restricted-cone");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn port_restricted_cone() {
    check_preset("port-restricted-cone");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn symmetric() {
    check_preset("symmetric");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn symmetric_sequential() {
    check_preset("symmetric-sequential");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn address_dependent() {
    check_preset("address-dependent");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn firewall() {
    check_preset("firewall");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn blocked() {
    check_preset("blocked");
}
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn linux_masquerade() {
    check_preset("linux");
}

/// Nested NAT: the reflector sees the carrier's address; each NAT's table holds its own hop.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn cgnat_nests_two_nats() {
    require_root();
    check_preset("cgnat");
    let lab = up_preset("cgnat");
    let (a1, _) = reflector_ips(&lab);
    let r = udp(&lab, "stun", sa(a1, random_port()));
    let local = random_port();
    let s = udp(&lab, "h1", sa(Ipv4Addr::UNSPECIFIED, local));
    let seen = observed_source(&s, &r);
    let carrier = lab.node("carrier").unwrap().address().unwrap();
    let home = lab.node("nat").unwrap().address().unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(carrier));
    assert!(
        natscope_lab::topology::CGNAT_NET.contains(home),
        "home nat's WAN is in 100.64/10"
    );
    let home_rows = lab.nat_table("nat").unwrap();
    let carrier_rows = lab.nat_table("carrier").unwrap();
    assert!(home_rows
        .iter()
        .any(|m| m.internal.port() == local && m.external.ip() == IpAddr::V4(home)));
    assert!(carrier_rows
        .iter()
        .any(|m| m.internal.ip() == IpAddr::V4(home) && m.external == seen));
    lab.down();
}

/// REQ-5/REQ-6: a mapping dies after its timeout unless outbound traffic refreshes it.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn mapping_expires_after_its_timeout_unless_refreshed() {
    require_root();
    let mut cfg = EngineConfig::new(NatBehavior::new(
        MappingBehavior::EndpointIndependent,
        FilteringBehavior::EndpointIndependent,
    ));
    cfg.behavior.udp_timeout = Duration::from_millis(800);
    let lab = up_engine_lab("expiry", cfg);
    let (a1, _) = reflector_ips(&lab);
    let r = udp(&lab, "stun", sa(a1, random_port()));
    let idle = udp(&lab, "h1", sa(Ipv4Addr::UNSPECIFIED, random_port()));
    let kept = udp(&lab, "h1", sa(Ipv4Addr::UNSPECIFIED, random_port()));
    let e_idle = observed_source(&idle, &r);
    let e_kept = observed_source(&kept, &r);
    assert!(reaches(&r, e_idle, &idle, true), "alive before the timeout");
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(250));
        kept.send_to(b"keepalive", r.local_addr().unwrap()).unwrap();
        while recv_within(&r, Duration::from_millis(20)).is_some() {}
    }
    // 1.5 s later: the idle mapping is gone, the refreshed one lives.
    assert!(
        !reaches(&r, e_idle, &idle, false),
        "idle mapping outlived its 0.8 s timeout"
    );
    assert!(
        reaches(&r, e_kept, &kept, true),
        "outbound keepalives refresh (REQ-6)"
    );
    let rows = lab.nat_table("nat").unwrap();
    assert!(rows.iter().all(|m| m.external != e_idle));
    lab.down();
}

/// RFC 5382: TCP simultaneous open through two endpoint-independent NATs whose filters only
/// admit the peer once the local host has sent its own SYN.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn tcp_simultaneous_open_through_two_eim_nats() {
    require_root();
    let cone = || {
        EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::AddressAndPortDependent,
        ))
    };
    let lab = Lab::builder(&lab_name("simopen"))
        .natscope_bin(natscope_tests::natscope_bin())
        .router("na", None, RouterKind::Engine(cone()))
        .router("nb", None, RouterKind::Engine(cone()))
        .host("a", Some("na"))
        .host("b", Some("nb"))
        .up()
        .expect("lab up");
    let ea = lab.node("na").unwrap().address().unwrap();
    let eb = lab.node("nb").unwrap().address().unwrap();
    let (pa, pb) = (random_port(), random_port() + 1);
    let dial = |node: &'static str, local: u16, peer: SocketAddr| {
        let n = lab.node(node).unwrap();
        n.run(move || -> std::io::Result<std::net::TcpStream> {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&sa(Ipv4Addr::UNSPECIFIED, local).into())?;
            s.connect_timeout(&peer.into(), Duration::from_secs(6))?;
            Ok(s.into())
        })
        .unwrap()
    };
    // Ports are preserved, so each side knows the other's external endpoint in advance.
    let (ra, rb) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| dial("a", pa, sa(eb, pb)));
        let tb = sc.spawn(|| dial("b", pb, sa(ea, pa)));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let mut a = ra.expect("a connects by simultaneous open");
    let mut b = rb.expect("b connects by simultaneous open");
    a.write_all(b"from a").unwrap();
    let mut buf = [0u8; 6];
    b.set_read_timeout(Some(ARRIVAL)).unwrap();
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from a");
    assert_eq!(
        b.peer_addr().unwrap(),
        sa(ea, pa),
        "b talks to a's external endpoint"
    );
    lab.down();
}

/// RFC 5382 REQ-4 knob: an unsolicited inbound SYN is silently dropped, or answered with RST.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn unsolicited_syn_is_dropped_or_reset_as_configured() {
    require_root();
    for policy in [UnsolicitedSyn::Drop, UnsolicitedSyn::Reset] {
        let mut cfg = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::AddressAndPortDependent,
        ));
        cfg.unsolicited_syn = policy;
        let lab = up_engine_lab("syn", cfg);
        let ext = lab.node("nat").unwrap().address().unwrap();
        let target = sa(ext, random_port());
        let r = lab
            .node("stun")
            .unwrap()
            .run(move || std::net::TcpStream::connect_timeout(&target, Duration::from_millis(1500)))
            .unwrap();
        let kind = r.expect_err("nothing listens behind the nat").kind();
        match policy {
            UnsolicitedSyn::Drop => assert_eq!(kind, ErrorKind::TimedOut, "silently dropped"),
            UnsolicitedSyn::Reset => {
                assert_eq!(kind, ErrorKind::ConnectionRefused, "answered with RST")
            }
        }
        assert_eq!(
            lab.nat_stats("nat").unwrap().tcp_resets,
            u64::from(policy == UnsolicitedSyn::Reset)
        );
        lab.down();
    }
}
