//! The generated async client against the generated async server, over a real unix socket.
//!
//! The test service is a small in-memory stand-in for the node agent: it knows one sandbox,
//! records what it was sent, and keeps per-migration event channels so Watch can stream.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use katamaran_protos::async_trait;
use katamaran_protos::protobuf::reflect::{ReflectFieldRef, ReflectValueRef};
use katamaran_protos::protobuf::{MessageDyn, MessageField};
use katamaran_protos::ttrpc::r#async::{Server, ServerStreamSender, TtrpcContext};
use katamaran_protos::ttrpc::{self, Code};
use katamaran_protos::v1::*;
use tokio::sync::broadcast;

/// Upper bound for any single step; generous so slow CI machines do not flake.
const STEP: Duration = Duration::from_secs(10);

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(STEP)
}

// ---------------------------------------------------------------------------------------------
// Fixtures

fn rich_sandbox() -> Sandbox {
    let mut s = Sandbox::new();
    s.id = "3f2a9c".into();
    s.pod_name = "web-0".into();
    s.pod_namespace = "shop".into();
    s.pod_uid = "7d0c6a1e-0000-4000-8000-000000000001".into();
    s.netns_path = "/var/run/netns/cni-1234".into();
    s.qmp_socket = "/run/vc/vm/3f2a9c/extra-monitor.sock".into();
    s.qemu_pid = 4242;
    s.qemu_version = "7.2.0".into();
    s.run_state = VmRunState::VM_RUN_STATE_RUNNING.into();
    s.qemu_status = "running".into();
    let net = s.network.mut_or_insert_default();
    net.interface_name = "eth0".into();
    net.tap_name = "tap0_kata".into();
    net.mac_address = "02:42:0a:f4:01:07".into();
    net.mtu = 1450;
    for (address, prefix_length) in [("10.244.1.7", 24), ("fd00::7", 64)] {
        let mut ip = IpAddress::new();
        ip.address = address.into();
        ip.prefix_length = prefix_length;
        net.addresses.push(ip);
    }
    let mut disk = Disk::new();
    disk.drive_id = "drive-virtio-disk0".into();
    disk.node_name = "node-disk0".into();
    disk.file_path = "/var/lib/katamaran/images/web-0.qcow2".into();
    disk.size_bytes = 192 << 20;
    disk.format = "qcow2".into();
    disk.read_only = true;
    s.disks.push(disk);
    s.annotations.insert("io.kubernetes.cri.container-type".into(), "sandbox".into());
    s.annotations.insert("io.katacontainers.config.hypervisor.default_memory".into(), "512".into());
    s.qemu_argv = ["/opt/kata/bin/qemu-system-x86_64", "-name", "sandbox-3f2a9c", "-daemonize"]
        .map(String::from)
        .to_vec();
    s.node_address = "10.201.0.11".into();
    s
}

fn rich_options() -> MigrationOptions {
    let mut o = MigrationOptions::new();
    o.shared_storage = true;
    o.downtime_limit_ms = 300;
    o.auto_downtime = true;
    o.max_bandwidth_bytes_per_second = 125_000_000;
    o.multifd_channels = 4;
    o.auto_converge = true;
    o.tunnel_mode = TunnelMode::TUNNEL_MODE_GRE.into();
    o.tunnel_idle_timeout_ms = 30_000;
    o.plug_limit_bytes = 8 << 20;
    o.storage_timeout_ms = 120_000;
    o.ram_timeout_ms = 600_000;
    o.plain_streams = true;
    o
}

fn rich_stream_tls() -> StreamTls {
    let mut t = StreamTls::new();
    t.ca_pem = "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n".into();
    t.cert_pem = "-----BEGIN CERTIFICATE-----\nleaf\n-----END CERTIFICATE-----\n".into();
    t.key_pem = "-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n".into();
    t
}

fn rich_endpoints() -> DestinationEndpoints {
    let mut e = DestinationEndpoints::new();
    e.ram_endpoint = "192.0.2.20:40001".into();
    let mut nbd = NbdEndpoint::new();
    nbd.drive_id = "drive-virtio-disk0".into();
    nbd.endpoint = "[2001:db8::20]:40002".into();
    e.nbd_endpoints.push(nbd);
    e.node_addresses = vec!["10.201.0.12".into(), "fd00:201::12".into()];
    e
}

fn rich_prepare_request() -> PrepareIncomingRequest {
    let mut r = PrepareIncomingRequest::new();
    r.migration_id = "mig-42".into();
    r.secret = (0..=255u8).collect();
    r.source_sandbox = MessageField::some(rich_sandbox());
    r.source_qemu_argv = rich_sandbox().qemu_argv;
    r.options = MessageField::some(rich_options());
    r.source_node_address = "192.0.2.10".into();
    r
}

fn rich_prepare_response() -> PrepareIncomingResponse {
    let mut r = PrepareIncomingResponse::new();
    r.destination_sandbox_id = "3f2a9c-incoming".into();
    r.endpoints = MessageField::some(rich_endpoints());
    r.destination_node_address = "192.0.2.20".into();
    r.stream_tls = MessageField::some(rich_stream_tls());
    r
}

fn rich_start_request() -> StartMigrationRequest {
    let mut r = StartMigrationRequest::new();
    r.sandbox_id = rich_sandbox().id;
    r.migration_id = "mig-42".into();
    r.secret = vec![0, 1, 0xfe, 0xff];
    r.destination_node_address = "192.0.2.20".into();
    r.endpoints = MessageField::some(rich_endpoints());
    r.options = MessageField::some(rich_options());
    r.stream_tls = MessageField::some(rich_stream_tls());
    r
}

fn event(migration_id: &str, sequence: u64, phase: Phase) -> MigrationEvent {
    let mut e = MigrationEvent::new();
    e.migration_id = migration_id.into();
    e.role = Role::ROLE_SOURCE.into();
    e.phase = phase.into();
    e.sequence = sequence;
    e.timestamp_unix_nanos = 1_700_000_000_000_000_000 + sequence;
    e.message = format!("event {sequence}");
    match phase {
        Phase::PHASE_RAM => {
            let ram = e.ram.mut_or_insert_default();
            ram.transferred_bytes = sequence << 20;
            ram.remaining_bytes = (100 - sequence.min(100)) << 20;
            ram.iteration = sequence;
        }
        Phase::PHASE_COMPLETED => fill_terminal(&mut e),
        _ => {}
    }
    e
}

/// Gives a terminal event every figure a finished migration reports.
fn fill_terminal(e: &mut MigrationEvent) {
    let mut drive = DriveProgress::new();
    drive.drive_id = "drive-virtio-disk0".into();
    drive.total_bytes = 192 << 20;
    drive.done_bytes = 192 << 20;
    drive.ready = true;
    e.storage.mut_or_insert_default().drives.push(drive);

    let ram = e.ram.mut_or_insert_default();
    ram.transferred_bytes = 140 << 20;
    ram.remaining_bytes = 1 << 20;
    ram.total_bytes = 512 << 20;
    ram.dirty_pages_rate = 1_200;
    ram.iteration = 4;
    ram.throughput_bytes_per_second = 141_000_000;
    ram.expected_downtime_ms = 22;
    ram.page_size_bytes = 4096;

    let cut = e.cutover.mut_or_insert_default();
    cut.stop_unix_nanos = 1_700_000_000_100_000_000;
    cut.route_swapped_unix_nanos = cut.stop_unix_nanos + 95_000;
    cut.route_swap_latency_nanos = 95_000;
    cut.resume_unix_nanos = cut.stop_unix_nanos + 115_000_000;
    cut.plug_released_unix_nanos = cut.resume_unix_nanos + 60_000;
    cut.plug_release_latency_nanos = 60_000;
    cut.downtime_ms = 115;

    let result = e.result.mut_or_insert_default();
    result.success = true;
    // Set only so that every field crosses the wire; a success carries UNSPECIFIED.
    result.error_kind = ErrorKind::ERROR_KIND_INTERNAL.into();
    result.error_message = "none".into();
    result.total_ms = 7_300;
    result.downtime_ms = 115;
    result.plug_dropped_packets = 2;
}

/// Asserts that every field of `message`, recursively, holds a non-default value, so a
/// round-trip comparison really covers every field (and a field added to the proto later
/// must be added to the fixtures too).
fn assert_every_field_set(message: &dyn MessageDyn, path: &str) {
    let descriptor = message.descriptor_dyn();
    for field in descriptor.fields() {
        let name = format!("{path}.{}", field.name());
        match field.get_reflect(message) {
            ReflectFieldRef::Optional(value) => match value.value() {
                None => panic!("{name} is not set"),
                Some(ReflectValueRef::Message(inner)) => assert_every_field_set(&*inner, &name),
                Some(_) => {}
            },
            ReflectFieldRef::Repeated(values) => {
                assert!(!values.is_empty(), "{name} is empty");
                for i in 0..values.len() {
                    if let ReflectValueRef::Message(inner) = values.get(i) {
                        assert_every_field_set(&*inner, &format!("{name}[{i}]"));
                    }
                }
            }
            ReflectFieldRef::Map(entries) => assert!(!entries.is_empty(), "{name} is empty"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test service

#[derive(Default)]
struct State {
    prepared: Vec<PrepareIncomingRequest>,
    started: Vec<StartMigrationRequest>,
    /// Per migration: its latest event and the channel live events go out on.
    migrations: HashMap<String, (MigrationEvent, broadcast::Sender<MigrationEvent>)>,
}

#[derive(Default)]
struct TestService {
    state: Mutex<State>,
}

impl TestService {
    /// Records `event` as the latest of its migration and sends it to current watchers.
    fn publish(&self, event: MigrationEvent) {
        let mut state = self.state.lock().unwrap();
        let (latest, tx) = state.migrations.get_mut(&event.migration_id).unwrap();
        *latest = event.clone();
        // No watcher is fine: the latest event is kept for the next one.
        let _ = tx.send(event);
    }
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    ErrorKind::ERROR_KIND_NOT_FOUND.rpc_error(format!("{what} {id:?} not found"))
}

#[async_trait]
impl Migration for TestService {
    async fn inspect(&self, _: &TtrpcContext, req: InspectRequest) -> ttrpc::Result<Sandbox> {
        let sandbox = rich_sandbox();
        if req.sandbox_id == sandbox.id {
            Ok(sandbox)
        } else {
            Err(not_found("sandbox", &req.sandbox_id))
        }
    }

    async fn list_sandboxes(
        &self,
        _: &TtrpcContext,
        _: ListSandboxesRequest,
    ) -> ttrpc::Result<ListSandboxesResponse> {
        let mut resp = ListSandboxesResponse::new();
        resp.sandboxes.push(rich_sandbox());
        Ok(resp)
    }

    async fn list_migrations(
        &self,
        _: &TtrpcContext,
        _: ListMigrationsRequest,
    ) -> ttrpc::Result<ListMigrationsResponse> {
        let state = self.state.lock().unwrap();
        let mut resp = ListMigrationsResponse::new();
        for (id, (latest, _)) in &state.migrations {
            let mut status = MigrationStatus::new();
            status.migration_id = id.clone();
            status.sandbox_id = rich_sandbox().id;
            status.role = latest.role;
            status.phase = latest.phase;
            status.started_unix_nanos = 1_700_000_000_000_000_000;
            status.last_event = MessageField::some(latest.clone());
            status.peer_node_address = "192.0.2.20".into();
            resp.migrations.push(status);
        }
        Ok(resp)
    }

    async fn prepare_incoming(
        &self,
        _: &TtrpcContext,
        req: PrepareIncomingRequest,
    ) -> ttrpc::Result<PrepareIncomingResponse> {
        self.state.lock().unwrap().prepared.push(req);
        Ok(rich_prepare_response())
    }

    async fn start_migration(
        &self,
        _: &TtrpcContext,
        req: StartMigrationRequest,
    ) -> ttrpc::Result<StartMigrationResponse> {
        if req.migration_id.is_empty() {
            return Err(ErrorKind::ERROR_KIND_INVALID_ARGUMENT.rpc_error("migration_id is empty"));
        }
        if req.sandbox_id != rich_sandbox().id {
            return Err(not_found("sandbox", &req.sandbox_id));
        }
        let mut state = self.state.lock().unwrap();
        if state.migrations.contains_key(&req.migration_id) {
            return Err(ErrorKind::ERROR_KIND_FAILED_PRECONDITION
                .rpc_error(format!("migration {:?} already exists", req.migration_id)));
        }
        let first = event(&req.migration_id, 1, Phase::PHASE_PREPARING);
        let (tx, _) = broadcast::channel(1024);
        state.migrations.insert(req.migration_id.clone(), (first, tx));
        let mut resp = StartMigrationResponse::new();
        resp.migration_id = req.migration_id.clone();
        state.started.push(req);
        Ok(resp)
    }

    async fn watch(
        &self,
        _: &TtrpcContext,
        req: WatchRequest,
        stream: ServerStreamSender<MigrationEvent>,
    ) -> ttrpc::Result<()> {
        // Subscribe and read the latest event under one lock so nothing falls in between.
        let (latest, mut rx) = {
            let state = self.state.lock().unwrap();
            let Some((latest, tx)) = state.migrations.get(&req.migration_id) else {
                return Err(not_found("migration", &req.migration_id));
            };
            (latest.clone(), tx.subscribe())
        };
        let mut terminal = latest.phase.enum_value().is_ok_and(Phase::is_terminal);
        stream.send(&latest).await?;
        while !terminal {
            let event = rx.recv().await.map_err(|e| ErrorKind::ERROR_KIND_INTERNAL.rpc_error(e))?;
            terminal = event.phase.enum_value().is_ok_and(Phase::is_terminal);
            stream.send(&event).await?;
        }
        Ok(())
    }

    async fn cancel(&self, _: &TtrpcContext, req: CancelRequest) -> ttrpc::Result<CancelResponse> {
        let latest = {
            let state = self.state.lock().unwrap();
            let Some((latest, _)) = state.migrations.get(&req.migration_id) else {
                return Err(not_found("migration", &req.migration_id));
            };
            latest.clone()
        };
        let mut resp = CancelResponse::new();
        match latest.phase.enum_value() {
            Ok(phase) if !phase.is_cancellable() => resp.phase = phase.into(),
            _ => {
                let mut cancelled = event(&req.migration_id, latest.sequence + 1, Phase::PHASE_CANCELLED);
                cancelled.message = req.reason;
                let result = cancelled.result.mut_or_insert_default();
                result.error_kind = ErrorKind::ERROR_KIND_CANCELLED.into();
                self.publish(cancelled);
                resp.cancelled = true;
                resp.phase = Phase::PHASE_CANCELLED.into();
            }
        }
        Ok(resp)
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

/// A server on a socket in its own temporary directory. The directory (and the socket in it)
/// is removed on drop; the server's tasks end with the test's runtime.
struct Harness {
    service: Arc<TestService>,
    client: MigrationClient,
    server: Server,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("katamaran-protos").tempdir().unwrap();
        let address = format!("unix://{}", dir.path().join("migration.sock").display());
        let service = Arc::new(TestService::default());
        let mut server =
            Server::new().bind(&address).unwrap().register_service(create_migration(service.clone()));
        server.start().await.unwrap();
        let client = MigrationClient::connect(&address).await.unwrap();
        Harness { service, client, server, _dir: dir }
    }

    /// Starts migration `mig-42` through the client, as a caller would.
    async fn start_migration(&self) {
        let resp = self.client.start_migration(ctx(), &rich_start_request()).await.unwrap();
        assert_eq!(resp.migration_id, "mig-42");
    }

    async fn stop(mut self) {
        tokio::time::timeout(STEP, self.server.shutdown()).await.unwrap().unwrap();
    }
}

fn rpc_status(err: ttrpc::Error) -> (Code, String) {
    match err {
        ttrpc::Error::RpcStatus(status) => (status.code(), status.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn fixtures_set_every_field() {
    assert_every_field_set(&rich_sandbox(), "Sandbox");
    assert_every_field_set(&rich_prepare_request(), "PrepareIncomingRequest");
    assert_every_field_set(&rich_prepare_response(), "PrepareIncomingResponse");
    assert_every_field_set(&rich_start_request(), "StartMigrationRequest");
}

#[test]
fn field_check_catches_an_unset_field() {
    let mut options = rich_options();
    options.multifd_channels = 0;
    let caught = std::panic::catch_unwind(|| assert_every_field_set(&options, "MigrationOptions"));
    assert!(caught.is_err(), "an unset multifd_channels must be reported");
}

#[tokio::test]
async fn inspect_returns_every_sandbox_field() {
    let h = Harness::start().await;
    let mut req = InspectRequest::new();
    req.sandbox_id = "3f2a9c".into();
    let sandbox = h.client.inspect(ctx(), &req).await.unwrap();
    assert_eq!(sandbox, rich_sandbox());
    assert_eq!(sandbox.network.addresses[1].address, "fd00::7");
    assert_eq!(sandbox.disks[0].size_bytes, 192 << 20);
    assert_eq!(sandbox.annotations["io.kubernetes.cri.container-type"], "sandbox");

    let list = h.client.list_sandboxes(ctx(), &ListSandboxesRequest::new()).await.unwrap();
    assert_eq!(list.sandboxes, [rich_sandbox()]);
    h.stop().await;
}

#[tokio::test]
async fn prepare_and_start_carry_every_field_both_ways() {
    let h = Harness::start().await;

    let prepared = h.client.prepare_incoming(ctx(), &rich_prepare_request()).await.unwrap();
    assert_eq!(prepared, rich_prepare_response());

    // The source is started with what the destination answered, as the CLI does.
    let mut start = rich_start_request();
    start.endpoints = prepared.endpoints.clone();
    start.destination_node_address = prepared.destination_node_address.clone();
    let resp = h.client.start_migration(ctx(), &start).await.unwrap();
    assert_eq!(resp.migration_id, "mig-42");

    {
        let state = h.service.state.lock().unwrap();
        assert_eq!(state.prepared, [rich_prepare_request()]);
        assert_eq!(state.started, [start]);
        assert_eq!(state.started[0].secret, [0, 1, 0xfe, 0xff]);
        assert_eq!(state.started[0].options.tunnel_mode.enum_value(), Ok(TunnelMode::TUNNEL_MODE_GRE));
    }

    let list = h.client.list_migrations(ctx(), &ListMigrationsRequest::new()).await.unwrap();
    assert_eq!(list.migrations.len(), 1);
    assert_eq!(list.migrations[0].migration_id, "mig-42");
    assert_eq!(list.migrations[0].phase.enum_value(), Ok(Phase::PHASE_PREPARING));
    h.stop().await;
}

#[tokio::test]
async fn watch_streams_events_in_order_then_ends() {
    const N: u64 = 200;
    let h = Harness::start().await;
    h.start_migration().await;

    let mut req = WatchRequest::new();
    req.migration_id = "mig-42".into();
    let mut events = h.client.watch(ctx(), &req).await.unwrap();

    // The first event is the latest one recorded; once it arrives the watcher is subscribed.
    let first = tokio::time::timeout(STEP, events.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(first, event("mig-42", 1, Phase::PHASE_PREPARING));

    let expected: Vec<MigrationEvent> = (2..=N)
        .map(|seq| {
            let phase = match seq {
                s if s == N => Phase::PHASE_COMPLETED,
                s if s == N - 1 => Phase::PHASE_FORWARDING,
                s if s == N - 2 => Phase::PHASE_CUTOVER,
                s if s < 10 => Phase::PHASE_STORAGE,
                _ => Phase::PHASE_RAM,
            };
            event("mig-42", seq, phase)
        })
        .collect();
    for e in &expected {
        h.service.publish(e.clone());
    }

    let mut received = Vec::new();
    while let Some(e) = tokio::time::timeout(STEP, events.recv()).await.unwrap().unwrap() {
        received.push(e);
        assert!(received.len() <= expected.len(), "stream did not end after the terminal event");
    }
    assert_eq!(received.len(), expected.len());
    for (got, want) in received.iter().zip(&expected) {
        assert_eq!(got, want, "event {}", want.sequence);
    }
    let last = received.last().unwrap();
    assert_eq!(last.phase.enum_value(), Ok(Phase::PHASE_COMPLETED));
    assert!(last.result.success);
    assert_eq!(last.cutover.route_swap_latency_nanos, 95_000);

    // The finished migration is listed with its terminal event, every field intact.
    let list = h.client.list_migrations(ctx(), &ListMigrationsRequest::new()).await.unwrap();
    let status = &list.migrations[0];
    assert_every_field_set(status, "MigrationStatus");
    assert_eq!(status.phase.enum_value(), Ok(Phase::PHASE_COMPLETED));
    assert_eq!(&*status.last_event, last);
    h.stop().await;
}

#[tokio::test]
async fn server_error_reaches_the_client_with_code_and_message() {
    let h = Harness::start().await;
    let mut req = InspectRequest::new();
    req.sandbox_id = "nope".into();
    let err = h.client.inspect(ctx(), &req).await.unwrap_err();
    assert_eq!(rpc_status(err), (Code::NOT_FOUND, r#"sandbox "nope" not found"#.to_owned()));

    let mut bad = rich_start_request();
    bad.migration_id.clear();
    let err = h.client.start_migration(ctx(), &bad).await.unwrap_err();
    assert_eq!(rpc_status(err), (Code::INVALID_ARGUMENT, "migration_id is empty".to_owned()));

    h.start_migration().await;
    let err = h.client.start_migration(ctx(), &rich_start_request()).await.unwrap_err();
    assert_eq!(
        rpc_status(err),
        (Code::FAILED_PRECONDITION, r#"migration "mig-42" already exists"#.to_owned())
    );
    h.stop().await;
}

#[tokio::test]
async fn watch_of_unknown_migration_fails_with_not_found() {
    let h = Harness::start().await;
    let mut req = WatchRequest::new();
    req.migration_id = "ghost".into();
    // The error may surface when the stream opens or on its first read, depending on timing.
    let err = match h.client.watch(ctx(), &req).await {
        Err(err) => err,
        Ok(mut events) => match tokio::time::timeout(STEP, events.recv()).await.unwrap() {
            Err(err) => err,
            Ok(event) => panic!("expected NOT_FOUND, got {event:?}"),
        },
    };
    assert_eq!(rpc_status(err), (Code::NOT_FOUND, r#"migration "ghost" not found"#.to_owned()));
    h.stop().await;
}

#[tokio::test]
async fn cancel_of_unknown_migration_fails() {
    let h = Harness::start().await;
    let mut req = CancelRequest::new();
    req.migration_id = "ghost".into();
    req.reason = "user pressed Ctrl-C".into();
    let err = h.client.cancel(ctx(), &req).await.unwrap_err();
    assert_eq!(rpc_status(err), (Code::NOT_FOUND, r#"migration "ghost" not found"#.to_owned()));
    h.stop().await;
}

#[tokio::test]
async fn cancel_ends_a_running_migration_once() {
    let h = Harness::start().await;
    h.start_migration().await;

    let mut watch = WatchRequest::new();
    watch.migration_id = "mig-42".into();
    let mut events = h.client.watch(ctx(), &watch).await.unwrap();
    let first = tokio::time::timeout(STEP, events.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.phase.enum_value(), Ok(Phase::PHASE_PREPARING));

    let mut req = CancelRequest::new();
    req.migration_id = "mig-42".into();
    req.reason = "user pressed Ctrl-C".into();
    let resp = h.client.cancel(ctx(), &req).await.unwrap();
    assert!(resp.cancelled);
    assert_eq!(resp.phase.enum_value(), Ok(Phase::PHASE_CANCELLED));

    // The watcher sees the CANCELLED event with the reason, then the end of the stream.
    let last = tokio::time::timeout(STEP, events.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(last.phase.enum_value(), Ok(Phase::PHASE_CANCELLED));
    assert_eq!(last.message, "user pressed Ctrl-C");
    assert_eq!(last.result.error_kind.enum_value(), Ok(ErrorKind::ERROR_KIND_CANCELLED));
    assert!(tokio::time::timeout(STEP, events.recv()).await.unwrap().unwrap().is_none());

    // A second cancel finds the migration already ended.
    let again = h.client.cancel(ctx(), &req).await.unwrap();
    assert!(!again.cancelled);
    assert_eq!(again.phase.enum_value(), Ok(Phase::PHASE_CANCELLED));
    h.stop().await;
}

#[tokio::test]
async fn cancel_after_the_cutover_started_leaves_the_migration_running() {
    let h = Harness::start().await;
    h.start_migration().await;
    h.service.publish(event("mig-42", 2, Phase::PHASE_CUTOVER));

    let mut req = CancelRequest::new();
    req.migration_id = "mig-42".into();
    let resp = h.client.cancel(ctx(), &req).await.unwrap();
    assert!(!resp.cancelled);
    assert_eq!(resp.phase.enum_value(), Ok(Phase::PHASE_CUTOVER));

    let list = h.client.list_migrations(ctx(), &ListMigrationsRequest::new()).await.unwrap();
    assert_eq!(list.migrations[0].phase.enum_value(), Ok(Phase::PHASE_CUTOVER));
    h.stop().await;
}
