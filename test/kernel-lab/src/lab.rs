//! Building blocks of the checks' topologies, all through katamaran's own netlink code: named
//! network namespaces with a [`NetnsHandle`] each, veth wires with addresses and permanent
//! neighbours, sysctls and sockets inside a namespace.
//!
//! Every namespace is removed when its [`Node`] is dropped, so a failing check leaves nothing
//! behind; the links inside go with their namespace.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use katamaran::net::{
    create_netns_in, remove_netns, IpPrefix, LinkId, MacAddr, NeighbourSpec, NetOps, NetnsHandle, NetnsRoots,
    OperState, RouteSpec, VethSpec,
};
use nix::sched::{sched_setaffinity, setns, CloneFlags, CpuSet};
use nix::unistd::Pid;
use tracing::warn;

use crate::error::{CheckError, Result, Step};

/// Where the lab's namespaces live (`ip netns` reads the same directory).
pub const NETNS_DIR: &str = "/run/netns";

/// How often conditions are polled while waiting.
const POLL: Duration = Duration::from_millis(5);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The roots the lab validates its namespace paths against: `/run/netns` only.
pub fn roots() -> NetnsRoots {
    NetnsRoots { dirs: vec![PathBuf::from(NETNS_DIR)], proc: None }
}

/// A named network namespace with its namespace thread; removed on drop.
#[derive(Debug)]
pub struct Node {
    /// Role in the topology, for messages (`node-a`, `client`, …).
    pub name: String,
    // Fields drop in order: the thread (which pins the namespace) ends before the name goes.
    handle: NetnsHandle,
    ns: NsFile,
}

/// The namespace's file under `/run/netns`; unmounted and removed on drop.
#[derive(Debug)]
struct NsFile(PathBuf);

impl Drop for NsFile {
    fn drop(&mut self) {
        if let Err(e) = remove_netns(&self.0) {
            warn!(netns = %self.0.display(), error = %e, "failed to remove a lab namespace");
        }
    }
}

impl Node {
    /// Creates `/run/netns/klab-<pid>-<n>-<name>` with IPv6 duplicate address detection off
    /// (lab addresses are unique by construction; DAD would keep them unusable for a second)
    /// and reverse-path filtering off (a migrated VM's replies leave through a different
    /// interface than the one its route points to).
    ///
    /// # Errors
    /// When the namespace cannot be created or entered, or a sysctl cannot be written.
    pub async fn new(name: &str) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("{NETNS_DIR}/klab-{}-{n}-{name}", std::process::id()));
        create_netns_in(&path, &roots()).step(format!("create the {name} network namespace"))?;
        // From here on the guard removes the namespace, whatever fails next.
        let ns = NsFile(path);
        let handle =
            NetnsHandle::open_in(&ns.0, &roots()).step(format!("open the {name} network namespace"))?;
        let node = Self { name: name.to_owned(), handle, ns };
        for (key, value) in [
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
        ] {
            node.sysctl(key, value).await?;
        }
        Ok(node)
    }

    /// A namespace whose links get no IPv6 at all: no link-local address, hence none of the
    /// router solicitations and MLD reports a new link sends, which a plug would hold and
    /// count next to the traffic under test. Call before creating its links.
    ///
    /// # Errors
    /// When a sysctl cannot be written.
    pub async fn without_ipv6(self) -> Result<Self> {
        self.sysctl("net/ipv6/conf/all/disable_ipv6", "1").await?;
        self.sysctl("net/ipv6/conf/default/disable_ipv6", "1").await?;
        Ok(self)
    }

    /// [`Node::without_ipv6`] when `ipv4_only` (a lab whose VM is IPv4), else unchanged.
    ///
    /// # Errors
    /// When a sysctl cannot be written.
    pub async fn without_ipv6_if(self, ipv4_only: bool) -> Result<Self> {
        if ipv4_only {
            self.without_ipv6().await
        } else {
            Ok(self)
        }
    }

    /// A namespace that forwards IPv4 and IPv6 (a Kubernetes node).
    ///
    /// # Errors
    /// As [`Node::new`].
    pub async fn router(name: &str) -> Result<Self> {
        let node = Self::new(name).await?;
        node.sysctl("net/ipv4/ip_forward", "1").await?;
        node.sysctl("net/ipv6/conf/all/forwarding", "1").await?;
        Ok(node)
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.ns.0
    }

    /// The namespace thread's handle: every [`NetOps`] operation.
    pub fn net(&self) -> &NetnsHandle {
        &self.handle
    }

    /// Writes `/proc/sys/<key>` as seen from inside the namespace (the `net/` sysctls are per
    /// namespace, resolved for the thread that opens the file).
    ///
    /// # Errors
    /// [`CheckError::Io`] when the write fails.
    pub async fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let file = format!("/proc/sys/{key}");
        let what = format!("set {key}={value} in {}", self.name);
        let value = value.to_owned();
        self.net().run(move || std::fs::write(file, value)).await.step(what.clone())?.step(what)
    }

    /// Binds a UDP socket inside the namespace; the socket stays in it wherever it is used.
    ///
    /// # Errors
    /// [`CheckError::Io`] when the bind fails.
    pub async fn udp(&self, addr: SocketAddr) -> Result<UdpSocket> {
        let what = format!("bind UDP {addr} in {}", self.name);
        self.net().run(move || UdpSocket::bind(addr)).await.step(what.clone())?.step(what)
    }

    /// Looks a link up and sets it up.
    ///
    /// # Errors
    /// [`CheckError::Net`].
    pub async fn up(&self, name: &str) -> Result<LinkId> {
        let id = self.net().link(name).await.step(format!("find {name} in {}", self.name))?.id;
        self.net().set_link_up(&id, true).await.step(format!("set {name} up in {}", self.name))?;
        Ok(id)
    }

    /// The hardware address of a link.
    ///
    /// # Errors
    /// [`CheckError::Net`], or [`CheckError::Unexpected`] for a link without one.
    pub async fn mac(&self, link: &LinkId) -> Result<MacAddr> {
        let info = self.net().link(&link.name).await.step(format!("read {} in {}", link.name, self.name))?;
        info.mac
            .ok_or_else(|| CheckError::Unexpected(format!("{} in {} has no MAC address", link, self.name)))
    }

    /// Adds an address.
    ///
    /// # Errors
    /// [`CheckError::Net`].
    pub async fn address(&self, link: &LinkId, addr: IpPrefix) -> Result<()> {
        self.net().add_address(link, addr).await.step(format!("add {addr} to {} in {}", link.name, self.name))
    }

    /// Adds a permanent neighbour entry, so no ARP/ND is on the path under test.
    ///
    /// # Errors
    /// [`CheckError::Net`].
    pub async fn neighbour(&self, link: &LinkId, ip: IpAddr, mac: MacAddr) -> Result<()> {
        let spec = NeighbourSpec { dev: link.clone(), ip, mac };
        self.net()
            .replace_neighbour(&spec)
            .await
            .step(format!("add neighbour {ip} on {} in {}", link.name, self.name))
    }

    /// Adds a host route.
    ///
    /// # Errors
    /// [`CheckError::Net`].
    pub async fn route(&self, route: &RouteSpec) -> Result<()> {
        self.net().add_route(route).await.step(format!("add route {} in {}", route.dest, self.name))
    }

    /// Runs `f` on a new thread inside this namespace (for code that creates its own sockets,
    /// such as the probe). The thread ends with `f`.
    ///
    /// # Errors
    /// [`CheckError::Io`] when the thread cannot start.
    pub fn spawn_inside<T, F>(&self, thread: &str, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let path = self.ns.0.clone();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(thread.to_owned())
            .spawn(move || {
                let ns = File::open(&path).step(format!("open the {name} namespace"))?;
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
                    .step(format!("enter the {name} namespace"))?;
                f()
            })
            .step(format!("start the {thread} thread"))
    }
}

/// Two ends of a veth between two namespaces, both up.
#[derive(Debug, Clone)]
pub struct Wire {
    /// The end in the first namespace.
    pub a: LinkId,
    /// Its MAC.
    pub a_mac: MacAddr,
    /// The end in the second namespace.
    pub b: LinkId,
    /// Its MAC.
    pub b_mac: MacAddr,
}

/// Creates a veth `a_name` (in `a`) ─ `b_name` (in `b`), sets both ends up and waits until both
/// are operationally up.
///
/// # Errors
/// [`CheckError::Net`], or [`CheckError::Timeout`] when the link does not come up.
pub async fn wire(a: &Node, a_name: &str, b: &Node, b_name: &str) -> Result<Wire> {
    let spec = VethSpec { name: a_name.into(), peer: b_name.into(), peer_netns: Some(b.path().to_owned()) };
    a.net()
        .create_veth(&spec)
        .await
        .step(format!("create veth {a_name} ({}) ─ {b_name} ({})", a.name, b.name))?;
    let a_id = a.up(a_name).await?;
    let b_id = b.up(b_name).await?;
    let (a_mac, b_mac) = (a.mac(&a_id).await?, b.mac(&b_id).await?);
    let what = format!("veth {a_name} ─ {b_name} to be up");
    wait_until(Duration::from_secs(10), &what, || async {
        let oper = |n: &Node, name: &str| {
            let (h, name) = (n.net().clone(), name.to_owned());
            async move { h.link(&name).await.map(|l| l.oper == OperState::Up).unwrap_or(false) }
        };
        oper(a, a_name).await && oper(b, b_name).await
    })
    .await?;
    Ok(Wire { a: a_id, a_mac, b: b_id, b_mac })
}

/// Pins the calling thread (and the threads it starts later) to CPU 0 when there is more than
/// one: the traffic's threads (probe, echoes) then share one CPU and never migrate between
/// two, which would let veth deliver their packets through two per-CPU backlogs out of order,
/// and the engine's threads keep the other CPU to react on. Best effort.
pub fn pin_to_traffic_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        return;
    }
    let mut set = CpuSet::new();
    if set.set(0).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Polls `check` until it returns true.
///
/// # Errors
/// [`CheckError::Timeout`] when `limit` passes first.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CheckError::Timeout { what: what.to_owned(), limit });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`wait_until`] for a check that can fail: its error ends the wait.
///
/// # Errors
/// The check's error, or [`CheckError::Timeout`].
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CheckError::Timeout { what: what.to_owned(), limit });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A host prefix from an address.
pub fn host(ip: IpAddr) -> IpPrefix {
    IpPrefix::host(ip)
}

/// A prefix from an address and a length that fits its family (the lab's constants).
///
/// # Errors
/// [`CheckError::Unexpected`] for a length too long for the family.
pub fn prefix(ip: IpAddr, len: u8) -> Result<IpPrefix> {
    IpPrefix::new(ip, len).ok_or_else(|| CheckError::Unexpected(format!("{ip}/{len} is not a prefix")))
}
