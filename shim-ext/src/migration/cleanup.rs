//! Structural cleanup: every resource a migration creates is registered when created and undone
//! in reverse order on failure or cancel.
//!
//! An undo step is an async closure with a name. The stack lives outside the task that runs the
//! migration (shared by `Arc`), so the supervisor can unwind it even after that task panicked.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

type UndoFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Undo = Box<dyn FnOnce() -> UndoFuture + Send>;

/// What one unwind did, step by step (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnwindReport {
    /// `(name, Ok | Err(message))` in the order they ran.
    pub steps: Vec<(String, Result<(), String>)>,
}

impl UnwindReport {
    /// Whether every step succeeded.
    pub fn is_clean(&self) -> bool {
        self.steps.iter().all(|(_, r)| r.is_ok())
    }
}

/// The undo stack of one migration.
#[derive(Clone, Default)]
pub struct Cleanup {
    steps: Arc<Mutex<Vec<(String, Undo)>>>,
}

impl std::fmt::Debug for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Cleanup {
    /// Registers how to undo something just created.
    pub fn push<F, Fut, E>(&self, name: impl Into<String>, undo: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let undo: Undo = Box::new(move || Box::pin(async move { undo().await.map_err(|e| e.to_string()) }));
        if let Ok(mut steps) = self.steps.lock() {
            steps.push((name.into(), undo));
        }
    }

    /// Names of the registered steps, oldest first.
    pub fn names(&self) -> Vec<String> {
        self.steps.lock().map(|s| s.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default()
    }

    /// Forgets every step: the resources now belong to the outcome (e.g. the migrated VM).
    pub fn disarm(&self) -> Vec<String> {
        self.steps.lock().map(|mut s| s.drain(..).map(|(n, _)| n).collect()).unwrap_or_default()
    }

    /// Forgets the named steps only.
    pub fn disarm_named(&self, name: &str) {
        if let Ok(mut s) = self.steps.lock() {
            s.retain(|(n, _)| n != name);
        }
    }

    /// Runs every step, newest first. A failing step is logged and the unwind goes on: a stuck
    /// route must not keep a QEMU alive.
    pub async fn unwind(&self) -> UnwindReport {
        let steps: Vec<(String, Undo)> =
            self.steps.lock().map(|mut s| s.drain(..).collect()).unwrap_or_default();
        let mut report = UnwindReport { steps: Vec::new() };
        for (name, undo) in steps.into_iter().rev() {
            let result = undo().await;
            match &result {
                Ok(()) => tracing::debug!(step = %name, "undone"),
                Err(e) => tracing::warn!(step = %name, error = %e, "undo failed"),
            }
            report.steps.push((name, result));
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unwinds_in_reverse_and_keeps_going_after_a_failure() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let c = Cleanup::default();
        for name in ["netns", "tap", "qemu"] {
            let log = log.clone();
            c.push(name, move || async move {
                log.lock().expect("lock").push(name);
                if name == "tap" {
                    Err("device busy")
                } else {
                    Ok(())
                }
            });
        }
        let report = c.unwind().await;
        assert_eq!(*log.lock().expect("lock"), ["qemu", "tap", "netns"]);
        assert!(!report.is_clean());
        assert_eq!(report.steps[1], ("tap".to_string(), Err("device busy".to_string())));
        assert!(c.unwind().await.steps.is_empty(), "a second unwind has nothing left");
    }

    #[tokio::test]
    async fn survives_a_panicking_owner_and_disarms() {
        let c = Cleanup::default();
        let done = Arc::new(Mutex::new(false));
        let task = {
            let c = c.clone();
            let done = done.clone();
            tokio::spawn(async move {
                c.push("route", move || async move {
                    *done.lock().expect("lock") = true;
                    Ok::<(), String>(())
                });
                panic!("migration task panicked");
            })
        };
        assert!(task.await.is_err());
        assert!(c.unwind().await.is_clean());
        assert!(*done.lock().expect("lock"), "undo ran after the panic");
        c.push("kept", || async { Ok::<(), String>(()) });
        assert_eq!(c.disarm(), ["kept"]);
        assert!(c.unwind().await.steps.is_empty());
    }
}
