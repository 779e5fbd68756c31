//! Address pooling (RFC 4787 REQ-2): the server sends a check's answer to Y's external IP, port
//! Pp, which is X's binding only if Y's mapping uses X's external address: always with one
//! address or "paired" pooling, by chance with "arbitrary" pooling over several addresses, where
//! a silent check would fake an expiry. Every refresh answer tells X's mapped address; while all
//! are on one address (16 clocks on 2 addresses all land on one with probability 3·10⁻⁵) nothing
//! changes, not one extra request. Once a second address is seen (on a refresh, a scout, or a
//! check's answer, which carries Y's mapped address), each check first *scouts*: a plain Binding
//! from Y tells the address Y's mapping has right then; only a Y on X's address then sends the
//! RESPONSE-PORT request (from the same socket: the same mapping, an RTT later). A Y mapped
//! elsewhere is kept as a spare and another Y tried, at most [`MAX_SCOUTS`] per check; then the
//! check ends without a verdict and is planned again ([`MAX_VOID`] such in a row end the search as
//! unknown, saying why). The scout's Y is the spare last seen on X's address if there is one (a
//! discarded scout or an earlier check's Y), else a fresh socket: with spares a check costs one
//! extra request, not one per address. A spare is scouted again, never trusted: its mapping may
//! have expired and come back on another address (mappings need not share X's timeout: conntrack
//! gives a flow that saw replies for 2 s a longer one). Expiries counted before the
//! second address was seen no longer stand (the upper bound is dropped, unscouted checks still out
//! end without a verdict; seen only in the inbound stage, the lifetime is reported unknown). An
//! answer reaching Y at port Pp of another address than X's says nothing of X (on X's address it
//! still means the NAT gave X's freed port to Y: expired), nor does one reaching a third socket
//! from a Y on another address. A scout only delays a check: idle times count from real packets.

use std::net::IpAddr;
use std::time::Instant;

use super::check::Outcome;
use super::search::ClockState;
use super::transaction::Kind;
use super::{LifetimeProbe, Stage};
use crate::probe::socket::SocketId;

/// Under arbitrary pooling: fresh sockets tried per check for one mapped to X's address (with
/// 2 addresses all miss with probability 6·10⁻⁸, with 4 about 0.1 %).
pub const MAX_SCOUTS: u32 = 24;

/// Most Ys kept as spares (sockets whose mapping's external address was last seen).
const MAX_SPARES: usize = 64;

/// Checks in a row that found no such socket before the search gives up.
pub(super) const MAX_VOID: u32 = 8;

impl LifetimeProbe {
    /// Under arbitrary pooling, the scout of clock `c`'s check: from the spare Y last seen on X's
    /// address (its mapping is most likely still there, which the scout checks), else from a
    /// fresh Y.
    pub(super) fn next_y(&mut self, c: usize) {
        let ip = self.clocks[c].mapped.map(|m| m.ip());
        let spare = self
            .spares
            .iter()
            .enumerate()
            .filter(|(_, &(_, i, _))| Some(i) == ip)
            .max_by_key(|(_, &(_, _, last))| last)
            .map(|(pos, _)| pos);
        let y = match spare {
            Some(pos) => {
                if self.stage == Stage::Search {
                    self.reused += 1;
                }
                self.spares.remove(pos).0
            }
            None => self.fresh_socket(),
        };
        self.scout(c, y);
    }

    /// Keeps transaction `i`'s socket as a spare Y, last seen mapped on address `ip`.
    pub(super) fn keep_spare(&mut self, i: usize, ip: IpAddr) {
        let tx = &self.txs[i];
        if let Some(last) = tx.sched.last_sent {
            if self.spares.len() >= MAX_SPARES {
                self.spares.remove(0);
            }
            self.spares.push((tx.socket, ip, last));
        }
    }

    /// A plain Binding from Y for clock `c`'s check (arbitrary pooling): its answer tells the
    /// external address Y's mapping has now.
    fn scout(&mut self, c: usize, y: SocketId) {
        self.clocks[c].scouts += 1;
        if self.stage == Stage::Search {
            self.scouts += 1;
        }
        self.add_tx(Kind::Scout, y, c, None);
    }

    /// A scout of clock `c`'s check found nothing usable: another fresh Y, within the bound.
    pub(super) fn scout_missed(&mut self, now: Instant, stage: Stage, c: usize) {
        if stage != self.stage || self.clocks[c].state != ClockState::Checking {
            return;
        }
        if self.clocks[c].scouts >= MAX_SCOUTS {
            self.check_done(now, stage, c, Outcome::Void);
        } else if !self.out_of_budget(now) {
            self.next_y(c);
        }
    }

    /// Whether the NAT was seen to map our sockets to more than one external address.
    pub(super) fn arbitrary(&self) -> bool {
        self.ips.len() > 1
    }

    /// One of our mappings uses external address `ip`. A second address means arbitrary
    /// pooling: from then on checks are scouted, and the expiries counted so far, all from
    /// unscouted checks (whose Y may have left from another address), no longer stand.
    pub(super) fn saw_ip(&mut self, now: Instant, ip: IpAddr) {
        if self.ips.contains(&ip) {
            return;
        }
        self.ips.push(ip);
        if self.ips.len() != 2 {
            return;
        }
        self.silent.clear();
        if self.hi.is_none() {
            return;
        }
        match self.stage {
            Stage::Search => {
                self.hi = None;
                self.expired_seen = 0;
                self.stale = 0;
            }
            Stage::Inbound => {
                self.search_failed = Some(format!(
                    "external addresses pooled arbitrarily ({}), found only after the search: its expiries may have come from sockets mapped to another address",
                    self.ips_text()
                ));
                self.finish(now);
            }
            Stage::Done => {}
        }
    }

    pub(super) fn ips_text(&self) -> String {
        let ips: Vec<String> = self.ips.iter().map(|ip| ip.to_string()).collect();
        format!("{} seen", ips.join(", "))
    }

    /// What the search found about address pooling, for the evidence ("" with one address).
    pub(super) fn pooling_note(&self) -> String {
        if !self.arbitrary() {
            return String::new();
        }
        format!(
            "; external addresses pooled arbitrarily ({}): each check used a socket mapped to its X's address ({} scouts, {} of them reused sockets, {} mapped elsewhere)",
            self.ips_text(),
            self.scouts,
            self.reused,
            self.discarded
        )
    }
}
