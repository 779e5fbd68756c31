//! Helpers for the `natscope punch` lab tests: a lab with a rendezvous server on the reflector
//! node and two hosts behind their own NATs, and the punch commands run inside lab nodes as
//! [`ChildProcess`]es (stopped by PID on drop).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use natscope_lab::punch_lab::{self, NodeProgram, PunchLabError};
use natscope_lab::topology::RouterKind;
use natscope_lab::{presets, Lab, LabOptions};
use natscope_probes::punch::connector::ConnectReport;

use crate::lab::lab_name;
use crate::{natscope_bin, ChildProcess};

/// Where `natscope punch serve` listens in these labs: the reflector node `stun`'s first address.
pub const SERVER: &str = punch_lab::SERVER;

/// A running punch lab ([`natscope_lab::punch_lab`], the one `lab grid` runs too): `stun`
/// (rendezvous + relay), `a` behind `na`, `b` behind `nb`.
pub struct PunchLab {
    pub lab: Lab,
    pub server: ChildProcess,
}

/// The router of a named preset (`full-cone`, `port-restricted-cone`, `symmetric`, ...).
pub fn router(preset: &str) -> RouterKind {
    presets::router(preset).unwrap_or_else(|| panic!("no router preset {preset}"))
}

impl NodeProgram for ChildProcess {
    fn start(lab: &Lab, node: &str, exe: &Path, args: &[&str]) -> Result<Self, PunchLabError> {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        lab.node(node)?
            .run(move || ChildProcess::spawn(cmd))?
            .map_err(|source| PunchLabError::Start {
                node: node.to_string(),
                source,
            })
    }
    fn stdout_text(&self) -> String {
        self.stdout()
    }
    fn has_exited(&mut self) -> bool {
        self.exited().is_some()
    }
    fn describe(&mut self) -> String {
        format!("{}\n{}", self.command_line(), self.diagnostics())
    }
}

impl PunchLab {
    /// Brings the lab up and starts the server; waits until it accepts connections.
    pub fn up(prefix: &str, a: RouterKind, b: RouterKind) -> Self {
        let options = LabOptions {
            natscope_bin: Some(natscope_bin()),
            ..Default::default()
        };
        let plan = punch_lab::pair(a, b).plan().expect("punch lab plan");
        let lab = Lab::up(&lab_name(prefix), plan, options).expect("lab up");
        let server = serve(&lab);
        Self { lab, server }
    }
    /// `natscope punch listen --id ID --via SERVER ...` in node `b`, once registered.
    pub fn listener(&self, id: &str, extra: &[&str]) -> ChildProcess {
        punch_lab::listener::<ChildProcess>(&self.lab, &natscope_bin(), None, id, extra)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `natscope punch connect ID --via SERVER --json ...` in node `a` (not waited for).
    pub fn connector(&self, id: &str, extra: &[&str]) -> ChildProcess {
        punch_lab::connector(&self.lab, &natscope_bin(), id, extra)
            .unwrap_or_else(|e| panic!("{e}"))
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

/// The `natscope.punch/v1` report a finished `punch connect --json` printed, read typed; panics
/// with the process's output if it printed none.
pub fn report(c: &ChildProcess) -> ConnectReport {
    let r = punch_lab::connect_report(c.stdout().as_bytes())
        .unwrap_or_else(|e| panic!("connect printed no report ({e})\n{}", c.diagnostics()));
    crate::schema::assert_valid_text(&c.stdout());
    r
}

/// `natscope punch serve --listen SERVER` on the reflector node `stun`, once it accepts
/// connections.
pub fn serve(lab: &Lab) -> ChildProcess {
    punch_lab::serve(lab, &natscope_bin()).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `natscope ARGS` inside `node` with output captured.
pub fn spawn_in(lab: &Lab, node: &str, args: &[&str]) -> ChildProcess {
    ChildProcess::start(lab, node, &natscope_bin(), args).unwrap_or_else(|e| panic!("{e}"))
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

/// `natscope ARGS…` on this host (loopback tests, no lab).
pub fn natscope_here(args: &[&str]) -> ChildProcess {
    let mut cmd = Command::new(natscope_bin());
    cmd.args(args);
    ChildProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// The exit code of `p`, which must end within `within`.
pub fn finish(p: &mut ChildProcess, within: Duration) -> i32 {
    let s = p
        .wait_timeout(within)
        .unwrap_or_else(|| panic!("still running after {within:?}\n{}", p.diagnostics()));
    s.code().unwrap_or(-1)
}

/// `natscope punch serve` on a fresh loopback port, once it serves; and its address.
pub fn loopback_server() -> (ChildProcess, String) {
    let port = crate::free_port(&[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port)).to_string();
    let mut s = natscope_here(&["punch", "serve", "--listen", &addr]);
    wait_for(
        &mut s,
        |p| p.stderr().contains("punch server on"),
        "serving",
    );
    (s, addr)
}
