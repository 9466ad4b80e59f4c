//! `katamaran-agent` — serves the `Migration` service for a node (DaemonSet) or for one sandbox
//! (the per-sandbox extension started with each Kata sandbox).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use katamaran::host::netns::check_net_namespace;
use katamaran::host::placement::{set_process_config, PlacementConfig, Policy};
use katamaran::migration::error::chain;
use katamaran::node::{Node, NodeConfig};
use katamaran::peer::{ClusterCa, PeerName, PeerTls};
use katamaran::sandbox::NodeLayout;
use katamaran::service::{bind_socket, serve, Endpoint, MigrationService};

const AFTER_HELP: &str = "\
Examples:
  # Once per cluster, at install time: the CA the agents authenticate each other with, as the
  # Secret the DaemonSet mounts (whoever holds its key can act as any agent):
  katamaran-agent ca init | kubectl apply -f -
  # The node agent (destination role, listing, source role for any local sandbox):
  katamaran-agent node --node-address 10.0.0.12
  # From a pod that is not hostNetwork (hostPID): node work in the host's namespace and VM
  # cgroups in the host's hierarchies, the control listener (mutual TLS) in the pod's own namespace:
  katamaran-agent node --node-address 10.0.0.12 --host-netns /proc/1/ns/net --host-proc /proc/1 \
    --listen-tcp 127.0.0.1:10555 --peer-ca-dir /etc/katamaran/ca --node-name node-b \
    --listen-http 0.0.0.0:10557
  # Two lab nodes on one machine, each with its own root:
  katamaran-agent node --root /run/katamaran-lab/node-b --node-address 10.201.0.12
  # The extension of one sandbox:
  katamaran-agent sandbox --id 4f1c2ab0... --node-address 10.0.0.11

Logs go to stderr; set KATAMARAN_LOG (e.g. info, katamaran=debug).";

#[derive(Debug, Parser)]
#[command(name = "katamaran-agent", version, about = "katamaran's node agent and per-sandbox extension", after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Serve a whole node on <root>/run/katamaran/agent.sock.
    Node {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// The cluster CA the agents authenticate each other with.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Serve one sandbox on <root>/run/katamaran/sandboxes/<id>.sock.
    Sandbox {
        /// The sandbox id.
        #[arg(long)]
        id: String,
        /// End when this process exits: the sandbox's long-running shim (given by
        /// containerd-shim-katamaran-v2).
        #[arg(long, value_name = "PID")]
        exit_with_pid: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make a new CA (ECDSA P-256) and print it as the Secret katamaran-agent-ca on stdout, for
    /// `kubectl apply -f -` (or write ca.crt and ca.key into --out-dir). Whoever holds ca.key
    /// can act as any agent: keep it in that Secret only. Rotation: docs/INSTALL.md.
    Init {
        /// Namespace of the Secret (the agents' namespace).
        #[arg(long, default_value = "katamaran-system", value_name = "NAMESPACE", value_parser = parse_namespace)]
        namespace: String,
        /// How long the CA is valid, in days.
        #[arg(long, default_value_t = katamaran::peer::DEFAULT_CA_DAYS, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Write ca.crt and ca.key (mode 0600) into this directory (created 0700) instead of
        /// printing the Secret; existing files are never replaced.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// A namespace name: a DNS-1123 label.
fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("not a namespace name (a DNS-1123 label: lowercase letters, digits and '-', at most 63)".into())
    }
}

#[derive(Debug, Args)]
struct Common {
    /// Root under which Kata's, containerd's and katamaran's run directories live.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// This node's address: tunnel endpoint and data-stream listener. Give one per family for
    /// dual-stack VMs in route mode; the first is the primary.
    #[arg(long, env = "KATAMARAN_NODE_ADDRESS", value_delimiter = ',')]
    node_address: Vec<IpAddr>,
    /// The node's interface towards other nodes in --tunnel-mode route (default: the interface
    /// of the node's route to the destination node).
    #[arg(long)]
    node_interface: Option<String>,
    /// TCP port of the data-stream listener. Fixed by default: a source re-delivers its
    /// decision to this port after either agent restarted (0 picks a free one, for tests that
    /// never restart an agent).
    #[arg(long, default_value_t = 10556)]
    data_port: u16,
    /// QEMU binary for incoming VMs.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// katamaran's persistent state: migration journals, incoming sandboxes and their disks.
    /// Must survive reboots and agent restarts (not tmpfs). Default: <root>/var/lib/katamaran.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Socket path (default: the layout's agent or sandbox socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve on this TCP address, mutual TLS only (needs --peer-ca-dir) — only for the
    /// node agent in its own pod network namespace (127.0.0.1:10555), where the API server's
    /// port-forward is the only way in.
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<std::net::SocketAddr>,
    /// The cluster CA the agents authenticate each other with: a directory holding ca.crt (one
    /// or more CA certificates, PEM, all trusted) and ca.key (the key of the CA that signs).
    /// The DaemonSet mounts the Secret katamaran-agent-ca here (/etc/katamaran/ca); make it
    /// once with `katamaran-agent ca init | kubectl apply -f -`. The agent issues itself a 24 h
    /// certificate for <node>.agent.katamaran.io (--node-name), re-issued at half-life: it serves
    /// --listen-tcp with it and the controller calls other agents with it. Required with
    /// --listen-tcp and with --controller on.
    #[arg(long, value_name = "DIR")]
    peer_ca_dir: Option<PathBuf>,
    /// Serve /healthz, /readyz and Prometheus /metrics over HTTP on this address (e.g.
    /// 0.0.0.0:10557 in the agent's pod: the kubelet's probes and Prometheus reach the pod's
    /// address). Read-only: no secrets, no pod or migration ids.
    #[arg(long, value_name = "ADDR")]
    listen_http: Option<std::net::SocketAddr>,
}

/// How the node agent reaches the host when it runs in a pod.
#[derive(Debug, Args)]
struct HostArgs {
    /// The node's network namespace, when this process runs in another one (a pod that is not
    /// hostNetwork; with hostPID: /proc/1/ns/net). Tunnels, routes, neighbours, the data
    /// listener and incoming sandboxes live there; --listen-tcp stays in this process's own.
    #[arg(long, value_name = "PATH")]
    host_netns: Option<PathBuf>,
    /// A process of the host (with hostPID: /proc/1): VM cgroups are made in the hierarchies of
    /// its mountinfo, under its root's /sys/fs/cgroup, from its cgroup namespace. Default: this
    /// process's own view.
    #[arg(long, value_name = "PATH")]
    host_proc: Option<PathBuf>,
    /// Incoming VMs get a cgroup of their own, outside the agent's, so that they outlive it:
    /// `required` refuses to start a VM without one (the DaemonSet's choice), `best-effort`
    /// warns and starts it in the agent's cgroup (e.g. where `ip netns exec` hid /sys/fs/cgroup
    /// and no --host-proc is given), `off` skips it.
    #[arg(long, value_name = "POLICY", default_value = "best-effort")]
    vm_cgroup: Policy,
    /// Parent of the VM cgroups in every hierarchy, relative to its root.
    #[arg(long, value_name = "PATH", default_value = "katamaran")]
    vm_cgroup_parent: PathBuf,
    /// Memory limit of each incoming VM's cgroup, in bytes (default: none).
    #[arg(long, value_name = "BYTES")]
    vm_memory_max: Option<u64>,
}

/// Whether to use the Kubernetes API for a feature (Events, the controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EventsMode {
    /// When a Kubernetes API is at hand: --kubeconfig, or the pod's service account.
    Auto,
    /// Always; refuse to start without an API.
    On,
    /// Never.
    Off,
}

/// The Kubernetes API: Events on the pods this node moves, and the Migration controller.
#[derive(Debug, Args)]
struct KubeArgs {
    /// Record Kubernetes Events (MigrationStarted, MigrationCompleted, MigrationFailed,
    /// MigrationCancelled) on the pods this node moves.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    kube_events: EventsMode,
    /// kubeconfig for the Kubernetes API (default: the pod's service account, when in a pod).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// This node's name in Kubernetes (the Events' reporting instance and the name in this
    /// agent's certificate, <node>.agent.katamaran.io; the DaemonSet passes spec.nodeName).
    /// Default: the host name.
    #[arg(long, env = "KATAMARAN_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Reconcile Migration resources (katamaran.io/v1alpha1): drive the migrations of the pods
    /// on this node, through the target node's agent.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    controller: EventsMode,
    /// Namespace of the agents' pods (the controller reaches the target's agent there).
    #[arg(long, default_value = "katamaran-system", value_name = "NAMESPACE")]
    agent_namespace: String,
    /// Port the agents serve the Migration service on inside their pods (their --listen-tcp).
    #[arg(long, default_value_t = 10555, value_name = "PORT")]
    agent_port: u16,
    /// The RuntimeClass of the pods katamaran moves; Migrations of other pods are refused.
    #[arg(long, default_value = "kata-katamaran", value_name = "NAME")]
    runtime_class: String,
}

impl KubeArgs {
    /// The Kubernetes client and this node's name, when Events or the controller want one
    /// and an API is at hand (`--kubeconfig`, or the pod's service account).
    async fn client(&self) -> anyhow::Result<Option<(kube::Client, String)>> {
        let modes = [("--kube-events", self.kube_events), ("--controller", self.controller)];
        if modes.iter().all(|(_, m)| *m == EventsMode::Off) {
            return Ok(None);
        }
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| UsageError(format!("--kubeconfig {}: {e}", path.display())))?;
                Some(
                    kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                        .await
                        .map_err(|e| UsageError(format!("--kubeconfig {}: {e}", path.display())))?,
                )
            }
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                Some(kube::Config::incluster().context("the pod's service account")?)
            }
            None => None,
        };
        let Some(config) = config else {
            if let Some((flag, _)) = modes.iter().find(|(_, m)| *m == EventsMode::On) {
                return Err(UsageError(format!(
                    "{flag} on: no Kubernetes API (give --kubeconfig, or run in a pod)"
                ))
                .into());
            }
            tracing::info!(
                "no Kubernetes API at hand: no Events recorded, no Migration resources reconciled"
            );
            return Ok(None);
        };
        let client = kube::Client::try_from(config).context("build the Kubernetes client")?;
        Ok(Some((client, self.node_name())))
    }

    /// `--node-name`, or the host name.
    fn node_name(&self) -> String {
        match &self.node_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }

    /// The Event reporter, when Events are wanted.
    fn reporter(&self, client: &kube::Client, node: &str) -> Option<katamaran::kube_events::EventReporter> {
        (self.kube_events != EventsMode::Off).then(|| {
            tracing::info!(%node, "recording Kubernetes Events");
            katamaran::kube_events::EventReporter::new(client.clone(), node)
        })
    }

    /// The controller's settings, when it is wanted.
    fn controller(
        &self,
        node: &str,
        socket: &std::path::Path,
        tls: Option<&PeerTls>,
    ) -> Option<katamaran::cluster::controller::Config> {
        if self.controller == EventsMode::Off {
            return None;
        }
        let Some(tls) = tls else {
            // `on` without a CA was refused at start.
            tracing::warn!(
                "no --peer-ca-dir: Migration resources are not reconciled (other agents cannot be reached)"
            );
            return None;
        };
        Some(katamaran::cluster::controller::Config {
            node_name: node.to_owned(),
            agent_namespace: self.agent_namespace.clone(),
            agent_port: self.agent_port,
            runtime_class: self.runtime_class.clone(),
            local_socket: socket.to_owned(),
            tls: tls.clone(),
        })
    }
}

impl HostArgs {
    /// Checks the paths and turns them into the engine's settings.
    fn placement(&self) -> Result<PlacementConfig, UsageError> {
        if let Some(ns) = &self.host_netns {
            check_net_namespace(ns).map_err(|e| UsageError(format!("--host-netns: {}", chain(&e))))?;
        }
        let mut cfg = match &self.host_proc {
            Some(p) => {
                let cfg = PlacementConfig::host_of(p);
                let readable = std::fs::File::open(&cfg.mountinfo)
                    .and_then(|_| std::fs::File::open(cfg.cgroupns.as_deref().unwrap_or(p)));
                readable.map_err(|e| {
                    UsageError(format!(
                        "--host-proc {}: cannot open its mountinfo and cgroup namespace: {e}",
                        p.display()
                    ))
                })?;
                cfg
            }
            None => PlacementConfig::default(),
        };
        cfg.policy = self.vm_cgroup;
        cfg.parent = self.vm_cgroup_parent.clone();
        cfg.memory_max = self.vm_memory_max;
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Whether `dir` (or its nearest existing ancestor) is on tmpfs.
fn on_tmpfs(dir: &std::path::Path) -> bool {
    dir.ancestors()
        .find_map(|d| nix::sys::statfs::statfs(d).ok())
        .is_some_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    if let Mode::Ca(cmd) = cli.mode {
        return ca(cmd);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KATAMARAN_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match katamaran::migration::failpoint::setup_from_env() {
        Ok(points) if !points.is_empty() => tracing::warn!(?points, "test fail points configured"),
        Ok(_) => {}
        Err(e) => {
            eprintln!("katamaran-agent: KATAMARAN_FAILPOINTS: {e}");
            return ExitCode::from(2);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("katamaran-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // Background work (a forward waiting for its source QEMU, the supervision of incoming VMs,
    // which keep running without us) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("katamaran-agent: {e:#}");
            ExitCode::from(if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 })
        }
    }
}

/// `katamaran-agent ca ...`.
fn ca(cmd: CaCommand) -> ExitCode {
    let CaCommand::Init { namespace, days, out_dir } = cmd;
    let ca = match ClusterCa::generate(std::time::Duration::from_secs(u64::from(days) * 24 * 3600)) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("katamaran-agent: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    match out_dir {
        Some(dir) => match ca.write_dir(&dir) {
            Ok(()) => {
                eprintln!("katamaran-agent: wrote {}/ca.crt and ca.key (0600)", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("katamaran-agent: --out-dir: {}", chain(&e));
                ExitCode::FAILURE
            }
        },
        None => {
            print!("{}", ca.secret_manifest(&namespace));
            ExitCode::SUCCESS
        }
    }
}

/// This node's peer identity from `--peer-ca-dir`, when given.
fn peer_tls(dir: Option<&std::path::Path>, node: &str) -> anyhow::Result<Option<PeerTls>> {
    let Some(dir) = dir else { return Ok(None) };
    let name = PeerName::node(node).map_err(|e| UsageError(format!("--node-name: {e}")))?;
    let ca = ClusterCa::load(dir).map_err(|e| anyhow::anyhow!("--peer-ca-dir: {}", chain(&e)))?;
    let tls = PeerTls::issue(ca, name, katamaran::peer::NODE_CERT_LIFETIME)
        .map_err(|e| anyhow::anyhow!("--peer-ca-dir: {}", chain(&e)))?;
    tracing::info!(identity = %tls.name(), dir = %dir.display(), "peer certificate issued from the cluster CA");
    Ok(Some(tls))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut host_netns = None;
    let mut kube_args = None;
    let (common, only, exit_with_pid) = match cli.mode {
        Mode::Node { common, host, kube } => {
            kube_args = Some(kube);
            let placement = host.placement()?;
            tracing::info!(?placement, host_netns = ?host.host_netns, "how this agent reaches the host");
            set_process_config(placement);
            host_netns = host.host_netns;
            (common, None, None)
        }
        Mode::Sandbox { id, exit_with_pid, common } => {
            katamaran::sandbox::validate_sandbox_id(&id)?;
            if common.listen_tcp.is_some() || common.peer_ca_dir.is_some() {
                return Err(UsageError(
                    "--listen-tcp and --peer-ca-dir are for the node agent (katamaran-agent node)".into(),
                )
                .into());
            }
            (common, Some(id), exit_with_pid)
        }
        // Handled before the runtime starts.
        Mode::Ca(_) => return Ok(()),
    };
    if common.listen_tcp.is_some() && common.peer_ca_dir.is_none() {
        return Err(UsageError(
            "--listen-tcp needs --peer-ca-dir: the TCP endpoint serves mutual TLS only (make the CA with \
             `katamaran-agent ca init`)"
                .into(),
        )
        .into());
    }
    if kube_args.as_ref().is_some_and(|k| k.controller == EventsMode::On) && common.peer_ca_dir.is_none() {
        return Err(UsageError(
            "--controller on needs --peer-ca-dir: the controller reaches other agents with mutual TLS".into(),
        )
        .into());
    }
    let node_name = kube_args.as_ref().map(KubeArgs::node_name);
    let tls = match &node_name {
        Some(node) => peer_tls(common.peer_ca_dir.as_deref(), node)?,
        None => None,
    };
    let renewal = tls.as_ref().map(PeerTls::spawn_renewal);
    let mut layout = NodeLayout::under(&common.root);
    if let Some(dir) = common.state_dir {
        if !dir.is_absolute() {
            return Err(UsageError(format!("--state-dir {}: must be an absolute path", dir.display())).into());
        }
        layout.katamaran_state = dir;
    }
    if on_tmpfs(&layout.katamaran_state) {
        tracing::warn!(dir = %layout.katamaran_state.display(), "the state directory is on tmpfs: node state is lost at reboot");
    }
    let mut cfg = NodeConfig::new(layout.clone());
    if common.node_address.len() > 2
        || (common.node_address.len() == 2
            && common.node_address[0].is_ipv6() == common.node_address[1].is_ipv6())
    {
        return Err(UsageError("--node-address takes at most one address per family".into()).into());
    }
    cfg.node_addresses = common.node_address;
    cfg.node_interface = common.node_interface;
    cfg.data_port = common.data_port;
    cfg.qemu_binary = common.qemu;
    cfg.only_sandbox = only.clone();
    cfg.host_netns = host_netns;
    let socket = common.socket.unwrap_or_else(|| match &only {
        Some(id) => layout.sandbox_socket(id),
        None => layout.agent_socket(),
    });
    let _pid_file = only.as_deref().map(|id| katamaran::shim::agent::PidFileGuard::new(&layout, id));
    let node = Arc::new(Node::new(cfg).context("start the engine")?);
    let kube_client = match &kube_args {
        Some(kube) => kube.client().await?,
        None => None,
    };
    if let (Some(kube), Some((client, name))) = (&kube_args, &kube_client) {
        if let Some(reporter) = kube.reporter(client, name) {
            node.report_events(reporter);
        }
    }
    // Before serving: what a previous agent left unfinished is finished or rolled back first.
    node.recover().await;
    let mut endpoints = vec![Endpoint::Unix(bind_socket(&socket)?)];
    if let (Some(addr), Some(tls)) = (common.listen_tcp, &tls) {
        if !addr.ip().is_loopback() {
            return Err(UsageError(format!(
                "--listen-tcp {addr}: only a loopback address is allowed (the control path is reached through the API server's port-forward, which reaches loopback)"
            ))
            .into());
        }
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        tracing::info!(%addr, identity = %tls.name(), "serving on TCP for port-forward, mutual TLS");
        endpoints.push(Endpoint::Tcp { listener: l, tls: tls.clone() });
    }
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = common.listen_http {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--listen-http {addr}: bind"))?;
        tracing::info!(%addr, "serving /healthz, /readyz, /metrics");
        tokio::spawn(katamaran::observe::serve(l, node.clone(), async {
            let _ = http_stopped.await;
        }));
    }
    let (controller_stop, controller_stopped) = tokio::sync::oneshot::channel::<()>();
    if let (Some(kube), Some((client, name))) = (&kube_args, &kube_client) {
        if let Some(config) = kube.controller(name, &socket, tls.as_ref()) {
            tokio::spawn(katamaran::cluster::controller::run(client.clone(), config, async {
                let _ = controller_stopped.await;
            }));
        }
    }
    tracing::info!(socket = %socket.display(), sandbox = ?only, "serving katamaran.v1.Migration");
    let shutdown = async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = term => {}
            _ = tokio::signal::ctrl_c() => {}
            () = katamaran::shim::agent::until_exit_of(exit_with_pid) => {
                tracing::info!(pid = ?exit_with_pid, "the sandbox's shim exited");
            }
        }
    };
    let result = serve(MigrationService::new(node), endpoints, shutdown).await;
    let _ = http_stop.send(());
    let _ = controller_stop.send(());
    if let Some(r) = renewal {
        r.abort();
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(result?)
}
