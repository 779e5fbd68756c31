//! Named network namespaces and the worker thread that lives in each.
//!
//! A namespace is created the way `ip netns add` does it (unshare, then bind-mount the thread's
//! namespace file under /run/netns so other programs, `ip netns exec` included, find it by name),
//! but from a dedicated thread: `unshare(CLONE_NEWNET)` moves only the calling thread, so the
//! process's other threads — and the root namespace — are never touched. That thread stays in the
//! namespace and runs every job for the node (netlink calls, socket creation, process spawns:
//! children inherit the spawning thread's namespace), so no caller ever calls `setns` itself
//! (STYLE.md, patchbay). For an unprivileged user the same code runs inside a user namespace of
//! the process's own, with the bind mounts in a private directory ([`crate::rootless`], [`dir`]).
//! Hand-written with `nix` rather than rtnetlink's `NetworkNamespace`, which
//! forks a child process per namespace.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where root's named namespaces live (iproute2's convention); see [`dir`].
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
    /// An unprivileged user's lab could not get its user namespace; says what to change.
    #[error("{0}")]
    Rootless(String),
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

/// Where this process's named namespaces live: [`NETNS_DIR`] for root; for an unprivileged
/// user, the private directory the process's own mount namespace covers with a tmpfs (the bind
/// mounts need a mount namespace the user owns; [`crate::rootless`]).
pub fn dir() -> PathBuf {
    if crate::rootless::active() {
        if let Ok(state) = crate::rootless::state_dir() {
            return state.join("netns");
        }
    }
    PathBuf::from(NETNS_DIR)
}

/// The bind-mount path of a namespace name.
pub fn path_of(name: &str) -> PathBuf {
    dir().join(name)
}

impl Netns {
    /// Creates the namespace `name` (fails if it exists) with `lo` still down.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        std::fs::create_dir_all(dir())
            .map_err(|e| io_err(name, "creating the namespace directory", e))?;
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

/// Names of every namespace in [`dir`] that starts with [`PREFIX`].
pub fn list_lab_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(dir()) else {
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

/// PIDs of the processes whose network namespace is one of `inodes`.
pub fn processes_in(inodes: &[u64]) -> Vec<i32> {
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in proc_dir.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        // "net:[4026532XXX]"
        let ino = link
            .to_str()
            .and_then(|s| s.strip_prefix("net:["))
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok());
        if ino.is_some_and(|i| inodes.contains(&i)) {
            pids.push(pid);
        }
    }
    pids
}

/// Fails with [`NetnsError::Permission`] unless this process may create network namespaces
/// (tried in a throwaway thread, whose new namespace vanishes with it). Run by a user who is not
/// root, it first moves the process into a user namespace of its own ([`crate::rootless::enter`];
/// [`NetnsError::Rootless`] says what to change where the kernel forbids it), so it must run
/// before the process starts any thread.
pub fn check_privileges() -> Result<(), NetnsError> {
    if crate::rootless::active() {
        crate::rootless::enter()?;
    }
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
