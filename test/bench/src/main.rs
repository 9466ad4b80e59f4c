//! `katamaran-bench` — katamaran's migrations in the two-node lab, side by side with bare QEMU,
//! plus the cost of the data-plane relay and of the cutover's route swap.
//!
//! ```text
//!  per case (guest size × workload × storage × probe rate), once before its runs, in a fresh lab:
//!    baseline   guest on node-a → probe for `--baseline` → no agents, no migration
//!  per case, per run, each in a fresh lab:
//!    katamaran  guest on node-a → agents on both nodes → probe → client::drive → Summary
//!    bare QEMU  guest on node-a → `-incoming` on node-b → probe → plain QMP → route after RESUME
//!  once: relay vs direct TCP between node-a and node-b; netlink vs spawned `ip` route swap
//! ```
//!
//! Prints tables (median (min–max) over successful runs) and the brief's targets; `--json`
//! writes every run. `hack/bench.sh` builds and runs it; `docs/PERFORMANCE.md` has a run.

mod agents;
mod bare;
mod baseline;
mod cases;
mod guest;
mod katamaran_run;
mod relay;
mod report;
mod routes;
mod stats;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use katamaran::cli::parse_duration;
use katamaran_e2e::artifacts;
use serde::Serialize;
use tracing::{info, warn};

use crate::baseline::Baseline;
use crate::cases::Case;
use crate::guest::GuestConfig;
use crate::report::{CaseResult, RelayResult, RouteResult, Run};

const AFTER_HELP: &str = "\
Cases are named <mem>m-<idle|dirty>-<shared|local>-<pps>; `default` is 128m-idle-shared-1000 and
one step from it along each axis (512m, dirty, local, 5000 pps), `all` the 16 combinations.

Before its runs, every case measures the lab guest without a migration for --baseline: a
packet-loss target of a case whose guest loses packets even then reads `lab`, not NO.

Needs root, QEMU and the guest image (hack/guest/build.sh); hack/bench.sh builds everything and
runs this. The numbers depend on the host's load: the 1-minute load average is recorded per run.";

#[derive(Debug, Parser)]
#[command(name = "katamaran-bench", version, about = "katamaran vs bare QEMU in the two-node lab", after_help = AFTER_HELP)]
struct Cli {
    /// Runs per case and driver (each run boots a fresh guest in a fresh lab).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Cases: `default`, `all`, or a comma-separated list of case names.
    #[arg(long, default_value = "default")]
    cases: String,
    /// Print the selected cases and exit.
    #[arg(long)]
    list_cases: bool,
    /// Also write every run and summary as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Probe traffic before the migration starts.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    before: Duration,
    /// Probe traffic after the migration ended.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    after: Duration,
    /// Deadline of one migration.
    #[arg(long, value_parser = parse_duration, default_value = "180s")]
    timeout: Duration,
    /// Probe window of each case's baseline: the lab guest without a migration, before the runs.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    baseline: Duration,
    /// Skip each case's baseline (the lab guest without a migration).
    #[arg(long, conflicts_with = "baseline")]
    no_baseline: bool,
    /// Rate of the dirty workload, MiB/s (its working set is half the guest's memory).
    #[arg(long, default_value_t = 64)]
    dirty_rate: u32,
    /// Bytes per relay/direct sample, MiB.
    #[arg(long, default_value_t = 1024)]
    relay_mib: u64,
    /// Samples of each relay/direct stream (they are short, and noisy on a shared machine).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    relay_runs: u32,
    /// Samples of the route swap through netlink.
    #[arg(long, default_value_t = 1000)]
    netlink_iterations: usize,
    /// Samples of the route swap by spawning `ip`.
    #[arg(long, default_value_t = 200)]
    spawn_iterations: usize,
    /// Skip the bare-QEMU baseline.
    #[arg(long)]
    no_bare: bool,
    /// Skip the relay and route-swap measurements.
    #[arg(long)]
    no_micro: bool,
    /// Skip the migration cases (only the relay and route-swap measurements).
    #[arg(long)]
    no_migrations: bool,
    /// Where katamaran-agent is (default: next to this binary).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

impl Cli {
    /// The baseline's probe window; `None` with `--no-baseline`.
    fn baseline_window(&self) -> Option<Duration> {
        (!self.no_baseline).then_some(self.baseline)
    }
}

/// What every migration run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where `katamaran-agent` is.
    pub bin_dir: PathBuf,
    /// How the guest is started.
    pub guest: GuestConfig,
    /// Probe window before the migration.
    pub before: Duration,
    /// Probe window after it.
    pub after: Duration,
    /// Deadline of one migration.
    pub timeout: Duration,
}

#[derive(Debug, Serialize)]
struct Machine {
    commit: String,
    cpus: usize,
    kernel: String,
    qemu: String,
    load_1m_before: f64,
    load_1m_after: f64,
    wall_s: f64,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    machine: Machine,
    runs_per_case: u32,
    cases: Vec<CaseJson<'a>>,
    relay: Option<&'a RelayResult>,
    route_swap: Option<&'a RouteResult>,
    targets: Vec<report::Target>,
}

#[derive(Debug, Serialize)]
struct CaseJson<'a> {
    #[serde(flatten)]
    result: &'a CaseResult,
    katamaran_summary: std::collections::BTreeMap<&'static str, stats::Spread>,
    bare_summary: std::collections::BTreeMap<&'static str, stats::Spread>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KATAMARAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("katamaran-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

/// Runs the benchmark; `Ok(false)` when a run failed (everything is still printed).
fn run(cli: &Cli) -> anyhow::Result<bool> {
    let selected: Vec<Case> = cases::select(&cli.cases)?;
    if cli.list_cases {
        for c in &selected {
            println!("{c}");
        }
        return Ok(true);
    }
    artifacts::require_vm_lab().map_err(|skip| anyhow::anyhow!("cannot run here: {}", skip.0))?;
    if let Err(skip) = artifacts::ensure_guest_image()? {
        anyhow::bail!("cannot run here: {}", skip.0);
    }
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => exe.parent().map(PathBuf::from).context("this binary has no directory")?,
    };
    for bin in ["katamaran-agent", "katamaran-probe"] {
        anyhow::ensure!(
            bin_dir.join(bin).is_file(),
            "no {bin} in {} (build it, or pass --bin-dir)",
            bin_dir.display()
        );
    }
    if std::env::var_os("KMR_PROBE").is_none() {
        // Before any thread exists: the lab helpers read the probe's path from here.
        std::env::set_var("KMR_PROBE", bin_dir.join("katamaran-probe"));
    }
    let wrapper = artifacts::workspace_root().join("test/bench/qemu-append.sh");
    anyhow::ensure!(wrapper.is_file(), "missing {}", wrapper.display());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    let cfg = RunConfig {
        bin_dir,
        guest: GuestConfig { qemu_wrapper: wrapper, dirty_rate_mib_per_s: cli.dirty_rate },
        before: cli.before,
        after: cli.after,
        timeout: cli.timeout,
    };

    let started = Instant::now();
    let load_before = guest::load_1m();
    let (mut relay_result, mut route_result) = (None, None);
    if !cli.no_micro {
        info!("relay and route-swap measurements");
        let mut lab = guest::lab_up()?;
        let r = routes::measure(&lab, &rt, cli.netlink_iterations, cli.spawn_iterations)?;
        println!("{}", report::route_table(&r).render());
        route_result = Some(r);
        let r = relay::measure(&lab, &rt, cli.relay_mib << 20, cli.relay_runs)?;
        println!("{}", report::relay_table(&r).render());
        relay_result = Some(r);
        lab.down()?;
    }

    let mut results: Vec<CaseResult> = Vec::new();
    let mut all_ok = true;
    if !cli.no_migrations {
        for case in &selected {
            let mut result = CaseResult::new(*case);
            if let Some(window) = cli.baseline_window() {
                let b = baseline::run(&cfg.guest, case, window);
                log_baseline(case, &b);
                all_ok &= b.probe.ok;
                result.baseline = Some(b);
            }
            for n in 1..=cli.runs {
                // Interleaved, so that a change in the host's load hits both drivers alike.
                let k = katamaran_run::run(&rt, &cfg, case, n);
                log_run("katamaran", case, cli.runs, &k);
                all_ok &= k.ok;
                result.katamaran.push(k);
                if !cli.no_bare {
                    let b = bare::run(&rt, &cfg, case, n);
                    log_run("bare", case, cli.runs, &b);
                    all_ok &= b.ok;
                    result.bare.push(b);
                }
            }
            results.push(result);
        }
        for t in report::case_tables(&results) {
            println!("{}", t.render());
        }
    }
    let targets = report::evaluate(&results, relay_result.as_ref());
    println!("{}", report::target_table(&targets).render());
    let root = artifacts::workspace_root();
    let machine = Machine {
        commit: first_line("git", &["-C", &root.to_string_lossy(), "describe", "--always", "--dirty"]),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        kernel: first_line("uname", &["-r"]),
        qemu: first_line("qemu-system-x86_64", &["--version"]),
        load_1m_before: load_before,
        load_1m_after: guest::load_1m(),
        wall_s: started.elapsed().as_secs_f64(),
    };
    println!(
        "machine: {} CPUs, kernel {}, {}; katamaran {}; load 1m {:.2} → {:.2}; {:.0} s",
        machine.cpus,
        machine.kernel,
        machine.qemu,
        machine.commit,
        machine.load_1m_before,
        machine.load_1m_after,
        machine.wall_s
    );
    if let Some(path) = &cli.json {
        let out = Output {
            machine,
            runs_per_case: cli.runs,
            cases: results
                .iter()
                .map(|r| CaseJson {
                    result: r,
                    katamaran_summary: report::summarise(&r.katamaran),
                    bare_summary: report::summarise(&r.bare),
                })
                .collect(),
            relay: relay_result.as_ref(),
            route_swap: route_result.as_ref(),
            targets,
        };
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        info!(path = %path.display(), "JSON written");
    }
    Ok(all_ok)
}

fn log_baseline(case: &Case, b: &Baseline) {
    let r = &b.probe;
    let get = |k: &str| r.metrics.get(k).map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    if !r.ok {
        warn!("{case} baseline FAILED: {}", r.error.as_deref().unwrap_or("?"));
    } else if let Some(excuse) = b.lab_excuse() {
        warn!("{case} {excuse}; its packet-loss target reads `lab`");
    } else {
        info!(
            "{case} baseline: sent {}, lost {}, gap {} ms over {:.1} s (load {:.2})",
            get(report::m::SENT),
            get(report::m::LOST),
            get(report::m::GAP_MS),
            b.window_s,
            r.load_1m
        );
    }
}

fn log_run(driver: &str, case: &Case, runs: u32, r: &Run) {
    let get = |k: &str| r.metrics.get(k).map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    if r.ok {
        info!(
            "{case} {driver} run {}/{runs}: total {} ms, downtime {} ms, lost {}, gap {} ms (load {:.2})",
            r.run,
            get(report::m::TOTAL_MS),
            get(report::m::DOWNTIME_MS),
            get(report::m::LOST),
            get(report::m::GAP_MS),
            r.load_1m
        );
    } else {
        warn!("{case} {driver} run {}/{runs} FAILED: {}", r.run, r.error.as_deref().unwrap_or("?"));
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("katamaran-bench").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn baseline_window_defaults_to_3s_and_can_be_skipped() {
        let cli = parse(&[]).expect("defaults");
        assert_eq!(cli.baseline_window(), Some(Duration::from_secs(3)));
        let cli = parse(&["--baseline", "500ms"]).expect("a duration");
        assert_eq!(cli.baseline_window(), Some(Duration::from_millis(500)));
        let cli = parse(&["--baseline", "10s"]).expect("a duration");
        assert_eq!(cli.baseline_window(), Some(Duration::from_secs(10)));
        assert_eq!(parse(&["--no-baseline"]).expect("skip").baseline_window(), None);
        assert!(parse(&["--baseline", "three"]).is_err(), "not a duration");
        assert!(parse(&["--baseline", "2s", "--no-baseline"]).is_err(), "contradictory");
    }
}
