//! The operations the engine needs, as a trait (youki's `Syscall` pattern):
//! [`NetnsHandle`] does them for real on its namespace thread,
//! [`Recording`](super::Recording) records them as [`NetOp`] values so engine
//! tests can assert the exact operations of a cutover and of its cleanup.
//!
//! The methods return `Send` futures so callers can hold them across
//! `tokio::spawn`. The trait is used generically (`N: NetOps`); it is not
//! object safe.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::error::Result;
use super::netns::NetnsHandle;
use super::types::{
    Feature, IpPrefix, LinkId, LinkInfo, MacAddr, NeighbourInfo, NeighbourSpec, PathTo, PlugAction,
    QdiscInfo, QdiscParent, RouteInfo, RouteSpec, TapSpec, Timing, TunnelSpec, VethSpec,
};
use super::{links, probe, routes, tc, tunnel};

/// Netlink and tun operations in one network namespace.
pub trait NetOps: Send + Sync {
    /// Looks a link up by name.
    ///
    /// # Errors
    /// [`Error::LinkNotFound`](super::Error::LinkNotFound) if absent,
    /// [`Error::GetLink`](super::Error::GetLink) otherwise.
    fn link(&self, name: &str) -> impl Future<Output = Result<LinkInfo>> + Send;

    /// Sets a link administratively up or down.
    ///
    /// # Errors
    /// [`Error::SetLinkState`](super::Error::SetLinkState).
    fn set_link_up(&self, link: &LinkId, up: bool) -> impl Future<Output = Result<()>> + Send;

    /// Sets the MTU.
    ///
    /// # Errors
    /// [`Error::SetMtu`](super::Error::SetMtu).
    fn set_mtu(&self, link: &LinkId, mtu: u32) -> impl Future<Output = Result<()>> + Send;

    /// Sets `txqueuelen` (decision 7's buffering without sch_plug).
    ///
    /// # Errors
    /// [`Error::SetTxQueueLen`](super::Error::SetTxQueueLen).
    fn set_txqueuelen(&self, link: &LinkId, len: u32) -> impl Future<Output = Result<()>> + Send;

    /// Sets the hardware address.
    ///
    /// # Errors
    /// [`Error::SetMac`](super::Error::SetMac).
    fn set_mac(&self, link: &LinkId, mac: MacAddr) -> impl Future<Output = Result<()>> + Send;

    /// Creates a veth pair, the peer optionally in another namespace; returns
    /// the local end.
    ///
    /// # Errors
    /// [`Error::CreateVeth`](super::Error::CreateVeth),
    /// [`Error::OpenNetns`](super::Error::OpenNetns), name validation.
    fn create_veth(&self, spec: &VethSpec) -> impl Future<Output = Result<LinkId>> + Send;

    /// Deletes a link (a veth takes its peer with it).
    ///
    /// # Errors
    /// [`Error::DeleteLink`](super::Error::DeleteLink).
    fn delete_link(&self, link: &LinkId) -> impl Future<Output = Result<()>> + Send;

    /// Moves a link into the namespace at `netns`.
    ///
    /// # Errors
    /// [`Error::MoveLink`](super::Error::MoveLink),
    /// [`Error::OpenNetns`](super::Error::OpenNetns).
    fn move_link(&self, link: &LinkId, netns: &Path) -> impl Future<Output = Result<()>> + Send;

    /// Creates a persistent tap (`TUNSETIFF` + `TUNSETPERSIST`).
    ///
    /// # Errors
    /// [`Error::OpenTun`](super::Error::OpenTun),
    /// [`Error::TapSetIff`](super::Error::TapSetIff),
    /// [`Error::TapPersist`](super::Error::TapPersist).
    fn create_tap(&self, spec: &TapSpec) -> impl Future<Output = Result<LinkId>> + Send;

    /// Adds an address.
    ///
    /// # Errors
    /// [`Error::AddAddress`](super::Error::AddAddress).
    fn add_address(&self, link: &LinkId, addr: IpPrefix) -> impl Future<Output = Result<()>> + Send;

    /// Deletes an address.
    ///
    /// # Errors
    /// [`Error::DeleteAddress`](super::Error::DeleteAddress).
    fn delete_address(&self, link: &LinkId, addr: IpPrefix) -> impl Future<Output = Result<()>> + Send;

    /// Lists a link's addresses.
    ///
    /// # Errors
    /// [`Error::GetAddresses`](super::Error::GetAddresses).
    fn addresses(&self, link: &LinkId) -> impl Future<Output = Result<Vec<IpPrefix>>> + Send;

    /// Adds a host route (fails with `EEXIST` if one exists).
    ///
    /// # Errors
    /// [`Error::AddRoute`](super::Error::AddRoute), route validation.
    fn add_route(&self, route: &RouteSpec) -> impl Future<Output = Result<()>> + Send;

    /// Replaces (or creates) a host route with one netlink message — the
    /// cutover's reaction to STOP. Returns the on-thread timing.
    ///
    /// # Errors
    /// [`Error::ReplaceRoute`](super::Error::ReplaceRoute), route validation.
    fn replace_route(&self, route: &RouteSpec) -> impl Future<Output = Result<Timing>> + Send;

    /// Deletes a host route.
    ///
    /// # Errors
    /// [`Error::DeleteRoute`](super::Error::DeleteRoute), route validation.
    fn delete_route(&self, route: &RouteSpec) -> impl Future<Output = Result<()>> + Send;

    /// Main-table routes whose destination is exactly `dest`.
    ///
    /// # Errors
    /// [`Error::GetRoutes`](super::Error::GetRoutes).
    fn routes(&self, dest: IpPrefix) -> impl Future<Output = Result<Vec<RouteInfo>>> + Send;

    /// The main-table route this namespace uses for `addr` (the longest prefix that contains it
    /// and has an output interface) and its link; `None` when no such route exists.
    ///
    /// # Errors
    /// [`Error::GetRoutes`](super::Error::GetRoutes), or a link lookup error.
    fn path_to(&self, addr: IpAddr) -> impl Future<Output = Result<Option<PathTo>>> + Send;

    /// Adds or replaces a permanent neighbour entry.
    ///
    /// # Errors
    /// [`Error::ReplaceNeighbour`](super::Error::ReplaceNeighbour).
    fn replace_neighbour(&self, neigh: &NeighbourSpec) -> impl Future<Output = Result<()>> + Send;

    /// Deletes a neighbour entry.
    ///
    /// # Errors
    /// [`Error::DeleteNeighbour`](super::Error::DeleteNeighbour).
    fn delete_neighbour(&self, dev: &LinkId, ip: IpAddr) -> impl Future<Output = Result<()>> + Send;

    /// Lists the neighbour entries of a link.
    ///
    /// # Errors
    /// [`Error::GetNeighbours`](super::Error::GetNeighbours).
    fn neighbours(&self, dev: &LinkId) -> impl Future<Output = Result<Vec<NeighbourInfo>>> + Send;

    /// Creates a tunnel link, up. Delete it with [`NetOps::delete_link`].
    ///
    /// # Errors
    /// [`Error::Unsupported`](super::Error::Unsupported) when the kernel
    /// lacks the kind, [`Error::CreateTunnel`](super::Error::CreateTunnel),
    /// tunnel validation.
    fn create_tunnel(&self, spec: &TunnelSpec) -> impl Future<Output = Result<LinkId>> + Send;

    /// Adds the ingress qdisc (`ffff:`).
    ///
    /// # Errors
    /// [`Error::AddIngress`](super::Error::AddIngress).
    fn add_ingress_qdisc(&self, link: &LinkId) -> impl Future<Output = Result<()>> + Send;

    /// Adds a u32 match-all filter on `from`'s ingress redirecting every
    /// packet to `to`'s egress (Kata's tcfilter, one direction).
    ///
    /// # Errors
    /// [`Error::AddRedirect`](super::Error::AddRedirect).
    fn add_redirect_filter(&self, from: &LinkId, to: &LinkId) -> impl Future<Output = Result<()>> + Send;

    /// Deletes the root or ingress qdisc (and the filters under it).
    ///
    /// # Errors
    /// [`Error::DeleteQdisc`](super::Error::DeleteQdisc).
    fn delete_qdisc(&self, link: &LinkId, parent: QdiscParent) -> impl Future<Output = Result<()>> + Send;

    /// Reads the qdisc at `parent`: kind and counters.
    ///
    /// # Errors
    /// [`Error::GetQdisc`](super::Error::GetQdisc).
    fn qdisc(
        &self,
        link: &LinkId,
        parent: QdiscParent,
    ) -> impl Future<Output = Result<Option<QdiscInfo>>> + Send;

    /// Installs a root plug that buffers at once, holding up to `limit_bytes`
    /// (size it with [`plug_limit_bytes`](super::plug_limit_bytes)).
    ///
    /// # Errors
    /// [`Error::Unsupported`](super::Error::Unsupported) without sch_plug,
    /// [`Error::InstallPlug`](super::Error::InstallPlug).
    fn install_plug(&self, link: &LinkId, limit_bytes: u32) -> impl Future<Output = Result<()>> + Send;

    /// Sends a plug command (buffer / release one / release indefinite).
    ///
    /// # Errors
    /// [`Error::PlugAction`](super::Error::PlugAction).
    fn plug_action(&self, link: &LinkId, action: PlugAction) -> impl Future<Output = Result<()>> + Send;

    /// Changes the plug's byte limit.
    ///
    /// # Errors
    /// [`Error::SetPlugLimit`](super::Error::SetPlugLimit).
    fn set_plug_limit(&self, link: &LinkId, limit_bytes: u32) -> impl Future<Output = Result<()>> + Send;

    /// Whether the kernel has `what` (tried in a scratch namespace).
    ///
    /// # Errors
    /// [`Error::Unsupported`](super::Error::Unsupported) when it does not;
    /// [`Error::ProbeSetup`](super::Error::ProbeSetup) when the probe could
    /// not run.
    fn probe(&self, what: Feature) -> impl Future<Output = Result<()>> + Send;
}

/// One recorded operation, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum NetOp {
    Link { name: String },
    SetLinkUp { link: LinkId, up: bool },
    SetMtu { link: LinkId, mtu: u32 },
    SetTxQueueLen { link: LinkId, len: u32 },
    SetMac { link: LinkId, mac: MacAddr },
    CreateVeth(VethSpec),
    DeleteLink { link: LinkId },
    MoveLink { link: LinkId, netns: PathBuf },
    CreateTap(TapSpec),
    AddAddress { link: LinkId, addr: IpPrefix },
    DeleteAddress { link: LinkId, addr: IpPrefix },
    Addresses { link: LinkId },
    AddRoute(RouteSpec),
    ReplaceRoute(RouteSpec),
    DeleteRoute(RouteSpec),
    Routes { dest: IpPrefix },
    PathTo { addr: IpAddr },
    ReplaceNeighbour(NeighbourSpec),
    DeleteNeighbour { dev: LinkId, ip: IpAddr },
    Neighbours { dev: LinkId },
    CreateTunnel(TunnelSpec),
    AddIngressQdisc { link: LinkId },
    AddRedirectFilter { from: LinkId, to: LinkId },
    DeleteQdisc { link: LinkId, parent: QdiscParent },
    Qdisc { link: LinkId, parent: QdiscParent },
    InstallPlug { link: LinkId, limit_bytes: u32 },
    PlugAction { link: LinkId, action: PlugAction },
    SetPlugLimit { link: LinkId, limit_bytes: u32 },
    Probe { what: Feature },
}

impl NetOp {
    /// Lookups and probes, which change nothing; tests of a cutover usually
    /// assert on the other operations only.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::Link { .. }
                | Self::Addresses { .. }
                | Self::Routes { .. }
                | Self::PathTo { .. }
                | Self::Neighbours { .. }
                | Self::Qdisc { .. }
                | Self::Probe { .. }
        )
    }
}

impl NetOps for NetnsHandle {
    async fn link(&self, name: &str) -> Result<LinkInfo> {
        let name = name.to_owned();
        self.call(move |ctx| async move { links::get_link(&ctx, &name).await }).await
    }

    async fn set_link_up(&self, link: &LinkId, up: bool) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { links::set_state(&ctx, &link, up).await }).await
    }

    async fn set_mtu(&self, link: &LinkId, mtu: u32) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { links::set_mtu(&ctx, &link, mtu).await }).await
    }

    async fn set_txqueuelen(&self, link: &LinkId, len: u32) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { links::set_txqueuelen(&ctx, &link, len).await }).await
    }

    async fn set_mac(&self, link: &LinkId, mac: MacAddr) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { links::set_mac(&ctx, &link, mac).await }).await
    }

    async fn create_veth(&self, spec: &VethSpec) -> Result<LinkId> {
        let spec = spec.clone();
        self.call(move |ctx| async move { links::create_veth(&ctx, &spec).await }).await
    }

    async fn delete_link(&self, link: &LinkId) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { links::delete_link(&ctx, &link).await }).await
    }

    async fn move_link(&self, link: &LinkId, netns: &Path) -> Result<()> {
        let link = link.clone();
        let netns = netns.to_owned();
        self.call(move |ctx| async move { links::move_link(&ctx, &link, &netns).await }).await
    }

    async fn create_tap(&self, spec: &TapSpec) -> Result<LinkId> {
        let spec = spec.clone();
        self.call(move |ctx| async move { links::create_tap(&ctx, &spec).await }).await
    }

    async fn add_address(&self, link: &LinkId, addr: IpPrefix) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { links::add_address(&ctx, &link, addr).await }).await
    }

    async fn delete_address(&self, link: &LinkId, addr: IpPrefix) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { links::delete_address(&ctx, &link, addr).await }).await
    }

    async fn addresses(&self, link: &LinkId) -> Result<Vec<IpPrefix>> {
        let link = link.clone();
        self.call(move |ctx| async move { links::addresses(&ctx, &link).await }).await
    }

    async fn add_route(&self, route: &RouteSpec) -> Result<()> {
        let route = route.clone();
        self.call(move |ctx| async move { routes::add_route(&ctx, &route).await }).await
    }

    async fn replace_route(&self, route: &RouteSpec) -> Result<Timing> {
        let route = route.clone();
        self.call(move |ctx| async move { routes::replace_route(&ctx, &route).await }).await
    }

    async fn delete_route(&self, route: &RouteSpec) -> Result<()> {
        let route = route.clone();
        self.call(move |ctx| async move { routes::delete_route(&ctx, &route).await }).await
    }

    async fn routes(&self, dest: IpPrefix) -> Result<Vec<RouteInfo>> {
        self.call(move |ctx| async move { routes::routes(&ctx, dest).await }).await
    }

    async fn path_to(&self, addr: IpAddr) -> Result<Option<PathTo>> {
        self.call(move |ctx| async move {
            let Some(route) = routes::route_to(&ctx, addr).await? else { return Ok(None) };
            let Some(index) = route.oif else { return Ok(None) };
            let link = links::get_link_by_index(&ctx, index).await?;
            Ok(Some(PathTo { route, link }))
        })
        .await
    }

    async fn replace_neighbour(&self, neigh: &NeighbourSpec) -> Result<()> {
        let neigh = neigh.clone();
        self.call(move |ctx| async move { routes::replace_neighbour(&ctx, &neigh).await }).await
    }

    async fn delete_neighbour(&self, dev: &LinkId, ip: IpAddr) -> Result<()> {
        let dev = dev.clone();
        self.call(move |ctx| async move { routes::delete_neighbour(&ctx, &dev, ip).await }).await
    }

    async fn neighbours(&self, dev: &LinkId) -> Result<Vec<NeighbourInfo>> {
        let dev = dev.clone();
        self.call(move |ctx| async move { routes::neighbours(&ctx, &dev).await }).await
    }

    async fn create_tunnel(&self, spec: &TunnelSpec) -> Result<LinkId> {
        let spec = spec.clone();
        self.call(move |ctx| async move {
            tunnel::create_tunnel(&ctx, &spec).await?;
            Ok(links::get_link(&ctx, &spec.name).await?.id)
        })
        .await
    }

    async fn add_ingress_qdisc(&self, link: &LinkId) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { tc::add_ingress(&ctx, &link).await }).await
    }

    async fn add_redirect_filter(&self, from: &LinkId, to: &LinkId) -> Result<()> {
        let (from, to) = (from.clone(), to.clone());
        self.call(move |ctx| async move { tc::add_redirect(&ctx, &from, &to).await }).await
    }

    async fn delete_qdisc(&self, link: &LinkId, parent: QdiscParent) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { tc::delete_qdisc(&ctx, &link, parent).await }).await
    }

    async fn qdisc(&self, link: &LinkId, parent: QdiscParent) -> Result<Option<QdiscInfo>> {
        let link = link.clone();
        self.call(move |ctx| async move { tc::get_qdisc(&ctx, &link, parent).await }).await
    }

    async fn install_plug(&self, link: &LinkId, limit_bytes: u32) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { tc::install_plug(&ctx, &link, limit_bytes).await }).await
    }

    async fn plug_action(&self, link: &LinkId, action: PlugAction) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { tc::plug_action(&ctx, &link, action).await }).await
    }

    async fn set_plug_limit(&self, link: &LinkId, limit_bytes: u32) -> Result<()> {
        let link = link.clone();
        self.call(move |ctx| async move { tc::set_plug_limit(&ctx, &link, limit_bytes).await }).await
    }

    async fn probe(&self, what: Feature) -> Result<()> {
        probe::probe(what).await
    }
}
