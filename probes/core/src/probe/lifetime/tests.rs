//! The machine's unit tests against the reflector's real answers: what each answer and silence
//! means for a check, with one external address and with arbitrary pooling.

use super::*;
use crate::reflector::{Action, Reflector, ReflectorConfig, Transport, MAX_RESPONSE};

const SERVER: &str = "198.51.100.1:3478";
const X_LOCAL: &str = "10.0.0.2:40000";
const PP: &str = "203.0.113.1:40000";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The reflector's answer to `req` sent from external address `from`.
fn answer(req: &[u8], from: SocketAddr) -> Vec<u8> {
    let core = Reflector::new(ReflectorConfig {
        primary: addr(SERVER),
        alternate: Some(addr("198.51.100.2:3479")),
        partner: None,
    });
    let mut out = [0u8; MAX_RESPONSE];
    let (action, _) = core.answer(Transport::Udp, from, addr(SERVER), req, &mut out, 0);
    let Action::Send { len, .. } = action else {
        panic!("no answer: {action:?}");
    };
    out[..len].to_vec()
}

/// X socket `i`'s local address and its binding (external port 40000 + i).
fn x_local(i: u16) -> SocketAddr {
    SocketAddr::new(addr(X_LOCAL).ip(), 40000 + i)
}
fn x_mapped(i: u16) -> SocketAddr {
    SocketAddr::new(addr(PP).ip(), 40000 + i)
}

/// A probe whose refreshes were answered (X socket `i` has binding `x_mapped(i)`) and whose
/// first check is out, sent from socket Y; returns the probe, the check, the socket it checks
/// and the time.
fn at_first_check() -> (LifetimeProbe, Transmit, SocketId, Instant) {
    let (p, check, now) = at_first_request(x_mapped);
    let port = response_port(&check.payload).expect("RESPONSE-PORT");
    (p, check, SocketId(port - 40000), now)
}

/// X socket `i` on one of two external addresses (arbitrary pooling).
fn x_mapped_two(i: u16) -> SocketAddr {
    let ip = if i % 2 == 0 {
        "203.0.113.1"
    } else {
        "203.0.113.2"
    };
    SocketAddr::new(ip.parse().unwrap(), 40000 + i)
}

/// As [`at_first_check`] with X socket `i` mapped to `mapped(i)`: the first request from a
/// fresh socket (a check, or a scout) and the time.
fn at_first_request(mapped: fn(u16) -> SocketAddr) -> (LifetimeProbe, Transmit, Instant) {
    let t0 = Instant::now();
    let mut cfg = LifetimeConfig::new(addr(SERVER));
    cfg.seed = Some(1);
    let mut p = LifetimeProbe::new(t0, cfg);
    let ms10 = Duration::from_millis(10);
    let first: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit(t0)).collect();
    assert_eq!(
        first.len(),
        CALIBRATION,
        "a few X sockets until the first answer"
    );
    let answer_all = |p: &mut LifetimeProbe, sent: &[Transmit], now: Instant| {
        for t in sent {
            assert_eq!(t.destination, addr(SERVER));
            assert!((t.source.0 as usize) < POOL);
            p.socket_bound(t.source, x_local(t.source.0));
        }
        for t in sent {
            let bytes = answer(&t.payload, mapped(t.source.0));
            p.handle_datagram(now, t.source, addr(SERVER), &bytes);
        }
    };
    let mut now = t0 + ms10;
    answer_all(&mut p, &first, now);
    let rest: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit(now)).collect();
    assert_eq!(
        rest.len(),
        POOL - CALIBRATION,
        "the others start with the first answer"
    );
    let started = now;
    now += ms10;
    answer_all(&mut p, &rest, now);
    assert!(p.poll_transmit(now).is_none(), "X stays idle");
    let wake = p.poll_timeout().expect("the first check is scheduled");
    // The youngest clocks take the shortest grid points.
    assert_eq!(
        wake,
        started + Duration::from_secs(1),
        "T after X's last packet"
    );
    p.handle_timeout(wake);
    let check = p.poll_transmit(wake).expect("the check");
    assert!(check.source.0 as usize >= POOL, "checks use fresh sockets");
    assert!(p.poll_transmit(wake).is_none(), "one grid point is due");
    p.socket_bound(check.source, addr("10.0.0.2:41000"));
    (p, check, wake)
}

fn response_port(payload: &[u8]) -> Option<u16> {
    let msg = Message::parse(payload).unwrap();
    let port = msg
        .attributes()
        .find(|a| a.typ == crate::stun::attr_type::RESPONSE_PORT)
        .map(|a| crate::stun::attr::decode_response_port(a.value).unwrap());
    port
}

#[test]
fn the_check_asks_for_xs_external_port() {
    let (p, check, x, _) = at_first_check();
    assert!((x.0 as usize) < POOL);
    assert_eq!(
        response_port(&check.payload),
        p.clocks[x.0 as usize].mapped.map(|m| m.port())
    );
}

#[test]
fn an_answer_on_y_at_xs_old_port_means_expired() {
    let (mut p, check, x, now) = at_first_check();
    // The NAT gave the freed port to Y: the answer aimed at X's port lands on Y.
    let bytes = answer(&check.payload, x_mapped(x.0));
    p.handle_datagram(
        now + Duration::from_millis(10),
        check.source,
        addr(SERVER),
        &bytes,
    );
    let r = p.report();
    assert_eq!(
        r.upper_s,
        Some(1.01),
        "idle from X's refresh to the answer on Y"
    );
    assert_eq!(r.lower_s, None);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    // The search continues below the first wait: the clocks, all past it, start again.
    let next = p.poll_transmit(now + Duration::from_millis(10)).unwrap();
    assert!((next.source.0 as usize) < POOL);
    assert_eq!(response_port(&next.payload), None, "a refresh");
}

#[test]
fn a_server_ignoring_response_port_is_a_server_problem() {
    let (mut p, check, _, now) = at_first_check();
    // Y's own mapping is another port; the answer still came back to Y.
    let bytes = answer(&check.payload, addr("203.0.113.1:41000"));
    p.handle_datagram(
        now + Duration::from_millis(10),
        check.source,
        addr(SERVER),
        &bytes,
    );
    assert!(p.is_done());
    let r = p.report();
    assert_eq!(r.binding_lifetime_s, None);
    assert_eq!(r.tests[0].verdict, "unknown");
    assert!(
        r.problems[0].starts_with("the server ignored RESPONSE-PORT"),
        "{:?}",
        r.problems
    );
}

#[test]
fn an_answer_on_x_from_elsewhere_is_not_evidence() {
    let (mut p, check, x, now) = at_first_check();
    let bytes = answer(&check.payload, addr("203.0.113.1:41000"));
    p.handle_datagram(now, x, addr("198.51.100.9:3478"), &bytes);
    assert!(!p.is_done());
    assert_eq!(p.report().lower_s, None);
    assert_eq!(p.problems.len(), 1);
}

#[test]
fn an_answer_on_another_x_is_not_evidence() {
    // The port changed hands: the answer aimed at X's old port reached another X socket.
    let (mut p, check, x, now) = at_first_check();
    let other = SocketId((x.0 + 1) % POOL as u16);
    let bytes = answer(&check.payload, x_mapped(x.0));
    p.handle_datagram(now + Duration::from_millis(10), other, addr(SERVER), &bytes);
    assert!(!p.is_done());
    let r = p.report();
    assert_eq!((r.lower_s, r.upper_s), (None, None));
    assert!(p.problems.is_empty(), "{:?}", p.problems);
}

#[test]
fn with_a_second_address_only_a_socket_on_xs_address_checks_it() {
    let (mut p, scout, mut now) = at_first_request(x_mapped_two);
    assert!(p.arbitrary());
    assert_eq!(response_port(&scout.payload), None, "a scout first");
    let c = p.txs.last().unwrap().clock;
    let xm = x_mapped_two(c as u16);
    let other = if xm.ip() == addr(PP).ip() {
        "203.0.113.2"
    } else {
        "203.0.113.1"
    };
    // Mapped elsewhere: discarded, another fresh socket tried.
    now += Duration::from_millis(10);
    let bytes = answer(
        &scout.payload,
        SocketAddr::new(other.parse().unwrap(), 41000),
    );
    p.handle_datagram(now, scout.source, addr(SERVER), &bytes);
    let scout2 = p.poll_transmit(now).expect("another scout");
    assert_eq!(response_port(&scout2.payload), None);
    assert!(scout2.source.0 > scout.source.0, "a fresh socket");
    // Mapped to X's address: the check goes out from that very socket.
    now += Duration::from_millis(10);
    let bytes = answer(&scout2.payload, SocketAddr::new(xm.ip(), 41001));
    p.handle_datagram(now, scout2.source, addr(SERVER), &bytes);
    let check = p.poll_transmit(now).expect("the check");
    assert_eq!(check.source, scout2.source);
    assert_eq!(response_port(&check.payload), Some(xm.port()));
    now += Duration::from_millis(10);
    let bytes = answer(&check.payload, SocketAddr::new(xm.ip(), 41001));
    p.handle_datagram(now, SocketId(c as u16), addr(SERVER), &bytes);
    let r = p.report();
    assert!(r.lower_s.is_some_and(|l| l > 1.0), "{r:?}");
    assert!(
        r.tests[0]
            .evidence
            .contains("pooled arbitrarily (203.0.113.1, 203.0.113.2 seen)"),
        "{}",
        r.tests[0].evidence
    );
    assert!(p.problems.is_empty(), "{:?}", p.problems);
}

#[test]
fn no_socket_on_xs_address_ends_unknown_with_the_reason() {
    // Every scout lands on a third address: no check can be made, none may conclude.
    let (mut p, first, mut now) = at_first_request(x_mapped_two);
    let mut out = vec![first];
    for _ in 0..10_000 {
        for t in out.drain(..) {
            let bytes = if (t.source.0 as usize) < POOL {
                answer(&t.payload, x_mapped_two(t.source.0))
            } else {
                assert_eq!(response_port(&t.payload), None, "never a check");
                p.socket_bound(t.source, SocketAddr::new(addr(X_LOCAL).ip(), t.source.0));
                answer(
                    &t.payload,
                    SocketAddr::new("203.0.113.3".parse().unwrap(), t.source.0),
                )
            };
            p.handle_datagram(now, t.source, addr(SERVER), &bytes);
        }
        if p.is_done() {
            break;
        }
        out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
        if out.is_empty() {
            now = p.poll_timeout().expect("a deadline").max(now);
            p.handle_timeout(now);
            out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
        }
    }
    assert!(p.is_done());
    let r = p.report();
    assert_eq!((r.lower_s, r.upper_s), (None, None), "{r:?}");
    assert_eq!(r.tests[0].verdict, "unknown");
    assert!(
        r.tests[0].evidence.starts_with(
            "external addresses pooled arbitrarily (203.0.113.1, 203.0.113.2, 203.0.113.3 seen): 8 checks in a row found no socket mapped to their X's address in 24 tries"
        ),
        "{}",
        r.tests[0].evidence
    );
}

#[test]
fn expiries_counted_before_a_second_address_is_seen_are_dropped() {
    // Unanswered checks from sockets that, unknown to the probe, left from another address.
    let (mut p, check, _, mut now) = at_first_check();
    let mut out = vec![check];
    let mut refreshes = Vec::new();
    for _ in 0..10_000 {
        if p.report().upper_s.is_some() {
            break;
        }
        for t in out.drain(..) {
            if (t.source.0 as usize) < POOL {
                refreshes.push(t);
            }
        }
        for t in refreshes.drain(..) {
            let bytes = answer(&t.payload, x_mapped(t.source.0));
            p.handle_datagram(now, t.source, addr(SERVER), &bytes);
        }
        out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
        if out.is_empty() {
            now = p.poll_timeout().expect("a deadline").max(now);
            p.handle_timeout(now);
            out.extend(std::iter::from_fn(|| p.poll_transmit(now)));
        }
    }
    assert!(p.report().upper_s.is_some(), "an expiry was counted");
    assert!(!p.arbitrary());
    // The next refresh answer shows a second address: that expiry no longer stands.
    let refresh = std::iter::from_fn(|| p.poll_transmit(now))
        .chain(out)
        .find(|t| (t.source.0 as usize) < POOL)
        .expect("clocks past the upper bound are refreshed");
    let other = SocketAddr::new("203.0.113.2".parse().unwrap(), 40000 + refresh.source.0);
    let bytes = answer(&refresh.payload, other);
    p.handle_datagram(now, refresh.source, addr(SERVER), &bytes);
    assert!(p.arbitrary());
    assert!(!p.is_done());
    assert_eq!(p.report().upper_s, None);
}

#[test]
fn an_answer_on_y_at_xs_port_of_another_address_is_no_expiry() {
    // Arbitrary pooling unseen so far: Y left from another address, where it holds Pp.
    let (mut p, check, x, now) = at_first_check();
    let ym = SocketAddr::new("203.0.113.2".parse().unwrap(), x_mapped(x.0).port());
    let bytes = answer(&check.payload, ym);
    p.handle_datagram(
        now + Duration::from_millis(10),
        check.source,
        addr(SERVER),
        &bytes,
    );
    assert!(!p.is_done());
    let r = p.report();
    assert_eq!((r.lower_s, r.upper_s), (None, None), "no verdict");
    assert!(
        p.problems.is_empty(),
        "not a server problem: {:?}",
        p.problems
    );
    assert!(p.arbitrary(), "the second address was seen");
}

#[test]
fn an_answer_on_a_third_socket_from_another_address_voids_the_check() {
    let (mut p, check, x, now) = at_first_check();
    let other = SocketId((x.0 + 1) % POOL as u16);
    let bytes = answer(&check.payload, addr("203.0.113.2:41000"));
    p.handle_datagram(now + Duration::from_millis(10), other, addr(SERVER), &bytes);
    assert!(!p.is_done());
    assert!(p.arbitrary());
    assert_ne!(p.clocks[x.0 as usize].state, ClockState::Checking);
    let r = p.report();
    assert_eq!((r.lower_s, r.upper_s), (None, None));
    // Its silence will not be counted either: the transaction is over.
    assert!(p
        .txs
        .iter()
        .all(|t| t.kind != Kind::Check || t.state != TxState::Pending));
}
