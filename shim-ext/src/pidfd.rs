//! Waiting for a process to exit without polling: a pidfd becomes readable when its process
//! ends (Linux ≥ 5.3). Used to end forwarding when the source QEMU goes, and by the per-sandbox
//! extension to end with its sandbox's shim.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Resolves when process `pid` has exited (at once if it does not exist).
///
/// # Errors
/// When the kernel cannot give a pidfd for another reason than a missing process.
pub async fn wait_exit(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open(2) takes a pid and a flags word and returns a new descriptor or -1; no
    // memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(err) };
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `owned` holds the only copy of a valid descriptor, which the AsyncFd keeps open and
    // never replaces until it is dropped.
    let async_fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE)? };
    let _ready = async_fd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_when_the_child_exits_and_for_missing_pids() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().expect("spawn sleep");
        let pid = child.id();
        let started = std::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(5), wait_exit(pid))
            .await
            .expect("in time")
            .expect("wait");
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(150),
            "did not resolve before the exit"
        );
        child.wait().expect("reap");
        // A pid that does not exist (pid_max is at most 2^22).
        wait_exit(4_194_999).await.expect("missing process counts as exited");
    }
}
