//! The guest's dirty rate, measured by QEMU before its first dirty-bitmap sync.
//!
//! Pre-copy learns how fast the guest dirties memory only at the end of its first pass
//! (`source/switchover.rs`); until then the engine cannot predict the pause, and an idle guest's
//! first sync finds so little that QEMU completes by itself, stopping the VM before the engine
//! swapped the routes. The packet that then reaches the stopped source is lost: QEMU's tap backend
//! still reads the tap while the VM is stopped and queues the frame for the paused NIC, where no
//! migration carries it and the tap drain cannot reach it. A measurement at the start of pre-copy
//! lets the engine predict, and switch over, before that first sync.
//!
//! `calc-dirty-rate` in `page-sampling` mode hashes a sample of guest pages twice, `calc-time`
//! apart, in a thread of its own; it neither uses nor disturbs the dirty log that migration
//! syncs (the `dirty-bitmap` mode would share it, and under TCG reports 0 for a guest dirtying
//! 70 MiB/s; measured in the lab). A millisecond `calc-time-unit` needs QEMU 8.2; before that the
//! shortest measurement is a second, longer than a small guest's first pass.

use serde_json::{json, Value};

use super::error::QemuError;
use super::features::QemuFeatures;
use crate::qmp::QmpClient;

/// How long QEMU compares the sampled pages over, ms (its minimum is 50). Rates are
/// extrapolated from it: a guest re-dirtying a small set of pages shows a rate that, over a
/// longer pass, is too high by about the ratio of the two, so the window is as long as a small
/// guest's first pass allows (128 MiB: 150–600 ms in the lab).
pub const CALC_TIME_MS: u64 = 100;
/// Pages to sample in all (QEMU takes them per GiB of guest RAM, 128 to 10000): enough that one
/// changed page of a 128 MiB guest stands for 2 MiB/s.
const SAMPLE_PAGES_TOTAL: u64 = 8192;
/// QEMU's bounds on `sample-pages` (per GiB).
const SAMPLE_PAGES_PER_GIB: (u64, u64) = (128, 10_000);
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Whether this QEMU can measure within a pre-copy's first pass.
pub fn supported(features: &QemuFeatures) -> bool {
    features.version().at_least(8, 2)
        && features.has_command("calc-dirty-rate")
        && features.has_command("query-dirty-rate")
}

/// `sample-pages` (per GiB) for a guest of `ram_bytes`: about [`SAMPLE_PAGES_TOTAL`] pages in all,
/// within QEMU's bounds.
pub fn sample_pages_per_gib(ram_bytes: u64) -> u64 {
    let (min, max) = SAMPLE_PAGES_PER_GIB;
    if ram_bytes == 0 {
        return max;
    }
    let per_gib = u128::from(SAMPLE_PAGES_TOTAL) * u128::from(GIB) / u128::from(ram_bytes);
    u64::try_from(per_gib).unwrap_or(max).clamp(min, max)
}

/// The `calc-dirty-rate` arguments for a guest of `ram_bytes`.
pub fn calc_arguments(ram_bytes: u64) -> Value {
    json!({
        "calc-time": CALC_TIME_MS,
        "calc-time-unit": "millisecond",
        "mode": "page-sampling",
        "sample-pages": sample_pages_per_gib(ram_bytes),
    })
}

/// Starts a measurement: `query-memory-size-summary` for the sample size, then `calc-dirty-rate`.
///
/// # Errors
/// [`QemuError::DirtyRate`] when QEMU refuses either command (e.g. a measurement already runs).
pub async fn start(qmp: &QmpClient) -> Result<(), QemuError> {
    let summary = qmp
        .execute("query-memory-size-summary", None)
        .await
        .map_err(|source| QemuError::DirtyRate { command: "query-memory-size-summary", source })?;
    let ram = summary.get("base-memory").and_then(Value::as_u64).unwrap_or(0);
    qmp.execute("calc-dirty-rate", Some(calc_arguments(ram)))
        .await
        .map_err(|source| QemuError::DirtyRate { command: "calc-dirty-rate", source })?;
    Ok(())
}

/// Where a measurement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measurement {
    /// Started but not yet running: `calc-dirty-rate` returns before its thread marks the
    /// measurement as running, so a query right after it reads `unstarted`.
    Unstarted,
    /// Still measuring.
    Measuring,
    /// Done: at most this many bytes per second (QEMU rounds MiB/s down; one is added back).
    Measured(u64),
    /// Nothing to wait for: a measured reply without a rate, or a status this version does not
    /// know.
    Absent,
}

/// Reads a `query-dirty-rate` reply.
pub fn parse(reply: &Value) -> Measurement {
    match reply.get("status").and_then(Value::as_str) {
        Some("unstarted") => Measurement::Unstarted,
        Some("measuring") => Measurement::Measuring,
        Some("measured") => match reply.get("dirty-rate").and_then(Value::as_u64) {
            Some(mib_per_s) => Measurement::Measured(mib_per_s.saturating_add(1).saturating_mul(MIB)),
            None => Measurement::Absent,
        },
        _ => Measurement::Absent,
    }
}

/// Asks where the measurement stands.
///
/// # Errors
/// [`QemuError::DirtyRate`] when QEMU refuses `query-dirty-rate`.
pub async fn poll(qmp: &QmpClient) -> Result<Measurement, QemuError> {
    let reply = qmp
        .execute("query-dirty-rate", Some(json!({ "calc-time-unit": "millisecond" })))
        .await
        .map_err(|source| QemuError::DirtyRate { command: "query-dirty-rate", source })?;
    Ok(parse(&reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_about_eight_thousand_pages_within_qemus_bounds() {
        assert_eq!(sample_pages_per_gib(128 * MIB), 10_000, "a small guest: QEMU's maximum");
        assert_eq!(sample_pages_per_gib(GIB), 8192);
        assert_eq!(sample_pages_per_gib(4 * GIB), 2048);
        assert_eq!(sample_pages_per_gib(1024 * GIB), 128, "a huge guest: QEMU's minimum");
        assert_eq!(sample_pages_per_gib(0), 10_000, "size unknown");
    }

    #[test]
    fn arguments_ask_for_page_sampling_in_milliseconds() {
        assert_eq!(
            calc_arguments(GIB),
            json!({"calc-time": 100, "calc-time-unit": "millisecond", "mode": "page-sampling", "sample-pages": 8192})
        );
    }

    #[test]
    fn replies_parse_to_an_upper_bound_in_bytes() {
        assert_eq!(parse(&json!({"status": "measuring", "dirty-rate": -1})), Measurement::Measuring);
        assert_eq!(
            parse(&json!({"status": "measured", "dirty-rate": 0, "mode": "page-sampling"})),
            Measurement::Measured(MIB)
        );
        assert_eq!(parse(&json!({"status": "measured", "dirty-rate": 70})), Measurement::Measured(71 * MIB));
        assert_eq!(parse(&json!({"status": "unstarted"})), Measurement::Unstarted);
        assert_eq!(parse(&json!({"status": "measured"})), Measurement::Absent, "no rate in the reply");
        assert_eq!(parse(&json!({"status": "measured", "dirty-rate": -1})), Measurement::Absent);
        assert_eq!(parse(&json!({"status": "future-state"})), Measurement::Absent);
    }
}
