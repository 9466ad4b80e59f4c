//! sch_plug with real packets (decision 3): a root plug on the sender's end of a veth holds a
//! burst of sequence-numbered UDP datagrams, releases them all in order, passes traffic through
//! after `RELEASE_INDEFINITE`, drops (and counts) what overflows a small limit, and is gone once
//! deleted.
//!
//! ```text
//!   plug-tx ─ kl-s0 [root: plug] ══ kl-r0 ─ plug-rx (UDP receiver)
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use katamaran::net::{plug_limit_bytes, LinkId, NetOps, PlugAction, QdiscParent, QdiscStats};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::UdpSocket;

use crate::error::{ensure, CheckError, Result, Step};
use crate::lab::{prefix, wait_for, wire, Node};
use crate::report::Metrics;

/// Datagrams in the held burst.
const BURST: u32 = 200;
/// UDP payload size of every datagram.
const PAYLOAD: usize = 200;
/// What the kernel counts per datagram (`skb->len`): payload + UDP 8 + IPv4 20 + Ethernet 14.
const SKB_LEN: u32 = PAYLOAD as u32 + 42;
/// Packets the small limit of the overflow step holds.
const SMALL_HOLD: u32 = 5;
/// Datagrams sent into the small limit.
const OVERFLOW_SENT: u32 = 12;
/// How long "nothing arrives" is watched.
const QUIET: Duration = Duration::from_millis(300);
/// Deadline for anything that should happen.
const WITHIN: Duration = Duration::from_secs(10);

/// Socket buffers of sender and receiver: the burst's truesize with room to spare.
const SEND_BUFFER: usize = 4 << 20;

const TX: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 90, 0, 1));
const RX: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 90, 0, 2));
const RX_PORT: u16 = 40100;

/// Runs the plug check.
///
/// # Errors
/// The first step or assertion that fails.
pub async fn run(m: &mut Metrics) -> Result<()> {
    let sender = Node::new("plug-tx").await?.without_ipv6().await?;
    let receiver = Node::new("plug-rx").await?.without_ipv6().await?;
    let w = wire(&sender, "kl-s0", &receiver, "kl-r0").await?;
    sender.address(&w.a, prefix(TX, 24)?).await?;
    receiver.address(&w.b, prefix(RX, 24)?).await?;
    sender.neighbour(&w.a, RX, w.b_mac).await?;
    let tx = sender.udp(SocketAddr::new(TX, 0)).await?;
    // Held packets stay charged to the sending socket; the default send buffer (~200 KiB of
    // truesize) would block the sender before the burst is complete.
    if setsockopt(&tx, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        setsockopt(&tx, sockopt::SndBuf, &SEND_BUFFER)
            .map_err(std::io::Error::from)
            .step("raise the sender's socket buffer")?;
    }
    let tx = tokio_udp(tx)?;
    let rx = receiver.udp(SocketAddr::new(RX, RX_PORT)).await?;
    // The release delivers the whole burst at once; the default receive buffer holds ~160 of
    // these datagrams by truesize.
    if setsockopt(&rx, sockopt::RcvBufForce, &SEND_BUFFER).is_err() {
        setsockopt(&rx, sockopt::RcvBuf, &SEND_BUFFER)
            .map_err(std::io::Error::from)
            .step("raise the receiver's socket buffer")?;
    }
    let rx = tokio_udp(rx)?;
    let to = SocketAddr::new(RX, RX_PORT);
    let s0 = &w.a;
    let net = sender.net();

    // Control: the path delivers before any plug is there.
    send_seq(&tx, to, 0).await?;
    expect_seqs(&rx, &[0], "the control datagram before the plug").await?;

    // A new plug buffers at once.
    let limit = plug_limit_bytes(1000, SKB_LEN, Duration::from_millis(300), 2.0);
    net.install_plug(s0, limit).await.step("install the plug on kl-s0")?;
    m.push("limit", f64::from(limit), "B");
    let kind = qdisc(net, s0).await?.map(|(kind, _)| kind);
    ensure(kind.as_deref() == Some("plug"), || format!("root qdisc of kl-s0 is {kind:?}, not plug"))?;
    for seq in 0..BURST {
        send_seq(&tx, to, seq).await?;
    }
    wait_stats(net, s0, "the whole burst to be held", |s| s.qlen >= BURST).await?;
    let held = stats(net, s0).await?;
    m.count("held", u64::from(held.qlen));
    m.push("held_bytes", f64::from(held.backlog_bytes), "B");
    ensure(held.qlen == BURST && held.backlog_bytes == BURST * SKB_LEN, || {
        format!("plug holds {held:?}, expected {BURST} packets of {SKB_LEN} bytes")
    })?;
    expect_quiet(&rx, "while the plug holds the burst").await?;

    // RELEASE_INDEFINITE: everything, in order, then pass-through.
    let released_at = Instant::now();
    net.plug_action(s0, PlugAction::ReleaseIndefinite).await.step("release the plug")?;
    m.ms("release_call", released_at.elapsed());
    let want: Vec<u32> = (0..BURST).collect();
    expect_seqs(&rx, &want, "the released burst").await?;
    m.ms("release_to_last", released_at.elapsed());
    let after = stats(net, s0).await?;
    ensure(after.qlen == 0 && after.drops == 0 && after.packets == BURST, || {
        format!("after the release the plug reports {after:?}, expected {BURST} sent, none queued or dropped")
    })?;
    send_seq(&tx, to, 1000).await?;
    expect_seqs(&rx, &[1000], "a datagram after the release (pass-through)").await?;

    // Buffer again under a small limit: the overflow is dropped and counted.
    net.plug_action(s0, PlugAction::Buffer).await.step("start a new buffer")?;
    let small = SMALL_HOLD * SKB_LEN + SKB_LEN / 2;
    net.set_plug_limit(s0, small).await.step("lower the plug limit")?;
    let drops_before = stats(net, s0).await?.drops;
    for seq in 0..OVERFLOW_SENT {
        send_seq(&tx, to, 2000 + seq).await?;
    }
    let want_drops = drops_before + OVERFLOW_SENT - SMALL_HOLD;
    wait_stats(net, s0, "the overflow to be counted as drops", |s| s.drops >= want_drops).await?;
    let full = stats(net, s0).await?;
    m.count("overflow_sent", u64::from(OVERFLOW_SENT));
    m.count("overflow_held", u64::from(full.qlen));
    m.count("drops", u64::from(full.drops - drops_before));
    ensure(full.qlen == SMALL_HOLD && full.drops == want_drops, || {
        format!(
            "with a {small}-byte limit the plug reports {full:?}, expected {SMALL_HOLD} held and {} dropped",
            OVERFLOW_SENT - SMALL_HOLD
        )
    })?;
    expect_quiet(&rx, "while the small plug holds").await?;
    net.plug_action(s0, PlugAction::ReleaseIndefinite).await.step("release the small plug")?;
    let want: Vec<u32> = (2000..2000 + SMALL_HOLD).collect();
    expect_seqs(&rx, &want, "the packets the small plug held").await?;
    expect_quiet(&rx, "after the small plug's release (the overflow was dropped)").await?;

    // Deleted: the default qdisc is back and traffic flows unheld.
    net.delete_qdisc(s0, QdiscParent::Root).await.step("delete the plug")?;
    let root = qdisc(net, s0).await?;
    ensure(root.as_ref().is_none_or(|(kind, _)| kind != "plug"), || {
        format!("a plug is still on kl-s0 after its deletion: {root:?}")
    })?;
    send_seq(&tx, to, 3000).await?;
    expect_seqs(&rx, &[3000], "a datagram after the plug's deletion").await
}

fn tokio_udp(sock: std::net::UdpSocket) -> Result<UdpSocket> {
    sock.set_nonblocking(true).step("make a UDP socket non-blocking")?;
    UdpSocket::from_std(sock).step("register a UDP socket with tokio")
}

/// A datagram of [`PAYLOAD`] bytes starting with `seq` (little endian).
async fn send_seq(tx: &UdpSocket, to: SocketAddr, seq: u32) -> Result<()> {
    let mut buf = [0u8; PAYLOAD];
    buf[..4].copy_from_slice(&seq.to_le_bytes());
    tokio::time::timeout(WITHIN, tx.send_to(&buf, to))
        .await
        .map_err(|_| CheckError::Timeout { what: format!("room to send datagram {seq}"), limit: WITHIN })?
        .step(format!("send datagram {seq}"))?;
    Ok(())
}

async fn recv_seq(rx: &UdpSocket, within: Duration) -> Result<Option<u32>> {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(within, rx.recv_from(&mut buf)).await {
        Err(_) => Ok(None),
        Ok(got) => {
            let (n, _) = got.step("receive a datagram")?;
            let seq =
                buf.get(..4).filter(|_| n == PAYLOAD).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
            seq.map(Some)
                .ok_or_else(|| CheckError::Unexpected(format!("received a foreign {n}-byte datagram")))
        }
    }
}

/// Receives exactly `want`, in that order.
async fn expect_seqs(rx: &UdpSocket, want: &[u32], what: &str) -> Result<()> {
    let mut got = Vec::with_capacity(want.len());
    while got.len() < want.len() {
        match recv_seq(rx, WITHIN).await? {
            Some(seq) => got.push(seq),
            None => break,
        }
    }
    ensure(got == want, || {
        format!(
            "{what}: received {} of {} datagrams; first difference {:?}",
            got.len(),
            want.len(),
            first_diff(&got, want)
        )
    })
}

/// Index and (got, want) of the first mismatch, for the failure message.
fn first_diff(got: &[u32], want: &[u32]) -> Option<(usize, Option<u32>, Option<u32>)> {
    (0..got.len().max(want.len()))
        .map(|i| (i, got.get(i).copied(), want.get(i).copied()))
        .find(|(_, g, w)| g != w)
}

async fn expect_quiet(rx: &UdpSocket, what: &str) -> Result<()> {
    match recv_seq(rx, QUIET).await? {
        None => Ok(()),
        Some(seq) => Err(CheckError::Unexpected(format!("datagram {seq} arrived {what}"))),
    }
}

async fn qdisc(net: &impl NetOps, link: &LinkId) -> Result<Option<(String, QdiscStats)>> {
    let q = net.qdisc(link, QdiscParent::Root).await.step(format!("read the root qdisc of {}", link.name))?;
    Ok(q.map(|q| (q.kind, q.stats)))
}

async fn stats(net: &impl NetOps, link: &LinkId) -> Result<QdiscStats> {
    match qdisc(net, link).await? {
        Some((kind, stats)) if kind == "plug" => Ok(stats),
        other => Err(CheckError::Unexpected(format!("expected a plug on {}, found {other:?}", link.name))),
    }
}

async fn wait_stats(
    net: &impl NetOps,
    link: &LinkId,
    what: &str,
    cond: impl Fn(&QdiscStats) -> bool,
) -> Result<()> {
    wait_for(WITHIN, what, || async { Ok(cond(&stats(net, link).await?)) }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_diff_points_at_the_mismatch() {
        assert_eq!(first_diff(&[0, 1, 2], &[0, 1, 2]), None);
        assert_eq!(first_diff(&[0, 2], &[0, 1, 2]), Some((1, Some(2), Some(1))));
        assert_eq!(first_diff(&[0, 1], &[0, 1, 2]), Some((2, None, Some(2))));
    }

    #[test]
    fn the_small_limit_fits_exactly_the_packets_it_should_hold() {
        let small = SMALL_HOLD * SKB_LEN + SKB_LEN / 2;
        // sch_plug enqueues while backlog + len <= limit.
        assert!((SMALL_HOLD * SKB_LEN..(SMALL_HOLD + 1) * SKB_LEN).contains(&small));
        assert!(plug_limit_bytes(1000, SKB_LEN, Duration::from_millis(300), 2.0) >= BURST * SKB_LEN);
    }
}
