//! Running the delegate shim exactly as containerd ran the wrapper: same arguments, environment,
//! working directory and standard streams (inherited, so its address or `DeleteResponse` reaches
//! containerd byte for byte and its options on stdin are read by it, not by us).

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use super::config::find_program;
use super::Error;

/// Finds the delegate binary.
///
/// # Errors
/// [`Error::DelegateMissing`].
pub(crate) fn resolve(program: &Path) -> Result<PathBuf, Error> {
    find_program(program, std::env::var_os("PATH").as_deref())
        .ok_or_else(|| Error::DelegateMissing { program: program.to_owned() })
}

fn command(program: &Path, args: &[OsString]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Runs the delegate to completion. It dies with the wrapper: if containerd gives up on the
/// wrapper (kills it), a delegate left writing into containerd's pipe would hold containerd's
/// read open.
///
/// # Errors
/// [`Error::DelegateSpawn`], [`Error::DelegateWait`].
pub(crate) fn run(program: &Path, args: &[OsString]) -> Result<ExitStatus, Error> {
    let mut cmd = command(program, args);
    // SAFETY: the closure runs in the forked child before exec and only makes one prctl(2) call,
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child =
        cmd.spawn().map_err(|source| Error::DelegateSpawn { program: program.to_owned(), source })?;
    child.wait().map_err(|source| Error::DelegateWait { program: program.to_owned(), source })
}

/// Replaces this process with the delegate (for actions the wrapper has no part in). Returns
/// only on failure.
pub(crate) fn exec(program: &Path, args: &[OsString]) -> Error {
    let source = command(program, args).exec();
    Error::DelegateSpawn { program: program.to_owned(), source }
}

/// The exit code a shell would report for `status`: the code, or 128 + the signal.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_delegate() {
        let sh = |script: &str| run(Path::new("/bin/sh"), &["-c".into(), script.into()]).expect("run sh");
        assert_eq!(exit_code(sh("exit 0")), 0);
        assert_eq!(exit_code(sh("exit 3")), 3);
        assert_eq!(exit_code(sh("kill -9 $$")), 137);
    }

    #[test]
    fn missing_delegate_is_named() {
        let err = resolve(Path::new("containerd-shim-nope-v2")).expect_err("missing").to_string();
        assert!(err.contains("containerd-shim-nope-v2 not found"), "{err}");
        assert!(err.contains("KATAMARAN_DELEGATE_SHIM"), "{err}");
    }
}
