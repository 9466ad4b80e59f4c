//! Fan-out of one QMP event stream to any number of waiters.
//!
//! [`QmpClient::connect`](crate::qmp::QmpClient::connect) hands out a single receiver, but a
//! migration has several waiters at once: the cutover (`STOP`/`RESUME`), the storage phase
//! (`BLOCK_JOB_*`, `BLOCK_EXPORT_DELETED`) and the state machine (`MIGRATION`). One pump task
//! takes every event off the receiver and sends it to each live subscription.
//!
//! Guarantees: every subscription sees, in wire order, every event the pump takes off the
//! receiver after the subscription was registered; nothing is dropped (the queues are unbounded
//! for the same reason the client's is: a lost `STOP` stalls a cutover, and QEMU's event rate is
//! bounded). A subscription created before a command is issued therefore sees every event that
//! command causes. When the QMP connection ends, every subscription ends after its queued
//! events.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::qmp::{EventReceiver, QmpEvent};

/// Why [`Subscription::wait_for`] returned without an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// No matching event within the deadline.
    #[error("no matching QMP event within {0:?}")]
    Timeout(Duration),
    /// The QMP connection ended.
    #[error("the QMP event stream ended")]
    Ended,
}

/// The fan-out of one QMP connection's events. Cheap to clone; clones share the pump.
#[derive(Clone)]
pub struct EventBus {
    shared: Arc<Shared>,
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("EventBus")
            .field("subscribers", &state.subscribers.len())
            .field("ended", &state.ended)
            .finish()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    subscribers: Vec<mpsc::UnboundedSender<Arc<QmpEvent>>>,
    ended: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Only plain vector updates happen under the lock; a panic cannot leave it half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl EventBus {
    /// Starts the pump on the current tokio runtime. It runs until the QMP connection ends
    /// (the receiver yields `None`); dropping the bus does not stop it, so subscriptions keep
    /// working after the bus itself is gone.
    pub fn spawn(events: EventReceiver) -> Self {
        let shared = Arc::new(Shared::default());
        tokio::spawn(pump(events, Arc::clone(&shared)));
        Self { shared }
    }

    /// A new subscription that receives every event from now on. After the connection ended
    /// it is already at its end.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.shared.lock();
        if !state.ended {
            state.subscribers.push(tx);
        }
        Subscription { rx }
    }
}

async fn pump(mut events: EventReceiver, shared: Arc<Shared>) {
    while let Some(event) = events.recv().await {
        let event = Arc::new(event);
        // Sending on an unbounded channel never blocks, so holding the lock here is short; a
        // failed send means the subscription was dropped and is forgotten.
        shared.lock().subscribers.retain(|subscriber| subscriber.send(Arc::clone(&event)).is_ok());
    }
    let mut state = shared.lock();
    state.ended = true;
    // Dropping the senders ends every subscription once its queue is drained.
    state.subscribers.clear();
}

/// One waiter's view of the events.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Arc<QmpEvent>>,
}

impl Subscription {
    /// The next event, or `None` once the connection ended and the queue is drained.
    pub async fn next(&mut self) -> Option<Arc<QmpEvent>> {
        self.rx.recv().await
    }

    /// The next event if one is queued, without waiting.
    pub fn try_next(&mut self) -> Option<Arc<QmpEvent>> {
        self.rx.try_recv().ok()
    }

    /// The next event, waiting until `until` at the latest.
    ///
    /// # Errors
    ///
    /// [`WaitError::Timeout`] (carrying `allowed` for the message) or [`WaitError::Ended`].
    pub async fn next_until(
        &mut self,
        until: Instant,
        allowed: Duration,
    ) -> Result<Arc<QmpEvent>, WaitError> {
        match tokio::time::timeout_at(until, self.rx.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(WaitError::Ended),
            Err(_) => Err(WaitError::Timeout(allowed)),
        }
    }

    /// The first event for which `matches` is true, within `deadline`. Events before it are
    /// consumed: one waiter that needs several kinds of events should use one subscription per
    /// concern, or a single loop over [`Subscription::next`].
    ///
    /// # Errors
    ///
    /// [`WaitError::Timeout`] or [`WaitError::Ended`].
    pub async fn wait_for(
        &mut self,
        mut matches: impl FnMut(&QmpEvent) -> bool,
        deadline: Duration,
    ) -> Result<Arc<QmpEvent>, WaitError> {
        let until = Instant::now() + deadline;
        loop {
            let event = self.next_until(until, deadline).await?;
            if matches(&event) {
                return Ok(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::{Instant as StdInstant, SystemTime};

    fn event(name: &str, n: u64) -> QmpEvent {
        QmpEvent {
            name: name.to_owned(),
            data: json!({ "n": n }),
            qemu_timestamp: None,
            received_at: SystemTime::now(),
            received_instant: StdInstant::now(),
        }
    }

    fn n(event: &QmpEvent) -> u64 {
        event.data["n"].as_u64().unwrap_or(u64::MAX)
    }

    #[tokio::test]
    async fn every_subscriber_gets_every_later_event_in_order() {
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = EventBus::spawn(rx);
        let mut early = bus.subscribe();
        tx.send(event("A", 0)).expect("send");
        // Wait until the pump delivered event 0 before the late subscription exists.
        assert_eq!(early.next().await.map(|e| n(&e)), Some(0));
        let mut late = bus.subscribe();
        for i in 1..=1000 {
            tx.send(event("A", i)).expect("send");
        }
        drop(tx);
        let mut seen_early = Vec::new();
        while let Some(e) = early.next().await {
            seen_early.push(n(&e));
        }
        let mut seen_late = Vec::new();
        while let Some(e) = late.next().await {
            seen_late.push(n(&e));
        }
        let expected: Vec<u64> = (1..=1000).collect();
        assert_eq!(seen_early, expected, "lossless and in wire order");
        assert_eq!(seen_late, expected, "a late subscriber starts at its subscription");
        assert!(bus.subscribe().next().await.is_none(), "subscribing after the end yields nothing");
    }

    #[tokio::test]
    async fn wait_for_skips_others_and_times_out() {
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = EventBus::spawn(rx);
        let mut sub = bus.subscribe();
        for (name, i) in [("STOP", 1), ("MIGRATION", 2), ("RESUME", 3)] {
            tx.send(event(name, i)).expect("send");
        }
        let found = sub.wait_for(|e| e.name == "MIGRATION", Duration::from_secs(5)).await.expect("found");
        assert_eq!(n(&found), 2);
        assert_eq!(sub.try_next().map(|e| n(&e)), Some(3), "later events stay queued");
        let started = StdInstant::now();
        let missing = sub.wait_for(|e| e.name == "SHUTDOWN", Duration::from_millis(50)).await;
        assert_eq!(missing.err(), Some(WaitError::Timeout(Duration::from_millis(50))));
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(tx);
        let ended = sub.wait_for(|_| true, Duration::from_secs(5)).await;
        assert_eq!(ended.err(), Some(WaitError::Ended));
    }

    fn median_p99(samples: &mut [Duration]) -> (Duration, Duration) {
        samples.sort();
        (samples[samples.len() / 2], samples[samples.len() * 99 / 100])
    }

    const SAMPLES: u64 = 2000;

    /// Sends `SAMPLES` events from another task, each after the previous one was consumed, the
    /// way the QMP reader task hands events over.
    fn producer(tx: mpsc::UnboundedSender<QmpEvent>) -> mpsc::UnboundedSender<()> {
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            for i in 0..SAMPLES {
                if tx.send(event("STOP", i)).is_err() || ack_rx.recv().await.is_none() {
                    return;
                }
            }
        });
        ack_tx
    }

    /// Push → subscriber receive, compared with a consumer reading the client's channel
    /// directly, on the multi-thread runtime the engine uses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fan_out_adds_negligible_latency() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ack = producer(tx);
        let mut direct = Vec::new();
        for _ in 0..SAMPLES {
            let e = rx.recv().await.expect("event");
            direct.push(e.received_instant.elapsed());
            ack.send(()).expect("ack");
        }

        let (tx, rx) = mpsc::unbounded_channel();
        let bus = EventBus::spawn(rx);
        let mut subs = [bus.subscribe(), bus.subscribe(), bus.subscribe()];
        let ack = producer(tx);
        let mut via_bus = Vec::new();
        for _ in 0..SAMPLES {
            for (k, sub) in subs.iter_mut().enumerate() {
                let e = sub.next().await.expect("event");
                if k == 0 {
                    via_bus.push(e.received_instant.elapsed());
                }
            }
            ack.send(()).expect("ack");
        }
        let (median, p99) = median_p99(&mut via_bus);
        let (direct_median, direct_p99) = median_p99(&mut direct);
        eprintln!(
            "event push -> receive: through the bus (3 subscribers) median {median:?} p99 {p99:?}; \
             reading the client's channel directly median {direct_median:?} p99 {direct_p99:?}"
        );
        assert!(median < Duration::from_millis(1), "median {median:?}");
    }

    #[tokio::test]
    async fn dropped_subscriptions_are_forgotten() {
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = EventBus::spawn(rx);
        let gone = bus.subscribe();
        let mut kept = bus.subscribe();
        drop(gone);
        tx.send(event("A", 1)).expect("send");
        assert_eq!(kept.next().await.map(|e| n(&e)), Some(1));
        assert_eq!(bus.shared.lock().subscribers.len(), 1);
    }
}
