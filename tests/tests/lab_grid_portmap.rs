//! Issue 12, must-show 4: punch uses a mapped port as a candidate, so in `natscope lab grid` a
//! peer behind a symmetric NAT that serves PCP or UPnP IGD goes direct with a symmetric and with
//! a port-restricted-cone peer — pairs that relay without the service — and the expectation is
//! the traversal model's. The lab judges the path from what its routers forwarded; the control
//! cell symmetric ↔ symmetric (no port mapping) still relays. Beside the grid: what punch reports
//! about its mapping, that Ctrl-C deletes it, and that a mapping behind a second NAT is offered
//! but reported, not believed.

use natscope_lab::grid::{self, Family, GridCell, GridDocument, PathTaken, Transport};
use natscope_tests::lab::{require_root, run_grid};
use natscope_tests::natscope_bin;

fn grid(presets: &str) -> GridDocument {
    let args = [
        "--transport",
        "udp",
        "--presets",
        presets,
        "--lab-prefix",
        "mapc",
    ];
    run_grid(&args).0
}

fn cell<'a>(doc: &'a GridDocument, a: &str, b: &str) -> &'a GridCell {
    doc.cell(Transport::Udp, Family::Ipv4, a, b)
        .unwrap_or_else(|| panic!("no cell {a} × {b} in {:#?}", doc.cells))
}

/// A cell that went direct through the mapped port: expected so by the model (with the mapped
/// port as the reason), reported direct by punch, seen direct by the lab's routers, every
/// message echoed.
fn assert_direct_through_mapping(c: &GridCell) {
    let (want, reason) = grid::expected(&c.a, &c.b, c.transport).expect("known presets");
    assert_eq!((c.expected, &c.reason), (want, &reason), "{c:#?}");
    assert_eq!(c.expected, PathTaken::Direct, "{c:#?}");
    assert!(reason.contains("maps it a port"), "{reason}");
    assert!(c.pass, "{c:#?}");
    assert_eq!(c.observed, Some(PathTaken::Direct), "{c:#?}");
    assert_eq!(c.lab_observed, Some(PathTaken::Direct), "{c:#?}");
    let e = c.evidence.as_ref().expect("evidence");
    assert!(
        e.direct_a_to_b.packets > 0 && e.direct_b_to_a.packets > 0,
        "{e:#?}"
    );
    assert_eq!(c.messages_echoed, c.messages_sent);
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn symmetric_pcp_and_upnp_peers_go_direct_through_their_mapped_port() {
    require_root();
    let doc = grid("symmetric+pcp,symmetric");
    assert_direct_through_mapping(cell(&doc, "symmetric+pcp", "symmetric"));
    // The control cell: no port mapping on either side, the same NATs relay.
    let control = cell(&doc, "symmetric", "symmetric");
    assert_eq!(control.expected, PathTaken::Relayed, "{control:#?}");
    assert_eq!(control.observed, Some(PathTaken::Relayed), "{control:#?}");
    assert_eq!(
        control.lab_observed,
        Some(PathTaken::Relayed),
        "{control:#?}"
    );
    assert!(control.pass, "{control:#?}");
    assert!(doc.cells.iter().all(|c| c.pass), "{:#?}", doc.cells);

    let doc = grid("symmetric+upnp,port-restricted-cone");
    assert_direct_through_mapping(cell(&doc, "symmetric+upnp", "port-restricted-cone"));
    assert!(doc.cells.iter().all(|c| c.pass), "{:#?}", doc.cells);
}

/// The mappings `node`'s router holds because a port-mapping request made them.
fn requested(lab: &natscope_lab::Lab, node: &str) -> Vec<natscope_lab::engine::MappingRow> {
    lab.nat_table(node)
        .expect("a userspace router")
        .into_iter()
        .filter(|m| m.requested_by.is_some())
        .collect()
}

/// The `port-mapping` line `punch listen --json` prints after its first registration.
fn port_mapping_line(l: &mut natscope_tests::ChildProcess) -> String {
    let mapped = |p: &natscope_tests::ChildProcess| p.stdout().contains("port-mapping");
    natscope_tests::punch::wait_for(l, mapped, "port-mapped");
    l.stdout()
        .lines()
        .find(|x| x.contains("\"port-mapping\""))
        .map(str::to_string)
        .expect("a port-mapping line")
}

/// Issue 12, "Punch and grid": `punch listen` behind symmetric+pcp maps its socket's port over
/// PCP before it registers and says so on its `port-mapping` line (the router holds the mapping,
/// made by the request); a connector behind a symmetric NAT (whose gateway answers nothing) goes
/// direct to it and reports why it has no mapping of its own; Ctrl-C (SIGINT) deletes the
/// listener's mapping before it exits.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn punch_maps_its_port_reports_it_and_deletes_it_on_ctrl_c() {
    use natscope_tests::punch::{finish, report, router, PunchLab};
    require_root();
    let lab = PunchLab::up("mapc", router("symmetric"), router("symmetric+pcp"));
    let mut l = lab.listener("mapcl", &["--json"]);
    let line = port_mapping_line(&mut l);
    natscope_tests::schema::assert_valid_text(&line);
    let m: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(m["protocol"], "pcp", "{line}");
    assert_eq!(m["offered"], true, "{line}");
    assert_eq!(m["lifetime_s"], 120, "{line}");
    assert_eq!(m["problems"], serde_json::json!([]), "{line}");
    let held = requested(&lab.lab, "nb");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        m["external"].as_str(),
        Some(held[0].external.to_string().as_str()),
        "{line}"
    );

    let (code, c) = lab.connect("mapcl", &[]);
    assert_eq!(code, 0, "{}", c.diagnostics());
    let r = report(&c);
    assert_eq!(r.path, PathTaken::Direct, "{r:#?}");
    let own = r
        .attempts
        .port_mapping
        .expect("the connector's port_mapping");
    assert_eq!(own.protocol, None, "{own:?}");
    assert!(
        own.why_none
            .as_deref()
            .is_some_and(|w| w.contains("no port-mapping protocol")),
        "{own:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(l.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT the listener");
    assert_eq!(finish(&mut l, std::time::Duration::from_secs(5)), 0);
    assert_eq!(requested(&lab.lab, "nb"), Vec::new(), "deleted on Ctrl-C");
    lab.down();
}

/// A gateway whose claim the server contradicts (issue 12): behind `double-nat+all` the inner
/// router grants a PCP mapping on its own external address, 192.168.1.x, which the outer NAT
/// does not forward. Punch offers it anyway (a wrong candidate only costs probes) and says why in
/// `problems`; the model gives double NAT no credit, so the pair with a symmetric peer relays,
/// as expected, with every message delivered.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn a_mapping_behind_a_second_nat_is_offered_but_reported() {
    use natscope_tests::punch::{finish, report, serve};
    require_root();
    let topo = grid::pair_topology("symmetric", "double-nat+all").expect("presets");
    let plan = topo.plan().expect("plan");
    let lab = natscope_lab::Lab::up(
        &natscope_tests::lab::lab_name("mapc"),
        plan,
        natscope_tests::lab::options(),
    )
    .expect("lab up");
    let _server: natscope_tests::ChildProcess = serve(&lab);
    let exe = natscope_bin();
    let listen = ["--json", "--count", "1", "--timeout", "30"];
    let mut l: natscope_tests::ChildProcess =
        natscope_lab::punch_lab::listener(&lab, &exe, None, "mapcx", &listen)
            .unwrap_or_else(|e| panic!("{e}"));
    let line = port_mapping_line(&mut l);
    let m: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(m["protocol"], "pcp", "{line}");
    assert_eq!(m["offered"], true, "{line}");
    assert!(
        m["external"]
            .as_str()
            .is_some_and(|e| e.starts_with("192.168.1.")),
        "{line}"
    );
    let problem = m["problems"][0].as_str().unwrap_or_default();
    assert!(
        problem.contains("claims external address 192.168.1.")
            && problem.contains("saw 203.0.113."),
        "{line}"
    );
    let c: natscope_tests::ChildProcess =
        natscope_lab::punch_lab::connector(&lab, &exe, "mapcx", &["--timeout", "8"])
            .unwrap_or_else(|e| panic!("{e}"));
    let mut c = c;
    assert_eq!(finish(&mut c, std::time::Duration::from_secs(30)), 0);
    let r = report(&c);
    // The model relays this pair (the mapping behind a second NAT gets no credit); the birthday
    // technique may still open it directly, but never through the claimed address.
    let (want, _) = grid::expected("symmetric", "double-nat+all", grid::Transport::Udp).unwrap();
    assert_eq!(want, PathTaken::Relayed);
    let (a, b, udp) = ("symmetric", "double-nat+all", grid::Transport::Udp);
    assert!(
        grid::path_accepted(a, b, udp, None, want, Some(r.path)),
        "{r:#?}"
    );
    assert!(
        !r.peer
            .is_some_and(|p| p.ip().to_string().starts_with("192.168.1.")),
        "{r:#?}"
    );
    assert_eq!(r.messages_echoed, r.messages_sent);
    assert!(r
        .attempts
        .peer_candidates
        .iter()
        .any(|a| a.ip().to_string().starts_with("192.168.1.")));
    assert_eq!(finish(&mut l, std::time::Duration::from_secs(10)), 0);
    lab.down();
}
