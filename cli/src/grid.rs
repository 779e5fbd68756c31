//! `natscope lab grid`: every pair of presets (same-preset pairs included), each peer behind its
//! own NAT, over UDP and TCP: a lab per cell with `natscope punch serve` on the reflector node,
//! `punch listen` behind one NAT and `punch connect` behind the other, real processes all. Each
//! outcome is compared with the one RFC 4787 reasoning predicts (`natscope_lab::grid`). Running
//! and judging a cell is [`natscope_lab::grid_run`]; this file parses, schedules and renders.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_lab::app;
use natscope_lab::app_run::{self, AppGridDocument};
use natscope_lab::grid::{self, GridCell, GridDocument, Transport};
use natscope_lab::grid_run::run_grid_in;

use crate::lab::PresetParser;
use crate::{emit, jobs};

/// `--transport`'s values as clap lists them: the core's one [`Transport`], by its own names.
fn transports() -> impl clap::builder::TypedValueParser<Value = Transport> {
    let names = [Transport::Udp, Transport::Tcp].map(Transport::as_str);
    PossibleValuesParser::new(names)
        .map(|s| [Transport::Udp, Transport::Tcp][usize::from(s == "tcp")])
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GridArgs {
    #[command(subcommand)]
    merge: Option<Box<GridCommand>>,
    /// Comma-separated presets (default: full-cone, restricted-cone, port-restricted-cone,
    /// symmetric, symmetric-sequential, cgnat).
    #[arg(long, value_delimiter = ',', value_parser = PresetParser { files: false })]
    presets: Vec<String>,
    /// Comma-separated transports.
    #[arg(long, value_delimiter = ',', default_values = ["udp", "tcp"], value_parser = transports())]
    transport: Vec<Transport>,
    /// Comma-separated address families (ipv4, ipv6): each cell punches over one.
    #[arg(long, value_delimiter = ',', default_values = ["ipv4"], value_parser = grid::parse_family)]
    family: Vec<grid::Family>,
    /// Cells running at the same time.
    #[arg(long, default_value_t = 6)]
    jobs: usize,
    #[command(flatten)]
    out: Outputs,
    /// Run this program instead of natscope punch: an app file (docs/testing-your-app.md).
    #[arg(long, value_name = "FILE.toml")]
    app: Option<PathBuf>,
    /// With --app: run only shard K of N (every N-th cell from the K-th); join with `merge`.
    #[arg(long, value_name = "K/N", requires = "app")]
    shard: Option<String>,
    /// Lab names start with this (1-4 characters a-z, 0-9), so parallel grids never collide.
    /// (default: `gd` for natscope punch, `ga` with --app).
    #[arg(long, hide = true)]
    lab_prefix: Option<String>,
}

#[derive(Args)]
struct Outputs {
    /// Print one JSON document: `natscope.grid/v1`, or `natscope.grid/v2` with `--app`.
    #[arg(long)]
    json: bool,
    /// With --app: write a JUnit XML report (one testcase per cell) here.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// With --app: write a Markdown grid (for $GITHUB_STEP_SUMMARY) here.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// With --app: write one self-contained HTML page of the grid here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum GridCommand {
    /// Join `--app --json --shard` documents into the whole grid's.
    Merge {
        #[arg(required = true, value_name = "FILE.json")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        out: Outputs,
    },
}

pub fn run(a: GridArgs) -> Result<ExitCode> {
    if let Some(GridCommand::Merge { files, out }) = a.merge.as_deref() {
        return report(
            out,
            app_run::merge_files(files).map_err(|e| anyhow!("{e}"))?,
        );
    }
    let o = &a.out;
    if a.app.is_none() && (o.junit.is_some() || o.markdown.is_some() || o.html.is_some()) {
        bail!("--junit, --markdown and --html need --app");
    }
    // A bad app file is one line and nothing is created.
    let app = match &a.app {
        Some(path) => Some(app::load(path).map_err(|e| anyhow!("{e}"))?),
        None => None,
    };
    let names = grid::preset_names(&a.presets).map_err(|e| anyhow!("{e}"))?;
    let default_prefix = if a.app.is_some() { "ga" } else { "gd" };
    let prefix = a.lab_prefix.as_deref().unwrap_or(default_prefix);
    grid::check_prefix(prefix).map_err(|e| anyhow!("{e}"))?;
    let exe = jobs::prepare(a.jobs)?;
    if let Some(spec) = app {
        let doc = app_run::run_grid(spec, &names, a.shard.as_deref(), a.jobs, prefix, &exe)
            .map_err(|e| anyhow!("{e}"))?;
        return report(&a.out, doc);
    }
    let doc = run_grid_in(&names, &a.transport, &a.family, a.jobs, prefix, &exe)?;
    let errors = doc.cells.iter().any(|c| c.error.is_some());
    if a.out.json {
        emit(&serde_json::to_string_pretty(&doc)?);
    } else {
        emit(&render(&doc, &names, &a.transport, &a.family));
    }
    Ok(jobs::exit_code(errors, doc.pass))
}

/// Writes the files `out` asks for and prints the document or its table.
fn report(out: &Outputs, doc: AppGridDocument) -> Result<ExitCode> {
    let errors = doc.cells.iter().any(|c| c.error.is_some());
    doc.write_reports(
        out.junit.as_deref(),
        out.markdown.as_deref(),
        out.html.as_deref(),
    )
    .map_err(|e| anyhow!("{e}"))?;
    if out.json {
        emit(&serde_json::to_string_pretty(&doc)?);
    } else {
        let names = doc.preset_order();
        let mut parts = vec![table("app", &names, |x, y| {
            doc.cell(x, y).map(|c| c.mark())
        })];
        parts.extend(
            doc.cells
                .iter()
                .filter_map(|c| c.failure().map(|why| format!("{} ↔ {}: {why}", c.a, c.b))),
        );
        parts.push(doc.summary());
        emit(&parts.join("\n"));
    }
    Ok(jobs::exit_code(errors, doc.pass))
}

/// A pair grid: `names` down and across, each cell's word from `mark` (either order of the pair).
fn table(corner: &str, names: &[String], mark: impl Fn(&str, &str) -> Option<String>) -> String {
    let mut table = Table::new();
    let mut header = vec![corner.to_string()];
    header.extend(names.iter().cloned());
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    for x in names {
        let mut row = vec![x.clone()];
        for y in names {
            row.push(mark(x, y).unwrap_or_default());
        }
        table.add_row(row);
    }
    table.to_string()
}

fn render(doc: &GridDocument, names: &[String], ts: &[Transport], fs: &[grid::Family]) -> String {
    let mut parts = Vec::new();
    for (t, f) in ts.iter().flat_map(|t| fs.iter().map(move |f| (*t, *f))) {
        let corner = grid::section(t, f, fs.len() > 1);
        parts.push(table(&corner, names, |x, y| {
            doc.cell(t, f, x, y).map(GridCell::mark)
        }));
    }
    for c in doc.cells.iter().filter(|c| !c.pass) {
        parts.push(format!(
            "{} ↔ {} ({:?}{}): {}{}",
            c.a,
            c.b,
            c.transport,
            grid::family_tag(c, fs.len() > 1),
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
