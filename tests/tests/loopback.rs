//! The reflector end to end on real loopback sockets: an in-process `RunningReflector` on
//! 127.0.0.1:P1 (primary) and 127.0.0.2:P2 (alternate), driven by natscope's own client code.
//! Every RFC 5780 feature is checked where it is observable from outside: the address an answer
//! really came from (recv_from), what it claims (RESPONSE-ORIGIN, OTHER-ADDRESS), and what it says
//! about the client (XOR-MAPPED-ADDRESS and MAPPED-ADDRESS).

use std::net::SocketAddr;
use std::time::Duration;

use natscope_probes::client::{transact_tcp, transact_udp, BindingResponse, RequestOptions};
use natscope_probes::reflector::{MAX_PADDING, SOFTWARE};
use natscope_probes::stun::{
    attr_type, ChangeRequest, Class, ErrorCode, Message, MessageType, TransactionId,
};
use natscope_tests::{
    binding_request, exchange_raw, expected_source, receives_anything, request_with, sa,
    udp_client, TestReflector, A1, A3, FAST_RTO, NEGATIVE_RTO,
};

const ALL_CHANGES: [ChangeRequest; 4] = [
    ChangeRequest::NONE,
    ChangeRequest::IP,
    ChangeRequest::PORT,
    ChangeRequest::BOTH,
];

fn opts(change: ChangeRequest) -> RequestOptions {
    RequestOptions {
        change,
        ..Default::default()
    }
}

async fn udp_binding(
    client: &tokio::net::UdpSocket,
    server: SocketAddr,
    tid: TransactionId,
    opts: &RequestOptions,
) -> BindingResponse {
    transact_udp(client, server, tid, opts, FAST_RTO)
        .await
        .unwrap_or_else(|e| panic!("binding to {server} with {opts:?}: {e}"))
}

/// RFC 5780 §6 and §7: for every server address and every CHANGE-REQUEST combination the answer
/// leaves from the selected address, RESPONSE-ORIGIN says so, OTHER-ADDRESS is the address that
/// differs in both IP and port from the one the request reached (A2:P2 for A1:P1), and both mapped
/// addresses are the client's.
#[tokio::test]
async fn change_request_answers_leave_from_the_selected_address() {
    let r = TestReflector::start();
    let (primary, alt) = (r.primary, r.alt());
    for &to in &r.server_addresses() {
        for change in ALL_CHANGES {
            let client = udp_client(A1).await;
            let me = client.local_addr().unwrap();
            let resp = udp_binding(&client, to, TransactionId::random(), &opts(change)).await;
            let want = expected_source(primary, alt, to, change.change_ip, change.change_port);
            let ctx = format!("request to {to} with {change:?}: {resp:?}");
            assert_eq!(resp.source, Some(want), "real source; {ctx}");
            assert_eq!(resp.response_origin, resp.source, "RESPONSE-ORIGIN; {ctx}");
            assert_eq!(
                resp.other_address,
                Some(expected_source(primary, alt, to, true, true)),
                "OTHER-ADDRESS; {ctx}"
            );
            assert_eq!(resp.xor_mapped, Some(me), "XOR-MAPPED-ADDRESS; {ctx}");
            assert_eq!(resp.mapped, Some(me), "MAPPED-ADDRESS; {ctx}");
            assert_eq!(resp.error_code, None, "{ctx}");
            assert!(!resp.classic, "{ctx}");
            assert_eq!(resp.software.as_deref(), Some(SOFTWARE), "{ctx}");
            assert_eq!(resp.source_address, None, "no RFC 3489 attributes; {ctx}");
            assert_eq!(resp.changed_address, None, "no RFC 3489 attributes; {ctx}");
        }
    }
    // The A1:P1 case the brief names, spelled out.
    let client = udp_client(A1).await;
    let resp = udp_binding(
        &client,
        primary,
        TransactionId::random(),
        &opts(ChangeRequest::BOTH),
    )
    .await;
    assert_eq!(resp.source, Some(alt));
    assert_eq!(resp.other_address, Some(alt));

    let c = r.counters();
    assert!(
        c.change_ip >= 4 && c.change_port >= 4 && c.change_both >= 5,
        "{c:?}"
    );
    assert!(c.binding >= 4, "{c:?}");
    assert_eq!(c.error_responses, 0, "{c:?}");
}

/// Sends `request` from `from` and expects the answer on `to` (a second socket), not on `from`.
async fn answer_on_other_socket(
    server: SocketAddr,
    from: &tokio::net::UdpSocket,
    to: &tokio::net::UdpSocket,
    request: &[u8],
    tid: &TransactionId,
) -> BindingResponse {
    let resp = exchange_raw(from, to, server, request, tid, FAST_RTO)
        .await
        .unwrap_or_else(|| {
            panic!(
                "no answer on {} for a request from {}",
                to.local_addr().unwrap(),
                from.local_addr().unwrap()
            )
        });
    assert!(
        !receives_anything(from, Duration::from_millis(200)).await,
        "RESPONSE-PORT answer (or a copy) also arrived on the requesting socket"
    );
    resp
}

/// RFC 5780 §7.5: RESPONSE-PORT sends the answer to another port of the requester's IP; the
/// mapped address is still the requesting socket. Both encodings of the attribute (value length 2
/// as RFC 5780 draws it, and 4 with the padding counted) are accepted (NAT-REFERENCE.md).
#[tokio::test]
async fn response_port_sends_the_answer_to_another_port_of_the_same_ip() {
    let r = TestReflector::start();
    let x = udp_client(A1).await;
    let y = udp_client(A1).await;
    let (xa, ya) = (x.local_addr().unwrap(), y.local_addr().unwrap());

    for change in [ChangeRequest::NONE, ChangeRequest::BOTH] {
        let tid = TransactionId::random();
        let req = binding_request(
            &tid,
            &RequestOptions {
                change,
                response_port: Some(ya.port()),
                ..Default::default()
            },
        );
        let resp = answer_on_other_socket(r.primary, &x, &y, &req, &tid).await;
        let want = expected_source(
            r.primary,
            r.alt(),
            r.primary,
            change.change_ip,
            change.change_port,
        );
        assert_eq!(resp.source, Some(want), "{change:?}: {resp:?}");
        assert_eq!(resp.response_origin, Some(want), "{resp:?}");
        assert_eq!(
            resp.xor_mapped,
            Some(xa),
            "mapped is the requester: {resp:?}"
        );
        assert_eq!(resp.mapped, Some(xa), "{resp:?}");
        assert_eq!(resp.other_address, Some(r.alt()), "{resp:?}");
    }

    // Value length 4: port plus the two padding bytes counted in the length.
    let tid = TransactionId::random();
    let mut value = [0u8; 4];
    value[..2].copy_from_slice(&ya.port().to_be_bytes());
    let req = request_with(
        MessageType::BINDING_REQUEST,
        &tid,
        |w| w.add_raw(attr_type::RESPONSE_PORT, &value).unwrap(),
        false,
    );
    let resp = answer_on_other_socket(r.primary, &x, &y, &req, &tid).await;
    assert_eq!(resp.xor_mapped, Some(xa), "{resp:?}");
    assert_eq!(resp.source, Some(r.primary), "{resp:?}");
    // The CHANGE-REQUEST one counts as change-both: the kind names the primary test.
    assert!(r.counters().response_port >= 2, "{:?}", r.counters());
}

/// RFC 5780 §7.6: PADDING in a request is echoed with the same length in the answer.
#[tokio::test]
async fn padding_is_echoed_with_the_same_length() {
    let r = TestReflector::start();
    let client = udp_client(A1).await;
    let me = client.local_addr().unwrap();
    for len in [4, 61, 1400, MAX_PADDING] {
        let o = RequestOptions {
            padding: Some(len),
            ..Default::default()
        };
        let resp = udp_binding(&client, r.primary, TransactionId::random(), &o).await;
        assert_eq!(resp.error_code, None, "padding {len}: {resp:?}");
        assert_eq!(resp.padding_len, Some(len), "padding {len}");
        assert_eq!(resp.xor_mapped, Some(me));
        assert_eq!(resp.source, Some(r.primary));
    }
    // With a CHANGE-REQUEST too: fragmentation tests (§3.5) repeat the filtering tests padded.
    let o = RequestOptions {
        change: ChangeRequest::BOTH,
        padding: Some(1200),
        ..Default::default()
    };
    let resp = udp_binding(&client, r.primary, TransactionId::random(), &o).await;
    assert_eq!((resp.padding_len, resp.source), (Some(1200), Some(r.alt())));
}

/// Beyond the reflector's cap, PADDING is refused with 400 (bounded response size, §9).
#[tokio::test]
async fn padding_beyond_the_cap_gets_400() {
    let r = TestReflector::start();
    let client = udp_client(A1).await;
    let o = RequestOptions {
        padding: Some(MAX_PADDING + 4),
        ..Default::default()
    };
    let resp = udp_binding(&client, r.primary, TransactionId::random(), &o).await;
    assert_eq!(resp.error_code, Some(400), "{resp:?}");
    assert_eq!(resp.padding_len, None, "{resp:?}");
}

/// RFC 5780 §7.5: RESPONSE-PORT together with PADDING is an error 400, answered to the requesting
/// socket itself (never to the RESPONSE-PORT).
#[tokio::test]
async fn response_port_with_padding_gets_400() {
    let r = TestReflector::start();
    let x = udp_client(A1).await;
    let y = udp_client(A1).await;
    let o = RequestOptions {
        response_port: Some(y.local_addr().unwrap().port()),
        padding: Some(100),
        ..Default::default()
    };
    let resp = udp_binding(&x, r.primary, TransactionId::random(), &o).await;
    assert_eq!(resp.error_code, Some(400), "{resp:?}");
    assert_eq!(resp.source, Some(r.primary), "{resp:?}");
    assert_eq!(
        resp.xor_mapped, None,
        "an error carries no mapped address: {resp:?}"
    );
    assert!(!receives_anything(&y, Duration::from_millis(200)).await);
    assert!(r.counters().error_responses >= 1);
}

async fn tcp_connect(from_ip: std::net::IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(sa(from_ip, 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.connect(to))
        .await
        .unwrap_or_else(|_| panic!("tcp connect to {to} timed out"))
        .unwrap_or_else(|e| panic!("tcp connect to {to}: {e}"))
}

/// STUN over TCP (RFC 8489 §6.2.2) on each of the four addresses: the answer travels on the
/// connection, RESPONSE-ORIGIN is the address connected to, the mapped address is the client's
/// end of the connection. Two transactions back to back on one connection work.
#[tokio::test]
async fn stun_over_tcp_is_served_on_all_four_addresses() {
    let r = TestReflector::start();
    for &to in &r.server_addresses() {
        let mut stream = tcp_connect(A1, to).await;
        let me = stream.local_addr().unwrap();
        for _ in 0..2 {
            let resp = transact_tcp(
                &mut stream,
                TransactionId::random(),
                &RequestOptions::default(),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|e| panic!("tcp binding to {to}: {e}"));
            let ctx = format!("tcp to {to}: {resp:?}");
            assert_eq!(resp.source, Some(to), "{ctx}");
            assert_eq!(resp.response_origin, Some(to), "{ctx}");
            assert_eq!(resp.xor_mapped, Some(me), "{ctx}");
            assert_eq!(resp.mapped, Some(me), "{ctx}");
            assert_eq!(
                resp.other_address,
                Some(expected_source(r.primary, r.alt(), to, true, true)),
                "{ctx}"
            );
        }
    }
    let c = r.counters();
    assert!(c.tcp_connections >= 4, "{c:?}");
}

/// Over TCP an answer can only travel on its connection: CHANGE-REQUEST and RESPONSE-PORT get 400
/// on that connection, which stays usable.
#[tokio::test]
async fn change_request_and_response_port_over_tcp_get_400() {
    let r = TestReflector::start();
    let mut stream = tcp_connect(A1, r.primary).await;
    let cases = [
        opts(ChangeRequest::IP),
        opts(ChangeRequest::PORT),
        opts(ChangeRequest::BOTH),
        RequestOptions {
            response_port: Some(40_000),
            ..Default::default()
        },
    ];
    for o in cases {
        let resp = transact_tcp(
            &mut stream,
            TransactionId::random(),
            &o,
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("tcp {o:?}: {e}"));
        assert_eq!(resp.error_code, Some(400), "{o:?}: {resp:?}");
    }
    let ok = transact_tcp(
        &mut stream,
        TransactionId::random(),
        &RequestOptions::default(),
        Duration::from_secs(5),
    )
    .await
    .expect("plain request after the errors");
    assert_eq!(ok.error_code, None);
}

/// A classic RFC 3489 request (no magic cookie) gets RFC 3489 attributes: MAPPED-ADDRESS,
/// SOURCE-ADDRESS (where the answer left from) and CHANGED-ADDRESS (A2:P2), and no
/// XOR-MAPPED-ADDRESS (classic clients cannot read it). CHANGE-REQUEST works as for RFC 5780.
#[tokio::test]
async fn classic_rfc3489_request_gets_classic_attributes() {
    let r = TestReflector::start();
    for change in ALL_CHANGES {
        let client = udp_client(A1).await;
        let me = client.local_addr().unwrap();
        let resp = udp_binding(
            &client,
            r.primary,
            TransactionId::random_classic(),
            &opts(change),
        )
        .await;
        let want = expected_source(
            r.primary,
            r.alt(),
            r.primary,
            change.change_ip,
            change.change_port,
        );
        let ctx = format!("classic {change:?}: {resp:?}");
        assert!(resp.classic, "{ctx}");
        assert_eq!(resp.source, Some(want), "{ctx}");
        assert_eq!(resp.mapped, Some(me), "{ctx}");
        assert_eq!(resp.source_address, Some(want), "{ctx}");
        assert_eq!(resp.changed_address, Some(r.alt()), "{ctx}");
        assert_eq!(resp.xor_mapped, None, "{ctx}");
        assert_eq!(resp.response_origin, None, "{ctx}");
        assert_eq!(resp.other_address, None, "{ctx}");
    }
    assert!(r.counters().classic >= 4);
}

/// RFC 8489 §14: an unknown comprehension-required attribute gets 420 with UNKNOWN-ATTRIBUTES
/// listing it; an unknown comprehension-optional one is ignored.
#[tokio::test]
async fn unknown_comprehension_required_attribute_gets_420() {
    let r = TestReflector::start();
    let client = udp_client(A1).await;

    let tid = TransactionId::random();
    let req = request_with(
        MessageType::BINDING_REQUEST,
        &tid,
        |w| w.add_raw(0x0042, &[1, 2, 3, 4]).unwrap(),
        false,
    );
    let resp = exchange_raw(&client, &client, r.primary, &req, &tid, FAST_RTO)
        .await
        .expect("an answer to the 0x0042 request");
    assert_eq!(resp.error_code, Some(420), "{resp:?}");
    assert_eq!(resp.unknown_attributes, vec![0x0042], "{resp:?}");
    assert_eq!(resp.xor_mapped, None, "{resp:?}");

    let tid = TransactionId::random();
    let req = request_with(
        MessageType::BINDING_REQUEST,
        &tid,
        |w| w.add_raw(0x8042, &[1, 2, 3, 4]).unwrap(),
        false,
    );
    let resp = exchange_raw(&client, &client, r.primary, &req, &tid, FAST_RTO)
        .await
        .expect("an answer to the 0x8042 request");
    assert_eq!(resp.error_code, None, "{resp:?}");
    assert_eq!(resp.xor_mapped, Some(client.local_addr().unwrap()));
}

/// Only Binding exists on a STUN reflector: another method is refused with 400, and the error
/// response carries the request's method (RFC 8489 §6.3: a response has the method of its request,
/// or the client cannot match it to its transaction).
#[tokio::test]
async fn non_binding_request_gets_400() {
    let r = TestReflector::start();
    let client = udp_client(A1).await;
    let tid = TransactionId::random();
    // 0x003: Allocate (RFC 8656).
    let req = request_with(MessageType::new(Class::Request, 0x003), &tid, |_| {}, false);
    let mut buf = [0u8; 2048];
    client.send_to(&req, r.primary).await.unwrap();
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
        .await
        .expect("an answer to Allocate")
        .unwrap();
    let msg = Message::parse(&buf[..n]).expect("the answer is stun");
    assert_eq!(from, r.primary);
    assert_eq!(msg.transaction_id(), tid);
    assert_eq!(
        msg.message_type(),
        MessageType::new(Class::ErrorResponse, 0x003)
    );
    let code = msg
        .attribute(attr_type::ERROR_CODE)
        .and_then(|a| ErrorCode::decode(a.value).ok())
        .map(|e| e.code);
    assert_eq!(code, Some(400));
}

/// RFC 5780 §6.1: a server without an alternate address sends no OTHER-ADDRESS and treats
/// CHANGE-REQUEST as an unknown attribute (420 listing 0x0003), over UDP and TCP.
#[tokio::test]
async fn one_address_reflector_has_no_other_address_and_refuses_change_request() {
    let r = TestReflector::start_with(false, |_| {});
    let client = udp_client(A1).await;
    let me = client.local_addr().unwrap();

    let resp = udp_binding(
        &client,
        r.primary,
        TransactionId::random(),
        &opts(ChangeRequest::NONE),
    )
    .await;
    assert_eq!(resp.error_code, None, "{resp:?}");
    assert_eq!(resp.other_address, None, "{resp:?}");
    assert_eq!(resp.source, Some(r.primary));
    assert_eq!(resp.response_origin, Some(r.primary));
    assert_eq!(resp.xor_mapped, Some(me));

    for change in [ChangeRequest::IP, ChangeRequest::PORT, ChangeRequest::BOTH] {
        let resp = udp_binding(&client, r.primary, TransactionId::random(), &opts(change)).await;
        assert_eq!(resp.error_code, Some(420), "{change:?}: {resp:?}");
        assert_eq!(
            resp.unknown_attributes,
            vec![attr_type::CHANGE_REQUEST],
            "{resp:?}"
        );
        assert_eq!(resp.source, Some(r.primary), "{resp:?}");
    }

    let classic = udp_binding(
        &client,
        r.primary,
        TransactionId::random_classic(),
        &opts(ChangeRequest::NONE),
    )
    .await;
    assert_eq!(classic.changed_address, None, "{classic:?}");
    assert_eq!(classic.source_address, Some(r.primary), "{classic:?}");

    let mut stream = tcp_connect(A1, r.primary).await;
    let resp = transact_tcp(
        &mut stream,
        TransactionId::random(),
        &opts(ChangeRequest::IP),
        Duration::from_secs(5),
    )
    .await
    .expect("tcp answer");
    assert_eq!(resp.error_code, Some(420), "{resp:?}");
}

/// RFC 8489 §14.7: a request with FINGERPRINT gets an answer with a valid FINGERPRINT (success and
/// error alike); one without gets none.
#[tokio::test]
async fn fingerprint_in_request_gets_valid_fingerprint_in_answer() {
    let r = TestReflector::start();
    let client = udp_client(A1).await;
    let with = |change, padding| RequestOptions {
        change,
        padding,
        fingerprint: true,
        ..Default::default()
    };
    for o in [
        with(ChangeRequest::NONE, None),
        with(ChangeRequest::BOTH, None),
        with(ChangeRequest::NONE, Some(33)),
    ] {
        let resp = udp_binding(&client, r.primary, TransactionId::random(), &o).await;
        assert_eq!(resp.error_code, None, "{o:?}: {resp:?}");
        assert_eq!(resp.fingerprint_ok, Some(true), "{o:?}: {resp:?}");
    }
    let plain = udp_binding(
        &client,
        r.primary,
        TransactionId::random(),
        &RequestOptions::default(),
    )
    .await;
    assert_eq!(plain.fingerprint_ok, None);

    // An error answer to a fingerprinted request is fingerprinted too.
    let tid = TransactionId::random();
    let req = request_with(
        MessageType::BINDING_REQUEST,
        &tid,
        |w| w.add_raw(0x0042, &[0; 4]).unwrap(),
        true,
    );
    let resp = exchange_raw(&client, &client, r.primary, &req, &tid, FAST_RTO)
        .await
        .expect("420 answer");
    assert_eq!(
        (resp.error_code, resp.fingerprint_ok),
        (Some(420), Some(true))
    );
}

/// Answers never go to third parties: a source IP different from the requester never receives
/// anything, whatever RESPONSE-PORT says (RFC 5780 §9).
#[tokio::test]
async fn response_port_never_leaves_the_requesters_ip() {
    let r = TestReflector::start();
    let x = udp_client(A1).await;
    let victim = udp_client(A3).await;
    let tid = TransactionId::random();
    let req = binding_request(
        &tid,
        &RequestOptions {
            response_port: Some(victim.local_addr().unwrap().port()),
            ..Default::default()
        },
    );
    // The answer goes to 127.0.0.1:<victim port>, where nothing listens: no answer anywhere.
    let got = exchange_raw(&x, &x, r.primary, &req, &tid, NEGATIVE_RTO).await;
    assert!(got.is_none(), "{got:?}");
    assert!(!receives_anything(&victim, Duration::from_millis(100)).await);
}

/// RFC 5780 deployments name real ports. A one-address reflector may be asked for port 0
/// (`validate` only forbids 0 with an alternate): the driver must then report the port it really
/// bound and answer with a RESPONSE-ORIGIN that is the real source.
#[tokio::test]
async fn one_address_reflector_on_port_zero_reports_its_real_port() {
    use natscope_probes::reflector::driver::{DriverConfig, RunningReflector};
    use natscope_probes::reflector::ReflectorConfig;
    let mut cfg = DriverConfig::new(ReflectorConfig {
        primary: sa(A1, 0),
        alternate: None,
        partner: None,
    });
    cfg.workers = 2;
    cfg.tcp = false;
    let running = RunningReflector::start(cfg).expect("port 0 is accepted without an alternate");
    let addrs = running.udp_addresses().to_vec();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert_ne!(
        addrs[0].port(),
        0,
        "udp_addresses() reports port 0, so nobody can reach this reflector"
    );
    let client = udp_client(A1).await;
    let resp = udp_binding(
        &client,
        addrs[0],
        TransactionId::random(),
        &RequestOptions::default(),
    )
    .await;
    assert_eq!(resp.response_origin, resp.source, "{resp:?}");
    drop(running);
}

/// `probe --public-rfc5780` picks, of servers asked at once, the first in list order whose answer
/// carries a usable OTHER-ADDRESS: not a silent one, not a one-address one (no OTHER-ADDRESS),
/// even when those come first in the list.
#[tokio::test]
async fn the_public_rfc5780_pick_skips_silent_and_one_address_servers() {
    use natscope_probes::client::{first_rfc5780, Rto};
    let one_address = TestReflector::start_with(false, |_| {});
    let full = TestReflector::start();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent = silent.local_addr().expect("addr");
    let rto = Rto {
        initial: Duration::from_millis(50),
        max_transmits: 3,
        last_wait_multiplier: 2,
        max_rto: Duration::from_millis(200),
    };
    let picked = first_rfc5780(&[silent, one_address.primary, full.primary], rto).await;
    assert_eq!(picked, Some(full.primary));
    assert_eq!(
        first_rfc5780(&[silent, one_address.primary], rto).await,
        None
    );
}
