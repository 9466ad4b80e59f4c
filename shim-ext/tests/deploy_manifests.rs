//! The manifests and drop-ins in `deploy/` fit together and fit the code: every file parses, the
//! RuntimeClass handler is the containerd runtime that runs our wrapper, the Kata drop-in opens the
//! QMP socket the extension uses, the DaemonSet is what `kubectl migrate` looks for, and the node
//! installer installs, is idempotent and uninstalls (run against a fake host root).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use katamaran::sandbox::NodeLayout;
use katamaran::shim::config::WrapperConfig;
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
    assert_eq!(sa["automountServiceAccountToken"], false, "the agent does not call the API");
    assert!(
        yaml("agent-rbac.yaml").iter().all(|d| d["kind"] == "ServiceAccount"),
        "no role: nothing to grant"
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
    assert_eq!(agent["ports"][0]["containerPort"], 10555);
    let probe: Vec<&str> = agent["readinessProbe"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let socket = format!("unix://{}", NodeLayout::default().agent_socket().display());
    assert!(probe.contains(&socket.as_str()), "{probe:?}");

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

/// A stand-in for `nsenter` into the host: runs the installer's host commands against a fake
/// root and records them.
const HOST_EXEC: &str = r#"#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$1" in
  test) exec test "$2" "$FAKE_HOST$3" ;;
  cat) exec cat "$FAKE_HOST$2" ;;
  modprobe) [ "$2" = sch_plug ] && exit 1; exit 0 ;;
  systemctl) exit 0 ;;
esac
exit 127
"#;

struct FakeNode {
    dir: tempfile::TempDir,
    host: PathBuf,
}

impl FakeNode {
    fn new(with_kata: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        let files = dir.path().join("files");
        let src = dir.path().join("src");
        for d in [&host, &files, &src] {
            std::fs::create_dir_all(d).unwrap();
        }
        // What the ConfigMap mounts.
        for (key, file) in [
            ("install.sh", "node/install.sh"),
            ("containerd-katamaran.toml", "containerd/katamaran.toml"),
            ("kata-50-katamaran.toml", "kata/config.d/50-katamaran.toml"),
        ] {
            std::fs::copy(deploy().join(file), files.join(key)).unwrap();
        }
        let exe = |p: &Path, text: &str| {
            std::fs::write(p, text).unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        for b in ["containerd-shim-katamaran-v2", "katamaran-agent", "katactl"] {
            exe(&src.join(b), &format!("#!/bin/sh\necho {b}\n"));
        }
        exe(&dir.path().join("hostexec"), HOST_EXEC);
        if with_kata {
            let kata = host.join("opt/kata");
            std::fs::create_dir_all(kata.join("share/defaults/kata-containers")).unwrap();
            std::fs::create_dir_all(kata.join("bin")).unwrap();
            std::fs::write(kata.join("share/defaults/kata-containers/configuration-qemu.toml"), KATA_CONFIG)
                .unwrap();
            exe(&kata.join("bin/containerd-shim-kata-v2"), "#!/bin/sh\n");
        }
        std::fs::create_dir_all(host.join("etc/containerd")).unwrap();
        std::fs::write(host.join("etc/containerd/config.toml"), CONTAINERD_CONFIG).unwrap();
        Self { dir, host }
    }

    fn install(&self, action: &str) -> std::process::Output {
        let d = self.dir.path();
        Command::new("/bin/sh")
            .arg(d.join("files/install.sh"))
            .arg(action)
            .env("HOST_ROOT", &self.host)
            .env("SRC_BIN", d.join("src"))
            .env("FILES_DIR", d.join("files"))
            .env("HOST_IP", "10.0.0.11")
            .env("HOST_EXEC", d.join("hostexec"))
            .env("FAKE_HOST", &self.host)
            .env("FAKE_LOG", d.join("host.log"))
            .env_remove("KATA_SHIM")
            .env_remove("KATA_CONFIG")
            .env_remove("RESTART_CONTAINERD")
            .output()
            .unwrap()
    }

    fn host_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("host.log")).unwrap_or_default()
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.host.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }
}

const KATA_CONFIG: &str = "[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\n";
const CONTAINERD_CONFIG: &str =
    "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.9\"\n";

#[test]
fn installer_installs_once_and_uninstalls_cleanly() {
    let node = FakeNode::new(true);
    let run = node.install("install");
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{out}{err}");

    for b in ["containerd-shim-katamaran-v2", "katamaran-agent", "katactl"] {
        let meta = std::fs::metadata(node.host.join("opt/katamaran/bin").join(b)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{b}");
    }
    assert_eq!(node.read("opt/katamaran/kata/configuration-qemu.toml"), KATA_CONFIG, "Kata's config, copied");
    let dropin = std::fs::read_to_string(deploy().join("kata/config.d/50-katamaran.toml")).unwrap();
    assert_eq!(node.read("opt/katamaran/kata/config.d/50-katamaran.toml"), dropin);
    let runtime = std::fs::read_to_string(deploy().join("containerd/katamaran.toml")).unwrap();
    assert_eq!(node.read("etc/containerd/conf.d/katamaran.toml"), runtime);

    // The wrapper reads what the installer wrote.
    let shim_toml = node.read("etc/katamaran/shim.toml");
    let cfg =
        WrapperConfig::from_sources(Some((Path::new("shim.toml"), &shim_toml)), |_| None, None).unwrap();
    assert_eq!(cfg.delegate, Path::new("/opt/kata/bin/containerd-shim-kata-v2"));
    assert_eq!(cfg.agent, Path::new("/opt/katamaran/bin/katamaran-agent"));
    assert_eq!(cfg.node_addresses, vec!["10.0.0.11".parse::<std::net::IpAddr>().unwrap()]);

    // containerd's main config now imports conf.d, and is otherwise what it was.
    let main = node.read("etc/containerd/config.toml");
    let parsed: toml::Table = toml::from_str(&main).unwrap();
    assert_eq!(parsed["imports"].as_array().unwrap()[0].as_str(), Some("/etc/containerd/conf.d/*.toml"));
    assert!(main.ends_with(CONTAINERD_CONFIG), "{main}");

    assert!(err.contains("kernel module sch_plug not available"), "{err}");
    assert!(!err.contains("ipip not available"), "{err}");
    assert_eq!(node.host_log().matches("systemctl restart containerd").count(), 1, "{}", node.host_log());

    // Again: nothing changes, nothing restarts.
    let again = node.install("install");
    assert!(again.status.success());
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("installed"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    assert_eq!(node.host_log().matches("systemctl restart containerd").count(), 1, "idempotent");
    assert_eq!(node.read("etc/containerd/config.toml"), main);

    // Uninstall: our files go, containerd's config is as before.
    let gone = node.install("uninstall");
    assert!(gone.status.success(), "{}", String::from_utf8_lossy(&gone.stderr));
    for p in ["opt/katamaran", "etc/katamaran", "etc/containerd/conf.d/katamaran.toml"] {
        assert!(!node.host.join(p).exists(), "{p} removed");
    }
    assert_eq!(node.read("etc/containerd/config.toml"), CONTAINERD_CONFIG);
    assert!(!node.host.join("etc/containerd/config.toml.katamaran-backup").exists());
    assert_eq!(node.host_log().matches("systemctl restart containerd").count(), 2);
}

#[test]
fn installer_refuses_a_node_without_kata() {
    let node = FakeNode::new(false);
    let run = node.install("install");
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("no Kata Containers QEMU configuration on this node"), "{err}");
    assert!(!node.host.join("etc/containerd/conf.d").exists(), "containerd untouched");
    assert!(!node.host_log().contains("systemctl"), "no restart");
}

#[test]
fn installer_creates_a_missing_containerd_config_and_takes_its_line_back() {
    let node = FakeNode::new(true);
    std::fs::remove_file(node.host.join("etc/containerd/config.toml")).unwrap();
    let run = node.install("install");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let parsed: toml::Table = toml::from_str(&node.read("etc/containerd/config.toml")).unwrap();
    assert_eq!(parsed["version"].as_integer(), Some(2));
    assert_eq!(parsed["imports"].as_array().unwrap().len(), 1);
    assert!(node.install("uninstall").status.success());
    let left: toml::Table = toml::from_str(&node.read("etc/containerd/config.toml")).unwrap();
    assert!(!left.contains_key("imports"), "{left:?}");
}
