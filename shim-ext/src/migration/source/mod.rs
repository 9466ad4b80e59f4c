//! The source role: move a running sandbox's VM to a prepared destination, driving the
//! ownership protocol ([`super::protocol`]) as its coordinator.
//!
//! ```text
//!  PREPARING  discover QEMU features; sample the guest's dirty rate (QEMU 8.2+, iterating);
//!             pre-create the tunnel; record the VM routes (journal);
//!             the stream TLS credentials into QEMU (unless plain streams)
//!  STORAGE    (local disks) NBD stream per disk to QEMU (getfd) ─▶ blockdev-mirror ─▶ READY storage.rs
//!  RAM        migrate caps/params (return-path) ─▶ RAM stream fd ─▶ migrate fd:        ram.rs
//!             QEMU limit 1 ms (syncs each pass); the predicted pause fits the limit:     switchover.rs
//!             routes swapped ─▶ 2 ms ─▶ stop (STOP → route swap as fallback); a guest the
//!             sample shows idle: routes moved before the first sync, stop after it
//!             pre-switchover (local disks): complete mirrors, ctl storage-done ⇄ released
//!  CUTOVER    QEMU completed ─▶ vote `prepared` ─▶ COMMIT (journal, fsync) ─▶ `commit`  cutover.rs
//!             ─▶ `resumed`
//!  FORWARDING tap queue recovered; the forward carries stragglers                        forwarding.rs
//! ```
//! Before the commit every failure or cancel unwinds the cleanup stack: QEMU's migration is
//! cancelled and finished before the VM resumes, the routes go back, the destination is told
//! `abort`. After the commit nothing resumes the source VM.

mod cutover;
mod forwarding;
mod ram;
mod storage;
mod switchover;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;

pub use cutover::deliver_decision;
pub use forwarding::{forward_until_released, ForwardEnd};

use super::cancel::CommitGate;
use super::cleanup::Cleanup;
use super::ctl::{self, Ctl, CtlMsg, Heartbeat};
use super::error::{chain, EngineError};
use super::events::{CutoverTimes, Event, EventLog, Phase};
use super::failpoint;
use super::journal::{Entry, RouteRecord, Standing};
use super::network::{self, SourceForward};
use super::options::{MigrationOptions, StorageMode, TunnelMode};
use super::protocol::{Action, SourceInput, SourceState};
use super::qemu::{self, DiskInfo, EventBus, QemuFeatures};
use crate::dataplane::tls::{Endpoint, StreamCredentials};
use crate::dataplane::{self, relay, Secret, StreamKey};
use crate::net::{NetOps, NetnsHandle, TunnelSpec};
use crate::qmp::QmpClient;

/// Deadline of a data-stream connect + handshake.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The source QEMU's pid (its tap is drained after completion).
    pub qemu_pid: u32,
    /// The sandbox's tap: packets left in its queues at STOP are recovered after completion.
    pub tap_name: String,
    /// Destination RAM/ctl listener.
    pub ram_endpoint: SocketAddr,
    /// Destination NBD listener per drive id.
    pub nbd_endpoints: BTreeMap<String, SocketAddr>,
    /// Per-migration secret.
    pub secret: Secret,
    /// This QEMU's credentials for the encrypted streams (validated); `None`: plain streams.
    pub stream_tls: Option<StreamCredentials>,
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

/// What one source migration works with.
#[derive(Debug, Clone)]
pub struct SourceEnv {
    /// The node's namespace.
    pub node: Arc<NetnsHandle>,
    /// Progress events.
    pub log: EventLog,
    /// The undo stack (disarmed at the commit).
    pub cleanup: Cleanup,
    /// Orders cancels against the commit.
    pub gate: CommitGate,
    /// The durable record.
    pub journal: Entry,
    /// Heartbeats of the control stream.
    pub heartbeat: Heartbeat,
}

/// The protocol state of this side, moved only through [`SourceState::step`].
#[derive(Debug)]
struct Machine {
    state: SourceState,
}

impl Machine {
    fn step(&mut self, input: SourceInput) -> Result<Action, EngineError> {
        let (next, action) = self.state.step(input)?;
        tracing::debug!(from = self.state.as_str(), to = next.as_str(), input = input.as_str(), "protocol");
        self.state = next;
        Ok(action)
    }
}

/// How long a source that failed before its control stream was up tries to tell the destination.
const EARLY_ABORT_LIMIT: Duration = Duration::from_secs(10);

/// Runs the source role to its end: `Ok` once the VM is handed over (the forward then lives on
/// in the background, see [`forward_until_released`]). The caller unwinds the cleanup stack
/// when this returns an error (a disarmed stack after the commit undoes nothing).
///
/// # Errors
/// The first failure before the commit; [`EngineError::Cancelled`] when a cancel won the gate.
pub async fn run(req: SourceRequest, conn: QemuConn, env: SourceEnv) -> Result<Handover, EngineError> {
    let mut peer: Option<Ctl> = None;
    let result = drive(&req, &conn, &env, &mut peer).await;
    if let Err(e) = &result {
        if !env.gate.is_committed() {
            // Before the commit the source decides abort: the destination destroys its copy.
            match &peer {
                Some(ctl) => {
                    let _ = ctl.deliver(CtlMsg::Abort(chain(e)), Duration::from_secs(1)).await;
                }
                // Failed before the control stream was up: the destination, prepared and
                // waiting for the streams, is told over a control stream of its own.
                None => {
                    let abort = cutover::deliver_decision(
                        env.node.clone(),
                        req.ram_endpoint,
                        &req.secret,
                        &req.migration_id,
                        CtlMsg::Abort(chain(e)),
                        env.heartbeat,
                    );
                    match tokio::time::timeout(EARLY_ABORT_LIMIT, abort).await {
                        Ok(Ok(())) => tracing::info!("the destination was told to abort"),
                        Ok(Err(err)) => tracing::warn!(error = %chain(&err), "abort not delivered"),
                        Err(_) => tracing::warn!(limit = ?EARLY_ABORT_LIMIT, "abort not delivered in time"),
                    }
                }
            }
        }
    }
    result
}

/// The handed-over migration: what the forwarding phase needs.
#[derive(Debug)]
pub struct Handover {
    /// The cutover's numbers.
    pub times: CutoverTimes,
    /// The forward (removed when released).
    pub forward: SourceForward,
    /// Whether the destination confirmed its VM runs.
    pub confirmed: bool,
}

async fn drive(
    req: &SourceRequest,
    conn: &QemuConn,
    env: &SourceEnv,
    peer: &mut Option<Ctl>,
) -> Result<Handover, EngineError> {
    let started = Instant::now();
    let QemuConn { qmp, bus } = conn;
    let (node, log, cleanup, cancel) = (&env.node, &env.log, &env.cleanup, env.gate.token());
    let mut machine = Machine { state: SourceState::Preparing };

    // PREPARING
    log.push(Event::new(Phase::Preparing, "discovering QEMU and preparing the forward"));
    failpoint::point("source-preparing").await?;
    let features = QemuFeatures::discover(qmp).await?;
    let sampling = ram::sample_dirty_rate(qmp, &features, log).await;
    let mut options = req.options.clone();
    let disks: Vec<DiskInfo> = qemu::list_disks(qmp).await?.into_iter().filter(|d| !d.read_only).collect();
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
    let tunnel_spec = tunnel.map(|mode| TunnelSpec {
        name: source_tunnel_name(&req.migration_id),
        mode,
        local: req.source_node,
        remote: req.dest_node,
        ttl: 0,
    });
    // Route mode: the named interface, else the one of the node's route to the destination
    // node (the DaemonSet names none; a node's uplink differs from node to node).
    let uplink = match (&tunnel_spec, &req.node_interface) {
        (None, Some(name)) => Some(node.link(name).await?.id),
        (None, None) => node.path_to(req.dest_node).await?.map(|p| p.link.id),
        _ => None,
    };
    let forward =
        network::prepare_forward(node, tunnel_spec, &req.vm_addrs, &req.dest_nodes, uplink.as_ref(), cleanup)
            .await?;
    env.journal.record(Standing::Source(SourceState::Preparing), |r| {
        let s = r.source.get_or_insert_with(Default::default);
        s.original_routes = forward.original.iter().map(RouteRecord::of).collect();
        s.forward_routes = forward.swap.iter().map(RouteRecord::of).collect();
        s.forward_idle_ms = u64::try_from(req.options.tunnel_idle_timeout.as_millis()).unwrap_or(u64::MAX);
        s.tunnel = forward.tunnel.as_ref().map(|t| (t.index, t.name.clone()));
        s.ctl_endpoint = Some(req.ram_endpoint);
    })?;
    check_cancel(cancel)?;

    // Encrypted streams: the credentials the destination made, for the RAM and NBD streams.
    let tls = match &req.stream_tls {
        Some(c) => {
            let scratch = req.state_dir.join("tls");
            let creds = qemu::tls::add(qmp, &scratch, &req.migration_id, Endpoint::Client, c).await?;
            let (q, cr) = (qmp.clone(), creds.clone());
            cleanup.push("remove the stream TLS credentials", move || async move {
                qemu::tls::remove(&q, &cr).await;
                Ok::<(), String>(())
            });
            Some(creds)
        }
        None => None,
    };
    qemu::tls::use_for_migration(qmp, tls.as_ref()).await?;
    check_cancel(cancel)?;

    // Control stream first: its connect time is the RTT sample for --auto-downtime.
    let t0 = Instant::now();
    let ctl_stream = connect(node, req, req.ram_endpoint, ctl::STREAM).await?;
    let rtt = t0.elapsed();
    let ctl = peer.insert(Ctl::new(ctl_stream, env.heartbeat));

    // STORAGE
    let mut jobs = Vec::new();
    if !mirror_disks.is_empty() {
        machine.step(SourceInput::StorageStarted)?;
        jobs = storage::mirror(req, qmp, bus, &mirror_disks, &options, env, ctl).await?;
    }

    // RAM, up to QEMU's completion.
    machine.step(SourceInput::RamStarted)?;
    let ram = ram::Ram {
        req,
        qmp,
        bus,
        node,
        forward: &forward,
        env,
        features: &features,
        options: &options,
        sampling,
    };
    let done = ram.run(&jobs, rtt, ctl, &mut machine).await?;

    // CUTOVER: the vote, the commit, the confirmation.
    let (times, final_ram) = cutover::commit(req, qmp, env, ctl, &mut machine, done).await?;
    let confirmed = machine.state == SourceState::Confirmed;
    // Packets that reached the source between STOP and the route swap wait in its tap; they are
    // re-sent once the destination says its VM runs (before that, a paused QEMU drops them).
    let recovered =
        if confirmed { forwarding::recover_tap_queue(node, req.qemu_pid, &req.tap_name).await } else { 0 };
    let mut e = Event::new(
        Phase::Forwarding,
        format!(
            "VM runs on {}{}; {recovered} packet(s) recovered from the source tap; forwarding (total {:?})",
            req.dest_node,
            if confirmed { "" } else { " (unconfirmed)" },
            started.elapsed()
        ),
    );
    e.cutover = Some(times.clone());
    e.ram = final_ram;
    log.push(e);
    tracing::info!(total = ?started.elapsed(), confirmed, "handed over");
    Ok(Handover { times, forward, confirmed })
}

/// The name of the source's forward tunnel for a migration (also found by name after a restart).
pub fn source_tunnel_name(migration_id: &str) -> String {
    format!("kmrs{}", network::ifname_suffix(migration_id))
}

fn check_cancel(cancel: &super::cancel::CancelToken) -> Result<(), EngineError> {
    match cancel.reason() {
        Some(r) => Err(EngineError::Cancelled(r)),
        None => Ok(()),
    }
}

/// Opens the authenticated stream `stream` to `endpoint`.
async fn connect(
    node: &Arc<NetnsHandle>,
    req: &SourceRequest,
    endpoint: SocketAddr,
    stream: &str,
) -> Result<tokio::net::TcpStream, EngineError> {
    let key = StreamKey::new(&req.migration_id, stream)?;
    Ok(dial(node.clone(), endpoint, &req.secret, &key, CONNECT_TIMEOUT).await?)
}

/// Opens the authenticated stream `stream` to `endpoint` and hands it to QEMU under `fd_name`
/// (`getfd`): QEMU reads and writes the socket itself, no relay copies its bytes. Returns this
/// side's descriptor of the socket (closing it leaves QEMU's open).
async fn hand_stream_to_qemu(
    node: &Arc<NetnsHandle>,
    req: &SourceRequest,
    qmp: &QmpClient,
    endpoint: SocketAddr,
    stream: &str,
    fd_name: &str,
) -> Result<std::net::TcpStream, EngineError> {
    let tcp = connect(node, req, endpoint, stream).await?;
    let std = tcp.into_std().map_err(EngineError::io(format!("detach the {stream} stream")))?;
    qmp.getfd(fd_name, std::os::fd::AsFd::as_fd(&std)).await?;
    Ok(std)
}

/// An authenticated data stream to `addr`, its socket made in the node's network namespace
/// (the agent itself may run in a pod's).
///
/// # Errors
/// As [`dataplane::listener::connect`].
pub async fn dial(
    node: Arc<NetnsHandle>,
    addr: SocketAddr,
    secret: &Secret,
    key: &StreamKey,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, dataplane::Error> {
    let made =
        async move { crate::host::netns::connect_from(&node, addr).await.map_err(std::io::Error::other) };
    dataplane::listener::connect_with(made, addr, secret, key, timeout).await
}

/// Each connection QEMU opens on the local socket `path` is carried to the destination over its
/// own authenticated stream `stream`; the relay stops (and the socket goes) on cleanup.
fn spawn_stream_relay(
    node: &Arc<NetnsHandle>,
    req: &SourceRequest,
    endpoint: SocketAddr,
    stream: &str,
    path: &std::path::Path,
    cleanup: &Cleanup,
) -> Result<(), EngineError> {
    let key = StreamKey::new(&req.migration_id, stream)?;
    let listener = UnixListener::bind(path).map_err(EngineError::io(format!("bind {}", path.display())))?;
    let secret = req.secret.clone();
    let node = node.clone();
    let task = tokio::spawn(async move {
        while let Ok((unix, _)) = listener.accept().await {
            let (key, secret, node) = (key.clone(), secret.clone(), node.clone());
            tokio::spawn(async move {
                match dial(node, endpoint, &secret, &key, CONNECT_TIMEOUT).await {
                    Ok(tcp) => {
                        if let Err(e) = relay::relay(unix, tcp).await {
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

/// What the source's peer said while the source waited for something else: a cancel request
/// becomes a cancel, a failure report or anything out of step becomes an error.
fn peer_message(msg: CtlMsg, during: &'static str) -> EngineError {
    match msg {
        CtlMsg::CancelRequest(reason) => EngineError::Cancelled(format!("through the destination: {reason}")),
        CtlMsg::Failed(reason) => EngineError::DestinationFailed(reason),
        other => EngineError::PeerOutOfStep { during, got: other.to_string() },
    }
}

/// Undoes QEMU's side of a migration on the source before the commit: cancels the migration if
/// it is still going, waits until QEMU says it ended (a `cont` in `finish-migrate` is refused),
/// then resumes the VM if it is not running. Routes are put back by the caller right after.
///
/// # Errors
/// A QMP failure or a migration that does not end within `limit`.
pub async fn resume_before_commit(qmp: &QmpClient, limit: Duration) -> Result<(), EngineError> {
    use crate::qmp::MigrationStatus as M;
    let until = tokio::time::Instant::now() + limit;
    let mut cancelled = false;
    loop {
        let info = qmp.query_migrate().await?;
        match info.status {
            None | Some(M::Completed | M::Failed | M::Cancelled | M::None) => break,
            _ if !cancelled => {
                qemu::compute::cancel(qmp).await?;
                cancelled = true;
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= until {
            return Err(EngineError::Timeout {
                what: "for QEMU's migration to end before resuming",
                after: limit,
            });
        }
        // QEMU's cancel ends within a few of its own iterations; no event is guaranteed to reach
        // this connection once the caller's subscription is gone.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = qmp.query_status().await?;
    if !status.running {
        qmp.cont().await?;
    }
    Ok(())
}
