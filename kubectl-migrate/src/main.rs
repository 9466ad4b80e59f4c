//! `kubectl migrate` — live-migrates a Kata pod's VM to another node with katamaran.
//!
//! kubectl runs any `kubectl-migrate` on `PATH` for `kubectl migrate ...`. By default this binary
//! creates a Migration resource and follows its status while the agents' controller migrates
//! ([`resource`]); RBAC on `migrations.katamaran.io` decides who may. With `--direct` (cluster
//! administrators debugging the agents) it resolves the pod and nodes itself ([`resolve`]),
//! reaches the agent on each node through `pods/portforward` with mutual TLS, as an
//! administrator's identity minted from the agents' CA (read from its Secret) ([`transport`],
//! [`katamaran::peer`]), and drives the same
//! orchestration the agents run ([`orchestrate`]), showing progress and the result ([`output`]).

mod output;
mod resource;

use katamaran::cluster::{orchestrate, resolve, transport};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::{Pod, Secret};
use katamaran::cli::{parse_duration, MigrateFlags};
use katamaran::peer::{
    ClusterCa, PeerName, PeerTls, ADMIN_CERT_LIFETIME, CA_CERT_FILE, CA_KEY_FILE, CA_SECRET,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::sync::watch;

use crate::orchestrate::{Outcome, Plan, Settings, DEFAULT_CANCEL_GRACE};
use crate::output::Format;
use crate::resolve::{Resolved, Resolver};
use crate::transport::Agent;

const EXAMPLES: &str = "\
Examples:
  # Move pod web-0 of namespace shop to node node-b (creates a Migration and follows it)
  kubectl migrate pod web-0 -n shop --to node-b

  # Have the API server check the request (RBAC, options) and change nothing
  kubectl migrate pod web-0 -n shop --to node-b --dry-run=server

  # Follow the Migrations of a namespace
  kubectl get mig -n shop -w

  # Cluster administrators: drive both agents from here through port-forwards; with --dry-run
  # print the plan (nodes, addresses, agents, sandbox, options)
  kubectl migrate pod web-0 -n shop --to node-b --direct --dry-run

  # Disks on shared storage, allow 100 ms of downtime, print one JSON document
  kubectl migrate pod web-0 --to node-b --shared-storage --downtime 100ms -o json

  # Roll back unless it is done within 10 minutes
  kubectl migrate pod web-0 --to node-b --timeout 10m

Ctrl-C asks for the cancel through the Migration (spec.cancel) and reports whether it was
honoured (before the commit point) or refused (the VM already belongs to the target node).

Exit codes: 0 migrated, 1 the migration failed, 2 usage error or refused request,
130 cancelled with Ctrl-C (both sides rolled back).";

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-migrate",
    bin_name = "kubectl migrate",
    version,
    about = "Live-migrate a Kata pod's VM to another node with katamaran (no packet lost)",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(flatten)]
    kube: KubeFlags,
    #[command(subcommand)]
    command: Command,
}

/// kubectl's connection flags, with kubectl's meaning.
#[derive(Debug, Args)]
#[command(next_help_heading = "Cluster options")]
struct KubeFlags {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// The kubeconfig cluster to use.
    #[arg(long, global = true)]
    cluster: Option<String>,
    /// The kubeconfig user to use.
    #[arg(long, global = true)]
    user: Option<String>,
    /// The API server's address (https://HOST:PORT; HOST:PORT means https), instead of the
    /// kubeconfig cluster's.
    #[arg(short = 's', long, global = true, value_name = "URL", value_parser = parse_server)]
    server: Option<hyper::Uri>,
    /// Bearer token for the API server, instead of the kubeconfig user's credentials.
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// User to impersonate (you need the impersonate permission on users).
    #[arg(long = "as", global = true, value_name = "USER")]
    as_user: Option<String>,
    /// Group to impersonate; repeat for several (needs --as).
    #[arg(long = "as-group", global = true, value_name = "GROUP", requires = "as_user")]
    as_group: Vec<String>,
    /// UID to impersonate (needs --as).
    #[arg(long = "as-uid", global = true, value_name = "UID", requires = "as_user")]
    as_uid: Option<String>,
    /// How long to wait for each API server request before giving up, with a unit (10s, 1m);
    /// 0 waits as long as it takes.
    #[arg(long, global = true, value_name = "DURATION", default_value = "0", value_parser = parse_request_timeout)]
    request_timeout: Duration,
    /// Namespace of the pod (default: the context's namespace).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Namespace of the katamaran agent DaemonSet.
    #[arg(long, global = true, default_value = "katamaran-system", value_name = "NAMESPACE")]
    agent_namespace: String,
    /// Port the agent serves the Migration service on, inside its pod.
    #[arg(long, global = true, default_value_t = 10555, value_name = "PORT")]
    agent_port: u16,
    /// More logs on stderr (-v info, -vv debug); KATAMARAN_LOG takes a full filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate a pod to another node.
    #[command(after_help = EXAMPLES)]
    Pod(PodArgs),
}

#[derive(Debug, Args)]
struct PodArgs {
    /// Name of the pod.
    name: String,
    /// Destination node.
    #[arg(long, value_name = "NODE")]
    to: String,
    /// Change nothing: `client` prints the Migration that would be created (with --direct: the
    /// plan, from the agents), `server` has the API server admit it (RBAC, validation) without
    /// storing it. `--dry-run` alone means client.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "client", default_value = "none", value_name = "MODE")]
    dry_run: resource::DryRun,
    /// Drive the two agents from this process through pods/portforward and mutual TLS (needs
    /// the katamaran-debug role in the agents' namespace: port-forward, and the agents' CA
    /// Secret to mint a one-hour administrator certificate) instead of creating a Migration.
    #[arg(long)]
    direct: bool,
    /// Output format: text (progress and a table), json or yaml (one document at the end).
    #[arg(short, long, value_enum, default_value = "text")]
    output: Format,
    /// Cancel both sides (roll back) if the migration has not ended by then.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// With --direct: the RuntimeClass of katamaran-managed Kata pods; other pods are refused
    /// (the agents check their own --runtime-class otherwise).
    #[arg(long, default_value = "kata-katamaran", value_name = "NAME")]
    runtime_class: String,
    /// Also wait until the source stops forwarding (its route to the VM taken over, a
    /// release-forward, or --tunnel-idle-timeout).
    #[arg(long)]
    wait_forwarding: bool,
    // Last, so the heading it sets does not spill onto the flags above.
    #[command(flatten, next_help_heading = "Migration options")]
    migrate: MigrateFlags,
}

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Migrated = 0,
    Failed = 1,
    Refused = 2,
    Cancelled = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

fn fail(code: Exit, e: impl Into<anyhow::Error>) -> Exit {
    eprintln!("error: {:#}", e.into());
    code
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() { Exit::Refused.into() } else { ExitCode::SUCCESS };
        }
    };
    let default = match cli.kube.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KATAMARAN_LOG").unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return fail(Exit::Failed, anyhow::Error::from(e).context("cannot start the async runtime"))
                .into()
        }
    };
    rt.block_on(run(cli)).into()
}

/// `--server`: a URL with an http or https scheme and a host, or HOST:PORT (https).
fn parse_server(s: &str) -> Result<hyper::Uri, String> {
    let full = if s.contains("://") { s.to_owned() } else { format!("https://{s}") };
    let uri: hyper::Uri = full.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(uri),
        _ => Err(format!("{s:?}: expected https://HOST:PORT (or http://, or HOST:PORT)")),
    }
}

/// `--request-timeout`: `0`, or a duration with its unit (kubectl's rule: a bare number is
/// ambiguous).
fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.chars().all(|c| c.is_ascii_digit()) && !t.is_empty() {
        return if t.chars().all(|c| c == '0') {
            Ok(Duration::ZERO)
        } else {
            Err(format!("{s:?} has no unit: say {t}s, {t}m or {t}h (0 for no limit)"))
        };
    }
    parse_duration(t)
}

async fn client(flags: &KubeFlags) -> anyhow::Result<Client> {
    let options = KubeConfigOptions {
        context: flags.context.clone(),
        cluster: flags.cluster.clone(),
        user: flags.user.clone(),
    };
    let loaded = if let Some(path) = &flags.kubeconfig {
        let kubeconfig = Kubeconfig::read_from(path)
            .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
        Config::from_custom_kubeconfig(kubeconfig, &options).await.context("invalid kubeconfig")
    } else if options.context.is_some() || options.cluster.is_some() || options.user.is_some() {
        Config::from_kubeconfig(&options).await.context("invalid kubeconfig")
    } else {
        Config::infer().await.context("no Kubernetes configuration (kubeconfig or in-cluster)")
    };
    let mut config = match (loaded, &flags.server) {
        (Ok(c), _) => c,
        // kubectl's --server (with --token) needs no kubeconfig at all.
        (Err(_), Some(server)) if flags.kubeconfig.is_none() => Config::new(server.clone()),
        (Err(e), _) => return Err(e),
    };
    if let Some(server) = &flags.server {
        config.cluster_url = server.clone();
    }
    if let Some(token) = &flags.token {
        let auth = &mut config.auth_info;
        auth.token = Some(token.clone().into());
        auth.token_file = None;
        auth.username = None;
        auth.password = None;
        auth.exec = None;
        auth.auth_provider = None;
    }
    if let Some(user) = &flags.as_user {
        config.auth_info.impersonate = Some(user.clone());
        config.auth_info.impersonate_uid.clone_from(&flags.as_uid);
        config.auth_info.impersonate_groups = (!flags.as_group.is_empty()).then(|| flags.as_group.clone());
    }
    if !flags.request_timeout.is_zero() {
        config.connect_timeout = Some(flags.request_timeout);
    }
    if let Some(ns) = &flags.namespace {
        config.default_namespace.clone_from(ns);
    }
    Client::try_from(config).context("cannot build the Kubernetes client")
}

async fn run(cli: Cli) -> Exit {
    let rx = orchestrate::stop_on_ctrl_c(|| {
        eprintln!("interrupted again: quitting without waiting for the agents");
        std::process::exit(Exit::Cancelled as i32);
    });
    let Command::Pod(args) = &cli.command;
    if args.direct {
        migrate(&cli.kube, args, rx).await
    } else {
        migrate_through_resource(&cli.kube, args, rx).await
    }
}

/// Creates a Migration and follows it until the VM runs on the target or the migration ended.
async fn migrate_through_resource(
    flags: &KubeFlags,
    args: &PodArgs,
    interrupt: watch::Receiver<bool>,
) -> Exit {
    use katamaran_api::v1alpha1::Migration;
    use kube::ResourceExt;
    for (what, name) in [("pod", &args.name), ("--to node", &args.to)] {
        if let Err(e) = resource::check_name(what, name) {
            return fail(Exit::Refused, anyhow::anyhow!(e));
        }
    }
    let options = resource::options(&args.migrate.options());
    if let Err(e) = options.resolve() {
        return fail(Exit::Refused, e);
    }
    let m = resource::new_migration(&args.name, &args.to, options);
    if args.dry_run == resource::DryRun::Client {
        return print_document(args.output, &m, || {
            format!(
                "would create a Migration of pod {} to node {} (dry run, nothing sent)\n",
                args.name, args.to
            )
        });
    }
    let client = match client(flags).await {
        Ok(c) => c,
        Err(e) => return fail(Exit::Refused, e),
    };
    let namespace = flags.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<Migration> = Api::namespaced(client, &namespace);
    let request = resource::create(&api, &m, args.dry_run == resource::DryRun::Server);
    let created = if flags.request_timeout.is_zero() {
        request.await
    } else {
        match tokio::time::timeout(flags.request_timeout, request).await {
            Ok(r) => r,
            Err(_) => {
                return fail(
                    Exit::Failed,
                    anyhow::anyhow!(
                        "create Migration in {namespace}: no answer within --request-timeout {:?}",
                        flags.request_timeout
                    ),
                )
            }
        }
    };
    let created = match created {
        Ok(c) => c,
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 404 | 409 | 422) => {
            return fail(Exit::Refused, anyhow::anyhow!("create Migration in {namespace}: {}", s.message))
        }
        Err(e) => {
            return fail(
                Exit::Failed,
                anyhow::Error::new(e).context(format!("create Migration in {namespace}")),
            )
        }
    };
    if args.dry_run == resource::DryRun::Server {
        return print_document(args.output, &created, || {
            format!(
            "the API server admits a Migration of pod {namespace}/{} to node {} (dry run, nothing stored)\n",
            args.name, args.to
        )
        });
    }
    let name = created.name_any();
    eprintln!("Migration {namespace}/{name} created; following it (Ctrl-C asks for the cancel)");
    let mut err = std::io::stderr();
    let followed =
        resource::follow(&api, &name, args.wait_forwarding, args.timeout, interrupt, &mut err).await;
    let last = followed.migration.clone().unwrap_or(created);
    let printed = print_document(args.output, &last, || format!("\n{}", resource::render(&last)));
    if printed != Exit::Migrated {
        return printed;
    }
    let status = last.status.clone().unwrap_or_default();
    let source = status.source_node.clone().unwrap_or_else(|| "the source node".into());
    match (&followed.verdict, followed.cancel_asked) {
        (resource::Verdict::Moved, Some(_)) => {
            eprintln!(
                "the cancel was refused: the migration was past its commit point; the VM runs on {}",
                args.to
            );
            Exit::Migrated
        }
        (resource::Verdict::Moved, None) => Exit::Migrated,
        (resource::Verdict::Ended { phase: katamaran_api::v1alpha1::Phase::Pending, .. }, asked) => {
            eprintln!(
                "error: no katamaran agent took Migration {namespace}/{name} as far as its status shows; it was deleted (an agent that took it meanwhile cancels what it started)"
            );
            if asked == Some("interrupted") {
                Exit::Cancelled
            } else {
                Exit::Failed
            }
        }
        (
            resource::Verdict::Ended { phase: katamaran_api::v1alpha1::Phase::Cancelled, .. },
            Some("interrupted"),
        ) => {
            eprintln!("cancelled: the cancel was honoured; the pod keeps running on {source}");
            Exit::Cancelled
        }
        (resource::Verdict::Ended { refused: true, .. }, _) => {
            eprintln!(
                "error: Migration {namespace}/{name} was refused: {}",
                status.message.unwrap_or_default()
            );
            Exit::Refused
        }
        (resource::Verdict::Ended { phase, .. }, asked) => {
            let why = match asked {
                Some("timeout") => format!(" (--timeout {:?} passed)", args.timeout.unwrap_or_default()),
                _ => String::new(),
            };
            eprintln!(
                "error: Migration {namespace}/{name} ended {}{why}: {}",
                phase.as_str(),
                status.message.unwrap_or_default()
            );
            Exit::Failed
        }
        (resource::Verdict::Running, _) => Exit::Failed,
    }
}

/// Prints `doc` as `-o` says (text: `text()`); an unprintable document is a failure.
fn print_document<T: serde::Serialize>(format: Format, doc: &T, text: impl FnOnce() -> String) -> Exit {
    match format.document(doc) {
        None => print!("{}", text()),
        Some(Ok(d)) => println!("{}", d.trim_end()),
        Some(Err(e)) => return fail(Exit::Failed, anyhow::anyhow!("cannot print the result: {e}")),
    }
    Exit::Migrated
}

async fn migrate(flags: &KubeFlags, args: &PodArgs, interrupt: watch::Receiver<bool>) -> Exit {
    let client = match client(flags).await {
        Ok(c) => c,
        Err(e) => return fail(Exit::Refused, e),
    };
    let namespace = flags.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let resolver = Resolver::new(client.clone(), flags.agent_namespace.clone())
        .with_request_timeout(Some(flags.request_timeout));
    let stoppable = |interrupt: watch::Receiver<bool>| async move {
        let mut rx = interrupt;
        if rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    };

    let resolved = tokio::select! {
        r = resolver.resolve(&namespace, &args.name, &args.to, &args.runtime_class) => r,
        () = stoppable(interrupt.clone()) => return fail(Exit::Cancelled, anyhow::anyhow!("interrupted; nothing was changed")),
    };
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => return fail(if e.is_refusal() { Exit::Refused } else { Exit::Failed }, e),
    };
    let options = args.migrate.options();
    if let Err(e) =
        options.validate(&resolved.pod.ips, Some((resolved.source.address, resolved.destination.address)))
    {
        return fail(Exit::Refused, e);
    }
    if args.dry_run == resource::DryRun::Server {
        return fail(Exit::Refused, anyhow::anyhow!("--dry-run=server needs a Migration; drop --direct"));
    }
    // The agents accept callers with an identity from the cluster CA only.
    let tls = admin_identity(&client, &flags.agent_namespace).await;
    let pods: Api<Pod> = Api::namespaced(client, &flags.agent_namespace);
    let connect = |end: &resolve::NodeEnd, tls: PeerTls| {
        let (pods, ns, port) = (pods.clone(), flags.agent_namespace.clone(), flags.agent_port);
        let (pod, node) = (end.agent_pod.clone(), end.node.clone());
        async move { Agent::connect(&pods, &ns, &pod, &node, port, &tls).await }
    };

    if args.dry_run == resource::DryRun::Client {
        let agent = match tls {
            Ok(tls) => connect(&resolved.source, tls).await.map_err(anyhow::Error::from),
            Err((_, e)) => Err(e),
        };
        return dry_run(args, &resolved, &options, agent).await;
    }
    let tls = match tls {
        Ok(tls) => tls,
        Err((code, e)) => return fail(code, e),
    };

    let agents = tokio::select! {
        r = futures::future::try_join(connect(&resolved.source, tls.clone()), connect(&resolved.destination, tls)) => r,
        () = stoppable(interrupt.clone()) => return fail(Exit::Cancelled, anyhow::anyhow!("interrupted; nothing was changed")),
    };
    let (source, destination) = match agents {
        Ok(pair) => pair,
        Err(e) => return fail(if e.is_refusal() { Exit::Refused } else { Exit::Failed }, e),
    };
    let sandbox = tokio::select! {
        r = find_sandbox(&source, &resolved) => r,
        () = stoppable(interrupt.clone()) => return fail(Exit::Cancelled, anyhow::anyhow!("interrupted; nothing was changed")),
    };
    let sandbox = match sandbox {
        Ok(s) => s,
        Err((code, e)) => return fail(code, e),
    };
    let migration_id = match orchestrate::new_migration_id() {
        Ok(id) => id,
        Err(e) => {
            return fail(Exit::Failed, anyhow::Error::new(e).context("cannot generate the migration id"))
        }
    };
    let plan = Plan { route: orchestrate::Route::of(&resolved), options, sandbox, migration_id };
    let settings = Settings {
        timeout: args.timeout,
        wait_forwarding: args.wait_forwarding,
        cancel_grace: DEFAULT_CANCEL_GRACE,
        stopped_by: orchestrate::KUBECTL_STOP,
        stop_hint: " (Ctrl-C again to quit without waiting)",
    };
    let mut progress =
        output::progress_for(args.output, std::io::stdout().is_terminal(), std::io::stderr().is_terminal());
    let report =
        orchestrate::run(&plan, &source, &destination, &settings, interrupt, progress.as_mut()).await;
    progress.finish();
    let report = match report {
        Ok(r) => r,
        Err(e) => return fail(if e.is_refusal() { Exit::Refused } else { Exit::Failed }, e),
    };
    let summary = output::summarize(&resolved, &plan, &report);
    match args.output.document(&summary) {
        None => print!("\n{}", output::render_text(&summary)),
        Some(Ok(doc)) => println!("{}", doc.trim_end()),
        Some(Err(e)) => return fail(Exit::Failed, anyhow::anyhow!("cannot print the result: {e}")),
    }
    match &report.outcome {
        Outcome::Succeeded => Exit::Migrated,
        Outcome::Cancelled => {
            eprintln!("cancelled: both sides rolled back; the pod keeps running on {}", resolved.source.node);
            Exit::Cancelled
        }
        Outcome::Failed { message, .. } => {
            eprintln!("error: migration {} failed: {message}", report.migration_id);
            Exit::Failed
        }
    }
}

/// An administrator's identity (`admin.katamaran.io`, one hour) minted from the agents' CA,
/// read from its Secret: who may read that Secret (cluster administrators, through
/// katamaran-debug) may call the agents.
async fn admin_identity(client: &Client, namespace: &str) -> Result<PeerTls, (Exit, anyhow::Error)> {
    let what = format!("Secret {namespace}/{CA_SECRET}");
    let secret = Api::<Secret>::namespaced(client.clone(), namespace).get(CA_SECRET).await.map_err(|e| {
        let code = match &e {
            kube::Error::Api(s) if s.code == 403 || s.code == 404 => Exit::Refused,
            _ => Exit::Failed,
        };
        let hint = "--direct calls the agents with an identity from their CA: it needs `get` on that Secret \
                    (the katamaran-debug role) and the CA made at install (`katamaran-agent ca init`)";
        (code, anyhow::Error::new(e).context(format!("cannot read the agents' CA, {what} ({hint})")))
    })?;
    let data = secret.data.unwrap_or_default();
    let field = |key: &str| {
        data.get(key)
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .map(str::to_owned)
            .ok_or_else(|| (Exit::Failed, anyhow::anyhow!("{what} has no {key} in its data")))
    };
    let ca = ClusterCa::from_pem(&field(CA_CERT_FILE)?, &field(CA_KEY_FILE)?, &what)
        .map_err(|e| (Exit::Failed, anyhow::Error::new(e)))?;
    PeerTls::issue(ca, PeerName::Admin, ADMIN_CERT_LIFETIME)
        .map_err(|e| (Exit::Failed, anyhow::Error::new(e)))
}

/// Lists the source agent's sandboxes and inspects the pod's.
async fn find_sandbox(
    source: &Agent,
    resolved: &Resolved,
) -> Result<katamaran_protos::v1::Sandbox, (Exit, anyhow::Error)> {
    let transport =
        |e: transport::Error| (if e.is_refusal() { Exit::Refused } else { Exit::Failed }, e.into());
    let sandboxes = source.list_sandboxes().await.map_err(transport)?;
    let id =
        resolve::match_sandbox(&sandboxes, &resolved.pod).map_err(|e| (Exit::Refused, e.into()))?.id.clone();
    source.inspect(&id).await.map_err(transport)
}

async fn dry_run(
    args: &PodArgs,
    resolved: &Resolved,
    options: &katamaran::migration::options::MigrationOptions,
    agent: Result<Agent, anyhow::Error>,
) -> Exit {
    // Reading the sandbox list changes nothing; an unreachable agent is reported, not fatal.
    let sandbox = match agent {
        Ok(agent) => match agent.list_sandboxes().await {
            Ok(list) => match resolve::match_sandbox(&list, &resolved.pod) {
                Ok(s) => Ok(s.clone()),
                Err(e) => return fail(Exit::Refused, e),
            },
            Err(e) => Err(format!("{:#}", anyhow::Error::from(e))),
        },
        Err(e) => Err(format!("{e:#}")),
    };
    let sandbox_ref = sandbox.as_ref().map_err(String::as_str);
    match args.output.document(&output::plan_view(resolved, options, sandbox_ref)) {
        None => print!("{}", output::render_plan_text(resolved, options, sandbox_ref)),
        Some(Ok(doc)) => println!("{}", doc.trim_end()),
        Some(Err(e)) => return fail(Exit::Failed, anyhow::anyhow!("cannot print the plan: {e}")),
    }
    Exit::Migrated
}
