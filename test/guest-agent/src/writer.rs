//! `disk-writer`: append sequence-numbered records to a disk at a steady rate, each durable on the
//! virtio disk before the next is written, so a storage mirror sees every one of them and a
//! checker can prove none was lost.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::record::{self, Record, RecordError};
use crate::sys;

/// Default records per second.
pub const DEFAULT_RATE: u32 = 50;
/// O_DIRECT wants buffers aligned to the logical block size; a page covers every device.
const ALIGN: usize = 4096;
/// Longest sleep between looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// What to write where.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Block device (or file) to write, from offset 0.
    pub device: PathBuf,
    /// Records per second.
    pub rate: u32,
    /// Bytes per record, a multiple of 512.
    pub record_size: usize,
    /// Rewritten after each record with the last durable sequence number (read by `http`).
    pub status_file: Option<PathBuf>,
    /// Created once the first record is durable.
    pub ready_file: Option<PathBuf>,
    /// Stop after this many records (default: at the end of the device).
    pub limit: Option<u64>,
}

/// Why the writer stopped without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd {
    /// The next record would not fit on the device.
    DeviceFull,
    /// `limit` records were written.
    Limit,
    /// The stop flag was raised.
    Stopped,
}

/// What the writer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSummary {
    /// Records written and made durable.
    pub records: u64,
    /// Whether O_DIRECT was used (else O_DSYNC page-cache writes).
    pub direct: bool,
    /// Why it stopped.
    pub end: WriterEnd,
}

/// Why the writer failed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The record size is unusable.
    #[error("invalid record size")]
    RecordSize(#[source] RecordError),
    /// The rate was zero.
    #[error("rate must be at least 1 record per second")]
    ZeroRate,
    /// The device could not be opened for writing.
    #[error("failed to open {0} for writing")]
    Open(PathBuf, #[source] io::Error),
    /// The device size could not be determined.
    #[error("failed to find the size of {0}")]
    Size(PathBuf, #[source] io::Error),
    /// Writing a record failed.
    #[error("failed to write record {seq} at offset {offset} of {device}")]
    Write {
        /// The device.
        device: PathBuf,
        /// Sequence number of the record.
        seq: u64,
        /// Its offset.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Making a record durable failed.
    #[error("failed to flush record {seq} to {device}")]
    Sync {
        /// The device.
        device: PathBuf,
        /// Sequence number of the record.
        seq: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The status or ready file could not be written.
    #[error("failed to write {0}")]
    Marker(PathBuf, #[source] io::Error),
}

/// Writes records until the device is full, `limit` is reached or `stop` is raised.
///
/// # Errors
/// [`WriterError`] for an invalid config, a device that cannot be opened or sized, or any failed
/// write or flush (the log would no longer prove anything, so the writer stops there).
pub fn run_writer(cfg: &WriterConfig, stop: &AtomicBool) -> Result<WriterSummary, WriterError> {
    record::validate_size(cfg.record_size).map_err(WriterError::RecordSize)?;
    if cfg.rate == 0 {
        return Err(WriterError::ZeroRate);
    }
    let (mut file, mut direct) = open_device(&cfg.device)?;
    let capacity = file.seek(SeekFrom::End(0)).map_err(|e| WriterError::Size(cfg.device.clone(), e))?
        / cfg.record_size as u64;
    let mut status = cfg.status_file.as_deref().map(StatusFile::create).transpose()?;

    let boot_id = sys::random_id();
    eprintln!(
        "katamaran-guest disk-writer: {}: {} records of {} B at {}/s, boot id {}{}",
        cfg.device.display(),
        capacity,
        cfg.record_size,
        cfg.rate,
        record::hex(&boot_id),
        if direct { " (O_DIRECT)" } else { " (O_DSYNC: O_DIRECT not supported here)" }
    );
    let mut backing = vec![0u8; cfg.record_size + ALIGN];
    let start_at = backing.as_ptr().align_offset(ALIGN);
    let buf = &mut backing[start_at..start_at + cfg.record_size];
    let interval = Duration::from_secs(1) / cfg.rate;
    let t0 = Instant::now();

    let mut seq = 0u64;
    let end = loop {
        if cfg.limit.is_some_and(|l| seq >= l) {
            break WriterEnd::Limit;
        }
        if seq >= capacity {
            break WriterEnd::DeviceFull;
        }
        // Absolute deadlines keep the average rate even when a flush takes longer than usual.
        let due = t0 + interval.saturating_mul(u32::try_from(seq).unwrap_or(u32::MAX));
        while let Some(wait) = due.checked_duration_since(Instant::now()) {
            if stop.load(Ordering::Relaxed) || wait.is_zero() {
                break;
            }
            thread::sleep(wait.min(POLL));
        }
        if stop.load(Ordering::Relaxed) {
            break WriterEnd::Stopped;
        }
        let rec = Record { seq, boot_id, wallclock_ns: sys::wallclock_ns() };
        record::encode(&rec, buf).map_err(WriterError::RecordSize)?;
        let offset = seq * cfg.record_size as u64;
        let written = file.write_all_at(buf, offset);
        if let Err(e) = written {
            if direct && seq == 0 && e.raw_os_error() == Some(libc::EINVAL) {
                // Some file systems accept O_DIRECT at open and refuse it at the first write.
                file = open_dsync(&cfg.device)?;
                direct = false;
                continue;
            }
            return Err(WriterError::Write { device: cfg.device.clone(), seq, offset, source: e });
        }
        file.sync_data().map_err(|source| WriterError::Sync { device: cfg.device.clone(), seq, source })?;
        if let Some(s) = status.as_mut() {
            s.set(seq)?;
        }
        if seq == 0 {
            if let Some(ready) = &cfg.ready_file {
                write_marker(ready)?;
            }
        }
        seq += 1;
    };
    eprintln!("katamaran-guest disk-writer: {}: stopped after {seq} records ({end:?})", cfg.device.display());
    Ok(WriterSummary { records: seq, direct, end })
}

fn open_device(path: &Path) -> Result<(File, bool), WriterError> {
    match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((open_dsync(path)?, false)),
        Err(e) => Err(WriterError::Open(path.to_owned(), e)),
    }
}

fn open_dsync(path: &Path) -> Result<File, WriterError> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(path)
        .map_err(|e| WriterError::Open(path.to_owned(), e))
}

/// Creates `path` (and its directory) with the contents `ok`.
///
/// # Errors
/// [`WriterError::Marker`] when the file cannot be written.
pub fn write_marker(path: &Path) -> Result<(), WriterError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| WriterError::Marker(path.to_owned(), e))?;
    }
    std::fs::write(path, b"ok\n").map_err(|e| WriterError::Marker(path.to_owned(), e))
}

/// The last durable sequence number, for the HTTP page: rewritten in place at fixed width so a
/// concurrent reader sees either the old or the new number.
#[derive(Debug)]
struct StatusFile {
    path: PathBuf,
    file: File,
}

impl StatusFile {
    fn create(path: &Path) -> Result<Self, WriterError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| WriterError::Marker(path.to_owned(), e))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| WriterError::Marker(path.to_owned(), e))?;
        Ok(Self { path: path.to_owned(), file })
    }

    fn set(&mut self, seq: u64) -> Result<(), WriterError> {
        let line = format!("{seq:>20}\n");
        self.file.write_all_at(line.as_bytes(), 0).map_err(|e| WriterError::Marker(self.path.clone(), e))
    }
}

/// Reads a status file written by a writer: the last durable sequence number, if any.
pub fn read_status(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::check::check_image;

    fn config(dir: &Path, device_bytes: u64, limit: Option<u64>) -> WriterConfig {
        let device = dir.join("disk.img");
        File::create(&device).unwrap().set_len(device_bytes).unwrap();
        WriterConfig {
            device,
            rate: 1000,
            record_size: 4096,
            status_file: Some(dir.join("status/vdb")),
            ready_file: Some(dir.join("ready/disk-vdb")),
            limit,
        }
    }

    #[test]
    fn writes_a_log_the_checker_accepts_and_stops_at_the_end_of_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 20 * 4096 + 100, None);
        let summary = run_writer(&cfg, &AtomicBool::new(false)).unwrap();
        assert_eq!((summary.records, summary.end), (20, WriterEnd::DeviceFull));
        let report = check_image(&cfg.device, 4096).unwrap();
        assert!(report.ok(), "{}", report.to_text());
        assert_eq!((report.records, report.first_seq, report.last_seq), (20, Some(0), Some(19)));
        assert_eq!(read_status(&dir.path().join("status/vdb")), Some(19));
        assert!(dir.path().join("ready/disk-vdb").exists());
    }

    #[test]
    fn honours_limit_and_pace() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 20, Some(11));
        cfg.rate = 100;
        let started = Instant::now();
        let summary = run_writer(&cfg, &AtomicBool::new(false)).unwrap();
        assert_eq!((summary.records, summary.end), (11, WriterEnd::Limit));
        // Record 10 is due 100 ms after record 0.
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_raised_stop_flag_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20, None);
        let summary = run_writer(&cfg, &AtomicBool::new(true)).unwrap();
        assert_eq!((summary.records, summary.end), (0, WriterEnd::Stopped));
        assert_eq!(check_image(&cfg.device, 4096).unwrap().records, 0);
    }

    #[test]
    fn rejects_bad_configs_and_missing_devices() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 20, None);
        cfg.record_size = 1000;
        assert!(matches!(run_writer(&cfg, &AtomicBool::new(false)), Err(WriterError::RecordSize(_))));
        cfg.record_size = 4096;
        cfg.rate = 0;
        assert!(matches!(run_writer(&cfg, &AtomicBool::new(false)), Err(WriterError::ZeroRate)));
        cfg.rate = 10;
        cfg.device = dir.path().join("absent");
        assert!(matches!(run_writer(&cfg, &AtomicBool::new(false)), Err(WriterError::Open(..))));
    }
}
