//! UPnP IGD client driver (issue 12): finds the gateway's Internet Gateway Device with SSDP
//! (unicast to the gateway and the multicast group at once), reads its device description, and
//! drives its WAN connection service (WANIPConnection:2, :1 or WANPPPConnection:1):
//! GetExternalIPAddress, AddPortMapping, AddAnyPortMapping and DeletePortMapping.
//!
//! The bytes are made and parsed by the sans-IO codec `natscope_core::portmap::igd` (its module
//! comment says why it is hand-written rather than `igd-next`); this module owns the sockets and
//! the clock. Every call is bounded in time (the caller's deadline or timeout) and in size
//! (`igd::MAX_HTTP` per response), and only answers from the gateway's own address are believed:
//! an SSDP answer from another host, or a LOCATION naming another host, is ignored, so another
//! device on the LAN cannot pose as the gateway.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use natscope_core::portmap::igd::{self, Action, Control};
pub use natscope_core::portmap::igd::{HttpUrl, IgdError, IgdService};
pub use natscope_core::portmap::MapProtocol;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

/// How often the SSDP search is repeated while discovery waits (UDP may be lost).
const SEARCH_INTERVAL: Duration = Duration::from_millis(100);

/// Why a UPnP IGD step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpnpError {
    #[error("no UPnP IGD answered from {0} within {1:?}")]
    NoAnswer(Ipv4Addr, Duration),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("the gateway's {step} was refused: {source}")]
    Protocol {
        step: &'static str,
        source: IgdError,
    },
    #[error("the gateway answered from a host other than itself: {0}")]
    ForeignHost(Ipv4Addr),
}

impl UpnpError {
    /// The UPnP error code of a SOAP fault (718 ConflictInMappingEntry, 725 OnlyPermanentLeases…).
    pub fn upnp_code(&self) -> Option<u16> {
        match self {
            Self::Protocol {
                source: IgdError::Fault { code, .. },
                ..
            } => Some(*code),
            _ => None,
        }
    }
}

/// A gateway's IGD, ready for actions.
#[derive(Debug, Clone)]
pub struct Igd {
    gateway: Ipv4Addr,
    location: HttpUrl,
    control: Control,
}

/// Finds the IGD of `gateway` from `local_ip` (the address on the gateway's LAN), within
/// `deadline`: M-SEARCH to `gateway:1900` and to 239.255.255.250:1900, repeated every 100 ms;
/// the first answer from the gateway whose description has a WAN connection service wins.
pub async fn discover(
    gateway: Ipv4Addr,
    local_ip: Ipv4Addr,
    deadline: Duration,
) -> Result<Igd, UpnpError> {
    let targets = [
        SocketAddrV4::new(gateway, igd::SSDP_PORT),
        SocketAddrV4::new(igd::SSDP_MULTICAST, igd::SSDP_PORT),
    ];
    discover_via(&targets, gateway, local_ip, deadline).await
}

/// [`discover`] with explicit SSDP destinations (tests point it at a fake gateway's port).
pub async fn discover_via(
    targets: &[SocketAddrV4],
    gateway: Ipv4Addr,
    local_ip: Ipv4Addr,
    deadline: Duration,
) -> Result<Igd, UpnpError> {
    let until = Instant::now() + deadline;
    let socket = ssdp_socket(local_ip).map_err(|source| UpnpError::Io {
        step: "opening the SSDP socket",
        source,
    })?;
    let mut last_error: Option<UpnpError> = None;
    let mut next_search = Instant::now();
    let mut buf = vec![0u8; igd::MAX_SSDP + 1];
    loop {
        let now = Instant::now();
        if now >= until {
            return Err(last_error.unwrap_or(UpnpError::NoAnswer(gateway, deadline)));
        }
        if now >= next_search {
            for st in igd::SEARCH_TARGETS {
                let request = igd::search_request(st);
                for t in targets {
                    // A send error (no multicast route) leaves the other destination.
                    let _ = socket.send_to(&request, SocketAddr::V4(*t)).await;
                }
            }
            next_search = now + SEARCH_INTERVAL;
        }
        let wait = next_search.min(until);
        let Ok(received) = timeout_at(wait, socket.recv_from(&mut buf)).await else {
            continue;
        };
        let Ok((n, from)) = received else {
            continue;
        };
        if from.ip() != std::net::IpAddr::V4(gateway) {
            continue;
        }
        let answer = match igd::parse_search_response(&buf[..n]) {
            Ok(a) => a,
            Err(source) => {
                last_error = Some(UpnpError::Protocol {
                    step: "SSDP answer",
                    source,
                });
                continue;
            }
        };
        if answer.location.host != gateway {
            last_error = Some(UpnpError::ForeignHost(answer.location.host));
            continue;
        }
        match describe(gateway, &answer.location, until).await {
            Ok(igd) => return Ok(igd),
            Err(e) => last_error = Some(e),
        }
    }
}

/// The UDP socket of the search: bound to `local_ip`, multicast out of that interface, TTL 2
/// (UDA 1.1 recommends it; the gateway is one hop away).
fn ssdp_socket(local_ip: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    if !local_ip.is_unspecified() {
        s.set_multicast_if_v4(&local_ip)?;
    }
    s.set_multicast_ttl_v4(2)?;
    s.bind(&SocketAddr::from((local_ip, 0)).into())?;
    UdpSocket::from_std(s.into())
}

/// Reads the device description at `location` and picks the WAN connection service.
async fn describe(gateway: Ipv4Addr, location: &HttpUrl, until: Instant) -> Result<Igd, UpnpError> {
    let response = exchange(
        location,
        &igd::http_get(location),
        until,
        "device description",
    )
    .await?;
    if response.status != 200 {
        return Err(UpnpError::Protocol {
            step: "device description",
            source: IgdError::Status(response.status),
        });
    }
    let control =
        igd::parse_description(&response.body, location).map_err(|source| UpnpError::Protocol {
            step: "device description",
            source,
        })?;
    if control.url.host != gateway {
        return Err(UpnpError::ForeignHost(control.url.host));
    }
    Ok(Igd {
        gateway,
        location: location.clone(),
        control,
    })
}

/// One HTTP request and its response on a fresh connection, all before `until`.
async fn exchange(
    url: &HttpUrl,
    request: &[u8],
    until: Instant,
    step: &'static str,
) -> Result<igd::HttpResponse, UpnpError> {
    let work = async {
        let mut stream = TcpStream::connect(SocketAddr::from((url.host, url.port)))
            .await
            .map_err(|source| UpnpError::Io { step, source })?;
        stream
            .write_all(request)
            .await
            .map_err(|source| UpnpError::Io { step, source })?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|source| UpnpError::Io { step, source })?;
            // Never more than MAX_HTTP + one read: the parser refuses anything larger.
            buf.extend_from_slice(&chunk[..n]);
            match igd::parse_http_response(&buf, n == 0) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(source) => return Err(UpnpError::Protocol { step, source }),
            }
        }
    };
    timeout_at(until, work)
        .await
        .unwrap_or(Err(UpnpError::Timeout(step)))
}

impl Igd {
    /// The gateway this IGD belongs to.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    /// The service the actions go to.
    pub fn service(&self) -> IgdService {
        self.control.service
    }
    /// Where the device description was read.
    pub fn location(&self) -> &HttpUrl {
        &self.location
    }
    /// The control URL of [`Igd::service`].
    pub fn control_url(&self) -> &HttpUrl {
        &self.control.url
    }

    async fn call(
        &self,
        action: &Action,
        limit: Duration,
        step: &'static str,
    ) -> Result<Vec<(String, String)>, UpnpError> {
        let until = Instant::now() + limit;
        let request = igd::http_soap(&self.control.url, self.control.service, action);
        let response = exchange(&self.control.url, &request, until, step).await?;
        igd::parse_soap_response(&response, action.name())
            .map_err(|source| UpnpError::Protocol { step, source })
    }

    /// GetExternalIPAddress. The address is what the gateway *claims*: the caller compares it
    /// with what STUN sees before believing it.
    pub async fn external_address(&self, limit: Duration) -> Result<Ipv4Addr, UpnpError> {
        let args = self
            .call(&Action::GetExternalIpAddress, limit, "GetExternalIPAddress")
            .await?;
        igd::external_address(&args).map_err(|source| UpnpError::Protocol {
            step: "GetExternalIPAddress",
            source,
        })
    }

    /// AddPortMapping of exactly `external_port` to `internal` for `lifetime` (whole seconds, at
    /// least 1: 0 would ask for a permanent mapping). Returns `external_port`.
    pub async fn add_port_mapping(
        &self,
        protocol: MapProtocol,
        internal: SocketAddrV4,
        external_port: u16,
        lifetime: Duration,
        description: &str,
        limit: Duration,
    ) -> Result<u16, UpnpError> {
        let action = Action::AddPortMapping {
            protocol,
            external_port,
            internal_port: internal.port(),
            internal_client: *internal.ip(),
            description: description.to_string(),
            lease_s: lease(lifetime),
        };
        self.call(&action, limit, "AddPortMapping").await?;
        Ok(external_port)
    }

    /// A mapping of `internal` on any free external port, `preferred` first: AddAnyPortMapping
    /// on WANIPConnection:2 (the gateway picks); on the older services AddPortMapping with
    /// `preferred`, then with up to three other ports while the gateway answers 718
    /// (ConflictInMappingEntry). Returns the external port.
    pub async fn add_any_port_mapping(
        &self,
        protocol: MapProtocol,
        internal: SocketAddrV4,
        preferred: u16,
        lifetime: Duration,
        description: &str,
        limit: Duration,
    ) -> Result<u16, UpnpError> {
        let until = Instant::now() + limit;
        if self.control.service.has_add_any() {
            let action = Action::AddAnyPortMapping {
                protocol,
                external_port: preferred,
                internal_port: internal.port(),
                internal_client: *internal.ip(),
                description: description.to_string(),
                lease_s: lease(lifetime),
            };
            let args = self.call(&action, limit, "AddAnyPortMapping").await?;
            return igd::reserved_port(&args).map_err(|source| UpnpError::Protocol {
                step: "AddAnyPortMapping",
                source,
            });
        }
        let mut port = preferred;
        let mut tries = 0;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let r = self
                .add_port_mapping(protocol, internal, port, lifetime, description, left)
                .await;
            tries += 1;
            match r {
                Err(e) if e.upnp_code() == Some(718) && tries < 4 => {
                    port = 1024 + (rand::random::<u16>() % (u16::MAX - 1024));
                }
                other => return other,
            }
        }
    }

    /// DeletePortMapping of `external_port`.
    pub async fn delete_port_mapping(
        &self,
        protocol: MapProtocol,
        external_port: u16,
        limit: Duration,
    ) -> Result<(), UpnpError> {
        let action = Action::DeletePortMapping {
            protocol,
            external_port,
        };
        self.call(&action, limit, "DeletePortMapping")
            .await
            .map(|_| ())
    }
}

fn lease(lifetime: Duration) -> u32 {
    u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_never_permanent() {
        assert_eq!(lease(Duration::ZERO), 1);
        assert_eq!(lease(Duration::from_millis(1500)), 1);
        assert_eq!(lease(Duration::from_secs(120)), 120);
        assert_eq!(lease(Duration::from_secs(u64::MAX)), u32::MAX);
    }
}
