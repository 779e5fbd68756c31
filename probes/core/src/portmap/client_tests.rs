//! The NAT-PMP and PCP client machines on a virtual clock, against gateways written with the
//! codecs' server direction (parse the request, encode the answer): retransmission, giving up,
//! nonce and source checks, version fallback, ADDRESS_MISMATCH, epochs, and garbage.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::exchange::Retransmit;
use super::natpmp;
use super::pcp::{self, ResponseOp};
use super::{NatPmpClient, PcpClient, PortMappingService};

const GW: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const NONCE: [u8; 12] = [9; 12];

fn server() -> SocketAddr {
    SocketAddr::new(GW, natpmp::SERVER_PORT)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A NAT-PMP gateway's answer to `req` (external address EXT, ports mapped to themselves + 1000).
fn pmp_answer(req: &[u8], epoch: u32) -> Vec<u8> {
    match natpmp::Request::parse(req).expect("a NAT-PMP request") {
        natpmp::Request::ExternalAddress => natpmp::Response::ExternalAddress {
            result: natpmp::ResultCode::Success,
            epoch,
            address: EXT,
        },
        natpmp::Request::Map {
            protocol,
            internal_port,
            lifetime,
            ..
        } => natpmp::Response::Map {
            result: natpmp::ResultCode::Success,
            epoch,
            protocol,
            internal_port,
            external_port: if lifetime == 0 {
                0
            } else {
                internal_port + 1000
            },
            lifetime,
        },
    }
    .encode()
}

/// A PCP server's answer to `req`, with `result` (SUCCESS grants EXT and port + 1000).
fn pcp_answer(req: &[u8], result: pcp::ResultCode, epoch: u32) -> Vec<u8> {
    let req = pcp::Request::parse(req).expect("a PCP request");
    let op = match req.op {
        pcp::RequestOp::Announce => ResponseOp::Announce,
        pcp::RequestOp::Map(m) => ResponseOp::Map(
            m.answer(
                (result == pcp::ResultCode::Success && req.lifetime > 0)
                    .then(|| (m.internal_port + 1000, IpAddr::V4(EXT))),
            ),
        ),
    };
    pcp::Response {
        result,
        lifetime: req.lifetime,
        epoch,
        op,
        options: vec![],
    }
    .encode()
    .expect("encodes")
}

#[test]
fn natpmp_learns_the_external_address() {
    let t0 = Instant::now();
    let mut c = NatPmpClient::new(t0, GW, Retransmit::DISCOVERY, None);
    let tx = c.poll_transmit(t0).expect("sends at once");
    assert_eq!(tx.source, PortMappingService::NatPmp);
    assert_eq!(tx.destination, server());
    assert!(c.poll_transmit(t0).is_none(), "one copy at a time");
    c.handle_datagram(t0 + ms(2), server(), &pmp_answer(&tx.payload, 50));
    assert!(c.is_done());
    let o = c.outcome();
    assert_eq!(o.available, Some(true));
    assert_eq!(o.external_address, Some(IpAddr::V4(EXT)));
    assert_eq!((o.requests_sent, o.answers, o.epoch), (1, 1, Some(50)));
    assert_eq!(o.duration_ms, 2.0);
    assert!(o.problems.is_empty(), "{:?}", o.problems);
}

#[test]
fn a_gateway_that_never_answers_costs_the_budget_and_no_more() {
    let t0 = Instant::now();
    let mut pmp = NatPmpClient::new(t0, GW, Retransmit::DISCOVERY, Some((4000, 60)));
    let mut pcp = PcpClient::new(t0, GW, ME, NONCE, Retransmit::DISCOVERY, Some((4000, 60)));
    let mut now = t0;
    let mut sent = (Vec::new(), Vec::new());
    for _ in 0..100 {
        while pmp.poll_transmit(now).is_some() {
            sent.0.push(now.duration_since(t0).as_millis());
        }
        while pcp.poll_transmit(now).is_some() {
            sent.1.push(now.duration_since(t0).as_millis());
        }
        if pmp.is_done() && pcp.is_done() {
            break;
        }
        now = [pmp.poll_timeout(), pcp.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .expect("a timeout while not done");
        pmp.handle_timeout(now);
        pcp.handle_timeout(now);
    }
    assert!(pmp.is_done() && pcp.is_done());
    assert_eq!(now.duration_since(t0), ms(250), "bounded by the budget");
    assert_eq!(sent.0, [0, 60, 180], "RFC 6886 doubling, cut at 250 ms");
    assert_eq!(sent.1, [0, 60, 180], "no MAP after an unanswered ANNOUNCE");
    for o in [pmp.outcome(), pcp.outcome()] {
        assert_eq!(o.available, Some(false));
        assert_eq!(o.duration_ms, 250.0);
        assert!(
            o.problems.is_empty(),
            "silence is not a problem: {:?}",
            o.problems
        );
    }
}

#[test]
fn a_lost_request_is_retransmitted_and_the_late_answer_counts() {
    let t0 = Instant::now();
    let mut c = NatPmpClient::new(t0, GW, Retransmit::DISCOVERY, None);
    let first = c.poll_transmit(t0).expect("first");
    assert_eq!(c.poll_timeout(), Some(t0 + ms(60)));
    c.handle_timeout(t0 + ms(60));
    let again = c.poll_transmit(t0 + ms(60)).expect("resent at 60 ms");
    assert_eq!(first.payload, again.payload);
    c.handle_datagram(t0 + ms(61), server(), &pmp_answer(&again.payload, 9));
    assert_eq!(c.outcome().available, Some(true));
    assert_eq!(c.outcome().requests_sent, 2);
    // A duplicate answer to the first copy changes nothing.
    c.handle_datagram(t0 + ms(62), server(), &pmp_answer(&first.payload, 9));
    assert_eq!(c.outcome().answers, 1);
}

#[test]
fn an_unreachable_port_ends_at_once() {
    let t0 = Instant::now();
    let mut c = PcpClient::new(t0, GW, ME, NONCE, Retransmit::DISCOVERY, None);
    c.poll_transmit(t0).expect("announce");
    c.handle_unreachable(t0 + ms(1));
    assert!(c.is_done());
    assert_eq!(c.outcome().available, Some(false));
    assert_eq!(c.outcome().duration_ms, 1.0);
}

#[test]
fn natpmp_maps_and_deletes() {
    let t0 = Instant::now();
    let mut c = NatPmpClient::new(t0, GW, Retransmit::MAPPING, Some((4000, 120)));
    let ext = c.poll_transmit(t0).expect("external address first");
    c.handle_datagram(t0, server(), &pmp_answer(&ext.payload, 100));
    let map = c.poll_transmit(t0).expect("then the map request");
    assert!(matches!(
        natpmp::Request::parse(&map.payload),
        Ok(natpmp::Request::Map {
            internal_port: 4000,
            lifetime: 120,
            ..
        })
    ));
    c.handle_datagram(t0 + ms(1), server(), &pmp_answer(&map.payload, 100));
    let m = c.outcome().mapping.expect("granted");
    assert_eq!(m.external, SocketAddr::new(IpAddr::V4(EXT), 5000));
    assert_eq!((m.internal_port, m.lifetime_s), (4000, 120));
    assert!(c.is_done());
    c.delete(t0 + ms(2), Retransmit::MAPPING);
    let del = c.poll_transmit(t0 + ms(2)).expect("the deletion");
    assert!(natpmp::Request::parse(&del.payload).is_ok_and(|r| r.is_delete()));
    c.handle_datagram(t0 + ms(3), server(), &pmp_answer(&del.payload, 100));
    assert_eq!(c.outcome().deleted, Some(true));
    assert_eq!(c.outcome().mapping, None);
    assert!(c.is_done());
}

#[test]
fn natpmp_ignores_strangers_wrong_opcodes_and_garbage() {
    let t0 = Instant::now();
    let mut c = NatPmpClient::new(t0, GW, Retransmit::DISCOVERY, None);
    let tx = c.poll_transmit(t0).expect("sent");
    let good = pmp_answer(&tx.payload, 5);
    c.handle_datagram(t0, "10.0.0.9:5351".parse().unwrap(), &good);
    c.handle_datagram(t0, SocketAddr::new(GW, 5350), &good);
    let map_answer = natpmp::Response::Map {
        result: natpmp::ResultCode::Success,
        epoch: 5,
        protocol: super::MapProtocol::Udp,
        internal_port: 1,
        external_port: 1,
        lifetime: 1,
    };
    c.handle_datagram(t0, server(), &map_answer.encode());
    c.handle_datagram(t0, server(), &[0, 128, 0]);
    c.handle_datagram(t0, server(), &[]);
    assert_eq!(c.outcome().available, None, "still waiting");
    assert_eq!(c.outcome().problems.len(), 5, "{:?}", c.outcome().problems);
    c.handle_datagram(t0 + ms(1), server(), &good);
    assert_eq!(c.outcome().external_address, Some(IpAddr::V4(EXT)));
}

#[test]
fn natpmp_sees_a_gateway_restart_in_the_epoch() {
    let t0 = Instant::now();
    let mut c = NatPmpClient::new(t0, GW, Retransmit::MAPPING, Some((4000, 120)));
    let ext = c.poll_transmit(t0).expect("sent");
    c.handle_datagram(t0, server(), &pmp_answer(&ext.payload, 5000));
    let map = c.poll_transmit(t0).expect("sent");
    c.handle_datagram(t0 + ms(5), server(), &pmp_answer(&map.payload, 3));
    assert!(
        c.outcome().problems.iter().any(|p| p.contains("restarted")),
        "{:?}",
        c.outcome().problems
    );
}

#[test]
fn a_pcp_only_gateway_is_not_natpmp() {
    let t0 = Instant::now();
    let mut c = NatPmpClient::new(t0, GW, Retransmit::DISCOVERY, None);
    c.poll_transmit(t0).expect("sent");
    let pcp_error = pcp::Response {
        result: pcp::ResultCode::UnsuppVersion,
        lifetime: 0,
        epoch: 1,
        op: ResponseOp::Bare { opcode: 1 },
        options: vec![],
    }
    .encode()
    .expect("encodes");
    c.handle_datagram(t0, server(), &pcp_error);
    assert!(c.is_done());
    assert_eq!(c.outcome().available, Some(false));
}

#[test]
fn pcp_announces_maps_and_deletes_with_its_nonce() {
    let t0 = Instant::now();
    let mut c = PcpClient::new(t0, GW, ME, NONCE, Retransmit::MAPPING, Some((4000, 120)));
    let ann = c.poll_transmit(t0).expect("announce");
    let req = pcp::Request::parse(&ann.payload).expect("parses");
    assert_eq!(req.op, pcp::RequestOp::Announce);
    assert_eq!(req.client_address, ME);
    c.handle_datagram(
        t0,
        server(),
        &pcp_answer(&ann.payload, pcp::ResultCode::Success, 7),
    );
    assert_eq!(c.outcome().available, Some(true));
    let map = c.poll_transmit(t0).expect("map");
    let pcp::RequestOp::Map(m) = pcp::Request::parse(&map.payload).expect("parses").op else {
        panic!("not a MAP");
    };
    assert_eq!((m.nonce.0, m.protocol, m.internal_port), (NONCE, 17, 4000));
    c.handle_datagram(
        t0,
        server(),
        &pcp_answer(&map.payload, pcp::ResultCode::Success, 7),
    );
    let g = c.outcome().mapping.expect("granted");
    assert_eq!(g.external, SocketAddr::new(IpAddr::V4(EXT), 5000));
    assert_eq!(c.outcome().external_address, Some(IpAddr::V4(EXT)));
    c.delete(t0 + ms(1), Retransmit::MAPPING);
    let del = c.poll_transmit(t0 + ms(1)).expect("delete");
    let dreq = pcp::Request::parse(&del.payload).expect("parses");
    assert!(dreq.is_delete());
    assert!(matches!(dreq.op, pcp::RequestOp::Map(d) if d.nonce.0 == NONCE));
    c.handle_datagram(
        t0 + ms(2),
        server(),
        &pcp_answer(&del.payload, pcp::ResultCode::Success, 7),
    );
    assert_eq!(c.outcome().deleted, Some(true));
    assert!(c.is_done());
}

#[test]
fn a_map_answer_with_another_nonce_is_ignored() {
    let t0 = Instant::now();
    let mut c = PcpClient::new(t0, GW, ME, NONCE, Retransmit::MAPPING, Some((4000, 120)));
    let ann = c.poll_transmit(t0).expect("announce");
    c.handle_datagram(
        t0,
        server(),
        &pcp_answer(&ann.payload, pcp::ResultCode::Success, 7),
    );
    let map = c.poll_transmit(t0).expect("map");
    let mut forged = pcp::Request::parse(&map.payload).expect("parses");
    if let pcp::RequestOp::Map(m) = &mut forged.op {
        m.nonce = pcp::Nonce([0xee; 12]);
    }
    let forged = pcp_answer(
        &forged.encode().expect("encodes"),
        pcp::ResultCode::Success,
        7,
    );
    c.handle_datagram(t0, server(), &forged);
    assert_eq!(c.outcome().mapping, None, "not ours");
    assert!(!c.is_done(), "still waiting for ours");
    assert!(c.outcome().problems[0].contains("nonce"));
    c.handle_datagram(
        t0,
        server(),
        &pcp_answer(&map.payload, pcp::ResultCode::Success, 7),
    );
    assert!(c.outcome().mapping.is_some());
}

#[test]
fn address_mismatch_means_a_nat_in_between_and_no_map() {
    let t0 = Instant::now();
    let mut c = PcpClient::new(t0, GW, ME, NONCE, Retransmit::DISCOVERY, Some((4000, 30)));
    let ann = c.poll_transmit(t0).expect("announce");
    c.handle_datagram(
        t0,
        server(),
        &pcp_answer(&ann.payload, pcp::ResultCode::AddressMismatch, 7),
    );
    assert!(c.is_done(), "no MAP is attempted");
    assert!(c.poll_transmit(t0).is_none());
    let o = c.outcome();
    assert_eq!(o.available, Some(true));
    assert!(o.address_mismatch);
    assert!(o.problems[0].contains("ADDRESS_MISMATCH"));
}

#[test]
fn pcp_falls_back_when_the_gateway_speaks_natpmp_only() {
    let t0 = Instant::now();
    let mut c = PcpClient::new(t0, GW, ME, NONCE, Retransmit::DISCOVERY, None);
    c.poll_transmit(t0).expect("announce");
    // RFC 6886 §3.5: a NAT-PMP gateway answers version 2 with Unsupported Version.
    let answer = natpmp::Response::Error {
        opcode: 0,
        result: natpmp::ResultCode::UnsupportedVersion,
        epoch: 1,
    };
    c.handle_datagram(t0, server(), &answer.encode());
    assert!(c.is_done());
    assert_eq!(c.outcome().available, Some(false));
    assert!(c.outcome().problems[0].contains("NAT-PMP only"));
}

#[test]
fn refusals_are_problems_not_mappings() {
    let t0 = Instant::now();
    let mut c = PcpClient::new(t0, GW, ME, NONCE, Retransmit::MAPPING, Some((4000, 120)));
    let ann = c.poll_transmit(t0).expect("announce");
    c.handle_datagram(
        t0,
        server(),
        &pcp_answer(&ann.payload, pcp::ResultCode::Success, 7),
    );
    let map = c.poll_transmit(t0).expect("map");
    c.handle_datagram(
        t0,
        server(),
        &pcp_answer(&map.payload, pcp::ResultCode::NotAuthorized, 7),
    );
    assert!(c.is_done());
    assert_eq!(c.outcome().mapping, None);
    assert_eq!(c.outcome().available, Some(true));
    assert!(c.outcome().problems[0].contains("NOT_AUTHORIZED"));
}

/// Random and mutated datagrams, from the server and from elsewhere, at every step of both
/// machines: nothing panics, problems stay bounded, and the machines still end within budget.
#[test]
fn malformed_answers_never_panic() {
    let mut rng = StdRng::seed_from_u64(6886);
    for round in 0..300 {
        let t0 = Instant::now();
        let mut pmp = NatPmpClient::new(t0, GW, Retransmit::DISCOVERY, Some((4000, 60)));
        let mut pcp = PcpClient::new(t0, GW, ME, NONCE, Retransmit::DISCOVERY, Some((4000, 60)));
        let mut now = t0;
        for _ in 0..60 {
            let mut seeds: Vec<Vec<u8>> = Vec::new();
            if let Some(t) = pmp.poll_transmit(now) {
                seeds.push(pmp_answer(&t.payload, rng.gen()));
            }
            if let Some(t) = pcp.poll_transmit(now) {
                seeds.push(pcp_answer(
                    &t.payload,
                    pcp::ResultCode::from_code(rng.gen_range(0..14)),
                    rng.gen(),
                ));
            }
            for _ in 0..4 {
                let mut b: Vec<u8> = if seeds.is_empty() || rng.gen_bool(0.3) {
                    (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect()
                } else {
                    seeds[rng.gen_range(0..seeds.len())].clone()
                };
                for _ in 0..rng.gen_range(0..3) {
                    if !b.is_empty() {
                        let at = rng.gen_range(0..b.len());
                        b[at] = rng.gen();
                    }
                }
                if rng.gen_bool(0.2) {
                    b.truncate(rng.gen_range(0..=b.len()));
                }
                let from = if rng.gen_bool(0.9) {
                    server()
                } else {
                    "10.0.0.66:5351".parse().unwrap()
                };
                pmp.handle_datagram(now, from, &b);
                pcp.handle_datagram(now, from, &b);
            }
            now += ms(rng.gen_range(1..40));
            pmp.handle_timeout(now);
            pcp.handle_timeout(now);
            if pmp.is_done() && pcp.is_done() {
                break;
            }
        }
        // Each request has 250 ms: three requests at most, whatever was received.
        for o in [pmp.outcome(), pcp.outcome()] {
            assert!(
                o.problems.len() <= super::exchange::MAX_PROBLEMS,
                "round {round}"
            );
        }
        let late = now + ms(1000);
        pmp.handle_timeout(late);
        pcp.handle_timeout(late);
        let later = late + ms(1000);
        pmp.handle_timeout(later);
        pcp.handle_timeout(later);
        pcp.handle_timeout(later + ms(1000));
        assert!(pmp.is_done() && pcp.is_done(), "round {round} did not end");
    }
}
