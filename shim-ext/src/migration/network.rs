//! The network side of a migration, as netlink operations on [`NetOps`]: the destination's
//! incoming sandbox plumbing (what a CNI plus Kata would have built) and the source's forward.
//!
//! Every function registers the undo of what it created on the [`Cleanup`] stack before
//! returning, so a failure at any later step unwinds it. Nothing here waits for QEMU: the
//! cutover module calls [`SourceForward::swap`] at STOP and the plug release at RESUME.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::migration::cleanup::Cleanup;
use crate::migration::options::TunnelMode;
use crate::net::{
    self, Feature, IpPrefix, LinkId, MacAddr, NeighbourSpec, NetOps, PlugAction, QdiscParent, RouteSpec,
    TapSpec, TunnelSpec, VethSpec,
};

/// Without sch_plug the destination tap's own queue buffers (DESIGN.md decision 7): a 20 s hold
/// lost 274 of 1265 packets at txqueuelen 1000 and none at 10000.
pub const FALLBACK_TXQUEUELEN: u32 = 10_000;

/// The concrete tunnel kind for the net layer, or `None` for route mode.
pub fn net_tunnel_mode(mode: TunnelMode, vms: &[IpAddr], nodes_v6: bool) -> Option<net::TunnelMode> {
    match mode.resolve(vms, nodes_v6) {
        TunnelMode::Ipip => Some(net::TunnelMode::Ipip),
        TunnelMode::Gre => Some(net::TunnelMode::Gre),
        TunnelMode::Ip6ip6 => Some(net::TunnelMode::Ip6ip6),
        TunnelMode::Ip6gre => Some(net::TunnelMode::Ip6gre),
        TunnelMode::Route | TunnelMode::Auto => None,
    }
}

/// A short, stable interface-name suffix for a migration (IFNAMSIZ leaves 15 bytes).
pub fn ifname_suffix(migration_id: &str) -> String {
    // FNV-1a: stable across runs and platforms, no dependency.
    let mut h: u32 = 0x811c_9dc5;
    for b in migration_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// What the destination builds for an incoming VM.
#[derive(Debug, Clone)]
pub struct IncomingSpec {
    /// The new sandbox network namespace (already created).
    pub sandbox_netns: PathBuf,
    /// Node-side veth name.
    pub host_veth: String,
    /// Pod-side interface name (Kata's `eth0`).
    pub pod_ifname: String,
    /// Tap name QEMU opens (Kata's `tap0_kata`).
    pub tap_name: String,
    /// Tap queues (QEMU `queues=`); more than one needs `IFF_MULTI_QUEUE`.
    pub tap_multi_queue: bool,
    /// The VM's MAC (the pod interface and the guest NIC share it, as in Kata).
    pub mac: MacAddr,
    /// Pod MTU.
    pub mtu: u32,
    /// The VM's addresses (host routes /32, /128).
    pub vm_addrs: Vec<IpAddr>,
    /// Plug limit in bytes; `None` means use the tap queue fallback only.
    pub plug_limit: u32,
    /// The decapsulating end of the source's tunnel, if a tunnel mode is used.
    pub decap: Option<TunnelSpec>,
    /// MAC of the node-side veth: the guest's cached gateway MAC must stay valid across the move
    /// (calico-style CNIs use one fixed MAC on every node, `ee:ee:ee:ee:ee:ee`).
    pub gateway_mac: Option<MacAddr>,
    /// IPv6 gateway the guest routes through (link-local), put on the node-side veth so the
    /// node answers neighbour solicitations for it.
    pub gateway6: Option<std::net::Ipv6Addr>,
}

/// The destination's plumbing once built.
#[derive(Debug, Clone)]
pub struct IncomingNet {
    /// Node-side veth.
    pub host_veth: LinkId,
    /// The tap inside the sandbox namespace.
    pub tap: LinkId,
    /// Whether a plug holds the tap (false: tap-queue fallback).
    pub plugged: bool,
    /// The decap tunnel, if any.
    pub decap: Option<LinkId>,
    /// The node's routes the VM routes replaced (put back if this sandbox does not take the VM).
    pub replaced: Vec<RouteSpec>,
}

/// Builds the incoming sandbox's network: veth pair with the pod end named like Kata's and
/// carrying the VM's MAC, the tap with Kata's tcfilter redirects both ways, the plug on the tap
/// (before any route can bring a packet), the node's host routes and permanent neighbour entries
/// (the paused VM cannot answer ARP/ND), and the decapsulating tunnel end.
///
/// `node` works in the node's namespace, `sandbox` in the new sandbox namespace.
///
/// # Errors
/// The first netlink failure; everything created before it is on `cleanup`.
pub async fn build_incoming<N: NetOps + 'static, S: NetOps + ?Sized>(
    node: &Arc<N>,
    sandbox: &S,
    spec: &IncomingSpec,
    cleanup: &Cleanup,
) -> Result<IncomingNet, net::Error> {
    let host_veth = node
        .create_veth(&VethSpec {
            name: spec.host_veth.clone(),
            peer: spec.pod_ifname.clone(),
            peer_netns: Some(spec.sandbox_netns.clone()),
        })
        .await?;
    {
        let node = node.clone();
        let link = host_veth.clone();
        cleanup
            .push(format!("delete veth {}", link.name), move || async move { node.delete_link(&link).await });
    }
    node.set_mtu(&host_veth, spec.mtu).await?;
    if let Some(mac) = spec.gateway_mac {
        node.set_mac(&host_veth, mac).await?;
    }
    if let Some(gw6) = spec.gateway6 {
        node.add_address(
            &host_veth,
            IpPrefix::new(IpAddr::V6(gw6), 64).unwrap_or(IpPrefix::host(IpAddr::V6(gw6))),
        )
        .await?;
    }
    node.set_link_up(&host_veth, true).await?;

    let pod = sandbox.link(&spec.pod_ifname).await?.id;
    sandbox.set_mac(&pod, spec.mac).await?;
    // The pod interface carries the VM's addresses as the CNI gave them on the source, so the
    // sandbox describes itself the same way here (tc redirects every packet before IP sees it).
    for vm in &spec.vm_addrs {
        sandbox.add_address(&pod, IpPrefix::host(*vm)).await?;
    }
    sandbox.set_mtu(&pod, spec.mtu).await?;
    let tap = sandbox
        .create_tap(&TapSpec {
            name: spec.tap_name.clone(),
            multi_queue: spec.tap_multi_queue,
            vnet_hdr: true,
        })
        .await?;
    sandbox.set_mtu(&tap, spec.mtu).await?;
    sandbox.set_txqueuelen(&tap, FALLBACK_TXQUEUELEN).await?;
    // The plug goes on before the tap is up and before any route exists: no packet can pass it.
    let plugged = match sandbox.install_plug(&tap, spec.plug_limit).await {
        Ok(()) => true,
        Err(e) if e.is_unsupported() => {
            tracing::warn!(
                tap = %tap.name,
                txqueuelen = FALLBACK_TXQUEUELEN,
                "kernel lacks sch_plug: buffering in the tap's own queue; packets beyond it are dropped"
            );
            false
        }
        Err(e) => return Err(e),
    };
    for (from, to) in [(&pod, &tap), (&tap, &pod)] {
        sandbox.add_ingress_qdisc(from).await?;
        sandbox.add_redirect_filter(from, to).await?;
    }
    sandbox.set_link_up(&pod, true).await?;
    sandbox.set_link_up(&tap, true).await?;

    let mut replaced = Vec::new();
    for vm in &spec.vm_addrs {
        let route = RouteSpec::dev(IpPrefix::host(*vm), host_veth.clone());
        // A route already there (a forward left when the VM moved away from this node earlier)
        // comes back if this sandbox does not take the VM.
        let previous = current_route(node.as_ref(), route.dest).await?;
        node.replace_route(&route).await?;
        let node2 = node.clone();
        let undo = previous.clone();
        cleanup.push(format!("delete route {} dev {}", route.dest, host_veth.name), move || async move {
            match node2.delete_route(&route).await {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            }
            match &undo {
                Some(previous) => restore_replaced(node2.as_ref(), previous).await,
                None => Ok(()),
            }
        });
        replaced.extend(previous);
        node.replace_neighbour(&NeighbourSpec { dev: host_veth.clone(), ip: *vm, mac: spec.mac }).await?;
        let (node2, dev, ip) = (node.clone(), host_veth.clone(), *vm);
        cleanup.push(format!("delete neighbour {ip}"), move || async move {
            node2.delete_neighbour(&dev, ip).await
        });
    }

    let decap = match &spec.decap {
        Some(t) => {
            let link = node.create_tunnel(t).await?;
            let (node2, l) = (node.clone(), link.clone());
            cleanup.push(
                format!("delete tunnel {}", l.name),
                move || async move { node2.delete_link(&l).await },
            );
            Some(link)
        }
        None => None,
    };
    Ok(IncomingNet { host_veth, tap, plugged, decap, replaced })
}

/// Releases the plug at RESUME; returns when the kernel acknowledged it.
///
/// # Errors
/// The netlink failure.
pub async fn release_plug<S: NetOps + ?Sized>(
    sandbox: &S,
    incoming: &IncomingNet,
) -> Result<SystemTime, net::Error> {
    if incoming.plugged {
        sandbox.plug_action(&incoming.tap, PlugAction::ReleaseIndefinite).await?;
    }
    Ok(SystemTime::now())
}

/// Packets the plug dropped for lack of room (0 without a plug).
///
/// # Errors
/// The netlink failure.
pub async fn plug_drops<S: NetOps + ?Sized>(sandbox: &S, incoming: &IncomingNet) -> Result<u64, net::Error> {
    if !incoming.plugged {
        return Ok(0);
    }
    Ok(sandbox.qdisc(&incoming.tap, QdiscParent::Root).await?.map_or(0, |q| u64::from(q.stats.drops)))
}

/// The source's forward, prepared during pre-copy so that STOP needs one netlink message per
/// VM address.
#[derive(Debug, Clone)]
pub struct SourceForward {
    /// Routes to install at STOP (VM prefix into the tunnel, or via the destination node).
    pub swap: Vec<RouteSpec>,
    /// The routes they replace, to put back if the source VM resumes (failed migration).
    pub original: Vec<RouteSpec>,
    /// The tunnel link, if any.
    pub tunnel: Option<LinkId>,
}

/// Prepares the source's forward: creates the tunnel (if any), records the VM routes it will
/// replace (to restore them if the source VM resumes), and builds the replacement routes.
///
/// `uplink` is the node's link towards the destination node, used in route mode.
///
/// # Errors
/// [`ForwardError::Net`] from netlink (an unsupported-kind error when the kernel lacks the
/// tunnel module), [`ForwardError::NoVmRoute`] when a VM address has no route on this node,
/// [`ForwardError::NoUplink`] in route mode without an uplink.
pub async fn prepare_forward<N: NetOps + 'static>(
    node: &Arc<N>,
    tunnel: Option<TunnelSpec>,
    vm_addrs: &[IpAddr],
    dest_nodes: &[IpAddr],
    uplink: Option<&LinkId>,
    cleanup: &Cleanup,
) -> Result<SourceForward, ForwardError> {
    let mut original = Vec::new();
    for vm in vm_addrs {
        original.push(
            current_route(node.as_ref(), IpPrefix::host(*vm)).await?.ok_or(ForwardError::NoVmRoute(*vm))?,
        );
    }
    let tunnel_link = match tunnel {
        Some(spec) => {
            let link = node.create_tunnel(&spec).await?;
            let (node2, l) = (node.clone(), link.clone());
            cleanup.push(
                format!("delete tunnel {}", l.name),
                move || async move { node2.delete_link(&l).await },
            );
            Some(link)
        }
        None => None,
    };
    let mut swap = Vec::new();
    for vm in vm_addrs {
        let dest = IpPrefix::host(*vm);
        swap.push(match (&tunnel_link, uplink) {
            (Some(t), _) => RouteSpec::dev(dest, t.clone()),
            (None, Some(up)) => {
                let gw = dest_nodes
                    .iter()
                    .find(|a| a.is_ipv6() == vm.is_ipv6())
                    .ok_or(ForwardError::NoGateway(*vm))?;
                RouteSpec::via_onlink(dest, *gw, up.clone())
            }
            (None, None) => return Err(ForwardError::NoUplink),
        });
    }
    Ok(SourceForward { swap, original, tunnel: tunnel_link })
}

/// The node's route to `dest` now (the first one with an output device), as a spec that puts
/// it back as it was.
///
/// # Errors
/// The netlink failure.
pub async fn current_route<N: NetOps + ?Sized>(
    node: &N,
    dest: IpPrefix,
) -> Result<Option<RouteSpec>, net::Error> {
    let current = node.routes(dest).await?;
    Ok(current.iter().find_map(|r| {
        let index = r.oif?;
        Some(RouteSpec {
            dest,
            gateway: r.gateway,
            dev: LinkId { index, name: format!("if{index}") },
            onlink: r.onlink,
            protocol: Some(r.protocol),
        })
    }))
}

/// Puts back a route an incoming sandbox replaced, once the sandbox's own route is gone —
/// unless something else routes that address by now (then that route is left alone).
///
/// # Errors
/// The netlink failure.
pub async fn restore_replaced<N: NetOps + ?Sized>(node: &N, previous: &RouteSpec) -> Result<(), net::Error> {
    if current_route(node, previous.dest).await?.is_some() {
        tracing::info!(dest = %previous.dest, "a route to the VM address exists again: the replaced one stays away");
        return Ok(());
    }
    node.replace_route(previous).await.map(drop)
}

/// Why the forward could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Netlink failed.
    #[error(transparent)]
    Net(#[from] net::Error),
    /// The VM address is not routed on this node.
    #[error("VM address {0} has no route on this node; is this the node hosting the sandbox?")]
    NoVmRoute(IpAddr),
    /// Route mode for a VM address whose family the destination node has no address in.
    #[error("route mode cannot forward {0}: the destination node has no address of its family (give the agent one with --node-address, or use a GRE tunnel)")]
    NoGateway(IpAddr),
    /// Route mode without a known uplink.
    #[error("route mode needs the node's interface towards the destination: the node has no route to it; give --node-interface")]
    NoUplink,
}

impl SourceForward {
    /// Points the VM's addresses at the destination: one route replace each. Returns when the
    /// first (the VM's primary address) was acknowledged.
    ///
    /// # Errors
    /// The netlink failure.
    pub async fn swap<N: NetOps + ?Sized>(&self, node: &N) -> Result<SystemTime, net::Error> {
        let mut first = None;
        for r in &self.swap {
            let t = node.replace_route(r).await?;
            first.get_or_insert(t.acked());
        }
        Ok(first.unwrap_or_else(SystemTime::now))
    }

    /// Puts the VM's routes back into the sandbox (the source VM resumed).
    ///
    /// # Errors
    /// The netlink failure.
    pub async fn restore<N: NetOps + ?Sized>(&self, node: &N) -> Result<(), net::Error> {
        for r in &self.original {
            node.replace_route(r).await?;
        }
        Ok(())
    }

    /// Removes the forward once idle: the VM routes (the sandbox behind them is paused for good)
    /// and the tunnel.
    ///
    /// # Errors
    /// The first netlink failure (the rest is still attempted).
    pub async fn remove<N: NetOps + ?Sized>(&self, node: &N) -> Result<(), net::Error> {
        let mut first_err = None;
        for r in &self.swap {
            if let Err(e) = node.delete_route(r).await {
                if !e.is_not_found() {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(t) = &self.tunnel {
            if let Err(e) = node.delete_link(t).await {
                if !e.is_not_found() {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Whether the kernel offers a tunnel mode (probe by creating and deleting a scratch link).
///
/// # Errors
/// Netlink failures other than "unsupported".
pub async fn has_feature<N: NetOps + ?Sized>(node: &N, f: Feature) -> Result<bool, net::Error> {
    match node.probe(f).await {
        Ok(()) => Ok(true),
        Err(e) if e.is_unsupported() => Ok(false),
        Err(e) => Err(e),
    }
}

/// The tunnel kind to use: the requested one if the kernel has it; `auto` falls back to a plain
/// route (with a warning) when the module is missing; an explicit mode never falls back.
///
/// # Errors
/// [`super::error::EngineError::Precondition`] for an explicit mode the kernel lacks; netlink
/// failures of the probe.
pub async fn resolve_tunnel<N: NetOps + ?Sized>(
    node: &N,
    mode: TunnelMode,
    vms: &[IpAddr],
    nodes_v6: bool,
) -> Result<Option<net::TunnelMode>, super::error::EngineError> {
    let Some(kind) = net_tunnel_mode(mode, vms, nodes_v6) else { return Ok(None) };
    if has_feature(node, kind.feature()).await? {
        return Ok(Some(kind));
    }
    if mode == TunnelMode::Auto {
        tracing::warn!(tunnel = %kind, "kernel lacks the tunnel module: forwarding with a plain route (needs a shared L2)");
        Ok(None)
    } else {
        Err(super::error::EngineError::Precondition(format!(
            "this node's kernel lacks {kind} (module {}); load it or use --tunnel-mode route",
            match kind.feature() {
                Feature::Ipip => "ipip",
                Feature::Gre => "ip_gre",
                Feature::Ip6Tnl => "ip6_tunnel",
                Feature::Ip6Gre => "ip6_gre",
                Feature::Plug => "sch_plug",
            }
        )))
    }
}

#[cfg(test)]
#[path = "network_tests.rs"]
mod tests;
