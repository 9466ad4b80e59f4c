//! The client side of the `Migration` service: reaching an endpoint, and driving one migration
//! between a source and a destination endpoint (prepare, start, watch both, cancel both).
//!
//! `katactl` uses it against unix sockets on one node; `kubectl-migrate` against port-forward
//! streams. The transport is whatever byte stream reaches the service.

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use katamaran_protos::protobuf::MessageField;
use katamaran_protos::ttrpc;
use katamaran_protos::v1 as pb;
use tokio::sync::mpsc;

use crate::convert::options_to_proto;
use crate::dataplane::Secret;
use crate::migration::options::{MigrationOptions, OptionsError};

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
    /// The request is wrong before anything was touched.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The sandbox description lacks something the migration needs.
    #[error("source sandbox {sandbox}: {what}")]
    Sandbox {
        /// Sandbox id.
        sandbox: String,
        /// What is missing or wrong.
        what: String,
    },
    /// The secret could not be generated.
    #[error(transparent)]
    Secret(#[from] crate::dataplane::Error),
    /// The caller cancelled while the destination prepared: the source never started.
    #[error("cancelled before the migration started: the VM stayed on the source; the destination removed what it prepared")]
    CancelledBeforeStart,
    /// A watch stream ended before its terminal event.
    #[error("the {0} stopped reporting before the migration ended")]
    WatchEnded(&'static str),
}

impl ClientError {
    /// Whether the caller made a usage error (exit code 2) rather than the migration failing.
    pub fn is_usage(&self) -> bool {
        match self {
            ClientError::Endpoint(_) | ClientError::Options(_) | ClientError::Sandbox { .. } => true,
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

/// Which side an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source node.
    Source,
    /// The destination node.
    Destination,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Sandbox on the source endpoint.
    pub sandbox_id: String,
    /// Migration id (unique per migration).
    pub migration_id: String,
    /// Options.
    pub options: MigrationOptions,
    /// Source node address when the source endpoint does not report one.
    pub source_address: Option<IpAddr>,
    /// Deadline of each unary RPC.
    pub rpc_timeout: Duration,
}

/// How a driven migration ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Migration id.
    pub migration_id: String,
    /// The source sandbox as inspected.
    pub sandbox: pb::Sandbox,
    /// The destination's answer to PrepareIncoming.
    pub prepared: pb::PrepareIncomingResponse,
    /// Every event from both sides, in arrival order.
    pub events: Vec<(Side, pb::MigrationEvent)>,
    /// Wall time of the whole drive.
    pub elapsed: Duration,
    /// Whether the caller's cancel fired.
    pub cancelled_by_caller: bool,
    /// The source's refusal of the caller's cancel (the migration was past its commit point).
    pub cancel_refused: Option<String>,
}

/// Whether a side's part is over for a client: its terminal event, or for the source
/// FORWARDING — the VM runs on the destination and the forward lives on until idle.
pub fn is_end(side: Side, p: pb::Phase) -> bool {
    p.is_terminal() || (side == Side::Source && p == pb::Phase::PHASE_FORWARDING)
}

fn is_success(p: pb::Phase) -> bool {
    matches!(p, pb::Phase::PHASE_COMPLETED | pb::Phase::PHASE_FORWARDING)
}

impl Summary {
    /// The event that ended a side's part (see [`is_end`]).
    pub fn terminal(&self, side: Side) -> Option<&pb::MigrationEvent> {
        self.events.iter().rev().find(|(s, e)| *s == side && is_end(side, phase(e))).map(|(_, e)| e)
    }

    /// Whether both sides succeeded.
    pub fn succeeded(&self) -> bool {
        [Side::Source, Side::Destination]
            .iter()
            .all(|s| self.terminal(*s).is_some_and(|e| is_success(phase(e))))
    }

    /// The first failure message, if any.
    pub fn failure(&self) -> Option<String> {
        [Side::Source, Side::Destination].iter().find_map(|s| {
            let e = self.terminal(*s)?;
            (!is_success(phase(e))).then(|| {
                let msg =
                    if e.result.error_message.is_empty() { &e.message } else { &e.result.error_message };
                format!("{}: {}", s.name(), msg)
            })
        })
    }

    /// The latest cutover times reported by a side.
    pub fn cutover(&self, side: Side) -> Option<&pb::CutoverTimes> {
        self.events
            .iter()
            .rev()
            .find(|(s, e)| *s == side && e.cutover.is_some())
            .and_then(|(_, e)| e.cutover.as_ref())
    }

    /// Time spent in each phase on a side, from event timestamps, in phase order.
    pub fn phase_durations(&self, side: Side) -> Vec<(pb::Phase, Duration)> {
        let evs: Vec<&pb::MigrationEvent> =
            self.events.iter().filter(|(s, _)| *s == side).map(|(_, e)| e).collect();
        let mut out: Vec<(pb::Phase, Duration)> = Vec::new();
        for w in evs.windows(2) {
            let (a, b) = (w[0], w[1]);
            let d = Duration::from_nanos(b.timestamp_unix_nanos.saturating_sub(a.timestamp_unix_nanos));
            let p = phase(a);
            match out.last_mut() {
                Some((last, acc)) if *last == p => *acc += d,
                _ => out.push((p, d)),
            }
        }
        out
    }
}

/// The phase of an event (UNSPECIFIED for values newer than this client).
pub fn phase(e: &pb::MigrationEvent) -> pb::Phase {
    e.phase.enum_value().unwrap_or(pb::Phase::PHASE_UNSPECIFIED)
}

fn rpc(rpc: &'static str, side: Side) -> impl FnOnce(ttrpc::Error) -> ClientError {
    move |source| ClientError::Rpc { rpc, side: side.name(), source }
}

/// Drives one migration: Inspect the source, PrepareIncoming on the destination, StartMigration
/// on the source, then Watch both until each reaches a terminal event. A cancel goes to the
/// source only: it owns the VM until the commit point and tells the destination (past the
/// commit it refuses, and the migration completes). `on_event` sees every event as it arrives.
///
/// # Errors
/// [`ClientError`] when a step before the watch fails (after undoing what was prepared);
/// failures during the migration are in the returned [`Summary`].
pub async fn drive(
    source: &pb::MigrationClient,
    dest: &pb::MigrationClient,
    plan: &Plan,
    mut on_event: impl FnMut(Side, &pb::MigrationEvent),
    cancel: impl Future<Output = ()>,
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    let mut req = pb::InspectRequest::new();
    req.sandbox_id = plan.sandbox_id.clone();
    let sandbox = source.inspect(ctx(plan.rpc_timeout), &req).await.map_err(rpc("Inspect", Side::Source))?;
    let vm_addrs = vm_addresses(&sandbox)?;
    let source_address = match (sandbox.node_address.parse::<IpAddr>(), plan.source_address) {
        (_, Some(a)) => a,
        (Ok(a), None) => a,
        (Err(_), None) => {
            return Err(ClientError::Sandbox {
                sandbox: sandbox.id.clone(),
                what: "the source endpoint reports no node address; pass the source node's address".into(),
            })
        }
    };
    plan.options.validate(&vm_addrs, None)?;
    let secret = Secret::generate()?;
    let options = options_to_proto(&plan.options);

    let mut prep = pb::PrepareIncomingRequest::new();
    prep.migration_id = plan.migration_id.clone();
    prep.secret = secret.expose().to_vec();
    prep.source_qemu_argv = sandbox.qemu_argv.clone();
    prep.source_sandbox = MessageField::some(sandbox.clone());
    prep.options = MessageField::some(options.clone());
    prep.source_node_address = source_address.to_string();
    tokio::pin!(cancel);
    // A cancel while the destination prepares (QEMU starting, streams opening) goes to the
    // destination, the only side that knows the migration yet; the source is never started.
    let prepared = {
        let prepare = dest.prepare_incoming(ctx(plan.rpc_timeout), &prep);
        tokio::pin!(prepare);
        tokio::select! {
            r = &mut prepare => r.map_err(rpc("PrepareIncoming", Side::Destination))?,
            () = &mut cancel => {
                cancel_side(dest, &plan.migration_id, "cancelled by the user", plan.rpc_timeout).await;
                // The preparation gives up and undoes itself; one that finished first is
                // cancelled again now that it is registered as receiving.
                if prepare.await.is_ok() {
                    cancel_side(dest, &plan.migration_id, "cancelled by the user", plan.rpc_timeout).await;
                }
                return Err(ClientError::CancelledBeforeStart);
            }
        }
    };
    if let Ok(dst) = prepared.destination_node_address.parse::<IpAddr>() {
        if let Err(e) = plan.options.validate(&vm_addrs, Some((source_address, dst))) {
            cancel_side(dest, &plan.migration_id, "invalid options", plan.rpc_timeout).await;
            return Err(e.into());
        }
    }

    // Watch the destination before starting, so nothing it reports is missed.
    let (tx, mut rx) = mpsc::unbounded_channel();
    spawn_watch(dest, Side::Destination, &plan.migration_id, tx.clone()).await;

    let mut start = pb::StartMigrationRequest::new();
    start.sandbox_id = plan.sandbox_id.clone();
    start.migration_id = plan.migration_id.clone();
    start.secret = secret.expose().to_vec();
    start.destination_node_address = prepared.destination_node_address.clone();
    start.endpoints = prepared.endpoints.clone();
    start.options = MessageField::some(options);
    if let Err(e) = source.start_migration(ctx(plan.rpc_timeout), &start).await {
        cancel_side(dest, &plan.migration_id, "source refused to start", plan.rpc_timeout).await;
        return Err(rpc("StartMigration", Side::Source)(e));
    }
    spawn_watch(source, Side::Source, &plan.migration_id, tx).await;

    let mut events = Vec::new();
    let mut done = [false, false];
    let mut cancelled_by_caller = false;
    let mut cancel_refused = None;
    while !(done[0] && done[1]) {
        let next = tokio::select! {
            ev = rx.recv() => ev,
            () = &mut cancel, if !cancelled_by_caller => {
                cancelled_by_caller = true;
                if let Err(e) = cancel_source(source, &plan.migration_id, "cancelled by the user", plan.rpc_timeout).await {
                    cancel_refused = Some(e);
                }
                continue;
            }
        };
        let Some((side, ev)) = next else { break };
        match ev {
            Some(ev) => {
                on_event(side, &ev);
                if is_end(side, phase(&ev)) {
                    done[side as usize] = true;
                }
                events.push((side, ev));
            }
            None => {
                // The stream ended without a terminal event: that side is gone.
                done[side as usize] = true;
                tracing::warn!(side = side.name(), "watch ended early");
            }
        }
    }
    Ok(Summary {
        migration_id: plan.migration_id.clone(),
        sandbox,
        prepared,
        events,
        elapsed: started.elapsed(),
        cancelled_by_caller,
        cancel_refused,
    })
}

/// Asks the source (the owner until the commit point) to cancel. `Err` carries the refusal:
/// past the commit the VM belongs to the destination and the migration completes.
///
/// # Errors
/// The source's answer when it refused (FAILED_PRECONDITION past the commit).
pub async fn cancel_source(
    source: &pb::MigrationClient,
    id: &str,
    reason: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut req = pb::CancelRequest::new();
    req.migration_id = id.to_owned();
    req.reason = reason.to_owned();
    match source.cancel(ctx(timeout), &req).await {
        Ok(_) => Ok(()),
        Err(e @ ttrpc::Error::RpcStatus(_)) if matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::FAILED_PRECONDITION) => {
            Err(rpc_text(&e))
        }
        Err(e) => {
            tracing::debug!(error = %e, "cancel not delivered");
            Ok(())
        }
    }
}

type EventTx = mpsc::UnboundedSender<(Side, Option<pb::MigrationEvent>)>;

async fn spawn_watch(client: &pb::MigrationClient, side: Side, id: &str, tx: EventTx) {
    let mut req = pb::WatchRequest::new();
    req.migration_id = id.to_owned();
    // The watch lives as long as the migration: no deadline on the stream itself.
    let stream = client.watch(ttrpc::context::with_timeout(0), &req).await;
    tokio::spawn(async move {
        let Ok(mut stream) = stream else {
            let _ = tx.send((side, None));
            return;
        };
        loop {
            match stream.recv().await {
                Ok(Some(ev)) => {
                    let terminal = is_end(side, phase(&ev));
                    let _ = tx.send((side, Some(ev)));
                    if terminal {
                        return;
                    }
                }
                Ok(None) | Err(_) => {
                    let _ = tx.send((side, None));
                    return;
                }
            }
        }
    });
}

/// Cancels one side, logging (not failing) when it refuses: it may have ended already.
pub async fn cancel_side(client: &pb::MigrationClient, id: &str, reason: &str, timeout: Duration) {
    let mut req = pb::CancelRequest::new();
    req.migration_id = id.to_owned();
    req.reason = reason.to_owned();
    if let Err(e) = client.cancel(ctx(timeout), &req).await {
        tracing::debug!(error = %e, "cancel refused");
    }
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

    #[test]
    fn phase_durations_follow_timestamps() {
        let mk = |p: pb::Phase, t: u64| {
            let mut e = pb::MigrationEvent::new();
            e.phase = p.into();
            e.timestamp_unix_nanos = t * 1_000_000;
            (Side::Source, e)
        };
        let s = Summary {
            migration_id: "m".into(),
            sandbox: pb::Sandbox::new(),
            prepared: pb::PrepareIncomingResponse::new(),
            events: vec![
                mk(pb::Phase::PHASE_PREPARING, 0),
                mk(pb::Phase::PHASE_RAM, 10),
                mk(pb::Phase::PHASE_RAM, 30),
                mk(pb::Phase::PHASE_CUTOVER, 50),
                mk(pb::Phase::PHASE_COMPLETED, 51),
            ],
            elapsed: Duration::ZERO,
            cancelled_by_caller: false,
            cancel_refused: None,
        };
        let d = s.phase_durations(Side::Source);
        assert_eq!(
            d,
            vec![
                (pb::Phase::PHASE_PREPARING, Duration::from_millis(10)),
                (pb::Phase::PHASE_RAM, Duration::from_millis(40)),
                (pb::Phase::PHASE_CUTOVER, Duration::from_millis(1)),
            ]
        );
        assert!(!s.succeeded(), "no destination terminal event");
    }
}
