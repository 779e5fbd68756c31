//! Named network namespaces and the worker thread that lives in each.
//!
//! A namespace is created the way `ip netns add` does it (unshare, then bind-mount the thread's
//! namespace file under /run/netns so other programs, `ip netns exec` included, find it by name),
//! but from a dedicated thread: `unshare(CLONE_NEWNET)` moves only the calling thread, so the
//! process's other threads — and the root namespace — are never touched. That thread stays in the
//! namespace and runs every job for the node (netlink calls, socket creation, process spawns:
//! children inherit the spawning thread's namespace), so no caller ever calls `setns` itself
//! (STYLE.md, patchbay). Hand-written with `nix` rather than rtnetlink's `NetworkNamespace`, which
//! forks a child process per namespace.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named namespaces live (iproute2's convention).
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace a lab creates: `nsc-<lab>-<node>`.
pub const PREFIX: &str = "nsc-";

/// Errors of namespace handling; messages name the namespace and the failed step.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): {0}; run natscope lab as root, e.g. with sudo")]
    Permission(String),
    #[error("namespace {name}: {step}: {source}")]
    Io {
        name: String,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("namespace {0}: its worker thread has stopped")]
    WorkerGone(String),
}

fn io_err(name: &str, step: &'static str, e: impl Into<std::io::Error>) -> NetnsError {
    let source = e.into();
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        return NetnsError::Permission(format!("{step} for {name}: {source}"));
    }
    NetnsError::Io {
        name: name.to_string(),
        step,
        source,
    }
}

type Job = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send>;

/// A named network namespace with its worker thread. Dropping it stops the thread but leaves
/// the namespace; [`Netns::delete`] removes it.
pub struct Netns {
    name: String,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

/// The bind-mount path of a namespace name.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

impl Netns {
    /// Creates the namespace `name` (fails if it exists) with `lo` still down.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        std::fs::create_dir_all(NETNS_DIR).map_err(|e| io_err(name, "creating /run/netns", e))?;
        let path = path_of(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err(name, "creating the namespace file", e))?;
        let mount_path = path.clone();
        let thread_name = name.to_string();
        Self::spawn(name, move || {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| io_err(&thread_name, "unshare(CLONE_NEWNET)", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &mount_path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| io_err(&thread_name, "bind-mounting the namespace", e))
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })
    }

    /// Attaches a worker thread to an existing named namespace (for `lab exec`-like helpers and
    /// tests that inspect a running lab).
    pub fn open(name: &str) -> Result<Self, NetnsError> {
        let file = File::open(path_of(name)).map_err(|e| io_err(name, "opening", e))?;
        let thread_name = name.to_string();
        Self::spawn(name, move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| io_err(&thread_name, "setns", e))
        })
    }

    /// Starts the worker thread: it runs `enter` (which moves it into the namespace), reports how
    /// that went, and then serves jobs. On an error the thread has ended.
    fn spawn(
        name: &str,
        enter: impl FnOnce() -> Result<(), NetnsError> + Send + 'static,
    ) -> Result<Self, NetnsError> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), NetnsError>>();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("ns-{name}"))
            .spawn(move || {
                let r = enter();
                let ok = r.is_ok();
                let _ = ready_tx.send(r);
                if ok {
                    worker_loop(&thread_name, job_rx);
                }
            })
            .map_err(|e| io_err(name, "spawning the worker thread", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                name: name.to_string(),
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(NetnsError::WorkerGone(name.to_string())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on the namespace's thread and returns its result: sockets it creates belong to
    /// the namespace, and processes it spawns start inside it.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run_in_runtime(move |_| f())
    }

    /// Runs a future on the namespace thread's current-thread tokio runtime to completion.
    pub fn block_on<T, F, Fut>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        self.run_in_runtime(move |rt| rt.block_on(f()))
    }

    fn run_in_runtime<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |rt| {
            let _ = tx.send(f(rt));
        });
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| NetnsError::WorkerGone(self.name.clone()))?;
        rx.recv()
            .map_err(|_| NetnsError::WorkerGone(self.name.clone()))
    }

    /// Stops the worker thread, then unmounts and removes the namespace file. The kernel frees
    /// the namespace (and its veth ends) once no process, thread or socket holds it any more.
    pub fn delete(mut self) -> Result<(), NetnsError> {
        self.stop();
        remove_named(&self.name)
    }

    fn stop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop();
    }
}

fn worker_loop(name: &str, jobs: mpsc::Receiver<Job>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(namespace = name, error = %e, "no runtime for the namespace worker");
            return;
        }
    };
    while let Ok(job) = jobs.recv() {
        job(&rt);
    }
}

/// Unmounts and removes the named namespace file, whoever created it (stale-lab cleanup).
pub fn remove_named(name: &str) -> Result<(), NetnsError> {
    let path = path_of(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(io_err(name, "unmounting", e)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(name, "removing the namespace file", e)),
    }
}

/// Names of every namespace under /run/netns that starts with [`PREFIX`].
pub fn list_lab_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    names.sort();
    names
}

/// Moves the calling thread into the named namespace (used by `lab exec` right before it
/// replaces itself with the user's program).
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let file = File::open(path_of(name)).map_err(|e| io_err(name, "opening", e))?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| io_err(name, "setns", e))
}

/// The namespace inode of a named namespace, to find the processes living in it.
pub fn inode_of(name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path_of(name)).ok().map(|m| m.ino())
}

/// The network namespace of process `pid`: the inode `/proc/PID/ns/net` names (`net:[INODE]`).
/// `None` once the process has exited (a zombie has no namespaces any more) or never existed.
fn net_inode_of_pid(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// PIDs of the processes whose network namespace is one of `inodes`: one scan of /proc, a
/// snapshot that may be stale as soon as it returns (a PID may exit and be reused, a process may
/// fork). To signal them, use [`members`], which holds each one by a pidfd.
pub fn processes_in(inodes: &[u64]) -> Vec<i32> {
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| net_inode_of_pid(*pid).is_some_and(|i| inodes.contains(&i)))
        .collect()
}

/// A process held by a pidfd, so a signal sent through it reaches this process and never one
/// that later gets the same PID (pidfd_open(2)). Hand-written on `rustix` because nix has no
/// pidfd calls.
#[derive(Debug)]
pub struct Member {
    pid: i32,
    pidfd: std::os::fd::OwnedFd,
}

impl Member {
    /// Opens a pidfd for `pid`; `None` if no such process exists any more.
    pub fn open(pid: i32) -> Option<Self> {
        let raw = rustix::process::Pid::from_raw(pid)?;
        let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
        Some(Self { pid, pidfd })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` to this process, whatever namespace it is in. False if it has exited.
    pub fn signal(&self, signal: rustix::process::Signal) -> bool {
        rustix::process::pidfd_send_signal(&self.pidfd, signal).is_ok()
    }

    /// Sends `signal` only if the process is still in one of the namespaces `inodes`. The check
    /// reads /proc/PID *before* the signal goes through the pidfd: if the signal is delivered,
    /// the process was alive at the check, so PID was still its own and the check was of it; if
    /// it exited in between, the pidfd refuses the signal (ESRCH) and nobody else receives it.
    pub fn signal_if_in(&self, inodes: &[u64], signal: rustix::process::Signal) -> bool {
        net_inode_of_pid(self.pid).is_some_and(|i| inodes.contains(&i)) && self.signal(signal)
    }

    /// Whether the process has exited (a pidfd polls readable then; a zombie counts as exited,
    /// it holds no namespace any more).
    pub fn exited(&self) -> bool {
        wait_exited(std::slice::from_ref(self), std::time::Duration::ZERO)
    }
}

/// At most this many processes are held by pidfds at once ([`members`]), well below the usual
/// limit of 1024 open files: a lab with more (a fork storm) is handled over several scans.
pub const MEMBERS_PER_SCAN: usize = 256;

/// One scan of a lab's namespaces ([`members`]).
#[derive(Debug, Default)]
pub struct Scan {
    /// Processes in the namespaces, each held by a pidfd opened *before* its namespace was
    /// checked (again), so every member is a process that was in one of them while its pidfd
    /// already pointed at it.
    pub members: Vec<Member>,
    /// Processes the scan found but holds no pidfd for: beyond [`MEMBERS_PER_SCAN`], or
    /// pidfd_open(2) failed for another reason than the process being gone. They are not
    /// signalled this time; the next scan sees them again.
    pub unheld: Vec<i32>,
}

impl Scan {
    /// Whether the scan found nobody in the namespaces.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.unheld.is_empty()
    }
}

/// The processes in the namespaces `inodes`, never the calling process.
pub fn members(inodes: &[u64]) -> Scan {
    let me = std::process::id() as i32;
    let mut scan = Scan::default();
    for pid in processes_in(inodes).into_iter().filter(|pid| *pid != me) {
        if scan.members.len() >= MEMBERS_PER_SCAN {
            scan.unheld.push(pid);
            continue;
        }
        let Some(raw) = rustix::process::Pid::from_raw(pid) else {
            continue;
        };
        match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(pidfd) => {
                if net_inode_of_pid(pid).is_some_and(|i| inodes.contains(&i)) {
                    scan.members.push(Member { pid, pidfd });
                }
            }
            // Gone since the scan read its namespace.
            Err(rustix::io::Errno::SRCH) => {}
            Err(_) => scan.unheld.push(pid),
        }
    }
    scan
}

/// Waits up to `limit` for every one of `members` to exit (poll(2) on their pidfds, no sleeping
/// in steps). True if all did.
pub fn wait_exited(members: &[Member], limit: std::time::Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let deadline = std::time::Instant::now() + limit;
    let mut pending: Vec<&Member> = members.iter().collect();
    loop {
        let mut fds: Vec<PollFd<'_>> = pending
            .iter()
            .map(|m| PollFd::new(&m.pidfd, PollFlags::IN))
            .collect();
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        let mut ready = ready.into_iter();
        pending.retain(|_| !ready.next().unwrap_or(false));
        if pending.is_empty() {
            return true;
        }
        if left.is_zero() {
            return false;
        }
    }
}

/// Fails with [`NetnsError::Permission`] unless this process may create network namespaces
/// (tried in a throwaway thread, whose new namespace vanishes with it).
pub fn check_privileges() -> Result<(), NetnsError> {
    let probe = std::thread::spawn(|| unshare(CloneFlags::CLONE_NEWNET));
    match probe.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NetnsError::Permission(format!(
            "unshare(CLONE_NEWNET): {}",
            e.desc()
        ))),
        Err(_) => Err(NetnsError::Permission(
            "the privilege check panicked".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::process::Signal;

    /// A process is signalled only while it is in one of the given namespaces, and a pidfd
    /// whose process has exited (and whose PID may be anyone's now) signals nobody.
    #[test]
    fn a_member_is_signalled_only_in_the_given_namespaces_and_only_while_it_lives() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("start sleep");
        let pid = child.id() as i32;
        let m = Member::open(pid).expect("pidfd of a live child");
        let own = net_inode_of_pid(pid).expect("the child's namespace");
        assert!(!m.signal_if_in(&[own.wrapping_add(1)], Signal::KILL));
        assert!(!m.exited(), "a process of another namespace was signalled");
        assert!(m.signal_if_in(&[own], Signal::KILL));
        assert!(wait_exited(
            std::slice::from_ref(&m),
            std::time::Duration::from_secs(5)
        ));
        // A zombie counts as gone: it holds no namespace.
        assert_eq!(net_inode_of_pid(pid), None);
        child.wait().expect("reap");
        assert!(
            !m.signal(Signal::KILL),
            "a reaped process's pidfd still signals"
        );
        assert!(!m.signal_if_in(&[own], Signal::KILL));
    }
}
