//! One IPv4 datagram taken off the wire, checked once so that every later accessor and rewrite is
//! in bounds, and the checksum work a rewriting NAT needs: full recomputation for the packet it
//! forwards (RFC 768, RFC 793 pseudo-header; veth hands raw sockets CHECKSUM_PARTIAL packets whose
//! L4 checksum is only the pseudo-header sum, so an incoming value is never trusted), and the
//! incremental update of RFC 1624 for the truncated transport header quoted inside an ICMP error,
//! which cannot be recomputed from the 8 bytes RFC 792 guarantees.

use std::net::{Ipv4Addr, SocketAddrV4};

use pnet::packet::icmp::{self, IcmpPacket, IcmpTypes};
use pnet::packet::ip::{IpNextHeaderProtocol, IpNextHeaderProtocols};
use pnet::packet::ipv4::{self, Ipv4Flags, Ipv4Packet, MutableIpv4Packet};
use pnet::packet::tcp::{self, TcpFlags, TcpPacket};
use pnet::packet::udp::{self, MutableUdpPacket, UdpPacket};
use pnet::packet::Packet;

/// Why a datagram is not forwarded before any NAT decision is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    Malformed,
    Fragment,
}

/// The transport facts the NAT decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp {
        src: u16,
        dst: u16,
    },
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
        seq: u32,
        len: u32,
    },
    /// ICMP echo (RFC 792); the identifier stands in for a port on both sides.
    Echo {
        request: bool,
        id: u16,
    },
    /// Destination unreachable or time exceeded, quoting one of our flows.
    Error(Quoted),
    /// Other ICMP, or another IP protocol: not translated.
    Other,
}

/// The flow an ICMP error quotes: the offending packet's IP header plus its first 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Quoted {
    pub proto: IpNextHeaderProtocol,
    /// Ports, or the echo identifier twice for a quoted echo.
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// A checked IPv4 datagram (Ethernet padding stripped).
#[derive(Clone, Debug)]
pub(crate) struct Datagram {
    bytes: Vec<u8>,
    hl: usize,
}

/// Length of the ICMP header before the quoted datagram (RFC 792).
const ICMP_HEADER: usize = 8;

impl Datagram {
    /// Checks version, IHL and total length against the buffer; refuses fragments, which the NAT
    /// cannot translate without reassembly (only the first carries the ports).
    pub fn parse(payload: &[u8]) -> Result<Self, Reject> {
        let ip = Ipv4Packet::new(payload).ok_or(Reject::Malformed)?;
        let hl = usize::from(ip.get_header_length()) * 4;
        let total = usize::from(ip.get_total_length());
        if ip.get_version() != 4 || hl < 20 || total < hl || total > payload.len() {
            return Err(Reject::Malformed);
        }
        if ip.get_flags() & Ipv4Flags::MoreFragments != 0 || ip.get_fragment_offset() != 0 {
            return Err(Reject::Fragment);
        }
        Ok(Self {
            bytes: payload[..total].to_vec(),
            hl,
        })
    }

    /// The IP packet's length in bytes, header included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn ip(&self) -> Ipv4Packet<'_> {
        // Cannot fail: `parse` checked the length.
        Ipv4Packet::new(&self.bytes).unwrap_or_else(|| unreachable!())
    }

    fn ip_mut(&mut self) -> MutableIpv4Packet<'_> {
        MutableIpv4Packet::new(&mut self.bytes).unwrap_or_else(|| unreachable!())
    }

    pub fn src(&self) -> Ipv4Addr {
        self.ip().get_source()
    }

    pub fn dst(&self) -> Ipv4Addr {
        self.ip().get_destination()
    }

    pub fn ttl(&self) -> u8 {
        self.ip().get_ttl()
    }

    pub fn proto(&self) -> IpNextHeaderProtocol {
        self.ip().get_next_level_protocol()
    }

    fn l4(&self) -> &[u8] {
        &self.bytes[self.hl..]
    }

    fn l4_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.hl..]
    }

    /// A UDP datagram's payload (as long as the UDP length says), for the router's own services.
    pub fn udp_payload(&self) -> Option<&[u8]> {
        if self.proto() != IpNextHeaderProtocols::Udp {
            return None;
        }
        let u = UdpPacket::new(self.l4())?;
        let len = usize::from(u.get_length());
        self.l4().get(8..len)
    }

    /// The transport summary, or `Err(Malformed)` when the header is truncated.
    pub fn transport(&self) -> Result<Transport, Reject> {
        let l4 = self.l4();
        Ok(match self.proto() {
            IpNextHeaderProtocols::Udp => {
                let u = UdpPacket::new(l4).ok_or(Reject::Malformed)?;
                let len = usize::from(u.get_length());
                if len < 8 || len > l4.len() {
                    return Err(Reject::Malformed);
                }
                Transport::Udp {
                    src: u.get_source(),
                    dst: u.get_destination(),
                }
            }
            IpNextHeaderProtocols::Tcp => {
                let t = TcpPacket::new(l4).ok_or(Reject::Malformed)?;
                let off = usize::from(t.get_data_offset()) * 4;
                if off < 20 || off > l4.len() {
                    return Err(Reject::Malformed);
                }
                let flags = t.get_flags();
                let data = (l4.len() - off) as u32;
                let ctl =
                    u32::from(flags & TcpFlags::SYN != 0) + u32::from(flags & TcpFlags::FIN != 0);
                Transport::Tcp {
                    src: t.get_source(),
                    dst: t.get_destination(),
                    flags,
                    seq: t.get_sequence(),
                    len: data + ctl,
                }
            }
            IpNextHeaderProtocols::Icmp => {
                let i = IcmpPacket::new(l4).ok_or(Reject::Malformed)?;
                if l4.len() < ICMP_HEADER {
                    return Err(Reject::Malformed);
                }
                let id = u16::from_be_bytes([l4[4], l4[5]]);
                match i.get_icmp_type() {
                    IcmpTypes::EchoRequest => Transport::Echo { request: true, id },
                    IcmpTypes::EchoReply => Transport::Echo { request: false, id },
                    IcmpTypes::DestinationUnreachable | IcmpTypes::TimeExceeded => {
                        // Quoting something we never translate (or too little of it) is not an
                        // error in the packet, just not ours.
                        quoted(&l4[ICMP_HEADER..]).map_or(Transport::Other, Transport::Error)
                    }
                    _ => Transport::Other,
                }
            }
            _ => Transport::Other,
        })
    }

    pub fn set_src(&mut self, ip: Ipv4Addr) {
        self.ip_mut().set_source(ip);
    }

    pub fn set_dst(&mut self, ip: Ipv4Addr) {
        self.ip_mut().set_destination(ip);
    }

    pub fn decrement_ttl(&mut self) {
        let ttl = self.ttl().saturating_sub(1);
        self.ip_mut().set_ttl(ttl);
    }

    /// Rewrites the UDP/TCP source port or the echo identifier (`transport` was checked).
    pub fn set_src_port(&mut self, port: u16) {
        let at = match self.proto() {
            IpNextHeaderProtocols::Icmp => 4,
            _ => 0,
        };
        self.l4_mut()[at..at + 2].copy_from_slice(&port.to_be_bytes());
    }

    /// Rewrites the UDP/TCP destination port or the echo identifier.
    pub fn set_dst_port(&mut self, port: u16) {
        let at = match self.proto() {
            IpNextHeaderProtocols::Icmp => 4,
            _ => 2,
        };
        self.l4_mut()[at..at + 2].copy_from_slice(&port.to_be_bytes());
    }

    /// Rewrites the source (`src == true`) or destination of the flow quoted in an ICMP error,
    /// keeping its IP header checksum right and its transport checksum right where it is quoted.
    pub fn set_quoted(&mut self, src: bool, to: SocketAddrV4) {
        let Some(q) = self.l4_mut().get_mut(ICMP_HEADER..) else {
            return;
        };
        rewrite_quoted(q, src, to);
    }

    /// Recomputes the transport checksum over the whole segment (pseudo-header included), then the
    /// IPv4 header checksum. A UDP checksum of 0 means "none" (RFC 768) and stays 0; a computed 0
    /// is sent as 0xffff.
    pub fn finish(&mut self) {
        let (src, dst) = (self.src(), self.dst());
        match self.proto() {
            IpNextHeaderProtocols::Udp => {
                let l4 = self.l4_mut();
                if let Some(mut u) = MutableUdpPacket::new(l4) {
                    let len = usize::from(u.get_length()).min(u.packet().len());
                    if u.get_checksum() != 0 {
                        let sum = UdpPacket::new(&u.packet()[..len])
                            .map(|p| udp::ipv4_checksum(&p, &src, &dst))
                            .unwrap_or(0);
                        u.set_checksum(if sum == 0 { 0xffff } else { sum });
                    }
                }
            }
            IpNextHeaderProtocols::Tcp => {
                let sum = TcpPacket::new(self.l4()).map(|p| tcp::ipv4_checksum(&p, &src, &dst));
                if let (Some(sum), Some(b)) = (sum, self.l4_mut().get_mut(16..18)) {
                    b.copy_from_slice(&sum.to_be_bytes());
                }
            }
            IpNextHeaderProtocols::Icmp => {
                let sum = IcmpPacket::new(self.l4()).map(|p| icmp::checksum(&p));
                if let (Some(sum), Some(b)) = (sum, self.l4_mut().get_mut(2..4)) {
                    b.copy_from_slice(&sum.to_be_bytes());
                }
            }
            _ => {}
        }
        let sum = ipv4::checksum(&self.ip());
        self.ip_mut().set_checksum(sum);
    }
}

/// Parses the quoted datagram of an ICMP error: a full IP header and at least 8 bytes of UDP, TCP
/// or ICMP echo (RFC 792). Anything else is not ours to translate.
fn quoted(q: &[u8]) -> Option<Quoted> {
    let ip = Ipv4Packet::new(q)?;
    let hl = usize::from(ip.get_header_length()) * 4;
    if ip.get_version() != 4 || hl < 20 || q.len() < hl + 8 {
        return None;
    }
    let t = &q[hl..];
    let word = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
    let proto = ip.get_next_level_protocol();
    let (sp, dp) = match proto {
        IpNextHeaderProtocols::Udp | IpNextHeaderProtocols::Tcp => (word(0), word(2)),
        IpNextHeaderProtocols::Icmp
            if t[0] == IcmpTypes::EchoRequest.0 || t[0] == IcmpTypes::EchoReply.0 =>
        {
            (word(4), word(4))
        }
        _ => return None,
    };
    Some(Quoted {
        proto,
        src: SocketAddrV4::new(ip.get_source(), sp),
        dst: SocketAddrV4::new(ip.get_destination(), dp),
    })
}

fn rewrite_quoted(q: &mut [u8], src: bool, to: SocketAddrV4) {
    let Some(hl) = q.first().map(|b| usize::from(b & 0x0f) * 4) else {
        return;
    };
    if hl < 20 || q.len() < hl + 8 {
        return;
    }
    let proto = q[9];
    let ip_at = if src { 12 } else { 16 };
    let old_ip: [u8; 4] = [q[ip_at], q[ip_at + 1], q[ip_at + 2], q[ip_at + 3]];
    q[ip_at..ip_at + 4].copy_from_slice(&to.ip().octets());
    let (header, t) = q.split_at_mut(hl);
    if let Some(mut ip) = MutableIpv4Packet::new(header) {
        let sum = ipv4::checksum(&ip.to_immutable());
        ip.set_checksum(sum);
    }
    let new_port = to.port().to_be_bytes();
    if proto == IpNextHeaderProtocols::Icmp.0 {
        // The echo checksum has no pseudo-header: only the identifier change counts.
        let old = [t[4], t[5]];
        t[4..6].copy_from_slice(&new_port);
        let sum = adjust(u16::from_be_bytes([t[2], t[3]]), &old, &new_port);
        t[2..4].copy_from_slice(&sum.to_be_bytes());
        return;
    }
    let port_at = if src { 0 } else { 2 };
    let old_port = [t[port_at], t[port_at + 1]];
    t[port_at..port_at + 2].copy_from_slice(&new_port);
    // UDP's checksum is within the quoted 8 bytes (TCP's is not, so there is nothing to fix);
    // the IP address is part of its pseudo-header.
    if proto == IpNextHeaderProtocols::Udp.0 {
        let old = u16::from_be_bytes([t[6], t[7]]);
        if old != 0 {
            let sum = adjust(old, &old_ip, &to.ip().octets());
            let sum = adjust(sum, &old_port, &new_port);
            t[6..8].copy_from_slice(&sum.to_be_bytes());
        }
    }
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), over 16-bit words of the replaced bytes (even length).
pub(crate) fn adjust(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!checksum);
    for w in old.chunks_exact(2) {
        sum += u32::from(!u16::from_be_bytes([w[0], w[1]]));
    }
    for w in new.chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP RST|ACK answering `syn` (RFC 793 reset generation for a segment without ACK:
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`), from the SYN's destination to its source.
pub(crate) fn tcp_reset(from: SocketAddrV4, to: SocketAddrV4, ack: u32) -> Datagram {
    let mut bytes = vec![0u8; 40];
    if let Some(mut ip) = MutableIpv4Packet::new(&mut bytes) {
        ip.set_version(4);
        ip.set_header_length(5);
        ip.set_total_length(40);
        ip.set_ttl(64);
        ip.set_flags(Ipv4Flags::DontFragment);
        ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
        ip.set_source(*from.ip());
        ip.set_destination(*to.ip());
    }
    if let Some(mut t) = tcp::MutableTcpPacket::new(&mut bytes[20..]) {
        t.set_source(from.port());
        t.set_destination(to.port());
        t.set_acknowledgement(ack);
        t.set_data_offset(5);
        t.set_flags(TcpFlags::RST | TcpFlags::ACK);
    }
    let mut d = Datagram { bytes, hl: 20 };
    d.finish();
    d
}
