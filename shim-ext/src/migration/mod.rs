//! The migration state machine and the pure decisions it takes.

pub mod cleanup;
pub mod events;
pub mod network;
pub mod options;
pub mod qemu;

pub use cleanup::Cleanup;
pub use events::{Event, EventLog, Phase, Role};
pub use options::{MigrationOptions, StorageMode, TunnelMode};
