//! The QMP client against a real `qemu-system-x86_64` (TCG, no disk). Skips with a `skipped:`
//! line when QEMU is not installed.

mod support;

use std::time::Duration;

use katamaran::qmp::{
    ErrorClass, EventReceiver, MigrationCapability, MigrationStatus, QmpClient, QmpConfig, QmpEvent, RunState,
};
use support::qemu::Qemu;
use tokio::io::AsyncReadExt;

const EVENT_DEADLINE: Duration = Duration::from_secs(10);

async fn start() -> Option<(Qemu, QmpClient, EventReceiver)> {
    let mut qemu = Qemu::launch(&[])?;
    qemu.wait_for_qmp().await;
    let (qmp, events) = QmpClient::connect(qemu.qmp_path(), &QmpConfig::default())
        .await
        .unwrap_or_else(|err| panic!("connect to QEMU's QMP: {err}\n{}", qemu.log()));
    Some((qemu, qmp, events))
}

/// [`start`], then discovery: the QEMU, its client and what it offers.
async fn start_discovered() -> Option<(Qemu, QmpClient, katamaran::migration::qemu::QemuFeatures)> {
    let (qemu, qmp, _events) = start().await?;
    let features = katamaran::migration::qemu::QemuFeatures::discover(&qmp).await.expect("discover");
    Some((qemu, qmp, features))
}

/// The next event called `name`; others (none are expected on a diskless VM) are skipped.
async fn wait_for_event(events: &mut EventReceiver, name: &str) -> QmpEvent {
    let wait = async {
        loop {
            let event = events.recv().await.expect("event channel open");
            if event.name == name {
                return event;
            }
        }
    };
    tokio::time::timeout(EVENT_DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {name} event within {EVENT_DEADLINE:?}"))
}

#[tokio::test]
async fn query_version_matches_the_greeting() {
    let Some((_qemu, qmp, _events)) = start().await else {
        return;
    };
    let version = qmp.query_version().await.expect("query-version");
    assert_eq!(&version, &qmp.greeting().version);
    assert!(version.major >= 7, "{version}");
    eprintln!("QEMU {version}");
}

/// The lab's QEMU runs under TCG: discovery must read that, and only a QEMU from 9.0 on (which
/// re-arms TCG's dirty tracking after a sync) may iterate pre-copy; CI runs this on 7.2 and 10.x.
#[tokio::test]
async fn discovery_sees_tcg_and_iterates_only_from_qemu_9() {
    let Some((_qemu, qmp, features)) = start_discovered().await else {
        return;
    };
    // Discovery reads TCG also when `query-kvm` is missing or answers oddly: check the answer
    // it parses, so a QEMU that changed it fails here.
    assert!(features.has_command("query-kvm"), "QEMU {} lists query-kvm", features.version());
    let kvm = qmp.execute("query-kvm", None).await.expect("query-kvm");
    assert_eq!(kvm["enabled"].as_bool(), Some(false), "query-kvm answered {kvm}");
    assert!(!features.kvm(), "the tests run QEMU with -accel tcg");
    let version = features.version().clone();
    assert_eq!(features.iterates_safely(), version.at_least(9, 0), "QEMU {version}");
    eprintln!("QEMU {version}: pre-copy iterates: {}", features.iterates_safely());
}

/// The completion hold (`avail-switchover-bandwidth`) is what QEMU from 8.2 takes and reports
/// back, and what an older QEMU refuses: the version gate matches the real QEMU.
#[tokio::test]
async fn the_completion_hold_is_offered_from_qemu_8_2() {
    use katamaran::migration::qemu::compute;
    let Some((_qemu, qmp, features)) = start_discovered().await else {
        return;
    };
    let version = features.version().clone();
    let held =
        compute::set_limit(&qmp, Duration::from_millis(1), Some(compute::COMPLETION_HOLD_BANDWIDTH)).await;
    if !compute::has_switchover_bandwidth(&features) {
        let error = held.expect_err("QEMU before 8.2 has no avail-switchover-bandwidth");
        let source = std::error::Error::source(&error).expect("QEMU's answer").to_string();
        assert!(source.contains("avail-switchover-bandwidth"), "QEMU {version}: {source}");
        eprintln!("QEMU {version}: no completion hold; the engine does not set one");
        return;
    }
    held.expect("hold set");
    let parameters = qmp.execute("query-migrate-parameters", None).await.expect("query-migrate-parameters");
    assert_eq!(parameters["avail-switchover-bandwidth"], 1_000_000, "QEMU {version}: {parameters}");
    assert_eq!(parameters["downtime-limit"], 1, "QEMU {version}: {parameters}");
    compute::set_limit(&qmp, Duration::from_millis(25), Some(0)).await.expect("released");
    let parameters = qmp.execute("query-migrate-parameters", None).await.expect("query-migrate-parameters");
    assert_eq!(parameters["avail-switchover-bandwidth"], 0, "QEMU {version}: {parameters}");
    assert_eq!(parameters["downtime-limit"], 25, "QEMU {version}: {parameters}");
}

/// What a migration sets on the sending QEMU (capabilities, parameters, the completion hold)
/// comes back off it when the migration rolls back: its settings read back as before.
#[tokio::test]
async fn a_rollback_leaves_the_sending_qemus_migration_settings_as_they_were() {
    use katamaran::migration::qemu::compute::{self, OutgoingSettings, RamConfig};
    let Some((_qemu, qmp, features)) = start_discovered().await else {
        return;
    };
    let version = features.version().clone();
    let query = |name: &'static str| {
        let qmp = qmp.clone();
        async move { qmp.execute(name, None).await.unwrap_or_else(|e| panic!("{name}: {e}")) }
    };
    let (parameters, capabilities) =
        (query("query-migrate-parameters").await, query("query-migrate-capabilities").await);
    let config = RamConfig {
        downtime_limit: Duration::from_millis(25),
        max_bandwidth: None,
        multifd_channels: Some(4),
        auto_converge: true,
        pause_before_switchover: true,
    };
    let before = OutgoingSettings::read(&qmp, &features, &config).await.expect("read");
    compute::configure(&qmp, &features, &config).await.expect("configure");
    let hold = compute::has_switchover_bandwidth(&features).then_some(compute::COMPLETION_HOLD_BANDWIDTH);
    compute::set_limit(&qmp, Duration::from_millis(1), hold).await.expect("limit");
    assert_ne!(query("query-migrate-parameters").await, parameters, "QEMU {version}: configured");
    assert_ne!(query("query-migrate-capabilities").await, capabilities, "QEMU {version}: configured");
    before.restore(&qmp).await.expect("restore");
    assert_eq!(query("query-migrate-parameters").await, parameters, "QEMU {version}");
    assert_eq!(query("query-migrate-capabilities").await, capabilities, "QEMU {version}");
}

/// Where QEMU can measure the dirty rate within a first pass (8.2 on, so 10.x in CI), the engine's
/// measurement starts and ends with a rate; on 7.2 it is not offered and the engine does not ask.
#[tokio::test]
async fn dirty_rate_is_measured_in_milliseconds_from_qemu_8_2() {
    use katamaran::migration::qemu::dirty_rate::{self, Measurement};
    let Some((_qemu, qmp, features)) = start_discovered().await else {
        return;
    };
    let version = features.version().clone();
    assert_eq!(dirty_rate::supported(&features), version.at_least(8, 2), "QEMU {version}");
    if !dirty_rate::supported(&features) {
        eprintln!("QEMU {version}: no dirty-rate measurement in milliseconds; the engine does not ask");
        return;
    }
    let started = std::time::Instant::now();
    dirty_rate::start(&qmp).await.expect("calc-dirty-rate");
    let rate = loop {
        match dirty_rate::poll(&qmp).await.expect("query-dirty-rate") {
            Measurement::Unstarted | Measurement::Measuring => {
                assert!(started.elapsed() < Duration::from_secs(10), "still measuring after 10 s");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Measurement::Measured(rate) => break rate,
            Measurement::Absent => panic!("QEMU {version} lost the measurement"),
        }
    };
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(dirty_rate::CALC_TIME_MS), "measured over {took:?}");
    // Firmware idling on 64 MiB dirties next to nothing; the bound adds QEMU's rounding back.
    assert!((1 << 20..=64 << 20).contains(&rate), "{rate} bytes/s");
    eprintln!("QEMU {version}: dirty rate at most {rate} bytes/s, measured in {took:?}");
}

#[tokio::test]
async fn stop_and_cont_emit_events_and_change_status() {
    const CYCLES: usize = 7;
    let Some((_qemu, qmp, mut events)) = start().await else {
        return;
    };
    let status = qmp.query_status().await.expect("query-status");
    assert!(status.running);
    assert_eq!(status.status, RunState::Running);

    let mut latencies = Vec::new();
    for _ in 0..CYCLES {
        qmp.stop().await.expect("stop");
        // QEMU emits STOP before the reply, and the reader keeps wire order.
        let stop = events.try_recv().expect("STOP queued before `stop` returned");
        assert_eq!(stop.name, "STOP");
        latencies.push(stop.delivery_latency().expect("QEMU stamps STOP"));
        let status = qmp.query_status().await.expect("query-status");
        assert!(!status.running);
        assert_eq!(status.status, RunState::Paused);

        qmp.cont().await.expect("cont");
        let resume = wait_for_event(&mut events, "RESUME").await;
        latencies.push(resume.delivery_latency().expect("QEMU stamps RESUME"));
        let status = qmp.query_status().await.expect("query-status");
        assert!(status.running);
        assert_eq!(status.status, RunState::Running);
    }

    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    eprintln!(
        "STOP/RESUME delivery latency (our receive time - QEMU's timestamp) over {} events: \
         min {:?}, median {median:?}, max {max:?}",
        latencies.len(),
        latencies[0],
    );
    assert!(median < Duration::from_secs(1), "median {median:?}");
}

#[tokio::test]
async fn query_migrate_parses_on_a_fresh_vm() {
    let Some((_qemu, qmp, _events)) = start().await else {
        return;
    };
    let info = qmp.query_migrate().await.expect("query-migrate");
    assert!(matches!(info.status, None | Some(MigrationStatus::None)), "{info:?}");
    assert!(info.ram.is_none(), "{info:?}");
}

#[tokio::test]
async fn migrate_capabilities_include_the_ones_katamaran_uses() {
    let Some((_qemu, qmp, _events)) = start().await else {
        return;
    };
    let capabilities = qmp.query_migrate_capabilities().await.expect("query-migrate-capabilities");
    for wanted in [
        MigrationCapability::Events,
        MigrationCapability::PauseBeforeSwitchover,
        MigrationCapability::Multifd,
        MigrationCapability::ReturnPath,
        MigrationCapability::AutoConverge,
        MigrationCapability::Xbzrle,
    ] {
        let entry = capabilities
            .iter()
            .find(|entry| entry.capability == wanted)
            .unwrap_or_else(|| panic!("{wanted} missing from {capabilities:?}"));
        assert!(!entry.state, "{wanted} is off by default");
    }
    let unknown: Vec<_> = capabilities
        .iter()
        .filter(|entry| matches!(entry.capability, MigrationCapability::Other(_)))
        .map(|entry| entry.capability.to_string())
        .collect();
    eprintln!("{} migration capabilities, not named by katamaran: {unknown:?}", capabilities.len());
}

#[tokio::test]
async fn query_commands_lists_what_katamaran_needs() {
    let Some((_qemu, qmp, _events)) = start().await else {
        return;
    };
    let commands = qmp.query_commands().await.expect("query-commands");
    for wanted in [
        "query-status",
        "stop",
        "cont",
        "getfd",
        "closefd",
        "migrate",
        "migrate-incoming",
        "query-migrate",
        "migrate-set-capabilities",
    ] {
        assert!(commands.iter().any(|name| name == wanted), "{wanted} missing");
    }
}

#[tokio::test]
async fn unknown_command_is_command_not_found() {
    let Some((_qemu, qmp, _events)) = start().await else {
        return;
    };
    let err = qmp.execute("katamaran-no-such-command", None).await.expect_err("unknown command");
    assert_eq!(err.class(), Some(&ErrorClass::CommandNotFound), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("QMP command `katamaran-no-such-command` failed: CommandNotFound:"),
        "{message}"
    );
    qmp.query_status().await.expect("an error reply leaves the connection usable");
}

#[tokio::test]
async fn getfd_hands_qemu_a_descriptor_that_closefd_releases() {
    let Some((_qemu, qmp, _events)) = start().await else {
        return;
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    qmp.getfd("katamaran-test", &theirs).await.expect("getfd");
    // QEMU now holds the only other reference to `theirs`: the peer stays open after we close
    // our copy, and reaches EOF only when QEMU closes its descriptor.
    drop(theirs);
    ours.set_nonblocking(true).expect("nonblocking");
    let mut ours = tokio::net::UnixStream::from_std(ours).expect("tokio stream");
    let mut buf = [0_u8; 16];
    let open = ours.try_read(&mut buf);
    assert!(
        matches!(&open, Err(err) if err.kind() == std::io::ErrorKind::WouldBlock),
        "QEMU keeps the passed descriptor open: {open:?}"
    );

    qmp.closefd("katamaran-test").await.expect("closefd");
    let read = tokio::time::timeout(EVENT_DEADLINE, ours.read(&mut buf))
        .await
        .expect("EOF once QEMU closes the descriptor")
        .expect("read");
    assert_eq!(read, 0);

    let err = qmp.closefd("katamaran-test").await.expect_err("the name is gone");
    assert_eq!(err.class(), Some(&ErrorClass::GenericError), "{err:?}");
}

#[tokio::test]
async fn killed_qemu_fails_pending_and_later_commands_as_closed() {
    let Some((mut qemu, qmp, mut events)) = start().await else {
        return;
    };
    let pending = qmp.query_status();
    tokio::pin!(pending);
    // One poll registers the command; nothing else runs on this current-thread runtime before
    // QEMU dies, so the command is pending when the socket closes.
    assert!(futures::poll!(&mut pending).is_pending());
    qemu.kill();

    let err = tokio::time::timeout(EVENT_DEADLINE, pending)
        .await
        .expect("pending command fails in time")
        .expect_err("QEMU is gone");
    assert!(err.is_closed(), "{err:?}");
    assert!(err.to_string().contains("closed"), "{err}");
    assert!(err.to_string().contains("query-status"), "{err}");

    let later = qmp.stop().await.expect_err("QEMU is gone");
    assert_eq!(later.to_string(), "QMP command `stop` failed: QEMU closed the connection");
    let end = tokio::time::timeout(EVENT_DEADLINE, events.recv()).await.expect("event channel ends in time");
    assert!(end.is_none(), "{end:?}");
}
