//! The ttrpc `Migration` service: thin adapters that call the [`Node`] engine and map its
//! errors to ttrpc codes at the edge.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;

use katamaran_protos::protobuf::EnumOrUnknown;
use katamaran_protos::ttrpc::{self, r#async::TtrpcContext};
use katamaran_protos::v1 as pb;

use crate::convert::{error_kind_to_proto, event_to_proto, phase_to_proto};
use crate::migration::error::{chain, EngineError};
use crate::node::Node;
use crate::peer::PeerTls;

/// The service over a node engine.
#[derive(Debug, Clone)]
pub struct MigrationService {
    node: Arc<Node>,
}

impl MigrationService {
    /// Wraps a node.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

impl From<EngineError> for ttrpc::Error {
    fn from(e: EngineError) -> Self {
        error_kind_to_proto(e.kind()).rpc_error(chain(&e))
    }
}

#[katamaran_protos::async_trait]
impl pb::Migration for MigrationService {
    async fn inspect(&self, _ctx: &TtrpcContext, req: pb::InspectRequest) -> ttrpc::Result<pb::Sandbox> {
        Ok(self.node.inspect(&req.sandbox_id).await?)
    }

    async fn list_sandboxes(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::ListSandboxesRequest,
    ) -> ttrpc::Result<pb::ListSandboxesResponse> {
        let mut r = pb::ListSandboxesResponse::new();
        r.sandboxes = self.node.list_sandboxes().await;
        Ok(r)
    }

    async fn list_migrations(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::ListMigrationsRequest,
    ) -> ttrpc::Result<pb::ListMigrationsResponse> {
        let mut r = pb::ListMigrationsResponse::new();
        r.migrations = self.node.list_migrations();
        Ok(r)
    }

    async fn prepare_incoming(
        &self,
        _ctx: &TtrpcContext,
        req: pb::PrepareIncomingRequest,
    ) -> ttrpc::Result<pb::PrepareIncomingResponse> {
        Ok(self.node.prepare_incoming(&req).await?)
    }

    async fn start_migration(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StartMigrationRequest,
    ) -> ttrpc::Result<pb::StartMigrationResponse> {
        let id = self.node.start_migration(&req).await?;
        let mut r = pb::StartMigrationResponse::new();
        r.migration_id = id;
        Ok(r)
    }

    async fn watch(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WatchRequest,
        sink: ttrpc::r#async::ServerStreamSender<pb::MigrationEvent>,
    ) -> ttrpc::Result<()> {
        let (role, mut watcher) = self.node.watch(&req.migration_id)?;
        while let Some(e) = watcher.next().await {
            sink.send(&event_to_proto(&req.migration_id, role, &e)).await?;
        }
        Ok(())
    }

    async fn cancel(&self, _ctx: &TtrpcContext, req: pb::CancelRequest) -> ttrpc::Result<pb::CancelResponse> {
        let (cancelled, phase) = self.node.cancel(&req.migration_id, &req.reason).await?;
        let mut r = pb::CancelResponse::new();
        r.cancelled = cancelled;
        r.phase =
            EnumOrUnknown::new(if cancelled { pb::Phase::PHASE_CANCELLED } else { phase_to_proto(phase) });
        Ok(r)
    }

    async fn release_forward(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReleaseForwardRequest,
    ) -> ttrpc::Result<pb::ReleaseForwardResponse> {
        self.node.release_forward(&req.migration_id).await?;
        Ok(pb::ReleaseForwardResponse::new())
    }

    async fn remove_incoming(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveIncomingRequest,
    ) -> ttrpc::Result<pb::RemoveIncomingResponse> {
        let mut r = pb::RemoveIncomingResponse::new();
        r.message = self.node.remove_incoming(&req.sandbox_id).await?;
        Ok(r)
    }
}

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket path is taken by a live server or cannot be prepared.
    #[error("socket {path}: {why}")]
    Socket {
        /// The path.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// ttrpc failed.
    #[error("ttrpc server: {0}")]
    Ttrpc(#[from] ttrpc::Error),
}

/// Binds a root-only unix socket (mode 0600) for the service. A stale socket file (nothing
/// listening) is replaced; a live one is an error, never stolen.
///
/// Directories missing on the way to the socket are created 0700; an existing directory keeps
/// its mode (`--socket /tmp/x.sock` does not touch `/tmp`). An existing parent that others may
/// write without the sticky bit (group- or world-writable, not `/tmp`-like) is refused: anyone
/// allowed to write there could replace the socket under its clients.
///
/// # Errors
/// [`ServeError::Socket`].
pub fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::DirBuilderExt;

    let fail = |why: String| ServeError::Socket { path: path.to_owned(), why };
    let dir = match path.parent() {
        None => return Err(fail("has no parent directory".into())),
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
    };
    // The directories this call creates, innermost first: only those are made 0700.
    let missing: Vec<&Path> =
        dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    for d in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            // Explicitly, whatever the umask left.
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| fail(format!("cannot restrict {}: {e}", d.display())))?,
            // Created meanwhile by someone else: not ours to change.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(fail(format!("cannot create {}: {e}", d.display()))),
        }
    }
    let mode = std::fs::metadata(dir)
        .map_err(|e| fail(format!("cannot read its directory: {e}")))?
        .permissions()
        .mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(fail(format!(
            "its directory {} is writable by others without the sticky bit (mode {:o}); use a directory \
             only root can write",
            dir.display(),
            mode & 0o7777
        )));
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail("another server is listening on it".into()));
        }
        std::fs::remove_file(path).map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| fail(format!("cannot bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(format!("cannot chmod 0600: {e}")))?;
    Ok(listener)
}

/// Where the service listens.
#[derive(Debug)]
pub enum Endpoint {
    /// A root-only unix socket ([`bind_socket`]): local callers (katactl, the agent's own
    /// controller), authorised by the file's mode.
    Unix(tokio::net::UnixListener),
    /// TCP, for the node agent inside its (non-host-network) pod, reached through the API
    /// server's `pods/portforward`: mutual TLS only. A connection whose client certificate does
    /// not chain to the cluster CA is closed after the handshake and never reaches ttrpc
    /// ([`crate::peer::authenticated`]).
    Tcp {
        /// The listener (127.0.0.1 in the agent's pod).
        listener: tokio::net::TcpListener,
        /// This agent's identity and the CA it trusts.
        tls: PeerTls,
    },
}

/// Serves `service` on every endpoint until `shutdown` resolves.
///
/// # Errors
/// [`ServeError::Ttrpc`].
pub async fn serve(
    service: MigrationService,
    endpoints: Vec<Endpoint>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let service = Arc::new(service);
    let mut servers = Vec::new();
    // Kept until the end: dropping one stops its accept loop.
    let mut acceptors = Vec::new();
    // A ttrpc server runs one listener; one server per endpoint shares the service.
    for ep in endpoints {
        let listener = match ep {
            Endpoint::Unix(l) => ttrpc::r#async::transport::Listener::from(l),
            Endpoint::Tcp { listener, tls } => {
                let (streams, acceptor) =
                    crate::peer::authenticated(crate::peer::tcp_connections(listener), tls);
                acceptors.push(acceptor);
                // ttrpc's accept loop ends when its stream does, and its stop_listen then panics:
                // the stream stays open until the server is stopped.
                ttrpc::r#async::transport::Listener::new(streams.chain(futures::stream::pending()))
            }
        };
        let mut server = ttrpc::r#async::Server::new()
            .add_listener(listener)
            .register_service(pb::create_migration(service.clone()));
        server.start().await?;
        servers.push(server);
    }
    shutdown.await;
    for server in &mut servers {
        stop(server).await;
    }
    drop(acceptors);
    Ok(())
}

async fn stop(server: &mut ttrpc::r#async::Server) {
    // A watch of a migration that is still forwarding never ends by itself: stop listening and
    // give open connections a moment, but do not wait on them.
    server.stop_listen().await;
    if tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await.is_err() {
        tracing::debug!("connections still open at shutdown");
    }
}
