//! `kubectl migrate` on the Migration resource (the default): the real plugin binary against the
//! fake API server, with the agents' controller running in this process over the fake agents
//! (`Cluster::start_controller`). The plugin creates the Migration, follows its status, asks for
//! the cancel through it, and never reaches an agent itself.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use katamaran_api::v1alpha1::Migration;
use kube::api::ListParams;
use kube::Api;
use serde_json::Value;
use support::apiserver::{FakeApiServer, State};
use support::rbac::{Rbac, UserInfo};
use support::{Cluster, Options};

async fn migrations(c: &Cluster) -> Vec<Migration> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&c.api.kubeconfig()).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    let api: Api<Migration> = Api::namespaced(kube::Client::try_from(config).unwrap(), "shop");
    api.list(&ListParams::default()).await.unwrap().items
}

#[tokio::test]
async fn the_plugin_creates_a_migration_follows_it_and_prints_the_resource() {
    let c = Cluster::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = c.start_controller(dir.path()).await;
    let run = c.run(&["pod", "web-0", "--to", "node-b", "--downtime", "40ms", "-o", "json"]).await;
    assert_eq!(run.code, Some(0), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);

    // stdout: the Migration as the API server has it, the VM on node-b.
    let doc: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));
    assert_eq!(doc["kind"], "Migration");
    assert_eq!(doc["spec"]["pod"], "web-0");
    assert_eq!(doc["spec"]["options"]["downtime"], "40ms");
    assert!(doc["metadata"]["name"].as_str().unwrap().starts_with("web-0-to-node-b-"), "{doc:#}");
    assert_eq!(doc["status"]["phase"], "Forwarding", "the run ends once the VM runs on node-b: {doc:#}");
    assert_eq!(doc["status"]["owner"], "Destination");
    assert_eq!(doc["status"]["downtime"]["guestPauseMicroseconds"], 175_000);
    // stderr: what happened, phase by phase.
    for phase in ["Preparing", "Ram", "Forwarding"] {
        assert!(run.stderr.lines().any(|l| l.starts_with(phase)), "a line for {phase}:\n{}", run.stderr);
    }
    // The plugin reached no agent: the only port-forward is the controller's, to node-b's agent.
    let forwards: Vec<String> = c.api.requests().into_iter().filter(|r| r.contains("/portforward")).collect();
    assert_eq!(forwards.len(), 1, "{forwards:#?}");
    assert!(forwards[0].contains("/pods/agent-b/"), "{forwards:#?}");
    assert_eq!(migrations(&c).await.len(), 1);
}

#[tokio::test]
async fn text_output_ends_with_a_table_of_the_figures() {
    let c = Cluster::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = c.start_controller(dir.path()).await;
    let run = c.run(&["pod", "web-0", "--to", "node-b", "--wait-forwarding"]).await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    for want in [
        "phase           Completed",
        "nodes           node-a → node-b",
        "VM runs on      node-b",
        "guest pause     175ms",
        "QEMU downtime   115ms",
        "plug drops      3",
    ] {
        assert!(run.stdout.contains(want), "{want:?} in:\n{}", run.stdout);
    }
}

#[tokio::test]
async fn ctrl_c_asks_for_the_cancel_through_the_resource_and_reports_it_honoured() {
    let c = Cluster::start(Options {
        source: support::stuck_in_ram(),
        destination: support::stuck_in_ram(),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = c.start_controller(dir.path()).await;
    let child = c.command(&["pod", "web-0", "--to", "node-b"]).spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    // Interrupt once the source is being watched, i.e. the migration is under way.
    c.log
        .wait_until("the source's watch", |calls| {
            calls.iter().any(|(n, c)| n == "node-a" && matches!(c, support::agent::Call::Watch(_)))
        })
        .await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let run = support::wait(child).await;
    assert_eq!(run.code, Some(130), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("the cancel was honoured; the pod keeps running on node-a"),
        "{}",
        run.stderr
    );
    let all = migrations(&c).await;
    assert_eq!(all.len(), 1);
    assert!(all[0].spec.cancel, "the plugin asked through spec.cancel");
    assert_eq!(all[0].phase().as_str(), "Cancelled");
    assert!(
        c.calls().contains(&"node-a:Cancel".to_owned()),
        "the controller cancelled the source: {:?}",
        c.calls()
    );
}

#[tokio::test]
async fn without_an_agent_the_timeout_withdraws_the_migration_and_nothing_ran() {
    let c = Cluster::start(Options::default()).await;
    let started = Instant::now();
    let run = c.run(&["pod", "web-0", "--to", "node-b", "--timeout", "1s"]).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert!(run.stderr.contains("no katamaran agent took Migration shop/web-0-to-node-b-"), "{}", run.stderr);
    assert!(migrations(&c).await.is_empty(), "withdrawn");
    assert!(c.calls().is_empty(), "no agent was called: {:?}", c.calls());
}

#[tokio::test]
async fn dry_runs_change_nothing_and_server_dry_run_asks_the_api_server() {
    let c = Cluster::start(Options::default()).await;
    let client =
        c.run(&["pod", "web-0", "--to", "node-b", "--dry-run", "-o", "yaml", "--bandwidth", "500M"]).await;
    assert_eq!(client.code, Some(0), "{}", client.stderr);
    assert!(
        client.stdout.contains("kind: Migration") && client.stdout.contains("bandwidth: 500Mi"),
        "{}",
        client.stdout
    );
    assert!(c.api.requests().iter().all(|r| !r.contains("migrations")), "client dry run sends nothing");

    let server = c.run(&["pod", "web-0", "--to", "node-b", "--dry-run=server", "-o", "json"]).await;
    assert_eq!(server.code, Some(0), "{}", server.stderr);
    let doc: Value = serde_json::from_str(&server.stdout).unwrap();
    assert_eq!(doc["spec"]["targetNode"], "node-b");
    assert!(c
        .api
        .requests()
        .iter()
        .any(|r| r.starts_with("POST ") && r.contains("migrations") && r.contains("dryRun=All")));
    assert!(migrations(&c).await.is_empty(), "nothing stored");

    let bad = c.run(&["pod", "web-0", "--to", "node-b", "--dry-run=later"]).await;
    assert_eq!(bad.code, Some(2));
    assert!(bad.stderr.contains("--dry-run"), "{}", bad.stderr);
    let badname = c.run(&["pod", "Web_0", "--to", "node-b"]).await;
    assert_eq!(badname.code, Some(2));
    assert!(badname.stderr.contains("pod \"Web_0\" is not a valid Kubernetes name"), "{}", badname.stderr);
    let badopt = c.run(&["pod", "web-0", "--to", "node-b", "--tunnel-idle-timeout", "2d"]).await;
    assert_eq!(badopt.code, Some(2), "{}", badopt.stderr);
    assert!(
        c.api.requests().iter().all(|r| !r.starts_with("POST ") || r.contains("dryRun")),
        "refused before any request"
    );
    let direct = c.run(&["pod", "web-0", "--to", "node-b", "--direct", "--dry-run=server"]).await;
    assert_eq!(direct.code, Some(2));
    assert!(direct.stderr.contains("--dry-run=server needs a Migration"), "{}", direct.stderr);
}

#[tokio::test]
async fn a_user_without_rights_in_the_namespace_is_refused_with_the_api_message() {
    let mut rbac = Rbac::from_deploy(&["rbac-kubectl-migrate.yaml", "agent-rbac.yaml"]);
    rbac.bind("katamaran-migrator", Some("bank"), "alice");
    let state = State {
        pods: vec![support::pod("web-0", Some("node-a"), Some(support::CLASS), "Running")],
        rbac: Some(rbac),
        tokens: HashMap::from([("alice-token".to_owned(), UserInfo::user("alice", &[]))]),
        ..State::default()
    };
    let api = FakeApiServer::start(state).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_for("shop", Some("alice-token"))).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-migrate"))
        .args(["pod", "web-0", "--to", "node-b", "--kubeconfig", kubeconfig.to_str().unwrap()])
        .env("HOME", dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let run = support::wait(child).await;
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("cannot create resource \"migrations\"") && run.stderr.contains("\"shop\""),
        "the API server's reason, naming the namespace: {}",
        run.stderr
    );
}
