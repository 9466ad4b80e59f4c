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

/// Dirties one byte in each page of the working set, round and round, at the configured rate;
/// `ready` runs once the working set is allocated and filled. Returns the bytes' worth of pages
/// dirtied.
///
/// # Errors
/// [`DirtyError`] for an empty working set, a non-positive rate or a failed allocation.
pub fn run_dirty(cfg: &DirtyConfig, stop: &AtomicBool, ready: impl FnOnce()) -> Result<u64, DirtyError> {
    if cfg.mb == 0 {
        return Err(DirtyError::Empty);
    }
    if cfg.rate_mb_per_s.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err(DirtyError::Rate);
    }
    let mut memory = working_set(cfg)?;
    let pages = memory.len() / PAGE;
    ready();
    // Pages per tick; unthrottled means a whole pass per tick.
    let per_tick = cfg
        .rate_mb_per_s
        .map_or(pages, |r| ((r * MIB as f64 / PAGE as f64) * TICK.as_secs_f64()).ceil().max(1.0) as usize);
    let t0 = Instant::now();
    let mut next_page = 0usize;
    let mut round = 1u8;
    let mut dirtied = 0u64;
    let mut tick = 0u32;
    while !stop.load(Ordering::Relaxed) && cfg.duration.is_none_or(|d| t0.elapsed() < d) {
        for _ in 0..per_tick {
            memory[next_page * PAGE] = round;
            next_page += 1;
            if next_page == pages {
                next_page = 0;
                round = round.wrapping_add(1).max(1);
            }
        }
        // Keeps the writes: nothing ever reads the buffer.
        std::hint::black_box(&mut memory);
        dirtied += (per_tick * PAGE) as u64;
        tick += 1;
        if cfg.rate_mb_per_s.is_some() {
            let due = t0 + TICK.saturating_mul(tick);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
    }
    Ok(dirtied)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn dirties_at_about_the_requested_rate() {
        let cfg = DirtyConfig {
            mb: 4,
            rate_mb_per_s: Some(20.0),
            duration: Some(Duration::from_millis(300)),
            fill: Vec::new(),
        };
        let bytes = run_dirty(&cfg, &AtomicBool::new(false), || ()).unwrap();
        let mb = bytes as f64 / MIB as f64;
        // 20 MiB/s for 0.3 s is 6 MiB; pacing is per 10 ms tick.
        assert!((5.0..7.5).contains(&mb), "dirtied {mb} MiB");
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
        run_dirty(&cfg, &AtomicBool::new(false), || seen = true).unwrap();
        assert!(seen, "ready runs once the working set is filled");
    }

    #[test]
    fn rejects_nonsense() {
        let stop = AtomicBool::new(false);
        let cfg = DirtyConfig { mb: 0, rate_mb_per_s: None, duration: None, fill: Vec::new() };
        assert!(matches!(run_dirty(&cfg, &stop, || ()), Err(DirtyError::Empty)));
        let cfg = DirtyConfig { mb: 1, rate_mb_per_s: Some(0.0), duration: None, fill: Vec::new() };
        assert!(matches!(run_dirty(&cfg, &stop, || ()), Err(DirtyError::Rate)));
    }
}
