//! The probe against in-process UDP echoes on loopback: pacing at 5000 pps, exact counts of
//! injected faults, the ready handshake and every way a run stops.

mod echo;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use echo::{Echo, Faults};
use katamaran_probe::{run, LossRun, ProbeConfig, ProbeError, Report, StopReason};
use katamaran_test_skip::{skip, Tier};

/// Waits for `cond` with a deadline; panics with `what` when it never holds.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sustains_5000_pps_for_2s_without_loss() {
    let echo = Echo::faithful();
    let mut cfg = ProbeConfig::new(echo.addr);
    cfg.rate = 5000;
    cfg.duration = Duration::from_secs(2);
    cfg.grace = Duration::from_millis(500);
    let r = run(&cfg).expect("probe run");
    eprintln!("{r}");
    assert_eq!(r.sent, 10_000);
    assert_eq!((r.received, r.lost, r.duplicated, r.reordered), (10_000, 0, 0, 0));
    assert!(r.loss_timeline.is_empty());
    assert_eq!(r.stop_reason, StopReason::Duration);
    // Seq 9999 is due at 1999.8 ms; pacing that fell behind would push the last send later.
    assert!((1999.0..2050.0).contains(&r.duration_ms), "duration {} ms", r.duration_ms);
    let achieved = r.sent as f64 / (r.duration_ms / 1e3);
    assert!((achieved - 5000.0).abs() < 5000.0 * 0.02, "achieved {achieved:.0} pps");
    assert!(r.rtt_ms.p50 > 0.0 && r.rtt_ms.max >= r.rtt_ms.p99);
    assert_eq!(r.foreign, 0);
}

#[test]
fn injected_faults_are_counted_exactly() {
    let faults = Faults {
        drop: Some(100..=149),
        duplicate: BTreeSet::from([10, 500, 900]),
        reorder: BTreeSet::from([300, 700]),
        ignore_first: 0,
    };
    let echo = Echo::start("127.0.0.1:0", faults);
    let mut cfg = ProbeConfig::new(echo.addr);
    cfg.rate = 2000;
    cfg.count = Some(1000);
    cfg.grace = Duration::from_millis(300);
    let r = run(&cfg).expect("probe run");
    eprintln!("{r}");
    assert_eq!(r.stop_reason, StopReason::Count);
    assert_eq!((r.sent, r.received, r.lost, r.duplicated, r.reordered), (1000, 950, 50, 3, 2));
    assert_eq!(r.loss_timeline.len(), 1);
    let LossRun { first_seq, last_seq, start_ms, end_ms } = r.loss_timeline[0].clone();
    assert_eq!((first_seq, last_seq), (100, 149));
    // Sent every 0.5 ms from t0: seq 100 at ~50 ms, seq 149 at ~74.5 ms.
    assert!((50.0..60.0).contains(&start_ms), "start {start_ms}");
    assert!((74.5..85.0).contains(&end_ms), "end {end_ms}");
    // No reply between seq 99 and seq 150: the gap spans at least the lost run's send times
    // (51 intervals of 0.5 ms on a quiet machine; a loaded one sends late and bunches them).
    assert!(
        r.longest_gap_ms >= end_ms - start_ms,
        "gap {} ms, lost run {start_ms}..{end_ms} ms",
        r.longest_gap_ms
    );
}

#[test]
fn ipv6_targets_work() {
    let Ok(probe) = UdpSocket::bind("[::1]:0") else {
        skip(Tier::Ipv6, "no IPv6 loopback on this machine");
        return;
    };
    drop(probe);
    let echo = Echo::start("[::1]:0", Faults::default());
    let mut cfg = ProbeConfig::new(echo.addr);
    cfg.count = Some(300);
    cfg.grace = Duration::from_millis(200);
    let r = run(&cfg).expect("probe run");
    assert_eq!(r.target, echo.addr.to_string());
    assert!(r.target.starts_with("[::1]:"));
    assert_eq!((r.sent, r.received, r.lost), (300, 300, 0));
}

#[test]
fn wait_ready_rides_out_an_echo_that_is_still_booting() {
    let echo = Echo::start("127.0.0.1:0", Faults { ignore_first: 5, ..Faults::default() });
    let mut cfg = ProbeConfig::new(echo.addr);
    cfg.count = Some(200);
    cfg.grace = Duration::from_millis(200);
    cfg.wait_ready = Some(Duration::from_secs(10));
    let r = run(&cfg).expect("probe run");
    let ready = r.ready_ms.expect("ready_ms is reported with wait_ready");
    // Five ignored handshakes at the 10 ms floor before the sixth is answered.
    assert!(ready >= 45.0, "ready after {ready} ms");
    assert_eq!((r.sent, r.received, r.lost), (200, 200, 0));
}

#[test]
fn wait_ready_gives_up_on_a_silent_target() {
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut cfg = ProbeConfig::new(silent.local_addr().expect("addr"));
    cfg.wait_ready = Some(Duration::from_millis(300));
    let started = Instant::now();
    match run(&cfg) {
        Err(ProbeError::NotReady { waited, .. }) => assert!(waited >= Duration::from_millis(300)),
        other => panic!("expected NotReady, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_stop_file_ends_the_run_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop_file = dir.path().join("stop");
    let echo = Echo::faithful();
    let mut cfg = ProbeConfig::new(echo.addr);
    cfg.duration = Duration::from_secs(60);
    cfg.grace = Duration::from_millis(200);
    cfg.stop_file = Some(stop_file.clone());
    let report = std::thread::scope(|s| {
        let probe = s.spawn(|| run(&cfg));
        wait_until("100 datagrams at the echo", Duration::from_secs(10), || {
            echo.seen.load(Ordering::Relaxed) >= 100
        });
        std::fs::write(&stop_file, b"").expect("create stop file");
        probe.join().expect("probe thread")
    })
    .expect("probe run");
    assert_eq!(report.stop_reason, StopReason::StopFile);
    assert!(report.sent >= 100 && report.sent < 30_000, "sent {}", report.sent);
    assert_eq!(report.lost, 0);
}

#[test]
fn the_stop_flag_ends_the_run_early() {
    let echo = Echo::faithful();
    let mut cfg = ProbeConfig::new(echo.addr);
    cfg.duration = Duration::from_secs(60);
    cfg.grace = Duration::from_millis(200);
    let stop = cfg.stop.clone();
    let report = std::thread::scope(|s| {
        let probe = s.spawn(|| run(&cfg));
        wait_until("50 datagrams at the echo", Duration::from_secs(10), || {
            echo.seen.load(Ordering::Relaxed) >= 50
        });
        stop.store(true, Ordering::Relaxed);
        probe.join().expect("probe thread")
    })
    .expect("probe run");
    assert_eq!(report.stop_reason, StopReason::Signal);
    assert_eq!(report.lost, 0);
}

/// Kills the child if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_stops_on_sigterm_and_writes_its_json_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let echo = Echo::faithful();
    let child = Command::new(env!("CARGO_BIN_EXE_katamaran-probe"))
        .args(["--target", &echo.addr.to_string(), "--rate", "500", "--duration", "60s", "--grace", "200ms"])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn probe");
    let mut child = Child(child);
    wait_until("50 datagrams at the echo", Duration::from_secs(10), || {
        echo.seen.load(Ordering::Relaxed) >= 50
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let mut status = None;
    wait_until("the probe to exit", Duration::from_secs(10), || {
        status = child.0.try_wait().expect("try_wait");
        status.is_some()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().expect("stderr"), &mut stderr).expect("stderr");
    assert!(status.expect("exited").success(), "stderr: {stderr}");
    assert!(stderr.contains("lost 0"), "summary on stderr: {stderr}");
    let report: Report =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).expect("json");
    assert_eq!(report.stop_reason, StopReason::Signal);
    assert!(report.sent >= 50);
    assert_eq!(report.lost, 0);
}

#[test]
fn the_binary_prints_json_on_stdout_and_fails_on_loss_when_asked() {
    let faults = Faults { drop: Some(5..=9), ..Faults::default() };
    let echo = Echo::start("127.0.0.1:0", faults);
    let out = Command::new(env!("CARGO_BIN_EXE_katamaran-probe"))
        .args(["--target", &echo.addr.to_string(), "--count", "40", "--rate", "1000", "--grace", "200ms"])
        .args(["--json", "-", "--fail-on-loss"])
        .output()
        .expect("run probe");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    for key in ["sent", "received", "lost", "duplicated", "reordered", "longest_gap_ms", "rtt_ms"] {
        assert!(v.get(key).is_some(), "report has {key}: {v}");
    }
    for key in ["loss_timeline", "duration_ms", "rate", "target"] {
        assert!(v.get(key).is_some(), "report has {key}: {v}");
    }
    assert_eq!(v["lost"], 5);
    assert_eq!(v["loss_timeline"][0]["first_seq"], 5);
    assert_eq!(v["loss_timeline"][0]["last_seq"], 9);
    for key in ["p50", "p99", "max"] {
        assert!(v["rtt_ms"][key].is_number());
    }
}

#[test]
fn the_binary_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_katamaran-probe"))
        .args(["--target", "127.0.0.1:7", "--duration", "ten"])
        .output()
        .expect("run probe");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));
}
