//! Kubernetes Events on the pods this agent moves: `kubectl describe pod` and `kubectl get
//! events` show that a migration started, completed (with its downtime) or failed or was
//! cancelled (with the reason), whoever started it (`kubectl migrate`, `katactl`).
//!
//! The source's agent reports (it decides the migration; the destination's would only repeat it),
//! as `events.k8s.io/v1` Events regarding the Pod, from controller [`REPORTING_CONTROLLER`] and
//! the node's name as instance. Reporting is best effort: an API server that is unreachable or
//! refuses costs a warning in the log, never the migration.

use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::api::{Api, PostParams};

use crate::migration::events::{Event, EventLog, Phase};

/// The `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "katamaran.io/agent";

/// The longest `note` the API server accepts (1 kB).
const NOTE_MAX: usize = 1024;

/// The pod a migration moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid (may be empty when unknown).
    pub uid: String,
}

/// One Event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    /// `MigrationStarted`, `MigrationCompleted`, `MigrationFailed`, `MigrationCancelled`.
    pub reason: &'static str,
    /// For people.
    pub note: String,
}

/// Turns a source migration's progress into the Events a pod gets: one when it starts, one
/// when it ends. Pure: fed the events in order.
#[derive(Debug)]
pub struct Narrator {
    migration_id: String,
    dest_node: String,
    started: bool,
    ended: bool,
}

impl Narrator {
    /// For migration `migration_id` moving the pod's VM to `dest_node`.
    pub fn new(migration_id: &str, dest_node: &str) -> Self {
        Self {
            migration_id: migration_id.to_owned(),
            dest_node: dest_node.to_owned(),
            started: false,
            ended: false,
        }
    }

    /// Whether the last Event was given.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The Events `e` gives (none, one, or the start and the end at once).
    pub fn on(&mut self, e: &Event) -> Vec<Note> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        if !self.started {
            self.started = true;
            out.push(Note {
                warning: false,
                reason: "MigrationStarted",
                note: format!("moving the VM to node {} (migration {})", self.dest_node, self.migration_id),
            });
        }
        let end = match e.phase {
            // The VM runs on the destination: that is the migration's result (the forward that
            // follows is the source node's business).
            Phase::Forwarding | Phase::Completed => {
                let downtime = e.cutover.as_ref().map_or(0, |t| t.downtime_ms);
                let figures =
                    if downtime > 0 { format!("; QEMU downtime {downtime} ms") } else { String::new() };
                Some(Note {
                    warning: false,
                    reason: "MigrationCompleted",
                    note: format!(
                        "the VM runs on node {}{figures} (migration {})",
                        self.dest_node, self.migration_id
                    ),
                })
            }
            Phase::Failed => Some(Note {
                warning: true,
                reason: "MigrationFailed",
                note: format!("migration {} failed, the VM runs here: {}", self.migration_id, e.message),
            }),
            Phase::Cancelled => Some(Note {
                warning: true,
                reason: "MigrationCancelled",
                note: format!(
                    "migration {} was cancelled, the VM runs here: {}",
                    self.migration_id, e.message
                ),
            }),
            _ => None,
        };
        if let Some(mut n) = end {
            self.ended = true;
            truncate(&mut n.note, NOTE_MAX);
            out.push(n);
        }
        out
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Records Events through one Kubernetes client.
#[derive(Clone)]
pub struct EventReporter {
    client: kube::Client,
    instance: String,
}

impl std::fmt::Debug for EventReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReporter").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl EventReporter {
    /// Reports with `client`, as `reportingInstance` `instance` (the node's name).
    pub fn new(client: kube::Client, instance: &str) -> Self {
        let mut instance = instance.to_owned();
        truncate(&mut instance, 128);
        Self { client, instance }
    }

    /// Follows a source migration's log in a task of its own and records its Events.
    pub fn follow(self: &Arc<Self>, pod: PodRef, migration_id: &str, dest_node: &str, log: &EventLog) {
        let reporter = self.clone();
        let mut narrator = Narrator::new(migration_id, dest_node);
        let mut watcher = log.watch();
        tokio::spawn(async move {
            while let Some(e) = watcher.next().await {
                for note in narrator.on(&e) {
                    if let Err(err) = reporter.record(&pod, &note).await {
                        tracing::warn!(pod = %pod.name, reason = note.reason, error = %err, "cannot record a Kubernetes Event");
                    }
                }
                if narrator.ended() {
                    return;
                }
            }
        });
    }

    /// Records one Event regarding `pod`.
    ///
    /// # Errors
    /// The API server's refusal or the client's failure.
    pub async fn record(&self, pod: &PodRef, note: &Note) -> Result<KubeEvent, kube::Error> {
        let now = SystemTime::now();
        let nanos = crate::convert::unix_nanos(now);
        let mut regarding = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace, "name": pod.name,
        });
        if !pod.uid.is_empty() {
            regarding["uid"] = pod.uid.clone().into();
        }
        let event: KubeEvent = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{}.{nanos:x}", pod.name), "namespace": pod.namespace},
            "eventTime": rfc3339_micros(now),
            "regarding": regarding,
            "action": "Migrate",
            "reason": note.reason,
            "note": note.note,
            "type": if note.warning { "Warning" } else { "Normal" },
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance,
        }))
        .map_err(kube::Error::SerdeError)?;
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), &pod.namespace);
        api.create(&PostParams::default(), &event).await
    }
}

/// `t` as RFC 3339 in UTC with microseconds (a MicroTime), e.g. `2026-12-03T13:00:00.000000Z`.
pub fn rfc3339_micros(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::events::CutoverTimes;
    use std::time::Duration;

    #[test]
    fn micro_times_are_rfc3339_utc() {
        let at = |secs: u64, micros: u64| {
            rfc3339_micros(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000001Z", "a leap day");
        assert_eq!(at(1_796_302_800, 123_456), "2026-12-03T13:00:00.123456Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z", "2100 is no leap year");
    }

    #[test]
    fn a_pod_hears_of_the_start_and_of_the_end_once() {
        let mut n = Narrator::new("mig-1", "node-b");
        let reasons = |notes: Vec<Note>| notes.into_iter().map(|n| n.reason).collect::<Vec<_>>();
        assert_eq!(reasons(n.on(&Event::new(Phase::Preparing, "x"))), ["MigrationStarted"]);
        assert!(n.on(&Event::new(Phase::Ram, "pre-copy")).is_empty());
        let mut fwd = Event::new(Phase::Forwarding, "VM runs on node-b");
        fwd.cutover = Some(CutoverTimes { downtime_ms: 31, ..CutoverTimes::default() });
        let end = n.on(&fwd);
        assert_eq!(end.len(), 1);
        assert_eq!(end[0].reason, "MigrationCompleted");
        assert!(!end[0].warning);
        assert_eq!(end[0].note, "the VM runs on node node-b; QEMU downtime 31 ms (migration mig-1)");
        assert!(n.ended());
        assert!(
            n.on(&Event::new(Phase::Completed, "the forward ended")).is_empty(),
            "the forward's end is not news"
        );
    }

    #[test]
    fn failures_and_cancels_are_warnings_with_their_reason_and_a_bounded_note() {
        let mut n = Narrator::new("mig-2", "node-b");
        let notes = n.on(&Event::new(Phase::Failed, "x".repeat(5000)));
        assert_eq!(
            notes.iter().map(|n| n.reason).collect::<Vec<_>>(),
            ["MigrationStarted", "MigrationFailed"]
        );
        assert!(notes[1].warning);
        assert!(notes[1].note.starts_with("migration mig-2 failed, the VM runs here: xxx"));
        assert_eq!(notes[1].note.len(), NOTE_MAX);
        let mut n = Narrator::new("mig-3", "node-b");
        n.on(&Event::new(Phase::Ram, "x"));
        let notes = n.on(&Event::new(Phase::Cancelled, "cancelled by the user"));
        assert_eq!(notes.len(), 1);
        assert_eq!((notes[0].reason, notes[0].warning), ("MigrationCancelled", true));
        assert!(notes[0].note.ends_with("cancelled by the user"), "{}", notes[0].note);
        let mut s = "é".repeat(600);
        truncate(&mut s, NOTE_MAX);
        assert!(s.len() <= NOTE_MAX && s.chars().all(|c| c == 'é'), "cut on a character boundary");
    }
}
