//! Tunnel link messages (ipip, gre, ip6tnl mode ip6ip6, ip6gre) and reading
//! their endpoints back.
//!
//! netlink-packet-route has typed `IFLA_INFO_DATA` for all four kinds; the
//! tests below decode the emitted bytes with the uapi constants of
//! `include/uapi/linux/if_tunnel.h` so a library change that altered the wire
//! format would fail here rather than in a lab VM.

use std::net::IpAddr;

use netlink_packet_route::link::{InfoData, InfoGre, InfoGre6, InfoIpTunnel, LinkMessage};
use netlink_packet_route::IpProtocol;
use rtnetlink::{LinkGre, LinkGre6, LinkIp6Tnl, LinkIpIp};

use super::error::{is_unsupported_errno, nl_io, Error, Result};
use super::netns::Ctx;
use super::types::{TunnelDetails, TunnelMode, TunnelSpec};
use super::validate::validate_tunnel;

/// The `RTM_NEWLINK` body creating `spec`, already up (`IFF_UP` in the same
/// message). Endpoint families must have been checked by
/// [`validate_tunnel`](super::validate_tunnel); a mismatch here yields `None`.
pub(crate) fn tunnel_message(spec: &TunnelSpec) -> Option<LinkMessage> {
    let msg = match (spec.mode, spec.local, spec.remote) {
        (TunnelMode::Ipip, IpAddr::V4(l), IpAddr::V4(r)) => {
            LinkIpIp::new(&spec.name).local(l).remote(r).ttl(spec.ttl).up().build()
        }
        (TunnelMode::Gre, IpAddr::V4(l), IpAddr::V4(r)) => {
            LinkGre::new(&spec.name).local(l).remote(r).ttl(spec.ttl).up().build()
        }
        (TunnelMode::Ip6ip6, IpAddr::V6(l), IpAddr::V6(r)) => LinkIp6Tnl::new(&spec.name)
            .local(l)
            .remote(r)
            .ttl(spec.ttl)
            // `mode ip6ip6`: IFLA_IPTUN_PROTO = IPPROTO_IPV6. Without it the
            // kernel's ip6tnl accepts both IPv4 and IPv6 inner packets ("any").
            .mode(IpProtocol::Ipv6)
            .up()
            .build(),
        (TunnelMode::Ip6gre, IpAddr::V6(l), IpAddr::V6(r)) => {
            LinkGre6::new(&spec.name).local(l).remote(r).ttl(spec.ttl).up().build()
        }
        _ => return None,
    };
    Some(msg)
}

/// Endpoints from a link's `IFLA_INFO_DATA`, for the tunnel kinds above.
pub(crate) fn tunnel_details(data: &InfoData) -> Option<TunnelDetails> {
    let mut out = TunnelDetails::default();
    match data {
        InfoData::IpTunnel(attrs) => {
            for a in attrs {
                match a {
                    InfoIpTunnel::Local(ip) => out.local = Some(*ip),
                    InfoIpTunnel::Remote(ip) => out.remote = Some(*ip),
                    InfoIpTunnel::Ttl(t) => out.ttl = Some(*t),
                    _ => {}
                }
            }
        }
        InfoData::GreTun(attrs) => {
            for a in attrs {
                match a {
                    InfoGre::Local(ip) => out.local = Some(IpAddr::V4(*ip)),
                    InfoGre::Remote(ip) => out.remote = Some(IpAddr::V4(*ip)),
                    InfoGre::Ttl(t) => out.ttl = Some(*t),
                    _ => {}
                }
            }
        }
        InfoData::GreTun6(attrs) => {
            for a in attrs {
                match a {
                    InfoGre6::Local(ip) => out.local = Some(IpAddr::V6(*ip)),
                    InfoGre6::Remote(ip) => out.remote = Some(IpAddr::V6(*ip)),
                    InfoGre6::Ttl(t) => out.ttl = Some(*t),
                    _ => {}
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Creates a tunnel link (up); an unknown kind becomes [`Error::Unsupported`].
pub(crate) async fn create_tunnel(ctx: &Ctx, spec: &TunnelSpec) -> Result<()> {
    validate_tunnel(spec)?;
    let Some(msg) = tunnel_message(spec) else {
        return Err(Error::InvalidTunnel {
            name: spec.name.clone(),
            mode: spec.mode,
            reason: "endpoint family does not fit the mode",
        });
    };
    let what = spec.mode.feature();
    ctx.nl.link().add(msg).execute().await.map_err(|e| {
        let source = nl_io(e);
        match source.raw_os_error() {
            Some(errno) if is_unsupported_errno(what, errno) => Error::Unsupported { what, source },
            _ => Error::CreateTunnel {
                name: spec.name.clone(),
                mode: spec.mode,
                local: spec.local,
                remote: spec.remote,
                source,
            },
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{Emitable, NlasIterator};

    // include/uapi/linux/if_link.h
    /// `IFLA_IFNAME`.
    const IFLA_IFNAME: u16 = 3;
    /// `IFLA_LINKINFO`.
    const IFLA_LINKINFO: u16 = 18;
    /// `IFLA_INFO_KIND`.
    const IFLA_INFO_KIND: u16 = 1;
    /// `IFLA_INFO_DATA`.
    const IFLA_INFO_DATA: u16 = 2;
    /// `IFF_UP` (`include/uapi/linux/if.h`).
    const IFF_UP: u32 = 1;

    // include/uapi/linux/if_tunnel.h, enum { IFLA_IPTUN_* } (ipip, ip6tnl)
    /// `IFLA_IPTUN_LOCAL`.
    const IFLA_IPTUN_LOCAL: u16 = 2;
    /// `IFLA_IPTUN_REMOTE`.
    const IFLA_IPTUN_REMOTE: u16 = 3;
    /// `IFLA_IPTUN_TTL`.
    const IFLA_IPTUN_TTL: u16 = 4;
    /// `IFLA_IPTUN_PROTO`.
    const IFLA_IPTUN_PROTO: u16 = 9;

    // include/uapi/linux/if_tunnel.h, enum { IFLA_GRE_* } (gre, ip6gre)
    /// `IFLA_GRE_LOCAL`.
    const IFLA_GRE_LOCAL: u16 = 6;
    /// `IFLA_GRE_REMOTE`.
    const IFLA_GRE_REMOTE: u16 = 7;
    /// `IFLA_GRE_TTL`.
    const IFLA_GRE_TTL: u16 = 8;

    /// `IPPROTO_IPV6` (`include/uapi/linux/in.h`).
    const IPPROTO_IPV6: u8 = 41;

    /// What the emitted message says, decoded by hand.
    #[derive(Debug, Default)]
    struct Decoded {
        up: bool,
        name: String,
        kind: String,
        data: Vec<(u16, Vec<u8>)>,
    }

    fn decode(msg: &LinkMessage) -> Decoded {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        // struct ifinfomsg is 16 bytes; flags at offset 8.
        let flags = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        let mut out = Decoded { up: flags & IFF_UP != 0, ..Default::default() };
        for nla in NlasIterator::new(&buf[16..]) {
            let nla = nla.unwrap();
            match nla.kind() {
                IFLA_IFNAME => {
                    out.name =
                        String::from_utf8(nla.value().to_vec()).unwrap().trim_end_matches('\0').to_owned()
                }
                IFLA_LINKINFO => {
                    for info in NlasIterator::new(nla.value()) {
                        let info = info.unwrap();
                        match info.kind() {
                            IFLA_INFO_KIND => {
                                out.kind = String::from_utf8(info.value().to_vec())
                                    .unwrap()
                                    .trim_end_matches('\0')
                                    .to_owned()
                            }
                            IFLA_INFO_DATA => {
                                for d in NlasIterator::new(info.value()) {
                                    let d = d.unwrap();
                                    out.data.push((d.kind(), d.value().to_vec()));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn attr(d: &Decoded, kind: u16) -> Vec<u8> {
        d.data
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("attribute {kind} missing in {d:?}"))
    }

    fn spec(mode: TunnelMode, local: &str, remote: &str) -> TunnelSpec {
        TunnelSpec {
            name: "kt-tnl0".into(),
            mode,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            ttl: 64,
        }
    }

    #[test]
    fn ipip_encoding() {
        let d = decode(&tunnel_message(&spec(TunnelMode::Ipip, "192.0.2.1", "198.51.100.2")).unwrap());
        assert_eq!((d.kind.as_str(), d.name.as_str(), d.up), ("ipip", "kt-tnl0", true));
        assert_eq!(attr(&d, IFLA_IPTUN_LOCAL), [192, 0, 2, 1]);
        assert_eq!(attr(&d, IFLA_IPTUN_REMOTE), [198, 51, 100, 2]);
        assert_eq!(attr(&d, IFLA_IPTUN_TTL), [64]);
    }

    #[test]
    fn gre_encoding() {
        let d = decode(&tunnel_message(&spec(TunnelMode::Gre, "192.0.2.1", "198.51.100.2")).unwrap());
        assert_eq!((d.kind.as_str(), d.up), ("gre", true));
        assert_eq!(attr(&d, IFLA_GRE_LOCAL), [192, 0, 2, 1]);
        assert_eq!(attr(&d, IFLA_GRE_REMOTE), [198, 51, 100, 2]);
        assert_eq!(attr(&d, IFLA_GRE_TTL), [64]);
    }

    #[test]
    fn ip6ip6_encoding() {
        let d = decode(&tunnel_message(&spec(TunnelMode::Ip6ip6, "2001:db8::1", "2001:db8::2")).unwrap());
        assert_eq!((d.kind.as_str(), d.up), ("ip6tnl", true));
        let l: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let r: std::net::Ipv6Addr = "2001:db8::2".parse().unwrap();
        assert_eq!(attr(&d, IFLA_IPTUN_LOCAL), l.octets());
        assert_eq!(attr(&d, IFLA_IPTUN_REMOTE), r.octets());
        assert_eq!(attr(&d, IFLA_IPTUN_TTL), [64]);
        assert_eq!(attr(&d, IFLA_IPTUN_PROTO), [IPPROTO_IPV6]);
    }

    #[test]
    fn ip6gre_encoding() {
        let d = decode(&tunnel_message(&spec(TunnelMode::Ip6gre, "2001:db8::1", "2001:db8::2")).unwrap());
        assert_eq!((d.kind.as_str(), d.up), ("ip6gre", true));
        let l: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(attr(&d, IFLA_GRE_LOCAL), l.octets());
        assert_eq!(attr(&d, IFLA_GRE_REMOTE).len(), 16);
        assert_eq!(attr(&d, IFLA_GRE_TTL), [64]);
    }

    #[test]
    fn family_mismatch_builds_nothing() {
        assert!(tunnel_message(&spec(TunnelMode::Ipip, "2001:db8::1", "2001:db8::2")).is_none());
        assert!(tunnel_message(&spec(TunnelMode::Ip6gre, "192.0.2.1", "192.0.2.2")).is_none());
    }

    #[test]
    fn details_read_back_from_typed_data() {
        let msg = tunnel_message(&spec(TunnelMode::Gre, "192.0.2.1", "198.51.100.2")).unwrap();
        let data = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                netlink_packet_route::link::LinkAttribute::LinkInfo(infos) => {
                    infos.iter().find_map(|i| match i {
                        netlink_packet_route::link::LinkInfo::Data(d) => Some(d.clone()),
                        _ => None,
                    })
                }
                _ => None,
            })
            .unwrap();
        let det = tunnel_details(&data).unwrap();
        assert_eq!(det.local, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(det.remote, Some("198.51.100.2".parse().unwrap()));
        assert_eq!(det.ttl, Some(64));
    }
}
