//! Issue 13, must-show 4 (the probe's half): `natscope probe` over IPv6 through every IPv6 mode of
//! the lab's userspace router — an RFC 6092 firewall with endpoint-independent and with
//! address-and-port-dependent filtering, NPTv6 (RFC 6296) and NAT66 — against the lab's own
//! reflector, which serves RFC 5780 on its two IPv6 addresses. Each verdict must be the preset's
//! documented behavior (docs/lab.md), judged from the wire, never `unknown` on a lossless lab.
//! Needs root and namespaces: `#[ignore]`d, run with `--include-ignored` (scripts/test does).

use std::time::Duration;

use natscope_lab::{presets, Lab};
use natscope_tests::lab::*;
use natscope_tests::natscope_bin;
use natscope_tests::punch::spawn_in;
use serde_json::Value;

/// The probe's document from `h1` behind preset `name`'s router, over IPv6 only.
fn probe6(name: &str) -> Value {
    require_root();
    let router = presets::router(name).unwrap_or_else(|| panic!("preset {name}"));
    let lab = Lab::builder(&lab_name("pv6l"))
        .natscope_bin(natscope_bin())
        .reflector("stun")
        .router("nat", None, router)
        .host("h1", Some("nat"))
        .up()
        .expect("lab up");
    let (primary, _) = lab.stun_addresses6("stun").expect("an IPv6 reflector");
    let server = primary.to_string();
    let args = ["probe", server.as_str(), "--json", "--no-port-mapping"];
    let mut p = spawn_in(&lab, "h1", &args);
    if p.wait_timeout(Duration::from_secs(60)).is_none() {
        p.kill();
        panic!("the probe did not finish within 60 s\n{}", p.diagnostics());
    }
    serde_json::from_str(&p.stdout()).unwrap_or_else(|e| {
        panic!(
            "{name}: no natscope.probe/v1 document ({e})\n{}",
            p.diagnostics()
        )
    })
}

/// (family, mapping, filtering, translation) of a document.
fn verdicts(doc: &Value) -> (String, String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    (
        s(&doc["family"]),
        s(&doc["mapping"]),
        s(&doc["filtering"]),
        s(&doc["ipv6"]["translation"]),
    )
}

fn check(name: &str, mapping: &str, filtering: &str, translation: &str) {
    let doc = probe6(name);
    assert_eq!(
        verdicts(&doc),
        (
            "ipv6".to_string(),
            mapping.to_string(),
            filtering.to_string(),
            translation.to_string()
        ),
        "{name}: {}",
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn probe_over_ipv6_sees_the_rfc6092_default_firewall() {
    check(
        "dual-stack",
        "endpoint-independent",
        "endpoint-independent",
        "none",
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn probe_over_ipv6_sees_the_strict_firewall() {
    check(
        "dual-stack-strict",
        "endpoint-independent",
        "address-and-port-dependent",
        "none",
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn probe_over_ipv6_sees_nptv6() {
    check(
        "nptv6",
        "endpoint-independent",
        "endpoint-independent",
        "nptv6",
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn probe_over_ipv6_sees_nat66() {
    check(
        "nat66",
        "address-and-port-dependent",
        "address-and-port-dependent",
        "nat66",
    );
}
