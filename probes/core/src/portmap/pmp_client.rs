//! The NAT-PMP (RFC 6886) client machine, sans-IO: asks the gateway for its external address, and
//! optionally for a UDP mapping, which [`NatPmpClient::delete`] removes again.
//!
//! Requests go one at a time to the gateway's port 5351 on the [`Retransmit`] schedule. An answer
//! is accepted only from the gateway's address and port (RFC 6886 §3.1: anything else is ignored),
//! only for the request in flight, and only when it parses; everything else is a problem line and
//! the machine keeps waiting. A PCP answer (version 2) or NAT-PMP's Unsupported Version means the
//! gateway does not speak NAT-PMP. Each accepted answer's epoch is checked against the last
//! (RFC 6886 §3.6).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::exchange::{Clock, Exchange, GrantedMapping, Outcome, Retransmit};
use super::natpmp::{self, Request, Response, ResultCode};
use super::{pcp, MapProtocol, PortMappingService};
use crate::net::Transmit;

/// Asks a gateway over NAT-PMP. See the module comment.
#[derive(Clone, Debug)]
pub struct NatPmpClient {
    server: SocketAddr,
    schedule: Retransmit,
    queue: VecDeque<Request>,
    pending: Option<(Request, Exchange)>,
    clock: Clock,
    outcome: Outcome,
    /// The gateway answered in another protocol or said it does not speak this one: stop.
    refused: bool,
}

impl NatPmpClient {
    /// A client that asks `gateway` for its external address, then (with `map`: internal port,
    /// lifetime in seconds) for a UDP mapping.
    pub fn new(
        now: Instant,
        gateway: IpAddr,
        schedule: Retransmit,
        map: Option<(u16, u32)>,
    ) -> Self {
        let mut queue = VecDeque::from([Request::ExternalAddress]);
        if let Some((internal_port, lifetime)) = map {
            queue.push_back(Request::Map {
                protocol: MapProtocol::Udp,
                internal_port,
                suggested_external_port: internal_port,
                lifetime,
            });
        }
        Self {
            server: SocketAddr::new(gateway, natpmp::SERVER_PORT),
            schedule,
            queue,
            pending: None,
            clock: Clock::new(now),
            outcome: Outcome::default(),
            refused: false,
        }
    }

    /// Deletes the granted mapping (a map request with lifetime 0, RFC 6886 §3.4), on `schedule`.
    /// Does nothing without a mapping.
    pub fn delete(&mut self, now: Instant, schedule: Retransmit) {
        let Some(m) = self.outcome.mapping else {
            return;
        };
        self.schedule = schedule;
        self.queue.push_back(Request::Map {
            protocol: MapProtocol::Udp,
            internal_port: m.internal_port,
            suggested_external_port: 0,
            lifetime: 0,
        });
        self.handle_timeout(now);
    }

    /// The gateway's port 5351.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// What the client learned so far.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// No request left to send or wait for.
    pub fn is_done(&self) -> bool {
        self.pending.is_none() && (self.queue.is_empty() || self.refused)
    }

    /// The next datagram to send, from the NAT-PMP socket.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<PortMappingService>> {
        self.start_next(now);
        let (_, x) = self.pending.as_mut()?;
        let payload = x.due(now)?;
        self.outcome.requests_sent += 1;
        Some(Transmit {
            source: PortMappingService::NatPmp,
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
        if let Some((req, x)) = &self.pending {
            if x.expired(now) {
                let req = *req;
                self.pending = None;
                self.no_answer(now, req, "no answer");
            }
        }
        self.start_next(now);
    }

    /// The gateway's port is closed (an ICMP port unreachable, seen by the driver as a refused
    /// send or receive): NAT-PMP is not served there.
    pub fn handle_unreachable(&mut self, now: Instant) {
        if let Some((req, _)) = self.pending.take() {
            self.no_answer(now, req, "port 5351 is closed");
        }
    }

    fn no_answer(&mut self, now: Instant, req: Request, why: &str) {
        self.clock.gave_up(now, &mut self.outcome);
        match req {
            Request::ExternalAddress => {
                if self.outcome.available.is_none() {
                    self.outcome.available = Some(false);
                }
                // Without an answer to the first request nothing else is worth asking.
                self.refused = true;
                if why != "no answer" {
                    self.outcome
                        .problem(format!("NAT-PMP: {why} on {}", self.server.ip()));
                }
            }
            Request::Map { lifetime: 0, .. } => {
                self.outcome.deleted = Some(false);
                self.outcome
                    .problem(format!("NAT-PMP: {why} to the deletion of the mapping"));
            }
            Request::Map { .. } => self
                .outcome
                .problem(format!("NAT-PMP: {why} to the map request")),
        }
    }

    fn start_next(&mut self, now: Instant) {
        if self.pending.is_some() || self.refused {
            return;
        }
        if let Some(req) = self.queue.pop_front() {
            self.pending = Some((req, Exchange::new(now, req.encode(), self.schedule)));
        }
    }

    /// A datagram that arrived on the NAT-PMP socket from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if from != self.server {
            self.outcome.problem(format!(
                "NAT-PMP: ignored a datagram from {from}, not the gateway {}",
                self.server
            ));
            return;
        }
        let Some((req, _)) = self.pending else {
            return; // A late duplicate.
        };
        let resp = match Response::parse(bytes) {
            Ok(r) => r,
            Err(e) => {
                if pcp::Response::parse(bytes).is_ok()
                    || matches!(e, natpmp::Error::UnsupportedVersion(2))
                {
                    self.pending = None;
                    self.refused = true;
                    self.clock.gave_up(now, &mut self.outcome);
                    self.outcome.available = Some(false);
                    self.outcome.problem(
                        "NAT-PMP: the gateway answered in PCP (version 2): it speaks PCP only"
                            .into(),
                    );
                } else {
                    self.outcome
                        .problem(format!("NAT-PMP: malformed answer ignored: {e}"));
                }
                return;
            }
        };
        if resp.opcode() != req.opcode() {
            self.outcome.problem(format!(
                "NAT-PMP: answer to opcode {} ignored while waiting for opcode {}",
                resp.opcode(),
                req.opcode()
            ));
            return;
        }
        self.pending = None;
        self.clock
            .answered(now, resp.epoch(), &mut self.outcome, "NAT-PMP");
        if resp.result() == ResultCode::UnsupportedVersion {
            self.refused = true;
            self.outcome.available = Some(false);
            self.outcome
                .problem("NAT-PMP: the gateway refused version 0 (Unsupported Version)".into());
            return;
        }
        self.outcome.available = Some(true);
        if resp.result() != ResultCode::Success {
            let what = match req {
                Request::ExternalAddress => "the external-address request",
                Request::Map { lifetime: 0, .. } => "the deletion",
                Request::Map { .. } => "the map request",
            };
            self.outcome.problem(format!(
                "NAT-PMP: the gateway refused {what}: {}",
                result_words(resp.result())
            ));
            if req.is_delete() {
                self.outcome.deleted = Some(false);
            }
            return;
        }
        match (req, resp) {
            (Request::ExternalAddress, Response::ExternalAddress { address, .. }) => {
                self.outcome.external_address = Some(IpAddr::V4(address));
            }
            (Request::Map { lifetime: 0, .. }, _) => {
                self.outcome.deleted = Some(true);
                self.outcome.mapping = None;
            }
            (
                Request::Map { internal_port, .. },
                Response::Map {
                    internal_port: echoed,
                    external_port,
                    lifetime,
                    ..
                },
            ) => {
                if echoed != internal_port || external_port == 0 || lifetime == 0 {
                    self.outcome.problem(format!(
                        "NAT-PMP: map answer for internal port {echoed}, external port {external_port}, lifetime {lifetime} s does not grant the request for port {internal_port}"
                    ));
                    return;
                }
                // RFC 6886 §3.3: the mapping's address is the gateway's external address.
                match self.outcome.external_address {
                    Some(ip) => {
                        self.outcome.mapping = Some(GrantedMapping {
                            internal_port,
                            external: SocketAddr::new(ip, external_port),
                            lifetime_s: lifetime,
                        })
                    }
                    None => self.outcome.problem(
                        "NAT-PMP: a mapping was granted but the external address is unknown".into(),
                    ),
                }
            }
            _ => {}
        }
    }
}

/// A NAT-PMP result code in words.
pub fn result_words(r: ResultCode) -> String {
    match r {
        ResultCode::Success => "success".into(),
        ResultCode::UnsupportedVersion => "unsupported version (1)".into(),
        ResultCode::NotAuthorized => "not authorized or refused (2)".into(),
        ResultCode::NetworkFailure => "network failure (3)".into(),
        ResultCode::OutOfResources => "out of resources (4)".into(),
        ResultCode::UnsupportedOpcode => "unsupported opcode (5)".into(),
        ResultCode::Other(c) => format!("result code {c}"),
    }
}
