//! The PCP (RFC 6887) client machine, sans-IO: ANNOUNCE (does the gateway speak PCP, and does it
//! see our address as we do?), then optionally a MAP for a UDP port with a random nonce, which
//! [`PcpClient::delete`] removes again (a MAP with lifetime 0 and the same nonce, RFC 6887 §15).
//!
//! Like [`super::pmp_client`], one request at a time on the [`Retransmit`] schedule, answers only
//! from the server's address and port, only for the request in flight, and a MAP answer only with
//! our nonce, protocol and internal port (§11.4: anything else is someone else's, or forged).
//!
//! Version negotiation (§9): a version-0 answer is a NAT-PMP-only gateway — PCP is unavailable,
//! and the NAT-PMP machine, which the driver runs alongside, covers it; an UNSUPP_VERSION answer
//! from an older PCP version likewise. ADDRESS_MISMATCH (§8.3, result 12): the server saw another
//! source address than the one we wrote, so a NAT sits between us and it (double NAT); the gateway
//! speaks PCP, but no MAP is attempted (that needs THIRD_PARTY, which this client does not send).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::exchange::{Clock, Exchange, GrantedMapping, Outcome, Retransmit};
use super::pcp::{
    self, MapRequest, Nonce, Request, RequestOp, Response, ResponseOp, ResultCode, ANY_V4,
};
use super::{natpmp, MapProtocol, PortMappingService};
use crate::net::Transmit;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Announce,
    Map { internal_port: u16, lifetime: u32 },
    Delete { internal_port: u16 },
}

/// Asks a gateway over PCP. See the module comment.
#[derive(Clone, Debug)]
pub struct PcpClient {
    server: SocketAddr,
    client_address: IpAddr,
    nonce: Nonce,
    schedule: Retransmit,
    queue: VecDeque<Op>,
    pending: Option<(Op, Exchange)>,
    clock: Clock,
    outcome: Outcome,
    stopped: bool,
}

impl PcpClient {
    /// A client that sends ANNOUNCE to `gateway` from `client_address` (the local address of the
    /// PCP socket, written into every request), then with `map` (internal port, lifetime in
    /// seconds) a MAP for that UDP port. `nonce` must be random (the caller's seeded RNG).
    pub fn new(
        now: Instant,
        gateway: IpAddr,
        client_address: IpAddr,
        nonce: [u8; 12],
        schedule: Retransmit,
        map: Option<(u16, u32)>,
    ) -> Self {
        let mut queue = VecDeque::from([Op::Announce]);
        if let Some((internal_port, lifetime)) = map {
            queue.push_back(Op::Map {
                internal_port,
                lifetime,
            });
        }
        Self {
            server: SocketAddr::new(gateway, natpmp::SERVER_PORT),
            client_address: client_address.to_canonical(),
            nonce: Nonce(nonce),
            schedule,
            queue,
            pending: None,
            clock: Clock::new(now),
            outcome: Outcome::default(),
            stopped: false,
        }
    }

    /// Deletes the granted mapping on `schedule`; does nothing without one.
    pub fn delete(&mut self, now: Instant, schedule: Retransmit) {
        let Some(m) = self.outcome.mapping else {
            return;
        };
        self.schedule = schedule;
        self.stopped = false;
        self.queue.push_back(Op::Delete {
            internal_port: m.internal_port,
        });
        self.handle_timeout(now);
    }

    /// The server's port 5351.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// What the client learned so far.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// No request left to send or wait for.
    pub fn is_done(&self) -> bool {
        self.pending.is_none() && (self.queue.is_empty() || self.stopped)
    }

    fn request(&self, op: Op) -> Request {
        let map = |internal_port, suggested: Option<SocketAddr>| {
            RequestOp::Map(MapRequest {
                nonce: self.nonce,
                protocol: MapProtocol::Udp.iana(),
                internal_port,
                suggested_external_port: suggested.map_or(0, |s| s.port()),
                suggested_external_address: suggested.map_or(
                    if self.client_address.is_ipv4() {
                        ANY_V4
                    } else {
                        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                    },
                    |s| s.ip(),
                ),
            })
        };
        let (lifetime, op) = match op {
            Op::Announce => (0, RequestOp::Announce),
            Op::Map {
                internal_port,
                lifetime,
            } => (lifetime, map(internal_port, None)),
            Op::Delete { internal_port } => (
                0,
                map(internal_port, self.outcome.mapping.map(|m| m.external)),
            ),
        };
        Request {
            lifetime,
            client_address: self.client_address,
            op,
            options: Vec::new(),
        }
    }

    /// The next datagram to send, from the PCP socket.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<PortMappingService>> {
        self.start_next(now);
        let (_, x) = self.pending.as_mut()?;
        let payload = x.due(now)?;
        self.outcome.requests_sent += 1;
        Some(Transmit {
            source: PortMappingService::Pcp,
            destination: self.server,
            payload,
        })
    }

    /// When the machine next needs [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(_, x)| x.timeout())
    }

    /// Gives up on a request whose budget ran out.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((op, x)) = &self.pending {
            if x.expired(now) {
                let op = *op;
                self.pending = None;
                self.no_answer(now, op, "no answer");
            }
        }
        self.start_next(now);
    }

    /// The server's port is closed (ICMP port unreachable): PCP is not served there.
    pub fn handle_unreachable(&mut self, now: Instant) {
        if let Some((op, _)) = self.pending.take() {
            self.no_answer(now, op, "port 5351 is closed");
        }
    }

    fn no_answer(&mut self, now: Instant, op: Op, why: &str) {
        self.clock.gave_up(now, &mut self.outcome);
        match op {
            Op::Announce => {
                if self.outcome.available.is_none() {
                    self.outcome.available = Some(false);
                }
                self.stopped = true;
                if why != "no answer" {
                    self.outcome
                        .problem(format!("PCP: {why} on {}", self.server.ip()));
                }
            }
            Op::Map { .. } => self.outcome.problem(format!("PCP: {why} to MAP")),
            Op::Delete { .. } => {
                self.outcome.deleted = Some(false);
                self.outcome
                    .problem(format!("PCP: {why} to the deletion of the mapping"));
            }
        }
    }

    fn start_next(&mut self, now: Instant) {
        if self.pending.is_some() || self.stopped {
            return;
        }
        if let Some(op) = self.queue.pop_front() {
            match self.request(op).encode() {
                Ok(bytes) => self.pending = Some((op, Exchange::new(now, bytes, self.schedule))),
                Err(e) => self
                    .outcome
                    .problem(format!("PCP: cannot encode a request: {e}")),
            }
        }
    }

    fn stop(&mut self, now: Instant, available: bool, problem: String) {
        self.pending = None;
        self.stopped = true;
        self.clock.gave_up(now, &mut self.outcome);
        self.outcome.available = Some(available);
        self.outcome.problem(problem);
    }

    /// A datagram that arrived on the PCP socket from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if from != self.server {
            self.outcome.problem(format!(
                "PCP: ignored a datagram from {from}, not the server {}",
                self.server
            ));
            return;
        }
        let Some((op, _)) = self.pending.clone() else {
            return;
        };
        let resp = match Response::parse(bytes) {
            Ok(r) => r,
            Err(pcp::Error::UnsupportedVersion(0)) if natpmp::Response::parse(bytes).is_ok() => {
                return self.stop(
                    now,
                    false,
                    "PCP: the gateway answered in NAT-PMP (version 0): it speaks NAT-PMP only"
                        .into(),
                );
            }
            Err(pcp::Error::UnsupportedVersion(v)) if bytes.len() >= 4 && bytes[1] & 0x80 != 0 => {
                return self.stop(
                    now,
                    false,
                    format!("PCP: the server speaks version {v} only (this client speaks 2)"),
                );
            }
            Err(e) => {
                self.outcome
                    .problem(format!("PCP: malformed answer ignored: {e}"));
                return;
            }
        };
        let wanted = match op {
            Op::Announce => pcp::OP_ANNOUNCE,
            _ => pcp::OP_MAP,
        };
        if resp.opcode() != wanted {
            self.outcome.problem(format!(
                "PCP: answer to opcode {} ignored while waiting for opcode {wanted}",
                resp.opcode()
            ));
            return;
        }
        let sent = self.request(op);
        if let (ResponseOp::Map(m), RequestOp::Map(r)) = (&resp.op, &sent.op) {
            if !m.answers(r) {
                self.outcome.problem(
                    "PCP: a MAP answer with another nonce, protocol or port was ignored (RFC 6887 §11.4)"
                        .into(),
                );
                return;
            }
        }
        self.pending = None;
        self.clock
            .answered(now, resp.epoch, &mut self.outcome, "PCP");
        if resp.result == ResultCode::UnsuppVersion {
            return self.stop(now, false, "PCP: the server refused version 2".into());
        }
        self.outcome.available = Some(true);
        if resp.result == ResultCode::AddressMismatch {
            self.outcome.address_mismatch = true;
            self.stopped = true;
            self.outcome.problem(format!(
                "PCP: ADDRESS_MISMATCH: the server saw another address than {}, so a NAT sits between this host and it",
                self.client_address
            ));
            return;
        }
        if resp.result != ResultCode::Success {
            if matches!(op, Op::Delete { .. }) {
                self.outcome.deleted = Some(false);
            }
            self.outcome.problem(format!(
                "PCP: the server refused {}: {} (for {} s)",
                match op {
                    Op::Announce => "ANNOUNCE",
                    Op::Map { .. } => "MAP",
                    Op::Delete { .. } => "the deletion",
                },
                result_words(resp.result),
                resp.lifetime
            ));
            return;
        }
        match (op, resp.op) {
            (Op::Delete { .. }, _) => {
                self.outcome.deleted = Some(true);
                self.outcome.mapping = None;
            }
            (Op::Map { internal_port, .. }, ResponseOp::Map(m)) => {
                let external = SocketAddr::new(
                    m.assigned_external_address.to_canonical(),
                    m.assigned_external_port,
                );
                if m.assigned_external_port == 0 || resp.lifetime == 0 {
                    self.outcome.problem(format!(
                        "PCP: a successful MAP answer granted port {} for {} s",
                        m.assigned_external_port, resp.lifetime
                    ));
                    return;
                }
                self.outcome.external_address = Some(external.ip());
                self.outcome.mapping = Some(GrantedMapping {
                    internal_port,
                    external,
                    lifetime_s: resp.lifetime,
                });
            }
            _ => {}
        }
    }
}

/// A PCP result code in words.
pub fn result_words(r: ResultCode) -> String {
    let name = match r {
        ResultCode::Success => "SUCCESS",
        ResultCode::UnsuppVersion => "UNSUPP_VERSION",
        ResultCode::NotAuthorized => "NOT_AUTHORIZED",
        ResultCode::MalformedRequest => "MALFORMED_REQUEST",
        ResultCode::UnsuppOpcode => "UNSUPP_OPCODE",
        ResultCode::UnsuppOption => "UNSUPP_OPTION",
        ResultCode::MalformedOption => "MALFORMED_OPTION",
        ResultCode::NetworkFailure => "NETWORK_FAILURE",
        ResultCode::NoResources => "NO_RESOURCES",
        ResultCode::UnsuppProtocol => "UNSUPP_PROTOCOL",
        ResultCode::UserExQuota => "USER_EX_QUOTA",
        ResultCode::CannotProvideExternal => "CANNOT_PROVIDE_EXTERNAL",
        ResultCode::AddressMismatch => "ADDRESS_MISMATCH",
        ResultCode::ExcessiveRemotePeers => "EXCESSIVE_REMOTE_PEERS",
        ResultCode::Other(c) => return format!("result code {c}"),
    };
    format!("{name} ({})", r.code())
}
