//! The tokio driver of the TCP mapping test (RFC 5382 §4.1 over STUN-over-TCP): binds the shared
//! local port X, opens the three connections and does one Binding on each; the test's result,
//! its classification and its checks of each answer are the sans-IO part in
//! [`natscope_core::probe::tcp`], re-exported here.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

pub use natscope_core::probe::tcp::*;

use crate::client::{transact_tcp, BindingResponse, RequestOptions};
use crate::probe::pacing::Pacer;
use crate::stun::TransactionId;

/// A TCP socket bound to `local` with SO_REUSEADDR and SO_REUSEPORT set before the bind, so the
/// next connection can leave from the same ip:port.
fn bind_shared(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let s = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    Ok(TcpSocket::from_std_stream(s.into()))
}

/// One step: connect from `local` to `to` and do one Binding. Returns the connection (to keep the
/// mapping alive) with the answer's mapped address, or why the step failed. `sent` counts the
/// request when one was written.
async fn step(
    local: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
    sent: &mut u32,
    pacer: &mut Pacer,
) -> (
    Option<TcpStream>,
    Result<(SocketAddr, BindingResponse), String>,
) {
    if let Some(slot) = pacer.next_start() {
        tokio::time::sleep_until(slot.into()).await;
    }
    let sock = match bind_shared(local) {
        Ok(s) => s,
        Err(e) => return (None, Err(format!("cannot bind tcp {local}: {e}"))),
    };
    let mut stream = match tokio::time::timeout(timeout, sock.connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (None, Err(format!("cannot connect to {to}: {e}"))),
        Err(_) => {
            return (
                None,
                Err(format!(
                    "connect to {to} timed out after {} ms",
                    timeout.as_millis()
                )),
            )
        }
    };
    let _ = stream.set_nodelay(true);
    let from = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => return (Some(stream), Err(format!("no local address: {e}"))),
    };
    let opts = RequestOptions {
        fingerprint: true,
        ..Default::default()
    };
    *sent += 1;
    // Recorded when the request leaves, not when the slot was granted: never earlier than allowed.
    pacer.started(Instant::now());
    let answer = transact_tcp(&mut stream, TransactionId::random(), &opts, timeout).await;
    let outcome = match answer {
        Err(e) => Err(format!("{to}: {e}")),
        Ok(r) => check_answer(to, r).map(|r| (from, r)),
    };
    (Some(stream), outcome)
}

/// Runs the TCP mapping test against `server` (A1:P1) from `local_ip`, not paced. At most three
/// connections, each step (connect, then the Binding) bounded by `timeout`; every connection is
/// closed before this returns. Never fails: problems end up in `reason` with `unknown`.
pub async fn tcp_mapping(
    server: SocketAddr,
    local_ip: IpAddr,
    timeout: Duration,
) -> TcpMappingResult {
    tcp_mapping_paced(server, local_ip, timeout, &mut Pacer::unpaced()).await
}

/// [`tcp_mapping`] with each Binding started only when `pacer` has a slot (the wait is not part
/// of any step's `timeout`); the starts are recorded in `pacer` for the run's next test.
pub async fn tcp_mapping_paced(
    server: SocketAddr,
    local_ip: IpAddr,
    timeout: Duration,
    pacer: &mut Pacer,
) -> TcpMappingResult {
    let start = Instant::now();
    let mut out = TcpMappingResult::new(server);
    let mut streams: Vec<TcpStream> = Vec::with_capacity(3);
    let mut sent = 0u32;
    let failure = run_steps(&mut out, &mut streams, local_ip, timeout, &mut sent, pacer).await;
    for s in &mut streams {
        // A FIN each; a peer that does not take it within the bound is cut off by the drop.
        let _ = tokio::time::timeout(timeout, s.shutdown()).await;
    }
    drop(streams);
    out.requests_sent = sent;
    out.conclude(failure);
    out.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    out
}

/// Tests I, II, III in order; returns the first failure's reason. Test II failing stops the run
/// (without M2 nothing can be concluded); test III runs whatever M2 was, for the evidence.
async fn run_steps(
    out: &mut TcpMappingResult,
    streams: &mut Vec<TcpStream>,
    local_ip: IpAddr,
    timeout: Duration,
    sent: &mut u32,
    pacer: &mut Pacer,
) -> Option<String> {
    let server = out.server;
    // Test I from an ephemeral port: that port becomes X for the other two.
    let (s, r) = step(SocketAddr::new(local_ip, 0), server, timeout, sent, pacer).await;
    streams.extend(s);
    let (local, first) = match r {
        Ok(v) => v,
        Err(why) => return Some(why),
    };
    out.local_address = Some(local);
    out.m1 = first.reflexive();
    out.other_address = first.other_address;
    let other = match usable_other(server, first.other_address) {
        Ok(o) => o,
        Err(why) => return Some(why),
    };
    let a2p1 = SocketAddr::new(other.ip(), server.port());
    let (s, r) = step(local, a2p1, timeout, sent, pacer).await;
    streams.extend(s);
    match r {
        Ok((_, a)) => out.m2 = a.reflexive(),
        Err(why) => return Some(why),
    }
    let (s, r) = step(local, other, timeout, sent, pacer).await;
    streams.extend(s);
    match r {
        Ok((_, a)) => {
            out.m3 = a.reflexive();
            None
        }
        Err(why) => Some(why),
    }
}
