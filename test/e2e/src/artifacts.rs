//! What a lab test needs before it can run: root, host tools, the guest image and the binaries
//! of the workspace (probe, guest tool), and the decision to skip when something is absent.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::LabError;

/// Why a test cannot run here; printed as `skipped: <why>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipped: {}", self.0)
    }
}

impl Skip {
    /// Prints `skipped: <why>` and records the skip in `$KMR_SKIP_LOG` (tier `lab`: every
    /// prerequisite checked here belongs to the lab tier).
    pub fn report(&self) {
        katamaran_test_skip::skip(katamaran_test_skip::Tier::Lab, &self.0);
    }
}

/// Host tools the lab script calls.
const LAB_TOOLS: &[&str] = &["ip", "tc", "md5sum", "truncate", "awk"];
/// Host tools a lab with VMs also needs.
const VM_TOOLS: &[&str] = &["qemu-system-x86_64", "python3"];

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir.ancestors().nth(2).map_or_else(|| crate_dir.to_path_buf(), Path::to_path_buf)
}

/// `hack/lab.sh` of this workspace.
pub fn lab_script() -> PathBuf {
    workspace_root().join("hack/lab.sh")
}

/// The cargo target directory the running test binary was built into.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // <target>/<profile>/deps/<test-binary>
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The default directory of the guest image (`hack/guest/build.sh`'s output).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("KMR_GUEST_DIR").map_or_else(|| workspace_root().join("hack/guest/out"), PathBuf::from)
}

pub(crate) fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"));
    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
}

/// Checks what a lab without VMs needs: root and the host tools.
///
/// # Errors
/// A [`Skip`] naming the first missing prerequisite.
pub fn require_lab() -> Result<(), Skip> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Skip("the lab needs root (network namespaces, veth, tap, tc)".into()));
    }
    if let Some(tool) = LAB_TOOLS.iter().find(|t| !on_path(t)) {
        return Err(Skip(format!("`{tool}` is not installed")));
    }
    Ok(())
}

/// Checks what a lab with VMs needs on top of [`require_lab`]: QEMU and python3 on the host.
///
/// # Errors
/// A [`Skip`] naming the first missing prerequisite.
pub fn require_vm_lab() -> Result<(), Skip> {
    require_lab()?;
    if let Some(tool) = VM_TOOLS.iter().find(|t| !on_path(t)) {
        return Err(Skip(format!("`{tool}` is not installed")));
    }
    Ok(())
}

/// Whether this kernel has `sch_plug`, asked the way the engine asks (`katamaran::net::probe`,
/// in a scratch namespace; needs root). Without it the destination holds packets in the tap's
/// own queue: the engine still reports a "plug release" instant and 0 plug drops, but there is
/// no plug behind them, so tests claim those numbers only when this is true (the kernel lab VM
/// measures the plug itself).
///
/// # Panics
/// When the probe fails for another reason than a missing module (no root, no namespace).
pub fn kernel_has_plug() -> bool {
    static HAS_PLUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS_PLUG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        match rt.block_on(katamaran::net::probe(katamaran::net::Feature::Plug)) {
            Ok(()) => true,
            Err(e) if e.is_unsupported() => false,
            Err(e) => panic!("probing the kernel for sch_plug: {e}"),
        }
    })
}

/// Runs a command to completion and turns a failure into [`LabError::Command`].
pub(crate) fn run_checked(cmd: &mut Command, what: &str) -> Result<std::process::Output, LabError> {
    let output = cmd.output().map_err(|source| LabError::Spawn { command: what.to_owned(), source })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: what.to_owned(),
            status: output.status,
            stderr: tail(&output.stderr, 20),
        });
    }
    Ok(output)
}

/// The last `lines` lines of some output, for error messages.
pub(crate) fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The guest image: `vmlinuz` and `initramfs.img` in [`guest_dir`], built with
/// `hack/guest/build.sh` when absent.
///
/// An image that exists is used as it is: `hack/test.sh` (what CI runs) rebuilds it before the
/// tests, and running the script from a test would wait on the shared cargo lock.
///
/// # Errors
/// `Ok(Err(Skip))` when the image is absent and there is no build script in this checkout;
/// `Err` when the build script fails.
pub fn ensure_guest_image() -> Result<Result<PathBuf, Skip>, LabError> {
    let dir = guest_dir();
    let ready = |d: &Path| d.join("vmlinuz").is_file() && d.join("initramfs.img").is_file();
    if ready(&dir) {
        return Ok(Ok(dir));
    }
    let script = workspace_root().join("hack/guest/build.sh");
    if !script.is_file() {
        return Ok(Err(Skip(format!("no guest image in {} and no {}", dir.display(), script.display()))));
    }
    let mut cmd = Command::new("bash");
    without_package_env(&mut cmd);
    cmd.arg(&script).arg("--out").arg(&dir).current_dir(workspace_root());
    run_checked(&mut cmd, "hack/guest/build.sh")?;
    if !ready(&dir) {
        return Err(LabError::Missing { what: "the guest image", path: dir });
    }
    Ok(Ok(dir))
}

/// A `cargo` command for a build a test starts, in the environment of the shell that ran the
/// tests.
///
/// Cargo gives a running test its package's variables (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …).
/// Build scripts that read one of them (ring's reads `CARGO_MANIFEST_DIR`) are fingerprinted
/// with its value, so a build inheriting them from a test of one package redoes most of the
/// release build that `hack/test.sh` made beforehand, and again for a test of another package:
/// minutes of a lab test's budget each time.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    without_package_env(&mut cmd);
    cmd
}

/// Removes from `cmd`'s environment the variables cargo sets for one package's test or build
/// script, keeping the caller's own (`CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_INCREMENTAL`, …).
pub fn without_package_env(cmd: &mut Command) {
    const EXACT: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    const PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_BIN_EXE_"];
    for (key, _) in std::env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        if EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
}

/// Builds a binary of the workspace into [`target_dir`] (debug profile) and returns its path.
///
/// # Errors
/// When cargo fails or does not produce the binary.
pub fn build_bin(package: &str, bin: &str) -> Result<PathBuf, LabError> {
    let target = target_dir();
    let mut cmd = cargo_command();
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(workspace_root());
    run_checked(&mut cmd, &format!("cargo build -p {package} --bin {bin}"))?;
    let path = target.join("debug").join(bin);
    if !path.is_file() {
        return Err(LabError::Missing { what: "a binary cargo should have built", path });
    }
    Ok(path)
}

/// The probe binary (`KMR_PROBE` or built from the workspace).
///
/// # Errors
/// When it cannot be built.
pub fn probe_bin() -> Result<PathBuf, LabError> {
    match std::env::var_os("KMR_PROBE") {
        Some(p) => Ok(PathBuf::from(p)),
        None => build_bin("katamaran-probe", "katamaran-probe"),
    }
}

/// The guest tool that also runs on the host (`disk-check`, `disk-compare`): the static build
/// that `hack/guest/build.sh` made, else a host build.
///
/// # Errors
/// When it cannot be built.
pub fn guest_tool() -> Result<PathBuf, LabError> {
    if let Some(p) = std::env::var_os("KMR_GUEST_TOOL") {
        return Ok(PathBuf::from(p));
    }
    let static_build = target_dir().join("x86_64-unknown-linux-gnu/release/katamaran-guest");
    if static_build.is_file() {
        return Ok(static_build);
    }
    build_bin("katamaran-guest-agent", "katamaran-guest")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cargo runs this test with its package's variables set; a build the test starts must not
    /// see them, and must still see the caller's own.
    #[test]
    fn builds_started_by_a_test_do_not_inherit_its_package_variables() {
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some(), "cargo sets CARGO_MANIFEST_DIR for tests");
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some(), "cargo sets CARGO_PKG_NAME for tests");
        let mut cmd = Command::new("env");
        without_package_env(&mut cmd);
        let out = cmd.env("KMR_CALLER_OWN", "kept").output().expect("run env");
        let env = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = env.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
        for gone in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "CARGO_PKG_VERSION", "CARGO_CRATE_NAME"] {
            assert!(!names.contains(&gone), "{gone} reaches the build: {names:?}");
        }
        assert!(
            names.iter().all(|n| !n.starts_with("CARGO_PKG_")),
            "a CARGO_PKG_ variable reaches the build"
        );
        assert!(
            names.contains(&"PATH") && names.contains(&"KMR_CALLER_OWN"),
            "the caller's variables stay: {names:?}"
        );
    }
}
