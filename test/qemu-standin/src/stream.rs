//! The stand-in's migration stream: a magic line, then frames `tag (u8) | length (u32 BE) |
//! payload`; the destination answers on the same socket with one byte once it has loaded
//! everything (QEMU's return path).

use std::io::{Read, Write};

use crate::Error;

/// First bytes of every stream.
pub const MAGIC: &[u8; 16] = b"KMR-STANDIN-MIG1";
/// Guest memory: the payload is RAM bytes.
pub const TAG_RAM: u8 = 1;
/// The device state: a JSON object.
pub const TAG_DEVICE: u8 = 2;
/// The end of the stream.
pub const TAG_END: u8 = 3;
/// The destination's answer: everything loaded.
pub const ACK: u8 = 0x5a;
/// Largest payload accepted.
pub const MAX_FRAME: u32 = 4 << 20;

/// Writes one frame.
///
/// # Errors
/// [`Error::StreamIo`].
pub fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> Result<(), Error> {
    let len = u32::try_from(payload.len()).map_err(|_| Error::Stream("frame too large".into()))?;
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).map_err(Error::StreamIo)?;
    w.write_all(payload).map_err(Error::StreamIo)
}

/// Reads one frame header: (tag, length).
///
/// # Errors
/// [`Error::StreamIo`] (EOF included), [`Error::Stream`] for an unknown tag or a length over
/// [`MAX_FRAME`].
pub fn read_header(r: &mut impl Read) -> Result<(u8, u32), Error> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(Error::StreamIo)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if !(TAG_RAM..=TAG_END).contains(&head[0]) {
        return Err(Error::Stream(format!("unknown frame tag {}", head[0])));
    }
    if len > MAX_FRAME {
        return Err(Error::Stream(format!("frame of {len} bytes")));
    }
    Ok((head[0], len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, TAG_RAM, &[7; 10]).expect("write");
        write_frame(&mut buf, TAG_END, &[]).expect("write");
        let mut r = buf.as_slice();
        assert_eq!(read_header(&mut r).expect("header"), (TAG_RAM, 10));
        r = &r[10..];
        assert_eq!(read_header(&mut r).expect("header"), (TAG_END, 0));
        assert!(read_header(&mut r).is_err(), "EOF");
        assert!(read_header(&mut [9u8, 0, 0, 0, 0].as_slice()).is_err(), "unknown tag");
        assert!(read_header(&mut [1u8, 0xff, 0, 0, 0].as_slice()).is_err(), "too long");
    }
}
