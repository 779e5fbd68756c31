//! UPnP IGD (Internet Gateway Device) client codec, sans-IO: the SSDP search and its answer, the
//! minimal HTTP/1.1 the device description and SOAP control need, the description's service
//! choice (WANIPConnection:2, then :1, then WANPPPConnection:1) and the SOAP actions
//! GetExternalIPAddress, AddPortMapping, AddAnyPortMapping and DeletePortMapping (issue 12). The
//! driver (`natscope_probes::upnp`) owns the sockets and the clock.
//!
//! Every parser takes bytes from the network and returns a typed value or a typed error: none
//! panics, and each is bounded ([`MAX_SSDP`], [`MAX_HTTP`], [`MAX_HEADER`]); XML is parsed with
//! `roxmltree` (no DTD entity expansion beyond its own limits, no network). The fuzz target
//! `igd_parse` runs them all ([`fuzz`]).
//!
//! # Why hand-written (evaluated December 2026)
//!
//! `igd-next` 0.17.1 (the last release our rust-version 1.85 can build; 0.18 needs 1.88) finds
//! WANIPConnection:2 and WANPPPConnection:1 control URLs but sends every action with the
//! `WANIPConnection:1` service type in SOAPAction and the body's namespace, which a strict IGD
//! rejects for the other two services; it reads description and SOAP bodies without a size
//! limit, follows any SSDP answerer's LOCATION, does not say which service it found, and brings
//! hyper, hyper-util and a second `rand` (0.10) for a handful of fixed HTTP exchanges. The part
//! worth a crate is XML, which `roxmltree` does.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::MapProtocol;

/// The SSDP port and multicast group (UPnP Device Architecture 1.1, §1.3.2).
pub const SSDP_PORT: u16 = 1900;
pub const SSDP_MULTICAST: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
/// Largest SSDP answer parsed (one datagram; real ones are ~300 bytes).
pub const MAX_SSDP: usize = 2048;
/// Largest HTTP response (header and body) read from a gateway.
pub const MAX_HTTP: usize = 64 * 1024;
/// Largest HTTP header block.
pub const MAX_HEADER: usize = 8 * 1024;
/// What the search asks for: both IGD versions (a v2 device also answers v1, not every v1 device
/// answers v2).
pub const SEARCH_TARGETS: [&str; 2] = [
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
];

/// Why a gateway's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgdError {
    #[error("ssdp answer: {0}")]
    Ssdp(&'static str),
    #[error("url: {0}")]
    Url(&'static str),
    #[error("http: {0}")]
    Http(&'static str),
    #[error("http status {0}")]
    Status(u16),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("xml: {0}")]
    Xml(String),
    #[error("the device description has no WANIPConnection or WANPPPConnection service")]
    NoService,
    #[error("the response lacks {0}")]
    Missing(&'static str),
    #[error("{0} is not a valid value")]
    BadValue(&'static str),
    #[error("the gateway refused: UPnP error {code} ({description})")]
    Fault { code: u16, description: String },
}

/// The WAN connection services natscope drives, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IgdService {
    WanIpConnection2,
    WanIpConnection1,
    WanPppConnection1,
}

impl IgdService {
    pub const ALL: [Self; 3] = [
        Self::WanIpConnection2,
        Self::WanIpConnection1,
        Self::WanPppConnection1,
    ];
    pub fn urn(self) -> &'static str {
        match self {
            Self::WanIpConnection2 => "urn:schemas-upnp-org:service:WANIPConnection:2",
            Self::WanIpConnection1 => "urn:schemas-upnp-org:service:WANIPConnection:1",
            Self::WanPppConnection1 => "urn:schemas-upnp-org:service:WANPPPConnection:1",
        }
    }
    fn from_urn(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.urn() == s.trim())
    }
    /// AddAnyPortMapping exists only in WANIPConnection:2.
    pub fn has_add_any(self) -> bool {
        self == Self::WanIpConnection2
    }
}

/// An `http://a.b.c.d[:port]/path` URL. Only IPv4 literals: a gateway names itself by address,
/// and a name would need a resolver the probe does not trust for this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: Ipv4Addr,
    pub port: u16,
    /// Absolute path with query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(s: &str) -> Result<Self, IgdError> {
        let s = s.trim();
        let rest = strip_prefix_ci(s, "http://").ok_or(IgdError::Url("not http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(IgdError::Url("userinfo"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| IgdError::Url("bad port"))?),
            None => (authority, 80),
        };
        let host = host
            .parse()
            .map_err(|_| IgdError::Url("host is not an IPv4 address"))?;
        if port == 0 {
            return Err(IgdError::Url("port 0"));
        }
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(IgdError::Url("control character or space in path"));
        }
        Ok(Self {
            host,
            port,
            path: path.to_string(),
        })
    }

    /// `reference` resolved against `self` (absolute URL, absolute path or relative path).
    pub fn join(&self, reference: &str) -> Result<Self, IgdError> {
        let r = reference.trim();
        if strip_prefix_ci(r, "http://").is_some() {
            return Self::parse(r);
        }
        if r.contains("://") {
            return Err(IgdError::Url("not http://"));
        }
        let path = if r.starts_with('/') {
            r.to_string()
        } else {
            let dir = self.path.rsplit_once('/').map_or("", |(d, _)| d);
            format!("{dir}/{r}")
        };
        Self::parse(&format!("http://{}:{}{}", self.host, self.port, path))
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// An SSDP M-SEARCH for `st` (UDA 1.1 §1.3.2). `MX` 1: the probe waits ~250 ms, not seconds.
pub fn search_request(st: &str) -> Vec<u8> {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\n\
         MX: 1\r\nST: {st}\r\nUSER-AGENT: natscope UPnP/1.1\r\n\r\n"
    )
    .into_bytes()
}

/// What an SSDP answer says: where the device description is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchResponse {
    pub location: HttpUrl,
    pub st: Option<String>,
}

/// Parses an SSDP search answer (`HTTP/1.1 200 OK` with a LOCATION header).
pub fn parse_search_response(bytes: &[u8]) -> Result<SearchResponse, IgdError> {
    if bytes.len() > MAX_SSDP {
        return Err(IgdError::TooLarge(MAX_SSDP));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| IgdError::Ssdp("not utf-8"))?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let status = lines.next().ok_or(IgdError::Ssdp("empty"))?;
    let mut parts = status.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/1.") => {}
        _ => return Err(IgdError::Ssdp("not an HTTP/1.x 200 answer")),
    }
    let mut location = None;
    let mut st = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("location") {
            location = Some(HttpUrl::parse(value)?);
        } else if name.eq_ignore_ascii_case("st") {
            st = Some(value.trim().to_string());
        }
    }
    Ok(SearchResponse {
        location: location.ok_or(IgdError::Ssdp("no LOCATION"))?,
        st,
    })
}

fn host_header(url: &HttpUrl) -> String {
    if url.port == 80 {
        url.host.to_string()
    } else {
        format!("{}:{}", url.host, url.port)
    }
}

/// `GET url` (the device description), asking the gateway to close the connection after it.
pub fn http_get(url: &HttpUrl) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: natscope\r\n\r\n",
        url.path,
        host_header(url)
    )
    .into_bytes()
}

/// A SOAP action of a WAN connection service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    GetExternalIpAddress,
    AddPortMapping {
        protocol: MapProtocol,
        external_port: u16,
        internal_port: u16,
        internal_client: Ipv4Addr,
        description: String,
        lease_s: u32,
    },
    AddAnyPortMapping {
        protocol: MapProtocol,
        external_port: u16,
        internal_port: u16,
        internal_client: Ipv4Addr,
        description: String,
        lease_s: u32,
    },
    DeletePortMapping {
        protocol: MapProtocol,
        external_port: u16,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Self::GetExternalIpAddress => "GetExternalIPAddress",
            Self::AddPortMapping { .. } => "AddPortMapping",
            Self::AddAnyPortMapping { .. } => "AddAnyPortMapping",
            Self::DeletePortMapping { .. } => "DeletePortMapping",
        }
    }
}

fn proto_word(p: MapProtocol) -> &'static str {
    match p {
        MapProtocol::Udp => "UDP",
        MapProtocol::Tcp => "TCP",
    }
}

/// `s` as XML character data (the client's SOAP arguments and the lab gateway's answers).
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The SOAP envelope of `action` for `service`.
pub fn soap_body(service: IgdService, action: &Action) -> String {
    let mut args = String::new();
    let mut arg = |name: &str, value: &str| {
        // Writing to a String cannot fail.
        let _ = write!(args, "<{name}>{}</{name}>", xml_escape(value));
    };
    match action {
        Action::GetExternalIpAddress => {}
        Action::AddPortMapping {
            protocol,
            external_port,
            internal_port,
            internal_client,
            description,
            lease_s,
        }
        | Action::AddAnyPortMapping {
            protocol,
            external_port,
            internal_port,
            internal_client,
            description,
            lease_s,
        } => {
            arg("NewRemoteHost", "");
            arg("NewExternalPort", &external_port.to_string());
            arg("NewProtocol", proto_word(*protocol));
            arg("NewInternalPort", &internal_port.to_string());
            arg("NewInternalClient", &internal_client.to_string());
            arg("NewEnabled", "1");
            arg("NewPortMappingDescription", description);
            arg("NewLeaseDuration", &lease_s.to_string());
        }
        Action::DeletePortMapping {
            protocol,
            external_port,
        } => {
            arg("NewRemoteHost", "");
            arg("NewExternalPort", &external_port.to_string());
            arg("NewProtocol", proto_word(*protocol));
        }
    }
    format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{name} xmlns:u=\"{urn}\">{args}</u:{name}></s:Body></s:Envelope>\r\n",
        name = action.name(),
        urn = service.urn(),
    )
}

/// The HTTP POST carrying `action` to the service's control URL.
pub fn http_soap(url: &HttpUrl, service: IgdService, action: &Action) -> Vec<u8> {
    let body = soap_body(service, action);
    format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: natscope\r\n\
         Content-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: \"{}#{}\"\r\n\
         Content-Length: {}\r\n\r\n{body}",
        url.path,
        host_header(url),
        service.urn(),
        action.name(),
        body.len()
    )
    .into_bytes()
}

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Parses the bytes read so far; `eof`: the peer closed. `Ok(None)`: read more. Handles
/// Content-Length, chunked transfer coding and read-to-close bodies, within [`MAX_HTTP`].
pub fn parse_http_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>, IgdError> {
    if buf.len() > MAX_HTTP {
        return Err(IgdError::TooLarge(MAX_HTTP));
    }
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEADER {
            return Err(IgdError::TooLarge(MAX_HEADER));
        }
        return if eof {
            Err(IgdError::Http("connection closed inside the header"))
        } else {
            Ok(None)
        };
    };
    if head_end > MAX_HEADER {
        return Err(IgdError::TooLarge(MAX_HEADER));
    }
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| IgdError::Http("header is not utf-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(IgdError::Http("no status line"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(IgdError::Http("not HTTP/1.x"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or(IgdError::Http("bad status code"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(IgdError::Http("header line without a colon"));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| IgdError::Http("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(IgdError::Http("conflicting Content-Length"));
            }
            if n > MAX_HTTP {
                return Err(IgdError::TooLarge(MAX_HTTP));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .to_ascii_lowercase()
                .split(',')
                .any(|c| c.trim() == "chunked");
        }
    }
    let body = &buf[head_end + 4..];
    if chunked {
        return match dechunk(body)? {
            Some(body) => Ok(Some(HttpResponse { status, body })),
            None if eof => Err(IgdError::Http("connection closed inside a chunked body")),
            None => Ok(None),
        };
    }
    match length {
        Some(n) if body.len() >= n => Ok(Some(HttpResponse {
            status,
            body: body[..n].to_vec(),
        })),
        Some(_) if eof => Err(IgdError::Http(
            "connection closed before Content-Length bytes",
        )),
        Some(_) => Ok(None),
        None if eof => Ok(Some(HttpResponse {
            status,
            body: body.to_vec(),
        })),
        None => Ok(None),
    }
}

/// A chunked body's data, or `None` while the last chunk has not arrived.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, IgdError> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&rest[..line_end]).map_err(|_| IgdError::Http("bad chunk size"))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_hex, 16).map_err(|_| IgdError::Http("bad chunk size"))?;
        if size > MAX_HTTP {
            return Err(IgdError::TooLarge(MAX_HTTP));
        }
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err(IgdError::Http("chunk not followed by CRLF"));
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `body` as an XML document, DTDs refused, at most [`MAX_HTTP`] bytes: the one XML reader of
/// both IGD directions (this client and the lab gateway, `super::igd_server`).
pub(crate) fn parse_xml(body: &[u8]) -> Result<roxmltree::Document<'_>, IgdError> {
    if body.len() > MAX_HTTP {
        return Err(IgdError::TooLarge(MAX_HTTP));
    }
    let text = std::str::from_utf8(body).map_err(|_| IgdError::Xml("not utf-8".into()))?;
    // Real gateways put whitespace (and sometimes a BOM) before the declaration.
    let text = text.trim_start_matches('\u{feff}').trim_start();
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(text, opts).map_err(|e| IgdError::Xml(e.to_string()))
}

/// The trimmed text of `n`'s first child element named `name`.
fn child_text<'a>(n: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
        .and_then(|c| c.text())
        .map(str::trim)
}

/// The control endpoint natscope talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub service: IgdService,
    pub url: HttpUrl,
}

/// Picks the preferred WAN connection service of a device description fetched from `location`.
pub fn parse_description(body: &[u8], location: &HttpUrl) -> Result<Control, IgdError> {
    let doc = parse_xml(body)?;
    let base = match doc
        .root_element()
        .children()
        .find(|c| c.is_element() && c.tag_name().name() == "URLBase")
        .and_then(|c| c.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        Some(b) => HttpUrl::parse(b)?,
        None => location.clone(),
    };
    let mut best: Option<(IgdService, &str)> = None;
    for service in doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "service")
    {
        let Some(kind) = child_text(service, "serviceType").and_then(IgdService::from_urn) else {
            continue;
        };
        let Some(control) = child_text(service, "controlURL").filter(|c| !c.is_empty()) else {
            continue;
        };
        if best.is_none_or(|(b, _)| kind < b) {
            best = Some((kind, control));
        }
    }
    let (service, control) = best.ok_or(IgdError::NoService)?;
    Ok(Control {
        service,
        url: base.join(control)?,
    })
}

/// The output arguments of a successful action, or the gateway's UPnP error.
pub fn parse_soap_response(
    response: &HttpResponse,
    action: &str,
) -> Result<Vec<(String, String)>, IgdError> {
    let doc = parse_xml(&response.body).map_err(|e| match response.status {
        200 => e,
        s => IgdError::Status(s),
    })?;
    let body = doc
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "Body")
        .ok_or(IgdError::Missing("SOAP Body"))?;
    if let Some(fault) = body
        .children()
        .find(|n| n.is_element() && n.tag_name().name() == "Fault")
    {
        let find = |name: &str| {
            fault
                .descendants()
                .find(|n| n.is_element() && n.tag_name().name() == name)
                .and_then(|n| n.text())
                .map(str::trim)
        };
        let code = find("errorCode")
            .and_then(|c| c.parse().ok())
            .ok_or(IgdError::Missing("UPnPError errorCode"))?;
        let description: String = find("errorDescription")
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return Err(IgdError::Fault { code, description });
    }
    if response.status != 200 {
        return Err(IgdError::Status(response.status));
    }
    let want = format!("{action}Response");
    let answer = body
        .children()
        .find(|n| n.is_element() && n.tag_name().name() == want)
        .ok_or(IgdError::Missing("the action's Response element"))?;
    Ok(answer
        .children()
        .filter(|n| n.is_element())
        .take(32)
        .map(|n| {
            (
                n.tag_name().name().to_string(),
                n.text().unwrap_or("").trim().chars().take(256).collect(),
            )
        })
        .collect())
}

/// NewExternalIPAddress of a GetExternalIPAddress answer.
pub fn external_address(args: &[(String, String)]) -> Result<Ipv4Addr, IgdError> {
    let v = arg(args, "NewExternalIPAddress")?;
    v.parse()
        .map_err(|_| IgdError::BadValue("NewExternalIPAddress"))
}

/// NewReservedPort of an AddAnyPortMapping answer.
pub fn reserved_port(args: &[(String, String)]) -> Result<u16, IgdError> {
    let v = arg(args, "NewReservedPort")?;
    v.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or(IgdError::BadValue("NewReservedPort"))
}

fn arg<'a>(args: &'a [(String, String)], name: &'static str) -> Result<&'a str, IgdError> {
    args.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .ok_or(IgdError::Missing(name))
}

/// Runs every parser on `data` (the fuzz target `igd_parse`): none may panic, and whatever
/// parses as a URL joins and prints without panicking.
pub fn fuzz(data: &[u8]) {
    let _ = parse_search_response(data);
    for eof in [false, true] {
        if let Ok(Some(r)) = parse_http_response(data, eof) {
            let _ = parse_soap_response(&r, "AddAnyPortMapping");
        }
    }
    let location = HttpUrl {
        host: Ipv4Addr::new(192, 168, 1, 1),
        port: 5000,
        path: "/rootDesc.xml".into(),
    };
    if let Ok(c) = parse_description(data, &location) {
        let _ = http_soap(&c.url, c.service, &Action::GetExternalIpAddress);
    }
    let r = HttpResponse {
        status: 200,
        body: data.to_vec(),
    };
    if let Ok(args) = parse_soap_response(&r, "GetExternalIPAddress") {
        let _ = external_address(&args);
        let _ = reserved_port(&args);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = HttpUrl::parse(s) {
            let _ = u.join(s);
            let _ = http_get(&u);
        }
        let _ = location.join(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIPTION: &str = r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337">
<specVersion><major>1</major><minor>1</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType>
<serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType><controlURL>/ctl/PPP</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>/ctl/IPConn</controlURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>"#;

    fn loc() -> HttpUrl {
        HttpUrl::parse("http://10.1.0.1:5000/rootDesc.xml").expect("url")
    }

    #[test]
    fn ssdp_answer_gives_the_location() {
        let a = b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\nUSN: uuid:x\r\nEXT:\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\nLOCATION: http://10.1.0.1:5000/rootDesc.xml\r\n\r\n";
        let r = parse_search_response(a).expect("parses");
        assert_eq!(r.location, loc());
        assert_eq!(
            r.st.as_deref(),
            Some("urn:schemas-upnp-org:device:InternetGatewayDevice:2")
        );
        for bad in [
            &b"NOTIFY * HTTP/1.1\r\nLOCATION: http://10.1.0.1/\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nLOCATION: http://router.lan/\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nLOCATION: ftp://10.0.0.1/\r\n\r\n",
            b"\xff\xfe",
            b"",
        ] {
            assert!(parse_search_response(bad).is_err(), "{bad:?}");
        }
        assert!(parse_search_response(&[b'a'; MAX_SSDP + 1]).is_err());
    }

    #[test]
    fn description_prefers_wanipconnection_2_and_resolves_the_control_url() {
        let c = parse_description(DESCRIPTION.as_bytes(), &loc()).expect("parses");
        assert_eq!(c.service, IgdService::WanIpConnection2);
        assert_eq!(
            c.url,
            HttpUrl::parse("http://10.1.0.1:5000/ctl/IPConn").expect("url")
        );
        let ppp_only = DESCRIPTION.replace("WANIPConnection:2", "Other:1");
        let c = parse_description(ppp_only.as_bytes(), &loc()).expect("parses");
        assert_eq!(c.service, IgdService::WanPppConnection1);
        let none = ppp_only.replace("WANPPPConnection:1", "Other:1");
        assert_eq!(
            parse_description(none.as_bytes(), &loc()),
            Err(IgdError::NoService)
        );
        assert!(parse_description(b"<root><unclosed>", &loc()).is_err());
        let dtd = "<?xml version=\"1.0\"?><!DOCTYPE r [<!ENTITY a \"aaaa\">]><r>&a;</r>";
        assert!(parse_description(dtd.as_bytes(), &loc()).is_err());
    }

    #[test]
    fn relative_and_absolute_control_urls() {
        let base = loc();
        assert_eq!(base.join("ctl/x").expect("joins").path, "/ctl/x");
        assert_eq!(base.join("/a?b=1").expect("joins").path, "/a?b=1");
        let abs = base.join("http://10.1.0.1:49000/upnp").expect("joins");
        assert_eq!((abs.port, abs.path.as_str()), (49000, "/upnp"));
        assert!(base.join("https://10.1.0.1/").is_err());
        assert!(HttpUrl::parse("http://10.1.0.1:0/").is_err());
        assert!(HttpUrl::parse("http://10.1.0.1:99999/").is_err());
        assert!(HttpUrl::parse("http://u@10.1.0.1/").is_err());
        assert!(HttpUrl::parse("http://10.1.0.1/a b").is_err());
    }

    #[test]
    fn soap_request_names_the_service_it_talks_to() {
        let url = HttpUrl::parse("http://10.1.0.1:5000/ctl/PPP").expect("url");
        let req = http_soap(
            &url,
            IgdService::WanPppConnection1,
            &Action::DeletePortMapping {
                protocol: MapProtocol::Udp,
                external_port: 4242,
            },
        );
        let text = String::from_utf8(req).expect("utf-8");
        assert!(
            text.starts_with("POST /ctl/PPP HTTP/1.1\r\nHost: 10.1.0.1:5000\r\n"),
            "{text}"
        );
        assert!(text.contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANPPPConnection:1#DeletePortMapping\""
        ));
        assert!(text.contains("xmlns:u=\"urn:schemas-upnp-org:service:WANPPPConnection:1\""));
        assert!(
            text.contains("<NewExternalPort>4242</NewExternalPort><NewProtocol>UDP</NewProtocol>")
        );
        let (head, body) = text.split_once("\r\n\r\n").expect("header end");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let add = soap_body(
            IgdService::WanIpConnection2,
            &Action::AddAnyPortMapping {
                protocol: MapProtocol::Tcp,
                external_port: 1,
                internal_port: 2,
                internal_client: Ipv4Addr::new(10, 1, 0, 2),
                description: "a<b&\"c\"\n".into(),
                lease_s: 60,
            },
        );
        assert!(
            add.contains(
                "<NewPortMappingDescription>a&lt;b&amp;&quot;c&quot;</NewPortMappingDescription>"
            ),
            "{add}"
        );
    }

    fn http(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn http_bodies_by_length_chunks_and_close() {
        let full = http("200 OK", "hello");
        for cut in 0..full.len() {
            assert_eq!(
                parse_http_response(&full[..cut], false),
                Ok(None),
                "cut {cut}"
            );
            assert!(
                parse_http_response(&full[..cut], true).is_err(),
                "cut {cut}"
            );
        }
        let r = parse_http_response(&full, false)
            .expect("ok")
            .expect("complete");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n";
        let r = parse_http_response(chunked, false)
            .expect("ok")
            .expect("complete");
        assert_eq!(r.body, b"hello");
        assert_eq!(parse_http_response(&chunked[..60], false), Ok(None));
        let close = b"HTTP/1.0 200 OK\r\n\r\nhel";
        assert_eq!(parse_http_response(close, false), Ok(None));
        assert_eq!(
            parse_http_response(close, true)
                .expect("ok")
                .expect("complete")
                .body,
            b"hel"
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
            b"SIP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(
                parse_http_response(bad, true).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_http_response(&vec![b'a'; MAX_HTTP + 1], false),
            Err(IgdError::TooLarge(MAX_HTTP))
        );
        assert_eq!(
            parse_http_response(&vec![b'a'; MAX_HEADER + 1], false),
            Err(IgdError::TooLarge(MAX_HEADER))
        );
    }

    #[test]
    fn soap_answers_and_faults() {
        let ok = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">
<NewExternalIPAddress>203.0.114.1</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>"#;
        let r = parse_http_response(&http("200 OK", ok), true)
            .expect("ok")
            .expect("complete");
        let args = parse_soap_response(&r, "GetExternalIPAddress").expect("answer");
        assert_eq!(external_address(&args), Ok(Ipv4Addr::new(203, 0, 114, 1)));
        assert!(
            parse_soap_response(&r, "AddAnyPortMapping").is_err(),
            "another action's answer"
        );
        let fault = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>
<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>
<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>"#;
        let r = parse_http_response(&http("500 Internal Server Error", fault), true)
            .expect("ok")
            .expect("complete");
        assert_eq!(
            parse_soap_response(&r, "AddPortMapping"),
            Err(IgdError::Fault {
                code: 718,
                description: "ConflictInMappingEntry".into()
            })
        );
        let r = HttpResponse {
            status: 500,
            body: b"<html>oops".to_vec(),
        };
        assert_eq!(
            parse_soap_response(&r, "AddPortMapping"),
            Err(IgdError::Status(500))
        );
        let bad_ip = ok.replace("203.0.114.1", "not-an-ip");
        let r = parse_http_response(&http("200 OK", &bad_ip), true)
            .expect("ok")
            .expect("complete");
        let args = parse_soap_response(&r, "GetExternalIPAddress").expect("answer");
        assert!(external_address(&args).is_err());
        assert!(reserved_port(&[("NewReservedPort".into(), "0".into())]).is_err());
        assert_eq!(
            reserved_port(&[("NewReservedPort".into(), "4242".into())]),
            Ok(4242)
        );
    }

    #[test]
    fn fuzz_entry_survives_samples() {
        for sample in [
            DESCRIPTION.as_bytes(),
            b"HTTP/1.1 200 OK\r\nLOCATION: http://1.2.3.4:1/x\r\n\r\n",
            b"http://1.2.3.4:80/../..",
            b"",
            &[0xff; 40],
        ] {
            fuzz(sample);
        }
    }
}
