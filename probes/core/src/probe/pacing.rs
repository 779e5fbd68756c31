//! RFC 5780 §5 pacing: a client "SHOULD NOT generate more than ten new STUN transactions per
//! second". [`Pacer`] is the rule as plain data — the start instants of the last transactions in
//! a sliding one-second window, fed an injected `now` — which every probe machine consults before
//! a *first* transmission (retransmissions are not new transactions). A machine that may not start
//! one yet names the instant it may in `poll_timeout`, so its driver wakes it then; a transaction's
//! clock (RTT sample, RTO, give-up rule) starts at its first real transmission, never while it
//! waits for a slot. One pacer is handed from machine to machine, so a whole `natscope probe` run
//! shares one budget.
//!
//! [`Pacing::decide`] is the default: paced when any server may be a public one, not paced when
//! every server is on loopback, a private (RFC 1918, fc00::/7), CGNAT, link-local or documentation
//! address — servers the user or a lab runs, where speed is the point.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// RFC 5780 §5: at most this many new transactions per second.
pub const MAX_NEW_PER_SECOND: u32 = 10;

/// The window [`MAX_NEW_PER_SECOND`] is counted over.
pub const WINDOW: Duration = Duration::from_secs(1);

/// At most `limit` transaction starts in any window of `window` (half-open: a start exactly
/// `window` after another falls outside it), or no limit at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pacer {
    limit: Option<u32>,
    window: Duration,
    /// Start instants, oldest first; only the last `limit` can matter.
    starts: VecDeque<Instant>,
}

impl Pacer {
    /// At most `limit` new transactions in any `window`. A `limit` of 0 is taken as 1: a pacer
    /// that never lets anything start would stall its machine forever.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit: Some(limit.max(1)),
            window,
            starts: VecDeque::new(),
        }
    }

    /// RFC 5780 §5: ten per second.
    pub fn rfc5780() -> Self {
        Self::new(MAX_NEW_PER_SECOND, WINDOW)
    }

    /// No limit: every transaction may start at once (servers the user runs).
    pub fn unpaced() -> Self {
        Self {
            limit: None,
            window: WINDOW,
            starts: VecDeque::new(),
        }
    }

    /// The most starts allowed per window; `None` when not paced.
    pub fn limit(&self) -> Option<u32> {
        self.limit
    }

    /// The earliest instant a new transaction may start; `None` when one may start at any time.
    /// Needs no `now`: with `limit` starts recorded, the next one must wait until the oldest of
    /// them has left the window.
    pub fn next_start(&self) -> Option<Instant> {
        let limit = self.limit? as usize;
        if self.starts.len() < limit {
            return None;
        }
        self.starts
            .get(self.starts.len() - limit)
            .map(|&oldest| oldest + self.window)
    }

    /// Whether a new transaction may start at `now`.
    pub fn may_start(&self, now: Instant) -> bool {
        self.next_start().is_none_or(|t| now >= t)
    }

    /// Records that a new transaction started (its first transmission left) at `now`.
    pub fn started(&mut self, now: Instant) {
        let Some(limit) = self.limit else { return };
        // Keep the history sorted even if a caller's clock steps back.
        let at = self.starts.partition_point(|&s| s <= now);
        self.starts.insert(at, now);
        while self.starts.len() > limit as usize {
            self.starts.pop_front();
        }
    }
}

/// `--pace`, `--no-pace`, or neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PaceChoice {
    /// Pace when any server may be public ([`Pacing::decide`]).
    #[default]
    Default,
    /// Always pace (`--pace`).
    On,
    /// Never pace (`--no-pace`).
    Off,
}

/// The pacing decision of a run, as the report's `pacing` object (docs/probe.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Pacing {
    /// Whether new transactions were limited to `max_new_per_second`.
    pub enabled: bool,
    /// The limit (10, RFC 5780 §5) when enabled; `null` otherwise.
    pub max_new_per_second: Option<u32>,
    /// Why: the flag, or which server made the default what it is.
    pub reason: String,
}

impl Pacing {
    /// The decision for a run that talks to `servers`: `--pace` / `--no-pace` win; otherwise paced
    /// when any server is outside the ranges of [`own_server_range`].
    pub fn decide(servers: &[SocketAddr], choice: PaceChoice) -> Self {
        let limit = format!("at most {MAX_NEW_PER_SECOND} new transactions per second");
        match choice {
            PaceChoice::On => Self::paced(format!("--pace: {limit} (RFC 5780 §5)")),
            PaceChoice::Off => Self::unpaced(format!(
                "--no-pace: not paced (RFC 5780 §5 asks for {limit} towards servers you do not run)"
            )),
            PaceChoice::Default => {
                if let Some(public) = servers.iter().find(|s| own_server_range(s.ip()).is_none()) {
                    return Self::paced(format!(
                        "server {} may be a public server (not loopback, private, cgnat, link-local or documentation): {limit} (RFC 5780 §5); --no-pace to turn off",
                        public.ip()
                    ));
                }
                match servers {
                    [] => Self::unpaced("no server: not paced; --pace to pace".into()),
                    [one] => Self::unpaced(format!(
                        "server {} is {} (your own or a lab server): not paced; --pace to pace",
                        one.ip(),
                        own_server_range(one.ip()).unwrap_or("local")
                    )),
                    many => Self::unpaced(format!(
                        "all {} servers are on loopback, private, cgnat, link-local or documentation addresses (your own or lab servers): not paced; --pace to pace",
                        many.len()
                    )),
                }
            }
        }
    }

    fn paced(reason: String) -> Self {
        Self {
            enabled: true,
            max_new_per_second: Some(MAX_NEW_PER_SECOND),
            reason,
        }
    }

    fn unpaced(reason: String) -> Self {
        Self {
            enabled: false,
            max_new_per_second: None,
            reason,
        }
    }

    /// A fresh pacer that enforces this decision.
    pub fn pacer(&self) -> Pacer {
        match self.max_new_per_second {
            Some(n) if self.enabled => Pacer::new(n, WINDOW),
            _ => Pacer::unpaced(),
        }
    }
}

/// The range `ip` is in when it is one a user (or natscope's lab) runs a server in, phrased for
/// the pacing reason; `None` for anything else, which may be a public server. IPv4-mapped IPv6
/// addresses are judged as IPv4.
pub fn own_server_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_range(v4),
            None => v6_range(v6),
        },
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (127, ..) => Some("on loopback"),
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => Some("in a private range (RFC 1918)"),
        (100, 64..=127, _) => Some("in the cgnat range (100.64.0.0/10)"),
        (169, 254, _) => Some("link-local"),
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Some("in a documentation range"),
        _ => None,
    }
}

fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip == Ipv6Addr::LOCALHOST {
        Some("on loopback")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("in the unique local range (fc00::/7)")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("in a documentation range")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ten_starts_fill_the_window_the_eleventh_waits_a_full_second() {
        let t0 = Instant::now();
        let mut p = Pacer::rfc5780();
        for i in 0..10 {
            assert!(p.may_start(t0), "start {i}");
            assert_eq!(p.next_start(), None, "start {i}");
            p.started(t0);
        }
        assert!(!p.may_start(t0));
        assert!(!p.may_start(t0 + ms(999)), "still inside the window");
        assert_eq!(p.next_start(), Some(t0 + ms(1000)));
        assert!(p.may_start(t0 + ms(1000)), "the window is half-open");
    }

    #[test]
    fn the_window_slides_start_by_start() {
        let t0 = Instant::now();
        let mut p = Pacer::rfc5780();
        // One start every 50 ms: the 11th may go 1 s after the 1st, the 12th 1 s after the 2nd.
        for i in 0..10 {
            p.started(t0 + ms(50 * i));
        }
        assert_eq!(p.next_start(), Some(t0 + ms(1000)));
        assert!(!p.may_start(t0 + ms(500)));
        p.started(t0 + ms(1000));
        assert_eq!(p.next_start(), Some(t0 + ms(1050)));
        assert!(!p.may_start(t0 + ms(1049)));
        assert!(p.may_start(t0 + ms(1050)));
        // A long pause frees the whole window again.
        p.started(t0 + ms(1050));
        assert_eq!(p.next_start(), Some(t0 + ms(1100)));
        assert!(p.may_start(t0 + ms(5000)));
    }

    #[test]
    fn history_is_kept_sorted_and_bounded() {
        let t0 = Instant::now();
        let mut p = Pacer::new(2, ms(100));
        p.started(t0 + ms(30));
        p.started(t0 + ms(10));
        assert_eq!(p.next_start(), Some(t0 + ms(110)), "from the older start");
        p.started(t0 + ms(200));
        assert_eq!(p.next_start(), Some(t0 + ms(130)));
        assert_eq!(p.starts.len(), 2);
    }

    #[test]
    fn unpaced_never_waits_and_zero_means_one() {
        let t0 = Instant::now();
        let mut p = Pacer::unpaced();
        for _ in 0..1000 {
            p.started(t0);
        }
        assert_eq!(p.next_start(), None);
        assert!(p.starts.is_empty());
        let mut one = Pacer::new(0, ms(100));
        assert!(one.may_start(t0));
        one.started(t0);
        assert!(!one.may_start(t0 + ms(99)));
        assert!(one.may_start(t0 + ms(100)));
    }

    #[test]
    fn default_decision_by_server_address() {
        let rows: &[(&str, bool)] = &[
            ("127.0.0.1:3478", false),
            ("127.255.0.9:3478", false),
            ("10.1.2.3:3478", false),
            ("172.16.0.1:3478", false),
            ("172.31.255.255:3478", false),
            ("172.32.0.1:3478", true),
            ("172.15.0.1:3478", true),
            ("192.168.1.1:3478", false),
            ("192.169.1.1:3478", true),
            ("100.64.0.1:3478", false),
            ("100.127.255.1:3478", false),
            ("100.128.0.1:3478", true),
            ("100.63.0.1:3478", true),
            ("169.254.1.1:3478", false),
            ("192.0.2.10:3478", false),
            ("192.0.3.10:3478", true),
            ("198.51.100.1:3478", false),
            ("198.51.101.1:3478", true),
            ("203.0.113.1:3478", false),
            ("203.0.114.1:3478", true),
            ("8.8.8.8:3478", true),
            ("74.125.250.129:19302", true),
            ("[::1]:3478", false),
            ("[fc00::1]:3478", false),
            ("[fd12:3456::1]:3478", false),
            ("[fe80::1]:3478", false),
            ("[febf::1]:3478", false),
            ("[fec0::1]:3478", true),
            ("[2001:db8::1]:3478", false),
            ("[2001:db9::1]:3478", true),
            ("[2001:4860:4860::8888]:3478", true),
            ("[::ffff:10.0.0.1]:3478", false),
            ("[::ffff:8.8.8.8]:3478", true),
        ];
        for &(server, paced) in rows {
            let s: SocketAddr = server.parse().unwrap();
            let d = Pacing::decide(&[s], PaceChoice::Default);
            assert_eq!(d.enabled, paced, "{server}: {}", d.reason);
            assert_eq!(d.max_new_per_second, paced.then_some(10), "{server}");
            assert_eq!(d.pacer().limit(), paced.then_some(10), "{server}");
        }
    }

    #[test]
    fn one_public_server_paces_the_whole_run() {
        let lab: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let public: SocketAddr = "8.8.8.8:3478".parse().unwrap();
        let d = Pacing::decide(&[lab, public], PaceChoice::Default);
        assert!(d.enabled);
        assert_eq!(
            d.reason,
            "server 8.8.8.8 may be a public server (not loopback, private, cgnat, link-local or documentation): at most 10 new transactions per second (RFC 5780 §5); --no-pace to turn off"
        );
        let own = Pacing::decide(&[lab], PaceChoice::Default);
        assert_eq!(
            own.reason,
            "server 198.51.100.1 is in a documentation range (your own or a lab server): not paced; --pace to pace"
        );
        assert!(!Pacing::decide(&[lab, lab], PaceChoice::Default).enabled);
    }

    #[test]
    fn flags_override_the_default() {
        let lab: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let public: SocketAddr = "8.8.8.8:3478".parse().unwrap();
        let on = Pacing::decide(&[lab], PaceChoice::On);
        assert_eq!((on.enabled, on.max_new_per_second), (true, Some(10)));
        assert!(on.reason.starts_with("--pace:"), "{}", on.reason);
        let off = Pacing::decide(&[public], PaceChoice::Off);
        assert_eq!((off.enabled, off.max_new_per_second), (false, None));
        assert!(off.reason.starts_with("--no-pace:"), "{}", off.reason);
        assert_eq!(off.pacer().limit(), None);
    }
}
