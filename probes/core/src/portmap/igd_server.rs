//! The gateway side of UPnP IGD, sans-IO: SSDP M-SEARCH answers, the device description, and
//! SOAP control of WANIPConnection:2 (also answering clients that name :1), installing mappings in
//! the router's [`NatTable`] like the NAT-PMP/PCP [`super::server`]. The lab driver owns the
//! sockets (a UDP socket on 1900 and a TCP listener on the router's LAN address) and passes bytes.
//!
//! Parsing uses `httparse` (the request head) and, for the SOAP body, the XML reader the client
//! uses too ([`super::igd`]: roxmltree, DTDs refused), so both directions read XML one way. Every
//! input is capped ([`MAX_REQUEST`]), and anything malformed gets an HTTP 400 or a SOAP fault,
//! never a panic (`fuzzing::igd_*` and the fuzz targets check it).
//!
//! Served actions (UPnP-gw-WANIPConnection-v2): GetExternalIPAddress, AddPortMapping (the exact
//! port or ConflictInMappingEntry 718), AddAnyPortMapping (another port when taken),
//! DeletePortMapping (NoSuchEntryInArray 714), GetSpecificPortMappingEntry,
//! GetGenericPortMappingEntry, GetStatusInfo, GetConnectionTypeInfo; and WANCommonInterfaceConfig's
//! GetCommonLinkProperties. As IGD:2 asks (§2.5.16 security), a control point may only map and
//! delete for its own address (606 otherwise); a remote host other than the wildcard is refused
//! (726), as most gateways do.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::PortMappingService;
use crate::nat::table::{MapRequest, NatTable, RequestError};
use crate::nat::Protocol;

/// SSDP's multicast group and port (UPnP Device Architecture 1.1 §1.3).
pub const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
pub const SSDP_PORT: u16 = 1900;
/// The HTTP port of the description and control URLs.
pub const HTTP_PORT: u16 = 5000;
/// Largest request (head and body) read from one connection or datagram.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Longest lease granted: IGD:2 (§2.3.16) caps NewLeaseDuration at 604800 s and reads 0 as that.
pub const MAX_LEASE: u32 = 604_800;

const DESC_PATH: &str = "/rootDesc.xml";
const IP_CONN_PATH: &str = "/ctl/IPConn";
const CIF_PATH: &str = "/ctl/CommonIfCfg";
const WAN_IP: &str = "urn:schemas-upnp-org:service:WANIPConnection:2";
const WAN_CIF: &str = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1";
const IGD: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:2";
const HEADERS: usize = 32;
/// Most arguments one SOAP action may carry; more is a fault, not an allocation.
pub const MAX_ARGS: usize = 16;

/// What an HTTP exchange came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Http {
    /// The request is not complete yet: read more (up to [`MAX_REQUEST`]).
    Incomplete,
    /// Send these bytes and close the connection.
    Respond(Vec<u8>),
}

/// The UPnP IGD of one gateway whose LAN address is `lan`.
#[derive(Clone, Debug)]
pub struct Igd {
    lan: Ipv4Addr,
    uuid: String,
    started: Instant,
}

impl Igd {
    /// `seed` makes the device's UUID (stable per router, distinct between routers of a lab).
    pub fn new(lan: Ipv4Addr, seed: u64, now: Instant) -> Self {
        let a = u64::from(u32::from(lan)) ^ seed.rotate_left(17);
        Self {
            lan,
            uuid: format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                (a >> 32) as u32,
                (a >> 16) as u16,
                a as u16 & 0xfff,
                seed as u16 & 0xfff,
                seed & 0xffff_ffff_ffff
            ),
            started: now,
        }
    }

    fn location(&self) -> String {
        format!("http://{}:{HTTP_PORT}{DESC_PATH}", self.lan)
    }

    /// Answers an SSDP M-SEARCH (unicast or multicast) for a search target this gateway has;
    /// `None` for anything else (NOTIFYs, other targets, malformed datagrams).
    pub fn ssdp(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        let datagram = datagram.get(..datagram.len().min(MAX_REQUEST))?;
        let mut headers = [httparse::EMPTY_HEADER; HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(datagram), Ok(httparse::Status::Complete(_))) {
            return None;
        }
        if req.method != Some("M-SEARCH") || req.path != Some("*") {
            return None;
        }
        let man = header(&req, "man")?;
        if man.trim().trim_matches('"') != "ssdp:discover" {
            return None;
        }
        let st = header(&req, "st")?.trim().to_string();
        let known = [
            "ssdp:all",
            "upnp:rootdevice",
            IGD,
            "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
            "urn:schemas-upnp-org:device:WANDevice:1",
            "urn:schemas-upnp-org:device:WANConnectionDevice:1",
            WAN_IP,
            "urn:schemas-upnp-org:service:WANIPConnection:1",
            WAN_CIF,
        ];
        if !known.contains(&st.as_str()) {
            return None;
        }
        // ssdp:all is answered with the root device (one answer keeps this simple and bounded).
        let st = if st == "ssdp:all" {
            IGD.to_string()
        } else {
            st
        };
        let usn = if st == format!("uuid:{}", self.uuid) {
            st.clone()
        } else {
            format!("uuid:{}::{st}", self.uuid)
        };
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\nLOCATION: {}\r\n\
                 SERVER: Linux UPnP/1.1 natscope-lab/{}\r\nST: {st}\r\nUSN: {usn}\r\n\
                 BOOTID.UPNP.ORG: 1\r\nCONFIGID.UPNP.ORG: 1\r\n\r\n",
                self.location(),
                env!("CARGO_PKG_VERSION")
            )
            .into_bytes(),
        )
    }

    /// One HTTP request from `client` (a LAN host), possibly incomplete. Descriptions are served
    /// with GET, control with POST; everything else is 404/405/400.
    pub fn http(
        &mut self,
        now: Instant,
        table: &mut NatTable,
        client: SocketAddr,
        request: &[u8],
    ) -> Http {
        if request.len() > MAX_REQUEST {
            return Http::Respond(plain(413, "Payload Too Large"));
        }
        let mut headers = [httparse::EMPTY_HEADER; HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head = match req.parse(request) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Http::Incomplete,
            Err(_) => return Http::Respond(plain(400, "Bad Request")),
        };
        let length = match header(&req, "content-length").map(|v| v.trim().parse::<usize>()) {
            None => 0,
            Some(Ok(n)) if n <= MAX_REQUEST => n,
            Some(_) => return Http::Respond(plain(400, "Bad Request")),
        };
        let Some(body) = request.get(head..) else {
            return Http::Incomplete;
        };
        if body.len() < length {
            return Http::Incomplete;
        }
        let body = &body[..length];
        let path = req.path.unwrap_or("");
        match (req.method.unwrap_or(""), path) {
            ("GET", DESC_PATH) => {
                Http::Respond(ok("text/xml; charset=\"utf-8\"", &self.description()))
            }
            ("GET", _) => Http::Respond(plain(404, "Not Found")),
            ("POST", IP_CONN_PATH | CIF_PATH) => {
                let action = header(&req, "soapaction")
                    .unwrap_or("")
                    .trim()
                    .trim_matches('"');
                let (service, name) = action.split_once('#').unwrap_or(("", ""));
                let wanted = if path == IP_CONN_PATH {
                    service.starts_with("urn:schemas-upnp-org:service:WANIPConnection:")
                } else {
                    service.starts_with("urn:schemas-upnp-org:service:WANCommonInterfaceConfig:")
                };
                let answer = match parse_soap(body) {
                    Some(call) if wanted && call.action == name => {
                        self.control(now, table, client, service, &call)
                    }
                    _ => Err(Fault::InvalidAction),
                };
                Http::Respond(match answer {
                    Ok(args) => soap_ok(service, name, &args),
                    Err(f) => soap_fault(f),
                })
            }
            _ => Http::Respond(plain(405, "Method Not Allowed")),
        }
    }

    fn control(
        &mut self,
        now: Instant,
        table: &mut NatTable,
        client: SocketAddr,
        service: &str,
        call: &Call,
    ) -> Result<Vec<(&'static str, String)>, Fault> {
        let ext_ip = match table.external_ip_for(client.ip()) {
            Ok(IpAddr::V4(ip)) => ip,
            _ => return Err(Fault::ActionFailed),
        };
        if service.contains("WANCommonInterfaceConfig") {
            return match call.action.as_str() {
                "GetCommonLinkProperties" => Ok(vec![
                    ("NewWANAccessType", "Ethernet".into()),
                    ("NewLayer1UpstreamMaxBitRate", "1000000000".into()),
                    ("NewLayer1DownstreamMaxBitRate", "1000000000".into()),
                    ("NewPhysicalLinkStatus", "Up".into()),
                ]),
                _ => Err(Fault::InvalidAction),
            };
        }
        match call.action.as_str() {
            "GetExternalIPAddress" => Ok(vec![("NewExternalIPAddress", ext_ip.to_string())]),
            "GetStatusInfo" => Ok(vec![
                ("NewConnectionStatus", "Connected".into()),
                ("NewLastConnectionError", "ERROR_NONE".into()),
                (
                    "NewUptime",
                    now.saturating_duration_since(self.started)
                        .as_secs()
                        .to_string(),
                ),
            ]),
            "GetConnectionTypeInfo" => Ok(vec![
                ("NewConnectionType", "IP_Routed".into()),
                ("NewPossibleConnectionTypes", "IP_Routed".into()),
            ]),
            "AddPortMapping" | "AddAnyPortMapping" => {
                let any = call.action == "AddAnyPortMapping";
                wildcard_remote(call)?;
                let ext_port: u16 = call.num("NewExternalPort")?;
                let proto = protocol(call)?;
                let int_port: u16 = call.num("NewInternalPort")?;
                let client_ip: Ipv4Addr = call
                    .arg("NewInternalClient")
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or(Fault::InvalidArgs)?;
                if IpAddr::V4(client_ip) != client.ip() {
                    return Err(Fault::NotAuthorized);
                }
                if ext_port == 0 && !any {
                    return Err(Fault::WildCardExtPort);
                }
                if int_port == 0 {
                    return Err(Fault::InvalidArgs);
                }
                let lease: u32 = call.num("NewLeaseDuration")?;
                let lease = if lease == 0 {
                    MAX_LEASE
                } else {
                    lease.min(MAX_LEASE)
                };
                let internal = SocketAddr::new(IpAddr::V4(client_ip), int_port);
                // The same external port held by this very endpoint is a refresh.
                let r = MapRequest {
                    proto,
                    internal,
                    external_port: ext_port,
                    exact: !any,
                    lifetime: Duration::from_secs(lease.into()),
                    service: PortMappingService::Upnp,
                    nonce: None,
                };
                match table.map_requested(now, r) {
                    Ok(ext) if any => Ok(vec![("NewReservedPort", ext.port().to_string())]),
                    Ok(_) => Ok(vec![]),
                    Err(RequestError::PortTaken) => Err(Fault::Conflict),
                    Err(RequestError::Quota) => Err(Fault::OutOfResources),
                    Err(_) => Err(Fault::ActionFailed),
                }
            }
            "DeletePortMapping" | "GetSpecificPortMappingEntry" => {
                wildcard_remote(call)?;
                let ext_port: u16 = call.num("NewExternalPort")?;
                let proto = protocol(call)?;
                let ext = SocketAddr::new(IpAddr::V4(ext_ip), ext_port);
                let m = table
                    .requested_on(now, proto, ext)
                    .ok_or(Fault::NoSuchEntry)?;
                let (internal, until) = (m.internal, m.requested_at(now).map(|r| r.until));
                if call.action == "DeletePortMapping" {
                    if internal.ip() != client.ip() {
                        return Err(Fault::NotAuthorized);
                    }
                    let _ = table.unmap_requested(now, proto, internal, None);
                    return Ok(vec![]);
                }
                Ok(entry(internal, until, now))
            }
            "GetGenericPortMappingEntry" => {
                let index: usize = call.num("NewPortMappingIndex")?;
                let mut rows: Vec<_> = table
                    .mappings(now)
                    .filter_map(|m| {
                        m.requested_at(now)
                            .map(|r| (m.proto, m.external, m.internal, r.until))
                    })
                    .collect();
                rows.sort_by_key(|(p, e, ..)| (*e, *p == Protocol::Tcp));
                let (proto, ext, internal, until) =
                    *rows.get(index).ok_or(Fault::ArrayIndexInvalid)?;
                let mut args = vec![
                    ("NewRemoteHost", String::new()),
                    ("NewExternalPort", ext.port().to_string()),
                    (
                        "NewProtocol",
                        if proto == Protocol::Tcp { "TCP" } else { "UDP" }.into(),
                    ),
                ];
                args.extend(entry(internal, Some(until), now));
                Ok(args)
            }
            _ => Err(Fault::InvalidAction),
        }
    }

    /// The device description (UPnP Device Architecture §2.3): IGD:2 → WANDevice →
    /// WANConnectionDevice → WANIPConnection:2, with WANCommonInterfaceConfig:1 on the WANDevice.
    pub fn description(&self) -> String {
        format!(
            r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>1</minor></specVersion>
<device>
<deviceType>{IGD}</deviceType>
<friendlyName>natscope lab router</friendlyName>
<manufacturer>natscope</manufacturer>
<modelName>natscope-lab userspace NAT</modelName>
<UDN>uuid:{uuid}</UDN>
<deviceList>
<device>
<deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>
<friendlyName>WAN device</friendlyName>
<manufacturer>natscope</manufacturer>
<modelName>natscope-lab</modelName>
<UDN>uuid:{uuid}-1</UDN>
<serviceList>
<service>
<serviceType>{WAN_CIF}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId>
<SCPDURL>/WANCfg.xml</SCPDURL>
<controlURL>{CIF_PATH}</controlURL>
<eventSubURL>/evt/CommonIfCfg</eventSubURL>
</service>
</serviceList>
<deviceList>
<device>
<deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType>
<friendlyName>WAN connection</friendlyName>
<manufacturer>natscope</manufacturer>
<modelName>natscope-lab</modelName>
<UDN>uuid:{uuid}-2</UDN>
<serviceList>
<service>
<serviceType>{WAN_IP}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<SCPDURL>/WANIPCn.xml</SCPDURL>
<controlURL>{IP_CONN_PATH}</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL>
</service>
</serviceList>
</device>
</deviceList>
</device>
</deviceList>
<presentationURL>http://{lan}/</presentationURL>
</device>
</root>
"#,
            uuid = self.uuid,
            lan = self.lan
        )
    }
}

/// A SOAP action and its arguments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Call {
    pub action: String,
    pub args: Vec<(String, String)>,
}

impl Call {
    fn arg(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn num<T: std::str::FromStr>(&self, name: &str) -> Result<T, Fault> {
        self.arg(name)
            .and_then(|v| v.trim().parse().ok())
            .ok_or(Fault::InvalidArgs)
    }
}

/// Reads the first element inside the SOAP `Body` as the action, and its child elements' text as
/// arguments (namespaces ignored, as UPnP control points differ in their prefixes). `None` for
/// anything that is not such an envelope, more than [`MAX_ARGS`] arguments, or bad XML.
pub fn parse_soap(body: &[u8]) -> Option<Call> {
    let doc = super::igd::parse_xml(body.get(..body.len().min(MAX_REQUEST))?).ok()?;
    let element = |n: &roxmltree::Node<'_, '_>| n.is_element();
    let soap_body = doc
        .root_element()
        .children()
        .find(|c| c.is_element() && c.tag_name().name() == "Body")?;
    let action = soap_body.children().find(element)?;
    let mut args = Vec::new();
    for a in action.children().filter(element) {
        if args.len() >= MAX_ARGS {
            return None;
        }
        let text: String = a
            .children()
            .filter_map(|t| t.is_text().then(|| t.text()).flatten())
            .collect();
        args.push((a.tag_name().name().to_string(), text));
    }
    Some(Call {
        action: action.tag_name().name().to_string(),
        args,
    })
}

/// UPnP control errors (UPnP Device Architecture §3.2.2, WANIPConnection:2 §2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    InvalidAction,
    InvalidArgs,
    ActionFailed,
    NotAuthorized,
    ArrayIndexInvalid,
    NoSuchEntry,
    WildCardExtPort,
    Conflict,
    RemoteHostWildcardOnly,
    OutOfResources,
}

impl Fault {
    pub fn code(self) -> (u16, &'static str) {
        match self {
            Self::InvalidAction => (401, "Invalid Action"),
            Self::InvalidArgs => (402, "Invalid Args"),
            Self::ActionFailed => (501, "Action Failed"),
            Self::NotAuthorized => (606, "Action not authorized"),
            Self::ArrayIndexInvalid => (713, "SpecifiedArrayIndexInvalid"),
            Self::NoSuchEntry => (714, "NoSuchEntryInArray"),
            Self::WildCardExtPort => (716, "WildCardNotPermittedInExtPort"),
            Self::Conflict => (718, "ConflictInMappingEntry"),
            Self::RemoteHostWildcardOnly => (726, "RemoteHostOnlySupportsWildcard"),
            Self::OutOfResources => (728, "NoPortMapsAvailable"),
        }
    }
}

fn wildcard_remote(call: &Call) -> Result<(), Fault> {
    match call.arg("NewRemoteHost").map(str::trim) {
        None | Some("") | Some("*") => Ok(()),
        Some(_) => Err(Fault::RemoteHostWildcardOnly),
    }
}

fn protocol(call: &Call) -> Result<Protocol, Fault> {
    match call.arg("NewProtocol").map(str::trim) {
        Some(p) if p.eq_ignore_ascii_case("udp") => Ok(Protocol::Udp),
        Some(p) if p.eq_ignore_ascii_case("tcp") => Ok(Protocol::Tcp),
        _ => Err(Fault::InvalidArgs),
    }
}

fn entry(
    internal: SocketAddr,
    until: Option<Instant>,
    now: Instant,
) -> Vec<(&'static str, String)> {
    let left = until.map_or(0, |u| u.saturating_duration_since(now).as_secs());
    vec![
        ("NewInternalPort", internal.port().to_string()),
        ("NewInternalClient", internal.ip().to_string()),
        ("NewEnabled", "1".into()),
        ("NewPortMappingDescription", "natscope".into()),
        ("NewLeaseDuration", left.to_string()),
    ]
}

fn header<'a>(req: &httparse::Request<'_, 'a>, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn response(status: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nServer: Linux UPnP/1.1 natscope-lab/{}\r\nEXT:\r\n\r\n{body}",
        body.len(),
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

fn ok(content_type: &str, body: &str) -> Vec<u8> {
    response(200, "OK", content_type, body)
}

fn plain(status: u16, reason: &str) -> Vec<u8> {
    response(status, reason, "text/plain", reason)
}

fn escape(s: &str) -> String {
    super::igd::xml_escape(s)
}

const ENVELOPE: &str = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>"#;

fn soap_ok(service: &str, action: &str, args: &[(&str, String)]) -> Vec<u8> {
    let mut body = format!(
        "{ENVELOPE}<u:{action}Response xmlns:u=\"{}\">",
        escape(service)
    );
    for (name, value) in args {
        body.push_str(&format!("<{name}>{}</{name}>", escape(value)));
    }
    body.push_str(&format!("</u:{action}Response></s:Body></s:Envelope>\r\n"));
    ok("text/xml; charset=\"utf-8\"", &body)
}

fn soap_fault(f: Fault) -> Vec<u8> {
    let (code, description) = f.code();
    let body = format!(
        "{ENVELOPE}<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>\
         <detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{code}</errorCode>\
         <errorDescription>{description}</errorDescription></UPnPError></detail></s:Fault>\
         </s:Body></s:Envelope>\r\n"
    );
    response(
        500,
        "Internal Server Error",
        "text/xml; charset=\"utf-8\"",
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{FilteringBehavior, MappingBehavior, NatBehavior};

    const LAN: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

    fn setup() -> (Igd, NatTable, Instant) {
        let now = Instant::now();
        let behavior = NatBehavior::new(
            MappingBehavior::AddressAndPortDependent,
            FilteringBehavior::AddressAndPortDependent,
        );
        (
            Igd::new(LAN, 1, now),
            NatTable::new(behavior, vec![IpAddr::V4(EXT)], 3),
            now,
        )
    }

    fn client(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 40000)
    }

    /// A control request as miniupnpc writes it (no Content-Length split tricks).
    fn soap(action: &str, args: &[(&str, &str)]) -> Vec<u8> {
        let mut inner = String::new();
        for (n, v) in args {
            inner.push_str(&format!("<{n}>{v}</{n}>"));
        }
        let body = format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
             <u:{action} xmlns:u=\"{WAN_IP}\">{inner}</u:{action}></s:Body></s:Envelope>\r\n"
        );
        format!(
            "POST {IP_CONN_PATH} HTTP/1.1\r\nHost: {LAN}:{HTTP_PORT}\r\nContent-Length: {}\r\n\
             Content-Type: text/xml\r\nSOAPAction: \"{WAN_IP}#{action}\"\r\nConnection: Close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn call(igd: &mut Igd, t: &mut NatTable, now: Instant, from: &str, req: &[u8]) -> String {
        match igd.http(now, t, client(from), req) {
            Http::Respond(b) => String::from_utf8(b).expect("utf-8"),
            Http::Incomplete => panic!("incomplete"),
        }
    }

    fn add(port: &str, internal_port: &str, client: &str, lease: &str) -> Vec<u8> {
        soap(
            "AddPortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", port),
                ("NewProtocol", "UDP"),
                ("NewInternalPort", internal_port),
                ("NewInternalClient", client),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", "t"),
                ("NewLeaseDuration", lease),
            ],
        )
    }

    #[test]
    fn ssdp_answers_gateway_searches_only() {
        let (igd, _, _) = setup();
        let search = |st: &str| {
            format!("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\nST: {st}\r\n\r\n")
        };
        let answer = igd.ssdp(search(IGD).as_bytes()).expect("answered");
        let text = String::from_utf8(answer).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("LOCATION: http://10.1.0.1:5000/rootDesc.xml\r\n"),
            "{text}"
        );
        assert!(text.contains(&format!("ST: {IGD}\r\n")), "{text}");
        assert!(igd
            .ssdp(search("urn:schemas-upnp-org:device:MediaServer:1").as_bytes())
            .is_none());
        assert!(igd
            .ssdp(b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\n\r\n")
            .is_none());
        assert!(igd.ssdp(b"\xff\x00garbage").is_none());
    }

    #[test]
    fn description_and_status() {
        let (mut igd, mut t, now) = setup();
        let desc = call(
            &mut igd,
            &mut t,
            now,
            "10.1.0.2",
            b"GET /rootDesc.xml HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(desc.starts_with("HTTP/1.1 200 OK"), "{desc}");
        assert!(
            desc.contains(WAN_IP) && desc.contains(IP_CONN_PATH),
            "{desc}"
        );
        let r = call(
            &mut igd,
            &mut t,
            now,
            "10.1.0.2",
            &soap("GetStatusInfo", &[]),
        );
        assert!(
            r.contains("<NewConnectionStatus>Connected</NewConnectionStatus>"),
            "{r}"
        );
        let r = call(
            &mut igd,
            &mut t,
            now,
            "10.1.0.2",
            &soap("GetExternalIPAddress", &[]),
        );
        assert!(
            r.contains("<NewExternalIPAddress>203.0.113.1</NewExternalIPAddress>"),
            "{r}"
        );
        assert_eq!(
            igd.http(
                now,
                &mut t,
                client("10.1.0.2"),
                b"GET /rootDesc.xml HTTP/1.1\r\nHo"
            ),
            Http::Incomplete
        );
    }

    #[test]
    fn add_conflict_lookup_delete_and_expiry() {
        let (mut igd, mut t, now) = setup();
        let r = call(
            &mut igd,
            &mut t,
            now,
            "10.1.0.2",
            &add("46000", "5555", "10.1.0.2", "60"),
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let ext = SocketAddr::new(IpAddr::V4(EXT), 46000);
        assert_eq!(
            t.inbound(
                now,
                Protocol::Udp,
                "198.51.100.1:9".parse().expect("addr"),
                ext
            ),
            Some("10.1.0.2:5555".parse().expect("addr"))
        );
        // Another host asking for that external port: conflict; for its own port only.
        let r = call(
            &mut igd,
            &mut t,
            now,
            "10.1.0.3",
            &add("46000", "5555", "10.1.0.3", "60"),
        );
        assert!(r.contains("<errorCode>718</errorCode>"), "{r}");
        let r = call(
            &mut igd,
            &mut t,
            now,
            "10.1.0.3",
            &add("46001", "5555", "10.1.0.2", "60"),
        );
        assert!(r.contains("<errorCode>606</errorCode>"), "{r}");
        let any = soap(
            "AddAnyPortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "46000"),
                ("NewProtocol", "UDP"),
                ("NewInternalPort", "5555"),
                ("NewInternalClient", "10.1.0.3"),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", "t"),
                ("NewLeaseDuration", "60"),
            ],
        );
        let r = call(&mut igd, &mut t, now, "10.1.0.3", &any);
        assert!(
            r.contains("<NewReservedPort>") && !r.contains(">46000<"),
            "{r}"
        );
        let get = soap(
            "GetSpecificPortMappingEntry",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "46000"),
                ("NewProtocol", "UDP"),
            ],
        );
        let r = call(
            &mut igd,
            &mut t,
            now + Duration::from_secs(10),
            "10.1.0.2",
            &get,
        );
        assert!(
            r.contains("<NewInternalClient>10.1.0.2</NewInternalClient>"),
            "{r}"
        );
        assert!(r.contains("<NewLeaseDuration>50</NewLeaseDuration>"), "{r}");
        let r = call(
            &mut igd,
            &mut t,
            now + Duration::from_secs(60),
            "10.1.0.2",
            &get,
        );
        assert!(r.contains("<errorCode>714</errorCode>"), "expired: {r}");
        call(
            &mut igd,
            &mut t,
            now,
            "10.1.0.2",
            &add("46000", "5555", "10.1.0.2", "60"),
        );
        let del = soap(
            "DeletePortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "46000"),
                ("NewProtocol", "UDP"),
            ],
        );
        let r = call(&mut igd, &mut t, now, "10.1.0.3", &del);
        assert!(
            r.contains("<errorCode>606</errorCode>"),
            "only the owner deletes: {r}"
        );
        let r = call(&mut igd, &mut t, now, "10.1.0.2", &del);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = call(&mut igd, &mut t, now, "10.1.0.2", &del);
        assert!(r.contains("<errorCode>714</errorCode>"), "{r}");
        assert_eq!(
            t.inbound(
                now,
                Protocol::Udp,
                "198.51.100.1:9".parse().expect("addr"),
                ext
            ),
            None
        );
    }

    #[test]
    fn malformed_control_is_a_fault_or_400_never_a_panic() {
        let (mut igd, mut t, now) = setup();
        let mut cases: Vec<Vec<u8>> = vec![
            b"POST /ctl/IPConn HTTP/1.1\r\nContent-Length: zz\r\n\r\n".to_vec(),
            b"POST /ctl/IPConn HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            b"\x00\x01 HTTP/1.1\r\n\r\n".to_vec(),
            b"PUT / HTTP/1.1\r\n\r\n".to_vec(),
            soap("AddPortMapping", &[("NewExternalPort", "x")]),
            soap("AddPortMapping", &[("NewExternalPort", "70000")]),
            soap("Reboot", &[]),
        ];
        let good = add("1", "1", "10.1.0.2", "1");
        for cut in (0..good.len()).step_by(7) {
            let mut b = good.clone();
            b[cut] ^= 0x5a;
            cases.push(b);
        }
        for c in &cases {
            let _ = igd.http(now, &mut t, client("10.1.0.2"), c);
        }
        assert!(parse_soap(b"<a><b></c>").is_none());
        let deep = "<x>".repeat(10_000);
        let _ = parse_soap(deep.as_bytes());
    }
}
