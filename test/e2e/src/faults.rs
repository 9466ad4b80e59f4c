//! A lab for the ownership protocol's fault tests and the soak: one guest, both agents with
//! fail points, `katactl` migrations in the background, holds to act at exact moments, and the
//! checks every fault row makes (one QEMU runs the guest, the same guest, nothing left).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use katamaran_protos::v1 as pb;

use crate::agents::{self, CtlRun, Engine, Snapshot};
use crate::{artifacts, netns, Lab, LabConfig, Node, ProbeReport, RunningProbe, Skip};

/// The guest's address.
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
/// How long a test waits for a migration to reach a held fail point.
pub const HOLD_WAIT: Duration = Duration::from_secs(120);
/// How long one migration may take.
pub const MIGRATION_DEADLINE: Duration = Duration::from_secs(180);

/// Prints the skip line and returns `None` when a prerequisite is missing.
pub fn check<T>(r: Result<T, Skip>) -> Option<T> {
    r.map_err(|skip| skip.report()).ok()
}

/// The lab, its agents, the guest's sandbox id and the fail points' directory.
#[derive(Debug)]
pub struct FaultLab {
    /// Both agents.
    pub engine: Engine,
    /// The lab.
    pub lab: Lab,
    /// The guest's sandbox id.
    pub id: &'static str,
    holds: PathBuf,
    /// Whether the guest's disks are shared (else they are mirrored first).
    shared: bool,
    /// The probe (1000 pps UDP echo from the client through the router) started at boot.
    probe: Mutex<Option<RunningProbe>>,
    /// Set by a row whose source VM paused before the rollback (see [`FaultLab::paused_first`]).
    paused: AtomicBool,
}

impl FaultLab {
    /// A lab, a VM on node-a, both agents with `fail_a` / `fail_b` as their fail points.
    #[allow(clippy::missing_panics_doc)]
    pub fn boot(id: &'static str, fail_a: &str, fail_b: &str) -> Option<Self> {
        Self::boot_with_disks(id, "shared:1", fail_a, fail_b)
    }

    /// [`FaultLab::boot`] with the guest's disks (`shared:N`, `local:N`).
    #[allow(clippy::missing_panics_doc)]
    pub fn boot_with_disks(id: &'static str, disks: &str, fail_a: &str, fail_b: &str) -> Option<Self> {
        check(artifacts::require_vm_lab())?;
        check(artifacts::ensure_guest_image().expect("hack/guest/build.sh failed"))?;
        let (lab, _) = Lab::up(LabConfig::unique()).expect("lab up");
        lab.sandbox(Node::A, id, POD, None).expect("sandbox on node-a");
        lab.run(&["vm", "node-a", id, "--disks", disks, "--disk-size", "64M", "--timeout", "180"])
            .expect("the guest boots");
        let holds = lab.scratch_path("failpoints");
        std::fs::create_dir_all(&holds).expect("fail point dir");
        let engine = Engine::start_with(&lab, &fail_env(&holds, fail_a), &fail_env(&holds, fail_b))
            .expect("both agents serve");
        let probe = lab.spawn_probe(SocketAddr::new(POD.into(), 7), 1000).expect("probe");
        agents::wait_for_rx(&lab, "node-a", "eth0", 200, Duration::from_secs(40))
            .expect("the probe reaches the VM");
        Some(Self {
            engine,
            lab,
            id,
            holds,
            shared: !disks.starts_with("local"),
            probe: Mutex::new(Some(probe)),
            paused: AtomicBool::new(false),
        })
    }

    /// Stops the probe started at boot and returns its report (the soak runs its own per move).
    #[allow(clippy::missing_panics_doc)]
    pub fn stop_probe(&self) -> Option<ProbeReport> {
        let probe = self.probe.lock().expect("probe lock").take()?;
        Some(probe.stop(Duration::from_secs(10)).expect("the probe's report"))
    }

    /// Marks the row paused (see [`FaultLab::paused_first`]) when the source VM stopped before
    /// the rollback: the source reported its cutover (routes moved, the VM stopping) in `run`'s
    /// events, or its QEMU's last migration `completed` (QEMU stops the VM at its end by itself,
    /// e.g. while a panicked task's unwind had not cancelled it yet). A fault that races the
    /// migration may come before or after that stop.
    #[allow(clippy::missing_panics_doc)]
    pub fn paused_if_the_source_stopped(&self, run: &CtlRun) {
        let cut_over = run
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e["role"] == "ROLE_SOURCE" && e["phase"] == "PHASE_CUTOVER");
        let socket = self.lab.paths(Node::A, self.id).expect("paths").qmp;
        let status = self.engine.block_on(async {
            let (qmp, _events) =
                katamaran::qmp::QmpClient::connect(&socket, &Default::default()).await.ok()?;
            qmp.query_migrate().await.ok()?.status
        });
        let completed = status == Some(katamaran::qmp::MigrationStatus::Completed);
        eprintln!(
            "before the rollback: the source cut over: {cut_over}; its QEMU's migration ended {status:?}"
        );
        if cut_over || completed {
            self.paused_first();
        }
    }

    /// The migration settings of `node`'s QEMU: `query-migrate-parameters` and
    /// `query-migrate-capabilities`, read over its QMP socket; `None` while the socket is busy
    /// (an agent holds it during a migration and its unwind) or gone.
    pub fn migration_settings(&self, node: Node) -> Option<(serde_json::Value, serde_json::Value)> {
        let socket = self.lab.paths(node, self.id).ok()?.qmp;
        self.engine.block_on(async {
            let (qmp, _events) =
                katamaran::qmp::QmpClient::connect(&socket, &Default::default()).await.ok()?;
            let parameters = qmp.execute("query-migrate-parameters", None).await.ok()?;
            let capabilities = qmp.execute("query-migrate-capabilities", None).await.ok()?;
            Some((parameters, capabilities))
        })
    }

    /// Waits (up to 30 s) until `node`'s QEMU reads back `settings` ([`FaultLab::migration_settings`]):
    /// a rollback puts back what the migration set, at the end of the source's unwind.
    #[allow(clippy::missing_panics_doc)]
    pub fn assert_migration_settings(
        &self,
        node: Node,
        settings: &(serde_json::Value, serde_json::Value),
        what: &str,
    ) {
        let until = Instant::now() + Duration::from_secs(30);
        let mut now = self.migration_settings(node);
        while now.as_ref() != Some(settings) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            now = self.migration_settings(node);
        }
        assert_eq!(now.as_ref(), Some(settings), "{what}: the source QEMU's migration settings as they were");
    }

    /// Marks a row whose source VM paused (stopped, routes moved) before the rollback: the
    /// packets that reached the destination during that pause are lost with its copy, so the
    /// probe's loss is reported, not required to be 0.
    pub fn paused_first(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Forgets every hold marker (one an agent killed while held left behind).
    pub fn clear_holds(&self) {
        for entry in std::fs::read_dir(&self.holds).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }

    /// Restarts both agents with new fail points (they recover from their journals first).
    #[allow(clippy::missing_panics_doc)]
    pub fn restart_agents(&mut self, fail_a: &str, fail_b: &str) {
        self.clear_holds();
        // The old agents go first: the new ones take the same sockets and data port.
        for node in [Node::A, Node::B] {
            let _ = self.engine.agent_mut(node).stop(Duration::from_secs(5));
        }
        let engine =
            Engine::start_with(&self.lab, &fail_env(&self.holds, fail_a), &fail_env(&self.holds, fail_b));
        self.engine = engine.expect("both agents serve again");
    }

    #[allow(clippy::missing_panics_doc)]
    pub fn boot_id(&self) -> String {
        let body = netns::http_get(
            &self.lab.netns("client"),
            SocketAddr::new(POD.into(), 80),
            Duration::from_secs(10),
        )
        .expect("HTTP from the client");
        let page: serde_json::Value = serde_json::from_str(&body).expect("JSON page");
        page["boot_id"].as_str().expect("boot_id").to_owned()
    }

    #[allow(clippy::missing_panics_doc)]
    pub fn status(&self, node: Node) -> Option<String> {
        self.engine.inspect(node, self.id).ok().map(|s| s.qemu_status)
    }

    #[allow(clippy::missing_panics_doc)]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.lab, &[&format!("sb-node-a-{}", self.id)]).expect("snapshot")
    }

    /// Starts `katactl migrate` in the background (it returns when the migration ends).
    #[allow(clippy::missing_panics_doc)]
    pub fn migrate_in_background(&self, from: Node, extra: &[&str]) -> std::thread::JoinHandle<CtlRun> {
        let bin = self.engine.bins().katactl.clone();
        let to = agents::other(from);
        let (src, dst) = (self.engine.agent(from).endpoint(), self.engine.agent(to).endpoint());
        let mut args: Vec<String> =
            ["-r", &src, "-o", "json", "migrate", self.id, "--to", &dst].map(String::from).to_vec();
        if self.shared {
            args.push("--shared-storage".into());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        std::thread::spawn(move || {
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            agents::katactl(&bin, &argv, MIGRATION_DEADLINE).expect("katactl runs")
        })
    }

    /// Waits until the fail point `name` holds a migration.
    #[allow(clippy::missing_panics_doc)]
    pub fn wait_held(&self, name: &str) {
        let marker = self.holds.join(format!("{name}.held"));
        let started = Instant::now();
        while !marker.exists() {
            assert!(started.elapsed() < HOLD_WAIT, "the migration never reached fail point {name}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the fail point `name` holds a migration, or the migration `run` ended
    /// without reaching it (a soak's move that failed or completed early): whether it holds.
    #[allow(clippy::missing_panics_doc)]
    pub fn held_or_ended<T>(&self, name: &str, run: &std::thread::JoinHandle<T>) -> bool {
        let marker = self.holds.join(format!("{name}.held"));
        let started = Instant::now();
        loop {
            if marker.exists() {
                return true;
            }
            if run.is_finished() {
                return false;
            }
            assert!(started.elapsed() < HOLD_WAIT, "the migration never reached fail point {name}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[allow(clippy::missing_panics_doc)]
    pub fn release(&self, name: &str) {
        std::fs::write(self.holds.join(format!("{name}.go")), b"").expect("release");
    }

    #[allow(clippy::missing_panics_doc)]
    /// SIGKILLs node-b's incoming QEMU and waits for it to exit.
    #[allow(clippy::missing_panics_doc)]
    pub fn kill_incoming_qemu(&self) {
        let pid = agents::incoming_qemu_pid(&self.lab, Node::B, self.id).expect("the incoming QEMU runs");
        agents::signal(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the incoming QEMU");
        agents::wait_for_exit(pid, Duration::from_secs(10)).expect("it exits");
    }

    /// Waits (at most `limit`) until `node`'s QEMU reports the guest running.
    pub fn wait_running(&self, node: Node, limit: Duration) {
        let until = Instant::now() + limit;
        while self.status(node).as_deref() != Some("running") && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The id of the newest migration `node` lists.
    pub fn migration_id(&self, node: Node) -> String {
        let list = self.engine.list_migrations(node).expect("ListMigrations");
        list.iter()
            .max_by_key(|m| m.started_unix_nanos)
            .expect("a migration is registered")
            .migration_id
            .clone()
    }

    #[allow(clippy::missing_panics_doc)]
    pub fn cancel(&self, node: Node, id: &str) -> Result<pb::CancelResponse, String> {
        let mut req = pb::CancelRequest::new();
        req.migration_id = id.to_owned();
        req.reason = "cancelled by the fault test".into();
        self.engine
            .block_on(self.engine.client(node).cancel(katamaran::client::ctx(Duration::from_secs(10)), &req))
            .map_err(|e| katamaran::client::rpc_text(&e))
    }

    /// ReleaseForward on `node`.
    pub fn release_forward(&self, node: Node, id: &str) -> Result<(), String> {
        let mut req = pb::ReleaseForwardRequest::new();
        req.migration_id = id.to_owned();
        self.engine
            .block_on(
                self.engine
                    .client(node)
                    .release_forward(katamaran::client::ctx(Duration::from_secs(20)), &req),
            )
            .map(drop)
            .map_err(|e| katamaran::client::rpc_text(&e))
    }

    /// RemoveIncoming of the guest's sandbox on `node`.
    pub fn remove_incoming(&self, node: Node) -> Result<String, String> {
        let mut req = pb::RemoveIncomingRequest::new();
        req.sandbox_id = self.id.to_owned();
        self.engine
            .block_on(
                self.engine
                    .client(node)
                    .remove_incoming(katamaran::client::ctx(Duration::from_secs(30)), &req),
            )
            .map(|r| r.message)
            .map_err(|e| katamaran::client::rpc_text(&e))
    }

    /// `node`'s IPv4 routes to the guest's address, one per line (empty: none).
    #[allow(clippy::missing_panics_doc)]
    pub fn pod_routes(&self, host: &str) -> String {
        let out =
            self.lab.exec(host, &["ip", "-4", "route", "show", &format!("{POD}/32")]).expect("ip route");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits (at most `limit`) until `node` lists migration `id` in `phase`; the phase it has.
    #[allow(clippy::missing_panics_doc)]
    pub fn wait_phase(&self, node: Node, id: &str, phase: pb::Phase, limit: Duration) -> pb::MigrationStatus {
        let until = Instant::now() + limit;
        loop {
            let list = self.engine.list_migrations(node).expect("ListMigrations");
            let m = list.into_iter().find(|m| m.migration_id == id).expect("the migration is listed");
            if m.phase.enum_value_or_default() == phase || Instant::now() > until {
                return m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// After a rollback: the source VM runs the same guest and the destination kept nothing.
    #[allow(clippy::missing_panics_doc)]
    pub fn assert_rolled_back(&self, before: &Snapshot, boot_id: &str, what: &str) {
        let until = Instant::now() + Duration::from_secs(30);
        while self.status(Node::A).as_deref() != Some("running") && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.status(Node::A).as_deref(), Some("running"), "{what}: the source VM runs again");
        assert_ne!(self.status(Node::B).as_deref(), Some("running"), "{what}: and only there");
        assert_eq!(self.boot_id(), boot_id, "{what}: the same guest answers, not a rebooted one");
        let pidfile = agents::incoming_dir(&self.lab, Node::B, self.id).join("pid");
        let (diff, settled) = agents::wait_unchanged(
            &self.lab,
            before,
            &[&format!("sb-node-a-{}", self.id)],
            Duration::from_secs(30),
        )
        .expect("snapshot");
        eprintln!("measured [{what}]: both nodes back to their snapshot {settled:?} after the end");
        assert!(diff.is_empty(), "{what}: nothing left behind:\n{}", diff.join("\n"));
        assert!(!pidfile.exists(), "{what}: no incoming sandbox left on node-b");
        if let Some(r) = self.stop_probe() {
            let paused = self.paused.load(Ordering::SeqCst);
            eprintln!(
                "measured [{what}]: probe lost {} duplicated {} of {} (source paused first: {paused})",
                r.lost, r.duplicated, r.sent
            );
            assert_eq!(r.duplicated, 0, "{what}: no packet delivered twice");
            if !paused {
                assert_eq!(
                    r.lost, 0,
                    "{what}: the source kept the VM running throughout: no packet lost ({:?})",
                    r.loss_timeline
                );
            }
        }
        if !self.shared {
            self.assert_source_disk_log(what);
        }
    }

    /// With local disks: stops the source VM and checks the guest's disk log on each of its
    /// images — contiguous from the first record, no torn or repeated record: the rollback
    /// lost no write and the writer went on.
    #[allow(clippy::missing_panics_doc)]
    pub fn assert_source_disk_log(&self, what: &str) {
        let tool = artifacts::guest_tool().expect("the guest tool (disk-check) builds");
        let images = self.lab.paths(Node::A, self.id).expect("paths").disks;
        assert!(!images.is_empty(), "{what}: the source has local disks");
        let pid = self.engine.inspect(Node::A, self.id).expect("Inspect on node-a").qemu_pid;
        agents::signal(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the source QEMU");
        agents::wait_for_exit(pid, Duration::from_secs(15)).expect("the source QEMU exits");
        for image in &images {
            let log = crate::reports::disk_check(&tool, image).expect("disk-check");
            eprintln!("measured [{what}]: {} disk log {log:?}", image.display());
            assert!(
                log.ok && log.first_seq == Some(0) && log.records > 0,
                "{what}: the source's disk log is intact: {log:?}"
            );
        }
    }

    #[allow(clippy::missing_panics_doc)]
    pub fn finish(self) {
        if let Some(r) = self.stop_probe() {
            eprintln!(
                "measured: probe lost {} duplicated {} of {} over the whole row",
                r.lost, r.duplicated, r.sent
            );
        }
        let Self { engine, mut lab, .. } = self;
        drop(engine);
        lab.down().expect("lab down");
    }
}

/// The link between the nodes cut until dropped: a blackhole route to the other node on each
/// node (the kernel here has no tc drop action), removed again by `Drop`.
#[derive(Debug)]
pub struct LinkCut<'a> {
    lab: &'a Lab,
}

impl<'a> LinkCut<'a> {
    /// Cuts the link.
    #[allow(clippy::missing_panics_doc)]
    pub fn cut(lab: &'a Lab) -> Self {
        for (node, peer) in [("node-a", "10.201.0.12/32"), ("node-b", "10.201.0.11/32")] {
            lab.exec(node, &["ip", "route", "add", "blackhole", peer]).expect("blackhole route");
        }
        Self { lab }
    }
}

impl Drop for LinkCut<'_> {
    fn drop(&mut self) {
        for (node, peer) in [("node-a", "10.201.0.12/32"), ("node-b", "10.201.0.11/32")] {
            let _ = self.lab.exec(node, &["ip", "route", "del", "blackhole", peer]);
        }
    }
}

fn fail_env(holds: &std::path::Path, spec: &str) -> Vec<(&'static str, String)> {
    vec![("KATAMARAN_FAILPOINTS", spec.to_owned()), ("KATAMARAN_FAILPOINT_DIR", holds.display().to_string())]
}

/// The summary line `katactl -o json` printed last.
pub fn summary(run: &CtlRun) -> serde_json::Value {
    let last = run.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or(serde_json::Value::Null)
}
