//! The JSON the lab's ground-truth tools print: the probe's report and the disk checker's; and
//! what a guest's console says about the guest after a move ([`guest_health`]).
//!
//! Only the fields the suites assert on are typed; unknown fields are ignored so the tools can
//! grow without breaking the suites.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use katamaran_guest::dirty::{CHECK_LINE, STALE_LINE};

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

/// What a moved guest printed on its console that says it is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestHealth {
    /// Pages `dirty-mem` found not holding their last write (the largest count it printed);
    /// `None` where the workload does not run.
    pub stale_pages: Option<u64>,
    /// Lines of the guest kernel's own fault reports.
    pub kernel_faults: u64,
}

/// How a guest kernel announces that something broke; the image boots with `quiet`, so the
/// console carries these and little else from the kernel.
const KERNEL_FAULTS: [&str; 6] =
    ["Kernel panic", "BUG:", "Oops:", "general protection fault", "invalid opcode:", "segfault at"];

/// Reads a guest's console (`dirty` when `dirty-mem` runs in it): stale pages and kernel fault
/// lines.
pub fn guest_health(console: &str, dirty: bool) -> GuestHealth {
    let mut h = GuestHealth { stale_pages: dirty.then_some(0), kernel_faults: 0 };
    for line in console.lines() {
        if let Some((_, rest)) = line.split_once(STALE_LINE) {
            // "... (N stale page(s) so far, ..." or " N stale page(s) in all"
            let count = rest
                .split(" stale page")
                .next()
                .and_then(|head| head.rsplit(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1);
            h.stale_pages = Some(h.stale_pages.unwrap_or(0).max(count));
        } else if KERNEL_FAULTS.iter().any(|f| line.contains(f)) {
            h.kernel_faults += 1;
        }
    }
    h
}

/// Whether `dirty-mem`'s memory check printed its heartbeat on this console.
pub fn memory_check_ran(console: &str) -> bool {
    console.contains(CHECK_LINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_health_counts_stale_pages_and_kernel_faults_and_nothing_else() {
        let clean = format!(
            "KATAMARAN-GUEST-READY id=bench0 uptime=4.25s services=udp-echo\n\
             katamaran-guest dirty-mem: 256 MiB at 64 MiB/s (uptime 4300 ms)\n\
             {CHECK_LINE} 262144 pages verified, 0 stale (uptime 43010 ms)\n"
        );
        assert_eq!(guest_health(&clean, true), GuestHealth { stale_pages: Some(0), kernel_faults: 0 });
        assert_eq!(guest_health(&clean, false), GuestHealth { stale_pages: None, kernel_faults: 0 });
        assert!(memory_check_ran(&clean));
        assert!(!memory_check_ran("KATAMARAN-GUEST-READY id=bench0\n"));
        let damaged = format!(
            "{clean}{STALE_LINE} page 5123 holds round 6, last written 7 (1 stale page(s) so far, uptime 41250 ms)\n\
             {STALE_LINE} page 77 holds round 6, last written 7 (12 stale page(s) so far, uptime 42250 ms)\n\
             [   41.3] BUG: unable to handle page fault for address: ffff8880deadbeef\n\
             [   41.3] Oops: 0000 [#1] PREEMPT SMP NOPTI\n\
             [   41.4] Kernel panic - not syncing: Fatal exception\n"
        );
        assert_eq!(guest_health(&damaged, true), GuestHealth { stale_pages: Some(12), kernel_faults: 3 });
        let total = format!(
            "{STALE_LINE} page 1 holds round 2, last written 3 (1 stale page(s) so far, uptime 1 ms)\n\
             {STALE_LINE} 40 stale page(s) in all\n"
        );
        assert_eq!(guest_health(&total, true).stale_pages, Some(40));
    }
}
