//! `katamaran-probe --target IP:PORT`: run the probe, print a summary on stderr, write the JSON
//! report where `--json` says.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use katamaran_probe::duration::parse_duration;
use katamaran_probe::{ProbeConfig, Report};
use nix::sys::signal::{SigSet, Signal};

/// Sequence-numbered UDP probe: sends to a UDP echo at a steady rate and reports lost,
/// duplicated and reordered packets, the longest gap without replies and round-trip times.
///
/// Exit status: 0 after a run (lost packets are in the report), 1 with --fail-on-loss when
/// anything was lost, 2 when the probe could not run.
#[derive(Debug, Parser)]
#[command(name = "katamaran-probe", version)]
struct Cli {
    /// The echo to probe: IPv4 `10.0.0.2:7` or IPv6 `[fd00::2]:7`.
    #[arg(long)]
    target: SocketAddr,
    /// Packets per second.
    #[arg(long, default_value_t = katamaran_probe::DEFAULT_RATE)]
    rate: u32,
    /// How long to send, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many packets (whichever of --duration and --count comes first).
    #[arg(long)]
    count: Option<u64>,
    /// Datagram size in bytes (32 to 65507).
    #[arg(long, default_value_t = katamaran_probe::DEFAULT_SIZE)]
    size: usize,
    /// How long to wait for late replies after the last send.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    grace: Duration,
    /// Write the JSON report to this file, or `-` for stdout.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Stop sending when this file appears.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Before counting, send until the first reply arrives, for at most this long (so the probe
    /// can start while the guest boots).
    #[arg(long, value_parser = parse_duration)]
    wait_ready: Option<Duration>,
    /// Exit 1 when any packet was lost.
    #[arg(long)]
    fail_on_loss: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(report) if cli.fail_on_loss && report.lost > 0 => ExitCode::from(1),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("katamaran-probe: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<Report> {
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(Arc::clone(&stop))?;
    let cfg = ProbeConfig {
        target: cli.target,
        rate: cli.rate,
        duration: cli.duration,
        count: cli.count,
        size: cli.size,
        grace: cli.grace,
        wait_ready: cli.wait_ready,
        stop_file: cli.stop_file.clone(),
        stop,
    };
    let report = katamaran_probe::run(&cfg).context("probe run failed")?;
    eprintln!("{report}");
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report).context("failed to serialise the report")?;
        if path.as_os_str() == "-" {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{json}").context("failed to write the report to stdout")?;
        } else {
            // Write then rename, so a reader polling for the file never sees half a report.
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, format!("{json}\n"))
                .with_context(|| format!("failed to write {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("failed to rename to {}", path.display()))?;
        }
    }
    Ok(report)
}

/// Blocks SIGINT/SIGTERM in every thread (set before any is spawned, so all inherit it) and
/// turns their delivery into the probe's stop flag from one waiting thread: no async-signal
/// handler needed.
fn watch_signals(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("failed to block SIGINT/SIGTERM")?;
    std::thread::Builder::new()
        .name("probe-signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!(signal = %sig, "stopping");
                stop.store(true, Ordering::Relaxed);
            }
        })
        .context("failed to start the signal thread")?;
    Ok(())
}
