//! The agent's Prometheus metrics: what its migrations did, followed from their event logs.
//!
//! Every migration this process starts or receives is followed from its first event
//! ([`Metrics::follow`]): the time spent in each phase, QEMU's downtime, the guest's pause, the
//! cutover's reactions and the bytes moved are observed once, and the migration is counted by
//! result when it ends — the source when it hands over (FORWARDING; the forward's end, maybe
//! hours later, is not a second result). Migrations a restarted agent read from its journal ran
//! in an earlier process and are not counted again. Labels are low-cardinality (role, phase,
//! result): no pod, sandbox or migration ids.
//!
//! [`Metrics::render`] writes the text exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::migration::events::{Event, EventLog, Phase, Role};

/// Bucket bounds (seconds) of the phase durations: a phase lasts from milliseconds (preparing)
/// to tens of minutes (mirroring large disks).
const PHASE_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Bucket bounds (seconds) of the pauses and reactions around the cutover: the default downtime
/// limit is 25 ms.
const PAUSE_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A cumulative histogram.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations `<= bounds[i]` (not cumulative here; summed when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// How a migration ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    Completed,
    Failed,
    Cancelled,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::Source => "source",
        Role::Destination => "destination",
    }
}

/// Role as an ordered key.
fn role_key(r: Role) -> u8 {
    match r {
        Role::Source => 0,
        Role::Destination => 1,
    }
}

fn role_of(k: u8) -> Role {
    if k == 0 {
        Role::Source
    } else {
        Role::Destination
    }
}

#[derive(Debug)]
struct Inner {
    migrations: BTreeMap<(u8, Ending), u64>,
    phase_seconds: BTreeMap<(u8, Phase), Histogram>,
    qemu_downtime: Histogram,
    guest_pause: Histogram,
    stop_to_route_swap: Histogram,
    resume_to_plug_release: Histogram,
    bytes: BTreeMap<(u8, &'static str), u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            migrations: BTreeMap::new(),
            phase_seconds: BTreeMap::new(),
            qemu_downtime: Histogram::new(PAUSE_BUCKETS),
            guest_pause: Histogram::new(PAUSE_BUCKETS),
            stop_to_route_swap: Histogram::new(PAUSE_BUCKETS),
            resume_to_plug_release: Histogram::new(PAUSE_BUCKETS),
            bytes: BTreeMap::new(),
        }
    }
}

/// Values read at scrape time from the node's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Migrations not ended on this node (a source counts until it forwards).
    pub migrations_running: u64,
    /// Forwards this node keeps for VMs it handed over.
    pub forwards_active: u64,
    /// Sandboxes received here that run.
    pub incoming_sandboxes: u64,
    /// Connections the data listener dropped at its handshake caps.
    pub data_listener_dropped: u64,
}

/// The agent's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// What one followed migration has observed so far.
#[derive(Debug)]
struct Follower {
    role: Role,
    phase: Option<(Phase, SystemTime)>,
    ram_bytes: u64,
    disk_bytes: BTreeMap<String, u64>,
    downtime: bool,
    pause: bool,
    swap: bool,
    release: bool,
    counted: bool,
}

impl Follower {
    fn new(role: Role) -> Self {
        Self {
            role,
            phase: None,
            ram_bytes: 0,
            disk_bytes: BTreeMap::new(),
            downtime: false,
            pause: false,
            swap: false,
            release: false,
            counted: false,
        }
    }

    /// Feeds one event; returns whether the migration is counted (nothing more to observe).
    fn on(&mut self, e: &Event, m: &mut Inner) -> bool {
        let role = role_key(self.role);
        if let Some(r) = &e.ram {
            self.ram_bytes = self.ram_bytes.max(r.transferred_bytes);
        }
        for d in e.storage.iter().flatten() {
            let done = self.disk_bytes.entry(d.drive_id.clone()).or_default();
            *done = (*done).max(d.done_bytes);
        }
        if let Some(t) = &e.cutover {
            if t.downtime_ms > 0 && !self.downtime {
                self.downtime = true;
                m.qemu_downtime.observe(t.downtime_ms as f64 / 1e3);
            }
            if t.stop_to_route_swap_nanos > 0 && !self.swap {
                self.swap = true;
                m.stop_to_route_swap.observe(t.stop_to_route_swap_nanos as f64 / 1e9);
            }
            if t.resume_to_plug_release_nanos > 0 && !self.release {
                self.release = true;
                m.resume_to_plug_release.observe(t.resume_to_plug_release_nanos as f64 / 1e9);
            }
            // The source knows STOP and when `resumed` reached it; a node that knew both ends
            // exactly would say so in `resume_unix_nanos`.
            let resumed =
                if t.resume_unix_nanos > 0 { t.resume_unix_nanos } else { t.resumed_seen_unix_nanos };
            if t.stop_unix_nanos > 0 && resumed > t.stop_unix_nanos && !self.pause {
                self.pause = true;
                m.guest_pause.observe((resumed - t.stop_unix_nanos) as f64 / 1e9);
            }
        }
        let changed = self.phase.is_none_or(|(p, _)| p != e.phase);
        if changed {
            if let Some((p, since)) = self.phase {
                if p < Phase::Forwarding {
                    let took = e.timestamp.duration_since(since).unwrap_or_default();
                    m.phase_seconds
                        .entry((role, p))
                        .or_insert_with(|| Histogram::new(PHASE_BUCKETS))
                        .observe(took.as_secs_f64());
                }
            }
            self.phase = Some((e.phase, e.timestamp));
        }
        let result = match (self.role, e.phase) {
            (Role::Source, Phase::Forwarding) | (_, Phase::Completed) => Some(Ending::Completed),
            (_, Phase::Failed) => Some(Ending::Failed),
            (_, Phase::Cancelled) => Some(Ending::Cancelled),
            _ => None,
        };
        if let Some(r) = result.filter(|_| !self.counted) {
            self.counted = true;
            *m.migrations.entry((role, r)).or_default() += 1;
            if r == Ending::Completed && self.role == Role::Source {
                *m.bytes.entry((role, "ram")).or_default() += self.ram_bytes;
                *m.bytes.entry((role, "disk")).or_default() += self.disk_bytes.values().sum::<u64>();
            }
        }
        self.counted
    }
}

impl Metrics {
    /// Follows a migration's events until it is counted (in a task of its own).
    pub fn follow(self: &Arc<Self>, role: Role, log: &EventLog) {
        let metrics = self.clone();
        let mut watcher = log.watch();
        tokio::spawn(async move {
            let mut f = Follower::new(role);
            while let Some(e) = watcher.next().await {
                let Ok(mut m) = metrics.inner.lock() else { return };
                if f.on(&e, &mut m) {
                    return;
                }
            }
        });
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        let Ok(m) = self.inner.lock() else { return out };
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(&mut out, "katamaran_build_info", "gauge", "The agent's version.");
        let _ = writeln!(out, "katamaran_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));

        family(
            &mut out,
            "katamaran_migrations_total",
            "counter",
            "Migrations that ended on this node, by role and result (a source counts when it hands over).",
        );
        for role in [Role::Source, Role::Destination] {
            for r in [Ending::Completed, Ending::Failed, Ending::Cancelled] {
                let n = m.migrations.get(&(role_key(role), r)).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "katamaran_migrations_total{{role=\"{}\",result=\"{}\"}} {n}",
                    role_str(role),
                    r.as_str()
                );
            }
        }
        family(
            &mut out,
            "katamaran_migration_phase_seconds",
            "histogram",
            "Time spent in each phase of a migration.",
        );
        for ((role, phase), h) in &m.phase_seconds {
            let labels = format!("role=\"{}\",phase=\"{}\"", role_str(role_of(*role)), phase.as_str());
            h.render(&mut out, "katamaran_migration_phase_seconds", &labels);
        }
        family(
            &mut out,
            "katamaran_qemu_downtime_seconds",
            "histogram",
            "QEMU's measured downtime of each migration (source).",
        );
        m.qemu_downtime.render(&mut out, "katamaran_qemu_downtime_seconds", "");
        family(
            &mut out,
            "katamaran_guest_pause_seconds",
            "histogram",
            "The guest's pause: STOP on the source to the destination's resumed reaching the source (an upper bound by one control hop).",
        );
        m.guest_pause.render(&mut out, "katamaran_guest_pause_seconds", "");
        family(
            &mut out,
            "katamaran_cutover_route_swap_seconds",
            "histogram",
            "STOP to the VM routes pointing at the forward (source; negative reactions are not observed).",
        );
        m.stop_to_route_swap.render(&mut out, "katamaran_cutover_route_swap_seconds", "");
        family(
            &mut out,
            "katamaran_cutover_plug_release_seconds",
            "histogram",
            "RESUME to the plug releasing the held packets (destination).",
        );
        m.resume_to_plug_release.render(&mut out, "katamaran_cutover_plug_release_seconds", "");
        family(
            &mut out,
            "katamaran_migrated_bytes_total",
            "counter",
            "Bytes sent by completed migrations, by stream (source).",
        );
        for stream in ["ram", "disk"] {
            let n = m.bytes.get(&(role_key(Role::Source), stream)).copied().unwrap_or(0);
            let _ = writeln!(out, "katamaran_migrated_bytes_total{{stream=\"{stream}\"}} {n}");
        }
        for (name, help, v) in [
            ("katamaran_migrations_running", "Migrations in progress on this node.", g.migrations_running),
            (
                "katamaran_forwards_active",
                "Forwards this node keeps for VMs it handed over.",
                g.forwards_active,
            ),
            (
                "katamaran_incoming_sandboxes",
                "Sandboxes received by migration that run here.",
                g.incoming_sandboxes,
            ),
        ] {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        family(
            &mut out,
            "katamaran_data_listener_dropped_total",
            "counter",
            "Connections the data listener closed unread at its handshake caps.",
        );
        let _ = writeln!(out, "katamaran_data_listener_dropped_total {}", g.data_listener_dropped);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::events::{CutoverTimes, DriveProgress, Outcome, RamProgress};
    use std::time::Duration;

    fn at(phase: Phase, ms: u64) -> Event {
        let mut e = Event::new(phase, "x");
        e.timestamp = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + ms);
        e
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn a_source_is_counted_once_when_it_hands_over_with_its_phases_and_cutover() {
        let m = Metrics::default();
        let mut f = Follower::new(Role::Source);
        let mut inner = m.inner.lock().expect("lock");
        let mut ram = at(Phase::Ram, 500);
        ram.ram = Some(RamProgress { transferred_bytes: 1000, ..RamProgress::default() });
        let mut ram2 = at(Phase::Ram, 900);
        ram2.ram = Some(RamProgress { transferred_bytes: 4000, ..RamProgress::default() });
        let mut storage = at(Phase::Storage, 100);
        storage.storage =
            Some(vec![DriveProgress { drive_id: "d0".into(), done_bytes: 300, ..Default::default() }]);
        let mut cut = at(Phase::Cutover, 1000);
        cut.cutover = Some(CutoverTimes {
            stop_unix_nanos: 5_000_000,
            stop_to_route_swap_nanos: 2_000_000,
            ..CutoverTimes::default()
        });
        let mut fwd = at(Phase::Forwarding, 1100);
        fwd.cutover = Some(CutoverTimes {
            stop_unix_nanos: 5_000_000,
            stop_to_route_swap_nanos: 2_000_000,
            downtime_ms: 30,
            resumed_seen_unix_nanos: 205_000_000,
            ..CutoverTimes::default()
        });
        let mut done = at(Phase::Completed, 90_000);
        done.outcome = Some(Outcome { error: None, total_ms: 1, downtime_ms: 30, plug_dropped_packets: 0 });
        let events = [at(Phase::Preparing, 0), storage, ram, ram2, cut, fwd];
        let counted: Vec<bool> = events.iter().map(|e| f.on(e, &mut inner)).collect();
        assert_eq!(counted, [false, false, false, false, false, true], "counted when it hands over");
        drop(inner);
        let text = m.render(&Gauges { forwards_active: 1, ..Gauges::default() });
        assert_eq!(
            line(&text, "katamaran_migrations_total{role=\"source\",result=\"completed\"}"),
            "katamaran_migrations_total{role=\"source\",result=\"completed\"} 1"
        );
        assert!(text.contains("katamaran_migrations_total{role=\"destination\",result=\"completed\"} 0"));
        // Preparing 100 ms, storage 400 ms, RAM 500 ms, cutover 100 ms.
        for (phase, secs) in [("preparing", "0.1"), ("storage", "0.4"), ("ram", "0.5"), ("cutover", "0.1")] {
            let sum = format!("katamaran_migration_phase_seconds_sum{{role=\"source\",phase=\"{phase}\"}} ");
            let got: f64 = line(&text, &sum)[sum.len()..].parse().expect("number");
            assert!((got - secs.parse::<f64>().expect("n")).abs() < 1e-6, "{phase}: {got}");
        }
        assert!(text.contains("katamaran_qemu_downtime_seconds_bucket{le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("katamaran_qemu_downtime_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("katamaran_qemu_downtime_seconds_count 1"), "observed once it is known");
        assert!(
            text.contains("katamaran_cutover_route_swap_seconds_count 1"),
            "observed once though two events carry it"
        );
        assert!(text.contains("katamaran_cutover_route_swap_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(text.contains("katamaran_guest_pause_seconds_bucket{le=\"0.1\"} 0"), "{text}");
        assert!(text.contains("katamaran_guest_pause_seconds_bucket{le=\"0.25\"} 1"), "200 ms to `resumed`");
        assert!(text.contains("katamaran_migrated_bytes_total{stream=\"ram\"} 4000"));
        assert!(text.contains("katamaran_migrated_bytes_total{stream=\"disk\"} 300"));
        assert!(text.contains("katamaran_forwards_active 1"));
    }

    #[test]
    fn a_destination_counts_its_result_and_the_pause_it_measured() {
        let m = Metrics::default();
        for (phase, result) in
            [(Phase::Completed, "completed"), (Phase::Failed, "failed"), (Phase::Cancelled, "cancelled")]
        {
            let mut f = Follower::new(Role::Destination);
            let mut inner = m.inner.lock().expect("lock");
            let mut cut = at(Phase::Cutover, 10);
            cut.cutover = Some(CutoverTimes {
                stop_unix_nanos: 1_000,
                resume_unix_nanos: 41_001_000,
                resume_to_plug_release_nanos: 300_000,
                ..CutoverTimes::default()
            });
            assert!(!f.on(&at(Phase::Preparing, 0), &mut inner));
            assert!(!f.on(&cut, &mut inner));
            assert!(f.on(&at(phase, 20), &mut inner), "{result}");
            drop(inner);
            let text = m.render(&Gauges::default());
            assert!(
                text.contains(&format!(
                    "katamaran_migrations_total{{role=\"destination\",result=\"{result}\"}} 1"
                )),
                "{text}"
            );
        }
        let text = m.render(&Gauges::default());
        assert!(text.contains("katamaran_guest_pause_seconds_bucket{le=\"0.05\"} 3"), "{text}");
        assert!(text.contains("katamaran_guest_pause_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("katamaran_cutover_plug_release_seconds_count 3"));
        assert!(text.contains("katamaran_migrated_bytes_total{stream=\"ram\"} 0"), "bytes are the source's");
    }

    #[test]
    fn every_family_has_help_and_type_and_every_sample_a_known_family() {
        let text = Metrics::default().render(&Gauges::default());
        let mut families = std::collections::BTreeSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type line");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{l}");
                families.insert(name.to_owned());
            } else if !l.starts_with("# HELP ") {
                let name = l.split(['{', ' ']).next().expect("name");
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| families.contains(*b)))
                    .unwrap_or(name);
                assert!(families.contains(base), "sample of an undeclared family: {l}");
                let value = l.rsplit(' ').next().expect("value");
                assert!(value.parse::<f64>().is_ok(), "{l}");
            }
        }
        assert!(families.len() >= 12, "{families:?}");
    }
}
