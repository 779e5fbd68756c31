//! The on-disk list of labs (`/run/natscope/labs/<name>.json`, tmpfs: gone after a reboot, like
//! the namespaces themselves). A lab writes its record before it creates its first namespace and
//! removes it after the last one is gone, so every `nsc-` namespace without a live owner is stale
//! by definition: `lab down --all` and the next `lab up` remove it, with every process inside.
//! An unprivileged user's labs are recorded under their own directory instead ([`dir`]); their
//! namespaces live in the supervisor's user namespace, which the record names, so a stale one's
//! processes are found through it ([`crate::rootless`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Deserializer, Serialize};

use crate::netns;
use crate::topology::PlannedNode;

/// Root's labs; see [`dir`].
pub const DIR: &str = "/run/natscope/labs";

/// Where this process's labs are recorded: [`DIR`] for root, `<state>/labs` for an unprivileged
/// user ([`crate::rootless::state_dir`]; a path that does not exist when that directory is
/// unusable, so nothing is read from a directory someone else controls — [`ensure_dir`] says why).
pub fn dir() -> PathBuf {
    if crate::rootless::active() {
        return crate::rootless::state_dir()
            .map(|s| s.join("labs"))
            .unwrap_or_else(|_| PathBuf::from("/nonexistent/natscope/labs"));
    }
    PathBuf::from(DIR)
}

/// Creates [`dir`] if missing and returns it.
pub fn ensure_dir() -> std::io::Result<PathBuf> {
    if crate::rootless::active() {
        crate::rootless::state_dir().map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let dir = dir();
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// What a lab records about itself for other `natscope` processes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub preset: Option<String>,
    /// The process that owns the lab (a `natscope lab up` supervisor or an in-process user).
    pub owner_pid: i32,
    /// The owner's start time (clock ticks since boot), so a recycled PID is not mistaken for it.
    pub owner_start: u64,
    /// Whether the owner is a `natscope lab` supervisor that tears down on SIGTERM.
    pub supervisor: bool,
    /// Unix socket of the supervisor's control channel (nat tables, counters), if any.
    pub control: Option<PathBuf>,
    /// The planned nodes ([`crate::topology::Plan::nodes`]). A node list this version cannot read
    /// (a record another natscope version wrote) reads as empty rather than making the whole
    /// record unreadable: the record is what keeps a live lab's namespaces from being taken for
    /// stale ones.
    #[serde(deserialize_with = "nodes_or_empty")]
    pub nodes: Vec<PlannedNode>,
    /// A rootless lab's user namespace (its inode), where every process of the lab runs: `lab
    /// exec` joins it, and a stale lab's leftovers are found in it. `None` for root's labs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userns: Option<u64>,
}

fn nodes_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PlannedNode>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

/// Whether `lab` may name a lab: the one rule, [`crate::check_lab_name`]. Every function here that
/// turns a name into a path or a namespace does nothing for a name that fails it, so a name like
/// `../x` or `/etc/x` never reaches the file system (the CLI refuses it earlier, with the reason).
pub fn valid(lab: &str) -> bool {
    crate::check_lab_name(lab).is_ok()
}

pub fn path_of(lab: &str) -> PathBuf {
    dir().join(format!("{lab}.json"))
}

/// The control socket of a `natscope lab up` supervisor.
pub fn control_path(lab: &str) -> PathBuf {
    dir().join(format!("{lab}.sock"))
}

/// Where a `natscope lab up` supervisor writes its stderr.
pub fn log_path(lab: &str) -> PathBuf {
    dir().join(format!("{lab}.log"))
}

/// Claims `record`'s name for a new lab: under a lock on the lab directory, removes stale labs
/// ([`cleanup_stale`]) and then [`create`]s the record. The lock keeps one process's stale sweep
/// from removing a lab another process has just claimed (both saw the same stale record of the
/// name; the first removed it and created its own, which the second then took for the stale one).
pub fn claim(record: &Record) -> std::io::Result<()> {
    let _lock = lock(&ensure_dir()?)?;
    cleanup_stale();
    create(record)
}

/// The exclusive lock on the lab directory `dir` that [`claim`] and [`sweep_stale`] hold.
fn lock(dir: &std::path::Path) -> std::io::Result<Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| std::io::Error::from(e))
}

/// [`cleanup_stale`] under the same lock as [`claim`], for commands other than `lab up` that
/// clean up after SIGKILLed supervisors (`lab status`): without the lock, a sweep could take a lab
/// that `lab up` has just claimed under a stale record's name for that stale lab.
pub fn sweep_stale() -> std::io::Result<Vec<String>> {
    let dir = dir();
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let _lock = lock(&dir)?;
    Ok(cleanup_stale())
}

/// Writes the record of a new lab, exclusively: of two processes creating a lab of one name, one
/// succeeds and the other gets [`std::io::ErrorKind::AlreadyExists`] and leaves the winner's
/// record alone. The record appears whole (written to a file of this process's own, then
/// hard-linked into place, which fails if the name exists), so no reader sees half of it.
pub fn create(record: &Record) -> std::io::Result<()> {
    if !valid(&record.name) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid lab name `{}`", record.name),
        ));
    }
    let dir = ensure_dir()?;
    // A file of this call's own: threads of one process may create labs too.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}.{call}.tmp",
        record.name,
        std::process::id()
    ));
    let linked = std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)
        .and_then(|_| std::fs::hard_link(&tmp, path_of(&record.name)));
    let _ = std::fs::remove_file(&tmp);
    linked
}

pub fn read(lab: &str) -> Option<Record> {
    if !valid(lab) {
        return None;
    }
    let bytes = std::fs::read(path_of(lab)).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    // A record names the file it is in; one that does not is not a lab's.
    (record.name == lab).then_some(record)
}

/// Where a lab keeps the files its nodes see as `/etc/hosts` and `/etc/resolv.conf`
/// ([`crate::resolver`]).
pub fn etc_path(lab: &str) -> PathBuf {
    dir().join(format!("{lab}.etc"))
}

/// Removes the lab's record and, if a supervisor left them, its control socket and log, and
/// its resolver files.
pub fn remove(lab: &str) {
    if !valid(lab) {
        return;
    }
    for p in [path_of(lab), control_path(lab), log_path(lab)] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(etc_path(lab));
}

/// Every recorded lab, by name.
pub fn list() -> Vec<Record> {
    let Ok(dir) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut v: Vec<Record> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            read(n.strip_suffix(".json")?)
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub fn owner_alive(r: &Record) -> bool {
    start_time(r.owner_pid) == Some(r.owner_start)
}

/// The lab part of a namespace name `nsc-<lab>-<node>`.
pub fn lab_of_namespace(ns: &str) -> Option<&str> {
    ns.strip_prefix(netns::PREFIX)?
        .split_once('-')
        .map(|(l, _)| l)
}

/// The `nsc-` namespaces that exist for `lab`, whoever created them.
pub fn namespaces_of(lab: &str) -> Vec<String> {
    if !valid(lab) {
        return Vec::new();
    }
    netns::list_lab_namespaces()
        .into_iter()
        .filter(|n| lab_of_namespace(n) == Some(lab))
        .collect()
}

/// Kills every process inside the lab's namespaces, then removes the namespaces and the record.
/// Returns how many namespaces were removed.
pub fn force_remove(lab: &str) -> usize {
    kill_userns_of(lab);
    let names = namespaces_of(lab);
    let inodes: Vec<u64> = names.iter().filter_map(|n| netns::inode_of(n)).collect();
    kill_in(&inodes);
    let mut removed = 0;
    for n in &names {
        if netns::remove_named(n).is_ok() {
            removed += 1;
        }
    }
    remove(lab);
    removed
}

/// A rootless lab's processes: everything in the user namespace its record names, unless a live
/// lab (or this process) is in that namespace: a namespace inode is reused once its namespace is
/// gone.
fn kill_userns_of(lab: &str) {
    let Some(userns) = read(lab).and_then(|r| r.userns) else {
        return;
    };
    let claimed = crate::rootless::userns_self() == Some(userns)
        || list()
            .iter()
            .any(|r| r.name != lab && r.userns == Some(userns) && owner_alive(r));
    if !claimed {
        kill_all(&crate::rootless::processes_in_userns(userns));
    }
}

/// How long processes get between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_millis(500);
/// How long a round waits for SIGKILLed processes to exit before the next scan.
pub const KILL_WAIT: Duration = Duration::from_millis(200);
/// The bound on [`kill_in`]: at most this many rounds…
pub const MAX_ROUNDS: usize = 50;
/// …and this much time after the first round's grace period.
pub const MAX_TIME: Duration = Duration::from_secs(5);

/// What [`kill_in`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Scans that found processes (each followed by signals).
    pub rounds: usize,
    /// Signals delivered, SIGTERM and SIGKILL together.
    pub signals: usize,
    /// Processes still in the namespaces when the bound ran out (empty: none is left).
    pub survivors: Vec<i32>,
}

/// Removes every process from the namespaces `inodes`, and only those: scans /proc, holds each
/// process found by a pidfd ([`netns::members`]), re-checks its namespace right before each
/// signal, and scans again until a scan finds nobody — a process forked after a scan (a shell
/// loop, a daemon's worker) is found by the next one. The first round sends SIGTERM and waits up
/// to [`GRACE`] before SIGKILL; later rounds (what was forked meanwhile) get SIGKILL at once. Gives
/// up after [`MAX_ROUNDS`] rounds or [`MAX_TIME`] past the first round and reports who survived
/// (a process stuck in the kernel, or one forking faster than it is killed). A scan holds at most
/// [`netns::MEMBERS_PER_SCAN`] processes; in a lab with more, the rest are left to the next scans
/// (and get SIGKILL without a SIGTERM first). Never signals the calling process.
pub fn kill_in(inodes: &[u64]) -> Reaped {
    use rustix::process::Signal;
    let mut reaped = Reaped::default();
    let mut limit: Option<Instant> = None;
    loop {
        let scan = netns::members(inodes);
        if scan.is_empty() {
            return reaped;
        }
        let members = &scan.members;
        if reaped.rounds >= MAX_ROUNDS || limit.is_some_and(|l| Instant::now() >= l) {
            reaped.survivors = members.iter().map(netns::Member::pid).collect();
            reaped.survivors.extend(&scan.unheld);
            tracing::warn!(
                survivors = ?reaped.survivors,
                rounds = reaped.rounds,
                "processes survived the lab's teardown"
            );
            return reaped;
        }
        let count = |sig| {
            members
                .iter()
                .filter(|m| m.signal_if_in(inodes, sig))
                .count()
        };
        if reaped.rounds == 0 {
            reaped.signals += count(Signal::TERM);
            netns::wait_exited(members, GRACE);
            limit = Some(Instant::now() + MAX_TIME);
        }
        reaped.signals += count(Signal::KILL);
        if members.is_empty() {
            // Nobody could be held this time (out of file descriptors?): do not spin.
            std::thread::sleep(Duration::from_millis(10));
        }
        netns::wait_exited(members, KILL_WAIT);
        reaped.rounds += 1;
    }
}

/// SIGTERM, a short grace period, then SIGKILL to each of `pids` that still runs; never our own
/// process. Each process is held by a pidfd from before the first signal, so the SIGKILL cannot
/// reach another process that got a PID after its owner exited.
pub fn kill_all(pids: &[i32]) {
    use rustix::process::Signal;
    let me = std::process::id() as i32;
    let members: Vec<netns::Member> = pids
        .iter()
        .copied()
        .filter(|p| *p != me)
        .filter_map(netns::Member::open)
        .collect();
    for m in &members {
        m.signal(Signal::TERM);
    }
    if netns::wait_exited(&members, GRACE) {
        return;
    }
    for m in members.iter().filter(|m| !m.exited()) {
        m.signal(Signal::KILL);
    }
}

/// Removes labs whose owner is gone and `nsc-` namespaces no lab claims. Returns their names.
pub fn cleanup_stale() -> Vec<String> {
    // Namespaces first, records second: a lab writes its record before its first namespace, so
    // every namespace seen here belongs to a record the later listing sees, unless it is stale.
    // (The other order races with a lab coming up between the two listings.)
    let namespaces = netns::list_lab_namespaces();
    let records = list();
    let mut removed = Vec::new();
    for r in &records {
        if !owner_alive(r) {
            force_remove(&r.name);
            removed.push(r.name.clone());
        }
    }
    let mut orphans: Vec<String> = namespaces
        .iter()
        .filter_map(|n| lab_of_namespace(n).map(str::to_string))
        .filter(|l| valid(l))
        .filter(|l| !records.iter().any(|r| &r.name == l))
        .collect();
    orphans.dedup();
    for l in orphans {
        force_remove(&l);
        if !removed.contains(&l) {
            removed.push(l);
        }
    }
    removed
}

/// Stops one lab, whoever owns it: a supervisor gets SIGTERM and up to `grace` to tear down
/// itself; whatever is left is removed by force. Nothing is touched for an invalid name.
pub fn down(lab: &str, grace: Duration) -> bool {
    if !valid(lab) {
        return false;
    }
    let record = read(lab);
    let known = record.is_some() || !namespaces_of(lab).is_empty();
    if let Some(r) = record.as_ref().filter(|r| r.supervisor) {
        // The pidfd first, the start-time check second: if the check passes, the pidfd already
        // pointed at the supervisor, so neither signal can reach a process that reused its PID.
        if let Some(owner) = netns::Member::open(r.owner_pid).filter(|_| owner_alive(r)) {
            use rustix::process::Signal;
            owner.signal(Signal::TERM);
            if !netns::wait_exited(std::slice::from_ref(&owner), grace) {
                owner.signal(Signal::KILL);
            }
        }
    }
    force_remove(lab);
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_json(nodes: &str) -> String {
        format!(
            r#"{{"name":"t","preset":"open","owner_pid":42,"owner_start":7,"supervisor":true,
                "control":null,"nodes":{nodes}}}"#
        )
    }

    /// A name that would leave the lab directory, or name something else in it, is no lab name:
    /// no path is built for it, and nothing is read or removed.
    #[test]
    fn path_like_names_are_not_lab_names() {
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "../../etc/x",
            "/etc/passwd",
            "/tmp/x",
            "x/y",
            "x/..",
            ".x",
            "x.json",
            "x\0",
            "x y",
            "X",
            "-x",
            "x-y",
            "nsc-x",
            "abcdefghijk",
            "\u{e9}",
        ] {
            assert!(!valid(bad), "{bad:?}");
            assert!(crate::check_lab_name(bad).is_err(), "{bad:?}");
            assert!(read(bad).is_none(), "{bad:?}");
            assert!(namespaces_of(bad).is_empty(), "{bad:?}");
            assert!(!down(bad, Duration::ZERO), "{bad:?}");
        }
        for good in ["a", "lab", "x1", "abcdefghij", "0"] {
            assert!(valid(good), "{good}");
        }
        let err = crate::check_lab_name("../x").unwrap_err().to_string();
        assert_eq!(
            err,
            "lab name `../x` is invalid: use 1-10 characters a-z and 0-9"
        );
    }

    /// The record is read typed; a node list from another version does not hide a live lab.
    #[test]
    fn a_record_reads_typed_and_survives_an_unreadable_node_list() {
        let plan = crate::presets::preset("port-restricted-cone")
            .unwrap()
            .plan()
            .unwrap();
        let nodes = serde_json::to_string(&plan.nodes).unwrap();
        let rec: Record = serde_json::from_str(&record_json(&nodes)).unwrap();
        assert_eq!(rec.nodes, plan.nodes);
        // What older versions wrote: the same nodes through a `serde_json::Value` (keys sorted).
        let sorted = serde_json::to_value(&plan.nodes).unwrap().to_string();
        let rec: Record = serde_json::from_str(&record_json(&sorted)).unwrap();
        assert_eq!(rec.nodes, plan.nodes);

        let rec: Record =
            serde_json::from_str(&record_json(r#"[{"name":"h1","role":"satellite"}]"#)).unwrap();
        assert_eq!((rec.name.as_str(), rec.owner_pid), ("t", 42));
        assert!(rec.nodes.is_empty());
    }
}
