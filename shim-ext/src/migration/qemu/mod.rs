//! QMP sequences of the storage and compute phases. No policy, no netlink: the state machine
//! (`source.rs`, `dest.rs`) decides when each step runs; these functions run one step against
//! one QEMU and report by name what failed.
//!
//! Node-local storage, in the order that kept every guest write (DESIGN.md, storage ordering):
//!
//! ```text
//!  source QEMU                               destination QEMU (-incoming defer)
//!  ───────────                               ──────────────────────────────────
//!  tls::add (client)                         tls::add (server): object-add tls-creds-x509
//!                                            list_disks, export_disks
//!                                              nbd-server-start (tls-creds), block-export-add ×N
//!  list_disks, start_mirror ×N
//!    blockdev-add nbd (tls-creds) ── NBD ──▶ (export, writable)
//!    blockdev-mirror sync=full
//!  wait_ready  (BLOCK_JOB_READY ×N)
//!                                            configure_incoming, start_incoming
//!  configure (pause-before-switchover)         migrate-set-capabilities, migrate-incoming
//!  tls::use_for_migration                    tls::use_for_migration (before migrate-incoming)
//!  start_outgoing  ─────────── RAM ────────▶
//!  wait_status(pre-switchover)   ◀── vCPUs stopped: downtime starts
//!  complete_consistent
//!    block-job-cancel ×N → BLOCK_JOB_COMPLETED (target consistent), blockdev-del
//!                                            stop_exports
//!                                              block-export-del → BLOCK_EXPORT_DELETED,
//!                                              nbd-server-stop (before the VM may run)
//!  continue_after_switchover ── device state ─▶
//!  wait_terminal: completed                  wait_terminal: completed, VM running
//! ```
//!
//! Failure or cancel: [`mirror::abort`] on the source (force-cancel, remove the NBD nodes),
//! [`compute::cancel`], and [`storage::stop_exports`] on the destination.
//!
//! | file | what it holds |
//! |---|---|
//! | `bus.rs` | [`EventBus`]: one QMP event stream fanned out to every waiter |
//! | `features.rs` | [`QemuFeatures`]: commands and capabilities of the running QEMU |
//! | `compute.rs` | RAM capabilities and parameters, `migrate`, progress, switch-over |
//! | `dirty_rate.rs` | the guest's dirty rate, sampled before pre-copy's first sync |
//! | `disks.rs` | [`DiskInfo`] from `query-block` |
//! | `storage.rs` | destination: NBD server and exports |
//! | `mirror.rs` | source: NBD client nodes and mirror jobs |
//! | `tls.rs` | [`TlsCreds`]: the stream TLS credentials object of a migration |
//! | `error.rs` | [`QemuError`] |

pub mod bus;
pub mod compute;
pub mod dirty_rate;
pub mod disks;
mod error;
pub mod features;
pub mod mirror;
pub mod storage;
pub mod tls;

pub use bus::{EventBus, Subscription, WaitError};
pub use compute::{MigrationEnd, RamConfig};
pub use disks::{list_disks, DiskInfo};
pub use error::QemuError;
pub use features::QemuFeatures;
pub use mirror::MirrorJob;
pub use storage::{NbdAddress, NbdExports};
pub use tls::TlsCreds;
