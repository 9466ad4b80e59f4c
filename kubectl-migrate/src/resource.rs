//! `kubectl migrate` on the Migration resource: the plugin creates a Migration in the pod's
//! namespace and follows its status; the agents' controller does the migration
//! (docs/KUBERNETES.md). Who may migrate is RBAC on `migrations.katamaran.io`; the plugin needs
//! nothing else (no port-forward to the agents, no read of nodes).
//!
//! The decisions — when to stop following, what the end means for the user, when to say that
//! no agent has taken the Migration — are plain functions of the status ([`verdict`]), tested
//! without an API server; [`follow`] only watches and prints.

use std::io::Write;
use std::time::{Duration, Instant};

use futures::StreamExt;
use katamaran::cluster::orchestrate::{at, interrupted};
use katamaran::migration::options::{MigrationOptions, StorageMode, TunnelMode as EngineTunnel};
use katamaran_api::units;
use katamaran_api::v1alpha1::{
    condition, format_micros, Migration, MigrationSpec, Options, Owner, Phase, TunnelMode,
};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

/// How long the plugin waits, once the VM runs on the target, for the target's figures (the
/// guest pause) to reach the status.
pub const FIGURES_GRACE: Duration = Duration::from_secs(2);

/// Whether the status carries the guest pause (both nodes' figures are in).
fn has_guest_pause(m: &Migration) -> bool {
    m.status.as_ref().and_then(|s| s.downtime.as_ref()).is_some_and(|d| d.guest_pause_microseconds.is_some())
}

/// How long a Migration may stay Pending before the plugin says that no agent took it.
pub const UNCLAIMED_AFTER: Duration = Duration::from_secs(30);

/// The resource's options for the CLI's flags (the same defaults, the same meaning).
pub fn options(o: &MigrationOptions) -> Options {
    Options {
        shared_storage: o.storage == StorageMode::Shared,
        downtime: units::format_duration(o.downtime_limit),
        auto_downtime: o.auto_downtime,
        bandwidth: o.max_bandwidth.map(bandwidth),
        multifd_channels: o.multifd_channels.map(i32::from),
        auto_converge: o.auto_converge,
        tunnel_mode: match o.tunnel_mode {
            EngineTunnel::Auto => TunnelMode::Auto,
            EngineTunnel::Ipip => TunnelMode::Ipip,
            EngineTunnel::Gre => TunnelMode::Gre,
            EngineTunnel::Ip6ip6 => TunnelMode::Ip6ip6,
            EngineTunnel::Ip6gre => TunnelMode::Ip6gre,
            EngineTunnel::Route => TunnelMode::Route,
        },
        tunnel_idle_timeout: (!o.tunnel_idle_timeout.is_zero())
            .then(|| units::format_duration(o.tunnel_idle_timeout)),
        plug_limit_bytes: o.plug_limit.map(i64::from),
        storage_timeout: units::format_duration(o.storage_timeout),
        ram_timeout: units::format_duration(o.ram_timeout),
        plain_streams: o.plain_streams,
    }
}

/// Bytes per second as a Kubernetes quantity: the largest binary unit that divides it exactly.
pub fn bandwidth(bytes: u64) -> String {
    for (unit, per) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes >= per && bytes.is_multiple_of(per) && bytes / per < 1_000_000_000 {
            return format!("{}{unit}", bytes / per);
        }
    }
    bytes.to_string()
}

/// Checks a pod or node name the way the API server will (a DNS-1123 subdomain), so that a bad
/// one is refused before any request, naming the argument.
///
/// # Errors
/// A sentence naming `what` and the rule.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{what} {name:?} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.', at most 253 characters)"
        ));
    }
    Ok(())
}

/// The Migration the plugin creates: a name the API server completes (`<pod>-to-<node>-xxxxx`).
/// `pod` and `node` are names [`check_name`] accepts.
pub fn new_migration(pod: &str, node: &str, options: Options) -> Migration {
    let mut spec = MigrationSpec::new(pod, node);
    spec.options = options;
    let mut m = Migration::new("", spec);
    m.metadata.name = None;
    // Names are at most 253 characters; the API server adds 5.
    let mut prefix = format!("{pod}-to-{node}-");
    if prefix.len() > 240 {
        prefix = format!("{}-", pod.get(..pod.len().min(200)).unwrap_or("migration"));
    }
    m.metadata.generate_name = Some(prefix);
    m
}

/// `--dry-run`: nothing, client (print the Migration), server (the API server admits it, RBAC
/// and validation included, and persists nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DryRun {
    /// Create it.
    None,
    /// Print the Migration that would be created; no request.
    Client,
    /// Send it with `dryRun=All`: the API server checks it and stores nothing.
    Server,
}

/// Creates `m` (or, with `dry_run`, has the API server check it).
///
/// # Errors
/// The API server's refusal (403 without `create migrations` in the namespace, 422 for options
/// outside the schema).
pub async fn create(api: &Api<Migration>, m: &Migration, dry_run: bool) -> Result<Migration, kube::Error> {
    let pp = PostParams { dry_run, ..PostParams::default() };
    api.create(&pp, m).await
}

/// What the status says for the user, once it says something final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still running.
    Running,
    /// The VM runs on the target node (Forwarding or Completed, unless waiting for the forward).
    Moved,
    /// Ended without moving: failed, refused before anything ran, or cancelled.
    Ended {
        /// The phase it ended in.
        phase: Phase,
        /// Refused as asked (Accepted=False): exit 2 rather than 1.
        refused: bool,
    },
}

/// The verdict of a Migration now. With `wait_forwarding` only Completed counts as moved.
pub fn verdict(m: &Migration, wait_forwarding: bool) -> Verdict {
    let phase = m.phase();
    let status = m.status.as_ref();
    let moved = status.is_some_and(|s| s.owner == Some(Owner::Destination));
    match phase {
        Phase::Completed => Verdict::Moved,
        Phase::Forwarding if !wait_forwarding => Verdict::Moved,
        Phase::Failed | Phase::Cancelled if moved => Verdict::Moved,
        Phase::Failed | Phase::Cancelled => Verdict::Ended {
            phase,
            refused: status.is_some_and(|s| {
                s.conditions.iter().any(|c| c.type_ == condition::ACCEPTED && c.status == "False")
            }),
        },
        _ => Verdict::Running,
    }
}

/// A line for a status that changed what the user should see (phase, progress), or `None`.
#[derive(Debug, Default)]
pub struct Lines {
    last_phase: Option<Phase>,
    last_progress: Option<Instant>,
}

impl Lines {
    /// How often a progress line may repeat within a phase.
    pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

    /// The line to print for `m` now, if any.
    pub fn line(&mut self, m: &Migration, now: Instant) -> Option<String> {
        let phase = m.phase();
        let s = m.status.as_ref();
        let summary = s.and_then(|s| s.summary.as_ref());
        let figures = summary
            .map(|x| {
                let mut parts = Vec::new();
                if !x.progress.is_empty() {
                    parts.push(x.progress.clone());
                }
                if !x.downtime.is_empty() {
                    parts.push(format!("downtime {}", x.downtime));
                }
                parts.join(", ")
            })
            .unwrap_or_default();
        if self.last_phase != Some(phase) {
            self.last_phase = Some(phase);
            self.last_progress = Some(now);
            let message = s.and_then(|s| s.message.clone()).unwrap_or_default();
            let mut line = format!("{:<10}", phase.as_str());
            if !figures.is_empty() {
                line.push_str(&format!(" {figures}"));
            }
            if !message.is_empty() {
                line.push_str(&format!(" — {message}"));
            }
            return Some(line);
        }
        let due = self.last_progress.is_none_or(|t| now.duration_since(t) >= Self::PROGRESS_EVERY);
        if due && matches!(phase, Phase::Storage | Phase::Ram) && !figures.is_empty() {
            self.last_progress = Some(now);
            return Some(format!("{:<10} {figures}", phase.as_str()));
        }
        None
    }
}

/// The final table for people.
pub fn render(m: &Migration) -> String {
    let s = m.status.clone().unwrap_or_default();
    let mut t = String::new();
    let mut row = |k: &str, v: String| {
        if !v.is_empty() {
            t.push_str(&format!("  {k:<16}{v}\n"));
        }
    };
    row("migration", format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()));
    row("phase", m.phase().as_str().to_owned());
    row("pod", m.spec.pod.clone());
    row("nodes", format!("{} → {}", s.source_node.clone().unwrap_or_else(|| "?".into()), m.spec.target_node));
    row(
        "VM runs on",
        match s.owner {
            Some(Owner::Destination) => m.spec.target_node.clone(),
            Some(Owner::Source) => s.source_node.clone().unwrap_or_default(),
            None => String::new(),
        },
    );
    let phases: Vec<String> = s
        .phases
        .iter()
        .map(|p| match &p.end_time {
            Some(end) => {
                let us = end.0.as_microsecond() - p.start_time.0.as_microsecond();
                format!("{} {}", p.phase.as_str(), format_micros(us))
            }
            None => format!("{} running", p.phase.as_str()),
        })
        .collect();
    row("phases", phases.join(", "));
    if let Some(d) = &s.downtime {
        row("guest pause", d.guest_pause_microseconds.map(format_micros).unwrap_or_default());
        row("QEMU downtime", d.qemu_microseconds.map(format_micros).unwrap_or_default());
    }
    if let Some(c) = &s.cutover {
        row("tunnel", c.tunnel_mode.map(|m| m.as_str().to_owned()).unwrap_or_default());
        row("plug release", c.plug_release_microseconds.map(format_micros).unwrap_or_default());
        row("plug drops", c.plug_drops.map(|d| d.to_string()).unwrap_or_default());
    }
    row("message", s.message.unwrap_or_default());
    t
}

/// How a followed Migration ended for the plugin.
#[derive(Debug, Clone)]
pub struct Followed {
    /// The Migration as last seen.
    pub migration: Option<Migration>,
    /// The verdict.
    pub verdict: Verdict,
    /// Whether the plugin asked for the cancel (Ctrl-C or `--timeout`), and why.
    pub cancel_asked: Option<&'static str>,
}

async fn ask_cancel(api: &Api<Migration>, name: &str) -> Result<(), kube::Error> {
    let patch = serde_json::json!({"spec": {"cancel": true}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(drop)
}

/// Asks for the cancel; a Migration no agent has taken yet is deleted instead (nothing ran, and
/// no agent would answer the cancel). Returns whether it was withdrawn that way.
async fn withdraw_unclaimed(
    api: &Api<Migration>,
    name: &str,
    last: Option<&Migration>,
    out: &mut dyn Write,
) -> bool {
    if last.is_none_or(|m| m.phase() == Phase::Pending) {
        // An agent that accepts it at this instant sees the deletion: its finalizer makes it
        // cancel what it started.
        match api.delete(name, &kube::api::DeleteParams::default()).await {
            Ok(_) => {
                let _ = writeln!(out, "no katamaran agent had reported taking Migration {name}: deleted it");
                return true;
            }
            Err(e) => {
                let _ = writeln!(out, "Migration {name} could not be withdrawn: {e}");
            }
        }
    }
    if let Err(e) = ask_cancel(api, name).await {
        let _ = writeln!(out, "the cancel could not be asked for: {e}");
    }
    false
}

/// Follows Migration `name` until [`verdict`] is final, printing lines to `out`. Ctrl-C
/// (`interrupt`) or `timeout` ask for the cancel through the resource (`spec.cancel`) and keep
/// following to see whether it was honoured.
pub async fn follow(
    api: &Api<Migration>,
    name: &str,
    wait_forwarding: bool,
    timeout: Option<Duration>,
    mut interrupt: watch::Receiver<bool>,
    out: &mut dyn Write,
) -> Followed {
    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    let unclaimed = tokio::time::sleep(UNCLAIMED_AFTER);
    tokio::pin!(unclaimed);
    let mut warned = false;
    let stream = watcher::watch_object(api.clone(), name);
    tokio::pin!(stream);
    let mut lines = Lines::default();
    let mut last: Option<Migration> = None;
    let mut cancel_asked: Option<&'static str> = None;
    let mut moved_at: Option<Instant> = None;
    let figures_due = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(figures_due);
    loop {
        if let Some(t) = moved_at {
            figures_due.as_mut().reset((t + FIGURES_GRACE).into());
        }
        tokio::select! {
            () = &mut figures_due, if moved_at.is_some() => {
                let verdict = last.as_ref().map_or(Verdict::Running, |m| verdict(m, wait_forwarding));
                return Followed { migration: last, verdict, cancel_asked };
            }
            item = stream.next() => match item {
                Some(Ok(Some(m))) => {
                    if let Some(line) = lines.line(&m, Instant::now()) {
                        let _ = writeln!(out, "{line}");
                    }
                    let v = verdict(&m, wait_forwarding);
                    let complete = m.phase().is_terminal() || has_guest_pause(&m);
                    last = Some(m);
                    if v != Verdict::Running {
                        // The target's figures (its RESUME) may reach the status a moment after
                        // the source's hand-over: wait briefly for them.
                        let grace = *moved_at.get_or_insert_with(Instant::now);
                        if complete || v != Verdict::Moved || grace.elapsed() >= FIGURES_GRACE {
                            return Followed { migration: last, verdict: v, cancel_asked };
                        }
                    }
                }
                Some(Ok(None)) => {
                    let _ = writeln!(out, "Migration {name} was deleted");
                    let verdict = Verdict::Ended { phase: last.as_ref().map_or(Phase::Pending, Migration::phase), refused: false };
                    return Followed { migration: last, verdict, cancel_asked };
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the Migration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                None => {
                    let verdict = Verdict::Ended { phase: last.as_ref().map_or(Phase::Pending, Migration::phase), refused: false };
                    return Followed { migration: last, verdict, cancel_asked };
                }
            },
            () = &mut unclaimed, if !warned => {
                warned = true;
                if last.as_ref().is_none_or(|m| m.phase() == Phase::Pending) {
                    let _ = writeln!(
                        out,
                        "no katamaran agent has taken Migration {name} after {}s: is the agent DaemonSet running (with its controller) on the pod's node?",
                        UNCLAIMED_AFTER.as_secs()
                    );
                }
            }
            () = interrupted(&mut interrupt), if cancel_asked.is_none() => {
                cancel_asked = Some("interrupted");
                let _ = writeln!(out, "interrupted: asking for the cancel through Migration {name} (Ctrl-C again to quit without waiting)");
                if withdraw_unclaimed(api, name, last.as_ref(), out).await {
                    return Followed { migration: last, verdict: Verdict::Ended { phase: Phase::Pending, refused: false }, cancel_asked };
                }
            }
            () = at(deadline), if cancel_asked.is_none() => {
                cancel_asked = Some("timeout");
                let _ = writeln!(out, "--timeout {:?} passed: asking for the cancel through Migration {name}", timeout.unwrap_or_default());
                if withdraw_unclaimed(api, name, last.as_ref(), out).await {
                    return Followed { migration: last, verdict: Verdict::Ended { phase: Phase::Pending, refused: false }, cancel_asked };
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "resource_tests.rs"]
mod tests;
