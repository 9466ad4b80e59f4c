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
//! than the real downtime limit. Near the end of a pass it asks for fast polls, so a sync is seen
//! within a few milliseconds: after a sync that finds little, the next pass is short, and QEMU
//! completes by itself at its end. Once the pause fits, the stop still waits for a pass end when
//! that shortens the pause: within a pass, what is left shrinks at QEMU's rate while the guest
//! adds at its own, so the pause is smallest at the pass end (what the pass dirtied), smaller
//! still at the end of the next, and where it first fits it is about the whole limit (the
//! benchmark's 512 MiB guest dirtying 64 MiB/s paused 21–23 ms over plain streams on QEMU 10.0,
//! under bare QEMU 9–13 ms).
//!
//! The first pass teaches nothing until it ends, and an idle guest's first sync can find less
//! than a millisecond of transfer: QEMU then completes by itself before the engine could decide,
//! and the packet that reaches the stopped source is lost (`qemu/dirty_rate.rs`). So where QEMU
//! can measure the guest's dirty rate within the first pass, that measurement stands in for a
//! sync ([`Switchover::seed_dirty_rate`]): when what the pass dirtied fits the limit, the routes
//! move just before the pass ends ([`Verdict::MoveRoutes`]) and the VM keeps running; the stop
//! follows once a sync says the pause fits — at the end of that pass where waiting for it costs
//! the client next to no silence ([`pass_end_is_cheap`]) — or [`MOVED_LIMIT`] after the move
//! (after the first sync; [`MOVED_FIRST_PASS_LIMIT`] before it).
//!
//! Where a sync is not safe ([`Mode::SinglePass`]) nothing is predicted: QEMU completes at the
//! end of its only pass, the routes move just before it, and the guest pauses for what the pass
//! dirtied.

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
    /// (`QemuFeatures::iterates_safely`). QEMU completes by itself at the end of that pass and
    /// sends what the guest dirtied during it while the guest is paused; the routes move near
    /// the end, ahead of that completion, and the VM runs on until it.
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

/// [`Mode::SinglePass`]: how close to the end of what is left the routes move: QEMU completes by
/// itself at the end of the pass, so the move must come before that, within two polls.
const SINGLE_PASS_HORIZON: Duration = Duration::from_millis(50);

/// [`Mode::SinglePass`]: bytes left at which the routes move whatever the rate says: zero pages
/// go by faster than the measured rate predicts.
const SINGLE_PASS_BYTES: u64 = 64 << 20;
/// Poll interval far from a pass end ...
pub(super) const POLL_SLOW: Duration = Duration::from_millis(25);
/// ... and within [`TAIL`] of one, or of a switchover.
pub(super) const POLL_FAST: Duration = Duration::from_millis(2);
/// How close to the predicted end of a pass (or to a pause within the limit) polls speed up.
const TAIL: Duration = Duration::from_millis(60);
/// The first pass, with a measured dirty rate that fits the limit: how long before the pass ends
/// at the clear rate the routes move (five fast polls), so that they move before QEMU's first
/// sync even when the polls run late.
const FIRST_PASS_LEAD: Duration = Duration::from_millis(10);
/// How long before the predicted end of a pass the engine stops the VM when it waits for the pass
/// end: its reaction (the route swap, the settle, `stop`), so the stop lands before QEMU's sync.
const PASS_END_LEAD: Duration = Duration::from_millis(4);
/// The least a pause must shrink by for the stop to wait for the pass end.
const PASS_END_GAIN: Duration = Duration::from_millis(1);
/// The least the pass must dirty for the stop to wait for its end: QEMU's sync there must find
/// well over its threshold ([`ITERATE_LIMIT`] of transfer, or nothing under the completion hold),
/// or it would complete by itself should the stop land late; the dirty rate is an upper bound.
const PASS_END_MIN: Duration = Duration::from_millis(5);
/// How far ahead (to the end of the next pass) the stop may wait for a shorter pause.
const PASS_END_HORIZON: Duration = Duration::from_millis(100);
/// Once the routes moved ahead of the stop, the guest's inbound packets wait at the destination:
/// the longest the stop may then wait for a pause that fits the limit.
pub(super) const MOVED_LIMIT: Duration = Duration::from_millis(50);
/// Once the routes moved, the most the client's silence may grow by for the stop to wait for the
/// pass end: what the guest dirties meanwhile, at the wire's rate (see [`pass_end_is_cheap`]).
const MOVED_WAIT_COST: Duration = Duration::from_millis(2);
/// ... and, while the first pass has not ended (its tail held more data than the clear rate
/// promised), for its first sync, or in a [`Mode::SinglePass`] for QEMU's completion at its end:
/// stopping inside the pass would send the rest of it, and all it dirtied, with the guest paused
/// (226 ms in the lab where a 50 ms wait ran out).
pub(super) const MOVED_FIRST_PASS_LIMIT: Duration = Duration::from_millis(250);

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
    /// Stop the VM now (after moving the routes, if they have not moved yet): the predicted pause
    /// fits the limit, or the routes moved [`MOVED_LIMIT`] ago.
    Switch {
        /// The predicted pause.
        predicted: Duration,
    },
    /// Move the routes now and keep the VM running: the first pass is about to end, and QEMU must
    /// find the routes moved if its first sync lets it complete. The stop follows a sync (in a
    /// [`Mode::SinglePass`], QEMU's own completion at the pass end).
    MoveRoutes,
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
    /// Bytes the guest dirties per second as measured before the first sync (an upper bound).
    seed: Option<f64>,
    /// When the routes moved ahead of the stop ([`Verdict::MoveRoutes`]).
    moved_at: Option<Instant>,
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
            seed: None,
            moved_at: None,
        }
    }

    /// The routes moved at `at`, ahead of the stop.
    pub(super) fn routes_moved(&mut self, at: Instant) {
        self.moved_at.get_or_insert(at);
    }

    /// Bytes the guest dirties per second, from the last sync, or else from the measurement.
    pub(super) fn dirty_rate(&self) -> Option<u64> {
        self.dirty_rate.or(self.seed).map(|r| r as u64)
    }

    /// Whether a dirty-bitmap sync has been seen (the first pass is over).
    pub(super) fn synced(&self) -> bool {
        self.sync.is_some()
    }

    /// The guest's dirty rate measured during the first pass, bytes per second (an upper bound):
    /// until the first sync, the pause is predicted from it.
    pub(super) fn seed_dirty_rate(&mut self, bytes_per_second: u64) {
        self.seed = Some(bytes_per_second as f64);
    }

    /// Takes a poll made at `now` and says whether to stop the VM with `limit` as the pause
    /// allowed.
    pub(super) fn observe(&mut self, now: Instant, p: &RamProgress, limit: Duration) -> Verdict {
        if self.mode == Mode::SinglePass {
            return single_pass(now, self.moved_at, p, limit);
        }
        let sample = Sample {
            at: now,
            iteration: p.iteration,
            remaining: p.remaining_bytes,
            transferred: p.transferred_bytes,
        };
        // QEMU's `dirty-sync-count` is 0 until its setup syncs the bitmap once, 1 for the whole
        // first pass: a poll that comes during setup must not take the setup's sync for a pass end.
        let first = *self.first_iteration.get_or_insert(p.iteration.max(1));
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
            // The first pass: what the guest dirtied is known only from a measurement, counted
            // over the whole pass so far (pages dirtied before they were sent are counted twice:
            // an upper bound). Without one, poll fast at the pass end so the first sync is seen
            // at once.
            if let Some(moved) = self.moved_at {
                // The routes moved and the pass outlasts its prediction: wait for its sync, up to
                // a point.
                if now.saturating_duration_since(moved) >= MOVED_FIRST_PASS_LIMIT {
                    return Verdict::Switch { predicted: secs(to_clear) };
                }
                return Verdict::Wait(POLL_FAST);
            }
            if let Some(seed) = self.seed {
                // A guest that dirties little over the pass: QEMU's first sync may find
                // so little that it completes by itself, so the routes move just before the pass
                // ends. The VM keeps running: what the pass dirtied goes in the next pass, not
                // while the guest is paused.
                // Not for a guest whose first sync will find more than the stop can wait for.
                let dirtied = seed * now.saturating_duration_since(self.started).as_secs_f64();
                if secs(dirtied / wire) <= limit + MOVED_LIMIT && secs(to_clear) <= FIRST_PASS_LEAD {
                    return Verdict::MoveRoutes;
                }
            }
            return Verdict::Wait(if secs(to_clear) <= TAIL { POLL_FAST } else { POLL_SLOW });
        };
        let since_sync = now.saturating_duration_since(sync.at).as_secs_f64();
        let predicted = secs(to_clear + dirty_rate * since_sync / wire);
        if predicted <= limit {
            // While QEMU clears faster than the guest dirties, the pause shrinks until the pass
            // ends, to what the pass dirtied, and the pass after it dirties less again: stopping
            // where the pause first fits pauses the guest for about the whole limit. Unless the
            // routes already moved (below), the stop waits for the pass end that promises the
            // shortest pause, this one's or the next one's, within a bounded horizon.
            let wait = match self.moved_at {
                None => pass_end_pays(predicted, to_clear, since_sync, dirty_rate, wire),
                // The packets wait at the destination: only a pass end that costs the client
                // next to no silence (it is at most `predicted` away, within the limit).
                Some(_) => pass_end_is_cheap(predicted, to_clear, since_sync, dirty_rate, wire),
            };
            if wait {
                return Verdict::Wait(POLL_FAST);
            }
            return Verdict::Switch { predicted };
        }
        if self.moved_at.is_some_and(|moved| now.saturating_duration_since(moved) >= MOVED_LIMIT) {
            return Verdict::Switch { predicted };
        }
        // Fast near a pass end (a sync may be about to find little) or near the limit.
        let near = secs(to_clear) <= TAIL || predicted <= limit + TAIL;
        Verdict::Wait(if near { POLL_FAST } else { POLL_SLOW })
    }
}

/// Whether waiting for a pass end shortens a pause that already fits (`predicted`): the end
/// of this pass (what it dirtied, `to_clear` seconds away) or of the next one (what that
/// dirties while it sends this one's). Only where this pass dirties at least
/// [`PASS_END_MIN`], so QEMU's sync at its end does not let QEMU complete by itself, and
/// within [`PASS_END_HORIZON`]. Close to this pass end, only the next one can still pay.
fn pass_end_pays(predicted: Duration, to_clear: f64, since_sync: f64, dirty_rate: f64, wire: f64) -> bool {
    let this_end = pause_at_pass_end(to_clear, since_sync, dirty_rate, wire);
    let next_end = secs(dirty_rate / wire * this_end.as_secs_f64());
    if this_end < PASS_END_MIN || secs(to_clear).saturating_add(this_end) > PASS_END_HORIZON {
        return false;
    }
    let near_end = secs(to_clear) <= POLL_FAST + PASS_END_LEAD;
    let best = if near_end { next_end } else { this_end.min(next_end) };
    best.saturating_add(PASS_END_GAIN) < predicted.min(if near_end { this_end } else { predicted })
}

/// The pause a stop at the end of this pass would cost: what the guest dirtied since the last
/// sync and until then, at the wire's rate.
fn pause_at_pass_end(to_clear: f64, since_sync: f64, dirty_rate: f64, wire: f64) -> Duration {
    secs(dirty_rate * (since_sync + to_clear) / wire)
}

/// Once the routes moved, the guest's inbound packets wait at the destination, so the client's
/// silence runs from the move to the resume: stopping now costs `predicted` of pause; waiting for
/// this pass end costs `to_clear` more of running, then a pause of what the whole pass dirtied.
/// The difference is what the guest dirties while the pass ends, at the wire's rate. Where the
/// guest dirties little (an idle guest: 2–16 MiB/s against a wire of hundreds) that is a fraction
/// of a millisecond, and the pause shrinks from up to the whole limit to nearly nothing: wait
/// where the silence grows by at most [`MOVED_WAIT_COST`] and the pause shrinks by at least
/// [`PASS_END_GAIN`]. QEMU may complete by itself at that pass end: the routes have moved, so
/// that is the shortest pause of all.
fn pass_end_is_cheap(
    predicted: Duration,
    to_clear: f64,
    since_sync: f64,
    dirty_rate: f64,
    wire: f64,
) -> bool {
    let this_end = pause_at_pass_end(to_clear, since_sync, dirty_rate, wire);
    let cost = secs(dirty_rate * to_clear / wire);
    cost <= MOVED_WAIT_COST && this_end.saturating_add(PASS_END_GAIN) < predicted
}

/// [`Mode::SinglePass`]: the routes move once the rest of RAM fits the limit or the two-poll
/// horizon at QEMU's rate, or is down to a quarter of the guest's RAM (at most
/// [`SINGLE_PASS_BYTES`]). The VM keeps running: QEMU completes by itself at the end of the pass
/// and pauses the guest only for what the pass dirtied, not for the rest of the pass as well
/// (the stop used to come at the move: 55–194 ms pauses on QEMU 7.2, most of them that rest).
/// Should the pass outlast [`MOVED_FIRST_PASS_LIMIT`] after the move, the engine stops the VM.
fn single_pass(now: Instant, moved_at: Option<Instant>, p: &RamProgress, limit: Duration) -> Verdict {
    if p.iteration < 1 {
        return Verdict::Wait(POLL_SLOW);
    }
    let rate = p.throughput_bytes_per_second;
    let predicted = if rate == 0 { Duration::MAX } else { secs(p.remaining_bytes as f64 / rate as f64) };
    if let Some(moved) = moved_at {
        let waited = now.saturating_duration_since(moved);
        if waited >= MOVED_FIRST_PASS_LIMIT {
            return Verdict::Switch { predicted };
        }
        // Nothing to decide until then: QEMU's completion arrives as an event.
        return Verdict::Wait(POLL_SLOW.min(MOVED_FIRST_PASS_LIMIT - waited));
    }
    let near_end = p.total_bytes > 0 && p.remaining_bytes <= (p.total_bytes / 4).min(SINGLE_PASS_BYTES);
    if near_end || predicted <= limit.max(SINGLE_PASS_HORIZON) {
        return Verdict::MoveRoutes;
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
        let run = run_seeded(total, wire, dirty, limit, None);
        assert!(!run.moved, "no measurement, no early move");
        (run.pause, run.iteration)
    }

    /// A `query-migrate` poll of a 1000 MiB guest in pass `iteration`.
    fn progress(iteration: u64, remaining: u64, transferred: u64) -> RamProgress {
        RamProgress {
            iteration,
            remaining_bytes: remaining,
            transferred_bytes: transferred,
            total_bytes: 1000 * MIB,
            ..RamProgress::default()
        }
    }

    /// How a simulated pre-copy ended.
    #[derive(Debug)]
    struct Run {
        /// The predicted pause at the engine's stop; `None` when QEMU completed by itself.
        pause: Option<Duration>,
        /// The pass in which it ended.
        iteration: u64,
        /// The routes had moved before the VM stopped ([`Verdict::MoveRoutes`]).
        moved: bool,
        /// What was left to send when the VM stopped, at the wire's rate: the real pause.
        left: Duration,
    }

    /// [`run`], the predictor told `seed` bytes/s as the measured dirty rate at the start. Moving
    /// the routes takes [`REACTION`] too.
    fn run_seeded(total: u64, wire: u64, dirty: u64, limit: Duration, seed: Option<u64>) -> Run {
        let t0 = Instant::now();
        let mut s = Switchover::new(Mode::Iterate, t0);
        if let Some(rate) = seed {
            s.seed_dirty_rate(rate);
        }
        let mut now = Duration::ZERO;
        let (mut iteration, mut remaining, mut transferred, mut dirtied) = (1u64, total, 0u64, 0f64);
        let tick = Duration::from_micros(100);
        let mut next_poll = Duration::ZERO;
        let mut decided: Option<(Duration, Duration, u64)> = None;
        let mut moving: Option<Duration> = None;
        let moved = |moving: Option<Duration>, now: Duration| moving.is_some_and(|at| now >= at + REACTION);
        while now < Duration::from_secs(60) {
            if let Some((at, predicted, at_iteration)) = decided {
                if now >= at + REACTION {
                    let left = Duration::from_secs_f64((remaining as f64 + dirtied) / wire as f64);
                    return Run {
                        pause: Some(predicted),
                        iteration: at_iteration,
                        moved: moved(moving, at),
                        left,
                    };
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
                    Verdict::MoveRoutes => {
                        assert!(moving.is_none(), "the routes move once");
                        moving = Some(now);
                        s.routes_moved(t0 + now);
                        next_poll = now + POLL_FAST;
                    }
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
                    return Run { pause: None, iteration, moved: moved(moving, now), left: Duration::ZERO };
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
    fn a_measured_rate_moves_the_routes_before_the_first_sync_at_which_qemu_would_complete_alone() {
        // 128 MiB at 250 MB/s, the guest dirtying 200 kB/s: the first sync (~0.54 s) finds
        // ~110 kB, under a millisecond of transfer, and QEMU completes by itself.
        let limit = Duration::from_millis(25);
        let (pause, iteration) = run(128 * MIB, 250_000_000, 200_000, limit);
        assert_eq!((pause, iteration), (None, 2), "without a measurement QEMU stops the VM first");
        // Measured from above, up to 80 times the real rate (the lab's idle guest: 2–16 MiB/s).
        for seed in [MIB, 4 * MIB, 16 * MIB] {
            let run = run_seeded(128 * MIB, 250_000_000, 200_000, limit, Some(seed));
            assert!(run.moved, "seed {seed}: the routes moved before the VM stopped: {run:?}");
            assert_eq!(run.iteration, 2, "seed {seed}: QEMU's first sync ended it: {run:?}");
        }
    }

    #[test]
    fn after_moving_the_routes_an_idle_guest_stops_at_the_pass_end_a_dirty_one_at_once() {
        let limit = Duration::from_millis(25);
        // 512 MiB at 300 MB/s, the guest dirtying 8 MB/s (the lab's idle guest under its probe),
        // measured from above: the routes move before the first sync, which finds ~14 MB, a
        // ~47 ms pass. Stopping where the pause first fits leaves ~25 ms to send; waiting for
        // the pass end costs the client ~0.7 ms more and leaves what that pass dirtied: ~1.3 ms,
        // or nothing when QEMU's sync lets it complete by itself.
        let run = run_seeded(512 * MIB, 300_000_000, 8_000_000, limit, Some(8 * MIB));
        assert!(run.moved, "{run:?}");
        assert!(run.left <= Duration::from_millis(2), "the pause is what the last pass dirtied: {run:?}");
        // A guest dirtying 40 MB/s: the wait would cost the client ~3 ms of silence per 25 ms:
        // the stop comes once the pause fits.
        let run = run_seeded(128 * MIB, 300_000_000, 40_000_000, limit, Some(40 * MIB));
        assert!(run.moved, "{run:?}");
        let pause = run.pause.expect("the engine stops the VM");
        assert!(pause <= limit && run.left > Duration::from_millis(5), "{run:?}");
    }

    #[test]
    fn after_moving_the_routes_the_stop_follows_the_first_sync() {
        // The guest dirties 6 MB/s: the first sync finds ~3.2 MB (13 ms), QEMU goes on, and the
        // engine stops the VM in the second pass, the tail of the first gone while it ran.
        let limit = Duration::from_millis(25);
        // Stopping at once would pause it for those 13 ms; the stop waits for the second pass end
        // (the client's silence grows by ~0.3 ms), where QEMU may even complete by itself.
        let run = run_seeded(128 * MIB, 250_000_000, 6_000_000, limit, Some(8 * MIB));
        assert!(run.moved, "{run:?}");
        assert!(run.left <= Duration::from_millis(1), "what the second pass dirtied, at most: {run:?}");
        assert!(run.iteration >= 2, "{run:?}");
        // Dirtying 2 MB/s, the second pass (~4 ms) ends before the engine's stop: QEMU completes
        // by itself, with the routes already moved.
        let run = run_seeded(128 * MIB, 250_000_000, 2_000_000, limit, Some(4 * MIB));
        assert!(run.moved, "{run:?}");
    }

    #[test]
    fn a_measured_high_rate_waits_for_the_syncs() {
        // The dirty guest below, measured truthfully: the first pass alone would pause it for
        // ~500 ms, so the routes stay until the syncs say the pause fits.
        let limit = Duration::from_millis(25);
        let run = run_seeded(512 * MIB, 250_000_000, 60_000_000, limit, Some(60_000_000));
        assert!(!run.moved, "{run:?}");
        let pause = run.pause.expect("switched");
        assert!(pause <= limit, "{pause:?}");
        assert!(run.iteration >= 3, "iterated: {run:?}");
    }

    #[test]
    fn routes_that_moved_wait_at_most_the_moved_limit_for_the_stop() {
        let t0 = Instant::now();
        let limit = Duration::from_millis(25);
        let at = |ms| t0 + Duration::from_millis(ms);
        // A predictor that moved the routes 40 ms before its first pass would end.
        let moved = || {
            let mut s = Switchover::new(Mode::Iterate, t0);
            s.seed_dirty_rate(MIB);
            s.observe(at(0), &progress(1, 1000 * MIB, 0), limit);
            s.observe(at(3900), &progress(1, 25 * MIB, 975 * MIB), limit);
            assert_eq!(s.observe(at(3960), &progress(1, 2 * MIB, 998 * MIB), limit), Verdict::MoveRoutes);
            s.routes_moved(at(3960));
            s
        };
        let mut s = moved();
        // The pass outlasts its prediction: its sync is waited for, not cut short.
        let v = s.observe(at(4100), &progress(1, MIB, 999 * MIB), limit);
        assert_eq!(v, Verdict::Wait(POLL_FAST), "140 ms after the move, still the first pass");
        let v = s.observe(at(4210), &progress(1, MIB / 2, 999 * MIB), limit);
        assert!(matches!(v, Verdict::Switch { .. }), "250 ms after the move: {v:?}");

        let mut s = moved();
        // The first sync finds 200 MiB after all: no pause fits, but the packets wait.
        let v = s.observe(at(3970), &progress(2, 200 * MIB, 1000 * MIB), limit);
        assert!(matches!(v, Verdict::Wait(_)), "{v:?}");
        let v = s.observe(at(4010), &progress(2, 190 * MIB, 1010 * MIB), limit);
        assert!(matches!(v, Verdict::Switch { .. }), "50 ms after the move: {v:?}");
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
    fn a_dirty_guest_stops_at_the_pass_end_with_the_shortest_pause_not_where_it_first_fits() {
        let limit = Duration::from_millis(25);
        // The guest above: pass 4 starts with ~7.4 MB (30 ms) left and dirties ~1.8 MB (7 ms)
        // while it runs, pass 5 ~0.4 MB (2 ms). The pause fits the limit 6 ms into pass 4, with
        // 25 ms left to send.
        let run = run_seeded(512 * MIB, 250_000_000, 60_000_000, limit, None);
        assert!(
            run.pause.is_some() && run.iteration >= 4,
            "the engine stopped the VM, after pass 3: {run:?}"
        );
        assert!(run.left <= Duration::from_millis(8), "at most what pass 4 dirtied: {run:?}");
        // The plain 512 MiB benchmark guest on 10.0 (~400 MB/s, ~70 MB/s dirtied): the pause
        // first fits in pass 3 (41 ms long), whose end leaves ~7 ms and the next ~1 ms.
        let run = run_seeded(512 * MIB, 400_000_000, 70_000_000, limit, None);
        assert!(run.pause.is_some(), "{run:?}");
        assert!(run.left <= Duration::from_millis(8), "not the ~25 ms where it first fits: {run:?}");
        // A pass whose end is 14 ms away, and a pass end through which the stop rides.
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let observe_pass_two = |s: &mut Switchover| {
            s.observe(at(0), &progress(1, 100 * MIB, 0), limit);
            s.observe(at(392), &progress(1, 2 * MIB, 98 * MIB), limit);
            // The first sync found 16 MiB (~49 MiB/s over the pass); 50 ms later 3.5 MiB are
            // left, 14 ms at 250 MiB/s, and the pause would be 24 ms; at the pass end, 13 ms.
            s.observe(at(410), &progress(2, 16 * MIB, 102 * MIB), limit);
            s.observe(at(460), &progress(2, 7 * MIB / 2, 229 * MIB / 2), limit)
        };
        let mut s = Switchover::new(Mode::Iterate, t0);
        assert_eq!(
            observe_pass_two(&mut s),
            Verdict::Wait(POLL_FAST),
            "fits, but 14 ms of the pass are left"
        );
        // 4 ms before the pass end the pause would be ~13 ms; the next pass sends those while
        // the guest dirties ~2.5 ms: the stop rides through the sync.
        assert_eq!(s.observe(at(470), &progress(2, MIB, 117 * MIB), limit), Verdict::Wait(POLL_FAST));
        // The sync found 3.3 MiB, what pass 2 dirtied. Pass 3 dirties too little to wait for
        // its end (QEMU could complete at its sync): the stop comes at once.
        let v = s.observe(at(476), &progress(3, 33 * MIB / 10, 118 * MIB), limit);
        assert!(
            matches!(v, Verdict::Switch { predicted } if predicted <= Duration::from_millis(15)),
            "{v:?}"
        );
        // The routes moved early: the packets wait, so the stop does not.
        let mut s = Switchover::new(Mode::Iterate, t0);
        s.routes_moved(at(440));
        assert!(matches!(observe_pass_two(&mut s), Verdict::Switch { .. }), "the routes moved: stop at once");
    }

    #[test]
    fn a_single_pass_moves_the_routes_near_its_end_and_lets_qemu_complete() {
        let t0 = Instant::now();
        let mut s = Switchover::new(Mode::SinglePass, t0);
        let limit = Duration::from_millis(25);
        let p = |iteration, remaining_bytes, throughput_bytes_per_second| RamProgress {
            iteration,
            remaining_bytes,
            throughput_bytes_per_second,
            total_bytes: 1 << 30,
            ..RamProgress::default()
        };
        let mut verdict = |p: RamProgress| s.observe(t0, &p, limit);
        assert_eq!(verdict(p(0, 0, 100_000_000)), Verdict::Wait(POLL_SLOW), "not started");
        assert_eq!(
            verdict(p(1, 133_000_000, 100_000_000)),
            Verdict::Wait(POLL_SLOW),
            "most of the pass left"
        );
        assert_eq!(
            verdict(p(2, 300 << 20, 0)),
            Verdict::Wait(POLL_SLOW),
            "no rate measured yet, far from the end"
        );
        assert_eq!(
            verdict(p(1, 4_000_000, 100_000_000)),
            Verdict::MoveRoutes,
            "40 ms left: inside the horizon"
        );
        assert_eq!(
            verdict(p(5, 100 << 20, 1_000_000_000)),
            Verdict::Wait(POLL_SLOW),
            "105 ms left, above the byte cap"
        );
        assert_eq!(verdict(p(1, 60 << 20, 0)), Verdict::MoveRoutes, "near the end of the pass, rate or not");
        let small = RamProgress {
            iteration: 1,
            remaining_bytes: 30 << 20,
            total_bytes: 128 << 20,
            ..RamProgress::default()
        };
        assert_eq!(verdict(small), Verdict::MoveRoutes, "a quarter of a 128 MiB guest");

        // The routes moved: QEMU completes at the pass end by itself; the engine stops the VM
        // only if the pass outlasts the wait, whatever the rate says meanwhile.
        s.routes_moved(t0);
        let tail = p(1, 20 << 20, 100_000_000);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(s.observe(at(1), &tail, limit), Verdict::Wait(POLL_SLOW), "no stop after the move");
        let near = s.observe(at(240), &p(1, 1 << 20, 100_000_000), limit);
        assert_eq!(near, Verdict::Wait(Duration::from_millis(10)), "the next poll lands on the wait's end");
        assert!(
            matches!(s.observe(at(250), &tail, limit), Verdict::Switch { .. }),
            "the pass outlasted the wait: the engine stops the VM"
        );
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
    fn the_setup_sync_is_not_a_pass_end() {
        let t0 = Instant::now();
        let mut s = Switchover::new(Mode::Iterate, t0);
        s.seed_dirty_rate(MIB);
        let limit = Duration::from_millis(25);
        let progress = |iteration, remaining| RamProgress {
            iteration,
            remaining_bytes: remaining,
            transferred_bytes: 1000 * MIB - remaining,
            total_bytes: 1000 * MIB,
            ..RamProgress::default()
        };
        // A poll during QEMU's setup, then the first pass.
        s.observe(t0 + Duration::from_millis(2), &progress(0, 1000 * MIB), limit);
        s.observe(t0 + Duration::from_millis(100), &progress(1, 900 * MIB), limit);
        assert!(!s.synced(), "still the first pass");
        assert_eq!(s.dirty_rate(), Some(MIB), "the sample, not a rate made up from the setup");
        s.observe(t0 + Duration::from_millis(1100), &progress(2, MIB), limit);
        assert!(s.synced(), "the first pass ended");
    }

    #[test]
    fn a_sync_teaches_the_dirty_rate() {
        let t0 = Instant::now();
        let mut s = Switchover::new(Mode::Iterate, t0);
        let limit = Duration::from_millis(25);
        let at = |ms| t0 + Duration::from_millis(ms);
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
