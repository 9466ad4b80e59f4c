//! `containerd-shim-katamaran-v2` — the launcher-only shim containerd runs for the
//! `kata-katamaran` RuntimeClass (`runtime_type = "io.containerd.katamaran.v2"`): it runs the Kata
//! shim with the same arguments and hands its address back, and starts the per-sandbox extension
//! next to each Kata sandbox. See [`katamaran::shim`].
//!
//! Configuration: `/etc/katamaran/shim.toml` (or `KATAMARAN_SHIM_CONFIG`), overridden by
//! `KATAMARAN_DELEGATE_SHIM`, `KATAMARAN_AGENT`, `KATAMARAN_ROOT`, `KATAMARAN_EXTENSION`,
//! `KATAMARAN_NODE_ADDRESS` in containerd's environment.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(katamaran::shim::wrapper::main(std::env::args_os().skip(1).collect()))
}
