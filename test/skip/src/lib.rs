//! The one way a test says it did not test its subject.
//!
//! A test that needs something this machine lacks (root, QEMU, containerd, a kernel module)
//! calls [`skip`] and returns. [`skip`] prints `skipped: <why>` on stdout (what a person running
//! `--no-capture` reads, and what the kernel lab's suite counts) and, when `KMR_SKIP_LOG` names a
//! file, appends one line to it:
//!
//! ```text
//! <binary id> <test name>\t<tier>\t<why>
//! ```
//!
//! `hack/test.sh` sets `KMR_SKIP_LOG`, prints every line at the end of the run and fails when a
//! tier CI is meant to run was skipped (docs/TESTING.md, "What CI may skip"). nextest hides the
//! output of passing tests; the log is how a skip still reaches CI's output.

use std::fmt;
use std::io::Write;

/// The environment variable naming the skip log.
pub const LOG_ENV: &str = "KMR_SKIP_LOG";

/// What a skipped test needed: the test tiers of docs/TESTING.md, plus the two things whose
/// absence is expected on CI's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Loopback servers over IPv6 (tier 2): a loopback without `::1`.
    Ipv6,
    /// Privileged network namespaces (tier 3): root, `/dev/net/tun`.
    Netns,
    /// The host's cgroups (tier 3): root and a mounted cgroupfs.
    Cgroup,
    /// One real QEMU (tier 4): `qemu-system-x86_64`.
    Qemu,
    /// The two-node lab (tier 5): root, QEMU, the lab's tools, the guest image.
    Lab,
    /// The kernel lab VM (tier 6): QEMU and Debian's kernel packages.
    KernelLab,
    /// Real containerd (tier 7): root, containerd, runc.
    Containerd,
    /// A kernel module the host kernel lacks (`sch_plug`, `ipip`, `ip_gre`, `ip6_tunnel`,
    /// `ip6_gre`); the kernel lab VM exercises it. Expected on CI's kernel.
    KernelModule,
    /// `kubectl` on `PATH` (tier 8's plugin test); `hack/deps.sh` does not install it.
    Kubectl,
}

impl Tier {
    /// The name `hack/test.sh` and `KMR_ALLOW_SKIP` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipv6 => "ipv6",
            Self::Netns => "netns",
            Self::Cgroup => "cgroup",
            Self::Qemu => "qemu",
            Self::Lab => "lab",
            Self::KernelLab => "kernel-lab",
            Self::Containerd => "containerd",
            Self::KernelModule => "kernel-module",
            Self::Kubectl => "kubectl",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Says that the running test skipped (part of) its subject because `tier`'s prerequisite is
/// missing: prints `skipped: <why>` and records it in `$KMR_SKIP_LOG` when that is set.
///
/// # Panics
/// When `$KMR_SKIP_LOG` is set and cannot be appended to: a skip that cannot be recorded would
/// be hidden, so the test fails instead.
pub fn skip(tier: Tier, why: impl fmt::Display) {
    let why = why.to_string();
    println!("skipped: {why}");
    let Some(log) = std::env::var_os(LOG_ENV).filter(|v| !v.is_empty()) else { return };
    let line = record(&test_name(), tier, &why);
    // One write of a short line to a file opened for appending: lines of parallel tests do not
    // interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(e) = written {
        panic!("cannot record the skip in {LOG_ENV}={}: {e}", log.to_string_lossy());
    }
}

/// The log line: tabs and newlines in any field become spaces, so a line is one record.
fn record(test: &str, tier: Tier, why: &str) -> String {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    format!("{}\t{tier}\t{}\n", clean(test), clean(why))
}

/// `<binary id> <test name>` under nextest (which sets both), else the name libtest gives the
/// test's thread.
fn test_name() -> String {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let binary = var("NEXTEST_BINARY_ID")
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.file_name()?.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "?".into());
    let test = var("NEXTEST_TEST_NAME")
        .or_else(|| std::thread::current().name().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    format!("{binary} {test}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_line_of_three_tab_separated_fields() {
        let line = record("katamaran-shim-ext::net_netns plug", Tier::KernelModule, "no\tsch_plug\n(lab)");
        assert_eq!(line, "katamaran-shim-ext::net_netns plug\tkernel-module\tno sch_plug (lab)\n");
    }

    #[test]
    fn skip_appends_to_the_log_named_by_the_environment() {
        let dir = std::env::temp_dir().join(format!("kmr-skip-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.tsv");
        // Only this test sets the variable, and each nextest test is its own process.
        std::env::set_var(LOG_ENV, &log);
        skip(Tier::Qemu, "qemu-system-x86_64 is not installed");
        skip(Tier::Netns, "needs root");
        std::env::remove_var(LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let fields: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(fields.len(), 2, "{text}");
        assert!(fields[0][0].contains("skip_appends_to_the_log"), "{text}");
        assert_eq!(fields[0][1..], ["qemu", "qemu-system-x86_64 is not installed"]);
        assert_eq!(fields[1][1..], ["netns", "needs root"]);
    }
}
