//! Full runs of the plugin binary: the fake API server's port-forward streams lead to fake
//! `Migration` services (one per node) that record calls and stream scripted events.

#![allow(clippy::unwrap_used)]

mod support;

use katamaran_protos::v1::*;
use support::agent::Call;
use support::{Cluster, Options};

fn calls_of(c: &Cluster, node: &str) -> Vec<Call> {
    c.log.all().into_iter().filter(|(n, _)| n == node).map(|(_, c)| c).collect()
}

fn position(names: &[String], call: &str) -> usize {
    names.iter().position(|n| n == call).unwrap_or_else(|| panic!("no {call} in {names:?}"))
}

#[tokio::test]
async fn plain_streams_reach_both_agents_and_no_credentials_travel() {
    let c = Cluster::start(Options::default()).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "--plain-streams", "--dry-run"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("streams plain (unencrypted)"), "the plan says so: {}", run.stdout);
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "--plain-streams"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let prep = calls_of(&c, "node-b").into_iter().find_map(|c| match c {
        Call::PrepareIncoming(p) => Some(p),
        _ => None,
    });
    let start = calls_of(&c, "node-a").into_iter().find_map(|c| match c {
        Call::StartMigration(s) => Some(s),
        _ => None,
    });
    let (prep, start) = (prep.expect("PrepareIncoming"), start.expect("StartMigration"));
    assert!(prep.options.plain_streams && start.options.plain_streams);
    assert!(start.stream_tls.is_none(), "no credentials with plain streams: {:?}", start.stream_tls);
}

#[tokio::test]
async fn a_full_migration_reaches_both_agents_in_order_and_prints_json() {
    let c = Cluster::start(Options::default()).await;
    let run = c
        .run(&[
            "pod",
            "--direct",
            "web-0",
            "--to",
            "node-b",
            "-o",
            "json",
            "--wait-forwarding",
            "--downtime",
            "100ms",
            "--bandwidth",
            "1G",
            "--tunnel-mode",
            "gre",
            "--multifd-channels",
            "4",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");

    // Order: find and inspect on the source, prepare the destination, start the source, watch.
    let names = c.calls();
    let (list, inspect) = (position(&names, "node-a:ListSandboxes"), position(&names, "node-a:Inspect"));
    let (prepare, start) =
        (position(&names, "node-b:PrepareIncoming"), position(&names, "node-a:StartMigration"));
    let (watch_src, watch_dst) = (position(&names, "node-a:Watch"), position(&names, "node-b:Watch"));
    assert!(
        list < inspect && inspect < prepare && prepare < start && start < watch_src && start < watch_dst,
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.ends_with(":Cancel")), "nothing cancelled: {names:?}");

    let Some(Call::PrepareIncoming(prep)) =
        calls_of(&c, "node-b").into_iter().find(|c| matches!(c, Call::PrepareIncoming(_)))
    else {
        panic!("no PrepareIncoming")
    };
    let Some(Call::StartMigration(start)) =
        calls_of(&c, "node-a").into_iter().find(|c| matches!(c, Call::StartMigration(_)))
    else {
        panic!("no StartMigration")
    };
    // The same id, secret and options reached both sides.
    assert!(prep.migration_id.starts_with("mig-"), "{}", prep.migration_id);
    assert_eq!(start.migration_id, prep.migration_id);
    assert!(prep.secret.len() >= 32, "secret of {} bytes", prep.secret.len());
    assert_eq!(start.secret, prep.secret);
    assert_eq!(start.options, prep.options);
    let o = prep.options.as_ref().unwrap();
    assert_eq!(o.downtime_limit_ms, 100);
    assert_eq!(o.max_bandwidth_bytes_per_second, 1 << 30);
    assert_eq!(o.tunnel_mode.enum_value(), Ok(TunnelMode::TUNNEL_MODE_GRE));
    assert_eq!(o.multifd_channels, 4);
    assert!(o.auto_converge && !o.shared_storage);
    // The destination got the inspected sandbox and its command line; the source got what the
    // destination answered.
    assert_eq!(prep.source_sandbox.id, "3f2a9c");
    assert_eq!(prep.source_qemu_argv, support::web_sandbox().qemu_argv);
    assert_eq!(prep.source_node_address, "192.0.2.1", "the node's InternalIP when the agent reports none");
    assert_eq!(start.sandbox_id, "3f2a9c");
    assert_eq!(start.destination_node_address, "192.0.2.2");
    assert_eq!(start.endpoints.ram_endpoint, "192.0.2.2:40001");
    assert_eq!(start.endpoints.nbd_endpoints[0].drive_id, "drive-0");
    assert!(!o.plain_streams, "encrypted streams by default");
    assert_eq!(
        start.stream_tls.ca_pem,
        format!("ca of {}", prep.migration_id),
        "the destination's stream credentials reach the source unchanged"
    );
    assert_eq!(
        (start.stream_tls.cert_pem.as_str(), start.stream_tls.key_pem.as_str()),
        ("client cert", "client key")
    );
    for (_, call) in c.log.all() {
        if let Call::Watch(w) = call {
            assert_eq!(w.migration_id, prep.migration_id);
        }
    }

    // stdout is exactly one JSON document with the figures.
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("one JSON document on stdout");
    assert_eq!(doc["result"], "succeeded");
    assert_eq!(doc["migrationId"], prep.migration_id.as_str());
    assert_eq!(doc["sandboxId"], "3f2a9c");
    assert_eq!(doc["destinationSandboxId"], "3f2a9c-incoming");
    assert_eq!(doc["source"]["node"], "node-a");
    assert_eq!(doc["destination"]["address"], "192.0.2.2");
    assert_eq!(doc["downtimeMs"], 115);
    assert_eq!(doc["stopToRouteSwapNs"], 104_000);
    assert_eq!(doc["resumeToPlugReleaseNs"], 87_000);
    assert_eq!(doc["plugDroppedPackets"], 3);
    assert_eq!(doc["options"]["tunnelMode"], "gre");
    let phases = |side: &str| -> Vec<(String, f64)> {
        doc["phases"][side]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["phase"].as_str().unwrap().to_owned(), p["durationMs"].as_f64().unwrap()))
            .collect()
    };
    let expect = |v: &[(&str, f64)]| v.iter().map(|(p, d)| ((*p).to_owned(), *d)).collect::<Vec<_>>();
    assert_eq!(
        phases("source"),
        expect(&[
            ("preparing", 10.0),
            ("storage", 1000.0),
            ("ram", 2000.0),
            ("cutover", 180.0),
            ("forwarding", 30000.0)
        ])
    );
    assert_eq!(
        phases("destination"),
        expect(&[("preparing", 10.0), ("storage", 1000.0), ("ram", 2000.0), ("cutover", 175.0)])
    );
    assert!(doc["error"].is_null());
}

#[tokio::test]
async fn yaml_output_is_the_json_document_as_yaml() {
    let c = Cluster::start(Options::default()).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "-o", "yaml"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let doc: serde_json::Value = serde_saphyr::from_str(&run.stdout).expect("one YAML document on stdout");
    assert_eq!(doc["result"], "succeeded", "{}", run.stdout);
    assert_eq!(doc["pod"]["name"], "web-0");
    assert_eq!(doc["destination"]["node"], "node-b");
    assert!(doc["migrationId"].as_str().is_some_and(|id| id.starts_with("mig-")), "{doc:#}");
    assert!(run.stdout.lines().any(|l| l.starts_with("result: ")), "YAML keys at the top: {}", run.stdout);
}

#[tokio::test]
async fn the_run_ends_once_the_vm_runs_on_the_destination() {
    // The source forwards stragglers and never reports COMPLETED here.
    let c = Cluster::start(Options { source: support::source_success(true), ..Options::default() }).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let out = &run.stdout;
    for want in [
        "source      ram        RAM pre-copy; 256.0 MiB of 512.0 MiB sent, 120.0 MiB/s",
        "destination completed  VM resumed",
        "PHASE        SOURCE       DESTINATION",
        "cutover      180.0 ms     175.0 ms",
        "forwarding   running      -",
        "QEMU downtime           115 ms",
        "STOP → route swap       104 µs",
        "RESUME → plug release   87 µs",
        "plug drops              3 packets",
        "result                  succeeded",
        "note: the source node keeps forwarding the VM's traffic until that node's route to the VM is taken over",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert!(!c.calls().iter().any(|n| n.ends_with(":Cancel")), "{:?}", c.calls());
}

#[tokio::test]
async fn a_failing_destination_cancels_the_source_and_exits_1() {
    let mut failed = support::event(Phase::PHASE_FAILED, 20, "migration failed");
    let r = failed.result.mut_or_insert_default();
    r.error_kind = ErrorKind::ERROR_KIND_QEMU.into();
    r.error_message = "destination QEMU exited with status 1".into();
    let destination =
        support::agent::Script { events: vec![support::event(Phase::PHASE_PREPARING, 0, "ready"), failed] };
    let c =
        Cluster::start(Options { source: support::stuck_in_ram(), destination, ..Options::default() }).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "-o", "json"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");

    let cancels: Vec<CancelRequest> = calls_of(&c, "node-a")
        .into_iter()
        .filter_map(|c| if let Call::Cancel(r) = c { Some(r) } else { None })
        .collect();
    assert_eq!(cancels.len(), 1, "the source was cancelled once: {:?}", c.calls());
    assert!(
        cancels[0].reason.contains("the destination failed: destination QEMU exited with status 1"),
        "{}",
        cancels[0].reason
    );
    assert!(
        !calls_of(&c, "node-b").iter().any(|c| matches!(c, Call::Cancel(_))),
        "the failed side needs no cancel"
    );

    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["result"], "failed");
    assert_eq!(doc["error"]["side"], "destination");
    assert_eq!(doc["error"]["kind"], "QEMU");
    assert_eq!(doc["error"]["message"], "destination QEMU exited with status 1");
    assert!(run.stderr.contains("destination QEMU exited with status 1"), "{}", run.stderr);
}

#[tokio::test]
async fn a_source_that_refuses_to_start_leaves_nothing_on_the_destination() {
    let c = Cluster::start(Options {
        refuse_start: Some((
            ErrorKind::ERROR_KIND_FAILED_PRECONDITION,
            "sandbox 3f2a9c is already migrating",
        )),
        ..Options::default()
    })
    .await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b"]).await;
    assert_eq!(run.code, Some(2), "a refusal: {run:?}");
    assert!(
        run.stderr.contains("FAILED_PRECONDITION: sandbox 3f2a9c is already migrating"),
        "{}",
        run.stderr
    );
    let names = c.calls();
    assert!(position(&names, "node-a:StartMigration") < position(&names, "node-b:Cancel"), "{names:?}");
    assert!(!names.iter().any(|n| n.ends_with(":Watch")), "{names:?}");
}

#[tokio::test]
async fn ctrl_c_cancels_through_the_source_and_exits_130() {
    let c = Cluster::start(Options {
        source: support::stuck_in_ram(),
        destination: support::stuck_in_ram(),
        ..Options::default()
    })
    .await;
    let child = c.command(&["pod", "--direct", "web-0", "--to", "node-b"]).spawn().unwrap();
    // Interrupt once both sides are being watched, i.e. the migration is under way.
    c.log
        .wait_until("both watches", |calls| {
            ["node-a", "node-b"]
                .iter()
                .all(|node| calls.iter().any(|(n, c)| n == node && matches!(c, Call::Watch(_))))
        })
        .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let run = support::wait(child).await;
    assert_eq!(run.code, Some(130), "{run:?}");

    // Through the owner only: the source tells the destination.
    for (node, expected) in [("node-a", 1), ("node-b", 0)] {
        let cancels: Vec<CancelRequest> = calls_of(&c, node)
            .into_iter()
            .filter_map(|c| if let Call::Cancel(r) = c { Some(r) } else { None })
            .collect();
        assert_eq!(cancels.len(), expected, "{node}: {:?}", c.calls());
        assert!(cancels.iter().all(|c| c.reason.contains("Ctrl-C")), "{cancels:?}");
    }
    assert!(run.stdout.contains("result                  cancelled"), "{}", run.stdout);
    assert!(
        run.stderr.contains("cancelled: both sides rolled back; the pod keeps running on node-a"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn timeout_cancels_through_the_source_and_exits_1() {
    let c = Cluster::start(Options {
        source: support::stuck_in_ram(),
        destination: support::stuck_in_ram(),
        ..Options::default()
    })
    .await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b", "--timeout", "1s", "-o", "json"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["result"], "failed");
    assert_eq!(doc["error"]["kind"], "TIMEOUT");
    let cancels: Vec<String> = c.calls().into_iter().filter(|n| n.ends_with(":Cancel")).collect();
    assert_eq!(cancels, ["node-a:Cancel"], "through the source only: {:?}", c.calls());
}

#[tokio::test]
async fn direct_refuses_a_target_agent_without_tls_before_anything_starts() {
    // Whatever answers behind node-b's port-forward speaks plain ttrpc: not an agent of this
    // cluster as far as the plugin can tell.
    let c = Cluster::start(Options { destination_presents: None, ..Options::default() }).await;
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("mutual TLS with the katamaran agent of node node-b failed"),
        "{}",
        run.stderr
    );
    assert!(
        !c.calls().iter().any(|x| x.ends_with(":PrepareIncoming") || x.ends_with(":StartMigration")),
        "{:?}",
        c.calls()
    );
}

#[tokio::test]
async fn direct_needs_the_agents_ca() {
    let c = Cluster::start(Options::default()).await;
    {
        let secrets = support::store::find_type("", "v1", "secrets").unwrap();
        let mut st = c.api.state.lock().unwrap();
        st.store.delete(&secrets, Some(support::AGENT_NS), katamaran::peer::CA_SECRET).unwrap();
    }
    let run = c.run(&["pod", "--direct", "web-0", "--to", "node-b"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("cannot read the agents' CA, Secret katamaran-system/katamaran-agent-ca")
            && run.stderr.contains("katamaran-agent ca init"),
        "{}",
        run.stderr
    );
    assert!(c.calls().is_empty(), "{:?}", c.calls());
}
