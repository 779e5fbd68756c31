//! A server as a user types it — `HOST:PORT`, `IP:PORT`, `[IPV6]:PORT` — to the one socket address
//! to talk to: what `natscope probe`'s servers and `punch --via` accept. Names go to the system
//! resolver; IPv4 is preferred when a name has both families (most STUN and rendezvous servers
//! serve it). Every refusal says what to type instead.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// The kind of server asked for, named in the hint for a missing port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: &'static str,
    pub standard_port: u16,
}

impl Service {
    /// STUN (RFC 8489 §9: 3478).
    pub const STUN: Service = Service {
        name: "stun",
        standard_port: 3478,
    };
    /// natscope's rendezvous + relay server ([`crate::punch::DEFAULT_PORT`]).
    pub const PUNCH: Service = Service {
        name: "punch",
        standard_port: natscope_core::punch::DEFAULT_PORT,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{input:?} has no port: give HOST:PORT (the standard {} port is {})", service.name, service.standard_port)]
    NoPort { input: String, service: Service },
    #[error("{0:?} has no host: give HOST:PORT")]
    NoHost(String),
    #[error("{0:?}: write an ipv6 address in brackets, as [ADDRESS]:PORT")]
    UnbracketedIpv6(String),
    #[error("{0:?}: {1:?} is not a port number (1-65535)")]
    BadPort(String, String),
    #[error("{0:?} is not a valid ip address and port")]
    BadAddress(String),
    #[error("cannot resolve {host:?}")]
    Lookup {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{0:?} resolves to no address")]
    NoAddress(String),
    #[error("{0:?}: port 0 is not a server port")]
    PortZero(String),
    #[error("{0:?}: {1} is not a server address")]
    NotAServer(String, IpAddr),
}

/// Resolves `input` to one server address (see the module comment).
pub fn server_address(input: &str, service: Service) -> Result<SocketAddr, ResolveError> {
    let addr = match input.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let Some((host, port)) = input.rsplit_once(':') else {
                return Err(ResolveError::NoPort {
                    input: input.to_string(),
                    service,
                });
            };
            if host.is_empty() {
                return Err(ResolveError::NoHost(input.to_string()));
            }
            if host.contains(':') && !host.starts_with('[') {
                return Err(ResolveError::UnbracketedIpv6(input.to_string()));
            }
            let Ok(port) = port.parse::<u16>() else {
                return Err(ResolveError::BadPort(input.to_string(), port.to_string()));
            };
            // Digits and dots that did not parse are a mistyped IPv4 address, not a name to look up.
            if host.parse::<IpAddr>().is_ok()
                || host.starts_with('[')
                || host.chars().all(|c| c.is_ascii_digit() || c == '.')
            {
                return Err(ResolveError::BadAddress(input.to_string()));
            }
            let addrs: Vec<SocketAddr> = (host, port)
                .to_socket_addrs()
                .map_err(|source| ResolveError::Lookup {
                    host: host.to_string(),
                    source,
                })?
                .collect();
            let Some(a) = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) else {
                return Err(ResolveError::NoAddress(host.to_string()));
            };
            *a
        }
    };
    if addr.port() == 0 {
        return Err(ResolveError::PortZero(input.to_string()));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(ResolveError::NotAServer(input.to_string(), addr.ip()));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn server_addresses_parse_without_name_lookups() {
        let resolve = |s: &str| server_address(s, Service::STUN);
        assert_eq!(resolve("127.0.0.1:3478").unwrap(), addr("127.0.0.1:3478"));
        assert_eq!(resolve("[::1]:3478").unwrap(), addr("[::1]:3478"));
        let errors = [
            (
                "127.0.0.1",
                "\"127.0.0.1\" has no port: give HOST:PORT (the standard stun port is 3478)",
            ),
            (
                "127.0.0.1:99999",
                "\"127.0.0.1:99999\": \"99999\" is not a port number (1-65535)",
            ),
            (
                "127.0.0.1:0",
                "\"127.0.0.1:0\": port 0 is not a server port",
            ),
            (
                "0.0.0.0:3478",
                "\"0.0.0.0:3478\": 0.0.0.0 is not a server address",
            ),
            (
                "224.0.0.1:3478",
                "\"224.0.0.1:3478\": 224.0.0.1 is not a server address",
            ),
            (
                "::1:3478",
                "\"::1:3478\": write an ipv6 address in brackets, as [ADDRESS]:PORT",
            ),
            (
                "300.1.1.1:3478",
                "\"300.1.1.1:3478\" is not a valid ip address and port",
            ),
            (
                "[::1:3478",
                "\"[::1:3478\" is not a valid ip address and port",
            ),
            (":3478", "\":3478\" has no host: give HOST:PORT"),
            (
                "",
                "\"\" has no port: give HOST:PORT (the standard stun port is 3478)",
            ),
        ];
        for (input, want) in errors {
            let got = resolve(input).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_string()), "{input:?}");
        }
        assert_eq!(
            server_address("10.0.0.1", Service::PUNCH)
                .unwrap_err()
                .to_string(),
            "\"10.0.0.1\" has no port: give HOST:PORT (the standard punch port is 3490)"
        );
    }

    #[test]
    fn localhost_resolves_through_the_system_resolver() {
        // /etc/hosts, not the network: `localhost` is a loopback address in either family.
        let a = server_address("localhost:3490", Service::PUNCH).unwrap();
        assert!(a.ip().is_loopback() && a.port() == 3490, "{a}");
    }
}
