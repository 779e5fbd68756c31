//! Running many labs at once, as `lab matrix`, `lab grid` and `bench lab` do: unique lab names, a
//! bounded pool of worker threads over a list of jobs (results back in job order), and a child
//! process whose stdout is collected while its run is held to a deadline, a child's stdout and
//! stderr captured as it runs ([`CapturedOutput`]), and a job's error as one line.
//! [`run_parallel_shown`] also shows a progress bar (done/total, ETA) on stderr when stderr is a
//! terminal, and nothing otherwise (a CI log or a pipe gets no control characters).

use std::io::{IsTerminal, Read};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why a batch of jobs or a child's run could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("a worker panicked")]
    WorkerPanicked,
    #[error("the child's stdout is not piped")]
    NotPiped,
    #[error("the output reader panicked")]
    ReaderPanicked,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One line for a job's `error` field: the error and its causes, each said once.
pub fn error_line(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cause = c.source();
    }
    parts.join(": ")
}

/// A lab name unique to this run: `prefix`, the job's index, four random hex digits.
pub fn lab_name(prefix: &str, index: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    format!("{prefix}{index}{:04x}", h.finish() as u16)
}

/// Runs `work` over `items` on at most `jobs` threads; the results come back in `items`' order.
pub fn run_parallel<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(usize, &T) -> R + Sync,
) -> Result<Vec<R>, JobError> {
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
    let mut done = done.into_inner().map_err(|_| JobError::WorkerPanicked)?;
    if done.len() != items.len() {
        return Err(JobError::WorkerPanicked);
    }
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

/// [`run_parallel`] with a progress bar of `what` (e.g. "cells") on stderr when stderr is a
/// terminal ([`progress_bar`]).
pub fn run_parallel_shown<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    what: &str,
    work: impl Fn(usize, &T) -> R + Sync,
) -> Result<Vec<R>, JobError> {
    let bar = progress_bar(items.len(), what, std::io::stderr().is_terminal());
    let out = run_parallel(items, jobs, |i, item| {
        let r = work(i, item);
        bar.inc(1);
        r
    });
    bar.finish_and_clear();
    out
}

/// A bar of `total` `what`s, done/total with the estimated time left, drawn on stderr when
/// `terminal`; hidden (it draws nothing) otherwise.
pub fn progress_bar(total: usize, what: &str, terminal: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if !terminal {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("[{bar:30}] {pos}/{len} {prefix}, ETA {eta} ") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

/// Waits for `child` (whose stdout must be piped) at most `limit`, reading its stdout meanwhile.
/// `Ok(None)` when the limit passed first: the child is then still running, for the caller to
/// inspect and kill.
pub fn output_within(
    child: &mut Child,
    limit: Duration,
) -> Result<Option<(ExitStatus, Vec<u8>)>, JobError> {
    let mut out = child.stdout.take().ok_or(JobError::NotPiped)?;
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
    let stdout = reader.join().map_err(|_| JobError::ReaderPanicked)?;
    Ok(Some((status, stdout)))
}

/// A child's stdout and stderr, each read by its own thread while the child runs, so the pipes
/// never fill and what it has written so far can be shown at any time (the lab's punch peers, the
/// tests' child processes).
#[derive(Debug, Default)]
pub struct CapturedOutput {
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl CapturedOutput {
    /// Starts reading whichever of the child's stdout and stderr is piped.
    pub fn take(child: &mut Child) -> Self {
        let mut out = Self::default();
        if let Some(p) = child.stdout.take() {
            out.readers.push(read_into(p, out.stdout.clone()));
        }
        if let Some(p) = child.stderr.take() {
            out.readers.push(read_into(p, out.stderr.clone()));
        }
        out
    }

    /// Everything read from stdout so far.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Everything read from stdout so far, as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Everything read from stderr so far, as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Once the child has exited, the readers end when the pipes are drained: waits for them, at
    /// most 2 s (a grandchild could hold a pipe open).
    pub fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

fn read_into(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_job_order() {
        let items: Vec<u64> = (0..20).collect();
        let got = run_parallel(&items, 4, |i, &x| {
            // Later jobs finish first.
            std::thread::sleep(Duration::from_millis(20 - x));
            (i, x * 2)
        })
        .unwrap();
        let want: Vec<(usize, u64)> = (0..20).map(|i| (i as usize, i * 2)).collect();
        assert_eq!(got, want);
    }

    /// Off a terminal the bar is hidden (draws nothing); on one it counts done/total.
    #[test]
    fn the_progress_bar_draws_only_on_a_terminal() {
        let off = progress_bar(42, "cells", false);
        assert!(off.is_hidden());
        let on = progress_bar(42, "cells", true);
        assert_eq!(on.length(), Some(42));
        on.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        on.inc(2);
        assert_eq!(on.position(), 2);
        assert_eq!(on.prefix(), "cells");
    }

    #[test]
    fn a_child_past_its_limit_is_left_running() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let got = output_within(&mut child, Duration::from_millis(50)).unwrap();
        assert!(got.is_none());
        assert!(child.try_wait().unwrap().is_none(), "still running");
        let _ = child.kill();
        let _ = child.wait();
        let mut echo = std::process::Command::new("echo")
            .arg("hi")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (status, out) = output_within(&mut echo, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert!(status.success());
        assert_eq!(out, b"hi\n");
    }
}
