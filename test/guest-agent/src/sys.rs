//! Facts about the running system, read from `/proc`, with fallbacks so the agent also works
//! (and is testable) outside a guest.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// The value of `key=value` on a kernel command line.
pub fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

/// The running kernel's command line (empty when unreadable).
pub fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// The host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The kernel's boot id: changes on every boot, so it shows a migrated guest was not rebooted.
pub fn kernel_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Time since the kernel booted, ms (from `/proc/uptime`).
pub fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1e3) as u64)
}

/// Wall clock, ns since the Unix epoch (0 if the clock is before 1970).
pub fn wallclock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// 16 random bytes from the kernel, with a clock-and-pid fallback (ids only need to differ).
pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id)).is_ok() {
        return id;
    }
    id[..8].copy_from_slice(&wallclock_ns().to_le_bytes());
    id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_command_line_parameters() {
        let cmdline = "console=ttyS0 katamaran.id=web-0 katamaran.ip=10.0.0.5/32 katamaran.idx=9 quiet\n";
        assert_eq!(cmdline_param(cmdline, "katamaran.id"), Some("web-0".into()));
        assert_eq!(cmdline_param(cmdline, "katamaran.ip"), Some("10.0.0.5/32".into()));
        assert_eq!(cmdline_param(cmdline, "katamaran.gw"), None);
        assert_eq!(cmdline_param(cmdline, "quiet"), None);
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_id(), random_id());
    }
}
