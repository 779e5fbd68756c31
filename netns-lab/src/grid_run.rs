//! One cell of `natscope lab grid`: natscope punch run as a built-in app
//! ([`punch_lab::app`]) by the same engine as `lab grid --app` ([`crate::app_run`]: the pair
//! lab, the roles, the routers' counts), so there is one runner. The outcome is judged twice:
//! punch's own report against what RFC 4787 / RFC 5382 reasoning predicts ([`grid::expected`]:
//! the path must match, and a connected pair must have delivered every message, once each, in
//! order), and the path the lab saw against the path punch reports (they must agree).

use std::path::Path;
use std::time::Instant;

use natscope_core::punch::connector::ConnectReport;

use crate::app_run::{self, AppCell, AppGrid, AppGridError};
use crate::grid::{self, Family, GridCell, PathTaken, Transport};
use crate::jobs::{self, JobError};
use crate::punch_lab::{self, CONNECT_LIMIT};

/// Why a grid could not run.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error(transparent)]
    Jobs(#[from] JobError),
    #[error(transparent)]
    Prepare(#[from] AppGridError),
    /// Punch over TCP stays on the rendezvous server's family (IPv4 in the lab).
    #[error("lab grid --family ipv6 needs --transport udp: punch over tcp uses the server's family (ipv4) only")]
    TcpOverIpv6,
}

/// Runs the cell `a` × `b` (the `index`-th of the grid) of `grid`, the built-in punch app over
/// `grid.transport`.
pub fn run_cell(grid: &AppGrid, index: usize, a: &str, b: &str) -> GridCell {
    run_cell_in(grid, Family::Ipv4, index, a, b)
}

/// [`run_cell`] with punch restricted to `family` (the grid's app for that family,
/// [`punch_lab::app_in`]), judged against the model in that family ([`grid::expected_in`]).
pub fn run_cell_in(grid: &AppGrid, family: Family, index: usize, a: &str, b: &str) -> GridCell {
    let t0 = Instant::now();
    let (mut app, stdout) = grid.run_cell_unjudged(index, a, b);
    let report = punch_lab::connect_report(stdout.as_bytes());
    // Punch's report is the program's claim; the app engine's judgment compares the lab's
    // observation with it.
    app.claimed = report.as_ref().ok().map(|r| r.path);
    app_run::judge(&mut app);
    let (expected, reason) = grid::expected_in(a, b, grid.transport, family)
        .unwrap_or((PathTaken::Failed, "unknown preset".into()));
    let mut cell = GridCell {
        a: a.into(),
        b: b.into(),
        transport: grid.transport,
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
        lab_observed: app.observed,
        evidence: app.evidence.clone(),
        durations: app.durations.clone(),
        family: Some(family),
    };
    let diagnostics = format!(
        "connector: {}; listener: {}",
        stderr_tail(&app, "connect"),
        stderr_tail(&app, "listen")
    );
    match (&app.error, app.timed_out, report) {
        (Some(e), _, _) => cell.error = Some(e.clone()),
        (None, true, _) => {
            cell.error = Some(format!(
                "punch connect did not finish within {CONNECT_LIMIT:?} ({diagnostics})"
            ))
        }
        (None, false, Err(e)) => {
            cell.error = Some(format!(
                "punch connect printed no report: {} ({diagnostics}): {e}",
                stdout.trim()
            ))
        }
        (None, false, Ok(report)) => {
            cell.diagnostics = (report.path != PathTaken::Direct).then_some(diagnostics);
            judge(&mut cell, report, &app);
        }
    }
    cell.duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
    cell
}

/// The last three lines `role` wrote to stderr, on one line.
fn stderr_tail(app: &AppCell, role: &str) -> String {
    let text = app
        .logs
        .get(role)
        .map(|l| l.stderr_tail.as_str())
        .unwrap_or("");
    let lines: Vec<&str> = text.lines().collect();
    match lines.len() {
        0 => "(nothing on stderr)".into(),
        n => lines[n.saturating_sub(3)..].join(" | "),
    }
}

/// Fills the observation into `cell` from the connector's report and the lab's judgment of the
/// same run (`app`), and decides whether it passed.
fn judge(cell: &mut GridCell, report: ConnectReport, app: &AppCell) {
    cell.observed = Some(report.path);
    cell.time_to_direct_ms = report.time_to_direct_ms;
    cell.messages_sent = report.messages_sent;
    cell.messages_echoed = report.messages_echoed;
    // A connected pair must also have delivered every message, once each, in order.
    let delivered = report.path == PathTaken::Failed
        || (report.messages_echoed == report.messages_sent
            && report.messages_sent > 0
            && report.in_order);
    let agrees = app.disagreement.is_none() && app.observed == Some(report.path);
    // Where the birthday technique applies (IPv4 cells), its direct path passes as well as the
    // relay it falls back to (grid::birthday).
    let birthday = cell.family != Some(grid::Family::Ipv6)
        && cell.expected == PathTaken::Relayed
        && grid::birthday(&cell.a, &cell.b, cell.transport).is_some();
    let path_ok = cell.observed == Some(cell.expected)
        || (birthday && cell.observed == Some(PathTaken::Direct));
    cell.pass = path_ok && delivered && agrees;
    if !delivered {
        cell.reason = format!(
            "{} (data: {}/{} echoed, in order: {})",
            cell.reason, cell.messages_echoed, cell.messages_sent, report.in_order
        );
    }
    if !agrees {
        let lab = app
            .observed
            .map_or("nothing it could judge".to_string(), |p| p.to_string());
        cell.reason = format!(
            "{} (punch reports {}, the lab saw {lab})",
            cell.reason, report.path
        );
    }
    if !cell.pass {
        cell.report = Some(report);
    }
}

/// Runs the plain grid: natscope punch over every unordered pair of `names`, for each transport,
/// `jobs` cells at a time, in labs named `prefix`…, with `exe` as the natscope the nodes run.
pub fn run_grid(
    names: &[String],
    transports: &[Transport],
    jobs: usize,
    prefix: &str,
    exe: &Path,
) -> Result<grid::GridDocument, GridError> {
    run_grid_in(names, transports, &[Family::Ipv4], jobs, prefix, exe)
}

/// [`run_grid`] for every one of `families` too (`lab grid --family`, issue 13): each cell's
/// punch restricted to its family, transports first, then families.
pub fn run_grid_in(
    names: &[String],
    transports: &[Transport],
    families: &[Family],
    jobs: usize,
    prefix: &str,
    exe: &Path,
) -> Result<grid::GridDocument, GridError> {
    if transports.contains(&Transport::Tcp) && families.contains(&Family::Ipv6) {
        return Err(GridError::TcpOverIpv6);
    }
    let mut grids = Vec::new();
    for t in transports {
        for f in families {
            let app = punch_lab::app_in(exe, *t, *f);
            let g = AppGrid::prepare(app, &std::env::temp_dir(), prefix, exe)?;
            let g = g.with_transport(*t).with_peer_ipv6(*f == Family::Ipv6);
            grids.push((g, *f));
        }
    }
    let mut work = Vec::new();
    for (g, f) in &grids {
        for (x, y) in app_run::pairs(names) {
            work.push((g, *f, x, y));
        }
    }
    let start = Instant::now();
    let cells = jobs::run_parallel_shown(&work, jobs, "cells", |i, (g, f, x, y)| {
        run_cell_in(g, *f, i, x, y)
    });
    for (g, _) in grids {
        g.finish();
    }
    let cells = cells?;
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
            lab_observed: None,
            evidence: None,
            durations: Default::default(),
            family: None,
        }
    }

    /// The app engine's record of the same run: the lab saw `path`.
    fn lab(path: PathTaken) -> AppCell {
        AppCell {
            a: "full-cone".into(),
            b: "symmetric".into(),
            expected: PathTaken::Direct,
            expected_from: "model".into(),
            reason: String::new(),
            observed: Some(path),
            claimed: Some(path),
            disagreement: None,
            pass: true,
            exit_status: Some(0),
            timed_out: false,
            error: None,
            evidence: None,
            durations: Default::default(),
            logs: Default::default(),
        }
    }

    /// A connector's report that took `path` and got `echoed` of `sent` messages back.
    fn report(path: PathTaken, sent: u64, echoed: u64, in_order: bool) -> ConnectReport {
        ConnectReport {
            schema: SCHEMA,
            natscope_version: String::new(),
            transport: Transport::Udp,
            path,
            family: None,
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
        judge(&mut c, r, &lab(PathTaken::Direct));
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
        judge(&mut c, r.clone(), &lab(PathTaken::Relayed));
        assert!(!c.pass);
        assert_eq!(c.reason, "why (data: 4/5 echoed, in order: true)");
        assert_eq!(c.report, Some(r), "a failed cell keeps the report");
        let mut c = cell(PathTaken::Relayed);
        judge(
            &mut c,
            report(PathTaken::Relayed, 5, 5, false),
            &lab(PathTaken::Relayed),
        );
        assert!(!c.pass);
        assert_eq!(c.reason, "why (data: 5/5 echoed, in order: false)");
    }

    #[test]
    fn a_failed_pair_needs_no_data_but_the_expected_path() {
        let mut c = cell(PathTaken::Failed);
        judge(
            &mut c,
            report(PathTaken::Failed, 0, 0, true),
            &lab(PathTaken::Failed),
        );
        assert!(c.pass);
        let mut c = cell(PathTaken::Direct);
        judge(
            &mut c,
            report(PathTaken::Relayed, 3, 3, true),
            &lab(PathTaken::Relayed),
        );
        assert!(!c.pass, "the wrong path fails even with the data through");
        assert_eq!(c.observed, Some(PathTaken::Relayed));
    }

    #[test]
    fn a_cell_fails_when_the_lab_saw_another_path_than_punch_reports() {
        let mut c = cell(PathTaken::Direct);
        judge(
            &mut c,
            report(PathTaken::Direct, 5, 5, true),
            &lab(PathTaken::Relayed),
        );
        assert!(!c.pass);
        assert_eq!(c.reason, "why (punch reports direct, the lab saw relayed)");
        let mut unseen = lab(PathTaken::Direct);
        unseen.observed = None;
        unseen.disagreement = Some("the app says direct, the lab could not observe".into());
        let mut c = cell(PathTaken::Direct);
        judge(&mut c, report(PathTaken::Direct, 5, 5, true), &unseen);
        assert!(!c.pass);
        assert_eq!(
            c.reason,
            "why (punch reports direct, the lab saw nothing it could judge)"
        );
    }

    /// A cell with its report, as `lab grid --json` writes it, reads back as the same cell.
    #[test]
    fn a_cell_with_its_report_reads_back_typed() {
        let mut c = cell(PathTaken::Direct);
        judge(
            &mut c,
            report(PathTaken::Relayed, 3, 3, true),
            &lab(PathTaken::Relayed),
        );
        let text = serde_json::to_string_pretty(&c).expect("json");
        let back: GridCell = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, c);
        assert!(text.contains("\"observed\": \"relayed\""), "{text}");
    }
}
