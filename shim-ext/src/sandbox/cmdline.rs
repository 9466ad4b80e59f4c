//! A QEMU command line as data, and its rewrite for an incoming (destination) QEMU.
//!
//! Kata cannot start a sandbox with `-incoming`, so the destination QEMU is started by katamaran
//! from the source's command line (`/proc/<pid>/cmdline`). The rewrite keeps every device and
//! backend (the migration stream only carries state for devices both sides have) and changes only
//! what is tied to the source process: inherited file descriptors, monitors, state paths, the tap.
//!
//! The command line reaches the destination over the network, so it is also treated as untrusted
//! input: options that load code or read arbitrary configuration are refused, the binary is the
//! destination's own configured QEMU (never `argv[0]`), and no argument reaches a shell.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::allowlist::{self, CmdlinePolicy};
use super::qemu_options::{arity, Arity};
use super::Error;

/// One option of a QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuArg {
    /// The option name without dashes, e.g. `netdev`.
    pub name: String,
    /// Its argument, absent for flags such as `-daemonize`.
    pub value: Option<String>,
}

/// A parsed QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCmdline {
    /// `argv[0]` as the source ran it (informational only).
    pub program: String,
    /// The options in order.
    pub args: Vec<QemuArg>,
}

impl QemuCmdline {
    /// Parses an argv (as read from `/proc/<pid>/cmdline`), splitting it the way QEMU does:
    /// whether an option takes the next word comes from QEMU's own option table
    /// ([`super::qemu_options`]), so an option is never guessed.
    ///
    /// # Errors
    /// [`Error::UnknownOption`] for an option neither QEMU 7.2 nor 10.x knows,
    /// [`Error::Cmdline`] for an empty argv, a bare word where an option was expected (naming the
    /// flag it follows), or an option missing its argument.
    pub fn parse<S: AsRef<str>>(argv: &[S]) -> Result<Self, Error> {
        let mut words = argv.iter().map(AsRef::as_ref);
        let program = words
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::Cmdline("empty command line".into()))?
            .to_owned();
        let mut args: Vec<QemuArg> = Vec::new();
        while let Some(word) = words.next() {
            let Some(name) =
                word.strip_prefix("--").or_else(|| word.strip_prefix('-')).filter(|n| !n.is_empty())
            else {
                return Err(Error::Cmdline(match args.last() {
                    Some(QemuArg { name, value: None }) => {
                        format!("expected an option, found {word:?} after -{name}, which takes no argument")
                    }
                    _ => format!("expected an option, found {word:?}"),
                }));
            };
            let value = match arity(name).ok_or_else(|| Error::UnknownOption(name.to_owned()))? {
                Arity::Flag => None,
                Arity::Arg => {
                    let v = words
                        .next()
                        .ok_or_else(|| Error::Cmdline(format!("option -{name} lacks its argument")))?;
                    Some(v.to_owned())
                }
            };
            args.push(QemuArg { name: name.to_owned(), value });
        }
        Ok(Self { program, args })
    }

    /// Reads and parses `/proc/<pid>/cmdline` (or any NUL-separated file).
    ///
    /// # Errors
    /// [`Error::Read`] when the file cannot be read, [`Error::Cmdline`] when it is not a QEMU
    /// command line.
    pub fn from_proc_file(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::Cmdline(format!("{} is not UTF-8", path.display())))?;
        let argv: Vec<&str> = text.split('\0').filter(|w| !w.is_empty()).collect();
        Self::parse(&argv)
    }

    /// The values of every `-name` option.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.args.iter().filter(move |a| a.name == name).filter_map(|a| a.value.as_deref())
    }

    /// The argv form (`program` first).
    pub fn to_argv(&self) -> Vec<String> {
        let mut argv = vec![self.program.clone()];
        for arg in &self.args {
            argv.push(format!("-{}", arg.name));
            if let Some(v) = &arg.value {
                argv.push(v.clone());
            }
        }
        argv
    }
}

/// Splits a QEMU option string (`tap,id=n0,fds=3:4`) into its comma-separated parts, honouring
/// QEMU's `,,` escape for a literal comma.
pub fn split_opts(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// Joins parts back, escaping commas inside them.
pub fn join_opts<S: AsRef<str>>(parts: &[S]) -> String {
    parts.iter().map(|p| p.as_ref().replace(',', ",,")).collect::<Vec<_>>().join(",")
}

fn key_of(part: &str) -> &str {
    part.split_once('=').map_or(part, |(k, _)| k)
}

fn get_opt<'a>(parts: &'a [String], key: &str) -> Option<&'a str> {
    parts.iter().find_map(|p| p.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// How to turn the source's command line into the destination's.
#[derive(Debug, Clone)]
pub struct IncomingRewrite {
    /// The destination's own QEMU binary.
    pub qemu_binary: PathBuf,
    /// The incoming sandbox's state directory: QMP socket, pid file, log, chardev sockets.
    pub state_dir: PathBuf,
    /// The source's state directories (its Kata VM dir); any argument path under one of them is
    /// moved under `state_dir`.
    pub source_state_dirs: Vec<PathBuf>,
    /// The tap QEMU must open by name on the destination (Kata's `tap0_kata`).
    pub tap_name: String,
    /// Local storage: the destination's empty image for each drive id / node name.
    pub disk_paths: BTreeMap<String, PathBuf>,
    /// Directories the command line may name files under (kernel, initrd, firmware, shared disk
    /// images), besides `state_dir` and `disk_paths`, which are always allowed; see
    /// [`allowlist::default_allowed_roots`].
    pub allowed_roots: Vec<PathBuf>,
}

/// The destination's command line and the paths katamaran needs to drive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingCmdline {
    /// The full argv, binary first.
    pub argv: Vec<String>,
    /// The QMP socket katamaran connects to.
    pub qmp_socket: PathBuf,
    /// QEMU's pid file.
    pub pid_file: PathBuf,
}

impl IncomingRewrite {
    /// Rewrites `source` for an incoming QEMU started with `-incoming defer`.
    ///
    /// The source's command line is checked against the allowlist ([`super::allowlist`]) before
    /// the rewrite, and the result, with every path in its final place, against the roots: only
    /// `state_dir` for what QEMU creates, `allowed_roots`, `state_dir` and `disk_paths` for what it
    /// opens. This is a pure function: nothing is created whatever it returns.
    ///
    /// # Errors
    /// [`Error::OptionRefused`] or [`Error::PropertyRefused`] naming the first option (and
    /// property) that is not allowed; [`Error::Cmdline`] for a netdev that cannot be re-created
    /// by name or a `-blockdev` whose JSON does not parse.
    pub fn apply(&self, source: &QemuCmdline) -> Result<IncomingCmdline, Error> {
        let source_states: Vec<PathBuf> =
            self.source_state_dirs.iter().chain([&self.state_dir]).cloned().collect();
        allowlist::check_source(source, &source_states)?;
        let state = |name: &str| self.state_dir.join(name);
        let qmp_socket = state("qmp.sock");
        let pid_file = state("pid");
        // Chardevs used only as monitors go away with their -mon.
        let monitor_chardevs: Vec<String> = source
            .values("mon")
            .filter_map(|v| get_opt(&split_opts(v), "chardev").map(str::to_owned))
            .collect();
        let mut out = QemuCmdline { program: self.qemu_binary.display().to_string(), args: Vec::new() };
        let mut push =
            |name: &str, value: Option<String>| out.args.push(QemuArg { name: name.into(), value });
        for arg in &source.args {
            let name = arg.name.as_str();
            let value = arg.value.as_deref().unwrap_or_default();
            match name {
                "daemonize" | "qmp" | "qmp-pretty" | "monitor" | "mon" | "incoming" | "pidfile" => {}
                "D" => push("D", Some(state("qemu.log").display().to_string())),
                "chardev" => {
                    let parts = split_opts(value);
                    let id = get_opt(&parts, "id").unwrap_or_default();
                    if !monitor_chardevs.iter().any(|m| m == id) {
                        push("chardev", Some(self.rewrite_chardev(&parts)));
                    }
                }
                "netdev" => push("netdev", Some(self.rewrite_netdev(value)?)),
                "device" => {
                    push("device", Some(self.remap(&drop_keys(value, &["vhostfd", "vhostfds", "fd", "fds"]))))
                }
                "drive" => push("drive", Some(self.rewrite_drive(value))),
                "blockdev" => push("blockdev", Some(self.rewrite_blockdev(value)?)),
                _ => push(name, arg.value.as_deref().map(|v| self.remap(v))),
            }
        }
        let policy = CmdlinePolicy {
            state_roots: vec![self.state_dir.clone()],
            file_roots: self.allowed_roots.iter().chain(self.disk_paths.values()).cloned().collect(),
        };
        policy.validate(&out)?;
        for (name, value) in [
            ("qmp", format!("unix:{},server=on,wait=off", qmp_socket.display())),
            ("pidfile", pid_file.display().to_string()),
            ("incoming", "defer".to_owned()),
        ] {
            out.args.push(QemuArg { name: name.into(), value: Some(value) });
        }
        Ok(IncomingCmdline { argv: out.to_argv(), qmp_socket, pid_file })
    }

    /// Moves a path under a source state dir to the same place under ours.
    fn remap(&self, value: &str) -> String {
        let mut out = value.to_owned();
        for src in &self.source_state_dirs {
            let src = src.display().to_string();
            if !src.is_empty() && src != "/" {
                out = out.replace(&src, &self.state_dir.display().to_string());
            }
        }
        out
    }

    fn rewrite_chardev(&self, parts: &[String]) -> String {
        let mut kept: Vec<String> = parts.iter().filter(|p| key_of(p) != "fd").cloned().collect();
        let backend = kept.first().map(String::as_str).unwrap_or_default();
        let had_fd = parts.iter().any(|p| key_of(p) == "fd");
        if had_fd && backend == "socket" && get_opt(&kept, "path").is_none() {
            let id = get_opt(&kept, "id").unwrap_or("chardev").to_owned();
            kept.push(format!("path={}", self.state_dir.join(format!("{id}.sock")).display()));
            if get_opt(&kept, "server").is_none() {
                kept.push("server=on".into());
                kept.push("wait=off".into());
            }
        }
        self.remap(&join_opts(&kept))
    }

    fn rewrite_netdev(&self, value: &str) -> Result<String, Error> {
        let parts = split_opts(value);
        let kind = parts.first().map(String::as_str).unwrap_or_default();
        let kind = kind.strip_prefix("type=").unwrap_or(kind);
        match kind {
            "tap" => {
                let queues = get_opt(&parts, "fds").map(|f| f.split(':').count()).unwrap_or(1);
                let drop = [
                    "fd",
                    "fds",
                    "vhostfd",
                    "vhostfds",
                    "ifname",
                    "script",
                    "downscript",
                    "helper",
                    "queues",
                ];
                let mut kept: Vec<String> =
                    parts.iter().filter(|p| !drop.contains(&key_of(p))).cloned().collect();
                kept.push(format!("ifname={}", self.tap_name));
                kept.push("script=no".into());
                kept.push("downscript=no".into());
                if queues > 1 {
                    kept.push(format!("queues={queues}"));
                }
                Ok(join_opts(&kept))
            }
            "bridge" => Err(Error::Cmdline("netdev type bridge runs a helper and cannot be migrated".into())),
            "socket" | "stream" | "dgram" if get_opt(&parts, "fd").is_some() => Err(Error::Cmdline(format!(
                "netdev {kind} uses an inherited fd and cannot be re-created on the destination"
            ))),
            _ => Ok(self.remap(value)),
        }
    }

    fn rewrite_drive(&self, value: &str) -> String {
        let mut parts = split_opts(value);
        if let Some(new) = get_opt(&parts, "id").and_then(|id| self.disk_paths.get(id)) {
            let new = format!("file={}", new.display());
            parts.retain(|p| key_of(p) != "file");
            parts.push(new);
        }
        self.remap(&join_opts(&parts))
    }

    fn rewrite_blockdev(&self, value: &str) -> Result<String, Error> {
        if value.trim_start().starts_with('{') {
            let mut json: serde_json::Value = serde_json::from_str(value)
                .map_err(|e| Error::Cmdline(format!("-blockdev JSON does not parse: {e}")))?;
            let node = json.get("node-name").and_then(|n| n.as_str()).map(str::to_owned);
            if let Some(new) = node.and_then(|n| self.disk_paths.get(&n)) {
                set_filename(&mut json, new);
            }
            return Ok(self.remap(&json.to_string()));
        }
        let mut parts = split_opts(value);
        if let Some(new) = get_opt(&parts, "node-name").and_then(|n| self.disk_paths.get(n)) {
            for p in &mut parts {
                let key = key_of(p).to_owned();
                if key == "filename" || key.ends_with(".filename") {
                    *p = format!("{key}={}", new.display());
                }
            }
        }
        Ok(self.remap(&join_opts(&parts)))
    }
}

fn set_filename(json: &mut serde_json::Value, new: &Path) {
    if let Some(obj) = json.as_object_mut() {
        if obj.contains_key("filename") {
            obj.insert("filename".into(), new.display().to_string().into());
        }
        if let Some(file) = obj.get_mut("file") {
            set_filename(file, new);
        }
    }
}

fn drop_keys(value: &str, keys: &[&str]) -> String {
    let parts: Vec<String> = split_opts(value).into_iter().filter(|p| !keys.contains(&key_of(p))).collect();
    join_opts(&parts)
}

#[cfg(test)]
#[path = "cmdline_tests.rs"]
mod tests;
