//! `katamaran-qemu-standin`: a stand-in for `qemu-system-x86_64` that katamaran's agents can
//! migrate, for the kernel lab, where a real QEMU guest cannot run (nested TCG is 40–70× too
//! slow, docs/KERNEL-LAB.md).
//!
//! It runs no guest. It takes the command line Kata (and katamaran's destination rewrite) gives
//! QEMU, opens the tap by name, serves QMP on the `-qmp` unix sockets, and plays a guest that
//! answers ARP, ping and UDP echo on port 7 while it runs — and reads nothing from its tap while
//! it is stopped, as a paused VM does, so the frames queue there for the engine's tap drain.
//!
//! ```text
//! source stand-in                                        destination stand-in (-incoming defer -S)
//!  getfd kmr-ram + migrate fd:kmr-ram                     getfd kmr-ram + migrate-incoming fd:kmr-ram
//!  MIGRATION setup, active                                MIGRATION setup, active
//!  passes: every dirty byte ══ RAM frames ══════════════▶ counted
//!   the guest dirties KATAMARAN_STANDIN_DIRTY bytes/s while it runs
//!   pass end: sync (dirty-sync-count + 1, MIGRATION_PASS);
//!   remaining ≤ bandwidth × downtime-limit ─▶ complete
//!  [`stop` from katamaran: STOP]
//!  completion: STOP (if running), MIGRATION device,
//!   the rest + device state + END ══════════════════════▶ all of RAM seen: paused,
//!                                 ◀══ return path: ack ══  MIGRATION completed
//!  MIGRATION completed (postmigrate, tap left unread)     `cont`: RESUME, the guest reads its tap
//! ```
//!
//! The completion rule is QEMU's: at a pass end the migration completes when what is dirty can
//! be sent within `downtime-limit` at the switchover bandwidth (`avail-switchover-bandwidth`
//! when set, else the pass's measured rate). Every stand-in on both sides is the same program,
//! so the stream format ([`stream`]) is its own.

pub mod args;
pub mod frames;
pub mod guest;
pub mod qmp;
pub mod stream;
pub mod tap;
pub mod vm;

/// What can go wrong, one variant per failure site.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line asks for something the stand-in cannot do.
    #[error("{0}")]
    Usage(String),
    /// The tap could not be opened.
    #[error("cannot open tap {0:?}")]
    Tap(String, #[source] std::io::Error),
    /// A QMP socket could not be served.
    #[error("cannot serve QMP on {0}")]
    Qmp(std::path::PathBuf, #[source] std::io::Error),
    /// The pid file could not be written.
    #[error("cannot write the pid file {0}")]
    PidFile(std::path::PathBuf, #[source] std::io::Error),
    /// The migration stream broke.
    #[error("migration stream: {0}")]
    Stream(String),
    /// The migration stream's socket failed.
    #[error("migration stream I/O")]
    StreamIo(#[source] std::io::Error),
}
