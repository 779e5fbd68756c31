//! How the rendezvous table's cost per relayed packet grows with the table: fills it with N
//! registrations and N sessions, then times `relay_target` (what the server calls for every
//! relayed DATA message). Run with
//! `cargo run --release -p natscope-core --example rendezvous_table`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natscope_core::punch::codec::PeerInfo;
use natscope_core::punch::table::{Endpoint, RendezvousTable, TableConfig};
use natscope_core::punch::{SessionId, Transport};

fn endpoint(i: u32, port: u16) -> Endpoint {
    let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
    Endpoint {
        transport: Transport::Udp,
        local: "198.51.100.1:3490".parse().expect("addr"),
        remote: SocketAddr::new(ip.into(), port),
    }
}

fn main() {
    for n in [10u32, 1_000, 10_000] {
        let mut t = RendezvousTable::new(TableConfig {
            max_peers: 20_000,
            max_sessions: 20_000,
            ..TableConfig::default()
        });
        let t0 = Instant::now();
        for i in 0..n {
            let l = endpoint(i, 4000);
            t.register(t0, &format!("peer{i}"), l, vec![], None)
                .expect("room");
            let c = endpoint(i, 5000);
            let info = PeerInfo {
                reflexive: c.remote,
                candidates: vec![],
                port_delta: None,
                punch_window_ms: None,
                key: None,
            };
            t.introduce(t0, &format!("peer{i}"), c, info, SessionId(u64::from(i)))
                .expect("room");
        }
        let calls = 200_000u32;
        let start = Instant::now();
        for k in 0..calls {
            let i = k % n;
            let now = t0 + Duration::from_micros(u64::from(k));
            t.relay_target(now, SessionId(u64::from(i)), endpoint(i, 5000))
                .expect("live session");
        }
        let per = start.elapsed() / calls;
        println!(
            "{n:>6} registrations + {n:>6} sessions: {:>8.0} ns per relayed packet ({:.0} packets/s)",
            per.as_nanos(),
            1e9 / per.as_nanos().max(1) as f64
        );
    }
}
