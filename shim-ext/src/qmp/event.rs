//! QMP events as the client delivers them.

use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// An asynchronous QMP event, stamped with when we received it.
///
/// The receive time is taken when the read that carried the event returned, before parsing, so
/// `received_at - qemu_timestamp` is QEMU → socket → us, which is what the cutover's reaction
/// budget starts from (DESIGN.md decision 4).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, e.g. `STOP`, `RESUME`, `MIGRATION`.
    pub name: String,
    /// The event's `data` member, `Null` if it has none.
    pub data: Value,
    /// QEMU's timestamp (its realtime clock), if it sent a valid one.
    pub qemu_timestamp: Option<SystemTime>,
    /// Our wall-clock receive time, comparable with `qemu_timestamp`.
    pub received_at: SystemTime,
    /// Our monotonic receive time, for measuring our own reaction without clock steps.
    pub received_instant: Instant,
}

/// The events the engine acts on, typed; every other event (and any future one) is
/// [`EventKind::Other`], never an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The VM stopped.
    Stop,
    /// The VM resumed.
    Resume,
    /// A migration changed status (`MIGRATION`, `data.status`).
    Migration(super::MigrationStatus),
    /// Anything else, by name.
    Other(String),
}

impl QmpEvent {
    /// What the event is.
    pub fn kind(&self) -> EventKind {
        match self.name.as_str() {
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "MIGRATION" => match self.data_str("status") {
                Some(status) => EventKind::Migration(super::MigrationStatus::from(status)),
                None => EventKind::Other(self.name.clone()),
            },
            other => EventKind::Other(other.to_owned()),
        }
    }

    /// Our receive time minus QEMU's timestamp, or `None` without a timestamp or if the wall
    /// clock stepped backwards in between.
    pub fn delivery_latency(&self) -> Option<Duration> {
        self.received_at.duration_since(self.qemu_timestamp?).ok()
    }

    /// A string member of `data`, e.g. `status` of a `MIGRATION` event.
    pub fn data_str(&self, member: &str) -> Option<&str> {
        self.data.get(member).and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_are_typed_and_unknown_ones_kept() {
        let ev = |name: &str, data: Value| QmpEvent {
            name: name.into(),
            data,
            qemu_timestamp: None,
            received_at: SystemTime::now(),
            received_instant: Instant::now(),
        };
        assert_eq!(ev("STOP", Value::Null).kind(), EventKind::Stop);
        assert_eq!(ev("RESUME", Value::Null).kind(), EventKind::Resume);
        assert_eq!(
            ev("MIGRATION", json!({"status": "pre-switchover"})).kind(),
            EventKind::Migration(super::super::MigrationStatus::PreSwitchover)
        );
        assert!(matches!(
            ev("MIGRATION", json!({"status": "zz-new"})).kind(),
            EventKind::Migration(s) if s.as_str() == "zz-new"
        ));
        assert_eq!(ev("MIGRATION", Value::Null).kind(), EventKind::Other("MIGRATION".into()));
        assert_eq!(ev("BLOCK_JOB_READY", Value::Null).kind(), EventKind::Other("BLOCK_JOB_READY".into()));
    }

    #[test]
    fn latency_is_receive_minus_qemu_time() {
        let qemu = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut event = QmpEvent {
            name: "MIGRATION".into(),
            data: json!({"status": "completed"}),
            qemu_timestamp: Some(qemu),
            received_at: qemu + Duration::from_micros(60),
            received_instant: Instant::now(),
        };
        assert_eq!(event.delivery_latency(), Some(Duration::from_micros(60)));
        assert_eq!(event.data_str("status"), Some("completed"));
        event.received_at = qemu - Duration::from_micros(1);
        assert_eq!(event.delivery_latency(), None);
        event.qemu_timestamp = None;
        assert_eq!(event.delivery_latency(), None);
    }
}
