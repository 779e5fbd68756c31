//! How long and how many: the reflector's policy for STUN over TCP (RFC 8489 §6.2.2).
//!
//! A TCP connection holds a slot, a buffer and a task, so anyone who can open connections can try to
//! hold them all: by trickling a request one byte at a time (slowloris), by never reading the answers
//! (the server's write blocks), by simply never sending, or by opening them all from one address.
//! [`TcpLimits`] states the bound for each; [`ConnectionSlots`] does the per-source accounting. Both
//! are pure: the driver owns the sockets and the timers and asks this module what to allow.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

/// The bounds on every TCP connection. The defaults suit an internet-facing server; tests shrink
/// the durations so the guards can be watched at work in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    /// Connections held at once in total; more are closed on accept.
    pub max_connections: usize,
    /// Connections held at once per source (per IPv4 address, per IPv6 /64); more are closed on
    /// accept.
    pub max_per_source: usize,
    /// From the first byte of a request to its last: a whole STUN frame must arrive within this,
    /// however the bytes are spread out. A Binding request is one small segment; seconds are plenty.
    pub request: Duration,
    /// Wait for the first byte of the next request (after the connect, or after an answer).
    pub idle: Duration,
    /// Writing one answer may take at most this; a peer that does not read is closed.
    pub write: Duration,
    /// A connection is closed this long after it was accepted, however busy it is, so no client
    /// holds a slot for ever by staying just inside the other bounds.
    pub lifetime: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_source: 16,
            request: Duration::from_secs(5),
            idle: Duration::from_secs(30),
            write: Duration::from_secs(5),
            lifetime: Duration::from_secs(300),
        }
    }
}

/// Why a connection was refused on accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// [`TcpLimits::max_connections`] are held.
    Full,
    /// [`TcpLimits::max_per_source`] are held from this source.
    PerSource,
}

/// The source a per-source cap is keyed on: the IPv4 address, or the IPv6 /64 (one host usually
/// owns a whole /64, so counting single IPv6 addresses would cap nothing). IPv4-mapped IPv6
/// addresses count as their IPv4 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Counts the connections held, in total and per source. Each source in the table holds at least
/// one connection, so the table never has more than [`TcpLimits::max_connections`] entries.
#[derive(Debug)]
pub struct ConnectionSlots {
    max_total: usize,
    max_per_source: usize,
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl ConnectionSlots {
    pub fn new(limits: &TcpLimits) -> Self {
        Self {
            max_total: limits.max_connections,
            max_per_source: limits.max_per_source,
            total: 0,
            per_source: HashMap::new(),
        }
    }

    /// Takes a slot for a connection from `ip`, or says why not. Every `Ok` must be matched by
    /// one [`ConnectionSlots::release`] of the same IP.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refused> {
        if self.total >= self.max_total {
            return Err(Refused::Full);
        }
        let held = self.per_source.entry(source_key(ip)).or_insert(0);
        if *held >= self.max_per_source {
            return Err(Refused::PerSource);
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back the slot of a connection from `ip` that has ended.
    pub fn release(&mut self, ip: IpAddr) {
        let key = source_key(ip);
        if let Some(held) = self.per_source.get_mut(&key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.per_source.remove(&key);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Connections held in total.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Connections held from the source `ip` belongs to.
    pub fn from_source(&self, ip: IpAddr) -> usize {
        self.per_source.get(&source_key(ip)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> TcpLimits {
        TcpLimits {
            max_connections: total,
            max_per_source: per,
            ..TcpLimits::default()
        }
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let mut s = ConnectionSlots::new(&limits(100, 3));
        for _ in 0..3 {
            assert_eq!(s.admit(v4(1)), Ok(()));
        }
        assert_eq!(s.admit(v4(1)), Err(Refused::PerSource));
        assert_eq!(s.admit(v4(2)), Ok(()));
        s.release(v4(1));
        assert_eq!(s.from_source(v4(1)), 2);
        assert_eq!(s.admit(v4(1)), Ok(()));
        assert_eq!(s.total(), 4);
    }

    #[test]
    fn the_total_is_capped_and_slots_come_back() {
        let mut s = ConnectionSlots::new(&limits(4, 3));
        for i in 0..4 {
            assert_eq!(s.admit(v4(i)), Ok(()));
        }
        assert_eq!(s.admit(v4(9)), Err(Refused::Full));
        for i in 0..4 {
            s.release(v4(i));
        }
        assert_eq!(s.total(), 0);
        assert!(s.per_source.is_empty(), "{s:?}");
        // A release without an admit changes nothing.
        s.release(v4(7));
        assert_eq!(s.total(), 0);
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_v4_as_v4() {
        let mut s = ConnectionSlots::new(&limits(100, 2));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(s.admit(a), Ok(()));
        assert_eq!(s.admit(b), Ok(()));
        assert_eq!(s.admit(a), Err(Refused::PerSource));
        assert_eq!(s.admit(other), Ok(()));
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(s.admit(v4(5)), Ok(()));
        assert_eq!(s.admit(mapped), Ok(()));
        assert_eq!(s.admit(v4(5)), Err(Refused::PerSource));
    }
}
