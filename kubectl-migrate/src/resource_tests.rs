#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use katamaran::cluster::controller::engine_options;
use katamaran_api::v1alpha1::{condition, MigrationStatus, Summary};

use super::*;

#[test]
fn the_flags_become_the_resources_options_and_back_unchanged() {
    assert_eq!(options(&MigrationOptions::default()), Options::default(), "the same defaults");
    let o = MigrationOptions {
        storage: StorageMode::Shared,
        downtime_limit: Duration::from_micros(2500),
        auto_downtime: true,
        max_bandwidth: Some(500 << 20),
        multifd_channels: Some(4),
        auto_converge: false,
        tunnel_mode: EngineTunnel::Ip6gre,
        tunnel_idle_timeout: Duration::from_secs(90),
        plug_limit: Some(1 << 20),
        storage_timeout: Duration::from_secs(600),
        ram_timeout: Duration::from_millis(1500),
        plain_streams: true,
    };
    let r = options(&o);
    assert_eq!((r.downtime.as_str(), r.bandwidth.as_deref()), ("2.5ms", Some("500Mi")));
    assert_eq!(r.tunnel_idle_timeout.as_deref(), Some("90s"));
    let back = engine_options(&r.resolve().unwrap());
    assert_eq!(format!("{back:?}"), format!("{o:?}"), "what the agents run is what was asked");
}

#[test]
fn a_bandwidth_is_written_in_the_largest_exact_unit() {
    assert_eq!(bandwidth(1 << 30), "1Gi");
    assert_eq!(bandwidth(3 << 20), "3Mi");
    assert_eq!(bandwidth(1536), "1536", "1.5 KiB is no whole number of KiB");
    assert_eq!(bandwidth(1000), "1000");
    for b in [1u64, 1000, 1536, 1 << 20, 123_456_789, 999 << 30] {
        assert_eq!(units::parse_bandwidth(&bandwidth(b)), Ok(b), "{b}");
    }
}

#[test]
fn the_created_migration_lets_the_api_server_name_it() {
    let m = new_migration("web-0", "node-b", Options::default());
    assert_eq!(m.metadata.name, None);
    assert_eq!(m.metadata.generate_name.as_deref(), Some("web-0-to-node-b-"));
    assert_eq!((m.spec.pod.as_str(), m.spec.target_node.as_str(), m.spec.cancel), ("web-0", "node-b", false));
    let long = "p".repeat(253);
    let m = new_migration(&long, "node-b", Options::default());
    assert!(m.metadata.generate_name.unwrap().len() <= 248);
}

fn migration(phase: Phase, owner: Option<Owner>, accepted: Option<bool>) -> Migration {
    let mut m = new_migration("web-0", "node-b", Options::default());
    let mut s = MigrationStatus { phase: Some(phase), owner, ..MigrationStatus::default() };
    if let Some(ok) = accepted {
        s.conditions.push(Condition {
            type_: condition::ACCEPTED.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: if ok { condition::VALIDATED } else { condition::POD_BUSY }.into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        });
    }
    m.status = Some(s);
    m
}

#[test]
fn the_verdict_follows_the_owner_and_the_phase() {
    use Phase::*;
    let dst = Some(Owner::Destination);
    let src = Some(Owner::Source);
    let table = [
        (migration(Pending, None, None), false, Verdict::Running),
        (migration(Ram, src, Some(true)), false, Verdict::Running),
        (migration(Forwarding, dst, Some(true)), false, Verdict::Moved),
        (migration(Forwarding, dst, Some(true)), true, Verdict::Running),
        (migration(Completed, dst, Some(true)), true, Verdict::Moved),
        // After the commit a failure still leaves the VM on the target: moved.
        (migration(Failed, dst, Some(true)), false, Verdict::Moved),
        (migration(Failed, src, Some(true)), false, Verdict::Ended { phase: Failed, refused: false }),
        (migration(Failed, src, Some(false)), false, Verdict::Ended { phase: Failed, refused: true }),
        (migration(Cancelled, src, Some(true)), false, Verdict::Ended { phase: Cancelled, refused: false }),
    ];
    for (m, wait, want) in table {
        assert_eq!(
            verdict(&m, wait),
            want,
            "{:?} owner {:?} wait {wait}",
            m.phase(),
            m.status.as_ref().unwrap().owner
        );
    }
}

#[test]
fn lines_come_on_a_phase_change_and_progress_at_most_every_two_seconds() {
    let t0 = Instant::now();
    let mut lines = Lines::default();
    let mut m = migration(Phase::Ram, Some(Owner::Source), Some(true));
    let st = m.status.as_mut().unwrap();
    st.message = Some("RAM pre-copy".into());
    st.summary = Some(Summary { downtime: "~18ms".into(), progress: "50% pass 2".into() });
    assert_eq!(lines.line(&m, t0).unwrap(), "Ram        50% pass 2, downtime ~18ms — RAM pre-copy");
    assert_eq!(lines.line(&m, t0 + Duration::from_secs(1)), None);
    assert_eq!(lines.line(&m, t0 + Duration::from_secs(2)).unwrap(), "Ram        50% pass 2, downtime ~18ms");
    let mut done = migration(Phase::Forwarding, Some(Owner::Destination), Some(true));
    done.status.as_mut().unwrap().message = Some("the VM runs on node-b".into());
    assert_eq!(lines.line(&done, t0 + Duration::from_secs(2)).unwrap(), "Forwarding — the VM runs on node-b");
}

#[test]
fn names_are_checked_as_the_api_server_checks_them() {
    for ok in ["web-0", "a", "node-b.example.com", &"a".repeat(253)] {
        assert_eq!(check_name("pod", ok), Ok(()), "{ok}");
    }
    for bad in ["", "Web", "web_0", "-web", "web-", "a..b", "wéb", &"a".repeat(254), "web 0"] {
        let e = check_name("--to node", bad).unwrap_err();
        assert!(e.starts_with("--to node ") && e.contains("not a valid Kubernetes name"), "{bad}: {e}");
    }
}
