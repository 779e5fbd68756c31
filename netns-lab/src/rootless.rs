//! Rootless labs: an unprivileged user's labs live in a user namespace of their own.
//!
//! Run by a user who is not root, a process that builds labs (the `lab up` supervisor, `lab
//! matrix`, `lab grid`, `bench lab`) first moves itself into a new user namespace, mapping the
//! caller's uid and gid to 0, plus a mount namespace ([`enter`], from `netns::check_privileges`,
//! before the process starts any thread: `unshare(CLONE_NEWUSER)` refuses multi-threaded
//! callers). Inside it the process holds every capability over the namespaces it creates, so the
//! lab code runs unchanged: network namespaces from worker threads, veths, bridges, packet
//! sockets, nftables. Nothing it creates belongs to the root user namespace, so nothing can reach
//! the root network namespace. This is patchbay's model, whole-process rather than per-lab: one
//! user namespace per process, not one per lab, keeps `setns` out of the worker threads.
//!
//! Two things would need root and are moved instead: the named namespaces' bind mounts go to
//! `<state>/netns`, covered by a tmpfs of the process's own mount namespace (they vanish with
//! the process, and no other user sees them), and the lab records and control sockets go to
//! `<state>/labs`, where `<state>` is `$XDG_RUNTIME_DIR/natscope` when that directory is the
//! caller's own, else `/tmp/natscope-<uid>` (0700, refused if someone else owns it). A later
//! process reaches a lab through its record: `lab status` and `lab nat-table` over the control
//! socket (its SO_PEERCRED check sees the caller as uid 0 of the supervisor's namespace, the
//! supervisor's own uid), `lab down` by signal, and `lab exec` by joining the supervisor's user
//! and mount namespaces ([`join`], again before any thread) and then the node's network namespace.
//! Programs started in a rootless lab run as uid 0 of its user namespace, which is the caller's
//! own uid outside.
//!
//! When the supervisor dies without tearing down, the processes it started live on in its user
//! namespace (which the record names); [`processes_in_userns`] finds them for the stale-lab
//! cleanup. Where the kernel forbids unprivileged user namespaces, [`explain`] says in one line
//! which setting forbids it.

use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{geteuid, getgid, getuid};

use crate::netns::NetnsError;

/// Set once this process has entered a rootless lab's user namespace (its own or a supervisor's).
static ENTERED: OnceLock<()> = OnceLock::new();
/// The caller's state directory, computed with its real uid (inside the namespace it reads 0).
static STATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Whether this process's labs are rootless: it is not root, or it is in a rootless lab's user
/// namespace (where it reads as root).
pub fn active() -> bool {
    ENTERED.get().is_some() || !geteuid().is_root()
}

/// Whether this process has entered a rootless lab's user namespace.
pub fn entered() -> bool {
    ENTERED.get().is_some()
}

/// The caller's rootless state directory (`labs/` and `netns/` are in it), created 0700 if
/// missing and refused unless it is a directory only the caller may write.
pub fn state_dir() -> Result<PathBuf, NetnsError> {
    STATE
        .get_or_init(|| {
            let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
            make_state_dir(&choose_state_dir(getuid().as_raw(), xdg.as_deref()))
        })
        .clone()
        .map_err(NetnsError::Rootless)
}

/// `$XDG_RUNTIME_DIR/natscope` when `xdg` is an absolute directory of `uid`'s that no one else
/// may write (systemd's /run/user/UID), else `/tmp/natscope-<uid>`.
fn choose_state_dir(uid: u32, xdg: Option<&Path>) -> PathBuf {
    match xdg {
        Some(d) if d.is_absolute() && owned_private(d, uid, 0o022) => d.join("natscope"),
        _ => PathBuf::from(format!("/tmp/natscope-{uid}")),
    }
}

/// Whether `d` is a directory (not a symlink) of `uid` with none of `forbidden` mode bits.
fn owned_private(d: &Path, uid: u32, forbidden: u32) -> bool {
    std::fs::symlink_metadata(d)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.permissions().mode() & forbidden == 0)
}

fn make_state_dir(base: &Path) -> Result<PathBuf, String> {
    let uid = getuid().as_raw();
    for d in [base.to_path_buf(), base.join("labs"), base.join("netns")] {
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", d.display())),
        }
        // A directory someone else made (or made writable) could feed this user fake labs.
        if !owned_private(&d, uid, 0o077) {
            return Err(format!(
                "{} is not a directory only uid {uid} can use (mode 0700); remove it",
                d.display()
            ));
        }
    }
    Ok(base.to_path_buf())
}

/// Moves this process into a new user namespace (the caller's uid and gid mapped to 0) and mount
/// namespace with a tmpfs of its own over `<state>/netns`. Must run before the process starts a
/// thread; does nothing once done.
pub fn enter() -> Result<(), NetnsError> {
    if entered() {
        return Ok(());
    }
    let state = state_dir()?;
    let (uid, gid) = (getuid().as_raw(), getgid().as_raw());
    single_threaded()?;
    let step = |what: &'static str| move |e: nix::Error| NetnsError::Rootless(forbidden(what, e));
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(step("unshare(CLONE_NEWUSER)"))?;
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(|e| {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EPERM as i32));
            NetnsError::Rootless(forbidden("writing the user namespace's id maps", errno))
        })
    };
    // setgroups must be denied before an unprivileged process may write gid_map.
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    // Nothing mounted here may propagate anywhere (a user namespace's mounts are slaves of the
    // parent's at most; private says so outright).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("making the mount namespace private"))?;
    mount(
        Some("tmpfs"),
        &state.join("netns"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(step("mounting the namespace directory"))?;
    let _ = ENTERED.set(());
    Ok(())
}

/// Joins the user and mount namespaces of a rootless lab's supervisor `owner`, checked to be the
/// user namespace `userns` its record names (for `lab exec`; before any thread starts).
pub fn join(owner: i32, userns: u64) -> Result<(), NetnsError> {
    // Computed with the real uid now: inside, getuid() reads 0.
    state_dir()?;
    let open = |kind: &str| {
        std::fs::File::open(format!("/proc/{owner}/ns/{kind}")).map_err(|e| {
            NetnsError::Rootless(format!(
                "cannot reach the lab's supervisor (pid {owner}): {e}; natscope lab down removes \
                 what is left"
            ))
        })
    };
    let user = open("user")?;
    if user.metadata().map(|m| m.ino()).ok() != Some(userns) {
        return Err(NetnsError::Rootless(format!(
            "process {owner} is not in the lab's user namespace any more"
        )));
    }
    let mnt = open("mnt")?;
    single_threaded()?;
    let cwd = std::env::current_dir().ok();
    let step =
        |what: &'static str| move |e: nix::Error| NetnsError::Rootless(format!("{what}: {e}"));
    setns(user.as_fd(), CloneFlags::CLONE_NEWUSER)
        .map_err(step("joining the lab's user namespace"))?;
    setns(mnt.as_fd(), CloneFlags::CLONE_NEWNS)
        .map_err(step("joining the lab's mount namespace"))?;
    // Joining a mount namespace moves the process to its root directory.
    if let Some(cwd) = cwd {
        let _ = std::env::set_current_dir(cwd);
    }
    let _ = ENTERED.set(());
    Ok(())
}

fn single_threaded() -> Result<(), NetnsError> {
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<usize>().ok())
        })
        .unwrap_or(1);
    if threads > 1 {
        return Err(NetnsError::Rootless(format!(
            "a rootless lab needs its user namespace before the process starts threads \
             ({threads} running): call natscope_lab::netns::check_privileges first"
        )));
    }
    Ok(())
}

/// The inode of this process's user namespace (what a rootless lab's record names).
pub fn userns_self() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/user")
        .ok()
        .map(|m| m.ino())
}

/// PIDs of the processes in user namespace `userns` that a rootless lab of this user could have
/// started: root inside maps to this user alone (`0 <uid> 1`, as [`enter`] writes it). The map
/// check keeps a recycled namespace inode from naming another program's sandbox.
pub fn processes_in_userns(userns: u64) -> Vec<i32> {
    let me = getuid().as_raw().to_string();
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
        let Ok(link) = std::fs::read_link(entry.path().join("ns/user")) else {
            continue;
        };
        let ino = link
            .to_str()
            .and_then(|s| s.strip_prefix("user:["))
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok());
        if ino != Some(userns) {
            continue;
        }
        // Read from here, the map's outside uid is this process's own uid as it sees it.
        let map = std::fs::read_to_string(entry.path().join("uid_map")).unwrap_or_default();
        let fields: Vec<&str> = map.split_whitespace().collect();
        if fields == ["0", me.as_str(), "1"] {
            pids.push(pid);
        }
    }
    pids
}

/// The one line `natscope lab` prints when step `what` of entering a user namespace failed:
/// which kernel setting forbids it, read from /proc/sys (never changed).
fn forbidden(what: &str, e: nix::Error) -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    explain(
        what,
        e,
        read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref(),
        read("/proc/sys/kernel/unprivileged_userns_clone").as_deref(),
        read("/proc/sys/user/max_user_namespaces").as_deref(),
    )
}

/// `forbidden` from the values of the three settings that can forbid unprivileged user
/// namespaces (`None`: this kernel has no such setting).
pub fn explain(
    what: &str,
    e: nix::Error,
    apparmor_restrict: Option<&str>,
    userns_clone: Option<&str>,
    max_user_namespaces: Option<&str>,
) -> String {
    let fix = "or run natscope lab as root";
    if apparmor_restrict == Some("1") {
        return format!(
            "rootless labs need unprivileged user namespaces, which AppArmor restricts here \
             (kernel.apparmor_restrict_unprivileged_userns = 1; {what}: {e}): set it to 0 or give \
             natscope an AppArmor profile with `userns`, {fix}"
        );
    }
    if userns_clone == Some("0") {
        return format!(
            "rootless labs need unprivileged user namespaces, which this kernel forbids \
             (kernel.unprivileged_userns_clone = 0; {what}: {e}): set it to 1, {fix}"
        );
    }
    if max_user_namespaces == Some("0") {
        return format!(
            "rootless labs need user namespaces, which this kernel disables \
             (user.max_user_namespaces = 0; {what}: {e}): set it above 0, {fix}"
        );
    }
    format!(
        "rootless labs need an unprivileged user namespace, and {what} failed: {e} (a container's \
         seccomp policy or a security module may forbid it); {fix}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each setting that forbids unprivileged user namespaces is named with the value to set.
    #[test]
    fn a_forbidding_kernel_is_explained_in_one_line() {
        let e = Errno::EPERM;
        let ubuntu = explain(
            "writing the user namespace's id maps",
            e,
            Some("1"),
            None,
            None,
        );
        assert!(
            ubuntu.contains("kernel.apparmor_restrict_unprivileged_userns = 1")
                && ubuntu.contains("set it to 0"),
            "{ubuntu}"
        );
        let debian = explain("unshare(CLONE_NEWUSER)", e, Some("0"), Some("0"), Some("5"));
        assert!(
            debian.contains("kernel.unprivileged_userns_clone = 0"),
            "{debian}"
        );
        let max = explain(
            "unshare(CLONE_NEWUSER)",
            Errno::ENOSPC,
            None,
            Some("1"),
            Some("0"),
        );
        assert!(max.contains("user.max_user_namespaces = 0"), "{max}");
        let other = explain(
            "unshare(CLONE_NEWUSER)",
            e,
            Some("0"),
            Some("1"),
            Some("100"),
        );
        assert!(other.contains("unshare(CLONE_NEWUSER) failed"), "{other}");
        for line in [ubuntu, debian, max, other] {
            assert!(!line.contains('\n') && line.ends_with("or run natscope lab as root"));
        }
    }

    /// The runtime directory is used only when it is the caller's own and private.
    #[test]
    fn the_state_directory_is_the_callers_own() {
        let uid = getuid().as_raw();
        assert_eq!(
            choose_state_dir(uid, None),
            PathBuf::from(format!("/tmp/natscope-{uid}"))
        );
        assert_eq!(
            choose_state_dir(uid, Some(Path::new("relative"))),
            PathBuf::from(format!("/tmp/natscope-{uid}"))
        );
        let dir = std::env::temp_dir().join(format!("natscope-xdg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(choose_state_dir(uid, Some(&dir)), dir.join("natscope"));
        // Someone else's (here: uid + 1's) or a world-writable directory is not used.
        assert_eq!(
            choose_state_dir(uid + 1, Some(&dir)),
            PathBuf::from(format!("/tmp/natscope-{}", uid + 1))
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            choose_state_dir(uid, Some(&dir)),
            PathBuf::from(format!("/tmp/natscope-{uid}"))
        );
        // A state directory others may write is refused.
        let state = dir.join("natscope");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = make_state_dir(&state).unwrap_err();
        assert!(err.contains("is not a directory only uid"), "{err}");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(make_state_dir(&state).unwrap(), state);
        assert!(owned_private(&state.join("netns"), uid, 0o077));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
