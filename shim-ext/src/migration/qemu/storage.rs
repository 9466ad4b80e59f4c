//! The destination's half of the storage phase: NBD exports of its (empty) disks.
//!
//! The destination QEMU waits in `-incoming defer`; its disks are exported writable over NBD so
//! the source can mirror into them, and the exports are removed again before the destination VM
//! runs: while an export holds a disk, QEMU refuses the guest device write access to it
//! ("permission conflict") when the migration completes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::qmp::{ErrorClass, QmpClient};

use super::bus::{EventBus, WaitError};
use super::disks::DiskInfo;
use super::error::QemuError;
use super::tls::TlsCreds;

/// Where an NBD server listens or an NBD client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A unix socket path.
    Unix(PathBuf),
    /// A descriptor handed to QEMU with `getfd` under this name: a listening socket for the
    /// server, a connected one for a client (DESIGN.md decision 6).
    Fd(String),
}

impl NbdAddress {
    /// QAPI `SocketAddress` (flat), as `blockdev-add` of an `nbd` node takes it.
    pub fn to_qapi(&self) -> Value {
        match self {
            Self::Unix(path) => json!({ "type": "unix", "path": path }),
            Self::Fd(name) => json!({ "type": "fd", "str": name }),
        }
    }

    /// QAPI `SocketAddressLegacy` (members wrapped in `data`), which `nbd-server-start` still
    /// takes on every QEMU from 7.2 to the current release.
    pub fn to_qapi_legacy(&self) -> Value {
        match self {
            Self::Unix(path) => json!({ "type": "unix", "data": { "path": path } }),
            Self::Fd(name) => json!({ "type": "fd", "data": { "str": name } }),
        }
    }
}

impl From<&Path> for NbdAddress {
    fn from(path: &Path) -> Self {
        Self::Unix(path.to_owned())
    }
}

impl From<PathBuf> for NbdAddress {
    fn from(path: PathBuf) -> Self {
        Self::Unix(path)
    }
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Fd(name) => write!(f, "fd:{name}"),
        }
    }
}

/// QEMU keeps node names in a 32-byte buffer (31 characters and the NUL).
const MAX_QEMU_ID: usize = 31;

/// A QEMU id (node name, job id, export id) made of `prefix` and `raw`.
///
/// QEMU accepts letters, digits, `-`, `_` and `.`, starting with a letter, and node names of at
/// most 31 characters. A drive id that does not fit (too long, or a `#block…` node name standing
/// in for a drive without id) is replaced by a stable 64-bit hash, so the same drive always
/// gets the same name and a leftover from an earlier attempt can be found.
pub fn qemu_id(prefix: &str, raw: &str) -> String {
    let well_formed =
        !raw.is_empty() && raw.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if well_formed && prefix.len() + raw.len() <= MAX_QEMU_ID {
        format!("{prefix}{raw}")
    } else {
        format!("{prefix}{:016x}", fnv1a(raw.as_bytes()))
    }
}

/// FNV-1a: tiny, stable across builds and platforms (unlike `std`'s hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One exported drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExport {
    /// The drive id.
    pub drive_id: String,
    /// The block export id (`block-export-add` `id`).
    pub id: String,
    /// The NBD export name a client asks for: the drive id.
    pub name: String,
    /// The exported node.
    pub node_name: String,
}

/// The NBD server and exports of one incoming migration, as [`export_disks`] created them.
///
/// Clones share whether [`stop_exports`] already succeeded, so a clone registered as a cleanup
/// step does nothing after the success path stopped the exports.
#[derive(Debug, Clone)]
pub struct NbdExports {
    address: NbdAddress,
    exports: Vec<NbdExport>,
    /// Created with `nbd-server-add` because this QEMU lacks `block-export-add` (before 5.2).
    legacy: bool,
    stopped: Arc<AtomicBool>,
}

impl NbdExports {
    /// Where the server listens.
    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// The exports, in the order of the disks given.
    pub fn exports(&self) -> &[NbdExport] {
        &self.exports
    }

    /// The NBD export name of `drive_id`.
    pub fn export_name(&self, drive_id: &str) -> Option<&str> {
        self.exports.iter().find(|export| export.drive_id == drive_id).map(|export| export.name.as_str())
    }
}

/// Starts QEMU's NBD server on `address` (TLS only, with `tls`) and exports every disk
/// writable, named after its drive id. On failure, whatever was created is removed again
/// before the error is returned.
///
/// # Errors
///
/// [`QemuError::NbdServerStart`] or [`QemuError::ExportAdd`].
pub async fn export_disks(
    qmp: &QmpClient,
    address: &NbdAddress,
    disks: &[DiskInfo],
    tls: Option<&TlsCreds>,
) -> Result<NbdExports, QemuError> {
    let mut server = json!({ "addr": address.to_qapi_legacy() });
    if let Some(creds) = tls {
        server["tls-creds"] = json!(creds.id);
    }
    qmp.execute("nbd-server-start", Some(server))
        .await
        .map_err(|source| QemuError::NbdServerStart { address: address.to_string(), source })?;
    let mut exports = NbdExports {
        address: address.clone(),
        exports: Vec::with_capacity(disks.len()),
        legacy: false,
        stopped: Arc::default(),
    };
    for disk in disks {
        match add_export(qmp, disk, &mut exports.legacy).await {
            Ok(export) => {
                debug!(drive = %disk.drive_id, id = %export.id, "NBD export added");
                exports.exports.push(export);
            }
            Err(error) => {
                remove_partial(qmp, &exports).await;
                return Err(error);
            }
        }
    }
    Ok(exports)
}

async fn add_export(qmp: &QmpClient, disk: &DiskInfo, legacy: &mut bool) -> Result<NbdExport, QemuError> {
    let map_err = |source| QemuError::ExportAdd { drive: disk.drive_id.clone(), source };
    if !*legacy {
        let id = qemu_id("kmr-export-", &disk.drive_id);
        let arguments = json!({
            "type": "nbd",
            "id": id,
            "node-name": disk.node_name,
            "name": disk.drive_id,
            "writable": true,
        });
        match qmp.execute("block-export-add", Some(arguments)).await {
            Ok(_) => {
                return Ok(NbdExport {
                    drive_id: disk.drive_id.clone(),
                    id,
                    name: disk.drive_id.clone(),
                    node_name: disk.node_name.clone(),
                })
            }
            Err(error) if error.class() == Some(&ErrorClass::CommandNotFound) => {
                warn!("QEMU has no block-export-add (before 5.2); using nbd-server-add");
                *legacy = true;
            }
            Err(error) => return Err(map_err(error)),
        }
    }
    let arguments = json!({
        "device": disk.node_name,
        "name": disk.drive_id,
        "writable": true,
    });
    qmp.execute("nbd-server-add", Some(arguments)).await.map_err(map_err)?;
    // A legacy export's id is its name.
    Ok(NbdExport {
        drive_id: disk.drive_id.clone(),
        id: disk.drive_id.clone(),
        name: disk.drive_id.clone(),
        node_name: disk.node_name.clone(),
    })
}

/// Best-effort removal after a failed [`export_disks`]; the first error is what the caller
/// reports, so these are only logged.
async fn remove_partial(qmp: &QmpClient, exports: &NbdExports) {
    for export in exports.exports.iter().rev() {
        if let Err(error) = delete_export(qmp, exports.legacy, export).await {
            warn!(drive = %export.drive_id, %error, "cannot remove NBD export while rolling back");
        }
    }
    if let Err(error) = qmp.execute("nbd-server-stop", None).await {
        warn!(%error, "cannot stop the NBD server while rolling back");
    }
}

async fn delete_export(qmp: &QmpClient, legacy: bool, export: &NbdExport) -> Result<(), QemuError> {
    // `hard`: the source may still be connected (e.g. on a failure path); its connection must
    // not keep the disk.
    let (command, arguments) = if legacy {
        ("nbd-server-remove", json!({ "name": export.name, "mode": "hard" }))
    } else {
        ("block-export-del", json!({ "id": export.id, "mode": "hard" }))
    };
    qmp.execute(command, Some(arguments))
        .await
        .map_err(|source| QemuError::ExportDel { drive: export.drive_id.clone(), source })?;
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct ExportInfo {
    id: String,
    shutting_down: bool,
}

/// Removes the exports and stops the NBD server. Must run before the destination VM runs (i.e.
/// before the source's `migrate-continue`): an export still holding a disk makes QEMU fail the
/// guest device's write access when the migration completes.
///
/// Waits for each export's `BLOCK_EXPORT_DELETED`, the point at which QEMU has released the
/// disk. Exports that are already gone are skipped, and a call after a successful one (on any
/// clone) returns at once, so this also serves as cleanup.
///
/// # Errors
///
/// [`QemuError::ListExports`], [`QemuError::ExportDel`], [`QemuError::ExportNotReleased`],
/// [`QemuError::EventsEnded`] or [`QemuError::NbdServerStop`].
pub async fn stop_exports(
    qmp: &QmpClient,
    bus: &EventBus,
    exports: &NbdExports,
    deadline: Duration,
) -> Result<(), QemuError> {
    if exports.stopped.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut events = bus.subscribe();
    if exports.legacy {
        // QEMU before 5.2 has neither `query-block-exports` nor `BLOCK_EXPORT_DELETED`; its
        // removal is synchronous.
        for export in &exports.exports {
            delete_export(qmp, true, export).await?;
        }
    } else {
        let reply = qmp
            .execute("query-block-exports", None)
            .await
            .map_err(|source| QemuError::ListExports { source })?;
        let listed: Vec<ExportInfo> = serde_json::from_value(reply)
            .map_err(|source| QemuError::UnexpectedReply { command: "query-block-exports", source })?;
        let mut pending: Vec<&NbdExport> = Vec::new();
        for export in &exports.exports {
            let Some(info) = listed.iter().find(|info| info.id == export.id) else {
                continue;
            };
            if !info.shutting_down {
                delete_export(qmp, false, export).await?;
            }
            pending.push(export);
        }
        let until = Instant::now() + deadline;
        while let Some(first) = pending.first() {
            let event = events.next_until(until, deadline).await.map_err(|error| match error {
                WaitError::Timeout(_) => {
                    QemuError::ExportNotReleased { drive: first.drive_id.clone(), deadline }
                }
                WaitError::Ended => QemuError::EventsEnded {
                    waiting_for: format!("the release of drive {}'s NBD export", first.drive_id),
                },
            })?;
            if event.name == "BLOCK_EXPORT_DELETED" {
                if let Some(id) = event.data_str("id") {
                    pending.retain(|export| export.id != id);
                }
            }
        }
    }
    qmp.execute("nbd-server-stop", None).await.map_err(|source| QemuError::NbdServerStop { source })?;
    exports.stopped.store(true, Ordering::Release);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_well_formed_short_and_stable() {
        assert_eq!(qemu_id("kmr-nbd-", "drive-0"), "kmr-nbd-drive-0");
        let hashed = qemu_id("kmr-nbd-", "#block133");
        assert!(hashed.starts_with("kmr-nbd-") && hashed.len() == 24, "{hashed}");
        assert_eq!(hashed, qemu_id("kmr-nbd-", "#block133"), "stable");
        assert_ne!(hashed, qemu_id("kmr-nbd-", "#block134"));
        let long = "drive-0123456789abcdef0123456789abcdef";
        let id = qemu_id("kmr-mirror-", long);
        assert!(id.len() <= MAX_QEMU_ID, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c, "reference FNV-1a value");
    }

    #[test]
    fn addresses_in_both_qapi_shapes() {
        let unix = NbdAddress::from(Path::new("/run/x/nbd.sock"));
        assert_eq!(unix.to_qapi(), json!({"type": "unix", "path": "/run/x/nbd.sock"}));
        assert_eq!(unix.to_qapi_legacy(), json!({"type": "unix", "data": {"path": "/run/x/nbd.sock"}}));
        assert_eq!(unix.to_string(), "unix:/run/x/nbd.sock");
        let fd = NbdAddress::Fd("nbd0".into());
        assert_eq!(fd.to_qapi(), json!({"type": "fd", "str": "nbd0"}));
        assert_eq!(fd.to_qapi_legacy(), json!({"type": "fd", "data": {"str": "nbd0"}}));
        assert_eq!(fd.to_string(), "fd:nbd0");
    }
}
