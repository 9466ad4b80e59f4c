//! Two real QEMUs on this host, a source and a destination in `-incoming defer`, each with one
//! raw disk `drive-0` on a virtio-blk device. No guest kernel: SeaBIOS finds nothing to boot and
//! idles, which is all the storage and compute phases need.
//!
//! Everything lives in one temporary directory that outlives both QEMUs (fields drop in
//! order): images, the NBD socket, the migration socket.

use std::path::{Path, PathBuf};

use katamaran::migration::qemu::EventBus;
use katamaran::qmp::{QmpClient, QmpConfig};
use serde_json::json;
use tempfile::TempDir;

use crate::support::qemu::Qemu;

/// The drive id both QEMUs use.
pub const DRIVE: &str = "drive-0";

/// One QEMU with its QMP connection and event bus.
#[derive(Debug)]
pub struct Node {
    /// The process, killed on drop.
    pub qemu: Qemu,
    /// Its QMP connection.
    pub qmp: QmpClient,
    /// Its events, fanned out.
    pub bus: EventBus,
    /// The raw image behind `drive-0`.
    pub image: PathBuf,
}

/// A source and a destination QEMU.
#[derive(Debug)]
pub struct QemuPair {
    /// The QEMU the VM leaves.
    pub source: Node,
    /// The QEMU waiting in `-incoming defer`.
    pub destination: Node,
    dir: TempDir,
}

impl QemuPair {
    /// Starts both QEMUs with `disk_size`-byte images: the source's filled with [`pattern`],
    /// the destination's zero (sparse). Prints a `skipped:` line and returns `None` without
    /// QEMU.
    pub async fn launch(disk_size: usize) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let source_image = dir.path().join("source.img");
        let destination_image = dir.path().join("destination.img");
        std::fs::write(&source_image, pattern(disk_size)).expect("write source image");
        std::fs::File::create(&destination_image)
            .and_then(|file| file.set_len(disk_size as u64))
            .expect("create destination image");
        let source = Node::start(&source_image, &[]).await?;
        let destination = Node::start(&destination_image, &["-incoming", "defer"]).await?;
        Some(Self { source, destination, dir })
    }

    /// A path for a socket or file inside the pair's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Node {
    async fn start(image: &Path, extra: &[&str]) -> Option<Self> {
        let drive = format!("if=none,id={DRIVE},file={},format=raw", image.display());
        let device = format!("virtio-blk-pci,drive={DRIVE}");
        let mut args = vec!["-drive", &drive, "-device", &device];
        args.extend_from_slice(extra);
        let mut qemu = Qemu::launch(&args)?;
        qemu.wait_for_qmp().await;
        let (qmp, events) = QmpClient::connect(qemu.qmp_path(), &QmpConfig::default())
            .await
            .unwrap_or_else(|error| panic!("QMP connect: {error:#}\n{}", qemu.log()));
        Some(Self { qemu, qmp, bus: EventBus::spawn(events), image: image.to_owned() })
    }

    /// Writes `len` bytes of `byte` at `offset` through the drive, as a guest write would arrive
    /// (HMP `qemu-io` goes through the drive's block backend, so mirrors see it).
    pub async fn guest_write(&self, byte: u8, offset: u64, len: u64) {
        let line = format!("qemu-io {DRIVE} \"write -P {byte:#x} {offset} {len}\"");
        let output = self
            .qmp
            .execute("human-monitor-command", Some(json!({ "command-line": line })))
            .await
            .expect("qemu-io write");
        // qemu-io reports its own errors as text rather than as a QMP error.
        let text = output.as_str().unwrap_or_default();
        assert!(!text.contains("error") && !text.contains("failed"), "qemu-io: {text}");
    }
}

/// Deterministic image content: a text header in sector 0 (no `0x55AA` boot signature, so
/// SeaBIOS boots nothing) followed by xorshift noise that no zero-filled or shifted copy
/// matches by accident.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    let header = b"katamaran qemu_phases test image\n";
    let sector = 512.min(len);
    data[..sector].fill(0);
    data[..header.len().min(sector)].copy_from_slice(&header[..header.len().min(sector)]);
    data
}

/// Offset of the first byte where `a` and `b` differ, or `None` if equal (length included).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}
