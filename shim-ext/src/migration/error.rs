//! The engine's error: one variant per kind of failure site, each mapped to an [`ErrorKind`].

use std::time::Duration;

use super::ctl::CtlError;
use super::events::ErrorKind;
use super::journal::JournalError;
use super::protocol::ProtocolError;
use super::qemu::QemuError;

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is wrong; nothing was touched.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The node or sandbox cannot do this now.
    #[error("{0}")]
    Precondition(String),
    /// The ownership protocol refuses (a cancel past the commit point, an input out of step).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A QEMU sequence failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] crate::qmp::QmpError),
    /// Netlink failed.
    #[error(transparent)]
    Net(#[from] crate::net::Error),
    /// The source forward could not be prepared.
    #[error(transparent)]
    Forward(#[from] super::network::ForwardError),
    /// A data stream failed.
    #[error(transparent)]
    Data(#[from] crate::dataplane::Error),
    /// The stream TLS credentials could not be made, were refused or could not be written.
    #[error(transparent)]
    StreamTls(#[from] crate::dataplane::tls::TlsError),
    /// Sandbox discovery failed.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Error),
    /// The options are invalid.
    #[error(transparent)]
    Options(#[from] super::options::OptionsError),
    /// The journal could not record a step durably (the step was not taken).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A local file or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The control stream to the peer failed while waiting for something.
    #[error("control stream to the peer failed while {during}")]
    Ctl {
        /// What was awaited.
        during: &'static str,
        /// Why.
        #[source]
        source: CtlError,
    },
    /// The peer sent something the protocol does not allow here.
    #[error("the peer sent {got} while {during}")]
    PeerOutOfStep {
        /// What was awaited.
        during: &'static str,
        /// What came.
        got: String,
    },
    /// The destination gave up before its vote.
    #[error("the destination failed: {0}")]
    DestinationFailed(String),
    /// The destination refused to admit a disk stream.
    #[error("the destination refused a disk stream: {0}")]
    DiskStreamRefused(String),
    /// The destination could not release its disks at pre-switchover.
    #[error("the destination could not release its disks: {0}")]
    StorageRelease(String),
    /// QEMU's migration ended in failure.
    #[error("QEMU migration failed: {0}")]
    QemuMigrationFailed(String),
    /// The QMP connection to the sandbox's QEMU closed.
    #[error("QEMU closed the QMP connection")]
    QmpClosed,
    /// The destination QEMU exited.
    #[error("destination QEMU exited ({0}); see its log")]
    QemuExited(String),
    /// A deadline passed.
    #[error("timed out {what} after {after:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// Cancelled by a caller.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The task running the migration panicked.
    #[error("the migration task panicked: {0}")]
    Panicked(String),
    /// The agent restarted in the middle and rolled its side back.
    #[error("the agent restarted before the commit point; its side was rolled back")]
    RolledBackAfterRestart,
    /// A test-only fail point injected an error.
    #[error("fail point {point} injected an error {detail}")]
    Injected {
        /// The fail point.
        point: &'static str,
        /// Its argument.
        detail: String,
    },
}

impl EngineError {
    /// The kind reported to callers.
    pub fn kind(&self) -> ErrorKind {
        use QemuError as Q;
        match self {
            EngineError::Invalid(_)
            | EngineError::Options(_)
            | EngineError::StreamTls(crate::dataplane::tls::TlsError::Invalid(_)) => {
                ErrorKind::InvalidArgument
            }
            EngineError::Sandbox(e) if e.is_invalid_request() => ErrorKind::InvalidArgument,
            EngineError::NotFound(_) | EngineError::Sandbox(_) => ErrorKind::NotFound,
            EngineError::Precondition(_) | EngineError::Protocol(_) => ErrorKind::FailedPrecondition,
            EngineError::Qemu(
                Q::MirrorStart { .. }
                | Q::MirrorProgress { .. }
                | Q::MirrorFailed { .. }
                | Q::MirrorEndedEarly { .. }
                | Q::MirrorNotReady { .. }
                | Q::MirrorCancel { .. }
                | Q::MirrorNotEnded { .. }
                | Q::TargetAdd { .. }
                | Q::TargetDel { .. }
                | Q::NbdServerStart { .. }
                | Q::NbdServerStop { .. }
                | Q::ExportAdd { .. }
                | Q::ExportDel { .. }
                | Q::ExportNotReleased { .. },
            )
            | EngineError::DiskStreamRefused(_)
            | EngineError::StorageRelease(_) => ErrorKind::Storage,
            EngineError::Qemu(_)
            | EngineError::Qmp(_)
            | EngineError::QmpClosed
            | EngineError::QemuExited(_)
            | EngineError::QemuMigrationFailed(_) => ErrorKind::Qemu,
            EngineError::Net(_)
            | EngineError::Forward(_)
            | EngineError::Data(_)
            | EngineError::Ctl { .. }
            | EngineError::PeerOutOfStep { .. }
            | EngineError::DestinationFailed(_) => ErrorKind::Network,
            EngineError::Io { .. }
            | EngineError::Journal(_)
            | EngineError::StreamTls(_)
            | EngineError::Panicked(_)
            | EngineError::RolledBackAfterRestart
            | EngineError::Injected { .. } => ErrorKind::Internal,
            EngineError::Timeout { .. } => ErrorKind::Timeout,
            EngineError::Cancelled(_) => ErrorKind::Cancelled,
        }
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| EngineError::Io { context, source }
    }

    /// A control-stream failure while waiting for `during`.
    pub fn ctl(during: &'static str) -> impl FnOnce(CtlError) -> Self {
        move |source| EngineError::Ctl { during, source }
    }
}

/// The whole chain of an error, for reports: `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}
