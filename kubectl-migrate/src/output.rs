//! What the user sees: live progress while the migration runs (a bar on a terminal, plain lines
//! otherwise, nothing on stdout with `-o json`), then the final table or one JSON document, and
//! the dry-run plan.
//!
//! The figures are computed by plain functions over the events ([`phase_times`], [`summarize`])
//! and rendered from one [`Summary`], which is also the JSON document, so text and JSON cannot
//! disagree.

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use katamaran::migration::options::{MigrationOptions, StorageMode};
use katamaran_protos::v1 as pb;
use serde::Serialize;

use crate::orchestrate::{phase_name, Outcome, Plan, Progress, Report, Side};
use crate::resolve::{NodeEnd, Resolved};

/// `-o`: how the result is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Progress and a final table for people.
    Text,
    /// One JSON document on stdout at the end, nothing else there.
    Json,
    /// The same document as YAML.
    Yaml,
}

impl Format {
    /// The document `doc` in this machine format (`None` for text).
    ///
    /// # Errors
    /// When the document does not serialize.
    pub fn document<T: serde::Serialize>(self, doc: &T) -> Option<Result<String, String>> {
        match self {
            Format::Text => None,
            Format::Json => Some(serde_json::to_string_pretty(doc).map_err(|e| e.to_string())),
            // Through JSON's value: the same fields, names and order as -o json.
            Format::Yaml => Some(
                serde_json::to_value(doc)
                    .map_err(|e| e.to_string())
                    .and_then(|v| serde_saphyr::to_string(&v).map_err(|e| e.to_string())),
            ),
        }
    }
}

/// Shows nothing (`-o json` without a terminal).
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn note(&mut self, _: &str) {}
    fn event(&mut self, _: Side, _: &pb::MigrationEvent) {}
    fn finish(&mut self) {}
}

/// One line per phase change and at most one progress line per side every
/// [`Lines::PROGRESS_EVERY`], for logs and pipes.
#[derive(Debug)]
pub struct Lines<W: Write> {
    out: W,
    last: [(Option<i32>, Option<Instant>); 2],
}

fn index(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Destination => 1,
    }
}

impl<W: Write> Lines<W> {
    /// How often a progress line may repeat for one side within a phase.
    pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

    /// Lines written to `out`.
    pub fn new(out: W) -> Self {
        Self { out, last: [(None, None), (None, None)] }
    }

    /// [`Progress::event`] at a given instant (so tests need no clock).
    pub fn event_at(&mut self, side: Side, event: &pb::MigrationEvent, now: Instant) {
        let (last_phase, last_line) = &mut self.last[index(side)];
        let phase = event.phase.value();
        let changed = *last_phase != Some(phase);
        let due = last_line.is_none_or(|t| now.duration_since(t) >= Self::PROGRESS_EVERY);
        if !changed && !due {
            return;
        }
        *last_phase = Some(phase);
        *last_line = Some(now);
        // A closed pipe must not abort the migration; the final result is still returned.
        let _ = writeln!(self.out, "{:<11} {:<10} {}", side.name(), phase_label(event), describe(event));
    }

    /// The writer, for tests.
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write + Send> Progress for Lines<W> {
    fn note(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}");
    }
    fn event(&mut self, side: Side, event: &pb::MigrationEvent) {
        self.event_at(side, event, Instant::now());
    }
    fn finish(&mut self) {
        let _ = self.out.flush();
    }
}

/// A live bar on a terminal: both sides' phases, bytes sent, rate and expected downtime.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
    phases: [String; 2],
}

impl Bar {
    /// A bar drawn on stdout (`to_stderr` false) or stderr.
    pub fn new(to_stderr: bool) -> Self {
        let target = if to_stderr { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::stdout() };
        let bar = ProgressBar::with_draw_target(None, target);
        let style =
            ProgressStyle::with_template("{spinner} {prefix} [{bar:20}] {bytes}/{total_bytes} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar, phases: ["-".into(), "-".into()] }
    }

    fn prefix(&self) -> String {
        format!("src {} · dst {}", self.phases[0], self.phases[1])
    }
}

impl Progress for Bar {
    fn note(&mut self, line: &str) {
        self.bar.println(line);
    }

    fn event(&mut self, side: Side, event: &pb::MigrationEvent) {
        let label = phase_label(event);
        if self.phases[index(side)] != label {
            self.bar.println(format!("{:<11} {:<10} {}", side.name(), label, describe(event)));
        }
        self.phases[index(side)] = label;
        self.bar.set_prefix(self.prefix());
        if side == Side::Destination {
            return;
        }
        // The source reports the numbers: mirror progress, then RAM.
        if let Some(s) = event.storage.as_ref() {
            let (done, total) =
                s.drives.iter().fold((0, 0), |(d, t), x| (d + x.done_bytes, t + x.total_bytes));
            self.bar.set_length(total);
            self.bar.set_position(done);
            self.bar.set_message("disk mirror".to_owned());
        }
        if let Some(r) = event.ram.as_ref() {
            self.bar.set_length(r.total_bytes);
            self.bar.set_position(r.total_bytes.saturating_sub(r.remaining_bytes));
            self.bar.set_message(format!(
                "{}/s · expected downtime {} ms · pass {}",
                bytes(r.throughput_bytes_per_second),
                r.expected_downtime_ms,
                r.iteration
            ));
        }
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// The progress display for `format`, given which streams are terminals.
pub fn progress_for(format: Format, stdout_tty: bool, stderr_tty: bool) -> Box<dyn Progress> {
    match (format, stdout_tty, stderr_tty) {
        (Format::Text, true, _) => Box::new(Bar::new(false)),
        (Format::Text, false, _) => Box::new(Lines::new(std::io::stdout())),
        (Format::Json | Format::Yaml, _, true) => Box::new(Bar::new(true)),
        (Format::Json | Format::Yaml, _, false) => Box::new(Silent),
    }
}

fn phase_label(e: &pb::MigrationEvent) -> String {
    match e.phase.enum_value() {
        Ok(p) => phase_name(p).to_owned(),
        Err(v) => format!("phase-{v}"),
    }
}

/// One line about an event: its message and the numbers that matter in its phase.
pub fn describe(e: &pb::MigrationEvent) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !e.message.is_empty() {
        parts.push(e.message.clone());
    }
    let p = e.phase.enum_value().ok();
    if let (Some(s), Some(pb::Phase::PHASE_STORAGE)) = (e.storage.as_ref(), p) {
        let (done, total) = s.drives.iter().fold((0, 0), |(d, t), x| (d + x.done_bytes, t + x.total_bytes));
        let ready = s.drives.iter().filter(|d| d.ready).count();
        parts.push(format!(
            "{} of {} mirrored, {ready}/{} disks ready",
            bytes(done),
            bytes(total),
            s.drives.len()
        ));
    }
    if let (Some(r), Some(pb::Phase::PHASE_RAM)) = (e.ram.as_ref(), p) {
        parts.push(format!(
            "{} of {} sent, {}/s, {} dirty pages/s, pass {}, expected downtime {} ms",
            bytes(r.transferred_bytes),
            bytes(r.total_bytes),
            bytes(r.throughput_bytes_per_second),
            r.dirty_pages_rate,
            r.iteration,
            r.expected_downtime_ms
        ));
    }
    if let Some(r) = e.result.as_ref() {
        if !r.success && !r.error_message.is_empty() && r.error_message != e.message {
            parts.push(r.error_message.clone());
        }
    }
    parts.join("; ")
}

/// Bytes with a binary unit, e.g. "1.5 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A duration the way people read them: "87 µs", "12.3 ms", "5.12 s", "2m 03s".
pub fn human(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 1_000_000 {
        format!("{} µs", ns / 1_000)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else if d < Duration::from_secs(60) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// Time one side spent in one phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTime {
    /// Phase name ("ram").
    pub phase: &'static str,
    /// Milliseconds, `None` while the phase was still running when the client stopped watching
    /// (the source's forwarding, typically).
    pub duration_ms: Option<f64>,
}

/// Time spent in each phase of one side, in the order entered, from event timestamps. A phase
/// ends when the next one starts; the terminal phase is not a row.
pub fn phase_times(events: &[pb::MigrationEvent]) -> Vec<PhaseTime> {
    let mut out = Vec::new();
    let mut open: Option<(pb::Phase, u64)> = None;
    for e in events {
        let Ok(p) = e.phase.enum_value() else { continue };
        if p == pb::Phase::PHASE_UNSPECIFIED || open.is_some_and(|(q, _)| q == p) {
            continue;
        }
        if let Some((q, t0)) = open.take() {
            out.push(PhaseTime { phase: phase_name(q), duration_ms: span_ms(t0, e.timestamp_unix_nanos) });
        }
        if !p.is_terminal() {
            open = Some((p, e.timestamp_unix_nanos));
        }
    }
    if let Some((q, _)) = open {
        out.push(PhaseTime { phase: phase_name(q), duration_ms: None });
    }
    out
}

fn span_ms(t0: u64, t1: u64) -> Option<f64> {
    (t0 != 0 && t1 >= t0).then(|| ((t1 - t0) as f64 / 1e3).round() / 1e3)
}

/// The pod, in the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Pod IPs.
    pub ips: Vec<String>,
    /// Runtime class.
    pub runtime_class: String,
}

/// One node end, in the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndView {
    /// Node name.
    pub node: String,
    /// Node address used for tunnels and data streams.
    pub address: String,
    /// Agent pod reached through port-forward.
    pub agent_pod: String,
}

fn end_view(e: &NodeEnd) -> EndView {
    EndView { node: e.node.clone(), address: e.address.to_string(), agent_pod: e.agent_pod.clone() }
}

fn pod_view(r: &Resolved) -> PodView {
    PodView {
        namespace: r.pod.namespace.clone(),
        name: r.pod.name.clone(),
        uid: r.pod.uid.clone(),
        ips: r.pod.ips.iter().map(ToString::to_string).collect(),
        runtime_class: r.pod.runtime_class.clone(),
    }
}

/// The options, with units in the names as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OptionsView {
    /// No NBD mirror.
    pub shared_storage: bool,
    /// Downtime limit.
    pub downtime_limit_ms: u128,
    /// Raise the limit from RTT / stalls.
    pub auto_downtime: bool,
    /// Bandwidth cap, `None` uncapped.
    pub bandwidth_bytes_per_second: Option<u64>,
    /// Multifd channels, `None` off.
    pub multifd_channels: Option<u8>,
    /// QEMU auto-converge.
    pub auto_converge: bool,
    /// Requested tunnel mode ("auto", "ipip", ...).
    pub tunnel_mode: &'static str,
    /// Idle time before forwarding is removed.
    pub tunnel_idle_timeout_ms: u128,
    /// Plug limit, `None` derived.
    pub plug_limit_bytes: Option<u32>,
    /// Storage deadline.
    pub storage_timeout_ms: u128,
    /// RAM deadline.
    pub ram_timeout_ms: u128,
    /// RAM and disks cross the network unencrypted.
    pub plain_streams: bool,
}

/// The options for display.
pub fn options_view(o: &MigrationOptions) -> OptionsView {
    OptionsView {
        shared_storage: o.storage == StorageMode::Shared,
        downtime_limit_ms: o.downtime_limit.as_millis(),
        auto_downtime: o.auto_downtime,
        bandwidth_bytes_per_second: o.max_bandwidth,
        multifd_channels: o.multifd_channels,
        auto_converge: o.auto_converge,
        tunnel_mode: o.tunnel_mode.as_str(),
        tunnel_idle_timeout_ms: o.tunnel_idle_timeout.as_millis(),
        plug_limit_bytes: o.plug_limit,
        storage_timeout_ms: o.storage_timeout.as_millis(),
        ram_timeout_ms: o.ram_timeout.as_millis(),
        plain_streams: o.plain_streams,
    }
}

fn options_line(o: &MigrationOptions, pod: &Resolved) -> String {
    let resolved = o.tunnel_mode.resolve(&pod.pod.ips, pod.source.address.is_ipv6());
    let tunnel = if resolved == o.tunnel_mode {
        o.tunnel_mode.as_str().to_owned()
    } else {
        format!("{} → {}", o.tunnel_mode.as_str(), resolved.as_str())
    };
    let onoff = |b: bool| if b { "on" } else { "off" };
    let lifetime = if o.tunnel_idle_timeout.is_zero() {
        "kept until its route is taken over or released".to_owned()
    } else {
        format!("removed after {} idle", compact(o.tunnel_idle_timeout))
    };
    format!(
        "downtime {}, auto-downtime {}, bandwidth {}, multifd {}, auto-converge {}, tunnel {tunnel} \
         {lifetime}, plug limit {}, disks {}, storage timeout {}, RAM timeout {}, streams {}",
        compact(o.downtime_limit),
        onoff(o.auto_downtime),
        o.max_bandwidth.map_or("uncapped".to_owned(), |b| format!("{}/s", bytes(b))),
        o.multifd_channels.map_or("off".to_owned(), |n| format!("{n} channels")),
        onoff(o.auto_converge),
        o.plug_limit.map_or("derived".to_owned(), |l| bytes(u64::from(l))),
        if o.storage == StorageMode::Shared { "shared" } else { "mirrored over NBD" },
        compact(o.storage_timeout),
        compact(o.ram_timeout),
        if o.plain_streams { "plain (unencrypted)" } else { "TLS" },
    )
}

/// A duration as it would be typed on the command line: "25ms", "30s", "30m", "1h".
pub fn compact(d: Duration) -> String {
    let s = d.as_secs();
    match (d.subsec_nanos(), s) {
        (0, s) if s != 0 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        (0, s) if s != 0 && s.is_multiple_of(60) => format!("{}m", s / 60),
        (0, s) if s != 0 => format!("{s}s"),
        _ if d.subsec_nanos().is_multiple_of(1_000_000) => format!("{}ms", d.as_millis()),
        _ => format!("{}us", d.as_micros()),
    }
}

/// The sandbox found on the source, in the dry-run plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxView {
    /// Sandbox id.
    pub id: String,
    /// QEMU version.
    pub qemu_version: String,
    /// QEMU's status string.
    pub qemu_status: String,
    /// Disks (drive ids) that would be mirrored or shared.
    pub disks: Vec<String>,
}

/// Sandbox view of an agent's description.
pub fn sandbox_view(s: &pb::Sandbox) -> SandboxView {
    SandboxView {
        id: s.id.clone(),
        qemu_version: s.qemu_version.clone(),
        qemu_status: s.qemu_status.clone(),
        disks: s.disks.iter().filter(|d| !d.read_only).map(|d| d.drive_id.clone()).collect(),
    }
}

/// The `--dry-run` document.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanView {
    /// Always true: nothing was changed.
    pub dry_run: bool,
    /// The pod.
    pub pod: PodView,
    /// The source sandbox, when the source agent could be asked.
    pub sandbox: Option<SandboxView>,
    /// Why the sandbox is unknown, when it is.
    pub sandbox_error: Option<String>,
    /// Where the pod runs.
    pub source: EndView,
    /// Where it would go.
    pub destination: EndView,
    /// The options that would be sent.
    pub options: OptionsView,
}

/// The dry-run plan.
pub fn plan_view(r: &Resolved, o: &MigrationOptions, sandbox: Result<&pb::Sandbox, &str>) -> PlanView {
    PlanView {
        dry_run: true,
        pod: pod_view(r),
        sandbox: sandbox.ok().map(sandbox_view),
        sandbox_error: sandbox.err().map(str::to_owned),
        source: end_view(&r.source),
        destination: end_view(&r.destination),
        options: options_view(o),
    }
}

/// The dry-run plan as text.
pub fn render_plan_text(r: &Resolved, o: &MigrationOptions, sandbox: Result<&pb::Sandbox, &str>) -> String {
    let mut s = String::from("Dry run: nothing was changed.\n");
    let _ = writeln!(s, "  pod:           {} (uid {})", r.pod.key(), r.pod.uid);
    let _ = writeln!(s, "  runtime class: {}", r.pod.runtime_class);
    let ips: Vec<String> = r.pod.ips.iter().map(ToString::to_string).collect();
    let _ = writeln!(s, "  pod IPs:       {}", ips.join(", "));
    match sandbox {
        Ok(sb) => {
            let v = sandbox_view(sb);
            let disks = if v.disks.is_empty() { "no writable disks".to_owned() } else { v.disks.join(", ") };
            let _ = writeln!(
                s,
                "  sandbox:       {} (QEMU {}, {}; {disks})",
                v.id, v.qemu_version, v.qemu_status
            );
        }
        Err(e) => {
            let _ = writeln!(s, "  sandbox:       unknown ({e})");
        }
    }
    for (label, end) in [("source:", &r.source), ("destination:", &r.destination)] {
        let _ = writeln!(s, "  {label:<14} {} {} via agent {}", end.node, end.address, end.agent_pod);
    }
    let _ = writeln!(s, "  options:       {}", options_line(o, r));
    s
}

/// Why it failed, in the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorView {
    /// "source", "destination" or `None` for a client-side cause.
    pub side: Option<&'static str>,
    /// Error kind ("QEMU", "NETWORK", "TIMEOUT", "LOST", ...).
    pub kind: String,
    /// The message.
    pub message: String,
}

/// Phase times of both sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhasesView {
    /// Source node.
    pub source: Vec<PhaseTime>,
    /// Destination node.
    pub destination: Vec<PhaseTime>,
}

/// The final document: `-o json` prints it, the text table renders it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Migration id.
    pub migration_id: String,
    /// "succeeded", "failed" or "cancelled".
    pub result: &'static str,
    /// Set unless it succeeded (or was cancelled without another failure).
    pub error: Option<ErrorView>,
    /// The pod.
    pub pod: PodView,
    /// The source sandbox id.
    pub sandbox_id: String,
    /// The incoming sandbox on the destination.
    pub destination_sandbox_id: Option<String>,
    /// Source end.
    pub source: EndView,
    /// Destination end.
    pub destination: EndView,
    /// Options sent to both sides.
    pub options: OptionsView,
    /// Time in each phase.
    pub phases: PhasesView,
    /// QEMU's downtime.
    pub downtime_ms: Option<u64>,
    /// Source: QEMU STOP to the route swapped into the tunnel.
    pub stop_to_route_swap_ns: Option<u64>,
    /// Destination: QEMU RESUME to the plug released.
    pub resume_to_plug_release_ns: Option<u64>,
    /// Packets the destination plug dropped at its limit.
    pub plug_dropped_packets: Option<u64>,
    /// Client-side time from PrepareIncoming to the end.
    pub total_ms: u64,
    /// Remarks (refused cancels, forwarding still running, ...).
    pub notes: Vec<String>,
}

fn last_nonzero(events: &[&pb::MigrationEvent], f: impl Fn(&pb::MigrationEvent) -> u64) -> Option<u64> {
    events.iter().rev().map(|e| f(e)).find(|v| *v != 0)
}

/// The final document of a run.
pub fn summarize(resolved: &Resolved, plan: &Plan, report: &Report) -> Summary {
    let src = report.tracker.events(Side::Source);
    let dst = report.tracker.events(Side::Destination);
    let all: Vec<&pb::MigrationEvent> = src.iter().chain(dst).collect();
    let srcs: Vec<&pb::MigrationEvent> = src.iter().collect();
    let dsts: Vec<&pb::MigrationEvent> = dst.iter().collect();
    let (result, error) = match &report.outcome {
        Outcome::Succeeded => ("succeeded", None),
        Outcome::Cancelled => ("cancelled", None),
        Outcome::Failed { side, kind, message } => (
            "failed",
            Some(ErrorView { side: side.map(Side::name), kind: kind.clone(), message: message.clone() }),
        ),
    };
    let mut notes = report.tracker.notes().to_vec();
    let forwarding = src.last().is_some_and(|e| e.phase.enum_value() == Ok(pb::Phase::PHASE_FORWARDING));
    if report.outcome == Outcome::Succeeded && forwarding {
        let until = if plan.options.tunnel_idle_timeout.is_zero() {
            "until that node's route to the VM is taken over (the cluster learned the move), the \
             VM stops on the destination, or `katactl release-forward` ends it"
                .to_owned()
        } else {
            format!("until the tunnel is idle for {:?}", plan.options.tunnel_idle_timeout)
        };
        notes.push(format!(
            "the source node keeps forwarding the VM's traffic {until}; katactl watch {} on that node shows when it ends",
            report.migration_id
        ));
    }
    let mut destination = end_view(&resolved.destination);
    if let Some(a) = &report.destination_address {
        destination.address.clone_from(a);
    }
    let mut source = end_view(&resolved.source);
    source.address.clone_from(&report.source_address);
    Summary {
        migration_id: report.migration_id.clone(),
        result,
        error,
        pod: pod_view(resolved),
        sandbox_id: plan.sandbox.id.clone(),
        destination_sandbox_id: report.destination_sandbox_id.clone(),
        source,
        destination,
        options: options_view(&plan.options),
        phases: PhasesView { source: phase_times(src), destination: phase_times(dst) },
        downtime_ms: last_nonzero(&all, |e| e.cutover.downtime_ms)
            .or_else(|| last_nonzero(&all, |e| e.result.downtime_ms)),
        stop_to_route_swap_ns: last_nonzero(&srcs, |e| e.cutover.route_swap_latency_nanos),
        resume_to_plug_release_ns: last_nonzero(&dsts, |e| e.cutover.plug_release_latency_nanos),
        plug_dropped_packets: dsts
            .iter()
            .rev()
            .find_map(|e| e.result.as_ref().map(|r| r.plug_dropped_packets)),
        total_ms: u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
        notes,
    }
}

fn cell(times: &[PhaseTime], phase: &str) -> String {
    match times.iter().find(|t| t.phase == phase) {
        None => "-".into(),
        Some(PhaseTime { duration_ms: None, .. }) => "running".into(),
        Some(PhaseTime { duration_ms: Some(ms), .. }) => human(Duration::from_secs_f64(ms / 1e3)),
    }
}

/// The final table.
pub fn render_text(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Migration {} of {}/{}: {} ({}) → {} ({})",
        s.migration_id,
        s.pod.namespace,
        s.pod.name,
        s.source.node,
        s.source.address,
        s.destination.node,
        s.destination.address
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<12} {:<12} DESTINATION", "PHASE", "SOURCE");
    for phase in ["preparing", "storage", "ram", "cutover", "forwarding"] {
        let (a, b) = (cell(&s.phases.source, phase), cell(&s.phases.destination, phase));
        if a != "-" || b != "-" {
            let _ = writeln!(out, "{phase:<12} {a:<12} {b}");
        }
    }
    let _ = writeln!(out);
    let opt = |v: Option<u64>, f: &dyn Fn(u64) -> String| v.map_or("-".to_owned(), f);
    let rows = [
        ("QEMU downtime", opt(s.downtime_ms, &|v| format!("{v} ms"))),
        ("STOP → route swap", opt(s.stop_to_route_swap_ns, &|v| human(Duration::from_nanos(v)))),
        ("RESUME → plug release", opt(s.resume_to_plug_release_ns, &|v| human(Duration::from_nanos(v)))),
        ("plug drops", opt(s.plug_dropped_packets, &|v| format!("{v} packets"))),
        ("total", human(Duration::from_millis(s.total_ms))),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<23} {v}");
    }
    let result = match &s.error {
        None => s.result.to_owned(),
        Some(e) => match e.side {
            Some(side) => format!("{} on the {side} ({}): {}", s.result, e.kind, e.message),
            None => format!("{} ({}): {}", s.result, e.kind, e.message),
        },
    };
    let _ = writeln!(out, "{:<23} {result}", "result");
    for n in &s.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

#[cfg(test)]
#[path = "output_tests.rs"]
mod tests;
