//! Issue 11, "around it": programs run inside a lab see a resolver that works there. `lab exec`
//! and [`natscope_lab::LabNode::spawn`] (which every lab program, grid commands included, goes
//! through) give the program the lab's `/etc/hosts` and a `resolv.conf` that names no outside
//! server: lab names resolve to lab addresses, any other name fails at once instead of hanging,
//! and the host's files and mount table are exactly as before.

use std::process::Command;
use std::time::{Duration, Instant};

use natscope_lab::{presets, registry, resolver, Lab};
use natscope_tests::lab::*;
use natscope_tests::require_tool;

/// What must not change on the host: its name-service files, byte for byte, and its mount table
/// (but for namespaces under /run/netns, which parallel labs add and remove meanwhile).
fn host_state() -> Vec<(String, Vec<u8>)> {
    let mut state: Vec<(String, Vec<u8>)> =
        ["/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf"]
            .into_iter()
            .map(|p| (p.to_string(), std::fs::read(p).unwrap_or_default()))
            .collect();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mounts: String = mounts
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| !m.starts_with("/run/netns/"))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!mounts.contains(" /etc/"), "{mounts}");
    state.push(("mountinfo".into(), mounts.into_bytes()));
    state
}

fn pair_lab() -> Lab {
    let plan = presets::pair("full-cone,symmetric")
        .expect("pair")
        .plan()
        .expect("plan");
    Lab::up(&lab_name("nebu"), plan, options()).expect("lab up")
}

fn address_of(lab: &Lab, node: &str) -> String {
    lab.node(node)
        .expect("node")
        .address()
        .expect("address")
        .to_string()
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn lab_exec_resolves_lab_names_and_fails_others_fast() {
    require_root();
    require_tool("getent", "libc-bin");
    let before = host_state();
    let lab = pair_lab();
    let name = lab.name().to_string();
    for (node, wanted) in [("a", "rendezvous"), ("b", "a"), ("rendezvous", "natb")] {
        let out = natscope(&[
            "lab", "exec", "--lab", &name, node, "--", "getent", "hosts", wanted,
        ]);
        assert!(out.status.success(), "{node}: {wanted}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let addr = address_of(&lab, wanted);
        assert_eq!(
            stdout.split_whitespace().collect::<Vec<_>>(),
            [addr.as_str(), wanted],
            "{node}: {wanted}"
        );
    }
    let started = Instant::now();
    let out = natscope(&[
        "lab",
        "exec",
        "--lab",
        &name,
        "a",
        "--",
        "getent",
        "hosts",
        "example.com",
    ]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(2), "not found: {}", text(&out));
    assert!(took < Duration::from_secs(2), "took {took:?}");

    lab.down();
    assert!(
        !registry::etc_path(&name).exists(),
        "the lab's resolver files outlive it"
    );
    assert!(host_state() == before, "the host's files or mounts changed");
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn programs_a_lab_spawns_see_its_names() {
    require_root();
    require_tool("getent", "libc-bin");
    let before = host_state();
    let lab = pair_lab();
    let mut cmd = Command::new("getent");
    cmd.args(["hosts", "b", "nata-lan"])
        .stdout(std::process::Stdio::piped());
    let out = lab
        .node("a")
        .expect("node a")
        .spawn(cmd)
        .and_then(|c| c.wait_with_output())
        .expect("getent in a");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(&address_of(&lab, "b")), "{stdout}");
    let lan = lab
        .node("nata")
        .expect("nata")
        .plan()
        .lan
        .expect("a lan")
        .addr;
    assert!(stdout.contains(&format!("{lan}")), "nata-lan: {stdout}");
    // Each node's files are its lab's: the one written for `a` names this lab.
    let hosts = std::fs::read_to_string(resolver::node_dir(lab.name(), "a").join("hosts"))
        .expect("a's hosts file");
    assert!(hosts.contains(&format!("natscope lab {}, node a", lab.name())));
    lab.down();
    assert!(host_state() == before, "the host's files or mounts changed");
}
