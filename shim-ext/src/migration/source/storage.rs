//! STORAGE on the source: per local disk, one NBD stream handed to QEMU and one
//! `blockdev-mirror`, until every mirror is in sync. A cancel, a destination's cancel request or
//! a lost peer ends it.
//!
//! The stream goes straight to the destination QEMU's NBD server, which accepts on a gate
//! (`dataplane::gate`): this side binds its socket, names the port on the authenticated control
//! stream, and connects once the destination admitted it. No relay copies the disk's bytes on
//! either side.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use super::{peer_message, SourceEnv, SourceRequest, CONNECT_TIMEOUT};
use crate::dataplane::tls::Endpoint;
use crate::migration::ctl::{Ctl, CtlMsg};
use crate::migration::error::EngineError;
use crate::migration::events::{Event, Phase};
use crate::migration::options::MigrationOptions;
use crate::migration::qemu::{self, mirror, DiskInfo, EventBus, MirrorJob, NbdAddress, TlsCreds};
use crate::net::NetnsHandle;
use crate::qmp::QmpClient;

/// Mirrors `disks` to the destination (over TLS unless the streams are plain); returns the jobs once every one is ready.
///
/// # Errors
/// A mirror's failure, [`EngineError::Cancelled`], the control stream's end.
pub(super) async fn mirror(
    req: &SourceRequest,
    qmp: &QmpClient,
    bus: &EventBus,
    disks: &[DiskInfo],
    options: &MigrationOptions,
    env: &SourceEnv,
    ctl: &mut Ctl,
) -> Result<Vec<MirrorJob>, EngineError> {
    let (log, cleanup) = (&env.log, &env.cleanup);
    log.push(Event::new(Phase::Storage, format!("mirroring {} disk(s) to {}", disks.len(), req.dest_node)));
    // The credentials object the run added when the streams are encrypted.
    let tls = req.stream_tls.as_ref().map(|_| TlsCreds::of(&req.migration_id, Endpoint::Client));
    let mut jobs = Vec::new();
    for disk in disks {
        let endpoint = *req
            .nbd_endpoints
            .get(&disk.drive_id)
            .ok_or_else(|| EngineError::Invalid(format!("no NBD endpoint for {}", disk.drive_id)))?;
        // QEMU's NBD client takes the admitted connection itself, and the destination QEMU's
        // NBD server accepted it: nothing between them copies a byte.
        let fd_name = qemu::storage::qemu_id("kmr-nbd-fd-", &disk.drive_id);
        let stream = admitted_stream(&env.node, ctl, endpoint).await?;
        let stream = stream
            .into_std()
            .map_err(EngineError::io(format!("detach the NBD stream of {}", disk.drive_id)))?;
        qmp.getfd(&fd_name, stream.as_fd()).await?;
        drop(stream);
        {
            // QEMU's NBD client takes the descriptor when `blockdev-add` connects; until then (a
            // refused `blockdev-add`, a cancel in between) it stays with the monitor, open.
            let (q, name) = (qmp.clone(), fd_name.clone());
            cleanup.push(format!("release descriptor {fd_name}"), move || async move {
                if let Err(error) = q.closefd(&name).await {
                    tracing::debug!(%error, fd = %name, "descriptor already taken by QEMU");
                }
                Ok::<(), String>(())
            });
        }
        let job =
            mirror::start_mirror(qmp, disk, &NbdAddress::Fd(fd_name.clone()), &disk.drive_id, tls.as_ref())
                .await?;
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
    crate::migration::failpoint::point("source-storage").await?;
    let mut sub = bus.subscribe();
    let log2 = log.clone();
    let ready = tokio::select! {
        r = mirror::wait_ready(qmp, &mut sub, &jobs, options.storage_timeout, |p| {
            let mut e = Event::new(Phase::Storage, "mirroring");
            e.storage = Some(p.to_vec());
            log2.push(e);
        }) => r?,
        reason = env.gate.token().cancelled() => return Err(EngineError::Cancelled(reason)),
        msg = ctl.recv() => {
            return Err(match msg {
                Ok(m) => peer_message(m, "mirroring"),
                Err(e) => EngineError::ctl("mirroring")(e),
            })
        }
    };
    let mut e = Event::new(Phase::Storage, "every mirror is in sync");
    e.storage = Some(ready);
    log.push(e);
    Ok(jobs)
}

/// A TCP connection to the destination's NBD gate `gate`, from a socket in the node's namespace:
/// bound to a port first, the port admitted over the control stream, then connected.
///
/// # Errors
/// The socket's, the control stream's or the connection's failure, the destination's refusal
/// ([`EngineError::DiskStreamRefused`]), [`EngineError::Timeout`].
async fn admitted_stream(
    node: &Arc<NetnsHandle>,
    ctl: &mut Ctl,
    gate: SocketAddr,
) -> Result<tokio::net::TcpStream, EngineError> {
    const DURING: &str = "admitting a disk stream";
    let fd = crate::host::netns::tcp_socket_in(node, gate)
        .await
        .map_err(|e| EngineError::io("create the NBD socket")(std::io::Error::other(e)))?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    // Any local address: the route to the gate picks the one the control stream uses, which
    // is the address the destination admits.
    let any =
        if gate.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
    socket.bind(SocketAddr::new(any, 0)).map_err(EngineError::io("bind the NBD socket"))?;
    let port = socket.local_addr().map_err(EngineError::io("read the NBD socket's port"))?.port();
    ctl.send(CtlMsg::NbdAdmit(port)).map_err(EngineError::ctl(DURING))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, ctl.recv()).await {
        Ok(Ok(CtlMsg::NbdAdmitted(p))) if p == port => {}
        Ok(Ok(CtlMsg::StorageError(why))) => return Err(EngineError::DiskStreamRefused(why)),
        Ok(Ok(m)) => return Err(peer_message(m, DURING)),
        Ok(Err(e)) => return Err(EngineError::ctl(DURING)(e)),
        Err(_) => return Err(EngineError::Timeout { what: DURING, after: CONNECT_TIMEOUT }),
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(gate))
        .await
        .map_err(|_| EngineError::Timeout { what: "connecting a disk stream", after: CONNECT_TIMEOUT })?
        .map_err(EngineError::io(format!("connect the NBD stream to {gate}")))?;
    crate::dataplane::bound_dead_peer(&stream);
    Ok(stream)
}
