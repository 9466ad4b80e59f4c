//! A cancellation signal carrying its reason, and the gate that orders a cancel against the
//! commit point: whichever takes the gate first wins, so an accepted cancel always ends in a
//! rollback and a refused one always in a completed migration.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::protocol::{Owner, ProtocolError};

/// Orders cancels against the commit. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct CommitGate {
    committed: Arc<Mutex<bool>>,
    cancel: CancelToken,
}

impl CommitGate {
    /// The cancel signal the migration watches.
    pub fn token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Whether the commit happened.
    pub fn is_committed(&self) -> bool {
        self.committed.lock().map(|c| *c).unwrap_or(true)
    }

    /// Cancels unless the commit happened first. Returns whether this call fired the signal.
    ///
    /// # Errors
    /// [`ProtocolError::PastCommit`] once committed.
    pub fn cancel(&self, reason: impl Into<String>) -> Result<bool, ProtocolError> {
        let committed = self.committed.lock().map_err(|_| ProtocolError::Ended("poisoned"))?;
        if *committed {
            return Err(ProtocolError::PastCommit { owner: Owner::Destination });
        }
        Ok(self.cancel.cancel(reason))
    }

    /// Commits with `record` (the durable write) unless a cancel came first: `Ok(Some(_))`
    /// when committed, `Ok(None)` when the cancel won (nothing was recorded).
    ///
    /// # Errors
    /// `record`'s error; then nothing is committed.
    pub fn commit<T, E>(&self, record: impl FnOnce() -> Result<T, E>) -> Result<Option<T>, E> {
        let Ok(mut committed) = self.committed.lock() else { return Ok(None) };
        if *committed {
            return Ok(None);
        }
        if self.cancel.reason().is_some() {
            return Ok(None);
        }
        let out = record()?;
        *committed = true;
        Ok(Some(out))
    }
}

/// Cancels a migration; clones share the signal.
#[derive(Debug, Clone)]
pub struct CancelToken {
    tx: watch::Sender<Option<String>>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self { tx: watch::channel(None).0 }
    }
}

impl CancelToken {
    /// Fires the signal; the first reason wins. Returns whether this call fired it.
    pub fn cancel(&self, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        self.tx.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(reason);
                true
            } else {
                false
            }
        })
    }

    /// The reason, once cancelled.
    pub fn reason(&self) -> Option<String> {
        self.tx.borrow().clone()
    }

    /// Resolves with the reason when cancelled.
    pub async fn cancelled(&self) -> String {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`; this cannot end while we hold it.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_orders_cancel_and_commit() {
        let g = CommitGate::default();
        assert_eq!(g.cancel("user"), Ok(true));
        assert_eq!(g.commit(|| Ok::<_, ()>(1)), Ok(None), "a cancel first: no commit");
        let g = CommitGate::default();
        assert_eq!(g.commit(|| Err::<(), _>("disk full")), Err("disk full"));
        assert!(!g.is_committed(), "a failed record commits nothing");
        assert_eq!(g.commit(|| Ok::<_, ()>(2)), Ok(Some(2)));
        assert!(g.is_committed());
        assert!(matches!(g.cancel("late"), Err(ProtocolError::PastCommit { owner: Owner::Destination })));
        assert_eq!(g.token().reason(), None, "a refused cancel fires nothing");
    }

    #[tokio::test]
    async fn first_reason_wins_and_wakes_waiters() {
        let t = CancelToken::default();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.cancelled().await })
        };
        assert!(t.cancel("user"));
        assert!(!t.cancel("again"));
        assert_eq!(waiter.await.expect("join"), "user");
        assert_eq!(t.cancelled().await, "user", "already cancelled resolves at once");
    }
}
