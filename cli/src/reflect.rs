//! `natscope reflect`: runs the RFC 5780 reflector until Ctrl-C / SIGTERM, logging counters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use natscope_probes::reflector::driver::{CounterSnapshot, DriverConfig};
use natscope_probes::reflector::families::{read_secret, FamilyAddresses, RunningFamilies};
use natscope_probes::reflector::rate_limit::RateLimit;
use natscope_probes::reflector::tcp::TcpLimits;

/// Environment variable holding the cooperating link's shared secret.
pub const SECRET_ENV: &str = "NATSCOPE_LINK_SECRET";

#[derive(Args, Debug)]
pub struct ReflectArgs {
    /// Primary address A1:P1 (the address clients use). Once per family: an IPv4 and an IPv6
    /// primary serve RFC 5780 on both, each family from its own addresses.
    #[arg(long, value_name = "IP:PORT", required = true)]
    primary: Vec<SocketAddr>,
    /// Alternate address A2:P2 (OTHER-ADDRESS), at most one per family. Omit for a one-address
    /// server.
    #[arg(long, value_name = "IP:PORT")]
    alternate: Vec<SocketAddr>,
    /// The alternate IP is a partner host running its own `natscope reflect` (RFC 5780 §2.3);
    /// this process serves only the primary IP and forwards change-IP requests to the partner.
    #[arg(long, requires = "alternate")]
    cooperate: bool,
    /// UDP port of the authenticated link between cooperating partners (same on both).
    #[arg(long, default_value_t = 3480)]
    link_port: u16,
    /// File holding the link secret (else the NATSCOPE_LINK_SECRET environment variable).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Requests per second allowed per source IP (0 = no limit).
    #[arg(long, default_value_t = RateLimit::default().per_second)]
    rate_limit: u32,
    /// Burst allowed per source IP above the rate.
    #[arg(long, default_value_t = RateLimit::default().burst)]
    burst: u32,
    /// Worker threads and SO_REUSEPORT sockets per address (0 = one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Serve UDP only.
    #[arg(long)]
    no_tcp: bool,
    /// TCP connections held at once per source IPv4 address or IPv6 /64; more are closed on accept.
    #[arg(long, value_name = "N", default_value_t = TcpLimits::default().max_per_source)]
    tcp_per_source: usize,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log the counters every SECS seconds (0 = only on exit).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    stats_interval: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ReflectArgs {
    /// `--log-format json`: the one subscriber (`crate::logging`) writes JSON lines.
    pub fn json_logs(&self) -> bool {
        matches!(self.log_format, LogFormat::Json)
    }
}

/// One driver configuration per family (`natscope_probes::reflector::families`).
pub fn config(args: &ReflectArgs) -> Result<Vec<DriverConfig>> {
    let addrs = FamilyAddresses {
        primaries: args.primary.clone(),
        alternates: args.alternate.clone(),
        cooperate: args.cooperate.then_some(args.link_port),
    };
    let env = || std::env::var_os(SECRET_ENV).map(|v| v.into_encoded_bytes());
    let secret = || read_secret(args.secret_file.as_deref(), env(), SECRET_ENV);
    let cfgs = addrs.configs(secret).map_err(anyhow::Error::msg)?;
    Ok(cfgs
        .into_iter()
        .map(|reflector| {
            let mut cfg = DriverConfig::new(reflector);
            cfg.rate_limit = RateLimit {
                per_second: args.rate_limit,
                burst: args.burst.max(1),
            };
            cfg.workers = args.workers;
            cfg.tcp = !args.no_tcp;
            cfg.tcp_limits.max_per_source = args.tcp_per_source.max(1);
            cfg
        })
        .collect())
}

fn log_counters(msg: &str, c: &CounterSnapshot) {
    tracing::info!(
        requests = c.requests,
        responses = c.responses,
        error_responses = c.error_responses,
        dropped = c.dropped,
        rate_limited = c.rate_limited,
        forwarded = c.forwarded,
        link_accepted = c.link_accepted,
        link_refused = c.link_refused,
        tcp_connections = c.tcp_connections,
        tcp_refused = c.tcp_refused,
        tcp_source_capped = c.tcp_source_capped,
        tcp_timed_out = c.tcp_timed_out,
        binding = c.binding,
        change_ip = c.change_ip,
        change_port = c.change_port,
        change_both = c.change_both,
        response_port = c.response_port,
        padding = c.padding,
        classic = c.classic,
        "{msg}"
    );
}

pub fn run(args: ReflectArgs) -> Result<ExitCode> {
    let cfgs = config(&args)?;
    for missing in cfgs.iter().flat_map(|c| c.reflector.missing_capabilities()) {
        tracing::warn!("one-address server: clients cannot test {missing}");
    }
    let partners: Vec<_> = cfgs
        .iter()
        .filter_map(|c| c.reflector.partner.as_ref())
        .map(|p| p.partner)
        .collect();
    let (rate_limit, server) = (
        args.rate_limit,
        RunningFamilies::start(cfgs).context("cannot start the reflector")?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async {
        // Signals are watched before "serving" is logged: a SIGTERM right after it stops cleanly.
        let stop = crate::punch::shutdown_signal();
        tokio::pin!(stop);
        tracing::info!(
            udp = ?server.udp_addresses(),
            tcp = ?server.tcp_addresses(),
            partner = ?partners,
            rate_limit,
            "serving"
        );
        let period = Duration::from_secs(args.stats_interval.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick(), if args.stats_interval > 0 => log_counters("counters", &server.counters()),
            }
        }
        anyhow::Ok(())
    })?;
    let last = server.stop();
    log_counters("stopped", &last);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReflectArgs,
    }

    fn parse(extra: &[&str]) -> DriverConfig {
        let argv = ["reflect", "--primary", "127.0.0.1:3478"]
            .iter()
            .chain(extra);
        config(&Cli::try_parse_from(argv).expect("arguments parse").args).expect("config")[0]
            .clone()
    }

    #[test]
    fn tcp_per_source_reaches_the_driver() {
        assert_eq!(parse(&[]).tcp_limits, TcpLimits::default());
        let cfg = parse(&["--tcp-per-source", "4"]);
        assert_eq!(cfg.tcp_limits.max_per_source, 4);
    }
}
