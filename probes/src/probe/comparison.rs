//! Drives the multi-server mapping comparison ([`natscope_core::probe::comparison`], re-exported):
//! one fresh UDP socket, one Binding transaction to each server in turn, each started when the
//! run's [`Pacer`] has a slot (RFC 5780 §5), each answer accepted only from the server asked.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::UdpSocket;

pub use natscope_core::probe::comparison::*;

use super::driver::route_source;
use super::{Pacer, Timing};
use crate::client::{run_udp, RequestOptions, TransactError};
use crate::stun::TransactionId;

/// Why the comparison could not run (a server that does not answer is a row, not an error).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("no server to compare")]
    NoServer,
    #[error("no route to {server}: {source}")]
    NoRoute {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind a udp socket on {ip}: {source}")]
    Bind {
        ip: std::net::IpAddr,
        source: std::io::Error,
    },
    #[error("cannot send to {server}: {source}")]
    Send {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Transaction(TransactError),
}

/// Compares the mapping one socket gets towards each of `servers` (in order, never two at once:
/// one socket keeps one mapping under test), with the probe's `timing`.
pub async fn compare_mappings(
    servers: &[SocketAddr],
    timing: Timing,
    pacer: &mut Pacer,
) -> Result<MappingComparison, CompareError> {
    let start = Instant::now();
    let Some(&first) = servers.first() else {
        return Err(CompareError::NoServer);
    };
    let ip = route_source(first).map_err(|source| CompareError::NoRoute {
        server: first,
        source,
    })?;
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(|source| CompareError::Bind { ip, source })?;
    let mut out = MappingComparison::plan(socket.local_addr().ok(), servers);
    let rto = MappingComparison::rto(&timing);
    let opts = RequestOptions {
        fingerprint: true,
        ..Default::default()
    };
    for (row, server) in out.to_ask() {
        if let Some(slot) = pacer.next_start() {
            tokio::time::sleep_until(slot.into()).await;
        }
        // `run_udp` transmits at once: its transaction starts now.
        pacer.started(Instant::now());
        let (end, transmits) = run_udp(&socket, server, TransactionId::random(), &opts, rto)
            .await
            .map_err(|e| match e {
                TransactError::Io { source, .. } => CompareError::Send { server, source },
                e => CompareError::Transaction(e),
            })?;
        out.record(row, end, transmits);
    }
    out.finish(start.elapsed());
    Ok(out)
}
