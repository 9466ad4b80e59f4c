//! The commit on the source: after QEMU completed, wait (bounded) for the destination's vote,
//! record the hand-over durably — the commit point — and only then tell the destination to run
//! the VM. After the commit the cleanup stack is disarmed: nothing resumes the source.

use std::net::SocketAddr;
use std::time::Duration;

use super::ram::Done;
use super::{peer_message, Machine, SourceEnv, SourceRequest};
use crate::dataplane::{self, Secret, StreamKey};
use crate::migration::ctl::{self, Ctl, CtlError, CtlMsg, Heartbeat};
use crate::migration::error::EngineError;
use crate::migration::events::{CutoverTimes, Event, Phase, RamProgress};
use crate::migration::failpoint;
use crate::migration::journal::Standing;
use crate::migration::protocol::{Action, SourceInput, SourceState};
use crate::qmp::QmpClient;

/// How long the source waits for the destination to confirm its VM runs before reporting
/// "handed over, destination unconfirmed" (it keeps delivering the decision in the background).
const CONFIRM_LIMIT: Duration = Duration::from_secs(10);
/// How long a destination that does not know the migration is given to (re)register it.
const UNKNOWN_GRACE: Duration = Duration::from_secs(60);

/// Waits for the vote, commits, tells the destination, waits for its confirmation. Returns the
/// cutover's times and QEMU's final RAM figures (when it could read them).
///
/// # Errors
/// Before the commit: a cancel, a lost peer, a failure report or the vote's deadline (the
/// caller rolls back). After the commit this returns `Ok` whatever the destination does.
pub(super) async fn commit(
    req: &SourceRequest,
    qmp: &QmpClient,
    env: &SourceEnv,
    ctl: &mut Ctl,
    machine: &mut Machine,
    done: Done,
) -> Result<(CutoverTimes, Option<RamProgress>), EngineError> {
    let Done { mut times } = done;
    let mut action = machine.step(SourceInput::QemuCompleted)?;
    failpoint::point("source-before-commit").await?;
    // The vote: the destination loaded the state and recorded that it will wait for us.
    let vote_limit = env.heartbeat.timeout;
    let until = tokio::time::Instant::now() + vote_limit;
    while action != Action::Commit {
        tokio::select! {
            msg = ctl.recv() => match msg {
                Ok(CtlMsg::Prepared) => action = machine.step(SourceInput::Voted)?,
                Ok(m) => return Err(peer_message(m, "waiting for the destination's vote")),
                Err(e) => return Err(EngineError::ctl("waiting for the destination's vote")(e)),
            },
            reason = env.gate.token().cancelled() => return Err(EngineError::Cancelled(reason)),
            () = tokio::time::sleep_until(until) => {
                return Err(EngineError::Timeout { what: "waiting for the destination's vote", after: vote_limit })
            }
        }
    }
    // The destination voted: it waits in doubt from here until it hears the decision.
    failpoint::point("source-voted").await?;
    // THE COMMIT POINT: recorded durably, ordered against any cancel by the gate.
    let took = env
        .gate
        .commit(|| env.journal.record(Standing::Source(SourceState::HandedOver), |_| {}))?
        .ok_or_else(|| EngineError::Cancelled(env.gate.token().reason().unwrap_or_default()))?;
    let undo = env.cleanup.disarm();
    tracing::info!(
        journal_us = took.as_micros(),
        disarmed = undo.len(),
        "commit: the VM belongs to the destination"
    );
    env.log.push(Event::new(Phase::Cutover, format!("committed: the VM belongs to {}", req.dest_node)));
    if let Err(e) = failpoint::point("source-after-commit").await {
        tracing::warn!(error = %e, "fail point after the commit");
    }
    let _ = ctl.send(CtlMsg::Commit);
    let confirmed = tokio::time::timeout(CONFIRM_LIMIT, async {
        loop {
            match ctl.recv().await {
                Ok(CtlMsg::Resumed) => return Ok(()),
                Ok(CtlMsg::CancelRequest(_)) => {
                    let _ =
                        ctl.send(CtlMsg::CancelRefused("the VM already belongs to the destination".into()));
                }
                Ok(other) => tracing::debug!(%other, "ignored after the commit"),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match confirmed {
        Ok(Ok(())) => {
            times.resumed_seen_unix_nanos = crate::convert::unix_nanos(std::time::SystemTime::now());
            machine.step(SourceInput::Resumed)?;
            if let Err(e) = env.journal.record(Standing::Source(SourceState::Confirmed), |_| {}) {
                tracing::warn!(error = %e, "cannot record the confirmation");
            }
        }
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {CONFIRM_LIMIT:?}"),
            };
            tracing::warn!(%why, "handed over, destination unconfirmed: delivering the decision in the background");
            env.log.push(Event::new(Phase::Cutover, format!("handed over, destination unconfirmed ({why})")));
            let (endpoint, secret, id, journal, hb) = (
                req.ram_endpoint,
                req.secret.clone(),
                req.migration_id.clone(),
                env.journal.clone(),
                env.heartbeat,
            );
            let node = env.node.clone();
            tokio::spawn(async move {
                if deliver_decision(node, endpoint, &secret, &id, CtlMsg::Commit, hb).await.is_ok() {
                    let _ = journal.record(Standing::Source(SourceState::Confirmed), |_| {});
                }
            });
        }
    }
    let ram = match crate::migration::qemu::compute::final_statistics(qmp).await {
        Ok(info) => {
            times.downtime_ms = info.downtime.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            Some(crate::migration::qemu::compute::ram_progress(&info))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read QEMU's final statistics");
            None
        }
    };
    Ok((times, ram))
}

/// Delivers a recorded decision (`commit` or `abort`) to the destination over a new control
/// stream, retrying until it is acknowledged (`resumed` for a commit, the stream's orderly end
/// for an abort) or the destination says it knows nothing of the migration.
///
/// # Errors
/// [`EngineError::Data`] when the destination refuses the stream (the migration is unknown
/// there: it already ended).
pub async fn deliver_decision(
    node: std::sync::Arc<crate::net::NetnsHandle>,
    endpoint: SocketAddr,
    secret: &Secret,
    migration_id: &str,
    decision: CtlMsg,
    heartbeat: Heartbeat,
) -> Result<(), EngineError> {
    let key = StreamKey::new(migration_id, ctl::STREAM)?;
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        match super::dial(node.clone(), endpoint, secret, &key, Duration::from_secs(5)).await {
            Ok(stream) => {
                let mut c = Ctl::new(stream, heartbeat);
                // Written before anything is read: the connection may be dropped right after the
                // destination's first answer.
                let _ = c.deliver(decision.clone(), Duration::from_secs(2)).await;
                // The destination says its vote again first; a commit is acknowledged by
                // `resumed`, an abort by anything or the stream's orderly end.
                let answer = tokio::time::timeout(CONFIRM_LIMIT, async {
                    loop {
                        match c.recv().await {
                            Ok(CtlMsg::Prepared) if matches!(decision, CtlMsg::Commit) => continue,
                            other => return other,
                        }
                    }
                })
                .await;
                match (&decision, answer) {
                    (CtlMsg::Commit, Ok(Ok(CtlMsg::Resumed))) => return Ok(()),
                    (CtlMsg::Abort(_), Ok(Ok(_) | Err(CtlError::Closed))) => return Ok(()),
                    (_, other) => tracing::debug!(?other, "decision not acknowledged yet"),
                }
            }
            // A destination that restarts registers the migration again once it has read its
            // journal: unknown for a while is not unknown for good.
            Err(dataplane::Error::Rejected { .. }) if started.elapsed() < UNKNOWN_GRACE => {
                tracing::debug!("destination does not know the migration yet; retrying the decision");
            }
            Err(dataplane::Error::Rejected { .. }) => {
                return Err(EngineError::Precondition(format!(
                    "the destination no longer knows migration {migration_id}"
                )))
            }
            Err(e) => tracing::debug!(error = %e, "destination unreachable; retrying the decision"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
