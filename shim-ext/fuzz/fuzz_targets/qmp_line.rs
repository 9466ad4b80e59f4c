//! Feeds arbitrary bytes from "QEMU" through the QMP line decoder and message parser.
//!
//! Properties: nothing panics; no line longer than the cap is ever returned; the decoder never
//! holds more than the cap plus one pushed chunk; a failed decoder stays failed.

#![no_main]

use katamaran::qmp::codec::{parse_message, LineDecoder};
use katamaran::qmp::QmpError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the cap and the chunk size, so small caps and split lines
    // get explored; the rest is the stream.
    let [cap_byte, chunk_byte, stream @ ..] = data else {
        return;
    };
    let cap = 1 + usize::from(*cap_byte) * 4;
    let chunk = 1 + usize::from(*chunk_byte);
    let mut decoder = LineDecoder::new(cap);
    let mut failed = false;
    for piece in stream.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_line() {
                Ok(Some(line)) => {
                    assert!(!failed, "a failed decoder returned a line");
                    assert!(line.len() <= cap, "line of {} bytes over the {cap}-byte cap", line.len());
                    let _ = parse_message(line);
                }
                Ok(None) => {
                    assert!(!failed, "a failed decoder recovered");
                    break;
                }
                Err(QmpError::LineTooLong { limit }) => {
                    assert_eq!(limit, cap);
                    failed = true;
                    break;
                }
                Err(other) => panic!("next_line failed with {other}"),
            }
        }
        assert!(decoder.buffered() <= cap + chunk, "decoder holds {} bytes", decoder.buffered());
    }
    // Whole inputs as one line too: the parser alone must never panic.
    let _ = parse_message(stream);
});
