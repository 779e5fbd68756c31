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
//! send anything. Replays are refused by a freshness window (the two hosts' clocks must agree to
//! within [`MAX_SKEW_MS`]) plus a fixed-size cache of recently seen tags.

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
const REPLAY_SLOTS: usize = 4096;

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
}

impl LinkConfig {
    fn mac(&self) -> HmacSha256 {
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

/// Checks link datagrams: authenticity, freshness, no replay. Fixed memory.
#[derive(Debug)]
pub struct LinkVerifier {
    cfg: LinkConfig,
    seen: Vec<u64>,
    next: usize,
}

impl LinkVerifier {
    pub fn new(cfg: LinkConfig) -> Self {
        Self {
            cfg,
            seen: vec![0; REPLAY_SLOTS],
            next: 0,
        }
    }

    pub fn verify<'a>(
        &mut self,
        datagram: &'a [u8],
        unix_ms: u64,
    ) -> Result<Forwarded<'a>, LinkError> {
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
        let skew = u64::from_be_bytes(ts).abs_diff(unix_ms);
        if skew > MAX_SKEW_MS {
            return Err(LinkError::Stale(skew));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&datagram[body..body + 8]);
        let id = u64::from_be_bytes(id) | 1;
        if self.seen.contains(&id) {
            return Err(LinkError::Replayed);
        }
        self.seen[self.next] = id;
        self.next = (self.next + 1) % self.seen.len();

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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut v = LinkVerifier::new(cfg(b"s3cret"));
        let f = v.verify(&out[..n], 1_000_500).unwrap();
        assert_eq!(
            (f.received_on, f.client, f.request),
            (recv, client, &b"REQ!"[..])
        );
        assert_eq!(v.verify(&out[..n], 1_000_500), Err(LinkError::Replayed));
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
            LinkVerifier::new(cfg(b"two")).verify(&out[..n], 5_000_000),
            Err(LinkError::BadTag)
        );
        assert!(matches!(
            LinkVerifier::new(cfg(b"one")).verify(&out[..n], 5_000_000 + MAX_SKEW_MS + 1),
            Err(LinkError::Stale(_))
        ));
        out[14] ^= 1;
        assert_eq!(
            LinkVerifier::new(cfg(b"one")).verify(&out[..n], 5_000_000),
            Err(LinkError::BadTag)
        );
        for len in 0..n {
            assert!(LinkVerifier::new(cfg(b"one"))
                .verify(&out[..len], 5_000_000)
                .is_err());
        }
    }
}
