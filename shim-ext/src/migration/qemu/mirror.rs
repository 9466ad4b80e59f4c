//! The source's half of the storage phase: one mirror job per drive into the destination's NBD
//! export.
//!
//! Each drive gets an NBD client node (`blockdev-add`, driver `nbd`) and a `blockdev-mirror`
//! (`sync: full`) into it. `drive-mirror` with an `nbd+unix://` target would also work on 7.2,
//! but `blockdev-add` takes a QAPI `SocketAddress`, so the same code accepts a descriptor handed
//! over with `getfd` (`{"type": "fd"}`, DESIGN.md decision 6) where a URI cannot; and the target
//! is a named node we create and delete ourselves, so cleanup can check that none is left.
//! Both commands exist unchanged from QEMU 2.9 to the current release.
//!
//! Consistency (DESIGN.md, storage ordering): at the `pre-switchover` pause the vCPUs are
//! stopped, so a soft `block-job-cancel` of a READY mirror copies what is still dirty and ends
//! with `BLOCK_JOB_COMPLETED`; the target then holds exactly the source's content.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use crate::migration::events::DriveProgress;
use crate::qmp::{ErrorClass, QmpClient, QmpEvent};

use super::bus::{EventBus, Subscription, WaitError};
use super::disks::DiskInfo;
use super::error::QemuError;
use super::storage::{qemu_id, NbdAddress};
use super::tls::TlsCreds;

/// How often `query-block-jobs` is polled for progress while mirrors copy.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// How long a job that left `query-block-jobs` gets for its final event to arrive, which
/// carries QEMU's error text.
const VANISHED_GRACE: Duration = Duration::from_secs(1);

/// One running mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorJob {
    /// The drive id.
    pub drive_id: String,
    /// The block job id, `kmr-mirror-<drive>`.
    pub job_id: String,
    /// The NBD client node the mirror writes to, `kmr-nbd-<drive>`.
    pub target_node: String,
    /// The NBD export it is connected to.
    pub export_name: String,
}

/// What a block-job event says about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `BLOCK_JOB_READY`: in sync, mirroring new writes.
    Ready {
        /// Bytes to copy.
        len: u64,
        /// Bytes copied.
        offset: u64,
    },
    /// `BLOCK_JOB_COMPLETED`, with QEMU's error text if it failed.
    Completed {
        /// The failure, if any.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`: ended without the target being in sync.
    Cancelled,
    /// `BLOCK_JOB_ERROR`: an I/O error; the job's error policy decides what follows.
    IoError {
        /// `read` or `write`.
        operation: String,
        /// What QEMU does about it (`report`, `stop`, `ignore`).
        action: String,
    },
}

/// Reads a block-job event: the job id (`device`) and what happened. Other events give `None`.
pub fn job_event(event: &QmpEvent) -> Option<(&str, JobEvent)> {
    let job = event.data_str("device")?;
    let number = |member: &str| event.data.get(member).and_then(Value::as_u64).unwrap_or(0);
    let text = |member: &str| event.data_str(member).unwrap_or_default().to_owned();
    let what = match event.name.as_str() {
        "BLOCK_JOB_READY" => JobEvent::Ready { len: number("len"), offset: number("offset") },
        "BLOCK_JOB_COMPLETED" => JobEvent::Completed { error: event.data_str("error").map(str::to_owned) },
        "BLOCK_JOB_CANCELLED" => JobEvent::Cancelled,
        "BLOCK_JOB_ERROR" => JobEvent::IoError { operation: text("operation"), action: text("action") },
        _ => return None,
    };
    Some((job, what))
}

/// Connects an NBD client node to the destination's export and starts mirroring `disk` into
/// it. If the mirror cannot start, the client node is removed again.
///
/// # Errors
///
/// [`QemuError::TargetAdd`] or [`QemuError::MirrorStart`].
pub async fn start_mirror(
    qmp: &QmpClient,
    disk: &DiskInfo,
    address: &NbdAddress,
    export_name: &str,
    tls: Option<&TlsCreds>,
) -> Result<MirrorJob, QemuError> {
    let job = MirrorJob {
        drive_id: disk.drive_id.clone(),
        job_id: qemu_id("kmr-mirror-", &disk.drive_id),
        target_node: qemu_id("kmr-nbd-", &disk.drive_id),
        export_name: export_name.to_owned(),
    };
    let mut target = json!({
        "driver": "nbd",
        "node-name": job.target_node,
        "server": address.to_qapi(),
        "export": export_name,
    });
    if let Some(creds) = tls {
        target["tls-creds"] = json!(creds.id);
        if let Some(name) = creds.hostname() {
            target["tls-hostname"] = json!(name);
        }
    }
    qmp.execute("blockdev-add", Some(target))
        .await
        .map_err(|source| QemuError::TargetAdd { drive: job.drive_id.clone(), source })?;
    // The top node rather than the drive id: drives attached with -blockdev have no drive id.
    let mirror = json!({
        "job-id": job.job_id,
        "device": disk.node_name,
        "target": job.target_node,
        "sync": "full",
    });
    if let Err(source) = qmp.execute("blockdev-mirror", Some(mirror)).await {
        if let Err(error) = delete_target(qmp, &job).await {
            warn!(drive = %job.drive_id, %error, "cannot remove the NBD target after a failed mirror start");
        }
        return Err(QemuError::MirrorStart { drive: job.drive_id, source });
    }
    debug!(drive = %job.drive_id, job = %job.job_id, "mirror started");
    Ok(job)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BlockJobInfo {
    device: String,
    len: u64,
    offset: u64,
    ready: bool,
}

async fn query_jobs(qmp: &QmpClient) -> Result<Vec<BlockJobInfo>, QemuError> {
    let reply =
        qmp.execute("query-block-jobs", None).await.map_err(|source| QemuError::MirrorProgress { source })?;
    serde_json::from_value(reply)
        .map_err(|source| QemuError::UnexpectedReply { command: "query-block-jobs", source })
}

/// Waits until every mirror is in sync (`BLOCK_JOB_READY`), calling `on_progress` with every
/// drive's progress after each `query-block-jobs` poll ([`PROGRESS_INTERVAL`]) and each READY.
/// Subscribe before [`start_mirror`]; a READY that came earlier is still seen through the
/// poll's `ready` flag. Returns the final progress.
///
/// # Errors
///
/// [`QemuError::MirrorNotReady`] at the deadline, [`QemuError::MirrorFailed`] or
/// [`QemuError::MirrorEndedEarly`] when a job ends, [`QemuError::MirrorProgress`],
/// [`QemuError::EventsEnded`].
pub async fn wait_ready(
    qmp: &QmpClient,
    events: &mut Subscription,
    jobs: &[MirrorJob],
    deadline: Duration,
    mut on_progress: impl FnMut(&[DriveProgress]),
) -> Result<Vec<DriveProgress>, QemuError> {
    let mut progress: Vec<DriveProgress> = jobs
        .iter()
        .map(|job| DriveProgress { drive_id: job.drive_id.clone(), ..DriveProgress::default() })
        .collect();
    let index: HashMap<&str, usize> =
        jobs.iter().enumerate().map(|(i, job)| (job.job_id.as_str(), i)).collect();
    let until = Instant::now() + deadline;
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while progress.iter().any(|drive| !drive.ready) {
        tokio::select! {
            event = events.next_until(until, deadline) => {
                let event = event.map_err(|error| not_ready(error, &progress, deadline))?;
                let Some((job, what)) = job_event(&event) else { continue };
                let Some(&i) = index.get(job) else { continue };
                match what {
                    JobEvent::Ready { len, offset } => {
                        let drive = &mut progress[i];
                        (drive.total_bytes, drive.done_bytes, drive.ready) = (len, offset, true);
                        on_progress(&progress);
                    }
                    JobEvent::IoError { operation, action } => {
                        warn!(drive = %jobs[i].drive_id, %operation, %action, "mirror I/O error");
                    }
                    ended => return Err(ended_error(&jobs[i], ended)),
                }
            }
            _ = ticker.tick() => {
                let listed = query_jobs(qmp).await?;
                for (i, job) in jobs.iter().enumerate() {
                    let Some(info) = listed.iter().find(|info| info.device == job.job_id) else {
                        return Err(vanished(events, job).await);
                    };
                    let drive = &mut progress[i];
                    (drive.total_bytes, drive.done_bytes) = (info.len, info.offset);
                    drive.ready |= info.ready;
                }
                on_progress(&progress);
            }
        }
    }
    Ok(progress)
}

fn not_ready(error: WaitError, progress: &[DriveProgress], deadline: Duration) -> QemuError {
    let drives: Vec<&str> =
        progress.iter().filter(|drive| !drive.ready).map(|drive| drive.drive_id.as_str()).collect();
    match error {
        WaitError::Timeout(_) => QemuError::MirrorNotReady { drives: drives.join(", "), deadline },
        WaitError::Ended => QemuError::EventsEnded {
            waiting_for: format!("the mirror of {} to be in sync", drives.join(", ")),
        },
    }
}

fn ended_error(job: &MirrorJob, what: JobEvent) -> QemuError {
    let drive = job.drive_id.clone();
    match what {
        JobEvent::Completed { error: Some(error) } => QemuError::MirrorFailed { drive, error },
        JobEvent::Completed { error: None } => QemuError::MirrorEndedEarly { drive, how: "completed" },
        _ => QemuError::MirrorEndedEarly { drive, how: "cancelled" },
    }
}

/// A job left `query-block-jobs`; its final event (queued, or about to be) says why.
async fn vanished(events: &mut Subscription, job: &MirrorJob) -> QemuError {
    let ended = |event: &QmpEvent| {
        job_event(event).is_some_and(|(id, what)| {
            id == job.job_id && matches!(what, JobEvent::Completed { .. } | JobEvent::Cancelled)
        })
    };
    match events.wait_for(ended, VANISHED_GRACE).await {
        Ok(event) => match job_event(&event) {
            Some((_, what)) => ended_error(job, what),
            None => vanished_silently(job),
        },
        Err(_) => vanished_silently(job),
    }
}

fn vanished_silently(job: &MirrorJob) -> QemuError {
    QemuError::MirrorEndedEarly { drive: job.drive_id.clone(), how: "vanished without an event" }
}

/// At the `pre-switchover` pause: soft-cancels every READY mirror, which copies what is still
/// dirty and ends with `BLOCK_JOB_COMPLETED` (the target is then a consistent copy), then
/// removes the NBD client nodes. Runs inside the VM's downtime, so it only waits on events.
///
/// On error some targets may remain; [`abort`] removes whatever is left.
///
/// # Errors
///
/// [`QemuError::MirrorCancel`], [`QemuError::MirrorFailed`], [`QemuError::MirrorEndedEarly`]
/// (the job was not in sync, so the target is not consistent), [`QemuError::MirrorNotEnded`],
/// [`QemuError::EventsEnded`] or [`QemuError::TargetDel`].
pub async fn complete_consistent(
    qmp: &QmpClient,
    bus: &EventBus,
    jobs: &[MirrorJob],
    deadline: Duration,
) -> Result<(), QemuError> {
    // Subscribed before the first cancel, so no completion can slip past.
    let mut events = bus.subscribe();
    for job in jobs {
        qmp.execute("block-job-cancel", Some(json!({ "device": job.job_id }))).await.map_err(|source| {
            QemuError::MirrorCancel { action: "complete", drive: job.drive_id.clone(), source }
        })?;
    }
    let until = Instant::now() + deadline;
    let mut pending: Vec<&MirrorJob> = jobs.iter().collect();
    while let Some(first) = pending.first() {
        let event = events.next_until(until, deadline).await.map_err(|error| match error {
            WaitError::Timeout(_) => QemuError::MirrorNotEnded { drive: first.drive_id.clone(), deadline },
            WaitError::Ended => QemuError::EventsEnded {
                waiting_for: format!("the mirror of drive {} to complete", first.drive_id),
            },
        })?;
        let Some((id, what)) = job_event(&event) else { continue };
        let Some(position) = pending.iter().position(|job| job.job_id == id) else { continue };
        match what {
            JobEvent::Completed { error: None } => {
                pending.swap_remove(position);
            }
            JobEvent::Ready { .. } | JobEvent::IoError { .. } => {}
            ended => return Err(ended_error(pending[position], ended)),
        }
    }
    for job in jobs {
        delete_target(qmp, job).await?;
    }
    Ok(())
}

async fn delete_target(qmp: &QmpClient, job: &MirrorJob) -> Result<(), QemuError> {
    qmp.execute("blockdev-del", Some(json!({ "node-name": job.target_node }))).await.map_err(|source| {
        QemuError::TargetDel { drive: job.drive_id.clone(), node: job.target_node.clone(), source }
    })?;
    Ok(())
}

/// Failure and cancel path: force-cancels whatever of `jobs` still runs, waits for the jobs to
/// end, and removes their NBD client nodes. Best effort: every step is tried and the first
/// error is returned (the others are logged). Jobs and nodes already gone are skipped, so it can
/// run after a partial [`complete_consistent`] or twice.
///
/// # Errors
///
/// The first of [`QemuError::MirrorProgress`], [`QemuError::MirrorCancel`],
/// [`QemuError::MirrorNotEnded`], [`QemuError::EventsEnded`], [`QemuError::ListNodes`],
/// [`QemuError::TargetDel`].
pub async fn abort(
    qmp: &QmpClient,
    bus: &EventBus,
    jobs: &[MirrorJob],
    deadline: Duration,
) -> Result<(), QemuError> {
    let mut events = bus.subscribe();
    let mut failures = Failures::default();
    let listed: Option<HashSet<String>> = match query_jobs(qmp).await {
        Ok(listed) => Some(listed.into_iter().map(|info| info.device).collect()),
        Err(error) => {
            failures.record(error);
            None
        }
    };
    let mut running: Vec<&MirrorJob> = Vec::new();
    for job in jobs {
        if listed.as_ref().is_some_and(|listed| !listed.contains(&job.job_id)) {
            continue;
        }
        let cancel = json!({ "device": job.job_id, "force": true });
        match qmp.execute("block-job-cancel", Some(cancel)).await {
            Ok(_) => running.push(job),
            // "Block job '…' not found": it ended meanwhile.
            Err(error) if error.class() == Some(&ErrorClass::DeviceNotActive) => {}
            Err(source) => failures.record(QemuError::MirrorCancel {
                action: "abort",
                drive: job.drive_id.clone(),
                source,
            }),
        }
    }
    let until = Instant::now() + deadline;
    while let Some(first) = running.first() {
        match events.next_until(until, deadline).await {
            Ok(event) => {
                if let Some((id, JobEvent::Completed { .. } | JobEvent::Cancelled)) = job_event(&event) {
                    running.retain(|job| job.job_id != id);
                }
            }
            Err(error) => {
                failures.record(match error {
                    WaitError::Timeout(_) => {
                        QemuError::MirrorNotEnded { drive: first.drive_id.clone(), deadline }
                    }
                    WaitError::Ended => QemuError::EventsEnded {
                        waiting_for: format!("the aborted mirror of drive {} to end", first.drive_id),
                    },
                });
                break;
            }
        }
    }
    let nodes = match node_names(qmp).await {
        Ok(nodes) => Some(nodes),
        Err(error) => {
            failures.record(error);
            None
        }
    };
    for job in jobs {
        if nodes.as_ref().is_some_and(|nodes| !nodes.contains(&job.target_node)) {
            continue;
        }
        if let Err(error) = delete_target(qmp, job).await {
            failures.record(error);
        }
    }
    failures.into_result()
}

/// Names of every named block node (`query-named-block-nodes`, `flat` so backing chains are not
/// repeated).
///
/// # Errors
///
/// [`QemuError::ListNodes`] or [`QemuError::UnexpectedReply`].
pub async fn node_names(qmp: &QmpClient) -> Result<HashSet<String>, QemuError> {
    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "kebab-case")]
    struct Node {
        node_name: String,
    }
    let reply = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .map_err(|source| QemuError::ListNodes { source })?;
    let nodes: Vec<Node> = serde_json::from_value(reply)
        .map_err(|source| QemuError::UnexpectedReply { command: "query-named-block-nodes", source })?;
    Ok(nodes.into_iter().map(|node| node.node_name).collect())
}

/// The first error of a best-effort sequence; later ones are logged.
#[derive(Default)]
struct Failures {
    first: Option<QemuError>,
}

impl Failures {
    fn record(&mut self, error: QemuError) {
        warn!(%error, "mirror cleanup step failed");
        self.first.get_or_insert(error);
    }

    fn into_result(self) -> Result<(), QemuError> {
        self.first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Instant as StdInstant, SystemTime};

    fn event(name: &str, data: Value) -> QmpEvent {
        QmpEvent {
            name: name.into(),
            data,
            qemu_timestamp: None,
            received_at: SystemTime::now(),
            received_instant: StdInstant::now(),
        }
    }

    #[test]
    fn block_job_events_are_read() {
        let table = [
            (
                event(
                    "BLOCK_JOB_READY",
                    json!({"device": "j", "len": 10, "offset": 10, "speed": 0, "type": "mirror"}),
                ),
                Some(("j", JobEvent::Ready { len: 10, offset: 10 })),
            ),
            (
                event(
                    "BLOCK_JOB_COMPLETED",
                    json!({"device": "j", "len": 10, "offset": 4, "error": "Input/output error"}),
                ),
                Some(("j", JobEvent::Completed { error: Some("Input/output error".into()) })),
            ),
            (
                event("BLOCK_JOB_COMPLETED", json!({"device": "j", "len": 10, "offset": 10, "new": 1})),
                Some(("j", JobEvent::Completed { error: None })),
            ),
            (event("BLOCK_JOB_CANCELLED", json!({"device": "j"})), Some(("j", JobEvent::Cancelled))),
            (
                event("BLOCK_JOB_ERROR", json!({"device": "j", "operation": "write", "action": "report"})),
                Some(("j", JobEvent::IoError { operation: "write".into(), action: "report".into() })),
            ),
            (event("JOB_STATUS_CHANGE", json!({"id": "j", "status": "ready"})), None),
            (event("STOP", Value::Null), None),
        ];
        for (event, want) in table {
            assert_eq!(job_event(&event), want, "{}", event.name);
        }
    }

    #[test]
    fn ended_jobs_name_the_drive() {
        let job = MirrorJob {
            drive_id: "drive-0".into(),
            job_id: "kmr-mirror-drive-0".into(),
            target_node: "kmr-nbd-drive-0".into(),
            export_name: "drive-0".into(),
        };
        let failed = ended_error(&job, JobEvent::Completed { error: Some("Connection reset".into()) });
        assert_eq!(failed.to_string(), "the mirror of drive drive-0 failed: Connection reset");
        let cancelled = ended_error(&job, JobEvent::Cancelled);
        assert_eq!(
            cancelled.to_string(),
            "the mirror of drive drive-0 ended before it was in sync (cancelled)"
        );
    }
}
