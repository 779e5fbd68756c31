//! Punch's port mapping, the driver side (issue 12, "Punch and grid"): before the punch socket
//! sends anything, `punch listen` and `punch connect` ask the gateway on the path to the
//! rendezvous server for a mapping of that socket's UDP port (PCP > NAT-PMP > UPnP IGD, through
//! [`crate::portmap::map_port`], the probe's clients), renew it while the session lives and
//! delete it when punch exits — on every way out, Ctrl-C included, because the mapping lives in a
//! [`Slot`] owned outside the session's future and [`release`] runs after that future ends or
//! is dropped. What to send and when to renew is decided in the core
//! ([`natscope_core::punch::mapping`]).
//!
//! Why before the first packet rather than after registering: a gateway uses an explicit mapping
//! for the socket's outbound traffic too (RFC 6887 §11; the lab's routers do), so a mapping made
//! after registration would move the socket's source under the rendezvous server, which knows the
//! peer and relays to it by that source. The request runs at the same time as port prediction's
//! measurement, so it adds nothing when the gateway answers quickly, and at most its budget
//! ([`WAIT`], 100 ms) when it stays silent. No gateway on the server's path (loopback, an on-link
//! server) asks nothing and costs nothing.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natscope_core::net::Transport;
use natscope_core::punch::mapping::{refresh_at, PunchMapping, LIFETIME_S};

use crate::portmap::{self, HeldMapping};

/// `--no-port-mapping` of `punch listen` and `punch connect` (the probe's spelling), flattened
/// into their arguments so the flag costs the CLI two lines.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct PortMapFlag {
    /// Do not ask the gateway (PCP, NAT-PMP, UPnP IGD) to map the socket's port as a candidate.
    #[arg(long)]
    pub no_port_mapping: bool,
}

impl PortMapFlag {
    /// Whether to ask: on unless `--no-port-mapping` (`Techniques::PUNCH.port_mapping`).
    pub fn enabled(self) -> bool {
        natscope_core::traversal::Techniques::PUNCH.port_mapping && !self.no_port_mapping
    }
}

/// Where a session's mapping lives while it is held: outside the session's future, so a
/// cancelled session (Ctrl-C) still gets it deleted by [`release`].
pub type Slot = tokio::sync::Mutex<Option<HeldMapping>>;

/// How long punch waits for the gateway before its socket's first packet: 100 ms, PCP and
/// NAT-PMP sent at 0, 30 and 90 ms, UPnP's SSDP answer awaited as long. Shorter than the probe's
/// 250 ms ([`portmap::PortWait::PROBE`]) because here every connect pays it when the gateway is
/// silent (measured: 26 → 278 ms to direct with 250 ms), and a gateway on the LAN answers in a
/// few ms (the lab's: 1.4-9.8 ms for a PCP grant); a slower gateway is treated as absent here,
/// while `natscope probe` still finds it.
pub const WAIT: portmap::PortWait = portmap::PortWait {
    schedule: portmap::Retransmit {
        initial_rto: Duration::from_millis(30),
        budget: Duration::from_millis(100),
    },
    upnp: Duration::from_millis(100),
};

/// How long deleting the mapping may delay punch's exit.
pub const DELETE_LIMIT: Duration = Duration::from_millis(500);

/// Asks for a mapping of local UDP `port` at the gateway towards `server`, when `enabled`, over
/// UDP. Returns the mapping to hold and what the report says about it.
pub async fn acquire(
    enabled: bool,
    transport: Transport,
    server: SocketAddr,
    port: u16,
) -> (Option<HeldMapping>, PunchMapping) {
    if !enabled {
        return (None, PunchMapping::none("turned off by --no-port-mapping"));
    }
    if transport != Transport::Udp {
        return (
            None,
            PunchMapping::none("not asked over TCP: the mapping serves UDP punching only"),
        );
    }
    if server.ip().to_canonical().is_ipv6() {
        // The mapping would be of an IPv4 port on an IPv4 gateway, useless to an IPv6 socket
        // (NAT-PMP is IPv4-only; PCP over IPv6 is not asked yet).
        return (
            None,
            PunchMapping::none("not asked: the session is IPv6, and mappings are asked over IPv4"),
        );
    }
    let t0 = Instant::now();
    let gateway = match portmap::gateway_towards(server) {
        Ok(g) => IpAddr::V4(g),
        Err(why) => return (None, PunchMapping::none(why)),
    };
    let r = portmap::map_port(gateway, port, LIFETIME_S, WAIT).await;
    let mut report = PunchMapping {
        gateway: Some(gateway),
        duration_ms: t0.elapsed().as_secs_f64() * 1e3,
        why_none: r.why_none,
        problems: r.problems,
        ..PunchMapping::default()
    };
    if let Some(h) = &r.mapping {
        report.protocol = Some(h.service);
        report.internal = Some(h.internal);
        report.external = Some(h.granted.external);
        report.lifetime_s = Some(h.granted.lifetime_s);
        // A UPnP gateway that would not say its external address leaves nothing to offer.
        report.offered = !h.granted.external.ip().is_unspecified();
    }
    (r.mapping, report)
}

/// The external address to send as a candidate, if any.
pub fn offered(report: &PunchMapping) -> Option<SocketAddr> {
    report.external.filter(|_| report.offered)
}

/// Renews the mapping in `slot` at half its lifetime, for as long as it is polled (never ends).
pub async fn keep(slot: &Slot) -> Infallible {
    loop {
        let due = slot
            .lock()
            .await
            .as_ref()
            .map(|h| refresh_at(h.granted_at, h.granted.lifetime_s));
        match due {
            None => tokio::time::sleep(Duration::from_secs(3600)).await,
            Some(at) => {
                tokio::time::sleep_until(at.into()).await;
                let mut held = slot.lock().await;
                if let Some(h) = held.as_mut() {
                    if let Err(why) = h.refresh(LIFETIME_S).await {
                        tracing::warn!(%why, "punch: renewing the port mapping failed");
                        // Try again at half of what is left, not in a tight loop.
                        h.granted_at = Instant::now();
                        h.granted.lifetime_s = h.granted.lifetime_s.saturating_sub(1).max(1);
                    }
                }
            }
        }
    }
}

/// Deletes the mapping in `slot`, if one is held; the error line when the gateway did not
/// confirm it.
pub async fn release(slot: &Slot) -> Option<String> {
    let held = slot.lock().await.take()?;
    held.delete(DELETE_LIMIT).await.err()
}

/// Runs `session` while [`keep`]ing the mappings in `slots` (one per socket: a listener
/// registered with several servers has one socket, and one mapping, per server), or until
/// `stop` resolves (then `None`); either way every mapping is deleted before this returns.
pub async fn hold<T>(
    slots: &[Slot],
    session: impl std::future::Future<Output = T>,
    stop: impl std::future::Future<Output = ()>,
) -> Option<T> {
    let keep_all = async {
        futures::future::join_all(slots.iter().map(keep)).await;
        std::future::pending::<Infallible>().await
    };
    let out = tokio::select! {
        r = session => Some(r),
        never = keep_all => match never {},
        _ = stop => None,
    };
    for why in futures::future::join_all(slots.iter().map(release))
        .await
        .into_iter()
        .flatten()
    {
        tracing::warn!(%why, "punch: deleting the port mapping");
    }
    out
}
