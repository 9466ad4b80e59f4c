//! The engine's own cutover, end to end: two `katamaran-agent node` processes, as deployed, each
//! in its node's namespace, migrate a Kata-shaped sandbox whose "QEMU" is
//! `katamaran-qemu-standin` (nested TCG is too slow for a real guest here) while a 1000 pps
//! probe runs against the VM's echo. Nothing of the cutover is the check's: the agents pick the
//! moment, create the tunnel (ipip for an IPv4 VM, ip6ip6 for an IPv6 one) and move the route,
//! stop the VM, hold its packets in the destination tap's `sch_plug`, commit, resume and release.
//!
//! ```text
//!  client ─ c0 ══ a-c ─ node-a ─ a-b ══ b-a ─ node-b
//!                         │ kmr-sb (route VM/32|/128)  └ the incoming sandbox (agent-made:
//!                         ══ eth0 ─ sb-a                  netns, veth, tap0_kata + plug, QEMU)
//!                              tcfilter ⇄ tap0_kata ─ katamaran-qemu-standin (echo :7)
//!  katamaran-agent node (node-a)  ═ ctl + ram streams ═  katamaran-agent node (node-b)
//!  this check: Inspect, PrepareIncoming, StartMigration, Watch (katamaran::cluster::orchestrate)
//! ```
//!
//! Asserted: the migration succeeds; the probe loses nothing, sees no duplicate, and nothing
//! out of order but packets the source's tap drain recovered (see [`verdict`]); the
//! destination's tap was held by a plug (kind `plug`, packets queued in it while the VM was
//! paused); the source node's VM route ends in the family's tunnel to node-b; then
//! ReleaseForward on the source and RemoveIncoming on the destination leave no VM route on
//! node-a and nothing of the received sandbox on node-b. Printed: STOP→RESUME, the engine's
//! route swap relative to STOP, RESUME→release, the packets the plug held and the longest gap.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use katamaran::client;
use katamaran::cluster::orchestrate::{self, Outcome, Plan as MigrationPlan, Route, Settings, Side};
use katamaran::cluster::transport::Agent as AgentClient;
use katamaran::migration::options::{MigrationOptions, StorageMode, TunnelMode as EngineTunnel};
use katamaran::net::{NetOps, NetnsHandle, NetnsRoots, QdiscParent, RouteSpec, TapSpec};
use katamaran::sandbox::NodeLayout;
use katamaran_probe::{ProbeConfig, Report};
use katamaran_protos::v1 as pb;

use crate::error::{ensure, CheckError, Result, Step};
use crate::lab::{host, wire, Node};
use crate::report::Metrics;
use crate::topo::{Plan, ECHO_PORT};

/// The sandbox's id (a Kubernetes pod sandbox id as containerd names it, shortened).
const SANDBOX: &str = "klab-engine0";
/// The pod's MAC: eth0 in the sandbox and the guest NIC.
const POD_MAC: &str = "02:6b:6c:61:62:01";
/// Guest RAM; the stand-in sends all of it in the first pass.
const RAM: &str = "128M";
/// The node agents' data port.
const DATA_PORT: u16 = 10556;
/// How long each wait of the check may take.
const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// Probe traffic before the migration starts and after it ended.
const SETTLE: Duration = Duration::from_secs(1);

/// Where the programs the check runs are.
#[derive(Debug, Clone)]
pub struct Programs {
    /// `katamaran-agent`.
    pub agent: PathBuf,
    /// `katamaran-qemu-standin`.
    pub standin: PathBuf,
}

impl Programs {
    /// Both next to the running executable (the lab image's `/bin`).
    pub fn beside_self() -> Self {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/bin"));
        Self { agent: dir.join("katamaran-agent"), standin: dir.join("katamaran-qemu-standin") }
    }
}

/// The tunnel the engine is asked for and the kind of link the forward ends in, per family:
/// ipip for an IPv4 VM between IPv4 nodes, ip6ip6 for an IPv6 VM between IPv6 nodes.
fn tunnel_of(plan: Plan) -> (EngineTunnel, &'static str) {
    if plan.vm.is_ipv4() {
        (EngineTunnel::Ipip, "ipip")
    } else {
        (EngineTunnel::Ip6ip6, "ip6tnl")
    }
}

/// Runs the check for the VM, nodes and client addresses of `plan` ([`Plan::V4`] or
/// [`Plan::V6`]).
///
/// # Errors
/// The first step or assertion that fails.
pub async fn run(programs: &Programs, plan: Plan, m: &mut Metrics) -> Result<()> {
    for p in [&programs.agent, &programs.standin] {
        ensure(p.is_file(), || format!("{} is missing (the lab image ships it)", p.display()))?;
    }
    let base = PathBuf::from(format!("/run/kernel-lab/engine-{}", std::process::id()));
    let _base_guard = RemoveDir(base.clone());
    let lab = Lab::build(plan, &base).await?;
    let layout_a = NodeLayout::under(&base.join("node-a"));
    let layout_b = NodeLayout::under(&base.join("node-b"));

    // The source sandbox as Kata leaves it: bundle, VM dir, QEMU (daemonized, in the pod netns).
    let vm_dir = layout_a.vm_dir(SANDBOX);
    std::fs::create_dir_all(&vm_dir).step(format!("create {}", vm_dir.display()))?;
    write_bundle(&layout_a, lab.sandbox.path())?;
    let _source_vm = start_source_vm(programs, &lab, &vm_dir, &base).await?;

    let agent_a = AgentProcess::start(programs, &lab.node_a, &layout_a, plan.node_a, "a-b", &base).await?;
    let agent_b = AgentProcess::start(programs, &lab.node_b, &layout_b, plan.node_b, "b-a", &base).await?;
    let _incoming_vm = KillIncoming(layout_b.katamaran_run.clone());

    // Traffic first: the VM must answer before anything moves.
    let target = SocketAddr::new(plan.vm, ECHO_PORT);
    let mut probe_cfg = ProbeConfig::new(target);
    probe_cfg.rate = 1000;
    probe_cfg.duration = PHASE_LIMIT * 4;
    probe_cfg.wait_ready = Some(PHASE_LIMIT);
    let stop_probe = probe_cfg.stop.clone();
    let probe = lab.client.spawn_inside("probe", move || {
        crate::lab::pin_to_traffic_cpu();
        katamaran_probe::run(&probe_cfg).map_err(CheckError::Probe)
    })?;
    let _stop_guard = StopOnDrop(stop_probe.clone());
    tokio::time::sleep(SETTLE).await;

    // The plug watcher: the incoming sandbox's tap, read while the migration runs.
    let plug = PlugWatch::spawn(layout_b.katamaran_run.join("netns"));

    let (source, destination) = (agent_a.client("node-a").await?, agent_b.client("node-b").await?);
    let sandbox = source
        .inspect(SANDBOX)
        .await
        .map_err(|e| CheckError::Unexpected(format!("Inspect of the source sandbox failed: {e}")))?;
    let options = MigrationOptions {
        storage: StorageMode::Shared,
        plain_streams: true,
        tunnel_mode: tunnel_of(plan).0,
        ..MigrationOptions::default()
    };
    let migration = MigrationPlan {
        route: Route::of_sandbox(SANDBOX, &source, &destination),
        options,
        sandbox,
        migration_id: client::new_migration_id()
            .map_err(|e| CheckError::Unexpected(format!("no migration id: {e}")))?,
    };
    let settings = Settings {
        timeout: Some(PHASE_LIMIT * 2),
        wait_forwarding: false,
        cancel_grace: Duration::from_secs(10),
        stopped_by: "the kernel lab",
        stop_hint: "",
    };
    let (_interrupt, interrupt_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let report = orchestrate::run(&migration, &source, &destination, &settings, interrupt_rx, &mut ()).await;
    m.ms("migration", started.elapsed());
    let report = report.map_err(|e| {
        CheckError::Unexpected(format!(
            "the migration could not run: {e}\n{}\n{}",
            agent_a.log_tail(25),
            agent_b.log_tail(25)
        ))
    })?;
    let seen = plug.finish();
    if report.outcome != Outcome::Succeeded {
        return Err(CheckError::Unexpected(format!(
            "the migration did not succeed: {:?}\n{}\n{}",
            report.outcome,
            agent_a.log_tail(25),
            agent_b.log_tail(25)
        )));
    }
    tokio::time::sleep(SETTLE).await;
    stop_probe.store(true, Ordering::Relaxed);
    let probe: Report = tokio::task::spawn_blocking(move || probe.join())
        .await
        .map_err(|_| CheckError::Panicked("probe join"))?
        .map_err(|_| CheckError::Panicked("probe"))??;

    let times = Times::of(&report)?;
    let forward = lab.forward_kind(plan).await?;
    record(m, &probe, &times, &seen);
    let drained = agent_a.drained().unwrap_or(0);
    m.count("source_tap_drained", drained);
    m.note(format!("forward: VM route on node-a via {forward}"));
    verdict(&probe, &seen, drained, &forward, plan)?;

    // The end of the move as a cluster ends it: the forward released on the source node, the
    // received sandbox removed on the destination (here, since the lab has no pod lifecycle).
    let (raw_a, raw_b) = (agent_a.raw("node-a").await?, agent_b.raw("node-b").await?);
    let mut release = pb::ReleaseForwardRequest::new();
    release.migration_id = migration.migration_id.clone();
    raw_a
        .release_forward(client::ctx(PHASE_LIMIT), &release)
        .await
        .map_err(|e| CheckError::Unexpected(format!("ReleaseForward failed: {}", client::rpc_text(&e))))?;
    let mut remove = pb::RemoveIncomingRequest::new();
    remove.sandbox_id = report.destination_sandbox_id.clone().unwrap_or_else(|| SANDBOX.to_owned());
    raw_b
        .remove_incoming(client::ctx(PHASE_LIMIT), &remove)
        .await
        .map_err(|e| CheckError::Unexpected(format!("RemoveIncoming failed: {}", client::rpc_text(&e))))?;
    let routes = lab.node_a.net().routes(plan.vm_prefix()).await.step("read node-a's VM route")?;
    ensure(routes.is_empty(), || format!("node-a still routes the VM after ReleaseForward: {routes:?}"))?;
    let left = leftovers(&layout_b);
    ensure(left.is_empty(), || format!("RemoveIncoming left {left:?} on node-b"))
}

/// Namespaces and incoming sandbox directories the destination agent still has.
fn leftovers(layout: &NodeLayout) -> Vec<PathBuf> {
    [layout.katamaran_run.join("netns"), layout.katamaran_run.join("incoming")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .collect()
}

/// The cutover instants both agents reported.
#[derive(Debug, Clone, Copy)]
struct Times {
    stop_to_resume: Duration,
    /// Positive: the route moved before STOP (the controlled switchover).
    swap_before_stop_ms: f64,
    resume_to_release: Duration,
    downtime: Duration,
}

impl Times {
    fn of(r: &orchestrate::Report) -> Result<Self> {
        let missing = |what: &str| CheckError::Unexpected(format!("the {what} reported no cutover times"));
        let src = r.cutover(Side::Source).ok_or_else(|| missing("source"))?;
        let dst = r.cutover(Side::Destination).ok_or_else(|| missing("destination"))?;
        ensure(
            src.stop_unix_nanos > 0 && dst.resume_unix_nanos > 0 && src.route_swapped_unix_nanos > 0,
            || format!("a cutover instant is missing: {src:?} / {dst:?}"),
        )?;
        let ns = |n: u64| n as f64 / 1e6;
        Ok(Self {
            stop_to_resume: Duration::from_nanos(dst.resume_unix_nanos.saturating_sub(src.stop_unix_nanos)),
            swap_before_stop_ms: ns(src.stop_unix_nanos) - ns(src.route_swapped_unix_nanos),
            resume_to_release: Duration::from_nanos(dst.plug_release_latency_nanos),
            downtime: Duration::from_millis(src.downtime_ms),
        })
    }
}

/// What the plug watcher saw on the incoming sandbox's tap.
#[derive(Debug, Clone, Copy, Default)]
struct PlugSeen {
    /// A root qdisc of kind `plug` was on `tap0_kata`.
    present: bool,
    /// The most packets queued in it at once.
    max_held: u32,
    /// Its drop counter, last read.
    drops: u32,
}

fn record(m: &mut Metrics, r: &Report, t: &Times, seen: &PlugSeen) {
    m.count("sent", r.sent);
    m.count("received", r.received);
    m.count("lost", r.lost);
    m.count("duplicated", r.duplicated);
    m.count("reordered", r.reordered);
    m.count("plug_held_max", u64::from(seen.max_held));
    m.count("plug_drops", u64::from(seen.drops));
    m.ms("stop_to_resume", t.stop_to_resume);
    m.push("swap_before_stop", t.swap_before_stop_ms, "ms");
    m.ms("resume_to_release", t.resume_to_release);
    m.ms("qemu_downtime", t.downtime);
    m.push("longest_gap", r.longest_gap_ms, "ms");
}

/// In order means: no reply overtaken, except by packets the VM left unread in the source tap
/// past the engine's settle limit, which the tap drain recovers after the move (late, behind
/// what the destination held; docs/ENGINE.md). Those are counted, never lost.
fn verdict(r: &Report, seen: &PlugSeen, drained: u64, forward: &Forward, plan: Plan) -> Result<()> {
    ensure(r.send_errors == 0, || format!("{} probe sends failed", r.send_errors))?;
    ensure(r.received > 0, || "the VM never answered the probe".into())?;
    ensure(r.lost == 0, || format!("lost {} of {}; loss runs {:?}", r.lost, r.sent, r.loss_timeline))?;
    ensure(r.duplicated == 0, || format!("{} duplicated replies", r.duplicated))?;
    ensure(r.reordered <= drained, || {
        format!(
            "{} reordered replies, but the source's tap drain re-sent only {drained} packets",
            r.reordered
        )
    })?;
    ensure(seen.present, || "no sch_plug qdisc was seen on the incoming sandbox's tap0_kata".into())?;
    ensure(seen.max_held > 0, || "the destination's plug never held a packet during the cutover".into())?;
    ensure(seen.drops == 0, || format!("the plug dropped {} packets", seen.drops))?;
    let kind = tunnel_of(plan).1;
    ensure(forward.kind == kind && forward.remote == Some(plan.node_b), || {
        format!("the source node's VM route does not end in an {kind} tunnel to node-b: {forward}")
    })
}

/// The source node's route for the VM after the move.
#[derive(Debug, Clone)]
struct Forward {
    dev: String,
    kind: String,
    remote: Option<IpAddr>,
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (kind {}, remote {:?})", self.dev, self.kind, self.remote)
    }
}

/// The namespaces and links of the check.
#[derive(Debug)]
struct Lab {
    client: Node,
    node_a: Node,
    node_b: Node,
    sandbox: Node,
}

impl Lab {
    async fn build(plan: Plan, base: &Path) -> Result<Self> {
        std::fs::create_dir_all(base).step(format!("create {}", base.display()))?;
        // An IPv4 lab gives the client and the pod no IPv6 (nothing unasked in the plug).
        let v4 = plan.vm.is_ipv4();
        let client = Node::new("client").await?.without_ipv6_if(v4).await?;
        // The nodes keep IPv6: the destination agent gives the incoming pod's veth the
        // link-local IPv6 gateway (fe80::1), as it does on any node.
        let node_a = Node::router("node-a").await?;
        let node_b = Node::router("node-b").await?;
        let sandbox = Node::new("sb-a").await?.without_ipv6_if(v4).await?;

        crate::topo::wire_client_and_underlay(&plan, &client, &node_a, &node_b).await?;

        // The pod: calico-style veth (host end on node-a, eth0 with the pod MAC in the sandbox),
        // the VM's /32, a link-local gateway, and Kata's tcfilter between eth0 and tap0_kata.
        let pod = wire(&node_a, "kmr-sb", &sandbox, "eth0").await?;
        let mac = katamaran_pod_mac()?;
        sandbox.net().set_mac(&pod.b, mac).await.step("set the pod MAC on eth0")?;
        sandbox.address(&pod.b, plan.vm_prefix()).await?;
        sandbox.neighbour(&pod.b, plan.vm_gateway, pod.a_mac).await?;
        // The way back to the client (katamaran's netlink layer writes host routes only; a pod's
        // default route plays this part in a cluster).
        sandbox.route(&RouteSpec::via_onlink(host(plan.client), plan.vm_gateway, pod.b.clone())).await?;
        node_a.route(&RouteSpec::dev(plan.vm_prefix(), pod.a.clone())).await?;
        node_a.neighbour(&pod.a, plan.vm, mac).await?;
        let tap = sandbox
            .net()
            .create_tap(&TapSpec { name: "tap0_kata".into(), multi_queue: false, vnet_hdr: false })
            .await
            .step("create tap0_kata in the sandbox")?;
        sandbox.up("tap0_kata").await?;
        for link in [&pod.b, &tap] {
            sandbox
                .net()
                .add_ingress_qdisc(link)
                .await
                .step(format!("add the ingress qdisc on {}", link.name))?;
        }
        sandbox.net().add_redirect_filter(&pod.b, &tap).await.step("redirect eth0 → tap0_kata")?;
        sandbox.net().add_redirect_filter(&tap, &pod.b).await.step("redirect tap0_kata → eth0")?;
        Ok(Self { client, node_a, node_b, sandbox })
    }

    async fn forward_kind(&self, plan: Plan) -> Result<Forward> {
        let routes = self.node_a.net().routes(plan.vm_prefix()).await.step("read node-a's VM route")?;
        let oif = routes
            .iter()
            .find_map(|r| r.oif)
            .ok_or_else(|| CheckError::Unexpected(format!("node-a has no route for the VM: {routes:?}")))?;
        let links = self.node_a.net().run(move || link_name(oif)).await.step("list node-a's links")?;
        let dev = links.step("name node-a's VM route device")?;
        let info = self.node_a.net().link(&dev).await.step(format!("read {dev} on node-a"))?;
        Ok(Forward { dev, kind: info.kind.unwrap_or_default(), remote: info.tunnel.and_then(|t| t.remote) })
    }
}

/// The interface name of index `oif` in the calling thread's namespace.
fn link_name(oif: u32) -> std::io::Result<String> {
    nix::net::if_::if_indextoname(oif).map_err(std::io::Error::from).map(|n| n.to_string_lossy().into_owned())
}

fn katamaran_pod_mac() -> Result<katamaran::net::MacAddr> {
    POD_MAC.parse().map_err(|_| CheckError::Unexpected(format!("{POD_MAC} is not a MAC")))
}

/// containerd's bundle for the pod sandbox: the network namespace and the CRI annotations.
fn write_bundle(layout: &NodeLayout, netns: &Path) -> Result<()> {
    let dir = layout.bundles.join(SANDBOX);
    std::fs::create_dir_all(&dir).step(format!("create {}", dir.display()))?;
    let config = serde_json::json!({
        "ociVersion": "1.1.0",
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": SANDBOX,
            "io.kubernetes.cri.sandbox-name": "engine0",
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.sandbox-uid": "6b6c6162-0000-4000-8000-656e67696e65",
        },
        "linux": {"namespaces": [{"type": "network", "path": netns}]},
    });
    std::fs::write(dir.join("config.json"), config.to_string()).step("write the sandbox's config.json")
}

/// Kata's QEMU command line, shortened to what the stand-in and the engine read.
fn source_argv(vm_dir: &Path) -> Vec<String> {
    let p = |name: &str| vm_dir.join(name).display().to_string();
    [
        "-name",
        &format!("sandbox-{SANDBOX}"),
        "-uuid",
        "6b6c6162-0000-4000-8000-656e67696e65",
        "-machine",
        "q35",
        "-m",
        RAM,
        "-smp",
        "1",
        "-qmp",
        &format!("unix:{},server=on,wait=off", p("qmp.sock")),
        "-qmp",
        &format!("unix:{},server=on,wait=off", p("extra-monitor.sock")),
        "-pidfile",
        &p("pid"),
        "-daemonize",
        "-nodefaults",
        "-nographic",
        "-no-user-config",
        "-netdev",
        "tap,id=network-0,ifname=tap0_kata,script=no,downscript=no",
        "-device",
        &format!("virtio-net-pci,netdev=network-0,mac={POD_MAC},id=net-0"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Starts the source "QEMU" as Kata does (daemonized, in the pod's namespace) and waits for it
/// to answer the probe's way in: its pid file and QMP socket exist.
async fn start_source_vm(programs: &Programs, lab: &Lab, vm_dir: &Path, base: &Path) -> Result<KillPidFile> {
    let log = base.join("standin-source.log");
    let (program, args) = (programs.standin.clone(), source_argv(vm_dir));
    let status = lab
        .sandbox
        .net()
        .run(move || {
            let out = std::fs::File::create(&log)?;
            let err = out.try_clone()?;
            Command::new(program).args(args).stdin(Stdio::null()).stdout(out).stderr(err).status()
        })
        .await
        .step("enter the sandbox namespace")?
        .step("start the source stand-in")?;
    ensure(status.success(), || format!("the source stand-in did not start: {status}"))?;
    let pid_file = vm_dir.join("pid");
    ensure(vm_dir.join("extra-monitor.sock").exists(), || {
        "the stand-in serves no extra-monitor.sock".into()
    })?;
    Ok(KillPidFile(pid_file))
}

/// A node agent started as the DaemonSet runs it (`katamaran-agent node`), inside its node's
/// namespace; SIGTERM'd (then killed) on drop.
#[derive(Debug)]
struct AgentProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    async fn start(
        programs: &Programs,
        node: &Node,
        layout: &NodeLayout,
        address: IpAddr,
        uplink: &str,
        base: &Path,
    ) -> Result<Self> {
        let root = layout.kata_run.parent().map(Path::to_path_buf).unwrap_or_default();
        let log = base.join(format!("agent-{}.log", node.name));
        let socket = layout.katamaran_run.join("agent.sock");
        let (program, qemu, log_file) = (programs.agent.clone(), programs.standin.clone(), log.clone());
        let args: Vec<String> = vec![
            "node".into(),
            "--root".into(),
            root.display().to_string(),
            "--node-address".into(),
            address.to_string(),
            "--node-interface".into(),
            uplink.into(),
            "--data-port".into(),
            DATA_PORT.to_string(),
            "--qemu".into(),
            qemu.display().to_string(),
            "--vm-cgroup".into(),
            "off".into(),
            "--kube-events".into(),
            "off".into(),
            "--controller".into(),
            "off".into(),
        ];
        let child = node
            .net()
            .run(move || {
                let out = std::fs::File::create(&log_file)?;
                let err = out.try_clone()?;
                Command::new(program)
                    .args(args)
                    .env("KATAMARAN_LOG", "info")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
            })
            .await
            .step(format!("enter {}", node.name))?
            .step(format!("start the {} agent", node.name))?;
        let mut agent = Self { child, socket, log };
        let what = format!("the {} agent to serve {}", node.name, agent.socket.display());
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            if std::os::unix::net::UnixStream::connect(&agent.socket).is_ok() {
                return Ok(agent);
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(CheckError::Unexpected(format!(
                    "the {} agent exited ({status}):\n{}",
                    node.name,
                    agent.log_tail(30)
                )));
            }
            if Instant::now() >= deadline {
                return Err(CheckError::Timeout { what, limit: PHASE_LIMIT });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn client(&self, name: &str) -> Result<AgentClient> {
        Ok(AgentClient::over_client(self.raw(name).await?, name))
    }

    async fn raw(&self, name: &str) -> Result<pb::MigrationClient> {
        client::connect(&format!("unix://{}", self.socket.display()))
            .await
            .map_err(|e| CheckError::Unexpected(format!("cannot connect to the {name} agent: {e}")))
    }

    /// The packets the source agent's tap drain re-sent (its `source tap drained` log line).
    fn drained(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        let line = text.lines().rev().find(|l| l.contains("source tap drained"))?;
        let sent = line.split_whitespace().find_map(|w| w.strip_prefix("sent="))?;
        sent.parse().ok()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!("--- {} ---\n{}", self.log.display(), all[from..].join("\n"))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the incoming sandbox's `tap0_kata` root qdisc from the moment the destination agent
/// creates its namespace (under its `netns` directory) until [`PlugWatch::finish`].
struct PlugWatch {
    stop: Arc<AtomicBool>,
    seen: std::thread::JoinHandle<PlugSeen>,
}

impl PlugWatch {
    fn spawn(dir: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let seen = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(_) => return PlugSeen::default(),
            };
            rt.block_on(watch(dir, flag))
        });
        Self { stop, seen }
    }

    fn finish(self) -> PlugSeen {
        self.stop.store(true, Ordering::Relaxed);
        self.seen.join().unwrap_or_default()
    }
}

async fn watch(dir: PathBuf, stop: Arc<AtomicBool>) -> PlugSeen {
    let mut seen = PlugSeen::default();
    let max = AtomicU32::new(0);
    let mut handle: Option<(NetnsHandle, katamaran::net::LinkId)> = None;
    while !stop.load(Ordering::Relaxed) {
        if handle.is_none() {
            handle = open_incoming(&dir).await;
        }
        if let Some((ns, tap)) = &handle {
            if let Ok(Some(q)) = ns.qdisc(tap, QdiscParent::Root).await {
                if q.kind == "plug" {
                    seen.present = true;
                    max.fetch_max(q.stats.qlen, Ordering::Relaxed);
                    seen.drops = q.stats.drops;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen.max_held = max.load(Ordering::Relaxed);
    seen
}

async fn open_incoming(dir: &Path) -> Option<(NetnsHandle, katamaran::net::LinkId)> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("kmr-"))?;
    let roots = NetnsRoots { dirs: vec![dir.to_path_buf()], proc: None };
    let ns = NetnsHandle::open_in(entry.path(), &roots).ok()?;
    let tap = ns.link("tap0_kata").await.ok()?.id;
    Some((ns, tap))
}

/// Kills the process named by a pid file on drop (the daemonized source stand-in).
struct KillPidFile(PathBuf);

impl Drop for KillPidFile {
    fn drop(&mut self) {
        kill_pid_file(&self.0);
    }
}

/// On a failed check: kills every incoming stand-in under the destination agent's run
/// directory and removes its network namespaces (a received VM outlives its agent by design;
/// RemoveIncoming is what ends it, and a failed check may not get there).
struct KillIncoming(PathBuf);

impl Drop for KillIncoming {
    fn drop(&mut self) {
        if let Ok(dirs) = std::fs::read_dir(self.0.join("incoming")) {
            for d in dirs.flatten() {
                kill_pid_file(&d.path().join("pid"));
            }
        }
        if let Ok(files) = std::fs::read_dir(self.0.join("netns")) {
            for f in files.flatten() {
                let _ = katamaran::net::remove_netns(&f.path());
            }
        }
    }
}

fn kill_pid_file(path: &Path) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<i32>().ok());
    if let Some(pid) = pid.filter(|p| *p > 1) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Removes the check's directory on drop.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raises the probe's stop flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(lost: u64, duplicated: u64, reordered: u64) -> Report {
        crate::checks::probe_report(3000, lost, duplicated, reordered)
    }

    #[test]
    fn the_verdict_allows_late_packets_only_as_many_as_the_drain_recovered() {
        let plan = Plan::V4;
        let plug = PlugSeen { present: true, max_held: 40, drops: 0 };
        let tunnel = Forward { dev: "kmrs1".into(), kind: "ipip".into(), remote: Some(plan.node_b) };
        assert!(verdict(&probe(0, 0, 0), &plug, 0, &tunnel, plan).is_ok());
        assert!(verdict(&probe(0, 0, 8), &plug, 8, &tunnel, plan).is_ok(), "recovered, late");
        assert!(
            verdict(&probe(0, 0, 3), &plug, 2, &tunnel, plan).is_err(),
            "a reorder the drain does not explain"
        );
        assert!(verdict(&probe(1, 0, 0), &plug, 0, &tunnel, plan).is_err(), "a loss");
        assert!(verdict(&probe(0, 1, 0), &plug, 0, &tunnel, plan).is_err(), "a duplicate");
        let no_plug = PlugSeen { present: false, ..plug };
        assert!(verdict(&probe(0, 0, 0), &no_plug, 0, &tunnel, plan).is_err(), "the tap-queue fallback");
        let held_nothing = PlugSeen { max_held: 0, ..plug };
        assert!(verdict(&probe(0, 0, 0), &held_nothing, 0, &tunnel, plan).is_err());
        let route_mode = Forward { kind: "veth".into(), remote: None, ..tunnel.clone() };
        assert!(verdict(&probe(0, 0, 0), &plug, 0, &route_mode, plan).is_err(), "no tunnel");
    }

    #[test]
    fn the_source_command_line_passes_the_destination_rewrite() {
        let vm = Path::new("/run/kernel-lab/engine-1/node-a/run/vc/vm").join(SANDBOX);
        let argv: Vec<String> =
            std::iter::once("/bin/katamaran-qemu-standin".to_owned()).chain(source_argv(&vm)).collect();
        let parsed = katamaran::sandbox::QemuCmdline::parse(&argv).expect("the engine parses it");
        let state = PathBuf::from("/run/kernel-lab/engine-1/node-b/run/katamaran/incoming/x");
        let out = katamaran::sandbox::IncomingRewrite {
            qemu_binary: PathBuf::from("/bin/katamaran-qemu-standin"),
            state_dir: state.clone(),
            source_state_dirs: vec![vm],
            tap_name: "tap0_kata".into(),
            disk_paths: Default::default(),
            allowed_roots: Vec::new(),
        }
        .apply(&parsed)
        .expect("the destination accepts it");
        // … and the stand-in the destination agent spawns with it (plus the `-S` the agent
        // appends) takes it as QEMU would.
        let mut argv = out.argv[1..].to_vec();
        argv.push("-S".into());
        let standin = katamaran_qemu_standin::args::Args::parse(&argv).expect("the stand-in parses it");
        assert!(standin.incoming && standin.start_paused && !standin.daemonize, "{standin:?}");
        assert_eq!(standin.tap.as_deref(), Some("tap0_kata"));
        assert_eq!(standin.mac, Some([0x02, 0x6b, 0x6c, 0x61, 0x62, 0x01]));
        assert_eq!(standin.qmp, vec![state.join("qmp.sock")]);
        let source =
            katamaran_qemu_standin::args::Args::parse(&source_argv(Path::new("/v"))).expect("source");
        assert!(source.daemonize && source.qmp.len() == 2 && source.ram_bytes == 128 << 20, "{source:?}");
    }
}
