//! `katamaran-qemu-standin`: see the library's documentation. Takes QEMU's command line.
//!
//! Environment: `KATAMARAN_STANDIN_DIRTY` — bytes per second the guest dirties while it runs
//! (default 32 MiB/s, an idle Linux guest's order of magnitude).
//!
//! Exit status: 0 on `quit`, 1 when it cannot start or an incoming migration fails, 2 usage.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use katamaran_qemu_standin::args::Args;
use katamaran_qemu_standin::vm::{Config, Vm};
use katamaran_qemu_standin::{guest, qmp, tap, Error};

/// The guest's default dirty rate.
const DEFAULT_DIRTY: u64 = 32 << 20;
/// The NIC's MAC when the command line names none (QEMU's default prefix).
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// `-h`, `-help`, `--help`.
const USAGE: &str = "\
usage: katamaran-qemu-standin [QEMU options]

A stand-in for qemu-system-x86_64 in katamaran's kernel lab (docs/KERNEL-LAB.md): it runs no
guest, serves the QMP and migration subset katamaran drives, and echoes on its tap.

Options it acts on (QEMU's syntax; any other option is accepted and ignored):
  -qmp unix:PATH,server=on[,wait=off]   serve QMP on PATH (0600, one client at a time; repeatable)
  -pidfile PATH                         write the process id
  -daemonize                            fork; the parent exits once the sockets are served
  -S                                    do not start the VM (it runs on `cont`)
  -incoming defer                       wait for migrate-incoming (fd: URIs only)
  -netdev tap,...,ifname=NAME           open tap NAME: the guest answers ARP, ping, UDP echo :7
  -device virtio-net-pci,...,mac=MAC    the guest NIC's address
  -m SIZE                               guest RAM the migration sends (default 128M)

Environment: KATAMARAN_STANDIN_DIRTY  bytes per second the guest dirties while it runs
(default 33554432).
Exit status: 0 on quit, 1 when it cannot start or an incoming migration fails, 2 usage.
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| matches!(a.as_str(), "-h" | "-help" | "--help")) {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("katamaran-qemu-standin: {e}");
            return ExitCode::from(2);
        }
    };
    let dirty_rate = match std::env::var("KATAMARAN_STANDIN_DIRTY") {
        Ok(v) => match v.parse() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("katamaran-qemu-standin: KATAMARAN_STANDIN_DIRTY={v:?} is not a number of bytes per second");
                return ExitCode::from(2);
            }
        },
        Err(_) => DEFAULT_DIRTY,
    };
    // Fork before any thread exists; the parent returns once the child serves its sockets.
    let ready = if args.daemonize {
        match daemonize() {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("katamaran-qemu-standin: cannot daemonize: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    match start(&args, dirty_rate) {
        Ok((vm, listeners)) => {
            if let Some(w) = ready {
                let _ = nix::unistd::write(&w, b"1");
            }
            run(&vm, listeners);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("katamaran-qemu-standin: {e}");
            ExitCode::from(1)
        }
    }
}

fn start(args: &Args, dirty_rate: u64) -> Result<(Arc<Vm>, Vec<UnixListener>), Error> {
    let tap = match &args.tap {
        Some(name) => {
            let f = tap::open(name)?;
            set_nonblocking(&f).map_err(|e| Error::Tap(name.clone(), e.into()))?;
            Some(f)
        }
        None => None,
    };
    let mut listeners = Vec::new();
    for path in &args.qmp {
        listeners.push(bind(path)?);
    }
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| Error::PidFile(p.clone(), e))?;
    }
    let vm = Vm::new(Config {
        ram_bytes: args.ram_bytes,
        dirty_rate,
        start_paused: args.start_paused,
        incoming: args.incoming,
        tap,
        mac: args.mac.unwrap_or(DEFAULT_MAC),
    });
    Ok((vm, listeners))
}

fn run(vm: &Arc<Vm>, listeners: Vec<UnixListener>) {
    for l in listeners {
        let vm = Arc::clone(vm);
        let spawned = std::thread::Builder::new().name("qmp".into()).spawn(move || qmp::serve(&vm, &l));
        if let Err(e) = spawned {
            eprintln!("katamaran-qemu-standin: cannot start a QMP thread: {e}");
            std::process::exit(1);
        }
    }
    if vm.tap().is_some() {
        guest::run(vm);
    } else {
        loop {
            std::thread::park();
        }
    }
}

/// A root-only socket at `path` (a stale one is replaced, as QEMU does).
fn bind(path: &Path) -> Result<UnixListener, Error> {
    let fail = |e| Error::Qmp(path.to_owned(), e);
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let l = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(l)
}

fn set_nonblocking(f: &std::fs::File) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL)?);
    fcntl(f, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// Forks: the child (a new session) gets the pipe's write end to report readiness; the parent
/// waits for that byte and exits 0, or 1 if the child died first (it never returns).
fn daemonize() -> nix::Result<std::os::fd::OwnedFd> {
    use nix::unistd::{fork, pipe, read, setsid, ForkResult};
    let (r, w) = pipe()?;
    // SAFETY: no other thread exists yet (main forks before starting any), so the child may run
    // arbitrary code.
    match unsafe { fork()? } {
        ForkResult::Child => {
            drop(r);
            setsid()?;
            Ok(w)
        }
        ForkResult::Parent { .. } => {
            drop(w);
            let mut b = [0u8; 1];
            let code = match read(&r, &mut b) {
                Ok(1) => 0,
                _ => 1,
            };
            std::process::exit(code);
        }
    }
}
