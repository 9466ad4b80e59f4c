//! The disk record: one per `--record-size` block, written back to back from offset 0.
//!
//! ```text
//! offset   size  field
//!      0      8  magic "KTMRDSK1"
//!      8      8  sequence number, little endian (0, 1, 2, … from offset 0)
//!     16     16  writer boot id: random per writer start, the same in all its records
//!     32      8  wall clock at write, ns since the Unix epoch, little endian
//!     40      4  record size in bytes, little endian (lets a checker find the block size)
//!     44      …  payload: a pattern derived from the sequence number
//!   size-4    4  CRC-32 (IEEE) of bytes 0..size-4, little endian
//! ```
//! A never-written block is all zero, which is how a checker finds the end of the log.

use crate::crc32::crc32;

/// Identifies a katamaran disk record.
pub const MAGIC: [u8; 8] = *b"KTMRDSK1";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 44;
/// The default `--record-size`: one page, what O_DIRECT handles on every device.
pub const DEFAULT_RECORD_SIZE: usize = 4096;
/// Records are whole sectors so O_DIRECT can write them.
pub const SECTOR: usize = 512;
/// Upper bound for `--record-size`.
pub const MAX_RECORD_SIZE: usize = 1 << 20;

/// The decoded fields of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Position in the writer's sequence.
    pub seq: u64,
    /// The writer run that wrote it.
    pub boot_id: [u8; 16],
    /// Wall clock at write, ns since the Unix epoch.
    pub wallclock_ns: u64,
}

/// Why a block is not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The block does not start with [`MAGIC`].
    #[error("no record magic")]
    BadMagic,
    /// The stored checksum does not match the contents.
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum {
        /// CRC stored in the block.
        stored: u32,
        /// CRC of the block's contents.
        computed: u32,
    },
    /// The block's size field disagrees with the size being read.
    #[error("record says it is {stated} bytes, blocks here are {actual}")]
    Size {
        /// Size in the record header.
        stated: u32,
        /// Size of the block read.
        actual: usize,
    },
    /// A record size that is not a positive multiple of 512 up to 1 MiB.
    #[error("record size {0} must be a multiple of {SECTOR} bytes between {SECTOR} and {MAX_RECORD_SIZE}")]
    InvalidSize(usize),
}

/// Checks that `size` can be used as a record size.
///
/// # Errors
/// [`RecordError::InvalidSize`] unless `size` is a multiple of 512 between 512 and 1 MiB.
pub fn validate_size(size: usize) -> Result<(), RecordError> {
    if (SECTOR..=MAX_RECORD_SIZE).contains(&size) && size.is_multiple_of(SECTOR) {
        Ok(())
    } else {
        Err(RecordError::InvalidSize(size))
    }
}

/// Writes `rec` into `buf`, whose length is the record size (see [`validate_size`]).
///
/// # Errors
/// [`RecordError::InvalidSize`] when `buf.len()` is not a valid record size.
pub fn encode(rec: &Record, buf: &mut [u8]) -> Result<(), RecordError> {
    validate_size(buf.len())?;
    let size = buf.len();
    let stated = u32::try_from(size).map_err(|_| RecordError::InvalidSize(size))?;
    buf[0..8].copy_from_slice(&MAGIC);
    buf[8..16].copy_from_slice(&rec.seq.to_le_bytes());
    buf[16..32].copy_from_slice(&rec.boot_id);
    buf[32..40].copy_from_slice(&rec.wallclock_ns.to_le_bytes());
    buf[40..44].copy_from_slice(&stated.to_le_bytes());
    let seed = rec.seq.to_le_bytes();
    for (i, b) in buf[HEADER_LEN..size - 4].iter_mut().enumerate() {
        *b = seed[i % 8] ^ (i as u8);
    }
    let crc = crc32(&buf[..size - 4]);
    buf[size - 4..].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes and verifies one block.
///
/// # Errors
/// [`RecordError::BadMagic`], [`RecordError::Checksum`], or [`RecordError::Size`] when the block
/// is not a valid record of its length.
pub fn decode(buf: &[u8]) -> Result<Record, RecordError> {
    if buf.len() < HEADER_LEN + 4 || buf[0..8] != MAGIC {
        return Err(RecordError::BadMagic);
    }
    let size = buf.len();
    let stored = read_u32(&buf[size - 4..]);
    let computed = crc32(&buf[..size - 4]);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    let stated = read_u32(&buf[40..44]);
    if usize::try_from(stated).ok() != Some(size) {
        return Err(RecordError::Size { stated, actual: size });
    }
    let mut boot_id = [0u8; 16];
    boot_id.copy_from_slice(&buf[16..32]);
    Ok(Record { seq: read_u64(&buf[8..16]), boot_id, wallclock_ns: read_u64(&buf[32..40]) })
}

/// The record size a block claims, if it starts with the magic and states a valid size.
/// Lets a checker find the block size from the first record.
pub fn stated_size(head: &[u8]) -> Option<usize> {
    if head.len() < HEADER_LEN || head[0..8] != MAGIC {
        return None;
    }
    let size = usize::try_from(read_u32(&head[40..44])).ok()?;
    validate_size(size).ok().map(|()| size)
}

/// Whether every byte is zero: a block no record was ever written to.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// Lower-case hex of a boot id, for reports.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        Record { seq, boot_id: [7; 16], wallclock_ns: 1_700_000_000_000_000_000 + seq }
    }

    #[test]
    fn round_trips_at_every_size() {
        for size in [512, 4096, 8192] {
            let mut buf = vec![0u8; size];
            encode(&rec(42), &mut buf).unwrap();
            assert_eq!(decode(&buf), Ok(rec(42)));
            assert_eq!(stated_size(&buf), Some(size));
            assert!(!is_zero(&buf));
        }
    }

    #[test]
    fn any_flipped_byte_fails_the_checksum_or_magic() {
        let mut good = vec![0u8; 512];
        encode(&rec(3), &mut good).unwrap();
        for i in [8, 20, 33, 100, 507, 510] {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(matches!(decode(&bad), Err(RecordError::Checksum { .. })), "byte {i}");
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(RecordError::BadMagic));
    }

    #[test]
    fn a_record_read_with_the_wrong_block_size_is_rejected() {
        let mut buf = vec![0u8; 1024];
        encode(&rec(1), &mut buf).unwrap();
        // Re-checksummed at 512 bytes, the size field still says 1024.
        let mut half = buf[..512].to_vec();
        let crc = crc32(&half[..508]);
        half[508..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&half), Err(RecordError::Size { stated: 1024, actual: 512 }));
    }

    #[test]
    fn sizes_must_be_whole_sectors() {
        assert!(validate_size(4096).is_ok());
        for bad in [0, 100, 511, 513, 2 << 20] {
            assert_eq!(validate_size(bad), Err(RecordError::InvalidSize(bad)));
        }
        assert!(encode(&rec(0), &mut [0u8; 100]).is_err());
    }
}
