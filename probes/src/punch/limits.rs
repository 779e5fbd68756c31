//! Every option of `natscope punch serve` (its addresses, log format and limits) as one set of flags (issue 14, M1): the CLI flattens
//! [`ServeLimits`] into its arguments, so a new limit costs no CLI lines. Defaults are safe for
//! a server on the internet; [`ServeLimits::server_config`] and [`ServeLimits::tcp`] turn them
//! into the core's [`ServerConfig`] and the driver's TCP bounds.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::server::ServerConfig;
use super::table::{CircuitLimits, TableConfig};
use super::DEFAULT_PORT;
use natscope_core::reflector::rate_limit::RateLimit;
use natscope_core::reflector::tcp::TcpLimits;

/// `--log-format`: how the server's log lines (and counters) are written on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The limits of `natscope punch listen` (issue 14, item 4), flattened into its arguments.
#[derive(Args, Clone, Debug)]
pub struct ListenLimits {
    /// Probes per second all sessions together may send (one budget across sessions and servers;
    /// each session is also capped on its own).
    #[arg(long, value_name = "N", default_value_t = super::session::DEFAULT_PROBE_BUDGET)]
    pub probe_budget: u32,
}

impl ListenLimits {
    /// The listener's one probe budget.
    pub fn budget(&self) -> super::session::ProbeBudget {
        super::session::ProbeBudget::new(self.probe_budget)
    }
}

#[derive(Args, Clone, Debug)]
pub struct ServeLimits {
    /// Address to serve on, UDP and TCP (repeat for several).
    #[arg(long, value_name = "IP:PORT", default_values_t = [SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))])]
    pub listen: Vec<SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log the counters (served, refused by reason, relayed bytes) every SECS seconds (0: at exit only).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stats_interval: u64,
    /// Registrations held at once, in total.
    #[arg(long, value_name = "N", default_value_t = TableConfig::default().max_peers)]
    pub max_peers: usize,
    /// Sessions held at once, in total.
    #[arg(long, value_name = "N", default_value_t = TableConfig::default().max_sessions)]
    pub max_sessions: usize,
    /// Registrations per source (IPv4 address or IPv6 /64).
    #[arg(long, value_name = "N", default_value_t = TableConfig::default().peers_per_source)]
    pub peers_per_source: usize,
    /// Sessions a source may hold open as a connector.
    #[arg(long, value_name = "N", default_value_t = TableConfig::default().sessions_per_source)]
    pub sessions_per_source: usize,
    /// Sessions one registered peer may be introduced to at once.
    #[arg(long, value_name = "N", default_value_t = TableConfig::default().sessions_per_peer)]
    pub sessions_per_peer: usize,
    /// REGISTER/CONNECT per second per verified source (burst: twice as many).
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().request_rate.per_second)]
    pub request_rate: u32,
    /// Binding requests per second per source (burst: twice as many).
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().binding_rate.per_second)]
    pub binding_rate: u32,
    /// Cookie challenges per second, all sources together.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().challenge_rate)]
    pub challenge_rate: u32,
    /// Bytes a relayed session may carry, both ways together.
    #[arg(long, value_name = "BYTES", default_value_t = CircuitLimits::default().bytes)]
    pub circuit_bytes: u64,
    /// Seconds a relayed session may last.
    #[arg(long, value_name = "SECS", default_value_t = CircuitLimits::default().duration.as_secs())]
    pub circuit_secs: u64,
    /// Bytes per second a relayed session may carry (burst: a quarter second's worth, at least 64 KiB).
    #[arg(long, value_name = "BYTES", default_value_t = CircuitLimits::default().rate)]
    pub circuit_rate: u64,
    /// TCP connections held at once, in total.
    #[arg(long, value_name = "N", default_value_t = TcpLimits::default().max_connections)]
    pub tcp_connections: usize,
    /// TCP connections held at once per source.
    #[arg(long, value_name = "N", default_value_t = TcpLimits::default().max_per_source)]
    pub tcp_per_source: usize,
    /// Seconds a TCP connection may stay silent.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub tcp_idle: u64,
    /// Seconds a TCP connection may last, however busy.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub tcp_lifetime: u64,
}

impl Default for ServeLimits {
    fn default() -> Self {
        let t = TableConfig::default();
        let s = ServerConfig::default();
        let c = CircuitLimits::default();
        let tcp = TcpLimits::default();
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))],
            log_format: LogFormat::Text,
            stats_interval: 60,
            max_peers: t.max_peers,
            max_sessions: t.max_sessions,
            peers_per_source: t.peers_per_source,
            sessions_per_source: t.sessions_per_source,
            sessions_per_peer: t.sessions_per_peer,
            request_rate: s.request_rate.per_second,
            binding_rate: s.binding_rate.per_second,
            challenge_rate: s.challenge_rate,
            circuit_bytes: c.bytes,
            circuit_secs: c.duration.as_secs(),
            circuit_rate: c.rate,
            tcp_connections: tcp.max_connections,
            tcp_per_source: tcp.max_per_source,
            tcp_idle: 30,
            tcp_lifetime: 3600,
        }
    }
}

impl ServeLimits {
    pub fn json_logs(&self) -> bool {
        self.log_format == LogFormat::Json
    }

    /// The CLI's logging defaults for `punch serve`: what it serves at `info`, JSON if asked.
    pub fn log_defaults(&self) -> (tracing::level_filters::LevelFilter, bool) {
        (tracing::level_filters::LevelFilter::INFO, self.json_logs())
    }

    /// The core's configuration.
    pub fn server_config(&self) -> ServerConfig {
        let d = ServerConfig::default();
        ServerConfig {
            table: TableConfig {
                max_peers: self.max_peers,
                max_sessions: self.max_sessions,
                peers_per_source: self.peers_per_source,
                sessions_per_source: self.sessions_per_source,
                sessions_per_peer: self.sessions_per_peer,
                circuit: CircuitLimits {
                    bytes: self.circuit_bytes,
                    duration: Duration::from_secs(self.circuit_secs),
                    rate: self.circuit_rate,
                    burst: (self.circuit_rate / 4).max(64 << 10),
                },
                ..TableConfig::default()
            },
            request_rate: RateLimit {
                per_second: self.request_rate,
                burst: self.request_rate.saturating_mul(2),
            },
            binding_rate: RateLimit {
                per_second: self.binding_rate,
                burst: self.binding_rate.saturating_mul(2),
            },
            challenge_rate: self.challenge_rate,
            ..d
        }
    }

    /// The TCP bounds of the driver.
    pub fn tcp(&self) -> TcpLimits {
        TcpLimits {
            max_connections: self.tcp_connections,
            max_per_source: self.tcp_per_source,
            idle: Duration::from_secs(self.tcp_idle),
            lifetime: Duration::from_secs(self.tcp_lifetime),
            ..TcpLimits::default()
        }
    }
}
