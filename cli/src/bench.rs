//! `natscope bench reflect`: loads a STUN server with Binding requests and reports what it took.
//!
//! The load generator is [`natscope_probes::bench`]; this file parses the target, refuses to aim
//! load at anything but loopback unless told otherwise (a benchmark pointed at someone else's server
//! is a flood), and renders the report as a table or one JSON document.
//!
//! Exit codes: 0 the run completed, 1 it completed but the server gave no valid answers or some
//! invalid ones, 2 usage or runtime error.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use comfy_table::{presets, CellAlignment, Table};
use natscope_probes::bench::{run_load, LoadConfig, LoadReport, MAX_DURATION};

#[derive(Args, Debug)]
pub struct BenchReflectArgs {
    /// The STUN server to load, HOST:PORT. Must be loopback unless --allow-remote is given.
    #[arg(value_name = "HOST:PORT")]
    target: String,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Client sockets (one thread each).
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// Requests kept outstanding per socket.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Allow a target outside 127.0.0.0/8 and ::1. Only for servers you operate: this is a flood.
    #[arg(long)]
    allow_remote: bool,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// Resolves `target` and picks the address to load: a loopback one if any, so `localhost` works,
/// and with `allow_remote` the first one.
fn resolve_target(target: &str, allow_remote: bool) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {target:?} (expected HOST:PORT)"))?
        .collect();
    if let Some(a) = addrs.iter().find(|a| is_loopback(a.ip())) {
        return Ok(*a);
    }
    match addrs.first() {
        None => bail!("{target:?} resolves to no address"),
        Some(a) if allow_remote => Ok(*a),
        Some(a) => bail!(
            "refusing to load {a}: not a loopback address (pass --allow-remote for a server you operate)"
        ),
    }
}

/// 127.0.0.0/8, ::1, and 127/8 written as an IPv4-mapped IPv6 address.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn duration(seconds: f64) -> Result<Duration> {
    if !seconds.is_finite() || seconds <= 0.0 || seconds > MAX_DURATION.as_secs_f64() {
        bail!(
            "--seconds must be above 0 and at most {}",
            MAX_DURATION.as_secs()
        );
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub fn run_reflect(args: BenchReflectArgs) -> Result<ExitCode> {
    let target = resolve_target(&args.target, args.allow_remote)?;
    let cfg = LoadConfig {
        target,
        duration: duration(args.seconds)?,
        sockets: args.sockets,
        window: args.window,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let report = run_load(&cfg).with_context(|| format!("benchmark of {target} failed"))?;
    if args.json {
        crate::emit(&serde_json::to_string_pretty(&report.document())?);
    } else {
        crate::emit(&render_table(&report));
    }
    Ok(if report.responses == 0 || report.invalid > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The report as a two-column metric/value table.
fn render_table(r: &LoadReport) -> String {
    let rows: [(&str, String); 14] = [
        ("target", r.target.to_string()),
        ("seconds", format!("{:.1}", r.seconds)),
        ("sockets", r.sockets.to_string()),
        ("window", r.window.to_string()),
        ("requests sent", r.requests_sent.to_string()),
        ("responses", r.responses.to_string()),
        ("lost", r.lost.to_string()),
        ("late", r.late.to_string()),
        ("invalid", r.invalid.to_string()),
        ("errors", r.errors.to_string()),
        ("requests/s", format!("{:.0}", r.requests_per_second)),
        ("p50 latency (µs)", r.p50_us.to_string()),
        ("p99 latency (µs)", r.p99_us.to_string()),
        ("max latency (µs)", r.max_us.to_string()),
    ];
    let mut t = Table::new();
    t.load_preset(presets::ASCII_MARKDOWN)
        .set_header(["metric", "value"]);
    for (metric, value) in rows {
        t.add_row([metric.to_string(), value]);
    }
    if let Some(c) = t.column_mut(1) {
        c.set_cell_alignment(CellAlignment::Right);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        for t in [
            "127.0.0.1:3478",
            "127.0.0.5:3478",
            "[::1]:3478",
            "[::ffff:127.0.0.2]:9",
        ] {
            let a = resolve_target(t, false).unwrap();
            assert!(is_loopback(a.ip()), "{t} -> {a}");
        }
        assert!(is_loopback(
            resolve_target("localhost:3478", false).unwrap().ip()
        ));
    }

    #[test]
    fn remote_targets_are_refused_without_allow_remote() {
        for t in [
            "192.0.2.1:3478",
            "[2001:db8::1]:3478",
            "[::ffff:192.0.2.1]:3478",
            "10.0.0.1:1",
        ] {
            let err = resolve_target(t, false).unwrap_err().to_string();
            assert!(err.contains("--allow-remote"), "{t}: {err}");
            assert_eq!(resolve_target(t, true).unwrap(), t.parse().unwrap());
        }
    }

    #[test]
    fn malformed_targets_are_errors() {
        for t in ["127.0.0.1", "no port", ""] {
            assert!(resolve_target(t, true).is_err(), "{t}");
        }
    }

    #[test]
    fn seconds_bounds() {
        assert_eq!(duration(0.5).unwrap(), Duration::from_millis(500));
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert!(duration(s).is_err(), "{s}");
        }
    }

    fn report() -> LoadReport {
        LoadReport {
            target: "127.0.0.1:3478".parse().unwrap(),
            seconds: 5.0,
            sockets: 4,
            window: 32,
            requests_sent: 1000,
            responses: 990,
            lost: 10,
            late: 2,
            invalid: 0,
            errors: 0,
            requests_per_second: 198.04,
            p50_us: 120,
            p99_us: 900,
            max_us: 4000,
        }
    }

    #[test]
    fn table_rendering() {
        let want = "\
| metric           |          value |
|------------------|----------------|
| target           | 127.0.0.1:3478 |
| seconds          |            5.0 |
| sockets          |              4 |
| window           |             32 |
| requests sent    |           1000 |
| responses        |            990 |
| lost             |             10 |
| late             |              2 |
| invalid          |              0 |
| errors           |              0 |
| requests/s       |            198 |
| p50 latency (µs) |            120 |
| p99 latency (µs) |            900 |
| max latency (µs) |           4000 |";
        assert_eq!(render_table(&report()), want);
    }

    #[test]
    fn json_document_carries_the_schema_and_every_field() {
        let r = report();
        let v = serde_json::to_value(r.document()).unwrap();
        assert_eq!(v["schema"], natscope_probes::bench::SCHEMA);
        assert_eq!(v["natscope_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["target"], "127.0.0.1:3478");
        assert_eq!(v["responses"], 990);
        assert_eq!(v["p99_us"], 900);
        assert_eq!(v["requests_per_second"], 198.04);
        assert_eq!(v.as_object().unwrap().len(), 16);
    }
}
