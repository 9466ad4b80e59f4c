//! Errors of the lab helpers.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A `hack/lab.sh` command could not be started.
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `hack/lab.sh` (or other helper) command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// The last lines it printed on stderr.
        stderr: String,
    },
    /// `lab.sh paths` printed something that is not `KEY=VALUE` with the keys we need.
    #[error("`lab.sh paths` output lacks {key}")]
    PathsMissing {
        /// The missing key.
        key: &'static str,
    },
    /// A JSON report could not be read.
    #[error("could not read the report {path}")]
    ReportRead {
        /// Where the report should be.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON report did not parse.
    #[error("the report from {origin} is not the expected JSON")]
    ReportParse {
        /// Which file or command produced it.
        origin: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The lab's serialisation lock could not be taken.
    #[error("could not lock {path}")]
    Lock {
        /// The file used as a lock.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A network namespace could not be opened or entered.
    #[error("could not enter network namespace {name}")]
    Netns {
        /// The namespace's name under /run/netns.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A packet capture could not start or failed.
    #[error("packet capture in {netns}: {detail}")]
    Capture {
        /// The namespace.
        netns: String,
        /// What failed.
        detail: String,
    },
    /// The thread that ran code inside a namespace panicked.
    #[error("the thread inside network namespace {name} panicked")]
    NetnsThread {
        /// The namespace's name.
        name: String,
    },
    /// An HTTP exchange failed at the socket level.
    #[error("HTTP GET {url} failed")]
    Http {
        /// What was fetched.
        url: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An HTTP server answered with something other than 200.
    #[error("HTTP GET {url} answered `{status_line}`")]
    HttpStatus {
        /// What was fetched.
        url: String,
        /// The response's first line.
        status_line: String,
    },
    /// A file the lab needs (guest image, binary) could not be produced.
    #[error("{what} is missing: {path}")]
    Missing {
        /// What it is.
        what: &'static str,
        /// Where it should be.
        path: PathBuf,
    },
    /// A background process could not be stopped or waited for.
    #[error("could not wait for {what}")]
    Wait {
        /// Which process.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A condition did not become true before its deadline.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
    },
}
