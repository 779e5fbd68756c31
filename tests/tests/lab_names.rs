//! Issue 15, must-show 3 (the names and the race), through the real `natscope` binary as root:
//! a lab name that looks like a path is refused with one line before anything is touched, and of
//! two `lab up`s of one name exactly one wins while the other exits 2 and leaves the winner be;
//! and (the last part) a process forked into a lab's namespace after its teardown has started is
//! removed all the same.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natscope_lab::registry::{self, Record};
use natscope_tests::lab::*;
use natscope_tests::{natscope_bin, TempDir};

/// A process the old `lab down` would have signalled: a `sleep` killed when the test ends.
struct Bystander(Child);

impl Bystander {
    fn start() -> Self {
        Self(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()
                .expect("start sleep"),
        )
    }
    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a lab named `name` would own if `name` were taken as a path: `<name>.json` (a record
/// whose owner is `owner`, a "supervisor" the old `lab down` sent SIGTERM and SIGKILL), `.sock`
/// and `.log`.
fn plant(name: &Path, owner: &Bystander) -> Vec<PathBuf> {
    let pid = owner.0.id() as i32;
    let record = Record {
        name: "victim".into(),
        preset: None,
        owner_pid: pid,
        owner_start: registry::start_time(pid).expect("start time of sleep"),
        supervisor: true,
        control: None,
        nodes: Vec::new(),
    };
    let files: Vec<PathBuf> = ["json", "sock", "log"]
        .iter()
        .map(|ext| PathBuf::from(format!("{}.{ext}", name.display())))
        .collect();
    std::fs::write(&files[0], serde_json::to_vec(&record).unwrap()).unwrap();
    for f in &files[1..] {
        std::fs::write(f, b"sentinel").unwrap();
    }
    files
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn path_like_lab_names_are_refused_in_one_line_and_nothing_is_touched() {
    require_root();
    // The lab directory must exist for `..` to resolve through it, as it does on any host that
    // ever ran a lab.
    std::fs::create_dir_all(registry::DIR).unwrap();
    let dir = TempDir::new("lab-names");
    let dir = dir.path().canonicalize().unwrap();
    let mut owner = Bystander::start();
    // `/run/natscope/labs/../../../<dir>/rel` is `<dir>/rel`: a relative escape, and an absolute
    // path (which `Path::join` would take as is).
    let up = "../".repeat(Path::new(registry::DIR).components().count() - 1);
    let relative = format!(
        "{up}{}",
        dir.join("rel")
            .display()
            .to_string()
            .trim_start_matches('/')
    );
    let absolute = dir.join("abs").display().to_string();
    let mut planted = plant(&dir.join("rel"), &owner);
    planted.extend(plant(&dir.join("abs"), &owner));
    assert_eq!(
        Path::new(registry::DIR)
            .join(format!("{relative}.json"))
            .canonicalize()
            .unwrap(),
        planted[0],
        "the relative name reaches the planted record"
    );

    for name in [
        relative.as_str(),
        absolute.as_str(),
        "/etc/passwd",
        "..",
        "x/../y",
    ] {
        for args in [
            vec!["lab", "down", name],
            vec!["lab", "status", name],
            vec!["lab", "status", "--json", name],
            vec!["lab", "exec", "--lab", name, "h1", "--", "true"],
            vec!["lab", "nat-table", "--lab", name, "nat"],
            vec!["lab", "up", "open", "--name", name],
        ] {
            let out = natscope(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}\n{}", text(&out));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(
                err.starts_with(&format!("natscope: error: lab name `{name}` is invalid")),
                "{args:?}: {err}"
            );
            assert!(out.stdout.is_empty(), "{args:?}\n{}", text(&out));
            for f in &planted {
                assert!(f.exists(), "{args:?} removed {}", f.display());
            }
            assert!(owner.alive(), "{args:?} signalled the record's owner");
        }
    }
}

/// Two `lab up` of one name at once: exactly one exits 0, the other exits 2 with one line; the
/// winner's lab is whole until `lab down`, and nothing is left afterwards. Several rounds, so the
/// two race at different points.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn of_two_concurrent_lab_ups_of_one_name_exactly_one_wins_and_the_other_leaves_it_be() {
    require_root();
    for round in 0..4 {
        let name = lab_name("race");
        if round % 2 == 1 {
            // A stale record of the name (its owner has exited): both `up`s sweep it first, and
            // the later sweep must not take the earlier winner's fresh lab for it.
            plant_stale(&name);
        }
        let spawn = || {
            Command::new(natscope_bin())
                .args(["lab", "up", "port-restricted-cone", "--name", &name])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start natscope lab up")
        };
        let (a, b) = (spawn(), spawn());
        let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
        let winner = codes.iter().position(|c| *c == Some(0));
        let loser = codes.iter().position(|c| *c == Some(2));
        let (Some(_), Some(loser)) = (winner, loser) else {
            let _ = natscope(&["lab", "down", &name]);
            panic!(
                "round {round}: want one 0 and one 2\n{}\n{}",
                text(&outs[0]),
                text(&outs[1])
            );
        };
        let err = String::from_utf8_lossy(&outs[loser].stderr);
        let down_on_fail = scopeguard(&name);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "natscope: error: a lab named `{name}` is already running (natscope lab down {name})"
            ),
        );

        // The winner's lab is whole: its record, every namespace, a supervisor that answers.
        let status = natscope(&["lab", "status", "--json", &name]);
        assert_eq!(status.status.code(), Some(0), "{}", text(&status));
        let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(doc["labs"][0]["running"], true, "{}", text(&status));
        assert_eq!(registry::namespaces_of(&name).len(), 5);
        assert!(registry::control_path(&name).exists());
        let table = natscope(&["lab", "nat-table", "--lab", &name, "nat"]);
        assert_eq!(table.status.code(), Some(0), "{}", text(&table));

        let down = natscope(&["lab", "down", &name]);
        assert_eq!(down.status.code(), Some(0), "{}", text(&down));
        drop(down_on_fail);
        assert!(registry::read(&name).is_none());
        assert!(registry::namespaces_of(&name).is_empty());
        for p in [
            registry::path_of(&name),
            registry::control_path(&name),
            registry::log_path(&name),
        ] {
            assert!(!p.exists(), "{} is left", p.display());
        }
    }
}

/// A record of lab `name` whose owner is gone, as a SIGKILLed supervisor leaves it.
fn plant_stale(name: &str) {
    let mut gone = Command::new("true").spawn().expect("run true");
    let pid = gone.id() as i32;
    let start = registry::start_time(pid).unwrap_or(1);
    gone.wait().unwrap();
    let record = Record {
        name: name.to_string(),
        preset: Some("port-restricted-cone".into()),
        owner_pid: pid,
        owner_start: start,
        supervisor: true,
        control: None,
        nodes: Vec::new(),
    };
    registry::create(&record).expect("plant a stale record");
    assert!(!registry::owner_alive(&record));
}

/// Takes lab `name` down when dropped (a failing assertion leaves nothing behind).
fn scopeguard(name: &str) -> impl Drop + '_ {
    struct Down<'a>(&'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if registry::read(self.0).is_some() || !registry::namespaces_of(self.0).is_empty() {
                let _ = natscope(&["lab", "down", self.0]);
            }
        }
    }
    Down(name)
}

/// The record itself, created by many threads at once: exactly one creation succeeds, the others
/// are told the name exists, the record is the winner's whole, and no temporary file is left.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn a_lab_record_is_created_exactly_once() {
    require_root();
    for _ in 0..50 {
        create_at_once(&lab_name("excl"));
    }
}

fn create_at_once(name: &str) {
    let me = std::process::id() as i32;
    let threads = 16;
    let barrier = std::sync::Barrier::new(threads);
    let results: Vec<std::io::Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || {
                    let record = Record {
                        name: name.to_string(),
                        preset: Some(format!("thread{i}")),
                        owner_pid: me,
                        owner_start: registry::start_time(me).unwrap_or(0),
                        supervisor: false,
                        control: None,
                        nodes: Vec::new(),
                    };
                    barrier.wait();
                    registry::create(&record).map(|_| record.preset.unwrap_or_default())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let record = registry::read(name);
    let leftovers: Vec<String> = std::fs::read_dir(registry::DIR)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.starts_with(&format!(".{name}.")))
        .collect();
    registry::remove(name);
    let won: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let lost = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists))
        .count();
    assert_eq!((won.len(), lost), (1, threads - 1), "{results:?}");
    assert_eq!(
        record.and_then(|r| r.preset).as_ref(),
        Some(won[0]),
        "the winner's record"
    );
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The supervisor's control socket is 0600 even when `lab up` runs with umask 000 (a socket
/// `bind` creates is 0777 less the umask).
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn the_control_socket_is_0600_whatever_the_umask() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    require_root();
    let name = lab_name("sock");
    let bin = natscope_bin();
    let up = Command::new("sh")
        .args([
            "-c",
            "umask 000 && exec \"$0\" lab up full-cone --name \"$1\"",
        ])
        .arg(&bin)
        .arg(&name)
        .output()
        .expect("run sh");
    let _down = scopeguard(&name);
    assert_eq!(up.status.code(), Some(0), "{}", text(&up));
    let meta = std::fs::metadata(registry::control_path(&name)).expect("the control socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    // Still the supervisor's: it answers through the renamed socket.
    let status = natscope(&["lab", "nat-table", "--lab", &name, "nat"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let leftovers: Vec<String> = std::fs::read_dir(registry::DIR)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.starts_with(&format!(".{name}.")))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A peer of another user is not answered even when the socket's mode lets it connect.
#[test]
#[ignore = "needs root, network namespaces and setpriv (util-linux); run with --include-ignored (scripts/test does)"]
fn the_supervisor_answers_only_its_own_user() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    natscope_tests::require_tool("setpriv", "util-linux");
    let name = lab_name("peer");
    let up = natscope(&["lab", "up", "full-cone", "--name", &name]);
    let _down = scopeguard(&name);
    assert_eq!(up.status.code(), Some(0), "{}", text(&up));
    let control = registry::control_path(&name);
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(natscope_bin())
        .args(["lab", "nat-table", "--lab", &name, "nat"])
        .output()
        .expect("run setpriv");
    assert_eq!(as_nobody.status.code(), Some(2), "{}", text(&as_nobody));
    let err = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(err.contains("does not answer"), "{err}");
    // Root still is answered.
    let as_root = natscope(&["lab", "nat-table", "--lab", &name, "nat"]);
    assert_eq!(as_root.status.code(), Some(0), "{}", text(&as_root));
}

/// Issue 15, must-show 3, last part: processes that fork while the lab is being torn down are
/// removed too. Three shells run in h1 through `lab exec`: one answers SIGTERM by forking a new
/// child and exiting (so its child appears after the teardown's scan), one ignores SIGTERM and
/// keeps forking through the grace period between SIGTERM and SIGKILL, and one forks as fast as
/// it can (600 children at most). After `lab down` no
/// process of theirs is left and no namespace of the lab is. A teardown that scans once and
/// signals what it found leaves the children forked after the scan alive.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn processes_forked_after_teardown_starts_are_removed_too() {
    require_root();
    let name = lab_name("reapf");
    let up = natscope(&["lab", "up", "open", "--name", &name]);
    let _down = scopeguard(&name);
    assert_eq!(up.status.code(), Some(0), "{}", text(&up));
    // A sleep duration nobody else uses marks every process of this test.
    let marker = format!("3000.{:06}", rand::random::<u32>() % 1_000_000);
    let _cleanup = KillMarked(marker.clone());
    let forks_on_term = format!("trap 'sleep {marker} & exit 0' TERM; sleep {marker} & wait");
    let keeps_forking = format!(
        "trap '' TERM; i=0; while [ $i -lt 1000 ]; do sleep {marker} & i=$((i+1)); sleep 0.02; done"
    );
    // A fork storm, bounded: forks as fast as it can, through the whole first round.
    let storm = format!(
        "trap '' TERM; i=0; while [ $i -lt 600 ]; do sleep {marker} & i=$((i+1)); done; wait"
    );
    let mut shells: Vec<Child> = [forks_on_term, keeps_forking, storm]
        .iter()
        .map(|script| {
            Command::new(natscope_bin())
                .args([
                    "lab", "exec", "--lab", &name, "h1", "--", "sh", "-c", script,
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start a shell in the lab")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_with(&marker).len() < 10 {
        assert!(
            Instant::now() < deadline,
            "the shells did not start: {:?}",
            processes_with(&marker)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let running = processes_with(&marker).len();
    let in_lab = processes_of_lab(&name);

    let down = natscope(&["lab", "down", &name]);
    assert_eq!(down.status.code(), Some(0), "{}", text(&down));
    // The shells are this test's children: once killed they are zombies until reaped here.
    for shell in &mut shells {
        let _ = shell.kill();
        let _ = shell.wait();
    }
    let left = processes_with(&marker);
    assert!(
        left.is_empty(),
        "{} of the lab's processes outlived `lab down` ({running} ran before it): {left:?}",
        left.len()
    );
    let still: Vec<&SeenProcess> = in_lab.iter().filter(|p| p.running()).collect();
    assert!(
        still.is_empty(),
        "processes of the lab (supervisor, reflector) outlived it: {still:?}"
    );
    assert!(registry::namespaces_of(&name).is_empty());
    assert!(registry::read(&name).is_none());
}

/// The teardown's loop itself ([`registry::kill_in`]), on a lab whose h1 runs a shell that ignores
/// SIGTERM and forks as fast as it can: one scan is not enough (children appear after it), the
/// loop ends with nobody left in the namespaces, and it says how many rounds it took.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn the_teardown_scans_again_until_a_fork_storm_is_gone() {
    require_root();
    let name = lab_name("reapk");
    let up = natscope(&["lab", "up", "open", "--name", &name]);
    let _down = scopeguard(&name);
    assert_eq!(up.status.code(), Some(0), "{}", text(&up));
    let marker = format!("3000.{:06}", rand::random::<u32>() % 1_000_000);
    let _cleanup = KillMarked(marker.clone());
    let h1 = natscope_lab::namespace_name(&name, "h1");
    let inodes = vec![natscope_lab::netns::inode_of(&h1).expect("h1's namespace")];
    let storm = format!(
        "trap '' TERM; i=0; while [ $i -lt 600 ]; do sleep {marker} & i=$((i+1)); done; wait"
    );
    let mut shell = Command::new(natscope_bin())
        .args([
            "lab", "exec", "--lab", &name, "h1", "--", "sh", "-c", &storm,
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the storm");
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_with(&marker).len() < 10 {
        assert!(Instant::now() < deadline, "the storm did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let reaped = registry::kill_in(&inodes);
    let took = started.elapsed();
    let _ = shell.kill();
    let _ = shell.wait();
    println!(
        "kill_in: {} rounds, {} signals, {} ms, survivors {:?}",
        reaped.rounds,
        reaped.signals,
        took.as_millis(),
        reaped.survivors
    );
    assert!(reaped.survivors.is_empty(), "{reaped:?}");
    assert!(reaped.rounds >= 2, "one scan sufficed: {reaped:?}");
    assert!(natscope_lab::netns::processes_in(&inodes).is_empty());
    assert!(processes_with(&marker).is_empty());
}
