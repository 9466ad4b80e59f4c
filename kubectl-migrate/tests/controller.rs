//! The agents' Migration controller (`katamaran::cluster::controller`) against the fake API
//! server, under the RBAC in deploy/: what it accepts and refuses, and what a cancel or a
//! deletion does before anything ran on a node. The move itself, with both agents and a real
//! VM, is in `lab_e2e.rs`.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use katamaran::cluster::controller::{self, Config};
use katamaran_api::v1alpha1::{Migration, MigrationSpec, Owner, Phase, FINALIZER};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::Value;
use support::apiserver::{AgentBackend, FakeApiServer, State};
use support::rbac::{Rbac, UserInfo};

const ALICE: &str = "alice-token";
const AGENT: &str = "agent-token";
const WAIT: Duration = Duration::from_secs(20);

async fn server() -> FakeApiServer {
    let mut rbac = Rbac::from_deploy(&["rbac-kubectl-migrate.yaml", "agent-rbac.yaml"]);
    rbac.bind("katamaran-migrator", Some("shop"), "alice");
    let mut vault = support::pod("vault-0", Some("node-a"), Some(support::CLASS), "Running");
    vault.metadata.namespace = Some("bank".into());
    let state = State {
        pods: vec![
            support::pod("web-0", Some("node-a"), Some(support::CLASS), "Running"),
            vault,
            support::agent_pod("agent-a", "node-a"),
            support::agent_pod("agent-b", "node-b"),
        ],
        nodes: vec![
            support::node("node-a", &["192.0.2.1"], true, false),
            support::node("node-b", &["192.0.2.2"], true, false),
        ],
        agents: HashMap::from([
            ("agent-a".to_owned(), AgentBackend::Refused),
            ("agent-b".to_owned(), AgentBackend::Refused),
        ]),
        rbac: Some(rbac),
        tokens: HashMap::from([
            (ALICE.to_owned(), UserInfo::user("alice", &[])),
            (AGENT.to_owned(), UserInfo::service_account(support::AGENT_NS, "katamaran-agent")),
        ]),
        ..State::default()
    };
    FakeApiServer::start(state).await
}

async fn client(api: &FakeApiServer, token: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig_for("shop", Some(token))).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

/// This node's agent socket: accepts and never answers, so a migration it drives stays in
/// Preparing (listing the node's sandboxes) until it is cancelled.
fn silent_socket(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    path
}

/// Starts the controller as the agent of `node`; it stops when the returned sender is dropped.
async fn agent_controller(
    api: &FakeApiServer,
    node: &str,
    socket: std::path::PathBuf,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        node_name: node.to_owned(),
        agent_namespace: support::AGENT_NS.to_owned(),
        agent_port: 10555,
        runtime_class: support::CLASS.to_owned(),
        local_socket: socket,
        // Its own CA: these controllers never reach another agent through a port-forward.
        tls: support::identity(
            &katamaran::peer::ClusterCa::generate(Duration::from_secs(3600)).unwrap(),
            katamaran::peer::PeerName::node(node).unwrap(),
        ),
    };
    tokio::spawn(controller::run(client(api, AGENT).await, config, async {
        let _ = stopped.await;
    }));
    stop
}

/// Polls Migration `name` until `done` says so, or fails after [`WAIT`] with the last version.
async fn wait_for(
    api: &Api<Migration>,
    name: &str,
    done: impl Fn(Option<&Migration>) -> bool,
) -> Option<Migration> {
    let start = std::time::Instant::now();
    loop {
        let m = api.get_opt(name).await.unwrap();
        if done(m.as_ref()) {
            return m;
        }
        assert!(start.elapsed() < WAIT, "Migration {name} did not get there in {WAIT:?}: {m:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition<'a>(
    m: &'a Migration,
    kind: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    m.status.as_ref()?.conditions.iter().find(|c| c.type_ == kind)
}

/// Events regarding Migration `name` in `namespace`, oldest first: (type, reason, note).
fn events_of(api: &FakeApiServer, namespace: &str, name: &str) -> Vec<(String, String, String)> {
    let state = api.state.lock().unwrap();
    let (mut events, _) = state.store.list(&support::store::Filter {
        ty: support::store::find_type("events.k8s.io", "v1", "events").unwrap(),
        namespace: Some(namespace.into()),
        labels: String::new(),
        fields: String::new(),
    });
    events.retain(|e| e["regarding"]["kind"] == "Migration" && e["regarding"]["name"] == name);
    events.sort_by_key(|e| e["eventTime"].as_str().unwrap_or_default().to_owned());
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    events.iter().map(|e| (s(&e["type"]), s(&e["reason"]), s(&e["note"]))).collect()
}

#[tokio::test]
async fn the_pods_agent_runs_one_migration_per_pod_and_a_deleted_one_is_cancelled_and_released() {
    let api = server().await;
    let dir = tempfile::tempdir().unwrap();
    let alice: Api<Migration> = Api::namespaced(client(&api, ALICE).await, "shop");
    let pp = PostParams::default();
    alice.create(&pp, &Migration::new("first", MigrationSpec::new("web-0", "node-b"))).await.unwrap();
    alice.create(&pp, &Migration::new("second", MigrationSpec::new("web-0", "node-b"))).await.unwrap();
    // The target's agent sees both too, and leaves them to the pod's agent.
    let _b = agent_controller(&api, "node-b", dir.path().join("none.sock")).await;
    let _a = agent_controller(&api, "node-a", silent_socket(dir.path())).await;

    // The older one is accepted: finalizer, the nodes, owned by the source, in Preparing.
    let first =
        wait_for(&alice, "first", |m| m.is_some_and(|m| m.phase() == Phase::Preparing)).await.unwrap();
    assert!(
        first.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER)),
        "{first:#?}"
    );
    let st = first.status.clone().unwrap();
    assert_eq!((st.source_node.as_deref(), st.target_node.as_deref()), (Some("node-a"), Some("node-b")));
    assert_eq!(st.owner, Some(Owner::Source));
    assert!(st.start_time.is_some() && st.message.as_deref().is_some_and(|m| m.contains("k8s-")), "{st:#?}");
    let accepted = condition(&first, "Accepted").unwrap();
    assert_eq!((accepted.status.as_str(), accepted.reason.as_str()), ("True", "Validated"));

    // The younger one is refused while the first runs.
    let second = wait_for(&alice, "second", |m| m.is_some_and(|m| m.phase().is_terminal())).await.unwrap();
    assert_eq!(second.phase(), Phase::Failed, "{second:#?}");
    let refused = condition(&second, "Accepted").unwrap();
    assert_eq!((refused.status.as_str(), refused.reason.as_str()), ("False", "PodBusy"));
    assert!(refused.message.contains("first"), "the refusal names the running Migration: {refused:?}");
    assert!(
        second.metadata.finalizers.as_ref().is_none_or(Vec::is_empty),
        "a refused Migration holds nothing"
    );
    let finished = condition(&second, "Finished").unwrap();
    assert_eq!(finished.reason, "Failed");

    // Deleting the running one cancels it (nothing was created on a node yet), then its
    // finalizer goes and so does the object.
    alice.delete("first", &DeleteParams::default()).await.unwrap();
    wait_for(&alice, "first", |m| m.is_none()).await;

    let reasons =
        |name: &str| -> Vec<String> { events_of(&api, "shop", name).into_iter().map(|e| e.1).collect() };
    assert_eq!(
        reasons("first"),
        ["MigrationStarted", "MigrationCancelled"],
        "{:#?}",
        events_of(&api, "shop", "first")
    );
    assert_eq!(reasons("second"), ["MigrationFailed"]);
    let (kind, _, note) = &events_of(&api, "shop", "second")[0];
    assert_eq!(kind, "Warning");
    assert!(note.contains("first"), "{note}");
    // Every write the agents made was allowed by the RBAC in deploy/.
    let denied: Vec<String> = api
        .decisions()
        .into_iter()
        .filter(|d| d.contains("katamaran-agent") && !d.ends_with("allowed"))
        .collect();
    assert!(denied.is_empty(), "the agents' calls are all in agent-rbac.yaml: {denied:#?}");
}

#[tokio::test]
async fn a_migration_naming_a_pod_of_another_namespace_fails_and_a_cancelled_one_never_starts() {
    let api = server().await;
    let dir = tempfile::tempdir().unwrap();
    let alice: Api<Migration> = Api::namespaced(client(&api, ALICE).await, "shop");
    let pp = PostParams::default();
    // vault-0 lives in bank, where alice may not migrate; in shop there is no such pod.
    alice.create(&pp, &Migration::new("steal", MigrationSpec::new("vault-0", "node-b"))).await.unwrap();
    let mut spec = MigrationSpec::new("web-0", "node-b");
    spec.cancel = true;
    alice.create(&pp, &Migration::new("never", spec)).await.unwrap();
    let _a = agent_controller(&api, "node-a", silent_socket(dir.path())).await;
    let _b = agent_controller(&api, "node-b", dir.path().join("none.sock")).await;

    let steal = wait_for(&alice, "steal", |m| m.is_some_and(|m| m.phase().is_terminal())).await.unwrap();
    assert_eq!(steal.phase(), Phase::Failed);
    let refused = condition(&steal, "Accepted").unwrap();
    assert_eq!((refused.status.as_str(), refused.reason.as_str()), ("False", "PodNotMigratable"));
    assert!(refused.message.contains("shop/vault-0"), "{refused:?}");
    assert_eq!(steal.status.as_ref().unwrap().source_node, None, "no node took it");

    let never = wait_for(&alice, "never", |m| m.is_some_and(|m| m.phase().is_terminal())).await.unwrap();
    assert_eq!(never.phase(), Phase::Cancelled, "{never:#?}");
    assert_eq!(never.status.as_ref().unwrap().owner, Some(Owner::Source));
    assert!(never.metadata.finalizers.as_ref().is_none_or(Vec::is_empty));

    // Neither reached a node: no port-forward to any agent.
    let forwards: Vec<String> = api.requests().into_iter().filter(|r| r.contains("/portforward")).collect();
    assert!(forwards.is_empty(), "{forwards:#?}");
    assert_eq!(
        events_of(&api, "shop", "never").into_iter().map(|e| e.1).collect::<Vec<_>>(),
        ["MigrationCancelled"]
    );

    // Alice cannot ask for the move in the pod's own namespace.
    let bank: Api<Migration> = Api::namespaced(client(&api, ALICE).await, "bank");
    match bank.create(&pp, &Migration::new("steal", MigrationSpec::new("vault-0", "node-b"))).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("alice may not create Migrations in bank: {other:?}"),
    }
}

async fn shop(c: &support::Cluster) -> Api<Migration> {
    let kubeconfig = Kubeconfig::from_yaml(&c.api.kubeconfig()).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Api::namespaced(Client::try_from(config).unwrap(), "shop")
}

#[tokio::test]
async fn a_migration_completes_with_the_phases_and_figures_of_both_nodes() {
    let c = support::Cluster::start(support::Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let _a = c.start_controller(dir.path()).await;
    let mut spec = MigrationSpec::new("web-0", "node-b");
    spec.options.downtime = "40ms".into();
    let migrations = shop(&c).await;
    migrations.create(&PostParams::default(), &Migration::new("web-0-to-node-b", spec)).await.unwrap();
    // Ended and let go: the terminal status comes first, the finalizer's removal right after.
    let released = |m: &Migration| m.metadata.finalizers.as_ref().is_none_or(Vec::is_empty);
    let m = wait_for(&migrations, "web-0-to-node-b", |m| {
        m.is_some_and(|m| m.phase().is_terminal() && released(m))
    })
    .await
    .unwrap();

    let st = m.status.clone().unwrap();
    assert_eq!(m.phase(), Phase::Completed, "{st:#?}");
    assert_eq!(st.owner, Some(Owner::Destination));
    let phases: Vec<Phase> = st.phases.iter().map(|p| p.phase).collect();
    assert_eq!(phases, [Phase::Preparing, Phase::Storage, Phase::Ram, Phase::Cutover, Phase::Forwarding]);
    let d = st.downtime.clone().unwrap();
    // QEMU's 115 ms; the guest pause is node-a's STOP (3010 ms) to node-b's RESUME (3185 ms).
    assert_eq!((d.qemu_microseconds, d.guest_pause_microseconds), (Some(115_000), Some(175_000)));
    let cut = st.cutover.clone().unwrap();
    assert_eq!(
        (cut.route_swap_offset_microseconds, cut.plug_release_microseconds, cut.plug_drops),
        (Some(104), Some(87), Some(3))
    );
    let p = st.progress.clone().unwrap();
    assert_eq!((p.bytes_total, p.iteration), (512 << 20, 2), "the last RAM figures stay");
    assert_eq!(st.summary.as_ref().map(|s| s.downtime.as_str()), Some("175ms"));

    // The agents were driven in the engine's order, with the Migration's options and its id.
    let calls = c.calls();
    let at =
        |call: &str| calls.iter().position(|x| x == call).unwrap_or_else(|| panic!("{call} in {calls:?}"));
    assert!(at("node-a:ListSandboxes") < at("node-a:Inspect"));
    assert!(at("node-a:Inspect") < at("node-b:PrepareIncoming"));
    assert!(at("node-b:PrepareIncoming") < at("node-a:StartMigration"));
    let id = format!("k8s-{}", m.metadata.uid.clone().unwrap());
    for (node, call) in c.log.all() {
        match call {
            support::agent::Call::PrepareIncoming(r) => {
                assert_eq!((node.as_str(), r.migration_id.as_str()), ("node-b", id.as_str()));
                assert_eq!(r.options.downtime_limit_ms, 40, "{:?}", r.options);
            }
            support::agent::Call::StartMigration(r) => {
                assert_eq!((r.migration_id.as_str(), r.sandbox_id.as_str()), (id.as_str(), "3f2a9c"));
                assert_eq!(r.destination_node_address, "192.0.2.2");
            }
            _ => {}
        }
    }
    let reasons: Vec<String> =
        events_of(&c.api, "shop", "web-0-to-node-b").into_iter().map(|e| e.1).collect();
    assert_eq!(reasons, ["MigrationStarted", "MigrationCompleted"]);
    let note = &events_of(&c.api, "shop", "web-0-to-node-b")[1].2;
    assert!(note.contains("guest pause 175ms") && note.contains("QEMU downtime 115ms"), "{note}");
}

/// Migration `m` of web-0 running on fake agents that stay in RAM until cancelled, with node-a's
/// controller: the cluster, the controller's directory and stop switch, the Migrations of shop.
async fn migration_in_ram(
) -> (support::Cluster, tempfile::TempDir, tokio::sync::oneshot::Sender<()>, Api<Migration>) {
    let c = support::Cluster::start(support::Options {
        source: support::stuck_in_ram(),
        destination: support::stuck_in_ram(),
        ..support::Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let stop = c.start_controller(dir.path()).await;
    let migrations = shop(&c).await;
    migrations
        .create(&PostParams::default(), &Migration::new("m", MigrationSpec::new("web-0", "node-b")))
        .await
        .unwrap();
    wait_for(&migrations, "m", |m| m.is_some_and(|m| m.phase() == Phase::Ram)).await;
    (c, dir, stop, migrations)
}

#[tokio::test]
async fn a_cancel_through_the_resource_rolls_back_before_the_commit() {
    let (c, _dir, _a, migrations) = migration_in_ram().await;

    migrations
        .patch(
            "m",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
        )
        .await
        .unwrap();
    let m = wait_for(&migrations, "m", |m| m.is_some_and(|m| m.phase().is_terminal())).await.unwrap();
    assert_eq!(m.phase(), Phase::Cancelled, "{:#?}", m.status);
    assert_eq!(m.status.as_ref().unwrap().owner, Some(Owner::Source));
    assert!(
        m.status.as_ref().unwrap().message.as_deref().is_some_and(|s| s.contains("node-a")),
        "{:#?}",
        m.status
    );
    // The cancel went to the owner, the source, which told its destination.
    let cancels: Vec<String> = c.calls().into_iter().filter(|x| x.ends_with(":Cancel")).collect();
    assert_eq!(cancels, ["node-a:Cancel"]);
    let reasons: Vec<String> = events_of(&c.api, "shop", "m").into_iter().map(|e| e.1).collect();
    assert_eq!(reasons, ["MigrationStarted", "MigrationCancelled"]);
}

#[tokio::test]
async fn a_restarted_agent_ends_a_migration_its_engine_never_started_and_lets_it_go() {
    // As a previous agent of node-a left it: accepted (finalizer, Preparing, its node), then the
    // agent died before StartMigration; the engine has no migration of that id.
    let c = support::Cluster::start(support::Options::default()).await;
    let migrations = shop(&c).await;
    let mut m = Migration::new("left", MigrationSpec::new("web-0", "node-b"));
    m.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    migrations.create(&PostParams::default(), &m).await.unwrap();
    let status = serde_json::json!({"status": {
        "phase": "Preparing", "owner": "Source", "sourceNode": "node-a", "targetNode": "node-b",
        "startTime": "2026-12-04T00:00:00Z",
    }});
    migrations
        .patch_status("left", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let _a = c.start_controller(dir.path()).await;
    let ended = wait_for(&migrations, "left", |m| {
        m.is_some_and(|m| m.phase().is_terminal() && m.metadata.finalizers.as_ref().is_none_or(Vec::is_empty))
    })
    .await
    .unwrap();
    let st = ended.status.clone().unwrap();
    assert_eq!((ended.phase(), st.owner), (Phase::Failed, Some(Owner::Source)), "{st:#?}");
    assert!(
        st.message.as_deref().is_some_and(|m| m.contains("restarted before the source started")),
        "{st:#?}"
    );
    // It asked its own engine only, and started nothing anywhere.
    let calls = c.calls();
    assert_eq!(calls, ["node-a:Watch"], "{calls:?}");
    assert_eq!(
        events_of(&c.api, "shop", "left").into_iter().map(|e| e.1).collect::<Vec<_>>(),
        ["MigrationFailed"]
    );
}

#[tokio::test]
async fn deleting_a_running_migration_cancels_it_through_the_source_then_it_goes() {
    let (c, _dir, _a, migrations) = migration_in_ram().await;

    migrations.delete("m", &DeleteParams::default()).await.unwrap();
    // The finalizer holds the object until the source undid its part and the destination's.
    wait_for(&migrations, "m", |m| m.is_none()).await;
    let calls = c.calls();
    assert!(calls.contains(&"node-a:Cancel".to_owned()), "cancelled through the source: {calls:?}");
    let reasons: Vec<String> = events_of(&c.api, "shop", "m").into_iter().map(|e| e.1).collect();
    assert_eq!(reasons, ["MigrationStarted", "MigrationCancelled"]);
}

#[tokio::test]
async fn a_migration_left_with_a_finalizer_before_any_node_took_it_is_let_go() {
    // The pod's agent added its finalizer and stopped before it wrote anything: a deletion, and
    // a Migration that ends without a source, must not hang on it.
    let c = support::Cluster::start(support::Options::default()).await;
    let migrations = shop(&c).await;
    let held = |name: &str, pod: &str| {
        let mut m = Migration::new(name, MigrationSpec::new(pod, "node-b"));
        m.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
        m
    };
    migrations.create(&PostParams::default(), &held("deleted", "web-0")).await.unwrap();
    migrations.delete("deleted", &DeleteParams::default()).await.unwrap();
    assert!(migrations.get_opt("deleted").await.unwrap().is_some(), "the finalizer holds it");
    migrations.create(&PostParams::default(), &held("gone-pod", "nope")).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let _a = c.start_controller(dir.path()).await;
    let _b = agent_controller(&c.api, "node-b", dir.path().join("none.sock")).await;
    wait_for(&migrations, "deleted", |m| m.is_none()).await;
    let failed = wait_for(&migrations, "gone-pod", |m| {
        m.is_some_and(|m| m.phase().is_terminal() && m.metadata.finalizers.as_ref().is_none_or(Vec::is_empty))
    })
    .await
    .unwrap();
    assert_eq!(failed.phase(), Phase::Failed);
    assert!(c.calls().is_empty(), "no agent was asked for anything: {:?}", c.calls());
}

#[tokio::test]
async fn a_target_agent_with_another_nodes_certificate_fails_the_migration_before_anything_starts() {
    // agent-b, the pod the API server forwards to for node-b, presents node-c's identity: not
    // the agent of the node the controller resolved.
    let c = support::Cluster::start(support::Options {
        destination_presents: Some("node-c"),
        ..support::Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let _a = c.start_controller(dir.path()).await;
    let migrations = shop(&c).await;
    migrations
        .create(&PostParams::default(), &Migration::new("m", MigrationSpec::new("web-0", "node-b")))
        .await
        .unwrap();
    let m = wait_for(&migrations, "m", |m| m.is_some_and(|m| m.phase().is_terminal())).await.unwrap();
    let status = m.status.as_ref().unwrap();
    assert_eq!(m.phase(), Phase::Failed, "{status:#?}");
    assert_eq!(status.owner, Some(Owner::Source));
    let message = status.message.as_deref().unwrap_or_default();
    assert!(
        message.contains("mutual TLS with the katamaran agent of node node-b failed")
            && message.contains("not valid for name \"node-b.agent.katamaran.io\""),
        "the message names the node and the TLS reason: {message}"
    );
    // The source was only read; node-b's agent was never called.
    assert_eq!(c.calls(), ["node-a:ListSandboxes", "node-a:Inspect"]);
    let reasons: Vec<String> = events_of(&c.api, "shop", "m").into_iter().map(|e| e.1).collect();
    assert_eq!(reasons, ["MigrationStarted", "MigrationFailed"]);
}
