//! The probe's report: what a run measured, as JSON and as a one-screen summary.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Percentiles of a set of durations, in milliseconds (0 when the set is empty).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values_ns`; sorts the slice in place.
    pub fn from_ns(values_ns: &mut [u64]) -> Self {
        if values_ns.is_empty() {
            return Self::default();
        }
        values_ns.sort_unstable();
        let rank = |p: f64| {
            // Nearest rank: the smallest value with at least p of the samples at or below it.
            let n = values_ns.len();
            let idx = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            ns_to_ms(values_ns[idx])
        };
        Self { p50: rank(0.50), p99: rank(0.99), max: ns_to_ms(values_ns[values_ns.len() - 1]) }
    }
}

/// A run of consecutive lost sequence numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossRun {
    /// First lost sequence number of the run.
    pub first_seq: u64,
    /// Last lost sequence number of the run (inclusive).
    pub last_seq: u64,
    /// When `first_seq` was sent, ms after the probe's counting start.
    pub start_ms: f64,
    /// When `last_seq` was sent, ms after the probe's counting start.
    pub end_ms: f64,
}

/// Why the probe stopped sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `--duration` elapsed.
    Duration,
    /// `--count` packets were sent.
    Count,
    /// SIGINT/SIGTERM or the library caller's stop flag.
    Signal,
    /// The `--stop-file` appeared.
    StopFile,
}

/// Packet accounting of one run, computed by [`crate::accounting::account`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Datagrams sent (sequence numbers used, including ones whose `send` failed).
    pub sent: u64,
    /// Distinct sequence numbers that came back.
    pub received: u64,
    /// `sent − received`.
    pub lost: u64,
    /// Replies for a sequence number that had already come back.
    pub duplicated: u64,
    /// First replies that arrived after a reply with a higher sequence number.
    pub reordered: u64,
    /// Longest time without any reply while packets were outstanding, ms.
    pub longest_gap_ms: f64,
    /// Round-trip times of first replies.
    pub rtt_ms: Percentiles,
    /// Runs of consecutive lost sequence numbers.
    pub loss_timeline: Vec<LossRun>,
}

/// Everything a run measured; serialised as the `--json` report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The echo the probe talked to.
    pub target: String,
    /// Configured send rate, packets per second.
    pub rate: u32,
    /// Datagram size in bytes.
    pub size: usize,
    /// Datagrams sent.
    pub sent: u64,
    /// Distinct sequence numbers that came back.
    pub received: u64,
    /// `sent − received`.
    pub lost: u64,
    /// Replies for a sequence number that had already come back.
    pub duplicated: u64,
    /// First replies that arrived after a reply with a higher sequence number.
    pub reordered: u64,
    /// Longest time without any reply while packets were outstanding, ms.
    pub longest_gap_ms: f64,
    /// Round-trip times of first replies, ms.
    pub rtt_ms: Percentiles,
    /// Runs of consecutive lost sequence numbers, times relative to the counting start.
    pub loss_timeline: Vec<LossRun>,
    /// From the counting start to the last send, ms.
    pub duration_ms: f64,
    /// The counting start on the wall clock, ms since the Unix epoch: places the loss timeline
    /// among other processes' events.
    #[serde(default)]
    pub started_unix_ms: f64,
    /// How long the ready handshake waited for the first reply, ms (absent without `--wait-ready`).
    pub ready_ms: Option<f64>,
    /// How late sends left compared to their absolute deadline, ms: the pacing accuracy.
    pub send_late_ms: Percentiles,
    /// `send` calls that failed (their sequence numbers count as sent and lost).
    pub send_errors: u64,
    /// Datagrams received that were not replies of this run.
    pub foreign: u64,
    /// Why sending stopped.
    pub stop_reason: StopReason,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loss_pct = if self.sent == 0 { 0.0 } else { 100.0 * self.lost as f64 / self.sent as f64 };
        writeln!(
            f,
            "probe {}: sent {} received {} lost {} ({:.3}%) duplicated {} reordered {}",
            self.target, self.sent, self.received, self.lost, loss_pct, self.duplicated, self.reordered
        )?;
        writeln!(
            f,
            "  longest gap {:.1} ms; rtt p50 {:.3} p99 {:.3} max {:.3} ms",
            self.longest_gap_ms, self.rtt_ms.p50, self.rtt_ms.p99, self.rtt_ms.max
        )?;
        write!(
            f,
            "  {:.0} ms at {} pps x {} B ({:?}); send late p99 {:.3} max {:.3} ms",
            self.duration_ms,
            self.rate,
            self.size,
            self.stop_reason,
            self.send_late_ms.p99,
            self.send_late_ms.max
        )?;
        if let Some(ready) = self.ready_ms {
            write!(f, "; ready after {ready:.0} ms")?;
        }
        for run in self.loss_timeline.iter().take(10) {
            write!(
                f,
                "\n  lost seq {}..={} ({} packets) sent {:.1}..{:.1} ms",
                run.first_seq,
                run.last_seq,
                run.last_seq - run.first_seq + 1,
                run.start_ms,
                run.end_ms
            )?;
        }
        if self.loss_timeline.len() > 10 {
            write!(f, "\n  … {} more loss runs in the JSON report", self.loss_timeline.len() - 10)?;
        }
        Ok(())
    }
}

/// Converts nanoseconds to fractional milliseconds.
pub(crate) fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().map(|ms| ms * 1_000_000).collect();
        let p = Percentiles::from_ns(&mut v);
        assert_eq!(p, Percentiles { p50: 50.0, p99: 99.0, max: 100.0 });
        assert_eq!(Percentiles::from_ns(&mut []), Percentiles::default());
        assert_eq!(Percentiles::from_ns(&mut [3_000_000]), Percentiles { p50: 3.0, p99: 3.0, max: 3.0 });
    }
}
