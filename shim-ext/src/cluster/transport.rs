//! The control path to a node: a Kubernetes `pods/portforward` stream into the node's agent pod,
//! mutual TLS over that stream, and ttrpc over TLS (DESIGN.md decision 8). No other route to a
//! node exists: the API server's RBAC decides who may open the stream, and the TLS handshake
//! ([`crate::peer`]) that the caller holds an identity from the cluster CA and that the agent
//! answering is the one of the node the caller resolved, not any pod that listens on the port.
//!
//! [`Agent`] wraps the generated `MigrationClient` with per-call deadlines and errors that name
//! the RPC, the node and, when the port-forward itself broke, the error the API server sent on
//! the port's error channel.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use katamaran_protos::ttrpc::r#async::transport::Socket;
use katamaran_protos::ttrpc::r#async::{Client as TtrpcClient, ClientStreamReceiver};
use katamaran_protos::ttrpc::{self, context, Code};
use katamaran_protos::v1 as pb;
use kube::api::Portforwarder;
use kube::Api;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::peer::PeerTls;

/// Deadline of the quick RPCs (list, inspect, start, cancel): they do no long work on the node.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of `PrepareIncoming`, which starts QEMU and the NBD exports on the destination.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a failed call waits for the port-forward's error message to explain it.
const FORWARD_ERROR_WAIT: Duration = Duration::from_millis(500);
/// What an error carries when the port-forward ended without the API server giving a reason.
const FORWARD_CLOSED: &str = "the API server closed the port-forward without giving a reason";

/// A failure on the control path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed the port-forward upgrade.
    #[error("cannot port-forward to katamaran agent {namespace}/{pod} on node {node}")]
    PortForward {
        /// Agent namespace.
        namespace: String,
        /// Agent pod.
        pod: String,
        /// Node of the agent.
        node: String,
        /// The client's error (a 403 names the missing RBAC permission).
        #[source]
        source: kube::Error,
    },
    /// The port-forward came up without a stream for the agent's port.
    #[error("the port-forward to agent {pod} on node {node} has no stream for port {port}")]
    NoStream {
        /// Agent pod.
        pod: String,
        /// Node of the agent.
        node: String,
        /// Port asked for.
        port: u16,
    },
    /// The TLS handshake with the agent failed: it is not the agent of `node` (another node's,
    /// or no agent), it does not trust our identity, or the port-forward broke.
    #[error(
        "mutual TLS with the katamaran agent of node {node} failed{}",
        forward.as_ref().map(|m| format!(" (port-forward: {m})")).unwrap_or_default()
    )]
    Tls {
        /// Node of the agent.
        node: String,
        /// The port-forward's own error, if it sent one.
        forward: Option<String>,
        /// The handshake's reason.
        #[source]
        source: crate::peer::Error,
    },
    /// An RPC failed; `detail` holds the status code and message, or the transport failure.
    #[error("{rpc} on the katamaran agent of node {node} failed: {detail}")]
    Rpc {
        /// RPC name as in the proto.
        rpc: &'static str,
        /// Node of the agent.
        node: String,
        /// The ttrpc status code when the service answered.
        code: Option<Code>,
        /// Status message or transport error, plus the port-forward's own error if it sent one.
        detail: String,
    },
}

impl Error {
    /// Whether the agent refused the request as given (invalid, not found, wrong state): exit
    /// code 2 rather than 1.
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::Rpc { code: Some(code), .. } => {
                matches!(code, Code::INVALID_ARGUMENT | Code::NOT_FOUND | Code::FAILED_PRECONDITION)
            }
            Error::PortForward { source: kube::Error::Api(s), .. } => s.code == 403,
            _ => false,
        }
    }

    /// The status code, when the service answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => *code,
            _ => None,
        }
    }
}

/// A ttrpc connection to one node's agent.
pub struct Agent {
    node: String,
    client: pb::MigrationClient,
    forward_error: watch::Receiver<Option<String>>,
    forwarder: Option<Portforwarder>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("node", &self.node).finish_non_exhaustive()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The forwarder's task owns the WebSocket; without this it would outlive the client.
        if let Some(f) = &self.forwarder {
            f.abort();
        }
    }
}

impl Agent {
    /// Opens `pods/portforward` to `pod` (the agent on `node`), authenticates it with mutual TLS
    /// as `tls` (its certificate must name `node`) and speaks ttrpc on `port`.
    ///
    /// # Errors
    /// [`Error::PortForward`], [`Error::NoStream`] or [`Error::Tls`].
    pub async fn connect(
        pods: &Api<Pod>,
        namespace: &str,
        pod: &str,
        node: &str,
        port: u16,
        tls: &PeerTls,
    ) -> Result<Self, Error> {
        let mut forwarder = pods.portforward(pod, &[port]).await.map_err(|source| Error::PortForward {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            node: node.to_owned(),
            source,
        })?;
        let stream = forwarder.take_stream(port).ok_or_else(|| Error::NoStream {
            pod: pod.to_owned(),
            node: node.to_owned(),
            port,
        })?;
        let (tx, mut rx) = watch::channel(None);
        if let Some(error) = forwarder.take_error(port) {
            tokio::spawn(async move {
                // `None`: the forwarding task ended without a reason from the API server (the
                // connection closed; kube's client also drops a queued reason when one of its
                // writes meets the closed connection first).
                let message = error.await.unwrap_or_else(|| FORWARD_CLOSED.to_owned());
                tracing::debug!(%message, "port-forward ended");
                // No receiver left means the agent is gone already; nothing to tell.
                let _ = tx.send(Some(message));
            });
        }
        let stream = match tls.connect(stream, node).await {
            Ok(s) => s,
            Err(source) => {
                // A port-forward that broke (nothing listens in the pod) shows up as a closed
                // stream; the API server's reason comes on the error channel a moment later.
                let forward =
                    match tokio::time::timeout(FORWARD_ERROR_WAIT, rx.wait_for(Option::is_some)).await {
                        Ok(Ok(m)) => m.clone(),
                        _ => None,
                    };
                forwarder.abort();
                return Err(Error::Tls { node: node.to_owned(), forward, source });
            }
        };
        let mut agent = Self::over_stream(stream, node);
        agent.forward_error = rx;
        agent.forwarder = Some(forwarder);
        Ok(agent)
    }

    /// Speaks ttrpc over any byte stream, unauthenticated: a root-only unix socket (the local
    /// agent), or a test's in-memory pipe.
    pub fn over_stream(stream: impl AsyncRead + AsyncWrite + Send + Sync + 'static, node: &str) -> Self {
        let client = pb::MigrationClient::new(TtrpcClient::new(Socket::new(stream)));
        Self { node: node.to_owned(), client, forward_error: watch::channel(None).1, forwarder: None }
    }

    /// Speaks through a client already connected ([`crate::client::connect`]: a node's unix
    /// socket); `node` names it in lines and errors.
    pub fn over_client(client: pb::MigrationClient, node: &str) -> Self {
        Self { node: node.to_owned(), client, forward_error: watch::channel(None).1, forwarder: None }
    }

    /// Authenticates the agent of `node` over `stream` with mutual TLS as `tls`, then speaks
    /// ttrpc over it.
    ///
    /// # Errors
    /// [`Error::Tls`].
    pub async fn over_tls_stream(
        stream: impl AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
        node: &str,
        tls: &PeerTls,
    ) -> Result<Self, Error> {
        let stream = tls.connect(stream, node).await.map_err(|source| Error::Tls {
            node: node.to_owned(),
            forward: None,
            source,
        })?;
        Ok(Self::over_stream(stream, node))
    }

    /// The node this agent runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn fail(&self, rpc: &'static str, e: ttrpc::Error) -> Error {
        let (code, mut detail) = match &e {
            ttrpc::Error::RpcStatus(s) => (Some(s.code()), format!("{:?}: {}", s.code(), s.message())),
            other => (None, other.to_string()),
        };
        if code.is_none() {
            // A broken port-forward shows up as a closed socket; the API server's reason comes
            // on the error channel, usually a moment later.
            let mut rx = self.forward_error.clone();
            let message = match tokio::time::timeout(FORWARD_ERROR_WAIT, rx.wait_for(Option::is_some)).await {
                Ok(Ok(msg)) => msg.clone(),
                _ => None,
            };
            if let Some(m) = message {
                detail = format!("{detail} (port-forward: {m})");
            }
        }
        Error::Rpc { rpc, node: self.node.clone(), code, detail }
    }

    /// `ListSandboxes`.
    ///
    /// # Errors
    /// [`Error::Rpc`].
    pub async fn list_sandboxes(&self) -> Result<Vec<pb::Sandbox>, Error> {
        match self
            .client
            .list_sandboxes(context::with_duration(CALL_TIMEOUT), &pb::ListSandboxesRequest::new())
            .await
        {
            Ok(r) => Ok(r.sandboxes),
            Err(e) => Err(self.fail("ListSandboxes", e).await),
        }
    }

    /// `Inspect`.
    ///
    /// # Errors
    /// [`Error::Rpc`].
    pub async fn inspect(&self, sandbox_id: &str) -> Result<pb::Sandbox, Error> {
        let mut req = pb::InspectRequest::new();
        req.sandbox_id = sandbox_id.to_owned();
        match self.client.inspect(context::with_duration(CALL_TIMEOUT), &req).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail("Inspect", e).await),
        }
    }

    /// `PrepareIncoming`.
    ///
    /// # Errors
    /// [`Error::Rpc`].
    pub async fn prepare_incoming(
        &self,
        req: &pb::PrepareIncomingRequest,
    ) -> Result<pb::PrepareIncomingResponse, Error> {
        match self.client.prepare_incoming(context::with_duration(PREPARE_TIMEOUT), req).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail("PrepareIncoming", e).await),
        }
    }

    /// `StartMigration`.
    ///
    /// # Errors
    /// [`Error::Rpc`].
    pub async fn start_migration(
        &self,
        req: &pb::StartMigrationRequest,
    ) -> Result<pb::StartMigrationResponse, Error> {
        match self.client.start_migration(context::with_duration(CALL_TIMEOUT), req).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail("StartMigration", e).await),
        }
    }

    /// `Watch`: the event stream of `migration_id` on this node.
    ///
    /// # Errors
    /// [`Error::Rpc`].
    pub async fn watch(&self, migration_id: &str) -> Result<Events, Error> {
        let mut req = pb::WatchRequest::new();
        req.migration_id = migration_id.to_owned();
        // No deadline: the stream lasts as long as the migration.
        match self.client.watch(context::Context::default(), &req).await {
            Ok(stream) => Ok(Events { stream, agent: self.shallow() }),
            Err(e) => Err(self.fail("Watch", e).await),
        }
    }

    /// `Cancel` with `reason`.
    ///
    /// # Errors
    /// [`Error::Rpc`].
    pub async fn cancel(&self, migration_id: &str, reason: &str) -> Result<pb::CancelResponse, Error> {
        let mut req = pb::CancelRequest::new();
        req.migration_id = migration_id.to_owned();
        req.reason = reason.to_owned();
        match self.client.cancel(context::with_duration(CALL_TIMEOUT), &req).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail("Cancel", e).await),
        }
    }

    /// What an event stream needs to explain its own failures.
    fn shallow(&self) -> Arc<ErrorContext> {
        Arc::new(ErrorContext { node: self.node.clone(), forward_error: self.forward_error.clone() })
    }
}

struct ErrorContext {
    node: String,
    forward_error: watch::Receiver<Option<String>>,
}

/// The events of one migration on one node, as `Watch` streams them.
pub struct Events {
    stream: ClientStreamReceiver<pb::MigrationEvent>,
    agent: Arc<ErrorContext>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("node", &self.agent.node).finish_non_exhaustive()
    }
}

impl Events {
    /// The next event; `None` once the stream has ended.
    ///
    /// # Errors
    /// [`Error::Rpc`] when the stream breaks or the agent answers with a status.
    pub async fn next(&mut self) -> Result<Option<pb::MigrationEvent>, Error> {
        match self.stream.recv().await {
            Ok(e) => Ok(e),
            Err(e) => {
                let (code, mut detail) = match &e {
                    ttrpc::Error::RpcStatus(s) => {
                        (Some(s.code()), format!("{:?}: {}", s.code(), s.message()))
                    }
                    other => (None, other.to_string()),
                };
                if let Some(m) = self.agent.forward_error.borrow().as_ref() {
                    detail = format!("{detail} (port-forward: {m})");
                }
                Err(Error::Rpc { rpc: "Watch", node: self.agent.node.clone(), code, detail })
            }
        }
    }
}
