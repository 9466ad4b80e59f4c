//! The per-sandbox extension seen from the wrapper: where its files live, whether its socket is
//! taken, starting it detached, and stopping it by its pid file.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use super::decide::{is_extension_of, stale_logs, LogEntry, LOG_RETENTION};
use super::process::{cmdline, Pidfd};
use super::Error;
use crate::sandbox::NodeLayout;

/// How long a SIGKILLed extension may take to be gone before stopping reports failure.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The files of one sandbox's extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionPaths {
    /// The ttrpc socket, `<katamaran_run>/sandboxes/<id>.sock`.
    pub socket: PathBuf,
    /// The extension's pid, written by the wrapper: `<katamaran_run>/sandboxes/<id>.pid`.
    pub pid_file: PathBuf,
    /// Its standard output and error plus the wrapper's notes: `<katamaran_run>/logs/<id>.log`.
    pub log_file: PathBuf,
}

impl ExtensionPaths {
    /// The paths of sandbox `id` in `layout`.
    pub fn new(layout: &NodeLayout, id: &str) -> Self {
        let socket = layout.sandbox_socket(id);
        Self {
            pid_file: socket.with_extension("pid"),
            log_file: layout.katamaran_run.join("logs").join(format!("{id}.log")),
            socket,
        }
    }
}

/// Whether a server answers on `socket`.
pub fn socket_is_live(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// Refuses when a live server already holds the sandbox's socket (a stale file is fine: the
/// extension replaces it).
///
/// # Errors
/// [`Error::SocketHeld`].
pub fn check_free(paths: &ExtensionPaths, id: &str) -> Result<(), Error> {
    if socket_is_live(&paths.socket) {
        return Err(Error::SocketHeld { id: id.to_owned(), socket: paths.socket.clone() });
    }
    Ok(())
}

fn private_dir(dir: &Path) -> Result<(), Error> {
    let prep = |source| Error::Prepare { path: dir.to_owned(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(prep)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(prep)
}

/// Creates the root-only directories and opens the sandbox's log for appending.
///
/// # Errors
/// [`Error::Prepare`].
pub fn prepare(paths: &ExtensionPaths) -> Result<File, Error> {
    for file in [&paths.socket, &paths.log_file] {
        if let Some(dir) = file.parent() {
            private_dir(dir)?;
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.log_file)
        .map_err(|source| Error::Prepare { path: paths.log_file.clone(), source })
}

/// Appends a timestamped note from the wrapper to the sandbox's log (best effort: the log is the
/// only place the wrapper may write once the delegate has answered containerd).
pub fn note(log: &mut File, msg: &str) {
    let _ = writeln!(log, "{} containerd-shim-katamaran-v2: {msg}", utc_timestamp(SystemTime::now()));
}

/// Starts the extension in its own session, stdin from /dev/null, output into `log`, and records
/// its pid. Returns the pid.
///
/// # Errors
/// [`Error::Prepare`] for the log descriptors or the pid file, [`Error::ExtensionSpawn`].
pub fn launch(
    agent: &Path,
    args: &[OsString],
    log: &File,
    log_filter: Option<&str>,
    paths: &ExtensionPaths,
) -> Result<u32, Error> {
    let dup = || log.try_clone().map_err(|source| Error::Prepare { path: paths.log_file.clone(), source });
    let mut cmd = Command::new(agent);
    // Its output is a file: no terminal colour codes in it.
    cmd.args(args).stdin(Stdio::null()).stdout(dup()?).stderr(dup()?).current_dir("/").env("NO_COLOR", "1");
    if let (Some(filter), None) = (log_filter, std::env::var_os(super::config::ENV_LOG)) {
        cmd.env(super::config::ENV_LOG, filter);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let child = cmd.spawn().map_err(|source| Error::ExtensionSpawn { program: agent.to_owned(), source })?;
    // Not waited for: the wrapper exits now and the extension is re-parented.
    let pid = child.id();
    write_pid_file(&paths.pid_file, pid)?;
    Ok(pid)
}

fn write_pid_file(path: &Path, pid: u32) -> Result<(), Error> {
    let tmp = path.with_extension("pid.tmp");
    let prep = |source| Error::Prepare { path: path.to_owned(), source };
    std::fs::write(&tmp, format!("{pid}\n")).map_err(prep)?;
    std::fs::rename(&tmp, path).map_err(prep)
}

/// Reads a pid file; `None` when missing or not a pid.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|&p| p > 1)
}

/// What [`stop`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// No extension ran (no pid file, its process gone, or the pid now names another process).
    NotRunning,
    /// It ended after SIGTERM.
    Terminated,
    /// It needed SIGKILL.
    Killed,
}

/// Stops sandbox `id`'s extension: SIGTERM, `grace`, then SIGKILL; then removes its pid file and
/// its socket if nothing listens on it (an extension killed hard cannot remove its own).
///
/// # Errors
/// [`Error::Process`] when the pidfd or a signal fails, [`Error::Unkillable`].
pub fn stop(paths: &ExtensionPaths, id: &str, grace: Duration) -> Result<Stopped, Error> {
    let outcome = match read_pid_file(&paths.pid_file) {
        Some(pid) => terminate(id, pid, grace)?,
        None => Stopped::NotRunning,
    };
    if !socket_is_live(&paths.socket) {
        let _ = std::fs::remove_file(&paths.socket);
    }
    let _ = std::fs::remove_file(&paths.pid_file);
    Ok(outcome)
}

fn terminate(id: &str, pid: u32, grace: Duration) -> Result<Stopped, Error> {
    let fail = |what, source| Error::Process { id: id.to_owned(), pid, what, source };
    // The pidfd first, then the identity check: signals go through the pidfd, so a pid reused
    // after the check cannot be hit.
    let Some(fd) = Pidfd::open(pid).map_err(|e| fail("open a pidfd", e))? else {
        return Ok(Stopped::NotRunning);
    };
    if !cmdline(pid).is_some_and(|argv| is_extension_of(&argv, id)) {
        return Ok(Stopped::NotRunning);
    }
    fd.signal(libc::SIGTERM).map_err(|e| fail("send SIGTERM", e))?;
    if fd.wait(grace).map_err(|e| fail("wait", e))? {
        return Ok(Stopped::Terminated);
    }
    fd.signal(libc::SIGKILL).map_err(|e| fail("send SIGKILL", e))?;
    if fd.wait(KILL_GRACE).map_err(|e| fail("wait", e))? {
        return Ok(Stopped::Killed);
    }
    Err(Error::Unkillable { id: id.to_owned(), pid })
}

/// Removes old logs of sandboxes that no longer have an extension (best effort).
pub fn prune_logs(layout: &NodeLayout) {
    let logs = layout.katamaran_run.join("logs");
    let sandboxes = layout.katamaran_run.join("sandboxes");
    let Ok(dir) = std::fs::read_dir(&logs) else { return };
    let entries: Vec<LogEntry> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let modified = e.metadata().ok()?.modified().ok()?;
            let live = sandboxes.join(format!("{}.pid", name.trim_end_matches(".log"))).exists();
            Some(LogEntry { name, modified, live })
        })
        .collect();
    for name in stale_logs(&entries, SystemTime::now(), LOG_RETENTION) {
        let _ = std::fs::remove_file(logs.join(name));
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), the shape of the agent's own log timestamps.
fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian; era arithmetic).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_layout() {
        let p = ExtensionPaths::new(&NodeLayout::default(), "abc");
        assert_eq!(p.socket, Path::new("/run/katamaran/sandboxes/abc.sock"));
        assert_eq!(p.pid_file, Path::new("/run/katamaran/sandboxes/abc.pid"));
        assert_eq!(p.log_file, Path::new("/run/katamaran/logs/abc.log"));
        let p = ExtensionPaths::new(&NodeLayout::under(Path::new("/lab/a")), "x.y");
        assert_eq!(p.pid_file, Path::new("/lab/a/run/katamaran/sandboxes/x.y.pid"));
    }

    #[test]
    fn timestamps() {
        let t = |s: u64| utc_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(t(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(t(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(t(1_767_225_599), "2025-12-31T23:59:59.000Z");
        assert_eq!(t(4_107_542_400), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn collision_stale_socket_and_prepare() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ExtensionPaths::new(&NodeLayout::under(dir.path()), "sb");
        let log = prepare(&paths).expect("prepare");
        drop(log);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(paths.socket.parent().expect("dir")), 0o700);
        assert_eq!(mode(paths.log_file.parent().expect("dir")), 0o700);
        assert_eq!(mode(&paths.log_file), 0o600);
        check_free(&paths, "sb").expect("nothing there");
        let listener = std::os::unix::net::UnixListener::bind(&paths.socket).expect("bind");
        let err = check_free(&paths, "sb").expect_err("held").to_string();
        assert!(err.contains("live server") && err.contains("sb.sock"), "{err}");
        drop(listener); // the file stays: a stale socket
        check_free(&paths, "sb").expect("stale is free");
    }

    #[test]
    fn stop_leaves_strangers_alone_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ExtensionPaths::new(&NodeLayout::under(dir.path()), "sb");
        drop(prepare(&paths).expect("prepare"));
        // A pid file naming a process that is not our extension: untouched, files removed.
        let mut stranger = Command::new("sleep").arg("30").spawn().expect("spawn");
        std::fs::write(&paths.pid_file, format!("{}\n", stranger.id())).expect("write");
        drop(std::os::unix::net::UnixListener::bind(&paths.socket).expect("bind")); // stale
        assert_eq!(stop(&paths, "sb", Duration::from_secs(1)).expect("stop"), Stopped::NotRunning);
        assert!(stranger.try_wait().expect("poll").is_none(), "the stranger still runs");
        assert!(!paths.pid_file.exists() && !paths.socket.exists(), "files removed");
        stranger.kill().expect("kill");
        stranger.wait().expect("reap");
        // No pid file at all.
        assert_eq!(stop(&paths, "sb", Duration::from_secs(1)).expect("stop"), Stopped::NotRunning);
        // A live socket without a pid file belongs to someone: kept.
        let listener = std::os::unix::net::UnixListener::bind(&paths.socket).expect("bind");
        stop(&paths, "sb", Duration::from_secs(1)).expect("stop");
        assert!(paths.socket.exists());
        drop(listener);
    }

    #[test]
    fn old_logs_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = NodeLayout::under(dir.path());
        let old = ExtensionPaths::new(&layout, "old");
        let live = ExtensionPaths::new(&layout, "live");
        let fresh = ExtensionPaths::new(&layout, "fresh");
        for p in [&old, &live, &fresh] {
            drop(prepare(p).expect("prepare"));
        }
        std::fs::write(&live.pid_file, "12345\n").expect("pid");
        let two_days_ago = SystemTime::now() - 2 * LOG_RETENTION;
        for p in [&old, &live] {
            File::options()
                .write(true)
                .open(&p.log_file)
                .expect("open")
                .set_modified(two_days_ago)
                .expect("mtime");
        }
        prune_logs(&layout);
        assert!(!old.log_file.exists(), "old log of a gone sandbox removed");
        assert!(live.log_file.exists(), "a live sandbox keeps its log");
        assert!(fresh.log_file.exists(), "a recent log is kept");
    }
}
