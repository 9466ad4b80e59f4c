//! The source role: move a running sandbox's VM to a prepared destination.
//!
//! ```text
//!  PREPARING  discover QEMU features; pre-create the tunnel; record the VM routes
//!  STORAGE    (local disks) NBD relay per disk ─▶ blockdev-mirror ─▶ every job READY
//!  RAM        migrate caps/params ─▶ authenticated RAM stream ─▶ getfd ─▶ migrate fd:
//!             ... MIGRATION pre-switchover (local disks): complete mirrors, ctl storage-done
//!                 (destination stops NBD) ─▶ migrate-continue
//!  CUTOVER    STOP event ─▶ one route replace per VM address (the reaction is measured)
//!  FORWARDING completed; the tunnel carries stragglers until idle
//!  COMPLETED  forward removed. The source QEMU stays paused (postmigrate): see docs.
//! ```
//! A RESUME after STOP means QEMU gave up and restarted the source VM: the routes go back.
//! Failure or cancel before STOP unwinds everything registered on the cleanup stack.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;

use super::cancel::CancelToken;
use super::cleanup::Cleanup;
use super::ctl::{self, Ctl};
use super::error::EngineError;
use super::events::{CutoverTimes, Event, EventLog, Phase};
use super::network::{self, SourceForward};
use super::options::{downtime_from_rtt, next_downtime_limit, MigrationOptions, StorageMode, TunnelMode};
use super::qemu::{
    self, compute, mirror, DiskInfo, EventBus, MirrorJob, NbdAddress, QemuFeatures, RamConfig,
};
use crate::convert::unix_nanos;
use crate::dataplane::{self, relay, Secret, StreamKey};
use crate::net::{NetOps, NetnsHandle, TunnelSpec};
use crate::qmp::{MigrationStatus, QmpClient};

/// How often RAM progress is polled (for the switchover decision) ...
const POLL_EVERY: Duration = Duration::from_millis(25);
/// ... and how often a poll is reported as an event.
const REPORT_EVERY_POLLS: u32 = 20;
/// After the route swap and before QEMU may stop the VM: packets already routed into the sandbox
/// (in the veth and the tap) reach the still-running VM.
const SWITCHOVER_SETTLE: Duration = Duration::from_millis(2);
/// Deadline of a data-stream connect + handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the forward's traffic counter is read.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// A validated source request.
#[derive(Debug, Clone)]
pub struct SourceRequest {
    /// Migration id.
    pub migration_id: String,
    /// Sandbox id.
    pub sandbox_id: String,
    /// The VM's addresses (host routes on this node).
    pub vm_addrs: Vec<IpAddr>,
    /// This node's address.
    pub source_node: IpAddr,
    /// The destination node's primary address (tunnel peer).
    pub dest_node: IpAddr,
    /// Every destination node address (route mode picks the VM address's family).
    pub dest_nodes: Vec<IpAddr>,
    /// The source QEMU's pid: forwarding ends at the latest when it exits.
    pub qemu_pid: u32,
    /// The sandbox's tap: packets left in its queues at STOP are recovered after completion.
    pub tap_name: String,
    /// Destination RAM/ctl listener.
    pub ram_endpoint: SocketAddr,
    /// Destination NBD listener per drive id.
    pub nbd_endpoints: BTreeMap<String, SocketAddr>,
    /// Per-migration secret.
    pub secret: Secret,
    /// Options.
    pub options: MigrationOptions,
    /// Where this migration keeps its sockets (0700).
    pub state_dir: PathBuf,
    /// The node's interface towards the destination (route mode).
    pub node_interface: Option<String>,
}

/// The live connection to the sandbox's QEMU.
#[derive(Debug, Clone)]
pub struct QemuConn {
    /// QMP.
    pub qmp: QmpClient,
    /// Its events, fanned out.
    pub bus: EventBus,
}

/// Runs the source role to its end. The caller records the returned error as the terminal
/// event and unwinds `cleanup` when it is an error.
///
/// # Errors
/// The first failure; [`EngineError::Cancelled`] when `cancel` fired before the cutover.
pub async fn run(
    req: SourceRequest,
    conn: QemuConn,
    node: Arc<NetnsHandle>,
    log: EventLog,
    cleanup: Cleanup,
    cancel: CancelToken,
) -> Result<CutoverTimes, EngineError> {
    let started = Instant::now();
    let QemuConn { qmp, bus } = conn;

    // PREPARING
    log.push(Event::new(Phase::Preparing, "discovering QEMU and preparing the forward"));
    let features = QemuFeatures::discover(&qmp).await?;
    let mut options = req.options.clone();
    let disks: Vec<DiskInfo> = qemu::list_disks(&qmp).await?.into_iter().filter(|d| !d.read_only).collect();
    let mirror_disks: Vec<DiskInfo> = match options.storage {
        StorageMode::Shared => Vec::new(),
        StorageMode::Local => disks,
    };
    for d in &mirror_disks {
        if !req.nbd_endpoints.contains_key(&d.drive_id) {
            return Err(EngineError::Invalid(format!(
                "destination offered no NBD endpoint for drive {}",
                d.drive_id
            )));
        }
    }
    let tunnel =
        network::resolve_tunnel(node.as_ref(), options.tunnel_mode, &req.vm_addrs, req.source_node.is_ipv6())
            .await?;
    if tunnel.is_none() {
        options.tunnel_mode = TunnelMode::Route;
    }
    let suffix = network::ifname_suffix(&req.migration_id);
    let tunnel_spec = tunnel.map(|mode| TunnelSpec {
        name: format!("kmrs{suffix}"),
        mode,
        local: req.source_node,
        remote: req.dest_node,
        ttl: 0,
    });
    let uplink = match (&tunnel_spec, &req.node_interface) {
        (None, Some(name)) => Some(node.link(name).await?.id),
        _ => None,
    };
    let forward = network::prepare_forward(
        &node,
        tunnel_spec,
        &req.vm_addrs,
        &req.dest_nodes,
        uplink.as_ref(),
        &cleanup,
    )
    .await?;
    check_cancel(&cancel)?;

    // Control stream first: its connect time is the RTT sample for --auto-downtime.
    let t0 = Instant::now();
    let ctl_stream = connect(&req, ctl::STREAM).await?;
    let rtt = t0.elapsed();
    let mut ctl = Ctl::new(ctl_stream);

    // STORAGE
    let mut jobs: Vec<MirrorJob> = Vec::new();
    if !mirror_disks.is_empty() {
        log.push(Event::new(
            Phase::Storage,
            format!("mirroring {} disk(s) to {}", mirror_disks.len(), req.dest_node),
        ));
        for disk in &mirror_disks {
            let path = req.state_dir.join(format!("nbd-{}.sock", qemu::storage::qemu_id("", &disk.drive_id)));
            let endpoint = *req
                .nbd_endpoints
                .get(&disk.drive_id)
                .ok_or_else(|| EngineError::Invalid(format!("no NBD endpoint for {}", disk.drive_id)))?;
            spawn_stream_relay(&req, endpoint, &format!("nbd:{}", disk.drive_id), &path, &cleanup)?;
            let job =
                mirror::start_mirror(&qmp, disk, &NbdAddress::Unix(path.clone()), &disk.drive_id).await?;
            if let Some(speed) = options.max_bandwidth {
                // --bandwidth caps the storage streams too.
                qmp.execute(
                    "block-job-set-speed",
                    Some(serde_json::json!({ "device": job.job_id, "speed": speed })),
                )
                .await?;
            }
            let (q, b, j) = (qmp.clone(), bus.clone(), job.clone());
            cleanup.push(format!("abort mirror {}", job.drive_id), move || async move {
                mirror::abort(&q, &b, &[j], Duration::from_secs(30)).await
            });
            jobs.push(job);
        }
        let mut sub = bus.subscribe();
        let log2 = log.clone();
        let ready = tokio::select! {
            r = mirror::wait_ready(&qmp, &mut sub, &jobs, options.storage_timeout, |p| {
                let mut e = Event::new(Phase::Storage, "mirroring");
                e.storage = Some(p.to_vec());
                log2.push(e);
            }) => r?,
            reason = cancel.cancelled() => {
                let _ = ctl.send(&format!("{} {reason}", ctl::CANCEL)).await;
                return Err(EngineError::Cancelled(reason));
            }
        };
        let mut e = Event::new(Phase::Storage, "every mirror is in sync");
        e.storage = Some(ready);
        log.push(e);
    }

    // RAM
    let mut ram = RamConfig::from_options(&options);
    ram.pause_before_switchover = !jobs.is_empty();
    if options.auto_downtime {
        ram.downtime_limit = downtime_from_rtt(ram.downtime_limit, rtt);
    }
    compute::configure(&qmp, &features, &ram).await?;
    // Controlled switchover: QEMU may stop the VM on its own only when nothing is left to send
    // (limit 0); katamaran decides the moment, swaps the route first, then gives QEMU the real
    // limit. A packet that reaches a stopped source is read by QEMU once and parked inside it,
    // out of reach; swapping before STOP means no packet reaches a stopped source.
    set_downtime_limit(&qmp, Duration::ZERO).await?;
    let mut status_sub = bus.subscribe();
    let times = Arc::new(Mutex::new(CutoverTimes::default()));
    let (stop_handled_tx, mut stop_handled) = tokio::sync::watch::channel(false);
    let pre_swapped = Arc::new(AtomicBool::new(false));
    let cutover_task = tokio::spawn(cutover(
        pre_swapped.clone(),
        bus.subscribe(),
        node.clone(),
        forward.clone(),
        times.clone(),
        log.clone(),
        stop_handled_tx,
    ));
    let abort_cutover = cutover_task.abort_handle();
    cleanup.push("stop the cutover watcher", move || async move {
        abort_cutover.abort();
        Ok::<(), String>(())
    });
    let uri = start_ram_stream(&req, &qmp, &ram, &cleanup).await?;
    {
        let q = qmp.clone();
        cleanup.push("migrate_cancel", move || async move { compute::cancel(&q).await });
    }
    compute::start_outgoing(&qmp, &uri).await?;
    log.push(Event::new(
        Phase::Ram,
        format!("RAM pre-copy to {} (downtime limit {:?})", req.dest_node, ram.downtime_limit),
    ));

    let deadline = tokio::time::Instant::now() + options.ram_timeout;
    let mut ticker = tokio::time::interval(POLL_EVERY);
    let mut polls: u32 = 0;
    let mut remaining_history: Vec<u64> = Vec::new();
    let mut last_iteration = 0;
    let mut downtime_limit = ram.downtime_limit;
    let info = loop {
        tokio::select! {
            ev = status_sub.next() => {
                let Some(ev) = ev else { return Err(EngineError::Precondition("QEMU closed the QMP connection".into())) };
                if ev.name != "MIGRATION" { continue; }
                match ev.data_str("status").map(MigrationStatus::from) {
                    Some(MigrationStatus::PreSwitchover) => {
                        mirror::complete_consistent(&qmp, &bus, &jobs, Duration::from_secs(60)).await?;
                        ctl.send(ctl::STORAGE_DONE).await.map_err(|e| EngineError::Precondition(e.to_string()))?;
                        let answer = ctl.recv().await.map_err(|e| EngineError::Precondition(e.to_string()))?;
                        if answer != ctl::OK {
                            return Err(EngineError::Precondition(format!("destination could not release its disks: {answer}")));
                        }
                        compute::continue_after_switchover(&qmp).await?;
                    }
                    Some(MigrationStatus::Completed) => break qmp.query_migrate().await?,
                    Some(MigrationStatus::Failed) => {
                        let info = qmp.query_migrate().await?;
                        return Err(EngineError::Precondition(format!(
                            "QEMU migration failed: {}", info.error_desc.unwrap_or_else(|| "no reason given".into()))));
                    }
                    Some(MigrationStatus::Cancelled) => return Err(EngineError::Cancelled("migration cancelled in QEMU".into())),
                    _ => {}
                }
            }
            _ = ticker.tick() => {
                let (status, p) = compute::progress(&qmp).await?;
                polls = polls.wrapping_add(1);
                let limit_ms = u64::try_from(downtime_limit.as_millis()).unwrap_or(u64::MAX);
                if !pre_swapped.load(Ordering::SeqCst)
                    && status == MigrationStatus::Active
                    && converged(&p, limit_ms)
                {
                    // Converged: forward first, then stop the VM ourselves. Raising QEMU's
                    // limit instead left the VM running (and its traffic at the destination's
                    // plug) for up to 400 ms until QEMU's next threshold update.
                    let lead = Instant::now();
                    set_downtime_limit(&qmp, downtime_limit).await?;
                    let acked = forward.swap(node.as_ref()).await?;
                    pre_swapped.store(true, Ordering::SeqCst);
                    if let Ok(mut t) = times.lock() {
                        t.route_swapped_unix_nanos = unix_nanos(acked);
                    }
                    {
                        let q = qmp.clone();
                        cleanup.push("resume the source VM", move || async move { q.cont().await });
                        let (n, f) = (node.clone(), forward.clone());
                        cleanup.push("restore the VM routes", move || async move { f.restore(n.as_ref()).await });
                    }
                    log.push(Event::new(Phase::Cutover, "switchover: VM routes forward to the destination"));
                    tokio::time::sleep(SWITCHOVER_SETTLE).await;
                    qmp.stop().await?;
                    tracing::info!(
                        expected_downtime_ms = p.expected_downtime_ms,
                        remaining = p.remaining_bytes,
                        swap_to_stop_us = lead.elapsed().as_micros(),
                        "switchover: VM routes forward to the destination, source VM stopped"
                    );
                    continue;
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
                if log.phase() == Phase::Ram && polls % REPORT_EVERY_POLLS == 1 {
                    let mut e = Event::new(Phase::Ram, "pre-copy");
                    e.ram = Some(p);
                    log.push(e);
                }
            }
            reason = cancel.cancelled(), if log.phase() < Phase::Cutover && !pre_swapped.load(Ordering::SeqCst) => {
                // Tell the destination first: its QEMU will see the stream break and must report
                // a cancel, not a failure.
                let _ = ctl.send(&format!("{} {reason}", ctl::CANCEL)).await;
                return Err(EngineError::Cancelled(reason));
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(EngineError::Timeout(format!("RAM pre-copy after {:?}", options.ram_timeout)));
            }
        }
    };
    // QEMU stopped the VM before it reported completion; the cutover task reacts to that STOP on
    // its own subscription: wait until its route swap is recorded.
    if tokio::time::timeout(Duration::from_secs(5), stop_handled.wait_for(|h| *h)).await.is_err() {
        tracing::warn!("no STOP seen before completion");
    }
    // Packets that reached the source between STOP and the route swap wait in its tap; re-send
    // them once the destination says its VM runs (before that, a paused QEMU would drop them).
    match tokio::time::timeout(Duration::from_secs(10), ctl.recv()).await {
        Ok(Ok(line)) if line == ctl::RESUMED => {}
        other => tracing::warn!(?other, "destination did not confirm RESUME on the control stream"),
    }
    let recovered = recover_tap_queue(&node, req.qemu_pid, &req.tap_name).await;
    let mut cut = times.lock().map(|t| t.clone()).unwrap_or_default();
    cut.downtime_ms = info.downtime.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if let Ok(mut t) = times.lock() {
        t.downtime_ms = cut.downtime_ms;
    }
    cleanup.disarm();
    // The cutover watcher keeps running: it owns nothing more to undo, but a late RESUME must
    // still not happen (QEMU does not resume a completed source).
    let mut e = Event::new(
        Phase::Forwarding,
        format!(
            "VM runs on {}; {recovered} packet(s) recovered from the source tap; forwarding until idle for {:?} (total {:?})",
            req.dest_node,
            options.tunnel_idle_timeout,
            started.elapsed()
        ),
    );
    e.cutover = Some(cut.clone());
    log.push(e);

    tokio::select! {
        () = forward_until_idle(&node, &forward, options.tunnel_idle_timeout) => {
            tracing::info!(idle = ?options.tunnel_idle_timeout, "forward idle: removing it");
        }
        r = crate::pidfd::wait_exit(req.qemu_pid), if req.qemu_pid > 0 => {
            tracing::info!(result = ?r, "source QEMU gone: removing the forward");
        }
    }
    if let Err(err) = forward.remove(node.as_ref()).await {
        tracing::warn!(error = %err, "removing the forward failed");
    }
    Ok(cut)
}

fn check_cancel(cancel: &CancelToken) -> Result<(), EngineError> {
    match cancel.reason() {
        Some(r) => Err(EngineError::Cancelled(r)),
        None => Ok(()),
    }
}

async fn connect(req: &SourceRequest, stream: &str) -> Result<tokio::net::TcpStream, EngineError> {
    let key = StreamKey::new(&req.migration_id, stream)?;
    Ok(dataplane::listener::connect(req.ram_endpoint, &req.secret, &key, CONNECT_TIMEOUT).await?)
}

/// Each connection QEMU opens on the local socket `path` is carried to the destination over its
/// own authenticated stream `stream`; the relay stops (and the socket goes) on cleanup.
fn spawn_stream_relay(
    req: &SourceRequest,
    endpoint: SocketAddr,
    stream: &str,
    path: &std::path::Path,
    cleanup: &Cleanup,
) -> Result<(), EngineError> {
    let key = StreamKey::new(&req.migration_id, stream)?;
    let listener = UnixListener::bind(path).map_err(EngineError::io(format!("bind {}", path.display())))?;
    let secret = req.secret.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut unix, _)) = listener.accept().await {
            let (key, secret) = (key.clone(), secret.clone());
            tokio::spawn(async move {
                match dataplane::listener::connect(endpoint, &secret, &key, CONNECT_TIMEOUT).await {
                    Ok(mut tcp) => {
                        if let Err(e) = relay::relay(&mut unix, &mut tcp).await {
                            tracing::debug!(error = %e, %key, "relay ended");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, %key, "stream refused"),
                }
            });
        }
    });
    let path = path.to_owned();
    cleanup.push(format!("stop relay {stream}"), move || async move {
        task.abort();
        std::fs::remove_file(&path).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
    });
    Ok(())
}

/// Opens the RAM transport and returns the `migrate` URI. A single stream is handed to QEMU as
/// an fd (no userspace copy); multifd opens several connections, which QEMU 7.2 cannot take as
/// fds, so they go through a local unix socket and a relay each.
async fn start_ram_stream(
    req: &SourceRequest,
    qmp: &QmpClient,
    ram: &RamConfig,
    cleanup: &Cleanup,
) -> Result<String, EngineError> {
    if ram.multifd_channels.is_none() {
        let tcp = connect(req, "ram").await?;
        let std = tcp.into_std().map_err(EngineError::io("detach the RAM stream"))?;
        let name = "kmr-ram";
        qmp.getfd(name, std.as_fd()).await?;
        drop(std);
        return Ok(format!("fd:{name}"));
    }
    let path = req.state_dir.join("ram.sock");
    spawn_stream_relay(req, req.ram_endpoint, "ram", &path, cleanup)?;
    Ok(format!("unix:{}", path.display()))
}

/// Reacts to STOP with the route swap and to a later RESUME (QEMU restarted the source after a
/// failure) with the routes put back. Runs until aborted.
async fn cutover(
    pre_swapped: Arc<AtomicBool>,
    mut sub: qemu::Subscription,
    node: Arc<NetnsHandle>,
    forward: SourceForward,
    times: Arc<Mutex<CutoverTimes>>,
    log: EventLog,
    stop_handled: tokio::sync::watch::Sender<bool>,
) {
    let mut stopped = false;
    while let Some(ev) = sub.next().await {
        match ev.name.as_str() {
            "STOP" if !stopped => {
                stopped = true;
                let seen = std::time::Instant::now();
                let stop_at = ev.qemu_timestamp.unwrap_or(ev.received_at);
                if pre_swapped.load(Ordering::SeqCst) {
                    let mut t = times.lock().map(|t| t.clone()).unwrap_or_default();
                    t.stop_unix_nanos = unix_nanos(stop_at);
                    tracing::info!(
                        lead_us = t.stop_unix_nanos.saturating_sub(t.route_swapped_unix_nanos) / 1000,
                        "STOP: the VM routes already forward to the destination"
                    );
                    if let Ok(mut shared) = times.lock() {
                        *shared = t.clone();
                    }
                    let mut e =
                        Event::new(Phase::Cutover, "source stopped; VM routes were swapped before the stop");
                    e.cutover = Some(t);
                    log.push(e);
                    stop_handled.send_replace(true);
                    continue;
                }
                let result = forward.swap(node.as_ref()).await;
                // The poll loop must not swap (and re-time) a second time.
                pre_swapped.store(true, Ordering::SeqCst);
                let swap_took = seen.elapsed();
                let mut t = times.lock().map(|t| t.clone()).unwrap_or_default();
                t.stop_unix_nanos = unix_nanos(stop_at);
                match result {
                    Ok(acked) => {
                        t.route_swapped_unix_nanos = unix_nanos(acked);
                        t.stop_to_route_swap_nanos =
                            acked.duration_since(stop_at).map_or(0, |d| d.as_nanos() as u64);
                        tracing::info!(
                            reaction_us = t.stop_to_route_swap_nanos / 1000,
                            delivery_us = ev.delivery_latency().map_or(0, |d| d.as_micros()),
                            queued_us = ev.received_instant.elapsed().saturating_sub(swap_took).as_micros(),
                            swap_us = swap_took.as_micros(),
                            "STOP: VM routes now forward to the destination"
                        );
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "STOP: route swap failed; packets reach the paused source")
                    }
                }
                if let Ok(mut shared) = times.lock() {
                    *shared = t.clone();
                }
                let mut e =
                    Event::new(Phase::Cutover, "source stopped; VM routes forward to the destination");
                e.cutover = Some(t);
                log.push(e);
                stop_handled.send_replace(true);
            }
            "RESUME" if stopped => {
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

/// Re-sends what the stopped source VM left unread in its tap (see [`crate::net::tapdrain`]):
/// packets that arrived between STOP and the route swap. Returns how many were re-sent.
async fn recover_tap_queue(node: &Arc<NetnsHandle>, qemu_pid: u32, tap: &str) -> usize {
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

/// How close to the end of what is left the switchover happens even if that exceeds the
/// downtime limit: QEMU completes by itself once nothing is dirty (an idle guest at the end of
/// its first pass), so the switchover must come before that, within two polls.
const SWITCHOVER_HORIZON: Duration = Duration::from_millis(50);

/// Bytes left at which the switchover happens whatever the rate says: with its limit at 0 QEMU
/// ends the first pass by completing on its own (it never syncs the dirty bitmap below a zero
/// threshold), and zero pages go by faster than the measured rate predicts.
const SWITCHOVER_BYTES: u64 = 64 << 20;

/// Whether to switch over now: the rest of RAM fits the downtime limit or the two-poll horizon
/// at the measured rate, or is down to a quarter of the guest's RAM (at most
/// [`SWITCHOVER_BYTES`]). QEMU's own estimate is useless here, its limit being 0 until then.
fn converged(p: &super::events::RamProgress, limit_ms: u64) -> bool {
    if p.iteration < 1 {
        return false;
    }
    if p.total_bytes > 0 && p.remaining_bytes <= (p.total_bytes / 4).min(SWITCHOVER_BYTES) {
        return true;
    }
    if p.throughput_bytes_per_second == 0 {
        return false;
    }
    let remaining_ms = u128::from(p.remaining_bytes) * 1000 / u128::from(p.throughput_bytes_per_second);
    remaining_ms <= u128::from(limit_ms.max(SWITCHOVER_HORIZON.as_millis() as u64))
}

async fn set_downtime_limit(qmp: &QmpClient, limit: Duration) -> Result<(), EngineError> {
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    qmp.execute("migrate-set-parameters", Some(serde_json::json!({ "downtime-limit": ms }))).await?;
    Ok(())
}

/// Waits until the forward carried nothing for `idle`. Tunnel traffic is read from the tunnel
/// link's counters; route mode has no per-VM counter, so it never reports idle: the forward then
/// lives as long as the source sandbox (DESIGN.md decision 5 — a fixed hold breaks connections).
async fn forward_until_idle(node: &Arc<NetnsHandle>, forward: &SourceForward, idle: Duration) {
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
    fn convergence_needs_a_full_pass_and_a_rate() {
        use super::super::events::RamProgress;
        let p = |iteration, remaining_bytes, throughput_bytes_per_second| RamProgress {
            iteration,
            remaining_bytes,
            throughput_bytes_per_second,
            total_bytes: 1 << 30,
            ..RamProgress::default()
        };
        assert!(!converged(&p(0, 0, 100_000_000), 25), "not started");
        assert!(!converged(&p(1, 133_000_000, 100_000_000), 25), "most of the first pass left");
        assert!(!converged(&p(2, 300 << 20, 0), 25), "no rate measured yet, far from the end");
        assert!(converged(&p(1, 4_000_000, 100_000_000), 25), "40 ms left: inside the horizon");
        assert!(converged(&p(2, 2_000_000, 100_000_000), 25), "20 ms left at 100 MB/s");
        assert!(!converged(&p(5, 100 << 20, 1_000_000_000), 25), "105 ms left, above the byte cap");
        assert!(converged(&p(5, 100 << 20, 1_000_000_000), 200), "a larger limit");
        assert!(converged(&p(1, 60 << 20, 0), 25), "near the end of the pass, rate or not");
        assert!(!converged(&p(1, 300 << 20, 0), 25), "a quarter of 1 GiB is above the cap");
        let small = RamProgress {
            iteration: 1,
            remaining_bytes: 30 << 20,
            total_bytes: 128 << 20,
            ..RamProgress::default()
        };
        assert!(converged(&small, 25), "a quarter of a 128 MiB guest");
    }

    #[test]
    fn tx_counter_parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:   100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\nkmrs1234abcd: 0 0 0 0 0 0 0 0 5000 42 0 0 0 0 0 0\n";
        assert_eq!(parse_tx_packets(text, "kmrs1234abcd"), Some(42));
        assert_eq!(parse_tx_packets(text, "lo"), Some(2));
        assert_eq!(parse_tx_packets(text, "eth9"), None);
    }
}
