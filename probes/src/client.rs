//! Tokio drivers for one Binding transaction: [`transact_udp`] runs the sans-IO
//! [`Transaction`] (RFC 8489 §6.2.1 retransmissions, answers only from the expected source) over a
//! UDP socket, [`transact_tcp`] does one
//! exchange over an open stream (§6.2.2 framing). Everything else here — request building, the
//! typed response, the retransmission machine — is [`natscope_core::client`], re-exported.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub use natscope_core::client::*;

use crate::stun::framing::{self, Frame, MAX_FRAME};
use crate::stun::{EncodeError, TransactionId};

/// Why a driven transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum TransactError {
    #[error("no answer from {server} after {transmits} transmissions")]
    Timeout { server: SocketAddr, transmits: u32 },
    /// Only another address answered (see [`AnswerFrom`]): evidence, not an answer.
    #[error("the answer to {server} came from {from}, not from the server")]
    WrongSource {
        server: SocketAddr,
        from: SocketAddr,
        transmits: u32,
    },
    #[error("i/o with {server}: {source}")]
    Io {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot encode request: {0}")]
    Encode(#[from] EncodeError),
    #[error("bad answer from {server}: {source}")]
    Response {
        server: SocketAddr,
        source: ResponseError,
    },
}

/// Runs one Binding transaction over `socket` to `server` (RFC 8489 retransmissions). The answer
/// must come from `server` unless `opts` carries a CHANGE-REQUEST ([`AnswerFrom::for_request`]);
/// an answer from anywhere else does not end the wait.
pub async fn transact_udp(
    socket: &UdpSocket,
    server: SocketAddr,
    tid: TransactionId,
    opts: &RequestOptions,
    rto: Rto,
) -> Result<BindingResponse, TransactError> {
    match run_udp(socket, server, tid, opts, rto).await? {
        (TransactionEvent::Done(r), _) => Ok(*r),
        (
            TransactionEvent::TimedOut {
                wrong_source: Some(from),
                transmits,
            },
            _,
        ) => Err(TransactError::WrongSource {
            server,
            from,
            transmits,
        }),
        (_, transmits) => Err(TransactError::Timeout { server, transmits }),
    }
}

/// Runs one Binding transaction like [`transact_udp`] and returns how it ended (`Done` or
/// `TimedOut`, with any wrong-source evidence) and the transmissions it took. Errs only for I/O
/// and encoding.
pub async fn run_udp(
    socket: &UdpSocket,
    server: SocketAddr,
    tid: TransactionId,
    opts: &RequestOptions,
    rto: Rto,
) -> Result<(TransactionEvent, u32), TransactError> {
    let mut req = [0u8; 2048];
    let len = build_request(&mut req, &tid, opts)?;
    let from = AnswerFrom::for_request(server, opts);
    let mut tx = Transaction::new(Instant::now(), tid, from, rto);
    let mut inb = [0u8; 2048];
    let io = |source| TransactError::Io { server, source };
    loop {
        let now = Instant::now();
        if tx.poll_transmit(now) {
            match socket.send_to(&req[..len], server).await {
                // An earlier ICMP port unreachable can surface on the next send: the retransmission
                // schedule decides, as for the receive below.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                r => {
                    r.map_err(io)?;
                }
            }
        }
        tx.handle_timeout(now);
        match tx.event() {
            TransactionEvent::Pending => {}
            end => return Ok((end, tx.transmits())),
        }
        let Some(deadline) = tx.poll_timeout() else {
            continue;
        };
        match tokio::time::timeout_at(deadline.into(), socket.recv_from(&mut inb)).await {
            Ok(Ok((n, from))) => {
                tx.handle_datagram(from, &inb[..n]);
            }
            // ICMP port unreachable surfaces as ECONNREFUSED on Linux: keep waiting, it is evidence
            // of nothing the retransmissions cannot also show.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Ok(Err(e)) => return Err(io(e)),
            Err(_) => {}
        }
    }
}

/// Runs one Binding transaction over an open TCP stream (no retransmission: TCP is reliable).
pub async fn transact_tcp(
    stream: &mut TcpStream,
    tid: TransactionId,
    opts: &RequestOptions,
    timeout: Duration,
) -> Result<BindingResponse, TransactError> {
    let server = stream.peer_addr().map_err(|source| TransactError::Io {
        server: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let io = |source| TransactError::Io { server, source };
    let mut req = [0u8; 2048];
    let len = build_request(&mut req, &tid, opts)?;
    let work = async {
        stream.write_all(&req[..len]).await.map_err(io)?;
        let mut buf = [0u8; 2 * MAX_FRAME];
        let mut filled = 0;
        loop {
            match framing::frame(&buf[..filled]) {
                Frame::Complete(n) => {
                    return BindingResponse::parse(&buf[..n], &tid, Some(server))
                        .map_err(|source| TransactError::Response { server, source });
                }
                Frame::Invalid => {
                    return Err(TransactError::Response {
                        server,
                        source: ResponseError::NotBindingResponse,
                    })
                }
                Frame::Partial(_) => {}
            }
            let n = stream.read(&mut buf[filled..]).await.map_err(io)?;
            if n == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            filled += n;
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(TransactError::Timeout {
            server,
            transmits: 1,
        }))
}

/// Public STUN servers that answered with RFC 5780's OTHER-ADDRESS, from the always-online-stun
/// project's hourly check (`valid_nat_testing_hosts.txt`, read 2026-12-04). Third parties run
/// them and their availability varies: `natscope probe --public-rfc5780` asks them all at once and
/// classifies against the first in this order that answers with a usable OTHER-ADDRESS.
pub const PUBLIC_RFC5780_SERVERS: [&str; 6] = [
    "stun.hot-chilli.net:3478",
    "stun.nextcloud.com:3478",
    "stun.sip.us:3478",
    "stun.voipgate.com:3478",
    "stun.freeswitch.org:3478",
    "stun.m-online.net:3478",
];

/// Of `servers`, the first (in their order) whose answer to one Binding request carries an
/// OTHER-ADDRESS with another IP and another port, which RFC 5780's mapping and filtering tests
/// need. All are asked at once, each with `rto`'s retransmissions; `None` when none qualifies.
pub async fn first_rfc5780(servers: &[SocketAddr], rto: Rto) -> Option<SocketAddr> {
    let asks = servers.iter().map(|&server| async move {
        let any = match server {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let socket = UdpSocket::bind(any).await.ok()?;
        let tid = TransactionId::random();
        let r = transact_udp(&socket, server, tid, &RequestOptions::default(), rto)
            .await
            .ok()?;
        let other = r.other_address?;
        (other.ip() != server.ip() && other.port() != server.port()).then_some(server)
    });
    let answers = futures::future::join_all(asks).await;
    answers.into_iter().flatten().next()
}

/// For `natscope probe --public-rfc5780`: the first of [`PUBLIC_RFC5780_SERVERS`] that resolves
/// and answers with a usable OTHER-ADDRESS, or one line saying none did.
pub fn pick_public_rfc5780() -> Result<SocketAddr, String> {
    let list = PUBLIC_RFC5780_SERVERS;
    let resolved: Vec<SocketAddr> = list
        .iter()
        .filter_map(|n| crate::resolve::server_address(n, crate::resolve::Service::STUN).ok())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(first_rfc5780(&resolved, Rto::default()))
        .ok_or_else(|| {
            format!(
                "none of the public RFC 5780 servers ({}) answered with OTHER-ADDRESS; run your own pair (docs/deploy.md)",
                list.join(", ")
            )
        })
}
