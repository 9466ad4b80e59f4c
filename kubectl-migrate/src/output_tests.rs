#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use katamaran::migration::options::TunnelMode;

use super::*;
use crate::orchestrate::{Route, Tracker};
use crate::resolve::PodFacts;

const MS: u64 = 1_000_000;

fn ev(phase: pb::Phase, at_ms: u64) -> pb::MigrationEvent {
    let mut e = pb::MigrationEvent::new();
    e.phase = phase.into();
    e.timestamp_unix_nanos = 1_700_000_000_000 * MS + at_ms * MS;
    e
}

#[test]
fn phase_times_follow_the_timestamps() {
    use pb::Phase::*;
    let events = [
        ev(PHASE_PREPARING, 0),
        ev(PHASE_STORAGE, 12),
        ev(PHASE_STORAGE, 500),
        ev(PHASE_RAM, 1012),
        ev(PHASE_CUTOVER, 4412),
        ev(PHASE_FORWARDING, 4592),
    ];
    let t = phase_times(&events);
    let got: Vec<(&str, Option<f64>)> = t.iter().map(|p| (p.phase, p.duration_ms)).collect();
    assert_eq!(
        got,
        [
            ("preparing", Some(12.0)),
            ("storage", Some(1000.0)),
            ("ram", Some(3400.0)),
            ("cutover", Some(180.0)),
            ("forwarding", None)
        ]
    );
    let mut done = events.to_vec();
    done.push(ev(PHASE_COMPLETED, 34592));
    assert_eq!(
        phase_times(&done).last().unwrap().duration_ms,
        Some(30000.0),
        "the terminal event closes the last phase"
    );
    // Unknown phases and missing timestamps do not invent durations.
    let mut odd = pb::MigrationEvent::new();
    odd.phase = katamaran_protos::protobuf::EnumOrUnknown::from_i32(42);
    let t = phase_times(&[
        pb::MigrationEvent { timestamp_unix_nanos: 0, ..ev(PHASE_RAM, 0) },
        odd,
        ev(PHASE_CUTOVER, 5),
    ]);
    assert_eq!(t[0].duration_ms, None);
}

#[test]
fn units_read_naturally() {
    assert_eq!(bytes(512), "512 B");
    assert_eq!(bytes(1536), "1.5 KiB");
    assert_eq!(bytes(3 << 30), "3.0 GiB");
    assert_eq!(human(Duration::from_micros(87)), "87 µs");
    assert_eq!(human(Duration::from_micros(12_340)), "12.3 ms");
    assert_eq!(human(Duration::from_millis(5120)), "5.12 s");
    assert_eq!(human(Duration::from_secs(123)), "2m 03s");
    assert_eq!(compact(Duration::from_millis(25)), "25ms");
    assert_eq!(compact(Duration::from_millis(1500)), "1500ms");
    assert_eq!(compact(Duration::from_secs(30)), "30s");
    assert_eq!(compact(Duration::from_secs(1800)), "30m");
    assert_eq!(compact(Duration::from_secs(7200)), "2h");
    assert_eq!(compact(Duration::from_micros(100)), "100us");
}

#[test]
fn lines_print_phase_changes_and_throttle_progress() {
    use pb::Phase::*;
    let mut lines = Lines::new(Vec::new());
    let t0 = Instant::now();
    let mut ram = ev(PHASE_RAM, 0);
    let r = ram.ram.mut_or_insert_default();
    r.transferred_bytes = 512 << 20;
    r.total_bytes = 2 << 30;
    r.throughput_bytes_per_second = 120 << 20;
    r.expected_downtime_ms = 18;
    r.iteration = 3;
    lines.event_at(Side::Source, &ev(PHASE_PREPARING, 0), t0);
    lines.event_at(Side::Source, &ram, t0);
    lines.event_at(Side::Source, &ram, t0 + Duration::from_millis(500));
    lines.event_at(Side::Destination, &ev(PHASE_RAM, 0), t0 + Duration::from_millis(500));
    lines.event_at(Side::Source, &ram, t0 + Lines::<Vec<u8>>::PROGRESS_EVERY);
    let out = String::from_utf8(lines.into_inner()).unwrap();
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), 4, "{out}");
    assert_eq!(got[0].trim_end(), "source      preparing");
    assert_eq!(
        got[1],
        "source      ram        512.0 MiB of 2.0 GiB sent, 120.0 MiB/s, 0 dirty pages/s, pass 3, expected downtime 18 ms"
    );
    assert!(got[2].starts_with("destination ram"));
    assert_eq!(got[3], got[1], "repeated once the interval passed");
}

#[test]
fn a_failure_line_carries_the_error() {
    let mut e = ev(pb::Phase::PHASE_FAILED, 0);
    e.message = "migration failed".into();
    e.result.mut_or_insert_default().error_message = "QEMU exited with status 1".into();
    assert_eq!(describe(&e), "migration failed; QEMU exited with status 1");
}

fn resolved() -> Resolved {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    Resolved {
        pod: PodFacts {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "uid-1".into(),
            node: "node-a".into(),
            ips: vec![ip("10.244.1.7")],
            runtime_class: "kata-katamaran".into(),
        },
        source: NodeEnd { node: "node-a".into(), address: ip("192.0.2.1"), agent_pod: "agent-a".into() },
        destination: NodeEnd { node: "node-b".into(), address: ip("192.0.2.2"), agent_pod: "agent-b".into() },
    }
}

fn plan() -> Plan {
    let mut sandbox = pb::Sandbox::new();
    sandbox.id = "3f2a9c".into();
    Plan {
        route: Route::of(&resolved()),
        options: MigrationOptions::default(),
        sandbox,
        migration_id: "mig-0123456789ab".into(),
    }
}

fn completed_report() -> Report {
    use pb::Phase::*;
    let mut t = Tracker::new(false);
    let mut seq = 0;
    let mut feed = |t: &mut Tracker, side, mut e: pb::MigrationEvent| {
        seq += 1;
        e.sequence = seq;
        t.on_event(side, e);
    };
    for (p, at) in [(PHASE_PREPARING, 0), (PHASE_RAM, 10), (PHASE_CUTOVER, 3010)] {
        feed(&mut t, Side::Source, ev(p, at));
    }
    let mut fwd = ev(PHASE_FORWARDING, 3190);
    let c = fwd.cutover.mut_or_insert_default();
    c.route_swap_latency_nanos = 104_000;
    c.downtime_ms = 115;
    feed(&mut t, Side::Source, fwd);
    for (p, at) in [(PHASE_PREPARING, 0), (PHASE_RAM, 250), (PHASE_CUTOVER, 3010)] {
        feed(&mut t, Side::Destination, ev(p, at));
    }
    let mut done = ev(PHASE_COMPLETED, 3185);
    done.cutover.mut_or_insert_default().plug_release_latency_nanos = 87_000;
    let r = done.result.mut_or_insert_default();
    r.success = true;
    r.downtime_ms = 115;
    r.plug_dropped_packets = 0;
    feed(&mut t, Side::Destination, done);
    assert!(t.done());
    Report {
        migration_id: "mig-0123456789ab".into(),
        sandbox_id: "3f2a9c".into(),
        destination_sandbox_id: Some("3f2a9c-incoming".into()),
        source_address: "192.0.2.1".into(),
        destination_address: Some("192.0.2.2".into()),
        outcome: t.outcome(),
        tracker: t,
        events: Vec::new(),
        elapsed: Duration::from_millis(3300),
    }
}

#[test]
fn the_summary_has_the_figures_a_person_checks() {
    let s = summarize(&resolved(), &plan(), &completed_report());
    assert_eq!(s.result, "succeeded");
    assert_eq!(s.error, None);
    assert_eq!(s.downtime_ms, Some(115));
    assert_eq!(s.stop_to_route_swap_ns, Some(104_000));
    assert_eq!(s.resume_to_plug_release_ns, Some(87_000));
    assert_eq!(s.plug_dropped_packets, Some(0));
    assert_eq!(s.total_ms, 3300);
    assert!(s.notes.iter().any(|n| n.contains("keeps forwarding")), "{:?}", s.notes);

    let text = render_text(&s);
    let want = [
        "Migration mig-0123456789ab of shop/web-0: node-a (192.0.2.1) → node-b (192.0.2.2)",
        "PHASE        SOURCE       DESTINATION",
        "preparing    10.0 ms      250.0 ms",
        "ram          3.00 s       2.76 s",
        "cutover      180.0 ms     175.0 ms",
        "forwarding   running      -",
        "QEMU downtime           115 ms",
        "STOP → route swap       104 µs",
        "RESUME → plug release   87 µs",
        "plug drops              0 packets",
        "total                   3.30 s",
        "result                  succeeded",
    ];
    for line in want {
        assert!(text.lines().any(|l| l.trim_end() == line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("storage"), "no storage row when no side had that phase:\n{text}");

    let json: serde_json::Value = serde_json::to_value(&s).unwrap();
    assert_eq!(json["result"], "succeeded");
    assert_eq!(json["phases"]["destination"][2]["phase"], "cutover");
    assert_eq!(json["phases"]["destination"][2]["durationMs"], 175.0);
    assert_eq!(json["options"]["downtimeLimitMs"], 25);
    assert_eq!(json["options"]["tunnelMode"], "auto");
    assert_eq!(json["source"]["agentPod"], "agent-a");
}

#[test]
fn a_failure_names_the_side_and_kind() {
    let mut r = completed_report();
    r.outcome =
        Outcome::Failed { side: Some(Side::Destination), kind: "QEMU".into(), message: "QEMU exited".into() };
    let s = summarize(&resolved(), &plan(), &r);
    assert_eq!(s.result, "failed");
    assert!(render_text(&s).contains("result                  failed on the destination (QEMU): QEMU exited"));
    assert!(!s.notes.iter().any(|n| n.contains("keeps forwarding")));
}

#[test]
fn the_plan_shows_nodes_agents_sandbox_and_options() {
    let mut sb = pb::Sandbox::new();
    sb.id = "3f2a9c".into();
    sb.qemu_version = "7.2.0".into();
    sb.qemu_status = "running".into();
    let mut d = pb::Disk::new();
    d.drive_id = "drive-0".into();
    sb.disks.push(d);
    let o = MigrationOptions {
        tunnel_mode: TunnelMode::Auto,
        max_bandwidth: Some(1 << 30),
        ..Default::default()
    };
    let text = render_plan_text(&resolved(), &o, Ok(&sb));
    for want in [
        "Dry run: nothing was changed.",
        "pod:           shop/web-0 (uid uid-1)",
        "sandbox:       3f2a9c (QEMU 7.2.0, running; drive-0)",
        "source:        node-a 192.0.2.1 via agent agent-a",
        "destination:   node-b 192.0.2.2 via agent agent-b",
        "downtime 25ms",
        "bandwidth 1.0 GiB/s",
        "tunnel auto → ipip kept until its route is taken over or released",
        "storage timeout 30m",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let idle = MigrationOptions { tunnel_idle_timeout: std::time::Duration::from_secs(30), ..o.clone() };
    let text = render_plan_text(&resolved(), &idle, Ok(&sb));
    assert!(text.contains("tunnel auto → ipip removed after 30s idle"), "{text}");
    let text = render_plan_text(&resolved(), &o, Err("agent unreachable"));
    assert!(text.contains("sandbox:       unknown (agent unreachable)"), "{text}");
    let json = serde_json::to_value(plan_view(&resolved(), &o, Err("x"))).unwrap();
    assert_eq!(json["dryRun"], true);
    assert_eq!(json["sandbox"], serde_json::Value::Null);
    assert_eq!(json["sandboxError"], "x");
    assert_eq!(json["options"]["bandwidthBytesPerSecond"], 1u64 << 30);
}
