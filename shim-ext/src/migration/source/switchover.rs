//! When to switch over: the engine's stand-in for QEMU's own completion test.
//!
//! QEMU syncs its dirty bitmap only when what is left of the current pass drops below
//! `bandwidth × downtime-limit`, and completes (stops the VM) when a sync finds less than that.
//! The engine must stop the VM itself, after the route swap (DESIGN.md decision 4), so QEMU must
//! not complete first; but with a limit of 0 QEMU never syncs: it completes at the end of its
//! first pass and sends everything the guest dirtied during that pass while the guest is paused
//! (890 ms on a 512 MiB guest dirtying memory, against 11 ms under bare QEMU).
//!
//! So QEMU gets [`ITERATE_LIMIT`] while pre-copy runs: it syncs at the end of every pass, and its
//! `remaining` then counts what the guest dirtied, yet it completes by itself only after a pass in
//! which the guest dirtied less than a millisecond of transfer. From the polls, [`Switchover`]
//! learns how fast the guest dirties memory (what each sync found over the pass before it) and how
//! fast QEMU clears what is left, and says when stopping now would pause the guest for no longer
//! than the real downtime limit: the moment QEMU would have completed with that limit. Near the
//! end of a pass it asks for fast polls, so a sync is seen within a few milliseconds: after a
//! sync that finds little, the next pass is short, and QEMU completes by itself at its end.

use std::time::{Duration, Instant};

use crate::migration::events::RamProgress;

/// QEMU's downtime limit during an iterating pre-copy: the smallest that still makes it sync
/// (milliseconds are its unit).
const ITERATE_LIMIT: Duration = Duration::from_millis(1);

/// How pre-copy runs up to the switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// QEMU syncs at every pass end ([`ITERATE_LIMIT`]); the switchover comes when the predicted
    /// pause fits the limit.
    Iterate,
    /// One pass, no sync (limit 0): for a QEMU whose dirty tracking does not survive a sync
    /// (`QemuFeatures::iterates_safely`). The switchover comes near the end of the first pass,
    /// and what the guest dirtied during it goes while the guest is paused.
    SinglePass,
}

impl Mode {
    /// QEMU's downtime limit until the switchover.
    pub(super) fn qemu_limit(self) -> Duration {
        match self {
            Self::Iterate => ITERATE_LIMIT,
            Self::SinglePass => Duration::ZERO,
        }
    }
}

/// [`Mode::SinglePass`]: how close to the end of what is left the switchover happens even if
/// that exceeds the downtime limit: QEMU completes by itself once nothing is dirty (an idle guest
/// at the end of its first pass), so the switchover must come before that, within two polls.
const SINGLE_PASS_HORIZON: Duration = Duration::from_millis(50);

/// [`Mode::SinglePass`]: bytes left at which the switchover happens whatever the rate says: with
/// its limit at 0 QEMU ends the first pass by completing on its own, and zero pages go by faster
/// than the measured rate predicts.
const SINGLE_PASS_BYTES: u64 = 64 << 20;
/// Poll interval far from a pass end ...
pub(super) const POLL_SLOW: Duration = Duration::from_millis(25);
/// ... and within [`TAIL`] of one, or of a switchover.
pub(super) const POLL_FAST: Duration = Duration::from_millis(2);
/// How close to the predicted end of a pass (or to a pause within the limit) polls speed up.
const TAIL: Duration = Duration::from_millis(60);

/// One poll.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    iteration: u64,
    remaining: u64,
    transferred: u64,
}

/// The last dirty-bitmap sync seen.
#[derive(Debug, Clone, Copy)]
struct Sync {
    iteration: u64,
    /// When a poll first saw it.
    at: Instant,
}

/// What the poll loop should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Stop the VM now: the predicted pause fits the limit.
    Switch {
        /// The predicted pause.
        predicted: Duration,
    },
    /// Poll again after this long.
    Wait(Duration),
}

/// The switchover predictor of one migration (see the module documentation).
#[derive(Debug)]
pub(super) struct Switchover {
    mode: Mode,
    started: Instant,
    first_iteration: Option<u64>,
    last: Option<Sample>,
    sync: Option<Sync>,
    /// Bytes the guest dirties per second, learned at the last sync.
    dirty_rate: Option<f64>,
    /// Bytes of `remaining` cleared per second within a pass (zero pages clear faster than the
    /// wire carries bytes).
    clear_rate: Option<f64>,
    /// Bytes on the wire per second.
    wire_rate: Option<f64>,
}

impl Switchover {
    /// A predictor for a migration that QEMU started at `started`.
    pub(super) fn new(mode: Mode, started: Instant) -> Self {
        Self {
            mode,
            started,
            first_iteration: None,
            last: None,
            sync: None,
            dirty_rate: None,
            clear_rate: None,
            wire_rate: None,
        }
    }

    /// Bytes the guest dirties per second, once a sync has been seen.
    pub(super) fn dirty_rate(&self) -> Option<u64> {
        self.dirty_rate.map(|r| r as u64)
    }

    /// Takes a poll made at `now` and says whether to stop the VM with `limit` as the pause
    /// allowed.
    pub(super) fn observe(&mut self, now: Instant, p: &RamProgress, limit: Duration) -> Verdict {
        if self.mode == Mode::SinglePass {
            return single_pass(p, limit);
        }
        let sample = Sample {
            at: now,
            iteration: p.iteration,
            remaining: p.remaining_bytes,
            transferred: p.transferred_bytes,
        };
        let first = *self.first_iteration.get_or_insert(p.iteration);
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last.at).as_secs_f64();
            if dt > 0.0 {
                let sent = sample.transferred.saturating_sub(last.transferred) as f64;
                if sent > 0.0 {
                    self.wire_rate = Some(blend(self.wire_rate, sent / dt));
                }
                if sample.iteration == last.iteration && sample.remaining < last.remaining {
                    let cleared = (last.remaining - sample.remaining) as f64;
                    self.clear_rate = Some(blend(self.clear_rate, cleared / dt));
                }
            }
        }
        if sample.iteration > first && self.sync.is_none_or(|s| sample.iteration > s.iteration) {
            // A sync since the last poll: what it found is (about) what is left now, dirtied over
            // the pass that it ended (or the passes, when several ended between two polls).
            // An upper bound: what was sent since the previous poll may have followed the sync.
            let since = self.sync.map_or(self.started, |s| s.at);
            let pass = now.saturating_duration_since(since).as_secs_f64();
            let sent = self.last.map_or(0, |l| sample.transferred.saturating_sub(l.transferred));
            if pass > 0.0 {
                self.dirty_rate = Some(sample.remaining.saturating_add(sent) as f64 / pass);
            }
            self.sync = Some(Sync { iteration: sample.iteration, at: now });
        }
        self.last = Some(sample);
        let Some(wire) = self.wire_rate.or(self.clear_rate).filter(|r| *r > 0.0) else {
            return Verdict::Wait(POLL_SLOW);
        };
        let clear = self.clear_rate.unwrap_or(wire).max(wire);
        let to_clear = sample.remaining as f64 / clear;
        let (Some(sync), Some(dirty_rate)) = (self.sync, self.dirty_rate) else {
            // The first pass: nothing is known of the guest's dirtying until it ends. Poll fast
            // at its end so the first sync is seen at once.
            return Verdict::Wait(if secs(to_clear) <= TAIL { POLL_FAST } else { POLL_SLOW });
        };
        let dirtied = dirty_rate * now.saturating_duration_since(sync.at).as_secs_f64();
        let predicted = secs(to_clear + dirtied / wire);
        if predicted <= limit {
            return Verdict::Switch { predicted };
        }
        // Fast near a pass end (a sync may be about to find little) or near the limit.
        let near = secs(to_clear) <= TAIL || predicted <= limit + TAIL;
        Verdict::Wait(if near { POLL_FAST } else { POLL_SLOW })
    }
}

/// [`Mode::SinglePass`]: switch when the rest of RAM fits the limit or the two-poll horizon at
/// QEMU's rate, or is down to a quarter of the guest's RAM (at most [`SINGLE_PASS_BYTES`]).
fn single_pass(p: &RamProgress, limit: Duration) -> Verdict {
    if p.iteration < 1 {
        return Verdict::Wait(POLL_SLOW);
    }
    let rate = p.throughput_bytes_per_second;
    let predicted = if rate == 0 { Duration::MAX } else { secs(p.remaining_bytes as f64 / rate as f64) };
    let near_end = p.total_bytes > 0 && p.remaining_bytes <= (p.total_bytes / 4).min(SINGLE_PASS_BYTES);
    if near_end || predicted <= limit.max(SINGLE_PASS_HORIZON) {
        return Verdict::Switch { predicted };
    }
    Verdict::Wait(POLL_SLOW)
}

/// An even blend of the new rate with the old, so one odd poll does not swing a decision.
fn blend(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| (o + new) / 2.0)
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    /// Query, route swap, settle, `stop`, measured in the lab.
    const REACTION: Duration = Duration::from_millis(4);

    /// A guest of `total` bytes whose pre-copy runs at `wire` bytes/s (zero pages as fast), the
    /// guest dirtying `dirty` bytes/s, QEMU syncing at each pass end and completing by itself when
    /// a sync finds less than one millisecond of transfer. Polls as the predictor asks; returns
    /// the predicted pause at the switchover, or None when QEMU completed first, also within the
    /// [`REACTION`] the engine needs to swap the routes and stop the VM after deciding.
    fn run(total: u64, wire: u64, dirty: u64, limit: Duration) -> (Option<Duration>, u64) {
        let t0 = Instant::now();
        let mut s = Switchover::new(Mode::Iterate, t0);
        let mut now = Duration::ZERO;
        let (mut iteration, mut remaining, mut transferred, mut dirtied) = (1u64, total, 0u64, 0f64);
        let tick = Duration::from_micros(100);
        let mut next_poll = Duration::ZERO;
        let mut decided: Option<(Duration, Duration, u64)> = None;
        while now < Duration::from_secs(60) {
            if let Some((at, predicted, at_iteration)) = decided {
                if now >= at + REACTION {
                    return (Some(predicted), at_iteration);
                }
            } else if now >= next_poll {
                let p = RamProgress {
                    iteration,
                    remaining_bytes: remaining,
                    transferred_bytes: transferred,
                    total_bytes: total,
                    ..RamProgress::default()
                };
                match s.observe(t0 + now, &p, limit) {
                    Verdict::Switch { predicted } => decided = Some((now, predicted, iteration)),
                    Verdict::Wait(d) => next_poll = now + d,
                }
            }
            now += tick;
            let step = (wire as f64 * tick.as_secs_f64()) as u64;
            let sent = step.min(remaining);
            remaining -= sent;
            transferred += sent;
            dirtied = (dirtied + dirty as f64 * tick.as_secs_f64()).min(total as f64);
            if remaining == 0 {
                // The pass ended: QEMU syncs.
                iteration += 1;
                remaining = dirtied as u64;
                dirtied = 0.0;
                if remaining < wire / 1000 {
                    return (None, iteration);
                }
            }
        }
        panic!("no switchover in a minute");
    }

    #[test]
    fn an_idle_guest_switches_after_the_first_sync_before_qemu_completes_alone() {
        // 128 MiB at 250 MB/s, the guest dirtying 4 MB/s: the first pass (~0.5 s) leaves ~2 MB,
        // an 8 ms pass.
        let (pause, iteration) = run(128 * MIB, 250_000_000, 4_000_000, Duration::from_millis(25));
        let pause = pause.expect("the engine stops the VM before QEMU completes by itself");
        assert!(pause <= Duration::from_millis(25), "{pause:?}");
        assert_eq!(iteration, 2, "after the first sync");
    }

    #[test]
    fn a_dirty_guest_iterates_until_a_pass_fits_the_limit() {
        // 512 MiB at 250 MB/s, the guest dirtying 60 MB/s: pass 1 leaves ~130 MB, pass 2 ~31 MB,
        // pass 3 ~7.5 MB (30 ms), pass 4 ~1.8 MB.
        let (pause, iteration) = run(512 * MIB, 250_000_000, 60_000_000, Duration::from_millis(25));
        let pause = pause.expect("switched");
        assert!(pause <= Duration::from_millis(25), "{pause:?}");
        assert!(iteration >= 3, "iterated: {iteration}");
    }

    #[test]
    fn a_single_pass_switches_near_its_end() {
        let mut s = Switchover::new(Mode::SinglePass, Instant::now());
        let limit = Duration::from_millis(25);
        let p = |iteration, remaining_bytes, throughput_bytes_per_second| RamProgress {
            iteration,
            remaining_bytes,
            throughput_bytes_per_second,
            total_bytes: 1 << 30,
            ..RamProgress::default()
        };
        let now = Instant::now();
        let switches =
            |s: &mut Switchover, p: RamProgress| matches!(s.observe(now, &p, limit), Verdict::Switch { .. });
        assert!(!switches(&mut s, p(0, 0, 100_000_000)), "not started");
        assert!(!switches(&mut s, p(1, 133_000_000, 100_000_000)), "most of the pass left");
        assert!(!switches(&mut s, p(2, 300 << 20, 0)), "no rate measured yet, far from the end");
        assert!(switches(&mut s, p(1, 4_000_000, 100_000_000)), "40 ms left: inside the horizon");
        assert!(!switches(&mut s, p(5, 100 << 20, 1_000_000_000)), "105 ms left, above the byte cap");
        assert!(switches(&mut s, p(1, 60 << 20, 0)), "near the end of the pass, rate or not");
        let small = RamProgress {
            iteration: 1,
            remaining_bytes: 30 << 20,
            total_bytes: 128 << 20,
            ..RamProgress::default()
        };
        assert!(switches(&mut s, small), "a quarter of a 128 MiB guest");
        assert_eq!(
            Mode::SinglePass.qemu_limit(),
            Duration::ZERO,
            "no sync: QEMU completes only at the pass end"
        );
        assert_eq!(Mode::Iterate.qemu_limit(), Duration::from_millis(1));
    }

    #[test]
    fn nothing_is_decided_during_the_first_pass() {
        let t0 = Instant::now();
        let mut s = Switchover::new(Mode::Iterate, t0);
        let p = |ms: u64, remaining: u64| {
            (
                t0 + Duration::from_millis(ms),
                RamProgress {
                    iteration: 1,
                    remaining_bytes: remaining,
                    transferred_bytes: 100 * MIB - remaining,
                    total_bytes: 100 * MIB,
                    ..RamProgress::default()
                },
            )
        };
        let limit = Duration::from_millis(25);
        let (at, first) = p(0, 100 * MIB);
        assert_eq!(s.observe(at, &first, limit), Verdict::Wait(POLL_SLOW));
        let (at, second) = p(100, 50 * MIB);
        assert_eq!(s.observe(at, &second, limit), Verdict::Wait(POLL_SLOW), "100 ms left");
        let (at, tail) = p(190, 5 * MIB);
        assert_eq!(s.observe(at, &tail, limit), Verdict::Wait(POLL_FAST), "10 ms left: fast polls, no stop");
        assert_eq!(s.dirty_rate(), None);
    }

    #[test]
    fn a_sync_teaches_the_dirty_rate() {
        let t0 = Instant::now();
        let mut s = Switchover::new(Mode::Iterate, t0);
        let limit = Duration::from_millis(25);
        let at = |ms| t0 + Duration::from_millis(ms);
        let progress = |iteration, remaining, transferred| RamProgress {
            iteration,
            remaining_bytes: remaining,
            transferred_bytes: transferred,
            total_bytes: 1000 * MIB,
            ..RamProgress::default()
        };
        s.observe(at(0), &progress(1, 1000 * MIB, 0), limit);
        s.observe(at(500), &progress(1, 500 * MIB, 500 * MIB), limit);
        s.observe(at(995), &progress(1, 2 * MIB, 998 * MIB), limit);
        // The first pass ended at ~1 s with 200 MiB dirtied; 1 MiB of it went since. Up to the
        // 3 MiB sent since the previous poll count as dirtied: a bound from above.
        let v = s.observe(at(1000), &progress(2, 199 * MIB, 1001 * MIB), limit);
        let rate = s.dirty_rate().expect("learned");
        assert!((200 * MIB..=202 * MIB).contains(&rate), "what the sync found over the pass: {rate}");
        assert_eq!(v, Verdict::Wait(POLL_SLOW), "800 ms of dirty data left");
    }
}
