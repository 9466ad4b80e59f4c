//! The compute (RAM) phase: capabilities, parameters, `migrate`, progress, switch-over.
//!
//! Every capability this module manages is set explicitly on or off (when QEMU knows it), so a
//! QEMU that served an earlier, cancelled attempt carries nothing over from it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tracing::debug;

use crate::migration::events::RamProgress;
use crate::migration::options::{MigrationOptions, StorageMode};
use crate::qmp::{MigrationInfo, MigrationStatus, QmpClient, QmpEvent};

use super::bus::{Subscription, WaitError};
use super::error::QemuError;
use super::features::QemuFeatures;

/// `max-bandwidth` when no cap is asked for. QEMU's own default is 128 MiB/s (7.2 reports
/// 134217728), which would silently throttle every migration, so "uncapped" must be sent
/// explicitly. `i64::MAX` is the largest value every QEMU accepts and is what management
/// stacks send for "unlimited".
pub const UNCAPPED_BANDWIDTH: u64 = i64::MAX as u64;

/// QEMU's upper bound for `downtime-limit`, in milliseconds (2000 s).
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// `avail-switchover-bandwidth` (QEMU 8.2+, bytes/s) while the engine holds QEMU's completion:
/// QEMU's threshold is this bandwidth times the downtime limit, 1000 bytes with the 1 ms limit
/// of an iterating pre-copy. Below a page, but not 0 (with 0 QEMU would not sync at all): QEMU
/// still syncs at every pass end, and completes by itself only after a sync that found nothing.
pub const COMPLETION_HOLD_BANDWIDTH: u64 = 1_000_000;

/// Whether QEMU takes `avail-switchover-bandwidth` (8.2 on).
pub fn has_switchover_bandwidth(features: &QemuFeatures) -> bool {
    features.version().at_least(8, 2)
}

/// The `migrate-set-parameters` arguments of a downtime limit; with `switchover_bandwidth`,
/// `avail-switchover-bandwidth` too (0: QEMU's own estimate).
pub fn limit_parameters(limit: Duration, switchover_bandwidth: Option<u64>) -> Value {
    let mut parameters = Map::new();
    parameters.insert("downtime-limit".into(), json!(downtime_ms(limit)));
    if let Some(bandwidth) = switchover_bandwidth {
        parameters.insert("avail-switchover-bandwidth".into(), json!(bandwidth));
    }
    Value::Object(parameters)
}

/// Sets the downtime limit (and the switchover bandwidth, see [`limit_parameters`]).
///
/// # Errors
///
/// [`QemuError::SetParameters`].
pub async fn set_limit(
    qmp: &QmpClient,
    limit: Duration,
    switchover_bandwidth: Option<u64>,
) -> Result<(), QemuError> {
    set_parameters(qmp, limit_parameters(limit, switchover_bandwidth)).await
}

/// How the RAM of the VM is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamConfig {
    /// The downtime QEMU may plan for the final stop-and-copy (`downtime-limit`).
    pub downtime_limit: Duration,
    /// Bytes per second; `None` is uncapped ([`UNCAPPED_BANDWIDTH`]).
    pub max_bandwidth: Option<u64>,
    /// Number of multifd channels; `None` is a single stream. Must match on both sides.
    pub multifd_channels: Option<u8>,
    /// Throttle vCPUs that dirty memory faster than it can be sent.
    pub auto_converge: bool,
    /// Stop before the device state is sent so storage can be settled
    /// ([`continue_after_switchover`] resumes).
    pub pause_before_switchover: bool,
}

impl RamConfig {
    /// The RAM settings of a migration. Node-local disks need the pre-switchover pause to
    /// settle the mirrors (DESIGN.md, storage ordering); shared storage does not.
    pub fn from_options(options: &MigrationOptions) -> Self {
        Self {
            downtime_limit: options.downtime_limit,
            max_bandwidth: options.max_bandwidth,
            multifd_channels: options.multifd_channels,
            auto_converge: options.auto_converge,
            pause_before_switchover: options.storage == StorageMode::Local,
        }
    }
}

/// One capability to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilitySetting {
    /// As QEMU spells it.
    pub capability: &'static str,
    /// On or off.
    pub state: bool,
}

/// Capabilities for the sending side.
///
/// `events` is always on: the phases wait on `MIGRATION` events. `return-path` is always on: the
/// source's `completed` then means the destination loaded the whole state (a failed load fails
/// the source's migration instead of looking like success), which the ownership protocol's
/// commit builds on. Every other managed capability
/// is on when asked (and then must exist) and off when QEMU knows it but it is not asked.
///
/// # Errors
///
/// [`QemuError::MissingCapability`] for a requested capability QEMU lacks.
pub fn outgoing_capabilities(
    features: &QemuFeatures,
    config: &RamConfig,
) -> Result<Vec<CapabilitySetting>, QemuError> {
    settings(
        features,
        &[
            ("events", true),
            ("return-path", true),
            ("auto-converge", config.auto_converge),
            ("multifd", config.multifd_channels.is_some()),
            ("pause-before-switchover", config.pause_before_switchover),
        ],
    )
}

/// Capabilities for the receiving side: `events`, `return-path`, `late-block-activate` (the
/// incoming QEMU takes its disks' write locks only when it starts running, i.e. after the
/// ownership commit; without it a shared-storage source could not resume after QEMU completed,
/// its disk locked by the paused copy that may never run), and `multifd` as on the source (the
/// stream format differs, so both sides must agree).
///
/// # Errors
///
/// [`QemuError::MissingCapability`] for a requested capability QEMU lacks.
pub fn incoming_capabilities(
    features: &QemuFeatures,
    config: &RamConfig,
) -> Result<Vec<CapabilitySetting>, QemuError> {
    settings(
        features,
        &[
            ("events", true),
            ("return-path", true),
            ("late-block-activate", true),
            ("multifd", config.multifd_channels.is_some()),
        ],
    )
}

fn settings(
    features: &QemuFeatures,
    wanted: &[(&'static str, bool)],
) -> Result<Vec<CapabilitySetting>, QemuError> {
    let mut out = Vec::with_capacity(wanted.len());
    for &(capability, state) in wanted {
        if state {
            features.require_capability(capability)?;
        } else if !features.has_capability(capability) {
            // Off and unknown to this QEMU: nothing to switch off.
            continue;
        }
        out.push(CapabilitySetting { capability, state });
    }
    Ok(out)
}

/// `migrate-set-parameters` arguments for the sending side.
///
/// # Errors
///
/// [`QemuError::InvalidRamConfig`] for a zero bandwidth or zero multifd channels.
pub fn outgoing_parameters(config: &RamConfig) -> Result<Value, QemuError> {
    validate(config)?;
    let mut parameters = Map::new();
    parameters.insert("downtime-limit".into(), json!(downtime_ms(config.downtime_limit)));
    parameters.insert("max-bandwidth".into(), json!(config.max_bandwidth.unwrap_or(UNCAPPED_BANDWIDTH)));
    if let Some(channels) = config.multifd_channels {
        parameters.insert("multifd-channels".into(), json!(channels));
    }
    Ok(Value::Object(parameters))
}

/// `migrate-set-parameters` arguments for the receiving side, `None` when nothing needs setting.
///
/// # Errors
///
/// [`QemuError::InvalidRamConfig`] for zero multifd channels.
pub fn incoming_parameters(config: &RamConfig) -> Result<Option<Value>, QemuError> {
    validate(config)?;
    Ok(config.multifd_channels.map(|channels| json!({ "multifd-channels": channels })))
}

fn validate(config: &RamConfig) -> Result<(), QemuError> {
    if config.max_bandwidth == Some(0) {
        return Err(QemuError::InvalidRamConfig {
            field: "max-bandwidth",
            detail: "0 bytes/s never finishes; use None for uncapped".into(),
        });
    }
    if config.multifd_channels == Some(0) {
        return Err(QemuError::InvalidRamConfig {
            field: "multifd-channels",
            detail: "QEMU needs at least one channel".into(),
        });
    }
    Ok(())
}

/// Whole milliseconds, rounded up so a sub-millisecond limit does not become 0, and capped at
/// QEMU's maximum.
fn downtime_ms(limit: Duration) -> u64 {
    let ms = limit.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).min(MAX_DOWNTIME_LIMIT_MS)
}

/// Configures the sending QEMU: capabilities, then parameters.
///
/// # Errors
///
/// [`QemuError::MissingCapability`] before anything is sent, [`QemuError::InvalidRamConfig`],
/// [`QemuError::SetCapabilities`] or [`QemuError::SetParameters`].
pub async fn configure(
    qmp: &QmpClient,
    features: &QemuFeatures,
    config: &RamConfig,
) -> Result<(), QemuError> {
    let capabilities = outgoing_capabilities(features, config)?;
    let mut parameters = outgoing_parameters(config)?;
    if has_switchover_bandwidth(features) {
        // Explicitly QEMU's own estimate: nothing carried over from an earlier attempt's hold.
        if let Value::Object(map) = &mut parameters {
            map.insert("avail-switchover-bandwidth".into(), json!(0));
        }
    }
    set_capabilities(qmp, &capabilities).await?;
    set_parameters(qmp, parameters).await
}

/// What a migration changes in a sending QEMU's migration settings ([`configure`], the limits of
/// the switchover), as it was before. A migration that rolls back puts it back: a VM that stays
/// keeps its QEMU as the migration found it (no 1 ms downtime limit, no completion hold, no
/// `pause-before-switchover` left for whatever migrates it next).
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingSettings {
    capabilities: Vec<CapabilitySetting>,
    parameters: Map<String, Value>,
}

impl OutgoingSettings {
    /// Reads them before [`configure`]: the capabilities it sets as discovery found them, and
    /// the parameters it and [`set_limit`] set, from `query-migrate-parameters` (a parameter
    /// QEMU does not report is left alone).
    ///
    /// # Errors
    /// [`QemuError::InvalidRamConfig`] and [`QemuError::MissingCapability`] as [`configure`];
    /// [`QemuError::QueryParameters`].
    pub async fn read(
        qmp: &QmpClient,
        features: &QemuFeatures,
        config: &RamConfig,
    ) -> Result<Self, QemuError> {
        let capabilities = outgoing_capabilities(features, config)?
            .into_iter()
            .map(|set| CapabilitySetting {
                capability: set.capability,
                state: features.capability_enabled(set.capability).unwrap_or(false),
            })
            .collect();
        let mut keys: Vec<String> = match outgoing_parameters(config)? {
            Value::Object(map) => map.into_iter().map(|(key, _)| key).collect(),
            _ => Vec::new(),
        };
        if has_switchover_bandwidth(features) {
            keys.push("avail-switchover-bandwidth".into());
        }
        let current = qmp
            .execute("query-migrate-parameters", None)
            .await
            .map_err(|source| QemuError::QueryParameters { source })?;
        let parameters =
            keys.into_iter().filter_map(|key| current.get(&key).cloned().map(|value| (key, value))).collect();
        Ok(Self { capabilities, parameters })
    }

    /// Puts them back, once QEMU's migration has ended (it refuses capabilities while one runs).
    ///
    /// # Errors
    /// [`QemuError::SetCapabilities`], [`QemuError::SetParameters`].
    pub async fn restore(&self, qmp: &QmpClient) -> Result<(), QemuError> {
        if !self.capabilities.is_empty() {
            set_capabilities(qmp, &self.capabilities).await?;
        }
        if !self.parameters.is_empty() {
            set_parameters(qmp, Value::Object(self.parameters.clone())).await?;
        }
        Ok(())
    }
}

/// Configures the receiving QEMU, before [`start_incoming`].
///
/// # Errors
///
/// As [`configure`].
pub async fn configure_incoming(
    qmp: &QmpClient,
    features: &QemuFeatures,
    config: &RamConfig,
) -> Result<(), QemuError> {
    let capabilities = incoming_capabilities(features, config)?;
    let parameters = incoming_parameters(config)?;
    set_capabilities(qmp, &capabilities).await?;
    match parameters {
        Some(parameters) => set_parameters(qmp, parameters).await,
        None => Ok(()),
    }
}

async fn set_capabilities(qmp: &QmpClient, capabilities: &[CapabilitySetting]) -> Result<(), QemuError> {
    let list: Vec<Value> = capabilities
        .iter()
        .map(|setting| json!({ "capability": setting.capability, "state": setting.state }))
        .collect();
    qmp.execute("migrate-set-capabilities", Some(json!({ "capabilities": list }))).await.map_err(
        |source| QemuError::SetCapabilities {
            capabilities: capabilities
                .iter()
                .map(|s| format!("{}={}", s.capability, if s.state { "on" } else { "off" }))
                .collect::<Vec<_>>()
                .join(", "),
            source,
        },
    )?;
    Ok(())
}

async fn set_parameters(qmp: &QmpClient, parameters: Value) -> Result<(), QemuError> {
    let shown = parameters.to_string();
    qmp.execute("migrate-set-parameters", Some(parameters))
        .await
        .map_err(|source| QemuError::SetParameters { parameters: shown, source })?;
    Ok(())
}

/// `migrate` to `uri` (`fd:NAME`, `unix:PATH`, `tcp:HOST:PORT`). Returns once QEMU accepted it;
/// progress comes as `MIGRATION` events and from [`progress`].
///
/// # Errors
///
/// [`QemuError::StartOutgoing`].
pub async fn start_outgoing(qmp: &QmpClient, uri: &str) -> Result<(), QemuError> {
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .await
        .map_err(|source| QemuError::StartOutgoing { uri: uri.to_owned(), source })?;
    Ok(())
}

/// `migrate-incoming` on `uri`; the QEMU must have been started with `-incoming defer`.
///
/// # Errors
///
/// [`QemuError::StartIncoming`].
pub async fn start_incoming(qmp: &QmpClient, uri: &str) -> Result<(), QemuError> {
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await
        .map_err(|source| QemuError::StartIncoming { uri: uri.to_owned(), source })?;
    Ok(())
}

/// The migration status and RAM progress (`query-migrate`). A QEMU that has not migrated
/// reports [`MigrationStatus::None`].
///
/// # Errors
///
/// [`QemuError::QueryMigrate`].
pub async fn progress(qmp: &QmpClient) -> Result<(MigrationStatus, RamProgress), QemuError> {
    let info = query(qmp).await?;
    Ok((info.status.clone().unwrap_or(MigrationStatus::None), ram_progress(&info)))
}

async fn query(qmp: &QmpClient) -> Result<MigrationInfo, QemuError> {
    qmp.query_migrate().await.map_err(|source| QemuError::QueryMigrate { source })
}

/// Maps `query-migrate` into the progress event's numbers; absent figures are 0.
pub fn ram_progress(info: &MigrationInfo) -> RamProgress {
    let ram = info.ram.clone().unwrap_or_default();
    RamProgress {
        transferred_bytes: ram.transferred.unwrap_or(0),
        remaining_bytes: ram.remaining.unwrap_or(0),
        total_bytes: ram.total.unwrap_or(0),
        dirty_pages_rate: ram.dirty_pages_rate.unwrap_or(0),
        iteration: ram.dirty_sync_count.unwrap_or(0),
        // QEMU's `mbps` is megabits (10^6) per second; the cast saturates on nonsense.
        throughput_bytes_per_second: ram.mbps.map_or(0, |mbps| (mbps * 1_000_000.0 / 8.0).max(0.0) as u64),
        expected_downtime_ms: info
            .expected_downtime
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        page_size_bytes: ram.page_size.unwrap_or(0),
    }
}

/// `migrate-continue` from the `pre-switchover` pause: QEMU sends the device state and the
/// migration completes.
///
/// # Errors
///
/// [`QemuError::Continue`], e.g. when the migration is not paused.
pub async fn continue_after_switchover(qmp: &QmpClient) -> Result<(), QemuError> {
    qmp.execute("migrate-continue", Some(json!({ "state": "pre-switchover" })))
        .await
        .map_err(|source| QemuError::Continue { source })?;
    Ok(())
}

/// `migrate_cancel`. The source VM resumes if it was running; the end shows as a `MIGRATION`
/// event with status `cancelled`.
///
/// # Errors
///
/// [`QemuError::Cancel`].
pub async fn cancel(qmp: &QmpClient) -> Result<(), QemuError> {
    qmp.execute("migrate_cancel", None).await.map_err(|source| QemuError::Cancel { source })?;
    Ok(())
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationEnd {
    /// Completed; `query-migrate` right after (times, downtime, RAM totals).
    Completed(MigrationInfo),
    /// Failed with QEMU's `error-desc` (empty if QEMU gave none).
    Failed(String),
    /// Cancelled with `migrate_cancel`.
    Cancelled,
}

fn status_of(event: &QmpEvent) -> Option<MigrationStatus> {
    (event.name == "MIGRATION").then(|| event.data_str("status")).flatten().map(MigrationStatus::from)
}

fn is_terminal(status: &MigrationStatus) -> bool {
    matches!(status, MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
}

/// Waits for the `MIGRATION` event of the terminal status and reads the details. Subscribe
/// before starting the migration.
///
/// # Errors
///
/// [`QemuError::MigrationTimeout`], [`QemuError::EventsEnded`] or [`QemuError::QueryMigrate`].
pub async fn wait_terminal(
    qmp: &QmpClient,
    events: &mut Subscription,
    deadline: Duration,
) -> Result<MigrationEnd, QemuError> {
    let status = wait_matching(events, deadline, "the migration to end", is_terminal).await?;
    Ok(match status {
        MigrationStatus::Completed => MigrationEnd::Completed(final_statistics(qmp).await?),
        MigrationStatus::Failed => MigrationEnd::Failed(query(qmp).await?.error_desc.unwrap_or_default()),
        _ => MigrationEnd::Cancelled,
    })
}

/// How long [`final_statistics`] waits for QEMU to fill in the totals.
const STATISTICS_GRACE: Duration = Duration::from_millis(200);

/// `query-migrate` of a completed outgoing migration, with its totals.
///
/// # Errors
///
/// [`QemuError::QueryMigrate`].
///
/// QEMU (7.2 at least) emits `completed` before its migration thread computes `total-time` and
/// `downtime`, so a query right after the event can report both as 0. No event marks the
/// moment the totals are set, hence a short bounded re-query; the incoming side reports no
/// totals at all and is returned at once.
pub async fn final_statistics(qmp: &QmpClient) -> Result<MigrationInfo, QemuError> {
    let until = Instant::now() + STATISTICS_GRACE;
    loop {
        let info = query(qmp).await?;
        if info.total_time != Some(Duration::ZERO) || Instant::now() >= until {
            return Ok(info);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits for the `MIGRATION` event with `status` (e.g. `pre-switchover`), failing early if the
/// migration ends first. Subscribe before the command that leads there.
///
/// # Errors
///
/// [`QemuError::MigrationEnded`] (with QEMU's `error-desc`), [`QemuError::MigrationTimeout`]
/// or [`QemuError::EventsEnded`].
pub async fn wait_status(
    qmp: &QmpClient,
    events: &mut Subscription,
    status: MigrationStatus,
    deadline: Duration,
) -> Result<(), QemuError> {
    let what = format!("migration status '{status}'");
    let reached = wait_matching(events, deadline, &what, |seen| *seen == status || is_terminal(seen)).await?;
    if reached == status {
        return Ok(());
    }
    let detail = match reached {
        MigrationStatus::Failed => query(qmp).await.ok().and_then(|info| info.error_desc),
        _ => None,
    };
    Err(QemuError::MigrationEnded { waiting_for: status.to_string(), status: reached.to_string(), detail })
}

async fn wait_matching(
    events: &mut Subscription,
    deadline: Duration,
    what: &str,
    mut accept: impl FnMut(&MigrationStatus) -> bool,
) -> Result<MigrationStatus, QemuError> {
    let until = Instant::now() + deadline;
    loop {
        let event: Arc<QmpEvent> = events.next_until(until, deadline).await.map_err(|error| match error {
            WaitError::Timeout(_) => QemuError::MigrationTimeout { waiting_for: what.to_owned(), deadline },
            WaitError::Ended => QemuError::EventsEnded { waiting_for: what.to_owned() },
        })?;
        if let Some(status) = status_of(&event) {
            debug!(%status, "migration status");
            if accept(&status) {
                return Ok(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::{MigrationCapability, MigrationCapabilityStatus, QemuVersion};

    fn features(capabilities: &[&str]) -> QemuFeatures {
        let list: Vec<MigrationCapabilityStatus> = capabilities
            .iter()
            .map(|&name| MigrationCapabilityStatus {
                capability: MigrationCapability::from(name),
                state: false,
            })
            .collect();
        let version = QemuVersion { major: 7, minor: 2, micro: 0, package: String::new() };
        QemuFeatures::from_parts(version, Vec::new(), &list)
    }

    fn config() -> RamConfig {
        RamConfig {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            multifd_channels: None,
            auto_converge: false,
            pause_before_switchover: true,
        }
    }

    fn names(settings: &[CapabilitySetting]) -> Vec<(&str, bool)> {
        settings.iter().map(|s| (s.capability, s.state)).collect()
    }

    #[test]
    fn capabilities_are_set_on_or_off_explicitly() {
        let all = features(&[
            "events",
            "return-path",
            "late-block-activate",
            "auto-converge",
            "multifd",
            "pause-before-switchover",
        ]);
        let out = outgoing_capabilities(&all, &config()).expect("offered");
        assert_eq!(
            names(&out),
            [
                ("events", true),
                ("return-path", true),
                ("auto-converge", false),
                ("multifd", false),
                ("pause-before-switchover", true)
            ]
        );
        let multifd = RamConfig { multifd_channels: Some(4), ..config() };
        let incoming = incoming_capabilities(&all, &multifd).expect("offered");
        assert_eq!(
            names(&incoming),
            [("events", true), ("return-path", true), ("late-block-activate", true), ("multifd", true)]
        );
    }

    #[test]
    fn unknown_capabilities_are_skipped_when_off_and_refused_when_asked() {
        let old = features(&["events", "return-path", "late-block-activate", "auto-converge"]);
        let off = RamConfig { pause_before_switchover: false, ..config() };
        assert_eq!(
            names(&outgoing_capabilities(&old, &off).expect("nothing missing")),
            [("events", true), ("return-path", true), ("auto-converge", false)]
        );
        let error = outgoing_capabilities(&old, &config()).expect_err("pause missing");
        assert_eq!(
            error.to_string(),
            "QEMU 7.2.0 does not offer migration capability 'pause-before-switchover'"
        );
        let multifd = RamConfig { multifd_channels: Some(2), pause_before_switchover: false, ..config() };
        let error = incoming_capabilities(&old, &multifd).expect_err("multifd missing");
        assert!(error.to_string().contains("'multifd'"), "{error}");
    }

    #[test]
    fn parameters_always_carry_an_explicit_bandwidth() {
        let uncapped = outgoing_parameters(&config()).expect("valid");
        assert_eq!(uncapped, json!({"downtime-limit": 300, "max-bandwidth": 9_223_372_036_854_775_807_u64}));
        let capped = RamConfig {
            max_bandwidth: Some(1 << 30),
            multifd_channels: Some(4),
            downtime_limit: Duration::from_micros(1500),
            ..config()
        };
        assert_eq!(
            outgoing_parameters(&capped).expect("valid"),
            json!({"downtime-limit": 2, "max-bandwidth": 1_073_741_824_u64, "multifd-channels": 4})
        );
        assert_eq!(incoming_parameters(&config()).expect("valid"), None);
        assert_eq!(incoming_parameters(&capped).expect("valid"), Some(json!({"multifd-channels": 4})));
        assert_eq!(downtime_ms(Duration::from_secs(1_000_000)), MAX_DOWNTIME_LIMIT_MS);
        for bad in [
            RamConfig { max_bandwidth: Some(0), ..config() },
            RamConfig { multifd_channels: Some(0), ..config() },
        ] {
            assert!(matches!(outgoing_parameters(&bad), Err(QemuError::InvalidRamConfig { .. })));
        }
    }

    #[test]
    fn the_completion_hold_keeps_qemus_threshold_under_a_page_but_above_zero() {
        // QEMU: threshold = avail-switchover-bandwidth / 1000 (bytes per ms) × downtime-limit (ms).
        let threshold = COMPLETION_HOLD_BANDWIDTH / 1000;
        assert!((1..4096).contains(&threshold), "{threshold} bytes with the 1 ms limit");
        assert_eq!(
            limit_parameters(Duration::from_millis(1), Some(COMPLETION_HOLD_BANDWIDTH)),
            json!({"downtime-limit": 1, "avail-switchover-bandwidth": 1_000_000})
        );
        assert_eq!(
            limit_parameters(Duration::from_millis(25), Some(0)),
            json!({"downtime-limit": 25, "avail-switchover-bandwidth": 0}),
            "released: QEMU's own bandwidth estimate"
        );
        assert_eq!(limit_parameters(Duration::ZERO, None), json!({"downtime-limit": 0}), "QEMU before 8.2");
        let version = |minor| {
            QemuFeatures::from_parts(
                QemuVersion { major: 8, minor, micro: 0, package: String::new() },
                Vec::<String>::new(),
                &[],
            )
        };
        assert!(!has_switchover_bandwidth(&version(1)));
        assert!(has_switchover_bandwidth(&version(2)));
    }

    #[test]
    fn options_map_to_ram_config() {
        let local = RamConfig::from_options(&MigrationOptions::default());
        assert!(local.pause_before_switchover, "local disks settle at the pause");
        assert_eq!(local.downtime_limit, Duration::from_millis(25));
        let shared = RamConfig::from_options(&MigrationOptions {
            storage: StorageMode::Shared,
            multifd_channels: Some(4),
            ..MigrationOptions::default()
        });
        assert!(!shared.pause_before_switchover);
        assert_eq!(shared.multifd_channels, Some(4));
    }

    #[test]
    fn progress_maps_query_migrate() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "active", "expected-downtime": 42, "new-field": [1],
            "ram": {"transferred": 1000, "remaining": 2000, "total": 4000, "mbps": 800.0,
                    "dirty-pages-rate": 12, "dirty-sync-count": 3, "page-size": 4096,
                    "multifd-bytes": 0}
        }))
        .expect("decodes");
        assert_eq!(
            ram_progress(&info),
            RamProgress {
                transferred_bytes: 1000,
                remaining_bytes: 2000,
                total_bytes: 4000,
                dirty_pages_rate: 12,
                iteration: 3,
                throughput_bytes_per_second: 100_000_000,
                expected_downtime_ms: 42,
                page_size_bytes: 4096,
            }
        );
        assert_eq!(ram_progress(&MigrationInfo::default()), RamProgress::default());
    }
}
