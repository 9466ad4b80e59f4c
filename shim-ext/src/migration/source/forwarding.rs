//! FORWARDING on the source: the packets a stopped source left in its tap are re-sent once the
//! destination runs the VM, and the forward carries the VM's traffic until it is no longer the
//! only path (see docs/ENGINE.md, forward lifetime).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::migration::cancel::CancelToken;
use crate::migration::network::{current_route, SourceForward};
use crate::net::{NetnsHandle, RouteSpec};

/// How often the forward's traffic counter is read.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Re-sends what the stopped source VM left unread in its tap (see [`crate::net::tapdrain`]):
/// packets that arrived between STOP and the route swap. Returns how many were re-sent.
pub(super) async fn recover_tap_queue(node: &Arc<NetnsHandle>, qemu_pid: u32, tap: &str) -> usize {
    if qemu_pid == 0 {
        return 0;
    }
    let tap = tap.to_owned();
    let result = node
        .run(move || {
            let drained = crate::net::tapdrain::drain_process_tap(qemu_pid, &tap)?;
            let sent = crate::net::tapdrain::reinject(&drained.packets)?;
            Ok::<_, std::io::Error>((drained, sent))
        })
        .await;
    match result {
        Ok(Ok((d, sent))) => {
            tracing::info!(
                queues = d.queues,
                packets = d.packets.len(),
                other = d.other_frames,
                sent,
                "source tap drained"
            );
            sent
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot drain the source tap; packets queued at STOP are lost");
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot drain the source tap");
            0
        }
    }
}

/// Why a forward ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardEnd {
    /// ReleaseForward (or the agent stopping it).
    Released,
    /// The node's route to the VM is no longer the forward's: the cluster routes the VM's
    /// address elsewhere (a CNI that learned the move), or the VM came back to this node.
    TakenOver,
    /// The tunnel carried nothing for the idle timeout (only when one is set).
    Idle,
    /// The destination says the VM stopped there (or further down a chain of moves).
    VmStopped,
}

impl ForwardEnd {
    /// For logs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Released => "released",
            Self::TakenOver => "the node's route to the VM was taken over",
            Self::Idle => "idle",
            Self::VmStopped => "the VM stopped on the destination",
        }
    }
}

/// How often the forward's route is compared with the node's.
const ROUTE_POLL: Duration = Duration::from_secs(1);

/// Forwards until it is no longer the only path to the VM, then removes what is still its own
/// (routes it installed — a route someone else replaced is left alone — and the tunnel):
/// - `release` fires (ReleaseForward);
/// - the node's route to the VM's first address is no longer the forward's (the cluster routes
///   the address elsewhere), unless `coming_back()` says a migration is bringing the VM back to
///   this node — then its incoming sandbox holds the route for now and may give it back on
///   rollback, so the forward waits for that migration's end;
/// - with a non-zero `idle` and a tunnel: the tunnel carried nothing for `idle`. Zero (the
///   default) never ends a forward for being quiet: a quiet service must stay reachable;
/// - `vm_stopped` resolves: the destination says the VM stopped there
///   ([`crate::migration::vm_status`]).
///
/// It does not depend on the source QEMU (DESIGN.md decision 5: Kata's shim kills a paused
/// sandbox, and an incoming sandbox that handed its VM on is removed, while the forward may
/// still be the only path to the VM).
pub async fn forward_until_released(
    node: Arc<NetnsHandle>,
    forward: SourceForward,
    idle: Duration,
    release: CancelToken,
    coming_back: impl Fn() -> bool + Send,
    vm_stopped: impl std::future::Future<Output = ()> + Send,
) -> ForwardEnd {
    let end = tokio::select! {
        _ = release.cancelled() => ForwardEnd::Released,
        () = vm_stopped => ForwardEnd::VmStopped,
        () = until_taken_over(&node, &forward, coming_back) => ForwardEnd::TakenOver,
        () = until_idle(&node, &forward, idle), if !idle.is_zero() => ForwardEnd::Idle,
    };
    tracing::info!(why = end.as_str(), "forward ends: removing it");
    if let Err(err) = forward.remove(node.as_ref()).await {
        tracing::warn!(error = %err, "removing the forward failed");
    }
    end
}

/// Resolves once the node routes the VM's first address other than the forward does, for good.
async fn until_taken_over(node: &Arc<NetnsHandle>, forward: &SourceForward, coming_back: impl Fn() -> bool) {
    let Some(ours) = forward.swap.first() else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(ROUTE_POLL).await;
        match current_route(node.as_ref(), ours.dest).await {
            Ok(now) if !is_ours(now.as_ref(), ours) => {
                if coming_back() {
                    tracing::debug!(dest = %ours.dest, "route held by a sandbox coming back: the forward waits");
                    continue;
                }
                tracing::info!(dest = %ours.dest, now = ?now, "the node's route to the VM is no longer the forward's");
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the node's route to the VM"),
        }
    }
}

/// Whether the node's current route is the forward's own.
fn is_ours(now: Option<&RouteSpec>, ours: &RouteSpec) -> bool {
    now.is_some_and(|r| r.dev.index == ours.dev.index && r.gateway == ours.gateway)
}

/// Resolves once the tunnel carried nothing for `idle` (or is gone); never without a tunnel
/// (route mode has no per-VM counter).
async fn until_idle(node: &Arc<NetnsHandle>, forward: &SourceForward, idle: Duration) {
    let Some(tunnel) = forward.tunnel.clone() else {
        return std::future::pending().await;
    };
    let mut last = None;
    let mut quiet_since = Instant::now();
    loop {
        let name = tunnel.name.clone();
        let count = node.run(move || tx_packets(&name)).await.ok().flatten();
        if count != last {
            last = count;
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() >= idle || count.is_none() {
            return;
        }
        tokio::time::sleep(IDLE_POLL).await;
    }
}

/// Transmitted packets of a link, from `/proc/thread-self/net/dev` (the calling thread's
/// namespace), or `None` if the link is gone.
fn tx_packets(link: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
    parse_tx_packets(&text, link)
}

fn parse_tx_packets(text: &str, link: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        (name.trim() == link).then(|| rest.split_whitespace().nth(9)?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_counter_parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:   100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\nkmrs1234abcd: 0 0 0 0 0 0 0 0 5000 42 0 0 0 0 0 0\n";
        assert_eq!(parse_tx_packets(text, "kmrs1234abcd"), Some(42));
        assert_eq!(parse_tx_packets(text, "lo"), Some(2));
        assert_eq!(parse_tx_packets(text, "eth9"), None);
    }

    #[test]
    fn a_route_is_the_forwards_by_device_and_next_hop() {
        let dest = crate::net::IpPrefix::host("10.244.1.10".parse().expect("ip"));
        let tunnel = crate::net::LinkId { index: 40, name: "kmrs0".into() };
        let ours = RouteSpec::dev(dest, tunnel);
        let as_read = |index: u32, gateway: Option<std::net::IpAddr>| RouteSpec {
            dest,
            gateway,
            dev: crate::net::LinkId { index, name: format!("if{index}") },
            onlink: false,
            protocol: Some(4),
        };
        assert!(is_ours(Some(&as_read(40, None)), &ours), "read back by index");
        assert!(!is_ours(Some(&as_read(12, None)), &ours), "a CNI's route to a local pod");
        assert!(!is_ours(None, &ours), "no route at all");
        let gw: std::net::IpAddr = "10.201.0.12".parse().expect("ip");
        let up = crate::net::LinkId { index: 2, name: "eth0".into() };
        let via = RouteSpec::via_onlink(dest, gw, up);
        assert!(is_ours(Some(&as_read(2, Some(gw))), &via));
        assert!(!is_ours(Some(&as_read(2, Some("10.201.0.13".parse().expect("ip")))), &via), "another node");
    }
}
