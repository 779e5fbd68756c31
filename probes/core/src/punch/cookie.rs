//! Return routability without state: the rendezvous server's cookie (issue 14, H4).
//!
//! A REGISTER or CONNECT over UDP is believed only if it echoes a cookie the server handed to its
//! source address: HMAC-SHA256 (the `hmac` and `sha2` crates, no home-made construction) under a
//! per-process random key, over the transport, the server's socket, the source address and a
//! time slot, truncated to 96 bits. A spoofed source never sees the cookie sent to the address it
//! pretends to be, so it can make the server send nothing but a challenge no larger than its own
//! request, and it creates no state: minting and checking a cookie allocate nothing and store
//! nothing (the same idea as DTLS's HelloVerifyRequest and coturn's nonce).
//!
//! A cookie is valid in the slot it was made in and the next one, so it lives between one and two
//! [`CookieJar::slot`] lengths; peers pick up a fresh one from every answer of the server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::codec::COOKIE_LEN;
use super::table::Endpoint;
use super::Transport;

type HmacSha256 = Hmac<Sha256>;

/// Mints and checks cookies; holds only its key, its epoch and its slot length.
#[derive(Clone)]
pub struct CookieJar {
    key: [u8; 32],
    epoch: Instant,
    slot: Duration,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CookieJar")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

/// Default slot: cookies live 30-60 s; a listener's keepalive every 2 s renews its cookie.
pub const COOKIE_SLOT: Duration = Duration::from_secs(30);

impl CookieJar {
    /// A jar with a key drawn from `rng` (the server seeds it from the OS; tests from a number).
    pub fn new(epoch: Instant, slot: Duration, rng: &mut impl RngCore) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Self {
            key,
            epoch,
            slot: slot.max(Duration::from_millis(1)),
        }
    }

    pub fn slot(&self) -> Duration {
        self.slot
    }

    fn slot_at(&self, now: Instant) -> u32 {
        let n = now.saturating_duration_since(self.epoch).as_nanos() / self.slot.as_nanos();
        (n & u128::from(u32::MAX)) as u32
    }

    fn mac(&self, slot: u32, ep: &Endpoint) -> HmacSha256 {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("hmac takes any key");
        m.update(&[match ep.transport {
            Transport::Udp => 17,
            Transport::Tcp => 6,
        }]);
        addr(&mut m, ep.local);
        addr(&mut m, ep.remote);
        m.update(&slot.to_be_bytes());
        m
    }

    /// The cookie for `ep` at `now`.
    pub fn mint(&self, now: Instant, ep: &Endpoint) -> [u8; COOKIE_LEN] {
        let slot = self.slot_at(now);
        let tag = self.mac(slot, ep).finalize().into_bytes();
        let mut c = [0u8; COOKIE_LEN];
        c[..4].copy_from_slice(&slot.to_be_bytes());
        c[4..].copy_from_slice(&tag[..COOKIE_LEN - 4]);
        c
    }

    /// Whether `cookie` was minted for `ep` in this slot or the one before (constant-time
    /// comparison of the tag).
    pub fn verify(&self, now: Instant, ep: &Endpoint, cookie: &[u8]) -> bool {
        let Some((slot, tag)) = cookie.split_first_chunk::<4>() else {
            return false;
        };
        if tag.len() != COOKIE_LEN - 4 {
            return false;
        }
        let slot = u32::from_be_bytes(*slot);
        let current = self.slot_at(now);
        if slot != current && slot != current.wrapping_sub(1) {
            return false;
        }
        self.mac(slot, ep).verify_truncated_left(tag).is_ok()
    }
}

fn addr(m: &mut HmacSha256, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            m.update(&[4]);
            m.update(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            m.update(&[6]);
            m.update(&v6.ip().octets());
        }
    }
    m.update(&a.port().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ep(remote: &str) -> Endpoint {
        Endpoint {
            transport: Transport::Udp,
            local: "198.51.100.1:3490".parse().expect("addr"),
            remote: remote.parse().expect("addr"),
        }
    }

    #[test]
    fn a_cookie_is_bound_to_its_source_and_lives_one_to_two_slots() {
        let t0 = Instant::now();
        let jar = CookieJar::new(t0, COOKIE_SLOT, &mut StdRng::seed_from_u64(1));
        let a = ep("203.0.113.1:4000");
        let c = jar.mint(t0, &a);
        assert!(jar.verify(t0, &a, &c));
        assert!(jar.verify(t0 + COOKIE_SLOT, &a, &c), "the next slot");
        assert!(!jar.verify(t0 + 2 * COOKIE_SLOT, &a, &c), "expired");
        assert!(!jar.verify(t0, &ep("203.0.113.1:4001"), &c), "other port");
        assert!(
            !jar.verify(t0, &ep("203.0.113.2:4000"), &c),
            "other address"
        );
        let tcp = Endpoint {
            transport: Transport::Tcp,
            ..a
        };
        assert!(!jar.verify(t0, &tcp, &c), "other transport");
        let mut bad = c;
        bad[COOKIE_LEN - 1] ^= 1;
        assert!(!jar.verify(t0, &a, &bad));
        assert!(!jar.verify(t0, &a, &[0u8; COOKIE_LEN]));
        assert!(!jar.verify(t0, &a, &c[..8]));
        // Another process (another key) does not accept it.
        let other = CookieJar::new(t0, COOKIE_SLOT, &mut StdRng::seed_from_u64(2));
        assert!(!other.verify(t0, &a, &c));
    }
}
