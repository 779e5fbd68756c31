//! The sockets of a userspace router's UPnP IGD (`port_mapping = ["upnp"]`): SSDP on UDP 1900
//! (the 239.255.255.250 group and unicast) and HTTP on the router's LAN address, port 5000. The
//! answers come from the engine's sans-IO [`natscope_core::portmap::igd_server::Igd`] through
//! [`Router::upnp_ssdp`] and [`Router::upnp_http`], under the engine's lock, so a mapping made here
//! is in the same NAT table the engine translates with.
//!
//! Why the kernel owns these sockets: UPnP control is HTTP over TCP, and the engine, which owns
//! raw frames, terminates no TCP. Writing a TCP (handshake, retransmission, windows, teardown) into
//! the engine for one request/response exchange would be a large, risky piece of code; instead,
//! a router that serves UPnP gets its LAN address on `lan0` in the kernel too ([`prepare`]), and
//! ordinary sockets serve SSDP and HTTP. This is sound because the kernel in the router's namespace
//! routes nothing: [`prepare`] turns IPv4 forwarding off there, so packets the engine forwards
//! (addressed to other hosts) are dropped by the kernel without ICMP errors, and the kernel only
//! sees traffic to its own address. NAT-PMP and PCP stay in the engine; a socket bound to UDP 5351
//! here keeps the kernel from answering those requests with ICMP port unreachable.
//!
//! Bounds: one HTTP connection at a time, [`MAX_REQUEST`] bytes and [`HTTP_DEADLINE`] per
//! connection, then it is closed.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use natscope_core::portmap::igd_server::{Http, HTTP_PORT, MAX_REQUEST, SSDP_GROUP, SSDP_PORT};
use natscope_core::portmap::natpmp::SERVER_PORT;

use crate::engine::Router;
use crate::netns::{Netns, NetnsError};

/// Longest one HTTP connection may take to send its request.
pub const HTTP_DEADLINE: Duration = Duration::from_secs(3);
/// How often the loops look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Runs a closure on the engine's router under its lock.
pub type Access = Arc<dyn Fn(&mut dyn FnMut(&mut Router)) + Send + Sync>;
/// Whether the engine is stopping.
pub type Stopped = Arc<dyn Fn() -> bool + Send + Sync>;

/// Forwarding off in the router's namespace (see the module comment); run inside it.
pub fn prepare() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")
}

struct Sockets {
    ssdp: UdpSocket,
    http: TcpListener,
    sink: UdpSocket,
}

/// Opens the sockets inside `ns` (whose `lan0` must hold `lan`) and starts their threads.
pub fn start(
    ns: &Netns,
    lan: Ipv4Addr,
    access: Access,
    stopped: Stopped,
) -> Result<Vec<JoinHandle<()>>, std::io::Error> {
    let opened = ns
        .run(move || -> std::io::Result<Sockets> {
            prepare()?;
            let ssdp = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            ssdp.set_reuse_address(true)?;
            ssdp.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, SSDP_PORT)).into())?;
            ssdp.join_multicast_v4(&SSDP_GROUP, &lan)?;
            let ssdp: UdpSocket = ssdp.into();
            ssdp.set_read_timeout(Some(POLL))?;
            let http = TcpListener::bind(SocketAddrV4::new(lan, HTTP_PORT))?;
            http.set_nonblocking(true)?;
            let sink = UdpSocket::bind(SocketAddrV4::new(lan, SERVER_PORT))?;
            Ok(Sockets { ssdp, http, sink })
        })
        .map_err(|e: NetnsError| std::io::Error::other(e.to_string()))??;
    let Sockets { ssdp, http, sink } = opened;
    let mut threads = Vec::new();
    let (a, s) = (access.clone(), stopped.clone());
    threads.push(
        std::thread::Builder::new()
            .name("upnp-ssdp".into())
            .spawn(move || ssdp_loop(&ssdp, &a, &s))?,
    );
    threads.push(
        std::thread::Builder::new()
            .name("upnp-http".into())
            .spawn(move || {
                // Held, never read: the engine answers 5351 (module comment).
                let _sink = sink;
                http_loop(&http, &access, &stopped)
            })?,
    );
    Ok(threads)
}

fn ssdp_loop(sock: &UdpSocket, access: &Access, stopped: &Stopped) {
    let mut buf = vec![0u8; MAX_REQUEST];
    while !stopped() {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        let mut answer = None;
        access(&mut |r| answer = r.upnp_ssdp(Instant::now(), &buf[..n]));
        if let Some(answer) = answer {
            let _ = sock.send_to(&answer, from);
        }
    }
}

fn http_loop(listener: &TcpListener, access: &Access, stopped: &Stopped) {
    while !stopped() {
        match listener.accept() {
            Ok((conn, peer)) => serve(conn, peer, access),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL / 2),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Reads one request (bounded in size and time), answers it, closes.
fn serve(mut conn: TcpStream, peer: SocketAddr, access: &Access) {
    let deadline = Instant::now() + HTTP_DEADLINE;
    let _ = conn.set_nonblocking(false);
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        request.extend_from_slice(&buf[..n]);
        request.truncate(MAX_REQUEST + 1);
        let mut answer = Http::Incomplete;
        access(&mut |r| answer = r.upnp_http(Instant::now(), peer, &request));
        if let Http::Respond(bytes) = answer {
            let _ = conn.set_write_timeout(Some(HTTP_DEADLINE));
            let _ = conn.write_all(&bytes);
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}
