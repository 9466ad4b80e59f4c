//! Cgroups of their own for incoming VMs, so that they outlive the agent's container.
//!
//! containerd's runc shim kills every process left in a container's cgroup when its init exits
//! if the container has no PID namespace of its own (hostPID, as the agent's DaemonSet has), so
//! a QEMU that stays in the agent's cgroup dies with every agent restart, and its memory is
//! charged to a pod that requests 64 MiB. A [`Placement`] creates the VM's cgroup in every
//! hierarchy (see [`cgroup`] for the layout and why cgroupfs rather than a
//! systemd scope) and moves the child there between `fork` and `exec`: the parent opens each
//! `cgroup.procs` beforehand, the child only writes `0` (itself) into them, so nothing the VM
//! allocates is ever charged to the agent.
//!
//! From a pod, the host's hierarchies are reached through pid 1 (hostPID):
//! [`PlacementConfig::host_of`]`("/proc/1")` reads its mountinfo, writes under
//! `/proc/1/root/sys/fs/cgroup` and enters its cgroup namespace — with a private cgroup
//! namespace (the default on cgroup v2) the pod's own `/sys/fs/cgroup` is the container's cgroup,
//! and a VM placed below it would die with it; the kernel also refuses to move a process into a
//! cgroup outside the writer's namespace, so the child enters the host's first.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use nix::sched::{setns, CloneFlags};
use tracing::{debug, info, warn};

use super::cgroup::{self, Target, V2_CONTROLLERS};

/// What happens when a VM's cgroup cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Refuse to start the VM (the node agent's default: a VM in the agent's cgroup dies with it).
    Required,
    /// Warn and start the VM where the agent is (the library's default, for tests and tools).
    BestEffort,
    /// Do not create cgroups.
    Off,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "required" => Ok(Self::Required),
            "best-effort" => Ok(Self::BestEffort),
            "off" => Ok(Self::Off),
            _ => Err(format!("{s:?} is not one of required, best-effort, off")),
        }
    }
}

/// Where and how VM cgroups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementConfig {
    /// The directory standing for `/sys/fs/cgroup` (a temporary tree in tests).
    pub root: PathBuf,
    /// The mountinfo listing the hierarchies.
    pub mountinfo: PathBuf,
    /// A cgroup namespace to enter before touching `cgroup.procs` (the host's from a pod).
    pub cgroupns: Option<PathBuf>,
    /// The parent of VM cgroups, relative to each hierarchy's root.
    pub parent: PathBuf,
    /// A memory limit for each VM (`memory.max`, `memory.limit_in_bytes`); none by default, as
    /// the VM's own size bounds it and Kata sets none either.
    pub memory_max: Option<u64>,
    /// What a failure means.
    pub policy: Policy,
}

impl Default for PlacementConfig {
    /// The calling process's view (`/sys/fs/cgroup`, `/proc/self/mountinfo`), parent
    /// `katamaran`, [`Policy::BestEffort`].
    fn default() -> Self {
        Self {
            root: PathBuf::from(cgroup::CGROUP_MOUNT_BASE),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            cgroupns: None,
            parent: PathBuf::from("katamaran"),
            memory_max: None,
            policy: Policy::BestEffort,
        }
    }
}

impl PlacementConfig {
    /// The hierarchies of the process at `proc_pid` (e.g. `/proc/1`, the host's init with
    /// hostPID): its mountinfo, its root's `/sys/fs/cgroup` and its cgroup namespace.
    pub fn host_of(proc_pid: &Path) -> Self {
        Self {
            root: proc_pid.join("root/sys/fs/cgroup"),
            mountinfo: proc_pid.join("mountinfo"),
            cgroupns: Some(proc_pid.join("ns/cgroup")),
            ..Self::default()
        }
    }
}

static PROCESS_CONFIG: OnceLock<PlacementConfig> = OnceLock::new();

/// Sets the placement of VMs started by this process (the node agent does, from its flags,
/// before serving). How the host's cgroups are reached depends on how the process is deployed,
/// not on a request, so it is process-wide. Returns `false` if it was set already.
pub fn set_process_config(cfg: PlacementConfig) -> bool {
    PROCESS_CONFIG.set(cfg).is_ok()
}

/// The placement set by [`set_process_config`], or [`PlacementConfig::default`].
pub fn process_config() -> PlacementConfig {
    PROCESS_CONFIG.get().cloned().unwrap_or_default()
}

/// The cgroup `name` for a VM under [`process_config`] and its policy: `None` when placement is
/// [`Policy::Off`], or failed under [`Policy::BestEffort`] (logged: that VM dies with the
/// agent's container). Runs the file work on tokio's blocking pool.
///
/// # Errors
/// Under [`Policy::Required`], as [`Placement::create`]; [`Error::Thread`] if the blocking task
/// died.
pub async fn place(name: String) -> Result<Option<Placement>, Error> {
    let cfg = process_config();
    let policy = cfg.policy;
    if policy == Policy::Off {
        return Ok(None);
    }
    let root = cfg.root.clone();
    let made = tokio::task::spawn_blocking(move || Placement::create(&cfg, &name))
        .await
        .map_err(|_| Error::Thread(root))?;
    match made {
        Ok(p) => Ok(Some(p)),
        Err(e) if policy == Policy::BestEffort => {
            warn!(error = %crate::migration::error::chain(&e), "the VM stays in the agent's cgroup and dies with it");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Removes VM cgroup `name` under [`process_config`] after its VM exited — for a caller that
/// no longer holds the [`Placement`] (an agent that restarted, a sandbox removed long after
/// its migration): the directories are found again from the name ([`leaves_of`]). Nothing to
/// do under [`Policy::Off`] or when they are gone.
///
/// # Errors
/// As [`leaves_of`] and [`remove_leaves`]; [`Error::Thread`] if the blocking task died.
pub async fn remove_vm_cgroup(name: String) -> Result<(), Error> {
    let cfg = process_config();
    if cfg.policy == Policy::Off {
        return Ok(());
    }
    let root = cfg.root.clone();
    tokio::task::spawn_blocking(move || remove_leaves(&leaves_of(&cfg, &name)?))
        .await
        .map_err(|_| Error::Thread(root))?
}

/// The directories VM cgroup `name` has (or would have) under `cfg`, one per hierarchy in
/// `cfg.mountinfo`; nothing is created.
///
/// # Errors
/// [`Error::InvalidName`], [`Error::InvalidParent`], [`Error::ReadMountinfo`].
pub fn leaves_of(cfg: &PlacementConfig, name: &str) -> Result<Vec<PathBuf>, Error> {
    check_names(cfg, name)?;
    let text = std::fs::read_to_string(&cfg.mountinfo)
        .map_err(|source| Error::ReadMountinfo { path: cfg.mountinfo.clone(), source })?;
    let hierarchies = cgroup::parse_mountinfo(&text);
    Ok(cgroup::plan(&hierarchies, &cfg.root, &cfg.parent, name, None).into_iter().map(|t| t.leaf).collect())
}

fn check_names(cfg: &PlacementConfig, name: &str) -> Result<(), Error> {
    cgroup::validate_name(name).map_err(|reason| Error::InvalidName { name: name.to_owned(), reason })?;
    if cfg.parent.as_os_str().is_empty()
        || cfg.parent.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        || cfg.parent.iter().any(|c| cgroup::validate_name(&c.to_string_lossy()).is_err())
    {
        return Err(Error::InvalidParent(cfg.parent.clone()));
    }
    Ok(())
}

/// Why a VM's cgroup could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cgroup name is not acceptable.
    #[error("cgroup name {name:?} {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// The rule that failed.
        reason: &'static str,
    },
    /// The parent is not a plain relative path.
    #[error("cgroup parent {0} must be a relative path of plain names")]
    InvalidParent(PathBuf),
    /// mountinfo cannot be read.
    #[error("cannot read {path}")]
    ReadMountinfo {
        /// The mountinfo path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No cgroup hierarchy is mounted.
    #[error("{0} lists no cgroup hierarchy under /sys/fs/cgroup")]
    NoHierarchy(PathBuf),
    /// The cgroup namespace cannot be opened.
    #[error("cannot open the cgroup namespace {path}")]
    OpenNamespace {
        /// The namespace path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The cgroup namespace cannot be entered.
    #[error("cannot enter the cgroup namespace {path}")]
    EnterNamespace {
        /// The namespace path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The helper thread could not run.
    #[error("cannot run a helper thread for the cgroups under {0}")]
    Thread(PathBuf),
    /// A directory cannot be created.
    #[error("cannot create the cgroup {path}")]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The VM's cgroup exists and holds processes.
    #[error("the cgroup {0} exists and holds processes (is this sandbox running here already?)")]
    InUse(PathBuf),
    /// A cgroup file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup file cannot be written.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `cgroup.procs` cannot be opened.
    #[error("cannot open {path} for writing")]
    OpenProcs {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup cannot be removed.
    #[error("cannot remove the cgroup {path}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A VM's cgroup in every hierarchy, ready to receive one child.
#[derive(Debug)]
pub struct Placement {
    leaves: Vec<PathBuf>,
    /// `cgroup.procs` of every leaf, opened by the parent (close-on-exec).
    procs: Arc<[OwnedFd]>,
    /// The cgroup namespace the child enters first.
    cgroupns: Option<Arc<OwnedFd>>,
}

impl Placement {
    /// Creates cgroup `name` under `cfg.parent` in every hierarchy `cfg.mountinfo` lists (an
    /// existing empty one is reused) and opens its `cgroup.procs` files. On failure whatever
    /// it created is removed again. `cfg.policy` is not consulted here.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::InvalidParent`], [`Error::ReadMountinfo`],
    /// [`Error::NoHierarchy`], [`Error::OpenNamespace`], [`Error::EnterNamespace`],
    /// [`Error::Thread`], [`Error::Mkdir`], [`Error::InUse`], [`Error::Read`], [`Error::Write`],
    /// [`Error::OpenProcs`].
    pub fn create(cfg: &PlacementConfig, name: &str) -> Result<Self, Error> {
        check_names(cfg, name)?;
        let text = std::fs::read_to_string(&cfg.mountinfo)
            .map_err(|source| Error::ReadMountinfo { path: cfg.mountinfo.clone(), source })?;
        let hierarchies = cgroup::parse_mountinfo(&text);
        if hierarchies.is_empty() {
            return Err(Error::NoHierarchy(cfg.mountinfo.clone()));
        }
        let targets = cgroup::plan(&hierarchies, &cfg.root, &cfg.parent, name, cfg.memory_max);
        let (leaves, procs, cgroupns) = match &cfg.cgroupns {
            None => {
                let (leaves, procs) = build(&targets)?;
                (leaves, procs, None)
            }
            Some(path) => {
                let ns: OwnedFd = File::open(path)
                    .map_err(|source| Error::OpenNamespace { path: path.clone(), source })?
                    .into();
                let ns = Arc::new(ns);
                // Since Linux 5.16 a `cgroup.procs` write is checked against the namespace the
                // file was opened in: open them from a thread that entered the target's.
                let (thread_ns, p) = (Arc::clone(&ns), path.clone());
                let built = std::thread::Builder::new()
                    .name("cgroupns".into())
                    .spawn(move || {
                        setns(thread_ns.as_fd(), CloneFlags::CLONE_NEWCGROUP)
                            .map_err(|e| Error::EnterNamespace { path: p, source: e.into() })?;
                        build(&targets)
                    })
                    .map_err(|_| Error::Thread(path.clone()))?
                    .join()
                    .map_err(|_| Error::Thread(path.clone()))??;
                (built.0, built.1, Some(ns))
            }
        };
        info!(cgroup = %name, hierarchies = leaves.len(), mode = ?cgroup::mode(&hierarchies), "VM cgroup ready");
        Ok(Self { leaves, procs: procs.into(), cgroupns })
    }

    /// The VM's directory in each hierarchy.
    pub fn leaves(&self) -> &[PathBuf] {
        &self.leaves
    }

    /// Makes `cmd`'s child enter the cgroup namespace (if any) and move itself into every
    /// leaf between `fork` and `exec`. If a move fails the spawn fails with that error.
    pub fn apply(&self, cmd: &mut Command) {
        let procs = Arc::clone(&self.procs);
        let ns = self.cgroupns.clone();
        // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
        // work is allowed: it makes raw setns(2) and write(2) calls on descriptors the parent
        // opened (kept alive by the Arcs it owns), allocates nothing and takes no lock; errors
        // are `io::Error`s built from errno, which do not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = &ns {
                    setns(ns.as_fd(), CloneFlags::CLONE_NEWCGROUP)?;
                }
                for fd in procs.iter() {
                    nix::unistd::write(fd, b"0")?;
                }
                Ok(())
            });
        }
    }

    /// Removes the VM's directories ([`remove_leaves`]); call it after the VM exited.
    ///
    /// # Errors
    /// As [`remove_leaves`].
    pub fn remove(&self) -> Result<(), Error> {
        remove_leaves(&self.leaves)
    }
}

/// Removes VM cgroup directories (deepest hierarchy order reversed); a missing one is fine.
/// The shared parent stays. Fails with `EBUSY` while a process is still inside.
///
/// # Errors
/// [`Error::Remove`] for the first directory that could not be removed (the others are still
/// tried).
pub fn remove_leaves(leaves: &[PathBuf]) -> Result<(), Error> {
    let mut first = None;
    for leaf in leaves.iter().rev() {
        match std::fs::remove_dir(leaf) {
            Ok(()) => debug!(cgroup = %leaf.display(), "removed"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                warn!(cgroup = %leaf.display(), error = %source, "cannot remove a VM cgroup");
                first.get_or_insert(Error::Remove { path: leaf.clone(), source });
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// Creates every target and opens its `cgroup.procs`; undoes its own leaves on failure.
fn build(targets: &[Target]) -> Result<(Vec<PathBuf>, Vec<OwnedFd>), Error> {
    let mut leaves = Vec::with_capacity(targets.len());
    let mut procs = Vec::with_capacity(targets.len());
    for t in targets {
        match build_one(t, &mut leaves) {
            Ok(fd) => procs.push(fd),
            Err(e) => {
                drop(procs);
                let _ = remove_leaves(&leaves);
                return Err(e);
            }
        }
    }
    Ok((leaves, procs))
}

fn build_one(t: &Target, leaves: &mut Vec<PathBuf>) -> Result<OwnedFd, Error> {
    // Walk from the hierarchy's root down to the parent, creating what is missing.
    let mut dir = t.mount.clone();
    let rel = t.parent.strip_prefix(&t.mount).unwrap_or(Path::new("")).to_owned();
    for part in rel.iter() {
        if t.enable_controllers {
            enable_controllers(&dir);
        }
        let child = dir.join(part);
        mkdir(&child)?;
        if t.copy_cpuset {
            copy_cpuset(&dir, &child)?;
        }
        dir = child;
    }
    if t.enable_controllers {
        enable_controllers(&dir);
    }
    let procs_path = t.leaf.join("cgroup.procs");
    if mkdir(&t.leaf)? {
        leaves.push(t.leaf.clone());
    } else {
        // Left over by a VM that ended without its cleanup: reuse it if empty.
        let held = read_opt(&procs_path)?.unwrap_or_default();
        if !held.trim().is_empty() {
            return Err(Error::InUse(t.leaf.clone()));
        }
        leaves.push(t.leaf.clone());
    }
    if t.copy_cpuset {
        copy_cpuset(&t.parent, &t.leaf)?;
    }
    if let Some((file, value)) = &t.limit {
        write(&t.leaf.join(file), value)?;
    }
    let fd = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|source| Error::OpenProcs { path: procs_path.clone(), source })?;
    Ok(fd.into())
}

/// `mkdir`; `Ok(false)` if it existed.
fn mkdir(path: &Path) -> Result<bool, Error> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(Error::Mkdir { path: path.to_owned(), source }),
    }
}

fn read_opt(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path: path.to_owned(), source }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    let fail = |source| Error::Write { path: path.to_owned(), value: value.to_owned(), source };
    // One write(2) per value: cgroupfs handles each write as one command.
    let mut f = OpenOptions::new().write(true).truncate(true).open(path).map_err(fail)?;
    f.write_all(value.as_bytes()).map_err(fail)
}

/// Enables [`V2_CONTROLLERS`] for `dir`'s children where offered. Best effort: a controller
/// that cannot be enabled (e.g. `cpu` while a realtime thread sits in the tree) only loses that
/// accounting; a requested memory limit then fails visibly when written.
fn enable_controllers(dir: &Path) {
    let available = match read_opt(&dir.join("cgroup.controllers")) {
        Ok(Some(a)) => a,
        _ => return,
    };
    let Some(line) = cgroup::subtree_control_line(&available, V2_CONTROLLERS) else { return };
    let control = dir.join("cgroup.subtree_control");
    if write(&control, &line).is_ok() {
        return;
    }
    for c in line.split(' ') {
        if let Err(e) = write(&control, c) {
            debug!(error = %e, "controller not enabled");
        }
    }
}

/// A new v1 cpuset has empty `cpuset.cpus`/`cpuset.mems` and refuses tasks: copy the parent's.
fn copy_cpuset(from: &Path, to: &Path) -> Result<(), Error> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let Some(mine) = read_opt(&to.join(file))? else { continue };
        if !mine.trim().is_empty() {
            continue;
        }
        if let Some(theirs) = read_opt(&from.join(file))? {
            write(&to.join(file), theirs.trim())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";

    /// A fake cgroupfs: plain directories and files where the kernel would have its own.
    fn fake_tree() -> (tempfile::TempDir, PlacementConfig) {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("cgroup");
        for (file, contents) in [
            ("cpu,cpuacct/cgroup.procs", "1\n"),
            ("cpuset/cpuset.cpus", "0-3\n"),
            ("cpuset/cpuset.mems", "0\n"),
            ("memory/cgroup.procs", "1\n"),
            ("unified/cgroup.controllers", "cpuset cpu io memory pids\n"),
            ("unified/cgroup.subtree_control", ""),
        ] {
            let p = root.join(file);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, contents).expect("write");
        }
        let mountinfo = tmp.path().join("mountinfo");
        std::fs::write(&mountinfo, MOUNTINFO).expect("mountinfo");
        let cfg = PlacementConfig {
            root,
            mountinfo,
            memory_max: Some(512 << 20),
            policy: Policy::Required,
            ..PlacementConfig::default()
        };
        (tmp, cfg)
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn fake_cgroupfs_layout_files_and_child_move() {
        let (_tmp, cfg) = fake_tree();
        let r = &cfg.root;
        // What the kernel would provide inside the new directories; the fake must pre-create
        // them (cpuset files empty, as a new v1 cpuset has them).
        for d in ["cpu,cpuacct", "cpuset", "memory", "unified"] {
            std::fs::create_dir_all(r.join(d).join("katamaran/kmr-x")).expect("mkdir");
            std::fs::write(r.join(d).join("katamaran/kmr-x/cgroup.procs"), "").expect("procs");
        }
        std::fs::write(r.join("memory/katamaran/kmr-x/memory.limit_in_bytes"), "max").expect("limit");
        std::fs::write(r.join("unified/katamaran/kmr-x/memory.max"), "max").expect("limit");
        for f in ["cpuset.cpus", "cpuset.mems"] {
            std::fs::write(r.join("cpuset/katamaran").join(f), "").expect("parent cpuset");
            std::fs::write(r.join("cpuset/katamaran/kmr-x").join(f), "").expect("leaf cpuset");
        }
        let p = Placement::create(&cfg, "kmr-x").expect("create");
        let leaves: Vec<_> =
            p.leaves().iter().map(|l| l.strip_prefix(r).expect("under root").to_owned()).collect();
        let want: Vec<PathBuf> = ["cpu,cpuacct", "cpuset", "memory", "unified"]
            .iter()
            .map(|d| Path::new(d).join("katamaran/kmr-x"))
            .collect();
        assert_eq!(leaves, want);
        assert_eq!(read(&r.join("unified/cgroup.subtree_control")), "+cpu +memory +pids");
        assert_eq!(read(&r.join("cpuset/katamaran/cpuset.cpus")), "0-3");
        assert_eq!(read(&r.join("cpuset/katamaran/kmr-x/cpuset.cpus")), "0-3");
        assert_eq!(read(&r.join("cpuset/katamaran/kmr-x/cpuset.mems")), "0");
        assert_eq!(read(&r.join("memory/katamaran/kmr-x/memory.limit_in_bytes")), "536870912");
        assert_eq!(
            read(&r.join("unified/katamaran/kmr-x/memory.max")),
            "max",
            "memory is v1's on a hybrid host"
        );
        assert!(!r.join("cpu,cpuacct/katamaran/kmr-x/memory.max").exists());

        // The child writes "0" into every cgroup.procs before exec.
        let mut cmd = Command::new("true");
        p.apply(&mut cmd);
        assert!(cmd.status().expect("spawn").success());
        for l in p.leaves() {
            assert_eq!(read(&l.join("cgroup.procs")), "0", "{}", l.display());
        }
        // A leaf that holds a process is not reused.
        assert!(matches!(Placement::create(&cfg, "kmr-x"), Err(Error::InUse(_))));
    }

    #[test]
    fn missing_or_bad_inputs_fail_before_touching_anything() {
        let (tmp, mut cfg) = fake_tree();
        assert!(matches!(Placement::create(&cfg, "../x"), Err(Error::InvalidName { .. })));
        cfg.parent = PathBuf::from("../escape");
        assert!(matches!(Placement::create(&cfg, "kmr-x"), Err(Error::InvalidParent(_))));
        cfg.parent = PathBuf::from("katamaran");
        cfg.mountinfo = tmp.path().join("absent");
        assert!(matches!(Placement::create(&cfg, "kmr-x"), Err(Error::ReadMountinfo { .. })));
        std::fs::write(tmp.path().join("empty"), "22 1 259:2 / / rw - ext4 /dev/x rw\n").expect("write");
        cfg.mountinfo = tmp.path().join("empty");
        assert!(matches!(Placement::create(&cfg, "kmr-x"), Err(Error::NoHierarchy(_))));
        assert!(!cfg.root.join("memory/katamaran").exists());
    }

    #[test]
    fn a_failure_in_one_hierarchy_removes_the_others() {
        let (_tmp, cfg) = fake_tree();
        // No cgroup.procs anywhere: the first open fails after its leaf was made.
        let e = Placement::create(&cfg, "kmr-y").expect_err("no procs file");
        assert!(matches!(e, Error::OpenProcs { .. }), "{e}");
        assert!(!cfg.root.join("cpu,cpuacct/katamaran/kmr-y").exists());
        assert!(cfg.root.join("cpu,cpuacct/katamaran").exists(), "the shared parent stays");
    }

    #[test]
    fn leaves_are_found_again_from_the_name_alone() {
        let (_tmp, cfg) = fake_tree();
        let leaves = leaves_of(&cfg, "kmr-z").expect("leaves");
        let want: Vec<PathBuf> = ["cpu,cpuacct", "cpuset", "memory", "unified"]
            .iter()
            .map(|d| cfg.root.join(d).join("katamaran/kmr-z"))
            .collect();
        assert_eq!(leaves, want);
        assert!(!cfg.root.join("memory/katamaran").exists(), "nothing created");
        for l in &leaves {
            std::fs::create_dir_all(l).expect("mkdir");
        }
        remove_leaves(&leaves).expect("remove");
        assert!(leaves.iter().all(|l| !l.exists()));
        remove_leaves(&leaves).expect("gone already is fine");
        let empty = PlacementConfig { parent: PathBuf::new(), ..cfg };
        assert!(matches!(leaves_of(&empty, "kmr-z"), Err(Error::InvalidParent(_))));
    }

    #[test]
    fn policies_parse() {
        assert_eq!("required".parse(), Ok(Policy::Required));
        assert_eq!("best-effort".parse(), Ok(Policy::BestEffort));
        assert_eq!("off".parse(), Ok(Policy::Off));
        assert!("yes".parse::<Policy>().is_err());
    }
}
