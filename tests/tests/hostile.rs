//! Hostile input at an in-process reflector: malformed and mutated datagrams, oversized ones, a
//! flood from one source, garbage and half-finished TCP streams, and more connections than the
//! reflector holds. Afterwards the same reflector still answers valid requests correctly, the
//! counters account for every datagram, nothing invalid was answered, and no answer exceeded the
//! documented amplification bound (RFC 5780 §9). Everything is bounded in count and time.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use natscope_probes::client::{transact_tcp, transact_udp, RequestOptions};
use natscope_probes::reflector::driver::CounterSnapshot;
use natscope_probes::reflector::MAX_AMPLIFICATION_BYTES;
use natscope_probes::stun::{
    attr_type, ChangeRequest, Class, Message, MessageType, TransactionId, HEADER_LEN,
};
use natscope_tests::{
    binding_request, exchange_raw, request_with, sa, udp_client, TestReflector, A1, A3, FAST_RTO,
    NEGATIVE_RTO,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Datagrams sent per source IP in the malformed-input phase: below the default burst (400) even
/// if two of the source IPs share a rate-limiter slot, so none of them is rate limited and every
/// one reaches the parser.
const PER_SOURCE: usize = 150;
/// Valid requests in the single-source flood: several times the default burst.
const FLOOD: usize = 3000;
/// Connections opened at once against a reflector that holds at most [`MAX_CONNS`].
const CONNS: usize = 100;
const MAX_CONNS: usize = 64;
/// The whole test must end well inside this.
const TEST_BUDGET: Duration = Duration::from_secs(90);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// What a datagram is, and whether the reflector may answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// Random bytes whose first two bits are not zero (RFC 8489 §5: not STUN).
    NotStun,
    /// Random bytes after a STUN-looking first byte, with a length field that cannot match.
    RandomStunish,
    /// A valid request cut short (shorter than its header says; some shorter than a header).
    Truncated,
    /// A valid request whose header length field is wrong or not a multiple of 4.
    BadLength,
    /// An attribute whose length runs past the end of the message.
    AttributeOverrun,
    /// FINGERPRINT that does not match, or that is not the last attribute.
    BadFingerprint,
    /// Responses and indications: answering them would let two reflectors loop.
    NotRequest,
    /// Well-formed STUN longer than the reflector's receive buffer (2049..=65000 bytes).
    Oversized,
    /// A valid request with random bytes changed: may be answered, dropped or refused.
    Mutated,
}

impl Kind {
    fn must_be_dropped(self) -> bool {
        self != Kind::Mutated
    }
}

fn valid_request(rng: &mut StdRng, tid: &TransactionId) -> Vec<u8> {
    let change = [
        ChangeRequest::NONE,
        ChangeRequest::IP,
        ChangeRequest::PORT,
        ChangeRequest::BOTH,
    ][rng.gen_range(0..4)];
    let o = RequestOptions {
        change,
        padding: rng.gen_bool(0.3).then(|| rng.gen_range(1..200)),
        fingerprint: rng.gen_bool(0.5),
        ..Default::default()
    };
    binding_request(tid, &o)
}

fn set_length(msg: &mut [u8], len: u16) {
    msg[2..4].copy_from_slice(&len.to_be_bytes());
}

/// One hostile datagram of `kind`, plus the transaction ID an answer would carry.
fn hostile_datagram(rng: &mut StdRng, kind: Kind) -> Vec<u8> {
    let tid = TransactionId::random();
    match kind {
        Kind::NotStun => {
            let mut d: Vec<u8> = (0..rng.gen_range(1..600)).map(|_| rng.gen()).collect();
            d[0] |= 0x40 << rng.gen_range(0..2);
            d
        }
        Kind::RandomStunish => {
            let n = rng.gen_range(0..600);
            let mut d: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if n > 0 {
                d[0] &= 0x3F;
            }
            if n >= 4 {
                // A length field that is aligned but never the real one.
                let wrong = ((n as u16).wrapping_sub(HEADER_LEN as u16) & !3).wrapping_add(4);
                set_length(&mut d, wrong);
            }
            d
        }
        Kind::Truncated => {
            let mut d = valid_request(rng, &tid);
            d.truncate(rng.gen_range(0..d.len()));
            d
        }
        Kind::BadLength => {
            let mut d = valid_request(rng, &tid);
            let body = (d.len() - HEADER_LEN) as u16;
            let wrong = match rng.gen_range(0..4) {
                0 => body + 4,
                1 => body.wrapping_sub(4),
                2 => body + 1 + rng.gen_range(0..3),
                _ => 0xFFFC,
            };
            set_length(&mut d, wrong);
            d
        }
        Kind::AttributeOverrun => {
            let pad = rng.gen_range(4..64);
            let mut d = binding_request(
                &tid,
                &RequestOptions {
                    padding: Some(pad),
                    ..Default::default()
                },
            );
            // PADDING is the only attribute, at offset 20: claim more than the message holds.
            let claimed = (pad + 4 + rng.gen_range(1..100)) as u16;
            d[22..24].copy_from_slice(&claimed.to_be_bytes());
            d
        }
        Kind::BadFingerprint => {
            if rng.gen_bool(0.5) {
                let mut d = binding_request(
                    &tid,
                    &RequestOptions {
                        fingerprint: true,
                        ..Default::default()
                    },
                );
                let i = if rng.gen_bool(0.5) {
                    d.len() - 1 // the CRC itself
                } else {
                    rng.gen_range(8..d.len() - 8) // the transaction ID, covered by the CRC
                };
                d[i] ^= 1 << rng.gen_range(0..8);
                d
            } else {
                // FINGERPRINT followed by another attribute.
                request_with(
                    MessageType::BINDING_REQUEST,
                    &tid,
                    |w| {
                        w.add_raw(attr_type::FINGERPRINT, &[0, 0, 0, 0]).unwrap();
                        w.add_software("after the fingerprint").unwrap();
                    },
                    false,
                )
            }
        }
        Kind::NotRequest => {
            let typ = match rng.gen_range(0..3) {
                0 => MessageType::BINDING_RESPONSE,
                1 => MessageType::BINDING_ERROR,
                _ => MessageType::new(Class::Indication, 0x001),
            };
            request_with(
                typ,
                &tid,
                |w| {
                    w.add_xor_address(attr_type::XOR_MAPPED_ADDRESS, sa(A1, 3478))
                        .unwrap()
                },
                rng.gen_bool(0.5),
            )
        }
        Kind::Oversized => {
            let size = match rng.gen_range(0..4) {
                0 => 2049,
                1 => 65_000,
                _ => rng.gen_range(2049..=65_000),
            };
            // Aligned, with PADDING filling the message: well-formed, just too long.
            let size = size & !3;
            let size = size.max(2052);
            let mut buf = vec![0u8; size];
            let mut w = natscope_probes::stun::MessageWriter::new(
                &mut buf,
                MessageType::BINDING_REQUEST,
                &tid,
            )
            .unwrap();
            w.add_padding(size - HEADER_LEN - 4).unwrap();
            let n = w.finish();
            buf.truncate(n);
            buf
        }
        Kind::Mutated => {
            let mut d = valid_request(rng, &tid);
            for _ in 0..rng.gen_range(1..=4) {
                let i = rng.gen_range(0..d.len());
                d[i] = rng.gen();
            }
            d
        }
    }
}

fn tid_of(d: &[u8]) -> Option<[u8; 16]> {
    d.get(4..20).map(|s| s.try_into().expect("16 bytes"))
}

/// Polls the counters until `done` holds (bounded by `timeout`); returns the last snapshot.
async fn wait_counters(
    r: &TestReflector,
    timeout: Duration,
    done: impl Fn(&CounterSnapshot) -> bool,
) -> (bool, CounterSnapshot) {
    let deadline = Instant::now() + timeout;
    loop {
        let c = r.counters();
        if done(&c) {
            return (true, c);
        }
        if Instant::now() >= deadline {
            return (false, c);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls until the counters stop changing for `quiet` (bounded by `timeout`).
async fn wait_quiet(r: &TestReflector, quiet: Duration, timeout: Duration) -> CounterSnapshot {
    let deadline = Instant::now() + timeout;
    let mut last = r.counters();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = r.counters();
        if c != last {
            last = c;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// Everything that arrives on `socket` until it has been quiet for `quiet`.
async fn drain(socket: &tokio::net::UdpSocket, quiet: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while let Ok(r) = tokio::time::timeout(quiet, socket.recv_from(&mut buf)).await {
        if let Ok((n, from)) = r {
            out.push((buf[..n].to_vec(), from));
        }
        if out.len() > 100_000 {
            break;
        }
    }
    out
}

fn delta(after: &CounterSnapshot, before: &CounterSnapshot) -> CounterSnapshot {
    CounterSnapshot {
        requests: after.requests - before.requests,
        responses: after.responses - before.responses,
        error_responses: after.error_responses - before.error_responses,
        dropped: after.dropped - before.dropped,
        rate_limited: after.rate_limited - before.rate_limited,
        forwarded: after.forwarded - before.forwarded,
        link_accepted: after.link_accepted - before.link_accepted,
        link_refused: after.link_refused - before.link_refused,
        tcp_connections: after.tcp_connections - before.tcp_connections,
        tcp_refused: after.tcp_refused - before.tcp_refused,
        ..Default::default()
    }
}

/// Phase 1: every kind of malformed datagram, from many source IPs, paced so the kernel never
/// drops one. Returns how many must have been dropped.
async fn malformed_datagrams(r: &TestReflector, rng: &mut StdRng) -> u64 {
    let kinds = [
        (Kind::NotStun, 300),
        (Kind::RandomStunish, 300),
        (Kind::Truncated, 400),
        (Kind::BadLength, 300),
        (Kind::AttributeOverrun, 200),
        (Kind::BadFingerprint, 300),
        (Kind::NotRequest, 300),
        (Kind::Oversized, 120),
        (Kind::Mutated, 600),
    ];
    let mut corpus: Vec<(Kind, Vec<u8>)> = kinds
        .iter()
        .flat_map(|&(k, n)| (0..n).map(move |_| k))
        .map(|k| (k, hostile_datagram(rng, k)))
        .collect();
    // Interleave kinds so every source IP sends a mix.
    for i in (1..corpus.len()).rev() {
        corpus.swap(i, rng.gen_range(0..=i));
    }

    let before = r.counters();
    let targets = r.server_addresses();
    let mut sockets = Vec::new();
    let mut sent_by_tid: HashMap<[u8; 16], (Kind, usize)> = HashMap::new();
    let mut must_drop = 0u64;
    let mut sent = 0u64;
    let mut batch_bytes = 0usize;
    for (i, (kind, d)) in corpus.iter().enumerate() {
        if i % PER_SOURCE == 0 {
            sockets.push(udp_client(ip(10 + (i / PER_SOURCE) as u8)).await);
        }
        let sock = sockets.last().expect("a socket");
        let to = targets[i % targets.len()];
        sock.send_to(d, to)
            .await
            .unwrap_or_else(|e| panic!("send {} bytes ({kind:?}) to {to}: {e}", d.len()));
        sent += 1;
        must_drop += u64::from(kind.must_be_dropped());
        if let Some(t) = tid_of(d) {
            let e = sent_by_tid.entry(t).or_insert((*kind, 0));
            e.1 = e.1.max(d.len());
            if *kind == Kind::Mutated {
                e.0 = Kind::Mutated;
            }
        }
        // Pace on what the reflector has read, not on time: at most ~128 KiB or 64 datagrams in
        // flight, so a small kernel receive buffer cannot drop any.
        batch_bytes += d.len() + 512;
        if batch_bytes > 128 * 1024 || i % 64 == 63 {
            let target = before.requests + sent;
            let (ok, c) = wait_counters(r, Duration::from_secs(5), |c| c.requests >= target).await;
            assert!(
                ok,
                "reflector read {} of {target} datagrams: {c:?}",
                c.requests
            );
            batch_bytes = 0;
        }
    }
    let target = before.requests + sent;
    let (ok, _) = wait_counters(r, Duration::from_secs(5), |c| c.requests >= target).await;
    assert!(ok, "the reflector did not read every datagram");
    let after = wait_quiet(r, Duration::from_millis(100), Duration::from_secs(5)).await;
    let d = delta(&after, &before);

    let mut answers = Vec::new();
    for s in &sockets {
        answers.extend(drain(s, Duration::from_millis(50)).await);
    }
    let mut answered_mutated = 0u64;
    for (bytes, from) in &answers {
        let msg = Message::parse(bytes)
            .unwrap_or_else(|e| panic!("the reflector sent malformed stun from {from}: {e}"));
        assert!(
            matches!(
                msg.message_type().class,
                Class::SuccessResponse | Class::ErrorResponse
            ),
            "the reflector sent a {:?}",
            msg.message_type()
        );
        let t = msg.transaction_id().0;
        let Some(&(kind, req_len)) = sent_by_tid.get(&t) else {
            panic!("answer from {from} to a transaction nobody sent");
        };
        assert_eq!(
            kind,
            Kind::Mutated,
            "a {kind:?} datagram was answered by {from}: {bytes:02x?}"
        );
        assert!(
            bytes.len() <= req_len + MAX_AMPLIFICATION_BYTES,
            "answer of {} bytes to a {req_len}-byte request exceeds the amplification bound",
            bytes.len()
        );
        answered_mutated += 1;
    }

    eprintln!(
        "malformed phase: sent {sent} datagrams from {} source ips ({must_drop} invalid by \
         construction), reflector counters delta {d:?}, answers received {}",
        sockets.len(),
        answers.len()
    );
    assert_eq!(d.requests, sent, "every datagram was read: {d:?}");
    assert_eq!(d.rate_limited, 0, "no source exceeded its burst: {d:?}");
    assert_eq!(
        d.dropped + d.responses,
        sent,
        "every datagram was answered or dropped: {d:?}"
    );
    assert!(
        d.dropped >= must_drop,
        "{must_drop} invalid datagrams, only {} dropped: {d:?}",
        d.dropped
    );
    // A mutation can turn PADDING into RESPONSE-PORT and aim an answer elsewhere on the
    // sender's IP, so the answers seen are at most the answers counted.
    assert!(
        answered_mutated <= d.responses,
        "{answered_mutated} answers seen, {} counted",
        d.responses
    );
    must_drop
}

/// Phase 2: a flood of valid requests from 127.0.0.1 is cut down to the per-IP budget.
async fn flood_from_one_source(r: &TestReflector) {
    let before = r.counters();
    let flooder = udp_client(A1).await;
    let started = Instant::now();
    for _ in 0..FLOOD {
        let req = binding_request(&TransactionId::random(), &RequestOptions::default());
        // A full send buffer is not the reflector's business; keep going.
        let _ = flooder.send_to(&req, r.primary).await;
    }
    let after = wait_quiet(r, Duration::from_millis(200), Duration::from_secs(10)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let d = delta(&after, &before);
    let answers = drain(&flooder, Duration::from_millis(100)).await;
    eprintln!(
        "flood phase: {FLOOD} requests in {elapsed:.2}s from {A1}; counters delta {d:?}; \
         {} answers received",
        answers.len()
    );
    assert!(d.rate_limited > 0, "the flood was not rate limited: {d:?}");
    assert_eq!(
        d.responses + d.rate_limited + d.dropped,
        d.requests,
        "every flood datagram was answered or limited: {d:?}"
    );
    // Default limit: burst 400, refill 200/s (rate_limit.rs).
    let budget = 400.0 + 200.0 * (elapsed + 0.5);
    assert!(
        (d.responses as f64) <= budget,
        "{} answers exceed the per-ip budget of {budget:.0}: {d:?}",
        d.responses
    );
    assert!(answers.len() as u64 <= d.responses);
}

/// After the flood: 127.0.0.1 is served again once its bucket refills, and another source IP is
/// served at once; both answers are correct.
async fn served_after_flood(r: &TestReflector) {
    let other = udp_client(A3).await;
    let me = other.local_addr().unwrap();
    let resp = transact_udp(
        &other,
        r.primary,
        TransactionId::random(),
        &RequestOptions {
            change: ChangeRequest::BOTH,
            ..Default::default()
        },
        FAST_RTO,
    )
    .await
    .expect("a fresh source ip is answered right after the flood");
    assert_eq!(resp.xor_mapped, Some(me), "{resp:?}");
    assert_eq!(resp.source, Some(r.alt()), "{resp:?}");
    assert_eq!(resp.response_origin, Some(r.alt()), "{resp:?}");
    assert_eq!(resp.other_address, Some(r.alt()), "{resp:?}");

    // One token refills in 5 ms at 200/s; wait for a few.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let flooder_ip = udp_client(A1).await;
    let me = flooder_ip.local_addr().unwrap();
    let resp = transact_udp(
        &flooder_ip,
        r.primary,
        TransactionId::random(),
        &RequestOptions::default(),
        FAST_RTO,
    )
    .await
    .expect("the flooding ip is answered again after its bucket refilled");
    assert_eq!(resp.xor_mapped, Some(me), "{resp:?}");
    assert_eq!(resp.source, Some(r.primary), "{resp:?}");
}

async fn tcp_from(from: IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(sa(from, 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.connect(to))
        .await
        .unwrap_or_else(|_| panic!("tcp connect to {to} timed out"))
        .unwrap_or_else(|e| panic!("tcp connect to {to}: {e}"))
}

/// Reads until the server closes; returns the bytes read, or `None` if it stayed open.
async fn read_until_closed(s: &mut tokio::net::TcpStream, timeout: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Phase 3: garbage, oversized frames, half frames and a crowd of connections over TCP.
async fn hostile_streams(r: &TestReflector, rng: &mut StdRng) -> u64 {
    let before = r.counters();
    let mut invalid = 0u64;

    // Garbage that cannot be STUN, and frames whose length exceeds the stream limit: the
    // reflector closes the connection without answering.
    for i in 0..60 {
        let to = r.server_addresses()[i % 4];
        let mut s = tcp_from(ip(40), to).await;
        let bytes: Vec<u8> = if i % 2 == 0 {
            let mut g: Vec<u8> = (0..rng.gen_range(1..3000)).map(|_| rng.gen()).collect();
            g[0] |= 0x80;
            g
        } else {
            let mut h = binding_request(&TransactionId::random(), &RequestOptions::default());
            set_length(&mut h, [0xFFFC, 0x1000, 2032][i % 3]);
            h
        };
        // The reflector may close before reading everything; a reset here is fine.
        let _ = s.write_all(&bytes).await;
        let got = read_until_closed(&mut s, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("connection {i} with invalid data was left open"));
        assert!(
            got.is_empty(),
            "invalid stream {i} was answered: {got:02x?}"
        );
        invalid += 1;
    }

    // Half a frame, then close: no answer, nothing held.
    for i in 0..60 {
        let to = r.server_addresses()[i % 4];
        let mut s = tcp_from(ip(41), to).await;
        let req = valid_request(rng, &TransactionId::random());
        let cut = rng.gen_range(1..req.len());
        s.write_all(&req[..cut]).await.unwrap();
        s.shutdown().await.unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(3))
            .await
            .expect("the reflector closes a half-closed partial stream");
        assert!(got.is_empty(), "partial frame was answered: {got:02x?}");
    }

    // A valid frame followed by garbage in the same write: one answer, then the close.
    let mut s = tcp_from(ip(42), r.primary).await;
    let tid = TransactionId::random();
    let mut bytes = binding_request(&tid, &RequestOptions::default());
    bytes.extend_from_slice(&[0xFF; 64]);
    s.write_all(&bytes).await.unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(3))
        .await
        .expect("closed after the garbage");
    let answer = natscope_probes::client::BindingResponse::parse(&got, &tid, None)
        .expect("exactly one answer before the close");
    assert_eq!(answer.xor_mapped, Some(s.local_addr().unwrap()));
    invalid += 1;

    // More connections than the reflector holds: the surplus is closed on accept, the rest
    // stay open and idle.
    let mut crowd = Vec::new();
    for _ in 0..CONNS {
        crowd.push(tcp_from(ip(43), r.primary).await);
    }
    let base = before.tcp_connections + before.tcp_refused + 60 + 60 + 1;
    let (ok, c) = wait_counters(r, Duration::from_secs(5), |c| {
        c.tcp_connections + c.tcp_refused >= base + CONNS as u64
    })
    .await;
    assert!(
        ok,
        "the reflector did not accept all {CONNS} connections: {c:?}"
    );
    let refused = c.tcp_refused - before.tcp_refused;
    assert!(
        refused >= 1 && refused <= CONNS as u64,
        "with {CONNS} connections against a cap of {MAX_CONNS}, {refused} refused: {c:?}"
    );
    let mut closed = 0;
    for s in &mut crowd {
        if read_until_closed(s, Duration::from_millis(20))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    eprintln!(
        "tcp phase: {CONNS} simultaneous connections, {refused} refused by the reflector, \
         {closed} seen closed by the client"
    );
    assert!(closed >= 1, "no surplus connection was closed");
    drop(crowd);

    let d = delta(&r.counters(), &before);
    eprintln!("tcp phase counters delta: {d:?}");
    assert!(d.dropped >= invalid, "{invalid} invalid streams, {d:?}");
    invalid
}

/// After the crowd leaves, a new TCP client is served (permits come back asynchronously, so
/// retry briefly).
async fn tcp_served_after(r: &TestReflector) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = tcp_from(A3, r.primary).await;
        let me = s.local_addr().unwrap();
        match transact_tcp(
            &mut s,
            TransactionId::random(),
            &RequestOptions::default(),
            Duration::from_secs(2),
        )
        .await
        {
            Ok(resp) => {
                assert_eq!(resp.xor_mapped, Some(me), "{resp:?}");
                assert_eq!(resp.response_origin, Some(r.primary), "{resp:?}");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("tcp retry after the crowd: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no tcp service after the hostile phase: {e}"),
        }
    }
}

#[tokio::test]
async fn hostile_datagrams_and_streams_are_dropped_and_service_continues() {
    // The crowd comes from one address: lift the per-source cap (reflector_tcp_abuse.rs tests
    // it) so that the total cap is what this test meets.
    let r = TestReflector::start_with(true, |c| {
        c.tcp_limits.max_connections = MAX_CONNS;
        c.tcp_limits.max_per_source = CONNS;
    });
    let seed: u64 = rand::random();
    eprintln!(
        "hostile input seed {seed} (reflector {} + {})",
        r.primary,
        r.alt()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let body = async {
        let before = r.counters();
        let udp_invalid = malformed_datagrams(&r, &mut rng).await;
        flood_from_one_source(&r).await;
        served_after_flood(&r).await;
        let tcp_invalid = hostile_streams(&r, &mut rng).await;
        tcp_served_after(&r).await;
        let d = delta(&r.counters(), &before);
        eprintln!("hostile test total counters delta: {d:?}");
        assert!(d.dropped >= udp_invalid + tcp_invalid, "{d:?}");
        assert!(d.rate_limited > 0, "{d:?}");
        assert!(d.tcp_refused > 0, "{d:?}");
    };
    tokio::time::timeout(TEST_BUDGET, body)
        .await
        .unwrap_or_else(|_| panic!("hostile test exceeded {TEST_BUDGET:?} (seed {seed})"));
    // Finally, a plain request on every address from a fresh source still gets the right answer.
    for &to in &r.server_addresses() {
        let c = udp_client(A3).await;
        let resp = transact_udp(
            &c,
            to,
            TransactionId::random(),
            &RequestOptions::default(),
            FAST_RTO,
        )
        .await
        .unwrap_or_else(|e| panic!("{to} after the hostile input: {e}"));
        assert_eq!(resp.source, Some(to));
        assert_eq!(resp.xor_mapped, Some(c.local_addr().unwrap()));
    }
}

/// A datagram longer than the reflector's receive buffer whose first 2048 bytes happen to form a
/// complete message must be dropped like any other datagram whose length disagrees with its
/// header (RFC 8489 §6.3), not answered as if the kernel's truncation were the message.
#[tokio::test]
async fn datagram_truncated_by_the_receive_buffer_is_not_answered() {
    let r = TestReflector::start();
    let client = udp_client(A3).await;
    let tid = TransactionId::random();
    // 20-byte header + one comprehension-optional attribute of 2024 bytes = exactly 2048 bytes,
    // then 952 bytes the header does not account for.
    let mut d = request_with(
        MessageType::BINDING_REQUEST,
        &tid,
        |w| w.add_raw(0x8001, &[0u8; 2024]).unwrap(),
        false,
    );
    assert_eq!(d.len(), 2048);
    d.extend_from_slice(&[0xAB; 952]);
    assert!(
        Message::parse(&d).is_err(),
        "the datagram as sent is not a stun message"
    );
    let got = exchange_raw(&client, &client, r.primary, &d, &tid, NEGATIVE_RTO).await;
    assert!(
        got.is_none(),
        "a 3000-byte datagram whose header says 2048 bytes was answered: {got:?}"
    );
}
