//! `hack/skip-report.sh`, what `hack/test.sh` prints at the end: every recorded skip, one
//! summary line, and a failure when a tier CI runs was skipped without `KMR_ALLOW_SKIP`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

const LOG: &str = "katamaran-shim-ext::net_netns plug_buffers_then_releases\tkernel-module\tkernel lacks sch_plug (proven in the kernel lab VM)\n\
katamaran-e2e::migrate lab_migrate_x\tlab\tthe lab needs root (network namespaces, veth, tap, tc)\n\
kubectl-migrate::kubectl_plugin kubectl_runs_the_plugin\tkubectl\tkubectl is not installed (not on PATH)\n";

/// Runs the report on `log` with `KMR_ALLOW_SKIP=allow` (None: unset): exit code, stdout.
fn report(log: &str, allow: Option<&str>, summary_only: bool) -> (Option<i32>, String) {
    let dir = tempfile_dir();
    let file = dir.join("skips.tsv");
    std::fs::write(&file, log).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/skip-report.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    if summary_only {
        cmd.arg("--summary");
    }
    cmd.arg(&file).env_remove("KMR_ALLOW_SKIP");
    if let Some(a) = allow {
        cmd.env("KMR_ALLOW_SKIP", a);
    }
    let out = cmd.output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kmr-skip-report-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_skipped_tier_fails_the_run_and_every_skip_is_listed_with_its_reason() {
    let (code, out) = report(LOG, None, false);
    assert_eq!(code, Some(1), "{out}");
    for why in ["kernel lacks sch_plug", "the lab needs root", "kubectl is not installed"] {
        assert!(out.contains(why), "{why} listed:\n{out}");
    }
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("skips: 3 (2 expected on this machine, 0 allowed by KMR_ALLOW_SKIP, 1 not allowed)"),
        "{last}"
    );
    assert!(last.contains("FAILED: tier(s) lab did not run"), "{last}");
}

#[test]
fn kernel_module_and_kubectl_skips_are_expected_and_listed() {
    let expected: String = LOG.lines().filter(|l| !l.contains("\tlab\t")).map(|l| format!("{l}\n")).collect();
    let (code, out) = report(&expected, None, false);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[expected here]") && out.contains("kernel lacks sch_plug"), "{out}");
    assert_eq!(
        out.lines().last(),
        Some("skips: 2 (2 expected on this machine, 0 allowed by KMR_ALLOW_SKIP, 0 not allowed)")
    );
}

#[test]
fn kmr_allow_skip_lets_a_named_tier_skip_loudly_and_refuses_unknown_names() {
    let (code, out) = report(LOG, Some("lab,qemu"), false);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("!!! KMR_ALLOW_SKIP=lab,qemu"), "{out}");
    assert!(out.contains("[ALLOWED by KMR_ALLOW_SKIP]"), "{out}");
    assert_eq!(
        report(LOG, Some("all"), true),
        (
            Some(0),
            "skips: 3 (2 expected on this machine, 1 allowed by KMR_ALLOW_SKIP=all, 0 not allowed)\n".into()
        )
    );
    assert_eq!(report(LOG, Some("qemu"), true).0, Some(1), "another tier does not cover the lab");
    assert_eq!(report(LOG, Some("lab,labb"), true).0, Some(2), "a typo is an error");
}

#[test]
fn an_unknown_tier_fails_and_no_skips_pass() {
    let (code, out) = report("x y\tsomething-new\twhy\n", Some("all"), true);
    assert_eq!(code, Some(1), "a tier the report does not know is never silently accepted: {out}");
    assert_eq!(
        report("", None, true),
        (
            Some(0),
            "skips: 0 (0 expected on this machine, 0 allowed by KMR_ALLOW_SKIP, 0 not allowed)\n".into()
        )
    );
}
