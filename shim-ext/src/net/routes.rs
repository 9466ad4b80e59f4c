//! Host routes and permanent neighbours, run on a namespace thread.

use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

use super::error::{nl_io, Error, Result};
use super::netns::Ctx;
use super::nl;
use super::types::{IpPrefix, LinkId, MacAddr, NeighbourInfo, NeighbourSpec, RouteInfo, RouteSpec, Timing};
use super::validate::validate_route;

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// Whether the message is built to add/replace or to delete a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteVerb {
    Set,
    Delete,
}

/// The `RTM_NEWROUTE` / `RTM_DELROUTE` body for `route` in the main table.
pub(crate) fn route_message(route: &RouteSpec, verb: RouteVerb) -> RouteMessage {
    let dest = route.dest.addr();
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = family(dest);
    h.destination_prefix_length = route.dest.prefix_len();
    h.table = RouteHeader::RT_TABLE_MAIN;
    match verb {
        RouteVerb::Set => {
            h.protocol = route.protocol.map_or(RouteProtocol::Static, RouteProtocol::from);
            h.kind = RouteType::Unicast;
            // What `ip route add` picks: a route without a gateway is
            // link-scoped for IPv4; IPv6 routes are always universe.
            h.scope = if route.gateway.is_none() && dest.is_ipv4() {
                RouteScope::Link
            } else {
                RouteScope::Universe
            };
        }
        RouteVerb::Delete => {
            // Wildcards, as `ip route del` sends: the kernel then matches
            // whatever scope, protocol and type the route was added with.
            h.protocol = RouteProtocol::Unspec;
            h.kind = RouteType::Unspec;
            h.scope = RouteScope::NoWhere;
        }
    }
    if route.onlink {
        h.flags.insert(RouteFlags::Onlink);
    }
    msg.attributes.push(RouteAttribute::Destination(route_addr(dest)));
    if let Some(gw) = route.gateway {
        msg.attributes.push(RouteAttribute::Gateway(route_addr(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(route.dev.index));
    msg
}

/// `ip route add`.
pub(crate) async fn add_route(ctx: &Ctx, route: &RouteSpec) -> Result<()> {
    validate_route(route)?;
    let msg = route_message(route, RouteVerb::Set);
    nl::ack(&ctx.nl, RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_EXCL)
        .await
        .map_err(|source| Error::AddRoute { dest: route.dest, dev: route.dev.clone(), source })
}

/// `ip route replace`: one `RTM_NEWROUTE` with `NLM_F_CREATE|NLM_F_REPLACE`,
/// timed on this thread from just before the send to the ack.
pub(crate) async fn replace_route(ctx: &Ctx, route: &RouteSpec) -> Result<Timing> {
    validate_route(route)?;
    let msg = RouteNetlinkMessage::NewRoute(route_message(route, RouteVerb::Set));
    let sent = SystemTime::now();
    let start = Instant::now();
    let res = nl::ack(&ctx.nl, msg, NLM_F_CREATE | NLM_F_REPLACE).await;
    let elapsed = start.elapsed();
    res.map_err(|source| Error::ReplaceRoute { dest: route.dest, dev: route.dev.clone(), source })?;
    Ok(Timing { sent, elapsed })
}

/// `ip route del`.
pub(crate) async fn delete_route(ctx: &Ctx, route: &RouteSpec) -> Result<()> {
    validate_route(route)?;
    let msg = route_message(route, RouteVerb::Delete);
    nl::ack(&ctx.nl, RouteNetlinkMessage::DelRoute(msg), 0).await.map_err(|source| Error::DeleteRoute {
        dest: route.dest,
        dev: route.dev.clone(),
        source,
    })
}

/// Routes in the main table whose destination is exactly `dest`.
pub(crate) async fn routes(ctx: &Ctx, dest: IpPrefix) -> Result<Vec<RouteInfo>> {
    let mut query = RouteMessage::default();
    query.header.address_family = family(dest.addr());
    let msgs = nl::dump(&ctx.nl, RouteNetlinkMessage::GetRoute(query))
        .await
        .map_err(|source| Error::GetRoutes { dest, source })?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => route_info(&r),
            _ => None,
        })
        .filter(|r| r.dest == dest)
        .collect())
}

/// The main-table route the kernel would pick for `addr` by prefix: the longest one containing
/// it that has an output interface.
pub(crate) async fn route_to(ctx: &Ctx, addr: IpAddr) -> Result<Option<RouteInfo>> {
    let host = IpPrefix::host(addr);
    let mut query = RouteMessage::default();
    query.header.address_family = family(addr);
    let msgs = nl::dump(&ctx.nl, RouteNetlinkMessage::GetRoute(query))
        .await
        .map_err(|source| Error::GetRoutes { dest: host, source })?;
    let all: Vec<RouteInfo> = msgs
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => route_info(&r),
            _ => None,
        })
        .collect();
    Ok(longest_match(&all, addr).cloned())
}

/// The longest-prefix route of `routes` containing `addr` with an output interface.
pub(crate) fn longest_match(routes: &[RouteInfo], addr: IpAddr) -> Option<&RouteInfo> {
    routes.iter().filter(|r| r.oif.is_some() && r.dest.contains(addr)).max_by_key(|r| r.dest.prefix_len())
}

/// A main-table route as [`RouteInfo`]; `None` for other tables.
pub(crate) fn route_info(msg: &RouteMessage) -> Option<RouteInfo> {
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let mut dest = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(d) => dest = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    // A default route has no RTA_DST.
    let dest = dest.or(match msg.header.address_family {
        AddressFamily::Inet => Some(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        AddressFamily::Inet6 => Some(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
        _ => None,
    })?;
    Some(RouteInfo {
        dest: IpPrefix::new(dest, msg.header.destination_prefix_length)?,
        gateway,
        oif,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(msg.header.protocol),
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// `ip neigh replace IP lladdr MAC dev DEV nud permanent`.
pub(crate) async fn replace_neighbour(ctx: &Ctx, n: &NeighbourSpec) -> Result<()> {
    ctx.nl
        .neighbours()
        .add(n.dev.index, n.ip)
        .link_layer_address(&n.mac.octets())
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(|e| Error::ReplaceNeighbour { dev: n.dev.clone(), ip: n.ip, mac: n.mac, source: nl_io(e) })
}

/// `ip neigh del IP dev DEV`.
pub(crate) async fn delete_neighbour(ctx: &Ctx, dev: &LinkId, ip: IpAddr) -> Result<()> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(ip);
    msg.header.ifindex = dev.index;
    msg.attributes.push(NeighbourAttribute::Destination(match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }));
    ctx.nl.neighbours().del(msg).execute().await.map_err(|e| Error::DeleteNeighbour {
        dev: dev.clone(),
        ip,
        source: nl_io(e),
    })
}

/// Neighbour entries on `dev` (both families).
pub(crate) async fn neighbours(ctx: &Ctx, dev: &LinkId) -> Result<Vec<NeighbourInfo>> {
    let msgs: Vec<NeighbourMessage> = ctx
        .nl
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::GetNeighbours { dev: dev.clone(), source: nl_io(e) })?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.ifindex == dev.index)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                _ => None,
            })?;
            let mac = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => MacAddr::from_slice(l),
                _ => None,
            });
            Some(NeighbourInfo { ip, mac, permanent: m.header.state == NeighbourState::Permanent })
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dev() -> LinkId {
        LinkId { index: 5, name: "kt-tnl0".into() }
    }

    #[test]
    fn replace_via_onlink_is_one_complete_message() {
        let r = RouteSpec::via_onlink("10.0.0.5".parse().unwrap(), "192.168.1.2".parse().unwrap(), dev());
        let m = route_message(&r, RouteVerb::Set);
        assert_eq!(m.header.address_family, AddressFamily::Inet);
        assert_eq!(m.header.destination_prefix_length, 32);
        assert_eq!(m.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(
            m.attributes,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet("10.0.0.5".parse().unwrap())),
                RouteAttribute::Gateway(RouteAddress::Inet("192.168.1.2".parse().unwrap())),
                RouteAttribute::Oif(5),
            ]
        );
    }

    #[test]
    fn dev_route_scopes_and_delete_wildcards() {
        let v4 = RouteSpec::dev("10.0.0.5".parse().unwrap(), dev());
        assert_eq!(route_message(&v4, RouteVerb::Set).header.scope, RouteScope::Link);
        let v6 = RouteSpec::dev("fd00::5".parse().unwrap(), dev());
        let m6 = route_message(&v6, RouteVerb::Set);
        assert_eq!(m6.header.scope, RouteScope::Universe);
        assert_eq!(m6.header.destination_prefix_length, 128);
        assert_eq!(m6.header.address_family, AddressFamily::Inet6);
        let del = route_message(&v4, RouteVerb::Delete);
        assert_eq!(del.header.scope, RouteScope::NoWhere);
        assert_eq!(del.header.protocol, RouteProtocol::Unspec);
        assert_eq!(del.header.kind, RouteType::Unspec);
        assert!(!del.header.flags.contains(RouteFlags::Onlink));
    }

    #[test]
    fn route_info_reads_main_table_only() {
        let r = RouteSpec::via_onlink("10.0.0.5".parse().unwrap(), "192.168.1.2".parse().unwrap(), dev());
        let msg = route_message(&r, RouteVerb::Set);
        let info = route_info(&msg).unwrap();
        assert_eq!(info.dest, r.dest);
        assert_eq!(info.gateway, r.gateway);
        assert_eq!(info.oif, Some(5));
        assert!(info.onlink);
        let mut local = msg.clone();
        local.header.table = 255;
        assert!(route_info(&local).is_none());
        let mut big = msg;
        big.header.table = 0;
        big.attributes.push(RouteAttribute::Table(1000));
        assert!(route_info(&big).is_none());
    }
}
