//! The guest of a run: its sandbox and VM on node-a, and the dirty-memory workload.
//!
//! The guest image starts `katamaran-guest dirty-mem` nowhere: `/init` reads no parameter for
//! it and the lab's serial console is a log file, not a shell. Without changing the image, the
//! only way in is the kernel command line: `rdinit=/bin/sh -- -c "…"` makes a shell PID 1 that
//! mounts devtmpfs (a background job needs `/dev/null`), starts the workload in the background
//! once the guest's HTTP service is ready, and `exec`s the image's own `/init`, which then runs
//! exactly as usual. `lab.sh vm` has no flag for extra kernel parameters, so
//! `qemu-append.sh` (next to this crate's manifest) is given to it as `KMR_QEMU`: it appends
//! them to `-append` and `exec`s the real QEMU (same pid, same command line otherwise).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use katamaran_e2e::{agents, reports, Disks, Lab, LabConfig, Node, SandboxPaths, VmOptions};
use katamaran_guest::dirty;

use crate::cases::{dirty_working_set_mib, Case, Storage, Workload};

/// The sandbox id of every run (each run has a lab of its own).
pub const ID: &str = "bench0";
/// The pod's IPv4 address.
pub const IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
/// The pod's IPv6 address (dual stack, as the lab's demo).
pub const IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10);
/// node-b's IPv6 address on the cluster network (`docs/LAB.md`).
pub const NODE_B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x12);
/// The probe's target: the guest's UDP echo.
pub const PROBE_TARGET: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(IP), 7);
/// A booted guest has the workload going within a second; a loaded machine gets more.
const DIRTY_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Kernel parameters that start the dirty-memory workload (see the module doc). Words without
/// `=` after `--` are init's arguments; the quotes keep the script one argument.
pub fn dirty_append(working_set_mib: u32, rate_mib_per_s: u32) -> String {
    format!(
        "rdinit=/bin/sh -- -c \"mount -t devtmpfs devtmpfs /dev; \
         (while [ ! -e /run/katamaran/ready/http ]; do sleep 1; done; \
         exec /bin/katamaran-guest dirty-mem --mb {working_set_mib} --rate-mb-per-s {rate_mib_per_s} \
         >/dev/console 2>&1)& exec /init\""
    )
}

/// How the guest is started.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// `qemu-append.sh`.
    pub qemu_wrapper: PathBuf,
    /// The dirty workload's rate, MiB/s.
    pub dirty_rate_mib_per_s: u32,
}

/// The VM options of a case (one disk, shared or local).
pub fn vm_options(case: &Case, incoming: bool) -> VmOptions {
    VmOptions {
        mem_mib: case.mem_mib,
        disks: match case.storage {
            Storage::Shared => Disks::Shared(1),
            Storage::Local => Disks::Local(1),
        },
        incoming,
        ..VmOptions::default()
    }
}

/// A fresh lab of its own. Labs take turns (the lab lock): a test suite running at the same
/// time delays the run, which is logged, not measured.
///
/// # Errors
/// When the lab cannot be brought up.
pub fn lab_up() -> anyhow::Result<Lab> {
    let asked = Instant::now();
    let (lab, up) = Lab::up(LabConfig::unique())?;
    let waited = asked.elapsed().saturating_sub(up);
    if waited > Duration::from_secs(1) {
        tracing::info!("waited {:.1} s for the lab lock (another lab was running)", waited.as_secs_f64());
    }
    Ok(lab)
}

/// Creates the sandbox on node-a and boots the guest; with the dirty workload, also waits until
/// the guest reports it running.
///
/// # Errors
/// When the lab fails or the workload does not start in time.
pub fn start(lab: &Lab, case: &Case, cfg: &GuestConfig) -> anyhow::Result<SandboxPaths> {
    let paths = lab.sandbox(Node::A, ID, IP, Some(IP6))?;
    let opts = vm_options(case, false);
    match case.workload {
        Workload::Idle => {
            lab.vm(Node::A, ID, &opts)?;
        }
        Workload::Dirty => {
            let append = dirty_append(dirty_working_set_mib(case.mem_mib), cfg.dirty_rate_mib_per_s);
            let disks = match case.storage {
                Storage::Shared => "shared:1",
                Storage::Local => "local:1",
            };
            let mem = case.mem_mib.to_string();
            let out = lab
                .command()
                .args(["vm", Node::A.name(), ID, "--mem", &mem, "--disks", disks])
                .env("KMR_QEMU", &cfg.qemu_wrapper)
                .env("KMR_BENCH_APPEND", &append)
                .output()
                .context("cannot run lab.sh vm")?;
            if !out.status.success() {
                bail!("lab.sh vm (dirty workload) failed: {}", tail(&out.stderr, 15));
            }
            wait_for_line(&paths.console, dirty::PREFIX, DIRTY_START_TIMEOUT)?;
            // The workload allocates its working set zeroed (zero pages cost QEMU nearly
            // nothing) and then dirties it page by page at the given rate: let it make one full
            // pass, so every page of the working set holds data when the migration starts.
            let ws = f64::from(dirty_working_set_mib(case.mem_mib));
            std::thread::sleep(Duration::from_secs_f64(ws / f64::from(cfg.dirty_rate_mib_per_s.max(1))));
        }
    }
    Ok(paths)
}

/// Records what the guest's console on the destination shows after the move. A console that
/// cannot be read is logged and recorded as nothing.
pub fn record_health(run: &mut crate::report::Run, console: &Path, case: &Case) {
    let text = match std::fs::read(console) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(console = %console.display(), error = %e, "cannot read the destination's console");
            return;
        }
    };
    let h = reports::guest_health(&String::from_utf8_lossy(&text), case.workload == Workload::Dirty);
    if h.stale_pages.is_some_and(|n| n > 0) || h.kernel_faults > 0 {
        tracing::warn!(
            stale_pages = h.stale_pages,
            kernel_faults = h.kernel_faults,
            "the moved guest is damaged; console tail:\n{}",
            tail(&text, 8)
        );
    }
    run.set(crate::report::m::STALE_PAGES, h.stale_pages.map(|n| n as f64));
    run.set(crate::report::m::GUEST_FAULTS, Some(h.kernel_faults as f64));
}

/// Where katamaran's destination agent puts the incoming guest's console (its incoming
/// sandbox's state directory on node-b).
pub fn incoming_console(lab: &Lab) -> PathBuf {
    agents::incoming_dir(lab, Node::B, ID).join("console.log")
}

/// Waits until `needle` appears in the file at `path`.
fn wait_for_line(path: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // The console is a file QEMU appends to; nothing signals a new line, so it is re-read.
        let text = std::fs::read(path).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the guest did not print {needle:?} within {timeout:?}; console tail:\n{}",
                tail(&text, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of some output.
pub fn tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The 1-minute load average.
pub fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_append_is_one_init_argument_without_equals() {
        let a = dirty_append(256, 64);
        let (kernel, init) = a.split_once(" -- ").expect("init arguments after --");
        assert_eq!(kernel, "rdinit=/bin/sh");
        let script =
            init.strip_prefix("-c \"").and_then(|s| s.strip_suffix('"')).expect("one quoted argument");
        // The kernel splits `name=value` words into parameters and would mangle the script.
        assert!(!script.contains('=') && !script.contains('"'), "{script}");
        assert!(script.contains("dirty-mem --mb 256 --rate-mb-per-s 64"), "{script}");
        assert!(script.ends_with("exec /init"), "{script}");
    }
}
