//! One row of `natscope lab matrix`: a lab for one preset, `natscope probe --json` run in its host
//! `h1` against the lab's reflector, and every verdict compared with the preset's configured truth
//! ([`Verdicts::expected`], [`Verdicts::observed`], [`matrix::compare_verdicts`]).
//!
//! Where the preset's router serves a port-mapping protocol, the probe runs with `--map`: that
//! gives UPnP discovery the patience a device's SSDP delay needs (up to MX = 1 s; without it, a
//! silent UPnP reads `unknown` after ~250 ms, and the truth says `false` for a protocol the
//! router does not serve), and it exercises a real mapping. Where the truth has
//! an IPv6 side, a second probe runs at the same time against the reflector's IPv6 address
//! (`--no-port-mapping`: the gateway services are IPv4's), unless `h1` has no IPv6 route to it,
//! which is itself the observation (`ipv4-only`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use natscope_core::probe::{Ipv6Report, ProbeReport};

use crate::jobs::{self, JobError};
use crate::matrix::{self, MatrixRow, Verdicts};
use crate::topology::TopologyError;
use crate::{presets, Lab, LabError, LabOptions};

/// A probe that has not finished after this long is killed and its preset fails.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// Why a row could not run.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("no preset {0}")]
    NoPreset(String),
    #[error("{0}")]
    Topology(#[from] TopologyError),
    #[error("lab for {preset}: {source}")]
    Up {
        preset: String,
        source: Box<LabError>,
    },
    #[error("{0}")]
    Lab(#[from] Box<LabError>),
    #[error("starting the probe in h1: {0}")]
    Start(std::io::Error),
    #[error("{0}")]
    Job(#[from] JobError),
    #[error("the probe did not finish within {PROBE_LIMIT:?}")]
    Timeout,
    #[error("the probe failed ({0})")]
    Failed(std::process::ExitStatus),
    #[error("the probe's JSON: {0}")]
    Json(serde_json::Error),
    #[error("over IPv6, {0}")]
    Ipv6(Box<RowError>),
}

impl From<LabError> for RowError {
    fn from(e: LabError) -> Self {
        Self::Lab(Box::new(e))
    }
}

/// Runs preset `preset`'s row in a lab named after `index`, with `exe` as natscope; `expected`
/// is the preset's truth ([`Verdicts::expected`], looked up by the caller so an unknown name is a
/// usage error before any lab comes up).
pub fn run_preset(index: usize, preset: &str, expected: Verdicts, exe: &Path) -> MatrixRow {
    let t0 = Instant::now();
    let (observed, checks, error, probe) = match probe_in_lab(index, preset, &expected, exe) {
        Ok((report, v6)) => {
            let mut observed = Verdicts::observed(&report);
            if expected.compares_ipv6() {
                observed.observe_ipv6(v6.as_ref());
            }
            let checks = matrix::compare_verdicts(&expected, Some(&observed));
            let failed = checks.iter().any(|c| !c.pass);
            let keep = failed.then_some((report, v6));
            (Some(observed), checks, None, keep)
        }
        Err(e) => (None, Vec::new(), Some(jobs::error_line(&e)), None),
    };
    let (probe, probe_ipv6) = match probe {
        Some((report, v6)) => (Some(report), v6),
        None => (None, None),
    };
    MatrixRow {
        preset: preset.to_string(),
        pass: error.is_none() && checks.iter().all(|c| c.pass),
        expected,
        observed,
        checks,
        error,
        probe,
        probe_ipv6,
        duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
    }
}

/// Brings the preset up, runs the probe in `h1` (and, where `expected` compares IPv6, a second
/// one over IPv6), returns the `natscope.probe/v1` report and the IPv6 run's report (`None`: no
/// IPv6 route from `h1`).
fn probe_in_lab(
    index: usize,
    preset: &str,
    expected: &Verdicts,
    exe: &Path,
) -> Result<(ProbeReport, Option<Ipv6Report>), RowError> {
    let name = jobs::lab_name("mtrx", index);
    let plan = presets::preset(preset)
        .ok_or_else(|| RowError::NoPreset(preset.to_string()))?
        .plan()?;
    let options = LabOptions {
        natscope_bin: Some(exe.to_path_buf()),
        ..Default::default()
    };
    let lab = Lab::up(&name, plan, options).map_err(|source| RowError::Up {
        preset: preset.to_string(),
        source: Box::new(source),
    })?;
    let (primary, _) = lab.stun_addresses("stun")?;
    let h1 = lab.node("h1")?;
    let map: &[&str] = if expected.compares_port_mapping() {
        &["--map"]
    } else {
        &[]
    };
    let mut v4 = spawn_probe(exe, h1, primary, map)?;
    let mut v6 = None;
    if expected.compares_ipv6() {
        let (primary6, _) = lab.stun_addresses6("stun")?;
        // Whether h1 routes to the reflector's IPv6 address at all: a connected UDP socket
        // asks the kernel's routing table and sends nothing.
        let routed = h1
            .run(move || std::net::UdpSocket::bind("[::]:0").and_then(|s| s.connect(primary6)))
            .map_err(LabError::from)?
            .is_ok();
        if routed {
            v6 = Some(spawn_probe(exe, h1, primary6, &["--no-port-mapping"])?);
        }
    }
    // Both are waited for (each within PROBE_LIMIT) before either error is returned, so no probe
    // outlives its lab.
    let report = finish(&mut v4);
    let ipv6 = v6
        .as_mut()
        .map(|child| {
            let doc: serde_json::Value = finish(child)?;
            serde_json::from_value(doc["ipv6"].clone()).map_err(RowError::Json)
        })
        .transpose()
        .map_err(|e| RowError::Ipv6(Box::new(e)));
    lab.down();
    Ok((report?, ipv6?))
}

/// `EXE probe SERVER --json EXTRA…` as a process in `node`.
fn spawn_probe(
    exe: &Path,
    node: &crate::LabNode,
    server: SocketAddr,
    extra: &[&str],
) -> Result<std::process::Child, RowError> {
    let mut cmd = Command::new(exe);
    cmd.args(["probe", &server.to_string(), "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    node.spawn(cmd).map_err(RowError::Start)
}

/// Waits for a probe and reads its document.
fn finish<T: serde::de::DeserializeOwned>(child: &mut std::process::Child) -> Result<T, RowError> {
    let Some((status, stdout)) = jobs::output_within(child, PROBE_LIMIT)? else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RowError::Timeout);
    };
    // Exit 1 is a finding (UDP blocked, unknown result), not an error.
    if status.code().is_none_or(|c| c > 1) {
        return Err(RowError::Failed(status));
    }
    serde_json::from_slice(&stdout).map_err(RowError::Json)
}
