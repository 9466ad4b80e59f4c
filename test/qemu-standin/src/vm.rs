//! The stand-in's VM: its run state, its migration (both directions) and the events they emit.
//!
//! One mutex guards the state; the QMP connections, the migration thread and the guest thread
//! take it briefly. Events are written to every connected QMP client while the state change
//! that caused them is still under the lock, so a client sees them in the order they happened
//! (a `STOP` before the reply to `stop`, as QEMU does).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::stream::{self, ACK, MAGIC, TAG_DEVICE, TAG_END, TAG_RAM};
use crate::Error;

/// Bytes per RAM frame.
const CHUNK: u64 = 256 << 10;
/// What a dirty-bitmap sync costs at a pass end (the guest keeps dirtying meanwhile): it keeps
/// a guest that dirties anything from ever having nothing left, as in QEMU.
const SYNC_COST: Duration = Duration::from_millis(1);
/// A pass shorter than this does not update the measured bandwidth.
const MIN_MEASURED: u64 = 1 << 20;
/// How long the source waits for the destination's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Page size reported in `query-migrate`.
const PAGE: u64 = 4096;

/// QEMU's run states that the stand-in passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Started with `-S`, never run.
    Prelaunch,
    /// Running: the guest reads its tap.
    Running,
    /// Stopped by `stop` (or after an incoming migration, until `cont`).
    Paused,
    /// Waiting for / loading an incoming migration.
    InMigrate,
    /// Stopped by the migration's completion, sending the rest.
    FinishMigrate,
    /// Migrated away.
    PostMigrate,
}

impl RunState {
    /// QEMU's name for it (`query-status`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }
}

/// A migration's numbers, as `query-migrate` reports them.
#[derive(Debug, Clone, Default)]
struct Stats {
    status: &'static str,
    transferred: u64,
    remaining: u64,
    dirty_sync_count: u64,
    mbps: f64,
    setup_ms: u64,
    total_ms: Option<u64>,
    downtime_ms: Option<u64>,
    error: Option<String>,
}

#[derive(Debug)]
struct State {
    run: RunState,
    migration: Stats,
    started: Option<Instant>,
    caps: BTreeMap<&'static str, bool>,
    params: Map<String, Value>,
    fds: HashMap<String, OwnedFd>,
    cancel: bool,
    /// Bytes the guest dirtied since the last sync, and when that was last brought up to date.
    dirtied: f64,
    dirty_tick: Instant,
    stopped_at: Option<Instant>,
}

/// A QMP error: (class, description).
pub type QmpError = (&'static str, String);

fn generic(desc: impl Into<String>) -> QmpError {
    ("GenericError", desc.into())
}

/// The VM.
#[derive(Debug)]
pub struct Vm {
    state: Mutex<State>,
    changed: Condvar,
    clients: Mutex<Vec<Arc<Mutex<UnixStream>>>>,
    running: AtomicBool,
    /// Datagrams the guest echoed.
    pub echoed: AtomicU64,
    ram_bytes: u64,
    dirty_rate: u64,
    incoming: bool,
    tap: Option<Arc<File>>,
    mac: [u8; 6],
}

/// How the VM starts.
#[derive(Debug)]
pub struct Config {
    /// Guest RAM (`-m`).
    pub ram_bytes: u64,
    /// Bytes per second the guest dirties while it runs.
    pub dirty_rate: u64,
    /// `-S`.
    pub start_paused: bool,
    /// `-incoming defer`.
    pub incoming: bool,
    /// The tap, opened non-blocking.
    pub tap: Option<File>,
    /// The NIC's MAC.
    pub mac: [u8; 6],
}

impl Vm {
    /// A VM in its initial state: running unless `-S` or incoming.
    pub fn new(cfg: Config) -> Arc<Self> {
        let run = if cfg.incoming {
            RunState::InMigrate
        } else if cfg.start_paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        };
        let caps = [
            ("events", false),
            ("return-path", false),
            ("auto-converge", false),
            ("late-block-activate", false),
            ("multifd", false),
            ("pause-before-switchover", false),
        ]
        .into_iter()
        .collect();
        // QEMU 10.0's defaults for what katamaran reads and writes.
        let params = json!({
            "downtime-limit": 300, "max-bandwidth": 134_217_728u64, "avail-switchover-bandwidth": 0,
            "tls-creds": "", "tls-hostname": "", "multifd-channels": 2,
            "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
        });
        let params = params.as_object().cloned().unwrap_or_default();
        Arc::new(Self {
            state: Mutex::new(State {
                run,
                migration: Stats { status: "none", ..Stats::default() },
                started: None,
                caps,
                params,
                fds: HashMap::new(),
                cancel: false,
                dirtied: 0.0,
                dirty_tick: Instant::now(),
                stopped_at: None,
            }),
            changed: Condvar::new(),
            clients: Mutex::new(Vec::new()),
            running: AtomicBool::new(run == RunState::Running),
            echoed: AtomicU64::new(0),
            ram_bytes: cfg.ram_bytes,
            dirty_rate: cfg.dirty_rate,
            incoming: cfg.incoming,
            tap: cfg.tap.map(Arc::new),
            mac: cfg.mac,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the guest runs (read by the guest thread before every read from the tap).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Blocks until the guest runs.
    pub fn wait_running(&self) {
        let mut s = self.lock();
        while s.run != RunState::Running {
            s = self.changed.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The tap, if the command line named one.
    pub fn tap(&self) -> Option<&Arc<File>> {
        self.tap.as_ref()
    }

    /// The NIC's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// A QMP client to send events to.
    pub fn attach(&self, writer: Arc<Mutex<UnixStream>>) {
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(writer);
    }

    /// Forgets a QMP client.
    pub fn detach(&self, writer: &Arc<Mutex<UnixStream>>) {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|w| !Arc::ptr_eq(w, writer));
    }

    /// Writes an event to every client (callers hold the state lock, which orders events).
    fn emit(&self, event: &str, data: Option<Value>) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut msg = json!({
            "event": event,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let (Some(d), Some(obj)) = (data, msg.as_object_mut()) {
            obj.insert("data".into(), d);
        }
        let line = format!("{msg}\r\n");
        let clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for c in clients {
            let mut w = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = w.write_all(line.as_bytes());
        }
    }

    fn set_run(&self, s: &mut State, run: RunState) {
        let was = s.run == RunState::Running;
        let is = run == RunState::Running;
        tick(s, self.dirty_rate, self.ram_bytes);
        s.run = run;
        self.running.store(is, Ordering::SeqCst);
        if was && !is {
            s.stopped_at = Some(Instant::now());
            self.emit("STOP", None);
        } else if !was && is {
            self.emit("RESUME", None);
        }
        self.changed.notify_all();
    }

    fn set_status(&self, s: &mut State, status: &'static str) {
        s.migration.status = status;
        if s.caps.get("events").copied().unwrap_or(false) {
            self.emit("MIGRATION", Some(json!({"status": status})));
        }
    }

    /// Runs one QMP command. `fds` holds the descriptors received on the connection.
    ///
    /// # Errors
    /// The QMP error to reply with.
    pub fn execute(
        self: &Arc<Self>,
        cmd: &str,
        args: &Map<String, Value>,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<Value, QmpError> {
        match cmd {
            "query-version" => Ok(version()),
            "query-commands" => Ok(Value::Array(COMMANDS.iter().map(|c| json!({"name": c})).collect())),
            "query-name" => Ok(json!({})),
            "query-status" => {
                let s = self.lock();
                Ok(
                    json!({"running": s.run == RunState::Running, "singlestep": false, "status": s.run.as_str()}),
                )
            }
            "query-block" => Ok(json!([])),
            "query-migrate-capabilities" => {
                let s = self.lock();
                Ok(Value::Array(s.caps.iter().map(|(k, v)| json!({"capability": k, "state": v})).collect()))
            }
            "query-migrate-parameters" => Ok(Value::Object(self.lock().params.clone())),
            "migrate-set-capabilities" => self.set_capabilities(args),
            "migrate-set-parameters" => {
                let mut s = self.lock();
                for (k, v) in args {
                    if !(v.is_u64() || v.is_string() || v.is_boolean()) {
                        return Err(generic(format!("Parameter '{k}' expects a number, string or boolean")));
                    }
                    s.params.insert(k.clone(), v.clone());
                }
                Ok(json!({}))
            }
            "query-migrate" => Ok(self.query_migrate()),
            "getfd" => {
                let name = str_arg(args, "fdname")?;
                let fd = fds.pop().ok_or_else(|| generic("No file descriptor supplied via SCM_RIGHTS"))?;
                self.lock().fds.insert(name.to_owned(), fd);
                Ok(json!({}))
            }
            "closefd" => {
                let name = str_arg(args, "fdname")?;
                self.lock()
                    .fds
                    .remove(name)
                    .map(|_| json!({}))
                    .ok_or_else(|| generic(format!("File descriptor named '{name}' not found")))
            }
            "migrate" => self.start_migration(args, false),
            "migrate-incoming" => self.start_migration(args, true),
            "migrate_cancel" => {
                let mut s = self.lock();
                if matches!(s.migration.status, "setup" | "active" | "device") && !self.incoming {
                    s.cancel = true;
                    self.set_status(&mut s, "cancelling");
                }
                Ok(json!({}))
            }
            "stop" => {
                let mut s = self.lock();
                if s.run == RunState::Running {
                    self.set_run(&mut s, RunState::Paused);
                }
                Ok(json!({}))
            }
            "cont" => {
                let mut s = self.lock();
                match s.run {
                    RunState::InMigrate => Err(generic("Guest is waiting for an incoming migration")),
                    RunState::FinishMigrate => Err(generic("The migration is completing")),
                    RunState::Running => Ok(json!({})),
                    _ => {
                        self.set_run(&mut s, RunState::Running);
                        Ok(json!({}))
                    }
                }
            }
            "announce-self" => {
                self.announce(args);
                Ok(json!({}))
            }
            "quit" => Ok(json!({})),
            _ => Err(("CommandNotFound", format!("The command {cmd} has not been found"))),
        }
    }

    fn set_capabilities(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let list = args
            .get("capabilities")
            .and_then(Value::as_array)
            .ok_or_else(|| generic("Parameter 'capabilities' is missing"))?;
        let mut s = self.lock();
        if s.migration.status != "none" && !matches!(s.migration.status, "completed" | "failed" | "cancelled")
        {
            return Err(generic("There's a migration process in progress"));
        }
        for c in list {
            let name = c.get("capability").and_then(Value::as_str).unwrap_or_default();
            let state = c.get("state").and_then(Value::as_bool).unwrap_or(false);
            let Some(slot) = s.caps.get_mut(name) else {
                return Err(generic(format!("Parameter 'capability' does not accept value '{name}'")));
            };
            if state && matches!(name, "multifd" | "pause-before-switchover") {
                return Err(generic(format!("the stand-in does not model capability '{name}'")));
            }
            *slot = state;
        }
        Ok(json!({}))
    }

    fn query_migrate(&self) -> Value {
        let s = self.lock();
        let m = &s.migration;
        if m.status == "none" {
            return json!({});
        }
        let mut out = json!({
            "status": m.status,
            "setup-time": m.setup_ms,
            "ram": {
                "transferred": m.transferred, "remaining": m.remaining, "total": self.ram_bytes,
                "duplicate": 0, "normal": m.transferred / PAGE, "normal-bytes": m.transferred,
                "dirty-sync-count": m.dirty_sync_count, "mbps": m.mbps, "page-size": PAGE,
                "dirty-pages-rate": if s.run == RunState::Running { self.dirty_rate / PAGE } else { 0 },
            },
        });
        if let Some(obj) = out.as_object_mut() {
            let total = m.total_ms.or_else(|| s.started.map(|t| millis(t.elapsed())));
            if let Some(t) = total {
                obj.insert("total-time".into(), json!(t));
            }
            if let Some(d) = m.downtime_ms {
                obj.insert("downtime".into(), json!(d));
            } else {
                obj.insert("expected-downtime".into(), json!(0));
            }
            if let Some(e) = &m.error {
                obj.insert("error-desc".into(), json!(e));
            }
        }
        out
    }

    fn start_migration(
        self: &Arc<Self>,
        args: &Map<String, Value>,
        incoming: bool,
    ) -> Result<Value, QmpError> {
        let uri = str_arg(args, "uri")?;
        let name = uri
            .strip_prefix("fd:")
            .ok_or_else(|| generic(format!("the stand-in only migrates over fd: URIs, not {uri:?}")))?;
        let mut s = self.lock();
        if incoming && (!self.incoming || s.migration.status != "none") {
            return Err(generic("'-incoming' was not specified on the command line"));
        }
        if !incoming && (self.incoming || matches!(s.migration.status, "setup" | "active" | "device")) {
            return Err(generic("There's a migration process in progress"));
        }
        if s.caps.get("return-path") != Some(&true) {
            return Err(generic("the stand-in migrates with the return-path capability only"));
        }
        let fd =
            s.fds.remove(name).ok_or_else(|| generic(format!("File descriptor named '{name}' not found")))?;
        set_blocking(&fd).map_err(|e| generic(format!("fd {name}: {e}")))?;
        // As QEMU does for a migration socket: the small frames of the completion (and the
        // destination's acknowledgement) must not wait for Nagle's algorithm. Not a TCP socket
        // (a unix socket pair in tests): nothing to do.
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
        s.migration = Stats { status: "none", ..Stats::default() };
        s.cancel = false;
        s.started = Some(Instant::now());
        self.set_status(&mut s, "setup");
        drop(s);
        let vm = Arc::clone(self);
        let socket = File::from(fd);
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let result = if incoming { vm.receive(socket) } else { vm.send(socket) };
                if let Err(e) = result {
                    vm.fail(&e.to_string(), incoming);
                }
            })
            .map_err(|e| generic(format!("cannot start the migration thread: {e}")))?;
        Ok(json!({}))
    }

    /// The source: passes until the dirty rest fits the downtime limit, then the completion.
    fn send(&self, mut sock: File) -> Result<(), Error> {
        let zeros = vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 18)];
        sock.write_all(MAGIC).map_err(Error::StreamIo)?;
        {
            let mut s = self.lock();
            s.migration.setup_ms = s.started.map(|t| millis(t.elapsed())).unwrap_or_default();
            s.dirtied = 0.0;
            s.dirty_tick = Instant::now();
            self.set_status(&mut s, "active");
        }
        let mut to_send = self.ram_bytes;
        let mut bandwidth = 0.0f64;
        loop {
            let pass = Instant::now();
            self.lock().migration.remaining = to_send;
            let mut sent = 0;
            while sent < to_send {
                if self.lock().cancel {
                    return self.cancelled();
                }
                let n = CHUNK.min(to_send - sent);
                stream::write_frame(&mut sock, TAG_RAM, &zeros[..usize::try_from(n).unwrap_or(0)])?;
                sent += n;
                let mut s = self.lock();
                s.migration.transferred += n;
                s.migration.remaining = to_send - sent;
                tick(&mut s, self.dirty_rate, self.ram_bytes);
            }
            std::thread::sleep(SYNC_COST);
            let mut s = self.lock();
            tick(&mut s, self.dirty_rate, self.ram_bytes);
            let elapsed = pass.elapsed().as_secs_f64();
            if sent >= MIN_MEASURED && elapsed > 0.0 {
                bandwidth = sent as f64 / elapsed;
                s.migration.mbps = bandwidth * 8.0 / 1e6;
            }
            let dirty = (s.dirtied as u64).min(self.ram_bytes);
            s.dirtied = 0.0;
            s.migration.dirty_sync_count += 1;
            s.migration.remaining = dirty;
            let limit_ms = s.params.get("downtime-limit").and_then(Value::as_u64).unwrap_or(300);
            let switchover = s.params.get("avail-switchover-bandwidth").and_then(Value::as_u64).unwrap_or(0);
            let rate = if switchover > 0 { switchover as f64 } else { bandwidth };
            let threshold = rate * limit_ms as f64 / 1000.0;
            let count = s.migration.dirty_sync_count;
            if s.caps.get("events").copied().unwrap_or(false) {
                self.emit("MIGRATION_PASS", Some(json!({"pass": count})));
            }
            if dirty as f64 <= threshold {
                return self.complete(s, sock, dirty, &zeros);
            }
            to_send = dirty;
        }
    }

    fn complete(
        &self,
        mut s: MutexGuard<'_, State>,
        mut sock: File,
        rest: u64,
        zeros: &[u8],
    ) -> Result<(), Error> {
        if s.run == RunState::Running {
            self.set_run(&mut s, RunState::FinishMigrate);
        }
        let stopped = s.stopped_at.unwrap_or_else(Instant::now);
        self.set_status(&mut s, "device");
        drop(s);
        let mut sent = 0;
        while sent < rest {
            let n = CHUNK.min(rest - sent);
            stream::write_frame(&mut sock, TAG_RAM, &zeros[..usize::try_from(n).unwrap_or(0)])?;
            sent += n;
        }
        let device = json!({"echoed": self.echoed.load(Ordering::SeqCst)}).to_string();
        stream::write_frame(&mut sock, TAG_DEVICE, device.as_bytes())?;
        stream::write_frame(&mut sock, TAG_END, &[])?;
        if !wait_readable(&sock, ACK_TIMEOUT) {
            return Err(Error::Stream("the destination did not acknowledge the stream".into()));
        }
        let mut ack = [0u8; 1];
        sock.read_exact(&mut ack).map_err(Error::StreamIo)?;
        if ack[0] != ACK {
            return Err(Error::Stream(format!("the destination answered {:#x}", ack[0])));
        }
        let mut s = self.lock();
        s.migration.transferred += rest;
        s.migration.remaining = 0;
        s.migration.downtime_ms = Some(millis(stopped.elapsed()));
        s.migration.total_ms = s.started.map(|t| millis(t.elapsed()));
        s.run = RunState::PostMigrate;
        self.set_status(&mut s, "completed");
        Ok(())
    }

    fn cancelled(&self) -> Result<(), Error> {
        let mut s = self.lock();
        if s.run == RunState::FinishMigrate {
            self.set_run(&mut s, RunState::Running);
        }
        self.set_status(&mut s, "cancelled");
        Ok(())
    }

    /// The destination: loads the stream, then waits paused for `cont`.
    fn receive(&self, mut sock: File) -> Result<(), Error> {
        {
            let mut s = self.lock();
            self.set_status(&mut s, "active");
        }
        let mut magic = [0u8; 16];
        sock.read_exact(&mut magic).map_err(Error::StreamIo)?;
        if &magic != MAGIC {
            return Err(Error::Stream("not a stand-in migration stream".into()));
        }
        let mut ram = 0u64;
        let mut buf = vec![0u8; usize::try_from(stream::MAX_FRAME).unwrap_or(1 << 22)];
        loop {
            let (tag, len) = stream::read_header(&mut sock)?;
            let payload = &mut buf[..usize::try_from(len).unwrap_or(0)];
            sock.read_exact(payload).map_err(Error::StreamIo)?;
            match tag {
                TAG_RAM => {
                    ram += u64::from(len);
                    self.lock().migration.transferred = ram;
                }
                TAG_DEVICE => {
                    let dev: Value = serde_json::from_slice(payload)
                        .map_err(|e| Error::Stream(format!("device state: {e}")))?;
                    if let Some(n) = dev.get("echoed").and_then(Value::as_u64) {
                        self.echoed.store(n, Ordering::SeqCst);
                    }
                }
                _ => break,
            }
        }
        if ram < self.ram_bytes {
            return Err(Error::Stream(format!("only {ram} of {} bytes of RAM arrived", self.ram_bytes)));
        }
        let mut s = self.lock();
        s.run = RunState::Paused;
        s.migration.total_ms = s.started.map(|t| millis(t.elapsed()));
        self.set_status(&mut s, "completed");
        drop(s);
        sock.write_all(&[ACK]).map_err(Error::StreamIo)
    }

    fn fail(&self, why: &str, incoming: bool) {
        eprintln!("katamaran-qemu-standin: migration failed: {why}");
        let mut s = self.lock();
        s.migration.error = Some(why.to_owned());
        if s.run == RunState::FinishMigrate {
            self.set_run(&mut s, RunState::Running);
        }
        self.set_status(&mut s, "failed");
        drop(s);
        if incoming {
            // QEMU exits when an incoming migration fails.
            std::process::exit(1);
        }
    }

    fn announce(&self, args: &Map<String, Value>) {
        let Some(tap) = self.tap.clone() else { return };
        let get = |k: &str, d: u64| args.get(k).and_then(Value::as_u64).unwrap_or(d);
        let (initial, max, rounds, step) =
            (get("initial", 50), get("max", 550), get("rounds", 5), get("step", 100));
        let frame = crate::frames::announce(self.mac);
        let spawned = std::thread::Builder::new().name("announce".into()).spawn(move || {
            let mut delay = initial;
            for _ in 0..rounds {
                std::thread::sleep(Duration::from_millis(delay));
                let _ = (&*tap).write_all(&frame);
                delay = (delay + step).min(max);
            }
        });
        if let Err(e) = spawned {
            eprintln!("katamaran-qemu-standin: cannot announce: {e}");
        }
    }
}

/// The QEMU version the stand-in claims, in the greeting and `query-version`: 10.0.2, so the
/// engine takes its QEMU ≥ 9 path (iterating pre-copy, the completion hold).
pub fn version() -> Value {
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "katamaran-qemu-standin"})
}

/// Every command the stand-in answers (`query-commands`).
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-name",
    "query-status",
    "query-block",
    "query-migrate",
    "query-migrate-capabilities",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "migrate-set-parameters",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "getfd",
    "closefd",
    "stop",
    "cont",
    "announce-self",
    "quit",
];

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> Result<&'a str, QmpError> {
    args.get(key).and_then(Value::as_str).ok_or_else(|| generic(format!("Parameter '{key}' is missing")))
}

/// Brings the guest's dirtying up to date: `rate` bytes per second while it runs.
fn tick(s: &mut State, rate: u64, ram: u64) {
    let now = Instant::now();
    if s.run == RunState::Running {
        s.dirtied = (s.dirtied + rate as f64 * (now - s.dirty_tick).as_secs_f64()).min(ram as f64);
    }
    s.dirty_tick = now;
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn set_blocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map(drop)
}

/// Whether `f` becomes readable within `limit`.
pub fn wait_readable(f: &impl AsFd, limit: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let deadline = Instant::now() + limit;
    loop {
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) if n > 0 => return true,
            Ok(_) if Instant::now() >= deadline => return false,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}
