//! IPv6 packets for the engine (RFC 8200): a parsed, owned packet whose upper-layer header has
//! been found past any extension headers, with the rewrites a router, a firewall, NPTv6 and NAT66
//! need, and the RFC 6296 checksum-neutral prefix mapping.
//!
//! Hand-written like the IPv4 `packet` module: the engine needs to walk extension headers, rewrite
//! addresses inside quoted ICMPv6 payloads and recompute checksums over a pseudo-header, and
//! pnet's IPv6 views cover none of that; the byte offsets are RFC 8200's and RFC 4443's.
//!
//! Extension headers: hop-by-hop options, destination options and routing headers with no
//! segments left are skipped; a routing header with segments left (its final destination is not
//! the header's, so a translated checksum would be wrong) and fragments (only the first carries
//! the ports) are refused, as is anything after more than [`MAX_EXTENSIONS`] headers.

use std::net::{Ipv6Addr, SocketAddrV6};

use super::packet::Reject;

pub(crate) const HEADER: usize = 40;
/// Extension headers walked before a packet is refused.
pub(crate) const MAX_EXTENSIONS: usize = 8;
/// RFC 8200 §5: the minimum MTU; an ICMPv6 error quotes as much of the packet as fits in it.
pub(crate) const MIN_MTU: usize = 1280;

pub(crate) const UDP: u8 = 17;
pub(crate) const TCP: u8 = 6;
pub(crate) const ICMPV6: u8 = 58;
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTIONS: u8 = 60;

pub(crate) const ECHO_REQUEST: u8 = 128;
pub(crate) const ECHO_REPLY: u8 = 129;
pub(crate) const NEIGHBOR_SOLICIT: u8 = 135;
pub(crate) const NEIGHBOR_ADVERT: u8 = 136;
pub(crate) const DEST_UNREACHABLE: u8 = 1;
/// Destination unreachable, code 1: communication administratively prohibited (RFC 4443 §3.1).
pub(crate) const ADMIN_PROHIBITED: u8 = 1;

/// What a packet carries, as far as the router cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Upper {
    Udp {
        src: u16,
        dst: u16,
    },
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
    },
    Echo {
        request: bool,
        id: u16,
    },
    /// An ICMPv6 error (types 1-4) quoting a packet the router may have translated.
    Error(Quoted6),
    /// Neighbor discovery and other ICMPv6 the router does not forward.
    Icmp {
        kind: u8,
    },
    Other(u8),
}

/// The packet an ICMPv6 error quotes: its addresses and, for UDP/TCP/echo, ports (echo: the id
/// on both sides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Quoted6 {
    pub proto: u8,
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
}

/// An IPv6 packet with its upper-layer header located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Packet6 {
    bytes: Vec<u8>,
    /// Offset of the upper-layer header.
    l4: usize,
    proto: u8,
}

fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Walks the extension headers of the IPv6 packet `b` (already length-checked): the upper-layer
/// protocol and its offset.
fn upper_layer(b: &[u8]) -> Result<(u8, usize), Reject> {
    let mut next = b[6];
    let mut at = HEADER;
    for _ in 0..=MAX_EXTENSIONS {
        match next {
            HOP_BY_HOP | DEST_OPTIONS | ROUTING => {
                if at + 8 > b.len() {
                    return Err(Reject::Malformed);
                }
                if next == ROUTING && b[at + 3] != 0 {
                    return Err(Reject::Malformed);
                }
                let len = (usize::from(b[at + 1]) + 1) * 8;
                next = b[at];
                at += len;
                if at > b.len() {
                    return Err(Reject::Malformed);
                }
            }
            FRAGMENT => return Err(Reject::Fragment),
            _ => return Ok((next, at)),
        }
    }
    Err(Reject::Malformed)
}

impl Packet6 {
    /// Checks version and payload length against the buffer (trailing Ethernet padding is cut),
    /// and finds the upper-layer header.
    pub fn parse(payload: &[u8]) -> Result<Self, Reject> {
        if payload.len() < HEADER || payload[0] >> 4 != 6 {
            return Err(Reject::Malformed);
        }
        // A jumbogram (payload length 0, RFC 2675) cannot fit a lab link anyway.
        let total = HEADER + usize::from(u16_at(payload, 4));
        if total > payload.len() {
            return Err(Reject::Malformed);
        }
        let bytes = payload[..total].to_vec();
        let (proto, l4) = upper_layer(&bytes)?;
        Ok(Self { bytes, l4, proto })
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn src(&self) -> Ipv6Addr {
        addr_at(&self.bytes, 8)
    }
    pub fn dst(&self) -> Ipv6Addr {
        addr_at(&self.bytes, 24)
    }
    pub fn hop_limit(&self) -> u8 {
        self.bytes[7]
    }
    pub fn set_src(&mut self, ip: Ipv6Addr) {
        self.bytes[8..24].copy_from_slice(&ip.octets());
    }
    pub fn set_dst(&mut self, ip: Ipv6Addr) {
        self.bytes[24..40].copy_from_slice(&ip.octets());
    }
    pub fn decrement_hop_limit(&mut self) {
        self.bytes[7] = self.bytes[7].saturating_sub(1);
    }
    fn l4(&self) -> &[u8] {
        &self.bytes[self.l4..]
    }

    /// The upper-layer summary, or `Err(Malformed)` when its header is truncated.
    pub fn upper(&self) -> Result<Upper, Reject> {
        let l4 = self.l4();
        let need = |n: usize| {
            if l4.len() < n {
                Err(Reject::Malformed)
            } else {
                Ok(())
            }
        };
        Ok(match self.proto {
            UDP => {
                need(8)?;
                Upper::Udp {
                    src: u16_at(l4, 0),
                    dst: u16_at(l4, 2),
                }
            }
            TCP => {
                need(20)?;
                Upper::Tcp {
                    src: u16_at(l4, 0),
                    dst: u16_at(l4, 2),
                    flags: l4[13],
                }
            }
            ICMPV6 => {
                need(8)?;
                match l4[0] {
                    ECHO_REQUEST | ECHO_REPLY => Upper::Echo {
                        request: l4[0] == ECHO_REQUEST,
                        id: u16_at(l4, 4),
                    },
                    1..=4 => Upper::Error(quoted(&l4[8..]).ok_or(Reject::Malformed)?),
                    kind => Upper::Icmp { kind },
                }
            }
            other => Upper::Other(other),
        })
    }

    /// The upper-layer payload (for NDP: the message after the ICMPv6 type, code and checksum).
    pub fn icmp_body(&self) -> &[u8] {
        self.l4().get(4..).unwrap_or(&[])
    }

    pub fn set_src_port(&mut self, port: u16) {
        self.set_port(true, port);
    }
    pub fn set_dst_port(&mut self, port: u16) {
        self.set_port(false, port);
    }

    /// UDP/TCP: the port; echo: the identifier (which stands for both).
    fn set_port(&mut self, src: bool, port: u16) {
        let at = self.l4;
        match self.proto {
            UDP | TCP if self.bytes.len() >= at + 4 => {
                let o = if src { at } else { at + 2 };
                self.bytes[o..o + 2].copy_from_slice(&port.to_be_bytes());
            }
            ICMPV6 if self.bytes.len() >= at + 8 => {
                self.bytes[at + 4..at + 6].copy_from_slice(&port.to_be_bytes());
            }
            _ => {}
        }
    }

    /// Rewrites the quoted packet of an ICMPv6 error: its source (`src`) or destination.
    pub fn set_quoted(&mut self, src: bool, to: SocketAddrV6) {
        let q = self.l4 + 8;
        if self.proto != ICMPV6 || self.bytes.len() < q + HEADER {
            return;
        }
        let (a, p) = if src { (8, 0) } else { (24, 2) };
        self.bytes[q + a..q + a + 16].copy_from_slice(&to.ip().octets());
        let qp = q + HEADER;
        match self.bytes[q + 6] {
            UDP | TCP if self.bytes.len() >= qp + 4 => {
                self.bytes[qp + p..qp + p + 2].copy_from_slice(&to.port().to_be_bytes());
            }
            ICMPV6 if self.bytes.len() >= qp + 8 => {
                self.bytes[qp + 4..qp + 6].copy_from_slice(&to.port().to_be_bytes());
            }
            _ => {}
        }
    }

    /// Recomputes the upper-layer checksum over the pseudo-header (RFC 8200 §8.1). Every
    /// checksum is recomputed, not adjusted: veth hands packet sockets partial checksums.
    pub fn finish(&mut self) {
        let at = self.l4;
        let field = match self.proto {
            UDP => 6,
            TCP => 16,
            ICMPV6 => 2,
            _ => return,
        };
        if self.bytes.len() < at + field + 2 {
            return;
        }
        self.bytes[at + field..at + field + 2].copy_from_slice(&[0, 0]);
        let sum = checksum(self.src(), self.dst(), self.proto, &self.bytes[at..]);
        // UDP over IPv6 never carries a zero checksum (RFC 8200 §8.1): 0 is sent as 0xffff.
        let sum = if sum == 0 && self.proto == UDP {
            0xffff
        } else {
            sum
        };
        self.bytes[at + field..at + field + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

/// The quoted packet of an ICMPv6 error body (after the 8-byte ICMPv6 header). Quoted extension
/// headers are not walked: a quote of such a packet is reported as a protocol nobody translates.
fn quoted(q: &[u8]) -> Option<Quoted6> {
    if q.len() < HEADER + 4 || q[0] >> 4 != 6 {
        return None;
    }
    let proto = q[6];
    let (sp, dp) = match proto {
        UDP | TCP => (u16_at(q, HEADER), u16_at(q, HEADER + 2)),
        ICMPV6 if q.len() >= HEADER + 8 => {
            let id = u16_at(q, HEADER + 4);
            (id, id)
        }
        _ => (0, 0),
    };
    Some(Quoted6 {
        proto,
        src: SocketAddrV6::new(addr_at(q, 8), sp, 0, 0),
        dst: SocketAddrV6::new(addr_at(q, 24), dp, 0, 0),
    })
}

/// One's-complement sum of 16-bit words (odd tail padded), not yet folded or inverted.
fn sum_words(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of an upper-layer packet with the IPv6 pseudo-header.
pub(crate) fn checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    let len = l4.len() as u32;
    let sum = sum_words(&src.octets())
        + sum_words(&dst.octets())
        + (len >> 16)
        + (len & 0xffff)
        + u32::from(proto)
        + sum_words(l4);
    !fold(sum)
}

/// The one's-complement sum of an address's eight 16-bit words (RFC 6296 §3.1 works in it).
pub(crate) fn address_sum(ip: Ipv6Addr) -> u16 {
    fold(sum_words(&ip.octets()))
}

fn ones_add(a: u16, b: u16) -> u16 {
    fold(u32::from(a) + u32::from(b))
}

/// RFC 6296 NPTv6 between two prefixes of the same length `len` (at most 48, so the adjustment
/// fits in the 16-bit word after the prefix, bits 48-63, the subnet ID: RFC 6296 §3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Nptv6 {
    internal: Ipv6Addr,
    external: Ipv6Addr,
    len: u8,
    /// Added to word 3 going out, subtracted coming in (one's complement).
    adjustment: u16,
}

impl Nptv6 {
    /// `None` for prefixes longer than /48 (the adjustment would have to go into the interface
    /// identifier, RFC 6296 §3.5, which this lab never needs).
    pub fn new(internal: Ipv6Addr, external: Ipv6Addr, len: u8) -> Option<Self> {
        if len > 48 {
            return None;
        }
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        };
        let internal = Ipv6Addr::from(u128::from(internal) & mask);
        let external = Ipv6Addr::from(u128::from(external) & mask);
        // RFC 6296 §3.1: adjustment = sum(internal prefix) - sum(external prefix).
        let adjustment = ones_add(address_sum(internal), !address_sum(external));
        Some(Self {
            internal,
            external,
            len,
            adjustment,
        })
    }

    fn mask(self) -> u128 {
        if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        }
    }

    pub fn is_external(self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & self.mask() == u128::from(self.external)
    }

    /// Outbound: the internal prefix replaced by the external one, word 3 adjusted so the
    /// address's one's-complement sum is unchanged. `None` for an address whose word 3 would
    /// come out as 0xFFFF (RFC 6296 §3.4 says such packets are dropped).
    pub fn to_external(self, ip: Ipv6Addr) -> Option<Ipv6Addr> {
        self.map(ip, self.external, self.adjustment)
    }

    /// Inbound: the reverse mapping.
    pub fn to_internal(self, ip: Ipv6Addr) -> Option<Ipv6Addr> {
        self.map(ip, self.internal, !self.adjustment)
    }

    fn map(self, ip: Ipv6Addr, prefix: Ipv6Addr, adjustment: u16) -> Option<Ipv6Addr> {
        let host = u128::from(ip) & !self.mask();
        let mut w = Ipv6Addr::from(u128::from(prefix) | host).segments();
        // A word of 0xFFFF is the one's-complement "-0" and cannot be produced (§3.4).
        if w[3] == 0xffff {
            return None;
        }
        let mut x = ones_add(w[3], adjustment);
        if x == 0xffff {
            x = 0;
        }
        w[3] = x;
        Some(Ipv6Addr::from(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().expect("test address")
    }

    /// A UDP packet 2001:db8:101::2:5000 -> 2001:db8:0:1::1:3478 with payload "hi".
    fn udp() -> Vec<u8> {
        let mut b = vec![0u8; 40 + 10];
        b[0] = 0x60;
        b[4..6].copy_from_slice(&10u16.to_be_bytes());
        b[6] = UDP;
        b[7] = 64;
        b[8..24].copy_from_slice(&ip("2001:db8:101::2").octets());
        b[24..40].copy_from_slice(&ip("2001:db8:0:1::1").octets());
        b[40..42].copy_from_slice(&5000u16.to_be_bytes());
        b[42..44].copy_from_slice(&3478u16.to_be_bytes());
        b[44..46].copy_from_slice(&10u16.to_be_bytes());
        b[48..50].copy_from_slice(b"hi");
        b
    }

    #[test]
    fn parses_udp_and_computes_a_checksum_that_verifies() {
        let mut p = Packet6::parse(&udp()).expect("valid");
        assert_eq!(
            p.upper(),
            Ok(Upper::Udp {
                src: 5000,
                dst: 3478
            })
        );
        p.finish();
        let b = p.bytes();
        // A correct checksum makes the sum over pseudo-header and packet fold to 0xffff.
        assert_eq!(checksum(p.src(), p.dst(), UDP, &b[40..]), 0);
    }

    #[test]
    fn skips_options_and_refuses_fragments_and_source_routes() {
        let mut b = udp();
        // Insert an 8-byte hop-by-hop header (next header UDP).
        b[6] = 0;
        b.splice(40..40, [UDP, 0, 1, 4, 0, 0, 0, 0]);
        b[4..6].copy_from_slice(&18u16.to_be_bytes());
        let p = Packet6::parse(&b).expect("hop-by-hop is skipped");
        assert_eq!(
            p.upper(),
            Ok(Upper::Udp {
                src: 5000,
                dst: 3478
            })
        );

        let mut frag = b.clone();
        frag[6] = FRAGMENT;
        assert_eq!(Packet6::parse(&frag), Err(Reject::Fragment));

        let mut routed = b.clone();
        routed[6] = ROUTING;
        routed[43] = 1; // segments left
        assert_eq!(Packet6::parse(&routed), Err(Reject::Malformed));

        // A header running past the end, truncations, and a wrong version.
        let mut long = b.clone();
        long[41] = 200;
        assert_eq!(Packet6::parse(&long), Err(Reject::Malformed));
        for cut in [0, 39, 45] {
            assert!(Packet6::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut v4 = b;
        v4[0] = 0x45;
        assert_eq!(Packet6::parse(&v4), Err(Reject::Malformed));
    }

    #[test]
    fn a_chain_of_too_many_extension_headers_is_refused() {
        let mut b = udp();
        b[6] = DEST_OPTIONS;
        let mut ext = Vec::new();
        for i in 0..=MAX_EXTENSIONS {
            let next = if i == MAX_EXTENSIONS {
                UDP
            } else {
                DEST_OPTIONS
            };
            ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        b.splice(40..40, ext.iter().copied());
        let len = (b.len() - 40) as u16;
        b[4..6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(Packet6::parse(&b), Err(Reject::Malformed));
    }

    /// RFC 6296 §3.1: the translated address's one's-complement sum equals the original's, in
    /// both directions, and the mapping is 1:1 (the inverse gives the original back).
    #[test]
    fn nptv6_is_checksum_neutral_and_reversible() {
        let n = Nptv6::new(ip("fd00:1::"), ip("2001:db8:101::"), 48).expect("a /48");
        for inside in [
            "fd00:1::2",
            "fd00:1::3",
            "fd00:1:0:0:dead:beef:1:2",
            "fd00:1:0:7:1:2:3:4",
            "fd00:1:0:abcd::ffff",
        ] {
            let a = ip(inside);
            let x = n.to_external(a).expect("mappable");
            assert!(n.is_external(x), "{x}");
            assert_eq!(address_sum(x), address_sum(a), "{inside} -> {x}");
            // Only the prefix and the subnet word change: the interface identifier is kept.
            assert_eq!(a.segments()[4..], x.segments()[4..]);
            assert_eq!(n.to_internal(x), Some(a), "{x} back");
        }
        // A datagram's checksum is unchanged by the mapping: neutral, as the RFC promises.
        let mut p = Packet6::parse(&udp()).expect("valid");
        p.set_src(ip("fd00:1::2"));
        p.finish();
        let before = u16_at(p.bytes(), 46);
        let x = n.to_external(p.src()).expect("mappable");
        p.set_src(x);
        p.finish();
        assert_eq!(u16_at(p.bytes(), 46), before);
        // Word 3 = 0xffff cannot be translated (§3.4); prefixes past /48 are refused.
        let bad = ip("fd00:1:0:ffff::1");
        assert_eq!(n.to_external(bad), None);
        assert_eq!(Nptv6::new(ip("fd00:1::"), ip("2001:db8:101::"), 64), None);
    }
}
