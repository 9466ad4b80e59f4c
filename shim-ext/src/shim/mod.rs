//! `containerd-shim-katamaran-v2`: a launcher-only wrapper around the Kata shim, and the life
//! cycle of the per-sandbox extension it starts.
//!
//! containerd runs the wrapper as a v2 shim binary for the `kata-katamaran` RuntimeClass. The
//! wrapper runs the delegate (Kata's `containerd-shim-kata-v2`) with the same arguments,
//! environment and stdin and hands its address back unchanged; from then on containerd speaks the
//! Task API straight to the delegate, so nothing is proxied and any containerd version works.
//!
//! ```text
//! containerd            wrapper (start)                 delegate start     extension
//!   │ exec start ──────────▶│ read bundle: sandbox?           │                    │
//!   │                       │ socket free? agent present?     │                    │
//!   │                       │ become child subreaper          │                    │
//!   │                       │ run delegate, same argv/env/stdin ─▶ fork long-running shim
//!   │◀── address (delegate's stdout, untouched) ──────────────│ exit 0             │
//!   │                       │ shim pid: <bundle>/shim.pid, else the one orphan now our child
//!   │                       │ spawn detached: katamaran-agent sandbox --id ID
//!   │                       │   --exit-with-pid SHIM ─────────────────────────────▶│ serves
//!   │                       │ write <katamaran_run>/sandboxes/<id>.pid; exit 0     │ <id>.sock
//!   │ Task API ──────────────────────────────────────────────▶ shim (Kata)         │
//!   │                                                          shim exits ────────▶│ ends itself
//!   │ exec delete (dead shim) ─▶ run delegate delete (its stdout untouched),       │
//!   │                            then stop the extension by its pid file ─────────▶│ (if alive)
//! ```
//!
//! Rules that follow from how containerd calls shims:
//! - `start`'s stdout **and stderr** are read together as the address (containerd uses combined
//!   output), so after the delegate succeeds the wrapper writes nothing to either: the extension's
//!   output and the wrapper's own notes go to `<katamaran_run>/logs/<id>.log`.
//! - everything that can refuse a start (bad bundle, socket held, agent missing) is checked before
//!   the delegate runs, so a refusal never leaves a shim behind.
//! - `delete` runs only after a shim died or exited (normal teardown goes through the Task API), so
//!   the extension ends itself when the shim process exits; `delete` stopping it is a backstop.
//! - for workload containers Kata answers `start` with the sandbox shim's address; the wrapper
//!   passes it through and starts nothing.

pub mod agent;
pub mod args;
pub mod config;
pub mod decide;
mod delegate;
pub mod extension;
mod process;
pub mod wrapper;

use std::path::PathBuf;

pub use args::{Action, ShimArgs};
pub use config::{ExtensionPolicy, WrapperConfig};

/// Errors of the wrapper and of stopping an extension.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line is not one containerd would give a shim.
    #[error("bad shim command line: {0}")]
    Usage(String),
    /// The configuration file exists but cannot be read.
    #[error("cannot read the configuration file {path}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for the wrapper.
    #[error("invalid configuration file {path}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: toml::de::Error,
    },
    /// A configuration value (file or environment) is unusable.
    #[error("invalid configuration value {key} = {value:?}: {why}")]
    ConfigValue {
        /// The key or environment variable.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// The working directory (containerd's bundle) is unknown.
    #[error("cannot determine the bundle directory (the working directory)")]
    Cwd(#[source] std::io::Error),
    /// The bundle's `config.json` cannot be read.
    #[error("cannot read the OCI bundle of container {id}")]
    Bundle {
        /// The container id.
        id: String,
        /// What sandbox discovery reported (names the file).
        #[source]
        source: crate::sandbox::Error,
    },
    /// The container id cannot name a socket.
    #[error("container id cannot name an extension socket")]
    SandboxId(#[source] crate::sandbox::Error),
    /// A live server already answers on the sandbox's extension socket.
    #[error(
        "sandbox {id}: a live server already holds the extension socket {socket}; refusing to start \
         a second extension for the same sandbox id (stop that server or remove the socket)"
    )]
    SocketHeld {
        /// The sandbox id.
        id: String,
        /// The socket path.
        socket: PathBuf,
    },
    /// The extension binary is not there.
    #[error("extension binary {path} not found (set KATAMARAN_AGENT or `agent` in the configuration file)")]
    AgentMissing {
        /// The path or name looked for.
        path: PathBuf,
    },
    /// The delegate shim binary is not there.
    #[error(
        "delegate shim {program} not found (set KATAMARAN_DELEGATE_SHIM or `delegate` in the \
         configuration file)"
    )]
    DelegateMissing {
        /// The program looked for.
        program: PathBuf,
    },
    /// The delegate shim could not be run.
    #[error("cannot run the delegate shim {program}")]
    DelegateSpawn {
        /// The program.
        program: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the delegate failed.
    #[error("cannot wait for the delegate shim {program}")]
    DelegateWait {
        /// The program.
        program: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The wrapper could not become a child subreaper (needed to see the delegate's shim).
    #[error("cannot become a child subreaper")]
    Subreaper(#[source] nix::Error),
    /// A directory or file under katamaran's run directory could not be prepared.
    #[error("cannot prepare {path}")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The long-running shim process could not be identified.
    #[error(
        "cannot tell the delegate's long-running shim process: no shim.pid in {bundle} and {orphans} \
         orphaned children"
    )]
    ShimPidUnknown {
        /// The bundle directory.
        bundle: PathBuf,
        /// How many processes were left to the wrapper.
        orphans: usize,
    },
    /// The extension could not be spawned.
    #[error("cannot start the extension {program}")]
    ExtensionSpawn {
        /// The program.
        program: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A process operation (pidfd, signal, wait) on the extension failed.
    #[error("extension of sandbox {id} (pid {pid}): cannot {what}")]
    Process {
        /// The sandbox id.
        id: String,
        /// The extension's pid.
        pid: u32,
        /// The operation, e.g. "send SIGTERM".
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The extension outlived SIGTERM and SIGKILL.
    #[error("extension of sandbox {id} (pid {pid}) still runs after SIGKILL")]
    Unkillable {
        /// The sandbox id.
        id: String,
        /// The extension's pid.
        pid: u32,
    },
}
