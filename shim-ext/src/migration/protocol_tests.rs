//! Every state × every input of both roles, and a model check of the two roles together.

use std::collections::{BTreeSet, VecDeque};

use super::*;

const SOURCE_STATES: [SourceState; 10] = [
    SourceState::Preparing,
    SourceState::Storage,
    SourceState::Ram,
    SourceState::Switchover { voted: false },
    SourceState::Switchover { voted: true },
    SourceState::StateSent,
    SourceState::HandedOver,
    SourceState::Confirmed,
    SourceState::Finished,
    SourceState::RolledBack,
];

const SOURCE_INPUTS: [SourceInput; 11] = [
    SourceInput::StorageStarted,
    SourceInput::RamStarted,
    SourceInput::Stopped,
    SourceInput::QemuCompleted,
    SourceInput::Voted,
    SourceInput::Resumed,
    SourceInput::ForwardEnded,
    SourceInput::Failed,
    SourceInput::Cancel,
    SourceInput::PeerLost,
    SourceInput::Restarted,
];

const DEST_STATES: [DestState; 7] = [
    DestState::Preparing,
    DestState::Receiving,
    DestState::Loaded,
    DestState::Voted,
    DestState::Committed,
    DestState::Running,
    DestState::RolledBack,
];

const DEST_INPUTS: [DestInput; 11] = [
    DestInput::ReceivingStarted,
    DestInput::QemuLoaded,
    DestInput::VoteRecorded,
    DestInput::CommitReceived,
    DestInput::AbortReceived,
    DestInput::Resumed,
    DestInput::Failed,
    DestInput::Cancel,
    DestInput::PeerLost,
    DestInput::QemuExited,
    DestInput::Restarted,
];

#[test]
fn source_every_state_and_input() {
    for s in SOURCE_STATES {
        for i in SOURCE_INPUTS {
            let r = s.step(i);
            let what = format!("{} × {}", s.as_str(), i.as_str());
            match &r {
                Ok((next, action)) => {
                    // Ownership never goes back to the source once handed over.
                    assert!(
                        !(s.owner() == Owner::Destination && next.owner() == Owner::Source),
                        "{what}: ownership went back: {r:?}"
                    );
                    // Only a commit moves ownership, and only a commit action does.
                    let moved = s.owner() == Owner::Source && next.owner() == Owner::Destination;
                    assert_eq!(moved, *action == Action::Commit, "{what}: {r:?}");
                    if *action == Action::RollBack {
                        assert!(
                            s.may_resume(),
                            "{what}: a rollback resumes the source, only before the commit"
                        );
                        assert_eq!(*next, SourceState::RolledBack, "{what}");
                    }
                }
                Err(ProtocolError::PastCommit { owner }) => {
                    assert_eq!(i, SourceInput::Cancel, "{what}: {r:?}");
                    assert_eq!(*owner, Owner::Destination);
                    assert!(!s.may_resume(), "{what}: refused only past the commit");
                }
                Err(_) => {}
            }
            // A cancel, failure, lost peer or restart before the commit always rolls back.
            if s.may_resume()
                && !s.is_terminal()
                && matches!(
                    i,
                    SourceInput::Cancel
                        | SourceInput::Failed
                        | SourceInput::PeerLost
                        | SourceInput::Restarted
                )
            {
                assert_eq!(r, Ok((SourceState::RolledBack, Action::RollBack)), "{what}");
            }
            // After the commit, nothing but the forward's end changes the state.
            if s == SourceState::HandedOver
                && matches!(i, SourceInput::Failed | SourceInput::PeerLost | SourceInput::Restarted)
            {
                assert_eq!(r, Ok((SourceState::HandedOver, Action::Redeliver)), "{what}");
            }
        }
    }
}

#[test]
fn source_commits_only_with_both_the_vote_and_qemu_completed() {
    let commits: Vec<(SourceState, SourceInput)> = SOURCE_STATES
        .iter()
        .flat_map(|s| SOURCE_INPUTS.iter().map(move |i| (*s, *i)))
        .filter(|(s, i)| matches!(s.step(*i), Ok((_, Action::Commit))))
        .collect();
    assert_eq!(
        commits,
        vec![
            (SourceState::Switchover { voted: true }, SourceInput::QemuCompleted),
            (SourceState::StateSent, SourceInput::Voted),
        ]
    );
    // Vote first or QEMU first: the same commit.
    let a = SourceState::Ram
        .step(SourceInput::Stopped)
        .and_then(|(s, _)| s.step(SourceInput::Voted))
        .and_then(|(s, _)| s.step(SourceInput::QemuCompleted));
    let b = SourceState::Ram
        .step(SourceInput::Stopped)
        .and_then(|(s, _)| s.step(SourceInput::QemuCompleted))
        .and_then(|(s, _)| s.step(SourceInput::Voted));
    assert_eq!(a, Ok((SourceState::HandedOver, Action::Commit)));
    assert_eq!(a, b);
}

#[test]
fn destination_every_state_and_input() {
    for s in DEST_STATES {
        for i in DEST_INPUTS {
            let r = s.step(i);
            let what = format!("{} × {}", s.as_str(), i.as_str());
            if let Ok((next, action)) = &r {
                // Guest code runs only after a commit received in the voted state.
                if next.may_run() && !s.may_run() {
                    assert_eq!((s, i), (DestState::Voted, DestInput::CommitReceived), "{what}");
                    assert_eq!(*action, Action::Resume);
                }
                // This side destroys its copy alone only before it voted, or on the source's abort.
                if *action == Action::RollBack {
                    assert!(s.may_destroy() || i == DestInput::AbortReceived, "{what}: {r:?}");
                    assert_eq!(*next, DestState::RolledBack);
                }
                // Once it owns the VM, it never rolls back (only a dead QEMU ends it).
                if s.owner() == Owner::Destination && next.owner() == Owner::Source {
                    assert_eq!((i, *action), (DestInput::QemuExited, Action::Lost), "{what}");
                }
            }
            if s == DestState::Voted
                && matches!(i, DestInput::Failed | DestInput::PeerLost | DestInput::Restarted)
            {
                assert_eq!(r, Ok((DestState::Voted, Action::AwaitDecision)), "{what}: in doubt, it waits");
            }
            if s.may_run() && i == DestInput::Cancel {
                assert_eq!(r, Err(ProtocolError::PastCommit { owner: Owner::Destination }), "{what}");
            }
            if s == DestState::Voted && i == DestInput::Cancel {
                assert_eq!(r, Ok((DestState::Voted, Action::AskSource)), "{what}: the source decides");
            }
        }
    }
}

#[test]
fn a_commit_before_the_vote_is_a_protocol_error() {
    for s in [DestState::Preparing, DestState::Receiving, DestState::Loaded] {
        assert!(matches!(s.step(DestInput::CommitReceived), Err(ProtocolError::Unexpected { .. })), "{s:?}");
    }
    let e = DestState::Running.step(DestInput::Cancel).expect_err("refused");
    assert!(e.to_string().contains("already belongs to the destination"), "{e}");
}

/// The two roles together: every interleaving of their steps, messages in flight, failures,
/// cancels and agent restarts. Invariants: the VM never runs in two places; once a side owns
/// it the other never runs it; and in every end state where nothing more can happen exactly one
/// copy runs.
#[test]
fn model_check_one_owner_at_every_instant() {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    enum Vm {
        Running,
        Paused,
        Absent,
    }
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
    struct World {
        src: String,
        dst: String,
        src_vm: Vm,
        dst_vm: Vm,
        qemu_completed: bool,
        vote_in_flight: bool,
        decision_in_flight: Option<bool>,
        faults: u8,
    }
    fn src_of(w: &World) -> SourceState {
        SOURCE_STATES.iter().copied().find(|s| format!("{s:?}") == w.src).expect("known state")
    }
    fn dst_of(w: &World) -> DestState {
        DEST_STATES.iter().copied().find(|s| format!("{s:?}") == w.dst).expect("known state")
    }
    fn apply_src(w: &World, i: SourceInput) -> Option<World> {
        let (next, action) = src_of(w).step(i).ok()?;
        let mut n = w.clone();
        n.src = format!("{next:?}");
        match action {
            Action::RollBack => {
                n.src_vm = Vm::Running;
                n.decision_in_flight = Some(false);
            }
            Action::Commit | Action::Redeliver => n.decision_in_flight = Some(true),
            _ => {}
        }
        Some(n)
    }
    fn apply_dst(w: &World, i: DestInput) -> Option<World> {
        let (next, action) = dst_of(w).step(i).ok()?;
        let mut n = w.clone();
        n.dst = format!("{next:?}");
        match action {
            Action::RollBack | Action::Lost => n.dst_vm = Vm::Absent,
            Action::Resume => n.dst_vm = if n.dst_vm == Vm::Absent { Vm::Absent } else { Vm::Running },
            Action::AskSource => {}
            _ => {}
        }
        if i == DestInput::VoteRecorded {
            n.vote_in_flight = true;
        }
        Some(n)
    }
    let start = World {
        src: format!("{:?}", SourceState::Preparing),
        dst: format!("{:?}", DestState::Preparing),
        src_vm: Vm::Running,
        dst_vm: Vm::Paused,
        qemu_completed: false,
        vote_in_flight: false,
        decision_in_flight: None,
        faults: 0,
    };
    const MAX_FAULTS: u8 = 2;
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([start]);
    let mut ends = 0;
    while let Some(w) = queue.pop_front() {
        if !seen.insert(w.clone()) {
            continue;
        }
        assert!(!(w.src_vm == Vm::Running && w.dst_vm == Vm::Running), "two copies run: {w:?}");
        let (s, d) = (src_of(&w), dst_of(&w));
        if s.owner() == Owner::Destination {
            assert_ne!(w.src_vm, Vm::Running, "the source runs after handing over: {w:?}");
        }
        if d.may_run() {
            assert_eq!(s.owner(), Owner::Destination, "the destination runs without a commit: {w:?}");
        }
        let mut next: Vec<World> = Vec::new();
        // The source's normal course.
        for i in [SourceInput::StorageStarted, SourceInput::RamStarted, SourceInput::ForwardEnded] {
            next.extend(apply_src(&w, i));
        }
        if s == SourceState::Ram || matches!(s, SourceState::Switchover { .. }) {
            if let Some(mut n) = apply_src(&w, SourceInput::Stopped) {
                n.src_vm = Vm::Paused;
                next.push(n);
            }
        }
        // QEMU completes only once the destination's QEMU loaded everything (return-path).
        if !w.qemu_completed && matches!(d, DestState::Loaded | DestState::Voted) && w.src_vm == Vm::Paused {
            if let Some(mut n) = apply_src(&w, SourceInput::QemuCompleted) {
                n.qemu_completed = true;
                next.push(n);
            }
        }
        // The source's bounded wait for the vote runs out (not a fault: it always can).
        if s == SourceState::StateSent && !w.vote_in_flight {
            next.extend(apply_src(&w, SourceInput::PeerLost));
        }
        // A destination that gave up breaks the streams (and says so): the source learns it.
        if d == DestState::RolledBack && s.may_resume() && !s.is_terminal() {
            next.extend(apply_src(&w, SourceInput::Failed));
        }
        // Messages arrive.
        if w.vote_in_flight {
            if let Some(mut n) = apply_src(&w, SourceInput::Voted) {
                n.vote_in_flight = false;
                next.push(n);
            }
            let mut lost = w.clone();
            lost.vote_in_flight = false;
            next.push(lost);
        }
        if let Some(commit) = w.decision_in_flight {
            let i = if commit { DestInput::CommitReceived } else { DestInput::AbortReceived };
            match apply_dst(&w, i) {
                Some(mut n) => {
                    n.decision_in_flight = None;
                    next.push(n);
                }
                None => {
                    let mut n = w.clone();
                    n.decision_in_flight = None;
                    next.push(n);
                }
            }
        }
        // The destination's normal course.
        if w.dst_vm != Vm::Absent {
            next.extend(apply_dst(&w, DestInput::ReceivingStarted));
            if w.src_vm == Vm::Paused {
                next.extend(apply_dst(&w, DestInput::QemuLoaded));
            }
            next.extend(apply_dst(&w, DestInput::VoteRecorded));
            if w.dst_vm == Vm::Running {
                next.extend(apply_dst(&w, DestInput::Resumed));
            }
        }
        // Faults, bounded in number.
        if w.faults < MAX_FAULTS {
            for i in [SourceInput::Failed, SourceInput::Cancel, SourceInput::PeerLost, SourceInput::Restarted]
            {
                if let Some(mut n) = apply_src(&w, i) {
                    n.faults += 1;
                    next.push(n);
                }
            }
            for i in [DestInput::Failed, DestInput::Cancel, DestInput::PeerLost, DestInput::Restarted] {
                if let Some(mut n) = apply_dst(&w, i) {
                    n.faults += 1;
                    next.push(n);
                }
            }
            if w.dst_vm != Vm::Absent && d.may_destroy() {
                // The incoming QEMU dies before it voted. (After its vote, a crash is a crash of
                // the VM's designated copy: docs/ENGINE.md lists it as the one loss no protocol
                // prevents.)
                if let Some(mut n) = apply_dst(&w, DestInput::QemuExited) {
                    n.faults += 1;
                    n.dst_vm = Vm::Absent;
                    next.push(n);
                }
            }
        }
        next.retain(|n| n != &w);
        if next.is_empty() {
            ends += 1;
            // Quiescent: exactly one copy runs.
            let running = usize::from(w.src_vm == Vm::Running) + usize::from(w.dst_vm == Vm::Running);
            assert_eq!(running, 1, "an end state with {running} running copies: {w:?}");
        }
        queue.extend(next);
    }
    assert!(seen.len() > 80, "the model explored {} states", seen.len());
    assert!(ends > 0);
}
