//! Runs a router's userspace NAT engine over real interfaces: pnet packet sockets on `wan0` and
//! `lan0` (opened from the router namespace's thread, so they belong to it), one receive thread
//! per interface feeding the sans-IO [`Router`], and one timer thread that sends delayed frames
//! and calls [`Router::poll`]. Every thread checks a stop flag at least every [`TICK`], so a lab
//! tears down in bounded time.

use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pnet::datalink::{self, Channel, DataLinkReceiver, DataLinkSender};

use crate::engine::{Emit, Port, Router, RouterAddrs};
use crate::netns::Netns;
use crate::topology::{EngineConfig, Ipv4Net};

/// Longest a thread blocks before looking at the stop flag; also the housekeeping period.
const TICK: Duration = Duration::from_millis(50);
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

type Tx = Mutex<Box<dyn DataLinkSender>>;

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
        if let Some(Err(err)) = lock(tx).send_to(&e.frame, None) {
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

/// One interface's packet socket halves and its MAC.
type Halves = (Box<dyn DataLinkSender>, Box<dyn DataLinkReceiver>, [u8; 6]);

struct Opened {
    wan: Halves,
    lan: Halves,
}

fn open(name: &'static str) -> Result<Halves, DriverError> {
    let iface = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .ok_or(DriverError::NoInterface(name))?;
    let mac = iface.mac.ok_or(DriverError::NoMac(name))?;
    let config = datalink::Config {
        read_timeout: Some(TICK),
        write_buffer_size: 65536,
        read_buffer_size: 65536,
        ..Default::default()
    };
    match datalink::channel(&iface, config) {
        Ok(Channel::Ethernet(tx, rx)) => Ok((tx, rx, mac.octets())),
        Ok(_) => Err(DriverError::NotEthernet(name)),
        Err(e) => Err(DriverError::Socket(name, e)),
    }
}

/// Starts the engine of the router living in `ns`.
pub fn start(
    ns: &Netns,
    config: EngineConfig,
    lan: Ipv4Net,
    external: Vec<Ipv4Addr>,
    wan_gateway: Option<Ipv4Addr>,
) -> Result<EngineHandle, DriverError> {
    let opened = ns.run(|| -> Result<Opened, DriverError> {
        Ok(Opened {
            wan: open(WAN)?,
            lan: open(LAN)?,
        })
    })??;
    let Opened { wan, lan: lan_ch } = opened;
    let addrs = RouterAddrs {
        wan_mac: wan.2,
        lan_mac: lan_ch.2,
        lan,
        external,
        wan_gateway,
    };
    let shared = Arc::new(Shared {
        router: Mutex::new(Router::new(config, addrs)),
        wan_tx: Mutex::new(wan.0),
        lan_tx: Mutex::new(lan_ch.0),
        delayed: Mutex::new((BinaryHeap::new(), 0)),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    let mut threads = Vec::new();
    for (port, rx, label) in [(Port::Wan, wan.1, "wan"), (Port::Lan, lan_ch.1, "lan")] {
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("nat-rx-{label}"))
            .spawn(move || receive_loop(&s, port, rx))
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
    Ok(EngineHandle { shared, threads })
}

fn receive_loop(s: &Shared, port: Port, mut rx: Box<dyn DataLinkReceiver>) {
    let mut out = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        match rx.next() {
            Ok(frame) => {
                let now = Instant::now();
                lock(&s.router).handle(now, port, frame, &mut out);
                s.dispatch(now, &mut out);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!(error = %e, "engine receive error");
                std::thread::sleep(TICK);
            }
        }
    }
}

fn timer_loop(s: &Shared) {
    let mut out = Vec::new();
    let mut next_poll = Instant::now();
    while !s.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_poll {
            lock(&s.router).poll(now, &mut out);
            s.dispatch(now, &mut out);
            next_poll = now + TICK;
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
