//! Firewall mode (`translate == false`): public hosts sit behind the router, nothing is rewritten,
//! and inbound packets are admitted by the same RFC 4787 §5 filtering keys and timeouts a NAT
//! uses. This is a small table of its own rather than `NatTable` with an identity mapping, because
//! `NatTable` allocates external ports and an identity "allocation" would fight its port bookkeeping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use natscope_core::nat::{NatBehavior, Protocol, RemoteKey};

/// Cap on open (internal, remote key) pairs; at the cap, expired ones are swept first and then new
/// flows are forwarded but not remembered (their replies are filtered).
const CAP: usize = 65536;

#[derive(Debug)]
pub(crate) struct Firewall {
    behavior: NatBehavior,
    open: HashMap<(Protocol, SocketAddr, RemoteKey), Instant>,
}

/// One open pinhole, for `lab nat-table`.
pub(crate) struct Pinhole {
    pub proto: Protocol,
    pub internal: SocketAddr,
    pub remote: RemoteKey,
    pub expires: Instant,
}

impl Firewall {
    pub fn new(behavior: NatBehavior) -> Self {
        Self {
            behavior,
            open: HashMap::new(),
        }
    }

    /// An outbound packet opens (or refreshes, REQ-6) the pinhole towards `remote`.
    pub fn outbound(
        &mut self,
        now: Instant,
        proto: Protocol,
        internal: SocketAddr,
        remote: SocketAddr,
    ) {
        let key = (proto, internal, self.behavior.filtering.key(remote));
        if !self.open.contains_key(&key) && self.open.len() >= CAP {
            self.sweep(now);
            if self.open.len() >= CAP {
                return;
            }
        }
        self.open.insert(key, now + self.behavior.timeout(proto));
    }

    /// Whether an inbound packet from `remote` to `internal` is admitted.
    pub fn inbound(
        &mut self,
        now: Instant,
        proto: Protocol,
        remote: SocketAddr,
        internal: SocketAddr,
    ) -> bool {
        let key = (proto, internal, self.behavior.filtering.key(remote));
        let timeout = self.behavior.timeout(proto);
        let refresh = self.behavior.inbound_refresh;
        match self.open.get_mut(&key) {
            Some(exp) if *exp > now => {
                if refresh {
                    *exp = now + timeout;
                }
                true
            }
            _ => false,
        }
    }

    /// Whether `internal` has any live pinhole (an ICMP error about its traffic may come from any
    /// router on the path).
    pub fn has_internal(&self, now: Instant, proto: Protocol, internal: SocketAddr) -> bool {
        self.open
            .iter()
            .any(|((p, i, _), exp)| *p == proto && *i == internal && *exp > now)
    }

    pub fn sweep(&mut self, now: Instant) {
        self.open.retain(|_, exp| *exp > now);
    }

    pub fn pinholes(&self, now: Instant) -> impl Iterator<Item = Pinhole> + '_ {
        self.open.iter().filter(move |(_, exp)| **exp > now).map(
            |((proto, internal, remote), expires)| Pinhole {
                proto: *proto,
                internal: *internal,
                remote: *remote,
                expires: *expires,
            },
        )
    }
}
