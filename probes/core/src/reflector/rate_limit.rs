//! Per-source token buckets with a fixed memory footprint.
//!
//! A source is an IPv4 address or an IPv6 /64: one IPv6 subscriber usually holds a whole /64
//! (RFC 6177, RFC 7934 hand out /64s per host), so keying on the full IPv6 address would let one
//! sender spread a flood over 2^64 addresses and never meet its bucket. IPv4-mapped IPv6
//! addresses (a dual-stack socket) count as the IPv4 address they carry.
//!
//! A reflector on the internet meets spoofed floods from millions of addresses, so the table never
//! grows: it is a fixed array of slots indexed by a keyed hash of the IP (the key is random per
//! process, so senders cannot aim collisions). A slot whose bucket has refilled is free to be taken
//! over by another IP; two busy IPs that collide share one bucket, which errs towards limiting.
//! No allocation after construction; time is an input (`now`), so tests use a virtual clock.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Requests per second and burst allowed per source (IPv4 address or IPv6 /64). `rate == 0` disables limiting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for RateLimit {
    /// Generous for NAT probing (a full natscope probe sends a few dozen requests), tight for floods.
    fn default() -> Self {
        Self {
            per_second: 200,
            burst: 400,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    tag: u64,
    tokens: f64,
    last: Duration,
}

/// The limiter. `allow(now, ip)` costs one hash and one slot update.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    slots: Vec<Slot>,
    hasher: RandomState,
    epoch: Instant,
}

/// Slot count: 64 Ki slots × 24 bytes ≈ 1.5 MiB, fixed.
pub const SLOTS: usize = 1 << 16;

impl RateLimiter {
    pub fn new(limit: RateLimit, epoch: Instant) -> Self {
        let slots = if limit.per_second == 0 { 0 } else { SLOTS };
        Self {
            limit,
            slots: vec![
                Slot {
                    tag: 0,
                    tokens: 0.0,
                    last: Duration::ZERO,
                };
                slots
            ],
            hasher: RandomState::new(),
            epoch,
        }
    }

    /// Takes a token for `ip`'s source (its IPv4 address or IPv6 /64) if one is available.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self.slots.is_empty() {
            return true;
        }
        let h = self.hasher.hash_one(source_key(ip)) | 1; // never 0: 0 marks an empty slot
        let idx = (h as usize) & (self.slots.len() - 1);
        let burst = f64::from(self.limit.burst.max(1));
        let rate = f64::from(self.limit.per_second);
        let t = now.saturating_duration_since(self.epoch);
        let slot = &mut self.slots[idx];
        let elapsed = t.saturating_sub(slot.last).as_secs_f64();
        let mut refilled = (slot.tokens + elapsed * rate).min(burst);
        if slot.tag != h && (slot.tag == 0 || refilled >= burst) {
            // Empty, or its previous owner is idle: the slot is ours, with a full bucket.
            slot.tag = h;
            refilled = burst;
        }
        slot.last = t;
        if refilled >= 1.0 {
            slot.tokens = refilled - 1.0;
            true
        } else {
            slot.tokens = refilled;
            false
        }
    }
}

/// What one bucket is keyed on: the IPv4 address, or the IPv6 address's /64 prefix. The two
/// families never collide (the tag byte), and an IPv4-mapped IPv6 address is its IPv4 address.
fn source_key(ip: IpAddr) -> (u8, u64) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (4, u64::from(u32::from(v4))),
        IpAddr::V6(v6) => (6, (u128::from(v6) >> 64) as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_refill_on_virtual_clock() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(
            RateLimit {
                per_second: 10,
                burst: 5,
            },
            t0,
        );
        let a = ip("192.0.2.1");
        let granted = (0..20).filter(|_| rl.allow(t0, a)).count();
        assert_eq!(granted, 5, "a fresh bucket grants exactly the burst");
        // 10/s: after 300 ms three more tokens.
        let t1 = t0 + Duration::from_millis(300);
        let granted = (0..20).filter(|_| rl.allow(t1, a)).count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn sources_are_independent() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(
            RateLimit {
                per_second: 1,
                burst: 2,
            },
            t0,
        );
        for _ in 0..10 {
            rl.allow(t0, ip("192.0.2.1"));
        }
        assert!(!rl.allow(t0, ip("192.0.2.1")));
        assert!(
            rl.allow(t0, ip("192.0.2.2")),
            "another ip keeps its own budget"
        );
    }

    #[test]
    fn an_ipv6_flood_spread_over_one_slash64_is_limited_but_another_slash64_is_not() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(
            RateLimit {
                per_second: 10,
                burst: 5,
            },
            t0,
        );
        // Every request from a different interface id of 2001:db8:0:1::/64.
        let granted = (0..1000u64)
            .filter(|&i| {
                let addr = (0x2001_0db8_0000_0001u128 << 64) | u128::from(i * 0x9e37_79b9 + 1);
                rl.allow(t0, IpAddr::V6(addr.into()))
            })
            .count();
        assert_eq!(granted, 5, "one /64 shares one bucket");
        assert!(
            rl.allow(t0, ip("2001:db8:0:2::1")),
            "the neighbouring /64 keeps its own budget"
        );
        assert!(!rl.allow(t0, ip("2001:db8:0:1:ffff::1")));
        // A dual-stack socket's IPv4-mapped address is the IPv4 source.
        for _ in 0..5 {
            assert!(rl.allow(t0, ip("192.0.2.1")));
        }
        assert!(!rl.allow(t0, ip("::ffff:192.0.2.1")));
    }

    #[test]
    fn zero_rate_disables_limiting() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(
            RateLimit {
                per_second: 0,
                burst: 0,
            },
            t0,
        );
        assert!((0..100_000).all(|_| rl.allow(t0, ip("192.0.2.9"))));
    }

    #[test]
    fn memory_is_fixed_under_a_spoofed_flood() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(RateLimit::default(), t0);
        for i in 0..200_000u32 {
            rl.allow(t0, IpAddr::V4(i.into()));
        }
        assert_eq!(rl.slots.len(), SLOTS);
        assert_eq!(rl.slots.capacity(), SLOTS);
    }
}
