//! `natscope lab`: bring labs up and down, look inside them, run programs in their nodes.
//!
//! `lab up` starts a detached supervisor (`natscope lab serve`, hidden) that owns the lab — its
//! namespaces, NAT engines and reflectors — until `lab down` sends it SIGTERM. The supervisor
//! answers `lab status` / `lab nat-table` over a Unix socket next to the lab's record.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_lab::registry::{control_path, log_path};
use natscope_lab::topology::{Plan, Topology};
use natscope_lab::{config, netns, presets, registry, Lab, LabOptions};
use serde_json::{json, Value};

use crate::emit;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Bring a lab up from a preset or a TOML topology file and leave it running.
    Up(UpArgs),
    /// List running labs: nodes, roles, addresses, NAT settings, mapping counts.
    Status(StatusArgs),
    /// Print a NAT node's live mappings.
    NatTable(NatTableArgs),
    /// Run a program inside a lab node, stdio attached, exit status passed through.
    Exec(ExecArgs),
    /// Tear a lab down (or every lab, stale ones included, with --all).
    Down(DownArgs),
    /// For every preset, run `natscope probe` behind its NAT and compare each verdict with the
    /// preset's configured behavior.
    Matrix(crate::matrix::MatrixArgs),
    /// Every pair of presets, each peer behind its own NAT: does `natscope punch` connect them
    /// directly, through the relay, or not at all — and is that what RFC 4787 predicts?
    Grid(crate::grid::GridArgs),
    /// The supervisor `lab up` starts (internal).
    #[command(hide = true)]
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct UpArgs {
    /// A preset name (see `natscope lab up --list`) or a topology file ending in .toml.
    #[arg(required_unless_present = "list")]
    source: Option<String>,
    /// The lab's name (1-10 characters a-z, 0-9); namespaces are nsc-NAME-NODE.
    #[arg(long, default_value = "lab")]
    name: String,
    /// List the presets and exit.
    #[arg(long)]
    list: bool,
    /// Print the lab's status as JSON once it is up.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Only this lab.
    name: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct NatTableArgs {
    /// The lab (optional when exactly one lab is running).
    #[arg(long = "lab")]
    lab: Option<String>,
    /// The NAT node.
    node: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    /// The lab (optional when exactly one lab is running).
    #[arg(long = "lab")]
    lab: Option<String>,
    /// The node to run in.
    node: String,
    /// The program and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct DownArgs {
    /// The lab to remove.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    name: Option<String>,
    /// Remove every lab, including stale namespaces and processes left by a crash.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    source: String,
    #[arg(long)]
    name: String,
}

pub fn run(cmd: LabCommand) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up(a) => up(a),
        LabCommand::Status(a) => status(a),
        LabCommand::NatTable(a) => nat_table(a),
        LabCommand::Exec(a) => exec(a),
        LabCommand::Down(a) => down(a),
        LabCommand::Matrix(a) => crate::matrix::run(a),
        LabCommand::Grid(a) => crate::grid::run(a),
        LabCommand::Serve(a) => serve(a),
    }
}

/// A preset name or a TOML file, validated and planned (nothing is created yet).
fn load_plan(source: &str) -> Result<Plan> {
    if source.ends_with(".toml") || source.contains('/') {
        return config::load_and_plan(Path::new(source)).map_err(|e| anyhow!("{e}"));
    }
    let topology: Topology = presets::preset(source).ok_or_else(|| {
        anyhow!(
            "unknown preset `{source}`; presets: {} (or give a .toml file)",
            presets::names().join(", ")
        )
    })?;
    topology.plan().map_err(|e| anyhow!("{source}: {e}"))
}

fn up(a: UpArgs) -> Result<ExitCode> {
    if a.list {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED)
            .set_header(["preset", "behavior"]);
        for p in presets::infos() {
            t.add_row([p.name, p.summary]);
        }
        emit(&t.to_string());
        return Ok(ExitCode::SUCCESS);
    }
    let source = a.source.unwrap_or_default();
    // Validate here so a bad name, file or preset is reported by this process, before anything
    // exists (the supervisor's log below would otherwise be left behind, or, for a lab already
    // running, truncated under it).
    natscope_lab::check_lab_name(&a.name).map_err(|e| anyhow!("{e}"))?;
    load_plan(&source)?;
    netns::check_privileges().map_err(|e| anyhow!("{e}"))?;
    if registry::read(&a.name).is_some_and(|r| registry::owner_alive(&r)) {
        bail!(
            "a lab named `{0}` is already running (natscope lab down {0})",
            a.name
        );
    }
    let exe = std::env::current_exe().context("cannot find the natscope executable")?;
    std::fs::create_dir_all(registry::DIR)
        .with_context(|| format!("cannot create {} (run natscope lab as root)", registry::DIR))?;
    // Appended to, never truncated: a lab of this name that came up meanwhile keeps its log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(&a.name))
        .with_context(|| format!("cannot create {}", log_path(&a.name).display()))?;
    let mut child = Command::new(&exe)
        .args(["lab", "serve", &source, "--name", &a.name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal later must not take the lab down.
        .process_group(0)
        .spawn()
        .context("cannot start the lab supervisor")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out)
            .take(64 * 1024)
            .read_line(&mut line)
            .context("reading the supervisor's answer")?;
    }
    let line = line.trim();
    if line != "ready" {
        let _ = child.wait();
        let msg = line.strip_prefix("error: ").unwrap_or(line);
        if msg.is_empty() {
            bail!(
                "the lab supervisor exited without a word; see {}",
                log_path(&a.name).display()
            );
        }
        // The error is in `msg`; no lab, so no log to keep.
        if registry::read(&a.name).is_none() {
            let _ = std::fs::remove_file(log_path(&a.name));
        }
        bail!("{msg}");
    }
    // The supervisor lives on; this process leaves it be (it is not our child to reap).
    std::mem::forget(child);
    let rec = registry::read(&a.name).ok_or_else(|| anyhow!("lab {} vanished", a.name))?;
    if a.json {
        emit(&serde_json::to_string_pretty(&status_doc(&[rec]))?);
    } else {
        emit(&render_lab(&rec, &query_stats(&rec)));
        emit(&format!(
            "lab {n} is up; run programs with `natscope lab exec --lab {n} NODE -- CMD`, stop it with `natscope lab down {n}`",
            n = a.name
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The supervisor: owns the lab until SIGTERM/SIGINT/SIGHUP, answers the control socket.
fn serve(a: ServeArgs) -> Result<ExitCode> {
    let say = |s: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}").and_then(|_| out.flush());
    };
    let plan = match load_plan(&a.source) {
        Ok(p) => p,
        Err(e) => {
            say(&format!("error: {}", crate::error_line(&e)));
            return Ok(ExitCode::from(2));
        }
    };
    let control = control_path(&a.name);
    let _ = std::fs::remove_file(&control);
    let options = LabOptions {
        natscope_bin: std::env::current_exe().ok(),
        supervisor: true,
        control: Some(control.clone()),
    };
    let lab = match Lab::up(&a.name, plan, options) {
        Ok(l) => l,
        Err(e) => {
            say(&format!("error: {e}"));
            return Ok(ExitCode::from(2));
        }
    };
    let listener = UnixListener::bind(&control)
        .with_context(|| format!("cannot listen on {}", control.display()))?;
    listener.set_nonblocking(true)?;
    let signals = signal_flag()?;
    say("ready");
    while !signals.load(std::sync::atomic::Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => answer(&lab, stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&control);
    // Also removes the control socket and this supervisor's log.
    lab.down();
    Ok(ExitCode::SUCCESS)
}

/// A flag set by SIGTERM, SIGINT or SIGHUP (tokio's signal handling on a helper runtime).
fn signal_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            let sigs = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            );
            let (Ok(mut t), Ok(mut i), Ok(mut h)) = sigs else {
                let _ = ready_tx.send(false);
                return;
            };
            let _ = ready_tx.send(true);
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
                _ = h.recv() => {}
            }
            f.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
    if ready_rx.recv().unwrap_or(false) {
        Ok(flag)
    } else {
        bail!("cannot install signal handlers")
    }
}

/// One request line, one JSON answer line.
fn answer(lab: &Lab, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream).take(4096);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut words = line.split_whitespace();
    let reply = match (words.next(), words.next()) {
        (Some("stats"), None) => {
            let mut nodes = serde_json::Map::new();
            for n in lab.nodes() {
                if let (Some(table), Some(stats)) =
                    (lab.nat_table(n.name()), lab.nat_stats(n.name()))
                {
                    nodes.insert(
                        n.name().to_string(),
                        json!({"mappings": table.len(), "counters": stats}),
                    );
                }
            }
            Value::Object(nodes)
        }
        (Some("nat-table"), Some(node)) => match lab.nat_table(node) {
            Some(rows) => json!({ "mappings": rows }),
            None => {
                json!({ "error": format!("`{node}` is not a userspace nat node of lab {}", lab.name()) })
            }
        },
        _ => json!({ "error": "unknown request" }),
    };
    let mut w = &stream;
    let _ = writeln!(w, "{reply}");
}

fn ask(rec: &registry::Record, request: &str) -> Option<Value> {
    let path = rec.control.as_ref()?;
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    writeln!(s, "{request}").ok()?;
    let mut line = String::new();
    BufReader::new(s).take(16 << 20).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

fn query_stats(rec: &registry::Record) -> Value {
    ask(rec, "stats").unwrap_or(Value::Null)
}

fn settings_of(node: &Value) -> String {
    let Some(router) = node.get("router").filter(|r| !r.is_null()) else {
        return String::new();
    };
    if router.get("kind").and_then(Value::as_str) == Some("linux") {
        return "linux nftables masquerade".into();
    }
    let b = &router["behavior"];
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let mut parts = vec![];
    if router["translate"] == Value::Bool(false) {
        parts.push("firewall (no translation)".to_string());
    } else {
        parts.push(format!("mapping {}", s(&b["mapping"])));
    }
    parts.push(format!("filtering {}", s(&b["filtering"])));
    if router["translate"] != Value::Bool(false) {
        let alloc = &b["allocation"];
        let mut a = s(&alloc["kind"]);
        if let Some(step) = alloc.get("step") {
            a = format!("{a} (step {step})");
        }
        parts.push(format!("ports {a}"));
        parts.push(format!(
            "hairpinning {}",
            if b["hairpinning"] == Value::Bool(true) {
                "on"
            } else {
                "off"
            }
        ));
    }
    if router["block_udp"] == Value::Bool(true) {
        parts.push("udp blocked".into());
    }
    parts.join(", ")
}

fn addresses_of(node: &Value) -> Vec<String> {
    let mut v: Vec<String> = node["uplink"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| Some(format!("{}/{}", n["addr"].as_str()?, n["len"])))
        .collect();
    if let Some(l) = node.get("lan").filter(|l| !l.is_null()) {
        if let Some(a) = l["addr"].as_str() {
            v.push(format!("{a}/{}", l["len"]));
        }
    }
    v
}

fn render_lab(rec: &registry::Record, stats: &Value) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "node",
        "role",
        "addresses",
        "settings",
        "mappings",
    ]);
    for n in rec.nodes.as_array().into_iter().flatten() {
        let name = n["name"].as_str().unwrap_or("?");
        let mappings = stats
            .get(name)
            .and_then(|s| s.get("mappings"))
            .map(|m| m.to_string())
            .unwrap_or_default();
        t.add_row([
            name.to_string(),
            n["role"].as_str().unwrap_or("?").to_string(),
            addresses_of(n).join(" "),
            settings_of(n),
            mappings,
        ]);
    }
    let state = if registry::owner_alive(rec) {
        "running"
    } else {
        "stale (owner gone; `natscope lab down --all` removes it)"
    };
    format!(
        "lab {} ({}), {state}\n{t}",
        rec.name,
        rec.preset.as_deref().unwrap_or("custom topology")
    )
}

fn status_doc(records: &[registry::Record]) -> Value {
    let labs: Vec<Value> = records
        .iter()
        .map(|r| {
            let stats = query_stats(r);
            let nodes: Vec<Value> = r
                .nodes
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    let name = n["name"].as_str().unwrap_or_default();
                    json!({
                        "name": name,
                        "role": n["role"],
                        "namespace": natscope_lab::namespace_name(&r.name, name),
                        "addresses": addresses_of(n),
                        "router": n["router"],
                        "mappings": stats.get(name).and_then(|s| s.get("mappings")).cloned().unwrap_or(Value::Null),
                    })
                })
                .collect();
            json!({
                "name": r.name,
                "preset": r.preset,
                "running": registry::owner_alive(r),
                "owner_pid": r.owner_pid,
                "nodes": nodes,
            })
        })
        .collect();
    json!({ "schema": "natscope.lab/v1", "labs": labs })
}

fn status(a: StatusArgs) -> Result<ExitCode> {
    let mut records = registry::list();
    if let Some(n) = &a.name {
        records.retain(|r| &r.name == n);
        if records.is_empty() {
            bail!("no lab named `{n}` is running");
        }
    }
    if a.json {
        emit(&serde_json::to_string_pretty(&status_doc(&records))?);
    } else if records.is_empty() {
        emit("no labs are running");
    } else {
        for r in &records {
            emit(&render_lab(r, &query_stats(r)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The lab a command means: the one named, or the only one running.
fn pick_lab(name: Option<String>) -> Result<registry::Record> {
    let records = registry::list();
    match name {
        Some(n) => records
            .into_iter()
            .find(|r| r.name == n)
            .ok_or_else(|| anyhow!("no lab named `{n}` is running (see natscope lab status)")),
        None => match records.len() {
            0 => bail!("no lab is running; start one with `natscope lab up PRESET`"),
            1 => Ok(records.into_iter().next().expect("one record")),
            _ => bail!(
                "several labs are running ({}); choose one with --lab NAME",
                records
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// The lab a command means (as [`pick_lab`]), checked to have a node named `node`.
fn pick_node(lab: Option<String>, node: &str) -> Result<registry::Record> {
    let rec = pick_lab(lab)?;
    let names: Vec<&str> = rec
        .nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str())
        .collect();
    if !names.contains(&node) {
        bail!(
            "lab {} has no node `{node}` (nodes: {})",
            rec.name,
            names.join(", ")
        );
    }
    Ok(rec)
}

fn nat_table(a: NatTableArgs) -> Result<ExitCode> {
    let rec = pick_node(a.lab, &a.node)?;
    if rec.control.is_none() {
        bail!(
            "lab {} is run by another program (pid {}), which does not serve nat tables",
            rec.name,
            rec.owner_pid
        );
    }
    let reply = ask(&rec, &format!("nat-table {}", a.node))
        .ok_or_else(|| anyhow!("the supervisor of lab {} does not answer", rec.name))?;
    if let Some(e) = reply.get("error").and_then(Value::as_str) {
        bail!("{e}");
    }
    if a.json {
        emit(&serde_json::to_string_pretty(&reply)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["proto", "internal", "external", "expires in"]);
    let rows = reply["mappings"].as_array().cloned().unwrap_or_default();
    for r in &rows {
        let s = |k: &str| match &r[k] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            v => v.to_string(),
        };
        let ms = r["expires_in_ms"].as_u64().unwrap_or(0);
        t.add_row([
            s("proto"),
            s("internal"),
            s("external"),
            format!("{:.1} s", ms as f64 / 1000.0),
        ]);
    }
    emit(&format!(
        "{} mappings on {} (lab {})\n{t}",
        rows.len(),
        a.node,
        rec.name
    ));
    Ok(ExitCode::SUCCESS)
}

fn exec(a: ExecArgs) -> Result<ExitCode> {
    let rec = pick_node(a.lab, &a.node)?;
    let ns = natscope_lab::namespace_name(&rec.name, &a.node);
    netns::enter(&ns).map_err(|e| anyhow!("{e}"))?;
    let (program, args) = a
        .command
        .split_first()
        .ok_or_else(|| anyhow!("no command given"))?;
    // exec replaces this process: stdio, signals and the exit status are the program's own.
    let err = Command::new(program).args(args).exec();
    bail!("cannot run `{program}` in {}: {err}", a.node)
}

fn down(a: DownArgs) -> Result<ExitCode> {
    let grace = Duration::from_secs(10);
    if a.all {
        let mut names: Vec<String> = registry::list().into_iter().map(|r| r.name).collect();
        for ns in netns::list_lab_namespaces() {
            if let Some(l) = registry::lab_of_namespace(&ns) {
                if !names.iter().any(|n| n == l) {
                    names.push(l.to_string());
                }
            }
        }
        for n in &names {
            registry::down(n, grace);
        }
        emit(&if names.is_empty() {
            "no labs to remove".to_string()
        } else {
            format!("removed {}", names.join(", "))
        });
        return Ok(ExitCode::SUCCESS);
    }
    let name = a.name.unwrap_or_default();
    if !registry::down(&name, grace) {
        bail!("no lab named `{name}` (see natscope lab status)");
    }
    emit(&format!("lab {name} is down"));
    Ok(ExitCode::SUCCESS)
}
