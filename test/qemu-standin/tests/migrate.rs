//! Two stand-ins migrate to each other over a socket pair, driven through QMP the way
//! katamaran's engine drives QEMU: capabilities, `getfd` with `SCM_RIGHTS`, `migrate-incoming`
//! and `migrate` on `fd:` URIs, events, `stop`, `cont`. No root, no tap.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(20);

struct StandIn {
    child: Child,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str, extra: &[&str]) -> (StandIn, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let child = Command::new(env!("CARGO_BIN_EXE_katamaran-qemu-standin"))
        .args(["-name", name, "-m", "8M", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(extra)
        .env("KATAMARAN_STANDIN_DIRTY", "33554432")
        .spawn()
        .unwrap();
    let until = Instant::now() + DEADLINE;
    while !sock.exists() {
        assert!(Instant::now() < until, "{name} never served QMP");
        std::thread::sleep(Duration::from_millis(10));
    }
    (StandIn { child }, sock)
}

/// A blocking QMP client that keeps the events it reads past.
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
    next_id: u64,
}

impl Qmp {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut q = Self { stream, reader, events: Vec::new(), next_id: 1 };
        let greeting = q.line();
        assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 10, "{greeting}");
        q.ok("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut s = String::new();
        self.reader.read_line(&mut s).unwrap();
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s:?}"))
    }

    fn send(&mut self, cmd: &str, args: Value, fd: Option<&dyn AsRawFd>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let line = format!("{}\n", json!({"execute": cmd, "arguments": args, "id": id}));
        match fd {
            Some(fd) => {
                let fds = [fd.as_raw_fd()];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &[IoSlice::new(line.as_bytes())],
                    &cmsg,
                    MsgFlags::empty(),
                    None,
                )
                .unwrap();
            }
            None => self.stream.write_all(line.as_bytes()).unwrap(),
        }
        id
    }

    fn call_fd(&mut self, cmd: &str, args: Value, fd: Option<&dyn AsRawFd>) -> Value {
        let id = self.send(cmd, args, fd);
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                assert_eq!(v["id"], id, "{v}");
                return v;
            }
        }
    }

    fn call(&mut self, cmd: &str, args: Value) -> Value {
        self.call_fd(cmd, args, None)
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let v = self.call(cmd, args);
        v.get("return").cloned().unwrap_or_else(|| panic!("{cmd}: {v}"))
    }

    /// Waits for an event matching `pred`, returning the events seen up to it.
    fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = self.events.iter().position(&pred) {
                return self.events.drain(..=i).collect();
            }
            assert!(Instant::now() < until, "no {what}: {:?}", self.events);
            let v = self.line();
            assert!(v.get("event").is_some(), "unexpected reply {v}");
            self.events.push(v);
        }
    }
}

fn migration(status: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["event"] == "MIGRATION" && e["data"]["status"] == status
}

fn caps(q: &mut Qmp) {
    let list: Vec<Value> =
        ["events", "return-path"].iter().map(|c| json!({"capability": c, "state": true})).collect();
    q.ok("migrate-set-capabilities", json!({"capabilities": list}));
}

/// Both sides set up, the stream's two ends handed over, the destination listening.
fn pair(dir: &Path) -> (StandIn, StandIn, Qmp, Qmp) {
    let (src_proc, src_sock) = start(dir, "src", &[]);
    let (dst_proc, dst_sock) = start(dir, "dst", &["-incoming", "defer", "-S"]);
    let (mut src, mut dst) = (Qmp::connect(&src_sock), Qmp::connect(&dst_sock));
    caps(&mut src);
    caps(&mut dst);
    let (a, b) = UnixStream::pair().unwrap();
    assert!(dst.call_fd("getfd", json!({"fdname": "kmr-ram"}), Some(&b)).get("return").is_some());
    dst.ok("migrate-incoming", json!({"uri": "fd:kmr-ram"}));
    assert!(src.call_fd("getfd", json!({"fdname": "kmr-ram"}), Some(&a)).get("return").is_some());
    (src_proc, dst_proc, src, dst)
}

#[test]
fn a_migration_completes_by_itself_under_a_loose_limit_and_the_destination_runs_on_cont() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, _d, mut src, mut dst) = pair(dir.path());
    assert_eq!(src.ok("query-status", json!({}))["status"], "running");
    assert_eq!(dst.ok("query-status", json!({}))["status"], "inmigrate");
    src.ok("migrate-set-parameters", json!({"downtime-limit": 300}));
    src.ok("migrate", json!({"uri": "fd:kmr-ram"}));

    // The source stops the VM itself, then completes once the destination loaded everything.
    let seen = src.wait_event("source completion", migration("completed"));
    let stop = seen.iter().position(|e| e["event"] == "STOP").expect("STOP before completed");
    let active = seen.iter().position(migration("active")).expect("active before STOP");
    assert!(active < stop, "{seen:?}");
    let info = src.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "completed");
    assert!(info["ram"]["transferred"].as_u64().unwrap() >= 8 << 20, "{info}");
    assert_eq!(info["ram"]["remaining"], 0);
    assert!(info["downtime"].is_u64(), "{info}");
    let st = src.ok("query-status", json!({}));
    assert_eq!((st["running"].as_bool(), st["status"].as_str()), (Some(false), Some("postmigrate")));

    dst.wait_event("destination completion", migration("completed"));
    assert_eq!(dst.ok("query-status", json!({}))["running"], false, "paused until cont (-S)");
    dst.ok("cont", json!({}));
    dst.wait_event("RESUME", |e| e["event"] == "RESUME");
    assert_eq!(dst.ok("query-status", json!({}))["status"], "running");
}

#[test]
fn the_engines_hold_keeps_it_iterating_until_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, _d, mut src, mut dst) = pair(dir.path());
    // katamaran's controlled switchover on QEMU ≥ 8.2: a 1 ms limit at 1 MB/s.
    src.ok("migrate-set-parameters", json!({"downtime-limit": 1, "avail-switchover-bandwidth": 1_000_000}));
    src.ok("migrate", json!({"uri": "fd:kmr-ram"}));
    let until = Instant::now() + DEADLINE;
    let syncs = loop {
        let info = src.ok("query-migrate", json!({}));
        assert!(matches!(info["status"].as_str(), Some("setup" | "active")), "{info}");
        let n = info["ram"]["dirty-sync-count"].as_u64().unwrap();
        if n >= 5 {
            break n;
        }
        assert!(Instant::now() < until, "no pass ends: {info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(syncs >= 5);
    assert!(src.events.iter().all(|e| e["event"] != "STOP"), "completed on its own: {:?}", src.events);

    // The engine: stop (STOP comes before the reply), then the limit back.
    src.events.clear();
    let id = src.send("stop", json!({}), None);
    let reply = loop {
        let v = src.line();
        if v.get("event").is_some() {
            src.events.push(v);
        } else {
            break v;
        }
    };
    assert_eq!(reply["id"], id);
    assert!(src.events.iter().any(|e| e["event"] == "STOP"), "no STOP before the reply: {:?}", src.events);
    src.ok("migrate-set-parameters", json!({"downtime-limit": 25, "avail-switchover-bandwidth": 0}));
    src.wait_event("completion after stop", migration("completed"));
    dst.wait_event("destination completion", migration("completed"));
}

#[test]
fn refuses_what_qemu_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, sock) = start(dir.path(), "vm", &[]);
    let stream = UnixStream::connect(&sock).unwrap();
    let mut raw = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    raw.read_line(&mut greeting).unwrap();
    (&stream).write_all(b"{\"execute\":\"query-status\",\"id\":7}\n").unwrap();
    let mut reply = String::new();
    raw.read_line(&mut reply).unwrap();
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["error"]["class"], "CommandNotFound", "before negotiation: {reply}");
    assert_eq!(reply["id"], 7);
    drop((stream, raw));

    let mut q = Qmp::connect(&sock);
    assert_eq!(q.call("frobnicate", json!({}))["error"]["class"], "CommandNotFound");
    let no_fd = q.call("getfd", json!({"fdname": "x"}));
    assert!(no_fd["error"]["desc"].as_str().unwrap().contains("SCM_RIGHTS"), "{no_fd}");
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(q.call_fd("getfd", json!({"fdname": "x"}), Some(&a)).get("return").is_some());
    let without_rp = q.call("migrate", json!({"uri": "fd:x"}));
    assert!(without_rp["error"]["desc"].as_str().unwrap().contains("return-path"), "{without_rp}");
    let tcp = q.call("migrate", json!({"uri": "tcp:1.2.3.4:5"}));
    assert!(tcp.get("error").is_some(), "{tcp}");
    let incoming = q.call("migrate-incoming", json!({"uri": "fd:x"}));
    assert!(incoming.get("error").is_some(), "not started with -incoming: {incoming}");
    let multifd = q.call(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    assert!(multifd.get("error").is_some(), "{multifd}");
    // The monitor serves the next client once this one left.
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    drop(q);
    let mut again = Qmp::connect(&sock);
    assert_eq!(again.ok("query-status", json!({}))["running"], true);
    assert!(again.ok("query-commands", json!({})).as_array().unwrap().iter().any(|c| c["name"] == "migrate"));
}

#[test]
fn usage_errors_exit_2_and_name_the_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_katamaran-qemu-standin"))
        .args(["-incoming", "tcp:0:4444"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-incoming"));
}

#[test]
fn help_names_what_it_acts_on() {
    let out = Command::new(env!("CARGO_BIN_EXE_katamaran-qemu-standin")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["-qmp", "-incoming defer", "ifname=", "KATAMARAN_STANDIN_DIRTY", "Exit status"] {
        assert!(text.contains(word), "{word} missing from --help");
    }
}
