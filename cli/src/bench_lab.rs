//! `natscope bench lab`: what the lab costs and what its userspace NAT does to traffic.
//!
//! The numbers quoted in the issue notes and the README (how long a lab takes to come up and go
//! down, and how the userspace engine compares with the kernel's masquerade and with no NAT at
//! all) come from here, so they can be re-measured with one command instead of by hand. Every
//! measurement runs inside real labs on this machine: sender, NAT and receiver share its cores, so
//! the first line of output says what the numbers depend on.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use comfy_table::{presets as table_presets, Table};
use natscope_lab::{netns, presets, Lab, LabOptions};
use serde::Serialize;

/// Version of the JSON document; bump on any incompatible change.
pub const SCHEMA: &str = "natscope.bench-lab/v1";
/// The traffic sections run through these presets: no NAT, the userspace engine, the kernel.
const PATHS: [&str; 3] = ["open", "port-restricted-cone", "linux"];
const UDP_PORT: u16 = 9000;
const TCP_PORT: u16 = 9001;
const ECHO_PORT: u16 = 9002;
/// Read timeout of every receiving socket, so loops notice their deadline.
const POLL: Duration = Duration::from_millis(100);
/// How long a receiver keeps reading after the sender stopped (queued packets still count).
const DRAIN: Duration = Duration::from_millis(300);
const PINGS: usize = 2000;
/// Receive buffer of the UDP sink (root may exceed rmem_max only with SO_RCVBUFFORCE; socket2
/// sets SO_RCVBUF, so this is capped by net.core.rmem_max in the reflector's namespace).
const SINK_RCVBUF: usize = 16 << 20;
const WARMUP: usize = 100;

#[derive(Args, Debug)]
pub struct BenchLabArgs {
    /// Up/down runs of the 2-host preset `port-restricted-cone`.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Up/down runs of the 20-NAT topology (0 skips it).
    #[arg(long, default_value_t = 3)]
    big_runs: usize,
    /// How long each throughput test sends, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Offered load of the paced UDP test, packets/s (the flood test offers as much as one
    /// sender thread can).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

#[derive(Serialize)]
struct UpDown {
    topology: String,
    runs: usize,
    up_ms: Spread,
    down_ms: Spread,
}

#[derive(Serialize)]
struct Udp {
    path: &'static str,
    /// Offered packets/s; `None` for the flood.
    offered_per_second: Option<u64>,
    seconds: f64,
    sent: u64,
    send_errors: u64,
    received: u64,
    sent_per_second: f64,
    received_per_second: f64,
    loss_pct: f64,
    /// Userspace engine only: datagrams it forwarded LAN to WAN, which splits the loss into the
    /// part before the engine (its packet socket overran) and the part after it.
    nat_forwarded: Option<u64>,
}

#[derive(Serialize)]
struct Tcp {
    path: &'static str,
    bytes: u64,
    seconds: f64,
    mb_per_second: f64,
}

#[derive(Serialize)]
struct Latency {
    path: &'static str,
    samples: usize,
    lost: usize,
    p50_us: u64,
    p99_us: u64,
    added_p50_us: Option<i64>,
}

#[derive(Serialize)]
struct Document {
    schema: &'static str,
    caveat: String,
    lab_up_down: Vec<UpDown>,
    udp_64b: Vec<Udp>,
    tcp_bulk: Vec<Tcp>,
    udp_rtt: Vec<Latency>,
}

pub fn run(args: BenchLabArgs) -> Result<ExitCode> {
    if !(1..=100).contains(&args.runs) || args.big_runs > 20 {
        bail!("--runs must be 1..=100 and --big-runs 0..=20");
    }
    if !args.seconds.is_finite() || !(0.1..=60.0).contains(&args.seconds) {
        bail!("--seconds must be between 0.1 and 60");
    }
    netns::check_privileges()?;
    let secs = Duration::from_secs_f64(args.seconds);
    let mut doc = Document {
        schema: SCHEMA,
        caveat: caveat(),
        lab_up_down: Vec::new(),
        udp_64b: Vec::new(),
        tcp_bulk: Vec::new(),
        udp_rtt: Vec::new(),
    };
    if !args.json {
        crate::emit(&format!("# {}", doc.caveat));
    }
    doc.lab_up_down.push(up_down(
        "port-restricted-cone (2 hosts)",
        'u',
        args.runs,
        |name| {
            let topo = presets::preset("port-restricted-cone").context("no preset")?;
            Ok(Lab::up(name, topo.plan()?, options())?)
        },
    )?);
    if args.big_runs > 0 {
        doc.lab_up_down
            .push(up_down("20 NATs, 20 hosts", 'b', args.big_runs, big_lab)?);
    }
    for path in PATHS {
        let topo = presets::preset(path).with_context(|| format!("no preset {path}"))?;
        let lab = Lab::up(&lab_name('t', doc.udp_rtt.len()), topo.plan()?, options())
            .with_context(|| format!("bringing up preset {path}"))?;
        for rate in [None, Some(args.rate)] {
            doc.udp_64b.push(
                udp_flood(&lab, path, secs, rate).with_context(|| format!("UDP via {path}"))?,
            );
        }
        doc.tcp_bulk
            .push(tcp_bulk(&lab, path, secs).with_context(|| format!("TCP via {path}"))?);
        doc.udp_rtt
            .push(ping_pong(&lab, path).with_context(|| format!("RTT via {path}"))?);
        lab.down();
    }
    let open_p50 = doc.udp_rtt[0].p50_us as i64;
    for l in doc.udp_rtt.iter_mut().skip(1) {
        l.added_p50_us = Some(l.p50_us as i64 - open_p50);
    }
    crate::emit(&if args.json {
        serde_json::to_string_pretty(&doc)?
    } else {
        render(&doc)
    });
    Ok(ExitCode::SUCCESS)
}

fn caveat() -> String {
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

fn options() -> LabOptions {
    LabOptions {
        natscope_bin: std::env::current_exe().ok(),
        ..Default::default()
    }
}

/// A lab name unique to this run: "bl", a kind letter, the index, a random suffix.
fn lab_name(kind: char, index: usize) -> String {
    crate::jobs::lab_name(&format!("bl{kind}"), index)
}

fn big_lab(name: &str) -> Result<Lab> {
    let exe = std::env::current_exe().context("current executable")?;
    let router = presets::router("port-restricted-cone").context("no router config")?;
    let mut b = Lab::builder(name).reflector("stun").natscope_bin(exe);
    for i in 1..=20 {
        let nat = format!("n{i}");
        b = b
            .router(&nat, None, router.clone())
            .host(&format!("h{i}"), Some(&nat));
    }
    Ok(b.up()?)
}

/// Brings a lab up and down `runs` times, timing `Lab::up` (or the builder's `up`) and `down`.
fn up_down(
    topology: &str,
    kind: char,
    runs: usize,
    up: impl Fn(&str) -> Result<Lab>,
) -> Result<UpDown> {
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = lab_name(kind, i);
        let t = Instant::now();
        let lab = up(&name).with_context(|| format!("{topology}: lab up, run {}", i + 1))?;
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

fn sink_ip(lab: &Lab) -> Result<Ipv4Addr> {
    lab.node("stun")?
        .address()
        .context("node stun has no address")
}

fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

fn join<T>(h: thread::ScopedJoinHandle<'_, T>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a benchmark thread panicked"))
}

/// 64-byte datagrams from `h1` to a counting sink in `stun`, as fast as one thread sends them.
fn udp_flood(lab: &Lab, path: &'static str, secs: Duration, rate: Option<u64>) -> Result<Udp> {
    let dst = SocketAddr::from((sink_ip(lab)?, UDP_PORT));
    let sink = lab.node("stun")?.udp_bind(dst).context("UDP sink")?;
    sink.set_read_timeout(Some(POLL))?;
    // A deep queue, so a receiver thread that loses its core for a few ms (2 cores, 3+ busy
    // threads) does not count as loss on the path.
    let _ = socket2::SockRef::from(&sink).set_recv_buffer_size(SINK_RCVBUF);
    let tx = lab.node("h1")?.udp_bind(any_port())?;
    tx.connect(dst)?;
    let forwarded = || lab.nat_stats("nat").map(|s| s.forwarded_out);
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
fn tcp_bulk(lab: &Lab, path: &'static str, secs: Duration) -> Result<Tcp> {
    let dst = SocketAddr::from((sink_ip(lab)?, TCP_PORT));
    let listener = lab.node("stun")?.run(move || TcpListener::bind(dst))??;
    listener.set_nonblocking(true)?;
    let mut client = lab
        .node("h1")?
        .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))?
        .context("TCP connect")?;
    client.set_write_timeout(Some(POLL))?;
    let (bytes, elapsed) = thread::scope(|s| {
        let rx = s.spawn(|| -> Result<(u64, f64)> {
            let hard = Instant::now() + secs + Duration::from_secs(5);
            let mut conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < hard => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(e).context("TCP accept"),
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
                    Err(e) => return Err(e).context("TCP read"),
                }
            }
            Ok((n, start.elapsed().as_secs_f64()))
        });
        let (buf, start) = (vec![0xa5u8; 1 << 16], Instant::now());
        while start.elapsed() < secs {
            match client.write(&buf) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("TCP write"),
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
fn ping_pong(lab: &Lab, path: &'static str) -> Result<Latency> {
    let dst = SocketAddr::from((sink_ip(lab)?, ECHO_PORT));
    let echo = lab.node("stun")?.udp_bind(dst).context("UDP echo")?;
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
        bail!("no echo came back");
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

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(table_presets::ASCII_MARKDOWN)
        .set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

fn render(d: &Document) -> String {
    let ms = |s: &Spread| format!("{:.0} / {:.0} / {:.0}", s.min, s.median, s.max);
    let ud = d.lab_up_down.iter().map(|u| {
        vec![
            u.topology.clone(),
            u.runs.to_string(),
            ms(&u.up_ms),
            ms(&u.down_ms),
        ]
    });
    let udp = d.udp_64b.iter().map(|u| {
        vec![
            u.path.to_string(),
            u.offered_per_second
                .map_or("flood".into(), |r| r.to_string()),
            format!("{:.0}", u.sent_per_second),
            format!("{:.0}", u.received_per_second),
            format!("{:.1}", u.loss_pct),
            u.nat_forwarded
                .map_or("-".into(), |f| format!("{:.0}", f as f64 / u.seconds)),
            u.send_errors.to_string(),
        ]
    });
    let tcp = d.tcp_bulk.iter().map(|t| {
        vec![
            t.path.to_string(),
            format!("{:.1}", t.mb_per_second),
            format!("{:.1}", t.seconds),
        ]
    });
    let rtt = d.udp_rtt.iter().map(|l| {
        vec![
            l.path.to_string(),
            l.p50_us.to_string(),
            l.p99_us.to_string(),
            l.added_p50_us.map_or("-".into(), |a| format!("{a:+}")),
            format!("{} / {}", l.samples, l.lost),
        ]
    });
    [
        "\nLab up / down (ms, min / median / max)".to_string(),
        table(&["topology", "runs", "up", "down"], ud.collect()),
        "\nUDP 64-byte packets, h1 -> stun, one sender thread (flood, then paced)".into(),
        table(
            &[
                "path",
                "offered/s",
                "sent/s",
                "received/s",
                "loss %",
                "engine forwarded/s",
                "send errors",
            ],
            udp.collect(),
        ),
        "\nTCP bulk, h1 -> stun, 64 KiB writes".into(),
        table(&["path", "MB/s", "seconds"], tcp.collect()),
        format!("\nUDP round trip h1 <-> stun, {PINGS} after {WARMUP} warm-up (µs)"),
        table(
            &["path", "p50", "p99", "added p50 vs open", "samples / lost"],
            rtt.collect(),
        ),
    ]
    .join("\n")
}
