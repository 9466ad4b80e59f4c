//! The ownership protocol under faults, in the two-node lab with real QEMU guests: a cancel
//! through either side, an agent crash, a panic, each at an exact moment held by a fail point
//! (`KATAMARAN_FAILPOINTS=<point>=hold`; the lab's agents are built with the test-only
//! `failpoints` feature). After each: exactly one QEMU runs the guest, it is the same guest
//! (boot id), and the side that lost the VM has nothing left.
//!
//! Needs root, QEMU and the guest image; without them each test prints `skipped: <why>`.

use katamaran_e2e::agents::{self, Snapshot};
use katamaran_e2e::faults::{summary, FaultLab};
use katamaran_e2e::Node;

#[test]
fn lab_fault_cancel_through_the_destination_in_ram_rolls_back() {
    let Some(w) = FaultLab::boot("fcd0", "source-ram=hold", "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &["--bandwidth", "4M"]);
    w.wait_held("source-ram");
    let id = w.migration_id(Node::B);
    let cancel = {
        // The destination passes the cancel to the source, which is held: answer after release.
        let answer = std::thread::scope(|s| {
            let h = s.spawn(|| w.cancel(Node::B, &id));
            w.release("source-ram");
            h.join().expect("cancel thread")
        });
        answer
    };
    let run = run.join().expect("katactl thread");
    eprintln!("cancel through node-b: {cancel:?}; katactl exit {:?}: {}", run.code, run.stderr.trim());
    assert!(matches!(&cancel, Ok(r) if r.cancelled), "the destination's cancel is accepted: {cancel:?}");
    assert_ne!(run.code, Some(0), "the migration did not complete: {}", run.stdout);
    let s = summary(&run);
    assert_ne!(s["succeeded"], true, "{s}");
    w.assert_rolled_back(&before, &boot_id, "cancel through the destination in RAM");
    w.finish();
}

#[test]
fn lab_fault_cancel_after_the_commit_is_refused_and_the_move_completes() {
    let Some(w) = FaultLab::boot("fcc0", "source-after-commit=hold", "") else { return };
    let boot_id = w.boot_id();
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held("source-after-commit");
    let id = w.migration_id(Node::A);
    let via_source = w.cancel(Node::A, &id);
    // The destination asks the held source, which answers once released.
    let via_dest = std::thread::scope(|s| {
        let h = s.spawn(|| w.cancel(Node::B, &id));
        w.release("source-after-commit");
        h.join().expect("cancel thread")
    });
    let run = run.join().expect("katactl thread");
    eprintln!("cancel past the commit: source {via_source:?}, destination {via_dest:?}");
    for (side, answer) in [("source", &via_source), ("destination", &via_dest)] {
        let e = answer.as_ref().expect_err("refused past the commit");
        assert!(
            e.contains("FAILED_PRECONDITION") && e.contains("already belongs to the destination"),
            "the {side} says why: {e}"
        );
    }
    assert_eq!(run.code, Some(0), "the migration completes: {}\n{}", run.stderr, run.stdout);
    assert_eq!(w.boot_id(), boot_id, "the same guest answers from node-b");
    assert_eq!(w.status(Node::A).as_deref(), Some("postmigrate"), "the source never resumed");
    assert_eq!(w.status(Node::B).as_deref(), Some("running"));
    w.finish();
}

#[test]
fn lab_fault_source_agent_crash_before_the_commit_rolls_back_on_restart() {
    let Some(mut w) = FaultLab::boot("fsk0", "source-before-commit=hold", "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held("source-before-commit");
    assert_eq!(w.status(Node::A).as_deref(), Some("postmigrate"), "held after QEMU completed");
    w.paused_first();
    w.engine.crash_and_restart(&w.lab, Node::A).expect("node-a's agent restarts");
    let run = run.join().expect("katactl thread");
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    let listed = w.engine.list_migrations(Node::A).expect("ListMigrations on node-a");
    let m = listed.last().expect("the restarted agent lists the migration");
    let last = m.last_event.message.clone();
    assert!(last.contains("rolled back"), "the restarted agent reports the rollback: {last}");
    w.assert_rolled_back(&before, &boot_id, "source agent killed before the commit");
    w.finish();
}

#[test]
fn lab_fault_panic_in_the_source_task_rolls_back() {
    let Some(w) = FaultLab::boot("fpn0", "source-ram=panic", "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("panicked") || run.stdout.contains("panicked"),
        "the failure names the panic: {}\n{}",
        run.stderr,
        run.stdout
    );
    // QEMU's outgoing migration runs on while the panicked task unwinds: it may complete (and
    // stop the VM) before the unwind cancels it.
    w.paused_if_the_source_stopped(&run);
    w.assert_rolled_back(&before, &boot_id, "panic in the source task");
    w.finish();
}

#[test]
fn lab_fault_destination_qemu_killed_after_the_load_before_the_vote_rolls_back() {
    incoming_qemu_killed_before_the_vote(
        "fdk0",
        None,
        "destination QEMU killed after the load, before the vote",
    );
}

/// The incoming QEMU killed while the destination is held before its vote (and the source, where
/// given, at `source_hold`): the destination does not vote for a dead copy; the source rolls back
/// and runs the same guest; nothing is left.
fn incoming_qemu_killed_before_the_vote(id: &'static str, source_hold: Option<&str>, what: &str) {
    let fail_a = source_hold.map(|point| format!("{point}=hold")).unwrap_or_default();
    let Some(w) = FaultLab::boot(id, &fail_a, "dest-before-vote=hold") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]);
    if let Some(point) = source_hold {
        w.wait_held(point);
    }
    w.wait_held("dest-before-vote");
    w.paused_first();
    w.kill_incoming_qemu();
    w.release("dest-before-vote");
    if let Some(point) = source_hold {
        w.release(point);
    }
    let run = run.join().expect("katactl thread");
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    w.assert_rolled_back(&before, &boot_id, what);
    w.finish();
}

#[test]
fn lab_fault_source_agent_crash_after_the_commit_completes_on_restart() {
    let Some(mut w) = FaultLab::boot("fsc0", "source-after-commit=hold", "") else { return };
    let boot_id = w.boot_id();
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held("source-after-commit");
    w.engine.crash_and_restart(&w.lab, Node::A).expect("node-a's agent restarts");
    let _ = run.join().expect("katactl thread");
    // The restarted source re-delivers its commit; the destination, in doubt until then, runs it.
    w.wait_running(Node::B, std::time::Duration::from_secs(60));
    assert_eq!(
        w.status(Node::B).as_deref(),
        Some("running"),
        "the destination runs the VM after the re-delivery"
    );
    assert_eq!(w.status(Node::A).as_deref(), Some("postmigrate"), "the source never resumed");
    assert_eq!(w.boot_id(), boot_id, "the same guest answers");
    w.finish();
}

#[test]
fn lab_fault_destination_agent_crash_after_the_vote_completes_on_restart() {
    let Some(mut w) = FaultLab::boot("fdc0", "", "dest-after-vote=hold") else { return };
    let boot_id = w.boot_id();
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held("dest-after-vote");
    w.engine.crash_and_restart(&w.lab, Node::B).expect("node-b's agent restarts");
    let _ = run.join().expect("katactl thread");
    w.wait_running(Node::B, std::time::Duration::from_secs(60));
    assert_eq!(
        w.status(Node::B).as_deref(),
        Some("running"),
        "the restarted destination runs the VM: {:?}",
        w.engine.inspect(Node::B, w.id).map(|s| s.qemu_status).map_err(|e| e.to_string())
    );
    assert_eq!(w.status(Node::A).as_deref(), Some("postmigrate"), "the source never resumed");
    assert_eq!(w.boot_id(), boot_id, "the same guest answers");
    w.finish();
}

/// A cancel through `via` while the source is held at `point`: accepted (before the commit), the
/// migration ends without success, the source runs the same guest, nothing is left.
fn cancel_at(id: &'static str, point: &str, via: Node, extra: &[&str]) {
    cancel_at_with_disks(id, "shared:1", point, via, extra);
}

/// [`cancel_at`] with the guest's disks (`local:N` mirrors them first).
fn cancel_at_with_disks(id: &'static str, disks: &str, point: &str, via: Node, extra: &[&str]) {
    let Some(w) = FaultLab::boot_with_disks(id, disks, &format!("{point}=hold"), "") else { return };
    let boot_id = w.boot_id();
    if matches!(point, "source-after-stop" | "source-before-commit") {
        // The VM stopped and its routes moved before the cancel.
        w.paused_first();
    }
    let before = w.snapshot();
    let settings = w.migration_settings(Node::A).expect("the source QEMU's migration settings");
    let run = w.migrate_in_background(Node::A, extra);
    w.wait_held(point);
    let mid = w.migration_id(Node::A);
    let answer = std::thread::scope(|s| {
        // A cancel on the destination waits for the source's verdict: release while it waits.
        let h = s.spawn(|| w.cancel(via, &mid));
        if via == Node::A {
            let a = h.join().expect("cancel thread");
            w.release(point);
            a
        } else {
            w.release(point);
            h.join().expect("cancel thread")
        }
    });
    let run = run.join().expect("katactl thread");
    eprintln!("cancel at {point} through {via:?}: {answer:?}; katactl exit {:?}", run.code);
    match &answer {
        Ok(r) if r.cancelled => {
            assert_ne!(run.code, Some(0), "an accepted cancel: not a completed migration: {}", run.stdout);
            let what = format!("cancel at {point} through {via:?}");
            // Before the rollback checks: with local disks they stop the source QEMU at the end.
            w.assert_migration_settings(Node::A, &settings, &what);
            w.assert_rolled_back(&before, &boot_id, &what);
        }
        // The destination passes the cancel to the source, which takes messages in order: a
        // vote already on its way commits first, and the cancel is then refused. Both sides
        // agree either way; only a refusal that still rolled back (or the reverse) is wrong.
        Err(e) if via == Node::B && e.contains("FAILED_PRECONDITION") => {
            assert_eq!(run.code, Some(0), "a refused cancel: the migration completes: {}", run.stderr);
            assert_eq!(w.status(Node::B).as_deref(), Some("running"), "the VM runs on node-b");
            assert_eq!(w.status(Node::A).as_deref(), Some("postmigrate"), "and only there");
            assert_eq!(w.boot_id(), boot_id, "the same guest");
        }
        other => panic!("the cancel at {point} through {via:?} is answered with the outcome: {other:?}"),
    }
    w.finish();
}

#[test]
fn lab_fault_cancel_through_the_source_after_the_stop_rolls_back() {
    cancel_at("fcs1", "source-after-stop", Node::A, &[]);
}

#[test]
fn lab_fault_cancel_through_the_destination_after_the_stop_rolls_back() {
    cancel_at("fcd1", "source-after-stop", Node::B, &[]);
}

#[test]
fn lab_fault_cancel_through_the_source_after_qemu_completed_rolls_back() {
    cancel_at("fcs2", "source-before-commit", Node::A, &[]);
}

#[test]
fn lab_fault_cancel_through_the_destination_after_qemu_completed_rolls_back() {
    cancel_at("fcd2", "source-before-commit", Node::B, &[]);
}

#[test]
fn lab_fault_panic_in_the_source_task_after_the_vote_rolls_back_both() {
    // The destination voted and waits in doubt when the source's task dies without a word: the
    // source's supervisor must tell it the abort, or its paused copy waits forever.
    let Some(w) = FaultLab::boot("fpv0", "source-voted=panic", "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("panicked") || run.stdout.contains("panicked"),
        "the failure names the panic: {}\n{}",
        run.stderr,
        run.stdout
    );
    w.paused_first();
    w.assert_rolled_back(&before, &boot_id, "panic in the source task after the vote");
    w.finish();
}

#[test]
fn lab_fault_source_agent_gone_before_its_control_stream_the_destination_gives_up_alone() {
    use std::time::{Duration, Instant};
    // node-a's agent stops (and stays away) while its migration prepares, before the control
    // stream reaches node-b: nobody tells node-b anything. Before its vote node-b may destroy its
    // copy, and does once no control stream came within its limit.
    let Some(mut w) = FaultLab::boot("fsg0", "source-preparing=hold", "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held("source-preparing");
    let stopped = Instant::now();
    w.engine.agent_mut(Node::A).stop(Duration::from_secs(5)).expect("node-a's agent stops");
    let limit = katamaran::migration::dest::CONNECT_LIMIT;
    let node_b_diff = || -> Vec<String> {
        w.snapshot().diff_from(&before).into_iter().filter(|d| d.contains("node-b")).collect()
    };
    let until = stopped + limit + Duration::from_secs(30);
    let mut node_b = node_b_diff();
    while !node_b.is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(250));
        node_b = node_b_diff();
    }
    eprintln!("measured: node-b gave up {:?} after the source agent stopped", stopped.elapsed());
    assert!(node_b.is_empty(), "node-b is back to its snapshot without a word from node-a:\n{node_b:#?}");
    assert!(
        stopped.elapsed() >= limit - Duration::from_secs(5),
        "not before its limit: {:?}",
        stopped.elapsed()
    );
    let run = run.join().expect("katactl thread");
    eprintln!("measured: katactl migrate ended {:?} after the source agent stopped", stopped.elapsed());
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    // node-a's agent comes back and rolls its side back from the journal.
    w.restart_agents("", "");
    w.assert_rolled_back(&before, &boot_id, "source agent gone before its control stream");
    w.finish();
}

#[test]
fn lab_refuses_to_take_over_an_address_of_a_pod_on_the_destination() {
    // node-b delivers the VM's address to a pod of its own: a move there would cut that pod off.
    // PrepareIncoming refuses before it creates anything. Two CNI shapes: a host route to the
    // pod's veth (calico), then a pod subnet behind a bridge where the address answers (flannel).
    let Some(w) = FaultLab::boot("fpo0", "", "") else { return };
    let boot_id = w.boot_id();
    let pod = katamaran_e2e::faults::POD.to_string();
    let exec = |args: &[&str]| w.lab.exec("node-b", args).expect("ip in node-b");
    let refused_naming = |link: &str| {
        let before = w.snapshot();
        let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
        assert_ne!(run.code, Some(0), "refused: {}", run.stdout);
        let said = format!("{}{}", run.stdout, run.stderr);
        assert!(
            said.contains(&format!("VM address {pod} belongs to a pod on this node")) && said.contains(link),
            "the refusal names the address and the pod's link {link}: {said}"
        );
        assert!(said.contains("FAILED_PRECONDITION") || said.contains("precondition"), "{said}");
        let diff = w.snapshot().diff_from(&before);
        assert!(diff.is_empty(), "nothing created or changed on either node:\n{}", diff.join("\n"));
        assert_eq!(w.status(Node::A).as_deref(), Some("running"), "the VM runs on node-a");
        assert_eq!(w.boot_id(), boot_id);
    };
    exec(&["ip", "link", "add", "kpodb0", "type", "veth", "peer", "name", "kpodb1"]);
    exec(&["ip", "link", "set", "kpodb0", "up"]);
    exec(&["ip", "route", "replace", &format!("{pod}/32"), "dev", "kpodb0", "scope", "link"]);
    refused_naming("kpodb0");
    exec(&["ip", "link", "del", "kpodb0"]);

    exec(&["ip", "link", "add", "kbrb0", "type", "bridge"]);
    exec(&["ip", "link", "set", "kbrb0", "up"]);
    exec(&["ip", "route", "replace", "10.244.1.0/24", "dev", "kbrb0", "scope", "link"]);
    exec(&[
        "ip",
        "neigh",
        "replace",
        &pod,
        "lladdr",
        "02:00:00:00:00:07",
        "dev",
        "kbrb0",
        "nud",
        "reachable",
    ]);
    refused_naming("kbrb0");
    exec(&["ip", "link", "del", "kbrb0"]);
    w.finish();
}

#[test]
fn lab_fault_panic_in_the_destination_task_rolls_back() {
    let Some(w) = FaultLab::boot("fpd0", "", "dest-receiving=panic") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    // The incoming QEMU keeps receiving until its task's unwind stops it: the source may reach
    // its switchover first.
    w.paused_if_the_source_stopped(&run);
    w.assert_rolled_back(&before, &boot_id, "panic in the destination task");
    w.finish();
}

#[test]
fn lab_fault_destination_agent_crash_in_ram_rolls_back_on_restart() {
    let Some(mut w) = FaultLab::boot("fdr0", "", "dest-receiving=hold") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &["--bandwidth", "4M"]);
    w.wait_held("dest-receiving");
    w.engine.crash_and_restart(&w.lab, Node::B).expect("node-b's agent restarts");
    let run = run.join().expect("katactl thread");
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    // Its QEMU outlives the agent and keeps receiving: the source may reach its switchover
    // before the restarted agent destroys that copy.
    w.paused_if_the_source_stopped(&run);
    w.assert_rolled_back(&before, &boot_id, "destination agent killed in RAM");
    w.finish();
}

/// The incoming QEMU killed after the destination voted: the one loss the protocol cannot
/// prevent (docs/ENGINE.md, "What each side does on every failure"). The vote is the
/// destination's promise; the source commits on it and, having handed over, never resumes,
/// whatever became of the copy it handed to. The move is not reported as a success.
#[test]
fn lab_fault_destination_qemu_killed_after_the_vote_the_source_never_resumes() {
    let Some(w) = FaultLab::boot("fdq2", "", "dest-after-vote=hold") else { return };
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held("dest-after-vote");
    w.kill_incoming_qemu();
    w.paused_first();
    w.release("dest-after-vote");
    let run = run.join().expect("katactl thread");
    eprintln!("katactl after the incoming QEMU died past the vote: exit {:?}\n{}", run.code, run.stderr);
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    assert_eq!(w.status(Node::A).as_deref(), Some("postmigrate"), "the source handed over: it never resumes");
    assert_ne!(w.status(Node::B).as_deref(), Some("running"), "and the killed copy does not run");
    w.finish();
}

/// The incoming QEMU killed while the source sits stopped at its switchover. The destination is
/// held before its vote as well: QEMU's stop-and-copy goes on while the source is held, and on
/// QEMU 10.0 the destination has loaded and voted within 42 ms of the stop, after which a dead
/// incoming QEMU is the one loss the protocol cannot prevent (docs/ENGINE.md, "What each side
/// does on every failure"): the kill must land before the vote for this case to be the one named.
#[test]
fn lab_fault_destination_qemu_killed_with_the_source_stopped_before_the_vote_rolls_back() {
    incoming_qemu_killed_before_the_vote(
        "fdq1",
        Some("source-after-stop"),
        "destination QEMU killed with the source stopped, before the vote",
    );
}

#[test]
fn lab_fault_cancel_in_forwarding_is_refused_and_the_vm_stays_moved() {
    let Some(w) = FaultLab::boot("fcf0", "", "") else { return };
    let boot_id = w.boot_id();
    let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(run.code, Some(0), "the move completes: {}", run.stderr);
    let id = w.migration_id(Node::A);
    let via_source = w.cancel(Node::A, &id);
    let via_dest = w.cancel(Node::B, &id);
    eprintln!("cancel in forwarding: source {via_source:?}, destination {via_dest:?}");
    assert!(
        matches!(&via_source, Err(e) if e.contains("FAILED_PRECONDITION")),
        "the source refuses: {via_source:?}"
    );
    assert!(matches!(&via_dest, Ok(r) if !r.cancelled), "the destination has ended: {via_dest:?}");
    assert_eq!(w.status(Node::B).as_deref(), Some("running"));
    assert_eq!(w.status(Node::A).as_deref(), Some("postmigrate"));
    assert_eq!(w.boot_id(), boot_id);
    w.finish();
}

/// The link between the nodes cut while the source is held at `point`, restored after the
/// migration ended: before the commit both sides give up within the heartbeat's limit and the
/// source runs the same guest; nothing is left on node-b.
fn link_cut_at(id: &'static str, disks: &str, point: &str) {
    let Some(w) = FaultLab::boot_with_disks(id, disks, &format!("{point}=hold"), "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held(point);
    if point == "source-pre-switchover" {
        // QEMU pauses the guest at pre-switchover.
        w.paused_first();
    }
    let started = std::time::Instant::now();
    let run = {
        let _cut = katamaran_e2e::faults::LinkCut::cut(&w.lab);
        w.release(point);
        run.join().expect("katactl thread")
    };
    eprintln!("measured [link cut at {point}]: the migration ended {:?} after the cut", started.elapsed());
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    w.assert_rolled_back(&before, &boot_id, &format!("link cut at {point}"));
    w.finish();
}

#[test]
fn lab_fault_link_cut_in_ram_rolls_back() {
    link_cut_at("flr0", "shared:1", "source-ram");
}

#[test]
fn lab_fault_link_cut_at_pre_switchover_rolls_back() {
    link_cut_at("fls0", "local:1", "source-pre-switchover");
}

#[test]
fn lab_fault_cancel_through_the_destination_while_it_prepares_rolls_back() {
    let Some(w) = FaultLab::boot("fcp0", "", "dest-preparing=hold") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &[]);
    w.wait_held("dest-preparing");
    // The incoming QEMU exists by now: the cancel has a sandbox to undo.
    let id = w.migration_id(Node::B);
    let cancel = w.cancel(Node::B, &id);
    w.release("dest-preparing");
    let run = run.join().expect("katactl thread");
    eprintln!("cancel while preparing: {cancel:?}; katactl exit {:?}: {}", run.code, run.stderr.trim());
    assert!(matches!(&cancel, Ok(r) if r.cancelled), "a cancel before the commit is accepted: {cancel:?}");
    assert_ne!(run.code, Some(0), "the migration never started: {}", run.stdout);
    assert!(run.stderr.contains("cancel"), "katactl says it was cancelled: {}", run.stderr);
    assert!(
        w.engine.list_migrations(Node::A).expect("ListMigrations").is_empty(),
        "the source was never asked to start"
    );
    w.assert_rolled_back(&before, &boot_id, "cancel through the destination while it prepares");
    w.finish();
}

#[test]
fn lab_fault_rollback_on_the_node_the_vm_left_puts_its_forward_back() {
    // After a first move node-a forwards the VM's address to node-b. A move back that fails on
    // node-a (a panic in its destination task) must leave that forward as it was: the route
    // its incoming sandbox replaced comes back, or the VM becomes unreachable through node-a.
    let Some(w) = FaultLab::boot("frf0", "dest-receiving=panic", "") else { return };
    let boot_id = w.boot_id();
    let first = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(first.code, Some(0), "the first move completes: {}", first.stderr);
    w.wait_running(Node::B, std::time::Duration::from_secs(10));
    let before = Snapshot::take(&w.lab, &[]).expect("snapshot");
    let back = w.migrate_in_background(Node::B, &[]).join().expect("katactl thread");
    assert_ne!(back.code, Some(0), "the move back fails: {}", back.stdout);
    w.wait_running(Node::B, std::time::Duration::from_secs(30));
    assert_eq!(w.status(Node::B).as_deref(), Some("running"), "the VM runs on node-b again");
    assert_ne!(w.status(Node::A).as_deref(), Some("running"), "and only there");
    assert_eq!(w.boot_id(), boot_id, "the same guest");
    let (diff, settled) =
        agents::wait_unchanged(&w.lab, &before, &[], std::time::Duration::from_secs(30)).expect("snapshot");
    eprintln!("measured [rollback on the node the VM left]: back to the snapshot {settled:?} after the end");
    assert!(
        diff.is_empty(),
        "node-a's forward and everything else as before the move back:\n{}",
        diff.join("\n")
    );
    w.finish();
}

#[test]
fn lab_forward_stays_until_released_or_taken_over() {
    use katamaran_protos::v1::Phase;
    use std::time::Duration;
    let Some(w) = FaultLab::boot("ffw0", "", "") else { return };
    let boot_id = w.boot_id();
    let first = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(first.code, Some(0), "the move completes: {}", first.stderr);
    let id = w.migration_id(Node::A);
    // No idle timeout: the forward is node-a's only path to the VM and stays, quiet or not.
    std::thread::sleep(Duration::from_secs(3));
    let m = w.wait_phase(Node::A, &id, Phase::PHASE_FORWARDING, Duration::ZERO);
    assert_eq!(m.phase.enum_value_or_default(), Phase::PHASE_FORWARDING, "node-a still forwards");
    assert!(!w.pod_routes("node-a").is_empty(), "node-a routes the VM's address to node-b");
    // Released: the route goes, the migration completes.
    w.release_forward(Node::A, &id).expect("ReleaseForward");
    assert_eq!(w.pod_routes("node-a"), "", "the forward's route is gone once ReleaseForward returns");
    let m = w.wait_phase(Node::A, &id, Phase::PHASE_COMPLETED, Duration::from_secs(5));
    assert_eq!(m.phase.enum_value_or_default(), Phase::PHASE_COMPLETED, "{m:?}");
    let again = w.release_forward(Node::A, &id);
    assert!(matches!(&again, Err(e) if e.contains("FAILED_PRECONDITION")), "{again:?}");
    let unknown = w.release_forward(Node::A, "mig-000000000000");
    assert!(matches!(&unknown, Err(e) if e.contains("NOT_FOUND")), "{unknown:?}");

    // Back to node-a; node-b now forwards. A CNI that learned the move withdraws node-b's
    // route: the forward sees it and ends by itself.
    let back = w.migrate_in_background(Node::B, &[]).join().expect("katactl thread");
    assert_eq!(back.code, Some(0), "the move back completes: {}", back.stderr);
    assert_eq!(w.boot_id(), boot_id, "the same guest answers on node-a");
    let id_b = w.migration_id(Node::B);
    assert!(!w.pod_routes("node-b").is_empty(), "node-b forwards");
    w.lab
        .exec("node-b", &["ip", "route", "del", &format!("{}/32", katamaran_e2e::faults::POD)])
        .expect("withdraw");
    let m = w.wait_phase(Node::B, &id_b, Phase::PHASE_COMPLETED, Duration::from_secs(10));
    assert_eq!(m.phase.enum_value_or_default(), Phase::PHASE_COMPLETED, "the forward ended by itself: {m:?}");
    assert!(m.last_event.message.contains("taken over"), "{:?}", m.last_event.message);
    w.finish();
}

#[test]
fn lab_remove_incoming_stops_the_vm_and_leaves_nothing_on_the_node() {
    let Some(w) = FaultLab::boot_with_disks("frm0", "local:1", "", "") else { return };
    let before = Snapshot::take(&w.lab, &[]).expect("snapshot");
    let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(run.code, Some(0), "the move completes: {}", run.stderr);
    assert_eq!(w.status(Node::B).as_deref(), Some("running"));
    let pid = agents::incoming_qemu_pid(&w.lab, Node::B, w.id).expect("the incoming QEMU runs");
    let disks = agents::incoming_disks_dir(&w.lab, Node::B, w.id);
    assert!(disks.is_dir(), "local disks live under the state directory: {}", disks.display());
    let id = w.migration_id(Node::A);
    assert!(!w.pod_routes("node-a").is_empty(), "node-a forwards to node-b");
    let removed = w.remove_incoming(Node::B).expect("RemoveIncoming");
    let removed_at = std::time::Instant::now();
    eprintln!("removed: {removed}");
    assert!(agents::wait_for_exit(pid, std::time::Duration::from_secs(10)).is_ok(), "QEMU stopped");
    assert_eq!(w.status(Node::B), None, "node-b no longer knows the sandbox");
    assert!(!disks.exists(), "its disks are gone");
    assert!(!agents::incoming_dir(&w.lab, Node::B, w.id).exists(), "its directory is gone");
    let after = Snapshot::take(&w.lab, &[]).expect("snapshot");
    let left: Vec<String> = after.diff_from(&before).into_iter().filter(|d| d.contains("node-b")).collect();
    assert!(left.is_empty(), "node-b is as before the move:\n{}", left.join("\n"));
    let again = w.remove_incoming(Node::B);
    assert!(matches!(&again, Err(e) if e.contains("NOT_FOUND")), "{again:?}");
    // node-a's forward led to a VM that no longer exists: node-b says so when asked, and the
    // forward ends by itself.
    forward_ends_because_the_vm_stopped(&w, &id, removed_at);
    w.finish();
}

/// Waits for node-a's forward of `id` to end because the VM stopped on node-b, and checks that
/// its route is gone.
fn forward_ends_because_the_vm_stopped(w: &FaultLab, id: &str, since: std::time::Instant) {
    use katamaran_protos::v1::Phase;
    let m = w.wait_phase(Node::A, id, Phase::PHASE_COMPLETED, std::time::Duration::from_secs(20));
    assert_eq!(m.phase.enum_value_or_default(), Phase::PHASE_COMPLETED, "the forward ended: {m:?}");
    assert!(
        m.last_event.message.contains("stopped on the destination"),
        "it ended because the VM stopped: {:?}",
        m.last_event.message
    );
    eprintln!("measured: node-a's forward ended {:?} after the VM stopped on node-b", since.elapsed());
    assert_eq!(w.pod_routes("node-a"), "", "node-a no longer routes the VM's address");
}

#[test]
fn lab_forward_ends_when_the_vm_stops_on_the_destination_across_agent_restarts() {
    use katamaran_protos::v1::Phase;
    use std::time::Duration;
    let Some(mut w) = FaultLab::boot("fvs0", "", "") else { return };
    let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(run.code, Some(0), "the move completes: {}", run.stderr);
    let id = w.migration_id(Node::A);
    // Both agents restart: node-a watches its forward again and asks from its journal; node-b
    // answers from its own.
    for node in [Node::A, Node::B] {
        w.engine.crash_and_restart(&w.lab, node).expect("the agent restarts");
    }
    // The VM runs on node-b: asked several times over, node-b says so and the forward stays.
    std::thread::sleep(katamaran::migration::vm_status::ASK_EVERY * 3);
    let m = w.wait_phase(Node::A, &id, Phase::PHASE_FORWARDING, Duration::ZERO);
    assert_eq!(
        m.phase.enum_value_or_default(),
        Phase::PHASE_FORWARDING,
        "a running VM keeps its forward: {m:?}"
    );
    assert!(!w.pod_routes("node-a").is_empty(), "node-a still forwards");
    // The VM stops on node-b (QEMU gone, as after a guest poweroff or a crash).
    w.kill_incoming_qemu();
    forward_ends_because_the_vm_stopped(&w, &id, std::time::Instant::now());
    w.remove_incoming(Node::B).expect("RemoveIncoming of the stopped sandbox");
    w.finish();
}

#[test]
fn lab_fault_cancel_through_the_source_in_ram_rolls_back() {
    cancel_at("fcs0", "source-ram", Node::A, &["--bandwidth", "4M"]);
}

#[test]
fn lab_fault_cancel_through_the_source_in_storage_rolls_back() {
    cancel_at_with_disks("fcs3", "local:1", "source-storage", Node::A, &[]);
}

#[test]
fn lab_fault_cancel_through_the_destination_in_storage_rolls_back() {
    cancel_at_with_disks("fcd3", "local:1", "source-storage", Node::B, &[]);
}

#[test]
fn lab_fault_destination_qemu_killed_in_pre_copy_rolls_back() {
    let Some(w) = FaultLab::boot("fdq0", "source-ram=hold", "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &["--bandwidth", "4M"]);
    w.wait_held("source-ram");
    w.kill_incoming_qemu();
    w.release("source-ram");
    let run = run.join().expect("katactl thread");
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    w.assert_rolled_back(&before, &boot_id, "destination QEMU killed in pre-copy");
    w.finish();
}

#[test]
fn lab_fault_source_agent_crash_in_ram_rolls_back_on_restart() {
    let Some(mut w) = FaultLab::boot("fsk1", "source-ram=hold", "") else { return };
    let boot_id = w.boot_id();
    let before = w.snapshot();
    let run = w.migrate_in_background(Node::A, &["--bandwidth", "4M"]);
    w.wait_held("source-ram");
    w.engine.crash_and_restart(&w.lab, Node::A).expect("node-a's agent restarts");
    let run = run.join().expect("katactl thread");
    assert_ne!(run.code, Some(0), "not a completed migration: {}", run.stdout);
    w.assert_rolled_back(&before, &boot_id, "source agent killed in RAM");
    w.finish();
}

#[test]
fn lab_fault_agents_killed_in_forwarding_keep_the_moved_vm_and_the_forward() {
    use katamaran_protos::v1::Phase;
    use std::time::Duration;
    let Some(mut w) = FaultLab::boot("fkf0", "", "") else { return };
    let boot_id = w.boot_id();
    let run = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(run.code, Some(0), "the move completes: {}", run.stderr);
    let id = w.migration_id(Node::A);
    let route = w.pod_routes("node-a");
    assert!(!route.is_empty(), "node-a forwards");
    for node in [Node::A, Node::B] {
        w.engine.crash_and_restart(&w.lab, node).expect("the agent restarts");
    }
    assert_eq!(w.status(Node::B).as_deref(), Some("running"), "the VM outlived node-b's agent");
    assert_ne!(w.status(Node::A).as_deref(), Some("running"), "and runs only there");
    assert_eq!(w.boot_id(), boot_id, "the same guest");
    assert_eq!(w.pod_routes("node-a"), route, "node-a's forward outlived its agent");
    // The restarted agent watches the forward again: it still lists it, and releases it.
    let m = w.wait_phase(Node::A, &id, Phase::PHASE_FORWARDING, Duration::ZERO);
    assert_eq!(m.phase.enum_value_or_default(), Phase::PHASE_FORWARDING, "{m:?}");
    w.release_forward(Node::A, &id).expect("ReleaseForward after the restart");
    assert_eq!(w.pod_routes("node-a"), "", "released");
    let m = w.wait_phase(Node::A, &id, Phase::PHASE_COMPLETED, Duration::from_secs(5));
    assert_eq!(m.phase.enum_value_or_default(), Phase::PHASE_COMPLETED, "{m:?}");
    let b = w.wait_phase(Node::B, &id, Phase::PHASE_COMPLETED, Duration::ZERO);
    assert_eq!(
        b.phase.enum_value_or_default(),
        Phase::PHASE_COMPLETED,
        "node-b lists the completed move: {b:?}"
    );
    w.finish();
}

#[test]
fn lab_fault_source_agent_crash_after_the_commit_still_frees_the_sandbox_for_a_move_back() {
    use std::time::{Duration, Instant};
    // node-b runs the VM in a sandbox it received; its agent dies right after committing the
    // move back to node-a. The restarted agent re-delivers the commit and, once node-a
    // confirms, removes the husk it was left with: the VM can come back to node-b later.
    let Some(mut w) = FaultLab::boot("fkc0", "", "source-after-commit=hold") else { return };
    let boot_id = w.boot_id();
    let first = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(first.code, Some(0), "the first move completes: {}", first.stderr);
    let back = w.migrate_in_background(Node::B, &[]);
    w.wait_held("source-after-commit");
    w.engine.crash_and_restart(&w.lab, Node::B).expect("node-b's agent restarts");
    let _ = back.join().expect("katactl thread");
    w.wait_running(Node::A, Duration::from_secs(30));
    assert_eq!(w.status(Node::A).as_deref(), Some("running"), "the committed move completed");
    assert_eq!(w.boot_id(), boot_id, "the same guest");
    let husk = agents::incoming_dir(&w.lab, Node::B, w.id);
    let until = Instant::now() + Duration::from_secs(30);
    while husk.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!husk.exists(), "node-b removed the sandbox the VM left: {}", husk.display());
    let again = w.migrate_in_background(Node::A, &[]).join().expect("katactl thread");
    assert_eq!(again.code, Some(0), "the VM moves to node-b again: {}", again.stderr);
    assert_eq!(w.status(Node::B).as_deref(), Some("running"));
    w.finish();
}
