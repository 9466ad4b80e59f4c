//! `katactl` — the crictl-style debug client of katamaran: talks to a node agent or a sandbox
//! extension over its socket, or to a QMP socket directly.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use katamaran::cli::{parse_duration, MigrateFlags};
use katamaran::client::{self, ctx, phase};
use katamaran::cluster::orchestrate::{self, Outcome, Plan, Progress, Report, Route, Settings, Side};
use katamaran::cluster::transport::Agent;
use katamaran::migration::options::MigrationOptions;
use katamaran::qmp::QmpClient;
use katamaran_protos::protobuf::MessageDyn;
use katamaran_protos::v1 as pb;

const AFTER_HELP: &str = "\
Examples:
  katactl ps
  katactl -r unix:///run/katamaran/sandboxes/ID.sock inspect ID
  katactl migrate ID --to unix:///var/lib/node-b/katamaran/agent.sock --downtime 50ms
  katactl watch mig-0123456789ab
  katactl qmp /run/vc/vm/ID/extra-monitor.sock query-status
  katactl qmp /run/vc/vm/ID/extra-monitor.sock migrate-set-parameters '{\"downtime-limit\": 50}'

`katactl migrate` runs the same orchestration as the agents' Migration controller and
`kubectl migrate --direct`: events on stdout (one JSON object per line with -o json, then the
summary), remarks on stderr. Ctrl-C cancels through the source (the owner until the commit;
past it the cancel is refused and the move completes); a second Ctrl-C quits without waiting.

Exit codes: 0 success, 1 failure, 2 usage error or refused request, 130 cancelled.";

#[derive(Debug, Parser)]
#[command(name = "katactl", version, about = "Debug client for katamaran node agents and sandbox extensions", after_help = AFTER_HELP)]
struct Cli {
    /// Service endpoint: unix:///path/to.sock or tcp://host:port.
    #[arg(
        short = 'r',
        long,
        env = "KATAMARAN_ENDPOINT",
        default_value = "unix:///run/katamaran/agent.sock",
        global = true
    )]
    runtime_endpoint: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text", global = true)]
    output: Output,
    /// Deadline of each request.
    #[arg(long, value_parser = parse_duration, default_value = "30s", global = true)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List sandboxes.
    Ps,
    /// Describe one sandbox.
    Inspect {
        /// Sandbox id.
        id: String,
    },
    /// List migrations this endpoint takes part in.
    Migrations,
    /// Migrate a sandbox from this endpoint to another node's agent, and watch it until the VM
    /// runs there (the source's forward goes on without katactl) or both sides rolled back.
    Migrate {
        /// Sandbox id (on the endpoint given by --runtime-endpoint).
        id: String,
        /// The destination node agent's endpoint.
        #[arg(long, value_name = "ENDPOINT")]
        to: String,
        /// Source node address, when the source endpoint does not report one.
        #[arg(long, value_name = "IP")]
        source_address: Option<std::net::IpAddr>,
        /// Migration id (default: generated).
        #[arg(long)]
        migration_id: Option<String>,
        #[command(flatten)]
        flags: MigrateFlags,
    },
    /// Follow a migration's events until it ends.
    Watch {
        /// Migration id.
        migration_id: String,
    },
    /// Cancel a migration before its commit point (the VM stays on the source); after it the
    /// agent refuses: the VM already belongs to the destination.
    Cancel {
        /// Migration id.
        migration_id: String,
        /// Reason recorded in the CANCELLED event.
        #[arg(long, default_value = "cancelled with katactl")]
        reason: String,
    },
    /// End the forward a completed migration keeps on this (source) node, once the cluster
    /// routes the VM's address to its new node.
    ReleaseForward {
        /// Migration id.
        migration_id: String,
    },
    /// Stop a sandbox this node received by migration and remove everything made for it (VM,
    /// netns, routes, tunnel, disks). Refused while a migration uses it.
    RemoveIncoming {
        /// Sandbox id.
        sandbox_id: String,
    },
    /// Send one raw QMP command to a QMP socket (which serves one client at a time).
    Qmp {
        /// QMP unix socket path.
        socket: PathBuf,
        /// QMP command, e.g. query-status.
        command: String,
        /// Arguments as a JSON object.
        arguments: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KATAMARAN_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("katactl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("katactl: {e:#}");
            let usage = e.downcast_ref::<client::ClientError>().is_some_and(client::ClientError::is_usage)
                || e.downcast_ref::<UsageError>().is_some();
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Qmp { socket, command, arguments } => {
            let args = arguments
                .map(|a| serde_json::from_str::<serde_json::Value>(&a))
                .transpose()
                .map_err(|e| UsageError(format!("arguments are not JSON: {e}")))?;
            if args.as_ref().is_some_and(|a| !a.is_object()) {
                return Err(UsageError("arguments must be a JSON object".into()).into());
            }
            let (qmp, _events) = QmpClient::connect(&socket, &Default::default())
                .await
                .with_context(|| format!("QMP socket {}", socket.display()))?;
            let reply = qmp.execute(&command, args).await?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ps => {
            let c = client::connect(&cli.runtime_endpoint).await?;
            let list = c
                .list_sandboxes(ctx(cli.timeout), &pb::ListSandboxesRequest::new())
                .await
                .map_err(rpc("ListSandboxes"))?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<20} {:<24} {:<16} {:<12} {:<10} ADDRESSES",
                    "SANDBOX", "POD", "NAMESPACE", "STATE", "QEMU"
                );
                for s in &list.sandboxes {
                    let addrs: Vec<String> = s.network.addresses.iter().map(|a| a.address.clone()).collect();
                    println!(
                        "{:<20} {:<24} {:<16} {:<12} {:<10} {}",
                        short(&s.id),
                        s.pod_name,
                        s.pod_namespace,
                        s.qemu_status,
                        s.qemu_version,
                        addrs.join(",")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { id } => {
            let c = client::connect(&cli.runtime_endpoint).await?;
            let mut req = pb::InspectRequest::new();
            req.sandbox_id = id;
            let s = c.inspect(ctx(cli.timeout), &req).await.map_err(rpc("Inspect"))?;
            print_json(&s)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrations => {
            let c = client::connect(&cli.runtime_endpoint).await?;
            let list = c
                .list_migrations(ctx(cli.timeout), &pb::ListMigrationsRequest::new())
                .await
                .map_err(rpc("ListMigrations"))?;
            if json {
                print_json(&list)?;
            } else {
                println!("{:<18} {:<20} {:<12} {:<12} PEER", "MIGRATION", "SANDBOX", "ROLE", "PHASE");
                for m in &list.migrations {
                    println!(
                        "{:<18} {:<20} {:<12} {:<12} {}",
                        m.migration_id,
                        short(&m.sandbox_id),
                        format!("{:?}", m.role.enum_value_or_default())
                            .trim_start_matches("ROLE_")
                            .to_lowercase(),
                        phase_name(m.phase.enum_value_or_default()),
                        m.peer_node_address
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { migration_id } => {
            let c = client::connect(&cli.runtime_endpoint).await?;
            let mut req = pb::WatchRequest::new();
            req.migration_id = migration_id;
            let mut stream = c.watch(ctx(Duration::ZERO), &req).await.map_err(rpc("Watch"))?;
            let mut last = None;
            while let Some(ev) = stream.recv().await.map_err(rpc("Watch"))? {
                print_event(json, Side::Source, &ev)?;
                last = Some(ev);
            }
            Ok(match last.map(|e| phase(&e)) {
                Some(pb::Phase::PHASE_COMPLETED) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            })
        }
        Command::Cancel { migration_id, reason } => {
            let c = client::connect(&cli.runtime_endpoint).await?;
            let mut req = pb::CancelRequest::new();
            req.migration_id = migration_id;
            req.reason = reason;
            let r = c.cancel(ctx(cli.timeout), &req).await.map_err(rpc("Cancel"))?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "cancelled: {} (phase {})",
                    r.cancelled,
                    phase_name(r.phase.enum_value_or_default())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ReleaseForward { migration_id } => {
            let c = client::connect(&cli.runtime_endpoint).await?;
            let mut req = pb::ReleaseForwardRequest::new();
            req.migration_id.clone_from(&migration_id);
            c.release_forward(ctx(cli.timeout), &req).await.map_err(rpc("ReleaseForward"))?;
            println!("forward of {migration_id} released");
            Ok(ExitCode::SUCCESS)
        }
        Command::RemoveIncoming { sandbox_id } => {
            let c = client::connect(&cli.runtime_endpoint).await?;
            let mut req = pb::RemoveIncomingRequest::new();
            req.sandbox_id = sandbox_id;
            let r = c.remove_incoming(ctx(cli.timeout), &req).await.map_err(rpc("RemoveIncoming"))?;
            println!("{}", r.message);
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { id, to, source_address, migration_id, flags } => {
            migrate(&cli.runtime_endpoint, &to, id, source_address, migration_id, flags.options(), json).await
        }
    }
}

/// Who a Ctrl-C comes from, in the cancel's reason.
const KATACTL_STOP: &str = "the user (Ctrl-C in katactl migrate)";

/// `katactl migrate`: the one orchestration (`katamaran::cluster::orchestrate`) between this
/// node's agent and the destination's, events as lines (or JSON lines) on stdout, remarks on
/// stderr, the summary last.
async fn migrate(
    source_endpoint: &str,
    destination_endpoint: &str,
    sandbox_id: String,
    source_address: Option<std::net::IpAddr>,
    migration_id: Option<String>,
    options: MigrationOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let migration_id = match migration_id {
        Some(m) => {
            katamaran::dataplane::handshake::validate_migration_id(&m)
                .map_err(|e| UsageError(format!("--migration-id {m:?}: {e}")))?;
            m
        }
        None => client::new_migration_id()?,
    };
    let source = Agent::over_client(client::connect(source_endpoint).await?, source_endpoint);
    let destination = Agent::over_client(client::connect(destination_endpoint).await?, destination_endpoint);
    let sandbox = match source.inspect(&sandbox_id).await {
        Ok(s) => s,
        Err(e) if e.is_refusal() => return Err(UsageError(e.to_string()).into()),
        Err(e) => return Err(e.into()),
    };
    let plan = Plan {
        route: Route { source_address, ..Route::of_sandbox(short(&sandbox.id), &source, &destination) },
        options,
        sandbox,
        migration_id,
    };
    let settings = Settings {
        timeout: None,
        wait_forwarding: false,
        cancel_grace: orchestrate::DEFAULT_CANCEL_GRACE,
        stopped_by: KATACTL_STOP,
        stop_hint: " (Ctrl-C again to quit without waiting)",
    };
    let stop_rx = orchestrate::stop_on_ctrl_c(|| {
        eprintln!("katactl: quit without waiting; the agents finish the cancel on their own");
        std::process::exit(130);
    });
    let mut lines = Lines { json };
    let report = match orchestrate::run(&plan, &source, &destination, &settings, stop_rx, &mut lines).await {
        Ok(r) => r,
        Err(e) if e.is_refusal() => return Err(UsageError(format!("{:#}", anyhow::Error::new(e))).into()),
        Err(e) => return Err(e.into()),
    };
    for note in report.tracker.notes() {
        eprintln!("katactl: {note}");
    }
    print_summary(json, &report)?;
    Ok(match report.outcome {
        Outcome::Succeeded => ExitCode::SUCCESS,
        Outcome::Cancelled => ExitCode::from(130),
        Outcome::Failed { .. } => ExitCode::FAILURE,
    })
}

/// Events on stdout as they come, remarks on stderr.
struct Lines {
    json: bool,
}

impl Progress for Lines {
    fn note(&mut self, line: &str) {
        eprintln!("katactl: {line}");
    }
    fn event(&mut self, side: Side, event: &pb::MigrationEvent) {
        if let Err(e) = print_event(self.json, side, event) {
            tracing::warn!(error = %e, "cannot print event");
        }
    }
    fn finish(&mut self) {}
}

fn rpc(name: &'static str) -> impl FnOnce(katamaran_protos::ttrpc::Error) -> client::ClientError {
    move |source| client::ClientError::Rpc { rpc: name, side: "endpoint", source }
}

fn short(id: &str) -> &str {
    id.get(..18).unwrap_or(id)
}

fn phase_name(p: pb::Phase) -> String {
    format!("{p:?}").trim_start_matches("PHASE_").to_lowercase()
}

fn print_json(m: &dyn MessageDyn) -> anyhow::Result<()> {
    let text = katamaran_protos::protobuf_json_mapping::print_to_string(m)?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

fn print_event(json: bool, side: Side, ev: &pb::MigrationEvent) -> anyhow::Result<()> {
    if json {
        let text = katamaran_protos::protobuf_json_mapping::print_to_string(ev)?;
        println!("{text}");
        return Ok(());
    }
    let who = match side {
        Side::Source => "src",
        Side::Destination => "dst",
    };
    let mut line = format!("[{who}] {:<10} {}", phase_name(phase(ev)), ev.message);
    if let Some(r) = ev.ram.as_ref() {
        line += &format!(
            "  ram {}/{} MiB left {} MiB, {:.0} MB/s, iter {}, expected downtime {} ms",
            r.transferred_bytes >> 20,
            r.total_bytes >> 20,
            r.remaining_bytes >> 20,
            r.throughput_bytes_per_second as f64 / 1e6,
            r.iteration,
            r.expected_downtime_ms
        );
    }
    if let Some(s) = ev.storage.as_ref() {
        for d in &s.drives {
            line += &format!(
                "  {} {}/{} MiB{}",
                d.drive_id,
                d.done_bytes >> 20,
                d.total_bytes >> 20,
                if d.ready { " ready" } else { "" }
            );
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}

fn print_summary(json: bool, s: &Report) -> anyhow::Result<()> {
    let src = s.cutover(Side::Source);
    let dst = s.cutover(Side::Destination);
    let result = match s.outcome {
        Outcome::Succeeded => "completed",
        Outcome::Cancelled => "cancelled",
        Outcome::Failed { .. } => "failed",
    };
    if json {
        let v = serde_json::json!({
            "migration_id": s.migration_id,
            "sandbox_id": s.sandbox_id,
            "succeeded": s.succeeded(),
            "result": result,
            "error": s.failure(),
            "notes": s.tracker.notes(),
            "total_ms": s.elapsed.as_millis() as u64,
            "downtime_ms": src.map(|c| c.downtime_ms).unwrap_or_default(),
            "stop_to_route_swap_us": src.map(|c| c.route_swap_latency_nanos as f64 / 1e3),
            "route_swap_lead_us": src.map(|c| c.stop_unix_nanos.saturating_sub(c.route_swapped_unix_nanos) as f64 / 1e3),
            "resume_to_plug_release_us": dst.map(|c| c.plug_release_latency_nanos as f64 / 1e3),
            "phases_ms": s.phase_durations(Side::Source).iter().map(|(p, d)| (phase_name(*p), d.as_millis() as u64)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!();
    println!("migration {}  sandbox {}", s.migration_id, short(&s.sandbox_id));
    for (p, d) in s.phase_durations(Side::Source) {
        println!("  {:<12} {:>9.1} ms", phase_name(p), d.as_secs_f64() * 1e3);
    }
    if let Some(c) = src {
        println!("  {:<28} {:>9} ms", "QEMU downtime", c.downtime_ms);
        if c.route_swapped_unix_nanos > 0 && c.route_swapped_unix_nanos <= c.stop_unix_nanos {
            let lead = (c.stop_unix_nanos - c.route_swapped_unix_nanos) as f64 / 1e3;
            println!("  {:<28} {:>9.1} µs", "route swapped before STOP by", lead);
        } else {
            println!("  {:<28} {:>9.1} µs", "STOP -> route swapped", c.route_swap_latency_nanos as f64 / 1e3);
        }
    }
    if let Some(c) = dst {
        println!("  {:<28} {:>9.1} µs", "RESUME -> plug released", c.plug_release_latency_nanos as f64 / 1e3);
    }
    println!("  {:<28} {:>9.1} ms", "total", s.elapsed.as_secs_f64() * 1e3);
    match s.failure() {
        None => println!("result: {result}"),
        Some(f) => println!("result: {} — {f}", result.to_uppercase()),
    }
    Ok(())
}
