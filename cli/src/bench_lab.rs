//! `natscope bench lab`: what the lab costs and what its userspace NAT does to traffic.
//!
//! The numbers quoted in the issue notes and the README (how long a lab takes to come up and go
//! down, and how the userspace engine compares with the kernel's masquerade and with no NAT at
//! all) come from here, so they can be re-measured with one command instead of by hand. Every
//! measurement runs inside real labs on this machine: sender, NAT and receiver share its cores, so
//! the first line of output says what the numbers depend on. The generators are
//! [`natscope_lab::bench`]; this file chooses the paths, parses the flags and renders.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use comfy_table::{presets as table_presets, Table};
use natscope_lab::bench::{
    big_lab, caveat, lab_name, ping_pong, preset_lab, tcp_bulk, udp_flood, up_down,
    BenchLabDocument as Document, Spread, PINGS, WARMUP,
};
use natscope_lab::{netns, LabOptions};
/// The traffic sections run through these presets: no NAT, the userspace engine, the kernel.
const PATHS: [&str; 3] = ["open", "port-restricted-cone", "linux"];
#[derive(Args, Debug)]
pub struct BenchLabArgs {
    /// Up/down runs of the 2-host preset `port-restricted-cone`.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Up/down runs of the 20-NAT topology (0 skips it).
    #[arg(long, default_value_t = 3)]
    big_runs: usize,
    /// How long each throughput test sends, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Offered load of the paced UDP test, packets/s (the flood test offers as much as one
    /// sender thread can).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchLabArgs) -> Result<ExitCode> {
    if !(1..=100).contains(&args.runs) || args.big_runs > 20 {
        bail!("--runs must be 1..=100 and --big-runs 0..=20");
    }
    if !args.seconds.is_finite() || !(0.1..=60.0).contains(&args.seconds) {
        bail!("--seconds must be between 0.1 and 60");
    }
    netns::check_privileges()?;
    let secs = Duration::from_secs_f64(args.seconds);
    let mut doc = Document::new(caveat());
    if !args.json {
        crate::emit(&format!("# {}", doc.caveat));
    }
    doc.lab_up_down.push(up_down(
        "port-restricted-cone (2 hosts)",
        'u',
        args.runs,
        |name| preset_lab(name, "port-restricted-cone", options()),
    )?);
    if args.big_runs > 0 {
        doc.lab_up_down
            .push(up_down("20 NATs, 20 hosts", 'b', args.big_runs, |name| {
                big_lab(name, options())
            })?);
    }
    for path in PATHS {
        let lab = preset_lab(&lab_name('t', doc.udp_rtt.len()), path, options())
            .with_context(|| format!("bringing up preset {path}"))?;
        for rate in [None, Some(args.rate)] {
            doc.udp_64b.push(
                udp_flood(&lab, path, secs, rate).with_context(|| format!("UDP via {path}"))?,
            );
        }
        doc.tcp_bulk
            .push(tcp_bulk(&lab, path, secs).with_context(|| format!("TCP via {path}"))?);
        doc.udp_rtt
            .push(ping_pong(&lab, path).with_context(|| format!("RTT via {path}"))?);
        lab.down();
    }
    let open_p50 = doc.udp_rtt[0].p50_us as i64;
    for l in doc.udp_rtt.iter_mut().skip(1) {
        l.added_p50_us = Some(l.p50_us as i64 - open_p50);
    }
    crate::emit(&if args.json {
        serde_json::to_string_pretty(&doc)?
    } else {
        render(&doc)
    });
    Ok(ExitCode::SUCCESS)
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(table_presets::ASCII_MARKDOWN)
        .set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

fn render(d: &Document) -> String {
    let ms = |s: &Spread| format!("{:.0} / {:.0} / {:.0}", s.min, s.median, s.max);
    let ud = d.lab_up_down.iter().map(|u| {
        vec![
            u.topology.clone(),
            u.runs.to_string(),
            ms(&u.up_ms),
            ms(&u.down_ms),
        ]
    });
    let udp = d.udp_64b.iter().map(|u| {
        vec![
            u.path.to_string(),
            u.offered_per_second
                .map_or("flood".into(), |r| r.to_string()),
            format!("{:.0}", u.sent_per_second),
            format!("{:.0}", u.received_per_second),
            format!("{:.1}", u.loss_pct),
            u.nat_forwarded
                .map_or("-".into(), |f| format!("{:.0}", f as f64 / u.seconds)),
            u.send_errors.to_string(),
        ]
    });
    let tcp = d.tcp_bulk.iter().map(|t| {
        vec![
            t.path.to_string(),
            format!("{:.1}", t.mb_per_second),
            format!("{:.1}", t.seconds),
        ]
    });
    let rtt = d.udp_rtt.iter().map(|l| {
        vec![
            l.path.to_string(),
            l.p50_us.to_string(),
            l.p99_us.to_string(),
            l.added_p50_us.map_or("-".into(), |a| format!("{a:+}")),
            format!("{} / {}", l.samples, l.lost),
        ]
    });
    [
        "\nLab up / down (ms, min / median / max)".to_string(),
        table(&["topology", "runs", "up", "down"], ud.collect()),
        "\nUDP 64-byte packets, h1 -> stun, one sender thread (flood, then paced)".into(),
        table(
            &[
                "path",
                "offered/s",
                "sent/s",
                "received/s",
                "loss %",
                "engine forwarded/s",
                "send errors",
            ],
            udp.collect(),
        ),
        "\nTCP bulk, h1 -> stun, 64 KiB writes".into(),
        table(&["path", "MB/s", "seconds"], tcp.collect()),
        format!("\nUDP round trip h1 <-> stun, {PINGS} after {WARMUP} warm-up (µs)"),
        table(
            &["path", "p50", "p99", "added p50 vs open", "samples / lost"],
            rtt.collect(),
        ),
    ]
    .join("\n")
}

fn options() -> LabOptions {
    LabOptions {
        natscope_bin: std::env::current_exe().ok(),
        ..Default::default()
    }
}
