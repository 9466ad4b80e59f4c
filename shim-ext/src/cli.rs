//! Command-line pieces shared by `katactl` and `kubectl-migrate`: the migration flags (one
//! definition, so both binaries spell and validate them the same way) and duration parsing.

use std::time::Duration;

use crate::migration::options::{MigrationOptions, StorageMode, TunnelMode};

/// Parses `250ms`, `2s`, `1.5s`, `5m`, `1h`, `100us`; a bare number is milliseconds.
///
/// # Errors
/// A message naming the value and the accepted units.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 25ms, 2s, 5m)"))?;
    let scale = match unit {
        "" | "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use us, ms, s, m or h)")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte rate: `0` or `unlimited` (returned as 0), or a number with optional `K`, `M`, `G` (powers of
/// 1024) and optional `B/s` / `/s` suffix, e.g. `500M`, `1G`, `125000000`.
///
/// # Errors
/// A message naming the value.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let t = t.trim_end_matches("/s").trim_end_matches(['B', 'b']);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a bandwidth (e.g. 500M, 1G, unlimited)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is out of range"))
}

/// The migration flags, shared by every client.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateFlags {
    /// Disks are on storage both nodes see (Ceph, NFS): skip the NBD mirror.
    #[arg(long)]
    pub shared_storage: bool,
    /// Longest pause QEMU may plan for the final stop-and-copy.
    #[arg(long, value_parser = parse_duration, default_value = "25ms", value_name = "DURATION")]
    pub downtime: Duration,
    /// Raise the downtime limit from the measured round trip, and when RAM does not converge.
    #[arg(long)]
    pub auto_downtime: bool,
    /// Bandwidth cap for RAM and disk streams (e.g. 500M, 1G); uncapped by default.
    #[arg(long, value_parser = parse_bandwidth, value_name = "RATE")]
    pub bandwidth: Option<u64>,
    /// Parallel RAM channels (QEMU multifd); off by default.
    #[arg(long, value_name = "N")]
    pub multifd_channels: Option<u8>,
    /// Do not let QEMU throttle vCPUs that dirty memory faster than it can be sent.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Forwarding at cutover: auto (ipip for IPv4, ip6ip6 for IPv6), ipip, gre, ip6ip6, ip6gre,
    /// or route (plain next hop on a shared L2, for kernels without tunnel modules).
    #[arg(long, default_value = "auto", value_name = "MODE")]
    pub tunnel_mode: TunnelMode,
    /// Remove the forwarding after it carried no traffic for this long (tunnel modes; 0: never,
    /// the default). Without it the forward ends when this node's route to the VM is taken over
    /// (the cluster learned the move) or on `katactl release-forward`.
    #[arg(long, value_parser = parse_duration, default_value = "0", value_name = "DURATION")]
    pub tunnel_idle_timeout: Duration,
    /// Bytes the destination may hold while the VM is paused (default: sized from rate and
    /// expected blackout).
    #[arg(long, value_name = "BYTES")]
    pub plug_limit: Option<u32>,
    /// Deadline for the disk mirror to reach sync.
    #[arg(long, value_parser = parse_duration, default_value = "30m", value_name = "DURATION")]
    pub storage_timeout: Duration,
    /// Deadline for RAM pre-copy.
    #[arg(long, value_parser = parse_duration, default_value = "30m", value_name = "DURATION")]
    pub ram_timeout: Duration,
    /// Send guest RAM and disk contents unencrypted, for networks where nobody else can read or
    /// alter node-to-node traffic. By default both QEMUs run TLS on every data stream with
    /// credentials made for this migration; either way the streams are authenticated.
    #[arg(long)]
    pub plain_streams: bool,
}

impl MigrateFlags {
    /// The typed options (validated later, once addresses are known).
    pub fn options(&self) -> MigrationOptions {
        MigrationOptions {
            storage: if self.shared_storage { StorageMode::Shared } else { StorageMode::Local },
            downtime_limit: self.downtime,
            auto_downtime: self.auto_downtime,
            max_bandwidth: self.bandwidth.filter(|&b| b > 0),
            multifd_channels: self.multifd_channels,
            auto_converge: !self.no_auto_converge,
            tunnel_mode: self.tunnel_mode,
            tunnel_idle_timeout: self.tunnel_idle_timeout,
            plug_limit: self.plug_limit,
            storage_timeout: self.storage_timeout,
            ram_timeout: self.ram_timeout,
            plain_streams: self.plain_streams,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        let ok = [
            ("25ms", Duration::from_millis(25)),
            ("25", Duration::from_millis(25)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("5m", Duration::from_secs(300)),
            ("100us", Duration::from_micros(100)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for bad in ["", "fast", "10 parsecs", "-5ms", "1e400s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{:?}", bad.trim())), "{bad}: {err}");
        }
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("unlimited"), Ok(0));
        assert_eq!(parse_bandwidth("0"), Ok(0));
        assert_eq!(parse_bandwidth("500M"), Ok(500 << 20));
        assert_eq!(parse_bandwidth("1GB/s"), Ok(1 << 30));
        assert_eq!(parse_bandwidth("125000000"), Ok(125_000_000));
        assert!(parse_bandwidth("lots").is_err());
        assert!(parse_bandwidth("99999999999999G").is_err());
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        flags: MigrateFlags,
    }

    #[test]
    fn defaults_and_flags_map_to_options() {
        let o = Cli::try_parse_from(["x"]).expect("parse").flags.options();
        assert_eq!(o, MigrationOptions::default());
        let o = Cli::try_parse_from([
            "x",
            "--shared-storage",
            "--downtime",
            "100ms",
            "--bandwidth",
            "1G",
            "--multifd-channels",
            "4",
            "--no-auto-converge",
            "--tunnel-mode",
            "gre",
        ])
        .expect("parse")
        .flags
        .options();
        assert_eq!(o.storage, StorageMode::Shared);
        assert_eq!(o.downtime_limit, Duration::from_millis(100));
        assert_eq!(o.max_bandwidth, Some(1 << 30));
        assert_eq!(o.multifd_channels, Some(4));
        assert!(!o.auto_converge);
        assert_eq!(o.tunnel_mode, TunnelMode::Gre);
        let err = Cli::try_parse_from(["x", "--tunnel-mode", "vxlan"]).expect_err("bad mode").to_string();
        assert!(err.contains("tunnel-mode") && err.contains("vxlan"), "{err}");
        let err = Cli::try_parse_from(["x", "--downtime", "soon"]).expect_err("bad").to_string();
        assert!(err.contains("--downtime") && err.contains("soon"), "{err}");
    }
}
