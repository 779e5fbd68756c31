//! An in-memory network for the punch machines, stepped on a virtual clock: a rendezvous server,
//! listeners and connectors exchange datagrams that are lost, delayed (and so reordered) and
//! duplicated from a seeded generator, and a switch decides whether the peers' direct path passes
//! (as when the NATs' filters open). No sockets and no sleeps: a run of seconds takes
//! milliseconds and is the same every time.
//!
//! The tests at the bottom are the peers' end-to-end behavior: relay-first upgrade under loss and
//! reordering, relay fallback when no direct path opens, several connectors to one listener with
//! every introduction and connect request repeated, a late introduction, and a server restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::codec::PunchMessage;
use super::connector::{ConnectOptions, ConnectReport, Connector};
use super::identity::Identity;
use super::listener::{ListenEvent, ListenOptions, Listener};
use super::peer::{DualStack, PeerMachine, PunchError};
use super::server::{RendezvousServer, ServerConfig};
use super::table::Endpoint;
use super::{PathTaken, Transport};

pub(crate) const SERVER: &str = "198.51.100.1:3490";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// What the network does to datagrams.
#[derive(Clone, Copy)]
pub(crate) struct Conditions {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Each datagram takes 1 ms plus up to this much more: later ones overtake earlier ones.
    pub jitter: Duration,
    /// Probability that a datagram arrives twice (the copy later).
    pub duplicate: f64,
}

impl Conditions {
    pub(crate) const CLEAN: Self = Self {
        loss: 0.0,
        jitter: Duration::ZERO,
        duplicate: 0.0,
    };
}

struct Datagram {
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

/// See [`Net::path`].
pub(crate) type PathHook =
    Box<dyn FnMut(Instant, &mut SocketAddr, &mut SocketAddr, &PunchMessage) -> bool>;

/// The server, its peers, and the datagrams in flight between them.
pub(crate) struct Net {
    pub now: Instant,
    pub conditions: Conditions,
    /// Datagrams between two peers (not through the server) pass.
    pub direct_open: bool,
    /// Drops every message it matches, on top of `conditions` (a peer that never answers).
    pub drop_if: Option<fn(&PunchMessage) -> bool>,
    /// A malicious server: rewrites every message the server sends (issue 14).
    pub server_tamper: Option<fn(SocketAddr, &mut PunchMessage)>,
    /// The NATs between the machines: sees each datagram as sent (`now`, source, destination,
    /// message), may rewrite its addresses (a NAT's translation) and drops it by returning false
    /// (a filter, or a delay modelled as loss until some time).
    pub path: Option<PathHook>,
    rng: StdRng,
    seq: u64,
    in_flight: BTreeMap<(Instant, u64), Datagram>,
    pub server: RendezvousServer,
    pub listeners: Vec<(SocketAddr, Listener)>,
    pub connectors: Vec<(SocketAddr, Connector)>,
    /// Every event each listener reported, in order.
    pub events: Vec<Vec<ListenEvent>>,
    pub listen_outcomes: Vec<Option<Result<u64, PunchError>>>,
    pub reports: Vec<Option<Result<ConnectReport, PunchError>>>,
    /// Messages delivered, by name (`Introduce`, `Connect`, …), counting copies; `Data relayed`:
    /// DATA with a message in it delivered from the relay to a connector (echoes).
    pub delivered: BTreeMap<&'static str, u64>,
    /// Dual-stack peers (issue 13): (main address, IPv6 socket's address). A datagram a peer
    /// sends to an IPv6 destination leaves from the IPv6 address (the driver picks its socket
    /// by the destination's family), and one to the IPv6 address reaches that peer.
    pub dual: Vec<(SocketAddr, SocketAddr)>,
}

pub(crate) fn server(seed: u64) -> RendezvousServer {
    RendezvousServer::new(ServerConfig::default(), StdRng::seed_from_u64(seed))
}

fn name(m: &PunchMessage) -> &'static str {
    match m {
        PunchMessage::Register { .. } => "Register",
        PunchMessage::RegisterOk { .. } => "RegisterOk",
        PunchMessage::Unregister { .. } => "Unregister",
        PunchMessage::Connect { .. } => "Connect",
        PunchMessage::ConnectOk { .. } => "ConnectOk",
        PunchMessage::Introduce { .. } => "Introduce",
        PunchMessage::IntroduceOk { .. } => "IntroduceOk",
        PunchMessage::Probe { .. } => "Probe",
        PunchMessage::ProbeOk { .. } => "ProbeOk",
        PunchMessage::Data { .. } => "Data",
        PunchMessage::Refresh { .. } => "Refresh",
        PunchMessage::RefreshOk { .. } => "RefreshOk",
        PunchMessage::Close { .. } => "Close",
        PunchMessage::Sealed { .. } => "Sealed",
        PunchMessage::Error { .. } => "Error",
    }
}

impl Net {
    pub(crate) fn new(seed: u64, conditions: Conditions) -> Self {
        Self {
            now: Instant::now(),
            conditions,
            direct_open: true,
            drop_if: None,
            server_tamper: None,
            path: None,
            rng: StdRng::seed_from_u64(seed),
            seq: 0,
            in_flight: BTreeMap::new(),
            server: server(seed ^ 0x5e4e),
            listeners: Vec::new(),
            connectors: Vec::new(),
            events: Vec::new(),
            listen_outcomes: Vec::new(),
            reports: Vec::new(),
            delivered: BTreeMap::new(),
            dual: Vec::new(),
        }
    }

    /// Starts a listener registered as `id` at 203.0.113.(10 + its index):4000; returns its index.
    pub(crate) fn listen(&mut self, id: &str, count: Option<u64>) -> usize {
        let i = self.listeners.len();
        let local = SocketAddr::new([203, 0, 113, 10 + i as u8].into(), 4000);
        let opts = ListenOptions {
            id: id.into(),
            server: sa(SERVER),
            transport: Transport::Udp,
            count,
            timeout: None,
            punch_window: Duration::from_millis(1500),
            predict: false,
            identity: Identity::from_seed([10 + i as u8; 32]),
        };
        let mut l = Listener::new(self.now, opts, StdRng::seed_from_u64(100 + i as u64));
        l.start(self.now, local, None);
        self.listeners.push((local, l));
        self.events.push(Vec::new());
        self.listen_outcomes.push(None);
        i
    }

    /// Starts a connector at 203.0.113.(100 + its index):5000; returns its index.
    pub(crate) fn connect(&mut self, opts: ConnectOptions) -> usize {
        let j = self.connectors.len();
        let local = SocketAddr::new([203, 0, 113, 100 + j as u8].into(), 5000);
        let opts = ConnectOptions {
            server: sa(SERVER),
            ..opts
        };
        let mut c = Connector::new(self.now, opts, StdRng::seed_from_u64(200 + j as u64));
        c.start(self.now, local, None);
        self.connectors.push((local, c));
        self.reports.push(None);
        j
    }

    fn enqueue(&mut self, mut from: SocketAddr, mut to: SocketAddr, mut payload: Vec<u8>) {
        let server = sa(SERVER);
        if let (true, Some(f)) = (from == server, self.server_tamper) {
            if let Ok(mut m) = PunchMessage::decode(&payload) {
                f(to, &mut m);
                let tampered = m.to_vec().expect("a tampered message encodes");
                // The server's cookie is an attribute outside `PunchMessage`: keep it.
                payload = match super::codec::cookie(&payload) {
                    Some(c) => super::codec::with_cookie(&tampered, &c).expect("cookie fits"),
                    None => tampered,
                };
            }
        }
        if from != server && to != server && !self.direct_open {
            return;
        }
        if let (Some(f), Ok(m)) = (self.drop_if, PunchMessage::decode(&payload)) {
            if f(&m) {
                return;
            }
        }
        if let (Some(f), Ok(m)) = (self.path.as_mut(), PunchMessage::decode(&payload)) {
            if !f(self.now, &mut from, &mut to, &m) {
                return;
            }
        }
        let c = self.conditions;
        if self.rng.gen_bool(c.loss) {
            return;
        }
        let copies = if self.rng.gen_bool(c.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let jitter = c.jitter.mul_f64(self.rng.gen::<f64>());
            let at = self.now + Duration::from_millis(1) + jitter;
            self.seq += 1;
            let d = Datagram {
                from,
                to,
                payload: payload.clone(),
            };
            self.in_flight.insert((at, self.seq), d);
        }
    }

    /// Moves everything the machines queued onto the wire and collects what they reported.
    fn collect(&mut self) {
        let mut sent = Vec::new();
        while let Some(t) = self.server.poll_transmit() {
            sent.push((sa(SERVER), t.destination, t.payload));
        }
        for (i, (_, l)) in self.listeners.iter_mut().enumerate() {
            while let Some(t) = l.poll_transmit() {
                sent.push((t.source, t.destination, t.payload));
            }
            while let Some(e) = l.poll_event() {
                self.events[i].push(e);
            }
            if let Some(o) = l.poll_outcome() {
                self.listen_outcomes[i] = Some(o);
            }
        }
        for (j, (_, c)) in self.connectors.iter_mut().enumerate() {
            while let Some(t) = c.poll_transmit() {
                sent.push((t.source, t.destination, t.payload));
            }
            if let Some(o) = c.poll_outcome() {
                self.reports[j] = Some(o);
            }
        }
        for (from, to, payload) in sent {
            let from = self.source_toward(from, to);
            self.enqueue(from, to, payload);
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let machines = self
            .listeners
            .iter()
            .filter_map(|(_, l)| l.poll_timeout())
            .chain(self.connectors.iter().filter_map(|(_, c)| c.poll_timeout()))
            .chain(self.server.poll_timeout());
        let flight = self.in_flight.keys().next().map(|(t, _)| *t);
        machines.chain(flight).min()
    }

    fn deliver(&mut self, mut d: Datagram) {
        let now = self.now;
        if let Some((main, _)) = self.dual.iter().find(|(_, v6)| *v6 == d.to) {
            d.to = *main;
        }
        if let Ok(m) = PunchMessage::decode(&d.payload) {
            *self.delivered.entry(name(&m)).or_default() += 1;
            let to_connector = self.connectors.iter().any(|(a, _)| *a == d.to);
            let relayed = d.from == sa(SERVER) && to_connector;
            // Sealed (issue 14): the relay carries DATA and CLOSE only, and a box holding a DATA
            // with a payload is the one longer than 8 + 60 + 16 bytes (an ack-only DATA is 44).
            let sealed_data =
                matches!(&m, PunchMessage::Sealed { sealed: Some(b), .. } if b.len() > 84);
            if relayed && (sealed_data || matches!(m, PunchMessage::Data { seq: Some(_), .. })) {
                *self.delivered.entry("Data relayed").or_default() += 1;
            }
        }
        if d.to == sa(SERVER) {
            let ep = Endpoint {
                transport: Transport::Udp,
                local: d.to,
                remote: d.from,
            };
            self.server.handle(now, ep, &d.payload);
        } else if let Some((_, l)) = self.listeners.iter_mut().find(|(a, _)| *a == d.to) {
            l.handle_datagram(now, d.from, &d.payload);
        } else if let Some((_, c)) = self.connectors.iter_mut().find(|(a, _)| *a == d.to) {
            c.handle_datagram(now, d.from, &d.payload);
        }
    }

    /// Runs the network until `until` (virtual time) or until `done` holds.
    pub(crate) fn run(&mut self, until: Instant, done: impl Fn(&Net) -> bool) {
        loop {
            self.collect();
            if done(self) {
                return;
            }
            let Some(next) = self.next_wake() else {
                return;
            };
            if next > until {
                self.now = until;
                return;
            }
            // A machine due now is woken now; time still moves so nothing can spin.
            self.now = next.max(self.now + Duration::from_micros(100));
            while let Some(entry) = self.in_flight.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let d = entry.remove();
                self.deliver(d);
            }
            let now = self.now;
            self.server.handle_timeout(now);
            for (_, l) in &mut self.listeners {
                if l.poll_timeout().is_some_and(|t| t <= now) {
                    l.handle_timeout(now);
                }
            }
            for (_, c) in &mut self.connectors {
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.handle_timeout(now);
                }
            }
        }
    }

    /// Runs for `d` of virtual time.
    pub(crate) fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run(until, |_| false);
    }

    pub(crate) fn report(&self, j: usize) -> &ConnectReport {
        match &self.reports[j] {
            Some(Ok(r)) => r,
            other => panic!("connector {j}: {other:?}"),
        }
    }

    fn started(&self, i: usize) -> Vec<&str> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                ListenEvent::SessionStarted { session, .. } => Some(session.as_str()),
                _ => None,
            })
            .collect()
    }

    /// (session, messages echoed, error) of every session listener `i` ended.
    fn ended(&self, i: usize) -> Vec<(&str, u64, Option<&str>)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                ListenEvent::SessionEnded {
                    session,
                    messages_echoed,
                    error,
                    ..
                } => Some((session.as_str(), *messages_echoed, error.as_deref())),
                _ => None,
            })
            .collect()
    }
}

// Both address families (issue 13): a peer with a second socket, as its driver opens it.
impl Net {
    /// The source a datagram from `main` toward `to` leaves from: the peer's IPv6 socket for an
    /// IPv6 destination (what the driver does), else `main`.
    fn source_toward(&self, main: SocketAddr, to: SocketAddr) -> SocketAddr {
        match self.dual.iter().find(|(m, _)| *m == main) {
            Some((_, v6)) if to.is_ipv6() && main.is_ipv4() => *v6,
            _ => main,
        }
    }

    /// [`Net::listen`] with an IPv6 socket at `v6` (its host candidate) and `dual`'s families.
    pub(crate) fn listen_dual(&mut self, id: &str, v6: SocketAddr, mut dual: DualStack) -> usize {
        let i = self.listeners.len();
        let local = SocketAddr::new([203, 0, 113, 10 + i as u8].into(), 4000);
        let opts = ListenOptions {
            id: id.into(),
            server: sa(SERVER),
            transport: Transport::Udp,
            count: Some(1),
            timeout: None,
            punch_window: Duration::from_millis(1500),
            predict: false,
            identity: Identity::from_seed([10 + i as u8; 32]),
        };
        let mut l = Listener::new(self.now, opts, StdRng::seed_from_u64(100 + i as u64));
        dual.candidates.insert(0, v6);
        l.dual_stack(dual);
        l.start(self.now, local, None);
        self.listeners.push((local, l));
        self.events.push(Vec::new());
        self.listen_outcomes.push(None);
        self.dual.push((local, v6));
        i
    }

    /// [`Net::connect`] with an IPv6 socket at `v6` (its host candidate) and `dual`'s families.
    pub(crate) fn connect_dual(
        &mut self,
        opts: ConnectOptions,
        v6: SocketAddr,
        mut dual: DualStack,
    ) -> usize {
        let j = self.connectors.len();
        let local = SocketAddr::new([203, 0, 113, 100 + j as u8].into(), 5000);
        let opts = ConnectOptions {
            server: sa(SERVER),
            ..opts
        };
        let mut c = Connector::new(self.now, opts, StdRng::seed_from_u64(200 + j as u64));
        dual.candidates.insert(0, v6);
        c.dual_stack(dual);
        c.start(self.now, local, None);
        self.connectors.push((local, c));
        self.reports.push(None);
        self.dual.push((local, v6));
        j
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(id: &str, messages: u64) -> ConnectOptions {
        ConnectOptions {
            id: id.into(),
            messages,
            timeout: Duration::from_secs(20),
            ..ConnectOptions::default()
        }
    }

    // Under 10 % loss both ways and up to 12 ms of extra delay per datagram (2 ms between
    // messages: the network reorders them), for several seeds.
    #[test]
    fn relay_first_upgrade_loses_duplicates_and_reorders_nothing_under_loss_and_reordering() {
        let lossy = Conditions {
            loss: 0.10,
            jitter: Duration::from_millis(12),
            duplicate: 0.0,
        };
        for seed in 1..=4 {
            let mut net = Net::new(seed, lossy);
            net.direct_open = false;
            net.listen("bob", Some(1));
            net.run_for(Duration::from_millis(300));
            let c = net.connect(ConnectOptions {
                relay_first: true,
                interval: Duration::from_millis(2),
                ..opts("bob", 400)
            });
            // The stream is under way on the relay when the direct path opens (the NATs'
            // filters open), and goes on for most of a second after the switch.
            let until = net.now + Duration::from_secs(5);
            net.run(until, |n| {
                n.delivered.get("Data relayed").is_some_and(|d| *d >= 40)
            });
            net.direct_open = true;
            let until = net.now + Duration::from_secs(30);
            net.run(until, |n| {
                n.reports[c].is_some() && n.listen_outcomes[0].is_some()
            });
            let r = net.report(c);
            let why = format!("seed {seed}: {r:#?}");
            assert_eq!(r.path, PathTaken::Direct, "{why}");
            assert!(r.switched_to_direct, "{why}");
            assert_eq!(r.messages_sent, 400, "{why}");
            assert_eq!(r.messages_echoed, 400, "{why}");
            // From the numbers inside the echoes, in the order the listener echoed them: any
            // loss, duplicate or reordering across the switch (either way) makes it false.
            assert!(r.in_order, "{why}");
            let a = &r.attempts;
            assert!(a.data_sent_relayed > 0 && a.data_sent_direct > 0, "{why}");
            assert!(a.echoes_received_relayed > 0, "{why}");
            assert!(a.retransmissions > 0, "the loss was real: {why}");
            // The listener delivered (and so echoed) each message exactly once.
            assert_eq!(net.ended(0).len(), 1, "{why}");
            assert_eq!(net.ended(0)[0].1, 400, "{why}");
            assert!(matches!(net.listen_outcomes[0], Some(Ok(1))), "{why}");
        }
    }

    #[test]
    fn without_a_direct_path_the_data_goes_through_the_relay_after_the_window() {
        let lossy = Conditions {
            loss: 0.10,
            jitter: Duration::from_millis(12),
            duplicate: 0.0,
        };
        let mut net = Net::new(5, lossy);
        net.direct_open = false;
        net.listen("bob", Some(1));
        net.run_for(Duration::from_millis(300));
        let c = net.connect(opts("bob", 100));
        let until = net.now + Duration::from_secs(30);
        net.run(until, |n| n.reports[c].is_some());
        let r = net.report(c);
        assert_eq!(r.path, PathTaken::Relayed, "{r:#?}");
        assert!(!r.switched_to_direct);
        assert_eq!((r.messages_echoed, r.in_order), (100, true), "{r:#?}");
        assert_eq!(r.attempts.data_sent_direct, 0);
        assert!(r.attempts.probes_sent > 0 && r.attempts.probes_answered == 0);
        // Data waited for the end of the punch window.
        let first = r.time_to_first_byte_ms.unwrap_or_default();
        assert!(first >= 1500.0, "{first} ms");
    }

    #[test]
    fn one_listener_serves_several_connectors_once_each_despite_repeated_requests() {
        let noisy = Conditions {
            loss: 0.0,
            jitter: Duration::from_millis(5),
            duplicate: 0.5,
        };
        let mut net = Net::new(7, noisy);
        // The listener's answers to INTRODUCE never reach the server, so it sends every
        // introduction again and again; half of all datagrams (CONNECT too) arrive twice.
        net.drop_if = Some(|m| matches!(m, PunchMessage::IntroduceOk { .. }));
        net.listen("bob", Some(3));
        net.run_for(Duration::from_millis(100));
        // Messages 20 ms apart keep the sessions open while the introductions repeat.
        let slow = ConnectOptions {
            interval: Duration::from_millis(20),
            ..opts("bob", 30)
        };
        let cs: Vec<usize> = (0..3).map(|_| net.connect(slow.clone())).collect();
        let until = net.now + Duration::from_secs(20);
        net.run(until, |n| n.listen_outcomes[0].is_some());
        for &c in &cs {
            let r = net.report(c);
            assert_eq!(r.path, PathTaken::Direct, "{r:#?}");
            assert_eq!(r.messages_echoed, 30, "{r:#?}");
            assert!(r.in_order, "{r:#?}");
        }
        let sessions: std::collections::BTreeSet<_> = cs
            .iter()
            .map(|c| net.report(*c).attempts.session.clone())
            .collect();
        assert_eq!(sessions.len(), 3, "a session per connector");
        let started = net.started(0);
        assert_eq!(
            started.len(),
            3,
            "one session per introduction: {started:?}"
        );
        let ended = net.ended(0);
        assert_eq!(ended.len(), 3, "{ended:?}");
        assert!(
            ended.iter().all(|(_, n, e)| *n == 30 && e.is_none()),
            "{ended:?}"
        );
        assert!(matches!(net.listen_outcomes[0], Some(Ok(3))));
        // The repetition really happened: many more introductions and connect requests arrived
        // than sessions exist.
        assert!(net.delivered["Introduce"] > 6, "{:?}", net.delivered);
        assert!(net.delivered["Connect"] > 3, "{:?}", net.delivered);
    }

    #[test]
    fn a_late_introduction_does_not_restart_an_ended_session() {
        let mut net = Net::new(3, Conditions::CLEAN);
        net.drop_if = Some(|m| matches!(m, PunchMessage::IntroduceOk { .. }));
        net.listen("bob", None);
        net.run_for(Duration::from_millis(100));
        let c = net.connect(opts("bob", 1));
        let until = net.now + Duration::from_secs(5);
        net.run(until, |n| !n.ended(0).is_empty());
        assert_eq!(net.report(c).messages_echoed, 1);
        // The server keeps introducing the ended session until its retries run out.
        let intros = net.delivered["Introduce"];
        net.run_for(Duration::from_secs(2));
        assert!(net.delivered["Introduce"] > intros, "{:?}", net.delivered);
        assert_eq!(net.started(0).len(), 1);
        assert_eq!(net.ended(0).len(), 1);
    }

    #[test]
    fn after_a_server_restart_the_listener_re_registers_and_a_new_session_connects() {
        let jitter = Conditions {
            loss: 0.05,
            jitter: Duration::from_millis(5),
            duplicate: 0.0,
        };
        let mut net = Net::new(11, jitter);
        net.listen("bob", None);
        net.run_for(Duration::from_millis(100));
        let first = net.connect(opts("bob", 10));
        let until = net.now + Duration::from_secs(10);
        net.run(until, |n| n.reports[first].is_some());
        assert_eq!(net.report(first).messages_echoed, 10);
        // The server restarts: its table is gone.
        net.server = server(99);
        let early = net.connect(opts("bob", 10));
        let until = net.now + Duration::from_secs(5);
        net.run(until, |n| n.reports[early].is_some());
        assert!(
            matches!(net.reports[early], Some(Err(PunchError::UnknownPeer(..)))),
            "before the listener's next keepalive the new server does not know it: {:?}",
            net.reports[early]
        );
        // The listener's next keepalive registers it again.
        net.run_for(super::super::listener::KEEPALIVE + Duration::from_millis(500));
        let late = net.connect(opts("bob", 10));
        let until = net.now + Duration::from_secs(10);
        net.run(until, |n| n.reports[late].is_some());
        let r = net.report(late);
        assert_eq!(r.path, PathTaken::Direct, "{r:#?}");
        assert_eq!(r.messages_echoed, 10, "{r:#?}");
        assert!(r.in_order);
        assert!(
            net.listen_outcomes[0].is_none(),
            "the listener never gave up"
        );
    }
}

/// Issue 14's attacks on the punch peers, on the virtual clock: each of these passed (the attack
/// worked) before the peers had keys and sealed their messages.
#[cfg(test)]
mod identity_attacks {
    use super::*;
    use crate::punch::codec::code;
    use crate::punch::identity::{Identity, PeerKey, Purpose};
    use crate::punch::SessionId;
    use crate::stun::TransactionId;

    fn bob_key() -> PeerKey {
        // `Net::listen`'s first listener.
        Identity::from_seed([10; 32]).public()
    }

    fn pinned(messages: u64) -> ConnectOptions {
        ConnectOptions {
            id: "bob".into(),
            messages,
            timeout: Duration::from_secs(8),
            peer_key: Some(bob_key()),
            ..ConnectOptions::default()
        }
    }

    fn finish(net: &mut Net, c: usize) {
        let until = net.now + Duration::from_secs(30);
        net.run(until, |n| n.reports[c].is_some());
    }

    fn register_as(net: &mut Net, who: &Identity, from: &str, id: &str) {
        let tid = TransactionId::from_rng(&mut StdRng::seed_from_u64(7));
        let m = PunchMessage::Register {
            tid,
            id: id.into(),
            candidates: vec![],
            port_delta: None,
            proof: who.prove(Purpose::Register, &tid, id),
        };
        net.enqueue(sa(from), sa(SERVER), m.to_vec().expect("enc"));
    }

    #[test]
    fn an_id_held_by_one_key_cannot_be_hijacked_and_the_connector_reaches_the_key_it_named() {
        let mut net = Net::new(1, Conditions::CLEAN);
        net.listen("bob", None);
        net.run_for(Duration::from_millis(100));
        // Mallory registers "bob" with her own (valid) key from elsewhere: refused, 403.
        let mallory = Identity::from_seed([66; 32]);
        register_as(&mut net, &mallory, "203.0.113.66:4000", "bob");
        net.run_for(Duration::from_millis(50));
        let bob = net
            .server
            .table()
            .registered(net.now, Transport::Udp, "bob");
        assert_eq!(bob.map(|e| e.remote), Some(net.listeners[0].0));
        assert_eq!(
            net.server.table().key_of(Transport::Udp, "bob"),
            Some(bob_key())
        );
        assert!(net.delivered.contains_key("Error"), "{:?}", net.delivered);
        // A connector that names bob's key reaches bob.
        let c = net.connect(pinned(20));
        finish(&mut net, c);
        let r = net.report(c);
        assert_eq!(r.path, PathTaken::Direct, "{r:#?}");
        assert_eq!(r.messages_echoed, 20);
        assert!(r.in_order);
    }

    #[test]
    fn an_unregister_without_the_holders_key_kills_nothing_on_any_transport() {
        let mut net = Net::new(2, Conditions::CLEAN);
        net.listen("bob", None);
        net.run_for(Duration::from_millis(100));
        let bob_at = net.listeners[0].0;
        let mallory = Identity::from_seed([66; 32]);
        // From bob's own (spoofed) address, with a valid signature by another key.
        let tid = TransactionId::from_rng(&mut StdRng::seed_from_u64(8));
        let bye = PunchMessage::Unregister {
            tid,
            id: "bob".into(),
            proof: mallory.prove(Purpose::Unregister, &tid, "bob"),
        };
        net.enqueue(bob_at, sa(SERVER), bye.to_vec().expect("enc"));
        // Over TCP, where mallory holds "bob" on her own connection, which then closes.
        let ep = Endpoint {
            transport: Transport::Tcp,
            local: sa(SERVER),
            remote: sa("203.0.113.66:4000"),
        };
        let tid = TransactionId::from_rng(&mut StdRng::seed_from_u64(9));
        let reg = PunchMessage::Register {
            tid,
            id: "bob".into(),
            candidates: vec![],
            port_delta: None,
            proof: mallory.prove(Purpose::Register, &tid, "bob"),
        };
        let now = net.now;
        net.server.handle(now, ep, &reg.to_vec().expect("enc"));
        net.server.connection_closed(ep);
        net.run_for(Duration::from_millis(50));
        let bob = net
            .server
            .table()
            .registered(net.now, Transport::Udp, "bob");
        assert_eq!(bob.map(|e| e.remote), Some(bob_at));
        // Bob's own UNREGISTER still works.
        let tid = TransactionId::from_rng(&mut StdRng::seed_from_u64(10));
        let me = Identity::from_seed([10; 32]);
        let bye = PunchMessage::Unregister {
            tid,
            id: "bob".into(),
            proof: me.prove(Purpose::Unregister, &tid, "bob"),
        };
        net.enqueue(bob_at, sa(SERVER), bye.to_vec().expect("enc"));
        net.run_for(Duration::from_millis(5));
        assert_eq!(
            net.server
                .table()
                .registered(net.now, Transport::Udp, "bob"),
            None
        );
    }

    #[test]
    fn a_server_that_substitutes_the_peer_is_refused_with_one_line() {
        let mut net = Net::new(3, Conditions::CLEAN);
        net.listen("bob", None);
        net.run_for(Duration::from_millis(100));
        // The server answers CONNECT with mallory's key and address instead of bob's.
        net.server_tamper = Some(|_, m| {
            if let PunchMessage::ConnectOk { peer, .. } = m {
                peer.key = Some(Identity::from_seed([66; 32]).public());
                peer.reflexive = sa("203.0.113.66:4000");
                peer.candidates = vec![sa("203.0.113.66:4000")];
            }
        });
        let c = net.connect(pinned(5));
        finish(&mut net, c);
        let e = match &net.reports[c] {
            Some(Err(e)) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(e.contains("not the --peer-key"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        // Without a pinned key the connector believes the server about the key, but then only
        // the holder of that key can answer the handshake: bob cannot, and mallory is not on
        // the path, so the connector still never talks to anyone but a key's holder.
        let c = net.connect(ConnectOptions {
            peer_key: None,
            ..pinned(5)
        });
        finish(&mut net, c);
        let r = net.report(c);
        assert_eq!(r.path, PathTaken::Failed, "{r:#?}");
        let e = r.attempts.error.clone().unwrap_or_default();
        assert!(e.contains("never proved key"), "{e}");
        assert_eq!(r.messages_echoed, 0);
    }

    #[test]
    fn relayed_data_tampered_by_the_server_is_detected_and_never_delivered() {
        let mut net = Net::new(4, Conditions::CLEAN);
        net.direct_open = false;
        net.listen("bob", None);
        net.run_for(Duration::from_millis(100));
        // The relay flips a bit in every sealed payload it forwards to the connector (the
        // handshake is intact): the echoes.
        net.server_tamper = Some(|to, m| {
            if let (
                true,
                PunchMessage::Sealed {
                    sealed: Some(b), ..
                },
            ) = (to == sa("203.0.113.100:5000"), m)
            {
                let last = b.len() - 1;
                b[last] ^= 1;
            }
        });
        let c = net.connect(ConnectOptions {
            relay_first: true,
            ..pinned(10)
        });
        finish(&mut net, c);
        let r = net.report(c);
        assert_eq!(r.path, PathTaken::Failed, "{r:#?}");
        assert_eq!(
            r.messages_echoed, 0,
            "nothing tampered was delivered: {r:#?}"
        );
        let e = r.attempts.error.clone().unwrap_or_default();
        assert!(e.contains("failed authentication"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn packets_injected_with_a_known_session_id_are_dropped() {
        let mut net = Net::new(5, Conditions::CLEAN);
        net.direct_open = false;
        net.listen("bob", Some(1));
        net.run_for(Duration::from_millis(100));
        let c = net.connect(ConnectOptions {
            relay_first: true,
            interval: Duration::from_millis(20),
            ..pinned(30)
        });
        let until = net.now + Duration::from_secs(2);
        net.run(until, |n| !n.started(0).is_empty());
        let session = SessionId(u64::from_str_radix(net.started(0)[0], 16).expect("hex"));
        let (bob, alice) = (net.listeners[0].0, net.connectors[c].0);
        net.run_for(Duration::from_millis(100));
        // An attacker who saw the session id (on the relay's path) forges DATA, CLOSE and
        // sealed garbage toward both peers, from the server's and from the peers' addresses.
        let mut n = 0u8;
        let mut forged = |m: &dyn Fn(TransactionId) -> PunchMessage| {
            n += 1;
            let tid = TransactionId::from_rng(&mut StdRng::seed_from_u64(u64::from(n)));
            m(tid).to_vec().expect("enc")
        };
        let evil: Vec<Vec<u8>> = vec![
            forged(&|tid| PunchMessage::Data {
                tid,
                session,
                seq: Some(1),
                ack: 0,
                payload: b"natscope-punch evil!".to_vec(),
            }),
            forged(&|tid| PunchMessage::Close { tid, session }),
            forged(&|tid| PunchMessage::Sealed {
                tid,
                session,
                handshake: None,
                sealed: Some(vec![0; 90]),
            }),
            forged(&|tid| PunchMessage::Probe { tid, session }),
        ];
        for bytes in &evil {
            for (from, to) in [
                (sa(SERVER), bob),
                (sa(SERVER), alice),
                (alice, bob),
                (bob, alice),
            ] {
                net.enqueue(from, to, bytes.clone());
            }
        }
        finish(&mut net, c);
        let r = net.report(c);
        assert_eq!(r.messages_echoed, 30, "{r:#?}");
        assert!(r.in_order, "{r:#?}");
        assert_eq!(r.attempts.error, None);
        let until = net.now + Duration::from_secs(5);
        net.run(until, |n| n.listen_outcomes[0].is_some());
        assert_eq!(net.ended(0).len(), 1);
        assert_eq!(
            net.ended(0)[0].1,
            30,
            "the listener echoed only the real messages"
        );
        let _ = code::FORBIDDEN;
    }
}

/// Paths that open late, on the virtual clock, with the NATs in [`Net::path`].
#[cfg(test)]
mod late_paths {
    use super::*;

    /// Full cone (connector) × symmetric NAT (listener) over UDP, with the listener's side
    /// starting late (its INTRODUCE is lost for 600 ms) and its probes reaching the connector
    /// only after the connector's punch window closed. The connector answers them, so the
    /// listener proves the direct path; the connector must then take that path too (probing
    /// back to the listener's peer-reflexive source), not stay on the relay while the listener
    /// goes direct (the grid's lab-observed bug: the listener direct, `punch connect` relayed).
    #[test]
    fn a_path_the_peer_proves_after_the_connectors_window_is_taken_by_both_sides() {
        let mut net = Net::new(7, Conditions::CLEAN);
        let bob = net.listeners.len();
        net.listen("bob", Some(1));
        net.run_for(Duration::from_millis(100));
        let t0 = net.now;
        let (bob_in, alice) = (net.listeners[bob].0, sa("203.0.113.100:5000"));
        // The port the symmetric NAT gives the listener's mapping toward the connector.
        let bob_out = sa("203.0.113.10:4999");
        let mut opened = false;
        net.path = Some(Box::new(move |now, from, to, m| {
            let server = sa(SERVER);
            if *from == server || *to == server {
                // The listener hears of the session late.
                return !(*to == bob_in
                    && matches!(m, PunchMessage::Introduce { .. })
                    && now < t0 + Duration::from_millis(600));
            }
            if *from == bob_in {
                // Symmetric: a new port toward the connector; late probes (the connector's
                // window is over when they arrive).
                *from = bob_out;
                opened = true;
                return now >= t0 + Duration::from_millis(1700);
            }
            if *to == bob_out && opened {
                // Port-dependent filter: only the connector, which the listener sent to.
                *to = bob_in;
                return true;
            }
            // The server-facing mapping admits only the server.
            *to != bob_in
        }));
        let c = net.connect(ConnectOptions {
            interval: Duration::from_millis(100),
            id: "bob".into(),
            messages: 40,
            timeout: Duration::from_secs(20),
            ..ConnectOptions::default()
        });
        assert_eq!(net.connectors[c].0, alice);
        let until = net.now + Duration::from_secs(30);
        net.run(until, |n| n.reports[c].is_some());
        let r = net.report(c).clone();
        assert_eq!((r.messages_echoed, r.in_order), (40, true), "{r:#?}");
        let until = net.now + Duration::from_secs(5);
        net.run(until, |n| n.listen_outcomes[bob].is_some());
        let ended: Vec<_> = net.events[bob]
            .iter()
            .filter_map(|e| match e {
                ListenEvent::SessionEnded { path, .. } => Some(*path),
                _ => None,
            })
            .collect();
        assert_eq!(ended, vec![PathTaken::Direct], "the listener went direct");
        assert_eq!(
            r.path,
            PathTaken::Direct,
            "the connector takes the path its peer proved: {r:#?}"
        );
        assert!(r.switched_to_direct, "from the relay, after its window");
        assert!(r.attempts.data_sent_direct > 0);
    }
}

/// Both address families (issue 13): IPv6 candidates beside IPv4 ones, both probed at once.
#[cfg(test)]
mod both_families {
    use std::collections::HashSet;

    use super::super::peer::ProbeFamilies;
    use super::*;
    use crate::probe::family::Family;

    const BOB6: &str = "[2001:db8:101::2]:4000";
    const ALICE6: &str = "[2001:db8:102::2]:5000";

    /// The IPv6 firewalls in front of both hosts (RFC 6092).
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum V6 {
        /// Endpoint-independent filtering: inbound is admitted once the host sent anything.
        Eif,
        /// Address-and-port-dependent: only from where the host sent to.
        Apdf,
        /// Nothing passes (an IPv6 candidate never answered).
        Dead,
    }

    struct Lab {
        v4_open: bool,
        v6: V6,
        /// IPv6 addresses that have already sent something (to the server, say) before the test.
        opened: Vec<SocketAddr>,
        /// An IPv6 address that never initiates: it only answers what reached it (it does not punch).
        quiet: Option<SocketAddr>,
    }

    /// The path between the peers: IPv4 passes or not (`v4_open: false` is symmetric ×
    /// symmetric, the grid's relayed pair), IPv6 through each host's firewall; the server
    /// always reaches both.
    fn nats(lab: Lab) -> PathHook {
        let inside = [sa(BOB6), sa(ALICE6)];
        let mut sent_any: HashSet<SocketAddr> = lab.opened.iter().copied().collect();
        let mut sent_to: HashSet<(SocketAddr, SocketAddr)> = HashSet::new();
        let mut received: HashSet<SocketAddr> = HashSet::new();
        Box::new(move |_, from, to, _| {
            let server = sa(SERVER);
            if *from == server || *to == server {
                return true;
            }
            if from.is_ipv4() {
                return lab.v4_open;
            }
            if lab.v6 == V6::Dead {
                return false;
            }
            if inside.contains(from) {
                if lab.quiet == Some(*from) && !received.contains(from) {
                    return false;
                }
                sent_any.insert(*from);
                sent_to.insert((*from, *to));
            }
            if inside.contains(to) {
                let admitted = match lab.v6 {
                    V6::Eif => sent_any.contains(to),
                    _ => sent_to.contains(&(*to, *from)),
                };
                if !admitted {
                    return false;
                }
                received.insert(*to);
            }
            true
        })
    }

    fn dual(f: ProbeFamilies) -> DualStack {
        DualStack {
            families: Some(f),
            candidates: Vec::new(),
        }
    }

    /// A dual-stack listener behind `lab` and a connect to it; the connect's report.
    fn connect(lab: Lab, listener: ProbeFamilies, connector: ProbeFamilies) -> ConnectReport {
        let mut net = Net::new(13, Conditions::CLEAN);
        net.path = Some(nats(lab));
        net.listen_dual("bob", sa(BOB6), dual(listener));
        net.run_for(Duration::from_millis(300));
        let opts = ConnectOptions {
            id: "bob".into(),
            messages: 20,
            timeout: Duration::from_secs(10),
            ..ConnectOptions::default()
        };
        let c = net.connect_dual(opts, sa(ALICE6), dual(connector));
        let until = net.now + Duration::from_secs(30);
        net.run(until, |n| n.reports[c].is_some());
        net.report(c).clone()
    }

    const BOTH: ProbeFamilies = ProbeFamilies::BOTH;

    fn lab(v4_open: bool, v6: V6) -> Lab {
        Lab {
            v4_open,
            v6,
            opened: Vec::new(),
            quiet: None,
        }
    }

    #[test]
    fn a_pair_relayed_on_ipv4_goes_direct_over_ipv6_behind_eif_firewalls() {
        let r = connect(lab(false, V6::Eif), BOTH, BOTH);
        assert_eq!(r.path, PathTaken::Direct, "{r:#?}");
        assert_eq!(r.family, Some(Family::Ipv6), "{r:#?}");
        assert_eq!(r.peer, Some(sa(BOB6)), "{r:#?}");
        assert_eq!((r.messages_echoed, r.in_order), (20, true));
        // The IPv6 candidates were announced through the IPv4 server.
        assert!(r.attempts.peer_candidates.contains(&sa(BOB6)), "{r:#?}");
        // Without them the same pair is relayed.
        let r = connect(lab(false, V6::Dead), BOTH, BOTH);
        assert_eq!((r.path, r.family), (PathTaken::Relayed, Some(Family::Ipv4)));
    }

    #[test]
    fn apdf_firewalls_go_direct_because_both_sides_punch() {
        let r = connect(lab(false, V6::Apdf), BOTH, BOTH);
        assert_eq!(
            (r.path, r.family),
            (PathTaken::Direct, Some(Family::Ipv6)),
            "{r:#?}"
        );
        // The listener only answers (it never sends first): behind APDF nothing of the
        // connector's reaches it, although its IPv6 address has talked to a server before...
        let one_sided = |v6| Lab {
            opened: vec![sa(BOB6)],
            quiet: Some(sa(BOB6)),
            ..lab(false, v6)
        };
        let r = connect(one_sided(V6::Apdf), BOTH, BOTH);
        assert_eq!(r.path, PathTaken::Relayed, "{r:#?}");
        // ...while an EIF firewall admits the connector's probes on the strength of that.
        let r = connect(one_sided(V6::Eif), BOTH, BOTH);
        assert_eq!(
            (r.path, r.family),
            (PathTaken::Direct, Some(Family::Ipv6)),
            "{r:#?}"
        );
    }

    #[test]
    fn an_ipv6_candidate_never_answered_costs_no_more_than_the_candidate_budget() {
        let single = {
            let mut net = Net::new(13, Conditions::CLEAN);
            net.direct_open = false;
            net.listen("bob", Some(1));
            net.run_for(Duration::from_millis(300));
            let c = net.connect(ConnectOptions {
                id: "bob".into(),
                messages: 20,
                timeout: Duration::from_secs(10),
                ..ConnectOptions::default()
            });
            let until = net.now + Duration::from_secs(30);
            net.run(until, |n| n.reports[c].is_some());
            net.report(c).clone()
        };
        let r = connect(lab(false, V6::Dead), BOTH, BOTH);
        assert_eq!(r.path, PathTaken::Relayed, "{r:#?}");
        let a = &r.attempts;
        // The IPv6 candidate was probed (more probes than with IPv4 alone)...
        assert!(a.probes_sent > single.attempts.probes_sent, "{a:#?}");
        assert_eq!(a.probes_answered, 0);
        // ...within the same budget a single-family connect has.
        assert_eq!(a.probe_packet_bound, single.attempts.probe_packet_bound);
        assert!(a.probes_sent <= a.probe_packet_bound, "{a:#?}");
        // And the relay took over at the end of the same window.
        let first = r.time_to_first_byte_ms.unwrap_or_default();
        assert!((1500.0..2500.0).contains(&first), "{first} ms");
    }

    #[test]
    fn family_restricts_the_punch_to_one_family() {
        let r = connect(lab(true, V6::Eif), ProbeFamilies::IPV6, ProbeFamilies::IPV6);
        assert_eq!(
            (r.path, r.family),
            (PathTaken::Direct, Some(Family::Ipv6)),
            "{r:#?}"
        );
        assert!(
            r.attempts.peer_candidates.iter().all(|c| c.is_ipv6()),
            "{r:#?}"
        );
        let r = connect(lab(true, V6::Eif), ProbeFamilies::IPV4, ProbeFamilies::IPV4);
        assert_eq!(
            (r.path, r.family),
            (PathTaken::Direct, Some(Family::Ipv4)),
            "{r:#?}"
        );
        assert!(
            r.attempts.peer_candidates.iter().all(|c| c.is_ipv4()),
            "{r:#?}"
        );
        // IPv6 only, and IPv6 does not pass: the relay, whatever IPv4 would have done.
        let r = connect(
            lab(true, V6::Dead),
            ProbeFamilies::IPV6,
            ProbeFamilies::IPV6,
        );
        assert_eq!(r.path, PathTaken::Relayed, "{r:#?}");
    }
}

/// Relay failover (issue 14, item 2) and the listener's global probe budget (item 4), on the
/// virtual clock: two rendezvous servers, a listener registered with both (one machine and one
/// socket per server, as `punch listen --via A --via B` runs), and a connector whose relay dies
/// mid-stream.
#[cfg(test)]
mod failover {
    use super::*;
    use crate::punch::listener::{hand_over, FAILOVER_PEER_IDLE};
    use crate::punch::session::ProbeBudget;

    const A: &str = "198.51.100.1:3490";
    const B: &str = "198.51.100.2:3490";
    const ALICE: &str = "203.0.113.100:5000";
    const MALLORY: &str = "203.0.113.101:5000";

    /// Two servers (either can be killed), the listener's two machines, one connector. Peer to
    /// peer datagrams never pass (two symmetric NATs): everything goes through a relay.
    struct Two {
        now: Instant,
        rng: StdRng,
        loss: f64,
        servers: Vec<(SocketAddr, RendezvousServer, bool)>,
        listeners: Vec<(SocketAddr, Listener)>,
        connector: Connector,
        in_flight: BTreeMap<(Instant, u64), Datagram>,
        seq: u64,
        report: Option<Result<ConnectReport, PunchError>>,
        events: Vec<ListenEvent>,
        /// Sealed messages each server relayed to the connector.
        relayed: [u64; 2],
        /// Why listener machines stopped (a machine whose server died stops, as it should).
        listen_errors: Vec<String>,
        /// A second connector, through B, whose handshake never arrives (its session at the
        /// listener's machine at B stays fresh).
        mallory: Option<Connector>,
        /// Once set, the next sealed box Alice sends to A is also sent, at once, into this
        /// session at B (as if Mallory relayed a copy it captured).
        inject: Option<crate::punch::SessionId>,
    }

    impl Two {
        /// `impostor`: the listener registered at B is someone else with the same id (a server
        /// that would splice another key into the moved session).
        fn new(seed: u64, loss: f64, impostor: bool) -> Self {
            let t0 = Instant::now();
            let mut listeners = Vec::new();
            for (i, server) in [A, B].iter().enumerate() {
                let seed_key = if impostor && i == 1 { 66 } else { 10 };
                let opts = ListenOptions {
                    id: "bob".into(),
                    server: sa(server),
                    transport: Transport::Udp,
                    count: None,
                    timeout: None,
                    punch_window: Duration::from_millis(1500),
                    predict: false,
                    identity: Identity::from_seed([seed_key; 32]),
                };
                let local = SocketAddr::new([203, 0, 113, 10].into(), 4000 + i as u16);
                let mut l = Listener::new(t0, opts, StdRng::seed_from_u64(seed + i as u64));
                l.enable_failover();
                l.start(t0, local, None);
                listeners.push((local, l));
            }
            let opts = ConnectOptions {
                id: "bob".into(),
                server: sa(A),
                relay_first: true,
                messages: 300,
                interval: Duration::from_millis(10),
                timeout: Duration::from_secs(30),
                ..ConnectOptions::default()
            };
            let mut connector = Connector::new(t0, opts, StdRng::seed_from_u64(seed ^ 0xc0));
            connector.set_fallback(vec![sa(B)]);
            Self {
                now: t0,
                rng: StdRng::seed_from_u64(seed),
                loss,
                servers: vec![
                    (sa(A), server(seed ^ 1), true),
                    (sa(B), server(seed ^ 2), true),
                ],
                listeners,
                connector,
                in_flight: BTreeMap::new(),
                seq: 0,
                report: None,
                events: Vec::new(),
                relayed: [0; 2],
                listen_errors: Vec::new(),
                mallory: None,
                inject: None,
            }
        }

        fn send(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
            let servers = [sa(A), sa(B)];
            if !servers.contains(&from) && !servers.contains(&to) {
                return;
            }
            let m = PunchMessage::decode(&payload);
            if from == sa(MALLORY) && matches!(m, Ok(PunchMessage::Sealed { .. })) {
                return;
            }
            if let (Some(s2), true, Ok(PunchMessage::Sealed { sealed, .. })) =
                (self.inject, from == sa(ALICE) && to == sa(A), &m)
            {
                let copy = PunchMessage::Sealed {
                    tid: crate::stun::TransactionId::from_rng(&mut self.rng),
                    session: s2,
                    handshake: None,
                    sealed: sealed.clone(),
                };
                let bytes = copy.to_vec().expect("encodes");
                self.listeners[1].1.handle_datagram(self.now, sa(B), &bytes);
                self.inject = None;
            }
            if self.rng.gen_bool(self.loss) {
                return;
            }
            let at = self.now + Duration::from_millis(1 + self.rng.gen_range(0..4));
            self.seq += 1;
            let d = Datagram { from, to, payload };
            self.in_flight.insert((at, self.seq), d);
        }

        fn collect(&mut self) {
            let mut sent = Vec::new();
            for (addr, s, _) in &mut self.servers {
                while let Some(t) = s.poll_transmit() {
                    sent.push((*addr, t.destination, t.payload));
                }
            }
            let mut ls: Vec<&mut Listener> = self.listeners.iter_mut().map(|(_, l)| l).collect();
            hand_over(self.now, &mut ls);
            for (_, l) in &mut self.listeners {
                while let Some(t) = l.poll_transmit() {
                    sent.push((t.source, t.destination, t.payload));
                }
                self.events.extend(std::iter::from_fn(|| l.poll_event()));
                if let Some(Err(e)) = l.poll_outcome() {
                    self.listen_errors.push(e.to_string());
                }
            }
            while let Some(t) = self.connector.poll_transmit() {
                sent.push((t.source, t.destination, t.payload));
            }
            if let Some(m) = &mut self.mallory {
                while let Some(t) = m.poll_transmit() {
                    sent.push((t.source, t.destination, t.payload));
                }
            }
            if let Some(o) = self.connector.poll_outcome() {
                self.report = Some(o);
            }
            for (from, to, payload) in sent {
                self.send(from, to, payload);
            }
        }

        fn deliver(&mut self, d: Datagram) {
            let now = self.now;
            if let Some(i) = self.servers.iter().position(|(a, _, _)| *a == d.to) {
                let (addr, s, alive) = &mut self.servers[i];
                if *alive {
                    let ep = Endpoint {
                        transport: Transport::Udp,
                        local: *addr,
                        remote: d.from,
                    };
                    s.handle(now, ep, &d.payload);
                }
            } else if let Some((_, l)) = self.listeners.iter_mut().find(|(a, _)| *a == d.to) {
                l.handle_datagram(now, d.from, &d.payload);
            } else if d.to == sa(ALICE) {
                if let Some(i) = self.servers.iter().position(|(a, _, _)| *a == d.from) {
                    let sealed = matches!(
                        PunchMessage::decode(&d.payload),
                        Ok(PunchMessage::Sealed { .. })
                    );
                    self.relayed[i] += u64::from(sealed);
                }
                self.connector.handle_datagram(now, d.from, &d.payload);
            } else if let (true, Some(m)) = (d.to == sa(MALLORY), &mut self.mallory) {
                m.handle_datagram(now, d.from, &d.payload);
            }
        }

        fn run(&mut self, until: Instant, done: impl Fn(&Self) -> bool) {
            loop {
                self.collect();
                if done(self) {
                    return;
                }
                let wakes = self
                    .listeners
                    .iter()
                    .filter_map(|(_, l)| l.poll_timeout())
                    .chain(self.connector.poll_timeout())
                    .chain(self.mallory.as_ref().and_then(|m| m.poll_timeout()))
                    .chain(self.servers.iter().filter_map(|(_, s, _)| s.poll_timeout()))
                    .chain(self.in_flight.keys().next().map(|(t, _)| *t));
                let Some(next) = wakes.min() else { return };
                if next > until {
                    self.now = until;
                    return;
                }
                self.now = next.max(self.now + Duration::from_micros(100));
                while let Some(entry) = self.in_flight.first_entry() {
                    if entry.key().0 > self.now {
                        break;
                    }
                    let d = entry.remove();
                    self.deliver(d);
                }
                let now = self.now;
                for (_, s, _) in &mut self.servers {
                    s.handle_timeout(now);
                }
                for (_, l) in &mut self.listeners {
                    if l.poll_timeout().is_some_and(|t| t <= now) {
                        l.handle_timeout(now);
                    }
                }
                if self.connector.poll_timeout().is_some_and(|t| t <= now) {
                    self.connector.handle_timeout(now);
                }
                if let Some(m) = &mut self.mallory {
                    if m.poll_timeout().is_some_and(|t| t <= now) {
                        m.handle_timeout(now);
                    }
                }
            }
        }

        /// Registers both machines, connects through A, runs until `kill_after` of data went
        /// through A's relay, kills A, and runs until the connect is over.
        fn kill_a_mid_stream(&mut self) {
            let t0 = self.now;
            self.run(t0 + Duration::from_secs(5), |t| {
                let n = t.events.iter();
                n.filter(|e| matches!(e, ListenEvent::Registered { .. }))
                    .count()
                    == 2
            });
            self.connector.start(self.now, sa(ALICE), None);
            let until = self.now + Duration::from_secs(10);
            self.run(until, |t| t.relayed[0] >= 60);
            if std::env::var("FAILOVER_STRESS").is_ok() && self.relayed[0] < 60 {
                eprintln!("STRESS no start {:?}", self.report);
                self.report = None;
                return;
            }
            assert!(
                self.relayed[0] >= 60,
                "data flowed through A first: {:?}",
                self.report
            );
            self.servers[0].2 = false;
            let until = self.now + Duration::from_secs(40);
            self.run(until, |t| t.report.is_some());
            // The CLOSE reaches the listener (or, if it was lost, the session times out).
            let until = self.now + FAILOVER_PEER_IDLE + Duration::from_secs(1);
            self.run(until, |_| false);
        }
    }

    /// Must show 2 (sans-IO half): the relay dies mid-stream; the connector notices within
    /// `relay_idle` (three unanswered refreshes, 1.5 s), CONNECTs through B, and the listener's
    /// machine at B takes over the session from its machine at A. The received byte stream is
    /// exactly the sent one (each echo once, in order: `in_order` is computed from the numbers
    /// inside the echoes), under loss and reordering, for several seeds.
    #[test]
    fn a_relayed_session_moves_to_the_surviving_relay_without_losing_duplicating_or_reordering() {
        // FAILOVER_STRESS=1: 100 seeds at 10 % loss, each outcome printed instead of asserted.
        let stress = std::env::var("FAILOVER_STRESS").is_ok();
        let seeds = if stress { 100 } else { 12 };
        for seed in 1..=seeds {
            let loss = match seed {
                1 => 0.0,
                _ if stress || seed % 2 == 1 => 0.10,
                _ => 0.05,
            };
            let mut t = Two::new(seed, loss, false);
            t.kill_a_mid_stream();
            let r = match &t.report {
                None if stress => continue,
                Some(Ok(r)) => r.clone(),
                other => panic!("seed {seed}: {other:?}"),
            };
            let why = format!(
                "seed {seed}: {r:#?} {:?} relayed {:?} {:?}",
                t.events, t.relayed, t.listen_errors
            );
            if stress {
                let ok = r.attempts.error.is_none() && r.messages_echoed == 300 && r.in_order;
                eprintln!(
                    "STRESS seed {seed} ok {ok} {:?} {:?}",
                    r.attempts.error, t.listen_errors
                );
                continue;
            }
            assert_eq!(r.attempts.error, None, "{why}");
            assert_eq!(r.path, PathTaken::Relayed, "{why}");
            assert_eq!((r.messages_sent, r.messages_echoed), (300, 300), "{why}");
            assert!(r.in_order, "{why}");
            assert!(t.relayed[1] > 0, "B relayed the rest: {why}");
            // The listener ended the one session once, at B, having echoed all 300.
            let ended: Vec<_> = t
                .events
                .iter()
                .filter_map(|e| match e {
                    ListenEvent::SessionEnded {
                        messages_echoed,
                        error,
                        ..
                    } => Some((*messages_echoed, error.is_none())),
                    _ => None,
                })
                .collect();
            // A lost CLOSE (best effort) ends it with "peer stopped answering" instead. A failover
            // CONNECT whose answer was lost leaves an introduction no one used (0 echoed).
            let served: Vec<_> = ended.iter().filter(|(n, _)| *n > 0).collect();
            assert!(
                matches!(served[..], [(300, clean)] if *clean || loss > 0.0),
                "{why}"
            );
            assert!(ended.len() <= 3, "{why}");
        }
    }

    /// A server that introduces another key for the moved session (it would sit in the middle)
    /// is refused with one clear line, not waited out.
    #[test]
    fn a_failover_server_that_introduces_another_key_is_refused() {
        let mut t = Two::new(5, 0.0, true);
        t.kill_a_mid_stream();
        let Some(Ok(r)) = &t.report else {
            panic!("{:?}", t.report);
        };
        let e = r.attempts.error.clone().unwrap_or_default();
        assert!(
            e.contains("relay failover") && e.contains("refusing"),
            "{e}"
        );
        assert!(r.failed());
        assert_eq!(
            t.relayed[1], 0,
            "nothing went through the impostor's server"
        );
    }

    /// Someone who sees the session's sealed traffic (here: a copy of a box on its way to A,
    /// sent into a session of its own at B before the original arrives) cannot pull the
    /// listener's side of a session whose relay still works: a session is handed over only
    /// once its peer has been quiet for a while, which a live relay never lets happen.
    #[test]
    fn a_copied_box_cannot_pull_a_session_whose_relay_still_works() {
        let mut t = Two::new(7, 0.0, false);
        let t0 = t.now;
        t.run(t0 + Duration::from_millis(300), |_| false);
        t.connector.start(t.now, sa(ALICE), None);
        let until = t.now + Duration::from_secs(10);
        t.run(until, |t| t.relayed[0] >= 60);
        let opts = ConnectOptions {
            id: "bob".into(),
            server: sa(B),
            relay_first: true,
            messages: 1,
            timeout: Duration::from_secs(30),
            ..ConnectOptions::default()
        };
        let mut m = Connector::new(t.now, opts, StdRng::seed_from_u64(77));
        m.start(t.now, sa(MALLORY), None);
        t.mallory = Some(m);
        let until = t.now + Duration::from_secs(2);
        let started = |t: &Two| {
            t.events
                .iter()
                .filter_map(|e| match e {
                    ListenEvent::SessionStarted { session, .. } => Some(session.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        t.run(until, |t| started(t).len() == 2);
        let s2 = u64::from_str_radix(&started(&t)[1], 16).expect("hex id");
        t.inject = Some(crate::punch::SessionId(s2));
        let until = t.now + Duration::from_secs(30);
        t.run(until, |t| t.report.is_some());
        assert!(t.inject.is_none(), "the copy was sent");
        let Some(Ok(r)) = &t.report else {
            panic!("{:?}", t.report);
        };
        assert_eq!(r.attempts.error, None, "{r:#?}");
        assert_eq!((r.messages_echoed, r.in_order), (300, true), "{r:#?}");
        assert_eq!(t.relayed[1], 0, "nothing reached Alice through B");
    }

    /// Without another server the relayed session still ends as before (bounded).
    #[test]
    fn without_another_server_a_dead_relay_still_ends_the_session() {
        let mut t = Two::new(6, 0.0, false);
        t.connector = {
            let opts = ConnectOptions {
                id: "bob".into(),
                server: sa(A),
                relay_first: true,
                messages: 300,
                interval: Duration::from_millis(10),
                timeout: Duration::from_secs(30),
                ..ConnectOptions::default()
            };
            Connector::new(t.now, opts, StdRng::seed_from_u64(9))
        };
        t.kill_a_mid_stream();
        let Some(Ok(r)) = &t.report else {
            panic!("{:?}", t.report);
        };
        let e = r.attempts.error.clone().unwrap_or_default();
        assert!(e.contains("stopped answering"), "{e}");
    }

    /// Item 4: many sessions at once cannot make the listener probe faster than its one budget.
    /// 32 connectors (the server's limit per listener) whose direct paths never open make the
    /// listener probe each of them every 50 ms for 3 s: 640 probes/s without the budget.
    #[test]
    fn many_sessions_share_the_listeners_probe_budget() {
        const BUDGET: u32 = 100;
        let mut net = Net::new(11, Conditions::CLEAN);
        let bob = net.listen("bob", None);
        net.listeners[bob]
            .1
            .set_probe_budget(ProbeBudget::new(BUDGET));
        let bob_at = net.listeners[bob].0;
        let sent = std::rc::Rc::new(std::cell::RefCell::new(Vec::<Instant>::new()));
        let seen = sent.clone();
        net.path = Some(Box::new(move |now, from, to, _| {
            let server = sa(SERVER);
            if *from == server || *to == server {
                return true;
            }
            if *from == bob_at {
                seen.borrow_mut().push(now);
            }
            false
        }));
        net.run_for(Duration::from_millis(300));
        let t0 = net.now;
        for _ in 0..32 {
            net.connect(ConnectOptions {
                id: "bob".into(),
                messages: 1,
                punch_window: Duration::from_secs(3),
                timeout: Duration::from_secs(4),
                ..ConnectOptions::default()
            });
        }
        net.run_for(Duration::from_secs(4));
        let sent = sent.borrow();
        let started = net.started(bob).len();
        assert!(started >= 30, "{started} sessions");
        // Per second of the window: at most the budget, plus one second's burst in the first.
        for s in 0..4u32 {
            let from = t0 + Duration::from_secs(u64::from(s));
            let to = from + Duration::from_secs(1);
            let n = sent.iter().filter(|t| **t >= from && **t < to).count() as u32;
            let cap = if s == 0 { 2 * BUDGET } else { BUDGET + 1 };
            assert!(n <= cap, "second {s}: {n} probes, budget {BUDGET}/s");
        }
        assert!(
            sent.len() as u32 >= 3 * BUDGET,
            "the budget was used: {}",
            sent.len()
        );
    }
}
