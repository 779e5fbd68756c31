//! The lab supervisor and its control channel.
//!
//! `natscope lab up` starts a detached supervisor process that owns one lab — its namespaces, NAT
//! engines and reflectors — until SIGTERM, SIGINT or SIGHUP ([`supervise`]); [`launch`] starts it
//! and waits for its one-line "ready" (or "error: …"). Other processes ask the supervisor for live
//! NAT state over a Unix socket next to the lab's record: one JSON [`Request`] line in, one JSON
//! [`Reply`] line out ([`ask`]). Both sides share these types, so the protocol is checked by the
//! compiler rather than by key strings.
//!
//! The lookups `lab status`, `lab nat-table` and `lab exec` share ([`pick_lab`], [`pick_node`],
//! [`lab_status`]) and the source of a lab ([`load_plan`]: a preset name or a TOML file) live here
//! too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigError};
use crate::engine::{FlowRow, MappingRow, Stats};
use crate::registry::{self, log_path, Record};
use crate::topology::{Plan, Topology, TopologyError};
use crate::{presets, Lab, LabStatus, StatusDocument};

/// One request to a supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Mapping counts and counters of every userspace NAT node.
    Stats,
    /// One NAT node's live mappings.
    NatTable { node: String },
    /// One NAT node's per-flow packet and byte counters.
    Flows { node: String },
}

/// A supervisor's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// Per userspace NAT node, by name.
    Stats(BTreeMap<String, NodeStats>),
    NatTable(NatTableDocument),
    Flows(Vec<FlowRow>),
    /// The request named something the lab does not have, or was not understood.
    Error(String),
}

/// One userspace NAT node's state in a [`Reply::Stats`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    pub mappings: usize,
    pub counters: Stats,
}

/// The `schema` of `natscope lab nat-table --json`.
pub const NAT_TABLE_SCHEMA: &str = "natscope.nat-table/v1";

/// A NAT node's live mappings; also the `natscope lab nat-table --json` document
/// (`natscope.nat-table/v1`). `schema` and `natscope_version` are read with defaults, so the CLI
/// still understands a supervisor from before they were added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NatTableDocument {
    /// Always [`NAT_TABLE_SCHEMA`].
    #[serde(default = "nat_table_schema")]
    #[schemars(extend("const" = NAT_TABLE_SCHEMA))]
    pub schema: String,
    /// The version of natscope that wrote the document.
    #[serde(default)]
    pub natscope_version: String,
    pub mappings: Vec<MappingRow>,
}

fn nat_table_schema() -> String {
    NAT_TABLE_SCHEMA.to_string()
}

impl NatTableDocument {
    /// The document of `mappings`, written by this version of natscope.
    pub fn new(mappings: Vec<MappingRow>) -> Self {
        Self {
            schema: NAT_TABLE_SCHEMA.to_string(),
            natscope_version: natscope_core::document::version(),
            mappings,
        }
    }
}

/// Why a lab could not be started, supervised or found.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Kept as text only, as `lab up` has always printed it.
    #[error("{0}")]
    Config(ConfigError),
    #[error(transparent)]
    Pair(#[from] presets::PairError),
    #[error("unknown preset `{name}`; presets: {known} (or give a .toml file)")]
    UnknownPreset { name: String, known: String },
    #[error("{name}: {error}")]
    Topology { name: String, error: TopologyError },
    #[error("a lab named `{0}` is already running (natscope lab down {0})")]
    AlreadyRunning(String),
    #[error("cannot create {path}: {source}")]
    RegistryDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the lab supervisor: {0}")]
    Spawn(std::io::Error),
    #[error("reading the supervisor's answer: {0}")]
    Answer(std::io::Error),
    #[error("the lab supervisor exited without a word; see {0}")]
    Silent(PathBuf),
    /// The supervisor's own one-line error.
    #[error("{0}")]
    Supervisor(String),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers")]
    Signals,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no lab named `{0}` is running (see natscope lab status)")]
    NoSuchLab(String),
    #[error(transparent)]
    BadName(crate::LabError),
    #[error("no lab is running; start one with `natscope lab up PRESET`")]
    NoLab,
    #[error("several labs are running ({0}); choose one with --lab NAME")]
    SeveralLabs(String),
    #[error("lab {lab} has no node `{node}` (nodes: {nodes})")]
    NoSuchNode {
        lab: String,
        node: String,
        nodes: String,
    },
    #[error("lab {0} has no supervisor any more (natscope lab down {0} removes what is left)")]
    OwnerGone(String),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// A preset name or a TOML file, validated and planned (nothing is created yet).
pub fn load_plan(source: &str) -> Result<Plan, ControlError> {
    if source.ends_with(".toml") || source.contains('/') {
        return config::load_and_plan(Path::new(source)).map_err(ControlError::Config);
    }
    if let Some(spec) = source.strip_prefix(presets::PAIR_PREFIX) {
        let topology = presets::pair(spec)?;
        return topology.plan().map_err(|error| ControlError::Topology {
            name: source.to_string(),
            error,
        });
    }
    let topology: Topology =
        presets::preset(source).ok_or_else(|| ControlError::UnknownPreset {
            name: source.to_string(),
            known: presets::names().join(", "),
        })?;
    topology.plan().map_err(|error| ControlError::Topology {
        name: source.to_string(),
        error,
    })
}

/// Starts `supervisor` (a process that runs [`supervise`] for lab `name`) detached, with its
/// stderr appended to the lab's log, and waits for its first line: `ready`, or `error: …`.
pub fn launch(name: &str, mut supervisor: Command) -> Result<(), ControlError> {
    crate::check_lab_name(name).map_err(ControlError::BadName)?;
    if registry::read(name).is_some_and(|r| registry::owner_alive(&r)) {
        return Err(ControlError::AlreadyRunning(name.to_string()));
    }
    // An unusable rootless state directory says why itself, not as a path it would not use.
    if crate::rootless::active() {
        crate::rootless::state_dir()?;
    }
    registry::ensure_dir().map_err(|source| ControlError::RegistryDir {
        path: registry::dir(),
        source,
    })?;
    // Appended to, never truncated: a lab of this name that came up meanwhile keeps its log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(name))
        .map_err(|source| ControlError::Log {
            path: log_path(name),
            source,
        })?;
    let mut child = supervisor
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal later must not take the lab down.
        .process_group(0)
        .spawn()
        .map_err(ControlError::Spawn)?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out)
            .take(64 * 1024)
            .read_line(&mut line)
            .map_err(ControlError::Answer)?;
    }
    let line = line.trim();
    if line != "ready" {
        let _ = child.wait();
        let msg = line.strip_prefix("error: ").unwrap_or(line);
        if msg.is_empty() {
            return Err(ControlError::Silent(log_path(name)));
        }
        // The error is in `msg`; no lab, so no log to keep.
        if registry::read(name).is_none() {
            let _ = std::fs::remove_file(log_path(name));
        }
        return Err(ControlError::Supervisor(msg.to_string()));
    }
    // The supervisor lives on; this process leaves it be (it is not our child to reap).
    std::mem::forget(child);
    Ok(())
}

/// The supervisor's life: answers [`Request`]s on `control` until SIGTERM, SIGINT or SIGHUP, then
/// takes the lab down. `ready` is called once the socket listens (`lab up` waits for it).
pub fn supervise(lab: Lab, control: &Path, ready: impl FnOnce()) -> Result<(), ControlError> {
    // A socket left by a supervisor of this name that died: the lab's record is ours now (it is
    // created exclusively), so no live lab uses it. Removed only here, never before `Lab::up`
    // succeeded, or the loser of two `lab up`s of one name would remove the winner's socket.
    let _ = std::fs::remove_file(control);
    let listener = bind_private(control).map_err(|source| ControlError::Listen {
        path: control.to_path_buf(),
        source,
    })?;
    listener.set_nonblocking(true)?;
    let signals = signal_flag()?;
    ready();
    while !signals.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => answer(&lab, stream),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(control);
    // Also removes the control socket and this supervisor's log.
    lab.down();
    Ok(())
}

/// Listens on `path` with a socket only its owner may connect to (mode 0600), whatever the umask:
/// it is bound in a fresh directory only the owner can enter, set to 0600 there, and then renamed
/// to `path`, so it is never reachable with wider permissions.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("control");
    let private = path.with_file_name(format!(".{name}.{}.d", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let bound = UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// A flag set by SIGTERM, SIGINT or SIGHUP (tokio's signal handling on a helper runtime).
fn signal_flag() -> Result<Arc<AtomicBool>, ControlError> {
    use tokio::signal::unix::{signal, SignalKind};
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            let sigs = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            );
            let (Ok(mut t), Ok(mut i), Ok(mut h)) = sigs else {
                let _ = ready_tx.send(false);
                return;
            };
            let _ = ready_tx.send(true);
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
                _ = h.recv() => {}
            }
            f.store(true, Ordering::SeqCst);
        });
    });
    if ready_rx.recv().unwrap_or(false) {
        Ok(flag)
    } else {
        Err(ControlError::Signals)
    }
}

/// What the supervisor of `lab` answers to `request`.
pub fn reply(lab: &Lab, request: &Request) -> Reply {
    match request {
        Request::Stats => Reply::Stats(
            lab.nodes()
                .iter()
                .filter_map(|n| {
                    let (table, counters) = (lab.nat_table(n.name())?, lab.nat_stats(n.name())?);
                    let stats = NodeStats {
                        mappings: table.len(),
                        counters,
                    };
                    Some((n.name().to_string(), stats))
                })
                .collect(),
        ),
        Request::NatTable { node } => match lab.nat_table(node) {
            Some(mappings) => Reply::NatTable(NatTableDocument::new(mappings)),
            None => Reply::Error(format!(
                "`{node}` is not a nat router of lab {}",
                lab.name()
            )),
        },
        Request::Flows { node } => match lab.nat_flows(node) {
            Some(flows) => Reply::Flows(flows),
            None => Reply::Error(format!(
                "`{node}` is not a userspace nat node of lab {}",
                lab.name()
            )),
        },
    }
}

/// One request line, one reply line.
fn answer(lab: &Lab, stream: UnixStream) {
    // Only the supervisor's own user (root, or for a rootless lab the user who started it, whom
    // the kernel shows as uid 0 of the lab's user namespace) is answered, even if the socket's
    // mode was widened.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    if peer.map_or(true, |c| c.uid() != nix::unistd::geteuid().as_raw()) {
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    // A client that never reads its reply must not hold the supervisor.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream).take(4096);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => reply(lab, &request),
        Err(_) => Reply::Error("unknown request".into()),
    };
    if let Ok(text) = serde_json::to_string(&reply) {
        let mut w = &stream;
        let _ = writeln!(w, "{text}");
    }
}

/// Asks the supervisor of `rec`; `None` when it has no control socket or does not answer.
pub fn ask(rec: &Record, request: &Request) -> Option<Reply> {
    let path = rec.control.as_ref()?;
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    writeln!(s, "{}", serde_json::to_string(request).ok()?).ok()?;
    let mut line = String::new();
    BufReader::new(s).take(16 << 20).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Per NAT node of `rec`, its state; empty when the supervisor does not answer (or there is none).
pub fn stats(rec: &Record) -> BTreeMap<String, NodeStats> {
    match ask(rec, &Request::Stats) {
        Some(Reply::Stats(s)) => s,
        _ => BTreeMap::new(),
    }
}

/// The lab a command means: the one named, or the only one running.
pub fn pick_lab(name: Option<String>) -> Result<Record, ControlError> {
    let mut records = registry::list();
    match name {
        Some(n) if !registry::valid(&n) => Err(ControlError::BadName(crate::LabError::BadName(n))),
        Some(n) => records
            .into_iter()
            .find(|r| r.name == n)
            .ok_or(ControlError::NoSuchLab(n)),
        None if records.len() > 1 => Err(ControlError::SeveralLabs(
            records
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )),
        None => records.pop().ok_or(ControlError::NoLab),
    }
}

/// The lab a command means (as [`pick_lab`]), checked to have a node named `node`.
pub fn pick_node(lab: Option<String>, node: &str) -> Result<Record, ControlError> {
    let rec = pick_lab(lab)?;
    let names = node_names(&rec);
    if !names.iter().any(|n| n == node) {
        return Err(ControlError::NoSuchNode {
            lab: rec.name,
            node: node.to_string(),
            nodes: names.join(", "),
        });
    }
    Ok(rec)
}

/// Moves this process into `node` of the lab `rec` records, for `lab exec` to replace itself
/// with the user's program there. A rootless lab's namespaces are reached through its
/// supervisor's user and mount namespaces first ([`crate::rootless::join`]); like that, this must
/// run before the process starts any thread.
pub fn enter_node(rec: &Record, node: &str) -> Result<(), ControlError> {
    if let Some(userns) = rec.userns {
        if !registry::owner_alive(rec) {
            return Err(ControlError::OwnerGone(rec.name.clone()));
        }
        crate::rootless::join(rec.owner_pid, userns)?;
    }
    crate::netns::enter(&crate::namespace_name(&rec.name, node))?;
    Ok(())
}

/// The names of the nodes `rec` planned.
pub fn node_names(rec: &Record) -> Vec<String> {
    rec.nodes.iter().map(|n| n.name.clone()).collect()
}

/// What `lab status` says about the lab `rec` records, with live mapping counts from its
/// supervisor (none when it does not answer).
pub fn lab_status(rec: &Record) -> LabStatus {
    let stats = stats(rec);
    LabStatus::of(rec, |node| stats.get(node).map(|s| s.mappings))
}

/// The `natscope.lab/v1` document of `records`.
pub fn status_document(records: &[Record]) -> StatusDocument {
    StatusDocument::new(records.iter().map(lab_status).collect())
}

/// Every lab to remove for `lab down --all`: recorded ones and those only namespaces remain of.
pub fn all_labs() -> Vec<String> {
    let mut names: Vec<String> = registry::list().into_iter().map(|r| r.name).collect();
    for ns in crate::netns::list_lab_namespaces() {
        // A namespace whose lab part is no valid lab name was not made by natscope: left alone.
        if let Some(l) = registry::lab_of_namespace(&ns).filter(|l| registry::valid(l)) {
            if !names.iter().any(|n| n == l) {
                names.push(l.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form of each request and reply: what an older or newer `natscope` on the other
    /// end of the socket must agree on.
    #[test]
    fn requests_and_replies_round_trip_in_their_wire_form() {
        let nat_table = Request::NatTable { node: "nat".into() };
        let text = serde_json::to_string(&nat_table).unwrap();
        assert_eq!(text, r#"{"request":"nat-table","node":"nat"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), nat_table);
        assert_eq!(
            serde_json::to_string(&Request::Stats).unwrap(),
            r#"{"request":"stats"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Flows {
                node: "nata".into()
            })
            .unwrap(),
            r#"{"request":"flows","node":"nata"}"#
        );

        let row = MappingRow {
            proto: natscope_core::nat::Protocol::Udp,
            internal: "10.0.1.2:4000".parse().unwrap(),
            external: "203.0.113.1:4000".parse().unwrap(),
            expires_in_ms: 1500,
            admits: vec!["*:*".into()],
            requested_by: None,
        };
        let mut stats = BTreeMap::new();
        stats.insert(
            "nat".to_string(),
            NodeStats {
                mappings: 1,
                counters: Stats::default(),
            },
        );
        for reply in [
            Reply::NatTable(NatTableDocument::new(vec![row.clone()])),
            Reply::Stats(stats),
            Reply::Flows(vec![crate::engine::FlowRow {
                proto: natscope_core::nat::Protocol::Udp,
                internal: "10.0.1.2:4000".parse().unwrap(),
                external: Some("203.0.113.1:4000".parse().unwrap()),
                remote: "198.51.100.1:3490".parse().unwrap(),
                out_packets: 3,
                out_bytes: 120,
                in_packets: 2,
                in_bytes: 80,
                in_refused: 1,
            }]),
            Reply::Error("`h1` is not a userspace nat node of lab t".into()),
        ] {
            let text = serde_json::to_string(&reply).unwrap();
            assert_eq!(
                serde_json::from_str::<Reply>(&text).unwrap(),
                reply,
                "{text}"
            );
        }
        // `lab nat-table --json` prints the table reply's body: the documented field names.
        let doc = serde_json::to_value(NatTableDocument::new(vec![row])).unwrap();
        assert_eq!(doc["schema"], NAT_TABLE_SCHEMA);
        assert_eq!(doc["mappings"][0]["proto"], "udp");
        assert_eq!(doc["mappings"][0]["external"], "203.0.113.1:4000");
        assert_eq!(doc["mappings"][0]["expires_in_ms"], 1500);
    }

    /// `lab status` from a lab's record: every planned node, its namespace, its addresses primary
    /// first, the supervisor's mapping counts where it has them; and the document reads back typed.
    #[test]
    fn a_lab_status_comes_from_the_record_and_reads_back_typed() {
        let plan = load_plan("port-restricted-cone").unwrap();
        let me = std::process::id() as i32;
        let rec = Record {
            name: "t".into(),
            preset: plan.preset.clone(),
            owner_pid: me,
            owner_start: registry::start_time(me).unwrap(),
            supervisor: true,
            control: None,
            nodes: plan.nodes.clone(),
            userns: None,
        };
        let status = LabStatus::of(&rec, |node| (node == "nat").then_some(3));
        assert!(status.running, "this test process is the owner");
        assert_eq!(status.preset.as_deref(), Some("port-restricted-cone"));
        let names: Vec<&str> = status.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["internet", "stun", "nat", "h1", "h2"]);
        let nat = &status.nodes[2];
        assert_eq!(nat.namespace, "nsc-t-nat");
        assert_eq!(
            nat.addresses,
            [
                "203.0.113.1/24",
                "10.1.0.1/24",
                "2001:db8:0:2::1/64",
                "2001:db8:0:2::2/64",
                "2001:db8:101::1/64"
            ]
        );
        assert_eq!(nat.mappings, Some(3));
        assert_eq!(nat.router, plan.nodes[2].router);
        assert_eq!(status.nodes[3].mappings, None);
        assert_eq!(status.nodes[3].router, None);

        let doc = StatusDocument::new(vec![status]);
        assert_eq!(doc.schema, "natscope.lab/v1");
        let text = serde_json::to_string(&serde_json::to_value(&doc).unwrap()).unwrap();
        assert_eq!(serde_json::from_str::<StatusDocument>(&text).unwrap(), doc);
        // A stale lab: the owner's start time does not match.
        let stale = Record {
            owner_start: rec.owner_start + 1,
            ..rec
        };
        assert!(!LabStatus::of(&stale, |_| None).running);
    }

    #[test]
    fn a_lab_source_is_a_preset_or_a_file() {
        assert!(load_plan("full-cone").is_ok());
        let err = load_plan("no-such-preset").unwrap_err().to_string();
        assert!(
            err.starts_with("unknown preset `no-such-preset`; presets: "),
            "{err}"
        );
        assert!(matches!(
            load_plan("/nonexistent/lab.toml"),
            Err(ControlError::Config(_))
        ));
    }
}
