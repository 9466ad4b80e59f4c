//! The migration state machine and the pure decisions it takes.

pub mod options;

pub use options::{MigrationOptions, StorageMode, TunnelMode};
