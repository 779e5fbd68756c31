#![cfg(unix)]
//! The conventions of a command-line tool (issue 16), through the real binary: `NO_COLOR` on a
//! terminal, shell completions and the man page, and the "Exit status" and examples `--help` shows
//! (README's "Exit status" must be the same text). Loopback only; every child is bounded in time
//! and stopped by its pid.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_natscope");

fn natscope(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().expect("run natscope");
    assert!(
        out.status.success(),
        "natscope {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(args: &[&str]) -> String {
    String::from_utf8(natscope(args).stdout).expect("utf-8 output")
}

/// Runs natscope with `args`, stdout and stderr on a pseudo-terminal, and returns everything it
/// wrote there. With `stop_at`, it is sent SIGTERM once its output shows that text (a server);
/// else it runs to its end. Bounded: killed and reported after 20 s.
fn on_a_terminal(args: &[&str], no_color: Option<&str>, stop_at: Option<&str>) -> String {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup the pty"));
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(slave(&pty.slave))
        .stderr(slave(&pty.slave));
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut child = cmd.spawn().expect("start natscope");
    drop(cmd);
    drop(pty.slave);
    // The reader ends at EOF (EIO on Linux) once the child, the last holder of the slave, exits.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut master = std::fs::File::from(pty.master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut stopped = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => seen.extend(chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(text) = stop_at.filter(|_| !stopped) {
            if String::from_utf8_lossy(&seen).contains(text) {
                kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
                stopped = true;
            }
        }
    }
    // The terminal closes as the child exits, a moment before its status can be collected.
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "natscope {args:?} did not end within 20 s; it wrote:\n{}",
            String::from_utf8_lossy(&seen)
        );
    }
    String::from_utf8_lossy(&seen).into_owned()
}

const REFLECT: [&str; 6] = [
    "reflect",
    "--primary",
    "127.0.0.1:0",
    "--no-tcp",
    "--workers",
    "1",
];

#[test]
fn no_color_on_a_terminal_means_no_escape_sequences() {
    let plain = on_a_terminal(&REFLECT, Some("1"), Some("serving"));
    assert!(plain.contains("stopped"), "no final counters:\n{plain}");
    assert!(
        !plain.contains('\x1b'),
        "escape sequences with NO_COLOR=1:\n{plain:?}"
    );
    // The control: the same terminal without NO_COLOR (or with it empty) gets colours, so the
    // assertion above is about NO_COLOR and not about a terminal that never shows any.
    for unset in [None, Some("")] {
        let coloured = on_a_terminal(&REFLECT, unset, Some("serving"));
        assert!(
            coloured.contains("\x1b["),
            "no colours with NO_COLOR={unset:?}:\n{coloured:?}"
        );
    }
    // Help (clap's styles) and a table (comfy-table, `demo` on 127.0.0.1 + 127.0.0.2) too.
    let help = on_a_terminal(&["probe", "--help"], Some("1"), None);
    assert!(
        help.contains("Exit status") && !help.contains('\x1b'),
        "{help:?}"
    );
    assert!(on_a_terminal(&["probe", "--help"], None, None).contains("\x1b["));
    let demo = on_a_terminal(&["demo"], Some("1"), None);
    assert!(
        demo.contains("RESPONSE-ORIGIN") && !demo.contains('\x1b'),
        "{demo:?}"
    );
}

#[test]
fn completions_are_generated_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout(&["completions", shell]);
        assert!(script.len() > 1000, "{shell}: {} bytes", script.len());
        for word in ["probe", "reflect", "punch", "completions", "verbose"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
        assert!(
            !script.contains("serve --name"),
            "{shell}: the hidden supervisor leaked"
        );
    }
}

/// What bash offers after `words` (the last one being typed), by running the generated script's
/// completion function the way bash's `complete -F` does.
#[cfg(all(feature = "lab", target_os = "linux"))]
fn bash_offers(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prev = words.len().saturating_sub(2);
    let program = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _natscope natscope '{}' '{}'; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[prev],
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[cfg(all(feature = "lab", target_os = "linux"))]
#[test]
fn completions_list_the_presets_and_transports() {
    let script = std::env::temp_dir().join(format!("natscope-bash-{}", std::process::id()));
    std::fs::write(&script, stdout(&["completions", "bash"])).expect("write the script");
    let presets: Vec<String> = natscope_lab::presets::names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let up = bash_offers(&script, &["natscope", "lab", "up", ""]);
    let grid = bash_offers(&script, &["natscope", "lab", "grid", "--presets", ""]);
    let transports = bash_offers(&script, &["natscope", "lab", "grid", "--transport", ""]);
    let _ = std::fs::remove_file(&script);
    for p in &presets {
        assert!(up.contains(p), "`lab up <TAB>` lacks {p}: {up:?}");
    }
    assert_eq!(grid, presets, "`lab grid --presets <TAB>`");
    assert_eq!(transports, ["udp", "tcp"], "`lab grid --transport <TAB>`");
    let zsh = stdout(&["completions", "zsh"]);
    assert!(
        zsh.contains("port-restricted-cone"),
        "zsh completion lacks the presets"
    );
}

#[test]
fn man_page_is_roff_naming_every_command() {
    let man = stdout(&["man"]);
    assert!(
        man.starts_with(".ie") || man.starts_with(".TH"),
        "{}",
        &man[..80.min(man.len())]
    );
    assert!(man.contains(".TH natscope"));
    for word in ["probe", "reflect", "demo", "punch", "bench", "completions"] {
        assert!(man.contains(word), "man page lacks {word}");
    }
    assert!(
        man.contains("Exit status"),
        "man page lacks the exit status"
    );
    // `--dir`: the pages the main page's SUBCOMMANDS section refers to, one file each.
    let dir = std::env::temp_dir().join(format!("natscope-man-{}", std::process::id()));
    natscope(&["man", "--dir", &dir.to_string_lossy()]);
    for page in ["natscope.1", "natscope-probe.1", "natscope-punch-connect.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page} is missing or empty");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The lines between "## Exit status" and the next heading of README.md, inside its code block.
fn readme_exit_status() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("## Exit status")
        .expect("README has an Exit status section");
    let body = &readme[start..];
    let open = body.find("```text\n").expect("a text block") + "```text\n".len();
    let close = body[open..].find("```").expect("its end") + open;
    body[open..close].to_string()
}

#[test]
fn readme_exit_status_is_the_help_text() {
    let help = stdout(&["--help"]);
    let section = readme_exit_status();
    assert!(
        help.contains(section.trim_end()),
        "README's Exit status and `natscope --help` differ:\n--- README\n{section}\n--- help\n{help}"
    );
    for command in [
        "probe",
        "reflect",
        "demo",
        "punch connect",
        "lab grid",
        "lab matrix",
        "bench reflect",
        "bench lab",
        "lab exec",
    ] {
        assert!(
            section.contains(command),
            "Exit status does not cover `{command}`"
        );
    }
}

#[test]
fn main_commands_show_exit_status_and_examples() {
    let mut commands = vec![
        vec!["probe"],
        vec!["reflect"],
        vec!["demo"],
        vec!["punch"],
        vec!["punch", "connect"],
        vec!["bench", "reflect"],
    ];
    if cfg!(all(feature = "lab", target_os = "linux")) {
        commands.extend([
            vec!["lab"],
            vec!["lab", "up"],
            vec!["lab", "grid"],
            vec!["lab", "matrix"],
            vec!["bench", "lab"],
        ]);
    }
    for c in commands {
        let help = stdout(&[c.as_slice(), &["--help"]].concat());
        assert!(
            help.contains("Exit status:"),
            "`{} --help` has no exit status",
            c.join(" ")
        );
        let examples = ["probe", "reflect", "lab up", "lab grid", "punch"];
        if examples.contains(&c.join(" ").as_str()) {
            assert!(
                help.contains("Examples:") && help.contains(&format!("  natscope {}", c.join(" "))),
                "`{} --help` has no examples:\n{help}",
                c.join(" ")
            );
        }
    }
}

/// SIGTERM by pid, then SIGKILL if it is still running after 5 s.
fn stop(child: &mut std::process::Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A loopback port free for both UDP and TCP right now.
fn free_port() -> u16 {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("local addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port free for both udp and tcp");
}

#[test]
fn punch_via_takes_a_host_name_like_probe() {
    let out = Command::new(BIN)
        .args(["punch", "connect", "nobody", "--via", "nohost"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "natscope: error: \"nohost\" has no port: give HOST:PORT (the standard punch port is 3490)\n"
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Command::new(BIN)
        .args(["punch", "serve", "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start punch serve");
    let via = format!("localhost:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    // `localhost` resolves (IPv4 preferred) to the server, which answers that nobody registered:
    // exit 1, the session failed, not 2, the server unreachable. Retried until the server is up.
    let result = loop {
        let out = Command::new(BIN)
            .args([
                "punch",
                "connect",
                "nobody",
                "--via",
                &via,
                "--timeout",
                "2",
            ])
            .output()
            .expect("run punch connect");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() == Some(1) || Instant::now() > deadline {
            break (out.status.code(), err);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop(&mut server);
    assert_eq!(result.0, Some(1), "{}", result.1);
    assert!(
        result
            .1
            .contains(&format!("no peer registered as `nobody` at {listen}")),
        "{}",
        result.1
    );
}
