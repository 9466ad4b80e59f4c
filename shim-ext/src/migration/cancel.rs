//! A cancellation signal carrying its reason.

use tokio::sync::watch;

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
