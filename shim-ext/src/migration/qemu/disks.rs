//! The VM's drives as QEMU sees them (`query-block`).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::qmp::QmpClient;

use super::error::QemuError;

/// One drive with a medium.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The drive id (`-drive id=…`, QMP's `device`). Drives attached with `-blockdev` have no
    /// drive id; their top node name stands in, so the same VM on both nodes matches up.
    pub drive_id: String,
    /// The top block node (what a mirror reads and an export serves).
    pub node_name: String,
    /// The image file (QEMU's `file`; a `json:{…}` pseudo-filename for complex graphs).
    pub file: String,
    /// The image format driver, e.g. `raw`, `qcow2`.
    pub format: String,
    /// Size as the guest sees it, in bytes.
    pub virtual_size: u64,
    /// Opened read-only (e.g. Kata's guest image): nothing to mirror.
    pub read_only: bool,
    /// The guest device's QOM path, if a device uses the drive.
    pub qdev: Option<String>,
}

/// Lists the drives that have a medium; empty drives (a CD-ROM without a disc) are skipped.
///
/// # Errors
///
/// [`QemuError::ListDisks`] or [`QemuError::UnexpectedReply`].
pub async fn list_disks(qmp: &QmpClient) -> Result<Vec<DiskInfo>, QemuError> {
    let reply = qmp.execute("query-block", None).await.map_err(|source| QemuError::ListDisks { source })?;
    disks_from_query_block(reply)
        .map_err(|source| QemuError::UnexpectedReply { command: "query-block", source })
}

/// Decodes a `query-block` reply. Unknown members are ignored.
///
/// # Errors
///
/// The decoder's complaint when the reply is not a list of drives.
pub fn disks_from_query_block(reply: Value) -> Result<Vec<DiskInfo>, serde_json::Error> {
    let drives: Vec<BlockInfo> = serde_json::from_value(reply)?;
    Ok(drives
        .into_iter()
        .filter_map(|drive| {
            let inserted = drive.inserted?;
            let drive_id = if drive.device.is_empty() { inserted.node_name.clone() } else { drive.device };
            let format = inserted.image.format.filter(|format| !format.is_empty()).unwrap_or(inserted.drv);
            Some(DiskInfo {
                drive_id,
                node_name: inserted.node_name,
                file: inserted.file,
                format,
                virtual_size: inserted.image.virtual_size,
                read_only: inserted.ro,
                qdev: drive.qdev.filter(|qdev| !qdev.is_empty()),
            })
        })
        .collect())
}

/// Pairs every source drive to mirror (the writable ones) with the destination drive of the
/// same id, and checks the sizes: a mirror cannot grow an NBD target.
///
/// # Errors
///
/// [`QemuError::DriveMissing`] or [`QemuError::DriveSizeMismatch`].
pub fn pair_disks<'a>(
    source: &'a [DiskInfo],
    destination: &'a [DiskInfo],
) -> Result<Vec<(&'a DiskInfo, &'a DiskInfo)>, QemuError> {
    let by_id: HashMap<&str, &DiskInfo> =
        destination.iter().map(|disk| (disk.drive_id.as_str(), disk)).collect();
    source
        .iter()
        .filter(|disk| !disk.read_only)
        .map(|disk| {
            let target = by_id
                .get(disk.drive_id.as_str())
                .ok_or_else(|| QemuError::DriveMissing { drive: disk.drive_id.clone() })?;
            if target.virtual_size != disk.virtual_size {
                return Err(QemuError::DriveSizeMismatch {
                    drive: disk.drive_id.clone(),
                    source_size: disk.virtual_size,
                    destination_size: target.virtual_size,
                });
            }
            Ok((disk, *target))
        })
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BlockInfo {
    device: String,
    qdev: Option<String>,
    inserted: Option<Inserted>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct Inserted {
    node_name: String,
    file: String,
    ro: bool,
    drv: String,
    image: Image,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct Image {
    virtual_size: u64,
    format: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query_block() -> Value {
        json!([
            {"io-status": "ok", "device": "drive-0", "locked": false, "removable": false,
             "qdev": "/machine/peripheral-anon/device[0]/virtio-backend", "type": "unknown",
             "future": {"x": 1},
             "inserted": {"node-name": "#block133", "file": "/img/src.img", "ro": false,
                          "drv": "raw", "cache": {"direct": false}, "new-member": true,
                          "image": {"virtual-size": 67108864, "filename": "/img/src.img",
                                    "format": "raw", "actual-size": 4096}}},
            {"device": "ide1-cd0", "locked": false, "removable": true, "tray_open": false,
             "qdev": "/machine/unattached/device[23]", "type": "unknown"},
            {"device": "", "qdev": "blk0",
             "inserted": {"node-name": "drive-abc", "file": "json:{}", "ro": true, "drv": "qcow2",
                          "image": {"virtual-size": 1024}}}
        ])
    }

    #[test]
    fn reads_drives_and_skips_empty_ones() {
        let disks = disks_from_query_block(query_block()).expect("decodes");
        assert_eq!(
            disks,
            [
                DiskInfo {
                    drive_id: "drive-0".into(),
                    node_name: "#block133".into(),
                    file: "/img/src.img".into(),
                    format: "raw".into(),
                    virtual_size: 64 << 20,
                    read_only: false,
                    qdev: Some("/machine/peripheral-anon/device[0]/virtio-backend".into()),
                },
                DiskInfo {
                    drive_id: "drive-abc".into(),
                    node_name: "drive-abc".into(),
                    file: "json:{}".into(),
                    format: "qcow2".into(),
                    virtual_size: 1024,
                    read_only: true,
                    qdev: Some("blk0".into()),
                },
            ]
        );
        assert!(disks_from_query_block(json!({"not": "a list"})).is_err());
    }

    #[test]
    fn pairs_writable_drives_by_id_and_checks_sizes() {
        let source = disks_from_query_block(query_block()).expect("decodes");
        let mut destination = source.clone();
        destination[0].node_name = "#block9".into();
        let pairs = pair_disks(&source, &destination).expect("pairs");
        assert_eq!(pairs.len(), 1, "the read-only image is not mirrored");
        assert_eq!(pairs[0].1.node_name, "#block9");

        destination[0].virtual_size = 1 << 20;
        let error = pair_disks(&source, &destination).expect_err("size differs");
        assert_eq!(
            error.to_string(),
            "drive drive-0 is 67108864 bytes on the source but 1048576 bytes on the destination"
        );
        let error = pair_disks(&source, &destination[1..]).expect_err("missing");
        assert_eq!(error.to_string(), "drive drive-0 has no counterpart on the destination");
    }
}
