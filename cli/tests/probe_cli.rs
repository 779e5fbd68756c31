//! `natscope probe` as a user runs it: the real binary against an in-process reflector on
//! 127.0.0.1 + 127.0.0.2, a silent socket, and bad input. Exact strings for what is deterministic
//! (errors, the JSON fields); the table's rows, header and summary checked against the JSON of
//! the same reflector. All traffic stays on 127.0.0.0/8; nothing resolves a name.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The suite's one validator (natscope-tests is Linux-only, so it is included, not depended on).
#[path = "../../tests/src/schema.rs"]
#[allow(dead_code)]
mod schema;

use natscope_probes::reflector::driver::{DriverConfig, RunningReflector};
use natscope_probes::reflector::ReflectorConfig;
use serde_json::Value;

const A1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const A2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

struct Run {
    command: String,
    out: Output,
    elapsed: Duration,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// The command and everything it printed, for assertion messages.
    fn report(&self) -> String {
        format!(
            "--- command: {}\n--- status: {} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.command,
            self.out.status,
            self.elapsed,
            self.stdout(),
            self.stderr()
        )
    }
    /// stdout as one JSON document, validated against the schema its tag names.
    fn json(&self) -> Value {
        let doc = serde_json::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("stdout is not one json document: {e}\n{}", self.report()));
        if let Err(e) = schema::validate(&doc) {
            panic!("{e}\n{}", self.report());
        }
        doc
    }
}

/// Runs `natscope probe ARGS` in a fresh temp dir (stdin closed, output captured).
fn probe(args: &[&str]) -> Run {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "natscope-cli-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_natscope");
    let start = Instant::now();
    let out = Command::new(bin)
        .arg("probe")
        .args(args)
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("natscope runs");
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        command: format!("natscope probe {}", args.join(" ")),
        out,
        elapsed: start.elapsed(),
    }
}

/// A two-address reflector on random free ports (retried when another process wins a port).
fn reflector() -> (RunningReflector, SocketAddr, SocketAddr) {
    for attempt in 0..50u32 {
        let seed = std::process::id()
            .wrapping_mul(7919)
            .wrapping_add(attempt * 104_729)
            .wrapping_add(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos()),
            );
        let p1 = 20_000 + (seed % 12_000) as u16;
        let p2 = if p1 == 31_999 { p1 - 1 } else { p1 + 1 };
        // SO_REUSEPORT would let the reflector share a port silently: check it is free first.
        let free = [A1, A2].iter().all(|&ip| {
            [p1, p2]
                .iter()
                .all(|&p| UdpSocket::bind((ip, p)).is_ok() && TcpListener::bind((ip, p)).is_ok())
        });
        if !free {
            continue;
        }
        let (primary, alternate) = (SocketAddr::new(A1, p1), SocketAddr::new(A2, p2));
        let mut cfg = DriverConfig::new(ReflectorConfig {
            primary,
            alternate: Some(alternate),
            partner: None,
        });
        cfg.workers = 1;
        match RunningReflector::start(cfg) {
            Ok(r) => return (r, primary, alternate),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("cannot start a reflector on {primary} + {alternate}: {e}"),
        }
    }
    panic!("no free port pair on 127.0.0.1 + 127.0.0.2 after 50 tries");
}

#[test]
fn json_against_a_loopback_reflector_is_open_internet() {
    let (refl, primary, alternate) = reflector();
    let run = probe(&[&primary.to_string(), "--json"]);
    let why = run.report();
    assert_eq!(run.code(), Some(0), "{why}");
    assert_eq!(
        run.stderr(),
        "",
        "no progress bar when stderr is not a terminal: {why}"
    );
    let doc = run.json();
    for (field, want) in [
        ("schema", Value::from("natscope.probe/v1")),
        ("nat_detected", Value::from(false)),
        ("udp_blocked", Value::from(false)),
        ("mapping", Value::from("endpoint-independent")),
        ("filtering", Value::from("endpoint-independent")),
        ("port_preservation", Value::from(true)),
        ("hairpinning", Value::Null),
        ("binding_lifetime_s", Value::Null),
        ("tcp_mapping", Value::from("unknown")),
        ("alg_detected", Value::from(false)),
        ("classic", Value::from("open-internet")),
    ] {
        assert_eq!(doc[field], want, "{field}: {why}");
    }
    assert_eq!(doc["port_allocation"]["pattern"], "preserving", "{why}");
    assert_eq!(doc["port_allocation"]["delta"], Value::Null, "{why}");
    assert_eq!(doc["server"]["address"], primary.to_string(), "{why}");
    assert_eq!(
        doc["server"]["other_address"],
        alternate.to_string(),
        "{why}"
    );
    assert_eq!(doc["server"]["problems"], serde_json::json!([]), "{why}");
    assert_eq!(doc["public_address"], doc["local_address"], "{why}");
    assert!(doc["duration_ms"].is_number(), "{why}");
    assert!(doc.get("mapping_comparison").is_none(), "{why}");
    let tests = doc["tests"].as_array().expect("tests array");
    let names: Vec<&str> = tests.iter().filter_map(|t| t["name"].as_str()).collect();
    for want in [
        "udp reachability",
        "mapping",
        "filtering",
        "hairpinning",
        "port allocation",
    ] {
        assert!(names.contains(&want), "{want} missing: {why}");
    }
    for t in tests {
        for f in [
            "name",
            "verdict",
            "evidence",
            "requests_sent",
            "duration_ms",
        ] {
            assert!(t.get(f).is_some(), "tests[].{f} missing in {t}");
        }
    }
    drop(refl);
}

#[test]
fn table_against_a_loopback_reflector_matches_its_json_and_the_reflector_count() {
    let (refl, primary, alternate) = reflector();
    let summary = probe(&[&primary.to_string(), "--json"]).json()["summary"]
        .as_str()
        .expect("summary")
        .to_string();
    let before = refl.counters().requests;
    let run = probe(&[&primary.to_string()]);
    let received = refl.counters().requests - before;
    let why = run.report();
    assert_eq!(run.code(), Some(0), "{why}");
    assert_eq!(run.stderr(), "", "{why}");
    let out = run.stdout();
    let lines: Vec<&str> = out.lines().collect();
    let head = format!("probe of {primary} (OTHER-ADDRESS {alternate}) from 127.0.0.1:");
    assert!(lines[0].starts_with(&head), "{why}");
    // The header's request count is what the reflector received.
    let sent: u64 = lines[0]
        .split(", ")
        .last()
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in the header: {why}"));
    assert_eq!(sent, received, "header vs reflector counter: {why}");
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        [
            "│", "test", "┆", "verdict", "┆", "evidence", "┆", "requests", "┆", "answers", "┆",
            "time", "│"
        ],
        "{why}"
    );
    for (test, verdict) in [
        ("udp reachability", "reachable"),
        ("mapping", "endpoint-independent"),
        ("filtering", "endpoint-independent"),
        ("port allocation", "preserving"),
        ("server checks", "ok"),
    ] {
        let row = lines
            .iter()
            .find(|l| l.starts_with(&format!("│ {test} ")))
            .unwrap_or_else(|| panic!("no {test} row: {why}"));
        let cells: Vec<&str> = row.split('┆').map(str::trim).collect();
        assert_eq!(cells[1], verdict, "{test}: {why}");
    }
    assert!(
        lines.contains(&summary.as_str()),
        "summary line {summary:?}: {why}"
    );
    assert!(out.contains("│ peer NAT "), "outlook table: {why}");
    assert!(!out.contains("server problem"), "{why}");
}

#[test]
fn silent_server_is_udp_blocked_with_exit_1() {
    // A bound socket that never answers: requests are delivered and ignored, no ICMP.
    let silent = UdpSocket::bind((A1, 0)).expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let run = probe(&[&addr, "--json", "--timeout", "20", "--retries", "2"]);
    let why = run.report();
    assert_eq!(run.code(), Some(1), "{why}");
    let doc = run.json();
    assert_eq!(doc["udp_blocked"], true, "{why}");
    assert_eq!(doc["classic"], "udp-blocked", "{why}");
    assert_eq!(doc["public_address"], Value::Null, "{why}");
    assert!(
        run.elapsed < Duration::from_secs(5),
        "--timeout 20 --retries 2 ends quickly: {why}"
    );

    let table = probe(&[&addr, "--timeout", "20", "--retries", "2"]);
    assert_eq!(table.code(), Some(1), "{}", table.report());
    assert!(
        table.stdout().ends_with(&format!(
            "hint: nothing answered {addr}; check that a stun server listens there on udp, else udp is blocked on this path\n"
        )),
        "{}",
        table.report()
    );
}

#[test]
fn several_servers_compare_one_socket_mapping() {
    let (_refl, primary, alternate) = reflector();
    let silent = UdpSocket::bind((A1, 0)).expect("bind");
    let dead = silent.local_addr().expect("addr");
    let args = [
        primary.to_string(),
        alternate.to_string(),
        dead.to_string(),
        "--json".into(),
        "--timeout".into(),
        "20".into(),
        "--retries".into(),
        "2".into(),
    ];
    let run = probe(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let why = run.report();
    assert_eq!(run.code(), Some(0), "the first server classifies: {why}");
    let doc = run.json();
    assert_eq!(doc["server"]["address"], primary.to_string(), "{why}");
    let c = &doc["mapping_comparison"];
    assert_eq!(
        c["varies_by_destination"], false,
        "loopback has no nat: {why}"
    );
    let local = c["local_address"].clone();
    assert_eq!(c["servers"][0]["mapped_address"], local, "{why}");
    assert_eq!(c["servers"][1]["mapped_address"], local, "{why}");
    assert_eq!(c["servers"][2]["mapped_address"], Value::Null, "{why}");
    assert_eq!(
        c["servers"][2]["problem"], "no answer after 3 transmissions",
        "{why}"
    );
    let row = doc["tests"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "mapping comparison"))
        .unwrap_or_else(|| panic!("no comparison row: {why}"));
    assert_eq!(row["verdict"], "same for every destination", "{why}");
    assert_eq!(
        row["requests_sent"], 5,
        "one each to the two live servers, three to the silent one: {why}"
    );
}

/// Usage errors: exit 2, nothing on stdout, exactly one line on stderr.
#[test]
fn errors_are_one_line_with_exit_2() {
    let cases: [(&[&str], &str); 6] = [
        (&["127.0.0.1"], "natscope: error: \"127.0.0.1\" has no port: give HOST:PORT (the standard stun port is 3478)"),
        (&["127.0.0.1:70000", "--json"], "natscope: error: \"127.0.0.1:70000\": \"70000\" is not a port number (1-65535)"),
        (&["300.1.2.3:3478"], "natscope: error: \"300.1.2.3:3478\" is not a valid ip address and port"),
        (&["--tcp", "127.0.0.1"], "natscope: error: \"127.0.0.1\" has no port: give HOST:PORT (the standard stun port is 3478)"),
        (&["--lifetime", "127.0.0.1"], "natscope: error: \"127.0.0.1\" has no port: give HOST:PORT (the standard stun port is 3478)"),
        (&[], "natscope: error: no server given: name one as HOST:PORT (e.g. `natscope reflect` on a host you run), or pass --public to probe stun.l.google.com:19302 and stun.cloudflare.com:3478 (public servers: they see your address)"),
    ];
    for (args, want) in cases {
        let run = probe(args);
        let why = run.report();
        assert_eq!(run.code(), Some(2), "{why}");
        assert_eq!(run.stdout(), "", "{why}");
        assert_eq!(run.stderr(), format!("{want}\n"), "{why}");
    }
}

#[test]
fn timing_flags_are_range_checked() {
    for args in [
        ["127.0.0.1:3478", "--timeout", "0"],
        ["127.0.0.1:3478", "--timeout", "60001"],
        ["127.0.0.1:3478", "--retries", "51"],
        ["127.0.0.1:3478", "--retries", "-1"],
    ] {
        let run = probe(&args);
        assert_eq!(run.code(), Some(2), "{}", run.report());
        assert_eq!(run.stdout(), "", "{}", run.report());
    }
}

#[test]
fn lifetime_on_loopback_is_not_applicable() {
    let (refl, primary, _) = reflector();
    let run = probe(&[&primary.to_string(), "--json", "--lifetime"]);
    let why = run.report();
    assert_eq!(run.code(), Some(0), "{why}");
    assert_eq!(
        run.stderr(),
        "",
        "no progress bar when stderr is not a terminal: {why}"
    );
    let doc = run.json();
    assert_eq!(doc["binding_lifetime_s"], Value::Null, "{why}");
    let tests = doc["tests"].as_array().expect("tests array");
    let row = |name: &str| {
        tests
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no {name} row: {why}"))
    };
    assert_eq!(
        row("binding lifetime")["verdict"],
        "not applicable",
        "{why}"
    );
    assert!(
        row("binding lifetime")["evidence"]
            .as_str()
            .is_some_and(|e| e.starts_with("no nat: no binding to expire")),
        "{why}"
    );
    assert_eq!(row("inbound refresh")["verdict"], "not applicable", "{why}");
    assert!(
        run.elapsed < Duration::from_secs(10),
        "no waiting without a nat: {why}"
    );
    drop(refl);
}

#[test]
fn lifetime_max_is_range_checked_and_needs_lifetime() {
    for args in [
        ["127.0.0.1:3478", "--lifetime-max", "60"],
        ["127.0.0.1:3478", "--lifetime", "--lifetime-max=1"],
        ["127.0.0.1:3478", "--lifetime", "--lifetime-max=3601"],
    ] {
        let run = probe(&args);
        assert_eq!(run.code(), Some(2), "{}", run.report());
        assert_eq!(run.stdout(), "", "{}", run.report());
    }
}

#[test]
fn pace_and_no_pace_conflict() {
    for args in [
        ["127.0.0.1:3478", "--pace", "--no-pace"],
        ["--no-pace", "127.0.0.1:3478", "--pace"],
    ] {
        let run = probe(&args);
        let why = run.report();
        assert_eq!(run.code(), Some(2), "{why}");
        assert_eq!(run.stdout(), "", "{why}");
        assert!(
            run.stderr()
                .starts_with("error: the argument '--pace' cannot be used with '--no-pace'")
                || run
                    .stderr()
                    .starts_with("error: the argument '--no-pace' cannot be used with '--pace'"),
            "{why}"
        );
    }
}

/// Loopback is a server the user runs: not paced by default, and the table says so in one line.
#[test]
fn loopback_is_not_paced_by_default() {
    let (_refl, primary, _) = reflector();
    let run = probe(&[&primary.to_string(), "--json"]);
    let why = run.report();
    assert_eq!(run.code(), Some(0), "{why}");
    let doc = run.json();
    assert_eq!(
        doc["pacing"],
        serde_json::json!({
            "enabled": false,
            "max_new_per_second": null,
            "reason": "server 127.0.0.1 is on loopback (your own or a lab server): not paced; --pace to pace"
        }),
        "{why}"
    );
    let table = probe(&[&primary.to_string()]);
    let lines: Vec<String> = table
        .stdout()
        .lines()
        .filter(|l| l.starts_with("pacing: "))
        .map(String::from)
        .collect();
    assert_eq!(
        lines,
        ["pacing: server 127.0.0.1 is on loopback (your own or a lab server): not paced; --pace to pace"],
        "{}",
        table.report()
    );
}

/// `--pace` on loopback: 13 transactions (no NAT, so no hairpin test) cannot all start within one
/// second, so the run takes at least a second, and the reflector still sees every request.
#[test]
fn pace_limits_new_transactions_on_a_real_socket() {
    let (refl, primary, _) = reflector();
    let before = refl.counters().requests;
    let run = probe(&[&primary.to_string(), "--json", "--pace"]);
    let received = refl.counters().requests - before;
    let why = run.report();
    assert_eq!(run.code(), Some(0), "{why}");
    let doc = run.json();
    assert_eq!(doc["pacing"]["enabled"], true, "{why}");
    assert_eq!(doc["pacing"]["max_new_per_second"], 10, "{why}");
    assert_eq!(
        doc["pacing"]["reason"], "--pace: at most 10 new transactions per second (RFC 5780 §5)",
        "{why}"
    );
    assert_eq!(doc["classic"], "open-internet", "{why}");
    let sent = doc["requests_sent"].as_u64().expect("requests_sent");
    assert_eq!(sent, received, "{why}");
    assert!(sent > 10, "more than one second's worth: {why}");
    let ms = doc["duration_ms"].as_f64().expect("duration_ms");
    assert!(
        ms >= 1000.0,
        "the 11th transaction waits for the window: {why}"
    );
    assert!(ms < 5000.0, "{why}");
}
