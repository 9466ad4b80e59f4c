//! One node's engine: the sandboxes it can see, the migrations it takes part in (either role),
//! and the wire-level validation of requests before anything touches QMP or netlink.
//!
//! The node agent and the per-sandbox extension both run a [`Node`]; the extension's is scoped
//! to its one sandbox.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use katamaran_protos::protobuf::{EnumOrUnknown, MessageField};
use katamaran_protos::v1 as pb;
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::convert::{event_to_proto, options_from_proto, phase_to_proto, role_to_proto, unix_nanos};
use crate::dataplane::{DataListener, Secret};
use crate::migration::cancel::{CancelToken, CommitGate};
use crate::migration::cleanup::Cleanup;
use crate::migration::ctl::{CtlMsg, Heartbeat};
use crate::migration::dest::{self, DestControl, DestEnv, DestRequest, SourceDisk};
use crate::migration::error::{chain, EngineError};
use crate::migration::events::{Event, EventLog, Outcome, Phase, Role, Watcher};
use crate::migration::journal::{self, Entry, Journal, SourceRecord, Standing};
use crate::migration::protocol::{DestState, SourceState};
use crate::migration::qemu::{self, EventBus};
use crate::migration::source::{self, QemuConn, SourceEnv, SourceRequest};
use crate::net::{validate_ifname, MacAddr, NetOps, NetnsHandle, NetnsRoots};
use crate::qmp::{QmpClient, QmpConfig, RunState};
use crate::sandbox::{self, BundleInfo, NodeLayout, QemuCmdline};

/// How long a supervisor keeps trying to tell a destination the abort its panicked task owed it.
const DECISION_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where Kata, containerd and katamaran keep their files.
    pub layout: NodeLayout,
    /// This node's addresses, at most one per family; the first is the tunnel endpoint and data
    /// listener.
    pub node_addresses: Vec<IpAddr>,
    /// The node's interface towards other nodes (route mode).
    pub node_interface: Option<String>,
    /// QEMU binary for incoming VMs.
    pub qemu_binary: PathBuf,
    /// Port of the data listener (0 picks one).
    pub data_port: u16,
    /// Directory for incoming sandboxes' netns files.
    pub netns_dir: PathBuf,
    /// The pod interface name in sandboxes (Kata: `eth0`).
    pub pod_ifname: String,
    /// The tap name in sandboxes (Kata: `tap0_kata`).
    pub tap_name: String,
    /// Serve only this sandbox (the per-sandbox extension).
    pub only_sandbox: Option<String>,
    /// MAC of the node-side veth of incoming sandboxes (calico: `ee:ee:ee:ee:ee:ee`).
    pub gateway_mac: Option<MacAddr>,
    /// IPv6 gateway of guests (calico-style: `fe80::1`).
    pub gateway6: Option<std::net::Ipv6Addr>,
    /// The node's network namespace when the process runs in another one (a pod that is not
    /// hostNetwork): `/proc/1/ns/net` with hostPID. Node work — tunnels, routes, neighbours, the
    /// data listener, incoming sandboxes — happens there. `None`: the process's own.
    pub host_netns: Option<PathBuf>,
}

impl NodeConfig {
    /// Defaults for a node rooted at `layout`.
    pub fn new(layout: NodeLayout) -> Self {
        Self {
            netns_dir: layout.katamaran_run.join("netns"),
            layout,
            node_addresses: Vec::new(),
            node_interface: None,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            data_port: 0,
            pod_ifname: "eth0".into(),
            tap_name: "tap0_kata".into(),
            only_sandbox: None,
            gateway_mac: "ee:ee:ee:ee:ee:ee".parse().ok(),
            gateway6: "fe80::1".parse().ok(),
            host_netns: None,
        }
    }
}

#[derive(Debug)]
struct Record {
    sandbox_id: String,
    role: Role,
    peer: IpAddr,
    started: SystemTime,
    log: EventLog,
    /// Orders cancels against the commit (the source's; a destination's cancel before its
    /// receive started fires it too).
    gate: CommitGate,
    /// The running destination, once it receives.
    dest: Mutex<Option<DestControl>>,
}

/// Where a sandbox received on this node lives: QMP socket, netns, QEMU pid.
type IncomingSandbox = (PathBuf, PathBuf, u32);

/// A node's engine.
#[derive(Debug)]
pub struct Node {
    cfg: NodeConfig,
    node_ns: Arc<NetnsHandle>,
    listener: OnceCell<Arc<DataListener>>,
    migrations: Arc<Mutex<BTreeMap<String, Arc<Record>>>>,
    /// Active forwards of completed source migrations.
    forwards: Arc<Mutex<BTreeMap<String, ForwardHandle>>>,
    /// Sandboxes received here.
    incoming: Arc<Mutex<BTreeMap<String, IncomingSandbox>>>,
    /// QMP connections held by running source migrations (the socket serves one client).
    live: Arc<Mutex<BTreeMap<String, QmpClient>>>,
    /// The migrations' durable records.
    journal: Arc<Journal>,
    /// Heartbeats of the control streams.
    heartbeat: Heartbeat,
    /// What the migrations started or received by this process did.
    metrics: Arc<crate::metrics::Metrics>,
    /// Where the source's migrations are told as Kubernetes Events, when the agent has a client.
    events: std::sync::OnceLock<Arc<crate::kube_events::EventReporter>>,
}

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::Invalid(msg.into())
}

impl Node {
    /// Starts a node engine working in the network namespace `cfg.host_netns` (checked to be
    /// one), or the calling process's.
    ///
    /// # Errors
    /// When `host_netns` is not a network namespace or the namespace thread cannot start.
    pub fn new(cfg: NodeConfig) -> Result<Self, EngineError> {
        // A sandbox extension keeps its journals apart: the node agent's recovery must never
        // touch a migration that a live extension drives.
        let dir = match &cfg.only_sandbox {
            Some(id) => cfg.layout.journal_dir().join("sandboxes").join(id),
            None => cfg.layout.journal_dir(),
        };
        let journal = Arc::new(Journal::open(&dir)?);
        let node_ns = match &cfg.host_netns {
            Some(path) => {
                crate::host::netns::check_net_namespace(path).map_err(|e| EngineError::Io {
                    context: "the host network namespace is unusable".into(),
                    source: std::io::Error::other(e),
                })?;
                NetnsHandle::open_in(path, &NetnsRoots::default())?
            }
            None => NetnsHandle::current()?,
        };
        Ok(Self {
            journal,
            heartbeat: Heartbeat::default(),
            cfg,
            node_ns: Arc::new(node_ns),
            listener: OnceCell::new(),
            migrations: Arc::default(),
            forwards: Arc::default(),
            incoming: Arc::default(),
            live: Arc::default(),
            metrics: Arc::default(),
            events: std::sync::OnceLock::new(),
        })
    }

    /// Records Kubernetes Events on the pods this node moves (set once, before serving).
    pub fn report_events(&self, reporter: crate::kube_events::EventReporter) {
        if self.events.set(Arc::new(reporter)).is_err() {
            tracing::warn!("an event reporter was already set");
        }
    }

    /// Whether the engine can work: its network namespace thread answers and the data listener,
    /// once bound, still accepts. `Err` says what is wrong.
    ///
    /// # Errors
    /// A sentence naming the part that does not work.
    pub async fn ready(&self) -> Result<(), String> {
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.node_ns.run(|| ())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("the node's network namespace thread: {e}")),
            Err(_) => return Err("the node's network namespace thread does not answer".into()),
        }
        if self.listener.get().is_some_and(|l| !l.is_running()) {
            return Err("the data listener stopped accepting".into());
        }
        Ok(())
    }

    /// The Prometheus metrics ([`crate::metrics`]) with the node's gauges as they are now.
    pub fn render_metrics(&self) -> String {
        let len = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let gauges = crate::metrics::Gauges {
            migrations_running: self
                .migrations
                .lock()
                .map_or(0, |m| len(m.values().filter(|r| r.log.phase() < Phase::Forwarding).count())),
            forwards_active: self.forwards.lock().map_or(0, |f| len(f.len())),
            incoming_sandboxes: self.incoming.lock().map_or(0, |i| len(i.len())),
            data_listener_dropped: self.listener.get().map_or(0, |l| l.dropped()),
        };
        self.metrics.render(&gauges)
    }

    /// Finishes or rolls back what a previous agent left unfinished (see [`crate::recovery`])
    /// and lists every journaled migration. Call once, before serving.
    pub async fn recover(&self) {
        for r in crate::recovery::recover(&self.journal, &self.node_ns, self.heartbeat).await {
            let rec = &r.record;
            let (role, phase) = match rec.standing {
                Standing::Source(s) => (
                    Role::Source,
                    match s {
                        SourceState::Finished => Phase::Completed,
                        SourceState::RolledBack => Phase::Failed,
                        SourceState::HandedOver | SourceState::Confirmed => Phase::Forwarding,
                        _ => Phase::Failed,
                    },
                ),
                Standing::Destination(d) => (
                    Role::Destination,
                    match d {
                        DestState::Running | DestState::Committed => Phase::Completed,
                        DestState::RolledBack => Phase::Failed,
                        _ => Phase::Cutover,
                    },
                ),
            };
            let mut e = Event::new(phase, r.outcome.clone());
            if phase == Phase::Failed {
                e.outcome = Some(Outcome {
                    error: Some((EngineError::RolledBackAfterRestart.kind(), r.outcome.clone())),
                    total_ms: 0,
                    downtime_ms: 0,
                    plug_dropped_packets: 0,
                });
            }
            let record = Arc::new(Record {
                sandbox_id: rec.sandbox_id.clone(),
                role,
                peer: rec.peer,
                started: SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(rec.started_unix_nanos),
                log: EventLog::default(),
                gate: CommitGate::default(),
                dest: Mutex::new(None),
            });
            if rec.standing.owner() == crate::migration::protocol::Owner::Destination {
                let _ = record.gate.commit(|| Ok::<(), ()>(()));
            }
            record.log.push(e);
            if let (Some(d), Standing::Destination(DestState::Running | DestState::Committed)) =
                (&rec.destination, rec.standing)
            {
                if let Ok(mut inc) = self.incoming.lock() {
                    inc.insert(
                        rec.sandbox_id.clone(),
                        (d.state_dir.join("qmp.sock"), d.netns.clone(), d.qemu_pid),
                    );
                }
            }
            if let Ok(mut m) = self.migrations.lock() {
                m.insert(rec.migration_id.clone(), record.clone());
            }
            if let (Standing::Source(SourceState::HandedOver | SourceState::Confirmed), Some(d)) =
                (rec.standing, &rec.source)
            {
                self.readopt_forward(rec, d, &record);
            }
            if rec.standing == Standing::Source(SourceState::Confirmed) {
                // The VM runs on the destination: an incoming sandbox it left here is a husk
                // (a restart may have come between the confirmation and its removal).
                retire_incoming(&self.journal, &rec.sandbox_id, &self.node_ns, rec.started_unix_nanos).await;
            }
            if rec.standing == Standing::Destination(DestState::Voted) {
                // In doubt: the source re-delivers its decision; wait for it on the listener.
                match self.data_listener().await {
                    Ok(listener) => {
                        let (rec, journal, node, hb) =
                            (rec.clone(), self.journal.clone(), self.node_ns.clone(), self.heartbeat);
                        let incoming = self.incoming.clone();
                        tokio::spawn(async move {
                            let outcome =
                                crate::recovery::await_decision(rec.clone(), &listener, &journal, &node, hb)
                                    .await;
                            if let Err(e) = &outcome {
                                tracing::error!(error = %chain(e), "in doubt: waiting for the decision failed");
                            }
                            let (phase, msg) = match &outcome {
                                Ok(m) if m.contains("resumed") => (Phase::Completed, m.clone()),
                                Ok(m) => (Phase::Cancelled, m.clone()),
                                Err(e) => (Phase::Failed, chain(e)),
                            };
                            if phase == Phase::Completed {
                                if let (Some(d), Ok(mut inc)) = (&rec.destination, incoming.lock()) {
                                    inc.insert(
                                        rec.sandbox_id.clone(),
                                        (d.state_dir.join("qmp.sock"), d.netns.clone(), d.qemu_pid),
                                    );
                                }
                            }
                            record.log.push(Event::new(phase, msg));
                        });
                    }
                    Err(e) => {
                        tracing::error!(error = %chain(&e), "in doubt but the data listener cannot start")
                    }
                }
            }
        }
        // The sources of the VMs received here ask this node's data listener whether those VMs
        // still run (their forwards end when not): it serves from the start, not only once the
        // next migration needs it.
        let received = self.journal.load_all().is_ok_and(|all| {
            all.iter().any(|r| crate::migration::vm_status::status_of(r, |_, _| true).is_some())
        });
        if received && self.cfg.only_sandbox.is_none() {
            if let Err(e) = self.data_listener().await {
                tracing::warn!(error = %chain(&e), "the data listener cannot start: sources cannot ask about their VMs");
            }
        }
    }

    /// Watches again the forward a predecessor left for a migration past its commit: it ends
    /// as it would have (released, taken over, idle), then the record says Finished.
    fn readopt_forward(&self, rec: &journal::Record, d: &SourceRecord, record: &Arc<Record>) {
        if d.forward_routes.is_empty() {
            return;
        }
        let forward = crate::migration::network::SourceForward {
            swap: d.forward_routes.iter().map(journal::RouteRecord::to_spec).collect(),
            original: d.original_routes.iter().map(journal::RouteRecord::to_spec).collect(),
            tunnel: d
                .tunnel
                .as_ref()
                .map(|(index, name)| crate::net::LinkId { index: *index, name: name.clone() }),
        };
        let secret = journal::from_hex(&rec.secret_hex).and_then(|b| Secret::new(b).ok());
        let watch = ForwardWatch {
            migration_id: rec.migration_id.clone(),
            sandbox_id: rec.sandbox_id.clone(),
            migrations: self.migrations.clone(),
            forwards: self.forwards.clone(),
            ask: d.ctl_endpoint.zip(secret),
            journal: self.journal.clone(),
            started_unix_nanos: rec.started_unix_nanos,
        };
        let idle = std::time::Duration::from_millis(d.forward_idle_ms);
        let (node, journal, mut rec, record) =
            (self.node_ns.clone(), self.journal.clone(), rec.clone(), record.clone());
        tracing::info!(id = %rec.migration_id, "forward re-adopted after a restart");
        tokio::spawn(async move {
            let end = watch.run(node, forward, idle).await;
            rec.standing = Standing::Source(SourceState::Finished);
            rec.message = format!("completed; the forward ended: {}", end.as_str());
            if let Err(e) = journal.write(&rec) {
                tracing::warn!(error = %chain(&e), "cannot record the forward's end");
            }
            record.log.push(Event::new(Phase::Completed, rec.message.clone()));
        });
    }

    /// Ends the forward a completed source migration keeps on this node (ReleaseForward), once
    /// the caller knows the cluster routes the VM's address to its new node. Returns once the
    /// forward's routes and tunnel are removed.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] for an unknown migration; [`EngineError::Precondition`] when it
    /// has no active forward here (not a source, not completed yet, or already ended).
    pub async fn release_forward(&self, id: &str) -> Result<(), EngineError> {
        let handle = self.forwards.lock().ok().and_then(|f| f.get(id).cloned());
        let Some(mut handle) = handle else {
            let phase = self.migrations.lock().ok().and_then(|m| m.get(id).map(|r| (r.role, r.log.phase())));
            return Err(match phase {
                Some((role, phase)) => EngineError::Precondition(format!(
                    "migration {id} has no active forward on this node ({}, phase {})",
                    if role == Role::Source { "source" } else { "destination: forwards are the source's" },
                    phase.as_str()
                )),
                None => EngineError::NotFound(format!("migration {id}")),
            });
        };
        handle.release.cancel("released");
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
        // A dropped sender means the forward's task is gone: ended too.
        tokio::time::timeout(LIMIT, handle.ended.wait_for(|e| *e))
            .await
            .map_err(|_| EngineError::Timeout { what: "for the forward's removal", after: LIMIT })?
            .ok();
        Ok(())
    }

    /// Stops a sandbox this node received by migration and removes everything made for it: its
    /// QEMU (`quit`, then SIGKILL), cgroup, netns (veth, tap, routes and neighbours go with it),
    /// decap tunnel, disks and directories. Returns what was removed.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] for a malformed id; [`EngineError::Precondition`] while a
    /// migration uses the sandbox; [`EngineError::NotFound`] when this node received no running
    /// sandbox of that id.
    pub async fn remove_incoming(&self, sandbox_id: &str) -> Result<String, EngineError> {
        sandbox::validate_sandbox_id(sandbox_id).map_err(|e| invalid(e.to_string()))?;
        if let Ok(m) = self.migrations.lock() {
            let busy = m.iter().find(|(_, r)| {
                let p = r.log.phase();
                r.sandbox_id == sandbox_id && !p.is_terminal() && p < Phase::Forwarding
            });
            if let Some((id, r)) = busy {
                return Err(EngineError::Precondition(format!(
                    "migration {id} uses sandbox {sandbox_id} (phase {}): cancel it or wait for its end",
                    r.log.phase().as_str()
                )));
            }
        }
        let record = self.journal.load_all()?.into_iter().rev().find(|r| {
            r.sandbox_id == sandbox_id
                && r.destination.is_some()
                && matches!(r.standing, Standing::Destination(DestState::Running | DestState::Committed))
        });
        let Some(mut record) = record else {
            return Err(EngineError::NotFound(format!(
                "no sandbox {sandbox_id} received by migration on this node"
            )));
        };
        let Some(mut details) = record.destination.clone() else {
            return Err(EngineError::NotFound(format!("sandbox {sandbox_id}")));
        };
        // A clean stop first: QEMU flushes and exits; the rollback kills whatever is left.
        match QmpClient::connect(&details.state_dir.join("qmp.sock"), &QmpConfig::default()).await {
            Ok((qmp, _events)) => {
                if let Err(e) = qmp.execute("quit", None).await {
                    tracing::debug!(error = %e, "quit: QEMU closed the connection first");
                }
                if details.qemu_pid > 0 {
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        crate::pidfd::wait_exit(details.qemu_pid),
                    )
                    .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach the incoming QEMU; it is killed"),
        }
        // The VM stops here for good: what its routes once replaced is history.
        details.replaced_routes.clear();
        crate::recovery::roll_back_destination(&record, &details, &self.node_ns).await?;
        if let Ok(mut m) = self.incoming.lock() {
            m.remove(sandbox_id);
        }
        let what = format!(
            "sandbox {sandbox_id} removed: QEMU pid {}, {}, {}{}",
            details.qemu_pid,
            details.netns.display(),
            details.state_dir.display(),
            if details.disks_dir.as_os_str().is_empty() {
                String::new()
            } else {
                format!(", {}", details.disks_dir.display())
            }
        );
        record.destination = None;
        record.message = what.clone();
        // The source's forward (if it still runs) learns it from this: the VM stopped here.
        record.vm_stopped_unix_nanos = Some(unix_nanos(SystemTime::now()));
        self.journal.write(&record)?;
        tracing::info!(sandbox = sandbox_id, "{what}");
        Ok(what)
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    fn node_address(&self) -> Result<IpAddr, EngineError> {
        self.cfg
            .node_addresses
            .first()
            .copied()
            .ok_or_else(|| EngineError::Precondition("this node has no --node-address configured".into()))
    }

    fn check_scope(&self, id: &str) -> Result<(), EngineError> {
        sandbox::validate_sandbox_id(id)?;
        match &self.cfg.only_sandbox {
            Some(only) if only != id => {
                Err(EngineError::NotFound(format!("sandbox {id} (this endpoint serves {only})")))
            }
            _ => Ok(()),
        }
    }

    /// Sandbox ids under Kata's run directory (plus those received here).
    pub fn sandbox_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.cfg.layout.kata_run.join("vc/vm"))
            .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        if let Ok(inc) = self.incoming.lock() {
            ids.extend(inc.keys().cloned());
        }
        ids.sort();
        ids.dedup();
        if let Some(only) = &self.cfg.only_sandbox {
            ids.retain(|i| i == only);
        }
        ids.retain(|i| sandbox::validate_sandbox_id(i).is_ok());
        ids
    }

    /// Describes a sandbox: bundle facts, QEMU state, network and disks.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] for an unknown sandbox; QMP or netlink failures.
    pub async fn inspect(&self, id: &str) -> Result<pb::Sandbox, EngineError> {
        self.check_scope(id)?;
        let (qmp_socket, netns_path, pid, bundle) = self.locate(id)?;
        let mut s = pb::Sandbox::new();
        s.id = id.to_owned();
        if let Some(b) = &bundle {
            s.pod_name = b.pod_name.clone().unwrap_or_default();
            s.pod_namespace = b.pod_namespace.clone().unwrap_or_default();
            s.pod_uid = b.pod_uid.clone().unwrap_or_default();
            s.annotations = b.annotations.clone().into_iter().collect();
        }
        s.netns_path = netns_path.display().to_string();
        s.qmp_socket = qmp_socket.display().to_string();
        s.qemu_pid = pid;
        s.node_address = self.cfg.node_addresses.first().map(|a| a.to_string()).unwrap_or_default();
        if pid > 0 {
            s.qemu_argv =
                QemuCmdline::from_proc_file(&PathBuf::from(format!("/proc/{pid}/cmdline")))?.to_argv();
        }
        // QEMU facts, through the migration's connection if one holds the single-client socket.
        let qmp = match self.live_qmp(id) {
            Some(q) => q,
            None => QmpClient::connect(&qmp_socket, &QmpConfig::default()).await?.0,
        };
        let v = qmp.query_version().await?;
        s.qemu_version = format!("{}.{}.{}", v.major, v.minor, v.micro);
        let st = qmp.query_status().await?;
        s.qemu_status = st.status.as_str().to_owned();
        s.run_state = EnumOrUnknown::new(run_state(&st.status));
        for d in qemu::list_disks(&qmp).await? {
            let mut disk = pb::Disk::new();
            disk.drive_id = d.drive_id;
            disk.node_name = d.node_name;
            disk.file_path = d.file;
            disk.size_bytes = d.virtual_size;
            disk.format = d.format;
            disk.read_only = d.read_only;
            s.disks.push(disk);
        }
        // Network, from inside the sandbox's namespace.
        let roots = NetnsRoots {
            dirs: vec![netns_path.parent().map(PathBuf::from).unwrap_or_default()],
            proc: Some("/proc".into()),
        };
        let ns = NetnsHandle::open_in(&netns_path, &roots)?;
        let pod = ns.link(&self.cfg.pod_ifname).await?;
        let mut network = pb::Network::new();
        network.interface_name = self.cfg.pod_ifname.clone();
        network.tap_name = self.cfg.tap_name.clone();
        network.mac_address = pod.mac.map(|m| m.to_string()).unwrap_or_default();
        network.mtu = pod.mtu;
        let addrs = ns.addresses(&pod.id).await?;
        for a in addrs.into_iter().filter(|a| !a.addr().is_loopback() && !is_link_local(a.addr())) {
            let mut ip = pb::IpAddress::new();
            ip.address = a.addr().to_string();
            ip.prefix_length = u32::from(a.prefix_len());
            network.addresses.push(ip);
        }
        s.network = MessageField::some(network);
        Ok(s)
    }

    fn live_qmp(&self, id: &str) -> Option<QmpClient> {
        self.live.lock().ok()?.get(id).filter(|q| q.is_connected()).cloned()
    }

    /// QMP socket, netns, QEMU pid and bundle of a sandbox.
    fn locate(&self, id: &str) -> Result<(PathBuf, PathBuf, u32, Option<BundleInfo>), EngineError> {
        if let Some((qmp, netns, pid)) = self.incoming.lock().ok().and_then(|m| m.get(id).cloned()) {
            // The VM's own view of its namespace outlives a bind mount that this process cannot
            // see (an agent restarted in a private mount namespace, as the lab runs it).
            let via_qemu = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let netns = if pid > 0 && via_qemu.exists() { via_qemu } else { netns };
            return Ok((qmp, netns, pid, None));
        }
        let layout = &self.cfg.layout;
        if !layout.vm_dir(id).is_dir() {
            return Err(EngineError::NotFound(format!("sandbox {id}")));
        }
        let bundle_dir = layout.bundle_config(id).parent().map(PathBuf::from).unwrap_or_default();
        let bundle = BundleInfo::load(&bundle_dir)?;
        let netns = bundle.require_netns()?.to_owned();
        let pid = layout.read_qemu_pid(id)?;
        Ok((layout.extra_monitor_socket(id), netns, pid, Some(bundle)))
    }

    /// Every sandbox, inspected; sandboxes that cannot be inspected are logged and skipped.
    pub async fn list_sandboxes(&self) -> Vec<pb::Sandbox> {
        let mut out = Vec::new();
        for id in self.sandbox_ids() {
            match self.inspect(&id).await {
                Ok(s) => out.push(s),
                Err(e) => tracing::debug!(sandbox = %id, error = %chain(&e), "skipping sandbox"),
            }
        }
        out
    }

    /// The node's network namespace: the one all node work happens in.
    pub fn node_netns(&self) -> &NetnsHandle {
        &self.node_ns
    }

    /// The data listener on the first node address, bound in the node's network namespace on
    /// first use.
    ///
    /// # Errors
    /// No node address configured, or the address cannot be bound there.
    pub async fn data_listener(&self) -> Result<Arc<DataListener>, EngineError> {
        let addr = SocketAddr::new(self.node_address()?, self.cfg.data_port);
        self.listener
            .get_or_try_init(|| async {
                // Created on the node namespace's thread: the socket stays in that namespace
                // even though the agent's runtime serves it.
                let std_listener =
                    crate::host::netns::bind_tcp_in(&self.node_ns, addr).await.map_err(|e| {
                        EngineError::Io {
                            context: format!("bind the data listener on {addr}"),
                            source: std::io::Error::other(e),
                        }
                    })?;
                let listener = DataListener::from_std(std_listener)?;
                // Sources of past moves ask it whether their VM still runs here.
                listener.set_resolver(crate::migration::vm_status::resolver(self.journal.clone()));
                Ok(Arc::new(listener))
            })
            .await
            .cloned()
    }

    fn register(
        &self,
        id: &str,
        sandbox_id: &str,
        role: Role,
        peer: IpAddr,
    ) -> Result<Arc<Record>, EngineError> {
        let mut m =
            self.migrations.lock().map_err(|_| EngineError::Precondition("engine state poisoned".into()))?;
        if m.contains_key(id) {
            return Err(EngineError::Precondition(format!("migration {id} already exists on this node")));
        }
        // A migration that handed the VM over (forwarding) no longer holds it: the VM may move on
        // or come back while the forward still carries stragglers.
        if let Some(busy) = m.values().find(|r| {
            let p = r.log.phase();
            r.sandbox_id == sandbox_id && !p.is_terminal() && p < Phase::Forwarding
        }) {
            return Err(EngineError::Precondition(format!(
                "sandbox {sandbox_id} is already migrating ({:?})",
                busy.role
            )));
        }
        let rec = Arc::new(Record {
            sandbox_id: sandbox_id.to_owned(),
            role,
            peer,
            started: SystemTime::now(),
            log: EventLog::default(),
            gate: CommitGate::default(),
            dest: Mutex::new(None),
        });
        m.insert(id.to_owned(), rec.clone());
        self.metrics.follow(role, &rec.log);
        Ok(rec)
    }

    /// Source role: validates and starts moving a sandbox; returns once accepted.
    ///
    /// # Errors
    /// [`EngineError::Invalid`], [`EngineError::NotFound`], [`EngineError::Precondition`]
    /// before anything was touched.
    pub async fn start_migration(&self, req: &pb::StartMigrationRequest) -> Result<String, EngineError> {
        self.check_scope(&req.sandbox_id)?;
        crate::dataplane::handshake::validate_migration_id(&req.migration_id)?;
        let secret = Secret::new(req.secret.clone())?;
        let dest_node: IpAddr = req.destination_node_address.parse().map_err(|_| {
            invalid(format!(
                "destination node address {:?} is not an IP address",
                req.destination_node_address
            ))
        })?;
        let source_node = self.node_address()?;
        let endpoints = req.endpoints.as_ref().ok_or_else(|| invalid("missing destination endpoints"))?;
        let ram_endpoint: SocketAddr = endpoints
            .ram_endpoint
            .parse()
            .map_err(|_| invalid(format!("RAM endpoint {:?} is not host:port", endpoints.ram_endpoint)))?;
        let mut nbd_endpoints = BTreeMap::new();
        for e in &endpoints.nbd_endpoints {
            let addr: SocketAddr = e
                .endpoint
                .parse()
                .map_err(|_| invalid(format!("NBD endpoint {:?} is not host:port", e.endpoint)))?;
            crate::dataplane::handshake::validate_stream(&format!("nbd:{}", e.drive_id))?;
            nbd_endpoints.insert(e.drive_id.clone(), addr);
        }
        let mut dest_nodes = vec![dest_node];
        for a in &endpoints.node_addresses {
            let a: IpAddr = a
                .parse()
                .map_err(|_| invalid(format!("destination node address {a:?} is not an IP address")))?;
            if !dest_nodes.contains(&a) {
                dest_nodes.push(a);
            }
        }
        nbd_endpoints_on(&nbd_endpoints, &dest_nodes).map_err(invalid)?;
        let options = options_from_proto(req.options.as_ref().ok_or_else(|| invalid("missing options"))?)?;
        let stream_tls = match (options.plain_streams, req.stream_tls.as_ref()) {
            (true, None) => None,
            (true, Some(_)) => return Err(invalid("stream TLS credentials given with plain streams")),
            (false, None) => return Err(invalid(
                "missing stream TLS credentials (pass PrepareIncoming's stream_tls, or choose plain streams)",
            )),
            (false, Some(p)) => {
                let creds = crate::convert::stream_tls_from_proto(p);
                creds.validate(crate::dataplane::tls::Endpoint::Client)?;
                Some(creds)
            }
        };
        let sandbox = self.inspect(&req.sandbox_id).await?;
        let vm_addrs = crate::client::vm_addresses(&sandbox).map_err(|e| invalid(e.to_string()))?;
        options.validate(&vm_addrs, Some((source_node, dest_node)))?;
        let state_dir = self.cfg.layout.katamaran_run.join("migrations").join(&req.migration_id);
        let qmp_socket = PathBuf::from(&sandbox.qmp_socket);
        let rec = self.register(&req.migration_id, &req.sandbox_id, Role::Source, dest_node)?;
        if let (Some(reporter), false, false) =
            (self.events.get(), sandbox.pod_name.is_empty(), sandbox.pod_namespace.is_empty())
        {
            let pod = crate::kube_events::PodRef {
                namespace: sandbox.pod_namespace.clone(),
                name: sandbox.pod_name.clone(),
                uid: sandbox.pod_uid.clone(),
            };
            reporter.follow(pod, &req.migration_id, &dest_node.to_string(), &rec.log);
        }
        let request = SourceRequest {
            migration_id: req.migration_id.clone(),
            sandbox_id: req.sandbox_id.clone(),
            vm_addrs,
            source_node,
            dest_node,
            dest_nodes,
            qemu_pid: sandbox.qemu_pid,
            tap_name: self.cfg.tap_name.clone(),
            ram_endpoint,
            nbd_endpoints,
            secret,
            stream_tls,
            options,
            state_dir: state_dir.clone(),
            node_interface: self.cfg.node_interface.clone(),
        };
        let entry = Entry::new(
            self.journal.clone(),
            new_record(
                &req.migration_id,
                &req.sandbox_id,
                Standing::Source(SourceState::Preparing),
                dest_node,
                &req.secret,
            ),
        );
        entry.record(Standing::Source(SourceState::Preparing), |r| {
            r.source = Some(SourceRecord {
                qmp_socket: qmp_socket.clone(),
                qemu_pid: sandbox.qemu_pid,
                state_dir: state_dir.clone(),
                ctl_endpoint: Some(ram_endpoint),
                ..SourceRecord::default()
            });
        })?;
        let env = SourceEnv {
            node: self.node_ns.clone(),
            log: rec.log.clone(),
            cleanup: Cleanup::default(),
            gate: rec.gate.clone(),
            journal: entry.clone(),
            heartbeat: self.heartbeat,
        };
        let live = self.live.clone();
        let sandbox_id = req.sandbox_id.clone();
        let (incoming, journal, sandbox_id2) =
            (self.incoming.clone(), self.journal.clone(), req.sandbox_id.clone());
        let span = tracing::info_span!("migration", id = %req.migration_id, role = "source");
        let idle = request.options.tunnel_idle_timeout;
        // What a supervisor needs to tell the destination the decision when the task could not.
        let decision_path = (ram_endpoint, request.secret.clone(), req.migration_id.clone(), self.heartbeat);
        let forwarding = ForwardWatch {
            migration_id: req.migration_id.clone(),
            sandbox_id: req.sandbox_id.clone(),
            migrations: self.migrations.clone(),
            forwards: self.forwards.clone(),
            ask: Some((ram_endpoint, request.secret.clone())),
            journal: self.journal.clone(),
            started_unix_nanos: unix_nanos(rec.started),
        };
        tokio::spawn(
            async move {
                let started = std::time::Instant::now();
                let cleanup = env.cleanup.clone();
                let (node, gate) = (env.node.clone(), env.gate.clone());
                // The migration runs in its own task: a panic there still ends here, in
                // cleanup and a terminal event.
                let live2 = live.clone();
                let task = tokio::spawn(
                    async move {
                        std::fs::create_dir_all(&state_dir)
                            .map_err(EngineError::io(format!("create {}", state_dir.display())))?;
                        let sd = state_dir.clone();
                        env.cleanup.push("remove migration state dir", move || async move {
                            std::fs::remove_dir_all(&sd)
                        });
                        let (qmp, events) = QmpClient::connect(&qmp_socket, &QmpConfig::default()).await?;
                        if let Ok(mut l) = live2.lock() {
                            l.insert(sandbox_id.clone(), qmp.clone());
                        }
                        let conn = QemuConn { qmp, bus: EventBus::spawn(events) };
                        let result = source::run(request, conn, env).await;
                        if let Ok(mut l) = live2.lock() {
                            l.remove(&sandbox_id);
                        }
                        result
                    }
                    .in_current_span(),
                );
                let result = task.await.unwrap_or_else(|e| Err(EngineError::Panicked(panic_text(e))));
                match result {
                    Ok(handover) => {
                        // An incoming sandbox that handed its VM on is a husk (no pod refers to
                        // it): destroyed once the VM runs elsewhere, so that the sandbox can come
                        // back to this node later.
                        let husk = incoming.lock().ok().and_then(|mut m| m.remove(&sandbox_id2));
                        if husk.is_some() && handover.confirmed {
                            retire_incoming(&journal, &sandbox_id2, &node, unix_nanos(rec.started)).await;
                        }
                        let end = forwarding.run(node, handover.forward, idle).await;
                        let message = format!("completed; the forward ended: {}", end.as_str());
                        let _ = entry.record(Standing::Source(SourceState::Finished), |r| {
                            r.message.clone_from(&message);
                        });
                        finish_with(&rec, Ok((handover.times.downtime_ms, 0)), &cleanup, started, &message)
                            .await;
                    }
                    Err(e) if gate.is_committed() => {
                        // Past the commit nothing is undone: the VM belongs to the destination.
                        tracing::error!(error = %chain(&e), "failure after the commit; the source stays paused");
                        finish(&rec, Err(&e), &Cleanup::default(), started).await;
                    }
                    Err(e) => {
                        if matches!(e, EngineError::Panicked(_)) {
                            // The task died without a word to the destination, which may have
                            // voted and now waits in doubt: the decision is abort, told first
                            // (as after a restart), so it never waits on the unwind here.
                            let (endpoint, secret, id, heartbeat) = decision_path;
                            let node = node.clone();
                            tokio::spawn(
                                async move {
                                    let abort = CtlMsg::Abort(
                                        "rolled back: the source's migration task panicked".into(),
                                    );
                                    let delivered = tokio::time::timeout(
                                        DECISION_LIMIT,
                                        source::deliver_decision(node, endpoint, &secret, &id, abort, heartbeat),
                                    )
                                    .await;
                                    if let Ok(Err(e)) = delivered {
                                        tracing::warn!(error = %chain(&e), "abort not delivered");
                                    }
                                }
                                .in_current_span(),
                            );
                        }
                        finish(&rec, Err(&e), &cleanup, started).await;
                        let _ = entry.record(Standing::Source(SourceState::RolledBack), |r| r.message = chain(&e));
                    }
                }
            }
            .instrument(span),
        );
        Ok(req.migration_id.clone())
    }

    /// Destination role: validates, creates the incoming sandbox and returns the endpoints; the
    /// rest of the migration continues in the background.
    ///
    /// # Errors
    /// Validation failures (nothing touched), or the first failure of the preparation (after
    /// everything it created was undone).
    pub async fn prepare_incoming(
        &self,
        req: &pb::PrepareIncomingRequest,
    ) -> Result<pb::PrepareIncomingResponse, EngineError> {
        let node_address = self.node_address()?;
        if self.cfg.only_sandbox.is_some() {
            return Err(EngineError::Precondition(
                "a sandbox extension cannot receive a VM; call the node agent".into(),
            ));
        }
        crate::dataplane::handshake::validate_migration_id(&req.migration_id)?;
        let secret = Secret::new(req.secret.clone())?;
        let src = req.source_sandbox.as_ref().ok_or_else(|| invalid("missing source sandbox"))?;
        sandbox::validate_sandbox_id(&src.id)?;
        let source_node: IpAddr = req.source_node_address.parse().map_err(|_| {
            invalid(format!("source node address {:?} is not an IP address", req.source_node_address))
        })?;
        let argv = QemuCmdline::parse(&req.source_qemu_argv)?;
        let net = src.network.as_ref().ok_or_else(|| invalid("missing source network"))?;
        validate_ifname(&net.interface_name).map_err(|e| invalid(e.to_string()))?;
        validate_ifname(&net.tap_name).map_err(|e| invalid(e.to_string()))?;
        let mac: MacAddr = net
            .mac_address
            .parse()
            .map_err(|_| invalid(format!("MAC address {:?} does not parse", net.mac_address)))?;
        if !(68..=65535).contains(&net.mtu) {
            return Err(invalid(format!("MTU {} is outside 68..=65535", net.mtu)));
        }
        let vm_addrs = crate::client::vm_addresses(src).map_err(|e| invalid(e.to_string()))?;
        let options = options_from_proto(req.options.as_ref().ok_or_else(|| invalid("missing options"))?)?;
        options.validate(&vm_addrs, Some((source_node, node_address)))?;
        // An address this node delivers to one of its own pods is in use here: taking it over
        // would cut that pod off. (A forward of an earlier move away routes it elsewhere.)
        for a in &vm_addrs {
            let Some(path) = self.node_ns.path_to(*a).await? else { continue };
            let pod = path.is_pod_route()
                || (path.is_pod_subnet()
                    && crate::net::PathTo::answers_on_bridge(
                        *a,
                        &self.node_ns.neighbours(&path.link.id).await?,
                    ));
            if pod {
                return Err(EngineError::Precondition(format!(
                    "VM address {a} belongs to a pod on this node (routed straight to {} {}): refusing to take it over",
                    path.link.kind.as_deref().unwrap_or("link"),
                    path.link.id.name
                )));
            }
        }
        let source_state_dir = PathBuf::from(&src.qmp_socket)
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| invalid("source QMP socket has no directory"))?;
        if !source_state_dir.is_absolute() {
            return Err(invalid(format!("source QMP socket {:?} is not absolute", src.qmp_socket)));
        }
        // The allowlist before anything exists on this node (the rewrite checks it again).
        crate::sandbox::allowlist::check_source(&argv, std::slice::from_ref(&source_state_dir))?;
        let disks = src
            .disks
            .iter()
            .map(|d| SourceDisk {
                drive_id: d.drive_id.clone(),
                node_name: d.node_name.clone(),
                size_bytes: d.size_bytes,
                format: d.format.clone(),
                read_only: d.read_only,
            })
            .collect();
        let dreq = DestRequest {
            migration_id: req.migration_id.clone(),
            secret,
            sandbox_id: src.id.clone(),
            source_state_dir,
            argv,
            pod_ifname: net.interface_name.clone(),
            tap_name: net.tap_name.clone(),
            mac,
            mtu: net.mtu,
            vm_addrs,
            disks,
            options,
            source_node,
        };
        let listener = self.data_listener().await?;
        let env = DestEnv {
            node: self.node_ns.clone(),
            node_address,
            listener,
            qemu_binary: self.cfg.qemu_binary.clone(),
            incoming_root: self.cfg.layout.katamaran_run.join("incoming"),
            disks_root: self.cfg.layout.katamaran_state.join("disks"),
            netns_dir: self.cfg.netns_dir.clone(),
            gateway_mac: self.cfg.gateway_mac,
            gateway6: self.cfg.gateway6,
        };
        let rec = self.register(&req.migration_id, &src.id, Role::Destination, source_node)?;
        let cleanup = Cleanup::default();
        let started = std::time::Instant::now();
        let span = tracing::info_span!("migration", id = %req.migration_id, role = "destination");
        let entry = Entry::new(
            self.journal.clone(),
            new_record(
                &req.migration_id,
                &src.id,
                Standing::Destination(DestState::Preparing),
                source_node,
                &req.secret,
            ),
        );
        let prepared = async {
            entry.record(Standing::Destination(DestState::Preparing), |_| {})?;
            let incoming = dest::prepare(&dreq, &env, &rec.log, &cleanup, &self.heartbeat, &entry).await?;
            // A cancel that came while preparing: nothing was received, give up here.
            if let Some(reason) = rec.gate.token().reason() {
                return Err(EngineError::Cancelled(reason));
            }
            Ok(incoming)
        }
        .instrument(span.clone())
        .await;
        let incoming = match prepared {
            Ok(i) => i,
            Err(e) => {
                let _ = entry.record(Standing::Destination(DestState::RolledBack), |r| r.message = chain(&e));
                finish(&rec, Err(&e), &cleanup, started).await;
                return Err(e);
            }
        };
        let mut resp = pb::PrepareIncomingResponse::new();
        resp.destination_sandbox_id = src.id.clone();
        resp.destination_node_address = node_address.to_string();
        let mut eps = pb::DestinationEndpoints::new();
        eps.ram_endpoint = incoming.endpoints.0.to_string();
        eps.node_addresses = self.cfg.node_addresses.iter().map(ToString::to_string).collect();
        for (drive, addr) in &incoming.endpoints.1 {
            let mut e = pb::NbdEndpoint::new();
            e.drive_id = drive.clone();
            e.endpoint = addr.to_string();
            eps.nbd_endpoints.push(e);
        }
        resp.endpoints = MessageField::some(eps);
        if let Some(creds) = &incoming.client_tls {
            resp.stream_tls = MessageField::some(crate::convert::stream_tls_to_proto(creds));
        }
        if let Ok(mut m) = self.incoming.lock() {
            m.insert(
                src.id.clone(),
                (incoming.state_dir.join("qmp.sock"), incoming.netns.clone(), incoming.qemu_pid),
            );
        }
        let timeout = dreq.options.storage_timeout + dreq.options.ram_timeout;
        let log = rec.log.clone();
        let (control, inbox) = DestControl::new();
        if let Ok(mut d) = rec.dest.lock() {
            *d = Some(control.clone());
        }
        let incoming_map = self.incoming.clone();
        let sandbox_id = src.id.clone();
        tokio::spawn(
            async move {
                let entry2 = entry.clone();
                let task = tokio::spawn(
                    async move { dest::receive(incoming, log, inbox, &entry2, timeout).await }.in_current_span(),
                );
                let result = task.await.unwrap_or_else(|e| Err(EngineError::Panicked(panic_text(e))));
                match &result {
                    Ok((t, drops)) => finish(&rec, Ok((t.downtime_ms, *drops)), &cleanup, started).await,
                    Err(e) if !control.state().may_destroy() && control.state() != DestState::RolledBack => {
                        // Voted or committed: this copy may be the VM's only one; never destroy
                        // it on our own. It stays for the source's decision or an operator.
                        tracing::error!(error = %chain(e), state = control.state().as_str(), "failure after the vote; the incoming VM is kept");
                        cleanup.disarm();
                        finish(&rec, Err(e), &cleanup, started).await;
                    }
                    Err(e) => {
                        finish(&rec, Err(e), &cleanup, started).await;
                        let _ = entry.record(Standing::Destination(DestState::RolledBack), |r| r.message = chain(e));
                        if let Ok(mut m) = incoming_map.lock() {
                            m.remove(&sandbox_id);
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(resp)
    }

    /// A watcher of a migration's events.
    ///
    /// # Errors
    /// [`EngineError::NotFound`].
    pub fn watch(&self, id: &str) -> Result<(Role, Watcher), EngineError> {
        let m =
            self.migrations.lock().map_err(|_| EngineError::Precondition("engine state poisoned".into()))?;
        let r = m.get(id).ok_or_else(|| EngineError::NotFound(format!("migration {id}")))?;
        Ok((r.role, r.log.watch()))
    }

    /// Cancels a migration before its commit point. On the source the cancel races the commit
    /// through one gate; on the destination it is passed to the source, which decides.
    ///
    /// # Errors
    /// [`EngineError::NotFound`]; [`EngineError::Protocol`] (FAILED_PRECONDITION) past the
    /// commit point; [`EngineError::Timeout`] when the source gave no verdict.
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<(bool, Phase), EngineError> {
        let r = {
            let m = self
                .migrations
                .lock()
                .map_err(|_| EngineError::Precondition("engine state poisoned".into()))?;
            m.get(id).cloned().ok_or_else(|| EngineError::NotFound(format!("migration {id}")))?
        };
        let phase = r.log.phase();
        if phase.is_terminal() {
            return Ok((false, phase));
        }
        let reason = if reason.is_empty() { "cancelled" } else { reason };
        let fired = match r.role {
            Role::Source => r.gate.cancel(reason)?,
            Role::Destination => {
                let control = r.dest.lock().ok().and_then(|d| d.clone());
                match control {
                    Some(c) => c.cancel(reason).await?,
                    // Still preparing: the preparation gives up when it is done.
                    None => r.gate.cancel(reason)?,
                }
            }
        };
        Ok((fired, r.log.phase()))
    }

    /// Every migration known here.
    pub fn list_migrations(&self) -> Vec<pb::MigrationStatus> {
        let Ok(m) = self.migrations.lock() else { return Vec::new() };
        m.iter()
            .map(|(id, r)| {
                let mut s = pb::MigrationStatus::new();
                s.migration_id = id.clone();
                s.sandbox_id = r.sandbox_id.clone();
                s.role = EnumOrUnknown::new(role_to_proto(r.role));
                s.phase = EnumOrUnknown::new(phase_to_proto(r.log.phase()));
                s.started_unix_nanos = unix_nanos(r.started);
                if let Some(e) = r.log.last() {
                    s.last_event = MessageField::some(event_to_proto(id, r.role, &e));
                }
                s.peer_node_address = r.peer.to_string();
                s
            })
            .collect()
    }
}

/// Destroys the incoming sandbox `sandbox_id` received here earlier, now that its VM runs on
/// another node (its QEMU is paused in `postmigrate`, its routes already point away): the
/// newest such sandbox, and only if it was received before the migration that moved the VM
/// away started (`moved_away_at`, unix nanos) — a sandbox received later runs the VM.
pub(crate) async fn retire_incoming(
    journal: &Journal,
    sandbox_id: &str,
    node: &NetnsHandle,
    moved_away_at: u64,
) {
    let record = journal.load_all().ok().and_then(|all| {
        all.into_iter().rev().find(|r| {
            r.sandbox_id == sandbox_id
                && matches!(r.standing, Standing::Destination(DestState::Running | DestState::Committed))
        })
    });
    let Some(mut record) = record else { return };
    if record.started_unix_nanos >= moved_away_at {
        return;
    }
    let Some(mut details) = record.destination.clone() else { return };
    // The VM lives on elsewhere and this node's routes to it were moved by the move away (a
    // forward): the routes this sandbox once replaced are history, not to be put back.
    details.replaced_routes.clear();
    match crate::recovery::roll_back_destination(&record, &details, node).await {
        Ok(()) => {
            tracing::info!(sandbox = sandbox_id, "the incoming sandbox handed its VM on: removed");
            record.message = "the VM moved on; this incoming sandbox was removed".into();
            record.destination = None;
            let _ = journal.write(&record);
        }
        Err(e) => {
            tracing::warn!(sandbox = sandbox_id, error = %chain(&e), "cannot remove the handed-over incoming sandbox")
        }
    }
}

/// A fresh journal record.
fn new_record(
    id: &str,
    sandbox_id: &str,
    standing: Standing,
    peer: IpAddr,
    secret: &[u8],
) -> journal::Record {
    let now = unix_nanos(SystemTime::now());
    journal::Record {
        format: journal::FORMAT,
        migration_id: id.to_owned(),
        sandbox_id: sandbox_id.to_owned(),
        standing,
        peer,
        secret_hex: journal::to_hex(secret),
        started_unix_nanos: now,
        updated_unix_nanos: now,
        message: String::new(),
        history: Vec::new(),
        source: None,
        destination: None,
        vm_stopped_unix_nanos: None,
    }
}

/// The message of a task's panic.
fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "the task was cancelled".into();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Records the terminal event; on failure unwinds the cleanup stack first so the event reports
/// a node with nothing left behind.
async fn finish(
    rec: &Record,
    result: Result<(u64, u64), &EngineError>,
    cleanup: &Cleanup,
    started: std::time::Instant,
) {
    finish_with(rec, result, cleanup, started, "completed").await;
}

/// [`finish`] with the completed event's message.
async fn finish_with(
    rec: &Record,
    result: Result<(u64, u64), &EngineError>,
    cleanup: &Cleanup,
    started: std::time::Instant,
    completed: &str,
) {
    let total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok((downtime_ms, drops)) => {
            let mut e = Event::new(Phase::Completed, completed);
            e.outcome = Some(Outcome { error: None, total_ms, downtime_ms, plug_dropped_packets: drops });
            rec.log.push(e);
        }
        Err(err) => {
            let report = cleanup.unwind().await;
            let cancelled = matches!(err, EngineError::Cancelled(_));
            let mut msg = chain(err);
            if !report.is_clean() {
                let failed: Vec<String> = report
                    .steps
                    .iter()
                    .filter(|(_, r)| r.is_err())
                    .map(|(n, r)| format!("{n}: {}", r.clone().err().unwrap_or_default()))
                    .collect();
                msg.push_str(&format!(" (cleanup incomplete: {})", failed.join("; ")));
            }
            tracing::warn!(error = %msg, undone = report.steps.len(), "migration ended without success");
            let mut e = Event::new(if cancelled { Phase::Cancelled } else { Phase::Failed }, msg.clone());
            e.outcome = Some(Outcome {
                error: Some((err.kind(), msg)),
                total_ms,
                downtime_ms: 0,
                plug_dropped_packets: 0,
            });
            rec.log.push(e);
        }
    }
}

fn run_state(s: &RunState) -> pb::VmRunState {
    match s {
        RunState::Running => pb::VmRunState::VM_RUN_STATE_RUNNING,
        RunState::Paused => pb::VmRunState::VM_RUN_STATE_PAUSED,
        RunState::Inmigrate => pb::VmRunState::VM_RUN_STATE_INMIGRATE,
        RunState::Postmigrate => pb::VmRunState::VM_RUN_STATE_POSTMIGRATE,
        RunState::FinishMigrate => pb::VmRunState::VM_RUN_STATE_FINISH_MIGRATE,
        RunState::Prelaunch => pb::VmRunState::VM_RUN_STATE_PRELAUNCH,
        RunState::Shutdown => pb::VmRunState::VM_RUN_STATE_SHUTDOWN,
        RunState::Suspended => pb::VmRunState::VM_RUN_STATE_SUSPENDED,
        RunState::InternalError | RunState::IoError | RunState::GuestPanicked => {
            pb::VmRunState::VM_RUN_STATE_ERROR
        }
        _ => pb::VmRunState::VM_RUN_STATE_OTHER,
    }
}

fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// A completed source migration's forward: registered for ReleaseForward while it runs, aware
/// of a migration bringing the same sandbox back to this node.
#[derive(Debug, Clone)]
struct ForwardWatch {
    migration_id: String,
    sandbox_id: String,
    migrations: Arc<Mutex<BTreeMap<String, Arc<Record>>>>,
    forwards: Arc<Mutex<BTreeMap<String, ForwardHandle>>>,
    /// Where and how to ask the destination whether the VM still runs (its data listener and
    /// the migration's secret); `None`: never asked.
    ask: Option<(SocketAddr, Secret)>,
    /// This node's journal and when the migration started: a VM stopped down the chain is
    /// recorded on the move that brought it here.
    journal: Arc<Journal>,
    started_unix_nanos: u64,
}

/// An active forward: its release signal, and whether it has ended (routes and tunnel removed).
#[derive(Debug, Clone)]
struct ForwardHandle {
    release: CancelToken,
    ended: tokio::sync::watch::Receiver<bool>,
}

impl ForwardWatch {
    /// Forwards until released, taken over, idle or the VM stopped on the destination (see
    /// [`source::forward_until_released`]).
    async fn run(
        self,
        node: Arc<NetnsHandle>,
        forward: crate::migration::network::SourceForward,
        idle: std::time::Duration,
    ) -> source::ForwardEnd {
        let release = CancelToken::default();
        let (ended, watch_ended) = tokio::sync::watch::channel(false);
        if let Ok(mut f) = self.forwards.lock() {
            f.insert(
                self.migration_id.clone(),
                ForwardHandle { release: release.clone(), ended: watch_ended },
            );
        }
        let (migrations, sandbox_id) = (self.migrations.clone(), self.sandbox_id.clone());
        let coming_back = move || {
            migrations.lock().is_ok_and(|m| {
                m.values().any(|r| {
                    r.role == Role::Destination && r.sandbox_id == sandbox_id && !r.log.phase().is_terminal()
                })
            })
        };
        let vm_stopped = {
            let (node, ask, id) = (node.clone(), self.ask.clone(), self.migration_id.clone());
            async move {
                match ask {
                    Some((endpoint, secret)) => {
                        crate::migration::vm_status::until_stopped(node, endpoint, secret, id).await;
                    }
                    None => std::future::pending().await,
                }
            }
        };
        let end = source::forward_until_released(node, forward, idle, release, coming_back, vm_stopped).await;
        if end == source::ForwardEnd::VmStopped {
            crate::migration::vm_status::mark_stopped_upstream(
                &self.journal,
                &self.sandbox_id,
                self.started_unix_nanos,
                unix_nanos(SystemTime::now()),
            );
        }
        if let Ok(mut f) = self.forwards.lock() {
            f.remove(&self.migration_id);
        }
        ended.send_replace(true);
        end
    }
}

/// QEMU's NBD client speaks to a disk endpoint without the stream handshake (the destination
/// admits the source's port over the control stream), so every endpoint must be one of the
/// destination node's addresses.
fn nbd_endpoints_on(endpoints: &BTreeMap<String, SocketAddr>, node: &[IpAddr]) -> Result<(), String> {
    match endpoints.iter().find(|(_, a)| !node.contains(&a.ip())) {
        Some((drive, addr)) => {
            Err(format!("NBD endpoint {addr} of {drive} is not an address of the destination node"))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_endpoints_must_be_the_destination_nodes() {
        let node: Vec<IpAddr> = vec!["10.0.0.2".parse().expect("ip"), "fd00::2".parse().expect("ip")];
        let eps = |list: &[(&str, &str)]| -> BTreeMap<String, SocketAddr> {
            list.iter().map(|(d, a)| ((*d).to_owned(), a.parse().expect("addr"))).collect()
        };
        assert_eq!(nbd_endpoints_on(&eps(&[]), &node), Ok(()));
        assert_eq!(
            nbd_endpoints_on(&eps(&[("drive-0", "10.0.0.2:40000"), ("drive-1", "[fd00::2]:1")]), &node),
            Ok(())
        );
        let e =
            nbd_endpoints_on(&eps(&[("drive-0", "10.0.0.2:40000"), ("drive-1", "10.0.0.9:40001")]), &node)
                .expect_err("another host");
        assert_eq!(e, "NBD endpoint 10.0.0.9:40001 of drive-1 is not an address of the destination node");
    }
}
