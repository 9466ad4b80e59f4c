//! The lab guest without a migration, measured once per case before its runs.
//!
//! ```text
//!  fresh lab → guest on node-a (as the runs start it) → probe at the case's rate for
//!  `--baseline` → probe stopped → lab down        (no agents, no migration)
//! ```
//!
//! On some QEMU versions the lab guest cannot answer 5000 packets/s even while nothing moves
//! it. What it loses here is the lab's, not the migration's: `report::evaluate` reads a
//! packet-loss target of such a case as `lab` instead of missed.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::cases::Case;
use crate::guest::{self, GuestConfig, PROBE_TARGET};
use crate::katamaran_run::record_probe;
use crate::report::{m, Run};

/// How long the probe may take to stop and report (as in the runs).
const PROBE_STOP_DEADLINE: Duration = Duration::from_secs(15);

/// What the probe saw of one case's guest without a migration.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// The probe's window, s (`--baseline`).
    pub window_s: f64,
    /// The probe's counts under the runs' metric names ([`m::SENT`], [`m::LOST`],
    /// [`m::DUPLICATED`], [`m::REORDERED`], [`m::GAP_MS`]); `ok` and `error` say whether the
    /// measurement went through.
    #[serde(flatten)]
    pub probe: Run,
}

impl Baseline {
    /// Packets the guest lost without a migration, and how many were sent, when it lost any.
    /// The counts exist only once the probe reported, so they hold even when the lab's
    /// teardown failed afterwards.
    pub fn loss(&self) -> Option<(f64, Option<f64>)> {
        let get = |k: &str| self.probe.metrics.get(k).copied();
        get(m::LOST).filter(|l| *l > 0.0).map(|l| (l, get(m::SENT)))
    }

    /// Why a packet-loss target of this case is the lab's, when the guest lost packets here.
    pub fn lab_excuse(&self) -> Option<String> {
        let (lost, sent) = self.loss()?;
        let of = sent.map(|s| format!(" of {s:.0}")).unwrap_or_default();
        Some(format!("baseline lost {lost:.0}{of} without a migration: the lab guest cannot keep up"))
    }
}

/// Measures `case`'s guest without a migration for `window`; a failure is recorded in the
/// returned baseline.
pub fn run(guest_cfg: &GuestConfig, case: &Case, window: Duration) -> Baseline {
    let mut b = Baseline { window_s: window.as_secs_f64(), probe: Run::new(1, guest::load_1m()) };
    if let Err(e) = measure(guest_cfg, case, window, &mut b.probe) {
        b.probe.ok = false;
        b.probe.error = Some(format!("{e:#}"));
    }
    b
}

fn measure(guest_cfg: &GuestConfig, case: &Case, window: Duration, run: &mut Run) -> anyhow::Result<()> {
    // On an early return the probe is killed and the lab torn down, by their `Drop`s.
    let mut lab = guest::lab_up()?;
    guest::start(&lab, case, guest_cfg)?;
    let probe = lab.spawn_probe(PROBE_TARGET, case.rate_pps)?;
    // A measurement window, not a wait (the probe counts only after its first echo came back).
    std::thread::sleep(window);
    let report = probe.stop(PROBE_STOP_DEADLINE).context("the probe did not report")?;
    record_probe(run, &report);
    run.ok = true;
    lab.down()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use katamaran_e2e::ProbeReport;

    use super::*;

    fn baseline(report: &ProbeReport) -> Baseline {
        let mut b = Baseline { window_s: 3.0, probe: Run::new(1, 0.5) };
        record_probe(&mut b.probe, report);
        b.probe.ok = true;
        b
    }

    #[test]
    fn records_the_runs_probe_metrics() {
        let b = baseline(&ProbeReport {
            sent: 15000,
            received: 12810,
            lost: 2190,
            duplicated: 1,
            reordered: 3,
            longest_gap_ms: 412.5,
            ..ProbeReport::default()
        });
        let keys: Vec<&str> = b.probe.metrics.keys().copied().collect();
        let mut expected = vec![m::SENT, m::LOST, m::DUPLICATED, m::REORDERED, m::GAP_MS];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(b.loss(), Some((2190.0, Some(15000.0))));
        assert_eq!(
            b.lab_excuse().as_deref(),
            Some("baseline lost 2190 of 15000 without a migration: the lab guest cannot keep up")
        );
    }

    #[test]
    fn a_clean_or_unmeasured_baseline_excuses_nothing() {
        let clean = baseline(&ProbeReport { sent: 3000, received: 3000, ..ProbeReport::default() });
        assert_eq!((clean.loss(), clean.lab_excuse()), (None, None));
        let failed = Baseline { window_s: 3.0, probe: Run::new(1, 0.5) };
        assert_eq!(failed.lab_excuse(), None, "no probe report, no verdict");
    }

    #[test]
    fn json_has_the_window_and_the_counts() {
        let b = baseline(&ProbeReport { sent: 3000, received: 2999, lost: 1, ..ProbeReport::default() });
        let v = serde_json::to_value(&b).expect("serializable");
        assert_eq!(v["window_s"], 3.0);
        assert_eq!(v["ok"], true);
        assert_eq!(v["metrics"][m::LOST], 1.0);
        assert_eq!(v["metrics"][m::SENT], 3000.0);
    }
}
