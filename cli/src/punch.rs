//! `natscope punch`: rendezvous + relay server, listener and connector (docs/punch.md).
//! Glue only: argument parsing, the runtime, signals and rendering; the protocol lives in
//! `natscope_probes::punch`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use natscope_probes::punch::driver::{
    self, ConnectOptions, ConnectReport, ListenLine, ListenOptions, PunchError, MAX_BIRTHDAY,
};
use natscope_probes::punch::{valid_id, Transport};
use natscope_probes::resolve::{server_address, Service};

#[derive(Subcommand, Debug)]
pub enum PunchCommand {
    /// Run the rendezvous + relay server (UDP and TCP on each address) until SIGTERM/Ctrl-C.
    #[command(after_help = include_str!("../help/punch.txt"))]
    Serve(ServeArgs),
    /// Register an id and echo every message of the sessions peers open to it.
    #[command(after_help = include_str!("../help/punch.txt"))]
    Listen(ListenArgs),
    /// Connect to a registered peer through NATs, send numbered messages, report the path.
    #[command(after_help = include_str!("../help/punch.txt"))]
    Connect(ConnectArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub limits: natscope_probes::punch::limits::ServeLimits,
}

#[derive(Args, Debug)]
pub struct ListenArgs {
    /// The id to register (1-64 characters of A-Z a-z 0-9 . _ -).
    #[arg(long)]
    id: String,
    /// A rendezvous server, as HOST:PORT (repeat to register with each).
    #[arg(long, value_name = "HOST:PORT", required = true)]
    via: Vec<String>,
    /// Exit 0 after serving this many sessions (default: forever).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Sessions use TCP (simultaneous open; the relay over the server's TCP connections).
    #[arg(long)]
    tcp: bool,
    /// Give up (exit 1) after SECS seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Port prediction is on by default for UDP; kept for compatibility, this changes nothing.
    #[arg(long)]
    predict: bool,
    /// Skip port prediction (measuring this side's allocation delta and registering it).
    #[arg(long, conflicts_with = "predict")]
    no_predict: bool,
    #[command(flatten)]
    map: driver::PortMapFlag,
    /// Key pair file (created 0600 if missing; default: a new key each run).
    #[arg(long, value_name = "FILE")]
    key: Option<std::path::PathBuf>,
    /// One JSON object per line for each event (natscope.punch-listen/v1).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    family: natscope_probes::punch::family::FamilyArgs,
    #[command(flatten)]
    limits: natscope_probes::punch::limits::ListenLimits,
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The id of the peer to connect to.
    id: String,
    /// A rendezvous server, as HOST:PORT (repeat: the first that answers and knows the id).
    #[arg(long, value_name = "HOST:PORT", required = true)]
    via: Vec<String>,
    /// Use TCP (simultaneous open) instead of UDP.
    #[arg(long)]
    tcp: bool,
    /// Start on the relay at once; move to a direct path when one appears.
    #[arg(long)]
    relay_first: bool,
    /// Port prediction is on by default for UDP; kept for compatibility, this changes nothing.
    #[arg(long)]
    predict: bool,
    /// Skip port prediction (measuring this side's allocation delta so the peer probes ahead).
    #[arg(long, conflicts_with = "predict")]
    no_predict: bool,
    #[command(flatten)]
    map: driver::PortMapFlag,
    /// Birthday technique (UDP): random ports of the peer's address probed when this side's NAT
    /// keeps ports and the peer's allocates at random (the peer then opens 256 sockets); 0: off.
    #[arg(long, value_name = "N", default_value_t = natscope_probes::punch::peer::birthday_probes())]
    birthday: usize,
    /// Numbered messages to send (the listener echoes each).
    #[arg(long, value_name = "N", default_value_t = 20)]
    messages: u64,
    /// Pause between messages, in milliseconds (0: as fast as the window allows).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    interval_ms: u64,
    /// Bound on the whole connect, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    timeout: f64,
    /// How long direct paths are tried before the relay, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1500)]
    punch_window_ms: u64,
    /// Key pair file (created 0600 if missing; default: a new key each run).
    #[arg(long, value_name = "FILE")]
    key: Option<std::path::PathBuf>,
    /// Accept only the peer with this key (as `punch listen` prints it), whatever the server says.
    #[arg(long, value_name = "KEY")]
    peer_key: Option<driver::PeerKey>,
    /// Print one JSON document (natscope.punch/v1).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    family: natscope_probes::punch::family::FamilyArgs,
}

pub fn run(cmd: PunchCommand) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    match cmd {
        PunchCommand::Serve(a) => rt.block_on(serve(a)),
        PunchCommand::Listen(a) => rt.block_on(listen(a)),
        PunchCommand::Connect(a) => rt.block_on(connect(a)),
    }
}

/// SIGTERM or SIGINT (Ctrl-C only where there are no unix signals): how a server is told to
/// stop. Watched from this call on, inside a runtime, so a signal sent right after it is not lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let watched =
            signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
        async move {
            match watched {
                Ok((mut term, mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn seconds(v: f64, what: &str) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        bail!("--{what} must be a number of seconds between 0 and 86400, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn check_id(id: &str) -> Result<()> {
    if !valid_id(id) {
        bail!("peer id `{id}` is invalid: use 1-64 characters of A-Z a-z 0-9 . _ -");
    }
    Ok(())
}

fn transport(tcp: bool) -> Transport {
    if tcp {
        Transport::Tcp
    } else {
        Transport::Udp
    }
}

async fn serve(a: ServeArgs) -> Result<ExitCode> {
    driver::serve_with(&a.limits.listen, &a.limits, shutdown_signal(), |bound| {
        let list: Vec<String> = bound.iter().map(|b| b.to_string()).collect();
        eprintln!(
            "natscope: punch server on {} (udp and tcp)",
            list.join(", ")
        );
    })
    .await
    .context("cannot start the punch server")?;
    Ok(ExitCode::SUCCESS)
}

fn punch_failure(e: PunchError) -> ExitCode {
    eprintln!("natscope: punch: {e}");
    ExitCode::from(e.exit_code())
}

async fn listen(a: ListenArgs) -> Result<ExitCode> {
    check_id(&a.id)?;
    let opts = ListenOptions {
        id: a.id.clone(),
        server: server_address(&a.via[0], Service::PUNCH)?,
        transport: transport(a.tcp),
        count: a.count,
        timeout: a.timeout.map(|t| seconds(t, "timeout")).transpose()?,
        punch_window: Duration::from_millis(1500),
        predict: !a.no_predict && !a.tcp,
        identity: driver::load_identity(a.key.as_deref())?,
    };
    if a.tcp && a.predict {
        bail!("--predict applies to udp only");
    }
    let json = a.json;
    let (via, family) = a.family.resolve(&a.via)?;
    let setup = driver::PeerSetup {
        family,
        budget: a.limits.budget(),
        port_mapping: a.map.enabled(),
    };
    let result = driver::listen_all(&opts, &via, &setup, shutdown_signal(), |ev| {
        if json {
            if let Ok(line) = serde_json::to_string(&ListenLine::new(ev)) {
                crate::emit(&line);
            }
            return;
        }
        crate::emit(&ev.to_string());
    })
    .await;
    match result {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => Ok(punch_failure(e)),
    }
}

async fn connect(a: ConnectArgs) -> Result<ExitCode> {
    check_id(&a.id)?;
    if a.birthday > MAX_BIRTHDAY {
        bail!("--birthday is at most {MAX_BIRTHDAY} ports");
    }
    if a.tcp && a.predict {
        bail!("--predict applies to udp only");
    }
    if a.messages == 0 || a.messages > 1_000_000 {
        bail!("--messages must be between 1 and 1000000");
    }
    let opts = ConnectOptions {
        id: a.id.clone(),
        server: server_address(&a.via[0], Service::PUNCH)?,
        transport: transport(a.tcp),
        relay_first: a.relay_first,
        predict: !a.no_predict && !a.tcp,
        birthday: a.birthday,
        messages: a.messages,
        interval: Duration::from_millis(a.interval_ms),
        timeout: seconds(a.timeout, "timeout")?,
        punch_window: Duration::from_millis(a.punch_window_ms.clamp(50, 60_000)),
        identity: driver::load_identity(a.key.as_deref())?,
        peer_key: a.peer_key,
    };
    let (via, family) = a.family.resolve(&a.via)?;
    let setup = driver::PeerSetup {
        family,
        port_mapping: a.map.enabled(),
        ..Default::default()
    };
    let report = match driver::connect_any(&opts, &via, &setup, shutdown_signal()).await {
        Ok(r) => r,
        Err(e) => return Ok(punch_failure(e)),
    };
    if a.json {
        crate::emit(&serde_json::to_string_pretty(&report).context("cannot render json")?);
    } else {
        crate::emit(&render(&report));
    }
    if report.failed() {
        let why = report
            .attempts
            .error
            .clone()
            .unwrap_or_else(|| "no path carried the data".into());
        eprintln!("natscope: punch: session with {} failed: {why}", a.id);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"))
}

/// The human table of a connect report.
pub fn render(r: &ConnectReport) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["punch", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("transport", r.transport.to_string()),
        ("path", r.path_words()),
        ("local", r.local.to_string()),
        ("peer", r.peer.map_or_else(|| "-".into(), |p| p.to_string())),
        ("time to first byte", opt_ms(r.time_to_first_byte_ms)),
        ("time to direct", opt_ms(r.time_to_direct_ms)),
        ("rtt", opt_ms(r.rtt_ms)),
        (
            "messages echoed",
            format!("{} of {}", r.messages_echoed, r.messages_sent),
        ),
        ("in order", r.in_order.to_string()),
        ("switched to direct", r.switched_to_direct.to_string()),
        (
            "probes",
            format!(
                "{} sent, {} answered (bound {})",
                r.attempts.probes_sent, r.attempts.probes_answered, r.attempts.probe_packet_bound
            ),
        ),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    if let Some(e) = &r.attempts.error {
        t.add_row(vec!["error".to_string(), e.clone()]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use natscope_probes::punch::driver::Attempts;
    use natscope_probes::punch::PathTaken;
    use std::net::SocketAddr;

    #[test]
    fn the_human_table_is_exact() {
        let r = ConnectReport {
            schema: "natscope.punch/v1",
            natscope_version: String::new(),
            transport: Transport::Udp,
            path: PathTaken::Relayed,
            family: Some(natscope_probes::probe::family::Family::Ipv4),
            local: SocketAddr::from(([10, 1, 0, 2], 4000)),
            peer: Some(SocketAddr::from(([203, 0, 113, 2], 5000))),
            time_to_first_byte_ms: Some(1532.25),
            time_to_direct_ms: None,
            rtt_ms: Some(2.04),
            messages_sent: 20,
            messages_echoed: 20,
            in_order: true,
            switched_to_direct: false,
            attempts: Attempts {
                probes_sent: 60,
                probes_answered: 0,
                probe_packet_bound: 1440,
                ..Attempts::default()
            },
        };
        let want = "\
┌────────────────────┬──────────────────────────────────┐
│ punch              ┆ value                            │
╞════════════════════╪══════════════════════════════════╡
│ transport          ┆ udp                              │
│ path               ┆ relayed over IPv4                │
│ local              ┆ 10.1.0.2:4000                    │
│ peer               ┆ 203.0.113.2:5000                 │
│ time to first byte ┆ 1532.2 ms                        │
│ time to direct     ┆ -                                │
│ rtt                ┆ 2.0 ms                           │
│ messages echoed    ┆ 20 of 20                         │
│ in order           ┆ true                             │
│ switched to direct ┆ false                            │
│ probes             ┆ 60 sent, 0 answered (bound 1440) │
└────────────────────┴──────────────────────────────────┘";
        assert_eq!(render(&r), want);
    }
}
