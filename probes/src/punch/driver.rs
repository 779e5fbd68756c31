//! The tokio drivers of `natscope punch`: the rendezvous + relay server ([`serve`]), the
//! listener ([`listen`]) and the connector ([`connect`]). Sockets and timers only: they feed the
//! sans-IO machines ([`RendezvousServer`], [`Listener`], [`Connector`]) bytes and
//! `Instant::now()`, send what they poll out, open the direct TCP streams they ask for, and sleep
//! until their `poll_timeout`. Every protocol decision — retransmission, the session table,
//! de-duplication, keepalive, prediction targets, the pacing of simultaneous-open attempts
//! (`peer::OpenAttempts`), which stream to keep, the report — is in the core, where the
//! virtual-clock tests of `natscope_core::punch` reach it.
//!
//! UDP: one socket per peer for everything (server, probes, direct data), so the mapping the
//! server saw is the one the peer punches with. TCP: one connection to the server from a local
//! port bound with SO_REUSEADDR + SO_REUSEPORT, and the direct stream opened by simultaneous
//! open (RFC 5382) from that same port to the peer's server-reflexive address.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::connector::Connector;
use super::family::FamilyOptions;
use super::limits::ServeLimits;
use super::listener::{self, Listener};
use super::mapping;
use super::peer::{
    AttemptEnd, DualStack, OpenAttempts, PeerMachine, PortMeasurement, StreamCommand,
    MEASURE_SOCKETS,
};
use super::server::{RendezvousServer, ServerSocket};
use super::table::Endpoint;
use super::{SessionId, Transport};
use crate::stun::framing::{frame, Frame, MAX_FRAME};
use natscope_core::net::Transmit;
use natscope_core::reflector::tcp::ConnectionSlots;

pub use super::connector::{Attempts, ConnectOptions, ConnectReport, MAX_BIRTHDAY};
pub use super::identity::{decode_hex32, Identity, PeerKey};
pub use super::listener::{
    ListenEvent, ListenLine, ListenOptions, KEEPALIVE, LISTEN_SCHEMA, MAX_LISTEN_SESSIONS,
};
pub use super::mapping::PortMapFlag;
pub use super::peer::{Prediction, PunchError, PREDICT_STEPS};
pub use super::session::{BirthdayOpen, ProbeBudget, DEFAULT_PROBE_BUDGET};

// ---------------------------------------------------------------------------------------------
// Server

/// Runs the rendezvous + relay server on UDP and TCP at every address in `listen` until
/// `shutdown` resolves, with the default limits. Nothing is written to disk.
pub async fn serve(
    listen: &[SocketAddr],
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&[SocketAddr]),
) -> io::Result<()> {
    serve_with(listen, &ServeLimits::default(), shutdown, on_ready).await
}

/// [`serve`] within `limits`: the core's quotas and circuits, and over TCP a connection cap (in
/// total and per source), an idle and an absolute timeout, and a back-off when accept fails
/// (EMFILE/ENFILE: out of descriptors) instead of a spinning loop. The counters are logged
/// through `tracing` every `limits.stats_interval` seconds and at the end.
pub async fn serve_with(
    listen: &[SocketAddr],
    limits: &ServeLimits,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&[SocketAddr]),
) -> io::Result<()> {
    let core = Arc::new(Mutex::new(RendezvousServer::new(
        limits.server_config(),
        StdRng::from_entropy(),
    )));
    let tcp_limits = limits.tcp();
    let slots = Arc::new(Mutex::new(ConnectionSlots::new(&tcp_limits)));
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
        tcp_counters: SharedTcpCounters::default(),
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
        let (ctx, slots) = (ctx.clone(), slots.clone());
        tasks.spawn(async move {
            let mut backoff = ACCEPT_BACKOFF;
            loop {
                let (stream, from) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors (EMFILE/ENFILE) or the like: wait, longer each time
                        // in a row, rather than spin on an accept that keeps failing.
                        tracing::warn!(error = %e, wait = ?backoff, "punch server: accept failed");
                        ctx.tcp_counters.bump(|c| c.accept_errors += 1);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                };
                backoff = ACCEPT_BACKOFF;
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                if lock(&slots).admit(from.ip()).is_err() {
                    ctx.tcp_counters.bump(|c| c.refused += 1);
                    continue;
                }
                ctx.tcp_counters.bump(|c| c.accepted += 1);
                let (ctx, slots) = (ctx.clone(), slots.clone());
                tokio::spawn(async move {
                    let lifetime = tcp_limits.lifetime;
                    let served = ctx.serve_tcp(stream, local, from, tcp_limits.idle);
                    if tokio::time::timeout(lifetime, served).await.is_err() {
                        ctx.tcp_counters.bump(|c| c.timed_out += 1);
                        ctx.lock().connection_closed(Endpoint {
                            transport: Transport::Tcp,
                            local,
                            remote: from,
                        });
                        lock(&ctx.tcp).remove(&from);
                    }
                    lock(&slots).release(from.ip());
                });
            }
        });
    }
    if limits.stats_interval > 0 {
        let ctx = ctx.clone();
        let every = Duration::from_secs(limits.stats_interval);
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                ctx.log_counters();
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
    ctx.log_counters();
    Ok(())
}

/// First and longest wait after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the TCP side of the server did (the core counts the rest).
#[derive(Clone, Copy, Debug, Default)]
struct TcpCounters {
    accepted: u64,
    refused: u64,
    timed_out: u64,
    accept_errors: u64,
}

#[derive(Clone, Default)]
struct SharedTcpCounters(Arc<Mutex<TcpCounters>>);

impl SharedTcpCounters {
    fn bump(&self, f: impl FnOnce(&mut TcpCounters)) {
        f(&mut lock(&self.0));
    }
}

#[derive(Clone)]
struct ServerCtx {
    core: Arc<Mutex<RendezvousServer>>,
    udp: Arc<HashMap<SocketAddr, Arc<UdpSocket>>>,
    tcp: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>,
    tcp_counters: SharedTcpCounters,
}

impl ServerCtx {
    /// One log line with every counter (structured fields, so `--log-format json` keeps them).
    fn log_counters(&self) {
        let c = self.lock().counters().clone();
        let t = *lock(&self.tcp_counters.0);
        let r = &c.refused;
        tracing::info!(
            registrations = c.registrations,
            connects = c.connects,
            bindings = c.bindings,
            challenges = c.challenges,
            relayed_packets = c.relayed_packets,
            relayed_bytes = c.relayed_bytes,
            refused_malformed = r.malformed,
            refused_forbidden = r.forbidden,
            refused_unverified = r.unverified,
            refused_rate = r.rate,
            refused_quota = r.quota,
            refused_unknown_peer = r.unknown_peer,
            refused_unknown_session = r.unknown_session,
            refused_circuit = r.circuit,
            tcp_accepted = t.accepted,
            tcp_refused = t.refused,
            tcp_timed_out = t.timed_out,
            tcp_accept_errors = t.accept_errors,
            "punch server counters"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RendezvousServer> {
        // A panic elsewhere cannot leave the table half-written in a way that matters here.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, ep: Endpoint, bytes: &[u8]) {
        self.lock().handle(Instant::now(), ep, bytes);
        self.flush().await;
    }

    async fn flush(&self) {
        let out: Vec<Transmit<ServerSocket>> = {
            let mut core = self.lock();
            std::iter::from_fn(|| core.poll_transmit()).collect()
        };
        for t in out {
            match t.source.transport {
                Transport::Udp => {
                    if let Some(s) = self.udp.get(&t.source.local) {
                        let _ = s.send_to(&t.payload, t.destination).await;
                    }
                }
                Transport::Tcp => {
                    let w = self
                        .tcp
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&t.destination)
                        .cloned();
                    if let Some(w) = w {
                        // A slow reader loses relayed messages rather than growing memory; the
                        // reliable layer above retransmits.
                        let _ = w.try_send(t.payload);
                    }
                }
            }
        }
    }

    async fn serve_tcp(
        &self,
        stream: TcpStream,
        local: SocketAddr,
        remote: SocketAddr,
        idle: Duration,
    ) {
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
        // A connection silent for `idle` is closed (its registrations and sessions go with it).
        while let Ok(Some(msg)) = tokio::time::timeout(idle, next_frame(&mut rd, &mut buf)).await {
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
        /// Arrived on the `k`-th of the birthday technique's sockets ([`Net::open_birthday`]).
        birthday: Option<usize>,
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

/// A peer's sockets: the UDP socket, or the TCP streams (to the server, to the peer) and the
/// listening socket on the registered port; every event arrives on `rx`.
struct Net {
    local: SocketAddr,
    udp: Option<std::net::UdpSocket>,
    /// The IPv6 socket beside an IPv4 server's (issue 13, [`super::family`]).
    udp6: Option<std::net::UdpSocket>,
    writers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    tx: mpsc::Sender<NetEvent>,
    rx: mpsc::Receiver<NetEvent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    direct_tasks: HashMap<SessionId, tokio::task::AbortHandle>,
    /// [`RELAY_ONLY_ENV`]: the only addresses this socket talks with (the servers).
    only: Option<Vec<SocketAddr>>,
    /// The hard side's birthday sockets ([`BirthdayOpen`]), at most one opening at a time.
    birthday: Vec<std::net::UdpSocket>,
    /// Remotes heard on a birthday socket: what we send them leaves from that socket, so it goes
    /// through the NAT mapping their datagram came in by.
    affinity: HashMap<SocketAddr, usize>,
}

/// A test hook: with this variable set, a connector's UDP socket sends to and accepts from its
/// rendezvous servers only, as if two NATs no punch gets through stood between the peers (on
/// loopback, where a direct path always exists, it is how a test keeps a session relayed).
pub const RELAY_ONLY_ENV: &str = "NATSCOPE_PUNCH_RELAY_ONLY";

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
    // (Windows has no SO_REUSEPORT; its SO_REUSEADDR already allows the second bind.)
    s.set_reuseaddr(true)?;
    #[cfg(unix)]
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
                .send(NetEvent::Message {
                    from: peer,
                    bytes,
                    birthday: None,
                })
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

/// A UDP socket bound to `addr`, as a plain non-blocking socket to send with and the same socket
/// registered with tokio to receive with. Sends go through the plain one: tokio's try_send_to
/// reports WouldBlock until the reactor has seen the socket writable once, which would silently
/// drop the first datagram.
pub(super) fn udp_socket(addr: SocketAddr) -> io::Result<(std::net::UdpSocket, Arc<UdpSocket>)> {
    let std_sock = std::net::UdpSocket::bind(addr)?;
    std_sock.set_nonblocking(true)?;
    let sender = std_sock.try_clone()?;
    Ok((sender, Arc::new(UdpSocket::from_std(std_sock)?)))
}

/// Feeds every datagram `sock` receives to `events` until the channel closes; `birthday`: the
/// socket is the `k`-th of the birthday technique's.
async fn receive_udp(
    sock: Arc<UdpSocket>,
    events: mpsc::Sender<NetEvent>,
    birthday: Option<usize>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let bytes = buf[..n].to_vec();
                let ev = NetEvent::Message {
                    from,
                    bytes,
                    birthday,
                };
                if events.send(ev).await.is_err() {
                    return;
                }
            }
            // ICMP errors surface here on some kernels; keep receiving.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

impl Net {
    /// Opens the second family's socket over UDP (issue 13) and says what the machine punches
    /// over and announces; over TCP only the server's family.
    async fn second_family(&mut self, server: SocketAddr, fam: &FamilyOptions) -> DualStack {
        if self.udp.is_none() {
            return super::family::single(server, fam);
        }
        match super::family::open_second(server, fam).await {
            Some(second) => {
                let task = tokio::spawn(receive_udp(second.receiver, self.tx.clone(), None));
                self.tasks.push(task);
                self.udp6 = Some(second.socket);
                second.dual
            }
            None => super::family::single(server, fam),
        }
    }

    async fn open(
        transport: Transport,
        server: SocketAddr,
        wait: Duration,
    ) -> Result<Self, PunchError> {
        let (tx, rx) = mpsc::channel(4096);
        match transport {
            Transport::Udp => {
                let (sender, sock) = udp_socket(unspecified(server))?;
                let port = sock.local_addr()?.port();
                let ip = local_ip_toward(server).unwrap_or(unspecified(server).ip());
                let task = tokio::spawn(receive_udp(sock, tx.clone(), None));
                Ok(Self {
                    local: SocketAddr::new(ip, port),
                    udp: Some(sender),
                    udp6: None,
                    writers: HashMap::new(),
                    tx,
                    rx,
                    tasks: vec![task],
                    direct_tasks: HashMap::new(),
                    only: None,
                    birthday: Vec::new(),
                    affinity: HashMap::new(),
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
                    local,
                    udp: None,
                    udp6: None,
                    writers,
                    tx,
                    rx,
                    tasks,
                    direct_tasks: HashMap::new(),
                    only: None,
                    birthday: Vec::new(),
                    affinity: HashMap::new(),
                })
            }
        }
    }

    fn send(&self, to: SocketAddr, bytes: &[u8]) {
        if self.only.as_ref().is_some_and(|only| !only.contains(&to)) {
            return;
        }
        if let Some(b) = self.affinity.get(&to).and_then(|i| self.birthday.get(*i)) {
            let _ = b.send_to(bytes, to);
        } else if let Some(u) = &self.udp {
            let u = super::family::pick(u, self.udp6.as_ref(), self.local, to);
            let _ = u.send_to(bytes, to);
        } else if let Some(w) = self.writers.get(&to) {
            let _ = w.try_send(bytes.to_vec());
        }
    }

    /// TCP simultaneous open toward `peer` from our registered port, the attempts paced by
    /// [`OpenAttempts`] until `until`.
    fn open_direct(
        &mut self,
        session: SessionId,
        peer: SocketAddr,
        start: Instant,
        until: Instant,
    ) {
        let local = SocketAddr::new(unspecified(peer).ip(), self.local.port());
        let events = self.tx.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut pacing = OpenAttempts::new(until);
            while let Some(limit) = pacing.next(Instant::now()) {
                let Ok(sock) = reusable_tcp(local) else {
                    tokio::time::sleep(pacing.pause(AttemptEnd::BindFailed)).await;
                    continue;
                };
                let end = match tokio::time::timeout(limit, sock.connect(peer)).await {
                    Ok(Ok(stream)) => {
                        let (writer, task) = spawn_stream(stream, peer, events.clone());
                        // The reader task lives on its own; dropping its handle detaches it.
                        drop(task);
                        let _ = events
                            .send(NetEvent::StreamUp {
                                session,
                                peer,
                                writer,
                                attempts: pacing.attempts(),
                            })
                            .await;
                        return;
                    }
                    Ok(Err(_)) => AttemptEnd::Refused,
                    Err(_) => AttemptEnd::TimedOut,
                };
                let pause = pacing.pause(end);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            let attempts = pacing.attempts();
            let _ = events.send(NetEvent::StreamFailed { attempts }).await;
        });
        self.direct_tasks.insert(session, task.abort_handle());
    }

    /// Sends what the machine queued and carries out its stream commands.
    fn flush(&mut self, m: &mut impl PeerMachine) {
        while let Some(b) = m.poll_birthday() {
            self.open_birthday(b);
        }
        while let Some(t) = m.poll_transmit() {
            self.send(t.destination, &t.payload);
        }
        while let Some(c) = m.poll_stream() {
            match c {
                StreamCommand::Open {
                    session,
                    peer,
                    start,
                    until,
                } => self.open_direct(session, peer, start, until),
                StreamCommand::Stop { session } => {
                    if let Some(t) = self.direct_tasks.remove(&session) {
                        t.abort();
                    }
                }
            }
        }
    }

    /// The hard side of the birthday technique: one fresh UDP socket per payload, bound to the
    /// main socket's address, each sending its payload once to `b.to` and feeding what it
    /// receives to the machine. One opening per peer process at a time (a second is ignored while
    /// the first's sockets live; they close with the peer).
    fn open_birthday(&mut self, b: BirthdayOpen) {
        if !self.birthday.is_empty() || self.udp.is_none() {
            return;
        }
        let bind = SocketAddr::new(self.local.ip(), 0);
        for payload in &b.payloads {
            let Ok((sender, sock)) = udp_socket(bind) else {
                break;
            };
            let _ = sender.send_to(payload, b.to);
            let k = Some(self.birthday.len());
            self.tasks
                .push(tokio::spawn(receive_udp(sock, self.tx.clone(), k)));
            self.birthday.push(sender);
        }
    }

    /// The next socket event, or `None` when `wake` (the machine's timeout) comes first.
    async fn next_event(&mut self, wake: Option<Instant>) -> Option<NetEvent> {
        match wake {
            Some(w) => tokio::time::timeout_at(w.max(Instant::now()).into(), self.rx.recv())
                .await
                .ok()
                .flatten(),
            None => self.rx.recv().await,
        }
    }

    /// Hands one socket event (or the timeout, `None`) to the machine.
    fn feed(&mut self, m: &mut impl PeerMachine, ev: Option<NetEvent>) {
        let now = Instant::now();
        match ev {
            None => m.handle_timeout(now),
            Some(NetEvent::Message { from, .. })
                if self.only.as_ref().is_some_and(|only| !only.contains(&from)) => {}
            Some(NetEvent::Message {
                from,
                bytes,
                birthday,
            }) => {
                if let Some(k) = birthday {
                    self.affinity.insert(from, k);
                }
                m.handle_datagram(now, from, &bytes);
            }
            Some(NetEvent::StreamUp {
                session,
                peer,
                writer,
                attempts,
            }) => {
                self.writers.insert(peer, writer);
                m.handle_stream_up(now, session, peer, attempts);
            }
            Some(NetEvent::StreamFailed { attempts }) => m.handle_stream_failed(now, attempts),
            Some(NetEvent::Accepted { peer, stream }) => {
                if m.handle_accepted(now, peer) {
                    let (writer, task) = spawn_stream(stream, peer, self.tx.clone());
                    drop(task);
                    self.writers.insert(peer, writer);
                }
            }
            Some(NetEvent::StreamDown { addr }) => {
                self.writers.remove(&addr);
                m.handle_stream_down(now, addr);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Port prediction

/// Runs port prediction's measurement ([`PortMeasurement`]) over fresh UDP sockets.
async fn measure_prediction(server: SocketAddr, rng: &mut StdRng) -> Prediction {
    let mut socks = Vec::new();
    for _ in 0..MEASURE_SOCKETS {
        match UdpSocket::bind(unspecified(server)).await {
            Ok(s) => socks.push(s),
            Err(_) => return Prediction::from_ports(Vec::new()),
        }
    }
    let mut m = PortMeasurement::new(Instant::now(), server, rng);
    let mut buf = vec![0u8; 2048];
    loop {
        while let Some(t) = m.poll_transmit() {
            if let Some(s) = socks.get(t.source) {
                let _ = s.send_to(&t.payload, t.destination).await;
            }
        }
        if let Some(p) = m.result() {
            return p;
        }
        let wake = m.poll_timeout().unwrap_or_else(Instant::now);
        // Only the socket measuring now can be answered; the others have sent nothing yet or
        // are done.
        let Some((i, sock)) = socks.iter().enumerate().find(|(i, _)| m.is_measuring(*i)) else {
            return Prediction::from_ports(Vec::new());
        };
        match tokio::time::timeout_at(wake.into(), sock.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => m.handle_datagram(Instant::now(), i, from, &buf[..n]),
            Ok(Err(_)) => {}
            Err(_) => m.handle_timeout(Instant::now()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connector and listener

/// How the driver runs a peer, beyond its machine's options: which address families it punches
/// over (issue 13), whether it asks the gateway to map its socket's port (issue 12), and the
/// probe budget a listener's sessions share (issue 14).
#[derive(Clone, Debug)]
pub struct PeerSetup {
    pub family: FamilyOptions,
    /// Ask for a mapping (PCP > NAT-PMP > UPnP) and offer it as a candidate ([`mapping`]); on
    /// unless `--no-port-mapping`.
    pub port_mapping: bool,
    /// Listeners only: one budget for every session, through every server.
    pub budget: ProbeBudget,
}

impl Default for PeerSetup {
    fn default() -> Self {
        Self {
            family: FamilyOptions::default(),
            port_mapping: natscope_core::traversal::Techniques::PUNCH.port_mapping,
            budget: ProbeBudget::default(),
        }
    }
}

/// Connects to the peer registered as `opts.id`, sends `opts.messages` numbered messages that
/// the listener echoes, and reports. `Err` only when the connect could not start (server
/// unreachable or refused, unknown peer); a session that broke is a report with `path: failed`
/// or fewer echoes, and [`ConnectReport::attempts`]`.error` says why.
pub async fn connect(opts: &ConnectOptions) -> Result<ConnectReport, PunchError> {
    connect_any(
        opts,
        &[opts.server],
        &PeerSetup::default(),
        std::future::pending(),
    )
    .await
}

/// Opens the socket (and the second family's), and meanwhile measures port prediction and asks
/// the gateway for a mapping of the socket's port, left in `slot` (a mapping of an earlier
/// socket there is deleted first).
async fn open_peer(
    transport: Transport,
    server: SocketAddr,
    predict: bool,
    wait: Duration,
    setup: &PeerSetup,
    slot: &mapping::Slot,
) -> Result<
    (
        Net,
        DualStack,
        Option<Prediction>,
        natscope_core::punch::mapping::PunchMapping,
        StdRng,
    ),
    PunchError,
> {
    if transport == Transport::Tcp {
        super::family::check_tcp(server, &setup.family)?;
    }
    let mut net = Net::open(transport, server, wait).await?;
    let dual = net.second_family(server, &setup.family).await;
    let mut rng = StdRng::from_entropy();
    // The mapping is asked for while prediction measures (see `mapping`'s module comment).
    let predict = predict && transport == Transport::Udp;
    let measure = async {
        match predict {
            true => Some(measure_prediction(server, &mut rng).await),
            false => None,
        }
    };
    let map = mapping::acquire(setup.port_mapping, transport, server, net.local.port());
    let ((held, mapped), prediction) = tokio::join!(map, measure);
    let previous = std::mem::replace(&mut *slot.lock().await, held);
    if let Some(old) = previous {
        let _ = old.delete(mapping::DELETE_LIMIT).await;
    }
    Ok((net, dual, prediction, mapped, rng))
}

/// [`connect`] through `opts.server`, moving a relayed session to the first of `fallback` that
/// serves when its relay dies ([`Connector::set_fallback`]).
async fn connect_via(
    opts: &ConnectOptions,
    fallback: Vec<SocketAddr>,
    setup: &PeerSetup,
    slot: &mapping::Slot,
) -> Result<ConnectReport, PunchError> {
    let t0 = Instant::now();
    let wait = opts.timeout.min(Duration::from_secs(2));
    let (mut net, dual, prediction, mapped, rng) =
        open_peer(opts.transport, opts.server, opts.predict, wait, setup, slot).await?;
    if std::env::var_os(RELAY_ONLY_ENV).is_some() && opts.transport == Transport::Udp {
        net.only = Some(fallback.iter().copied().chain([opts.server]).collect());
    }
    let mut c = Connector::new(t0, opts.clone(), rng);
    c.dual_stack(dual);
    c.set_port_mapping(mapped);
    c.set_fallback(fallback);
    c.start(Instant::now(), net.local, prediction);
    loop {
        net.flush(&mut c);
        if let Some(outcome) = c.poll_outcome() {
            if outcome.is_ok() {
                // The CLOSE just sent: give it a moment on the wire.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return outcome;
        }
        let ev = net.next_event(c.poll_timeout()).await;
        net.feed(&mut c, ev);
    }
}

/// [`listen`] registered with every one of `servers` at once (one socket and one registration
/// each, the same key), so connectors may come through any of them (issue 14, "no single
/// rendezvous"). `opts.count` counts sessions across all servers. A server that fails only ends
/// its own registration; the error is returned when every one failed. The machines (one per
/// server) run in one loop and share `setup.budget`, so a relayed session whose connector moved
/// it to another server's relay is handed from one machine to the other
/// ([`natscope_core::punch::listener::hand_over`]). Each socket's port mapping is renewed while
/// this runs and deleted when it ends.
pub async fn listen_all(
    opts: &ListenOptions,
    servers: &[SocketAddr],
    setup: &PeerSetup,
    shutdown: impl Future<Output = ()>,
    on_event: impl FnMut(ListenEvent),
) -> Result<u64, PunchError> {
    let slots: Vec<mapping::Slot> = servers.iter().map(|_| mapping::Slot::default()).collect();
    let session = listen_each(opts, servers, setup, &slots, shutdown, on_event);
    match mapping::hold(&slots, session, std::future::pending()).await {
        Some(r) => r,
        None => unreachable!("a pending future never resolves"),
    }
}

async fn listen_each(
    opts: &ListenOptions,
    servers: &[SocketAddr],
    setup: &PeerSetup,
    slots: &[mapping::Slot],
    shutdown: impl Future<Output = ()>,
    mut on_event: impl FnMut(ListenEvent),
) -> Result<u64, PunchError> {
    if servers.len() <= 1 {
        let o = ListenOptions {
            server: servers.first().copied().unwrap_or(opts.server),
            ..opts.clone()
        };
        let slot = slots.first().ok_or_else(|| {
            PunchError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no rendezvous server given",
            ))
        })?;
        return listen_one(&o, setup, slot, shutdown, on_event).await;
    }
    let starts = servers.iter().zip(slots).map(|(server, slot)| {
        let o = ListenOptions {
            server: *server,
            count: None,
            ..opts.clone()
        };
        async move {
            let mut l = start_listener(&o, setup, slot).await?;
            l.1.enable_failover();
            Ok::<_, PunchError>(l)
        }
    });
    let mut peers = Vec::new();
    let mut last_err = None;
    for r in futures::future::join_all(starts).await {
        match r {
            Ok(p) => peers.push(p),
            Err(e) => last_err = Some(e),
        }
    }
    let (mut served, mut any_ok, mut stopping) = (0u64, false, false);
    tokio::pin!(shutdown);
    loop {
        let now = Instant::now();
        let mut ls: Vec<&mut Listener> = peers.iter_mut().map(|(_, l)| l).collect();
        listener::hand_over(now, &mut ls);
        let mut i = 0;
        while i < peers.len() {
            let (net, l) = &mut peers[i];
            net.flush(l);
            while let Some(e) = l.poll_event() {
                served += u64::from(matches!(e, ListenEvent::SessionEnded { .. }));
                on_event(e);
            }
            match l.poll_outcome() {
                Some(Ok(_)) => any_ok = true,
                Some(Err(e)) => last_err = Some(e),
                None => {
                    i += 1;
                    continue;
                }
            }
            peers.remove(i);
        }
        if !stopping && opts.count.is_some_and(|c| served >= c) {
            stopping = true;
            for (net, l) in &mut peers {
                l.shutdown();
                net.flush(l);
            }
            continue;
        }
        if peers.is_empty() {
            // The UNREGISTERs just sent: give them a moment on the wire.
            tokio::time::sleep(Duration::from_millis(5)).await;
            return match (any_ok, last_err) {
                (false, Some(e)) => Err(e),
                _ => Ok(served),
            };
        }
        let woke = {
            let waits = peers.iter_mut().map(|(net, l)| {
                let wake = l.poll_timeout();
                Box::pin(net.next_event(wake))
            });
            tokio::select! {
                _ = &mut shutdown, if !stopping => None,
                (ev, i, _) = futures::future::select_all(waits) => Some((i, ev)),
            }
        };
        match woke {
            Some((i, ev)) => {
                if let Some((net, l)) = peers.get_mut(i) {
                    net.feed(l, ev);
                }
            }
            None => {
                stopping = true;
                for (_, l) in &mut peers {
                    l.shutdown();
                }
            }
        }
    }
}

/// [`connect`] through the first of `servers` that answers and knows `opts.id` (issue 14, "no
/// single rendezvous"): a server that is down or has no such peer is skipped; the last one's
/// error is returned when none serves. A key mismatch or a failed session is not retried
/// elsewhere: that is the peer's answer, not the server's absence. A relayed session moves to
/// the other servers when its relay dies (failover). Ends early when `shutdown` resolves
/// (Ctrl-C: an `Interrupted` error); the socket's port mapping is deleted before this returns,
/// either way.
pub async fn connect_any(
    opts: &ConnectOptions,
    servers: &[SocketAddr],
    setup: &PeerSetup,
    shutdown: impl Future<Output = ()>,
) -> Result<ConnectReport, PunchError> {
    let slot = [mapping::Slot::default()];
    let session = connect_each(opts, servers, setup, &slot[0]);
    match mapping::hold(&slot, session, shutdown).await {
        Some(r) => r,
        None => Err(PunchError::Io(io::Error::new(
            io::ErrorKind::Interrupted,
            "interrupted before the connect finished",
        ))),
    }
}

async fn connect_each(
    opts: &ConnectOptions,
    servers: &[SocketAddr],
    setup: &PeerSetup,
    slot: &mapping::Slot,
) -> Result<ConnectReport, PunchError> {
    let mut last = None;
    for (i, server) in servers.iter().enumerate() {
        // Relay failover: the servers after this one, then those before it (they failed).
        let fallback = servers[i + 1..].iter().chain(&servers[..i]).copied();
        let o = ConnectOptions {
            server: *server,
            ..opts.clone()
        };
        match connect_via(&o, fallback.collect(), setup, slot).await {
            Err(
                e @ (PunchError::Unreachable(..)
                | PunchError::ConnectionRefused(_)
                | PunchError::UnknownPeer(..)
                | PunchError::ServerClosed(_)),
            ) => last = Some(e),
            other => return other,
        }
    }
    Err(last.unwrap_or(PunchError::Io(io::Error::new(
        io::ErrorKind::InvalidInput,
        "no rendezvous server given",
    ))))
}

/// Registers `opts.id`, serves sessions (echoing every application message) until `count`
/// sessions ended or `shutdown` resolves (then unregisters). Returns how many were served.
pub async fn listen(
    opts: &ListenOptions,
    shutdown: impl Future<Output = ()>,
    on_event: impl FnMut(ListenEvent),
) -> Result<u64, PunchError> {
    listen_all(
        opts,
        &[opts.server],
        &PeerSetup::default(),
        shutdown,
        on_event,
    )
    .await
}

/// One listener machine on its own socket, registering (its probes drawn from `setup.budget`,
/// its port's mapping in `slot`).
async fn start_listener(
    opts: &ListenOptions,
    setup: &PeerSetup,
    slot: &mapping::Slot,
) -> Result<(Net, Listener), PunchError> {
    let t0 = Instant::now();
    let wait = Duration::from_secs(2);
    let (net, dual, prediction, mapped, rng) =
        open_peer(opts.transport, opts.server, opts.predict, wait, setup, slot).await?;
    let mut l = Listener::new(t0, opts.clone(), rng);
    l.dual_stack(dual);
    l.set_port_mapping(mapped);
    l.set_probe_budget(setup.budget.clone());
    l.start(Instant::now(), net.local, prediction);
    Ok((net, l))
}

/// [`listen`] through `opts.server` alone.
async fn listen_one(
    opts: &ListenOptions,
    setup: &PeerSetup,
    slot: &mapping::Slot,
    shutdown: impl Future<Output = ()>,
    mut on_event: impl FnMut(ListenEvent),
) -> Result<u64, PunchError> {
    let (mut net, mut l) = start_listener(opts, setup, slot).await?;
    tokio::pin!(shutdown);
    loop {
        net.flush(&mut l);
        while let Some(e) = l.poll_event() {
            on_event(e);
        }
        if let Some(outcome) = l.poll_outcome() {
            // The UNREGISTER just sent: give it a moment on the wire.
            tokio::time::sleep(Duration::from_millis(5)).await;
            return outcome;
        }
        let wake = l.poll_timeout();
        tokio::select! {
            _ = &mut shutdown => l.shutdown(),
            ev = net.next_event(wake) => net.feed(&mut l, ev),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Key files (issue 14): the core holds the identity; reading and writing its file is here.

/// The peer's key pair: from `path` (created with mode 0600 when missing), or ephemeral when no
/// file is named. A file others can read or write is refused, as ssh refuses such a key.
pub fn load_identity(path: Option<&std::path::Path>) -> Result<Identity, PunchError> {
    let Some(path) = path else {
        return Ok(Identity::generate(&mut StdRng::from_entropy()));
    };
    let shown = path.display();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(PunchError::Io(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("key file {shown} is accessible by others (mode {mode:03o}): run chmod 600 {shown}"),
                    )));
                }
            }
            let seed = decode_hex32(&text).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("key file {shown} is not one line of 64 hex digits"),
                )
            })?;
            Ok(Identity::from_seed(seed))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = Identity::generate(&mut StdRng::from_entropy());
            let text: String = id.seed().iter().map(|b| format!("{b:02x}")).collect();
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let mut f = o.open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create key file {shown}: {e}"))
            })?;
            std::io::Write::write_all(&mut f, format!("{text}\n").as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(PunchError::Io(io::Error::new(
            e.kind(),
            format!("cannot read key file {shown}: {e}"),
        ))),
    }
}
