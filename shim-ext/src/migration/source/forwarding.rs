//! FORWARDING on the source: the packets a stopped source left in its tap are re-sent once the
//! destination runs the VM, and the forward carries the VM's traffic until it is no longer the
//! only path (see docs/ENGINE.md, forward lifetime).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::migration::network::SourceForward;
use crate::net::NetnsHandle;

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

/// Forwards until the forward carried nothing for `idle`, then removes it. It does not end with
/// the source QEMU (DESIGN.md decision 5: Kata's shim kills a paused sandbox, and an incoming
/// sandbox that handed its VM on is removed, while the forward may still be the only path to
/// the VM). Tunnel traffic is read from the tunnel link's counters; route mode has no per-VM
/// counter, so it never reports idle and the route stays until the VM's address is routed on
/// this node again (a later migration back replaces it).
pub async fn forward_until_released(node: Arc<NetnsHandle>, forward: SourceForward, idle: Duration) {
    until_idle(&node, &forward, idle).await;
    tracing::info!(?idle, "forward idle: removing it");
    if let Err(err) = forward.remove(node.as_ref()).await {
        tracing::warn!(error = %err, "removing the forward failed");
    }
}

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
}
