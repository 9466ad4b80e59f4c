#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;

const CLASS: &str = "kata-katamaran";

fn pod(patch: impl FnOnce(&mut serde_json::Value)) -> Pod {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "uid": "uid-1"},
        "spec": {"nodeName": "node-a", "runtimeClassName": CLASS, "containers": [{"name": "web"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}]}
    });
    patch(&mut v);
    serde_json::from_value(v).unwrap()
}

fn node(name: &str, patch: impl FnOnce(&mut serde_json::Value)) -> Node {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [
                {"type": "Hostname", "address": name},
                {"type": "InternalIP", "address": "fd00:1::2"},
                {"type": "InternalIP", "address": "192.0.2.2"}
            ]
        }
    });
    patch(&mut v);
    serde_json::from_value(v).unwrap()
}

#[test]
fn a_running_kata_pod_resolves() {
    let facts = pod_facts(&pod(|_| {}), CLASS).unwrap();
    assert_eq!(facts.key(), "shop/web-0");
    assert_eq!(facts.uid, "uid-1");
    assert_eq!(facts.node, "node-a");
    assert_eq!(facts.ips, ["10.244.1.7".parse::<IpAddr>().unwrap(), "fd00::7".parse().unwrap()]);
    assert_eq!(facts.family(), Family::V4);
    // The destination's address is of the primary pod IP's family, not the first listed.
    assert_eq!(
        destination_facts(&node("node-b", |_| {}), &facts).unwrap(),
        "192.0.2.2".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn an_ipv6_pod_gets_ipv6_node_addresses() {
    let facts = pod_facts(&pod(|v| v["status"]["podIPs"] = json!([{"ip": "fd00::7"}])), CLASS).unwrap();
    assert_eq!(facts.family(), Family::V6);
    assert_eq!(
        destination_facts(&node("node-b", |_| {}), &facts).unwrap(),
        "fd00:1::2".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn pod_refusals_say_what_is_wrong() {
    type Patch = fn(&mut serde_json::Value);
    let table: [(Patch, &str); 7] = [
        (
            |v| v["spec"]["runtimeClassName"] = json!("kata-qemu"),
            "uses runtime class \"kata-qemu\"; only pods of runtime class \"kata-katamaran\"",
        ),
        (
            |v| {
                v["spec"].as_object_mut().unwrap().remove("runtimeClassName");
            },
            "uses no runtime class",
        ),
        (|v| v["status"]["phase"] = json!("Pending"), "pod shop/web-0 is Pending, not Running"),
        (|v| v["status"]["phase"] = json!("Succeeded"), "is Succeeded, not Running"),
        (
            |v| v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z"),
            "pod shop/web-0 is terminating",
        ),
        (|v| v["spec"]["nodeName"] = json!(""), "pod shop/web-0 is not scheduled"),
        (
            |v| {
                v["status"]["podIPs"] = json!([]);
                v["status"].as_object_mut().unwrap().remove("podIP");
            },
            "pod shop/web-0 has no IP address yet",
        ),
    ];
    for (patch, want) in table {
        let err = pod_facts(&pod(patch), CLASS).unwrap_err();
        assert!(err.is_refusal());
        assert!(err.to_string().contains(want), "want {want:?} in {err}");
    }
}

#[test]
fn destination_refusals_say_what_is_wrong() {
    let facts = pod_facts(&pod(|_| {}), CLASS).unwrap();
    type Patch = fn(&mut serde_json::Value);
    let table: [(&str, Patch, &str); 5] = [
        ("node-a", |_| {}, "pod shop/web-0 already runs on node node-a"),
        (
            "node-b",
            |v| v["status"]["conditions"] = json!([{"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "PLEG is not healthy"}]),
            "node node-b is NotReady (KubeletNotReady: PLEG is not healthy)",
        ),
        (
            "node-b",
            |v| v["status"]["conditions"] = json!([]),
            "node node-b is NotReady (no Ready condition reported)",
        ),
        (
            "node-b",
            |v| v["spec"]["unschedulable"] = json!(true),
            "node node-b is cordoned (spec.unschedulable)",
        ),
        (
            "node-b",
            |v| v["status"]["addresses"] = json!([{"type": "ExternalIP", "address": "203.0.113.9"}, {"type": "InternalIP", "address": "fd00:1::2"}]),
            "node node-b has no IPv4 InternalIP, needed for the pod's address 10.244.1.7",
        ),
    ];
    for (name, patch, want) in table {
        let err = destination_facts(&node(name, patch), &facts).unwrap_err();
        assert!(err.is_refusal());
        assert_eq!(err.to_string().lines().count(), 1);
        assert!(err.to_string().contains(want), "want {want:?} in {err}");
    }
}

#[test]
fn a_cordoned_or_not_ready_source_is_fine() {
    let facts = pod_facts(&pod(|_| {}), CLASS).unwrap();
    let source = node("node-a", |v| {
        v["spec"]["unschedulable"] = json!(true);
        v["status"]["conditions"] = json!([{"type": "Ready", "status": "Unknown"}]);
    });
    assert_eq!(source_address(&source, &facts).unwrap(), "192.0.2.2".parse::<IpAddr>().unwrap());
}

fn agent(name: &str, node: &str, phase: &str, ready: bool) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "katamaran-system", "labels": {"app.kubernetes.io/name": "katamaran-agent"}},
        "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .unwrap()
}

#[test]
fn the_running_ready_agent_on_the_node_is_picked() {
    let pods = [
        agent("agent-old", "node-b", "Running", false),
        agent("agent-other-node", "node-a", "Running", true),
        agent("agent-new", "node-b", "Running", true),
    ];
    assert_eq!(pick_agent(&pods, "node-b", "katamaran-system").unwrap(), "agent-new");
    assert_eq!(
        pick_agent(&pods[..1], "node-b", "katamaran-system").unwrap(),
        "agent-old",
        "Running but not Ready still answers"
    );
}

#[test]
fn no_agent_says_what_was_found() {
    let err = pick_agent(&[], "node-b", "katamaran-system").unwrap_err().to_string();
    assert_eq!(
        err,
        "no katamaran agent on node node-b: no agent pod runs there \
         (label app.kubernetes.io/name=katamaran-agent in namespace katamaran-system)"
    );
    let err = pick_agent(&[agent("agent-x", "node-b", "Pending", false)], "node-b", "katamaran-system")
        .unwrap_err();
    assert!(err.to_string().contains("agent-x is Pending"), "{err}");
    assert!(err.is_refusal());
}

fn sandbox(id: &str, ns: &str, name: &str, uid: &str) -> pb::Sandbox {
    let mut s = pb::Sandbox::new();
    s.id = id.into();
    s.pod_namespace = ns.into();
    s.pod_name = name.into();
    s.pod_uid = uid.into();
    s
}

#[test]
fn the_sandbox_is_matched_by_uid_then_by_name() {
    let facts = pod_facts(&pod(|_| {}), CLASS).unwrap();
    let list = [
        sandbox("old", "shop", "web-0", "uid-0"),
        sandbox("other", "shop", "web-1", ""),
        sandbox("new", "shop", "web-0", "uid-1"),
    ];
    assert_eq!(match_sandbox(&list, &facts).unwrap().id, "new", "a recreated pod's old sandbox is not it");
    let list = [sandbox("other", "shop", "web-1", ""), sandbox("named", "shop", "web-0", "")];
    assert_eq!(match_sandbox(&list, &facts).unwrap().id, "named");
    let err = match_sandbox(&list[..1], &facts).unwrap_err().to_string();
    assert_eq!(
        err,
        "the katamaran agent on node node-a knows no Kata sandbox of pod shop/web-0 (1 sandboxes listed)"
    );
}
