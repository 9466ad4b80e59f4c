//! The Migration controller every agent runs (kube-rs `runtime::Controller` over Migrations in
//! all namespaces). The agent of the node the pod runs on drives its Migrations: it accepts one
//! (finalizer, `status` Preparing with the nodes and `owner: Source`), resolves the pod and the
//! target's agent, and runs [`orchestrate::run`] between its own service (its unix socket) and
//! the target's agent (`pods/portforward` through the API server, as the agent's ServiceAccount,
//! RBAC allowing only agents and cluster admins; then mutual TLS as this node's identity from
//! the cluster CA, the target's certificate naming the target node, [`crate::peer`]). The
//! events of both nodes become the status ([`super::status::StatusBuilder`]); the end becomes a
//! terminal phase, an Event on the Migration, and the finalizer's removal.
//!
//! Reconcile is idempotent and keyed by the Migration's UID: the migration id on both nodes is
//! `k8s-<uid>`, so a restarted agent finds its migration in its engine (whose journal finished or
//! rolled it back) and reports how it ended. `spec.cancel` and a deletion cancel through the
//! source, which honours them before the commit point only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use katamaran_api::v1alpha1::{
    condition, reason, Migration, MigrationStatus, Owner, Phase, ResolvedOptions, FINALIZER,
};
use katamaran_protos::v1 as pb;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::{watcher, Controller};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::orchestrate::{self, Outcome, Plan, Progress, Report, Settings, Side};
use super::resolve::{self, Resolver};
use super::status::{condition as cond, now_nanos, set_condition, time, StatusBuilder};
use super::transport::Agent;
use crate::kube_events::{rfc3339_micros, REPORTING_CONTROLLER};
use crate::migration::options::{MigrationOptions, StorageMode, TunnelMode as EngineTunnel};

/// How often a running migration's progress is written to its status at most.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);
/// After a failed reconcile, when to try again.
const RETRY: Duration = Duration::from_secs(5);
/// Tries to write a migration's end before leaving it to the periodic reconcile.
const FINISH_TRIES: u32 = 3;
/// How often a Migration this agent drives is reconciled without a change.
const RESYNC: Duration = Duration::from_secs(60);
/// How often a restarted agent tries to follow a migration on its own engine (every [`RETRY`]).
const PICK_UP_ATTEMPTS: u32 = 12;

/// What the controller needs to know about its node.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name (`spec.nodeName` of the agent's pod).
    pub node_name: String,
    /// Namespace of the agents' pods.
    pub agent_namespace: String,
    /// The agents' control port inside their pods (`--listen-tcp`'s port).
    pub agent_port: u16,
    /// The RuntimeClass of the pods katamaran moves.
    pub runtime_class: String,
    /// This agent's own unix socket (the source side is driven through it).
    pub local_socket: std::path::PathBuf,
    /// This node's identity (`<node>.agent.katamaran.io`) and the cluster CA: the target's
    /// agent is reached with it, and must present the target node's identity.
    pub tls: crate::peer::PeerTls,
}

/// A failed reconcile (retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("{what}")]
    Api {
        /// The request.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The Migration has no namespace or UID (the API server always sets them), or a UID that
    /// is no valid migration id.
    #[error("Migration {0} has no namespace or a usable uid")]
    Malformed(String),
    /// The task writing a migration's status ended abnormally.
    #[error("the status writer of Migration {0} stopped")]
    Writer(String),
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// The migration id of a Migration on both nodes.
pub fn migration_id(uid: &str) -> Option<String> {
    let id = format!("k8s-{uid}");
    crate::dataplane::handshake::validate_migration_id(&id).ok().map(|()| id)
}

/// The engine's options for a resource's resolved options.
pub fn engine_options(r: &ResolvedOptions) -> MigrationOptions {
    use katamaran_api::v1alpha1::TunnelMode as T;
    MigrationOptions {
        storage: if r.shared_storage { StorageMode::Shared } else { StorageMode::Local },
        downtime_limit: r.downtime,
        auto_downtime: r.auto_downtime,
        max_bandwidth: r.bandwidth,
        multifd_channels: r.multifd_channels,
        auto_converge: r.auto_converge,
        tunnel_mode: match r.tunnel_mode {
            T::Auto => EngineTunnel::Auto,
            T::Ipip => EngineTunnel::Ipip,
            T::Gre => EngineTunnel::Gre,
            T::Ip6ip6 => EngineTunnel::Ip6ip6,
            T::Ip6gre => EngineTunnel::Ip6gre,
            T::Route => EngineTunnel::Route,
        },
        tunnel_idle_timeout: r.tunnel_idle_timeout.unwrap_or(Duration::ZERO),
        plug_limit: r.plug_limit,
        storage_timeout: r.storage_timeout,
        ram_timeout: r.ram_timeout,
        plain_streams: r.plain_streams,
    }
}

/// A migration this agent drives: its cancel switch.
#[derive(Debug)]
struct Running {
    cancel: watch::Sender<bool>,
}

struct Ctx {
    client: Client,
    config: Config,
    running: Mutex<HashMap<String, Running>>,
}

/// Runs the controller until `shutdown` resolves. Migrations it drives keep running in their
/// own tasks until the process ends; their nodes' journals finish or roll them back.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let migrations: Api<Migration> = Api::all(client.clone());
    let ctx = Arc::new(Ctx { client, config, running: Mutex::new(HashMap::new()) });
    tracing::info!(node = %ctx.config.node_name, "reconciling Migrations");
    Controller::new(migrations, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok(_) => {}
                // Logged by error_policy already.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // A watch that fails (no CRD, no RBAC, the API away) is retried with backoff.
                Err(e) => tracing::warn!(error = %crate::migration::error::chain(&e), "watching Migrations"),
            }
        })
        .await;
}

fn error_policy(m: Arc<Migration>, e: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(migration = %m.name_any(), namespace = ?m.namespace(), error = %crate::migration::error::chain(e), "reconcile failed; retrying");
    Action::requeue(RETRY)
}

fn is_running(ctx: &Ctx, uid: &str) -> bool {
    ctx.running.lock().is_ok_and(|r| r.contains_key(uid))
}

async fn reconcile(m: Arc<Migration>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (Some(ns), Some(uid)) = (m.namespace(), m.uid()) else {
        return Err(Error::Malformed(m.name_any()));
    };
    let name = m.name_any();
    let me = &ctx.config.node_name;
    let status = m.status.clone().unwrap_or_default();
    let phase = m.phase();
    let mine_by_status = status.source_node.as_deref() == Some(me.as_str());
    let has_finalizer = m.finalizers().iter().any(|f| f == FINALIZER);
    let migrations: Api<Migration> = Api::namespaced(ctx.client.clone(), &ns);

    // No node took it (no source in the status): nothing ran anywhere. A finalizer on it was
    // added by the pod's agent just before it stopped; any agent may take it off.
    let unclaimed = status.source_node.is_none();
    if phase.is_terminal() {
        if (mine_by_status || unclaimed) && has_finalizer && !is_running(&ctx, &uid) {
            remove_finalizer(&migrations, &m).await?;
        }
        return Ok(Action::await_change());
    }
    if is_running(&ctx, &uid) {
        if m.spec.cancel || m.metadata.deletion_timestamp.is_some() {
            if let Ok(r) = ctx.running.lock() {
                if let Some(r) = r.get(&uid) {
                    r.cancel.send_replace(true);
                }
            }
        }
        // Looked at again now and then: a task that could not write its end leaves the
        // Migration non-terminal with no task, which the branch below picks up.
        return Ok(Action::requeue(RESYNC));
    }
    if phase == Phase::Pending && m.metadata.deletion_timestamp.is_some() {
        // Deleted before any node took it: nothing to undo.
        if has_finalizer {
            remove_finalizer(&migrations, &m).await?;
        }
        return Ok(Action::await_change());
    }
    if phase != Phase::Pending {
        // Accepted by an agent that is not running it: this node's predecessor (a restart), or
        // a task of this one that ended without writing the end.
        if mine_by_status {
            spawn(&ctx, &m, &uid, Mode::PickUp);
            return Ok(Action::requeue(RESYNC));
        }
        return Ok(Action::await_change());
    }

    // Pending: the agent of the pod's node decides.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = match pods.get_opt(&m.spec.pod).await.map_err(api(format!("get pod {ns}/{}", m.spec.pod)))? {
        Some(p) => p,
        None => {
            // No agent is the pod's; the one on the target node speaks for the cluster.
            if m.spec.target_node == *me {
                let msg = format!("pod {ns}/{} not found", m.spec.pod);
                refuse(&ctx, &migrations, &m, condition::POD_NOT_MIGRATABLE, &msg).await?;
            }
            return Ok(Action::await_change());
        }
    };
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(me.as_str()) {
        return Ok(Action::await_change());
    }
    if m.spec.cancel {
        refuse_as(
            &ctx,
            &migrations,
            &m,
            Phase::Cancelled,
            reason::CANCELLED,
            "Cancelled",
            "cancelled before it started; nothing was changed",
        )
        .await?;
        return Ok(Action::await_change());
    }
    // One migration per pod: the oldest non-terminal one runs, the others are refused.
    let all =
        migrations.list(&ListParams::default()).await.map_err(api(format!("list migrations in {ns}")))?;
    let key = |x: &Migration| (x.metadata.creation_timestamp.clone().map(|t| t.0), x.name_any());
    if let Some(other) = all.items.iter().find(|x| {
        x.spec.pod == m.spec.pod
            && x.uid().as_deref() != Some(uid.as_str())
            && !x.phase().is_terminal()
            && key(x) < key(&m)
    }) {
        let msg = format!(
            "Migration {} moves pod {} already; create this one again once it ended",
            other.name_any(),
            m.spec.pod
        );
        refuse(&ctx, &migrations, &m, condition::POD_BUSY, &msg).await?;
        return Ok(Action::await_change());
    }
    let options = match m.spec.options.resolve() {
        Ok(o) => o,
        Err(e) => {
            refuse(&ctx, &migrations, &m, condition::INVALID_OPTIONS, &e.to_string()).await?;
            return Ok(Action::await_change());
        }
    };
    if migration_id(&uid).is_none() {
        return Err(Error::Malformed(name));
    }
    if !has_finalizer {
        let mut finalizers = m.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        migrations
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"finalizers": finalizers, "resourceVersion": m.resource_version()}}),
                ),
            )
            .await
            .map_err(api(format!("add the finalizer to Migration {ns}/{name}")))?;
    }
    spawn(&ctx, &m, &uid, Mode::Start(Box::new(engine_options(&options))));
    Ok(Action::requeue(RESYNC))
}

async fn remove_finalizer(migrations: &Api<Migration>, m: &Migration) -> Result<(), Error> {
    let finalizers: Vec<&String> = m.finalizers().iter().filter(|f| *f != FINALIZER).collect();
    migrations
        .patch(
            &m.name_any(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": finalizers, "resourceVersion": m.resource_version()}}),
            ),
        )
        .await
        .map(|_| ())
        .map_err(api(format!("remove the finalizer of Migration {}", m.name_any())))
}

/// Ends a Migration this agent does not start: `Failed` with `Accepted=False`.
async fn refuse(
    ctx: &Ctx,
    migrations: &Api<Migration>,
    m: &Migration,
    why: &str,
    message: &str,
) -> Result<(), Error> {
    refuse_as(ctx, migrations, m, Phase::Failed, reason::FAILED, why, message).await
}

async fn refuse_as(
    ctx: &Ctx,
    migrations: &Api<Migration>,
    m: &Migration,
    phase: Phase,
    event_reason: &'static str,
    why: &str,
    message: &str,
) -> Result<(), Error> {
    let generation = m.metadata.generation.unwrap_or(0);
    let mut s = MigrationStatus {
        target_node: Some(m.spec.target_node.clone()),
        observed_generation: Some(generation),
        ..Default::default()
    };
    if phase == Phase::Failed {
        set_condition(
            &mut s.conditions,
            cond(condition::ACCEPTED, false, why, message, now_nanos(), generation),
        );
    }
    let mut b = StatusBuilder::new(s, generation);
    b.finish(phase, Owner::Source, message);
    write_status(migrations, &m.name_any(), b.status()).await?;
    record(&ctx.client, &ctx.config.node_name, m, true, event_reason, message).await;
    Ok(())
}

async fn write_status(migrations: &Api<Migration>, name: &str, s: &MigrationStatus) -> Result<(), Error> {
    migrations
        .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": s })))
        .await
        .map(|_| ())
        .map_err(api(format!("write the status of Migration {name}")))
}

/// Records an Event regarding the Migration (best effort: a refusal is a warning in the log).
async fn record(client: &Client, node: &str, m: &Migration, warning: bool, reason: &str, note: &str) {
    let ns = m.namespace().unwrap_or_default();
    let now = std::time::SystemTime::now();
    let nanos = crate::convert::unix_nanos(now);
    let mut note = note.to_owned();
    if note.len() > 1024 {
        let mut cut = 1024;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event: Result<KubeEvent, _> = serde_json::from_value(json!({
        "metadata": {"name": format!("{}.{nanos:x}", m.name_any()), "namespace": ns},
        "eventTime": rfc3339_micros(now),
        "regarding": {"apiVersion": "katamaran.io/v1alpha1", "kind": "Migration", "namespace": ns, "name": m.name_any(), "uid": m.uid()},
        "action": "Migrate",
        "reason": reason,
        "note": note,
        "type": if warning { "Warning" } else { "Normal" },
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": node,
    }));
    let result = match event {
        Ok(e) => Api::<KubeEvent>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &e)
            .await
            .map(|_| ()),
        Err(e) => Err(kube::Error::SerdeError(e)),
    };
    if let Err(e) = result {
        tracing::warn!(migration = %m.name_any(), reason, error = %e, "cannot record a Kubernetes Event");
    }
}

enum Mode {
    /// Accepted now: resolve, prepare, start.
    Start(Box<MigrationOptions>),
    /// Accepted by this node's previous agent: report how the engine ended it.
    PickUp,
}

fn spawn(ctx: &Arc<Ctx>, m: &Migration, uid: &str, mode: Mode) {
    let (tx, rx) = watch::channel(m.spec.cancel || m.metadata.deletion_timestamp.is_some());
    if let Ok(mut r) = ctx.running.lock() {
        if r.contains_key(uid) {
            return;
        }
        r.insert(uid.to_owned(), Running { cancel: tx });
    }
    let (ctx, m, uid) = (ctx.clone(), m.clone(), uid.to_owned());
    tokio::spawn(async move {
        let ns = m.namespace().unwrap_or_default();
        let migrations: Api<Migration> = Api::namespaced(ctx.client.clone(), &ns);
        let result = match mode {
            Mode::Start(options) => drive(&ctx, &migrations, &m, &uid, *options, rx).await,
            Mode::PickUp => pick_up(&ctx, &migrations, &m, &uid, rx).await,
        };
        if let Err(e) = result {
            tracing::error!(migration = %m.name_any(), namespace = %ns, error = %crate::migration::error::chain(&e), "the Migration's status could not be written");
        }
        if let Ok(mut r) = ctx.running.lock() {
            r.remove(&uid);
        }
        // The terminal status (or the failure to write it) is seen by the watch; a retry of the
        // finalizer's removal comes from there.
    });
}

/// Progress of a running migration, sent to the status writer.
enum Update {
    Note(String),
    Event(Side, Box<pb::MigrationEvent>),
}

struct ToWriter(mpsc::UnboundedSender<Update>);

impl Progress for ToWriter {
    fn note(&mut self, line: &str) {
        let _ = self.0.send(Update::Note(line.to_owned()));
    }
    fn event(&mut self, side: Side, event: &pb::MigrationEvent) {
        let _ = self.0.send(Update::Event(side, Box::new(event.clone())));
    }
    fn finish(&mut self) {}
}

/// Writes the status as updates come: at once for a phase change or a figure, at most every
/// [`STATUS_EVERY`] for progress. Returns the builder once the sender is gone.
async fn writer(
    migrations: Api<Migration>,
    name: String,
    mut b: StatusBuilder,
    mut rx: mpsc::UnboundedReceiver<Update>,
) -> StatusBuilder {
    let mut last_write: Option<Instant> = None;
    let mut dirty = false;
    loop {
        let wait = match (dirty, last_write) {
            (true, Some(t)) => STATUS_EVERY.saturating_sub(t.elapsed()),
            (true, None) => Duration::ZERO,
            (false, _) => Duration::from_secs(3600),
        };
        tokio::select! {
            u = rx.recv() => match u {
                Some(Update::Note(line)) => { b.note(&line); dirty = true; }
                Some(Update::Event(side, e)) => { b.event(side, &e); dirty = true; }
                None => return b,
            },
            () = tokio::time::sleep(wait), if dirty => {}
        }
        let due = last_write.is_none_or(|t| t.elapsed() >= STATUS_EVERY);
        if dirty && (b.take_urgent() || due) {
            if let Err(e) = write_status(&migrations, &name, b.status()).await {
                tracing::warn!(migration = %name, error = %crate::migration::error::chain(&e), "cannot write the Migration's progress");
            }
            last_write = Some(Instant::now());
            dirty = false;
        }
    }
}

fn accepted(m: &Migration, me: &str, message: &str) -> MigrationStatus {
    let generation = m.metadata.generation.unwrap_or(0);
    let at = now_nanos();
    let mut s = MigrationStatus {
        phase: Some(Phase::Preparing),
        owner: Some(Owner::Source),
        source_node: Some(me.to_owned()),
        target_node: Some(m.spec.target_node.clone()),
        observed_generation: Some(generation),
        message: Some(message.to_owned()),
        start_time: Some(time(at)),
        ..Default::default()
    };
    s.phases.push(katamaran_api::v1alpha1::PhaseTiming {
        phase: Phase::Preparing,
        start_time: super::status::micro_time(at),
        end_time: None,
    });
    set_condition(
        &mut s.conditions,
        cond(condition::ACCEPTED, true, condition::VALIDATED, message, at, generation),
    );
    s
}

async fn local_agent(ctx: &Ctx) -> Result<Agent, String> {
    let path = &ctx.config.local_socket;
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| format!("connect {}: {e}", path.display()))?;
    Ok(Agent::over_stream(stream, &ctx.config.node_name))
}

/// Why a migration was refused before anything was created, as a condition reason.
fn refusal_reason(e: &resolve::Error) -> &'static str {
    match e {
        resolve::Error::NodeNotFound { .. } | resolve::Error::NoAgent { .. } => condition::TARGET_UNAVAILABLE,
        _ if e.is_refusal() => condition::POD_NOT_MIGRATABLE,
        _ => condition::TARGET_UNAVAILABLE,
    }
}

async fn drive(
    ctx: &Ctx,
    migrations: &Api<Migration>,
    m: &Migration,
    uid: &str,
    options: MigrationOptions,
    cancel: watch::Receiver<bool>,
) -> Result<(), Error> {
    let ns = m.namespace().unwrap_or_default();
    let name = m.name_any();
    let generation = m.metadata.generation.unwrap_or(0);
    let me = ctx.config.node_name.clone();
    let Some(id) = migration_id(uid) else { return Err(Error::Malformed(name)) };

    // Everything that can refuse the request, before anything is created on a node.
    let resolver = Resolver::new(ctx.client.clone(), ctx.config.agent_namespace.clone());
    let checked = async {
        let resolved = resolver
            .resolve(&ns, &m.spec.pod, &m.spec.target_node, &ctx.config.runtime_class)
            .await
            .map_err(|e| (refusal_reason(&e), e.to_string()))?;
        options
            .validate(&resolved.pod.ips, Some((resolved.source.address, resolved.destination.address)))
            .map_err(|e| (condition::INVALID_OPTIONS, e.to_string()))?;
        Ok::<_, (&str, String)>(resolved)
    };
    let resolved = match checked.await {
        Ok(r) => r,
        Err((why, message)) => return refuse(ctx, migrations, m, why, &message).await,
    };
    let message =
        format!("moving pod {ns}/{} from {me} to {} (migration {id})", m.spec.pod, m.spec.target_node);
    let status = accepted(m, &me, &message);
    write_status(migrations, &name, &status).await?;
    record(&ctx.client, &me, m, false, reason::STARTED, &message).await;
    let mut builder = StatusBuilder::new(status, generation);

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.agent_namespace);
    let agents = async {
        let source = local_agent(ctx).await?;
        let sandboxes = source.list_sandboxes().await.map_err(|e| e.to_string())?;
        let sandbox_id =
            resolve::match_sandbox(&sandboxes, &resolved.pod).map_err(|e| e.to_string())?.id.clone();
        let sandbox = source.inspect(&sandbox_id).await.map_err(|e| e.to_string())?;
        let destination = Agent::connect(
            &pods,
            &ctx.config.agent_namespace,
            &resolved.destination.agent_pod,
            &resolved.destination.node,
            ctx.config.agent_port,
            &ctx.config.tls,
        )
        .await
        .map_err(|e| format!("{:#}", anyhow_chain(&e)))?;
        Ok::<_, String>((source, destination, sandbox))
    };
    // Nothing is created on a node before PrepareIncoming: a cancel until then ends it here.
    let mut stop = cancel.clone();
    let agents = tokio::select! {
        a = agents => a,
        asked = async { stop.wait_for(|c| *c).await.is_ok() } => {
            if asked {
                let message = format!("cancelled before the nodes were asked for anything; the VM runs on node {me}");
                builder.finish(Phase::Cancelled, Owner::Source, &message);
                return finish(ctx, migrations, m, builder, reason::CANCELLED, &message).await;
            }
            std::future::pending().await
        }
    };
    let (source, destination, sandbox) = match agents {
        Ok(a) => a,
        Err(message) => {
            builder.finish(Phase::Failed, Owner::Source, &message);
            return finish(ctx, migrations, m, builder, reason::FAILED, &message).await;
        }
    };
    let plan = Plan { route: orchestrate::Route::of(&resolved), options, sandbox, migration_id: id.clone() };
    let settings = Settings {
        timeout: None,
        wait_forwarding: true,
        cancel_grace: orchestrate::DEFAULT_CANCEL_GRACE,
        stopped_by: "the Migration (spec.cancel, or its deletion)",
        stop_hint: "",
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let writing = tokio::spawn(writer(migrations.clone(), name.clone(), builder, rx));
    let mut progress = ToWriter(tx);
    let report = orchestrate::run(&plan, &source, &destination, &settings, cancel, &mut progress).await;
    drop(progress);
    let builder = writing.await.map_err(|_| Error::Writer(name.clone()))?;
    conclude(ctx, migrations, m, builder, report.map_err(|e| format!("{:#}", anyhow_chain(&e)))).await
}

/// The chain of an error's sources, one line.
fn anyhow_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::migration::error::chain(e)
}

/// Turns how the run ended into the terminal status and Event.
async fn conclude(
    ctx: &Ctx,
    migrations: &Api<Migration>,
    m: &Migration,
    mut b: StatusBuilder,
    report: Result<Report, String>,
) -> Result<(), Error> {
    let committed = b.status().owner == Some(Owner::Destination);
    let (phase, owner, event, message) = match &report {
        Ok(r) => {
            let refused = r.tracker.stop().is_some() && r.outcome == Outcome::Succeeded;
            if refused {
                record(
                    &ctx.client,
                    &ctx.config.node_name,
                    m,
                    true,
                    reason::CANCEL_REFUSED,
                    "the cancel came after the commit point: the VM belongs to the target node and the migration completed",
                )
                .await;
            }
            match &r.outcome {
                Outcome::Succeeded => {
                    let figures = b
                        .status()
                        .downtime
                        .as_ref()
                        .and_then(|d| d.guest_pause_microseconds.map(|g| (g, d.qemu_microseconds)))
                        .map(|(g, q)| {
                            let q = q
                                .map(|q| {
                                    format!(", QEMU downtime {}", katamaran_api::v1alpha1::format_micros(q))
                                })
                                .unwrap_or_default();
                            format!("; guest pause {}{q}", katamaran_api::v1alpha1::format_micros(g))
                        })
                        .unwrap_or_default();
                    (
                        Phase::Completed,
                        Owner::Destination,
                        reason::COMPLETED,
                        format!(
                            "the VM runs on node {}{figures} (migration {})",
                            m.spec.target_node, r.migration_id
                        ),
                    )
                }
                Outcome::Cancelled => (
                    Phase::Cancelled,
                    Owner::Source,
                    reason::CANCELLED,
                    format!(
                        "cancelled; the VM runs on node {} (migration {})",
                        ctx.config.node_name, r.migration_id
                    ),
                ),
                Outcome::Failed { message, .. } => {
                    let owner = if committed { Owner::Destination } else { Owner::Source };
                    let node = if committed { &m.spec.target_node } else { &ctx.config.node_name };
                    (Phase::Failed, owner, reason::FAILED, format!("{message}; the VM runs on node {node}"))
                }
            }
        }
        Err(e) => {
            let owner = if committed { Owner::Destination } else { Owner::Source };
            (Phase::Failed, owner, reason::FAILED, e.clone())
        }
    };
    b.finish(phase, owner, &message);
    finish(ctx, migrations, m, b, event, &message).await
}

async fn finish(
    ctx: &Ctx,
    migrations: &Api<Migration>,
    m: &Migration,
    b: StatusBuilder,
    event: &'static str,
    message: &str,
) -> Result<(), Error> {
    // The end must reach the API: a few tries, then the periodic reconcile picks it up again.
    let mut tries = 0;
    while let Err(e) = write_status(migrations, &m.name_any(), b.status()).await {
        tries += 1;
        if tries >= FINISH_TRIES {
            return Err(e);
        }
        tracing::warn!(migration = %m.name_any(), error = %crate::migration::error::chain(&e), "cannot write the Migration's end; retrying");
        tokio::time::sleep(RETRY).await;
    }
    record(&ctx.client, &ctx.config.node_name, m, event != reason::COMPLETED, event, message).await;
    // The finalizer goes now that nothing runs; a failure here is retried by the reconcile the
    // status change triggers.
    if let Ok(Some(fresh)) = migrations.get_opt(&m.name_any()).await {
        if fresh.finalizers().iter().any(|f| f == FINALIZER) {
            remove_finalizer(migrations, &fresh).await?;
        }
    }
    Ok(())
}

/// A Migration this node's previous agent accepted: the engine's journal finished or rolled
/// it back at startup (or it still runs); follow this node's side to its end and report it.
async fn pick_up(
    ctx: &Ctx,
    migrations: &Api<Migration>,
    m: &Migration,
    uid: &str,
    mut cancel: watch::Receiver<bool>,
) -> Result<(), Error> {
    let name = m.name_any();
    let generation = m.metadata.generation.unwrap_or(0);
    let Some(id) = migration_id(uid) else { return Err(Error::Malformed(name)) };
    let mut b = StatusBuilder::new(m.status.clone().unwrap_or_default(), generation);
    tracing::info!(migration = %name, %id, "picking up a Migration this node's previous agent started");
    let source = match local_agent(ctx).await {
        Ok(a) => a,
        Err(e) => {
            b.finish(Phase::Failed, Owner::Source, &e);
            return finish(ctx, migrations, m, b, reason::FAILED, &e).await;
        }
    };
    let not_started = format!(
        "the agent of node {} restarted before the source started; the VM stays there and the target gives up its preparation",
        ctx.config.node_name
    );
    let is_not_found =
        |e: &super::transport::Error| e.code() == Some(katamaran_protos::ttrpc::Code::NOT_FOUND);
    let mut tracker = orchestrate::Tracker::new(true);
    let mut cancel_sent = false;
    let mut attempts = 0u32;
    'follow: loop {
        // A NOT_FOUND (at once, or as the stream's first answer) means the engine never started
        // the migration: the destination may have prepared, and its engine gives up on a source
        // that never connects (its connect limit), undoing what it made.
        let mut events = match source.watch(&id).await {
            Ok(ev) => ev,
            Err(e) if is_not_found(&e) => {
                b.finish(Phase::Failed, Owner::Source, &not_started);
                return finish(ctx, migrations, m, b, reason::FAILED, &not_started).await;
            }
            Err(e) => {
                attempts += 1;
                if attempts >= PICK_UP_ATTEMPTS {
                    let message = format!("cannot follow the migration on this node's engine: {e}");
                    b.finish(Phase::Failed, Owner::Source, &message);
                    return finish(ctx, migrations, m, b, reason::FAILED, &message).await;
                }
                tokio::time::sleep(RETRY).await;
                continue 'follow;
            }
        };
        loop {
            tokio::select! {
                r = events.next() => match r {
                    Ok(Some(e)) => {
                        b.event(Side::Source, &e);
                        let p = crate::client::phase(&e);
                        tracker.on_event(Side::Source, e);
                        if p.is_terminal() {
                            break 'follow;
                        }
                        if b.take_urgent() {
                            write_status(migrations, &name, b.status()).await?;
                        }
                    }
                    Err(e) if is_not_found(&e) && tracker.events(Side::Source).is_empty() => {
                        b.finish(Phase::Failed, Owner::Source, &not_started);
                        return finish(ctx, migrations, m, b, reason::FAILED, &not_started).await;
                    }
                    Ok(None) | Err(_) => break 'follow,
                },
                asked = async { cancel.wait_for(|c| *c).await.is_ok() }, if !cancel_sent => {
                    cancel_sent = true;
                    if asked {
                        let answer = source.cancel(&id, "cancelled through the Migration").await.map_err(|e| e.to_string());
                        tracker.on_cancel_answer(Side::Source, answer);
                    }
                }
            }
        }
    }
    let last = tracker.events(Side::Source).last().map(crate::client::phase);
    let report = Report {
        migration_id: id.clone(),
        sandbox_id: String::new(),
        events: Vec::new(),
        destination_sandbox_id: None,
        source_address: String::new(),
        destination_address: None,
        outcome: match last {
            Some(pb::Phase::PHASE_COMPLETED | pb::Phase::PHASE_FORWARDING) => Outcome::Succeeded,
            Some(pb::Phase::PHASE_CANCELLED) => Outcome::Cancelled,
            _ => Outcome::Failed {
                side: Some(Side::Source),
                kind: "LOST".into(),
                message: tracker.events(Side::Source).last().map_or_else(
                    || "the source reported no end".to_owned(),
                    |e| {
                        if e.result.error_message.is_empty() {
                            e.message.clone()
                        } else {
                            e.result.error_message.clone()
                        }
                    },
                ),
            },
        },
        tracker,
        elapsed: Duration::ZERO,
    };
    conclude(ctx, migrations, m, b, Ok(report)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_id_is_the_uid_with_a_prefix_and_a_valid_stream_key() {
        assert_eq!(
            migration_id("0b8d6a5e-6f59-4a43-9d32-1f0c5d0f6b1e").as_deref(),
            Some("k8s-0b8d6a5e-6f59-4a43-9d32-1f0c5d0f6b1e")
        );
        assert_eq!(migration_id("a/b"), None, "a uid outside the id alphabet is refused");
        assert_eq!(migration_id(&"x".repeat(80)), None);
    }

    #[test]
    fn the_resources_defaults_are_the_engines_defaults() {
        let r = katamaran_api::v1alpha1::Options::default().resolve().expect("defaults resolve");
        let o = engine_options(&r);
        let d = MigrationOptions::default();
        assert_eq!(
            (o.storage, o.downtime_limit, o.auto_converge, o.tunnel_mode, o.tunnel_idle_timeout),
            (d.storage, d.downtime_limit, d.auto_converge, d.tunnel_mode, d.tunnel_idle_timeout)
        );
        assert_eq!(
            (o.storage_timeout, o.ram_timeout, o.max_bandwidth, o.plain_streams),
            (d.storage_timeout, d.ram_timeout, d.max_bandwidth, d.plain_streams)
        );
    }
}
