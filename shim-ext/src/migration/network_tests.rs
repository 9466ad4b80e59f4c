use std::sync::Arc;

use super::*;
use crate::net::{fake_link, NetOp, Recording, RouteInfo};

fn spec(decap: bool) -> IncomingSpec {
    IncomingSpec {
        sandbox_netns: "/run/katamaran/netns/in-1".into(),
        host_veth: "kmr12345678".into(),
        pod_ifname: "eth0".into(),
        tap_name: "tap0_kata".into(),
        tap_multi_queue: true,
        mac: "02:42:ac:11:00:02".parse().expect("mac"),
        mtu: 1450,
        vm_addrs: vec!["10.244.1.10".parse().expect("ip"), "fd00:244::10".parse().expect("ip")],
        plug_limit: 1 << 20,
        decap: decap.then(|| TunnelSpec {
            name: "kmrd12345678".into(),
            mode: net::TunnelMode::Ipip,
            local: "10.201.0.12".parse().expect("ip"),
            remote: "10.201.0.11".parse().expect("ip"),
            ttl: 0,
        }),
        gateway_mac: Some("ee:ee:ee:ee:ee:ee".parse().expect("mac")),
        gateway6: Some("fe80::1".parse().expect("ip")),
    }
}

fn sandbox_ns() -> Recording {
    Recording::new().with_link(fake_link(2, "eth0", Some("veth")))
}

#[tokio::test]
async fn incoming_plumbing_plugs_before_routing_and_unwinds_in_reverse() {
    let node = Arc::new(Recording::new());
    let sandbox = sandbox_ns();
    let cleanup = Cleanup::default();
    let built = build_incoming(&node, &sandbox, &spec(true), &cleanup).await.expect("build");
    assert!(built.plugged);
    let sb = sandbox.mutations();
    let plug_at = sb
        .iter()
        .position(|op| matches!(op, NetOp::InstallPlug { limit_bytes, .. } if *limit_bytes == 1 << 20));
    let tap_up_at = sb
        .iter()
        .position(|op| matches!(op, NetOp::SetLinkUp { link, up: true } if link.name == "tap0_kata"));
    assert!(plug_at.is_some() && plug_at < tap_up_at, "plug before the tap is up: {sb:#?}");
    assert!(
        sb.contains(&NetOp::SetMac { link: fake_link(2, "eth0", None).id, mac: spec(true).mac }),
        "pod MAC = VM MAC"
    );
    let redirects = sb.iter().filter(|op| matches!(op, NetOp::AddRedirectFilter { .. })).count();
    assert_eq!(redirects, 2, "Kata's tcfilter: both ways");

    let n = node.mutations();
    let route_count = n.iter().filter(|op| matches!(op, NetOp::ReplaceRoute(_))).count();
    let neigh_count = n.iter().filter(|op| matches!(op, NetOp::ReplaceNeighbour(_))).count();
    assert_eq!((route_count, neigh_count), (2, 2), "a /32 and a /128, each with a permanent neighbour");
    assert!(n.iter().any(|op| matches!(op, NetOp::CreateTunnel(t) if t.name == "kmrd12345678")));

    node.take_ops();
    let report = cleanup.unwind().await;
    assert!(report.is_clean(), "{report:?}");
    let undo = node.mutations();
    assert!(
        matches!(undo.first(), Some(NetOp::DeleteLink { link }) if link.name == "kmrd12345678"),
        "{undo:#?}"
    );
    assert!(
        matches!(undo.last(), Some(NetOp::DeleteLink { link }) if link.name == "kmr12345678"),
        "veth last"
    );
    assert_eq!(undo.len(), 1 + 2 * 2 + 1, "tunnel, 2 × (neighbour + route), veth: nothing was replaced");
}

#[tokio::test]
async fn a_route_the_incoming_sandbox_replaced_comes_back_on_unwind() {
    // node-b forwarded the VM's /32 into a tunnel (index 9) when the VM moved away earlier.
    let vm: IpAddr = "10.244.1.10".parse().expect("ip");
    let forward =
        RouteInfo { dest: IpPrefix::host(vm), gateway: None, oif: Some(9), onlink: false, protocol: 4 };
    let node = Arc::new(Recording::new().with_routes(IpPrefix::host(vm), vec![forward.clone()]));
    let cleanup = Cleanup::default();
    let built = build_incoming(&node, &sandbox_ns(), &spec(false), &cleanup).await.expect("build");
    assert_eq!(built.replaced.len(), 1, "only the /32 had a route: {:?}", built.replaced);
    assert_eq!(built.replaced[0].dev.index, 9);
    let now = node.routes(IpPrefix::host(vm)).await.expect("routes");
    assert_eq!(now[0].oif, Some(built.host_veth.index), "the sandbox took the route");
    assert!(cleanup.unwind().await.is_clean());
    let back = node.routes(IpPrefix::host(vm)).await.expect("routes");
    assert_eq!(back, vec![forward], "the forward is back as it was");
    let v6: IpAddr = "fd00:244::10".parse().expect("ip");
    assert!(
        node.routes(IpPrefix::host(v6)).await.expect("routes").is_empty(),
        "nothing invented for the /128"
    );
}

#[tokio::test]
async fn a_replaced_route_stays_away_when_something_else_routes_the_address() {
    let vm: IpAddr = "10.244.1.10".parse().expect("ip");
    let forward = RouteSpec::dev(IpPrefix::host(vm), fake_link(9, "kmrs0", None).id);
    let node = Recording::new();
    // Meanwhile the CNI routed the address to a local pod: that route wins.
    let cni = RouteSpec::dev(IpPrefix::host(vm), fake_link(12, "cali1", None).id);
    node.replace_route(&cni).await.expect("cni route");
    restore_replaced(&node, &forward).await.expect("restore");
    assert_eq!(node.routes(IpPrefix::host(vm)).await.expect("routes")[0].oif, Some(12));
    node.delete_route(&cni).await.expect("gone");
    restore_replaced(&node, &forward).await.expect("restore");
    assert_eq!(node.routes(IpPrefix::host(vm)).await.expect("routes")[0].oif, Some(9));
}

#[tokio::test]
async fn missing_sch_plug_falls_back_to_the_tap_queue() {
    let node = Arc::new(Recording::new());
    let sandbox = sandbox_ns().without(Feature::Plug);
    let built = build_incoming(&node, &sandbox, &spec(false), &Cleanup::default()).await.expect("build");
    assert!(!built.plugged);
    assert!(sandbox
        .mutations()
        .iter()
        .any(|op| matches!(op, NetOp::SetTxQueueLen { link, len } if link.name == "tap0_kata" && *len == FALLBACK_TXQUEUELEN)));
    assert_eq!(plug_drops(&sandbox, &built).await.expect("drops"), 0);
    release_plug(&sandbox, &built).await.expect("release is a no-op");
    assert!(!sandbox.mutations().iter().any(|op| matches!(op, NetOp::PlugAction { .. })));
}

#[tokio::test]
async fn failure_midway_leaves_only_what_cleanup_removes() {
    let node = Arc::new(Recording::new().fail_when(|op| matches!(op, NetOp::ReplaceNeighbour(_))));
    let cleanup = Cleanup::default();
    let err = build_incoming(&node, &sandbox_ns(), &spec(true), &cleanup).await.expect_err("injected");
    assert!(err.to_string().contains("injected") || matches!(err, net::Error::Injected { .. }), "{err}");
    assert_eq!(cleanup.names(), ["delete veth kmr12345678", "delete route 10.244.1.10/32 dev kmr12345678"]);
    assert!(cleanup.unwind().await.is_clean());
}

#[tokio::test]
async fn source_forward_swaps_restores_and_removes() {
    let vm: IpAddr = "10.244.1.10".parse().expect("ip");
    let node = Arc::new(Recording::new().with_routes(
        IpPrefix::host(vm),
        vec![RouteInfo { dest: IpPrefix::host(vm), gateway: None, oif: Some(7), onlink: false, protocol: 3 }],
    ));
    let cleanup = Cleanup::default();
    let tunnel = TunnelSpec {
        name: "kmrs12345678".into(),
        mode: net::TunnelMode::Ipip,
        local: "10.201.0.11".parse().expect("ip"),
        remote: "10.201.0.12".parse().expect("ip"),
        ttl: 0,
    };
    let fwd =
        prepare_forward(&node, Some(tunnel), &[vm], &["10.201.0.12".parse().expect("ip")], None, &cleanup)
            .await
            .expect("prepare");
    assert_eq!(fwd.original[0].dev.index, 7);
    node.take_ops();
    fwd.swap(node.as_ref()).await.expect("swap");
    let swapped = node.take_ops();
    assert_eq!(swapped.len(), 1, "STOP costs exactly one netlink message: {swapped:?}");
    assert!(matches!(&swapped[0], NetOp::ReplaceRoute(r) if r.dev.name == "kmrs12345678"));
    fwd.restore(node.as_ref()).await.expect("restore");
    assert!(matches!(&node.take_ops()[0], NetOp::ReplaceRoute(r) if r.dev.index == 7));
    fwd.remove(node.as_ref()).await.expect("remove");
    let removed = node.take_ops();
    assert!(matches!(&removed[0], NetOp::DeleteRoute(_)));
    assert!(matches!(&removed[1], NetOp::DeleteLink { link } if link.name == "kmrs12345678"));
}

#[tokio::test]
async fn forward_needs_a_vm_route_and_an_uplink_in_route_mode() {
    let vm: IpAddr = "10.244.1.10".parse().expect("ip");
    let node = Arc::new(Recording::new());
    let err =
        prepare_forward(&node, None, &[vm], &["10.201.0.12".parse().expect("ip")], None, &Cleanup::default())
            .await
            .expect_err("no route");
    assert!(err.to_string().contains("10.244.1.10 has no route"), "{err}");
    let node = Arc::new(Recording::new().with_routes(
        IpPrefix::host(vm),
        vec![RouteInfo { dest: IpPrefix::host(vm), gateway: None, oif: Some(7), onlink: false, protocol: 3 }],
    ));
    let err =
        prepare_forward(&node, None, &[vm], &["10.201.0.12".parse().expect("ip")], None, &Cleanup::default())
            .await
            .expect_err("no uplink");
    assert!(matches!(err, ForwardError::NoUplink));
    let up = fake_link(3, "eth0", None).id;
    let v6: IpAddr = "fd00:244::10".parse().expect("ip");
    let node6 = Arc::new(Recording::new().with_routes(
        IpPrefix::host(v6),
        vec![RouteInfo { dest: IpPrefix::host(v6), gateway: None, oif: Some(7), onlink: false, protocol: 3 }],
    ));
    let err = prepare_forward(
        &node6,
        None,
        &[v6],
        &["10.201.0.12".parse().expect("ip")],
        Some(&up),
        &Cleanup::default(),
    )
    .await
    .expect_err("no IPv6 gateway");
    assert!(matches!(err, ForwardError::NoGateway(a) if a == v6), "{err}");
    let fwd = prepare_forward(
        &node,
        None,
        &[vm],
        &["fd00:201::12".parse().expect("ip"), "10.201.0.12".parse().expect("ip")],
        Some(&up),
        &Cleanup::default(),
    )
    .await
    .expect("route mode");
    assert_eq!(fwd.swap[0].gateway, Some("10.201.0.12".parse().expect("ip")));
    assert!(fwd.swap[0].onlink && fwd.tunnel.is_none());
}

#[test]
fn names_fit_ifnamsiz() {
    let s = ifname_suffix("mig-0123456789ab");
    assert_eq!(s.len(), 8);
    assert_eq!(s, ifname_suffix("mig-0123456789ab"), "stable");
    assert_ne!(s, ifname_suffix("mig-0123456789ac"));
    assert!(format!("kmrd{s}").len() <= 15);
}
