//! Issue 16, must-show 1: an unprivileged user runs labs through a user namespace — `lab up`,
//! `lab exec`, `lab nat-table`, `lab status`, `lab down`, `lab matrix` and a small `lab grid`
//! pass; a supervisor killed with SIGKILL is cleaned up by `lab down`; and nothing is left behind:
//! no process of that user, no record, no namespace in root's /run/netns, and the root namespace
//! unchanged (the snapshot lab_safety.rs takes).
//!
//! Root is needed only to drop to the unprivileged uid (`setpriv`) and to watch from outside.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use natscope_lab::grid::GridDocument;
use natscope_lab::matrix::MatrixDocument;
use natscope_lab::{netns, registry, StatusDocument};
use natscope_probes::probe::{Classic, ProbeReport};
use natscope_tests::lab::*;
use natscope_tests::require_tool;

/// A uid no account uses, so every process of it is the test's.
const UID: u32 = 61_234;

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes the user's labs down if the test fails half-way.
struct DownOnDrop<'a>(&'a Unprivileged, Vec<String>);

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        for name in &self.1 {
            let _ = self.0.natscope(&["lab", "down", name]);
        }
    }
}

fn uid_of(pid: i32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

#[test]
#[ignore = "needs root (to drop to an unprivileged uid), setpriv and user namespaces; run with --include-ignored (scripts/test does)"]
fn an_unprivileged_user_runs_labs_and_leaves_nothing_behind() {
    require_root();
    require_tool("setpriv", "util-linux");
    let user = Unprivileged::new(UID);
    assert!(
        user.processes().is_empty(),
        "uid {UID} runs processes before the test: {:?}",
        user.processes()
    );
    let before = RootState::snapshot();

    // 0. A state directory others may write (it could feed the user fake labs) is refused, in
    //    one line, before anything exists.
    let state = user.runtime_dir().join("natscope");
    std::fs::create_dir(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(UID), Some(UID)).expect("chown");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = user.natscope(&["lab", "up", "open", "--name", "rootbad"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("is not a directory only uid 61234 can use"),
        "{err}"
    );
    assert!(user.processes().is_empty() && user.lab_files().is_empty());
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");

    let name = lab_name("root");
    let stale = lab_name("root");
    let _down = DownOnDrop(&user, vec![name.clone(), stale.clone()]);

    // 1. `lab up`: a supervisor of the user's, its record in the user's runtime directory.
    let out = user.natscope(&[
        "lab",
        "up",
        "port-restricted-cone",
        "--name",
        &name,
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: StatusDocument = serde_json::from_slice(&out.stdout).expect("status json");
    let lab = &doc.labs[0];
    assert!(lab.running);
    assert_eq!(
        uid_of(lab.owner_pid),
        Some(UID),
        "the supervisor is the user's"
    );
    assert!(
        user.lab_files().contains(&format!("{name}.json")),
        "record in the user's directory: {:?}",
        user.lab_files()
    );
    assert!(
        registry::read(&name).is_none(),
        "nothing in root's registry"
    );
    assert!(
        registry::namespaces_of(&name).is_empty(),
        "nothing in root's {}",
        netns::NETNS_DIR
    );

    // 2. `lab exec`: the program runs in the node (its address), as root of the lab's user
    //    namespace, and traffic crosses the userspace NAT.
    let out = user.natscope(&[
        "lab",
        "exec",
        "--lab",
        &name,
        "h1",
        "--",
        "sh",
        "-c",
        "id -u; ip -o -4 addr show",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("0\n"), "{stdout}");
    assert!(stdout.contains("inet 10.1.0.2/24"), "{stdout}");
    let bin = user.bin();
    let out = user.natscope(&[
        "lab",
        "exec",
        "--lab",
        &name,
        "h1",
        "--",
        &bin.to_string_lossy(),
        "probe",
        "198.51.100.1:3478",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let probe: ProbeReport = serde_json::from_slice(&out.stdout).expect("probe json");
    assert_eq!(probe.classic, Classic::PortRestrictedCone);
    // The exit status passes through.
    let out = user.natscope(&[
        "lab", "exec", "--lab", &name, "h2", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));

    // 3. `lab nat-table` and `lab status` reach the supervisor over its control socket.
    let out = user.natscope(&["lab", "nat-table", "--lab", &name, "nat", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("table json");
    assert!(
        table["mappings"].as_array().is_some_and(|m| !m.is_empty()),
        "the probe's mappings: {table}"
    );
    let out = user.natscope(&["lab", "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: StatusDocument = serde_json::from_slice(&out.stdout).expect("status json");
    let nat = doc.labs[0].nodes.iter().find(|n| n.name == "nat").unwrap();
    assert!(nat.mappings.is_some_and(|m| m > 0), "{nat:?}");

    // 4. `lab down`.
    let out = user.natscope(&["lab", "down", &name]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the lab's processes to end", Duration::from_secs(5), || {
        user.processes().is_empty()
    });

    // 5. A supervisor killed with SIGKILL leaves its reflector in its user namespace; `lab down`
    //    finds and ends it.
    let out = user.natscope(&["lab", "up", "open", "--name", &stale, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: StatusDocument = serde_json::from_slice(&out.stdout).expect("status json");
    let owner = doc.labs[0].owner_pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(owner),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the supervisor to die", Duration::from_secs(5), || {
        user.processes().iter().all(|(pid, _)| *pid != owner)
    });
    assert!(
        user.processes()
            .iter()
            .any(|(_, cmd)| cmd.contains("reflect")),
        "a killed supervisor leaves its reflector: {:?}",
        user.processes()
    );
    let out = user.natscope(&["lab", "down", &stale]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        "the stale lab's processes to end",
        Duration::from_secs(5),
        || user.processes().is_empty(),
    );

    // 6. `lab matrix` over a few presets, the kernel-NAT one included (nftables in the user's
    //    namespaces).
    let out = user.natscope(&[
        "lab",
        "matrix",
        "--presets",
        "open,port-restricted-cone,symmetric,linux",
        "--jobs",
        "2",
        "--json",
    ]);
    let doc: MatrixDocument = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("matrix json ({e}): {}", text(&out)));
    assert!(doc.pass, "{}", text(&out));
    assert_eq!(doc.rows.len(), 4);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // 7. A small `lab grid`: one direct and one relayed kind of pair, both transports.
    let out = user.natscope(&[
        "lab",
        "grid",
        "--presets",
        "full-cone,symmetric",
        "--jobs",
        "3",
        "--json",
    ]);
    let doc: GridDocument = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("grid json ({e}): {}", text(&out)));
    assert!(doc.pass, "{}", text(&out));
    assert_eq!(doc.cells.len(), 6, "3 pairs, udp and tcp");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Nothing is left: no process of the user's, no record, socket or log, no namespace of
    // these labs in root's view, and the root namespace as it was.
    wait_until(
        "every process of the user to end",
        Duration::from_secs(5),
        || user.processes().is_empty(),
    );
    assert!(user.lab_files().is_empty(), "left: {:?}", user.lab_files());
    assert!(
        netns::list_lab_namespaces()
            .iter()
            .all(|n| registry::lab_of_namespace(n).is_none_or(|l| !l.starts_with("root"))),
        "a rootless lab's namespace in {}",
        netns::NETNS_DIR
    );
    RootState::snapshot().assert_unchanged_since(&before);
}
