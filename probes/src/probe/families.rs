//! Both address families at once (issue 13): which of a server's addresses to probe
//! ([`servers`]) and one [`Probe`] per family driven concurrently over real sockets
//! ([`drive_families`]), so a dual-stack classification costs about the time of one. The
//! verdicts that only IPv6 has (translation, the IPv6 outlook) are
//! [`natscope_core::probe::family`]'s.
//!
//! Each family's probe has its own sockets (bound to the local address the route to that family's
//! server picks) and its own pacer: the two address families of a server are two paths, and
//! a failure of one (no IPv6 route, say) leaves the other's result standing, with a warning.

use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::driver;
use super::family::{Families, Family, FamilyChoice};
use super::pacing::{PaceChoice, Pacing};
use super::plan::{Probe, ProbeConfig};
use super::report::ProbeReport;
use crate::resolve::{server_address, ResolveError, Service};

/// The server's address of each family `choice` asks for. An address literal has one family; a
/// name has every family it resolves to (the system resolver's first address of each).
pub fn servers(input: &str, choice: FamilyChoice) -> Result<Families<SocketAddr>, String> {
    let first = server_address(input, Service::STUN).map_err(|e: ResolveError| e.to_string())?;
    let mut found = Families::default();
    let all: Vec<SocketAddr> = if input.parse::<SocketAddr>().is_ok() {
        vec![first]
    } else {
        std::iter::once(first)
            .chain(input.to_socket_addrs().into_iter().flatten())
            .collect()
    };
    for a in all {
        if a.ip().is_unspecified() || a.ip().is_multicast() {
            continue;
        }
        match Family::of(a) {
            Family::Ipv4 => found.ipv4 = found.ipv4.or(Some(a)),
            Family::Ipv6 => found.ipv6 = found.ipv6.or(Some(a)),
        }
    }
    choice
        .select(found.ipv4, found.ipv6)
        .map_err(|e| format!("{input}: {e}"))
}

/// RFC 5780 §5 pacing for the run against `server`: decided over the named `servers` when it is
/// one of them, else (the other family's address of a name) over `server` alone.
pub fn pacing_for(servers: &[SocketAddr], server: SocketAddr, choice: PaceChoice) -> Pacing {
    if servers.contains(&server) {
        Pacing::decide(servers, choice)
    } else {
        Pacing::decide(&[server], choice)
    }
}

/// The outcome of [`drive_families`].
#[derive(Debug)]
pub struct FamilyRun {
    /// The probe whose report is the document's top level: IPv4's when it ran, else IPv6's.
    pub primary: Probe,
    /// The family of `primary`.
    pub family: Family,
    /// The IPv6 report when IPv6 ran beside an IPv4 primary.
    pub ipv6: Option<ProbeReport>,
    /// A family that could not be probed while the other could (lowercase, one line each).
    pub warnings: Vec<String>,
    /// The gateway's port-mapping services (issue 12), asked beside the STUN tests when `portmap`
    /// enables it; the caller adds it to the primary report with
    /// [`ProbeReport::apply_port_mapping`].
    pub port_mapping: Option<crate::portmap::PortMappingReport>,
}

/// Probes every family in `servers` at once, each with the configuration `cfg` makes for its
/// server; `progress` gets the requests sent so far, all families together. The gateway's
/// port-mapping services are asked at the same time when `portmap` enables it (towards the IPv4
/// server, else the IPv6 one); `--map`'s mapping is made and checked after both.
pub async fn drive_families(
    servers: Families<SocketAddr>,
    deadline: Duration,
    portmap: crate::portmap::Options,
    cfg: impl Fn(SocketAddr) -> ProbeConfig,
    progress: impl Fn(u32),
) -> io::Result<FamilyRun> {
    let pm_server = servers.ipv4.or(servers.ipv6);
    let pm = async {
        match pm_server {
            Some(server) if portmap.enabled => {
                Some(crate::portmap::discover_report(portmap, server).await)
            }
            _ => None,
        }
    };
    let sent = [Cell::new(0u32), Cell::new(0u32)];
    let one = |i: usize, server: Option<SocketAddr>| {
        let (sent, cfg, progress) = (&sent, &cfg, &progress);
        async move {
            let server = server?;
            let run = driver::drive(
                server,
                deadline,
                |start| Probe::new(start, cfg(server)),
                |p: &Probe| {
                    sent[i].set(p.requests_sent());
                    progress(sent[0].get() + sent[1].get());
                },
            )
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot probe {server}: {e}")));
            Some(run)
        }
    };
    let (v4, v6, mut port_mapping) = tokio::join!(one(0, servers.ipv4), one(1, servers.ipv6), pm);
    let mut warnings = Vec::new();
    let mut warn = |e: io::Error| warnings.push(e.to_string());
    let (primary, family, ipv6) = match (v4, v6) {
        (Some(Ok(p4)), v6) => {
            let ipv6 = match v6 {
                Some(Ok(p6)) => Some(p6.report()),
                Some(Err(e)) => {
                    warn(e);
                    None
                }
                None => None,
            };
            (p4, Family::Ipv4, ipv6)
        }
        (v4, Some(Ok(p6))) => {
            if let Some(Err(e)) = v4 {
                warn(e);
            }
            (p6, Family::Ipv6, None)
        }
        (Some(Err(e)), _) | (None, Some(Err(e))) => return Err(e),
        (None, None) => return Err(io::Error::other("no server address to probe")),
    };
    if let (Some(report), Some(server), true) = (port_mapping.as_mut(), pm_server, portmap.map) {
        crate::portmap::map_best(report, server).await;
    }
    Ok(FamilyRun {
        primary,
        family,
        ipv6,
        warnings,
        port_mapping,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_have_one_family_and_names_may_have_both() {
        let f = servers("127.0.0.1:3478", FamilyChoice::Auto).unwrap();
        assert_eq!((f.ipv4.is_some(), f.ipv6.is_some()), (true, false));
        let f = servers("[::1]:3478", FamilyChoice::Auto).unwrap();
        assert_eq!((f.ipv4.is_some(), f.ipv6.is_some()), (false, true));
        let e = servers("127.0.0.1:3478", FamilyChoice::V6).unwrap_err();
        assert!(e.contains("no ipv6 address"), "{e}");
        assert!(servers("127.0.0.1", FamilyChoice::Auto).is_err());
    }
}
