//! Issue 11, must-show 2: a real third-party P2P program that punches and relays on its own —
//! Debian's nebula (examples/apps/nebula/) — through `lab grid --app` across full-cone,
//! port-restricted-cone, symmetric and the kernel's `linux` NAT. Every cell must deliver, and each
//! must carry the lab's observed path with its evidence; where nebula's path differs from the
//! model's expectation the cell says so (docs/testing-your-app.md, "Example: nebula").

use std::path::Path;
use std::process::Command;

use natscope_lab::app_run::AppGridDocument;
use natscope_lab::grid::PathTaken;
use natscope_tests::lab::require_root;
use natscope_tests::{natscope_bin, require_tool};

const PREFIX: &str = "nebg";

#[test]
#[ignore = "needs root, network namespaces and nebula; run with --include-ignored (scripts/test does)"]
fn nebula_delivers_in_every_cell_and_the_lab_reports_its_paths() {
    require_root();
    require_tool("nebula", "nebula");
    require_tool("nebula-cert", "nebula");
    require_tool("nft", "nftables");
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/apps/nebula/nebula.toml");
    let out = Command::new(natscope_bin())
        .args([
            "lab",
            "grid",
            "--json",
            "--jobs",
            "3",
            "--lab-prefix",
            PREFIX,
        ])
        .args([
            "--presets",
            "full-cone,port-restricted-cone,symmetric,linux",
        ])
        .arg("--app")
        .arg(&app)
        .output()
        .expect("run natscope lab grid --app nebula.toml");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: AppGridDocument = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a natscope.grid/v2 document ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    natscope_tests::schema::assert_valid_text(&stdout);
    // 1 when some cell's path differs from the model's, never 2 (a cell that could not run).
    assert_ne!(out.status.code(), Some(2), "{stdout}");
    assert_eq!(doc.cells.len(), 10, "every unordered pair of 4 presets");
    for c in &doc.cells {
        println!(
            "{} ↔ {}: observed {:?}, nebula says {:?}, model {:?} — {}",
            c.a,
            c.b,
            c.observed,
            c.claimed,
            c.expected,
            c.failure().unwrap_or_else(|| "as expected".into())
        );
        let logs = || format!("{:#?}", c.logs);
        assert!(
            c.error.is_none() && !c.timed_out && c.exit_status == Some(0),
            "{} ↔ {} did not deliver: {:?}\n{}",
            c.a,
            c.b,
            c.error,
            logs()
        );
        let observed = c
            .observed
            .unwrap_or_else(|| panic!("no observed path\n{}", logs()));
        assert!(
            matches!(observed, PathTaken::Direct | PathTaken::Relayed),
            "{observed:?}"
        );
        let e = c.evidence.as_ref().expect("the cell carries its evidence");
        // The evidence must back the verdict: a direct cell moved bytes between the NATs in both
        // directions; a relayed one moved them through the rendezvous host.
        match observed {
            PathTaken::Direct => assert!(
                e.direct_a_to_b.bytes > 0 && e.direct_b_to_a.bytes > 0,
                "{e:#?}"
            ),
            _ => assert!(
                e.a.to_rendezvous.bytes > 0 && e.b.from_rendezvous.bytes > 0,
                "{e:#?}"
            ),
        }
    }
    // The two ends of nebula's behaviour (repeatable: docs/testing-your-app.md): between full cones
    // its own punch wins; between symmetric NATs only its relay can carry the tunnel.
    let path = |a: &str, b: &str| doc.cell(a, b).and_then(|c| c.observed);
    assert_eq!(path("full-cone", "full-cone"), Some(PathTaken::Direct));
    assert_eq!(path("symmetric", "symmetric"), Some(PathTaken::Relayed));
}
