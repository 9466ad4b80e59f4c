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

impl QmpEvent {
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
