//! STORAGE on the source: per local disk, one authenticated NBD stream handed to QEMU and one
//! `blockdev-mirror`, until every mirror is in sync. A cancel, a destination's cancel request or
//! a lost peer ends it.

use std::time::Duration;

use super::{hand_stream_to_qemu, peer_message, SourceEnv, SourceRequest};
use crate::dataplane::tls::Endpoint;
use crate::migration::ctl::Ctl;
use crate::migration::error::EngineError;
use crate::migration::events::{Event, Phase};
use crate::migration::options::MigrationOptions;
use crate::migration::qemu::{self, mirror, DiskInfo, EventBus, MirrorJob, NbdAddress, TlsCreds};
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
        // QEMU's NBD client takes the authenticated connection itself (as the RAM stream), so
        // the source side copies nothing; the destination relays it to its NBD server.
        let fd_name = qemu::storage::qemu_id("kmr-nbd-fd-", &disk.drive_id);
        hand_stream_to_qemu(&env.node, req, qmp, endpoint, &format!("nbd:{}", disk.drive_id), &fd_name)
            .await?;
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
