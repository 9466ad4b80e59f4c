//! The destination's side of the ownership protocol: receive, vote, wait for the source's
//! decision, and — only after a `commit` — run the VM and release the plug.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::streams::CtlEvent;
use super::Incoming;
use crate::convert::unix_nanos;
use crate::migration::ctl::CtlMsg;
use crate::migration::error::EngineError;
use crate::migration::events::{CutoverTimes, Event, EventLog, Phase};
use crate::migration::failpoint;
use crate::migration::journal::{Entry, Standing};
use crate::migration::network;
use crate::migration::protocol::{Action, DestInput, DestState, Owner, ProtocolError};
use crate::qmp::{EventKind, MigrationStatus};

/// How long a cancel asked on the destination waits for the source's verdict.
const VERDICT_LIMIT: Duration = Duration::from_secs(5);
/// How long a cancel before the vote waits for the source's `abort` before this side gives up
/// on its own (it may: the source cannot commit without the vote).
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// How long the owner retries its `cont`.
const RESUME_RETRY_LIMIT: Duration = Duration::from_secs(30);

/// How long a prepared destination waits for the source's control stream: the source connects
/// it right after its own preparation (seconds). A source that failed or vanished before that
/// (and could not say so) leaves nothing here waiting for the migration's whole deadline.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(60);

type Verdict = oneshot::Sender<Result<bool, ProtocolError>>;

/// A caller's handle on a running destination: its protocol state, and cancels routed to the
/// source (which decides).
#[derive(Debug, Clone)]
pub struct DestControl {
    state: Arc<Mutex<DestState>>,
    asks: mpsc::UnboundedSender<(String, Verdict)>,
}

/// The receiving end of a [`DestControl`].
#[derive(Debug)]
pub struct DestInbox {
    state: Arc<Mutex<DestState>>,
    asks: mpsc::UnboundedReceiver<(String, Verdict)>,
}

impl DestControl {
    /// A handle and its inbox (given to [`receive`]).
    pub fn new() -> (Self, DestInbox) {
        let state = Arc::new(Mutex::new(DestState::Preparing));
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { state: state.clone(), asks: tx }, DestInbox { state, asks: rx })
    }

    /// The protocol state.
    pub fn state(&self) -> DestState {
        self.state.lock().map(|s| *s).unwrap_or(DestState::Committed)
    }

    /// Asks the source to cancel; `Ok(true)` once the source aborted, `Ok(false)` when the
    /// migration already ended.
    ///
    /// # Errors
    /// [`EngineError::Protocol`] past the commit; [`EngineError::Timeout`] when no verdict came.
    pub async fn cancel(&self, reason: &str) -> Result<bool, EngineError> {
        let state = self.state();
        if state.may_run() {
            return Err(ProtocolError::PastCommit { owner: Owner::Destination }.into());
        }
        if state.is_terminal() {
            return Ok(false);
        }
        let (tx, rx) = oneshot::channel();
        if self.asks.send((reason.to_owned(), tx)).is_err() {
            return Ok(false);
        }
        match tokio::time::timeout(VERDICT_LIMIT, rx).await {
            Ok(Ok(verdict)) => Ok(verdict?),
            Ok(Err(_)) => Ok(false),
            Err(_) => Err(EngineError::Timeout {
                what: "for the source's verdict on the cancel",
                after: VERDICT_LIMIT,
            }),
        }
    }
}

struct Machine<'a> {
    state: Arc<Mutex<DestState>>,
    journal: &'a Entry,
}

impl Machine<'_> {
    fn get(&self) -> DestState {
        self.state.lock().map(|s| *s).unwrap_or(DestState::Committed)
    }

    fn step(&self, input: DestInput) -> Result<Action, EngineError> {
        let from = self.get();
        let (next, action) = from.step(input)?;
        tracing::debug!(from = from.as_str(), to = next.as_str(), input = input.as_str(), "protocol");
        if let Ok(mut s) = self.state.lock() {
            *s = next;
        }
        Ok(action)
    }

    /// Records `state` durably, then moves there.
    fn record(&self, state: DestState) -> Result<(), EngineError> {
        self.journal.record(Standing::Destination(state), |_| {})?;
        Ok(())
    }
}

/// Why the source aborted, as this side reports it.
fn abort_error(reason: String) -> EngineError {
    if reason.starts_with("cancelled") || reason.contains("cancelled:") {
        EngineError::Cancelled(format!("the source cancelled: {reason}"))
    } else {
        EngineError::Precondition(format!("the source aborted the migration: {reason}"))
    }
}

/// Receives the VM: votes once QEMU loaded the state, runs it after the source's commit.
/// Returns the cutover times and the plug's drop count once the VM runs here.
///
/// Returns an error only where this side may destroy its copy (before its vote, on the source's
/// abort, or when its QEMU is gone); after the vote it waits for the decision however long that
/// takes, and after the commit it retries its resume.
///
/// # Errors
/// QEMU exiting, the migration failing, the deadline, a cancel or the source's abort, all
/// before the vote.
pub async fn receive(
    mut inc: Incoming,
    log: EventLog,
    inbox: DestInbox,
    journal: &Entry,
    timeout: Duration,
) -> Result<(CutoverTimes, u64), EngineError> {
    let DestInbox { state, mut asks } = inbox;
    let m = Machine { state, journal };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut times = CutoverTimes::default();
    let mut verdicts: Vec<Verdict> = Vec::new();
    let mut cancel_by: Option<(String, tokio::time::Instant)> = None;
    let mut resume_from: Option<tokio::time::Instant> = None;
    // The commit arrived while this side had voted, and is not in its journal yet.
    let mut commit_unrecorded = false;
    let connect_by = tokio::time::Instant::now() + CONNECT_LIMIT;
    let mut connected = false;
    let answer = |verdicts: &mut Vec<Verdict>, v: Result<bool, ProtocolError>| {
        for tx in verdicts.drain(..) {
            let _ = tx.send(v.clone());
        }
    };
    loop {
        let pre_vote = m.get().may_destroy();
        tokio::select! {
            ev = inc.sub.next() => {
                let Some(ev) = ev else {
                    m.step(DestInput::QemuExited)?;
                    return Err(EngineError::QemuExited("QMP connection closed".into()));
                };
                match ev.kind() {
                    EventKind::Resume if m.get() == DestState::Committed => {
                        let released = network::release_plug(inc.sandbox_ns.as_ref(), &inc.net).await?;
                        let resume_at = ev.qemu_timestamp.unwrap_or(ev.received_at);
                        times.resume_unix_nanos = unix_nanos(resume_at);
                        times.plug_released_unix_nanos = unix_nanos(released);
                        times.resume_to_plug_release_nanos = released.duration_since(resume_at).map_or(0, |d| d.as_nanos() as u64);
                        tracing::info!(reaction_us = times.resume_to_plug_release_nanos / 1000, plugged = inc.net.plugged, "RESUME: plug released");
                        // Written before this side's streams go (the source re-sends what it
                        // recovered from its tap on this word).
                        if let Err(e) = inc.ctl_out.deliver(CtlMsg::Resumed, Duration::from_secs(2)).await {
                            tracing::warn!(error = %e, "cannot tell the source the VM runs");
                        }
                        if let Err(e) = inc.qmp.execute("announce-self", Some(serde_json::json!({
                            "initial": 50, "max": 550, "rounds": 5, "step": 100
                        }))).await {
                            tracing::warn!(error = %e, "announce-self failed");
                        }
                        m.step(DestInput::Resumed)?;
                        if std::mem::take(&mut commit_unrecorded) {
                            if let Err(e) = m.record(DestState::Committed) {
                                tracing::warn!(error = %e, "cannot record the commit");
                            }
                        }
                        if let Err(e) = m.record(DestState::Running) {
                            tracing::warn!(error = %e, "cannot record that the VM runs");
                        }
                        let mut e = Event::new(Phase::Cutover, "VM resumed here; plug released");
                        e.cutover = Some(times.clone());
                        log.push(e);
                        // The streams are done; a later migration of this VM brings its own.
                        if let Some(creds) = &inc.tls {
                            crate::migration::qemu::tls::remove(&inc.qmp, creds).await;
                        }
                        break;
                    }
                    EventKind::Migration(status) => match status {
                        MigrationStatus::Active if m.get() == DestState::Preparing => {
                            m.step(DestInput::ReceivingStarted)?;
                            log.push(Event::new(Phase::Ram, "receiving RAM"));
                            failpoint::point("dest-receiving").await?;
                        }
                        MigrationStatus::Completed if pre_vote => {
                            m.step(DestInput::QemuLoaded)?;
                            failpoint::point("dest-before-vote").await?;
                            // The vote promises a live, loaded copy: check it is still there.
                            if let Some(status) = inc.exited.borrow().clone() {
                                m.step(DestInput::QemuExited)?;
                                let _ = inc.ctl_out.send(CtlMsg::Failed(format!("destination QEMU exited ({status})")));
                                return Err(EngineError::QemuExited(status));
                            }
                            let st = inc.qmp.query_status().await?;
                            if st.running {
                                return Err(EngineError::Precondition("the incoming VM started before the commit".into()));
                            }
                            m.record(DestState::Voted)?;
                            m.step(DestInput::VoteRecorded)?;
                            let _ = inc.ctl_out.send(CtlMsg::Prepared);
                            log.push(Event::new(Phase::Cutover, "state loaded; voted, waiting for the source's decision"));
                            if let Err(e) = failpoint::point("dest-after-vote").await {
                                tracing::warn!(error = %e, "fail point after the vote");
                            }
                        }
                        MigrationStatus::Failed if pre_vote => {
                            // The source's abort, which explains the broken stream, may still
                            // be on its way.
                            let until = tokio::time::Instant::now() + Duration::from_millis(500);
                            while let Ok(Some(ev)) = tokio::time::timeout_at(until, inc.ctl_in.recv()).await {
                                if let CtlEvent::Msg(CtlMsg::Abort(reason)) = ev {
                                    m.step(DestInput::AbortReceived)?;
                                    answer(&mut verdicts, Ok(true));
                                    return Err(abort_error(reason));
                                }
                            }
                            m.step(DestInput::Failed)?;
                            let _ = inc.ctl_out.send(CtlMsg::Failed("incoming migration failed in QEMU".into()));
                            return Err(EngineError::QemuMigrationFailed("incoming migration failed in QEMU".into()));
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
            ev = inc.ctl_in.recv() => match ev {
                Some(CtlEvent::Msg(CtlMsg::Commit)) => {
                    let voted = m.get() == DestState::Voted;
                    match m.step(DestInput::CommitReceived) {
                        Ok(_) => {
                            answer(&mut verdicts, Err(ProtocolError::PastCommit { owner: Owner::Destination }));
                            if let Err(e) = failpoint::point("dest-before-resume").await {
                                tracing::warn!(error = %e, "fail point before the resume");
                            }
                            // The decision is durable on the source, which recorded it before
                            // sending it and delivers it until acknowledged. This side's record
                            // only spares a restarted agent the question, so it is written once
                            // the VM runs and its packets are released, out of the guest's pause
                            // and off the release's path: an agent restarted in `voted` keeps
                            // the copy (paused or running) and waits for the decision, and
                            // nothing destroys it.
                            commit_unrecorded = voted;
                            resume_from.get_or_insert_with(tokio::time::Instant::now);
                            if let Err(e) = inc.qmp.cont().await {
                                tracing::warn!(error = %e, "cont failed; retrying");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "commit out of step; ignored"),
                    }
                }
                Some(CtlEvent::Msg(CtlMsg::Abort(reason))) => match m.step(DestInput::AbortReceived) {
                    Ok(_) => {
                        answer(&mut verdicts, Ok(true));
                        return Err(abort_error(reason));
                    }
                    Err(e) => tracing::error!(error = %e, "abort after the commit; ignored"),
                },
                Some(CtlEvent::Msg(CtlMsg::CancelRefused(why))) => {
                    tracing::info!(%why, "the source refused the cancel");
                    answer(&mut verdicts, Err(ProtocolError::PastCommit { owner: Owner::Destination }));
                }
                Some(CtlEvent::Msg(other)) => tracing::debug!(%other, "control message ignored"),
                Some(CtlEvent::Connected) => {
                    connected = true;
                    tracing::info!(state = m.get().as_str(), "control stream connected");
                    if m.get() == DestState::Voted {
                        // A source delivering its decision after a break: the vote again.
                        let _ = inc.ctl_out.send(CtlMsg::Prepared);
                    }
                }
                Some(CtlEvent::Lost(e)) => match m.step(DestInput::PeerLost)? {
                    Action::RollBack => return Err(EngineError::ctl("receiving the VM")(e)),
                    Action::AwaitDecision => {
                        tracing::warn!(error = %e, "in doubt: the control stream broke after the vote; waiting for the source's decision");
                        log.push(Event::new(Phase::Cutover, format!("in doubt ({e}); waiting for the source's decision")));
                    }
                    _ => {}
                },
                // The stream acceptor is gone (the listener stopped): no decision can come.
                None => {
                    if pre_vote {
                        m.step(DestInput::PeerLost)?;
                        return Err(EngineError::Precondition("the data listener stopped".into()));
                    }
                    std::future::pending::<()>().await;
                }
            },
            ask = asks.recv(), if !m.get().is_terminal() => {
                let Some((reason, verdict)) = ask else { continue };
                let state = m.get();
                if state.may_destroy() {
                    // Before the vote: the source decides if it can be told; otherwise, or if
                    // it stays silent, this side gives up alone after a grace period.
                    if inc.ctl_out.send(CtlMsg::CancelRequest(reason.clone())).is_err() {
                        let _ = verdict.send(Ok(true));
                        m.step(DestInput::Cancel)?;
                        return Err(EngineError::Cancelled(reason));
                    }
                    verdicts.push(verdict);
                    cancel_by.get_or_insert((reason, tokio::time::Instant::now() + CANCEL_GRACE));
                } else {
                    match state.step(DestInput::Cancel) {
                        Ok((_, Action::AskSource)) => {
                            if inc.ctl_out.send(CtlMsg::CancelRequest(reason)).is_err() {
                                let _ = verdict.send(Err(ProtocolError::Ended("in doubt: the source is unreachable; its decision stands")));
                            } else {
                                verdicts.push(verdict);
                            }
                        }
                        Ok(_) => { let _ = verdict.send(Ok(false)); }
                        Err(e) => { let _ = verdict.send(Err(e)); }
                    }
                }
            }
            () = async {
                match &cancel_by {
                    Some((_, at)) => tokio::time::sleep_until(*at).await,
                    None => std::future::pending().await,
                }
            }, if pre_vote => {
                let reason = cancel_by.take().map(|(r, _)| r).unwrap_or_default();
                m.step(DestInput::Cancel)?;
                answer(&mut verdicts, Ok(true));
                return Err(EngineError::Cancelled(format!("{reason} (the source did not answer)")));
            }
            _ = inc.exited.changed() => {
                let status = inc.exited.borrow().clone().unwrap_or_default();
                let action = m.step(DestInput::QemuExited)?;
                let _ = inc.ctl_out.send(CtlMsg::Failed(format!("destination QEMU exited ({status})")));
                if action == Action::Lost {
                    tracing::error!(%status, "the incoming QEMU exited after the vote: the VM is lost if the source committed");
                }
                return Err(EngineError::QemuExited(status));
            }
            () = async {
                match resume_from {
                    Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    None => std::future::pending().await,
                }
            }, if m.get() == DestState::Committed => {
                // The owner retries its resume until the VM runs.
                match inc.qmp.query_status().await {
                    Ok(st) if !st.running => {
                        if let Err(e) = inc.qmp.cont().await {
                            tracing::warn!(error = %e, "cont failed; retrying");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "query-status failed"),
                }
                if resume_from.is_some_and(|t| t.elapsed() > RESUME_RETRY_LIMIT) {
                    tracing::error!("the VM belongs here but does not resume; left paused for an operator");
                    resume_from = Some(tokio::time::Instant::now());
                }
            }
            () = tokio::time::sleep_until(connect_by), if pre_vote && !connected => {
                m.step(DestInput::PeerLost)?;
                return Err(EngineError::Timeout { what: "the source's control stream", after: CONNECT_LIMIT });
            }
            () = tokio::time::sleep_until(deadline), if pre_vote => {
                m.step(DestInput::Failed)?;
                let _ = inc.ctl_out.send(CtlMsg::Failed(format!("no VM arrived within {timeout:?}")));
                return Err(EngineError::Timeout { what: "waiting for the VM", after: timeout });
            }
        }
    }
    let drops = network::plug_drops(inc.sandbox_ns.as_ref(), &inc.net).await.unwrap_or(0);
    for t in &inc.tasks {
        t.abort();
    }
    tracing::info!(elapsed = ?inc.started.elapsed(), drops, "incoming VM running");
    Ok((times, drops))
}
