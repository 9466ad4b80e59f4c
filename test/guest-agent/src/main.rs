//! `katamaran-guest SUBCOMMAND [--flags]`: see `katamaran-guest help`.
//!
//! Exit status: 0 on success, 1 when a check finds a problem, 2 for usage errors, 3 when the
//! subcommand failed to run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use katamaran_guest::args::{switch, value, ArgError, Args};
use katamaran_guest::dirty::{run_dirty, DirtyConfig, CHECK_LINE, FILLED_LINE, PREFIX, STALE_LINE};
use katamaran_guest::net::{self, PageInfo};
use katamaran_guest::record::DEFAULT_RECORD_SIZE;
use katamaran_guest::writer::{self, run_writer, WriterConfig};
use katamaran_guest::{check, sys};

const USAGE: &str = "\
katamaran-guest: the katamaran lab guest's agent

usage: katamaran-guest SUBCOMMAND [OPTIONS]

  udp-echo     [--port 7] [--ready-file PATH]
               echo UDP datagrams back verbatim (IPv4 and IPv6)
  http         [--port 80] [--instance NAME] [--status-dir /run/katamaran/disks] [--ready-file PATH]
               GET / answers {\"instance\", \"uptime_ms\", \"hostname\", \"boot_id\", \"disk_records\"}
  disk-writer  --device /dev/vdb [--rate 50] [--record-size 4096] [--count N]
               [--status-dir /run/katamaran/disks] [--ready-file PATH]
               append durable sequence-numbered records from offset 0 until the device is full
  disk-check   --image PATH [--json] [--record-size 4096]
               verify a disk log; exit 0 when ok, 1 on any error
  disk-compare --prefix SRC --full DST [--json] [--record-size 4096]
               SRC's log must be a byte-identical prefix of DST's; exit 0 when it is, 1 if not
  dirty-mem    --mb N [--rate-mb-per-s R] [--duration 60s] [--fill TEXT]
               keep N MiB of memory dirty, R MiB/s (default: as fast as possible), and check
               that every page keeps what was last written to it (`STALE MEMORY:` lines on
               stderr; exit 1 after --duration when a page lost a write)

--ready-file is created once the service is up (the guest's init waits for it).
";

/// Where disk writers publish their progress and the HTTP page reads it.
const STATUS_DIR: &str = "/run/katamaran/disks";

/// How a subcommand ended, as an exit status.
enum Outcome {
    Ok,
    CheckFailed,
}

/// A subcommand's failure, reported once with its cause chain.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Usage(#[from] ArgError),
    #[error(transparent)]
    Run(Box<dyn std::error::Error + Send + Sync>),
}

fn run_err(e: impl std::error::Error + Send + Sync + 'static) -> Failure {
    Failure::Run(Box::new(e))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "udp-echo" => udp_echo(rest),
        "http" => http(rest),
        "disk-writer" => disk_writer(rest),
        "disk-check" => disk_check(rest),
        "disk-compare" => disk_compare(rest),
        "dirty-mem" => dirty_mem(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(Outcome::Ok)
        }
        "--version" | "version" => {
            println!("katamaran-guest {}", env!("CARGO_PKG_VERSION"));
            Ok(Outcome::Ok)
        }
        other => Err(Failure::Usage(ArgError::Unknown(other.to_owned()))),
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::CheckFailed) => ExitCode::from(1),
        Err(Failure::Usage(e)) => {
            eprintln!("katamaran-guest {cmd}: {e}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("katamaran-guest {cmd}: {}", chain(e.as_ref()));
            ExitCode::from(3)
        }
    }
}

/// `error: cause: cause`, the whole chain once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn ready(args: &Args) -> Result<(), Failure> {
    if let Some(path) = args.get("ready-file") {
        writer::write_marker(&PathBuf::from(path)).map_err(run_err)?;
    }
    Ok(())
}

fn udp_echo(rest: &[String]) -> Result<Outcome, Failure> {
    let args = Args::parse(rest, &[value("port"), value("ready-file")])?;
    let port = args.parse_or("port", 7u16, "a port number")?;
    let socket = net::bind_udp(port).map_err(run_err)?;
    ready(&args)?;
    eprintln!("katamaran-guest udp-echo: listening on udp port {port}");
    net::serve_echo(&socket, &AtomicBool::new(false)).map_err(run_err)?;
    Ok(Outcome::Ok)
}

fn http(rest: &[String]) -> Result<Outcome, Failure> {
    let args =
        Args::parse(rest, &[value("port"), value("instance"), value("status-dir"), value("ready-file")])?;
    let port = args.parse_or("port", 80u16, "a port number")?;
    let info = PageInfo {
        instance: net::instance_name(args.get("instance")),
        status_dir: PathBuf::from(args.get("status-dir").unwrap_or(STATUS_DIR)),
    };
    let listener = net::bind_tcp(port).map_err(run_err)?;
    ready(&args)?;
    eprintln!("katamaran-guest http: serving instance {:?} on tcp port {port}", info.instance);
    net::serve_http(&listener, &info, &AtomicBool::new(false)).map_err(run_err)?;
    Ok(Outcome::Ok)
}

fn disk_writer(rest: &[String]) -> Result<Outcome, Failure> {
    let args = Args::parse(
        rest,
        &[
            value("device"),
            value("rate"),
            value("record-size"),
            value("count"),
            value("status-dir"),
            value("ready-file"),
        ],
    )?;
    let device = PathBuf::from(args.required("device")?);
    let name = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "disk".into());
    let cfg = WriterConfig {
        rate: args.parse_or("rate", writer::DEFAULT_RATE, "a number of records per second")?,
        record_size: args.parse_or("record-size", DEFAULT_RECORD_SIZE, "a size in bytes")?,
        limit: args.get("count").map(|_| args.parse_or("count", 0u64, "a number of records")).transpose()?,
        status_file: Some(PathBuf::from(args.get("status-dir").unwrap_or(STATUS_DIR)).join(name)),
        ready_file: args.get("ready-file").map(PathBuf::from),
        device,
    };
    run_writer(&cfg, &AtomicBool::new(false)).map_err(run_err)?;
    Ok(Outcome::Ok)
}

fn disk_check(rest: &[String]) -> Result<Outcome, Failure> {
    let args = Args::parse(rest, &[value("image"), switch("json"), value("record-size")])?;
    let image = PathBuf::from(args.required("image")?);
    let hint = args.parse_or("record-size", DEFAULT_RECORD_SIZE, "a size in bytes")?;
    let report = check::check_image(&image, hint).map_err(run_err)?;
    if args.has("json") {
        println!("{}", report.to_json());
    } else {
        println!("{}: {}", image.display(), report.to_text());
    }
    Ok(if report.ok() { Outcome::Ok } else { Outcome::CheckFailed })
}

fn disk_compare(rest: &[String]) -> Result<Outcome, Failure> {
    let args = Args::parse(rest, &[value("prefix"), value("full"), switch("json"), value("record-size")])?;
    let prefix = PathBuf::from(args.required("prefix")?);
    let full = PathBuf::from(args.required("full")?);
    let hint = args.parse_or("record-size", DEFAULT_RECORD_SIZE, "a size in bytes")?;
    let report = check::compare_images(&prefix, &full, hint).map_err(run_err)?;
    if args.has("json") {
        println!("{}", report.to_json());
    } else {
        println!("{} vs {}: {}", prefix.display(), full.display(), report.to_text());
    }
    Ok(if report.ok() { Outcome::Ok } else { Outcome::CheckFailed })
}

fn dirty_mem(rest: &[String]) -> Result<Outcome, Failure> {
    let args = Args::parse(rest, &[value("mb"), value("rate-mb-per-s"), value("duration"), value("fill")])?;
    let mb = args.required("mb").and_then(|_| args.parse_or("mb", 0usize, "a number of MiB"))?;
    let rate =
        args.get("rate-mb-per-s").map(|_| args.parse_or("rate-mb-per-s", 0f64, "a number")).transpose()?;
    let fill = args.get("fill").map(|f| f.as_bytes().to_vec()).unwrap_or_default();
    let cfg = DirtyConfig { mb, rate_mb_per_s: rate, duration: args.duration("duration")?, fill };
    eprintln!(
        "{PREFIX} {mb} MiB at {} (uptime {} ms)",
        rate.map_or("full speed".to_owned(), |r| format!("{r} MiB/s")),
        sys::uptime_ms().unwrap_or(0)
    );
    let filled = cfg.fill.len();
    let mut reported = 0u64;
    let mut last_report: Option<std::time::Instant> = None;
    let done = run_dirty(
        &cfg,
        &AtomicBool::new(false),
        || {
            if filled > 0 {
                eprintln!("{FILLED_LINE} ({mb} MiB)");
            }
        },
        |m| {
            // The first stale page at once, then at most a line a second with the count.
            if last_report.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                eprintln!(
                    "{STALE_LINE} page {} holds round {}, last written {} ({} stale page(s) so far, uptime {} ms)",
                    m.page,
                    m.found,
                    m.expected,
                    m.total,
                    sys::uptime_ms().unwrap_or(0)
                );
                last_report = Some(std::time::Instant::now());
                reported = m.total;
            }
        },
        |d| {
            eprintln!(
                "{CHECK_LINE} {} pages verified, {} stale (uptime {} ms)",
                d.verified_pages,
                d.stale_pages,
                sys::uptime_ms().unwrap_or(0)
            );
        },
    )
    .map_err(run_err)?;
    if done.stale_pages > reported {
        eprintln!("{STALE_LINE} {} stale page(s) in all", done.stale_pages);
    }
    eprintln!("{PREFIX} dirtied {} MiB", done.bytes >> 20);
    Ok(if done.stale_pages == 0 { Outcome::Ok } else { Outcome::CheckFailed })
}
