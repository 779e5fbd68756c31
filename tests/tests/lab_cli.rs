//! Issue 4, must-show 3 and 5, through the real `natscope` binary: `lab exec` runs any program
//! inside a node (Debian's `stun` client against coturn on the reflector node sees the configured
//! NAT), the lab lifecycle commands, and bad input — a broken TOML file, overlapping subnets,
//! unknown nodes, no privileges — each rejected with one clear line before anything is created.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use natscope_lab::control::NatTableDocument;
use natscope_lab::topology::{Role, RouterKind};
use natscope_lab::{registry, Lab, StatusDocument, STATUS_SCHEMA};
use natscope_probes::nat::{FilteringBehavior, Protocol};
use natscope_probes::probe::{Classic, ProbeReport};
use natscope_tests::lab::*;
use natscope_tests::{natscope_bin, require_tool, schema, ChildProcess, TempDir};
use serde_json::Value;

/// coturn (RFC 5780 mode) on the reflector node's two addresses, on ports of its own.
fn coturn_in(lab: &Lab, dir: &TempDir) -> ChildProcess {
    let (a1, a2) = reflector_ips(lab);
    let d = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        lab.node("stun").unwrap().namespace(),
        "turnserver",
    ])
    .args(["-n", "--stun-only", "--no-auth"])
    .args(["-L", &a1.to_string(), "-L", &a2.to_string()])
    .args(["--listening-port", "5478", "--alt-listening-port", "5479"])
    .args(["--no-cli", "--no-tls", "--no-dtls", "--no-tcp"])
    .args(["--userdb", &d("turndb"), "--pidfile", &d("turnserver.pid")])
    .args(["--log-file", &d("turnserver.log"), "--simple-log"]);
    let child = ChildProcess::spawn(cmd).expect("start coturn");
    // Ready once it answers a Binding request from inside the lab.
    let probe = udp(lab, "h1", ([0, 0, 0, 0], 0).into());
    let mut req = [0u8; 20];
    req[1] = 1;
    req[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    req[8] = 0x42;
    for _ in 0..50 {
        probe.send_to(&req, (a1, 5478)).unwrap();
        if recv_within(&probe, Duration::from_millis(100)).is_some() {
            return child;
        }
    }
    panic!("coturn did not answer in the lab:\n{}", child.diagnostics());
}

/// Debian's `stun` client, run by `lab exec` from h1, classifies the preset's NAT.
fn stun_client_sees(preset: &str, want: &str, want_code: i32) {
    require_root();
    require_tool("stun", "stun-client");
    require_tool("turnserver", "coturn");
    let lab = up_preset(preset);
    let dir = TempDir::new("coturn-lab");
    let mut coturn = coturn_in(&lab, &dir);
    let out = natscope(&[
        "lab",
        "exec",
        "--lab",
        lab.name(),
        "h1",
        "--",
        "stun",
        "198.51.100.1:5478",
        "-p",
        "45000",
    ]);
    coturn.kill();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(want),
        "{preset}: expected `{want}`\n{}",
        text(&out)
    );
    // The client's exit status (its NAT-type code) passes through `lab exec` untouched.
    assert_eq!(out.status.code(), Some(want_code), "{}", text(&out));
    lab.down();
}

#[test]
#[ignore = "needs root, network namespaces, Debian's stun client (stun-client) and coturn; run with --include-ignored (scripts/test does)"]
fn lab_exec_stun_client_sees_a_port_restricted_cone() {
    stun_client_sees(
        "port-restricted-cone",
        "Primary: Independent Mapping, Port Dependent Filter, preserves ports, no hairpin",
        0x17,
    );
}

#[test]
#[ignore = "needs root, network namespaces, Debian's stun client (stun-client) and coturn; run with --include-ignored (scripts/test does)"]
fn lab_exec_stun_client_sees_a_full_cone_that_hairpins() {
    stun_client_sees(
        "full-cone",
        "Primary: Independent Mapping, Independent Filter, preserves ports, will hairpin",
        0x03,
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn lab_exec_passes_stdio_and_exit_status_through() {
    require_root();
    let lab = up_preset("open");
    let out = natscope(&[
        "lab",
        "exec",
        "--lab",
        lab.name(),
        "h1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // It runs in the node's namespace: the node's own address is there.
    let out = natscope(&[
        "lab",
        "exec",
        "--lab",
        lab.name(),
        "h1",
        "--",
        "ip",
        "-o",
        "-4",
        "addr",
    ]);
    let h1 = lab.node("h1").unwrap().address().unwrap().to_string();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&h1),
        "{}",
        text(&out)
    );
    let out = natscope(&["lab", "exec", "--lab", lab.name(), "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no node `nope`"));
    lab.down();
}

/// Takes a lab started through the CLI down when dropped, so a failing assertion leaves nothing.
struct DownOnDrop(String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if registry::read(&self.0).is_some() {
            let _ = natscope(&["lab", "down", &self.0]);
        }
    }
}

/// The field names docs/lab.md documents for `lab status --json`, checked by key on purpose:
/// the typed reads below would not notice a field renamed on both sides of serde. Keys are
/// printed in alphabetical order, as `natscope.lab/v1` always has.
fn documented_fields_of_lab_status(stdout: &[u8]) {
    let doc = schema::assert_valid_text(&String::from_utf8_lossy(stdout));
    assert_eq!(
        String::from_utf8_lossy(stdout).trim_end(),
        serde_json::to_string_pretty(&doc).unwrap(),
        "keys in alphabetical order"
    );
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&doc), ["labs", "natscope_version", "schema"]);
    assert_eq!(doc["schema"], "natscope.lab/v1");
    let lab = &doc["labs"][0];
    assert_eq!(
        keys(lab),
        ["name", "nodes", "owner_pid", "preset", "running"]
    );
    for node in lab["nodes"].as_array().expect("nodes") {
        assert_eq!(
            keys(node),
            [
                "addresses",
                "mappings",
                "name",
                "namespace",
                "role",
                "router"
            ]
        );
    }
    let nat = &lab["nodes"][2];
    assert_eq!(nat["name"], "nat");
    assert_eq!(nat["role"], "nat");
    assert_eq!(nat["router"]["kind"], "engine");
    assert_eq!(nat["router"]["behavior"]["mapping"], "endpoint-independent");
    assert!(nat["mappings"].is_u64());
    assert!(
        lab["nodes"][3]["mappings"].is_null(),
        "a host has no mappings"
    );
}

/// The field names of `lab nat-table --json` (docs/lab.md), by key on purpose.
fn documented_fields_of_nat_table(doc: &Value) {
    assert_eq!(doc["schema"], "natscope.nat-table/v1");
    assert!(doc["natscope_version"].is_string());
    let row = &doc["mappings"][0];
    let mut keys: Vec<&str> = row
        .as_object()
        .expect("a mapping")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["admits", "expires_in_ms", "external", "internal", "proto"]
    );
    assert!(row["proto"].is_string() && row["expires_in_ms"].is_u64());
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn lab_up_status_nat_table_down() {
    require_root();
    let name = lab_name("cli");
    let _down = DownOnDrop(name.clone());
    let out = natscope(&[
        "lab",
        "up",
        "port-restricted-cone",
        "--name",
        &name,
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    schema::assert_valid_text(&String::from_utf8_lossy(&out.stdout));
    let doc: StatusDocument = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc.schema, STATUS_SCHEMA);

    // Traffic from h1 creates a mapping the supervisor's engine reports.
    let out = natscope(&[
        "lab",
        "exec",
        "--lab",
        &name,
        "h1",
        "--",
        &natscope_bin().to_string_lossy(),
        "probe",
        "198.51.100.1:3478",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    schema::assert_valid_text(&String::from_utf8_lossy(&out.stdout));
    let probe: ProbeReport = serde_json::from_slice(&out.stdout).expect("probe json");
    assert_eq!(probe.classic, Classic::PortRestrictedCone);

    // A second `lab up` under the same name is refused in one line and leaves the first alone.
    let out = natscope(&["lab", "up", "open", "--name", &name]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("already running"), "{err}");

    let out = natscope(&["lab", "status", &name, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    documented_fields_of_lab_status(&out.stdout);
    let doc: StatusDocument = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc.schema, STATUS_SCHEMA);
    let lab = &doc.labs[0];
    assert_eq!(lab.name, name);
    assert_eq!(lab.preset.as_deref(), Some("port-restricted-cone"));
    assert!(lab.running);
    let roles: Vec<(&str, Role)> = lab
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("internet", Role::Internet),
            ("stun", Role::Reflector),
            ("nat", Role::Nat),
            ("h1", Role::Host),
            ("h2", Role::Host)
        ]
    );
    let nat = lab.nodes.iter().find(|n| n.name == "nat").unwrap();
    assert_eq!(
        nat.addresses[0], "203.0.113.1/24",
        "primary (external) address first"
    );
    assert!(nat.mappings.unwrap() >= 1);
    let Some(RouterKind::Engine(engine)) = &nat.router else {
        panic!("nat runs the userspace engine: {:?}", nat.router);
    };
    assert_eq!(
        engine.behavior.filtering,
        FilteringBehavior::AddressAndPortDependent
    );

    let out = natscope(&["lab", "nat-table", "--lab", &name, "nat", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    documented_fields_of_nat_table(&schema::assert_valid_text(&String::from_utf8_lossy(
        &out.stdout,
    )));
    let t: NatTableDocument = serde_json::from_slice(&out.stdout).expect("json");
    assert!(t.mappings.iter().any(|r| r.proto == Protocol::Udp
        && r.internal.ip() == Ipv4Addr::new(10, 1, 0, 2)
        && r.external.ip() == Ipv4Addr::new(203, 0, 113, 1)));
    let out = natscope(&["lab", "nat-table", "--lab", &name, "nat"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mappings on nat"),
        "{}",
        text(&out)
    );

    let out = natscope(&["lab", "down", &name]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(registry::namespaces_of(&name).is_empty());
    let out = natscope(&["lab", "status", &name]);
    assert_eq!(out.status.code(), Some(2));
}

fn rejected_before_anything_exists(file: &Path, name: &str, want: &[&str]) {
    let out = natscope(&["lab", "up", &file.to_string_lossy(), "--name", name]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for w in want {
        assert!(err.contains(w), "`{w}` missing from: {err}");
    }
    assert!(
        registry::namespaces_of(name).is_empty(),
        "nothing was created"
    );
    assert!(registry::read(name).is_none());
    assert!(
        !registry::log_path(name).exists() && !registry::control_path(name).exists(),
        "no supervisor log or socket left behind"
    );
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn bad_topology_files_are_rejected_with_file_line_and_problem() {
    require_root();
    let dir = TempDir::new("lab-toml");
    let write = |n: &str, body: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, body).unwrap();
        p
    };
    let name = lab_name("bad");
    let f = write("typo.toml", "[[reflector]]\nname = \"stun\"\n\n[[nat]]\nname = \"home\"\nfilterin = \"address-dependent\"\n");
    rejected_before_anything_exists(&f, &name, &["typo.toml:6:", "unknown field `filterin`"]);
    let f = write("syntax.toml", "[[nat]]\nname = \"home\nmapping = 3\n");
    rejected_before_anything_exists(&f, &name, &["syntax.toml:2:"]);
    let f = write(
        "overlap.toml",
        "[[nat]]\nname = \"a\"\nlan = \"10.1.0.0/16\"\n\n[[nat]]\nname = \"b\"\nlan = \"10.1.2.0/24\"\n",
    );
    rejected_before_anything_exists(&f, &name, &["overlap.toml", "overlaps"]);
    let f = write(
        "parent.toml",
        "[[nat]]\nname = \"a\"\n\n[[host]]\nname = \"h\"\nparent = \"nowhere\"\n",
    );
    rejected_before_anything_exists(&f, &name, &["parent.toml:6:", "`nowhere`"]);
    let open = Path::new("open");
    rejected_before_anything_exists(open, "toolongname", &["`toolongname`", "1-10 characters"]);
    rejected_before_anything_exists(open, "Caps", &["`Caps`", "is invalid"]);
    let out = natscope(&["lab", "up", "no-such-preset", "--name", &name]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset `no-such-preset`"));
    let out = natscope(&[
        "lab",
        "up",
        &dir.path().join("missing.toml").to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.toml"),
        "{}",
        text(&out)
    );
}

#[test]
#[ignore = "needs root, network namespaces and setpriv (util-linux); run with --include-ignored (scripts/test does)"]
fn without_cap_net_admin_lab_up_says_so_in_one_line() {
    require_root();
    require_tool("setpriv", "util-linux");
    let name = lab_name("nocap");
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-net_admin,-sys_admin", "--"])
        .arg(natscope_bin())
        .args(["lab", "up", "open", "--name", &name])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("natscope: error: ") && err.contains("needs root"),
        "{err}"
    );
    assert!(registry::namespaces_of(&name).is_empty());
}
