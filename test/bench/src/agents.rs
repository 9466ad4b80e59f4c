//! katamaran's node agents, one per lab node, run inside the node's namespace as a DaemonSet
//! pod would be; stopped (TERM, then KILL) when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use katamaran::client;
use katamaran_e2e::{Lab, Node};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long an agent gets to serve its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent gets to exit after TERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running node agent.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
    /// `unix://…/agent.sock`.
    pub endpoint: String,
}

fn node_addresses(node: Node) -> &'static str {
    match node {
        Node::A => "10.201.0.11,fd00:201::11",
        Node::B => "10.201.0.12,fd00:201::12",
    }
}

impl Agent {
    /// Starts `katamaran-agent node` for `node` and waits until its socket answers.
    ///
    /// # Errors
    /// When it cannot start or does not answer in time (the error carries its log's tail).
    pub async fn start(lab: &Lab, node: Node, bin: &Path) -> anyhow::Result<Self> {
        let root = lab.root().join(node.name());
        let log = lab.scratch_path(&format!("agent-{}.log", node.name()));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone().context("cannot duplicate the log file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.netns(node.name())])
            .arg(bin)
            .arg("node")
            .arg("--root")
            .arg(&root)
            .args(["--node-address", node_addresses(node), "--node-interface", "eth0"])
            .args(["--host-proc", &format!("/proc/{}", std::process::id())])
            .env("KATAMARAN_LOG", "info")
            // The lab's guest image and shared disks are outside Kata's directories.
            .env(
                katamaran::sandbox::allowlist::ROOTS_ENV,
                std::env::join_paths([katamaran_e2e::artifacts::guest_dir(), lab.root().join("shared")])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let socket = root.join("run/katamaran/agent.sock");
        let mut agent = Agent { child: Some(child), log, endpoint: format!("unix://{}", socket.display()) };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if socket.exists() && client::connect(&agent.endpoint).await.is_ok() {
                return Ok(agent);
            }
            if let Some(Ok(Some(status))) = agent.child.as_mut().map(Child::try_wait) {
                bail!("the agent of {} exited ({status}):\n{}", node.name(), agent.log_tail(15));
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent of {} did not serve {} in time:\n{}",
                    node.name(),
                    socket.display(),
                    agent.log_tail(15)
                );
            }
            // The agent binds its socket once; nothing announces it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::guest::tail(&std::fs::read(&self.log).unwrap_or_default(), lines)
    }

    /// Stops the agent: TERM, then KILL after a grace period.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                // No blocking wait with a deadline on a child process in std.
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
