//! What `lab matrix` and `lab grid` both need to run many labs at once: a bounded pool of worker
//! threads over a list of jobs (results back in job order), and a child process whose stdout is
//! collected while its run is held to a deadline.

use std::io::Read;
use std::process::{Child, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

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
