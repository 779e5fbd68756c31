//! Issue 12, must-show 1: third-party port-mapping clients against natscope's userspace NAT
//! routers. Debian's `natpmpc` (libnatpmp) and `upnpc` (miniupnpc), run inside a lab host behind a
//! symmetric NAT with address-and-port-dependent filtering, get the router's external address and
//! create a UDP mapping; a datagram from a public lab host to the mapped external port then
//! reaches the host (nothing else would let it in), and once the client deletes the mapping it no
//! longer does. The router's NAT table says which protocol made the mapping.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};

use natscope_lab::topology::EngineConfig;
use natscope_lab::Lab;
use natscope_probes::nat::{FilteringBehavior, MappingBehavior, NatBehavior, PortAllocation};
use natscope_tests::lab::*;
use natscope_tests::require_tool;

/// The host's socket and the external port the tests ask for.
const LOCAL_PORT: u16 = 5555;
const WANT_PORT: u16 = 46000;

/// A symmetric NAT (random ports, APDF) serving `services` (their words: "nat-pmp", "upnp").
fn symmetric_lab(services: &[&str]) -> Lab {
    let mut behavior = NatBehavior::new(
        MappingBehavior::AddressAndPortDependent,
        FilteringBehavior::AddressAndPortDependent,
    );
    behavior.allocation = PortAllocation::Random;
    let mut config = EngineConfig::new(behavior);
    config.port_mapping = services
        .iter()
        .map(|s| s.parse().expect("a service word"))
        .collect();
    up_engine_lab("pmla", config)
}

/// Runs `program args` inside `node` of `lab`.
fn run_in(lab: &Lab, node: &str, program: &str, args: &[&str]) -> Output {
    let (program, args): (String, Vec<String>) =
        (program.into(), args.iter().map(|a| a.to_string()).collect());
    lab.node(node)
        .expect("node")
        .run(move || Command::new(&program).args(&args).output())
        .expect("enter the namespace")
        .expect("run the client")
}

fn say(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The router's external address as the lab planned it.
fn external_ip(lab: &Lab) -> Ipv4Addr {
    lab.node("nat")
        .expect("nat")
        .address()
        .expect("external address")
}

/// What a public lab host (the reflector node, on a port of its own) reaches through `ext`.
fn public_reaches(lab: &Lab, ext: SocketAddr, expect: bool) -> bool {
    let (public, _) = reflector_ips(lab);
    let from = udp(lab, "stun", (public, 0).into());
    let host = udp(lab, "h1", ([0, 0, 0, 0], LOCAL_PORT).into());
    reaches(&from, ext, &host, expect)
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn natpmpc_maps_a_port_through_a_symmetric_nat_and_deletes_it() {
    require_root();
    require_tool("natpmpc", "natpmpc");
    let lab = symmetric_lab(&["nat-pmp"]);
    let ext_ip = external_ip(&lab);
    let ext = SocketAddr::from((ext_ip, WANT_PORT));
    assert!(
        !public_reaches(&lab, ext, false),
        "control: nothing gets in before the mapping"
    );

    // `natpmpc` alone asks for the external address.
    let o = run_in(&lab, "h1", "natpmpc", &[]);
    let out = say(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("Public IP address : {ext_ip}")),
        "{out}"
    );

    let (want, local) = (WANT_PORT.to_string(), LOCAL_PORT.to_string());
    let o = run_in(&lab, "h1", "natpmpc", &["-a", &want, &local, "udp", "120"]);
    let out = say(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            // libnatpmp spells it "liftime".
            "Mapped public port {WANT_PORT} protocol UDP to local port {LOCAL_PORT} liftime 120"
        )),
        "{out}"
    );
    let table = lab.nat_table("nat").expect("nat table");
    assert!(
        table.iter().any(|m| m.external == ext
            && m.requested_by.map(|s| s.to_string()).as_deref() == Some("nat-pmp")
            && m.admits == ["*:*"]),
        "{table:?}"
    );
    assert!(
        public_reaches(&lab, ext, true),
        "the mapping admits a stranger"
    );

    let o = run_in(&lab, "h1", "natpmpc", &["-a", &want, &local, "udp", "0"]);
    assert!(o.status.success(), "{}", say(&o));
    assert!(
        !public_reaches(&lab, ext, false),
        "deleted: nothing gets in"
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn upnpc_discovers_the_router_maps_a_port_and_deletes_it() {
    require_root();
    require_tool("upnpc", "miniupnpc");
    let lab = symmetric_lab(&["upnp"]);
    let ext_ip = external_ip(&lab);
    let ext = SocketAddr::from((ext_ip, WANT_PORT));
    let host_ip = lab.node("h1").expect("h1").address().expect("h1 address");
    assert!(
        !public_reaches(&lab, ext, false),
        "control: nothing gets in before the mapping"
    );

    // The router's kernel holds the LAN address for HTTP but routes nothing: traffic through the
    // router still goes through the engine (translated), and the host gets no ICMP errors from
    // the kernel on a connected socket.
    let (public, _) = reflector_ips(&lab);
    let server = udp(&lab, "stun", (public, 0).into());
    let to = server.local_addr().expect("addr");
    let client = lab
        .node("h1")
        .expect("h1")
        .run(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("ns")
        .expect("socket");
    client.set_read_timeout(Some(ARRIVAL)).expect("timeout");
    for _ in 0..3 {
        client.send(b"out").expect("send");
    }
    let (_, seen) = recv_within(&server, ARRIVAL).expect("reaches the public host");
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(ext_ip),
        "translated by the engine"
    );
    server.send_to(b"back", seen).expect("reply");
    let mut buf = [0u8; 16];
    let n = client.recv(&mut buf).expect("the reply, not an ICMP error");
    assert_eq!(&buf[..n], b"back");

    // SSDP discovery (multicast M-SEARCH), the description, then GetExternalIPAddress. `-i`:
    // miniupnpc calls an IGD "not connected?" when its external address is reserved, and the
    // lab's public segment is a documentation range (203.0.113.0/24); the router itself reports
    // Connected (igd.rs tests), so the client is told to go on.
    let o = run_in(&lab, "h1", "upnpc", &["-i", "-s"]);
    let out = say(&o);
    assert!(out.contains("/rootDesc.xml"), "{out}");
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("ExternalIPAddress = {ext_ip}")),
        "{out}"
    );

    let (want, local, host) = (
        WANT_PORT.to_string(),
        LOCAL_PORT.to_string(),
        host_ip.to_string(),
    );
    let o = run_in(
        &lab,
        "h1",
        "upnpc",
        &["-i", "-a", &host, &local, &want, "UDP", "120"],
    );
    let out = say(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "external {ext_ip}:{WANT_PORT} UDP is redirected to internal {host_ip}:{LOCAL_PORT}"
        )),
        "{out}"
    );
    let table = lab.nat_table("nat").expect("nat table");
    assert!(
        table.iter().any(|m| m.external == ext
            && m.requested_by.map(|s| s.to_string()).as_deref() == Some("upnp")),
        "{table:?}"
    );
    assert!(
        public_reaches(&lab, ext, true),
        "the mapping admits a stranger"
    );

    // The same external port for another internal port is a conflict (718), not a second mapping.
    let o = run_in(
        &lab,
        "h1",
        "upnpc",
        &["-i", "-a", &host, "5556", &want, "UDP", "120"],
    );
    assert!(say(&o).contains("718"), "{}", say(&o));

    let o = run_in(&lab, "h1", "upnpc", &["-i", "-d", &want, "UDP"]);
    let out = say(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        !public_reaches(&lab, ext, false),
        "deleted: nothing gets in"
    );
    let o = run_in(&lab, "h1", "upnpc", &["-i", "-d", &want, "UDP"]);
    assert!(say(&o).contains("714"), "deleting twice: {}", say(&o));
}
