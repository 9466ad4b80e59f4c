//! The checks the lab VM runs, each building its own namespaces and removing them at the end.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use katamaran::net::{self, Feature, TunnelMode};

use crate::error::CheckError;
use crate::report::{chain, CheckReport, Metrics, Status};

pub mod cutover;
pub mod engine;
pub mod features;
pub mod plug;
pub mod suite;
pub mod tunnel;

/// One check of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// katamaran's feature probe finds every production-path feature.
    Features,
    /// sch_plug holds, releases in order, counts overflow drops, is deleted.
    Plug,
    /// One tunnel mode carries the VM's traffic after a single route replace.
    Tunnel(TunnelMode),
    /// STOP → route swap, RESUME → plug release, under a 1000 pps probe.
    Cutover,
    /// The controlled switchover: route swap → STOP, RESUME → plug release; nothing lost.
    CutoverControlled,
    /// The engine's own cutover: two agents, a QEMU stand-in, the ipip tunnel and the plug.
    EngineCutover,
    /// The same for an IPv6 VM between IPv6 nodes: the ip6ip6 tunnel.
    EngineCutover6,
    /// shim-ext's privileged netns test suite, run as a binary.
    NetnsSuite,
}

impl Check {
    /// Every check, in run order.
    pub const ALL: [Check; 11] = [
        Check::Features,
        Check::Plug,
        Check::Tunnel(TunnelMode::Ipip),
        Check::Tunnel(TunnelMode::Gre),
        Check::Tunnel(TunnelMode::Ip6ip6),
        Check::Tunnel(TunnelMode::Ip6gre),
        Check::Cutover,
        Check::CutoverControlled,
        Check::EngineCutover,
        Check::EngineCutover6,
        Check::NetnsSuite,
    ];

    /// Kernel features the check cannot run without.
    pub fn needs(self) -> &'static [Feature] {
        match self {
            Check::Features | Check::NetnsSuite => &[],
            Check::Plug => &[Feature::Plug],
            Check::Tunnel(TunnelMode::Ipip) => &[Feature::Ipip],
            Check::Tunnel(TunnelMode::Gre) => &[Feature::Gre],
            Check::Tunnel(TunnelMode::Ip6ip6) => &[Feature::Ip6Tnl],
            Check::Tunnel(TunnelMode::Ip6gre) => &[Feature::Ip6Gre],
            Check::Cutover | Check::CutoverControlled | Check::EngineCutover => {
                &[Feature::Plug, Feature::Ipip]
            }
            Check::EngineCutover6 => &[Feature::Plug, Feature::Ip6Tnl],
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Features => f.write_str("features"),
            Check::Plug => f.write_str("plug"),
            Check::Tunnel(mode) => write!(f, "tunnel-{mode}"),
            Check::Cutover => f.write_str("cutover"),
            Check::CutoverControlled => f.write_str("cutover-controlled"),
            Check::EngineCutover => f.write_str("engine-cutover"),
            Check::EngineCutover6 => f.write_str("engine-cutover-v6"),
            Check::NetnsSuite => f.write_str("netns-suite"),
        }
    }
}

/// The name is not one of [`Check::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown check {0:?} (known: features, plug, tunnel-ipip, tunnel-gre, tunnel-ip6ip6, tunnel-ip6gre, cutover, cutover-controlled, engine-cutover, engine-cutover-v6, netns-suite)")]
pub struct UnknownCheck(String);

impl FromStr for Check {
    type Err = UnknownCheck;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Check::ALL.into_iter().find(|c| c.to_string() == s).ok_or_else(|| UnknownCheck(s.to_owned()))
    }
}

/// How to run the checks.
#[derive(Debug, Clone)]
pub struct Options {
    /// shim-ext's `net_netns` test binary, for [`Check::NetnsSuite`].
    pub suite: Option<PathBuf>,
    /// Skip (rather than fail) checks whose kernel features are missing.
    pub allow_missing: bool,
    /// Deadline of one check.
    pub check_timeout: Duration,
    /// The agent and the QEMU stand-in, for [`Check::EngineCutover`].
    pub programs: engine::Programs,
}

/// Runs one check under its deadline and reports it.
pub async fn run(check: Check, opts: &Options) -> CheckReport {
    let started = Instant::now();
    let mut metrics = Metrics::default();
    let outcome = if let Some(missing) = missing_feature(check, opts).await {
        Err(Outcome::Skip(format!("kernel lacks {missing}")))
    } else {
        match tokio::time::timeout(opts.check_timeout, dispatch(check, opts, &mut metrics)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Outcome::Fail(chain(&e))),
            Err(_) => Err(Outcome::Fail(chain(&CheckError::Timeout {
                what: "the check to finish".into(),
                limit: opts.check_timeout,
            }))),
        }
    };
    let (metrics, notes) = metrics.into_parts();
    let (status, detail) = match outcome {
        Ok(()) => (Status::Pass, notes),
        Err(Outcome::Fail(d)) => (Status::Fail, d),
        Err(Outcome::Skip(d)) => (Status::Skip, d),
    };
    CheckReport { name: check.to_string(), status, seconds: started.elapsed().as_secs_f64(), metrics, detail }
}

enum Outcome {
    Fail(String),
    Skip(String),
}

/// With `allow_missing`, the first feature the check needs that the kernel lacks.
async fn missing_feature(check: Check, opts: &Options) -> Option<Feature> {
    if !opts.allow_missing {
        return None;
    }
    for &what in check.needs() {
        if net::probe(what).await.is_err() {
            return Some(what);
        }
    }
    None
}

async fn dispatch(check: Check, opts: &Options, m: &mut Metrics) -> Result<(), CheckError> {
    match check {
        Check::Features => features::run(m).await,
        Check::Plug => plug::run(m).await,
        Check::Tunnel(mode) => tunnel::run(mode, m).await,
        Check::Cutover => cutover::run(&cutover::Config::new(cutover::Sequence::StopThenSwap), m).await,
        Check::CutoverControlled => {
            let settle = cutover::ENGINE_SETTLE;
            cutover::run(&cutover::Config::new(cutover::Sequence::SwapThenStop { settle }), m).await
        }
        Check::EngineCutover => engine::run(&opts.programs, crate::topo::Plan::V4, m).await,
        Check::EngineCutover6 => engine::run(&opts.programs, crate::topo::Plan::V6, m).await,
        Check::NetnsSuite => suite::run(opts.suite.as_deref(), opts.check_timeout, m).await,
    }
}

/// A probe report for the verdicts' tests: `sent` datagrams at 1000 pps, the given counts.
#[cfg(test)]
pub(crate) fn probe_report(sent: u64, lost: u64, duplicated: u64, reordered: u64) -> katamaran_probe::Report {
    katamaran_probe::Report {
        target: "10.244.1.5:7".into(),
        rate: 1000,
        size: 64,
        sent,
        received: sent - lost,
        lost,
        duplicated,
        reordered,
        longest_gap_ms: 260.0,
        rtt_ms: Default::default(),
        loss_timeline: Vec::new(),
        duration_ms: sent as f64,
        started_unix_ms: 0.0,
        ready_ms: None,
        send_late_ms: Default::default(),
        send_errors: 0,
        foreign: 0,
        stop_reason: katamaran_probe::StopReason::Signal,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let names: Vec<String> = Check::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "features",
                "plug",
                "tunnel-ipip",
                "tunnel-gre",
                "tunnel-ip6ip6",
                "tunnel-ip6gre",
                "cutover",
                "cutover-controlled",
                "engine-cutover",
                "engine-cutover-v6",
                "netns-suite"
            ]
        );
        for c in Check::ALL {
            assert_eq!(c.to_string().parse::<Check>().unwrap(), c);
        }
        assert!("tunnel-vxlan".parse::<Check>().unwrap_err().to_string().contains("tunnel-ip6gre"));
    }

    #[test]
    fn the_cutover_needs_the_plug_and_ipip() {
        assert_eq!(Check::Cutover.needs(), &[Feature::Plug, Feature::Ipip]);
        assert_eq!(Check::EngineCutover.needs(), &[Feature::Plug, Feature::Ipip]);
        assert_eq!(Check::EngineCutover6.needs(), &[Feature::Plug, Feature::Ip6Tnl]);
        assert_eq!(Check::Tunnel(TunnelMode::Ip6gre).needs(), &[Feature::Ip6Gre]);
        assert!(Check::NetnsSuite.needs().is_empty());
    }
}
