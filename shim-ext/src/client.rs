//! The client side of the `Migration` service: reaching an endpoint (`unix:///path`,
//! `tcp://host:port`), deadlines, errors as a person reads them, and the small facts every caller
//! reads from a sandbox. Driving a migration between two agents is
//! [`crate::cluster::orchestrate`]'s, for every caller.

use std::net::IpAddr;
use std::time::Duration;

use katamaran_protos::ttrpc;
use katamaran_protos::v1 as pb;

/// Failures of a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint string is not `unix:///path` or `tcp://host:port`.
    #[error("invalid endpoint {0:?}: expected unix:///path/to.sock or tcp://host:port")]
    Endpoint(String),
    /// Connecting failed.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An RPC failed.
    #[error("{rpc} on the {side}: {}", rpc_text(source))]
    Rpc {
        /// The RPC name.
        rpc: &'static str,
        /// "source" or "destination".
        side: &'static str,
        /// The ttrpc error (its status carries the server's message).
        source: ttrpc::Error,
    },
    /// The sandbox description lacks something the migration needs.
    #[error("source sandbox {sandbox}: {what}")]
    Sandbox {
        /// Sandbox id.
        sandbox: String,
        /// What is missing or wrong.
        what: String,
    },
}

impl ClientError {
    /// Whether the caller made a usage error (exit code 2) rather than the migration failing.
    pub fn is_usage(&self) -> bool {
        match self {
            ClientError::Endpoint(_) | ClientError::Sandbox { .. } => true,
            ClientError::Rpc { source: ttrpc::Error::RpcStatus(s), .. } => {
                matches!(
                    s.code(),
                    ttrpc::Code::INVALID_ARGUMENT | ttrpc::Code::NOT_FOUND | ttrpc::Code::FAILED_PRECONDITION
                )
            }
            _ => false,
        }
    }
}

/// A ttrpc error as a person reads it: `NOT_FOUND: sandbox x not found`.
pub fn rpc_text(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

/// Connects to `unix:///path` or `tcp://host:port`.
///
/// # Errors
/// [`ClientError::Endpoint`] for a malformed endpoint, [`ClientError::Connect`] when nothing
/// answers.
pub async fn connect(endpoint: &str) -> Result<pb::MigrationClient, ClientError> {
    let io = |source| ClientError::Connect { endpoint: endpoint.to_owned(), source };
    let socket = if let Some(path) = endpoint.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(ClientError::Endpoint(endpoint.into()));
        }
        ttrpc::r#async::transport::Socket::new(tokio::net::UnixStream::connect(path).await.map_err(io)?)
    } else if let Some(addr) = endpoint.strip_prefix("tcp://") {
        ttrpc::r#async::transport::Socket::new(tokio::net::TcpStream::connect(addr).await.map_err(io)?)
    } else {
        return Err(ClientError::Endpoint(endpoint.into()));
    };
    Ok(pb::MigrationClient::new(ttrpc::r#async::Client::new(socket)))
}

/// A ttrpc context with a deadline.
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

/// The phase of an event (UNSPECIFIED for values newer than this client).
pub fn phase(e: &pb::MigrationEvent) -> pb::Phase {
    e.phase.enum_value().unwrap_or(pb::Phase::PHASE_UNSPECIFIED)
}

/// The VM's addresses as the source reports them.
///
/// # Errors
/// [`ClientError::Sandbox`] when an address does not parse or none is reported.
pub fn vm_addresses(s: &pb::Sandbox) -> Result<Vec<IpAddr>, ClientError> {
    let addrs: Result<Vec<IpAddr>, _> =
        s.network.addresses.iter().map(|a| a.address.parse::<IpAddr>()).collect();
    let addrs = addrs
        .map_err(|e| ClientError::Sandbox { sandbox: s.id.clone(), what: format!("bad VM address: {e}") })?;
    if addrs.is_empty() {
        return Err(ClientError::Sandbox { sandbox: s.id.clone(), what: "no VM address reported".into() });
    }
    Ok(addrs)
}

/// A fresh migration id: `mig-` and 12 hex digits of randomness.
///
/// # Errors
/// When the kernel has no randomness to give.
pub fn new_migration_id() -> Result<String, crate::dataplane::Error> {
    let bytes = crate::dataplane::handshake::random_bytes::<6>()?;
    Ok(format!("mig-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_are_checked() {
        for bad in ["/run/x.sock", "unix://relative.sock", "http://x"] {
            assert!(matches!(connect(bad).await, Err(ClientError::Endpoint(_))), "{bad}");
        }
        let err = connect("unix:///nonexistent/katamaran.sock").await.err().expect("refused");
        assert!(err.to_string().contains("/nonexistent/katamaran.sock"), "{err}");
        assert!(!err.is_usage());
    }

    #[test]
    fn migration_ids_are_valid_stream_keys() {
        let id = new_migration_id().expect("id");
        assert!(id.starts_with("mig-") && id.len() == 16, "{id}");
        crate::dataplane::handshake::validate_migration_id(&id).expect("valid");
        assert_ne!(id, new_migration_id().expect("id"));
    }
}
