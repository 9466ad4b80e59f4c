//! Why a check failed.
//!
//! A check is a script of dozens of steps; rather than one variant per step, each variant is
//! one kind of failure and carries the step in words ("create the ipip tunnel on node-a"), so
//! the printed chain reads like the script.

use std::io;
use std::time::Duration;

/// A failed check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A netlink or namespace operation of katamaran's `net` module failed.
    #[error("failed to {step}")]
    Net {
        /// What the check was doing.
        step: String,
        /// The engine's error.
        #[source]
        source: katamaran::net::Error,
    },
    /// A socket, file or process operation failed.
    #[error("failed to {step}")]
    Io {
        /// What the check was doing.
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The traffic probe could not run (not: it lost packets — that is [`CheckError::Unexpected`]).
    #[error("the traffic probe could not run")]
    Probe(#[source] katamaran_probe::ProbeError),
    /// Something the check asserts did not hold.
    #[error("{0}")]
    Unexpected(String),
    /// A condition the check waits for did not come true in time.
    #[error("timed out after {limit:?} waiting for {what}")]
    Timeout {
        /// The awaited condition.
        what: String,
        /// How long the check waited.
        limit: Duration,
    },
    /// A helper thread of the check panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// Result of a check step.
pub type Result<T, E = CheckError> = std::result::Result<T, E>;

/// Attaches the step's description to an engine or OS error.
pub trait Step<T> {
    /// Wraps the error with `step` ("create the veth between node-a and node-b").
    ///
    /// # Errors
    /// The wrapped error.
    fn step(self, step: impl Into<String>) -> Result<T>;
}

impl<T> Step<T> for std::result::Result<T, katamaran::net::Error> {
    fn step(self, step: impl Into<String>) -> Result<T> {
        self.map_err(|source| CheckError::Net { step: step.into(), source })
    }
}

impl<T> Step<T> for std::result::Result<T, io::Error> {
    fn step(self, step: impl Into<String>) -> Result<T> {
        self.map_err(|source| CheckError::Io { step: step.into(), source })
    }
}

/// Fails with `what()` unless `cond` holds.
///
/// # Errors
/// [`CheckError::Unexpected`] when `cond` is false.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(CheckError::Unexpected(what()))
    }
}
