//! TCP mapping behavior (RFC 5382 §4.1, in RFC 4787 terms) over STUN-over-TCP.
//!
//! The UDP procedure of RFC 5780 §4.3 carried over to TCP: one local port X, bound with
//! SO_REUSEADDR and SO_REUSEPORT so that several outgoing connections share it (each is its own
//! 4-tuple), connects to A1:P1, A2:P1 and A2:P2 in turn and does one Binding on each (RFC 8489
//! §6.2.2 framing). The three mapped addresses M1, M2, M3 are compared exactly as the UDP engine
//! compares them ([`classify`], pure and table-tested); the thin tokio driver is
//! `natscope_probes::probe::tcp::tcp_mapping`.
//! Every connection stays open until the last answer — a NAT may drop a TCP mapping once its
//! connection closes (RFC 5382 §5), which would make an endpoint-independent NAT look dependent —
//! and is closed before the driver returns. Each step is bounded by the caller's timeout. Each
//! Binding is a new STUN transaction and waits for a slot of the run's
//! [`Pacer`](super::pacing::Pacer) (RFC 5780 §5)
//! before its connection is opened.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::report::{compare_mappings, Behavior, ProbeReport, TestReport};
use crate::client::BindingResponse;

/// The row name this test adds to the report's `tests`.
pub const TEST_NAME: &str = "tcp mapping";

/// The result of the TCP mapping test, with the evidence behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// An empty result for a run against `server`: every field unknown until [`Self::conclude`].
    pub fn new(server: SocketAddr) -> Self {
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
            answers: None,
            miss_chance: None,
        }
    }

    /// Records this result in `report`: `tcp_mapping`, a `tcp mapping` row and the request total.
    pub fn apply_to(&self, report: &mut ProbeReport) {
        report.tcp_mapping = self.behavior;
        report.tcp_port_preservation = self.port_preserved;
        report.tests.push(self.test_row());
        report.requests_sent += self.requests_sent;
    }

    /// Draws the verdict from the mapped addresses gathered so far: the RFC 5780 §4.3 comparison
    /// ([`classify`]) and port preservation. `failure` is the first step's failure, if any; it
    /// takes precedence over the classifier's own note as the reason.
    pub fn conclude(&mut self, failure: Option<String>) {
        let (behavior, note) = classify(self.local_address, self.m1, self.m2, self.m3);
        self.behavior = behavior;
        self.reason = match (failure, note) {
            (Some(f), _) => Some(f),
            (None, "") => None,
            (None, n) => Some(n.to_string()),
        };
        let port = self.local_address.map(|l| l.port());
        let seen: Vec<u16> = [self.m1, self.m2, self.m3]
            .into_iter()
            .flatten()
            .map(|m| m.port())
            .collect();
        self.port_preserved = match (port, seen.is_empty()) {
            (Some(x), false) => Some(seen.iter().all(|&p| p == x)),
            _ => None,
        };
    }
}

/// Classifies from the three mapped addresses exactly as the UDP engine does (RFC 5780 §4.3,
/// `report::compare_mappings`): M2 == M1 → endpoint-independent; else M3 == M2 → address-dependent; else
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
pub fn usable_other(server: SocketAddr, other: Option<SocketAddr>) -> Result<SocketAddr, String> {
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

/// The answer counts only as a success from the address we connected to.
pub fn check_answer(to: SocketAddr, r: BindingResponse) -> Result<BindingResponse, String> {
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
