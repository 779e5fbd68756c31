//! One reflector per address family (issue 13): `natscope reflect --primary A --primary B ...`
//! with one primary (and alternate) of each family serves RFC 5780 on IPv4 and IPv6 at once.
//!
//! Each family is its own [`Reflector`](super::Reflector) deployment with its own
//! [`RunningReflector`]: RFC 5780's address space {A1, A2} × {P1, P2} is per family (OTHER-ADDRESS
//! names the alternate of the family the request came over, a CHANGE-REQUEST is answered from the
//! other address of that family), and an IPv6 client must never be told an IPv4 OTHER-ADDRESS. In
//! the cooperating two-host mode each family has its own authenticated link, on the primary IP of
//! that family, to the partner's IP of that family. The command-line shape is turned into
//! per-family configurations here, so the CLI only parses.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

use super::driver::{CounterSnapshot, DriverConfig, RunningReflector};
use super::link::LinkConfig;
use super::ReflectorConfig;

/// Shortest link secret accepted.
pub const MIN_SECRET: usize = 16;

/// The addresses of a `natscope reflect` command line.
#[derive(Clone, Debug, Default)]
pub struct FamilyAddresses {
    /// One A1:P1 per family.
    pub primaries: Vec<SocketAddr>,
    /// At most one A2:P2 per family, of a family a primary has.
    pub alternates: Vec<SocketAddr>,
    /// The alternates are partner hosts (RFC 5780 §2.3) reached over a link on this UDP port.
    pub cooperate: Option<u16>,
}

impl FamilyAddresses {
    /// One [`ReflectorConfig`] per family, IPv4 first, each validated; `secret` is asked for only
    /// when a link needs it. Errors are lowercase one-liners for the CLI.
    pub fn configs(
        &self,
        secret: impl Fn() -> Result<Vec<u8>, String>,
    ) -> Result<Vec<ReflectorConfig>, String> {
        for a in self.primaries.iter().chain(&self.alternates) {
            if a.ip().is_unspecified() {
                return Err(format!("{a}: give a concrete ip, not a wildcard (responses must name the address they leave from)"));
            }
        }
        let mut out = Vec::new();
        for v4 in [true, false] {
            let of = |v: &[SocketAddr]| {
                let mine: Vec<SocketAddr> =
                    v.iter().copied().filter(|a| a.is_ipv4() == v4).collect();
                match mine[..] {
                    [] => Ok(None),
                    [a] => Ok(Some(a)),
                    _ => Err(format!(
                        "more than one {} address given for one role: give one primary and one alternate per family",
                        if v4 { "ipv4" } else { "ipv6" }
                    )),
                }
            };
            let (primary, alternate) = (of(&self.primaries)?, of(&self.alternates)?);
            let Some(primary) = primary else {
                if let Some(a) = alternate {
                    return Err(format!("alternate {a} has no --primary of its family"));
                }
                continue;
            };
            let partner = match (self.cooperate, alternate) {
                (Some(port), Some(alt)) => Some(LinkConfig {
                    listen: SocketAddr::new(primary.ip(), port),
                    partner: SocketAddr::new(alt.ip(), port),
                    secret: secret()?,
                }),
                (Some(_), None) => {
                    return Err(format!(
                        "--cooperate needs --alternate PARTNER_IP:P2 for {primary}"
                    ))
                }
                (None, _) => None,
            };
            let cfg = ReflectorConfig {
                primary,
                alternate,
                partner,
            };
            cfg.validate()?;
            out.push(cfg);
        }
        if out.is_empty() {
            return Err("no --primary given".into());
        }
        Ok(out)
    }
}

/// The link secret from `file` (trailing whitespace trimmed) or else from `env`, at least
/// [`MIN_SECRET`] bytes. `env_name` names the variable in the error.
pub fn read_secret(
    file: Option<&Path>,
    env: Option<Vec<u8>>,
    env_name: &str,
) -> Result<Vec<u8>, String> {
    let secret = match (file, env) {
        (Some(f), _) => {
            let mut s =
                std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            while s.last().is_some_and(|b| b.is_ascii_whitespace()) {
                s.pop();
            }
            s
        }
        (None, Some(v)) => v,
        (None, None) => {
            return Err(format!(
                "--cooperate needs a shared secret: set {env_name} or pass --secret-file"
            ))
        }
    };
    if secret.len() < MIN_SECRET {
        return Err(format!(
            "the link secret is {} bytes; use at least {MIN_SECRET} (e.g. `openssl rand -hex 16`)",
            secret.len()
        ));
    }
    Ok(secret)
}

/// Every family's reflector, started together and stopped together.
#[derive(Debug)]
pub struct RunningFamilies {
    running: Vec<RunningReflector>,
}

impl RunningFamilies {
    /// Starts one reflector per configuration; if one cannot bind, those already running stop.
    pub fn start(cfgs: Vec<DriverConfig>) -> io::Result<Self> {
        let mut running = Vec::new();
        for cfg in cfgs {
            running.push(RunningReflector::start(cfg)?);
        }
        Ok(Self { running })
    }

    pub fn udp_addresses(&self) -> Vec<SocketAddr> {
        self.running
            .iter()
            .flat_map(|r| r.udp_addresses().iter().copied())
            .collect()
    }

    pub fn tcp_addresses(&self) -> Vec<SocketAddr> {
        self.running
            .iter()
            .flat_map(|r| r.tcp_addresses().iter().copied())
            .collect()
    }

    /// The counters of all families added up.
    pub fn counters(&self) -> CounterSnapshot {
        sum(self.running.iter().map(RunningReflector::counters))
    }

    pub fn stop(self) -> CounterSnapshot {
        sum(self.running.into_iter().map(RunningReflector::stop))
    }
}

fn sum(all: impl Iterator<Item = CounterSnapshot>) -> CounterSnapshot {
    all.fold(CounterSnapshot::default(), |a, b| CounterSnapshot {
        requests: a.requests + b.requests,
        responses: a.responses + b.responses,
        error_responses: a.error_responses + b.error_responses,
        dropped: a.dropped + b.dropped,
        rate_limited: a.rate_limited + b.rate_limited,
        forwarded: a.forwarded + b.forwarded,
        link_accepted: a.link_accepted + b.link_accepted,
        link_refused: a.link_refused + b.link_refused,
        tcp_connections: a.tcp_connections + b.tcp_connections,
        tcp_refused: a.tcp_refused + b.tcp_refused,
        tcp_source_capped: a.tcp_source_capped + b.tcp_source_capped,
        tcp_timed_out: a.tcp_timed_out + b.tcp_timed_out,
        binding: a.binding + b.binding,
        change_ip: a.change_ip + b.change_ip,
        change_port: a.change_port + b.change_port,
        change_both: a.change_both + b.change_both,
        response_port: a.response_port + b.response_port,
        padding: a.padding + b.padding,
        classic: a.classic + b.classic,
        other: a.other + b.other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn no_secret() -> Result<Vec<u8>, String> {
        Err("no secret".into())
    }

    #[test]
    fn one_deployment_per_family_each_with_its_own_alternate() {
        let f = FamilyAddresses {
            primaries: vec![a("[2001:db8::1]:3478"), a("192.0.2.1:3478")],
            alternates: vec![a("192.0.2.2:3479"), a("[2001:db8::2]:3479")],
            cooperate: None,
        };
        let cfgs = f.configs(no_secret).unwrap();
        assert_eq!(cfgs.len(), 2);
        assert_eq!(
            (cfgs[0].primary, cfgs[0].alternate),
            (a("192.0.2.1:3478"), Some(a("192.0.2.2:3479")))
        );
        assert_eq!(
            (cfgs[1].primary, cfgs[1].alternate),
            (a("[2001:db8::1]:3478"), Some(a("[2001:db8::2]:3479")))
        );
    }

    #[test]
    fn cooperating_families_get_one_link_each() {
        let f = FamilyAddresses {
            primaries: vec![a("192.0.2.1:3478"), a("[2001:db8::1]:3478")],
            alternates: vec![a("192.0.2.2:3479"), a("[2001:db8::2]:3479")],
            cooperate: Some(3480),
        };
        let cfgs = f.configs(|| Ok(vec![7; 16])).unwrap();
        let links: Vec<_> = cfgs
            .iter()
            .map(|c| c.partner.as_ref().map(|l| (l.listen, l.partner)))
            .collect();
        assert_eq!(
            links,
            [
                Some((a("192.0.2.1:3480"), a("192.0.2.2:3480"))),
                Some((a("[2001:db8::1]:3480"), a("[2001:db8::2]:3480")))
            ]
        );
        assert!(f.configs(no_secret).is_err());
    }

    #[test]
    fn shapes_that_cannot_work_are_refused() {
        let refuse = |p: &[&str], alt: &[&str]| {
            FamilyAddresses {
                primaries: p.iter().map(|s| a(s)).collect(),
                alternates: alt.iter().map(|s| a(s)).collect(),
                cooperate: None,
            }
            .configs(no_secret)
            .unwrap_err()
        };
        assert!(refuse(&["192.0.2.1:3478", "192.0.2.3:3478"], &[]).contains("more than one"));
        assert!(refuse(&["192.0.2.1:3478"], &["[2001:db8::2]:3479"]).contains("no --primary"));
        assert!(refuse(&["0.0.0.0:3478"], &[]).contains("wildcard"));
        assert!(refuse(&[], &[]).contains("no --primary"));
    }
}
