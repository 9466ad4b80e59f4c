//! The probe datagram: a fixed header, zero padding up to the configured size.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "KTMP"
//!      4     1  version (1)
//!      5     1  kind: 0 = counted data, 1 = ready handshake
//!      6     2  reserved, zero
//!      8     8  run id (random per run), little endian
//!     16     8  sequence number, little endian
//!     24     8  send time in ns since the run's counting start, little endian
//!     32     …  zero padding up to --size
//! ```
//!
//! The echo sends the datagram back verbatim, so the reply carries everything the receiver needs:
//! no shared state between the sender and receiver threads.

/// Identifies probe datagrams among whatever else reaches the socket.
pub const MAGIC: [u8; 4] = *b"KTMP";
/// Wire format version.
pub const VERSION: u8 = 1;
/// Bytes of header; the smallest allowed `--size`.
pub const HEADER_LEN: usize = 32;
/// Largest UDP payload over IPv4 (65535 − 8 UDP − 20 IP).
pub const MAX_SIZE: usize = 65_507;

/// What a datagram is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Counted traffic.
    Data,
    /// Sent before counting starts until the first reply proves the path works.
    Ready,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::Data => 0,
            Kind::Ready => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Kind::Data),
            1 => Some(Kind::Ready),
            _ => None,
        }
    }
}

/// The decoded header of a probe datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the datagram is for.
    pub kind: Kind,
    /// The run that sent it.
    pub run_id: u64,
    /// Sequence number within the run (per kind).
    pub seq: u64,
    /// Send time in ns since the run's counting start.
    pub send_ns: u64,
}

impl Header {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`, leaving the padding alone
    /// (the sender zeroes it once, not per packet).
    ///
    /// Returns `false` when `buf` is shorter than a header.
    pub fn write(&self, buf: &mut [u8]) -> bool {
        let Some(h) = buf.get_mut(..HEADER_LEN) else {
            return false;
        };
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = self.kind.to_byte();
        h[6..8].fill(0);
        h[8..16].copy_from_slice(&self.run_id.to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.send_ns.to_le_bytes());
        true
    }

    /// Parses a datagram; `None` when it is not a probe datagram of this version.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let h = buf.get(..HEADER_LEN)?;
        if h[0..4] != MAGIC || h[4] != VERSION {
            return None;
        }
        let kind = Kind::from_byte(h[5])?;
        Some(Header {
            kind,
            run_id: le_u64(&h[8..16])?,
            seq: le_u64(&h[16..24])?,
            send_ns: le_u64(&h[24..32])?,
        })
    }
}

fn le_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_leaves_padding() {
        let mut buf = [0xAAu8; 64];
        let h = Header { kind: Kind::Data, run_id: 0x0102_0304_0506_0708, seq: 42, send_ns: 1_000_000 };
        assert!(h.write(&mut buf));
        assert_eq!(Header::parse(&buf), Some(h));
        assert_eq!(&buf[..4], b"KTMP");
        assert!(buf[HEADER_LEN..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn foreign_or_short_datagrams_are_rejected() {
        let mut buf = [0u8; 32];
        let h = Header { kind: Kind::Ready, run_id: 1, seq: 2, send_ns: 3 };
        assert!(h.write(&mut buf));
        assert!(Header::parse(&buf[..31]).is_none());
        let mut bad = buf;
        bad[0] = b'X';
        assert!(Header::parse(&bad).is_none());
        let mut bad_kind = buf;
        bad_kind[5] = 9;
        assert!(Header::parse(&bad_kind).is_none());
        assert!(!h.write(&mut [0u8; 16]));
    }
}
