//! A fake katamaran node agent: serves the real `katamaran.v1.Migration` ttrpc service over any
//! byte stream handed to it (here, the fake API server's port-forward streams), records every
//! call in a log shared by all agents (so tests can check the order across nodes), and streams
//! scripted events to watchers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use katamaran_protos::async_trait;
use katamaran_protos::protobuf::MessageField;
use katamaran_protos::ttrpc::r#async::transport::Listener;
use katamaran_protos::ttrpc::r#async::{Server, ServerStreamSender, TtrpcContext};
use katamaran_protos::ttrpc::{self};
use katamaran_protos::v1::*;
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, watch};

/// One recorded call.
#[derive(Debug, Clone)]
pub enum Call {
    ListSandboxes,
    Inspect(InspectRequest),
    PrepareIncoming(PrepareIncomingRequest),
    StartMigration(StartMigrationRequest),
    Watch(WatchRequest),
    Cancel(CancelRequest),
}

impl Call {
    pub fn name(&self) -> &'static str {
        match self {
            Call::ListSandboxes => "ListSandboxes",
            Call::Inspect(_) => "Inspect",
            Call::PrepareIncoming(_) => "PrepareIncoming",
            Call::StartMigration(_) => "StartMigration",
            Call::Watch(_) => "Watch",
            Call::Cancel(_) => "Cancel",
        }
    }
}

/// Calls of every agent, in the order they arrived: `(node, call)`.
#[derive(Debug, Clone)]
pub struct CallLog {
    calls: Arc<Mutex<Vec<(String, Call)>>>,
    changed: watch::Sender<usize>,
}

impl Default for CallLog {
    fn default() -> Self {
        Self { calls: Arc::default(), changed: watch::channel(0).0 }
    }
}

impl CallLog {
    fn push(&self, node: &str, call: Call) {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((node.to_owned(), call));
            calls.len()
        };
        self.changed.send_replace(n);
    }

    pub fn all(&self) -> Vec<(String, Call)> {
        self.calls.lock().unwrap().clone()
    }

    /// `node:Rpc` for each call, in order.
    pub fn names(&self) -> Vec<String> {
        self.all().iter().map(|(n, c)| format!("{n}:{}", c.name())).collect()
    }

    /// Waits (bounded) until `pred` holds for the log.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[(String, Call)]) -> bool) {
        let mut rx = self.changed.subscribe();
        let calls = self.calls.clone();
        let ok = tokio::time::timeout(Duration::from_secs(30), async move {
            loop {
                if pred(&calls.lock().unwrap()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(ok.is_ok(), "timed out waiting for {what}; calls: {:?}", self.names());
    }
}

/// What a migration on this agent does once watched.
#[derive(Debug, Clone)]
pub struct Script {
    /// Events sent in order to the watcher.
    pub events: Vec<MigrationEvent>,
}

impl Script {
    /// Whether the script ends without a terminal event (the migration then waits for Cancel).
    fn hangs(&self) -> bool {
        self.events.last().is_none_or(|e| !e.phase.enum_value().is_ok_and(Phase::is_terminal))
    }
}

struct Migration {
    role: Role,
    latest: Phase,
    cancelled: watch::Sender<Option<String>>,
}

/// Every fake agent's cancel signal per migration id: a source that accepts a cancel tells the
/// destination, as the engine's source does over its control stream.
static PEERS: Mutex<Option<HashMap<String, Vec<CancelSignal>>>> = Mutex::new(None);

/// A migration's cancel signal (the reason once cancelled).
type CancelSignal = watch::Sender<Option<String>>;

/// The fake agent of one node.
pub struct FakeAgent {
    node: String,
    log: CallLog,
    sandboxes: Vec<Sandbox>,
    script: Script,
    address: String,
    refuse_start: Option<(ErrorKind, String)>,
    migrations: Mutex<HashMap<String, Migration>>,
}

impl FakeAgent {
    pub fn new(node: &str, address: &str, log: CallLog, sandboxes: Vec<Sandbox>, script: Script) -> Self {
        Self {
            node: node.into(),
            log,
            sandboxes,
            script,
            address: address.into(),
            refuse_start: None,
            migrations: Mutex::default(),
        }
    }

    /// Answers StartMigration with this error.
    pub fn refusing_start(mut self, kind: ErrorKind, message: &str) -> Self {
        self.refuse_start = Some((kind, message.to_owned()));
        self
    }

    /// Serves the agent on every stream sent to the returned sender, until the server is dropped.
    pub async fn serve(self) -> (mpsc::UnboundedSender<DuplexStream>, Server) {
        let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
        let incoming =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (Ok(s), rx)) });
        let mut server = Server::new()
            .add_listener(Listener::new(incoming))
            .register_service(create_migration(Arc::new(self)));
        server.start().await.unwrap();
        (tx, server)
    }

    fn begin(&self, id: &str, role: Role) -> ttrpc::Result<()> {
        let mut m = self.migrations.lock().unwrap();
        if m.contains_key(id) {
            return Err(
                ErrorKind::ERROR_KIND_FAILED_PRECONDITION.rpc_error(format!("migration {id} already exists"))
            );
        }
        let cancelled = watch::channel(None).0;
        PEERS
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .entry(id.to_owned())
            .or_default()
            .push(cancelled.clone());
        m.insert(id.to_owned(), Migration { role, latest: Phase::PHASE_PREPARING, cancelled });
        Ok(())
    }
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    ErrorKind::ERROR_KIND_NOT_FOUND.rpc_error(format!("{what} {id:?} not found"))
}

#[async_trait]
impl katamaran_protos::v1::Migration for FakeAgent {
    async fn list_sandboxes(
        &self,
        _: &TtrpcContext,
        _: ListSandboxesRequest,
    ) -> ttrpc::Result<ListSandboxesResponse> {
        self.log.push(&self.node, Call::ListSandboxes);
        let mut r = ListSandboxesResponse::new();
        // Listing gives identities; the command line comes with Inspect.
        r.sandboxes = self.sandboxes.iter().map(|s| Sandbox { qemu_argv: vec![], ..s.clone() }).collect();
        Ok(r)
    }

    async fn inspect(&self, _: &TtrpcContext, req: InspectRequest) -> ttrpc::Result<Sandbox> {
        self.log.push(&self.node, Call::Inspect(req.clone()));
        self.sandboxes
            .iter()
            .find(|s| s.id == req.sandbox_id)
            .cloned()
            .ok_or_else(|| not_found("sandbox", &req.sandbox_id))
    }

    async fn prepare_incoming(
        &self,
        _: &TtrpcContext,
        req: PrepareIncomingRequest,
    ) -> ttrpc::Result<PrepareIncomingResponse> {
        self.log.push(&self.node, Call::PrepareIncoming(req.clone()));
        if req.secret.len() < 32 {
            return Err(ErrorKind::ERROR_KIND_INVALID_ARGUMENT.rpc_error("secret shorter than 32 bytes"));
        }
        self.begin(&req.migration_id, Role::ROLE_DESTINATION)?;
        let mut r = PrepareIncomingResponse::new();
        r.destination_sandbox_id = format!("{}-incoming", req.source_sandbox.id);
        let mut e = DestinationEndpoints::new();
        e.ram_endpoint = format!("{}:40001", self.address);
        let mut nbd = NbdEndpoint::new();
        nbd.drive_id = "drive-0".into();
        nbd.endpoint = format!("{}:40002", self.address);
        e.nbd_endpoints.push(nbd);
        r.endpoints = MessageField::some(e);
        r.destination_node_address = self.address.clone();
        if !req.options.plain_streams {
            // The agent's credentials are opaque to the caller, which only carries them on.
            let mut tls = StreamTls::new();
            tls.ca_pem = format!("ca of {}", req.migration_id);
            tls.cert_pem = "client cert".into();
            tls.key_pem = "client key".into();
            r.stream_tls = MessageField::some(tls);
        }
        Ok(r)
    }

    async fn start_migration(
        &self,
        _: &TtrpcContext,
        req: StartMigrationRequest,
    ) -> ttrpc::Result<StartMigrationResponse> {
        self.log.push(&self.node, Call::StartMigration(req.clone()));
        if !self.sandboxes.iter().any(|s| s.id == req.sandbox_id) {
            return Err(not_found("sandbox", &req.sandbox_id));
        }
        if let Some((kind, message)) = &self.refuse_start {
            return Err(kind.rpc_error(message));
        }
        self.begin(&req.migration_id, Role::ROLE_SOURCE)?;
        let mut r = StartMigrationResponse::new();
        r.migration_id = req.migration_id;
        Ok(r)
    }

    async fn watch(
        &self,
        _: &TtrpcContext,
        req: WatchRequest,
        stream: ServerStreamSender<MigrationEvent>,
    ) -> ttrpc::Result<()> {
        self.log.push(&self.node, Call::Watch(req.clone()));
        let (role, mut cancelled) = {
            let m = self.migrations.lock().unwrap();
            let mig = m.get(&req.migration_id).ok_or_else(|| not_found("migration", &req.migration_id))?;
            (mig.role, mig.cancelled.subscribe())
        };
        let mut seq = 0;
        for template in &self.script.events {
            if cancelled.borrow().is_some() {
                break;
            }
            seq += 1;
            let mut e = template.clone();
            e.migration_id = req.migration_id.clone();
            e.role = role.into();
            e.sequence = seq;
            if let Some(m) = self.migrations.lock().unwrap().get_mut(&req.migration_id) {
                m.latest = e.phase.enum_value().unwrap_or(Phase::PHASE_UNSPECIFIED);
            }
            stream.send(&e).await?;
        }
        if !self.script.hangs() && cancelled.borrow().is_none() {
            return Ok(());
        }
        // Wait for Cancel, then report it, as the engine does.
        let reason = match cancelled.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => return Ok(()),
        };
        let mut e = MigrationEvent::new();
        e.migration_id = req.migration_id.clone();
        e.role = role.into();
        e.phase = Phase::PHASE_CANCELLED.into();
        e.timestamp_unix_nanos = super::T0 + 60_000_000_000;
        e.sequence = seq + 1;
        e.message = reason;
        e.result.mut_or_insert_default().error_kind = ErrorKind::ERROR_KIND_CANCELLED.into();
        stream.send(&e).await
    }

    async fn cancel(&self, _: &TtrpcContext, req: CancelRequest) -> ttrpc::Result<CancelResponse> {
        self.log.push(&self.node, Call::Cancel(req.clone()));
        let mut m = self.migrations.lock().unwrap();
        let mig = m.get_mut(&req.migration_id).ok_or_else(|| not_found("migration", &req.migration_id))?;
        let mut r = CancelResponse::new();
        if mig.latest.is_cancellable() {
            mig.latest = Phase::PHASE_CANCELLED;
            if mig.role == Role::ROLE_SOURCE {
                let peers = PEERS.lock().unwrap();
                for peer in peers.as_ref().and_then(|p| p.get(&req.migration_id)).into_iter().flatten() {
                    peer.send_replace(Some(format!("the source cancelled: {}", req.reason)));
                }
            }
            mig.cancelled.send_replace(Some(req.reason));
            r.cancelled = true;
            r.phase = Phase::PHASE_CANCELLED.into();
        } else {
            r.phase = mig.latest.into();
        }
        Ok(r)
    }
}
