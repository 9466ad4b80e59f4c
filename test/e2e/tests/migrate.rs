//! The migration engine in the two-node lab: real QEMU (TCG) guests in Kata-shaped sandboxes
//! moved from node-a to node-b by the node agents (`katamaran-agent node`), driven through
//! `katamaran::cluster::orchestrate` (or `katactl`), while the probe sends 1000 UDP datagrams per second
//! at the guest.
//!
//! Each test brings its own lab up and down, its agents are killed by a guard, and it asserts
//! what a user checks: nothing lost, the same VM (boot id) answering on node-b, the disk logs
//! intact, and after a cancel or a failure the source VM running with nothing left behind on
//! either node. This kernel has no sch_plug, ipip or gre: the engine forwards with a plain route
//! and buffers in the destination tap's queue (its warnings are in the agent logs).
//!
//! Needs root, QEMU and the guest image; without them each test prints `skipped: <why>`.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use katamaran::cluster::orchestrate::{Report, Side};
use katamaran::migration::{MigrationOptions, StorageMode};
use katamaran_e2e::agents::{self, CutoverNumbers, Engine, Migration, Snapshot, Trigger};
use katamaran_e2e::capture::{Capture, Streams};
use katamaran_e2e::flood::Flood;
use katamaran_e2e::{artifacts, netns, reports, Lab, LabConfig, Node, ProbeReport, RunningProbe, Skip};
use katamaran_protos::v1 as pb;
use katamaran_test_skip::{skip, Tier};
use nix::sys::signal::Signal;

const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10);
/// The probe's rate: the loss a slow reaction causes shows up at this rate.
const RATE: u32 = 1000;
/// A migration of a 128 MiB guest takes about a second; slow ones (4 MiB/s) are cancelled.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(120);
/// Packets to see flowing before and after a move: half a second and a second of probe.
const BEFORE: u64 = 500;
const AFTER: u64 = 1000;
const TRAFFIC_WAIT: Duration = Duration::from_secs(40);

/// Prints the skip line and returns `None` when a prerequisite is missing.
fn check<T>(r: Result<T, Skip>) -> Option<T> {
    r.map_err(|skip| skip.report()).ok()
}

/// A lab with one VM on node-a and both agents. The engine is dropped first (agents stopped,
/// their logs printed on failure), then the lab is torn down.
struct World {
    engine: Engine,
    lab: Lab,
    id: &'static str,
    findings: Findings,
}

/// Failed claims that do not stop a test: every claim is checked in each run, and
/// [`World::finish`] fails the test listing them all (or, when a hard assertion fails first,
/// they are printed as the test unwinds).
#[derive(Default)]
struct Findings(RefCell<Vec<String>>);

impl Drop for Findings {
    fn drop(&mut self) {
        let found = self.0.get_mut();
        if std::thread::panicking() && !found.is_empty() {
            eprintln!("claims that had failed before:\n- {}", found.join("\n- "));
        }
    }
}

impl World {
    /// Root, QEMU, the guest image; a lab; sandbox `id` on node-a (dual-stack when `ip6`); its
    /// VM with `disks` (`none`, `shared:N`, `local:N`) of `disk_size`; both agents.
    fn boot(id: &'static str, disks: &str, disk_size: &str, ip6: bool) -> Option<Self> {
        check(artifacts::require_vm_lab())?;
        check(artifacts::ensure_guest_image().expect("hack/guest/build.sh failed"))?;
        let (lab, _) = Lab::up(LabConfig::unique()).expect("lab up");
        lab.probe_path().expect("the probe builds");
        lab.sandbox(Node::A, id, POD_V4, ip6.then_some(POD_V6)).expect("sandbox on node-a");
        let out = lab
            .run(&["vm", "node-a", id, "--disks", disks, "--disk-size", disk_size, "--timeout", "180"])
            .expect("the guest boots to KATAMARAN-GUEST-READY");
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
        let engine = Engine::start(&lab).expect("both node agents serve their sockets");
        Some(Self { engine, lab, id, findings: Findings::default() })
    }

    /// [`World::boot`] without IPv6, with a guest that fills [`MARKED_MIB`] MiB of its memory
    /// with [`RAM_MARKER`] (`katamaran-guest dirty-mem --fill`, started from the kernel command
    /// line through `test/bench/qemu-append.sh` as the benchmark starts its workload) and
    /// returns once the guest says the memory is filled.
    ///
    /// With `hold`, node-a's agent holds every migration at that fail point until
    /// [`World::release`] (the lab builds the agents with fail points).
    fn boot_marked(id: &'static str, disks: &str, disk_size: &str, hold: Option<&str>) -> Option<Self> {
        check(artifacts::require_vm_lab())?;
        check(artifacts::ensure_guest_image().expect("hack/guest/build.sh failed"))?;
        let (lab, _) = Lab::up(LabConfig::unique()).expect("lab up");
        lab.probe_path().expect("the probe builds");
        let paths = lab.sandbox(Node::A, id, POD_V4, None).expect("sandbox on node-a");
        let append = format!(
            "rdinit=/bin/sh -- -c \"mount -t devtmpfs devtmpfs /dev; \
             (while [ ! -e /run/katamaran/ready/http ]; do sleep 1; done; \
             exec /bin/katamaran-guest dirty-mem --mb {MARKED_MIB} --rate-mb-per-s 1 --fill {RAM_MARKER} \
             >/dev/console 2>&1)& exec /init\""
        );
        let out = lab
            .command()
            .args(["vm", "node-a", id, "--disks", disks, "--disk-size", disk_size, "--timeout", "180"])
            .env("KMR_QEMU", artifacts::workspace_root().join("test/bench/qemu-append.sh"))
            .env("KMR_BENCH_APPEND", &append)
            .output()
            .expect("lab.sh vm runs");
        assert!(out.status.success(), "lab.sh vm (marked guest): {}", String::from_utf8_lossy(&out.stderr));
        let filled = katamaran_guest::dirty::FILLED_LINE;
        let until = std::time::Instant::now() + Duration::from_secs(90);
        while !std::fs::read_to_string(&paths.console).unwrap_or_default().contains(filled) {
            assert!(
                std::time::Instant::now() < until,
                "the guest did not print {filled:?}; console:\n{}",
                std::fs::read_to_string(&paths.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let holds = lab.root().join(".lab/failpoints");
        std::fs::create_dir_all(&holds).expect("the fail point directory");
        let env_a: Vec<(&str, String)> = hold
            .map(|point| {
                vec![
                    ("KATAMARAN_FAILPOINTS", format!("{point}=hold")),
                    ("KATAMARAN_FAILPOINT_DIR", holds.display().to_string()),
                ]
            })
            .unwrap_or_default();
        let engine = Engine::start_with(&lab, &env_a, &[]).expect("both node agents serve their sockets");
        Some(Self { engine, lab, id, findings: Findings::default() })
    }

    /// Waits until node-a's agent holds the migration at fail point `point` (see
    /// [`World::boot_marked`]).
    fn wait_held(&self, point: &str) {
        let held = self.lab.root().join(format!(".lab/failpoints/{point}.held"));
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !held.exists() {
            assert!(std::time::Instant::now() < until, "the migration never reached fail point {point}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets a migration held at `point` go on.
    fn release(&self, point: &str) {
        std::fs::write(self.lab.root().join(format!(".lab/failpoints/{point}.go")), b"").expect("release");
    }

    /// Starts capturing what node-a sends node-b over TCP (the data streams).
    fn capture(&self) -> Capture {
        Capture::start(&self.lab.netns("node-a"), Node::A.addr_v4(), Node::B.addr_v4())
            .expect("packet capture in node-a")
    }

    /// The source sandbox's namespace (lab name without the prefix).
    fn source_ns(&self) -> String {
        format!("sb-node-a-{}", self.id)
    }

    fn page(&self, addr: IpAddr) -> serde_json::Value {
        let body =
            netns::http_get(&self.lab.netns("client"), SocketAddr::new(addr, 80), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("HTTP GET http://{addr}/ from the client: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("the page is not JSON ({e}): {body}"))
    }

    /// Starts the probe at `addr` and waits until its packets reach the source sandbox.
    fn probe(&self, addr: IpAddr) -> RunningProbe {
        let probe = self.lab.spawn_probe(SocketAddr::new(addr, 7), RATE).expect("probe starts");
        agents::wait_for_rx(&self.lab, &self.source_ns(), "eth0", BEFORE, TRAFFIC_WAIT)
            .expect("the probe's packets reach the VM on node-a");
        probe
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.lab, &[&self.source_ns()]).expect("snapshot of both nodes")
    }

    fn run_state(&self, node: Node) -> String {
        self.engine.inspect(node, self.id).expect("Inspect").qemu_status
    }

    /// Records a failed claim when `ok` is false.
    fn claim(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.findings.0.borrow_mut().push(what());
        }
    }

    /// Claims the probe lost and duplicated nothing; the message carries what explains a loss.
    fn expect_no_loss(&self, r: &ProbeReport, min_sent: u64, context: &str) {
        self.claim(r.sent >= min_sent, || {
            format!("the probe sent only {} (wanted ≥ {min_sent}): {r:?}", r.sent)
        });
        self.claim(r.lost == 0 && r.duplicated == 0, || {
            format!(
                "{context}: lost {} duplicated {} of {}; lost runs {:?} (ms after the probe's start)",
                r.lost, r.duplicated, r.sent, r.loss_timeline
            )
        });
    }

    /// Claims the marked guest's memory came over whole: its `dirty-mem` keeps checking that
    /// every page of its working set holds the last write (hack/guest/README.md, "Memory
    /// check"), and the destination's console, which holds only what the guest printed after
    /// the move, shows that check running and no stale page.
    fn expect_memory_intact(&self) {
        let console = agents::incoming_dir(&self.lab, Node::B, self.id).join("console.log");
        let until = std::time::Instant::now() + Duration::from_secs(15);
        let text = loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if reports::memory_check_ran(&text) || std::time::Instant::now() > until {
                break text;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let stale = reports::guest_health(&text, true).stale_pages;
        self.claim(reports::memory_check_ran(&text) && stale == Some(0), || {
            format!(
                "the moved guest's memory check runs on node-b and finds no stale page; its console:\n{text}"
            )
        });
    }

    /// Fails the test if a claim failed, then stops the agents, tears the lab down and checks
    /// that nothing of it remains.
    fn finish(self) {
        let findings = self.findings.0.take();
        assert!(findings.is_empty(), "{} claim(s) failed:\n- {}", findings.len(), findings.join("\n- "));
        let Self { engine, mut lab, .. } = self;
        drop(engine);
        lab.down().expect("lab down");
        assert_eq!(lab.leftovers(), Vec::<String>::new(), "down leaves nothing behind");
    }
}

/// What the marked guest fills its memory with: guest RAM an observer on the wire recognises.
const RAM_MARKER: &str = "KMR-GUEST-RAM-MARKER-5e1f7a";
/// How much of it.
const MARKED_MIB: u32 = 16;
/// Every disk record of the guest's writers starts with it (hack/guest/README.md).
const DISK_MARKER: &[u8] = b"KTMRDSK1";
/// node-b's data listener (the agents' default `--data-port`).
const DATA_PORT: u16 = 10556;
/// Idle connections opened to it during the move.
const FLOOD: usize = 10_000;

/// How many times each marker crossed the wire, and how much did.
fn wire(seen: &Streams) -> String {
    format!(
        "{} MiB over {} connections ({} frames): RAM marker ×{}, disk marker ×{}",
        seen.bytes() >> 20,
        seen.connections.len(),
        seen.frames,
        seen.count(RAM_MARKER.as_bytes()),
        seen.count(DISK_MARKER)
    )
}

fn options(storage: StorageMode) -> MigrationOptions {
    MigrationOptions { storage, ..MigrationOptions::default() }
}

/// The phase a side ended in (UNSPECIFIED when it never reported an end).
fn end(s: &Report, side: Side) -> pb::Phase {
    s.terminal(side).map_or(pb::Phase::PHASE_UNSPECIFIED, agents::phase)
}

fn end_message(s: &Report, side: Side) -> String {
    s.terminal(side)
        .map(|e| {
            if e.result.error_message.is_empty() {
                e.message.clone()
            } else {
                e.result.error_message.clone()
            }
        })
        .unwrap_or_default()
}

/// Says which claims this run leaves out: without `sch_plug` the destination's "plug release" is
/// the instant the engine handled RESUME (no plug existed), a number that cannot be wrong.
fn no_plug_note() {
    skip(
        Tier::KernelModule,
        "kernel lacks sch_plug: RESUME→plug release not claimed (no plug existed; the kernel lab VM measures it)",
    );
}

/// The longest pause a live migration of the lab's 128 MiB guest may impose (STOP on the source
/// to RESUME on the destination); QEMU plans for 25 ms, TCG on a busy machine adds some.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// A successful migration's numbers. Claims the reaction latencies are measured (STOP→route
/// swap or the swap's lead before STOP, RESUME→plug release) and the VM paused only briefly.
fn cutover(w: &World, m: &Migration) -> CutoverNumbers {
    let s = &m.summary;
    assert!(s.succeeded(), "the migration succeeds: {:?}\n{}", s.failure(), agents::timeline(s));
    let n = CutoverNumbers::of(s).unwrap_or_else(|e| panic!("{e}\n{}", agents::timeline(s)));
    w.claim(n.route_swap.offset() > Duration::ZERO, || format!("the route swap is timed against STOP: {n}"));
    if artifacts::kernel_has_plug() {
        w.claim(n.resume_to_plug_release > Duration::ZERO, || {
            format!("RESUME→plug release is measured: {n}")
        });
    } else {
        no_plug_note();
    }
    w.claim(n.stop_to_resume > Duration::ZERO && n.stop_to_resume <= MAX_PAUSE, || {
        format!("a live migration pauses the VM for at most {MAX_PAUSE:?}: {n}\n{}", agents::timeline(s))
    });
    n
}

/// The event at which a trigger fired, or a failure that shows why it never did.
fn fired<'m>(m: &'m Migration, what: &str) -> &'m pb::MigrationEvent {
    match &m.triggered_at {
        Some((_, ev)) => ev,
        None => panic!(
            "the migration never reached the point to act ({what}); it ended {:?} after {:?}:\n{}",
            m.summary.failure(),
            m.summary.elapsed,
            agents::timeline(&m.summary)
        ),
    }
}

/// What a user checks after a move: the guest answers on node-b (UDP echo, HTTP), it is the
/// same VM (boot id), the source QEMU is paused in `postmigrate`.
fn assert_moved(w: &World, boot_id: &str) {
    let router = w.lab.exec("router", &["ip", "route", "show", &POD_V4.to_string()]).expect("router route");
    let router = String::from_utf8_lossy(&router.stdout).into_owned();
    assert!(
        router.contains("via 10.201.0.11"),
        "the router has not converged yet; node-a forwards: {router}"
    );
    let after = w.lab.probe(SocketAddr::new(POD_V4.into(), 7), RATE, Duration::from_secs(1)).expect("probe");
    w.expect_no_loss(&after, 900, "UDP echo from the moved VM");
    let page = w.page(POD_V4.into());
    assert_eq!(page["instance"], w.id, "the page names the sandbox: {page}");
    assert_eq!(page["hostname"], w.id, "{page}");
    assert_eq!(page["boot_id"], boot_id, "the same VM answers, not a rebooted one: {page}");
    assert_eq!(w.run_state(Node::A), "postmigrate", "the source QEMU stays paused after the move");
}

#[test]
fn lab_migrate_shared_storage_under_probe_loses_nothing_and_node_b_lists_the_vm() {
    let Some(w) = World::boot("web0", "shared:1", "64M", false) else { return };
    let boot_id = w.page(POD_V4.into())["boot_id"].as_str().expect("boot_id").to_owned();
    let probe = w.probe(POD_V4.into());

    let m = w
        .engine
        .migrate(Node::A, w.id, options(StorageMode::Shared), None, MIGRATION_DEADLINE)
        .expect("the migration runs");
    let n = cutover(&w, &m);
    agents::wait_for_rx(&w.lab, "node-b", "eth0", AFTER, TRAFFIC_WAIT).expect("traffic reaches node-b");
    let r = probe.stop(Duration::from_secs(10)).expect("probe report");
    eprintln!(
        "measured [shared]: {n}; probe sent {} lost {} dup {} longest gap {:.1} ms",
        r.sent, r.lost, r.duplicated, r.longest_gap_ms
    );
    w.expect_no_loss(&r, 1500, &format!("cutover: {n}"));
    assert_moved(&w, &boot_id);

    // The destination knows the VM it received.
    let pid = agents::incoming_qemu_pid(&w.lab, Node::B, w.id).expect("the incoming QEMU runs");
    let listed = w.engine.list_sandboxes(Node::B).expect("ListSandboxes on node-b");
    let vm = listed.iter().find(|s| s.id == w.id);
    w.claim(vm.is_some_and(|s| s.qemu_status == "running" && s.qemu_pid == pid), || {
        let ids: Vec<(&str, &str)> = listed.iter().map(|s| (s.id.as_str(), s.qemu_status.as_str())).collect();
        format!(
            "node-b lists {} as running with QEMU pid {pid}; it lists {ids:?}, and Inspect says {:?}",
            w.id,
            w.engine.inspect(Node::B, w.id).map(|s| s.qemu_status).map_err(|e| e.to_string())
        )
    });
    assert_metrics_after_one_move(&w);
    w.finish();
}

/// Both agents' HTTP endpoints after one completed move: healthy, ready, and metrics that count
/// it once on each side with its phases, pause and bytes.
fn assert_metrics_after_one_move(w: &World) {
    use agents::{agent_http, metric};
    for node in [Node::A, Node::B] {
        assert_eq!(agent_http(&w.lab, node, "/healthz").expect("/healthz").trim(), "ok");
        assert_eq!(agent_http(&w.lab, node, "/readyz").expect("/readyz").trim(), "ok");
        let missing = agent_http(&w.lab, node, "/nothing-here");
        assert!(matches!(&missing, Err(e) if e.to_string().contains("404")), "{missing:?}");
    }
    let a = agent_http(&w.lab, Node::A, "/metrics").expect("node-a /metrics");
    let b = agent_http(&w.lab, Node::B, "/metrics").expect("node-b /metrics");
    let get =
        |text: &str, series: &str| metric(text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(get(&a, r#"katamaran_migrations_total{role="source",result="completed"}"#), 1.0);
    assert_eq!(get(&a, r#"katamaran_migrations_total{role="source",result="failed"}"#), 0.0);
    assert_eq!(get(&b, r#"katamaran_migrations_total{role="destination",result="completed"}"#), 1.0);
    assert_eq!(get(&a, "katamaran_qemu_downtime_seconds_count"), 1.0);
    assert_eq!(get(&a, "katamaran_guest_pause_seconds_count"), 1.0);
    assert_eq!(get(&a, r#"katamaran_migration_phase_seconds_count{role="source",phase="ram"}"#), 1.0);
    assert_eq!(
        get(&b, r#"katamaran_migration_phase_seconds_count{role="destination",phase="preparing"}"#),
        1.0
    );
    assert!(get(&a, r#"katamaran_migrated_bytes_total{stream="ram"}"#) > 1e6, "the RAM crossed");
    assert_eq!(get(&a, "katamaran_forwards_active"), 1.0, "node-a forwards");
    assert_eq!(get(&b, "katamaran_incoming_sandboxes"), 1.0, "node-b runs the VM it received");
    assert_eq!(get(&a, "katamaran_migrations_running") + get(&b, "katamaran_migrations_running"), 0.0);
    eprintln!(
        "measured [metrics]: QEMU downtime {:.1} ms, guest pause (to `resumed` on the source) {:.1} ms, RAM {:.1} MiB",
        get(&a, "katamaran_qemu_downtime_seconds_sum") * 1e3,
        get(&a, "katamaran_guest_pause_seconds_sum") * 1e3,
        get(&a, r#"katamaran_migrated_bytes_total{stream="ram"}"#) / 1048576.0
    );
}

/// Two local disks over plain streams (`--plain-streams`): every write arrives, and an observer
/// on the node network reads the guest's memory and disk records, which is what the TLS test
/// checks cannot be read by default.
#[test]
fn lab_migrate_local_storage_two_disks_keeps_every_write() {
    let Some(w) = World::boot_marked("disk0", "local:2", "64M", None) else { return };
    let tool = artifacts::guest_tool().expect("the guest tool (disk-check) builds");
    let source_images = w.lab.paths(Node::A, w.id).expect("paths").disks;
    assert_eq!(source_images.len(), 2, "{source_images:?}");
    let boot_id = w.page(POD_V4.into())["boot_id"].as_str().expect("boot_id").to_owned();
    let probe = w.probe(POD_V4.into());

    let capture = w.capture();
    let plain = MigrationOptions { plain_streams: true, ..options(StorageMode::Local) };
    let m = w.engine.migrate(Node::A, w.id, plain, None, MIGRATION_DEADLINE).expect("the migration runs");
    let seen = capture.stop().expect("the capture");
    let n = cutover(&w, &m);
    assert!(
        n.phases.iter().any(|(p, _)| *p == pb::Phase::PHASE_STORAGE),
        "local disks are mirrored first: {n}"
    );
    agents::wait_for_rx(&w.lab, "node-b", "eth0", AFTER, TRAFFIC_WAIT).expect("traffic reaches node-b");
    let r = probe.stop(Duration::from_secs(10)).expect("probe report");
    eprintln!(
        "measured [local:2, plain streams]: {n}; probe sent {} lost {} dup {} longest gap {:.1} ms; wire: {}",
        r.sent,
        r.lost,
        r.duplicated,
        r.longest_gap_ms,
        wire(&seen)
    );
    w.claim(seen.count(RAM_MARKER.as_bytes()) > 0 && seen.count(DISK_MARKER) > 0, || {
        format!("plain streams carry the guest's memory and disk records readable: {}", wire(&seen))
    });
    w.expect_no_loss(&r, 1500, &format!("cutover: {n}"));
    assert_moved(&w, &boot_id);
    w.expect_memory_intact();

    // Stop the destination VM (its writers with it), then read both sides' logs on the host. Its
    // pid comes from node-b's Inspect; the engine's pidfile is the fallback while that fails.
    let pidfile = agents::incoming_qemu_pid(&w.lab, Node::B, w.id).expect("the incoming QEMU runs");
    let inspected = w.engine.inspect(Node::B, w.id).map(|s| s.qemu_pid).map_err(|e| e.to_string());
    w.claim(matches!(inspected, Ok(p) if p == pidfile), || {
        format!("Inspect on node-b names the incoming QEMU (pid {pidfile}): {inspected:?}")
    });
    let pid = inspected.ok().filter(|p| *p != 0).unwrap_or(pidfile);
    agents::signal(pid, Signal::SIGTERM).expect("SIGTERM the destination QEMU");
    agents::wait_for_exit(pid, Duration::from_secs(15)).expect("the destination QEMU exits");
    let disks_dir = agents::incoming_disks_dir(&w.lab, Node::B, w.id);
    let mut dest_images: Vec<PathBuf> = std::fs::read_dir(&disks_dir)
        .expect("the destination's disks directory")
        .map(|e| e.expect("entry").path())
        .collect();
    dest_images.sort();
    assert_eq!(dest_images.len(), 2, "one destination image per source disk: {dest_images:?}");
    for (i, (src, dst)) in source_images.iter().zip(&dest_images).enumerate() {
        assert!(dst.ends_with(format!("drive-{i}.img")), "drive-{i} ↔ {dst:?}");
        let log = reports::disk_check(&tool, dst).expect("disk-check");
        assert!(log.ok && log.first_seq == Some(0), "disk {i}: the moved log is contiguous from 0: {log:?}");
        let cmp = agents::disk_compare(&tool, src, dst).expect("disk-compare");
        eprintln!(
            "measured [local:2]: disk {i}: {} records on node-a, {} on node-b",
            cmp.prefix_records, cmp.full_records
        );
        assert!(cmp.ok, "disk {i}: the source log is a byte-identical prefix of the destination's: {cmp:?}");
        assert!(cmp.prefix_records > 0, "disk {i}: the writer ran on node-a: {cmp:?}");
        assert!(cmp.full_records > cmp.prefix_records, "disk {i}: the writer went on on node-b: {cmp:?}");
    }
    w.finish();
}

/// The default, TLS streams: an observer on the node network reads nothing of the guest's
/// memory or disks, and 10 000 idle connections opened to node-b's data listener while the VM
/// moves change nothing (the listener drops what passes its handshake caps).
#[test]
fn lab_migrate_over_tls_shows_the_wire_nothing_and_a_connection_flood_changes_nothing() {
    let Some(w) = World::boot_marked("tls0", "local:1", "64M", Some("source-storage")) else { return };
    let w = Rc::new(w);
    let boot_id = w.page(POD_V4.into())["boot_id"].as_str().expect("boot_id").to_owned();
    let probe = w.probe(POD_V4.into());
    let capture = w.capture();
    // node-b's data listener opens with the first PrepareIncoming. node-a holds the move once
    // its mirror runs (`source-storage`); the flood opens all its connections then, and the
    // move goes on (the RAM stream connects, the VM cuts over) with all of them held open.
    let flood: Rc<RefCell<Option<Flood>>> = Rc::default();
    let start_flood = {
        let (flood, world) = (flood.clone(), w.clone());
        move || {
            world.wait_held("source-storage");
            let target = SocketAddr::new(Node::B.addr_v4().into(), DATA_PORT);
            let f = Flood::start(&world.lab.netns("client"), target, FLOOD);
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !f.done_opening() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            *flood.borrow_mut() = Some(f);
            world.release("source-storage");
        }
    };
    let m = w
        .engine
        .migrate(
            Node::A,
            w.id,
            options(StorageMode::Local),
            Some(Trigger::run_when(|_, _| true, start_flood)),
            MIGRATION_DEADLINE,
        )
        .expect("the migration runs");
    let flood = flood.take().expect("the flood started with the move");
    let during = flood.opened();
    let seen = capture.stop().expect("the capture");
    let n = cutover(&w, &m);
    agents::wait_for_rx(&w.lab, "node-b", "eth0", AFTER, TRAFFIC_WAIT).expect("traffic reaches node-b");
    let r = probe.stop(Duration::from_secs(10)).expect("probe report");
    let flooded = flood.stop(Duration::from_secs(30)).expect("the flood");
    let metrics = agents::agent_http(&w.lab, Node::B, "/metrics").expect("node-b's metrics");
    let dropped = agents::metric(&metrics, "katamaran_data_listener_dropped_total").unwrap_or(0.0);
    eprintln!(
        "measured [local:1, TLS, flood]: {n}; probe sent {} lost {} dup {} longest gap {:.1} ms; wire: {}; \
         flood {flooded:?} ({during} open when the move ended), node-b dropped {dropped}",
        r.sent,
        r.lost,
        r.duplicated,
        r.longest_gap_ms,
        wire(&seen)
    );
    w.expect_no_loss(&r, 1500, &format!("cutover: {n}"));
    assert_moved(&w, &boot_id);
    w.expect_memory_intact();
    w.claim(seen.bytes() > 64 << 20, || {
        format!("the capture saw the streams (the guest's RAM at least): {}", wire(&seen))
    });
    w.claim(seen.count(RAM_MARKER.as_bytes()) == 0 && seen.count(DISK_MARKER) == 0, || {
        format!("nothing of the guest is readable on the wire: {}", wire(&seen))
    });
    w.claim(flooded.attempted == FLOOD && during * 10 >= FLOOD * 9, || {
        format!(
            "the flood held most of its {FLOOD} connections open while the VM moved ({during}): {flooded:?}"
        )
    });
    // Per peer, 80 handshakes may wait (docs/SECURITY.md) and each slot frees after the 10 s
    // handshake deadline; every other idle connection is dropped.
    let waiting = 80 * (1 + flooded.opening.as_secs() as usize / 10);
    w.claim(dropped >= flooded.opened.saturating_sub(waiting) as f64, || {
        format!(
            "node-b dropped {dropped} of the flood's {} connections (≤ {waiting} may wait)",
            flooded.opened
        )
    });
    Rc::try_unwrap(w).ok().expect("the trigger, the world's other holder, is gone").finish();
}

#[test]
fn lab_migrate_router_converging_later_loses_nothing_and_the_vm_outlives_the_agents() {
    let Some(mut w) = World::boot("conv0", "none", "64M", false) else { return };
    let probe = w.probe(POD_V4.into());
    let m = w
        .engine
        .migrate(Node::A, w.id, options(StorageMode::Shared), None, MIGRATION_DEADLINE)
        .expect("the migration runs");
    let n = cutover(&w, &m);
    agents::wait_for_rx(&w.lab, "node-b", "eth0", AFTER, TRAFFIC_WAIT).expect("node-a forwards to node-b");

    // The cluster network learns the move late: the router now sends straight to node-b. (What
    // `lab.sh converge` does; the script only knows sandboxes it created itself, and node-b's is
    // the engine's.)
    w.lab
        .exec(
            "router",
            &["ip", "route", "replace", &format!("{POD_V4}/32"), "via", "10.201.0.12", "proto", "static"],
        )
        .expect("converge");
    let router = w.lab.exec("router", &["ip", "route", "show", &POD_V4.to_string()]).expect("route");
    assert!(String::from_utf8_lossy(&router.stdout).contains("via 10.201.0.12"));
    let via_a = agents::rx_packets(&w.lab, "node-a", "eth0").expect("node-a counter");
    agents::wait_for_rx(&w.lab, "node-b", "eth0", AFTER, TRAFFIC_WAIT).expect("traffic reaches node-b");
    let bypassed = agents::rx_packets(&w.lab, "node-a", "eth0").expect("node-a counter") - via_a;
    let r = probe.stop(Duration::from_secs(10)).expect("probe report");
    eprintln!(
        "measured [converge]: {n}; probe sent {} lost {} dup {} longest gap {:.1} ms",
        r.sent, r.lost, r.duplicated, r.longest_gap_ms
    );
    w.expect_no_loss(&r, 2000, &format!("cutover: {n}"));
    assert!(bypassed < AFTER / 10, "after converging, node-a sees almost none of the traffic: {bypassed}");

    // A DaemonSet rollout stops the agents: they must exit on SIGTERM, and the VM they moved
    // must keep running without them.
    let grace = Duration::from_secs(5);
    let stopped_b = w.engine.agent_mut(Node::B).stop(grace).expect("stop node-b's agent");
    let stopped_a = w.engine.agent_mut(Node::A).stop(grace).expect("stop node-a's agent");
    let alone = w.lab.probe(SocketAddr::new(POD_V4.into(), 7), RATE, Duration::from_secs(1)).expect("probe");
    w.expect_no_loss(&alone, 900, "the moved VM without agents");
    w.claim(stopped_a.is_some() && stopped_b.is_some(), || {
        format!(
            "both agents exit within {grace:?} of SIGTERM (node-a: {stopped_a:?}, node-b: {stopped_b:?}; \
             None = had to be killed); node-b's log ends with:\n{}",
            w.engine.agent(Node::B).log_tail(5)
        )
    });
    w.finish();
}

/// Writes a non-zero pattern into `image` from `from` to its end, so that the mirror has real
/// data to copy (zero regions are copied almost instantly). The guest's writer appends from
/// offset 0 at 50 records/s and never reaches this region during the test. QEMU opens the image
/// with the host's page cache (Kata's and the lab's default), so it reads what was written here.
fn fill_with_data(image: &Path, from: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(image).expect("open the image");
    let len = f.metadata().expect("image size").len();
    let chunk = vec![0x5a_u8; 1 << 20];
    let mut at = from;
    while at < len {
        let n = usize::try_from((len - at).min(chunk.len() as u64)).expect("chunk fits");
        f.write_all_at(&chunk[..n], at).expect("write the image");
        at += n as u64;
    }
}

/// After an aborted migration: the source VM still runs, both nodes look as before, and the
/// probe lost nothing across the whole attempt.
fn assert_untouched(w: &World, before: &Snapshot, probe: RunningProbe, what: &str) {
    assert_eq!(w.run_state(Node::A), "running", "{what}: the source VM keeps running");
    let (diff, settled) =
        agents::wait_unchanged(&w.lab, before, &[&w.source_ns()], Duration::from_secs(10)).expect("snapshot");
    eprintln!("measured [{what}]: both nodes back to their snapshot {settled:?} after the terminal events");
    assert!(diff.is_empty(), "{what}: nothing left behind on either node:\n{}", diff.join("\n"));
    agents::wait_for_rx(&w.lab, &w.source_ns(), "eth0", BEFORE, TRAFFIC_WAIT).expect("traffic on node-a");
    let r = probe.stop(Duration::from_secs(10)).expect("probe report");
    eprintln!(
        "measured [{what}]: probe sent {} lost {} longest gap {:.1} ms",
        r.sent, r.lost, r.longest_gap_ms
    );
    w.expect_no_loss(&r, 1000, what);
}

#[test]
fn lab_migrate_cancel_during_storage_leaves_nothing_behind() {
    let Some(w) = World::boot("cnls0", "local:2", "256M", false) else { return };
    let images = w.lab.paths(Node::A, w.id).expect("paths").disks;
    fill_with_data(&images[0], 64 << 20);
    let before = w.snapshot();
    let probe = w.probe(POD_V4.into());

    let mid_mirror = |side: Side, ev: &pb::MigrationEvent| {
        side == Side::Source
            && agents::phase(ev) == pb::Phase::PHASE_STORAGE
            && ev.storage.as_ref().is_some_and(|s| !s.drives.is_empty() && s.drives.iter().any(|d| !d.ready))
    };
    let m = w
        .engine
        .migrate(
            Node::A,
            w.id,
            options(StorageMode::Local),
            Some(Trigger::cancel_when(mid_mirror)),
            MIGRATION_DEADLINE,
        )
        .expect("the migration runs");
    let s = &m.summary;
    let at = fired(&m, "a mirror progress event");
    let copied: Vec<String> = at
        .storage
        .drives
        .iter()
        .map(|d| format!("{} {}/{} MiB", d.drive_id, d.done_bytes >> 20, d.total_bytes >> 20))
        .collect();
    eprintln!("measured [cancel in storage]: cancelled at {} after {:?}", copied.join(", "), s.elapsed);
    assert!(!s.succeeded() && s.stopped());
    assert_eq!(end(s, Side::Source), pb::Phase::PHASE_CANCELLED, "{}", end_message(s, Side::Source));
    assert_eq!(
        end(s, Side::Destination),
        pb::Phase::PHASE_CANCELLED,
        "{}",
        end_message(s, Side::Destination)
    );
    assert_untouched(&w, &before, probe, "cancel in storage");
    w.finish();
}

#[test]
fn lab_migrate_cancel_during_ram_precopy_leaves_nothing_behind_and_a_retry_succeeds() {
    let Some(w) = World::boot("cnlr0", "shared:1", "64M", false) else { return };
    let boot_id = w.page(POD_V4.into())["boot_id"].as_str().expect("boot_id").to_owned();
    let before = w.snapshot();
    let probe = w.probe(POD_V4.into());

    let slow = MigrationOptions { max_bandwidth: Some(4 << 20), ..options(StorageMode::Shared) };
    let in_precopy = |side: Side, ev: &pb::MigrationEvent| {
        side == Side::Source
            && agents::phase(ev) == pb::Phase::PHASE_RAM
            && ev.ram.as_ref().is_some_and(|r| r.transferred_bytes > 0 && r.remaining_bytes > 0)
    };
    let m = w
        .engine
        .migrate(Node::A, w.id, slow, Some(Trigger::cancel_when(in_precopy)), MIGRATION_DEADLINE)
        .expect("the migration runs");
    let s = &m.summary;
    let at = fired(&m, "a RAM pre-copy progress event");
    let ram = at.ram.as_ref().map(|r| (r.transferred_bytes >> 20, r.total_bytes >> 20)).unwrap_or_default();
    eprintln!("measured [cancel in RAM]: cancelled at {}/{} MiB of RAM after {:?}", ram.0, ram.1, s.elapsed);
    assert!(!s.succeeded() && s.stopped());
    assert_eq!(end(s, Side::Source), pb::Phase::PHASE_CANCELLED, "{}", end_message(s, Side::Source));
    assert_eq!(
        end(s, Side::Destination),
        pb::Phase::PHASE_CANCELLED,
        "{}",
        end_message(s, Side::Destination)
    );
    assert_untouched(&w, &before, probe, "cancel in RAM");

    // The source is as good as new: the same VM moves on the next attempt.
    let probe = w.probe(POD_V4.into());
    let m = w
        .engine
        .migrate(Node::A, w.id, options(StorageMode::Shared), None, MIGRATION_DEADLINE)
        .expect("the retry runs");
    let n = cutover(&w, &m);
    agents::wait_for_rx(&w.lab, "node-b", "eth0", AFTER, TRAFFIC_WAIT).expect("traffic reaches node-b");
    let r = probe.stop(Duration::from_secs(10)).expect("probe report");
    eprintln!(
        "measured [retry]: {n}; probe sent {} lost {} longest gap {:.1} ms",
        r.sent, r.lost, r.longest_gap_ms
    );
    w.expect_no_loss(&r, 1500, &format!("retry after a cancel; cutover: {n}"));
    assert_moved(&w, &boot_id);
    w.finish();
}

#[test]
fn lab_migrate_destination_qemu_killed_in_precopy_fails_cleanly_on_both_sides() {
    let Some(w) = World::boot("kill0", "shared:1", "64M", false) else { return };
    let before = w.snapshot();
    let probe = w.probe(POD_V4.into());

    let pidfile = agents::incoming_dir(&w.lab, Node::B, w.id).join("pid");
    let killed = Rc::new(Cell::new(None));
    let killed_in = killed.clone();
    let kill_dest = move || {
        let pid: Option<u32> = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse().ok());
        if let Some(pid) = pid {
            killed_in.set(agents::signal(pid, Signal::SIGKILL).is_ok().then_some(pid));
        }
    };
    let in_precopy = |side: Side, ev: &pb::MigrationEvent| {
        side == Side::Source
            && agents::phase(ev) == pb::Phase::PHASE_RAM
            && ev.ram.as_ref().is_some_and(|r| r.transferred_bytes > 0 && r.remaining_bytes > 0)
    };
    let slow = MigrationOptions { max_bandwidth: Some(4 << 20), ..options(StorageMode::Shared) };
    let m = w
        .engine
        .migrate(Node::A, w.id, slow, Some(Trigger::run_when(in_precopy, kill_dest)), MIGRATION_DEADLINE)
        .expect("the migration runs");
    let s = &m.summary;
    fired(&m, "a RAM pre-copy progress event");
    let pid = killed.get().expect("the destination QEMU was found and killed");
    eprintln!("measured [dest QEMU killed]: failure {:?} after {:?}", s.failure(), s.elapsed);
    assert!(!s.succeeded() && !s.stopped());
    assert_eq!(end(s, Side::Destination), pb::Phase::PHASE_FAILED, "{}", end_message(s, Side::Destination));
    let dest_msg = end_message(s, Side::Destination);
    assert!(dest_msg.contains("QEMU"), "the destination says its QEMU went away: {dest_msg}");
    let src_end = end(s, Side::Source);
    assert!(
        matches!(src_end, pb::Phase::PHASE_FAILED | pb::Phase::PHASE_CANCELLED),
        "the source stops its half: {src_end:?} {}",
        end_message(s, Side::Source)
    );
    assert!(!end_message(s, Side::Source).is_empty(), "the source says why");
    assert!(!katamaran_e2e::pid_is_live(pid));
    assert_untouched(&w, &before, probe, "dest QEMU killed");
    w.finish();
}

/// A unix socket that accepts connections and answers like a web server: not an agent.
struct NotAnAgent {
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotAnAgent {
    fn serve(path: PathBuf) -> Self {
        use std::io::Write;
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                    }
                    // Non-blocking accept: nothing to wait on but the stop flag.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { path, stop, thread: Some(thread) }
    }
}

impl Drop for NotAnAgent {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn lab_migrate_bad_requests_are_refused_clearly_and_touch_nothing() {
    let Some(w) = World::boot("bad0", "none", "64M", false) else { return };
    let katactl = w.engine.bins().katactl.clone();
    let src = w.engine.agent(Node::A).endpoint();
    let dst = w.engine.agent(Node::B).endpoint();
    let fake = NotAnAgent::serve(w.lab.scratch_path("not-an-agent.sock"));
    let fake_ep = format!("unix://{}", fake.path.display());
    let missing_ep = format!("unix://{}", w.lab.root().join("nothing-here.sock").display());
    let before = w.snapshot();

    // (arguments after `migrate`, exit code, words the one-line error must contain)
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec![w.id, "--to", &dst, "--tunnel-mode", "ip6ip6"],
            2,
            vec!["tunnel-mode", "ip6ip6", "10.244.1.10"],
        ),
        (vec![w.id, "--to", &dst, "--tunnel-mode", "ip6gre"], 2, vec!["ip6gre", "IPv6 node addresses"]),
        (vec!["nosuch0", "--to", &dst], 2, vec!["nosuch0", "NOT_FOUND"]),
        (vec![w.id, "--to", &dst, "--downtime", "0ms"], 2, vec!["downtime"]),
        (vec![w.id, "--to", &dst, "--downtime", "soon"], 2, vec!["--downtime", "soon"]),
        (vec![w.id, "--to", &fake_ep], 1, vec!["destination"]),
        (vec![w.id, "--to", &missing_ep], 1, vec!["nothing-here.sock"]),
    ];
    for (args, code, words) in &cases {
        let mut argv = vec!["-r", &src, "--timeout", "10s", "migrate"];
        argv.extend(args.iter().copied());
        let run = agents::katactl(&katactl, &argv, Duration::from_secs(30)).expect("katactl runs");
        eprintln!(
            "katactl {}: exit {:?} in {:?}: {}",
            args.join(" "),
            run.code,
            run.elapsed,
            run.stderr.trim()
        );
        assert_eq!(run.code, Some(*code), "exit code of `{}`: {}", args.join(" "), run.stderr);
        for word in words {
            assert!(
                run.stderr.contains(word),
                "`{}` explains itself with {word:?}: {}",
                args.join(" "),
                run.stderr
            );
        }
        assert!(
            run.elapsed < Duration::from_secs(15),
            "`{}` is refused promptly: {:?}",
            args.join(" "),
            run.elapsed
        );
        let diff = w.snapshot().diff_from(&before);
        assert!(diff.is_empty(), "`{}` touched the nodes:\n{}", args.join(" "), diff.join("\n"));
        for node in [Node::A, Node::B] {
            let migrations = w.engine.list_migrations(node).expect("ListMigrations");
            assert!(
                migrations.is_empty(),
                "`{}` registered a migration on {node:?}: {migrations:?}",
                args.join(" ")
            );
        }
    }
    assert_eq!(w.run_state(Node::A), "running", "the VM never stopped");
    drop(fake);
    w.finish();
}

#[test]
fn lab_migrate_ipv6_probe_through_katactl_json_loses_nothing() {
    let Some(w) = World::boot("web6", "none", "64M", true) else { return };
    let boot_id = w.page(POD_V6.into())["boot_id"].as_str().expect("boot_id").to_owned();
    let probe = w.probe(POD_V6.into());
    let (src, dst) = (w.engine.agent(Node::A).endpoint(), w.engine.agent(Node::B).endpoint());
    let run = agents::katactl(
        &w.engine.bins().katactl,
        &["-r", &src, "-o", "json", "migrate", w.id, "--to", &dst, "--shared-storage"],
        MIGRATION_DEADLINE,
    )
    .expect("katactl runs");
    assert_eq!(run.code, Some(0), "katactl migrate succeeds: {}\n{}", run.stderr, run.stdout);
    agents::wait_for_rx(&w.lab, "node-b", "eth0", AFTER, TRAFFIC_WAIT).expect("traffic reaches node-b");
    let r = probe.stop(Duration::from_secs(10)).expect("probe report");

    // `-o json`: one event per line, then the summary.
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let (summary, events) = lines.split_last().expect("katactl printed a summary");
    assert!(events.iter().all(|e| e["phase"].is_string() && e["migrationId"].is_string()), "{events:?}");
    assert!(events.iter().any(|e| e["phase"] == "PHASE_COMPLETED"), "the destination completed: {events:?}");
    assert_eq!(summary["succeeded"], true, "{summary}");
    let us = |k: &str| summary[k].as_f64().unwrap_or_else(|| panic!("{k} in {summary}"));
    // The route moves at STOP (reaction) or just before it (the engine stops the VM itself).
    let (swap, lead, release) =
        (us("stop_to_route_swap_us"), us("route_swap_lead_us"), us("resume_to_plug_release_us"));
    assert!(swap > 0.0 || lead > 0.0, "the route swap is timed against STOP: {summary}");
    if artifacts::kernel_has_plug() {
        assert!(release > 0.0, "RESUME→plug release is measured: {summary}");
    } else {
        no_plug_note();
    }
    assert!(summary["phases_ms"]["ram"].is_u64() && summary["total_ms"].as_u64() > Some(0), "{summary}");
    eprintln!(
        "measured [ipv6, katactl]: total {} ms, downtime {} ms, STOP→route swap {swap:.0} µs, swap lead {lead:.0} µs, \
         RESUME→plug release {release:.0} µs, phases {}; probe sent {} lost {} longest gap {:.1} ms",
        summary["total_ms"], summary["downtime_ms"], summary["phases_ms"], r.sent, r.lost, r.longest_gap_ms
    );
    w.expect_no_loss(&r, 1500, &format!("IPv6 across the move; summary {summary}"));
    let page = w.page(POD_V6.into());
    assert_eq!(
        (&page["instance"], &page["boot_id"]),
        (&serde_json::json!(w.id), &serde_json::json!(boot_id))
    );
    let after =
        w.lab.probe(SocketAddr::new(POD_V6.into(), 7), RATE, Duration::from_secs(1)).expect("probe v6");
    w.expect_no_loss(&after, 900, "IPv6 from node-b");
    assert_eq!(w.run_state(Node::A), "postmigrate");
    w.finish();
}
