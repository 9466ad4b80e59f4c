//! `spec.options`: the migration options the CLI has (shim-ext `cli::MigrateFlags`), spelled the
//! Kubernetes way. Defaults live in the schema, so `kubectl get mig -o yaml` shows the values in
//! force; [`Options::resolve`] turns the text into typed values and checks the ranges the schema's
//! CEL rules check, for clients that want to fail before the API server does.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{self, UnitsError};

/// The default downtime limit: tight enough that a TCP peer sees one retransmit at most.
pub const DEFAULT_DOWNTIME: &str = "25ms";
/// The default deadline of the storage phase and of the RAM phase.
pub const DEFAULT_PHASE_TIMEOUT: &str = "30m";
/// Downtime limits accepted: QEMU allows 2000 s, but a limit past 10 s is a mistake.
pub const DOWNTIME_RANGE: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(10));
/// Idle timeouts accepted for the forwarding.
pub const TUNNEL_IDLE_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// QEMU multifd channels accepted; past 64 there is no gain on any NIC.
pub const MULTIFD_RANGE: (u8, u8) = (1, 64);
/// The smallest plug buffer accepted: below 64 KiB it drops under load.
pub const MIN_PLUG_LIMIT_BYTES: u32 = 64 * 1024;

/// How the source node forwards the VM's traffic once the VM stopped there. The values are the
/// CLI's `--tunnel-mode` values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    /// IPIP for an IPv4 VM, ip6ip6 for an IPv6 VM, GRE for a dual-stack VM.
    #[default]
    Auto,
    /// IPv4 in IPv4.
    Ipip,
    /// GRE over IPv4.
    Gre,
    /// IPv6 in IPv6.
    Ip6ip6,
    /// GRE over IPv6.
    Ip6gre,
    /// A plain next-hop route to the destination node on a shared L2 segment (kernels without
    /// tunnel modules).
    Route,
}

impl TunnelMode {
    /// The name on command lines, in the resource and in logs.
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

/// The migration options. Durations are strings such as `25ms`, `1.5s`, `30m` (units `us`, `ms`,
/// `s`, `m`, `h`); byte rates are Kubernetes quantities such as `500Mi` or `1G`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Options {
    /// The disks are on storage both nodes see (Ceph, NFS): skip the disk mirror.
    #[serde(default)]
    pub shared_storage: bool,
    /// The longest pause QEMU may plan for the final stop-and-copy, 1ms to 10s.
    #[serde(default = "default_downtime")]
    #[schemars(length(max = 24), pattern(units::DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) >= duration('1ms') && duration(self) <= duration('10s')",
        "message": "downtime must be between 1ms and 10s"
    }]))]
    pub downtime: String,
    /// Raise the downtime limit from the measured round trip, and when RAM does not converge.
    #[serde(default)]
    pub auto_downtime: bool,
    /// Bandwidth cap for the RAM and disk streams in bytes per second (e.g. 500Mi, 1G);
    /// uncapped when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), pattern(units::BANDWIDTH_PATTERN))]
    pub bandwidth: Option<String>,
    /// Parallel RAM channels (QEMU multifd), 1 to 64; a single stream when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub multifd_channels: Option<i32>,
    /// Let QEMU throttle vCPUs that dirty memory faster than it can be sent.
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// Forwarding at cutover: auto, ipip, gre, ip6ip6, ip6gre or route.
    #[serde(default)]
    pub tunnel_mode: TunnelMode,
    /// Remove the forwarding after it carried no traffic for this long, 1s to 24h; the engine's
    /// default when omitted (docs/ENGINE.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 24), pattern(units::DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) >= duration('1s') && duration(self) <= duration('24h')",
        "message": "tunnelIdleTimeout must be between 1s and 24h"
    }]))]
    pub tunnel_idle_timeout: Option<String>,
    /// Bytes the destination may hold while the VM is paused, at least 65536; sized from packet
    /// rate and expected blackout when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 65536, max = 4294967295_i64))]
    pub plug_limit_bytes: Option<i64>,
    /// Deadline for the disk mirror to reach sync.
    #[serde(default = "default_phase_timeout")]
    #[schemars(length(max = 24), pattern(units::DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) > duration('0s')",
        "message": "storageTimeout must be positive"
    }]))]
    pub storage_timeout: String,
    /// Deadline for RAM pre-copy.
    #[serde(default = "default_phase_timeout")]
    #[schemars(length(max = 24), pattern(units::DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) > duration('0s')",
        "message": "ramTimeout must be positive"
    }]))]
    pub ram_timeout: String,
    /// Send guest RAM and disk contents unencrypted, for networks where nobody else can read or
    /// alter node-to-node traffic; by default both QEMUs run TLS on every data stream.
    #[serde(default)]
    pub plain_streams: bool,
}

fn default_downtime() -> String {
    DEFAULT_DOWNTIME.to_owned()
}

fn default_phase_timeout() -> String {
    DEFAULT_PHASE_TIMEOUT.to_owned()
}

fn default_true() -> bool {
    true
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shared_storage: false,
            downtime: default_downtime(),
            auto_downtime: false,
            bandwidth: None,
            multifd_channels: None,
            auto_converge: true,
            tunnel_mode: TunnelMode::Auto,
            tunnel_idle_timeout: None,
            plug_limit_bytes: None,
            storage_timeout: default_phase_timeout(),
            ram_timeout: default_phase_timeout(),
            plain_streams: false,
        }
    }
}

/// The options as typed values, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedOptions {
    /// Skip the disk mirror.
    pub shared_storage: bool,
    /// The downtime limit.
    pub downtime: Duration,
    /// Raise the limit from the round trip and when RAM does not converge.
    pub auto_downtime: bool,
    /// Bytes per second; `None` is uncapped.
    pub bandwidth: Option<u64>,
    /// Multifd channels; `None` is a single stream.
    pub multifd_channels: Option<u8>,
    /// QEMU's auto-converge.
    pub auto_converge: bool,
    /// Forwarding mode.
    pub tunnel_mode: TunnelMode,
    /// Forwarding idle timeout; `None` is the engine's default.
    pub tunnel_idle_timeout: Option<Duration>,
    /// Plug buffer in bytes; `None` is sized by the engine.
    pub plug_limit: Option<u32>,
    /// Storage phase deadline.
    pub storage_timeout: Duration,
    /// RAM phase deadline.
    pub ram_timeout: Duration,
    /// Unencrypted data streams.
    pub plain_streams: bool,
}

/// An option the API server would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A field that is not of its form.
    #[error("spec.options.{field}")]
    Form {
        /// The field, as the resource spells it.
        field: &'static str,
        /// What is wrong with the text.
        #[source]
        source: UnitsError,
    },
    /// A value outside its range.
    #[error("spec.options.{field}: {value} is outside {range}")]
    Range {
        /// The field, as the resource spells it.
        field: &'static str,
        /// The value as given.
        value: String,
        /// The accepted range.
        range: String,
    },
}

fn duration_in(
    field: &'static str,
    text: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, OptionsError> {
    let d = units::parse_duration(text).map_err(|source| OptionsError::Form { field, source })?;
    if d < min || d > max {
        return Err(OptionsError::Range {
            field,
            value: text.to_owned(),
            range: format!("{}..={}", units::format_duration(min), units::format_duration(max)),
        });
    }
    Ok(d)
}

impl Options {
    /// The typed options, checked as the schema checks them (patterns, ranges, CEL rules).
    ///
    /// # Errors
    /// [`OptionsError`] naming the first field the API server would reject.
    pub fn resolve(&self) -> Result<ResolvedOptions, OptionsError> {
        let positive = (Duration::from_nanos(1), Duration::MAX);
        let multifd_channels = match self.multifd_channels {
            None => None,
            Some(n) => Some(
                u8::try_from(n).ok().filter(|n| (MULTIFD_RANGE.0..=MULTIFD_RANGE.1).contains(n)).ok_or_else(
                    || OptionsError::Range {
                        field: "multifdChannels",
                        value: n.to_string(),
                        range: format!("{}..={}", MULTIFD_RANGE.0, MULTIFD_RANGE.1),
                    },
                )?,
            ),
        };
        let plug_limit = match self.plug_limit_bytes {
            None => None,
            Some(n) => {
                Some(u32::try_from(n).ok().filter(|n| *n >= MIN_PLUG_LIMIT_BYTES).ok_or_else(|| {
                    OptionsError::Range {
                        field: "plugLimitBytes",
                        value: n.to_string(),
                        range: format!("{MIN_PLUG_LIMIT_BYTES}..={}", u32::MAX),
                    }
                })?)
            }
        };
        Ok(ResolvedOptions {
            shared_storage: self.shared_storage,
            downtime: duration_in("downtime", &self.downtime, DOWNTIME_RANGE)?,
            auto_downtime: self.auto_downtime,
            bandwidth: self
                .bandwidth
                .as_deref()
                .map(units::parse_bandwidth)
                .transpose()
                .map_err(|source| OptionsError::Form { field: "bandwidth", source })?,
            multifd_channels,
            auto_converge: self.auto_converge,
            tunnel_mode: self.tunnel_mode,
            tunnel_idle_timeout: self
                .tunnel_idle_timeout
                .as_deref()
                .map(|t| duration_in("tunnelIdleTimeout", t, TUNNEL_IDLE_RANGE))
                .transpose()?,
            plug_limit,
            storage_timeout: duration_in("storageTimeout", &self.storage_timeout, positive)?,
            ram_timeout: duration_in("ramTimeout", &self.ram_timeout, positive)?,
            plain_streams: self.plain_streams,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_to_the_clis_defaults() {
        let r = Options::default().resolve().unwrap();
        assert_eq!(r.downtime, Duration::from_millis(25));
        assert_eq!(
            (r.storage_timeout, r.ram_timeout),
            (Duration::from_secs(1800), Duration::from_secs(1800))
        );
        assert!(r.auto_converge && !r.shared_storage && !r.auto_downtime && !r.plain_streams);
        assert_eq!(
            (r.bandwidth, r.multifd_channels, r.plug_limit, r.tunnel_idle_timeout),
            (None, None, None, None)
        );
        assert_eq!(r.tunnel_mode, TunnelMode::Auto);
        // An empty options object reads as the defaults, as the API server's defaulting makes it.
        let empty: Options = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Options::default());
    }

    #[test]
    fn every_field_resolves() {
        let o: Options = serde_json::from_value(serde_json::json!({
            "sharedStorage": true, "downtime": "100ms", "autoDowntime": true, "bandwidth": "1Gi",
            "multifdChannels": 4, "autoConverge": false, "tunnelMode": "ip6gre",
            "tunnelIdleTimeout": "5m", "plugLimitBytes": 1048576, "storageTimeout": "1h", "ramTimeout": "90s",
            "plainStreams": true
        }))
        .unwrap();
        let r = o.resolve().unwrap();
        assert_eq!(
            r,
            ResolvedOptions {
                shared_storage: true,
                downtime: Duration::from_millis(100),
                auto_downtime: true,
                bandwidth: Some(1 << 30),
                multifd_channels: Some(4),
                auto_converge: false,
                tunnel_mode: TunnelMode::Ip6gre,
                tunnel_idle_timeout: Some(Duration::from_secs(300)),
                plug_limit: Some(1 << 20),
                storage_timeout: Duration::from_secs(3600),
                ram_timeout: Duration::from_secs(90),
                plain_streams: true,
            }
        );
        assert_eq!(serde_json::to_value(&o).unwrap()["tunnelMode"], "ip6gre");
    }

    #[test]
    fn rejections_name_the_field() {
        let table: Vec<(Options, &str)> = vec![
            (
                Options { downtime: "0ms".into(), ..Default::default() },
                "spec.options.downtime: 0ms is outside 1ms..=10s",
            ),
            (
                Options { downtime: "11s".into(), ..Default::default() },
                "spec.options.downtime: 11s is outside",
            ),
            (Options { downtime: "fast".into(), ..Default::default() }, "spec.options.downtime"),
            (Options { bandwidth: Some("0".into()), ..Default::default() }, "spec.options.bandwidth"),
            (
                Options { multifd_channels: Some(0), ..Default::default() },
                "multifdChannels: 0 is outside 1..=64",
            ),
            (Options { multifd_channels: Some(65), ..Default::default() }, "multifdChannels: 65"),
            (
                Options { plug_limit_bytes: Some(32768), ..Default::default() },
                "plugLimitBytes: 32768 is outside 65536",
            ),
            (
                Options { tunnel_idle_timeout: Some("500ms".into()), ..Default::default() },
                "tunnelIdleTimeout: 500ms is outside 1s..=24h",
            ),
            (Options { storage_timeout: "0s".into(), ..Default::default() }, "storageTimeout: 0s is outside"),
            (Options { ram_timeout: "0m".into(), ..Default::default() }, "ramTimeout: 0m is outside"),
        ];
        for (o, want) in table {
            let err = o.resolve().expect_err(want);
            assert!(err.to_string().contains(want), "want {want:?}, got {err}");
        }
        let err = Options { downtime: "fast".into(), ..Default::default() }.resolve().unwrap_err();
        let source = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
        assert!(source.contains("\"fast\" is not a duration"), "{source}");
    }

    #[test]
    fn tunnel_modes_are_the_clis_words() {
        for m in [
            TunnelMode::Auto,
            TunnelMode::Ipip,
            TunnelMode::Gre,
            TunnelMode::Ip6ip6,
            TunnelMode::Ip6gre,
            TunnelMode::Route,
        ] {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
            assert_eq!(serde_json::from_value::<TunnelMode>(m.as_str().into()).unwrap(), m);
        }
        assert!(serde_json::from_str::<TunnelMode>("\"vxlan\"").is_err());
    }
}
