//! Issue 12, must-show 2: `natscope probe --map` against a real port-mapping server. Behind a
//! kernel `linux` router running Debian's miniupnpd (NAT-PMP, PCP and UPnP IGD), the probe must
//! report all three protocols, the external address the reflector sees, and a mapping whose
//! inbound reachability it proved (`inbound_verified: true`) — the reflector answering to the
//! mapped port from a socket that never sent there. Needs root, namespaces and miniupnpd:
//! `#[ignore]`d, run with `--include-ignored` (scripts/test does).

use std::time::Duration;

use natscope_lab::topology::PortMappingService;
use natscope_lab::Lab;
use natscope_probes::probe::ProbeReport;
use natscope_tests::lab::*;
use natscope_tests::punch::spawn_in;

/// `natscope probe SERVER ARGS… --json` from `host`, bounded; its report.
fn probe(lab: &Lab, host: &str, args: &[&str]) -> ProbeReport {
    let (primary, _) = lab.stun_addresses("stun").expect("reflector");
    let server = primary.to_string();
    let mut all = vec!["probe", server.as_str(), "--json"];
    all.extend_from_slice(args);
    let mut p = spawn_in(lab, host, &all);
    if p.wait_timeout(Duration::from_secs(60)).is_none() {
        p.kill();
        panic!("the probe did not finish within 60 s\n{}", p.diagnostics());
    }
    serde_json::from_str(&p.stdout()).unwrap_or_else(|e| {
        panic!(
            "the probe printed no natscope.probe/v1 document ({e})\n{}",
            p.diagnostics()
        )
    })
}

#[test]
#[ignore = "needs root, network namespaces and miniupnpd; run with --include-ignored (scripts/test does)"]
fn probe_map_behind_miniupnpd_sees_all_three_protocols_and_proves_the_mapping_inbound() {
    let all = [
        PortMappingService::NatPmp,
        PortMappingService::Pcp,
        PortMappingService::Upnp,
    ];
    let lab = miniupnpd_lab("ppmu", &all)
        .reflector("stun")
        .up()
        .expect("lab up");
    let r = probe(&lab, "h", &["--map", "--no-hairpin"]);
    let pm = r.port_mapping.as_ref().expect("a port_mapping section");
    let why = format!("{pm:#?}");
    eprintln!("probe took {:.0} ms: {why}", r.duration_ms);
    assert_eq!(pm.upnp, Some(true), "UPnP IGD answers: {why}");
    assert_eq!(pm.nat_pmp, Some(true), "NAT-PMP answers: {why}");
    assert_eq!(pm.pcp, Some(true), "PCP answers: {why}");
    let stun_ip = r.public_address.expect("STUN saw a mapped address").ip();
    assert_eq!(
        pm.external_address,
        Some(stun_ip),
        "the gateway's claimed address is the one STUN sees: {why}"
    );
    let mapped = pm.mapped.as_ref().expect("--map made a mapping");
    assert!(mapped.inbound_verified, "inbound verified: {why}");
    assert_eq!(mapped.external.ip(), stun_ip, "{why}");
    assert_eq!(r.double_nat, Some(false), "{why}");
    assert_eq!(r.cgnat, Some(false), "{why}");
    // miniupnpd 2.3.1 answers NAT-PMP and PCP, so the mapping is PCP's (the best that answered).
    assert_eq!(mapped.protocol, PortMappingService::Pcp, "{why}");
}

#[test]
#[ignore = "needs root, network namespaces and miniupnpd; run with --include-ignored (scripts/test does)"]
fn probe_map_over_upnp_alone_proves_the_mapping_inbound() {
    let lab = miniupnpd_lab("ppmv", &[PortMappingService::Upnp])
        .reflector("stun")
        .up()
        .expect("lab up");
    let r = probe(&lab, "h", &["--map", "--no-hairpin"]);
    let pm = r.port_mapping.as_ref().expect("a port_mapping section");
    let why = format!("{pm:#?}");
    assert_eq!(pm.upnp, Some(true), "{why}");
    assert_eq!(pm.nat_pmp, Some(false), "{why}");
    assert_eq!(pm.pcp, Some(false), "{why}");
    let mapped = pm.mapped.as_ref().expect("--map made a mapping over UPnP");
    assert_eq!(mapped.protocol, PortMappingService::Upnp, "{why}");
    assert!(mapped.inbound_verified, "inbound verified: {why}");
    assert_eq!(
        Some(mapped.external.ip()),
        r.public_address.map(|a| a.ip()),
        "{why}"
    );
}
