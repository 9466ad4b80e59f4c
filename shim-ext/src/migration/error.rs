//! The engine's error: one variant per kind of failure site, each mapped to an [`ErrorKind`].

use super::events::ErrorKind;

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
    /// A QEMU sequence failed.
    #[error(transparent)]
    Qemu(#[from] super::qemu::QemuError),
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
    /// Sandbox discovery failed.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Error),
    /// The options are invalid.
    #[error(transparent)]
    Options(#[from] super::options::OptionsError),
    /// A local file or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The destination QEMU exited.
    #[error("destination QEMU exited ({0}); see its log")]
    QemuExited(String),
    /// A deadline passed.
    #[error("timed out {0}")]
    Timeout(String),
    /// Cancelled by a caller.
    #[error("cancelled: {0}")]
    Cancelled(String),
}

impl EngineError {
    /// The kind reported to callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Invalid(_) | EngineError::Options(_) => ErrorKind::InvalidArgument,
            EngineError::NotFound(_) => ErrorKind::NotFound,
            EngineError::Precondition(_) => ErrorKind::FailedPrecondition,
            EngineError::Qemu(e) if e.to_string().contains("mirror") => ErrorKind::Storage,
            EngineError::Qemu(_) | EngineError::Qmp(_) | EngineError::QemuExited(_) => ErrorKind::Qemu,
            EngineError::Net(_) | EngineError::Forward(_) | EngineError::Data(_) => ErrorKind::Network,
            EngineError::Sandbox(_) => ErrorKind::NotFound,
            EngineError::Io { .. } => ErrorKind::Internal,
            EngineError::Timeout(_) => ErrorKind::Timeout,
            EngineError::Cancelled(_) => ErrorKind::Cancelled,
        }
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| EngineError::Io { context, source }
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
