//! `natscope lab`: bring labs up and down, look inside them, run programs in their nodes.
//!
//! `lab up` starts a detached supervisor (`natscope lab serve`, hidden) that owns the lab — its
//! namespaces, NAT engines and reflectors — until `lab down` sends it SIGTERM. The supervisor and
//! its control protocol, which `lab status` / `lab nat-table` use, are [`natscope_lab::control`].

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::time::Duration;

use std::ffi::OsStr;

use anyhow::{anyhow, bail, Context, Result};
use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_lab::control::{self, load_plan, NatTableDocument, Reply, Request};
use natscope_lab::registry::control_path;

use natscope_lab::{
    netns, presets, registry, wire_name, Lab, LabOptions, LabStatus, StatusDocument,
};

use crate::emit;
use crate::logging::LogArgs;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Bring a lab up from a preset or a TOML topology file and leave it running.
    #[command(after_help = include_str!("../help/lab-up.txt"))]
    Up(UpArgs),
    /// List running labs: nodes, roles, addresses, NAT settings, mapping counts.
    Status(StatusArgs),
    /// Print a NAT node's live mappings.
    NatTable(NatTableArgs),
    /// Print a userspace NAT node's traffic per flow: out, delivered in, refused by its filter.
    Flows(NatTableArgs),
    /// Run a program inside a lab node, stdio attached, exit status passed through.
    Exec(ExecArgs),
    /// Tear a lab down (or every lab, stale ones included, with --all).
    Down(DownArgs),
    /// For every preset, run `natscope probe` behind its NAT and compare each verdict with the
    /// preset's configured behavior.
    #[command(after_help = include_str!("../help/lab-matrix.txt"))]
    Matrix(crate::matrix::MatrixArgs),
    /// Every pair of presets, each peer behind its own NAT: does `natscope punch` connect them
    /// directly, through the relay, or not at all — and is that what RFC 4787 predicts?
    #[command(after_help = include_str!("../help/lab-grid.txt"))]
    Grid(crate::grid::GridArgs),
    /// The supervisor `lab up` starts (internal).
    #[command(hide = true)]
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct UpArgs {
    /// A preset name (see `natscope lab up --list`), `pair:A,B` (one `lab grid` cell: `a` behind
    /// preset A, `b` behind B, a public host `rendezvous`) or a topology file ending in .toml.
    #[arg(required_unless_present = "list", value_parser = PresetParser { files: true })]
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
    /// Print one `natscope.lab/v1` JSON document (every lab, or the one named) instead of tables.
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
    /// Print JSON instead of a table (nat-table: one `natscope.nat-table/v1` document; flows:
    /// an array of flows).
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

/// Preset names for clap, from the one table ([`presets::infos`]), so help and completions list
/// them with their summaries. With `files`, any other value passes too (a topology file, or a name
/// `load_plan` rejects with the list); without, clap rejects an unknown name before anything runs.
#[derive(Clone)]
pub struct PresetParser {
    pub files: bool,
}

impl TypedValueParser for PresetParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<String, clap::Error> {
        let v = value.to_string_lossy();
        if self.files || presets::find(&v).is_some() {
            return Ok(v.into_owned());
        }
        let known = presets::names().join(", ");
        let msg = format!("unknown preset `{v}`; presets: {known}\n");
        Err(clap::Error::raw(ErrorKind::InvalidValue, msg).with_cmd(cmd))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        let values = presets::infos().iter();
        Some(Box::new(
            values.map(|p| PossibleValue::new(p.name).help(p.summary)),
        ))
    }
}

pub fn run(cmd: LabCommand, log: &LogArgs) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up(a) => up(a, log),
        LabCommand::Status(a) => status(a),
        LabCommand::NatTable(a) => nat_table(a),
        LabCommand::Flows(a) => {
            let text = natscope_lab::app_run::lab_flows(a.lab, &a.node, a.json);
            emit(&text.map_err(|e| anyhow!("{e}"))?);
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Exec(a) => exec(a),
        LabCommand::Down(a) => down(a),
        LabCommand::Matrix(a) => crate::matrix::run(a),
        LabCommand::Grid(a) => crate::grid::run(a),
        LabCommand::Serve(a) => serve(a),
    }
}

fn up(a: UpArgs, log: &LogArgs) -> Result<ExitCode> {
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
    // An unprivileged user's supervisor enters a user namespace of its own and says itself what
    // the kernel forbids; this process stays outside it.
    if !natscope_lab::rootless::active() {
        netns::check_privileges().map_err(|e| anyhow!("{e}"))?;
    }
    let exe = std::env::current_exe().context("cannot find the natscope executable")?;
    let mut supervisor = Command::new(&exe);
    // Its stderr is the lab's log (`control::launch`): `-v`/`-q` set how much goes there.
    supervisor
        .args(log.flags())
        .args(["lab", "serve", &source, "--name", &a.name]);
    control::launch(&a.name, supervisor)?;
    let rec = registry::read(&a.name).ok_or_else(|| anyhow!("lab {} vanished", a.name))?;
    if a.json {
        emit_status(&control::status_document(&[rec]))?;
    } else {
        emit(&render_lab(&control::lab_status(&rec)));
        emit(&format!(
            "lab {n} is up; run programs with `natscope lab exec --lab {n} NODE -- CMD`, stop it with `natscope lab down {n}`",
            n = a.name
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The supervisor ([`control::supervise`]): reports `ready` or `error: …` on stdout for `lab up`.
fn serve(a: ServeArgs) -> Result<ExitCode> {
    let say = |s: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}").and_then(|_| out.flush());
    };
    let plan = match load_plan(&a.source) {
        Ok(p) => p,
        Err(e) => {
            say(&format!("error: {e}"));
            return Ok(ExitCode::from(2));
        }
    };
    let control = control_path(&a.name);
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
    tracing::info!(lab = %a.name, source = %a.source, "lab is up; supervising");
    control::supervise(lab, &control, || say("ready"))?;
    Ok(ExitCode::SUCCESS)
}

/// The JSON spelling of a value that serializes to a string (a kebab-case enum), so the tables
/// say the same word as `--json`.
fn render_lab(lab: &LabStatus) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "node",
        "role",
        "addresses",
        "settings",
        "mappings",
    ]);
    for n in &lab.nodes {
        t.add_row([
            n.name.clone(),
            wire_name(&n.role),
            n.addresses.join(" "),
            n.settings(),
            n.mappings.map(|m| m.to_string()).unwrap_or_default(),
        ]);
    }
    let state = if lab.running {
        "running"
    } else {
        "stale (owner gone; `natscope lab down --all` removes it)"
    };
    format!(
        "lab {} ({}), {state}\n{t}",
        lab.name,
        lab.preset.as_deref().unwrap_or("custom topology")
    )
}

/// Prints a `natscope.lab/v1` document. It goes through a `serde_json::Value`, whose objects
/// order their keys alphabetically: the key order `lab status --json` has always printed (the
/// structs keep the documented order; readers go by name either way).
fn emit_status(doc: &StatusDocument) -> Result<()> {
    emit(&serde_json::to_string_pretty(&serde_json::to_value(doc)?)?);
    Ok(())
}

fn status(a: StatusArgs) -> Result<ExitCode> {
    // Labs whose supervisor was killed are removed, not listed (as the next `lab up` would).
    let _ = registry::sweep_stale();
    let mut records = registry::list();
    if let Some(n) = &a.name {
        natscope_lab::check_lab_name(n).map_err(|e| anyhow!("{e}"))?;
        records.retain(|r| &r.name == n);
        if records.is_empty() {
            bail!("no lab named `{n}` is running");
        }
    }
    if a.json {
        emit_status(&control::status_document(&records))?;
    } else if records.is_empty() {
        emit("no labs are running");
    } else {
        for r in &records {
            emit(&render_lab(&control::lab_status(r)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn nat_table(a: NatTableArgs) -> Result<ExitCode> {
    let rec = control::pick_node(a.lab, &a.node)?;
    if rec.control.is_none() {
        bail!(
            "lab {} is run by another program (pid {}), which does not serve nat tables",
            rec.name,
            rec.owner_pid
        );
    }
    let request = Request::NatTable {
        node: a.node.clone(),
    };
    let table = match control::ask(&rec, &request) {
        Some(Reply::NatTable(t)) => t,
        Some(Reply::Error(e)) => bail!("{e}"),
        _ => bail!("the supervisor of lab {} does not answer", rec.name),
    };
    if a.json {
        let doc = NatTableDocument::new(table.mappings);
        emit(&serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["proto", "internal", "external", "expires in"]);
    let rows = &table.mappings;
    for r in rows {
        t.add_row([
            wire_name(&r.proto),
            r.internal.to_string(),
            r.external_via(),
            format!("{:.1} s", r.expires_in_ms as f64 / 1000.0),
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
    let rec = control::pick_node(a.lab, &a.node)?;
    control::enter_node(&rec, &a.node)?;
    natscope_lab::resolver::enter(&rec.name, &a.node).map_err(|e| anyhow!("lab resolver: {e}"))?;
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
        let names = control::all_labs();
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
    natscope_lab::check_lab_name(&name).map_err(|e| anyhow!("{e}"))?;
    if !registry::down(&name, grace) {
        bail!("no lab named `{name}` (see natscope lab status)");
    }
    emit(&format!("lab {name} is down"));
    Ok(ExitCode::SUCCESS)
}
