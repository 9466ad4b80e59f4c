//! The node installer (`deploy/node/install.sh`) run against a fake host root: it installs, is
//! idempotent and uninstalls; it registers the runtime in every containerd layout it meets
//! (version 2 and 3 roots, kata-deploy's `imports`, no configuration at all, an earlier
//! installer's drop-in) and exits non-zero, leaving the node as it was, when it cannot (a
//! configuration containerd cannot read or that hides the runtime, one it cannot write, version 1).
//!
//! Version 2 layouts are checked by the real containerd 1.6 installed here (`containerd --config
//! FILE config dump`, the host's absolute paths mapped into the fake root); without containerd
//! those tests print `skipped:`. containerd 2.x is not installed here: the version 3 layouts are
//! read by a stand-in that loads and merges TOML the way containerd 2.x does (python3's tomllib).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use katamaran::shim::config::WrapperConfig;
use katamaran_test_skip::{skip, Tier};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A stand-in for `nsenter` into the host: runs the installer's host commands against a fake
/// root and records them. `containerd --config PATH config dump` goes to `$FAKE_CONTAINERD PATH`.
const HOST_EXEC: &str = r#"#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$1" in
  test) exec test "$2" "$FAKE_HOST$3" ;;
  cat) exec cat "$FAKE_HOST$2" ;;
  modprobe) [ "$2" = sch_plug ] && exit 1; exit 0 ;;
  systemctl) exit 0 ;;
  containerd) [ "$2" = --config ] && [ "$4 $5" = "config dump" ] && exec "$FAKE_CONTAINERD" "$3" ;;
esac
exit 127
"#;

/// The host's containerd 1.6 reading the host's configuration: the main file is copied next to
/// itself with the absolute paths of its root `imports` moved under the fake root, so they
/// resolve there.
const REAL_CONTAINERD: &str = r#"#!/bin/sh
main="$FAKE_HOST$1"
mapped="$main.dump.toml"
awk -v host="$FAKE_HOST" '
  /^[[:space:]]*\[/ { tables = 1 }
  !tables && /^[[:space:]]*imports[[:space:]]*=/ { open = 1 }
  open { gsub(/"\//, "\"" host "/"); if (index($0, "]")) open = 0 }
  { print }
' "$main" > "$mapped"
"$REAL_CONTAINERD_BIN" --config "$mapped" config dump
rc=$?
rm -f "$mapped"
exit $rc
"#;

/// containerd 2.x's loading of a version 3 configuration, for the dump's CRI runtimes: the main
/// file, then every import (globs, relative to the main file's directory) merged in order; an
/// imported file of another version is refused (this stand-in does not migrate).
const V3_CONTAINERD: &str = r#"#!/usr/bin/env python3
import glob, json, os, re, sys, tomllib
host, main = os.environ["FAKE_HOST"], sys.argv[1]
def load(path):
    with open(host + path, "rb") as f:
        return tomllib.load(f)
def merge(into, other):
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
try:
    cfg = load(main)
    if cfg.get("version") != 3:
        sys.exit(f"{main}: version {cfg.get('version')}, this stand-in reads version 3")
    for imp in cfg.get("imports", []):
        pattern = imp if imp.startswith("/") else os.path.join(os.path.dirname(main), imp)
        for path in sorted(glob.glob(host + pattern)):
            sub = load(path[len(host):])
            if sub.get("version") != 3:
                sys.exit(f"{path}: version {sub.get('version')} imported into a version 3 configuration")
            merge(cfg, sub)
except (OSError, tomllib.TOMLDecodeError) as e:
    sys.exit(f"failed to load TOML: {e}")
def key(k):
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)
def emit(prefix, table):
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if prefix and scalars:
        print(f"[{prefix}]")
        for k, v in scalars.items():
            print(f"  {key(k)} = {json.dumps(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            emit(f"{prefix}.{key(k)}" if prefix else key(k), v)
print(f"version = 3\nimports = {json.dumps(cfg.get('imports', []))}")
emit("", {k: v for k, v in cfg.items() if isinstance(v, dict)})
"#;

/// Which containerd reads the fake host's configuration.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// The real containerd 1.6 (skips the test where it is not installed).
    Real,
    /// The version 3 stand-in.
    V3,
}

struct FakeNode {
    dir: tempfile::TempDir,
    host: PathBuf,
    containerd: Option<PathBuf>,
}

fn exe(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

impl FakeNode {
    /// A node with (or without) Kata in /opt/kata and `config` as containerd's main
    /// configuration (none: no file). `None` (after a skip line) when `reader` is not installed.
    fn new(with_kata: bool, config: Option<&str>, reader: Reader) -> Option<Self> {
        let containerd = match reader {
            Reader::Real => match on_path("containerd") {
                Some(bin) => Some(bin),
                None => {
                    skip(Tier::Containerd, "containerd is not installed (apt-get install containerd)");
                    return None;
                }
            },
            Reader::V3 => {
                if on_path("python3").is_none() {
                    skip(Tier::Containerd, "python3 is not installed (the containerd 2.x stand-in)");
                    return None;
                }
                None
            }
        };
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
        for b in ["containerd-shim-katamaran-v2", "katamaran-agent", "katactl"] {
            exe(&src.join(b), &format!("#!/bin/sh\necho {b}\n"));
        }
        exe(&dir.path().join("hostexec"), HOST_EXEC);
        exe(
            &dir.path().join("containerd"),
            if reader == Reader::Real { REAL_CONTAINERD } else { V3_CONTAINERD },
        );
        if with_kata {
            let kata = host.join("opt/kata");
            std::fs::create_dir_all(kata.join("share/defaults/kata-containers")).unwrap();
            std::fs::create_dir_all(kata.join("bin")).unwrap();
            std::fs::write(kata.join("share/defaults/kata-containers/configuration-qemu.toml"), KATA_CONFIG)
                .unwrap();
            exe(&kata.join("bin/containerd-shim-kata-v2"), "#!/bin/sh\n");
        }
        std::fs::create_dir_all(host.join("etc/containerd")).unwrap();
        if let Some(text) = config {
            std::fs::write(host.join("etc/containerd/config.toml"), text).unwrap();
        }
        Some(Self { dir, host, containerd })
    }

    /// Writes a host file (creating its directory).
    fn write(&self, path: &str, text: &str) {
        let p = self.host.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn install(&self, action: &str) -> Output {
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
            .env("FAKE_CONTAINERD", d.join("containerd"))
            .env("REAL_CONTAINERD_BIN", self.containerd.as_deref().unwrap_or(Path::new("/nonexistent")))
            .env_remove("KATA_SHIM")
            .env_remove("KATA_CONFIG")
            .env_remove("CONTAINERD")
            .env_remove("CONTAINERD_CONFIG")
            .env_remove("RESTART_CONTAINERD")
            .output()
            .unwrap()
    }

    /// What containerd makes of the host's configuration now (`config dump`, parsed).
    fn dump(&self) -> toml::Table {
        let d = self.dir.path();
        let out = Command::new(d.join("containerd"))
            .arg("/etc/containerd/config.toml")
            .env("FAKE_HOST", &self.host)
            .env("REAL_CONTAINERD_BIN", self.containerd.as_deref().unwrap_or(Path::new("/nonexistent")))
            .output()
            .unwrap();
        assert!(out.status.success(), "config dump: {}", String::from_utf8_lossy(&out.stderr));
        toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()
    }

    fn host_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("host.log")).unwrap_or_default()
    }

    fn restarts(&self) -> usize {
        self.host_log().matches("systemctl restart containerd").count()
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.host.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }
}

/// The CRI runtimes containerd sees (`cri` = the plugin holding them in that version).
fn runtimes<'t>(dump: &'t toml::Table, cri: &str) -> &'t toml::Table {
    dump["plugins"][cri]["containerd"]["runtimes"]
        .as_table()
        .unwrap_or_else(|| panic!("no runtimes: {dump:#?}"))
}

const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.runtime";

/// Asserts containerd sees katamaran's runtime with the wrapper's type and path.
fn assert_registered(dump: &toml::Table, cri: &str) {
    let rt = &runtimes(dump, cri)["kata-katamaran"];
    assert_eq!(rt["runtime_type"].as_str(), Some("io.containerd.katamaran.v2"), "{rt:#?}");
    assert_eq!(rt["runtime_path"].as_str(), Some("/opt/katamaran/bin/containerd-shim-katamaran-v2"));
    assert_eq!(rt["options"]["ConfigPath"].as_str(), Some("/opt/katamaran/kata/configuration-qemu.toml"));
}

fn ok(run: &Output) -> (String, String) {
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "install.sh failed:\n{out}{err}");
    (out.into_owned(), err.into_owned())
}

const KATA_CONFIG: &str = "[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\n";
/// A node's containerd 1.6 configuration: its own CRI settings, which must survive the install.
const CONTAINERD_CONFIG: &str = r#"version = 2

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"#;

/// kata-deploy's drop-in (what it writes to /opt/kata/containerd/config.d/kata-deploy.toml).
fn kata_deploy_dropin(cri: &str, version: u8) -> String {
    format!(
        "version = {version}\n\n[plugins.\"{cri}\".containerd.runtimes.kata-qemu]\n  runtime_type = \
         \"io.containerd.kata-qemu.v2\"\n  runtime_path = \"/opt/kata/bin/containerd-shim-kata-v2\"\n"
    )
}

/// The runtime block install.sh appends, as `install.sh` marks it.
fn block(config: &str) -> &str {
    let start =
        config.find("# BEGIN katamaran runtime").unwrap_or_else(|| panic!("no runtime block:\n{config}"));
    &config[start..]
}

#[test]
fn installer_installs_once_and_uninstalls_cleanly() {
    let Some(node) = FakeNode::new(true, Some(CONTAINERD_CONFIG), Reader::Real) else { return };
    let (out, err) = ok(&node.install("install"));

    for b in ["containerd-shim-katamaran-v2", "katamaran-agent", "katactl"] {
        let meta = std::fs::metadata(node.host.join("opt/katamaran/bin").join(b)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{b}");
    }
    assert_eq!(node.read("opt/katamaran/kata/configuration-qemu.toml"), KATA_CONFIG, "Kata's config, copied");
    let dropin = std::fs::read_to_string(deploy().join("kata/config.d/50-katamaran.toml")).unwrap();
    assert_eq!(node.read("opt/katamaran/kata/config.d/50-katamaran.toml"), dropin);

    // The wrapper reads what the installer wrote.
    let shim_toml = node.read("etc/katamaran/shim.toml");
    let cfg =
        WrapperConfig::from_sources(Some((Path::new("shim.toml"), &shim_toml)), |_| None, None).unwrap();
    assert_eq!(cfg.delegate, Path::new("/opt/kata/bin/containerd-shim-kata-v2"));
    assert_eq!(cfg.agent, Path::new("/opt/katamaran/bin/katamaran-agent"));
    assert_eq!(cfg.node_addresses, vec!["10.0.0.11".parse::<std::net::IpAddr>().unwrap()]);

    // containerd's main config is what it was plus the runtime tables; containerd 1.6 itself sees
    // the runtime next to the node's own CRI settings (a drop-in import would have replaced
    // those), and the installer asked it before restarting it.
    let main = node.read("etc/containerd/config.toml");
    assert!(main.starts_with(CONTAINERD_CONFIG), "{main}");
    assert!(block(&main).contains("runtime_type = \"io.containerd.katamaran.v2\""), "{main}");
    let dump = node.dump();
    assert_registered(&dump, CRI_V2);
    assert_eq!(
        dump["plugins"][CRI_V2]["sandbox_image"].as_str(),
        Some("pause:3.9"),
        "the node's CRI settings stay"
    );
    assert_eq!(runtimes(&dump, CRI_V2)["runc"]["options"]["SystemdCgroup"].as_bool(), Some(true));
    let log = node.host_log();
    let asked =
        log.find("containerd --config /etc/containerd/config.toml config dump").expect("asked containerd");
    assert!(asked < log.find("systemctl restart containerd").unwrap(), "checked before the restart: {log}");
    assert!(out.contains("containerd sees runtime kata-katamaran"), "{out}");
    assert!(!node.host.join("etc/containerd/conf.d").exists(), "no drop-in");

    assert!(err.contains("kernel module sch_plug not available"), "{err}");
    assert!(!err.contains("ipip not available"), "{err}");
    assert_eq!(node.restarts(), 1, "{}", node.host_log());

    // Again: nothing changes, nothing restarts.
    let (again, _) = ok(&node.install("install"));
    assert!(!again.contains("installed") && !again.contains("added"), "{again}");
    assert_eq!(node.restarts(), 1, "idempotent");
    assert_eq!(node.read("etc/containerd/config.toml"), main);

    // Uninstall: our files go, containerd's config is as before.
    ok(&node.install("uninstall"));
    for p in ["opt/katamaran", "etc/katamaran"] {
        assert!(!node.host.join(p).exists(), "{p} removed");
    }
    assert_eq!(node.read("etc/containerd/config.toml"), CONTAINERD_CONFIG);
    assert!(!node.host.join("etc/containerd/config.toml.katamaran-backup").exists());
    assert_eq!(node.restarts(), 2);
}

#[test]
fn installer_refuses_a_node_without_kata() {
    let Some(node) = FakeNode::new(false, Some(CONTAINERD_CONFIG), Reader::Real) else { return };
    let run = node.install("install");
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("no Kata Containers QEMU configuration on this node"), "{err}");
    assert_eq!(node.read("etc/containerd/config.toml"), CONTAINERD_CONFIG, "containerd untouched");
    assert!(!node.host_log().contains("systemctl"), "no restart");
}

#[test]
fn installer_creates_a_missing_containerd_config_and_takes_it_back() {
    let Some(node) = FakeNode::new(true, None, Reader::Real) else { return };
    ok(&node.install("install"));
    let parsed: toml::Table = toml::from_str(&node.read("etc/containerd/config.toml")).unwrap();
    assert_eq!(parsed["version"].as_integer(), Some(2));
    assert_registered(&node.dump(), CRI_V2);
    ok(&node.install("uninstall"));
    assert!(!node.host.join("etc/containerd/config.toml").exists(), "the file install created is gone");
}

#[test]
fn installer_replaces_an_earlier_installs_drop_in_import() {
    // What installers before this one left: a conf.d import on top and the runtime drop-in, with
    // which containerd 1.6 lost the node's CRI settings.
    let earlier =
        format!("imports = [\"/etc/containerd/conf.d/*.toml\"]  # added by katamaran\n{CONTAINERD_CONFIG}");
    let Some(node) = FakeNode::new(true, Some(&earlier), Reader::Real) else { return };
    node.write(
        "etc/containerd/conf.d/katamaran.toml",
        &std::fs::read_to_string(deploy().join("containerd/katamaran.toml")).unwrap(),
    );
    ok(&node.install("install"));
    assert!(!node.host.join("etc/containerd/conf.d/katamaran.toml").exists(), "the old drop-in is gone");
    let main = node.read("etc/containerd/config.toml");
    assert!(!main.contains("imports"), "{main}");
    let dump = node.dump();
    assert_registered(&dump, CRI_V2);
    assert_eq!(dump["plugins"][CRI_V2]["sandbox_image"].as_str(), Some("pause:3.9"));
}

#[test]
fn installer_keeps_kata_deploys_imports_in_a_containerd_2_config() {
    // containerd 2.x: version 3, runtimes under the CRI runtime plugin; kata-deploy imports its
    // drop-in (tomlq writes the array over several lines), and containerd 2.x merges it deeply.
    let main = "version = 3\nimports = [\n  \"/opt/kata/containerd/config.d/kata-deploy.toml\",\n]\n\n\
                [plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"pause:3.10\"\n";
    let Some(node) = FakeNode::new(true, Some(main), Reader::V3) else { return };
    node.write("opt/kata/containerd/config.d/kata-deploy.toml", &kata_deploy_dropin(CRI_V3, 3));
    ok(&node.install("install"));

    let written = node.read("etc/containerd/config.toml");
    assert!(written.starts_with(main), "kata-deploy's imports untouched:\n{written}");
    assert!(!block(&written).contains(CRI_V2), "version 3 syntax only:\n{written}");
    let dump = node.dump();
    assert_registered(&dump, CRI_V3);
    assert_eq!(
        runtimes(&dump, CRI_V3)["kata-qemu"]["runtime_type"].as_str(),
        Some("io.containerd.kata-qemu.v2")
    );
    assert_eq!(
        dump["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(),
        Some("pause:3.10")
    );
    assert_eq!(node.restarts(), 1);

    ok(&node.install("install"));
    assert_eq!(node.restarts(), 1, "idempotent");
    ok(&node.install("uninstall"));
    assert_eq!(node.read("etc/containerd/config.toml"), main);
}

#[test]
fn installer_fails_where_an_import_replaces_the_cri_section_on_containerd_1() {
    // containerd 1.6 merges an imported file a whole plugin at a time: a drop-in naming the CRI
    // plugin (kata-deploy's, were it used before containerd 2.0) replaces the runtime tables of
    // the main file. The installer cannot register there, says why, and leaves the node as it was.
    let main = "version = 2\nimports = [\"/opt/kata/containerd/config.d/kata-deploy.toml\"]\n";
    let Some(node) = FakeNode::new(true, Some(main), Reader::Real) else { return };
    node.write("opt/kata/containerd/config.d/kata-deploy.toml", &kata_deploy_dropin(CRI_V2, 2));
    let run = node.install("install");
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("containerd does not see runtime kata-katamaran"), "{err}");
    assert!(err.contains("merges imports a whole plugin at a time"), "{err}");
    assert_eq!(node.read("etc/containerd/config.toml"), main, "the original is back");
    assert!(!node.host_log().contains("systemctl"), "no restart");
}

#[test]
fn installer_fails_and_restores_a_config_containerd_cannot_read() {
    let broken = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"\n  sandbox_image = \"pause\"\n";
    let Some(node) = FakeNode::new(true, Some(broken), Reader::Real) else { return };
    let run = node.install("install");
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("containerd cannot read /etc/containerd/config.toml"), "{err}");
    assert_eq!(node.read("etc/containerd/config.toml"), broken, "the original is back");
    assert!(!node.host_log().contains("systemctl"), "no restart");
}

#[test]
fn installer_fails_on_a_config_it_cannot_write() {
    // As root nothing is read-only in a temp dir: a directory where the installer writes its new
    // file stands for a host path it cannot write.
    let Some(node) = FakeNode::new(true, Some(CONTAINERD_CONFIG), Reader::Real) else { return };
    std::fs::create_dir_all(node.host.join("etc/containerd/config.toml.katamaran-new/x")).unwrap();
    let run = node.install("install");
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write /etc/containerd/config.toml on the host"), "{err}");
    assert_eq!(node.read("etc/containerd/config.toml"), CONTAINERD_CONFIG);
    assert!(!node.host_log().contains("systemctl"), "no restart");
}

#[test]
fn installer_refuses_a_version_1_config_and_an_unknown_version() {
    for (config, says) in [
        ("[plugins.cri]\n  sandbox_image = \"pause\"\n", "version 1 configuration"),
        ("version = 4\n", "has version = 4"),
    ] {
        let Some(node) = FakeNode::new(true, Some(config), Reader::Real) else { return };
        let run = node.install("install");
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(node.read("etc/containerd/config.toml"), config);
        assert!(!node.host_log().contains("systemctl"), "no restart");
    }
}
