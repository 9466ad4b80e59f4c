//! The cutover with real packets, in the engine's two orders (DESIGN.md decisions 3 and 4,
//! docs/ENGINE.md):
//!
//! ```text
//!  probe (client, 1000 pps) ──▶ node-a ──route──▶ vm-a: echo                    before
//!        (ipip tunnel pre-created; plug on node-b's link to vm-b, buffering)
//!
//!  StopThenSwap (reacting to QEMU's STOP)      SwapThenStop (controlled switchover)
//!   STOP: vm-a stops answering ──event──▶       replace_route(VM → tunnel) on node-a
//!     replace_route(VM → tunnel) on node-a      settle (packets already routed to vm-a land)
//!                                               STOP: vm-a stops answering
//!
//!  ...    node-a ══ipip══▶ node-b ─[plug holds]─▶ vm-b (parked echo)           blackout
//!  RESUME vm-b's echo starts reading ──event──▶ plug RELEASE_INDEFINITE on node-b
//!  ...    node-a ══ipip══▶ node-b ──▶ vm-b: echo                               after
//! ```
//!
//! At STOP vm-a still answers what arrived before it (a paused VM's ring keeps those) and
//! strands what arrives after (a stopped source's tap keeps those). Both orders assert that
//! nothing sent after the route swap is lost, duplicated, reordered or dropped by the plug, and
//! that the plug held the blackout.
//!
//! - `SwapThenStop` asserts **0 lost**: no packet may reach the stopped VM.
//! - `StopThenSwap` loses what reaches vm-a between STOP and the swap; it asserts that every
//!   lost packet is one stranded there (one contiguous run) and prints the STOP → swap reaction
//!   and the loss it implies at this rate (`expected_loss` = rate × reaction).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use katamaran::net::{plug_limit_bytes, NetOps, PlugAction, QdiscParent, RouteSpec, Timing, TunnelMode};
use katamaran_probe::{ProbeConfig, Report};
use tokio::sync::oneshot;

use crate::echo::{Echo, Moment, Start};
use crate::error::{ensure, CheckError, Result, Step};
use crate::lab::wait_until;
use crate::report::Metrics;
use crate::topo::{Plan, Topo, ECHO_PORT};

/// Which comes first at the source: the VM's stop or the route swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// React to STOP with the swap (the engine's path when QEMU stops the VM on its own).
    StopThenSwap,
    /// Swap, let the packets already routed to the old place land, then stop the VM (the
    /// engine's controlled switchover).
    SwapThenStop {
        /// Between the swap and the stop.
        settle: Duration,
    },
}

/// The scenario's knobs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The order at the source.
    pub sequence: Sequence,
    /// Probe rate, packets per second.
    pub rate: u32,
    /// Probe datagram size, bytes.
    pub size: usize,
    /// Datagrams vm-a echoes before the cutover starts.
    pub before: u64,
    /// Datagrams the plug must hold before RESUME: the blackout, in packets.
    pub hold: u32,
    /// Datagrams vm-b echoes after RESUME before the probe stops.
    pub after_resume: u64,
    /// Deadline of each phase.
    pub phase_limit: Duration,
}

/// The engine's settle between the swap and letting QEMU stop the VM (shim-ext's
/// `SWITCHOVER_SETTLE`).
pub const ENGINE_SETTLE: Duration = Duration::from_millis(2);

impl Config {
    /// 1000 pps (the design's probe floor); a 250-packet blackout (~250 ms, inside the
    /// 115–280 ms QEMU downtime measured under TCG); a second of traffic on each side.
    pub fn new(sequence: Sequence) -> Self {
        Self {
            sequence,
            rate: 1000,
            size: katamaran_probe::DEFAULT_SIZE,
            before: 1000,
            hold: 250,
            after_resume: 1000,
            phase_limit: Duration::from_secs(30),
        }
    }
}

/// What one reaction took.
#[derive(Debug, Clone, Copy)]
struct Reaction {
    /// Event (stamped on the VM's thread) → the netlink call returned.
    latency: Duration,
    /// Event → the reacting task ran (the wake-up hop).
    wake: Duration,
    /// The netlink call, from the reacting task.
    call: Duration,
    /// Event → the request was written to the kernel (wall clock, from [`Timing::sent`]), when
    /// the operation reports it: when the change took effect, without the reply's trip back.
    request: Option<Duration>,
}

/// Runs the cutover.
///
/// # Errors
/// The first step or assertion that fails.
pub async fn run(cfg: &Config, m: &mut Metrics) -> Result<()> {
    let plan = Plan::V4;
    let topo = Topo::build(plan).await?;
    let target = SocketAddr::new(plan.vm, ECHO_PORT);

    // Prepared during pre-copy: the tunnel pair and the destination's plug.
    let (tunnel, _) = topo.tunnels(TunnelMode::Ipip).await?;
    let skb_len = u32::try_from(cfg.size + 42).unwrap_or(u32::MAX);
    let limit = plug_limit_bytes(u64::from(cfg.rate), skb_len, Duration::from_millis(300), 2.0);
    topo.node_b.net().install_plug(&topo.b_vm, limit).await.step("install the plug on node-b's b-vm")?;
    // node-b's namespace thread releases the plug: on the traffic's CPU, the released packets
    // and newer ones enter the same per-CPU backlog behind the veth and stay in order (a tap's
    // ring would keep them in order whichever CPU dequeued; a veth hands each packet to the
    // backlog of the CPU that sent it).
    topo.node_b.net().run(crate::lab::pin_to_traffic_cpu).await.step("pin node-b's namespace thread")?;
    let echo_a = Echo::spawn("vm-a-echo", topo.vm_a.udp(target).await?, Start::Running)?;
    let echo_b = Echo::spawn("vm-b-echo", topo.vm_b.udp(target).await?, Start::Parked)?;

    let mut probe_cfg = ProbeConfig::new(target);
    probe_cfg.rate = cfg.rate;
    probe_cfg.size = cfg.size;
    probe_cfg.duration = cfg.phase_limit * 4;
    probe_cfg.wait_ready = Some(cfg.phase_limit);
    let stop_probe = probe_cfg.stop.clone();
    let probe = topo.client.spawn_inside("probe", move || {
        // The probe's sender and receiver threads inherit the pinning.
        crate::lab::pin_to_traffic_cpu();
        katamaran_probe::run(&probe_cfg).map_err(CheckError::Probe)
    })?;
    // Raised on every exit path, so the probe thread ends with the check.
    let _stop_guard = StopOnDrop(stop_probe.clone());

    wait_until(cfg.phase_limit, "vm-a to echo the probe", || async { echo_a.echoed() >= cfg.before }).await?;

    let swap = RouteSpec::dev(plan.vm_prefix(), tunnel.clone());
    let stop_reaction = match cfg.sequence {
        Sequence::StopThenSwap => {
            let stopped = echo_a.stop()?;
            let node_a = topo.node_a.net().clone();
            let stop = join(tokio::spawn(async move {
                react(stopped, "STOP", || async move {
                    node_a.replace_route(&swap).await.map(Some).step("move the VM route into the tunnel")
                })
                .await
            }))
            .await?;
            m.ms("stop_to_swap", stop.latency);
            if let Some(request) = stop.request {
                m.ms("stop_to_request", request);
            }
            m.ms("stop_wake", stop.wake);
            m.ms("swap_call", stop.call);
            Some(stop)
        }
        Sequence::SwapThenStop { settle } => {
            let started = Instant::now();
            topo.node_a.net().replace_route(&swap).await.step("move the VM route into the tunnel")?;
            let swapped = Instant::now();
            m.ms("swap_call", swapped - started);
            // The engine's settle: a fixed time, not a condition (it cannot see into the VM).
            tokio::time::sleep(settle).await;
            let stopped = echo_a
                .stop_at(Moment::now())?
                .await
                .map_err(|_| CheckError::Unexpected("vm-a's echo ended before its STOP".into()))?;
            m.ms("swap_to_stop", stopped.at.saturating_duration_since(swapped));
            None
        }
    };

    // The blackout: the plug fills.
    let node_b = topo.node_b.net().clone();
    let held = || async {
        // Only the plug counts: another root qdisc would not be holding the blackout.
        node_b
            .qdisc(&topo.b_vm, QdiscParent::Root)
            .await
            .ok()
            .flatten()
            .filter(|q| q.kind == "plug")
            .map_or(0, |q| q.stats.qlen)
    };
    wait_until(cfg.phase_limit, "the plug to hold the blackout's packets", || async {
        held().await >= cfg.hold
    })
    .await?;

    // RESUME → plug release.
    let held_at_resume = held().await;
    let resumed = echo_b.resume()?;
    let (b_vm, release_net) = (topo.b_vm.clone(), node_b.clone());
    let resume = join(tokio::spawn(async move {
        react(resumed, "RESUME", || async move {
            release_net
                .plug_action(&b_vm, PlugAction::ReleaseIndefinite)
                .await
                .map(|()| None)
                .step("release the plug")
        })
        .await
    }))
    .await?;
    m.ms("resume_to_release", resume.latency);
    m.ms("resume_wake", resume.wake);
    m.ms("release_call", resume.call);

    wait_until(cfg.phase_limit, "vm-b to echo the probe", || async { echo_b.echoed() >= cfg.after_resume })
        .await?;
    stop_probe.store(true, Ordering::Relaxed);
    let report = tokio::task::spawn_blocking(move || probe.join())
        .await
        .map_err(|_| CheckError::Panicked("probe join"))?
        .map_err(|_| CheckError::Panicked("probe"))??;

    // The drops of the plug itself: a missing plug, or another root qdisc, would read as 0 drops.
    let plug = node_b
        .qdisc(&topo.b_vm, QdiscParent::Root)
        .await
        .step("read the plug's counters")?
        .filter(|q| q.kind == "plug")
        .ok_or_else(|| {
            CheckError::Unexpected("vm-b's root qdisc is not the plug after its release".into())
        })?;
    let seen = Seen { held: held_at_resume, plug_drops: plug.stats.drops, stranded: echo_a.finish()?.1 };
    record(m, &report, cfg, &seen, stop_reaction);
    verdict(&report, cfg, &seen)
}

/// What the check saw besides the probe's report.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Packets in the plug at RESUME.
    held: u32,
    /// The plug's drop counter at the end.
    plug_drops: u32,
    /// Datagrams that reached vm-a after its STOP.
    stranded: u64,
}

/// Awaits the event, runs the reaction at once, and times both.
async fn react<F, Fut>(event: oneshot::Receiver<Moment>, name: &str, reaction: F) -> Result<Reaction>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Timing>>>,
{
    let at =
        event.await.map_err(|_| CheckError::Unexpected(format!("the VM ended before its {name} event")))?;
    let called = Instant::now();
    let timing = reaction().await?;
    let done = Instant::now();
    Ok(Reaction {
        latency: done.saturating_duration_since(at.at),
        wake: called.saturating_duration_since(at.at),
        call: done - called,
        request: timing.and_then(|t| t.sent.duration_since(at.wall).ok()),
    })
}

async fn join(task: tokio::task::JoinHandle<Result<Reaction>>) -> Result<Reaction> {
    task.await.map_err(|_| CheckError::Panicked("reaction"))?
}

fn record(m: &mut Metrics, r: &Report, cfg: &Config, seen: &Seen, stop: Option<Reaction>) {
    m.count("sent", r.sent);
    m.count("received", r.received);
    m.count("lost", r.lost);
    m.count("lost_after_swap", r.lost.saturating_sub(seen.stranded));
    m.count("duplicated", r.duplicated);
    m.count("reordered", r.reordered);
    m.count("held", u64::from(seen.held));
    m.count("plug_drops", u64::from(seen.plug_drops));
    m.count("stranded", seen.stranded);
    m.push("longest_gap", r.longest_gap_ms, "ms");
    m.push("rtt_p50", r.rtt_ms.p50, "ms");
    m.push("send_late_p99", r.send_late_ms.p99, "ms");
    if let Some(stop) = stop {
        m.push("expected_loss", expected_loss(cfg.rate, stop.latency), "");
    }
}

/// Packets a STOP loses on average when the swap follows it: those sent during the reaction.
fn expected_loss(rate: u32, reaction: Duration) -> f64 {
    f64::from(rate) * reaction.as_secs_f64()
}

fn verdict(r: &Report, cfg: &Config, seen: &Seen) -> Result<()> {
    ensure(r.send_errors == 0, || format!("{} probe sends failed", r.send_errors))?;
    match cfg.sequence {
        Sequence::SwapThenStop { .. } => ensure(r.lost == 0 && seen.stranded == 0, || {
            format!(
                "lost {} of {} ({} reached the stopped VM); loss runs {:?}",
                r.lost, r.sent, seen.stranded, r.loss_timeline
            )
        })?,
        // A packet lost that never reached vm-a was lost on the forward path: none may be.
        Sequence::StopThenSwap => ensure(r.lost == seen.stranded && r.loss_timeline.len() <= 1, || {
            format!(
                "lost {} of {} but only {} reached the stopped VM; loss runs {:?}",
                r.lost, r.sent, seen.stranded, r.loss_timeline
            )
        })?,
    }
    ensure(r.duplicated == 0 && r.reordered == 0, || {
        format!("{} duplicated and {} reordered replies", r.duplicated, r.reordered)
    })?;
    ensure(seen.plug_drops == 0, || format!("the plug dropped {} packets", seen.plug_drops))?;
    ensure(seen.held >= cfg.hold, || format!("the plug held only {} packets at RESUME", seen.held))
}

/// Raises the probe's stop flag when dropped.
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_loss_is_rate_times_reaction() {
        assert!((expected_loss(1000, Duration::from_micros(250)) - 0.25).abs() < 1e-9);
        assert_eq!(expected_loss(1000, Duration::ZERO), 0.0);
    }

    #[test]
    fn the_default_plug_holds_the_default_blackout() {
        let cfg = Config::new(Sequence::StopThenSwap);
        let skb = (cfg.size + 42) as u32;
        let limit = plug_limit_bytes(u64::from(cfg.rate), skb, Duration::from_millis(300), 2.0);
        // The blackout is 2× the hold at most before RESUME comes (the wait polls every 5 ms).
        assert!(limit >= 2 * cfg.hold * skb);
    }

    fn report(lost: u64, runs: usize) -> Report {
        let run = katamaran_probe::LossRun { first_seq: 1000, last_seq: 1000, start_ms: 1.0, end_ms: 1.0 };
        Report { loss_timeline: vec![run; runs], ..crate::checks::probe_report(2000, lost, 0, 0) }
    }

    #[test]
    fn verdicts_per_sequence() {
        let seen = |stranded| Seen { held: 260, plug_drops: 0, stranded };
        let reactive = Config::new(Sequence::StopThenSwap);
        let controlled = Config::new(Sequence::SwapThenStop { settle: ENGINE_SETTLE });
        // Losses explained by the STOP window pass only when STOP came first.
        assert!(verdict(&report(3, 1), &reactive, &seen(3)).is_ok());
        assert!(verdict(&report(3, 1), &controlled, &seen(3)).is_err());
        assert!(verdict(&report(0, 0), &controlled, &seen(0)).is_ok());
        // A loss that did not reach vm-a is a forward-path loss either way.
        assert!(verdict(&report(4, 2), &reactive, &seen(3)).is_err());
        // Plug drops and a short hold fail both.
        let dropped = Seen { plug_drops: 1, ..seen(0) };
        assert!(verdict(&report(0, 0), &controlled, &dropped).is_err());
        let short = Seen { held: 10, ..seen(0) };
        assert!(verdict(&report(0, 0), &reactive, &short).is_err());
    }
}
