//! A loopback self-check of the RFC 5780 reflector, for `natscope demo`: a reflector on 127.0.0.1
//! and 127.0.0.2, one Binding exchange per feature (CHANGE-REQUEST in each form, PADDING,
//! RESPONSE-PORT, a classic RFC 3489 request, STUN over TCP) and each answer's real source and
//! attributes checked against RFC 5780 §6. Nothing leaves the machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Serialize;
use tokio::net::{TcpStream, UdpSocket};

use crate::client::{self, BindingResponse, RequestOptions, Rto};
use crate::reflector::driver::{CounterSnapshot, DriverConfig, RunningReflector};
use crate::reflector::ReflectorConfig;
use crate::stun::{ChangeRequest, EncodeError, TransactionId};

/// Why the self-check could not run (a wrong answer is a failed [`Row`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    #[error("cannot start the loopback reflector: {0}")]
    Start(std::io::Error),
    #[error("no free loopback ports after 20 tries: {0}")]
    NoPorts(std::io::Error),
    #[error("cannot bind a loopback client socket: {0}")]
    Bind(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Encode(#[from] EncodeError),
}

/// The whole run: the reflector's addresses, one row per exchange, the reflector's counters.
#[derive(Debug)]
pub struct SelfCheck {
    pub primary: SocketAddr,
    pub alternate: SocketAddr,
    pub rows: Vec<Row>,
    pub pass: bool,
    pub elapsed: Duration,
    pub counters: CounterSnapshot,
}

/// The `schema` of `natscope demo --json`.
pub const SCHEMA: &str = "natscope.demo/v1";

/// The `natscope demo --json` document (`natscope.demo/v1`, docs/schema/demo.v1.json).
#[derive(Debug, Serialize, JsonSchema)]
pub struct DemoDocument<'a> {
    /// Always [`SCHEMA`].
    #[schemars(extend("const" = SCHEMA))]
    pub schema: &'static str,
    /// The version of natscope that wrote the document.
    pub natscope_version: String,
    pub reflector: DemoReflector,
    /// One row per exchange.
    pub rows: &'a [Row],
    /// Every row passed.
    pub pass: bool,
    /// The whole run, whole milliseconds.
    pub duration_ms: u64,
    /// The loopback reflector's counters after the run.
    pub reflector_counters: &'a CounterSnapshot,
}

/// The loopback reflector the demo ran against.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DemoReflector {
    /// Its primary address, A1:P1.
    pub primary: SocketAddr,
    /// Its alternate address, A2:P2.
    pub alternate: SocketAddr,
}

impl SelfCheck {
    /// The run as the `natscope.demo/v1` document.
    pub fn document(&self) -> DemoDocument<'_> {
        DemoDocument {
            schema: SCHEMA,
            natscope_version: natscope_core::document::version(),
            reflector: DemoReflector {
                primary: self.primary,
                alternate: self.alternate,
            },
            rows: &self.rows,
            pass: self.pass,
            duration_ms: self.elapsed.as_millis() as u64,
            reflector_counters: &self.counters,
        }
    }
}

/// One exchange and what was checked.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Row {
    pub test: &'static str,
    pub sent_to: SocketAddr,
    pub expected_from: SocketAddr,
    pub answered_from: Option<SocketAddr>,
    pub mapped: Option<SocketAddr>,
    pub response_origin: Option<SocketAddr>,
    pub other_address: Option<SocketAddr>,
    pub pass: bool,
    pub detail: String,
}

const A1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const A2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Binds a reflector on two loopback IPs, picking free ports (retrying if another process wins).
fn start_reflector() -> Result<RunningReflector, SelfCheckError> {
    let mut last = None;
    for _ in 0..20 {
        let p1 = 20_000 + rand_port();
        let p2 = if p1 == 59_999 { p1 - 1 } else { p1 + 1 };
        let cfg = DriverConfig::new(ReflectorConfig {
            primary: SocketAddr::new(A1, p1),
            alternate: Some(SocketAddr::new(A2, p2)),
            partner: None,
        });
        match RunningReflector::start(cfg) {
            Ok(r) => return Ok(r),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(SelfCheckError::Start(e)),
        }
    }
    let last = last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into());
    Err(SelfCheckError::NoPorts(last))
}

fn rand_port() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t % 39_999) as u16
}

/// Starts the reflector, runs every exchange, stops it.
pub fn run() -> Result<SelfCheck, SelfCheckError> {
    let server = start_reflector()?;
    let addrs = server.udp_addresses().to_vec();
    let (a1p1, a1p2, a2p1, a2p2) = (addrs[0], addrs[1], addrs[2], addrs[3]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        for (test, change, from) in [
            ("binding", ChangeRequest::NONE, a1p1),
            ("change-port", ChangeRequest::PORT, a1p2),
            ("change-ip", ChangeRequest::IP, a2p1),
            ("change-ip+port", ChangeRequest::BOTH, a2p2),
        ] {
            rows.push(
                udp_row(
                    test,
                    a1p1,
                    from,
                    a2p2,
                    RequestOptions {
                        change,
                        ..Default::default()
                    },
                )
                .await?,
            );
        }
        rows.push(
            udp_row(
                "padding 512",
                a1p1,
                a1p1,
                a2p2,
                RequestOptions {
                    padding: Some(512),
                    fingerprint: true,
                    ..Default::default()
                },
            )
            .await?,
        );
        rows.push(response_port_row(a1p1).await?);
        rows.push(classic_row(a1p1, a2p2).await?);
        rows.push(tcp_row(a1p1, a2p2).await?);
        Ok::<_, SelfCheckError>(rows)
    })?;
    let elapsed = started.elapsed();
    let counters = server.stop();
    let pass = rows.iter().all(|r| r.pass);
    Ok(SelfCheck {
        primary: a1p1,
        alternate: a2p2,
        rows,
        pass,
        elapsed,
        counters,
    })
}

fn rto() -> Rto {
    Rto {
        initial: Duration::from_millis(100),
        max_transmits: 3,
        last_wait_multiplier: 4,
        max_rto: Duration::from_millis(400),
    }
}

async fn client_socket() -> Result<UdpSocket, SelfCheckError> {
    UdpSocket::bind(SocketAddr::new(A1, 0))
        .await
        .map_err(SelfCheckError::Bind)
}

fn check(
    test: &'static str,
    sent_to: SocketAddr,
    expected_from: SocketAddr,
    local: SocketAddr,
    other: Option<SocketAddr>,
    r: &BindingResponse,
) -> Row {
    let mut problems = Vec::new();
    if r.source != Some(expected_from) {
        problems.push(format!("came from {:?}", r.source));
    }
    if r.reflexive() != Some(local) {
        problems.push(format!("mapped {:?} != {local}", r.reflexive()));
    }
    if r.alg_rewrite() == Some(true) {
        problems.push("MAPPED-ADDRESS differs from XOR-MAPPED-ADDRESS".into());
    }
    let origin = r.response_origin.or(r.source_address);
    if origin != Some(expected_from) {
        problems.push(format!("origin {origin:?}"));
    }
    let other_seen = r.other_address.or(r.changed_address);
    if other_seen != other {
        problems.push(format!("other address {other_seen:?}"));
    }
    if r.fingerprint_ok == Some(false) {
        problems.push("bad FINGERPRINT".into());
    }
    Row {
        test,
        sent_to,
        expected_from,
        answered_from: r.source,
        mapped: r.reflexive(),
        response_origin: origin,
        other_address: other_seen,
        pass: problems.is_empty(),
        detail: problems.join("; "),
    }
}

fn failed(
    test: &'static str,
    sent_to: SocketAddr,
    expected_from: SocketAddr,
    e: impl ToString,
) -> Row {
    Row {
        test,
        sent_to,
        expected_from,
        answered_from: None,
        mapped: None,
        response_origin: None,
        other_address: None,
        pass: false,
        detail: e.to_string(),
    }
}

async fn udp_row(
    test: &'static str,
    to: SocketAddr,
    from: SocketAddr,
    other: SocketAddr,
    opts: RequestOptions,
) -> Result<Row, SelfCheckError> {
    let s = client_socket().await?;
    let local = s.local_addr()?;
    Ok(
        match client::transact_udp(&s, to, TransactionId::random(), &opts, rto()).await {
            Ok(r) => {
                let mut row = check(test, to, from, local, Some(other), &r);
                if opts.padding.is_some() && r.padding_len != opts.padding {
                    row.pass = false;
                    row.detail = format!("padding {:?}", r.padding_len);
                }
                row
            }
            Err(e) => failed(test, to, from, e),
        },
    )
}

/// RESPONSE-PORT (RFC 5780 §7.5): ask from one socket, receive on another.
async fn response_port_row(to: SocketAddr) -> Result<Row, SelfCheckError> {
    let ask = client_socket().await?;
    let listen = client_socket().await?;
    let local = listen.local_addr()?;
    let tid = TransactionId::random();
    let mut buf = [0u8; 256];
    let opts = RequestOptions {
        response_port: Some(local.port()),
        ..Default::default()
    };
    let len = client::build_request(&mut buf, &tid, &opts)?;
    let mut inb = [0u8; 2048];
    for _ in 0..3 {
        ask.send_to(&buf[..len], to).await?;
        if let Ok(Ok((n, src))) =
            tokio::time::timeout(Duration::from_millis(200), listen.recv_from(&mut inb)).await
        {
            if let Ok(r) = BindingResponse::parse(&inb[..n], &tid, Some(src)) {
                // The mapped address is the asking socket's, the answer reached the other one.
                let mut row = check(
                    "response-port",
                    to,
                    to,
                    ask.local_addr()?,
                    r.other_address,
                    &r,
                );
                row.test = "response-port";
                return Ok(row);
            }
        }
    }
    Ok(failed(
        "response-port",
        to,
        to,
        format!("no answer on {local}"),
    ))
}

/// A classic RFC 3489 request (no magic cookie) gets the classic attribute set.
async fn classic_row(to: SocketAddr, other: SocketAddr) -> Result<Row, SelfCheckError> {
    let s = client_socket().await?;
    let local = s.local_addr()?;
    let r = client::transact_udp(
        &s,
        to,
        TransactionId::random_classic(),
        &RequestOptions::default(),
        rto(),
    )
    .await;
    Ok(match r {
        Ok(r) => {
            let mut row = check("classic rfc 3489", to, to, local, Some(other), &r);
            if !r.classic || r.xor_mapped.is_some() {
                row.pass = false;
                row.detail = "not a classic answer".into();
            }
            row
        }
        Err(e) => failed("classic rfc 3489", to, to, e),
    })
}

/// STUN over TCP (RFC 8489 §6.2.2).
async fn tcp_row(to: SocketAddr, other: SocketAddr) -> Result<Row, SelfCheckError> {
    let mut stream = match TcpStream::connect(to).await {
        Ok(s) => s,
        Err(e) => return Ok(failed("tcp", to, to, e)),
    };
    let local = stream.local_addr()?;
    Ok(
        match client::transact_tcp(
            &mut stream,
            TransactionId::random(),
            &RequestOptions::default(),
            Duration::from_secs(1),
        )
        .await
        {
            Ok(r) => check("tcp", to, to, local, Some(other), &r),
            Err(e) => failed("tcp", to, to, e),
        },
    )
}
