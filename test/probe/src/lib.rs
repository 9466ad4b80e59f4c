//! `katamaran-probe`: sequence-numbered UDP through an echo, the ground truth for "zero packet
//! loss" in the lab.
//!
//! A sender thread paces datagrams at absolute deadlines; the echo returns each verbatim; a
//! receiver thread logs what came back; [`accounting::account`] turns the two logs into a
//! [`Report`]: sent, received, lost, duplicated, reordered, the longest gap without replies,
//! round-trip percentiles and a timeline of lost runs.
//!
//! ```no_run
//! use std::time::Duration;
//! let mut cfg = katamaran_probe::ProbeConfig::new("127.0.0.1:7".parse().unwrap());
//! cfg.rate = 5000;
//! cfg.duration = Duration::from_secs(2);
//! let report = katamaran_probe::run(&cfg).unwrap();
//! assert_eq!(report.lost, 0);
//! ```

pub mod accounting;
pub mod duration;
pub mod packet;
mod report;
mod runner;

pub use report::{Counts, LossRun, Percentiles, Report, StopReason};
pub use runner::{run, ProbeConfig, ProbeError, DEFAULT_DURATION, DEFAULT_GRACE, DEFAULT_RATE, DEFAULT_SIZE};
