//! Sandbox discovery: where a Kata sandbox's pieces live, what its OCI bundle says, and how its
//! QEMU command line becomes the destination's.
//!
//! Nothing here talks to QEMU or netlink; everything is files and pure functions, so it is tested
//! with tables and temporary directories.

pub mod allowlist;
pub mod bundle;
pub mod cmdline;
pub mod layout;
pub mod qemu_options;

pub use allowlist::CmdlinePolicy;
pub use bundle::{BundleInfo, ContainerType};
pub use cmdline::{IncomingRewrite, QemuCmdline};
pub use layout::NodeLayout;

/// Validates a sandbox id before it becomes part of a path, a socket name or a QEMU argument.
///
/// containerd sandbox ids are 64 hex characters; CRI-O and tests use other shapes, so the rule is
/// the conservative superset: 1–128 characters from `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
///
/// # Errors
/// [`Error::InvalidSandboxId`] naming the offending id.
pub fn validate_sandbox_id(id: &str) -> Result<(), Error> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    let ok = !id.is_empty() && id.len() <= 128 && !id.starts_with(['.', '-']) && id.chars().all(ok_char);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSandboxId(id.to_owned()))
    }
}

impl Error {
    /// Whether the error is about the request itself (a command line or sandbox id the caller
    /// sent), as opposed to the node's state: callers map it to `INVALID_ARGUMENT`.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Error::InvalidSandboxId(_)
                | Error::Cmdline(_)
                | Error::UnknownOption(_)
                | Error::OptionRefused { .. }
                | Error::PropertyRefused { .. }
        )
    }
}

/// Errors of sandbox discovery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sandbox id that cannot be used in a path.
    #[error(
        "invalid sandbox id {0:?}: expected 1-128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'"
    )]
    InvalidSandboxId(String),
    /// The bundle's `config.json` could not be read or parsed.
    #[error("cannot read OCI bundle config {path}")]
    BundleConfig {
        /// The `config.json` path.
        path: std::path::PathBuf,
        /// What oci-spec reported.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// The bundle lacks something the extension needs.
    #[error("OCI bundle {path} has no {what}")]
    BundleMissing {
        /// The `config.json` path.
        path: std::path::PathBuf,
        /// What is missing, e.g. "network namespace path".
        what: &'static str,
    },
    /// A file under Kata's run directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Kata's pid file does not hold a pid.
    #[error("pid file {path} holds {content:?}, not a process id")]
    BadPidFile {
        /// The pid file.
        path: std::path::PathBuf,
        /// What it held (trimmed).
        content: String,
    },
    /// The QEMU command line cannot be migrated as it is.
    #[error("QEMU command line: {0}")]
    Cmdline(String),
    /// An option neither QEMU 7.2 nor 10.x knows: the parser cannot tell whether it takes an
    /// argument, so it does not guess.
    #[error("QEMU command line: -{0} is not an option of QEMU 7.2 or 10.x")]
    UnknownOption(String),
    /// An option the destination does not run from a migration source.
    #[error("QEMU command line: option -{option} is refused: {reason}")]
    OptionRefused {
        /// The option, without dashes.
        option: String,
        /// Why.
        reason: String,
    },
    /// A property (or the value) of an allowed option that is not allowed.
    #[error("QEMU command line: option -{option} property {property:?} is refused: {reason}")]
    PropertyRefused {
        /// The option, without dashes.
        option: String,
        /// The property (empty for the option's whole value).
        property: String,
        /// Why.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids() {
        let table = [
            ("4f1c2ab0d8e9f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2", true),
            ("web-0_sandbox.1", true),
            ("a", true),
            ("", false),
            ("../etc", false),
            (".hidden", false),
            ("-rf", false),
            ("a/b", false),
            ("a b", false),
            ("id\0", false),
        ];
        for (id, ok) in table {
            assert_eq!(validate_sandbox_id(id).is_ok(), ok, "{id:?}");
        }
        assert!(validate_sandbox_id(&"x".repeat(129)).is_err());
        let msg = validate_sandbox_id("a/b").expect_err("slash").to_string();
        assert!(msg.contains("\"a/b\""), "{msg}");
    }

    #[test]
    fn refused_command_lines_are_invalid_requests() {
        let refused = IncomingRewrite {
            qemu_binary: "qemu".into(),
            state_dir: "/run/katamaran/incoming/a".into(),
            source_state_dirs: vec!["/run/vc/vm/a".into()],
            tap_name: "tap0_kata".into(),
            disk_paths: Default::default(),
            allowed_roots: Vec::new(),
        };
        for argv in [
            &["qemu", "-plugin", "x"][..],
            &["qemu", "-kernel", "/etc/passwd"],
            &["qemu", "-serial", "stdio"],
        ] {
            let err = refused.apply(&QemuCmdline::parse(argv).expect("parse")).expect_err("refused");
            assert!(err.is_invalid_request(), "{err}");
        }
        assert!(QemuCmdline::parse(&["qemu", "-bogus"]).expect_err("unknown").is_invalid_request());
        let io = Error::Read { path: "/proc/1/cmdline".into(), source: std::io::ErrorKind::NotFound.into() };
        assert!(!io.is_invalid_request());
    }
}
