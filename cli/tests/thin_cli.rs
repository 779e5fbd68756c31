//! The binary stays glue (docs/architecture.md, DESIGN.md "Libraries hold the logic; the CLI only
//! wires it"): a budget on `cli/src`'s non-test lines, so protocol or lab logic that creeps into the
//! CLI shows up here and goes to the library that owns the concept instead.

use std::path::Path;

/// Lines of non-test code `cli/src` may hold (issue 10 set it; 3,866 before the libraries took the
/// supervisor, the traffic generators, the grid and matrix runners and the mapping comparison).
const BUDGET: usize = 2_500;

/// Lines of `src` outside `#[cfg(test)] mod … { … }` blocks (a block ends where its braces balance).
fn non_test_lines(src: &str) -> usize {
    let lines: Vec<&str> = src.lines().collect();
    let mut n = 0;
    let mut i = 0;
    while i < lines.len() {
        let opens_test_mod = lines[i].trim() == "#[cfg(test)]"
            && lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with("mod ") && l.trim_end().ends_with('{'));
        if opens_test_mod {
            let mut depth = 0i64;
            let mut j = i + 1;
            while j < lines.len() {
                depth +=
                    lines[j].matches('{').count() as i64 - lines[j].matches('}').count() as i64;
                if depth <= 0 {
                    break;
                }
                j += 1;
            }
            i = j + 1;
            continue;
        }
        n += 1;
        i += 1;
    }
    n
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read cli/src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn test_modules_are_not_counted_but_everything_else_is() {
    let src = "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() {\n    }\n}\nfn c() {}\n";
    assert_eq!(non_test_lines(src), 2);
    // A `#[cfg(test)]` on something other than a module counts like any code.
    assert_eq!(non_test_lines("#[cfg(test)]\nfn helper() {}\n"), 2);
}

#[test]
fn cli_src_stays_within_its_budget() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    files.sort();
    let counts: Vec<(String, usize)> = files
        .iter()
        .map(|f| {
            let src = std::fs::read_to_string(f).expect("read source");
            (f.display().to_string(), non_test_lines(&src))
        })
        .collect();
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    assert!(
        counts.len() >= 5 && total > 1_000,
        "found too little to be cli/src: {counts:?}"
    );
    assert!(
        total < BUDGET,
        "cli/src has {total} lines of non-test code (budget {BUDGET}): move logic into the \
         library that owns it (docs/architecture.md)\n{counts:#?}"
    );
}
