//! The QMP client against a scripted fake QMP server on a temporary unix socket.

mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use katamaran::qmp::{
    ErrorClass, EventReceiver, MigrationCapability, MigrationStatus, QmpClient, QmpConfig, QmpError,
    QmpEvent, RunState,
};
use serde_json::{json, Value};
use support::fake_qmp::{FakeConn, FakeQmp, STEP_DEADLINE};
use tokio::task::JoinHandle;

fn config() -> QmpConfig {
    QmpConfig {
        handshake_deadline: Duration::from_secs(5),
        command_deadline: Duration::from_secs(5),
        ..QmpConfig::default()
    }
}

/// Starts a fake that accepts one client and runs `script` on the connection.
/// The task owns the fake (and its temporary directory), so both go away with it.
fn serve<F, Fut>(script: F) -> (PathBuf, JoinHandle<()>)
where
    F: FnOnce(FakeConn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let fake = FakeQmp::bind();
    let path = fake.path().to_owned();
    let server = tokio::spawn(async move {
        let conn = fake.accept().await;
        script(conn).await;
    });
    (path, server)
}

/// Starts a fake that performs the handshake and then runs `script`; returns the connected
/// client.
async fn connected<F, Fut>(config: &QmpConfig, script: F) -> (QmpClient, EventReceiver, JoinHandle<()>)
where
    F: FnOnce(FakeConn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (path, server) = serve(|mut conn| async move {
        conn.handshake().await;
        script(conn).await;
    });
    let (qmp, events) = QmpClient::connect(&path, config).await.expect("handshake with the fake");
    (qmp, events, server)
}

async fn finish(server: JoinHandle<()>) {
    tokio::time::timeout(STEP_DEADLINE, server)
        .await
        .expect("fake script finishes in time")
        .expect("fake script succeeded");
}

async fn next_event(events: &mut EventReceiver) -> QmpEvent {
    tokio::time::timeout(STEP_DEADLINE, events.recv())
        .await
        .expect("event arrives in time")
        .expect("event channel still open")
}

async fn expect_events_end(events: &mut EventReceiver) {
    let next = tokio::time::timeout(STEP_DEADLINE, events.recv()).await.expect("event channel ends in time");
    assert!(next.is_none(), "event channel should end, got {next:?}");
}

#[tokio::test]
async fn handshake_exposes_the_greeting() {
    let (qmp, _events, server) = connected(&config(), |mut conn| async move {
        conn.expect_eof().await;
    })
    .await;
    let greeting = qmp.greeting();
    assert_eq!((greeting.version.major, greeting.version.minor, greeting.version.micro), (7, 2, 22));
    assert_eq!(greeting.version.package, "Debian 1:7.2+dfsg-7");
    assert_eq!(greeting.capabilities, ["oob", "future-cap"]);
    assert!(qmp.is_connected());
    drop(qmp);
    finish(server).await;
}

#[tokio::test]
async fn missing_greeting_times_out() {
    let (path, server) = serve(|mut conn| async move {
        // Say nothing; the client must give up and hang up.
        conn.expect_eof().await;
    });
    let config = QmpConfig { handshake_deadline: Duration::from_millis(200), ..config() };
    let err = QmpClient::connect(&path, &config).await.expect_err("no greeting");
    assert!(
        matches!(err, QmpError::GreetingTimeout { deadline } if deadline == Duration::from_millis(200)),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "QEMU sent no QMP greeting within 200ms");
    finish(server).await;
}

#[tokio::test]
async fn closed_before_greeting_is_reported() {
    let (path, server) = serve(|conn| async move { conn.close() });
    let err = QmpClient::connect(&path, &config()).await.expect_err("closed");
    assert!(matches!(err, QmpError::GreetingClosed), "{err:?}");
    assert!(err.is_closed());
    finish(server).await;
}

#[tokio::test]
async fn first_line_that_is_not_a_greeting_is_refused() {
    for first in [r#"{"return": {}}"#, "220 smtp.example ESMTP", "[1, 2, 3]"] {
        let (path, server) = serve(move |mut conn| async move {
            conn.send_line(first).await;
            conn.expect_eof().await;
        });
        let err = QmpClient::connect(&path, &config()).await.expect_err("not a greeting");
        let QmpError::NotAGreeting { excerpt } = &err else {
            panic!("expected NotAGreeting for {first:?}, got {err:?}");
        };
        assert_eq!(excerpt, first);
        assert!(err.to_string().contains("is not a QMP greeting"), "{err}");
        finish(server).await;
    }
}

#[tokio::test]
async fn connecting_to_a_missing_socket_names_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.sock");
    let err = QmpClient::connect(&path, &config()).await.expect_err("no socket");
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

#[tokio::test]
async fn error_reply_names_command_class_and_desc() {
    let (qmp, _events, server) = connected(&config(), |mut conn| async move {
        let command = conn.expect_command("blockdev-add").await;
        assert_eq!(command.arguments, Some(json!({"node-name": "disk0"})));
        conn.reply_error(&command, "GenericError", "Duplicate nodes with node-name='disk0'").await;
        let command = conn.expect_command("query-status").await;
        conn.reply(&command, json!({"running": true, "status": "running"})).await;
    })
    .await;
    let err =
        qmp.execute("blockdev-add", Some(json!({"node-name": "disk0"}))).await.expect_err("error reply");
    assert_eq!(err.class(), Some(&ErrorClass::GenericError));
    assert_eq!(
        err.to_string(),
        "QMP command `blockdev-add` failed: GenericError: Duplicate nodes with node-name='disk0'"
    );
    let status = qmp.query_status().await.expect("an error reply fails only its command");
    assert!(status.running);
    finish(server).await;
}

#[tokio::test]
async fn events_before_and_between_replies_are_all_kept_in_wire_order() {
    const BURST: usize = 500;
    let (qmp, mut events, server) = connected(&config(), |mut conn| async move {
        conn.send_event("EARLY", json!({"n": -1})).await;
        let command = conn.expect_command("stop").await;
        for n in 0..BURST {
            conn.send_event("TICK", json!({ "n": n })).await;
        }
        conn.send_event("STOP", Value::Null).await;
        conn.reply(&command, json!({})).await;
        conn.send_event("LATE", json!({})).await;
    })
    .await;
    qmp.stop().await.expect("stop is matched despite the events");

    // Everything QEMU sent before the reply is queued by the time `stop` returns.
    let first = events.try_recv().expect("EARLY queued before the reply");
    assert_eq!((first.name.as_str(), &first.data), ("EARLY", &json!({"n": -1})));
    for n in 0..BURST {
        let tick = events.try_recv().expect("every TICK queued before the reply");
        assert_eq!(tick.name, "TICK");
        assert_eq!(tick.data, json!({ "n": n }), "events keep wire order");
    }
    let stop = events.try_recv().expect("STOP queued before the reply");
    assert_eq!(stop.name, "STOP");
    assert_eq!(stop.data, Value::Null);
    let latency = stop.delivery_latency().expect("the fake stamps events");
    assert!(latency < STEP_DEADLINE, "{latency:?}");

    assert_eq!(next_event(&mut events).await.name, "LATE");
    finish(server).await;
}

#[tokio::test]
async fn concurrent_commands_from_clones_match_out_of_order_replies() {
    let (qmp, mut events, server) = connected(&config(), |mut conn| async move {
        let mut received = Vec::new();
        for _ in 0..3 {
            received.push(conn.recv_command().await);
        }
        // Answer in reverse order, one reply echoing its id as a string, an event in between.
        received.reverse();
        for (index, command) in received.iter().enumerate() {
            let answer = json!({ "answer-to": command.name });
            if index == 1 {
                let id = command.id.to_string();
                conn.send(json!({"return": answer, "id": id})).await;
            } else {
                conn.reply(command, answer).await;
            }
            if index == 0 {
                conn.send_event("BETWEEN", json!({})).await;
            }
        }
    })
    .await;
    let (a, b, c) = (qmp.clone(), qmp.clone(), qmp);
    let (ra, rb, rc) = tokio::join!(
        tokio::spawn(async move { a.execute("cmd-a", None).await }),
        tokio::spawn(async move { b.execute("cmd-b", None).await }),
        tokio::spawn(async move { c.execute("cmd-c", None).await }),
    );
    for (result, name) in [(ra, "cmd-a"), (rb, "cmd-b"), (rc, "cmd-c")] {
        let value = result.expect("task").expect("reply");
        assert_eq!(value, json!({ "answer-to": name }));
    }
    assert_eq!(next_event(&mut events).await.name, "BETWEEN");
    finish(server).await;
}

#[tokio::test]
async fn oversized_line_fails_the_connection() {
    let config = QmpConfig { max_line: 1024, ..config() };
    let (qmp, mut events, server) = connected(&config, |mut conn| async move {
        conn.expect_command("query-status").await;
        let huge = format!("{{\"return\": \"{}\"}}", "x".repeat(4096));
        conn.send_line(&huge).await;
        // The client lets go of the socket, freeing QEMU's single monitor slot.
        conn.expect_eof().await;
    })
    .await;
    let err = qmp.query_status().await.expect_err("line over the cap");
    let QmpError::ConnectionFailed { command, source } = &err else {
        panic!("expected ConnectionFailed, got {err:?}");
    };
    assert_eq!(command, "query-status");
    assert!(matches!(**source, QmpError::LineTooLong { limit: 1024 }), "{source:?}");
    assert_eq!(source.to_string(), "QEMU sent a QMP line longer than the 1024-byte cap");

    let later = qmp.execute("cont", None).await.expect_err("connection is gone");
    assert!(matches!(&later, QmpError::ConnectionFailed { command, .. } if command == "cont"), "{later:?}");
    assert!(!qmp.is_connected());
    expect_events_end(&mut events).await;
    finish(server).await;
}

#[tokio::test]
async fn eof_mid_command_says_qemu_closed_the_connection() {
    let (qmp, mut events, server) = connected(&config(), |mut conn| async move {
        conn.expect_command("query-migrate").await;
        conn.close();
    })
    .await;
    let err = qmp.query_migrate().await.expect_err("closed mid-command");
    assert!(err.is_closed(), "{err:?}");
    assert_eq!(err.to_string(), "QMP command `query-migrate` failed: QEMU closed the connection");
    let later = qmp.cont().await.expect_err("closed for later calls too");
    assert_eq!(later.to_string(), "QMP command `cont` failed: QEMU closed the connection");
    expect_events_end(&mut events).await;
    finish(server).await;
}

#[tokio::test]
async fn garbage_json_fails_the_connection() {
    let (qmp, mut events, server) = connected(&config(), |mut conn| async move {
        conn.expect_command("query-status").await;
        conn.send_line(r#"{"return": oops"#).await;
        conn.expect_eof().await;
    })
    .await;
    let err = qmp.query_status().await.expect_err("garbage");
    let QmpError::ConnectionFailed { command, source } = &err else {
        panic!("expected ConnectionFailed, got {err:?}");
    };
    assert_eq!(command, "query-status");
    assert!(matches!(**source, QmpError::InvalidJson { .. }), "{source:?}");
    assert_eq!(source.to_string(), r#"QEMU sent a QMP line that is not JSON: {"return": oops"#);
    expect_events_end(&mut events).await;
    finish(server).await;
}

#[tokio::test]
async fn unknown_members_values_and_kinds_are_tolerated() {
    let (qmp, mut events, server) = connected(&config(), |mut conn| async move {
        conn.send(json!({"future-kind": {"x": 1}})).await;
        conn.send(json!({"event": "FUTURE_EVENT", "data": {"a": [1]}, "future-member": 1})).await;

        let command = conn.expect_command("query-status").await;
        conn.reply(
            &command,
            json!({"running": false, "status": "hibernating", "singlestep": false, "new": {}}),
        )
        .await;

        let command = conn.expect_command("query-migrate").await;
        conn.reply(
            &command,
            json!({
                "status": "teleporting", "future-stat": 7, "expected-downtime": 300,
                "ram": {"transferred": 1, "remaining": 2, "total": 3, "mbps": 1.5,
                        "dirty-pages-rate": 4, "dirty-sync-count": 5, "future-ram-stat": 6}
            }),
        )
        .await;

        let command = conn.expect_command("query-migrate-capabilities").await;
        conn.reply(
            &command,
            json!([
                {"capability": "events", "state": true},
                {"capability": "warp-drive", "state": false, "note": "new"}
            ]),
        )
        .await;

        let command = conn.expect_command("query-version").await;
        conn.send(json!({"id": command.id, "return": {"qemu": {"major": 11, "minor": 0, "micro": 0,
            "nano": 1}, "package": "", "extra": true}, "future-reply-member": 1}))
            .await;

        let command = conn.expect_command("migrate").await;
        conn.reply_error(&command, "FutureErrorClass", "something new").await;
        conn.expect_eof().await;
    })
    .await;

    let status = qmp.query_status().await.expect("unknown run state tolerated");
    assert!(!status.running);
    assert_eq!(status.status, RunState::Other("hibernating".into()));

    let migration = qmp.query_migrate().await.expect("unknown status tolerated");
    assert_eq!(migration.status, Some(MigrationStatus::Other("teleporting".into())));
    assert_eq!(migration.expected_downtime, Some(Duration::from_millis(300)));
    let ram = migration.ram.expect("ram stats");
    assert_eq!((ram.transferred, ram.remaining, ram.total), (Some(1), Some(2), Some(3)));
    assert_eq!((ram.dirty_pages_rate, ram.dirty_sync_count), (Some(4), Some(5)));

    let capabilities = qmp.query_migrate_capabilities().await.expect("unknown capability tolerated");
    assert_eq!(capabilities.len(), 2);
    assert_eq!(capabilities[0].capability, MigrationCapability::Events);
    assert!(capabilities[0].state);
    assert_eq!(capabilities[1].capability, MigrationCapability::Other("warp-drive".into()));

    let version = qmp.query_version().await.expect("extra members tolerated");
    assert_eq!((version.major, version.minor), (11, 0));

    let err = qmp.execute("migrate", None).await.expect_err("error reply");
    assert_eq!(err.class(), Some(&ErrorClass::Other("FutureErrorClass".into())));

    // The unknown message kind was skipped; the event after it arrived intact, without a
    // timestamp.
    let event = next_event(&mut events).await;
    assert_eq!(event.name, "FUTURE_EVENT");
    assert_eq!(event.data, json!({"a": [1]}));
    assert_eq!(event.qemu_timestamp, None);
    assert!(qmp.is_connected());
    drop(qmp);
    finish(server).await;
}

#[tokio::test]
async fn deadline_expiry_names_the_command_and_late_replies_are_dropped() {
    let (timed_out_tx, timed_out_rx) = tokio::sync::oneshot::channel::<()>();
    let (qmp, _events, server) = connected(&config(), |mut conn| async move {
        let slow = conn.expect_command("slow-command").await;
        timed_out_rx.await.expect("test reports the timeout");
        // The late reply must not be taken for the next command's.
        conn.reply(&slow, json!({"late": true})).await;
        let next = conn.expect_command("query-status").await;
        conn.reply(&next, json!({"running": true, "status": "running"})).await;
        conn.expect_eof().await;
    })
    .await;
    let deadline = Duration::from_millis(100);
    let err = qmp.execute_with_deadline("slow-command", None, deadline).await.expect_err("no reply");
    assert!(
        matches!(&err, QmpError::Timeout { command, deadline: d } if command == "slow-command" && *d == deadline),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "QMP command `slow-command` got no reply within 100ms");
    timed_out_tx.send(()).expect("fake waits");
    let status = qmp.query_status().await.expect("own reply");
    assert_eq!(status.status, RunState::Running);
    assert!(qmp.is_connected());
    drop(qmp);
    finish(server).await;
}

#[tokio::test]
async fn fd_is_passed_with_scm_rights() {
    const PAYLOAD: &[u8] = b"authenticated migration stream";
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    ours.write_all(PAYLOAD).expect("write payload");

    let (qmp, _events, server) = connected(&config(), |mut conn| async move {
        let command = conn.expect_command("getfd").await;
        assert_eq!(command.arguments, Some(json!({"fdname": "migration"})));
        let fd = conn.take_fd().expect("descriptor passed with the command");
        let mut received = std::os::unix::net::UnixStream::from(fd);
        received.set_read_timeout(Some(STEP_DEADLINE)).expect("read timeout");
        let mut buf = vec![0_u8; PAYLOAD.len()];
        received.read_exact(&mut buf).expect("read through the passed fd");
        assert_eq!(buf, PAYLOAD);
        received.write_all(b"ack").expect("write back");
        conn.reply(&command, json!({})).await;
    })
    .await;
    qmp.getfd("migration", &theirs).await.expect("getfd");

    // The fake wrote through the descriptor it received, and our own copy stays open.
    ours.set_read_timeout(Some(STEP_DEADLINE)).expect("read timeout");
    let mut ack = [0_u8; 3];
    ours.read_exact(&mut ack).expect("read ack");
    assert_eq!(&ack, b"ack");
    assert!(theirs.peer_addr().is_ok(), "the caller keeps its descriptor");
    finish(server).await;
}

#[tokio::test]
async fn dropping_the_last_handle_hangs_up() {
    let (qmp, mut events, server) = connected(&config(), |mut conn| async move {
        conn.expect_eof().await;
    })
    .await;
    let clone = qmp.clone();
    drop(qmp);
    assert!(clone.is_connected(), "a clone keeps the connection");
    drop(clone);
    expect_events_end(&mut events).await;
    finish(server).await;
}
