//! The client side of one Binding transaction.
//!
//! [`build_request`] writes a request with any RFC 5780 options; [`BindingResponse::parse`] reads
//! an answer into a typed view that keeps everything a NAT diagnosis needs as evidence (both mapped
//! addresses, RESPONSE-ORIGIN, OTHER-ADDRESS, the classic RFC 3489 attributes, the real source).
//! [`Transaction`] is the sans-IO retransmission state machine (RFC 8489 §6.2.1) — it takes `now`
//! and never sleeps; `natscope_probes::client::{transact_udp, transact_tcp}` are its thin tokio
//! drivers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::stun::{
    attr, attr_type, ChangeRequest, Class, EncodeError, Message, MessageType, MessageWriter,
    TransactionId, METHOD_BINDING,
};
use serde::Serialize;

/// Options for one Binding request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestOptions {
    pub change: ChangeRequest,
    pub response_port: Option<u16>,
    pub padding: Option<usize>,
    pub fingerprint: bool,
}

/// Writes a Binding request into `buf`; returns its length.
pub fn build_request(
    buf: &mut [u8],
    tid: &TransactionId,
    opts: &RequestOptions,
) -> Result<usize, EncodeError> {
    let mut w = MessageWriter::new(buf, MessageType::BINDING_REQUEST, tid)?;
    if !opts.change.is_none() {
        w.add_change_request(opts.change)?;
    }
    if let Some(p) = opts.response_port {
        w.add_response_port(p)?;
    }
    if let Some(n) = opts.padding {
        w.add_padding(n)?;
    }
    if opts.fingerprint && tid.has_magic_cookie() {
        w.finish_with_fingerprint()
    } else {
        Ok(w.finish())
    }
}

/// Why a datagram is not the answer we wait for, or the answer is an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("not stun: {0}")]
    Parse(#[from] crate::stun::ParseError),
    #[error("transaction id does not match")]
    WrongTransaction,
    #[error("not a binding response")]
    NotBindingResponse,
    #[error("attribute {typ:#06x} unreadable: {err}")]
    BadAttribute { typ: u16, err: attr::AttrError },
}

/// Everything an answer says, plus where it really came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BindingResponse {
    /// The transport address the answer arrived from (not what it claims).
    pub source: Option<SocketAddr>,
    pub xor_mapped: Option<SocketAddr>,
    pub mapped: Option<SocketAddr>,
    pub response_origin: Option<SocketAddr>,
    pub other_address: Option<SocketAddr>,
    /// RFC 3489 SOURCE-ADDRESS.
    pub source_address: Option<SocketAddr>,
    /// RFC 3489 CHANGED-ADDRESS.
    pub changed_address: Option<SocketAddr>,
    /// Peer text, kept as received (lossy UTF-8); escape before printing to a terminal.
    pub software: Option<String>,
    /// ERROR-CODE for error responses.
    pub error_code: Option<u16>,
    pub error_reason: Option<String>,
    pub unknown_attributes: Vec<u16>,
    pub padding_len: Option<usize>,
    /// `None`: no FINGERPRINT; else whether it checked out.
    pub fingerprint_ok: Option<bool>,
    pub classic: bool,
}

impl BindingResponse {
    /// Parses an answer to `tid`. Errors for anything that is not that answer.
    pub fn parse(
        bytes: &[u8],
        tid: &TransactionId,
        source: Option<SocketAddr>,
    ) -> Result<Self, ResponseError> {
        let msg = Message::parse(bytes)?;
        if msg.transaction_id() != *tid {
            return Err(ResponseError::WrongTransaction);
        }
        let mt = msg.message_type();
        if mt.method != METHOD_BINDING
            || !matches!(mt.class, Class::SuccessResponse | Class::ErrorResponse)
        {
            return Err(ResponseError::NotBindingResponse);
        }
        let mut r = BindingResponse {
            source,
            classic: !msg.is_rfc8489(),
            fingerprint_ok: msg.fingerprint_valid(),
            ..Default::default()
        };
        let bad = |typ: u16| move |err| ResponseError::BadAttribute { typ, err };
        // RFC 8489 §14: of repeated attributes only the first counts.
        let mut seen_unknown = false;
        for a in msg.attributes() {
            let slot = match a.typ {
                attr_type::XOR_MAPPED_ADDRESS => {
                    if r.xor_mapped.is_none() {
                        r.xor_mapped = Some(
                            attr::decode_xor_address(a.value, &msg.transaction_id())
                                .map_err(bad(a.typ))?,
                        );
                    }
                    continue;
                }
                attr_type::MAPPED_ADDRESS => &mut r.mapped,
                attr_type::RESPONSE_ORIGIN => &mut r.response_origin,
                attr_type::OTHER_ADDRESS => &mut r.other_address,
                attr_type::SOURCE_ADDRESS => &mut r.source_address,
                attr_type::CHANGED_ADDRESS => &mut r.changed_address,
                attr_type::SOFTWARE if r.software.is_none() => {
                    r.software = Some(String::from_utf8_lossy(a.value).into_owned());
                    continue;
                }
                attr_type::ERROR_CODE if r.error_code.is_none() => {
                    let e = attr::ErrorCode::decode(a.value).map_err(bad(a.typ))?;
                    r.error_code = Some(e.code);
                    r.error_reason = Some(String::from_utf8_lossy(e.reason).into_owned());
                    continue;
                }
                attr_type::UNKNOWN_ATTRIBUTES if !seen_unknown => {
                    seen_unknown = true;
                    r.unknown_attributes = attr::decode_unknown_attributes(a.value).collect();
                    continue;
                }
                attr_type::PADDING if r.padding_len.is_none() => {
                    r.padding_len = Some(a.value.len());
                    continue;
                }
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(attr::decode_address(a.value).map_err(bad(a.typ))?);
            }
        }
        Ok(r)
    }

    /// The mapped address a client should believe: XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS.
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.xor_mapped.or(self.mapped)
    }

    /// RFC 5780 §3.6: MAPPED and XOR-MAPPED disagree when something on the path rewrote the
    /// payload (an ALG). `None` when the answer did not carry both.
    pub fn alg_rewrite(&self) -> Option<bool> {
        Some(self.mapped? != self.xor_mapped?)
    }
}

/// RFC 8489 §6.2.1 retransmission parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rto {
    /// First retransmission timeout (RFC 8489: 500 ms default on the internet).
    pub initial: Duration,
    /// Rc: total transmissions.
    pub max_transmits: u32,
    /// Rm: the wait after the last transmission is `initial * last_wait_multiplier`.
    pub last_wait_multiplier: u32,
    /// Cap on any single wait.
    pub max_rto: Duration,
}

impl Default for Rto {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max_transmits: 7,
            last_wait_multiplier: 16,
            max_rto: Duration::from_secs(8),
        }
    }
}

impl Rto {
    /// Total time a transaction waits before it gives up (the retry budget).
    pub fn budget(&self) -> Duration {
        let mut total = Duration::ZERO;
        let mut rto = self.initial;
        for _ in 1..self.max_transmits {
            total += rto;
            rto = (rto * 2).min(self.max_rto);
        }
        total + (self.initial * self.last_wait_multiplier).min(self.max_rto * 2)
    }
}

/// Which transport address an answer must come from to end a [`Transaction`].
///
/// A NAT diagnosis is only as good as its sources: an answer to a plain request that arrives from
/// elsewhere than the server (a second reflector, a spoofer, a NAT that rewrote the source) says
/// nothing about the mapping the server saw, so it must not end the wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerFrom {
    /// Only from this address: the server the request went to.
    Exactly(SocketAddr),
    /// From anywhere: a CHANGE-REQUEST asks the server to answer from an address the client may
    /// not know yet (RFC 5780 §7.2), and RESPONSE-PORT sends the answer to another port. The real
    /// source stays in [`BindingResponse::source`] for the caller to judge.
    Any,
}

impl AnswerFrom {
    /// What a request with `opts` sent to `server` may be answered from: the server itself,
    /// unless CHANGE-REQUEST asks for another source address or port.
    pub fn for_request(server: SocketAddr, opts: &RequestOptions) -> Self {
        if opts.change.is_none() {
            Self::Exactly(server)
        } else {
            Self::Any
        }
    }

    fn accepts(&self, from: SocketAddr) -> bool {
        match self {
            Self::Exactly(expected) => *expected == from,
            Self::Any => true,
        }
    }
}

/// What the state machine wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransactionEvent {
    /// Still waiting.
    Pending,
    /// Got the answer.
    Done(Box<BindingResponse>),
    /// The budget ran out with no answer from the expected source. `wrong_source` is the last
    /// address that sent a valid answer to this transaction instead (evidence for the caller).
    TimedOut {
        transmits: u32,
        wrong_source: Option<SocketAddr>,
    },
}

/// One request's retransmission schedule and answer matching, without I/O.
#[derive(Clone, Debug)]
pub struct Transaction {
    tid: TransactionId,
    from: AnswerFrom,
    rto: Rto,
    transmits: u32,
    next: Instant,
    current_rto: Duration,
    wrong_source: Option<SocketAddr>,
    result: Option<TransactionEvent>,
}

impl Transaction {
    /// A transaction for `tid` whose answer is accepted only as `from` allows.
    pub fn new(now: Instant, tid: TransactionId, from: AnswerFrom, rto: Rto) -> Self {
        Self {
            tid,
            from,
            rto,
            transmits: 0,
            next: now,
            current_rto: rto.initial,
            wrong_source: None,
            result: None,
        }
    }

    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    pub fn transmits(&self) -> u32 {
        self.transmits
    }

    /// True when the request should be (re)sent now; records the send.
    pub fn poll_transmit(&mut self, now: Instant) -> bool {
        if self.result.is_some() || now < self.next || self.transmits >= self.rto.max_transmits {
            return false;
        }
        self.transmits += 1;
        self.next = if self.transmits == self.rto.max_transmits {
            now + (self.rto.initial * self.rto.last_wait_multiplier).min(self.rto.max_rto * 2)
        } else {
            now + self.current_rto
        };
        self.current_rto = (self.current_rto * 2).min(self.rto.max_rto);
        true
    }

    /// When to call back, or `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.result.is_none().then_some(self.next)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.result.is_none() && self.transmits >= self.rto.max_transmits && now >= self.next {
            self.result = Some(TransactionEvent::TimedOut {
                transmits: self.transmits,
                wrong_source: self.wrong_source,
            });
        }
    }

    /// Offers a datagram; returns true if it was this transaction's answer. A valid answer from a
    /// source [`AnswerFrom`] refuses does not end the wait: it is remembered as `wrong_source`.
    pub fn handle_datagram(&mut self, from: SocketAddr, bytes: &[u8]) -> bool {
        if self.result.is_some() {
            return false;
        }
        let Ok(r) = BindingResponse::parse(bytes, &self.tid, Some(from)) else {
            return false;
        };
        if !self.from.accepts(from) {
            self.wrong_source = Some(from);
            return false;
        }
        self.result = Some(TransactionEvent::Done(Box::new(r)));
        true
    }

    /// The last source that sent a valid answer this transaction refused, if any.
    pub fn wrong_source(&self) -> Option<SocketAddr> {
        self.wrong_source
    }

    pub fn event(&self) -> TransactionEvent {
        self.result.clone().unwrap_or(TransactionEvent::Pending)
    }
}

/// A Binding success response to `tid` carrying XOR-MAPPED-ADDRESS `mapped`, as a plain server
/// answers: for the tests of every machine that reads one (transactions, the probe, punch).
#[cfg(test)]
pub(crate) fn binding_success(tid: &TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let mut buf = [0u8; 128];
    let mut w = MessageWriter::new(&mut buf, MessageType::BINDING_RESPONSE, tid).expect("writer");
    w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, mapped)
        .expect("attribute");
    let n = w.finish();
    buf[..n].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "192.0.2.1:3478";
    const ELSEWHERE: &str = "192.0.2.66:3478";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rto() -> Rto {
        Rto {
            initial: Duration::from_millis(100),
            max_transmits: 3,
            last_wait_multiplier: 2,
            max_rto: Duration::from_millis(400),
        }
    }

    #[test]
    fn an_answer_from_the_server_ends_the_transaction() {
        let now = Instant::now();
        let tid = TransactionId::random();
        let mut tx = Transaction::new(now, tid, AnswerFrom::Exactly(addr(SERVER)), rto());
        assert!(tx.poll_transmit(now));
        assert!(tx.handle_datagram(addr(SERVER), &binding_success(&tid, addr("198.51.100.1:1"))));
        match tx.event() {
            TransactionEvent::Done(r) => {
                assert_eq!(r.source, Some(addr(SERVER)));
                assert_eq!(r.xor_mapped, Some(addr("198.51.100.1:1")));
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(tx.poll_timeout(), None);
    }

    /// An answer from another address neither ends the wait nor stops the retransmissions; the
    /// real answer arriving later still counts, and the wrong source is kept as evidence.
    #[test]
    fn an_answer_from_elsewhere_does_not_end_the_wait() {
        let now = Instant::now();
        let tid = TransactionId::random();
        let mut tx = Transaction::new(now, tid, AnswerFrom::Exactly(addr(SERVER)), rto());
        assert!(tx.poll_transmit(now));
        assert!(!tx.handle_datagram(
            addr(ELSEWHERE),
            &binding_success(&tid, addr("198.51.100.1:1"))
        ));
        assert_eq!(tx.event(), TransactionEvent::Pending);
        assert_eq!(tx.wrong_source(), Some(addr(ELSEWHERE)));
        let retry = now + Duration::from_millis(100);
        assert_eq!(tx.poll_timeout(), Some(retry));
        assert!(tx.poll_transmit(retry), "still retransmitting");
        assert!(tx.handle_datagram(addr(SERVER), &binding_success(&tid, addr("198.51.100.1:2"))));
        match tx.event() {
            TransactionEvent::Done(r) => assert_eq!(r.xor_mapped, Some(addr("198.51.100.1:2"))),
            e => panic!("{e:?}"),
        }
    }

    /// With only wrong-source answers the budget runs out, and the timeout names who answered.
    #[test]
    fn only_wrong_source_answers_time_out_with_the_evidence() {
        let mut now = Instant::now();
        let tid = TransactionId::random();
        let mut tx = Transaction::new(now, tid, AnswerFrom::Exactly(addr(SERVER)), rto());
        while let Some(at) = tx.poll_timeout() {
            now = now.max(at);
            if tx.poll_transmit(now) {
                tx.handle_datagram(
                    addr(ELSEWHERE),
                    &binding_success(&tid, addr("198.51.100.1:1")),
                );
            }
            tx.handle_timeout(now);
        }
        assert_eq!(
            tx.event(),
            TransactionEvent::TimedOut {
                transmits: 3,
                wrong_source: Some(addr(ELSEWHERE)),
            }
        );
    }

    /// A CHANGE-REQUEST is answered from another address by design: any source is accepted and
    /// recorded in the response.
    #[test]
    fn a_change_request_accepts_any_source() {
        let opts = RequestOptions {
            change: ChangeRequest::BOTH,
            ..Default::default()
        };
        assert_eq!(
            AnswerFrom::for_request(addr(SERVER), &opts),
            AnswerFrom::Any
        );
        assert_eq!(
            AnswerFrom::for_request(addr(SERVER), &RequestOptions::default()),
            AnswerFrom::Exactly(addr(SERVER))
        );
        let now = Instant::now();
        let tid = TransactionId::random();
        let mut tx = Transaction::new(
            now,
            tid,
            AnswerFrom::for_request(addr(SERVER), &opts),
            rto(),
        );
        assert!(tx.poll_transmit(now));
        assert!(tx.handle_datagram(
            addr(ELSEWHERE),
            &binding_success(&tid, addr("198.51.100.1:1"))
        ));
        match tx.event() {
            TransactionEvent::Done(r) => assert_eq!(r.source, Some(addr(ELSEWHERE))),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn an_answer_to_another_transaction_is_ignored() {
        let now = Instant::now();
        let tid = TransactionId::random();
        let mut tx = Transaction::new(now, tid, AnswerFrom::Exactly(addr(SERVER)), rto());
        assert!(tx.poll_transmit(now));
        let other = TransactionId::random();
        assert!(!tx.handle_datagram(
            addr(SERVER),
            &binding_success(&other, addr("198.51.100.1:1"))
        ));
        assert_eq!(tx.wrong_source(), None);
        assert_eq!(tx.event(), TransactionEvent::Pending);
    }
}
