//! The real miniupnpd (Debian `miniupnpd-nftables`) on a kernel `linux` router with
//! `port_mapping = [...]` (issue 12): natscope's port-mapping clients and third-party ones
//! (`upnpc`, `natpmpc`) are judged against a server natscope did not write.
//!
//! Everything here happens inside the router's namespace: the nftables table miniupnpd fills
//! (`inet natscope_upnp`, created before the daemon starts, as Debian's `nft_init.sh` would in
//! the root namespace), the daemon itself (started with `-d`, so it stays in the foreground, writes
//! its pid file in the lab directory, and is stopped by pid with the lab's other processes), its configuration and lease
//! file (in the lab's resolver directory under the lab registry, removed with the lab).
//!
//! # Why the router's WAN address is not in 203.0.113.0/24
//!
//! miniupnpd 2.3.1 (Debian 12) refuses to map when its WAN address is reserved
//! (`addr_is_reserved` in getifaddr.c: 0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12,
//! 192.0.0/24, 192.0.2/24, 192.31.196/24, 192.52.193/24, 192.88.99/24, 192.168/16,
//! 192.175.48/24, 198.18/15, 198.51.100/24, 203.0.113/24, 224/4, 240/4), and `ext_ip=` is held
//! to the same list; only 2.3.9 added a switch. The lab's public segment is TEST-NET-3, so such
//! a router takes its WAN address from [`WAN_NET`] instead, on the same internet bridge (every
//! internet node's default route is on-link, so the address is reached by ARP). The range never
//! leaves the lab's namespaces: nothing is routed to the root namespace.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natscope_core::portmap::natpmp;
use natscope_core::portmap::PortMappingService;

use crate::topology::Ipv4Net;

/// WAN addresses of miniupnpd routers: just above TEST-NET-3 and outside every range
/// miniupnpd 2.3.1 calls reserved (module comment).
pub const WAN_NET: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(203, 0, 114, 0),
    len: 24,
};
/// The port of miniupnpd's HTTP server (device description and SOAP control) on the LAN address.
pub const HTTP_PORT: u16 = 5000;
/// The nftables table miniupnpd's rules live in (filter and nat chains both).
pub const TABLE: &str = "natscope_upnp";
/// How long the daemon gets to start answering.
const READY: Duration = Duration::from_secs(5);

/// Why a router's `port_mapping` list cannot be served by miniupnpd 2.3.1.
pub fn check(services: &[PortMappingService]) -> Result<(), String> {
    let pmp = services.contains(&PortMappingService::NatPmp);
    let pcp = services.contains(&PortMappingService::Pcp);
    if pmp != pcp {
        return Err(
            "miniupnpd 2.3.1 serves NAT-PMP and PCP together (one switch, enable_natpmp): \
             list both or neither on a `linux` router"
                .to_string(),
        );
    }
    Ok(())
}

/// The miniupnpd configuration for a router whose LAN interface is `lan_if` and WAN interface
/// `wan_if`, serving `services`, with its lease file at `lease_file`.
pub fn config(
    lan_if: &str,
    wan_if: &str,
    services: &[PortMappingService],
    lease_file: &Path,
    uuid: &str,
) -> String {
    let yes = |on: bool| if on { "yes" } else { "no" };
    let natpmp = services.contains(&PortMappingService::NatPmp)
        || services.contains(&PortMappingService::Pcp);
    let upnp = services.contains(&PortMappingService::Upnp);
    let mut c = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        c,
        "# written by natscope for a lab router (netns-lab/src/miniupnpd.rs)\n\
         ext_ifname={wan_if}\n\
         listening_ip={lan_if}\n\
         http_port={HTTP_PORT}\n\
         ipv6_disable=yes\n\
         enable_upnp={}\n\
         enable_natpmp={}\n\
         secure_mode=yes\n\
         system_uptime=yes\n\
         notify_interval=60\n\
         clean_ruleset_interval=600\n\
         lease_file={}\n\
         uuid={uuid}\n\
         upnp_table_name={TABLE}\n\
         upnp_nat_table_name={TABLE}\n\
         min_lifetime=10\n\
         max_lifetime=86400\n\
         allow 1024-65535 0.0.0.0/0 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n",
        yes(upnp),
        yes(natpmp),
        lease_file.display(),
    );
    c
}

/// The (empty) chains miniupnpd 2.3.1 adds its rules to; it does not create them itself. The
/// forward chain accepts: the router's own `natscope` table decides (it admits DNATed packets,
/// which exist only through a mapping).
pub fn nft_skeleton() -> String {
    format!(
        "table inet {TABLE} {{\n\
         chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}\n\
         chain miniupnpd {{ }}\n\
         chain prerouting {{ type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }}\n\
         chain postrouting {{ type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }}\n\
         chain prerouting_miniupnpd {{ }}\n\
         chain postrouting_miniupnpd {{ }}\n\
         }}\n"
    )
}

/// Where a router's miniupnpd keeps its files: under the lab's directory in the registry, which
/// the lab's teardown removes.
pub fn state_dir(lab: &str, node: &str) -> PathBuf {
    crate::registry::etc_path(lab).join(format!("miniupnpd-{node}"))
}

/// miniupnpd's lease file (one line per mapping it granted; read by `lab nat-table`).
pub fn leases_path(lab: &str, node: &str) -> PathBuf {
    state_dir(lab, node).join("leases")
}

/// A deterministic UUID for the device description (miniupnpd wants one), from the node name.
fn uuid_for(lab: &str, node: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lab.bytes().chain([b'/']).chain(node.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let hex = format!("{h:016x}");
    format!(
        "{}-{}-4{}-8{}-{}00000000",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[1..4],
        &hex[4..8]
    )
}

/// What [`start`] needs to know about the router.
#[derive(Clone, Debug)]
pub struct Router<'a> {
    pub lab: &'a str,
    pub node: &'a str,
    pub lan_if: &'a str,
    pub wan_if: &'a str,
    pub lan_addr: Ipv4Addr,
    pub services: &'a [PortMappingService],
}

/// Errors of [`start`], with the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum MiniupnpdError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("nft rejected miniupnpd's chains: {0}")]
    Nft(String),
    #[error("miniupnpd did not answer within {0:?} (its log: {1})")]
    NotReady(Duration, String),
    #[error("miniupnpd exited at start ({status}); its log: {log}")]
    Exited { status: String, log: String },
}

/// Writes the configuration and starts miniupnpd; `spawn` starts a command inside the router's
/// namespace and `probe` runs a readiness check there. Returns the daemon, which the caller
/// tracks like every other lab process.
pub fn start(
    r: &Router<'_>,
    spawn: impl Fn(Command) -> std::io::Result<Child>,
    probe: impl Fn(Box<dyn FnOnce() -> bool + Send>) -> bool,
) -> Result<Child, MiniupnpdError> {
    let io = |step| move |source| MiniupnpdError::Io { step, source };
    let dir = state_dir(r.lab, r.node);
    std::fs::create_dir_all(&dir).map_err(io("creating miniupnpd's directory"))?;
    let conf = dir.join("miniupnpd.conf");
    let leases = leases_path(r.lab, r.node);
    let log = dir.join("miniupnpd.log");
    std::fs::write(
        &conf,
        config(
            r.lan_if,
            r.wan_if,
            r.services,
            &leases,
            &uuid_for(r.lab, r.node),
        ),
    )
    .map_err(io("writing miniupnpd.conf"))?;

    let mut nft = Command::new("nft");
    nft.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = spawn(nft).map_err(io("running nft (install nftables)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(nft_skeleton().as_bytes())
            .map_err(io("writing nft rules"))?;
    }
    let out = child.wait_with_output().map_err(io("running nft"))?;
    if !out.status.success() {
        return Err(MiniupnpdError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }

    let log_file = std::fs::File::create(&log).map_err(io("creating miniupnpd.log"))?;
    let log_err = log_file.try_clone().map_err(io("opening miniupnpd.log"))?;
    let mut cmd = Command::new("miniupnpd");
    // `-P`: even with `-d` it writes a pid file and refuses to start when one names a live
    // process, which two labs' routers sharing /run/miniupnpd.pid would trip over.
    cmd.arg("-d")
        .arg("-f")
        .arg(&conf)
        .arg("-P")
        .arg(dir.join("miniupnpd.pid"))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    let mut daemon = spawn(cmd).map_err(io("starting miniupnpd (install miniupnpd-nftables)"))?;

    let lan = r.lan_addr;
    let upnp = r.services.contains(&PortMappingService::Upnp);
    let deadline = Instant::now() + READY;
    let read_log = || {
        std::fs::read_to_string(&log)
            .map(|s| tail(&s, 1500))
            .unwrap_or_else(|e| format!("unreadable: {e}"))
    };
    loop {
        if let Ok(Some(status)) = daemon.try_wait() {
            return Err(MiniupnpdError::Exited {
                status: status.to_string(),
                log: read_log(),
            });
        }
        let ready = probe(Box::new(move || answers(lan, upnp)));
        if ready {
            return Ok(daemon);
        }
        if Instant::now() >= deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            return Err(MiniupnpdError::NotReady(READY, read_log()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether miniupnpd answers on `lan`: its HTTP port accepts when UPnP is on, else NAT-PMP's
/// external-address request is answered.
fn answers(lan: Ipv4Addr, upnp: bool) -> bool {
    if upnp {
        return TcpStream::connect_timeout(
            &SocketAddr::from((lan, HTTP_PORT)),
            Duration::from_millis(200),
        )
        .is_ok();
    }
    let Ok(sock) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let req = natpmp::Request::ExternalAddress.encode();
    if sock.send_to(&req, (lan, natpmp::SERVER_PORT)).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 8)
}

/// The last `max` bytes of `s`, on a character boundary.
fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_switches_follow_the_services() {
        let all = [
            PortMappingService::NatPmp,
            PortMappingService::Pcp,
            PortMappingService::Upnp,
        ];
        let c = config("lan0", "wan0", &all, Path::new("/run/x/leases"), "u");
        for line in [
            "ext_ifname=wan0",
            "listening_ip=lan0",
            "enable_upnp=yes",
            "enable_natpmp=yes",
            "secure_mode=yes",
            "lease_file=/run/x/leases",
            "upnp_table_name=natscope_upnp",
        ] {
            assert!(c.lines().any(|l| l == line), "{line} missing in\n{c}");
        }
        let c = config(
            "lan0",
            "wan0",
            &[PortMappingService::Upnp],
            Path::new("/l"),
            "u",
        );
        assert!(c.lines().any(|l| l == "enable_natpmp=no"), "{c}");
        let c = config("lan0", "wan0", &all[..2], Path::new("/l"), "u");
        assert!(c.lines().any(|l| l == "enable_upnp=no"), "{c}");
    }

    #[test]
    fn nat_pmp_and_pcp_go_together() {
        assert!(check(&[PortMappingService::NatPmp]).is_err());
        assert!(check(&[PortMappingService::Pcp, PortMappingService::Upnp]).is_err());
        assert!(check(&[PortMappingService::Pcp, PortMappingService::NatPmp]).is_ok());
        assert!(check(&[PortMappingService::Upnp]).is_ok());
        assert!(check(&[]).is_ok());
    }

    #[test]
    fn wan_net_is_outside_miniupnpd_2_3_1_reserved_ranges() {
        // The list of getifaddr.c in miniupnpd 2.3.1 (module comment).
        let reserved: [(u32, u8); 18] = [
            (0x0000_0000, 8),
            (0x0a00_0000, 8),
            (0x6440_0000, 10),
            (0x7f00_0000, 8),
            (0xa9fe_0000, 16),
            (0xac10_0000, 12),
            (0xc000_0000, 24),
            (0xc000_0200, 24),
            (0xc01f_c400, 24),
            (0xc034_c100, 24),
            (0xc058_6300, 24),
            (0xc0a8_0000, 16),
            (0xc0af_3000, 24),
            (0xc612_0000, 15),
            (0xc633_6400, 24),
            (0xcb00_7100, 24),
            (0xe000_0000, 4),
            (0xf000_0000, 4),
        ];
        let wan = u32::from(WAN_NET.addr);
        for (net, len) in reserved {
            let shift = 32 - u32::from(len);
            assert_ne!(wan >> shift, net >> shift, "{WAN_NET:?} is reserved");
        }
        // And the lab's public segment is, which is why the router needs its own range.
        let public = u32::from(crate::topology::PUBLIC_NET.addr);
        assert!(reserved
            .iter()
            .any(|(n, l)| public >> (32 - u32::from(*l)) == n >> (32 - u32::from(*l))));
    }

    #[test]
    fn a_topology_file_gives_a_linux_router_miniupnpd_and_a_wan_address_it_accepts() {
        let src = "[[nat]]\nname = \"gw\"\nbehavior = \"linux\"\n\
                   port_mapping = [\"nat-pmp\", \"pcp\", \"upnp\"]\n\
                   [[nat]]\nname = \"plain\"\nbehavior = \"linux\"\n\
                   [[host]]\nname = \"h\"\nparent = \"gw\"\n";
        let plan = crate::config::from_toml(src, "t.toml")
            .expect("parses")
            .plan()
            .expect("plans");
        let node = |n: &str| plan.nodes.iter().find(|p| p.name == n).expect("node");
        let gw = node("gw");
        assert_eq!(gw.port_mapping.len(), 3);
        assert!(WAN_NET.contains(gw.uplink[0].addr), "{:?}", gw.uplink);
        let plain = node("plain");
        assert!(plain.port_mapping.is_empty());
        assert!(crate::topology::PUBLIC_NET.contains(plain.uplink[0].addr));
        let err = crate::config::from_toml(
            "[[nat]]\nname = \"gw\"\nbehavior = \"linux\"\nport_mapping = [\"upnpp\"]\n",
            "t.toml",
        )
        .expect_err("unknown service");
        assert!(err.to_string().starts_with("t.toml:4:"), "{err}");
    }

    #[test]
    fn uuid_is_well_formed_and_stable() {
        let u = uuid_for("upnp1", "gw");
        assert_eq!(u, uuid_for("upnp1", "gw"));
        assert_ne!(u, uuid_for("upnp1", "gw2"));
        let parts: Vec<usize> = u.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{u}");
    }
}
