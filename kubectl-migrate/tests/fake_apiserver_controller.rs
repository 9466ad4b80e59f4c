//! The fake API server behaves as a controller needs, seen through kube-rs clients: Migrations
//! (a custom resource) with resource versions, generations, the status subresource, merge and
//! JSON patches, finalizers, watches (replay from a version, bookmarks, 410 Gone), Events, and
//! authorization by the RBAC in deploy/ for each identity: a migrator bound in one namespace, the
//! agents' ServiceAccount, an administrator bound to katamaran-debug.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::api::events::v1::Event as EventV1;
use katamaran_api::v1alpha1::{Migration, MigrationSpec, MigrationStatus, Owner, Phase, FINALIZER};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use support::apiserver::{AgentBackend, FakeApiServer, State};
use support::rbac::{Rbac, UserInfo};

const ALICE: &str = "alice-token";
const AGENT: &str = "agent-token";
const OPS: &str = "ops-token";

async fn server() -> FakeApiServer {
    let mut rbac = Rbac::from_deploy(&["rbac-kubectl-migrate.yaml", "agent-rbac.yaml"]);
    rbac.bind("katamaran-migrator", Some("shop"), "alice");
    rbac.bind("katamaran-debug", Some(support::AGENT_NS), "ops");
    let mut vault = support::pod("vault-0", Some("node-a"), Some(support::CLASS), "Running");
    vault.metadata.namespace = Some("bank".into());
    let state = State {
        pods: vec![
            support::pod("web-0", Some("node-a"), Some(support::CLASS), "Running"),
            vault,
            support::agent_pod("agent-a", "node-a"),
        ],
        nodes: vec![support::node("node-a", &["192.0.2.1"], true, false)],
        agents: HashMap::from([("agent-a".to_owned(), AgentBackend::Refused)]),
        rbac: Some(rbac),
        tokens: HashMap::from([
            (ALICE.to_owned(), UserInfo::user("alice", &[])),
            (AGENT.to_owned(), UserInfo::service_account(support::AGENT_NS, "katamaran-agent")),
            (OPS.to_owned(), UserInfo::user("ops", &[])),
        ]),
        ..State::default()
    };
    FakeApiServer::start(state).await
}

async fn client(api: &FakeApiServer, token: Option<&str>) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig_for("shop", token)).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

fn migration(name: &str) -> Migration {
    Migration::new(name, MigrationSpec::new("web-0", "node-b"))
}

fn api_error(r: Result<impl std::fmt::Debug, kube::Error>) -> (u16, String, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason, s.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_migration_has_versions_generations_and_a_separate_status() {
    let api = server().await;
    let alice: Api<Migration> = Api::namespaced(client(&api, Some(ALICE)).await, "shop");
    let agent_client = client(&api, Some(AGENT)).await;
    let agent: Api<Migration> = Api::namespaced(agent_client.clone(), "shop");

    let mut m = migration("web-0-to-node-b");
    m.status = Some(MigrationStatus { phase: Some(Phase::Completed), ..Default::default() });
    let created = alice.create(&PostParams::default(), &m).await.unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(created.status, None, "a user cannot set the status on create");
    let rv1: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();
    let (code, reason, _) = api_error(alice.create(&PostParams::default(), &m).await);
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // The agent reports through the status subresource; the generation does not move.
    let status = json!({"status": {"phase": "Preparing", "owner": "Source", "sourceNode": "node-a"}});
    let s =
        agent.patch_status("web-0-to-node-b", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert_eq!(s.phase(), Phase::Preparing);
    assert_eq!(s.status.as_ref().unwrap().owner, Some(Owner::Source));
    assert_eq!(s.metadata.generation, Some(1));
    let rv2: u64 = s.metadata.resource_version.as_deref().unwrap().parse().unwrap();
    assert!(rv2 > rv1);

    // Status written through the object is ignored; a spec change bumps the generation.
    let cancel = json!({"spec": {"cancel": true}, "status": {"phase": "Completed"}});
    let c = alice.patch("web-0-to-node-b", &PatchParams::default(), &Patch::Merge(&cancel)).await.unwrap();
    assert!(c.spec.cancel);
    assert_eq!(c.phase(), Phase::Preparing, "status changes only through /status");
    assert_eq!(c.metadata.generation, Some(2));

    // Optimistic concurrency: a write from a stale read is a conflict.
    let mut stale = s.clone();
    stale.status.as_mut().unwrap().phase = Some(Phase::Ram);
    let (code, reason, message) =
        api_error(agent.replace_status("web-0-to-node-b", &PostParams::default(), &stale).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"), "{message}");
    assert!(message.contains("migrations.katamaran.io \"web-0-to-node-b\""), "{message}");

    // JSON patch: a failed test op changes nothing.
    let ops = json!([
        {"op": "test", "path": "/status/phase", "value": "Ram"},
        {"op": "replace", "path": "/status/phase", "value": "Failed"}
    ]);
    let (code, _, _) = api_error(json_patch_status(&agent_client, "web-0-to-node-b", &ops).await);
    assert_eq!(code, 422);
    let ops = json!([
        {"op": "test", "path": "/status/phase", "value": "Preparing"},
        {"op": "replace", "path": "/status/phase", "value": "Storage"},
        {"op": "add", "path": "/status/message", "value": "mirroring 1 disk"}
    ]);
    let s = json_patch_status(&agent_client, "web-0-to-node-b", &ops).await.unwrap();
    assert_eq!(s.phase(), Phase::Storage);
    assert_eq!(s.status.unwrap().message.as_deref(), Some("mirroring 1 disk"));

    // Selectable fields: the agents find a pod's migrations by spec.pod.
    alice
        .create(&PostParams::default(), &Migration::new("other", MigrationSpec::new("web-1", "node-b")))
        .await
        .unwrap();
    let mine = agent.list(&ListParams::default().fields("spec.pod=web-0")).await.unwrap();
    let names: Vec<_> = mine.items.iter().filter_map(|m| m.metadata.name.clone()).collect();
    assert_eq!(names, ["web-0-to-node-b"]);
}

/// A JSON patch (RFC 6902) on a Migration's status: kube's typed `Patch::Json` needs its
/// `jsonpatch` feature, so the request is built by hand.
async fn json_patch_status(
    client: &Client,
    name: &str,
    ops: &serde_json::Value,
) -> Result<Migration, kube::Error> {
    let req = hyper::Request::patch(format!(
        "/apis/katamaran.io/v1alpha1/namespaces/shop/migrations/{name}/status"
    ))
    .header("content-type", "application/json-patch+json")
    .body(serde_json::to_vec(ops).unwrap())
    .unwrap();
    client.request::<Migration>(req).await
}

#[tokio::test]
async fn a_finalizer_holds_a_deleted_migration_until_the_agent_lets_go() {
    let api = server().await;
    let alice: Api<Migration> = Api::namespaced(client(&api, Some(ALICE)).await, "shop");
    let agent: Api<Migration> = Api::namespaced(client(&api, Some(AGENT)).await, "shop");
    alice.create(&PostParams::default(), &migration("m")).await.unwrap();
    let add = json!({"metadata": {"finalizers": [FINALIZER]}});
    agent.patch("m", &PatchParams::default(), &Patch::Merge(&add)).await.unwrap();

    let watch_from = alice.get("m").await.unwrap().metadata.resource_version.unwrap();
    let mut events = alice.watch(&WatchParams::default(), &watch_from).await.unwrap().boxed();

    alice.delete("m", &DeleteParams::default()).await.unwrap();
    let held = alice.get("m").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some(), "marked, not gone");
    let more = json!({"metadata": {"finalizers": [FINALIZER, "example.com/other"]}});
    let (code, _, message) = api_error(agent.patch("m", &PatchParams::default(), &Patch::Merge(&more)).await);
    assert_eq!(code, 422, "no new finalizer on a deleting object: {message}");

    let remove = json!({"metadata": {"finalizers": null}});
    agent.patch("m", &PatchParams::default(), &Patch::Merge(&remove)).await.unwrap();
    let (code, _, message) = api_error(alice.get("m").await);
    assert_eq!(code, 404, "{message}");

    let mut kinds = Vec::new();
    while let Some(e) = events.try_next().await.unwrap() {
        match e {
            WatchEvent::Modified(m) => {
                kinds.push(format!("MODIFIED {}", m.metadata.deletion_timestamp.is_some()))
            }
            WatchEvent::Deleted(_) => {
                kinds.push("DELETED".to_owned());
                break;
            }
            other => kinds.push(format!("{other:?}")),
        }
    }
    assert_eq!(kinds, ["MODIFIED true", "DELETED"]);
}

#[tokio::test]
async fn watches_replay_from_a_version_send_bookmarks_and_expire() {
    let api = server().await;
    let alice: Api<Migration> = Api::namespaced(client(&api, Some(ALICE)).await, "shop");
    let first = alice.create(&PostParams::default(), &migration("a")).await.unwrap();
    let from = first.metadata.resource_version.clone().unwrap();
    alice.create(&PostParams::default(), &migration("b")).await.unwrap();

    let mut w = alice.watch(&WatchParams::default(), &from).await.unwrap().boxed();
    match w.try_next().await.unwrap() {
        Some(WatchEvent::Added(m)) => {
            assert_eq!(m.metadata.name.as_deref(), Some("b"), "only what came after")
        }
        other => panic!("{other:?}"),
    }
    let cancel = json!({"spec": {"cancel": true}});
    alice.patch("a", &PatchParams::default(), &Patch::Merge(&cancel)).await.unwrap();
    match w.try_next().await.unwrap() {
        Some(WatchEvent::Modified(m)) => assert!(m.spec.cancel),
        other => panic!("{other:?}"),
    }
    api.bookmark();
    let rv_now = alice.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    match w.try_next().await.unwrap() {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, rv_now),
        other => panic!("{other:?}"),
    }

    // After compaction a watch from the old version is told it expired; a list is still fine.
    api.compact();
    let mut old = alice.watch(&WatchParams::default(), &from).await.unwrap().boxed();
    match old.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(alice.list(&ListParams::default()).await.unwrap().items.len(), 2);
}

#[tokio::test]
async fn rbac_from_deploy_scopes_people_and_agents() {
    let api = server().await;
    let alice_client = client(&api, Some(ALICE)).await;
    let agent_client = client(&api, Some(AGENT)).await;

    // A migrator bound in shop migrates there, and nowhere else.
    let shop: Api<Migration> = Api::namespaced(alice_client.clone(), "shop");
    shop.create(&PostParams::default(), &migration("m")).await.unwrap();
    Api::<Pod>::namespaced(alice_client.clone(), "shop").get("web-0").await.unwrap();
    let bank: Api<Migration> = Api::namespaced(alice_client.clone(), "bank");
    let (code, reason, message) = api_error(
        bank.create(&PostParams::default(), &Migration::new("m", MigrationSpec::new("vault-0", "node-b")))
            .await,
    );
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        message,
        "forbidden: User \"alice\" cannot create resource \"migrations\" in API group \"katamaran.io\" in the namespace \"bank\""
    );
    let (code, _, _) = api_error(Api::<Pod>::namespaced(alice_client.clone(), "bank").get("vault-0").await);
    assert_eq!(code, 403);
    // Nor does a migrator write status, or reach the agents.
    let status = json!({"status": {"phase": "Completed"}});
    let (code, _, message) =
        api_error(shop.patch_status("m", &PatchParams::default(), &Patch::Merge(&status)).await);
    assert_eq!(code, 403);
    assert!(message.contains("cannot patch resource \"migrations/status\""), "{message}");
    let agents = Api::<Pod>::namespaced(alice_client.clone(), support::AGENT_NS);
    match agents.portforward("agent-a", &[10555]).await {
        Err(e) => {
            assert!(format!("{e:?}").contains("403") || format!("{e:?}").contains("Forbidden"), "{e:?}")
        }
        Ok(_) => panic!("a migrator port-forwarded to an agent"),
    }

    // The agents: every namespace's migrations and their status, pods and nodes, events; they
    // never create migrations.
    let all: Api<Migration> = Api::all(agent_client.clone());
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 1);
    let theirs: Api<Migration> = Api::namespaced(agent_client.clone(), "shop");
    theirs.patch_status("m", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let (code, _, _) = api_error(theirs.create(&PostParams::default(), &migration("n")).await);
    assert_eq!(code, 403);
    let (code, _, _) = api_error(theirs.delete("m", &DeleteParams::default()).await);
    assert_eq!(code, 403, "deleting is the user's: the agents remove their finalizer instead");
    Api::<Pod>::all(agent_client.clone()).list(&ListParams::default()).await.unwrap();
    let (code, _, _) = api_error(
        Api::<Pod>::namespaced(agent_client.clone(), "shop").delete("web-0", &DeleteParams::default()).await,
    );
    assert_eq!(code, 403);

    // No token: 401.
    let (code, _, _) =
        api_error(Api::<Migration>::namespaced(client(&api, None).await, "shop").get("m").await);
    assert_eq!(code, 401);

    // An administrator bound to katamaran-debug reaches an agent (nothing listens in this one,
    // so the answer comes on the port's error channel, past authorization).
    let ops = Api::<Pod>::namespaced(client(&api, Some(OPS)).await, support::AGENT_NS);
    let mut pf = ops.portforward("agent-a", &[10555]).await.unwrap();
    let err = pf.take_error(10555).unwrap().await.unwrap();
    assert!(err.contains("connection refused"), "{err}");
    let decisions = api.decisions();
    for want in [
        "ops get pods/portforward katamaran-system allowed",
        "ops create pods/portforward katamaran-system allowed",
        "alice get pods/portforward katamaran-system denied",
        "system:serviceaccount:katamaran-system:katamaran-agent list migrations.katamaran.io - allowed",
    ] {
        assert!(decisions.iter().any(|d| d == want), "{want} in {decisions:#?}");
    }
}

#[tokio::test]
async fn the_agents_record_events_of_both_groups() {
    let api = server().await;
    let agent = client(&api, Some(AGENT)).await;
    let core: Api<Event> = Api::namespaced(agent.clone(), "shop");
    let e: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "web-0."},
        "involvedObject": {"kind": "Pod", "namespace": "shop", "name": "web-0"},
        "reason": "MigrationStarted", "message": "moving to node-b", "type": "Normal"
    }))
    .unwrap();
    let created = core.create(&PostParams::default(), &e).await.unwrap();
    assert!(created.metadata.name.as_deref().unwrap().starts_with("web-0."));
    let listed = core.list(&ListParams::default().fields("involvedObject.name=web-0")).await;
    // Listing events is not the agents' business: their role creates and patches only.
    assert_eq!(api_error(listed).0, 403);

    let v1: Api<EventV1> = Api::namespaced(agent, "shop");
    let e: EventV1 = serde_json::from_value(json!({
        "metadata": {"name": "m.1"},
        "eventTime": "2026-12-03T13:00:00.000000Z",
        "regarding": {"kind": "Migration", "apiVersion": "katamaran.io/v1alpha1", "namespace": "shop", "name": "m"},
        "reason": "MigrationCompleted", "note": "the VM runs on node-b", "type": "Normal",
        "action": "Migrate", "reportingController": "katamaran.io/agent", "reportingInstance": "node-a"
    }))
    .unwrap();
    v1.create(&PostParams::default(), &e).await.unwrap();
    let patch = json!({"series": {"count": 2, "lastObservedTime": "2026-12-03T13:00:01.000000Z"}});
    let e = v1.patch("m.1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    assert_eq!(e.series.map(|s| s.count), Some(2));

    // What was recorded, read from the store.
    let state = api.state.lock().unwrap();
    let core_events = state.store.list(&support::store::Filter {
        ty: support::store::find_type("", "v1", "events").unwrap(),
        namespace: Some("shop".into()),
        labels: String::new(),
        fields: "involvedObject.name=web-0,reason=MigrationStarted".into(),
    });
    assert_eq!(core_events.0.len(), 1);
}

/// Writes of Migrations go through the committed CRD's schema, as the API server's do: the
/// defaults are filled in, unknown fields pruned, and invalid values refused with the field.
#[tokio::test]
async fn the_committed_crd_defaults_prunes_and_validates_migrations() {
    let api = server().await;
    let alice_client = client(&api, Some(ALICE)).await;
    let alice: Api<Migration> = Api::namespaced(alice_client.clone(), "shop");
    let agent: Api<Migration> = Api::namespaced(client(&api, Some(AGENT)).await, "shop");
    let raw: Api<kube::api::DynamicObject> =
        Api::namespaced_with(alice_client, "shop", &kube::api::ApiResource::erase::<Migration>(&()));
    let create = |body: serde_json::Value| {
        let raw = raw.clone();
        async move {
            let obj: kube::api::DynamicObject = serde_json::from_value(body).unwrap();
            raw.create(&PostParams::default(), &obj).await
        }
    };
    let head = |name: &str| json!({"apiVersion": "katamaran.io/v1alpha1", "kind": "Migration", "metadata": {"name": name}});

    // Bare spec: the server fills in every option's default; unknown fields are dropped.
    let mut bare = head("bare");
    bare["spec"] = json!({"pod": "web-0", "targetNode": "node-b", "surprise": 1});
    let stored = create(bare).await.unwrap();
    assert_eq!(
        stored.data["spec"]["options"],
        serde_json::to_value(katamaran_api::v1alpha1::Options::default()).unwrap()
    );
    assert_eq!(stored.data["spec"]["cancel"], false);
    assert!(stored.data["spec"].get("surprise").is_none(), "pruned");
    assert_eq!(alice.get("bare").await.unwrap().spec, MigrationSpec::new("web-0", "node-b"));

    let table = [
        (
            json!({"pod": "web-0", "targetNode": "node-b", "options": {"downtime": "fast"}}),
            "spec.options.downtime: Invalid value: \"fast\"",
        ),
        (
            json!({"pod": "web-0", "targetNode": "node-b", "options": {"tunnelMode": "vxlan"}}),
            "spec.options.tunnelMode: Unsupported value: \"vxlan\"",
        ),
        (
            json!({"pod": "web-0", "targetNode": "node-b", "options": {"multifdChannels": 65}}),
            "spec.options.multifdChannels: Invalid value: 65",
        ),
        (
            json!({"pod": "web-0", "targetNode": "node-b", "options": {"bandwidth": "0"}}),
            "spec.options.bandwidth: Invalid value: \"0\"",
        ),
        (json!({"pod": "Web_0", "targetNode": "node-b"}), "spec.pod: Invalid value: \"Web_0\""),
        (json!({"pod": "web-0"}), "spec.targetNode: Required value"),
    ];
    for (i, (spec, want)) in table.into_iter().enumerate() {
        let mut m = head(&format!("bad-{i}"));
        m["spec"] = spec;
        let (code, reason, message) = api_error(create(m).await);
        assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
        assert!(
            message.starts_with(&format!("Migration.katamaran.io \"bad-{i}\" is invalid: ")),
            "{message}"
        );
        assert!(message.contains(want), "want {want:?} in {message}");
    }
    let (code, _, _) = api_error(raw.get("bad-0").await);
    assert_eq!(code, 404, "nothing stored");

    // The CEL rules: ranges the patterns cannot say, a spec fixed but for the cancel request,
    // and a cancel request that stays.
    let mut long = head("long");
    long["spec"] = json!({"pod": "web-0", "targetNode": "node-b", "options": {"downtime": "20s"}});
    let (code, _, message) = api_error(create(long).await);
    assert_eq!(code, 422);
    assert!(
        message.contains(
            "spec.options.downtime: Invalid value: \"string\": downtime must be between 1ms and 10s"
        ),
        "{message}"
    );
    let retarget = json!({"spec": {"targetNode": "node-c"}});
    let (code, _, message) =
        api_error(alice.patch("bare", &PatchParams::default(), &Patch::Merge(&retarget)).await);
    assert_eq!(code, 422);
    assert!(message.contains("spec: Invalid value: \"object\": only spec.cancel may change"), "{message}");
    let slower = json!({"spec": {"options": {"downtime": "50ms"}}});
    let (code, _, _) = api_error(alice.patch("bare", &PatchParams::default(), &Patch::Merge(&slower)).await);
    assert_eq!(code, 422, "the options are part of the fixed spec");
    let cancel = |on: bool| json!({"spec": {"cancel": on}});
    alice.patch("bare", &PatchParams::default(), &Patch::Merge(&cancel(true))).await.unwrap();
    let (code, _, message) =
        api_error(alice.patch("bare", &PatchParams::default(), &Patch::Merge(&cancel(false))).await);
    assert_eq!(code, 422);
    assert!(message.contains("a cancel request cannot be withdrawn"), "{message}");

    // The status is checked too.
    let bogus = json!({"status": {"phase": "Teleporting"}});
    let (code, _, message) =
        api_error(agent.patch_status("bare", &PatchParams::default(), &Patch::Merge(&bogus)).await);
    assert_eq!(code, 422);
    assert!(message.contains("status.phase: Unsupported value: \"Teleporting\""), "{message}");
}

/// Field selectors are refused on fields the API server does not index, as it does: a
/// controller that would need one fails here, not in a cluster. A streaming list sends the
/// current state, then a bookmark marking its end.
#[tokio::test]
async fn field_selectors_are_the_api_servers_and_streaming_lists_end_with_a_bookmark() {
    let api = server().await;
    let agent_client = client(&api, Some(AGENT)).await;
    let migrations: Api<Migration> = Api::all(agent_client.clone());
    Api::<Migration>::namespaced(client(&api, Some(ALICE)).await, "shop")
        .create(&PostParams::default(), &migration("m"))
        .await
        .unwrap();
    for ok in ["spec.pod=web-0", "spec.targetNode=node-b", "metadata.name=m", "metadata.namespace=shop"] {
        assert_eq!(migrations.list(&ListParams::default().fields(ok)).await.unwrap().items.len(), 1, "{ok}");
    }
    let (code, _, message) =
        api_error(migrations.list(&ListParams::default().fields("status.phase=Ram")).await);
    assert_eq!((code, message.as_str()), (400, "field label not supported: status.phase"));
    let pods: Api<Pod> = Api::all(agent_client);
    assert_eq!(
        pods.list(&ListParams::default().fields("spec.nodeName=node-a")).await.unwrap().items.len(),
        3
    );
    let (code, _, _) =
        api_error(pods.list(&ListParams::default().fields("spec.runtimeClassName=kata")).await);
    assert_eq!(code, 400);

    let mut w = migrations.watch(&WatchParams::streaming_lists(), "0").await.unwrap().boxed();
    match w.try_next().await.unwrap() {
        Some(WatchEvent::Added(m)) => assert_eq!(m.metadata.name.as_deref(), Some("m")),
        other => panic!("{other:?}"),
    }
    match w.try_next().await.unwrap() {
        Some(WatchEvent::Bookmark(b)) => {
            assert_eq!(
                b.metadata.annotations.get("k8s.io/initial-events-end").map(String::as_str),
                Some("true")
            )
        }
        other => panic!("{other:?}"),
    }
}

/// Every CEL rule of the committed CRD is one the fake evaluates (a new rule in the types must
/// be taught to tests/support/schema.rs, or no test would see it refuse anything).
#[test]
fn the_fake_knows_every_cel_rule_of_the_crd() {
    fn rules(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    if k == "x-kubernetes-validations" {
                        out.extend(
                            child.as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap().to_owned()),
                        );
                    } else {
                        rules(child, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| rules(c, out)),
            _ => {}
        }
    }
    let crd = support::schema::from_deploy("crd-migration.yaml");
    let mut all = Vec::new();
    rules(&crd.schema, &mut all);
    assert!(all.len() >= 6, "{all:#?}");
    for rule in all {
        let known = std::panic::catch_unwind(|| support::schema::cel(&rule, &json!({}), Some(&json!({}))));
        assert!(known.is_ok(), "the fake does not evaluate {rule:?}");
    }
}

/// The node agent's Event reporter, under the agents' RBAC from deploy/: a source migration's
/// start and end become `events.k8s.io/v1` Events regarding the Pod; a failure is a Warning with
/// its reason; a client the RBAC refuses costs the migration nothing.
#[tokio::test]
async fn the_agent_reports_a_migrations_start_and_end_as_events_on_the_pod() {
    use katamaran::kube_events::{EventReporter, PodRef, REPORTING_CONTROLLER};
    use katamaran::migration::events::{CutoverTimes, Event as Progress, EventLog, Phase as Step};
    use std::sync::Arc;
    let api = server().await;
    let pod = PodRef { namespace: "shop".into(), name: "web-0".into(), uid: "uid-web-0".into() };
    let events_of = |api: &FakeApiServer| -> Vec<serde_json::Value> {
        let state = api.state.lock().unwrap();
        state
            .store
            .list(&support::store::Filter {
                ty: support::store::find_type("events.k8s.io", "v1", "events").unwrap(),
                namespace: Some("shop".into()),
                labels: String::new(),
                fields: String::new(),
            })
            .0
    };
    let wait_for = |n: usize| {
        let api = &api;
        async move {
            for _ in 0..100 {
                if events_of(api).len() >= n {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let reporter = Arc::new(EventReporter::new(client(&api, Some(AGENT)).await, "node-a"));

    let log = EventLog::default();
    reporter.follow(pod.clone(), "mig-1", "node-b", &log);
    log.push(Progress::new(Step::Preparing, "preparing"));
    log.push(Progress::new(Step::Ram, "pre-copy"));
    let mut fwd = Progress::new(Step::Forwarding, "VM runs on node-b");
    fwd.cutover = Some(CutoverTimes { downtime_ms: 31, ..CutoverTimes::default() });
    log.push(fwd);
    log.push(Progress::new(Step::Completed, "the forward ended"));
    wait_for(2).await;
    let mut events = events_of(&api);
    events.sort_by_key(|e| e["eventTime"].as_str().unwrap_or_default().to_owned());
    let reasons: Vec<&str> = events.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["MigrationStarted", "MigrationCompleted"], "{events:#?}");
    for e in &events {
        assert_eq!(e["type"], "Normal");
        assert_eq!(e["action"], "Migrate");
        assert_eq!(e["reportingController"], REPORTING_CONTROLLER);
        assert_eq!(e["reportingInstance"], "node-a");
        assert_eq!(
            e["regarding"],
            json!({"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web-0", "uid": "uid-web-0"})
        );
        let t = e["eventTime"].as_str().unwrap();
        assert!(t.len() == 27 && t.ends_with('Z') && t.as_bytes()[19] == b'.', "a MicroTime: {t}");
        assert!(e["metadata"]["name"].as_str().unwrap().starts_with("web-0."), "{e}");
    }
    assert_eq!(events[1]["note"], "the VM runs on node node-b; QEMU downtime 31 ms (migration mig-1)");
    let decisions = api.state.lock().unwrap().decisions.clone();
    let want =
        "system:serviceaccount:katamaran-system:katamaran-agent create events.events.k8s.io shop allowed";
    assert!(decisions.iter().any(|d| d == want), "{decisions:#?}");

    // A failure: a Warning with the reason.
    let log = EventLog::default();
    reporter.follow(pod.clone(), "mig-2", "node-b", &log);
    log.push(Progress::new(Step::Preparing, "preparing"));
    log.push(Progress::new(Step::Failed, "destination QEMU exited (status 1)"));
    wait_for(4).await;
    let failed: Vec<serde_json::Value> =
        events_of(&api).into_iter().filter(|e| e["reason"] == "MigrationFailed").collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0]["type"], "Warning");
    assert_eq!(
        failed[0]["note"],
        "migration mig-2 failed, the VM runs here: destination QEMU exited (status 1)"
    );

    // alice may not create events: the reporter's call fails, and nothing else does.
    let refused = EventReporter::new(client(&api, Some(ALICE)).await, "node-a");
    let note = katamaran::kube_events::Note { warning: false, reason: "MigrationStarted", note: "x".into() };
    let err = refused.record(&pod, &note).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err:?}");
}

async fn secrets(api: &FakeApiServer, token: &str) -> Api<k8s_openapi::api::core::v1::Secret> {
    Api::namespaced(client(api, Some(token)).await, support::AGENT_NS)
}

#[tokio::test]
async fn only_administrators_read_the_agents_ca() {
    let api = server().await;
    {
        let secrets = support::store::find_type("", "v1", "secrets").unwrap();
        let ca = katamaran::peer::ClusterCa::generate(std::time::Duration::from_secs(3600)).unwrap();
        let secret = serde_json::to_value(support::ca_secret(&ca)).unwrap();
        api.state.lock().unwrap().store.insert(&secrets, secret);
    }
    // katamaran-debug (kubectl migrate --direct): the CA, and no other Secret.
    let ca = secrets(&api, OPS).await.get(katamaran::peer::CA_SECRET).await.unwrap();
    assert!(ca.data.unwrap().contains_key(katamaran::peer::CA_KEY_FILE));
    let (code, _, _) = api_error(secrets(&api, OPS).await.get("other").await);
    assert_eq!(code, 403);
    // Migrators and the agents (they mount it) may not read it.
    for token in [ALICE, AGENT] {
        let (code, _, _) = api_error(secrets(&api, token).await.get(katamaran::peer::CA_SECRET).await);
        assert_eq!(code, 403, "{token}");
    }
}
