//! `natscope lab grid`: every pair of presets (same-preset pairs included), each peer behind its
//! own NAT, over UDP and TCP: a lab per cell with `natscope punch serve` on the reflector node,
//! `punch listen` behind one NAT and `punch connect` behind the other, real processes all. Each
//! outcome is compared with the one RFC 4787 reasoning predicts (`natscope_lab::grid`).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_lab::grid::{self, Outcome, Transport};
use natscope_lab::{presets, Lab, LabOptions};
use serde::Serialize;
use serde_json::Value;

use crate::{emit, jobs};

/// The rendezvous server's address: the reflector's primary address, natscope punch's port.
const SERVER: &str = "198.51.100.1:3490";
/// Bounds on each step of a cell; a cell never takes longer than their sum.
const READY: Duration = Duration::from_secs(5);
const CONNECT_LIMIT: Duration = Duration::from_secs(20);

#[derive(Args)]
pub struct GridArgs {
    /// Comma-separated presets (default: full-cone, restricted-cone, port-restricted-cone,
    /// symmetric, symmetric-sequential, cgnat).
    #[arg(long, value_delimiter = ',')]
    presets: Vec<String>,
    /// Comma-separated transports.
    #[arg(long, value_delimiter = ',', default_values_t = ["udp".to_string(), "tcp".to_string()])]
    transport: Vec<String>,
    /// Cells running at the same time.
    #[arg(long, default_value_t = 6)]
    jobs: usize,
    /// Print one `natscope.grid/v1` JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Cell {
    a: String,
    b: String,
    transport: Transport,
    expected: Outcome,
    observed: Option<Outcome>,
    time_to_direct_ms: Option<f64>,
    messages_sent: u64,
    messages_echoed: u64,
    /// The expected outcome's reason (RFC 4787 / RFC 5382).
    reason: String,
    pass: bool,
    error: Option<String>,
    /// stderr of the two peers, kept for cells that did not go direct.
    diagnostics: Option<String>,
    /// The connector's full `natscope.punch/v1` report, kept for cells that did not pass.
    report: Option<Value>,
    duration_ms: f64,
}

#[derive(Serialize)]
struct Document {
    schema: &'static str,
    cells: Vec<Cell>,
    pass: bool,
    duration_ms: f64,
}

pub fn run(a: GridArgs) -> Result<ExitCode> {
    let names: Vec<String> = if a.presets.is_empty() {
        grid::DEFAULT_PRESETS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        a.presets.clone()
    };
    for n in &names {
        if grid::pair_topology(n, n).is_none() {
            bail!(
                "unknown preset `{n}`; presets: {}",
                presets::names().join(", ")
            );
        }
    }
    let mut transports = Vec::new();
    for t in &a.transport {
        transports.push(match t.as_str() {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            other => bail!("unknown transport `{other}` (udp, tcp)"),
        });
    }
    let exe = jobs::prepare(a.jobs)?;
    let mut work = Vec::new();
    for t in &transports {
        for (i, x) in names.iter().enumerate() {
            for y in &names[i..] {
                work.push((x.clone(), y.clone(), *t));
            }
        }
    }
    let start = Instant::now();
    let cells = jobs::run_parallel(&work, a.jobs, |i, (x, y, t)| run_cell(i, x, y, *t, &exe))?;
    let errors = cells.iter().any(|c| c.error.is_some());
    let doc = Document {
        schema: "natscope.grid/v1",
        pass: cells.iter().all(|c| c.pass),
        cells,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
    };
    if a.json {
        emit(&serde_json::to_string_pretty(&doc)?);
    } else {
        emit(&render(&doc, &names, &transports));
    }
    Ok(jobs::exit_code(errors, doc.pass))
}

fn run_cell(index: usize, a: &str, b: &str, t: Transport, exe: &std::path::Path) -> Cell {
    let t0 = Instant::now();
    let (expected, reason) =
        grid::expected(a, b, t).unwrap_or((Outcome::Failed, "unknown preset".into()));
    let result = punch_in_lab(index, a, b, t, exe);
    let mut cell = Cell {
        a: a.into(),
        b: b.into(),
        transport: t,
        expected,
        observed: None,
        time_to_direct_ms: None,
        messages_sent: 0,
        messages_echoed: 0,
        reason,
        pass: false,
        error: None,
        diagnostics: None,
        report: None,
        duration_ms: 0.0,
    };
    match result {
        Ok(report) => {
            cell.observed = match report["path"].as_str() {
                Some("direct") => Some(Outcome::Direct),
                Some("relayed") => Some(Outcome::Relayed),
                Some("failed") => Some(Outcome::Failed),
                _ => None,
            };
            cell.time_to_direct_ms = report["time_to_direct_ms"].as_f64();
            cell.messages_sent = report["messages_sent"].as_u64().unwrap_or(0);
            cell.messages_echoed = report["messages_echoed"].as_u64().unwrap_or(0);
            // A connected pair must also have delivered every message, once each, in order.
            let delivered = cell.observed == Some(Outcome::Failed)
                || (cell.messages_echoed == cell.messages_sent
                    && cell.messages_sent > 0
                    && report["in_order"] == true);
            cell.pass = cell.observed == Some(expected) && delivered;
            cell.diagnostics = report["diagnostics"].as_str().map(str::to_string);
            if !cell.pass {
                cell.report = Some(report.clone());
            }
            if !delivered {
                cell.reason = format!(
                    "{} (data: {}/{} echoed, in order: {})",
                    cell.reason, cell.messages_echoed, cell.messages_sent, report["in_order"]
                );
            }
        }
        Err(e) => cell.error = Some(crate::error_line(&e)),
    }
    cell.duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
    cell
}

/// A child that is killed (by PID) and reaped when dropped.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn punch_in_lab(
    index: usize,
    a: &str,
    b: &str,
    t: Transport,
    exe: &std::path::Path,
) -> Result<Value> {
    let topo = grid::pair_topology(a, b).ok_or_else(|| anyhow!("no pair topology"))?;
    let name = jobs::lab_name("gd", index);
    let lab = Lab::up(
        &name,
        topo.plan()?,
        LabOptions {
            natscope_bin: Some(exe.to_path_buf()),
            ..Default::default()
        },
    )
    .with_context(|| format!("lab for {a} + {b}"))?;
    let tcp: &[&str] = if t == Transport::Tcp { &["--tcp"] } else { &[] };
    let spawn = |node: &str, args: &[&str], stdout: Stdio| -> Result<Reaped> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        Ok(Reaped(
            lab.node(node)?
                .spawn(cmd)
                .with_context(|| format!("starting natscope in {node}"))?,
        ))
    };
    let _server = spawn(
        "stun",
        &["punch", "serve", "--listen", SERVER],
        Stdio::null(),
    )?;
    // The listener's first registration must not race the server's bind: a SYN that arrives first
    // is answered with RST ("connection refused"), which is what the grid saw in about one run in
    // three before this wait. Ready once the server accepts TCP on its address.
    let server: std::net::SocketAddr = SERVER.parse()?;
    let ready = lab.node("stun")?.run(move || {
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&server, Duration::from_millis(100)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })?;
    if !ready {
        bail!("punch serve did not accept connections within {READY:?}");
    }
    let mut listen_args = vec!["punch", "listen", "--id", "b", "--via", SERVER, "--json"];
    listen_args.extend(["--count", "1", "--timeout", "30"]);
    listen_args.extend(tcp);
    let mut listener = spawn("b", &listen_args, Stdio::piped())?;
    if let Err(e) = wait_registered(&mut listener.0) {
        let mut server = _server;
        let state = match server.0.try_wait() {
            Ok(Some(st)) => format!("the server had exited ({st})"),
            Ok(None) => "the server was running".to_string(),
            Err(e) => format!("server state unknown: {e}"),
        };
        let nats: Vec<String> = lab
            .nodes()
            .iter()
            .filter_map(|n| {
                let st = lab.nat_stats(n.name())?;
                Some(format!(
                    "{}: {}",
                    n.name(),
                    serde_json::to_string(&st).ok()?
                ))
            })
            .collect();
        let snmp = lab.node("stun")?.run(|| {
            let s = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
            let n = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
            let tcp: Vec<&str> = s.lines().filter(|l| l.starts_with("Tcp:")).collect();
            let ext: Vec<&str> = n.lines().filter(|l| l.starts_with("TcpExt:")).collect();
            let pair = |v: &[&str]| -> String {
                if v.len() < 2 {
                    return String::new();
                }
                v[0].split_whitespace()
                    .zip(v[1].split_whitespace())
                    .filter(|(_, val)| *val != "0")
                    .map(|(k, val)| format!("{k}={val}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!("{} {}", pair(&tcp), pair(&ext))
        })?;
        return Err(e.context(format!(
            "{}; {state}; server: {}; nat counters: {}; stun tcp: {snmp}",
            stderr_of(listener),
            stderr_of(server),
            nats.join(" ")
        )));
    }
    let mut connect_args = vec![
        "punch",
        "connect",
        "b",
        "--via",
        SERVER,
        "--json",
        "--timeout",
        "8",
    ];
    connect_args.extend(tcp);
    let mut connector = spawn("a", &connect_args, Stdio::piped())?;
    let Some((_, stdout)) = jobs::output_within(&mut connector.0, CONNECT_LIMIT)? else {
        let why = format!("connector: {}", stderr_of(connector));
        bail!("punch connect did not finish within {CONNECT_LIMIT:?} ({why})");
    };
    let diagnostics = format!(
        "connector: {}; listener: {}",
        stderr_of(connector),
        stderr_of(listener)
    );
    drop(_server);
    lab.down();
    let mut report: Value = serde_json::from_slice(&stdout).with_context(|| {
        format!(
            "punch connect printed no report: {} ({diagnostics})",
            String::from_utf8_lossy(&stdout).trim()
        )
    })?;
    if report["path"] != "direct" {
        report["diagnostics"] = Value::String(diagnostics);
    }
    Ok(report)
}

/// Kills the process and returns the last lines it wrote to stderr.
fn stderr_of(mut p: Reaped) -> String {
    let _ = p.0.kill();
    let mut text = String::new();
    if let Some(mut e) = p.0.stderr.take() {
        let _ = e.by_ref().take(64 * 1024).read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    if lines.is_empty() {
        "(nothing on stderr)".into()
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// Reads the listener's JSON lines until it reports its registration (bounded by [`READY`]).
fn wait_registered(child: &mut Child) -> Result<()> {
    let out = child.stdout.take().context("listener stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if line.contains("registered") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(READY)
        .map_err(|_| anyhow!("punch listen did not register within {READY:?}"))
}

fn mark(c: &Cell) -> String {
    let o = match c.observed {
        Some(Outcome::Direct) => match c.time_to_direct_ms {
            Some(ms) => format!("direct {ms:.0} ms"),
            None => "direct".into(),
        },
        Some(Outcome::Relayed) => "relayed".into(),
        Some(Outcome::Failed) => "failed".into(),
        None => "error".into(),
    };
    if c.pass {
        format!("✓ {o}")
    } else {
        let want = serde_json::to_value(c.expected)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        format!("✗ {o} (want {want})")
    }
}

fn render(doc: &Document, names: &[String], transports: &[Transport]) -> String {
    let mut parts = Vec::new();
    for t in transports {
        let mut table = Table::new();
        let mut header = vec![format!("{t:?}").to_lowercase()];
        header.extend(names.iter().cloned());
        table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
        for x in names {
            let mut row = vec![x.clone()];
            for y in names {
                let c = doc.cells.iter().find(|c| {
                    c.transport == *t && ((c.a == *x && c.b == *y) || (c.a == *y && c.b == *x))
                });
                row.push(c.map(mark).unwrap_or_default());
            }
            table.add_row(row);
        }
        parts.push(table.to_string());
    }
    for c in doc.cells.iter().filter(|c| !c.pass) {
        parts.push(format!(
            "{} ↔ {} ({:?}): {}{}",
            c.a,
            c.b,
            c.transport,
            c.reason,
            c.error
                .as_deref()
                .map(|e| format!("; error: {e}"))
                .unwrap_or_default()
        ));
    }
    let passed = doc.cells.iter().filter(|c| c.pass).count();
    parts.push(format!(
        "{passed}/{} cells as expected in {:.1} s (expected outcomes and reasons: docs/lab.md, \"Grid\")",
        doc.cells.len(),
        doc.duration_ms / 1000.0
    ));
    parts.join("\n")
}
