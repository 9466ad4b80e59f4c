//! The manifests and drop-ins in `deploy/` fit together and fit the code: every file parses, the
//! RuntimeClass handler is the containerd runtime that runs our wrapper, the Kata drop-in opens the
//! QMP socket the extension uses, and the DaemonSet is what `kubectl migrate` looks for. The node
//! installer's runs are in `deploy_install.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use katamaran::sandbox::NodeLayout;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml(relative: &str) -> Vec<Value> {
    let path = deploy().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn toml_file(relative: &str) -> toml::Table {
    let path = deploy().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn one(relative: &str, kind: &str) -> Value {
    let docs: Vec<Value> = yaml(relative).into_iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(docs.len(), 1, "{relative}: one {kind}");
    docs.into_iter().next().unwrap()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn every_manifest_and_drop_in_parses() {
    let mut files = Vec::new();
    files_under(&deploy(), &mut files);
    let (mut yamls, mut tomls) = (0, 0);
    for f in files {
        let rel = f.strip_prefix(deploy()).unwrap().to_string_lossy().into_owned();
        match f.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                for d in yaml(&rel) {
                    assert!(d["apiVersion"].is_string() && d["kind"].is_string(), "{rel}: {d}");
                    assert!(d["metadata"]["name"].is_string() || d["kind"] == "Kustomization", "{rel}: {d}");
                }
                yamls += 1;
            }
            Some("toml") => {
                toml_file(&rel);
                tomls += 1;
            }
            _ => {}
        }
    }
    assert!(yamls >= 5 && tomls >= 2, "found {yamls} YAML and {tomls} TOML files");
}

#[test]
fn runtime_class_containerd_runtime_and_wrapper_agree() {
    let rc = one("runtimeclass.yaml", "RuntimeClass");
    assert_eq!(rc["apiVersion"], "node.k8s.io/v1");
    assert_eq!(rc["metadata"]["name"], "kata-katamaran");
    let handler = rc["handler"].as_str().unwrap();

    let c = toml_file("containerd/katamaran.toml");
    assert_eq!(c["version"].as_integer(), Some(2));
    let runtimes = c["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"].as_table().unwrap();
    let names: Vec<&String> = runtimes.keys().collect();
    assert_eq!(names, [handler], "the RuntimeClass handler is the containerd runtime");
    let rt = &runtimes[handler];
    // containerd maps io.containerd.<name>.v2 to containerd-shim-<name>-v2: the wrapper's name.
    assert_eq!(rt["runtime_type"].as_str(), Some("io.containerd.katamaran.v2"));
    let path = Path::new(rt["runtime_path"].as_str().unwrap());
    assert_eq!(path.file_name().unwrap(), katamaran::shim::wrapper::PROGRAM);
    assert_eq!(path.parent().unwrap(), Path::new("/opt/katamaran/bin"), "where install.sh puts binaries");
    let config_path = Path::new(rt["options"]["ConfigPath"].as_str().unwrap());
    assert_eq!(config_path, Path::new("/opt/katamaran/kata/configuration-qemu.toml"));
    let annotations = rt["pod_annotations"].as_array().unwrap();
    assert!(annotations.iter().any(|a| a.as_str() == Some("io.katacontainers.*")), "{annotations:?}");

    // The Kata drop-in lives in config.d next to that configuration, and the installer puts it there.
    let install = std::fs::read_to_string(deploy().join("node/install.sh")).unwrap();
    assert!(install.contains("KATA_DIR=/opt/katamaran/kata"), "installer and ConfigPath agree");
    assert!(install.contains("\"$KATA_DIR/configuration-qemu.toml\""));
    assert!(install.contains("\"$KATA_DIR/config.d/50-katamaran.toml\""));
    // The installer asks containerd for this runtime before it reports success.
    assert!(
        install.contains(&format!("\nHANDLER={handler}\n")),
        "installer checks the RuntimeClass's runtime"
    );
    assert!(install.contains("\nRUNTIME_TYPE=io.containerd.katamaran.v2\n"));
}

#[test]
fn kata_drop_in_opens_the_extensions_qmp_socket() {
    let k = toml_file("kata/config.d/50-katamaran.toml");
    let qemu = k["hypervisor"]["qemu"].as_table().unwrap();
    // Kata names the socket extra-monitor.sock after this value; the extension looks exactly there.
    assert_eq!(qemu["extra_monitor_socket"].as_str(), Some("qmp"));
    assert_eq!(qemu["enable_debug"].as_bool(), Some(true), "Kata opens the extra monitor only with debug");
    assert!(NodeLayout::default().extra_monitor_socket("id").ends_with("extra-monitor.sock"));
    assert_eq!(k.len(), 1, "touches nothing but [hypervisor.qemu]");
}

fn mounts(container: &Value) -> Vec<(String, String, Option<String>)> {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
                m["mountPropagation"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[test]
fn daemonset_is_what_kubectl_migrate_looks_for() {
    let ns = one("namespace.yaml", "Namespace");
    let ns_name = ns["metadata"]["name"].as_str().unwrap();
    assert_eq!(ns_name, "katamaran-system", "kubectl migrate's default --agent-namespace");
    assert_eq!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged");
    let sa = one("agent-rbac.yaml", "ServiceAccount");
    assert_eq!(sa["metadata"]["namespace"], ns_name);
    assert_ne!(sa["automountServiceAccountToken"], false, "the agents reconcile Migrations");
    // The agents' role is bound to their ServiceAccount, cluster-wide.
    let role = one("agent-rbac.yaml", "ClusterRole");
    let binding = one("agent-rbac.yaml", "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns_name}])
    );

    let ds = one("daemonset.yaml", "DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    assert_eq!(ds["metadata"]["namespace"], ns_name);
    let label = ("app.kubernetes.io/name", "katamaran-agent"); // kubectl-migrate's AGENT_LABEL
    assert_eq!(ds["spec"]["selector"]["matchLabels"][label.0], label.1);
    let pod = &ds["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"][label.0], label.1);
    for (k, v) in ds["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "selector matches the template");
    }
    let spec = &pod["spec"];
    assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(spec["automountServiceAccountToken"], true, "the agents call the API with this identity");
    assert!(
        spec["hostNetwork"].is_null() || spec["hostNetwork"] == false,
        "reached by port-forward, not hostNetwork"
    );
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["nodeSelector"], one("runtimeclass.yaml", "RuntimeClass")["scheduling"]["nodeSelector"]);

    let volumes: BTreeSet<&str> =
        spec["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    let init = &spec["initContainers"][0];
    let agent = &spec["containers"][0];
    for c in [init, agent] {
        assert_eq!(c["securityContext"]["privileged"], true, "{}", c["name"]);
        for (name, path, _) in mounts(c) {
            assert!(
                volumes.contains(name.as_str()),
                "{}: mount {path} uses undefined volume {name}",
                c["name"]
            );
        }
    }
    let m = mounts(agent);
    for (path, propagation) in [
        ("/run/katamaran", Some("Bidirectional")),
        ("/run/vc", Some("Bidirectional")),
        ("/run/netns", Some("Bidirectional")),
        ("/run/containerd", Some("HostToContainer")),
        ("/host/proc", None),
    ] {
        let found = m.iter().find(|(_, p, _)| p == path).unwrap_or_else(|| panic!("agent mounts {path}"));
        assert_eq!(found.2.as_deref(), propagation, "{path}");
    }
    assert_eq!(NodeLayout::default().katamaran_run, Path::new("/run/katamaran"));
    assert_eq!(NodeLayout::default().kata_run.join("vc"), Path::new("/run/vc"));

    // The control port kubectl migrate port-forwards to (its --agent-port default), loopback only.
    let args: Vec<&str> = agent["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args[0], "node");
    assert!(args.contains(&"--listen-tcp=127.0.0.1:10555"), "{args:?}");
    assert!(args.contains(&"--node-address=$(HOST_IP)"), "{args:?}");
    // ... mutual TLS only: the cluster CA from its Secret, read-only and root-only, and the node
    // name its certificate carries.
    let ca_dir = args.iter().find_map(|a| a.strip_prefix("--peer-ca-dir=")).expect("--peer-ca-dir");
    let (volume, _, _) = m.iter().find(|(_, p, _)| p == ca_dir).expect("the CA directory is mounted");
    let ca_mount =
        agent["volumeMounts"].as_array().unwrap().iter().find(|v| v["mountPath"] == ca_dir).unwrap();
    assert_eq!(ca_mount["readOnly"], true);
    let ca_volume =
        spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == volume.as_str()).unwrap();
    assert_eq!(ca_volume["secret"]["secretName"], katamaran::peer::CA_SECRET);
    assert_eq!(ca_volume["secret"]["defaultMode"], 0o400);
    assert!(ca_volume["secret"]["items"].is_null(), "both files, under their own names: {ca_volume}");
    let node_name =
        agent["env"].as_array().unwrap().iter().find(|e| e["name"] == "KATAMARAN_NODE_NAME").unwrap();
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(agent["ports"][0]["containerPort"], 10555);
    // Readiness and liveness ask the agent's own HTTP endpoint (--listen-http, on the pod's
    // address where kubelet probes).
    let http = args.iter().find_map(|a| a.strip_prefix("--listen-http=")).expect("--listen-http");
    let port: u64 = http.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"], port);
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");

    // The installer: from the generated ConfigMap, at the path the init container runs.
    let k = one("kustomization.yaml", "Kustomization");
    for r in k["resources"].as_array().unwrap() {
        assert!(deploy().join(r.as_str().unwrap()).is_file(), "{r}");
    }
    let generator = &k["configMapGenerator"][0];
    assert_eq!(generator["namespace"], ns_name);
    let cm = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "install-files").unwrap();
    assert_eq!(cm["configMap"]["name"], generator["name"]);
    let keys: Vec<&str> = generator["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let (key, file) = f.as_str().unwrap().split_once('=').unwrap();
            assert!(deploy().join(file).is_file(), "{file}");
            key
        })
        .collect();
    let mount = mounts(init).into_iter().find(|(n, _, _)| n == "install-files").unwrap().1;
    assert_eq!(init["command"][1].as_str().unwrap(), format!("{mount}/install.sh"));
    let install = std::fs::read_to_string(deploy().join("node/install.sh")).unwrap();
    assert!(install.contains(&format!("FILES_DIR:-{mount}")), "installer default FILES_DIR is the mount");
    for key in keys.iter().filter(|k| **k != "install.sh") {
        assert!(install.contains(&format!("$FILES_DIR/{key}")), "installer uses {key}");
    }
}

#[test]
fn daemonset_flags_exist_on_the_agent() {
    let ds = one("daemonset.yaml", "DaemonSet");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    let help = Command::new(env!("CARGO_BIN_EXE_katamaran-agent")).args(["node", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in agent["args"].as_array().unwrap().iter().filter_map(Value::as_str) {
        if let Some(flag) = arg.strip_prefix("--").map(|f| f.split('=').next().unwrap()) {
            assert!(
                help.contains(&format!("--{flag}")),
                "the DaemonSet passes --{flag}, which katamaran-agent node lacks"
            );
        }
    }
}
