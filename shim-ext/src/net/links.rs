//! Links and addresses, run on a namespace thread.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage, State,
};
use rtnetlink::packet_core::Nla;
use rtnetlink::{AddressMessageBuilder, LinkUnspec, LinkVeth};

use super::error::{nl_io, Error, Result};
use super::netns::Ctx;
use super::tap::create_persistent_tap;
use super::tunnel::tunnel_details;
use super::types::{IpPrefix, LinkId, LinkInfo, MacAddr, OperState, TapSpec, TunDetails, VethSpec};
use super::validate::validate_ifname;

// include/uapi/linux/if_link.h, enum { IFLA_TUN_* }: netlink-packet-route
// keeps tun's IFLA_INFO_DATA as opaque attributes.
/// `IFLA_TUN_TYPE` (u8: `IFF_TUN` = 1, `IFF_TAP` = 2).
const IFLA_TUN_TYPE: u16 = 3;
/// `IFLA_TUN_VNET_HDR` (u8 bool).
const IFLA_TUN_VNET_HDR: u16 = 5;
/// `IFLA_TUN_PERSIST` (u8 bool).
const IFLA_TUN_PERSIST: u16 = 6;
/// `IFLA_TUN_MULTI_QUEUE` (u8 bool).
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
/// `IFLA_TUN_NUM_QUEUES` (u32).
const IFLA_TUN_NUM_QUEUES: u16 = 8;
/// `IFF_TAP` as `IFLA_TUN_TYPE` reports it.
const TUN_TYPE_TAP: u8 = 2;

/// Looks a link up by name.
pub(crate) async fn get_link(ctx: &Ctx, name: &str) -> Result<LinkInfo> {
    validate_ifname(name)?;
    let found = ctx.nl.link().get().match_name(name).execute().try_next().await.map_err(nl_io);
    let not_found = |source| Error::LinkNotFound { name: name.to_owned(), source };
    match found {
        Ok(Some(msg)) => Ok(link_info(&msg)),
        Ok(None) => Err(not_found(io::Error::from_raw_os_error(libc::ENODEV))),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(not_found(e)),
        Err(source) => Err(Error::GetLink { name: name.to_owned(), source }),
    }
}

/// Looks a link up by its index.
pub(crate) async fn get_link_by_index(ctx: &Ctx, index: u32) -> Result<LinkInfo> {
    let found = ctx.nl.link().get().match_index(index).execute().try_next().await.map_err(nl_io);
    let name = format!("ifindex {index}");
    match found {
        Ok(Some(msg)) => Ok(link_info(&msg)),
        Ok(None) => Err(Error::LinkNotFound { name, source: io::Error::from_raw_os_error(libc::ENODEV) }),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(Error::LinkNotFound { name, source: e }),
        Err(source) => Err(Error::GetLink { name, source }),
    }
}

/// Reads what callers need from an `RTM_NEWLINK` reply.
pub(crate) fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        id: LinkId { index: msg.header.index, name: String::new() },
        mac: None,
        mtu: 0,
        txqueuelen: 0,
        admin_up: msg.header.flags.contains(LinkFlags::Up),
        oper: OperState::Unknown,
        kind: None,
        tun: None,
        tunnel: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.id.name = n.clone(),
            LinkAttribute::Address(a) => info.mac = MacAddr::from_slice(a),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            LinkAttribute::TxQueueLen(l) => info.txqueuelen = *l,
            LinkAttribute::OperState(s) => {
                info.oper = match s {
                    State::Up => OperState::Up,
                    State::Down => OperState::Down,
                    State::LowerLayerDown => OperState::LowerLayerDown,
                    State::Unknown => OperState::Unknown,
                    _ => OperState::Other,
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => info.kind = Some(kind_name(k)),
                        NlLinkInfo::Data(InfoData::Tun(attrs)) => {
                            info.tun = Some(tun_details(attrs.iter().map(|a| (a.kind(), nla_value(a)))))
                        }
                        NlLinkInfo::Data(d) => info.tunnel = tunnel_details(d),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

fn kind_name(kind: &InfoKind) -> String {
    kind.to_string()
}

fn nla_value(nla: &impl Nla) -> Vec<u8> {
    let mut buf = vec![0u8; nla.value_len()];
    nla.emit_value(&mut buf);
    buf
}

/// Decodes tun's `IFLA_INFO_DATA` attributes (kind, payload).
pub(crate) fn tun_details(attrs: impl Iterator<Item = (u16, Vec<u8>)>) -> TunDetails {
    let mut out = TunDetails::default();
    let flag = |v: &[u8]| v.first().is_some_and(|b| *b != 0);
    for (kind, value) in attrs {
        match kind {
            IFLA_TUN_TYPE => out.tap = value.first() == Some(&TUN_TYPE_TAP),
            IFLA_TUN_VNET_HDR => out.vnet_hdr = flag(&value),
            IFLA_TUN_PERSIST => out.persistent = flag(&value),
            IFLA_TUN_MULTI_QUEUE => out.multi_queue = flag(&value),
            IFLA_TUN_NUM_QUEUES => {
                if let Ok(b) = <[u8; 4]>::try_from(value.as_slice()) {
                    out.queues = u32::from_ne_bytes(b);
                }
            }
            _ => {}
        }
    }
    out
}

async fn change(ctx: &Ctx, msg: LinkMessage) -> io::Result<()> {
    ctx.nl.link().change(msg).execute().await.map_err(nl_io)
}

/// `ip link set DEV up|down`.
pub(crate) async fn set_state(ctx: &Ctx, link: &LinkId, up: bool) -> Result<()> {
    let b = LinkUnspec::new_with_index(link.index);
    let msg = if up { b.up() } else { b.down() }.build();
    change(ctx, msg).await.map_err(|source| Error::SetLinkState { link: link.clone(), up, source })
}

/// `ip link set DEV mtu N`.
pub(crate) async fn set_mtu(ctx: &Ctx, link: &LinkId, mtu: u32) -> Result<()> {
    let msg = LinkUnspec::new_with_index(link.index).mtu(mtu).build();
    change(ctx, msg).await.map_err(|source| Error::SetMtu { link: link.clone(), mtu, source })
}

/// `ip link set DEV txqueuelen N`.
pub(crate) async fn set_txqueuelen(ctx: &Ctx, link: &LinkId, len: u32) -> Result<()> {
    let msg = LinkUnspec::new_with_index(link.index).txqueuelen(len).build();
    change(ctx, msg).await.map_err(|source| Error::SetTxQueueLen { link: link.clone(), len, source })
}

/// `ip link set DEV address MAC`.
pub(crate) async fn set_mac(ctx: &Ctx, link: &LinkId, mac: MacAddr) -> Result<()> {
    let msg = LinkUnspec::new_with_index(link.index).address(mac.octets().to_vec()).build();
    change(ctx, msg).await.map_err(|source| Error::SetMac { link: link.clone(), mac, source })
}

fn open_ns(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::OpenNetns { path: path.to_owned(), source })
}

/// `ip link add NAME type veth peer name PEER [netns NS]`; returns the local end.
pub(crate) async fn create_veth(ctx: &Ctx, spec: &VethSpec) -> Result<LinkId> {
    validate_ifname(&spec.name)?;
    validate_ifname(&spec.peer)?;
    // Kept open until the kernel has answered: the message carries its fd.
    let peer_ns = spec.peer_netns.as_deref().map(open_ns).transpose()?;
    let mut builder = LinkVeth::new(&spec.name, &spec.peer);
    if let Some(ns) = &peer_ns {
        let peer = LinkUnspec::new_with_name(&spec.peer).setns_by_fd(ns.as_raw_fd()).build();
        builder = builder.set_info_data(InfoData::Veth(InfoVeth::Peer(peer)));
    }
    ctx.nl.link().add(builder.build()).execute().await.map_err(|e| Error::CreateVeth {
        name: spec.name.clone(),
        peer: spec.peer.clone(),
        source: nl_io(e),
    })?;
    drop(peer_ns);
    Ok(get_link(ctx, &spec.name).await?.id)
}

/// `ip link del DEV`.
pub(crate) async fn delete_link(ctx: &Ctx, link: &LinkId) -> Result<()> {
    ctx.nl
        .link()
        .del(link.index)
        .execute()
        .await
        .map_err(|e| Error::DeleteLink { link: link.clone(), source: nl_io(e) })
}

/// `ip link set DEV netns NS`.
pub(crate) async fn move_link(ctx: &Ctx, link: &LinkId, netns: &Path) -> Result<()> {
    let ns = open_ns(netns)?;
    let msg = LinkUnspec::new_with_index(link.index).setns_by_fd(ns.as_raw_fd()).build();
    let res = change(ctx, msg).await;
    drop(ns);
    res.map_err(|source| Error::MoveLink { link: link.clone(), netns: netns.to_owned(), source })
}

/// Creates a persistent tap in this thread's namespace; returns its id.
pub(crate) async fn create_tap(ctx: &Ctx, spec: &TapSpec) -> Result<LinkId> {
    // A few syscalls, run inline: this thread is the namespace.
    create_persistent_tap(spec)?;
    Ok(get_link(ctx, &spec.name).await?.id)
}

/// `ip addr add ADDR/LEN dev DEV`.
pub(crate) async fn add_address(ctx: &Ctx, link: &LinkId, addr: IpPrefix) -> Result<()> {
    ctx.nl
        .address()
        .add(link.index, addr.addr(), addr.prefix_len())
        .execute()
        .await
        .map_err(|e| Error::AddAddress { link: link.clone(), addr, source: nl_io(e) })
}

/// `ip addr del ADDR/LEN dev DEV`.
pub(crate) async fn delete_address(ctx: &Ctx, link: &LinkId, addr: IpPrefix) -> Result<()> {
    let msg = match addr.addr() {
        IpAddr::V4(a) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(link.index)
            .address(a, addr.prefix_len())
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(link.index)
            .address(a, addr.prefix_len())
            .build(),
    };
    ctx.nl.address().del(msg).execute().await.map_err(|e| Error::DeleteAddress {
        link: link.clone(),
        addr,
        source: nl_io(e),
    })
}

/// Addresses on a link (both families).
pub(crate) async fn addresses(ctx: &Ctx, link: &LinkId) -> Result<Vec<IpPrefix>> {
    let msgs: Vec<AddressMessage> = ctx
        .nl
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::GetAddresses { link: link.clone(), source: nl_io(e) })?;
    Ok(msgs.iter().filter(|m| m.header.index == link.index).filter_map(address_of).collect())
}

fn address_of(msg: &AddressMessage) -> Option<IpPrefix> {
    // IPv4 puts the interface's own address in IFA_LOCAL (IFA_ADDRESS is the
    // peer on point-to-point links); IPv6 only sends IFA_ADDRESS.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    IpPrefix::new(local.or(address)?, msg.header.prefix_len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tun_details_decode_the_uapi_attributes() {
        let attrs = vec![
            (IFLA_TUN_TYPE, vec![TUN_TYPE_TAP]),
            (4, vec![0]), // IFLA_TUN_PI
            (IFLA_TUN_VNET_HDR, vec![1]),
            (IFLA_TUN_PERSIST, vec![1]),
            (IFLA_TUN_MULTI_QUEUE, vec![1]),
            (IFLA_TUN_NUM_QUEUES, 2u32.to_ne_bytes().to_vec()),
        ];
        let d = tun_details(attrs.into_iter());
        assert_eq!(
            d,
            TunDetails { tap: true, persistent: true, multi_queue: true, vnet_hdr: true, queues: 2 }
        );
        let tun = tun_details(vec![(IFLA_TUN_TYPE, vec![1]), (IFLA_TUN_PERSIST, vec![0])].into_iter());
        assert!(!tun.tap && !tun.persistent);
    }

    #[test]
    fn link_info_reads_the_reply() {
        let mut msg = LinkMessage::default();
        msg.header.index = 9;
        msg.header.flags = LinkFlags::Up;
        msg.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::Mtu(1450),
            LinkAttribute::TxQueueLen(10_000),
            LinkAttribute::OperState(State::LowerLayerDown),
            LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(InfoKind::Veth)]),
        ];
        let info = link_info(&msg);
        assert_eq!(info.id, LinkId { index: 9, name: "eth0".into() });
        assert_eq!(info.mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!((info.mtu, info.txqueuelen, info.admin_up), (1450, 10_000, true));
        assert_eq!(info.oper, OperState::LowerLayerDown);
        assert_eq!(info.kind.as_deref(), Some("veth"));
        assert!(info.tun.is_none() && info.tunnel.is_none());
    }
}
