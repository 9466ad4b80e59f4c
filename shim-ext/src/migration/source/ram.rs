//! RAM on the source, up to QEMU's `completed`: pre-copy with the engine's own switchover
//! decision (swap the routes, let in-flight packets land, stop), the storage hand-off at
//! `pre-switchover`, and the STOP watcher that swaps the routes when QEMU stops first.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::switchover::{Mode, Switchover, Verdict};
use super::{peer_message, spawn_stream_relay, Machine, SourceEnv, SourceRequest};
use crate::convert::unix_nanos;
use crate::dataplane::sendq::{Drained, SendQueue};
use crate::migration::ctl::{Ctl, CtlMsg};
use crate::migration::error::{chain, EngineError};
use crate::migration::events::{CutoverTimes, Event, EventLog, Phase, RamProgress};
use crate::migration::failpoint;
use crate::migration::network::SourceForward;
use crate::migration::options::{downtime_from_rtt, next_downtime_limit, MigrationOptions};
use crate::migration::protocol::SourceInput;
use crate::migration::qemu::dirty_rate::{self, Measurement};
use crate::migration::qemu::{self, compute, mirror, EventBus, MirrorJob, QemuFeatures, RamConfig};
use crate::net::NetnsHandle;
use crate::qmp::{EventKind, MigrationStatus, QmpClient};

/// How often RAM progress is reported as an event.
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// After the route swap and before QEMU may stop the VM: packets already routed into the sandbox
/// (in the veth and the tap) reach the still-running VM.
const SWITCHOVER_SETTLE: Duration = Duration::from_millis(2);
/// After the settle, the longest the switchover waits for the VM to read what its tap still
/// holds: a frame left there at the stop reaches the VM only after the move, through the tap
/// drain, behind the packets the destination held (out of order). Before the stop, so the
/// wait adds nothing to the pause; bounded, because a guest that stopped reading its NIC would
/// hold the migration otherwise.
const TAP_SETTLE_LIMIT: Duration = Duration::from_millis(20);
/// How often the tap is looked at meanwhile.
const TAP_SETTLE_POLL: Duration = Duration::from_millis(1);
/// The longest the paused source waits for the destination to release its disks.
const STORAGE_RELEASE_LIMIT: Duration = Duration::from_secs(10);
/// The longest the mirrors may take to settle at pre-switchover (the guest is paused).
const MIRROR_SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// What may wait unsent in the RAM stream when the engine stops the VM (`dataplane::sendq`):
/// under a millisecond of transfer at the lab's slowest stream (TLS under TCG, ~130 MB/s).
const DRAIN_BOUND: u32 = 64 * 1024;
/// The longest the switchover waits for the RAM stream's queue to fall to [`DRAIN_BOUND`]
/// (the benchmark's moves drained 0.3–4.1 MB in 3–43 ms). The guest runs meanwhile.
const DRAIN_LIMIT: Duration = Duration::from_millis(50);
/// How long the STOP watcher may lag QEMU's completion.
const STOP_SEEN_LIMIT: Duration = Duration::from_secs(5);

/// The RAM phase's inputs.
pub(super) struct Ram<'a> {
    pub(super) req: &'a SourceRequest,
    pub(super) qmp: &'a QmpClient,
    pub(super) bus: &'a EventBus,
    pub(super) node: &'a Arc<NetnsHandle>,
    pub(super) forward: &'a SourceForward,
    pub(super) env: &'a SourceEnv,
    pub(super) features: &'a QemuFeatures,
    pub(super) options: &'a MigrationOptions,
    /// A dirty-rate sample was started ([`sample_dirty_rate`]).
    pub(super) sampling: bool,
}

/// QEMU completed: the cutover's instants so far.
#[derive(Debug)]
pub(super) struct Done {
    pub(super) times: CutoverTimes,
}

impl Ram<'_> {
    /// Configures and starts the RAM migration and runs it to QEMU's `completed`.
    ///
    /// # Errors
    /// QEMU, the streams, the control stream, a cancel or the deadline.
    pub(super) async fn run(
        &self,
        jobs: &[MirrorJob],
        rtt: Duration,
        ctl: &mut Ctl,
        machine: &mut Machine,
    ) -> Result<Done, EngineError> {
        let Self { req, qmp, bus, node, forward, env, features, options, .. } = *self;
        let (log, cleanup, cancel) = (&env.log, &env.cleanup, env.gate.token());
        let mut ram = RamConfig::from_options(options);
        ram.pause_before_switchover = !jobs.is_empty();
        if options.auto_downtime {
            ram.downtime_limit = downtime_from_rtt(ram.downtime_limit, rtt);
        }
        // A rollback leaves the QEMU's migration settings as they were: pushed before
        // `configure`, which may fail half-way, so that it unwinds after the migration ended.
        let before = compute::OutgoingSettings::read(qmp, features, &ram).await?;
        {
            let q = qmp.clone();
            cleanup.push("put back the source QEMU's migration settings", move || async move {
                before.restore(&q).await.map_err(|e| e.to_string())
            });
        }
        compute::configure(qmp, features, &ram).await?;
        // Controlled switchover: QEMU iterates with a 1 ms limit and would complete by itself
        // only after a pass that dirtied less than a millisecond of transfer (or, where its
        // dirty tracking does not survive a sync, runs one pass with limit 0 and completes at
        // its end, the routes moved just before); katamaran decides the moment (switchover.rs),
        // swaps the route first, then gives QEMU the real limit. A packet that reaches a stopped
        // source is read by QEMU once and parked inside it, out of reach; swapping before STOP
        // means no packet reaches a stopped source.
        let mode = if features.iterates_safely() { Mode::Iterate } else { Mode::SinglePass };
        if mode == Mode::SinglePass {
            tracing::warn!(
                version = %features.version(),
                "QEMU under TCG before 9.0 loses stores across dirty-bitmap syncs: pre-copy runs one pass, the guest pauses longer"
            );
        }
        // Where QEMU has it, a threshold below a page besides: QEMU then completes by itself only
        // after a sync that found nothing, not at a first sync that found little.
        let hold = mode == Mode::Iterate && compute::has_switchover_bandwidth(features);
        compute::set_limit(qmp, mode.qemu_limit(), hold.then_some(compute::COMPLETION_HOLD_BANDWIDTH))
            .await?;
        // The guest's dirty rate for the first pass, sampled since PREPARING (`sample_dirty_rate`).
        let mut measuring = self.sampling && mode == Mode::Iterate;
        let mut status_sub = bus.subscribe();
        let times = Arc::new(Mutex::new(CutoverTimes::default()));
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let swapped = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_stop(
            swapped.clone(),
            bus.subscribe(),
            node.clone(),
            forward.clone(),
            times.clone(),
            log.clone(),
            stop_tx,
        ));
        let abort_watcher = watcher.abort_handle();
        cleanup.push("stop the STOP watcher", move || async move {
            abort_watcher.abort();
            Ok::<(), String>(())
        });
        let (uri, mut queue) = start_ram_stream(node, req, qmp, &ram, cleanup).await?;
        {
            // Before the commit the source gets its VM back whatever stage QEMU reached: the
            // migration cancelled and ended first, then `cont`, then the routes.
            let (q, n, f, swapped) = (qmp.clone(), node.clone(), forward.clone(), swapped.clone());
            cleanup.push("resume the source VM and restore its routes", move || async move {
                let resumed = super::resume_before_commit(&q, Duration::from_secs(30)).await;
                // Only routes that moved go back: an untouched route stays exactly as it was.
                let restored =
                    if swapped.load(Ordering::SeqCst) { f.restore(n.as_ref()).await } else { Ok(()) };
                resumed.map_err(|e| e.to_string())?;
                restored.map_err(|e| e.to_string())
            });
        }
        compute::start_outgoing(qmp, &uri).await?;
        let mut predictor = Switchover::new(mode, Instant::now());
        log.push(Event::new(
            Phase::Ram,
            format!("RAM pre-copy to {} (downtime limit {:?})", req.dest_node, ram.downtime_limit),
        ));
        failpoint::point("source-ram").await?;

        let deadline = tokio::time::Instant::now() + options.ram_timeout;
        let mut next_poll = tokio::time::Instant::now();
        let mut next_report = Instant::now();
        let mut remaining_history: Vec<u64> = Vec::new();
        let mut last_iteration = 0;
        let mut downtime_limit = ram.downtime_limit;
        // The engine stopped the VM (its switchover ran).
        let mut stopped = false;
        loop {
            tokio::select! {
                ev = status_sub.next() => {
                    let Some(ev) = ev else { return Err(EngineError::QmpClosed) };
                    let EventKind::Migration(status) = ev.kind() else { continue };
                    match status {
                        MigrationStatus::PreSwitchover => {
                            failpoint::point("source-pre-switchover").await?;
                            settle_storage(qmp, bus, jobs, ctl, machine).await?;
                            compute::continue_after_switchover(qmp).await?;
                            log.push(Event::new(Phase::Cutover, "pre-switchover: mirrors completed, the destination released its disks"));
                        }
                        // The statistics are read after the commit: not on the guest's pause.
                        MigrationStatus::Completed => {
                            log.push(Event::new(Phase::Cutover, "QEMU completed on the source"));
                            break;
                        }
                        MigrationStatus::Failed => {
                            let info = qmp.query_migrate().await?;
                            return Err(EngineError::QemuMigrationFailed(
                                info.error_desc.unwrap_or_else(|| "no reason given".into())));
                        }
                        MigrationStatus::Cancelled => return Err(EngineError::Cancelled("migration cancelled in QEMU".into())),
                        _ => {}
                    }
                }
                () = tokio::time::sleep_until(next_poll) => {
                    // Only the first pass needs it: from the first sync on, the syncs tell.
                    if measuring && predictor.synced() {
                        measuring = false;
                        log.push(Event::new(Phase::Ram, "dirty-rate sample not ready before the first sync"));
                    }
                    if measuring {
                        measuring = seed_when_measured(qmp, &mut predictor, log).await;
                    }
                    let (status, p) = compute::progress(qmp).await?;
                    let now = Instant::now();
                    let verdict = predictor.observe(now, &p, downtime_limit);
                    next_poll = tokio::time::Instant::now() + match verdict {
                        Verdict::Wait(after) => after,
                        Verdict::MoveRoutes => super::switchover::POLL_FAST,
                        Verdict::Switch { .. } => super::switchover::POLL_SLOW,
                    };
                    match verdict {
                        Verdict::MoveRoutes if !swapped.load(Ordering::SeqCst) && status == MigrationStatus::Active => {
                            let note = match mode {
                                Mode::Iterate => format!("VM routes forward to the destination ahead of QEMU's first sync (pass {})", p.iteration),
                                Mode::SinglePass => format!(
                                    "VM routes forward to the destination ahead of QEMU's completion at the end of its only pass ({} MiB left)",
                                    p.remaining_bytes >> 20
                                ),
                            };
                            move_routes(node, forward, &swapped, &times, &note, env).await?;
                            predictor.routes_moved(Instant::now());
                            continue;
                        }
                        // Not once QEMU stopped the VM by itself (the STOP watcher has it).
                        Verdict::Switch { predicted } if !stopped && !*stop_rx.borrow() && status == MigrationStatus::Active => {
                            let why = Why { predicted, dirty_rate: predictor.dirty_rate(), p };
                            let limit = Limit { downtime: downtime_limit, release_hold: hold };
                            let tap = (self.req.qemu_pid, self.req.tap_name.as_str());
                            let q = queue.take();
                            switchover(qmp, node, forward, &swapped, &times, limit, &why, tap, q, env).await?;
                            stopped = true;
                            continue;
                        }
                        _ => {}
                    }
                    if options.auto_downtime && p.iteration > last_iteration {
                        last_iteration = p.iteration;
                        remaining_history.push(p.remaining_bytes);
                        if let Some(next) = next_downtime_limit(downtime_limit, &remaining_history) {
                            tracing::warn!(from = ?downtime_limit, to = ?next, "RAM does not converge: raising the downtime limit");
                            downtime_limit = next;
                            remaining_history.clear();
                        }
                    }
                    if log.phase() == Phase::Ram && now >= next_report {
                        next_report = now + REPORT_EVERY;
                        let mut e = Event::new(Phase::Ram, "pre-copy");
                        e.ram = Some(p);
                        log.push(e);
                    }
                }
                r = async { stop_rx.wait_for(|s| *s).await.map(|_| ()) }, if !matches!(machine.state, crate::migration::protocol::SourceState::Switchover { .. }) => {
                    if r.is_ok() {
                        machine.step(SourceInput::Stopped)?;
                        failpoint::point("source-after-stop").await?;
                    }
                }
                msg = ctl.recv() => match msg {
                    // The destination's vote can overtake QEMU's own completion.
                    Ok(CtlMsg::Prepared) => { machine.step(SourceInput::Voted)?; }
                    Ok(m) => return Err(peer_message(m, "RAM pre-copy")),
                    Err(e) => return Err(EngineError::ctl("RAM pre-copy")(e)),
                },
                reason = cancel.cancelled() => return Err(EngineError::Cancelled(reason)),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(EngineError::Timeout { what: "in RAM pre-copy", after: options.ram_timeout });
                }
            }
        }
        // QEMU stopped the VM before it reported completion; the STOP watcher reacts to that STOP
        // on its own subscription: wait until its route swap is recorded.
        if tokio::time::timeout(STOP_SEEN_LIMIT, stop_rx.wait_for(|h| *h)).await.is_err() {
            tracing::warn!("no STOP seen before completion");
        }
        if !matches!(machine.state, crate::migration::protocol::SourceState::Switchover { .. }) {
            machine.step(SourceInput::Stopped)?;
        }
        let times = times.lock().map(|t| t.clone()).unwrap_or_default();
        Ok(Done { times })
    }
}

/// Has QEMU start sampling the guest's dirty rate for the first pass of an iterating pre-copy
/// (`qemu/dirty_rate.rs`); `true` if it started. Sampling only reads guest memory, so it may
/// overlap the storage phase and the start of pre-copy.
pub(super) async fn sample_dirty_rate(qmp: &QmpClient, features: &QemuFeatures, log: &EventLog) -> bool {
    if !features.iterates_safely() || !dirty_rate::supported(features) {
        return false;
    }
    match dirty_rate::start(qmp).await {
        Ok(()) => true,
        Err(e) => {
            log.push(Event::new(
                Phase::Preparing,
                format!("no dirty-rate sample ({}): the first pass predicts nothing", chain(&e)),
            ));
            false
        }
    }
}

/// Gives the predictor the measured dirty rate once QEMU has it; `false` once there is nothing
/// more to wait for (measured, or no measurement after all).
async fn seed_when_measured(qmp: &QmpClient, predictor: &mut Switchover, log: &EventLog) -> bool {
    match dirty_rate::poll(qmp).await {
        Ok(Measurement::Unstarted | Measurement::Measuring) => true,
        Ok(Measurement::Measured(bytes_per_second)) => {
            predictor.seed_dirty_rate(bytes_per_second);
            log.push(Event::new(
                Phase::Ram,
                format!("guest dirties at most {} MiB/s (sampled)", bytes_per_second >> 20),
            ));
            false
        }
        Ok(Measurement::Absent) => {
            log.push(Event::new(
                Phase::Ram,
                "no dirty-rate sample from QEMU: the first pass predicts nothing",
            ));
            false
        }
        Err(e) => {
            log.push(Event::new(
                Phase::Ram,
                format!("no dirty-rate sample ({}): the first pass predicts nothing", chain(&e)),
            ));
            false
        }
    }
}

/// At `pre-switchover` (the guest paused): completes the mirrors consistently and has the
/// destination stop its NBD exports, each wait bounded.
async fn settle_storage(
    qmp: &QmpClient,
    bus: &EventBus,
    jobs: &[MirrorJob],
    ctl: &mut Ctl,
    machine: &mut Machine,
) -> Result<(), EngineError> {
    mirror::complete_consistent(qmp, bus, jobs, MIRROR_SETTLE_LIMIT).await?;
    ctl.send(CtlMsg::StorageDone).map_err(EngineError::ctl("releasing the disks"))?;
    let until = tokio::time::Instant::now() + STORAGE_RELEASE_LIMIT;
    loop {
        let msg = tokio::time::timeout_at(until, ctl.recv())
            .await
            .map_err(|_| EngineError::Timeout {
                what: "for the destination to release its disks",
                after: STORAGE_RELEASE_LIMIT,
            })?
            .map_err(EngineError::ctl("the destination released its disks"))?;
        match msg {
            CtlMsg::StorageReleased => return Ok(()),
            CtlMsg::StorageError(why) => return Err(EngineError::StorageRelease(why)),
            CtlMsg::Prepared => {
                machine.step(SourceInput::Voted)?;
            }
            other => return Err(peer_message(other, "the destination released its disks")),
        }
    }
}

/// QEMU's limit after the engine's stop: the real downtime limit, and QEMU's own bandwidth
/// estimate back if the completion was held.
#[derive(Debug, Clone, Copy)]
struct Limit {
    downtime: Duration,
    release_hold: bool,
}

/// What the switchover was decided on, for its log line.
#[derive(Debug)]
struct Why {
    predicted: Duration,
    dirty_rate: Option<u64>,
    p: RamProgress,
}

/// Moves the VM routes to the destination and records when (the VM keeps running).
async fn move_routes(
    node: &Arc<NetnsHandle>,
    forward: &SourceForward,
    swapped: &AtomicBool,
    times: &Mutex<CutoverTimes>,
    note: &str,
    env: &SourceEnv,
) -> Result<(), EngineError> {
    let acked = forward.swap(node.as_ref()).await?;
    swapped.store(true, Ordering::SeqCst);
    if let Ok(mut t) = times.lock() {
        t.route_swapped_unix_nanos = unix_nanos(acked);
    }
    env.log.push(Event::new(Phase::Cutover, note));
    Ok(())
}

/// The engine's switchover: the routes move to the destination (unless they moved ahead of it),
/// the in-flight packets land, the VM stops, QEMU gets its real limit (not before the stop: with
/// it QEMU could complete by itself ahead of the route swap).
#[allow(clippy::too_many_arguments)]
async fn switchover(
    qmp: &QmpClient,
    node: &Arc<NetnsHandle>,
    forward: &SourceForward,
    swapped: &AtomicBool,
    times: &Mutex<CutoverTimes>,
    limit: Limit,
    why: &Why,
    (qemu_pid, tap): (u32, &str),
    queue: Option<SendQueue>,
    env: &SourceEnv,
) -> Result<(), EngineError> {
    // Converged: forward first, then stop the VM ourselves. Raising QEMU's limit instead left
    // the VM running (and its traffic at the destination's plug) for up to 400 ms until QEMU's
    // next threshold update.
    let lead = Instant::now();
    let (pass, predicted) = (why.p.iteration, why.predicted.as_millis());
    let min_settle = if swapped.load(Ordering::SeqCst) {
        // The routes moved ahead of the stop, long enough ago for the in-flight packets to land.
        let note = format!("switchover: source stops (pass {pass}, predicted pause {predicted} ms)");
        env.log.push(Event::new(Phase::Cutover, note));
        Duration::ZERO
    } else {
        let note = format!(
            "switchover: VM routes forward to the destination (pass {pass}, predicted pause {predicted} ms)"
        );
        move_routes(node, forward, swapped, times, &note, env).await?;
        SWITCHOVER_SETTLE
    };
    // After the route swap, as the switchover decided: a drain before it could let QEMU complete
    // by itself while the VM's packets still reach the source.
    let queue = queue.as_ref();
    let (drained, settle) = tokio::join!(drain_ram_stream(queue), settle_into_vm(qemu_pid, tap, min_settle));
    if settle.pending_at_stop == Some(true) {
        tracing::warn!(
            waited_ms = settle.waited.as_millis(),
            tap,
            "the VM had not read its tap by the stop: those packets follow after the move, out of order"
        );
    }
    qmp.stop().await?;
    let swap_to_stop = lead.elapsed();
    if let Some(Err(e)) = queue.map(SendQueue::unbound) {
        tracing::warn!(error = %e, "cannot lift the RAM stream's bound");
    }
    compute::set_limit(qmp, limit.downtime, limit.release_hold.then_some(0)).await?;
    if let Some(d) = drained {
        let note = format!(
            "RAM stream drained before the stop: {} KiB unsent, {} KiB left after {} ms{}",
            d.before / 1024,
            d.after / 1024,
            d.waited.as_millis(),
            if d.timed_out { " (its limit)" } else { "" }
        );
        env.log.push(Event::new(Phase::Cutover, note));
    }
    tracing::info!(
        predicted_pause_us = why.predicted.as_micros(),
        dirty_bytes_per_second = why.dirty_rate.unwrap_or(0),
        iteration = why.p.iteration,
        remaining = why.p.remaining_bytes,
        swap_to_stop_us = swap_to_stop.as_micros(),
        settle_us = settle.waited.as_micros(),
        tap_pending_at_stop = ?settle.pending_at_stop,
        ram_unsent_before = drained.map(|d| d.before),
        ram_unsent_at_stop = drained.map(|d| d.after),
        ram_drain_us = drained.map(|d| d.waited.as_micros()),
        "switchover: VM routes forward to the destination, source VM stopped"
    );
    Ok(())
}

/// Lets what QEMU queued in the RAM stream leave before the stop ([`DRAIN_BOUND`],
/// [`DRAIN_LIMIT`]); `None` without a single stream to look at (multifd) or when it cannot be.
async fn drain_ram_stream(queue: Option<&SendQueue>) -> Option<Drained> {
    match queue?.drain(DRAIN_BOUND, DRAIN_LIMIT).await {
        Ok(d) => {
            if d.timed_out {
                tracing::info!(
                    unsent = d.after,
                    waited_ms = d.waited.as_millis(),
                    "the RAM stream did not drain in time; stopping anyway"
                );
            }
            Some(d)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot drain the RAM stream before the stop");
            None
        }
    }
}

/// What the wait between the route swap and the stop found.
#[derive(Debug, Clone, Copy)]
struct Settle {
    /// From the settle's start to the stop.
    waited: Duration,
    /// Whether frames were still unread in the VM's tap at the stop (`None`: not watched).
    pending_at_stop: Option<bool>,
}

/// Lets the packets routed to the source before the swap reach the VM: at least `min`, then
/// until the VM has read every frame its tap holds (at most [`TAP_SETTLE_LIMIT`]). Without a
/// tap to watch (no QEMU pid, no descriptor found), `min` only.
async fn settle_into_vm(qemu_pid: u32, tap: &str, min: Duration) -> Settle {
    let started = Instant::now();
    let watch = if qemu_pid == 0 {
        None
    } else {
        let tap = tap.to_owned();
        match tokio::task::spawn_blocking(move || crate::net::tapdrain::TapWatch::open(qemu_pid, &tap)).await
        {
            Ok(Ok(w)) => Some(w),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot watch the source tap; the fixed settle only");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "tap watch task failed; the fixed settle only");
                None
            }
        }
    };
    let rest = min.saturating_sub(started.elapsed());
    if !rest.is_zero() {
        tokio::time::sleep(rest).await;
    }
    let pending_at_stop = match &watch {
        Some(w) => Some(wait_until_read(|| w.pending(), TAP_SETTLE_LIMIT, TAP_SETTLE_POLL).await),
        None => None,
    };
    Settle { waited: started.elapsed(), pending_at_stop }
}

/// Polls `pending` every `every` until it says nothing is pending, or `limit` passed. Returns
/// whether something was still pending; a failed look counts as nothing (the fixed settle
/// already passed).
async fn wait_until_read(
    mut pending: impl FnMut() -> std::io::Result<bool>,
    limit: Duration,
    every: Duration,
) -> bool {
    let until = Instant::now() + limit;
    loop {
        match pending() {
            Ok(true) if Instant::now() < until => tokio::time::sleep(every).await,
            Ok(true) => return true,
            Ok(false) => return false,
            Err(e) => {
                tracing::debug!(error = %e, "cannot poll the source tap");
                return false;
            }
        }
    }
}

/// Opens the RAM transport and returns the `migrate` URI, and for a single stream a handle on
/// its send queue (drained before the stop). A single stream is handed to QEMU as an fd (no
/// userspace copy); multifd opens several connections, which QEMU 7.2 cannot take as fds, so
/// they go through a local unix socket and a relay each.
async fn start_ram_stream(
    node: &Arc<NetnsHandle>,
    req: &SourceRequest,
    qmp: &QmpClient,
    ram: &RamConfig,
    cleanup: &crate::migration::cleanup::Cleanup,
) -> Result<(String, Option<SendQueue>), EngineError> {
    if ram.multifd_channels.is_none() {
        let name = "kmr-ram";
        let stream = super::hand_stream_to_qemu(node, req, qmp, req.ram_endpoint, "ram", name).await?;
        return Ok((format!("fd:{name}"), Some(SendQueue::from(OwnedFd::from(stream)))));
    }
    let path = req.state_dir.join("ram.sock");
    spawn_stream_relay(node, req, req.ram_endpoint, "ram", &path, cleanup)?;
    Ok((format!("unix:{}", path.display()), None))
}

/// Reacts to STOP with the route swap (when the engine's switchover did not come first) and to
/// a later RESUME (QEMU restarted the source after a failure) with the routes put back. Runs
/// until aborted.
async fn watch_stop(
    swapped: Arc<AtomicBool>,
    mut sub: qemu::Subscription,
    node: Arc<NetnsHandle>,
    forward: SourceForward,
    times: Arc<Mutex<CutoverTimes>>,
    log: crate::migration::events::EventLog,
    stop_seen: tokio::sync::watch::Sender<bool>,
) {
    let mut stopped = false;
    while let Some(ev) = sub.next().await {
        match ev.kind() {
            EventKind::Stop if !stopped => {
                stopped = true;
                let seen = Instant::now();
                let stop_at = ev.qemu_timestamp.unwrap_or(ev.received_at);
                let mut t = times.lock().map(|t| t.clone()).unwrap_or_default();
                t.stop_unix_nanos = unix_nanos(stop_at);
                let message = if swapped.load(Ordering::SeqCst) {
                    tracing::info!(
                        lead_us = t.stop_unix_nanos.saturating_sub(t.route_swapped_unix_nanos) / 1000,
                        "STOP: the VM routes already forward to the destination"
                    );
                    "source stopped; VM routes were swapped before the stop"
                } else {
                    let result = forward.swap(node.as_ref()).await;
                    // The poll loop must not swap (and re-time) a second time.
                    swapped.store(true, Ordering::SeqCst);
                    match result {
                        Ok(acked) => {
                            t.route_swapped_unix_nanos = unix_nanos(acked);
                            t.stop_to_route_swap_nanos =
                                acked.duration_since(stop_at).map_or(0, |d| d.as_nanos() as u64);
                            tracing::info!(
                                reaction_us = t.stop_to_route_swap_nanos / 1000,
                                delivery_us = ev.delivery_latency().map_or(0, |d| d.as_micros()),
                                swap_us = seen.elapsed().as_micros(),
                                "STOP: VM routes now forward to the destination"
                            );
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "STOP: route swap failed; packets reach the paused source")
                        }
                    }
                    "source stopped; VM routes forward to the destination"
                };
                if let Ok(mut shared) = times.lock() {
                    *shared = t.clone();
                }
                let mut e = Event::new(Phase::Cutover, message);
                e.cutover = Some(t);
                log.push(e);
                stop_seen.send_replace(true);
            }
            EventKind::Resume if stopped => {
                stopped = false;
                match forward.restore(node.as_ref()).await {
                    Ok(()) => {
                        tracing::warn!("source VM resumed after STOP: VM routes restored to the sandbox")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "source VM resumed but its routes could not be restored")
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_tap_settle_ends_when_the_vm_read_everything_or_at_its_limit() {
        // Read after three looks: nothing pending at the stop, well before the limit.
        let mut looks = 0;
        let started = Instant::now();
        let pending = wait_until_read(
            || {
                looks += 1;
                Ok(looks < 3)
            },
            Duration::from_secs(5),
            Duration::from_millis(1),
        )
        .await;
        assert!(!pending);
        assert_eq!(looks, 3);
        assert!(started.elapsed() < Duration::from_secs(1));

        // Never read: still pending at the limit, which bounds the wait.
        let started = Instant::now();
        let pending = wait_until_read(|| Ok(true), Duration::from_millis(30), Duration::from_millis(1)).await;
        assert!(pending);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(30) && waited < Duration::from_secs(2), "{waited:?}");

        // A look that fails ends the wait: nothing known to be pending.
        let pending = wait_until_read(
            || Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
            Duration::from_secs(5),
            Duration::from_millis(1),
        )
        .await;
        assert!(!pending);
    }

    #[tokio::test]
    async fn without_a_qemu_the_settle_is_the_fixed_one() {
        let settle = settle_into_vm(0, "tap0_kata", Duration::from_millis(5)).await;
        assert_eq!(settle.pending_at_stop, None);
        assert!(settle.waited >= Duration::from_millis(5));
    }
}
