//! Issue 12: a kernel `linux` lab router running the real miniupnpd (Debian
//! `miniupnpd-nftables`), judged by third-party clients: Debian's `upnpc` (miniupnpc) and
//! `natpmpc` behind it get the external address and map a port, a datagram from a public lab
//! host to the mapped external port reaches the host, and deleting the mapping stops it.
//! Needs root, namespaces and the three packages: `#[ignore]`d, run with `--include-ignored`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natscope_lab::topology::{PortMappingService, RouterKind};
use natscope_lab::Lab;
use natscope_tests::lab::*;
use natscope_tests::require_tool;
use rand::Rng;

const ALL: [PortMappingService; 3] = [
    PortMappingService::NatPmp,
    PortMappingService::Pcp,
    PortMappingService::Upnp,
];

/// Runs `args` inside `node`, killed after 20 s; returns success and stdout + stderr.
fn run(lab: &Lab, node: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = lab.node(node).expect("node").spawn(cmd).expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What `lab nat-table` says of the router's mapping at `external`: which protocol asked for it
/// (from miniupnpd's leases), or `None` when there is no such row.
fn requested(lab: &Lab, external: SocketAddr) -> Option<Option<PortMappingService>> {
    let rows = lab.nat_table("gw").expect("a linux router has a nat table");
    rows.iter()
        .find(|r| r.external == external)
        .map(|r| r.requested_by)
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn upnpc_gets_the_external_address_and_maps_a_port_that_admits_inbound_until_deleted() {
    require_tool("upnpc", "miniupnpc");
    let lab = miniupnpd_lab("upnpc", &ALL).up().expect("lab up");
    let (ext, _gw_lan, host) = gw_addresses(&lab);
    assert!(
        natscope_lab::miniupnpd::WAN_NET.contains(ext),
        "miniupnpd's router has a WAN address it accepts: {ext}"
    );
    let (ok, out) = run(&lab, "h", &["upnpc", "-s"]);
    assert!(ok, "upnpc -s failed:\n{out}");
    assert!(
        out.contains(&format!("ExternalIPAddress = {ext}")),
        "upnpc saw another external address than {ext}:\n{out}"
    );

    let iport = rand::thread_rng().gen_range(20_000..30_000u16);
    let eport = iport + 1000;
    let inside = udp(&lab, "h", SocketAddr::from((host, iport)));
    let external = SocketAddr::from((ext, eport));
    assert!(
        !arrives_from_pub(&lab, &inside, external, SILENCE),
        "inbound arrived before any mapping"
    );
    let (ip, i, e) = (host.to_string(), iport.to_string(), eport.to_string());
    let (ok, out) = run(
        &lab,
        "h",
        &["upnpc", "-e", "natscope", "-a", &ip, &i, &e, "UDP", "60"],
    );
    assert!(
        ok && out.contains("is redirected to internal"),
        "upnpc -a:\n{out}"
    );
    assert!(
        arrives_from_pub(&lab, &inside, external, ARRIVAL),
        "a datagram to the mapped {external} did not reach {host}:{iport}"
    );
    assert_eq!(
        requested(&lab, external),
        Some(Some(PortMappingService::Upnp)),
        "{:#?}",
        lab.nat_table("gw")
    );

    let (ok, out) = run(&lab, "h", &["upnpc", "-d", &e, "UDP"]);
    assert!(ok, "upnpc -d:\n{out}");
    // A new flow (a fresh source port): the old one's conntrack entry outlives the rule.
    assert!(
        !arrives_from_pub(&lab, &inside, external, SILENCE),
        "inbound still arrives at {external} after the mapping was deleted"
    );
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn natpmpc_gets_the_external_address_and_maps_a_port_that_admits_inbound_until_deleted() {
    require_tool("natpmpc", "natpmpc");
    let lab = miniupnpd_lab("upnpn", &ALL).up().expect("lab up");
    let (ext, gw_lan, host) = gw_addresses(&lab);
    let gw = gw_lan.to_string();
    let (ok, out) = run(&lab, "h", &["natpmpc", "-g", &gw]);
    assert!(ok, "natpmpc failed:\n{out}");
    assert!(
        out.contains(&format!("Public IP address : {ext}")),
        "natpmpc saw another external address than {ext}:\n{out}"
    );

    let iport = rand::thread_rng().gen_range(20_000..30_000u16);
    let eport = iport + 1000;
    let inside = udp(&lab, "h", SocketAddr::from((host, iport)));
    let external = SocketAddr::from((ext, eport));
    let (i, e) = (iport.to_string(), eport.to_string());
    let (ok, out) = run(
        &lab,
        "h",
        &["natpmpc", "-g", &gw, "-a", &e, &i, "udp", "60"],
    );
    assert!(ok, "natpmpc -a:\n{out}");
    assert!(
        out.contains(&format!(
            "Mapped public port {eport} protocol UDP to local port {iport}"
        )),
        "natpmpc -a:\n{out}"
    );
    assert!(
        arrives_from_pub(&lab, &inside, external, ARRIVAL),
        "a datagram to the mapped {external} did not reach {host}:{iport}"
    );
    // The router's table marks the mapping as NAT-PMP's (miniupnpd's lease).
    assert_eq!(
        requested(&lab, external),
        Some(Some(PortMappingService::NatPmp)),
        "{:#?}",
        lab.nat_table("gw")
    );

    // NAT-PMP deletes with lifetime 0 (RFC 6886 §3.4).
    let (ok, out) = run(&lab, "h", &["natpmpc", "-g", &gw, "-a", &e, &i, "udp", "0"]);
    assert!(ok, "natpmpc delete:\n{out}");
    assert!(
        !arrives_from_pub(&lab, &inside, external, SILENCE),
        "inbound still arrives at {external} after the mapping was deleted"
    );
    // The lease is gone; what is left at that port is the conntrack entry of the last datagram,
    // an ordinary (unrequested) connection now.
    assert_ne!(
        requested(&lab, external),
        Some(Some(PortMappingService::NatPmp)),
        "{:#?}",
        lab.nat_table("gw")
    );
    lab.down();
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn miniupnpd_runs_only_in_the_router_namespace_and_stops_with_the_lab() {
    let lab = miniupnpd_lab("upnps", &[PortMappingService::Upnp])
        .up()
        .expect("lab up");
    // Other tests' labs may run their own miniupnpd at the same time: count by namespace.
    let ns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    let router_ns = lab
        .node("gw")
        .unwrap()
        .run(|| std::fs::read_link("/proc/thread-self/ns/net").ok());
    let router_ns = router_ns.expect("enter gw");
    assert!(router_ns.is_some());
    let root_ns = ns_of(1);
    assert!(
        pids("miniupnpd").into_iter().all(|p| ns_of(p) != root_ns),
        "a miniupnpd runs in the root namespace"
    );
    let ours: Vec<u32> = pids("miniupnpd")
        .into_iter()
        .filter(|p| ns_of(*p) == router_ns)
        .collect();
    assert_eq!(ours.len(), 1, "one miniupnpd in the router: {ours:?}");
    // Its table exists in the router and not in the root namespace.
    let (ok, out) = run(
        &lab,
        "gw",
        &["nft", "list", "table", "inet", "natscope_upnp"],
    );
    assert!(ok, "no miniupnpd table in the router:\n{out}");
    let root = Command::new("nft")
        .args(["list", "table", "inet", "natscope_upnp"])
        .output()
        .expect("nft");
    assert!(
        !root.status.success(),
        "miniupnpd's table is in the root namespace"
    );
    lab.down();
    let left: Vec<u32> = pids("miniupnpd")
        .into_iter()
        .filter(|p| ours.contains(p))
        .collect();
    assert!(left.is_empty(), "miniupnpd outlived its lab: {left:?}");
}

#[test]
fn a_nested_or_half_pmp_miniupnpd_router_is_refused_before_anything_starts() {
    let nested = Lab::builder("upnpbad")
        .router("carrier", None, RouterKind::Linux)
        .router("gw", Some("carrier"), RouterKind::Linux)
        .port_mapping(&ALL)
        .host("h", Some("gw"));
    let err = nested.up().expect_err("nested miniupnpd router");
    assert!(
        err.to_string().contains("must sit on the internet"),
        "{err}"
    );
    let half = Lab::builder("upnpbad")
        .router("gw", None, RouterKind::Linux)
        .port_mapping(&[PortMappingService::NatPmp])
        .host("h", Some("gw"));
    let err = half.up().expect_err("NAT-PMP without PCP");
    assert!(err.to_string().contains("together"), "{err}");
}

/// Pids of processes named `name` (from /proc, all namespaces).
fn pids(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}
