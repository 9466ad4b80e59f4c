//! A real QEMU (TCG, no disk) with a QMP socket, killed and reaped on drop.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use katamaran_test_skip::{skip, Tier};
use tempfile::TempDir;

/// The emulator the tests use.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How long QEMU may take to create its QMP socket (TCG on a loaded 2-CPU runner).
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// Finds `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path).map(|dir| dir.join(QEMU_BINARY)).find(|candidate| candidate.is_file())
}

/// A running QEMU. Killed with SIGKILL and reaped when dropped, so a failing test leaves no
/// process behind; its temporary directory (socket, log) goes with it.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    qmp: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl Qemu {
    /// Starts `qemu-system-x86_64 -accel tcg -display none -nodefaults -machine pc -m 64
    /// -qmp unix:PATH,server=on,wait=off` plus `extra`, or prints a `skipped:` line and returns
    /// `None` when QEMU is not installed.
    pub fn launch(extra: &[&str]) -> Option<Self> {
        let Some(binary) = find_qemu() else {
            skip(Tier::Qemu, format!("{QEMU_BINARY} not found"));
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let qmp = dir.path().join("qmp.sock");
        let log = dir.path().join("qemu.log");
        let log_file = File::create(&log).expect("create QEMU log");
        let child = Command::new(binary)
            // /dev/kvm exists on some runners but hangs; TCG always works.
            .args(["-accel", "tcg", "-display", "none", "-nodefaults"])
            .args(["-machine", "pc", "-m", "64"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn QEMU");
        Some(Self { child, qmp, log, dir })
    }

    /// The QMP socket path.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The temporary directory QEMU's files live in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What QEMU wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until QEMU listens on its QMP socket; panics with QEMU's log if QEMU exits or the
    /// deadline passes first.
    ///
    /// The socket file appears at `bind`, before `listen`, so its existence is not enough: a
    /// connect in between is refused. Listening is read from `/proc/net/unix` rather than
    /// probed with a connect, which would take QEMU's single QMP client slot.
    pub async fn wait_for_qmp(&mut self) {
        let started = Instant::now();
        while !is_listening(&self.qmp) {
            if let Some(status) = self.child.try_wait().expect("poll QEMU") {
                panic!("QEMU exited with {status} before listening on QMP:\n{}", self.log());
            }
            assert!(
                started.elapsed() < START_DEADLINE,
                "QEMU did not listen on QMP within {START_DEADLINE:?}:\n{}",
                self.log()
            );
            // QEMU offers no readiness notification for the socket; poll the condition.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills QEMU (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `true` if a unix socket bound to `path` is listening (`__SO_ACCEPTCON` in `/proc/net/unix`).
fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let Some(path) = path.to_str() else {
        return false;
    };
    // Columns: Num RefCount Protocol Flags Type St Inode [Path]
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}
