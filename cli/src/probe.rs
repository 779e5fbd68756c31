//! `natscope probe`: classifies the NAT in front of this host against STUN servers and renders the
//! verdicts with their evidence (DESIGN.md, "Output contracts"; the JSON schema is docs/probe.md).
//!
//! The classification itself is the probe engine's ([`natscope_probes::probe`]): this file resolves
//! the server names ([`natscope_probes::resolve`]), turns the timing flags into the engine's `Timing`, drives the engine with a progress bar,
//! and renders the report. With several servers the engine classifies the first one, and a Binding
//! from one socket to every server shows whether the mapping changes with the destination (the
//! RFC 4787 §4.1 question, answerable without RFC 5780 support on the servers).
//!
//! Every test of one run — the engine's, `--tcp`, the comparison, `--lifetime`, in that order —
//! starts its transactions through one [`Pacer`], handed from test to test, so the whole run keeps
//! to RFC 5780 §5 (at most ten new transactions per second) when pacing is on ([`Pacing::decide`]:
//! on when any server may be public, `--pace` / `--no-pace` override).
//!
//! Exit codes: 0 a classification was made, 1 UDP is blocked or the result is unknown, 2 usage or
//! runtime error (bad address, unresolvable name, no permission).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, CellAlignment, ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use natscope_probes::probe::comparison::{compare_mappings, MappingComparison};
use natscope_probes::probe::{
    driver, families, family, Family, FamilyChoice, Ipv6Report, LifetimeConfig, LifetimeProbe,
    LifetimeReport, PaceChoice, Pacer, Pacing, ProbeConfig, ProbeDocument, ProbeReport,
};
use natscope_probes::resolve::{server_address, Service};

/// Public STUN servers `--public` uses. They are contacted only when the user passes `--public`
/// (DESIGN.md, "Safety"); neither implements RFC 5780, so they give the mapping comparison only.
pub const PUBLIC_SERVERS: [&str; 2] = ["stun.l.google.com:19302", "stun.cloudflare.com:3478"];

/// Largest `--timeout` accepted, in ms (a single wait longer than this is a typo, not a network).
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Largest `--retries` accepted.
const MAX_RETRIES: u32 = 50;
/// Largest `--lifetime-max` accepted, in seconds (the search takes several times this long).
const MAX_LIFETIME_S: u64 = 3600;

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// STUN server(s) as HOST:PORT. The first is classified (full RFC 5780 tests if it sends
    /// OTHER-ADDRESS); with several, one socket's mapped address is compared across all of them.
    #[arg(value_name = "SERVER")]
    servers: Vec<String>,
    /// Print one JSON document (schema natscope.probe/v1) instead of tables.
    #[arg(long)]
    json: bool,
    /// Probe the public STUN servers in PUBLIC_SERVERS (they see your address). Never implied.
    #[arg(long, conflicts_with = "servers")]
    public: bool,
    /// Probe the first of PUBLIC_RFC5780_SERVERS (third parties' servers that sent OTHER-ADDRESS
    /// when last checked; they see your address) that answers with OTHER-ADDRESS: a NAT type
    /// without a server of your own (docs/deploy.md). Never implied.
    #[arg(long, conflicts_with_all = ["servers", "public"])]
    public_rfc5780: bool,
    /// Also test the TCP mapping (RFC 5382 §4.1): after the UDP probe, connections from one local
    /// port to A1:P1, A2:P1 and A2:P2 of the first server, one Binding each (STUN over TCP).
    #[arg(long)]
    tcp: bool,
    /// Also measure how long a UDP binding lives without traffic (RFC 5780 §4.6) and whether
    /// inbound traffic refreshes it (RFC 4787 REQ-6). Takes minutes: every step waits in real time.
    #[arg(long)]
    lifetime: bool,
    /// Longest idle time `--lifetime` tries, in seconds; a binding outliving it is reported as
    /// "≥ SECS" (default 300, RFC 4787 REQ-5's recommendation).
    #[arg(long, value_name = "SECS", requires = "lifetime", default_value_t = 300, value_parser = clap::value_parser!(u64).range(2..=MAX_LIFETIME_S))]
    lifetime_max: u64,
    /// Skip the hairpinning test (RFC 5780 §4.5).
    #[arg(long)]
    no_hairpin: bool,
    /// Start at most 10 new STUN transactions per second (RFC 5780 §5), whatever the servers.
    /// The default paces when any server may be public (not loopback, private, CGNAT, link-local
    /// or a documentation range).
    #[arg(long, conflicts_with = "no_pace")]
    pace: bool,
    /// Never pace: start transactions as fast as the tests allow, even towards public servers.
    #[arg(long)]
    no_pace: bool,
    /// Initial retransmission timeout in ms, used until a round trip is measured (default 200).
    /// The adaptive RTO is then floored at min(5, MS) ms (min(20, MS) for --lifetime) and capped
    /// at max(3000, 2×MS) ms.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    timeout: Option<u64>,
    /// Retransmissions per request: each request is sent at most 1+N times (default: 6 for the
    /// reachability test, up to 23 for later ones while the loss estimate asks for them). A small
    /// N ends sooner but can leave negative verdicts "unknown": they need the full retry budget.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RETRIES)))]
    retries: Option<u32>,
    /// The bound on the UDP classification, in seconds (fractions allowed; default 5): under loss
    /// the probe retransmits and waits longer for evidence, never past this. Tests still open
    /// then are reported `unknown`. 0.1–600.
    #[arg(long, value_name = "SECS", value_parser = ProbeConfig::parse_max_time)]
    max_time: Option<Duration>,
    /// Address families to classify at once: 4, 6, both, or auto (every family the first
    /// server's name resolves to). --tcp, --lifetime and the comparison use the IPv4 run.
    #[arg(long, value_name = "4|6|both|auto", default_value = "auto", value_parser = FamilyChoice::parse)]
    family: FamilyChoice,
    /// Skip asking the default gateway for NAT-PMP and PCP (asked by default, beside the STUN tests).
    #[arg(long, conflicts_with = "map")]
    no_port_mapping: bool,
    /// Create a short-lived UDP mapping (PCP, NAT-PMP or UPnP), prove it inbound, then delete it.
    #[arg(long)]
    map: bool,
}

pub fn run(args: ProbeArgs) -> Result<ExitCode> {
    let names: Vec<String> = if args.public_rfc5780 {
        Vec::new()
    } else if args.public {
        PUBLIC_SERVERS.iter().map(|s| s.to_string()).collect()
    } else if args.servers.is_empty() {
        bail!(
            "no server given: name one as HOST:PORT (e.g. `natscope reflect` on a host you run), or pass --public to probe {} (public servers: they see your address)",
            PUBLIC_SERVERS.join(" and ")
        );
    } else {
        args.servers.clone()
    };
    let mut servers = Vec::with_capacity(names.len());
    for n in &names {
        servers.push(server_address(n, Service::STUN)?);
    }
    if args.public_rfc5780 {
        servers = vec![natscope_probes::client::pick_public_rfc5780().map_err(|e| anyhow!("{e}"))?];
    }
    let Some(&first) = servers.first() else {
        bail!("no server given");
    };
    let named = names.first().filter(|_| !args.public_rfc5780);
    let fams = families::servers(named.map_or(&first.to_string(), |n| n), args.family)
        .map_err(anyhow::Error::msg)?;
    let choice = match (args.pace, args.no_pace) {
        (true, _) => PaceChoice::On,
        (_, true) => PaceChoice::Off,
        _ => PaceChoice::Default,
    };
    let pacing = Pacing::decide(&servers, choice);
    let cfg = probe_config(&args, first);
    let timing = cfg.timing;
    let family_cfg = |s: SocketAddr| ProbeConfig {
        pacing: families::pacing_for(&servers, s, choice),
        ..probe_config(&args, s)
    };

    let bar = progress_bar(format!("probing {first}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let result = rt.block_on(families::drive_families(
        fams,
        driver::DEADLINE.max(cfg.max_time * 2),
        natscope_probes::portmap::Options::from_flags(args.no_port_mapping, args.map),
        family_cfg,
        |n| {
            bar.set_message(format!("probing {first}: {n} requests sent"));
            bar.tick();
        },
    ));
    // One pacer for the whole run: each later test continues the engine's.
    let (mut report, mut pacer, fam, beside, mut requests) = match result {
        Ok(run) => {
            run.warnings.iter().for_each(|w| tracing::warn!("{w}"));
            let mut r = run.primary.report();
            let n = r.requests_sent + run.ipv6.as_ref().map_or(0, |v6| v6.requests_sent);
            run.port_mapping
                .into_iter()
                .for_each(|pm| r.apply_port_mapping(pm));
            (r, run.primary.pacer().clone(), run.family, run.ipv6, n)
        }
        Err(e) => {
            bar.finish_and_clear();
            bail!("{e}{}", permission_hint(&e));
        }
    };
    let first = report.server.address;
    if args.tcp {
        bar.set_message(format!("testing the tcp mapping against {first}"));
        let local_ip = match driver::route_source(first) {
            Ok(ip) => ip,
            Err(e) => {
                bar.finish_and_clear();
                bail!("cannot test the tcp mapping: no route to {first}: {e}");
            }
        };
        let step = tcp_step_timeout(args.timeout);
        let t = rt.block_on(natscope_probes::probe::tcp::tcp_mapping_paced(
            first, local_ip, step, &mut pacer,
        ));
        requests += t.requests_sent;
        t.apply_to(&mut report);
    }
    let comparison = if servers.len() > 1 {
        bar.set_message(format!(
            "comparing the mapping across {} servers",
            servers.len()
        ));
        let c = if report.udp_blocked {
            MappingComparison::not_run(&servers, "not run: the first server did not answer")
        } else {
            match rt.block_on(compare_mappings(&servers, timing, &mut pacer)) {
                Ok(c) => c,
                Err(e) => {
                    bar.finish_and_clear();
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot compare mappings across {}",
                        names.join(", ")
                    )));
                }
            }
        };
        requests += c.requests_sent;
        report.requests_sent += c.requests_sent;
        report.tests.push(c.test_row());
        Some(c)
    } else {
        None
    };
    bar.finish_and_clear();
    if args.lifetime {
        let lt = measure_lifetime(&rt, &args, first, report.udp_blocked, &pacing, pacer)?;
        requests += lt.requests_sent;
        lt.apply_to(&mut report);
    }

    let ipv6 = family::ipv6_of(fam, &report, beside);
    if args.json {
        crate::emit(&render_json(
            &report,
            comparison.as_ref(),
            Some(fam),
            ipv6.as_ref(),
        )?);
    } else {
        let wrap = if std::io::stdout().is_terminal() {
            Wrap::Terminal
        } else {
            Wrap::None
        };
        let both = render_families(&report, fam, ipv6.as_ref(), wrap);
        crate::emit(&(render_text(&report, Some(requests), wrap) + &both));
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// "Permission denied" on a UDP send means a local firewall rule or sandbox: say so.
fn permission_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        " (a local firewall rule or sandbox refuses udp here)"
    } else {
        ""
    }
}

/// The engine configuration for `server` with the flags applied.
fn probe_config(args: &ProbeArgs, server: SocketAddr) -> ProbeConfig {
    let mut cfg = ProbeConfig::new(server);
    cfg.hairpin = !args.no_hairpin;
    cfg.timing.apply_flags(args.timeout, args.retries);
    // `--retries N` is an exact cap: no widening past it under loss.
    cfg.widen_with_loss = args.retries.is_none();
    cfg.max_time = args.max_time.unwrap_or(cfg.max_time);
    cfg
}

/// The bound on each `--tcp` step (connect, then one Binding): 3 s by default, which lets a lost
/// SYN be retransmitted once (Linux retries after 1 s); with `--timeout MS`, 5×MS within 1–30 s.
fn tcp_step_timeout(timeout_ms: Option<u64>) -> Duration {
    Duration::from_millis(timeout_ms.map_or(3000, |ms| ms.saturating_mul(5).clamp(1000, 30_000)))
}

/// A spinner on stderr while the probe runs; hidden when stderr is not a terminal.
fn progress_bar(message: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

// ---------------------------------------------------------------------------------------------
// --lifetime: binding lifetime (RFC 5780 §4.6) and inbound refresh (RFC 4787 REQ-6)
// ---------------------------------------------------------------------------------------------

/// Runs the lifetime measurement against `server` with a progress bar and ETA on stderr (only when
/// stderr is a terminal). Not run when the main probe found UDP blocked: its rows then say so.
fn measure_lifetime(
    rt: &tokio::runtime::Runtime,
    args: &ProbeArgs,
    server: SocketAddr,
    udp_blocked: bool,
    pacing: &Pacing,
    pacer: Pacer,
) -> Result<LifetimeReport> {
    if udp_blocked {
        return Ok(LifetimeReport::not_run(
            "not run: the server did not answer",
        ));
    }
    let mut cfg = LifetimeConfig::new(server);
    cfg.max = Duration::from_secs(args.lifetime_max);
    cfg.pacing = pacing.clone();
    cfg.timing.apply_flags(args.timeout, args.retries);
    let deadline = LifetimeProbe::time_bound(&cfg);
    let bar = lifetime_bar();
    // The driver reports only at events (minutes apart while a binding idles); a ticker moves
    // the bar in between from the last estimate.
    let start = Instant::now();
    let estimate = std::cell::Cell::new(Duration::ZERO);
    let update = |elapsed: Duration, total: Duration| {
        bar.set_length(total.as_secs().max(elapsed.as_secs()).max(1));
        bar.set_position(elapsed.as_secs());
        let left = total.saturating_sub(elapsed).as_secs();
        bar.set_message(format!(
            "binding lifetime against {server}: at most {}m{:02}s left",
            left / 60,
            left % 60
        ));
    };
    let result = rt.block_on(async {
        let run = driver::drive(
            server,
            deadline,
            |at| LifetimeProbe::new(at, cfg).with_pacer(pacer),
            |p| {
                let now = Instant::now();
                let total = p.elapsed(now) + p.remaining(now);
                estimate.set(start.elapsed().saturating_sub(p.elapsed(now)) + total);
                update(start.elapsed(), estimate.get());
            },
        );
        let ticker = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                update(start.elapsed(), estimate.get());
            }
        };
        tokio::select! {
            r = run => r.map(|p| p.report()),
            never = ticker => never,
        }
    });
    bar.finish_and_clear();
    result.map_err(|e| {
        anyhow::anyhow!(
            "cannot measure the binding lifetime against {server}: {e}{}",
            permission_hint(&e)
        )
    })
}

/// A bar with an ETA on stderr; hidden when stderr is not a terminal.
fn lifetime_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}] {wide_bar} {pos}/{len} s")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// The `natscope.probe/v1` document (docs/probe.md), pretty-printed.
pub fn render_json(
    r: &ProbeReport,
    comparison: Option<&MappingComparison>,
    family: Option<Family>,
    ipv6: Option<&Ipv6Report>,
) -> Result<String> {
    let doc = ProbeDocument {
        report: r,
        mapping_comparison: comparison,
        family,
        ipv6,
    };
    serde_json::to_string_pretty(&doc).context("cannot encode the report as json")
}

/// Both families side by side (rows from the library), then the IPv6 translation and outlook.
fn render_families(r: &ProbeReport, fam: Family, v6: Option<&Ipv6Report>, wrap: Wrap) -> String {
    let Some(v6) = v6 else { return String::new() };
    let mut t = table(wrap);
    t.set_header(["", "IPv4", "IPv6"]);
    family::rows((fam == Family::Ipv4).then_some(r), Some(v6))
        .into_iter()
        .for_each(|row| {
            t.add_row(row);
        });
    format!("\n{t}\n{}", family::notes(v6).join("\n"))
}

/// Narrowest terminal the tables are wrapped to.
const MIN_WRAP_WIDTH: u16 = 60;

/// How wide tables may get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrap {
    /// Wrap to the terminal's width (stdout is a terminal).
    Terminal,
    /// Never wrap (pipes, files, tests).
    None,
}

fn table(wrap: Wrap) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    match wrap {
        // A terminal that reports no usable width (a pty without a size) gets unwrapped rows
        // rather than one-character columns.
        Wrap::Terminal if t.width().is_some_and(|w| w >= MIN_WRAP_WIDTH) => {
            t.set_content_arrangement(ContentArrangement::Dynamic);
        }
        Wrap::Terminal => {}
        Wrap::None => {}
    }
    t
}

fn show(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".to_string(), |a| a.to_string())
}

/// A duration for people: milliseconds with one decimal, seconds from 1 s up.
fn millis(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// The human form: a header line, the tests table, the summary, the outlook table, then server
/// problems. `requests` is the total the run sent (the report's rows overlap: the mapping row
/// includes the reachability requests whose answer it reuses).
pub fn render_text(r: &ProbeReport, requests: Option<u32>, wrap: Wrap) -> String {
    let mut out = String::new();
    let other = match r.server.other_address {
        Some(o) => format!("OTHER-ADDRESS {o}"),
        None => "no OTHER-ADDRESS".to_string(),
    };
    let cost = match requests {
        Some(n) => format!(", {n} requests in {}", millis(r.duration_ms)),
        None => format!(", {}", millis(r.duration_ms)),
    };
    out.push_str(&format!(
        "probe of {} ({other}) from {}: public address {}{cost}\n",
        r.server.address,
        show(r.local_address),
        show(r.public_address),
    ));

    let mut tests = table(wrap);
    tests.set_header(["test", "verdict", "evidence", "requests", "answers", "time"]);
    for t in r.tests.iter().chain(&r.port_mapping_rows()) {
        tests.add_row([
            t.name.clone(),
            t.verdict.clone(),
            t.evidence.clone(),
            t.requests_sent.to_string(),
            t.answers.map_or("-".into(), |n| n.to_string()),
            millis(t.duration_ms),
        ]);
    }
    for c in [3, 4, 5] {
        if let Some(col) = tests.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    out.push_str(&format!("{tests}\n{}\n", r.summary));

    let mut outlook = table(wrap);
    outlook.set_header(["peer NAT", "direct UDP", "reason"]);
    for o in &r.outlook {
        outlook.add_row([o.peer, o.direct_udp, o.reason.as_str()]);
    }
    out.push_str(&format!("{outlook}"));
    out.push_str(&format!("\npacing: {}", r.pacing.reason));
    out.push_str(&format!(
        "\ntime bound: {} (--max-time), {}; round-trip loss {:.1}% measured over {} transmissions",
        millis(r.max_time_ms),
        if r.time_bound_reached {
            "reached: tests still open then are unknown"
        } else {
            "not reached"
        },
        r.loss_estimate * 100.0,
        r.loss_transmissions
    ));

    if let Some(c) = r.negative_confidence {
        out.push_str(&format!(
            "\nnegative verdicts: {:.6}% confidence (round-trip loss {:.1}%, waited up to {})",
            c * 100.0,
            r.loss_estimate * 100.0,
            millis(r.retry_budget_ms)
        ));
    }
    for p in &r.server.problems {
        out.push_str(&format!("\nserver problem: {p}"));
    }
    if r.server.problems_omitted > 0 {
        let n = r.server.problems_omitted;
        out.push_str(&format!("\nserver problem: {n} more left out"));
    }
    if r.udp_blocked {
        out.push_str(&format!(
            "\nhint: nothing answered {}; check that a stun server listens there on udp, else udp is blocked on this path",
            r.server.address
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use natscope_probes::probe::comparison::ComparedServer;
    use natscope_probes::probe::report::{
        OutlookRow, PortAllocationReport, ServerReport, TestReport, SCHEMA,
    };
    use natscope_probes::probe::Timing;
    use natscope_probes::probe::{AllocationPattern, Behavior, Classic};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn row(name: &str, verdict: &str, evidence: &str, n: u32, ms: f64) -> TestReport {
        TestReport {
            name: name.into(),
            verdict: verdict.into(),
            evidence: evidence.into(),
            requests_sent: n,
            duration_ms: ms,
            answers: None,
            miss_chance: None,
        }
    }

    fn outlook_row(peer: &'static str, direct_udp: &'static str, reason: &str) -> OutlookRow {
        OutlookRow {
            peer,
            direct_udp,
            reason: reason.into(),
        }
    }

    /// What the engine reports against `natscope reflect` on loopback (shape of a real run; the
    /// rendering is under test here, not the engine, so every value is spelled out).
    fn open_internet() -> ProbeReport {
        let local = addr("127.0.0.1:40000");
        let opens = "at least one direction opens";
        let mut r = ProbeReport {
            schema: SCHEMA,
            natscope_version: "0.1.0-test".into(),
            local_address: Some(local),
            public_address: Some(local),
            nat_detected: Some(false),
            udp_blocked: false,
            mapping: Behavior::EndpointIndependent,
            filtering: Behavior::EndpointIndependent,
            port_preservation: Some(true),
            port_allocation: PortAllocationReport {
                pattern: AllocationPattern::Preserving,
                delta: None,
                samples: vec![(40003, 40003), (40004, 40004), (40005, 40005)],
                predictability: "the external port equals the local port".into(),
            },
            hairpinning: None,
            binding_lifetime_s: None,
            tcp_mapping: Behavior::Unknown,
            alg_detected: Some(false),
            classic: Classic::OpenInternet,
            server: ServerReport {
                address: addr("127.0.0.1:3478"),
                other_address: Some(addr("127.0.0.2:3479")),
                problems: vec![],
                problems_omitted: 0,
            },
            tests: vec![
                row("udp reachability", "reachable", "answer from 127.0.0.1:3478", 4, 0.25),
                row("nat presence", "no nat", "local 127.0.0.1:40000 mapped 127.0.0.1:40000", 0, 0.0),
                row("mapping", "endpoint-independent", "no nat: via A1:P1 127.0.0.1:40000, via A2:P1 127.0.0.1:40000", 6, 0.5),
                row("filtering", "endpoint-independent", "answers from 127.0.0.2:3479 and 127.0.0.1:3479 both arrived", 2, 0.3),
                row("hairpinning", "unknown", "not applicable without a nat", 0, 0.0),
                row("port allocation", "preserving", "local→external 40003→40003 40004→40004 40005→40005", 3, 0.9),
            ],
            outlook: vec![
                outlook_row("full cone", "yes", opens),
                outlook_row("symmetric (random ports)", "yes", opens),
            ],
            loss_estimate: 0.0,
            negative_confidence: None,
            retry_budget_ms: 0.0,
            summary: "Open internet (no NAT, no filtering) (EIM + EIF), ports preserved — direct connections should work with every common NAT".into(),
            requests_sent: 13,
            duration_ms: 1.75,
            pacing: Pacing::decide(&[addr("127.0.0.1:3478")], PaceChoice::Default),
            address_pooling: None,
            tcp_port_preservation: None,
            max_time_ms: 5000.0,
            time_bound_reached: false,
            loss_transmissions: 15,
            port_mapping: None,
            double_nat: None,
            cgnat: None,
        };
        for (t, n) in r
            .tests
            .iter_mut()
            .zip([Some(4), None, Some(6), Some(2), None, Some(3)])
        {
            t.answers = n;
        }
        r
    }

    /// A port-restricted cone, a wrong-source answer and a mapping comparison: every optional line.
    fn cone_with_problems() -> ProbeReport {
        let mut r = open_internet();
        r.nat_detected = Some(true);
        r.public_address = Some(addr("198.51.100.7:61000"));
        r.filtering = Behavior::AddressAndPortDependent;
        r.classic = Classic::PortRestrictedCone;
        r.tests = vec![
            row(
                "udp reachability",
                "reachable",
                "answer from 127.0.0.1:3478",
                4,
                12.0,
            ),
            row(
                "filtering",
                "address-and-port-dependent",
                "no answer",
                30,
                2400.25,
            ),
        ];
        r.tests.push(comparison(Some(true)).test_row());
        r.outlook = vec![
            outlook_row(
                "port-restricted cone",
                "yes",
                "at least one direction opens",
            ),
            outlook_row("symmetric (random ports)", "no", "use a relay"),
        ];
        r.negative_confidence = Some(0.999_999_5);
        r.loss_estimate = 0.025;
        r.retry_budget_ms = 2400.0;
        r.summary = "Port-restricted cone NAT (EIM + APDF)".into();
        r.server.problems = vec![
            "filtering test II: answer expected from 127.0.0.2:3479 came from 127.0.0.1:3478 (RESPONSE-ORIGIN absent)".into(),
        ];
        r.pacing = Pacing::decide(&[addr("127.0.0.1:3478")], PaceChoice::On);
        r.tests[1].answers = Some(3);
        r.tests[1].miss_chance = Some(5e-7);
        r.server.problems_omitted = 2;
        r.time_bound_reached = true;
        r
    }

    fn comparison(varies: Option<bool>) -> MappingComparison {
        let m1 = addr("198.51.100.7:61000");
        let m2 = if varies == Some(true) {
            addr("198.51.100.7:61001")
        } else {
            m1
        };
        let mut c = MappingComparison {
            local_address: Some(addr("10.0.0.2:5000")),
            varies_by_destination: None,
            servers: vec![
                ComparedServer {
                    address: addr("127.0.0.1:3478"),
                    mapped_address: Some(m1),
                    problem: None,
                },
                ComparedServer {
                    address: addr("127.0.0.5:3478"),
                    mapped_address: varies.map(|_| m2),
                    problem: varies
                        .is_none()
                        .then(|| "no answer after 7 transmissions".into()),
                },
            ],
            requests_sent: 2,
            duration_ms: 0.5,
        };
        c.conclude();
        c
    }

    /// Both families: the side-by-side table (rows from the library), then the IPv6 translation
    /// and outlook lines; nothing at all without an IPv6 run.
    #[test]
    fn families_side_by_side() {
        let v4 = open_internet();
        let mut r6 = open_internet();
        let local = addr("[2001:db8:7::9]:40000");
        (r6.local_address, r6.public_address) = (Some(local), Some(local));
        r6.server.address = addr("[2001:db8:7::1]:3478");
        r6.filtering = Behavior::AddressAndPortDependent;
        r6.classic = Classic::SymmetricUdpFirewall;
        let v6 = Ipv6Report::new(r6);
        assert_eq!(render_families(&v4, Family::Ipv4, None, Wrap::None), "");
        let got = render_families(&v4, Family::Ipv4, Some(&v6), Wrap::None);
        let want = "
┌───────────────────┬──────────────────────────────────────┬────────────────────────────────────────┐
│                   ┆ IPv4                                 ┆ IPv6                                   │
╞═══════════════════╪══════════════════════════════════════╪════════════════════════════════════════╡
│ server            ┆ 127.0.0.1:3478                       ┆ [2001:db8:7::1]:3478                   │
│ local address     ┆ 127.0.0.1:40000                      ┆ [2001:db8:7::9]:40000                  │
│ public address    ┆ 127.0.0.1:40000                      ┆ [2001:db8:7::9]:40000                  │
│ udp               ┆ answered                             ┆ answered                               │
│ nat               ┆ no                                   ┆ no                                     │
│ mapping           ┆ endpoint-independent                 ┆ endpoint-independent                   │
│ filtering         ┆ endpoint-independent                 ┆ address-and-port-dependent             │
│ port preservation ┆ yes                                  ┆ yes                                    │
│ hairpinning       ┆ unknown                              ┆ unknown                                │
│ classic           ┆ Open internet (no NAT, no filtering) ┆ No NAT, behind a stateful UDP firewall │
│ translation       ┆ -                                    ┆ none                                   │
└───────────────────┴──────────────────────────────────────┴────────────────────────────────────────┘
IPv6 translation: none (the mapped address is the local address and port, [2001:db8:7::9]:40000)
IPv6: direct connections work with peers that have IPv6 only by punching — your firewall admits only the exact address and port (APDF): both sides must punch";
        assert_eq!(got, want, "\n--- got:\n{got}\n--- want:\n{want}");
    }

    #[test]
    fn table_of_an_open_internet_report() {
        let got = render_text(&open_internet(), Some(13), Wrap::None);
        let want = "\
probe of 127.0.0.1:3478 (OTHER-ADDRESS 127.0.0.2:3479) from 127.0.0.1:40000: public address 127.0.0.1:40000, 13 requests in 1.8 ms
┌──────────────────┬──────────────────────┬──────────────────────────────────────────────────────────────┬──────────┬─────────┬────────┐
│ test             ┆ verdict              ┆ evidence                                                     ┆ requests ┆ answers ┆   time │
╞══════════════════╪══════════════════════╪══════════════════════════════════════════════════════════════╪══════════╪═════════╪════════╡
│ udp reachability ┆ reachable            ┆ answer from 127.0.0.1:3478                                   ┆        4 ┆       4 ┆ 0.2 ms │
│ nat presence     ┆ no nat               ┆ local 127.0.0.1:40000 mapped 127.0.0.1:40000                 ┆        0 ┆       - ┆ 0.0 ms │
│ mapping          ┆ endpoint-independent ┆ no nat: via A1:P1 127.0.0.1:40000, via A2:P1 127.0.0.1:40000 ┆        6 ┆       6 ┆ 0.5 ms │
│ filtering        ┆ endpoint-independent ┆ answers from 127.0.0.2:3479 and 127.0.0.1:3479 both arrived  ┆        2 ┆       2 ┆ 0.3 ms │
│ hairpinning      ┆ unknown              ┆ not applicable without a nat                                 ┆        0 ┆       - ┆ 0.0 ms │
│ port allocation  ┆ preserving           ┆ local→external 40003→40003 40004→40004 40005→40005           ┆        3 ┆       3 ┆ 0.9 ms │
└──────────────────┴──────────────────────┴──────────────────────────────────────────────────────────────┴──────────┴─────────┴────────┘
Open internet (no NAT, no filtering) (EIM + EIF), ports preserved — direct connections should work with every common NAT
┌──────────────────────────┬────────────┬──────────────────────────────┐
│ peer NAT                 ┆ direct UDP ┆ reason                       │
╞══════════════════════════╪════════════╪══════════════════════════════╡
│ full cone                ┆ yes        ┆ at least one direction opens │
│ symmetric (random ports) ┆ yes        ┆ at least one direction opens │
└──────────────────────────┴────────────┴──────────────────────────────┘
pacing: server 127.0.0.1 is on loopback (your own or a lab server): not paced; --pace to pace
time bound: 5.00 s (--max-time), not reached; round-trip loss 0.0% measured over 15 transmissions";
        assert_eq!(got, want, "\n--- got:\n{got}\n--- want:\n{want}");
    }

    #[test]
    fn table_with_comparison_negative_confidence_and_server_problems() {
        let got = render_text(&cone_with_problems(), None, Wrap::None);
        let want = "\
probe of 127.0.0.1:3478 (OTHER-ADDRESS 127.0.0.2:3479) from 127.0.0.1:40000: public address 198.51.100.7:61000, 1.8 ms
┌────────────────────┬────────────────────────────┬───────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┬──────────┬─────────┬─────────┐
│ test               ┆ verdict                    ┆ evidence                                                                                                                                  ┆ requests ┆ answers ┆    time │
╞════════════════════╪════════════════════════════╪═══════════════════════════════════════════════════════════════════════════════════════════════════════════════════════════════════════════╪══════════╪═════════╪═════════╡
│ udp reachability   ┆ reachable                  ┆ answer from 127.0.0.1:3478                                                                                                                ┆        4 ┆       - ┆ 12.0 ms │
│ filtering          ┆ address-and-port-dependent ┆ no answer                                                                                                                                 ┆       30 ┆       3 ┆  2.40 s │
│ mapping comparison ┆ varies by destination      ┆ from 10.0.0.2:5000: 127.0.0.1:3478 saw 198.51.100.7:61000, 127.0.0.5:3478 saw 198.51.100.7:61001; the mapping is not endpoint-independent ┆        2 ┆       - ┆  0.5 ms │
└────────────────────┴────────────────────────────┴───────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┴──────────┴─────────┴─────────┘
Port-restricted cone NAT (EIM + APDF)
┌──────────────────────────┬────────────┬──────────────────────────────┐
│ peer NAT                 ┆ direct UDP ┆ reason                       │
╞══════════════════════════╪════════════╪══════════════════════════════╡
│ port-restricted cone     ┆ yes        ┆ at least one direction opens │
│ symmetric (random ports) ┆ no         ┆ use a relay                  │
└──────────────────────────┴────────────┴──────────────────────────────┘
pacing: --pace: at most 10 new transactions per second (RFC 5780 §5)
time bound: 5.00 s (--max-time), reached: tests still open then are unknown; round-trip loss 2.5% measured over 15 transmissions
negative verdicts: 99.999950% confidence (round-trip loss 2.5%, waited up to 2.40 s)
server problem: filtering test II: answer expected from 127.0.0.2:3479 came from 127.0.0.1:3478 (RESPONSE-ORIGIN absent)
server problem: 2 more left out";
        assert_eq!(got, want, "\n--- got:\n{got}\n--- want:\n{want}");
    }

    #[test]
    fn udp_blocked_ends_with_a_hint() {
        let mut r = open_internet();
        r.udp_blocked = true;
        r.classic = Classic::UdpBlocked;
        let got = render_text(&r, Some(28), Wrap::None);
        let last = got.lines().last().unwrap();
        assert_eq!(
            last,
            "hint: nothing answered 127.0.0.1:3478; check that a stun server listens there on udp, else udp is blocked on this path"
        );
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn json_of_an_open_internet_report() {
        let got = render_json(&open_internet(), None, None, None).unwrap();
        let want = r#"{
  "schema": "natscope.probe/v1",
  "natscope_version": "0.1.0-test",
  "local_address": "127.0.0.1:40000",
  "public_address": "127.0.0.1:40000",
  "nat_detected": false,
  "udp_blocked": false,
  "mapping": "endpoint-independent",
  "filtering": "endpoint-independent",
  "port_preservation": true,
  "port_allocation": {
    "pattern": "preserving",
    "delta": null,
    "samples": [
      [
        40003,
        40003
      ],
      [
        40004,
        40004
      ],
      [
        40005,
        40005
      ]
    ],
    "predictability": "the external port equals the local port"
  },
  "hairpinning": null,
  "binding_lifetime_s": null,
  "tcp_mapping": "unknown",
  "alg_detected": false,
  "classic": "open-internet",
  "server": {
    "address": "127.0.0.1:3478",
    "other_address": "127.0.0.2:3479",
    "problems": [],
    "problems_omitted": 0
  },
  "tests": [
    {
      "name": "udp reachability",
      "verdict": "reachable",
      "evidence": "answer from 127.0.0.1:3478",
      "requests_sent": 4,
      "duration_ms": 0.25,
      "answers": 4,
      "miss_chance": null
    },
    {
      "name": "nat presence",
      "verdict": "no nat",
      "evidence": "local 127.0.0.1:40000 mapped 127.0.0.1:40000",
      "requests_sent": 0,
      "duration_ms": 0.0,
      "answers": null,
      "miss_chance": null
    },
    {
      "name": "mapping",
      "verdict": "endpoint-independent",
      "evidence": "no nat: via A1:P1 127.0.0.1:40000, via A2:P1 127.0.0.1:40000",
      "requests_sent": 6,
      "duration_ms": 0.5,
      "answers": 6,
      "miss_chance": null
    },
    {
      "name": "filtering",
      "verdict": "endpoint-independent",
      "evidence": "answers from 127.0.0.2:3479 and 127.0.0.1:3479 both arrived",
      "requests_sent": 2,
      "duration_ms": 0.3,
      "answers": 2,
      "miss_chance": null
    },
    {
      "name": "hairpinning",
      "verdict": "unknown",
      "evidence": "not applicable without a nat",
      "requests_sent": 0,
      "duration_ms": 0.0,
      "answers": null,
      "miss_chance": null
    },
    {
      "name": "port allocation",
      "verdict": "preserving",
      "evidence": "local→external 40003→40003 40004→40004 40005→40005",
      "requests_sent": 3,
      "duration_ms": 0.9,
      "answers": 3,
      "miss_chance": null
    }
  ],
  "outlook": [
    {
      "peer": "full cone",
      "direct_udp": "yes",
      "reason": "at least one direction opens"
    },
    {
      "peer": "symmetric (random ports)",
      "direct_udp": "yes",
      "reason": "at least one direction opens"
    }
  ],
  "loss_estimate": 0.0,
  "negative_confidence": null,
  "retry_budget_ms": 0.0,
  "summary": "Open internet (no NAT, no filtering) (EIM + EIF), ports preserved — direct connections should work with every common NAT",
  "requests_sent": 13,
  "duration_ms": 1.75,
  "pacing": {
    "enabled": false,
    "max_new_per_second": null,
    "reason": "server 127.0.0.1 is on loopback (your own or a lab server): not paced; --pace to pace"
  },
  "address_pooling": null,
  "tcp_port_preservation": null,
  "max_time_ms": 5000.0,
  "time_bound_reached": false,
  "loss_transmissions": 15,
  "port_mapping": null,
  "double_nat": null,
  "cgnat": null
}"#;
        assert_eq!(got, want, "\n--- got:\n{got}\n--- want:\n{want}");
    }

    /// Every field the issue names, with its JSON type; tri-state booleans may be null.
    #[test]
    fn json_has_every_documented_field() {
        use serde_json::Value;
        let doc: Value =
            serde_json::from_str(&render_json(&open_internet(), None, None, None).unwrap())
                .unwrap();
        let is_str = |v: &Value| v.is_string();
        let is_tri = |v: &Value| v.is_boolean() || v.is_null();
        let is_num = |v: &Value| v.is_number();
        let is_num_or_null = |v: &Value| v.is_number() || v.is_null();
        let is_addr_or_null =
            |v: &Value| v.is_null() || v.as_str().is_some_and(|s| s.parse::<SocketAddr>().is_ok());
        let behavior = |v: &Value| {
            matches!(
                v.as_str(),
                Some(
                    "endpoint-independent"
                        | "address-dependent"
                        | "address-and-port-dependent"
                        | "unknown"
                )
            )
        };
        type Check<'a> = (&'a str, &'a dyn Fn(&Value) -> bool);
        let checks: [Check; 31] = [
            ("/schema", &|v| v == "natscope.probe/v1"),
            ("/local_address", &is_addr_or_null),
            ("/public_address", &is_addr_or_null),
            ("/nat_detected", &is_tri),
            ("/udp_blocked", &|v| v.is_boolean()),
            ("/mapping", &behavior),
            ("/filtering", &behavior),
            ("/port_preservation", &is_tri),
            ("/port_allocation/pattern", &|v| {
                matches!(
                    v.as_str(),
                    Some("preserving" | "sequential" | "random" | "unknown")
                )
            }),
            ("/port_allocation/delta", &is_num_or_null),
            ("/hairpinning", &is_tri),
            ("/binding_lifetime_s", &is_num_or_null),
            ("/tcp_mapping", &behavior),
            ("/alg_detected", &is_tri),
            ("/classic", &is_str),
            ("/server/address", &is_addr_or_null),
            ("/server/other_address", &is_addr_or_null),
            ("/server/problems", &|v| v.is_array()),
            ("/tests", &|v| v.as_array().is_some_and(|a| !a.is_empty())),
            ("/outlook", &|v| v.is_array()),
            ("/summary", &is_str),
            ("/duration_ms", &is_num),
            ("/pacing/enabled", &|v| v.is_boolean()),
            ("/pacing/max_new_per_second", &is_num_or_null),
            ("/pacing/reason", &is_str),
            ("/address_pooling", &|v| {
                v.is_null() || matches!(v.as_str(), Some("paired" | "arbitrary"))
            }),
            ("/tcp_port_preservation", &is_tri),
            ("/server/problems_omitted", &|v| v.is_u64()),
            ("/max_time_ms", &is_num),
            ("/time_bound_reached", &|v| v.is_boolean()),
            ("/loss_transmissions", &|v| v.is_u64()),
        ];
        for (ptr, ok) in checks {
            let v = doc
                .pointer(ptr)
                .unwrap_or_else(|| panic!("{ptr} missing:\n{doc:#}"));
            assert!(ok(v), "{ptr} = {v}");
        }
        for t in doc["tests"].as_array().unwrap() {
            assert!(t["name"].is_string() && t["verdict"].is_string(), "{t}");
            assert!(t["evidence"].is_string(), "{t}");
            assert!(
                t["requests_sent"].is_u64() && t["duration_ms"].is_number(),
                "{t}"
            );
            assert!(t["answers"].is_u64() || t["answers"].is_null(), "{t}");
            assert!(is_num_or_null(&t["miss_chance"]), "{t}");
        }
        assert!(
            doc.get("mapping_comparison").is_none(),
            "only with several servers"
        );
    }

    #[test]
    fn classic_names_are_kebab_case() {
        let mut r = open_internet();
        for (c, want) in [
            (Classic::PortRestrictedCone, "port-restricted-cone"),
            (Classic::SymmetricUdpFirewall, "symmetric-udp-firewall"),
            (Classic::NoClassicName, "no-classic-name"),
            (Classic::UdpBlocked, "udp-blocked"),
        ] {
            r.classic = c;
            let doc: serde_json::Value =
                serde_json::from_str(&render_json(&r, None, None, None).unwrap()).unwrap();
            assert_eq!(doc["classic"], want);
        }
    }

    #[test]
    fn json_with_several_servers_carries_the_comparison_last() {
        let c = comparison(Some(true));
        let got = render_json(&open_internet(), Some(&c), None, None).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(doc["schema"], "natscope.probe/v1");
        assert_eq!(
            doc["mapping_comparison"],
            serde_json::json!({
                "local_address": "10.0.0.2:5000",
                "varies_by_destination": true,
                "servers": [
                    {"address": "127.0.0.1:3478", "mapped_address": "198.51.100.7:61000", "problem": null},
                    {"address": "127.0.0.5:3478", "mapped_address": "198.51.100.7:61001", "problem": null}
                ]
            })
        );
        assert!(got.trim_end().ends_with("]\n  }\n}"), "{got}");
        let at = |key: &str| {
            got.find(&format!("\n  \"{key}\": "))
                .unwrap_or_else(|| panic!("no top-level {key}: {got}"))
        };
        assert!(
            at("duration_ms") < at("pacing")
                && at("pacing") < at("address_pooling")
                && at("address_pooling") < at("tcp_port_preservation")
                && at("tcp_port_preservation") < at("max_time_ms")
                && at("max_time_ms") < at("time_bound_reached")
                && at("time_bound_reached") < at("loss_transmissions")
                && at("loss_transmissions") < at("mapping_comparison"),
            "pacing, address_pooling, tcp_port_preservation are added after duration_ms, the comparison stays last: {got}"
        );
        assert!(
            got.starts_with("{\n  \"schema\": \"natscope.probe/v1\","),
            "{got}"
        );
    }

    #[test]
    fn exit_codes_follow_the_classification() {
        let mut r = open_internet();
        assert_eq!(r.exit_code(), 0);
        r.classic = Classic::NoClassicName;
        assert_eq!(r.exit_code(), 0, "a named combination is a classification");
        r.classic = Classic::Unknown;
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn timeout_and_retries_set_the_engine_timing() {
        let default = Timing::default();
        let mut t = default;
        t.apply_flags(None, None);
        assert_eq!(t, default);
        t.apply_flags(Some(20), Some(2));
        assert_eq!(t.initial_rto, Duration::from_millis(20));
        assert_eq!(t.min_rto, Duration::from_millis(20).min(default.min_rto));
        assert_eq!(t.max_rto, default.max_rto);
        assert_eq!((t.reach_transmits, t.max_transmits), (3, 3));
        let mut slow = default;
        slow.apply_flags(Some(5000), Some(0));
        assert_eq!(
            slow.max_rto,
            Duration::from_secs(10),
            "room to back off to 2×MS"
        );
        assert_eq!((slow.reach_transmits, slow.max_transmits), (1, 1));
        let mut fast = default;
        fast.apply_flags(Some(5), None);
        assert_eq!(fast.min_rto, Duration::from_millis(5));
    }

    #[test]
    fn max_time_takes_seconds_within_bounds() {
        let max_time = ProbeConfig::parse_max_time;
        assert_eq!(max_time("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(max_time("600"), Ok(Duration::from_secs(600)));
        for bad in ["0", "0.05", "601", "-1", "NaN", "inf", "5s", ""] {
            assert!(max_time(bad).is_err(), "{bad:?}");
        }
    }
}
