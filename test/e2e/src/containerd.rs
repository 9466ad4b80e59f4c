//! A private containerd (own root, state, socket and namespace; no CRI plugin) that runs
//! containers from an OCI runtime spec with runc, driven through `ctr` as an operator would.
//! Dropping it removes every task and container it ran and stops it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;

use crate::artifacts::run_checked;
use crate::error::LabError;

/// How long containerd may take to serve its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Where containerd 1.6 keeps shim sockets and runc state whatever its own root.
const HOST_RUN: &str = "/run/containerd";

/// Why containerd or a container could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum CtrError {
    /// A command failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A file could not be written.
    #[error("could not write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The spec could not be saved.
    #[error("could not save the runtime spec")]
    Spec(#[source] oci_spec::OciSpecError),
    /// A task is not in the state asked for.
    #[error("container {id}: {what}")]
    Task {
        /// The container.
        id: String,
        /// What is wrong.
        what: String,
    },
}

/// Whether this machine can run containers under containerd, and why not.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (containerd and runc need it)".into());
    }
    ["containerd", "ctr", "containerd-shim-runc-v2", "runc", "nsenter"]
        .into_iter()
        .find(|tool| !crate::artifacts::on_path(tool))
        .map(|tool| format!("{tool} not on PATH (apt-get install containerd runc util-linux)"))
}

/// A private containerd.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    address: PathBuf,
    namespace: String,
    child: Option<Child>,
    host_run_existed: bool,
}

impl Containerd {
    /// Starts containerd with its root, state and socket under `dir`.
    ///
    /// # Errors
    /// When it cannot start or does not serve its socket in time.
    pub fn start(dir: &Path) -> Result<Self, CtrError> {
        let write = |path: PathBuf, text: String| {
            std::fs::write(&path, text).map_err(|source| CtrError::Write { path, source })
        };
        std::fs::create_dir_all(dir.join("specs"))
            .map_err(|source| CtrError::Write { path: dir.join("specs"), source })?;
        let address = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        write(
            config.clone(),
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{addr}\"\n[ttrpc]\n  address = \"{addr}.ttrpc\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                addr = address.display(),
            ),
        )?;
        let log = dir.join("containerd.log");
        let out =
            std::fs::File::create(&log).map_err(|source| CtrError::Write { path: log.clone(), source })?;
        let err = out.try_clone().map_err(|source| CtrError::Write { path: log, source })?;
        let host_run_existed = Path::new(HOST_RUN).exists();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| LabError::Spawn { command: "containerd".into(), source })?;
        let namespace = format!("kmr-{}", std::process::id());
        let c = Self { dir: dir.to_owned(), address, namespace, child: Some(child), host_run_existed };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&c.address).is_err() {
            if started.elapsed() > START_TIMEOUT {
                return Err(LabError::Timeout {
                    what: format!("containerd's socket {}", c.address.display()),
                }
                .into());
            }
            std::thread::sleep(crate::agents::POLL);
        }
        Ok(c)
    }

    /// `ctr ARGS…` against this containerd.
    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.address).arg("--namespace").arg(&self.namespace).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `ctr ARGS…` that must succeed.
    fn ctr_ok(&self, args: &[&str]) -> Result<Output, CtrError> {
        Ok(run_checked(&mut self.ctr(args), &format!("ctr {}", args.join(" ")))?)
    }

    /// Creates container `id` from `spec` and starts its task detached, its output in `log`
    /// (`ctr run -d --config`).
    ///
    /// # Errors
    /// When the spec cannot be saved or `ctr` fails.
    pub fn run(&self, id: &str, spec: &Spec, log: &Path) -> Result<(), CtrError> {
        let path = self.dir.join("specs").join(format!("{id}.json"));
        spec.save(&path).map_err(CtrError::Spec)?;
        let uri = format!("file://{}", log.display());
        let path = path.to_string_lossy().into_owned();
        self.ctr_ok(&["run", "-d", "--config", &path, "--log-uri", &uri, id])?;
        Ok(())
    }

    /// The pid of container `id`'s task while it runs.
    ///
    /// # Errors
    /// When `ctr task ls` fails.
    pub fn task_pid(&self, id: &str) -> Result<Option<u32>, CtrError> {
        let out = self.ctr_ok(&["task", "ls"])?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.as_slice() {
                [task, pid, "RUNNING", ..] if *task == id => pid.parse().ok(),
                _ => None,
            }
        }))
    }

    /// Sends `signal` (`SIGKILL`, `SIGTERM`) to the task's init and waits up to `limit` for it
    /// to stop, as the kubelet stops a container.
    ///
    /// # Errors
    /// When `ctr` fails or the task still runs after `limit`.
    pub fn kill(&self, id: &str, signal: &str, limit: Duration) -> Result<(), CtrError> {
        self.ctr_ok(&["task", "kill", "--signal", signal, id])?;
        let started = Instant::now();
        while self.task_pid(id)?.is_some() {
            if started.elapsed() > limit {
                return Err(CtrError::Task {
                    id: id.into(),
                    what: format!("still running {limit:?} after {signal}"),
                });
            }
            std::thread::sleep(crate::agents::POLL);
        }
        Ok(())
    }

    /// Runs `argv` in container `id` and returns its output (`ctr task exec`).
    ///
    /// # Errors
    /// When `ctr` cannot run; the command's own failure is in the output's status.
    pub fn exec(&self, id: &str, exec_id: &str, argv: &[&str]) -> Result<Output, CtrError> {
        let fifo = self.dir.join("fifo").to_string_lossy().into_owned();
        let mut args = vec!["task", "exec", "--fifo-dir", &fifo, "--exec-id", exec_id, id];
        args.extend_from_slice(argv);
        self.ctr(&args)
            .output()
            .map_err(|source| LabError::Spawn { command: format!("ctr task exec {id}"), source }.into())
    }

    /// Deletes container `id` and its task, killing it first if it runs.
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "delete", "--force", id]).output();
        let _ = self.ctr(&["container", "delete", id]).output();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(out) = self.ctr(&["containers", "list", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()) {
                self.remove(id);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = crate::agents::signal(child.id(), nix::sys::signal::Signal::SIGTERM);
            let started = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(crate::agents::POLL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(Path::new(HOST_RUN).join("runc").join(&self.namespace));
        if !self.host_run_existed {
            for sub in ["s", "runc", "fifo", ""] {
                let _ = std::fs::remove_dir(Path::new(HOST_RUN).join(sub));
            }
        }
    }
}
