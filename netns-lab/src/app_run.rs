//! One cell of `natscope lab grid --app`: the pair lab ([`grid::pair_topology`]: a public host
//! `rendezvous`, peer `a` behind one preset, peer `b` behind the other), the app file's `[server]`
//! on `rendezvous`, `[listen]` on `b` and `[connect]` on `a`, each `sh -c` in its own process
//! group inside the node; then the path judged from what the lab's routers forwarded while the
//! connect command ran, not from what the program says.
//!
//! The judgment ([`judge`]) reads the userspace engines' flow counters
//! ([`crate::engine::FlowRow`]) at each peer's own gateway (the router closest to it, the last
//! filter before its LAN). In the pair topology there are exactly three public parties — the
//! rendezvous host and the two peers' NATs — so a flow whose remote is not one of `rendezvous`'s
//! addresses is a flow with the other peer. A cell is `direct` when packets from the other peer
//! were delivered into both LANs (a punch packet the far filter refused shows as `in_refused`,
//! not as a delivery); `relayed` when the connect command succeeded and both directions of its
//! traffic crossed the rendezvous host; `failed` when the connect command failed or timed out.
//!
//! A kernel `linux` router has no engine to ask: for the connect command's run the cell adds its
//! own nftables table inside that router's namespace (never the root namespace) with named
//! counters — a forward chain after the masquerade table's filter, so it counts only what that
//! filter let through, and a prerouting chain that counts every packet from the other peer — and
//! reads them back with `nft -j` ([`linux_side`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::app::{AppSpec, Placeholders, Ready, RoleCommand};
use crate::driver::WAN;
use crate::engine::FlowRow;
use crate::grid::{self, PathTaken, Transport};
use crate::jobs::{self, CapturedOutput};
use crate::topology::{Role, RouterKind};
use crate::{Lab, LabOptions};
use natscope_core::nat::Protocol;

/// The schema of `lab grid --app --json`.
pub const SCHEMA: &str = "natscope.grid/v2";
/// The public host's node name in every cell.
pub const RENDEZVOUS: &str = "rendezvous";
/// How much of each role's stdout and stderr a cell keeps.
const TAIL_LINES: usize = 20;
/// How long `setup` may run.
const SETUP_LIMIT: Duration = Duration::from_secs(300);

/// The `natscope.grid/v2` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AppGridDocument {
    /// Always [`SCHEMA`].
    #[schemars(extend("const" = SCHEMA))]
    pub schema: String,
    /// The version of natscope that wrote the document.
    #[serde(default)]
    pub natscope_version: String,
    /// The app file's `name`.
    pub app: String,
    pub cells: Vec<AppCell>,
    pub pass: bool,
    pub duration_ms: f64,
    /// `--shard K/N` when the run was one shard.
    #[serde(default)]
    pub shard: Option<String>,
    /// The presets paired, in the grid's order (how `merge` puts shards' cells back in order).
    #[serde(default)]
    pub presets: Vec<String>,
}

/// One cell: the app between a peer behind `a` and one behind `b`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AppCell {
    pub a: String,
    pub b: String,
    pub expected: PathTaken,
    /// `model` (natscope's RFC 4787 reasoning, UDP) or `app` (the file's `[expect]`).
    pub expected_from: String,
    pub reason: String,
    /// The path the lab saw; `None` when the cell could not run or nothing could be observed.
    pub observed: Option<PathTaken>,
    /// What the app said on its last stdout line (`{"path": …}`), if it said.
    pub claimed: Option<PathTaken>,
    /// Set when the app's claim and the lab's observation differ.
    pub disagreement: Option<String>,
    pub pass: bool,
    /// The connect command's exit code; `None` when it was killed or never ran.
    pub exit_status: Option<i32>,
    pub timed_out: bool,
    /// Why the cell could not run (lab, a role not ready, …).
    pub error: Option<String>,
    pub evidence: Option<Evidence>,
    pub durations: Durations,
    /// Per role (`server`, `listen`, `connect`): the end of what it wrote.
    pub logs: BTreeMap<String, RoleLog>,
}

/// Where a cell's time went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Durations {
    /// Lab creation until the first command started.
    pub lab_up_ms: f64,
    /// `[server]` and `[listen]` started and ready.
    pub ready_ms: f64,
    /// The connect command's run.
    pub connect_ms: f64,
    /// The last command ended until the lab was down.
    pub lab_down_ms: f64,
    pub total_ms: f64,
}

/// The end of what one role wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RoleLog {
    pub stdout_tail: String,
    pub stderr_tail: String,
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Count {
    pub packets: u64,
    /// IP packet bytes, headers included.
    pub bytes: u64,
    /// The application's bytes: `bytes` less an IPv4 and transport header per packet (20 + 8
    /// for UDP, 20 + 32 for TCP with the timestamps Linux sends; a kernel `linux` router's
    /// counters do not tell the protocol, so UDP's). Bare TCP acknowledgements carry none.
    #[serde(default)]
    pub payload_bytes: u64,
}

/// IPv4 and transport header bytes per packet, by protocol (see [`Count::payload_bytes`]).
fn header_bytes(proto: Protocol) -> u64 {
    match proto {
        Protocol::Tcp => 20 + 32,
        _ => 20 + 8,
    }
}

impl Count {
    fn add(&mut self, proto: Protocol, packets: u64, bytes: u64) {
        self.packets += packets;
        self.bytes += bytes;
        self.payload_bytes += bytes.saturating_sub(packets * header_bytes(proto));
    }
}

/// A side's totals from its gateway's flows: a flow whose remote is one of the rendezvous
/// host's addresses went through it, any other is a flow with the other peer (the pair topology
/// has no third public party).
#[cfg(test)]
fn tally(side: &mut SideEvidence, rendezvous: &[Ipv4Addr]) {
    tally_both(side, rendezvous, &[]);
}

/// [`tally`] over both families (issue 13): the rendezvous host's IPv6 addresses count as the
/// rendezvous too (a peer learns its IPv6 server-reflexive address there), and an IPv6 packet's
/// payload is its size less the 40-byte IPv6 header.
fn tally_both(side: &mut SideEvidence, rendezvous: &[Ipv4Addr], rendezvous6: &[Ipv6Addr]) {
    for f in &side.flows {
        let via = match f.remote.ip() {
            IpAddr::V4(ip) => rendezvous.contains(&ip),
            IpAddr::V6(ip) => rendezvous6.contains(&ip),
        };
        // The counts below take IPv4's 20-byte header off each packet; IPv6's is 20 more.
        let v6 = |packets: u64, bytes: u64| {
            if f.remote.is_ipv6() {
                bytes.saturating_sub(20 * packets)
            } else {
                bytes
            }
        };
        let (out_bytes, in_bytes) = (v6(f.out_packets, f.out_bytes), v6(f.in_packets, f.in_bytes));
        if via {
            side.to_rendezvous.add(f.proto, f.out_packets, out_bytes);
            side.from_rendezvous.add(f.proto, f.in_packets, in_bytes);
        } else {
            side.to_peer.add(f.proto, f.out_packets, out_bytes);
            side.from_peer_delivered
                .add(f.proto, f.in_packets, in_bytes);
            side.from_peer_refused += f.in_refused;
        }
    }
}

/// One peer's side of the evidence, read at its gateway during the connect command's run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SideEvidence {
    /// Where the counts come from: the peer's own gateway, or for a peer with no NAT in front
    /// of it (`open`) the peer's own node (`a`, `b`: nftables counters in its namespace).
    pub router: Option<String>,
    /// Sent towards the other peer's public endpoints.
    pub to_peer: Count,
    /// From the other peer, delivered into this peer's LAN.
    pub from_peer_delivered: Count,
    /// From the other peer, refused by this side's filter (one-way punch packets).
    pub from_peer_refused: u64,
    /// Sent to the rendezvous host.
    pub to_rendezvous: Count,
    /// From the rendezvous host, delivered.
    pub from_rendezvous: Count,
    /// The flows with a count during the run (differences over the run).
    pub flows: Vec<FlowRow>,
}

/// What the routers forwarded while the connect command ran.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Evidence {
    /// The rendezvous host's addresses (traffic to or from these went through it).
    pub rendezvous: Vec<Ipv4Addr>,
    /// Its IPv6 addresses (issue 13); empty in documents written before they were counted.
    #[serde(default)]
    pub rendezvous6: Vec<Ipv6Addr>,
    pub a: SideEvidence,
    pub b: SideEvidence,
    /// Direct, `a` → `b`, delivered into `b`'s LAN.
    pub direct_a_to_b: Count,
    /// Direct, `b` → `a`, delivered into `a`'s LAN.
    pub direct_b_to_a: Count,
    /// Routers whose counters could not be read (a kernel `linux` NAT without counters).
    pub unobserved: Vec<String>,
}

/// Why a grid could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum AppGridError {
    #[error("creating the grid's work directory {path}: {source}")]
    Work {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setup `{command}` {why}")]
    Setup { command: String, why: String },
}

/// A grid run's shared state: the app and its work directory.
pub struct AppGrid {
    pub app: AppSpec,
    pub work: PathBuf,
    /// Lab names start with this (1-4 characters a-z, 0-9).
    pub lab_prefix: String,
    /// natscope, for the rendezvous node's reflector.
    pub exe: PathBuf,
    /// The transport the model's expectation is for (an app file's programs are judged as UDP;
    /// the plain grid's built-in punch app runs over each transport).
    pub transport: Transport,
    /// Whether the peers `a` and `b` get IPv6 (the grid's IPv6 cells). Without it their hosts
    /// have no IPv6 address or route, so a program that gathers IPv6 candidates (ICE, libp2p)
    /// cannot go direct over the lab's IPv6 firewalls in a cell the IPv4 model judges.
    pub peer_ipv6: bool,
}

impl AppGrid {
    /// Creates the work directory under `parent` and runs `setup` in it.
    pub fn prepare(
        app: AppSpec,
        parent: &Path,
        lab_prefix: &str,
        exe: &Path,
    ) -> Result<Self, AppGridError> {
        let work = parent.join(format!(
            "natscope-grid-{}-{}",
            std::process::id(),
            jobs::lab_name("", 0)
        ));
        std::fs::create_dir_all(&work).map_err(|source| AppGridError::Work {
            path: work.clone(),
            source,
        })?;
        let grid = Self {
            app,
            work,
            lab_prefix: lab_prefix.to_string(),
            exe: exe.to_path_buf(),
            transport: Transport::Udp,
            peer_ipv6: false,
        };
        if let Some(setup) = &grid.app.setup {
            grid.run_setup(setup)?;
        }
        Ok(grid)
    }

    fn run_setup(&self, setup: &str) -> Result<(), AppGridError> {
        let p = self.placeholders(None);
        let command = p.fill(setup);
        let err = |why: String| AppGridError::Setup {
            command: command.clone(),
            why,
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(&command).current_dir(&self.work);
        let mut child = in_group(cmd, &p, "setup")
            .spawn()
            .map_err(|e| err(format!(": {e}")))?;
        let mut out = CapturedOutput::take(&mut child);
        let status = wait_within(&mut child, SETUP_LIMIT);
        stop(&mut child);
        out.drain();
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(err(format!("failed ({s}): {}", tail(&out.stderr(), 3)))),
            None => Err(err(format!(
                "did not finish within {SETUP_LIMIT:?}: {}",
                tail(&out.stderr(), 3)
            ))),
        }
    }

    fn placeholders(&self, cell: Option<(&Lab, &Path)>) -> Placeholders {
        let addr = |lab: &Lab, n: &str| {
            lab.node(n)
                .ok()
                .and_then(|n| n.address())
                .map_or(String::new(), |a| a.to_string())
        };
        let mut p = Placeholders {
            work: self.work.display().to_string(),
            app_dir: self.app.dir.display().to_string(),
            ..Default::default()
        };
        if let Some((lab, dir)) = cell {
            p.server = addr(lab, RENDEZVOUS);
            p.a = addr(lab, "a");
            p.b = addr(lab, "b");
            p.cell = dir.display().to_string();
        }
        p
    }

    /// Removes the work directory.
    pub fn finish(self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }

    /// The same grid, its cells judged against the model's expectation over `t`.
    pub fn with_transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    /// The peers get IPv6 (see [`AppGrid::peer_ipv6`]).
    pub fn with_peer_ipv6(mut self, on: bool) -> Self {
        self.peer_ipv6 = on;
        self
    }

    /// Runs the cell `a` × `b` (the `index`-th of the grid).
    pub fn run_cell(&self, index: usize, a: &str, b: &str) -> AppCell {
        let (mut cell, stdout) = self.run_cell_unjudged(index, a, b);
        cell.claimed = claim(&stdout);
        judge(&mut cell);
        cell
    }

    /// Runs the cell `a` × `b` (the `index`-th of the grid) and records what happened, but does
    /// not judge it ([`judge`] does): the connect command's whole stdout comes back beside the
    /// cell, for a runner that reads more than the last line's claim (the plain grid reads
    /// punch's report from it).
    pub fn run_cell_unjudged(&self, index: usize, a: &str, b: &str) -> (AppCell, String) {
        let t0 = Instant::now();
        let (expected, expected_from, reason) = match self.app.expectation(a, b) {
            Some(p) => (p, "app", format!("{}'s [expect] says {p}", self.app.file)),
            None => match grid::expected(a, b, self.transport) {
                Some((p, why)) => (p, "model", why),
                None => (PathTaken::Failed, "model", "unknown preset".into()),
            },
        };
        let mut cell = AppCell {
            a: a.into(),
            b: b.into(),
            expected,
            expected_from: expected_from.into(),
            reason,
            observed: None,
            claimed: None,
            disagreement: None,
            pass: false,
            exit_status: None,
            timed_out: false,
            error: None,
            evidence: None,
            durations: Durations::default(),
            logs: BTreeMap::new(),
        };
        let mut stdout = String::new();
        if let Err(e) = self.cell_in_lab(index, &mut cell, &mut stdout) {
            cell.error = Some(e);
        }
        cell.durations.total_ms = ms(t0.elapsed());
        (cell, stdout)
    }

    /// Brings the lab up, runs the roles, takes the lab down; fills in what it saw.
    fn cell_in_lab(
        &self,
        index: usize,
        cell: &mut AppCell,
        stdout: &mut String,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let topo = grid::pair_topology(&cell.a, &cell.b).ok_or("no pair topology")?;
        let mut plan = topo.plan().map_err(|e| e.to_string())?;
        if !self.peer_ipv6 {
            for n in plan
                .nodes
                .iter_mut()
                .filter(|n| n.name == "a" || n.name == "b")
            {
                n.uplink6.clear();
                n.gateway6 = None;
            }
        }
        let lab = Lab::up(
            &jobs::lab_name(&self.lab_prefix, index),
            plan,
            LabOptions {
                natscope_bin: Some(self.exe.clone()),
                ..Default::default()
            },
        )
        .map_err(|e| format!("lab for {} + {}: {}", cell.a, cell.b, jobs::error_line(&e)))?;
        let dir = self.work.join(format!("cell{index}-{}-{}", cell.a, cell.b));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let p = self.placeholders(Some((&lab, &dir)));
        cell.durations.lab_up_ms = ms(t0.elapsed());
        let mut running: Vec<RoleProcess> = Vec::new();
        let result = self.run_roles(&lab, &p, &dir, cell, &mut running, stdout);
        let t2 = Instant::now();
        for r in &mut running {
            r.stop();
            cell.logs.insert(r.role.to_string(), r.log());
        }
        drop(running);
        lab.down();
        cell.durations.lab_down_ms = ms(t2.elapsed());
        result
    }

    fn run_roles(
        &self,
        lab: &Lab,
        p: &Placeholders,
        dir: &Path,
        cell: &mut AppCell,
        running: &mut Vec<RoleProcess>,
        stdout: &mut String,
    ) -> Result<(), String> {
        let t1 = Instant::now();
        for (role, node, spec) in [
            ("server", RENDEZVOUS, self.app.server.as_ref()),
            ("listen", "b", self.app.listen.as_ref()),
        ] {
            let Some(spec) = spec else { continue };
            running.push(RoleProcess::start(lab, node, role, spec, p, dir)?);
            let last = running.len() - 1;
            running[last].wait_ready(lab, spec)?;
        }
        cell.durations.ready_ms = ms(t1.elapsed());
        let rendezvous = rendezvous_addrs(lab);
        let mut kernel = Vec::new();
        for peer in ["a", "b"] {
            match gateway(lab, peer) {
                Some((router, Some(RouterKind::Linux))) => {
                    install_counters(lab, &router, &counter_rules(WAN, &rendezvous))?;
                    kernel.push(router);
                }
                // No NAT between the peer and the internet: nothing forwards its traffic, so
                // count it where it is sent and received.
                None => {
                    install_counters(lab, peer, &host_counter_rules(&rendezvous))?;
                    kernel.push(peer.to_string());
                }
                Some(_) => {}
            }
        }
        let before = snapshot(lab);
        let t = Instant::now();
        running.push(RoleProcess::start(
            lab,
            "a",
            "connect",
            &self.app.connect,
            p,
            dir,
        )?);
        let last = running.len() - 1;
        let status = wait_within(&mut running[last].child, self.app.connect.timeout);
        cell.durations.connect_ms = ms(t.elapsed());
        let after = snapshot(lab);
        let mut counted = BTreeMap::new();
        for router in kernel {
            let side = read_counters(lab, &router)?;
            counted.insert(router, side);
        }
        cell.evidence = Some(evidence(lab, &before, &after, counted));
        match status {
            Some(s) => cell.exit_status = s.code(),
            None => cell.timed_out = true,
        }
        running[last].stop();
        *stdout = running[last].output.stdout();
        Ok(())
    }
}

/// Fills in `observed`, the disagreement and `pass` from what the cell recorded.
pub fn judge(cell: &mut AppCell) {
    let connected = !cell.timed_out && cell.exit_status == Some(0) && cell.error.is_none();
    cell.observed = match (&cell.error, &cell.evidence) {
        (Some(_), _) | (None, None) => None,
        _ if !connected => Some(PathTaken::Failed),
        (None, Some(e)) => observed_path(e),
    };
    if cell.timed_out && cell.error.is_none() {
        let stderr = cell
            .logs
            .get("connect")
            .map(|l| l.stderr_tail.lines().last().unwrap_or("").to_string())
            .unwrap_or_default();
        cell.reason = format!("{} (connect killed at timeout_s: {stderr})", cell.reason);
    }
    cell.disagreement = match (cell.claimed, cell.observed) {
        (Some(c), Some(o)) if c != o => Some(format!("the app says {c}, the lab saw {o}")),
        (Some(c), None) if cell.error.is_none() => Some(format!(
            "the app says {c}, the lab could not observe the path"
        )),
        _ => None,
    };
    // The model's relayed cells where natscope's birthday technique applies also pass direct
    // (grid::path_accepted); an app's own [expect] is taken as written.
    let path_ok = match cell.expected_from.as_str() {
        "model" => grid::path_accepted(
            &cell.a,
            &cell.b,
            Transport::Udp,
            None,
            cell.expected,
            cell.observed,
        ),
        _ => cell.observed == Some(cell.expected),
    };
    cell.pass = path_ok && cell.disagreement.is_none();
}

/// The path `e` shows, or `None` when the lab saw neither a direct nor a relayed exchange.
///
/// Direct needs, in **each** direction, packets from the other peer delivered into its LAN, and
/// the direct path carrying at least as many application bytes ([`Count::payload_bytes`]) as the
/// sender sent to the rendezvous host: a pair whose punch packets met but whose data (one way or
/// both) still went through the relay was relayed, and so was a pair where one side only
/// acknowledged a TCP stream the other side opened directly.
pub fn observed_path(e: &Evidence) -> Option<PathTaken> {
    let carried = |direct: Count, sender: &SideEvidence| {
        direct.packets > 0 && direct.payload_bytes >= sender.to_rendezvous.payload_bytes
    };
    if carried(e.direct_a_to_b, &e.a) && carried(e.direct_b_to_a, &e.b) {
        return Some(PathTaken::Direct);
    }
    let via = |s: &SideEvidence| s.to_rendezvous.packets > 0 && s.from_rendezvous.packets > 0;
    if via(&e.a) || via(&e.b) {
        return Some(PathTaken::Relayed);
    }
    None
}

/// `{"path": "direct"|"relayed"|"failed"}` on the last non-empty stdout line.
pub fn claim(stdout: &str) -> Option<PathTaken> {
    #[derive(Deserialize)]
    struct Claim {
        path: PathTaken,
    }
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    serde_json::from_str::<Claim>(last.trim())
        .ok()
        .map(|c| c.path)
}

/// Every engine router's flows, by node.
type Snapshot = BTreeMap<String, Vec<FlowRow>>;

fn snapshot(lab: &Lab) -> Snapshot {
    lab.nodes()
        .iter()
        .filter_map(|n| Some((n.name().to_string(), lab.nat_flows(n.name())?)))
        .collect()
}

/// `after` minus `before`, per flow, keeping flows that moved.
fn difference(before: &[FlowRow], after: &[FlowRow]) -> Vec<FlowRow> {
    after
        .iter()
        .filter_map(|f| {
            let mut d = f.clone();
            if let Some(b) = before
                .iter()
                .find(|b| (b.proto, b.internal, b.remote) == (f.proto, f.internal, f.remote))
            {
                d.out_packets -= b.out_packets.min(d.out_packets);
                d.out_bytes -= b.out_bytes.min(d.out_bytes);
                d.in_packets -= b.in_packets.min(d.in_packets);
                d.in_bytes -= b.in_bytes.min(d.in_bytes);
                d.in_refused -= b.in_refused.min(d.in_refused);
            }
            (d.out_packets + d.in_packets + d.in_refused > 0).then_some(d)
        })
        .collect()
}

/// The gateway of host `node`: the router whose LAN it sits on.
fn gateway(lab: &Lab, node: &str) -> Option<(String, Option<RouterKind>)> {
    let up = lab.node(node).ok()?.plan().upstream.clone()?;
    let r = lab.node(&up).ok()?;
    (r.role() == Role::Nat).then(|| (up, r.plan().router.clone()))
}

fn rendezvous_addrs(lab: &Lab) -> Vec<Ipv4Addr> {
    lab.node(RENDEZVOUS)
        .map(|n| n.plan().uplink.iter().map(|a| a.addr).collect())
        .unwrap_or_default()
}

fn evidence(
    lab: &Lab,
    before: &Snapshot,
    after: &Snapshot,
    mut kernel: BTreeMap<String, SideEvidence>,
) -> Evidence {
    let rendezvous = rendezvous_addrs(lab);
    let rendezvous6: Vec<Ipv6Addr> = lab
        .node(RENDEZVOUS)
        .map(|n| n.plan().uplink6.iter().map(|a| a.addr).collect())
        .unwrap_or_default();
    let mut e = Evidence {
        rendezvous: rendezvous.clone(),
        rendezvous6: rendezvous6.clone(),
        ..Default::default()
    };
    for (peer, side) in [("a", &mut e.a), ("b", &mut e.b)] {
        let Some((router, kind)) = gateway(lab, peer) else {
            if let Some(counted) = kernel.remove(peer) {
                *side = counted;
                side.router = Some(peer.to_string());
            }
            continue;
        };
        if let Some(counted) = kernel.remove(&router) {
            *side = counted;
            side.router = Some(router);
            continue;
        }
        side.router = Some(router.clone());
        let (Some(b), Some(a)) = (before.get(&router), after.get(&router)) else {
            let what = match kind {
                Some(RouterKind::Linux) => "linux",
                _ => "no counters",
            };
            e.unobserved.push(format!("{router} ({what})"));
            continue;
        };
        side.flows = difference(b, a);
        tally_both(side, &rendezvous, &rendezvous6);
    }
    // Delivered into a side's LAN: its gateway's count; a side without a NAT receives whatever
    // the other side's gateway sent it.
    e.direct_a_to_b = match e.b.router {
        Some(_) => e.b.from_peer_delivered,
        None => e.a.to_peer,
    };
    e.direct_b_to_a = match e.a.router {
        Some(_) => e.a.from_peer_delivered,
        None => e.b.to_peer,
    };
    e
}

/// A role's `sh -c` process in its node.
struct RoleProcess {
    role: &'static str,
    child: Child,
    output: CapturedOutput,
    stopped: bool,
}

impl RoleProcess {
    fn start(
        lab: &Lab,
        node: &str,
        role: &'static str,
        spec: &RoleCommand,
        p: &Placeholders,
        dir: &Path,
    ) -> Result<Self, String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(p.fill(&spec.run)).current_dir(dir);
        let mut child = lab
            .node(node)
            .map_err(|e| e.to_string())?
            .spawn(in_group(cmd, p, role))
            .map_err(|e| format!("starting [{role}] in {node}: {e}"))?;
        let output = CapturedOutput::take(&mut child);
        Ok(Self {
            role,
            child,
            output,
            stopped: false,
        })
    }

    /// Waits until the role's `ready` holds in its node; an error with its stderr if it exits
    /// first or does not get ready in time.
    fn wait_ready(&mut self, lab: &Lab, spec: &RoleCommand) -> Result<(), String> {
        let node = match self.role {
            "server" => RENDEZVOUS,
            _ => "b",
        };
        let deadline = Instant::now() + spec.timeout;
        if let Ready::Wait(d) = spec.ready {
            let end = Instant::now() + d;
            while Instant::now() < end {
                if self.exited() {
                    return Err(self.failure("exited before its ready wait ended"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            return Ok(());
        }
        let n = lab.node(node).map_err(|e| e.to_string())?;
        loop {
            let ready = match &spec.ready {
                Ready::Stdout(text) => self.output.stdout().contains(text.as_str()),
                r => {
                    let r = r.clone();
                    n.run(move || port_bound(&r)).unwrap_or(false)
                }
            };
            if ready {
                return Ok(());
            }
            if self.exited() {
                return Err(self.failure(&format!("exited before {} held", spec.ready)));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "did not get ready ({}) within {:?}",
                    spec.ready, spec.timeout
                )));
            }
            // A check is a /proc read in the node's thread: cheap enough to look often.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn failure(&mut self, what: &str) -> String {
        self.stop();
        format!(
            "[{}] {what}: {}",
            self.role,
            tail(&self.output.stderr(), 3).replace('\n', " | ")
        )
    }

    /// Stops the role's whole process group (by its id) and collects its output.
    fn stop(&mut self) {
        if !self.stopped {
            stop(&mut self.child);
            self.output.drain();
            self.stopped = true;
        }
    }

    fn log(&self) -> RoleLog {
        RoleLog {
            stdout_tail: tail(&self.output.stdout(), TAIL_LINES),
            stderr_tail: tail(&self.output.stderr(), TAIL_LINES),
        }
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// `cmd` as the leader of a new process group (so it can be stopped with everything it started),
/// stdin closed, output piped, with the cell's variables and `NATSCOPE_ROLE`.
fn in_group(mut cmd: Command, p: &Placeholders, role: &str) -> Command {
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in p.env() {
        cmd.env(k, v);
    }
    cmd.env("NATSCOPE_ROLE", role);
    cmd
}

/// SIGKILL to the child's process group (its id; `sh -c` and whatever it started), then reaps it.
fn stop(child: &mut Child) {
    // Before the leader is reaped its id cannot be reused, so the group id still names its group;
    // after it exited, what it left behind in the group goes too.
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits at most `limit` for `child` to exit.
fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Whether the calling thread's namespace has a UDP socket bound to, or a TCP socket listening
/// on, the ready port (`/proc/thread-self/net/{udp,tcp}`: this thread's namespace's sockets).
fn port_bound(r: &Ready) -> bool {
    let (file, port, listen_only) = match *r {
        Ready::Udp(p) => ("udp", p, false),
        Ready::Tcp(p) => ("tcp", p, true),
        Ready::Wait(_) | Ready::Stdout(_) => return true,
    };
    // IPv6 sockets (dual-stack ones included, as nebula's) are listed in the *6 tables only.
    [file.to_string(), format!("{file}6")].iter().any(|f| {
        let text =
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default();
        sockets_on(&text, port, listen_only)
    })
}

/// In a `/proc/net/{udp,tcp}{,6}` table, whether a socket's local port is `port` (TCP: in LISTEN).
fn sockets_on(table: &str, port: u16, listen_only: bool) -> bool {
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        let p = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        p == Some(port) && (!listen_only || state == "0A")
    })
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---- kernel routers: nftables counters ----------------------------------------------------

/// The table a cell adds to a `linux` router for its evidence.
const NFT_TABLE: &str = "natscope_evidence";
/// The named counters, in [`SideEvidence`] terms.
const NFT_COUNTERS: [&str; 5] = [
    "to_peer",
    "from_peer_delivered",
    "from_peer_seen",
    "to_rendezvous",
    "from_rendezvous",
];

/// Runs `nft` with `args` (and `input` on stdin) inside `router`'s namespace; its stdout.
fn nft(lab: &Lab, router: &str, args: &[&str], input: &str) -> Result<String, String> {
    use std::io::Write;
    let mut cmd = Command::new("nft");
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = lab
        .node(router)
        .map_err(|e| e.to_string())?
        .spawn(cmd)
        .map_err(|e| format!("running nft in {router} (install nftables): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("nft in {router}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft in {router}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The evidence table's rules for a router whose uplink is `wan`, with the rendezvous host at
/// `rendezvous`: forwarded traffic counted after the masquerade table's `filter`-priority chain
/// (which drops what its filter refuses), every packet from a peer counted at prerouting. Only
/// TCP and UDP count: an ICMP error a NAT sends back for a refused punch is not the peer's data.
fn counter_rules(wan: &str, rendezvous: &[Ipv4Addr]) -> String {
    let set: Vec<String> = rendezvous.iter().map(Ipv4Addr::to_string).collect();
    let set = format!("{{ {} }}", set.join(", "));
    let counters: String = NFT_COUNTERS
        .iter()
        .map(|c| format!("counter {c} {{}}\n"))
        .collect();
    format!(
        "table ip {NFT_TABLE} {{\n{counters}\
         chain forward {{ type filter hook forward priority filter + 10; policy accept;\n\
         oifname \"{wan}\" ip daddr {set} meta l4proto {{ tcp, udp }} counter name to_rendezvous\n\
         oifname \"{wan}\" ip daddr != {set} meta l4proto {{ tcp, udp }} counter name to_peer\n\
         iifname \"{wan}\" ip saddr {set} meta l4proto {{ tcp, udp }} counter name from_rendezvous\n\
         iifname \"{wan}\" ip saddr != {set} meta l4proto {{ tcp, udp }} counter name from_peer_delivered\n}}\n\
         chain prerouting {{ type filter hook prerouting priority raw; policy accept;\n\
         iifname \"{wan}\" ip saddr != {set} meta l4proto {{ tcp, udp }} counter name from_peer_seen\n}}\n}}\n"
    )
}

/// The evidence table's rules for a peer with no NAT (`open`), in the peer's own namespace:
/// what it sends and what it receives, loopback left out. Nothing filters in front of it, so
/// every packet from the other peer that arrives is delivered (`from_peer_seen` counts the same).
fn host_counter_rules(rendezvous: &[Ipv4Addr]) -> String {
    let set: Vec<String> = rendezvous.iter().map(Ipv4Addr::to_string).collect();
    let set = format!("{{ {} }}", set.join(", "));
    let counters: String = NFT_COUNTERS
        .iter()
        .map(|c| format!("counter {c} {{}}\n"))
        .collect();
    let l4 = "meta l4proto { tcp, udp }";
    format!(
        "table ip {NFT_TABLE} {{\n{counters}\
         chain output {{ type filter hook output priority filter + 10; policy accept;\n\
         oifname != \"lo\" ip daddr {set} {l4} counter name to_rendezvous\n\
         oifname != \"lo\" ip daddr != {set} {l4} counter name to_peer\n}}\n\
         chain input {{ type filter hook input priority filter + 10; policy accept;\n\
         iifname != \"lo\" ip saddr {set} {l4} counter name from_rendezvous\n\
         iifname != \"lo\" ip saddr != {set} {l4} counter name from_peer_delivered\n\
         iifname != \"lo\" ip saddr != {set} {l4} counter name from_peer_seen\n}}\n}}\n"
    )
}

fn install_counters(lab: &Lab, node: &str, rules: &str) -> Result<(), String> {
    nft(lab, node, &["-f", "-"], rules).map(|_| ())
}

/// The counters' values, then the table removed again.
fn read_counters(lab: &Lab, router: &str) -> Result<SideEvidence, String> {
    let json = nft(
        lab,
        router,
        &["-j", "list", "counters", "table", "ip", NFT_TABLE],
        "",
    )?;
    let _ = nft(lab, router, &["delete", "table", "ip", NFT_TABLE], "");
    linux_side(&json).ok_or_else(|| format!("nft in {router}: unreadable counters: {json}"))
}

/// A side's evidence from `nft -j list counters` output.
pub fn linux_side(json: &str) -> Option<SideEvidence> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut got: BTreeMap<String, Count> = BTreeMap::new();
    for item in v.get("nftables")?.as_array()? {
        let Some(c) = item.get("counter") else {
            continue;
        };
        got.insert(c.get("name")?.as_str()?.to_string(), {
            let mut n = Count::default();
            let (packets, bytes) = (c.get("packets")?.as_u64()?, c.get("bytes")?.as_u64()?);
            n.add(Protocol::Udp, packets, bytes);
            n
        });
    }
    let get = |n: &str| got.get(n).copied();
    let delivered = get("from_peer_delivered")?;
    Some(SideEvidence {
        router: None,
        to_peer: get("to_peer")?,
        from_peer_delivered: delivered,
        from_peer_refused: get("from_peer_seen")?
            .packets
            .saturating_sub(delivered.packets),
        to_rendezvous: get("to_rendezvous")?,
        from_rendezvous: get("from_rendezvous")?,
        flows: Vec::new(),
    })
}

// ---- `lab flows` ----------------------------------------------------------------------------

/// `natscope lab flows [--lab LAB] NODE [--json]`: the running lab's supervisor's flow counters
/// for a userspace NAT node (what `--app` judges paths from), as a table or a JSON array.
pub fn lab_flows(lab: Option<String>, node: &str, json: bool) -> Result<String, String> {
    use crate::control::{self, Reply, Request};
    let rec = control::pick_node(lab, node).map_err(|e| e.to_string())?;
    let request = Request::Flows { node: node.into() };
    let flows = match control::ask(&rec, &request) {
        Some(Reply::Flows(f)) => f,
        Some(Reply::Error(e)) => return Err(e),
        _ => {
            return Err(format!(
                "the supervisor of lab {} does not answer",
                rec.name
            ))
        }
    };
    if json {
        return serde_json::to_string_pretty(&flows).map_err(|e| e.to_string());
    }
    Ok(format!(
        "{} flows through {node} (lab {})\n{}",
        flows.len(),
        rec.name,
        flows_table(&flows).trim_end()
    ))
}

/// Flows as an aligned text table: endpoints, then packets/bytes out, delivered in, refused.
pub fn flows_table(flows: &[FlowRow]) -> String {
    let mut rows = vec![[
        "proto", "internal", "external", "remote", "out", "in", "refused",
    ]
    .map(String::from)];
    for f in flows {
        rows.push([
            format!("{:?}", f.proto).to_lowercase(),
            f.internal.to_string(),
            f.external.map_or("-".into(), |e| e.to_string()),
            f.remote.to_string(),
            format!("{} pkt / {} B", f.out_packets, f.out_bytes),
            format!("{} pkt / {} B", f.in_packets, f.in_bytes),
            f.in_refused.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

// ---- shards ---------------------------------------------------------------------------------

/// Every unordered pair of `names` (same-preset pairs included), in the grid's order.
pub fn pairs(names: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, x) in names.iter().enumerate() {
        for y in &names[i..] {
            out.push((x.clone(), y.clone()));
        }
    }
    out
}

/// `K/N` (1 ≤ K ≤ N ≤ 1000) of `--shard`.
pub fn parse_shard(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("--shard `{text}`: expected K/N with 1 <= K <= N, e.g. 2/3");
    let (k, n) = text.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if k == 0 || k > n || n > 1000 {
        return Err(bad());
    }
    Ok((k, n))
}

/// The cells shard `k` of `n` runs, with their indexes in the whole grid: every `n`-th cell from
/// the `k`-th, so shards are disjoint, cover the grid, and are the same on every machine.
pub fn shard<T: Clone>(cells: &[T], k: usize, n: usize) -> Vec<(usize, T)> {
    cells
        .iter()
        .enumerate()
        .filter(|(i, _)| i % n == k - 1)
        .map(|(i, c)| (i, c.clone()))
        .collect()
}

/// Runs `spec` over every unordered pair of `names` (or shard `shard` = "K/N" of them), `jobs`
/// cells at a time, in labs named `prefix`…, with `exe` as the natscope the nodes run.
pub fn run_grid(
    spec: AppSpec,
    names: &[String],
    shard: Option<&str>,
    jobs: usize,
    prefix: &str,
    exe: &Path,
) -> Result<AppGridDocument, String> {
    let (k, n) = match shard {
        Some(s) => parse_shard(s)?,
        None => (1, 1),
    };
    let pairs = self::shard(&pairs(names), k, n);
    let start = Instant::now();
    let app = spec.name.clone();
    let grid =
        AppGrid::prepare(spec, &std::env::temp_dir(), prefix, exe).map_err(|e| e.to_string())?;
    let cells = crate::jobs::run_parallel_shown(&pairs, jobs, "cells", |_, (i, (x, y))| {
        grid.run_cell(*i, x, y)
    });
    grid.finish();
    let cells = cells.map_err(|e| e.to_string())?;
    Ok(AppGridDocument {
        schema: SCHEMA.to_string(),
        natscope_version: natscope_core::document::version(),
        app,
        pass: cells.iter().all(|c| c.pass),
        cells,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
        shard: shard.map(str::to_string),
        presets: names.to_vec(),
    })
}

impl AppGridDocument {
    /// Writes the JUnit, Markdown and HTML reports to the paths given.
    pub fn write_reports(
        &self,
        junit: Option<&Path>,
        markdown: Option<&Path>,
        html: Option<&Path>,
    ) -> Result<(), String> {
        let reports = [
            (junit, Self::junit as fn(&Self) -> String),
            (markdown, Self::markdown),
            (html, Self::html),
        ];
        for (path, render) in reports {
            if let Some(p) = path {
                std::fs::write(p, render(self))
                    .map_err(|e| format!("writing {}: {e}", p.display()))?;
            }
        }
        Ok(())
    }
}

/// Reads `natscope.grid/v2` documents from `files` and [`merge`]s them.
pub fn merge_files(files: &[PathBuf]) -> Result<AppGridDocument, String> {
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
        docs.push(
            serde_json::from_slice(&text)
                .map_err(|e| format!("{}: not a natscope.grid/v2 document: {e}", f.display()))?,
        );
    }
    merge(docs)
}

/// Joins shards' documents into the document of the whole grid: one app, no cell twice, cells in
/// the grid's order.
pub fn merge(docs: Vec<AppGridDocument>) -> Result<AppGridDocument, String> {
    let first = docs.first().ok_or("nothing to merge")?;
    let (app, presets) = (first.app.clone(), first.presets.clone());
    let mut cells: Vec<AppCell> = Vec::new();
    let mut duration_ms: f64 = 0.0;
    for d in &docs {
        if d.schema != SCHEMA || d.app != app || d.presets != presets {
            return Err(format!(
                "cannot merge {} of `{}` over [{}] with {} of `{app}` over [{}]",
                d.schema,
                d.app,
                d.presets.join(","),
                first.schema,
                presets.join(",")
            ));
        }
        for c in &d.cells {
            if cells.iter().any(|o| (&o.a, &o.b) == (&c.a, &c.b)) {
                return Err(format!("the cell {} ↔ {} is in two documents", c.a, c.b));
            }
            cells.push(c.clone());
        }
        duration_ms = duration_ms.max(d.duration_ms);
    }
    let order = pairs(&presets);
    let pos = |c: &AppCell| {
        order
            .iter()
            .position(|(a, b)| *a == c.a && *b == c.b)
            .unwrap_or(usize::MAX)
    };
    cells.sort_by_key(pos);
    Ok(AppGridDocument {
        schema: SCHEMA.into(),
        natscope_version: natscope_core::document::version(),
        app,
        pass: cells.iter().all(|c| c.pass) && cells.len() == order.len(),
        cells,
        duration_ms,
        shard: None,
        presets,
    })
}

// ---- outputs ------------------------------------------------------------------------------

impl AppCell {
    /// The cell's word in tables: ✓/✗, the observed path, a flag when the app's claim differs.
    pub fn mark(&self) -> String {
        let o = match (self.observed, &self.error) {
            (Some(p), _) => p.to_string(),
            (None, Some(_)) => "error".into(),
            (None, None) => "unobserved".into(),
        };
        let mut m = match (self.pass, self.observed == Some(self.expected)) {
            (true, _) => format!("✓ {o}"),
            (false, true) => format!("✗ {o}"),
            (false, false) => format!("✗ {o} (want {})", self.expected),
        };
        if let (Some(c), Some(_)) = (self.claimed, &self.disagreement) {
            m.push_str(&format!(" ⚑ app says {c}"));
        }
        m
    }

    /// Why the cell did not pass, in one line; `None` when it passed.
    pub fn failure(&self) -> Option<String> {
        if self.pass {
            return None;
        }
        let mut parts = Vec::new();
        if let Some(e) = &self.error {
            parts.push(format!("error: {e}"));
        }
        if let Some(d) = &self.disagreement {
            parts.push(d.clone());
        }
        match self.observed {
            Some(o) if o != self.expected => {
                parts.push(format!("observed {o}, expected {}", self.expected))
            }
            None if self.error.is_none() => parts.push(
                "the lab saw no exchange between the peers, direct or through rendezvous".into(),
            ),
            _ => {}
        }
        if self.timed_out {
            parts.push("connect killed at timeout_s".into());
        } else if let Some(code) = self.exit_status.filter(|c| *c != 0) {
            parts.push(format!("connect exited {code}"));
        }
        parts.push(format!("reason: {}", self.reason));
        Some(parts.join("; "))
    }
}

impl AppGridDocument {
    /// The presets paired, in the grid's order (from the cells, for a document without them).
    pub fn preset_order(&self) -> Vec<String> {
        if !self.presets.is_empty() {
            return self.presets.clone();
        }
        let mut names: Vec<String> = Vec::new();
        for c in &self.cells {
            for n in [&c.a, &c.b] {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }

    /// The cell of the pair `x`, `y` in either order.
    pub fn cell(&self, x: &str, y: &str) -> Option<&AppCell> {
        self.cells
            .iter()
            .find(|c| (c.a == x && c.b == y) || (c.a == y && c.b == x))
    }

    /// One line: how many cells were as expected, flagged, and how long it took.
    pub fn summary(&self) -> String {
        let passed = self.cells.iter().filter(|c| c.pass).count();
        let flagged = self
            .cells
            .iter()
            .filter(|c| c.disagreement.is_some())
            .count();
        format!(
            "{}: {passed}/{} cells as expected, {flagged} where the app's claim differs from the lab's observation, in {:.1} s",
            self.app,
            self.cells.len(),
            self.duration_ms / 1000.0
        )
    }

    /// A JUnit XML report: one testsuite, one testcase per cell (`a ↔ b`), a `<failure>` for each
    /// cell that did not pass (an `<error>` for one that could not run), the roles' output tails
    /// in `<system-out>`. Written by hand: a dozen lines of escaping need no XML crate.
    pub fn junit(&self) -> String {
        let failures = self
            .cells
            .iter()
            .filter(|c| !c.pass && c.error.is_none())
            .count();
        let errors = self.cells.iter().filter(|c| c.error.is_some()).count();
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x += &format!(
            "<testsuites name=\"natscope lab grid\" tests=\"{n}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{t:.3}\">\n\
             <testsuite name=\"{app}\" tests=\"{n}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{t:.3}\">\n",
            n = self.cells.len(),
            t = self.duration_ms / 1000.0,
            app = xml(&self.app),
        );
        for c in &self.cells {
            x += &format!(
                "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">\n",
                xml(&format!("natscope.grid.{}", self.app)),
                xml(&format!("{} ↔ {}", c.a, c.b)),
                c.durations.total_ms / 1000.0
            );
            if let Some(why) = c.failure() {
                let tag = if c.error.is_some() {
                    "error"
                } else {
                    "failure"
                };
                x += &format!(
                    "    <{tag} message=\"{}\" type=\"{}\">{}</{tag}>\n",
                    xml(&why),
                    c.observed.map_or("error", PathTaken::as_str),
                    xml(&evidence_text(c))
                );
            }
            x += &format!(
                "    <system-out>{}</system-out>\n  </testcase>\n",
                xml(&logs_text(c))
            );
        }
        x += "</testsuite>\n</testsuites>\n";
        x
    }

    /// A Markdown grid for `$GITHUB_STEP_SUMMARY`: the pair table, then each cell that did not
    /// pass with why.
    pub fn markdown(&self) -> String {
        let names = self.preset_order();
        let mut m = format!("### natscope lab grid --app: {}\n\n", md(&self.app));
        m += &format!(
            "| a \\ b | {} |\n",
            names.iter().map(|n| md(n)).collect::<Vec<_>>().join(" | ")
        );
        m += &format!("|---|{}\n", "---|".repeat(names.len()));
        for (i, x) in names.iter().enumerate() {
            m += &format!("| **{}** |", md(x));
            for (j, y) in names.iter().enumerate() {
                let mark = match (j < i, self.cell(x, y)) {
                    (false, Some(c)) => md(&c.mark()),
                    _ => String::new(),
                };
                m += &format!(" {mark} |");
            }
            m += "\n";
        }
        m += "\n";
        for c in &self.cells {
            if let Some(why) = c.failure() {
                m += &format!("- **{} ↔ {}**: {}\n", md(&c.a), md(&c.b), md(&why));
            }
        }
        m += &format!("\n{}\n", md(&self.summary()));
        m
    }
}

impl AppGridDocument {
    /// One self-contained HTML page (inline style, no script, nothing fetched): the pair grid
    /// coloured direct / relayed / failed, each cell's expected and observed path, and a click
    /// on a cell opens its reason, evidence and logs.
    pub fn html(&self) -> String {
        let names = self.preset_order();
        let mut h = String::from(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>",
        );
        h += &xml(&format!("natscope lab grid: {}", self.app));
        h += "</title>\n<style>\n\
            body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\n\
            td,th{border:1px solid #999;padding:.3em .5em;vertical-align:top}\n\
            .direct{background:#c8f0c8}.relayed{background:#f6e7a6}.failed,.error{background:#f4b8b8}\n\
            .bad{outline:3px solid #b00}pre{white-space:pre-wrap;max-width:60em;font-size:85%}\n\
            </style></head><body>\n";
        h += &format!(
            "<h1>{}</h1>\n<p>{}</p>\n",
            xml(&self.app),
            xml(&self.summary())
        );
        h += "<table><tr><th>a \\ b</th>";
        for n in &names {
            h += &format!("<th>{}</th>", xml(n));
        }
        h += "</tr>\n";
        for (i, x) in names.iter().enumerate() {
            h += &format!("<tr><th>{}</th>", xml(x));
            for (j, y) in names.iter().enumerate() {
                let Some(c) = self.cell(x, y).filter(|_| j >= i) else {
                    h += "<td></td>";
                    continue;
                };
                let class = c.observed.map_or("error", PathTaken::as_str);
                let bad = if c.pass { "" } else { " bad" };
                h += &format!(
                    "<td class=\"{class}{bad}\"><details><summary>{}</summary>\
                     <p>expected {} ({}): {}</p><p>{}</p><pre>{}</pre></details></td>",
                    xml(&c.mark()),
                    c.expected,
                    xml(&c.expected_from),
                    xml(&c.reason),
                    xml(&c.failure().unwrap_or_else(|| "as expected".into())),
                    xml(&format!("{}\n\n{}", evidence_text(c), logs_text(c)))
                );
            }
            h += "</tr>\n";
        }
        h += "</table>\n</body></html>\n";
        h
    }
}

/// A cell's evidence in words, for reports.
pub fn evidence_text(c: &AppCell) -> String {
    let Some(e) = &c.evidence else {
        return "no evidence: the connect command never ran".into();
    };
    let side = |name: &str, s: &SideEvidence| {
        format!(
            "{name} (router {}): to peer {} pkts/{} B, from peer delivered {} pkts/{} B, refused {}, \
             to rendezvous {} pkts/{} B, from rendezvous {} pkts/{} B",
            s.router.as_deref().unwrap_or("none"),
            s.to_peer.packets,
            s.to_peer.bytes,
            s.from_peer_delivered.packets,
            s.from_peer_delivered.bytes,
            s.from_peer_refused,
            s.to_rendezvous.packets,
            s.to_rendezvous.bytes,
            s.from_rendezvous.packets,
            s.from_rendezvous.bytes
        )
    };
    let mut t = format!(
        "direct a→b delivered {} pkts/{} B, b→a delivered {} pkts/{} B; {}; {}",
        e.direct_a_to_b.packets,
        e.direct_a_to_b.bytes,
        e.direct_b_to_a.packets,
        e.direct_b_to_a.bytes,
        side("a", &e.a),
        side("b", &e.b)
    );
    if !e.unobserved.is_empty() {
        t += &format!("; unobserved: {}", e.unobserved.join(", "));
    }
    t
}

fn logs_text(c: &AppCell) -> String {
    let mut t = String::new();
    for (role, log) in &c.logs {
        t += &format!(
            "[{role} stdout]\n{}\n[{role} stderr]\n{}\n",
            log.stdout_tail, log.stderr_tail
        );
    }
    t
}

/// Text as XML character data or attribute value: the five escapes, other control characters
/// (not allowed in XML 1.0) dropped.
pub fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// Text inside a Markdown table cell: pipes escaped, line breaks flattened.
fn md(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(remote: &str, out: u64, delivered: u64, refused: u64) -> FlowRow {
        FlowRow {
            proto: natscope_core::nat::Protocol::Udp,
            internal: "10.0.0.2:5000".parse().unwrap(),
            external: Some("203.0.113.1:5000".parse().unwrap()),
            remote: remote.parse().unwrap(),
            out_packets: out,
            out_bytes: out * 100,
            in_packets: delivered,
            in_bytes: delivered * 100,
            in_refused: refused,
        }
    }

    fn cell(exit: Option<i32>, evidence: Option<Evidence>) -> AppCell {
        AppCell {
            a: "full-cone".into(),
            b: "symmetric".into(),
            expected: PathTaken::Direct,
            expected_from: "model".into(),
            reason: "why".into(),
            observed: None,
            claimed: None,
            disagreement: None,
            pass: false,
            exit_status: exit,
            timed_out: exit.is_none(),
            error: None,
            evidence,
            durations: Durations::default(),
            logs: BTreeMap::new(),
        }
    }

    fn side(flows: Vec<FlowRow>) -> SideEvidence {
        let mut s = SideEvidence {
            router: Some("nat".into()),
            ..Default::default()
        };
        s.flows = flows;
        tally(&mut s, &["198.51.100.1".parse().unwrap()]);
        s
    }

    fn ev(a: Vec<FlowRow>, b: Vec<FlowRow>) -> Evidence {
        let (a, b) = (side(a), side(b));
        Evidence {
            rendezvous: vec!["198.51.100.1".parse().unwrap()],
            rendezvous6: vec![],
            direct_a_to_b: b.from_peer_delivered,
            direct_b_to_a: a.from_peer_delivered,
            a,
            b,
            unobserved: vec![],
        }
    }

    /// Issue 13: flows to the rendezvous host's IPv6 address (the server-reflexive IPv6
    /// Binding) are the rendezvous's, not the peer's; IPv6 flows to the peer are the direct path.
    #[test]
    fn ipv6_flows_count_toward_the_rendezvous_or_the_peer_by_address() {
        let rendezvous6: Vec<Ipv6Addr> = vec!["2001:db8:0:1::1".parse().unwrap()];
        let mut s = SideEvidence {
            flows: vec![
                flow("[2001:db8:0:1::1]:3490", 1, 1, 0),
                flow("[2001:db8:102::2]:5000", 5, 5, 0),
                flow("198.51.100.1:3490", 2, 2, 0),
            ],
            ..Default::default()
        };
        tally_both(&mut s, &["198.51.100.1".parse().unwrap()], &rendezvous6);
        assert_eq!((s.to_rendezvous.packets, s.to_peer.packets), (3, 5));
        // 100-byte packets: 72 bytes of UDP payload over IPv4, 52 over IPv6.
        assert_eq!(s.to_peer.payload_bytes, 5 * 52);
        assert_eq!(s.to_rendezvous.payload_bytes, 52 + 2 * 72);
    }

    #[test]
    fn delivered_both_ways_is_direct() {
        let e = ev(
            vec![flow("203.0.113.9:7000", 5, 5, 0)],
            vec![flow("203.0.113.1:5000", 5, 5, 0)],
        );
        assert_eq!(observed_path(&e), Some(PathTaken::Direct));
    }

    #[test]
    fn a_refused_one_way_punch_then_the_server_is_relayed() {
        // a's punch packets reach b's NAT and are refused there; b never gets through to a.
        let e = ev(
            vec![
                flow("203.0.113.9:7000", 3, 0, 0),
                flow("198.51.100.1:4000", 9, 9, 0),
            ],
            vec![
                flow("203.0.113.1:5000", 0, 0, 3),
                flow("198.51.100.1:4000", 9, 9, 0),
            ],
        );
        assert_eq!(e.b.from_peer_refused, 3);
        assert_eq!(observed_path(&e), Some(PathTaken::Relayed));
        // One direction delivered is still not a direct path.
        let e = ev(
            vec![
                flow("203.0.113.9:7000", 3, 0, 0),
                flow("198.51.100.1:4000", 9, 9, 0),
            ],
            vec![flow("203.0.113.1:5000", 0, 3, 0)],
        );
        assert_eq!(observed_path(&e), Some(PathTaken::Relayed));
        assert_eq!(observed_path(&ev(vec![], vec![])), None);
        // Punch packets met both ways, but the data went through the relay.
        let e = ev(
            vec![
                flow("203.0.113.9:7000", 2, 2, 0),
                flow("198.51.100.1:4000", 30, 30, 0),
            ],
            vec![
                flow("203.0.113.1:5000", 2, 2, 0),
                flow("198.51.100.1:4000", 30, 30, 0),
            ],
        );
        assert_eq!(observed_path(&e), Some(PathTaken::Relayed));
        // b's answers came straight, but a's data went through the relay (seen with natscope
        // punch, full cone to symmetric): not a direct path.
        let e = ev(
            vec![
                flow("203.0.113.9:7000", 5, 17, 0),
                flow("198.51.100.1:4000", 9, 1, 0),
            ],
            vec![
                flow("203.0.113.1:5000", 17, 5, 0),
                flow("198.51.100.1:4000", 1, 9, 0),
            ],
        );
        assert_eq!(observed_path(&e), Some(PathTaken::Relayed));
    }

    /// Seen in the plain grid, restricted cone to symmetric over TCP: b's connection to a's
    /// mapping got through and b sent on it, but a only acknowledged (its punch never accepted
    /// the stream) while its data went through the relay. Raw bytes both ways were about even;
    /// application bytes show a carried nothing directly.
    #[test]
    fn a_stream_one_side_only_acknowledges_is_not_direct() {
        let tcp = |remote: &str, out: u64, out_bytes: u64, delivered: u64, in_bytes: u64| FlowRow {
            proto: natscope_core::nat::Protocol::Tcp,
            out_bytes,
            in_bytes,
            ..flow(remote, out, delivered, 0)
        };
        let e = ev(
            vec![
                tcp("198.51.100.1:3490", 52, 5448, 47, 5148),
                tcp("203.0.113.2:12351", 105, 5636, 106, 6584),
            ],
            vec![
                tcp("198.51.100.1:3490", 41, 4752, 47, 5108),
                tcp("203.0.113.1:44419", 106, 6584, 105, 5636),
            ],
        );
        assert!(
            e.direct_a_to_b.bytes >= e.a.to_rendezvous.bytes,
            "raw bytes"
        );
        assert_eq!(e.direct_a_to_b.payload_bytes, 5636 - 105 * 52);
        assert_eq!(observed_path(&e), Some(PathTaken::Relayed));
    }

    #[test]
    fn a_false_claim_is_flagged_and_fails_the_cell() {
        let relayed = ev(
            vec![flow("198.51.100.1:4000", 9, 9, 0)],
            vec![flow("198.51.100.1:4000", 9, 9, 0)],
        );
        let mut c = cell(Some(0), Some(relayed));
        c.expected = PathTaken::Relayed;
        c.claimed = claim("hello\n{\"path\": \"direct\"}\n\n");
        judge(&mut c);
        assert_eq!(c.observed, Some(PathTaken::Relayed));
        assert_eq!(c.claimed, Some(PathTaken::Direct));
        assert_eq!(
            c.disagreement.as_deref(),
            Some("the app says direct, the lab saw relayed")
        );
        assert!(!c.pass);
        c.claimed = Some(PathTaken::Relayed);
        judge(&mut c);
        assert!(c.pass && c.disagreement.is_none());
    }

    #[test]
    fn a_failed_or_killed_connect_is_failed_whatever_flowed() {
        let direct = ev(
            vec![flow("203.0.113.9:7000", 5, 5, 0)],
            vec![flow("203.0.113.1:5000", 5, 5, 0)],
        );
        let mut c = cell(Some(1), Some(direct.clone()));
        judge(&mut c);
        assert_eq!(c.observed, Some(PathTaken::Failed));
        let mut c = cell(None, Some(direct));
        c.logs.insert(
            "connect".into(),
            RoleLog {
                stdout_tail: String::new(),
                stderr_tail: "one\nstill waiting".into(),
            },
        );
        judge(&mut c);
        assert_eq!(c.observed, Some(PathTaken::Failed));
        assert_eq!(c.reason, "why (connect killed at timeout_s: still waiting)");
        let mut c = cell(None, None);
        c.timed_out = false;
        c.error = Some("lab".into());
        judge(&mut c);
        assert_eq!(c.observed, None);
        assert!(!c.pass);
    }

    #[test]
    fn flows_are_an_aligned_table() {
        let t = flows_table(&[
            flow("198.51.100.1:4000", 2, 1, 0),
            flow("203.0.113.9:7000", 12, 0, 3),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("proto  internal"), "{t}");
        assert!(
            lines[2].contains("203.0.113.9:7000   12 pkt / 1200 B  0 pkt / 0 B    3"),
            "{t}"
        );
        let col = |l: &str| l.find("10.0.0.2").unwrap();
        assert_eq!(col(lines[1]), col(lines[2]));
    }

    #[test]
    fn claims_are_the_last_line_only() {
        assert_eq!(claim("{\"path\":\"relayed\"}"), Some(PathTaken::Relayed));
        assert_eq!(claim("{\"path\":\"direct\"}\nbye\n"), None);
        assert_eq!(claim("{\"path\":\"sideways\"}"), None);
        assert_eq!(claim(""), None);
    }

    #[test]
    fn counts_over_the_run_are_differences() {
        let before = vec![flow("198.51.100.1:4000", 2, 2, 0)];
        let after = vec![
            flow("198.51.100.1:4000", 2, 2, 0),
            flow("203.0.113.9:7000", 1, 0, 4),
        ];
        let d = difference(&before, &after);
        assert_eq!(d.len(), 1, "the unchanged flow is left out");
        assert_eq!((d[0].out_packets, d[0].in_refused), (1, 4));
    }

    #[test]
    fn proc_net_tables_are_read() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   0: 00000000:0FA0 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n";
        assert!(sockets_on(udp, 4000, false));
        assert!(!sockets_on(udp, 4001, false));
        let tcp = "  sl  local_address rem_address   st\n\
                   0: 0100007F:0FA1 00000000:0000 0A 0\n\
                   1: 0100007F:0FA2 0200007F:1000 01 0\n";
        assert!(sockets_on(tcp, 4001, true));
        assert!(!sockets_on(tcp, 4002, true), "established, not listening");
        // udp6 (a dual-stack socket bound to [::]:4242, as nebula's).
        let udp6 = "  sl  local_address                         remote_address                        st\n\
                    0: 00000000000000000000000000000000:1092 00000000000000000000000000000000:0000 07\n";
        assert!(sockets_on(udp6, 4242, false));
    }

    fn doc() -> AppGridDocument {
        let direct = ev(
            vec![flow("203.0.113.9:7000", 5, 5, 0)],
            vec![flow("203.0.113.1:5000", 5, 5, 0)],
        );
        let mut ok = cell(Some(0), Some(direct));
        ok.logs.insert(
            "connect".into(),
            RoleLog {
                stdout_tail: "<&\"'>\u{1}".into(),
                stderr_tail: String::new(),
            },
        );
        judge(&mut ok);
        let mut bad = cell(None, None);
        bad.a = "symmetric".into();
        bad.timed_out = false;
        bad.error = Some("lab for x: boom".into());
        judge(&mut bad);
        AppGridDocument {
            schema: SCHEMA.into(),
            natscope_version: natscope_core::document::version(),
            app: "demo|app".into(),
            pass: false,
            cells: vec![ok, bad],
            duration_ms: 1500.0,
            shard: None,
            presets: Vec::new(),
        }
    }

    #[test]
    fn junit_has_one_testcase_per_cell_and_escapes() {
        let x = doc().junit();
        assert_eq!(x.matches("<testcase ").count(), 2, "{x}");
        assert_eq!(x.matches("<error ").count(), 1, "{x}");
        assert!(
            x.contains("&lt;&amp;&quot;&apos;&gt;</system-out>")
                || x.contains("&lt;&amp;&quot;&apos;&gt;\n"),
            "{x}"
        );
        assert!(!x.contains('\u{1}'));
        assert!(x.contains("failures=\"0\" errors=\"1\""), "{x}");
    }

    #[test]
    fn markdown_is_a_pair_grid() {
        let m = doc().markdown();
        assert!(m.contains("| a \\ b | full-cone | symmetric |"), "{m}");
        assert!(m.contains("| **full-cone** |  | ✓ direct |"), "{m}");
        assert!(
            m.contains("| **symmetric** |  | ✗ error (want direct) |"),
            "{m}"
        );
        assert!(m.contains("demo\\|app: 1/2 cells as expected"), "{m}");
        assert!(
            m.contains("- **symmetric ↔ symmetric**: error: lab for x: boom"),
            "{m}"
        );
    }

    #[test]
    fn nft_counters_are_read_as_a_side() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.9"}},
            {"counter": {"family": "ip", "name": "to_peer", "table": "natscope_evidence", "handle": 1, "packets": 7, "bytes": 700}},
            {"counter": {"family": "ip", "name": "from_peer_delivered", "table": "natscope_evidence", "handle": 2, "packets": 5, "bytes": 500}},
            {"counter": {"family": "ip", "name": "from_peer_seen", "table": "natscope_evidence", "handle": 3, "packets": 8, "bytes": 800}},
            {"counter": {"family": "ip", "name": "to_rendezvous", "table": "natscope_evidence", "handle": 4, "packets": 2, "bytes": 90}},
            {"counter": {"family": "ip", "name": "from_rendezvous", "table": "natscope_evidence", "handle": 5, "packets": 1, "bytes": 60}}]}"#;
        let s = linux_side(json).unwrap();
        assert_eq!(
            s.to_peer,
            Count {
                packets: 7,
                bytes: 700,
                payload_bytes: 700 - 7 * 28
            }
        );
        assert_eq!(s.from_peer_delivered.packets, 5);
        assert_eq!(s.from_peer_refused, 3);
        assert_eq!(s.to_rendezvous.bytes, 90);
        assert_eq!(s.from_rendezvous.packets, 1);
        assert!(linux_side(r#"{"nftables": []}"#).is_none());
        let rules = counter_rules(
            "wan0",
            &[
                "198.51.100.1".parse().unwrap(),
                "198.51.100.2".parse().unwrap(),
            ],
        );
        assert!(
            rules
                .contains("ip saddr != { 198.51.100.1, 198.51.100.2 } meta l4proto { tcp, udp } counter name from_peer_seen"),
            "{rules}"
        );
        assert_eq!(rules.matches("counter name").count(), 5);
        let host = host_counter_rules(&["198.51.100.1".parse().unwrap()]);
        assert_eq!(host.matches("counter name").count(), 5, "{host}");
        assert!(
            host.contains("oifname != \"lo\" ip daddr != { 198.51.100.1 } meta l4proto { tcp, udp } counter name to_peer"),
            "{host}"
        );
    }

    #[test]
    fn shards_are_disjoint_and_merge_back_to_the_whole() {
        let names: Vec<String> = ["full-cone", "symmetric", "cgnat"]
            .map(String::from)
            .to_vec();
        let all = pairs(&names);
        assert_eq!(all.len(), 6);
        let mut whole = doc();
        whole.presets = names.clone();
        whole.cells.clear();
        for (a, b) in &all {
            let mut c = cell(Some(0), None);
            c.a = a.clone();
            c.b = b.clone();
            whole.cells.push(c);
        }
        let parts: Vec<AppGridDocument> = (1..=3)
            .map(|k| {
                let mut d = whole.clone();
                d.cells = shard(&whole.cells, k, 3)
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect();
                d.shard = Some(format!("{k}/3"));
                d
            })
            .collect();
        assert_eq!(parts.iter().map(|d| d.cells.len()).sum::<usize>(), 6);
        // Any order of the shards gives the unsharded cells, cell for cell.
        let merged = merge(vec![parts[2].clone(), parts[0].clone(), parts[1].clone()]).unwrap();
        assert_eq!(merged.cells, whole.cells);
        assert!(
            merge(vec![parts[0].clone(), parts[0].clone()]).is_err(),
            "a cell twice"
        );
        let mut other = parts[1].clone();
        other.app = "else".into();
        assert!(merge(vec![parts[0].clone(), other]).is_err(), "two apps");
        assert_eq!(parse_shard("2/3"), Ok((2, 3)));
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn html_is_one_page_with_nothing_to_fetch() {
        let h = doc().html();
        assert!(h.starts_with("<!DOCTYPE html>") && h.ends_with("</html>\n"));
        for external in ["http:", "https:", "src=", "href=", "@import", "url("] {
            assert!(!h.contains(external), "{external} in {h}");
        }
        assert!(h.contains("class=\"direct\""), "{h}");
        assert!(h.contains("class=\"error bad\""), "{h}");
        assert_eq!(h.matches("<details>").count(), 2);
        assert!(h.contains("demo|app"));
    }
}
