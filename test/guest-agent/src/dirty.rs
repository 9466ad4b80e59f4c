//! `dirty-mem`: keep a working set of guest memory dirty at a given rate, so migration
//! benchmarks have pages to re-send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Guest page size on x86-64.
const PAGE: usize = 4096;
/// Pacing tick: the rate is applied per 10 ms slice.
const TICK: Duration = Duration::from_millis(10);
const MIB: usize = 1 << 20;

/// What to dirty.
#[derive(Debug, Clone)]
pub struct DirtyConfig {
    /// Size of the working set, MiB.
    pub mb: usize,
    /// MiB dirtied per second; `None` for as fast as possible.
    pub rate_mb_per_s: Option<f64>,
    /// Stop after this long (default: until stopped).
    pub duration: Option<Duration>,
    /// What the working set holds, repeated (zeros when empty): a recognisable guest memory
    /// for a capture on the wire. Dirtying changes one byte per page, so all other copies stay.
    pub fill: Vec<u8>,
}

/// Why dirtying could not start.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The working set size was zero.
    #[error("--mb must be at least 1")]
    Empty,
    /// The rate was not a positive number.
    #[error("--rate-mb-per-s must be positive")]
    Rate,
    /// The working set could not be allocated.
    #[error("failed to allocate {0} MiB")]
    Alloc(usize),
}

/// The working set: `cfg.mb` MiB, zero or `cfg.fill` repeated.
fn working_set(cfg: &DirtyConfig) -> Result<Vec<u8>, DirtyError> {
    let len = cfg.mb.checked_mul(MIB).ok_or(DirtyError::Alloc(cfg.mb))?;
    let mut memory = Vec::new();
    memory.try_reserve_exact(len).map_err(|_| DirtyError::Alloc(cfg.mb))?;
    memory.resize(len, 0u8);
    if !cfg.fill.is_empty() {
        for (byte, value) in memory.iter_mut().zip(cfg.fill.iter().cycle()) {
            *byte = *value;
        }
    }
    Ok(memory)
}

/// How many ticks a full verification of the working set takes: each tick reads one byte of
/// `1 / VERIFY_TICKS` of its pages (a page touched costs a TLB fill under TCG, so the scan is
/// spread out; at the paced rate a stale page is seen within 250 ms).
const VERIFY_TICKS: usize = 25;

/// A page of the working set that does not hold what this process last wrote there: guest
/// memory lost an update (a migration that missed a dirty page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// The page's index in the working set.
    pub page: usize,
    /// What it should hold.
    pub expected: u8,
    /// What it holds.
    pub found: u8,
    /// Pages found stale so far, this one included.
    pub total: u64,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dirtied {
    /// The bytes' worth of pages dirtied.
    pub bytes: u64,
    /// Pages found not holding what was last written to them (each counted once: the scan
    /// repairs what it reports).
    pub stale_pages: u64,
    /// Pages the scan has read so far.
    pub verified_pages: u64,
}

/// How often [`run_dirty`] reports that its check runs.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How every line of `dirty-mem` begins; its first says the size and rate (`hack/guest/README.md`).
pub const PREFIX: &str = "katamaran-guest dirty-mem:";
/// How it begins the line that says its working set holds the `--fill` pattern.
pub const FILLED_LINE: &str = "katamaran-guest dirty-mem: working set filled";
/// How it begins the line for a page that lost its last write.
pub const STALE_LINE: &str = "katamaran-guest dirty-mem: STALE MEMORY:";
/// How it begins its heartbeat, every [`HEARTBEAT`] while the check runs.
pub const CHECK_LINE: &str = "katamaran-guest dirty-mem: memory check:";

/// What each page's marker byte holds: the round that last wrote it.
struct Ledger {
    /// The marker of page `p` before its first write (the fill, or 0).
    initial: Vec<u8>,
    /// The round being written; pages below `next` hold it, the others the round before.
    round: u8,
    /// Still in the first round: pages at or past `next` hold their initial byte.
    first: bool,
    next: usize,
}

impl Ledger {
    fn expected(&self, page: usize) -> u8 {
        if page < self.next {
            self.round
        } else if self.first {
            self.initial[page]
        } else {
            previous(self.round)
        }
    }

    /// Moves past the page just written.
    fn advance(&mut self, pages: usize) {
        self.next += 1;
        if self.next == pages {
            self.next = 0;
            self.first = false;
            self.round = self.round.wrapping_add(1).max(1);
        }
    }
}

/// The round before `round` (rounds run 1..=255 and wrap to 1).
fn previous(round: u8) -> u8 {
    if round == 1 {
        u8::MAX
    } else {
        round - 1
    }
}

/// Dirties one byte in each page of the working set, round and round, at the configured rate,
/// and checks that guest memory keeps what it wrote: each page's byte is compared with the round
/// that last wrote it before it is written again, and a scan goes over the whole set every
/// [`VERIFY_TICKS`] ticks. `ready` runs once the working set is allocated and filled;
/// `on_stale` for each page found stale (the scan then writes the expected byte back, so a page
/// is reported once); `heartbeat` every [`HEARTBEAT`] with the counts so far, so a reader of the
/// reports can tell a check that finds nothing from one that does not run.
///
/// # Errors
/// [`DirtyError`] for an empty working set, a non-positive rate or a failed allocation.
pub fn run_dirty(
    cfg: &DirtyConfig,
    stop: &AtomicBool,
    ready: impl FnOnce(),
    mut on_stale: impl FnMut(Mismatch),
    mut heartbeat: impl FnMut(&Dirtied),
) -> Result<Dirtied, DirtyError> {
    if cfg.rate_mb_per_s.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err(DirtyError::Rate);
    }
    let mut dirtier = Dirtier::new(cfg)?;
    ready();
    let t0 = Instant::now();
    let mut beat = t0 + HEARTBEAT;
    let mut tick = 0u32;
    while !stop.load(Ordering::Relaxed) && cfg.duration.is_none_or(|d| t0.elapsed() < d) {
        dirtier.tick(&mut on_stale);
        let now = Instant::now();
        if now >= beat {
            heartbeat(&dirtier.out);
            // From now: after a long pause of the guest (a migration), one line, not a burst.
            beat = now + HEARTBEAT;
        }
        tick += 1;
        if cfg.rate_mb_per_s.is_some() {
            let due = t0 + TICK.saturating_mul(tick);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
    }
    Ok(dirtier.out)
}

/// The working set, what each page should hold, and the scan's place.
struct Dirtier {
    memory: Vec<u8>,
    ledger: Ledger,
    /// Pages written per tick; unthrottled means a whole pass per tick.
    per_tick: usize,
    verify_per_tick: usize,
    scan: usize,
    out: Dirtied,
}

impl Dirtier {
    fn new(cfg: &DirtyConfig) -> Result<Self, DirtyError> {
        if cfg.mb == 0 {
            return Err(DirtyError::Empty);
        }
        let memory = working_set(cfg)?;
        let pages = memory.len() / PAGE;
        let per_tick = cfg.rate_mb_per_s.map_or(pages, |r| {
            ((r * MIB as f64 / PAGE as f64) * TICK.as_secs_f64()).ceil().max(1.0) as usize
        });
        let ledger = Ledger {
            initial: (0..pages).map(|p| memory[p * PAGE]).collect(),
            round: 1,
            first: true,
            next: 0,
        };
        Ok(Self {
            memory,
            ledger,
            per_tick,
            verify_per_tick: pages.div_ceil(VERIFY_TICKS),
            scan: 0,
            out: Dirtied::default(),
        })
    }

    fn pages(&self) -> usize {
        self.ledger.initial.len()
    }

    /// One tick's writes, each checked first, and one slice of the scan.
    fn tick(&mut self, on_stale: &mut impl FnMut(Mismatch)) {
        let pages = self.pages();
        for _ in 0..self.per_tick {
            let page = self.ledger.next;
            self.check(page, on_stale);
            self.memory[page * PAGE] = self.ledger.round;
            self.ledger.advance(pages);
        }
        for _ in 0..self.verify_per_tick {
            self.check(self.scan, on_stale);
            self.scan = (self.scan + 1) % pages;
        }
        self.out.verified_pages += self.verify_per_tick as u64;
        // Keeps the writes and the reads: nothing else uses the buffer.
        std::hint::black_box(&mut self.memory);
        self.out.bytes += (self.per_tick * PAGE) as u64;
    }

    /// Reports `page` if it does not hold what was last written there, and writes that back.
    fn check(&mut self, page: usize, on_stale: &mut impl FnMut(Mismatch)) {
        let (expected, found) = (self.ledger.expected(page), self.memory[page * PAGE]);
        if found != expected {
            self.out.stale_pages += 1;
            on_stale(Mismatch { page, expected, found, total: self.out.stale_pages });
            self.memory[page * PAGE] = expected;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn never(m: Mismatch) {
        panic!("no page may be stale: {m:?}");
    }

    #[test]
    fn dirties_at_about_the_requested_rate() {
        let cfg = DirtyConfig {
            mb: 4,
            rate_mb_per_s: Some(20.0),
            duration: Some(Duration::from_millis(300)),
            fill: Vec::new(),
        };
        let done = run_dirty(&cfg, &AtomicBool::new(false), || (), never, |_| ()).unwrap();
        let mb = done.bytes as f64 / MIB as f64;
        // 20 MiB/s for 0.3 s is 6 MiB; pacing is per 10 ms tick.
        assert!((5.0..7.5).contains(&mb), "dirtied {mb} MiB");
        assert_eq!(done.stale_pages, 0);
    }

    #[test]
    fn the_working_set_holds_the_fill_and_ready_follows_it() {
        let cfg = DirtyConfig {
            mb: 1,
            rate_mb_per_s: None,
            duration: Some(Duration::from_millis(20)),
            fill: b"MARK".to_vec(),
        };
        let memory = working_set(&cfg).unwrap();
        assert_eq!(memory.len(), MIB);
        assert_eq!(memory.windows(4).step_by(4).filter(|w| *w == b"MARK").count(), MIB / 4);
        let mut seen = false;
        run_dirty(&cfg, &AtomicBool::new(false), || seen = true, never, |_| ()).unwrap();
        assert!(seen, "ready runs once the working set is filled");
    }

    /// Memory that keeps every write passes, through the first round (the fill), mid-round and
    /// across the wrap of the round counter.
    #[test]
    fn intact_memory_reports_nothing_across_rounds_and_the_wrap() {
        for rate in [None, Some(100.0)] {
            let cfg = DirtyConfig { mb: 1, rate_mb_per_s: rate, duration: None, fill: b"xyz".to_vec() };
            let mut d = Dirtier::new(&cfg).unwrap();
            let ticks = if rate.is_none() { 600 } else { 3 * d.pages().div_ceil(d.per_tick) };
            for _ in 0..ticks {
                d.tick(&mut never);
            }
            assert!(rate.is_some() || !d.ledger.first && d.ledger.round < 200, "the round wrapped");
        }
    }

    /// A page that lost its last write (what a migration that missed a dirty page leaves) is
    /// found by the scan before the writer comes back to it, reported once, with both values.
    #[test]
    fn a_page_that_lost_its_last_write_is_reported_once() {
        let cfg = DirtyConfig { mb: 1, rate_mb_per_s: Some(10.0), duration: None, fill: Vec::new() };
        let mut d = Dirtier::new(&cfg).unwrap();
        let pages = d.pages();
        // Two rounds: every page written twice.
        for _ in 0..2 * pages.div_ceil(d.per_tick) {
            d.tick(&mut never);
        }
        let page = (d.ledger.next + pages / 2) % pages;
        let written = d.memory[page * PAGE];
        d.memory[page * PAGE] = previous(written);
        let mut seen = Vec::new();
        for _ in 0..VERIFY_TICKS {
            d.tick(&mut |m| seen.push(m));
        }
        assert_eq!(seen, [Mismatch { page, expected: written, found: previous(written), total: 1 }]);
        for _ in 0..2 * pages.div_ceil(d.per_tick) {
            d.tick(&mut never);
        }
        assert_eq!(d.out.stale_pages, 1);
    }

    #[test]
    fn rejects_nonsense() {
        let stop = AtomicBool::new(false);
        let cfg = DirtyConfig { mb: 0, rate_mb_per_s: None, duration: None, fill: Vec::new() };
        assert!(matches!(run_dirty(&cfg, &stop, || (), never, |_| ()), Err(DirtyError::Empty)));
        let cfg = DirtyConfig { mb: 1, rate_mb_per_s: Some(0.0), duration: None, fill: Vec::new() };
        assert!(matches!(run_dirty(&cfg, &stop, || (), never, |_| ()), Err(DirtyError::Rate)));
    }
}
