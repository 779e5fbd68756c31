//! Issue 11, "around it": `natscope lab up pair:A,B` brings up one `lab grid` cell — a public
//! host `rendezvous`, peer `a` behind preset A, peer `b` behind preset B — so a user can reproduce a
//! cell by hand; `lab status` shows it, and a bad pair is one line with nothing created.

use natscope_lab::topology::Role;
use natscope_lab::{registry, StatusDocument};
use natscope_probes::probe::{Classic, ProbeReport};
use natscope_tests::lab::*;
use natscope_tests::natscope_bin;

/// Takes a lab started through the CLI down when dropped, so a failing assertion leaves nothing.
struct DownOnDrop(String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if registry::read(&self.0).is_some() {
            let _ = natscope(&["lab", "down", &self.0]);
        }
    }
}

/// `natscope probe` run by `lab exec` in `node` against the lab's reflector.
fn classic_seen_from(lab: &str, node: &str) -> Classic {
    let out = natscope(&[
        "lab",
        "exec",
        "--lab",
        lab,
        node,
        "--",
        &natscope_bin().to_string_lossy(),
        "probe",
        "198.51.100.1:3478",
        "--json",
    ]);
    let report: ProbeReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("probe from {node}: {e}\n{}", text(&out)));
    report.classic
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn lab_up_pair_is_one_grid_cell_with_a_rendezvous_host() {
    require_root();
    let name = lab_name("nebu");
    let _down = DownOnDrop(name.clone());
    let out = natscope(&[
        "lab",
        "up",
        "pair:full-cone,port-restricted-cone",
        "--name",
        &name,
    ]);
    assert!(out.status.success(), "{}", text(&out));

    let out = natscope(&["lab", "status", &name]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains(&format!(
            "lab {name} (pair:full-cone,port-restricted-cone), running"
        )),
        "{}",
        text(&out)
    );
    let out = natscope(&["lab", "status", &name, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: StatusDocument = serde_json::from_slice(&out.stdout).expect("json");
    let lab = &doc.labs[0];
    assert_eq!(
        lab.preset.as_deref(),
        Some("pair:full-cone,port-restricted-cone")
    );
    let node = |n: &str| {
        lab.nodes
            .iter()
            .find(|x| x.name == n)
            .unwrap_or_else(|| panic!("no node {n} in {:?}", lab.nodes))
    };
    // A public host: its own, or the cell's reflector when the grid's cell calls that `rendezvous`.
    assert!(matches!(
        node("rendezvous").role,
        Role::Host | Role::Reflector
    ));
    let public = &node("rendezvous").addresses[0];
    assert!(
        public.starts_with("203.0.113.") || public.starts_with("198.51.100."),
        "{public}"
    );
    assert_eq!(node("a").role, Role::Host);
    assert!(node("a").addresses[0].starts_with("10."));
    assert!(node("b").addresses[0].starts_with("10."));
    assert_eq!(node("nata").role, Role::Nat);
    assert_eq!(node("natb").role, Role::Nat);

    // Each peer is behind its own preset's NAT, as `natscope probe` from inside sees it.
    assert_eq!(classic_seen_from(&name, "a"), Classic::FullCone);
    assert_eq!(classic_seen_from(&name, "b"), Classic::PortRestrictedCone);

    let out = natscope(&["lab", "down", &name]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(registry::namespaces_of(&name).is_empty());
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn a_bad_pair_is_one_line_and_creates_nothing() {
    require_root();
    let name = lab_name("nebu");
    let _down = DownOnDrop(name.clone());
    for (source, want) in [
        (
            "pair:full-cone,nope",
            "unknown preset `nope` in pair:full-cone,nope; presets: open,",
        ),
        ("pair:full-cone", "needs two presets separated by a comma"),
        ("pair:", "needs two presets separated by a comma"),
        ("pair:a,b,c", "needs two presets separated by a comma"),
    ] {
        let out = natscope(&["lab", "up", source, "--name", &name]);
        assert_eq!(out.status.code(), Some(2), "{source}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{source}: one line: {err}");
        assert!(err.contains(want), "{source}: {err}");
        assert!(registry::read(&name).is_none(), "{source}: a record exists");
        assert!(registry::namespaces_of(&name).is_empty());
        assert!(
            !registry::log_path(&name).exists(),
            "{source}: a log exists"
        );
    }
}
