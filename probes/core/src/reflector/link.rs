//! The authenticated link between two cooperating single-IP reflectors (RFC 5780 §2.3).
//!
//! When a client asks for an answer from the other IP, the host that received the request forwards
//! it to its partner, which answers from its own address. Nothing in RFC 5780 specifies this link
//! (no peer implements it), so the format is ours: one UDP datagram per forwarded request,
//!
//! ```text
//! "NSL1" | unix time ms (u64) | received-on address | client address | request bytes | HMAC-SHA256
//! ```
//!
//! addresses in the STUN MAPPED-ADDRESS layout behind a one-byte length. The tag covers everything
//! before it and is keyed with the shared secret, so nobody without the secret can make a partner
//! send anything. Only datagrams whose source is the configured partner are considered at all.
//!
//! Replays are refused by a freshness window (the two hosts' clocks must agree to within
//! [`MAX_SKEW_MS`]) plus a record of every tag seen inside that window. The record is bucketed by
//! the second the message is stamped with: a bucket is only ever cleared for a second that has left
//! the freshness window, so a message it held is refused as stale from then on, and no amount of
//! traffic can evict a tag that could still be replayed (a fixed-size cache of recent tags can be
//! flushed by a burst of forwards, after which old messages replay). Memory stays fixed because a
//! bucket holds at most [`MAX_FORWARDS_PER_SECOND`] tags: beyond that the verifier refuses
//! ([`LinkError::WindowFull`]) rather than forgets. Forwards are made only for change-IP requests,
//! which the sending partner already rate-limits per client.

use std::fmt;
use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::stun::attr::{address_len, decode_address, encode_address};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"NSL1";
const TAG_LEN: usize = 32;
/// Largest accepted difference between the sender's timestamp and ours.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Most link messages accepted per second of their timestamp; more are refused, never evicted.
pub const MAX_FORWARDS_PER_SECOND: usize = 2048;
/// One bucket per timestamp second. A freshness window of ±[`MAX_SKEW_MS`] spans at most
/// 2 × 30 + 1 distinct seconds, so two seconds sharing a bucket are never both fresh.
const BUCKETS: u64 = 64;
const _: () = assert!(BUCKETS * 1000 > 2 * MAX_SKEW_MS + 1000);
/// Open-addressed slots per bucket: twice the capacity keeps probe chains short.
const BUCKET_SLOTS: usize = 2 * MAX_FORWARDS_PER_SECOND;

/// One side of a cooperating pair.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Where this process listens for the partner's forwards (own IP, link port).
    pub listen: SocketAddr,
    /// Where the partner listens (partner IP, link port).
    pub partner: SocketAddr,
    /// Shared secret; both sides must hold the same bytes.
    pub secret: Vec<u8>,
}

impl fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkConfig")
            .field("listen", &self.listen)
            .field("partner", &self.partner)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A request handed over by the partner, as it reached the partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded<'a> {
    pub received_on: SocketAddr,
    pub client: SocketAddr,
    pub request: &'a [u8],
}

/// Why a link datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("link message malformed")]
    Malformed,
    #[error("link message failed authentication (different secret?)")]
    BadTag,
    #[error("link message timestamp is {0} ms away from ours (clock skew or replay)")]
    Stale(u64),
    #[error("link message replayed")]
    Replayed,
    #[error("link message not from the configured partner")]
    NotPartner,
    #[error("link replay window full (over {MAX_FORWARDS_PER_SECOND} forwards in one second, or the clock went back)")]
    WindowFull,
}

impl LinkConfig {
    pub(crate) fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.secret).expect("hmac takes any key length")
    }

    /// Writes a forward message into `out`; `None` if it does not fit.
    pub fn encode_forward(
        &self,
        out: &mut [u8],
        unix_ms: u64,
        received_on: SocketAddr,
        client: SocketAddr,
        request: &[u8],
    ) -> Option<usize> {
        let (rl, cl) = (address_len(received_on), address_len(client));
        let body = 4 + 8 + 1 + rl + 1 + cl + request.len();
        if out.len() < body + TAG_LEN {
            return None;
        }
        out[..4].copy_from_slice(MAGIC);
        out[4..12].copy_from_slice(&unix_ms.to_be_bytes());
        let mut at = 12;
        for (addr, len) in [(received_on, rl), (client, cl)] {
            out[at] = len as u8;
            encode_address(addr, &mut out[at + 1..at + 1 + len]);
            at += 1 + len;
        }
        out[at..body].copy_from_slice(request);
        let mut mac = self.mac();
        mac.update(&out[..body]);
        out[body..body + TAG_LEN].copy_from_slice(&mac.finalize().into_bytes());
        Some(body + TAG_LEN)
    }
}

/// Checks link datagrams: origin, authenticity, freshness, no replay. Fixed memory (≈ 2 MiB).
#[derive(Debug)]
pub struct LinkVerifier {
    cfg: LinkConfig,
    window: ReplayWindow,
    started_ms: u64,
}

impl LinkVerifier {
    /// A verifier started at wall-clock time `unix_ms`. It refuses messages stamped before it
    /// started: it has no record of them, so accepting them would let a restart reopen replays.
    pub fn new(cfg: LinkConfig, unix_ms: u64) -> Self {
        Self {
            cfg,
            window: ReplayWindow::new(),
            started_ms: unix_ms,
        }
    }

    /// Checks one datagram that arrived from `from` at wall-clock time `unix_ms`.
    pub fn verify<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &'a [u8],
        unix_ms: u64,
    ) -> Result<Forwarded<'a>, LinkError> {
        // The partner sends from its listening socket, which is the address we send to.
        if !same_endpoint(from, self.cfg.partner) {
            return Err(LinkError::NotPartner);
        }
        if datagram.len() < 4 + 8 + 2 + 8 + 8 + TAG_LEN || &datagram[..4] != MAGIC {
            return Err(LinkError::Malformed);
        }
        let body = datagram.len() - TAG_LEN;
        let mut mac = self.cfg.mac();
        mac.update(&datagram[..body]);
        mac.verify_slice(&datagram[body..])
            .map_err(|_| LinkError::BadTag)?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&datagram[4..12]);
        let stamp = u64::from_be_bytes(ts);
        let skew = stamp.abs_diff(unix_ms);
        if skew > MAX_SKEW_MS {
            return Err(LinkError::Stale(skew));
        }
        if stamp < self.started_ms {
            return Err(LinkError::Stale(self.started_ms - stamp));
        }
        // The tag is an HMAC output: uniformly distributed and unforgeable without the secret,
        // so its first bytes serve as the key without further hashing.
        let mut id = [0u8; 8];
        id.copy_from_slice(&datagram[body..body + 8]);
        self.window
            .insert(stamp / 1000, u64::from_be_bytes(id) | 1)?;

        let mut at = 12;
        let mut addrs = [None; 2];
        for slot in &mut addrs {
            let len = *datagram.get(at).ok_or(LinkError::Malformed)? as usize;
            let raw = datagram
                .get(at + 1..at + 1 + len)
                .filter(|_| at + 1 + len <= body)
                .ok_or(LinkError::Malformed)?;
            *slot = Some(decode_address(raw).map_err(|_| LinkError::Malformed)?);
            at += 1 + len;
        }
        let (Some(received_on), Some(client)) = (addrs[0], addrs[1]) else {
            return Err(LinkError::Malformed);
        };
        Ok(Forwarded {
            received_on,
            client,
            request: &datagram[at..body],
        })
    }
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// The tags of every accepted message, bucketed by the second of its timestamp.
#[derive(Debug)]
struct ReplayWindow {
    /// `BUCKETS` × `BUCKET_SLOTS` tags; 0 is an empty slot (tags are stored with the low bit set).
    tags: Vec<u64>,
    /// Per bucket: the timestamp second its tags belong to, and how many it holds.
    owner: Vec<(u64, usize)>,
}

impl ReplayWindow {
    fn new() -> Self {
        Self {
            tags: vec![0; BUCKETS as usize * BUCKET_SLOTS],
            owner: vec![(u64::MAX, 0); BUCKETS as usize],
        }
    }

    /// Records `tag` for timestamp second `second` (already checked to be fresh).
    fn insert(&mut self, second: u64, tag: u64) -> Result<(), LinkError> {
        let b = (second % BUCKETS) as usize;
        let slots = &mut self.tags[b * BUCKET_SLOTS..(b + 1) * BUCKET_SLOTS];
        let (owner, count) = &mut self.owner[b];
        if *owner != second {
            if *owner != u64::MAX && *owner > second {
                // Our clock went back by more than a bucket cycle: the bucket belongs to a later
                // second that may become fresh again, so keep it and refuse (fail closed).
                return Err(LinkError::WindowFull);
            }
            // An earlier second that shares this bucket is at least BUCKETS seconds older than a
            // fresh one, so it is stale now: forgetting its tags cannot reopen a replay.
            slots.fill(0);
            *owner = second;
            *count = 0;
        }
        let mut i = (tag >> 1) as usize % BUCKET_SLOTS;
        loop {
            match slots[i] {
                0 => break,
                t if t == tag => return Err(LinkError::Replayed),
                _ => i = (i + 1) % BUCKET_SLOTS,
            }
        }
        if *count >= MAX_FORWARDS_PER_SECOND {
            return Err(LinkError::WindowFull);
        }
        slots[i] = tag;
        *count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(non_snake_case)]
    fn PARTNER() -> SocketAddr {
        "127.0.0.1:3480".parse().unwrap()
    }

    /// A distinct, valid forward stamped `unix_ms`, as the partner would send it.
    fn forward(n: u32, unix_ms: u64) -> Vec<u8> {
        let mut out = [0u8; 256];
        let recv: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let client = SocketAddr::from(([198, 51, 100, 7], 40000));
        let len = cfg(b"s3cret")
            .encode_forward(&mut out, unix_ms, recv, client, &n.to_be_bytes())
            .unwrap();
        out[..len].to_vec()
    }

    #[test]
    fn a_flood_of_forwards_cannot_flush_the_replay_window() {
        let mut v = LinkVerifier::new(cfg(b"s3cret"), 0);
        let t0 = 1_000_000_000;
        let first = forward(0, t0);
        assert!(v.verify(PARTNER(), &first, t0).is_ok());
        // 6,000 honest forwards over the next 20 s (300/s, far more than any cache slot count).
        for i in 1..=6000u32 {
            let t = t0 + u64::from(i) * 20_000 / 6000;
            assert!(
                v.verify(PARTNER(), &forward(i, t), t).is_ok(),
                "forward {i}"
            );
        }
        // The first message is still fresh, and still refused.
        assert_eq!(
            v.verify(PARTNER(), &first, t0 + 20_000),
            Err(LinkError::Replayed)
        );
        // Once its second has left the window it is stale, bucket reused or not.
        let later = t0 + BUCKETS * 1000;
        assert!(v.verify(PARTNER(), &forward(9999, later), later).is_ok());
        assert!(matches!(
            v.verify(PARTNER(), &first, later),
            Err(LinkError::Stale(_))
        ));
    }

    #[test]
    fn over_capacity_the_window_refuses_instead_of_forgetting() {
        let mut v = LinkVerifier::new(cfg(b"s3cret"), 0);
        let t0 = 2_000_000_000;
        let all: Vec<_> = (0..=MAX_FORWARDS_PER_SECOND as u32)
            .map(|i| forward(i, t0))
            .collect();
        for m in &all[..MAX_FORWARDS_PER_SECOND] {
            assert!(v.verify(PARTNER(), m, t0).is_ok());
        }
        assert_eq!(
            v.verify(PARTNER(), &all[MAX_FORWARDS_PER_SECOND], t0),
            Err(LinkError::WindowFull)
        );
        for m in &all[..MAX_FORWARDS_PER_SECOND] {
            assert_eq!(v.verify(PARTNER(), m, t0 + 500), Err(LinkError::Replayed));
        }
        // The next second has its own room.
        assert!(v
            .verify(PARTNER(), &forward(0, t0 + 1000), t0 + 1000)
            .is_ok());
    }

    #[test]
    fn only_the_partner_is_heard() {
        let t0 = 3_000_000_000;
        let m = forward(1, t0);
        for from in ["127.0.0.9:3480", "127.0.0.1:3481", "[::1]:3480"] {
            let mut v = LinkVerifier::new(cfg(b"s3cret"), 0);
            assert_eq!(
                v.verify(from.parse().unwrap(), &m, t0),
                Err(LinkError::NotPartner),
                "{from}"
            );
        }
        let mut v = LinkVerifier::new(cfg(b"s3cret"), 0);
        assert!(v
            .verify("[::ffff:127.0.0.1]:3480".parse().unwrap(), &m, t0)
            .is_ok());
    }

    #[test]
    fn a_restarted_verifier_refuses_what_was_stamped_before_it_started() {
        let t0 = 5_000_000_000;
        let before = forward(1, t0 - 1);
        let mut v = LinkVerifier::new(cfg(b"s3cret"), t0);
        assert!(matches!(
            v.verify(PARTNER(), &before, t0 + 10),
            Err(LinkError::Stale(1))
        ));
        assert!(v.verify(PARTNER(), &forward(2, t0), t0 + 10).is_ok());
    }

    #[test]
    fn a_clock_that_goes_back_fails_closed() {
        let mut v = LinkVerifier::new(cfg(b"s3cret"), 0);
        let t0 = 4_000_000_000;
        let ahead = t0 + BUCKETS * 1000;
        assert!(v.verify(PARTNER(), &forward(1, ahead), ahead).is_ok());
        // Our clock jumps back by a bucket cycle: the bucket of `ahead` is kept, not cleared.
        assert_eq!(
            v.verify(PARTNER(), &forward(2, t0), t0),
            Err(LinkError::WindowFull)
        );
        assert_eq!(
            v.verify(PARTNER(), &forward(1, ahead), ahead),
            Err(LinkError::Replayed)
        );
    }

    fn cfg(secret: &[u8]) -> LinkConfig {
        LinkConfig {
            listen: "127.0.0.2:3480".parse().unwrap(),
            partner: "127.0.0.1:3480".parse().unwrap(),
            secret: secret.to_vec(),
        }
    }

    #[test]
    fn round_trip_then_replay_refused() {
        let a = cfg(b"s3cret");
        let mut out = [0u8; 256];
        let recv: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let client: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let n = a
            .encode_forward(&mut out, 1_000_000, recv, client, b"REQ!")
            .unwrap();
        let mut v = LinkVerifier::new(cfg(b"s3cret"), 0);
        let f = v.verify(PARTNER(), &out[..n], 1_000_500).unwrap();
        assert_eq!(
            (f.received_on, f.client, f.request),
            (recv, client, &b"REQ!"[..])
        );
        assert_eq!(
            v.verify(PARTNER(), &out[..n], 1_000_500),
            Err(LinkError::Replayed)
        );
    }

    #[test]
    fn wrong_secret_stale_and_tampered_are_refused() {
        let a = cfg(b"one");
        let mut out = [0u8; 256];
        let addr: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let n = a
            .encode_forward(&mut out, 5_000_000, addr, addr, b"x")
            .unwrap();
        assert_eq!(
            LinkVerifier::new(cfg(b"two"), 0).verify(PARTNER(), &out[..n], 5_000_000),
            Err(LinkError::BadTag)
        );
        assert!(matches!(
            LinkVerifier::new(cfg(b"one"), 0).verify(
                PARTNER(),
                &out[..n],
                5_000_000 + MAX_SKEW_MS + 1
            ),
            Err(LinkError::Stale(_))
        ));
        out[14] ^= 1;
        assert_eq!(
            LinkVerifier::new(cfg(b"one"), 0).verify(PARTNER(), &out[..n], 5_000_000),
            Err(LinkError::BadTag)
        );
        for len in 0..n {
            assert!(LinkVerifier::new(cfg(b"one"), 0)
                .verify(PARTNER(), &out[..len], 5_000_000)
                .is_err());
        }
    }
}
