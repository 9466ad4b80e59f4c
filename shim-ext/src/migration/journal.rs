//! The durable record of one migration on one node: its protocol state and what a restarted
//! agent needs to finish or undo its side (the VM routes it replaced, the incoming sandbox it
//! built, the secret to reach the peer again).
//!
//! One JSON file per migration under `<state>/migrations/` (0700 directory, 0600 files). A
//! write goes to a temporary file, is fsync'd, renamed over the record and the directory is
//! fsync'd: a crash leaves either the old or the new record, never a torn one. The commit point
//! of [`super::protocol`] is a write of this journal.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::protocol::{DestState, Owner, SourceState};
use crate::convert::unix_nanos;
use crate::net::{IpPrefix, LinkId, RouteSpec};

/// The record format; a record of another version is reported, not guessed at.
pub const FORMAT: u32 = 1;

/// How long records of ended migrations are kept (ListMigrations shows them after a restart).
pub const KEEP_ENDED: Duration = Duration::from_secs(24 * 3600);

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The directory cannot be created or read.
    #[error("journal directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A record cannot be written durably.
    #[error("cannot record migration {id} durably at {path}")]
    Write {
        /// Migration id.
        id: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A record cannot be encoded.
    #[error("cannot encode the record of migration {id}")]
    Encode {
        /// Migration id.
        id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Where one side stands, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", content = "state", rename_all = "kebab-case")]
pub enum Standing {
    /// This node is the source.
    Source(SourceState),
    /// This node is the destination.
    Destination(DestState),
}

impl Standing {
    /// Who owns the VM.
    pub fn owner(self) -> Owner {
        match self {
            Standing::Source(s) => s.owner(),
            Standing::Destination(d) => d.owner(),
        }
    }

    /// Whether the migration ended on this node.
    pub fn is_terminal(self) -> bool {
        match self {
            Standing::Source(s) => s.is_terminal(),
            Standing::Destination(d) => d.is_terminal(),
        }
    }

    /// Name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Source(s) => s.as_str(),
            Standing::Destination(d) => d.as_str(),
        }
    }
}

/// A host route as recorded (enough to put it back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// The VM address (a /32 or /128).
    pub dest: IpAddr,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output interface index in the node's namespace.
    pub oif: u32,
    /// `onlink`.
    pub onlink: bool,
    /// The route's protocol (`RTPROT_*`), restored as it was.
    #[serde(default)]
    pub protocol: Option<u8>,
}

impl RouteRecord {
    /// The record of `route` (a host route).
    pub fn of(route: &RouteSpec) -> Self {
        Self {
            dest: route.dest.addr(),
            gateway: route.gateway,
            oif: route.dev.index,
            onlink: route.onlink,
            protocol: route.protocol,
        }
    }

    /// The route it records, ready to be put back.
    pub fn to_spec(&self) -> RouteSpec {
        RouteSpec {
            dest: IpPrefix::host(self.dest),
            gateway: self.gateway,
            dev: LinkId { index: self.oif, name: format!("if{}", self.oif) },
            onlink: self.onlink,
            protocol: self.protocol,
        }
    }
}

/// What the source built and replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The sandbox's QMP socket.
    pub qmp_socket: PathBuf,
    /// The source QEMU's pid.
    pub qemu_pid: u32,
    /// The VM routes as they were (restored on rollback).
    pub original_routes: Vec<RouteRecord>,
    /// The forward's tunnel `(index, name)`, removed on rollback.
    pub tunnel: Option<(u32, String)>,
    /// The forward's routes (the VM's addresses into the tunnel or via the destination): a
    /// restarted agent watches them again after the commit.
    #[serde(default)]
    pub forward_routes: Vec<RouteRecord>,
    /// The forward's idle timeout in ms (0: none).
    #[serde(default)]
    pub forward_idle_ms: u64,
    /// The destination's control endpoint (decisions are re-delivered there).
    pub ctl_endpoint: Option<SocketAddr>,
    /// The migration's sockets.
    pub state_dir: PathBuf,
}

/// What the destination built.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestRecord {
    /// The incoming sandbox's directory.
    pub state_dir: PathBuf,
    /// Its network namespace file.
    pub netns: PathBuf,
    /// The incoming QEMU's pid (0 before it is spawned).
    pub qemu_pid: u32,
    /// The decapsulating tunnel's name, if any.
    pub decap_tunnel: Option<String>,
    /// The node-side veth's name.
    pub host_veth: String,
    /// The tap inside the sandbox.
    pub tap: String,
    /// Whether a plug holds the tap.
    pub plugged: bool,
    /// The VM's addresses (routes and neighbours on the node).
    pub vm_addrs: Vec<IpAddr>,
    /// The node's routes to those addresses that the incoming sandbox's routes replaced (a
    /// forward left by an earlier move away from this node): put back on rollback.
    #[serde(default)]
    pub replaced_routes: Vec<RouteRecord>,
    /// The directory of the incoming local disks (under the agent's state directory), removed
    /// with the sandbox; empty with shared storage.
    #[serde(default)]
    pub disks_dir: PathBuf,
}

/// One migration's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// [`FORMAT`].
    pub format: u32,
    /// Migration id.
    pub migration_id: String,
    /// Sandbox id.
    pub sandbox_id: String,
    /// The protocol state.
    pub standing: Standing,
    /// The peer node's address.
    pub peer: IpAddr,
    /// The per-migration secret, hex (root-only file): a restarted agent re-authenticates the
    /// control stream with it.
    pub secret_hex: String,
    /// When the migration started (unix nanos).
    pub started_unix_nanos: u64,
    /// Last write (unix nanos).
    pub updated_unix_nanos: u64,
    /// The outcome's message once ended.
    #[serde(default)]
    pub message: String,
    /// Every state it passed, with the time it was recorded.
    #[serde(default)]
    pub history: Vec<(String, u64)>,
    /// Source details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRecord>,
    /// Destination details (`None` once the incoming sandbox is gone: removed, or the VM moved
    /// on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestRecord>,
    /// When the VM this destination received stopped for good (unix nanos): its sandbox was
    /// removed here, or it stopped further down a chain of moves. The source's forward ends
    /// when it learns this (see [`crate::migration::vm_status`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_stopped_unix_nanos: Option<u64>,
}

impl Record {
    /// Whether the record still describes something on this node: an incoming sandbox, or a
    /// migration that has not ended. Only records that describe nothing are pruned.
    pub fn holds_something(&self) -> bool {
        !self.standing.is_terminal() || self.destination.is_some()
    }
}

/// The journal directory of one node.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating, 0700) the directory.
    ///
    /// # Errors
    /// [`JournalError::Dir`].
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let fail = |source| JournalError::Dir { path: dir.to_owned(), source };
        let existed = dir.is_dir();
        std::fs::create_dir_all(dir).map_err(fail)?;
        if !existed {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        }
        Ok(Self { dir: dir.to_owned() })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `record` durably: temporary file, fsync, rename, fsync of the directory. Returns
    /// how long that took.
    ///
    /// # Errors
    /// [`JournalError::Write`] or [`JournalError::Encode`]; the previous record is intact.
    pub fn write(&self, record: &Record) -> Result<Duration, JournalError> {
        let started = Instant::now();
        let id = &record.migration_id;
        let path = self.path(id);
        let fail = |source| JournalError::Write { id: id.clone(), path: path.clone(), source };
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|source| JournalError::Encode { id: id.clone(), source })?;
        let tmp = self.dir.join(format!(".{id}.json.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(fail)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(fail)?;
        Ok(started.elapsed())
    }

    /// Every readable record, oldest first. Unreadable files are logged and skipped (they are
    /// left in place for an operator); records of ended migrations that hold nothing (see
    /// [`Record::holds_something`]) and were last written more than [`KEEP_ENDED`] ago are
    /// removed.
    ///
    /// # Errors
    /// [`JournalError::Dir`] when the directory cannot be read.
    pub fn load_all(&self) -> Result<Vec<Record>, JournalError> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|source| JournalError::Dir { path: self.dir.clone(), source })?;
        let now = unix_nanos(SystemTime::now());
        let mut out = Vec::new();
        for entry in rd.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(r) if r.format != FORMAT => {
                    tracing::warn!(path = %path.display(), format = r.format, "journal record of another format; left alone")
                }
                Ok(r) => {
                    let age = Duration::from_nanos(now.saturating_sub(r.updated_unix_nanos));
                    if !r.holds_something() && age > KEEP_ENDED {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    out.push(r);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable journal record; left alone")
                }
            }
        }
        out.sort_by_key(|r| r.started_unix_nanos);
        Ok(out)
    }

    /// One migration's record, `None` when there is none (or it is unreadable or of another
    /// format: logged).
    ///
    /// # Errors
    /// [`JournalError::Dir`] when the id cannot name a record file.
    pub fn load(&self, id: &str) -> Result<Option<Record>, JournalError> {
        crate::dataplane::handshake::validate_migration_id(id).map_err(|e| JournalError::Dir {
            path: self.dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
        })?;
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable journal record");
                return Ok(None);
            }
        };
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) if r.format == FORMAT => Ok(Some(r)),
            Ok(r) => {
                tracing::warn!(path = %path.display(), format = r.format, "journal record of another format");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable journal record");
                Ok(None)
            }
        }
    }

    /// Removes a record.
    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.path(id));
    }
}

/// One migration's record and the journal it lives in; clones share both.
#[derive(Debug, Clone)]
pub struct Entry {
    journal: Arc<Journal>,
    record: Arc<Mutex<Record>>,
    /// Held across a whole write, so writes of the entry (from any clone, on any thread) reach
    /// the file one at a time and in the order they took their snapshots.
    writing: Arc<Mutex<()>>,
}

impl Entry {
    /// A new entry; nothing is written until [`Entry::record`].
    pub fn new(journal: Arc<Journal>, record: Record) -> Self {
        Self { journal, record: Arc::new(Mutex::new(record)), writing: Arc::new(Mutex::new(())) }
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> Option<Record> {
        self.record.lock().ok().map(|r| r.clone())
    }

    /// The current standing.
    pub fn standing(&self) -> Option<Standing> {
        self.record.lock().ok().map(|r| r.standing)
    }

    /// Changes the record with `f`, moves it to `standing` and writes it durably before
    /// returning: the caller acts only after this returned `Ok`.
    ///
    /// # Errors
    /// [`JournalError`]; the in-memory record keeps the change (the next write carries it).
    pub fn record(&self, standing: Standing, f: impl FnOnce(&mut Record)) -> Result<Duration, JournalError> {
        // A poisoned lock only means another write panicked; this one still writes whole.
        let _writing = self.writing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let snapshot = {
            let mut r = self.record.lock().map_err(|_| JournalError::Write {
                id: String::new(),
                path: self.journal.dir.clone(),
                source: std::io::Error::other("journal entry poisoned"),
            })?;
            f(&mut r);
            let now = unix_nanos(SystemTime::now());
            if r.standing != standing || r.history.is_empty() {
                r.history.push((standing.as_str().to_owned(), now));
            }
            r.standing = standing;
            r.updated_unix_nanos = now;
            r.clone()
        };
        let took = self.journal.write(&snapshot)?;
        tracing::debug!(state = standing.as_str(), took_us = took.as_micros(), "journal written");
        Ok(took)
    }
}

/// Hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of `hex`, `None` if it is not even-length lower/upper-case hex.
pub fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, standing: Standing) -> Record {
        Record {
            format: FORMAT,
            migration_id: id.into(),
            sandbox_id: "sb".into(),
            standing,
            peer: "10.0.0.2".parse().expect("ip"),
            secret_hex: to_hex(&[0xab; 32]),
            started_unix_nanos: 1,
            updated_unix_nanos: unix_nanos(SystemTime::now()),
            message: String::new(),
            history: Vec::new(),
            source: Some(SourceRecord {
                original_routes: vec![RouteRecord {
                    dest: "10.244.1.10".parse().expect("ip"),
                    gateway: None,
                    oif: 7,
                    onlink: false,
                    protocol: Some(3),
                }],
                tunnel: Some((9, "kmrs1234".into())),
                ..SourceRecord::default()
            }),
            destination: None,
            vm_stopped_unix_nanos: None,
        }
    }

    /// Clones of an entry write from several tasks (the source's decision delivered in the
    /// background records the confirmation while its forwarding goes on): writes on several
    /// threads must neither fail (they share one temporary file) nor land out of the order of
    /// their snapshots.
    #[test]
    fn concurrent_writes_of_one_entry_land_whole_and_in_order() {
        let tmp = tempfile::tempdir().expect("tmp");
        let j = Arc::new(Journal::open(&tmp.path().join("migrations")).expect("open"));
        let e = Entry::new(j.clone(), record("mig-c", Standing::Destination(DestState::Voted)));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        e.record(Standing::Destination(DestState::Voted), |r| r.message = format!("{t}-{i}"))
                            .expect("every write succeeds");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        e.record(Standing::Destination(DestState::Running), |r| r.message = "last".into()).expect("write");
        let all = j.load_all().expect("load");
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].standing, all[0].message.as_str()),
            (Standing::Destination(DestState::Running), "last")
        );
    }

    #[test]
    fn records_round_trip_durably_and_root_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("migrations");
        let j = Arc::new(Journal::open(&dir).expect("open"));
        assert_eq!(std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777, 0o700);
        let e = Entry::new(j.clone(), record("mig-1", Standing::Source(SourceState::Preparing)));
        e.record(Standing::Source(SourceState::Preparing), |_| {}).expect("write");
        e.record(Standing::Source(SourceState::HandedOver), |r| r.message = "committed".into())
            .expect("write");
        let file = dir.join("mig-1.json");
        assert_eq!(std::fs::metadata(&file).expect("file").permissions().mode() & 0o777, 0o600);
        let all = j.load_all().expect("load");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].standing, Standing::Source(SourceState::HandedOver));
        assert_eq!(all[0].standing.owner(), Owner::Destination);
        assert_eq!(all[0].message, "committed");
        let states: Vec<&str> = all[0].history.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(states, ["preparing", "handed-over"]);
        assert_eq!(all[0].source, record("x", Standing::Source(SourceState::Preparing)).source);
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(
            text.contains("\"role\": \"source\"") && text.contains("\"state\": \"handed-over\""),
            "{text}"
        );
        assert!(!dir.join(".mig-1.json.tmp").exists(), "no temporary file left");
    }

    #[test]
    fn unreadable_and_foreign_records_are_skipped_and_old_ended_ones_pruned() {
        let tmp = tempfile::tempdir().expect("tmp");
        let j = Journal::open(tmp.path()).expect("open");
        std::fs::write(tmp.path().join("torn.json"), b"{\"format\": 1, \"migr").expect("write");
        let mut foreign = record("mig-f", Standing::Destination(DestState::Voted));
        foreign.format = 99;
        j.write(&foreign).expect("write");
        let mut old = record("mig-old", Standing::Source(SourceState::RolledBack));
        old.updated_unix_nanos = 1;
        j.write(&old).expect("write");
        let mut old_live = record("mig-live", Standing::Destination(DestState::Voted));
        old_live.updated_unix_nanos = 1;
        j.write(&old_live).expect("write");
        let mut old_vm = record("mig-vm", Standing::Destination(DestState::Running));
        old_vm.updated_unix_nanos = 1;
        old_vm.destination = Some(DestRecord::default());
        j.write(&old_vm).expect("write");
        let mut old_gone = record("mig-gone", Standing::Destination(DestState::Running));
        old_gone.updated_unix_nanos = 1;
        j.write(&old_gone).expect("write");
        let mut ids: Vec<String> = j.load_all().expect("load").into_iter().map(|r| r.migration_id).collect();
        ids.sort();
        assert_eq!(
            ids,
            ["mig-live", "mig-vm"],
            "an undecided record and one whose incoming VM still lives here are never pruned"
        );
        assert!(!tmp.path().join("mig-gone.json").exists(), "an old record of a VM gone from here is");
        assert_eq!(j.load("mig-vm").expect("load").map(|r| r.migration_id).as_deref(), Some("mig-vm"));
        assert_eq!(j.load("mig-none").expect("load"), None);
        assert_eq!(j.load("mig-f").expect("load"), None, "another format is not read");
        assert!(j.load("../etc/passwd").is_err(), "an id is validated before it names a file");
        assert!(tmp.path().join("torn.json").exists(), "left for an operator");
        assert!(!tmp.path().join("mig-old.json").exists(), "pruned");
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(from_hex(&to_hex(&[0, 1, 0xfe, 0xff])), Some(vec![0, 1, 0xfe, 0xff]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
