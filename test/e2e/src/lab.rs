//! [`Lab`]: one two-node lab driven through `hack/lab.sh`, torn down when dropped.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::artifacts::{self, run_checked};
use crate::error::LabError;
use crate::reports::{self, ProbeReport};

/// One of the lab's two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `node-a` (10.201.0.11, fd00:201::11).
    A,
    /// `node-b` (10.201.0.12, fd00:201::12).
    B,
}

impl Node {
    /// The node's name in the lab (`node-a`, `node-b`).
    pub fn name(self) -> &'static str {
        match self {
            Node::A => "node-a",
            Node::B => "node-b",
        }
    }

    /// The node's address on the cluster network.
    pub fn addr_v4(self) -> Ipv4Addr {
        match self {
            Node::A => Ipv4Addr::new(10, 201, 0, 11),
            Node::B => Ipv4Addr::new(10, 201, 0, 12),
        }
    }
}

/// The disks a VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disks {
    /// No disk.
    None,
    /// N images in the lab's shared storage (`<root>/shared/`).
    Shared(u8),
    /// N images in the node's local storage (`<root>/<node>/disks/`).
    Local(u8),
}

impl Disks {
    fn arg(self) -> String {
        match self {
            Disks::None => "none".to_owned(),
            Disks::Shared(n) => format!("shared:{n}"),
            Disks::Local(n) => format!("local:{n}"),
        }
    }
}

/// How `lab.sh vm` starts a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOptions {
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Disks and where they live.
    pub disks: Disks,
    /// Guest disk-writer rate, records per second.
    pub writer_rate: u32,
    /// Start a migration destination (`-incoming defer`) instead of booting.
    pub incoming: bool,
    /// QEMU names its files `/run/vc/vm/<id>` as on a real node (`--node-paths`), for agents
    /// that see the node's files at their own paths (the deployment-shaped lab).
    pub node_paths: bool,
    /// Deadline for `KATAMARAN-GUEST-READY`.
    pub ready_timeout: Duration,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            mem_mib: 128,
            disks: Disks::None,
            writer_rate: 50, // the guest contract's example rate
            incoming: false,
            node_paths: false,
            ready_timeout: Duration::from_secs(180), // TCG boots in seconds; CI may be loaded
        }
    }
}

/// Where a sandbox's pieces are (from `lab.sh paths`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    /// The sandbox's network namespace name.
    pub netns: String,
    /// `/run/netns/<netns>`, as in the OCI bundle.
    pub netns_path: PathBuf,
    /// The node's namespace name.
    pub node_netns: String,
    /// The host-side veth in the node's namespace.
    pub node_veth: String,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, if it has one.
    pub ip6: Option<Ipv6Addr>,
    /// The pod's (and the guest NIC's) MAC.
    pub mac: String,
    /// `<node-root>/run/vc/vm/<id>`.
    pub vm_dir: PathBuf,
    /// `qmp.sock` (Kata's shim holds it in real deployments).
    pub qmp: PathBuf,
    /// `extra-monitor.sock` (the one katamaran uses).
    pub extra_monitor: PathBuf,
    /// QEMU's pidfile.
    pub pidfile: PathBuf,
    /// The guest's serial console log.
    pub console: PathBuf,
    /// `<node-root>/run/vc/sbs/<id>/persist.json`.
    pub persist: PathBuf,
    /// The OCI bundle directory.
    pub bundle: PathBuf,
    /// The bundle's `config.json`.
    pub config_json: PathBuf,
    /// The VM's disk images, in guest order (vda, vdb, …).
    pub disks: Vec<PathBuf>,
}

impl SandboxPaths {
    fn parse(text: &str) -> Result<Self, LabError> {
        let get = |key: &'static str| -> Result<String, LabError> {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
                .map(str::to_owned)
                .ok_or(LabError::PathsMissing { key })
        };
        let ip = get("IP")?.parse().map_err(|_| LabError::PathsMissing { key: "IP" })?;
        let ip6 = get("IP6")?;
        let ip6 = if ip6.is_empty() {
            None
        } else {
            Some(ip6.parse().map_err(|_| LabError::PathsMissing { key: "IP6" })?)
        };
        Ok(Self {
            netns: get("NETNS")?,
            netns_path: get("NETNS_PATH")?.into(),
            node_netns: get("NODE_NETNS")?,
            node_veth: get("NODE_VETH")?,
            ip,
            ip6,
            mac: get("MAC")?,
            vm_dir: get("VM_DIR")?.into(),
            qmp: get("QMP")?.into(),
            extra_monitor: get("EXTRA_MONITOR")?.into(),
            pidfile: get("PIDFILE")?.into(),
            console: get("CONSOLE")?.into(),
            persist: get("PERSIST")?.into(),
            bundle: get("BUNDLE")?.into(),
            config_json: get("CONFIG_JSON")?.into(),
            disks: get("DISKS")?.split_whitespace().map(PathBuf::from).collect(),
        })
    }

    /// QEMU's pid from the pidfile, if it is alive.
    pub fn qemu_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pidfile).ok()?.trim().parse().ok()?;
        pid_is_live(pid).then_some(pid)
    }
}

/// Whether `pid` names a live (not zombie) process.
pub fn pid_is_live(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Tears down labs of test processes that died without running `Drop` (killed by a harness
/// timeout, say): their namespaces and roots carry the dead process's id (see
/// [`LabConfig::unique`]). Runs under the lab lock; failures are printed, not fatal.
fn sweep_stale_labs() {
    let mut stale = std::collections::BTreeSet::new();
    // `<stem><pid>-<n>[-…]`
    let mut collect = |name: &str, stem: &str| {
        let Some(rest) = name.strip_prefix(stem) else { return };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(n)) = (parts.next(), parts.next()) else { return };
        let (Ok(pid), Ok(n)) = (pid.parse::<u32>(), n.parse::<u32>()) else { return };
        if !pid_is_live(pid) {
            stale.insert((pid, n));
        }
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            collect(&e.file_name().to_string_lossy(), "kmrt");
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            collect(&e.file_name().to_string_lossy(), "kmr-e2e-");
        }
    }
    for (pid, n) in stale {
        let config = LabConfig {
            root: std::env::temp_dir().join(format!("kmr-e2e-{pid}-{n}")),
            prefix: format!("kmrt{pid}-{n}-"),
            guest_dir: artifacts::guest_dir(),
        };
        let mut cmd = Command::new("bash");
        cmd.arg(artifacts::lab_script())
            .arg("down")
            .env("KMR_LAB_ROOT", &config.root)
            .env("KMR_LAB_PREFIX", &config.prefix)
            .stdin(Stdio::null());
        if let Err(e) = run_checked(&mut cmd, &format!("lab.sh down (stale lab {})", config.prefix)) {
            eprintln!("could not sweep a stale lab: {e}");
        }
    }
}

/// Where a lab lives: its file root and its namespace prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// `KMR_LAB_ROOT`.
    pub root: PathBuf,
    /// `KMR_LAB_PREFIX` (ends with `-`).
    pub prefix: String,
    /// `KMR_GUEST_DIR`: the guest image.
    pub guest_dir: PathBuf,
}

impl LabConfig {
    /// A root and prefix no other lab on this machine uses: the process id and a counter.
    pub fn unique() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Self {
            root: std::env::temp_dir().join(format!("kmr-e2e-{pid}-{n}")),
            prefix: format!("kmrt{pid}-{n}-"),
            guest_dir: artifacts::guest_dir(),
        }
    }
}

/// A running lab. Dropping it runs `lab.sh down` (so a failing test leaves nothing behind);
/// [`Lab::down`] does the same and reports whether everything was removed.
///
/// Every `Lab` holds an exclusive lock for its lifetime, so labs started through this crate run
/// one at a time: two TCG guests booting on two cores would blur the numbers they measure.
#[derive(Debug)]
pub struct Lab {
    config: LabConfig,
    torn_down: bool,
    probe: OnceLock<PathBuf>,
    scratch: AtomicU32,
    // Last: released only after `Drop` has torn the lab down.
    _lock: File,
}

impl Lab {
    /// Takes the lab lock and runs `lab.sh up`; returns the lab and how long `up` took.
    ///
    /// # Errors
    /// When the lock cannot be taken or `up` fails (the partial lab is torn down).
    pub fn up(config: LabConfig) -> Result<(Self, Duration), LabError> {
        let lab = Self::guard(config)?;
        let started = Instant::now();
        lab.run(&["up"])?;
        Ok((lab, started.elapsed()))
    }

    /// Takes the lab lock and returns a guard for a lab that may not exist yet or be half
    /// built (for driving `lab.sh up` by hand); dropping it runs `down` like any `Lab`.
    ///
    /// # Errors
    /// When the lock cannot be taken.
    pub fn guard(config: LabConfig) -> Result<Self, LabError> {
        // The script file itself is the lock: it always exists, so nothing is left behind.
        let script = artifacts::lab_script();
        let lock = File::open(&script).map_err(|source| LabError::Lock { path: script.clone(), source })?;
        lock.lock().map_err(|source| LabError::Lock { path: script.clone(), source })?;
        sweep_stale_labs();
        Ok(Self { config, torn_down: false, probe: OnceLock::new(), scratch: AtomicU32::new(0), _lock: lock })
    }

    /// The lab's file root.
    pub fn root(&self) -> &Path {
        &self.config.root
    }

    /// The lab's namespace prefix.
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// The namespace name of `client`, `router`, `node-a` or `node-b`.
    pub fn netns(&self, host: &str) -> String {
        format!("{}{host}", self.config.prefix)
    }

    /// A `hack/lab.sh` command with this lab's environment, for callers that need to spawn it.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(artifacts::lab_script())
            .env("KMR_LAB_ROOT", &self.config.root)
            .env("KMR_LAB_PREFIX", &self.config.prefix)
            .env("KMR_GUEST_DIR", &self.config.guest_dir)
            .stdin(Stdio::null());
        if let Some(probe) = self.probe.get() {
            cmd.env("KMR_PROBE", probe);
        }
        cmd
    }

    /// Runs `lab.sh ARGS…` to completion.
    ///
    /// # Errors
    /// When it exits non-zero (the error carries its stderr).
    pub fn run(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut cmd = self.command();
        cmd.args(args);
        run_checked(&mut cmd, &format!("lab.sh {}", args.join(" ")))
    }

    /// `lab.sh sandbox NODE ID --ip IP [--ip6 IP6]`.
    ///
    /// # Errors
    /// When the script fails.
    pub fn sandbox(
        &self,
        node: Node,
        id: &str,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
    ) -> Result<SandboxPaths, LabError> {
        let ip = ip.to_string();
        let ip6 = ip6.map(|a| a.to_string());
        let mut args = vec!["sandbox", node.name(), id, "--ip", ip.as_str()];
        if let Some(ip6) = &ip6 {
            args.extend(["--ip6", ip6.as_str()]);
        }
        self.run(&args)?;
        self.paths(node, id)
    }

    /// `lab.sh vm NODE ID …`; returns the wall time until the guest was ready (or, with
    /// `incoming`, until QEMU was waiting).
    ///
    /// # Errors
    /// When QEMU fails to start or the guest is not ready in time.
    pub fn vm(&self, node: Node, id: &str, opts: &VmOptions) -> Result<Duration, LabError> {
        let (mem, disks, rate) = (opts.mem_mib.to_string(), opts.disks.arg(), opts.writer_rate.to_string());
        let timeout = opts.ready_timeout.as_secs().max(1).to_string();
        let mut args = vec![
            "vm",
            node.name(),
            id,
            "--mem",
            &mem,
            "--disks",
            &disks,
            "--writer-rate",
            &rate,
            "--timeout",
            &timeout,
        ];
        if opts.incoming {
            args.push("--incoming");
        }
        if opts.node_paths {
            args.push("--node-paths");
        }
        let started = Instant::now();
        self.run(&args)?;
        Ok(started.elapsed())
    }

    /// `lab.sh kill-vm NODE ID`.
    ///
    /// # Errors
    /// When the script fails.
    pub fn kill_vm(&self, node: Node, id: &str) -> Result<(), LabError> {
        self.run(&["kill-vm", node.name(), id]).map(drop)
    }

    /// `lab.sh converge ID NODE`: the router's routes for the pod move to `node`.
    ///
    /// # Errors
    /// When the script fails.
    pub fn converge(&self, id: &str, node: Node) -> Result<(), LabError> {
        self.run(&["converge", id, node.name()]).map(drop)
    }

    /// `lab.sh paths NODE ID`.
    ///
    /// # Errors
    /// When the sandbox does not exist.
    pub fn paths(&self, node: Node, id: &str) -> Result<SandboxPaths, LabError> {
        let out = self.run(&["paths", node.name(), id])?;
        SandboxPaths::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// `lab.sh status` output.
    ///
    /// # Errors
    /// When the script fails.
    pub fn status(&self) -> Result<String, LabError> {
        Ok(String::from_utf8_lossy(&self.run(&["status"])?.stdout).into_owned())
    }

    /// Runs `argv` in `target` (`client`, `router`, `node-a`, `node-b` or `NODE/ID`).
    ///
    /// # Errors
    /// When it exits non-zero.
    pub fn exec(&self, target: &str, argv: &[&str]) -> Result<Output, LabError> {
        let mut args = vec!["exec", target];
        args.extend_from_slice(argv);
        self.run(&args)
    }

    /// The probe binary this lab runs (built on first use); also exported as `KMR_PROBE` to
    /// every later [`Lab::command`].
    ///
    /// # Errors
    /// When it cannot be built.
    pub fn probe_path(&self) -> Result<PathBuf, LabError> {
        if let Some(p) = self.probe.get() {
            return Ok(p.clone());
        }
        let built = artifacts::probe_bin()?;
        Ok(self.probe.get_or_init(|| built).clone())
    }

    /// A fresh file name under the lab root (deleted with the lab).
    pub fn scratch_path(&self, stem: &str) -> PathBuf {
        let n = self.scratch.fetch_add(1, Ordering::Relaxed);
        self.config.root.join(".lab").join(format!("{stem}-{n}"))
    }

    /// Runs the probe from the client namespace for `duration` and returns its report. The
    /// probe first waits (up to 30 s) for a first reply, so it may start while a guest boots.
    ///
    /// # Errors
    /// When the probe fails or writes no report.
    pub fn probe(&self, target: SocketAddr, rate: u32, duration: Duration) -> Result<ProbeReport, LabError> {
        self.probe_path()?;
        let json = self.scratch_path("probe.json");
        let (target_s, rate_s) = (target.to_string(), rate.to_string());
        let duration_s = format!("{}ms", duration.as_millis());
        let json_s = json.display().to_string();
        self.run(&[
            "probe",
            "--target",
            &target_s,
            "--rate",
            &rate_s,
            "--duration",
            &duration_s,
            "--wait-ready",
            "30s",
            "--json",
            &json_s,
        ])?;
        let report = reports::read_probe_report(&json);
        // Best effort: the file lives under the lab root, which `down` removes anyway.
        let _ = std::fs::remove_file(&json);
        report
    }

    /// Starts the probe in the background; [`RunningProbe::stop`] ends it and returns the
    /// report.
    ///
    /// # Errors
    /// When the probe cannot be built or started.
    pub fn spawn_probe(&self, target: SocketAddr, rate: u32) -> Result<RunningProbe, LabError> {
        self.probe_path()?;
        let json = self.scratch_path("probe.json");
        let stop_file = self.scratch_path("probe.stop");
        let mut cmd = self.command();
        cmd.args(["probe", "--target", &target.to_string(), "--rate", &rate.to_string()])
            .args(["--duration", "1h", "--wait-ready", "30s", "--json"])
            .arg(&json)
            .arg("--stop-file")
            .arg(&stop_file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child =
            cmd.spawn().map_err(|source| LabError::Spawn { command: "lab.sh probe".into(), source })?;
        Ok(RunningProbe { child: Some(child), json, stop_file })
    }

    /// What of this lab exists on the machine, checked independently of `lab.sh`: namespaces
    /// with the prefix, the root directory, live QEMUs whose command line names the root.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.config.prefix) {
                    found.push(format!("netns {name}"));
                }
            }
        }
        if self.config.root.exists() {
            found.push(format!("directory {}", self.config.root.display()));
        }
        let root = format!("{}/", self.config.root.display());
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
                let cmdline = String::from_utf8_lossy(&cmdline);
                let argv0 = cmdline.split('\0').next().unwrap_or("");
                if argv0.contains("qemu-system") && cmdline.contains(&root) && pid_is_live(pid) {
                    found.push(format!("qemu pid {pid}"));
                }
            }
        }
        found
    }

    /// Runs `lab.sh down`; returns how long it took.
    ///
    /// # Errors
    /// When `down` reports anything left behind.
    pub fn down(&mut self) -> Result<Duration, LabError> {
        self.torn_down = true;
        let started = Instant::now();
        self.run(&["down"])?;
        Ok(started.elapsed())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.torn_down {
            if let Err(e) = self.down() {
                eprintln!("lab teardown failed: {e}");
            }
        }
    }
}

/// A probe running in the background (see [`Lab::spawn_probe`]); killed if dropped unstopped.
#[derive(Debug)]
pub struct RunningProbe {
    child: Option<Child>,
    json: PathBuf,
    stop_file: PathBuf,
}

impl RunningProbe {
    /// Asks the probe to stop (through its stop file), waits for it and returns its report.
    ///
    /// # Errors
    /// When the probe does not finish within `deadline` or writes no report.
    pub fn stop(mut self, deadline: Duration) -> Result<ProbeReport, LabError> {
        File::create(&self.stop_file)
            .map_err(|source| LabError::ReportRead { path: self.stop_file.clone(), source })?;
        let Some(mut child) = self.child.take() else {
            return Err(LabError::Timeout { what: "a probe that was already stopped".into() });
        };
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if started.elapsed() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(LabError::Timeout { what: "the probe to stop".into() });
                }
                // Polling the child's exit: there is no portable blocking wait with a deadline.
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(source) => return Err(LabError::Wait { what: "the probe", source }),
            }
        }
        reports::read_probe_report(&self.json)
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
