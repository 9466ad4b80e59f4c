//! A [`NetOps`] fake that records every call.
//!
//! It keeps a small link table so that create → look up → delete flows work
//! (created links get increasing indexes from 100), answers route, neighbour,
//! address and qdisc queries from canned values, reports the kernel features
//! marked missing as [`Error::Unsupported`], and fails the operations a test
//! selects with [`Error::Injected`] (after recording them) to exercise
//! cleanup paths.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use super::error::{Error, Result};
use super::ops::{NetOp, NetOps};

/// `RTPROT_STATIC`: the protocol a route without one gets (as `routes.rs` sends it).
const RTPROT_STATIC: u8 = 4;
use super::types::{
    Feature, IpPrefix, LinkId, LinkInfo, MacAddr, NeighbourInfo, NeighbourSpec, OperState, PathTo,
    PlugAction, QdiscInfo, QdiscParent, RouteInfo, RouteSpec, TapSpec, Timing, TunnelSpec, VethSpec,
};
use super::validate::{validate_ifname, validate_route, validate_tunnel};

type FailWhen = Box<dyn Fn(&NetOp) -> bool + Send + Sync>;

/// Records operations instead of doing them.
#[derive(Default)]
pub struct Recording {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    ops: Vec<NetOp>,
    links: BTreeMap<String, LinkInfo>,
    next_index: u32,
    routes: HashMap<IpPrefix, Vec<RouteInfo>>,
    neighbours: HashMap<String, Vec<NeighbourInfo>>,
    addresses: HashMap<String, Vec<IpPrefix>>,
    qdiscs: HashMap<(String, QdiscParent), QdiscInfo>,
    missing: BTreeSet<Feature>,
    fail_when: Vec<FailWhen>,
}

impl fmt::Debug for Recording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Recording")
            .field("ops", &st.ops)
            .field("links", &st.links.keys().collect::<Vec<_>>())
            .field("missing", &st.missing)
            .field("fail_rules", &st.fail_when.len())
            .finish()
    }
}

/// A plausible link for the fake's table.
pub fn fake_link(index: u32, name: &str, kind: Option<&str>) -> LinkInfo {
    LinkInfo {
        id: LinkId { index, name: name.to_owned() },
        mac: Some(MacAddr([0x02, 0, 0, 0, (index >> 8) as u8, index as u8])),
        mtu: 1500,
        txqueuelen: 1000,
        admin_up: false,
        oper: OperState::Down,
        kind: kind.map(str::to_owned),
        tun: None,
        tunnel: None,
    }
}

impl Recording {
    /// An empty fake: no links, every feature present, nothing fails.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the record from the others.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a link the fake will find by name.
    pub fn with_link(self, info: LinkInfo) -> Self {
        {
            let mut st = self.lock();
            st.next_index = st.next_index.max(info.id.index.saturating_add(1));
            st.links.insert(info.id.name.clone(), info);
        }
        self
    }

    /// Marks a kernel feature missing.
    pub fn without(self, what: Feature) -> Self {
        self.lock().missing.insert(what);
        self
    }

    /// Canned answer for [`NetOps::routes`].
    pub fn with_routes(self, dest: IpPrefix, routes: Vec<RouteInfo>) -> Self {
        self.lock().routes.insert(dest, routes);
        self
    }

    /// Canned answer for [`NetOps::neighbours`] of the link named `dev`.
    pub fn with_neighbours(self, dev: &str, n: Vec<NeighbourInfo>) -> Self {
        self.lock().neighbours.insert(dev.to_owned(), n);
        self
    }

    /// Canned answer for [`NetOps::addresses`] of the link named `link`.
    pub fn with_addresses(self, link: &str, a: Vec<IpPrefix>) -> Self {
        self.lock().addresses.insert(link.to_owned(), a);
        self
    }

    /// Canned answer for [`NetOps::qdisc`].
    pub fn with_qdisc(self, link: &str, parent: QdiscParent, q: QdiscInfo) -> Self {
        self.lock().qdiscs.insert((link.to_owned(), parent), q);
        self
    }

    /// Every operation matching `pred` fails with [`Error::Injected`] (it is
    /// still recorded).
    pub fn fail_when(self, pred: impl Fn(&NetOp) -> bool + Send + Sync + 'static) -> Self {
        self.lock().fail_when.push(Box::new(pred));
        self
    }

    /// Everything recorded so far, in call order.
    pub fn ops(&self) -> Vec<NetOp> {
        self.lock().ops.clone()
    }

    /// The recorded operations that change state (see [`NetOp::is_read_only`]).
    pub fn mutations(&self) -> Vec<NetOp> {
        self.lock().ops.iter().filter(|op| !op.is_read_only()).cloned().collect()
    }

    /// Returns and forgets the record.
    pub fn take_ops(&self) -> Vec<NetOp> {
        std::mem::take(&mut self.lock().ops)
    }

    /// Records `op`; fails it if a rule says so.
    fn record(&self, op: NetOp) -> Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        let fail = st.fail_when.iter().any(|p| p(&op));
        let text = format!("{op:?}");
        st.ops.push(op);
        if fail {
            return Err(Error::Injected { op: text });
        }
        Ok(st)
    }

    fn add_link(st: &mut State, name: &str, kind: &str) -> LinkId {
        let index = st.next_index.max(100);
        st.next_index = index.saturating_add(1);
        let info = fake_link(index, name, Some(kind));
        let id = info.id.clone();
        st.links.insert(name.to_owned(), info);
        id
    }

    fn require(st: &State, what: Feature) -> Result<()> {
        if st.missing.contains(&what) {
            return Err(Error::Unsupported {
                what,
                source: io::Error::from_raw_os_error(match what {
                    Feature::Plug => libc::ENOENT,
                    _ => libc::EOPNOTSUPP,
                }),
            });
        }
        Ok(())
    }

    fn update(st: &mut State, link: &LinkId, f: impl FnOnce(&mut LinkInfo)) {
        if let Some(l) = st.links.get_mut(&link.name) {
            f(l);
        }
    }
}

impl NetOps for Recording {
    async fn link(&self, name: &str) -> Result<LinkInfo> {
        let st = self.record(NetOp::Link { name: name.to_owned() })?;
        st.links.get(name).cloned().ok_or_else(|| Error::LinkNotFound {
            name: name.to_owned(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        })
    }

    async fn set_link_up(&self, link: &LinkId, up: bool) -> Result<()> {
        let mut st = self.record(NetOp::SetLinkUp { link: link.clone(), up })?;
        Self::update(&mut st, link, |l| {
            l.admin_up = up;
            l.oper = if up { OperState::Up } else { OperState::Down };
        });
        Ok(())
    }

    async fn set_mtu(&self, link: &LinkId, mtu: u32) -> Result<()> {
        let mut st = self.record(NetOp::SetMtu { link: link.clone(), mtu })?;
        Self::update(&mut st, link, |l| l.mtu = mtu);
        Ok(())
    }

    async fn set_txqueuelen(&self, link: &LinkId, len: u32) -> Result<()> {
        let mut st = self.record(NetOp::SetTxQueueLen { link: link.clone(), len })?;
        Self::update(&mut st, link, |l| l.txqueuelen = len);
        Ok(())
    }

    async fn set_mac(&self, link: &LinkId, mac: MacAddr) -> Result<()> {
        let mut st = self.record(NetOp::SetMac { link: link.clone(), mac })?;
        Self::update(&mut st, link, |l| l.mac = Some(mac));
        Ok(())
    }

    async fn create_veth(&self, spec: &VethSpec) -> Result<LinkId> {
        let mut st = self.record(NetOp::CreateVeth(spec.clone()))?;
        validate_ifname(&spec.name)?;
        validate_ifname(&spec.peer)?;
        let id = Self::add_link(&mut st, &spec.name, "veth");
        if spec.peer_netns.is_none() {
            Self::add_link(&mut st, &spec.peer, "veth");
        }
        Ok(id)
    }

    async fn delete_link(&self, link: &LinkId) -> Result<()> {
        let mut st = self.record(NetOp::DeleteLink { link: link.clone() })?;
        st.links.remove(&link.name);
        // Like the kernel: routes through a deleted link go with it.
        for routes in st.routes.values_mut() {
            routes.retain(|r| r.oif != Some(link.index));
        }
        Ok(())
    }

    async fn move_link(&self, link: &LinkId, netns: &Path) -> Result<()> {
        let mut st = self.record(NetOp::MoveLink { link: link.clone(), netns: netns.to_owned() })?;
        st.links.remove(&link.name);
        Ok(())
    }

    async fn create_tap(&self, spec: &TapSpec) -> Result<LinkId> {
        let mut st = self.record(NetOp::CreateTap(spec.clone()))?;
        validate_ifname(&spec.name)?;
        Ok(Self::add_link(&mut st, &spec.name, "tun"))
    }

    async fn add_address(&self, link: &LinkId, addr: IpPrefix) -> Result<()> {
        self.record(NetOp::AddAddress { link: link.clone(), addr }).map(drop)
    }

    async fn delete_address(&self, link: &LinkId, addr: IpPrefix) -> Result<()> {
        self.record(NetOp::DeleteAddress { link: link.clone(), addr }).map(drop)
    }

    async fn addresses(&self, link: &LinkId) -> Result<Vec<IpPrefix>> {
        let st = self.record(NetOp::Addresses { link: link.clone() })?;
        Ok(st.addresses.get(&link.name).cloned().unwrap_or_default())
    }

    async fn add_route(&self, route: &RouteSpec) -> Result<()> {
        drop(self.record(NetOp::AddRoute(route.clone()))?);
        validate_route(route)
    }

    async fn replace_route(&self, route: &RouteSpec) -> Result<Timing> {
        let mut st = self.record(NetOp::ReplaceRoute(route.clone()))?;
        validate_route(route)?;
        // Like the kernel: the route to that prefix is now this one.
        st.routes.insert(
            route.dest,
            vec![RouteInfo {
                dest: route.dest,
                gateway: route.gateway,
                oif: Some(route.dev.index),
                onlink: route.onlink,
                protocol: route.protocol.unwrap_or(RTPROT_STATIC),
            }],
        );
        Ok(Timing { sent: SystemTime::now(), elapsed: Duration::ZERO })
    }

    async fn delete_route(&self, route: &RouteSpec) -> Result<()> {
        let mut st = self.record(NetOp::DeleteRoute(route.clone()))?;
        validate_route(route)?;
        if let Some(routes) = st.routes.get_mut(&route.dest) {
            routes.retain(|r| r.oif != Some(route.dev.index));
        }
        Ok(())
    }

    async fn routes(&self, dest: IpPrefix) -> Result<Vec<RouteInfo>> {
        let st = self.record(NetOp::Routes { dest })?;
        Ok(st.routes.get(&dest).cloned().unwrap_or_default())
    }

    async fn path_to(&self, addr: IpAddr) -> Result<Option<PathTo>> {
        let st = self.record(NetOp::PathTo { addr })?;
        let all: Vec<RouteInfo> = st.routes.values().flatten().cloned().collect();
        let Some(route) = super::routes::longest_match(&all, addr) else { return Ok(None) };
        let Some(index) = route.oif else { return Ok(None) };
        let link = st.links.values().find(|l| l.id.index == index).cloned();
        Ok(link.map(|link| PathTo { route: route.clone(), link }))
    }

    async fn replace_neighbour(&self, neigh: &NeighbourSpec) -> Result<()> {
        self.record(NetOp::ReplaceNeighbour(neigh.clone())).map(drop)
    }

    async fn delete_neighbour(&self, dev: &LinkId, ip: IpAddr) -> Result<()> {
        self.record(NetOp::DeleteNeighbour { dev: dev.clone(), ip }).map(drop)
    }

    async fn neighbours(&self, dev: &LinkId) -> Result<Vec<NeighbourInfo>> {
        let st = self.record(NetOp::Neighbours { dev: dev.clone() })?;
        Ok(st.neighbours.get(&dev.name).cloned().unwrap_or_default())
    }

    async fn create_tunnel(&self, spec: &TunnelSpec) -> Result<LinkId> {
        let mut st = self.record(NetOp::CreateTunnel(spec.clone()))?;
        validate_tunnel(spec)?;
        Self::require(&st, spec.mode.feature())?;
        let id = Self::add_link(&mut st, &spec.name, spec.mode.kind());
        Self::update(&mut st, &id, |l| {
            l.admin_up = true;
            l.tunnel = Some(super::types::TunnelDetails {
                local: Some(spec.local),
                remote: Some(spec.remote),
                ttl: Some(spec.ttl),
            });
        });
        Ok(id)
    }

    async fn add_ingress_qdisc(&self, link: &LinkId) -> Result<()> {
        self.record(NetOp::AddIngressQdisc { link: link.clone() }).map(drop)
    }

    async fn add_redirect_filter(&self, from: &LinkId, to: &LinkId) -> Result<()> {
        self.record(NetOp::AddRedirectFilter { from: from.clone(), to: to.clone() }).map(drop)
    }

    async fn delete_qdisc(&self, link: &LinkId, parent: QdiscParent) -> Result<()> {
        self.record(NetOp::DeleteQdisc { link: link.clone(), parent }).map(drop)
    }

    async fn qdisc(&self, link: &LinkId, parent: QdiscParent) -> Result<Option<QdiscInfo>> {
        let st = self.record(NetOp::Qdisc { link: link.clone(), parent })?;
        Ok(st.qdiscs.get(&(link.name.clone(), parent)).cloned())
    }

    async fn install_plug(&self, link: &LinkId, limit_bytes: u32) -> Result<()> {
        let st = self.record(NetOp::InstallPlug { link: link.clone(), limit_bytes })?;
        Self::require(&st, Feature::Plug)
    }

    async fn plug_action(&self, link: &LinkId, action: PlugAction) -> Result<()> {
        self.record(NetOp::PlugAction { link: link.clone(), action }).map(drop)
    }

    async fn set_plug_limit(&self, link: &LinkId, limit_bytes: u32) -> Result<()> {
        self.record(NetOp::SetPlugLimit { link: link.clone(), limit_bytes }).map(drop)
    }

    async fn probe(&self, what: Feature) -> Result<()> {
        let st = self.record(NetOp::Probe { what })?;
        Self::require(&st, what)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn uplink_is_the_link_of_the_longest_matching_route() {
        let route = |dest: &str, oif| RouteInfo {
            dest: dest.parse().unwrap(),
            gateway: None,
            oif: Some(oif),
            onlink: false,
            protocol: 0,
        };
        let rec = Recording::new()
            .with_link(fake_link(2, "eth0", None))
            .with_link(fake_link(3, "eth1", None))
            .with_routes("0.0.0.0/0".parse().unwrap(), vec![route("0.0.0.0/0", 3)])
            .with_routes("10.201.0.0/24".parse().unwrap(), vec![route("10.201.0.0/24", 2)]);
        let up = |a: &str| block_on(rec.path_to(a.parse().unwrap())).unwrap().map(|p| p.link.id.name);
        assert_eq!(up("10.201.0.12").as_deref(), Some("eth0"), "the /24 beats the default route");
        assert_eq!(up("192.0.2.9").as_deref(), Some("eth1"), "else the default route");
        assert_eq!(up("fd00::1"), None, "no IPv6 route");
    }

    #[test]
    fn an_address_routed_straight_to_a_veth_or_a_bridge_is_a_local_pods() {
        let route = |dest: &str, gateway: Option<&str>, oif| RouteInfo {
            dest: dest.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            oif: Some(oif),
            onlink: gateway.is_some(),
            protocol: 4,
        };
        let rec = Recording::new()
            .with_link(fake_link(2, "eth0", Some("veth")))
            .with_link(fake_link(3, "cali1234", Some("veth")))
            .with_link(fake_link(4, "cni0", Some("bridge")))
            .with_link(fake_link(5, "kmrs0", Some("ipip")))
            .with_link(fake_link(6, "ens3", None))
            .with_routes("0.0.0.0/0".parse().unwrap(), vec![route("0.0.0.0/0", Some("10.201.0.1"), 2)])
            .with_routes("10.244.1.10/32".parse().unwrap(), vec![route("10.244.1.10/32", None, 3)])
            .with_routes("10.244.2.0/24".parse().unwrap(), vec![route("10.244.2.0/24", None, 4)])
            .with_routes("10.244.3.10/32".parse().unwrap(), vec![route("10.244.3.10/32", None, 5)])
            .with_routes(
                "10.244.4.10/32".parse().unwrap(),
                vec![route("10.244.4.10/32", Some("10.201.0.12"), 2)],
            )
            .with_routes("10.244.5.0/24".parse().unwrap(), vec![route("10.244.5.0/24", None, 6)])
            .with_routes("10.244.6.0/24".parse().unwrap(), vec![route("10.244.6.0/24", None, 2)]);
        let path = |a: &str| block_on(rec.path_to(a.parse().unwrap())).unwrap();
        let kinds = |a: &str| path(a).map(|p| (p.is_pod_route(), p.is_pod_subnet()));
        assert_eq!(kinds("10.244.1.10"), Some((true, false)), "a calico-style pod route to its veth");
        assert_eq!(kinds("10.244.2.7"), Some((false, true)), "a pod subnet behind the node's bridge");
        assert_eq!(kinds("10.244.3.10"), Some((false, false)), "a forward into a tunnel");
        assert_eq!(
            kinds("10.244.4.10"),
            Some((false, false)),
            "a forward via another node, out of a veth uplink"
        );
        assert_eq!(kinds("10.244.5.9"), Some((false, false)), "a subnet on a physical interface");
        assert_eq!(
            kinds("10.244.6.9"),
            Some((false, false)),
            "a connected subnet on a veth uplink is no pod's"
        );
        assert_eq!(kinds("192.0.2.9"), Some((false, false)), "the default route has a next hop");
        assert_eq!(kinds("fd00::1"), None, "no route at all");
        // Behind the bridge, a pod is one that answers.
        let seen = |ip: &str, mac: bool| NeighbourInfo {
            ip: ip.parse().unwrap(),
            mac: mac.then_some(MacAddr([2, 0, 0, 0, 0, 7])),
            permanent: false,
        };
        let table = [seen("10.244.2.7", true), seen("10.244.2.8", false)];
        assert!(PathTo::answers_on_bridge("10.244.2.7".parse().unwrap(), &table), "a live pod");
        assert!(!PathTo::answers_on_bridge("10.244.2.8".parse().unwrap(), &table), "an unresolved entry");
        assert!(!PathTo::answers_on_bridge("10.244.2.9".parse().unwrap(), &table), "no entry: a paused VM");
    }

    /// A cutover-shaped sequence, to show what engine tests can assert.
    async fn cutover<N: NetOps>(net: &N, vm: IpAddr, peer: IpAddr) -> Result<()> {
        let tap = net.link("tap0_kata").await?.id;
        let tnl = net
            .create_tunnel(&TunnelSpec {
                name: "kt-tnl0".into(),
                mode: super::super::TunnelMode::Ipip,
                local: "192.0.2.1".parse().unwrap(),
                remote: "192.0.2.2".parse().unwrap(),
                ttl: 64,
            })
            .await?;
        net.replace_route(&RouteSpec::via_onlink(IpPrefix::host(vm), peer, tnl.clone())).await?;
        net.replace_route(&RouteSpec::dev(IpPrefix::host(vm), tap)).await?;
        net.delete_link(&tnl).await
    }

    #[test]
    fn records_the_exact_sequence() {
        let rec = Recording::new().with_link(fake_link(4, "tap0_kata", Some("tun")));
        let vm: IpAddr = "10.0.0.5".parse().unwrap();
        let peer: IpAddr = "192.0.2.2".parse().unwrap();
        block_on(cutover(&rec, vm, peer)).unwrap();
        let tap = LinkId { index: 4, name: "tap0_kata".into() };
        let tnl = LinkId { index: 100, name: "kt-tnl0".into() };
        let ops = rec.mutations();
        assert_eq!(ops.len(), 4, "{ops:#?}");
        assert!(matches!(&ops[0], NetOp::CreateTunnel(s) if s.name == "kt-tnl0"));
        assert_eq!(ops[1], NetOp::ReplaceRoute(RouteSpec::via_onlink(IpPrefix::host(vm), peer, tnl.clone())));
        assert_eq!(ops[2], NetOp::ReplaceRoute(RouteSpec::dev(IpPrefix::host(vm), tap)));
        assert_eq!(ops[3], NetOp::DeleteLink { link: tnl });
        assert_eq!(rec.ops()[0], NetOp::Link { name: "tap0_kata".into() });
        assert_eq!(rec.take_ops().len(), 5);
        assert!(rec.ops().is_empty());
    }

    #[test]
    fn injected_failure_is_recorded_and_stops_the_flow() {
        let rec = Recording::new()
            .with_link(fake_link(4, "tap0_kata", Some("tun")))
            .fail_when(|op| matches!(op, NetOp::ReplaceRoute(r) if r.gateway.is_some()));
        let err =
            block_on(cutover(&rec, "10.0.0.5".parse().unwrap(), "192.0.2.2".parse().unwrap())).unwrap_err();
        assert!(matches!(err, Error::Injected { .. }), "{err}");
        assert!(err.to_string().contains("ReplaceRoute"), "{err}");
        let ops = rec.mutations();
        assert_eq!(ops.len(), 2);
        assert!(matches!(ops.last(), Some(NetOp::ReplaceRoute(_))));
    }

    #[test]
    fn missing_features_are_unsupported() {
        let rec = Recording::new().without(Feature::Plug).without(Feature::Ipip);
        let tap = LinkId { index: 4, name: "tap0_kata".into() };
        let e = block_on(rec.install_plug(&tap, 1 << 20)).unwrap_err();
        assert!(e.is_unsupported() && e.errno() == Some(libc::ENOENT), "{e}");
        assert!(block_on(rec.probe(Feature::Ipip)).unwrap_err().is_unsupported());
        block_on(rec.probe(Feature::Gre)).unwrap();
        // Buffering falls back to the tap's own queue (decision 7).
        block_on(rec.set_txqueuelen(&tap, 10_000)).unwrap();
        assert_eq!(
            rec.mutations(),
            vec![
                NetOp::InstallPlug { link: tap.clone(), limit_bytes: 1 << 20 },
                NetOp::SetTxQueueLen { link: tap, len: 10_000 },
            ]
        );
    }

    #[test]
    fn link_table_follows_create_update_delete() {
        let rec = Recording::new();
        let v =
            block_on(rec.create_veth(&VethSpec { name: "v0".into(), peer: "v1".into(), peer_netns: None }))
                .unwrap();
        block_on(rec.set_mtu(&v, 1450)).unwrap();
        block_on(rec.set_link_up(&v, true)).unwrap();
        let info = block_on(rec.link("v0")).unwrap();
        assert_eq!((info.mtu, info.admin_up, info.kind.as_deref()), (1450, true, Some("veth")));
        assert!(block_on(rec.link("v1")).is_ok());
        block_on(rec.delete_link(&v)).unwrap();
        let e = block_on(rec.link("v0")).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        // Validation still applies in the fake.
        let bad = block_on(rec.replace_route(&RouteSpec::dev("10.0.0.0/24".parse().unwrap(), v)));
        assert!(matches!(bad, Err(Error::InvalidRoute { .. })));
    }
}
