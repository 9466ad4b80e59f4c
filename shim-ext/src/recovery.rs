//! What a (re)starting agent does with the journals of migrations its predecessor left
//! unfinished: the ownership protocol's answer for [`SourceInput::Restarted`] and
//! [`DestInput::Restarted`] in every state.
//!
//! | journal                         | outcome on start                                            |
//! |---------------------------------|-------------------------------------------------------------|
//! | source before the commit        | roll back: QEMU's migration ended, `cont`, routes restored, tunnel removed, `abort` delivered |
//! | source `handed-over`            | the source stays paused; `commit` re-delivered until the destination confirms, then the incoming sandbox the VM left here (if any) is removed; the forward is watched again (node.rs) |
//! | source `confirmed` (forwarding) | the forward is watched again; an incoming sandbox the VM left here is removed (node.rs) |
//! | destination `preparing`         | roll back: the incoming QEMU killed, netns, tunnel and directory removed |
//! | destination `voted` (in doubt)  | the paused copy is kept; the source's re-delivered decision is awaited on the data listener ([`await_decision`]) and carried out |
//! | destination `committed`         | the owner finishes: `cont`, plug released                   |
//! | anything ended                  | listed, nothing to do                                       |
//!
//! [`SourceInput::Restarted`]: crate::migration::protocol::SourceInput::Restarted
//! [`DestInput::Restarted`]: crate::migration::protocol::DestInput::Restarted

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::dataplane::Secret;
use crate::migration::ctl::{CtlMsg, Heartbeat};
use crate::migration::error::{chain, EngineError};
use crate::migration::journal::{self, DestRecord, Journal, Record, SourceRecord, Standing};
use crate::migration::protocol::{Action, DestInput, DestState, SourceInput, SourceState};
use crate::migration::source;
use crate::net::{LinkId, NetOps, NetnsHandle, NetnsRoots, PlugAction};
use crate::qmp::{QmpClient, QmpConfig};

/// What recovery did with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The record as it is now.
    pub record: Record,
    /// What happened, for the migration's event.
    pub outcome: String,
}

/// Finishes or rolls back every unfinished migration in `journal`.
pub async fn recover(
    journal: &Arc<Journal>,
    node: &Arc<NetnsHandle>,
    heartbeat: Heartbeat,
) -> Vec<Recovered> {
    let records = match journal.load_all() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %chain(&e), "cannot read the migration journal");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for mut record in records {
        if record.standing.is_terminal() {
            out.push(Recovered { outcome: record.message.clone(), record });
            continue;
        }
        let span =
            tracing::info_span!("recovery", id = %record.migration_id, state = record.standing.as_str());
        let _enter = span.enter();
        let outcome = match record.standing {
            Standing::Source(state) => recover_source(&mut record, state, node, heartbeat, journal).await,
            Standing::Destination(state) => recover_destination(&mut record, state, node).await,
        };
        let outcome = outcome.unwrap_or_else(|e| format!("recovery failed: {}", chain(&e)));
        tracing::warn!(%outcome, "recovered after a restart");
        record.message = outcome.clone();
        if let Err(e) = journal.write(&record) {
            tracing::error!(error = %chain(&e), "cannot record the recovery");
        }
        out.push(Recovered { record, outcome });
    }
    out
}

async fn recover_source(
    record: &mut Record,
    state: SourceState,
    node: &Arc<NetnsHandle>,
    heartbeat: Heartbeat,
    journal: &Arc<Journal>,
) -> Result<String, EngineError> {
    let (next, action) = state.step(SourceInput::Restarted)?;
    let details = record.source.clone().unwrap_or_default();
    let secret = journal::from_hex(&record.secret_hex).map(Secret::new).transpose()?;
    match action {
        Action::RollBack => {
            // The decision is abort whatever the local rollback meets: the destination (in doubt
            // after its vote) is told first, so it never waits on a rollback that failed here.
            record.standing = Standing::Source(next);
            if let (Some(endpoint), Some(secret)) = (details.ctl_endpoint, secret) {
                let (id, hb, node) = (record.migration_id.clone(), heartbeat, node.clone());
                tokio::spawn(async move {
                    let abort =
                        CtlMsg::Abort("cancelled: the source agent restarted before the commit".into());
                    let _ = tokio::time::timeout(
                        Duration::from_secs(60),
                        source::deliver_decision(node, endpoint, &secret, &id, abort, hb),
                    )
                    .await;
                });
            }
            roll_back_source(&details, node).await?;
            Ok("the source agent restarted before the commit: rolled back, the source VM runs".into())
        }
        Action::Redeliver => {
            if let (Some(endpoint), Some(secret)) = (details.ctl_endpoint, secret) {
                let (id, hb, node) = (record.migration_id.clone(), heartbeat, node.clone());
                let (journal, sandbox_id, started) =
                    (journal.clone(), record.sandbox_id.clone(), record.started_unix_nanos);
                tokio::spawn(async move {
                    match source::deliver_decision(node.clone(), endpoint, &secret, &id, CtlMsg::Commit, hb)
                        .await
                    {
                        Ok(()) => {
                            // Confirmed: recorded, and an incoming sandbox the VM left here is
                            // a husk, removed as after an uninterrupted move.
                            let current = journal
                                .load_all()
                                .ok()
                                .and_then(|all| all.into_iter().find(|r| r.migration_id == id));
                            if let Some(mut r) =
                                current.filter(|r| r.standing == Standing::Source(SourceState::HandedOver))
                            {
                                r.standing = Standing::Source(SourceState::Confirmed);
                                r.message =
                                    "handed over before the restart; the destination confirmed".into();
                                if let Err(e) = journal.write(&r) {
                                    tracing::warn!(error = %chain(&e), "cannot record the confirmation");
                                }
                            }
                            crate::node::retire_incoming(&journal, &sandbox_id, &node, started).await;
                        }
                        Err(e) => tracing::warn!(error = %chain(&e), "commit not delivered"),
                    }
                });
            }
            Ok("handed over before the restart: the source stays paused, the commit is delivered again"
                .into())
        }
        _ => Ok(format!("nothing to do in state {}", state.as_str())),
    }
}

/// Puts the source back the way it was: QEMU's migration ended and the VM running, the VM
/// routes into the sandbox, the forward's tunnel gone, the migration's sockets removed.
async fn roll_back_source(details: &SourceRecord, node: &NetnsHandle) -> Result<(), EngineError> {
    let (qmp, _events) = QmpClient::connect(&details.qmp_socket, &QmpConfig::default()).await?;
    source::resume_before_commit(&qmp, Duration::from_secs(30)).await?;
    for r in &details.original_routes {
        node.replace_route(&r.to_spec()).await?;
    }
    if let Some((index, name)) = &details.tunnel {
        if let Err(e) = node.delete_link(&LinkId { index: *index, name: name.clone() }).await {
            if !e.is_not_found() {
                return Err(e.into());
            }
        }
    }
    remove_dir(&details.state_dir);
    Ok(())
}

async fn recover_destination(
    record: &mut Record,
    state: DestState,
    node: &NetnsHandle,
) -> Result<String, EngineError> {
    let (next, action) = state.step(DestInput::Restarted)?;
    let details = record.destination.clone().unwrap_or_default();
    match action {
        Action::RollBack => {
            roll_back_destination(record, &details, node).await?;
            record.standing = Standing::Destination(next);
            Ok("the destination agent restarted before its vote: its copy was destroyed".into())
        }
        Action::Resume => {
            resume_destination(&details).await?;
            record.standing = Standing::Destination(DestState::Running);
            Ok("committed before the restart: the VM was resumed here".into())
        }
        Action::AwaitDecision => {
            Ok("in doubt after the restart: the paused copy is kept; nothing destroys or runs it".into())
        }
        _ => Ok(format!("nothing to do in state {}", state.as_str())),
    }
}

/// Destroys an incoming sandbox from its record: QEMU (only if the pid is still the one that
/// runs in that sandbox's directory), the netns (its veth pair and routes go with it), the
/// decap tunnel, the directories (state, disks); then the node routes the sandbox's replaced
/// come back (unless something else routes those addresses by then).
pub async fn roll_back_destination(
    record: &Record,
    details: &DestRecord,
    node: &NetnsHandle,
) -> Result<(), EngineError> {
    if details.qemu_pid > 0 && process_runs_in(details.qemu_pid, &details.state_dir) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(i32::try_from(details.qemu_pid).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGKILL);
        let _ = crate::pidfd::wait_exit(details.qemu_pid).await;
    }
    let cgroup = crate::host::cgroup::vm_cgroup_name(&record.sandbox_id, &record.migration_id);
    if let Err(e) = crate::host::placement::remove_vm_cgroup(cgroup).await {
        tracing::warn!(error = %e, "cannot remove the VM's cgroup");
    }
    if !details.netns.as_os_str().is_empty() && details.netns.exists() {
        crate::net::remove_netns(&details.netns)?;
    }
    if let Some(name) = &details.decap_tunnel {
        match node.link(name).await {
            Ok(link) => node.delete_link(&link.id).await?,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    remove_dir(&details.state_dir);
    remove_dir(&details.disks_dir);
    // The sandbox's routes went with its veth; what they replaced comes back.
    for r in &details.replaced_routes {
        crate::migration::network::restore_replaced(node, &r.to_spec()).await?;
    }
    Ok(())
}

/// The owner's resume after a restart: `cont` if paused, the plug released.
async fn resume_destination(details: &DestRecord) -> Result<(), EngineError> {
    let (qmp, _events) =
        QmpClient::connect(&details.state_dir.join("qmp.sock"), &QmpConfig::default()).await?;
    let status = qmp.query_status().await?;
    tracing::info!(status = status.status.as_str(), "resuming the committed VM");
    if !status.running {
        qmp.cont().await?;
    }
    if details.plugged {
        // Through the VM's own view of its namespace: the bind mount may not be visible to this
        // process (a restarted agent in a private mount namespace).
        let via_qemu = std::path::PathBuf::from(format!("/proc/{}/ns/net", details.qemu_pid));
        let path = if details.qemu_pid > 0 && via_qemu.exists() { via_qemu } else { details.netns.clone() };
        let roots = NetnsRoots {
            dirs: path.parent().map(|p| vec![p.to_owned()]).unwrap_or_default(),
            proc: Some("/proc".into()),
        };
        let ns = NetnsHandle::open_in(&path, &roots)?;
        let tap = ns.link(&details.tap).await?;
        ns.plug_action(&tap.id, PlugAction::ReleaseIndefinite).await?;
    }
    Ok(())
}

/// Whether `pid` is a process whose command line names `dir` (a recycled pid is left alone).
/// Whether `pid` is a QEMU whose command line names the sandbox directory `dir` (a pid reused
/// by another process is not).
pub(crate) fn process_runs_in(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let needle = dir.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

fn remove_dir(dir: &Path) {
    if dir.as_os_str().is_empty() {
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove");
        }
    }
}

/// The destination in doubt after a restart: waits on the data listener for the source's
/// re-delivered decision and carries it out — `commit`: resume here, answer `resumed`;
/// `abort`: destroy this copy. Returns what happened.
///
/// # Errors
/// When the listener cannot take the migration's control stream.
pub async fn await_decision(
    record: Record,
    listener: &crate::dataplane::DataListener,
    journal: &Journal,
    node: &NetnsHandle,
    heartbeat: Heartbeat,
) -> Result<String, EngineError> {
    use crate::migration::ctl::Ctl;
    let secret = journal::from_hex(&record.secret_hex)
        .map(Secret::new)
        .transpose()?
        .ok_or_else(|| EngineError::Precondition("the journal holds no usable secret".into()))?;
    let details = record.destination.clone().unwrap_or_default();
    let mut expected = listener.expect(&record.migration_id, secret, &[crate::migration::ctl::STREAM])?;
    tracing::info!(id = %record.migration_id, "in doubt: waiting for the source's decision");
    let mut record = record;
    loop {
        let stream = expected.accept(crate::migration::ctl::STREAM, Duration::from_secs(24 * 3600)).await?;
        let mut ctl = Ctl::new(stream, heartbeat);
        // The source may re-send its decision only to a voter: say the vote again.
        let _ = ctl.send(CtlMsg::Prepared);
        let decision = loop {
            match ctl.recv().await {
                Ok(m @ (CtlMsg::Commit | CtlMsg::Abort(_))) => break Some(m),
                Ok(_) => continue,
                Err(e) => {
                    tracing::info!(error = %e, "decision stream ended; waiting for another");
                    break None;
                }
            }
        };
        tracing::info!(?decision, "decision received");
        tracing::info!(?decision, "decision received");
        let outcome = match decision {
            Some(CtlMsg::Commit) => {
                record.standing = Standing::Destination(DestState::Committed);
                journal.write(&record)?;
                resume_destination(&details).await?;
                let _ = ctl.deliver(CtlMsg::Resumed, Duration::from_secs(2)).await;
                record.standing = Standing::Destination(DestState::Running);
                "the source's commit arrived after the restart: the VM was resumed here"
            }
            Some(_) => {
                roll_back_destination(&record, &details, node).await?;
                record.standing = Standing::Destination(DestState::RolledBack);
                "the source's abort arrived after the restart: this copy was destroyed"
            }
            None => continue,
        };
        record.message = outcome.to_owned();
        journal.write(&record)?;
        return Ok(outcome.to_owned());
    }
}
