//! The wrapper's decisions as plain functions: which container gets an extension, which process
//! is the delegate's shim, whether a pid still names our extension, the extension's command line,
//! which old logs go.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::config::ExtensionPolicy;
use crate::sandbox::ContainerType;

/// How long the log of a sandbox whose extension is gone is kept: long enough to read after a
/// pod was deleted, short enough that `/run` (tmpfs) does not fill on a busy node.
pub const LOG_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Whether a container of this type gets a per-sandbox extension.
///
/// Workload containers never do: they live in a sandbox that has one. Containers without CRI
/// annotations (`ctr run`) only when asked, because nothing says they are a pod's VM.
pub fn wants_extension(policy: ExtensionPolicy, kind: ContainerType) -> bool {
    match (policy, kind) {
        (ExtensionPolicy::Off, _) | (_, ContainerType::Container) => false,
        (_, ContainerType::Sandbox) => true,
        (ExtensionPolicy::Unannotated, ContainerType::Unknown) => true,
        (ExtensionPolicy::Sandbox, ContainerType::Unknown) => false,
    }
}

/// Picks the delegate's long-running shim: the `shim.pid` the delegate wrote in the bundle (Kata
/// does; containerd 1.6's runc-v2 does not), else the single process orphaned to the wrapper when
/// the delegate's `start` exited. More than one orphan is ambiguous: no guess.
pub fn choose_shim_pid(pid_file: Option<&str>, orphans: &[u32]) -> Option<u32> {
    let from_file = pid_file.and_then(|t| t.trim().parse::<u32>().ok()).filter(|&p| p > 1);
    from_file.or(match orphans {
        [only] if *only > 1 => Some(*only),
        _ => None,
    })
}

/// The parent pid in a `/proc/<pid>/stat` line (the command name may hold spaces and parens, so
/// fields are counted after the last `)`).
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// Whether a process command line (`/proc/<pid>/cmdline` split at NULs) is the extension of
/// sandbox `id`: a pid file can outlive its process and the pid be reused, and the wrapper must
/// never signal a stranger.
pub fn is_extension_of(argv: &[String], id: &str) -> bool {
    let named_agent = argv.first().is_some_and(|a0| {
        Path::new(a0).file_name().is_some_and(|n| n.to_string_lossy().starts_with(super::config::AGENT_NAME))
    });
    let sandbox_mode = argv.iter().any(|a| a == "sandbox");
    let has_id = argv.windows(2).any(|w| w[0] == "--id" && w[1] == id)
        || argv.iter().any(|a| a.strip_prefix("--id=") == Some(id));
    named_agent && sandbox_mode && has_id
}

/// The extension's arguments (after the program name).
pub fn extension_args(id: &str, root: &Path, shim_pid: u32, node_addresses: &[IpAddr]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "sandbox".into(),
        "--id".into(),
        id.into(),
        "--root".into(),
        root.into(),
        "--exit-with-pid".into(),
        shim_pid.to_string().into(),
    ];
    if !node_addresses.is_empty() {
        let list: Vec<String> = node_addresses.iter().map(IpAddr::to_string).collect();
        args.push("--node-address".into());
        args.push(list.join(",").into());
    }
    args
}

/// One file in the logs directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// File name, `<id>.log`.
    pub name: String,
    /// Last modification.
    pub modified: SystemTime,
    /// Whether the sandbox still has an extension pid file.
    pub live: bool,
}

/// Log files to remove: `*.log` of sandboxes without a live extension, untouched for longer than
/// `retention`.
pub fn stale_logs(entries: &[LogEntry], now: SystemTime, retention: Duration) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.name.ends_with(".log") && !e.live)
        .filter(|e| now.duration_since(e.modified).is_ok_and(|age| age > retention))
        .map(|e| e.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_gets_an_extension() {
        use ContainerType::{Container, Sandbox, Unknown};
        use ExtensionPolicy as P;
        let table = [
            (P::Sandbox, Sandbox, true),
            (P::Sandbox, Container, false),
            (P::Sandbox, Unknown, false),
            (P::Unannotated, Sandbox, true),
            (P::Unannotated, Container, false),
            (P::Unannotated, Unknown, true),
            (P::Off, Sandbox, false),
            (P::Off, Unknown, false),
        ];
        for (policy, kind, want) in table {
            assert_eq!(wants_extension(policy, kind), want, "{policy:?} {kind:?}");
        }
    }

    #[test]
    fn shim_pid_choice() {
        assert_eq!(choose_shim_pid(Some("4242\n"), &[]), Some(4242), "Kata's shim.pid");
        assert_eq!(choose_shim_pid(Some("4242"), &[77, 78]), Some(4242), "the file beats orphans");
        assert_eq!(choose_shim_pid(None, &[77]), Some(77), "runc-v2 1.6: the one orphan");
        assert_eq!(choose_shim_pid(Some("garbage"), &[77]), Some(77));
        assert_eq!(choose_shim_pid(Some("1"), &[]), None, "never init");
        assert_eq!(choose_shim_pid(None, &[]), None);
        assert_eq!(choose_shim_pid(None, &[77, 78]), None, "ambiguous");
    }

    #[test]
    fn ppid_from_stat() {
        assert_eq!(parse_ppid("1234 (containerd-shim) S 1 1234 1234 0 -1"), Some(1));
        assert_eq!(parse_ppid("99 (a) b (c)) R 42 99 99"), Some(42), "parens in the name");
        assert_eq!(parse_ppid("garbage"), None);
        assert_eq!(parse_ppid("1 (x) S"), None);
    }

    #[test]
    fn recognises_only_our_extension() {
        let argv = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let ours = argv("/opt/katamaran/bin/katamaran-agent sandbox --id abc --root / --exit-with-pid 7");
        assert!(is_extension_of(&ours, "abc"));
        assert!(!is_extension_of(&ours, "abcd"), "another sandbox");
        assert!(is_extension_of(&argv("katamaran-agent sandbox --id=abc"), "abc"));
        assert!(!is_extension_of(&argv("katamaran-agent node --id abc"), "abc"), "node mode");
        assert!(!is_extension_of(&argv("/usr/bin/sleep sandbox --id abc"), "abc"), "a stranger");
        assert!(!is_extension_of(&[], "abc"), "a zombie has an empty cmdline");
    }

    #[test]
    fn extension_command_line() {
        let args = extension_args("abc", Path::new("/"), 4242, &[]);
        let text: Vec<_> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(text, ["sandbox", "--id", "abc", "--root", "/", "--exit-with-pid", "4242"]);
        let ips = ["10.0.0.1".parse().expect("ip"), "fd00::1".parse().expect("ip")];
        let args = extension_args("abc", Path::new("/r"), 1, &ips);
        let tail: Vec<_> = args[7..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(tail, ["--node-address", "10.0.0.1,fd00::1"]);
    }

    #[test]
    fn old_logs_of_gone_sandboxes_go() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10 * 24 * 3600);
        let day = Duration::from_secs(24 * 3600);
        let e = |name: &str, age: Duration, live| LogEntry { name: name.into(), modified: now - age, live };
        let entries = [
            e("old.log", 2 * day, false),
            e("fresh.log", Duration::from_secs(60), false),
            e("old-but-live.log", 3 * day, true),
            e("notes.txt", 5 * day, false),
        ];
        assert_eq!(stale_logs(&entries, now, LOG_RETENTION), ["old.log"]);
        // A clock that went backwards keeps the file.
        let future = [e("future.log", Duration::ZERO, false)];
        assert!(stale_logs(&future, now - day, LOG_RETENTION).is_empty());
    }
}
