//! Privileged tests of the netlink room in fresh network namespaces.
//!
//! Each test creates its own namespaces under `/run/netns` with unique names
//! and removes them through a Drop guard, even when an assertion fails; the
//! links inside go with them. Without root they print `skipped: needs root`.
//! Kernel features this machine lacks (sch_plug, ipip, gre, ip6_tunnel) are
//! detected through the probe, the typed `Unsupported` error is asserted, and
//! the test says it skipped the rest; on a kernel with the modules (the
//! kernel lab VM) the same tests run fully.

#![allow(clippy::unwrap_used)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use katamaran::net::{
    self, create_netns, remove_netns, Error, Feature, IpPrefix, LinkId, MacAddr, NeighbourSpec, NetOps,
    NetnsHandle, OperState, PlugAction, QdiscParent, RouteSpec, TapSpec, TunnelMode, TunnelSpec, VethSpec,
};
use katamaran_test_skip::{skip, Tier};
use tokio::net::UdpSocket;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace made for one test; removed on drop.
struct Ns {
    path: PathBuf,
}

impl Ns {
    fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/run/netns/kt-{}-{n}-{tag}", std::process::id()));
        create_netns(&path).unwrap();
        Self { path }
    }

    fn open(&self) -> NetnsHandle {
        NetnsHandle::open(&self.path).unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = remove_netns(&self.path) {
            eprintln!("cleanup of {}: {e}", self.path.display());
        }
    }
}

/// Whether privileged tests can run here; prints why not.
fn privileged() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        skip(Tier::Netns, "needs root");
        return false;
    }
    true
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn prefix(s: &str) -> IpPrefix {
    s.parse().unwrap()
}

/// Polls `check` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A non-blocking UDP socket bound inside the handle's namespace.
async fn udp_in(h: &NetnsHandle, addr: SocketAddr) -> UdpSocket {
    let std_sock = h
        .run(move || -> io::Result<std::net::UdpSocket> {
            let s = std::net::UdpSocket::bind(addr)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await
        .unwrap()
        .unwrap();
    UdpSocket::from_std(std_sock).unwrap()
}

async fn recv_within(sock: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(within, sock.recv_from(&mut buf)).await {
        Ok(res) => {
            let (n, _) = res.unwrap();
            Some(buf[..n].to_vec())
        }
        Err(_) => None,
    }
}

async fn up(h: &NetnsHandle, name: &str) -> LinkId {
    let id = h.link(name).await.unwrap().id;
    h.set_link_up(&id, true).await.unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veth_across_namespaces_with_addresses_mtu_mac_txqueuelen() {
    if !privileged() {
        return;
    }
    let (na, nb) = (Ns::new("a"), Ns::new("b"));
    let (a, b) = (na.open(), nb.open());

    let a0 = a
        .create_veth(&VethSpec {
            name: "kt-a0".into(),
            peer: "kt-b0".into(),
            peer_netns: Some(nb.path.clone()),
        })
        .await
        .unwrap();
    assert_eq!(a.link("kt-a0").await.unwrap().kind.as_deref(), Some("veth"));
    let e = a.link("kt-b0").await.unwrap_err();
    assert!(matches!(e, Error::LinkNotFound { .. }) && e.is_not_found(), "{e}");
    let b0 = b.link("kt-b0").await.unwrap();
    assert_eq!(b0.kind.as_deref(), Some("veth"));
    let b0 = b0.id;

    let mac: MacAddr = "02:6b:74:00:00:01".parse().unwrap();
    a.set_mtu(&a0, 1400).await.unwrap();
    a.set_txqueuelen(&a0, 5000).await.unwrap();
    a.set_mac(&a0, mac).await.unwrap();
    a.set_link_up(&a0, true).await.unwrap();
    b.set_link_up(&b0, true).await.unwrap();
    let info = a.link("kt-a0").await.unwrap();
    assert_eq!((info.mtu, info.txqueuelen, info.mac, info.admin_up), (1400, 5000, Some(mac), true));
    eventually(Duration::from_secs(5), "both veth ends operationally up", || async {
        a.link("kt-a0").await.unwrap().oper == OperState::Up
            && b.link("kt-b0").await.unwrap().oper == OperState::Up
    })
    .await;

    for p in ["10.77.0.1/24", "fd77::1/64"] {
        a.add_address(&a0, prefix(p)).await.unwrap();
    }
    let addrs = a.addresses(&a0).await.unwrap();
    assert!(addrs.contains(&prefix("10.77.0.1/24")) && addrs.contains(&prefix("fd77::1/64")), "{addrs:?}");
    let dup = a.add_address(&a0, prefix("10.77.0.1/24")).await.unwrap_err();
    assert!(dup.is_already_exists(), "{dup}");
    a.delete_address(&a0, prefix("10.77.0.1/24")).await.unwrap();
    let addrs = a.addresses(&a0).await.unwrap();
    assert!(!addrs.contains(&prefix("10.77.0.1/24")) && addrs.contains(&prefix("fd77::1/64")), "{addrs:?}");

    // Move a second pair's end across, then delete: the peer goes too.
    let m0 = a
        .create_veth(&VethSpec { name: "kt-m0".into(), peer: "kt-m1".into(), peer_netns: None })
        .await
        .unwrap();
    let m1 = a.link("kt-m1").await.unwrap().id;
    a.move_link(&m1, &nb.path).await.unwrap();
    assert!(a.link("kt-m1").await.unwrap_err().is_not_found());
    assert!(b.link("kt-m1").await.is_ok());
    a.delete_link(&m0).await.unwrap();
    assert!(b.link("kt-m1").await.unwrap_err().is_not_found());

    a.delete_link(&a0).await.unwrap();
    assert!(a.link("kt-a0").await.unwrap_err().is_not_found());
    assert!(b.link("kt-b0").await.unwrap_err().is_not_found());
    let again = a.delete_link(&a0).await.unwrap_err();
    assert!(again.is_not_found(), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_add_replace_delete_read_back() {
    if !privileged() {
        return;
    }
    let ns = Ns::new("r");
    let h = ns.open();
    h.create_veth(&VethSpec { name: "kt-r0".into(), peer: "kt-r1".into(), peer_netns: None }).await.unwrap();
    let r0 = up(&h, "kt-r0").await;
    let r1 = up(&h, "kt-r1").await;
    h.add_address(&r0, prefix("10.78.0.1/24")).await.unwrap();

    for (vm, gw) in [(prefix("10.99.0.5/32"), ip("10.78.0.2")), (prefix("fd99::5/128"), ip("fd78::2"))] {
        h.add_route(&RouteSpec::dev(vm, r0.clone())).await.unwrap();
        let got = h.routes(vm).await.unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].oif, got[0].gateway, got[0].onlink), (Some(r0.index), None, false));
        let dup = h.add_route(&RouteSpec::dev(vm, r1.clone())).await.unwrap_err();
        assert!(dup.is_already_exists(), "{dup}");

        // The cutover's move: one replace to a gateway across another link.
        let timing = h.replace_route(&RouteSpec::via_onlink(vm, gw, r1.clone())).await.unwrap();
        assert!(timing.elapsed > Duration::ZERO && timing.elapsed < Duration::from_secs(1), "{timing:?}");
        let got = h.routes(vm).await.unwrap();
        assert_eq!(got.len(), 1, "replace must not add a second route: {got:?}");
        assert_eq!((got[0].oif, got[0].gateway, got[0].onlink), (Some(r1.index), Some(gw), true));

        h.replace_route(&RouteSpec::dev(vm, r0.clone())).await.unwrap();
        assert_eq!(h.routes(vm).await.unwrap()[0].oif, Some(r0.index));

        h.delete_route(&RouteSpec::dev(vm, r0.clone())).await.unwrap();
        assert!(h.routes(vm).await.unwrap().is_empty());
        let gone = h.delete_route(&RouteSpec::dev(vm, r0.clone())).await.unwrap_err();
        assert!(gone.is_not_found(), "{gone}");
    }

    // Refused before reaching the kernel.
    let subnet = h.add_route(&RouteSpec::dev(prefix("10.99.0.0/24"), r0.clone())).await.unwrap_err();
    assert!(matches!(subnet, Error::InvalidRoute { .. }), "{subnet}");
    assert!(h.routes(prefix("10.99.0.0/24")).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_neighbour_set_replace_delete() {
    if !privileged() {
        return;
    }
    let ns = Ns::new("n");
    let h = ns.open();
    h.create_veth(&VethSpec { name: "kt-n0".into(), peer: "kt-n1".into(), peer_netns: None }).await.unwrap();
    let n0 = up(&h, "kt-n0").await;
    let vm = ip("10.78.0.9");
    let (m1, m2): (MacAddr, MacAddr) =
        ("02:00:00:00:00:09".parse().unwrap(), "02:00:00:00:00:0a".parse().unwrap());
    for mac in [m1, m2] {
        h.replace_neighbour(&NeighbourSpec { dev: n0.clone(), ip: vm, mac }).await.unwrap();
        let entries = h.neighbours(&n0).await.unwrap();
        let e = entries.iter().find(|e| e.ip == vm).unwrap();
        assert_eq!((e.mac, e.permanent), (Some(mac), true), "{entries:?}");
    }
    h.delete_neighbour(&n0, vm).await.unwrap();
    assert!(h.neighbours(&n0).await.unwrap().iter().all(|e| e.ip != vm));
    assert!(h.delete_neighbour(&n0, vm).await.unwrap_err().is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_is_created_inside_persistent_and_deleted() {
    if !privileged() {
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        skip(Tier::Netns, "needs /dev/net/tun");
        return;
    }
    let ns = Ns::new("t");
    let h = ns.open();
    let tap = h.create_tap(&TapSpec::kata("kt-tap0")).await.unwrap();
    // The creating descriptor is closed: only persistence keeps it.
    let info = h.link("kt-tap0").await.unwrap();
    assert_eq!(info.kind.as_deref(), Some("tun"));
    let tun = info.tun.unwrap();
    assert!(tun.tap && tun.persistent && tun.multi_queue && tun.vnet_hdr, "{tun:?}");
    assert_eq!(tun.queues, 0);
    assert!(info.mac.is_some(), "a tap has an Ethernet address");
    // Created in the namespace, not in the thread that asked.
    let host = NetnsHandle::current().unwrap();
    assert!(host.link("kt-tap0").await.unwrap_err().is_not_found());

    // Decision 7's fallback buffer: the tap's own queue.
    h.set_txqueuelen(&tap, 10_000).await.unwrap();
    assert_eq!(h.link("kt-tap0").await.unwrap().txqueuelen, 10_000);

    h.delete_link(&tap).await.unwrap();
    assert!(h.link("kt-tap0").await.unwrap_err().is_not_found());
}

/// What the controlled switchover waits on: the frames a process's tap queue holds unread,
/// seen through a borrowed descriptor without taking them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_watch_sees_unread_frames_without_taking_them() {
    use katamaran::net::tapdrain::TapWatch;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    if !privileged() {
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        skip(Tier::Netns, "needs /dev/net/tun");
        return;
    }
    let ns = Ns::new("w");
    let h = ns.open();
    // No IPv6 on the tap: no router solicitation or MLD report lands in its queue unasked.
    h.run(|| {
        for key in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1")?;
        }
        Ok::<(), io::Error>(())
    })
    .await
    .unwrap()
    .unwrap();
    let tap = h.create_tap(&TapSpec::kata("kt-tapw")).await.unwrap();
    // This process plays QEMU: one queue of the tap, non-blocking (QEMU's mode).
    let queue = h
        .run(|| -> io::Result<std::fs::File> {
            let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
            // SAFETY: all-zero is a valid `ifreq`.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, c) in req.ifr_name.iter_mut().zip(b"kt-tapw") {
                *d = *c as libc::c_char;
            }
            req.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR)
                    as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the `ifreq`, which outlives the call.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: F_SETFL with flags only.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            Ok(f)
        })
        .await
        .unwrap()
        .unwrap();
    h.add_address(&tap, prefix("10.93.0.1/24")).await.unwrap();
    h.set_link_up(&tap, true).await.unwrap();
    let watch = TapWatch::open(std::process::id(), "kt-tapw").unwrap();
    assert!(TapWatch::open(std::process::id(), "kt-none").unwrap_err().kind() == io::ErrorKind::NotFound);

    let mut buf = vec![0u8; 65_536];
    let drain = |q: &std::fs::File, buf: &mut [u8]| while (&*q).read(buf).is_ok() {};
    drain(&queue, &mut buf);
    assert!(!watch.pending().unwrap(), "nothing queued");
    // A datagram to a neighbour on the tap's subnet: the kernel sends an ARP request out of the
    // tap, which queues it for the reader.
    let sock = udp_in(&h, "10.93.0.1:0".parse().unwrap()).await;
    sock.send_to(b"x", "10.93.0.2:9").await.unwrap();
    eventually(Duration::from_secs(5), "a frame in the tap's queue", || async { watch.pending().unwrap() })
        .await;
    assert!(watch.pending().unwrap(), "looking did not take it");
    drain(&queue, &mut buf);
    assert!(!watch.pending().unwrap(), "read by the queue's owner");
}

/// Kata's shape: node ─veth─ pod{eth0, tap} ─veth─ guest, with tcfilter
/// redirects eth0 ⇄ tap in the pod namespace, which has no address at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_mirred_filters_redirect_real_packets_both_ways() {
    if !privileged() {
        return;
    }
    let (nn, np, ng) = (Ns::new("node"), Ns::new("pod"), Ns::new("guest"));
    let (node, pod, guest) = (nn.open(), np.open(), ng.open());
    node.create_veth(&VethSpec {
        name: "kt-veth".into(),
        peer: "kt-eth0".into(),
        peer_netns: Some(np.path.clone()),
    })
    .await
    .unwrap();
    pod.create_veth(&VethSpec {
        name: "kt-tap".into(),
        peer: "kt-g0".into(),
        peer_netns: Some(ng.path.clone()),
    })
    .await
    .unwrap();
    let eth0 = pod.link("kt-eth0").await.unwrap();
    let g0 = guest.link("kt-g0").await.unwrap().id;
    // As in Kata, the guest NIC carries the pod eth0's MAC.
    guest.set_mac(&g0, eth0.mac.unwrap()).await.unwrap();
    let veth = up(&node, "kt-veth").await;
    let eth0 = up(&pod, "kt-eth0").await;
    let tap = up(&pod, "kt-tap").await;
    let g0 = up(&guest, "kt-g0").await;
    node.add_address(&veth, prefix("10.79.0.1/24")).await.unwrap();
    guest.add_address(&g0, prefix("10.79.0.2/24")).await.unwrap();
    // Static neighbours: no ARP needed, so only the data path is tested.
    let node_mac = node.link("kt-veth").await.unwrap().mac.unwrap();
    let guest_mac = guest.link("kt-g0").await.unwrap().mac.unwrap();
    node.replace_neighbour(&NeighbourSpec { dev: veth.clone(), ip: ip("10.79.0.2"), mac: guest_mac })
        .await
        .unwrap();
    guest
        .replace_neighbour(&NeighbourSpec { dev: g0.clone(), ip: ip("10.79.0.1"), mac: node_mac })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "links operationally up", || async {
        node.link("kt-veth").await.unwrap().oper == OperState::Up
            && guest.link("kt-g0").await.unwrap().oper == OperState::Up
    })
    .await;

    let node_sock = udp_in(&node, "10.79.0.1:40001".parse().unwrap()).await;
    let guest_sock = udp_in(&guest, "10.79.0.2:40002".parse().unwrap()).await;
    let to_guest: SocketAddr = "10.79.0.2:40002".parse().unwrap();
    let to_node: SocketAddr = "10.79.0.1:40001".parse().unwrap();

    // Control: without the filters the pod namespace drops the packet.
    node_sock.send_to(b"before", to_guest).await.unwrap();
    assert_eq!(recv_within(&guest_sock, Duration::from_millis(300)).await, None);

    pod.add_ingress_qdisc(&eth0).await.unwrap();
    pod.add_ingress_qdisc(&tap).await.unwrap();
    pod.add_redirect_filter(&eth0, &tap).await.unwrap();
    pod.add_redirect_filter(&tap, &eth0).await.unwrap();
    assert_eq!(pod.qdisc(&eth0, QdiscParent::Ingress).await.unwrap().unwrap().kind, "ingress");

    for i in 0..10u8 {
        node_sock.send_to(&[b'n', i], to_guest).await.unwrap();
        assert_eq!(recv_within(&guest_sock, Duration::from_secs(5)).await, Some(vec![b'n', i]));
        guest_sock.send_to(&[b'g', i], to_node).await.unwrap();
        assert_eq!(recv_within(&node_sock, Duration::from_secs(5)).await, Some(vec![b'g', i]));
    }

    // Removing eth0's ingress qdisc removes its filter: traffic stops again.
    pod.delete_qdisc(&eth0, QdiscParent::Ingress).await.unwrap();
    assert!(pod.qdisc(&eth0, QdiscParent::Ingress).await.unwrap().is_none());
    node_sock.send_to(b"after", to_guest).await.unwrap();
    assert_eq!(recv_within(&guest_sock, Duration::from_millis(300)).await, None);
}

/// A pair of namespaces joined by a veth with addresses and static
/// neighbours; `s0` is the sending end.
struct Pair {
    _ns: (Ns, Ns),
    a: NetnsHandle,
    s0: LinkId,
    tx: UdpSocket,
    rx: UdpSocket,
    to: SocketAddr,
}

async fn pair(tag: &str) -> Pair {
    let (na, nb) = (Ns::new(&format!("{tag}a")), Ns::new(&format!("{tag}b")));
    let (a, b) = (na.open(), nb.open());
    a.create_veth(&VethSpec {
        name: "kt-s0".into(),
        peer: "kt-d0".into(),
        peer_netns: Some(nb.path.clone()),
    })
    .await
    .unwrap();
    let s0 = up(&a, "kt-s0").await;
    let d0 = up(&b, "kt-d0").await;
    a.add_address(&s0, prefix("10.80.0.1/24")).await.unwrap();
    b.add_address(&d0, prefix("10.80.0.2/24")).await.unwrap();
    let d0_mac = b.link("kt-d0").await.unwrap().mac.unwrap();
    a.replace_neighbour(&NeighbourSpec { dev: s0.clone(), ip: ip("10.80.0.2"), mac: d0_mac }).await.unwrap();
    eventually(Duration::from_secs(5), "veth up", || async {
        a.link("kt-s0").await.unwrap().oper == OperState::Up
    })
    .await;
    let tx = udp_in(&a, "10.80.0.1:0".parse().unwrap()).await;
    let rx = udp_in(&b, "10.80.0.2:40003".parse().unwrap()).await;
    Pair { _ns: (na, nb), a, s0, tx, rx, to: "10.80.0.2:40003".parse().unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plug_buffers_then_releases() {
    if !privileged() {
        return;
    }
    let p = pair("p").await;
    if let Err(e) = net::probe(Feature::Plug).await {
        assert!(matches!(e, Error::Unsupported { what: Feature::Plug, .. }), "{e}");
        // The real operation reports the same typed error.
        let install = p.a.install_plug(&p.s0, 1 << 20).await.unwrap_err();
        assert!(matches!(install, Error::Unsupported { what: Feature::Plug, .. }), "{install}");
        assert!(p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap().is_none_or(|q| q.kind != "plug"));
        skip(Tier::KernelModule, "kernel lacks sch_plug (proven in the kernel lab VM)");
        return;
    }

    let payload = [7u8; 1000]; // skb->len 1042 with UDP/IP/Ethernet headers
    p.a.install_plug(&p.s0, 1 << 20).await.unwrap();
    assert_eq!(p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap().unwrap().kind, "plug");
    for _ in 0..20 {
        p.tx.send_to(&payload, p.to).await.unwrap();
    }
    eventually(Duration::from_secs(5), "20 packets held", || async {
        p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap().unwrap().stats.qlen == 20
    })
    .await;
    let held = p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap().unwrap().stats;
    assert_eq!(held.backlog_bytes, 20 * 1042, "{held:?}");
    assert_eq!(recv_within(&p.rx, Duration::from_millis(200)).await, None, "a new plug buffers at once");

    p.a.plug_action(&p.s0, PlugAction::ReleaseIndefinite).await.unwrap();
    for _ in 0..20 {
        assert_eq!(recv_within(&p.rx, Duration::from_secs(5)).await.map(|v| v.len()), Some(1000));
    }
    let after = p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap().unwrap().stats;
    assert_eq!((after.qlen, after.drops), (0, 0), "{after:?}");

    // Hold again with room for two packets: the rest is dropped and counted.
    p.a.plug_action(&p.s0, PlugAction::Buffer).await.unwrap();
    p.a.set_plug_limit(&p.s0, 3000).await.unwrap();
    for _ in 0..5 {
        p.tx.send_to(&payload, p.to).await.unwrap();
    }
    eventually(Duration::from_secs(5), "3 drops counted", || async {
        p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap().unwrap().stats.drops == 3
    })
    .await;
    assert_eq!(p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap().unwrap().stats.qlen, 2);
    p.a.plug_action(&p.s0, PlugAction::ReleaseIndefinite).await.unwrap();
    for _ in 0..2 {
        assert!(recv_within(&p.rx, Duration::from_secs(5)).await.is_some());
    }
    assert_eq!(recv_within(&p.rx, Duration::from_millis(200)).await, None);

    p.a.delete_qdisc(&p.s0, QdiscParent::Root).await.unwrap();
    let root = p.a.qdisc(&p.s0, QdiscParent::Root).await.unwrap();
    assert!(root.as_ref().is_none_or(|q| q.kind != "plug"), "{root:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_created_with_endpoints_then_deleted() {
    if !privileged() {
        return;
    }
    let ns = Ns::new("tn");
    let h = ns.open();
    let cases = [
        (TunnelMode::Ipip, "ipip", "192.0.2.1", "198.51.100.2", "ipip"),
        (TunnelMode::Gre, "gre", "192.0.2.1", "198.51.100.2", "gre"),
        (TunnelMode::Ip6ip6, "ip6_tunnel", "2001:db8::1", "2001:db8:1::2", "ip6tnl"),
        (TunnelMode::Ip6gre, "ip6_gre", "2001:db8::1", "2001:db8:1::2", "ip6gre"),
    ];
    for (mode, module, local, remote, kind) in cases {
        let spec = TunnelSpec { name: "kt-tnl0".into(), mode, local: ip(local), remote: ip(remote), ttl: 64 };
        if let Err(e) = net::probe(mode.feature()).await {
            assert!(matches!(&e, Error::Unsupported { what, .. } if *what == mode.feature()), "{e}");
            let create = h.create_tunnel(&spec).await.unwrap_err();
            assert!(
                matches!(&create, Error::Unsupported { what, .. } if *what == mode.feature()),
                "{create}"
            );
            assert!(h.link("kt-tnl0").await.unwrap_err().is_not_found());
            skip(Tier::KernelModule, format!("kernel lacks {module} (proven in the kernel lab VM)"));
            continue;
        }
        let id = h.create_tunnel(&spec).await.unwrap();
        let info = h.link("kt-tnl0").await.unwrap();
        assert_eq!(info.id, id);
        assert_eq!(info.kind.as_deref(), Some(kind));
        assert!(info.admin_up, "created up");
        let t = info.tunnel.unwrap();
        assert_eq!((t.local, t.remote, t.ttl), (Some(spec.local), Some(spec.remote), Some(64)), "{mode}");
        h.delete_link(&id).await.unwrap();
        assert!(h.link("kt-tnl0").await.unwrap_err().is_not_found());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_answers_present_or_typed_unsupported() {
    if !privileged() {
        return;
    }
    for what in Feature::ALL {
        match net::probe(what).await {
            Ok(()) => println!("{what}: present"),
            Err(e) => {
                assert!(matches!(e, Error::Unsupported { .. }), "{what}: {e}");
                println!("{what}: missing ({})", e.errno().unwrap_or_default());
            }
        }
    }
}

#[test]
fn handle_serves_any_runtime_survives_panics_and_ends_on_drop() {
    if !privileged() {
        return;
    }
    let ns = Ns::new("h");
    let h = ns.open();
    let current = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let tid = current.block_on(h.run(nix::unistd::gettid)).unwrap();
    assert_ne!(tid, nix::unistd::gettid());
    assert!(Path::new(&format!("/proc/self/task/{tid}")).exists());
    // Every job runs on that one thread, whichever runtime sent it.
    assert_eq!(multi.block_on(h.run(nix::unistd::gettid)).unwrap(), tid);
    let lo = multi.block_on(h.link("lo")).unwrap();
    assert_eq!(lo.id.index, 1);

    let panicked = current.block_on(h.run(|| -> u32 { panic!("job panics on purpose") }));
    assert!(matches!(panicked, Err(Error::ThreadGone { .. })), "{panicked:?}");
    assert_eq!(current.block_on(h.run(nix::unistd::gettid)).unwrap(), tid, "thread still serving");

    let clone = h.clone();
    drop(h);
    assert!(Path::new(&format!("/proc/self/task/{tid}")).exists(), "a clone keeps it");
    drop(clone);
    // The join returned, but procfs may list an exited thread for a moment longer.
    let task = format!("/proc/self/task/{tid}");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while Path::new(&task).exists() && std::time::Instant::now() < until {
        std::thread::yield_now();
    }
    assert!(!Path::new(&task).exists(), "joined on last drop");
}

#[test]
fn open_reports_typed_errors() {
    if !privileged() {
        return;
    }
    let e = NetnsHandle::open("/tmp/not-a-netns").unwrap_err();
    assert!(matches!(e, Error::InvalidNetnsPath { .. }), "{e}");
    let missing = format!("/run/netns/kt-{}-missing", std::process::id());
    let e = NetnsHandle::open(&missing).unwrap_err();
    assert!(matches!(e, Error::OpenNetns { .. }) && e.errno() == Some(libc::ENOENT), "{e}");

    // A plain file where a namespace should be: setns refuses it.
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    std::fs::create_dir_all("/run/netns").unwrap();
    let plain = Rm(PathBuf::from(format!("/run/netns/kt-{}-plain", std::process::id())));
    std::fs::write(&plain.0, b"").unwrap();
    let e = NetnsHandle::open(&plain.0).unwrap_err();
    assert!(matches!(e, Error::EnterNetns { .. }) && e.errno() == Some(libc::EINVAL), "{e}");

    // Creating over an existing file is refused and leaves it alone.
    let e = create_netns(&plain.0).unwrap_err();
    assert!(matches!(e, Error::CreateNetns { .. }) && e.is_already_exists(), "{e}");
    assert!(plain.0.exists());
    // Removal is idempotent.
    let ns = Ns::new("rm");
    remove_netns(&ns.path).unwrap();
    remove_netns(&ns.path).unwrap();
    assert!(!ns.path.exists());
}
