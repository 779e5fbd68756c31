//! Two single-IP reflectors cooperating as one RFC 5780 server (§2.3), as two `natscope reflect`
//! processes: host A serves 127.0.0.1 × {P1, P2}, host B serves 127.0.0.2 × {P1, P2}, and a request
//! whose answer must leave from the other IP is forwarded over the authenticated link (UDP port L
//! on each IP, shared secret in NATSCOPE_LINK_SECRET). With different secrets the partner refuses
//! the forwards, so change-IP requests go unanswered while everything local still works.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use natscope_probes::client::{transact_udp, BindingResponse, RequestOptions};
use natscope_probes::stun::{ChangeRequest, TransactionId};
use natscope_tests::{
    binding_request, exchange_raw, free_ports, natscope_bin, require_tool, run_tool, sa,
    udp_client, ChildProcess, A1, A2, A3, FAST_RTO, NEGATIVE_RTO,
};

const SECRET_ENV: &str = "NATSCOPE_LINK_SECRET";

/// The pair of processes and the ports they share.
struct Pair {
    a: ChildProcess,
    b: ChildProcess,
    p1: u16,
    p2: u16,
}

impl Pair {
    fn diagnostics(&self) -> String {
        format!(
            "host A:\n{}\nhost B:\n{}",
            self.a.diagnostics(),
            self.b.diagnostics()
        )
    }
}

fn reflect(
    primary: SocketAddr,
    alternate: SocketAddr,
    link_port: u16,
    secret: &str,
) -> ChildProcess {
    let mut cmd = Command::new(natscope_bin());
    cmd.arg("reflect")
        .args(["--primary", &primary.to_string()])
        .args(["--alternate", &alternate.to_string()])
        .arg("--cooperate")
        .args(["--link-port", &link_port.to_string()])
        .args(["--workers", "2"])
        .env(SECRET_ENV, secret);
    ChildProcess::spawn(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts host A (127.0.0.1) and host B (127.0.0.2) and waits until each answers on both of its
/// addresses. Retried with fresh ports if either fails to start.
fn start_pair(secret_a: &str, secret_b: &str) -> Pair {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let [p1, p2, link] = free_ports::<3>(&[A1, A2]);
        let mut a = reflect(sa(A1, p1), sa(A2, p2), link, secret_a);
        let mut b = reflect(sa(A2, p1), sa(A1, p2), link, secret_b);
        let ready_a = a.wait_until_answering(&[sa(A1, p1), sa(A1, p2)], A3, Duration::from_secs(5));
        let ready_b = b.wait_until_answering(&[sa(A2, p1), sa(A2, p2)], A3, Duration::from_secs(5));
        match (ready_a, ready_b) {
            (Ok(()), Ok(())) => return Pair { a, b, p1, p2 },
            (ra, rb) => {
                a.kill();
                b.kill();
                failures.push(format!(
                    "A: {ra:?}\n{}\nB: {rb:?}\n{}",
                    a.diagnostics(),
                    b.diagnostics()
                ));
            }
        }
    }
    panic!(
        "cooperating reflectors did not start:\n{}",
        failures.join("\n")
    );
}

fn change(change: ChangeRequest) -> RequestOptions {
    RequestOptions {
        change,
        ..Default::default()
    }
}

async fn answer(
    pair: &Pair,
    to: SocketAddr,
    tid: TransactionId,
    o: &RequestOptions,
) -> (SocketAddr, BindingResponse) {
    let client = udp_client(A1).await;
    let me = client.local_addr().unwrap();
    let resp = transact_udp(&client, to, tid, o, FAST_RTO)
        .await
        .unwrap_or_else(|e| panic!("{o:?} to {to}: {e}\n{}", pair.diagnostics()));
    (me, resp)
}

#[tokio::test]
async fn cooperating_reflectors_answer_change_ip_from_the_partner() {
    let secret = "natscope-test-link-secret-0123456789";
    let pair = start_pair(secret, secret);
    let (p1, p2) = (pair.p1, pair.p2);
    let why = || pair.diagnostics();

    // (request to, change, expected source) — the first column of each row is a different host.
    let cases = [
        (sa(A1, p1), ChangeRequest::NONE, sa(A1, p1)),
        (sa(A1, p1), ChangeRequest::IP, sa(A2, p1)),
        (sa(A1, p1), ChangeRequest::PORT, sa(A1, p2)),
        (sa(A1, p1), ChangeRequest::BOTH, sa(A2, p2)),
        (sa(A2, p1), ChangeRequest::IP, sa(A1, p1)),
        (sa(A2, p1), ChangeRequest::BOTH, sa(A1, p2)),
        (sa(A1, p2), ChangeRequest::IP, sa(A2, p2)),
    ];
    for (to, c, want) in cases {
        let (me, resp) = answer(&pair, to, TransactionId::random(), &change(c)).await;
        let ctx = format!("{c:?} to {to}: {resp:?}\n{}", why());
        assert_eq!(resp.error_code, None, "{ctx}");
        assert_eq!(resp.source, Some(want), "real source: {ctx}");
        assert_eq!(resp.response_origin, Some(want), "RESPONSE-ORIGIN: {ctx}");
        // OTHER-ADDRESS is relative to the address the request reached, on both hosts.
        let other = sa(
            if to.ip() == A1 { A2 } else { A1 },
            if to.port() == p1 { p2 } else { p1 },
        );
        assert_eq!(resp.other_address, Some(other), "OTHER-ADDRESS: {ctx}");
        assert_eq!(resp.xor_mapped, Some(me), "XOR-MAPPED-ADDRESS: {ctx}");
        assert_eq!(resp.mapped, Some(me), "MAPPED-ADDRESS: {ctx}");
    }
    // The brief's headline: OTHER-ADDRESS for requests to 127.0.0.1:P1 is 127.0.0.2:P2.
    let (_, resp) = answer(
        &pair,
        sa(A1, p1),
        TransactionId::random(),
        &change(ChangeRequest::NONE),
    )
    .await;
    assert_eq!(resp.other_address, Some(sa(A2, p2)), "{}", why());

    // Classic clients (RFC 3489) are forwarded too: SOURCE-ADDRESS is the partner's address.
    let (me, resp) = answer(
        &pair,
        sa(A1, p1),
        TransactionId::random_classic(),
        &change(ChangeRequest::IP),
    )
    .await;
    assert!(resp.classic, "{resp:?}");
    assert_eq!(resp.source, Some(sa(A2, p1)), "{resp:?}\n{}", why());
    assert_eq!(resp.source_address, Some(sa(A2, p1)), "{resp:?}");
    assert_eq!(resp.changed_address, Some(sa(A2, p2)), "{resp:?}");
    assert_eq!(resp.mapped, Some(me), "{resp:?}");

    // RESPONSE-PORT through the partner: answered from B, to the requester's other port.
    let x = udp_client(A1).await;
    let y = udp_client(A1).await;
    let tid = TransactionId::random();
    let req = binding_request(
        &tid,
        &RequestOptions {
            change: ChangeRequest::IP,
            response_port: Some(y.local_addr().unwrap().port()),
            ..Default::default()
        },
    );
    let resp = exchange_raw(&x, &y, sa(A1, p1), &req, &tid, FAST_RTO)
        .await
        .unwrap_or_else(|| panic!("no forwarded RESPONSE-PORT answer\n{}", why()));
    assert_eq!(resp.source, Some(sa(A2, p1)), "{resp:?}");
    assert_eq!(resp.xor_mapped, Some(x.local_addr().unwrap()), "{resp:?}");
}

/// coturn's RFC 5780 client sees one server with two IPs, although it is two processes.
#[test]
#[ignore = "needs coturn's turnutils_natdiscovery (package coturn); run with --include-ignored (scripts/test does)"]
fn natdiscovery_sees_cooperating_reflectors_as_one_rfc5780_server() {
    require_tool("turnutils_natdiscovery", "coturn");
    let secret = "natscope-test-link-secret-natdiscovery";
    let pair = start_pair(secret, secret);
    let mut cmd = Command::new("turnutils_natdiscovery");
    cmd.args(["-m", "-f", "-L", "127.0.0.1", "-p"])
        .arg(pair.p1.to_string())
        .arg("127.0.0.1");
    let run = run_tool(cmd, Duration::from_secs(40));
    let why = format!("{}\n{}", run.report(), pair.diagnostics());
    assert!(
        run.stdout
            .contains("NAT with Endpoint Independent Mapping!"),
        "{why}"
    );
    assert!(
        run.stdout
            .contains("NAT with Endpoint Independent Filtering!"),
        "{why}"
    );
    assert!(!run.stdout.contains("timeout"), "{why}");
    let forwarded_origin = format!("Response origin: : {}", sa(A2, pair.p2));
    assert!(run.stdout.contains(&forwarded_origin), "{why}");
}

#[tokio::test]
async fn cooperating_reflectors_with_different_secrets_refuse_forwarded_requests() {
    let pair = start_pair(
        "natscope-test-secret-of-host-a-000",
        "natscope-test-secret-of-host-b-111",
    );
    let (p1, p2) = (pair.p1, pair.p2);
    let why = || pair.diagnostics();

    // Local answers still work.
    let (me, resp) = answer(
        &pair,
        sa(A1, p1),
        TransactionId::random(),
        &change(ChangeRequest::NONE),
    )
    .await;
    assert_eq!(resp.source, Some(sa(A1, p1)), "{resp:?}\n{}", why());
    assert_eq!(resp.xor_mapped, Some(me));
    let (_, resp) = answer(
        &pair,
        sa(A1, p1),
        TransactionId::random(),
        &change(ChangeRequest::PORT),
    )
    .await;
    assert_eq!(resp.source, Some(sa(A1, p2)), "{resp:?}\n{}", why());

    // Anything that needs the partner goes unanswered, from both sides.
    for (to, c) in [
        (sa(A1, p1), ChangeRequest::IP),
        (sa(A1, p1), ChangeRequest::BOTH),
        (sa(A2, p1), ChangeRequest::IP),
    ] {
        let client = udp_client(A1).await;
        let tid = TransactionId::random();
        let req = binding_request(&tid, &change(c));
        let got = exchange_raw(&client, &client, to, &req, &tid, NEGATIVE_RTO).await;
        assert!(
            got.is_none(),
            "{c:?} to {to} was answered although the secrets differ: {got:?}\n{}",
            why()
        );
    }

    // And the plain request after the refused ones is still answered.
    let (_, resp) = answer(
        &pair,
        sa(A2, p1),
        TransactionId::random(),
        &change(ChangeRequest::NONE),
    )
    .await;
    assert_eq!(resp.source, Some(sa(A2, p1)), "{resp:?}\n{}", why());
    eprintln!("host B stderr after refused forwards:\n{}", pair.b.stderr());
}
