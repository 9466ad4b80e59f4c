//! The wrapper's settings: `/etc/katamaran/shim.toml` (optional), overridden by environment
//! variables (containerd passes its own environment to shims, so a test or a systemd drop-in can
//! set them on containerd).
//!
//! ```toml
//! # /etc/katamaran/shim.toml — every key is optional
//! delegate = "/opt/kata/bin/containerd-shim-kata-v2"   # default: containerd-shim-kata-v2 on PATH
//! agent = "/opt/katamaran/bin/katamaran-agent"         # default: next to the wrapper, else PATH
//! root = "/"                      # re-roots every run directory (tests, two nodes on one host)
//! extension = "sandbox"           # sandbox | unannotated | off
//! node_address = ["10.0.0.11"]    # the extension's --node-address (one per family)
//! stop_timeout = "5s"             # delete: SIGTERM → SIGKILL grace for the extension
//! log = "info"                    # KATAMARAN_LOG of the extension when the environment has none
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::Error;
use crate::sandbox::NodeLayout;

/// Where the configuration file is looked for unless `KATAMARAN_SHIM_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/katamaran/shim.toml";
/// Kata's shim binary name (found on PATH).
pub const DEFAULT_DELEGATE: &str = "containerd-shim-kata-v2";
/// The extension's binary name.
pub const AGENT_NAME: &str = "katamaran-agent";
/// How long `delete` waits for the extension after SIGTERM: the agent's own shutdown is bounded
/// at about 2 s (open connections), so 5 s leaves room without holding containerd up for long.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable naming the configuration file.
pub const ENV_CONFIG: &str = "KATAMARAN_SHIM_CONFIG";
/// Environment variable overriding `delegate`.
pub const ENV_DELEGATE: &str = "KATAMARAN_DELEGATE_SHIM";
/// Environment variable overriding `agent`.
pub const ENV_AGENT: &str = "KATAMARAN_AGENT";
/// Environment variable overriding `root`.
pub const ENV_ROOT: &str = "KATAMARAN_ROOT";
/// Environment variable overriding `extension`.
pub const ENV_EXTENSION: &str = "KATAMARAN_EXTENSION";
/// Environment variable overriding `node_address` (comma-separated; the agent reads it too).
pub const ENV_NODE_ADDRESS: &str = "KATAMARAN_NODE_ADDRESS";
/// The agent's log filter variable.
pub const ENV_LOG: &str = "KATAMARAN_LOG";

/// Which containers get an extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionPolicy {
    /// Only CRI sandbox containers (`io.kubernetes.cri.container-type=sandbox`): one per pod VM.
    Sandbox,
    /// Also containers without any CRI annotation (`ctr run`), each being its own Kata VM.
    Unannotated,
    /// Never: the wrapper is a plain pass-through.
    Off,
}

impl std::str::FromStr for ExtensionPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sandbox" => Ok(Self::Sandbox),
            "unannotated" => Ok(Self::Unannotated),
            "off" => Ok(Self::Off),
            _ => Err("expected sandbox, unannotated or off".into()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    delegate: Option<PathBuf>,
    agent: Option<PathBuf>,
    root: Option<PathBuf>,
    extension: Option<String>,
    node_address: Option<Vec<String>>,
    stop_timeout: Option<String>,
    log: Option<String>,
}

/// The resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapperConfig {
    /// The delegate shim: a path, or a name looked up on PATH.
    pub delegate: PathBuf,
    /// The extension binary: a path, or a name looked up on PATH.
    pub agent: PathBuf,
    /// Root of every run directory (`/` on a node).
    pub root: PathBuf,
    /// Which containers get an extension.
    pub extension: ExtensionPolicy,
    /// The extension's node addresses (empty: none given).
    pub node_addresses: Vec<IpAddr>,
    /// SIGTERM → SIGKILL grace when `delete` stops an extension.
    pub stop_timeout: Duration,
    /// Log filter for the extension when `KATAMARAN_LOG` is not set.
    pub log: Option<String>,
}

impl WrapperConfig {
    /// Reads the configuration file (if present) and the environment of this process.
    ///
    /// # Errors
    /// [`Error::ConfigRead`] / [`Error::ConfigParse`] for an unreadable or invalid file,
    /// [`Error::ConfigValue`] for an unusable value.
    pub fn load() -> Result<Self, Error> {
        let path =
            std::env::var_os(ENV_CONFIG).map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(Error::ConfigRead { path, source }),
        };
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(AGENT_NAME)))
            .filter(|p| p.is_file());
        Self::from_sources(text.as_deref().map(|t| (path.as_path(), t)), |k| std::env::var(k).ok(), sibling)
    }

    /// Resolves the settings from a file's text, an environment and the agent found next to the
    /// wrapper; the environment wins over the file, the file over the defaults.
    ///
    /// # Errors
    /// As [`WrapperConfig::load`], without the I/O.
    pub fn from_sources(
        file: Option<(&Path, &str)>,
        env: impl Fn(&str) -> Option<String>,
        sibling_agent: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let f: FileConfig = match file {
            Some((path, text)) => {
                toml::from_str(text).map_err(|source| Error::ConfigParse { path: path.to_owned(), source })?
            }
            None => FileConfig::default(),
        };
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let delegate =
            env(ENV_DELEGATE).map(PathBuf::from).or(f.delegate).unwrap_or_else(|| DEFAULT_DELEGATE.into());
        let agent = env(ENV_AGENT)
            .map(PathBuf::from)
            .or(f.agent)
            .or(sibling_agent)
            .unwrap_or_else(|| AGENT_NAME.into());
        let root = env(ENV_ROOT).map(PathBuf::from).or(f.root).unwrap_or_else(|| "/".into());
        if !root.is_absolute() {
            return Err(bad("root", root.display().to_string(), "must be an absolute path"));
        }
        if delegate.as_os_str().is_empty() || agent.as_os_str().is_empty() {
            return Err(bad("delegate/agent", String::new(), "must not be empty"));
        }
        let extension = match env(ENV_EXTENSION).or(f.extension) {
            Some(v) => v.parse().map_err(|why| bad("extension", v, why))?,
            None => ExtensionPolicy::Sandbox,
        };
        let addresses: Vec<String> = match env(ENV_NODE_ADDRESS) {
            Some(v) => v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
            None => f.node_address.unwrap_or_default(),
        };
        let node_addresses = parse_addresses(&addresses)?;
        let stop_timeout = match f.stop_timeout {
            Some(v) => crate::cli::parse_duration(&v).map_err(|why| bad("stop_timeout", v, why))?,
            None => DEFAULT_STOP_TIMEOUT,
        };
        Ok(Self { delegate, agent, root, extension, node_addresses, stop_timeout, log: f.log })
    }

    /// The run directories under [`WrapperConfig::root`].
    pub fn layout(&self) -> NodeLayout {
        NodeLayout::under(&self.root)
    }
}

fn bad(key: &'static str, value: String, why: impl Into<String>) -> Error {
    Error::ConfigValue { key, value, why: why.into() }
}

fn parse_addresses(list: &[String]) -> Result<Vec<IpAddr>, Error> {
    let mut out: Vec<IpAddr> = Vec::with_capacity(list.len());
    for s in list {
        let ip: IpAddr = s.parse().map_err(|_| bad("node_address", s.clone(), "not an IP address"))?;
        if out.iter().any(|o| o.is_ipv6() == ip.is_ipv6()) {
            return Err(bad("node_address", list.join(","), "at most one address per family"));
        }
        out.push(ip);
    }
    Ok(out)
}

/// Finds a program the way `execvp` would: a name with a `/` is taken as a path, any other name
/// is looked up on `path_env` (colon-separated). Only executable regular files count.
pub fn find_program(program: &Path, path_env: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        return executable(program).then(|| program.to_owned());
    }
    std::env::split_paths(path_env?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_without_file_or_environment() {
        let c = WrapperConfig::from_sources(None, no_env, None).expect("defaults");
        assert_eq!(c.delegate, Path::new("containerd-shim-kata-v2"));
        assert_eq!(c.agent, Path::new("katamaran-agent"));
        assert_eq!(c.root, Path::new("/"));
        assert_eq!(c.extension, ExtensionPolicy::Sandbox);
        assert!(c.node_addresses.is_empty());
        assert_eq!(c.stop_timeout, DEFAULT_STOP_TIMEOUT);
        assert_eq!(c.layout().sandbox_socket("x"), Path::new("/run/katamaran/sandboxes/x.sock"));
        let c = WrapperConfig::from_sources(None, no_env, Some("/opt/katamaran/bin/katamaran-agent".into()))
            .expect("sibling");
        assert_eq!(c.agent, Path::new("/opt/katamaran/bin/katamaran-agent"), "the agent next to the wrapper");
    }

    #[test]
    fn environment_wins_over_file() {
        let file = r#"
            delegate = "/opt/kata/bin/containerd-shim-kata-v2"
            agent = "/opt/katamaran/bin/katamaran-agent"
            root = "/srv/node-a"
            extension = "off"
            node_address = ["10.0.0.11", "fd00::11"]
            stop_timeout = "2s"
            log = "debug"
        "#;
        let p = Path::new("/etc/katamaran/shim.toml");
        let c = WrapperConfig::from_sources(Some((p, file)), no_env, None).expect("file");
        assert_eq!(c.delegate, Path::new("/opt/kata/bin/containerd-shim-kata-v2"));
        assert_eq!(c.root, Path::new("/srv/node-a"));
        assert_eq!(c.extension, ExtensionPolicy::Off);
        assert_eq!(c.node_addresses.len(), 2);
        assert_eq!(c.stop_timeout, Duration::from_secs(2));
        assert_eq!(c.log.as_deref(), Some("debug"));

        let env = |k: &str| match k {
            ENV_DELEGATE => Some("containerd-shim-runc-v2".to_owned()),
            ENV_ROOT => Some("/tmp/t".to_owned()),
            ENV_EXTENSION => Some("unannotated".to_owned()),
            ENV_NODE_ADDRESS => Some("10.1.0.1".to_owned()),
            ENV_AGENT => Some(String::new()), // empty counts as unset
            _ => None,
        };
        let c = WrapperConfig::from_sources(Some((p, file)), env, None).expect("env");
        assert_eq!(c.delegate, Path::new("containerd-shim-runc-v2"));
        assert_eq!(c.agent, Path::new("/opt/katamaran/bin/katamaran-agent"));
        assert_eq!(c.root, Path::new("/tmp/t"));
        assert_eq!(c.extension, ExtensionPolicy::Unannotated);
        assert_eq!(c.node_addresses, vec!["10.1.0.1".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn refusals_name_the_key() {
        let p = Path::new("/etc/katamaran/shim.toml");
        let cases = [
            ("extension = \"always\"", "extension"),
            ("root = \"relative\"", "root"),
            ("node_address = [\"10.0.0.1\", \"10.0.0.2\"]", "one address per family"),
            ("node_address = [\"nope\"]", "not an IP address"),
            ("stop_timeout = \"soon\"", "stop_timeout"),
        ];
        for (text, needle) in cases {
            let err = WrapperConfig::from_sources(Some((p, text)), no_env, None).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let err = WrapperConfig::from_sources(Some((p, "delgate = \"x\"")), no_env, None).expect_err("typo");
        assert!(matches!(err, Error::ConfigParse { .. }), "{err}");
        assert!(err.to_string().contains("/etc/katamaran/shim.toml"), "{err}");
        let err = WrapperConfig::from_sources(Some((p, "[broken")), no_env, None).expect_err("syntax");
        assert!(matches!(err, Error::ConfigParse { .. }), "{err}");
    }

    #[test]
    fn programs_are_found_like_execvp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").expect("write");
        let data = dir.path().join("data");
        std::fs::write(&data, "").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = std::env::join_paths(["/nonexistent", dir.path().to_str().expect("utf8")]).expect("join");
        assert_eq!(find_program(Path::new("tool"), Some(&path)), Some(exe.clone()));
        assert_eq!(find_program(Path::new("data"), Some(&path)), None, "not executable");
        assert_eq!(find_program(Path::new("missing"), Some(&path)), None);
        assert_eq!(find_program(&exe, None), Some(exe.clone()), "a path needs no PATH");
        assert_eq!(find_program(&dir.path().join("missing"), Some(&path)), None);
        assert_eq!(find_program(Path::new("tool"), None), None);
    }
}
