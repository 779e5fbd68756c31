//! TCP mapping behavior (RFC 5382 §4.1, in RFC 4787 terms) over STUN-over-TCP.
//!
//! The UDP procedure of RFC 5780 §4.3 carried over to TCP: one local port X, bound with
//! SO_REUSEADDR and SO_REUSEPORT so that several outgoing connections share it (each is its own
//! 4-tuple), connects to A1:P1, A2:P1 and A2:P2 in turn and does one Binding on each (RFC 8489
//! §6.2.2 framing). The three mapped addresses M1, M2, M3 are compared exactly as the UDP engine
//! compares them ([`classify`], pure and table-tested); [`tcp_mapping`] is the thin tokio driver.
//! Every connection stays open until the last answer — a NAT may drop a TCP mapping once its
//! connection closes (RFC 5382 §5), which would make an endpoint-independent NAT look dependent —
//! and is closed before the driver returns. Each step is bounded by the caller's timeout. Each
//! Binding is a new STUN transaction and waits for a slot of the run's [`Pacer`] (RFC 5780 §5)
//! before its connection is opened.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::pacing::Pacer;
use super::plan::compare_mappings;
use super::report::{Behavior, ProbeReport, TestReport};
use crate::client::{transact_tcp, BindingResponse, RequestOptions};
use crate::stun::TransactionId;

/// The row name this test adds to the report's `tests`.
pub const TEST_NAME: &str = "tcp mapping";

/// The result of the TCP mapping test, with the evidence behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpMappingResult {
    /// RFC 4787 / RFC 5382 mapping behavior; `unknown` when a needed answer is missing.
    pub behavior: Behavior,
    /// The server's primary address A1:P1.
    pub server: SocketAddr,
    /// OTHER-ADDRESS (A2:P2) from the first answer.
    pub other_address: Option<SocketAddr>,
    /// The local address ip:X every connection was made from; `None` if no socket was bound.
    pub local_address: Option<SocketAddr>,
    /// Mapped address seen by A1:P1 (test I).
    pub m1: Option<SocketAddr>,
    /// Mapped address seen by A2:P1 (test II).
    pub m2: Option<SocketAddr>,
    /// Mapped address seen by A2:P2 (test III).
    pub m3: Option<SocketAddr>,
    /// `Some(true)` when every mapped address kept the local port X; `None` without an answer.
    pub port_preserved: Option<bool>,
    /// Why a step failed (connect refused or timed out, no OTHER-ADDRESS, a wrong
    /// RESPONSE-ORIGIN, ...). A failure of test III after M2 == M1 does not change the verdict.
    pub reason: Option<String>,
    /// Binding requests written (one per connection that opened).
    pub requests_sent: u32,
    pub duration_ms: f64,
}

impl TcpMappingResult {
    fn new(server: SocketAddr) -> Self {
        Self {
            behavior: Behavior::Unknown,
            server,
            other_address: None,
            local_address: None,
            m1: None,
            m2: None,
            m3: None,
            port_preserved: None,
            reason: None,
            requests_sent: 0,
            duration_ms: 0.0,
        }
    }

    /// The row this test adds to the report's `tests`.
    pub fn test_row(&self) -> TestReport {
        let show = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        let from = self
            .local_address
            .map_or_else(String::new, |l| format!("from {l}: "));
        let mut evidence = format!(
            "{from}via A1:P1 {}, via A2:P1 {}, via A2:P2 {}",
            show(self.m1),
            show(self.m2),
            show(self.m3)
        );
        if let (Some(local), Some(m1)) = (self.local_address, self.m1) {
            evidence.push_str(if local == m1 { "; no nat" } else { "; nat" });
        }
        match self.port_preserved {
            Some(true) => evidence.push_str("; local port preserved"),
            Some(false) => evidence.push_str("; local port not preserved"),
            None => {}
        }
        if let Some(r) = &self.reason {
            evidence.push_str("; ");
            evidence.push_str(r);
        }
        TestReport {
            name: TEST_NAME.into(),
            verdict: self.behavior.short().into(),
            evidence,
            requests_sent: self.requests_sent,
            duration_ms: self.duration_ms,
        }
    }

    /// Records this result in `report`: `tcp_mapping`, a `tcp mapping` row and the request total.
    pub fn apply_to(&self, report: &mut ProbeReport) {
        report.tcp_mapping = self.behavior;
        report.tcp_port_preservation = self.port_preserved;
        report.tests.push(self.test_row());
        report.requests_sent += self.requests_sent;
    }
}

/// Classifies from the three mapped addresses exactly as the UDP engine does (RFC 5780 §4.3,
/// `plan::compare_mappings`): M2 == M1 → endpoint-independent; else M3 == M2 → address-dependent; else
/// address-and-port-dependent. Without a NAT (M1 == `local`) the identity mapping counts as
/// endpoint-independent (RFC 4787) once A2:P1 confirmed it. Unlike over UDP, a missing M2 is never
/// read as "no NAT, so identity": over TCP it is a refused or timed-out connection, a failure to
/// report. Missing or self-contradicting answers give `unknown`; the string says why (empty for a
/// clean verdict).
pub fn classify(
    local: Option<SocketAddr>,
    m1: Option<SocketAddr>,
    m2: Option<SocketAddr>,
    m3: Option<SocketAddr>,
) -> (Behavior, &'static str) {
    let Some(m1) = m1 else {
        return (Behavior::Unknown, "no mapped address from A1:P1");
    };
    if local == Some(m1) {
        return match m2 {
            Some(m2) if m2 == m1 => (Behavior::EndpointIndependent, ""),
            Some(_) => (Behavior::Unknown, "mapped address changed without a nat"),
            None => (Behavior::Unknown, "the alternate address did not answer"),
        };
    }
    compare_mappings(m1, m2, m3)
}

/// Checks OTHER-ADDRESS is a usable alternate for `server` (RFC 5780 §4.3 needs a different IP
/// and a different port). Returns the reason when it is not.
fn usable_other(server: SocketAddr, other: Option<SocketAddr>) -> Result<SocketAddr, String> {
    let Some(o) = other else {
        return Err(format!(
            "{server} sent no OTHER-ADDRESS: the test needs an RFC 5780 server with a second address"
        ));
    };
    if o.is_ipv4() != server.is_ipv4() {
        return Err(format!(
            "OTHER-ADDRESS {o} is of another address family than {server}"
        ));
    }
    if o.ip() == server.ip() {
        return Err(format!("OTHER-ADDRESS {o} shares the primary's ip"));
    }
    if o.port() == server.port() {
        return Err(format!("OTHER-ADDRESS {o} shares the primary's port"));
    }
    Ok(o)
}

/// A TCP socket bound to `local` with SO_REUSEADDR and SO_REUSEPORT set before the bind, so the
/// next connection can leave from the same ip:port.
fn bind_shared(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let s = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    Ok(TcpSocket::from_std_stream(s.into()))
}

/// One step: connect from `local` to `to` and do one Binding. Returns the connection (to keep the
/// mapping alive) with the answer's mapped address, or why the step failed. `sent` counts the
/// request when one was written.
async fn step(
    local: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
    sent: &mut u32,
    pacer: &mut Pacer,
) -> (
    Option<TcpStream>,
    Result<(SocketAddr, BindingResponse), String>,
) {
    if let Some(slot) = pacer.next_start() {
        tokio::time::sleep_until(slot.into()).await;
    }
    let sock = match bind_shared(local) {
        Ok(s) => s,
        Err(e) => return (None, Err(format!("cannot bind tcp {local}: {e}"))),
    };
    let mut stream = match tokio::time::timeout(timeout, sock.connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (None, Err(format!("cannot connect to {to}: {e}"))),
        Err(_) => {
            return (
                None,
                Err(format!(
                    "connect to {to} timed out after {} ms",
                    timeout.as_millis()
                )),
            )
        }
    };
    let _ = stream.set_nodelay(true);
    let from = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => return (Some(stream), Err(format!("no local address: {e}"))),
    };
    let opts = RequestOptions {
        fingerprint: true,
        ..Default::default()
    };
    *sent += 1;
    // Recorded when the request leaves, not when the slot was granted: never earlier than allowed.
    pacer.started(Instant::now());
    let answer = transact_tcp(&mut stream, TransactionId::random(), &opts, timeout).await;
    let outcome = match answer {
        Err(e) => Err(format!("{to}: {e}")),
        Ok(r) => check_answer(to, r).map(|r| (from, r)),
    };
    (Some(stream), outcome)
}

/// The answer counts only as a success from the address we connected to.
fn check_answer(to: SocketAddr, r: BindingResponse) -> Result<BindingResponse, String> {
    if let Some(code) = r.error_code {
        return Err(format!(
            "{to} answered with error {code} {:?}",
            r.error_reason.as_deref().unwrap_or("")
        ));
    }
    if let Some(o) = r.response_origin {
        if o != to {
            return Err(format!(
                "RESPONSE-ORIGIN {o} is not {to}, the address connected to"
            ));
        }
    }
    if r.reflexive().is_none() {
        return Err(format!("the answer from {to} has no mapped address"));
    }
    Ok(r)
}

/// Runs the TCP mapping test against `server` (A1:P1) from `local_ip`, not paced. At most three
/// connections, each step (connect, then the Binding) bounded by `timeout`; every connection is
/// closed before this returns. Never fails: problems end up in `reason` with `unknown`.
pub async fn tcp_mapping(
    server: SocketAddr,
    local_ip: IpAddr,
    timeout: Duration,
) -> TcpMappingResult {
    tcp_mapping_paced(server, local_ip, timeout, &mut Pacer::unpaced()).await
}

/// [`tcp_mapping`] with each Binding started only when `pacer` has a slot (the wait is not part
/// of any step's `timeout`); the starts are recorded in `pacer` for the run's next test.
pub async fn tcp_mapping_paced(
    server: SocketAddr,
    local_ip: IpAddr,
    timeout: Duration,
    pacer: &mut Pacer,
) -> TcpMappingResult {
    let start = Instant::now();
    let mut out = TcpMappingResult::new(server);
    let mut streams: Vec<TcpStream> = Vec::with_capacity(3);
    let mut sent = 0u32;
    let failure = run_steps(&mut out, &mut streams, local_ip, timeout, &mut sent, pacer).await;
    for s in &mut streams {
        // A FIN each; a peer that does not take it within the bound is cut off by the drop.
        let _ = tokio::time::timeout(timeout, s.shutdown()).await;
    }
    drop(streams);
    out.requests_sent = sent;
    let (behavior, note) = classify(out.local_address, out.m1, out.m2, out.m3);
    out.behavior = behavior;
    out.reason = match (failure, note) {
        (Some(f), _) => Some(f),
        (None, "") => None,
        (None, n) => Some(n.to_string()),
    };
    let port = out.local_address.map(|l| l.port());
    let seen: Vec<u16> = [out.m1, out.m2, out.m3]
        .into_iter()
        .flatten()
        .map(|m| m.port())
        .collect();
    out.port_preserved = match (port, seen.is_empty()) {
        (Some(x), false) => Some(seen.iter().all(|&p| p == x)),
        _ => None,
    };
    out.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    out
}

/// Tests I, II, III in order; returns the first failure's reason. Test II failing stops the run
/// (without M2 nothing can be concluded); test III runs whatever M2 was, for the evidence.
async fn run_steps(
    out: &mut TcpMappingResult,
    streams: &mut Vec<TcpStream>,
    local_ip: IpAddr,
    timeout: Duration,
    sent: &mut u32,
    pacer: &mut Pacer,
) -> Option<String> {
    let server = out.server;
    // Test I from an ephemeral port: that port becomes X for the other two.
    let (s, r) = step(SocketAddr::new(local_ip, 0), server, timeout, sent, pacer).await;
    streams.extend(s);
    let (local, first) = match r {
        Ok(v) => v,
        Err(why) => return Some(why),
    };
    out.local_address = Some(local);
    out.m1 = first.reflexive();
    out.other_address = first.other_address;
    let other = match usable_other(server, first.other_address) {
        Ok(o) => o,
        Err(why) => return Some(why),
    };
    let a2p1 = SocketAddr::new(other.ip(), server.port());
    let (s, r) = step(local, a2p1, timeout, sent, pacer).await;
    streams.extend(s);
    match r {
        Ok((_, a)) => out.m2 = a.reflexive(),
        Err(why) => return Some(why),
    }
    let (s, r) = step(local, other, timeout, sent, pacer).await;
    streams.extend(s);
    match r {
        Ok((_, a)) => {
            out.m3 = a.reflexive();
            None
        }
        Err(why) => Some(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Behavior::*;

    fn a(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("test address"))
    }

    #[test]
    fn classification_follows_rfc5780_section_4_3() {
        let local = a("10.0.0.2:40000");
        let m = a("198.51.100.7:40000");
        let rows = [
            // (m1, m2, m3, expected)
            (m, m, m, EndpointIndependent),
            (
                m,
                a("198.51.100.7:40001"),
                a("198.51.100.7:40001"),
                AddressDependent,
            ),
            (
                m,
                a("198.51.100.7:40001"),
                a("198.51.100.7:40002"),
                AddressAndPortDependent,
            ),
            (
                m,
                a("198.51.100.8:50000"),
                a("198.51.100.8:50001"),
                AddressAndPortDependent,
            ),
            (m, m, a("198.51.100.7:40009"), Unknown),
            (m, a("198.51.100.7:40001"), m, Unknown),
            (m, None, None, Unknown),
            (m, a("198.51.100.7:40001"), None, Unknown),
            (m, m, None, Unknown),
            (None, None, None, Unknown),
            // No NAT: the identity mapping is endpoint-independent.
            (local, local, local, EndpointIndependent),
            (local, local, None, EndpointIndependent),
            (local, None, None, Unknown),
            (local, a("10.0.0.2:40001"), local, Unknown),
        ];
        for (m1, m2, m3, want) in rows {
            assert_eq!(classify(local, m1, m2, m3).0, want, "{m1:?} {m2:?} {m3:?}");
        }
    }

    #[test]
    fn other_address_must_differ_in_ip_and_port() {
        let s: SocketAddr = "127.0.0.1:3478".parse().expect("addr");
        assert!(usable_other(s, None)
            .unwrap_err()
            .contains("no OTHER-ADDRESS"));
        assert!(usable_other(s, a("127.0.0.1:3479")).is_err());
        assert!(usable_other(s, a("127.0.0.2:3478")).is_err());
        assert!(usable_other(s, a("[::1]:3479")).is_err());
        assert_eq!(
            usable_other(s, a("127.0.0.2:3479")),
            Ok(a("127.0.0.2:3479").expect("addr"))
        );
    }

    #[test]
    fn answers_must_name_the_address_connected_to() {
        let to: SocketAddr = "127.0.0.2:3478".parse().expect("addr");
        let good = BindingResponse {
            xor_mapped: a("127.0.0.1:40000"),
            response_origin: Some(to),
            ..Default::default()
        };
        assert!(check_answer(to, good.clone()).is_ok());
        let wrong = BindingResponse {
            response_origin: a("127.0.0.1:3478"),
            ..good.clone()
        };
        assert!(check_answer(to, wrong)
            .unwrap_err()
            .contains("RESPONSE-ORIGIN"));
        let error = BindingResponse {
            error_code: Some(400),
            ..good.clone()
        };
        assert!(check_answer(to, error).is_err());
        let empty = BindingResponse {
            response_origin: Some(to),
            ..Default::default()
        };
        assert!(check_answer(to, empty).is_err());
    }

    #[test]
    fn row_carries_verdict_and_evidence() {
        let mut r = TcpMappingResult::new("127.0.0.1:3478".parse().expect("addr"));
        r.local_address = a("127.0.0.1:40000");
        r.m1 = a("127.0.0.1:40000");
        r.m2 = r.m1;
        r.m3 = r.m1;
        r.behavior = EndpointIndependent;
        r.port_preserved = Some(true);
        r.requests_sent = 3;
        let row = r.test_row();
        assert_eq!(row.name, "tcp mapping");
        assert_eq!(row.verdict, "endpoint-independent");
        assert_eq!(
            row.evidence,
            "from 127.0.0.1:40000: via A1:P1 127.0.0.1:40000, via A2:P1 127.0.0.1:40000, via A2:P2 \
             127.0.0.1:40000; no nat; local port preserved"
        );
        assert_eq!(row.requests_sent, 3);
    }
}
