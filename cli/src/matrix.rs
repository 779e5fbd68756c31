//! `natscope lab matrix`: for each preset, a lab comes up, `natscope probe --json` runs in its host
//! `h1` against the lab's reflector, and every verdict is compared with the preset's configured
//! truth (`natscope_lab::matrix`). Labs run in parallel, a few at a time; each is torn down when
//! its probe is done.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_lab::matrix::{self, Check};
use natscope_lab::{presets, Lab, LabOptions};
use serde::Serialize;
use serde_json::Value;

use crate::{emit, jobs};

/// A probe that has not finished after this long is killed and its preset fails.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct MatrixArgs {
    /// Comma-separated presets (default: every preset).
    #[arg(long, value_delimiter = ',')]
    presets: Vec<String>,
    /// Labs running at the same time.
    #[arg(long, default_value_t = 6)]
    jobs: usize,
    /// Print one `natscope.matrix/v1` JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    preset: String,
    expected: Value,
    observed: Value,
    pass: bool,
    checks: Vec<Check>,
    /// Set when the lab or the probe could not run at all.
    error: Option<String>,
    /// The probe's whole `natscope.probe/v1` document, kept for rows that did not pass.
    probe: Option<Value>,
    duration_ms: f64,
}

#[derive(Serialize)]
struct Document {
    schema: &'static str,
    rows: Vec<Row>,
    pass: bool,
    duration_ms: f64,
}

pub fn run(a: MatrixArgs) -> Result<ExitCode> {
    let names: Vec<String> = if a.presets.is_empty() {
        presets::names().iter().map(|s| s.to_string()).collect()
    } else {
        a.presets.clone()
    };
    for n in &names {
        if matrix::expected_probe(n).is_none() {
            bail!(
                "unknown preset `{n}`; presets: {}",
                presets::names().join(", ")
            );
        }
    }
    let exe = jobs::prepare(a.jobs)?;
    let start = Instant::now();
    let rows = jobs::run_parallel(&names, a.jobs, |i, name| run_preset(i, name, &exe))?;
    let errors = rows.iter().any(|r| r.error.is_some());
    let doc = Document {
        schema: "natscope.matrix/v1",
        pass: rows.iter().all(|r| r.pass),
        rows,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
    };
    if a.json {
        emit(&serde_json::to_string_pretty(&doc)?);
    } else {
        emit(&render(&doc));
    }
    Ok(jobs::exit_code(errors, doc.pass))
}

fn run_preset(index: usize, preset: &str, exe: &std::path::Path) -> Row {
    let t0 = Instant::now();
    let expected = matrix::expected_probe(preset).unwrap_or(Value::Null);
    let outcome = probe_in_lab(index, preset, exe);
    let (observed, checks, error, probe) = match outcome {
        Ok(doc) => {
            let observed = matrix::observed_probe(&doc);
            let checks = matrix::compare(&expected, &observed);
            let keep = checks.iter().any(|c| !c.pass).then_some(doc);
            (observed, checks, None, keep)
        }
        Err(e) => (Value::Null, Vec::new(), Some(crate::error_line(&e)), None),
    };
    Row {
        preset: preset.to_string(),
        pass: error.is_none() && checks.iter().all(|c| c.pass),
        expected,
        observed,
        checks,
        error,
        probe,
        duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
    }
}

/// Brings the preset up, runs the probe in `h1`, returns its JSON document.
fn probe_in_lab(index: usize, preset: &str, exe: &std::path::Path) -> Result<Value> {
    let name = jobs::lab_name("mx", index);
    let plan = presets::preset(preset)
        .ok_or_else(|| anyhow!("no preset {preset}"))?
        .plan()?;
    let options = LabOptions {
        natscope_bin: Some(exe.to_path_buf()),
        ..Default::default()
    };
    let lab = Lab::up(&name, plan, options).with_context(|| format!("lab for {preset}"))?;
    let (primary, _) = lab.stun_addresses("stun")?;
    let mut cmd = Command::new(exe);
    cmd.args(["probe", &primary.to_string(), "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = lab
        .node("h1")?
        .spawn(cmd)
        .context("starting the probe in h1")?;
    let Some((status, stdout)) = jobs::output_within(&mut child, PROBE_LIMIT)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the probe did not finish within {PROBE_LIMIT:?}");
    };
    lab.down();
    // Exit 1 is a finding (UDP blocked, unknown result), not an error.
    if status.code().is_none_or(|c| c > 1) {
        bail!("the probe failed ({status})");
    }
    serde_json::from_slice(&stdout).context("the probe's JSON")
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => match s.as_str() {
            "endpoint-independent" => "EI".into(),
            "address-dependent" => "AD".into(),
            "address-and-port-dependent" => "APD".into(),
            other => other.to_string(),
        },
        Value::Null => "-".into(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        other => other.to_string(),
    }
}

fn render(doc: &Document) -> String {
    let mut t = Table::new();
    let mut header = vec!["preset".to_string()];
    header.extend(matrix::FIELDS.iter().map(|f| f.replace('_', " ")));
    header.push("result".into());
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    for r in &doc.rows {
        let mut cells = vec![r.preset.clone()];
        for f in matrix::FIELDS {
            cells.push(match r.checks.iter().find(|c| c.field == *f) {
                Some(c) if c.pass => format!("✓ {}", short(&c.observed)),
                Some(c) => format!("✗ {} (want {})", short(&c.observed), short(&c.expected)),
                None => String::new(),
            });
        }
        cells.push(match &r.error {
            Some(e) => format!("error: {e}"),
            None if r.pass => format!("pass {:.1} s", r.duration_ms / 1000.0),
            None => format!("FAIL {:.1} s", r.duration_ms / 1000.0),
        });
        t.add_row(cells);
    }
    let passed = doc.rows.iter().filter(|r| r.pass).count();
    format!(
        "{t}\n{passed}/{} presets match their configured NAT (EI/AD/APD = endpoint-independent / address-dependent / address-and-port-dependent) in {:.1} s",
        doc.rows.len(),
        doc.duration_ms / 1000.0
    )
}
