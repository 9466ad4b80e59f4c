//! The DaemonSet runs the agent as deployed on a real node: a pod that is not hostNetwork, so
//! its node work must be pointed at the host's network namespace and its VMs at the host's
//! cgroups (both through pid 1, hence hostPID), and its state must live on the node's disk.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use katamaran::sandbox::NodeLayout;
use serde_json::Value;

fn agent_pod() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let ds = docs.into_iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    ds["spec"]["template"]["spec"].clone()
}

#[test]
fn the_agent_reaches_the_host_through_pid_1() {
    let pod = agent_pod();
    assert_eq!(pod["hostPID"], true, "/proc/1 is the host's init");
    assert!(pod["hostNetwork"].is_null() || pod["hostNetwork"] == false);
    let agent = &pod["containers"][0];
    let args: Vec<&str> = agent["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    for want in ["--host-netns=/proc/1/ns/net", "--host-proc=/proc/1", "--vm-cgroup=required"] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }
    // The control listener stays on the pod's loopback, where port-forward arrives.
    assert!(args.contains(&"--listen-tcp=127.0.0.1:10555"), "{args:?}");
}

#[test]
fn state_lives_on_the_node_and_netns_mounts_propagate() {
    let pod = agent_pod();
    let agent = &pod["containers"][0];
    let state = NodeLayout::default().katamaran_state;
    let args: Vec<&str> = agent["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&format!("--state-dir={}", state.display()).as_str()), "{args:?}");

    let mounts = agent["volumeMounts"].as_array().unwrap();
    let mount =
        |path: &str| mounts.iter().find(|m| m["mountPath"] == path).unwrap_or_else(|| panic!("mount {path}"));
    let host_path = |volume: &Value| {
        let v = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == volume["name"]).unwrap();
        v["hostPath"]["path"].as_str().unwrap().to_owned()
    };
    let st = mount(&state.display().to_string());
    assert_eq!(host_path(st), state.display().to_string(), "the node's own directory, persistent");
    let run = mount("/run/katamaran");
    assert_eq!(run["mountPropagation"], "Bidirectional", "netns bind mounts reach the host");
    assert_eq!(host_path(run), "/run/katamaran");
}
