//! shim-ext's privileged netns tests (`shim-ext/tests/net_netns.rs`), built as a static test
//! binary and run here, where every feature they probe for is present: on a kernel without the
//! modules they assert the typed `Unsupported` error and print `skipped: …`; here none may skip.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{ensure, CheckError, Result, Step};
use crate::report::Metrics;

/// libtest's closing line: `test result: ok. 9 passed; 0 failed; 0 ignored; …; finished in 2.31s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LibtestSummary {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests marked `#[ignore]`.
    pub ignored: u64,
    /// The suite's own wall time, when printed.
    pub seconds: Option<f64>,
}

/// Parses the last `test result:` line of a libtest run.
pub fn parse_libtest(output: &str) -> Option<LibtestSummary> {
    let line = output.lines().filter_map(|l| l.trim().strip_prefix("test result: ")).next_back()?;
    let mut summary = LibtestSummary { passed: 0, failed: 0, ignored: 0, seconds: None };
    let mut seen_passed = false;
    for part in line.split(';') {
        let part = part.trim().trim_start_matches("ok.").trim_start_matches("FAILED.").trim();
        if let Some(t) = part.strip_prefix("finished in ") {
            summary.seconds = t.trim_end_matches('s').parse().ok();
            continue;
        }
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else { continue };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => {
                summary.passed = n;
                seen_passed = true;
            }
            "failed" => summary.failed = n,
            "ignored" => summary.ignored = n,
            _ => {}
        }
    }
    seen_passed.then_some(summary)
}

/// Lines a test printed to say it skipped its subject (`skipped: kernel lacks sch_plug …`).
pub fn skipped_lines(output: &str) -> Vec<&str> {
    output.lines().map(str::trim).filter(|l| l.starts_with("skipped:")).collect()
}

/// Names of the tests libtest reported as failed (`test name ... FAILED`).
pub fn failed_tests(output: &str) -> Vec<&str> {
    output.lines().filter_map(|l| l.trim().strip_prefix("test ")?.strip_suffix(" ... FAILED")).collect()
}

/// One run of the suite binary.
struct SuiteRun {
    success: bool,
    status: String,
    stdout: String,
    /// stdout and stderr.
    all: String,
}

async fn run_once(suite: &Path, args: &[&str], limit: Duration) -> Result<SuiteRun> {
    let child = Command::new(suite)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .step(format!("start {}", suite.display()))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| CheckError::Timeout { what: format!("{} to finish", suite.display()), limit })?
        .step(format!("run {}", suite.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(SuiteRun { success: out.status.success(), status: out.status.to_string(), stdout, all })
}

/// Runs the suite binary one test at a time with output shown, and asserts that it passed
/// with nothing failed and nothing skipped. A test that fails is run once more on its own: if
/// it passes then, the check passes with a note naming it (a flaky test to fix in shim-ext),
/// and `flaky` counts it.
///
/// # Errors
/// [`CheckError::Unexpected`] without a suite binary, or when the run fails (twice), skips or
/// does not finish within `limit`.
pub async fn run(suite: Option<&Path>, limit: Duration, m: &mut Metrics) -> Result<()> {
    let suite = suite.ok_or_else(|| CheckError::Unexpected("no suite binary given (--suite PATH)".into()))?;
    // One at a time keeps each test's lines together; --nocapture shows the skip lines.
    let first = run_once(suite, &["--test-threads=1", "--nocapture"], limit).await?;
    let summary = parse_libtest(&first.stdout);
    let skipped = skipped_lines(&first.all);
    if let Some(s) = summary {
        m.count("passed", s.passed);
        m.count("failed", s.failed);
        m.count("ignored", s.ignored);
        if let Some(secs) = s.seconds {
            m.push("suite_time", secs * 1e3, "ms");
        }
    }
    m.count("skipped", skipped.len() as u64);
    let summary = summary.ok_or_else(|| {
        CheckError::Unexpected(format!(
            "{} printed no test summary ({}):\n{}",
            suite.display(),
            first.status,
            last_lines(&first.all, 40)
        ))
    })?;
    ensure(summary.passed + summary.failed > 0, || format!("{} ran no test", suite.display()))?;
    ensure(skipped.is_empty(), || format!("tests skipped on the lab kernel: {skipped:?}"))?;

    let failed = failed_tests(&first.all);
    ensure(first.success || (!failed.is_empty() && failed.len() as u64 == summary.failed), || {
        format!("{} failed ({}):\n{}", suite.display(), first.status, last_lines(&first.all, 40))
    })?;
    for name in &failed {
        let again = run_once(suite, &["--exact", name, "--nocapture"], limit).await?;
        ensure(again.success, || {
            format!("{name} failed twice ({}):\n{}", again.status, last_lines(&again.all, 40))
        })?;
        m.note(format!("{name} failed once and passed on its retry (flaky)"));
    }
    m.count("flaky", failed.len() as u64);
    Ok(())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PASSED: &str = "\nrunning 10 tests\ntest plug_buffers_then_releases ... ok\nsch_plug: present\n\
        test probe_answers_present_or_typed_unsupported ... ok\n\n\
        test result: ok. 10 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.21s\n\n";

    const FAILED: &str =
        "running 3 tests\ntest a ... ok\ntest tunnels_created_with_endpoints_then_deleted ... FAILED\n\
        skipped: kernel lacks ip6_gre (proven in the kernel lab VM)\ntest c ... ignored\n\n\
        test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.50s\n";

    #[test]
    fn parses_libtest_summaries() {
        assert_eq!(
            parse_libtest(PASSED),
            Some(LibtestSummary { passed: 10, failed: 0, ignored: 0, seconds: Some(3.21) })
        );
        assert_eq!(
            parse_libtest(FAILED),
            Some(LibtestSummary { passed: 1, failed: 1, ignored: 1, seconds: Some(0.5) })
        );
        assert_eq!(parse_libtest("running 0 tests\n"), None);
        assert_eq!(parse_libtest("test result: garbage"), None);
    }

    #[test]
    fn finds_skips_and_failures() {
        assert!(skipped_lines(PASSED).is_empty());
        assert_eq!(skipped_lines(FAILED), ["skipped: kernel lacks ip6_gre (proven in the kernel lab VM)"]);
        assert_eq!(failed_tests(FAILED), ["tunnels_created_with_endpoints_then_deleted"]);
        assert!(failed_tests(PASSED).is_empty());
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
