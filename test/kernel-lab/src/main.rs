//! `katamaran-kernel-lab`: runs the kernel lab's checks (inside the lab VM, as root) and prints
//! one `KERNEL-LAB-CHECK` line per check and a final `KERNEL-LAB-RESULT {json}` line.
//!
//! Exit status: 0 every check passed (or was skipped with `--allow-missing`), 1 a check failed,
//! 2 usage error, 3 the checks cannot run here (not root).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use katamaran_kernel_lab::checks::{self, Check, Options};
use katamaran_kernel_lab::report::{Status, Summary, RUN_PREFIX};

#[derive(Debug, Parser)]
#[command(
    name = "katamaran-kernel-lab",
    version,
    about = "Runs the kernel lab's checks (as root, in the lab VM)"
)]
struct Cli {
    /// Run only these checks (comma-separated); default: all, in order.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Check>,
    /// shim-ext's `net_netns` test binary, run by the `netns-suite` check.
    #[arg(long)]
    suite: Option<PathBuf>,
    /// `katamaran-agent`, for the engine-cutover check (default: next to this program).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// `katamaran-qemu-standin`, for the engine-cutover check (default: next to this program).
    #[arg(long)]
    standin: Option<PathBuf>,
    /// Skip (rather than fail) checks whose kernel features are missing (for a development host).
    #[arg(long)]
    allow_missing: bool,
    /// Deadline of each check.
    #[arg(long, default_value = "180s", value_parser = katamaran_probe::duration::parse_duration)]
    check_timeout: Duration,
    /// Also write the result JSON to this file (written, then renamed into place), so that
    /// the VM's /init can tell a runner that died from one that reported.
    #[arg(long)]
    result_file: Option<PathBuf>,
    /// Print the check names and exit.
    #[arg(long)]
    list: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if cli.list {
        for c in Check::ALL {
            println!("{c}");
        }
        return ExitCode::SUCCESS;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("katamaran-kernel-lab: must run as root (it creates network namespaces)");
        return ExitCode::from(3);
    }
    let selected: Vec<Check> = if cli.only.is_empty() { Check::ALL.to_vec() } else { cli.only.clone() };
    let opts = Options {
        suite: cli.suite.clone(),
        allow_missing: cli.allow_missing,
        check_timeout: cli.check_timeout,
        programs: {
            let beside = checks::engine::Programs::beside_self();
            checks::engine::Programs {
                agent: cli.agent.clone().unwrap_or(beside.agent),
                standin: cli.standin.clone().unwrap_or(beside.standin),
            }
        },
    };
    let started = Instant::now();
    let mut reports = Vec::with_capacity(selected.len());
    for check in selected {
        println!("{RUN_PREFIX} {check}");
        let report = checks::run(check, &opts).await;
        println!("{}", report.line());
        reports.push(report);
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let summary = Summary::new(kernel, reports, started.elapsed().as_secs_f64());
    println!("{}", summary.result_line());
    if let Some(path) = &cli.result_file {
        if let Err(e) = write_atomically(path, summary.result_line().as_bytes()) {
            eprintln!("katamaran-kernel-lab: cannot write {}: {e}", path.display());
        }
    }
    if summary.checks.iter().any(|c| c.status == Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
