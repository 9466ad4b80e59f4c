//! The migration state machine and the pure decisions it takes.

pub mod cancel;
pub mod cleanup;
pub mod ctl;
pub mod dest;
pub mod error;
pub mod events;
pub mod failpoint;
pub mod journal;
pub mod network;
pub mod options;
pub mod protocol;
pub mod qemu;
pub mod source;
pub mod vm_status;

pub use cleanup::Cleanup;
pub use events::{Event, EventLog, Phase, Role};
pub use options::{MigrationOptions, StorageMode, TunnelMode};
