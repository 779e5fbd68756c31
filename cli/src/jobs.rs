//! What `lab matrix` and `lab grid` both need to run many labs at once: the checks before any lab
//! comes up, unique lab names, a bounded pool of worker threads over a list of jobs (results back
//! in job order), a child process whose stdout is collected while its run is held to a deadline,
//! and the exit code of the whole run.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ExitCode, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use natscope_lab::netns;

/// Checked before any lab comes up: `--jobs` within 1..=32 and the privileges labs need. Returns
/// the natscope executable that the labs' nodes run.
pub fn prepare(jobs: usize) -> Result<PathBuf> {
    if !(1..=32).contains(&jobs) {
        bail!("--jobs must be between 1 and 32");
    }
    netns::check_privileges().map_err(|e| anyhow!("{e}"))?;
    std::env::current_exe().context("cannot find the natscope executable")
}

/// A lab name unique to this run: `prefix`, the job's index, four random hex digits.
pub fn lab_name(prefix: &str, index: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    format!("{prefix}{index}{:04x}", h.finish() as u16)
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

/// Runs `work` over `items` on at most `jobs` threads; the results come back in `items`' order.
pub fn run_parallel<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(usize, &T) -> R + Sync,
) -> Result<Vec<R>> {
    let next = Mutex::new(0usize);
    let done = Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = {
                    let Ok(mut n) = next.lock() else { return };
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(item) = items.get(i) else { return };
                let r = work(i, item);
                if let Ok(mut d) = done.lock() {
                    d.push((i, r));
                }
            });
        }
    });
    let mut done = done
        .into_inner()
        .map_err(|_| anyhow!("a worker panicked"))?;
    if done.len() != items.len() {
        return Err(anyhow!("a worker panicked"));
    }
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

/// Waits for `child` (whose stdout must be piped) at most `limit`, reading its stdout meanwhile.
/// `Ok(None)` when the limit passed first: the child is then still running, for the caller to
/// inspect and kill.
pub fn output_within(child: &mut Child, limit: Duration) -> Result<Option<(ExitStatus, Vec<u8>)>> {
    let mut out = child
        .stdout
        .take()
        .context("the child's stdout is not piped")?;
    // Read on a thread so the wait below can enforce the limit.
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = reader
        .join()
        .map_err(|_| anyhow!("the output reader panicked"))?;
    Ok(Some((status, stdout)))
}
