//! One cell of `natscope lab grid`: a lab for a pair of presets ([`grid::pair_topology`]), punch
//! run in it ([`crate::punch_lab`]), and the outcome judged against the one RFC 4787 / RFC 5382
//! reasoning predicts ([`grid::expected`]): the path must match, and a connected pair must also
//! have delivered every message, once each, in order.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::grid::{self, Outcome, Transport};
use crate::jobs;
use crate::punch_lab::{Peer, PunchLab, PunchLabError};
use crate::topology::TopologyError;
use crate::{Lab, LabError, LabOptions};

/// How long `punch connect` may take (it gives up after 8 s itself).
const CONNECT_LIMIT: Duration = Duration::from_secs(20);

/// One pair's result: the `natscope.grid/v1` document's cell.
#[derive(Debug, Serialize)]
pub struct Cell {
    pub a: String,
    pub b: String,
    pub transport: Transport,
    pub expected: Outcome,
    pub observed: Option<Outcome>,
    pub time_to_direct_ms: Option<f64>,
    pub messages_sent: u64,
    pub messages_echoed: u64,
    /// The expected outcome's reason (RFC 4787 / RFC 5382).
    pub reason: String,
    pub pass: bool,
    pub error: Option<String>,
    /// stderr of the two peers, kept for cells that did not go direct.
    pub diagnostics: Option<String>,
    /// The connector's full `natscope.punch/v1` report, kept for cells that did not pass.
    pub report: Option<Value>,
    pub duration_ms: f64,
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

/// Runs the cell `a` × `b` over `t` in a lab named after `index`, with `exe` as natscope.
pub fn run_cell(index: usize, a: &str, b: &str, t: Transport, exe: &Path) -> Cell {
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
        Ok(report) => judge(&mut cell, &report),
        Err(e) => cell.error = Some(jobs::error_line(&e)),
    }
    cell.duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
    cell
}

/// Fills the observation into `cell` from the connector's report and decides whether it passed.
fn judge(cell: &mut Cell, report: &Value) {
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
    cell.pass = cell.observed == Some(cell.expected) && delivered;
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

/// The connector's `natscope.punch/v1` report, with the peers' stderr added when it did not go
/// direct.
fn punch_in_lab(
    index: usize,
    a: &str,
    b: &str,
    t: Transport,
    exe: &Path,
) -> Result<Value, CellError> {
    let topo = grid::pair_topology(a, b).ok_or(CellError::NoTopology)?;
    let lab = Lab::up(
        &jobs::lab_name("gd", index),
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
    let mut report: Value =
        serde_json::from_slice(&stdout).map_err(|source| CellError::NoReport {
            text: String::from_utf8_lossy(&stdout).trim().to_string(),
            diagnostics: diagnostics.clone(),
            source,
        })?;
    if report["path"] != "direct" {
        report["diagnostics"] = Value::String(diagnostics);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cell(expected: Outcome) -> Cell {
        Cell {
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

    #[test]
    fn a_cell_passes_on_the_expected_path_with_every_message_delivered() {
        let mut c = cell(Outcome::Direct);
        let report = json!({"path": "direct", "time_to_direct_ms": 12.5,
            "messages_sent": 5, "messages_echoed": 5, "in_order": true});
        judge(&mut c, &report);
        assert!(c.pass);
        assert_eq!(c.observed, Some(Outcome::Direct));
        assert_eq!(c.time_to_direct_ms, Some(12.5));
        assert_eq!(c.report, None);
        assert_eq!(c.reason, "why");
    }

    #[test]
    fn a_lost_or_reordered_message_fails_a_connected_cell() {
        let mut c = cell(Outcome::Relayed);
        let report = json!({"path": "relayed", "messages_sent": 5, "messages_echoed": 4,
            "in_order": true, "diagnostics": "stderr"});
        judge(&mut c, &report);
        assert!(!c.pass);
        assert_eq!(c.reason, "why (data: 4/5 echoed, in order: true)");
        assert_eq!(c.diagnostics.as_deref(), Some("stderr"));
        assert!(c.report.is_some(), "a failed cell keeps the report");
        let mut c = cell(Outcome::Relayed);
        let report = json!({"path": "relayed", "messages_sent": 5, "messages_echoed": 5,
            "in_order": false});
        judge(&mut c, &report);
        assert!(!c.pass);
    }

    #[test]
    fn a_failed_pair_needs_no_data_but_the_expected_path() {
        let mut c = cell(Outcome::Failed);
        judge(&mut c, &json!({"path": "failed", "messages_sent": 0}));
        assert!(c.pass);
        let mut c = cell(Outcome::Direct);
        judge(
            &mut c,
            &json!({"path": "relayed", "messages_sent": 3,
            "messages_echoed": 3, "in_order": true}),
        );
        assert!(!c.pass, "the wrong path fails even with the data through");
    }
}
