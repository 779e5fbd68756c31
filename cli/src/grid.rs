//! `natscope lab grid`: every pair of presets (same-preset pairs included), each peer behind its
//! own NAT, over UDP and TCP: a lab per cell with `natscope punch serve` on the reflector node,
//! `punch listen` behind one NAT and `punch connect` behind the other, real processes all. Each
//! outcome is compared with the one RFC 4787 reasoning predicts (`natscope_lab::grid`). Running
//! and judging a cell is [`natscope_lab::grid_run`]; this file parses, schedules and renders.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::builder::PossibleValue;
use clap::{Args, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_lab::grid::{self, GridCell, GridDocument, PathTaken, Transport};
use natscope_lab::grid_run::run_cell;
use natscope_lab::presets;

use crate::lab::PresetParser;
use crate::{emit, jobs};

/// `--transport`'s values as clap lists them: the core's one [`Transport`], by its own names.
#[derive(Clone, Copy)]
struct TransportArg(Transport);

impl ValueEnum for TransportArg {
    fn value_variants<'a>() -> &'a [Self] {
        &[TransportArg(Transport::Udp), TransportArg(Transport::Tcp)]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.0.as_str()))
    }
}

#[derive(Args)]
pub struct GridArgs {
    /// Comma-separated presets (default: full-cone, restricted-cone, port-restricted-cone,
    /// symmetric, symmetric-sequential, cgnat).
    #[arg(long, value_delimiter = ',', value_parser = PresetParser { files: false })]
    presets: Vec<String>,
    /// Comma-separated transports.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["udp", "tcp"])]
    transport: Vec<TransportArg>,
    /// Cells running at the same time.
    #[arg(long, default_value_t = 6)]
    jobs: usize,
    /// Print one `natscope.grid/v1` JSON document.
    #[arg(long)]
    json: bool,
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
    let transports: Vec<Transport> = a.transport.iter().map(|t| t.0).collect();
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
    let doc = GridDocument {
        schema: grid::SCHEMA.to_string(),
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

fn mark(c: &GridCell) -> String {
    let o = match c.observed {
        Some(PathTaken::Direct) => match c.time_to_direct_ms {
            Some(ms) => format!("direct {ms:.0} ms"),
            None => "direct".into(),
        },
        Some(p) => p.to_string(),
        None => "error".into(),
    };
    if c.pass {
        format!("✓ {o}")
    } else {
        format!("✗ {o} (want {})", c.expected)
    }
}

fn render(doc: &GridDocument, names: &[String], transports: &[Transport]) -> String {
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
