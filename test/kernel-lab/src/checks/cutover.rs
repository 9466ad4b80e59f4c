//! The cutover as the engine runs it (decisions 3 and 4), with real packets:
//!
//! ```text
//!  probe (client, 1000 pps) ──▶ node-a ──route──▶ vm-a: echo            before STOP
//!                                  │  (ipip tunnel pre-created, plug on node-b's b-vm buffering)
//!  STOP   vm-a's echo stops reading right after a datagram ──event──▶ engine:
//!           replace_route(VM → tunnel) on node-a                       (one netlink message)
//!  ...    node-a ══ipip══▶ node-b ─[plug holds]─▶ vm-b (parked echo)   blackout
//!  RESUME vm-b's echo starts reading ──event──▶ engine:
//!           plug RELEASE_INDEFINITE on node-b                          (one netlink message)
//!  ...    node-a ══ipip══▶ node-b ──▶ vm-b: echo                       after RESUME
//! ```
//!
//! STOP falls right after vm-a echoed a datagram. Whatever reaches vm-a after that and before
//! the route swap is stranded there (a real VM's source tap keeps such packets; they are lost
//! unless drained): the check counts them in vm-a's socket and asserts that they are *all* the
//! loss, in one contiguous run — every packet sent after the swap crossed the tunnel, waited in
//! the plug and came back, with nothing duplicated, reordered or dropped by the plug. With a
//! reaction faster than the inter-packet gap (1 ms at 1000 pps) nothing is lost at all; under
//! TCG on a busy host the reaction takes a few ms and the line shows what that costs
//! (`stranded`, and `expected_loss_at_random_stop` = rate × reaction for a STOP that does not
//! fall right after a packet).

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

/// The scenario's knobs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Probe rate, packets per second.
    pub rate: u32,
    /// Probe datagram size, bytes.
    pub size: usize,
    /// Datagrams vm-a echoes before STOP.
    pub before_stop: u64,
    /// Datagrams the plug must hold before RESUME: the blackout, in packets.
    pub hold: u32,
    /// Datagrams vm-b echoes after RESUME before the probe stops.
    pub after_resume: u64,
    /// Deadline of each phase.
    pub phase_limit: Duration,
}

impl Default for Config {
    /// 1000 pps (the design's probe floor); a 250-packet blackout (~250 ms, inside the
    /// 115–280 ms QEMU downtime measured under TCG); a second of traffic on each side.
    fn default() -> Self {
        Self {
            rate: 1000,
            size: katamaran_probe::DEFAULT_SIZE,
            before_stop: 1000,
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
    let vm = plan.vm_prefix();

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

    wait_until(cfg.phase_limit, "vm-a to echo the probe", || async { echo_a.echoed() >= cfg.before_stop })
        .await?;

    // STOP → route swap.
    let stopped = echo_a.stop_after_next()?;
    let node_a = topo.node_a.net().clone();
    let swap = RouteSpec::dev(vm, tunnel.clone());
    let stop_reaction = tokio::spawn(async move {
        react(stopped, "STOP", || async move {
            node_a.replace_route(&swap).await.map(Some).step("move the VM route into the tunnel")
        })
        .await
    });
    let stop = join(stop_reaction).await?;
    m.ms("stop_to_swap", stop.latency);
    if let Some(request) = stop.request {
        m.ms("stop_to_request", request);
    }
    m.ms("stop_wake", stop.wake);
    m.ms("swap_call", stop.call);

    // The blackout: the plug fills.
    let node_b = topo.node_b.net().clone();
    let held = || async {
        node_b.qdisc(&topo.b_vm, QdiscParent::Root).await.ok().flatten().map_or(0, |q| q.stats.qlen)
    };
    wait_until(cfg.phase_limit, "the plug to hold the blackout's packets", || async {
        held().await >= cfg.hold
    })
    .await?;

    // RESUME → plug release.
    let held_at_resume = held().await;
    let resumed = echo_b.resume()?;
    let b_vm = topo.b_vm.clone();
    let release_net = node_b.clone();
    let resume_reaction = tokio::spawn(async move {
        react(resumed, "RESUME", || async move {
            release_net
                .plug_action(&b_vm, PlugAction::ReleaseIndefinite)
                .await
                .map(|()| None)
                .step("release the plug")
        })
        .await
    });
    let resume = join(resume_reaction).await?;
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

    let plug = node_b.qdisc(&topo.b_vm, QdiscParent::Root).await.step("read the plug's counters")?;
    let drops = plug.map_or(0, |q| q.stats.drops);
    let (echoed_a, stranded) = echo_a.finish()?;
    let (echoed_b, _) = echo_b.finish()?;
    record(m, &report, cfg, held_at_resume, stop, drops, (echoed_a, echoed_b, stranded));
    verdict(&report, cfg, held_at_resume, drops, stranded)
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

fn record(
    m: &mut Metrics,
    r: &Report,
    cfg: &Config,
    held: u32,
    stop: Reaction,
    drops: u32,
    (echoed_a, echoed_b, stranded): (u64, u64, u64),
) {
    m.count("sent", r.sent);
    m.count("received", r.received);
    m.count("lost", r.lost);
    m.count("lost_after_swap", r.lost.saturating_sub(stranded));
    m.count("duplicated", r.duplicated);
    m.count("reordered", r.reordered);
    m.count("held", u64::from(held));
    m.count("plug_drops", u64::from(drops));
    m.count("stranded", stranded);
    m.count("echoed_a", echoed_a);
    m.count("echoed_b", echoed_b);
    m.push("longest_gap", r.longest_gap_ms, "ms");
    m.push("rtt_p50", r.rtt_ms.p50, "ms");
    m.push("rtt_p99", r.rtt_ms.p99, "ms");
    m.push("send_late_p99", r.send_late_ms.p99, "ms");
    m.push("expected_loss_at_random_stop", expected_loss(cfg.rate, stop.latency), "");
}

/// Packets a STOP at a random instant loses on average: those sent during the reaction.
fn expected_loss(rate: u32, reaction: Duration) -> f64 {
    f64::from(rate) * reaction.as_secs_f64()
}

fn verdict(r: &Report, cfg: &Config, held: u32, drops: u32, stranded: u64) -> Result<()> {
    ensure(r.send_errors == 0, || format!("{} probe sends failed", r.send_errors))?;
    // Lost packets that never reached vm-a were lost on the forward path: none may be.
    ensure(r.lost == stranded && r.loss_timeline.len() <= 1, || {
        format!(
            "lost {} of {} but only {stranded} reached the stopped VM; loss runs {:?}",
            r.lost, r.sent, r.loss_timeline
        )
    })?;
    ensure(r.duplicated == 0 && r.reordered == 0, || {
        format!("{} duplicated and {} reordered replies", r.duplicated, r.reordered)
    })?;
    ensure(drops == 0, || format!("the plug dropped {drops} packets"))?;
    ensure(held >= cfg.hold, || format!("the plug held only {held} packets at RESUME"))
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
        let cfg = Config::default();
        let skb = (cfg.size + 42) as u32;
        let limit = plug_limit_bytes(u64::from(cfg.rate), skb, Duration::from_millis(300), 2.0);
        // The blackout is 2× the hold at most before RESUME comes (the wait polls every 5 ms).
        assert!(limit >= 2 * cfg.hold * skb);
    }
}
