//! The process syscalls of the wrapper, in one place: pidfds (signal and wait without racing pid
//! reuse), the children of this process, command lines. Blocking on purpose: the wrapper is a
//! short-lived, single-threaded launcher.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::decide::parse_ppid;

/// A process handle that stays bound to one process even if its pid is reused.
#[derive(Debug)]
pub(crate) struct Pidfd(OwnedFd);

impl Pidfd {
    /// Opens a pidfd; `None` when no such process exists.
    pub(crate) fn open(pid: u32) -> io::Result<Option<Self>> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: pidfd_open(2) takes a pid and a flags word and returns a new descriptor or -1; no
        // memory is shared with the kernel.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ESRCH) { Ok(None) } else { Err(err) };
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        Ok(Some(Self(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Sends `signal`; a process that already exited is not an error.
    pub(crate) fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number, no siginfo (NULL) and
        // no flags; the kernel reads no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Waits until the process exits or `timeout` passes; `true` when it exited.
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `pfd` is one valid pollfd that outlives the call; the count is 1.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            match rc {
                n if n > 0 => return Ok(true),
                0 => return Ok(false),
                _ => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }
}

/// Makes orphaned descendants of this process its children instead of init's, so that the shim
/// the delegate forks can be found once the delegate's `start` has exited.
pub(crate) fn become_subreaper() -> Result<(), nix::Error> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// The live children of this process.
pub(crate) fn children() -> Vec<u32> {
    let me = std::process::id();
    // Fast path (CONFIG_PROC_CHILDREN): the children of each of our threads.
    let mut out = Vec::new();
    let mut found_file = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.filter_map(Result::ok) {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                found_file = true;
                out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    if found_file {
        return out;
    }
    // Slow path: every process whose parent is us.
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        if parse_ppid(&stat) == Some(me) {
            out.push(pid);
        }
    }
    out
}

/// A process's argument vector, `None` when it cannot be read (gone, or a zombie: empty).
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_signals_and_waits() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let fd = Pidfd::open(child.id()).expect("open").expect("exists");
        assert!(!fd.wait(Duration::from_millis(50)).expect("wait"), "still running");
        assert!(children().contains(&child.id()), "our child is listed");
        let argv = cmdline(child.id()).expect("cmdline");
        assert_eq!(argv, ["sleep", "30"]);
        fd.signal(libc::SIGTERM).expect("signal");
        assert!(fd.wait(Duration::from_secs(10)).expect("wait"), "exited after SIGTERM");
        child.wait().expect("reap");
        fd.signal(libc::SIGTERM).expect("a reaped process is not an error");
        assert!(Pidfd::open(4_194_999).expect("open").is_none(), "no such pid");
    }
}
