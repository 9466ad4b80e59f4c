//! What the runner prints, and how the host reads it back.
//!
//! The console of the lab VM is the only channel out of it, so the format is line based and
//! greppable by a person, with one JSON line for programs:
//!
//! ```text
//! KERNEL-LAB-KERNEL 6.1.0-56-cloud-amd64                       (printed by /init)
//! KERNEL-LAB-MODULES veth tun sch_plug ipip ...                 (printed by /init)
//! KERNEL-LAB-BOOT uptime=3.12s                                   (printed by /init)
//! KERNEL-LAB-RUN plug                                            (before each check)
//! KERNEL-LAB-CHECK PASS plug 0.41s burst=200 held=200 ...       (one per check)
//! KERNEL-LAB-RESULT {"kernel":"…","passed":8,"failed":0,…}      (the last line of the runner)
//! KERNEL-LAB-EXIT status=0                                       (printed by /init)
//! ```

use std::error::Error as StdError;
use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

/// Prefix of the per-check lines.
pub const CHECK_PREFIX: &str = "KERNEL-LAB-CHECK";
/// Prefix of the machine-readable summary line.
pub const RESULT_PREFIX: &str = "KERNEL-LAB-RESULT";
/// Prefix of the kernel release line `/init` prints.
pub const KERNEL_PREFIX: &str = "KERNEL-LAB-KERNEL";
/// Prefix of the loaded-modules line `/init` prints.
pub const MODULES_PREFIX: &str = "KERNEL-LAB-MODULES";
/// Prefix of the line printed before each check starts (to see which one hangs, if one does).
pub const RUN_PREFIX: &str = "KERNEL-LAB-RUN";
/// Prefix of the boot-time line `/init` prints before the checks start.
pub const BOOT_PREFIX: &str = "KERNEL-LAB-BOOT";
/// Prefix of the runner's exit status line `/init` prints before powering off.
pub const EXIT_PREFIX: &str = "KERNEL-LAB-EXIT";

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Everything it asserted held.
    Pass,
    /// An assertion failed or an operation errored.
    Fail,
    /// Not run: a kernel feature is missing and `--allow-missing` was given.
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        })
    }
}

/// One measured number of a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Short name, e.g. `stop_to_swap`.
    pub key: String,
    /// The value, in `unit`.
    pub value: f64,
    /// `ms`, `B`, or empty for a count.
    pub unit: String,
}

/// Numbers a check records while it runs, in the order recorded, and notes worth printing even
/// when it passes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    values: Vec<Metric>,
    notes: Vec<String>,
}

impl Metrics {
    /// Records a count.
    pub fn count(&mut self, key: &str, value: u64) {
        self.push(key, value as f64, "");
    }

    /// Records a duration in milliseconds.
    pub fn ms(&mut self, key: &str, value: std::time::Duration) {
        self.push(key, value.as_secs_f64() * 1e3, "ms");
    }

    /// Records a value with a unit.
    pub fn push(&mut self, key: &str, value: f64, unit: &str) {
        self.values.push(Metric { key: key.to_owned(), value, unit: unit.to_owned() });
    }

    /// The value recorded under `key`, if any.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|m| m.key == key).map(|m| m.value)
    }

    /// Records a remark for the check's line (e.g. a test that passed only on its retry).
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    /// The values and the notes joined with `; `.
    pub fn into_parts(self) -> (Vec<Metric>, String) {
        (self.values, self.notes.join("; "))
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Check name, e.g. `tunnel-ip6gre`.
    pub name: String,
    /// How it ended.
    pub status: Status,
    /// Wall time it took.
    pub seconds: f64,
    /// What it measured (also on failure, up to the failing step).
    pub metrics: Vec<Metric>,
    /// On success the check's notes (usually empty); the error chain on failure; the reason on
    /// skip.
    pub detail: String,
}

impl CheckReport {
    /// The value of metric `key`, if recorded.
    pub fn metric(&self, key: &str) -> Option<f64> {
        self.metrics.iter().find(|m| m.key == key).map(|m| m.value)
    }

    /// `KERNEL-LAB-CHECK PASS plug 0.41s burst=200 held=200 release=1.204ms[ — detail]`.
    pub fn line(&self) -> String {
        let mut out = format!("{CHECK_PREFIX} {} {} {:.2}s", self.status, self.name, self.seconds);
        for m in &self.metrics {
            let _ = write!(out, " {}={}{}", m.key, format_value(m.value, &m.unit), m.unit);
        }
        if !self.detail.is_empty() {
            let _ = write!(out, " — {}", self.detail);
        }
        out
    }
}

/// Counts are printed as integers, everything else with three decimals.
fn format_value(value: f64, unit: &str) -> String {
    if unit.is_empty() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// Every check of one run, as the result line carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// `uname -r` of the kernel the checks ran on.
    pub kernel: String,
    /// Checks that passed.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Checks that were skipped.
    pub skipped: usize,
    /// Wall time of the whole run.
    pub seconds: f64,
    /// Each check, in run order.
    pub checks: Vec<CheckReport>,
}

impl Summary {
    /// Tallies `checks`.
    pub fn new(kernel: String, checks: Vec<CheckReport>, seconds: f64) -> Self {
        let tally = |s| checks.iter().filter(|c| c.status == s).count();
        Self {
            kernel,
            passed: tally(Status::Pass),
            failed: tally(Status::Fail),
            skipped: tally(Status::Skip),
            seconds,
            checks,
        }
    }

    /// `KERNEL-LAB-RESULT {json}` on one line.
    pub fn result_line(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail; a non-finite number
        // would become null rather than break the line.
        let json = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"kernel":"","passed":0,"failed":1,"skipped":0,"seconds":0,"checks":[],"error":"{e}"}}"#
            )
        });
        format!("{RESULT_PREFIX} {json}")
    }

    /// The check named `name`.
    pub fn check(&self, name: &str) -> Option<&CheckReport> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Finds the last result line in a console log and parses it. Serial consoles can put
    /// kernel messages or `\r` around it, so the prefix is searched anywhere in a line.
    ///
    /// # Errors
    /// [`FindError::Missing`] without a result line, [`FindError::Json`] when it does not parse.
    pub fn find_in(console: &str) -> Result<Self, FindError> {
        let json = console
            .lines()
            .filter_map(|line| line.split_once(RESULT_PREFIX).map(|(_, rest)| rest.trim()))
            .next_back()
            .ok_or(FindError::Missing)?;
        serde_json::from_str(json).map_err(FindError::Json)
    }
}

/// Why [`Summary::find_in`] found no summary.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// No line carries the result prefix.
    #[error("the console has no {RESULT_PREFIX} line")]
    Missing,
    /// The line's JSON does not parse.
    #[error("the {RESULT_PREFIX} line is not a valid summary")]
    Json(#[source] serde_json::Error),
}

/// The value after `PREFIX ` on the last console line that has it (e.g. the kernel release).
pub fn console_field<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().filter_map(|line| line.split_once(prefix).map(|(_, rest)| rest.trim())).next_back()
}

/// An error and its sources on one line, `outer: inner: innermost`.
pub fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn report(name: &str, status: Status) -> CheckReport {
        let mut m = Metrics::default();
        m.count("held", 200);
        m.ms("release", std::time::Duration::from_micros(1204));
        CheckReport {
            name: name.into(),
            status,
            seconds: 0.414,
            metrics: m.into_parts().0,
            detail: String::new(),
        }
    }

    #[test]
    fn check_line_prints_counts_as_integers_and_times_in_ms() {
        assert_eq!(
            report("plug", Status::Pass).line(),
            "KERNEL-LAB-CHECK PASS plug 0.41s held=200 release=1.204ms"
        );
        let mut failed = report("cutover", Status::Fail);
        failed.detail = "lost 3 packets".into();
        assert!(failed.line().ends_with("release=1.204ms — lost 3 packets"), "{}", failed.line());
    }

    #[test]
    fn summary_tallies_and_round_trips_through_a_noisy_console() {
        let s = Summary::new(
            "6.1.0-56-cloud-amd64".into(),
            vec![report("plug", Status::Pass), report("cutover", Status::Fail), report("x", Status::Skip)],
            3.5,
        );
        assert_eq!((s.passed, s.failed, s.skipped), (1, 1, 1));
        let console = format!(
            "[    1.2] random kernel line\r\n{KERNEL_PREFIX} 6.1.0-56-cloud-amd64\n\
             {RESULT_PREFIX} {{\"not\":\"it\"}}\nnoise {}\r\n{EXIT_PREFIX} status=1\n",
            s.result_line()
        );
        let back = Summary::find_in(&console).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.check("plug").unwrap().metric("held"), Some(200.0));
        assert_eq!(console_field(&console, KERNEL_PREFIX), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(console_field(&console, EXIT_PREFIX), Some("status=1"));
    }

    #[test]
    fn missing_or_broken_result_lines_are_errors() {
        assert!(matches!(Summary::find_in("booting\nKERNEL-LAB-EXIT status=3\n"), Err(FindError::Missing)));
        assert!(matches!(Summary::find_in("KERNEL-LAB-RESULT {\"passed\":"), Err(FindError::Json(_))));
    }

    #[test]
    fn chain_joins_sources() {
        let inner = std::io::Error::from_raw_os_error(libc_enoent());
        let outer = crate::error::CheckError::Io { step: "open /x".into(), source: inner };
        let text = chain(&outer);
        assert!(text.starts_with("failed to open /x: "), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    fn libc_enoent() -> i32 {
        nix::errno::Errno::ENOENT as i32
    }
}
