//! The two-node lab itself: its sandboxes are Kata-shaped, a guest on node-a answers the probe
//! and HTTP with nothing lost, its disk log checks out (and the checker catches damage), and
//! `down` leaves nothing behind — also after a run that was killed half way.
//!
//! Needs root (CI runs as root); the VM tests also need QEMU and the guest image
//! (`hack/guest/build.sh`, cached). Without them each test prints `skipped: <why>`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use katamaran_e2e::{artifacts, netns, reports, Disks, Lab, LabConfig, Node, Skip, VmOptions};

const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10);

/// Prints the skip line and returns `None` when a prerequisite is missing.
fn check<T>(r: Result<T, Skip>) -> Option<T> {
    r.map_err(|skip| skip.report()).ok()
}

/// Root, QEMU and the guest image, or `None` after printing why not.
fn vm_prerequisites() -> Option<()> {
    check(artifacts::require_vm_lab())?;
    check(artifacts::ensure_guest_image().expect("hack/guest/build.sh failed")).map(drop)
}

/// Polls `cond` until it holds or `limit` passes.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed and reaped when dropped, so a failing test leaves no script running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tap's counters, for failure messages: TX drops there mean the guest stalled longer than
/// the tap queue lasts (host overload); loss without them happened inside QEMU or the guest.
fn tap_counters(lab: &Lab, sandbox: &str) -> String {
    lab.exec(sandbox, &["ip", "-s", "link", "show", "dev", "tap0_kata"])
        .map_or_else(|e| format!("tap counters unavailable: {e}"), |o| stdout(&o))
}

#[test]
fn vm_on_node_a_answers_probe_and_http_and_keeps_a_checkable_disk_log() {
    if vm_prerequisites().is_none() {
        return;
    }
    let tool = artifacts::guest_tool().expect("the guest tool (disk-check) builds");
    let (mut lab, up_time) = Lab::up(LabConfig::unique()).expect("lab up");
    lab.sandbox(Node::A, "web0", POD_V4, Some(POD_V6)).expect("sandbox on node-a");
    let boot = lab
        .vm(Node::A, "web0", &VmOptions { disks: Disks::Shared(1), ..VmOptions::default() })
        .expect("the guest boots to KATAMARAN-GUEST-READY");
    let sb = lab.paths(Node::A, "web0").expect("paths once the VM has its disks");
    let qemu = sb.qemu_pid().expect("QEMU is running");

    // The data path client → router → node-a → veth → tc mirred → tap → guest and back.
    let r =
        lab.probe(SocketAddr::new(POD_V4.into(), 7), 1000, Duration::from_secs(3)).expect("probe over IPv4");
    assert!(r.sent >= 2900, "1000 pps for 3 s sent only {}: {r:?}", r.sent);
    assert_eq!(
        (r.lost, r.duplicated),
        (0, 0),
        "a guest sitting still loses nothing: {r:?}\n{}",
        tap_counters(&lab, "node-a/web0")
    );
    let r6 =
        lab.probe(SocketAddr::new(POD_V6.into(), 7), 1000, Duration::from_secs(1)).expect("probe over IPv6");
    assert!(r6.sent >= 900, "{r6:?}");
    assert_eq!(
        (r6.lost, r6.duplicated),
        (0, 0),
        "IPv6 via proxy NDP loses nothing: {r6:?}\n{}",
        tap_counters(&lab, "node-a/web0")
    );

    for addr in [IpAddr::V4(POD_V4), IpAddr::V6(POD_V6)] {
        let body = netns::http_get(&lab.netns("client"), SocketAddr::new(addr, 80), Duration::from_secs(5))
            .expect("the guest's HTTP page answers");
        let page: serde_json::Value = serde_json::from_str(&body).expect("the page is JSON");
        assert_eq!(page["instance"], "web0", "the page names the sandbox: {body}");
    }

    // The disk log: stop the VM (its writer with it), then check the shared image on the host.
    lab.kill_vm(Node::A, "web0").expect("kill-vm");
    assert!(!katamaran_e2e::pid_is_live(qemu), "kill-vm stops QEMU");
    let image = sb.disks.first().expect("one shared disk").clone();
    assert!(image.starts_with(lab.root().join("shared")), "shared:1 lives in shared storage: {image:?}");
    let good = reports::disk_check(&tool, &image).expect("disk-check runs");
    assert!(good.ok, "the guest's log is intact: {good:?}");
    assert!(good.records >= 50, "the writer ran for seconds at 50 records/s: {good:?}");
    assert_eq!(good.first_seq, Some(0));

    // Damage a copy and make sure the checker notices: a flipped byte, then a removed record.
    const RECORD: usize = 4096; // the writer's default --record-size
    let bytes = std::fs::read(&image).expect("read image");
    let used = usize::try_from(good.records).expect("record count fits") * RECORD;
    let mut flipped = bytes[..used + RECORD].to_vec();
    flipped[3 * RECORD + 100] ^= 0x5a;
    let flipped_path = lab.scratch_path("flipped.img");
    std::fs::write(&flipped_path, &flipped).expect("write copy");
    let bad = reports::disk_check(&tool, &flipped_path).expect("disk-check runs");
    assert!(!bad.ok, "a flipped byte is caught: {bad:?}");
    assert_eq!(
        (bad.errors[0].kind.as_str(), bad.errors[0].offset),
        ("corrupt", 3 * RECORD as u64),
        "{bad:?}"
    );

    let mut removed = bytes[..used + RECORD].to_vec();
    removed.drain(5 * RECORD..6 * RECORD);
    let removed_path = lab.scratch_path("removed.img");
    std::fs::write(&removed_path, &removed).expect("write copy");
    let gap = reports::disk_check(&tool, &removed_path).expect("disk-check runs");
    assert!(!gap.ok, "a missing record is caught: {gap:?}");
    assert_eq!((gap.errors[0].kind.as_str(), gap.errors[0].offset), ("gap", 5 * RECORD as u64), "{gap:?}");

    let down = lab.down().expect("lab down");
    assert_eq!(lab.leftovers(), Vec::<String>::new(), "down leaves nothing behind");
    println!(
        "measured: lab up {:.2}s, boot-to-ready {:.2}s, lab down {:.2}s; probe rtt gap {:.1} ms",
        up_time.as_secs_f64(),
        boot.as_secs_f64(),
        down.as_secs_f64(),
        r.longest_gap_ms
    );
}

#[test]
fn sandboxes_are_kata_shaped_and_routes_follow_converge() {
    if check(artifacts::require_lab()).is_none() {
        return;
    }
    let (mut lab, _) = Lab::up(LabConfig::unique()).expect("lab up");
    lab.run(&["up"]).expect("a second `up` on a lab that is up succeeds");
    let sb = lab.sandbox(Node::A, "shape0", POD_V4, Some(POD_V6)).expect("sandbox");
    let sbx = "node-a/shape0";

    // Kata's tcfilter model: eth0 keeps the pod's MAC, a tap beside it, mirred redirects both ways.
    let eth0 = stdout(&lab.exec(sbx, &["ip", "-o", "link", "show", "dev", "eth0"]).expect("eth0"));
    assert!(eth0.contains(&format!("link/ether {} ", sb.mac)), "eth0 carries the pod MAC {}: {eth0}", sb.mac);
    let tap =
        stdout(&lab.exec(sbx, &["ip", "-d", "-o", "link", "show", "dev", "tap0_kata"]).expect("tap0_kata"));
    assert!(tap.contains("tun type tap"), "tap0_kata is a tap: {tap}");
    for (dev, to) in [("eth0", "tap0_kata"), ("tap0_kata", "eth0")] {
        let f = stdout(&lab.exec(sbx, &["tc", "filter", "show", "dev", dev, "ingress"]).expect("tc"));
        assert!(
            f.contains("u32") && f.contains(&format!("mirred (Egress Redirect to device {to})")),
            "{dev} ingress redirects to {to}: {f}"
        );
    }

    // The OCI bundle katamaran reads: netns path and CRI annotations.
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sb.config_json).expect("config.json"))
            .expect("config.json is JSON");
    assert!(spec["ociVersion"].is_string());
    let net = spec["linux"]["namespaces"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
        .expect("a network namespace entry");
    assert_eq!(net["path"].as_str().map(std::path::Path::new), Some(sb.netns_path.as_path()));
    assert!(sb.netns_path.exists(), "the bundle's netns path exists");
    let ann = &spec["annotations"];
    assert_eq!(ann["io.kubernetes.cri.container-type"], "sandbox");
    assert_eq!(ann["io.kubernetes.cri.sandbox-id"], "shape0");
    for key in ["sandbox-name", "sandbox-namespace", "sandbox-uid"] {
        assert!(ann[format!("io.kubernetes.cri.{key}")].is_string(), "annotation {key}");
    }
    assert!(sb.vm_dir.ends_with("node-a/run/vc/vm/shape0"), "{:?}", sb.vm_dir);
    assert!(sb.extra_monitor.ends_with("run/vc/vm/shape0/extra-monitor.sock"));

    // calico-style node side: the /32 on the veth, proxy ARP/NDP without delay, and the same
    // MAC on every node's veth so the guest's gateway entry survives a move.
    let veth =
        stdout(&lab.exec("node-a", &["ip", "-o", "link", "show", "dev", &sb.node_veth]).expect("veth"));
    assert!(veth.contains("link/ether ee:ee:ee:ee:ee:ee "), "calico's fixed MAC: {veth}");
    let route = stdout(&lab.exec("node-a", &["ip", "route", "show", &POD_V4.to_string()]).expect("route"));
    assert!(route.contains(&format!("dev {}", sb.node_veth)), "node-a routes the pod into its veth: {route}");
    let sysctl =
        |key: &str| stdout(&lab.exec("node-a", &["cat", &format!("/proc/sys/net/{key}")]).expect(key));
    assert_eq!(sysctl(&format!("ipv4/conf/{}/proxy_arp", sb.node_veth)).trim(), "1");
    assert_eq!(sysctl(&format!("ipv4/neigh/{}/proxy_delay", sb.node_veth)).trim(), "0");
    assert_eq!(sysctl(&format!("ipv6/conf/{}/proxy_ndp", sb.node_veth)).trim(), "1");
    let proxy = stdout(&lab.exec("node-a", &["ip", "-6", "neigh", "show", "proxy"]).expect("proxy"));
    assert!(proxy.contains("fe80::1"), "node-a answers for the guest's IPv6 gateway: {proxy}");

    // The router: first placement advertises node-a; a second sandbox does not move the route;
    // converge does, both families at once.
    let router_route = |ip: IpAddr| {
        let family = if ip.is_ipv6() { "-6" } else { "-4" };
        stdout(&lab.exec("router", &["ip", family, "route", "show", &ip.to_string()]).expect("route"))
    };
    assert!(router_route(POD_V4.into()).contains("via 10.201.0.11"));
    assert!(router_route(POD_V6.into()).contains("via fd00:201::11"));
    let sb_b = lab.sandbox(Node::B, "shape0", POD_V4, Some(POD_V6)).expect("same sandbox on node-b");
    assert_eq!(sb_b.mac, sb.mac, "the same id gets the same MAC on both nodes (the guest keeps its MAC)");
    let veth_b =
        stdout(&lab.exec("node-b", &["ip", "-o", "link", "show", "dev", &sb_b.node_veth]).expect("veth"));
    assert!(veth_b.contains("link/ether ee:ee:ee:ee:ee:ee "), "{veth_b}");
    assert!(
        router_route(POD_V4.into()).contains("via 10.201.0.11"),
        "a destination sandbox is not advertised"
    );
    lab.converge("shape0", Node::B).expect("converge to node-b");
    assert!(router_route(POD_V4.into()).contains("via 10.201.0.12"));
    assert!(router_route(POD_V6.into()).contains("via fd00:201::12"));

    // Idempotent with the same arguments, refused with different ones.
    lab.sandbox(Node::A, "shape0", POD_V4, Some(POD_V6)).expect("same sandbox again is a no-op");
    let err = lab
        .sandbox(Node::A, "shape0", Ipv4Addr::new(10, 244, 1, 11), None)
        .expect_err("a different IP is refused");
    assert!(err.to_string().contains("exists with"), "{err}");

    let status = lab.status().expect("status");
    assert!(status.contains("node-a  shape0") && status.contains("node-b  shape0"), "{status}");
    assert!(status.contains("alive=no"), "{status}");

    lab.down().expect("down");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    lab.run(&["down"]).expect("down on a lab that is gone is a no-op");
}

#[test]
fn down_cleans_up_after_vm_is_killed_mid_boot() {
    if vm_prerequisites().is_none() {
        return;
    }
    let (mut lab, _) = Lab::up(LabConfig::unique()).expect("lab up");
    let sb = lab.sandbox(Node::A, "half0", POD_V4, None).expect("sandbox");
    let mut vm = lab.command();
    vm.args(["vm", "node-a", "half0", "--disks", "local:2"]).stdout(Stdio::null()).stderr(Stdio::null());
    let mut script = KillOnDrop(vm.spawn().expect("spawn lab.sh vm"));
    wait_until(Duration::from_secs(30), "QEMU to start", || sb.qemu_pid().is_some());
    script.0.kill().expect("kill lab.sh vm");
    script.0.wait().expect("reap lab.sh vm");
    let qemu = sb.qemu_pid().expect("QEMU outlives the killed script (it daemonized)");
    let local = lab.root().join("node-a/disks/half0-disk1.img");
    assert!(local.exists(), "local:2 created two images in node-a's storage");

    lab.down().expect("down after a killed `vm` cleans up and verifies");
    assert!(!katamaran_e2e::pid_is_live(qemu), "the orphaned QEMU was stopped");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

#[test]
fn down_cleans_up_after_up_is_killed() {
    if check(artifacts::require_lab()).is_none() {
        return;
    }
    let mut lab = Lab::guard(LabConfig::unique()).expect("lab lock");
    let mut up = lab.command();
    up.arg("up").stdout(Stdio::null()).stderr(Stdio::null());
    let mut script = KillOnDrop(up.spawn().expect("spawn lab.sh up"));
    let first = std::path::PathBuf::from("/run/netns").join(lab.netns("client"));
    wait_until(Duration::from_secs(10), "the first namespace", || first.exists());
    script.0.kill().expect("kill lab.sh up");
    script.0.wait().expect("reap lab.sh up");
    assert!(!lab.leftovers().is_empty(), "the killed `up` left something to clean");

    lab.down().expect("down after a killed `up` cleans up");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

#[test]
fn down_refuses_to_delete_a_directory_that_is_not_a_lab_and_says_what_is_left() {
    if check(artifacts::require_lab()).is_none() {
        return;
    }
    let config = LabConfig::unique();
    std::fs::create_dir_all(&config.root).expect("mkdir");
    let _cleanup = RemoveDirOnDrop(config.root.clone());
    let precious = config.root.join("precious.txt");
    std::fs::write(&precious, b"not lab data").expect("write");
    let mut lab = Lab::guard(config).expect("lab lock");
    let err = lab.down().expect_err("down must not delete a directory without the lab marker");
    let text = err.to_string();
    assert!(text.contains("left behind") && text.contains("files under"), "{text}");
    assert!(precious.exists(), "the file survived");
}

/// Removes a directory the test made itself, even when an assertion fails.
struct RemoveDirOnDrop(std::path::PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_lab_left_by_a_dead_test_process_is_swept_by_the_next_lab() {
    if check(artifacts::require_lab()).is_none() {
        return;
    }
    // A pid above pid_max can never be alive: it stands for a test process killed before Drop.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    let dead = pid_max + 1;
    let stale = LabConfig {
        root: std::env::temp_dir().join(format!("kmr-e2e-{dead}-0")),
        prefix: format!("kmrt{dead}-0-"),
        guest_dir: artifacts::guest_dir(),
    };
    let _cleanup = RemoveDirOnDrop(stale.root.clone());
    let out = std::process::Command::new("bash")
        .arg(artifacts::lab_script())
        .arg("up")
        .env("KMR_LAB_ROOT", &stale.root)
        .env("KMR_LAB_PREFIX", &stale.prefix)
        .output()
        .expect("run lab.sh up");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stale_ns = std::path::Path::new("/run/netns").join(format!("{}router", stale.prefix));
    assert!(stale_ns.exists() && stale.root.exists());

    let mut lab = Lab::guard(LabConfig::unique()).expect("a new lab");
    assert!(!stale_ns.exists(), "the dead process's namespaces are gone");
    assert!(!stale.root.exists(), "the dead process's root is gone");
    lab.down().expect("down");
}

#[test]
fn naive_baseline_migration_loses_packets_then_the_guest_answers_from_node_b() {
    if vm_prerequisites().is_none() {
        return;
    }
    let tool = artifacts::guest_tool().expect("the guest tool (disk-check) builds");
    let (mut lab, _) = Lab::up(LabConfig::unique()).expect("lab up");
    lab.probe_path().expect("the probe builds");
    let reports_dir = lab.scratch_path("naive");
    let mut naive = std::process::Command::new("bash");
    naive
        .arg(artifacts::workspace_root().join("hack/naive-migrate.sh"))
        .args(["--runs", "1", "--id", "mig0", "--before", "1", "--after", "1", "--keep", "--json-dir"])
        .arg(&reports_dir)
        .envs(lab.command().get_envs().filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))))
        .stdin(Stdio::null());
    let out = naive.output().expect("run hack/naive-migrate.sh");
    assert!(out.status.success(), "naive-migrate.sh failed: {}", String::from_utf8_lossy(&out.stderr));

    let report = reports::read_probe_report(&reports_dir.join("probe-1.json")).expect("probe report");
    let timeline: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports_dir.join("timeline-1.json")).expect("timeline"))
            .expect("JSON");
    let blackout_ms = timeline["blackout_ms"].as_f64().expect("blackout_ms");
    println!("naive baseline: {report:?}\ntimeline: {timeline}");
    // The point of the baseline: switching the route after RESUME loses what arrived meanwhile.
    assert!(report.lost > 0, "a naive switch-over loses packets: {report:?}");
    assert_eq!(report.duplicated, 0);
    assert!(blackout_ms > 0.0 && timeline["stop_to_resume_ms"].as_f64() > Some(0.0), "{timeline}");
    let last_lost = report.loss_timeline.last().expect("a loss run").last_seq;
    assert!(last_lost + 100 < report.sent, "traffic came back after the switch: {report:?}");

    // The migrated guest runs on node-b: the route points there, nothing is lost any more, its
    // page still names it, the source QEMU is paused in postmigrate.
    let router = stdout(&lab.exec("router", &["ip", "route", "show", &POD_V4.to_string()]).expect("route"));
    assert!(router.contains("via 10.201.0.12"), "{router}");
    let after = lab.probe(SocketAddr::new(POD_V4.into(), 7), 1000, Duration::from_secs(1)).expect("probe");
    assert_eq!((after.lost, after.duplicated), (0, 0), "{after:?}");
    let after6 =
        lab.probe(SocketAddr::new(POD_V6.into(), 7), 1000, Duration::from_secs(1)).expect("probe v6");
    assert_eq!((after6.lost, after6.duplicated), (0, 0), "{after6:?}");
    let body =
        netns::http_get(&lab.netns("client"), SocketAddr::new(POD_V4.into(), 80), Duration::from_secs(5))
            .expect("HTTP from the migrated guest");
    assert!(body.contains("mig0"), "{body}");
    let src = stdout(&lab.run(&["qmp", "node-a", "mig0", "query-status"]).expect("source QMP"));
    assert!(src.contains("postmigrate"), "{src}");

    // Shared storage: the writer went on from the same image on node-b without a hole.
    let dst = lab.paths(Node::B, "mig0").expect("paths");
    lab.kill_vm(Node::B, "mig0").expect("kill-vm");
    let check = reports::disk_check(&tool, dst.disks.first().expect("a shared disk")).expect("disk-check");
    assert!(check.ok && check.records > 0, "{check:?}");

    lab.down().expect("down");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}
