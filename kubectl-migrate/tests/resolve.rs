//! The plugin binary against the fake API server: what it refuses (exit code 2, one clear line),
//! how it reads kubectl's flags, and what `--dry-run` shows without changing anything.

#![allow(clippy::unwrap_used)]

mod support;

use support::{Cluster, Options};

#[tokio::test]
async fn every_refusal_exits_2_with_a_one_line_reason() {
    let c = Cluster::start(Options::default()).await;
    let table: &[(&[&str], &str)] = &[
        (&["pod", "--direct", "nope", "--to", "node-b"], "error: pod shop/nope not found"),
        (&["pod", "--direct", "web-0", "--to", "node-z"], "error: node \"node-z\" not found"),
        (&["pod", "--direct", "web-0", "--to", "node-a"], "error: pod shop/web-0 already runs on node node-a; choose another destination"),
        (&["pod", "--direct", "web-0", "--to", "node-notready"], "error: node node-notready is NotReady (KubeletNotReady: container runtime is down)"),
        (&["pod", "--direct", "web-0", "--to", "node-cordoned"], "error: node node-cordoned is cordoned (spec.unschedulable)"),
        (
            &["pod", "--direct", "web-0", "--to", "node-noagent"],
            "error: no katamaran agent on node node-noagent: no agent pod runs there \
             (label app.kubernetes.io/name=katamaran-agent in namespace katamaran-system)",
        ),
        (&["pod", "--direct", "web-0", "--to", "node-v6"], "error: node node-v6 has no IPv4 InternalIP, needed for the pod's address 10.244.1.7"),
        (
            &["pod", "--direct", "plain", "--to", "node-b"],
            "error: pod shop/plain uses no runtime class (the node's default runtime, not Kata); \
             only pods of runtime class \"kata-katamaran\" can be migrated",
        ),
        (
            &["pod", "--direct", "other-kata", "--to", "node-b"],
            "error: pod shop/other-kata uses runtime class \"kata-qemu\"; only pods of runtime class \"kata-katamaran\"",
        ),
        (&["pod", "--direct", "pending", "--to", "node-b"], "error: pod shop/pending is Pending, not Running"),
        (
            &["pod", "--direct", "orphan", "--to", "node-b"],
            "error: the katamaran agent on node node-a knows no Kata sandbox of pod shop/orphan (1 sandboxes listed)",
        ),
        (&["pod", "--direct", "web-0", "--to", "node-b", "--downtime", "60s"], "error: invalid downtime: 60s is outside 1ms..=10s"),
        (&["pod", "--direct", "web-0", "--to", "node-b", "--tunnel-mode", "ip6ip6"], "error: invalid tunnel-mode: ip6ip6 cannot carry the VM address 10.244.1.7"),
        (&["pod", "--direct", "web-0"], "the following required arguments were not provided"),
        (&["pod", "--direct", "web-0", "--to", "node-b", "--downtime", "soon"], "invalid value 'soon' for '--downtime <DURATION>'"),
    ];
    for (args, want) in table {
        let run = c.run(args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(want), "{args:?}: want {want:?} in stderr:\n{}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: nothing on stdout, got {:?}", run.stdout);
        if want.starts_with("error:") {
            assert_eq!(run.stderr.lines().count(), 1, "{args:?}: one line: {:?}", run.stderr);
        }
    }
    // None of them got as far as asking an agent to change anything.
    assert!(c.calls().iter().all(|c| c.ends_with(":ListSandboxes")), "{:?}", c.calls());
}

#[tokio::test]
async fn a_user_without_portforward_rights_is_refused_with_the_api_message() {
    let c = Cluster::start(Options { forbid_portforward: true, ..Options::default() }).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("cannot port-forward to katamaran agent katamaran-system/agent-"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("cannot create resource \\\"pods/portforward\\\"")
            || run.stderr.contains("pods/portforward"),
        "{}",
        run.stderr
    );
    assert!(c.calls().is_empty());
}

#[tokio::test]
async fn an_agent_that_does_not_listen_fails_with_the_port_forward_error() {
    let c = Cluster::start(Options::default()).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-down"]).await;
    // The upgrade succeeds, then the API server reports "connection refused" on the port's
    // error channel and closes; the TLS handshake with that agent, before any RPC, carries it.
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("mutual TLS with the katamaran agent of node node-down failed"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("connection refused"), "{}", run.stderr);
    assert!(
        c.calls().iter().all(|call| !call.contains("PrepareIncoming") && !call.contains("StartMigration")),
        "{:?}",
        c.calls()
    );
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let c = Cluster::start(Options::default()).await;
    let run = c
        .run(&[
            "pod",
            "--direct",
            "web-0",
            "--to",
            "node-b",
            "--dry-run",
            "--downtime",
            "100ms",
            "--shared-storage",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    for want in [
        "Dry run: nothing was changed.",
        "pod:           shop/web-0 (uid uid-web-0)",
        "runtime class: kata-katamaran",
        "pod IPs:       10.244.1.7",
        "sandbox:       3f2a9c (QEMU 7.2.0, running; drive-0)",
        "source:        node-a 192.0.2.1 via agent agent-a",
        "destination:   node-b 192.0.2.2 via agent agent-b",
        "downtime 100ms",
        "tunnel auto → ipip",
        "disks shared",
    ] {
        assert!(run.stdout.contains(want), "missing {want:?} in\n{}", run.stdout);
    }
    assert_eq!(c.calls(), ["node-a:ListSandboxes"], "only a read on the source agent");
    assert!(c.api.requests().iter().all(|r| r.starts_with("GET ")), "{:?}", c.api.requests());
}

#[tokio::test]
async fn dry_run_json_is_one_document() {
    let c = Cluster::start(Options::default()).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "--dry-run", "-o", "json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["dryRun"], true);
    assert_eq!(doc["pod"]["name"], "web-0");
    assert_eq!(doc["sandbox"]["id"], "3f2a9c");
    assert_eq!(doc["source"]["address"], "192.0.2.1");
    assert_eq!(doc["destination"]["agentPod"], "agent-b");
    assert_eq!(doc["options"]["downtimeLimitMs"], 25);
    // -o yaml is the same document.
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "--dry-run", "-o", "yaml"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.stdout.trim_start().starts_with('{'), "YAML, not JSON: {}", run.stdout);
    let yaml: serde_json::Value = serde_saphyr::from_str(&run.stdout).unwrap();
    assert_eq!(yaml, doc, "{}", run.stdout);
}

#[tokio::test]
async fn dry_run_reports_an_unreachable_source_agent_without_failing() {
    let c = Cluster::start(Options { forbid_portforward: true, ..Options::default() }).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "--dry-run"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains(
            "sandbox:       unknown (cannot port-forward to katamaran agent katamaran-system/agent-a"
        ),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn kubectl_flags_choose_the_kubeconfig_context_and_namespace() {
    let c = Cluster::start(Options::default()).await;
    let dry = ["pod", "--direct", "web-0", "--to", "node-b", "--dry-run"];
    // The context's namespace (shop) is the default...
    assert_eq!(c.run(&dry).await.code, Some(0));
    // ... -n overrides it ...
    let run = c.run(&[&dry[..], &["-n", "default"]].concat()).await;
    assert!(run.stderr.contains("pod default/web-0 not found"), "{run:?}");
    // ... --context picks another context and its namespace ...
    let run = c.run(&[&dry[..], &["--context", "other"]].concat()).await;
    assert!(run.stderr.contains("pod default/web-0 not found"), "{run:?}");
    let run = c.run(&[&dry[..], &["--context", "other", "--namespace", "shop"]].concat()).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    // ... and --kubeconfig beats $KUBECONFIG.
    let path = c.kubeconfig.to_str().unwrap();
    let mut cmd = c.command(&[&dry[..], &["--kubeconfig", path]].concat());
    cmd.env("KUBECONFIG", "/nonexistent/kubeconfig");
    let run = support::wait(cmd.spawn().unwrap()).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = c.run(&[&dry[..], &["--kubeconfig", "/nonexistent/kubeconfig"]].concat()).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("cannot read kubeconfig /nonexistent/kubeconfig"), "{}", run.stderr);
}

/// A ClusterRole that lets `ops` act as `alice`, and nothing else.
const IMPERSONATE_ALICE: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: act-as-alice}
rules:
  - apiGroups: ['']
    resources: [users]
    resourceNames: [alice]
    verbs: [impersonate]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ops-acts-as-alice}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: act-as-alice}
subjects: [{kind: User, apiGroup: rbac.authorization.k8s.io, name: ops}]
";

#[tokio::test]
async fn server_token_and_impersonation_flags_reach_the_api_server_as_kubectls_do() {
    use support::rbac::{Rbac, UserInfo};
    let c = Cluster::start(Options::default()).await;
    {
        let mut st = c.api.state.lock().unwrap();
        let mut rbac = Rbac::from_deploy(&["rbac-kubectl-migrate.yaml", "agent-rbac.yaml"]);
        rbac.bind("katamaran-migrator", Some("shop"), "alice");
        rbac.add_yaml(IMPERSONATE_ALICE);
        st.rbac = Some(rbac);
        for (token, user) in [("alice-token", "alice"), ("ops-token", "ops"), ("nobody-token", "nobody")] {
            st.tokens.insert(token.into(), UserInfo::user(user, &[]));
        }
    }
    let server = format!("http://{}", c.api.addr);
    let dry = ["pod", "--direct", "web-0", "--to", "node-b", "--dry-run", "-n", "shop", "--server", &server];
    // No kubeconfig at all: --server and --token are enough. alice may read her pod but not
    // nodes (the migrator role): the API's refusal names her.
    let without_kubeconfig = |extra: &[&str]| {
        let mut cmd = c.command(&[&dry[..], extra].concat());
        cmd.env("KUBECONFIG", "/nonexistent/kubeconfig");
        cmd
    };
    let run = support::wait(without_kubeconfig(&["--token", "alice-token"]).spawn().unwrap()).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("User \"alice\" cannot get resource \"nodes\""), "{}", run.stderr);
    let decisions = c.api.state.lock().unwrap().decisions.clone();
    assert!(decisions.contains(&"alice get pods shop allowed".to_owned()), "{decisions:#?}");

    // --as: ops may act as alice, and the API answers for alice.
    c.api.state.lock().unwrap().decisions.clear();
    let run =
        support::wait(without_kubeconfig(&["--token", "ops-token", "--as", "alice"]).spawn().unwrap()).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("User \"alice\" cannot get resource \"nodes\""), "{}", run.stderr);
    let decisions = c.api.state.lock().unwrap().decisions.clone();
    assert_eq!(
        decisions[..2],
        ["ops impersonate users - allowed", "alice get pods shop allowed"],
        "{decisions:#?}"
    );
    // ... a group it may not act as is refused before anything is read ...
    let run = support::wait(
        without_kubeconfig(&["--token", "ops-token", "--as", "alice", "--as-group", "admins"])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("User \"ops\" cannot impersonate resource \"groups\""), "{}", run.stderr);
    // ... and someone without the right cannot act as alice at all.
    let run =
        support::wait(without_kubeconfig(&["--token", "nobody-token", "--as", "alice"]).spawn().unwrap())
            .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("User \"nobody\" cannot impersonate resource \"users\""), "{}", run.stderr);

    // --server and --token override the kubeconfig's (which has no token: anonymous, 401).
    let run = c.run(&[&dry[..], &["--token", "wrong-token"]].concat()).await;
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("Unauthorized"), "{}", run.stderr);
}

#[tokio::test]
async fn connection_flags_refuse_bad_values_with_exit_2_naming_the_flag() {
    let c = Cluster::start(Options::default()).await;
    let dry = ["pod", "--direct", "web-0", "--to", "node-b", "--dry-run"];
    for (extra, want) in [
        (&["--as-group", "admins"][..], "--as <USER>"),
        (&["--as-uid", "42"][..], "--as <USER>"),
        (&["--request-timeout", "5"][..], "has no unit: say 5s, 5m or 5h"),
        (&["--request-timeout", "soon"][..], "--request-timeout"),
        (&["--server", "ftp://example.com"][..], "expected https://HOST:PORT"),
        (&["--server", "http://"][..], "--server"),
    ] {
        let run = c.run(&[&dry[..], extra].concat()).await;
        assert_eq!(run.code, Some(2), "{extra:?}: {run:?}");
        assert!(run.stderr.contains(want), "{extra:?}: want {want:?} in {}", run.stderr);
    }
    // 0 means no limit, as in kubectl.
    assert_eq!(c.run(&[&dry[..], &["--request-timeout", "0"]].concat()).await.code, Some(0));
}

#[tokio::test]
async fn request_timeout_bounds_an_api_server_that_does_not_answer() {
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let c = Cluster::start(Options::default()).await;
    let server = format!("http://{addr}");
    let started = std::time::Instant::now();
    let run = c
        .run(&[
            "pod",
            "--direct",
            "web-0",
            "--to",
            "node-b",
            "--dry-run",
            "--server",
            &server,
            "--request-timeout",
            "1s",
        ])
        .await;
    assert_eq!(run.code, Some(1), "a failure to find out, not a refusal: {run:?}");
    assert!(
        run.stderr.contains("get pod shop/web-0 did not complete within 1s (--request-timeout)"),
        "{}",
        run.stderr
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
}
