//! A private containerd for the wrapper's tests (own root, state, socket, namespace), a busybox
//! OCI image built on the spot, commands run with deadlines, and cleanup that leaves the host as
//! it was even when a test fails.

#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The wrapper under test.
pub const WRAPPER: &str = env!("CARGO_BIN_EXE_containerd-shim-katamaran-v2");
/// The extension.
pub const AGENT: &str = env!("CARGO_BIN_EXE_katamaran-agent");
/// The debug client.
pub const KATACTL: &str = env!("CARGO_BIN_EXE_katactl");
/// The image every container runs.
pub const IMAGE: &str = "katamaran.test/busybox:1";
/// Where containerd 1.6 puts shim sockets and runc state whatever its own root (`/run/containerd`).
const HOST_RUN: &str = "/run/containerd";

/// What a finished command said.
#[derive(Debug)]
pub struct Ran {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (or stdout and stderr interleaved, for [`run_combined`]).
    pub stdout: Vec<u8>,
    /// Standard error (empty for [`run_combined`]).
    pub stderr: Vec<u8>,
}

impl Ran {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

fn drain(fd: OwnedFd) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(fd);
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn finish(mut child: Child, outs: Vec<mpsc::Receiver<Vec<u8>>>, timeout: Duration, what: &str) -> Ran {
    let deadline = Instant::now() + timeout;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(s) => s.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child that has not been reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{what}: still running after {timeout:?}");
        }
    };
    // Output ends when every writer is gone: a process that kept the pipe (a detached extension
    // holding containerd's pipe would) shows up here as a hang.
    let mut got = Vec::new();
    for rx in outs {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(2));
        got.push(rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!("{what}: exited but its output pipe stayed open (a descendant inherited it)")
        }));
    }
    let stderr = if got.len() > 1 { got.pop().unwrap() } else { Vec::new() };
    Ran { status, stdout: got.pop().unwrap(), stderr }
}

fn feed(child: &mut Child, stdin: &[u8]) {
    if let Some(mut w) = child.stdin.take() {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&data);
        });
    }
}

/// Runs `cmd` with `stdin`, stdout and stderr on ONE pipe — how containerd runs a shim's `start`
/// (`CombinedOutput`) — and fails the test if it or its output outlives `timeout`.
pub fn run_combined(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Ran {
    // Close-on-exec, as Go's pipes are: only the child's stdout and stderr may hold the write end.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let w2 = w.try_clone().unwrap();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::from(w)).stderr(Stdio::from(w2)).spawn().unwrap();
    cmd.stdout(Stdio::null()).stderr(Stdio::null()); // drops our copies of the write end
    feed(&mut child, stdin);
    finish(child, vec![drain(r)], timeout, &format!("{cmd:?}"))
}

/// Runs `cmd` with separate stdout and stderr, with a deadline.
pub fn run_split(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Ran {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    feed(&mut child, stdin);
    let out = drain(OwnedFd::from(child.stdout.take().unwrap()));
    let err = drain(OwnedFd::from(child.stderr.take().unwrap()));
    finish(child, vec![out, err], timeout, &format!("{cmd:?}"))
}

/// Waits until `cond` holds, failing the test with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for process `pid` to exit (a pidfd, no polling), `false` on timeout.
pub fn exits_within(pid: u32, timeout: Duration) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { tokio::time::timeout(timeout, katamaran::pidfd::wait_exit(pid)).await.is_ok() })
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// A process's arguments.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Pids of live processes whose command line contains every one of `needles`.
pub fn pids_with(needles: &[&str]) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&pid| pid != std::process::id())
        .filter(|&pid| {
            let argv = cmdline(pid);
            alive(pid) && needles.iter().all(|n| argv.iter().any(|a| a == n))
        })
        .collect()
}

/// Sends SIGKILL to `pid` if it still runs.
pub fn kill(pid: u32) {
    if alive(pid) {
        // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// Fails the test, naming the integration step, when the agent cannot follow a shim: the wrapper
/// starts it with `--exit-with-pid` (see `katamaran::shim::agent`).
pub fn require_exit_with_pid() {
    let help = Command::new(AGENT).args(["sandbox", "--help"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--exit-with-pid"),
        "katamaran-agent sandbox has no --exit-with-pid: wire katamaran::shim::agent::{{until_exit_of, \
         PidFileGuard}} into bin/katamaran-agent.rs"
    );
}

/// Why the containerd tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (containerd and runc need it)".into());
    }
    for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "runc", "tar"] {
        if katamaran::shim::config::find_program(Path::new(tool), std::env::var_os("PATH").as_deref())
            .is_none()
        {
            return Some(format!("{tool} not on PATH (apt-get install containerd runc)"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox missing (apt-get install busybox-static)".into());
    }
    None
}

/// A private containerd. Dropping it removes every task, shim, mount and file it made.
#[derive(Debug)]
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub address: PathBuf,
    pub namespace: String,
    pub node_root: PathBuf,
    pub shim_config: PathBuf,
    child: Option<Child>,
    host_run_existed: bool,
}

impl Containerd {
    /// Starts containerd with the wrapper on its PATH; the wrapper is configured through
    /// `shim.toml` (rewritable per test with [`Containerd::configure`]).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("kt-ctrd-").tempdir().unwrap();
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(WRAPPER, bin.join("containerd-shim-katamaran-v2")).unwrap();
        let address = d.join("containerd.sock");
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{addr}\"\n[ttrpc]\n  address = \"{addr}.ttrpc\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                addr = address.display(),
            ),
        )
        .unwrap();
        let namespace = format!("kt-{}", std::process::id());
        let node_root = d.join("node");
        let shim_config = d.join("shim.toml");
        let path = std::env::join_paths(
            std::iter::once(bin.clone())
                .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let host_run_existed = Path::new(HOST_RUN).exists();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config).env("PATH", path).env("KATAMARAN_SHIM_CONFIG", &shim_config);
        // The wrapper's settings come from shim.toml alone: nothing inherited from the caller.
        for var in ["KATAMARAN_DELEGATE_SHIM", "KATAMARAN_AGENT", "KATAMARAN_ROOT", "KATAMARAN_EXTENSION"] {
            cmd.env_remove(var);
        }
        let child =
            cmd.env("KATAMARAN_LOG", "debug").stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        let c =
            Self { dir, address, namespace, node_root, shim_config, child: Some(child), host_run_existed };
        c.configure("containerd-shim-runc-v2");
        let addr = c.address.clone();
        wait_for("containerd's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&addr).is_ok()
        });
        c.import_busybox();
        c
    }

    /// Writes shim.toml: `delegate`, the agent under test, this test's root. The wrapper reads it
    /// at every call, so a test can change it between containers.
    pub fn configure(&self, delegate: &str) {
        std::fs::write(
            &self.shim_config,
            format!(
                "delegate = \"{delegate}\"\nagent = \"{AGENT}\"\nroot = \"{}\"\nstop_timeout = \"5s\"\n",
                self.node_root.display()
            ),
        )
        .unwrap();
    }

    /// `ctr` against this containerd, with a deadline.
    pub fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Ran {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.address).arg("--namespace").arg(&self.namespace).args(args);
        run_split(&mut cmd, b"", Duration::from_secs(60))
    }

    /// `ctr` that must succeed.
    pub fn ctr_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let r = self.ctr(args);
        assert!(r.status.success(), "ctr {:?} failed: {}{}", self.args_text(args), r.out(), r.err());
        r.out()
    }

    fn args_text<S: AsRef<OsStr>>(&self, args: &[S]) -> Vec<String> {
        args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect()
    }

    /// `ctr run -d` of the busybox image with the katamaran runtime and OCI `annotations`.
    pub fn run_detached(&self, id: &str, annotations: &[(&str, &str)], command: &[&str]) -> Ran {
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--runtime".into(),
            "io.containerd.katamaran.v2".into(),
            "--fifo-dir".into(),
            self.fifo_dir(),
        ];
        for (k, v) in annotations {
            args.push("--annotation".into());
            args.push(format!("{k}={v}"));
        }
        args.push(IMAGE.into());
        args.push(id.into());
        args.extend(command.iter().map(|s| (*s).to_owned()));
        self.ctr(&args)
    }

    /// `ctr task exec` (waits for the process, returns its output and exit status).
    pub fn exec(&self, id: &str, exec_id: &str, command: &[&str]) -> Ran {
        let mut args: Vec<String> =
            vec!["task".into(), "exec".into(), "--fifo-dir".into(), self.fifo_dir(), "--exec-id".into()];
        args.push(exec_id.into());
        args.push(id.into());
        args.extend(command.iter().map(|s| (*s).to_owned()));
        self.ctr(&args)
    }

    /// Stops and removes a container (task killed, task and container deleted).
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "delete", "--force", id]);
        let _ = self.ctr(&["container", "delete", id]);
    }

    /// The runc shim serving container `id`.
    pub fn runc_shim_pid(&self, id: &str) -> Option<u32> {
        let addr = self.address.to_string_lossy().into_owned();
        pids_with(&["-id", id, "-address", &addr])
            .into_iter()
            .find(|&p| cmdline(p).first().is_some_and(|a0| a0.ends_with("containerd-shim-runc-v2")))
    }

    /// The log containerd wrote (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn fifo_dir(&self) -> String {
        self.dir.path().join("fifo").display().to_string()
    }

    fn import_busybox(&self) {
        let tar = build_busybox_image(self.dir.path());
        self.ctr_ok(&[OsStr::new("images"), OsStr::new("import"), tar.as_os_str()]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks and containers first, so shims unmount their rootfs and exit.
        let listed = self.ctr(&["containers", "list", "--quiet"]);
        for id in listed.out().lines().filter(|l| !l.is_empty()) {
            self.remove(id);
        }
        let addr = self.address.to_string_lossy().into_owned();
        for pid in pids_with(&["-address", &addr]) {
            kill(pid);
        }
        let root = self.node_root.to_string_lossy().into_owned();
        for pid in pids_with(&["--root", &root]) {
            kill(pid);
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            if !exits_within(c.id(), Duration::from_secs(10)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        unmount_under(self.dir.path());
        let _ = std::fs::remove_dir_all(Path::new(HOST_RUN).join("runc").join(&self.namespace));
        if !self.host_run_existed {
            for sub in ["s", "runc", "fifo", ""] {
                let _ = std::fs::remove_dir(Path::new(HOST_RUN).join(sub));
            }
        }
    }
}

/// Lazily unmounts everything mounted under `dir` (rootfs mounts of shims that were killed).
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn tar(dir: &Path, out: &Path) {
    let r = run_split(
        Command::new("tar").arg("--numeric-owner").arg("-C").arg(dir).arg("-cf").arg(out).arg("."),
        b"",
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "tar: {}", r.err());
}

/// An OCI image layout tarball: one layer with /bin/busybox and its applets as symlinks.
pub fn build_busybox_image(work: &Path) -> PathBuf {
    let rootfs = work.join("image-rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in ["sh", "echo", "cat", "sleep", "true", "false", "ls", "env", "hostname"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let layout = work.join("image-layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer_path = work.join("layer.tar");
    tar(&rootfs, &layer_path);
    let layer = std::fs::read(&layer_path).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let digest = sha256_hex(data);
        std::fs::write(blobs.join(&digest), data).unwrap();
        (format!("sha256:{digest}"), data.len())
    };
    let (layer_digest, layer_size) = put(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": IMAGE},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let out = work.join("busybox-oci.tar");
    tar(&layout, &out);
    out
}
