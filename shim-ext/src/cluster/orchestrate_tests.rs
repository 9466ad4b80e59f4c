#![allow(clippy::unwrap_used)]

use super::*;

use pb::Phase::*;

fn ev(phase: pb::Phase, seq: u64) -> pb::MigrationEvent {
    let mut e = pb::MigrationEvent::new();
    e.phase = phase.into();
    e.sequence = seq;
    e.message = format!("{phase:?}");
    e
}

fn failed(seq: u64, kind: pb::ErrorKind, message: &str) -> pb::MigrationEvent {
    let mut e = ev(PHASE_FAILED, seq);
    let r = e.result.mut_or_insert_default();
    r.error_kind = kind.into();
    r.error_message = message.into();
    e
}

fn cancel(side: Side) -> Action {
    Action::Cancel { side, reason: String::new() }
}

/// Actions with their reasons blanked, for comparing who is cancelled.
fn sides(actions: Vec<Action>) -> Vec<Action> {
    actions.into_iter().map(|Action::Cancel { side, .. }| cancel(side)).collect()
}

fn run_to(t: &mut Tracker, side: Side, phases: &[pb::Phase]) {
    for (i, p) in phases.iter().enumerate() {
        assert!(t.on_event(side, ev(*p, i as u64 + 1)).is_empty(), "{p:?} on the {side:?} cancels nothing");
    }
}

#[test]
fn success_once_the_destination_completes_and_the_source_forwards() {
    let mut t = Tracker::new(false);
    run_to(&mut t, Side::Source, &[PHASE_PREPARING, PHASE_RAM, PHASE_CUTOVER]);
    run_to(&mut t, Side::Destination, &[PHASE_PREPARING, PHASE_RAM, PHASE_CUTOVER, PHASE_COMPLETED]);
    assert!(!t.done(), "the source has not swapped to forwarding yet");
    t.on_event(Side::Source, ev(PHASE_FORWARDING, 4));
    assert!(t.done());
    assert_eq!(t.outcome(), Outcome::Succeeded);
    assert!(t.is_open(Side::Source), "forwarding goes on without the client");
}

#[test]
fn wait_forwarding_waits_for_the_source_to_complete() {
    let mut t = Tracker::new(true);
    run_to(&mut t, Side::Destination, &[PHASE_PREPARING, PHASE_COMPLETED]);
    run_to(&mut t, Side::Source, &[PHASE_PREPARING, PHASE_RAM, PHASE_CUTOVER, PHASE_FORWARDING]);
    assert!(!t.done());
    t.on_event(Side::Source, ev(PHASE_COMPLETED, 5));
    assert!(t.done());
    assert_eq!(t.outcome(), Outcome::Succeeded);
}

#[test]
fn a_failed_side_cancels_the_other_and_is_the_reported_cause() {
    let mut t = Tracker::new(false);
    run_to(&mut t, Side::Source, &[PHASE_PREPARING, PHASE_RAM]);
    run_to(&mut t, Side::Destination, &[PHASE_PREPARING]);
    let actions =
        t.on_event(Side::Destination, failed(2, pb::ErrorKind::ERROR_KIND_QEMU, "destination QEMU exited"));
    assert_eq!(
        actions,
        [Action::Cancel {
            side: Side::Source,
            reason: "the destination failed: destination QEMU exited".into()
        }]
    );
    assert!(!t.done(), "wait for the source to confirm");
    // The source's confirmation is the consequence, not a second cause.
    let mut confirmed = ev(PHASE_CANCELLED, 3);
    confirmed.result.mut_or_insert_default().error_kind = pb::ErrorKind::ERROR_KIND_CANCELLED.into();
    assert!(t.on_event(Side::Source, confirmed).is_empty());
    assert!(t.done());
    assert_eq!(
        t.outcome(),
        Outcome::Failed {
            side: Some(Side::Destination),
            kind: "QEMU".into(),
            message: "destination QEMU exited".into()
        }
    );
}

#[test]
fn ctrl_c_cancels_through_the_source_once_and_ends_cancelled() {
    let mut t = Tracker::new(false);
    run_to(&mut t, Side::Source, &[PHASE_PREPARING, PHASE_RAM]);
    run_to(&mut t, Side::Destination, &[PHASE_PREPARING]);
    assert_eq!(sides(t.on_stop(Stop::Interrupted)), [cancel(Side::Source)], "through the owner only");
    assert!(t.on_stop(Stop::Interrupted).is_empty(), "a second stop sends nothing");
    t.on_cancel_answer(Side::Source, Ok(pb::CancelResponse { cancelled: true, ..Default::default() }));
    assert!(t.on_event(Side::Source, ev(PHASE_CANCELLED, 3)).is_empty(), "already being cancelled");
    assert!(t.on_event(Side::Destination, ev(PHASE_CANCELLED, 2)).is_empty());
    assert!(t.done());
    assert_eq!(t.outcome(), Outcome::Cancelled);
    assert!(t.notes().is_empty(), "{:?}", t.notes());
}

#[test]
fn ctrl_c_after_the_cutover_lets_the_migration_finish() {
    let mut t = Tracker::new(false);
    run_to(&mut t, Side::Source, &[PHASE_PREPARING, PHASE_RAM, PHASE_CUTOVER]);
    run_to(&mut t, Side::Destination, &[PHASE_PREPARING, PHASE_RAM, PHASE_CUTOVER]);
    assert_eq!(t.on_stop(Stop::Interrupted).len(), 1);
    let mut refused = pb::CancelResponse::new();
    refused.phase = PHASE_CUTOVER.into();
    t.on_cancel_answer(Side::Source, Ok(refused));
    assert!(t.notes()[0].contains("past its point of no return (cutover)"), "{:?}", t.notes());
    t.on_cancel_answer(
        Side::Source,
        Err("FAILED_PRECONDITION: the VM already belongs to the destination: the migration is past its commit point".into()),
    );
    assert!(t.notes()[1].contains("the cancel was refused"), "{:?}", t.notes());
    t.on_event(Side::Destination, ev(PHASE_COMPLETED, 4));
    t.on_event(Side::Source, ev(PHASE_FORWARDING, 4));
    assert!(t.done());
    assert_eq!(t.outcome(), Outcome::Succeeded, "the VM moved: that is the result");
}

#[test]
fn a_timeout_is_a_failure_not_a_user_cancel() {
    let mut t = Tracker::new(false);
    run_to(&mut t, Side::Source, &[PHASE_RAM]);
    run_to(&mut t, Side::Destination, &[PHASE_RAM]);
    let t_out = Duration::from_secs(600);
    assert_eq!(t.on_stop(Stop::TimedOut(t_out)).len(), 1);
    t.on_event(Side::Source, ev(PHASE_CANCELLED, 2));
    t.on_event(Side::Destination, ev(PHASE_CANCELLED, 2));
    match t.outcome() {
        Outcome::Failed { side: None, kind, message } => {
            assert_eq!(kind, "TIMEOUT");
            assert!(message.contains("600s"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_lost_source_agent_fails_the_run_and_its_destination_is_not_cancelled_by_us() {
    let mut t = Tracker::new(false);
    run_to(&mut t, Side::Source, &[PHASE_RAM]);
    let actions = t.on_stream_end(Side::Source, Some("socket closed".into()));
    // The destination gives up on its own before its vote, or waits for the source's decision
    // after it: a client's cancel there would not be the owner's.
    assert!(actions.is_empty(), "{actions:?}");
    assert!(!t.is_open(Side::Source));
    t.on_event(Side::Destination, ev(PHASE_CANCELLED, 1));
    match t.outcome() {
        Outcome::Failed { side: Some(Side::Source), kind, message } => {
            assert_eq!(kind, "LOST");
            assert!(message.contains("socket closed"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_side_cancelled_by_someone_else_is_a_failure() {
    let mut t = Tracker::new(false);
    let mut e = ev(PHASE_CANCELLED, 1);
    e.message = "cancelled with katactl".into();
    assert!(t.on_event(Side::Source, e).is_empty(), "the source told its destination itself");
    t.on_event(Side::Destination, ev(PHASE_CANCELLED, 1));
    assert!(
        matches!(t.outcome(), Outcome::Failed { side: Some(Side::Source), ref kind, .. } if kind == "CANCELLED")
    );
}

#[test]
fn replayed_events_are_ignored() {
    let mut t = Tracker::new(false);
    t.on_event(Side::Source, ev(PHASE_RAM, 3));
    t.on_event(Side::Source, ev(PHASE_RAM, 3));
    t.on_event(Side::Source, ev(PHASE_RAM, 2));
    assert_eq!(t.events(Side::Source).len(), 1);
    // A phase this client does not know keeps the last known one and is kept in the log.
    let mut newer = pb::MigrationEvent::new();
    newer.phase = katamaran_protos::protobuf::EnumOrUnknown::from_i32(42);
    newer.sequence = 4;
    assert!(t.on_event(Side::Source, newer).is_empty());
    assert_eq!(t.events(Side::Source).len(), 2);
    assert!(t.is_open(Side::Source));
}

#[test]
fn the_grace_running_out_is_noted_per_side() {
    let mut t = Tracker::new(false);
    t.on_stop(Stop::Interrupted);
    t.on_event(Side::Destination, ev(PHASE_CANCELLED, 1));
    t.on_grace_expired(Duration::from_secs(60));
    assert_eq!(t.notes().len(), 1);
    assert!(t.notes()[0].starts_with("the source did not confirm"), "{:?}", t.notes());
    assert_eq!(t.outcome(), Outcome::Cancelled);
}

fn report_of(t: Tracker) -> Report {
    Report {
        migration_id: "mig-0123456789ab".into(),
        sandbox_id: "sb".into(),
        destination_sandbox_id: None,
        source_address: "192.0.2.1".into(),
        destination_address: None,
        outcome: t.outcome(),
        tracker: t,
        events: Vec::new(),
        elapsed: Duration::ZERO,
    }
}

fn at(phase: pb::Phase, seq: u64, ms: u64) -> pb::MigrationEvent {
    let mut e = ev(phase, seq);
    e.timestamp_unix_nanos = ms * 1_000_000;
    e
}

#[test]
fn a_report_reads_phase_times_ends_and_figures_from_each_side() {
    let mut t = Tracker::new(false);
    for (i, (p, ms)) in
        [(PHASE_PREPARING, 0), (PHASE_RAM, 10), (PHASE_RAM, 30), (PHASE_CUTOVER, 50)].into_iter().enumerate()
    {
        t.on_event(Side::Source, at(p, i as u64 + 1, ms));
    }
    let mut fwd = at(PHASE_FORWARDING, 5, 51);
    fwd.cutover.mut_or_insert_default().downtime_ms = 31;
    t.on_event(Side::Source, fwd);
    let r = report_of(t.clone());
    assert_eq!(
        r.phase_durations(Side::Source),
        vec![
            (PHASE_PREPARING, Duration::from_millis(10)),
            (PHASE_RAM, Duration::from_millis(40)),
            (PHASE_CUTOVER, Duration::from_millis(1)),
        ]
    );
    assert_eq!(
        r.terminal(Side::Source).map(phase),
        Some(PHASE_FORWARDING),
        "forwarding ends the source's part"
    );
    assert_eq!(r.cutover(Side::Source).map(|c| c.downtime_ms), Some(31));
    assert!(r.terminal(Side::Destination).is_none());
    assert!(!r.succeeded(), "the destination never completed");
    assert!(r.failure().is_some_and(|f| f.contains("LOST")), "{:?}", r.failure());

    t.on_event(Side::Destination, ev(PHASE_COMPLETED, 1));
    let r = report_of(t.clone());
    assert!(r.succeeded() && r.failure().is_none() && !r.stopped());

    let mut t = Tracker::new(false);
    t.on_event(Side::Destination, failed(1, pb::ErrorKind::ERROR_KIND_QEMU, "QEMU exited"));
    let r = report_of(t);
    assert_eq!(r.failure().as_deref(), Some("destination: QEMU: QEMU exited"));
}
