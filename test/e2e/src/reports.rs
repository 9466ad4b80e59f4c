//! The JSON the lab's ground-truth tools print: the probe's report and the disk checker's.
//!
//! Only the fields the suites assert on are typed; unknown fields are ignored so the tools can
//! grow without breaking the suites.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use crate::error::LabError;

/// A run of consecutive lost sequence numbers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LossRun {
    /// First lost sequence number.
    pub first_seq: u64,
    /// Last lost sequence number (inclusive).
    pub last_seq: u64,
    /// When the first was sent, ms after counting started.
    pub start_ms: f64,
    /// When the last was sent, ms after counting started.
    pub end_ms: f64,
}

/// `katamaran-probe --json` report (subset).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ProbeReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Distinct sequence numbers that came back.
    pub received: u64,
    /// `sent − received`.
    pub lost: u64,
    /// Replies for a sequence number that had already come back.
    pub duplicated: u64,
    /// First replies that arrived after a higher sequence number's.
    pub reordered: u64,
    /// Longest time without replies while packets were outstanding, ms.
    pub longest_gap_ms: f64,
    /// Runs of lost packets.
    #[serde(default)]
    pub loss_timeline: Vec<LossRun>,
    /// From counting start to the last send, ms.
    #[serde(default)]
    pub duration_ms: f64,
    /// The counting start on the wall clock, ms since the Unix epoch (0 when not reported).
    #[serde(default)]
    pub started_unix_ms: f64,
}

/// One problem the disk checker found.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DiskProblem {
    /// Byte offset of the record in the image.
    pub offset: u64,
    /// `corrupt`, `gap` or `bad_magic`.
    pub kind: String,
    /// What exactly.
    #[serde(default)]
    pub detail: String,
}

/// `katamaran-guest disk-check --json` result (subset).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DiskCheck {
    /// Records read before the first all-zero block.
    pub records: u64,
    /// Sequence number of the first record, if any.
    pub first_seq: Option<u64>,
    /// Sequence number of the last record, if any.
    pub last_seq: Option<u64>,
    /// No problem found.
    pub ok: bool,
    /// Problems found.
    #[serde(default)]
    pub errors: Vec<DiskProblem>,
}

/// Reads a probe report written with `--json PATH`.
///
/// # Errors
/// When the file is missing or not a probe report.
pub fn read_probe_report(path: &Path) -> Result<ProbeReport, LabError> {
    let raw =
        std::fs::read(path).map_err(|source| LabError::ReportRead { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&raw)
        .map_err(|source| LabError::ReportParse { origin: path.display().to_string(), source })
}

/// Runs `tool disk-check --image IMAGE --json` on the host. The checker exits 1 when it finds a
/// problem; that is a result, not an error.
///
/// # Errors
/// When the tool cannot run or prints no parsable report.
pub fn disk_check(tool: &Path, image: &Path) -> Result<DiskCheck, LabError> {
    let what = format!("{} disk-check --image {} --json", tool.display(), image.display());
    let output = Command::new(tool)
        .arg("disk-check")
        .arg("--image")
        .arg(image)
        .arg("--json")
        .output()
        .map_err(|source| LabError::Spawn { command: what.clone(), source })?;
    if !matches!(output.status.code(), Some(0 | 1)) {
        return Err(LabError::Command {
            command: what,
            status: output.status,
            stderr: crate::artifacts::tail(&output.stderr, 20),
        });
    }
    serde_json::from_slice(&output.stdout).map_err(|source| LabError::ReportParse { origin: what, source })
}
