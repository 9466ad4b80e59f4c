//! The soak (a benchmark, not CI: `hack/soak.sh`): one guest moved back and forth between the
//! lab's nodes `KMR_SOAK_MIGRATIONS` times (default 50) under the probe; with
//! `KMR_SOAK_FAULTS=1` every move gets a fault drawn from the fault matrix. After each move it
//! counts the QEMUs running the guest (must be exactly one), checks the guest was not
//! rebooted, and the packets lost while the source kept the VM. Prints a table per outcome.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use katamaran_e2e::agents::{self, Snapshot};
use katamaran_e2e::faults::{FaultLab, POD};
use katamaran_e2e::Node;

/// The faults a move may get, as (name, node-a's fail points, node-b's) for a move from node-a;
/// the roles swap with the direction.
const FAULTS: &[&str] = &[
    "none",
    "cancel-source-ram",
    "cancel-dest-ram",
    "cancel-after-commit",
    "source-crash-before-commit",
    "source-crash-after-commit",
    "panic-source",
];

#[derive(Default)]
struct Row {
    moves: u32,
    completed: u32,
    rolled_back: u32,
    refused_cancels: u32,
    lost_while_source_kept: u64,
    lost_in_completed_moves: u64,
    two_or_none: u32,
    rebooted: u32,
    leftovers: u32,
    seconds: f64,
}

/// A small deterministic generator: the soak is reproducible from its seed.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
#[ignore = "a benchmark: run it with hack/soak.sh"]
fn soak_back_and_forth() {
    let n: u32 = std::env::var("KMR_SOAK_MIGRATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let faults = std::env::var("KMR_SOAK_FAULTS").is_ok_and(|v| v == "1");
    let mut seed: u64 =
        std::env::var("KMR_SOAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_cafe);
    let Some(mut w) = FaultLab::boot("soak0", "", "") else { return };
    // One probe per move below, not the lab's whole-run probe.
    let _ = w.stop_probe();
    let boot_id = w.boot_id();
    let mut at = Node::A;
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    let mut last_fail = ("", "");
    // Moves that ended before reaching their fault's fail point (counted, not faulted).
    let mut unreached = 0u32;
    for i in 0..n {
        let fault = if faults { FAULTS[(next(&mut seed) % FAULTS.len() as u64) as usize] } else { "none" };
        let (src_fp, dst_fp) = match fault {
            "cancel-source-ram" | "cancel-dest-ram" => ("source-ram=hold", ""),
            "cancel-after-commit" | "source-crash-after-commit" => ("source-after-commit=hold", ""),
            "source-crash-before-commit" => ("source-before-commit=hold", ""),
            "panic-source" => ("source-ram=panic", ""),
            _ => ("", ""),
        };
        let (fa, fb) = if at == Node::A { (src_fp, dst_fp) } else { (dst_fp, src_fp) };
        // Agents restart only to change their fail points (a restart is itself a fault row).
        if (fa, fb) != last_fail {
            w.restart_agents(fa, fb);
            last_fail = (fa, fb);
        }
        w.clear_holds();
        let before = Snapshot::take(&w.lab, &[]).expect("snapshot");
        let probe = w.lab.spawn_probe(SocketAddr::new(POD.into(), 7), 1000).expect("probe");
        // The probe's packets flow before the move (the router sends them to the node that hosts
        // the VM, see below).
        let node_ip = |n: Node| if n == Node::A { "10.201.0.11" } else { "10.201.0.12" };
        let host = if at == Node::A { "node-a" } else { "node-b" };
        agents::wait_for_rx(&w.lab, host, "eth0", 200, Duration::from_secs(40))
            .expect("the probe reaches the VM");
        let started = Instant::now();
        let extra: &[&str] = if fault.ends_with("ram") { &["--bandwidth", "8M"] } else { &[] };
        let run = w.migrate_in_background(at, extra);
        let other = agents::other(at);
        let mut refused = false;
        match fault {
            "cancel-source-ram" | "cancel-dest-ram" => {
                if w.held_or_ended("source-ram", &run) {
                    let id = w.migration_id(at);
                    let via = if fault == "cancel-source-ram" { at } else { other };
                    std::thread::scope(|s| {
                        let h = s.spawn(|| w.cancel(via, &id));
                        w.release("source-ram");
                        let _ = h.join();
                    });
                } else {
                    unreached += 1;
                }
            }
            "cancel-after-commit" => {
                if w.held_or_ended("source-after-commit", &run) {
                    let id = w.migration_id(at);
                    refused = w.cancel(at, &id).is_err();
                    w.release("source-after-commit");
                } else {
                    unreached += 1;
                }
            }
            "source-crash-before-commit" | "source-crash-after-commit" => {
                let point = if fault.ends_with("before-commit") {
                    "source-before-commit"
                } else {
                    "source-after-commit"
                };
                if w.held_or_ended(point, &run) {
                    w.engine.crash_and_restart(&w.lab, at).expect("restart");
                } else {
                    unreached += 1;
                }
            }
            _ => {}
        }
        let run = run.join().expect("katactl thread");
        // Wait for the outcome to settle: exactly one QEMU running, within a bound.
        let until = Instant::now() + Duration::from_secs(30);
        let running = loop {
            let count =
                [Node::A, Node::B].iter().filter(|n| w.status(**n).as_deref() == Some("running")).count();
            if count == 1 || Instant::now() > until {
                break count;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let report = match probe.stop(Duration::from_secs(10)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("move {i}: the probe gave no report: {e}; katactl: {}", run.stderr.trim());
                katamaran_e2e::ProbeReport::default()
            }
        };
        let moved = w.status(other).as_deref() == Some("running");
        let row = rows.entry(fault).or_default();
        row.moves += 1;
        row.seconds += started.elapsed().as_secs_f64();
        if running != 1 {
            row.two_or_none += 1;
        }
        if moved {
            row.completed += 1;
            row.lost_in_completed_moves += report.lost;
        } else {
            row.rolled_back += 1;
            row.lost_while_source_kept += report.lost;
            let (diff, _) =
                agents::wait_unchanged(&w.lab, &before, &[], Duration::from_secs(10)).expect("snapshot");
            if !diff.is_empty() {
                row.leftovers += 1;
                eprintln!("move {i} ({fault}): left behind:\n{}", diff.join("\n"));
            }
        }
        if refused {
            row.refused_cancels += 1;
        }
        if std::env::var_os("KMR_SOAK_DEBUG").is_some() {
            for host in ["router", "node-a", "node-b"] {
                let out = w
                    .lab
                    .exec(host, &["ip", "route"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                eprintln!("move {i}: {host} routes:\n{}", out.unwrap_or_default());
                let out = w
                    .lab
                    .exec(host, &["ip", "neigh"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                eprintln!("move {i}: {host} neighbours:\n{}", out.unwrap_or_default());
            }
            for node in ["node-a", "node-b"] {
                let dir = w.lab.root().join(node).join("run/katamaran/netns");
                for ns in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = ns.path();
                    for cmd in [
                        &["ip", "-s", "link"][..],
                        &["ip", "addr"],
                        &["tc", "-s", "filter", "show", "dev", "eth0", "ingress"],
                    ] {
                        let out = std::process::Command::new("nsenter")
                            .arg(format!("--net={}", path.display()))
                            .args(cmd)
                            .output()
                            .map(|o| {
                                format!(
                                    "{}{}",
                                    String::from_utf8_lossy(&o.stdout),
                                    String::from_utf8_lossy(&o.stderr)
                                )
                            });
                        eprintln!(
                            "move {i}: {node} {} {cmd:?}:\n{}",
                            path.display(),
                            out.unwrap_or_default()
                        );
                    }
                }
            }
        }
        if running == 1 && w.boot_id() != boot_id {
            row.rebooted += 1;
        }
        eprintln!(
            "move {i:>3} {at:?}→{other:?} {fault:<28} katactl exit {:?}: {} running, moved {moved}, probe lost {} of {}",
            run.code, running, report.lost, report.sent
        );
        if run.code != Some(0) && fault == "none" {
            eprintln!("move {i}: katactl said: {}", run.stderr.trim());
        }
        if moved {
            at = other;
            // The cluster network learns the move (what `lab.sh converge` does for a CNI): the
            // next move starts from the node the traffic goes to.
            let route = format!("{POD}/32");
            w.lab
                .exec("router", &["ip", "route", "replace", &route, "via", node_ip(at), "proto", "static"])
                .expect("converge the router");
        }
    }
    println!(
        "\nsoak: {n} moves, faults {}; {unreached} ended before their fault's moment",
        if faults { "on" } else { "off" }
    );
    println!(
        "| fault | moves | completed | rolled back | refused cancels | lost while the source kept the VM | lost in completed moves | two or no copies | rebooted | leftovers | s/move |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut bad = 0;
    for (fault, r) in &rows {
        println!(
            "| {fault} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            r.moves,
            r.completed,
            r.rolled_back,
            r.refused_cancels,
            r.lost_while_source_kept,
            r.lost_in_completed_moves,
            r.two_or_none,
            r.rebooted,
            r.leftovers,
            r.seconds / f64::from(r.moves.max(1))
        );
        bad += r.two_or_none + r.rebooted;
    }
    w.finish();
    assert_eq!(bad, 0, "the VM ran in two places or none, or was rebooted");
}
