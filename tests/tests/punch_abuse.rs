//! Issue 14, the server's part: attacks on the rendezvous server and relay.
//!
//! - A spoofed-source REGISTER/CONNECT creates no state and gets no answer larger than itself.
//! - A CONNECT flood (spoofed, and from one real source) cannot lock a real connector out.
//! - Must-show 5: on loopback, N abusive sources cannot take more than their quota, and an honest
//!   pair's relayed throughput and latency stay within 2× of an idle server (bounded time and
//!   packets; every socket on 127.0.0.0/8).
//!
//! The first two drive the sans-IO server (and the real listener machine) directly: a spoofed
//! source cannot be sent from an unprivileged test, and the core is where the decision is made.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use natscope_probes::punch::codec::{self, PunchMessage, COOKIE_LEN};
use natscope_probes::punch::identity::{Identity, Purpose};
use natscope_probes::punch::limits::ServeLimits;
use natscope_probes::punch::listener::{ListenEvent, ListenOptions, Listener};
use natscope_probes::punch::peer::PeerMachine;
use natscope_probes::punch::server::{RendezvousServer, ServerConfig};
use natscope_probes::punch::table::Endpoint;
use natscope_probes::punch::{SessionId, Transport};
use natscope_probes::stun::TransactionId;
use rand::rngs::StdRng;
use rand::SeedableRng;

const SERVER: &str = "198.51.100.1:3490";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn udp(remote: SocketAddr) -> Endpoint {
    Endpoint {
        transport: Transport::Udp,
        local: sa(SERVER),
        remote,
    }
}

fn tid(rng: &mut StdRng) -> TransactionId {
    TransactionId::from_rng(rng)
}

/// Each id's own key: the seed is the id, zero-padded (ids are at most 64 bytes; these are short).
fn key_of(id: &str) -> Identity {
    let mut seed = [0u8; 32];
    for (s, b) in seed.iter_mut().zip(id.bytes()) {
        *s = b;
    }
    Identity::from_seed(seed)
}

fn register(rng: &mut StdRng, id: &str) -> PunchMessage {
    let tid = tid(rng);
    PunchMessage::Register {
        tid,
        id: id.into(),
        candidates: vec![],
        port_delta: None,
        proof: key_of(id).prove(Purpose::Register, &tid, id),
    }
}

fn connect(rng: &mut StdRng, target: &str) -> PunchMessage {
    PunchMessage::Connect {
        tid: tid(rng),
        target: target.into(),
        candidates: vec![],
        port_delta: None,
        punch_window_ms: None,
    }
}

fn bytes(m: &PunchMessage, cookie: Option<[u8; COOKIE_LEN]>) -> Vec<u8> {
    let b = m.to_vec().expect("enc");
    match cookie {
        Some(c) => codec::with_cookie(&b, &c).expect("cookie"),
        None => b,
    }
}

/// Sends `m` from `from` as a real peer does: once with a zero cookie, then with the
/// challenge's. Returns the answers to the second copy.
fn verified(
    s: &mut RendezvousServer,
    now: Instant,
    from: Endpoint,
    m: &PunchMessage,
) -> Vec<(SocketAddr, Vec<u8>)> {
    s.handle(now, from, &bytes(m, Some([0; COOKIE_LEN])));
    let challenge = s.poll_transmit().expect("a challenge");
    let c = codec::cookie(&challenge.payload).expect("cookie");
    s.handle(now, from, &bytes(m, Some(c)));
    std::iter::from_fn(|| s.poll_transmit())
        .map(|t| (t.destination, t.payload))
        .collect()
}

#[test]
fn spoofed_register_and_connect_get_no_state_and_no_larger_answer() {
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    let mut s = RendezvousServer::new(ServerConfig::default(), StdRng::seed_from_u64(2));
    // The real owner of an address, whose cookie an attacker elsewhere cannot see.
    let victim = udp(sa("203.0.113.7:4000"));
    let owner = udp(sa("203.0.113.1:4000"));
    verified(&mut s, t0, owner, &register(&mut rng, "alice"));
    assert_eq!(s.table().peer_count(), 1);
    let sessions = s.table().session_count();
    // A cookie minted for the attacker's own address does not work from the victim's.
    let attacker = udp(sa("192.0.2.66:5000"));
    s.handle(
        t0,
        attacker,
        &bytes(&register(&mut rng, "x"), Some([0; 16])),
    );
    let theirs = codec::cookie(&s.poll_transmit().expect("challenge").payload).expect("cookie");
    let forged: [[u8; COOKIE_LEN]; 3] = [[0; COOKIE_LEN], [0xff; COOKIE_LEN], theirs];
    for cookie in [None, Some(forged[0]), Some(forged[1]), Some(forged[2])] {
        for m in [
            register(&mut rng, "mallory"),
            register(&mut rng, "alice"),
            connect(&mut rng, "alice"),
        ] {
            let req = bytes(&m, cookie);
            s.handle(t0, victim, &req);
            let out: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
            let sent: usize = out.iter().map(|t| t.payload.len()).sum();
            assert!(
                sent <= req.len(),
                "{sent} bytes answered to a {}-byte spoofed request",
                req.len()
            );
            assert!(out.iter().all(|t| t.destination == victim.remote));
            assert!(out.len() <= 1, "at most the challenge: {out:?}");
            if let Some(t) = out.first() {
                assert!(matches!(
                    PunchMessage::decode(&t.payload),
                    Ok(PunchMessage::Error { code: 401, .. })
                ));
            }
        }
    }
    assert_eq!(
        s.table().peer_count(),
        1,
        "no registration from a spoofed source"
    );
    assert_eq!(s.table().session_count(), sessions, "no session either");
    assert_eq!(
        s.table().registered(t0, Transport::Udp, "alice"),
        Some(owner),
        "alice is still the owner's"
    );
}

/// The server and a real listener machine wired together on a virtual clock; returns the
/// listener's events.
fn deliver_to_listener(
    s: &mut RendezvousServer,
    l: &mut Listener,
    now: Instant,
    listener_at: SocketAddr,
) {
    for _ in 0..4 {
        let out: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
        for t in out {
            if t.destination == listener_at {
                l.handle_datagram(now, sa(SERVER), &t.payload);
            }
        }
        l.handle_timeout(now);
        for t in std::iter::from_fn(|| l.poll_transmit()) {
            if t.destination == sa(SERVER) {
                s.handle(now, udp(listener_at), &t.payload);
            }
        }
    }
}

#[test]
fn a_connect_flood_cannot_stop_a_real_connector() {
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(3);
    let mut s = RendezvousServer::new(ServerConfig::default(), StdRng::seed_from_u64(4));
    let bob_at = sa("203.0.113.1:4000");
    let mut l = Listener::new(
        t0,
        ListenOptions {
            id: "bob".into(),
            server: sa(SERVER),
            transport: Transport::Udp,
            count: None,
            timeout: None,
            punch_window: Duration::from_millis(1500),
            predict: false,
            identity: key_of("bob"),
        },
        StdRng::seed_from_u64(5),
    );
    l.start(t0, bob_at, None);
    deliver_to_listener(&mut s, &mut l, t0, bob_at);
    assert!(
        std::iter::from_fn(|| l.poll_event()).any(|e| matches!(e, ListenEvent::Registered { .. }))
    );
    // 10,000 spoofed CONNECTs from as many addresses, and 500 from one real attacker that
    // answers every challenge, all within the same second.
    let mut now = t0;
    for i in 0..10_000u32 {
        let from = udp(SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 1000)));
        s.handle(now, from, &bytes(&connect(&mut rng, "bob"), Some([0; 16])));
        deliver_to_listener(&mut s, &mut l, now, bob_at);
    }
    let attacker = udp(sa("192.0.2.66:5000"));
    for _ in 0..500 {
        now += Duration::from_millis(1);
        for (to, b) in verified(&mut s, now, attacker, &connect(&mut rng, "bob")) {
            if to == bob_at {
                l.handle_datagram(now, sa(SERVER), &b);
            }
        }
        deliver_to_listener(&mut s, &mut l, now, bob_at);
    }
    let flood_sessions = std::iter::from_fn(|| l.poll_event())
        .filter(|e| matches!(e, ListenEvent::SessionStarted { .. }))
        .count();
    // The real connector, from its own address, is introduced and the listener takes it.
    let real = udp(sa("203.0.113.2:5000"));
    let answers = verified(&mut s, now, real, &connect(&mut rng, "bob"));
    let session = answers
        .iter()
        .find_map(|(to, b)| match PunchMessage::decode(b) {
            Ok(PunchMessage::ConnectOk { session, .. }) if *to == real.remote => Some(session),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the real connector was refused: {answers:?}"));
    for (to, b) in answers {
        if to == bob_at {
            l.handle_datagram(now, sa(SERVER), &b);
        }
    }
    let started: Vec<String> = std::iter::from_fn(|| l.poll_event())
        .filter_map(|e| match e {
            ListenEvent::SessionStarted { session, .. } => Some(session),
            _ => None,
        })
        .collect();
    assert_eq!(
        started,
        vec![SessionId::to_string(&session)],
        "the listener took the real connector ({flood_sessions} flood sessions before it)"
    );
    assert!(
        flood_sessions <= ServerConfig::default().table.sessions_per_source,
        "{flood_sessions} sessions from one attacker"
    );
}

// ---------------------------------------------------------------------------------------------
// Must-show 5: a bounded load test on loopback.

/// A raw protocol client on its own loopback address.
struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    cookie: [u8; COOKIE_LEN],
    rng: StdRng,
}

impl Client {
    fn new(ip: [u8; 4], server: SocketAddr, seed: u64) -> Self {
        let sock = UdpSocket::bind(SocketAddr::from((ip, 0))).expect("bind loopback");
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        Self {
            sock,
            server,
            cookie: [0; COOKIE_LEN],
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Sends a request (answering one challenge) and returns its answer, if any.
    fn request(&mut self, m: PunchMessage) -> Option<PunchMessage> {
        for _ in 0..4 {
            let b = bytes(&m, Some(self.cookie));
            self.sock.send_to(&b, self.server).ok()?;
            let deadline = Instant::now() + Duration::from_millis(500);
            let mut buf = [0u8; 2048];
            loop {
                if Instant::now() > deadline {
                    return None;
                }
                let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                    return None;
                };
                let Ok(a) = PunchMessage::decode(&buf[..n]) else {
                    continue;
                };
                if a.tid() != m.tid() {
                    continue;
                }
                if let Some(c) = codec::cookie(&buf[..n]) {
                    self.cookie = c;
                }
                if codec::challenged(&buf[..n], &a).is_some() {
                    break;
                }
                return Some(a);
            }
        }
        None
    }

    fn register(&mut self, id: &str) -> bool {
        let m = register(&mut self.rng, id);
        matches!(self.request(m), Some(PunchMessage::RegisterOk { .. }))
    }

    fn connect(&mut self, id: &str) -> Option<SessionId> {
        let m = connect(&mut self.rng, id);
        match self.request(m) {
            Some(PunchMessage::ConnectOk { session, .. }) => Some(session),
            _ => None,
        }
    }
}

fn data(session: SessionId, seq: u64, payload: usize) -> Vec<u8> {
    PunchMessage::Data {
        tid: {
            let mut t = [seq as u8; 16];
            t[..4].copy_from_slice(&natscope_probes::stun::MAGIC_COOKIE.to_be_bytes());
            TransactionId(t)
        },
        session,
        seq: Some(seq),
        ack: 0,
        payload: vec![0x5a; payload],
    }
    .to_vec()
    .expect("enc")
}

/// An honest pair through the relay: `messages` of 100 bytes (under the 256 KiB circuit), 8 in flight, echoed by the
/// listener. Returns (messages per second, median round trip).
fn honest_run(server: SocketAddr, round: u8, messages: u64) -> (f64, Duration) {
    let mut l = Client::new([127, 0, 0, 100 + round], server, 100 + u64::from(round));
    let mut c = Client::new([127, 0, 0, 110 + round], server, 110 + u64::from(round));
    let id = format!("honest{round}");
    assert!(l.register(&id), "the honest listener registers");
    let session = c.connect(&id).expect("the honest connector gets a session");
    // The listener acknowledges INTRODUCE, then echoes every relayed DATA back through the relay.
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop.clone();
        let sock = l.sock.try_clone().expect("clone");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                match PunchMessage::decode(&buf[..n]) {
                    Ok(PunchMessage::Introduce { tid, session, .. }) => {
                        let ok = PunchMessage::IntroduceOk { tid, session };
                        let _ = sock.send_to(&ok.to_vec().expect("enc"), from);
                    }
                    Ok(PunchMessage::Data { .. }) => {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                    _ => {}
                }
            }
        })
    };
    let started = Instant::now();
    let mut sent_at = std::collections::HashMap::new();
    let mut rtts = Vec::new();
    let (mut next, window) = (0u64, 8u64);
    let mut buf = [0u8; 2048];
    c.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = started + Duration::from_secs(30);
    while (rtts.len() as u64) < messages && Instant::now() < deadline {
        while next < messages && sent_at.len() < window as usize {
            c.sock
                .send_to(&data(session, next, 100), server)
                .expect("send");
            sent_at.insert(next, Instant::now());
            next += 1;
        }
        match c.sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Ok(PunchMessage::Data { seq: Some(q), .. }) = PunchMessage::decode(&buf[..n])
                {
                    if let Some(t) = sent_at.remove(&q) {
                        rtts.push(t.elapsed());
                    }
                }
            }
            // A loss: send the window again under new numbers.
            Err(_) => sent_at.clear(),
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo thread");
    assert_eq!(
        rtts.len() as u64,
        messages,
        "every honest message came back"
    );
    rtts.sort();
    (
        messages as f64 / elapsed.as_secs_f64(),
        rtts[rtts.len() / 2],
    )
}

/// What one abusive source got: registrations, sessions and relayed bytes that came back.
#[derive(Debug, Default)]
struct Took {
    registrations: usize,
    sessions: usize,
    relayed_bytes: usize,
    packets_sent: usize,
}

/// Takes all it can: 20 ids, 40 sessions, then relays 1000-byte messages to itself through
/// every session it got until `stop` (at most `max_packets`).
fn abuse(server: SocketAddr, k: u8, stop: Arc<AtomicBool>, max_packets: usize) -> Took {
    let mut c = Client::new([127, 0, 1, k], server, 1000 + u64::from(k));
    let mut took = Took::default();
    for i in 0..20 {
        took.registrations += usize::from(c.register(&format!("ab{k}-{i}")));
    }
    let mut sessions = Vec::new();
    for _ in 0..40 {
        if let Some(s) = c.connect(&format!("ab{k}-0")) {
            sessions.push(s);
        }
    }
    took.sessions = sessions.len();
    c.sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 2048];
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) && took.packets_sent < max_packets && !sessions.is_empty() {
        for s in &sessions {
            let _ = c.sock.send_to(&data(*s, seq, 1000), server);
            seq += 1;
            took.packets_sent += 1;
        }
        while let Ok((n, _)) = c.sock.recv_from(&mut buf) {
            if let Ok(PunchMessage::Data { .. }) = PunchMessage::decode(&buf[..n]) {
                took.relayed_bytes += n;
            }
        }
        // A bounded offered load (about 200 packets/s per session): the test is about quotas,
        // not about out-running the server's CPU with raw packets.
        std::thread::sleep(Duration::from_millis(5));
    }
    took
}

#[test]
fn abusive_sources_get_their_quota_and_an_honest_pair_keeps_its_speed() {
    let limits = ServeLimits {
        listen: vec![sa("127.0.0.1:0")],
        stats_interval: 0,
        peers_per_source: 4,
        sessions_per_source: 4,
        request_rate: 1000,
        circuit_bytes: 256 << 10,
        circuit_rate: 4 << 20,
        ..ServeLimits::default()
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_limits = limits.clone();
    let server_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            natscope_probes::punch::driver::serve_with(
                &server_limits.listen,
                &server_limits,
                async {
                    let _ = stop_rx.await;
                },
                |bound| {
                    let _ = ready_tx.send(bound[0]);
                },
            )
            .await
            .expect("serve");
        });
    });
    let server = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server up");
    const MESSAGES: u64 = 500;
    let (idle_rate, idle_rtt) = honest_run(server, 0, MESSAGES);

    const ABUSERS: u8 = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let abusers: Vec<_> = (1..=ABUSERS)
        .map(|k| {
            let stop = stop.clone();
            std::thread::spawn(move || abuse(server, k, stop, 20_000))
        })
        .collect();
    // Let them take what they can before the honest pair measures again.
    std::thread::sleep(Duration::from_millis(1500));
    let (loaded_rate, loaded_rtt) = honest_run(server, 1, MESSAGES);
    stop.store(true, Ordering::Relaxed);
    let took: Vec<Took> = abusers
        .into_iter()
        .map(|a| a.join().expect("abuser"))
        .collect();
    let _ = stop_tx.send(());
    server_thread.join().expect("server thread");

    let sent: usize = took.iter().map(|t| t.packets_sent).sum();
    eprintln!(
        "idle: {idle_rate:.0} msg/s, median rtt {idle_rtt:?}; under {ABUSERS} abusive sources \
         ({sent} packets of 1000 bytes): {loaded_rate:.0} msg/s, median rtt {loaded_rtt:?}"
    );
    for (k, t) in took.iter().enumerate() {
        eprintln!("abuser {k}: {t:?}");
        assert!(t.registrations <= limits.peers_per_source, "{t:?}");
        assert!(t.sessions <= limits.sessions_per_source, "{t:?}");
        // Each circuit carries at most its byte limit (one packet's slack).
        let bound = t.sessions * (limits.circuit_bytes as usize + 1100);
        assert!(t.relayed_bytes <= bound, "{t:?} (bound {bound})");
    }
    assert!(took.iter().any(|t| t.sessions > 0), "the abusers did run");
    assert!(
        loaded_rate >= idle_rate / 2.0,
        "throughput {loaded_rate:.0} msg/s under abuse vs {idle_rate:.0} idle"
    );
    // Loopback round trips are tens of microseconds: allow 2× or one millisecond of scheduling.
    assert!(
        loaded_rtt <= (idle_rtt * 2).max(idle_rtt + Duration::from_millis(1)),
        "median rtt {loaded_rtt:?} under abuse vs {idle_rtt:?} idle"
    );
}

/// The benchmark of the note (not a pass/fail test): CPU per relayed packet in the server core,
/// one thread, 100-byte payloads. `cargo test -p natscope-tests --test punch_abuse relay_cpu --
/// --ignored --nocapture` (add `--release` for the number that matters).
#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
fn relay_cpu_per_packet() {
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(9);
    let config = ServerConfig {
        table: natscope_probes::punch::table::TableConfig {
            circuit: natscope_probes::punch::table::CircuitLimits {
                bytes: u64::MAX,
                rate: u64::MAX / 4,
                burst: u64::MAX / 4,
                ..Default::default()
            },
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let mut s = RendezvousServer::new(config, StdRng::seed_from_u64(10));
    let (l, c) = (udp(sa("203.0.113.1:4000")), udp(sa("203.0.113.2:5000")));
    verified(&mut s, t0, l, &register(&mut rng, "bob"));
    let session = verified(&mut s, t0, c, &connect(&mut rng, "bob"))
        .iter()
        .find_map(|(_, b)| PunchMessage::decode(b).ok()?.session())
        .expect("session");
    let packet = data(session, 1, 100);
    let n = 1_000_000u32;
    let started = Instant::now();
    let mut relayed = 0u32;
    for i in 0..n {
        let from = if i % 2 == 0 { c } else { l };
        s.handle(t0, from, &packet);
        while s.poll_transmit().is_some() {
            relayed += 1;
        }
    }
    let el = started.elapsed();
    assert_eq!(relayed, n);
    eprintln!(
        "{n} packets of {} bytes relayed in {el:?}: {:.0} packets/s, {:.0} ns per packet",
        packet.len(),
        f64::from(n) / el.as_secs_f64(),
        el.as_nanos() as f64 / f64::from(n)
    );
}
