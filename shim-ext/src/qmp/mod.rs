//! The QMP client: handshake, commands, events, deadlines — no migration policy.
//!
//! Our own small client on `serde_json` and tokio (DESIGN.md decision 1): generated QAPI
//! bindings reject unknown enum values, and a newer QEMU always has some.
//!
//! ```no_run
//! # async fn demo() -> Result<(), katamaran::qmp::QmpError> {
//! use katamaran::qmp::{QmpClient, QmpConfig};
//!
//! let (qmp, mut events) = QmpClient::connect("/run/vc/vm/ID/extra-monitor.sock", &QmpConfig::default()).await?;
//! println!("QEMU {}", qmp.greeting().version);
//! qmp.stop().await?;
//! // `STOP` is already queued: the reader keeps wire order and QEMU emits it before the reply.
//! if let Ok(event) = events.try_recv() {
//!     println!("{} after {:?}", event.name, event.delivery_latency());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! | file | what it holds |
//! |---|---|
//! | `codec.rs` | bytes → lines (capped) → [`Message`]; pure, fuzzed |
//! | `client.rs` | [`QmpClient`]: handshake, reader and writer tasks, id matching, deadlines, fd passing |
//! | `commands.rs` | typed calls: `query-status`, `query-migrate`, `stop`, `cont`, `getfd`, … |
//! | `types.rs` | tolerant typed views of replies; enums with a catch-all |
//! | `event.rs` | [`QmpEvent`] with QEMU's timestamp and our receive time |
//! | `error.rs` | [`QmpError`] |
//!
//! Failure policy: an error reply fails only its command. A line over the cap, a line that is
//! not a JSON object, or a failed read or write ends the connection: every pending and later
//! command fails with [`QmpError::ConnectionFailed`] (or [`QmpError::Closed`] when QEMU closed
//! the socket), and the event channel ends. Unknown members, unknown enum values and unknown
//! message kinds never fail anything.

#[macro_use]
mod macros;

mod client;
pub mod codec;
mod commands;
mod error;
mod event;
mod types;

pub use client::{EventReceiver, QmpClient, QmpConfig};
pub use codec::{LineDecoder, Message, RawEvent, DEFAULT_MAX_LINE};
pub use error::QmpError;
pub use event::{EventKind, QmpEvent};
pub use types::{
    ErrorClass, Greeting, MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationStatus,
    QemuVersion, RamStats, RunState, StatusInfo,
};
