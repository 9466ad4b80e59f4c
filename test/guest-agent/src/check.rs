//! `disk-check` and `disk-compare`: verify a disk log on the host (raw image) or in the guest.
//!
//! A log is valid when, from offset 0 to the first all-zero block, every block is a record with
//! the right magic and checksum, all from one writer run, numbered 0, 1, 2, … without a hole.
//! For a storage migration, the source's log must be a byte-identical prefix of the
//! destination's.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::json;
use crate::record::{self, hex, RecordError};

/// How many errors a report lists; the rest are only counted.
pub const MAX_LISTED_ERRORS: usize = 100;
/// Read buffer for images: large sequential reads.
const READ_BUFFER: usize = 1 << 20;

/// What is wrong at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The magic is there but the checksum or size field is wrong (torn or altered block).
    Corrupt,
    /// The sequence does not continue from the previous record (missing, repeated or stale
    /// records).
    Gap,
    /// A non-zero block that does not start with the record magic.
    BadMagic,
}

impl ErrorKind {
    /// The name used in JSON reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Gap => "gap",
            ErrorKind::BadMagic => "bad_magic",
        }
    }
}

/// One problem found by the checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogError {
    /// Byte offset of the block.
    pub offset: u64,
    /// What is wrong.
    pub kind: ErrorKind,
    /// For a person.
    pub detail: String,
}

/// The result of `disk-check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Valid records found.
    pub records: u64,
    /// Sequence number of the first valid record.
    pub first_seq: Option<u64>,
    /// Sequence number of the last valid record.
    pub last_seq: Option<u64>,
    /// Block size used.
    pub record_size: usize,
    /// The first [`MAX_LISTED_ERRORS`] errors.
    pub errors: Vec<LogError>,
    /// All errors, listed or not.
    pub error_count: u64,
}

impl CheckReport {
    /// No error at all.
    pub fn ok(&self) -> bool {
        self.error_count == 0
    }

    /// The JSON report: `{records, first_seq, last_seq, ok, errors: [{offset, kind, detail}], …}`.
    pub fn to_json(&self) -> String {
        let errors = json::array(self.errors.iter().map(|e| {
            json::Object::new()
                .u64("offset", e.offset)
                .str("kind", e.kind.as_str())
                .str("detail", &e.detail)
                .finish()
        }));
        json::Object::new()
            .u64("records", self.records)
            .opt_u64("first_seq", self.first_seq)
            .opt_u64("last_seq", self.last_seq)
            .bool("ok", self.ok())
            .raw("errors", &errors)
            .u64("error_count", self.error_count)
            .u64("record_size", self.record_size as u64)
            .finish()
    }

    /// A short summary for a person.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}: {} records, seq {}..{}, record size {}",
            if self.ok() { "ok" } else { "FAILED" },
            self.records,
            self.first_seq.map_or("-".into(), |v| v.to_string()),
            self.last_seq.map_or("-".into(), |v| v.to_string()),
            self.record_size
        );
        for e in &self.errors {
            s.push_str(&format!("\n  offset {}: {}: {}", e.offset, e.kind.as_str(), e.detail));
        }
        if self.error_count > self.errors.len() as u64 {
            s.push_str(&format!("\n  … {} errors in all", self.error_count));
        }
        s
    }

    fn push(&mut self, offset: u64, kind: ErrorKind, detail: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(LogError { offset, kind, detail });
        }
    }
}

/// Why an image could not be read (as opposed to read and found wrong).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The image could not be opened.
    #[error("failed to open {0}")]
    Open(PathBuf, #[source] io::Error),
    /// Reading the image failed.
    #[error("failed to read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// The record size given was not usable.
    #[error("invalid record size")]
    RecordSize(#[source] RecordError),
}

/// Checks the log in the image or device at `path`. The block size comes from the first record's
/// header when it has one, else from `size_hint`.
///
/// # Errors
/// [`CheckError`] when the image cannot be opened or read, or `size_hint` is invalid.
pub fn check_image(path: &Path, size_hint: usize) -> Result<CheckReport, CheckError> {
    let (reader, size) = open_log(path, size_hint)?;
    check_log(reader, size).map_err(|e| CheckError::Read(path.to_owned(), e))
}

/// Checks a log read sequentially from `reader` with blocks of `record_size` bytes.
///
/// # Errors
/// Any read error other than the end of the data.
pub fn check_log<R: Read>(mut reader: R, record_size: usize) -> io::Result<CheckReport> {
    let mut report = CheckReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        record_size,
        errors: Vec::new(),
        error_count: 0,
    };
    let mut block = vec![0u8; record_size];
    let mut offset = 0u64;
    let mut expected = 0u64;
    let mut run_id: Option<[u8; 16]> = None;
    loop {
        let n = read_block(&mut reader, &mut block)?;
        if n == 0 || record::is_zero(&block[..n]) {
            break;
        }
        if n < record_size {
            report.push(offset, ErrorKind::Corrupt, format!("truncated record: {n} of {record_size} bytes"));
            break;
        }
        match record::decode(&block) {
            Ok(rec) => {
                let first_of_run = *run_id.get_or_insert(rec.boot_id);
                if rec.boot_id != first_of_run {
                    report.push(
                        offset,
                        ErrorKind::Gap,
                        format!(
                            "seq {} is from another writer run (boot id {}, log started by {}): \
                             the log ended before this block",
                            rec.seq,
                            hex(&rec.boot_id),
                            hex(&first_of_run)
                        ),
                    );
                } else if rec.seq != expected {
                    let detail = if rec.seq > expected {
                        format!("expected seq {expected}, found {}: {} missing", rec.seq, rec.seq - expected)
                    } else {
                        format!("expected seq {expected}, found {}: out of order or repeated", rec.seq)
                    };
                    report.push(offset, ErrorKind::Gap, detail);
                }
                expected = rec.seq.saturating_add(1);
                report.records += 1;
                report.first_seq.get_or_insert(rec.seq);
                report.last_seq = Some(rec.seq);
            }
            Err(RecordError::BadMagic) => {
                report.push(
                    offset,
                    ErrorKind::BadMagic,
                    format!("non-zero block without record magic (expected seq {expected})"),
                );
                expected += 1;
            }
            Err(e) => {
                report.push(offset, ErrorKind::Corrupt, format!("expected seq {expected}: {e}"));
                expected += 1;
            }
        }
        offset += record_size as u64;
    }
    Ok(report)
}

/// The result of `disk-compare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareReport {
    /// Non-zero blocks in the prefix log.
    pub prefix_records: u64,
    /// Non-zero blocks in the full log.
    pub full_records: u64,
    /// Block size used.
    pub record_size: usize,
    /// Offset of the first block that differs, if any.
    pub first_mismatch: Option<u64>,
    /// What differs there.
    pub detail: Option<String>,
}

impl CompareReport {
    /// The prefix log is a byte-identical prefix of the full one.
    pub fn ok(&self) -> bool {
        self.first_mismatch.is_none()
    }

    /// The JSON report.
    pub fn to_json(&self) -> String {
        let mut o = json::Object::new()
            .bool("ok", self.ok())
            .u64("prefix_records", self.prefix_records)
            .u64("full_records", self.full_records)
            .u64("record_size", self.record_size as u64)
            .opt_u64("first_mismatch_offset", self.first_mismatch);
        o = match &self.detail {
            Some(d) => o.str("detail", d),
            None => o.raw("detail", "null"),
        };
        o.finish()
    }

    /// A short summary for a person.
    pub fn to_text(&self) -> String {
        match (&self.first_mismatch, &self.detail) {
            (Some(off), Some(d)) => format!("FAILED: at offset {off}: {d}"),
            _ => format!(
                "ok: {} records are a byte-identical prefix of {} records",
                self.prefix_records, self.full_records
            ),
        }
    }
}

/// Compares the logs in two images: every non-zero block of `prefix` (up to its first zero
/// block) must equal the block at the same offset of `full`.
///
/// # Errors
/// [`CheckError`] when an image cannot be opened or read.
pub fn compare_images(prefix: &Path, full: &Path, size_hint: usize) -> Result<CompareReport, CheckError> {
    let (p, size) = open_log(prefix, size_hint)?;
    let f = File::open(full).map_err(|e| CheckError::Open(full.to_owned(), e))?;
    compare_logs(p, io::BufReader::with_capacity(READ_BUFFER, f), size).map_err(|e| match e {
        CompareIo::Prefix(e) => CheckError::Read(prefix.to_owned(), e),
        CompareIo::Full(e) => CheckError::Read(full.to_owned(), e),
    })
}

/// Which side of a comparison failed to read.
#[derive(Debug)]
pub enum CompareIo {
    /// Reading the prefix log failed.
    Prefix(io::Error),
    /// Reading the full log failed.
    Full(io::Error),
}

/// Compares two logs read sequentially; see [`compare_images`].
///
/// # Errors
/// [`CompareIo`] naming the side whose read failed.
pub fn compare_logs<P: Read, F: Read>(
    mut prefix: P,
    mut full: F,
    record_size: usize,
) -> Result<CompareReport, CompareIo> {
    let mut report =
        CompareReport { prefix_records: 0, full_records: 0, record_size, first_mismatch: None, detail: None };
    let mut a = vec![0u8; record_size];
    let mut b = vec![0u8; record_size];
    let mut offset = 0u64;
    let mut prefix_done = false;
    loop {
        let na = if prefix_done { 0 } else { read_block(&mut prefix, &mut a).map_err(CompareIo::Prefix)? };
        let nb = read_block(&mut full, &mut b).map_err(CompareIo::Full)?;
        let a_live = na > 0 && !record::is_zero(&a[..na]);
        let b_live = nb > 0 && !record::is_zero(&b[..nb]);
        if !a_live {
            prefix_done = true;
        }
        if !a_live && !b_live {
            break;
        }
        if a_live {
            report.prefix_records += 1;
            if report.first_mismatch.is_none() && (na != nb || a[..na] != b[..nb]) {
                report.first_mismatch = Some(offset);
                report.detail = Some(describe_mismatch(&a[..na], &b[..nb]));
            }
        }
        if b_live {
            report.full_records += 1;
        } else if a_live {
            // The full log ended (or has a hole) where the prefix still has records.
            report.prefix_records += count_live(&mut prefix, &mut a).map_err(CompareIo::Prefix)?;
            break;
        }
        offset += record_size as u64;
    }
    Ok(report)
}

fn count_live<R: Read>(reader: &mut R, block: &mut [u8]) -> io::Result<u64> {
    let mut n = 0;
    loop {
        let got = read_block(reader, block)?;
        if got == 0 || record::is_zero(&block[..got]) {
            return Ok(n);
        }
        n += 1;
    }
}

fn describe_mismatch(prefix: &[u8], full: &[u8]) -> String {
    let what = |b: &[u8]| match record::decode(b) {
        Ok(r) => format!("record seq {} (boot id {})", r.seq, hex(&r.boot_id)),
        Err(_) if record::is_zero(b) => "an empty block".to_owned(),
        Err(e) => format!("an invalid block ({e})"),
    };
    format!("prefix has {}, full has {}", what(prefix), what(full))
}

fn open_log(path: &Path, size_hint: usize) -> Result<(io::BufReader<File>, usize), CheckError> {
    record::validate_size(size_hint).map_err(CheckError::RecordSize)?;
    let mut file = File::open(path).map_err(|e| CheckError::Open(path.to_owned(), e))?;
    let mut head = [0u8; record::HEADER_LEN];
    let n = read_block(&mut file, &mut head).map_err(|e| CheckError::Read(path.to_owned(), e))?;
    let size = record::stated_size(&head[..n]).unwrap_or(size_hint);
    // Back to the start without Seek, so devices and pipes behave the same: reopen.
    let file = File::open(path).map_err(|e| CheckError::Open(path.to_owned(), e))?;
    Ok((io::BufReader::with_capacity(READ_BUFFER, file), size))
}

/// Fills `buf` as far as the data goes; returns how many bytes were read (less only at the end).
fn read_block<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::record::{encode, Record};
    use std::io::Cursor;

    const SIZE: usize = 512;

    fn image(seqs: &[u64], boot: u8, trailing_zero_blocks: usize) -> Vec<u8> {
        let mut img = vec![0u8; (seqs.len() + trailing_zero_blocks) * SIZE];
        for (i, &seq) in seqs.iter().enumerate() {
            let rec = Record { seq, boot_id: [boot; 16], wallclock_ns: 1 + seq };
            encode(&rec, &mut img[i * SIZE..(i + 1) * SIZE]).unwrap();
        }
        img
    }

    fn check(img: &[u8]) -> CheckReport {
        check_log(Cursor::new(img), SIZE).unwrap()
    }

    #[test]
    fn a_contiguous_log_is_ok_and_stops_at_the_first_zero_block() {
        let mut img = image(&(0..10).collect::<Vec<_>>(), 1, 2);
        // Junk after the zero block is not part of the log.
        img.extend_from_slice(&[0xFF; SIZE]);
        let r = check(&img);
        assert!(r.ok(), "{}", r.to_text());
        assert_eq!((r.records, r.first_seq, r.last_seq), (10, Some(0), Some(9)));
    }

    #[test]
    fn a_flipped_byte_is_corrupt_at_that_records_offset() {
        let mut img = image(&(0..10).collect::<Vec<_>>(), 1, 1);
        img[4 * SIZE + 300] ^= 0x40;
        let r = check(&img);
        assert!(!r.ok());
        assert_eq!(r.error_count, 1);
        assert_eq!((r.errors[0].offset, r.errors[0].kind), (4 * SIZE as u64, ErrorKind::Corrupt));
        assert_eq!(r.records, 9);
    }

    #[test]
    fn a_missing_record_is_a_gap() {
        let seqs: Vec<u64> = (0..10).filter(|&s| s != 6).collect();
        let r = check(&image(&seqs, 1, 1));
        assert_eq!(r.error_count, 1, "{}", r.to_text());
        assert_eq!((r.errors[0].offset, r.errors[0].kind), (6 * SIZE as u64, ErrorKind::Gap));
        assert!(r.errors[0].detail.contains("expected seq 6, found 7"), "{}", r.errors[0].detail);
    }

    #[test]
    fn a_log_not_starting_at_zero_is_a_gap() {
        let r = check(&image(&[5, 6, 7], 1, 0));
        assert_eq!(r.error_count, 1);
        assert_eq!((r.errors[0].offset, r.errors[0].kind), (0, ErrorKind::Gap));
        assert_eq!(r.first_seq, Some(5));
    }

    #[test]
    fn stale_records_of_an_earlier_run_are_not_taken_as_a_continuation() {
        let mut img = image(&[0, 1, 2, 3, 4, 5], 9, 0);
        img[..3 * SIZE].copy_from_slice(&image(&[0, 1, 2], 1, 0));
        let r = check(&img);
        assert!(!r.ok());
        assert_eq!((r.errors[0].offset, r.errors[0].kind), (3 * SIZE as u64, ErrorKind::Gap));
        assert!(r.errors[0].detail.contains("another writer run"));
    }

    #[test]
    fn garbage_is_bad_magic_and_a_torn_tail_is_corrupt() {
        let mut img = image(&[0, 1, 2], 1, 0);
        img[SIZE..SIZE + 8].copy_from_slice(b"garbage!");
        img.extend_from_slice(&image(&[3], 1, 0)[..100]);
        let r = check(&img);
        let kinds: Vec<_> = r.errors.iter().map(|e| (e.offset, e.kind)).collect();
        assert_eq!(kinds, vec![(SIZE as u64, ErrorKind::BadMagic), (3 * SIZE as u64, ErrorKind::Corrupt)]);
        // The record after the bad block still continues the sequence.
        assert_eq!(r.records, 2);
    }

    #[test]
    fn an_empty_image_has_no_records_and_no_errors() {
        let r = check(&[0u8; 4 * SIZE]);
        assert!(r.ok());
        assert_eq!((r.records, r.first_seq, r.last_seq), (0, None, None));
        let v = r.to_json();
        assert!(v.contains(r#""first_seq":null"#) && v.contains(r#""ok":true"#), "{v}");
    }

    #[test]
    fn error_lists_are_capped_but_counted() {
        let seqs: Vec<u64> = (0..300).map(|s| s * 2).collect();
        let r = check(&image(&seqs, 1, 0));
        assert_eq!(r.error_count, 299);
        assert_eq!(r.errors.len(), MAX_LISTED_ERRORS);
    }

    fn compare(prefix: &[u8], full: &[u8]) -> CompareReport {
        compare_logs(Cursor::new(prefix), Cursor::new(full), SIZE).unwrap()
    }

    #[test]
    fn a_true_prefix_compares_ok() {
        let full = image(&(0..20).collect::<Vec<_>>(), 1, 3);
        let mut prefix = full[..12 * SIZE].to_vec();
        prefix.extend_from_slice(&[0u8; 5 * SIZE]);
        let r = compare(&prefix, &full);
        assert!(r.ok(), "{}", r.to_text());
        assert_eq!((r.prefix_records, r.full_records), (12, 20));
        assert!(compare(&full, &full).ok());
    }

    #[test]
    fn a_differing_block_is_a_mismatch_at_its_offset() {
        let full = image(&(0..20).collect::<Vec<_>>(), 1, 0);
        let mut prefix = full[..12 * SIZE].to_vec();
        prefix[7 * SIZE + 50] ^= 1;
        let r = compare(&prefix, &full);
        assert_eq!(r.first_mismatch, Some(7 * SIZE as u64));
        assert!(r.detail.as_deref().unwrap_or_default().contains("invalid block"));
    }

    #[test]
    fn a_prefix_longer_than_the_full_log_is_a_mismatch() {
        let prefix = image(&(0..10).collect::<Vec<_>>(), 1, 0);
        let full = image(&(0..6).collect::<Vec<_>>(), 1, 2);
        let r = compare(&prefix, &full);
        assert_eq!(r.first_mismatch, Some(6 * SIZE as u64));
        assert_eq!((r.prefix_records, r.full_records), (10, 6));
        assert!(r.detail.as_deref().unwrap_or_default().contains("an empty block"), "{:?}", r.detail);
        assert!(r.to_json().contains(r#""ok":false"#));
    }
}
