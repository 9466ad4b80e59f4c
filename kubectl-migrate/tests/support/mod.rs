//! A small cluster for running the real `kubectl-migrate` binary against: a fake API server with
//! nodes, pods and agent pods, and fake agents behind its port-forward.
//!
//! ```text
//! node-a   192.0.2.1  Ready, agent-a (knows sandbox 3f2a9c of shop/web-0)   ← the source
//! node-b   192.0.2.2  Ready, agent-b                                         ← the destination
//! node-notready       Ready=False (KubeletNotReady)
//! node-cordoned       spec.unschedulable
//! node-noagent        Ready, no agent pod
//! node-v6             Ready, only an IPv6 InternalIP, agent-v6
//! node-down           Ready, agent-down whose port-forward is refused (nothing listens)
//! ```
//!
//! The agents' CA is in the Secret `katamaran-system/katamaran-agent-ca`; behind each port-forward
//! the fake agent serves mutual TLS as its node's identity from it, as a real agent's TCP
//! endpoint does ([`Options::destination_presents`] changes node-b's).

#![allow(dead_code, clippy::unwrap_used)]

pub mod agent;
pub mod apiserver;
pub mod discovery;
pub mod rbac;
pub mod schema;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::ByteString;
use katamaran::peer::{ClusterCa, PeerName, PeerTls};
use katamaran_protos::ttrpc::r#async::Server;
use katamaran_protos::v1::*;
use serde_json::json;

use agent::{CallLog, FakeAgent, Script};
use apiserver::{AgentBackend, FakeApiServer, State};

pub const CLASS: &str = "kata-katamaran";
pub const AGENT_NS: &str = "katamaran-system";
/// Timestamp base of scripted events (ms offsets are added).
pub const T0: u64 = 1_764_115_200_000_000_000;
/// Bound on any one run of the binary.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

pub fn pod(name: &str, node: Option<&str>, class: Option<&str>, phase: &str) -> Pod {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": phase}
    });
    if let Some(n) = node {
        v["spec"]["nodeName"] = json!(n);
        v["status"]["podIP"] = json!("10.244.1.7");
        v["status"]["podIPs"] = json!([{"ip": "10.244.1.7"}]);
    }
    if let Some(c) = class {
        v["spec"]["runtimeClassName"] = json!(c);
    }
    serde_json::from_value(v).unwrap()
}

pub fn node(name: &str, addresses: &[&str], ready: bool, cordoned: bool) -> Node {
    let mut addrs = vec![json!({"type": "Hostname", "address": name})];
    addrs.extend(addresses.iter().map(|a| json!({"type": "InternalIP", "address": a})));
    let ready = if ready {
        json!({"type": "Ready", "status": "True", "reason": "KubeletReady"})
    } else {
        json!({"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "container runtime is down"})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {"unschedulable": cordoned},
        "status": {"conditions": [ready], "addresses": addrs}
    }))
    .unwrap()
}

pub fn agent_pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": AGENT_NS, "uid": format!("uid-{name}"),
                     "labels": {"app.kubernetes.io/name": "katamaran-agent"}},
        "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "katamaran"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap()
}

/// The Kata sandbox of shop/web-0 as agent-a describes it.
pub fn web_sandbox() -> Sandbox {
    let mut s = Sandbox::new();
    s.id = "3f2a9c".into();
    s.pod_name = "web-0".into();
    s.pod_namespace = "shop".into();
    s.pod_uid = "uid-web-0".into();
    s.qemu_pid = 4242;
    s.qemu_version = "7.2.0".into();
    s.run_state = VmRunState::VM_RUN_STATE_RUNNING.into();
    s.qemu_status = "running".into();
    let net = s.network.mut_or_insert_default();
    net.interface_name = "eth0".into();
    net.tap_name = "tap0_kata".into();
    net.mac_address = "02:42:0a:f4:01:07".into();
    let mut ip = IpAddress::new();
    ip.address = "10.244.1.7".into();
    ip.prefix_length = 24;
    net.addresses.push(ip);
    let mut disk = Disk::new();
    disk.drive_id = "drive-0".into();
    disk.size_bytes = 192 << 20;
    s.disks.push(disk);
    s.qemu_argv = ["/usr/bin/qemu-system-x86_64", "-name", "sandbox-3f2a9c", "-m", "512M", "-daemonize"]
        .map(String::from)
        .to_vec();
    s
}

pub fn event(phase: Phase, at_ms: u64, message: &str) -> MigrationEvent {
    let mut e = MigrationEvent::new();
    e.phase = phase.into();
    e.timestamp_unix_nanos = T0 + at_ms * 1_000_000;
    e.message = message.into();
    e
}

/// A source that mirrors, copies RAM, cuts over, forwards and (unless `hang_forwarding`)
/// completes 30 s later.
pub fn source_success(hang_forwarding: bool) -> Script {
    let mut storage = event(Phase::PHASE_STORAGE, 10, "mirroring disks");
    let mut d = DriveProgress::new();
    d.drive_id = "drive-0".into();
    d.total_bytes = 192 << 20;
    d.done_bytes = 192 << 20;
    d.ready = true;
    storage.storage.mut_or_insert_default().drives.push(d);
    let mut ram = event(Phase::PHASE_RAM, 1010, "RAM pre-copy");
    let r = ram.ram.mut_or_insert_default();
    r.total_bytes = 512 << 20;
    r.transferred_bytes = 256 << 20;
    r.remaining_bytes = 256 << 20;
    r.throughput_bytes_per_second = 120 << 20;
    r.expected_downtime_ms = 18;
    r.iteration = 2;
    let mut cutover = event(Phase::PHASE_CUTOVER, 3010, "VM stopped");
    cutover.cutover.mut_or_insert_default().stop_unix_nanos = T0 + 3_010_000_000;
    let mut forwarding = event(Phase::PHASE_FORWARDING, 3190, "VM runs on the destination");
    let c = forwarding.cutover.mut_or_insert_default();
    c.stop_unix_nanos = T0 + 3_010_000_000;
    c.route_swapped_unix_nanos = T0 + 3_010_104_000;
    c.route_swap_latency_nanos = 104_000;
    c.downtime_ms = 115;
    let mut events = vec![event(Phase::PHASE_PREPARING, 0, "preparing"), storage, ram, cutover, forwarding];
    if !hang_forwarding {
        let mut done = event(Phase::PHASE_COMPLETED, 33190, "forwarding idle, removed");
        let r = done.result.mut_or_insert_default();
        r.success = true;
        r.total_ms = 33190;
        r.downtime_ms = 115;
        events.push(done);
    }
    Script { events }
}

pub fn destination_success() -> Script {
    let mut done = event(Phase::PHASE_COMPLETED, 3185, "VM resumed");
    let c = done.cutover.mut_or_insert_default();
    c.resume_unix_nanos = T0 + 3_185_000_000;
    c.plug_released_unix_nanos = T0 + 3_185_087_000;
    c.plug_release_latency_nanos = 87_000;
    c.downtime_ms = 115;
    let r = done.result.mut_or_insert_default();
    r.success = true;
    r.total_ms = 3185;
    r.downtime_ms = 115;
    // Not 0 (the default): the plugin must carry the number through, not print a default.
    r.plug_dropped_packets = 3;
    Script {
        events: vec![
            event(Phase::PHASE_PREPARING, 0, "incoming sandbox ready"),
            event(Phase::PHASE_STORAGE, 10, "receiving disks"),
            event(Phase::PHASE_RAM, 1010, "receiving RAM"),
            event(Phase::PHASE_CUTOVER, 3010, "holding packets"),
            done,
        ],
    }
}

/// A side that reaches RAM and stays there until cancelled.
pub fn stuck_in_ram() -> Script {
    Script {
        events: vec![
            event(Phase::PHASE_PREPARING, 0, "preparing"),
            event(Phase::PHASE_RAM, 10, "RAM pre-copy"),
        ],
    }
}

/// Exit code and output of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub struct Cluster {
    pub api: FakeApiServer,
    pub log: CallLog,
    pub kubeconfig: PathBuf,
    /// Each fake agent's stream intake, by agent pod (plain ttrpc): a test can reach an agent
    /// directly, as the agent's own controller reaches its engine.
    pub intakes: HashMap<String, tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream>>,
    /// The agents' CA, as in its Secret.
    pub ca: ClusterCa,
    // Kept for their lifetime: the ttrpc servers and the kubeconfig's directory.
    servers: Vec<Server>,
    dir: tempfile::TempDir,
}

/// What to change in the default cluster.
pub struct Options {
    pub source: Script,
    pub destination: Script,
    pub forbid_portforward: bool,
    pub refuse_start: Option<(ErrorKind, &'static str)>,
    /// Whose certificate agent-b (node-b's agent) presents behind its port-forward; `None`: it
    /// speaks plain ttrpc, no TLS.
    pub destination_presents: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            source: source_success(false),
            destination: destination_success(),
            forbid_portforward: false,
            refuse_start: None,
            destination_presents: Some("node-b"),
        }
    }
}

impl Cluster {
    pub async fn start(o: Options) -> Self {
        let log = CallLog::default();
        let mut servers = Vec::new();
        let mut agents = HashMap::new();
        let mut intakes = HashMap::new();
        let mut src = FakeAgent::new("node-a", "192.0.2.1", log.clone(), vec![web_sandbox()], o.source);
        if let Some((kind, msg)) = o.refuse_start {
            src = src.refusing_start(kind, msg);
        }
        let ca = ClusterCa::generate(Duration::from_secs(3600)).unwrap();
        for (pod, presents, agent) in [
            ("agent-a", Some("node-a"), src),
            (
                "agent-b",
                o.destination_presents,
                FakeAgent::new("node-b", "192.0.2.2", log.clone(), vec![], o.destination),
            ),
            (
                "agent-v6",
                Some("node-v6"),
                FakeAgent::new("node-v6", "fd00:1::6", log.clone(), vec![], stuck_in_ram()),
            ),
        ] {
            let (tx, server) = agent.serve().await;
            intakes.insert(pod.to_owned(), tx.clone());
            let front = match presents {
                Some(node) => tls_front(identity(&ca, PeerName::node(node).unwrap()), tx),
                None => tx,
            };
            agents.insert(pod.to_owned(), AgentBackend::InProcess(front));
            servers.push(server);
        }
        agents.insert("agent-down".to_owned(), AgentBackend::Refused);
        let state = State {
            nodes: vec![
                node("node-a", &["192.0.2.1"], true, false),
                node("node-b", &["192.0.2.2"], true, false),
                node("node-notready", &["192.0.2.3"], false, false),
                node("node-cordoned", &["192.0.2.4"], true, true),
                node("node-noagent", &["192.0.2.5"], true, false),
                node("node-v6", &["fd00:1::6"], true, false),
                node("node-down", &["192.0.2.7"], true, false),
            ],
            pods: vec![
                pod("web-0", Some("node-a"), Some(CLASS), "Running"),
                pod("orphan", Some("node-a"), Some(CLASS), "Running"),
                pod("plain", Some("node-a"), None, "Running"),
                pod("other-kata", Some("node-a"), Some("kata-qemu"), "Running"),
                pod("pending", None, Some(CLASS), "Pending"),
                agent_pod("agent-a", "node-a"),
                agent_pod("agent-b", "node-b"),
                agent_pod("agent-v6", "node-v6"),
                agent_pod("agent-down", "node-down"),
                agent_pod("agent-notready", "node-notready"),
                agent_pod("agent-cordoned", "node-cordoned"),
            ],
            agents,
            secrets: vec![ca_secret(&ca)],
            forbid_portforward: o.forbid_portforward,
            ..State::default()
        };
        let api = FakeApiServer::start(state).await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        Self { api, log, kubeconfig, intakes, ca, servers, dir }
    }

    /// The plugin binary with `KUBECONFIG` pointing at the fake; killed if the test ends first.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-migrate"));
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .env_remove("KATAMARAN_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    pub async fn run(&self, args: &[&str]) -> Run {
        let child = self.command(args).spawn().unwrap();
        wait(child).await
    }

    /// Serves agent pod `pod`'s fake agent on a unix socket at `path` as well (each connection
    /// one ttrpc stream), as a real agent serves its node's socket.
    pub fn serve_unix(&self, pod: &str, path: &std::path::Path) {
        let intake = self.intakes[pod].clone();
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut unix, _)) = listener.accept().await {
                let (mut near, far) = tokio::io::duplex(1 << 16);
                if intake.send(far).is_err() {
                    return;
                }
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut unix, &mut near).await;
                });
            }
        });
    }

    /// Runs the agents' Migration controller in this process as node-a's agent: its own engine
    /// is agent-a's fake (through a unix socket under `dir`), node-b's agent is reached through
    /// the API server's port-forward. It stops when the returned sender is dropped.
    pub async fn start_controller(&self, dir: &std::path::Path) -> tokio::sync::oneshot::Sender<()> {
        let socket = dir.join("agent-a.sock");
        self.serve_unix("agent-a", &socket);
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.api.kubeconfig()).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let controller = katamaran::cluster::controller::Config {
            node_name: "node-a".to_owned(),
            agent_namespace: AGENT_NS.to_owned(),
            agent_port: 10555,
            runtime_class: CLASS.to_owned(),
            local_socket: socket,
            tls: identity(&self.ca, PeerName::node("node-a").unwrap()),
        };
        tokio::spawn(katamaran::cluster::controller::run(
            kube::Client::try_from(config).unwrap(),
            controller,
            async {
                let _ = stopped.await;
            },
        ));
        stop
    }

    /// Calls received by agents, `node:Rpc`.
    pub fn calls(&self) -> Vec<String> {
        self.log.names()
    }
}

/// An identity from `ca` (24 h).
pub fn identity(ca: &ClusterCa, name: PeerName) -> PeerTls {
    let ca = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem(), "test CA").unwrap();
    PeerTls::issue(ca, name, katamaran::peer::NODE_CERT_LIFETIME).unwrap()
}

/// The Secret `katamaran-agent-ca` holding `ca`, as the API server returns it.
pub fn ca_secret(ca: &ClusterCa) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(katamaran::peer::CA_SECRET.to_owned());
    s.metadata.namespace = Some(AGENT_NS.to_owned());
    s.type_ = Some("Opaque".to_owned());
    s.data = Some(
        [
            (katamaran::peer::CA_CERT_FILE.to_owned(), ByteString(ca.cert_pem().as_bytes().to_vec())),
            (katamaran::peer::CA_KEY_FILE.to_owned(), ByteString(ca.key_pem().as_bytes().to_vec())),
        ]
        .into(),
    );
    s
}

/// A mutual-TLS front for a fake agent, as a real agent's TCP endpoint: each stream sent to the
/// returned sender is authenticated as `tls` (the library's own acceptor) and its plaintext
/// handed to `intake`.
pub fn tls_front(
    tls: PeerTls,
    intake: tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream>,
) -> tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<tokio::io::DuplexStream>();
    let incoming = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|s| ((s, "port-forward".to_owned()), rx))
    });
    let (streams, acceptor) = katamaran::peer::authenticated(incoming, tls);
    tokio::spawn(async move {
        let _acceptor = acceptor;
        let mut streams = std::pin::pin!(streams);
        while let Some(Ok(mut tls)) = streams.next().await {
            let (mut near, far) = tokio::io::duplex(1 << 20);
            if intake.send(far).is_err() {
                return;
            }
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut near).await;
            });
        }
    });
    tx
}

pub async fn wait(child: tokio::process::Child) -> Run {
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .expect("the plugin did not exit in time")
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
