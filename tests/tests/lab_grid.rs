//! Issue 5, must-show 2: `natscope lab grid` over full-cone, restricted-cone,
//! port-restricted-cone, symmetric, symmetric-sequential and cgnat, for UDP and TCP: every pair's
//! outcome (direct / relayed) is the one RFC 4787 reasoning predicts, and relayed pairs still
//! deliver every message, once each, in order.

use std::process::Command;

use natscope_lab::grid::{self, Transport};
use natscope_tests::lab::require_root;
use natscope_tests::natscope_bin;
use serde_json::Value;

#[test]
fn grid_of_six_presets_matches_rfc4787_reasoning_over_udp_and_tcp() {
    if !require_root() {
        return;
    }
    let out = Command::new(natscope_bin())
        .args(["lab", "grid", "--json"])
        .output()
        .expect("run natscope lab grid");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(doc["schema"], "natscope.grid/v1");
    let cells = doc["cells"].as_array().expect("cells");
    let n = grid::DEFAULT_PRESETS.len();
    assert_eq!(
        cells.len(),
        n * (n + 1) / 2 * 2,
        "every unordered pair, both transports"
    );
    let bad: Vec<&Value> = cells.iter().filter(|c| c["pass"] != true).collect();
    assert!(
        bad.is_empty(),
        "unexpected outcomes:\n{}",
        serde_json::to_string_pretty(&bad).unwrap()
    );
    for c in cells {
        // The expectation in the document is the library's, not something the runner made up.
        let t = if c["transport"] == "tcp" {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        let (want, _) =
            grid::expected(c["a"].as_str().unwrap(), c["b"].as_str().unwrap(), t).unwrap();
        assert_eq!(c["expected"], serde_json::to_value(want).unwrap());
        assert_eq!(c["observed"], c["expected"]);
        assert!(c["messages_sent"].as_u64().unwrap() > 0);
        assert_eq!(
            c["messages_echoed"], c["messages_sent"],
            "data delivered: {c}"
        );
    }
    // Both kinds of outcome occur (the grid is not trivially all-direct or all-relayed).
    assert!(cells.iter().any(|c| c["observed"] == "direct"));
    assert!(cells.iter().any(|c| c["observed"] == "relayed"));
    assert_eq!(out.status.code(), Some(0));
}
