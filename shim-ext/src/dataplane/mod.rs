//! The data plane: authenticated TCP streams between nodes for RAM and NBD.
//!
//! Kata's tcfilter sends everything arriving on the pod's `eth0` into the guest, so QEMU cannot
//! accept connections on the pod address; the node-side processes own the TCP connections. Each
//! connection proves it belongs to a migration with a per-migration secret (mutual HMAC-SHA256
//! challenge, [`handshake`]) before a byte of VM state crosses it. An authenticated socket is then
//! handed to QEMU itself where QEMU can take an fd (`getfd` + `fd:` URIs, no userspace copy) or
//! bridged to a unix socket by [`relay`] where it cannot (multifd channels on QEMU 7.2).
//!
//! Disk (NBD) streams are the exception: QEMU's NBD server only accepts on a listening socket.
//! The destination gives it one in the node's namespace behind a [`gate`] that drops every
//! segment not from an address and port the source admitted over its authenticated control
//! stream; the source's QEMU takes the connected socket. With encrypted streams the two QEMUs
//! also authenticate each other with the migration's certificates.
//!
//! [`sendq`] keeps a second descriptor of the RAM stream QEMU writes, to let what it queued
//! leave before the switchover's stop.
//!
//! ```text
//!  source node                                   destination node
//!  QEMU ─fd─ extension ══TCP(handshake)══▶ DataListener ─fd─ QEMU (-incoming)
//!  QEMU ─unix─ relay ════TCP(handshake)══▶ DataListener ─ relay ─unix─ QEMU (multifd, 7.2)
//!  QEMU ─fd─ extension ══TCP(admitted)═══▶ gate ─ QEMU's NBD server (accepts itself)
//! ```

pub mod gate;
pub mod handshake;
pub mod listener;
pub mod relay;
pub mod sendq;
pub mod tls;

pub use handshake::{Secret, StreamKey};
pub use listener::{DataListener, Expected};

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A migration id or stream name that cannot go on the wire.
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        /// "migration id" or "stream name".
        what: &'static str,
        /// The value.
        value: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A secret too short to authenticate anything.
    #[error("migration secret is {0} bytes; at least 32 are required")]
    ShortSecret(usize),
    /// The peer spoke something else than the handshake.
    #[error("data stream handshake: {0}")]
    Protocol(String),
    /// The peer's proof did not verify.
    #[error("data stream handshake: peer failed authentication for {0}")]
    Authentication(String),
    /// The destination refused the stream.
    #[error("data stream {key} rejected by the destination: {reason}")]
    Rejected {
        /// `migration/stream`.
        key: String,
        /// What the destination said.
        reason: &'static str,
    },
    /// Connecting, reading or writing failed.
    #[error("data stream {context}")]
    Io {
        /// What was being done, e.g. "connect to 10.0.0.2:4000".
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A deadline passed.
    #[error("data stream {0} timed out")]
    Timeout(String),
    /// The listener stopped or the expectation was dropped.
    #[error("data listener closed while waiting for {0}")]
    Closed(String),
    /// The same migration id was registered twice.
    #[error("migration {0} already expects data streams on this listener")]
    Duplicate(String),
    /// A gate refused to admit a peer or could not be opened as asked.
    #[error("{0}")]
    Gate(String),
    /// Randomness was unavailable.
    #[error("cannot read random bytes for a nonce: {0}")]
    Random(String),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// How long a data stream may have unacknowledged data (or stay silent to keepalive probes)
/// before the kernel fails it: a peer behind a cut link must end the stream (and QEMU's NBD or
/// migration I/O with it) within the bound a paused guest waits, not after TCP's minutes of
/// retransmissions.
pub const STREAM_DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Sets the dead-peer bounds on a data stream: `TCP_USER_TIMEOUT` of [`STREAM_DEAD_AFTER`] and
/// keepalive probes every second after a second of silence. Best effort: a failure is logged.
pub fn bound_dead_peer(stream: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let ms = u32::try_from(STREAM_DEAD_AFTER.as_millis()).unwrap_or(u32::MAX);
    let results = [
        setsockopt(stream, sockopt::TcpUserTimeout, &ms),
        setsockopt(stream, sockopt::KeepAlive, &true),
        setsockopt(stream, sockopt::TcpKeepIdle, &1),
        setsockopt(stream, sockopt::TcpKeepInterval, &1),
        setsockopt(stream, sockopt::TcpKeepCount, &4),
    ];
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        tracing::debug!(error = %e, "cannot bound a data stream's dead peer");
    }
}
