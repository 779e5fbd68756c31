//! A tiny reliable, ordered message layer under the application, so a session can move from the
//! relay to a direct path (or lose packets on either) without losing, duplicating or reordering
//! application messages.
//!
//! Sender: every message gets the next sequence number and stays queued until a cumulative ack
//! covers it; unacked messages are retransmitted after [`ReliableConfig::rto`] on whatever path
//! is current, and all of them at once when the path changes ([`ReliableSender::path_changed`]).
//! At most [`ReliableConfig::window`] messages are in flight. Receiver: delivers in sequence
//! order, buffers up to `window` messages ahead, drops duplicates and anything beyond the window;
//! its cumulative ack is the next sequence number it expects. Plain data, no clock reads.
//!
//! Both ends are bounded, so a peer cannot make the other side's memory grow: the sender holds at
//! most [`SEND_QUEUE_WINDOWS`] windows (callers ask [`ReliableSender::has_room`] first), and the
//! receiver's window shrinks by every message it delivered that the application has not taken yet
//! (like TCP's receive window), so an application that stops reading — a listener whose echoes
//! are never acknowledged — stops the acks, and the peer's sender stalls instead of piling up.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReliableConfig {
    /// Retransmit timeout: generous for a LAN, short enough to recover within a punch window.
    pub rto: Duration,
    /// Messages in flight (sender) and buffered ahead of a gap (receiver).
    pub window: usize,
}

impl Default for ReliableConfig {
    fn default() -> Self {
        Self {
            rto: Duration::from_millis(200),
            window: 256,
        }
    }
}

#[derive(Clone, Debug)]
struct Outgoing {
    seq: u64,
    payload: Vec<u8>,
    first_sent: Option<Instant>,
    last_sent: Option<Instant>,
    transmissions: u32,
}

/// A message acknowledged by the peer: when it was first sent and whether it ever had to be
/// retransmitted (only clean samples make an RTT estimate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    pub seq: u64,
    pub first_sent: Instant,
    pub transmissions: u32,
}

/// The sender's queue holds at most this many windows of messages: one in flight, the rest
/// waiting for room in it.
pub const SEND_QUEUE_WINDOWS: usize = 2;

#[derive(Clone, Debug)]
pub struct ReliableSender {
    config: ReliableConfig,
    next_seq: u64,
    queue: VecDeque<Outgoing>,
    retransmissions: u64,
}

impl ReliableSender {
    pub fn new(config: ReliableConfig) -> Self {
        Self {
            config,
            next_seq: 0,
            queue: VecDeque::new(),
            retransmissions: 0,
        }
    }

    /// Whether [`push`](Self::push) would queue another message: fewer than
    /// [`SEND_QUEUE_WINDOWS`] windows are unacknowledged.
    pub fn has_room(&self) -> bool {
        self.queue.len() < SEND_QUEUE_WINDOWS * self.config.window
    }

    /// Queues an application message; returns its sequence number, or `None` (nothing queued)
    /// when there is no room: the caller keeps the message until [`has_room`](Self::has_room).
    pub fn push(&mut self, payload: Vec<u8>) -> Option<u64> {
        if !self.has_room() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back(Outgoing {
            seq,
            payload,
            first_sent: None,
            last_sent: None,
            transmissions: 0,
        });
        Some(seq)
    }

    /// The next message to put on the wire now, if any: a never-sent one inside the window, or
    /// an unacked one whose timer ran out. Marks it sent at `now`.
    pub fn poll_send(&mut self, now: Instant) -> Option<(u64, Vec<u8>)> {
        let rto = self.config.rto;
        let window = self.config.window;
        let item = self
            .queue
            .iter_mut()
            .take(window)
            .find(|o| match o.last_sent {
                None => true,
                Some(t) => t + rto <= now,
            })?;
        if item.transmissions > 0 {
            self.retransmissions += 1;
        }
        item.first_sent.get_or_insert(now);
        item.last_sent = Some(now);
        item.transmissions += 1;
        Some((item.seq, item.payload.clone()))
    }

    /// When the next retransmission falls due (for the driver's timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue
            .iter()
            .take(self.config.window)
            .filter_map(|o| o.last_sent.map(|t| t + self.config.rto))
            .min()
    }

    /// A cumulative ack: every message below `next_expected` arrived. Returns what it covered.
    pub fn on_ack(&mut self, next_expected: u64) -> Vec<Acked> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|o| o.seq < next_expected) {
            if let Some(o) = self.queue.pop_front() {
                if let Some(first_sent) = o.first_sent {
                    out.push(Acked {
                        seq: o.seq,
                        first_sent,
                        transmissions: o.transmissions,
                    });
                }
            }
        }
        out
    }

    /// The path changed: everything unacked is due again at once, on the new path.
    pub fn path_changed(&mut self) {
        for o in &mut self.queue {
            o.last_sent = None;
        }
    }

    pub fn unacked(&self) -> usize {
        self.queue.len()
    }

    pub fn retransmissions(&self) -> u64 {
        self.retransmissions
    }
}

/// What the receiver did with an incoming message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// New: delivered now or buffered until the gap before it fills.
    Accepted,
    /// Already delivered or already buffered.
    Duplicate,
    /// Too far ahead of the next expected message, or no room: the application has not taken
    /// what was delivered (the peer retransmits later).
    OutOfWindow,
}

#[derive(Clone, Debug)]
pub struct ReliableReceiver {
    config: ReliableConfig,
    next_expected: u64,
    ahead: BTreeMap<u64, Vec<u8>>,
    ready: VecDeque<Vec<u8>>,
    duplicates: u64,
}

impl ReliableReceiver {
    pub fn new(config: ReliableConfig) -> Self {
        Self {
            config,
            next_expected: 0,
            ahead: BTreeMap::new(),
            ready: VecDeque::new(),
            duplicates: 0,
        }
    }

    pub fn on_data(&mut self, seq: u64, payload: Vec<u8>) -> Received {
        if seq < self.next_expected || self.ahead.contains_key(&seq) {
            self.duplicates += 1;
            return Received::Duplicate;
        }
        // The receive window: what is delivered but not yet taken uses it up.
        let window = self.config.window.saturating_sub(self.ready.len()) as u64;
        if seq >= self.next_expected + window {
            return Received::OutOfWindow;
        }
        self.ahead.insert(seq, payload);
        while let Some(p) = self.ahead.remove(&self.next_expected) {
            self.ready.push_back(p);
            self.next_expected += 1;
        }
        Received::Accepted
    }

    /// The next message in order, once each.
    pub fn poll_deliver(&mut self) -> Option<Vec<u8>> {
        self.ready.pop_front()
    }

    /// The cumulative ack to send: the next sequence number expected.
    pub fn ack(&self) -> u64 {
        self.next_expected
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Messages held: delivered but not taken, and buffered ahead of a gap.
    pub fn buffered(&self) -> usize {
        self.ready.len() + self.ahead.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A lossy, duplicating, reordering path with a fixed base delay.
    struct Path {
        loss: f64,
        dup: f64,
        jitter_ms: u64,
        base_ms: u64,
    }

    #[derive(Debug)]
    enum Packet {
        Data(u64, Vec<u8>),
        Ack(u64),
    }

    /// Sends `n` messages from a sender to a receiver over `paths`, switching from the first to
    /// the second at `switch_at`; steps a virtual clock 1 ms at a time, never sleeping.
    fn run(n: u64, paths: [Path; 2], switch_at: Duration, seed: u64) -> (Vec<Vec<u8>>, u64) {
        let cfg = ReliableConfig {
            rto: Duration::from_millis(30),
            window: 32,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tx = ReliableSender::new(cfg);
        let mut rx = ReliableReceiver::new(cfg);
        let mut pushed = 0u64;
        let t0 = Instant::now();
        // (due, to_receiver, packet)
        let mut wire: Vec<(Instant, bool, Packet)> = Vec::new();
        let mut delivered = Vec::new();
        let mut switched = false;
        for ms in 0..60_000u64 {
            let now = t0 + Duration::from_millis(ms);
            let p = if now - t0 >= switch_at {
                &paths[1]
            } else {
                &paths[0]
            };
            if now - t0 >= switch_at && !switched {
                switched = true;
                tx.path_changed();
            }
            let send = |rng: &mut StdRng, wire: &mut Vec<_>, to_rx: bool, pk: Packet| {
                if rng.gen_bool(p.loss) {
                    return;
                }
                let copies = if rng.gen_bool(p.dup) { 2 } else { 1 };
                for _ in 0..copies {
                    let d = p.base_ms + rng.gen_range(0..=p.jitter_ms);
                    let pk = match &pk {
                        Packet::Data(s, b) => Packet::Data(*s, b.clone()),
                        Packet::Ack(a) => Packet::Ack(*a),
                    };
                    wire.push((now + Duration::from_millis(d), to_rx, pk));
                }
            };
            while pushed < n && tx.has_room() {
                tx.push(pushed.to_be_bytes().to_vec());
                pushed += 1;
            }
            while let Some((seq, payload)) = tx.poll_send(now) {
                send(&mut rng, &mut wire, true, Packet::Data(seq, payload));
            }
            let (due, later): (Vec<_>, Vec<_>) = wire.drain(..).partition(|(t, _, _)| *t <= now);
            wire = later;
            for (_, to_rx, pk) in due {
                match (to_rx, pk) {
                    (true, Packet::Data(s, b)) => {
                        rx.on_data(s, b);
                        while let Some(m) = rx.poll_deliver() {
                            delivered.push(m);
                        }
                        let a = rx.ack();
                        send(&mut rng, &mut wire, false, Packet::Ack(a));
                    }
                    (false, Packet::Ack(a)) => {
                        tx.on_ack(a);
                    }
                    _ => {}
                }
            }
            if pushed == n && tx.unacked() == 0 {
                return (delivered, ms);
            }
        }
        panic!("did not complete: {} unacked", tx.unacked());
    }

    fn expect_complete(delivered: &[Vec<u8>], n: u64) {
        let want: Vec<Vec<u8>> = (0..n).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(delivered.len() as u64, n, "once each");
        assert_eq!(delivered, &want[..], "complete and in order");
    }

    #[test]
    fn clean_path_delivers_in_order() {
        let p = || Path {
            loss: 0.0,
            dup: 0.0,
            jitter_ms: 0,
            base_ms: 2,
        };
        let (d, _) = run(500, [p(), p()], Duration::from_secs(100), 1);
        expect_complete(&d, 500);
    }

    #[test]
    fn loss_duplication_and_reordering_still_deliver_once_each_in_order() {
        for seed in 0..20 {
            let p = || Path {
                loss: 0.2,
                dup: 0.2,
                jitter_ms: 15,
                base_ms: 1,
            };
            let (d, _) = run(300, [p(), p()], Duration::from_secs(100), seed);
            expect_complete(&d, 300);
        }
    }

    #[test]
    fn switching_from_a_slow_relay_to_a_fast_direct_path_mid_stream() {
        for seed in 0..20 {
            // The relay is slow and lossy; packets still in flight on it arrive after the
            // switch, interleaved with (and later than) their retransmissions on the direct path.
            let relay = Path {
                loss: 0.1,
                dup: 0.1,
                jitter_ms: 40,
                base_ms: 30,
            };
            let direct = Path {
                loss: 0.05,
                dup: 0.05,
                jitter_ms: 2,
                base_ms: 1,
            };
            let (d, _) = run(400, [relay, direct], Duration::from_millis(150), seed);
            expect_complete(&d, 400);
        }
    }

    #[test]
    fn a_path_change_resends_every_unacked_message_once_delivered_once() {
        let cfg = ReliableConfig::default();
        let mut tx = ReliableSender::new(cfg);
        let mut rx = ReliableReceiver::new(cfg);
        let t0 = Instant::now();
        for i in 0..10u64 {
            tx.push(vec![i as u8]);
        }
        let mut sent = Vec::new();
        while let Some(m) = tx.poll_send(t0) {
            sent.push(m);
        }
        assert_eq!(sent.len(), 10);
        assert_eq!(tx.poll_send(t0), None, "nothing due before the rto");
        tx.path_changed();
        let again: Vec<_> = std::iter::from_fn(|| tx.poll_send(t0)).collect();
        assert_eq!(again, sent, "a path change resends every unacked message");
        for (s, p) in sent.iter().chain(again.iter()) {
            rx.on_data(*s, p.clone());
        }
        let d: Vec<_> = std::iter::from_fn(|| rx.poll_deliver()).collect();
        assert_eq!(d.len(), 10);
        assert_eq!(rx.duplicates(), 10);
        assert_eq!(tx.on_ack(rx.ack()).len(), 10);
        assert_eq!(tx.unacked(), 0);
    }

    #[test]
    fn receiver_window_is_bounded() {
        let cfg = ReliableConfig {
            rto: Duration::from_millis(10),
            window: 4,
        };
        let mut rx = ReliableReceiver::new(cfg);
        assert_eq!(rx.on_data(4, vec![]), Received::OutOfWindow);
        assert_eq!(rx.on_data(3, vec![3]), Received::Accepted);
        assert_eq!(rx.on_data(3, vec![3]), Received::Duplicate);
        assert_eq!(rx.poll_deliver(), None);
        for s in 0..3 {
            assert_eq!(rx.on_data(s, vec![s as u8]), Received::Accepted);
        }
        let d: Vec<_> = std::iter::from_fn(|| rx.poll_deliver()).collect();
        assert_eq!(d, vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(rx.ack(), 4);
        assert_eq!(rx.on_data(0, vec![0]), Received::Duplicate);
    }

    #[test]
    fn both_ends_stay_bounded_when_the_application_stops_reading() {
        let cfg = ReliableConfig {
            rto: Duration::from_millis(10),
            window: 4,
        };
        let mut tx = ReliableSender::new(cfg);
        let queued = std::iter::from_fn(|| tx.push(vec![0])).take(100).count();
        assert_eq!(
            queued,
            SEND_QUEUE_WINDOWS * 4,
            "the send queue refuses beyond its bound"
        );
        assert!(!tx.has_room());
        let mut rx = ReliableReceiver::new(cfg);
        // Nobody takes what is delivered: the window closes after four messages.
        for seq in 0..4 {
            assert_eq!(rx.on_data(seq, vec![0]), Received::Accepted);
        }
        assert_eq!(rx.on_data(4, vec![0]), Received::OutOfWindow);
        assert_eq!(rx.ack(), 4, "the ack stops where the window closed");
        assert_eq!(rx.buffered(), 4);
        // Taking one reopens it by one.
        assert!(rx.poll_deliver().is_some());
        assert_eq!(rx.on_data(4, vec![0]), Received::Accepted);
        assert_eq!(rx.on_data(5, vec![0]), Received::OutOfWindow);
    }
}
