//! App files for `natscope lab grid --app FILE.toml` (docs/testing-your-app.md): how to start a
//! third-party P2P program's rendezvous server, listener and connector in every cell of the grid.
//!
//! A user writes these by hand, so they are read like topology files (`crate::config`): TOML with
//! unknown keys refused, and every error one line naming the file, line and column. The file is
//! fully checked on load — a placeholder that does not exist, a `ready` that is neither a port nor
//! a wait, an `[expect]` key that names no preset — so a grid never starts a lab for a file that
//! could not run.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{line_column, Location};
use crate::grid::PathTaken;
use crate::presets;

/// The wait when a role says no `ready`.
pub const DEFAULT_READY: Duration = Duration::from_millis(500);
/// How long `[connect]` may run when it says no `timeout_s`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `[server]` and `[listen]` may take to bind their `ready` port without a `timeout_s`.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Placeholders a cell's commands may use.
pub const CELL_PLACEHOLDERS: &[&str] = &["server", "a", "b", "cell", "work", "app_dir"];
/// Placeholders `setup` may use: it runs once on the host before any cell exists.
pub const SETUP_PLACEHOLDERS: &[&str] = &["work", "app_dir"];

/// Why an app file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AppFileError {
    #[error("cannot read app file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
}

/// When a started role counts as ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// A UDP socket bound to this port inside the role's node.
    Udp(u16),
    /// A TCP socket listening on this port inside the role's node.
    Tcp(u16),
    /// A fixed wait.
    Wait(Duration),
    /// This text appears in what the role wrote to stdout (a program that says when it is
    /// registered, as `natscope punch listen` does).
    Stdout(String),
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ready::Udp(p) => write!(f, "udp:{p}"),
            Ready::Tcp(p) => write!(f, "tcp:{p}"),
            Ready::Wait(d) => write!(f, "{} ms", d.as_millis()),
            Ready::Stdout(t) => write!(f, "stdout:{t}"),
        }
    }
}

/// One role's command: `[server]` on `rendezvous`, `[listen]` on `b`, `[connect]` on `a`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleCommand {
    /// The command line, placeholders not yet filled in; run with `sh -c`.
    pub run: String,
    /// `[server]`/`[listen]`: when the next role may start. `[connect]` has none.
    pub ready: Ready,
    /// `[connect]`: how long it may run before it is killed and the cell fails;
    /// `[server]`/`[listen]`: how long they may take to become ready.
    pub timeout: Duration,
}

/// A loaded, checked app file.
#[derive(Clone, Debug, PartialEq)]
pub struct AppSpec {
    pub name: String,
    /// The file as given (for messages).
    pub file: String,
    /// The directory holding the file: `{app_dir}`.
    pub dir: PathBuf,
    pub setup: Option<String>,
    pub server: Option<RoleCommand>,
    pub listen: Option<RoleCommand>,
    pub connect: RoleCommand,
    /// `[expect]`: "a/b" preset pairs whose outcome the app expects differently from the model.
    pub expect: BTreeMap<(String, String), PathTaken>,
}

impl AppSpec {
    /// The app's own expectation for the cell `a` × `b`, if `[expect]` names it (either order).
    pub fn expectation(&self, a: &str, b: &str) -> Option<PathTaken> {
        self.expect
            .get(&(a.to_string(), b.to_string()))
            .or_else(|| self.expect.get(&(b.to_string(), a.to_string())))
            .copied()
    }
}

/// The values a cell's placeholders stand for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placeholders {
    pub server: String,
    pub a: String,
    pub b: String,
    pub cell: String,
    pub work: String,
    pub app_dir: String,
}

impl Placeholders {
    fn get(&self, name: &str) -> Option<&str> {
        Some(match name {
            "server" => &self.server,
            "a" => &self.a,
            "b" => &self.b,
            "cell" => &self.cell,
            "work" => &self.work,
            "app_dir" => &self.app_dir,
            _ => return None,
        })
    }

    /// `command` with every placeholder replaced; anything else is left as written.
    pub fn fill(&self, command: &str) -> String {
        let mut out = String::with_capacity(command.len());
        let mut last = 0;
        for (range, name) in placeholders(command) {
            out.push_str(&command[last..range.start]);
            match self.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&command[range.clone()]),
            }
            last = range.end;
        }
        out.push_str(&command[last..]);
        out
    }

    /// The same values as environment variables, for programs that prefer them.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NATSCOPE_SERVER", self.server.clone()),
            ("NATSCOPE_A", self.a.clone()),
            ("NATSCOPE_B", self.b.clone()),
            ("NATSCOPE_CELL", self.cell.clone()),
            ("NATSCOPE_WORK", self.work.clone()),
            ("NATSCOPE_APP_DIR", self.app_dir.clone()),
        ]
    }
}

/// The placeholders of `command`: `{name}` with `name` of `[a-z_]`, not preceded by `$` (so a
/// shell's `${VAR}` stays the shell's). Byte ranges include the braces.
fn placeholders(command: &str) -> Vec<(Range<usize>, &str)> {
    let bytes = command.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'{' && (i == 0 || bytes[i - 1] != b'$') {
            let name_len = bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_lowercase() || **b == b'_')
                .count();
            let end = i + 1 + name_len;
            if name_len > 0 && bytes.get(end) == Some(&b'}') {
                found.push((i..end + 1, &command[i + 1..end]));
                i = end + 1;
                continue;
            }
        }
        i += 1;
    }
    found
}

// ---- the file format ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    name: Option<Spanned<String>>,
    setup: Option<Spanned<String>>,
    server: Option<RoleDoc>,
    listen: Option<RoleDoc>,
    connect: Option<Spanned<RoleDoc>>,
    #[serde(default)]
    expect: BTreeMap<Spanned<String>, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleDoc {
    run: Spanned<String>,
    ready: Option<Spanned<ReadyDoc>>,
    timeout_s: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ReadyDoc {
    Ms(i64),
    Text(String),
}

type BuildError = (Option<Range<usize>>, String);

/// Reads and checks the app file at `path`.
pub fn load(path: &Path) -> Result<AppSpec, AppFileError> {
    let source = std::fs::read_to_string(path).map_err(|error| AppFileError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    from_toml(&source, &path.display().to_string(), &dir)
}

/// Parses an app file's text; `file_name` is for messages, `dir` is `{app_dir}`.
pub fn from_toml(source: &str, file_name: &str, dir: &Path) -> Result<AppSpec, AppFileError> {
    let invalid = |span: Option<Range<usize>>, message: String| AppFileError::Invalid {
        at: Location {
            file: file_name.to_string(),
            // A whole-file problem (a missing table) points at the start.
            line_column: Some(span.map_or((1, 1), |s| line_column(source, s.start))),
        },
        message,
    };
    let doc: FileDoc =
        toml::from_str(source).map_err(|e| invalid(e.span(), e.message().trim_end().into()))?;
    build(doc, source, file_name, dir).map_err(|(span, message)| invalid(span, message))
}

fn build(doc: FileDoc, source: &str, file: &str, dir: &Path) -> Result<AppSpec, BuildError> {
    let connect = doc.connect.ok_or((
        None,
        "missing [connect]: the command run on peer `a` whose exit status says whether it connected"
            .to_string(),
    ))?;
    let connect_span = connect.span();
    let connect = connect.into_inner();
    if let Some(r) = &connect.ready {
        return Err((
            Some(r.span()),
            "`ready` has no meaning in [connect]: its exit status is what counts (use timeout_s)"
                .into(),
        ));
    }
    let name = match doc.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err((Some(n.span()), "`name` is empty".into()))
        }
        Some(n) => n.into_inner(),
        None => Path::new(file)
            .file_stem()
            .map_or("app".into(), |s| s.to_string_lossy().into_owned()),
    };
    let setup = match doc.setup {
        Some(s) => {
            check_command(&s, source, SETUP_PLACEHOLDERS, "setup")?;
            Some(s.into_inner())
        }
        None => None,
    };
    let server = doc
        .server
        .map(|r| role(r, source, "[server]", DEFAULT_READY_TIMEOUT))
        .transpose()?;
    let listen = doc
        .listen
        .map(|r| role(r, source, "[listen]", DEFAULT_READY_TIMEOUT))
        .transpose()?;
    let connect = role(connect, source, "[connect]", DEFAULT_CONNECT_TIMEOUT)
        .map_err(|(span, m)| (span.or(Some(connect_span)), m))?;
    let mut expect = BTreeMap::new();
    for (key, value) in doc.expect {
        let pair = key
            .get_ref()
            .split_once('/')
            .filter(|(a, b)| presets::names().contains(a) && presets::names().contains(b));
        let Some((a, b)) = pair else {
            return Err((
                Some(key.span()),
                format!(
                    "[expect] key `{}` is not PRESET/PRESET; presets: {}",
                    key.get_ref(),
                    presets::names().join(", ")
                ),
            ));
        };
        let path = match value.get_ref().as_str() {
            "direct" => PathTaken::Direct,
            "relayed" => PathTaken::Relayed,
            "failed" => PathTaken::Failed,
            other => {
                return Err((
                    Some(value.span()),
                    format!("unknown outcome `{other}`, expected `direct`, `relayed` or `failed`"),
                ))
            }
        };
        expect.insert((a.to_string(), b.to_string()), path);
    }
    Ok(AppSpec {
        name,
        file: file.to_string(),
        dir: dir.to_path_buf(),
        setup,
        server,
        listen,
        connect,
        expect,
    })
}

fn role(
    r: RoleDoc,
    source: &str,
    table: &str,
    default_timeout: Duration,
) -> Result<RoleCommand, BuildError> {
    check_command(&r.run, source, CELL_PLACEHOLDERS, table)?;
    if r.run.get_ref().trim().is_empty() {
        return Err((Some(r.run.span()), format!("{table} `run` is empty")));
    }
    let ready = match r.ready {
        None => Ready::Wait(DEFAULT_READY),
        Some(s) => parse_ready(s.get_ref()).ok_or_else(|| {
            (
                Some(s.span()),
                "`ready` must be \"udp:PORT\", \"tcp:PORT\", \"stdout:TEXT\" or a wait in milliseconds"
                    .to_string(),
            )
        })?,
    };
    let timeout = match r.timeout_s {
        None => default_timeout,
        Some(t) => {
            let secs = *t.get_ref();
            if !(secs > 0.0 && secs <= 3600.0) {
                return Err((
                    Some(t.span()),
                    format!("`timeout_s` must be more than 0 and at most 3600, not {secs}"),
                ));
            }
            Duration::from_secs_f64(secs)
        }
    };
    Ok(RoleCommand {
        run: r.run.into_inner(),
        ready,
        timeout,
    })
}

fn parse_ready(r: &ReadyDoc) -> Option<Ready> {
    let ms = |n: u64| (n <= 600_000).then_some(Ready::Wait(Duration::from_millis(n)));
    match r {
        ReadyDoc::Ms(n) => ms(u64::try_from(*n).ok()?),
        ReadyDoc::Text(t) => {
            let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
            if let Some(p) = t.strip_prefix("udp:") {
                Some(Ready::Udp(port(p)?))
            } else if let Some(p) = t.strip_prefix("tcp:") {
                Some(Ready::Tcp(port(p)?))
            } else if let Some(text) = t.strip_prefix("stdout:") {
                (!text.is_empty()).then(|| Ready::Stdout(text.to_string()))
            } else {
                ms(t.trim_end_matches("ms").trim().parse().ok()?)
            }
        }
    }
}

/// Refuses a placeholder `command` may not use, pointing at it in the file.
fn check_command(
    command: &Spanned<String>,
    source: &str,
    allowed: &[&str],
    what: &str,
) -> Result<(), BuildError> {
    for (range, name) in placeholders(command.get_ref()) {
        if allowed.contains(&name) {
            continue;
        }
        let span = command.span();
        // The placeholder's own offset in the file: found in the literal's source text (escapes
        // can shift it from its offset in the value), else the literal's start.
        let needle = &command.get_ref()[range.clone()];
        let at = source
            .get(span.clone())
            .and_then(|raw| raw.find(needle))
            .map_or(span.start, |i| span.start + i);
        let known = if CELL_PLACEHOLDERS.contains(&name) {
            format!("`{{{name}}}` is not available in {what}")
        } else {
            format!("unknown placeholder `{{{name}}}` in {what}")
        };
        let list: Vec<String> = allowed.iter().map(|p| format!("{{{p}}}")).collect();
        return Err((
            Some(at..at + needle.len()),
            format!("{known}; it may use {}", list.join(" ")),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"name = "my-p2p-app"
setup = "sh {app_dir}/make-keys.sh {work}"
[server]
run = "my-app serve --listen {server}:4000"
ready = "udp:4000"
[listen]
run = "my-app listen --via {server}:4000 --id b --dir {cell} ${HOME}"
ready = "tcp:4001"
[connect]
run = "my-app connect b --via {server}:4000"
timeout_s = 30
[expect]
"port-restricted-cone/port-restricted-cone" = "relayed"
"#;

    fn parse(text: &str) -> Result<AppSpec, AppFileError> {
        from_toml(text, "app.toml", Path::new("/apps"))
    }

    fn error(text: &str) -> String {
        let e = parse(text).expect_err("an error").to_string();
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        e
    }

    #[test]
    fn the_issues_example_loads() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.name, "my-p2p-app");
        assert_eq!(s.server.as_ref().unwrap().ready, Ready::Udp(4000));
        assert_eq!(s.listen.as_ref().unwrap().ready, Ready::Tcp(4001));
        assert_eq!(s.connect.timeout, Duration::from_secs(30));
        assert_eq!(s.dir, Path::new("/apps"));
        assert_eq!(
            s.expectation("port-restricted-cone", "port-restricted-cone"),
            Some(PathTaken::Relayed)
        );
        assert_eq!(s.expectation("full-cone", "symmetric"), None);
    }

    #[test]
    fn defaults() {
        let s = parse("[connect]\nrun = \"true\"\n[listen]\nrun = \"sleep 9\"\n").unwrap();
        assert_eq!(s.name, "app", "the file's stem");
        assert_eq!(s.listen.unwrap().ready, Ready::Wait(DEFAULT_READY));
        assert_eq!(s.connect.timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(s.server.is_none() && s.setup.is_none());
    }

    #[test]
    fn ready_forms() {
        for (text, want) in [
            ("\"udp:1\"", Ready::Udp(1)),
            ("\"tcp:65535\"", Ready::Tcp(65535)),
            ("250", Ready::Wait(Duration::from_millis(250))),
            ("\"250\"", Ready::Wait(Duration::from_millis(250))),
            ("\"250ms\"", Ready::Wait(Duration::from_millis(250))),
            (
                "\"stdout:registered as b\"",
                Ready::Stdout("registered as b".into()),
            ),
        ] {
            let s = parse(&format!(
                "[server]\nrun = \"x\"\nready = {text}\n[connect]\nrun = \"y\"\n"
            ))
            .unwrap();
            assert_eq!(s.server.unwrap().ready, want, "{text}");
        }
    }

    #[test]
    fn an_unknown_key_is_located() {
        let e = error("[connect]\nrun = \"x\"\ntimeout = 3\n");
        assert!(
            e.starts_with("app.toml:3:1: unknown field `timeout`"),
            "{e}"
        );
        let e = error("nmae = \"x\"\n[connect]\nrun = \"x\"\n");
        assert!(e.starts_with("app.toml:1:1: unknown field `nmae`"), "{e}");
    }

    #[test]
    fn a_missing_connect_is_an_error() {
        let e = error("name = \"x\"\n[listen]\nrun = \"x\"\n");
        assert!(e.starts_with("app.toml:1:1: missing [connect]"), "{e}");
    }

    #[test]
    fn a_missing_run_is_located() {
        let e = error("[connect]\ntimeout_s = 3\n");
        assert!(
            e.starts_with("app.toml:1:1:") && e.contains("missing field `run`"),
            "{e}"
        );
        let e = error("[connect]\nrun = \"  \"\n");
        assert!(
            e.starts_with("app.toml:2:7: [connect] `run` is empty"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_placeholder_is_located_at_itself() {
        let e = error("[connect]\nrun = \"my-app {peer} --x\"\n");
        assert_eq!(
            e,
            "app.toml:2:15: unknown placeholder `{peer}` in [connect]; it may use {server} {a} \
             {b} {cell} {work} {app_dir}"
        );
        // An escape before it does not shift the column.
        let e = error("[connect]\nrun = \"a\\tb {nope}\"\n");
        assert!(
            e.starts_with("app.toml:2:13: unknown placeholder `{nope}`"),
            "{e}"
        );
    }

    #[test]
    fn setup_has_no_cell_placeholders() {
        let e = error("setup = \"make {a}\"\n[connect]\nrun = \"x\"\n");
        assert!(
            e.starts_with(
                "app.toml:1:15: `{a}` is not available in setup; it may use {work} {app_dir}"
            ),
            "{e}"
        );
    }

    #[test]
    fn shell_syntax_is_not_a_placeholder() {
        let s = parse("[connect]\nrun = \"echo ${HOME} {} {a,b} {X} { a }\"\n").unwrap();
        assert_eq!(s.connect.run, "echo ${HOME} {} {a,b} {X} { a }");
    }

    #[test]
    fn bad_ready_values_are_located() {
        for bad in [
            "\"udp:0\"",
            "\"udp:70000\"",
            "\"sctp:4\"",
            "-5",
            "\"soon\"",
            "900000",
            "\"stdout:\"",
        ] {
            let e = error(&format!(
                "[listen]\nrun = \"x\"\nready = {bad}\n[connect]\nrun = \"y\"\n"
            ));
            assert!(e.starts_with("app.toml:3:9: `ready` must be"), "{bad}: {e}");
        }
        let e = error("[connect]\nrun = \"y\"\nready = \"udp:4\"\n");
        assert!(
            e.starts_with("app.toml:3:9: `ready` has no meaning in [connect]"),
            "{e}"
        );
    }

    #[test]
    fn bad_timeouts_are_located() {
        for bad in ["0", "-1", "7200", "\"10\""] {
            let e = error(&format!("[connect]\nrun = \"y\"\ntimeout_s = {bad}\n"));
            assert!(e.starts_with("app.toml:3:13:"), "{bad}: {e}");
        }
        assert_eq!(
            parse("[connect]\nrun = \"y\"\ntimeout_s = 2.5\n")
                .unwrap()
                .connect
                .timeout,
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn bad_expectations_are_located() {
        let e = error("[connect]\nrun = \"y\"\n[expect]\n\"full-cone/nope\" = \"direct\"\n");
        assert!(
            e.starts_with("app.toml:4:1: [expect] key `full-cone/nope`"),
            "{e}"
        );
        let e = error("[connect]\nrun = \"y\"\n[expect]\n\"full-cone/symmetric\" = \"fast\"\n");
        assert!(
            e.starts_with("app.toml:4:25: unknown outcome `fast`"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_and_empty_names_are_located() {
        let e = error("[connect\nrun = 1\n");
        assert!(e.starts_with("app.toml:1:"), "{e}");
        let e = error("name = \"\"\n[connect]\nrun = \"y\"\n");
        assert!(e.starts_with("app.toml:1:8: `name` is empty"), "{e}");
        let e = error("[connect]\nrun = 5\n");
        assert!(e.starts_with("app.toml:2:7:"), "{e}");
    }

    #[test]
    fn placeholders_fill_in() {
        let p = Placeholders {
            server: "198.51.100.1".into(),
            a: "10.1.0.2".into(),
            b: "10.2.0.2".into(),
            cell: "/w/c0".into(),
            work: "/w".into(),
            app_dir: "/apps".into(),
        };
        assert_eq!(
            p.fill("x {server}:4 {a} {b} {cell} {work} {app_dir} ${a} {zz}"),
            "x 198.51.100.1:4 10.1.0.2 10.2.0.2 /w/c0 /w /apps ${a} {zz}"
        );
    }

    #[test]
    fn a_missing_file_says_which() {
        let e = load(Path::new("/nonexistent/app.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read app file /nonexistent/app.toml"),
            "{e}"
        );
    }
}
