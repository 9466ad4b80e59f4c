//! Every way the QMP client fails.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::types::ErrorClass;

/// An error of the QMP client.
///
/// Errors of a command name the command. Errors that end the whole connection (an oversized or
/// garbled line, a failed read or write) are reported once per affected command as
/// [`QmpError::ConnectionFailed`], whose source is the shared cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The unix socket could not be connected.
    #[error("cannot connect to the QMP socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },

    /// No greeting (or no reply to `qmp_capabilities`) arrived within the handshake deadline.
    #[error("QEMU sent no QMP greeting within {deadline:?}")]
    GreetingTimeout {
        /// The handshake deadline.
        deadline: Duration,
    },

    /// The peer closed the socket before its greeting.
    #[error("QEMU closed the QMP connection before sending a greeting")]
    GreetingClosed,

    /// Reading the greeting failed.
    #[error("cannot read the QMP greeting")]
    GreetingRead {
        /// The read error.
        #[source]
        source: io::Error,
    },

    /// The first line is not a QMP greeting (another protocol, or a QMP server already past
    /// its handshake).
    #[error("the first line from the QMP socket is not a QMP greeting: {excerpt}")]
    NotAGreeting {
        /// The start of the line.
        excerpt: String,
    },

    /// A line longer than the configured cap; the connection is failed rather than buffering
    /// without bound.
    #[error("QEMU sent a QMP line longer than the {limit}-byte cap")]
    LineTooLong {
        /// The cap in bytes.
        limit: usize,
    },

    /// A line that is not JSON.
    #[error("QEMU sent a QMP line that is not JSON: {excerpt}")]
    InvalidJson {
        /// The start of the line.
        excerpt: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// A JSON line that is not an object.
    #[error("QEMU sent a QMP line that is not a JSON object: {excerpt}")]
    NotAnObject {
        /// The start of the line.
        excerpt: String,
    },

    /// A greeting whose body does not have the greeting's shape.
    #[error("QEMU sent a malformed QMP greeting: {excerpt}")]
    MalformedGreeting {
        /// The start of the line.
        excerpt: String,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// An event whose `event` member is not a string.
    #[error("QEMU sent a QMP event without a name: {excerpt}")]
    MalformedEvent {
        /// The start of the line.
        excerpt: String,
    },

    /// Reading from the socket failed.
    #[error("cannot read from the QMP socket")]
    Read {
        /// The read error.
        #[source]
        source: io::Error,
    },

    /// Writing to the socket failed.
    #[error("cannot write to the QMP socket")]
    Write {
        /// The write error.
        #[source]
        source: io::Error,
    },

    /// QEMU answered a command with an error reply.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: ErrorClass,
        /// QEMU's description.
        desc: String,
    },

    /// No reply within the command's deadline. The command may still run in QEMU; a late reply
    /// is dropped.
    #[error("QMP command `{command}` got no reply within {deadline:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The deadline that expired.
        deadline: Duration,
    },

    /// QEMU closed the socket before the command completed, or before it was sent.
    #[error("QMP command `{command}` failed: QEMU closed the connection")]
    Closed {
        /// The command.
        command: String,
    },

    /// The connection failed (see the source) before the command completed, or before it was
    /// sent.
    #[error("QMP command `{command}` failed: the QMP connection is broken")]
    ConnectionFailed {
        /// The command.
        command: String,
        /// What broke the connection; shared by every affected command.
        #[source]
        source: Arc<QmpError>,
    },

    /// The file descriptor to pass could not be duplicated for the writer.
    #[error("cannot duplicate the file descriptor to pass with QMP command `{command}`")]
    DuplicateFd {
        /// The command.
        command: String,
        /// The dup error.
        #[source]
        source: io::Error,
    },

    /// A reply that does not have the shape its typed view expects.
    #[error("QMP command `{command}` returned a reply of an unexpected shape")]
    UnexpectedReply {
        /// The command.
        command: String,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    /// The QEMU error class, if QEMU answered with an error reply.
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            Self::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// `true` if QEMU closed the connection (rather than it failing on our side).
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed { .. } | Self::GreetingClosed)
    }
}
