//! One row of `natscope lab matrix`: a lab for one preset, `natscope probe --json` run in its host
//! `h1` against the lab's reflector, and every verdict compared with the preset's configured truth
//! ([`Verdicts::expected`], [`Verdicts::observed`], [`matrix::compare_verdicts`]).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natscope_core::probe::ProbeReport;

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
    let (observed, checks, error, probe) = match probe_in_lab(index, preset, exe) {
        Ok(report) => {
            let observed = Verdicts::observed(&report);
            let checks = matrix::compare_verdicts(&expected, Some(&observed));
            let keep = checks.iter().any(|c| !c.pass).then_some(report);
            (Some(observed), checks, None, keep)
        }
        Err(e) => (None, Vec::new(), Some(jobs::error_line(&e)), None),
    };
    MatrixRow {
        preset: preset.to_string(),
        pass: error.is_none() && checks.iter().all(|c| c.pass),
        expected,
        observed,
        checks,
        error,
        probe,
        duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
    }
}

/// Brings the preset up, runs the probe in `h1`, returns its `natscope.probe/v1` report.
fn probe_in_lab(index: usize, preset: &str, exe: &Path) -> Result<ProbeReport, RowError> {
    let name = jobs::lab_name("mx", index);
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
    let mut cmd = Command::new(exe);
    cmd.args(["probe", &primary.to_string(), "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = lab.node("h1")?.spawn(cmd).map_err(RowError::Start)?;
    let Some((status, stdout)) = jobs::output_within(&mut child, PROBE_LIMIT)? else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RowError::Timeout);
    };
    lab.down();
    // Exit 1 is a finding (UDP blocked, unknown result), not an error.
    if status.code().is_none_or(|c| c > 1) {
        return Err(RowError::Failed(status));
    }
    serde_json::from_slice(&stdout).map_err(RowError::Json)
}
