//! A Migration's `status` as the agents' events build it. Pure: [`StatusBuilder`] is fed the
//! events of both nodes in arrival order and says what the status is now, so the mapping is
//! tested without an API server (the controller only writes what it says).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use katamaran_api::v1alpha1::{
    condition, summarize, Cutover, Downtime, MigrationStatus, Owner, Phase, PhaseTiming, Progress, TunnelMode,
};
use katamaran_protos::v1 as pb;

use super::orchestrate::Side;

/// A Kubernetes time from unix nanoseconds (the epoch for values out of range).
pub fn micro_time(unix_nanos: u64) -> MicroTime {
    MicroTime(Timestamp::from_nanosecond(i128::from(unix_nanos)).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A Kubernetes time (whole seconds on the wire) from unix nanoseconds.
pub fn time(unix_nanos: u64) -> Time {
    Time(micro_time(unix_nanos).0)
}

/// Now, in unix nanoseconds.
pub fn now_nanos() -> u64 {
    crate::convert::unix_nanos(std::time::SystemTime::now())
}

fn phase_of(p: pb::Phase) -> Option<Phase> {
    Some(match p {
        pb::Phase::PHASE_PREPARING => Phase::Preparing,
        pb::Phase::PHASE_STORAGE => Phase::Storage,
        pb::Phase::PHASE_RAM => Phase::Ram,
        pb::Phase::PHASE_CUTOVER => Phase::Cutover,
        pb::Phase::PHASE_FORWARDING => Phase::Forwarding,
        pb::Phase::PHASE_COMPLETED => Phase::Completed,
        pb::Phase::PHASE_FAILED => Phase::Failed,
        pb::Phase::PHASE_CANCELLED => Phase::Cancelled,
        pb::Phase::PHASE_UNSPECIFIED => return None,
    })
}

fn micros(nanos: u64) -> i64 {
    i64::try_from(nanos / 1_000).unwrap_or(i64::MAX)
}

fn signed_micros(a: u64, b: u64) -> i64 {
    let d = i128::from(a) - i128::from(b);
    i64::try_from(d / 1_000).unwrap_or(0)
}

/// A metav1 condition.
pub fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    at_nanos: u64,
    generation: i64,
) -> Condition {
    Condition {
        type_: kind.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: time(at_nanos),
        observed_generation: Some(generation),
    }
}

/// Sets `c` among `conditions`, keeping the transition time when its status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, c: Condition) {
    match conditions.iter_mut().find(|x| x.type_ == c.type_) {
        Some(old) => {
            let at = if old.status == c.status {
                old.last_transition_time.clone()
            } else {
                c.last_transition_time.clone()
            };
            *old = Condition { last_transition_time: at, ..c };
        }
        None => conditions.push(c),
    }
}

/// Builds the status of one migration from its events.
#[derive(Debug, Clone)]
pub struct StatusBuilder {
    status: MigrationStatus,
    generation: i64,
    stop_nanos: u64,
    resume_nanos: u64,
    route_swapped_nanos: u64,
    plug_released_nanos: u64,
    /// Whether the last event changed something worth writing at once (a phase, a figure).
    urgent: bool,
}

impl StatusBuilder {
    /// From the status as accepted (phase, nodes, owner, start time, conditions).
    pub fn new(status: MigrationStatus, generation: i64) -> Self {
        Self {
            status,
            generation,
            stop_nanos: 0,
            resume_nanos: 0,
            route_swapped_nanos: 0,
            plug_released_nanos: 0,
            urgent: false,
        }
    }

    /// The status now.
    pub fn status(&self) -> &MigrationStatus {
        &self.status
    }

    /// Whether the status changed in a way worth writing at once; clears the flag.
    pub fn take_urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        self.status.phase.unwrap_or(Phase::Pending)
    }

    fn enter(&mut self, phase: Phase, at: u64) {
        if self.status.phase == Some(phase) {
            return;
        }
        if let Some(last) = self.status.phases.last_mut() {
            if last.end_time.is_none() {
                last.end_time = Some(micro_time(at));
            }
        }
        if !phase.is_terminal() {
            self.status.phases.push(PhaseTiming { phase, start_time: micro_time(at), end_time: None });
        }
        self.status.phase = Some(phase);
        self.urgent = true;
    }

    /// A remark (what happens now).
    pub fn note(&mut self, line: &str) {
        self.status.message = Some(line.to_owned());
    }

    /// An event from `side`.
    pub fn event(&mut self, side: Side, e: &pb::MigrationEvent) {
        let Ok(p) = e.phase.enum_value() else { return };
        let at = if e.timestamp_unix_nanos == 0 { now_nanos() } else { e.timestamp_unix_nanos };
        if let Some(c) = e.cutover.as_ref() {
            self.cutover(side, c);
        }
        if e.result.plug_dropped_packets > 0 {
            self.status.cutover.get_or_insert_with(Cutover::default).plug_drops =
                Some(i64::try_from(e.result.plug_dropped_packets).unwrap_or(i64::MAX));
        }
        if let Some(r) = e.ram.as_ref() {
            if r.total_bytes > 0 {
                let page = if r.page_size_bytes == 0 { 4096 } else { r.page_size_bytes };
                self.status.progress = Some(Progress {
                    bytes_transferred: i64::try_from(r.transferred_bytes).unwrap_or(i64::MAX),
                    bytes_remaining: i64::try_from(r.remaining_bytes).unwrap_or(i64::MAX),
                    bytes_total: i64::try_from(r.total_bytes).unwrap_or(i64::MAX),
                    iteration: i64::try_from(r.iteration).unwrap_or(i64::MAX),
                    dirty_bytes_per_second: i64::try_from(r.dirty_pages_rate.saturating_mul(page)).ok(),
                    expected_downtime_microseconds: (r.expected_downtime_ms > 0).then(|| {
                        i64::try_from(r.expected_downtime_ms.saturating_mul(1000)).unwrap_or(i64::MAX)
                    }),
                });
            }
        } else if let Some(s) = e.storage.as_ref() {
            if !s.drives.is_empty() {
                let (done, total) =
                    s.drives.iter().fold((0u64, 0u64), |(d, t), x| (d + x.done_bytes, t + x.total_bytes));
                self.status.progress = Some(Progress {
                    bytes_transferred: i64::try_from(done).unwrap_or(i64::MAX),
                    bytes_remaining: i64::try_from(total.saturating_sub(done)).unwrap_or(i64::MAX),
                    bytes_total: i64::try_from(total).unwrap_or(i64::MAX),
                    ..Progress::default()
                });
            }
        }
        // The source decides the migration; its phases are the resource's. The destination
        // contributes its figures (RESUME, the plug) and, at the end, its own failure.
        if side == Side::Source {
            if let Some(phase) = phase_of(p) {
                if phase == Phase::Forwarding || phase == Phase::Completed {
                    self.committed(at);
                }
                if phase == Phase::Forwarding {
                    set_condition(
                        &mut self.status.conditions,
                        condition(
                            condition::FORWARDING,
                            true,
                            "Forwarding",
                            "the source node forwards the VM's traffic to the target node",
                            at,
                            self.generation,
                        ),
                    );
                }
                if phase == Phase::Completed
                    && self.status.conditions.iter().any(|c| c.type_ == condition::FORWARDING)
                {
                    set_condition(
                        &mut self.status.conditions,
                        condition(
                            condition::FORWARDING,
                            false,
                            condition::FORWARD_RELEASED,
                            "the forward ended",
                            at,
                            self.generation,
                        ),
                    );
                }
                // Terminal phases are set by the controller once both sides are done.
                if !phase.is_terminal() {
                    self.enter(phase, at);
                }
            }
        } else if p == pb::Phase::PHASE_COMPLETED {
            // The destination runs the VM: ownership moved even if the source's event is late.
            self.committed(at);
        }
        if !e.message.is_empty() {
            self.status.message = Some(e.message.clone());
        }
        self.refresh_summary();
    }

    fn committed(&mut self, at: u64) {
        if self.status.owner != Some(Owner::Destination) {
            self.status.owner = Some(Owner::Destination);
            set_condition(
                &mut self.status.conditions,
                condition(
                    condition::COMMITTED,
                    true,
                    condition::OWNERSHIP_MOVED,
                    "both nodes recorded the commit point; the VM belongs to the target node",
                    at,
                    self.generation,
                ),
            );
            self.urgent = true;
        }
    }

    fn cutover(&mut self, side: Side, c: &pb::CutoverTimes) {
        match side {
            Side::Source => {
                if c.stop_unix_nanos > 0 {
                    self.stop_nanos = c.stop_unix_nanos;
                }
                if c.route_swapped_unix_nanos > 0 {
                    self.route_swapped_nanos = c.route_swapped_unix_nanos;
                }
                if c.downtime_ms > 0 {
                    self.status.downtime.get_or_insert_with(Downtime::default).qemu_microseconds =
                        Some(i64::try_from(c.downtime_ms.saturating_mul(1000)).unwrap_or(i64::MAX));
                    self.urgent = true;
                }
            }
            Side::Destination => {
                if c.resume_unix_nanos > 0 {
                    self.resume_nanos = c.resume_unix_nanos;
                }
                if c.plug_released_unix_nanos > 0 {
                    self.plug_released_nanos = c.plug_released_unix_nanos;
                }
            }
        }
        if self.stop_nanos > 0 && self.resume_nanos > self.stop_nanos {
            self.status.downtime.get_or_insert_with(Downtime::default).guest_pause_microseconds =
                Some(micros(self.resume_nanos - self.stop_nanos));
            self.urgent = true;
        }
        let cut = self.status.cutover.get_or_insert_with(Cutover::default);
        if self.stop_nanos > 0 && self.route_swapped_nanos > 0 {
            cut.route_swap_offset_microseconds =
                Some(signed_micros(self.route_swapped_nanos, self.stop_nanos));
        }
        if self.resume_nanos > 0 && self.plug_released_nanos >= self.resume_nanos {
            cut.plug_release_microseconds = Some(micros(self.plug_released_nanos - self.resume_nanos));
        }
    }

    /// The tunnel mode the engine resolved (from the source's options once known).
    pub fn tunnel_mode(&mut self, mode: TunnelMode) {
        self.status.cutover.get_or_insert_with(Cutover::default).tunnel_mode = Some(mode);
    }

    /// Ends the migration: `phase` (terminal, also the `Finished` condition's reason), who owns
    /// the VM, why.
    pub fn finish(&mut self, phase: Phase, owner: Owner, message: &str) {
        let at = now_nanos();
        self.enter(phase, at);
        self.status.owner = Some(owner);
        self.status.completion_time = Some(time(at));
        self.status.message = Some(message.to_owned());
        set_condition(
            &mut self.status.conditions,
            condition(condition::FINISHED, true, phase.as_str(), message, at, self.generation),
        );
        if phase == Phase::Completed {
            // The figures stay; the live progress of a finished migration says nothing more.
            if let Some(p) = self.status.progress.as_mut() {
                p.bytes_remaining = 0;
            }
        }
        self.refresh_summary();
    }

    fn refresh_summary(&mut self) {
        let phase = self.phase();
        self.status.summary =
            Some(summarize(phase, self.status.progress.as_ref(), self.status.downtime.as_ref()));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(p: pb::Phase, at_ms: u64) -> pb::MigrationEvent {
        let mut e = pb::MigrationEvent::new();
        e.phase = p.into();
        e.timestamp_unix_nanos = 1_700_000_000_000_000_000 + at_ms * 1_000_000;
        e
    }

    #[test]
    fn the_sources_phases_drive_the_status_and_the_figures_come_from_both_sides() {
        // As the controller accepts it: Preparing, owned by the source.
        let accepted = MigrationStatus {
            phase: Some(Phase::Preparing),
            owner: Some(Owner::Source),
            phases: vec![PhaseTiming { phase: Phase::Preparing, start_time: micro_time(1), end_time: None }],
            ..Default::default()
        };
        let mut b = StatusBuilder::new(accepted, 1);
        b.event(Side::Source, &ev(pb::Phase::PHASE_PREPARING, 0));
        let mut ram = ev(pb::Phase::PHASE_RAM, 10);
        let r = ram.ram.mut_or_insert_default();
        (r.transferred_bytes, r.remaining_bytes, r.total_bytes, r.iteration) = (300, 700, 1000, 2);
        (r.dirty_pages_rate, r.page_size_bytes, r.expected_downtime_ms) = (10, 4096, 3);
        b.event(Side::Source, &ram);
        assert_eq!(b.phase(), Phase::Ram);
        let p = b.status().progress.clone().unwrap();
        assert_eq!((p.bytes_transferred, p.bytes_remaining, p.iteration), (300, 700, 2));
        assert_eq!((p.dirty_bytes_per_second, p.expected_downtime_microseconds), (Some(40960), Some(3000)));
        assert!(b.take_urgent() && !b.take_urgent());

        // The destination's own phases do not move the resource.
        b.event(Side::Destination, &ev(pb::Phase::PHASE_CUTOVER, 20));
        assert_eq!(b.phase(), Phase::Ram);

        let mut cut = ev(pb::Phase::PHASE_CUTOVER, 30);
        let c = cut.cutover.mut_or_insert_default();
        c.stop_unix_nanos = cut.timestamp_unix_nanos;
        c.route_swapped_unix_nanos = cut.timestamp_unix_nanos - 150_000;
        c.downtime_ms = 4;
        b.event(Side::Source, &cut);
        let mut done = ev(pb::Phase::PHASE_COMPLETED, 60);
        let c = done.cutover.mut_or_insert_default();
        c.resume_unix_nanos = cut.timestamp_unix_nanos + 30_500_000;
        c.plug_released_unix_nanos = c.resume_unix_nanos + 90_000;
        b.event(Side::Destination, &done);
        assert_eq!(b.status().owner, Some(Owner::Destination), "the destination runs the VM");
        let d = b.status().downtime.clone().unwrap();
        assert_eq!((d.qemu_microseconds, d.guest_pause_microseconds), (Some(4000), Some(30_500)));
        let c = b.status().cutover.clone().unwrap();
        assert_eq!((c.route_swap_offset_microseconds, c.plug_release_microseconds), (Some(-150), Some(90)));

        b.event(Side::Source, &ev(pb::Phase::PHASE_FORWARDING, 70));
        assert_eq!(b.phase(), Phase::Forwarding);
        b.event(Side::Source, &ev(pb::Phase::PHASE_COMPLETED, 900));
        assert_eq!(b.phase(), Phase::Forwarding, "terminal phases are the controller's call");
        b.finish(Phase::Completed, Owner::Destination, "the VM runs on node-b");
        let s = b.status();
        assert_eq!(s.phase, Some(Phase::Completed));
        let names: Vec<Phase> = s.phases.iter().map(|p| p.phase).collect();
        assert_eq!(names, [Phase::Preparing, Phase::Ram, Phase::Cutover, Phase::Forwarding]);
        assert!(s.phases.iter().all(|p| p.end_time.is_some()), "{:?}", s.phases);
        let kinds: Vec<(&str, &str)> =
            s.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str())).collect();
        assert_eq!(
            kinds,
            [("Committed", "True"), ("Forwarding", "False"), ("Finished", "True")],
            "{:?}",
            s.conditions
        );
        assert_eq!(s.summary.as_ref().unwrap().downtime, "30ms", "the guest pause, not QEMU's figure");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut cs = Vec::new();
        set_condition(&mut cs, condition("Forwarding", true, "Forwarding", "a", 1_000_000_000, 1));
        set_condition(&mut cs, condition("Forwarding", true, "Forwarding", "b", 9_000_000_000, 1));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].message, "b");
        assert_eq!(cs[0].last_transition_time, time(1_000_000_000));
        set_condition(&mut cs, condition("Forwarding", false, "ForwardReleased", "c", 9_000_000_000, 1));
        assert_eq!(cs[0].last_transition_time, time(9_000_000_000));
    }
}
