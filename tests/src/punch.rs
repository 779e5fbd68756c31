//! Helpers for the `natscope punch` lab tests: a lab with a rendezvous server on the reflector
//! node and two hosts behind their own NATs, and the punch commands run inside lab nodes as
//! [`ChildProcess`]es (stopped by PID on drop).

use std::process::Command;
use std::time::{Duration, Instant};

use natscope_lab::topology::RouterKind;
use natscope_lab::{presets, Lab};

use crate::lab::lab_name;
use crate::{natscope_bin, ChildProcess};

/// Where `natscope punch serve` listens in these labs: the reflector node `stun`'s first address.
pub const SERVER: &str = "198.51.100.1:3490";

/// A running punch lab: `stun` (rendezvous + relay), `a` behind `na`, `b` behind `nb`.
pub struct PunchLab {
    pub lab: Lab,
    pub server: ChildProcess,
}

/// The router of a named preset (`full-cone`, `port-restricted-cone`, `symmetric`, ...).
pub fn router(preset: &str) -> RouterKind {
    presets::router(preset).unwrap_or_else(|| panic!("no router preset {preset}"))
}

impl PunchLab {
    /// Brings the lab up and starts the server; waits until it says it is serving.
    pub fn up(prefix: &str, a: RouterKind, b: RouterKind) -> Self {
        let lab = Lab::builder(&lab_name(prefix))
            .natscope_bin(natscope_bin())
            .reflector("stun")
            .router("na", None, a)
            .router("nb", None, b)
            .host("a", Some("na"))
            .host("b", Some("nb"))
            .up()
            .expect("lab up");
        let server = serve(&lab);
        Self { lab, server }
    }

    /// `natscope punch listen --id ID --via SERVER ...` in node `b`, once registered.
    pub fn listener(&self, id: &str, extra: &[&str]) -> ChildProcess {
        let mut args = vec!["punch", "listen", "--id", id, "--via", SERVER];
        args.extend_from_slice(extra);
        let mut p = spawn_in(&self.lab, "b", &args);
        wait_for(&mut p, |p| p.stdout().contains("registered"), "registered");
        p
    }

    /// `natscope punch connect ID --via SERVER --json ...` in node `a` (not waited for).
    pub fn connector(&self, id: &str, extra: &[&str]) -> ChildProcess {
        let mut args = vec!["punch", "connect", id, "--via", SERVER, "--json"];
        args.extend_from_slice(extra);
        spawn_in(&self.lab, "a", &args)
    }

    /// Runs a connect to completion (bounded); returns its exit code and the process (its
    /// stdout holds the JSON report).
    pub fn connect(&self, id: &str, extra: &[&str]) -> (i32, ChildProcess) {
        let mut c = self.connector(id, extra);
        let status = c
            .wait_timeout(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("connect did not finish in 30 s\n{}", c.diagnostics()));
        (status.code().unwrap_or(-1), c)
    }

    pub fn down(self) {
        let PunchLab { lab, server } = self;
        drop(server);
        lab.down();
    }
}

/// `natscope punch serve --listen SERVER` on the reflector node `stun`, once it is serving.
pub fn serve(lab: &Lab) -> ChildProcess {
    let mut server = spawn_in(lab, "stun", &["punch", "serve", "--listen", SERVER]);
    wait_for(
        &mut server,
        |p| p.stderr().contains("punch server on"),
        "serving",
    );
    server
}

/// Starts `natscope ARGS` inside `node` with output captured.
pub fn spawn_in(lab: &Lab, node: &str, args: &[&str]) -> ChildProcess {
    let mut cmd = Command::new(natscope_bin());
    cmd.args(args);
    lab.node(node)
        .expect("node")
        .run(move || ChildProcess::spawn(cmd))
        .expect("namespace")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits (bounded, 10 s) until `ready` holds for the process; panics with its output if not.
pub fn wait_for(p: &mut ChildProcess, ready: impl Fn(&ChildProcess) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready(p) {
        if p.exited().is_some() || Instant::now() > deadline {
            panic!(
                "{} never became {what}\n{}",
                p.command_line(),
                p.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
