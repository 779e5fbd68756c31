//! Runs the [`Reflector`] core over real sockets.
//!
//! Every core is used by giving every local address several UDP sockets bound with SO_REUSEPORT
//! (one per worker): the kernel spreads clients across them by 4-tuple hash. Each worker is an OS
//! thread with its own single-threaded tokio runtime that drives its socket of every address, so a
//! request is received, answered and sent on one thread with no work stealing. Under loopback load
//! (scripts/bench-reflect.sh) that took 5–40 % less CPU per request than one shared multi-threaded
//! runtime, the most when a few clients hashed unevenly onto the sockets.
//! On Linux a task reads up to 32 queued datagrams with one recvmmsg(2) and sends the answers that
//! leave from its own socket with one sendmmsg(2) (see `batch`): on loopback a Binding answer costs
//! little in user space, and entering the kernel twice per request was most of the rest.
//! Per request the path allocates nothing: each task owns its receive and answer buffers, the core
//! writes into them, and the answer leaves from the worker's socket for the address the core chose
//! (RFC 5780 §6). TCP listeners and the partner link run on worker 0 and share the core; each TCP
//! connection reads frames into a fixed buffer and is closed when oversized or malformed, or when a
//! bound of [`TcpLimits`] runs out (a whole request, idle, a write, a lifetime); a per-source cap
//! keeps one address from holding every slot.
//!
//! The runtimes live on their own threads, so a [`RunningReflector`] can be started from sync code,
//! from tests and from the CLI alike, and stopped (or dropped) deterministically.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant as Deadline};

use super::link::LinkVerifier;
use super::rate_limit::{RateLimit, RateLimiter};
use super::tcp::{ConnectionSlots, Refused, TcpLimits};
use super::{Action, Reflector, ReflectorConfig, RequestKind, Transport, MAX_RESPONSE};
use crate::stun::framing::{self, Frame, MAX_FRAME};

/// Largest UDP request answered; anything longer is dropped (PADDING is capped well below it).
pub const MAX_DATAGRAM: usize = 2048;
/// Send buffer of an accepted TCP connection: room for dozens of the largest answers.
const TCP_SEND_BUFFER: usize = 16 << 10;
/// Refused link messages are logged at most this often (anyone can send to the link port).
const LINK_WARN_EVERY: Duration = Duration::from_secs(60);

/// Everything needed to run a reflector.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub reflector: ReflectorConfig,
    pub rate_limit: RateLimit,
    /// Worker threads, and SO_REUSEPORT sockets per UDP address. 0 = one per core.
    pub workers: usize,
    /// Also listen on TCP (STUN over TCP, RFC 8489 §6.2.2).
    pub tcp: bool,
    /// How many TCP connections are held, and for how long (see [`TcpLimits`]).
    pub tcp_limits: TcpLimits,
}

impl DriverConfig {
    pub fn new(reflector: ReflectorConfig) -> Self {
        Self {
            reflector,
            rate_limit: RateLimit::default(),
            workers: 0,
            tcp: true,
            tcp_limits: TcpLimits::default(),
        }
    }
}

/// Live counters, updated with relaxed atomics on the request path.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    responses: AtomicU64,
    error_responses: AtomicU64,
    dropped: AtomicU64,
    rate_limited: AtomicU64,
    forwarded: AtomicU64,
    link_accepted: AtomicU64,
    link_refused: AtomicU64,
    tcp_connections: AtomicU64,
    tcp_refused: AtomicU64,
    tcp_source_capped: AtomicU64,
    tcp_timed_out: AtomicU64,
    kinds: [AtomicU64; 8],
}

/// The request counters of one received batch, added to the shared [`Counters`] once per batch
/// instead of with two or three atomic read-modify-writes per request.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    responses: u64,
    error_responses: u64,
    forwarded: u64,
    dropped: u64,
    kinds: [u64; 8],
}

impl Tally {
    fn count(&mut self, action: &Action, kind: RequestKind) {
        match action {
            Action::Send { error, .. } => {
                self.responses += 1;
                self.error_responses += u64::from(*error);
            }
            Action::Forward { .. } => self.forwarded += 1,
            Action::Drop(_) => self.dropped += 1,
        }
        if !matches!(action, Action::Drop(_)) {
            self.kinds[kind_index(kind)] += 1;
        }
    }

    fn flush(&mut self, c: &Counters) {
        let add = |c: &AtomicU64, n: u64| {
            if n != 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&c.requests, self.requests);
        add(&c.responses, self.responses);
        add(&c.error_responses, self.error_responses);
        add(&c.forwarded, self.forwarded);
        add(&c.dropped, self.dropped);
        for (c, n) in c.kinds.iter().zip(self.kinds) {
            add(c, n);
        }
        *self = Self::default();
    }
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct CounterSnapshot {
    pub requests: u64,
    pub responses: u64,
    pub error_responses: u64,
    pub dropped: u64,
    pub rate_limited: u64,
    pub forwarded: u64,
    pub link_accepted: u64,
    pub link_refused: u64,
    pub tcp_connections: u64,
    /// TCP connections closed on accept: the total or the per-source cap was reached.
    pub tcp_refused: u64,
    /// The part of `tcp_refused` refused by the per-source cap.
    pub tcp_source_capped: u64,
    /// TCP connections closed because a request, idle, write or lifetime bound ran out.
    pub tcp_timed_out: u64,
    pub binding: u64,
    pub change_ip: u64,
    pub change_port: u64,
    pub change_both: u64,
    pub response_port: u64,
    pub padding: u64,
    pub classic: u64,
    pub other: u64,
}

fn kind_index(k: RequestKind) -> usize {
    match k {
        RequestKind::Binding => 0,
        RequestKind::ChangeIp => 1,
        RequestKind::ChangePort => 2,
        RequestKind::ChangeBoth => 3,
        RequestKind::ResponsePort => 4,
        RequestKind::Padding => 5,
        RequestKind::Classic => 6,
        RequestKind::Other => 7,
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let k = |i: usize| g(&self.kinds[i]);
        CounterSnapshot {
            requests: g(&self.requests),
            responses: g(&self.responses),
            error_responses: g(&self.error_responses),
            dropped: g(&self.dropped),
            rate_limited: g(&self.rate_limited),
            forwarded: g(&self.forwarded),
            link_accepted: g(&self.link_accepted),
            link_refused: g(&self.link_refused),
            tcp_connections: g(&self.tcp_connections),
            tcp_refused: g(&self.tcp_refused),
            tcp_source_capped: g(&self.tcp_source_capped),
            tcp_timed_out: g(&self.tcp_timed_out),
            binding: k(0),
            change_ip: k(1),
            change_port: k(2),
            change_both: k(3),
            response_port: k(4),
            padding: k(5),
            classic: k(6),
            other: k(7),
        }
    }
}

/// A reflector running on its own thread. Stopped by [`RunningReflector::stop`] or on drop.
#[derive(Debug)]
pub struct RunningReflector {
    shutdown: Option<watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
}

struct Shared {
    core: Reflector,
    /// `None` when limiting is off, so the request path takes no lock and reads no clock for it.
    limiter: Option<Mutex<RateLimiter>>,
    counters: Arc<Counters>,
    /// `udp[address index][worker]`, in the order of `addrs`.
    udp: Vec<Vec<Arc<UdpSocket>>>,
    addrs: Vec<SocketAddr>,
    link: Option<Arc<UdpSocket>>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn bind_udp(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Not unix (Windows): no SO_REUSEPORT, and `start` defaults to one socket per address.
    #[cfg(unix)]
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    // Room for bursts without drops while both cores are busy.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn with_addr(e: io::Error, what: &str, addr: SocketAddr) -> io::Error {
    io::Error::new(e.kind(), format!("cannot bind {what} {addr}: {e}"))
}

impl RunningReflector {
    /// Binds every socket (errors are returned here, before anything runs), then serves on a
    /// background thread.
    pub fn start(cfg: DriverConfig) -> io::Result<Self> {
        cfg.reflector
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let workers = if cfg.workers == 0 && cfg!(unix) {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else if cfg.workers == 0 {
            1
        } else {
            cfg.workers
        };
        let mut cfg = cfg;
        let mut std_udp = Vec::new();
        if cfg.reflector.primary.port() == 0 {
            // Only a one-address server may ask for any port (`validate` refuses 0 otherwise): bind
            // once, then give every other socket, and RESPONSE-ORIGIN, the port the kernel chose.
            let first = bind_udp(cfg.reflector.primary, true)
                .map_err(|e| with_addr(e, "udp", cfg.reflector.primary))?;
            cfg.reflector.primary = first.local_addr()?;
            std_udp.push(vec![first]);
        }
        let addrs = cfg.reflector.local_addresses();
        for (i, &a) in addrs.iter().enumerate() {
            if std_udp.len() <= i {
                std_udp.push(Vec::new());
            }
            while std_udp[i].len() < workers {
                std_udp[i].push(bind_udp(a, true).map_err(|e| with_addr(e, "udp", a))?);
            }
        }
        let mut std_tcp = Vec::new();
        if cfg.tcp {
            for &a in &addrs {
                std_tcp.push(bind_tcp(a).map_err(|e| with_addr(e, "tcp", a))?);
            }
        }
        let std_link = match &cfg.reflector.partner {
            Some(l) => Some(bind_udp(l.listen, false).map_err(|e| with_addr(e, "link", l.listen))?),
            None => None,
        };
        let udp_addrs = addrs.clone();
        let tcp_addrs = if cfg.tcp { addrs.clone() } else { Vec::new() };

        // One single-threaded runtime per worker, each driving its own socket of every address:
        // the kernel already spread the clients across the SO_REUSEPORT sockets, so work stealing
        // would only add cross-thread wakeups to every packet. TCP and the link live on worker 0.
        let runtimes = (0..workers)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            })
            .collect::<io::Result<Vec<_>>>()?;
        let counters = Arc::new(Counters::default());
        let registered = register(
            cfg,
            addrs,
            std_udp,
            std_tcp,
            std_link,
            counters.clone(),
            &runtimes,
        );
        if let Err(e) = registered {
            // Dropping a runtime may block, which panics when `start` is called from async code.
            for rt in runtimes {
                rt.shutdown_background();
            }
            return Err(e);
        }
        let (tx, rx) = watch::channel(false);
        let mut threads = Vec::new();
        for (w, rt) in runtimes.into_iter().enumerate() {
            let mut rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("natscope-reflect-{w}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    });
                    rt.shutdown_timeout(Duration::from_secs(1));
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = tx.send(true);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Self {
            shutdown: Some(tx),
            threads,
            counters,
            udp: udp_addrs,
            tcp: tcp_addrs,
        })
    }

    /// The UDP addresses served by this process.
    pub fn udp_addresses(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// The TCP addresses served by this process (empty when TCP is off).
    pub fn tcp_addresses(&self) -> &[SocketAddr] {
        &self.tcp
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// Stops serving, waits for the thread, and returns the final counters.
    pub fn stop(mut self) -> CounterSnapshot {
        self.halt();
        self.counters.snapshot()
    }

    fn halt(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RunningReflector {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Registers every UDP socket `udp[address][w]` with runtime `w` (TCP and the link with runtime 0)
/// and spawns each task on the runtime its sockets belong to. The tasks keep everything alive.
fn register(
    cfg: DriverConfig,
    addrs: Vec<SocketAddr>,
    std_udp: Vec<Vec<std::net::UdpSocket>>,
    std_tcp: Vec<std::net::TcpListener>,
    std_link: Option<std::net::UdpSocket>,
    counters: Arc<Counters>,
    runtimes: &[tokio::runtime::Runtime],
) -> io::Result<()> {
    let Some(first) = runtimes.first() else {
        return Err(io::Error::other("no worker runtime"));
    };
    let mut udp = Vec::new();
    for group in std_udp {
        let mut g = Vec::new();
        for (w, s) in group.into_iter().enumerate() {
            let _entered = runtimes.get(w).unwrap_or(first).enter();
            g.push(Arc::new(UdpSocket::from_std(s)?));
        }
        udp.push(g);
    }
    let _entered = first.enter();
    let link = match std_link {
        Some(s) => Some(Arc::new(UdpSocket::from_std(s)?)),
        None => None,
    };
    let shared = Arc::new(Shared {
        core: Reflector::new(cfg.reflector.clone()),
        limiter: (cfg.rate_limit.per_second != 0)
            .then(|| Mutex::new(RateLimiter::new(cfg.rate_limit, Instant::now()))),
        counters,
        udp,
        addrs,
        link,
    });
    for (i, group) in shared.udp.iter().enumerate() {
        for w in 0..group.len() {
            runtimes
                .get(w)
                .unwrap_or(first)
                .spawn(udp_loop(shared.clone(), i, w));
        }
    }
    let slots = Arc::new(Mutex::new(ConnectionSlots::new(&cfg.tcp_limits)));
    for (i, l) in std_tcp.into_iter().enumerate() {
        let l = TcpListener::from_std(l)?;
        first.spawn(tcp_accept(
            shared.clone(),
            l,
            shared.addrs[i],
            slots.clone(),
            cfg.tcp_limits,
        ));
    }
    if shared.link.is_some() {
        if let Some(l) = cfg.reflector.partner.clone() {
            first.spawn(link_loop(shared.clone(), LinkVerifier::new(l, unix_ms())));
        }
    }
    Ok(())
}

impl Shared {
    /// Wall-clock time for stamping link messages; only a cooperating pair reads the clock.
    fn link_clock(&self) -> u64 {
        if self.link.is_some() {
            unix_ms()
        } else {
            0
        }
    }

    fn allowed(&self, ip: std::net::IpAddr) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let ok = match limiter.lock() {
            Ok(mut l) => l.allow(Instant::now(), ip),
            Err(poisoned) => poisoned.into_inner().allow(Instant::now(), ip),
        };
        if !ok {
            bump(&self.counters.rate_limited);
        }
        ok
    }

    fn socket_for(&self, addr: SocketAddr, worker: usize) -> Option<&UdpSocket> {
        let i = self.addrs.iter().position(|a| *a == addr)?;
        self.udp[i]
            .get(worker)
            .or_else(|| self.udp[i].first())
            .map(|s| &**s)
    }

    fn count(&self, action: &Action, kind: RequestKind) {
        let mut t = Tally::default();
        t.count(action, kind);
        t.flush(&self.counters);
    }

    async fn send(&self, action: Action, out: &[u8], worker: usize) {
        match action {
            Action::Send { from, to, len, .. } => {
                if let Some(s) = self.socket_for(from, worker) {
                    // The send buffer almost always has room: try once without a future, and only
                    // wait for writability when the kernel says so.
                    let sent = match s.try_send_to(&out[..len], to) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            s.send_to(&out[..len], to).await
                        }
                        r => r,
                    };
                    if let Err(e) = sent {
                        tracing::debug!(%from, %to, error = %e, "send failed");
                    }
                }
            }
            Action::Forward { len } => {
                if let (Some(link), Some(p)) = (&self.link, &self.core.config().partner) {
                    if let Err(e) = link.send_to(&out[..len], p.partner).await {
                        tracing::debug!(partner = %p.partner, error = %e, "forward failed");
                    }
                }
            }
            Action::Drop(reason) => tracing::trace!(%reason, "dropped"),
        }
    }
}

/// Serves one UDP socket, reading up to [`batch::BATCH`] datagrams per system call and sending the
/// answers that leave from this socket with one more.
#[cfg(target_os = "linux")]
async fn udp_loop(shared: Arc<Shared>, index: usize, worker: usize) {
    let sock = shared.udp[index][worker].clone();
    let local = shared.addrs[index];
    let mut inbox = batch::Inbox::new(local);
    let mut outbox = batch::Outbox::new();
    loop {
        let received = sock
            .async_io(tokio::io::Interest::READABLE, || inbox.recv(&sock))
            .await;
        let n = match received {
            Ok(n) => n,
            Err(e) => {
                // Linux reports ICMP errors for earlier sends here; they are not fatal.
                tracing::trace!(error = %e, "recv error");
                continue;
            }
        };
        let mut tally = Tally {
            requests: n as u64,
            ..Tally::default()
        };
        let clock = shared.link_clock();
        for i in 0..n {
            let (from, request) = inbox.get(i);
            // A datagram that filled its slot was truncated by the kernel (see `batch::SLOT`); an
            // unreadable source (never seen on UDP) leaves nowhere to answer.
            let Some(from) = from.filter(|_| request.len() <= MAX_DATAGRAM) else {
                tally.dropped += 1;
                continue;
            };
            if !shared.allowed(from.ip()) {
                continue;
            }
            let out = outbox.next_buffer();
            let (action, kind) =
                shared
                    .core
                    .answer(Transport::Udp, from, local, request, out, clock);
            tally.count(&action, kind);
            if tracing::enabled!(tracing::Level::TRACE) {
                log_request(from, local, request, &action);
            }
            match action {
                // Most answers leave from the socket the request came in on: queue them.
                Action::Send {
                    from: src, to, len, ..
                } if src == local => outbox.push(to, len),
                // Another address (CHANGE-REQUEST), the partner link, or nothing: as before.
                // The counts so far go out first, so that whoever gets this answer also sees
                // it counted (as the queued answers are, flushed after the tally below).
                other => {
                    tally.flush(&shared.counters);
                    shared.send(other, outbox.next_buffer(), worker).await
                }
            }
        }
        tally.flush(&shared.counters);
        outbox.flush(&sock).await;
    }
}

/// Serves one UDP socket, one datagram per system call.
#[cfg(not(target_os = "linux"))]
async fn udp_loop(shared: Arc<Shared>, index: usize, worker: usize) {
    let sock = shared.udp[index][worker].clone();
    let local = shared.addrs[index];
    // One byte more than any request we accept: a datagram that fills it was truncated by the
    // kernel and must not be parsed as if it had ended there.
    let mut inb = [0u8; MAX_DATAGRAM + 1];
    let mut out = [0u8; MAX_RESPONSE];
    loop {
        let (n, from) = match sock.recv_from(&mut inb).await {
            Ok(v) => v,
            Err(e) => {
                // Linux reports ICMP errors for earlier sends here; they are not fatal.
                tracing::trace!(error = %e, "recv error");
                continue;
            }
        };
        bump(&shared.counters.requests);
        if n > MAX_DATAGRAM {
            bump(&shared.counters.dropped);
            continue;
        }
        if !shared.allowed(from.ip()) {
            continue;
        }
        let (action, kind) = shared.core.answer(
            Transport::Udp,
            from,
            local,
            &inb[..n],
            &mut out,
            shared.link_clock(),
        );
        shared.count(&action, kind);
        if tracing::enabled!(tracing::Level::TRACE) {
            log_request(from, local, &inb[..n], &action);
        }
        shared.send(action, &out, worker).await;
    }
}

async fn link_loop(shared: Arc<Shared>, mut verifier: LinkVerifier) {
    let Some(sock) = shared.link.clone() else {
        return;
    };
    let mut inb = [0u8; 4096];
    let mut out = [0u8; MAX_RESPONSE];
    let mut last_warn: Option<Instant> = None;
    let mut refused_since_warn = 0u64;
    loop {
        let Ok((n, from)) = sock.recv_from(&mut inb).await else {
            continue;
        };
        let fwd = match verifier.verify(from, &inb[..n], unix_ms()) {
            Ok(f) => f,
            Err(e) => {
                bump(&shared.counters.link_refused);
                refused_since_warn += 1;
                let now = Instant::now();
                if last_warn.is_none_or(|t| now.duration_since(t) >= LINK_WARN_EVERY) {
                    tracing::warn!(%from, error = %e, refused = refused_since_warn, "refused link message(s)");
                    last_warn = Some(now);
                    refused_since_warn = 0;
                }
                continue;
            }
        };
        bump(&shared.counters.link_accepted);
        let (action, kind) = shared.core.answer_forwarded(&fwd, &mut out);
        shared.count(&action, kind);
        shared.send(action, &out, 0).await;
    }
}

/// Holds one of the [`ConnectionSlots`] until the connection's task ends.
struct Slot {
    slots: Arc<Mutex<ConnectionSlots>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.slots).release(self.ip);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn tcp_accept(
    shared: Arc<Shared>,
    l: TcpListener,
    local: SocketAddr,
    slots: Arc<Mutex<ConnectionSlots>>,
    limits: TcpLimits,
) {
    loop {
        let Ok((stream, from)) = l.accept().await else {
            // EMFILE and friends: back off briefly rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let admitted = lock(&slots).admit(from.ip());
        if let Err(why) = admitted {
            bump(&shared.counters.tcp_refused);
            if why == Refused::PerSource {
                bump(&shared.counters.tcp_source_capped);
            }
            continue;
        }
        let slot = Slot {
            slots: slots.clone(),
            ip: from.ip(),
        };
        bump(&shared.counters.tcp_connections);
        let shared = shared.clone();
        tokio::spawn(async move {
            if tcp_conn(&shared, stream, from, local, &limits).await == Ended::TimedOut {
                bump(&shared.counters.tcp_timed_out);
            }
            drop(slot);
        });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The peer closed, sent something invalid, or the socket failed.
    Closed,
    /// A bound of [`TcpLimits`] ran out.
    TimedOut,
}

/// Serves one connection within `limits`: the idle bound runs until the first byte of a request,
/// the request bound from that byte until the frame is complete (however slowly the bytes come),
/// the write bound while an answer is written, and the lifetime bound over all of it.
async fn tcp_conn(
    shared: &Shared,
    mut stream: TcpStream,
    from: SocketAddr,
    local: SocketAddr,
    limits: &TcpLimits,
) -> Ended {
    let ended = serve_tcp(shared, &mut stream, from, local, limits).await;
    if ended == Ended::TimedOut {
        // Reset rather than close, so answers the peer never read do not linger in the kernel.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    ended
}

async fn serve_tcp(
    shared: &Shared,
    stream: &mut TcpStream,
    from: SocketAddr,
    local: SocketAddr,
    limits: &TcpLimits,
) -> Ended {
    let _ = stream.set_nodelay(true);
    // A fixed send buffer: without one the kernel grows it to megabytes for a peer that does not
    // read, so reaching the write bound would take that long and that much memory per slot.
    let _ = socket2::SockRef::from(&*stream).set_send_buffer_size(TCP_SEND_BUFFER);
    let end_of_life = Deadline::now() + limits.lifetime;
    let bound = |d: Duration| (Deadline::now() + d).min(end_of_life);
    let mut wait_until = bound(limits.idle);
    let mut buf = [0u8; 2 * MAX_FRAME];
    let mut filled = 0usize;
    let mut out = [0u8; MAX_RESPONSE];
    loop {
        let n = match timeout_at(wait_until, stream.read(&mut buf[filled..])).await {
            Err(_) => return Ended::TimedOut,
            Ok(Ok(0)) | Ok(Err(_)) => return Ended::Closed,
            Ok(Ok(n)) => n,
        };
        if filled == 0 {
            wait_until = bound(limits.request);
        }
        filled += n;
        loop {
            match framing::frame(&buf[..filled]) {
                Frame::Complete(len) => {
                    bump(&shared.counters.requests);
                    if shared.allowed(from.ip()) {
                        let (action, kind) = shared.core.answer(
                            Transport::Tcp,
                            from,
                            local,
                            &buf[..len],
                            &mut out,
                            shared.link_clock(),
                        );
                        shared.count(&action, kind);
                        match action {
                            Action::Send { len: olen, .. } => {
                                let write = stream.write_all(&out[..olen]);
                                match timeout_at(bound(limits.write), write).await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(_)) => return Ended::Closed,
                                    Err(_) => return Ended::TimedOut,
                                }
                            }
                            // A malformed frame on a stream leaves no way to resynchronise.
                            Action::Drop(_) | Action::Forward { .. } => return Ended::Closed,
                        }
                    }
                    buf.copy_within(len..filled, 0);
                    filled -= len;
                    // The next request starts now if its first bytes came with this one.
                    wait_until = bound(if filled == 0 {
                        limits.idle
                    } else {
                        limits.request
                    });
                }
                Frame::Partial(_) => break,
                Frame::Invalid => {
                    bump(&shared.counters.dropped);
                    return Ended::Closed;
                }
            }
        }
    }
}

/// Trace-level request log. SOFTWARE is peer text: control characters are escaped.
fn log_request(from: SocketAddr, local: SocketAddr, req: &[u8], action: &Action) {
    let software = crate::stun::Message::parse(req)
        .ok()
        .and_then(|m| m.attribute(crate::stun::attr_type::SOFTWARE))
        .map(|a| escape_peer_text(a.value))
        .unwrap_or_default();
    tracing::trace!(%from, %local, software = %software, ?action, "request");
}

/// Renders untrusted bytes for a log line: printable ASCII as is, everything else escaped.
pub fn escape_peer_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut s = String::with_capacity(text.len());
    for c in text.chars().take(256) {
        if c.is_control() || c == '\u{fffd}' {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    s
}

/// recvmmsg(2) / sendmmsg(2) for the UDP path, through nix's safe wrappers. Reading every queued
/// datagram (up to [`BATCH`]) with one call and sending their answers with one more changes nothing
/// when requests arrive one at a time: the batch is then one datagram long. Data buffers are
/// allocated once per task; the kernel message headers hold raw pointers, which makes them `!Send`,
/// so they live in thread-locals of the worker thread and are only touched inside the synchronous
/// system-call closures, never across an `.await`. A batch allocates nothing.
#[cfg(target_os = "linux")]
mod batch {
    use std::cell::RefCell;
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
    };
    use tokio::net::UdpSocket;

    use super::{MAX_DATAGRAM, MAX_RESPONSE};

    /// Datagrams per system call.
    pub const BATCH: usize = 32;
    /// Receive slot: one byte more than any request we accept, so a datagram that fills it was
    /// truncated by the kernel and must not be parsed as if it had ended there.
    pub const SLOT: usize = MAX_DATAGRAM + 1;

    // recvmmsg leaves the source-address length the kernel last wrote in each header and offers it
    // as the room for the next source address, so IPv4 and IPv6 sockets need their own headers.
    thread_local! {
        static RECV_HEADERS_V4: RefCell<MultiHeaders<SockaddrStorage>> =
            RefCell::new(MultiHeaders::preallocate(BATCH, None));
        static RECV_HEADERS_V6: RefCell<MultiHeaders<SockaddrStorage>> =
            RefCell::new(MultiHeaders::preallocate(BATCH, None));
        static SEND_HEADERS: RefCell<MultiHeaders<SockaddrStorage>> =
            RefCell::new(MultiHeaders::preallocate(BATCH, None));
    }

    fn to_socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = a.as_sockaddr_in() {
            return Some(SocketAddr::from(*v4));
        }
        a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
    }

    /// One received batch.
    pub struct Inbox {
        data: Box<[[u8; SLOT]; BATCH]>,
        /// The socket is IPv6 (its sources are `sockaddr_in6`, v4-mapped ones included).
        v6: bool,
        from: [Option<SocketAddr>; BATCH],
        len: [usize; BATCH],
        count: usize,
    }

    impl Inbox {
        pub fn new(local: SocketAddr) -> Self {
            Self {
                data: Box::new([[0; SLOT]; BATCH]),
                v6: local.is_ipv6(),
                from: [None; BATCH],
                len: [0; BATCH],
                count: 0,
            }
        }

        /// Reads the queued datagrams, up to [`BATCH`], without blocking (`WouldBlock` if none).
        pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
            self.count = 0;
            let headers = if self.v6 {
                &RECV_HEADERS_V6
            } else {
                &RECV_HEADERS_V4
            };
            headers.with(|headers| {
                let Ok(mut headers) = headers.try_borrow_mut() else {
                    return Err(io::Error::other("receive headers in use"));
                };
                let mut iovs = self.data.each_mut().map(|b| [IoSliceMut::new(b)]);
                let results = recvmmsg(
                    sock.as_raw_fd(),
                    &mut headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )?;
                for (i, m) in results.take(BATCH).enumerate() {
                    // Without MSG_TRUNC the kernel reports at most the slot's length.
                    self.len[i] = if m.flags.contains(MsgFlags::MSG_TRUNC) {
                        SLOT
                    } else {
                        m.bytes.min(SLOT)
                    };
                    self.from[i] = m.address.as_ref().and_then(to_socket_addr);
                    self.count = i + 1;
                }
                Ok(self.count)
            })
        }

        /// Datagram `i` of the last batch and its source (`None` if the kernel gave none we read).
        pub fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8]) {
            match (self.from.get(i), self.data.get(i), self.len.get(i)) {
                (Some(&from), Some(d), Some(&len)) if i < self.count => (from, &d[..len]),
                _ => (None, &[]),
            }
        }
    }

    /// Answers waiting to leave from this task's socket.
    pub struct Outbox {
        data: Box<[[u8; MAX_RESPONSE]; BATCH]>,
        to: [Option<SockaddrStorage>; BATCH],
        len: [usize; BATCH],
        count: usize,
    }

    impl Outbox {
        pub fn new() -> Self {
            Self {
                data: Box::new([[0; MAX_RESPONSE]; BATCH]),
                to: [None; BATCH],
                len: [0; BATCH],
                count: 0,
            }
        }

        /// The buffer the next answer is written into. The outbox is flushed after every received
        /// batch, which is never longer than [`BATCH`], so there is always a free one.
        pub fn next_buffer(&mut self) -> &mut [u8] {
            &mut self.data[self.count.min(BATCH - 1)]
        }

        /// Queues the answer just written into [`Outbox::next_buffer`].
        pub fn push(&mut self, to: SocketAddr, len: usize) {
            if self.count < BATCH {
                self.to[self.count] = Some(SockaddrStorage::from(to));
                self.len[self.count] = len.min(MAX_RESPONSE);
                self.count += 1;
            }
        }

        /// Sends everything queued. A datagram the kernel refuses is logged and dropped, as a
        /// single send would be; when the socket buffer is full the rest wait for room.
        pub async fn flush(&mut self, sock: &UdpSocket) {
            let mut done = 0;
            while done < self.count {
                match sock.try_io(tokio::io::Interest::WRITABLE, || self.send(sock, done)) {
                    Ok(k) => done += k.max(1),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = sock.writable().await {
                            tracing::debug!(error = %e, "send failed");
                            break;
                        }
                    }
                    Err(e) => {
                        // sendmmsg fails only when the first datagram of the call does.
                        let to = self.to[done].as_ref().and_then(to_socket_addr);
                        tracing::debug!(?to, error = %e, "send failed");
                        done += 1;
                    }
                }
            }
            self.count = 0;
        }

        /// One sendmmsg of the queued datagrams from `start` on; returns how many left.
        fn send(&self, sock: &UdpSocket, start: usize) -> io::Result<usize> {
            SEND_HEADERS.with(|headers| {
                let Ok(mut headers) = headers.try_borrow_mut() else {
                    return Err(io::Error::other("send headers in use"));
                };
                let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
                    [IoSlice::new(&self.data[i][..self.len[i].min(MAX_RESPONSE)])]
                });
                let end = self.count.min(BATCH);
                let no_cmsgs: [ControlMessage<'_>; 0] = [];
                let sent = sendmmsg(
                    sock.as_raw_fd(),
                    &mut headers,
                    iovs[start..end].iter(),
                    &self.to[start..end],
                    no_cmsgs,
                    MsgFlags::MSG_DONTWAIT,
                )?;
                Ok(sent.count())
            })
        }
    }
}
