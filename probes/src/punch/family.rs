//! Punch over both address families (issue 13): the driver's second socket. A peer whose
//! rendezvous server is IPv4 also opens one UDP socket for IPv6, gathers its IPv6 candidates and
//! hands them to the machine ([`DualStack`]); the session then probes both families in the same
//! rounds, and the first path proven both ways wins, whatever its family.
//!
//! Why a second socket in the driver rather than a second local address in the machines: the
//! machines already name their source as "a local transport address" and never look at it, so
//! they stay one-socket-agnostic if the driver sends each datagram from its socket of the
//! destination's family (`pick`); only the candidate lists and the probe filter had to learn
//! about the second family (`natscope_core::punch::peer::DualStack`).
//!
//! The IPv6 socket is bound to one address, not to `::`: the address the kernel would pick as
//! the source toward the server (or toward the global unicast space when the server has no IPv6
//! address). Bound to `::`, a host with several global addresses may answer from another address
//! than the one the peer sent to, and the peer's firewall (or the peer itself, which accepts an
//! answer only from where its probe went) drops it (EasyTier#641). The candidates are that
//! address when it is global unicast (2000::/3; behind NPTv6 or NAT66 the host holds a ULA, which
//! nobody outside can reach) and the server-reflexive IPv6 address when the rendezvous server is
//! reachable over IPv6 (`--via6`, or the IPv6 address of `--via`'s name): a plain Binding request
//! from the IPv6 socket, which `punch serve` answers. Behind NPTv6 only the latter reaches the
//! host: the translator rewrote the prefix.
//!
//! UDP only: over TCP the session stays on the server's family (simultaneous open over IPv6
//! would need a second listening socket and a second server connection; not done).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::peer::{DualStack, ProbeFamilies};
use crate::client::transact_udp;
use crate::resolve::{server_address, ResolveError, Service};
use natscope_core::client::{RequestOptions, Rto};
use natscope_core::stun::TransactionId;

/// `--family` and `--via6` of `punch listen` and `punch connect` (flattened into both).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct FamilyArgs {
    /// Punch over IPv4, IPv6 or both at once (4|6|both; the relay keeps the server's family).
    #[arg(long, value_name = "4|6|both", default_value = "both", value_parser = ProbeFamilies::parse)]
    pub family: Option<ProbeFamilies>,
    /// The rendezvous server's IPv6 address, where this side learns its IPv6 server-reflexive
    /// address (needed behind NPTv6; default: the IPv6 address of --via's name, if it has one).
    #[arg(long, value_name = "[ADDRESS]:PORT")]
    pub via6: Option<SocketAddr>,
}

impl FamilyArgs {
    /// `--via`'s servers, resolved as `probe` resolves its servers, and the options of the
    /// second family (the server's IPv6 address from `--via6` or `via`'s first name).
    pub fn resolve(
        &self,
        via: &[String],
    ) -> Result<(Vec<SocketAddr>, FamilyOptions), ResolveError> {
        let servers = via
            .iter()
            .map(|v| server_address(v, Service::PUNCH))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((servers, self.options(via)))
    }

    /// The options, the server's IPv6 address taken from `via`'s first name when `--via6` is
    /// not given (a literal address has none).
    pub fn options(&self, via: &[String]) -> FamilyOptions {
        let named = || {
            let v = via
                .first()
                .filter(|_| self.family.unwrap_or_default().ipv6)?;
            if v.parse::<SocketAddr>().is_ok() {
                return None;
            }
            v.to_socket_addrs().ok()?.find(SocketAddr::is_ipv6)
        };
        FamilyOptions {
            families: self.family.unwrap_or_default(),
            via6: self.via6.or_else(named),
        }
    }
}

/// How a peer uses the second family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyOptions {
    /// `--family` (default both).
    pub families: ProbeFamilies,
    /// The rendezvous server's IPv6 address (for the server-reflexive IPv6 candidate).
    pub via6: Option<SocketAddr>,
}

/// The driver's IPv6 socket, with what the machine needs to know about it.
pub(super) struct Second {
    /// Sends (a plain non-blocking clone, as the main socket's).
    pub socket: std::net::UdpSocket,
    /// Receives (the driver feeds it to its event channel).
    pub receiver: Arc<UdpSocket>,
    pub dual: DualStack,
}

/// How long the server-reflexive IPv6 address may take: three requests 100 ms apart, 200 ms
/// after the last (a connect's budget is seconds; the relay does not wait for this).
const REFLEXIVE_RTO: Rto = Rto {
    initial: Duration::from_millis(100),
    max_transmits: 3,
    last_wait_multiplier: 2,
    max_rto: Duration::from_millis(200),
};

/// Where the IPv6 socket's source address is chosen toward when the server has no IPv6 address:
/// an address in the global unicast space (2000::/3); no packet is sent to it.
const GLOBAL_ANCHOR: Ipv6Addr = Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 1);

/// Global unicast (RFC 4291 §2.4: 2000::/3), the only IPv6 host addresses worth announcing.
pub fn is_global_unicast(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xe000 == 0x2000
}

/// The families a peer punches over given the server and `opts`, before any socket is opened:
/// the server's family is always there (its socket exists), IPv6 only with an IPv4 server.
pub(super) fn wanted(server: SocketAddr, opts: &FamilyOptions) -> ProbeFamilies {
    let main = if server.is_ipv4() {
        ProbeFamilies::IPV4
    } else {
        ProbeFamilies::IPV6
    };
    opts.families.and(ProbeFamilies {
        ipv4: main.ipv4,
        ipv6: true,
    })
}

/// Opens the IPv6 socket beside an IPv4 server's socket and gathers its candidates; `None` when
/// IPv6 is not wanted or the host has no usable IPv6 address (then only the server's family is
/// punched, restricted by `--family`).
pub(super) async fn open_second(server: SocketAddr, opts: &FamilyOptions) -> Option<Second> {
    if server.is_ipv6() || !wanted(server, opts).ipv6 {
        return None;
    }
    let anchor = match (opts.via6, server.ip().is_loopback()) {
        (Some(v6), _) => v6,
        (None, true) => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), server.port()),
        (None, false) => SocketAddr::new(IpAddr::V6(GLOBAL_ANCHOR), server.port()),
    };
    let ip = match source_toward(anchor).ok()? {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(_) => return None,
    };
    // Link-local needs a scope the peer cannot know; the unspecified address is no candidate.
    if ip.is_unspecified() || ip.is_unicast_link_local() {
        return None;
    }
    let (sender, sock) = super::driver::udp_socket(SocketAddr::new(IpAddr::V6(ip), 0)).ok()?;
    let local = sock.local_addr().ok()?;
    let mut candidates = Vec::new();
    if is_global_unicast(ip) || (ip.is_loopback() && server.ip().is_loopback()) {
        candidates.push(local);
    }
    if let Some(v6) = opts.via6 {
        let tid = TransactionId::from_rng(&mut rand::thread_rng());
        let answer = transact_udp(&sock, v6, tid, &RequestOptions::default(), REFLEXIVE_RTO).await;
        match answer.ok().and_then(|r| r.xor_mapped.or(r.mapped)) {
            Some(mapped) if mapped.is_ipv6() && !candidates.contains(&mapped) => {
                candidates.push(mapped);
            }
            Some(_) => {}
            None => tracing::debug!(%v6, "punch: no IPv6 server-reflexive address"),
        }
    }
    Some(Second {
        socket: sender,
        receiver: sock,
        dual: DualStack {
            families: Some(wanted(server, opts)),
            candidates,
        },
    })
}

/// `--family` over TCP: only the server's family is punched there (the stream is opened from
/// the port the server saw), so a family without it is refused rather than silently ignored.
pub(super) fn check_tcp(server: SocketAddr, opts: &FamilyOptions) -> io::Result<()> {
    if opts.families.allows(server) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("--family: over tcp punch uses the rendezvous server's family only ({server})"),
    ))
}

/// The families punched when no second socket could be opened: `--family` within the server's.
pub(super) fn single(server: SocketAddr, opts: &FamilyOptions) -> DualStack {
    let main = ProbeFamilies {
        ipv4: server.is_ipv4(),
        ipv6: server.is_ipv6(),
    };
    DualStack {
        families: Some(opts.families.and(main)),
        candidates: Vec::new(),
    }
}

/// The local address the kernel would use toward `to` (no packet is sent).
fn source_toward(to: SocketAddr) -> io::Result<IpAddr> {
    let s = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0))?;
    s.connect(to)?;
    Ok(s.local_addr()?.ip())
}

/// Which of a peer's sockets sends to `to`: the second one for the other family, when there is
/// one (the machines name one source for every datagram).
pub(super) fn pick<'a>(
    main: &'a std::net::UdpSocket,
    second: Option<&'a std::net::UdpSocket>,
    main_local: SocketAddr,
    to: SocketAddr,
) -> &'a std::net::UdpSocket {
    match second {
        Some(s) if to.is_ipv6() != main_local.is_ipv6() => s,
        _ => main,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_global_unicast_is_announced() {
        for (ip, global) in [
            ("2001:db8:101::2", true),
            ("2600::1", true),
            ("fd00:1::2", false),
            ("fe80::1", false),
            ("::1", false),
            ("ff02::1", false),
        ] {
            let ip: Ipv6Addr = ip.parse().expect("ip");
            assert_eq!(is_global_unicast(ip), global, "{ip}");
        }
    }

    #[test]
    fn over_tcp_only_the_servers_family_is_accepted() {
        let v4: SocketAddr = "198.51.100.1:3490".parse().expect("addr");
        let only = |families| FamilyOptions {
            families,
            via6: None,
        };
        assert!(check_tcp(v4, &only(ProbeFamilies::BOTH)).is_ok());
        assert!(check_tcp(v4, &only(ProbeFamilies::IPV4)).is_ok());
        let e = check_tcp(v4, &only(ProbeFamilies::IPV6)).expect_err("refused");
        assert!(e.to_string().contains("over tcp"), "{e}");
    }

    #[test]
    fn family_narrows_to_what_the_server_and_the_sockets_allow() {
        let v4: SocketAddr = "198.51.100.1:3490".parse().expect("addr");
        let both = FamilyOptions::default();
        assert_eq!(wanted(v4, &both), ProbeFamilies::BOTH);
        let six = FamilyOptions {
            families: ProbeFamilies::IPV6,
            via6: None,
        };
        assert_eq!(wanted(v4, &six), ProbeFamilies::IPV6);
        // No second socket: IPv4 alone, or nothing at all with --family 6.
        assert_eq!(single(v4, &both).families, Some(ProbeFamilies::IPV4));
        let none = ProbeFamilies {
            ipv4: false,
            ipv6: false,
        };
        assert_eq!(single(v4, &six).families, Some(none));
    }
}
