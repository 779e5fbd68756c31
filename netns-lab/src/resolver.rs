//! Name resolution inside a lab: programs started in a node see the lab's own `/etc/hosts` (every
//! node's name → its address) and a `resolv.conf` whose only name server is the node's own
//! loopback, so lab names resolve from files and any other name fails at once (the node's `lo`
//! answers a DNS query with a port-unreachable) instead of waiting on the host's stub resolver,
//! which a lab namespace cannot reach.
//!
//! [`write()`] puts one set of files per node under the lab's runtime directory
//! ([`registry::etc_path`]) when the lab comes up; [`enter`] gives the calling thread its own
//! mount namespace (`unshare(CLONE_NEWNS)` moves only the calling thread, like the network
//! namespaces in [`crate::netns`]), turns propagation off for the whole tree in that namespace and
//! bind-mounts the node's files over `/etc/hosts`, `/etc/resolv.conf` and `/etc/nsswitch.conf`.
//! Children inherit the thread's mount namespace, so a program spawned (or exec'd) after it sees
//! the lab's files; the host's files and mounts are never written. Propagation is `MS_SLAVE`
//! rather than `MS_PRIVATE`: nothing mounted here reaches the host either way, and a slave still
//! sees the host's unmounts, so when the lab removes a namespace's `/run/netns` mount the copy in
//! a long-running program's namespace goes too instead of keeping that network namespace alive.
//!
//! `nsswitch.conf` is the host's with its `hosts:` line replaced by `files dns`: a `resolve`
//! (systemd-resolved) or `mdns` source would ask a daemon over a Unix socket, which a network
//! namespace does not cut off, and answer from the host's view of the world.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::registry;
use crate::topology::{PlannedNode, Role};

/// The files [`enter`] mounts, by their name under a node's directory and the path they cover.
pub const FILES: [(&str, &str); 3] = [
    ("hosts", "/etc/hosts"),
    ("resolv.conf", "/etc/resolv.conf"),
    ("nsswitch.conf", "/etc/nsswitch.conf"),
];

/// The lab's `resolv.conf`: the node's own loopback, one try of one second, so a name that is not
/// in the lab's hosts file fails within about a second even where something does listen there.
pub const RESOLV_CONF: &str = "# natscope lab: no DNS server; names come from /etc/hosts\n\
nameserver 127.0.0.1\n\
options timeout:1 attempts:1\n";

/// Why a node's resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lab {lab} has no resolver files for node {node} ({path} is missing)")]
    Missing {
        lab: String,
        node: String,
        path: PathBuf,
    },
    #[error("{step}: {source}")]
    Mount {
        step: String,
        source: nix::errno::Errno,
    },
}

/// The directory of `node`'s files in `lab`.
pub fn node_dir(lab: &str, node: &str) -> PathBuf {
    registry::etc_path(lab).join(node)
}

/// The names a node's hosts file gives: every node's primary address under its own name, a
/// reflector's second address as `NAME-alt`, a router's LAN address as `NAME-lan`.
pub fn names(nodes: &[PlannedNode]) -> Vec<(Ipv4Addr, String)> {
    let mut names = Vec::new();
    for n in nodes {
        if let Some(primary) = n.uplink.first() {
            names.push((primary.addr, n.name.clone()));
        }
        if n.role == Role::Reflector {
            if let Some(alt) = n.uplink.get(1) {
                names.push((alt.addr, format!("{}-alt", n.name)));
            }
        }
        if let Some(lan) = n.lan {
            names.push((lan.addr, format!("{}-lan", n.name)));
        }
    }
    names
}

/// `node`'s `/etc/hosts` in lab `lab`.
pub fn hosts_file(lab: &str, node: &str, nodes: &[PlannedNode]) -> String {
    let mut s = format!(
        "# natscope lab {lab}, node {node}: the lab's names (the host's /etc/hosts is not used here)\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n"
    );
    for (addr, name) in names(nodes) {
        s.push_str(&format!("{addr}\t{name}\n"));
    }
    s
}

/// `host` (the host's nsswitch.conf) with its `hosts:` line replaced by `files dns`, or that one
/// line alone when it has none.
pub fn nsswitch(host: &str) -> String {
    let mut out = String::new();
    let mut replaced = false;
    for line in host.lines() {
        if line.trim_start().starts_with("hosts:") {
            if !replaced {
                out.push_str("hosts: files dns\n");
                replaced = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str("hosts: files dns\n");
    }
    out
}

/// Writes every node's files for lab `lab` (whose plan is `nodes`), replacing old ones.
pub fn write(lab: &str, nodes: &[PlannedNode]) -> Result<(), ResolverError> {
    let host_nsswitch = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    let nsswitch = nsswitch(&host_nsswitch);
    for n in nodes {
        let dir = node_dir(lab, &n.name);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&path, text))
                .map_err(|source| ResolverError::Write { path, source })
        };
        write("hosts", &hosts_file(lab, &n.name, nodes))?;
        write("resolv.conf", RESOLV_CONF)?;
        write("nsswitch.conf", &nsswitch)?;
    }
    Ok(())
}

/// Removes lab `lab`'s files.
pub fn remove(lab: &str) {
    if registry::valid(lab) {
        let _ = std::fs::remove_dir_all(registry::etc_path(lab));
    }
}

/// Moves the calling thread into a mount namespace of its own in which `/etc/hosts`,
/// `/etc/resolv.conf` and `/etc/nsswitch.conf` are `node`'s files of lab `lab`. Programs the
/// thread spawns or execs afterwards inherit it; the process's other threads and the host are
/// untouched. Call it on a thread that does nothing else afterwards (or that execs).
pub fn enter(lab: &str, node: &str) -> Result<(), ResolverError> {
    let dir = node_dir(lab, node);
    for (name, _) in FILES {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(ResolverError::Missing {
                lab: lab.to_string(),
                node: node.to_string(),
                path,
            });
        }
    }
    let err = |step: String| move |source| ResolverError::Mount { step, source };
    unshare(CloneFlags::CLONE_NEWNS).map_err(err("unshare(CLONE_NEWNS)".into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(err("making / a slave mount".into()))?;
    for (name, target) in FILES {
        bind(&dir.join(name), Path::new(target)).map_err(err(format!("bind-mounting {target}")))?;
    }
    Ok(())
}

/// Bind-mounts `source` over `target`, read-only. A target that is a symbolic link (Debian's
/// resolv.conf under systemd-resolved) is covered where it points: the mount follows it.
fn bind(source: &Path, target: &Path) -> Result<(), nix::errno::Errno> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    // A bind mount takes MS_RDONLY only on a remount (mount(8), "bind mount operation").
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_every_node_of_a_pair_lab() {
        let plan = crate::presets::pair("full-cone,symmetric")
            .unwrap()
            .plan()
            .unwrap();
        let text = hosts_file("nebu1", "a", &plan.nodes);
        let addr = |name: &str| {
            plan.nodes
                .iter()
                .find(|n| n.name == name)
                .unwrap()
                .uplink
                .first()
                .unwrap()
                .addr
        };
        for name in ["rendezvous", "a", "b", "nata", "natb"] {
            let line = format!("{}\t{name}\n", addr(name));
            assert!(text.contains(&line), "{line:?} missing from\n{text}");
        }
        let nata = plan.nodes.iter().find(|n| n.name == "nata").unwrap();
        let lan = format!("{}\tnata-lan\n", nata.lan.unwrap().addr);
        assert!(text.contains(&lan), "{lan:?} missing from\n{text}");
        for r in plan.nodes.iter().filter(|n| n.role == Role::Reflector) {
            let alt = format!("{}\t{}-alt\n", r.uplink[1].addr, r.name);
            assert!(text.contains(&alt), "{alt:?} missing from\n{text}");
        }
        assert!(text.starts_with("# natscope lab nebu1, node a:"));
        assert!(text.contains("127.0.0.1\tlocalhost\n"));
    }

    #[test]
    fn nsswitch_keeps_everything_but_the_hosts_line() {
        let host = "passwd: files systemd\n# hosts: old comment\nhosts:  files mdns4_minimal [NOTFOUND=return] resolve dns\ngroup: files\n";
        assert_eq!(
            nsswitch(host),
            "passwd: files systemd\n# hosts: old comment\nhosts: files dns\ngroup: files\n"
        );
        assert_eq!(nsswitch(""), "hosts: files dns\n");
    }

    #[test]
    fn resolv_conf_points_at_loopback_only() {
        let servers: Vec<&str> = RESOLV_CONF
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .collect();
        assert_eq!(servers, ["127.0.0.1"]);
    }
}
