//! `natscope reflect` serving RFC 5780 on both families at once (issue 13, must-show 4): inside a
//! network namespace this test creates (loopback only: two IPv6 documentation addresses added to
//! `lo` with `nodad`, and 127.0.0.1/127.0.0.2), one process with an IPv4 and an IPv6 primary and
//! alternate answers every request of every family from the address RFC 5780 §6 says —
//! the other IP and/or port *of the same family* for CHANGE-REQUEST — with RESPONSE-ORIGIN equal
//! to the real source, OTHER-ADDRESS the same family's alternate, and XOR-MAPPED-ADDRESS the
//! client.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use natscope_probes::client::{BindingResponse, RequestOptions};
use natscope_probes::stun::{ChangeRequest, TransactionId};
use natscope_tests::{
    binding_request, expected_source, natscope_bin, require_root, require_tool,
    wait_until_answering, ChildProcess,
};

use natscope_tests::lab::DualLoopbackNs as TestNs;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One request from `client` to `to` with `change`; the answer and where it really came from.
fn ask(client: &UdpSocket, to: SocketAddr, change: ChangeRequest) -> BindingResponse {
    let tid = TransactionId::random();
    let req = binding_request(
        &tid,
        &RequestOptions {
            change,
            ..Default::default()
        },
    );
    let mut buf = [0u8; 2048];
    for _ in 0..5 {
        client.send_to(&req, to).expect("send");
        if let Ok((n, from)) = client.recv_from(&mut buf) {
            if let Ok(r) = BindingResponse::parse(&buf[..n], &tid, Some(from)) {
                return r;
            }
        }
    }
    panic!("no answer from {to} to {change:?}");
}

/// Every address × CHANGE-REQUEST of every family, checked against RFC 5780 §6; how many.
fn check_all(families: [(SocketAddr, SocketAddr); 2]) -> usize {
    let mut checked = 0;
    for (primary, alternate) in families {
        let ip = primary.ip();
        wait_until_answering(primary, ip, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        let client = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind client");
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let me = client.local_addr().unwrap();
        let servers = [
            primary,
            SocketAddr::new(primary.ip(), alternate.port()),
            SocketAddr::new(alternate.ip(), primary.port()),
            alternate,
        ];
        for to in servers {
            for change in [
                ChangeRequest::NONE,
                ChangeRequest::IP,
                ChangeRequest::PORT,
                ChangeRequest::BOTH,
            ] {
                let r = ask(&client, to, change);
                let want =
                    expected_source(primary, alternate, to, change.change_ip, change.change_port);
                let ctx = format!("{to} {change:?}");
                assert_eq!(r.source, Some(want), "real source, {ctx}");
                assert_eq!(r.response_origin, Some(want), "RESPONSE-ORIGIN, {ctx}");
                assert_eq!(r.xor_mapped, Some(me), "XOR-MAPPED-ADDRESS, {ctx}");
                // RFC 5780 §6: OTHER-ADDRESS is the other IP and port of the family the
                // request came over.
                let other = SocketAddr::new(
                    if to.ip() == primary.ip() {
                        alternate.ip()
                    } else {
                        primary.ip()
                    },
                    if to.port() == primary.port() {
                        alternate.port()
                    } else {
                        primary.port()
                    },
                );
                assert_eq!(r.other_address, Some(other), "OTHER-ADDRESS, {ctx}");
                assert_eq!(
                    r.other_address.map(|o| o.is_ipv4()),
                    Some(matches!(ip, IpAddr::V4(_))),
                    "same family, {ctx}"
                );
                checked += 1;
            }
        }
    }
    checked
}

#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn reflect_answers_rfc5780_on_both_families_from_the_right_addresses() {
    require_root();
    require_tool("ip", "iproute2");
    let bin = natscope_bin();
    let t = TestNs::new("refl");
    let families = [
        (a("127.0.0.1:3478"), a("127.0.0.2:3479")),
        (a("[2001:db8:7::1]:3478"), a("[2001:db8:7::2]:3479")),
    ];
    let mut args: Vec<String> = vec!["reflect".into(), "--no-tcp".into()];
    for (p, alt) in families {
        args.extend([
            "--primary".into(),
            p.to_string(),
            "--alternate".into(),
            alt.to_string(),
        ]);
    }
    let child = t
        .ns()
        .run(move || {
            let mut cmd = Command::new(bin);
            cmd.args(&args);
            ChildProcess::spawn(cmd)
        })
        .expect("namespace worker")
        .expect("natscope reflect starts");
    let checked = t
        .ns()
        .run(move || check_all(families))
        .expect("namespace worker");
    drop(child);
    assert_eq!(checked, 2 * 4 * 4);
}

/// The cooperating two-host mode on both families (RFC 5780 §2.3): two `natscope reflect
/// --cooperate` processes, one per "host" IP of each family, each serving only its own IPs and
/// forwarding change-IP requests over its family's link; to a client the pair is one server per
/// family, every answer from the right address.
#[test]
#[ignore = "needs root and network namespaces; run with --include-ignored (scripts/test does)"]
fn cooperating_pair_answers_rfc5780_on_both_families() {
    require_root();
    require_tool("ip", "iproute2");
    let t = TestNs::new("coop");
    let families = [
        (a("127.0.0.1:3478"), a("127.0.0.2:3479")),
        (a("[2001:db8:7::1]:3478"), a("[2001:db8:7::2]:3479")),
    ];
    let mut children = Vec::new();
    for host in 0..2 {
        let mut args: Vec<String> = vec!["reflect".into(), "--no-tcp".into(), "--cooperate".into()];
        for (p, alt) in families {
            let (mine, partner) = if host == 0 {
                (p.ip(), alt.ip())
            } else {
                (alt.ip(), p.ip())
            };
            args.extend([
                "--primary".into(),
                SocketAddr::new(mine, p.port()).to_string(),
                "--alternate".into(),
                SocketAddr::new(partner, alt.port()).to_string(),
            ]);
        }
        let bin = natscope_bin();
        children.push(
            t.ns()
                .run(move || {
                    let mut cmd = Command::new(bin);
                    cmd.args(&args)
                        .env("NATSCOPE_LINK_SECRET", "v6pr-test-secret-0123456789");
                    ChildProcess::spawn(cmd)
                })
                .expect("namespace worker")
                .expect("natscope reflect starts"),
        );
    }
    let checked = t
        .ns()
        .run(move || {
            for (p, alt) in families {
                // Both hosts answer before the link is relied on.
                for to in [p, SocketAddr::new(alt.ip(), p.port())] {
                    wait_until_answering(to, to.ip(), Duration::from_secs(10))
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
            check_all(families)
        })
        .expect("namespace worker");
    drop(children);
    assert_eq!(checked, 2 * 4 * 4);
}
