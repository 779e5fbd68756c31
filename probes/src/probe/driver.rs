//! Runs a [`Probe`] (or any [`ProbeMachine`], such as the
//! [`LifetimeProbe`](super::lifetime::LifetimeProbe)) over real UDP sockets with tokio. Each probe socket is bound on first use to the local address the OS would use to
//! reach the server (so "mapped address = local address" really means "no NAT"), and gets a receive
//! task feeding one channel; the loop sleeps until the probe's next timeout or the next datagram.
//! Bounded by a wall-clock deadline.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::machine::ProbeMachine;
use super::plan::{Probe, ProbeConfig};
use super::report::ProbeReport;
use super::socket::SocketId;

/// Longest a probe may run, whatever its retry budget says.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The local IP the routing table picks towards `server` (no packet is sent).
pub fn route_source(server: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(server)?;
    Ok(s.local_addr()?.ip())
}

/// Runs the probe to completion. `progress` is called after every event with the probe's state.
pub async fn run(cfg: ProbeConfig, progress: impl FnMut(&Probe)) -> io::Result<ProbeReport> {
    let server = cfg.server;
    drive(server, DEADLINE, |start| Probe::new(start, cfg), progress)
        .await
        .map(|p| p.report())
}

/// [`drive`], with the gateway's port-mapping services asked at the same time (issue 12,
/// [`crate::portmap::probe`]); `--map`'s mapping is made and checked after both. The section is
/// `None` when `opts` does not enable it; the caller adds it with
/// [`ProbeReport::apply_port_mapping`].
pub async fn drive_with_port_mapping<M: ProbeMachine>(
    server: SocketAddr,
    deadline: Duration,
    opts: crate::portmap::Options,
    make: impl FnOnce(Instant) -> M,
    progress: impl FnMut(&M),
) -> io::Result<(M, Option<crate::portmap::PortMappingReport>)> {
    let discovery = crate::portmap::Options { map: false, ..opts };
    let pm = async {
        if opts.enabled {
            Some(crate::portmap::probe(discovery, server).await)
        } else {
            None
        }
    };
    let (probe, mut pm) = tokio::join!(drive(server, deadline, make, progress), pm);
    let probe = probe?;
    if let (Some(report), true) = (pm.as_mut(), opts.map) {
        crate::portmap::map_best(report, server).await;
    }
    Ok((probe, pm))
}

/// Drives the machine `make` builds until it is done; returns it for its report.
pub async fn drive<M: ProbeMachine>(
    server: SocketAddr,
    deadline: Duration,
    make: impl FnOnce(Instant) -> M,
    mut progress: impl FnMut(&M),
) -> io::Result<M> {
    let local_ip = route_source(server)?;
    let start = Instant::now();
    let mut probe = make(start);
    let mut sockets: HashMap<SocketId, Arc<UdpSocket>> = HashMap::new();
    let (tx, mut rx) = mpsc::channel::<(SocketId, SocketAddr, Vec<u8>)>(256);
    let mut readers = Vec::new();
    let result = async {
        loop {
            let now = Instant::now();
            while let Some(t) = probe.poll_transmit(now) {
                let sock = match sockets.get(&t.source) {
                    Some(s) => s.clone(),
                    None => {
                        let s = Arc::new(UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?);
                        probe.socket_bound(t.source, s.local_addr()?);
                        readers.push(tokio::spawn(read_loop(t.source, s.clone(), tx.clone())));
                        sockets.insert(t.source, s.clone());
                        s
                    }
                };
                if let Err(e) = sock.send_to(&t.payload, t.destination).await {
                    // An unreachable destination is an answer the retransmissions will confirm.
                    if e.kind() != io::ErrorKind::ConnectionRefused {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("cannot send to {}: {e}", t.destination),
                        ));
                    }
                }
            }
            progress(&probe);
            if probe.is_done() {
                return Ok(());
            }
            if now.duration_since(start) > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "probe exceeded its deadline",
                ));
            }
            let wake = probe
                .poll_timeout()
                .unwrap_or(now + Duration::from_millis(50));
            tokio::select! {
                msg = rx.recv() => {
                    if let Some((id, from, bytes)) = msg {
                        probe.handle_datagram(Instant::now(), id, from, &bytes);
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    probe.handle_timeout(Instant::now());
                }
            }
        }
    }
    .await;
    for r in readers {
        r.abort();
    }
    result.map(|()| probe)
}

async fn read_loop(
    id: SocketId,
    sock: Arc<UdpSocket>,
    tx: mpsc::Sender<(SocketId, SocketAddr, Vec<u8>)>,
) {
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                if tx.send((id, from, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            // ICMP errors from earlier sends (Linux reports them on the next recv): not fatal.
            Err(_) => continue,
        }
    }
}
