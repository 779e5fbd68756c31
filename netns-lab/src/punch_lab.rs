//! `natscope punch` in a lab: the rendezvous + relay server (`punch serve`) on the reflector node
//! `stun`, a listener in node `b` and a connector in node `a`, each host behind its own NAT. This
//! is the one way `lab grid` and the punch lab tests run punch: the same server address, the same
//! readiness checks (the server accepts TCP, the listener reports its registration), the same
//! command lines.
//!
//! The programs are real `natscope` processes. The plain `lab grid` runs them as a built-in app
//! ([`app`]) through the same engine as `lab grid --app` ([`crate::app_run`]); the tests hold
//! them as a process type that prints everything on failure, so the lab is generic over
//! [`NodeProgram`]. Either way the command lines come from [`serve_args`], [`listen_args`] and
//! [`connect_args`], the one place punch's flags are spelled.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natscope_core::net::Transport;
use natscope_core::probe::family::Family;
use natscope_core::punch::connector::ConnectReport;

use crate::app::{AppSpec, Ready, RoleCommand};

use crate::jobs::CapturedOutput;
use crate::netns::NetnsError;
use crate::topology::{NodeSpec, RouterKind, Topology};
use crate::{Lab, LabError};

/// Where `natscope punch serve` listens: the reflector node `stun`'s first address.
pub const SERVER: &str = "198.51.100.1:3490";
/// How long the server may take to accept connections, and the listener to register.
pub const READY: Duration = Duration::from_secs(10);

/// Why a punch lab could not run a step.
#[derive(Debug, thiserror::Error)]
pub enum PunchLabError {
    #[error("{0}")]
    Lab(#[from] LabError),
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error("starting natscope in {node}: {source}")]
    Start {
        node: String,
        source: std::io::Error,
    },
    #[error("punch serve did not accept connections within {READY:?}")]
    ServerNotReady,
    /// The listener did not register; `state` says what the server and the NATs were doing.
    #[error("{state}: punch listen did not register within {READY:?}")]
    NotRegistered { state: String },
}

/// A `natscope` process started in a lab node.
pub trait NodeProgram: Sized {
    /// Starts `exe ARGS` inside `node` of `lab`, stdin closed, stdout and stderr captured.
    fn start(lab: &Lab, node: &str, exe: &Path, args: &[&str]) -> Result<Self, PunchLabError>;
    /// Everything it wrote to stdout so far.
    fn stdout_text(&self) -> String;
    /// Whether it has ended.
    fn has_exited(&mut self) -> bool;
    /// What it said, for an error message (the end of its stderr, or more).
    fn describe(&mut self) -> String;
}

/// What `punch listen` prints on stdout once the server has its registration.
pub const REGISTERED: &str = "registered";
/// How long the grid's `punch connect` may run (it gives up after 8 s itself).
pub const CONNECT_LIMIT: Duration = Duration::from_secs(20);

/// The server's IPv6 address (issue 13): the reflector node's first IPv6 address, where the
/// peers learn their server-reflexive IPv6 address (the rendezvous itself stays on [`SERVER`]).
pub const SERVER6: &str = "[2001:db8:0:1::1]:3490";

/// `punch serve`'s arguments: the server at [`SERVER`].
pub fn serve_args() -> Vec<String> {
    serve_args_in(Family::Ipv4)
}

/// [`serve_args`] for a cell in `family`: over IPv6 the server also listens at [`SERVER6`].
pub fn serve_args_in(family: Family) -> Vec<String> {
    let mut args: Vec<String> = ["punch", "serve", "--listen", SERVER]
        .map(String::from)
        .to_vec();
    if family == Family::Ipv6 {
        args.extend(["--listen", SERVER6].map(String::from));
    }
    args
}

/// The peers' flags for punching in `family` only (issue 13): the labs' hosts are dual-stack,
/// so without them punch tries both families and an IPv4 test could go direct over IPv6.
fn family_args(family: Family) -> Vec<String> {
    match family {
        Family::Ipv4 => vec!["--family".into(), "4".into()],
        Family::Ipv6 => ["--family", "6", "--via6", SERVER6]
            .map(String::from)
            .to_vec(),
    }
}

/// `punch listen`'s arguments: registered as `id` at [`SERVER`], punching over IPv4, then
/// `extra`.
pub fn listen_args(id: &str, extra: &[&str]) -> Vec<String> {
    listen_args_in(id, Family::Ipv4, extra)
}

/// [`listen_args`] punching over `family`.
pub fn listen_args_in(id: &str, family: Family, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["punch", "listen", "--id", id, "--via", SERVER]
        .map(String::from)
        .to_vec();
    args.extend(family_args(family));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `punch connect`'s arguments: to `id` through [`SERVER`], punching over IPv4, a JSON report,
/// then `extra`.
pub fn connect_args(id: &str, extra: &[&str]) -> Vec<String> {
    connect_args_in(id, Family::Ipv4, extra)
}

/// [`connect_args`] punching over `family`.
pub fn connect_args_in(id: &str, family: Family, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["punch", "connect", id, "--via", SERVER, "--json"]
        .map(String::from)
        .to_vec();
    args.extend(family_args(family));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The plain `lab grid`'s program as an app ([`crate::app_run`] runs it like any app file):
/// `punch serve` on `rendezvous` (ready when it accepts TCP), `punch listen` on `b` (ready when
/// it reports its registration), `punch connect` on `a` over `t`, its `natscope.punch/v1`
/// report on stdout.
pub fn app(exe: &Path, t: Transport) -> AppSpec {
    app_in(exe, t, Family::Ipv4)
}

/// [`app`] with punch restricted to `family` (`lab grid --family`, issue 13).
pub fn app_in(exe: &Path, t: Transport, family: Family) -> AppSpec {
    let tcp: &[&str] = if t == Transport::Tcp { &["--tcp"] } else { &[] };
    let line = |args: Vec<String>| {
        std::iter::once(exe.display().to_string())
            .chain(args)
            .map(|a| sh_quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let port = SERVER
        .parse::<SocketAddr>()
        .map_or(3490, |a: SocketAddr| a.port());
    let listen = [&["--json", "--count", "1", "--timeout", "30"], tcp].concat();
    let connect = [&["--timeout", "8"], tcp].concat();
    AppSpec {
        name: match family {
            Family::Ipv4 => format!("natscope-punch-{}", t.as_str()),
            Family::Ipv6 => format!("natscope-punch-{}-ipv6", t.as_str()),
        },
        file: "(built in: natscope punch)".into(),
        dir: std::env::temp_dir(),
        setup: None,
        server: Some(RoleCommand {
            run: line(serve_args_in(family)),
            ready: Ready::Tcp(port),
            timeout: READY,
        }),
        listen: Some(RoleCommand {
            run: line(listen_args_in("b", family, &listen)),
            ready: Ready::Stdout(REGISTERED.into()),
            timeout: READY,
        }),
        connect: RoleCommand {
            run: line(connect_args_in("b", family, &connect)),
            ready: Ready::Wait(Duration::ZERO),
            timeout: CONNECT_LIMIT,
        },
        expect: BTreeMap::new(),
    }
}

/// `arg` as one `sh` word: as it is when it holds only characters the shell leaves alone, else
/// in single quotes (a quote inside as `'\''`). Hand-written: eight lines, and the only quoting
/// the crate needs (a program path with a space must not split).
fn sh_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// A punch lab's topology: the reflector `stun`, then `a` behind `na` and `b` behind `nb`, the NATs
/// on the internet.
pub fn pair(a: RouterKind, b: RouterKind) -> Topology {
    let mut nodes = vec![NodeSpec::Reflector {
        name: "stun".into(),
    }];
    for (nat, host, router) in [("na", "a", a), ("nb", "b", b)] {
        nodes.push(NodeSpec::Nat {
            name: nat.into(),
            parent: None,
            lan: None,
            router,
            port_mapping: Vec::new(),
        });
        nodes.push(NodeSpec::Host {
            name: host.into(),
            parent: Some(nat.into()),
        });
    }
    Topology {
        preset: None,
        nodes,
    }
}

/// A running punch lab: the lab and its rendezvous server.
pub struct PunchLab<P> {
    pub lab: Lab,
    pub server: P,
    exe: PathBuf,
}

impl<P: NodeProgram> PunchLab<P> {
    /// Starts the server on `stun` in `lab` (whose `a` and `b` nodes are the peers) and waits
    /// until it accepts connections.
    pub fn start(lab: Lab, exe: &Path) -> Result<Self, PunchLabError> {
        let server = serve(&lab, exe)?;
        Ok(Self {
            lab,
            server,
            exe: exe.to_path_buf(),
        })
    }

    /// `natscope punch listen --id ID --via SERVER EXTRA...` in node `b`, once registered.
    pub fn listener(&mut self, id: &str, extra: &[&str]) -> Result<P, PunchLabError> {
        listener(&self.lab, &self.exe, Some(&mut self.server), id, extra)
    }

    /// `natscope punch connect ID --via SERVER --json EXTRA...` in node `a` (not waited for).
    pub fn connector(&self, id: &str, extra: &[&str]) -> Result<P, PunchLabError> {
        connector(&self.lab, &self.exe, id, extra)
    }

    /// Stops the server and takes the lab down.
    pub fn down(self) {
        let PunchLab { lab, server, .. } = self;
        drop(server);
        lab.down();
    }
}

/// `natscope punch serve --listen SERVER` on the reflector node `stun`, once it accepts TCP on its
/// address: a listener's first registration must not race the server's bind (a SYN that arrives
/// first is answered with RST, which the grid saw in about one run in three before this wait).
pub fn serve<P: NodeProgram>(lab: &Lab, exe: &Path) -> Result<P, PunchLabError> {
    let node = server_node(lab);
    let args = serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = P::start(lab, node, exe, &args)?;
    let addr: SocketAddr = SERVER.parse().expect("SERVER is an address");
    let ready = lab.node(node)?.run(move || {
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })?;
    if !ready {
        return Err(PunchLabError::ServerNotReady);
    }
    Ok(server)
}

/// The node the server runs on: the lab's reflector (`stun` in [`pair`], `rendezvous` in the
/// grid's pair topology), the first node, which holds [`SERVER`]'s address.
fn server_node(lab: &Lab) -> &str {
    lab.nodes()
        .iter()
        .find(|n| n.role() == crate::topology::Role::Reflector)
        .map_or("stun", |n| n.name())
}

/// `natscope punch listen --id ID --via SERVER EXTRA...` in node `b` of `lab`, once it reports
/// its registration. `server`, the lab's server, is described if the listener never registers.
pub fn listener<P: NodeProgram>(
    lab: &Lab,
    exe: &Path,
    server: Option<&mut P>,
    id: &str,
    extra: &[&str],
) -> Result<P, PunchLabError> {
    let args = listen_args(id, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut listener = P::start(lab, "b", exe, &args)?;
    let deadline = Instant::now() + READY;
    while !listener.stdout_text().contains(REGISTERED) {
        if listener.has_exited() || Instant::now() > deadline {
            let state = state(lab, server, &mut listener);
            return Err(PunchLabError::NotRegistered { state });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(listener)
}

/// `natscope punch connect ID --via SERVER --json EXTRA...` in node `a` of `lab` (not waited for).
pub fn connector<P: NodeProgram>(
    lab: &Lab,
    exe: &Path,
    id: &str,
    extra: &[&str],
) -> Result<P, PunchLabError> {
    let args = connect_args(id, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    P::start(lab, "a", exe, &args)
}

/// What `punch connect --json` printed, read as the connector's `natscope.punch/v1` report.
pub fn connect_report(stdout: &[u8]) -> Result<ConnectReport, serde_json::Error> {
    serde_json::from_slice(stdout)
}

/// Why a listener did not register: its output, the server's, the NATs' counters and the server
/// node's TCP counters (a refused SYN shows there).
fn state<P: NodeProgram>(lab: &Lab, server: Option<&mut P>, listener: &mut P) -> String {
    let (server_state, server_said) = match server {
        Some(s) => {
            let state = if s.has_exited() {
                "the server had exited"
            } else {
                "the server was running"
            };
            (state, s.describe())
        }
        None => ("the server's state is its caller's to tell", String::new()),
    };
    let nats: Vec<String> = lab
        .nodes()
        .iter()
        .filter_map(|n| {
            let st = lab.nat_stats(n.name())?;
            Some(format!(
                "{}: {}",
                n.name(),
                serde_json::to_string(&st).ok()?
            ))
        })
        .collect();
    let snmp = lab
        .node(server_node(lab))
        .ok()
        .and_then(|n| n.run(tcp_counters).ok())
        .unwrap_or_default();
    format!(
        "{}; {server_state}; server: {}; nat counters: {}; stun tcp: {snmp}",
        listener.describe(),
        server_said,
        nats.join(" ")
    )
}

/// The non-zero TCP counters of the calling thread's namespace.
fn tcp_counters() -> String {
    let s = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    let n = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
    let tcp: Vec<&str> = s.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let ext: Vec<&str> = n.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let pair = |v: &[&str]| -> String {
        if v.len() < 2 {
            return String::new();
        }
        v[0].split_whitespace()
            .zip(v[1].split_whitespace())
            .filter(|(_, val)| *val != "0")
            .map(|(k, val)| format!("{k}={val}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("{} {}", pair(&tcp), pair(&ext))
}

/// A [`NodeProgram`] that is killed (by PID) and reaped when dropped, its output collected by two
/// reader threads.
pub struct Peer {
    child: Child,
    output: CapturedOutput,
}

impl Peer {
    /// Waits at most `limit` for the program to end; its stdout, or `None` if it is still running.
    pub fn output_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + limit;
        while !self.has_exited() {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.output.drain();
        Some(self.output.stdout_bytes())
    }

    /// Kills it and returns the last three lines it wrote to stderr.
    pub fn stderr_tail(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.output.drain();
        let text = self.output.stderr();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        if lines.is_empty() {
            "(nothing on stderr)".into()
        } else {
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        }
    }
}

impl NodeProgram for Peer {
    fn start(lab: &Lab, node: &str, exe: &Path, args: &[&str]) -> Result<Self, PunchLabError> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = lab
            .node(node)?
            .spawn(cmd)
            .map_err(|source| PunchLabError::Start {
                node: node.to_string(),
                source,
            })?;
        let output = CapturedOutput::take(&mut child);
        Ok(Self { child, output })
    }

    fn stdout_text(&self) -> String {
        self.output.stdout()
    }

    fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn describe(&mut self) -> String {
        self.stderr_tail()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// The tests' lab shape: the reflector first, then each peer behind its own NAT.
    #[test]
    fn a_pair_puts_each_peer_behind_its_own_nat() {
        let (a, b) = (
            presets::router("full-cone").unwrap(),
            presets::router("symmetric").unwrap(),
        );
        let t = pair(a.clone(), b.clone());
        let names: Vec<&str> = t.nodes.iter().map(NodeSpec::name).collect();
        assert_eq!(names, ["stun", "na", "a", "nb", "b"]);
        match (&t.nodes[2], &t.nodes[3]) {
            (NodeSpec::Host { parent, .. }, NodeSpec::Nat { router, .. }) => {
                assert_eq!(parent.as_deref(), Some("na"));
                assert_eq!(*router, b);
            }
            other => panic!("{other:?}"),
        }
        assert!(t.plan().is_ok());
        assert!(SERVER.parse::<SocketAddr>().is_ok());
    }

    /// The built-in app spells the same command lines the tests' helpers run, quoted for `sh`.
    #[test]
    fn the_built_in_app_runs_punch_s_own_command_lines() {
        let spec = app(Path::new("/opt/my tools/natscope"), Transport::Tcp);
        assert_eq!(
            spec.connect.run,
            "'/opt/my tools/natscope' punch connect b --via 198.51.100.1:3490 --json --family 4 --timeout 8 --tcp"
        );
        let listen = spec.listen.unwrap();
        assert!(listen.run.ends_with(
            "--id b --via 198.51.100.1:3490 --family 4 --json --count 1 --timeout 30 --tcp"
        ));
        assert_eq!(listen.ready, Ready::Stdout(REGISTERED.into()));
        let server = spec.server.unwrap();
        assert_eq!(
            server.run,
            "'/opt/my tools/natscope' punch serve --listen 198.51.100.1:3490"
        );
        assert_eq!(server.ready, Ready::Tcp(3490));
        let udp = app(Path::new("/bin/natscope"), Transport::Udp);
        assert!(!udp.connect.run.contains("--tcp"));
        // Issue 13: an IPv6 cell punches over IPv6 only and the server listens on both families.
        let v6 = app_in(Path::new("/bin/natscope"), Transport::Udp, Family::Ipv6);
        for run in [&v6.connect.run, &v6.listen.unwrap().run] {
            assert!(
                run.contains("--family 6 --via6 '[2001:db8:0:1::1]:3490'"),
                "{run}"
            );
        }
        assert!(v6
            .server
            .unwrap()
            .run
            .ends_with("--listen 198.51.100.1:3490 --listen '[2001:db8:0:1::1]:3490'"));
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
