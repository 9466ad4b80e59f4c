//! The QMP sequences of the storage and compute phases: first against a scripted fake QMP
//! server (exact commands and arguments, error paths), then against two real QEMUs (TCG).

#[path = "support/qemu_pair.rs"]
mod qemu_pair;
mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use katamaran::migration::events::DriveProgress;
use katamaran::migration::qemu::dirty_rate::{self, Measurement};
use katamaran::migration::qemu::{
    compute, list_disks, mirror, storage, DiskInfo, EventBus, MigrationEnd, NbdAddress, QemuError,
    QemuFeatures, RamConfig,
};
use katamaran::qmp::{MigrationStatus, QmpClient, QmpConfig, RunState};
use serde_json::{json, Value};
use support::fake_qmp::{FakeConn, FakeQmp, ReceivedCommand, STEP_DEADLINE};
use tokio::task::JoinHandle;

/// Deadline for every wait in the fake tests: generous, a broken sequence fails long before.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Fake QMP
// ---------------------------------------------------------------------------------------------

/// A client connected to a fake that runs `script` after the handshake, with its event bus.
async fn fake<F, Fut>(script: F) -> (QmpClient, EventBus, JoinHandle<()>)
where
    F: FnOnce(FakeConn) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let fake = FakeQmp::bind();
    let path = fake.path().to_owned();
    let server = tokio::spawn(async move {
        let mut conn = fake.accept().await;
        conn.handshake().await;
        script(conn).await;
    });
    let config = QmpConfig { command_deadline: WAIT, ..QmpConfig::default() };
    let (qmp, events) = QmpClient::connect(&path, &config).await.expect("handshake");
    (qmp, EventBus::spawn(events), server)
}

async fn finish(server: JoinHandle<()>) {
    tokio::time::timeout(STEP_DEADLINE, server)
        .await
        .expect("fake script finishes in time")
        .expect("fake script succeeded");
}

/// Expects `name` with exactly `arguments` and replies `{}`.
async fn expect(conn: &mut FakeConn, name: &str, arguments: Value) -> ReceivedCommand {
    let command = conn.expect_command(name).await;
    assert_eq!(command.arguments, Some(arguments), "arguments of {name}");
    conn.reply(&command, json!({})).await;
    command
}

/// The next command that is not a `query-block-jobs` progress poll; polls get `jobs`.
async fn next_non_poll(conn: &mut FakeConn, jobs: &Value) -> ReceivedCommand {
    loop {
        let command = conn.recv_command().await;
        if command.name != "query-block-jobs" {
            return command;
        }
        conn.reply(&command, jobs.clone()).await;
    }
}

/// Answers the three discovery queries (in whatever order the client sends them) like QEMU 7.2
/// would, plus members and values no QEMU has yet.
async fn answer_discovery(conn: &mut FakeConn, capabilities: &[&str]) {
    for _ in 0..3 {
        let command = conn.recv_command().await;
        let reply = match command.name.as_str() {
            "query-version" => json!({
                "qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian", "extra": 1
            }),
            "query-commands" => json!([
                {"name": "migrate"}, {"name": "block-export-add", "future": true}, {"name": "x-new"}
            ]),
            "query-migrate-capabilities" => Value::Array(
                capabilities
                    .iter()
                    .map(|name| json!({"capability": name, "state": false, "new-member": 0}))
                    .collect(),
            ),
            other => panic!("unexpected discovery command {other}"),
        };
        conn.reply(&command, reply).await;
    }
}

fn ram_config() -> RamConfig {
    RamConfig {
        downtime_limit: Duration::from_millis(25),
        max_bandwidth: None,
        multifd_channels: Some(4),
        auto_converge: true,
        pause_before_switchover: true,
    }
}

/// [`ram_config`] with every optional capability off: only `events` and `return-path` are set.
fn events_and_return_path_only() -> RamConfig {
    RamConfig { multifd_channels: None, auto_converge: false, pause_before_switchover: false, ..ram_config() }
}

#[tokio::test]
async fn configure_sets_every_capability_and_an_explicit_bandwidth() {
    let (qmp, _bus, server) =
        fake(|mut conn| async move {
            let all = [
                "xbzrle",
                "events",
                "return-path",
                "late-block-activate",
                "auto-converge",
                "multifd",
                "pause-before-switchover",
                "zz-future",
            ];
            answer_discovery(&mut conn, &all).await;
            expect(
                &mut conn,
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "return-path", "state": true},
                    {"capability": "auto-converge", "state": true},
                    {"capability": "multifd", "state": true},
                    {"capability": "pause-before-switchover", "state": true},
                ]}),
            )
            .await;
            expect(&mut conn, "migrate-set-parameters", json!({
            "downtime-limit": 25, "max-bandwidth": 9_223_372_036_854_775_807_u64, "multifd-channels": 4
        }))
        .await;
            // The destination side: the same stream format (multifd), nothing source-only.
            expect(
                &mut conn,
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "return-path", "state": true},
                    {"capability": "late-block-activate", "state": true},
                    {"capability": "multifd", "state": true},
                ]}),
            )
            .await;
            expect(&mut conn, "migrate-set-parameters", json!({"multifd-channels": 4})).await;
            expect(&mut conn, "migrate-incoming", json!({"uri": "unix:/run/in.sock"})).await;
            expect(&mut conn, "migrate", json!({"uri": "fd:mig"})).await;
            expect(&mut conn, "migrate-continue", json!({"state": "pre-switchover"})).await;
            let cancel = conn.expect_command("migrate_cancel").await;
            assert_eq!(cancel.arguments, None);
            conn.reply(&cancel, json!({})).await;
        })
        .await;
    let features = QemuFeatures::discover(&qmp).await.expect("discover");
    assert!(features.has_capability("zz-future"), "unknown capability kept");
    assert!(features.has_command("block-export-add"));
    assert_eq!(features.version().to_string(), "7.2.22 (Debian)");
    compute::configure(&qmp, &features, &ram_config()).await.expect("configure");
    compute::configure_incoming(&qmp, &features, &ram_config()).await.expect("incoming");
    compute::start_incoming(&qmp, "unix:/run/in.sock").await.expect("incoming");
    compute::start_outgoing(&qmp, "fd:mig").await.expect("migrate");
    compute::continue_after_switchover(&qmp).await.expect("continue");
    compute::cancel(&qmp).await.expect("cancel");
    finish(server).await;
}

/// How a QEMU 7.2 answers `query-kvm` decides whether pre-copy may iterate: under KVM yes,
/// under TCG (or with no answer) it runs one pass (`QemuFeatures::iterates_safely`).
#[tokio::test]
async fn discovery_reads_the_accelerator_that_decides_the_pre_copy_strategy() {
    for (answer, iterates) in [(Some(true), true), (Some(false), false), (None, false)] {
        let (qmp, _bus, server) = fake(move |mut conn| async move {
            for _ in 0..3 {
                let command = conn.recv_command().await;
                let reply = match command.name.as_str() {
                    "query-version" => json!({"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""}),
                    "query-commands" => json!([{"name": "migrate"}, {"name": "query-kvm"}]),
                    "query-migrate-capabilities" => json!([]),
                    other => panic!("unexpected discovery command {other}"),
                };
                conn.reply(&command, reply).await;
            }
            let kvm = conn.expect_command("query-kvm").await;
            match answer {
                Some(enabled) => conn.reply(&kvm, json!({"enabled": enabled, "present": true})).await,
                None => conn.reply_error(&kvm, "GenericError", "no accelerator information").await,
            }
        })
        .await;
        let features = QemuFeatures::discover(&qmp).await.expect("discover");
        assert_eq!(features.iterates_safely(), iterates, "query-kvm answered {answer:?}");
        finish(server).await;
    }
}

/// Answers discovery as QEMU `major.minor` listing `commands`, with the two capabilities every
/// migration sets.
async fn answer_discovery_as(conn: &mut FakeConn, major: u64, minor: u64, commands: &[&str]) {
    for _ in 0..3 {
        let command = conn.recv_command().await;
        let reply = match command.name.as_str() {
            "query-version" => json!({"qemu": {"major": major, "minor": minor, "micro": 0}, "package": ""}),
            "query-commands" => Value::Array(commands.iter().map(|name| json!({"name": name})).collect()),
            "query-migrate-capabilities" => json!([
                {"capability": "events", "state": false}, {"capability": "return-path", "state": false}
            ]),
            other => panic!("unexpected discovery command {other}"),
        };
        conn.reply(&command, reply).await;
    }
}

/// From QEMU 8.2 the sending side starts with `avail-switchover-bandwidth` 0 (QEMU's own
/// estimate): a hold left by an earlier, cancelled attempt does not carry over.
#[tokio::test]
async fn configure_on_qemu_8_2_resets_the_completion_hold() {
    let (qmp, _bus, server) = fake(|mut conn| async move {
        answer_discovery_as(&mut conn, 10, 0, &["migrate"]).await;
        let capabilities = conn.expect_command("migrate-set-capabilities").await;
        conn.reply(&capabilities, json!({})).await;
        expect(
            &mut conn,
            "migrate-set-parameters",
            json!({"downtime-limit": 25, "max-bandwidth": 9_223_372_036_854_775_807_u64, "avail-switchover-bandwidth": 0}),
        )
        .await;
    })
    .await;
    let features = QemuFeatures::discover(&qmp).await.expect("discover");
    let config = events_and_return_path_only();
    compute::configure(&qmp, &features, &config).await.expect("configure");
    finish(server).await;
}

/// A rollback puts back exactly what the sending side changed, as QEMU had it before: the
/// capabilities `configure` sets at their discovered states (one was already on), the
/// parameters it and the completion hold set at the values QEMU reported, nothing else.
#[tokio::test]
async fn a_rollback_restores_the_settings_the_sending_side_changed() {
    use katamaran::migration::qemu::compute::OutgoingSettings;
    let (qmp, _bus, server) = fake(|mut conn| async move {
        for _ in 0..3 {
            let command = conn.recv_command().await;
            let reply = match command.name.as_str() {
                "query-version" => json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}),
                "query-commands" => json!([{"name": "migrate"}]),
                "query-migrate-capabilities" => json!([
                    {"capability": "events", "state": true},
                    {"capability": "return-path", "state": false},
                    {"capability": "auto-converge", "state": false},
                    {"capability": "multifd", "state": false},
                    {"capability": "pause-before-switchover", "state": false},
                    {"capability": "xbzrle", "state": true},
                ]),
                other => panic!("unexpected discovery command {other}"),
            };
            conn.reply(&command, reply).await;
        }
        let query = conn.expect_command("query-migrate-parameters").await;
        assert_eq!(query.arguments, None);
        conn.reply(
            &query,
            json!({
                "downtime-limit": 300, "max-bandwidth": 134_217_728, "avail-switchover-bandwidth": 0,
                "multifd-channels": 2, "cpu-throttle-initial": 20, "tls-creds": ""
            }),
        )
        .await;
        expect(
            &mut conn,
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "return-path", "state": false},
                {"capability": "auto-converge", "state": false},
                {"capability": "multifd", "state": false},
                {"capability": "pause-before-switchover", "state": false},
            ]}),
        )
        .await;
        expect(
            &mut conn,
            "migrate-set-parameters",
            json!({"downtime-limit": 300, "max-bandwidth": 134_217_728, "avail-switchover-bandwidth": 0}),
        )
        .await;
    })
    .await;
    let features = QemuFeatures::discover(&qmp).await.expect("discover");
    let config = RamConfig { multifd_channels: None, ..ram_config() };
    let before = OutgoingSettings::read(&qmp, &features, &config).await.expect("read");
    before.restore(&qmp).await.expect("restore");
    finish(server).await;
}

/// The dirty-rate measurement the first pass predicts from: offered from QEMU 8.2 (the
/// millisecond unit), page sampling sized to the guest, and its answers read as an upper bound.
#[tokio::test]
async fn dirty_rate_is_sampled_for_the_first_pass_from_qemu_8_2() {
    const BOTH: [&str; 2] = ["calc-dirty-rate", "query-dirty-rate"];
    for (major, minor, commands, offered) in [
        (7, 2, &BOTH[..], false),
        (8, 1, &BOTH[..], false),
        (8, 2, &BOTH[..1], false),
        (8, 2, &BOTH[..], true),
    ] {
        let (qmp, _bus, server) = fake(move |mut conn| async move {
            answer_discovery_as(&mut conn, major, minor, commands).await;
        })
        .await;
        let features = QemuFeatures::discover(&qmp).await.expect("discover");
        assert_eq!(dirty_rate::supported(&features), offered, "QEMU {major}.{minor} with {commands:?}");
        finish(server).await;
    }

    let (qmp, _bus, server) = fake(|mut conn| async move {
        let size = conn.expect_command("query-memory-size-summary").await;
        conn.reply(&size, json!({"base-memory": 512u64 << 20, "plugged-memory": 0})).await;
        expect(
            &mut conn,
            "calc-dirty-rate",
            json!({"calc-time": 100, "calc-time-unit": "millisecond", "mode": "page-sampling", "sample-pages": 10000}),
        )
        .await;
        for reply in [
            json!({"status": "unstarted", "dirty-rate": -1}),
            json!({"status": "measuring", "dirty-rate": -1, "calc-time": 100, "calc-time-unit": "millisecond"}),
            json!({"status": "measured", "dirty-rate": 70, "mode": "page-sampling", "calc-time": 100}),
        ] {
            let query = conn.expect_command("query-dirty-rate").await;
            assert_eq!(query.arguments, Some(json!({"calc-time-unit": "millisecond"})));
            conn.reply(&query, reply).await;
        }
        let refused = conn.expect_command("query-memory-size-summary").await;
        conn.reply(&refused, json!({"base-memory": 4u64 << 30})).await;
        let calc = conn.expect_command("calc-dirty-rate").await;
        assert_eq!(calc.arguments.as_ref().map(|a| a["sample-pages"].clone()), Some(json!(2048)), "4 GiB");
        conn.reply_error(&calc, "GenericError", "the dirty rate is already being measured.").await;
    })
    .await;
    dirty_rate::start(&qmp).await.expect("started");
    assert_eq!(
        dirty_rate::poll(&qmp).await.expect("poll"),
        Measurement::Unstarted,
        "its thread not yet running"
    );
    assert_eq!(dirty_rate::poll(&qmp).await.expect("poll"), Measurement::Measuring);
    assert_eq!(dirty_rate::poll(&qmp).await.expect("poll"), Measurement::Measured(71 << 20));
    let error = dirty_rate::start(&qmp).await.expect_err("refused");
    assert_eq!(error.to_string(), "cannot measure the guest's dirty rate (calc-dirty-rate)");
    let source = std::error::Error::source(&error).expect("source").to_string();
    assert!(source.contains("already being measured"), "{source}");
    finish(server).await;
}

#[tokio::test]
async fn a_missing_capability_fails_before_anything_is_sent() {
    let (qmp, _bus, server) = fake(|mut conn| async move {
        answer_discovery(&mut conn, &["events", "return-path", "auto-converge", "multifd"]).await;
        // The client must close without having sent a single migrate-set-* command.
        conn.expect_eof().await;
    })
    .await;
    let features = QemuFeatures::discover(&qmp).await.expect("discover");
    let error = compute::configure(&qmp, &features, &ram_config())
        .await
        .expect_err("pause-before-switchover is missing");
    assert!(matches!(error, QemuError::MissingCapability { .. }));
    assert_eq!(
        error.to_string(),
        "QEMU 7.2.22 (Debian) does not offer migration capability 'pause-before-switchover'"
    );
    drop(qmp);
    finish(server).await;
}

#[tokio::test]
async fn qemu_refusing_a_capability_is_reported_with_what_was_asked() {
    let (qmp, _bus, server) = fake(|mut conn| async move {
        answer_discovery(&mut conn, &["events", "return-path"]).await;
        let command = conn.expect_command("migrate-set-capabilities").await;
        conn.reply_error(&command, "GenericError", "There's a migration process in progress").await;
    })
    .await;
    let features = QemuFeatures::discover(&qmp).await.expect("discover");
    let config = events_and_return_path_only();
    let error = compute::configure(&qmp, &features, &config).await.expect_err("refused");
    assert_eq!(error.to_string(), "cannot set migration capabilities [events=on, return-path=on]");
    let source = std::error::Error::source(&error).expect("source").to_string();
    assert!(source.contains("migrate-set-capabilities") && source.contains("in progress"), "{source}");
    finish(server).await;
}

#[tokio::test]
async fn migration_waits_report_status_and_qemu_error() {
    let (qmp, bus, server) = fake(|mut conn| async move {
        // Events only after the client's first command: it subscribes before sending it.
        let query = conn.expect_command("query-migrate").await;
        conn.reply(
            &query,
            json!({"status": "active", "expected-downtime": 30,
            "ram": {"transferred": 1, "remaining": 2, "total": 3, "dirty-sync-count": 4}}),
        )
        .await;
        for status in ["setup", "active", "pre-switchover"] {
            conn.send_event("MIGRATION", json!({"status": status})).await;
        }
        conn.send_event("MIGRATION_PASS", json!({"pass": 2})).await;
        conn.send_event("MIGRATION", json!({"status": "completed"})).await;
        // QEMU 7.2 announces `completed` before it has computed the totals.
        let query = conn.expect_command("query-migrate").await;
        conn.reply(&query, json!({"status": "completed", "downtime": 0, "total-time": 0})).await;
        let query = conn.expect_command("query-migrate").await;
        conn.reply(
            &query,
            json!({"status": "completed", "downtime": 13, "total-time": 25,
            "ram": {"transferred": 623_738, "mbps": 250.0, "future": 1}, "new-member": {}}),
        )
        .await;
        conn.send_event("MIGRATION", json!({"status": "active"})).await;
        conn.send_event("MIGRATION", json!({"status": "failed"})).await;
        let query = conn.expect_command("query-migrate").await;
        conn.reply(
            &query,
            json!({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}),
        )
        .await;
        // Like QEMU exiting: reply, then close.
        let quit = conn.expect_command("quit").await;
        conn.reply(&quit, json!({})).await;
        conn.close();
    })
    .await;
    let mut events = bus.subscribe();
    let (status, ram) = compute::progress(&qmp).await.expect("progress");
    assert_eq!(status, MigrationStatus::Active);
    assert_eq!((ram.transferred_bytes, ram.remaining_bytes, ram.iteration), (1, 2, 4));
    assert_eq!(ram.expected_downtime_ms, 30);
    compute::wait_status(&qmp, &mut events, MigrationStatus::PreSwitchover, WAIT)
        .await
        .expect("reaches pre-switchover");
    let MigrationEnd::Completed(info) = compute::wait_terminal(&qmp, &mut events, WAIT).await.expect("ends")
    else {
        panic!("expected completed");
    };
    assert_eq!(info.downtime, Some(Duration::from_millis(13)));
    let error = compute::wait_status(&qmp, &mut events, MigrationStatus::PreSwitchover, WAIT)
        .await
        .expect_err("fails first");
    assert_eq!(
        error.to_string(),
        "the migration ended as 'failed' while waiting for 'pre-switchover': Unable to write to socket: Broken pipe"
    );
    let timeout =
        compute::wait_terminal(&qmp, &mut events, Duration::from_millis(50)).await.expect_err("nothing more");
    assert_eq!(timeout.to_string(), "timed out after 50ms waiting for the migration to end");
    qmp.execute("quit", None).await.expect("quit");
    finish(server).await;
    let ended = compute::wait_status(&qmp, &mut events, MigrationStatus::Completed, WAIT)
        .await
        .expect_err("connection gone");
    assert_eq!(
        ended.to_string(),
        "the QMP event stream ended while waiting for migration status 'completed'"
    );
}

fn disk(drive: &str, node: &str) -> DiskInfo {
    DiskInfo {
        drive_id: drive.into(),
        node_name: node.into(),
        file: format!("/img/{drive}.img"),
        format: "raw".into(),
        virtual_size: 1 << 20,
        read_only: false,
        qdev: None,
    }
}

#[tokio::test]
async fn destination_exports_and_releases_every_disk() {
    let (qmp, bus, server) = fake(|mut conn| async move {
        let path = "/run/kmr/nbd.sock";
        expect(&mut conn, "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": path}}})).await;
        expect(&mut conn, "block-export-add", json!({"type": "nbd", "id": "kmr-export-drive-0",
            "node-name": "#block133", "name": "drive-0", "writable": true})).await;
        expect(&mut conn, "block-export-add", json!({"type": "nbd", "id": "kmr-export-drive-1",
            "node-name": "#block456", "name": "drive-1", "writable": true})).await;
        let list = conn.expect_command("query-block-exports").await;
        conn.reply(&list, json!([
            {"id": "kmr-export-drive-0", "type": "nbd", "node-name": "#block133", "shutting-down": false, "new": 1},
            {"id": "kmr-export-drive-1", "type": "nbd", "node-name": "#block456", "shutting-down": true},
            {"id": "not-ours", "type": "nbd", "node-name": "#block9", "shutting-down": false},
        ])).await;
        // drive-1 is already shutting down: only drive-0 is deleted, both are awaited.
        expect(&mut conn, "block-export-del", json!({"id": "kmr-export-drive-0", "mode": "hard"})).await;
        conn.send_event("BLOCK_EXPORT_DELETED", json!({"id": "kmr-export-drive-1"})).await;
        conn.send_event("BLOCK_EXPORT_DELETED", json!({"id": "kmr-export-drive-0"})).await;
        let stop = conn.expect_command("nbd-server-stop").await;
        assert_eq!(stop.arguments, None);
        conn.reply(&stop, json!({})).await;
    })
    .await;
    let address = NbdAddress::Unix("/run/kmr/nbd.sock".into());
    let disks = [disk("drive-0", "#block133"), disk("drive-1", "#block456")];
    let exports = storage::export_disks(&qmp, &address, &disks, None).await.expect("exports");
    assert_eq!(exports.export_name("drive-1"), Some("drive-1"));
    assert_eq!(exports.exports().len(), 2);
    let cleanup_copy = exports.clone();
    storage::stop_exports(&qmp, &bus, &exports, WAIT).await.expect("released");
    // As a cleanup step after the success path: nothing more is sent (the fake would fail).
    storage::stop_exports(&qmp, &bus, &cleanup_copy, WAIT).await.expect("already stopped");
    finish(server).await;
}

#[tokio::test]
async fn exports_fall_back_to_nbd_server_add_and_roll_back_on_failure() {
    let (qmp, _bus, server) = fake(|mut conn| async move {
        expect(
            &mut conn,
            "nbd-server-start",
            json!({"addr": {"type": "fd", "data": {"str": "nbd-listener"}}}),
        )
        .await;
        let add = conn.expect_command("block-export-add").await;
        conn.reply_error(&add, "CommandNotFound", "The command block-export-add has not been found").await;
        expect(
            &mut conn,
            "nbd-server-add",
            json!({"device": "#block1", "name": "drive-0", "writable": true}),
        )
        .await;
        let add = conn.expect_command("nbd-server-add").await;
        conn.reply_error(&add, "GenericError", "Permission conflict on node '#block2'").await;
        // Roll back: the first export, then the server.
        expect(&mut conn, "nbd-server-remove", json!({"name": "drive-0", "mode": "hard"})).await;
        let stop = conn.expect_command("nbd-server-stop").await;
        conn.reply(&stop, json!({})).await;
    })
    .await;
    let address = NbdAddress::Fd("nbd-listener".into());
    let disks = [disk("drive-0", "#block1"), disk("drive-1", "#block2")];
    let error = storage::export_disks(&qmp, &address, &disks, None).await.expect_err("second fails");
    assert_eq!(error.to_string(), "cannot export drive drive-1 over NBD");
    finish(server).await;
}

fn running_job(offset: u64) -> Value {
    json!([{"device": "kmr-mirror-drive-0", "type": "mirror", "len": 1_048_576, "offset": offset,
            "ready": false, "status": "running", "busy": true, "speed": 0, "future": [1]}])
}

#[tokio::test]
async fn mirror_reports_progress_and_completes_consistently() {
    let (qmp, bus, server) = fake(|mut conn| async move {
        expect(
            &mut conn,
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "kmr-nbd-drive-0",
            "server": {"type": "unix", "path": "/run/kmr/nbd.sock"}, "export": "drive-0"}),
        )
        .await;
        expect(
            &mut conn,
            "blockdev-mirror",
            json!({"job-id": "kmr-mirror-drive-0",
            "device": "#block133", "target": "kmr-nbd-drive-0", "sync": "full"}),
        )
        .await;
        let poll = conn.expect_command("query-block-jobs").await;
        conn.reply(&poll, running_job(262_144)).await;
        conn.send_event("JOB_STATUS_CHANGE", json!({"id": "kmr-mirror-drive-0", "status": "ready"})).await;
        conn.send_event(
            "BLOCK_JOB_READY",
            json!({"device": "kmr-mirror-drive-0", "len": 1_048_576,
            "offset": 1_048_576, "speed": 0, "type": "mirror"}),
        )
        .await;
        let cancel = next_non_poll(&mut conn, &running_job(1_048_576)).await;
        assert_eq!(cancel.name, "block-job-cancel");
        assert_eq!(cancel.arguments, Some(json!({"device": "kmr-mirror-drive-0"})), "a soft cancel");
        conn.reply(&cancel, json!({})).await;
        conn.send_event(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "kmr-mirror-drive-0",
            "len": 1_048_576, "offset": 1_048_576, "speed": 0, "type": "mirror"}),
        )
        .await;
        expect(&mut conn, "blockdev-del", json!({"node-name": "kmr-nbd-drive-0"})).await;
    })
    .await;
    let mut events = bus.subscribe();
    let address = NbdAddress::Unix("/run/kmr/nbd.sock".into());
    let job = mirror::start_mirror(&qmp, &disk("drive-0", "#block133"), &address, "drive-0", None)
        .await
        .expect("started");
    let jobs = [job];
    let mut reports: Vec<Vec<DriveProgress>> = Vec::new();
    let done = mirror::wait_ready(&qmp, &mut events, &jobs, WAIT, |p| reports.push(p.to_vec()))
        .await
        .expect("ready");
    let quarter =
        DriveProgress { drive_id: "drive-0".into(), total_bytes: 1 << 20, done_bytes: 1 << 18, ready: false };
    let synced = DriveProgress { done_bytes: 1 << 20, ready: true, ..quarter.clone() };
    assert_eq!(reports.first(), Some(&vec![quarter]), "first poll");
    assert_eq!(reports.last(), Some(&vec![synced.clone()]), "READY event");
    assert_eq!(done, vec![synced]);
    mirror::complete_consistent(&qmp, &bus, &jobs, WAIT).await.expect("completed");
    finish(server).await;
}

#[tokio::test]
async fn a_failing_mirror_names_its_drive_and_abort_cleans_up() {
    let (qmp, bus, server) = fake(|mut conn| async move {
        for name in ["blockdev-add", "blockdev-mirror"] {
            let command = conn.expect_command(name).await;
            conn.reply(&command, json!({})).await;
        }
        let poll = conn.expect_command("query-block-jobs").await;
        conn.reply(&poll, running_job(0)).await;
        conn.send_event(
            "BLOCK_JOB_ERROR",
            json!({"device": "kmr-mirror-drive-0",
            "operation": "write", "action": "report"}),
        )
        .await;
        conn.send_event(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "kmr-mirror-drive-0", "len": 1_048_576,
            "offset": 4096, "speed": 0, "type": "mirror", "error": "Input/output error"}),
        )
        .await;
        // abort: the job is gone, so only the node is removed.
        let poll = conn.expect_command("query-block-jobs").await;
        conn.reply(&poll, json!([])).await;
        let nodes = conn.expect_command("query-named-block-nodes").await;
        assert_eq!(nodes.arguments, Some(json!({"flat": true})));
        conn.reply(
            &nodes,
            json!([{"node-name": "kmr-nbd-drive-0", "drv": "nbd", "x": 1},
                   {"node-name": "#block133", "drv": "raw"}]),
        )
        .await;
        expect(&mut conn, "blockdev-del", json!({"node-name": "kmr-nbd-drive-0"})).await;
    })
    .await;
    let mut events = bus.subscribe();
    let address = NbdAddress::Unix("/run/kmr/nbd.sock".into());
    let job = mirror::start_mirror(&qmp, &disk("drive-0", "#block133"), &address, "drive-0", None)
        .await
        .expect("started");
    let jobs = [job];
    let error = mirror::wait_ready(&qmp, &mut events, &jobs, WAIT, |_| {}).await.expect_err("fails");
    assert_eq!(error.to_string(), "the mirror of drive drive-0 failed: Input/output error");
    mirror::abort(&qmp, &bus, &jobs, WAIT).await.expect("clean");
    finish(server).await;
}

/// Event push on the fake's socket → a subscriber of the bus. Prints the latency split into the
/// socket (the fake's timestamp → the client's read) and the rest (the client's parse and
/// dispatch plus the bus → the subscriber). The bus alone is measured in its unit test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_latency_over_a_qmp_connection() {
    const EVENTS: usize = 300;
    let (qmp, bus, server) = fake(|mut conn| async move {
        for _ in 0..EVENTS {
            // One at a time, each after the client asked for it (it subscribed before asking
            // the first time), so events do not queue up: the figure is latency, not throughput.
            let ask = conn.expect_command("query-status").await;
            conn.reply(&ask, json!({"running": true, "status": "running"})).await;
            conn.send_event("STOP", Value::Null).await;
        }
    })
    .await;
    let mut subscribers = [bus.subscribe(), bus.subscribe()];
    let (mut wire, mut fan_out) = (Vec::new(), Vec::new());
    for _ in 0..EVENTS {
        qmp.query_status().await.expect("ask for an event");
        for (i, sub) in subscribers.iter_mut().enumerate() {
            let event = sub.wait_for(|e| e.name == "STOP", WAIT).await.expect("STOP");
            if i == 0 {
                fan_out.push(event.received_instant.elapsed());
                wire.extend(event.delivery_latency());
            }
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let (bus_median, bus_p99) = median(&mut fan_out);
    let (wire_median, wire_p99) = median(&mut wire);
    eprintln!(
        "QMP event -> bus subscriber: socket median {wire_median:?} p99 {wire_p99:?}; \
         client parse + bus median {bus_median:?} p99 {bus_p99:?}"
    );
    assert!(bus_median < Duration::from_millis(1), "bus median {bus_median:?}");
    finish(server).await;
}

// ---------------------------------------------------------------------------------------------
// Real QEMU
// ---------------------------------------------------------------------------------------------

const DISK_SIZE: usize = 32 << 20;
const QEMU_WAIT: Duration = Duration::from_secs(120);

/// The whole local-storage sequence between two QEMUs over TLS (the default), with guest-style
/// writes before, during and after the mirror; the destination's image must end up
/// byte-identical, and nothing of the guest's disk or RAM crosses the wire readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_storage_migration_between_two_qemus() {
    let Some(seen) = storage_and_ram_between_two_qemus(Streams::Tls).await else { return };
    let disk = disk_marker();
    for (what, marker) in [("disk", &disk[..]), ("RAM", RAM_MARKER), ("disk write", &[0xa2; 4096][..])] {
        assert!(!contains(&seen, marker), "the {what} marker crossed the TLS streams in clear");
    }
}

/// The same with plain streams (the opt-out): the markers the TLS run looks for are on the
/// wire, so that run's check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_streams_carry_the_guests_disk_and_ram_in_clear() {
    let Some(seen) = storage_and_ram_between_two_qemus(Streams::Plain).await else { return };
    let disk = disk_marker();
    for (what, marker) in [("disk", &disk[..]), ("RAM", RAM_MARKER), ("disk write", &[0xa2; 4096][..])] {
        assert!(contains(&seen, marker), "the {what} marker is not in the plain streams");
    }
}

/// 64 bytes of the source image at 1 MiB, which no guest write touches and the firmware never
/// reads into RAM (sector 0 is read at boot, so it may cross in the RAM stream too).
fn disk_marker() -> Vec<u8> {
    qemu_pair::pattern(DISK_SIZE)[1 << 20..(1 << 20) + 64].to_vec()
}
/// In the guest's RAM: the firmware copies itself there.
const RAM_MARKER: &[u8] = b"SeaBIOS";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Streams {
    Tls,
    Plain,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A unix-socket relay in front of `target` that records every byte going from the source to
/// the destination: what an observer on the wire between the nodes would read.
struct Tap {
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Tap {
    fn start(listen: &std::path::Path, target: std::path::PathBuf) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(listen).expect("bind the tap");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (record, count) = (seen.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (target, record) = (target.clone(), record.clone());
                tokio::spawn(async move {
                    let outbound = tokio::net::UnixStream::connect(&target).await.expect("tap target");
                    let (mut from_source, mut to_source) = inbound.into_split();
                    let (mut from_destination, mut to_destination) = outbound.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n @ 1..) = from_source.read(&mut buf).await {
                            record.lock().expect("tap lock").extend_from_slice(&buf[..n]);
                            if to_destination.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_destination.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut from_destination, &mut to_source).await;
                        let _ = to_source.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self { seen, accepted, task }
    }

    /// Connections accepted so far.
    fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn take(self) -> Vec<u8> {
        self.task.abort();
        std::mem::take(&mut *self.seen.lock().expect("tap lock"))
    }
}

/// Runs storage and RAM between two QEMUs, the source reaching the destination's NBD server
/// and migration socket through taps; returns what the taps saw going to the destination.
async fn storage_and_ram_between_two_qemus(streams: Streams) -> Option<Vec<u8>> {
    use katamaran::dataplane::tls::{CredentialPair, Endpoint};
    use katamaran::migration::qemu::tls;
    let mut pair = qemu_pair::QemuPair::launch(DISK_SIZE).await?;
    let (src, dst) = (&pair.source, &pair.destination);
    let src_features = QemuFeatures::discover(&src.qmp).await.expect("source features");
    let dst_features = QemuFeatures::discover(&dst.qmp).await.expect("destination features");
    let (src_tls, dst_tls) = match streams {
        Streams::Plain => (None, None),
        Streams::Tls => {
            let creds = CredentialPair::generate("qemu-phases").expect("credentials");
            let d = tls::add(&dst.qmp, &pair.path("tls-dst"), "m-1", Endpoint::Server, &creds.server)
                .await
                .unwrap_or_else(|e| panic!("server credentials: {e:#}\n{}", dst.qemu.log()));
            let s = tls::add(&src.qmp, &pair.path("tls-src"), "m-1", Endpoint::Client, &creds.client)
                .await
                .unwrap_or_else(|e| panic!("client credentials: {e:#}\n{}", src.qemu.log()));
            assert!(!pair.path("tls-dst").exists() && !pair.path("tls-src").exists(), "key files removed");
            (Some(s), Some(d))
        }
    };
    tls::use_for_migration(&dst.qmp, dst_tls.as_ref()).await.expect("destination TLS parameters");
    tls::use_for_migration(&src.qmp, src_tls.as_ref()).await.expect("source TLS parameters");

    let src_disks = list_disks(&src.qmp).await.expect("source disks");
    let dst_disks = list_disks(&dst.qmp).await.expect("destination disks");
    assert_eq!(src_disks.len(), 1, "{src_disks:?}");
    let disk = &src_disks[0];
    assert_eq!(disk.drive_id, qemu_pair::DRIVE);
    assert_eq!((disk.virtual_size, disk.format.as_str(), disk.read_only), (DISK_SIZE as u64, "raw", false));
    assert_eq!(std::path::Path::new(&disk.file), src.image.as_path());
    let pairs = katamaran::migration::qemu::disks::pair_disks(&src_disks, &dst_disks).expect("pair");
    let targets: Vec<DiskInfo> = pairs.iter().map(|(_, target)| (*target).clone()).collect();

    // Storage: destination exports, source mirrors.
    let nbd = NbdAddress::from(pair.path("nbd.sock"));
    let exports = storage::export_disks(&dst.qmp, &nbd, &targets, dst_tls.as_ref()).await.expect("export");
    let nbd_tap = Tap::start(&pair.path("nbd-tap.sock"), pair.path("nbd.sock"));
    src.guest_write(0xa1, 0, 4096).await;
    let mut src_jobs_events = src.bus.subscribe();
    let started = Instant::now();
    let mut jobs = Vec::new();
    for (source, _) in &pairs {
        let name = exports.export_name(&source.drive_id).expect("exported");
        // As the engine does: a connected stream handed to the source's NBD client (`getfd`,
        // SocketAddress `fd`), not a path QEMU connects to.
        let conn =
            std::os::unix::net::UnixStream::connect(pair.path("nbd-tap.sock")).expect("connect the tap");
        let fd_name = format!("kmr-nbd-fd-{}", source.drive_id);
        src.qmp.getfd(&fd_name, std::os::fd::AsFd::as_fd(&conn)).await.expect("getfd");
        drop(conn);
        jobs.push(
            mirror::start_mirror(&src.qmp, source, &NbdAddress::Fd(fd_name.clone()), name, src_tls.as_ref())
                .await
                .unwrap_or_else(|e| panic!("mirror: {e:#}\n{}\n{}", src.qemu.log(), dst.qemu.log())),
        );
        // The NBD client took the descriptor: nothing is left for the engine to close.
        assert!(src.qmp.closefd(&fd_name).await.is_err(), "QEMU's NBD client owns {fd_name}");
    }
    src.guest_write(0xa2, 5 << 20, 65_536).await;
    let mut polls = 0;
    mirror::wait_ready(&src.qmp, &mut src_jobs_events, &jobs, QEMU_WAIT, |_| polls += 1)
        .await
        .expect("mirror ready");
    let mirror_time = started.elapsed();
    src.guest_write(0xa3, 17 << 20, 65_536).await;

    // Compute: pause before switch-over so storage can settle.
    let ram = RamConfig {
        downtime_limit: Duration::from_millis(300),
        max_bandwidth: None,
        multifd_channels: None,
        auto_converge: false,
        pause_before_switchover: true,
    };
    let mig = format!("unix:{}", pair.path("mig.sock").display());
    compute::configure_incoming(&dst.qmp, &dst_features, &ram).await.expect("incoming config");
    let mut dst_migration = dst.bus.subscribe();
    let mut dst_resume = dst.bus.subscribe();
    compute::start_incoming(&dst.qmp, &mig).await.expect("migrate-incoming");
    let ram_tap = Tap::start(&pair.path("mig-tap.sock"), pair.path("mig.sock"));
    compute::configure(&src.qmp, &src_features, &ram).await.expect("configure");
    let mut src_migration = src.bus.subscribe();
    let started = Instant::now();
    compute::start_outgoing(&src.qmp, &format!("unix:{}", pair.path("mig-tap.sock").display()))
        .await
        .expect("migrate");
    src.guest_write(0xa4, 30 << 20, 65_536).await;
    compute::wait_status(&src.qmp, &mut src_migration, MigrationStatus::PreSwitchover, QEMU_WAIT)
        .await
        .expect("pre-switchover");
    let ram_time = started.elapsed();

    // The pause: settle the mirrors, release the destination's disks, continue.
    let paused = Instant::now();
    mirror::complete_consistent(&src.qmp, &src.bus, &jobs, QEMU_WAIT).await.expect("consistent");
    let settled = paused.elapsed();
    storage::stop_exports(&dst.qmp, &dst.bus, &exports, QEMU_WAIT).await.expect("exports stopped");
    let pause_work = paused.elapsed();
    compute::continue_after_switchover(&src.qmp).await.expect("continue");
    let MigrationEnd::Completed(info) =
        compute::wait_terminal(&src.qmp, &mut src_migration, QEMU_WAIT).await.expect("source end")
    else {
        panic!("source did not complete:\n{}", src.qemu.log());
    };
    let dst_end = compute::wait_terminal(&dst.qmp, &mut dst_migration, QEMU_WAIT).await.expect("dest end");
    assert!(matches!(dst_end, MigrationEnd::Completed(_)), "{dst_end:?}\n{}", dst.qemu.log());
    dst_resume.wait_for(|e| e.name == "RESUME", QEMU_WAIT).await.expect("destination resumes");
    let total = started.elapsed();

    assert!(info.total_time.is_some_and(|t| !t.is_zero()), "totals filled in: {info:?}");
    assert!(info.downtime.is_some(), "downtime measured: {info:?}");
    let log = dst.qemu.log();
    assert!(!log.contains("Permission conflict"), "the export still held the disk:\n{log}");
    let dst_status = dst.qmp.query_status().await.expect("status");
    assert!(dst_status.running && dst_status.status == RunState::Running, "{dst_status:?}");
    let src_status = src.qmp.query_status().await.expect("status");
    assert_eq!(src_status.status, RunState::Postmigrate);
    assert_eq!(src.qmp.execute("query-block-jobs", None).await.expect("jobs"), json!([]));
    let nodes = mirror::node_names(&src.qmp).await.expect("nodes");
    assert!(!nodes.iter().any(|n| n.starts_with("kmr-")), "left behind: {nodes:?}");
    assert_eq!(dst.qmp.execute("query-block-exports", None).await.expect("exports"), json!([]));

    if let Some(creds) = &dst_tls {
        tls::remove(&dst.qmp, creds).await;
        let objects =
            dst.qmp.execute("qom-list", Some(json!({ "path": "/objects" }))).await.expect("objects");
        assert!(!objects.to_string().contains(&creds.id), "credentials left in the running VM: {objects}");
    }
    let mut seen = nbd_tap.take();
    seen.extend(ram_tap.take());
    eprintln!(
        "QEMU {} ({streams:?} streams): mirror of {} MiB ready in {mirror_time:?} ({polls} progress \
         reports); RAM to pre-switchover {ram_time:?}; pause work {pause_work:?} (mirrors settled \
         {settled:?}); QEMU downtime {:?}; migrate -> destination running {total:?}; {} MiB on the wire",
        src_features.version(),
        DISK_SIZE >> 20,
        info.downtime,
        seen.len() >> 20,
    );

    pair.source.qemu.kill();
    pair.destination.qemu.kill();
    let source = std::fs::read(&pair.source.image).expect("read source");
    let destination = std::fs::read(&pair.destination.image).expect("read destination");
    for (byte, offset) in [(0xa1_u8, 0_usize), (0xa2, 5 << 20), (0xa3, 17 << 20), (0xa4, 30 << 20)] {
        assert_eq!(source[offset], byte, "guest write at {offset} reached the source image");
    }
    assert_eq!(qemu_pair::first_difference(&source, &destination), None, "images differ");
    Some(seen)
}

/// Multifd RAM over TLS between two QEMUs: every channel (the main one and two multifd ones)
/// runs its own TLS session, the migration completes, and the tap in front of the destination
/// sees none of the guest's RAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_ram_over_tls_between_two_qemus() {
    use katamaran::dataplane::tls::{CredentialPair, Endpoint};
    use katamaran::migration::qemu::tls;
    let Some(pair) = qemu_pair::QemuPair::launch(DISK_SIZE).await else { return };
    let (src, dst) = (&pair.source, &pair.destination);
    let src_features = QemuFeatures::discover(&src.qmp).await.expect("source features");
    let dst_features = QemuFeatures::discover(&dst.qmp).await.expect("destination features");
    let creds = CredentialPair::generate("multifd").expect("credentials");
    let d = tls::add(&dst.qmp, &pair.path("tls-dst"), "m-2", Endpoint::Server, &creds.server)
        .await
        .expect("server credentials");
    let s = tls::add(&src.qmp, &pair.path("tls-src"), "m-2", Endpoint::Client, &creds.client)
        .await
        .expect("client credentials");
    tls::use_for_migration(&dst.qmp, Some(&d)).await.expect("destination TLS parameters");
    tls::use_for_migration(&src.qmp, Some(&s)).await.expect("source TLS parameters");
    let ram = RamConfig {
        downtime_limit: Duration::from_millis(300),
        max_bandwidth: None,
        multifd_channels: Some(2),
        auto_converge: false,
        pause_before_switchover: false,
    };
    compute::configure_incoming(&dst.qmp, &dst_features, &ram).await.expect("incoming config");
    let mut dst_migration = dst.bus.subscribe();
    compute::start_incoming(&dst.qmp, &format!("unix:{}", pair.path("mig.sock").display()))
        .await
        .expect("migrate-incoming");
    let tap = Tap::start(&pair.path("mig-tap.sock"), pair.path("mig.sock"));
    compute::configure(&src.qmp, &src_features, &ram).await.expect("configure");
    let mut src_migration = src.bus.subscribe();
    compute::start_outgoing(&src.qmp, &format!("unix:{}", pair.path("mig-tap.sock").display()))
        .await
        .expect("migrate");
    let end = compute::wait_terminal(&src.qmp, &mut src_migration, QEMU_WAIT).await.expect("source end");
    assert!(matches!(end, MigrationEnd::Completed(_)), "{end:?}\n{}\n{}", src.qemu.log(), dst.qemu.log());
    let dst_end = compute::wait_terminal(&dst.qmp, &mut dst_migration, QEMU_WAIT).await.expect("dest end");
    assert!(matches!(dst_end, MigrationEnd::Completed(_)), "{dst_end:?}\n{}", dst.qemu.log());
    let connections = tap.connections();
    let seen = tap.take();
    assert_eq!(connections, 3, "the main channel and two multifd channels went through the tap");
    // No kernel: the guest RAM that is not zero (firmware, tables) is under a megabyte.
    assert!(seen.len() > 256 << 10, "the RAM crossed the tap: {} bytes", seen.len());
    assert!(!contains(&seen, RAM_MARKER), "the firmware's string crossed a multifd channel in clear");
}

/// Cancelling during the mirror leaves no job and no NBD node on the source and no export on
/// the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_mirror_leaves_nothing_behind() {
    let Some(pair) = qemu_pair::QemuPair::launch(DISK_SIZE).await else { return };
    let (src, dst) = (&pair.source, &pair.destination);
    let nbd = NbdAddress::from(pair.path("nbd.sock"));
    let targets = list_disks(&dst.qmp).await.expect("destination disks");
    let exports = storage::export_disks(&dst.qmp, &nbd, &targets, None).await.expect("export");
    let disks = list_disks(&src.qmp).await.expect("source disks");
    let job = mirror::start_mirror(&src.qmp, &disks[0], &nbd, qemu_pair::DRIVE, None).await.expect("mirror");
    // Throttle the copy so the job is certainly still running when the cancel comes.
    src.qmp
        .execute("block-job-set-speed", Some(json!({"device": job.job_id, "speed": 1 << 20})))
        .await
        .expect("throttle");
    let listed = src.qmp.execute("query-block-jobs", None).await.expect("jobs");
    assert_eq!(listed[0]["ready"], json!(false), "{listed}");

    let jobs = [job];
    mirror::abort(&src.qmp, &src.bus, &jobs, QEMU_WAIT).await.expect("abort");
    assert_eq!(src.qmp.execute("query-block-jobs", None).await.expect("jobs"), json!([]));
    let nodes = src.qmp.execute("query-named-block-nodes", Some(json!({"flat": true}))).await.expect("nodes");
    let drivers: Vec<&str> =
        nodes.as_array().expect("list").iter().filter_map(|node| node["drv"].as_str()).collect();
    assert!(!drivers.contains(&"nbd"), "an NBD node is left: {nodes}");
    mirror::abort(&src.qmp, &src.bus, &jobs, QEMU_WAIT).await.expect("a second abort is a no-op");

    storage::stop_exports(&dst.qmp, &dst.bus, &exports, QEMU_WAIT).await.expect("exports stopped");
    assert_eq!(dst.qmp.execute("query-block-exports", None).await.expect("exports"), json!([]));
    let status = src.qmp.query_status().await.expect("status");
    assert!(status.running, "the source VM keeps running: {status:?}");
}

/// A capability this QEMU lacks is named with the QEMU version, by discovery on a real QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_capability_on_a_real_qemu() {
    let Some(mut qemu) = support::qemu::Qemu::launch(&[]) else { return };
    qemu.wait_for_qmp().await;
    let (qmp, _events) = QmpClient::connect(qemu.qmp_path(), &QmpConfig::default()).await.expect("connect");
    let features = QemuFeatures::discover(&qmp).await.expect("discover");
    for needed in [
        "events",
        "return-path",
        "late-block-activate",
        "multifd",
        "pause-before-switchover",
        "auto-converge",
    ] {
        assert!(features.has_capability(needed), "{needed} on QEMU {}", features.version());
    }
    for command in ["block-export-add", "blockdev-mirror", "migrate-continue", "nbd-server-start"] {
        features.require_command(command).expect("needed command");
    }
    let version = features.version().to_string();
    let error = features.require_capability("katamaran-none").expect_err("no QEMU has it");
    assert_eq!(
        error.to_string(),
        format!("QEMU {version} does not offer migration capability 'katamaran-none'")
    );
    // `switchover-ack` arrived in QEMU 8.1: a real capability Debian 12's QEMU lacks.
    if !features.version().at_least(8, 1) {
        let error = features.require_capability("switchover-ack").expect_err("added in 8.1");
        assert!(error.to_string().contains("'switchover-ack'"), "{error}");
    }
}
