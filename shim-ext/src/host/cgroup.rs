//! Pure decisions about a VM's cgroups: which hierarchies the host has (from
//! `/proc/<pid>/mountinfo`), where the VM's directory goes in each, and what is written there.
//! [`placement`](super::placement) does the I/O.
//!
//! Layout, for VM cgroup `kmr-<sandbox id>-<migration id>` (shortened `kmr-<id>` below) under the parent `katamaran`:
//! ```text
//! cgroup v2 (unified):  <root>/katamaran/kmr-<id>            memory.max (unless v1 has memory)
//! cgroup v1:            <root>/<hierarchy>/katamaran/kmr-<id> memory.limit_in_bytes (memory)
//!                       — in EVERY mounted v1 hierarchy (devices, freezer, name=systemd…):
//!                       runc finds a container's processes through its devices/freezer
//!                       cgroups, so a VM left in any of the agent's would be killed with it.
//! hybrid:               both of the above (systemd's controller-less cgroup2 at unified/).
//! ```
//! The parent is a plain directory at the top of each hierarchy, next to systemd's slices —
//! the place docker's and the kubelet's `cgroupfs` drivers use (`/docker`, `/kubepods`).
//! systemd leaves cgroups it did not create alone; a transient scope (D-Bus
//! `StartTransientUnit`) would make the VM visible as a unit but needs a D-Bus client and the
//! host's bus inside the agent's container, which we do not have today.

use std::path::{Path, PathBuf};

/// Where cgroup hierarchies are mounted on a host (`/sys/fs/cgroup`); mount points elsewhere
/// are ignored.
pub const CGROUP_MOUNT_BASE: &str = "/sys/fs/cgroup";

/// Controllers enabled for VM cgroups on cgroup v2, where the parent offers them.
pub const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its mount point, relative to [`CGROUP_MOUNT_BASE`] (empty for a v2 tree mounted there).
    pub rel: PathBuf,
    /// What kind of hierarchy it is.
    pub kind: HierarchyKind,
}

/// A cgroup v2 tree or a v1 hierarchy with its controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HierarchyKind {
    /// cgroup2.
    Unified,
    /// cgroup v1 with these controllers (and `name=…` for named hierarchies).
    V1 {
        /// e.g. `["cpu", "cpuacct"]`, `["name=systemd"]`.
        controllers: Vec<String>,
    },
}

impl Hierarchy {
    /// Whether a v1 hierarchy carries `controller`.
    pub fn has(&self, controller: &str) -> bool {
        match &self.kind {
            HierarchyKind::Unified => false,
            HierarchyKind::V1 { controllers } => controllers.iter().any(|c| c == controller),
        }
    }
}

/// Which cgroup setup a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No cgroup hierarchy under [`CGROUP_MOUNT_BASE`].
    None,
    /// Only cgroup v1 hierarchies.
    V1,
    /// Only cgroup v2.
    V2,
    /// v1 controllers plus a (usually controller-less) cgroup2 tree.
    Hybrid,
}

/// The mode of a set of hierarchies.
pub fn mode(hierarchies: &[Hierarchy]) -> Mode {
    let v2 = hierarchies.iter().any(|h| h.kind == HierarchyKind::Unified);
    let v1 = hierarchies.iter().any(|h| h.kind != HierarchyKind::Unified);
    match (v1, v2) {
        (false, false) => Mode::None,
        (true, false) => Mode::V1,
        (false, true) => Mode::V2,
        (true, true) => Mode::Hybrid,
    }
}

/// v1 controller names as they appear in mount options (`Documentation/admin-guide/cgroup-v1`).
const V1_CONTROLLERS: &[&str] = &[
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

/// Reads the cgroup hierarchies mounted under [`CGROUP_MOUNT_BASE`] from mountinfo text
/// (`proc(5)`). A hierarchy mounted twice is listed once (its first mount); lines that do not
/// parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let Some(mount_point) = pre.split(' ').nth(4) else { continue };
        let mut post = post.split(' ');
        let (Some(fstype), Some(_source), Some(options)) = (post.next(), post.next(), post.next()) else {
            continue;
        };
        let kind = match fstype {
            "cgroup2" => HierarchyKind::Unified,
            "cgroup" => {
                let controllers: Vec<String> = options
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o) || o.starts_with("name="))
                    .map(str::to_owned)
                    .collect();
                if controllers.is_empty() {
                    continue;
                }
                HierarchyKind::V1 { controllers }
            }
            _ => continue,
        };
        let Ok(rel) =
            Path::new(&unescape(mount_point)).strip_prefix(CGROUP_MOUNT_BASE).map(Path::to_path_buf)
        else {
            continue;
        };
        if out.iter().any(|h| h.kind == kind) {
            continue;
        }
        out.push(Hierarchy { rel, kind });
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks a cgroup directory name: 1–255 bytes (`NAME_MAX`) of `[A-Za-z0-9._-]`, not starting with `.` and
/// not `cgroup.`-prefixed (the kernel's interface files).
///
/// # Errors
/// The rule that failed.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 255 {
        Err("must be 1 to 255 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        Err("may contain only letters, digits, '.', '_' and '-'")
    } else if name.starts_with('.') || name.starts_with("cgroup.") {
        Err("must not start with '.' or 'cgroup.'")
    } else {
        Ok(())
    }
}

/// The name of the cgroup of the VM a migration brings in: one per VM instance, since a
/// sandbox that comes back to a node may find its previous instance still there (paused after
/// it moved away). Validated ids (≤ 128 and ≤ 64 bytes) keep it under `NAME_MAX`.
pub fn vm_cgroup_name(sandbox_id: &str, migration_id: &str) -> String {
    format!("kmr-{sandbox_id}-{migration_id}")
}

/// What to do in one hierarchy for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The hierarchy's mount point as the agent sees it.
    pub mount: PathBuf,
    /// The shared parent directory (created when missing, never removed).
    pub parent: PathBuf,
    /// The VM's directory (created, removed at teardown).
    pub leaf: PathBuf,
    /// cgroup v2: enable [`V2_CONTROLLERS`] from the mount down to the parent.
    pub enable_controllers: bool,
    /// v1 cpuset: copy `cpuset.cpus` and `cpuset.mems` down (a new v1 cpuset is empty and
    /// refuses tasks until they are set).
    pub copy_cpuset: bool,
    /// A file to write in the leaf and its contents (the memory limit).
    pub limit: Option<(&'static str, String)>,
}

/// The directories and files of VM cgroup `name` under `parent` (a relative path) in every
/// hierarchy, with `root` standing for [`CGROUP_MOUNT_BASE`] (`/proc/1/root/sys/fs/cgroup`
/// for the host's from a pod, a temporary tree in tests).
pub fn plan(
    hierarchies: &[Hierarchy],
    root: &Path,
    parent: &Path,
    name: &str,
    memory_max: Option<u64>,
) -> Vec<Target> {
    // A controller is bound to one hierarchy: on a hybrid host memory is v1's.
    let v1_memory = hierarchies.iter().any(|h| h.has("memory"));
    hierarchies
        .iter()
        .map(|h| {
            let mount = root.join(&h.rel);
            let parent = mount.join(parent);
            let leaf = parent.join(name);
            let limit = match (&h.kind, memory_max) {
                (HierarchyKind::Unified, Some(m)) if !v1_memory => Some(("memory.max", m.to_string())),
                (HierarchyKind::V1 { .. }, Some(m)) if h.has("memory") => {
                    Some(("memory.limit_in_bytes", m.to_string()))
                }
                _ => None,
            };
            Target {
                enable_controllers: h.kind == HierarchyKind::Unified,
                copy_cpuset: h.has("cpuset"),
                mount,
                parent,
                leaf,
                limit,
            }
        })
        .collect()
}

/// Controllers to write into a v2 `cgroup.subtree_control`: the wanted ones that
/// `cgroup.controllers` offers, as one `+a +b` line (`None` when there is nothing to enable).
pub fn subtree_control_line(available: &str, wanted: &[&str]) -> Option<String> {
    let have: Vec<&str> = available.split_whitespace().collect();
    let line: Vec<String> = wanted.iter().filter(|w| have.contains(w)).map(|w| format!("+{w}")).collect();
    (!line.is_empty()).then(|| line.join(" "))
}

/// Whether `/proc/<pid>/cgroup` text places the process in `leaf_rel` (a path relative to the
/// hierarchy root, e.g. `katamaran/kmr-x`) in the hierarchy carrying `controller` (`""` for
/// cgroup v2's `0::` line).
pub fn proc_cgroup_is(text: &str, controller: &str, leaf_rel: &Path) -> bool {
    let want = Path::new("/").join(leaf_rel);
    text.lines().any(|l| {
        let mut f = l.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else { return false };
        let matches_ctrl =
            if controller.is_empty() { ctrls.is_empty() } else { ctrls.split(',').any(|c| c == controller) };
        matches_ctrl && Path::new(path) == want
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's: v1 controllers, systemd's named hierarchy and an empty cgroup2.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// Debian 11 style v1: co-mounted controllers, xattr/release_agent options.
    const V1: &str = "\
25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
28 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,release_agent=/lib/systemd/systemd-cgroups-agent,name=systemd
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpu,cpuacct
32 25 0:29 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid shared:15 - cgroup cgroup rw,net_cls,net_prio
33 25 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:16 - cgroup cgroup rw,memory
99 33 0:30 / /mnt/memory-again rw - cgroup cgroup rw,memory
";
    /// A systemd host on the unified hierarchy; a container's own cgroupfs mount elsewhere.
    const V2: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn mountinfo_tables() {
        let hyb = parse_mountinfo(HYBRID);
        assert_eq!(mode(&hyb), Mode::Hybrid);
        let rels: Vec<_> = hyb.iter().map(|h| h.rel.display().to_string()).collect();
        assert_eq!(rels, ["cpu", "cpuset", "memory", "devices", "systemd", "unified"]);
        assert!(hyb[4].has("name=systemd"));

        let v1 = parse_mountinfo(V1);
        assert_eq!(mode(&v1), Mode::V1);
        assert_eq!(v1.len(), 4, "the second memory mount is the same hierarchy: {v1:?}");
        assert_eq!(v1[1].rel, Path::new("cpu,cpuacct"));
        assert!(v1[1].has("cpu") && v1[1].has("cpuacct") && !v1[1].has("memory"));
        assert_eq!(v1[0].kind, HierarchyKind::V1 { controllers: vec!["name=systemd".into()] });

        let v2 = parse_mountinfo(V2);
        assert_eq!(mode(&v2), Mode::V2);
        assert_eq!(v2, [Hierarchy { rel: PathBuf::new(), kind: HierarchyKind::Unified }]);

        assert_eq!(mode(&parse_mountinfo("garbage\n22 1 259:2 / / rw - ext4 /dev/x rw\n")), Mode::None);
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let line = "40 31 0:37 / /sys/fs/cgroup/with\\040space rw - cgroup cgroup rw,name=x\n";
        assert_eq!(parse_mountinfo(line)[0].rel, Path::new("with space"));
    }

    #[test]
    fn plan_places_the_vm_in_every_hierarchy() {
        let root = Path::new("/proc/1/root/sys/fs/cgroup");
        let t = plan(&parse_mountinfo(HYBRID), root, Path::new("katamaran"), "kmr-a1", Some(1 << 30));
        let leaves: Vec<_> = t.iter().map(|t| t.leaf.display().to_string()).collect();
        assert_eq!(
            leaves,
            [
                "/proc/1/root/sys/fs/cgroup/cpu/katamaran/kmr-a1",
                "/proc/1/root/sys/fs/cgroup/cpuset/katamaran/kmr-a1",
                "/proc/1/root/sys/fs/cgroup/memory/katamaran/kmr-a1",
                "/proc/1/root/sys/fs/cgroup/devices/katamaran/kmr-a1",
                "/proc/1/root/sys/fs/cgroup/systemd/katamaran/kmr-a1",
                "/proc/1/root/sys/fs/cgroup/unified/katamaran/kmr-a1",
            ]
        );
        let flags: Vec<_> =
            t.iter().map(|t| (t.copy_cpuset, t.enable_controllers, t.limit.clone())).collect();
        let lim = |f: &'static str| Some((f, (1u64 << 30).to_string()));
        assert_eq!(
            flags,
            [
                (false, false, None),
                (true, false, None),
                (false, false, lim("memory.limit_in_bytes")),
                (false, false, None),
                (false, false, None),
                (false, true, None),
            ]
        );
        let v2 =
            plan(&parse_mountinfo(V2), Path::new("/sys/fs/cgroup"), Path::new("katamaran"), "kmr-b", None);
        assert_eq!(v2[0].parent, Path::new("/sys/fs/cgroup/katamaran"));
        assert_eq!(v2[0].limit, None);
        let v2 = plan(&parse_mountinfo(V2), Path::new("/r"), Path::new("k"), "kmr-b", Some(4096));
        assert_eq!(v2[0].limit, Some(("memory.max", "4096".into())));
    }

    #[test]
    fn subtree_control_lines() {
        let cases = [
            ("cpuset cpu io memory hugetlb pids rdma misc", Some("+cpu +memory +pids")),
            ("memory pids\n", Some("+memory +pids")),
            ("io", None),
            ("", None),
        ];
        for (avail, want) in cases {
            assert_eq!(subtree_control_line(avail, V2_CONTROLLERS).as_deref(), want, "{avail:?}");
        }
    }

    #[test]
    fn names() {
        for ok in ["kmr-0123abcd", "vm_1.x", "a"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        let long = "x".repeat(256);
        assert_eq!(validate_name(&vm_cgroup_name(&"s".repeat(128), &"m".repeat(64))), Ok(()));
        for bad in ["", ".hidden", "cgroup.procs", "a/b", "a b", "..", long.as_str()] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proc_cgroup_lines() {
        let text = "9:name=systemd:/\n4:memory:/katamaran/kmr-a\n2:cpu,cpuacct:/katamaran/kmr-a\n0::/x\n";
        let leaf = Path::new("katamaran/kmr-a");
        assert!(proc_cgroup_is(text, "memory", leaf));
        assert!(proc_cgroup_is(text, "cpuacct", leaf));
        assert!(!proc_cgroup_is(text, "name=systemd", leaf));
        assert!(!proc_cgroup_is(text, "", leaf));
        assert!(proc_cgroup_is(text, "", Path::new("x")));
    }
}
