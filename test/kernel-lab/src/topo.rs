//! The two-node topology of the tunnel and cutover checks, one address family at a time:
//!
//! ```text
//!   client ─ c0 ══ a-c ─ node-a ─ a-b ══ b-a ─ node-b ─ b-vm ══ vm0 ─ vm-b   (the VM after the move)
//!                          └─ a-vm ══ vm0 ─ vm-a                           (the VM before the move)
//! ```
//!
//! Both VM namespaces carry the same address (a /32 or /128, calico style, default gateway a
//! link-local address answered by a permanent neighbour entry); node-a routes the VM to vm-a,
//! node-b to vm-b, and node-b routes the client back through node-a. Every neighbour is
//! permanent, so the only moving part is the route and the tunnel under test. The migration
//! itself is one [`NetOps::replace_route`] on node-a into a tunnel to node-b.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use katamaran::net::{IpPrefix, LinkId, NetOps, RouteSpec, TunnelMode, TunnelSpec};

use crate::error::{Result, Step};
use crate::lab::{host, prefix, wire, Node};

/// The UDP port the VM's echo listens on (the guest image's echo uses 7 too).
pub const ECHO_PORT: u16 = 7;
/// Name of the tunnel link on both nodes.
pub const TUNNEL: &str = "kl-tnl";

/// Addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The client.
    pub client: IpAddr,
    /// node-a's address on the client link.
    pub node_a_client_side: IpAddr,
    /// Prefix length of the client link.
    pub client_len: u8,
    /// node-a's underlay address (tunnel local end on node-a).
    pub node_a: IpAddr,
    /// node-b's underlay address.
    pub node_b: IpAddr,
    /// Prefix length of the underlay.
    pub underlay_len: u8,
    /// The VM, a host prefix.
    pub vm: IpAddr,
    /// The VM's gateway: link-local, never configured on a node (calico style).
    pub vm_gateway: IpAddr,
}

impl Plan {
    /// IPv4: underlay 10.82.0.0/24, VM 10.244.1.5/32 via 169.254.1.1.
    pub const V4: Plan = Plan {
        client: IpAddr::V4(Ipv4Addr::new(10, 81, 0, 2)),
        node_a_client_side: IpAddr::V4(Ipv4Addr::new(10, 81, 0, 1)),
        client_len: 24,
        node_a: IpAddr::V4(Ipv4Addr::new(10, 82, 0, 1)),
        node_b: IpAddr::V4(Ipv4Addr::new(10, 82, 0, 2)),
        underlay_len: 24,
        vm: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
        vm_gateway: IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1)),
    };

    /// IPv6: underlay fd82::/64, VM fd00:10:244:1::5/128 via fe80::1.
    pub const V6: Plan = Plan {
        client: IpAddr::V6(Ipv6Addr::new(0xfd81, 0, 0, 0, 0, 0, 0, 2)),
        node_a_client_side: IpAddr::V6(Ipv6Addr::new(0xfd81, 0, 0, 0, 0, 0, 0, 1)),
        client_len: 64,
        node_a: IpAddr::V6(Ipv6Addr::new(0xfd82, 0, 0, 0, 0, 0, 0, 1)),
        node_b: IpAddr::V6(Ipv6Addr::new(0xfd82, 0, 0, 0, 0, 0, 0, 2)),
        underlay_len: 64,
        vm: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5)),
        vm_gateway: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
    };

    /// The plan whose underlay fits `mode` (the inner family is the same: IPv4 in ipip/gre,
    /// IPv6 in ip6ip6/ip6gre).
    pub fn for_mode(mode: TunnelMode) -> Plan {
        if mode.outer_is_ipv6() {
            Plan::V6
        } else {
            Plan::V4
        }
    }

    /// The VM's host prefix.
    pub fn vm_prefix(&self) -> IpPrefix {
        host(self.vm)
    }
}

/// Wires a VM namespace to its node: the VM's address on `vm0`, its gateway answered by a
/// permanent neighbour entry, a route back to the client, and the node's permanent entry for
/// the VM (the design's fix for ARP into a paused tap). Returns the node's end.
async fn vm_link(plan: &Plan, node: &Node, node_end: &str, vm: &Node) -> Result<LinkId> {
    let w = wire(node, node_end, vm, "vm0").await?;
    vm.address(&w.b, plan.vm_prefix()).await?;
    vm.neighbour(&w.b, plan.vm_gateway, w.a_mac).await?;
    vm.route(&RouteSpec::via_onlink(host(plan.client), plan.vm_gateway, w.b.clone())).await?;
    node.neighbour(&w.a, plan.vm, w.b_mac).await?;
    Ok(w.a)
}

/// `client ══ node-a ══ node-b`: the client link (the client routes the VM to node-a), the
/// underlay, and node-b's route back to the client through node-a, outside any tunnel. Every
/// neighbour is permanent.
///
/// # Errors
/// The first step that fails.
pub async fn wire_client_and_underlay(
    plan: &Plan,
    client: &Node,
    node_a: &Node,
    node_b: &Node,
) -> Result<()> {
    let ca = wire(client, "c0", node_a, "a-c").await?;
    client.address(&ca.a, prefix(plan.client, plan.client_len)?).await?;
    node_a.address(&ca.b, prefix(plan.node_a_client_side, plan.client_len)?).await?;
    client.neighbour(&ca.a, plan.node_a_client_side, ca.b_mac).await?;
    node_a.neighbour(&ca.b, plan.client, ca.a_mac).await?;
    client.route(&RouteSpec::via_onlink(plan.vm_prefix(), plan.node_a_client_side, ca.a.clone())).await?;

    let ab = wire(node_a, "a-b", node_b, "b-a").await?;
    node_a.address(&ab.a, prefix(plan.node_a, plan.underlay_len)?).await?;
    node_b.address(&ab.b, prefix(plan.node_b, plan.underlay_len)?).await?;
    node_a.neighbour(&ab.a, plan.node_b, ab.b_mac).await?;
    node_b.neighbour(&ab.b, plan.node_a, ab.a_mac).await?;
    node_b.route(&RouteSpec::via_onlink(host(plan.client), plan.node_a, ab.b.clone())).await
}

/// The built topology; every namespace is removed when it is dropped.
#[derive(Debug)]
pub struct Topo {
    /// Addresses in use.
    pub plan: Plan,
    /// Sends the traffic.
    pub client: Node,
    /// The source node.
    pub node_a: Node,
    /// The destination node.
    pub node_b: Node,
    /// The VM before the move, behind node-a.
    pub vm_a: Node,
    /// The VM after the move, behind node-b.
    pub vm_b: Node,
    /// node-a's end of the link to vm-a (where the VM route points before the move).
    pub a_vm: LinkId,
    /// node-b's end of the link to vm-b (the destination "tap": where a plug goes).
    pub b_vm: LinkId,
}

impl Topo {
    /// Builds the namespaces, links, addresses, neighbours and routes of `plan`.
    ///
    /// # Errors
    /// The first step that fails.
    pub async fn build(plan: Plan) -> Result<Self> {
        // An IPv4 plan needs no IPv6: without it no stray solicitations reach a plug.
        let v4 = plan.vm.is_ipv4();
        let client = Node::new("client").await?.without_ipv6_if(v4).await?;
        let node_a = Node::router("node-a").await?.without_ipv6_if(v4).await?;
        let node_b = Node::router("node-b").await?.without_ipv6_if(v4).await?;
        let vm_a = Node::new("vm-a").await?.without_ipv6_if(v4).await?;
        let vm_b = Node::new("vm-b").await?.without_ipv6_if(v4).await?;

        wire_client_and_underlay(&plan, &client, &node_a, &node_b).await?;

        // node-a ══ vm-a and node-b ══ vm-b: the same VM address on both sides.
        let a_vm = vm_link(&plan, &node_a, "a-vm", &vm_a).await?;
        let b_vm = vm_link(&plan, &node_b, "b-vm", &vm_b).await?;
        node_a.route(&RouteSpec::dev(plan.vm_prefix(), a_vm.clone())).await?;
        node_b.route(&RouteSpec::dev(plan.vm_prefix(), b_vm.clone())).await?;

        Ok(Self { plan, client, node_a, node_b, vm_a, vm_b, a_vm, b_vm })
    }

    /// Creates the tunnel pair: node-a's end (local node-a, remote node-b), where the VM route
    /// will move, and node-b's decapsulating end, with reverse-path filtering off on it (the
    /// client's packets come out of it while node-b routes the client via the underlay).
    /// Returns (node-a's tunnel, node-b's tunnel).
    ///
    /// # Errors
    /// [`CheckError::Net`](crate::error::CheckError::Net), including `Unsupported` when the
    /// kernel lacks the mode.
    pub async fn tunnels(&self, mode: TunnelMode) -> Result<(LinkId, LinkId)> {
        let spec = |local, remote| TunnelSpec { name: TUNNEL.into(), mode, local, remote, ttl: 64 };
        let a = self
            .node_a
            .net()
            .create_tunnel(&spec(self.plan.node_a, self.plan.node_b))
            .await
            .step(format!("create the {mode} tunnel on node-a"))?;
        let b = self
            .node_b
            .net()
            .create_tunnel(&spec(self.plan.node_b, self.plan.node_a))
            .await
            .step(format!("create the {mode} tunnel on node-b"))?;
        if self.plan.vm.is_ipv4() {
            self.node_b.sysctl(&format!("net/ipv4/conf/{TUNNEL}/rp_filter"), "0").await?;
        }
        Ok((a, b))
    }
}
