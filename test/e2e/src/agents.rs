//! The migration engine in the lab: a node agent (`katamaran-agent node`) inside each node's
//! namespace, migrations driven between them through [`katamaran::cluster::orchestrate::run`],
//! the one orchestration every caller uses (typed results, an action at a chosen event), and what a migration test checks afterwards: a
//! [`Snapshot`] of everything the engine may create on a node, traffic counters, the
//! destination's disk images and QEMU.
//!
//! The agents are child processes of the test, killed by [`Agent`]'s `Drop` (SIGTERM, then
//! SIGKILL) even when an assertion fails; declare the [`Engine`] after the [`Lab`] so that it is
//! dropped first, while the lab (and the agents' logs under its root) still exists.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use katamaran::client::{self, ClientError};
use katamaran::cluster::orchestrate::{self, Plan, Progress, Report, Route, Settings, Side};
use katamaran::cluster::transport::{self, Agent as AgentClient};
use katamaran::migration::MigrationOptions;
use katamaran_protos::ttrpc;
use katamaran_protos::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::artifacts::{self, run_checked, tail};
use crate::error::LabError;
use crate::lab::{pid_is_live, Lab, Node};

mod checks;
pub use checks::{
    disk_compare, katactl, rx_packets, wait_for_rx, wait_unchanged, CtlRun, DiskCompare, Snapshot,
};

/// Deadline of each unary RPC a test makes.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to serve its socket after being started.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an agent has to exit on SIGTERM before it is killed.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);

/// The port of a lab agent's `/healthz`, `/readyz` and `/metrics`, on its node namespace's
/// loopback.
pub const AGENT_HTTP_PORT: u16 = 10557;

/// GETs `path` from `node`'s agent HTTP endpoint; the body of a 200 answer.
///
/// # Errors
/// As [`crate::netns::http_get`] (a non-200 status is an error naming it).
pub fn agent_http(lab: &Lab, node: Node, path: &str) -> Result<String, LabError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], AGENT_HTTP_PORT));
    crate::netns::http_get_path(&lab.netns(node.name()), addr, path, Duration::from_secs(5))
}

/// The value of the sample `series` (name and labels, as written) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
/// Polling interval for conditions that have no event to wait on (process exit, a socket
/// appearing, a counter growing).
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Why an engine helper failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A lab helper (command, namespace, report) failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The agent's log file could not be created.
    #[error("could not create the agent log {path}")]
    LogFile {
        /// The log's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("could not start {what}")]
    Spawn {
        /// The program.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An agent exited while starting.
    #[error("the {node} agent exited ({status}) while starting; its log ends with:\n{log}")]
    AgentExited {
        /// Which node.
        node: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// An agent did not serve its socket in time.
    #[error(
        "the {node} agent did not serve {socket} within {AGENT_READY_TIMEOUT:?}; its log ends with:\n{log}"
    )]
    AgentNotReady {
        /// Which node.
        node: &'static str,
        /// The socket it should serve.
        socket: PathBuf,
        /// The end of its log.
        log: String,
    },
    /// The async runtime for the client could not be built.
    #[error("could not build the client runtime")]
    Runtime(#[source] std::io::Error),
    /// The client could not reach an agent.
    #[error("could not connect to the {node} agent")]
    Connect {
        /// Which node.
        node: &'static str,
        /// The client's error.
        #[source]
        source: ClientError,
    },
    /// An RPC to an agent failed.
    #[error("{rpc} on the {node} agent: {}", client::rpc_text(.source))]
    Rpc {
        /// The RPC.
        rpc: &'static str,
        /// Which node.
        node: &'static str,
        /// The ttrpc error.
        source: ttrpc::Error,
    },
    /// No migration id could be generated.
    #[error("could not generate a migration id")]
    MigrationId(#[source] katamaran::dataplane::Error),
    /// The source agent could not describe the sandbox.
    #[error("inspecting the sandbox on the source failed")]
    Inspect(#[source] Box<transport::Error>),
    /// The orchestration refused or failed before both sides were being watched.
    #[error("the migration did not start")]
    Drive(#[source] Box<orchestrate::Error>),
    /// A migration did not end in time.
    #[error("the migration did not end within {0:?}")]
    MigrationDeadline(Duration),
    /// A signal could not be sent.
    #[error("could not signal pid {pid}")]
    Signal {
        /// The process.
        pid: u32,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
    /// A child process could not be waited for.
    #[error("could not wait for {what}")]
    Wait {
        /// Which process.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A directory of the engine could not be listed.
    #[error("could not list {path}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The engine's binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineBins {
    /// `katamaran-agent`.
    pub agent: PathBuf,
    /// `katactl`.
    pub katactl: PathBuf,
}

/// The engine's binaries: `KMR_AGENT` and `KMR_KATACTL` when both are set, else a **release**
/// build of both into the workspace's target directory (once per test process). Release,
/// because the tests measure the reaction to STOP and RESUME: a debug build reacts several
/// times slower and loses the packets that arrive meanwhile.
///
/// # Errors
/// When cargo fails or does not produce the binaries.
pub fn engine_bins() -> Result<EngineBins, AgentError> {
    static BUILT: OnceLock<EngineBins> = OnceLock::new();
    if let Some(b) = BUILT.get() {
        return Ok(b.clone());
    }
    let bins = match (std::env::var_os("KMR_AGENT"), std::env::var_os("KMR_KATACTL")) {
        (Some(agent), Some(katactl)) => EngineBins { agent: agent.into(), katactl: katactl.into() },
        _ => {
            let target = artifacts::target_dir();
            let mut cmd = artifacts::cargo_command();
            // The test-only fail points are compiled in (inert unless KATAMARAN_FAILPOINTS is
            // set): the fault matrix holds migrations at exact moments.
            cmd.args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "katamaran-shim-ext",
                "--features",
                "failpoints",
            ])
            .args(["--bin", "katamaran-agent", "--bin", "katactl"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(artifacts::workspace_root());
            run_checked(&mut cmd, "cargo build --release -p katamaran-shim-ext")?;
            let dir = target.join("release");
            EngineBins { agent: dir.join("katamaran-agent"), katactl: dir.join("katactl") }
        }
    };
    for path in [&bins.agent, &bins.katactl] {
        if !path.is_file() {
            return Err(LabError::Missing { what: "an engine binary", path: path.clone() }.into());
        }
    }
    Ok(BUILT.get_or_init(|| bins).clone())
}

/// The node's IPv6 address on the cluster network (`fd00:201::11`, `::12`).
pub fn node_addr_v6(node: Node) -> Ipv6Addr {
    let last = match node {
        Node::A => 0x11,
        Node::B => 0x12,
    };
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, last)
}

/// The other node.
pub fn other(node: Node) -> Node {
    match node {
        Node::A => Node::B,
        Node::B => Node::A,
    }
}

/// `<root>/<node>/run/katamaran`: everything the engine keeps on a node.
pub fn engine_dir(lab: &Lab, node: Node) -> PathBuf {
    lab.root().join(node.name()).join("run/katamaran")
}

/// Where the destination keeps a received sandbox (`incoming/<id>`: QMP, pidfile, disks).
pub fn incoming_dir(lab: &Lab, node: Node, id: &str) -> PathBuf {
    engine_dir(lab, node).join("incoming").join(id)
}

/// Where `node`'s agent keeps the local disks of incoming sandbox `id` (under its state
/// directory, `<root>/var/lib/katamaran`).
pub fn incoming_disks_dir(lab: &Lab, node: Node, id: &str) -> PathBuf {
    lab.root().join(node.name()).join("var/lib/katamaran/disks").join(id)
}

/// The pid of the QEMU the engine started for an incoming sandbox, if it is alive.
pub fn incoming_qemu_pid(lab: &Lab, node: Node, id: &str) -> Option<u32> {
    let pid: u32 =
        std::fs::read_to_string(incoming_dir(lab, node, id).join("pid")).ok()?.trim().parse().ok()?;
    pid_is_live(pid).then_some(pid)
}

/// Sends `signal` to `pid`.
///
/// # Errors
/// When the signal cannot be sent (no such process, no permission).
pub fn signal(pid: u32, signal: Signal) -> Result<(), AgentError> {
    let raw = i32::try_from(pid).map_err(|_| AgentError::Signal { pid, source: nix::Error::EINVAL })?;
    kill(Pid::from_raw(raw), signal).map_err(|source| AgentError::Signal { pid, source })
}

/// Waits until `pid` is gone (or a zombie); returns how long that took.
///
/// # Errors
/// [`LabError::Timeout`] after `limit`.
pub fn wait_for_exit(pid: u32, limit: Duration) -> Result<Duration, AgentError> {
    let started = Instant::now();
    while pid_is_live(pid) {
        if started.elapsed() > limit {
            return Err(LabError::Timeout { what: format!("pid {pid} to exit") }.into());
        }
        std::thread::sleep(POLL);
    }
    Ok(started.elapsed())
}

/// A node agent running in its node's namespace; stopped when dropped.
#[derive(Debug)]
pub struct Agent {
    node: Node,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts `katamaran-agent node` for `node` (its root, both node addresses, `eth0` as the
    /// interface towards the other node) and waits until it accepts connections.
    ///
    /// # Errors
    /// When it cannot start, exits, or does not serve its socket in time.
    pub fn start(lab: &Lab, node: Node, bin: &Path) -> Result<Self, AgentError> {
        Self::start_with(lab, node, bin, &[])
    }

    /// [`Agent::start`] with extra environment (e.g. `KATAMARAN_FAILPOINTS`).
    ///
    /// # Errors
    /// As [`Agent::start`].
    pub fn start_with(lab: &Lab, node: Node, bin: &Path, env: &[(&str, String)]) -> Result<Self, AgentError> {
        Self::start_with_args(lab, node, bin, env, &[])
    }

    /// [`Agent::start_with`] with extra arguments after the lab's own (e.g. `--kubeconfig`).
    ///
    /// # Errors
    /// As [`Agent::start`].
    pub fn start_with_args(
        lab: &Lab,
        node: Node,
        bin: &Path,
        env: &[(&str, String)],
        args: &[String],
    ) -> Result<Self, AgentError> {
        let root = lab.root().join(node.name());
        let socket = engine_dir(lab, node).join("agent.sock");
        let log = lab.scratch_path(&format!("agent-{}.log", node.name()));
        let out = std::fs::File::create(&log)
            .map_err(|source| AgentError::LogFile { path: log.clone(), source })?;
        let err = out.try_clone().map_err(|source| AgentError::LogFile { path: log.clone(), source })?;
        let level = std::env::var("KMR_AGENT_LOG").unwrap_or_else(|_| "info".into());
        // The destination runs a source's QEMU only with files under allowed roots; the lab's
        // guest image and shared disks live outside Kata's directories.
        let roots =
            std::env::join_paths([artifacts::guest_dir(), lab.root().join("shared")]).unwrap_or_default();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.netns(node.name())])
            .arg(bin)
            .arg("node")
            .arg("--root")
            .arg(&root)
            .arg("--node-address")
            .arg(format!("{},{}", node.addr_v4(), node_addr_v6(node)))
            .args(["--node-interface", "eth0"])
            // As deployed: VM cgroups in the host's hierarchies, seen through a host process (the
            // DaemonSet names pid 1; here the harness) — `ip netns exec` gives the agent a /sys
            // without them.
            .args(["--host-proc", &format!("/proc/{}", std::process::id())])
            .args(["--vm-cgroup", "required"])
            // Health and metrics, on the node namespace's loopback.
            .args([
                "--listen-http",
                &std::net::SocketAddr::from(([127, 0, 0, 1], AGENT_HTTP_PORT)).to_string(),
            ])
            .args(args)
            .env("KATAMARAN_LOG", level)
            .env(katamaran::sandbox::allowlist::ROOTS_ENV, roots)
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .map_err(|source| AgentError::Spawn { what: format!("the {} agent", node.name()), source })?;
        let mut agent = Self { node, child: Some(child), socket, log };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<(), AgentError> {
        let started = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                let exited = child.try_wait().map_err(|source| AgentError::Wait {
                    what: format!("the {} agent", self.node.name()),
                    source,
                })?;
                if let Some(status) = exited {
                    self.child = None;
                    return Err(AgentError::AgentExited {
                        node: self.node.name(),
                        status,
                        log: self.log_tail(30),
                    });
                }
            }
            if started.elapsed() > AGENT_READY_TIMEOUT {
                return Err(AgentError::AgentNotReady {
                    node: self.node.name(),
                    socket: self.socket.clone(),
                    log: self.log_tail(30),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `unix://<socket>`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `lines` lines of the agent's log.
    pub fn log_tail(&self, lines: usize) -> String {
        std::fs::read(&self.log).map_or_else(|e| format!("(no log: {e})"), |b| tail(&b, lines))
    }

    /// SIGKILLs the agent (a crash) and reaps it.
    ///
    /// # Errors
    /// When it cannot be signalled or waited for.
    pub fn kill(&mut self) -> Result<(), AgentError> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let _ = child.kill();
        child
            .wait()
            .map_err(|source| AgentError::Wait { what: format!("the {} agent", self.node.name()), source })?;
        Ok(())
    }

    /// Sends SIGTERM and waits up to `grace` for the agent to exit; kills it after that.
    /// Returns how long it took to exit on SIGTERM, or `None` when it had to be killed.
    ///
    /// # Errors
    /// When it cannot be signalled or waited for.
    pub fn stop(&mut self, grace: Duration) -> Result<Option<Duration>, AgentError> {
        let Some(mut child) = self.child.take() else { return Ok(Some(Duration::ZERO)) };
        let what = || format!("the {} agent", self.node.name());
        signal(child.id(), Signal::SIGTERM)?;
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(Some(started.elapsed())),
                Ok(None) if started.elapsed() > grace => {
                    let _ = child.kill();
                    child.wait().map_err(|source| AgentError::Wait { what: what(), source })?;
                    return Ok(None);
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(source) => return Err(AgentError::Wait { what: what(), source }),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} agent log (last 40 lines) ---\n{}", self.node.name(), self.log_tail(40));
        }
        if let Err(e) = self.stop(AGENT_STOP_GRACE) {
            eprintln!("could not stop the {} agent: {e}", self.node.name());
        }
    }
}

/// What to do when a migration event matches a [`Trigger`].
pub enum Action {
    /// Cancel the migration on both sides (the client's Cancel, as Ctrl-C in katactl).
    Cancel,
    /// Run a function (e.g. kill a process) while the migration goes on.
    Run(Box<dyn FnOnce()>),
}

/// Decides, event by event, whether a [`Trigger`] fires.
type EventPredicate = Box<dyn FnMut(Side, &pb::MigrationEvent) -> bool>;

/// An action taken at the first event for which `when` holds.
pub struct Trigger {
    when: EventPredicate,
    action: Option<Action>,
}

impl Trigger {
    /// Cancels the migration at the first event for which `when` holds.
    pub fn cancel_when(when: impl FnMut(Side, &pb::MigrationEvent) -> bool + 'static) -> Self {
        Self { when: Box::new(when), action: Some(Action::Cancel) }
    }

    /// Runs `f` at the first event for which `when` holds.
    pub fn run_when(
        when: impl FnMut(Side, &pb::MigrationEvent) -> bool + 'static,
        f: impl FnOnce() + 'static,
    ) -> Self {
        Self { when: Box::new(when), action: Some(Action::Run(Box::new(f))) }
    }
}

impl fmt::Debug for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match &self.action {
            Some(Action::Cancel) => "cancel",
            Some(Action::Run(_)) => "run",
            None => "fired",
        };
        f.debug_struct("Trigger").field("action", &action).finish_non_exhaustive()
    }
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Cancel => "Cancel",
            Action::Run(_) => "Run(..)",
        })
    }
}

/// A driven migration.
#[derive(Debug, Clone)]
pub struct Migration {
    /// What the orchestration saw and decided.
    pub summary: Report,
    /// The event at which the trigger fired, if it did.
    pub triggered_at: Option<(Side, pb::MigrationEvent)>,
}

/// The phase of an event.
pub fn phase(e: &pb::MigrationEvent) -> pb::Phase {
    client::phase(e)
}

/// Both node agents and a client connected to each.
pub struct Engine {
    // Dropped in this order: clients, then agents, then the runtime the clients live on.
    clients: [pb::MigrationClient; 2],
    agents: [Agent; 2],
    rt: tokio::runtime::Runtime,
    bins: EngineBins,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("agents", &self.agents)
            .field("bins", &self.bins)
            .finish_non_exhaustive()
    }
}

fn idx(node: Node) -> usize {
    match node {
        Node::A => 0,
        Node::B => 1,
    }
}

impl Engine {
    /// Starts an agent on each node and connects to both.
    ///
    /// # Errors
    /// When the binaries cannot be built or an agent does not come up.
    pub fn start(lab: &Lab) -> Result<Self, AgentError> {
        Self::start_with(lab, &[], &[])
    }

    /// [`Engine::start`] with extra environment for node-a's and node-b's agents.
    ///
    /// # Errors
    /// As [`Engine::start`].
    pub fn start_with(
        lab: &Lab,
        env_a: &[(&str, String)],
        env_b: &[(&str, String)],
    ) -> Result<Self, AgentError> {
        let bins = engine_bins()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AgentError::Runtime)?;
        let agents = [
            Agent::start_with(lab, Node::A, &bins.agent, env_a)?,
            Agent::start_with(lab, Node::B, &bins.agent, env_b)?,
        ];
        let connect = |node: Node| {
            rt.block_on(client::connect(&agents[idx(node)].endpoint()))
                .map_err(|source| AgentError::Connect { node: node.name(), source })
        };
        let clients = [connect(Node::A)?, connect(Node::B)?];
        Ok(Self { clients, agents, rt, bins })
    }

    /// SIGKILLs `node`'s agent (a crash) and starts a new one without extra environment; the
    /// new agent recovers from its journal before it serves.
    ///
    /// # Errors
    /// When the agent cannot be killed, started or reached.
    pub fn crash_and_restart(&mut self, lab: &Lab, node: Node) -> Result<(), AgentError> {
        self.agents[idx(node)].kill()?;
        self.agents[idx(node)] = Agent::start(lab, node, &self.bins.agent)?;
        let client = self
            .rt
            .block_on(client::connect(&self.agents[idx(node)].endpoint()))
            .map_err(|source| AgentError::Connect { node: node.name(), source })?;
        self.clients[idx(node)] = client;
        Ok(())
    }

    /// The binaries the agents run.
    pub fn bins(&self) -> &EngineBins {
        &self.bins
    }

    /// The agent of `node`.
    pub fn agent(&self, node: Node) -> &Agent {
        &self.agents[idx(node)]
    }

    /// The agent of `node`, to stop it.
    pub fn agent_mut(&mut self, node: Node) -> &mut Agent {
        &mut self.agents[idx(node)]
    }

    /// The `Migration` client of `node`'s agent.
    pub fn client(&self, node: Node) -> &pb::MigrationClient {
        &self.clients[idx(node)]
    }

    /// Runs a future on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// `Inspect` on `node`'s agent.
    ///
    /// # Errors
    /// The RPC's failure.
    pub fn inspect(&self, node: Node, id: &str) -> Result<pb::Sandbox, AgentError> {
        let mut req = pb::InspectRequest::new();
        req.sandbox_id = id.to_owned();
        self.rt
            .block_on(self.client(node).inspect(client::ctx(RPC_TIMEOUT), &req))
            .map_err(|source| AgentError::Rpc { rpc: "Inspect", node: node.name(), source })
    }

    /// `ListSandboxes` on `node`'s agent.
    ///
    /// # Errors
    /// The RPC's failure.
    pub fn list_sandboxes(&self, node: Node) -> Result<Vec<pb::Sandbox>, AgentError> {
        self.rt
            .block_on(
                self.client(node).list_sandboxes(client::ctx(RPC_TIMEOUT), &pb::ListSandboxesRequest::new()),
            )
            .map(|r| r.sandboxes)
            .map_err(|source| AgentError::Rpc { rpc: "ListSandboxes", node: node.name(), source })
    }

    /// `ListMigrations` on `node`'s agent.
    ///
    /// # Errors
    /// The RPC's failure.
    pub fn list_migrations(&self, node: Node) -> Result<Vec<pb::MigrationStatus>, AgentError> {
        self.rt
            .block_on(
                self.client(node)
                    .list_migrations(client::ctx(RPC_TIMEOUT), &pb::ListMigrationsRequest::new()),
            )
            .map(|r| r.migrations)
            .map_err(|source| AgentError::Rpc { rpc: "ListMigrations", node: node.name(), source })
    }

    /// Migrates sandbox `id` from `from` to the other node with `options`, as `katactl migrate`
    /// does, and returns once both sides ended (or `deadline` passed). `trigger` acts at a
    /// chosen event: cancel, or run something (kill a process) mid-migration.
    ///
    /// # Errors
    /// When the migration could not start (refused request, unreachable agent) or did not end
    /// in time; a migration that ran and failed is a [`Migration`] whose summary says so.
    pub fn migrate(
        &self,
        from: Node,
        id: &str,
        options: MigrationOptions,
        trigger: Option<Trigger>,
        deadline: Duration,
    ) -> Result<Migration, AgentError> {
        let (source, destination) = (
            AgentClient::over_client(self.client(from).clone(), from.name()),
            AgentClient::over_client(self.client(other(from)).clone(), other(from).name()),
        );
        let sandbox = self.rt.block_on(source.inspect(id)).map_err(|e| AgentError::Inspect(Box::new(e)))?;
        let plan = Plan {
            route: Route::of_sandbox(id, &source, &destination),
            options,
            sandbox,
            migration_id: client::new_migration_id().map_err(AgentError::MigrationId)?,
        };
        let settings = Settings {
            timeout: None,
            wait_forwarding: false,
            cancel_grace: orchestrate::DEFAULT_CANCEL_GRACE,
            stopped_by: "the lab test",
            stop_hint: "",
        };
        let (cancel, stop) = tokio::sync::watch::channel(false);
        let mut acting = Acting { trigger, cancel, triggered_at: None };
        let run = orchestrate::run(&plan, &source, &destination, &settings, stop, &mut acting);
        let summary = self
            .rt
            .block_on(async { tokio::time::timeout(deadline, run).await })
            .map_err(|_| AgentError::MigrationDeadline(deadline))?
            .map_err(|e| AgentError::Drive(Box::new(e)))?;
        let triggered_at = acting.triggered_at;
        Ok(Migration { summary, triggered_at })
    }
}

/// The test's [`Trigger`] acting on the orchestration's events: a cancel goes through the same
/// stop signal as a user's Ctrl-C.
struct Acting {
    trigger: Option<Trigger>,
    cancel: tokio::sync::watch::Sender<bool>,
    triggered_at: Option<(Side, pb::MigrationEvent)>,
}

impl Progress for Acting {
    fn note(&mut self, line: &str) {
        eprintln!("orchestration: {line}");
    }

    fn event(&mut self, side: Side, event: &pb::MigrationEvent) {
        let Some(t) = self.trigger.as_mut() else { return };
        if self.triggered_at.is_some() || !(t.when)(side, event) {
            return;
        }
        self.triggered_at = Some((side, event.clone()));
        match t.action.take() {
            Some(Action::Cancel) => {
                // The receiver lives as long as the run that reads it.
                let _ = self.cancel.send(true);
            }
            Some(Action::Run(f)) => f(),
            None => {}
        }
    }

    fn finish(&mut self) {}
}

/// When the source node's VM route moved to the destination, relative to QEMU's STOP: after it
/// (the engine reacted to the event) or before it (the engine swapped, then stopped the VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSwap {
    /// Swapped this long before QEMU's STOP.
    BeforeStop(Duration),
    /// Swapped this long after QEMU's STOP.
    AfterStop(Duration),
}

impl RouteSwap {
    /// The distance to STOP, whichever side.
    pub fn offset(self) -> Duration {
        match self {
            RouteSwap::BeforeStop(d) | RouteSwap::AfterStop(d) => d,
        }
    }
}

impl fmt::Display for RouteSwap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteSwap::BeforeStop(d) => write!(f, "route swap {:.0} µs before STOP", d.as_secs_f64() * 1e6),
            RouteSwap::AfterStop(d) => write!(f, "STOP→route swap {:.0} µs", d.as_secs_f64() * 1e6),
        }
    }
}

/// The numbers of a successful cutover, from the driver's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoverNumbers {
    /// QEMU's downtime as the source reports it (from QEMU's own final stop; a VM stopped
    /// earlier by the engine was paused longer — see `stop_to_resume`).
    pub downtime: Duration,
    /// When the source's VM route moved, relative to QEMU's STOP (QEMU timestamps and the
    /// kernel's acknowledgement).
    pub route_swap: RouteSwap,
    /// QEMU's RESUME on the destination to the held packets released.
    pub resume_to_plug_release: Duration,
    /// STOP on the source to RESUME on the destination (both QEMU timestamps): how long the VM
    /// was paused.
    pub stop_to_resume: Duration,
    /// The whole drive.
    pub total: Duration,
    /// Time in each phase on the source.
    pub phases: Vec<(pb::Phase, Duration)>,
}

impl CutoverNumbers {
    /// The numbers, or a message naming what the summary lacks.
    ///
    /// # Errors
    /// When a side reported no cutover times or an instant is missing (zero).
    pub fn of(summary: &Report) -> Result<Self, String> {
        let src = summary.cutover(Side::Source).ok_or("the source reported no cutover times")?;
        let dst = summary.cutover(Side::Destination).ok_or("the destination reported no cutover times")?;
        let instants = [
            ("source STOP", src.stop_unix_nanos),
            ("route swapped", src.route_swapped_unix_nanos),
            ("destination RESUME", dst.resume_unix_nanos),
            ("plug released", dst.plug_released_unix_nanos),
        ];
        if let Some((what, _)) = instants.iter().find(|(_, t)| *t == 0) {
            return Err(format!("the cutover times lack the {what} instant: {src:?} / {dst:?}"));
        }
        let (stop, swapped) = (src.stop_unix_nanos, src.route_swapped_unix_nanos);
        let route_swap = if swapped < stop {
            RouteSwap::BeforeStop(Duration::from_nanos(stop - swapped))
        } else {
            RouteSwap::AfterStop(Duration::from_nanos(swapped - stop))
        };
        Ok(Self {
            downtime: Duration::from_millis(src.downtime_ms),
            route_swap,
            resume_to_plug_release: Duration::from_nanos(dst.plug_release_latency_nanos),
            stop_to_resume: Duration::from_nanos(dst.resume_unix_nanos.saturating_sub(stop)),
            total: summary.elapsed,
            phases: summary.phase_durations(Side::Source),
        })
    }
}

impl fmt::Display for CutoverNumbers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "total {:.0} ms, QEMU downtime {} ms, STOP→RESUME {:.1} ms, {}, RESUME→plug release {:.0} µs; \
             phases",
            ms(self.total),
            self.downtime.as_millis(),
            ms(self.stop_to_resume),
            self.route_swap,
            self.resume_to_plug_release.as_secs_f64() * 1e6,
        )?;
        for (p, d) in &self.phases {
            let name = format!("{p:?}");
            write!(f, " {} {:.0} ms", name.trim_start_matches("PHASE_").to_lowercase(), ms(*d))?;
        }
        Ok(())
    }
}

/// One line per event, for messages: side, phase, message, and the RAM or storage figures.
pub fn timeline(summary: &Report) -> String {
    let start = summary.events.first().map_or(0, |(_, e)| e.timestamp_unix_nanos);
    let mut out = String::new();
    for (side, e) in &summary.events {
        let at = e.timestamp_unix_nanos.saturating_sub(start) as f64 / 1e6;
        let who = if *side == Side::Source { "src" } else { "dst" };
        let name = format!("{:?}", phase(e));
        out.push_str(&format!("  {at:8.1} ms {who} {:<9} {}", name.trim_start_matches("PHASE_"), e.message));
        if let Some(r) = e.ram.as_ref() {
            out.push_str(&format!(
                " [ram sent {} MiB, left {} MiB, iteration {}, expected downtime {} ms]",
                r.transferred_bytes >> 20,
                r.remaining_bytes >> 20,
                r.iteration,
                r.expected_downtime_ms
            ));
        }
        if let Some(s) = e.storage.as_ref() {
            for d in &s.drives {
                out.push_str(&format!(
                    " [{} {}/{} MiB]",
                    d.drive_id,
                    d.done_bytes >> 20,
                    d.total_bytes >> 20
                ));
            }
        }
        out.push('\n');
    }
    out
}
