//! Shared helpers for natscope's end-to-end tests.
//!
//! The tests in `tests/` cross crate and process boundaries: an in-process reflector on real
//! loopback sockets, the `natscope` binary, coturn and Debian's `stun` client. What they share lives
//! here so each test reads as behavior: ports that are free on 127.0.0.1 and 127.0.0.2 (random, with
//! retry on EADDRINUSE), reflectors started on them, child processes that are killed by PID when the
//! test ends (also on panic, after printing their command and output), checks for root and for
//! third-party tools (tests that need them are `#[ignore]`d with the reason, and fail when run
//! without them), and bounded waits that poll for readiness instead of sleeping. All traffic stays
//! on 127.0.0.0/8 (DESIGN.md, "Safety").

#![forbid(unsafe_code)]

pub mod lab;
pub mod punch;
pub mod schema;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use natscope_lab::jobs::CapturedOutput;
use natscope_probes::client::{build_request, BindingResponse, RequestOptions, Rto};
use natscope_probes::reflector::driver::{CounterSnapshot, DriverConfig, RunningReflector};
use natscope_probes::reflector::ReflectorConfig;
use natscope_probes::stun::{MessageType, MessageWriter, TransactionId};
use rand::Rng;

/// The primary server IP (A1) in every loopback test.
pub const A1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// The alternate server IP (A2).
pub const A2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// A client IP of its own: its requests do not share A1's per-IP rate-limit bucket.
pub const A3: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// Environment variable CI sets to `1`: the real `natscope reflect` must then be what interop tests
/// talk to (no fallback to an in-process reflector).
pub const REQUIRE_ALL_ENV: &str = "NATSCOPE_REQUIRE_ALL";

/// Retransmission schedule for loopback transactions that are expected to succeed: first retry
/// after 100 ms, about 2.3 s in all before giving up.
pub const FAST_RTO: Rto = Rto {
    initial: Duration::from_millis(100),
    max_transmits: 5,
    last_wait_multiplier: 8,
    max_rto: Duration::from_millis(400),
};

/// Retransmission schedule for transactions expected to get *no* answer: short, but still more
/// than one transmission, so a negative result is not a single lost datagram (about 1.1 s).
pub const NEGATIVE_RTO: Rto = Rto {
    initial: Duration::from_millis(100),
    max_transmits: 3,
    last_wait_multiplier: 8,
    max_rto: Duration::from_millis(400),
};

/// `SocketAddr` from an IP and a port.
pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

// ---------------------------------------------------------------------------------------------
// Third-party tools
// ---------------------------------------------------------------------------------------------

/// Whether CI asked for every test to run (`NATSCOPE_REQUIRE_ALL=1`).
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1")
}

/// The absolute path of `name` found on `PATH`, if it is an executable file there.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The path of a third-party tool the test needs; panics, naming the Debian package, when it is
/// not installed. A test that needs one is `#[ignore = "needs …"]`: it runs only when asked for
/// (`cargo test -- --include-ignored`, as scripts/test does), and then a missing tool is a
/// failure, never a silent pass.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH; this test needs it (install the Debian package \
             `{package}`: apt-get install {package})"
        )
    })
}

/// Panics unless this process is root, which labs need (network namespaces, veth, packet
/// sockets). Lab tests are `#[ignore = "needs root …"]`; run (`--include-ignored`) without root,
/// they fail rather than pass without testing anything.
pub fn require_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false);
    assert!(
        root,
        "lab tests need root (network namespaces, veth, packet sockets); run them as root"
    );
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// Ports are drawn from below Linux's default ephemeral range (32768–60999), so the clients the
/// tests bind to port 0 never take a port a server is about to use.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Whether binding failed because the address is taken.
pub fn is_addr_in_use(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrInUse || e.to_string().contains("in use")
}

/// A random port, never handed out before by this process, that UDP and TCP can both bind on
/// every IP in `ips` right now. The reflector binds with SO_REUSEPORT, which would silently share
/// a port with another reflector of the same user, so the bookkeeping here matters: two tests in
/// one process never get the same port, and a port anyone holds is skipped. Another process can
/// still take the port before it is used: callers retry on EADDRINUSE.
pub fn free_port(ips: &[IpAddr]) -> u16 {
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(PORT_RANGE);
        let mut taken = handed_out().lock().unwrap_or_else(|p| p.into_inner());
        if taken.contains(&port) {
            continue;
        }
        let bindable = ips.iter().all(|&ip| {
            UdpSocket::bind(sa(ip, port)).is_ok() && TcpListener::bind(sa(ip, port)).is_ok()
        });
        if bindable {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?} on {ips:?} after 1000 tries");
}

/// A port `p` such that UDP can bind `0.0.0.0:p` and `0.0.0.0:p+1` now, for clients that take
/// a port pair on every interface (Debian's `stun` uses its `-p` port and the next one).
pub fn free_udp_port_pair_any() -> u16 {
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(PORT_RANGE.start..PORT_RANGE.end - 1);
        let mut taken = handed_out().lock().unwrap_or_else(|p| p.into_inner());
        if taken.contains(&port) || taken.contains(&(port + 1)) {
            continue;
        }
        if UdpSocket::bind(sa(any, port)).is_ok() && UdpSocket::bind(sa(any, port + 1)).is_ok() {
            taken.insert(port);
            taken.insert(port + 1);
            return port;
        }
    }
    panic!("no free udp port pair in {PORT_RANGE:?} after 1000 tries");
}

/// `n` distinct free ports (see [`free_port`]).
pub fn free_ports<const N: usize>(ips: &[IpAddr]) -> [u16; N] {
    std::array::from_fn(|_| free_port(ips))
}

// ---------------------------------------------------------------------------------------------
// In-process reflector
// ---------------------------------------------------------------------------------------------

/// A [`RunningReflector`] on loopback, with the addresses it was started on.
#[derive(Debug)]
pub struct TestReflector {
    pub reflector: RunningReflector,
    /// A1:P1.
    pub primary: SocketAddr,
    /// A2:P2, when the reflector has an alternate.
    pub alternate: Option<SocketAddr>,
}

impl TestReflector {
    /// A two-address reflector on 127.0.0.1:P1 (primary) and 127.0.0.2:P2 (alternate), default
    /// settings (rate limit on, TCP on), two workers.
    pub fn start() -> Self {
        Self::start_with(true, |_| {})
    }

    /// A reflector with or without an alternate; `configure` adjusts the driver settings. Ports
    /// are chosen at random and the start is retried on EADDRINUSE.
    pub fn start_with(with_alternate: bool, configure: impl Fn(&mut DriverConfig)) -> Self {
        let mut last_err = None;
        for _ in 0..20 {
            let [p1, p2] = free_ports::<2>(&[A1, A2]);
            let primary = sa(A1, p1);
            let alternate = with_alternate.then(|| sa(A2, p2));
            let mut cfg = DriverConfig::new(ReflectorConfig {
                primary,
                alternate,
                partner: None,
            });
            cfg.workers = 2;
            configure(&mut cfg);
            match RunningReflector::start(cfg) {
                Ok(reflector) => {
                    return Self {
                        reflector,
                        primary,
                        alternate,
                    }
                }
                Err(e) if is_addr_in_use(&e) => last_err = Some(e),
                Err(e) => panic!("cannot start the reflector on {primary}/{alternate:?}: {e}"),
            }
        }
        panic!("cannot start the reflector: every port pair was in use (last: {last_err:?})");
    }

    /// A2:P2; panics for a one-address reflector.
    pub fn alt(&self) -> SocketAddr {
        self.alternate
            .expect("this reflector was started without an alternate")
    }

    /// The RFC 5780 address space: A1:P1, A1:P2, A2:P1, A2:P2 (just A1:P1 without an alternate).
    pub fn server_addresses(&self) -> Vec<SocketAddr> {
        match self.alternate {
            None => vec![self.primary],
            Some(alt) => vec![
                self.primary,
                sa(self.primary.ip(), alt.port()),
                sa(alt.ip(), self.primary.port()),
                alt,
            ],
        }
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.reflector.counters()
    }
}

/// RFC 5780 §6 for a four-address server: the address an answer must leave from when a request
/// reached `received_on` with these CHANGE-REQUEST flags.
pub fn expected_source(
    primary: SocketAddr,
    alternate: SocketAddr,
    received_on: SocketAddr,
    change_ip: bool,
    change_port: bool,
) -> SocketAddr {
    let other = |v: IpAddr, a: IpAddr, b: IpAddr| if v == a { b } else { a };
    let ip = if change_ip {
        other(received_on.ip(), primary.ip(), alternate.ip())
    } else {
        received_on.ip()
    };
    let port = if change_port {
        if received_on.port() == primary.port() {
            alternate.port()
        } else {
            primary.port()
        }
    } else {
        received_on.port()
    };
    sa(ip, port)
}

// ---------------------------------------------------------------------------------------------
// STUN exchanges
// ---------------------------------------------------------------------------------------------

/// A tokio UDP socket bound to `ip` on an ephemeral port.
pub async fn udp_client(ip: IpAddr) -> tokio::net::UdpSocket {
    tokio::net::UdpSocket::bind(sa(ip, 0))
        .await
        .unwrap_or_else(|e| panic!("cannot bind a udp client on {ip}: {e}"))
}

/// A Binding request with extra raw attributes written by `extra` (after the RFC 5780 options
/// and before FINGERPRINT). For tests that need what `build_request` cannot express.
pub fn request_with(
    typ: MessageType,
    tid: &TransactionId,
    extra: impl FnOnce(&mut MessageWriter<'_>),
    fingerprint: bool,
) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = MessageWriter::new(&mut buf, typ, tid).expect("buffer fits a header");
    extra(&mut w);
    let len = if fingerprint {
        w.finish_with_fingerprint()
            .expect("buffer fits fingerprint")
    } else {
        w.finish()
    };
    buf.truncate(len);
    buf
}

/// A plain Binding request as bytes.
pub fn binding_request(tid: &TransactionId, opts: &RequestOptions) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let len = build_request(&mut buf, tid, opts).expect("request fits");
    buf.truncate(len);
    buf
}

/// Sends `request` from `socket` to `server` and waits for the answer to `tid` on `listen`
/// (usually the same socket), retransmitting on the [`FAST_RTO`] schedule. `None` when nothing
/// answered within the budget. Datagrams that are not the answer are ignored.
pub async fn exchange_raw(
    socket: &tokio::net::UdpSocket,
    listen: &tokio::net::UdpSocket,
    server: SocketAddr,
    request: &[u8],
    tid: &TransactionId,
    rto: Rto,
) -> Option<BindingResponse> {
    let mut buf = vec![0u8; 65_536];
    let mut wait = rto.initial;
    for transmit in 1..=rto.max_transmits {
        socket
            .send_to(request, server)
            .await
            .unwrap_or_else(|e| panic!("send to {server}: {e}"));
        if transmit == rto.max_transmits {
            wait = (rto.initial * rto.last_wait_multiplier).min(rto.max_rto * 2);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, listen.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) => {
                    if let Ok(r) = BindingResponse::parse(&buf[..n], tid, Some(from)) {
                        return Some(r);
                    }
                }
                // ICMP port unreachable from an earlier send: not an answer.
                Ok(Err(_)) => {}
                Err(_) => break,
            }
        }
        wait = (wait * 2).min(rto.max_rto);
    }
    None
}

/// Whether any datagram arrives on `socket` within `window`.
pub async fn receives_anything(socket: &tokio::net::UdpSocket, window: Duration) -> bool {
    let mut buf = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            Ok(Ok(_)) => return true,
            Ok(Err(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Blocking readiness check: sends Binding requests from `client_ip` to `server` until one is
/// answered or `timeout` passes. Used for servers in other processes.
pub fn wait_until_answering(
    server: SocketAddr,
    client_ip: IpAddr,
    timeout: Duration,
) -> Result<BindingResponse, String> {
    let sock = UdpSocket::bind(sa(client_ip, 0)).map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| format!("set timeout: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    let mut sent = 0u32;
    while Instant::now() < deadline {
        let tid = TransactionId::random();
        let req = binding_request(&tid, &RequestOptions::default());
        // Errors (ICMP unreachable while the server starts) are expected; keep polling.
        let _ = sock.send_to(&req, server);
        sent += 1;
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Ok(r) = BindingResponse::parse(&buf[..n], &tid, Some(from)) {
                        return Ok(r);
                    }
                }
                Err(_) => break,
            }
        }
    }
    Err(format!(
        "{server} did not answer any of {sent} binding requests within {timeout:?}"
    ))
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A scratch directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "natscope-tests-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child process that cannot outlive its test: on drop it is killed by PID and waited for, and
/// if the test is panicking its command line, stdout, stderr and log files are printed first.
#[derive(Debug)]
pub struct ChildProcess {
    command: String,
    child: Child,
    exit: Option<ExitStatus>,
    output: CapturedOutput,
    log_files: Vec<PathBuf>,
}

/// Environment variables whose values never appear in printed command lines.
const SECRET_ENV: &[&str] = &["NATSCOPE_LINK_SECRET"];

/// `VAR=value program args...`, shell-quoted enough to paste, secrets redacted.
pub fn describe_command(cmd: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
            format!("'{}'", s.replace('\'', r"'\''"))
        } else {
            s.into_owned()
        }
    };
    let mut parts = Vec::new();
    for (k, v) in cmd.get_envs() {
        let key = k.to_string_lossy();
        let value = match v {
            Some(_) if SECRET_ENV.contains(&key.as_ref()) => "<redacted>".to_string(),
            Some(v) => quote(v),
            None => continue,
        };
        parts.push(format!("{key}={value}"));
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

impl ChildProcess {
    /// Starts `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(mut cmd: Command) -> io::Result<Self> {
        let command = describe_command(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start `{command}`: {e}")))?;
        let output = CapturedOutput::take(&mut child);
        Ok(Self {
            command,
            child,
            exit: None,
            output,
            log_files: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn command_line(&self) -> &str {
        &self.command
    }

    /// A file the process writes (e.g. coturn's log): included in [`Self::diagnostics`].
    pub fn add_log_file(&mut self, path: impl Into<PathBuf>) {
        self.log_files.push(path.into());
    }

    pub fn stdout(&self) -> String {
        self.output.stdout()
    }

    pub fn stderr(&self) -> String {
        self.output.stderr()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to end on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                self.output.drain();
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process by PID (SIGKILL) if it is still running, and reaps it.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
        self.output.drain();
    }

    /// The command, exit status, output and log files, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = format!(
            "--- child process (pid {}): {}\n--- exit status: {}\n--- stdout:\n{}\n--- stderr:\n{}\n",
            self.child.id(),
            self.command,
            self.exit
                .map_or_else(|| "still running".to_string(), |e| e.to_string()),
            self.stdout(),
            self.stderr()
        );
        for f in &self.log_files {
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| format!("(cannot read: {e})"));
            // Logs can be long; the end is what explains a failure.
            let tail: String = {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(80)..].join("\n")
            };
            s.push_str(&format!(
                "--- log file {} (last 80 lines):\n{tail}\n",
                f.display()
            ));
        }
        s
    }

    /// Polls until every address in `servers` answers a Binding request from `client_ip`,
    /// failing early if the process exits. Bounded by `timeout`.
    pub fn wait_until_answering(
        &mut self,
        servers: &[SocketAddr],
        client_ip: IpAddr,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for &server in servers {
            loop {
                if let Some(status) = self.exited() {
                    self.output.drain();
                    return Err(format!("exited with {status} before answering on {server}"));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!("{server} did not answer within {timeout:?}"));
                }
                if wait_until_answering(server, client_ip, left.min(Duration::from_millis(300)))
                    .is_ok()
                {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

/// The result of running a tool to completion.
#[derive(Debug)]
pub struct ToolRun {
    pub command: String,
    /// `None` when the tool was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl ToolRun {
    /// Exit code, if the tool exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// The command and everything it printed, for assertion messages.
    pub fn report(&self) -> String {
        format!(
            "--- command: {}\n--- exit status: {}\n--- stdout:\n{}\n--- stderr:\n{}\n",
            self.command,
            self.status
                .map_or_else(|| "killed at timeout".to_string(), |s| s.to_string()),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd` to completion, killing it (by PID) after `timeout`.
pub fn run_tool(cmd: Command, timeout: Duration) -> ToolRun {
    let mut child = ChildProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let status = child.wait_timeout(timeout);
    child.kill();
    ToolRun {
        command: child.command_line().to_string(),
        status,
        stdout: child.stdout(),
        stderr: child.stderr(),
    }
}

// ---------------------------------------------------------------------------------------------
// The natscope binary
// ---------------------------------------------------------------------------------------------

/// Where cargo puts the workspace's `natscope` binary: next to this test executable's `deps/`
/// directory (`target/<profile>/natscope`). `cargo test --workspace` builds it before running
/// tests; `cargo test -p natscope-tests` alone does not (it may then be missing or stale).
pub fn natscope_bin_path() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe.parent().expect("the test executable is in a directory");
    let profile_dir = deps.parent().unwrap_or(deps);
    profile_dir.join(format!("natscope{}", std::env::consts::EXE_SUFFIX))
}

/// The `natscope` binary; panics with instructions when it has not been built.
pub fn natscope_bin() -> PathBuf {
    let p = natscope_bin_path();
    assert!(
        is_executable(&p),
        "the natscope binary is not at {}: build it with `cargo build -p natscope` (or run \
         `cargo test --workspace`, which builds it)",
        p.display()
    );
    p
}

/// The `natscope` binary if it is built and has a working `reflect` subcommand (checked once).
pub fn natscope_reflect_available() -> Option<PathBuf> {
    static CHECK: OnceLock<Option<PathBuf>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            let p = natscope_bin_path();
            if !is_executable(&p) {
                return None;
            }
            let mut cmd = Command::new(&p);
            cmd.args(["reflect", "--help"]);
            let run = run_tool(cmd, Duration::from_secs(10));
            (run.code() == Some(0)).then_some(p)
        })
        .clone()
}

/// Starts `natscope reflect <args>` (with `env`) and waits until every address in `ready`
/// answers. `args` is built from fresh free ports on each attempt; a start that fails (a port
/// taken by another process in between, typically) is retried with new ports.
pub fn spawn_natscope_reflect<T>(
    attempts: usize,
    mut setup: impl FnMut() -> (Vec<String>, Vec<(String, String)>, Vec<SocketAddr>, T),
) -> (ChildProcess, T) {
    let bin = natscope_bin();
    let mut failures = Vec::new();
    for _ in 0..attempts {
        let (args, env, ready, extra) = setup();
        let mut cmd = Command::new(&bin);
        cmd.arg("reflect").args(&args);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = ChildProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
        match child.wait_until_answering(&ready, A3, Duration::from_secs(5)) {
            Ok(()) => return (child, extra),
            Err(e) => {
                child.kill();
                failures.push(format!("{e}\n{}", child.diagnostics()));
            }
        }
    }
    panic!(
        "natscope reflect did not become ready in {attempts} attempts:\n{}",
        failures.join("\n")
    );
}

/// The reflector an interop test talks to: the `natscope` binary when it is built (the real
/// deployment), else an in-process [`RunningReflector`] (same code, no CLI).
#[derive(Debug)]
pub enum ReflectorUnderTest {
    Binary {
        child: ChildProcess,
        primary: SocketAddr,
        alternate: SocketAddr,
    },
    InProcess(TestReflector),
}

impl ReflectorUnderTest {
    /// Starts a two-address reflector on 127.0.0.1:P1 + 127.0.0.2:P2 and prints which kind.
    pub fn start() -> Self {
        match natscope_reflect_available() {
            Some(_) => {
                let (child, (primary, alternate)) = spawn_natscope_reflect(3, || {
                    let [p1, p2] = free_ports::<2>(&[A1, A2]);
                    let (primary, alternate) = (sa(A1, p1), sa(A2, p2));
                    let args = vec![
                        "--primary".into(),
                        primary.to_string(),
                        "--alternate".into(),
                        alternate.to_string(),
                    ];
                    (
                        args,
                        Vec::new(),
                        vec![primary, alternate],
                        (primary, alternate),
                    )
                });
                eprintln!("reflector under test: `{}`", child.command_line());
                Self::Binary {
                    child,
                    primary,
                    alternate,
                }
            }
            None => {
                // In CI the real deployment must be what is tested: no quiet fallback.
                assert!(
                    !require_all(),
                    "the natscope binary with `reflect` is not built; {REQUIRE_ALL_ENV}=1 needs it"
                );
                let r = TestReflector::start();
                eprintln!(
                    "reflector under test: in-process RunningReflector on {} + {} \
                     (the natscope binary with `reflect` is not built)",
                    r.primary,
                    r.alt()
                );
                Self::InProcess(r)
            }
        }
    }

    pub fn primary(&self) -> SocketAddr {
        match self {
            Self::Binary { primary, .. } => *primary,
            Self::InProcess(r) => r.primary,
        }
    }

    pub fn alternate(&self) -> SocketAddr {
        match self {
            Self::Binary { alternate, .. } => *alternate,
            Self::InProcess(r) => r.alt(),
        }
    }

    /// Counters, when the reflector runs in this process.
    pub fn counters(&self) -> Option<CounterSnapshot> {
        match self {
            Self::Binary { .. } => None,
            Self::InProcess(r) => Some(r.counters()),
        }
    }

    /// What to print when an assertion about this reflector fails.
    pub fn diagnostics(&self) -> String {
        match self {
            Self::Binary { child, .. } => child.diagnostics(),
            Self::InProcess(r) => format!(
                "in-process reflector on {} + {:?}, counters {:?}",
                r.primary,
                r.alternate,
                r.counters()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_source_follows_rfc5780_section_6() {
        let p: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let a: SocketAddr = "127.0.0.2:2000".parse().unwrap();
        let cases = [
            (p, false, false, "127.0.0.1:1000"),
            (p, true, false, "127.0.0.2:1000"),
            (p, false, true, "127.0.0.1:2000"),
            (p, true, true, "127.0.0.2:2000"),
            (a, true, true, "127.0.0.1:1000"),
            (sa(A2, 1000), false, true, "127.0.0.2:2000"),
        ];
        for (to, ip, port, want) in cases {
            assert_eq!(
                expected_source(p, a, to, ip, port).to_string(),
                want,
                "{to} ip={ip} port={port}"
            );
        }
    }

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports = free_ports::<8>(&[A1, A2]);
        let set: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(set.len(), ports.len());
        for p in ports {
            assert!(PORT_RANGE.contains(&p));
            UdpSocket::bind(sa(A2, p)).expect("still free");
        }
    }

    #[test]
    fn secrets_are_redacted_from_command_lines() {
        let mut cmd = Command::new("natscope");
        cmd.env("NATSCOPE_LINK_SECRET", "hunter2")
            .env("RUST_LOG", "debug")
            .args(["reflect", "--primary", "127.0.0.1:1"]);
        let s = describe_command(&cmd);
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("NATSCOPE_LINK_SECRET=<redacted>"), "{s}");
        assert!(s.ends_with("natscope reflect --primary 127.0.0.1:1"), "{s}");
    }

    #[test]
    fn child_processes_are_killed_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let child = ChildProcess::spawn(cmd).expect("sleep runs");
        let pid = child.pid();
        drop(child);
        // Reaped: /proc has no entry for it any more (or a different process reused the pid).
        let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.starts_with("sleep"));
        assert!(!alive, "pid {pid} survived the drop");
    }
}

/// coturn as an RFC 5780 server on 127.0.0.1:P1 + 127.0.0.2:P2 (UDP; also TCP with
/// [`Coturn::start_with_tcp`]), killed by PID on drop. `-n`
/// ignores Debian's /etc/turnserver.conf (which sets `no-rfc5780`); two `-L` give it the alternate
/// IP that OTHER-ADDRESS needs. Callers check `require_tool("turnserver", "coturn")` first.
#[derive(Debug)]
pub struct Coturn {
    pub child: ChildProcess,
    pub primary: SocketAddr,
    pub alternate: SocketAddr,
    /// Holds coturn's pid, log and user-db files; removed on drop.
    pub dir: TempDir,
}

impl Coturn {
    /// UDP only (`--no-tcp`).
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// UDP and TCP (STUN over TCP on the same four addresses), for `natscope probe --tcp`. Ready
    /// once UDP answers and a TCP connect succeeds on the primary and the alternate.
    pub fn start_with_tcp() -> Self {
        Self::start_inner(true)
    }

    fn start_inner(tcp: bool) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let dir = TempDir::new("coturn");
            let [p1, p2] = free_ports::<2>(&[A1, A2]);
            let d = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
            let mut cmd = Command::new("turnserver");
            cmd.args(["-n", "--stun-only", "--no-auth"])
                .args(["-L", "127.0.0.1", "-L", "127.0.0.2"])
                .args(["--listening-port", &p1.to_string()])
                .args(["--alt-listening-port", &p2.to_string()])
                .args(["--no-cli", "--no-tls", "--no-dtls"])
                .args(if tcp { &[][..] } else { &["--no-tcp"][..] })
                .args(["--userdb", &d("turndb")])
                .args(["--pidfile", &d("turnserver.pid")])
                .args(["--log-file", &d("turnserver.log"), "--simple-log"]);
            let mut child = ChildProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
            child.add_log_file(dir.path().join("turnserver.log"));
            let (primary, alternate) = (sa(A1, p1), sa(A2, p2));
            let ready = child
                .wait_until_answering(&[primary, alternate], A1, Duration::from_secs(10))
                .and_then(|()| {
                    if tcp {
                        wait_until_tcp_accepts(&[primary, alternate], Duration::from_secs(5))
                    } else {
                        Ok(())
                    }
                });
            match ready {
                Ok(()) => {
                    return Self {
                        child,
                        primary,
                        alternate,
                        dir,
                    }
                }
                Err(e) => {
                    child.kill();
                    failures.push(format!("{e}\n{}", child.diagnostics()));
                }
            }
        }
        panic!("coturn did not start:\n{}", failures.join("\n"));
    }
}

/// Polls until a TCP connect to every address in `addrs` succeeds, or `timeout` passes (each
/// attempt bounded by the time left, at most 300 ms; the connections are closed at once).
pub fn wait_until_tcp_accepts(addrs: &[SocketAddr], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    for &a in addrs {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{a} did not accept tcp within {timeout:?}"));
            }
            let wait = left.min(Duration::from_millis(300));
            if std::net::TcpStream::connect_timeout(&a, wait).is_ok() {
                break;
            }
            // Refused at once while the server starts: pause briefly instead of spinning.
            std::thread::sleep(Duration::from_millis(20).min(left));
        }
    }
    Ok(())
}

/// Runs the probe engine (natscope_probes::probe::driver) against `server` with default settings.
pub fn probe_engine(server: SocketAddr) -> natscope_probes::probe::ProbeReport {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cfg = natscope_probes::probe::ProbeConfig::new(server);
    rt.block_on(natscope_probes::probe::driver::run(cfg, |_| {}))
        .unwrap_or_else(|e| panic!("probe of {server}: {e}"))
}
