//! Checks the probe's module layering from its source: imports point from the machines down to
//! the shared vocabulary, never around a cycle (issue 10, "one vocabulary"). A cycle here is how
//! the shared names ended up inside one concrete machine's file before, so it is a test, not a
//! review comment.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// The modules that hold what the machines share: they name no other probe module.
const LEAVES: [&str; 3] = ["socket", "evidence", "pacing"];

/// A source file of a top-level probe module, and whether it is a submodule below it (then its
/// `super::` is that module itself, not `probe`).
struct Source {
    module: String,
    nested: bool,
    text: String,
}

fn sources(dir: &Path, top: Option<&str>, out: &mut Vec<Source>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("probe source directory")
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 file name")
            .to_owned();
        if path.is_dir() {
            sources(&path, Some(top.unwrap_or(&name)), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let (module, nested) = match top {
                // This file quotes import lines as test data; nothing imports it.
                None if name == "mod" || name == "layering" => continue,
                None => (name, false),
                Some(t) => (t.to_owned(), name != "mod"),
            };
            let text = fs::read_to_string(&path).expect("readable source");
            out.push(Source {
                module,
                nested,
                text,
            });
        }
    }
}

/// The identifiers that follow `prefix` in `code`, either one (`prefix::name`) or a braced group
/// (`prefix::{a, b::c}`: `a` and `b`).
fn named_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        // `super::super::x` from a nested file is matched by its own prefix, not by `super::`.
        if prefix == "super::" && rest.starts_with("super::") {
            rest = rest.trim_start_matches("super::");
            continue;
        }
        let word = |s: &'a str| {
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(s.len());
            &s[..end]
        };
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(|p| word(p.trim())));
        } else {
            names.push(word(rest));
        }
    }
    names
}

/// Module → the other probe modules its code (comments excluded) names.
fn imports(sources: &[Source]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = sources.iter().map(|s| s.module.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for s in sources {
        let parent = if s.nested {
            "super::super::"
        } else {
            "super::"
        };
        for line in s.text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for prefix in [parent, "crate::probe::"] {
                for name in named_after(code, prefix) {
                    if name != s.module && modules.contains(name) {
                        if let Some(out) = graph.get_mut(&s.module) {
                            out.insert(name.to_owned());
                        }
                    }
                }
            }
        }
    }
    graph
}

/// The modules on a cycle, if any (depth-first search with the current path on a stack).
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

fn probe_graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/probe");
    let mut all = Vec::new();
    sources(&dir, None, &mut all);
    imports(&all)
}

#[test]
fn probe_modules_import_no_cycle() {
    let graph = probe_graph();
    // The parser must see the imports that exist, or an empty graph would pass.
    for (from, to) in [
        ("plan", "socket"),
        ("lifetime", "evidence"),
        ("tcp", "report"),
    ] {
        assert!(
            graph[from].contains(to),
            "{from} -> {to} not found: {graph:?}"
        );
    }
    assert_eq!(cycle(&graph), None, "probe modules import in a cycle");
}

#[test]
fn shared_vocabulary_modules_name_no_machine() {
    let graph = probe_graph();
    for leaf in LEAVES {
        assert_eq!(
            graph[leaf],
            BTreeSet::new(),
            "{leaf} holds what the machines share and must import none of them"
        );
    }
}

#[test]
fn the_parser_reads_groups_and_nested_paths() {
    assert_eq!(
        named_after(
            "use super::{plan::S0, report, socket::SocketId};",
            "super::"
        ),
        ["plan", "report", "socket"]
    );
    assert_eq!(
        named_after("use super::super::evidence::Timing;", "super::"),
        Vec::<&str>::new()
    );
    assert_eq!(
        named_after("use super::super::evidence::Timing;", "super::super::"),
        ["evidence"]
    );
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycle(&g), Some(vec!["a".into(), "b".into(), "a".into()]));
}
