//! Whether a VM this node handed over still runs on the destination: the question behind a
//! forward's end "when the VM stops on the destination".
//!
//! The source asks the destination's data listener on stream [`STREAM`] of the migration,
//! authenticated with the migration's secret like every data stream (both sides keep it in their
//! journals, so the question survives restarts on either side). The destination answers one
//! line from its journal and `/proc`, and closes:
//!
//! - `running`: the incoming VM runs here, or it moved on and nothing said it stopped further
//!   down (that node's forward then carries its traffic and this one's path is still needed);
//! - `stopped`: its sandbox was removed here, its QEMU is gone, or a later move said it stopped
//!   on the node it moved to ([`mark_stopped_upstream`] carries that back along the chain).
//!
//! Anything else (the destination unreachable, the migration unknown there, a garbled answer) is
//! "cannot tell", and the forward stays: ending it wrongly cuts a running VM off.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::journal::{Journal, Record, Standing};
use super::protocol::DestState;
use crate::dataplane::{Secret, StreamKey};
use crate::net::NetnsHandle;

/// The stream name of the question.
pub const STREAM: &str = "vm";

/// How long one question may take, connection and answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The destination's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStatus {
    /// The VM runs there or further down a chain of moves.
    Running,
    /// The VM stopped for good.
    Stopped,
}

impl VmStatus {
    /// The answer on the wire.
    pub fn as_line(self) -> &'static [u8] {
        match self {
            Self::Running => b"running\n",
            Self::Stopped => b"stopped\n",
        }
    }

    /// Reads an answer; `None` for anything else.
    pub fn parse(line: &[u8]) -> Option<Self> {
        match line {
            b"running\n" => Some(Self::Running),
            b"stopped\n" => Some(Self::Stopped),
            _ => None,
        }
    }
}

/// The answer a destination gives from its record of the migration; `None` when the record is
/// not a destination's that took the VM (nothing to say: the question is refused).
/// `qemu_runs(pid, dir)` says whether `pid` is the QEMU of the sandbox directory `dir`.
pub fn status_of(record: &Record, qemu_runs: impl Fn(u32, &Path) -> bool) -> Option<VmStatus> {
    let Standing::Destination(state) = record.standing else { return None };
    if !matches!(state, DestState::Committed | DestState::Running | DestState::Voted) {
        return None;
    }
    if record.vm_stopped_unix_nanos.is_some() {
        return Some(VmStatus::Stopped);
    }
    Some(match &record.destination {
        // Voted (in doubt) keeps a paused copy that may still be resumed: running, as far as the
        // forward is concerned.
        Some(d) if d.qemu_pid > 0 && !qemu_runs(d.qemu_pid, &d.state_dir) && state != DestState::Voted => {
            VmStatus::Stopped
        }
        Some(_) => VmStatus::Running,
        // Moved on from here and not reported stopped further down.
        None => VmStatus::Running,
    })
}

/// The destination's side: the resolver a data listener consults for [`STREAM`] of a migration
/// no longer registered. It authenticates the question with the migration's recorded secret and
/// answers it from the record read again after the proof.
pub fn resolver(journal: Arc<Journal>) -> crate::dataplane::listener::Resolver {
    Arc::new(move |key: &StreamKey| {
        if key.stream != STREAM {
            return None;
        }
        let record = journal.load(&key.migration_id).ok().flatten()?;
        status_of(&record, |_, _| true)?;
        let secret = super::journal::from_hex(&record.secret_hex).and_then(|b| Secret::new(b).ok())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::net::TcpStream>();
        let (journal, id) = (journal.clone(), key.migration_id.clone());
        tokio::spawn(async move {
            // Nothing arrives when the peer's proof failed: the sender is dropped.
            let Some(mut conn) = rx.recv().await else { return };
            let status = journal
                .load(&id)
                .ok()
                .flatten()
                .and_then(|r| status_of(&r, crate::recovery::process_runs_in));
            let Some(status) = status else { return };
            tracing::debug!(id = %id, ?status, "asked whether the VM still runs here");
            let _ = tokio::time::timeout(ASK_TIMEOUT, conn.write_all(status.as_line())).await;
            let _ = conn.shutdown().await;
        });
        Some((secret, tx))
    })
}

/// The source's side: asks the destination at `endpoint` (its data listener) whether the VM of
/// `migration_id` still runs. `None` when it cannot tell.
pub async fn ask(
    node: Arc<NetnsHandle>,
    endpoint: SocketAddr,
    secret: &Secret,
    migration_id: &str,
) -> Option<VmStatus> {
    let key = StreamKey::new(migration_id, STREAM).ok()?;
    let answer = async {
        let mut conn = super::source::dial(node, endpoint, secret, &key, ASK_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let mut line = Vec::with_capacity(8);
        (&mut conn).take(16).read_to_end(&mut line).await.map_err(|e| e.to_string())?;
        VmStatus::parse(&line)
            .ok_or_else(|| format!("unexpected answer {:?}", String::from_utf8_lossy(&line)))
    };
    match tokio::time::timeout(ASK_TIMEOUT * 2, answer).await {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => {
            tracing::debug!(%endpoint, error = %e, "cannot tell whether the VM still runs on the destination");
            None
        }
        Err(_) => {
            tracing::debug!(%endpoint, "no answer on whether the VM still runs on the destination");
            None
        }
    }
}

/// How often a forward asks.
pub const ASK_EVERY: Duration = Duration::from_secs(3);

/// Resolves once the destination says the VM stopped; asks every [`ASK_EVERY`] and never
/// resolves on "cannot tell".
pub async fn until_stopped(
    node: Arc<NetnsHandle>,
    endpoint: SocketAddr,
    secret: Secret,
    migration_id: String,
) {
    loop {
        tokio::time::sleep(ASK_EVERY).await;
        if ask(node.clone(), endpoint, &secret, &migration_id).await == Some(VmStatus::Stopped) {
            tracing::info!(%endpoint, "the destination says the VM stopped there");
            return;
        }
    }
}

/// After this node's forward of `sandbox_id` ended because the VM stopped further down, says so
/// in the record of the move that brought the VM here (the newest destination record of that
/// sandbox older than `moved_away_at`), so the node before this one learns it in turn.
pub fn mark_stopped_upstream(journal: &Journal, sandbox_id: &str, moved_away_at: u64, now: u64) {
    let Ok(all) = journal.load_all() else { return };
    let upstream = all.into_iter().rev().find(|r| {
        r.sandbox_id == sandbox_id
            && r.started_unix_nanos < moved_away_at
            && matches!(r.standing, Standing::Destination(DestState::Running | DestState::Committed))
    });
    if let Some(mut r) = upstream.filter(|r| r.vm_stopped_unix_nanos.is_none()) {
        r.vm_stopped_unix_nanos = Some(now);
        if let Err(e) = journal.write(&r) {
            tracing::warn!(id = %r.migration_id, error = %e, "cannot record that the VM stopped down the chain");
        } else {
            tracing::info!(id = %r.migration_id, "the VM that moved on from here stopped: recorded for the node before");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::journal::{DestRecord, FORMAT};
    use crate::migration::protocol::SourceState;

    fn record(id: &str, standing: Standing, started: u64, destination: Option<DestRecord>) -> Record {
        Record {
            format: FORMAT,
            migration_id: id.into(),
            sandbox_id: "sb".into(),
            standing,
            peer: "10.0.0.1".parse().expect("ip"),
            secret_hex: super::super::journal::to_hex(&[7; 32]),
            started_unix_nanos: started,
            // Written now: old ended records that hold nothing are pruned on load.
            updated_unix_nanos: crate::convert::unix_nanos(std::time::SystemTime::now()),
            message: String::new(),
            history: Vec::new(),
            source: None,
            destination,
            vm_stopped_unix_nanos: None,
        }
    }

    fn here(pid: u32) -> Option<DestRecord> {
        Some(DestRecord { qemu_pid: pid, state_dir: "/run/vc/vm/sb".into(), ..DestRecord::default() })
    }

    #[test]
    fn the_answer_follows_the_record_and_the_process() {
        let running = Standing::Destination(DestState::Running);
        let alive = |_: u32, _: &Path| true;
        let dead = |_: u32, _: &Path| false;
        assert_eq!(status_of(&record("m", running, 1, here(42)), alive), Some(VmStatus::Running));
        assert_eq!(status_of(&record("m", running, 1, here(42)), dead), Some(VmStatus::Stopped), "QEMU gone");
        assert_eq!(
            status_of(&record("m", Standing::Destination(DestState::Committed), 1, here(42)), dead),
            Some(VmStatus::Stopped)
        );
        assert_eq!(
            status_of(&record("m", Standing::Destination(DestState::Voted), 1, here(42)), dead),
            Some(VmStatus::Running),
            "in doubt: a paused copy that may still resume is not called stopped"
        );
        assert_eq!(status_of(&record("m", running, 1, None), dead), Some(VmStatus::Running), "moved on");
        let mut removed = record("m", running, 1, None);
        removed.vm_stopped_unix_nanos = Some(5);
        assert_eq!(status_of(&removed, alive), Some(VmStatus::Stopped), "removed, or stopped down the chain");
        for refused in [
            Standing::Destination(DestState::RolledBack),
            Standing::Destination(DestState::Receiving),
            Standing::Source(SourceState::HandedOver),
        ] {
            assert_eq!(status_of(&record("m", refused, 1, here(42)), alive), None, "{refused:?}");
        }
    }

    #[test]
    fn wire_answers_round_trip_and_nothing_else_parses() {
        for s in [VmStatus::Running, VmStatus::Stopped] {
            assert_eq!(VmStatus::parse(s.as_line()), Some(s));
        }
        for junk in [&b""[..], b"running", b"stopped\nx", b"RUNNING\n", b"gone\n"] {
            assert_eq!(VmStatus::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_stop_down_the_chain_is_recorded_on_the_move_that_brought_the_vm_here() {
        let tmp = tempfile::tempdir().expect("tmp");
        let j = Journal::open(tmp.path()).expect("open");
        let running = Standing::Destination(DestState::Running);
        j.write(&record("mig-first", running, 10, None)).expect("write");
        j.write(&record("mig-second", running, 20, None)).expect("write");
        j.write(&record("mig-later", running, 40, here(9))).expect("write");
        j.write(&record("mig-away", Standing::Source(SourceState::Finished), 30, None)).expect("write");
        // The move away started at 30: the VM had come here with mig-second.
        mark_stopped_upstream(&j, "sb", 30, 99);
        let stopped = |id: &str| j.load(id).expect("load").and_then(|r| r.vm_stopped_unix_nanos);
        assert_eq!(stopped("mig-second"), Some(99));
        assert_eq!(stopped("mig-first"), None, "an older arrival is not the one that moved on");
        assert_eq!(stopped("mig-later"), None, "a later arrival runs");
        mark_stopped_upstream(&j, "sb", 30, 120);
        assert_eq!(stopped("mig-second"), Some(99), "recorded once");
        mark_stopped_upstream(&j, "other", 30, 120);
        assert_eq!(stopped("mig-first"), None);
    }
}
