//! A closed-loop Binding load generator, for measuring a reflector (ours or anyone's).
//!
//! Each of `sockets` connected UDP sockets keeps up to `window` Binding requests outstanding and
//! sends a new one as soon as an answer arrives, so the offered load follows what the server can
//! take instead of overrunning it. One OS thread per socket with a blocking socket and a short read
//! timeout is the cheapest driver on a small machine: when answers are queued, a request costs a
//! share of one `recv` and one `send` and nothing else — no poller, no wakeups, no allocation. On
//! Linux the thread reads every queued answer (up to [`BATCH`]) with one recvmmsg(2) and sends the
//! requests that replace them with one sendmmsg(2), so the generator takes less of the CPU it
//! shares with the server under test. Every slot of the
//! window remembers when its request left; the slot index and a per-slot generation are written into
//! the transaction ID (RFC 8489 §6: 96 bits the client may fill as it likes), so an answer finds its
//! slot without a lookup and an answer to a request already given up on is told apart from garbage.
//! A request unanswered after [`RETRY_AFTER`] is counted lost and replaced, so a loss never shrinks
//! the window. Latencies go into a fixed log-linear [`Histogram`] (about 3 % resolution) rather than
//! a list of samples, so memory stays constant however long the run.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::client::{build_request, RequestOptions};
use crate::stun::{attr, attr_type, Message, MessageType, TransactionId, HEADER_LEN, MAGIC_COOKIE};

/// An outstanding request with no answer after this long is counted lost and replaced.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);
/// After the run, how long answers to requests still in flight are waited for.
pub const DRAIN: Duration = Duration::from_millis(300);
/// How long the pre-run check waits for one answer before declaring the target silent.
pub const PREFLIGHT: Duration = Duration::from_secs(1);
/// Largest accepted `sockets` (one thread each).
pub const MAX_SOCKETS: usize = 256;
/// Largest accepted `window`.
pub const MAX_WINDOW: usize = 4096;
/// Longest accepted run.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// How often outstanding slots are checked for [`RETRY_AFTER`], and how long a `recv` may block.
const TICK: Duration = Duration::from_millis(10);

/// What to load and how hard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadConfig {
    /// The Binding server under test.
    pub target: SocketAddr,
    /// How long requests are sent (answers are then drained for up to [`DRAIN`]).
    pub duration: Duration,
    /// Client sockets, each on its own thread and source port.
    pub sockets: usize,
    /// Requests outstanding per socket.
    pub window: usize,
}

impl LoadConfig {
    /// Checks the bounds before anything is bound. Messages are lowercase one-liners.
    pub fn validate(&self) -> Result<(), String> {
        if self.sockets == 0 || self.sockets > MAX_SOCKETS {
            return Err(format!("sockets must be 1..={MAX_SOCKETS}"));
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(format!("window must be 1..={MAX_WINDOW}"));
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return Err(format!(
                "duration must be above 0 and at most {} s",
                MAX_DURATION.as_secs()
            ));
        }
        if self.target.port() == 0 || self.target.ip().is_unspecified() {
            return Err(format!("target {} is not a server address", self.target));
        }
        Ok(())
    }
}

/// The `schema` of `natscope bench reflect --json`.
pub const SCHEMA: &str = "natscope.bench/v1";

/// The `natscope bench reflect --json` document (`natscope.bench/v1`, docs/schema/bench.v1.json):
/// the schema tag and version, then every field of the report.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct BenchDocument<'a> {
    /// Always [`SCHEMA`].
    #[schemars(extend("const" = SCHEMA))]
    pub schema: &'static str,
    /// The version of natscope that wrote the document.
    pub natscope_version: String,
    #[serde(flatten)]
    pub report: &'a LoadReport,
}

/// The outcome of one run.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct LoadReport {
    /// The server that was loaded.
    pub target: SocketAddr,
    /// Configured sending time in seconds (the drain after it is not included).
    pub seconds: f64,
    /// Client sockets used.
    pub sockets: usize,
    /// Requests kept outstanding per socket.
    pub window: usize,
    /// Requests sent, replacements of lost ones included.
    pub requests_sent: u64,
    /// Valid answers to outstanding requests; `requests_sent == responses + lost`.
    pub responses: u64,
    /// Requests unanswered after 200 ms, or still unanswered when the drain ended.
    pub lost: u64,
    /// Valid answers to requests already counted lost or already answered (duplicates).
    pub late: u64,
    /// Datagrams that were not a Binding success response to a request of this run.
    pub invalid: u64,
    /// Socket errors (for example ICMP port unreachable reported by the kernel).
    pub errors: u64,
    /// Valid answers per second received while sending.
    pub requests_per_second: f64,
    /// Median request latency (send to answer), microseconds, histogram bucket upper bound.
    pub p50_us: u64,
    /// 99th percentile request latency, microseconds.
    pub p99_us: u64,
    /// Slowest answered request, microseconds (exact).
    pub max_us: u64,
}

impl LoadReport {
    /// The report as the `natscope.bench/v1` document.
    pub fn document(&self) -> BenchDocument<'_> {
        BenchDocument {
            schema: SCHEMA,
            natscope_version: natscope_core::document::version(),
            report: self,
        }
    }
}

/// Sub-buckets per power of two: 2^5 = 32, so a bucket is at most 1/32 of its value wide.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Values at or above 2^31 µs (about 36 minutes) are recorded as 2^31 − 1.
const MAX_BITS: u32 = 31;
const BUCKETS: usize = ((MAX_BITS - SUB_BITS + 1) as usize) * SUB as usize;

/// A log-linear latency histogram in microseconds: exact below 32, then 32 buckets per power of
/// two. Fixed size, allocated once; recording is a few integer operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        let v = v.min((1 << MAX_BITS) - 1);
        if v < SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let group = (msb - SUB_BITS + 1) as usize;
        group * SUB as usize + ((v >> shift) - SUB) as usize
    }

    /// The smallest and largest value that land in bucket `i`.
    fn bounds(i: usize) -> (u64, u64) {
        let (group, sub) = (i as u64 / SUB, i as u64 % SUB);
        if group == 0 {
            return (sub, sub);
        }
        let shift = group - 1;
        let lower = (SUB + sub) << shift;
        (lower, lower + (1 << shift) - 1)
    }

    pub fn record(&mut self, micros: u64) {
        if let Some(c) = self.counts.get_mut(Self::index(micros)) {
            *c += 1;
        }
        self.total += 1;
        self.max = self.max.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// Largest value recorded (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket holding the sample of rank
    /// ⌈q·n⌉, never above the exact maximum. 0 when empty.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bounds(i).1.min(self.max);
            }
        }
        self.max
    }
}

/// What one socket's thread counted.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    responses: u64,
    in_window: u64,
    lost: u64,
    late: u64,
    invalid: u64,
    errors: u64,
    latency: Histogram,
}

/// What an arriving datagram is, relative to this socket's window.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A valid answer to the request outstanding in this slot.
    Answer(usize),
    /// A valid answer to a request of this socket already counted lost, or already answered.
    Late,
    Invalid,
}

/// One outstanding request: when it left and which generation of its slot it was.
#[derive(Clone, Copy, Debug)]
struct Slot {
    sent: Option<Instant>,
    generation: u32,
}

/// Transaction ID layout: cookie, a per-socket nonce, slot index, slot generation.
fn write_tid(req: &mut [u8], nonce: u32, slot: usize, generation: u32) {
    if let Some(t) = req.get_mut(8..HEADER_LEN) {
        t[..4].copy_from_slice(&nonce.to_be_bytes());
        t[4..8].copy_from_slice(&(slot as u32).to_be_bytes());
        t[8..12].copy_from_slice(&generation.to_be_bytes());
    }
}

/// Checks that `bytes` is a Binding success response to a request of this socket (right cookie and
/// nonce, an existing slot, a readable mapped address, no bad FINGERPRINT) and finds its slot.
fn classify(bytes: &[u8], nonce: u32, slots: &[Slot]) -> Verdict {
    let Ok(msg) = Message::parse(bytes) else {
        return Verdict::Invalid;
    };
    if msg.message_type() != MessageType::BINDING_RESPONSE {
        return Verdict::Invalid;
    }
    let tid = msg.transaction_id();
    let word = |i: usize| u32::from_be_bytes([tid.0[i], tid.0[i + 1], tid.0[i + 2], tid.0[i + 3]]);
    if word(0) != MAGIC_COOKIE || word(4) != nonce {
        return Verdict::Invalid;
    }
    let (index, generation) = (word(8) as usize, word(12));
    let Some(slot) = slots.get(index) else {
        return Verdict::Invalid;
    };
    if msg.fingerprint_valid() == Some(false) || !has_mapped_address(&msg, &tid) {
        return Verdict::Invalid;
    }
    if slot.generation == generation && slot.sent.is_some() {
        Verdict::Answer(index)
    } else if generation < slot.generation || (generation == slot.generation && slot.sent.is_none())
    {
        Verdict::Late
    } else {
        Verdict::Invalid
    }
}

/// A Binding success response must say where the request came from (RFC 8489 §7.3.1).
fn has_mapped_address(msg: &Message<'_>, tid: &TransactionId) -> bool {
    msg.attributes().any(|a| match a.typ {
        attr_type::XOR_MAPPED_ADDRESS => attr::decode_xor_address(a.value, tid).is_ok(),
        attr_type::MAPPED_ADDRESS => attr::decode_address(a.value).is_ok(),
        _ => false,
    })
}

fn client_socket(target: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // A full window can arrive at once; the default buffer would drop part of it.
    let _ = s.set_recv_buffer_size(1 << 20);
    let _ = s.set_send_buffer_size(1 << 20);
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    s.bind(&any.into())?;
    s.connect(&target.into())?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(TICK))?;
    Ok(s)
}

fn request_template() -> io::Result<[u8; HEADER_LEN]> {
    let mut req = [0u8; HEADER_LEN];
    let tid = TransactionId::random();
    let len = build_request(&mut req, &tid, &RequestOptions::default())
        .map_err(|e| io::Error::other(format!("cannot encode request: {e}")))?;
    if len != HEADER_LEN {
        return Err(io::Error::other("binding request is not a bare header"));
    }
    Ok(req)
}

/// Sends one request and waits up to [`PREFLIGHT`] for a valid answer, so a wrong target fails
/// fast with a clear error instead of producing a report full of losses.
fn preflight(target: SocketAddr) -> io::Result<()> {
    let sock = client_socket(target)?;
    let mut req = request_template()?;
    let nonce: u32 = rand::random();
    let slots = [Slot {
        sent: Some(Instant::now()),
        generation: 0,
    }];
    write_tid(&mut req, nonce, 0, 0);
    let start = Instant::now();
    let mut next_send = start;
    let mut buf = [0u8; 2048];
    let mut refused = false;
    while start.elapsed() < PREFLIGHT {
        if Instant::now() >= next_send {
            // Errors here show up again on recv (ICMP) or as silence; both are reported below.
            let _ = sock.send(&req);
            next_send += PREFLIGHT / 4;
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                if classify(&buf[..n], nonce, &slots) == Verdict::Answer(0) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused = true,
            Err(_) => {}
        }
    }
    if refused {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{target} refused the request (icmp port unreachable): nothing listens there"),
        ))
    } else {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no binding response from {target} within {} ms",
                PREFLIGHT.as_millis()
            ),
        ))
    }
}

/// Datagrams read or sent per system call (Linux; elsewhere one).
pub const BATCH: usize = 32;

/// Answers read with one system call. Allocated once per socket thread.
struct Inbox {
    data: Box<[[u8; 2048]; BATCH]>,
    len: [usize; BATCH],
    #[cfg(target_os = "linux")]
    headers: nix::sys::socket::MultiHeaders<()>,
}

impl Inbox {
    fn new() -> Self {
        Self {
            data: Box::new([[0; 2048]; BATCH]),
            len: [0; BATCH],
            #[cfg(target_os = "linux")]
            headers: nix::sys::socket::MultiHeaders::preallocate(BATCH, None),
        }
    }

    /// Blocks until at least one datagram is queued (or the socket's read timeout passes), then
    /// reads every queued one, up to [`BATCH`].
    #[cfg(target_os = "linux")]
    fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        use nix::sys::socket::{recvmmsg, MsgFlags};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;

        let mut iovs = self.data.each_mut().map(|b| [IoSliceMut::new(b)]);
        let results = recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )?;
        let mut n = 0;
        for (len, m) in self.len.iter_mut().zip(results) {
            *len = m.bytes.min(2048);
            n += 1;
        }
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.len[0] = sock.recv(&mut self.data[0])?;
        Ok(1)
    }

    fn get(&self, i: usize) -> &[u8] {
        match (self.data.get(i), self.len.get(i)) {
            (Some(d), Some(&len)) => &d[..len.min(d.len())],
            _ => &[],
        }
    }
}

/// Requests waiting to be sent with one system call.
struct Outbox {
    data: [[u8; HEADER_LEN]; BATCH],
    count: usize,
    #[cfg(target_os = "linux")]
    headers: nix::sys::socket::MultiHeaders<()>,
}

impl Outbox {
    fn new(template: [u8; HEADER_LEN]) -> Self {
        Self {
            data: [template; BATCH],
            count: 0,
            #[cfg(target_os = "linux")]
            headers: nix::sys::socket::MultiHeaders::preallocate(BATCH, None),
        }
    }

    /// Queues the request for (`slot`, `generation`), sending the queue first if it is full.
    fn push(&mut self, sock: &UdpSocket, nonce: u32, slot: usize, generation: u32, t: &mut Tally) {
        if self.count == BATCH {
            self.flush(sock, t);
        }
        write_tid(&mut self.data[self.count], nonce, slot, generation);
        self.count += 1;
    }

    /// Sends everything queued. A request that fails to leave is counted as an error and stays
    /// outstanding; the retry scan replaces it.
    fn flush(&mut self, sock: &UdpSocket, t: &mut Tally) {
        let mut done = 0;
        while done < self.count {
            match self.send(sock, done) {
                Ok(k) => done += k.max(1),
                Err(_) => {
                    t.errors += 1;
                    done += 1;
                }
            }
        }
        self.count = 0;
    }

    #[cfg(target_os = "linux")]
    fn send(&mut self, sock: &UdpSocket, start: usize) -> io::Result<usize> {
        use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;

        let iovs = self.data.each_ref().map(|d| [IoSlice::new(d)]);
        let end = self.count.min(BATCH);
        // The socket is connected: no destination per message.
        let to = [None::<()>; BATCH];
        let no_cmsgs: [ControlMessage<'_>; 0] = [];
        let sent = sendmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs[start..end].iter(),
            &to[start..end],
            no_cmsgs,
            MsgFlags::empty(),
        )?;
        Ok(sent.count())
    }

    #[cfg(not(target_os = "linux"))]
    fn send(&mut self, sock: &UdpSocket, start: usize) -> io::Result<usize> {
        sock.send(&self.data[start]).map(|_| 1)
    }
}

/// One socket's closed loop. Ends at `deadline + DRAIN` at the latest: every iteration either
/// handles the answers queued or waits at most [`TICK`].
fn drive(sock: &UdpSocket, window: usize, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let Ok(req) = request_template() else {
        t.errors += 1;
        return t;
    };
    let nonce: u32 = rand::random();
    let mut slots = vec![
        Slot {
            sent: None,
            generation: 0,
        };
        window
    ];
    let mut inbox = Inbox::new();
    let mut outbox = Outbox::new(req);
    let drain_end = deadline + DRAIN;

    let send = |slots: &mut [Slot], i: usize, now: Instant, t: &mut Tally, o: &mut Outbox| {
        let slot = &mut slots[i];
        slot.generation = slot.generation.wrapping_add(1);
        slot.sent = Some(now);
        t.sent += 1;
        o.push(sock, nonce, i, slot.generation, t);
    };

    let now = Instant::now();
    for i in 0..window {
        send(&mut slots, i, now, &mut t, &mut outbox);
    }
    let mut outstanding = window;
    let mut next_scan = now + TICK;
    loop {
        // Whatever the last round queued leaves before this thread blocks for answers.
        outbox.flush(sock, &mut t);
        let got = inbox.recv(sock);
        let now = Instant::now();
        match got {
            Ok(n) => {
                for k in 0..n {
                    match classify(inbox.get(k), nonce, &slots) {
                        Verdict::Answer(i) => {
                            if let Some(sent) = slots[i].sent.take() {
                                let us = now.saturating_duration_since(sent).as_micros();
                                t.latency.record(u64::try_from(us).unwrap_or(u64::MAX));
                            }
                            t.responses += 1;
                            outstanding -= 1;
                            if now < deadline {
                                t.in_window += 1;
                                send(&mut slots, i, now, &mut t, &mut outbox);
                                outstanding += 1;
                            }
                        }
                        Verdict::Late => t.late += 1,
                        Verdict::Invalid => t.invalid += 1,
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => t.errors += 1,
        }
        if now >= next_scan {
            next_scan = now + TICK;
            for i in 0..slots.len() {
                let Some(sent) = slots[i].sent else { continue };
                if now.saturating_duration_since(sent) < RETRY_AFTER {
                    continue;
                }
                t.lost += 1;
                if now < deadline {
                    send(&mut slots, i, now, &mut t, &mut outbox);
                } else {
                    slots[i].sent = None;
                    outstanding -= 1;
                }
            }
        }
        if (now >= deadline && outstanding == 0) || now >= drain_end {
            break;
        }
    }
    t.lost += slots.iter().filter(|s| s.sent.is_some()).count() as u64;
    t
}

/// Runs the load for `cfg.duration` (plus at most [`DRAIN`]) and reports what the server did.
/// Fails before sending load if the configuration is out of bounds or the target does not answer.
pub fn run_load(cfg: &LoadConfig) -> io::Result<LoadReport> {
    cfg.validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    preflight(cfg.target)?;
    let socks = (0..cfg.sockets)
        .map(|_| client_socket(cfg.target))
        .collect::<io::Result<Vec<_>>>()?;
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = socks
            .iter()
            .map(|sock| s.spawn(move || drive(sock, cfg.window, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut all = Tally::default();
    for t in &tallies {
        all.sent += t.sent;
        all.responses += t.responses;
        all.in_window += t.in_window;
        all.lost += t.lost;
        all.late += t.late;
        all.invalid += t.invalid;
        all.errors += t.errors;
        all.latency.merge(&t.latency);
    }
    let seconds = cfg.duration.as_secs_f64();
    Ok(LoadReport {
        target: cfg.target,
        seconds,
        sockets: cfg.sockets,
        window: cfg.window,
        requests_sent: all.sent,
        responses: all.responses,
        lost: all.lost,
        late: all.late,
        invalid: all.invalid,
        errors: all.errors,
        requests_per_second: all.in_window as f64 / seconds,
        p50_us: all.latency.percentile(0.50),
        p99_us: all.latency.percentile(0.99),
        max_us: all.latency.max(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reflector::driver::{DriverConfig, RunningReflector};
    use crate::reflector::rate_limit::RateLimit;
    use crate::reflector::ReflectorConfig;

    #[test]
    fn histogram_is_exact_below_32_and_within_a_32nd_above() {
        for v in 0..32 {
            assert_eq!(Histogram::bounds(Histogram::index(v)), (v, v));
        }
        let mut v = 32u64;
        while v < (1 << MAX_BITS) {
            let (lo, hi) = Histogram::bounds(Histogram::index(v));
            assert!(lo <= v && v <= hi, "{v} not in [{lo}, {hi}]");
            assert!(
                (hi - lo + 1) * SUB <= lo,
                "bucket [{lo}, {hi}] wider than 1/32"
            );
            v = v + 1 + v / 7;
        }
        assert_eq!(Histogram::index((1 << MAX_BITS) - 1), BUCKETS - 1);
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn histogram_buckets_tile_the_range() {
        for i in 1..BUCKETS {
            assert_eq!(Histogram::bounds(i - 1).1 + 1, Histogram::bounds(i).0);
        }
    }

    #[test]
    fn percentiles_of_one_to_a_hundred() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile(0.50), 50);
        // 99 shares the bucket [98, 99] (two values per bucket between 64 and 127).
        assert_eq!(h.percentile(0.99), 99);
        assert_eq!(h.percentile(1.0), 100);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.max(), 100);
    }

    #[test]
    fn percentile_is_a_bucket_upper_bound_capped_by_the_max() {
        let mut h = Histogram::new();
        for _ in 0..99 {
            h.record(10);
        }
        h.record(10_000);
        assert_eq!(h.percentile(0.5), 10);
        assert_eq!(h.percentile(0.99), 10);
        // 10 000 lies in [9984, 10239]; the exact max caps the answer.
        assert_eq!(h.percentile(0.999), 10_000);
        assert_eq!(Histogram::new().percentile(0.5), 0);
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_max() {
        let (mut a, mut b) = (Histogram::new(), Histogram::new());
        a.record(5);
        b.record(7);
        b.record(1_000);
        a.merge(&b);
        assert_eq!((a.count(), a.max(), a.percentile(0.5)), (3, 1_000, 7));
    }

    fn slots(n: usize) -> Vec<Slot> {
        vec![
            Slot {
                sent: Some(Instant::now()),
                generation: 3,
            };
            n
        ]
    }

    /// A Binding success response to the request `write_tid` would stamp for (nonce, slot, gen).
    fn response(nonce: u32, slot: usize, generation: u32, mapped: bool) -> Vec<u8> {
        let mut hdr = [0u8; HEADER_LEN];
        hdr[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        write_tid(&mut hdr, nonce, slot, generation);
        let mut tid = [0u8; 16];
        tid.copy_from_slice(&hdr[4..]);
        let mut out = vec![0u8; 512];
        let mut w = crate::stun::MessageWriter::new(
            &mut out,
            MessageType::BINDING_RESPONSE,
            &TransactionId(tid),
        )
        .unwrap();
        if mapped {
            w.add_xor_address(
                attr_type::XOR_MAPPED_ADDRESS,
                "127.0.0.1:4000".parse().unwrap(),
            )
            .unwrap();
        }
        let n = w.finish_with_fingerprint().unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn classify_finds_the_slot_by_transaction_id() {
        let (s, nonce) = (slots(4), 0xAABB_CCDD);
        let ok = response(nonce, 2, 3, true);
        assert_eq!(classify(&ok, nonce, &s), Verdict::Answer(2));
        // An answer to generation 2 of a slot now at generation 3 was already counted lost.
        assert_eq!(
            classify(&response(nonce, 2, 2, true), nonce, &s),
            Verdict::Late
        );
        let mut answered = slots(4);
        answered[2].sent = None;
        assert_eq!(classify(&ok, nonce, &answered), Verdict::Late);
    }

    #[test]
    fn classify_refuses_everything_else() {
        let (s, nonce) = (slots(4), 0xAABB_CCDD);
        let ok = response(nonce, 2, 3, true);
        // Another run or socket, a slot or generation this socket never used.
        assert_eq!(classify(&ok, nonce ^ 1, &s), Verdict::Invalid);
        assert_eq!(classify(&ok, nonce, &slots(2)), Verdict::Invalid);
        assert_eq!(
            classify(&response(nonce, 2, 4, true), nonce, &s),
            Verdict::Invalid
        );
        // Truncated, corrupted FINGERPRINT, no mapped address, a request instead of a response.
        assert_eq!(classify(&ok[..ok.len() - 4], nonce, &s), Verdict::Invalid);
        let mut bad_fp = ok.clone();
        let last = bad_fp.len() - 1;
        bad_fp[last] ^= 1;
        assert_eq!(classify(&bad_fp, nonce, &s), Verdict::Invalid);
        assert_eq!(
            classify(&response(nonce, 2, 3, false), nonce, &s),
            Verdict::Invalid
        );
        let mut req = request_template().unwrap();
        write_tid(&mut req, nonce, 2, 3);
        assert_eq!(classify(&req, nonce, &s), Verdict::Invalid);
        assert_eq!(classify(&[], nonce, &s), Verdict::Invalid);
    }

    #[test]
    fn config_bounds() {
        let ok = LoadConfig {
            target: "127.0.0.1:3478".parse().unwrap(),
            duration: Duration::from_secs(1),
            sockets: 1,
            window: 1,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            LoadConfig {
                sockets: 0,
                ..ok.clone()
            },
            LoadConfig {
                window: MAX_WINDOW + 1,
                ..ok.clone()
            },
            LoadConfig {
                duration: Duration::ZERO,
                ..ok.clone()
            },
            LoadConfig {
                target: "127.0.0.1:0".parse().unwrap(),
                ..ok.clone()
            },
            LoadConfig {
                target: "0.0.0.0:3478".parse().unwrap(),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    /// A one-address reflector on 127.0.0.1 and a port the kernel picks (UDP only, no limit).
    fn reflector() -> RunningReflector {
        let mut cfg = DriverConfig::new(ReflectorConfig {
            primary: SocketAddr::from(([127, 0, 0, 1], 0)),
            alternate: None,
            partner: None,
        });
        cfg.tcp = false;
        cfg.workers = 2;
        cfg.rate_limit = RateLimit {
            per_second: 0,
            burst: 0,
        };
        RunningReflector::start(cfg).unwrap()
    }

    #[test]
    fn short_run_against_the_reflector() {
        let r = reflector();
        let target = r.udp_addresses()[0];
        let report = run_load(&LoadConfig {
            target,
            duration: Duration::from_millis(300),
            sockets: 2,
            window: 4,
        })
        .unwrap();
        let served = r.stop();
        assert!(report.responses > 0, "{report:?}");
        assert_eq!(report.invalid, 0, "{report:?}");
        assert_eq!(
            report.requests_sent,
            report.responses + report.lost,
            "{report:?}"
        );
        assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
        // Every answer we counted was produced by the reflector (the preflight adds one or more).
        assert!(served.responses > report.responses, "{served:?} {report:?}");
    }

    #[test]
    fn a_silent_target_fails_fast() {
        // A bound socket that never answers: no ICMP either, so this is the timeout path.
        let quiet = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = run_load(&LoadConfig {
            target: quiet.local_addr().unwrap(),
            duration: Duration::from_secs(60),
            sockets: 1,
            window: 1,
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }
}
