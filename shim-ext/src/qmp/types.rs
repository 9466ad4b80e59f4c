//! Typed views of the QMP replies katamaran reads.
//!
//! Every view is tolerant by construction: fields are `#[serde(default)]` or `Option`, unknown
//! fields are ignored (no `deny_unknown_fields`), and enums keep unknown values in `Other`.
//! QEMU 7.2 to 11.0 must all decode (see DESIGN.md, "Facts established").

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

qapi_enum! {
    /// The class of a QMP error reply (`QapiErrorClass`).
    pub enum ErrorClass {
        /// Most failures.
        GenericError => "GenericError",
        /// The command does not exist in this QEMU.
        CommandNotFound => "CommandNotFound",
        /// A device has no active driver or medium.
        DeviceNotActive => "DeviceNotActive",
        /// The named device does not exist.
        DeviceNotFound => "DeviceNotFound",
        /// KVM lacks a capability the request needs.
        KvmMissingCap => "KVMMissingCap",
    }
}

qapi_enum! {
    /// A VM run state (`RunState`), as reported by `query-status`.
    pub enum RunState {
        /// Stopped by a debugger.
        Debug => "debug",
        /// Waiting for an incoming migration.
        Inmigrate => "inmigrate",
        /// An internal error stopped the VM.
        InternalError => "internal-error",
        /// An I/O error stopped the VM.
        IoError => "io-error",
        /// Stopped by `stop`.
        Paused => "paused",
        /// Stopped after a completed outgoing migration.
        Postmigrate => "postmigrate",
        /// Started with `-S`, never run.
        Prelaunch => "prelaunch",
        /// Finishing an outgoing migration (the blackout).
        FinishMigrate => "finish-migrate",
        /// Loading a snapshot.
        RestoreVm => "restore-vm",
        /// Running.
        Running => "running",
        /// Saving a snapshot.
        SaveVm => "save-vm",
        /// Shut down (with `-no-shutdown`).
        Shutdown => "shutdown",
        /// Suspended by the guest (ACPI S3).
        Suspended => "suspended",
        /// Stopped by a watchdog action.
        Watchdog => "watchdog",
        /// The guest panicked.
        GuestPanicked => "guest-panicked",
        /// COLO fault tolerance.
        Colo => "colo",
    }
}

qapi_enum! {
    /// The state of a migration (`MigrationStatus`).
    pub enum MigrationStatus {
        /// No migration has run.
        None => "none",
        /// Setting up.
        Setup => "setup",
        /// Being cancelled.
        Cancelling => "cancelling",
        /// Cancelled.
        Cancelled => "cancelled",
        /// Copying RAM (pre-copy).
        Active => "active",
        /// Post-copy running.
        PostcopyActive => "postcopy-active",
        /// Post-copy paused by a network failure.
        PostcopyPaused => "postcopy-paused",
        /// Setting up post-copy recovery.
        PostcopyRecoverSetup => "postcopy-recover-setup",
        /// Recovering post-copy.
        PostcopyRecover => "postcopy-recover",
        /// Done.
        Completed => "completed",
        /// Failed; `error-desc` says why.
        Failed => "failed",
        /// COLO.
        Colo => "colo",
        /// Paused before switch-over (`pause-before-switchover`); waits for `migrate-continue`.
        PreSwitchover => "pre-switchover",
        /// Migrating device state after the pause.
        Device => "device",
        /// Waiting for failover devices to unplug.
        WaitUnplug => "wait-unplug",
    }
}

qapi_enum! {
    /// A migration capability (`MigrationCapability`).
    pub enum MigrationCapability {
        /// XBZRLE page compression.
        Xbzrle => "xbzrle",
        /// Pin all RAM for RDMA.
        RdmaPinAll => "rdma-pin-all",
        /// Throttle the guest when migration does not converge.
        AutoConverge => "auto-converge",
        /// Skip zero blocks (old block migration).
        ZeroBlocks => "zero-blocks",
        /// Multithreaded compression (removed in newer QEMU).
        Compress => "compress",
        /// `MIGRATION` status events.
        Events => "events",
        /// Post-copy RAM.
        PostcopyRam => "postcopy-ram",
        /// COLO.
        XColo => "x-colo",
        /// Release source RAM during post-copy.
        ReleaseRam => "release-ram",
        /// Old block migration (removed in newer QEMU).
        Block => "block",
        /// A return path from destination to source.
        ReturnPath => "return-path",
        /// Pause before switch-over so storage can be settled first.
        PauseBeforeSwitchover => "pause-before-switchover",
        /// Multiple RAM channels.
        Multifd => "multifd",
        /// Migrate dirty bitmaps.
        DirtyBitmaps => "dirty-bitmaps",
        /// Measure post-copy blocktime.
        PostcopyBlocktime => "postcopy-blocktime",
        /// Activate block devices late on the destination.
        LateBlockActivate => "late-block-activate",
        /// Do not migrate shared RAM.
        XIgnoreShared => "x-ignore-shared",
        /// Check the VM UUID on the destination.
        ValidateUuid => "validate-uuid",
        /// Background snapshot.
        BackgroundSnapshot => "background-snapshot",
        /// Zero-copy send for multifd.
        ZeroCopySend => "zero-copy-send",
        /// Preemptible post-copy channel.
        PostcopyPreempt => "postcopy-preempt",
        /// Wait for the destination's switch-over acknowledgement.
        SwitchoverAck => "switchover-ack",
        /// Dirty page rate limit.
        DirtyLimit => "dirty-limit",
        /// Fixed-offset RAM in a file.
        MappedRam => "mapped-ram",
    }
}

/// A QEMU version, from the greeting or `query-version`.
///
/// The wire shape is `{"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "..."}`; this
/// view flattens it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "VersionWire")]
pub struct QemuVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// The distribution's package string (may be empty).
    pub package: String,
}

impl QemuVersion {
    /// `true` if this version is at least `major.minor`.
    pub fn at_least(&self, major: u64, minor: u64) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.trim().is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VersionWire {
    qemu: VersionTriple,
    package: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VersionTriple {
    major: u64,
    minor: u64,
    micro: u64,
}

impl From<VersionWire> for QemuVersion {
    fn from(wire: VersionWire) -> Self {
        Self { major: wire.qemu.major, minor: wire.qemu.minor, micro: wire.qemu.micro, package: wire.package }
    }
}

/// The greeting QEMU sends when a client connects: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Greeting {
    /// The QEMU version.
    pub version: QemuVersion,
    /// Protocol capabilities QEMU offers (e.g. `oob`); we enable none of them.
    pub capabilities: Vec<String>,
}

/// The reply of `query-status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// The reply of `query-migrate`. QEMU leaves out whatever does not apply yet, so every field is
/// optional; a VM that never migrated replies `{}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The migration state.
    pub status: Option<MigrationStatus>,
    /// RAM transfer statistics.
    pub ram: Option<RamStats>,
    /// The measured downtime of a completed migration.
    #[serde(deserialize_with = "opt_millis")]
    pub downtime: Option<Duration>,
    /// QEMU's downtime estimate while pre-copy runs.
    #[serde(deserialize_with = "opt_millis")]
    pub expected_downtime: Option<Duration>,
    /// Time since the migration started (or its total, once done).
    #[serde(deserialize_with = "opt_millis")]
    pub total_time: Option<Duration>,
    /// Time spent in setup.
    #[serde(deserialize_with = "opt_millis")]
    pub setup_time: Option<Duration>,
    /// Why a migration failed.
    pub error_desc: Option<String>,
}

/// RAM statistics of a migration (`MigrationStats`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent so far.
    pub transferred: Option<u64>,
    /// Bytes still to send.
    pub remaining: Option<u64>,
    /// Guest RAM size in bytes.
    pub total: Option<u64>,
    /// Pages dirtied per second.
    pub dirty_pages_rate: Option<u64>,
    /// Number of dirty-bitmap synchronisations (pre-copy iterations).
    pub dirty_sync_count: Option<u64>,
    /// Throughput in megabits per second.
    pub mbps: Option<f64>,
    /// Target page size in bytes, to turn `dirty_pages_rate` into bytes.
    pub page_size: Option<u64>,
}

/// One entry of `query-migrate-capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// Whether it is enabled.
    pub state: bool,
}

/// One entry of `query-commands`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct CommandInfo {
    pub(crate) name: String,
}

/// QEMU reports times as integer milliseconds; a negative value means "not measured".
fn opt_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let millis = Option::<i64>::deserialize(deserializer)?;
    Ok(millis.and_then(|ms| u64::try_from(ms).ok()).map(Duration::from_millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_enum_values_are_kept() {
        let status: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "hibernating"})).expect("decodes");
        assert_eq!(status.status, RunState::Other("hibernating".into()));
        assert_eq!(status.status.to_string(), "hibernating");
        assert_eq!(RunState::from("postmigrate"), RunState::Postmigrate);
        assert_eq!(
            serde_json::to_value(MigrationCapability::PauseBeforeSwitchover).expect("encodes"),
            json!("pause-before-switchover")
        );
        assert_eq!(ErrorClass::from("KVMMissingCap"), ErrorClass::KvmMissingCap);
    }

    #[test]
    fn migration_info_converts_times_and_tolerates_extras() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "active",
            "expected-downtime": 300,
            "total-time": 1234,
            "setup-time": 5,
            "downtime": -1,
            "blocked-reasons": ["x"],
            "ram": {"transferred": 10, "remaining": 20, "total": 30, "mbps": 812.5,
                    "dirty-pages-rate": 7, "dirty-sync-count": 3, "page-size": 4096,
                    "future-counter": 1}
        }))
        .expect("decodes");
        assert_eq!(info.status, Some(MigrationStatus::Active));
        assert_eq!(info.expected_downtime, Some(Duration::from_millis(300)));
        assert_eq!(info.total_time, Some(Duration::from_millis(1234)));
        assert_eq!(info.setup_time, Some(Duration::from_millis(5)));
        assert_eq!(info.downtime, None, "a negative time means not measured");
        let ram = info.ram.expect("ram stats");
        assert_eq!((ram.transferred, ram.remaining, ram.total), (Some(10), Some(20), Some(30)));
        assert_eq!(ram.dirty_pages_rate, Some(7));
        assert_eq!(ram.dirty_sync_count, Some(3));
        assert_eq!(ram.mbps, Some(812.5));
        assert_eq!(ram.page_size, Some(4096));
    }

    #[test]
    fn empty_migration_info_is_all_none() {
        let info: MigrationInfo = serde_json::from_value(json!({})).expect("decodes");
        assert_eq!(info, MigrationInfo::default());
    }

    #[test]
    fn version_flattens_and_compares() {
        let version: QemuVersion = serde_json::from_value(json!({
            "qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2", "new": 1
        }))
        .expect("decodes");
        assert_eq!((version.major, version.minor, version.micro), (7, 2, 22));
        assert!(version.at_least(7, 2));
        assert!(!version.at_least(8, 0));
        assert_eq!(version.to_string(), "7.2.22 (Debian 1:7.2)");
    }
}
