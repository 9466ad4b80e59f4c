//! Where things live on a node.
//!
//! Every root is configurable so two "nodes" can share one machine in the lab: a node is a
//! [`NodeLayout`] whose roots point under its own directory.

use std::path::{Path, PathBuf};

/// The directories katamaran reads and writes on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    /// Kata's run directory root: `<kata_run>/vc/vm/<id>` holds QMP sockets and the pid file,
    /// `<kata_run>/vc/sbs/<id>` holds `persist.json`. Kata's default is `/run`.
    pub kata_run: PathBuf,
    /// katamaran's own run directory: sockets under `sandboxes/`, incoming sandboxes' state under
    /// `incoming/`. Default `/run/katamaran`.
    pub katamaran_run: PathBuf,
    /// katamaran's persistent state (never tmpfs: it must survive agent restarts and hold
    /// incoming disks): migration journals under `migrations/`. Default `/var/lib/katamaran`.
    pub katamaran_state: PathBuf,
    /// Directory of containerd's v2 task bundles (`<bundles>/<id>/config.json`). containerd's
    /// default for Kubernetes is `/run/containerd/io.containerd.runtime.v2.task/k8s.io`.
    pub bundles: PathBuf,
}

impl Default for NodeLayout {
    fn default() -> Self {
        Self::under(Path::new("/"))
    }
}

impl NodeLayout {
    /// The standard layout with every path re-rooted under `root` (`/` gives the real node).
    pub fn under(root: &Path) -> Self {
        Self {
            kata_run: root.join("run"),
            katamaran_run: root.join("run/katamaran"),
            katamaran_state: root.join("var/lib/katamaran"),
            bundles: root.join("run/containerd/io.containerd.runtime.v2.task/k8s.io"),
        }
    }

    /// Kata's per-VM directory.
    pub fn vm_dir(&self, sandbox_id: &str) -> PathBuf {
        self.kata_run.join("vc/vm").join(sandbox_id)
    }

    /// The second QMP endpoint Kata opens when `extra_monitor_socket = "qmp"` is set; Kata's own
    /// shim keeps `qmp.sock`, and QEMU's QMP chardev serves one client at a time.
    pub fn extra_monitor_socket(&self, sandbox_id: &str) -> PathBuf {
        self.vm_dir(sandbox_id).join("extra-monitor.sock")
    }

    /// QEMU's pid file as Kata writes it.
    pub fn qemu_pid_file(&self, sandbox_id: &str) -> PathBuf {
        self.vm_dir(sandbox_id).join("pid")
    }

    /// Kata's persisted sandbox state directory.
    pub fn persist_dir(&self, sandbox_id: &str) -> PathBuf {
        self.kata_run.join("vc/sbs").join(sandbox_id)
    }

    /// A sandbox's OCI bundle `config.json`.
    pub fn bundle_config(&self, sandbox_id: &str) -> PathBuf {
        self.bundles.join(sandbox_id).join("config.json")
    }

    /// The per-sandbox extension's ttrpc socket.
    pub fn sandbox_socket(&self, sandbox_id: &str) -> PathBuf {
        self.katamaran_run.join("sandboxes").join(format!("{sandbox_id}.sock"))
    }

    /// The node agent's ttrpc socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.katamaran_run.join("agent.sock")
    }

    /// State of an incoming (destination) sandbox: QMP, pid file, logs, disks in local mode.
    pub fn incoming_dir(&self, sandbox_id: &str) -> PathBuf {
        self.katamaran_run.join("incoming").join(sandbox_id)
    }

    /// The durable journals of the migrations this node takes part in.
    pub fn journal_dir(&self) -> PathBuf {
        self.katamaran_state.join("migrations")
    }

    /// Reads QEMU's pid from Kata's pid file.
    ///
    /// # Errors
    /// [`super::Error::Read`] when the file cannot be read, [`super::Error::BadPidFile`] when it
    /// does not hold a positive integer.
    pub fn read_qemu_pid(&self, sandbox_id: &str) -> Result<u32, super::Error> {
        let path = self.qemu_pid_file(sandbox_id);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| super::Error::Read { path: path.clone(), source })?;
        match text.trim().parse::<u32>() {
            Ok(pid) if pid > 0 => Ok(pid),
            _ => Err(super::Error::BadPidFile { path, content: text.trim().chars().take(64).collect() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_are_katas() {
        let l = NodeLayout::default();
        assert_eq!(l.extra_monitor_socket("abc"), Path::new("/run/vc/vm/abc/extra-monitor.sock"));
        assert_eq!(l.qemu_pid_file("abc"), Path::new("/run/vc/vm/abc/pid"));
        assert_eq!(l.persist_dir("abc"), Path::new("/run/vc/sbs/abc"));
        assert_eq!(l.sandbox_socket("abc"), Path::new("/run/katamaran/sandboxes/abc.sock"));
        assert_eq!(
            l.bundle_config("abc"),
            Path::new("/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/config.json")
        );
    }

    #[test]
    fn rerooted_layout_keeps_nodes_apart() {
        let a = NodeLayout::under(Path::new("/lab/node-a"));
        let b = NodeLayout::under(Path::new("/lab/node-b"));
        assert_eq!(a.vm_dir("x"), Path::new("/lab/node-a/run/vc/vm/x"));
        assert_ne!(a.sandbox_socket("x"), b.sandbox_socket("x"));
    }

    #[test]
    fn pid_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = NodeLayout::under(dir.path());
        let vm = l.vm_dir("s1");
        std::fs::create_dir_all(&vm).expect("mkdir");
        assert!(matches!(l.read_qemu_pid("s1"), Err(crate::sandbox::Error::Read { .. })));
        std::fs::write(vm.join("pid"), "4242\n").expect("write");
        assert_eq!(l.read_qemu_pid("s1").expect("pid"), 4242);
        std::fs::write(vm.join("pid"), "nope").expect("write");
        let err = l.read_qemu_pid("s1").expect_err("bad pid");
        assert!(err.to_string().contains("\"nope\""), "{err}");
        std::fs::write(vm.join("pid"), "0").expect("write");
        assert!(l.read_qemu_pid("s1").is_err());
    }
}
