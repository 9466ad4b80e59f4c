//! The node agent exactly as `deploy/daemonset.yaml` runs it: the manifest is parsed (the
//! Kubernetes types of `k8s-openapi`) and its agent container turned into an OCI runtime spec
//! (`oci-spec`) the way kubelet and containerd's CRI plugin would, for runc under a real
//! containerd ([`crate::containerd`]). A change to the manifest — an argument, a volume, its
//! mount propagation, hostPID, the network namespace — changes what the deployment-shaped lab
//! runs.
//!
//! What stands for what (docs/INSTALL.md, "What the tests run"):
//! - **the host** is a lab node: `hostPath` volumes are the node's files under
//!   `<lab>/<node>/` ([`NodeHost::host_path`]), except the machine-wide kernel interfaces
//!   [`MACHINE_WIDE`]; the node's root is a shared mount, as systemd makes `/`, so that
//!   `Bidirectional` volumes propagate both ways;
//! - **pid 1** (`/proc/1` in the arguments) is [`NodeInit`], a process in the node's network
//!   namespace that otherwise shares the machine's mount and cgroup namespaces;
//! - `status.hostIP` is the node's address;
//! - **the image** (`deploy/image/Dockerfile`: debian:12-slim, util-linux, the binaries in
//!   `/usr/local/bin`) is a root with the release binaries, this Debian 12 machine's `/usr` and
//!   `/etc` mounted read-only ([`Image`]);
//! - the lab's guest image and shared storage, which a node has under `/opt/kata` and its
//!   storage mounts, are mounted at their own paths ([`Extras`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder,
    RootBuilder, Spec, SpecBuilder, UserBuilder,
};

/// The manifest, relative to the workspace root.
pub const MANIFEST: &str = "deploy/daemonset.yaml";
/// The container of the DaemonSet that serves the migration service.
pub const AGENT_CONTAINER: &str = "agent";
/// Host paths the lab keeps machine-wide: the kernel's interfaces, and iproute2's directory of
/// named network namespaces (where the lab's pod namespaces are). Every other `hostPath` is the
/// node's own, under its root.
pub const MACHINE_WIDE: [&str; 3] = ["/proc", "/dev", "/run/netns"];
/// `PATH` of debian:12-slim, the image's base.
const IMAGE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// What of this machine's root stands for the image's base, bound read-only: merged `/usr` (Debian 12);
/// `/etc` is copied into the root ([`Image::build`]).
const IMAGE_BASE: [&str; 6] =
    ["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/share"];

/// Why the manifest could not become a runtime spec.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The manifest could not be read.
    #[error("could not read {path}")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not a DaemonSet.
    #[error("{path} is not a DaemonSet: {message}")]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The manifest lacks what a pod needs.
    #[error("the DaemonSet has no {0}")]
    Missing(String),
    /// The manifest uses what this translation does not know; it refuses rather than guess.
    #[error("unsupported in the manifest: {0}")]
    Unsupported(String),
    /// A host directory could not be prepared.
    #[error("hostPath {path}")]
    HostPath {
        /// The node's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image root could not be built.
    #[error("could not build the image root at {path}")]
    Image {
        /// What failed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// oci-spec refused a value.
    #[error("building the runtime spec")]
    Spec(#[from] oci_spec::OciSpecError),
    /// The stand-in for pid 1 could not start.
    #[error("could not start the node's pid 1 stand-in in {netns}")]
    Init {
        /// The node's namespace.
        netns: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads and parses the DaemonSet at `path`.
///
/// # Errors
/// When it cannot be read or is not one DaemonSet.
pub fn load(path: &Path) -> Result<DaemonSet, DeployError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| DeployError::Read { path: path.into(), source })?;
    serde_saphyr::from_str::<DaemonSet>(&text)
        .map_err(|e| DeployError::Parse { path: path.into(), message: e.to_string() })
}

/// The pod template's spec.
///
/// # Errors
/// When the DaemonSet has none.
pub fn pod_spec(ds: &DaemonSet) -> Result<&PodSpec, DeployError> {
    ds.spec.template.spec.as_ref().ok_or_else(|| DeployError::Missing("spec.template.spec".into()))
}

/// The container named `name` (not an init container).
///
/// # Errors
/// When there is none.
pub fn container<'a>(pod: &'a PodSpec, name: &str) -> Result<&'a Container, DeployError> {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| DeployError::Missing(format!("container {name:?}")))
}

/// The node a container runs on, as seen from the container's host side.
#[derive(Debug, Clone)]
pub struct NodeHost {
    /// Where the node's files live.
    pub root: PathBuf,
    /// The process standing for the node's pid 1 ([`NodeInit`]).
    pub init_pid: u32,
    /// `status.hostIP`.
    pub host_ip: IpAddr,
    /// The pod's name (the container's hostname).
    pub pod_name: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// The cgroup the container gets (cgroupfs path), as kubelet's pod cgroup.
    pub cgroup: String,
}

impl NodeHost {
    /// Where `hostPath` `path` is: the machine's own for [`MACHINE_WIDE`] paths, else under the
    /// node's root.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        if MACHINE_WIDE.iter().any(|w| path.starts_with(w)) {
            return path.to_owned();
        }
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// `arg` with the node's pid 1 where the manifest names `/proc/1` (a flag's value or a
    /// whole argument).
    fn pid1(&self, arg: &str) -> String {
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with('-') => (Some(f), v),
            _ => (None, arg),
        };
        let value = match value.strip_prefix("/proc/1") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                format!("/proc/{}{rest}", self.init_pid)
            }
            _ => value.to_owned(),
        };
        match flag {
            Some(f) => format!("{f}={value}"),
            None => value,
        }
    }
}

/// The image: a root with the binaries in `/usr/local/bin`, and what of the machine stands for
/// its base, mounted read-only at the same paths.
#[derive(Debug, Clone)]
pub struct Image {
    /// The root directory.
    pub rootfs: PathBuf,
    /// Read-only binds of the machine's base system.
    pub base: Vec<PathBuf>,
}

impl Image {
    /// Builds the root in `dir` with `binaries` copied into `usr/local/bin`.
    ///
    /// # Errors
    /// When a directory, link or copy fails.
    pub fn build(dir: &Path, binaries: &[&Path]) -> Result<Self, DeployError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| DeployError::Image { path, source }
        };
        let bin = dir.join("usr/local/bin");
        std::fs::create_dir_all(&bin).map_err(err(&bin))?;
        // The host's /etc is copied, not bound: the image's own directories under it (the CA
        // Secret's mount point) must exist in this root, which is mounted read-only.
        let etc = dir.join("etc");
        if !etc.exists() {
            let copied = std::process::Command::new("cp").arg("-a").arg("/etc").arg(&etc).status();
            match copied {
                Ok(s) if s.success() => {}
                Ok(s) => return Err(err(&etc)(std::io::Error::other(format!("cp -a /etc: {s}")))),
                Err(e) => return Err(err(&etc)(e)),
            }
        }
        // Mount points of the DaemonSet's volumes that the base image does not have: the real
        // image has them too (deploy/image/Dockerfile).
        for sub in ["proc", "sys", "dev", "run", "var", "tmp", "opt", "root", "etc/katamaran/ca"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(err(&d))?;
        }
        for link in ["bin", "sbin", "lib", "lib64"] {
            let l = dir.join(link);
            if !l.exists() {
                std::os::unix::fs::symlink(format!("usr/{link}"), &l).map_err(err(&l))?;
            }
        }
        for b in binaries {
            let to = bin.join(b.file_name().unwrap_or(b.as_os_str()));
            std::fs::copy(b, &to).map_err(err(&to))?;
        }
        let base = IMAGE_BASE.iter().map(PathBuf::from).filter(|p| p.is_dir()).collect();
        Ok(Self { rootfs: dir.to_owned(), base })
    }
}

/// What the lab adds to the manifest's container, each for a reason documented at its caller.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Directories mounted at their own paths: (path, writable).
    pub binds: Vec<(PathBuf, bool)>,
    /// Environment appended after the manifest's.
    pub env: Vec<(String, String)>,
    /// The Secrets the manifest's `secret` volumes name: Secret name → (key, content).
    pub secrets: HashMap<String, Vec<(String, Vec<u8>)>>,
}

/// Kubernetes `$(VAR)` expansion of `s` with `env`: a defined variable is replaced, `$$` is a
/// literal `$`, anything else stays as written.
pub fn expand(s: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        if let Some(t) = tail.strip_prefix('$') {
            out.push('$');
            rest = t;
        } else if let Some((name, after)) = tail.strip_prefix('(').and_then(|t| t.split_once(')')) {
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = after;
        } else {
            out.push('$');
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment, in order, with `valueFrom` resolved for this node.
fn environment(c: &Container, host: &NodeHost) -> Result<Vec<(String, String)>, DeployError> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => {
                let known: HashMap<String, String> = env.iter().cloned().collect();
                expand(v, &known)
            }
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("status.hostIP") => host.host_ip.to_string(),
                Some("metadata.name") => host.pod_name.clone(),
                Some("spec.nodeName") => host.node_name.clone(),
                other => {
                    return Err(DeployError::Unsupported(format!(
                    "env {}: valueFrom {other:?} (status.hostIP, metadata.name and spec.nodeName are known)",
                    var.name
                )))
                }
            },
            (None, None) => String::new(),
            (Some(_), Some(_)) => {
                return Err(DeployError::Unsupported(format!("env {}: both value and valueFrom", var.name)))
            }
        };
        env.push((var.name.clone(), value));
    }
    if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(DeployError::Unsupported("envFrom".into()));
    }
    Ok(env)
}

/// Every capability this process may hold (its bounding set), as containerd gives a privileged
/// container the capabilities of the runtime itself.
fn all_capabilities() -> Vec<Capability> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
        .filter_map(|(_, n)| serde_json::from_value(serde_json::Value::String(format!("CAP_{n}"))).ok())
        .collect()
}

/// A bind mount.
fn bind(destination: &Path, source: &Path, options: &[&str]) -> Result<Mount, DeployError> {
    let mut opts = vec!["rbind".to_owned()];
    opts.extend(options.iter().map(|o| (*o).to_owned()));
    Ok(MountBuilder::default().destination(destination).typ("bind").source(source).options(opts).build()?)
}

/// A kernel filesystem mount.
fn kernel_fs(destination: &str, typ: &str, options: &[&str]) -> Result<Mount, DeployError> {
    Ok(MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(typ)
        .options(options.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>())
        .build()?)
}

/// The runtime's own mounts (containerd's defaults); `/sys` and its cgroups writable for a
/// privileged container.
fn default_mounts(privileged: bool) -> Result<Vec<Mount>, DeployError> {
    let rw = if privileged { "rw" } else { "ro" };
    Ok(vec![
        kernel_fs("/proc", "proc", &["nosuid", "noexec", "nodev"])?,
        kernel_fs("/dev", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"])?,
        kernel_fs(
            "/dev/pts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        )?,
        kernel_fs("/dev/shm", "tmpfs", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"])?,
        kernel_fs("/dev/mqueue", "mqueue", &["nosuid", "noexec", "nodev"])?,
        kernel_fs("/sys", "sysfs", &["nosuid", "noexec", "nodev", rw])?,
        kernel_fs("/sys/fs/cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", rw])?,
    ])
}

/// The propagation option for a volume mount's `mountPropagation`.
fn propagation(mode: Option<&str>) -> Result<&'static str, DeployError> {
    match mode {
        None | Some("None") => Ok("rprivate"),
        Some("HostToContainer") => Ok("rslave"),
        Some("Bidirectional") => Ok("rshared"),
        Some(other) => Err(DeployError::Unsupported(format!("mountPropagation {other}"))),
    }
}

/// A `secret` volume as kubelet makes it: a directory of the pod's with one file per key of the
/// Secret (from [`Extras::secrets`]), mode `defaultMode` (0644 by default).
fn secret_volume(
    host: &NodeHost,
    volume: &str,
    secret: &k8s_openapi::api::core::v1::SecretVolumeSource,
    extras: &Extras,
) -> Result<PathBuf, DeployError> {
    use std::os::unix::fs::PermissionsExt;
    let name = secret.secret_name.clone().unwrap_or_default();
    if secret.items.is_some() {
        return Err(DeployError::Unsupported(format!("items of secret volume {volume}")));
    }
    let files = extras.secrets.get(&name).ok_or_else(|| {
        DeployError::Missing(format!("Secret {name:?} (volume {volume}) in the lab's extras"))
    })?;
    let dir = host
        .root
        .join("var/lib/kubelet/pods")
        .join(&host.pod_name)
        .join("volumes/kubernetes.io~secret")
        .join(volume);
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| DeployError::HostPath { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(err(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(err(&dir))?;
    let mode = secret.default_mode.and_then(|m| u32::try_from(m).ok()).unwrap_or(0o644);
    for (key, content) in files {
        let path = dir.join(key);
        std::fs::write(&path, content).map_err(err(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(err(&path))?;
    }
    Ok(dir)
}

/// The runtime spec of container `name` of the DaemonSet on `host`, from `image`, with the
/// lab's `extras`. Creates the `DirectoryOrCreate` host directories, as kubelet does.
///
/// # Errors
/// When the manifest lacks the container, uses what this translation does not know (refused
/// rather than guessed), or a `Directory` host path is missing.
pub fn runtime_spec(
    ds: &DaemonSet,
    name: &str,
    host: &NodeHost,
    image: &Image,
    extras: &Extras,
) -> Result<Spec, DeployError> {
    let pod = pod_spec(ds)?;
    let c = container(pod, name)?;
    let sc = c.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    if !privileged {
        return Err(DeployError::Unsupported(format!(
            "container {name} is not privileged (only privileged is translated)"
        )));
    }

    // Environment and arguments ($(VAR) from the container's env, as kubelet expands them).
    let mut env = environment(c, host)?;
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(|a| host.pid1(&expand(a, &vars)))
        .collect();
    if argv.is_empty() {
        return Err(DeployError::Missing(format!("command for container {name}")));
    }
    env.extend(extras.env.iter().cloned());
    let env: Vec<String> =
        std::iter::once(IMAGE_PATH.to_owned()).chain(env.iter().map(|(k, v)| format!("{k}={v}"))).collect();

    // Volumes: hostPath, and secret (the agents' CA) made from the lab's extras.
    let mut volume_mounts = Vec::new();
    let mut shared = false;
    let mut slave = false;
    for vm in c.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == vm.name)
            .ok_or_else(|| DeployError::Missing(format!("volume {:?} mounted by {name}", vm.name)))?;
        if let Some(secret) = &volume.secret {
            let source = secret_volume(host, &volume.name, secret, extras)?;
            let ro = if vm.read_only.unwrap_or(false) { "ro" } else { "rw" };
            volume_mounts.push(bind(Path::new(&vm.mount_path), &source, &[ro, "rprivate"])?);
            continue;
        }
        let hp = volume
            .host_path
            .as_ref()
            .ok_or_else(|| DeployError::Unsupported(format!("volume {} is not a hostPath", volume.name)))?;
        if vm.sub_path.is_some() || vm.sub_path_expr.is_some() {
            return Err(DeployError::Unsupported(format!("subPath on volume {}", vm.name)));
        }
        let source = host.host_path(Path::new(&hp.path));
        match hp.type_.as_deref() {
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&source)
                .map_err(|e| DeployError::HostPath { path: source.clone(), source: e })?,
            Some("Directory") if source.is_dir() => {}
            Some("Directory") => {
                return Err(DeployError::HostPath {
                    path: source.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "type Directory: not a directory",
                    ),
                })
            }
            None | Some("") if source.exists() => {}
            other => {
                return Err(DeployError::Unsupported(format!("hostPath type {other:?} of {}", volume.name)))
            }
        }
        let prop = propagation(vm.mount_propagation.as_deref())?;
        shared |= prop == "rshared";
        slave |= prop == "rslave";
        let ro = if vm.read_only.unwrap_or(false) { "ro" } else { "rw" };
        volume_mounts.push(bind(Path::new(&vm.mount_path), &source, &[ro, prop])?);
    }
    for (path, writable) in &extras.binds {
        volume_mounts.push(bind(path, path, &[if *writable { "rw" } else { "ro" }, "rprivate"])?);
    }

    // containerd's defaults, less those a volume replaces (all of /dev when /dev is a volume),
    // then the image, then the volumes, parents before children.
    let dests: Vec<PathBuf> = volume_mounts.iter().map(|m| m.destination().clone()).collect();
    let dev_volume = dests.iter().any(|d| d == Path::new("/dev"));
    let mut mounts: Vec<Mount> = default_mounts(privileged)?
        .into_iter()
        .filter(|m| !dests.contains(m.destination()))
        .filter(|m| !(dev_volume && m.destination().starts_with("/dev/")))
        .collect();
    for base in &image.base {
        mounts.push(bind(base, base, &["ro", "rprivate"])?);
    }
    volume_mounts.sort_by_key(|m| m.destination().components().count());
    mounts.extend(volume_mounts);

    let mut namespaces = vec![LinuxNamespaceType::Mount, LinuxNamespaceType::Uts];
    if !pod.host_ipc.unwrap_or(false) {
        namespaces.push(LinuxNamespaceType::Ipc);
    }
    if !pod.host_network.unwrap_or(false) {
        namespaces.push(LinuxNamespaceType::Network);
    }
    if !pod.host_pid.unwrap_or(false) {
        namespaces.push(LinuxNamespaceType::Pid);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
        .collect::<Result<Vec<_>, _>>()?;

    // Resources as kubelet sets them: cpu shares from the request; memory only has a request.
    let milli = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("cpu"))
        .map(|q| cpu_millis(&q.0))
        .transpose()?;
    let mut resources = LinuxResourcesBuilder::default()
        .devices(vec![LinuxDeviceCgroupBuilder::default().allow(true).access("rwm").build()?]);
    if let Some(m) = milli {
        resources = resources.cpu(LinuxCpuBuilder::default().shares((m * 1024 / 1000).max(2)).build()?);
    }

    let caps: std::collections::HashSet<Capability> = all_capabilities().into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(argv)
        .env(env)
        .cwd(c.working_dir.clone().unwrap_or_else(|| "/".into()))
        .capabilities(capabilities)
        .no_new_privileges(false)
        .build()?;
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build()?)
        .cgroups_path(PathBuf::from(&host.cgroup))
        // Privileged: nothing masked or read-only, no seccomp.
        .masked_paths(Vec::<String>::new())
        .readonly_paths(Vec::<String>::new());
    // As containerd's CRI plugin: the root's propagation follows the most open volume.
    if shared {
        linux = linux.rootfs_propagation("rshared");
    } else if slave {
        linux = linux.rootfs_propagation("rslave");
    }
    Ok(SpecBuilder::default()
        .version("1.0.2")
        .root(RootBuilder::default().path(&image.rootfs).readonly(false).build()?)
        .hostname(host.pod_name.clone())
        .process(process)
        .mounts(mounts)
        .linux(linux.build()?)
        .build()?)
}

/// A Kubernetes CPU quantity in millicores (`50m`, `1`, `0.5`).
fn cpu_millis(q: &str) -> Result<u64, DeployError> {
    let bad = || DeployError::Unsupported(format!("cpu quantity {q:?}"));
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| bad());
    }
    let cores: f64 = q.parse().map_err(|_| bad())?;
    if !(cores.is_finite() && cores >= 0.0) {
        return Err(bad());
    }
    Ok((cores * 1000.0).round() as u64)
}

/// A container probe the lab can run the way kubelet does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `exec`: the command, run in the container.
    Exec(Vec<String>),
    /// `httpGet`: a GET of `path` on `port` of the pod (the lab's pod namespace has only
    /// loopback, where kubelet would dial the pod's address); ready on 200.
    HttpGet {
        /// The request path.
        path: String,
        /// The port.
        port: u16,
    },
}

/// The container's `readinessProbe`, which the lab runs to know when the agent is ready.
///
/// # Errors
/// [`DeployError::Missing`] without one; [`DeployError::Unsupported`] for a kind or a field the
/// lab does not run (tcpSocket, grpc, a named port, a host, HTTPS, headers).
pub fn readiness_probe(c: &Container) -> Result<Probe, DeployError> {
    let p = c.readiness_probe.as_ref().ok_or_else(|| DeployError::Missing("readinessProbe".into()))?;
    if let Some(exec) = &p.exec {
        let cmd = exec.command.clone().filter(|c| !c.is_empty());
        return cmd
            .map(Probe::Exec)
            .ok_or_else(|| DeployError::Missing("readinessProbe.exec.command".into()));
    }
    let Some(get) = &p.http_get else {
        return Err(DeployError::Unsupported("a readinessProbe other than exec or httpGet".into()));
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let port = match &get.port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|n| *n > 0),
        IntOrString::String(_) => None,
    }
    .ok_or_else(|| DeployError::Unsupported(format!("readinessProbe.httpGet.port {:?}", get.port)))?;
    if get.host.is_some() || get.http_headers.is_some() || get.scheme.as_deref().is_some_and(|s| s != "HTTP")
    {
        return Err(DeployError::Unsupported("readinessProbe.httpGet with a host, headers or HTTPS".into()));
    }
    Ok(Probe::HttpGet { path: get.path.clone().unwrap_or_else(|| "/".into()), port })
}

/// A process standing for a lab node's pid 1: in the node's network namespace, and otherwise in
/// the machine's namespaces (`nsenter --net` changes nothing else). Killed when dropped.
#[derive(Debug)]
pub struct NodeInit {
    child: Child,
}

impl NodeInit {
    /// Starts it in `/run/netns/<netns>`.
    ///
    /// # Errors
    /// When `nsenter` cannot start.
    pub fn start(netns: &str) -> Result<Self, DeployError> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| DeployError::Init { netns: netns.to_owned(), source })?;
        Ok(Self { child })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeInit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node's root made a shared mount (bound onto itself), as systemd makes `/`: kubelet
/// refuses `Bidirectional` volumes from a host path that is not on a shared mount, and
/// propagation back to the host needs it. Unmounted when dropped.
#[derive(Debug)]
pub struct SharedRoot {
    path: PathBuf,
}

impl SharedRoot {
    /// Binds `path` onto itself and makes it recursively shared.
    ///
    /// # Errors
    /// When a mount call fails.
    pub fn make(path: &Path) -> Result<Self, DeployError> {
        use nix::mount::{mount, MsFlags};
        let err = |e: nix::Error| DeployError::HostPath { path: path.to_owned(), source: e.into() };
        std::fs::create_dir_all(path)
            .map_err(|source| DeployError::HostPath { path: path.to_owned(), source })?;
        mount(Some(path), path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(err)?;
        let me = Self { path: path.to_owned() };
        mount(None::<&str>, path, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>)
            .map_err(err)?;
        Ok(me)
    }
}

impl Drop for SharedRoot {
    fn drop(&mut self) {
        // Everything mounted under it (netns bind mounts of VMs that outlived their agent are
        // the lab's to remove), then the root itself.
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Why the deployment-shaped lab could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum DeployedLabError {
    /// The manifest could not be translated.
    #[error(transparent)]
    Deploy(#[from] DeployError),
    /// containerd or `ctr` failed.
    #[error(transparent)]
    Ctr(#[from] crate::containerd::CtrError),
    /// A lab helper failed.
    #[error(transparent)]
    Lab(#[from] crate::LabError),
    /// The agents' CA could not be made.
    #[error("the agents' CA")]
    Ca(#[from] katamaran::peer::Error),
    /// An agent container has no running task.
    #[error("the {node} agent container does not run")]
    NotRunning {
        /// Which node.
        node: &'static str,
    },
    /// An agent container did not become ready.
    #[error("the {node} agent container was not ready within {limit:?}: {last}; its log ends with:\n{log}")]
    NotReady {
        /// Which node.
        node: &'static str,
        /// How long it had.
        limit: std::time::Duration,
        /// The readiness probe's last answer.
        last: String,
        /// The end of the container's log.
        log: String,
    },
}

/// How long an agent container has to pass its readiness probe.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Both lab nodes running the agent the way `deploy/daemonset.yaml` declares it: one container
/// per node under a private containerd, from [`runtime_spec`]. Dropping it removes the
/// containers, then the nodes' shared mounts and pid 1 stand-ins.
#[derive(Debug)]
pub struct DeployedAgents {
    // Drop order: the containers before the mounts and processes they use.
    containerd: crate::containerd::Containerd,
    _shared: Vec<SharedRoot>,
    _inits: Vec<NodeInit>,
    hosts: Vec<NodeHost>,
    manifest: DaemonSet,
    image: Image,
    extras: Extras,
    ca: katamaran::peer::ClusterCa,
    logs: PathBuf,
    execs: std::sync::atomic::AtomicU32,
}

impl DeployedAgents {
    /// Prepares both nodes as hosts (their roots shared mounts, Kata's and containerd's run
    /// directories, `/opt/kata/bin/qemu-system-x86_64` standing for Kata's QEMU), builds the
    /// image from `bins`, starts containerd under the lab's root and both agent containers.
    ///
    /// # Errors
    /// When a step fails or an agent does not become ready.
    pub fn start(lab: &crate::Lab, bins: &crate::agents::EngineBins) -> Result<Self, DeployedLabError> {
        use crate::Node;
        let manifest = load(&crate::artifacts::workspace_root().join(MANIFEST))?;
        let image = Image::build(&lab.root().join("image"), &[&bins.agent, &bins.katactl])?;
        let qemu = katamaran::shim::config::find_program(
            Path::new("qemu-system-x86_64"),
            std::env::var_os("PATH").as_deref(),
        )
        .ok_or_else(|| DeployError::Missing("qemu-system-x86_64 on PATH".into()))?;
        let mut shared = Vec::new();
        let mut inits = Vec::new();
        let mut hosts = Vec::new();
        for node in [Node::A, Node::B] {
            let root = lab.root().join(node.name());
            for dir in ["run/vc", "run/containerd", "opt/kata/bin"] {
                let d = root.join(dir);
                std::fs::create_dir_all(&d).map_err(|source| DeployError::HostPath { path: d, source })?;
            }
            let kata_qemu = root.join("opt/kata/bin/qemu-system-x86_64");
            if !kata_qemu.exists() {
                std::os::unix::fs::symlink(&qemu, &kata_qemu)
                    .map_err(|source| DeployError::HostPath { path: kata_qemu, source })?;
            }
            shared.push(SharedRoot::make(&root)?);
            let init = NodeInit::start(&lab.netns(node.name()))?;
            hosts.push(NodeHost {
                root,
                init_pid: init.pid(),
                host_ip: IpAddr::V4(node.addr_v4()),
                pod_name: pod_name(node).to_owned(),
                node_name: node.name().to_owned(),
                // One level, so that runc removes it with the container.
                cgroup: format!("/{}deployed-{}", lab.prefix(), node.name()),
            });
            inits.push(init);
        }
        // The lab's guest kernel and initrd (a node has Kata's under /opt/kata) and its shared
        // storage (a node mounts its NFS or Ceph): at their own paths, as the source's QEMU
        // names them; the allowlist is told about both, as it is for the agents run directly.
        let guest = crate::artifacts::guest_dir();
        let storage = lab.root().join("shared");
        let roots = std::env::join_paths([&guest, &storage]).unwrap_or_default();
        // The cluster's agent CA, as `katamaran-agent ca init` makes it: the Secret the
        // manifest mounts (both nodes' agents trust it; tests mint clients from it).
        let ca = katamaran::peer::ClusterCa::generate(std::time::Duration::from_secs(24 * 3600))?;
        let ca_files = vec![
            (katamaran::peer::CA_CERT_FILE.to_owned(), ca.cert_pem().as_bytes().to_vec()),
            (katamaran::peer::CA_KEY_FILE.to_owned(), ca.key_pem().as_bytes().to_vec()),
        ];
        let extras = Extras {
            binds: vec![(guest, false), (storage, true)],
            env: vec![
                (katamaran::sandbox::allowlist::ROOTS_ENV.to_owned(), roots.to_string_lossy().into_owned()),
                ("NO_COLOR".to_owned(), "1".to_owned()),
            ],
            secrets: HashMap::from([(katamaran::peer::CA_SECRET.to_owned(), ca_files)]),
        };
        let logs = lab.root().join("containers");
        std::fs::create_dir_all(&logs)
            .map_err(|source| DeployError::HostPath { path: logs.clone(), source })?;
        let containerd = crate::containerd::Containerd::start(&lab.root().join("containerd"))?;
        let me = Self {
            containerd,
            _shared: shared,
            _inits: inits,
            hosts,
            manifest,
            image,
            extras,
            ca,
            logs,
            execs: std::sync::atomic::AtomicU32::new(0),
        };
        for node in [Node::A, Node::B] {
            me.start_agent(node)?;
        }
        Ok(me)
    }

    /// The agents' CA (the Secret their manifest mounts).
    pub fn ca(&self) -> &katamaran::peer::ClusterCa {
        &self.ca
    }

    fn index(node: crate::Node) -> usize {
        match node {
            crate::Node::A => 0,
            crate::Node::B => 1,
        }
    }

    /// The container's id (also its log's name).
    pub fn container_id(node: crate::Node) -> String {
        format!("agent-{}", node.name())
    }

    /// Creates and starts `node`'s agent container from the manifest and waits until its
    /// readiness probe passes, as kubelet would before sending traffic.
    ///
    /// # Errors
    /// When the spec cannot be made, `ctr` fails or the probe does not pass in time.
    pub fn start_agent(&self, node: crate::Node) -> Result<(), DeployedLabError> {
        let host = &self.hosts[Self::index(node)];
        let spec = runtime_spec(&self.manifest, AGENT_CONTAINER, host, &self.image, &self.extras)?;
        let id = Self::container_id(node);
        self.containerd.run(&id, &spec, &self.log_path(node))?;
        let probe = readiness_probe(container(pod_spec(&self.manifest)?, AGENT_CONTAINER)?)?;
        let started = std::time::Instant::now();
        loop {
            let last = match self.probe(node, &probe)? {
                Ok(()) => return Ok(()),
                Err(last) => last,
            };
            if started.elapsed() > READY_TIMEOUT {
                return Err(DeployedLabError::NotReady {
                    node: node.name(),
                    limit: READY_TIMEOUT,
                    last,
                    log: self.log_tail(node, 30),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Runs `probe` against `node`'s agent container once: `Ok(Err(answer))` when it does not
    /// pass.
    ///
    /// # Errors
    /// When `ctr` fails.
    pub fn probe(&self, node: crate::Node, probe: &Probe) -> Result<Result<(), String>, DeployedLabError> {
        match probe {
            Probe::Exec(cmd) => {
                let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
                let out = self.exec(node, &argv)?;
                Ok(if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                })
            }
            Probe::HttpGet { path, port } => {
                Ok(self.http_get(node, *port, path).map(|_| ()).map_err(|e| e.to_string()))
            }
        }
    }

    /// GETs `path` on `port` of `node`'s agent container (its pod namespace's loopback); the body
    /// of a 200 answer.
    ///
    /// # Errors
    /// When the container has no task, or the request fails or is answered with another status.
    pub fn http_get(&self, node: crate::Node, port: u16, path: &str) -> Result<String, DeployedLabError> {
        let pid = self.agent_pid(node)?.ok_or(DeployedLabError::NotRunning { node: node.name() })?;
        let netns = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        Ok(crate::netns::http_get_at(&netns, addr, path, std::time::Duration::from_secs(5))?)
    }

    /// SIGKILLs `node`'s agent container (a crash, an OOM kill) and removes it; its VMs must
    /// not be in its cgroup.
    ///
    /// # Errors
    /// When `ctr` fails or the task does not stop.
    pub fn kill_agent(&self, node: crate::Node) -> Result<(), DeployedLabError> {
        let id = Self::container_id(node);
        self.containerd.kill(&id, "SIGKILL", std::time::Duration::from_secs(20))?;
        self.containerd.remove(&id);
        Ok(())
    }

    /// The pid of `node`'s agent (the container's init), while it runs.
    ///
    /// # Errors
    /// When `ctr` fails.
    pub fn agent_pid(&self, node: crate::Node) -> Result<Option<u32>, DeployedLabError> {
        Ok(self.containerd.task_pid(&Self::container_id(node))?)
    }

    /// The agent container's network namespace (where its port-forward target listens).
    ///
    /// # Errors
    /// When it does not run.
    pub fn agent_netns(&self, node: crate::Node) -> Result<PathBuf, DeployedLabError> {
        let pid = self.agent_pid(node)?.ok_or_else(|| crate::containerd::CtrError::Task {
            id: Self::container_id(node),
            what: "not running".into(),
        })?;
        Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// Runs `argv` inside `node`'s agent container (`ctr task exec`).
    ///
    /// # Errors
    /// When `ctr` cannot run.
    pub fn exec(&self, node: crate::Node, argv: &[&str]) -> Result<std::process::Output, DeployedLabError> {
        let n = self.execs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.containerd.exec(&Self::container_id(node), &format!("exec-{n}"), argv)?)
    }

    /// `katactl ARGS…` inside `node`'s agent container, against the agent's socket there.
    ///
    /// # Errors
    /// When `ctr` cannot run.
    pub fn katactl(
        &self,
        node: crate::Node,
        args: &[&str],
    ) -> Result<std::process::Output, DeployedLabError> {
        let mut argv = vec!["/usr/local/bin/katactl"];
        argv.extend_from_slice(args);
        self.exec(node, &argv)
    }

    /// The agent container's log file.
    pub fn log_path(&self, node: crate::Node) -> PathBuf {
        self.logs.join(format!("{}.log", Self::container_id(node)))
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, node: crate::Node, lines: usize) -> String {
        std::fs::read(self.log_path(node))
            .map_or_else(|e| format!("(no log: {e})"), |b| crate::artifacts::tail(&b, lines))
    }
}

impl Drop for DeployedAgents {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in [crate::Node::A, crate::Node::B] {
                eprintln!(
                    "--- {} agent container log (last 40 lines) ---\n{}",
                    node.name(),
                    self.log_tail(node, 40)
                );
            }
        }
    }
}

/// The agent pod's name on `node` (also the container's hostname).
pub fn pod_name(node: crate::Node) -> &'static str {
    match node {
        crate::Node::A => "katamaran-agent-a1b2c",
        crate::Node::B => "katamaran-agent-d3e4f",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn manifest() -> DaemonSet {
        load(&crate::artifacts::workspace_root().join(MANIFEST)).unwrap()
    }

    fn host(dir: &Path) -> NodeHost {
        NodeHost {
            root: dir.join("node-a"),
            init_pid: 4242,
            host_ip: "10.201.0.11".parse().unwrap(),
            pod_name: "katamaran-agent-a1b2c".into(),
            node_name: "node-a".into(),
            cgroup: "/katamaran-lab/agent-a".into(),
        }
    }

    fn spec(dir: &Path) -> Spec {
        // `type: Directory` volumes must exist on the node (Kata's and containerd's).
        std::fs::create_dir_all(dir.join("node-a/run/containerd")).unwrap();
        let image = Image { rootfs: dir.join("rootfs"), base: vec![PathBuf::from("/usr/lib")] };
        let ca = vec![("ca.crt".to_owned(), b"CERT".to_vec()), ("ca.key".to_owned(), b"KEY".to_vec())];
        let extras = Extras {
            binds: vec![(dir.join("guest"), false)],
            env: vec![("X".into(), "1".into())],
            secrets: HashMap::from([("katamaran-agent-ca".to_owned(), ca)]),
        };
        runtime_spec(&manifest(), AGENT_CONTAINER, &host(dir), &image, &extras).unwrap()
    }

    fn mount<'a>(s: &'a Spec, dest: &str) -> &'a Mount {
        s.mounts().as_ref().unwrap().iter().find(|m| m.destination() == Path::new(dest)).unwrap()
    }

    #[test]
    fn expand_follows_kubernetes_rules() {
        let env = HashMap::from([("HOST_IP".to_owned(), "10.0.0.1".to_owned())]);
        for (input, want) in [
            ("--node-address=$(HOST_IP)", "--node-address=10.0.0.1"),
            ("$(HOST_IP):$(HOST_IP)", "10.0.0.1:10.0.0.1"),
            ("$(UNSET)", "$(UNSET)"),
            ("$$(HOST_IP)", "$(HOST_IP)"),
            ("cost $5", "cost $5"),
            ("$(HOST_IP", "$(HOST_IP"),
            ("trailing $", "trailing $"),
        ] {
            assert_eq!(expand(input, &env), want, "{input}");
        }
    }

    #[test]
    fn host_paths_are_the_nodes_except_machine_wide_ones() {
        let h = host(Path::new("/lab"));
        assert_eq!(h.host_path(Path::new("/run/katamaran")), Path::new("/lab/node-a/run/katamaran"));
        assert_eq!(h.host_path(Path::new("/var/lib/katamaran")), Path::new("/lab/node-a/var/lib/katamaran"));
        assert_eq!(h.host_path(Path::new("/proc")), Path::new("/proc"));
        assert_eq!(h.host_path(Path::new("/run/netns")), Path::new("/run/netns"));
        assert_eq!(h.host_path(Path::new("/dev")), Path::new("/dev"));
        assert_eq!(h.pid1("--host-netns=/proc/1/ns/net"), "--host-netns=/proc/4242/ns/net");
        assert_eq!(h.pid1("--host-proc=/proc/1"), "--host-proc=/proc/4242");
        assert_eq!(h.pid1("/proc/1/root"), "/proc/4242/root");
        assert_eq!(h.pid1("--x=/proc/12"), "--x=/proc/12");
        assert_eq!(h.pid1("--listen-tcp=127.0.0.1:10555"), "--listen-tcp=127.0.0.1:10555");
    }

    #[test]
    fn the_agent_container_becomes_the_spec_kubelet_would_run() {
        let dir = tempfile_dir();
        let s = spec(&dir);
        let p = s.process().as_ref().unwrap();
        let args = p.args().as_ref().unwrap();
        assert_eq!(args[0], "/usr/local/bin/katamaran-agent");
        assert!(args.contains(&"--node-address=10.201.0.11".to_owned()), "{args:?}");
        assert!(args.contains(&"--host-netns=/proc/4242/ns/net".to_owned()), "{args:?}");
        assert!(args.contains(&"--listen-tcp=127.0.0.1:10555".to_owned()), "{args:?}");
        assert!(args.contains(&"--peer-ca-dir=/etc/katamaran/ca".to_owned()), "{args:?}");
        // The CA Secret as kubelet makes its volume: the pod's directory, root-only files.
        let ca = mount(&s, "/etc/katamaran/ca");
        let source = ca.source().as_ref().unwrap();
        assert!(source.starts_with(dir.join("node-a/var/lib/kubelet/pods")), "{source:?}");
        assert!(ca.options().as_ref().unwrap().contains(&"ro".to_owned()));
        {
            use std::os::unix::fs::PermissionsExt;
            let key = source.join("ca.key");
            assert_eq!(std::fs::read(&key).unwrap(), b"KEY");
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o400);
        }
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"HOST_IP=10.201.0.11".to_owned()), "{env:?}");
        assert!(
            env.contains(&"KATAMARAN_NODE_NAME=node-a".to_owned()),
            "the node name from spec.nodeName: {env:?}"
        );
        assert_eq!(env.last().unwrap(), "X=1");
        // hostPID: no PID namespace; not hostNetwork: a network namespace of its own.
        let ns: Vec<LinuxNamespaceType> =
            s.linux().as_ref().unwrap().namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
        assert!(!ns.contains(&LinuxNamespaceType::Pid), "{ns:?}");
        assert!(ns.contains(&LinuxNamespaceType::Network), "{ns:?}");
        // Volumes with their propagation; the host's /dev replaces the runtime's.
        let run = mount(&s, "/run/katamaran");
        assert_eq!(run.source().as_deref(), Some(dir.join("node-a/run/katamaran").as_path()));
        assert!(run.options().as_ref().unwrap().contains(&"rshared".to_owned()));
        assert!(dir.join("node-a/run/katamaran").is_dir(), "DirectoryOrCreate made it");
        let containerd = mount(&s, "/run/containerd");
        assert!(containerd.options().as_ref().unwrap().contains(&"rslave".to_owned()));
        assert!(containerd.options().as_ref().unwrap().contains(&"ro".to_owned()));
        assert_eq!(mount(&s, "/dev").typ().as_deref(), Some("bind"));
        let devs =
            s.mounts().as_ref().unwrap().iter().filter(|m| m.destination().starts_with("/dev")).count();
        assert_eq!(devs, 1, "no runtime /dev/* under the host's /dev");
        assert_eq!(s.linux().as_ref().unwrap().rootfs_propagation().as_deref(), Some("rshared"));
        assert!(mount(&s, "/usr/lib").options().as_ref().unwrap().contains(&"ro".to_owned()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_it_cannot_translate_is_refused() {
        let dir = tempfile_dir();
        let image = Image { rootfs: dir.join("rootfs"), base: vec![] };
        let mut ds = manifest();
        let pod = ds.spec.template.spec.as_mut().unwrap();
        pod.containers[0].env.as_mut().unwrap()[0]
            .value_from
            .as_mut()
            .unwrap()
            .field_ref
            .as_mut()
            .unwrap()
            .field_path = "spec.serviceAccountName".into();
        let e = runtime_spec(&ds, AGENT_CONTAINER, &host(&dir), &image, &Extras::default()).unwrap_err();
        assert!(e.to_string().contains("spec.serviceAccountName"), "{e}");
        let e = runtime_spec(&manifest(), "nope", &host(&dir), &image, &Extras::default()).unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
        assert_eq!(cpu_millis("50m").unwrap(), 50);
        assert_eq!(cpu_millis("1.5").unwrap(), 1500);
        assert!(cpu_millis("lots").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("kmr-deployed-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
