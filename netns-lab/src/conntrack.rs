//! `lab nat-table` for a `linux` router: the kernel's connection tracking table read as NAT
//! mappings, and miniupnpd's lease file read as the mappings its clients requested.
//!
//! A userspace router answers `nat-table` from its own table; a kernel router's state is in
//! conntrack, which `/proc/net/nf_conntrack` lists per network namespace (read from a thread in
//! the router's namespace: `/proc/thread-self/net/`). Reading that text needs no netlink library
//! and no `conntrack` tool; its format has been stable for over a decade (`l3 l3num l4 l4num
//! timeout [state] src= dst= sport= dport= [flags] src= dst= sport= dport= …`). miniupnpd writes
//! one line per mapping to its lease file (`PROTO:eport:iaddr:iport:expiry:description`); the
//! description says which protocol asked (`NAT-PMP …`, `PCP …`, anything else came over UPnP).
//! Both parsers are pure functions of text, unit-tested on lines taken from a lab.

use std::net::{IpAddr, SocketAddr};

use natscope_core::nat::Protocol;
use natscope_core::portmap::PortMappingService;

use crate::engine::MappingRow;

/// One side of a conntrack entry: the tuple as the packet had it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    src: SocketAddr,
    dst: SocketAddr,
}

/// One `/proc/net/nf_conntrack` line of UDP or TCP: original and reply tuples, seconds left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    proto: Protocol,
    timeout_s: u64,
    orig: Tuple,
    reply: Tuple,
}

fn parse_entry(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let proto = match *f.get(2)? {
        "udp" => Protocol::Udp,
        "tcp" => Protocol::Tcp,
        _ => return None,
    };
    let timeout_s = f.get(4)?.parse().ok()?;
    let value = |key: &str, nth: usize| {
        f.iter()
            .filter_map(|t| t.strip_prefix(key)?.strip_prefix('='))
            .nth(nth)
    };
    let tuple = |nth| {
        let ip = |k| value(k, nth)?.parse::<IpAddr>().ok();
        let port = |k| value(k, nth)?.parse::<u16>().ok();
        Some(Tuple {
            src: SocketAddr::new(ip("src")?, port("sport")?),
            dst: SocketAddr::new(ip("dst")?, port("dport")?),
        })
    };
    Some(Entry {
        proto,
        timeout_s,
        orig: tuple(0)?,
        reply: tuple(1)?,
    })
}

/// A mapping miniupnpd granted, from its lease file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub proto: Protocol,
    pub external_port: u16,
    pub internal: SocketAddr,
    /// Unix time the lease ends; `None`: no end (a UPnP lease of duration 0).
    pub expires_unix: Option<u64>,
    pub requested_by: PortMappingService,
}

/// miniupnpd's lease file; lines it would not write itself are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, ':');
            let proto = match f.next()? {
                "UDP" => Protocol::Udp,
                "TCP" => Protocol::Tcp,
                _ => return None,
            };
            let external_port = f.next()?.parse().ok()?;
            let ip: IpAddr = f.next()?.parse().ok()?;
            let internal = SocketAddr::new(ip, f.next()?.parse().ok()?);
            let expiry: u64 = f.next()?.parse().ok()?;
            let desc = f.next().unwrap_or("");
            let requested_by = if desc.starts_with("NAT-PMP") {
                PortMappingService::NatPmp
            } else if desc.starts_with("PCP") {
                PortMappingService::Pcp
            } else {
                PortMappingService::Upnp
            };
            Some(Lease {
                proto,
                external_port,
                internal,
                expires_unix: (expiry > 0).then_some(expiry),
                requested_by,
            })
        })
        .collect()
}

/// What the router is, for telling its own traffic from what it forwards and translates.
pub struct RouterView<'a> {
    /// Addresses the router holds itself (its WAN and LAN addresses, both families).
    pub own: &'a [IpAddr],
    /// Its first external address: where a lease's external port lives.
    pub external: IpAddr,
    /// Whether an address is on the router's LAN side.
    pub inside: &'a dyn Fn(IpAddr) -> bool,
}

/// The mappings of a kernel router: every translated connection (masquerade: the inside
/// endpoint and the address and port it left with; a DNAT through a port mapping: the external
/// port and the host it leads to, marked with the protocol that asked for it), every pinhole its
/// firewall holds for an untranslated inside endpoint (IPv6), and the leases no packet has used
/// yet. The kernel's filter admits only the remote of each connection (address and port
/// dependent), a requested mapping admits anyone. `now_unix` dates the leases.
pub fn mappings(
    conntrack: &str,
    leases: &[Lease],
    router: &RouterView<'_>,
    now_unix: u64,
) -> Vec<MappingRow> {
    let lease_of = |proto, ext: SocketAddr| {
        leases.iter().find(|l| {
            l.proto == proto && l.external_port == ext.port() && ext.ip() == router.external
        })
    };
    let lease_ms = |l: &Lease| {
        l.expires_unix.map_or(u64::MAX, |t| {
            t.saturating_sub(now_unix).saturating_mul(1000)
        })
    };
    let mut rows = Vec::new();
    for e in conntrack.lines().filter_map(parse_entry) {
        let (o, r) = (e.orig, e.reply);
        if o.dst.ip().is_multicast() {
            continue;
        }
        let expires_in_ms = e.timeout_s.saturating_mul(1000);
        let row = if r.src != o.dst {
            // Destination NAT: a request came in to the external port and leads to r.src.
            let lease = lease_of(e.proto, o.dst);
            MappingRow {
                proto: e.proto,
                internal: r.src,
                external: o.dst,
                expires_in_ms: lease.map_or(expires_in_ms, lease_ms),
                admits: vec![if lease.is_some() {
                    "*:*".to_string()
                } else {
                    o.src.to_string()
                }],
                requested_by: lease.map(|l| l.requested_by),
            }
        } else if r.dst != o.src {
            // Source NAT (masquerade): the inside endpoint left as r.dst.
            MappingRow {
                proto: e.proto,
                internal: o.src,
                external: r.dst,
                expires_in_ms,
                admits: vec![o.dst.to_string()],
                requested_by: None,
            }
        } else if (router.inside)(o.src.ip())
            && !router.own.contains(&o.src.ip())
            && !router.own.contains(&o.dst.ip())
        {
            // Forwarded untranslated: a firewall pinhole for the inside endpoint.
            MappingRow {
                proto: e.proto,
                internal: o.src,
                external: o.src,
                expires_in_ms,
                admits: vec![o.dst.to_string()],
                requested_by: None,
            }
        } else {
            continue;
        };
        rows.push(row);
    }
    for l in leases {
        let external = SocketAddr::new(router.external, l.external_port);
        let used = rows
            .iter()
            .any(|r| r.proto == l.proto && r.external == external && r.requested_by.is_some());
        if !used {
            rows.push(MappingRow {
                proto: l.proto,
                internal: l.internal,
                external,
                expires_in_ms: lease_ms(l),
                admits: vec!["*:*".to_string()],
                requested_by: Some(l.requested_by),
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines read in a lab (`linux` router with miniupnpd; h1 = 10.1.0.2 behind 203.0.114.1).
    const CONNTRACK: &str = "\
ipv4     2 udp      17 29 src=10.1.0.2 dst=198.51.100.1 sport=43000 dport=3478 [UNREPLIED] src=198.51.100.1 dst=203.0.114.1 sport=3478 dport=43000 mark=0 zone=0 use=2
ipv4     2 tcp      6 112 TIME_WAIT src=10.1.0.2 dst=10.1.0.1 sport=39704 dport=5000 src=10.1.0.1 dst=10.1.0.2 sport=5000 dport=39704 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=10.1.0.2 dst=239.255.255.250 sport=35927 dport=1900 [UNREPLIED] src=239.255.255.250 dst=10.1.0.2 sport=1900 dport=35927 mark=0 zone=0 use=2
ipv4     2 unknown  2 569 src=10.1.0.1 dst=224.0.0.22 [UNREPLIED] src=224.0.0.22 dst=10.1.0.1 mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=198.51.100.2 dst=203.0.114.1 sport=5555 dport=42000 [UNREPLIED] src=10.1.0.2 dst=198.51.100.2 sport=42000 dport=5555 mark=0 zone=0 use=2
ipv6     10 udp      17 29 src=2001:0db8:0101:0000:0000:0000:0000:0003 dst=2001:0db8:0000:0001:0000:0000:0000:0001 sport=56964 dport=3478 [UNREPLIED] src=2001:0db8:0000:0001:0000:0000:0000:0001 dst=2001:0db8:0101:0000:0000:0000:0000:0003 sport=3478 dport=56964 mark=0 zone=0 use=2
garbage line
ipv4 2 udp 17 x src=1.2.3.4
";
    const LEASES: &str = "\
UDP:40000:10.1.0.2:40000:1796381051:NAT-PMP 40000 udp
UDP:41000:10.1.0.2:41000:1796985571:libminiupnpc
UDP:42000:10.1.0.2:42000:1796380898:PCP MAP b24e1d3f730ea81ebe2c58e7
TCP:5:not-an-ip:1:0:x
";
    const NOW: u64 = 1_796_380_800;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn rows() -> Vec<MappingRow> {
        let own: Vec<IpAddr> = ["203.0.114.1", "10.1.0.1", "2001:db8:101::1"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let inside = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.octets()[..3] == [10, 1, 0],
            IpAddr::V6(v6) => v6.segments()[..3] == [0x2001, 0xdb8, 0x101],
        };
        let view = RouterView {
            own: &own,
            external: own[0],
            inside: &inside,
        };
        mappings(CONNTRACK, &parse_leases(LEASES), &view, NOW)
    }

    #[test]
    fn leases_say_which_protocol_asked() {
        let l = parse_leases(LEASES);
        let by: Vec<_> = l
            .iter()
            .map(|l| (l.external_port, l.requested_by))
            .collect();
        assert_eq!(
            by,
            [
                (40000, PortMappingService::NatPmp),
                (41000, PortMappingService::Upnp),
                (42000, PortMappingService::Pcp)
            ]
        );
        assert_eq!(l[0].internal, sa("10.1.0.2:40000"));
        assert_eq!(l[0].expires_unix, Some(1_796_381_051));
    }

    #[test]
    fn conntrack_reads_as_mappings_with_the_requested_ones_marked() {
        let rows = rows();
        let find = |ext: &str| {
            rows.iter()
                .find(|r| r.external == sa(ext))
                .unwrap_or_else(|| panic!("no row for {ext}: {rows:#?}"))
        };
        // Masquerade: the inside endpoint, the port it left with, only its remote admitted.
        let m = find("203.0.114.1:43000");
        assert_eq!(
            (m.internal, m.expires_in_ms, m.requested_by),
            (sa("10.1.0.2:43000"), 29_000, None)
        );
        assert_eq!(m.admits, ["198.51.100.1:3478"]);
        // Inbound through the PCP mapping: the lease's protocol and lifetime, anyone admitted.
        let p = find("203.0.114.1:42000");
        assert_eq!(
            (p.internal, p.requested_by, p.expires_in_ms),
            (sa("10.1.0.2:42000"), Some(PortMappingService::Pcp), 98_000)
        );
        assert_eq!(p.admits, ["*:*"]);
        // Leases no packet used yet are rows too.
        let n = find("203.0.114.1:40000");
        assert_eq!(n.requested_by, Some(PortMappingService::NatPmp));
        assert_eq!(n.expires_in_ms, 251_000);
        assert_eq!(
            find("203.0.114.1:41000").requested_by,
            Some(PortMappingService::Upnp)
        );
        // IPv6 forwarded untranslated: the firewall's pinhole.
        let v6 = find("[2001:db8:101::3]:56964");
        assert_eq!(v6.internal, v6.external);
        assert_eq!(v6.admits, ["[2001:db8:0:1::1]:3478"]);
        // The router's own traffic (HTTP to miniupnpd), multicast, other protocols, garbage:
        // none of them is a mapping.
        assert_eq!(rows.len(), 5, "{rows:#?}");
    }
}
