//! Issue 5, must-show 2: `natscope lab grid` over full-cone, restricted-cone,
//! port-restricted-cone, symmetric, symmetric-sequential and cgnat, for UDP and TCP: every pair's
//! outcome (direct / relayed) is the one RFC 4787 reasoning predicts, and relayed pairs still
//! deliver every message, once each, in order.

use std::process::Command;

use natscope_lab::grid::{self, GridCell, GridDocument, PathTaken};
use natscope_tests::lab::require_root;
use natscope_tests::natscope_bin;

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn grid_of_six_presets_matches_rfc4787_reasoning_over_udp_and_tcp() {
    require_root();
    let out = Command::new(natscope_bin())
        .args(["lab", "grid", "--json"])
        .output()
        .expect("run natscope lab grid");
    let stdout = String::from_utf8_lossy(&out.stdout);
    natscope_tests::schema::assert_valid_text(&stdout);
    let doc: GridDocument = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a natscope.grid/v1 document ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(doc.schema, "natscope.grid/v1");
    let cells = &doc.cells;
    let n = grid::DEFAULT_PRESETS.len();
    assert_eq!(
        cells.len(),
        n * (n + 1) / 2 * 2,
        "every unordered pair, both transports"
    );
    let bad: Vec<&GridCell> = cells.iter().filter(|c| !c.pass).collect();
    assert!(
        bad.is_empty(),
        "unexpected outcomes:\n{}",
        serde_json::to_string_pretty(&bad).unwrap()
    );
    for c in cells {
        // The expectation in the document is the library's, not something the runner made up.
        let (want, _) = grid::expected(&c.a, &c.b, c.transport).unwrap();
        assert_eq!(c.expected, want);
        assert_eq!(c.observed, Some(c.expected));
        assert!(c.messages_sent > 0);
        assert_eq!(c.messages_echoed, c.messages_sent, "data delivered: {c:?}");
    }
    // Both kinds of outcome occur (the grid is not trivially all-direct or all-relayed).
    assert!(cells.iter().any(|c| c.observed == Some(PathTaken::Direct)));
    assert!(cells.iter().any(|c| c.observed == Some(PathTaken::Relayed)));
    assert_eq!(out.status.code(), Some(0));
}
