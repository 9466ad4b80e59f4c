//! Every way a QMP sequence of the storage or compute phase fails.

use std::time::Duration;

use crate::qmp::{QemuVersion, QmpError};

/// An error of a storage or compute QMP sequence.
///
/// Each variant is one failure site and names what it was doing to which drive, capability or
/// command; a QEMU error reply is the `source`, which itself names the QMP command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QemuError {
    /// One of the discovery queries failed.
    #[error("cannot discover what this QEMU offers")]
    Discover {
        /// The failed query.
        #[source]
        source: QmpError,
    },

    /// A migration capability the configuration needs is not in `query-migrate-capabilities`.
    #[error("QEMU {version} does not offer migration capability '{capability}'")]
    MissingCapability {
        /// The running QEMU.
        version: QemuVersion,
        /// The capability as QEMU spells it.
        capability: String,
    },

    /// A QMP command the sequence needs is not in `query-commands`.
    #[error("QEMU {version} does not offer QMP command '{command}'")]
    MissingCommand {
        /// The running QEMU.
        version: QemuVersion,
        /// The command.
        command: String,
    },

    /// A RAM configuration value QEMU would reject.
    #[error("invalid RAM migration setting {field}: {detail}")]
    InvalidRamConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },

    /// `migrate-set-capabilities` failed.
    #[error("cannot set migration capabilities [{capabilities}]")]
    SetCapabilities {
        /// What was asked, e.g. `events=on, multifd=off`.
        capabilities: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// QEMU refused the stream TLS credentials (`object-add` of `tls-creds-x509`).
    #[error("QEMU refused the stream TLS credentials {id}")]
    TlsCreds {
        /// The object id.
        id: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// The files of the stream TLS credentials could not be written or removed.
    #[error(transparent)]
    TlsFiles(crate::dataplane::tls::TlsError),

    /// `migrate-set-parameters` failed.
    #[error("cannot set migration parameters {parameters}")]
    SetParameters {
        /// The JSON that was sent.
        parameters: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `migrate` failed.
    #[error("cannot start the outgoing migration to {uri}")]
    StartOutgoing {
        /// The migration URI.
        uri: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `migrate-incoming` failed.
    #[error("cannot start the incoming migration on {uri}")]
    StartIncoming {
        /// The migration URI.
        uri: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `query-migrate` failed.
    #[error("cannot read the migration status")]
    QueryMigrate {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `query-migrate-parameters` failed.
    #[error("cannot read the migration parameters")]
    QueryParameters {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// A command of the dirty-rate measurement failed (the migration goes on without it).
    #[error("cannot measure the guest's dirty rate ({command})")]
    DirtyRate {
        /// The command.
        command: &'static str,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `migrate-continue` failed.
    #[error("cannot continue the migration after the pre-switchover pause")]
    Continue {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `migrate_cancel` failed.
    #[error("cannot cancel the migration")]
    Cancel {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// The migration reached a terminal state while a later state was awaited.
    #[error("the migration ended as '{status}' while waiting for '{waiting_for}'{}", detail_suffix(.detail))]
    MigrationEnded {
        /// The awaited status.
        waiting_for: String,
        /// The terminal status reached.
        status: String,
        /// QEMU's `error-desc`, if any.
        detail: Option<String>,
    },

    /// No `MIGRATION` event with the awaited status arrived in time.
    #[error("timed out after {deadline:?} waiting for {waiting_for}")]
    MigrationTimeout {
        /// What was awaited, e.g. `migration status 'pre-switchover'`.
        waiting_for: String,
        /// The time allowed.
        deadline: Duration,
    },

    /// The QMP connection (and with it the event stream) ended while waiting.
    #[error("the QMP event stream ended while waiting for {waiting_for}")]
    EventsEnded {
        /// What was awaited.
        waiting_for: String,
    },

    /// `query-block` failed or returned something else than a list of drives.
    #[error("cannot list the VM's drives")]
    ListDisks {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// A reply that does not have the shape the sequence reads.
    #[error("QMP command `{command}` returned a reply of an unexpected shape")]
    UnexpectedReply {
        /// The command.
        command: &'static str,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// A drive of the source has no drive of the same id on the destination.
    #[error("drive {drive} has no counterpart on the destination")]
    DriveMissing {
        /// The drive id.
        drive: String,
    },

    /// Source and destination drive differ in size; a mirror cannot resize an NBD target.
    #[error(
        "drive {drive} is {source_size} bytes on the source but {destination_size} bytes on the destination"
    )]
    DriveSizeMismatch {
        /// The drive id.
        drive: String,
        /// Virtual size on the source.
        source_size: u64,
        /// Virtual size on the destination.
        destination_size: u64,
    },

    /// `nbd-server-start` failed.
    #[error("cannot start the NBD server on {address}")]
    NbdServerStart {
        /// Where it should have listened.
        address: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `block-export-add` (or `nbd-server-add`) failed.
    #[error("cannot export drive {drive} over NBD")]
    ExportAdd {
        /// The drive id.
        drive: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `query-block-exports` failed.
    #[error("cannot list the NBD exports")]
    ListExports {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `block-export-del` (or `nbd-server-remove`) failed.
    #[error("cannot remove the NBD export of drive {drive}")]
    ExportDel {
        /// The drive id.
        drive: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `BLOCK_EXPORT_DELETED` did not arrive: the export still holds the disk.
    #[error("the NBD export of drive {drive} was not released within {deadline:?}")]
    ExportNotReleased {
        /// The drive id.
        drive: String,
        /// The time allowed.
        deadline: Duration,
    },

    /// `nbd-server-stop` failed.
    #[error("cannot stop the NBD server")]
    NbdServerStop {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `blockdev-add` of the NBD client node failed (e.g. the destination is not listening).
    #[error("cannot connect drive {drive} to its NBD target")]
    TargetAdd {
        /// The drive id.
        drive: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `blockdev-mirror` failed.
    #[error("cannot start the mirror of drive {drive}")]
    MirrorStart {
        /// The drive id.
        drive: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `query-block-jobs` failed.
    #[error("cannot read the mirror progress")]
    MirrorProgress {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// The mirror job ended with an error (QEMU's `BLOCK_JOB_COMPLETED` with `error`).
    #[error("the mirror of drive {drive} failed: {error}")]
    MirrorFailed {
        /// The drive id.
        drive: String,
        /// QEMU's error text.
        error: String,
    },

    /// The mirror job ended without being in sync, so the target is not a consistent copy.
    #[error("the mirror of drive {drive} ended before it was in sync ({how})")]
    MirrorEndedEarly {
        /// The drive id.
        drive: String,
        /// What ended it, e.g. `cancelled`, `completed`, `vanished`.
        how: &'static str,
    },

    /// Some mirrors were not in sync within the storage deadline.
    #[error("the mirror of {drives} was not in sync within {deadline:?}")]
    MirrorNotReady {
        /// The drives still copying, comma-separated.
        drives: String,
        /// The time allowed.
        deadline: Duration,
    },

    /// `block-job-cancel` failed.
    #[error("cannot {action} the mirror of drive {drive}")]
    MirrorCancel {
        /// `complete` (soft cancel of a ready mirror) or `abort` (forced).
        action: &'static str,
        /// The drive id.
        drive: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// The mirror job did not end in time after `block-job-cancel`.
    #[error("the mirror of drive {drive} did not end within {deadline:?}")]
    MirrorNotEnded {
        /// The drive id.
        drive: String,
        /// The time allowed.
        deadline: Duration,
    },

    /// `query-named-block-nodes` failed.
    #[error("cannot list the block nodes")]
    ListNodes {
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },

    /// `blockdev-del` of the NBD client node failed.
    #[error("cannot remove the NBD target node {node} of drive {drive}")]
    TargetDel {
        /// The drive id.
        drive: String,
        /// The node name.
        node: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail.as_deref().map(|text| format!(": {text}")).unwrap_or_default()
}
