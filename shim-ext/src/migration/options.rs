//! The typed options of one migration: the same struct behind the CLI flags and the RPC.
//!
//! Zero values on the wire mean "engine default"; here every field is explicit, and the defaults
//! say where they come from.

use std::net::IpAddr;
use std::time::Duration;

/// Where the VM's disks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageMode {
    /// Both nodes see the same files (Ceph, NFS): no storage phase.
    Shared,
    /// Node-local disks: the destination exports empty images over NBD and the source mirrors.
    Local,
}

/// How the source node forwards the VM's traffic once the VM stopped there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelMode {
    /// IPIP for an IPv4 VM, ip6ip6 for an IPv6 VM.
    Auto,
    /// IPv4 in IPv4 (`ipip`).
    Ipip,
    /// GRE over IPv4 (`ip_gre`).
    Gre,
    /// IPv6 in IPv6 (`ip6_tunnel`).
    Ip6ip6,
    /// GRE over IPv6 (`ip6_gre`).
    Ip6gre,
    /// No tunnel: a next-hop route to the destination node on a shared L2 segment. For kernels
    /// without tunnel modules.
    Route,
}

impl TunnelMode {
    /// The concrete mode for a VM with these addresses between nodes of this family: one
    /// tunnel carries every VM address, so a dual-stack VM needs GRE (which carries any
    /// protocol); a single-family VM gets the lighter IP-in-IP of its family.
    pub fn resolve(self, vms: &[IpAddr], nodes_v6: bool) -> TunnelMode {
        if self != TunnelMode::Auto {
            return self;
        }
        let all_v4 = vms.iter().all(IpAddr::is_ipv4);
        let all_v6 = vms.iter().all(IpAddr::is_ipv6);
        match (nodes_v6, all_v4, all_v6) {
            (false, true, _) => TunnelMode::Ipip,
            (false, false, _) => TunnelMode::Gre,
            (true, _, true) => TunnelMode::Ip6ip6,
            (true, _, false) => TunnelMode::Ip6gre,
        }
    }

    /// Whether a VM address of `vm`'s family can travel in this mode: IP-in-IP carries its own
    /// family only (ipip IPv4, ip6ip6 IPv6); GRE and plain routes carry either.
    pub fn carries(self, vm: IpAddr) -> bool {
        match self {
            TunnelMode::Auto | TunnelMode::Route | TunnelMode::Gre | TunnelMode::Ip6gre => true,
            TunnelMode::Ipip => vm.is_ipv4(),
            TunnelMode::Ip6ip6 => vm.is_ipv6(),
        }
    }

    /// Whether the tunnel's outer header is IPv6, i.e. the node addresses must be IPv6.
    pub fn outer_is_v6(self) -> Option<bool> {
        match self {
            TunnelMode::Ipip | TunnelMode::Gre => Some(false),
            TunnelMode::Ip6ip6 | TunnelMode::Ip6gre => Some(true),
            TunnelMode::Auto | TunnelMode::Route => None,
        }
    }

    /// The name used on command lines and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelMode::Auto => "auto",
            TunnelMode::Ipip => "ipip",
            TunnelMode::Gre => "gre",
            TunnelMode::Ip6ip6 => "ip6ip6",
            TunnelMode::Ip6gre => "ip6gre",
            TunnelMode::Route => "route",
        }
    }
}

impl std::str::FromStr for TunnelMode {
    type Err = OptionsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => TunnelMode::Auto,
            "ipip" => TunnelMode::Ipip,
            "gre" => TunnelMode::Gre,
            "ip6ip6" => TunnelMode::Ip6ip6,
            "ip6gre" => TunnelMode::Ip6gre,
            "route" => TunnelMode::Route,
            other => {
                return Err(OptionsError::Invalid {
                    field: "tunnel-mode",
                    detail: format!("{other:?} is not one of auto, ipip, gre, ip6ip6, ip6gre, route"),
                })
            }
        })
    }
}

/// Options of one migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOptions {
    /// Shared or node-local disks.
    pub storage: StorageMode,
    /// The downtime QEMU may plan for the final stop-and-copy.
    pub downtime_limit: Duration,
    /// Raise the limit from the measured round trip and when RAM does not converge.
    pub auto_downtime: bool,
    /// Bandwidth cap in bytes per second; `None` is uncapped.
    pub max_bandwidth: Option<u64>,
    /// QEMU multifd channels; `None` is a single stream.
    pub multifd_channels: Option<u8>,
    /// QEMU's auto-converge (throttles vCPUs that dirty memory faster than it can be sent).
    pub auto_converge: bool,
    /// Forwarding mode at cutover.
    pub tunnel_mode: TunnelMode,
    /// Forwarding is removed once it has carried no traffic for this long; zero: never.
    pub tunnel_idle_timeout: Duration,
    /// Bytes the destination plug may hold; `None` derives it from rate and blackout.
    pub plug_limit: Option<u32>,
    /// Deadline for every disk mirror to become ready.
    pub storage_timeout: Duration,
    /// Deadline for RAM pre-copy to complete.
    pub ram_timeout: Duration,
    /// RAM and disk contents cross the network unencrypted (authenticated by the stream secret
    /// only); by default both QEMUs run TLS on every data stream.
    pub plain_streams: bool,
}

/// katamaran's default downtime limit: tight enough that a TCP peer sees one retransmit at most.
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(25);
/// The longest downtime limit accepted; QEMU allows 2000 s, but a limit past 10 s is a mistake.
pub const MAX_DOWNTIME_LIMIT: Duration = Duration::from_secs(10);
/// Default idle time before forwarding is removed: none (zero). The forward stays while it is
/// the only path to the VM — a quiet service must stay reachable — and ends when the node's
/// route to the VM is taken over, or on ReleaseForward (DESIGN.md decision 5).
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::ZERO;
/// Default storage deadline.
pub const DEFAULT_STORAGE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default RAM deadline.
pub const DEFAULT_RAM_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// QEMU's multifd channel count is a u8 with 1..=255; past 64 there is no gain on any NIC.
pub const MAX_MULTIFD_CHANNELS: u8 = 64;

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            storage: StorageMode::Local,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            auto_downtime: false,
            max_bandwidth: None,
            multifd_channels: None,
            auto_converge: true,
            tunnel_mode: TunnelMode::Auto,
            tunnel_idle_timeout: DEFAULT_TUNNEL_IDLE_TIMEOUT,
            plug_limit: None,
            storage_timeout: DEFAULT_STORAGE_TIMEOUT,
            ram_timeout: DEFAULT_RAM_TIMEOUT,
            plain_streams: false,
        }
    }
}

/// A rejected option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    /// An option value out of range or of the wrong family.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// The option as the CLI spells it.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

fn invalid(field: &'static str, detail: impl Into<String>) -> OptionsError {
    OptionsError::Invalid { field, detail: detail.into() }
}

impl MigrationOptions {
    /// Checks ranges, and that the tunnel mode can carry the VM's addresses between these nodes.
    ///
    /// # Errors
    /// [`OptionsError::Invalid`] naming the option.
    pub fn validate(
        &self,
        vm_addrs: &[IpAddr],
        node_addrs: Option<(IpAddr, IpAddr)>,
    ) -> Result<(), OptionsError> {
        if self.downtime_limit < Duration::from_millis(1) || self.downtime_limit > MAX_DOWNTIME_LIMIT {
            return Err(invalid(
                "downtime",
                format!("{:?} is outside 1ms..={:?}", self.downtime_limit, MAX_DOWNTIME_LIMIT),
            ));
        }
        if let Some(n) = self.multifd_channels {
            if n == 0 || n > MAX_MULTIFD_CHANNELS {
                return Err(invalid(
                    "multifd-channels",
                    format!("{n} is outside 1..={MAX_MULTIFD_CHANNELS}"),
                ));
            }
        }
        if self.max_bandwidth == Some(0) {
            return Err(invalid("bandwidth", "0 bytes/s would never finish; omit it for uncapped"));
        }
        if !self.tunnel_idle_timeout.is_zero()
            && (self.tunnel_idle_timeout < Duration::from_secs(1)
                || self.tunnel_idle_timeout > Duration::from_secs(24 * 3600))
        {
            return Err(invalid(
                "tunnel-idle-timeout",
                format!("{:?} is outside 1s..=24h (0: never, the default)", self.tunnel_idle_timeout),
            ));
        }
        if let Some(limit) = self.plug_limit {
            if limit < 64 * 1024 {
                return Err(invalid(
                    "plug-limit",
                    format!("{limit} bytes is below 64 KiB and drops under load"),
                ));
            }
        }
        for (field, t) in [("storage-timeout", self.storage_timeout), ("ram-timeout", self.ram_timeout)] {
            if t.is_zero() {
                return Err(invalid(field, "must be positive"));
            }
        }
        let nodes_v6 = node_addrs.is_some_and(|(src, _)| src.is_ipv6());
        let mode = self.tunnel_mode.resolve(vm_addrs, nodes_v6);
        for vm in vm_addrs {
            if !mode.carries(*vm) {
                return Err(invalid(
                    "tunnel-mode",
                    format!("{} cannot carry the VM address {vm} (wrong family)", mode.as_str()),
                ));
            }
            if let (Some(v6), Some((src, dst))) = (mode.outer_is_v6(), node_addrs) {
                if src.is_ipv6() != v6 || dst.is_ipv6() != v6 {
                    return Err(invalid(
                        "tunnel-mode",
                        format!(
                            "{} needs IPv{} node addresses, got {src} and {dst}",
                            mode.as_str(),
                            if v6 { 6 } else { 4 }
                        ),
                    ));
                }
            }
        }
        if let Some((src, dst)) = node_addrs {
            if src == dst {
                return Err(invalid(
                    "destination",
                    format!("source and destination are the same node ({src})"),
                ));
            }
        }
        Ok(())
    }
}

/// The downtime limit to ask QEMU for, given the measured round trip to the destination.
///
/// The final stop-and-copy cannot be shorter than sending the last dirty pages plus the device
/// state and hearing back; QEMU's estimate ignores latency. Three round trips plus 5 ms of device
/// state is the floor used; the user's limit wins when it is larger; the result never exceeds
/// [`MAX_DOWNTIME_LIMIT`].
pub fn downtime_from_rtt(requested: Duration, rtt: Duration) -> Duration {
    let floor = rtt.saturating_mul(3) + Duration::from_millis(5);
    requested.max(floor).min(MAX_DOWNTIME_LIMIT)
}

/// The next downtime limit when RAM pre-copy does not converge with `auto_downtime`.
///
/// `remaining` holds the bytes left after each dirty-sync pass, oldest first. When the last three
/// passes did not shrink the remainder by at least 10 %, the limit doubles (capped), so a guest that
/// dirties memory faster than the link drains it still finishes, with the downtime it needs
/// reported rather than a migration that never ends.
pub fn next_downtime_limit(current: Duration, remaining: &[u64]) -> Option<Duration> {
    let n = remaining.len();
    if n < 4 || current >= MAX_DOWNTIME_LIMIT {
        return None;
    }
    let before = remaining[n - 4];
    let stalled = remaining[n - 3..].iter().all(|&r| r.saturating_mul(10) > before.saturating_mul(9));
    stalled.then(|| current.saturating_mul(2).min(MAX_DOWNTIME_LIMIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn defaults_are_valid_for_both_families() {
        let o = MigrationOptions::default();
        assert_eq!(o.downtime_limit, Duration::from_millis(25));
        o.validate(&[ip("10.244.1.10")], Some((ip("10.0.0.1"), ip("10.0.0.2")))).expect("v4");
        o.validate(&[ip("fd00::10")], Some((ip("fd00::1"), ip("fd00::2")))).expect("v6");
        o.validate(&[ip("10.244.1.10"), ip("fd00::10")], Some((ip("10.0.0.1"), ip("10.0.0.2"))))
            .expect("dual stack over IPv4 nodes");
    }

    #[test]
    fn rejections_name_the_option() {
        let v4 = [ip("10.244.1.10")];
        let v6 = [ip("fd00::10")];
        let nodes4 = Some((ip("10.0.0.1"), ip("10.0.0.2")));
        type Case<'a> = (MigrationOptions, &'a [IpAddr], Option<(IpAddr, IpAddr)>, &'a str);
        let table: Vec<Case<'_>> = vec![
            (
                MigrationOptions { downtime_limit: Duration::ZERO, ..Default::default() },
                &v4,
                nodes4,
                "invalid downtime",
            ),
            (
                MigrationOptions { downtime_limit: Duration::from_secs(60), ..Default::default() },
                &v4,
                nodes4,
                "invalid downtime",
            ),
            (
                MigrationOptions { multifd_channels: Some(0), ..Default::default() },
                &v4,
                nodes4,
                "invalid multifd-channels",
            ),
            (
                MigrationOptions { multifd_channels: Some(200), ..Default::default() },
                &v4,
                nodes4,
                "invalid multifd-channels",
            ),
            (
                MigrationOptions { max_bandwidth: Some(0), ..Default::default() },
                &v4,
                nodes4,
                "invalid bandwidth",
            ),
            (
                MigrationOptions { plug_limit: Some(32 * 1024), ..Default::default() },
                &v4,
                nodes4,
                "invalid plug-limit",
            ),
            (
                MigrationOptions { tunnel_idle_timeout: Duration::from_millis(500), ..Default::default() },
                &v4,
                nodes4,
                "invalid tunnel-idle-timeout",
            ),
            (
                MigrationOptions { ram_timeout: Duration::ZERO, ..Default::default() },
                &v4,
                nodes4,
                "invalid ram-timeout",
            ),
            (
                MigrationOptions { tunnel_mode: TunnelMode::Ipip, ..Default::default() },
                &v6,
                None,
                "ipip cannot carry the VM address fd00::10",
            ),
            (
                MigrationOptions { tunnel_mode: TunnelMode::Ip6ip6, ..Default::default() },
                &v4,
                None,
                "ip6ip6 cannot carry",
            ),
            (
                MigrationOptions { tunnel_mode: TunnelMode::Gre, ..Default::default() },
                &v4,
                Some((ip("fd00::1"), ip("fd00::2"))),
                "gre needs IPv4 node addresses",
            ),
            (MigrationOptions::default(), &v4, Some((ip("10.0.0.1"), ip("10.0.0.1"))), "same node"),
        ];
        for (opts, vms, nodes, want) in table {
            let err = opts.validate(vms, nodes).expect_err(want).to_string();
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
    }

    #[test]
    fn tunnel_modes() {
        let (v4, v6) = (ip("10.0.0.1"), ip("fd00::1"));
        assert_eq!(TunnelMode::Auto.resolve(&[v4], false), TunnelMode::Ipip);
        assert_eq!(TunnelMode::Auto.resolve(&[v6], true), TunnelMode::Ip6ip6);
        assert_eq!(TunnelMode::Auto.resolve(&[v4, v6], false), TunnelMode::Gre, "dual stack over IPv4");
        assert_eq!(TunnelMode::Auto.resolve(&[v4, v6], true), TunnelMode::Ip6gre, "dual stack over IPv6");
        assert_eq!(TunnelMode::Auto.resolve(&[v6], false), TunnelMode::Gre, "IPv6 VM over IPv4 nodes");
        assert_eq!(TunnelMode::Gre.resolve(&[v6], true), TunnelMode::Gre, "explicit modes stand");
        assert!(TunnelMode::Ip6gre.carries(v4) && TunnelMode::Gre.carries(v6));
        assert!(!TunnelMode::Ipip.carries(v6) && !TunnelMode::Ip6ip6.carries(v4));
        for s in ["auto", "ipip", "gre", "ip6ip6", "ip6gre", "route"] {
            assert_eq!(s.parse::<TunnelMode>().expect(s).as_str(), s);
        }
        let err = "vxlan".parse::<TunnelMode>().expect_err("unknown").to_string();
        assert!(err.contains("tunnel-mode") && err.contains("vxlan"), "{err}");
    }

    #[test]
    fn downtime_from_round_trip() {
        let ms = Duration::from_millis;
        assert_eq!(downtime_from_rtt(ms(25), Duration::from_micros(200)), ms(25), "LAN: the request stands");
        assert_eq!(downtime_from_rtt(ms(25), ms(10)), ms(35), "3 RTT + 5 ms");
        assert_eq!(downtime_from_rtt(ms(100), ms(10)), ms(100), "a larger request wins");
        assert_eq!(downtime_from_rtt(ms(25), Duration::from_secs(20)), MAX_DOWNTIME_LIMIT);
    }

    #[test]
    fn downtime_raised_only_when_stalled() {
        let ms = Duration::from_millis;
        assert_eq!(next_downtime_limit(ms(25), &[100, 90, 80]), None, "too few passes");
        assert_eq!(next_downtime_limit(ms(25), &[1000, 500, 250, 100]), None, "converging");
        assert_eq!(next_downtime_limit(ms(25), &[1000, 980, 990, 970]), Some(ms(50)), "stalled");
        assert_eq!(next_downtime_limit(ms(25), &[1000, 1000, 1000, 800]), None, "last pass shrank 20 %");
        assert_eq!(next_downtime_limit(Duration::from_secs(8), &[9, 9, 9, 9]), Some(MAX_DOWNTIME_LIMIT));
        assert_eq!(next_downtime_limit(MAX_DOWNTIME_LIMIT, &[9, 9, 9, 9]), None);
    }
}
