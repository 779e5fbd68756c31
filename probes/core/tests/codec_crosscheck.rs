//! Cross-check of our STUN codec against the `stun-types` crate (an independent, fuzzed
//! implementation): what we write, it reads with the same values and a valid FINGERPRINT; what it
//! writes, we read with the same values. Many random cases via proptest.
//!
//! `stun-types` only speaks RFC 5389/8489 (it rejects messages without the magic cookie), so the
//! classic RFC 3489 side of our codec is covered by `codec_props.rs` instead. It has no typed
//! MAPPED-ADDRESS or RFC 5780 attributes; those go through its raw attributes and its
//! `MappedSocketAddr` helper.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use natscope_core::client::{build_request, BindingResponse, RequestOptions};
use natscope_core::stun::{
    attr, attr_type, ChangeRequest, Class, ErrorCode, Message, MessageType, MessageWriter,
    TransactionId, MAGIC_COOKIE,
};
use proptest::prelude::*;
use stun_types::attribute::{
    Attribute as _, AttributeStaticType, AttributeType, ErrorCode as StErrorCode,
    Fingerprint as StFingerprint, MappedSocketAddr, RawAttribute as StRaw, Software as StSoftware,
    UnknownAttributes as StUnknown, XorMappedAddress as StXorMapped,
};
use stun_types::message::{
    Message as StMessage, MessageClass, MessageType as StMessageType, MessageWrite,
    MessageWriteExt, MessageWriteVec, Method, StunParseError, TransactionId as StTid,
};

// ---------------------------------------------------------------------------------------------
// Shared model

/// One attribute, as both codecs can write it.
#[derive(Clone, Debug, PartialEq)]
enum Attr {
    XorMapped(SocketAddr),
    /// MAPPED-ADDRESS, RESPONSE-ORIGIN or OTHER-ADDRESS (the plain layout).
    Address(u16, SocketAddr),
    Software(String),
    Error(u16, String),
    Unknown(Vec<u16>),
    /// RFC 5780 §7.2.
    Change(ChangeRequest),
    /// RFC 5780 §7.5, as our writer draws it (length 2).
    ResponsePort(u16),
    /// RFC 5780 §7.6.
    Padding(usize),
}

fn any_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

fn any_attr() -> impl Strategy<Value = Attr> {
    prop_oneof![
        3 => any_addr().prop_map(Attr::XorMapped),
        3 => (
            prop::sample::select(&[
                attr_type::MAPPED_ADDRESS,
                attr_type::RESPONSE_ORIGIN,
                attr_type::OTHER_ADDRESS,
            ][..]),
            any_addr(),
        )
            .prop_map(|(t, a)| Attr::Address(t, a)),
        2 => ".{0,60}".prop_map(Attr::Software),
        2 => (300u16..700, ".{0,60}").prop_map(|(c, r)| Attr::Error(c, r)),
        1 => prop::collection::vec(any::<u16>(), 0..9).prop_map(Attr::Unknown),
        1 => any::<(bool, bool)>().prop_map(|(change_ip, change_port)| {
            Attr::Change(ChangeRequest { change_ip, change_port })
        }),
        1 => any::<u16>().prop_map(Attr::ResponsePort),
        1 => (0usize..300).prop_map(Attr::Padding),
    ]
}

fn any_class() -> impl Strategy<Value = Class> {
    prop_oneof![
        Just(Class::Request),
        Just(Class::Indication),
        Just(Class::SuccessResponse),
        Just(Class::ErrorResponse),
    ]
}

/// A message both codecs can express: RFC 8489 only (cookie), any class and method.
#[derive(Clone, Debug)]
struct Case {
    class: Class,
    method: u16,
    /// The 96 random bits after the cookie.
    tid96: [u8; 12],
    attrs: Vec<Attr>,
    fingerprint: bool,
}

impl Case {
    fn our_type(&self) -> MessageType {
        MessageType::new(self.class, self.method)
    }

    fn our_tid(&self) -> TransactionId {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        t[4..].copy_from_slice(&self.tid96);
        TransactionId(t)
    }

    fn st_tid(&self) -> StTid {
        let mut b = [0u8; 16];
        b[4..].copy_from_slice(&self.tid96);
        StTid::from(u128::from_be_bytes(b))
    }

    fn st_type(&self) -> StMessageType {
        StMessageType::from_class_method(st_class(self.class), Method::new(self.method))
    }
}

fn st_class(c: Class) -> MessageClass {
    match c {
        Class::Request => MessageClass::Request,
        Class::Indication => MessageClass::Indication,
        Class::SuccessResponse => MessageClass::Success,
        Class::ErrorResponse => MessageClass::Error,
    }
}

fn any_case() -> impl Strategy<Value = Case> {
    (
        any_class(),
        prop_oneof![3 => Just(1u16), 1 => 0u16..0x1000],
        any::<[u8; 12]>(),
        prop::collection::vec(any_attr(), 0..8),
        any::<bool>(),
    )
        .prop_map(|(class, method, tid96, attrs, fingerprint)| Case {
            class,
            method,
            tid96,
            attrs,
            fingerprint,
        })
}

fn raw_value(a: &Attr) -> Option<(u16, Vec<u8>)> {
    match a {
        Attr::Change(cr) => Some((attr_type::CHANGE_REQUEST, cr.to_bytes().to_vec())),
        Attr::ResponsePort(p) => Some((attr_type::RESPONSE_PORT, p.to_be_bytes().to_vec())),
        Attr::Padding(n) => Some((attr_type::PADDING, vec![0u8; *n])),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Writers

fn write_ours(c: &Case) -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    let mut w = MessageWriter::new(&mut buf, c.our_type(), &c.our_tid()).unwrap();
    for a in &c.attrs {
        match a {
            Attr::XorMapped(addr) => w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, *addr),
            Attr::Address(t, addr) => w.add_address(*t, *addr),
            Attr::Software(s) => w.add_software(s),
            Attr::Error(code, r) => w.add_error_code(*code, r),
            Attr::Unknown(v) => w.add_unknown_attributes(v),
            Attr::Change(cr) => w.add_change_request(*cr),
            Attr::ResponsePort(p) => w.add_response_port(*p),
            Attr::Padding(n) => w.add_padding(*n),
        }
        .unwrap();
    }
    let n = if c.fingerprint {
        w.finish_with_fingerprint().unwrap()
    } else {
        w.finish()
    };
    buf.truncate(n);
    buf
}

fn write_theirs(c: &Case) -> Vec<u8> {
    let mut b = StMessage::builder(c.st_type(), c.st_tid(), MessageWriteVec::new());
    for a in &c.attrs {
        match a {
            Attr::XorMapped(addr) => b.add_attribute(&StXorMapped::new(*addr, c.st_tid())),
            Attr::Address(t, addr) => {
                b.add_attribute(&MappedSocketAddr::new(*addr).to_raw(AttributeType::new(*t)))
            }
            Attr::Software(s) => b.add_attribute(&StSoftware::new(s).unwrap()),
            Attr::Error(code, r) => b.add_attribute(&StErrorCode::new(*code, r).unwrap()),
            Attr::Unknown(v) => {
                let types: Vec<AttributeType> = v.iter().map(|&t| AttributeType::new(t)).collect();
                b.add_attribute(&StUnknown::new(&types))
            }
            other => {
                let (t, v) = raw_value(other).unwrap();
                b.add_attribute(&StRaw::new(AttributeType::new(t), &v))
            }
        }
        .unwrap();
    }
    if c.fingerprint {
        b.add_fingerprint().unwrap();
    }
    b.finish()
}

// ---------------------------------------------------------------------------------------------
// Readers: each side's view of a message, compared against the model

/// Checks `bytes` with stun-types against the model `c`.
fn check_with_theirs(c: &Case, bytes: &[u8]) -> Result<(), TestCaseError> {
    // from_bytes validates FINGERPRINT when present and fails with FingerprintMismatch otherwise.
    let msg = StMessage::from_bytes(bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert_eq!(msg.get_type(), c.st_type());
    prop_assert_eq!(msg.class(), st_class(c.class));
    prop_assert_eq!(msg.method(), Method::new(c.method));
    prop_assert_eq!(msg.transaction_id(), c.st_tid());
    prop_assert_eq!(msg.has_attribute(StFingerprint::TYPE), c.fingerprint);

    let attrs: Vec<(usize, StRaw<'_>)> = msg.iter_attributes().collect();
    prop_assert_eq!(attrs.len(), c.attrs.len() + usize::from(c.fingerprint));
    for ((_, raw), want) in attrs.iter().zip(&c.attrs) {
        match want {
            Attr::XorMapped(addr) => {
                let x =
                    StXorMapped::try_from(raw).map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(x.addr(c.st_tid()), *addr);
            }
            Attr::Address(t, addr) => {
                prop_assert_eq!(raw.get_type(), AttributeType::new(*t));
                let m = MappedSocketAddr::from_raw(raw)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(m.addr(), *addr);
            }
            Attr::Software(s) => {
                let sw =
                    StSoftware::try_from(raw).map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(sw.software(), s.as_str());
            }
            Attr::Error(code, reason) => {
                let e =
                    StErrorCode::try_from(raw).map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(e.code(), *code);
                prop_assert_eq!(e.reason(), reason.as_str());
            }
            Attr::Unknown(types) => {
                let u =
                    StUnknown::try_from(raw).map_err(|e| TestCaseError::fail(format!("{e}")))?;
                for &t in types {
                    prop_assert!(u.has_attribute(AttributeType::new(t)));
                }
                let listed: Vec<u16> = raw
                    .value
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                prop_assert_eq!(&listed, types);
            }
            other => {
                let (t, v) = raw_value(other).unwrap();
                prop_assert_eq!(raw.get_type(), AttributeType::new(t));
                prop_assert_eq!(&raw.value[..], &v[..]);
            }
        }
    }
    if c.fingerprint {
        prop_assert_eq!(
            attrs.last().map(|(_, r)| r.get_type()),
            Some(StFingerprint::TYPE)
        );
    }
    Ok(())
}

/// Checks `bytes` with our codec against the model `c`.
fn check_with_ours(c: &Case, bytes: &[u8]) -> Result<(), TestCaseError> {
    let msg = Message::parse(bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(msg.message_type(), c.our_type());
    prop_assert_eq!(msg.transaction_id(), c.our_tid());
    prop_assert!(msg.is_rfc8489());
    prop_assert_eq!(msg.fingerprint_valid(), c.fingerprint.then_some(true));

    let attrs: Vec<_> = msg.attributes().collect();
    prop_assert_eq!(attrs.len(), c.attrs.len() + usize::from(c.fingerprint));
    let tid = c.our_tid();
    for (a, want) in attrs.iter().zip(&c.attrs) {
        match want {
            Attr::XorMapped(addr) => {
                prop_assert_eq!(a.typ, attr_type::XOR_MAPPED_ADDRESS);
                prop_assert_eq!(attr::decode_xor_address(a.value, &tid), Ok(*addr));
            }
            Attr::Address(t, addr) => {
                prop_assert_eq!(a.typ, *t);
                prop_assert_eq!(attr::decode_address(a.value), Ok(*addr));
            }
            Attr::Software(s) => {
                prop_assert_eq!(a.typ, attr_type::SOFTWARE);
                prop_assert_eq!(a.value, s.as_bytes());
            }
            Attr::Error(code, reason) => {
                prop_assert_eq!(a.typ, attr_type::ERROR_CODE);
                prop_assert_eq!(
                    ErrorCode::decode(a.value),
                    Ok(ErrorCode {
                        code: *code,
                        reason: reason.as_bytes()
                    })
                );
            }
            Attr::Unknown(types) => {
                prop_assert_eq!(a.typ, attr_type::UNKNOWN_ATTRIBUTES);
                let got: Vec<u16> = attr::decode_unknown_attributes(a.value).collect();
                prop_assert_eq!(&got, types);
            }
            Attr::Change(cr) => {
                prop_assert_eq!(a.typ, attr_type::CHANGE_REQUEST);
                prop_assert_eq!(ChangeRequest::decode(a.value), Ok(*cr));
            }
            Attr::ResponsePort(p) => {
                prop_assert_eq!(a.typ, attr_type::RESPONSE_PORT);
                prop_assert_eq!(attr::decode_response_port(a.value), Ok(*p));
            }
            Attr::Padding(n) => {
                prop_assert_eq!(a.typ, attr_type::PADDING);
                prop_assert_eq!(a.value.len(), *n);
            }
        }
    }

    // The client's view of Binding responses.
    let r = BindingResponse::parse(bytes, &tid, None);
    let binding_response =
        c.method == 1 && matches!(c.class, Class::SuccessResponse | Class::ErrorResponse);
    prop_assert_eq!(r.is_ok(), binding_response, "{:?}", r);
    if let Ok(r) = r {
        let first = |pick: &dyn Fn(&Attr) -> Option<SocketAddr>| c.attrs.iter().find_map(pick);
        let xor = first(&|a| match a {
            Attr::XorMapped(x) => Some(*x),
            _ => None,
        });
        let plain = |t: u16| {
            first(&move |a: &Attr| match a {
                Attr::Address(at, x) if *at == t => Some(*x),
                _ => None,
            })
        };
        prop_assert_eq!(r.xor_mapped, xor);
        prop_assert_eq!(r.mapped, plain(attr_type::MAPPED_ADDRESS));
        prop_assert_eq!(r.response_origin, plain(attr_type::RESPONSE_ORIGIN));
        prop_assert_eq!(r.other_address, plain(attr_type::OTHER_ADDRESS));
        prop_assert_eq!(r.fingerprint_ok, c.fingerprint.then_some(true));
        prop_assert!(!r.classic);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn message_types_encode_identically(class in any_class(), method in 0u16..0x1000) {
        let ours = MessageType::new(class, method).to_u16().to_be_bytes();
        let theirs = StMessageType::from_class_method(st_class(class), Method::new(method));
        prop_assert_eq!(&ours[..], &theirs.to_bytes()[..]);
        prop_assert_eq!(StMessageType::from_bytes(&ours).unwrap(), theirs);
    }

    #[test]
    fn what_we_write_stun_types_reads(c in any_case()) {
        let ours = write_ours(&c);
        check_with_theirs(&c, &ours)?;
        // And we still read our own bytes the same way.
        check_with_ours(&c, &ours)?;
    }

    #[test]
    fn what_stun_types_writes_we_read(c in any_case()) {
        let theirs = write_theirs(&c);
        check_with_ours(&c, &theirs)?;
        check_with_theirs(&c, &theirs)?;
    }

    #[test]
    fn both_writers_produce_the_same_bytes(c in any_case()) {
        // Both pad with zeros and lay attributes out in call order, so the wire bytes (and hence
        // the FINGERPRINT values) must be identical.
        prop_assert_eq!(write_ours(&c), write_theirs(&c));
    }

    #[test]
    fn both_codecs_reject_a_corrupted_fingerprint(
        c in any_case(),
        bit in any::<usize>(),
    ) {
        let mut c = c;
        c.fingerprint = true;
        let mut m = write_ours(&c);
        // Candidate bytes: the 96 random bits of the transaction ID and every attribute value
        // byte before FINGERPRINT. Flipping one changes neither codec's view of the framing.
        let mut candidates: Vec<usize> = (8..20).collect();
        for a in Message::parse(&m).unwrap().attributes() {
            if a.typ != attr_type::FINGERPRINT {
                candidates.extend(a.offset + 4..a.offset + 4 + a.value.len());
            }
        }
        let bit = bit % (candidates.len() * 8);
        m[candidates[bit / 8]] ^= 1 << (bit % 8);
        prop_assert_eq!(Message::parse(&m).unwrap().fingerprint_valid(), Some(false));
        let st = StMessage::from_bytes(&m);
        prop_assert!(
            matches!(st, Err(StunParseError::FingerprintMismatch)),
            "stun-types: {:?}", st.map(|_| ())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed cases

#[test]
fn request_from_build_request_reads_in_stun_types() {
    let tid = TransactionId::random();
    let opts = RequestOptions {
        change: ChangeRequest::BOTH,
        response_port: Some(40000),
        padding: Some(13),
        fingerprint: true,
    };
    let mut buf = [0u8; 256];
    let n = build_request(&mut buf, &tid, &opts).unwrap();
    let msg = StMessage::from_bytes(&buf[..n]).unwrap();
    assert!(msg.has_class(MessageClass::Request));
    assert!(msg.has_method(stun_types::message::BINDING));
    let change = msg
        .raw_attribute(AttributeType::new(attr_type::CHANGE_REQUEST))
        .unwrap();
    assert_eq!(&change.value[..], [0, 0, 0, 6]);
    let port = msg
        .raw_attribute(AttributeType::new(attr_type::RESPONSE_PORT))
        .unwrap();
    assert_eq!(&port.value[..], 40000u16.to_be_bytes());
    let padding = msg
        .raw_attribute(AttributeType::new(attr_type::PADDING))
        .unwrap();
    assert_eq!(padding.value.len(), 13);
    assert!(msg.has_attribute(StFingerprint::TYPE));
}

#[test]
fn stun_types_rejects_classic_requests_which_is_why_we_parse_our_own() {
    // The module documentation's claim: a classic RFC 3489 request (no cookie) is not STUN to
    // stun-types, while our parser reads it.
    let tid = TransactionId([0x5a; 16]);
    let mut buf = [0u8; 64];
    let n = build_request(&mut buf, &tid, &RequestOptions::default()).unwrap();
    assert!(matches!(
        StMessage::from_bytes(&buf[..n]),
        Err(StunParseError::NotStun)
    ));
    let ours = Message::parse(&buf[..n]).unwrap();
    assert!(!ours.is_rfc8489());
    assert_eq!(ours.message_type(), MessageType::BINDING_REQUEST);
}

#[test]
fn stun_types_error_response_reads_in_ours() {
    let c = Case {
        class: Class::ErrorResponse,
        method: 1,
        tid96: *b"natscope-xck",
        attrs: vec![
            Attr::Error(420, "Unknown Attribute".into()),
            Attr::Unknown(vec![0x0003, 0x0027, 0x0026]),
            Attr::Software("stun-types".into()),
        ],
        fingerprint: true,
    };
    let theirs = write_theirs(&c);
    let r = BindingResponse::parse(&theirs, &c.our_tid(), None).unwrap();
    assert_eq!(r.error_code, Some(420));
    assert_eq!(r.error_reason.as_deref(), Some("Unknown Attribute"));
    assert_eq!(r.unknown_attributes, [0x0003, 0x0027, 0x0026]);
    assert_eq!(r.software.as_deref(), Some("stun-types"));
    assert_eq!(r.fingerprint_ok, Some(true));
    // Odd count: stun-types pads UNKNOWN-ATTRIBUTES with zeros as we do.
    assert_eq!(theirs, write_ours(&c));
}
