//! The destination role: create an incoming sandbox for a VM and receive it, as the
//! participant of the ownership protocol ([`super::protocol`]).
//!
//! ```text
//!  PREPARING  state dir ─▶ netns ─▶ veth/tap/tcfilter/plug/routes/neighbours/decap tunnel
//!             ─▶ empty disk images under <state>/disks (local storage) ─▶ QEMU from the
//!             source's rewritten command line with -S -incoming defer (it never starts the
//!             guest by itself) ─▶ QMP ─▶ NBD exports on a gate (QEMU accepts the disks'
//!             streams itself, from ports the source admits over ctl) ─▶ accept
//!             authenticated streams (ram: getfd + migrate-incoming fd:, ctl — reconnectable)
//!                                                                ── PrepareIncoming returns
//!  RECEIVING  the source pushes; ctl storage-done ─▶ NBD exports stopped      streams.rs
//!  LOADED     MIGRATION completed ─▶ journal Voted (fsync) ─▶ ctl `prepared`  receive.rs
//!  COMMITTED  ctl `commit` ─▶ `cont` ─▶ RESUME ─▶ plug released ─▶ announce-self ─▶ journal
//!             ─▶ ctl `resumed`
//! ```
//! Before the vote any failure or cancel unwinds the stack: the packets held for the VM taken
//! back, QEMU killed, exports, routes (the ones they replaced put back), neighbours, tunnel,
//! veth, netns, disks and state directory removed, then the held packets sent back towards the
//! source. After the vote only the source's decision moves this side; after the commit nothing
//! destroys it.

mod receive;
pub use receive::CONNECT_LIMIT;
mod streams;

pub use receive::{receive, DestControl};

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::cleanup::Cleanup;
use super::ctl::{self, Heartbeat};
use super::error::EngineError;
use super::events::{Event, EventLog, Phase};
use super::failpoint;
use super::journal::{DestRecord, Entry, RouteRecord, Standing};
use super::network::{self, IncomingNet, IncomingSpec};
use super::options::{MigrationOptions, StorageMode};
use super::protocol::DestState;
use super::qemu::{self, compute, storage, EventBus, NbdAddress, QemuFeatures, RamConfig};
use crate::dataplane::gate::Gate;
use crate::dataplane::tls::{CredentialPair, Endpoint, StreamCredentials};
use crate::dataplane::{DataListener, Secret};
use crate::net::{self, MacAddr, NetnsHandle, NetnsRoots, TunnelSpec};
use crate::qmp::{QmpClient, QmpConfig};
use crate::sandbox::cmdline::{IncomingRewrite, QemuCmdline};

/// How long QEMU has to open its QMP socket after being spawned.
const QMP_APPEAR_TIMEOUT: Duration = Duration::from_secs(20);
/// The monitor's name for the NBD gate's listening socket until `nbd-server-start` takes it.
const NBD_GATE_FD: &str = "kmr-nbd-gate";

/// A source disk the destination must provide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDisk {
    /// Drive id.
    pub drive_id: String,
    /// Top node name.
    pub node_name: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// Image format.
    pub format: String,
    /// Read-only disks need no copy.
    pub read_only: bool,
}

/// A validated PrepareIncoming.
#[derive(Debug, Clone)]
pub struct DestRequest {
    /// Migration id.
    pub migration_id: String,
    /// Secret.
    pub secret: Secret,
    /// The sandbox id (kept across the move).
    pub sandbox_id: String,
    /// The source's Kata VM directory (parent of its QMP socket); paths under it are moved.
    pub source_state_dir: PathBuf,
    /// The source's QEMU command line.
    pub argv: QemuCmdline,
    /// Pod interface name.
    pub pod_ifname: String,
    /// Tap name.
    pub tap_name: String,
    /// VM MAC.
    pub mac: MacAddr,
    /// MTU.
    pub mtu: u32,
    /// VM addresses.
    pub vm_addrs: Vec<IpAddr>,
    /// Source disks.
    pub disks: Vec<SourceDisk>,
    /// Options.
    pub options: MigrationOptions,
    /// Source node address.
    pub source_node: IpAddr,
}

/// What the node provides to an incoming migration.
#[derive(Debug, Clone)]
pub struct DestEnv {
    /// The node's namespace.
    pub node: Arc<NetnsHandle>,
    /// This node's address (tunnel and data endpoint).
    pub node_address: IpAddr,
    /// The shared data listener.
    pub listener: Arc<DataListener>,
    /// The QEMU binary to run.
    pub qemu_binary: PathBuf,
    /// Where incoming sandboxes keep their run state (sockets, logs, pid).
    pub incoming_root: PathBuf,
    /// Where incoming sandboxes keep their local disks: on the node's disk, under the agent's
    /// state directory (`<state>/disks/<sandbox>`), not on tmpfs.
    pub disks_root: PathBuf,
    /// Where incoming sandboxes' netns files are bind-mounted.
    pub netns_dir: PathBuf,
    /// Node-side veth MAC (the guest's gateway MAC).
    pub gateway_mac: Option<MacAddr>,
    /// The guests' IPv6 gateway.
    pub gateway6: Option<std::net::Ipv6Addr>,
}

/// The incoming sandbox while it receives.
#[derive(Debug)]
pub struct Incoming {
    /// Endpoints for the source.
    pub endpoints: (SocketAddr, BTreeMap<String, SocketAddr>),
    /// The source QEMU's stream credentials (`None`: plain streams).
    pub client_tls: Option<StreamCredentials>,
    /// This QEMU's stream credentials object, removed once the VM runs here.
    tls: Option<qemu::TlsCreds>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Netns file.
    pub netns: PathBuf,
    /// QEMU's pid.
    pub qemu_pid: u32,
    qmp: QmpClient,
    /// Keeps the event fan-out alive for `sub` and the stream tasks.
    _bus: EventBus,
    sub: qemu::Subscription,
    sandbox_ns: Arc<NetnsHandle>,
    net: IncomingNet,
    exited: watch::Receiver<Option<String>>,
    /// Messages of the control stream (whichever connection is current).
    ctl_in: tokio::sync::mpsc::UnboundedReceiver<streams::CtlEvent>,
    /// Sends on the current control connection.
    ctl_out: streams::CtlOut,
    started: Instant,
    tasks: Vec<tokio::task::AbortHandle>,
}

fn netns_roots(env: &DestEnv) -> NetnsRoots {
    NetnsRoots { dirs: vec![env.netns_dir.clone()], proc: None }
}

/// Creates the incoming sandbox and opens the data streams. Everything created is on `cleanup`.
///
/// # Errors
/// The first failure.
pub async fn prepare(
    req: &DestRequest,
    env: &DestEnv,
    log: &EventLog,
    cleanup: &Cleanup,
    heartbeat: &Heartbeat,
    journal: &Entry,
) -> Result<Incoming, EngineError> {
    let started = Instant::now();
    log.push(Event::new(Phase::Preparing, format!("creating incoming sandbox {}", req.sandbox_id)));
    let suffix = network::ifname_suffix(&req.migration_id);

    // Packets held here for the VM go back out when this copy is destroyed (a rollback after
    // the source stopped and moved its routes): the last step of the unwind, once this node's
    // routes to the VM are gone, so that they are routed to the source again.
    let held: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
    {
        let (node, held) = (env.node.clone(), held.clone());
        cleanup.push("send the packets held for the VM back into the network", move || async move {
            return_held_packets(&node, &held).await;
            Ok::<(), String>(())
        });
    }

    // State directory, root-only.
    let state_dir = env.incoming_root.join(&req.sandbox_id);
    if state_dir.exists() {
        return Err(EngineError::Precondition(format!(
            "sandbox {} already exists on this node ({})",
            req.sandbox_id,
            state_dir.display()
        )));
    }
    std::fs::create_dir_all(&state_dir)
        .map_err(EngineError::io(format!("create {}", state_dir.display())))?;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(EngineError::io("chmod state dir"))?;
    {
        let d = state_dir.clone();
        cleanup.push(format!("remove {}", d.display()), move || async move { std::fs::remove_dir_all(&d) });
    }

    // Network namespace and plumbing.
    std::fs::create_dir_all(&env.netns_dir)
        .map_err(EngineError::io(format!("create {}", env.netns_dir.display())))?;
    let netns = env.netns_dir.join(format!("kmr-{suffix}"));
    net::create_netns_in(&netns, &netns_roots(env))?;
    {
        let p = netns.clone();
        cleanup.push(format!("remove netns {}", p.display()), move || async move { net::remove_netns(&p) });
    }
    let sandbox_ns = Arc::new(NetnsHandle::open_in(&netns, &netns_roots(env))?);
    let decap = network::resolve_tunnel(
        env.node.as_ref(),
        req.options.tunnel_mode,
        &req.vm_addrs,
        env.node_address.is_ipv6(),
    )
    .await?
    .map(|mode| TunnelSpec {
        name: format!("kmrd{suffix}"),
        mode,
        local: env.node_address,
        remote: req.source_node,
        ttl: 0,
    });
    let multi_queue =
        req.argv.values("netdev").any(|v| v.contains("queues=") || v.contains("fds=") && v.contains(':'));
    let plug_limit = req.options.plug_limit.unwrap_or_else(|| default_plug_limit(&req.options));
    let spec = IncomingSpec {
        sandbox_netns: netns.clone(),
        host_veth: format!("kmr{suffix}"),
        pod_ifname: req.pod_ifname.clone(),
        tap_name: req.tap_name.clone(),
        tap_multi_queue: multi_queue,
        mac: req.mac,
        mtu: req.mtu,
        vm_addrs: req.vm_addrs.clone(),
        plug_limit,
        decap,
        gateway_mac: env.gateway_mac,
        gateway6: env.gateway6,
    };
    let net = network::build_incoming(&env.node, sandbox_ns.as_ref(), &spec, cleanup).await?;
    // The node answers ARP for the guest's IPv4 gateway by proxy, without the default random
    // delay of up to 0.8 s that would stall the first packets after the move.
    let veth = net.host_veth.name.clone();
    env.node
        .run(move || {
            for (key, value) in [
                (format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp"), "1"),
                (format!("/proc/sys/net/ipv4/neigh/{veth}/proxy_delay"), "0"),
            ] {
                std::fs::write(&key, value)?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await?
        .map_err(EngineError::io("set proxy ARP on the node-side veth"))?;
    if let Some(d) = &net.decap {
        // Decapsulated packets arrive on the tunnel from a source the node would not route
        // back through it: no reverse-path filtering on that device.
        let name = d.name.clone();
        env.node
            .run(move || std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0"))
            .await?
            .map_err(EngineError::io("disable rp_filter on the decap tunnel"))?;
    }

    // Disks: empty images of the source's size (local storage).
    let mut disk_paths = BTreeMap::new();
    let local_disks: Vec<&SourceDisk> = match req.options.storage {
        StorageMode::Shared => Vec::new(),
        StorageMode::Local => req.disks.iter().filter(|d| !d.read_only).collect(),
    };
    let disks_dir =
        if local_disks.is_empty() { PathBuf::new() } else { env.disks_root.join(&req.sandbox_id) };
    if !local_disks.is_empty() {
        let dir = disks_dir.clone();
        if dir.exists() {
            return Err(EngineError::Precondition(format!(
                "disks of sandbox {} already exist on this node ({}): an earlier incoming sandbox left them; remove it first",
                req.sandbox_id,
                dir.display()
            )));
        }
        create_private_dir(&dir)?;
        {
            let d = dir.clone();
            cleanup
                .push(format!("remove {}", d.display()), move || async move { std::fs::remove_dir_all(&d) });
        }
        for d in &local_disks {
            if d.format != "raw" {
                return Err(EngineError::Invalid(format!(
                    "drive {} is {}; local-storage migration supports raw images (use shared storage)",
                    d.drive_id, d.format
                )));
            }
            let path = dir.join(format!("{}.img", storage::qemu_id("", &d.drive_id)));
            let f = std::fs::File::create(&path)
                .map_err(EngineError::io(format!("create {}", path.display())))?;
            f.set_len(d.size_bytes).map_err(EngineError::io(format!("size {}", path.display())))?;
            disk_paths.insert(d.drive_id.clone(), path.clone());
            if !d.node_name.is_empty() {
                disk_paths.insert(d.node_name.clone(), path);
            }
        }
    }

    // QEMU from the source's command line.
    let rewritten = IncomingRewrite {
        qemu_binary: env.qemu_binary.clone(),
        state_dir: state_dir.clone(),
        source_state_dirs: vec![req.source_state_dir.clone()],
        tap_name: req.tap_name.clone(),
        disk_paths,
        allowed_roots: crate::sandbox::allowlist::default_allowed_roots(),
    }
    .apply(&req.argv)?;
    // `-S`: the incoming VM never starts by itself, whatever state the source was in when it
    // completed; it runs only on this side's `cont`, after the source's commit.
    let mut argv = rewritten.argv.clone();
    if !argv.iter().any(|a| a == "-S") {
        argv.push("-S".into());
    }
    let vm_cgroup = crate::host::cgroup::vm_cgroup_name(&req.sandbox_id, &req.migration_id);
    let (qemu_pid, exited) =
        spawn_qemu(&sandbox_ns, &argv, &state_dir.join("qemu.log"), &vm_cgroup, cleanup).await?;
    {
        // Runs before QEMU is stopped: the held packets are in its tap (or the plug before it).
        let (ns, net, tap, held) = (sandbox_ns.clone(), net.clone(), req.tap_name.clone(), held.clone());
        cleanup.push("take back the packets held for the VM", move || async move {
            take_held_packets(&ns, &net, qemu_pid, &tap, &held).await;
            Ok::<(), String>(())
        });
    }
    journal.record(Standing::Destination(DestState::Preparing), |r| {
        r.destination = Some(DestRecord {
            state_dir: state_dir.clone(),
            netns: netns.clone(),
            qemu_pid,
            decap_tunnel: net.decap.as_ref().map(|d| d.name.clone()),
            host_veth: net.host_veth.name.clone(),
            tap: req.tap_name.clone(),
            plugged: net.plugged,
            vm_addrs: req.vm_addrs.clone(),
            replaced_routes: net.replaced.iter().map(RouteRecord::of).collect(),
            disks_dir: disks_dir.clone(),
        });
    })?;
    failpoint::point("dest-preparing").await?;
    let (qmp, events) = wait_for_qmp(&rewritten.qmp_socket, &exited).await?;
    let bus = EventBus::spawn(events);
    let sub = bus.subscribe();
    let features = QemuFeatures::discover(&qmp).await?;
    let ram = RamConfig::from_options(&req.options);
    compute::configure_incoming(&qmp, &features, &ram).await?;
    // Encrypted streams: this side makes the migration's credentials and serves with them; the
    // client side goes back to the caller for the source.
    let (tls, client_tls) = if req.options.plain_streams {
        (None, None)
    } else {
        let pair = CredentialPair::generate(&req.migration_id)?;
        let creds =
            qemu::tls::add(&qmp, &state_dir.join("tls"), &req.migration_id, Endpoint::Server, &pair.server)
                .await?;
        qemu::tls::use_for_migration(&qmp, Some(&creds)).await?;
        (Some(creds), Some(pair.client))
    };

    // Local disks: NBD exports behind a gate.
    let dest_disks = qemu::list_disks(&qmp).await?;
    let mut nbd = None;
    let mut gate = None;
    if !local_disks.is_empty() {
        let to_export: Vec<qemu::DiskInfo> = dest_disks
            .iter()
            .filter(|d| local_disks.iter().any(|s| s.drive_id == d.drive_id))
            .cloned()
            .collect();
        if to_export.len() != local_disks.len() {
            return Err(EngineError::Precondition(
                "the destination QEMU does not have every source drive".into(),
            ));
        }
        // QEMU's NBD server accepts on the node's address itself, behind a gate only the
        // source's admitted sockets pass (one per disk): no relay on the disks' path.
        let socket = crate::host::netns::tcp_socket_in(&env.node, SocketAddr::new(env.node_address, 0))
            .await
            .map_err(|e| EngineError::io("create the NBD gate")(std::io::Error::other(e)))?;
        let g = Arc::new(Gate::open(socket, env.node_address, local_disks.len())?);
        qmp.getfd(NBD_GATE_FD, g.as_fd()).await?;
        let exports =
            storage::export_disks(&qmp, &NbdAddress::Fd(NBD_GATE_FD.into()), &to_export, tls.as_ref()).await;
        if exports.is_err() {
            // A server that never started left the descriptor with the monitor.
            let _ = qmp.closefd(NBD_GATE_FD).await;
        }
        let exports = exports?;
        {
            let (q, b, e) = (qmp.clone(), bus.clone(), exports.clone());
            cleanup.push("stop NBD exports", move || async move {
                storage::stop_exports(&q, &b, &e, Duration::from_secs(10)).await
            });
        }
        nbd = Some(exports);
        gate = Some(g);
    }
    let expected = env.listener.expect(&req.migration_id, req.secret.clone(), &[ctl::STREAM, "ram"])?;
    let mut tasks = Vec::new();
    let (ctl_tx, ctl_in) = tokio::sync::mpsc::unbounded_channel();
    let ctl_out = streams::CtlOut::default();
    let data_addr = SocketAddr::new(env.node_address, env.listener.local_addr().port());
    tasks.push(
        tokio::spawn(streams::serve(
            expected,
            streams::Streams {
                qmp: qmp.clone(),
                bus: bus.clone(),
                nbd: nbd.clone(),
                state_dir: state_dir.clone(),
                multifd: ram.multifd_channels.is_some(),
                gate: gate.clone(),
                ctl_in: ctl_tx,
                ctl_out: ctl_out.clone(),
                heartbeat: *heartbeat,
            },
        ))
        .abort_handle(),
    );
    let nbd_endpoints = match &gate {
        Some(g) => local_disks.iter().map(|d| (d.drive_id.clone(), g.local_addr())).collect(),
        None => BTreeMap::new(),
    };
    drop(gate);
    let aborts = tasks.clone();
    cleanup.push("stop stream acceptors", move || async move {
        for t in aborts {
            t.abort();
        }
        Ok::<(), String>(())
    });
    Ok(Incoming {
        endpoints: (data_addr, nbd_endpoints),
        client_tls,
        tls,
        state_dir,
        netns,
        qemu_pid,
        qmp,
        _bus: bus,
        sub,
        sandbox_ns,
        net,
        exited,
        ctl_in,
        ctl_out,
        started,
        tasks,
    })
}

/// How long the return of held packets waits for the source to take its routes back (it does
/// so right after telling this side to abort).
const RETURN_GRACE: Duration = Duration::from_millis(300);

/// Moves the packets held for a VM this side will never run out of its tap: the plug (if any)
/// released into the tap, then every queued frame read from the paused QEMU's tap descriptors.
/// Best effort: a QEMU already gone took its queue with it.
async fn take_held_packets(
    ns: &NetnsHandle,
    net: &IncomingNet,
    qemu_pid: u32,
    tap: &str,
    held: &std::sync::Mutex<Vec<Vec<u8>>>,
) {
    if net.plugged {
        if let Err(e) = network::release_plug(ns, net).await {
            tracing::debug!(error = %e, "cannot release the plug into the tap");
        }
    }
    // The tap's ring holds a bounded number of frames; the plug refills it as it empties.
    for _ in 0..64 {
        let tap = tap.to_owned();
        match tokio::task::spawn_blocking(move || net::tapdrain::drain_process_tap(qemu_pid, &tap)).await {
            Ok(Ok(d)) if !d.packets.is_empty() => {
                if let Ok(mut h) = held.lock() {
                    h.extend(d.packets);
                }
            }
            Ok(Ok(_)) => break,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the incoming QEMU's tap");
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "tap drain task failed");
                break;
            }
        }
    }
}

/// Sends the packets [`take_held_packets`] took back out from the node, where the VM's address
/// routes to the source again.
async fn return_held_packets(node: &Arc<NetnsHandle>, held: &std::sync::Mutex<Vec<Vec<u8>>>) {
    let packets = held.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
    if packets.is_empty() {
        return;
    }
    tokio::time::sleep(RETURN_GRACE).await;
    let count = packets.len();
    match node.run(move || net::tapdrain::reinject(&packets)).await {
        Ok(Ok(sent)) => {
            tracing::info!(held = count, sent, "packets held for the VM sent back towards the source")
        }
        Ok(Err(e)) => tracing::warn!(held = count, error = %e, "cannot send the held packets back"),
        Err(e) => tracing::warn!(held = count, error = %e, "cannot send the held packets back"),
    }
}

/// Creates `dir` and any missing parent root-only (0700); an existing one keeps its mode.
fn create_private_dir(dir: &Path) -> Result<(), EngineError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(EngineError::io(format!("create {}", dir.display())))
}

/// The plug limit when none is given: a 50 000 pps stream of full frames through a blackout of
/// ten downtime limits (at least 2 s), doubled — capped by the net layer's maximum.
fn default_plug_limit(o: &MigrationOptions) -> u32 {
    let blackout = (o.downtime_limit * 10).max(Duration::from_secs(2));
    net::plug_limit_bytes(50_000, 1514, blackout, 2.0)
}

async fn spawn_qemu(
    ns: &NetnsHandle,
    argv: &[String],
    log_path: &Path,
    cgroup_name: &str,
    cleanup: &Cleanup,
) -> Result<(u32, watch::Receiver<Option<String>>), EngineError> {
    let log =
        std::fs::File::create(log_path).map_err(EngineError::io(format!("create {}", log_path.display())))?;
    let err = log.try_clone().map_err(EngineError::io("dup log"))?;
    let (program, args) =
        argv.split_first().ok_or_else(|| EngineError::Invalid("empty QEMU command line".into()))?;
    let (program, args) = (program.clone(), args.to_vec());
    // A cgroup of its own, outside the agent's container, so that the VM outlives the agent
    // (host::placement). Registered first so that it is removed after QEMU stopped.
    let placement = crate::host::placement::place(cgroup_name.to_owned()).await.map_err(|e| {
        EngineError::io("place the destination QEMU in a cgroup of its own")(std::io::Error::other(e))
    })?;
    if let Some(p) = &placement {
        let leaves = p.leaves().to_vec();
        cleanup.push(format!("remove the VM cgroup {cgroup_name}"), move || async move {
            tokio::task::spawn_blocking(move || crate::host::placement::remove_leaves(&leaves))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| crate::migration::error::chain(&e))
        });
    }
    // Spawned from the namespace thread: the child inherits its network namespace.
    let mut child = ns
        .run(move || {
            let mut cmd = Command::new(program);
            cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
            if let Some(p) = &placement {
                p.apply(&mut cmd);
            }
            cmd.spawn()
        })
        .await?
        .map_err(EngineError::io("spawn the destination QEMU"))?;
    let pid = child.id();
    let (tx, rx) = watch::channel(None);
    tokio::task::spawn_blocking(move || {
        let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let _ = tx.send(Some(status));
    });
    let mut exited = rx.clone();
    cleanup.push(format!("stop destination QEMU (pid {pid})"), move || async move {
        kill_and_wait(pid, &mut exited).await
    });
    Ok((pid, rx))
}

/// SIGTERM, then SIGKILL after 5 s; waits for the exit.
async fn kill_and_wait(pid: u32, exited: &mut watch::Receiver<Option<String>>) -> Result<(), String> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid_t = Pid::from_raw(i32::try_from(pid).map_err(|e| e.to_string())?);
    if exited.borrow().is_some() {
        return Ok(());
    }
    let _ = kill(pid_t, Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(5), exited.wait_for(Option::is_some)).await.is_err() {
        let _ = kill(pid_t, Signal::SIGKILL);
        tokio::time::timeout(Duration::from_secs(5), exited.wait_for(Option::is_some))
            .await
            .map_err(|_| format!("QEMU pid {pid} did not exit"))?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn wait_for_qmp(
    socket: &Path,
    exited: &watch::Receiver<Option<String>>,
) -> Result<(QmpClient, crate::qmp::EventReceiver), EngineError> {
    let until = Instant::now() + QMP_APPEAR_TIMEOUT;
    loop {
        if let Some(status) = exited.borrow().clone() {
            return Err(EngineError::QemuExited(status));
        }
        match QmpClient::connect(socket, &QmpConfig::default()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < until => {
                tracing::trace!(error = %e, "QMP socket not ready yet");
                // QEMU creates the socket during start-up; there is no event to wait on.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(EngineError::Qmp(e)),
        }
    }
}
