//! The ownership protocol: who may run the VM at every instant, and the one commit point at
//! which that changes. Pure: no I/O, every decision a function of a state and an input.
//!
//! ```text
//!           SOURCE (coordinator)                         DESTINATION (participant)
//!  Preparing ─▶ Storage ─▶ Ram ─▶ Switchover        Preparing ─▶ Receiving
//!     │ (routes swapped, VM stopped, final copy)         │ (QEMU -S -incoming: never autostarts)
//!     ▼                                                  ▼
//!  StateSent  ◀── QEMU `completed` (return-path:      Loaded ── QEMU loaded the state, stays paused
//!     │           the destination loaded the state)      │  journal Voted (fsync)
//!     │  ◀──────────────────────── ctl `prepared` ────── Voted   (in doubt: never rolls back alone)
//!     │  journal HandedOver (fsync)  ══ COMMIT POINT ══
//!  HandedOver ─────────────────── ctl `commit` ───────▶ Committed  `cont`; journal after RESUME
//!     │  ◀──────────────────────── ctl `resumed` ─────── Running    plug released, announce-self
//!  Confirmed ─▶ (forwarding) ─▶ Finished
//! ```
//!
//! Before the commit the source owns the VM: every failure, cancel, lost peer or restart on
//! either side ends with the source running and the destination's QEMU destroyed. The
//! destination may destroy its copy on its own only until it voted; once it voted it waits for
//! the source's decision (`commit` or `abort`), which the source records before it sends it and
//! re-delivers until acknowledged. After the commit the destination owns the VM: cancels are
//! refused, the source never resumes, the destination retries its own resume and is never
//! killed. The destination runs guest code only after `commit`, which exists only after the
//! source recorded it; the source resumes only while no `commit` exists. So the VM runs in one
//! place at every instant.

use serde::{Deserialize, Serialize};

/// Which side may run the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Owner {
    /// The node the VM leaves.
    Source,
    /// The node the VM arrives on.
    Destination,
}

impl Owner {
    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Source => "source",
            Owner::Destination => "destination",
        }
    }
}

/// Where the source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceState {
    /// Forward, streams and QEMU settings being prepared.
    Preparing,
    /// Disks mirroring.
    Storage,
    /// RAM pre-copy.
    Ram,
    /// Routes swapped and the VM stopped: the final copy is under way. `voted` once the
    /// destination's vote arrived (it can overtake QEMU's own completion).
    Switchover {
        /// The destination voted `prepared`.
        voted: bool,
    },
    /// QEMU completed (postmigrate: it does not resume by itself); waiting for the vote.
    StateSent,
    /// The commit point: recorded durably, the VM belongs to the destination.
    HandedOver,
    /// The destination confirmed its VM runs.
    Confirmed,
    /// Terminal: the forward ended; the migration is over.
    Finished,
    /// Terminal: rolled back; the source runs the VM.
    RolledBack,
}

/// Where the destination stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestState {
    /// Incoming sandbox and QEMU being created.
    Preparing,
    /// Disks and RAM arriving.
    Receiving,
    /// QEMU loaded the whole state and stays paused; the vote is not yet recorded.
    Loaded,
    /// Voted `prepared` (recorded): in doubt until the source's decision arrives.
    Voted,
    /// `commit` received and recorded: this side owns the VM and resumes it.
    Committed,
    /// Terminal: the VM runs here, plug released.
    Running,
    /// Terminal: rolled back; this side's copy is destroyed.
    RolledBack,
}

/// What happens to a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceInput {
    /// Mirroring starts.
    StorageStarted,
    /// RAM pre-copy starts.
    RamStarted,
    /// The VM stopped (the engine's switchover or QEMU's own).
    Stopped,
    /// QEMU reported `completed`.
    QemuCompleted,
    /// The destination voted `prepared`.
    Voted,
    /// The destination reported its VM running.
    Resumed,
    /// The forward ended.
    ForwardEnded,
    /// A step failed (QMP, netlink, a stream, a deadline, a panic).
    Failed,
    /// A caller (directly or through the destination) asked to cancel.
    Cancel,
    /// The control stream to the destination broke or went silent.
    PeerLost,
    /// The agent restarted and found this state in the journal.
    Restarted,
}

/// What happens to a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestInput {
    /// The source's streams arrived.
    ReceivingStarted,
    /// QEMU loaded the state.
    QemuLoaded,
    /// The vote is recorded and about to be sent.
    VoteRecorded,
    /// The source's decision: commit.
    CommitReceived,
    /// The source's decision: abort.
    AbortReceived,
    /// The VM runs and the plug is released.
    Resumed,
    /// A step failed.
    Failed,
    /// A caller asked this side to cancel.
    Cancel,
    /// The control stream broke or went silent.
    PeerLost,
    /// The incoming QEMU exited.
    QemuExited,
    /// The agent restarted and found this state in the journal.
    Restarted,
}

/// What the driver must do after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Carry on.
    Continue,
    /// Source: record the commit durably, then send `commit`.
    Commit,
    /// Undo everything; the source VM runs (source: restore routes, `cont`; destination: kill
    /// its QEMU, remove its sandbox). The source also sends `abort`.
    RollBack,
    /// Destination: the caller's cancel goes to the source, which decides.
    AskSource,
    /// Destination in doubt: keep the paused copy, wait for the source's decision.
    AwaitDecision,
    /// Destination: record the commit, then `cont` (retrying) and release the plug.
    Resume,
    /// Source after the commit: keep the VM paused; deliver `commit` until acknowledged.
    Redeliver,
    /// The owner's copy is gone: nothing can run the VM any more; report it.
    Lost,
}

/// A transition the protocol does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A cancel after the commit.
    #[error("the VM already belongs to the {}: the migration is past its commit point and cannot be cancelled", owner.as_str())]
    PastCommit {
        /// Who owns the VM.
        owner: Owner,
    },
    /// The migration already ended.
    #[error("the migration already ended ({0})")]
    Ended(&'static str),
    /// An input that cannot happen in this state (a peer out of step, a bug).
    #[error("{input} is not possible in state {state}")]
    Unexpected {
        /// The state.
        state: &'static str,
        /// The input.
        input: &'static str,
    },
}

impl SourceState {
    /// Who may run the VM in this state.
    pub fn owner(self) -> Owner {
        match self {
            SourceState::HandedOver | SourceState::Confirmed | SourceState::Finished => Owner::Destination,
            _ => Owner::Source,
        }
    }

    /// Whether the source VM may be resumed in this state (only before the commit).
    pub fn may_resume(self) -> bool {
        self.owner() == Owner::Source
    }

    /// Whether no input follows.
    pub fn is_terminal(self) -> bool {
        matches!(self, SourceState::Finished | SourceState::RolledBack)
    }

    /// Name for messages and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Preparing => "preparing",
            SourceState::Storage => "storage",
            SourceState::Ram => "ram",
            SourceState::Switchover { .. } => "switchover",
            SourceState::StateSent => "state-sent",
            SourceState::HandedOver => "handed-over",
            SourceState::Confirmed => "confirmed",
            SourceState::Finished => "finished",
            SourceState::RolledBack => "rolled-back",
        }
    }

    /// The transition for `input`.
    ///
    /// # Errors
    /// [`ProtocolError::PastCommit`] for a cancel after the commit, [`ProtocolError::Ended`] for
    /// an input after the end, [`ProtocolError::Unexpected`] for inputs out of order.
    pub fn step(self, input: SourceInput) -> Result<(SourceState, Action), ProtocolError> {
        use SourceInput as I;
        use SourceState as S;
        let unexpected = || ProtocolError::Unexpected { state: self.as_str(), input: input.as_str() };
        if self.is_terminal() {
            return match input {
                I::Cancel if self == S::Finished => {
                    Err(ProtocolError::PastCommit { owner: Owner::Destination })
                }
                // A restart that finds a finished record has nothing to do.
                I::Restarted | I::ForwardEnded => Ok((self, Action::Continue)),
                _ => Err(ProtocolError::Ended(self.as_str())),
            };
        }
        let pre_commit = self.owner() == Owner::Source;
        Ok(match input {
            I::Failed | I::Cancel | I::PeerLost | I::Restarted if pre_commit => {
                (S::RolledBack, Action::RollBack)
            }
            I::Cancel => return Err(ProtocolError::PastCommit { owner: Owner::Destination }),
            // After the commit nothing undoes it: the source stays paused and keeps delivering
            // the decision (a restart included) until the destination confirms.
            I::Failed | I::PeerLost | I::Restarted if self == S::HandedOver => (self, Action::Redeliver),
            I::Failed | I::PeerLost | I::Restarted => (self, Action::Continue),
            I::StorageStarted => match self {
                S::Preparing => (S::Storage, Action::Continue),
                _ => return Err(unexpected()),
            },
            I::RamStarted => match self {
                S::Preparing | S::Storage => (S::Ram, Action::Continue),
                _ => return Err(unexpected()),
            },
            I::Stopped => match self {
                S::Ram => (S::Switchover { voted: false }, Action::Continue),
                S::Switchover { .. } => (self, Action::Continue),
                _ => return Err(unexpected()),
            },
            I::QemuCompleted => match self {
                // QEMU can complete on its own (nothing left to send) before the engine's stop.
                S::Ram | S::Switchover { voted: false } => (S::StateSent, Action::Continue),
                S::Switchover { voted: true } => (S::HandedOver, Action::Commit),
                _ => return Err(unexpected()),
            },
            I::Voted => match self {
                S::Ram | S::Switchover { .. } => (S::Switchover { voted: true }, Action::Continue),
                S::StateSent => (S::HandedOver, Action::Commit),
                _ => return Err(unexpected()),
            },
            I::Resumed => match self {
                S::HandedOver | S::Confirmed => (S::Confirmed, Action::Continue),
                _ => return Err(unexpected()),
            },
            I::ForwardEnded => match self {
                S::Confirmed | S::HandedOver => (S::Finished, Action::Continue),
                _ => return Err(unexpected()),
            },
        })
    }
}

impl SourceInput {
    /// Name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceInput::StorageStarted => "storage started",
            SourceInput::RamStarted => "RAM started",
            SourceInput::Stopped => "VM stopped",
            SourceInput::QemuCompleted => "QEMU completed",
            SourceInput::Voted => "destination voted",
            SourceInput::Resumed => "destination resumed",
            SourceInput::ForwardEnded => "forward ended",
            SourceInput::Failed => "failure",
            SourceInput::Cancel => "cancel",
            SourceInput::PeerLost => "peer lost",
            SourceInput::Restarted => "agent restart",
        }
    }
}

impl DestState {
    /// Who may run the VM in this state.
    pub fn owner(self) -> Owner {
        match self {
            DestState::Committed | DestState::Running => Owner::Destination,
            _ => Owner::Source,
        }
    }

    /// Whether this side may run guest code (only after the commit).
    pub fn may_run(self) -> bool {
        self.owner() == Owner::Destination
    }

    /// Whether this side may destroy its copy on its own (only before it voted).
    pub fn may_destroy(self) -> bool {
        matches!(
            self,
            DestState::Preparing | DestState::Receiving | DestState::Loaded | DestState::RolledBack
        )
    }

    /// Whether no input follows.
    pub fn is_terminal(self) -> bool {
        matches!(self, DestState::Running | DestState::RolledBack)
    }

    /// Name for messages and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            DestState::Preparing => "preparing",
            DestState::Receiving => "receiving",
            DestState::Loaded => "loaded",
            DestState::Voted => "voted",
            DestState::Committed => "committed",
            DestState::Running => "running",
            DestState::RolledBack => "rolled-back",
        }
    }

    /// The transition for `input`.
    ///
    /// # Errors
    /// [`ProtocolError::PastCommit`] for a cancel after the commit, [`ProtocolError::Ended`]
    /// after the end, [`ProtocolError::Unexpected`] for inputs out of order (e.g. a `commit`
    /// before this side voted).
    pub fn step(self, input: DestInput) -> Result<(DestState, Action), ProtocolError> {
        use DestInput as I;
        use DestState as S;
        let unexpected = || ProtocolError::Unexpected { state: self.as_str(), input: input.as_str() };
        if self.is_terminal() {
            return match input {
                I::Cancel if self == S::Running => {
                    Err(ProtocolError::PastCommit { owner: Owner::Destination })
                }
                I::Restarted | I::Resumed if self == S::Running => Ok((self, Action::Continue)),
                I::Restarted => Ok((self, Action::Continue)),
                _ => Err(ProtocolError::Ended(self.as_str())),
            };
        }
        Ok(match (self, input) {
            // Before the vote the source cannot commit: this side may give up alone.
            (
                S::Preparing | S::Receiving | S::Loaded,
                I::Failed | I::Cancel | I::PeerLost | I::QemuExited,
            ) => (S::RolledBack, Action::RollBack),
            (S::Preparing | S::Receiving | S::Loaded, I::Restarted | I::AbortReceived) => {
                (S::RolledBack, Action::RollBack)
            }
            (S::Preparing, I::ReceivingStarted) => (S::Receiving, Action::Continue),
            (S::Preparing | S::Receiving, I::QemuLoaded) => (S::Loaded, Action::Continue),
            (S::Loaded, I::VoteRecorded) => (S::Voted, Action::Continue),
            // In doubt: only the source's decision moves this side.
            (S::Voted, I::Failed | I::PeerLost | I::Restarted) => (S::Voted, Action::AwaitDecision),
            (S::Voted, I::Cancel) => (S::Voted, Action::AskSource),
            (S::Voted, I::AbortReceived) => (S::RolledBack, Action::RollBack),
            (S::Voted, I::CommitReceived) => (S::Committed, Action::Resume),
            // The copy that was to run is gone; if the source committed, nothing can run the VM.
            (S::Voted | S::Committed, I::QemuExited) => (S::RolledBack, Action::Lost),
            // The owner never gives up: it retries its resume.
            (S::Committed, I::Failed | I::PeerLost | I::Restarted | I::CommitReceived) => {
                (S::Committed, Action::Resume)
            }
            (S::Committed, I::Resumed) => (S::Running, Action::Continue),
            (S::Committed, I::Cancel) => return Err(ProtocolError::PastCommit { owner: Owner::Destination }),
            _ => return Err(unexpected()),
        })
    }
}

impl DestInput {
    /// Name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DestInput::ReceivingStarted => "receiving started",
            DestInput::QemuLoaded => "QEMU loaded the state",
            DestInput::VoteRecorded => "vote recorded",
            DestInput::CommitReceived => "commit received",
            DestInput::AbortReceived => "abort received",
            DestInput::Resumed => "VM resumed",
            DestInput::Failed => "failure",
            DestInput::Cancel => "cancel",
            DestInput::PeerLost => "peer lost",
            DestInput::QemuExited => "QEMU exited",
            DestInput::Restarted => "agent restart",
        }
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
