//! What a benchmark measured, its summaries, the targets it is held against, and the tables
//! and JSON it prints. Pure: no I/O except what the caller does with the strings.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::baseline::Baseline;
use crate::cases::Case;
use crate::stats::{percentile, spread, Spread};
use crate::table::{num_cell, spread_cell, Table};

/// Metric names, units in the name. Shared by both drivers so the tables line up.
pub mod m {
    /// Start of the migration to its end (katamaran: both sides done; bare: route switched).
    pub const TOTAL_MS: &str = "total_ms";
    /// katamaran's PREPARING phase on the source (QEMU features, forward pre-created).
    pub const PREPARE_MS: &str = "prepare_ms";
    /// katamaran: the client's start → the source's first event: Inspect, PrepareIncoming (the
    /// incoming sandbox, its QEMU, exports and listeners) and StartMigration.
    pub const DST_PREPARE_MS: &str = "until_source_starts_ms";
    /// QEMU's own `total-time` of the outgoing migration.
    pub const QEMU_TOTAL_MS: &str = "qemu_total_ms";
    /// Bare QEMU: `lab.sh vm --incoming` (not inside `total_ms`).
    pub const DST_START_MS: &str = "dst_start_ms";
    /// Storage mirror until every job is ready.
    pub const STORAGE_MS: &str = "storage_ms";
    /// Mirrored bytes over `storage_ms`.
    pub const STORAGE_MB_S: &str = "storage_mb_s";
    /// The RAM phase: katamaran's RAM events until its cutover event; bare QEMU's `migrate`
    /// until STOP. In the JSON only: the two are not the same span.
    pub const RAM_MS: &str = "ram_ms";
    /// RAM bytes sent, MiB.
    pub const RAM_MIB: &str = "ram_mib";
    /// RAM bytes sent over QEMU's `total-time`.
    pub const RAM_MB_S: &str = "ram_mb_s";
    /// QEMU's own downtime figure.
    pub const DOWNTIME_MS: &str = "downtime_ms";
    /// The source node's route points at the destination, relative to QEMU's STOP (katamaran;
    /// negative when the route was swapped before the VM was stopped).
    pub const STOP_TO_SWAP_US: &str = "stop_to_route_swap_us";
    /// QEMU's RESUME → the destination's held packets released (katamaran).
    pub const RESUME_TO_RELEASE_US: &str = "resume_to_plug_release_us";
    /// Packets the destination's hold dropped (katamaran).
    pub const PLUG_DROPPED: &str = "plug_dropped";
    /// Source STOP → destination RESUME (QEMU's timestamps): the VM runs nowhere. Unlike
    /// QEMU's `downtime` it counts a stop that was not QEMU's own.
    pub const STOP_TO_RESUME_MS: &str = "stop_to_resume_ms";
    /// Destination RESUME → router route switched (bare).
    pub const RESUME_TO_ROUTE_MS: &str = "resume_to_route_ms";
    /// Source STOP → router route switched (bare): every packet sent in it is lost.
    pub const BLACKOUT_MS: &str = "blackout_ms";
    /// Probe: datagrams sent.
    pub const SENT: &str = "sent";
    /// Probe: datagrams never answered.
    pub const LOST: &str = "lost";
    /// Probe: extra answers.
    pub const DUPLICATED: &str = "duplicated";
    /// Probe: answers overtaken by a later one.
    pub const REORDERED: &str = "reordered";
    /// Probe: longest time without answers while packets were outstanding.
    pub const GAP_MS: &str = "longest_gap_ms";
    /// Guest, on the destination's console: pages of the dirty workload's working set that
    /// lost their last write (dirty cases only).
    pub const STALE_PAGES: &str = "guest_stale_pages";
    /// Guest, on the destination's console: kernel fault lines (panic, Oops, BUG, …).
    pub const GUEST_FAULTS: &str = "guest_kernel_faults";
}

/// One event of a katamaran migration, relative to the start of the drive.
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    /// `source`, `destination`, or `probe` (a run of lost packets, at its first send).
    pub side: &'static str,
    /// The phase, lower case.
    pub phase: String,
    /// The event's message.
    pub message: String,
    /// Milliseconds after the client started.
    pub at_ms: f64,
}

/// One run of one driver on one case.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// 1-based run number.
    pub run: u32,
    /// The machine's 1-minute load average when the run started.
    pub load_1m: f64,
    /// Whether the migration succeeded.
    pub ok: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// What was measured (failed runs keep what they got, but summaries skip them).
    pub metrics: BTreeMap<&'static str, f64>,
    /// katamaran's events, for seeing where the time went.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Mark>,
}

impl Run {
    /// A run that has not measured anything yet.
    pub fn new(run: u32, load_1m: f64) -> Self {
        Self { run, load_1m, ok: false, error: None, metrics: BTreeMap::new(), timeline: Vec::new() }
    }

    /// Records a metric when it was measured.
    pub fn set(&mut self, key: &'static str, value: Option<f64>) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            self.metrics.insert(key, v);
        }
    }
}

/// Median and spread of every metric over the successful runs.
pub fn summarise(runs: &[Run]) -> BTreeMap<&'static str, Spread> {
    let mut values: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.ok) {
        for (k, v) in &r.metrics {
            values.entry(k).or_default().push(*v);
        }
    }
    values.into_iter().filter_map(|(k, v)| spread(&v).map(|s| (k, s))).collect()
}

/// Both drivers' runs of one case, and its guest without a migration.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// The case.
    pub case: Case,
    /// The lab guest without a migration, measured before the runs (`None` with `--no-baseline`).
    pub baseline: Option<Baseline>,
    /// katamaran's runs.
    pub katamaran: Vec<Run>,
    /// Bare QEMU's runs.
    pub bare: Vec<Run>,
}

impl CaseResult {
    /// An empty result for `case`.
    pub fn new(case: Case) -> Self {
        Self { name: case.to_string(), case, baseline: None, katamaran: Vec::new(), bare: Vec::new() }
    }
}

/// Relay against a direct stream, MB/s per sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayResult {
    /// Bytes per sample.
    pub bytes: u64,
    /// Where the streams ran.
    pub path: String,
    /// Direct TCP, MB/s.
    pub direct_mb_s: Vec<f64>,
    /// TCP into a gate (a listening socket whose filter admits the one source port): the NBD
    /// path, where both QEMUs hold the stream's ends themselves, MB/s.
    pub gated_mb_s: Vec<f64>,
    /// A relay at both ends: unix → relay → authenticated TCP → relay → unix (multifd channels
    /// on QEMU 7.2), MB/s.
    pub relay_mb_s: Vec<f64>,
    /// CPU seconds per GiB moved (writer, reader and relays together), direct.
    pub direct_cpu_s_per_gib: Vec<f64>,
    /// The same through the gate.
    pub gated_cpu_s_per_gib: Vec<f64>,
    /// The same through both relays.
    pub relay_cpu_s_per_gib: Vec<f64>,
}

/// Route replace latency, µs per sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteResult {
    /// In-process netlink, measured by the caller (what the cutover waits for).
    pub netlink_us: Vec<f64>,
    /// In-process netlink, request to ack on the namespace thread.
    pub netlink_on_thread_us: Vec<f64>,
    /// One `ip route replace` process per change.
    pub spawn_us: Vec<f64>,
}

/// Whether a target was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Met {
    /// Met.
    Yes,
    /// Missed.
    No,
    /// Missed, but the lab guest missed it without a migration too (its baseline lost
    /// packets): the lab's failure, not katamaran's. Not met either.
    Lab,
}

impl Met {
    /// The `met` column.
    pub fn label(self) -> &'static str {
        match self {
            Met::Yes => "yes",
            Met::No => "NO",
            Met::Lab => "lab",
        }
    }
}

impl From<bool> for Met {
    fn from(met: bool) -> Self {
        if met {
            Met::Yes
        } else {
            Met::No
        }
    }
}

/// A target from the brief and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The target.
    pub target: &'static str,
    /// A case name, or what else it applies to.
    pub scope: String,
    /// What was measured.
    pub measured: String,
    /// Met, missed, the lab's, or not measurable (`None`).
    pub met: Option<Met>,
}

/// katamaran total ≤ this × bare QEMU total.
pub const TOTAL_RATIO_TARGET: f64 = 1.10;
/// What the guest's pause may exceed bare QEMU's by, beyond the ratio, ms.
const PAUSE_SLACK_MS: f64 = 5.0;
/// What the client's longest silence may exceed bare QEMU's pause by, ms.
const GAP_SLACK_MS: f64 = 10.0;
/// STOP → route swap and RESUME → plug release, median.
pub const REACTION_TARGET_US: f64 = 1000.0;
/// Relay ≥ this × direct.
pub const RELAY_RATIO_TARGET: f64 = 0.9;

fn median(s: &BTreeMap<&'static str, Spread>, key: &str) -> Option<f64> {
    s.get(key).map(|s| s.median)
}

/// Holds the results against the brief's targets.
pub fn evaluate(cases: &[CaseResult], relay: Option<&RelayResult>) -> Vec<Target> {
    let mut out = Vec::new();
    for c in cases {
        let ks = summarise(&c.katamaran);
        let bs = summarise(&c.bare);
        let failed = c.katamaran.iter().filter(|r| !r.ok).count();
        let lost: Vec<f64> = c.katamaran.iter().filter_map(|r| r.metrics.get(m::LOST).copied()).collect();
        let max_lost = lost.iter().copied().fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
        let mut measured = match (max_lost, failed) {
            (None, _) => format!("no probe report ({failed} failed)"),
            (Some(l), 0) => format!("max {l:.0} lost over {} runs", lost.len()),
            (Some(l), f) => format!("max {l:.0} lost; {f} run(s) failed"),
        };
        let mut met = max_lost.map(|l| Met::from(l == 0.0 && failed == 0));
        // Losses the guest has without a migration are not katamaran's; a failed run still is.
        if let (Some(Met::No), 0, Some(excuse)) =
            (met, failed, c.baseline.as_ref().and_then(Baseline::lab_excuse))
        {
            measured = format!("{measured}; {excuse}");
            met = Some(Met::Lab);
        }
        out.push(Target {
            target: "0 lost packets in every katamaran run",
            scope: c.name.clone(),
            measured,
            met,
        });
        let (end_to_end, dst_running) = total_ratios(&ks, &bs);
        let with_bare = if c.bare.is_empty() {
            Vec::new()
        } else {
            vec![(end_to_end, "included"), (dst_running, "excluded")]
        };
        for (comparison, how) in with_bare {
            out.push(Target {
                target: "katamaran total <= 1.10x bare QEMU total",
                scope: c.name.clone(),
                measured: comparison.map_or_else(
                    || "not measured".into(),
                    |c| {
                        format!(
                            "{:.0} / {:.0} ms = {:.2}x (destination start {how})",
                            c.katamaran_ms, c.bare_ms, c.ratio
                        )
                    },
                ),
                met: comparison.map(|c| Met::from(c.ratio <= TOTAL_RATIO_TARGET)),
            });
        }
        // The guest's pause from the STOP and RESUME instants: QEMU's `downtime` misses a stop
        // that QEMU did not make itself.
        if !c.bare.is_empty() {
            let (k, b) = (median(&ks, m::STOP_TO_RESUME_MS), median(&bs, m::STOP_TO_RESUME_MS));
            out.push(Target {
                target: "VM stopped (STOP -> RESUME) <= 1.10x bare QEMU's + 5 ms",
                scope: c.name.clone(),
                measured: format!("{} / {} ms", num_cell(k, 0), num_cell(b, 0)),
                met: k.zip(b).map(|(k, b)| Met::from(k <= b * TOTAL_RATIO_TARGET + PAUSE_SLACK_MS)),
            });
            // What the client sees: katamaran holds packets instead of losing them, so its
            // longest silence is measured against bare QEMU's pause, not bare QEMU's gap.
            let gap = median(&ks, m::GAP_MS);
            out.push(Target {
                target: "longest probe gap <= bare QEMU's STOP -> RESUME + 10 ms",
                scope: c.name.clone(),
                measured: format!("{} / {} ms", num_cell(gap, 0), num_cell(b, 0)),
                met: gap.zip(b).map(|(g, b)| Met::from(g <= b + GAP_SLACK_MS)),
            });
        }
        for (key, what) in [
            (m::STOP_TO_SWAP_US, "STOP -> route swap <= 1 ms median"),
            (m::RESUME_TO_RELEASE_US, "RESUME -> plug release <= 1 ms median"),
        ] {
            let v = median(&ks, key);
            out.push(Target {
                target: what,
                scope: c.name.clone(),
                measured: num_cell(v, 0) + " µs",
                met: v.map(|v| Met::from(v <= REACTION_TARGET_US)),
            });
        }
    }
    if let Some(r) = relay {
        for (scope, samples) in
            [("gated TCP (NBD path)", &r.gated_mb_s), ("relay at both ends (multifd on 7.2)", &r.relay_mb_s)]
        {
            let ratio = relay_ratio(&r.direct_mb_s, samples);
            out.push(Target {
                target: "stream >= 0.9x direct",
                scope: scope.into(),
                measured: ratio.map_or_else(|| "not measured".into(), |x| format!("{x:.2}x")),
                met: ratio.map(|x| Met::from(x >= RELAY_RATIO_TARGET)),
            });
        }
    }
    out
}

/// katamaran's and bare QEMU's totals (medians) and their ratio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// katamaran, ms.
    pub katamaran_ms: f64,
    /// Bare QEMU, ms.
    pub bare_ms: f64,
    /// katamaran / bare.
    pub ratio: f64,
}

/// katamaran against bare QEMU, two ways: end to end (katamaran's total against bare QEMU's
/// total plus starting its destination), and with the destination already running
/// (katamaran's total less the time until its source starts, against bare QEMU's total).
pub fn total_ratios(
    k: &BTreeMap<&'static str, Spread>,
    b: &BTreeMap<&'static str, Spread>,
) -> (Option<Comparison>, Option<Comparison>) {
    let ratio = |k: f64, b: f64| (b > 0.0).then(|| Comparison { katamaran_ms: k, bare_ms: b, ratio: k / b });
    let kt = median(k, m::TOTAL_MS);
    let bt = median(b, m::TOTAL_MS);
    let end_to_end = kt.zip(bt.zip(median(b, m::DST_START_MS))).and_then(|(k, (b, s))| ratio(k, b + s));
    let dst_running = kt.zip(median(k, m::DST_PREPARE_MS)).zip(bt).and_then(|((k, p), b)| ratio(k - p, b));
    (end_to_end, dst_running)
}

/// Median relayed throughput over median direct throughput.
pub fn relay_ratio(direct: &[f64], relayed: &[f64]) -> Option<f64> {
    let d = spread(direct)?.median;
    let x = spread(relayed)?.median;
    (d > 0.0).then(|| x / d)
}

fn ok_cell(runs: &[Run]) -> String {
    format!("{}/{}", runs.iter().filter(|r| r.ok).count(), runs.len())
}

/// A driver's moved guests as their destination consoles showed them: `clean` when no run's
/// guest reported stale memory or a kernel fault, else how many runs did and what they reported.
fn health_cell(runs: &[Run]) -> String {
    let read: Vec<&Run> = runs.iter().filter(|r| r.metrics.contains_key(m::GUEST_FAULTS)).collect();
    if read.is_empty() {
        return "-".into();
    }
    let get = |r: &Run, k: &str| r.metrics.get(k).copied().unwrap_or(0.0);
    let damaged =
        read.iter().filter(|r| get(r, m::STALE_PAGES) > 0.0 || get(r, m::GUEST_FAULTS) > 0.0).count();
    if damaged == 0 {
        return format!("clean in {}", read.len());
    }
    let pages: f64 = read.iter().map(|r| get(r, m::STALE_PAGES)).sum();
    let faults: f64 = read.iter().map(|r| get(r, m::GUEST_FAULTS)).sum();
    format!("DAMAGED in {damaged} of {}: {pages:.0} stale pages, {faults:.0} fault lines", read.len())
}

fn load_cell(runs: &[Run]) -> String {
    spread_cell(spread(&runs.iter().map(|r| r.load_1m).collect::<Vec<_>>()), 1)
}

/// The baseline table: a row per case that has a baseline; `None` when none has.
pub fn baseline_table(cases: &[CaseResult]) -> Option<Table> {
    let mut t = Table::new(
        "baseline — the lab guest without a migration",
        &["case", "window s", "sent", "lost", "dup", "reord", "longest gap ms"],
    );
    for c in cases {
        let Some(b) = &c.baseline else { continue };
        let g = |key: &str| num_cell(b.probe.metrics.get(key).copied(), 0);
        t.row(vec![
            c.name.clone(),
            num_cell(Some(b.window_s), 1),
            g(m::SENT),
            g(m::LOST),
            g(m::DUPLICATED),
            g(m::REORDERED),
            g(m::GAP_MS),
        ]);
    }
    cases.iter().any(|c| c.baseline.is_some()).then_some(t)
}

/// The tables of the migration cases: the baseline (when measured), katamaran's, and bare
/// QEMU's with the comparison (when it ran).
pub fn case_tables(cases: &[CaseResult]) -> Vec<Table> {
    let mut time = Table::new(
        "katamaran — time and throughput (median (min–max) over successful runs)",
        &[
            "case",
            "ok",
            "total ms",
            "until source starts ms",
            "storage ms",
            "storage MB/s",
            "RAM MiB",
            "RAM MB/s",
            "QEMU total ms",
            "downtime ms",
            "load 1m",
        ],
    );
    let mut cut = Table::new(
        "katamaran — cutover reaction and what the probe saw",
        &[
            "case",
            "STOP→swap µs",
            "RESUME→release µs",
            "STOP→RESUME ms",
            "lost",
            "dup",
            "reord",
            "gap ms",
            "plug drops",
        ],
    );
    let mut bare = Table::new(
        "bare QEMU — plain QMP, route switched after RESUME (no cutover)",
        &[
            "case",
            "ok",
            "dst start ms",
            "total ms",
            "storage ms",
            "storage MB/s",
            "RAM MiB",
            "RAM MB/s",
            "QEMU total ms",
            "downtime ms",
            "STOP→RESUME ms",
            "blackout ms",
            "lost",
            "gap ms",
            "load 1m",
        ],
    );
    let mut cmp = Table::new(
        "side by side (medians)",
        &[
            "case",
            "katamaran ms",
            "bare+dst start ms",
            "ratio",
            "katamaran-until source ms",
            "bare ms",
            "ratio",
            "STOP→RESUME ms k/b",
            "lost k/b",
            "gap ms k/b",
        ],
    );
    for c in cases {
        let k = summarise(&c.katamaran);
        let b = summarise(&c.bare);
        let g = |s: &BTreeMap<&'static str, Spread>, key: &str, d: usize| spread_cell(s.get(key).copied(), d);
        time.row(vec![
            c.name.clone(),
            ok_cell(&c.katamaran),
            g(&k, m::TOTAL_MS, 0),
            g(&k, m::DST_PREPARE_MS, 0),
            g(&k, m::STORAGE_MS, 0),
            g(&k, m::STORAGE_MB_S, 0),
            g(&k, m::RAM_MIB, 0),
            g(&k, m::RAM_MB_S, 0),
            g(&k, m::QEMU_TOTAL_MS, 0),
            g(&k, m::DOWNTIME_MS, 0),
            load_cell(&c.katamaran),
        ]);
        cut.row(vec![
            c.name.clone(),
            g(&k, m::STOP_TO_SWAP_US, 0),
            g(&k, m::RESUME_TO_RELEASE_US, 0),
            g(&k, m::STOP_TO_RESUME_MS, 0),
            g(&k, m::LOST, 0),
            g(&k, m::DUPLICATED, 0),
            g(&k, m::REORDERED, 0),
            g(&k, m::GAP_MS, 0),
            g(&k, m::PLUG_DROPPED, 0),
        ]);
        bare.row(vec![
            c.name.clone(),
            ok_cell(&c.bare),
            g(&b, m::DST_START_MS, 0),
            g(&b, m::TOTAL_MS, 0),
            g(&b, m::STORAGE_MS, 0),
            g(&b, m::STORAGE_MB_S, 0),
            g(&b, m::RAM_MIB, 0),
            g(&b, m::RAM_MB_S, 0),
            g(&b, m::QEMU_TOTAL_MS, 0),
            g(&b, m::DOWNTIME_MS, 0),
            g(&b, m::STOP_TO_RESUME_MS, 0),
            g(&b, m::BLACKOUT_MS, 0),
            g(&b, m::LOST, 0),
            g(&b, m::GAP_MS, 0),
            load_cell(&c.bare),
        ]);
        let (end_to_end, dst_running) = total_ratios(&k, &b);
        let cells = |x: Option<Comparison>| {
            [
                num_cell(x.map(|x| x.katamaran_ms), 0),
                num_cell(x.map(|x| x.bare_ms), 0),
                num_cell(x.map(|x| x.ratio), 2),
            ]
        };
        let [k1, b1, r1] = cells(end_to_end);
        let [k2, b2, r2] = cells(dst_running);
        cmp.row(vec![
            c.name.clone(),
            k1,
            b1,
            r1,
            k2,
            b2,
            r2,
            format!(
                "{}/{}",
                num_cell(median(&k, m::STOP_TO_RESUME_MS), 0),
                num_cell(median(&b, m::STOP_TO_RESUME_MS), 0)
            ),
            format!("{}/{}", num_cell(median(&k, m::LOST), 0), num_cell(median(&b, m::LOST), 0)),
            format!("{}/{}", num_cell(median(&k, m::GAP_MS), 0), num_cell(median(&b, m::GAP_MS), 0)),
        ]);
    }
    let mut tables: Vec<Table> = baseline_table(cases).into_iter().collect();
    tables.extend([time, cut]);
    if cases.iter().any(|c| !c.bare.is_empty()) {
        tables.extend([bare, cmp]);
    }
    tables.extend(health_table(cases));
    tables
}

/// The moved guest after each driver's runs: what the destination's console said (the dirty
/// workload's memory check, the guest kernel's fault reports). A pause bought with lost writes
/// is no pause to compare with. `None` when no run's console was read.
fn health_table(cases: &[CaseResult]) -> Option<Table> {
    let read = |runs: &[Run]| runs.iter().any(|r| r.metrics.contains_key(m::GUEST_FAULTS));
    if !cases.iter().any(|c| read(&c.katamaran) || read(&c.bare)) {
        return None;
    }
    let mut t = Table::new(
        "the moved guest — stale memory and kernel faults on the destination's console",
        &["case", "katamaran", "bare QEMU"],
    );
    for c in cases {
        t.row(vec![c.name.clone(), health_cell(&c.katamaran), health_cell(&c.bare)]);
    }
    Some(t)
}

/// The relay table.
pub fn relay_table(r: &RelayResult) -> Table {
    let mut t = Table::new(
        format!("data plane: {} MiB per sample, {}", r.bytes >> 20, r.path),
        &["stream", "MB/s", "ratio", "CPU s/GiB"],
    );
    for (name, rate, cpu) in [
        ("direct TCP", &r.direct_mb_s, &r.direct_cpu_s_per_gib),
        ("TCP through the gate (NBD)", &r.gated_mb_s, &r.gated_cpu_s_per_gib),
        ("unix → relay → TCP (authenticated) → relay → unix", &r.relay_mb_s, &r.relay_cpu_s_per_gib),
    ] {
        t.row(vec![
            name.into(),
            spread_cell(spread(rate), 0),
            num_cell(relay_ratio(&r.direct_mb_s, rate), 2),
            spread_cell(spread(cpu), 2),
        ]);
    }
    t
}

/// The route-swap table.
pub fn route_table(r: &RouteResult) -> Table {
    let mut t =
        Table::new("route swap: one /32 replaced", &["method", "n", "median µs", "p99 µs", "vs netlink"]);
    let base = percentile(&r.netlink_us, 0.5);
    for (name, v) in [
        ("netlink in-process (caller's view)", &r.netlink_us),
        ("netlink in-process (namespace thread)", &r.netlink_on_thread_us),
        ("spawned `ip route replace`", &r.spawn_us),
    ] {
        let med = percentile(v, 0.5);
        t.row(vec![
            name.into(),
            v.len().to_string(),
            num_cell(med, 1),
            num_cell(percentile(v, 0.99), 1),
            num_cell(med.zip(base).map(|(a, b)| a / b), 1) + "x",
        ]);
    }
    t
}

/// The targets table.
pub fn target_table(targets: &[Target]) -> Table {
    let mut t = Table::new("targets", &["target", "scope", "measured", "met"]);
    for x in targets {
        let met = x.met.map_or("n/a", Met::label);
        t.row(vec![x.target.into(), x.scope.clone(), x.measured.clone(), met.into()]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::defaults;

    fn run(n: u32, ok: bool, metrics: &[(&'static str, f64)]) -> Run {
        let mut r = Run::new(n, 1.0);
        r.ok = ok;
        for (k, v) in metrics {
            r.set(k, Some(*v));
        }
        r
    }

    #[test]
    fn the_health_cell_names_damaged_runs_and_what_they_reported() {
        let clean = run(1, true, &[(m::STALE_PAGES, 0.0), (m::GUEST_FAULTS, 0.0)]);
        let stale = run(2, true, &[(m::STALE_PAGES, 12.0), (m::GUEST_FAULTS, 0.0)]);
        let panicked = run(3, true, &[(m::GUEST_FAULTS, 3.0)]);
        assert_eq!(health_cell(&[clean.clone(), clean.clone()]), "clean in 2");
        assert_eq!(
            health_cell(&[clean.clone(), stale, panicked]),
            "DAMAGED in 2 of 3: 12 stale pages, 3 fault lines"
        );
        // A run whose console was not read says nothing either way.
        assert_eq!(health_cell(&[run(1, false, &[])]), "-");
        assert_eq!(health_cell(&[clean, run(2, false, &[])]), "clean in 1");
    }

    #[test]
    fn summaries_skip_failed_runs_and_missing_metrics() {
        let runs = vec![
            run(1, true, &[(m::TOTAL_MS, 700.0), (m::LOST, 0.0)]),
            run(2, false, &[(m::TOTAL_MS, 9000.0), (m::LOST, 40.0)]),
            run(3, true, &[(m::TOTAL_MS, 800.0)]),
        ];
        let s = summarise(&runs);
        assert_eq!(s[m::TOTAL_MS], Spread { median: 750.0, min: 700.0, max: 800.0, n: 2 });
        assert_eq!(s[m::LOST].n, 1);
        let mut r = Run::new(4, 0.0);
        r.set(m::RAM_MB_S, None);
        r.set(m::RAM_MB_S, Some(f64::NAN));
        assert!(r.metrics.is_empty());
    }

    #[test]
    fn targets_are_met_or_missed_per_case() {
        let mut c = CaseResult::new(defaults()[0]);
        c.katamaran = vec![
            run(
                1,
                true,
                &[
                    (m::TOTAL_MS, 1000.0),
                    (m::LOST, 0.0),
                    (m::STOP_TO_SWAP_US, 150.0),
                    (m::DST_PREPARE_MS, 0.0),
                ],
            ),
            run(
                2,
                true,
                &[
                    (m::TOTAL_MS, 1300.0),
                    (m::LOST, 2.0),
                    (m::STOP_TO_SWAP_US, 2500.0),
                    (m::DST_PREPARE_MS, 0.0),
                ],
            ),
        ];
        c.bare = vec![run(
            1,
            true,
            &[
                (m::TOTAL_MS, 1000.0),
                (m::LOST, 150.0),
                (m::DST_START_MS, 100.0),
                (m::STOP_TO_RESUME_MS, 30.0),
            ],
        )];
        let relay = RelayResult {
            direct_mb_s: vec![1000.0],
            gated_mb_s: vec![950.0],
            relay_mb_s: vec![500.0],
            ..Default::default()
        };
        let t = evaluate(&[c], Some(&relay));
        let find = |prefix: &str| t.iter().find(|x| x.target.starts_with(prefix)).expect(prefix);
        assert_eq!(find("0 lost").met, Some(Met::No));
        assert_eq!(find("0 lost").measured, "max 2 lost over 2 runs");
        let totals: Vec<&Target> = t.iter().filter(|x| x.target.starts_with("katamaran total")).collect();
        assert_eq!(totals.len(), 2);
        assert_eq!(
            (totals[0].met, totals[0].measured.as_str()),
            (Some(Met::Yes), "1150 / 1100 ms = 1.05x (destination start included)")
        );
        assert_eq!(
            (totals[1].met, totals[1].measured.as_str()),
            (Some(Met::No), "1150 / 1000 ms = 1.15x (destination start excluded)")
        );
        assert_eq!(find("STOP").met, Some(Met::No), "median of 150 and 2500 µs");
        assert_eq!(find("VM stopped").met, None, "katamaran's STOP→RESUME not measured");
        assert_eq!(find("longest probe gap").met, None, "katamaran's gap not measured");
        assert_eq!(find("RESUME").met, None, "not measured");
        let relays: Vec<Option<Met>> =
            t.iter().filter(|x| x.target.starts_with("stream")).map(|x| x.met).collect();
        assert_eq!(relays, vec![Some(Met::Yes), Some(Met::No)], "gated 0.95x, relays at both ends 0.5x");
    }

    #[test]
    fn the_pause_and_the_gap_are_held_against_bare_qemus_pause() {
        let case = |k_pause: f64, k_gap: f64| {
            let mut c = CaseResult::new("128m-idle-shared-1000".parse().expect("case"));
            c.katamaran =
                vec![run(1, true, &[(m::STOP_TO_RESUME_MS, k_pause), (m::GAP_MS, k_gap), (m::LOST, 0.0)])];
            c.bare = vec![run(1, true, &[(m::STOP_TO_RESUME_MS, 20.0), (m::GAP_MS, 120.0)])];
            evaluate(&[c], None)
        };
        let met =
            |t: &[Target], prefix: &str| t.iter().find(|x| x.target.starts_with(prefix)).expect(prefix).met;
        let within = case(27.0, 30.0);
        assert_eq!(met(&within, "VM stopped"), Some(Met::Yes), "27 <= 1.1 x 20 + 5");
        assert_eq!(met(&within, "longest probe gap"), Some(Met::Yes), "30 <= 20 + 10");
        let over = case(27.5, 30.5);
        assert_eq!(met(&over, "VM stopped"), Some(Met::No));
        assert_eq!(met(&over, "longest probe gap"), Some(Met::No), "bare's own gap (120 ms) does not count");
    }

    fn baseline(sent: f64, lost: f64) -> Baseline {
        let probe = run(
            1,
            true,
            &[
                (m::SENT, sent),
                (m::LOST, lost),
                (m::DUPLICATED, 0.0),
                (m::REORDERED, 4.0),
                (m::GAP_MS, 388.0),
            ],
        );
        Baseline { window_s: 3.0, probe }
    }

    /// A 5000 pps case whose katamaran runs lost `lost` packets each, with `base` as baseline.
    fn lossy_case(lost: &[f64], base: Option<Baseline>) -> CaseResult {
        let mut c = CaseResult::new("128m-idle-shared-5000".parse().expect("case"));
        c.baseline = base;
        c.katamaran = lost.iter().zip(1..).map(|(l, n)| run(n, true, &[(m::LOST, *l)])).collect();
        c
    }

    fn loss_target(c: CaseResult) -> Target {
        evaluate(&[c], None).into_iter().find(|t| t.target.starts_with("0 lost")).expect("loss target")
    }

    #[test]
    fn losses_of_a_guest_that_loses_without_a_migration_are_the_labs() {
        let t = loss_target(lossy_case(&[2300.0, 2100.0], Some(baseline(15000.0, 2190.0))));
        assert_eq!(t.met, Some(Met::Lab));
        assert_eq!(
            t.measured,
            "max 2300 lost over 2 runs; baseline lost 2190 of 15000 without a migration: \
             the lab guest cannot keep up"
        );
        assert_eq!(serde_json::to_value(&t).expect("JSON")["met"], "lab");
        let text = target_table(&[t]).render();
        assert!(text.lines().last().is_some_and(|l| l.ends_with("  lab")), "{text}");
    }

    #[test]
    fn losses_over_a_clean_baseline_are_katamarans() {
        for base in [Some(baseline(15000.0, 0.0)), None] {
            let t = loss_target(lossy_case(&[0.0, 3.0], base.clone()));
            assert_eq!((t.met, t.measured.as_str()), (Some(Met::No), "max 3 lost over 2 runs"), "{base:?}");
        }
        let none_lost = loss_target(lossy_case(&[0.0, 0.0], Some(baseline(15000.0, 2190.0))));
        assert_eq!(none_lost.met, Some(Met::Yes), "met despite the lab");
        let mut failed = lossy_case(&[40.0], Some(baseline(15000.0, 2190.0)));
        failed.katamaran.push(run(2, false, &[(m::LOST, 10.0)]));
        let t = loss_target(failed);
        assert_eq!(
            (t.met, t.measured.as_str()),
            (Some(Met::No), "max 40 lost; 1 run(s) failed"),
            "a failed migration is not the lab's"
        );
    }

    #[test]
    fn the_baseline_table_has_a_row_per_measured_case() {
        let with = lossy_case(&[0.0], Some(baseline(15000.0, 2190.0)));
        let mut without = CaseResult::new(defaults()[0]);
        without.katamaran = vec![run(1, true, &[(m::LOST, 0.0)])];
        let tables = case_tables(&[with.clone(), without.clone()]);
        let text = tables[0].render();
        assert_eq!(
            text,
            "baseline — the lab guest without a migration\n\
             case                   window s   sent  lost  dup  reord  longest gap ms\n\
             ------------------------------------------------------------------------\n\
             128m-idle-shared-5000       3.0  15000  2190    0      4             388\n"
        );
        assert!(tables[0].rows_match_headers());
        assert!(!text.contains(&without.name), "{text}");
        let json = serde_json::to_value(&with).expect("JSON");
        assert_eq!(
            (json["baseline"]["window_s"].as_f64(), json["baseline"]["metrics"][m::LOST].as_f64()),
            (Some(3.0), Some(2190.0))
        );
        assert!(serde_json::to_value(&without).expect("JSON")["baseline"].is_null());
        assert_eq!(tables.len(), 2 + 1, "baseline, katamaran's two, no bare QEMU");
        let unmeasured = case_tables(&[without]);
        assert!(unmeasured.iter().all(|t| !t.render().starts_with("baseline")), "--no-baseline");
        assert_eq!(unmeasured.len(), 2);
    }

    #[test]
    fn tables_have_a_row_per_case() {
        let mut c = CaseResult::new(defaults()[1]);
        c.katamaran = vec![run(1, true, &[(m::TOTAL_MS, 900.0), (m::LOST, 0.0)])];
        c.bare = vec![run(1, false, &[])];
        for t in case_tables(&[c]) {
            let text = t.render();
            assert!(text.contains("512m-idle-shared-1000"), "{text}");
            assert!(t.rows_match_headers(), "a header per cell:\n{text}");
        }
        let route = RouteResult {
            netlink_us: vec![10.0; 10],
            netlink_on_thread_us: vec![8.0; 10],
            spawn_us: vec![2000.0; 10],
        };
        let text = route_table(&route).render();
        assert!(text.contains("200.0x"), "{text}");
    }
}
