//! One katamaran migration in a fresh lab: guest on node-a, agents on both nodes, the probe
//! from the client, the orchestration every caller uses (`katamaran::cluster::orchestrate`) from
//! this process, numbers from its `Report`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use katamaran::client;
use katamaran::cluster::orchestrate::{self, Plan, Report, Route, Settings, Side};
use katamaran::cluster::transport::Agent as AgentClient;
use katamaran::migration::options::{MigrationOptions, StorageMode};
use katamaran::qmp::{MigrationInfo, QmpClient, QmpConfig};
use katamaran_e2e::{Node, ProbeReport};
use katamaran_protos::v1 as pb;
use tokio::runtime::Runtime;

use crate::agents::Agent;
use crate::cases::{Case, Storage};
use crate::guest::{self, ID, PROBE_TARGET};
use crate::report::{m, Mark, Run};
use crate::RunConfig;

/// Runs one katamaran migration of `case`; a failure is recorded in the returned run.
pub fn run(rt: &Runtime, cfg: &RunConfig, case: &Case, n: u32) -> Run {
    let mut run = Run::new(n, guest::load_1m());
    if let Err(e) = measure(rt, cfg, case, &mut run) {
        run.ok = false;
        run.error = Some(format!("{e:#}"));
    }
    run
}

fn measure(rt: &Runtime, cfg: &RunConfig, case: &Case, run: &mut Run) -> anyhow::Result<()> {
    let mut lab = guest::lab_up()?;
    let paths = guest::start(&lab, case, &cfg.guest)?;
    let agent_bin = cfg.bin_dir.join("katamaran-agent");
    let agents = rt.block_on(async {
        let a = Agent::start(&lab, Node::A, &agent_bin).await?;
        let b = Agent::start(&lab, Node::B, &agent_bin).await?;
        anyhow::Ok((a, b))
    })?;
    let probe = lab.spawn_probe(PROBE_TARGET, case.rate_pps)?;
    // A stretch of steady traffic before the move (a measurement window, not a wait: the probe
    // counts only after its first echo came back).
    std::thread::sleep(cfg.before);

    let options = MigrationOptions {
        storage: match case.storage {
            Storage::Shared => StorageMode::Shared,
            Storage::Local => StorageMode::Local,
        },
        plain_streams: case.plain_streams,
        ..MigrationOptions::default()
    };
    let settings = Settings {
        timeout: Some(cfg.timeout),
        wait_forwarding: false,
        cancel_grace: orchestrate::DEFAULT_CANCEL_GRACE,
        stopped_by: "the benchmark",
        stop_hint: "",
    };
    let (src_ep, dst_ep) = (agents.0.endpoint.clone(), agents.1.endpoint.clone());
    let drive_started = SystemTime::now();
    let driven = rt.block_on(async {
        let src = AgentClient::over_client(client::connect(&src_ep).await?, "node-a");
        let dst = AgentClient::over_client(client::connect(&dst_ep).await?, "node-b");
        let plan = Plan {
            route: Route::of_sandbox(ID, &src, &dst),
            options,
            sandbox: src.inspect(ID).await?,
            migration_id: client::new_migration_id()?,
        };
        // Never set: the benchmark stops a run only by its timeout.
        let (_stop, never) = tokio::sync::watch::channel(false);
        let report = orchestrate::run(&plan, &src, &dst, &settings, never, &mut ()).await?;
        anyhow::Ok(report)
    });
    std::thread::sleep(cfg.after);
    let report = probe.stop(Duration::from_secs(15)).context("the probe did not report")?;
    record_probe(run, &report);
    if driven.is_ok() {
        guest::record_health(run, &guest::incoming_console(&lab), case);
    }

    let summary = match driven {
        Ok(s) => s,
        Err(e) => {
            return Err(e.context(format!(
                "katamaran could not drive the migration\nagent node-a:\n{}\nagent node-b:\n{}",
                agents.0.log_tail(8),
                agents.1.log_tail(8)
            )))
        }
    };
    record_summary(run, &summary, drive_started);
    record_losses(run, &report, drive_started);
    run.ok = summary.succeeded() && !summary.stopped();
    if !run.ok {
        run.error =
            Some(summary.failure().unwrap_or_else(|| format!("did not finish within {:?}", cfg.timeout)));
    } else {
        // QEMU's own figures for the whole migration, from the monitor Kata's shim would hold
        // (katamaran's agent has the other one); the source stays paused, so they stay there.
        let info = rt.block_on(source_migration_info(&paths.qmp))?;
        record_qemu(run, &info);
    }
    drop(agents);
    lab.down()?;
    Ok(())
}

/// The probe's counts.
pub fn record_probe(run: &mut Run, r: &ProbeReport) {
    run.set(m::SENT, Some(r.sent as f64));
    run.set(m::LOST, Some(r.lost as f64));
    run.set(m::DUPLICATED, Some(r.duplicated as f64));
    run.set(m::REORDERED, Some(r.reordered as f64));
    run.set(m::GAP_MS, Some(r.longest_gap_ms));
}

/// The probe's lost packets on the run's timeline, so that a lossy run shows where its losses
/// sit among the cutover's events.
fn record_losses(run: &mut Run, r: &ProbeReport, started: SystemTime) {
    if r.started_unix_ms <= 0.0 {
        return;
    }
    let start_ms = started.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e3);
    for l in &r.loss_timeline {
        let seqs = if l.first_seq == l.last_seq {
            format!("seq {}", l.first_seq)
        } else {
            format!("seq {}..={}", l.first_seq, l.last_seq)
        };
        run.timeline.push(Mark {
            side: "probe",
            phase: "lost".into(),
            message: format!("{seqs} lost (sent over {:.1} ms)", l.end_ms - l.start_ms),
            at_ms: r.started_unix_ms + l.start_ms - start_ms,
        });
    }
    run.timeline.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// MB/s (10^6 bytes) of `bytes` over `d`.
pub fn mb_per_s(bytes: u64, d: Duration) -> Option<f64> {
    (d > Duration::ZERO && bytes > 0).then(|| bytes as f64 / 1e6 / d.as_secs_f64())
}

fn nonzero(v: u64) -> Option<f64> {
    (v > 0).then_some(v as f64)
}

/// `query-migrate` on a source QEMU after its migration.
///
/// # Errors
/// When its monitor does not answer.
pub async fn source_migration_info(qmp: &Path) -> anyhow::Result<MigrationInfo> {
    let (client, _events) = QmpClient::connect(qmp, &QmpConfig::default()).await?;
    Ok(client.query_migrate().await?)
}

/// QEMU's total time, RAM bytes and downtime; RAM throughput over QEMU's total time (the same
/// definition for both drivers, whatever phases katamaran reports).
pub fn record_qemu(run: &mut Run, info: &MigrationInfo) {
    run.set(m::QEMU_TOTAL_MS, info.total_time.map(ms));
    let bytes = info.ram.as_ref().and_then(|r| r.transferred).unwrap_or(0);
    run.set(m::RAM_MIB, nonzero(bytes).map(|b| b / f64::from(1u32 << 20)));
    run.set(m::RAM_MB_S, info.total_time.and_then(|t| mb_per_s(bytes, t)));
    if !run.metrics.contains_key(m::DOWNTIME_MS) {
        run.set(m::DOWNTIME_MS, info.downtime.map(ms));
    }
}

fn record_summary(run: &mut Run, s: &Report, started: SystemTime) {
    run.set(m::TOTAL_MS, Some(ms(s.elapsed)));
    let start_ns = started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()) as f64;
    for (side, e) in &s.events {
        run.timeline.push(Mark {
            side: match side {
                Side::Source => "source",
                Side::Destination => "destination",
            },
            phase: format!("{:?}", client::phase(e)).trim_start_matches("PHASE_").to_lowercase(),
            message: e.message.clone(),
            at_ms: (e.timestamp_unix_nanos as f64 - start_ns) / 1e6,
        });
    }
    let source_starts = run.timeline.iter().find(|k| k.side == "source").map(|k| k.at_ms);
    run.set(m::DST_PREPARE_MS, source_starts);
    let phases = s.phase_durations(Side::Source);
    let phase = |p: pb::Phase| phases.iter().find(|(q, _)| *q == p).map(|(_, d)| *d);
    run.set(m::PREPARE_MS, phase(pb::Phase::PHASE_PREPARING).map(ms));
    let source_events = || s.events.iter().filter(|(side, _)| *side == Side::Source).map(|(_, e)| e);
    if let Some(storage) = phase(pb::Phase::PHASE_STORAGE) {
        let bytes = source_events()
            .filter_map(|e| e.storage.as_ref())
            .map(|st| st.drives.iter().map(|d| d.total_bytes).sum::<u64>())
            .max()
            .unwrap_or(0);
        run.set(m::STORAGE_MS, Some(ms(storage)));
        run.set(m::STORAGE_MB_S, mb_per_s(bytes, storage));
    }
    let ram_bytes =
        source_events().filter_map(|e| e.ram.as_ref()).map(|r| r.transferred_bytes).max().unwrap_or(0);
    run.set(m::RAM_MS, phase(pb::Phase::PHASE_RAM).map(ms));
    run.set(m::RAM_MIB, nonzero(ram_bytes).map(|b| b / f64::from(1u32 << 20)));
    let src = s.cutover(Side::Source);
    let dst = s.cutover(Side::Destination);
    let downtime = src
        .map(|c| c.downtime_ms)
        .filter(|d| *d > 0)
        .or_else(|| s.terminal(Side::Destination).and_then(|e| e.result.as_ref()).map(|r| r.downtime_ms));
    run.set(m::DOWNTIME_MS, downtime.map(|d| d as f64));
    // From the instants rather than the reported latency: katamaran may swap the route before
    // the VM stops (then the latency field is 0 and the difference negative).
    let instant = |v: u64| (v > 0).then_some(i128::from(v));
    let stop = src.and_then(|c| instant(c.stop_unix_nanos));
    let swapped = src.and_then(|c| instant(c.route_swapped_unix_nanos));
    let resumed = dst.and_then(|c| instant(c.resume_unix_nanos));
    run.set(m::STOP_TO_SWAP_US, stop.zip(swapped).map(|(st, sw)| (sw - st) as f64 / 1e3));
    run.set(m::STOP_TO_RESUME_MS, stop.zip(resumed).map(|(st, re)| (re - st) as f64 / 1e6));
    run.set(
        m::RESUME_TO_RELEASE_US,
        dst.and_then(|c| nonzero(c.plug_release_latency_nanos)).map(|n| n / 1e3),
    );
    let dropped =
        s.terminal(Side::Destination).and_then(|e| e.result.as_ref()).map(|r| r.plug_dropped_packets);
    run.set(m::PLUG_DROPPED, dropped.map(|d| d as f64));
}

#[cfg(test)]
mod tests {
    use super::*;
    use katamaran_e2e::reports::LossRun;

    #[test]
    fn losses_land_on_the_runs_timeline_in_order() {
        let started = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut run = Run::new(1, 0.5);
        for (at_ms, message) in [(100.0, "switchover"), (300.0, "resumed")] {
            run.timeline.push(Mark {
                side: "source",
                phase: "cutover".into(),
                message: message.into(),
                at_ms,
            });
        }
        let report = ProbeReport {
            // The probe started counting 50 ms before the drive.
            started_unix_ms: 1_000_000.0 - 50.0,
            loss_timeline: vec![
                LossRun { first_seq: 7, last_seq: 7, start_ms: 200.0, end_ms: 200.0 },
                LossRun { first_seq: 9, last_seq: 11, start_ms: 400.0, end_ms: 402.0 },
            ],
            ..ProbeReport::default()
        };
        record_losses(&mut run, &report, started);
        let marks: Vec<(String, f64)> = run.timeline.iter().map(|m| (m.message.clone(), m.at_ms)).collect();
        assert_eq!(
            marks,
            vec![
                ("switchover".to_owned(), 100.0),
                ("seq 7 lost (sent over 0.0 ms)".to_owned(), 150.0),
                ("resumed".to_owned(), 300.0),
                ("seq 9..=11 lost (sent over 2.0 ms)".to_owned(), 350.0),
            ]
        );
        let mut unplaced = Run::new(1, 0.5);
        record_losses(&mut unplaced, &ProbeReport { started_unix_ms: 0.0, ..report }, started);
        assert!(unplaced.timeline.is_empty(), "a probe that did not say when it started places nothing");
    }
}
