//! Issue 15, the soak: labs come and go through the real `natscope` binary as root — labs with
//! seeded loss and delay carrying probe traffic, two `lab up`s (and `lab down`s) of one name at
//! once, several labs of different names up and down at once, supervisors SIGKILLed mid-life and
//! then cleaned up by the next `lab up`, `lab down` or `lab status`, `lab up` and `lab down` of one
//! name racing each other — and afterwards nothing of
//! any of them remains: no namespace, no process, no record, control socket or log, and no change
//! in the root namespace.
//!
//! Bounded: [`CYCLES`] cycles, and no new cycle starts after [`BUDGET`]. Other tests run labs
//! beside this one, so "nothing remains" is checked for this test's own labs (names starting with
//! `reap`) and the processes it saw in them; the root namespace check is the lab safety test's.
//! It prints what it did (run with `--nocapture` to see it).

use std::collections::HashSet;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use natscope_lab::{netns, registry};

use natscope_probes::probe::ProbeReport;
use natscope_tests::lab::*;
use natscope_tests::{natscope_bin, ChildProcess, TempDir};

/// Cycles of the soak (each: a lossy lab with traffic, a same-name race, three labs at once, a
/// SIGKILLed supervisor, an up/down race).
const CYCLES: usize = 6;
/// No cycle starts after this much time, so a slow machine still finishes in about 2–3 minutes.
const BUDGET: Duration = Duration::from_secs(120);
/// How long one probe through a lossy lab may take before it counts as hung.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// Every lab of this test has a name starting with this (other tests run labs beside it).
const PREFIX: &str = "reaps";

/// Collects, every 50 ms until stopped, the processes of every lab of this test, so processes
/// that live only briefly (in a lab a race took down before [`Soak::track`] could look) are
/// checked at the end too.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HashSet<SeenProcess>>>,
}

impl Watcher {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = HashSet::new();
            while !flag.load(Ordering::Relaxed) {
                let mut labs: Vec<String> = netns::list_lab_namespaces()
                    .iter()
                    .filter_map(|n| registry::lab_of_namespace(n).map(str::to_string))
                    .chain(registry::list().into_iter().map(|r| r.name))
                    .filter(|l| l.starts_with(PREFIX))
                    .collect();
                labs.sort();
                labs.dedup();
                for lab in labs {
                    seen.extend(processes_of_lab(&lab));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> HashSet<SeenProcess> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A lab of one lossy, delaying port-restricted cone with a host behind it.
fn lossy_topology(loss: f64, delay_ms: u64, seed: u64) -> String {
    format!(
        "[[reflector]]\nname = \"stun\"\n\n[[nat]]\nname = \"nat\"\nbehavior = \"port-restricted-cone\"\n\
         loss = {loss}\ndelay_ms = {delay_ms}\nseed = {seed}\n\n[[host]]\nname = \"h1\"\nparent = \"nat\"\n"
    )
}

#[derive(Default)]
struct Soak {
    names: Vec<String>,
    seen: Vec<SeenProcess>,
    labs: usize,
    probes: usize,
    finished: usize,
    answered: usize,
    races: usize,
    up_down: Vec<(Option<i32>, Option<i32>)>,
    concurrent: usize,
    kills: usize,
    cleaned_by: Vec<&'static str>,
}

impl Soak {
    fn name(&mut self) -> String {
        let n = lab_name(PREFIX);
        self.names.push(n.clone());
        n
    }

    /// Notes the lab's supervisor and every process in its namespaces, to check at the end that
    /// none of them is left.
    fn track(&mut self, name: &str) {
        assert!(registry::read(name).is_some(), "no record of lab {name}");
        self.seen.extend(processes_of_lab(name));
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

/// 5. `lab up` and `lab down` of one name at once, the down 0–400 ms later: either may come
///    first (the down finds no lab yet, takes the lab down while it is built, or after it is
///    up); once both are done and one more `lab down` has run if the lab is still there, nothing
///    is left.
fn up_down_race(soak: &mut Soak, cycle: usize) {
    let name = soak.name();
    let up = spawn(&["lab", "up", "open", "--name", &name]);
    std::thread::sleep(Duration::from_millis([0, 100, 200, 400][cycle % 4]));
    let down = natscope(&["lab", "down", &name]);
    let up = up.wait_with_output().expect("wait for lab up");
    let codes = (up.status.code(), down.status.code());
    assert!(
        matches!(codes, (Some(0 | 2), Some(0 | 2))),
        "lab up and lab down of {name} at once\n{}\n{}",
        text(&up),
        text(&down)
    );
    if registry::read(&name).is_some() || !registry::namespaces_of(&name).is_empty() {
        ok(
            &natscope(&["lab", "down", &name]),
            "lab down after the race",
        );
    }
    soak.labs += usize::from(codes.0 == Some(0));
    soak.up_down.push(codes);
    soak.assert_gone(&name, "up/down race");
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
    let watcher = Watcher::start();
    let mut soak = Soak::default();
    let mut cycles = 0;
    while cycles < CYCLES && (cycles == 0 || started.elapsed() < BUDGET) {
        lossy_lab(&mut soak, &dir, cycles);
        same_name(&mut soak);
        different_names(&mut soak);
        killed_supervisor(&mut soak, cycles);
        up_down_race(&mut soak, cycles);
        cycles += 1;
    }
    let watched = watcher.finish();
    let tracked = soak.seen.len();
    let new: Vec<SeenProcess> = watched
        .into_iter()
        .filter(|p| !soak.seen.contains(p))
        .collect();
    soak.seen.extend(new);

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
    let left: Vec<SeenProcess> = soak
        .seen
        .iter()
        .copied()
        .filter(SeenProcess::running)
        .collect();
    assert!(
        left.is_empty(),
        "{} of {} processes seen in the soak's labs are still running: {left:?}",
        left.len(),
        soak.seen.len()
    );
    RootState::snapshot().assert_unchanged_since(&before);

    let seconds = started.elapsed().as_secs_f64();
    let count = |c: &str| soak.cleaned_by.iter().filter(|x| **x == c).count();
    let races =
        |want: (Option<i32>, Option<i32>)| soak.up_down.iter().filter(|c| **c == want).count();
    println!(
        "soak: {cycles} cycles in {seconds:.1} s, {} labs brought up: {} lossy labs (loss 0.1-0.3, \
         delay 5-20 ms) with a probe each ({} ran to the end, {} of them saw their public \
         address; the others' supervisors were SIGKILLed under them); {} same-name up/up and \
         down/down races; {} labs up and down three at once; {} up/down races of one name (up \
         ok and down ok {}, up ok and down found no lab {}, up failed as down took it {}); {} \
         supervisors SIGKILLed, cleaned up by lab down {}, lab up {}, lab status {}; {} \
         processes seen in the labs ({tracked} at fixed points, the rest by the watcher), none \
         left; no namespace, record or root-namespace change left",
        soak.labs,
        soak.probes,
        soak.finished,
        soak.answered,
        soak.races,
        soak.concurrent,
        soak.up_down.len(),
        races((Some(0), Some(0))),
        races((Some(0), Some(2))),
        races((Some(2), Some(0))),
        soak.kills,
        count("down"),
        count("up"),
        count("status"),
        soak.seen.len(),
    );
}
