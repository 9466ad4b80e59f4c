//! One migration driven between two agents: they are told what to do, in order, and watched
//! until the VM runs on the destination, or until both sides have undone their work. The source
//! agent's Migration controller runs it (its own engine as the source), and so does `kubectl
//! migrate --direct` from a workstation: one orchestration, two callers.
//!
//! ```text
//! driver                 destination agent                 source agent
//!   │ ListSandboxes, Inspect ───────────────────────────────────▶│
//!   │ PrepareIncoming ───────▶│ (id, secret, argv, options)      │
//!   │ StartMigration ───────────────────────────────────────────▶│ (same id, secret, options)
//!   │ Watch ─────────────────▶│              Watch ──────────────▶│
//!   │◀══ events, merged ══════╪══════════════════════════════════╡
//!   │ on a FAILED/CANCELLED side, on a stop or the timeout: Cancel through the source,
//!   │ then wait (bounded by the cancel grace) for their terminal events
//! ```
//!
//! The decisions — when it is over, whom to cancel, how it ended — live in [`Tracker`], a plain
//! state machine fed with events, so they are tested without agents. [`run`] only does the I/O.

use std::net::IpAddr;
use std::time::{Duration, Instant};

pub use crate::client::new_migration_id;
use crate::client::{phase, vm_addresses};
use crate::convert::options_to_proto;
use crate::dataplane::Secret;
use crate::migration::options::{MigrationOptions, OptionsError};
use katamaran_protos::protobuf::MessageField;
use katamaran_protos::v1 as pb;
use tokio::sync::watch;

use super::resolve::Resolved;
use super::transport::{self, Agent, Events};

/// A failure that ends the run before the migration is under way.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No randomness for the migration id or the secret.
    #[error("cannot generate the migration id or secret")]
    Random(#[source] crate::dataplane::Error),
    /// The source sandbox lacks what the migration needs (addresses of the VM or of its node).
    #[error("source sandbox {sandbox}: {what}")]
    Sandbox {
        /// Sandbox id.
        sandbox: String,
        /// What is missing or wrong.
        what: String,
    },
    /// The options are invalid, or do not fit the addresses the agents reported (then the
    /// destination was cancelled).
    #[error("invalid migration options")]
    Options(#[source] OptionsError),
    /// The destination refused or failed `PrepareIncoming`.
    #[error("preparing the destination failed")]
    Prepare(#[source] transport::Error),
    /// The source refused or failed `StartMigration`; the destination was cancelled.
    #[error("starting the migration on the source failed (the destination was cancelled)")]
    Start(#[source] transport::Error),
    /// A `Watch` could not be opened; both sides were cancelled.
    #[error("watching the migration failed (both sides were cancelled)")]
    Watch(#[source] transport::Error),
}

impl Error {
    /// Whether an agent refused the request as given (exit code 2).
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::Prepare(e) | Error::Start(e) => e.is_refusal(),
            Error::Sandbox { .. } | Error::Options(_) => true,
            Error::Random(_) | Error::Watch(_) => false,
        }
    }
}

/// Which node an event or a call concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The node the VM leaves.
    Source,
    /// The node the VM arrives on.
    Destination,
}

impl Side {
    /// "source" or "destination".
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        }
    }
}

/// What the user asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Ctrl-C.
    Interrupted,
    /// `--timeout` passed.
    TimedOut(Duration),
}

/// How a migration ended, from the user's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VM runs on the destination.
    Succeeded,
    /// A side failed, was cancelled by someone else, stopped answering, or `--timeout` passed.
    Failed {
        /// The side that failed first, if one did.
        side: Option<Side>,
        /// `ErrorKind` name (e.g. "QEMU") or a client-side cause ("TIMEOUT", "LOST").
        kind: String,
        /// The full message.
        message: String,
    },
    /// Ctrl-C cancelled it.
    Cancelled,
}

/// What [`Tracker`] asks [`run`] to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `Cancel` to `side`.
    Cancel {
        /// Side to cancel.
        side: Side,
        /// Reason recorded in its CANCELLED event.
        reason: String,
    },
}

#[derive(Debug, Default, Clone)]
struct SideState {
    events: Vec<pb::MigrationEvent>,
    /// Latest known phase (unknown enum values keep the previous one).
    phase: Option<pb::Phase>,
    ended: bool,
    cancel_sent: bool,
}

impl SideState {
    fn terminal(&self) -> Option<&pb::MigrationEvent> {
        self.events.last().filter(|e| phase(e).is_terminal())
    }
}

/// The decisions of a running migration: fed with events and stops, it says whom to cancel,
/// when the run is over, and how it ended.
#[derive(Debug, Clone)]
pub struct Tracker {
    source: SideState,
    destination: SideState,
    wait_forwarding: bool,
    stop: Option<Stop>,
    first_failure: Option<(Side, String, String)>,
    notes: Vec<String>,
    stopped_by: &'static str,
}

/// [`Tracker::stopped_by`]'s default.
pub const KUBECTL_STOP: &str = "the user (Ctrl-C in kubectl migrate)";

fn error_kind_name(e: &pb::MigrationEvent) -> String {
    match e.result.error_kind.enum_value() {
        Ok(k) => format!("{k:?}").trim_start_matches("ERROR_KIND_").to_owned(),
        Err(v) => format!("error kind {v}"),
    }
}

fn event_message(e: &pb::MigrationEvent) -> String {
    if e.result.error_message.is_empty() {
        e.message.clone()
    } else {
        e.result.error_message.clone()
    }
}

impl Tracker {
    /// A tracker for a migration just started. With `wait_forwarding`, success also waits for
    /// the source to finish forwarding stragglers (its own COMPLETED).
    pub fn new(wait_forwarding: bool) -> Self {
        Self {
            source: SideState::default(),
            destination: SideState::default(),
            wait_forwarding,
            stop: None,
            first_failure: None,
            notes: Vec::new(),
            stopped_by: KUBECTL_STOP,
        }
    }

    /// Who a stop ([`Stop::Interrupted`]) comes from, for the cancel's reason (default: Ctrl-C
    /// in `kubectl migrate`).
    #[must_use]
    pub fn stopped_by(mut self, who: &'static str) -> Self {
        self.stopped_by = who;
        self
    }

    fn side(&mut self, side: Side) -> &mut SideState {
        match side {
            Side::Source => &mut self.source,
            Side::Destination => &mut self.destination,
        }
    }

    fn side_ref(&self, side: Side) -> &SideState {
        match side {
            Side::Source => &self.source,
            Side::Destination => &self.destination,
        }
    }

    /// The events received from `side`, in order.
    pub fn events(&self, side: Side) -> &[pb::MigrationEvent] {
        &self.side_ref(side).events
    }

    /// Remarks for the user gathered along the way (refused cancels, lost agents).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Adds a remark for the user.
    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Whether `side` may still send events.
    pub fn is_open(&self, side: Side) -> bool {
        !self.side_ref(side).ended
    }

    /// Whether a stop (Ctrl-C, timeout) was requested.
    pub fn stop(&self) -> Option<Stop> {
        self.stop
    }

    /// Cancels go to the source only: it owns the VM until the commit point and tells the
    /// destination; a failed source has already aborted its destination.
    fn cancel_other(&mut self, failed: Side, reason: String) -> Vec<Action> {
        let other = failed.other();
        if other != Side::Source {
            return Vec::new();
        }
        let state = self.side(other);
        if state.ended || state.cancel_sent {
            return Vec::new();
        }
        state.cancel_sent = true;
        vec![Action::Cancel { side: other, reason }]
    }

    /// An event from `side`.
    pub fn on_event(&mut self, side: Side, event: pb::MigrationEvent) -> Vec<Action> {
        let state = self.side(side);
        if state.ended {
            return Vec::new();
        }
        // A watcher that re-reads the latest event must not count it twice.
        if event.sequence != 0 && state.events.last().is_some_and(|l| l.sequence >= event.sequence) {
            return Vec::new();
        }
        let p = event.phase.enum_value().ok();
        if p.is_some() {
            state.phase = p;
        }
        let terminal = p.is_some_and(pb::Phase::is_terminal);
        state.ended = terminal;
        state.events.push(event);
        if !terminal || p == Some(pb::Phase::PHASE_COMPLETED) {
            return Vec::new();
        }
        let Some(last) = self.side_ref(side).events.last() else { return Vec::new() };
        let (kind, message) = (error_kind_name(last), event_message(last));
        let what = if p == Some(pb::Phase::PHASE_CANCELLED) { "was cancelled" } else { "failed" };
        let reason = format!("the {} {what}: {message}", side.name());
        // A side that ends cancelled after we asked the source to cancel followed that request
        // (the source tells its destination); anything else ending is the cause.
        let asked = self.side_ref(Side::Source).cancel_sent;
        if self.first_failure.is_none()
            && !(asked && p == Some(pb::Phase::PHASE_CANCELLED))
            && !self.side_ref(side).cancel_sent
        {
            let kind = if p == Some(pb::Phase::PHASE_CANCELLED) { "CANCELLED".to_owned() } else { kind };
            self.first_failure = Some((side, kind, message));
        }
        self.cancel_other(side, reason)
    }

    /// `side`'s event stream ended or broke; `why` is empty for a clean end.
    pub fn on_stream_end(&mut self, side: Side, why: Option<String>) -> Vec<Action> {
        let state = self.side(side);
        if state.ended {
            return Vec::new();
        }
        state.ended = true;
        let message = match why {
            Some(w) => format!("lost the {} agent before the migration ended: {w}", side.name()),
            None => format!("the {} agent stopped reporting before the migration ended", side.name()),
        };
        if self.first_failure.is_none() && !self.side_ref(side).cancel_sent {
            self.first_failure = Some((side, "LOST".into(), message.clone()));
        } else {
            self.notes.push(message.clone());
        }
        self.cancel_other(side, message)
    }

    /// Ctrl-C or `--timeout`: cancel every side still running.
    pub fn on_stop(&mut self, stop: Stop) -> Vec<Action> {
        if self.stop.is_some() {
            return Vec::new();
        }
        self.stop = Some(stop);
        if self.succeeded() {
            return Vec::new();
        }
        let reason = match stop {
            Stop::Interrupted => format!("cancelled by {}", self.stopped_by),
            Stop::TimedOut(t) => format!("kubectl migrate --timeout {t:?} passed"),
        };
        // Through the owner: the source decides and tells the destination.
        let state = self.side(Side::Source);
        if state.ended || state.cancel_sent {
            return Vec::new();
        }
        state.cancel_sent = true;
        vec![Action::Cancel { side: Side::Source, reason }]
    }

    /// The answer to a `Cancel` sent to `side`.
    pub fn on_cancel_answer(&mut self, side: Side, answer: Result<pb::CancelResponse, String>) {
        match answer {
            Ok(r) if r.cancelled => {}
            Ok(r) => match r.phase.enum_value() {
                Ok(p) if p.is_terminal() => {}
                Ok(p) => self.notes.push(format!(
                    "the {} is past its point of no return ({}); the migration runs to its end",
                    side.name(),
                    phase_name(p)
                )),
                Err(v) => self.notes.push(format!("the {} did not cancel (phase {v})", side.name())),
            },
            Err(e) if e.contains("FAILED_PRECONDITION") => self.notes.push(format!(
                "the cancel was refused: the migration is past its commit point and the VM belongs to the destination ({e})"
            )),
            Err(e) => {
                self.notes.push(format!("cancelling the {} failed: {e}", side.name()));
            }
        }
    }

    fn phase_of(&self, side: Side) -> Option<pb::Phase> {
        self.side_ref(side).phase
    }

    /// The VM runs on the destination and the source forwards (or has finished forwarding).
    pub fn succeeded(&self) -> bool {
        let dest_done = self.phase_of(Side::Destination) == Some(pb::Phase::PHASE_COMPLETED);
        let source_ok = match self.phase_of(Side::Source) {
            Some(pb::Phase::PHASE_COMPLETED) => true,
            Some(pb::Phase::PHASE_FORWARDING) => !self.wait_forwarding,
            _ => false,
        };
        dest_done && source_ok
    }

    /// Whether nothing more is worth waiting for.
    pub fn done(&self) -> bool {
        self.succeeded() || (self.source.ended && self.destination.ended)
    }

    /// How it ended (or stands, when the cancel grace ran out).
    pub fn outcome(&self) -> Outcome {
        if self.succeeded() {
            return Outcome::Succeeded;
        }
        if let Some((side, kind, message)) = &self.first_failure {
            return Outcome::Failed { side: Some(*side), kind: kind.clone(), message: message.clone() };
        }
        match self.stop {
            Some(Stop::Interrupted) => Outcome::Cancelled,
            Some(Stop::TimedOut(t)) => Outcome::Failed {
                side: None,
                kind: "TIMEOUT".into(),
                message: format!("the migration did not finish within --timeout {t:?}"),
            },
            None => {
                // Both ended without a failure event on either: e.g. the source COMPLETED but
                // the destination's stream closed after its last event.
                let which = [Side::Destination, Side::Source]
                    .into_iter()
                    .find(|s| self.side_ref(*s).terminal().is_none())
                    .unwrap_or(Side::Destination);
                Outcome::Failed {
                    side: Some(which),
                    kind: "LOST".into(),
                    message: format!("the {} never reported the end of the migration", which.name()),
                }
            }
        }
    }

    /// Called when the cancel grace ran out with sides still running.
    pub fn on_grace_expired(&mut self, grace: Duration) {
        for side in [Side::Source, Side::Destination] {
            if !self.side_ref(side).ended {
                self.notes.push(format!(
                    "the {} did not confirm the end within {grace:?}; check it with katactl on its node",
                    side.name()
                ));
            }
        }
    }
}

/// Lower-case phase name for tables and lines.
pub fn phase_name(p: pb::Phase) -> &'static str {
    match p {
        pb::Phase::PHASE_UNSPECIFIED => "unspecified",
        pb::Phase::PHASE_PREPARING => "preparing",
        pb::Phase::PHASE_STORAGE => "storage",
        pb::Phase::PHASE_RAM => "ram",
        pb::Phase::PHASE_CUTOVER => "cutover",
        pb::Phase::PHASE_FORWARDING => "forwarding",
        pb::Phase::PHASE_COMPLETED => "completed",
        pb::Phase::PHASE_FAILED => "failed",
        pb::Phase::PHASE_CANCELLED => "cancelled",
    }
}

/// Live progress of a running migration. The agent's controller needs a `Send` one (its run is
/// a task); a test harness may act on events with whatever it holds.
pub trait Progress {
    /// A remark of the client (prepared, cancelling, ...).
    fn note(&mut self, line: &str);
    /// An event from one side.
    fn event(&mut self, side: Side, event: &pb::MigrationEvent);
    /// The run is over: clear the bar, flush.
    fn finish(&mut self);
}

/// No progress: for a caller that reads only the [`Report`].
impl Progress for () {
    fn note(&mut self, _line: &str) {}
    fn event(&mut self, _side: Side, _event: &pb::MigrationEvent) {}
    fn finish(&mut self) {}
}

/// Knobs of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Cancel both sides if the migration has not ended by then.
    pub timeout: Option<Duration>,
    /// Wait for the source's forwarding to end too.
    pub wait_forwarding: bool,
    /// After a cancel, how long to wait for the sides' terminal events.
    pub cancel_grace: Duration,
    /// Who a stop comes from, in the cancel's reason (see [`Tracker::stopped_by`]).
    pub stopped_by: &'static str,
    /// Appended to the note a stop prints (e.g. how to quit without waiting); may be empty.
    pub stop_hint: &'static str,
}

/// Default bound on the wait for terminal events after a cancel: the agents undo QEMU, NBD
/// exports, routes and the plug, which takes seconds, not minutes.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(60);

/// What moves between which nodes, as the run names them and falls back on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// What moves, for the first line: `pod default/web`, `sandbox 0123…`.
    pub subject: String,
    /// The node the VM leaves.
    pub source_node: String,
    /// The node it goes to.
    pub destination_node: String,
    /// The source node's address for the destination when the source agent reports none (the
    /// node's InternalIP, or `katactl migrate --source-address`).
    pub source_address: Option<IpAddr>,
    /// The destination node's address when its agent reports none.
    pub destination_address: Option<IpAddr>,
}

impl Route {
    /// The route of a pod resolved through the API server.
    pub fn of(resolved: &Resolved) -> Self {
        Self {
            subject: format!("pod {}", resolved.pod.key()),
            source_node: resolved.source.node.clone(),
            destination_node: resolved.destination.node.clone(),
            source_address: Some(resolved.source.address),
            destination_address: Some(resolved.destination.address),
        }
    }

    /// The route of a sandbox between two agents reached directly (katactl, the lab, the
    /// benchmark): named as the agents are, with the node addresses they report.
    pub fn of_sandbox(sandbox_id: &str, source: &Agent, destination: &Agent) -> Self {
        Self {
            subject: format!("sandbox {sandbox_id}"),
            source_node: source.node().to_owned(),
            destination_node: destination.node().to_owned(),
            source_address: None,
            destination_address: None,
        }
    }
}

/// What was migrated and how, checked before anything is touched.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What moves, between which nodes.
    pub route: Route,
    /// Validated options.
    pub options: MigrationOptions,
    /// The source sandbox as `Inspect` returned it.
    pub sandbox: pb::Sandbox,
    /// The migration's id on both nodes ([`new_migration_id`] for a one-off run; the agents'
    /// controller derives it from the Migration's UID so that a restarted agent finds it again).
    pub migration_id: String,
}

/// The record of a run, for the final table or JSON.
#[derive(Debug, Clone)]
pub struct Report {
    /// Migration id.
    pub migration_id: String,
    /// The source sandbox.
    pub sandbox_id: String,
    /// Incoming sandbox on the destination, once prepared.
    pub destination_sandbox_id: Option<String>,
    /// Source node address sent to the destination.
    pub source_address: String,
    /// Destination node address sent to the source.
    pub destination_address: Option<String>,
    /// The decisions and each side's events.
    pub tracker: Tracker,
    /// Every event of both sides in arrival order.
    pub events: Vec<(Side, pb::MigrationEvent)>,
    /// How it ended.
    pub outcome: Outcome,
    /// From `PrepareIncoming` to the end.
    pub elapsed: Duration,
}

impl Report {
    /// The event that ended `side`'s part: its terminal event, or for the source FORWARDING
    /// (the VM runs on the destination; the forward lives on without the caller).
    pub fn terminal(&self, side: Side) -> Option<&pb::MigrationEvent> {
        self.tracker.events(side).iter().rev().find(|e| {
            let p = phase(e);
            p.is_terminal() || (side == Side::Source && p == pb::Phase::PHASE_FORWARDING)
        })
    }

    /// The latest cutover times `side` reported.
    pub fn cutover(&self, side: Side) -> Option<&pb::CutoverTimes> {
        self.tracker.events(side).iter().rev().find_map(|e| e.cutover.as_ref())
    }

    /// Time `side` spent in each phase, from its events' timestamps, in phase order.
    pub fn phase_durations(&self, side: Side) -> Vec<(pb::Phase, Duration)> {
        let mut out: Vec<(pb::Phase, Duration)> = Vec::new();
        for w in self.tracker.events(side).windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let d = Duration::from_nanos(b.timestamp_unix_nanos.saturating_sub(a.timestamp_unix_nanos));
            let p = phase(a);
            match out.last_mut() {
                Some((last, acc)) if *last == p => *acc += d,
                _ => out.push((p, d)),
            }
        }
        out
    }

    /// Whether the VM runs on the destination.
    pub fn succeeded(&self) -> bool {
        self.outcome == Outcome::Succeeded
    }

    /// Why it did not succeed, as one line (`None` on success).
    pub fn failure(&self) -> Option<String> {
        match &self.outcome {
            Outcome::Succeeded => None,
            Outcome::Cancelled => Some("cancelled; both sides rolled back".into()),
            Outcome::Failed { side: Some(side), kind, message } => {
                Some(format!("{}: {kind}: {message}", side.name()))
            }
            Outcome::Failed { side: None, kind, message } => Some(format!("{kind}: {message}")),
        }
    }

    /// Whether the caller stopped it (an interrupt or the timeout), whatever came of that.
    pub fn stopped(&self) -> bool {
        self.tracker.stop().is_some()
    }
}

/// Resolves when the stop flag turns true (Ctrl-C, a cancel asked for); never once the sender
/// is gone.
pub async fn interrupted(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        // The signal task is gone: no interrupt can come any more.
        std::future::pending::<()>().await;
    }
}

/// A stop flag for [`run`] turned on by the first Ctrl-C; a second one calls `on_second` (a
/// binary quits there without waiting for the agents' cancel).
pub fn stop_on_ctrl_c(on_second: impl FnOnce() + Send + 'static) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            // Nobody listening any more means the run is over; nothing to stop.
            let _ = tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                on_second();
            }
        }
    });
    rx
}

/// Resolves at `deadline`; never without one.
pub async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn agent<'a>(side: Side, source: &'a Agent, destination: &'a Agent) -> &'a Agent {
    match side {
        Side::Source => source,
        Side::Destination => destination,
    }
}

async fn apply<P: Progress + ?Sized>(
    actions: Vec<Action>,
    id: &str,
    source: &Agent,
    destination: &Agent,
    tracker: &mut Tracker,
    progress: &mut P,
) {
    for Action::Cancel { side, .. } in &actions {
        progress.note(&format!(
            "cancelling the {} ({})",
            side.name(),
            agent(*side, source, destination).node()
        ));
    }
    // Both sides at once: a slow or dead agent must not delay the other's rollback.
    let calls = actions.into_iter().map(|Action::Cancel { side, reason }| async move {
        let answer = agent(side, source, destination).cancel(id, &reason).await.map_err(|e| e.to_string());
        (side, answer)
    });
    for (side, answer) in futures::future::join_all(calls).await {
        tracker.on_cancel_answer(side, answer);
    }
}

/// Best-effort cancel before the watch loop: the side may not know the id yet.
async fn cancel_quietly(side: Side, agent: &Agent, id: &str, reason: &str) -> Option<String> {
    match agent.cancel(id, reason).await {
        Ok(_) => None,
        Err(e) if e.code() == Some(katamaran_protos::ttrpc::Code::NOT_FOUND) => None,
        Err(e) => Some(format!("cancelling the {} failed: {e}", side.name())),
    }
}

/// How the wait for `PrepareIncoming` ended.
enum Prepared {
    Answered(Result<pb::PrepareIncomingResponse, transport::Error>),
    Stopped(Stop),
}

/// Runs the migration of `plan` between the two agents, reporting to `progress`, until the VM
/// runs on the destination or both sides have ended.
///
/// # Errors
/// [`Error`] when the migration could not be started; everything that happens once it runs is
/// in the [`Report`].
pub async fn run<P: Progress + ?Sized>(
    plan: &Plan,
    source: &Agent,
    destination: &Agent,
    settings: &Settings,
    mut interrupt: watch::Receiver<bool>,
    progress: &mut P,
) -> Result<Report, Error> {
    let migration_id = plan.migration_id.clone();
    let secret = Secret::generate().map_err(Error::Random)?;
    let options = options_to_proto(&plan.options);
    let started = Instant::now();
    let deadline = settings.timeout.map(|t| started + t);
    // The agent knows which of its node's addresses carries migration traffic; the Kubernetes
    // InternalIP is the fallback for agents that do not say.
    let sandbox_fault = |what: String| Error::Sandbox { sandbox: plan.sandbox.id.clone(), what };
    let vm_addrs = vm_addresses(&plan.sandbox).map_err(|e| sandbox_fault(e.to_string()))?;
    let Some(source_ip) = plan.sandbox.node_address.parse::<IpAddr>().ok().or(plan.route.source_address)
    else {
        return Err(sandbox_fault(
            "the source agent reports no node address; give the source node's address".into(),
        ));
    };
    // Whatever can be checked without the destination's address is, before anything exists.
    plan.options.validate(&vm_addrs, None).map_err(Error::Options)?;
    let source_address = source_ip.to_string();
    let mut report = Report {
        migration_id: migration_id.clone(),
        sandbox_id: plan.sandbox.id.clone(),
        destination_sandbox_id: None,
        source_address: source_address.clone(),
        destination_address: None,
        tracker: Tracker::new(settings.wait_forwarding).stopped_by(settings.stopped_by),
        events: Vec::new(),
        outcome: Outcome::Succeeded,
        elapsed: Duration::ZERO,
    };
    progress.note(&format!(
        "migration {migration_id}: {} from {} to {}",
        plan.route.subject, plan.route.source_node, plan.route.destination_node
    ));

    let mut prep = pb::PrepareIncomingRequest::new();
    prep.migration_id = migration_id.clone();
    prep.secret = secret.expose().to_vec();
    prep.source_sandbox = MessageField::some(plan.sandbox.clone());
    prep.source_qemu_argv = plan.sandbox.qemu_argv.clone();
    prep.options = MessageField::some(options.clone());
    prep.source_node_address = source_address;
    let prepare = destination.prepare_incoming(&prep);
    tokio::pin!(prepare);
    let prepared = tokio::select! {
        r = &mut prepare => Prepared::Answered(r),
        () = interrupted(&mut interrupt) => Prepared::Stopped(Stop::Interrupted),
        () = at(deadline) => Prepared::Stopped(Stop::TimedOut(settings.timeout.unwrap_or_default())),
    };
    let prepared = match prepared {
        Prepared::Answered(Ok(p)) => p,
        Prepared::Answered(Err(e)) => return Err(Error::Prepare(e)),
        Prepared::Stopped(stop) => {
            // The destination is the only side that knows the migration: Cancel makes its
            // preparation give up and undo itself. A preparation that finished before the
            // cancel reached it is registered by then, and is cancelled again.
            let reason = format!("cancelled by {} before the migration started", settings.stopped_by);
            if let Some(note) = cancel_quietly(Side::Destination, destination, &migration_id, &reason).await {
                report.tracker.note(note);
            }
            let finished = tokio::time::timeout(settings.cancel_grace, &mut prepare).await;
            if matches!(finished, Ok(Ok(_))) {
                if let Some(note) =
                    cancel_quietly(Side::Destination, destination, &migration_id, &reason).await
                {
                    report.tracker.note(note);
                }
            }
            report.tracker.on_stop(stop);
            report.outcome = report.tracker.outcome();
            report.elapsed = started.elapsed();
            return Ok(report);
        }
    };
    report.destination_sandbox_id = Some(prepared.destination_sandbox_id.clone());
    let Some(destination_ip) =
        prepared.destination_node_address.parse::<IpAddr>().ok().or(plan.route.destination_address)
    else {
        let reason = "the destination reported no node address";
        let _ = cancel_quietly(Side::Destination, destination, &migration_id, reason).await;
        return Err(Error::Prepare(transport::Error::Rpc {
            rpc: "PrepareIncoming",
            node: destination.node().to_owned(),
            code: None,
            detail: format!("{reason} ({:?})", prepared.destination_node_address),
        }));
    };
    // The addresses the agents will use, not the ones the caller guessed: a tunnel mode of the
    // wrong family, or two names for one node, is refused before the source starts.
    if let Err(e) = plan.options.validate(&vm_addrs, Some((source_ip, destination_ip))) {
        let reason = format!("invalid options: {e}");
        let _ = cancel_quietly(Side::Destination, destination, &migration_id, &reason).await;
        return Err(Error::Options(e));
    }
    let destination_address = destination_ip.to_string();
    report.destination_address = Some(destination_address.clone());
    progress.note(&format!(
        "destination prepared: incoming sandbox {} at {destination_address}",
        prepared.destination_sandbox_id
    ));

    let mut start = pb::StartMigrationRequest::new();
    start.sandbox_id = plan.sandbox.id.clone();
    start.migration_id = migration_id.clone();
    start.secret = secret.expose().to_vec();
    start.destination_node_address = destination_address;
    start.endpoints = prepared.endpoints.clone();
    start.options = MessageField::some(options);
    // The source QEMU's stream credentials go from one agent to the other through this
    // authenticated channel only; the source refuses a start without them unless plain.
    start.stream_tls = prepared.stream_tls.clone();
    if let Err(e) = source.start_migration(&start).await {
        let reason = format!("the source refused to start: {e}");
        if let Some(note) = cancel_quietly(Side::Destination, destination, &migration_id, &reason).await {
            tracing::warn!(%note);
        }
        return Err(Error::Start(e));
    }

    follow(&migration_id, source, destination, settings, started, interrupt, progress, &mut report).await?;
    Ok(report)
}

/// Watches a started migration on both agents until it is over, cancelling through the source
/// on a failure, a stop or the timeout (counted from `started`), and fills `report` in. This is
/// also how a restarted agent picks up a migration its predecessor started.
///
/// # Errors
/// [`Error::Watch`] when a side's `Watch` cannot be opened (both sides were asked to cancel).
#[allow(clippy::too_many_arguments)]
pub async fn follow<P: Progress + ?Sized>(
    migration_id: &str,
    source: &Agent,
    destination: &Agent,
    settings: &Settings,
    started: Instant,
    mut interrupt: watch::Receiver<bool>,
    progress: &mut P,
    report: &mut Report,
) -> Result<(), Error> {
    let deadline = settings.timeout.map(|t| started + t);
    let (mut src_events, mut dst_events) =
        match futures::future::try_join(source.watch(migration_id), destination.watch(migration_id)).await {
            Ok(pair) => pair,
            Err(e) => {
                let reason = format!("cannot watch the migration: {e}");
                for (side, a) in [(Side::Source, source), (Side::Destination, destination)] {
                    if let Some(note) = cancel_quietly(side, a, migration_id, &reason).await {
                        tracing::warn!(%note);
                    }
                }
                return Err(Error::Watch(e));
            }
        };

    let mut tracker = Tracker::new(settings.wait_forwarding).stopped_by(settings.stopped_by);
    let mut grace: Option<Instant> = None;
    while !tracker.done() {
        let actions = tokio::select! {
            r = next(&mut src_events), if tracker.is_open(Side::Source) => {
                feed(&mut tracker, &mut report.events, Side::Source, r, progress)
            }
            r = next(&mut dst_events), if tracker.is_open(Side::Destination) => {
                feed(&mut tracker, &mut report.events, Side::Destination, r, progress)
            }
            () = interrupted(&mut interrupt), if tracker.stop().is_none() => {
                progress.note(&format!(
                    "cancelling through the source, as {} asked{}",
                    settings.stopped_by, settings.stop_hint
                ));
                tracker.on_stop(Stop::Interrupted)
            }
            () = at(deadline), if tracker.stop().is_none() => {
                let t = settings.timeout.unwrap_or_default();
                progress.note(&format!("--timeout {t:?} passed: cancelling both sides"));
                tracker.on_stop(Stop::TimedOut(t))
            }
            () = at(grace) => {
                tracker.on_grace_expired(settings.cancel_grace);
                break;
            }
        };
        if !actions.is_empty() {
            grace.get_or_insert_with(|| Instant::now() + settings.cancel_grace);
            apply(actions, migration_id, source, destination, &mut tracker, progress).await;
        }
    }
    report.outcome = tracker.outcome();
    report.tracker = tracker;
    report.elapsed = started.elapsed();
    Ok(())
}

async fn next(events: &mut Events) -> Result<Option<pb::MigrationEvent>, transport::Error> {
    events.next().await
}

fn feed<P: Progress + ?Sized>(
    tracker: &mut Tracker,
    arrivals: &mut Vec<(Side, pb::MigrationEvent)>,
    side: Side,
    r: Result<Option<pb::MigrationEvent>, transport::Error>,
    progress: &mut P,
) -> Vec<Action> {
    match r {
        Ok(Some(event)) => {
            progress.event(side, &event);
            arrivals.push((side, event.clone()));
            tracker.on_event(side, event)
        }
        Ok(None) => tracker.on_stream_end(side, None),
        Err(e) => tracker.on_stream_end(side, Some(e.to_string())),
    }
}

#[cfg(test)]
#[path = "orchestrate_tests.rs"]
mod tests;
