//! Helpers for tests that run inside natscope labs: the root check (re-exported), unique lab
//! names, and small blocking UDP/TCP probes made of plain sockets (not the NAT probe), so a lab's
//! behavior is measured independently of the code it is used to test.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use natscope_lab::{presets, Lab, LabOptions};
use rand::Rng;

use crate::natscope_bin;

/// How long a test waits for a datagram that should *not* arrive. Lab paths answer in well under
/// a millisecond, and every negative check has a positive control on the same path.
pub const SILENCE: Duration = Duration::from_millis(300);
/// How long a test waits for a datagram that should arrive.
pub const ARRIVAL: Duration = Duration::from_secs(2);

pub use crate::require_root;

/// A lab name unique to this test run: `prefix` plus random characters (10 at most).
pub fn lab_name(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let keep: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(5)
        .collect();
    let tail: String = (0..(10 - keep.len()).min(5))
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)]))
        .collect();
    format!("{keep}{tail}").to_ascii_lowercase()
}

pub fn options() -> LabOptions {
    LabOptions {
        natscope_bin: Some(natscope_bin()),
        ..Default::default()
    }
}

/// Brings a preset up under a fresh name.
pub fn up_preset(preset: &str) -> Lab {
    let topo = presets::preset(preset).unwrap_or_else(|| panic!("no preset {preset}"));
    let plan = topo.plan().expect("presets plan");
    Lab::up(&lab_name(preset), plan, options()).expect("lab up")
}

/// A UDP socket bound inside `node`.
pub fn udp(lab: &Lab, node: &str, addr: SocketAddr) -> UdpSocket {
    let s = lab
        .node(node)
        .expect("node")
        .udp_bind(addr)
        .unwrap_or_else(|e| panic!("bind {addr} in {node}: {e}"));
    s.set_read_timeout(Some(ARRIVAL)).expect("timeout");
    s
}

/// Receives one datagram within `wait`, or `None`.
pub fn recv_within(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).ok()?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) => return Some((buf[..n].to_vec(), from)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            // ICMP errors surface as ECONNREFUSED on some sockets; keep waiting.
            Err(_) => continue,
        }
    }
}

/// Sends `payload` from `from` to `to` and returns the source address `to` saw (the mapping).
pub fn observed_source(from: &UdpSocket, to: &UdpSocket) -> SocketAddr {
    let dst = to.local_addr().expect("addr");
    let token: u64 = rand::thread_rng().gen();
    let msg = token.to_be_bytes();
    // A few tries: the first packet may wait for ARP at the NAT; nothing here is lossy.
    for _ in 0..3 {
        from.send_to(&msg, dst).expect("send");
        if let Some((got, src)) = recv_within(to, ARRIVAL) {
            if got == msg {
                return src;
            }
        }
    }
    panic!("no datagram from {:?} reached {dst}", from.local_addr());
}

/// Whether a datagram from `from` to `to_addr` reaches `to` within [`SILENCE`] (for negatives) or
/// [`ARRIVAL`] (when `expect` is true, so a slow positive is not mistaken for a negative).
pub fn reaches(from: &UdpSocket, to_addr: SocketAddr, to: &UdpSocket, expect: bool) -> bool {
    let token: u64 = rand::thread_rng().gen();
    let msg = token.to_be_bytes();
    from.send_to(&msg, to_addr).expect("send");
    let wait = if expect { ARRIVAL } else { SILENCE };
    let deadline = Instant::now() + wait;
    while let Some((got, _)) = recv_within(to, deadline.saturating_duration_since(Instant::now())) {
        if got == msg {
            return true;
        }
    }
    false
}

/// A TCP echo listener inside `node`; serves `n` connections on a thread, then stops.
pub fn tcp_echo(lab: &Lab, node: &str, addr: SocketAddr, n: usize) -> std::thread::JoinHandle<()> {
    let l: TcpListener = lab
        .node(node)
        .expect("node")
        .run(move || TcpListener::bind(addr))
        .expect("ns")
        .expect("listen");
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = c.set_read_timeout(Some(ARRIVAL));
            let mut buf = [0u8; 4096];
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 || c.write_all(&buf[..k]).is_err() {
                    break;
                }
            }
        }
    })
}

/// Connects from `node` to `to` (creating the socket in the node), with a timeout.
pub fn tcp_connect(lab: &Lab, node: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    lab.node(node)
        .expect("node")
        .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// The lab's reflector node's two addresses (for plain sockets bound on them).
pub fn reflector_ips(lab: &Lab) -> (Ipv4Addr, Ipv4Addr) {
    let (a, b) = lab.stun_addresses("stun").expect("reflector");
    match (a.ip(), b.ip()) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => (a, b),
        _ => panic!("ipv4 reflector"),
    }
}

/// A lab with one reflector `stun`, one userspace NAT `nat` configured by `config`, and `h1`,
/// `h2` behind it: for tests that need engine settings no preset has (short timeouts, inbound
/// refresh).
pub fn up_engine_lab(prefix: &str, config: natscope_lab::topology::EngineConfig) -> Lab {
    Lab::builder(&lab_name(prefix))
        .natscope_bin(natscope_bin())
        .reflector("stun")
        .router(
            "nat",
            None,
            natscope_lab::topology::RouterKind::Engine(config),
        )
        .host("h1", Some("nat"))
        .host("h2", Some("nat"))
        .up()
        .expect("lab up")
}

/// A lab with a `linux` router `gw` running the real miniupnpd with `services` (Debian's
/// `miniupnpd-nftables`), a host `h` behind it and a host `pub` on the internet; add more nodes
/// (a reflector) before `.up()`.
pub fn miniupnpd_lab(
    prefix: &str,
    services: &[natscope_lab::topology::PortMappingService],
) -> natscope_lab::LabBuilder {
    crate::require_root();
    crate::require_tool("miniupnpd", "miniupnpd-nftables");
    crate::require_tool("nft", "nftables");
    Lab::builder(&lab_name(prefix))
        .natscope_bin(natscope_bin())
        .router("gw", None, natscope_lab::topology::RouterKind::Linux)
        .port_mapping(services)
        .host("h", Some("gw"))
        .host("pub", None)
}

/// `gw`'s external and LAN addresses and `h`'s, in a [`miniupnpd_lab`].
pub fn gw_addresses(lab: &Lab) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
    let gw = lab.node("gw").expect("gw");
    let ext = gw.address().expect("gw's external address");
    let lan = gw.plan().lan.expect("gw's lan").addr;
    let host = lab.node("h").expect("h").address().expect("h's address");
    (ext, lan, host)
}

/// Whether a datagram from a fresh socket on the public host `pub` to `external` arrives on
/// `inside` within `wait` (sent again every 200 ms: the first may wait for ARP).
pub fn arrives_from_pub(
    lab: &Lab,
    inside: &UdpSocket,
    external: SocketAddr,
    wait: Duration,
) -> bool {
    let sender = udp(lab, "pub", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let payload = rand::thread_rng().gen::<u64>().to_be_bytes();
    inside
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let _ = sender.send_to(&payload, external);
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = inside.recv_from(&mut buf) {
            if buf[..n] == payload {
                return true;
            }
        }
    }
    false
}

/// Runs the built `natscope` with `args` and returns what it did.
pub fn natscope(args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::natscope_bin())
        .args(args)
        .output()
        .expect("run natscope")
}

/// Exit status, stdout and stderr of `o`, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `natscope lab grid --json` with `args`, checks the document against the published schema
/// and returns it with the process's output (for exit-status assertions).
pub fn run_grid(args: &[&str]) -> (natscope_lab::grid::GridDocument, std::process::Output) {
    let out = natscope(&[&["lab", "grid", "--json"], args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    crate::schema::assert_valid_text(&stdout);
    let doc = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a natscope.grid document ({e}):\n{}", text(&out)));
    (doc, out)
}

/// PIDs of the live processes whose command line contains `marker` (a zombie's is empty), for
/// tests that start processes with a marker no one else uses and then check none is left.
pub fn processes_with(marker: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(marker)
                .then_some(pid)
        })
        .filter(|pid| *pid != std::process::id() as i32)
        .collect()
}

/// Kills every process [`processes_with`] `marker` when dropped (through pidfds,
/// [`natscope_lab::registry::kill_all`]), so a failing test leaves none of its processes behind.
pub struct KillMarked(pub String);

impl Drop for KillMarked {
    fn drop(&mut self) {
        natscope_lab::registry::kill_all(&processes_with(&self.0));
    }
}

/// Runs a command and returns its stdout with the fields that change by themselves (address
/// lifetimes, route expiry, counters) removed.
fn capture(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = Vec::new();
    for line in text.lines() {
        let mut words = Vec::new();
        let mut skip = 0;
        for w in line.split_whitespace() {
            if skip > 0 {
                skip -= 1;
                continue;
            }
            if matches!(
                w,
                "valid_lft" | "preferred_lft" | "expires" | "used" | "age"
            ) {
                skip = 1;
                continue;
            }
            words.push(w);
        }
        lines.push(words.join(" "));
    }
    lines.join("\n")
}

/// Every readable sysctl under /proc/sys/net/{ipv4,ipv6,core} except counters.
fn sysctls() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<std::path::PathBuf> = ["ipv4", "ipv6", "core"]
        .iter()
        .map(|d| std::path::Path::new("/proc/sys/net").join(d))
        .collect();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if let Ok(v) = std::fs::read_to_string(&p) {
            let key = p.display().to_string();
            // Randomness and hash seeds are not configuration.
            if key.ends_with("/random") || key.contains("stable_secret") {
                continue;
            }
            out.push((key, v));
        }
    }
    out.sort();
    out
}

/// The configured entries of `ip -6 neigh show` output: permanent and no-ARP ones, which only an
/// administrator (or a lab that broke the rules) adds. Learned entries (REACHABLE, STALE, …)
/// come and go with the machine's own traffic and are left out; so are their counters.
pub fn configured_neighbors(text: &str) -> String {
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            let state = l.split_whitespace().last().unwrap_or_default();
            matches!(state, "PERMANENT" | "NOARP")
        })
        .collect();
    lines.sort_unstable();
    lines.join("\n")
}

/// Every `/proc/sys/net/ipv6` key of a sysctl snapshot (what the IPv6 half of the safety check
/// compares).
pub fn ipv6_sysctls(sysctls: &[(String, String)]) -> Vec<&str> {
    sysctls
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("/proc/sys/net/ipv6/"))
        .collect()
}

/// What a lab must never change in the root namespace: links, addresses, routes, rules,
/// configured and proxy neighbors (IPv6: a lab's NDP must stay in its namespaces), the firewall
/// and the network sysctls (net.ipv4, net.ipv6, net.core).
#[derive(Debug, PartialEq)]
pub struct RootState {
    links: String,
    addresses: String,
    routes4: String,
    routes6: String,
    rules4: String,
    rules6: String,
    neighbors6: String,
    proxy_neighbors6: String,
    nft: String,
    sysctls: Vec<(String, String)>,
}

impl RootState {
    /// The root namespace now (needs `ip` and `nft`).
    pub fn snapshot() -> Self {
        Self {
            links: capture(&["ip", "-d", "-o", "link", "show"]),
            addresses: capture(&["ip", "-o", "addr", "show"]),
            routes4: capture(&["ip", "-4", "route", "show", "table", "all"]),
            routes6: capture(&["ip", "-6", "route", "show", "table", "all"]),
            rules4: capture(&["ip", "-4", "rule", "show"]),
            rules6: capture(&["ip", "-6", "rule", "show"]),
            neighbors6: configured_neighbors(&capture(&["ip", "-6", "neigh", "show"])),
            proxy_neighbors6: capture(&["ip", "-6", "neigh", "show", "proxy"]),
            nft: capture(&["nft", "list", "ruleset"]),
            sysctls: sysctls(),
        }
    }

    /// Fails, naming what differs, unless the root namespace is as in `before`.
    pub fn assert_unchanged_since(&self, before: &RootState) {
        assert_eq!(before.links, self.links);
        assert_eq!(before.addresses, self.addresses);
        assert_eq!(before.routes4, self.routes4);
        assert_eq!(before.routes6, self.routes6);
        assert_eq!(before.rules4, self.rules4);
        assert_eq!(before.rules6, self.rules6);
        assert_eq!(
            before.neighbors6, self.neighbors6,
            "root IPv6 neighbors changed"
        );
        assert_eq!(before.proxy_neighbors6, self.proxy_neighbors6);
        assert_eq!(before.nft, self.nft);
        assert!(
            !ipv6_sysctls(&self.sysctls).is_empty(),
            "the snapshot must cover net.ipv6 (is IPv6 compiled out?)"
        );
        let changed: Vec<_> = before
            .sysctls
            .iter()
            .zip(self.sysctls.iter())
            .filter(|(b, a)| b != a)
            .collect();
        assert!(changed.is_empty(), "root sysctls changed: {changed:?}");
        assert_eq!(before.sysctls.len(), self.sysctls.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_neighbors_count() {
        let text = "2001:db8::1 dev eth0 lladdr 02:00:00:00:00:01 router REACHABLE\n\
                    fe80::1 dev eth0 lladdr 02:00:00:00:00:02 STALE\n\
                    2001:db8::9 dev eth0 lladdr 02:00:00:00:00:09 PERMANENT\n\
                    2001:db8::8 dev lo NOARP\n\
                    fe80::3 dev eth0 FAILED\n";
        assert_eq!(
            configured_neighbors(text),
            "2001:db8::8 dev lo NOARP\n2001:db8::9 dev eth0 lladdr 02:00:00:00:00:09 PERMANENT"
        );
        assert_eq!(configured_neighbors(""), "");
        // Order does not matter; learned entries coming and going do not either.
        let later = "2001:db8::9 dev eth0 lladdr 02:00:00:00:00:09 PERMANENT\n\
                     2001:db8::8 dev lo NOARP\n\
                     2001:db8::5 dev eth0 lladdr 02:00:00:00:00:05 DELAY\n";
        assert_eq!(configured_neighbors(text), configured_neighbors(later));
        // A lab's neighbor added to the root namespace would show.
        let broken = format!("{text}2001:db8:101::2 dev br0 lladdr 02:00:00:00:01:02 PERMANENT\n");
        assert_ne!(configured_neighbors(text), configured_neighbors(&broken));
    }

    #[test]
    fn the_sysctl_snapshot_covers_ipv6() {
        let all = sysctls();
        let v6 = ipv6_sysctls(&all);
        assert!(
            v6.contains(&"/proc/sys/net/ipv6/conf/all/forwarding"),
            "{} ipv6 keys",
            v6.len()
        );
        assert!(v6.contains(&"/proc/sys/net/ipv6/conf/default/accept_ra"));
    }
}

/// A process by PID and start time, so a recycled PID is never taken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeenProcess {
    pub pid: i32,
    pub start: u64,
}

impl SeenProcess {
    pub fn of(pid: i32) -> Option<Self> {
        natscope_lab::registry::start_time(pid).map(|start| Self { pid, start })
    }

    /// Still running: the same start time and not a zombie (a zombie holds no namespace and
    /// waits only for its parent to read its status).
    pub fn running(&self) -> bool {
        if natscope_lab::registry::start_time(self.pid) != Some(self.start) {
            return false;
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state != "Z")
    }
}

/// The processes of lab `name` now: its owner (from its record) and every process in its
/// namespaces.
pub fn processes_of_lab(name: &str) -> Vec<SeenProcess> {
    use natscope_lab::{netns, registry};
    let inodes: Vec<u64> = registry::namespaces_of(name)
        .iter()
        .filter_map(|n| netns::inode_of(n))
        .collect();
    registry::read(name)
        .map(|r| r.owner_pid)
        .into_iter()
        .chain(netns::processes_in(&inodes))
        .filter_map(SeenProcess::of)
        .collect()
}

/// An unprivileged user for rootless-lab tests: runs a copy of `natscope` (target/ need not be
/// reachable for that user) as `uid`:`uid` without supplementary groups, through `setpriv`, with
/// `XDG_RUNTIME_DIR` a private directory of that user's. Root (the test) keeps watching.
pub struct Unprivileged {
    pub uid: u32,
    dir: crate::TempDir,
}

impl Unprivileged {
    /// Needs root (to hand the directories to `uid`) and `setpriv`.
    pub fn new(uid: u32) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::TempDir::new("rootless");
        let mode = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        mode(dir.path(), 0o755);
        let bin = dir.path().join("natscope");
        std::fs::copy(natscope_bin(), &bin).expect("copy natscope");
        mode(&bin, 0o755);
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).expect("runtime dir");
        mode(&runtime, 0o700);
        std::os::unix::fs::chown(&runtime, Some(uid), Some(uid)).expect("chown runtime dir");
        Self { uid, dir }
    }

    /// The copy of `natscope` the user runs.
    pub fn bin(&self) -> std::path::PathBuf {
        self.dir.path().join("natscope")
    }

    /// The user's `XDG_RUNTIME_DIR`.
    pub fn runtime_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("run")
    }

    /// `natscope args…` as the user.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let id = self.uid.to_string();
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
            .arg(self.bin())
            .args(args)
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("HOME", self.runtime_dir())
            .current_dir(self.runtime_dir());
        cmd
    }

    /// Runs `natscope args…` as the user.
    pub fn natscope(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("run setpriv natscope")
    }

    /// The user's processes that are not zombies, as (pid, command line).
    pub fn processes(&self) -> Vec<(i32, String)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in dir.filter_map(|e| e.ok()) {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if e.metadata().map(|m| m.uid()).ok() != Some(self.uid) {
                continue;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rfind(')')
                .and_then(|i| stat.get(i + 2..i + 3))
                .is_some_and(|s| s == "Z");
            if !zombie && !stat.is_empty() {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
            }
        }
        out
    }

    /// The files in the user's lab directory other than its lock: records, sockets, logs.
    pub fn lab_files(&self) -> Vec<String> {
        let labs = self.runtime_dir().join("natscope/labs");
        let Ok(dir) = std::fs::read_dir(labs) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect()
    }
}

/// A namespace of a test's own (`v6pr-TAG-PID`) whose loopback holds 127.0.0.1 and the two IPv6
/// addresses 2001:db8:7::1 and ::2 (added `nodad`, so usable at once): one host with two
/// addresses per family, for the reflector's RFC 5780 tests. Deleted on drop.
pub struct DualLoopbackNs(Option<natscope_lab::netns::Netns>);

impl DualLoopbackNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("v6pr-{tag}-{}", std::process::id());
        let ns = natscope_lab::netns::Netns::create(&name).expect("create the test namespace");
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(["-n", &name])
                .args(args)
                .output()
                .expect("ip runs");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["link", "set", "lo", "up"]);
        for a in ["2001:db8:7::1/128", "2001:db8:7::2/128"] {
            ip(&["addr", "add", a, "dev", "lo", "nodad"]);
        }
        Self(Some(ns))
    }

    pub fn ns(&self) -> &natscope_lab::netns::Netns {
        self.0.as_ref().expect("namespace is live")
    }
}

impl Drop for DualLoopbackNs {
    fn drop(&mut self) {
        if let Some(ns) = self.0.take() {
            let _ = ns.delete();
        }
    }
}
