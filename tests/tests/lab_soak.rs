//! Issue 15, the soak: labs come and go through the real `natscope` binary as root — labs with
//! seeded loss and delay carrying probe traffic, two `lab up`s (and `lab down`s) of one name at
//! once, several labs of different names up and down at once, supervisors SIGKILLed mid-life and
//! then cleaned up by the next `lab up`, `lab down` or `lab status` — and afterwards nothing of
//! any of them remains: no namespace, no process, no record, control socket or log, and no change
//! in the root namespace.
//!
//! Bounded: [`CYCLES`] cycles, and no new cycle starts after [`BUDGET`]. Other tests run labs
//! beside this one, so "nothing remains" is checked for this test's own labs (names starting with
//! `reap`) and the processes it saw in them; the root namespace check is the lab safety test's.
//! It prints what it did (run with `--nocapture` to see it).

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use natscope_lab::{netns, registry};
use natscope_probes::probe::ProbeReport;
use natscope_tests::lab::*;
use natscope_tests::{natscope_bin, ChildProcess, TempDir};

/// Cycles of the soak (each: a lossy lab with traffic, a same-name race, three labs at once, a
/// SIGKILLed supervisor).
const CYCLES: usize = 6;
/// No cycle starts after this much time, so a slow machine still finishes in about 2–3 minutes.
const BUDGET: Duration = Duration::from_secs(120);
/// How long one probe through a lossy lab may take before it counts as hung.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// A lab of one lossy, delaying port-restricted cone with a host behind it.
fn lossy_topology(loss: f64, delay_ms: u64, seed: u64) -> String {
    format!(
        "[[reflector]]\nname = \"stun\"\n\n[[nat]]\nname = \"nat\"\nbehavior = \"port-restricted-cone\"\n\
         loss = {loss}\ndelay_ms = {delay_ms}\nseed = {seed}\n\n[[host]]\nname = \"h1\"\nparent = \"nat\"\n"
    )
}

/// A process by PID and start time, so a recycled PID is never taken for it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    pid: i32,
    start: u64,
}

impl Seen {
    fn of(pid: i32) -> Option<Self> {
        registry::start_time(pid).map(|start| Self { pid, start })
    }
    /// Still running: same start time and not a zombie (a zombie holds no namespace).
    fn running(&self) -> bool {
        if registry::start_time(self.pid) != Some(self.start) {
            return false;
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state != "Z")
    }
}

#[derive(Default)]
struct Soak {
    names: Vec<String>,
    seen: Vec<Seen>,
    labs: usize,
    probes: usize,
    finished: usize,
    answered: usize,
    races: usize,
    concurrent: usize,
    kills: usize,
    cleaned_by: Vec<&'static str>,
}

impl Soak {
    fn name(&mut self) -> String {
        let n = lab_name("reaps");
        self.names.push(n.clone());
        n
    }

    /// Notes the lab's supervisor and every process in its namespaces, to check at the end that
    /// none of them is left.
    fn track(&mut self, name: &str) {
        let rec = registry::read(name).unwrap_or_else(|| panic!("no record of lab {name}"));
        let inodes: Vec<u64> = registry::namespaces_of(name)
            .iter()
            .filter_map(|n| netns::inode_of(n))
            .collect();
        let pids = std::iter::once(rec.owner_pid).chain(netns::processes_in(&inodes));
        self.seen.extend(pids.filter_map(Seen::of));
        self.labs += 1;
    }

    /// Fails unless nothing of lab `name` is left.
    fn assert_gone(&self, name: &str, what: &str) {
        let ns = registry::namespaces_of(name);
        assert!(ns.is_empty(), "{what}: namespaces of {name} left: {ns:?}");
        for p in [
            registry::path_of(name),
            registry::control_path(name),
            registry::log_path(name),
        ] {
            assert!(!p.exists(), "{what}: {} is left", p.display());
        }
    }
}

/// A failing soak still takes its labs down (and SIGKILLs what it saw in them).
impl Drop for Soak {
    fn drop(&mut self) {
        for name in &self.names {
            if registry::read(name).is_some() || !registry::namespaces_of(name).is_empty() {
                let _ = natscope(&["lab", "down", name]);
            }
        }
        let left: Vec<i32> = self
            .seen
            .iter()
            .filter(|s| s.running())
            .map(|s| s.pid)
            .collect();
        registry::kill_all(&left);
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(natscope_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start natscope {args:?}: {e}"))
}

/// Runs the commands at once and returns their outputs in order.
fn at_once(commands: &[Vec<&str>]) -> Vec<Output> {
    let children: Vec<Child> = commands.iter().map(|c| spawn(c)).collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait for natscope"))
        .collect()
}

fn ok(o: &Output, what: &str) {
    assert_eq!(o.status.code(), Some(0), "{what}\n{}", text(o));
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the supervisor");
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A probe from h1 against the lab's reflector, started through `lab exec`.
fn start_probe(name: &str) -> ChildProcess {
    let bin = natscope_bin();
    let mut cmd = Command::new(&bin);
    cmd.args(["lab", "exec", "--lab", name, "h1", "--"])
        .arg(&bin)
        .args(["probe", "198.51.100.1:3478", "--json", "--no-hairpin"]);
    ChildProcess::spawn(cmd).expect("start the probe")
}

/// 1. A lab with loss and delay carries a probe; on odd cycles its supervisor is SIGKILLed while
///    the probe runs, and `lab down` then removes the lab and the probe inside it.
fn lossy_lab(soak: &mut Soak, dir: &TempDir, cycle: usize) {
    let name = soak.name();
    let loss = [0.1, 0.2, 0.3][cycle % 3];
    let delay_ms = [5, 10, 20][cycle % 3];
    let file = dir.path().join(format!("lossy{cycle}.toml"));
    std::fs::write(&file, lossy_topology(loss, delay_ms, cycle as u64 + 1)).unwrap();
    let file = file.to_string_lossy().into_owned();
    ok(
        &natscope(&["lab", "up", &file, "--name", &name]),
        "lab up of a lossy lab",
    );
    soak.track(&name);
    let mut probe = start_probe(&name);
    let killed = cycle % 2 == 1;
    if killed {
        std::thread::sleep(Duration::from_millis(500));
        let rec = registry::read(&name).expect("record");
        sigkill(rec.owner_pid);
        soak.kills += 1;
        wait_until("the supervisor to die", Duration::from_secs(10), || {
            !registry::owner_alive(&rec)
        });
        ok(&natscope(&["lab", "down", &name]), "lab down after SIGKILL");
        soak.cleaned_by.push("down");
        // The probe ran in the lab's namespace: the teardown removed it too.
        assert!(
            probe.wait_timeout(Duration::from_secs(10)).is_some(),
            "the probe outlived its lab\n{}",
            probe.diagnostics()
        );
    } else {
        let status = probe.wait_timeout(PROBE_LIMIT);
        assert!(
            status.is_some(),
            "the probe did not finish in {PROBE_LIMIT:?}\n{}",
            probe.diagnostics()
        );
        let report: ProbeReport = serde_json::from_str(&probe.stdout()).unwrap_or_else(|e| {
            panic!(
                "no probe document ({e}) at loss {loss}\n{}",
                probe.diagnostics()
            )
        });
        soak.finished += 1;
        soak.answered += usize::from(report.public_address.is_some());
        ok(
            &natscope(&["lab", "down", &name]),
            "lab down of a lossy lab",
        );
    }
    soak.probes += 1;
    soak.assert_gone(&name, "lossy lab");
}

/// 2. Two `lab up`s of one name at once: one wins, the other exits 2; then two `lab down`s of it
///    at once: at least one succeeds and nothing is left.
fn same_name(soak: &mut Soak) {
    let name = soak.name();
    let up = vec!["lab", "up", "open", "--name", name.as_str()];
    let outs = at_once(&[up.clone(), up]);
    let mut codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    codes.sort();
    if codes != [Some(0), Some(2)] {
        let _ = natscope(&["lab", "down", &name]);
        panic!(
            "two lab ups of {name}: {codes:?}\n{}\n{}",
            text(&outs[0]),
            text(&outs[1])
        );
    }
    soak.track(&name);
    let down = vec!["lab", "down", name.as_str()];
    let outs = at_once(&[down.clone(), down]);
    assert!(
        outs.iter().any(|o| o.status.code() == Some(0)),
        "two lab downs of {name}\n{}\n{}",
        text(&outs[0]),
        text(&outs[1])
    );
    soak.races += 1;
    soak.assert_gone(&name, "same-name race");
}

/// 3. Three labs of different names up at once, then down at once.
fn different_names(soak: &mut Soak) {
    let names: Vec<String> = (0..3).map(|_| soak.name()).collect();
    let presets = ["full-cone", "symmetric", "open"];
    let ups: Vec<Vec<&str>> = names
        .iter()
        .zip(presets)
        .map(|(n, p)| vec!["lab", "up", p, "--name", n.as_str()])
        .collect();
    for o in at_once(&ups) {
        ok(&o, "concurrent lab up");
    }
    for n in &names {
        soak.track(n);
    }
    let downs: Vec<Vec<&str>> = names
        .iter()
        .map(|n| vec!["lab", "down", n.as_str()])
        .collect();
    for o in at_once(&downs) {
        ok(&o, "concurrent lab down");
    }
    soak.concurrent += names.len();
    for n in &names {
        soak.assert_gone(n, "concurrent labs");
    }
}

/// 4. A supervisor SIGKILLed mid-life leaves its lab; the next `lab up` (of another name),
///    `lab down` or `lab status` removes it.
fn killed_supervisor(soak: &mut Soak, cycle: usize) {
    let name = soak.name();
    ok(
        &natscope(&["lab", "up", "port-restricted-cone", "--name", &name]),
        "lab up",
    );
    soak.track(&name);
    let rec = registry::read(&name).expect("record");
    sigkill(rec.owner_pid);
    soak.kills += 1;
    wait_until("the supervisor to die", Duration::from_secs(10), || {
        !registry::owner_alive(&rec)
    });
    assert!(
        !registry::namespaces_of(&name).is_empty(),
        "a SIGKILLed supervisor leaves its namespaces"
    );
    let cleaner = ["up", "status", "down"][cycle % 3];
    match cleaner {
        "up" => {
            let next = soak.name();
            ok(
                &natscope(&["lab", "up", "open", "--name", &next]),
                "next up",
            );
            soak.track(&next);
            ok(&natscope(&["lab", "down", &next]), "down of the next lab");
            soak.assert_gone(&next, "the next lab");
        }
        "status" => ok(&natscope(&["lab", "status"]), "lab status"),
        _ => ok(&natscope(&["lab", "down", &name]), "lab down"),
    }
    soak.cleaned_by.push(cleaner);
    soak.assert_gone(&name, &format!("SIGKILLed supervisor, then lab {cleaner}"));
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn labs_come_and_go_under_loss_races_and_sigkill_and_nothing_remains() {
    require_root();
    natscope_tests::require_tool("ip", "iproute2");
    natscope_tests::require_tool("nft", "nftables");
    let before = RootState::snapshot();
    let dir = TempDir::new("lab-soak");
    let started = Instant::now();
    let mut soak = Soak::default();
    let mut cycles = 0;
    while cycles < CYCLES && (cycles == 0 || started.elapsed() < BUDGET) {
        lossy_lab(&mut soak, &dir, cycles);
        same_name(&mut soak);
        different_names(&mut soak);
        killed_supervisor(&mut soak, cycles);
        cycles += 1;
    }

    for name in &soak.names {
        soak.assert_gone(name, "after the soak");
        assert!(registry::read(name).is_none(), "record of {name} left");
    }
    let tmp: Vec<String> = std::fs::read_dir(registry::DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|f| soak.names.iter().any(|n| f.starts_with(&format!(".{n}."))))
                .collect()
        })
        .unwrap_or_default();
    assert!(tmp.is_empty(), "temporary record files left: {tmp:?}");
    let left: Vec<Seen> = soak.seen.iter().copied().filter(Seen::running).collect();
    assert!(
        left.is_empty(),
        "{} of {} processes seen in the soak's labs are still running: {left:?}",
        left.len(),
        soak.seen.len()
    );
    RootState::snapshot().assert_unchanged_since(&before);

    let seconds = started.elapsed().as_secs_f64();
    let count = |c: &str| soak.cleaned_by.iter().filter(|x| **x == c).count();
    println!(
        "soak: {cycles} cycles in {seconds:.1} s: {} labs up and down ({} lossy labs with a probe \
         each: {} ran to the end, {} of them saw their public address, the others' labs were \
         SIGKILLed under them; {} same-name races; {} labs \
         up and down three at once); {} supervisors SIGKILLed, cleaned up by lab down {}, lab up \
         {}, lab status {}; {} processes tracked, none left; no namespace, record or \
         root-namespace change left",
        soak.labs,
        soak.probes,
        soak.finished,
        soak.answered,
        soak.races,
        soak.concurrent,
        soak.kills,
        count("down"),
        count("up"),
        count("status"),
        soak.seen.len(),
    );
}
