//! Plain values that cross the [`NetOps`](super::NetOps) boundary.
//!
//! They are owned, comparable and printable so that the recording fake can
//! store them and tests can assert on them without a kernel.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// An Ethernet hardware address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six bytes, in wire order.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Builds an address from a netlink attribute payload; `None` unless it is
    /// exactly six bytes (tunnels report 4- or 16-byte "addresses").
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(bytes).ok().map(Self)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text was not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six colon-separated hex octets)")]
pub struct ParseMacError(String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| ParseMacError(s.to_owned()))?;
            if part.is_empty() || part.len() > 2 {
                return Err(ParseMacError(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.to_owned()));
        }
        Ok(Self(out))
    }
}

/// An address with a prefix length, e.g. `10.0.0.5/32` or `fd00::5/128`.
///
/// Construction checks only that the length fits the family; host routes
/// additionally need [`IpPrefix::is_host`] (see
/// [`validate_host_prefix`](super::validate_host_prefix)).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

/// The prefix length does not fit the address family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an IP prefix: {reason}")]
pub struct ParsePrefixError {
    text: String,
    reason: &'static str,
}

impl IpPrefix {
    /// A prefix of `len` bits; `None` when `len` exceeds 32 (IPv4) or 128 (IPv6).
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        (len <= max_prefix_len(addr)).then_some(Self { addr, len })
    }

    /// The host prefix of `addr`: /32 for IPv4, /128 for IPv6.
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, len: max_prefix_len(addr) }
    }

    /// The address part.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` is inside this prefix (always false across families).
    pub fn contains(&self, addr: IpAddr) -> bool {
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.addr.is_ipv4() != addr.is_ipv4() {
            return false;
        }
        // IPv4 sits in the top 32 bits, so one mask of the top `len` bits fits both families.
        let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
        bits(self.addr) & mask == bits(addr) & mask
    }

    /// Whether this is a /32 (IPv4) or /128 (IPv6).
    pub fn is_host(&self) -> bool {
        self.len == max_prefix_len(self.addr)
    }
}

/// 32 for IPv4, 128 for IPv6.
pub(crate) fn max_prefix_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for IpPrefix {
    type Err = ParsePrefixError;

    /// Parses `ADDR/LEN`; a bare address is its host prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParsePrefixError { text: s.to_owned(), reason };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("bad address"))?;
        match len {
            None => Ok(Self::host(addr)),
            Some(l) => {
                let len: u8 = l.parse().map_err(|_| err("bad prefix length"))?;
                Self::new(addr, len).ok_or_else(|| err("prefix length too long for the family"))
            }
        }
    }
}

/// A link as the kernel names it in one namespace: the index is what netlink
/// messages carry, the name is what errors and logs show.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinkId {
    /// Interface index (`ifindex`), valid in the namespace it was read from.
    pub index: u32,
    /// Interface name.
    pub name: String,
}

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (ifindex {})", self.name, self.index)
    }
}

/// Operational state as `IFLA_OPERSTATE` reports it (RFC 2863).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperState {
    /// Carrier and admin state say the link passes traffic.
    Up,
    /// The link does not pass traffic.
    Down,
    /// The lower device is down (e.g. a veth whose peer is down).
    LowerLayerDown,
    /// The driver does not report a state (taps without a reader, loopback).
    Unknown,
    /// Any other RFC 2863 state.
    Other,
}

/// What `IFLA_INFO_DATA` of a tun/tap device says (`if_link.h` `IFLA_TUN_*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunDetails {
    /// `IFF_TAP` rather than `IFF_TUN`.
    pub tap: bool,
    /// The device outlives the file descriptor that created it.
    pub persistent: bool,
    /// Created with `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
    /// Created with `IFF_VNET_HDR`.
    pub vnet_hdr: bool,
    /// Attached queues (file descriptors), e.g. QEMU's.
    pub queues: u32,
}

/// Endpoints of a tunnel link as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelDetails {
    /// Local (source) address, when set.
    pub local: Option<IpAddr>,
    /// Remote (destination) address, when set.
    pub remote: Option<IpAddr>,
    /// Outer TTL / hop limit; 0 means inherit.
    pub ttl: Option<u8>,
}

/// A link looked up by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Index and name.
    pub id: LinkId,
    /// Hardware address, when the link has a 6-byte one.
    pub mac: Option<MacAddr>,
    /// MTU in bytes.
    pub mtu: u32,
    /// `txqueuelen`: packets the device queue accepts before dropping.
    pub txqueuelen: u32,
    /// Administratively up (`IFF_UP`).
    pub admin_up: bool,
    /// Operational state.
    pub oper: OperState,
    /// `IFLA_INFO_KIND` (`veth`, `tun`, `ipip`, `gre`, `ip6tnl`, `ip6gre`, …);
    /// `None` for physical devices and loopback.
    pub kind: Option<String>,
    /// Tun/tap specifics, when `kind` is `tun`.
    pub tun: Option<TunDetails>,
    /// Tunnel endpoints, for the tunnel kinds this module creates.
    pub tunnel: Option<TunnelDetails>,
}

/// A veth pair to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Name of the end that stays in the handle's namespace.
    pub name: String,
    /// Name of the other end.
    pub peer: String,
    /// Namespace (by path) that receives the peer; `None` keeps it here.
    pub peer_netns: Option<PathBuf>,
}

/// A persistent tap to create, as QEMU will open it.
///
/// The flags must match what QEMU asks for when it attaches (`queues=N` means
/// `IFF_MULTI_QUEUE`, `vnet_hdr=on` means `IFF_VNET_HDR`), else `TUNSETIFF`
/// in QEMU fails with `EINVAL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    /// Interface name, e.g. `tap0_kata`.
    pub name: String,
    /// `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
    /// `IFF_VNET_HDR`.
    pub vnet_hdr: bool,
}

impl TapSpec {
    /// The flags Kata's QEMU uses: `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE`.
    pub fn kata(name: impl Into<String>) -> Self {
        Self { name: name.into(), multi_queue: true, vnet_hdr: true }
    }
}

/// A host route in the main table: `PREFIX [via GW] dev DEV [onlink]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination; /32 or /128 for a VM.
    pub dest: IpPrefix,
    /// Next hop, same family as `dest`.
    pub gateway: Option<IpAddr>,
    /// Output device. Carried as an index so that the cutover's replace is a
    /// single message with no name lookup in front of it.
    pub dev: LinkId,
    /// `RTNH_F_ONLINK`: the gateway is reachable on `dev` without a covering
    /// connected route (needed for a next hop across a tunnel).
    pub onlink: bool,
    /// The route's protocol (`RTPROT_*`); `None` is `static`, katamaran's own. A route put
    /// back keeps the protocol it had, so a CNI daemon that owns it still recognises it.
    pub protocol: Option<u8>,
}

impl RouteSpec {
    /// `dest dev DEV`.
    pub fn dev(dest: IpPrefix, dev: LinkId) -> Self {
        Self { dest, gateway: None, dev, onlink: false, protocol: None }
    }

    /// `dest via GW dev DEV onlink`.
    pub fn via_onlink(dest: IpPrefix, gateway: IpAddr, dev: LinkId) -> Self {
        Self { dest, gateway: Some(gateway), dev, onlink: true, protocol: None }
    }
}

/// A route read back from the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination prefix.
    pub dest: IpPrefix,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface index, if any.
    pub oif: Option<u32>,
    /// Whether `RTNH_F_ONLINK` is set.
    pub onlink: bool,
    /// The route's protocol (`RTPROT_*`).
    pub protocol: u8,
}

/// How a namespace reaches an address: the main-table route it uses (the longest prefix that
/// contains the address and has an output interface) and that interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTo {
    /// The route.
    pub route: RouteInfo,
    /// Its output interface.
    pub link: LinkInfo,
}

impl PathTo {
    /// Whether the route is a local pod's own: a host route (/32, /128) straight (no next hop)
    /// to a veth, as calico or cilium route each pod to its end of the pair. A next hop, a
    /// tunnel, a subnet on the node's uplink lead elsewhere.
    pub fn is_pod_route(&self) -> bool {
        self.route.gateway.is_none() && self.route.dest.is_host() && self.link.kind.as_deref() == Some("veth")
    }

    /// Whether the route is a pod subnet behind a bridge (`cni0`, as the bridge and flannel CNIs
    /// do): the address is a local pod's if it answers there ([`Self::answers_on_bridge`]).
    pub fn is_pod_subnet(&self) -> bool {
        self.route.gateway.is_none() && self.link.kind.as_deref() == Some("bridge")
    }

    /// Whether `addr` has a resolved neighbour entry among `neighbours` (the bridge's): a live
    /// pod answered for it. A paused VM's address, whose pod no longer answers, has none.
    pub fn answers_on_bridge(addr: IpAddr, neighbours: &[NeighbourInfo]) -> bool {
        neighbours.iter().any(|n| n.ip == addr && n.mac.is_some())
    }
}

/// A permanent neighbour entry: `IP lladdr MAC dev DEV nud permanent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourSpec {
    /// Device the entry belongs to.
    pub dev: LinkId,
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its hardware address.
    pub mac: MacAddr,
}

/// A neighbour entry read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourInfo {
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its hardware address, when resolved.
    pub mac: Option<MacAddr>,
    /// `NUD_PERMANENT`.
    pub permanent: bool,
}

/// Tunnel encapsulations the cutover can forward through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TunnelMode {
    /// IPv4-in-IPv4 (`ipip`, module `ipip`).
    Ipip,
    /// GRE over IPv4 (`gre`, module `ip_gre`).
    Gre,
    /// IPv6-in-IPv6 (`ip6tnl mode ip6ip6`, module `ip6_tunnel`).
    Ip6ip6,
    /// GRE over IPv6 (`ip6gre`, module `ip6_gre`).
    Ip6gre,
}

impl TunnelMode {
    /// Whether the outer (underlay) addresses are IPv6.
    pub fn outer_is_ipv6(self) -> bool {
        matches!(self, Self::Ip6ip6 | Self::Ip6gre)
    }

    /// The `IFLA_INFO_KIND` string.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Ipip => "ipip",
            Self::Gre => "gre",
            Self::Ip6ip6 => "ip6tnl",
            Self::Ip6gre => "ip6gre",
        }
    }

    /// The kernel capability this mode needs.
    pub fn feature(self) -> Feature {
        match self {
            Self::Ipip => Feature::Ipip,
            Self::Gre => Feature::Gre,
            Self::Ip6ip6 => Feature::Ip6Tnl,
            Self::Ip6gre => Feature::Ip6Gre,
        }
    }
}

impl fmt::Display for TunnelMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipip => "ipip",
            Self::Gre => "gre",
            Self::Ip6ip6 => "ip6ip6",
            Self::Ip6gre => "ip6gre",
        })
    }
}

/// A point-to-point tunnel link to create (and set up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// Interface name.
    pub name: String,
    /// Encapsulation.
    pub mode: TunnelMode,
    /// Local underlay address (this node).
    pub local: IpAddr,
    /// Remote underlay address (the peer node).
    pub remote: IpAddr,
    /// Outer TTL / hop limit; 0 inherits the inner one.
    pub ttl: u8,
}

/// Where a qdisc hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QdiscParent {
    /// The device's root (egress) qdisc — where a plug goes.
    Root,
    /// The ingress qdisc (`ffff:`).
    Ingress,
}

impl fmt::Display for QdiscParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Root => "root",
            Self::Ingress => "ingress",
        })
    }
}

/// Queue counters of a qdisc (`TCA_STATS2`/`TCA_STATS_QUEUE`, else `TCA_STATS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QdiscStats {
    /// Packets queued now.
    pub qlen: u32,
    /// Bytes queued now.
    pub backlog_bytes: u32,
    /// Packets dropped since the qdisc was created.
    pub drops: u32,
    /// Packets sent (dequeued) since the qdisc was created.
    pub packets: u32,
}

/// A qdisc read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QdiscInfo {
    /// `TCA_KIND`, e.g. `plug`, `ingress`, `noqueue`.
    pub kind: String,
    /// Its counters.
    pub stats: QdiscStats,
}

/// A `sch_plug` command (`pkt_sched.h` `TCQ_PLUG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlugAction {
    /// `TCQ_PLUG_BUFFER`: start a new buffer; packets are held.
    Buffer,
    /// `TCQ_PLUG_RELEASE_ONE`: release up to the previous buffer boundary
    /// (not one packet).
    ReleaseOne,
    /// `TCQ_PLUG_RELEASE_INDEFINITE`: release everything and pass through.
    ReleaseIndefinite,
}

impl fmt::Display for PlugAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Buffer => "buffer",
            Self::ReleaseOne => "release one",
            Self::ReleaseIndefinite => "release indefinite",
        })
    }
}

/// Kernel capabilities the production path needs (decision 7 lists the
/// fallbacks when they are missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// `sch_plug` qdisc.
    Plug,
    /// `ipip` links.
    Ipip,
    /// `gre` links (`ip_gre`).
    Gre,
    /// `ip6tnl` links (`ip6_tunnel`).
    Ip6Tnl,
    /// `ip6gre` links (`ip6_gre`).
    Ip6Gre,
}

impl Feature {
    /// Every feature, in probe order.
    pub const ALL: [Feature; 5] =
        [Feature::Plug, Feature::Ipip, Feature::Gre, Feature::Ip6Tnl, Feature::Ip6Gre];
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plug => "sch_plug",
            Self::Ipip => "ipip",
            Self::Gre => "gre (ip_gre)",
            Self::Ip6Tnl => "ip6tnl (ip6_tunnel)",
            Self::Ip6Gre => "ip6gre (ip6_gre)",
        })
    }
}

/// When a netlink request was sent and how long the kernel took to ack it,
/// measured on the namespace thread (no channel hop included).
///
/// `sent` is wall-clock so it can be compared with QMP event timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Wall-clock time just before the request was written.
    pub sent: SystemTime,
    /// Request written → ack read.
    pub elapsed: Duration,
}

impl Timing {
    /// Wall-clock time the ack was read.
    pub fn acked(&self) -> SystemTime {
        self.sent + self.elapsed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prefix_contains_by_family_and_length() {
        let p = |s: &str| s.parse::<IpPrefix>().unwrap();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        for (prefix, addr, inside) in [
            ("10.201.0.0/24", "10.201.0.12", true),
            ("10.201.0.0/24", "10.201.1.12", false),
            ("10.201.0.12/32", "10.201.0.12", true),
            ("10.201.0.12/32", "10.201.0.13", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("0.0.0.0/0", "fd00::1", false),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("fd00:201::/64", "fd00:201::12", true),
            ("fd00:201::/64", "fd00:202::12", false),
            ("::/0", "fd00::1", true),
            ("::/0", "10.0.0.1", false),
            ("fd00:201::12/128", "fd00:201::12", true),
        ] {
            assert_eq!(p(prefix).contains(a(addr)), inside, "{prefix} contains {addr}");
        }
    }

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: MacAddr = "02:00:0a:0B:00:ff".parse().unwrap();
        assert_eq!(mac.octets(), [2, 0, 0x0a, 0x0b, 0, 0xff]);
        assert_eq!(mac.to_string(), "02:00:0a:0b:00:ff");
        for bad in [
            "",
            "02:00:0a:0b:00",
            "02:00:0a:0b:00:ff:01",
            "02:00:0a:0b:00:fff",
            "zz:00:00:00:00:00",
            "02::0a:0b:00:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(MacAddr::from_slice(&[1, 2, 3, 4]), None);
    }

    #[test]
    fn prefix_parse_and_host() {
        let cases: &[(&str, Option<&str>, bool)] = &[
            ("10.0.0.5", Some("10.0.0.5/32"), true),
            ("10.0.0.0/24", Some("10.0.0.0/24"), false),
            ("fd00::5", Some("fd00::5/128"), true),
            ("fd00::/64", Some("fd00::/64"), false),
            ("10.0.0.5/33", None, false),
            ("fd00::5/129", None, false),
            ("10.0.0.5/x", None, false),
            ("nope/32", None, false),
        ];
        for (text, want, host) in cases {
            let got = text.parse::<IpPrefix>();
            match want {
                Some(w) => {
                    let p = got.unwrap();
                    assert_eq!(p.to_string(), *w);
                    assert_eq!(p.is_host(), *host, "{text}");
                }
                None => assert!(got.is_err(), "{text} parsed"),
            }
        }
    }
}
