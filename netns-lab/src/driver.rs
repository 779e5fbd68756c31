//! Runs a router's userspace NAT engine over real interfaces: packet sockets on `wan0` and `lan0`
//! (opened from the router namespace's thread, so they belong to it), one receive thread per
//! interface feeding the sans-IO [`Router`], and one timer thread that sends delayed frames and
//! calls [`Router::handle_timeout`] when [`Router::poll_timeout`] asks for it, and at least every
//! `TICK` for the mapping sweep. Every thread checks a stop flag at least every `TICK`, so a lab
//! tears down in bounded time.
//!
//! pnet finds the interfaces and binds each socket to its interface; the frames themselves are
//! read with recvmmsg(2), up to `BATCH` per call, and written with send(2), through nix's safe
//! wrappers. pnet's own channel polls before every receive and every send — four system calls per
//! forwarded frame — which capped the engine below 100k small packets/s on the benchmark machine
//! (`natscope bench lab`).

use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};

use nix::sys::socket::{
    recvmmsg, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, MultiHeaders, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;
use pnet::datalink::{self, Channel};

use crate::engine::{Emit, Port, Router, RouterAddrs};
use crate::netns::Netns;
use crate::topology::{EngineConfig, Ipv4Net};

/// Longest a thread blocks before looking at the stop flag; also the longest housekeeping period.
const TICK: Duration = Duration::from_millis(50);
/// Frames per receive call.
const BATCH: usize = 32;
/// Receive slot: room for the largest frame the engine accepts plus one byte, so an oversized
/// frame is seen as oversized rather than silently truncated.
const SLOT: usize = crate::engine::MAX_FRAME + 1;
/// Kernel receive buffer per packet socket: bursts from a flooding sender queue here.
const RCVBUF: usize = 4 << 20;
pub const WAN: &str = "wan0";
pub const LAN: &str = "lan0";

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("interface {0} not found in the router namespace")]
    NoInterface(&'static str),
    #[error("interface {0} has no MAC address")]
    NoMac(&'static str),
    #[error("packet socket on {0}: {1}")]
    Socket(&'static str, std::io::Error),
    #[error("packet socket on {0}: not an Ethernet channel")]
    NotEthernet(&'static str),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// A packet socket bound to one interface.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// A raw AF_PACKET socket for every protocol, bound to `iface` by pnet (which owns a duplicate
    /// of the descriptor only for as long as the bind takes), with a receive timeout of [`TICK`].
    fn open(iface: &datalink::NetworkInterface, name: &'static str) -> Result<Self, DriverError> {
        let io = |e: nix::Error| DriverError::Socket(name, e.into());
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .map_err(io)?;
        let dup = fd.try_clone().map_err(|e| DriverError::Socket(name, e))?;
        let config = datalink::Config {
            socket_fd: Some(dup.into_raw_fd()),
            promiscuous: false,
            ..Default::default()
        };
        match datalink::channel(iface, config) {
            // Dropping pnet's halves closes its duplicate; the bind stays with the socket.
            Ok(Channel::Ethernet(_, _)) => {}
            Ok(_) => return Err(DriverError::NotEthernet(name)),
            Err(e) => return Err(DriverError::Socket(name, e)),
        }
        // pnet made the shared file description non-blocking: without this the receive timeout
        // never applies and each receive thread spins on EAGAIN (half a core per idle lab).
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(io)?;
        let tick = TimeVal::new(0, TICK.as_micros() as nix::sys::time::suseconds_t);
        setsockopt(&fd, sockopt::ReceiveTimeout, &tick).map_err(io)?;
        // Best effort: without CAP_NET_ADMIN the kernel caps it at rmem_max.
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF)
            .or_else(|_| setsockopt(&fd, sockopt::RcvBuf, &RCVBUF));
        Ok(Self { fd })
    }

    fn send(&self, frame: &[u8]) -> nix::Result<usize> {
        send(self.fd.as_raw_fd(), frame, MsgFlags::empty())
    }
}

type Tx = PacketSocket;

/// A frame waiting for its delay to pass: a min-heap on (`at`, arrival order), so frames due at
/// the same instant leave in the order the engine emitted them.
struct Delayed(Emit, u64);
impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        self.0.at == o.0.at && self.1 == o.1
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0.at, o.1).cmp(&(self.0.at, self.1))
    }
}

struct Shared {
    router: Mutex<Router>,
    wan_tx: Tx,
    lan_tx: Tx,
    delayed: Mutex<(BinaryHeap<Delayed>, u64)>,
    wake: Condvar,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking engine thread must not wedge teardown: keep using the data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn send_now(&self, e: &Emit) {
        let tx = match e.port {
            Port::Wan => &self.wan_tx,
            Port::Lan => &self.lan_tx,
        };
        if let Err(err) = tx.send(&e.frame) {
            tracing::debug!(error = %err, "engine send failed");
        }
    }

    fn dispatch(&self, now: Instant, out: &mut Vec<Emit>) {
        let mut later = false;
        for e in out.drain(..) {
            if e.at <= now {
                self.send_now(&e);
            } else {
                let mut q = lock(&self.delayed);
                let seq = q.1;
                q.1 += 1;
                q.0.push(Delayed(e, seq));
                later = true;
            }
        }
        if later {
            self.wake.notify_one();
        }
    }
}

/// A running engine; dropping it stops its threads.
pub struct EngineHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineHandle")
    }
}

impl EngineHandle {
    /// Reads the router's state (mapping table, counters) under its lock.
    pub fn with_router<T>(&self, f: impl FnOnce(&Router) -> T) -> T {
        f(&lock(&self.shared.router))
    }

    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Opened {
    wan: (PacketSocket, [u8; 6]),
    lan: (PacketSocket, [u8; 6]),
}

fn open(name: &'static str) -> Result<(PacketSocket, [u8; 6]), DriverError> {
    let iface = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .ok_or(DriverError::NoInterface(name))?;
    let mac = iface.mac.ok_or(DriverError::NoMac(name))?;
    Ok((PacketSocket::open(&iface, name)?, mac.octets()))
}

/// Starts the engine of the router living in `ns`.
pub fn start(
    ns: &Netns,
    config: EngineConfig,
    lan: Ipv4Net,
    external: Vec<Ipv4Addr>,
    wan_gateway: Option<Ipv4Addr>,
    ipv6: crate::engine::RouterAddrs6,
) -> Result<EngineHandle, DriverError> {
    let opened = ns.run(|| -> Result<Opened, DriverError> {
        Ok(Opened {
            wan: open(WAN)?,
            lan: open(LAN)?,
        })
    })??;
    let Opened { wan, lan: lan_ch } = opened;
    let addrs = RouterAddrs {
        wan_mac: wan.1,
        lan_mac: lan_ch.1,
        lan,
        external,
        wan_gateway,
        ipv6,
    };
    let shared = Arc::new(Shared {
        router: Mutex::new(Router::new(config, addrs)),
        wan_tx: wan.0,
        lan_tx: lan_ch.0,
        delayed: Mutex::new((BinaryHeap::new(), 0)),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    let mut threads = Vec::new();
    for (port, label) in [(Port::Wan, "wan"), (Port::Lan, "lan")] {
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("nat-rx-{label}"))
            .spawn(move || receive_loop(&s, port))
            .map_err(|e| DriverError::Socket(WAN, e))?;
        threads.push(t);
    }
    let s = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("nat-timer".into())
            .spawn(move || timer_loop(&s))
            .map_err(|e| DriverError::Socket(WAN, e))?,
    );
    if lock(&shared.router).serves_upnp() {
        let (a, s) = (shared.clone(), shared.clone());
        let access: crate::upnp::Access = Arc::new(move |f| f(&mut lock(&a.router)));
        let stopped: crate::upnp::Stopped = Arc::new(move || s.stop.load(Ordering::Relaxed));
        match crate::upnp::start(ns, lan.addr, access, stopped) {
            Ok(t) => threads.extend(t),
            Err(e) => {
                shared.stop.store(true, Ordering::SeqCst);
                return Err(DriverError::Socket(LAN, e));
            }
        }
    }
    Ok(EngineHandle { shared, threads })
}

fn receive_loop(s: &Shared, port: Port) {
    let sock = match port {
        Port::Wan => &s.wan_tx,
        Port::Lan => &s.lan_tx,
    };
    let mut out = Vec::new();
    // Fixed-size, so each call's iovec array lives on the stack: nothing is allocated per batch.
    let mut slots: Box<[[u8; SLOT]; BATCH]> = Box::new([[0u8; SLOT]; BATCH]);
    let mut lens = [0usize; BATCH];
    let mut headers = MultiHeaders::<()>::preallocate(BATCH, None);
    while !s.stop.load(Ordering::Relaxed) {
        let received = {
            let mut iovs = slots.each_mut().map(|b| [IoSliceMut::new(b)]);
            // MSG_WAITFORONE: block (up to the receive timeout) for the first frame, then take
            // whatever else is already queued.
            match recvmmsg(
                sock.fd.as_raw_fd(),
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(results) => {
                    let mut n = 0;
                    for (i, m) in results.take(BATCH).enumerate() {
                        lens[i] = if m.flags.contains(MsgFlags::MSG_TRUNC) {
                            SLOT
                        } else {
                            m.bytes
                        };
                        n = i + 1;
                    }
                    Ok(n)
                }
                Err(e) => Err(e),
            }
        };
        match received {
            Ok(n) => {
                let now = Instant::now();
                {
                    let mut router = lock(&s.router);
                    for (slot, len) in slots.iter().zip(lens.iter()).take(n) {
                        router.handle_frame(now, port, &slot[..(*len).min(SLOT)], &mut out);
                    }
                }
                s.dispatch(now, &mut out);
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::debug!(error = %e, "engine receive error");
                std::thread::sleep(TICK);
            }
        }
    }
}

fn timer_loop(s: &Shared) {
    let mut out = Vec::new();
    let mut next_tick = Instant::now();
    // When to call the router next: its own deadline (an ARP retry or give-up) when that is sooner
    // than the tick. A deadline that appears between two calls is seen at the next tick, which is
    // sooner than any ARP deadline (RETRY and GIVE_UP are longer than TICK).
    let mut next_poll = next_tick;
    while !s.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_poll {
            let mut router = lock(&s.router);
            router.handle_timeout(now, &mut out);
            if now >= next_tick {
                next_tick = now + TICK;
            }
            next_poll = router
                .poll_timeout()
                .map_or(next_tick, |t| t.min(next_tick));
            drop(router);
            s.dispatch(now, &mut out);
        }
        let mut q = lock(&s.delayed);
        while q.0.peek().is_some_and(|d| d.0.at <= Instant::now()) {
            if let Some(Delayed(e, _)) = q.0.pop() {
                s.send_now(&e);
            }
        }
        let wait =
            q.0.peek()
                .map(|d| d.0.at.saturating_duration_since(Instant::now()))
                .unwrap_or(TICK)
                .min(next_poll.saturating_duration_since(Instant::now()))
                .max(Duration::from_micros(50));
        let _ = s.wake.wait_timeout(q, wait);
    }
}
