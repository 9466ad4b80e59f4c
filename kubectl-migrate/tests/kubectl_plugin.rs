//! kubectl finds the binary as a plugin: `kubectl migrate --help` runs it; `kubectl get mig`
//! prints Migrations with the CRD's columns.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;

use katamaran_test_skip::{skip, Tier};

fn kubectl() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("kubectl")).find(|p| p.is_file())
}

#[test]
fn kubectl_runs_the_plugin() {
    let Some(kubectl) = kubectl() else {
        skip(Tier::Kubectl, "kubectl is not installed (not on PATH)");
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

/// `kubectl get mig` against the fake API server, which prints Migrations server-side from the
/// committed CRD's columns: what a user sees.
#[tokio::test]
async fn kubectl_get_mig_shows_the_crds_columns() {
    use katamaran_api::v1alpha1::{summarize, Migration, MigrationSpec, Phase, Progress};
    use kube::api::{Patch, PatchParams, PostParams};
    use support::apiserver::{FakeApiServer, State};
    use support::rbac::{Rbac, UserInfo};

    let Some(kubectl) = kubectl() else {
        skip(Tier::Kubectl, "kubectl is not installed (not on PATH)");
        return;
    };
    let mut rbac = Rbac::from_deploy(&["rbac-kubectl-migrate.yaml", "agent-rbac.yaml"]);
    rbac.bind("katamaran-migrator", Some("shop"), "alice");
    let api = FakeApiServer::start(State {
        rbac: Some(rbac),
        tokens: [
            ("alice".to_owned(), UserInfo::user("alice", &[])),
            ("agent".to_owned(), UserInfo::service_account(support::AGENT_NS, "katamaran-agent")),
        ]
        .into(),
        // kubectl sends no bearer token to a plain http server: its requests are alice's.
        anonymous: Some(UserInfo::user("alice", &[])),
        ..State::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let config = |token: &str| {
        let path = home.path().join(token);
        std::fs::write(&path, api.kubeconfig_for("shop", Some(token))).unwrap();
        path
    };
    let (alice_config, agent_config) = (config("alice"), config("agent"));
    let client = |path: std::path::PathBuf| async move {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
        let options = kube::config::KubeConfigOptions::default();
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.unwrap())
            .unwrap()
    };
    let alice: kube::Api<Migration> = kube::Api::namespaced(client(alice_config.clone()).await, "shop");
    let agent: kube::Api<Migration> = kube::Api::namespaced(client(agent_config).await, "shop");
    alice
        .create(
            &PostParams::default(),
            &Migration::new("web-0-to-node-b", MigrationSpec::new("web-0", "node-b")),
        )
        .await
        .unwrap();
    let progress = Progress {
        bytes_transferred: 630,
        bytes_remaining: 370,
        bytes_total: 1000,
        iteration: 3,
        ..Default::default()
    };
    let summary = summarize(Phase::Ram, Some(&progress), None);
    let status = serde_json::json!({"status": {
        "phase": "Ram", "owner": "Source", "sourceNode": "node-a", "targetNode": "node-b",
        "progress": progress, "summary": summary
    }});
    agent.patch_status("web-0-to-node-b", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();

    let run = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&kubectl);
        c.args(args).arg("--request-timeout=20s").env("HOME", home.path()).env("KUBECONFIG", &alice_config);
        async move {
            let out = c.output().await.unwrap();
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (out.status.success(), text(&out.stdout), text(&out.stderr))
        }
    };
    let words = |s: &str| {
        s.lines().map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>()).collect::<Vec<_>>()
    };

    let (ok, out, err) = run(&["get", "mig"]).await;
    assert!(ok, "{out}{err}");
    let table = words(&out);
    assert_eq!(table[0], ["NAME", "POD", "SOURCE", "TARGET", "PHASE", "DOWNTIME", "AGE"], "{out}");
    assert_eq!(table[1][..5], ["web-0-to-node-b", "web-0", "node-a", "node-b", "Ram"], "{out}");
    assert!(table[1].last().unwrap().ends_with('s'), "an age: {out}");

    let (ok, out, err) = run(&["get", "migrations.katamaran.io", "-o", "wide"]).await;
    assert!(ok, "{out}{err}");
    let table = words(&out);
    assert_eq!(
        table[0],
        ["NAME", "POD", "SOURCE", "TARGET", "PHASE", "DOWNTIME", "PROGRESS", "OWNER", "AGE"],
        "{out}"
    );
    let line = out.lines().nth(1).unwrap();
    assert!(line.contains("63% pass 3") && line.contains("Source"), "{out}");

    // A migrator of shop sees nothing of bank.
    let (ok, _, err) = run(&["get", "mig", "-n", "bank"]).await;
    assert!(!ok);
    assert!(err.contains("Forbidden") && err.contains("cannot list resource \"migrations\""), "{err}");
}
