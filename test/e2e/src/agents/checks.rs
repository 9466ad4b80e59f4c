//! What a migration test checks on the lab besides the engine's own answers: traffic counters
//! inside the lab's namespaces, the guest's disk logs on both sides, `katactl` as a user runs
//! it, and a [`Snapshot`] of everything the engine may create on a node.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{engine_dir, AgentError, POLL};
use crate::artifacts::{run_checked, tail};
use crate::error::LabError;
use crate::lab::{pid_is_live, Lab, Node};
use crate::netns::in_netns;

/// Received packets of `ifname` in the lab namespace `host` (`node-a`, `node-b`, …).
///
/// # Errors
/// When the namespace cannot be entered or the interface does not exist.
pub fn rx_packets(lab: &Lab, host: &str, ifname: &str) -> Result<u64, AgentError> {
    let name = ifname.to_owned();
    let ns = lab.netns(host);
    let count = in_netns(&ns, move || {
        // /proc/thread-self/net follows this thread's namespace, unlike /sys.
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")
            .map_err(|source| LabError::ReportRead { path: "/proc/thread-self/net/dev".into(), source })?;
        Ok(text.lines().find_map(|l| {
            let (dev, rest) = l.split_once(':')?;
            (dev.trim() == name).then(|| rest.split_whitespace().nth(1)?.parse::<u64>().ok()).flatten()
        }))
    })?;
    count.ok_or_else(|| LabError::Timeout { what: format!("interface {ifname} in {host}") }.into())
}

/// Waits until `ifname` in `host` has received `packets` more packets than now: traffic (the
/// probe's) is flowing through that node.
///
/// # Errors
/// [`LabError::Timeout`] after `limit`.
pub fn wait_for_rx(
    lab: &Lab,
    host: &str,
    ifname: &str,
    packets: u64,
    limit: Duration,
) -> Result<(), AgentError> {
    let start = rx_packets(lab, host, ifname)?;
    let started = Instant::now();
    while rx_packets(lab, host, ifname)? < start + packets {
        if started.elapsed() > limit {
            return Err(LabError::Timeout { what: format!("{packets} packets on {host} {ifname}") }.into());
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// `katamaran-guest disk-compare --json` result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct DiskCompare {
    /// The prefix log is a byte-identical prefix of the full one.
    pub ok: bool,
    /// Records in the prefix log.
    pub prefix_records: u64,
    /// Records in the full log.
    pub full_records: u64,
    /// Where they first differ.
    pub first_mismatch_offset: Option<u64>,
    /// What differs there.
    pub detail: Option<String>,
}

/// Runs `tool disk-compare --prefix PREFIX --full FULL --json` (exit 1 is a result, not an error).
///
/// # Errors
/// When the tool cannot run or prints no report.
pub fn disk_compare(tool: &Path, prefix: &Path, full: &Path) -> Result<DiskCompare, AgentError> {
    let what =
        format!("{} disk-compare --prefix {} --full {}", tool.display(), prefix.display(), full.display());
    let out = Command::new(tool)
        .arg("disk-compare")
        .arg("--prefix")
        .arg(prefix)
        .arg("--full")
        .arg(full)
        .arg("--json")
        .output()
        .map_err(|source| AgentError::Spawn { what: what.clone(), source })?;
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(
            LabError::Command { command: what, status: out.status, stderr: tail(&out.stderr, 20) }.into()
        );
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|source| LabError::ReportParse { origin: what, source }.into())
}

/// How a `katactl` run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlRun {
    /// Exit code (`None`: killed at the deadline or by a signal).
    pub code: Option<i32>,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `katactl ARGS…`, killing it after `deadline`.
///
/// # Errors
/// When it cannot be started or waited for.
pub fn katactl(bin: &Path, args: &[&str], deadline: Duration) -> Result<CtlRun, AgentError> {
    let what = format!("katactl {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| AgentError::Spawn { what: what.clone(), source })?;
    // Readers on their own threads, so a chatty child never blocks on a full pipe.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(source) => return Err(AgentError::Wait { what, source }),
        }
    };
    let join = |h: std::thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok(CtlRun {
        code: status.and_then(|s| s.code()),
        stdout: join(out),
        stderr: join(err),
        elapsed: started.elapsed(),
    })
}

/// What the engine may create or change on the lab's nodes, listed item by item so two
/// snapshots can be compared: namespaces; links, addresses, routes, permanent and proxy
/// neighbours and qdiscs of both node namespaces and of the given sandbox namespaces (plus
/// their tc filters); live QEMUs of the lab; files under both nodes' `run/katamaran/` (the
/// agents' own sockets and the engine's top-level directories aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    items: BTreeMap<String, BTreeSet<String>>,
}

impl Snapshot {
    /// Takes a snapshot; `sandboxes` are extra namespaces (lab names without the prefix, e.g.
    /// `sb-node-a-web0`) whose links, qdiscs and filters are included.
    ///
    /// # Errors
    /// When a listing command fails.
    pub fn take(lab: &Lab, sandboxes: &[&str]) -> Result<Self, AgentError> {
        let mut items: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut add = |category: String, lines: String| {
            let set = items.entry(category).or_default();
            for line in lines.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")) {
                if !line.is_empty() {
                    set.insert(line);
                }
            }
        };
        let mut netns = String::new();
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(lab.prefix()) {
                    netns.push_str(&format!("/run/netns/{name}\n"));
                }
            }
        }
        add("netns".into(), netns);
        let run = |program: &str, ns: &str, args: &[&str]| -> Result<String, AgentError> {
            let mut cmd = Command::new(program);
            cmd.arg("-n").arg(ns).args(args);
            let out = run_checked(&mut cmd, &format!("{program} -n {ns} {}", args.join(" ")))?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        for host in ["node-a", "node-b"] {
            let ns = lab.netns(host);
            add(format!("{host} links"), run("ip", &ns, &["-o", "link", "show"])?);
            add(format!("{host} addresses"), run("ip", &ns, &["-o", "addr", "show"])?);
            add(format!("{host} routes"), run("ip", &ns, &["-4", "route", "show", "table", "all"])?);
            add(format!("{host} routes"), run("ip", &ns, &["-6", "route", "show", "table", "all"])?);
            add(format!("{host} neighbours"), run("ip", &ns, &["neigh", "show", "nud", "permanent"])?);
            add(format!("{host} neighbours"), run("ip", &ns, &["neigh", "show", "proxy"])?);
            add(format!("{host} qdiscs"), run("tc", &ns, &["qdisc", "show"])?);
        }
        for sb in sandboxes {
            let ns = lab.netns(sb);
            add(format!("{sb} links"), run("ip", &ns, &["-o", "link", "show"])?);
            add(format!("{sb} routes"), run("ip", &ns, &["route", "show", "table", "all"])?);
            add(format!("{sb} qdiscs"), run("tc", &ns, &["qdisc", "show"])?);
            for dev in ["eth0", "tap0_kata"] {
                add(format!("{sb} filters"), run("tc", &ns, &["filter", "show", "dev", dev, "ingress"])?);
            }
        }
        add("qemu".into(), lab_qemus(lab.root()).join("\n"));
        let mut files = Vec::new();
        for node in [Node::A, Node::B] {
            let dir = engine_dir(lab, node);
            list_files(&dir, &dir, &mut files)?;
        }
        add("files".into(), files.join("\n"));
        Ok(Self { items })
    }

    /// What differs from `earlier`: `+ category: item` for what appeared, `- …` for what went.
    pub fn diff_from(&self, earlier: &Snapshot) -> Vec<String> {
        let empty = BTreeSet::new();
        let categories: BTreeSet<&String> = self.items.keys().chain(earlier.items.keys()).collect();
        let mut out = Vec::new();
        for c in categories {
            let (now, then) = (self.items.get(c).unwrap_or(&empty), earlier.items.get(c).unwrap_or(&empty));
            out.extend(now.difference(then).map(|i| format!("+ {c}: {i}")));
            out.extend(then.difference(now).map(|i| format!("- {c}: {i}")));
        }
        out
    }

    /// The items of one category (for assertions and messages).
    pub fn category(&self, name: &str) -> Vec<String> {
        self.items.get(name).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }
}

/// Waits until a new snapshot equals `before` (cleanup may still be finishing when a terminal
/// event arrives); returns the remaining differences (empty when clean) and the time it took.
///
/// # Errors
/// When a snapshot cannot be taken.
pub fn wait_unchanged(
    lab: &Lab,
    before: &Snapshot,
    sandboxes: &[&str],
    limit: Duration,
) -> Result<(Vec<String>, Duration), AgentError> {
    let started = Instant::now();
    loop {
        let diff = Snapshot::take(lab, sandboxes)?.diff_from(before);
        if diff.is_empty() || started.elapsed() > limit {
            return Ok((diff, started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Live QEMUs whose command line names the lab root, as `pid N: -name …`.
fn lab_qemus(root: &Path) -> Vec<String> {
    let root = format!("{}/", root.display());
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
        let argv: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_qemu = argv.first().is_some_and(|a| a.contains("qemu-system"));
        if is_qemu && argv.iter().any(|a| a.contains(&root)) && pid_is_live(pid) {
            let name = argv
                .iter()
                .position(|a| a == "-name")
                .and_then(|i| argv.get(i + 1))
                .cloned()
                .unwrap_or_default();
            let incoming = argv.iter().any(|a| a == "-incoming");
            found.push(format!("pid {pid}: -name {name}{}", if incoming { " -incoming" } else { "" }));
        }
    }
    found
}

/// Every file and directory below `dir`'s subdirectories (relative to `base`), except agent
/// sockets: the top-level directories (`incoming/`, `netns/`, `migrations/`) are the engine's
/// own and may stay.
fn list_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), AgentError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(AgentError::ReadDir { path: dir.to_path_buf(), source }),
    };
    for e in entries.flatten() {
        let path = e.path();
        let rel = path.strip_prefix(base).unwrap_or(&path);
        let top_level = rel.components().count() == 1;
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if !(top_level && (is_dir || rel == Path::new("agent.sock"))) {
            out.push(format!("{}{}", path.display(), if is_dir { "/" } else { "" }));
        }
        if is_dir {
            list_files(base, &path, out)?;
        }
    }
    Ok(())
}
