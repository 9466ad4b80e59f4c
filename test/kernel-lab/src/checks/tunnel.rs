//! One tunnel mode end to end, the way the engine uses it (decision 4): the tunnel is created
//! ahead of time on node-a (local node-a, remote node-b) with its decapsulating end on node-b;
//! one `replace_route` moves the VM's host route from its old place (vm-a, where nothing
//! answers) into the tunnel; the client's datagrams then reach the echo behind node-b and come
//! back. Deleting the tunnels removes the route with them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use katamaran::net::{NetOps, RouteSpec, TunnelMode};
use tokio::net::UdpSocket;

use crate::echo::{Echo, Start};
use crate::error::{ensure, CheckError, Result, Step};
use crate::report::Metrics;
use crate::topo::{Plan, Topo, ECHO_PORT, TUNNEL};

/// Round trips through the tunnel.
const ROUND_TRIPS: u32 = 100;
/// How long "no answer" is watched.
const QUIET: Duration = Duration::from_millis(300);
/// Deadline of one round trip.
const WITHIN: Duration = Duration::from_secs(5);

/// Runs the check for `mode`.
///
/// # Errors
/// The first step or assertion that fails.
pub async fn run(mode: TunnelMode, m: &mut Metrics) -> Result<()> {
    let plan = Plan::for_mode(mode);
    let topo = Topo::build(plan).await?;
    let vm = plan.vm_prefix();
    let echo =
        Echo::spawn("vm-b-echo", topo.vm_b.udp(SocketAddr::new(plan.vm, ECHO_PORT)).await?, Start::Running)?;
    let client = topo.client.udp(SocketAddr::new(plan.client, 0)).await?;
    client.set_nonblocking(true).step("make the client socket non-blocking")?;
    let client = UdpSocket::from_std(client).step("register the client socket")?;
    let target = SocketAddr::new(plan.vm, ECHO_PORT);

    // Before the move the route points at vm-a, where nothing listens.
    expect_no_answer(&client, target, "before the route swap").await?;

    let (tnl_a, tnl_b) = topo.tunnels(mode).await?;
    let info = topo.node_a.net().link(TUNNEL).await.step("read the tunnel on node-a")?;
    let ends = info.tunnel.as_ref().map(|t| (t.local, t.remote));
    ensure(
        info.kind.as_deref() == Some(mode.kind()) && ends == Some((Some(plan.node_a), Some(plan.node_b))),
        || format!("node-a's tunnel reads back as kind {:?} with ends {ends:?}", info.kind),
    )?;

    let swap = RouteSpec::dev(vm, tnl_a.clone());
    let started = Instant::now();
    let timing = topo.node_a.net().replace_route(&swap).await.step(format!("move {vm} into the tunnel"))?;
    m.ms("swap", started.elapsed());
    m.ms("swap_netlink", timing.elapsed);
    let routes = topo.node_a.net().routes(vm).await.step("read node-a's VM route")?;
    ensure(routes.len() == 1 && routes[0].oif == Some(tnl_a.index), || {
        format!("after the swap node-a routes {vm} as {routes:?}, expected one route via {tnl_a}")
    })?;

    let mut rtts = Vec::with_capacity(ROUND_TRIPS as usize);
    for seq in 0..ROUND_TRIPS {
        rtts.push(round_trip(&client, target, seq).await?);
    }
    rtts.sort_unstable();
    m.count("round_trips", u64::from(ROUND_TRIPS));
    m.ms("rtt_p50", rtts[rtts.len() / 2]);
    m.ms("rtt_max", rtts[rtts.len() - 1]);
    let echoed = echo.echoed();
    ensure(echoed >= u64::from(ROUND_TRIPS), || format!("the VM behind node-b echoed {echoed} datagrams"))?;

    // Deleting the tunnels takes the route with them; nothing is left and nothing answers.
    topo.node_a.net().delete_link(&tnl_a).await.step("delete node-a's tunnel")?;
    topo.node_b.net().delete_link(&tnl_b).await.step("delete node-b's tunnel")?;
    for node in [&topo.node_a, &topo.node_b] {
        let left = node.net().link(TUNNEL).await;
        ensure(left.as_ref().is_err_and(|e| e.is_not_found()), || {
            format!("{TUNNEL} on {} after its deletion: {left:?}", node.name)
        })?;
    }
    let routes = topo.node_a.net().routes(vm).await.step("read node-a's VM routes after the deletion")?;
    ensure(routes.is_empty(), || {
        format!("node-a still routes {vm} after the tunnel's deletion: {routes:?}")
    })?;
    expect_no_answer(&client, target, "after the tunnel's deletion").await?;
    let (_, stranded) = echo.finish()?;
    ensure(stranded == 0, || format!("{stranded} datagrams reached the VM without being echoed"))
}

/// Sends `seq` and waits for its echo; returns the round-trip time.
async fn round_trip(client: &UdpSocket, target: SocketAddr, seq: u32) -> Result<Duration> {
    let payload = seq.to_le_bytes();
    let sent = Instant::now();
    client.send_to(&payload, target).await.step(format!("send datagram {seq} to {target}"))?;
    let mut buf = [0u8; 64];
    loop {
        let got = tokio::time::timeout(WITHIN, client.recv_from(&mut buf)).await.map_err(|_| {
            CheckError::Timeout { what: format!("the echo of datagram {seq}"), limit: WITHIN }
        })?;
        let (n, from) = got.step(format!("receive the echo of datagram {seq}"))?;
        // A late echo of an earlier datagram is skipped, anything else is wrong.
        if n == payload.len() && buf[..n] == payload && from == target {
            return Ok(sent.elapsed());
        }
        if from != target || n != payload.len() {
            return Err(CheckError::Unexpected(format!("foreign {n}-byte reply from {from}")));
        }
    }
}

async fn expect_no_answer(client: &UdpSocket, target: SocketAddr, when: &str) -> Result<()> {
    client.send_to(b"anyone", target).await.step(format!("send a datagram {when}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(QUIET, client.recv_from(&mut buf)).await {
        Err(_) => Ok(()),
        Ok(Ok((n, from))) => Err(CheckError::Unexpected(format!("{from} answered {when} ({n} bytes)"))),
        // An ICMP error reported on the socket is also "no answer".
        Ok(Err(_)) => Ok(()),
    }
}
