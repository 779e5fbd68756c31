//! The tokio drivers of `natscope punch`: the rendezvous + relay server ([`serve`]), the
//! listener ([`listen`]) and the connector ([`connect`]). They move bytes between sockets and
//! the sans-IO cores ([`super::server`], [`super::session`]) and hold no protocol logic of
//! their own beyond the order of the steps (register, connect, punch, send, report).
//!
//! UDP: one socket per peer for everything (server, probes, direct data), so the mapping the
//! server saw is the one the peer punches with. TCP: one connection to the server from a local
//! port bound with SO_REUSEADDR + SO_REUSEPORT, and the direct stream opened by simultaneous
//! open (RFC 5382) from that same port to the peer's server-reflexive address.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::codec::{code, method, PeerInfo, PunchMessage};
use super::server::{RendezvousServer, ServerConfig, Transmit};
use super::session::{Role, Route, Session, SessionConfig, SessionError, MAX_TARGETS};
use super::table::Endpoint;
use super::{SessionId, Transport};
use crate::client::{transact_udp, RequestOptions, Rto};
use crate::stun::framing::{frame, Frame, MAX_FRAME};
use crate::stun::TransactionId;

/// Errors of the punch drivers. `exit_code` maps them onto natscope's 1/2 convention.
#[derive(Debug, thiserror::Error)]
pub enum PunchError {
    #[error("rendezvous server {0} is unreachable over {1} (no answer within {2:?}); is `natscope punch serve` running there?")]
    Unreachable(SocketAddr, Transport, Duration),
    #[error("rendezvous server {0} is unreachable over tcp (connection refused); is `natscope punch serve` running there?")]
    ConnectionRefused(SocketAddr),
    #[error("rendezvous server {0} refused: {1}")]
    Refused(SocketAddr, String),
    #[error("no peer registered as `{0}` at {1} over {2}")]
    UnknownPeer(String, SocketAddr, Transport),
    #[error("rendezvous server {0} stopped answering (killed or unreachable) for {1:.1?}")]
    ServerGone(SocketAddr, Duration),
    #[error("rendezvous server {0} closed the connection")]
    ServerClosed(SocketAddr),
    #[error("gave up after {0:?} with {1} of {2} sessions served")]
    ListenTimeout(Duration, u64, u64),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl PunchError {
    /// 1: the check ran and the session failed; 2: could not run (server unreachable, I/O).
    pub fn exit_code(&self) -> u8 {
        match self {
            PunchError::Unreachable(..)
            | PunchError::ConnectionRefused(_)
            | PunchError::Refused(..)
            | PunchError::Io(_) => 2,
            _ => 1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// Runs the rendezvous + relay server on UDP and TCP at every address in `listen` until
/// `shutdown` resolves. Nothing is written to disk.
pub async fn serve(
    listen: &[SocketAddr],
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&[SocketAddr]),
) -> io::Result<()> {
    let core = Arc::new(Mutex::new(RendezvousServer::new(ServerConfig::default())));
    let tcp_writers: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>> = Arc::default();
    let mut udp = HashMap::new();
    let mut tcp = Vec::new();
    let mut bound = Vec::new();
    for addr in listen {
        let u = UdpSocket::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("udp bind {addr}: {e}")))?;
        let local = u.local_addr()?;
        let t = TcpListener::bind(local)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("tcp bind {local}: {e}")))?;
        bound.push(local);
        udp.insert(local, Arc::new(u));
        tcp.push(t);
    }
    let udp = Arc::new(udp);
    let ctx = ServerCtx {
        core,
        udp: udp.clone(),
        tcp: tcp_writers,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (local, sock) in udp.iter() {
        let (ctx, sock, local) = (ctx.clone(), sock.clone(), *local);
        tasks.spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let ep = Endpoint {
                    transport: Transport::Udp,
                    local,
                    remote: from,
                };
                ctx.handle(ep, &buf[..n]).await;
            }
        });
    }
    for listener in tcp {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            loop {
                let Ok((stream, from)) = listener.accept().await else {
                    continue;
                };
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                let ctx = ctx.clone();
                tokio::spawn(async move { ctx.serve_tcp(stream, local, from).await });
            }
        });
    }
    {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            loop {
                let next = ctx
                    .lock()
                    .poll_timeout()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                tokio::time::sleep_until(next.max(Instant::now()).into()).await;
                ctx.lock().handle_timeout(Instant::now());
                ctx.flush().await;
            }
        });
    }
    on_ready(&bound);
    shutdown.await;
    tasks.abort_all();
    Ok(())
}

#[derive(Clone)]
struct ServerCtx {
    core: Arc<Mutex<RendezvousServer>>,
    udp: Arc<HashMap<SocketAddr, Arc<UdpSocket>>>,
    tcp: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>,
}

impl ServerCtx {
    fn lock(&self) -> std::sync::MutexGuard<'_, RendezvousServer> {
        // A panic elsewhere cannot leave the table half-written in a way that matters here.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, ep: Endpoint, bytes: &[u8]) {
        self.lock()
            .handle(Instant::now(), ep, bytes, rand::random::<u64>());
        self.flush().await;
    }

    async fn flush(&self) {
        let out: Vec<Transmit> = {
            let mut core = self.lock();
            std::iter::from_fn(|| core.poll_transmit()).collect()
        };
        for t in out {
            match t.to.transport {
                Transport::Udp => {
                    if let Some(s) = self.udp.get(&t.to.local) {
                        let _ = s.send_to(&t.bytes, t.to.remote).await;
                    }
                }
                Transport::Tcp => {
                    let w = self
                        .tcp
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&t.to.remote)
                        .cloned();
                    if let Some(w) = w {
                        // A slow reader loses relayed messages rather than growing memory; the
                        // reliable layer above retransmits.
                        let _ = w.try_send(t.bytes);
                    }
                }
            }
        }
    }

    async fn serve_tcp(&self, stream: TcpStream, local: SocketAddr, remote: SocketAddr) {
        let ep = Endpoint {
            transport: Transport::Tcp,
            local,
            remote,
        };
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let (tx, writer) = spawn_writer(wr);
        self.tcp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(remote, tx);
        let mut buf = Vec::with_capacity(MAX_FRAME);
        while let Some(msg) = next_frame(&mut rd, &mut buf).await {
            self.handle(ep, &msg).await;
        }
        self.tcp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&remote);
        writer.abort();
        self.lock().connection_closed(ep);
    }
}

/// Spawns the task that writes every buffer sent on the returned channel to `wr`, in order,
/// until a write fails or the channel closes.
fn spawn_writer(mut wr: OwnedWriteHalf) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
    let task = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    (tx, task)
}

/// The next STUN message on a stream (RFC 8489 §6.2.2, [`frame`]), read through `buf`, which
/// keeps what follows it. `None` at the end of the stream, on a read error, or when the bytes
/// cannot be STUN (the connection is then closed: `buf` never grows past one frame and a read).
async fn next_frame(rd: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        match frame(buf) {
            Frame::Complete(len) => return Some(buf.drain(..len).collect()),
            Frame::Partial(_) => {}
            Frame::Invalid => return None,
        }
        let n = rd.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Peer transport: one UDP socket, or TCP streams (server + direct) behind the same interface.

#[derive(Debug)]
enum NetEvent {
    Message {
        from: SocketAddr,
        bytes: Vec<u8>,
    },
    StreamUp {
        session: SessionId,
        peer: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
        attempts: u32,
    },
    StreamFailed {
        attempts: u32,
    },
    StreamDown {
        addr: SocketAddr,
    },
    /// Our listening socket on the registered port accepted a connection (the peer's SYN
    /// arrived while we had no attempt of our own in flight).
    Accepted {
        peer: SocketAddr,
        stream: TcpStream,
    },
}

struct Net {
    transport: Transport,
    server: SocketAddr,
    local: SocketAddr,
    udp: Option<std::net::UdpSocket>,
    writers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    tx: mpsc::Sender<NetEvent>,
    rx: mpsc::Receiver<NetEvent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    direct_tasks: HashMap<SessionId, tokio::task::AbortHandle>,
    /// Each session's direct-open target and window end, to retry after an unconfirmed stream.
    direct_until: HashMap<SessionId, (SocketAddr, Instant)>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.direct_tasks.values() {
            t.abort();
        }
    }
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// The local address the kernel would use toward `server` (no packet is sent).
fn local_ip_toward(server: SocketAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind(unspecified(server)).ok()?;
    s.connect(server).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

fn reusable_tcp(local: SocketAddr) -> io::Result<TcpSocket> {
    let s = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // RFC 5382 hole punching: the direct connection must leave from the port the server saw.
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(local)?;
    Ok(s)
}

fn spawn_stream(
    stream: TcpStream,
    peer: SocketAddr,
    events: mpsc::Sender<NetEvent>,
) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<()>) {
    // Small messages, each one awaited by the peer: Nagle would hold them back.
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let (tx, writer) = spawn_writer(wr);
    let task = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(MAX_FRAME);
        while let Some(bytes) = next_frame(&mut rd, &mut buf).await {
            if events
                .send(NetEvent::Message { from: peer, bytes })
                .await
                .is_err()
            {
                break;
            }
        }
        writer.abort();
        let _ = events.send(NetEvent::StreamDown { addr: peer }).await;
    });
    (tx, task)
}

impl Net {
    async fn open(
        transport: Transport,
        server: SocketAddr,
        wait: Duration,
    ) -> Result<Self, PunchError> {
        let (tx, rx) = mpsc::channel(4096);
        match transport {
            Transport::Udp => {
                // Sends go through a plain non-blocking clone of the socket: tokio's try_send_to
                // reports WouldBlock until the reactor has seen the socket writable once, which
                // would silently drop the first request.
                let std_sock = std::net::UdpSocket::bind(unspecified(server))?;
                std_sock.set_nonblocking(true)?;
                let sender = std_sock.try_clone()?;
                let sock = Arc::new(UdpSocket::from_std(std_sock)?);
                let port = sock.local_addr()?.port();
                let ip = local_ip_toward(server).unwrap_or(unspecified(server).ip());
                let (s, events) = (sock.clone(), tx.clone());
                let task = tokio::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    loop {
                        match s.recv_from(&mut buf).await {
                            Ok((n, from)) => {
                                let bytes = buf[..n].to_vec();
                                if events
                                    .send(NetEvent::Message { from, bytes })
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            // ICMP errors surface here on some kernels; keep receiving.
                            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                });
                Ok(Self {
                    transport,
                    server,
                    local: SocketAddr::new(ip, port),
                    udp: Some(sender),
                    writers: HashMap::new(),
                    tx,
                    rx,
                    tasks: vec![task],
                    direct_tasks: HashMap::new(),
                    direct_until: HashMap::new(),
                })
            }
            Transport::Tcp => {
                let sock = reusable_tcp(unspecified(server))?;
                let stream = match tokio::time::timeout(wait, sock.connect(server)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Err(PunchError::ConnectionRefused(server))
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(PunchError::Unreachable(server, transport, wait)),
                };
                let local = stream.local_addr()?;
                let (w, task) = spawn_stream(stream, server, tx.clone());
                let mut writers = HashMap::new();
                writers.insert(server, w);
                let mut tasks = vec![task];
                // Also listen on the registered port: where nothing drops an early SYN silently
                // (no NAT, or a NAT that answers RST), the peer's SYN can arrive while no attempt
                // of ours is in flight, and is accepted instead of refused.
                let any = SocketAddr::new(unspecified(server).ip(), local.port());
                if let Ok(listener) = reusable_tcp(any).and_then(|s| s.listen(16)) {
                    let events = tx.clone();
                    tasks.push(tokio::spawn(async move {
                        while let Ok((stream, peer)) = listener.accept().await {
                            if events
                                .send(NetEvent::Accepted { peer, stream })
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }));
                }
                Ok(Self {
                    transport,
                    server,
                    local,
                    udp: None,
                    writers,
                    tx,
                    rx,
                    tasks,
                    direct_tasks: HashMap::new(),
                    direct_until: HashMap::new(),
                })
            }
        }
    }

    fn send(&self, to: SocketAddr, bytes: &[u8]) {
        if let Some(u) = &self.udp {
            let _ = u.send_to(bytes, to);
        } else if let Some(w) = self.writers.get(&to) {
            let _ = w.try_send(bytes.to_vec());
        }
    }

    fn send_msg(&self, to: SocketAddr, m: &PunchMessage) {
        if let Ok(b) = m.to_vec() {
            self.send(to, &b);
        }
    }

    /// TCP simultaneous open toward `peer` from our registered port, retried until `until`.
    fn open_direct(
        &mut self,
        session: SessionId,
        peer: SocketAddr,
        start: Instant,
        until: Instant,
    ) {
        self.direct_until.insert(session, (peer, until));
        let local = SocketAddr::new(unspecified(peer).ip(), self.local.port());
        let events = self.tx.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut attempts = 0u32;
            while Instant::now() < until {
                attempts += 1;
                let Ok(sock) = reusable_tcp(local) else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let left = until.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left.min(Duration::from_millis(700)), sock.connect(peer))
                    .await
                {
                    Ok(Ok(stream)) => {
                        let (writer, task) = spawn_stream(stream, peer, events.clone());
                        // The reader task lives on its own; dropping its handle detaches it.
                        drop(task);
                        let _ = events
                            .send(NetEvent::StreamUp {
                                session,
                                peer,
                                writer,
                                attempts,
                            })
                            .await;
                        return;
                    }
                    // RST (the peer's SYN not out yet, or its NAT refused): try again shortly.
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(40)).await,
                    Err(_) => {}
                }
            }
            let _ = events.send(NetEvent::StreamFailed { attempts }).await;
        });
        self.direct_tasks.insert(session, task.abort_handle());
    }

    /// Stops the simultaneous-open attempts of `session` (it has its direct stream).
    fn stop_direct(&mut self, session: SessionId) {
        if let Some(t) = self.direct_tasks.remove(&session) {
            t.abort();
        }
        self.direct_until.remove(&session);
    }

    /// A stream to `peer` closed before it carried anything of its session (the peer's kernel
    /// completed the handshake on its listening socket, then the peer refused the stream because
    /// it came from an unexpected address): try again while the window lasts.
    fn retry_direct(&mut self, peer: SocketAddr) {
        let found = self
            .direct_until
            .iter()
            .find(|(_, (p, _))| *p == peer)
            .map(|(id, (_, until))| (*id, *until));
        if let Some((session, until)) = found {
            let start = Instant::now() + Duration::from_millis(40);
            if start < until {
                self.open_direct(session, peer, start, until);
            }
        }
    }

    /// Takes an accepted stream from the expected peer into use; says hello on it with a PROBE
    /// so the other side, whose connect completed, knows the stream carries this session.
    fn adopt_stream(&mut self, session: SessionId, peer: SocketAddr, stream: TcpStream) {
        let (writer, task) = spawn_stream(stream, peer, self.tx.clone());
        drop(task);
        self.writers.insert(peer, writer);
        self.stop_direct(session);
    }

    /// A hello on a new direct stream: the peer's session takes the stream as its direct path.
    fn hello(&self, session: SessionId, peer: SocketAddr) {
        let m = PunchMessage::Probe {
            tid: TransactionId::random(),
            session,
        };
        self.send_msg(peer, &m);
    }

    /// One request to the server, retransmitted (UDP: 250 ms doubling) until an answer with the
    /// same transaction id arrives or `wait` passes. Other messages meanwhile are dropped.
    async fn transact(
        &mut self,
        req: &PunchMessage,
        wait: Duration,
    ) -> Result<PunchMessage, PunchError> {
        let bytes = req.to_vec().map_err(|e| io::Error::other(e.to_string()))?;
        let tid = req.tid();
        let deadline = Instant::now() + wait;
        let mut rto = Duration::from_millis(250);
        let mut next = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(PunchError::Unreachable(self.server, self.transport, wait));
            }
            if now >= next {
                self.send(self.server, &bytes);
                next = now + rto;
                rto = (rto * 2).min(Duration::from_secs(1));
                if self.transport == Transport::Tcp {
                    next = deadline;
                }
            }
            let until = next.min(deadline);
            match tokio::time::timeout_at(until.into(), self.rx.recv()).await {
                Ok(Some(NetEvent::Message { from, bytes })) if from == self.server => {
                    if let Ok(m) = PunchMessage::decode(&bytes) {
                        if m.tid() == tid {
                            return Ok(m);
                        }
                    }
                }
                Ok(Some(NetEvent::StreamDown { addr })) if addr == self.server => {
                    return Err(PunchError::ServerClosed(self.server));
                }
                Ok(None) => return Err(PunchError::ServerClosed(self.server)),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Port prediction

/// How many predicted ports (peer_port + k·delta, k = 1..=PREDICT_STEPS) a peer probes.
pub const PREDICT_STEPS: i32 = 16;

/// This socket's mapping as the server sees it: one Binding transaction, three tries 300 ms
/// apart ([`crate::client::transact_udp`]); only an answer from the server itself counts.
async fn mapped_from(sock: &UdpSocket, server: SocketAddr) -> Option<SocketAddr> {
    let wait = Duration::from_millis(300);
    let rto = Rto {
        initial: wait,
        max_transmits: 3,
        last_wait_multiplier: 1,
        max_rto: wait,
    };
    let r = transact_udp(
        sock,
        server,
        TransactionId::random(),
        &RequestOptions::default(),
        rto,
    )
    .await
    .ok()?;
    if r.source != Some(server) {
        return None;
    }
    r.xor_mapped
}

/// Measures this host's port allocation delta: three fresh sockets ask the server for their
/// mapping in a row; a constant, small difference is the delta of a sequential NAT.
async fn measure_delta(server: SocketAddr) -> (Option<i32>, Vec<u16>) {
    let mut ports = Vec::new();
    for _ in 0..3 {
        let Ok(s) = UdpSocket::bind(unspecified(server)).await else {
            return (None, ports);
        };
        match mapped_from(&s, server).await {
            Some(m) => ports.push(m.port()),
            None => return (None, ports),
        }
    }
    let d1 = i32::from(ports[1]) - i32::from(ports[0]);
    let d2 = i32::from(ports[2]) - i32::from(ports[1]);
    let delta = (d1 == d2 && d1 != 0 && d1.abs() <= 64).then_some(d1);
    (delta, ports)
}

fn predicted(peer: &PeerInfo) -> Vec<SocketAddr> {
    let Some(d) = peer.port_delta else {
        return Vec::new();
    };
    (1..=PREDICT_STEPS)
        .filter_map(|k| {
            let p = i32::from(peer.reflexive.port()) + k * d;
            u16::try_from(p)
                .ok()
                .filter(|p| *p >= 1024)
                .map(|p| SocketAddr::new(peer.reflexive.ip(), p))
        })
        .collect()
}

fn targets(peer: &PeerInfo) -> Vec<SocketAddr> {
    let mut t = vec![peer.reflexive];
    t.extend(peer.candidates.iter().copied());
    t.extend(predicted(peer));
    t
}

/// Birthday targets: `n` distinct random ports on the peer's IP (excluding what is already probed).
fn birthday_targets(peer: &PeerInfo, n: usize) -> Vec<SocketAddr> {
    if n == 0 {
        return Vec::new();
    }
    let span = usize::from(u16::MAX) - 1024 + 1;
    rand::seq::index::sample(&mut rand::thread_rng(), span, n.min(span))
        .into_iter()
        .filter_map(|i| u16::try_from(1024 + i).ok())
        .filter(|p| *p != peer.reflexive.port())
        .map(|p| SocketAddr::new(peer.reflexive.ip(), p))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Connector

#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub id: String,
    pub server: SocketAddr,
    pub transport: Transport,
    pub relay_first: bool,
    pub predict: bool,
    /// Birthday technique: probe up to this many random ports of the peer's IP (0: off).
    pub birthday: usize,
    pub messages: u64,
    /// Pause between application messages (0: send as fast as the window allows).
    pub interval: Duration,
    /// Bound on the whole connect.
    pub timeout: Duration,
    pub punch_window: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            id: String::new(),
            server: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), super::DEFAULT_PORT),
            transport: Transport::Udp,
            relay_first: false,
            predict: false,
            birthday: 0,
            messages: 20,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(5),
            punch_window: Duration::from_millis(1500),
        }
    }
}

/// Most random ports the birthday technique may add (and so, with the punch window, the bound
/// on packets it sends: `birthday × rounds`).
pub const MAX_BIRTHDAY: usize = 256;

/// Details of how the connection was made (`attempts` in the JSON).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Attempts {
    pub session: Option<String>,
    /// From the start to the server's answer to CONNECT.
    pub rendezvous_ms: Option<f64>,
    pub reflexive: Option<String>,
    pub peer_reflexive: Option<String>,
    pub peer_candidates: Vec<String>,
    pub punch_window_ms: f64,
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// Round trip of the probe that found the direct path.
    pub probe_rtt_ms: Option<f64>,
    /// Upper bound on probe packets this connect could send (targets × rounds).
    pub probe_packet_bound: u64,
    pub tcp_connect_attempts: u32,
    /// The direct TCP stream was the peer's connection, accepted on our registered port.
    pub tcp_accepted: bool,
    pub predict: Option<Prediction>,
    /// The allocation delta the listener registered (we probe ahead of its port).
    pub peer_port_delta: Option<i32>,
    pub birthday_ports: usize,
    pub data_sent_direct: u64,
    pub data_sent_relayed: u64,
    pub echoes_received_direct: u64,
    pub echoes_received_relayed: u64,
    pub retransmissions: u64,
    pub duplicates_dropped: u64,
    pub server_lost: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Prediction {
    pub measured_ports: Vec<u16>,
    pub delta: Option<i32>,
    pub predicted_ports: usize,
}

/// The connect report: the `natscope.punch/v1` document.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectReport {
    pub schema: &'static str,
    pub transport: Transport,
    /// What carried the data at the end: `direct`, `relayed`, or `failed` (no data flowed or
    /// the session broke).
    pub path: &'static str,
    pub local: String,
    pub peer: Option<String>,
    pub time_to_first_byte_ms: Option<f64>,
    pub time_to_direct_ms: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub messages_sent: u64,
    pub messages_echoed: u64,
    /// The echoes came back in exactly the order sent, each once (checked on the numbers the
    /// listener echoed, not on our own sequence numbers).
    pub in_order: bool,
    pub switched_to_direct: bool,
    pub attempts: Attempts,
}

impl ConnectReport {
    /// The session error, if the session failed after it started.
    pub fn failed(&self) -> bool {
        self.path == "failed" || self.messages_echoed < self.messages_sent
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Application message `i`: its number, big-endian, so the echo can be checked for order.
fn app_message(i: u64) -> Vec<u8> {
    let mut m = b"natscope-punch ".to_vec();
    m.extend_from_slice(&i.to_be_bytes());
    m
}

fn app_number(m: &[u8]) -> Option<u64> {
    let rest = m.strip_prefix(b"natscope-punch ")?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

fn session_config(transport: Transport, relay_first: bool, window: Duration) -> SessionConfig {
    SessionConfig {
        relay_first,
        probe: transport == Transport::Udp,
        punch_window: window,
        ..SessionConfig::default()
    }
}

/// Connects to the peer registered as `opts.id`, sends `opts.messages` numbered messages that
/// the listener echoes, and reports. `Err` only when the connect could not start (server
/// unreachable or refused, unknown peer); a session that broke is a report with `path: failed`
/// or fewer echoes, and [`ConnectReport::attempts`]`.error` says why.
pub async fn connect(opts: &ConnectOptions) -> Result<ConnectReport, PunchError> {
    let t0 = Instant::now();
    let deadline = t0 + opts.timeout;
    let mut net = Net::open(
        opts.transport,
        opts.server,
        opts.timeout.min(Duration::from_secs(2)),
    )
    .await?;
    let mut attempts = Attempts {
        punch_window_ms: ms(opts.punch_window),
        ..Attempts::default()
    };
    let mut port_delta = None;
    if opts.predict && opts.transport == Transport::Udp {
        let (delta, ports) = measure_delta(opts.server).await;
        port_delta = delta;
        attempts.predict = Some(Prediction {
            measured_ports: ports,
            delta,
            predicted_ports: 0,
        });
    }
    let req = PunchMessage::Connect {
        tid: TransactionId::random(),
        target: opts.id.clone(),
        candidates: vec![net.local],
        port_delta,
        punch_window_ms: Some(opts.punch_window.as_millis().min(60_000) as u32),
    };
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(2));
    let (session_id, mapped, peer, start_in) = match net.transact(&req, wait).await? {
        PunchMessage::ConnectOk {
            session,
            mapped,
            peer,
            start_in_ms,
            ..
        } => (
            session,
            mapped,
            peer,
            Duration::from_millis(u64::from(start_in_ms).min(2000)),
        ),
        PunchMessage::Error { code: c, .. } if c == code::UNKNOWN_PEER => {
            return Err(PunchError::UnknownPeer(
                opts.id.clone(),
                opts.server,
                opts.transport,
            ))
        }
        PunchMessage::Error {
            code: c, reason, ..
        } => return Err(PunchError::Refused(opts.server, format!("{c} {reason}"))),
        _ => return Err(PunchError::Refused(opts.server, "unexpected answer".into())),
    };
    attempts.session = Some(session_id.to_string());
    attempts.rendezvous_ms = Some(ms(t0.elapsed()));
    attempts.reflexive = Some(mapped.to_string());
    attempts.peer_reflexive = Some(peer.reflexive.to_string());
    attempts.peer_candidates = peer.candidates.iter().map(|c| c.to_string()).collect();
    let now = Instant::now();
    let mut s = Session::new(
        now,
        session_id,
        Role::Connector,
        session_config(opts.transport, opts.relay_first, opts.punch_window),
        opts.server,
        start_in,
        targets(&peer),
    );
    if opts.transport == Transport::Udp {
        let bday = birthday_targets(&peer, opts.birthday.min(MAX_BIRTHDAY));
        attempts.birthday_ports = bday.len();
        // Birthday ports go past MAX_TARGETS on purpose, but stay bounded by MAX_BIRTHDAY.
        s.add_targets_capped(bday, MAX_TARGETS + MAX_BIRTHDAY);
        // Rounds every 50 ms in the window; relay-first keeps probing every 250 ms after it.
        let mut rounds = (opts.punch_window.as_millis() / 50).max(1) as u64;
        if opts.relay_first {
            rounds += (opts.timeout.saturating_sub(opts.punch_window).as_millis() / 250) as u64;
        }
        attempts.probe_packet_bound =
            (MAX_TARGETS + opts.birthday.min(MAX_BIRTHDAY)) as u64 * rounds;
    } else {
        net.open_direct(
            session_id,
            peer.reflexive,
            now + start_in,
            now + start_in + opts.punch_window,
        );
    }
    if let Some(p) = attempts.predict.as_mut() {
        // The peer probes this many ports ahead of our server-reflexive port.
        p.predicted_ports = if p.delta.is_some() {
            PREDICT_STEPS as usize
        } else {
            0
        };
    }
    attempts.peer_port_delta = peer.port_delta;

    let n = opts.messages;
    let mut pushed = 0u64;
    let mut next_push = now;
    let mut echoed: HashSet<u64> = HashSet::new();
    let mut expect_next = 0u64;
    let mut in_order = true;
    let mut first_byte: Option<Instant> = None;
    let mut error: Option<String> = None;
    loop {
        let now = Instant::now();
        while pushed < n && now >= next_push {
            s.push(app_message(pushed));
            pushed += 1;
            next_push += opts.interval;
        }
        s.handle_timeout(now);
        while let Some((to, b)) = s.poll_transmit() {
            net.send(to, &b);
        }
        while let Some(m) = s.poll_deliver() {
            first_byte.get_or_insert(now);
            match app_number(&m) {
                Some(i) if i < pushed => {
                    if i != expect_next || !echoed.insert(i) {
                        in_order = false;
                    }
                    expect_next = i + 1;
                }
                _ => in_order = false,
            }
        }
        if echoed.len() as u64 == n {
            break;
        }
        if let Some(e) = s.error() {
            error = Some(e.to_string());
            break;
        }
        if now >= deadline {
            error = Some(format!(
                "timed out after {:?} with {} of {n} messages echoed",
                opts.timeout,
                echoed.len()
            ));
            break;
        }
        let mut wake = s.poll_timeout().min(deadline);
        if pushed < n {
            wake = wake.min(next_push);
        }
        let ev = tokio::time::timeout_at(wake.max(now).into(), net.rx.recv()).await;
        let now = Instant::now();
        match ev {
            Ok(Some(NetEvent::Message { from, bytes })) => {
                if let Ok(m) = PunchMessage::decode(&bytes) {
                    s.handle_message(now, from, m);
                }
            }
            Ok(Some(NetEvent::StreamUp {
                peer,
                writer,
                attempts: a,
                ..
            })) => {
                attempts.tcp_connect_attempts += a;
                net.writers.insert(peer, writer);
                // Direct once the peer answers on it (the session sees its first message).
                net.hello(session_id, peer);
            }
            Ok(Some(NetEvent::Accepted { peer: from, stream })) => {
                // Only from the address the server saw the peer at: the same rule as a
                // connected socket (see docs/punch.md), so outcomes do not depend on timing.
                if from == peer.reflexive && !s.route().is_some_and(Route::is_direct) {
                    attempts.tcp_accepted = true;
                    net.adopt_stream(session_id, from, stream);
                }
            }
            Ok(Some(NetEvent::StreamFailed { attempts: a })) => attempts.tcp_connect_attempts += a,
            Ok(Some(NetEvent::StreamDown { addr })) => {
                net.writers.remove(&addr);
                if addr == opts.server {
                    if !s.route().is_some_and(Route::is_direct) {
                        error = Some(PunchError::ServerClosed(opts.server).to_string());
                        break;
                    }
                } else if s.route() == Some(Route::Direct(addr)) && echoed.len() as u64 != n {
                    s.abort(SessionError::PeerConnectionClosed);
                    error = s.error().map(|e| e.to_string());
                    break;
                } else if s.direct_at().is_none() {
                    net.retry_direct(addr);
                }
            }
            Ok(None) | Err(_) => {}
        }
    }
    // Tell the peer (and the server) the session is over; best effort.
    s.close();
    while let Some((to, b)) = s.poll_transmit() {
        net.send(to, &b);
    }
    tokio::time::sleep(Duration::from_millis(5)).await;

    let st = s.stats();
    let route = s.route();
    let direct = route.is_some_and(Route::is_direct);
    attempts.probes_sent = st.probes_sent;
    attempts.probes_answered = st.probes_answered;
    attempts.probe_rtt_ms = st.probe_rtt.map(ms);
    attempts.data_sent_direct = st.data_sent_direct;
    attempts.data_sent_relayed = st.data_sent_relayed;
    attempts.echoes_received_direct = st.data_received_direct;
    attempts.echoes_received_relayed = st.data_received_relayed;
    attempts.retransmissions = st.retransmissions;
    attempts.duplicates_dropped = st.duplicates_dropped;
    attempts.server_lost = st.server_lost;
    attempts.error = error.clone();
    // The path's RTT: the smallest send-to-ack time of a message never retransmitted on the
    // final path (the smallest, because a burst of messages queues behind itself).
    let rtt = st
        .rtt_samples
        .iter()
        .filter(|(d, _)| *d == direct)
        .map(|(_, r)| *r)
        .min()
        .or(if direct { st.probe_rtt } else { None });
    let path = if error.is_some() || echoed.is_empty() {
        "failed"
    } else if direct {
        "direct"
    } else {
        "relayed"
    };
    let peer_addr = match route {
        Some(Route::Direct(a)) => Some(a.to_string()),
        _ if path != "failed" => Some(peer.reflexive.to_string()),
        _ => None,
    };
    Ok(ConnectReport {
        schema: "natscope.punch/v1",
        transport: opts.transport,
        path,
        local: net.local.to_string(),
        peer: peer_addr,
        time_to_first_byte_ms: first_byte.map(|t| ms(t - t0)),
        time_to_direct_ms: s.direct_at().map(|t| ms(t - t0)),
        rtt_ms: rtt.map(ms),
        messages_sent: pushed,
        messages_echoed: echoed.len() as u64,
        in_order: in_order && expect_next == echoed.len() as u64,
        switched_to_direct: s.switched_to_direct(),
        attempts,
    })
}

// ---------------------------------------------------------------------------------------------
// Listener

#[derive(Clone, Debug)]
pub struct ListenOptions {
    pub id: String,
    pub server: SocketAddr,
    pub transport: Transport,
    /// Exit after serving this many sessions (`None`: forever).
    pub count: Option<u64>,
    /// Give up after this long (`None`: no limit).
    pub timeout: Option<Duration>,
    pub punch_window: Duration,
    /// Port prediction: measure our allocation delta and register it, so connectors probe
    /// ahead of our server-reflexive port.
    pub predict: bool,
}

/// What the listener reports as it runs.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ListenEvent {
    Predicted {
        measured_ports: Vec<u16>,
        delta: Option<i32>,
    },
    Registered {
        id: String,
        transport: Transport,
        local: String,
        reflexive: String,
    },
    SessionStarted {
        session: String,
        peer: String,
    },
    SessionEnded {
        session: String,
        path: &'static str,
        peer: Option<String>,
        messages_echoed: u64,
        switched_to_direct: bool,
        error: Option<String>,
    },
}

/// Sessions a listener serves at once (bounded memory); introductions beyond it are ignored and
/// their connectors fail with "peer stopped answering".
pub const MAX_LISTEN_SESSIONS: usize = 64;
const RECENT_ENDED: usize = 1024;

/// Keepalive (re-REGISTER) period; the server forgets a peer after about three missed ones.
pub const KEEPALIVE: Duration = Duration::from_secs(2);

/// Registers `opts.id`, serves sessions (echoing every application message) until `count`
/// sessions ended or `shutdown` resolves (then unregisters). Returns how many were served.
pub async fn listen(
    opts: &ListenOptions,
    shutdown: impl Future<Output = ()>,
    mut on_event: impl FnMut(ListenEvent),
) -> Result<u64, PunchError> {
    let t0 = Instant::now();
    let mut net = Net::open(opts.transport, opts.server, Duration::from_secs(2)).await?;
    let mut port_delta = None;
    if opts.predict && opts.transport == Transport::Udp {
        let (delta, ports) = measure_delta(opts.server).await;
        port_delta = delta;
        on_event(ListenEvent::Predicted {
            measured_ports: ports,
            delta,
        });
    }
    let register = |net: &Net| PunchMessage::Register {
        tid: TransactionId::random(),
        id: opts.id.clone(),
        candidates: vec![net.local],
        port_delta,
    };
    let reg = register(&net);
    match net.transact(&reg, Duration::from_secs(2)).await? {
        PunchMessage::RegisterOk { mapped, .. } => on_event(ListenEvent::Registered {
            id: opts.id.clone(),
            transport: opts.transport,
            local: net.local.to_string(),
            reflexive: mapped.to_string(),
        }),
        PunchMessage::Error {
            code: c, reason, ..
        } => return Err(PunchError::Refused(opts.server, format!("{c} {reason}"))),
        _ => return Err(PunchError::Refused(opts.server, "unexpected answer".into())),
    }
    let mut sessions: HashMap<SessionId, (Session, u64)> = HashMap::new();
    // Recently ended sessions, so a late INTRODUCE retransmission does not restart one (bounded).
    let mut ended: std::collections::VecDeque<SessionId> = std::collections::VecDeque::new();
    let mut served = 0u64;
    let mut next_keepalive = Instant::now() + KEEPALIVE;
    let mut last_server = Instant::now();
    let server_idle = KEEPALIVE * 3 + Duration::from_millis(500);
    tokio::pin!(shutdown);
    let result = loop {
        let now = Instant::now();
        let mut done = Vec::new();
        for (id, (s, echoed)) in sessions.iter_mut() {
            s.handle_timeout(now);
            while let Some(m) = s.poll_deliver() {
                // Echo exactly what was delivered, in delivery order.
                s.push(m);
                *echoed += 1;
            }
            s.handle_timeout(now);
            while let Some((to, b)) = s.poll_transmit() {
                net.send(to, &b);
            }
            if s.is_closed() || s.error().is_some() {
                done.push(*id);
            }
        }
        for id in done {
            if let Some((s, echoed)) = sessions.remove(&id) {
                let path = match s.route() {
                    Some(Route::Direct(_)) => "direct",
                    Some(Route::Relay) => "relayed",
                    None => "failed",
                };
                on_event(ListenEvent::SessionEnded {
                    session: id.to_string(),
                    path,
                    peer: match s.route() {
                        Some(Route::Direct(a)) => Some(a.to_string()),
                        _ => None,
                    },
                    messages_echoed: echoed,
                    switched_to_direct: s.switched_to_direct(),
                    error: s.error().map(|e| e.to_string()),
                });
                if ended.len() == RECENT_ENDED {
                    ended.pop_front();
                }
                ended.push_back(id);
                served += 1;
            }
        }
        if opts.count.is_some_and(|c| served >= c) {
            break Ok(served);
        }
        if let Some(t) = opts.timeout {
            if now >= t0 + t {
                break Err(PunchError::ListenTimeout(
                    t,
                    served,
                    opts.count.unwrap_or(0),
                ));
            }
        }
        if now >= next_keepalive {
            // Re-registering is the keepalive; it also re-creates the entry after a server restart.
            let r = register(&net);
            net.send_msg(opts.server, &r);
            next_keepalive = now + KEEPALIVE;
        }
        if now.saturating_duration_since(last_server) > server_idle {
            break Err(PunchError::ServerGone(opts.server, now - last_server));
        }
        let mut wake = next_keepalive;
        for (s, _) in sessions.values() {
            wake = wake.min(s.poll_timeout());
        }
        if let Some(t) = opts.timeout {
            wake = wake.min(t0 + t);
        }
        let ev = tokio::select! {
            _ = &mut shutdown => break Ok(served),
            ev = tokio::time::timeout_at(wake.max(now).into(), net.rx.recv()) => ev,
        };
        let now = Instant::now();
        match ev {
            Ok(Some(NetEvent::Message { from, bytes })) => {
                let Ok(m) = PunchMessage::decode(&bytes) else {
                    continue;
                };
                if from == opts.server {
                    match &m {
                        PunchMessage::RegisterOk { .. }
                        | PunchMessage::Error {
                            method: method::REGISTER,
                            ..
                        } => {
                            last_server = now;
                            continue;
                        }
                        PunchMessage::Introduce {
                            tid,
                            session,
                            peer,
                            start_in_ms,
                        } => {
                            last_server = now;
                            net.send_msg(
                                from,
                                &PunchMessage::IntroduceOk {
                                    tid: *tid,
                                    session: *session,
                                },
                            );
                            if sessions.contains_key(session)
                                || ended.contains(session)
                                || sessions.len() >= MAX_LISTEN_SESSIONS
                            {
                                continue;
                            }
                            let start_in = Duration::from_millis(u64::from(*start_in_ms).min(2000));
                            // Punch as long as the connector does (bounded), else our default.
                            let window = peer.punch_window_ms.map_or(opts.punch_window, |w| {
                                Duration::from_millis(u64::from(w).clamp(50, 60_000))
                            });
                            let s = Session::new(
                                now,
                                *session,
                                Role::Listener,
                                session_config(opts.transport, false, window),
                                opts.server,
                                start_in,
                                targets(peer),
                            );
                            if opts.transport == Transport::Tcp {
                                net.open_direct(
                                    *session,
                                    peer.reflexive,
                                    now + start_in,
                                    now + start_in + window,
                                );
                            }
                            on_event(ListenEvent::SessionStarted {
                                session: session.to_string(),
                                peer: peer.reflexive.to_string(),
                            });
                            sessions.insert(*session, (s, 0));
                            continue;
                        }
                        _ => {}
                    }
                }
                if let Some(id) = m.session() {
                    if let Some((s, _)) = sessions.get_mut(&id) {
                        s.handle_message(now, from, m);
                    }
                }
            }
            Ok(Some(NetEvent::StreamUp {
                session,
                peer,
                writer,
                ..
            })) => {
                net.writers.insert(peer, writer);
                // Direct once the peer answers on it (the session sees its first message).
                net.hello(session, peer);
            }
            Ok(Some(NetEvent::Accepted { peer, stream })) => {
                let owner = sessions
                    .iter()
                    .find(|(_, (s, _))| {
                        s.targets().first() == Some(&peer)
                            && !s.route().is_some_and(Route::is_direct)
                    })
                    .map(|(id, _)| *id);
                if let Some(id) = owner {
                    net.adopt_stream(id, peer, stream);
                }
            }
            Ok(Some(NetEvent::StreamDown { addr })) => {
                net.writers.remove(&addr);
                if addr == opts.server {
                    break Err(PunchError::ServerClosed(opts.server));
                }
                let unconfirmed = sessions
                    .values()
                    .any(|(s, _)| s.targets().first() == Some(&addr) && s.direct_at().is_none());
                if unconfirmed {
                    net.retry_direct(addr);
                }
            }
            Ok(Some(NetEvent::StreamFailed { .. })) | Ok(None) | Err(_) => {}
        }
    };
    for id in sessions.keys().copied().collect::<Vec<_>>() {
        net.stop_direct(id);
    }
    let bye = PunchMessage::Unregister {
        tid: TransactionId::random(),
        id: opts.id.clone(),
    };
    net.send_msg(opts.server, &bye);
    tokio::time::sleep(Duration::from_millis(5)).await;
    result
}
