//! Links, addresses and routes over rtnetlink, always from a namespace's own worker thread (a
//! netlink socket acts on the namespace it was opened in), so nothing here can reach the root
//! namespace. One small async function per `ip` verb the lab needs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Largest frame (without FCS) the lab's links carry; segmentation offload is capped so the NAT
/// engine's packet sockets never see a 64 KiB GSO super-frame (see [`add_veth`]).
pub const MTU: u32 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("no link named {0}")]
    NoSuchLink(String),
}

/// A netlink handle for the calling thread's namespace; its connection runs on the current
/// tokio runtime.
pub fn connect() -> Result<Handle, LinkError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

pub async fn index_of(h: &Handle, name: &str) -> Result<u32, LinkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(msg.header.index),
        Ok(None) | Err(_) => Err(LinkError::NoSuchLink(name.to_string())),
    }
}

pub async fn set_up(h: &Handle, name: &str) -> Result<u32, LinkError> {
    let idx = index_of(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await?;
    Ok(idx)
}

/// A bridge with a fixed MAC (a bridge otherwise takes its lowest port's MAC, which would change
/// the NAT engine's address as ports come and go). STP stays off, so ports forward at once. Bridged
/// frames skip netfilter even where br_netfilter is loaded (Docker loads it): a lab's segments are
/// plain wires, and the hook cost was visible in `natscope bench lab` profiles.
pub async fn add_bridge(h: &Handle, name: &str, mac: [u8; 6]) -> Result<u32, LinkError> {
    h.link()
        .add(
            LinkBridge::new(name)
                .nf_call_iptables(false)
                .nf_call_ip6tables(false)
                .nf_call_arptables(false)
                // No MLD snooping: without a querier it only delays neighbor solicitations, and
                // the NAT engine must see every one on its `lan0`.
                .mcast_snooping(false)
                .address(mac.to_vec())
                .mtu(MTU)
                .up()
                .build(),
        )
        .execute()
        .await?;
    index_of(h, name).await
}

/// A veth pair: `local` stays in this namespace, `peer` is created directly inside the namespace
/// open as `peer_ns` — never in the root namespace. Both ends get one-segment GSO: the userspace
/// NAT reads frames with packet sockets, which would otherwise see TCP's 64 KiB super-frames.
pub async fn add_veth(
    h: &Handle,
    local: &str,
    peer: &str,
    peer_ns: RawFd,
) -> Result<(), LinkError> {
    let peer_msg = LinkUnspec::new_with_name(peer)
        .setns_by_fd(peer_ns)
        .mtu(MTU)
        .append_extra_attribute(LinkAttribute::GsoMaxSegs(1))
        .append_extra_attribute(LinkAttribute::GsoMaxSize(MTU))
        .build();
    let msg = LinkVeth::new(local, peer)
        .mtu(MTU)
        .append_extra_attribute(LinkAttribute::GsoMaxSegs(1))
        .append_extra_attribute(LinkAttribute::GsoMaxSize(MTU))
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link().add(msg).execute().await?;
    Ok(())
}

/// Enslaves `port` to `bridge` and brings it up.
pub async fn attach(h: &Handle, port: &str, bridge: &str) -> Result<(), LinkError> {
    let bridge_idx = index_of(h, bridge).await?;
    let idx = index_of(h, port).await?;
    h.link()
        .set(
            LinkUnspec::new_with_index(idx)
                .controller(bridge_idx)
                .up()
                .build(),
        )
        .execute()
        .await?;
    Ok(())
}

pub async fn add_address(h: &Handle, link: &str, ip: Ipv4Addr, len: u8) -> Result<(), LinkError> {
    let idx = index_of(h, link).await?;
    h.address().add(idx, IpAddr::V4(ip), len).execute().await?;
    Ok(())
}

/// A default route: via `gateway`, or — on the internet segment, where every address is on-link
/// — straight out of `link` (the kernel then ARPs for each destination).
pub async fn add_default_route(
    h: &Handle,
    link: &str,
    gateway: Option<Ipv4Addr>,
) -> Result<(), LinkError> {
    let idx = index_of(h, link).await?;
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(idx);
    b = match gateway {
        Some(gw) => b.gateway(gw),
        None => b.scope(RouteScope::Link),
    };
    h.route().add(b.build()).execute().await?;
    Ok(())
}

/// An IPv6 address without duplicate address detection (`nodad`): the lab's plan makes every
/// address unique, and DAD would hold the address tentative for a second or more.
pub async fn add_address6(h: &Handle, link: &str, ip: Ipv6Addr, len: u8) -> Result<(), LinkError> {
    use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
    let idx = index_of(h, link).await?;
    let mut req = h.address().add(idx, IpAddr::V6(ip), len);
    let msg = req.message_mut();
    msg.header.flags |= AddressHeaderFlags::Nodad;
    msg.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    req.execute().await?;
    Ok(())
}

/// An IPv6 route to `prefix` out of `link`: via `gateway`, or on-link when `None` (the kernel
/// then sends a neighbor solicitation for each destination).
pub async fn add_route6(
    h: &Handle,
    link: &str,
    prefix: (Ipv6Addr, u8),
    gateway: Option<Ipv6Addr>,
) -> Result<(), LinkError> {
    let idx = index_of(h, link).await?;
    let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(prefix.0, prefix.1)
        .output_interface(idx);
    if let Some(gw) = gateway {
        b = b.gateway(gw);
    }
    h.route().add(b.build()).execute().await?;
    Ok(())
}
