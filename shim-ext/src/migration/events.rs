//! Progress events of one migration on one node, kept in order for any number of watchers.
//!
//! Every event is appended to a log with a sequence number; a watcher reads from where it left
//! off, so a slow watcher misses nothing and a late one first sees the latest state. The log is
//! small (one event per phase change plus progress ticks) and lives as long as the migration
//! record.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

/// Which side of the migration this node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node the VM leaves.
    Source,
    /// The node the VM arrives on.
    Destination,
}

/// Phases, in the order a successful migration passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Checking the request; creating sandbox, tunnel, plug.
    Preparing,
    /// Mirroring disks.
    Storage,
    /// RAM pre-copy.
    Ram,
    /// VM stopped on the source.
    Cutover,
    /// VM runs on the destination; the source forwards stragglers.
    Forwarding,
    /// Terminal success.
    Completed,
    /// Terminal failure.
    Failed,
    /// Terminal cancel.
    Cancelled,
}

impl Phase {
    /// Whether no event follows this phase.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// Lower-case name for logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Storage => "storage",
            Phase::Ram => "ram",
            Phase::Cutover => "cutover",
            Phase::Forwarding => "forwarding",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// Why a migration failed, for callers that map it to exit codes and ttrpc codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was wrong.
    InvalidArgument,
    /// The sandbox or migration does not exist.
    NotFound,
    /// The node or sandbox is not in a state that allows it.
    FailedPrecondition,
    /// QEMU refused or failed.
    Qemu,
    /// Netlink or a data stream failed.
    Network,
    /// The storage mirror failed.
    Storage,
    /// A deadline passed.
    Timeout,
    /// Cancelled by a caller.
    Cancelled,
    /// Anything else.
    Internal,
}

/// One drive's mirror progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DriveProgress {
    /// Drive id.
    pub drive_id: String,
    /// Bytes to copy (grows while the guest writes).
    pub total_bytes: u64,
    /// Bytes copied.
    pub done_bytes: u64,
    /// In sync.
    pub ready: bool,
}

/// RAM pre-copy progress, from `query-migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RamProgress {
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// Bytes left.
    pub remaining_bytes: u64,
    /// Guest RAM.
    pub total_bytes: u64,
    /// Pages dirtied per second.
    pub dirty_pages_rate: u64,
    /// Dirty-sync passes.
    pub iteration: u64,
    /// Current rate.
    pub throughput_bytes_per_second: u64,
    /// QEMU's expected downtime.
    pub expected_downtime_ms: u64,
    /// Guest page size.
    pub page_size_bytes: u64,
}

/// The instants of a cutover (unix nanos, 0 = not known on this node) and reaction latencies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CutoverTimes {
    /// QEMU's STOP event timestamp (source).
    pub stop_unix_nanos: u64,
    /// QEMU's RESUME event timestamp (destination).
    pub resume_unix_nanos: u64,
    /// When the VM route pointed at the forward (source).
    pub route_swapped_unix_nanos: u64,
    /// When the plug released its packets (destination).
    pub plug_released_unix_nanos: u64,
    /// STOP → route swapped.
    pub stop_to_route_swap_nanos: u64,
    /// RESUME → plug released.
    pub resume_to_plug_release_nanos: u64,
    /// QEMU's measured downtime.
    pub downtime_ms: u64,
    /// When the destination's `resumed` reached the source (source): STOP to this bounds the
    /// guest's pause from above by one control hop.
    pub resumed_seen_unix_nanos: u64,
}

/// The end of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `None` on success.
    pub error: Option<(ErrorKind, String)>,
    /// Wall time from accept to the end.
    pub total_ms: u64,
    /// QEMU's downtime, when known.
    pub downtime_ms: u64,
    /// Packets the destination plug dropped for lack of room.
    pub plug_dropped_packets: u64,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in this migration's stream, from 1.
    pub sequence: u64,
    /// Phase at the event.
    pub phase: Phase,
    /// When.
    pub timestamp: SystemTime,
    /// Human summary.
    pub message: String,
    /// Storage progress, when mirroring.
    pub storage: Option<Vec<DriveProgress>>,
    /// RAM progress.
    pub ram: Option<RamProgress>,
    /// Cutover instants.
    pub cutover: Option<CutoverTimes>,
    /// Set on the terminal event.
    pub outcome: Option<Outcome>,
}

impl Event {
    /// A plain phase event.
    pub fn new(phase: Phase, message: impl Into<String>) -> Self {
        Self {
            sequence: 0,
            phase,
            timestamp: SystemTime::now(),
            message: message.into(),
            storage: None,
            ram: None,
            cutover: None,
            outcome: None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<Event>,
}

/// The ordered event log of one migration.
#[derive(Debug, Clone)]
pub struct EventLog {
    inner: Arc<Mutex<Inner>>,
    seq: watch::Sender<u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self { inner: Arc::default(), seq: watch::channel(0).0 }
    }
}

impl EventLog {
    /// Appends an event, numbering it. Events after a terminal one are dropped: the terminal
    /// event is the last a watcher sees.
    pub fn push(&self, mut event: Event) -> u64 {
        let seq = {
            let Ok(mut inner) = self.inner.lock() else { return 0 };
            if inner.events.last().is_some_and(|e| e.phase.is_terminal()) {
                return 0;
            }
            event.sequence = inner.events.len() as u64 + 1;
            inner.events.push(event);
            inner.events.len() as u64
        };
        self.seq.send_replace(seq);
        seq
    }

    /// The most recent event.
    pub fn last(&self) -> Option<Event> {
        self.inner.lock().ok().and_then(|i| i.events.last().cloned())
    }

    /// The current phase (`Preparing` before any event).
    pub fn phase(&self) -> Phase {
        self.last().map_or(Phase::Preparing, |e| e.phase)
    }

    /// Events after `after` (a sequence number), in order.
    pub fn since(&self, after: u64) -> Vec<Event> {
        self.inner.lock().map(|i| i.events.iter().skip(after as usize).cloned().collect()).unwrap_or_default()
    }

    /// A watcher that first yields the latest event, then every later one, ending after the
    /// terminal event.
    pub fn watch(&self) -> Watcher {
        let last = self.last().map_or(0, |e| e.sequence.saturating_sub(1));
        Watcher { log: self.clone(), next_after: last, rx: self.seq.subscribe(), done: false }
    }
}

/// Reads a log from a position on.
#[derive(Debug)]
pub struct Watcher {
    log: EventLog,
    next_after: u64,
    rx: watch::Receiver<u64>,
    done: bool,
}

impl Watcher {
    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            if let Some(ev) = self.log.since(self.next_after).into_iter().next() {
                self.next_after = ev.sequence;
                self.done = ev.phase.is_terminal();
                return Some(ev);
            }
            // The log sender lives inside `log`, so `changed` only fails if it was dropped.
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_latest_then_everything_then_end() {
        let log = EventLog::default();
        log.push(Event::new(Phase::Preparing, "a"));
        log.push(Event::new(Phase::Storage, "b"));
        let mut early = log.watch();
        let producer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    log.push(Event::new(Phase::Ram, format!("tick {i}")));
                    tokio::task::yield_now().await;
                }
                log.push(Event::new(Phase::Completed, "done"));
                log.push(Event::new(Phase::Ram, "after the end"));
            })
        };
        let mut seen = Vec::new();
        while let Some(e) = early.next().await {
            seen.push(e);
        }
        producer.await.expect("join");
        assert_eq!(seen[0].message, "b", "starts at the latest event");
        assert_eq!(seen.len(), 52, "nothing lost: b + 50 ticks + done");
        assert!(seen.windows(2).all(|w| w[1].sequence == w[0].sequence + 1), "in order");
        assert_eq!(seen.last().map(|e| e.phase), Some(Phase::Completed));
        assert_eq!(log.phase(), Phase::Completed, "nothing after the terminal event");
        let mut late = log.watch();
        assert_eq!(late.next().await.map(|e| e.message), Some("done".into()));
        assert_eq!(late.next().await, None);
    }
}
