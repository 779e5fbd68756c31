//! The router's NAT-PMP and PCP service, frame in, frame out, on a virtual clock.

use std::time::Duration;

use natscope_core::portmap::{natpmp, pcp, MapProtocol, PortMappingService as S};

use super::*;

const SERVICE: &str = "10.0.0.1:5351";

fn with(services: &[S], m: M, f: F) -> Router {
    let mut c = cfg(m, f);
    c.port_mapping = services.to_vec();
    router(c)
}

/// The host sends `request` to the router's port-mapping service; returns the answer's payload.
fn ask(r: &mut Router, now: Instant, from: &str, request: &[u8]) -> Option<Vec<u8>> {
    let out = step(
        r,
        now,
        Port::Lan,
        &from_host(&udp_dg(ep(from), ep(SERVICE), request)),
    );
    out.first().map(|e| {
        let s = seen(e);
        assert_eq!(
            (s.port, s.src, s.dst, s.dst_mac),
            (Port::Lan, ep(SERVICE), ep(from), HOST_MAC)
        );
        s.l4[8..].to_vec()
    })
}

fn natpmp_map(port: u16, lifetime: u32) -> Vec<u8> {
    natpmp::Request::Map {
        protocol: MapProtocol::Udp,
        internal_port: port,
        suggested_external_port: port,
        lifetime,
    }
    .encode()
}

#[test]
fn natpmp_maps_a_symmetric_nat_port_for_anyone_until_deleted() {
    let t0 = Instant::now();
    let mut r = with(
        &[S::NatPmp],
        M::AddressAndPortDependent,
        F::AddressAndPortDependent,
    );
    let answer = ask(&mut r, t0, HOST, &natpmp::Request::ExternalAddress.encode()).expect("answer");
    assert_eq!(
        natpmp::Response::parse(&answer),
        Ok(natpmp::Response::ExternalAddress {
            result: natpmp::ResultCode::Success,
            epoch: 0,
            address: EXT
        })
    );
    let answer = ask(&mut r, t0, HOST, &natpmp_map(5000, 60)).expect("answer");
    let Ok(natpmp::Response::Map {
        result: natpmp::ResultCode::Success,
        external_port,
        lifetime: 60,
        ..
    }) = natpmp::Response::parse(&answer)
    else {
        panic!("not a successful map: {answer:?}");
    };
    let ext = SocketAddrV4::new(EXT, external_port);
    // Nobody was ever sent to, the filter is port-restricted, and still a stranger gets in.
    assert_eq!(
        send_in(&mut r, t0 + Duration::from_secs(1), S1, ext),
        Some(ep(HOST))
    );
    // Outbound traffic of the mapped endpoint leaves through the mapping, whatever the remote.
    assert_eq!(send_out(&mut r, t0, HOST, "198.51.100.7:9"), ext);
    let rows = r.mappings(t0);
    assert!(rows
        .iter()
        .any(|m| m.requested_by == Some(S::NatPmp) && m.external == SocketAddr::V4(ext)));
    ask(
        &mut r,
        t0 + Duration::from_secs(2),
        HOST,
        &natpmp_map(5000, 0),
    )
    .expect("answer");
    assert_eq!(
        send_in(&mut r, t0 + Duration::from_secs(3), S1, ext),
        None,
        "deleted"
    );
    assert_eq!(r.stats().port_mapping_answered, 3);
}

#[test]
fn a_mapping_expires_with_its_lifetime() {
    let t0 = Instant::now();
    let mut r = with(
        &[S::NatPmp, S::Pcp],
        M::EndpointIndependent,
        F::AddressAndPortDependent,
    );
    ask(&mut r, t0, HOST, &natpmp_map(5000, 10)).expect("answer");
    let ext = ep("203.0.113.1:5000");
    assert_eq!(
        send_in(&mut r, t0 + Duration::from_secs(9), S1, ext),
        Some(ep(HOST))
    );
    assert_eq!(send_in(&mut r, t0 + Duration::from_secs(10), S1, ext), None);
}

#[test]
fn pcp_map_refuses_a_taken_port_and_reports_address_mismatch() {
    let t0 = Instant::now();
    let mut r = with(&[S::Pcp], M::EndpointIndependent, F::EndpointIndependent);
    let map = |client: &str, nonce: u8| {
        pcp::Request {
            lifetime: 120,
            client_address: client.parse().expect("ip"),
            op: pcp::RequestOp::Map(pcp::MapRequest {
                nonce: pcp::Nonce([nonce; 12]),
                protocol: 17,
                internal_port: 5000,
                suggested_external_port: 6000,
                suggested_external_address: pcp::ANY_V4,
            }),
            options: vec![],
        }
        .encode()
        .expect("encodes")
    };
    let first = pcp::Response::parse(&ask(&mut r, t0, HOST, &map("10.0.0.2", 1)).expect("answer"))
        .expect("pcp");
    let pcp::ResponseOp::Map(a) = first.op else {
        panic!("{first:?}")
    };
    assert_eq!(
        (first.result, a.assigned_external_port),
        (pcp::ResultCode::Success, 6000)
    );
    // The second host's request comes from its own MAC/IP.
    let out = step(
        &mut r,
        t0,
        Port::Lan,
        &eth(
            LAN_MAC,
            HOST2_MAC,
            EtherTypes::Ipv4,
            &udp_dg(ep("10.0.0.3:5000"), ep(SERVICE), &map("10.0.0.3", 2)),
        ),
    );
    let second = pcp::Response::parse(&seen(&out[0]).l4[8..]).expect("pcp");
    let pcp::ResponseOp::Map(b) = second.op else {
        panic!("{second:?}")
    };
    assert_eq!(second.result, pcp::ResultCode::Success);
    assert_ne!(
        b.assigned_external_port, 6000,
        "a taken port is never given twice"
    );
    let wrong =
        pcp::Response::parse(&ask(&mut r, t0, HOST, &map("192.168.9.9", 1)).expect("answer"))
            .expect("pcp");
    assert_eq!(wrong.result, pcp::ResultCode::AddressMismatch);
}

#[test]
fn without_the_knob_the_router_stays_silent() {
    let t0 = Instant::now();
    let mut r = with(&[], M::EndpointIndependent, F::EndpointIndependent);
    assert_eq!(
        ask(&mut r, t0, HOST, &natpmp::Request::ExternalAddress.encode()),
        None
    );
    assert_eq!(r.stats().dropped_unroutable, 1);
}

#[test]
fn upnp_mappings_land_in_the_engine_table_and_expire() {
    use natscope_core::portmap::igd_server::Http;
    let t0 = Instant::now();
    let mut r = with(
        &[S::Upnp],
        M::AddressAndPortDependent,
        F::AddressAndPortDependent,
    );
    assert!(r.serves_upnp());
    let body = "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body>\
        <u:AddPortMapping xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\"><NewRemoteHost></NewRemoteHost>\
        <NewExternalPort>7000</NewExternalPort><NewProtocol>UDP</NewProtocol><NewInternalPort>5000</NewInternalPort>\
        <NewInternalClient>10.0.0.2</NewInternalClient><NewEnabled>1</NewEnabled>\
        <NewPortMappingDescription>x</NewPortMappingDescription><NewLeaseDuration>5</NewLeaseDuration>\
        </u:AddPortMapping></s:Body></s:Envelope>";
    let req = format!(
        "POST /ctl/IPConn HTTP/1.1\r\nContent-Length: {}\r\nSOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping\"\r\n\r\n{body}",
        body.len()
    );
    let client = SocketAddr::V4(ep("10.0.0.2:40000"));
    let Http::Respond(answer) = r.upnp_http(t0, client, req.as_bytes()) else {
        panic!("no answer");
    };
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let ext = ep("203.0.113.1:7000");
    assert_eq!(
        send_in(&mut r, t0 + Duration::from_secs(4), S1, ext),
        Some(ep(HOST))
    );
    assert!(r
        .mappings(t0)
        .iter()
        .any(|m| m.requested_by == Some(S::Upnp)));
    assert_eq!(
        send_in(&mut r, t0 + Duration::from_secs(5), S1, ext),
        None,
        "lease over"
    );
    // A router without the knob answers no UPnP.
    let mut plain = with(&[S::NatPmp], M::EndpointIndependent, F::EndpointIndependent);
    assert!(!plain.serves_upnp());
    assert!(
        matches!(plain.upnp_http(t0, client, req.as_bytes()), Http::Respond(b) if b.starts_with(b"HTTP/1.1 404"))
    );
    assert_eq!(
        plain.upnp_ssdp(
            t0,
            b"M-SEARCH * HTTP/1.1\r\nMAN: \"ssdp:discover\"\r\nST: ssdp:all\r\n\r\n"
        ),
        None
    );
}
