//! Traffic through a lab, for `natscope bench lab`: how long labs take to come up and go down,
//! and what a path (no NAT, the userspace engine, the kernel's masquerade) does to a UDP flood, a
//! TCP bulk transfer and UDP round trips. Each generator runs its sender in `h1` and its receiver
//! in `stun` on this machine's cores, which is why [`caveat`] comes first in any report.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Serialize;

use crate::netns::NetnsError;
use crate::{jobs, presets, Lab, LabError, LabOptions};

const UDP_PORT: u16 = 9000;
const TCP_PORT: u16 = 9001;
const ECHO_PORT: u16 = 9002;
/// Read timeout of every receiving socket, so loops notice their deadline.
const POLL: Duration = Duration::from_millis(100);
/// How long a receiver keeps reading after the sender stopped (queued packets still count).
const DRAIN: Duration = Duration::from_millis(300);
/// Timed round trips of [`ping_pong`].
pub const PINGS: usize = 2000;
/// Round trips before those, not timed.
pub const WARMUP: usize = 100;
/// Receive buffer of the UDP sink (root may exceed rmem_max only with SO_RCVBUFFORCE; socket2
/// sets SO_RCVBUF, so this is capped by net.core.rmem_max in the reflector's namespace).
const SINK_RCVBUF: usize = 16 << 20;

/// Why a measurement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Lab(#[from] LabError),
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Socket(#[from] std::io::Error),
    #[error("{topology}: lab up, run {run}: {source}")]
    Up {
        topology: String,
        run: usize,
        source: Box<BenchError>,
    },
    #[error("no preset {0}")]
    NoPreset(&'static str),
    #[error("node stun has no address")]
    NoAddress,
    #[error("no echo came back")]
    NoEcho,
    #[error("a benchmark thread panicked")]
    Panicked,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

#[derive(Serialize, JsonSchema)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

#[derive(Serialize, JsonSchema)]
pub struct UpDown {
    pub topology: String,
    pub runs: usize,
    pub up_ms: Spread,
    pub down_ms: Spread,
}

#[derive(Serialize, JsonSchema)]
pub struct Udp {
    pub path: &'static str,
    /// Offered packets/s; `None` for the flood.
    pub offered_per_second: Option<u64>,
    pub seconds: f64,
    pub sent: u64,
    pub send_errors: u64,
    pub received: u64,
    pub sent_per_second: f64,
    pub received_per_second: f64,
    pub loss_pct: f64,
    /// Userspace engine only: datagrams it forwarded LAN to WAN, which splits the loss into the
    /// part before the engine (its packet socket overran) and the part after it.
    pub nat_forwarded: Option<u64>,
}

#[derive(Serialize, JsonSchema)]
pub struct Tcp {
    pub path: &'static str,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_second: f64,
}

#[derive(Serialize, JsonSchema)]
pub struct Latency {
    pub path: &'static str,
    pub samples: usize,
    pub lost: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub added_p50_us: Option<i64>,
}

/// The `schema` of `natscope bench lab --json`.
pub const SCHEMA: &str = "natscope.bench-lab/v1";

/// The `natscope bench lab --json` document (`natscope.bench-lab/v1`,
/// docs/schema/bench-lab.v1.json).
#[derive(Serialize, JsonSchema)]
pub struct BenchLabDocument {
    /// Always [`SCHEMA`].
    #[schemars(extend("const" = SCHEMA))]
    pub schema: &'static str,
    /// The version of natscope that wrote the document.
    pub natscope_version: String,
    /// What the numbers depend on ([`caveat`]).
    pub caveat: String,
    /// Lab up and down times, ms, per topology.
    pub lab_up_down: Vec<UpDown>,
    /// 64-byte UDP from h1 to stun, per path: a flood, then paced.
    pub udp_64b: Vec<Udp>,
    /// TCP bulk transfer from h1 to stun, per path.
    pub tcp_bulk: Vec<Tcp>,
    /// UDP round trips between h1 and stun, per path.
    pub udp_rtt: Vec<Latency>,
}

impl BenchLabDocument {
    /// An empty document whose numbers depend on `caveat`.
    pub fn new(caveat: String) -> Self {
        Self {
            schema: SCHEMA,
            natscope_version: natscope_core::document::version(),
            caveat,
            lab_up_down: Vec::new(),
            udp_64b: Vec::new(),
            tcp_bulk: Vec::new(),
            udp_rtt: Vec::new(),
        }
    }
}

/// What the numbers depend on: the cores, the CPU and the load they were measured under.
pub fn caveat() -> String {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cores} cores ({cpu}) shared by sender, NAT and receiver, load average {}; \
         every number is this machine's, not the NAT's alone",
        load.join(" ")
    )
}

/// A lab name unique to this run: "bl", a kind letter, the index, a random suffix.
pub fn lab_name(kind: char, index: usize) -> String {
    jobs::lab_name(&format!("bl{kind}"), index)
}

/// A preset's lab.
pub fn preset_lab(
    name: &str,
    preset: &'static str,
    options: LabOptions,
) -> Result<Lab, BenchError> {
    let topo = presets::preset(preset).ok_or(BenchError::NoPreset(preset))?;
    Ok(Lab::up(
        name,
        topo.plan().map_err(LabError::from)?,
        options,
    )?)
}

/// Twenty port-restricted cone NATs with a host each, and a reflector.
pub fn big_lab(name: &str, options: LabOptions) -> Result<Lab, BenchError> {
    let router = presets::router("port-restricted-cone")
        .ok_or(BenchError::NoPreset("port-restricted-cone"))?;
    let mut b = Lab::builder(name).reflector("stun");
    if let Some(exe) = options.natscope_bin {
        b = b.natscope_bin(exe);
    }
    for i in 1..=20 {
        let nat = format!("n{i}");
        b = b
            .router(&nat, None, router.clone())
            .host(&format!("h{i}"), Some(&nat));
    }
    Ok(b.up()?)
}

/// Brings a lab up and down `runs` times, timing `Lab::up` (or the builder's `up`) and `down`.
pub fn up_down(
    topology: &str,
    kind: char,
    runs: usize,
    up: impl Fn(&str) -> Result<Lab, BenchError>,
) -> Result<UpDown, BenchError> {
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = lab_name(kind, i);
        let t = Instant::now();
        let lab = up(&name).map_err(|e| BenchError::Up {
            topology: topology.into(),
            run: i + 1,
            source: Box::new(e),
        })?;
        ups.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        lab.down();
        downs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(UpDown {
        topology: topology.into(),
        runs,
        up_ms: spread(ups),
        down_ms: spread(downs),
    })
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        min: v.first().copied().unwrap_or(0.0),
        median: v.get(v.len() / 2).copied().unwrap_or(0.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

fn sink_ip(lab: &Lab) -> Result<Ipv4Addr, BenchError> {
    lab.node("stun")?.address().ok_or(BenchError::NoAddress)
}

fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

fn join<T>(h: thread::ScopedJoinHandle<'_, T>) -> Result<T, BenchError> {
    h.join().map_err(|_| BenchError::Panicked)
}

/// 64-byte datagrams from `h1` to a counting sink in `stun`, as fast as one thread sends them.
pub fn udp_flood(
    lab: &Lab,
    path: &'static str,
    secs: Duration,
    rate: Option<u64>,
) -> Result<Udp, BenchError> {
    udp_flood_over(lab, path, secs, rate, false)
}

/// [`udp_flood`] over IPv6 (`ipv6`: between the first IPv6 addresses of `h1` and `stun`), so the
/// engine's two families can be compared on one lab.
pub fn udp_flood_over(
    lab: &Lab,
    path: &'static str,
    secs: Duration,
    rate: Option<u64>,
    ipv6: bool,
) -> Result<Udp, BenchError> {
    let first6 = |node: &str| -> Result<std::net::IpAddr, BenchError> {
        let n = lab.node(node)?;
        let a = n.plan().uplink6.first().ok_or(BenchError::NoAddress)?;
        Ok(std::net::IpAddr::V6(a.addr))
    };
    let (dst, src) = if ipv6 {
        (
            SocketAddr::new(first6("stun")?, UDP_PORT),
            SocketAddr::new(first6("h1")?, 0),
        )
    } else {
        (SocketAddr::from((sink_ip(lab)?, UDP_PORT)), any_port())
    };
    let sink = lab.node("stun")?.udp_bind(dst).map_err(io("UDP sink"))?;
    sink.set_read_timeout(Some(POLL))?;
    // A deep queue, so a receiver thread that loses its core for a few ms (2 cores, 3+ busy
    // threads) does not count as loss on the path.
    let _ = socket2::SockRef::from(&sink).set_recv_buffer_size(SINK_RCVBUF);
    let tx = lab.node("h1")?.udp_bind(src)?;
    tx.connect(dst)?;
    let forwarded = || {
        lab.nat_stats("nat")
            .map(|s| s.forwarded_out + s.ipv6.forwarded_out)
    };
    let before = forwarded();
    let done = AtomicBool::new(false);
    let (sent, errors, elapsed, received) = thread::scope(|s| {
        let rx = s.spawn(|| {
            let (mut buf, mut n) = ([0u8; 2048], 0u64);
            let hard = Instant::now() + secs + DRAIN + Duration::from_secs(2);
            let mut drain_end = None;
            while Instant::now() < hard && drain_end.is_none_or(|d| Instant::now() < d) {
                if drain_end.is_none() && done.load(Relaxed) {
                    drain_end = Some(Instant::now() + DRAIN);
                }
                n += u64::from(sink.recv(&mut buf).is_ok());
            }
            n
        });
        let (payload, start) = ([0x5au8; 64], Instant::now());
        let (mut sent, mut errors) = (0u64, 0u64);
        while start.elapsed() < secs {
            if let Some(r) = rate.filter(|r| *r > 0) {
                // Paced: bursts of 32 on a schedule of `r` packets/s.
                let due = start + Duration::from_secs_f64(sent as f64 / r as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
            }
            for _ in 0..32 {
                match tx.send(&payload) {
                    Ok(_) => sent += 1,
                    Err(_) => errors += 1,
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        done.store(true, Relaxed);
        join(rx).map(|r| (sent, errors, elapsed, r))
    })?;
    Ok(Udp {
        path,
        offered_per_second: rate,
        seconds: elapsed,
        sent,
        send_errors: errors,
        received,
        sent_per_second: sent as f64 / elapsed,
        received_per_second: received as f64 / elapsed,
        nat_forwarded: forwarded().zip(before).map(|(a, b)| a.saturating_sub(b)),
        loss_pct: if sent == 0 {
            0.0
        } else {
            100.0 * (1.0 - received as f64 / sent as f64)
        },
    })
}

/// `h1` writes 64 KiB buffers to a discarding reader in `stun`; the reader's count is the result.
pub fn tcp_bulk(lab: &Lab, path: &'static str, secs: Duration) -> Result<Tcp, BenchError> {
    let dst = SocketAddr::from((sink_ip(lab)?, TCP_PORT));
    let listener = lab.node("stun")?.run(move || TcpListener::bind(dst))??;
    listener.set_nonblocking(true)?;
    let mut client = lab
        .node("h1")?
        .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))?
        .map_err(io("TCP connect"))?;
    client.set_write_timeout(Some(POLL))?;
    let (bytes, elapsed) = thread::scope(|s| {
        let rx = s.spawn(|| -> Result<(u64, f64), BenchError> {
            let hard = Instant::now() + secs + Duration::from_secs(5);
            let mut conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < hard => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(io("TCP accept")(e)),
                }
            };
            conn.set_nonblocking(false)?;
            conn.set_read_timeout(Some(POLL))?;
            let (mut buf, mut n, start) = (vec![0u8; 1 << 16], 0u64, Instant::now());
            while Instant::now() < hard {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(io("TCP read")(e)),
                }
            }
            Ok((n, start.elapsed().as_secs_f64()))
        });
        let (buf, start) = (vec![0xa5u8; 1 << 16], Instant::now());
        while start.elapsed() < secs {
            match client.write(&buf) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(io("TCP write")(e)),
            }
        }
        // Ends the reader's loop with EOF once everything written has arrived.
        client.shutdown(std::net::Shutdown::Write)?;
        join(rx)?
    })?;
    Ok(Tcp {
        path,
        bytes,
        seconds: elapsed,
        mb_per_second: bytes as f64 / 1e6 / elapsed,
    })
}

/// UDP ping-pong between `h1` and an echo socket in `stun`: round-trip times in µs.
pub fn ping_pong(lab: &Lab, path: &'static str) -> Result<Latency, BenchError> {
    let dst = SocketAddr::from((sink_ip(lab)?, ECHO_PORT));
    let echo = lab.node("stun")?.udp_bind(dst).map_err(io("UDP echo"))?;
    echo.set_read_timeout(Some(POLL))?;
    let client: UdpSocket = lab.node("h1")?.udp_bind(any_port())?;
    client.connect(dst)?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    let done = AtomicBool::new(false);
    let (mut rtts, lost) = thread::scope(|s| {
        let e = s.spawn(|| {
            let mut buf = [0u8; 64];
            let hard = Instant::now() + Duration::from_secs(60);
            while !done.load(Relaxed) && Instant::now() < hard {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        });
        let (mut rtts, mut lost, mut buf) = (Vec::with_capacity(PINGS), 0, [0u8; 64]);
        let deadline = Instant::now() + Duration::from_secs(30);
        for seq in 0..(WARMUP + PINGS) as u64 {
            if Instant::now() > deadline {
                break;
            }
            let t = Instant::now();
            if client.send(&seq.to_be_bytes()).is_err() {
                lost += 1;
                continue;
            }
            // Skips stale answers to earlier pings that timed out.
            let ok = loop {
                match client.recv(&mut buf) {
                    Ok(8) if buf[..8] == seq.to_be_bytes() => break true,
                    Ok(_) => continue,
                    Err(_) => break false,
                }
            };
            match (ok, seq as usize >= WARMUP) {
                (true, true) => rtts.push(t.elapsed().as_micros() as u64),
                (false, _) => lost += 1,
                _ => {}
            }
        }
        done.store(true, Relaxed);
        join(e).map(|()| (rtts, lost))
    })?;
    if rtts.is_empty() {
        return Err(BenchError::NoEcho);
    }
    rtts.sort_unstable();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    Ok(Latency {
        path,
        samples: rtts.len(),
        lost,
        p50_us: pct(50),
        p99_us: pct(99),
        added_p50_us: None,
    })
}
