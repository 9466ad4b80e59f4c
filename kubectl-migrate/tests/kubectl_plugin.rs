//! kubectl finds the binary as a plugin: `kubectl migrate --help` runs it.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn kubectl() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("kubectl")).find(|p| p.is_file())
}

#[test]
fn kubectl_runs_the_plugin() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: kubectl is not installed (not on PATH)");
        return;
    };
    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-migrate")).parent().unwrap().to_owned();
    let path = std::env::join_paths(
        std::iter::once(plugin_dir)
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(&kubectl)
            .args(args)
            .env("PATH", &path)
            .env("HOME", home.path())
            .env("KUBECONFIG", home.path().join("none"))
            .output()
            .unwrap()
    };

    let out = run(&["migrate", "--help"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("Usage: kubectl migrate [OPTIONS] <COMMAND>"), "{stdout}");
    assert!(stdout.contains("kubectl migrate pod web-0 -n shop --to node-b"), "examples: {stdout}");

    let out = run(&["migrate", "pod", "--help"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for flag in [
        "--to <NODE>",
        "--dry-run",
        "--shared-storage",
        "--downtime <DURATION>",
        "--tunnel-mode <MODE>",
        "--timeout",
        "--runtime-class",
        "--kubeconfig",
        "--context",
        "--namespace",
    ] {
        assert!(stdout.contains(flag), "{flag} in\n{stdout}");
    }
    assert!(
        stdout.contains("Exit codes: 0 migrated, 1 the migration failed, 2 usage error or refused request"),
        "{stdout}"
    );

    let out = run(&["plugin", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("kubectl-migrate"), "kubectl plugin list: {listed}");
}
