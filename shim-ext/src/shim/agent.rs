//! The extension's side of its life cycle, for `katamaran-agent sandbox`: end when the sandbox's
//! shim process exits (`--exit-with-pid`, given by the wrapper), and leave no pid file behind.
//!
//! containerd tears a sandbox down through the Task API, straight to Kata; the wrapper hears of it
//! only if the shim dies. So the extension watches the shim itself.

use std::path::PathBuf;

use super::extension::{read_pid_file, ExtensionPaths};
use crate::sandbox::NodeLayout;

/// Resolves once process `pid` — the sandbox's long-running shim — has exited, at once if it is
/// already gone. With `None` (started by hand, no shim to follow) it never resolves. When the
/// kernel cannot watch the process, it says so in the log and never resolves: the wrapper's
/// `delete` still stops the extension.
pub async fn until_exit_of(pid: Option<u32>) {
    let Some(pid) = pid else { return std::future::pending().await };
    match crate::pidfd::wait_exit(pid).await {
        Ok(()) => tracing::info!(shim_pid = pid, "the sandbox's shim exited; stopping"),
        Err(e) => {
            tracing::warn!(shim_pid = pid, error = %e, "cannot watch the sandbox's shim; serving until stopped");
            std::future::pending::<()>().await;
        }
    }
}

/// Removes the extension's pid file when dropped, if the file still names this process (a newer
/// extension of the same sandbox id may have replaced it).
#[derive(Debug)]
pub struct PidFileGuard {
    path: PathBuf,
}

impl PidFileGuard {
    /// Guards sandbox `id`'s pid file under `layout`.
    pub fn new(layout: &NodeLayout, id: &str) -> Self {
        Self { path: ExtensionPaths::new(layout, id).pid_file }
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        if read_pid_file(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn follows_the_shim_and_only_when_told() {
        let mut shim = std::process::Command::new("sleep").arg("30").spawn().expect("spawn");
        let mut watch = tokio::spawn(until_exit_of(Some(shim.id())));
        let never = tokio::spawn(until_exit_of(None));
        let early = tokio::time::timeout(Duration::from_millis(100), &mut watch).await;
        assert!(early.is_err(), "resolved while the shim still runs");
        shim.kill().expect("kill");
        tokio::time::timeout(Duration::from_secs(5), watch).await.expect("in time").expect("join");
        shim.wait().expect("reap");
        assert!(!never.is_finished());
        never.abort();
    }

    #[test]
    fn pid_file_removed_only_if_ours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = NodeLayout::under(dir.path());
        let paths = ExtensionPaths::new(&layout, "sb");
        std::fs::create_dir_all(paths.pid_file.parent().expect("dir")).expect("mkdir");
        std::fs::write(&paths.pid_file, format!("{}\n", std::process::id())).expect("write");
        drop(PidFileGuard::new(&layout, "sb"));
        assert!(!paths.pid_file.exists(), "ours: removed");
        std::fs::write(&paths.pid_file, "4194000\n").expect("write");
        drop(PidFileGuard::new(&layout, "sb"));
        assert!(paths.pid_file.exists(), "another process's: kept");
    }
}
