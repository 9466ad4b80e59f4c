//! The netlink room's error type.
//!
//! Every variant is one failure site and names the operation and its object;
//! the kernel's answer (an errno) is the `#[source]`, as a [`std::io::Error`],
//! so callers can ask [`Error::errno`] and the chain prints e.g.
//! "could not replace route 10.0.0.5/32 dev tap0_kata (ifindex 4): No such
//! device (os error 19)".

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use super::types::{Feature, IpPrefix, LinkId, MacAddr, PlugAction, QdiscParent, TunnelMode};

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the netlink room.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- validation (pure) ---
    /// An interface name the kernel would refuse.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidIfName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A network namespace path outside the allowed roots or not well formed.
    #[error("invalid network namespace path {path:?}: {reason}")]
    InvalidNetnsPath {
        /// The rejected path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A route whose prefix or gateway does not fit (family, host length).
    #[error("invalid route to {dest}: {reason}")]
    InvalidRoute {
        /// The route's destination.
        dest: IpPrefix,
        /// Why.
        reason: &'static str,
    },
    /// A tunnel whose endpoints do not fit its mode.
    #[error("invalid {mode} tunnel {name:?}: {reason}")]
    InvalidTunnel {
        /// Tunnel name.
        name: String,
        /// Its mode.
        mode: TunnelMode,
        /// Why.
        reason: &'static str,
    },

    // --- namespaces and the namespace thread ---
    /// The namespace file could not be opened.
    #[error("could not open network namespace {path:?}")]
    OpenNetns {
        /// Namespace path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `setns(CLONE_NEWNET)` failed on the namespace thread.
    #[error("could not enter network namespace {path:?}")]
    EnterNetns {
        /// Namespace path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The namespace thread could not be spawned.
    #[error("could not spawn the thread for network namespace {path:?}")]
    SpawnThread {
        /// Namespace path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The namespace thread's tokio runtime could not be built.
    #[error("could not start the runtime of the thread for network namespace {path:?}")]
    StartRuntime {
        /// Namespace path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The rtnetlink socket could not be opened inside the namespace.
    #[error("could not open a netlink socket in network namespace {path:?}")]
    NetlinkSocket {
        /// Namespace path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The namespace thread stopped (it panicked or ended) before replying.
    #[error("the thread for network namespace {path:?} ended before replying")]
    ThreadGone {
        /// Namespace path.
        path: PathBuf,
    },
    /// Creating a named namespace (file + `unshare` + bind mount) failed.
    #[error("could not create network namespace {path:?} ({step})")]
    CreateNetns {
        /// Namespace path.
        path: PathBuf,
        /// Which step failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Removing a named namespace (unmount + unlink) failed.
    #[error("could not remove network namespace {path:?} ({step})")]
    RemoveNetns {
        /// Namespace path.
        path: PathBuf,
        /// Which step failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    // --- links ---
    /// No link with that name in the namespace.
    #[error("link {name:?} not found")]
    LinkNotFound {
        /// The name looked up.
        name: String,
        /// The kernel's answer (`ENODEV`).
        #[source]
        source: io::Error,
    },
    /// Reading a link failed for another reason than absence.
    #[error("could not read link {name:?}")]
    GetLink {
        /// The name looked up.
        name: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Setting a link up or down failed.
    #[error("could not set link {link} {}", if *up { "up" } else { "down" })]
    SetLinkState {
        /// The link.
        link: LinkId,
        /// The requested state.
        up: bool,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Setting the MTU failed.
    #[error("could not set the MTU of link {link} to {mtu}")]
    SetMtu {
        /// The link.
        link: LinkId,
        /// Requested MTU.
        mtu: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Setting `txqueuelen` failed.
    #[error("could not set the txqueuelen of link {link} to {len}")]
    SetTxQueueLen {
        /// The link.
        link: LinkId,
        /// Requested length.
        len: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Setting the hardware address failed.
    #[error("could not set the MAC address of link {link} to {mac}")]
    SetMac {
        /// The link.
        link: LinkId,
        /// Requested address.
        mac: MacAddr,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Creating a veth pair failed.
    #[error("could not create veth pair {name:?} <-> {peer:?}")]
    CreateVeth {
        /// Local end.
        name: String,
        /// Peer end.
        peer: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Deleting a link failed.
    #[error("could not delete link {link}")]
    DeleteLink {
        /// The link.
        link: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Moving a link to another namespace failed.
    #[error("could not move link {link} to network namespace {netns:?}")]
    MoveLink {
        /// The link.
        link: LinkId,
        /// Target namespace.
        netns: PathBuf,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    // --- tap ---
    /// `/dev/net/tun` could not be opened.
    #[error("could not open /dev/net/tun to create tap {name:?}")]
    OpenTun {
        /// Tap name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` failed.
    #[error("could not create tap {name:?} (TUNSETIFF)")]
    TapSetIff {
        /// Tap name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `TUNSETPERSIST` failed.
    #[error("could not make tap {name:?} persistent (TUNSETPERSIST)")]
    TapPersist {
        /// Tap name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    // --- addresses ---
    /// Adding an address failed.
    #[error("could not add address {addr} to link {link}")]
    AddAddress {
        /// The link.
        link: LinkId,
        /// The address.
        addr: IpPrefix,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Deleting an address failed.
    #[error("could not delete address {addr} from link {link}")]
    DeleteAddress {
        /// The link.
        link: LinkId,
        /// The address.
        addr: IpPrefix,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Listing addresses failed.
    #[error("could not list the addresses of link {link}")]
    GetAddresses {
        /// The link.
        link: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    // --- routes ---
    /// Adding a route failed.
    #[error("could not add route {dest} dev {dev}")]
    AddRoute {
        /// Destination.
        dest: IpPrefix,
        /// Output device.
        dev: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Replacing a route failed.
    #[error("could not replace route {dest} dev {dev}")]
    ReplaceRoute {
        /// Destination.
        dest: IpPrefix,
        /// Output device.
        dev: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Deleting a route failed.
    #[error("could not delete route {dest} dev {dev}")]
    DeleteRoute {
        /// Destination.
        dest: IpPrefix,
        /// Output device.
        dev: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Listing routes failed.
    #[error("could not list routes to {dest}")]
    GetRoutes {
        /// Destination looked up.
        dest: IpPrefix,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    // --- neighbours ---
    /// Adding or replacing a permanent neighbour failed.
    #[error("could not set permanent neighbour {ip} lladdr {mac} on link {dev}")]
    ReplaceNeighbour {
        /// Device.
        dev: LinkId,
        /// Neighbour IP.
        ip: IpAddr,
        /// Neighbour MAC.
        mac: MacAddr,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Deleting a neighbour failed.
    #[error("could not delete neighbour {ip} on link {dev}")]
    DeleteNeighbour {
        /// Device.
        dev: LinkId,
        /// Neighbour IP.
        ip: IpAddr,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Listing neighbours failed.
    #[error("could not list the neighbours of link {dev}")]
    GetNeighbours {
        /// Device.
        dev: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    // --- tunnels ---
    /// Creating a tunnel link failed (the kernel has the kind).
    #[error("could not create {mode} tunnel {name:?} {local} -> {remote}")]
    CreateTunnel {
        /// Tunnel name.
        name: String,
        /// Its mode.
        mode: TunnelMode,
        /// Local endpoint.
        local: IpAddr,
        /// Remote endpoint.
        remote: IpAddr,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    // --- tc ---
    /// Adding the ingress qdisc failed.
    #[error("could not add the ingress qdisc on link {link}")]
    AddIngress {
        /// The link.
        link: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Adding the u32 match-all mirred redirect filter failed.
    #[error("could not add a redirect filter from link {from} to link {to}")]
    AddRedirect {
        /// Ingress device.
        from: LinkId,
        /// Redirect target.
        to: LinkId,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Deleting a qdisc failed.
    #[error("could not delete the {parent} qdisc of link {link}")]
    DeleteQdisc {
        /// The link.
        link: LinkId,
        /// Which qdisc.
        parent: QdiscParent,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Reading qdiscs failed.
    #[error("could not read the {parent} qdisc of link {link}")]
    GetQdisc {
        /// The link.
        link: LinkId,
        /// Which qdisc.
        parent: QdiscParent,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Installing the plug qdisc failed (the kernel has `sch_plug`).
    #[error("could not install a plug qdisc with a {limit_bytes}-byte limit on link {link}")]
    InstallPlug {
        /// The link.
        link: LinkId,
        /// Requested limit.
        limit_bytes: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Changing the plug's action failed.
    #[error("could not {action} the plug qdisc on link {link}")]
    PlugAction {
        /// The link.
        link: LinkId,
        /// Requested action.
        action: PlugAction,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Changing the plug's limit failed.
    #[error("could not set the plug limit on link {link} to {limit_bytes} bytes")]
    SetPlugLimit {
        /// The link.
        link: LinkId,
        /// Requested limit.
        limit_bytes: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    // --- capabilities ---
    /// The running kernel lacks a module the production path needs; callers
    /// fall back (decision 7) with a warning.
    #[error("the kernel lacks {what}")]
    Unsupported {
        /// What is missing.
        what: Feature,
        /// The kernel's answer (`EOPNOTSUPP`, `ENOENT`, …).
        #[source]
        source: io::Error,
    },
    /// The scratch namespace or link the probe needs could not be made.
    #[error("could not set up the probe for {what}")]
    ProbeSetup {
        /// What was being probed.
        what: Feature,
        /// The underlying failure.
        #[source]
        source: Box<Error>,
    },

    // --- fake ---
    /// A failure injected by [`Recording`](super::Recording) for tests.
    #[error("injected failure of {op}")]
    Injected {
        /// The operation, as `Debug` prints it.
        op: String,
    },
}

impl Error {
    /// The errno at the bottom of the chain, if the kernel or the OS answered.
    pub fn errno(&self) -> Option<i32> {
        let mut cur: &(dyn std::error::Error + 'static) = self;
        loop {
            if let Some(io) = cur.downcast_ref::<io::Error>() {
                return io.raw_os_error();
            }
            cur = cur.source()?;
        }
    }

    /// The object was already gone (no such link, route, address, neighbour or
    /// qdisc); cleanup treats this as done.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::LinkNotFound { .. })
            || matches!(self.errno(), Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL))
    }

    /// The object already exists (`EEXIST`).
    pub fn is_already_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// The kernel lacks the feature; see [`Error::Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        match self {
            Self::Unsupported { .. } => true,
            Self::ProbeSetup { source, .. } => source.is_unsupported(),
            _ => false,
        }
    }
}

/// Converts an rtnetlink failure to the errno the kernel sent, or an
/// [`io::ErrorKind::Other`] for library-side failures (bad reply, closed socket).
pub(crate) fn nl_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
    }
}

/// Converts a nix errno to an [`io::Error`].
pub(crate) fn errno_io(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Whether creating `what` failed because the kernel does not know the kind.
///
/// An unknown link kind is `EOPNOTSUPP` ("Unknown device type"); an unknown
/// qdisc kind is `ENOENT` ("Specified qdisc kind is unknown"). IPv6 tunnels on
/// a kernel without IPv6 give `EAFNOSUPPORT`.
pub(crate) fn is_unsupported_errno(what: Feature, errno: i32) -> bool {
    match what {
        Feature::Plug => matches!(errno, libc::ENOENT | libc::EOPNOTSUPP),
        Feature::Ipip | Feature::Gre | Feature::Ip6Tnl | Feature::Ip6Gre => {
            matches!(errno, libc::EOPNOTSUPP | libc::EAFNOSUPPORT)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn link() -> LinkId {
        LinkId { index: 4, name: "tap0_kata".into() }
    }

    #[test]
    fn message_names_object_and_source_is_not_repeated() {
        let e = Error::ReplaceRoute {
            dest: "10.0.0.5".parse().unwrap(),
            dev: link(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        let top = e.to_string();
        assert_eq!(top, "could not replace route 10.0.0.5/32 dev tap0_kata (ifindex 4)");
        assert!(!top.contains("os error"));
        assert_eq!(e.errno(), Some(libc::ENODEV));
        assert!(e.is_not_found());
        assert!(!e.is_unsupported());
    }

    #[test]
    fn errno_found_through_boxed_probe_error() {
        let e = Error::ProbeSetup {
            what: Feature::Plug,
            source: Box::new(Error::Unsupported {
                what: Feature::Plug,
                source: io::Error::from_raw_os_error(libc::ENOENT),
            }),
        };
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert!(e.is_unsupported());
        let validation = Error::InvalidIfName { name: "a/b".into(), reason: "contains '/'" };
        assert_eq!(validation.errno(), None);
        assert!(!validation.is_not_found());
    }

    #[test]
    fn unsupported_classification_table() {
        let cases = [
            (Feature::Plug, libc::ENOENT, true),
            (Feature::Plug, libc::EOPNOTSUPP, true),
            (Feature::Plug, libc::EEXIST, false),
            (Feature::Plug, libc::EINVAL, false),
            (Feature::Ipip, libc::EOPNOTSUPP, true),
            (Feature::Gre, libc::EOPNOTSUPP, true),
            (Feature::Ip6Tnl, libc::EAFNOSUPPORT, true),
            (Feature::Ip6Gre, libc::EOPNOTSUPP, true),
            (Feature::Ipip, libc::ENOENT, false),
            (Feature::Gre, libc::EEXIST, false),
            (Feature::Ip6Tnl, libc::EPERM, false),
        ];
        for (what, errno, want) in cases {
            assert_eq!(is_unsupported_errno(what, errno), want, "{what} errno {errno}");
        }
    }

    #[test]
    fn rtnetlink_errors_keep_the_kernel_errno() {
        let mut msg = rtnetlink::packet_core::ErrorMessage::default();
        msg.code = std::num::NonZeroI32::new(-libc::EEXIST);
        let io = nl_io(rtnetlink::Error::NetlinkError(msg));
        assert_eq!(io.raw_os_error(), Some(libc::EEXIST));
        let io = nl_io(rtnetlink::Error::RequestFailed);
        assert_eq!(io.raw_os_error(), None);
    }
}
