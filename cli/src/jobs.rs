//! What `lab matrix` and `lab grid` both need around [`natscope_lab::jobs`] (which runs their labs
//! in parallel): the checks before any lab comes up and the exit code of the whole run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use natscope_lab::netns;

pub use natscope_lab::jobs::run_parallel_shown;

/// Checked before any lab comes up: `--jobs` within 1..=32 and the privileges labs need. Returns
/// the natscope executable that the labs' nodes run.
pub fn prepare(jobs: usize) -> Result<PathBuf> {
    if !(1..=32).contains(&jobs) {
        bail!("--jobs must be between 1 and 32");
    }
    netns::check_privileges().map_err(|e| anyhow!("{e}"))?;
    std::env::current_exe().context("cannot find the natscope executable")
}

/// 2 when some job could not run at all, 1 when some outcome was not the expected one, else 0.
pub fn exit_code(any_error: bool, pass: bool) -> ExitCode {
    if any_error {
        ExitCode::from(2)
    } else if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
