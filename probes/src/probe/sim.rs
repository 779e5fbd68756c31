//! The test network: a deterministic, in-memory simulation of a client host behind an RFC 4787 NAT
//! (or a stateful firewall, or nothing, or a path that drops all UDP), a lossy internet, and an
//! RFC 5780 reflector — all on a virtual clock, so tests never sleep and every run with the same
//! seed makes the same choices.
//!
//! The NAT is [`NatTable`] and the firewall is [`Firewall`], the very models the lab's packet-level
//! engine uses, so the behavior the probe is tested against and the behavior the lab emulates are
//! one piece of code (DESIGN.md,
//! "probes: sans-IO at the core"). The server is the reflector's sans-IO core. Around them this
//! module adds only what a wire would: delay, seeded jitter and loss, routing by address, and a
//! few deliberate faults seen in the field — a NAT that re-maps a port after unsolicited inbound
//! (Linux conntrack), a payload-rewriting ALG, and misconfigured servers ([`ServerMode`]).
//!
//! Topology (documentation address ranges only; nothing here touches a socket):
//! - client: [`PRIVATE_IP`] behind a NAT whose external address is [`NAT_EXTERNAL_IP`] (and the
//!   addresses after it, [`SimConfig::nat_external_ips`]), or [`PUBLIC_CLIENT_IP`] with no NAT;
//! - server: [`SERVER_PRIMARY`] (A1:P1) and [`SERVER_ALTERNATE`] (A2:P2), listening on
//!   {A1, A2} × {P1, P2}.
//!
//! A hairpinning NAT loops inside-to-inside packets back with the sender's external address as
//! source (RFC 4787 REQ-9) and without inbound filtering; see [`SimNet::send`].
//!
//! IPv6 (`SimConfig::ipv6`, issue 13): the same worlds with IPv6 addresses — a firewall in front
//! of a public address ([`Path::Firewall`], RFC 6092), stateful NAT66 ([`Path::Nat`] with IPv6
//! external addresses) and stateless prefix translation ([`Path::Nptv6`], RFC 6296 with its
//! checksum-neutral mapping, behind a firewall); the server listens on two IPv6 addresses.
//!
//! [`SimNet`] is the network alone (any sans-IO client can drive it: bind, send, deliver due
//! datagrams); [`run_probe`] drives a [`Probe`] through it to completion and returns its report;
//! [`run_machine`] does the same for any [`ProbeMachine`] (e.g. [`run_lifetime`]).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::lifetime::{LifetimeConfig, LifetimeProbe};
use super::machine::ProbeMachine;
use super::plan::{Probe, ProbeConfig};
use super::report::ProbeReport;
use super::socket::SocketId;
use crate::nat::firewall::Firewall;
use crate::nat::table::{NatError, NatTable};
use crate::nat::{FilteringBehavior, MappingBehavior, NatBehavior, Protocol};
use crate::reflector::{Action, Reflector, ReflectorConfig, Transport, MAX_RESPONSE};
use crate::stun::attr::{address_len, decode_address, encode_address};
use crate::stun::{attr_type, Message, MessageWriter};

/// The client's address behind a NAT.
pub const PRIVATE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The NAT's external address.
pub const NAT_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The client's address when no NAT is in front of it.
pub const PUBLIC_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The reflector's primary address A1:P1.
pub const SERVER_PRIMARY: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 3478));
/// The reflector's alternate address A2:P2 (RFC 5780 OTHER-ADDRESS).
pub const SERVER_ALTERNATE: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 2), 3479));

/// IPv6 worlds: the client's address behind NAT66 or NPTv6 (inside the NPTv6 internal prefix).
pub const PRIVATE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0x203, 0x405, 1, 0, 0, 0, 2);
/// NPTv6's internal prefix (a /48; RFC 6296 §3.3's example prefixes).
pub const NPT_INTERNAL_PREFIX: [u16; 3] = [0xfd01, 0x203, 0x405];
/// NPTv6's external prefix (a /48).
pub const NPT_EXTERNAL_PREFIX: [u16; 3] = [0x2001, 0xdb8, 1];
/// NAT66's external address (and the ones after it).
pub const NAT_EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// The client's public IPv6 address with no translation (open or behind a firewall).
pub const PUBLIC_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 1, 0, 0, 0, 2);
/// The reflector's IPv6 primary address A1:P1.
pub const SERVER_PRIMARY6: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1),
    3478,
    0,
    0,
));
/// The reflector's IPv6 alternate address A2:P2.
pub const SERVER_ALTERNATE6: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 2),
    3479,
    0,
    0,
));

/// RFC 6296 §3.2 for /48 prefixes: replace the 48-bit prefix of `a` (which must be `from`) with
/// `to` and add the one's-complement difference of the two prefixes to the subnet word, so the
/// address's checksum contribution is unchanged. `None` when `a` is not in `from`.
pub fn nptv6_translate(a: Ipv6Addr, from: [u16; 3], to: [u16; 3]) -> Option<Ipv6Addr> {
    let mut w = a.segments();
    if w[..3] != from {
        return None;
    }
    let fold = |mut v: u32| {
        while v > 0xFFFF {
            v = (v & 0xFFFF) + (v >> 16);
        }
        v
    };
    let sum = |p: [u16; 3]| fold(p.iter().map(|&x| u32::from(x)).sum());
    // subnet + sum(from) − sum(to), in one's complement (−x is !x).
    let mut v = fold(u32::from(w[3]) + sum(from) + (0xFFFF - sum(to))) as u16;
    if v == 0xFFFF {
        v = 0;
    }
    w[..3].copy_from_slice(&to);
    w[3] = v;
    Some(Ipv6Addr::from(w))
}

/// Local ports handed to client sockets, like Linux's default ephemeral range.
pub const EPHEMERAL_PORTS: (u16, u16) = (32768, 60999);
/// Smallest distance between two client sockets' local ports. A port-preserving NAT falls back to
/// the next free port when the internal port is taken (a second mapping of one socket, or a
/// re-mapped one); keeping the sockets' own ports apart means such a fallback never lands on a port
/// another socket would have kept, so "preserving" stays the truth of every sample.
pub const MIN_PORT_GAP: u16 = 64;
/// Re-mapped internal endpoints are known to the table under aliases from 10.255.0.0/16.
const ALIAS_BASE: u32 = u32::from_be_bytes([10, 255, 0, 0]);

/// What sits between the client and the internet.
#[derive(Clone, Debug, PartialEq)]
pub enum Path {
    /// A public address and nothing in the way: "open internet".
    Open,
    /// A public address behind a stateful UDP firewall that admits inbound packets by this
    /// filtering rule (RFC 4787 §5 keys, identity mapping): "symmetric UDP firewall" for ADF/APDF.
    Firewall(FilteringBehavior),
    /// A NAT with every RFC 4787 knob of [`NatBehavior`] (NAT66 in an IPv6 world).
    Nat(NatBehavior),
    /// IPv6 only: stateless prefix translation (RFC 6296, [`NPT_INTERNAL_PREFIX`] ↔
    /// [`NPT_EXTERNAL_PREFIX`], ports kept, no hairpinning) behind a firewall with this filtering.
    Nptv6(FilteringBehavior),
    /// Every UDP datagram from the client is dropped.
    UdpBlocked,
}

/// How the simulated reflector behaves. Everything but [`ServerMode::Rfc5780`] is a server (or
/// deployment) problem a probe must report instead of turning it into a NAT verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMode {
    /// A correct two-IP RFC 5780 server (the reflector core, unmodified).
    Rfc5780,
    /// A one-address server: no OTHER-ADDRESS, CHANGE-REQUEST refused with 420 (the core's own
    /// one-address mode). Only A1:P1 listens.
    SingleAddress,
    /// OTHER-ADDRESS names the primary's IP (A1:P2 instead of A2:P2): a server that believes it has
    /// a second address but does not. The core's config validation refuses this shape, so the
    /// server answers correctly and the attribute is rewritten afterwards (FINGERPRINT recomputed,
    /// as the server itself would have).
    OtherAddressSameIp,
    /// CHANGE-REQUEST is ignored: every answer leaves from the address the request reached, with an
    /// honest RESPONSE-ORIGIN (the attribute is stripped before the core sees the request).
    IgnoresChangeRequest,
    /// Answers to change requests claim the changed address in RESPONSE-ORIGIN but really leave
    /// from the address the request reached (one wildcard socket, or source NAT in front of the
    /// server).
    ChangeFromWrongSource,
}

/// A stall of the client host's receive path, as under CPU contention when the task that reads a
/// socket is not scheduled while the one that runs the timers is (the real driver reads each
/// socket in its own task): from `at` (virtual time since the start) for `len`, the datagrams that
/// reach the stalled sockets queue up, in order, as in a kernel socket buffer, and are handed to
/// the machine in that order when the stall ends. Timers and sends go on meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    pub at: Duration,
    pub len: Duration,
    /// The stalled socket; `None` stalls every socket.
    pub socket: Option<SocketId>,
}

/// One simulated world.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub path: Path,
    pub server: ServerMode,
    /// Linux conntrack quirk (NAT only): once an unsolicited inbound packet has hit a mapping and
    /// been filtered, the next outbound packet of that internal endpoint gets a new external port.
    /// This is what makes RFC 3489-style tools, which test filtering on the mapping socket, call an
    /// endpoint-independent NAT "symmetric".
    pub conntrack_remap: bool,
    /// An application-level gateway on the NAT that rewrites MAPPED-ADDRESS in inbound payloads
    /// from the external endpoint to the internal one (RFC 5780 §3.6). It is blind: FINGERPRINT is
    /// left as it was, now wrong.
    pub alg: bool,
    /// External addresses of the NAT (`NAT_EXTERNAL_IP` and the ones after it), at least 1; with
    /// more than one, the NAT's [`crate::nat::Pooling`] decides which a mapping gets.
    pub nat_external_ips: u8,
    /// Fixed one-way delay of every datagram (client ↔ server, and a hairpin through the NAT).
    pub one_way_delay: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per datagram (may reorder).
    pub jitter: Duration,
    /// Chance that any one datagram is dropped, each direction independently.
    pub loss: f64,
    /// A stalled receive path on the client host (see [`Stall`]).
    pub stall: Option<Stall>,
    /// An IPv6 world: every address above is its IPv6 counterpart (`*6` constants).
    pub ipv6: bool,
    pub seed: u64,
    /// Bounds on a [`run_probe`] loop: events processed and virtual time.
    pub max_steps: u64,
    pub max_virtual_time: Duration,
}

impl SimConfig {
    /// A lossless world with a correct server, 5 ms one-way delay and no quirks.
    pub fn new(path: Path, seed: u64) -> Self {
        Self {
            path,
            server: ServerMode::Rfc5780,
            conntrack_remap: false,
            alg: false,
            nat_external_ips: 1,
            one_way_delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            loss: 0.0,
            stall: None,
            ipv6: false,
            seed,
            max_steps: 200_000,
            max_virtual_time: Duration::from_secs(600),
        }
    }
}

/// What the network did, for tests that must show a quirk or fault really acted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Datagrams sent by the client.
    pub client_sent: u64,
    /// Datagrams the server answered.
    pub server_answers: u64,
    /// Datagrams dropped by the random loss.
    pub lost: u64,
    /// Inbound datagrams refused by the NAT's or firewall's filter.
    pub filtered: u64,
    /// Datagrams looped back by the NAT (REQ-9).
    pub hairpinned: u64,
    /// New external ports handed out by the conntrack quirk.
    pub remapped: u64,
    /// Payloads rewritten by the ALG.
    pub alg_rewrites: u64,
    /// Datagrams dropped because the path blocks UDP, or with no one at the destination.
    pub undeliverable: u64,
}

/// What happened to an inbound packet at the NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Translated to this internal endpoint.
    Delivered(SocketAddr),
    /// A live mapping exists but its filter refused the sender.
    Filtered,
    /// No live mapping for that external address.
    NoMapping,
}

/// A [`NatTable`] plus the conntrack re-mapping quirk, implemented outside the table so its
/// RFC 4787 semantics stay exactly the lab's. A re-mapped internal endpoint is presented to the
/// table under a fresh alias address (10.255.x.y, same port), so the table allocates a new mapping
/// by its own rules; inbound results are translated back. The alias trick assumes one external IP
/// or paired pooling per alias, which is all the simulator uses.
#[derive(Debug)]
pub struct SimNat {
    table: NatTable,
    remap_after_unsolicited: bool,
    /// Internal endpoints whose next outbound packet gets a new mapping.
    tainted: HashSet<SocketAddr>,
    /// Real internal endpoint → the alias the table knows it by now.
    alias: HashMap<SocketAddr, SocketAddr>,
    /// Alias → real internal endpoint.
    real: HashMap<SocketAddr, SocketAddr>,
    next_alias: u32,
    remaps: u64,
}

impl SimNat {
    pub fn new(table: NatTable, remap_after_unsolicited: bool) -> Self {
        Self {
            table,
            remap_after_unsolicited,
            tainted: HashSet::new(),
            alias: HashMap::new(),
            real: HashMap::new(),
            next_alias: 1,
            remaps: 0,
        }
    }

    pub fn table(&self) -> &NatTable {
        &self.table
    }

    pub fn behavior(&self) -> &NatBehavior {
        self.table.behavior()
    }

    /// How many times the conntrack quirk handed out a new external port.
    pub fn remaps(&self) -> u64 {
        self.remaps
    }

    fn to_real(&self, key: SocketAddr) -> SocketAddr {
        self.real.get(&key).copied().unwrap_or(key)
    }

    /// Translates an outbound packet; see [`NatTable::outbound`].
    pub fn outbound(
        &mut self,
        now: Instant,
        internal: SocketAddr,
        remote: SocketAddr,
    ) -> Result<SocketAddr, NatError> {
        if self.tainted.remove(&internal) {
            let ip = if internal.is_ipv4() {
                IpAddr::V4(Ipv4Addr::from(ALIAS_BASE + self.next_alias))
            } else {
                IpAddr::V6(
                    Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 0, 0)
                        | Ipv6Addr::from(u128::from(self.next_alias)),
                )
            };
            self.next_alias += 1;
            let alias = SocketAddr::new(ip, internal.port());
            // Earlier mappings stay live until they expire, and their answers still come home.
            self.alias.insert(internal, alias);
            self.real.insert(alias, internal);
            self.remaps += 1;
        }
        let key = self.alias.get(&internal).copied().unwrap_or(internal);
        self.table.outbound(now, Protocol::Udp, key, remote)
    }

    /// Translates an inbound packet from `remote` to `external`, telling a filtered packet from
    /// one with no mapping (the table alone answers `None` for both).
    pub fn inbound(&mut self, now: Instant, remote: SocketAddr, external: SocketAddr) -> Inbound {
        if let Some(key) = self.table.inbound(now, Protocol::Udp, remote, external) {
            return Inbound::Delivered(self.to_real(key));
        }
        let Some(internal) = self.live_internal(now, external) else {
            return Inbound::NoMapping;
        };
        if self.remap_after_unsolicited {
            // The refused packet leaves a conntrack entry on (remote, external); Linux then gives
            // the internal endpoint's next flow another port. Modelled as: its next packet, any
            // destination, gets a new mapping.
            self.tainted.insert(internal);
        }
        Inbound::Filtered
    }

    /// The internal endpoint of the live mapping on `external`, filters ignored (hairpinning).
    pub fn live_internal(&self, now: Instant, external: SocketAddr) -> Option<SocketAddr> {
        let key = self
            .table
            .mappings(now)
            .find(|m| m.proto == Protocol::Udp && m.external == external)?
            .internal;
        Some(self.to_real(key))
    }
}

#[derive(Debug)]
enum Edge {
    Open,
    Firewall(Firewall),
    Nat(Box<SimNat>),
    /// Stateless prefix translation in front of a firewall keyed on internal addresses.
    Nptv6(Firewall),
    Blocked,
}

/// Where an in-flight datagram is going when it lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leg {
    /// Across the internet: routed by destination address on arrival.
    Internet,
    /// Looped back inside the NAT to this internal endpoint (filters do not apply; see
    /// [`SimNet::send`]).
    Hairpin(SocketAddr),
}

#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    leg: Leg,
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

// Min-heap on (arrival, send order): earliest first, FIFO among equal times.
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for InFlight {}

/// A datagram that reached a client socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The client socket's local address.
    pub local: SocketAddr,
    /// The source as the client sees it (after the NAT).
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

/// The reflector plus the [`ServerMode`] faults wrapped around it.
#[derive(Debug)]
struct Server {
    core: Reflector,
    mode: ServerMode,
    listening: Vec<SocketAddr>,
}

impl Server {
    fn new(mode: ServerMode, ipv6: bool) -> Self {
        let (primary, alternate) = if ipv6 {
            (SERVER_PRIMARY6, SERVER_ALTERNATE6)
        } else {
            (SERVER_PRIMARY, SERVER_ALTERNATE)
        };
        let alternate = (mode != ServerMode::SingleAddress).then_some(alternate);
        let core = Reflector::new(ReflectorConfig {
            primary,
            alternate,
            partner: None,
        });
        let listening = core.config().server_addresses();
        Self {
            core,
            mode,
            listening,
        }
    }

    /// The answer to `request` from `from` reaching `to`, as (source, destination, bytes).
    fn answer(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        request: &[u8],
    ) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
        let stripped;
        let request = if self.mode == ServerMode::IgnoresChangeRequest {
            stripped = rewrite(request, |typ, _| {
                (typ != attr_type::CHANGE_REQUEST).then_some(None)
            })?;
            &stripped[..]
        } else {
            request
        };
        let mut out = [0u8; MAX_RESPONSE];
        let (action, _) = self
            .core
            .answer(Transport::Udp, from, to, request, &mut out, 0);
        let Action::Send {
            from: source,
            to: dest,
            len,
            ..
        } = action
        else {
            return None;
        };
        let bytes = &out[..len];
        match self.mode {
            ServerMode::OtherAddressSameIp => {
                let bytes = rewrite(bytes, |typ, value| {
                    if typ != attr_type::OTHER_ADDRESS {
                        return Some(None);
                    }
                    let other = decode_address(value).ok()?;
                    let lie = SocketAddr::new(to.ip(), other.port());
                    let mut v = vec![0u8; address_len(lie)];
                    encode_address(lie, &mut v);
                    Some(Some(v))
                })?;
                Some((source, dest, bytes))
            }
            ServerMode::ChangeFromWrongSource => Some((to, dest, bytes.to_vec())),
            _ => Some((source, dest, bytes.to_vec())),
        }
    }
}

/// Re-encodes a STUN message attribute by attribute. `f(typ, value)` returns `None` to drop the
/// attribute, `Some(None)` to keep it, `Some(Some(v))` to replace its value. FINGERPRINT is
/// recomputed when the original had one. `None` if the bytes are not STUN.
fn rewrite(
    bytes: &[u8],
    mut f: impl FnMut(u16, &[u8]) -> Option<Option<Vec<u8>>>,
) -> Option<Vec<u8>> {
    let msg = Message::parse(bytes).ok()?;
    let mut buf = vec![0u8; bytes.len() + 64];
    let mut w = MessageWriter::new(&mut buf, msg.message_type(), &msg.transaction_id()).ok()?;
    let mut fingerprint = false;
    for a in msg.attributes() {
        if a.typ == attr_type::FINGERPRINT {
            fingerprint = true;
            continue;
        }
        match f(a.typ, a.value) {
            None => {}
            Some(None) => w.add_raw(a.typ, a.value).ok()?,
            Some(Some(v)) => w.add_raw(a.typ, &v).ok()?,
        }
    }
    let len = if fingerprint {
        w.finish_with_fingerprint().ok()?
    } else {
        w.finish()
    };
    buf.truncate(len);
    Some(buf)
}

/// The blind ALG: every MAPPED-ADDRESS equal to `external` becomes `internal`, in place.
fn alg_rewrite(payload: &mut [u8], external: SocketAddr, internal: SocketAddr) -> bool {
    let Ok(msg) = Message::parse(payload) else {
        return false;
    };
    let spots: Vec<usize> = msg
        .attributes()
        .filter(|a| {
            a.typ == attr_type::MAPPED_ADDRESS
                && a.value.len() == address_len(internal)
                && decode_address(a.value) == Ok(external)
        })
        .map(|a| a.offset + 4)
        .collect();
    let n = address_len(internal);
    for at in &spots {
        encode_address(internal, &mut payload[*at..*at + n]);
    }
    !spots.is_empty()
}

/// The simulated network: client edge (NAT, firewall, nothing or a block), internet, server.
#[derive(Debug)]
pub struct SimNet {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    alg: bool,
    edge: Edge,
    server: Server,
    client_ip: IpAddr,
    bound: Vec<u16>,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    /// Loss and jitter draws.
    wire_rng: StdRng,
    /// Local port draws (separate, so loss does not change which ports sockets get).
    port_rng: StdRng,
    stats: SimStats,
}

impl SimNet {
    pub fn new(cfg: &SimConfig) -> Self {
        let v6 = cfg.ipv6;
        let (public, private) = if v6 {
            (IpAddr::V6(PUBLIC_CLIENT_IP6), IpAddr::V6(PRIVATE_IP6))
        } else {
            (IpAddr::V4(PUBLIC_CLIENT_IP), IpAddr::V4(PRIVATE_IP))
        };
        // The lab's firewall with RFC 4787-recommended defaults: a 120 s UDP timeout (REQ-5),
        // refreshed by outbound packets only (REQ-6).
        let firewall = |f: FilteringBehavior| {
            Firewall::new(NatBehavior::new(MappingBehavior::EndpointIndependent, f))
        };
        let (edge, client_ip) = match &cfg.path {
            Path::Open => (Edge::Open, public),
            Path::Firewall(f) => (Edge::Firewall(firewall(*f)), public),
            Path::Nptv6(f) => (Edge::Nptv6(firewall(*f)), private),
            Path::Nat(b) => (
                Edge::Nat(Box::new(SimNat::new(
                    NatTable::new(
                        b.clone(),
                        (0..cfg.nat_external_ips.max(1))
                            .map(|i| {
                                if v6 {
                                    let mut w = NAT_EXTERNAL_IP6.segments();
                                    w[7] += u16::from(i);
                                    return IpAddr::V6(Ipv6Addr::from(w));
                                }
                                let [a, b, c, d] = NAT_EXTERNAL_IP.octets();
                                IpAddr::V4(Ipv4Addr::new(a, b, c, d + i))
                            })
                            .collect(),
                        cfg.seed ^ 0x4e41_5400,
                    ),
                    cfg.conntrack_remap,
                ))),
                private,
            ),
            Path::UdpBlocked => (Edge::Blocked, private),
        };
        Self {
            delay: cfg.one_way_delay,
            jitter: cfg.jitter,
            loss: cfg.loss,
            alg: cfg.alg,
            edge,
            server: Server::new(cfg.server, v6),
            client_ip,
            bound: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            wire_rng: StdRng::seed_from_u64(cfg.seed),
            port_rng: StdRng::seed_from_u64(cfg.seed ^ 0x504f_5254),
            stats: SimStats::default(),
        }
    }

    pub fn stats(&self) -> SimStats {
        let mut s = self.stats;
        if let Edge::Nat(n) = &self.edge {
            s.remapped = n.remaps();
        }
        s
    }

    /// The NAT, when the path has one.
    pub fn nat(&self) -> Option<&SimNat> {
        match &self.edge {
            Edge::Nat(n) => Some(n),
            _ => None,
        }
    }

    /// The client host's own address.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    /// Binds a new client socket: a random free ephemeral port at least [`MIN_PORT_GAP`] from
    /// every other bound port.
    pub fn bind(&mut self) -> SocketAddr {
        let (lo, hi) = EPHEMERAL_PORTS;
        let clear = |bound: &[u16], p: u16| bound.iter().all(|b| b.abs_diff(p) >= MIN_PORT_GAP);
        let mut port = None;
        for _ in 0..256 {
            let p = self.port_rng.gen_range(lo..=hi);
            if clear(&self.bound, p) {
                port = Some(p);
                break;
            }
        }
        let port = port
            .or_else(|| (lo..=hi).find(|p| clear(&self.bound, *p)))
            .or_else(|| (lo..=hi).find(|p| !self.bound.contains(p)))
            .unwrap_or(lo);
        self.bound.push(port);
        SocketAddr::new(self.client_ip, port)
    }

    /// Sends `payload` from client socket `local` to `to` at `now`. Outbound translation (and the
    /// filter permission it opens) happens now, at the NAT next to the host; loss and delay apply
    /// after it, as on an access link.
    ///
    /// Hairpinning (RFC 4787 REQ-9): a packet to the NAT's own external address is translated
    /// outbound (so it carries the sender's external address and port as its source) and, if the
    /// NAT hairpins, delivered to the internal endpoint of the mapping it targets **without**
    /// inbound filtering — the NAT treats its own inside as trusted, as Linux hairpin (NAT
    /// reflection) does. So a hairpinning NAT hairpins whatever its filtering, and the probe's
    /// verdict is the `hairpinning` knob itself.
    pub fn send(&mut self, now: Instant, local: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        self.stats.client_sent += 1;
        let src = match &mut self.edge {
            Edge::Blocked => {
                self.stats.undeliverable += 1;
                return;
            }
            Edge::Open => local,
            Edge::Firewall(fw) => {
                fw.outbound(now, Protocol::Udp, local, to);
                local
            }
            Edge::Nptv6(fw) => {
                let external = match local.ip() {
                    IpAddr::V6(ip) => nptv6_translate(ip, NPT_INTERNAL_PREFIX, NPT_EXTERNAL_PREFIX),
                    IpAddr::V4(_) => None,
                };
                // Its own external prefix is not routed back inside: no hairpinning.
                let own =
                    matches!(to.ip(), IpAddr::V6(d) if d.segments()[..3] == NPT_EXTERNAL_PREFIX);
                let Some(external) = external.filter(|_| !own) else {
                    self.stats.undeliverable += 1;
                    return;
                };
                fw.outbound(now, Protocol::Udp, local, to);
                SocketAddr::new(IpAddr::V6(external), local.port())
            }
            Edge::Nat(nat) => {
                let Ok(ext) = nat.outbound(now, local, to) else {
                    self.stats.undeliverable += 1;
                    return;
                };
                if nat.table().is_external_ip(to.ip()) {
                    let target = nat
                        .behavior()
                        .hairpinning
                        .then(|| nat.live_internal(now, to))
                        .flatten();
                    match target {
                        Some(internal) => {
                            self.stats.hairpinned += 1;
                            self.schedule(now, Leg::Hairpin(internal), ext, to, payload);
                        }
                        None => self.stats.undeliverable += 1,
                    }
                    return;
                }
                ext
            }
        };
        self.schedule(now, Leg::Internet, src, to, payload);
    }

    fn schedule(
        &mut self,
        now: Instant,
        leg: Leg,
        src: SocketAddr,
        dst: SocketAddr,
        payload: Vec<u8>,
    ) {
        if self.loss > 0.0 && self.wire_rng.gen_bool(self.loss.min(1.0)) {
            self.stats.lost += 1;
            return;
        }
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(self.wire_rng.gen_range(0.0..=1.0))
        };
        self.seq += 1;
        self.queue.push(InFlight {
            at: now + self.delay + jitter,
            seq: self.seq,
            leg,
            src,
            dst,
            payload,
        });
    }

    /// When the next in-flight datagram lands.
    pub fn next_event(&self) -> Option<Instant> {
        self.queue.peek().map(|d| d.at)
    }

    /// Lands every datagram due by `now`: the server answers what reaches it (its answers go back
    /// in flight), and what reaches the client passes the NAT or firewall and is returned.
    pub fn deliver_due(&mut self, now: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        while self.queue.peek().is_some_and(|d| d.at <= now) {
            let Some(d) = self.queue.pop() else { break };
            let at = d.at;
            match d.leg {
                Leg::Hairpin(internal) => self.deliver_inside(&mut out, internal, d.src, d.payload),
                Leg::Internet if self.server.listening.contains(&d.dst) => {
                    if let Some((src, dst, bytes)) = self.server.answer(d.src, d.dst, &d.payload) {
                        self.stats.server_answers += 1;
                        self.schedule(at, Leg::Internet, src, dst, bytes);
                    }
                }
                Leg::Internet => self.inbound(at, &mut out, d.src, d.dst, d.payload),
            }
        }
        out
    }

    fn inbound(
        &mut self,
        now: Instant,
        out: &mut Vec<Delivery>,
        src: SocketAddr,
        dst: SocketAddr,
        mut payload: Vec<u8>,
    ) {
        let internal = match &mut self.edge {
            Edge::Blocked => None,
            Edge::Open => (dst.ip() == self.client_ip).then_some(dst),
            Edge::Firewall(fw) => {
                if dst.ip() != self.client_ip {
                    None
                } else if fw.inbound(now, Protocol::Udp, src, dst) {
                    Some(dst)
                } else {
                    self.stats.filtered += 1;
                    return;
                }
            }
            Edge::Nat(nat) if nat.table().is_external_ip(dst.ip()) => {
                match nat.inbound(now, src, dst) {
                    Inbound::Delivered(internal) => {
                        if self.alg && alg_rewrite(&mut payload, dst, internal) {
                            self.stats.alg_rewrites += 1;
                        }
                        Some(internal)
                    }
                    Inbound::Filtered => {
                        self.stats.filtered += 1;
                        return;
                    }
                    Inbound::NoMapping => None,
                }
            }
            Edge::Nat(_) => None,
            Edge::Nptv6(fw) => {
                let internal = match dst.ip() {
                    IpAddr::V6(ip) => nptv6_translate(ip, NPT_EXTERNAL_PREFIX, NPT_INTERNAL_PREFIX),
                    IpAddr::V4(_) => None,
                }
                .map(|ip| SocketAddr::new(IpAddr::V6(ip), dst.port()));
                match internal {
                    Some(i) if fw.inbound(now, Protocol::Udp, src, i) => Some(i),
                    Some(_) => {
                        self.stats.filtered += 1;
                        return;
                    }
                    None => None,
                }
            }
        };
        match internal {
            Some(internal) => self.deliver_inside(out, internal, src, payload),
            None => self.stats.undeliverable += 1,
        }
    }

    fn deliver_inside(
        &mut self,
        out: &mut Vec<Delivery>,
        local: SocketAddr,
        from: SocketAddr,
        payload: Vec<u8>,
    ) {
        if local.ip() == self.client_ip && self.bound.contains(&local.port()) {
            out.push(Delivery {
                local,
                from,
                payload,
            });
        } else {
            self.stats.undeliverable += 1;
        }
    }
}

/// The result of driving one probe through the simulator.
#[derive(Debug)]
pub struct SimRun {
    pub report: ProbeReport,
    /// Whether the probe finished (rather than hitting the step or virtual-time bound).
    pub completed: bool,
    /// Virtual time from start to the last event handled.
    pub virtual_time: Duration,
    pub steps: u64,
    pub stats: SimStats,
    /// Each probe socket and the local address the simulator bound for it.
    pub sockets: Vec<(SocketId, SocketAddr)>,
    /// Every datagram the probe sent, in order.
    pub sent: Vec<SentDatagram>,
}

/// One datagram a machine handed to the simulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentDatagram {
    /// Virtual time since the start.
    pub at: Duration,
    pub socket: SocketId,
    pub to: SocketAddr,
    pub payload: Vec<u8>,
}

/// Runs `probe_cfg` against the world `cfg` on a virtual clock ([`run_machine`] with a [`Probe`]).
pub fn run_probe(cfg: &SimConfig, probe_cfg: ProbeConfig) -> SimRun {
    let run = run_machine(cfg, |epoch| Probe::new(epoch, probe_cfg));
    SimRun {
        report: run.machine.report(),
        completed: run.completed,
        virtual_time: run.virtual_time,
        steps: run.steps,
        stats: run.stats,
        sockets: run.sockets,
        sent: run.sent,
    }
}

/// A probe configuration aimed at the simulated server, with a seeded transaction-ID generator.
pub fn probe_config(seed: u64) -> ProbeConfig {
    let mut c = ProbeConfig::new(SERVER_PRIMARY);
    c.seed = Some(seed);
    c
}

/// [`probe_config`] for an IPv6 world (`SimConfig::ipv6`): aimed at [`SERVER_PRIMARY6`].
pub fn probe_config6(seed: u64) -> ProbeConfig {
    let mut c = ProbeConfig::new(SERVER_PRIMARY6);
    c.seed = Some(seed);
    c
}

/// The result of driving any [`ProbeMachine`] through the simulator.
#[derive(Debug)]
pub struct MachineRun<M> {
    pub machine: M,
    /// Whether the machine finished (rather than hitting the step or virtual-time bound).
    pub completed: bool,
    /// Virtual time from start to the last event handled.
    pub virtual_time: Duration,
    pub steps: u64,
    pub stats: SimStats,
    pub sockets: Vec<(SocketId, SocketAddr)>,
    /// Every datagram the machine sent, in order.
    pub sent: Vec<SentDatagram>,
    /// The network at the end, for tests that inspect the NAT table.
    pub net: SimNet,
}

/// Runs the machine `make` builds against the world `cfg` to completion on a virtual clock: sends
/// what it transmits, lands datagrams at their arrival times, calls `handle_timeout` when due, and
/// jumps time to the next arrival or timeout. Bounded by `cfg.max_steps` and `cfg.max_virtual_time`.
pub fn run_machine<M: ProbeMachine>(
    cfg: &SimConfig,
    make: impl FnOnce(Instant) -> M,
) -> MachineRun<M> {
    // The one clock read: the origin of virtual time. Only durations added to it follow.
    let epoch = Instant::now();
    let mut net = SimNet::new(cfg);
    let mut machine = make(epoch);
    let mut sockets: Vec<(SocketId, SocketAddr)> = Vec::new();
    let mut sent = Vec::new();
    let mut now = epoch;
    let mut steps = 0;
    let mut completed = false;
    let stall = cfg
        .stall
        .map(|s| (epoch + s.at, epoch + s.at + s.len, s.socket));
    // Datagrams that reached a stalled socket, in arrival order.
    let mut backlog: Vec<(SocketId, Delivery)> = Vec::new();
    loop {
        steps += 1;
        while let Some(t) = machine.poll_transmit(now) {
            let local = match sockets.iter().find(|(id, _)| *id == t.source) {
                Some((_, a)) => *a,
                None => {
                    let a = net.bind();
                    sockets.push((t.source, a));
                    machine.socket_bound(t.source, a);
                    a
                }
            };
            sent.push(SentDatagram {
                at: now.saturating_duration_since(epoch),
                socket: t.source,
                to: t.destination,
                payload: t.payload.clone(),
            });
            net.send(now, local, t.destination, t.payload);
        }
        if machine.is_done() {
            completed = true;
            break;
        }
        if steps >= cfg.max_steps {
            break;
        }
        let stall_end = stall.map(|(_, end, _)| end).filter(|_| !backlog.is_empty());
        let Some(next) = [net.next_event(), machine.poll_timeout(), stall_end]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        if next.saturating_duration_since(epoch) > cfg.max_virtual_time {
            break;
        }
        now = now.max(next);
        let stalled = |id: SocketId, now: Instant| {
            stall.is_some_and(|(from, to, s)| now >= from && now < to && s.is_none_or(|s| s == id))
        };
        if stall.is_some_and(|(_, to, _)| now >= to) {
            for (id, d) in std::mem::take(&mut backlog) {
                machine.handle_datagram(now, id, d.from, &d.payload);
            }
        }
        for d in net.deliver_due(now) {
            if let Some((id, _)) = sockets.iter().find(|(_, a)| *a == d.local) {
                if stalled(*id, now) {
                    backlog.push((*id, d));
                } else {
                    machine.handle_datagram(now, *id, d.from, &d.payload);
                }
            }
        }
        if machine.poll_timeout().is_some_and(|t| t <= now) {
            machine.handle_timeout(now);
        }
    }
    MachineRun {
        machine,
        completed,
        virtual_time: now.saturating_duration_since(epoch),
        steps,
        stats: net.stats(),
        sockets,
        sent,
        net,
    }
}

/// Runs a binding-lifetime measurement (RFC 5780 §4.6) against the world `cfg`.
pub fn run_lifetime(cfg: &SimConfig, lifetime_cfg: LifetimeConfig) -> MachineRun<LifetimeProbe> {
    run_machine(cfg, |epoch| LifetimeProbe::new(epoch, lifetime_cfg))
}

/// A lifetime configuration aimed at the simulated server, with a seeded transaction-ID generator.
pub fn lifetime_config(seed: u64) -> LifetimeConfig {
    let mut c = LifetimeConfig::new(SERVER_PRIMARY);
    c.seed = Some(seed);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{build_request, BindingResponse, RequestOptions};
    use crate::nat::MappingBehavior as M;
    use crate::stun::{ChangeRequest, TransactionId};

    fn request(change: ChangeRequest) -> (TransactionId, Vec<u8>) {
        let tid = TransactionId::random();
        let mut buf = [0u8; 256];
        let n = build_request(
            &mut buf,
            &tid,
            &RequestOptions {
                change,
                fingerprint: true,
                ..Default::default()
            },
        )
        .unwrap();
        (tid, buf[..n].to_vec())
    }

    fn run_until_quiet(net: &mut SimNet, mut now: Instant) -> Vec<Delivery> {
        let mut all = Vec::new();
        while let Some(t) = net.next_event() {
            now = now.max(t);
            all.extend(net.deliver_due(now));
        }
        all
    }

    #[test]
    fn hairpinned_packet_carries_the_senders_external_address() {
        let mut b = NatBehavior::new(
            M::EndpointIndependent,
            FilteringBehavior::AddressAndPortDependent,
        );
        b.hairpinning = true;
        let mut net = SimNet::new(&SimConfig::new(Path::Nat(b), 3));
        let t0 = Instant::now();
        let (x, y) = (net.bind(), net.bind());
        let (tid, req) = request(ChangeRequest::NONE);
        net.send(t0, x, SERVER_PRIMARY, req.clone());
        let got = run_until_quiet(&mut net, t0);
        let m1 = BindingResponse::parse(&got[0].payload, &tid, None)
            .unwrap()
            .xor_mapped
            .unwrap();
        assert_eq!(m1.ip(), IpAddr::V4(NAT_EXTERNAL_IP));
        net.send(t0, y, m1, req);
        let got = run_until_quiet(&mut net, t0);
        assert_eq!(got.len(), 1, "{:?}", net.stats());
        assert_eq!(got[0].local, x);
        assert_eq!(got[0].from.ip(), IpAddr::V4(NAT_EXTERNAL_IP));
        assert_ne!(got[0].from, m1, "the source is y's own mapping");
    }

    #[test]
    fn server_faults_shape_the_answers() {
        let t0 = Instant::now();
        let rows = [
            (
                ServerMode::Rfc5780,
                "198.51.100.2:3479",
                Some("198.51.100.2:3479"),
            ),
            (
                ServerMode::OtherAddressSameIp,
                "198.51.100.2:3479",
                Some("198.51.100.1:3479"),
            ),
            (
                ServerMode::IgnoresChangeRequest,
                "198.51.100.1:3478",
                Some("198.51.100.2:3479"),
            ),
            (
                ServerMode::ChangeFromWrongSource,
                "198.51.100.1:3478",
                Some("198.51.100.2:3479"),
            ),
        ];
        for (mode, want_from, want_other) in rows {
            let mut cfg = SimConfig::new(Path::Open, 1);
            cfg.server = mode;
            let mut net = SimNet::new(&cfg);
            let x = net.bind();
            let (tid, req) = request(ChangeRequest::BOTH);
            net.send(t0, x, SERVER_PRIMARY, req);
            let got = run_until_quiet(&mut net, t0);
            assert_eq!(got.len(), 1, "{mode:?}");
            let r = BindingResponse::parse(&got[0].payload, &tid, Some(got[0].from)).unwrap();
            assert_eq!(got[0].from.to_string(), want_from, "{mode:?}");
            assert_eq!(
                r.other_address.map(|a| a.to_string()).as_deref(),
                want_other,
                "{mode:?}"
            );
            assert_eq!(
                r.fingerprint_ok,
                Some(true),
                "{mode:?}: the server signs what it sends"
            );
            let origin = r.response_origin.map(|a| a.to_string());
            let want_origin = if mode == ServerMode::ChangeFromWrongSource {
                "198.51.100.2:3479"
            } else {
                want_from
            };
            assert_eq!(origin.as_deref(), Some(want_origin), "{mode:?}");
        }
        // A one-address server refuses CHANGE-REQUEST with 420 and names no alternate.
        let mut cfg = SimConfig::new(Path::Open, 1);
        cfg.server = ServerMode::SingleAddress;
        let mut net = SimNet::new(&cfg);
        let x = net.bind();
        let (tid, req) = request(ChangeRequest::BOTH);
        net.send(t0, x, SERVER_PRIMARY, req);
        let got = run_until_quiet(&mut net, t0);
        let r = BindingResponse::parse(&got[0].payload, &tid, None).unwrap();
        assert_eq!((r.error_code, r.other_address), (Some(420), None));
    }

    #[test]
    fn alg_rewrites_mapped_address_only() {
        let mut cfg = SimConfig::new(
            Path::Nat(NatBehavior::new(
                M::EndpointIndependent,
                FilteringBehavior::EndpointIndependent,
            )),
            5,
        );
        cfg.alg = true;
        let mut net = SimNet::new(&cfg);
        let t0 = Instant::now();
        let x = net.bind();
        let (tid, req) = request(ChangeRequest::NONE);
        net.send(t0, x, SERVER_PRIMARY, req);
        let got = run_until_quiet(&mut net, t0);
        let r = BindingResponse::parse(&got[0].payload, &tid, None).unwrap();
        assert_eq!(
            r.mapped,
            Some(x),
            "MAPPED-ADDRESS rewritten to the internal endpoint"
        );
        assert_eq!(
            r.xor_mapped.map(|a| a.ip()),
            Some(IpAddr::V4(NAT_EXTERNAL_IP))
        );
        assert_eq!(
            r.fingerprint_ok,
            Some(false),
            "a blind ALG breaks FINGERPRINT"
        );
        assert_eq!(net.stats().alg_rewrites, 1);
    }

    #[test]
    fn conntrack_quirk_gives_a_new_port_after_filtered_unsolicited_inbound() {
        let b = NatBehavior::new(
            M::EndpointIndependent,
            FilteringBehavior::AddressAndPortDependent,
        );
        let t0 = Instant::now();
        let mut nat = SimNat::new(NatTable::new(b, vec![IpAddr::V4(NAT_EXTERNAL_IP)], 1), true);
        let inside: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let e1 = nat.outbound(t0, inside, SERVER_PRIMARY).unwrap();
        assert_eq!(nat.outbound(t0, inside, SERVER_ALTERNATE).unwrap(), e1);
        // Solicited inbound: no effect.
        assert_eq!(
            nat.inbound(t0, SERVER_PRIMARY, e1),
            Inbound::Delivered(inside)
        );
        assert_eq!(nat.outbound(t0, inside, SERVER_PRIMARY).unwrap(), e1);
        // Unsolicited, filtered: the next packet leaves from a new port, and its answers come home.
        let stranger: SocketAddr = "198.51.100.9:9".parse().unwrap();
        assert_eq!(nat.inbound(t0, stranger, e1), Inbound::Filtered);
        let e2 = nat.outbound(t0, inside, SERVER_PRIMARY).unwrap();
        assert_ne!(e2, e1);
        assert_eq!(
            nat.inbound(t0, SERVER_PRIMARY, e2),
            Inbound::Delivered(inside)
        );
        assert_eq!(
            nat.outbound(t0, inside, SERVER_ALTERNATE).unwrap(),
            e2,
            "then stable again"
        );
        assert_eq!(nat.remaps(), 1);
        assert_eq!(
            nat.inbound(t0, stranger, "203.0.113.1:1".parse().unwrap()),
            Inbound::NoMapping
        );
    }

    #[test]
    fn firewall_filters_without_translating() {
        let mut net = SimNet::new(&SimConfig::new(
            Path::Firewall(FilteringBehavior::AddressDependent),
            2,
        ));
        let t0 = Instant::now();
        let x = net.bind();
        assert_eq!(x.ip(), IpAddr::V4(PUBLIC_CLIENT_IP));
        for (change, admitted) in [
            (ChangeRequest::NONE, true),
            (ChangeRequest::PORT, true),
            (ChangeRequest::IP, false),
        ] {
            let (tid, req) = request(change);
            net.send(t0, x, SERVER_PRIMARY, req);
            let got = run_until_quiet(&mut net, t0);
            assert_eq!(got.len(), usize::from(admitted), "{change:?}");
            if admitted {
                let r = BindingResponse::parse(&got[0].payload, &tid, None).unwrap();
                assert_eq!(r.xor_mapped, Some(x));
            }
        }
        assert_eq!(net.stats().filtered, 1);
    }

    #[test]
    fn ports_are_distinct_spaced_and_seeded() {
        let ports = |seed| {
            let mut net = SimNet::new(&SimConfig::new(Path::Open, seed));
            (0..10).map(|_| net.bind().port()).collect::<Vec<_>>()
        };
        let a = ports(11);
        assert_eq!(a, ports(11));
        assert_ne!(a, ports(12));
        for (i, p) in a.iter().enumerate() {
            assert!((EPHEMERAL_PORTS.0..=EPHEMERAL_PORTS.1).contains(p));
            for q in &a[i + 1..] {
                assert!(p.abs_diff(*q) >= MIN_PORT_GAP, "{p} {q}");
            }
        }
    }
}
