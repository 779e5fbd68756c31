//! Issue 12, must-show 4: punch uses a mapped port as a candidate, so in `natscope lab grid` a
//! peer behind a symmetric NAT that serves PCP or UPnP IGD goes direct with a symmetric and with
//! a port-restricted-cone peer — pairs that relay without the service — and the expectation is
//! the traversal model's. The lab judges the path from what its routers forwarded; the control
//! cell symmetric ↔ symmetric (no port mapping) still relays.

use std::process::Command;

use natscope_lab::grid::{self, GridCell, GridDocument, PathTaken};
use natscope_tests::lab::require_root;
use natscope_tests::natscope_bin;

fn grid(presets: &str) -> GridDocument {
    let out = Command::new(natscope_bin())
        .args(["lab", "grid", "--json", "--transport", "udp"])
        .args(["--presets", presets, "--lab-prefix", "mapc"])
        .output()
        .expect("run natscope lab grid");
    let stdout = String::from_utf8_lossy(&out.stdout);
    natscope_tests::schema::assert_valid_text(&stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a natscope.grid/v1 document ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn cell<'a>(doc: &'a GridDocument, a: &str, b: &str) -> &'a GridCell {
    doc.cells
        .iter()
        .find(|c| (c.a == a && c.b == b) || (c.a == b && c.b == a))
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
