//! `natscope lab matrix`: for each preset, a lab comes up, `natscope probe --json` runs in its host
//! `h1` against the lab's reflector, and every verdict is compared with the preset's configured
//! truth (`natscope_lab::matrix`). Labs run in parallel, a few at a time; each is torn down when
//! its probe is done. Running and judging one preset is [`natscope_lab::matrix_run`]; this file
//! parses, schedules and renders.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_lab::matrix::{self, MatrixDocument, Verdicts};
use natscope_lab::matrix_run::run_preset;
use natscope_lab::presets;
use serde_json::Value;

use crate::lab::PresetParser;
use crate::{emit, jobs};

#[derive(Args)]
pub struct MatrixArgs {
    /// Comma-separated presets (default: every preset).
    #[arg(long, value_delimiter = ',', value_parser = PresetParser { files: false })]
    presets: Vec<String>,
    /// Labs running at the same time.
    #[arg(long, default_value_t = 6)]
    jobs: usize,
    /// Print one `natscope.matrix/v1` JSON document.
    #[arg(long)]
    json: bool,
}

pub fn run(a: MatrixArgs) -> Result<ExitCode> {
    let names: Vec<String> = if a.presets.is_empty() {
        presets::names().iter().map(|s| s.to_string()).collect()
    } else {
        a.presets.clone()
    };
    let mut wanted: Vec<(String, Verdicts)> = Vec::with_capacity(names.len());
    for n in names {
        let Some(truth) = Verdicts::expected(&n) else {
            bail!(
                "unknown preset `{n}`; presets: {}",
                presets::names().join(", ")
            );
        };
        wanted.push((n, truth));
    }
    let exe = jobs::prepare(a.jobs)?;
    let start = Instant::now();
    let rows = jobs::run_parallel_shown(&wanted, a.jobs, "presets", |i, (name, truth)| {
        run_preset(i, name, truth.clone(), &exe)
    })?;
    let errors = rows.iter().any(|r| r.error.is_some());
    let doc = MatrixDocument {
        schema: matrix::SCHEMA.to_string(),
        natscope_version: natscope_probes::document::version(),
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
        // Port-mapping protocols: those that answered, `name?` for unknown.
        Value::Object(m) => {
            let on = |(k, v): (&String, &Value)| match v {
                Value::Bool(true) => Some(k.replace('_', "-")),
                Value::Null => Some(format!("{}?", k.replace('_', "-"))),
                _ => None,
            };
            let s: Vec<String> = m.iter().filter_map(on).collect();
            if s.is_empty() {
                "none".into()
            } else {
                s.join("+")
            }
        }
        other => other.to_string(),
    }
}

fn render(doc: &MatrixDocument) -> String {
    let mut t = Table::new();
    // Only the columns some row compared (port mapping and IPv6 apply to a few presets).
    let fields: Vec<&str> = matrix::FIELDS
        .iter()
        .copied()
        .filter(|f| {
            doc.rows
                .iter()
                .any(|r| r.checks.iter().any(|c| c.field == *f))
        })
        .collect();
    let mut header = vec!["preset".to_string()];
    header.extend(fields.iter().map(|f| f.replace('_', " ")));
    header.push("result".into());
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    for r in &doc.rows {
        let mut cells = vec![r.preset.clone()];
        for f in &fields {
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
