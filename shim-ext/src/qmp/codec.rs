//! Bytes from QEMU to QMP messages, without I/O.
//!
//! QMP is one JSON object per line. [`LineDecoder`] splits a byte stream into lines under a size
//! cap, and [`parse_message`] turns one line into a [`Message`]. Both are pure so they can be
//! fuzzed (`shim-ext/fuzz`, target `qmp_line`) and tested with tables.
//!
//! Policy on bad input, decided here once:
//! - a line longer than the cap, a line that is not JSON, a JSON value that is not an object, a
//!   greeting or event that lacks its mandatory shape: an error. The client fails the whole
//!   connection on it, because a peer that sends such a line is not a QMP server we can trust
//!   to keep replies and ids straight, and resynchronising would hide the bug;
//! - unknown members anywhere, and objects that are none of the known kinds: tolerated
//!   ([`Message::Unknown`]), because newer QEMUs add them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::error::QmpError;
use super::types::{ErrorClass, Greeting};

/// The default cap on one QMP line: 16 MiB. `query-qmp-schema` on QEMU 11 is ~200 KiB, so this
/// leaves ample room while bounding memory.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024 * 1024;

/// How much of an offending line error messages quote.
const EXCERPT_CHARS: usize = 120;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting sent on connect.
    Greeting(Greeting),
    /// A successful reply.
    Return {
        /// The `id` of the command, as QEMU echoed it.
        id: Option<Value>,
        /// The reply body.
        value: Value,
    },
    /// An error reply.
    Error {
        /// The `id` of the command, as QEMU echoed it.
        id: Option<Value>,
        /// The error class.
        class: ErrorClass,
        /// The human-readable description.
        desc: String,
    },
    /// An asynchronous event.
    Event(RawEvent),
    /// A JSON object of a kind this build does not know; the client logs and skips it.
    Unknown(Map<String, Value>),
}

/// An event as it was on the wire, before the client stamps its receive time.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    /// The event name, e.g. `STOP`.
    pub name: String,
    /// The event's `data` member, or `Null` if it has none (e.g. `STOP`).
    pub data: Value,
    /// QEMU's timestamp, or `None` if missing or invalid (QEMU sends `-1` when it has no clock).
    pub timestamp: Option<SystemTime>,
}

/// Splits a byte stream into lines, refusing any line longer than the cap.
///
/// Memory stays bounded by the cap plus the largest chunk pushed at once: a line is rejected as
/// soon as its unterminated part exceeds the cap. After an error the decoder stays failed.
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte in `buf`.
    start: usize,
    /// Bytes before this offset are known to hold no newline.
    scanned: usize,
    max_line: usize,
    failed: bool,
}

impl LineDecoder {
    /// A decoder that accepts lines of at most `max_line` bytes (without the line ending).
    pub fn new(max_line: usize) -> Self {
        Self { buf: Vec::new(), start: 0, scanned: 0, max_line, failed: false }
    }

    /// The cap in bytes.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Bytes received but not yet returned as lines.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete, non-blank line without its line ending, or `None` if more bytes are
    /// needed.
    ///
    /// # Errors
    ///
    /// [`QmpError::LineTooLong`] if a line (complete or not) exceeds the cap.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, QmpError> {
        let too_long = QmpError::LineTooLong { limit: self.max_line };
        if self.failed {
            return Err(too_long);
        }
        loop {
            let newline =
                self.buf[self.scanned..].iter().position(|&b| b == b'\n').map(|offset| self.scanned + offset);
            let Some(end) = newline else {
                self.scanned = self.buf.len();
                if self.buffered() > self.max_line {
                    self.failed = true;
                    return Err(too_long);
                }
                return Ok(None);
            };
            let line_start = self.start;
            self.start = end + 1;
            self.scanned = self.start;
            let len = trim_ascii_end(&self.buf[line_start..end]).len();
            if len > self.max_line {
                self.failed = true;
                return Err(too_long);
            }
            // Blank lines carry nothing; skip them rather than report an empty message.
            if len > 0 {
                return Ok(Some(&self.buf[line_start..line_start + len]));
            }
        }
    }

    /// The next complete message, or `None` if more bytes are needed.
    ///
    /// # Errors
    ///
    /// Those of [`LineDecoder::next_line`] and [`parse_message`].
    pub fn next_message(&mut self) -> Result<Option<Message>, QmpError> {
        match self.next_line()? {
            Some(line) => parse_message(line).map(Some),
            None => Ok(None),
        }
    }
}

/// QEMU ends lines with `\r\n` in some versions and `\n` in others.
fn trim_ascii_end(mut line: &[u8]) -> &[u8] {
    while let [rest @ .., last] = line {
        if !last.is_ascii_whitespace() {
            break;
        }
        line = rest;
    }
    line
}

/// Parses one QMP line.
///
/// # Errors
///
/// [`QmpError::InvalidJson`], [`QmpError::NotAnObject`], [`QmpError::MalformedGreeting`] or
/// [`QmpError::MalformedEvent`]; see the module docs for why these fail the connection.
pub fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|source| QmpError::InvalidJson { excerpt: excerpt(line), source })?;
    let Value::Object(mut object) = value else {
        return Err(QmpError::NotAnObject { excerpt: excerpt(line) });
    };
    if let Some(body) = object.remove("QMP") {
        let greeting = serde_json::from_value(body)
            .map_err(|source| QmpError::MalformedGreeting { excerpt: excerpt(line), source })?;
        return Ok(Message::Greeting(greeting));
    }
    if let Some(error) = object.remove("error") {
        let member = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        return Ok(Message::Error {
            id: object.remove("id"),
            class: ErrorClass::from(member("class").as_str()),
            desc: member("desc"),
        });
    }
    if let Some(value) = object.remove("return") {
        return Ok(Message::Return { id: object.remove("id"), value });
    }
    if let Some(name) = object.get("event") {
        let Some(name) = name.as_str() else {
            return Err(QmpError::MalformedEvent { excerpt: excerpt(line) });
        };
        return Ok(Message::Event(RawEvent {
            name: name.to_owned(),
            data: object.remove("data").unwrap_or(Value::Null),
            timestamp: object.get("timestamp").and_then(parse_timestamp),
        }));
    }
    Ok(Message::Unknown(object))
}

/// `{"seconds": S, "microseconds": US}` since the epoch, as QEMU's `qemu_clock_get_ns`
/// realtime clock reports it.
fn parse_timestamp(value: &Value) -> Option<SystemTime> {
    let seconds = u64::try_from(value.get("seconds")?.as_i64()?).ok()?;
    let micros = u32::try_from(value.get("microseconds")?.as_i64()?).ok()?;
    if micros >= 1_000_000 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(seconds, micros * 1_000))
}

/// The start of an offending line, lossily decoded, for error messages.
pub(crate) fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(decoder: &mut LineDecoder) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = decoder.next_line().expect("within cap") {
            out.push(String::from_utf8_lossy(line).into_owned());
        }
        out
    }

    #[test]
    fn splits_lines_across_chunks_and_line_endings() {
        let mut decoder = LineDecoder::new(64);
        decoder.push(b"{\"a\":1}\r\n{\"b\"");
        assert_eq!(lines(&mut decoder), ["{\"a\":1}"]);
        decoder.push(b":2}\n\n  \r\n{\"c\":3}");
        assert_eq!(lines(&mut decoder), ["{\"b\":2}"]);
        assert_eq!(decoder.buffered(), 7, "the partial line stays buffered");
        decoder.push(b"\n");
        assert_eq!(lines(&mut decoder), ["{\"c\":3}"]);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn line_at_the_cap_passes_and_one_byte_more_fails() {
        let mut decoder = LineDecoder::new(8);
        decoder.push(b"12345678\n");
        assert_eq!(lines(&mut decoder), ["12345678"]);
        decoder.push(b"123456789\n");
        assert!(matches!(decoder.next_line(), Err(QmpError::LineTooLong { limit: 8 })));
        decoder.push(b"ok\n");
        assert!(decoder.next_line().is_err(), "a failed decoder stays failed");
    }

    #[test]
    fn unterminated_line_fails_as_soon_as_it_exceeds_the_cap() {
        let mut decoder = LineDecoder::new(16);
        decoder.push(&[b'x'; 16]);
        assert!(decoder.next_line().expect("at the cap").is_none());
        decoder.push(b"x");
        let err = decoder.next_line().expect_err("over the cap");
        assert_eq!(err.to_string(), "QEMU sent a QMP line longer than the 16-byte cap");
    }

    #[test]
    fn parses_each_kind_of_message() {
        let cases: &[(&str, Message)] = &[
            (
                r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "pkg"}, "capabilities": ["oob"]}}"#,
                Message::Greeting(Greeting {
                    version: crate::qmp::QemuVersion { major: 7, minor: 2, micro: 22, package: "pkg".into() },
                    capabilities: vec!["oob".into()],
                }),
            ),
            (r#"{"return": {}, "id": 7}"#, Message::Return { id: Some(json!(7)), value: json!({}) }),
            (
                r#"{"return": [1], "id": "x-3", "new-member": true}"#,
                Message::Return { id: Some(json!("x-3")), value: json!([1]) },
            ),
            (
                r#"{"id": 2, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
                Message::Error {
                    id: Some(json!(2)),
                    class: ErrorClass::CommandNotFound,
                    desc: "The command nope has not been found".into(),
                },
            ),
            (
                r#"{"error": {"class": "FutureClass"}}"#,
                Message::Error {
                    id: None,
                    class: ErrorClass::Other("FutureClass".into()),
                    desc: String::new(),
                },
            ),
            (
                r#"{"timestamp": {"seconds": 1700000000, "microseconds": 250}, "event": "STOP"}"#,
                Message::Event(RawEvent {
                    name: "STOP".into(),
                    data: Value::Null,
                    timestamp: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 250_000)),
                }),
            ),
            (
                r#"{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "MIGRATION", "data": {"status": "setup"}}"#,
                Message::Event(RawEvent {
                    name: "MIGRATION".into(),
                    data: json!({"status": "setup"}),
                    timestamp: None,
                }),
            ),
            (
                r#"{"future-kind": 1}"#,
                Message::Unknown(json!({"future-kind": 1}).as_object().cloned().unwrap_or_default()),
            ),
        ];
        for (line, expected) in cases {
            let parsed = parse_message(line.as_bytes()).expect(line);
            assert_eq!(&parsed, expected, "{line}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_qmp_object() {
        assert!(matches!(parse_message(b"{not json"), Err(QmpError::InvalidJson { .. })));
        assert!(matches!(parse_message(b"[1, 2]"), Err(QmpError::NotAnObject { .. })));
        assert!(matches!(parse_message(br#"{"QMP": 5}"#), Err(QmpError::MalformedGreeting { .. })));
        assert!(matches!(parse_message(br#"{"event": 5}"#), Err(QmpError::MalformedEvent { .. })));
        let long = format!("{{{}", "x".repeat(500));
        let err = parse_message(long.as_bytes()).expect_err("garbage");
        assert!(err.to_string().chars().count() < 250, "errors quote an excerpt, not the line: {err}");
    }

    /// Random bytes (deterministic seed) through the decoder in random chunks: it never panics,
    /// never returns a line over the cap, and never buffers more than the cap plus one chunk.
    /// The fuzz target explores the same property far more widely.
    #[test]
    fn random_bytes_never_panic_and_respect_the_cap() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\":,\n\r 0123456789-.eEtrufalsnQMPidvcxo\\";
        for _ in 0..2_000 {
            let cap = 1 + (next() % 64) as usize;
            let mut decoder = LineDecoder::new(cap);
            let mut largest_chunk = 0;
            for _ in 0..(next() % 16) {
                let len = (next() % 48) as usize;
                largest_chunk = largest_chunk.max(len);
                let chunk: Vec<u8> = (0..len)
                    .map(|_| {
                        let r = next();
                        if r % 4 == 0 {
                            (r >> 8) as u8
                        } else {
                            alphabet[(r >> 8) as usize % alphabet.len()]
                        }
                    })
                    .collect();
                decoder.push(&chunk);
                loop {
                    match decoder.next_line() {
                        Ok(Some(line)) => {
                            assert!(line.len() <= cap);
                            let _ = parse_message(line);
                        }
                        Ok(None) => break,
                        Err(QmpError::LineTooLong { limit }) => {
                            assert_eq!(limit, cap);
                            break;
                        }
                        Err(other) => panic!("unexpected error {other}"),
                    }
                }
                assert!(decoder.buffered() <= cap + largest_chunk);
                let _ = parse_message(&chunk);
            }
        }
    }
}
