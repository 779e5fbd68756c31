//! One cell of `natscope lab grid`: a lab for a pair of presets ([`grid::pair_topology`]), punch
//! run in it ([`crate::punch_lab`]), and the outcome judged against the one RFC 4787 / RFC 5382
//! reasoning predicts ([`grid::expected`]): the path must match, and a connected pair must also
//! have delivered every message, once each, in order.

use std::path::Path;
use std::time::{Duration, Instant};

use natscope_core::punch::connector::ConnectReport;

use crate::grid::{self, GridCell, PathTaken, Transport};
use crate::jobs;
use crate::punch_lab::{self, Peer, PunchLab, PunchLabError};
use crate::topology::TopologyError;
use crate::{Lab, LabError, LabOptions};

/// How long `punch connect` may take (it gives up after 8 s itself).
const CONNECT_LIMIT: Duration = Duration::from_secs(20);

/// What one punch run in a lab gave: the connector's report, and the two peers' stderr when the
/// pair did not go direct.
#[derive(Debug)]
struct Punched {
    report: ConnectReport,
    diagnostics: Option<String>,
}

/// Why a cell could not run.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("no pair topology")]
    NoTopology,
    #[error("{0}")]
    Topology(#[from] TopologyError),
    #[error("lab for {a} + {b}: {source}")]
    Lab {
        a: String,
        b: String,
        source: Box<LabError>,
    },
    #[error("{0}")]
    Punch(#[from] PunchLabError),
    #[error("punch connect did not finish within {CONNECT_LIMIT:?} ({why})")]
    ConnectTimeout { why: String },
    #[error("punch connect printed no report: {text} ({diagnostics})")]
    NoReport {
        text: String,
        diagnostics: String,
        source: serde_json::Error,
    },
}

/// Runs the cell `a` × `b` over `t` in a lab named `prefix` + `index` + a random suffix, with
/// `exe` as natscope.
pub fn run_cell(
    prefix: &str,
    index: usize,
    a: &str,
    b: &str,
    t: Transport,
    exe: &Path,
) -> GridCell {
    let t0 = Instant::now();
    let (expected, reason) =
        grid::expected(a, b, t).unwrap_or((PathTaken::Failed, "unknown preset".into()));
    let result = punch_in_lab(prefix, index, a, b, t, exe);
    let mut cell = GridCell {
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
        Ok(Punched {
            report,
            diagnostics,
        }) => {
            cell.diagnostics = diagnostics;
            judge(&mut cell, report);
        }
        Err(e) => cell.error = Some(jobs::error_line(&e)),
    }
    cell.duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
    cell
}

/// Fills the observation into `cell` from the connector's report and decides whether it passed.
fn judge(cell: &mut GridCell, report: ConnectReport) {
    cell.observed = Some(report.path);
    cell.time_to_direct_ms = report.time_to_direct_ms;
    cell.messages_sent = report.messages_sent;
    cell.messages_echoed = report.messages_echoed;
    // A connected pair must also have delivered every message, once each, in order.
    let delivered = report.path == PathTaken::Failed
        || (report.messages_echoed == report.messages_sent
            && report.messages_sent > 0
            && report.in_order);
    cell.pass = cell.observed == Some(cell.expected) && delivered;
    if !delivered {
        cell.reason = format!(
            "{} (data: {}/{} echoed, in order: {})",
            cell.reason, cell.messages_echoed, cell.messages_sent, report.in_order
        );
    }
    if !cell.pass {
        cell.report = Some(report);
    }
}

/// The connector's `natscope.punch/v1` report, with the peers' stderr when it did not go direct.
fn punch_in_lab(
    prefix: &str,
    index: usize,
    a: &str,
    b: &str,
    t: Transport,
    exe: &Path,
) -> Result<Punched, CellError> {
    let topo = grid::pair_topology(a, b).ok_or(CellError::NoTopology)?;
    let lab = Lab::up(
        &jobs::lab_name(prefix, index),
        topo.plan()?,
        LabOptions {
            natscope_bin: Some(exe.to_path_buf()),
            ..Default::default()
        },
    )
    .map_err(|source| CellError::Lab {
        a: a.into(),
        b: b.into(),
        source: Box::new(source),
    })?;
    let tcp: &[&str] = if t == Transport::Tcp { &["--tcp"] } else { &[] };
    let mut punch = PunchLab::<Peer>::start(lab, exe)?;
    let mut listener = punch.listener(
        "b",
        &[&["--json", "--count", "1", "--timeout", "30"], tcp].concat(),
    )?;
    let mut connector = punch.connector("b", &[&["--timeout", "8"], tcp].concat())?;
    let Some(stdout) = connector.output_within(CONNECT_LIMIT) else {
        let why = format!("connector: {}", connector.stderr_tail());
        return Err(CellError::ConnectTimeout { why });
    };
    let diagnostics = format!(
        "connector: {}; listener: {}",
        connector.stderr_tail(),
        listener.stderr_tail()
    );
    punch.down();
    let report = punch_lab::connect_report(&stdout).map_err(|source| CellError::NoReport {
        text: String::from_utf8_lossy(&stdout).trim().to_string(),
        diagnostics: diagnostics.clone(),
        source,
    })?;
    let diagnostics = (report.path != PathTaken::Direct).then_some(diagnostics);
    Ok(Punched {
        report,
        diagnostics,
    })
}

/// Runs the plain grid: natscope punch over every unordered pair of `names`, for each transport,
/// `jobs` cells at a time, in labs named `prefix`…, with `exe` as the natscope the nodes run.
pub fn run_grid(
    names: &[String],
    transports: &[Transport],
    jobs: usize,
    prefix: &str,
    exe: &Path,
) -> Result<grid::GridDocument, jobs::JobError> {
    let mut work = Vec::new();
    for t in transports {
        for (i, x) in names.iter().enumerate() {
            for y in &names[i..] {
                work.push((x.clone(), y.clone(), *t));
            }
        }
    }
    let start = Instant::now();
    let cells = jobs::run_parallel(&work, jobs, |i, (x, y, t)| {
        run_cell(prefix, i, x, y, *t, exe)
    })?;
    Ok(grid::GridDocument {
        schema: grid::SCHEMA.to_string(),
        natscope_version: natscope_core::document::version(),
        pass: cells.iter().all(|c| c.pass),
        cells,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use natscope_core::punch::connector::{Attempts, SCHEMA};

    fn cell(expected: PathTaken) -> GridCell {
        GridCell {
            a: "full-cone".into(),
            b: "symmetric".into(),
            transport: Transport::Udp,
            expected,
            observed: None,
            time_to_direct_ms: None,
            messages_sent: 0,
            messages_echoed: 0,
            reason: "why".into(),
            pass: false,
            error: None,
            diagnostics: None,
            report: None,
            duration_ms: 0.0,
        }
    }

    /// A connector's report that took `path` and got `echoed` of `sent` messages back.
    fn report(path: PathTaken, sent: u64, echoed: u64, in_order: bool) -> ConnectReport {
        ConnectReport {
            schema: SCHEMA,
            natscope_version: String::new(),
            transport: Transport::Udp,
            path,
            local: "10.1.0.2:4000".parse().expect("addr"),
            peer: None,
            time_to_first_byte_ms: None,
            time_to_direct_ms: None,
            rtt_ms: None,
            messages_sent: sent,
            messages_echoed: echoed,
            in_order,
            switched_to_direct: false,
            attempts: Attempts::default(),
        }
    }

    #[test]
    fn a_cell_passes_on_the_expected_path_with_every_message_delivered() {
        let mut c = cell(PathTaken::Direct);
        let r = ConnectReport {
            time_to_direct_ms: Some(12.5),
            ..report(PathTaken::Direct, 5, 5, true)
        };
        judge(&mut c, r);
        assert!(c.pass);
        assert_eq!(c.observed, Some(PathTaken::Direct));
        assert_eq!(c.time_to_direct_ms, Some(12.5));
        assert_eq!(c.report, None);
        assert_eq!(c.reason, "why");
    }

    #[test]
    fn a_lost_or_reordered_message_fails_a_connected_cell() {
        let mut c = cell(PathTaken::Relayed);
        let r = report(PathTaken::Relayed, 5, 4, true);
        judge(&mut c, r.clone());
        assert!(!c.pass);
        assert_eq!(c.reason, "why (data: 4/5 echoed, in order: true)");
        assert_eq!(c.report, Some(r), "a failed cell keeps the report");
        let mut c = cell(PathTaken::Relayed);
        judge(&mut c, report(PathTaken::Relayed, 5, 5, false));
        assert!(!c.pass);
        assert_eq!(c.reason, "why (data: 5/5 echoed, in order: false)");
    }

    #[test]
    fn a_failed_pair_needs_no_data_but_the_expected_path() {
        let mut c = cell(PathTaken::Failed);
        judge(&mut c, report(PathTaken::Failed, 0, 0, true));
        assert!(c.pass);
        let mut c = cell(PathTaken::Direct);
        judge(&mut c, report(PathTaken::Relayed, 3, 3, true));
        assert!(!c.pass, "the wrong path fails even with the data through");
        assert_eq!(c.observed, Some(PathTaken::Relayed));
    }

    /// A cell with its report, as `lab grid --json` writes it, reads back as the same cell.
    #[test]
    fn a_cell_with_its_report_reads_back_typed() {
        let mut c = cell(PathTaken::Direct);
        judge(&mut c, report(PathTaken::Relayed, 3, 3, true));
        let text = serde_json::to_string_pretty(&c).expect("json");
        let back: GridCell = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, c);
        assert!(text.contains("\"observed\": \"relayed\""), "{text}");
    }
}
