//! Property tests for the STUN codec: no input makes it panic, whatever we write parses back to the
//! same values, and stream framing never claims bytes it does not have.
//!
//! The "parse everything" work is `natscope_core::fuzzing::exercise`, the same function the
//! cargo-fuzz target calls, so a fuzz finding can be replayed here and the other way round.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use natscope_core::client::{build_request, BindingResponse, RequestOptions};
use natscope_core::fuzzing::exercise;
use natscope_core::stun::framing::{frame, Frame, MAX_FRAME};
use natscope_core::stun::{
    attr, attr_type, ChangeRequest, Class, ErrorCode, Message, MessageType, MessageWriter,
    ParseError, TransactionId, HEADER_LEN, MAGIC_COOKIE,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Strategies

/// RFC 8489 IDs (cookie + 96 bits) and classic RFC 3489 IDs (128 bits that are not the cookie).
fn any_tid() -> impl Strategy<Value = TransactionId> {
    prop_oneof![
        any::<[u8; 12]>().prop_map(|r| {
            let mut t = [0u8; 16];
            t[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            t[4..].copy_from_slice(&r);
            TransactionId(t)
        }),
        any::<[u8; 16]>().prop_map(|mut t| {
            if t[..4] == MAGIC_COOKIE.to_be_bytes() {
                t[0] ^= 0xFF;
            }
            TransactionId(t)
        }),
    ]
}

fn any_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
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

/// The plain-address attribute types natscope reads (RFC 8489, RFC 5780, RFC 3489).
const ADDRESS_TYPES: [u16; 6] = [
    attr_type::MAPPED_ADDRESS,
    attr_type::RESPONSE_ORIGIN,
    attr_type::OTHER_ADDRESS,
    attr_type::SOURCE_ADDRESS,
    attr_type::CHANGED_ADDRESS,
    attr_type::ALTERNATE_SERVER,
];

/// One attribute as our writer can emit it.
#[derive(Clone, Debug, PartialEq)]
enum Attr {
    Address(u16, SocketAddr),
    XorMapped(SocketAddr),
    Change(ChangeRequest),
    ResponsePort(u16),
    Padding(usize),
    Software(String),
    Error(u16, String),
    Unknown(Vec<u16>),
}

fn any_attr() -> impl Strategy<Value = Attr> {
    prop_oneof![
        (prop::sample::select(&ADDRESS_TYPES[..]), any_addr())
            .prop_map(|(t, a)| Attr::Address(t, a)),
        any_addr().prop_map(Attr::XorMapped),
        (any::<bool>(), any::<bool>()).prop_map(|(change_ip, change_port)| {
            Attr::Change(ChangeRequest {
                change_ip,
                change_port,
            })
        }),
        any::<u16>().prop_map(Attr::ResponsePort),
        prop_oneof![0usize..=8, 0usize..=1500].prop_map(Attr::Padding),
        ".{0,40}".prop_map(Attr::Software),
        (300u16..700, ".{0,40}").prop_map(|(c, r)| Attr::Error(c, r)),
        prop::collection::vec(any::<u16>(), 0..9).prop_map(Attr::Unknown),
    ]
}

fn write_attr(w: &mut MessageWriter<'_>, a: &Attr) {
    match a {
        Attr::Address(t, addr) => w.add_address(*t, *addr),
        Attr::XorMapped(addr) => w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, *addr),
        Attr::Change(cr) => w.add_change_request(*cr),
        Attr::ResponsePort(p) => w.add_response_port(*p),
        Attr::Padding(n) => w.add_padding(*n),
        Attr::Software(s) => w.add_software(s),
        Attr::Error(c, r) => w.add_error_code(*c, r),
        Attr::Unknown(v) => w.add_unknown_attributes(v),
    }
    .unwrap();
}

/// A message from our writer, as it would go on the wire.
#[derive(Clone, Debug)]
struct Written {
    typ: MessageType,
    tid: TransactionId,
    attrs: Vec<Attr>,
    fingerprint: bool,
    bytes: Vec<u8>,
}

fn write_message(
    typ: MessageType,
    tid: TransactionId,
    attrs: Vec<Attr>,
    fingerprint: bool,
) -> Written {
    let mut buf = vec![0u8; 16 * 1024];
    let mut w = MessageWriter::new(&mut buf, typ, &tid).unwrap();
    for a in &attrs {
        write_attr(&mut w, a);
    }
    let n = if fingerprint {
        w.finish_with_fingerprint().unwrap()
    } else {
        w.finish()
    };
    buf.truncate(n);
    Written {
        typ,
        tid,
        attrs,
        fingerprint,
        bytes: buf,
    }
}

fn any_written() -> impl Strategy<Value = Written> {
    any_written_with(any::<bool>())
}

fn any_written_with(fingerprint: impl Strategy<Value = bool>) -> impl Strategy<Value = Written> {
    (
        any_class(),
        prop_oneof![Just(1u16), 0u16..0x1000],
        any_tid(),
        prop::collection::vec(any_attr(), 0..8),
        fingerprint,
    )
        .prop_map(|(class, method, tid, attrs, fp)| {
            write_message(MessageType::new(class, method), tid, attrs, fp)
        })
}

/// A Binding request from `client::build_request`, with any RFC 5780 options.
fn any_request() -> impl Strategy<Value = Vec<u8>> {
    (
        any_tid(),
        any::<(bool, bool)>(),
        prop::option::of(any::<u16>()),
        prop::option::of(0usize..600),
        any::<bool>(),
    )
        .prop_map(
            |(tid, (change_ip, change_port), response_port, padding, fingerprint)| {
                let opts = RequestOptions {
                    change: ChangeRequest {
                        change_ip,
                        change_port,
                    },
                    response_port,
                    padding,
                    fingerprint,
                };
                let mut buf = [0u8; 2048];
                let n = build_request(&mut buf, &tid, &opts).unwrap();
                buf[..n].to_vec()
            },
        )
}

/// A valid message: a request from the client or anything the writer can produce.
fn any_valid_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![any_request(), any_written().prop_map(|w| w.bytes)]
}

/// Well-formed framing with random contents: a header whose length is right, then attributes of
/// arbitrary type and value, padded with arbitrary bytes. Random bytes alone almost never get past
/// the length check, so this is what drives the typed decoders with hostile values.
fn any_well_framed() -> impl Strategy<Value = Vec<u8>> {
    let attr_type = prop_oneof![
        prop::sample::select(
            &[
                attr_type::MAPPED_ADDRESS,
                attr_type::XOR_MAPPED_ADDRESS,
                attr_type::CHANGE_REQUEST,
                attr_type::RESPONSE_PORT,
                attr_type::PADDING,
                attr_type::SOFTWARE,
                attr_type::ERROR_CODE,
                attr_type::UNKNOWN_ATTRIBUTES,
                attr_type::FINGERPRINT,
                attr_type::RESPONSE_ORIGIN,
                attr_type::OTHER_ADDRESS,
                attr_type::SOURCE_ADDRESS,
                attr_type::CHANGED_ADDRESS,
            ][..]
        ),
        any::<u16>(),
    ];
    let one = (
        attr_type,
        prop::collection::vec(any::<u8>(), 0..32),
        any::<[u8; 3]>(),
    );
    (0u16..0x4000, any_tid(), prop::collection::vec(one, 0..10)).prop_map(|(typ, tid, attrs)| {
        let mut m = typ.to_be_bytes().to_vec();
        m.extend([0, 0]);
        m.extend(tid.0);
        for (t, v, pad) in attrs {
            m.extend(t.to_be_bytes());
            m.extend((v.len() as u16).to_be_bytes());
            m.extend(&v);
            m.extend(&pad[..(4 - v.len() % 4) % 4]);
        }
        let body = (m.len() - HEADER_LEN) as u16;
        m[2..4].copy_from_slice(&body.to_be_bytes());
        m
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// Overwrite the header's length field (reaches the attribute walk with a lying length).
    SetLength(u16),
}

fn any_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<usize>(), 1usize..12).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<u16>().prop_map(Mutation::SetLength),
    ]
}

fn apply(m: &mut Vec<u8>, mutation: &Mutation) {
    let len = m.len();
    match mutation {
        Mutation::FlipBit(i, b) if len > 0 => m[i % len] ^= 1 << b,
        Mutation::SetByte(i, v) if len > 0 => m[i % len] = *v,
        Mutation::Truncate(n) => m.truncate(n % (len + 1)),
        Mutation::Extend(v) => m.extend(v),
        Mutation::Insert(i, v) => {
            let at = i % (len + 1);
            m.splice(at..at, v.iter().copied());
        }
        Mutation::Remove(i, n) if len > 0 => {
            let at = i % len;
            let end = (at + n).min(len);
            m.drain(at..end);
        }
        Mutation::SetLength(l) if len >= 4 => m[2..4].copy_from_slice(&l.to_be_bytes()),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// (1) arbitrary bytes never panic

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        exercise(&bytes);
        // Spelled out as well, so a failure here names the decoder without reading `exercise`.
        if let Ok(msg) = Message::parse(&bytes) {
            let tid = msg.transaction_id();
            for a in msg.attributes() {
                let _ = attr::decode_address(a.value);
                let _ = attr::decode_xor_address(a.value, &tid);
                let _ = ChangeRequest::decode(a.value);
                let _ = attr::decode_response_port(a.value);
                let _ = ErrorCode::decode(a.value);
                let _ = attr::decode_unknown_attributes(a.value).count();
            }
            let _ = msg.fingerprint_valid();
            let _ = BindingResponse::parse(&bytes, &tid, None);
        }
    }

    #[test]
    fn header_shaped_bytes_never_panic(
        typ in 0u16..0x4000,
        tid in any_tid(),
        body in prop::collection::vec(any::<u8>(), 0..150),
    ) {
        // Random bodies behind a correct header: most fail the attribute walk, and must fail
        // with a clean error.
        let mut m = typ.to_be_bytes().to_vec();
        let body_len = body.len() & !3;
        m.extend((body_len as u16).to_be_bytes());
        m.extend(tid.0);
        m.extend(&body[..body_len]);
        exercise(&m);
        match Message::parse(&m) {
            Ok(msg) => prop_assert_eq!(msg.as_bytes().len(), m.len()),
            Err(e) => prop_assert!(matches!(e, ParseError::AttributeOverrun { .. }), "{e}"),
        }
    }

    #[test]
    fn well_framed_random_attributes_parse_and_never_panic(m in any_well_framed()) {
        // Any padding bytes and any attribute contents are acceptable to the parser (RFC 8489 §14:
        // padding is ignored); only the typed decoders may object.
        let msg = Message::parse(&m);
        prop_assert!(msg.is_ok(), "{:?}", msg.err());
        exercise(&m);
    }
}

// ---------------------------------------------------------------------------------------------
// (2) mutated valid messages never panic

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn mutated_valid_messages_never_panic(
        original in any_valid_message(),
        mutations in prop::collection::vec(any_mutation(), 1..6),
    ) {
        exercise(&original);
        prop_assert!(Message::parse(&original).is_ok());
        let mut m = original.clone();
        for mu in &mutations {
            apply(&mut m, mu);
        }
        exercise(&m);
    }

    #[test]
    fn truncated_or_extended_messages_are_rejected(
        original in any_valid_message(),
        cut in any::<usize>(),
        tail in prop::collection::vec(any::<u8>(), 1..40),
    ) {
        // The header length must match the datagram exactly (RFC 8489 §6.3): a short or long
        // datagram is not that message.
        let short = &original[..cut % original.len()];
        prop_assert!(Message::parse(short).is_err());
        let mut long = original.clone();
        long.extend(&tail);
        prop_assert!(
            matches!(Message::parse(&long), Err(ParseError::LengthMismatch { .. })),
            "{:?}", Message::parse(&long).err()
        );
        exercise(short);
        exercise(&long);
    }

    #[test]
    fn any_single_bit_flip_is_caught_by_fingerprint(
        w in any_written_with(Just(true)),
        bit in any::<usize>(),
    ) {
        let mut m = w.bytes.clone();
        let bit = bit % (m.len() * 8);
        m[bit / 8] ^= 1 << (bit % 8);
        if let Ok(msg) = Message::parse(&m) {
            prop_assert_ne!(msg.fingerprint_valid(), Some(true), "bit {}", bit);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (3) round trip: what the writer writes parses back to the same values

fn check_round_trip(w: &Written) -> Result<(), TestCaseError> {
    let msg = Message::parse(&w.bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(msg.message_type(), w.typ);
    prop_assert_eq!(msg.transaction_id(), w.tid);
    prop_assert_eq!(msg.is_rfc8489(), w.tid.has_magic_cookie());
    prop_assert_eq!(msg.as_bytes().len() % 4, 0);

    let parsed: Vec<_> = msg.attributes().collect();
    prop_assert_eq!(parsed.len(), w.attrs.len() + usize::from(w.fingerprint));
    for (a, want) in parsed.iter().zip(&w.attrs) {
        match want {
            Attr::Address(t, addr) => {
                prop_assert_eq!(a.typ, *t);
                prop_assert_eq!(attr::decode_address(a.value), Ok(*addr));
            }
            Attr::XorMapped(addr) => {
                prop_assert_eq!(a.typ, attr_type::XOR_MAPPED_ADDRESS);
                prop_assert_eq!(attr::decode_xor_address(a.value, &w.tid), Ok(*addr));
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
                prop_assert!(a.value.iter().all(|&b| b == 0));
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
        }
    }
    if w.fingerprint {
        prop_assert_eq!(parsed.last().map(|a| a.typ), Some(attr_type::FINGERPRINT));
        prop_assert_eq!(msg.fingerprint_valid(), Some(true));
    } else {
        prop_assert_eq!(msg.fingerprint_valid(), None);
    }

    // The client's typed view agrees, for the classes it accepts.
    let r = BindingResponse::parse(&w.bytes, &w.tid, None);
    let is_binding_response =
        w.typ.method == 1 && matches!(w.typ.class, Class::SuccessResponse | Class::ErrorResponse);
    prop_assert_eq!(r.is_ok(), is_binding_response, "{:?}", r);
    if let Ok(r) = r {
        let first_addr = |t: u16| {
            w.attrs.iter().find_map(|a| match a {
                Attr::Address(at, addr) if *at == t => Some(*addr),
                _ => None,
            })
        };
        prop_assert_eq!(r.mapped, first_addr(attr_type::MAPPED_ADDRESS));
        prop_assert_eq!(r.response_origin, first_addr(attr_type::RESPONSE_ORIGIN));
        prop_assert_eq!(r.other_address, first_addr(attr_type::OTHER_ADDRESS));
        prop_assert_eq!(r.source_address, first_addr(attr_type::SOURCE_ADDRESS));
        prop_assert_eq!(r.changed_address, first_addr(attr_type::CHANGED_ADDRESS));
        let first_xor = w.attrs.iter().find_map(|a| match a {
            Attr::XorMapped(addr) => Some(*addr),
            _ => None,
        });
        prop_assert_eq!(r.xor_mapped, first_xor);
        prop_assert_eq!(r.fingerprint_ok, w.fingerprint.then_some(true));
        prop_assert_eq!(r.classic, !w.tid.has_magic_cookie());
        // SOFTWARE / ERROR-CODE / UNKNOWN-ATTRIBUTES / PADDING: compared only when the message
        // has exactly one, since BindingResponse keeps the last of several, not the first.
        let only = |pick: fn(&Attr) -> bool| {
            let mut it = w.attrs.iter().filter(|a| pick(a));
            match (it.next(), it.next()) {
                (Some(a), None) => Some(a.clone()),
                _ => None,
            }
        };
        if let Some(Attr::Software(s)) = only(|a| matches!(a, Attr::Software(_))) {
            prop_assert_eq!(r.software.as_deref(), Some(s.as_str()));
        }
        if let Some(Attr::Error(c, reason)) = only(|a| matches!(a, Attr::Error(..))) {
            prop_assert_eq!(r.error_code, Some(c));
            prop_assert_eq!(r.error_reason.as_deref(), Some(reason.as_str()));
        }
        if let Some(Attr::Unknown(v)) = only(|a| matches!(a, Attr::Unknown(_))) {
            prop_assert_eq!(&r.unknown_attributes, &v);
        }
        if let Some(Attr::Padding(n)) = only(|a| matches!(a, Attr::Padding(_))) {
            prop_assert_eq!(r.padding_len, Some(n));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn written_messages_parse_back_to_the_same_values(w in any_written()) {
        check_round_trip(&w)?;
        exercise(&w.bytes);
    }

    #[test]
    fn requests_parse_back_to_their_options(
        tid in any_tid(),
        change in any::<(bool, bool)>(),
        response_port in prop::option::of(any::<u16>()),
        padding in prop::option::of(0usize..1400),
        fingerprint in any::<bool>(),
    ) {
        let opts = RequestOptions {
            change: ChangeRequest { change_ip: change.0, change_port: change.1 },
            response_port,
            padding,
            fingerprint,
        };
        let mut buf = [0u8; 2048];
        let n = build_request(&mut buf, &tid, &opts).unwrap();
        let msg = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(msg.message_type(), MessageType::BINDING_REQUEST);
        prop_assert_eq!(msg.transaction_id(), tid);
        let cr = msg
            .attribute(attr_type::CHANGE_REQUEST)
            .map(|a| ChangeRequest::decode(a.value).unwrap())
            .unwrap_or_default();
        prop_assert_eq!(cr, opts.change);
        prop_assert_eq!(
            msg.attribute(attr_type::RESPONSE_PORT).map(|a| attr::decode_response_port(a.value)),
            response_port.map(Ok)
        );
        prop_assert_eq!(msg.attribute(attr_type::PADDING).map(|a| a.value.len()), padding);
        // FINGERPRINT only on RFC 8489 requests: classic servers do not know the attribute.
        let want_fp = (fingerprint && tid.has_magic_cookie()).then_some(true);
        prop_assert_eq!(msg.fingerprint_valid(), want_fp);
    }

    #[test]
    fn message_type_round_trips(class in any_class(), method in 0u16..0x1000) {
        let t = MessageType::new(class, method);
        let raw = t.to_u16();
        prop_assert_eq!(raw & 0xC000, 0, "top two bits must stay zero");
        prop_assert_eq!(MessageType::from_u16(raw), t);
    }
}

// ---------------------------------------------------------------------------------------------
// (4) framing

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn frame_never_overclaims(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        match frame(&bytes) {
            Frame::Complete(n) => {
                prop_assert!(n <= bytes.len());
                prop_assert!(n >= HEADER_LEN);
                prop_assert_eq!(n, HEADER_LEN + usize::from(u16::from_be_bytes([bytes[2], bytes[3]])));
            }
            Frame::Partial(n) => {
                prop_assert!(n > bytes.len());
                prop_assert!(n <= MAX_FRAME);
            }
            Frame::Invalid => {
                prop_assert!(!bytes.is_empty());
            }
        }
    }

    #[test]
    fn frame_of_message_prefixes(
        m in any_valid_message(),
        cut in any::<usize>(),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(m.len() <= MAX_FRAME);
        let k = cut % (m.len() + 1);
        match frame(&m[..k]) {
            Frame::Partial(n) if k < m.len() => {
                prop_assert!(n > k);
                if k >= 4 {
                    // Once the length field has arrived, the need is exact.
                    prop_assert_eq!(n, m.len());
                }
            }
            Frame::Complete(n) if k == m.len() => prop_assert_eq!(n, m.len()),
            other => prop_assert!(false, "prefix {} of {}: {:?}", k, m.len(), other),
        }
        // A whole message followed by the start of the next one on the stream.
        let mut stream = m.clone();
        stream.extend(&tail);
        prop_assert_eq!(frame(&stream), Frame::Complete(m.len()));
        exercise(&stream);
    }
}

#[test]
fn frame_rejects_oversized_and_unaligned_lengths() {
    let mut h = [0u8; HEADER_LEN];
    h[2..4].copy_from_slice(&((MAX_FRAME - HEADER_LEN + 4) as u16).to_be_bytes());
    assert_eq!(frame(&h), Frame::Invalid);
    h[2..4].copy_from_slice(&((MAX_FRAME - HEADER_LEN) as u16).to_be_bytes());
    assert_eq!(frame(&h), Frame::Partial(MAX_FRAME));
    h[2..4].copy_from_slice(&6u16.to_be_bytes());
    assert_eq!(frame(&h), Frame::Invalid);
    assert_eq!(frame(&[0x80]), Frame::Invalid);
    assert_eq!(frame(&[]), Frame::Partial(HEADER_LEN));
}
