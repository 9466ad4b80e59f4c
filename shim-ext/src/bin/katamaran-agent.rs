//! `katamaran-agent` — serves the `Migration` service for a node (DaemonSet) or for one sandbox
//! (the per-sandbox extension started with each Kata sandbox).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use katamaran::node::{Node, NodeConfig};
use katamaran::sandbox::NodeLayout;
use katamaran::service::{bind_socket, serve, Endpoint, MigrationService};

const AFTER_HELP: &str = "\
Examples:
  # The node agent (destination role, listing, source role for any local sandbox):
  katamaran-agent node --node-address 10.0.0.12
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
    Node(Common),
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

#[derive(Debug, Args)]
struct Common {
    /// Root under which Kata's, containerd's and katamaran's run directories live.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// This node's address: tunnel endpoint and data-stream listener. Give one per family for
    /// dual-stack VMs in route mode; the first is the primary.
    #[arg(long, env = "KATAMARAN_NODE_ADDRESS", value_delimiter = ',')]
    node_address: Vec<IpAddr>,
    /// The node's interface towards other nodes (needed for --tunnel-mode route).
    #[arg(long)]
    node_interface: Option<String>,
    /// TCP port of the data-stream listener (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    data_port: u16,
    /// QEMU binary for incoming VMs.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Socket path (default: the layout's agent or sandbox socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve on this TCP address — only for the node agent in its own pod network
    /// namespace (127.0.0.1:10555), where the API server's port-forward is the only way in.
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KATAMARAN_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (common, only, exit_with_pid) = match cli.mode {
        Mode::Node(c) => (c, None, None),
        Mode::Sandbox { id, exit_with_pid, common } => {
            katamaran::sandbox::validate_sandbox_id(&id)?;
            (common, Some(id), exit_with_pid)
        }
    };
    let layout = NodeLayout::under(&common.root);
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
    let socket = common.socket.unwrap_or_else(|| match &only {
        Some(id) => layout.sandbox_socket(id),
        None => layout.agent_socket(),
    });
    let _pid_file = only.as_deref().map(|id| katamaran::shim::agent::PidFileGuard::new(&layout, id));
    let node = Arc::new(Node::new(cfg).context("start the engine")?);
    let mut endpoints = vec![Endpoint::Unix(bind_socket(&socket)?)];
    if let Some(addr) = common.listen_tcp {
        if !addr.ip().is_loopback() {
            return Err(UsageError(format!(
                "--listen-tcp {addr}: only a loopback address is allowed (the control path is unauthenticated TCP; port-forward reaches loopback)"
            ))
            .into());
        }
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        tracing::info!(%addr, "serving on TCP for port-forward");
        endpoints.push(Endpoint::Tcp(l));
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
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(result?)
}
