//! Named moments of a migration where a test injects a fault: the `fail` crate's fail points,
//! compiled in only with the test-only `failpoints` feature (a no-op otherwise).
//!
//! An agent built with the feature reads `KATAMARAN_FAILPOINTS` at start:
//! `name=action;name=action`, where an action is one of the `fail` crate's (`panic`,
//! `return`, `sleep(ms)`, `off`, …) or `hold`: the migration stops at that point, creates
//! `$KATAMARAN_FAILPOINT_DIR/<name>.held`, and goes on once `<name>.go` exists there. A test
//! waits for the first file, acts at that exact moment (a cancel, a kill, a cut link), then
//! writes the second. The release removes both: every migration through the point is held.

use super::error::EngineError;

/// Every fail point, in migration order.
pub const POINTS: &[&str] = &[
    "source-preparing",
    "source-storage",
    "source-ram",
    "source-pre-switchover",
    "source-after-stop",
    "source-before-commit",
    "source-voted",
    "source-after-commit",
    "dest-preparing",
    "dest-receiving",
    "dest-before-vote",
    "dest-after-vote",
    "dest-before-resume",
];

/// Reaches the fail point `name`: returns `Err` for an injected error, panics for an
/// injected panic, waits while held.
///
/// # Errors
/// [`EngineError::Injected`] when the point is configured to `return`.
pub async fn point(name: &'static str) -> Result<(), EngineError> {
    imp::point(name).await
}

/// Configures the fail points from `KATAMARAN_FAILPOINTS` (an agent calls this once at start).
/// Returns the names configured.
///
/// # Errors
/// A message naming the entry that does not parse or names no known point.
pub fn setup_from_env() -> Result<Vec<String>, String> {
    match std::env::var("KATAMARAN_FAILPOINTS") {
        Ok(spec) if !spec.trim().is_empty() => imp::setup(&spec),
        _ => Ok(Vec::new()),
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    use super::EngineError;

    #[inline(always)]
    pub(super) async fn point(_name: &'static str) -> Result<(), EngineError> {
        Ok(())
    }

    pub(super) fn setup(_spec: &str) -> Result<Vec<String>, String> {
        Err("KATAMARAN_FAILPOINTS is set but this build has no fail points (feature `failpoints`)".into())
    }
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::{EngineError, POINTS};

    static HOLDS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

    fn held_dir() -> PathBuf {
        std::env::var_os("KATAMARAN_FAILPOINT_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
    }

    pub(super) fn setup(spec: &str) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, action) = entry
                .split_once('=')
                .ok_or_else(|| format!("fail point entry {entry:?} is not name=action"))?;
            if !POINTS.contains(&name) {
                return Err(format!("unknown fail point {name:?}; known: {}", POINTS.join(", ")));
            }
            if action == "hold" {
                HOLDS.lock().map_err(|_| "fail point table poisoned".to_owned())?.insert(name.to_owned());
            } else {
                fail::cfg(name, action).map_err(|e| format!("fail point {name}: {e}"))?;
            }
            names.push(name.to_owned());
        }
        Ok(names)
    }

    pub(super) async fn point(name: &'static str) -> Result<(), EngineError> {
        let held = HOLDS.lock().map(|h| h.contains(name)).unwrap_or(false);
        if held {
            let dir = held_dir();
            let (marker, go) = (dir.join(format!("{name}.held")), dir.join(format!("{name}.go")));
            // A release left from an earlier migration must not let this one through.
            let _ = std::fs::remove_file(&go);
            tracing::warn!(point = name, marker = %marker.display(), "fail point: holding");
            let _ = std::fs::write(&marker, b"");
            // Test-only: a file is the one signal a test in another process can give.
            while !go.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Consumed: the next migration through this point is held again.
            let _ = std::fs::remove_file(&marker);
            let _ = std::fs::remove_file(&go);
            tracing::warn!(point = name, "fail point: released");
            return Ok(());
        }
        if !fail::list().iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        tracing::warn!(point = name, "fail point: triggered");
        // `fail::eval` may sleep or pause the thread: keep the runtime's other tasks going.
        let injected = tokio::task::block_in_place(|| fail::eval(name, |arg| arg.unwrap_or_default()));
        match injected {
            Some(arg) => Err(EngineError::Injected { point: name, detail: arg }),
            None => Ok(()),
        }
    }
}
