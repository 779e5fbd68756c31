//! `natscope punch` on loopback (no root, no lab): the contract's exit codes and error lines,
//! the JSON document, and a listener that outlives its server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use natscope_probes::punch::connector::ConnectReport;
use natscope_tests::free_port;
use natscope_tests::punch::{
    finish, loopback_server as server, natscope_here as natscope, wait_for,
};

#[test]
fn bad_arguments_and_an_unreachable_server_exit_2_with_one_line() {
    let mut p = natscope(&["punch", "connect", "bad id", "--via", "127.0.0.1:9"]);
    assert_eq!(
        finish(&mut p, Duration::from_secs(5)),
        2,
        "{}",
        p.diagnostics()
    );
    assert!(
        p.stderr().contains("peer id `bad id` is invalid"),
        "{}",
        p.diagnostics()
    );

    let port = free_port(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let nobody = format!("127.0.0.1:{port}");
    for tcp in [false, true] {
        let mut args = vec!["punch", "connect", "bob", "--via", &nobody];
        if tcp {
            args.push("--tcp");
        }
        let t = Instant::now();
        let mut p = natscope(&args);
        assert_eq!(
            finish(&mut p, Duration::from_secs(10)),
            2,
            "{}",
            p.diagnostics()
        );
        assert!(t.elapsed() < Duration::from_secs(5), "bounded");
        let err = p.stderr();
        assert!(err.contains("is unreachable"), "{}", p.diagnostics());
        assert_eq!(err.lines().count(), 1, "{}", p.diagnostics());
    }
}

#[test]
fn loopback_sessions_report_the_contract_json() {
    let (_server, addr) = server();
    for tcp in [false, true] {
        let mut largs = vec![
            "punch", "listen", "--id", "bob", "--via", &addr, "--count", "2",
        ];
        if tcp {
            // Over TCP the listener prints its `natscope.punch-listen/v1` lines (checked below);
            // over UDP its text lines.
            largs.extend(["--tcp", "--json"]);
        }
        let mut l = natscope(&largs);
        wait_for(&mut l, |p| p.stdout().contains("registered"), "registered");
        for relay_first in [false, true] {
            let mut args = vec!["punch", "connect", "bob", "--via", &addr, "--json"];
            if tcp {
                args.push("--tcp");
            }
            if relay_first {
                args.extend_from_slice(&[
                    "--relay-first",
                    "--messages",
                    "200",
                    "--interval-ms",
                    "2",
                ]);
            }
            let mut c = natscope(&args);
            assert_eq!(
                finish(&mut c, Duration::from_secs(15)),
                0,
                "{}",
                c.diagnostics()
            );
            // Key by key on purpose: this is the documented contract (docs/punch.md), so the
            // field names are what is under test, not the library's type.
            let r = natscope_tests::schema::assert_valid_text(&c.stdout());
            let d = c.diagnostics();
            // And the typed report is the whole document: read as `ConnectReport` and written
            // again, the output comes back byte for byte (nothing the type drops or reorders).
            let typed: ConnectReport = serde_json::from_str(&c.stdout())
                .unwrap_or_else(|e| panic!("not a report: {e}\n{d}"));
            let again = serde_json::to_string_pretty(&typed).expect("json");
            assert_eq!(again, c.stdout().trim_end(), "{d}");
            assert_eq!(r["schema"], "natscope.punch/v1", "{d}");
            assert_eq!(r["transport"], if tcp { "tcp" } else { "udp" }, "{d}");
            assert_eq!(r["path"], "direct", "{d}");
            assert_eq!(r["messages_echoed"], r["messages_sent"], "{d}");
            assert_eq!(r["in_order"], true, "{d}");
            assert_eq!(r["switched_to_direct"], relay_first, "{d}");
            for k in ["time_to_first_byte_ms", "time_to_direct_ms", "rtt_ms"] {
                assert!(r[k].as_f64().is_some(), "{k}\n{d}");
            }
            for k in ["local", "peer"] {
                assert!(
                    r[k].as_str()
                        .is_some_and(|s| s.parse::<SocketAddr>().is_ok()),
                    "{k}\n{d}"
                );
            }
            assert!(r["attempts"].is_object(), "{d}");
        }
        assert_eq!(
            finish(&mut l, Duration::from_secs(10)),
            0,
            "{}",
            l.diagnostics()
        );
        if tcp {
            let events: Vec<String> = l
                .stdout()
                .lines()
                .map(|line| {
                    let e = natscope_tests::schema::assert_valid_text(line);
                    e["event"].as_str().unwrap_or_default().to_string()
                })
                .collect();
            let count = |e: &str| events.iter().filter(|x| *x == e).count();
            assert_eq!(events.first().map(String::as_str), Some("registered"));
            assert_eq!(
                (count("session-started"), count("session-ended")),
                (2, 2),
                "{}",
                l.diagnostics()
            );
        }
    }
}

#[test]
fn a_listener_whose_server_dies_exits_1_in_bounded_time() {
    let (mut server, addr) = server();
    let mut l = natscope(&["punch", "listen", "--id", "bob", "--via", &addr]);
    wait_for(&mut l, |p| p.stdout().contains("registered"), "registered");
    server.kill();
    let t = Instant::now();
    assert_eq!(
        finish(&mut l, Duration::from_secs(15)),
        1,
        "{}",
        l.diagnostics()
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        l.stderr().contains("stopped answering"),
        "{}",
        l.diagnostics()
    );
}
