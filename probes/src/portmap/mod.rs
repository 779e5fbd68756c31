//! The probe's port-mapping driver (issue 12): finds the default gateway, runs the NAT-PMP and PCP
//! client machines ([`natscope_core::portmap`]) over tokio UDP sockets at the same time, and, for
//! `--map`, creates a short-lived UDP mapping with the best protocol that answered, proves that
//! inbound traffic reaches the mapped socket through it, and deletes it.
//!
//! Gateway discovery reads the kernel's IPv4 routing table as text, from
//! `/proc/thread-self/net/route` (the calling thread's network namespace, which is what a lab node's
//! thread has entered; `/proc/net/route` follows the process's main thread instead), falling back
//! to `/proc/net/route`: the next hop of the route towards the STUN server (longest prefix, then
//! lowest metric), since that gateway's NAT is the one the probe classifies; a server on loopback
//! or on a directly connected network has no gateway on its path and nothing is asked. IPv4 only:
//! NAT-PMP is IPv4-only, and a PCP server reached over IPv6 (`/proc/net/ipv6_route`) is not probed
//! yet. Reading the file needs no netlink socket and no privilege.
//!
//! Each protocol gets its own socket, connected to the gateway's port 5351, so the kernel drops
//! datagrams from anyone else and reports an ICMP port unreachable as a refused receive: a gateway
//! without the service usually says so in a millisecond, and one that stays silent costs the
//! [`Retransmit::DISCOVERY`] budget (250 ms), overlapped with the STUN tests by the caller.
//!
//! Inbound verification (RFC 5780 §4.6's technique, which the lifetime test also uses): a Binding
//! request from a second local socket, with RESPONSE-PORT set to the mapping's external port, asks
//! the STUN server to answer to this host's public address at that port; natscope's reflector
//! honours RESPONSE-PORT towards the requester's own address. The answer must arrive on the mapped
//! socket, which itself never sent anything to the server, so only the mapping can let it in. An
//! answer on the asking socket instead means the server ignored RESPONSE-PORT: a problem line.
//!
//! UPnP IGD runs beside them through [`crate::upnp`] (SSDP, device description,
//! GetExternalIPAddress), given [`UPNP_DISCOVERY`]: a UPnP device waits a random 0 to MX seconds
//! before answering an M-SEARCH, even a unicast one, and MX = 1 s is the smallest the
//! specification allows, so a shorter budget would call a slow gateway's UPnP absent. The wait
//! overlaps the STUN tests like the other two protocols'. Its outcome is reported in the same
//! shape as theirs.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use natscope_core::client::{build_request, BindingResponse, RequestOptions};
use natscope_core::net::Transmit;
use natscope_core::stun::TransactionId;
use rand::Rng;
use tokio::net::UdpSocket;

pub use natscope_core::portmap::*;

/// Longest any single protocol run may take, whatever its schedule says (a guard, not a budget).
const GUARD: Duration = Duration::from_secs(10);
/// The lifetime `--map` asks for, in seconds: long enough for the check, short enough that a
/// mapping whose deletion is lost does not linger (servers may clamp it upwards).
pub const MAP_LIFETIME_S: u32 = 120;
/// The lifetime of the throwaway PCP mapping discovery makes to learn the external address.
const DISCOVERY_MAP_LIFETIME_S: u32 = 30;
/// How long UPnP discovery waits for the gateway's SSDP answer and description (see the module
/// comment: MX = 1 s, plus the description fetch).
pub const UPNP_DISCOVERY: Duration = Duration::from_millis(1200);
/// UPnP discovery's wait in a default probe: the budget the other protocols get.
pub const UPNP_QUICK: Duration = Duration::from_millis(250);
/// Bound on each UPnP SOAP action.
const UPNP_ACTION: Duration = Duration::from_secs(2);

/// What the probe asks of the gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Ask at all (`--no-port-mapping` turns it off).
    pub enabled: bool,
    /// `--map`: create a mapping, verify it inbound against the STUN server, delete it.
    pub map: bool,
    /// Ask this gateway instead of the default route's (tests).
    pub gateway: Option<IpAddr>,
    /// Leave UPnP IGD out (tests of a gateway that speaks only NAT-PMP and PCP): `upnp` is then
    /// `null` with the problem "UPnP not probed".
    pub skip_upnp: bool,
}

impl Options {
    /// From the probe's flags.
    pub fn from_flags(no_port_mapping: bool, map: bool) -> Self {
        Self {
            enabled: !no_port_mapping,
            map,
            gateway: None,
            skip_upnp: false,
        }
    }
}

/// The default IPv4 gateway in `/proc/net/route`'s text: the lowest-metric default route with
/// the gateway flag (RTF_GATEWAY, 0x2) and the route up (RTF_UP, 0x1).
pub fn parse_proc_route(text: &str) -> Option<Ipv4Addr> {
    route_to(text, Ipv4Addr::UNSPECIFIED)
        .filter(|r| r.prefix_len == 0)
        .and_then(|r| r.gateway)
}

/// The route `/proc/net/route`'s text gives towards `dest`: longest prefix, then lowest metric,
/// among routes that are up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The next hop; `None` for a directly connected network.
    pub gateway: Option<Ipv4Addr>,
    /// The route's prefix length (0 for the default route).
    pub prefix_len: u32,
}

/// See [`Route`].
pub fn route_to(text: &str, dest: Ipv4Addr) -> Option<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| f.get(i).and_then(|s| u32::from_str_radix(s, 16).ok());
            let (net, gw, flags, metric, mask) = (hex(1)?, hex(2)?, hex(3)?, f.get(6)?, hex(7)?);
            let metric: u32 = metric.parse().ok()?;
            // The file prints the kernel's network-order words in host order (little-endian).
            let (net, gw, mask) = (net.swap_bytes(), gw.swap_bytes(), mask.swap_bytes());
            let up = flags & 0x1 != 0;
            let via = flags & 0x2 != 0 && gw != 0;
            (up && u32::from(dest) & mask == net & mask).then(|| {
                let route = Route {
                    gateway: via.then(|| Ipv4Addr::from(gw)),
                    prefix_len: mask.count_ones(),
                };
                (route, metric)
            })
        })
        .min_by_key(|(r, metric)| (std::cmp::Reverse(r.prefix_len), *metric))
        .map(|(r, _)| r)
}

fn routing_table() -> io::Result<String> {
    std::fs::read_to_string("/proc/thread-self/net/route")
        .or_else(|_| std::fs::read_to_string("/proc/net/route"))
}

/// The default IPv4 gateway of the calling thread's network namespace.
pub fn default_gateway() -> io::Result<Option<Ipv4Addr>> {
    Ok(parse_proc_route(&routing_table()?))
}

/// The gateway to ask: the next hop towards the STUN server (its NAT is the one the probe
/// classifies), or an error line saying why there is none. A server on loopback or on a directly
/// connected network has no gateway on its path, so nothing is asked (and tests against a local
/// reflector never reach the machine's real router). An IPv6 server: the IPv4 default gateway.
pub fn gateway_towards(server: SocketAddr) -> Result<Ipv4Addr, String> {
    let text = routing_table().map_err(|e| format!("cannot read the routing table: {e}"))?;
    let none = |why: &str| Err(format!("port mapping not probed: {why}"));
    match server.ip().to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => {
            none("the server is on loopback, so no gateway is on its path")
        }
        IpAddr::V4(v4) => match route_to(&text, v4) {
            Some(Route {
                gateway: Some(g), ..
            }) => Ok(g),
            Some(_) => {
                none("the server is on a directly connected network, so no gateway is on its path")
            }
            None => none("no IPv4 route towards the server"),
        },
        IpAddr::V6(v6) if v6.is_loopback() => {
            none("the server is on loopback, so no gateway is on its path")
        }
        IpAddr::V6(_) => parse_proc_route(&text)
            .map_or_else(|| none("no IPv4 default gateway in the routing table"), Ok),
    }
}

/// The operations the driver needs from a client machine (both have the same shape).
trait Client {
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<PortMappingService>>;
    fn poll_timeout(&self) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant);
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]);
    fn handle_unreachable(&mut self, now: Instant);
    fn is_done(&self) -> bool;
    fn outcome(&self) -> &Outcome;
    fn delete(&mut self, now: Instant, schedule: Retransmit);
}

macro_rules! client {
    ($t:ty) => {
        impl Client for $t {
            fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<PortMappingService>> {
                <$t>::poll_transmit(self, now)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                <$t>::poll_timeout(self)
            }
            fn handle_timeout(&mut self, now: Instant) {
                <$t>::handle_timeout(self, now)
            }
            fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
                <$t>::handle_datagram(self, now, from, bytes)
            }
            fn handle_unreachable(&mut self, now: Instant) {
                <$t>::handle_unreachable(self, now)
            }
            fn is_done(&self) -> bool {
                <$t>::is_done(self)
            }
            fn outcome(&self) -> &Outcome {
                <$t>::outcome(self)
            }
            fn delete(&mut self, now: Instant, schedule: Retransmit) {
                <$t>::delete(self, now, schedule)
            }
        }
    };
}
client!(NatPmpClient);
client!(PcpClient);

/// Runs `m` over `sock` (connected to the server) until it is done, or the guard runs out.
async fn run<M: Client>(m: &mut M, sock: &UdpSocket) {
    let guard = Instant::now() + GUARD;
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        while let Some(t) = m.poll_transmit(now) {
            // Refused (an earlier ICMP port unreachable), unroutable or refused locally: the
            // service cannot be reached from here.
            if sock.send(&t.payload).await.is_err() {
                m.handle_unreachable(now);
                break;
            }
        }
        if m.is_done() || now >= guard {
            return;
        }
        let wake = m
            .poll_timeout()
            .unwrap_or(now + Duration::from_millis(50))
            .min(guard);
        tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => m.handle_datagram(Instant::now(), from, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    m.handle_unreachable(Instant::now())
                }
                Err(_) => {}
            },
            _ = tokio::time::sleep_until(wake.into()) => m.handle_timeout(Instant::now()),
        }
    }
}

/// A UDP socket connected to `gateway`'s port 5351, and the local address it uses.
async fn socket_to(gateway: IpAddr) -> io::Result<(UdpSocket, SocketAddr)> {
    let any: SocketAddr = (Ipv4Addr::UNSPECIFIED, 0).into();
    let s = UdpSocket::bind(any).await?;
    s.connect((gateway, natpmp::SERVER_PORT)).await?;
    let local = s.local_addr()?;
    Ok((s, local))
}

/// Asks the gateway over UPnP IGD, NAT-PMP and PCP at once (see the module comment). With
/// `opts.map`, `stun_server` is the server that proves the mapping inbound; the mapping is made
/// after discovery, with the best protocol that answered.
pub async fn probe(opts: Options, stun_server: SocketAddr) -> PortMappingReport {
    let mut report = discover_report(opts, stun_server).await;
    if opts.map {
        map_best(&mut report, stun_server).await;
    }
    report
}

/// [`probe`]'s discovery alone (no mapping is made, whatever `opts.map`); `opts.map` only gives
/// UPnP its longer wait ([`upnp_wait`]), since the mapping that follows needs its answer.
pub async fn discover_report(opts: Options, stun_server: SocketAddr) -> PortMappingReport {
    let gateway = match opts.gateway {
        Some(g) => g,
        None => match gateway_towards(stun_server) {
            Ok(g) => IpAddr::V4(g),
            Err(why) => return PortMappingReport::not_run(None, why),
        },
    };
    let upnp = async {
        match opts.skip_upnp {
            true => None,
            false => Some(discover_upnp(gateway, upnp_wait(opts)).await),
        }
    };
    let (found, upnp) = tokio::join!(discover(gateway), upnp);
    let (pmp, pcp) = match found {
        Ok(o) => o,
        Err(e) => {
            return PortMappingReport::not_run(
                Some(gateway),
                format!("cannot open a socket towards the gateway {gateway}: {e}"),
            )
        }
    };
    let mut outcomes = vec![
        (PortMappingService::NatPmp, &pmp),
        (PortMappingService::Pcp, &pcp),
    ];
    if let Some(u) = &upnp {
        outcomes.push((PortMappingService::Upnp, u));
    }
    PortMappingReport::new(Some(gateway), &outcomes)
}

/// How long UPnP discovery waits: [`UPNP_DISCOVERY`] when a mapping will be asked for (`--map`),
/// else the ~250 ms every other protocol gets. A device may delay its SSDP answer by up to MX =
/// 1 s, so silence within the short wait is reported as unknown, not as "no UPnP".
pub fn upnp_wait(opts: Options) -> Duration {
    if opts.map {
        UPNP_DISCOVERY
    } else {
        UPNP_QUICK
    }
}

/// `--map` after discovery: maps, verifies and deletes with the best protocol that answered
/// ([`PortMappingReport::best_service`]), recording the mapping and problems in `report`.
pub async fn map_best(report: &mut PortMappingReport, stun_server: SocketAddr) {
    let Some(gateway) = report.gateway else {
        return;
    };
    match report.best_service() {
        Some(service) => match map_and_verify(gateway, service, stun_server).await {
            Ok((mapped, problems)) => {
                report.mapped = mapped;
                report.problems.extend(problems);
            }
            Err(e) => report
                .problems
                .push(format!("--map: cannot open the sockets: {e}")),
        },
        None => report
            .problems
            .push("--map: no port-mapping protocol answered, so no mapping was made".into()),
    }
}

/// UPnP IGD discovery and GetExternalIPAddress, as an [`Outcome`] like the other two protocols'
/// (`requests_sent` counts the HTTP requests; the SSDP searches repeat every 100 ms until
/// answered). Only an IPv4 gateway is asked.
pub async fn discover_upnp(gateway: IpAddr, wait: Duration) -> Outcome {
    let start = Instant::now();
    let mut o = Outcome::default();
    let IpAddr::V4(gw) = gateway else {
        o.problems
            .push("UPnP: the gateway is not an IPv4 address".into());
        return o;
    };
    let local = match socket_to(gateway).await {
        Ok((_, SocketAddr::V4(l))) => *l.ip(),
        Ok(_) => return o,
        Err(e) => {
            o.problems
                .push(format!("UPnP: no socket towards {gateway}: {e}"));
            return o;
        }
    };
    match crate::upnp::discover(gw, local, wait).await {
        Ok(igd) => {
            o.available = Some(true);
            o.answers = 1;
            o.requests_sent = 2;
            o.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            match igd.external_address(UPNP_ACTION).await {
                Ok(a) => {
                    o.answers += 1;
                    o.external_address = Some(IpAddr::V4(a));
                }
                Err(e) => o.problems.push(format!("UPnP GetExternalIPAddress: {e}")),
            }
        }
        Err(crate::upnp::UpnpError::NoAnswer(..)) if wait < UPNP_DISCOVERY => {
            // Too short to tell: a device may wait up to 1 s before it answers.
            o.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            o.problems.push(format!(
                "UPnP: no SSDP answer within {} ms, which a device may legally take (up to 1 s); unknown — --map waits {} ms",
                wait.as_millis(),
                UPNP_DISCOVERY.as_millis()
            ));
        }
        Err(e) => {
            o.available = Some(false);
            o.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            if !matches!(e, crate::upnp::UpnpError::NoAnswer(..)) {
                o.problems.push(format!("UPnP: {e}"));
            }
        }
    }
    o
}

/// Discovery: NAT-PMP's external address, and PCP's ANNOUNCE, then a throwaway MAP of the PCP
/// socket's own port (to learn the external address PCP assigns) that is deleted at once.
pub async fn discover(gateway: IpAddr) -> io::Result<(Outcome, Outcome)> {
    let (pmp_sock, _) = socket_to(gateway).await?;
    let (pcp_sock, pcp_local) = socket_to(gateway).await?;
    let now = Instant::now();
    let mut pmp = NatPmpClient::new(now, gateway, Retransmit::DISCOVERY, None);
    let mut pcp = PcpClient::new(
        now,
        gateway,
        pcp_local.ip(),
        rand::thread_rng().gen(),
        Retransmit::DISCOVERY,
        Some((pcp_local.port(), DISCOVERY_MAP_LIFETIME_S)),
    );
    let pcp_run = async {
        run(&mut pcp, &pcp_sock).await;
        if pcp.outcome().mapping.is_some() {
            pcp.delete(Instant::now(), Retransmit::DISCOVERY);
            run(&mut pcp, &pcp_sock).await;
        }
    };
    tokio::join!(run(&mut pmp, &pmp_sock), pcp_run);
    let mut pcp_outcome = pcp.outcome().clone();
    // The throwaway mapping is not the report's `mapped`; its deletion is bookkeeping.
    if pcp_outcome.deleted == Some(true) {
        pcp_outcome.deleted = None;
    }
    Ok((pmp.outcome().clone(), pcp_outcome))
}

/// `--map`: maps a fresh local socket's port over `service`, checks inbound reachability through
/// it against `stun_server`, deletes it. Returns the mapping (if one was granted) and problems.
pub async fn map_and_verify(
    gateway: IpAddr,
    service: PortMappingService,
    stun_server: SocketAddr,
) -> io::Result<(Option<MappedPort>, Vec<String>)> {
    let (ctl, ctl_local) = socket_to(gateway).await?;
    let mapped_sock = UdpSocket::bind((ctl_local.ip(), 0)).await?;
    let internal = mapped_sock.local_addr()?;
    let now = Instant::now();
    let request = Some((internal.port(), MAP_LIFETIME_S));
    let mut problems = Vec::new();
    let granted = match service {
        PortMappingService::Pcp => {
            let nonce = rand::thread_rng().gen();
            let c = PcpClient::new(
                now,
                gateway,
                ctl_local.ip(),
                nonce,
                Retransmit::MAPPING,
                request,
            );
            map_verify_delete(c, &ctl, &mapped_sock, stun_server, &mut problems).await
        }
        PortMappingService::NatPmp => {
            let c = NatPmpClient::new(now, gateway, Retransmit::MAPPING, request);
            map_verify_delete(c, &ctl, &mapped_sock, stun_server, &mut problems).await
        }
        PortMappingService::Upnp => {
            upnp_map_and_verify(gateway, &mapped_sock, stun_server, &mut problems).await
        }
    };
    Ok((
        granted.map(|(m, verified)| MappedPort {
            protocol: service,
            internal,
            external: m.external,
            lifetime_s: m.lifetime_s,
            inbound_verified: verified,
        }),
        problems,
    ))
}

/// `--map` over NAT-PMP or PCP: `c`'s map request, the inbound check through the granted
/// mapping, the deletion.
async fn map_verify_delete<C: Client>(
    mut c: C,
    ctl: &UdpSocket,
    mapped: &UdpSocket,
    stun_server: SocketAddr,
    problems: &mut Vec<String>,
) -> Option<(GrantedMapping, bool)> {
    run(&mut c, ctl).await;
    let granted = c.outcome().mapping;
    let verified = match granted {
        Some(m) => Some(verify_inbound(mapped, m.external.port(), stun_server).await),
        None => None,
    };
    delete_with(&mut c, Retransmit::MAPPING, ctl).await;
    finish(c.outcome(), granted, verified, problems)
}

/// `--map` over UPnP IGD: AddAnyPortMapping (or AddPortMapping) of `mapped`'s port, the inbound
/// check, DeletePortMapping.
async fn upnp_map_and_verify(
    gateway: IpAddr,
    mapped: &UdpSocket,
    stun_server: SocketAddr,
    problems: &mut Vec<String>,
) -> Option<(GrantedMapping, bool)> {
    let (IpAddr::V4(gw), Ok(SocketAddr::V4(internal))) = (gateway, mapped.local_addr()) else {
        problems.push("--map: UPnP IGD maps IPv4 only".into());
        return None;
    };
    let igd = match crate::upnp::discover(gw, *internal.ip(), UPNP_DISCOVERY).await {
        Ok(igd) => igd,
        Err(e) => {
            problems.push(format!("--map: UPnP: {e}"));
            return None;
        }
    };
    let lifetime = Duration::from_secs(u64::from(MAP_LIFETIME_S));
    let added = igd
        .add_any_port_mapping(
            MapProtocol::Udp,
            internal,
            internal.port(),
            lifetime,
            "natscope probe --map",
            UPNP_ACTION,
        )
        .await;
    let port = match added {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!("--map: UPnP: {e}"));
            return None;
        }
    };
    // UPnP has no external address in its mapping answer: the one GetExternalIPAddress claims.
    let external_ip = match igd.external_address(UPNP_ACTION).await {
        Ok(a) => IpAddr::V4(a),
        Err(e) => {
            problems.push(format!("--map: UPnP GetExternalIPAddress: {e}"));
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    };
    let verified = verify_inbound(mapped, port, stun_server).await;
    let deleted = igd
        .delete_port_mapping(MapProtocol::Udp, port, UPNP_ACTION)
        .await;
    let outcome = Outcome {
        deleted: Some(deleted.is_ok()),
        problems: deleted
            .err()
            .map(|e| format!("UPnP DeletePortMapping: {e}"))
            .into_iter()
            .collect(),
        ..Outcome::default()
    };
    let granted = GrantedMapping {
        internal_port: internal.port(),
        external: SocketAddr::new(external_ip, port),
        lifetime_s: MAP_LIFETIME_S,
    };
    finish(&outcome, Some(granted), Some(verified), problems)
}

type Verified = Result<(), String>;

fn finish(
    o: &Outcome,
    granted: Option<GrantedMapping>,
    verified: Option<Verified>,
    problems: &mut Vec<String>,
) -> Option<(GrantedMapping, bool)> {
    problems.extend(o.problems.iter().map(|p| format!("--map: {p}")));
    let m = granted?;
    if o.deleted != Some(true) {
        problems.push(format!(
            "--map: the mapping to {} was not confirmed deleted; it expires after {} s",
            m.external, m.lifetime_s
        ));
    }
    let ok = match verified {
        Some(Ok(())) => true,
        Some(Err(why)) => {
            problems.push(format!("--map: inbound not verified: {why}"));
            false
        }
        None => false,
    };
    Some((m, ok))
}

/// Asks `server`, from a fresh socket, to answer to `external_port` (RESPONSE-PORT) and waits for
/// the answer on `mapped` (see the module comment). Four tries over about 2 s.
pub async fn verify_inbound(
    mapped: &UdpSocket,
    external_port: u16,
    server: SocketAddr,
) -> Verified {
    let local_ip = mapped.local_addr().map_err(|e| e.to_string())?.ip();
    let asker = UdpSocket::bind((local_ip, 0))
        .await
        .map_err(|e| format!("cannot bind the asking socket: {e}"))?;
    let tid = TransactionId::random();
    let mut buf = [0u8; 1500];
    let opts = RequestOptions {
        response_port: Some(external_port),
        ..RequestOptions::default()
    };
    let n = build_request(&mut buf, &tid, &opts).map_err(|e| e.to_string())?;
    let request = buf[..n].to_vec();
    let mut wrong_socket = None;
    for wait_ms in [250u64, 500, 500, 750] {
        if let Err(e) = asker.send_to(&request, server).await {
            return Err(format!("cannot send to {server}: {e}"));
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            let mut b1 = [0u8; 1500];
            let mut b2 = [0u8; 1500];
            tokio::select! {
                r = mapped.recv_from(&mut b1) => if let Ok((n, from)) = r {
                    if let Ok(resp) = BindingResponse::parse(&b1[..n], &tid, Some(from)) {
                        if resp.error_code.is_none() {
                            return Ok(());
                        }
                    }
                },
                r = asker.recv_from(&mut b2) => if let Ok((n, from)) = r {
                    if let Ok(resp) = BindingResponse::parse(&b2[..n], &tid, Some(from)) {
                        wrong_socket = Some(match resp.error_code {
                            Some(code) => format!("{server} refused RESPONSE-PORT with error {code}"),
                            None => format!("{server} answered the asking socket: it ignores RESPONSE-PORT"),
                        });
                    }
                },
                _ = tokio::time::sleep_until(until) => break,
            }
        }
    }
    Err(wrong_socket.unwrap_or_else(|| {
        format!("no answer from {server} reached the mapped socket through port {external_port}")
    }))
}

/// How long [`map_port`] waits for a gateway to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortWait {
    /// PCP's and NAT-PMP's retransmission schedule and budget.
    pub schedule: Retransmit,
    /// UPnP's SSDP wait.
    pub upnp: Duration,
}

impl PortWait {
    /// The probe's discovery budget ([`Retransmit::DISCOVERY`], [`UPNP_QUICK`]): 250 ms.
    pub const PROBE: Self = Self {
        schedule: Retransmit::DISCOVERY,
        upnp: UPNP_QUICK,
    };
}

/// A mapping of a given local UDP port that its owner keeps, renews and deletes (punch maps the
/// port of its one socket, issue 12): the protocol's client machine that got it, so renewal and
/// deletion speak to the same gateway with the same PCP nonce.
#[derive(Debug)]
pub struct HeldMapping {
    pub service: PortMappingService,
    pub gateway: IpAddr,
    /// The local address the mapping forwards to (this host's address towards the gateway).
    pub internal: SocketAddr,
    pub granted: GrantedMapping,
    /// When the gateway granted (or last renewed) it.
    pub granted_at: Instant,
    how: Held,
}

#[derive(Debug)]
enum Held {
    Pcp(Box<PcpClient>, [u8; 12]),
    NatPmp(Box<NatPmpClient>),
    Upnp(Box<crate::upnp::Igd>),
}

/// What asking for a port's mapping found.
#[derive(Debug, Default)]
pub struct PortRequest {
    pub mapping: Option<HeldMapping>,
    /// Why no mapping was made, when none was.
    pub why_none: Option<String>,
    pub problems: Vec<String>,
}

/// Asks `gateway` to map local UDP port `port` for `lifetime_s`, with the best protocol that
/// answers (PCP > NAT-PMP > UPnP IGD), all three asked at once within `wait` (PCP and NAT-PMP
/// retransmit on [`PortWait::schedule`], UPnP's SSDP search waits [`PortWait::upnp`]): PCP maps
/// at once (ANNOUNCE, then MAP); NAT-PMP and UPnP are only discovered meanwhile, and map
/// afterwards if PCP granted nothing. A granted PCP mapping ends the wait for the others, so a PCP
/// gateway costs two round trips and a silent one the budget.
pub async fn map_port(gateway: IpAddr, port: u16, lifetime_s: u32, wait: PortWait) -> PortRequest {
    let mut out = PortRequest::default();
    let (pcp_sock, ctl_local) = match socket_to(gateway).await {
        Ok(s) => s,
        Err(e) => {
            out.why_none = Some(format!(
                "cannot open a socket towards the gateway {gateway}: {e}"
            ));
            return out;
        }
    };
    let pmp_sock = match socket_to(gateway).await {
        Ok((s, _)) => s,
        Err(e) => {
            out.why_none = Some(format!(
                "cannot open a socket towards the gateway {gateway}: {e}"
            ));
            return out;
        }
    };
    let internal = SocketAddr::new(ctl_local.ip(), port);
    let now = Instant::now();
    let nonce: [u8; 12] = rand::thread_rng().gen();
    let mut pcp = PcpClient::new(
        now,
        gateway,
        ctl_local.ip(),
        nonce,
        wait.schedule,
        Some((port, lifetime_s)),
    );
    let mut pmp = NatPmpClient::new(now, gateway, wait.schedule, None);
    let (pcp_ref, pmp_ref) = (&pcp_sock, &pmp_sock);
    let pcp_f = async move {
        run(&mut pcp, pcp_ref).await;
        pcp
    };
    let pmp_f = async move {
        run(&mut pmp, pmp_ref).await;
        pmp
    };
    let upnp_f = async {
        match (gateway, ctl_local.ip()) {
            (IpAddr::V4(gw), IpAddr::V4(local)) => {
                Some(crate::upnp::discover(gw, local, wait.upnp).await)
            }
            _ => None,
        }
    };
    tokio::pin!(pcp_f, pmp_f, upnp_f);
    let (mut pcp, mut pmp, mut upnp) = (None, None, None);
    loop {
        tokio::select! {
            c = &mut pcp_f, if pcp.is_none() => pcp = Some(c),
            c = &mut pmp_f, if pmp.is_none() => pmp = Some(c),
            r = &mut upnp_f, if upnp.is_none() => upnp = Some(r),
        }
        // PCP is preferred: its grant ends the wait; otherwise NAT-PMP once both answered, and
        // UPnP once all three did.
        let pcp_granted = pcp.as_ref().is_some_and(|c| c.outcome().mapping.is_some());
        let pmp_answered = pmp
            .as_ref()
            .is_some_and(|c| c.outcome().available == Some(true));
        if pcp_granted || (pcp.is_some() && (pmp_answered || (pmp.is_some() && upnp.is_some()))) {
            break;
        }
    }
    if let Some(pcp) = pcp {
        out.problems
            .extend(pcp.outcome().problems.iter().map(|p| format!("PCP: {p}")));
        if let Some(granted) = pcp.outcome().mapping {
            out.mapping = Some(HeldMapping {
                service: PortMappingService::Pcp,
                gateway,
                internal,
                granted,
                granted_at: Instant::now(),
                how: Held::Pcp(Box::new(pcp), nonce),
            });
            return out;
        }
    }
    if pmp.is_some_and(|c| c.outcome().available == Some(true)) {
        let mut c = NatPmpClient::new(
            Instant::now(),
            gateway,
            Retransmit::MAPPING,
            Some((port, lifetime_s)),
        );
        run(&mut c, &pmp_sock).await;
        out.problems
            .extend(c.outcome().problems.iter().map(|p| format!("NAT-PMP: {p}")));
        if let Some(granted) = c.outcome().mapping {
            out.mapping = Some(HeldMapping {
                service: PortMappingService::NatPmp,
                gateway,
                internal,
                granted,
                granted_at: Instant::now(),
                how: Held::NatPmp(Box::new(c)),
            });
            return out;
        }
    }
    match (upnp.flatten(), internal) {
        (Some(Ok(igd)), SocketAddr::V4(v4)) => {
            let lifetime = Duration::from_secs(u64::from(lifetime_s));
            let added = igd
                .add_any_port_mapping(
                    MapProtocol::Udp,
                    v4,
                    port,
                    lifetime,
                    "natscope punch",
                    UPNP_ACTION,
                )
                .await;
            match added {
                Ok(external_port) => {
                    let ip = match igd.external_address(UPNP_ACTION).await {
                        Ok(a) => IpAddr::V4(a),
                        Err(e) => {
                            out.problems.push(format!("UPnP GetExternalIPAddress: {e}"));
                            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                        }
                    };
                    out.mapping = Some(HeldMapping {
                        service: PortMappingService::Upnp,
                        gateway,
                        internal,
                        granted: GrantedMapping {
                            internal_port: port,
                            external: SocketAddr::new(ip, external_port),
                            lifetime_s,
                        },
                        granted_at: Instant::now(),
                        how: Held::Upnp(Box::new(igd)),
                    });
                    return out;
                }
                Err(e) => out.problems.push(format!("UPnP AddPortMapping: {e}")),
            }
        }
        (Some(Err(e)), _) if !matches!(e, crate::upnp::UpnpError::NoAnswer(..)) => {
            out.problems.push(format!("UPnP: {e}"))
        }
        _ => {}
    }
    out.why_none = Some(format!(
        "no port-mapping protocol granted a mapping at the gateway {gateway} within {} ms",
        wait.schedule.budget.max(wait.upnp).as_millis()
    ));
    out
}

impl HeldMapping {
    /// Renews the mapping for another `lifetime_s` (the same request again: RFC 6886 §3.3, RFC
    /// 6887 §11.2.1 with the same nonce, UPnP AddPortMapping of the same external port). `Err`
    /// says why it failed; the mapping then lapses at the end of its lifetime.
    pub async fn refresh(&mut self, lifetime_s: u32) -> Result<(), String> {
        let (sock, _) = socket_to(self.gateway).await.map_err(|e| e.to_string())?;
        let now = Instant::now();
        let port = self.internal.port();
        let granted = match &mut self.how {
            Held::Pcp(c, nonce) => {
                let fresh = PcpClient::new(
                    now,
                    self.gateway,
                    self.internal.ip(),
                    *nonce,
                    Retransmit::MAPPING,
                    Some((port, lifetime_s)),
                );
                renew(&mut **c, fresh, &sock).await
            }
            Held::NatPmp(c) => {
                let fresh = NatPmpClient::new(
                    now,
                    self.gateway,
                    Retransmit::MAPPING,
                    Some((port, lifetime_s)),
                );
                renew(&mut **c, fresh, &sock).await
            }
            Held::Upnp(igd) => {
                let SocketAddr::V4(v4) = self.internal else {
                    return Err("UPnP IGD maps IPv4 only".into());
                };
                igd.add_port_mapping(
                    MapProtocol::Udp,
                    v4,
                    self.granted.external.port(),
                    Duration::from_secs(u64::from(lifetime_s)),
                    "natscope punch",
                    UPNP_ACTION,
                )
                .await
                .map_err(|e| format!("UPnP AddPortMapping: {e}"))?;
                Some(GrantedMapping {
                    lifetime_s,
                    ..self.granted
                })
            }
        };
        let g = granted.ok_or_else(|| format!("{} renewal not granted", self.service))?;
        let moved = g.external != self.granted.external;
        let before = self.granted.external;
        self.granted = g;
        self.granted_at = Instant::now();
        if moved {
            return Err(format!(
                "the renewed mapping moved from {before} to {}",
                g.external
            ));
        }
        Ok(())
    }

    /// Deletes the mapping (lifetime 0, RFC 6886 §3.4, RFC 6887 §15; UPnP DeletePortMapping),
    /// within about `limit`.
    pub async fn delete(self, limit: Duration) -> Result<(), String> {
        let schedule = Retransmit {
            initial_rto: Duration::from_millis(60).min(limit),
            budget: limit,
        };
        let (sock, _) = socket_to(self.gateway).await.map_err(|e| e.to_string())?;
        let outcome = match self.how {
            Held::Pcp(mut c, _) => delete_with(&mut *c, schedule, &sock).await,
            Held::NatPmp(mut c) => delete_with(&mut *c, schedule, &sock).await,
            Held::Upnp(igd) => Some(
                igd.delete_port_mapping(MapProtocol::Udp, self.granted.external.port(), limit)
                    .await
                    .is_ok(),
            ),
        };
        match outcome {
            Some(true) => Ok(()),
            _ => Err(format!(
                "the gateway did not confirm deleting {} within {} ms; it expires after {} s",
                self.granted.external,
                limit.as_millis(),
                self.granted.lifetime_s
            )),
        }
    }
}

/// Runs `fresh` (the same map request again) and keeps it in place of `held` when the gateway
/// granted it; the grant.
async fn renew<C: Client>(held: &mut C, mut fresh: C, sock: &UdpSocket) -> Option<GrantedMapping> {
    run(&mut fresh, sock).await;
    let granted = fresh.outcome().mapping;
    if granted.is_some() {
        *held = fresh;
    }
    granted
}

/// Deletes `c`'s mapping on `schedule`; whether the gateway confirmed it.
async fn delete_with<C: Client>(c: &mut C, schedule: Retransmit, sock: &UdpSocket) -> Option<bool> {
    c.delete(Instant::now(), schedule);
    run(c, sock).await;
    c.outcome().deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
        eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn the_lowest_metric_default_route_is_the_gateway() {
        assert_eq!(parse_proc_route(ROUTE), Some(Ipv4Addr::new(192, 0, 2, 1)));
        let only_link = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(parse_proc_route(only_link), None);
        assert_eq!(parse_proc_route(""), None);
        assert_eq!(parse_proc_route("x\nfoo bar\n\t\t\n"), None);
        let to = |d: [u8; 4]| route_to(ROUTE, Ipv4Addr::from(d));
        assert_eq!(
            to([192, 0, 2, 77]),
            Some(Route {
                gateway: None,
                prefix_len: 24
            }),
            "on-link"
        );
        assert_eq!(
            to([8, 8, 8, 8]).and_then(|r| r.gateway),
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
        // A default route that is down (no RTF_UP) is not used.
        let down = ROUTE.replace("0003\t0\t0\t100", "0002\t0\t0\t100");
        assert_eq!(parse_proc_route(&down), Some(Ipv4Addr::new(192, 168, 1, 1)));
    }
}
