//! `containerd-shim-katamaran-v2` run the way containerd runs it.
//!
//! First against a scripted delegate — what containerd reads back byte for byte (start's stdout
//! and stderr share one pipe), the extension's life cycle, every refusal — then inside Debian's
//! containerd 1.6 with `containerd-shim-runc-v2` as the delegate (root only; skipped otherwise).

#![allow(clippy::unwrap_used)]

#[path = "support/containerd.rs"]
mod ctrd;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ctrd::{
    alive, cmdline, exits_within, kill, pids_with, run_combined, run_split, wait_for, Containerd, Ran, AGENT,
    KATACTL, WRAPPER,
};
use katamaran::sandbox::NodeLayout;
use katamaran::shim::extension::{read_pid_file, ExtensionPaths};
use katamaran_test_skip::{skip, Tier};

/// A stand-in for a v2 shim binary. It records what it was given, and on `start` leaves a
/// long-running "shim" (a sleep) behind like a real shim does; FAKE_MODE picks Kata's habit
/// (writes shim.pid in the bundle), runc-v2 1.6's (does not), or a failure.
const FAKE_SHIM: &str = r#"#!/bin/sh
d="$FAKE_DIR"
printf '%s\n' "$@" > "$d/argv"
pwd > "$d/cwd"
printf '%s' "$TTRPC_ADDRESS" > "$d/ttrpc"
cat > "$d/stdin"
for a; do last="$a"; done
case "$last" in
start)
  if [ "$FAKE_MODE" = fail ]; then echo "boom: no VM today" >&2; exit 7; fi
  sleep 600 </dev/null >/dev/null 2>&1 &
  echo $! > "$d/shim"
  if [ "$FAKE_MODE" = kata ]; then echo $! > shim.pid; fi
  printf 'unix:///run/containerd/s/fake'
  ;;
delete)
  printf '\010\211\001\022\000\nresponse'
  ;;
esac
"#;

/// What the fake delegate prints for `delete` (a protobuf-ish blob with NUL and newline).
const DELETE_BYTES: &[u8] = b"\x08\x89\x01\x12\x00\nresponse";
/// What containerd writes on a shim's stdin (runtime options); passed through untouched.
const OPTS: &[u8] = b"\x0a\x05opts\x00!";
const ID: &str = "sb1";
const SANDBOX: &str = r#"{"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb1",
  "io.kubernetes.cri.sandbox-name": "web-0", "io.kubernetes.cri.sandbox-namespace": "shop"}"#;
const WORKLOAD: &str =
    r#"{"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "other"}"#;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A bundle, a fake delegate and a node root in a temporary directory; dropping it kills what
/// the tests left running there.
struct Bench {
    dir: tempfile::TempDir,
    bundle: PathBuf,
    record: PathBuf,
    root: PathBuf,
    fake: PathBuf,
}

impl Bench {
    fn new(annotations: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("kt-shim-").tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        let record = dir.path().join("record");
        let root = dir.path().join("node");
        for d in [&bundle, &record, &root] {
            std::fs::create_dir_all(d).unwrap();
        }
        let config = format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs"}},
                "linux": {{"namespaces": [{{"type": "network", "path": "/var/run/netns/cni-test"}}]}},
                "annotations": {annotations}}}"#
        );
        std::fs::write(bundle.join("config.json"), config).unwrap();
        let fake = dir.path().join("containerd-shim-fake-v2");
        std::fs::write(&fake, FAKE_SHIM).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir, bundle, record, root, fake }
    }

    /// The wrapper as containerd 1.6 runs it: argv, environment, bundle as working directory.
    fn wrapper(&self, mode: &str, tail: &[&str]) -> Command {
        let mut cmd = Command::new(WRAPPER);
        cmd.args(["-namespace", "kt", "-address", "/run/fake/containerd.sock"])
            .args(["-publish-binary", "/usr/bin/containerd"])
            .args(tail)
            .current_dir(&self.bundle)
            .env("TTRPC_ADDRESS", "/run/fake/containerd.sock.ttrpc")
            .env("GOMAXPROCS", "2")
            .env("KATAMARAN_SHIM_CONFIG", self.dir.path().join("absent.toml"))
            .env("KATAMARAN_DELEGATE_SHIM", &self.fake)
            .env("KATAMARAN_AGENT", AGENT)
            .env("KATAMARAN_ROOT", &self.root)
            .env_remove("KATAMARAN_EXTENSION")
            .env("KATAMARAN_LOG", "debug")
            .env("FAKE_DIR", &self.record)
            .env("FAKE_MODE", mode);
        cmd
    }

    fn start_with(&self, mut cmd: Command) -> Ran {
        run_combined(&mut cmd, OPTS, TIMEOUT)
    }

    fn start(&self, mode: &str) -> Ran {
        self.start_with(self.wrapper(mode, &["-id", ID, "start"]))
    }

    fn paths(&self) -> ExtensionPaths {
        ExtensionPaths::new(&NodeLayout::under(&self.root), ID)
    }

    fn recorded(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.record.join(name)).ok()
    }

    fn fake_shim_pid(&self) -> u32 {
        String::from_utf8(self.recorded("shim").expect("the fake shim ran")).unwrap().trim().parse().unwrap()
    }

    /// Waits for the extension to serve and returns its pid.
    fn extension(&self) -> u32 {
        let paths = self.paths();
        wait_for("the extension's socket", TIMEOUT, || paths.socket.exists());
        read_pid_file(&paths.pid_file).expect("the wrapper wrote the extension's pid file")
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(pid) = self.recorded("shim").and_then(|b| String::from_utf8(b).ok()?.trim().parse().ok())
        {
            kill(pid);
        }
        for pid in pids_with(&["--root", &self.root.to_string_lossy()]) {
            kill(pid);
        }
    }
}

fn katactl(socket: &Path, args: &[&str]) -> Ran {
    let mut cmd = Command::new(KATACTL);
    cmd.arg("-r").arg(format!("unix://{}", socket.display())).args(["--timeout", "10s"]).args(args);
    run_split(&mut cmd, b"", TIMEOUT)
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Whether this process may start an extension (it enters network namespaces: root only), and
/// the agent can follow a shim.
fn root_or_skip() -> bool {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(Tier::Containerd, "not root (the extension enters network namespaces)");
    }
    ctrd::require_exit_with_pid();
    root
}

/// The extension serves the sandbox and ends with the shim it was told to follow.
fn extension_follows_the_shim(mode: &str) {
    if !root_or_skip() {
        return;
    }
    let b = Bench::new(SANDBOX);
    let r = b.start(mode);
    assert!(r.status.success(), "start: {}", r.out());
    assert_eq!(
        r.out(),
        "unix:///run/containerd/s/fake",
        "containerd must read exactly the delegate's answer"
    );

    // The delegate got what containerd gave the wrapper.
    let argv = "-namespace\nkt\n-address\n/run/fake/containerd.sock\n-publish-binary\n/usr/bin/containerd\n-id\nsb1\nstart\n";
    assert_eq!(String::from_utf8(b.recorded("argv").unwrap()).unwrap(), argv);
    assert_eq!(b.recorded("stdin").unwrap(), OPTS, "stdin untouched");
    assert_eq!(b.recorded("ttrpc").unwrap(), b"/run/fake/containerd.sock.ttrpc");
    let cwd = String::from_utf8(b.recorded("cwd").unwrap()).unwrap();
    assert_eq!(
        Path::new(cwd.trim()),
        b.bundle.canonicalize().unwrap(),
        "the bundle is the working directory"
    );

    // The extension: root-only socket, following the long-running shim.
    let ext = b.extension();
    let paths = b.paths();
    assert_eq!(mode_of(&paths.socket), 0o600);
    assert_eq!(mode_of(paths.socket.parent().unwrap()), 0o700);
    let shim = b.fake_shim_pid();
    let argv = cmdline(ext);
    assert!(argv.windows(2).any(|w| w == ["--exit-with-pid", &shim.to_string()]), "{argv:?} follows {shim}");
    assert!(argv.windows(2).any(|w| w == ["--id", ID]), "{argv:?}");

    // It answers on its socket.
    let ps = katactl(&paths.socket, &["-o", "json", "ps"]);
    assert!(ps.status.success(), "katactl ps: {}{}", ps.out(), ps.err());
    let list: serde_json::Value = serde_json::from_str(&ps.out()).unwrap();
    assert!(
        list.get("sandboxes").is_none_or(|s| s.as_array().is_some_and(Vec::is_empty)),
        "no Kata VM: {list}"
    );

    // The shim goes: the extension ends by itself (no delete), taking its socket and pid file.
    kill(shim);
    assert!(exits_within(ext, TIMEOUT), "the extension outlived its shim");
    wait_for("the socket to go", TIMEOUT, || !paths.socket.exists());
    wait_for("the pid file to go", TIMEOUT, || !paths.pid_file.exists());
    let log = std::fs::read_to_string(&paths.log_file).unwrap();
    assert!(log.contains(&format!("extension pid {ext}")), "{log}");
    assert!(log.contains(&format!("following shim pid {shim}")), "{log}");
}

#[test]
fn start_with_a_kata_like_delegate_that_writes_shim_pid() {
    extension_follows_the_shim("kata");
}

#[test]
fn start_with_a_runc_like_delegate_that_leaves_only_an_orphan() {
    extension_follows_the_shim("runc");
}

#[test]
fn workload_and_unannotated_containers_get_no_extension() {
    for annotations in [WORKLOAD, "{}"] {
        let b = Bench::new(annotations);
        let r = b.start("runc");
        assert!(r.status.success(), "{annotations}: {}", r.out());
        assert_eq!(r.out(), "unix:///run/containerd/s/fake", "{annotations}");
        assert_eq!(b.recorded("stdin").unwrap(), OPTS);
        assert!(!b.root.join("run/katamaran").exists(), "{annotations}: nothing of ours was created");
        assert!(pids_with(&["--root", &b.root.to_string_lossy()]).is_empty(), "{annotations}: no extension");
    }
}

#[test]
fn unannotated_containers_get_an_extension_when_asked() {
    if !root_or_skip() {
        return;
    }
    // `ctr run` without annotations, KATAMARAN_EXTENSION=unannotated.
    let b = Bench::new("{}");
    let mut cmd = b.wrapper("runc", &["-id", ID, "start"]);
    cmd.env("KATAMARAN_EXTENSION", "unannotated");
    let r = b.start_with(cmd);
    assert_eq!(r.out(), "unix:///run/containerd/s/fake");
    b.extension();
}

#[test]
fn a_failing_delegate_is_handed_back_unchanged() {
    let b = Bench::new(SANDBOX);
    let r = b.start("fail");
    assert_eq!(r.status.code(), Some(7), "the delegate's exit code");
    assert_eq!(r.out(), "boom: no VM today\n", "the delegate's words, nothing added");
    assert!(!b.paths().socket.exists() && !b.paths().pid_file.exists(), "no extension after a failed start");
    assert!(pids_with(&["--root", &b.root.to_string_lossy()]).is_empty());
}

/// Builds the wrapper command of one refusal case, breaking the bench as the case needs.
type Breaker<'a> = &'a dyn Fn(&Bench) -> Command;

#[test]
fn refusals_are_clear_quick_and_start_nothing() {
    let cases: [(&str, Breaker<'_>, &str); 5] = [
        (
            "missing delegate",
            &|b| {
                let mut c = b.wrapper("runc", &["-id", ID, "start"]);
                c.env("KATAMARAN_DELEGATE_SHIM", "/nonexistent/containerd-shim-gone-v2");
                c
            },
            "delegate shim /nonexistent/containerd-shim-gone-v2 not found",
        ),
        (
            "garbage bundle",
            &|b| {
                std::fs::write(b.bundle.join("config.json"), "{not json").unwrap();
                b.wrapper("runc", &["-id", ID, "start"])
            },
            "cannot read the OCI bundle of container sb1: cannot read OCI bundle config",
        ),
        (
            "bundle without config.json",
            &|b| {
                std::fs::remove_file(b.bundle.join("config.json")).unwrap();
                b.wrapper("runc", &["-id", ID, "start"])
            },
            "config.json",
        ),
        (
            "missing agent",
            &|b| {
                let mut c = b.wrapper("runc", &["-id", ID, "start"]);
                c.env("KATAMARAN_AGENT", "/nonexistent/katamaran-agent");
                c
            },
            "extension binary /nonexistent/katamaran-agent not found",
        ),
        (
            "unusable sandbox id",
            &|b| b.wrapper("runc", &["-id", "-rf", "start"]),
            "invalid sandbox id \"-rf\"",
        ),
    ];
    for (what, make, needle) in cases {
        let b = Bench::new(SANDBOX);
        let r = b.start_with(make(&b));
        assert_eq!(r.status.code(), Some(1), "{what}: {}", r.out());
        assert!(r.out().starts_with("containerd-shim-katamaran-v2: "), "{what}: {}", r.out());
        assert!(r.out().contains(needle), "{what}: {}", r.out());
        assert!(b.recorded("argv").is_none(), "{what}: the delegate must not run");
    }

    // A live server on the sandbox's socket: refused before the delegate runs.
    let b = Bench::new(SANDBOX);
    let paths = b.paths();
    std::fs::create_dir_all(paths.socket.parent().unwrap()).unwrap();
    let _held = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
    let r = b.start("runc");
    assert_eq!(r.status.code(), Some(1), "{}", r.out());
    assert!(r.out().contains("a live server already holds the extension socket"), "{}", r.out());
    assert!(r.out().contains(&paths.socket.display().to_string()), "{}", r.out());
    assert!(b.recorded("argv").is_none(), "the delegate must not run");
    assert!(pids_with(&["--root", &b.root.to_string_lossy()]).is_empty());
}

#[test]
fn delete_hands_back_the_response_and_stops_the_extension() {
    if !root_or_skip() {
        return;
    }
    let b = Bench::new(SANDBOX);
    assert!(b.start("runc").status.success());
    let ext = b.extension();
    let shim = b.fake_shim_pid();
    let bundle = b.bundle.to_string_lossy().into_owned();
    let r = run_split(&mut b.wrapper("runc", &["-id", ID, "-bundle", &bundle, "delete"]), b"", TIMEOUT);
    assert!(r.status.success(), "{}", r.err());
    assert_eq!(r.stdout, DELETE_BYTES, "containerd unmarshals these bytes: untouched");
    assert_eq!(r.err(), "", "a clean delete warns about nothing");
    assert!(exits_within(ext, TIMEOUT), "delete stopped the extension");
    let paths = b.paths();
    assert!(!paths.socket.exists() && !paths.pid_file.exists());
    assert!(alive(shim), "the shim is the delegate's business");
    let log = std::fs::read_to_string(&paths.log_file).unwrap();
    assert!(log.contains("extension stopped by delete (Terminated)"), "{log}");

    // Without its delegate, delete still stops the extension, and says what is missing.
    let b = Bench::new(SANDBOX);
    assert!(b.start("runc").status.success());
    let ext = b.extension();
    let mut cmd = b.wrapper("runc", &["-id", ID, "-bundle", &bundle, "delete"]);
    cmd.env("KATAMARAN_DELEGATE_SHIM", "/nonexistent/containerd-shim-gone-v2");
    let r = run_split(&mut cmd, b"", TIMEOUT);
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stdout.is_empty());
    assert!(r.err().contains("delegate shim /nonexistent/containerd-shim-gone-v2 not found"), "{}", r.err());
    assert!(exits_within(ext, TIMEOUT));
}

// ---- Debian's containerd 1.6, containerd-shim-runc-v2 as the delegate (root) ----

fn containerd_or_skip() -> Option<Containerd> {
    if let Some(why) = ctrd::skip_reason() {
        skip(Tier::Containerd, why);
        return None;
    }
    Some(Containerd::start())
}

fn sandbox_annotations(name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("io.kubernetes.cri.container-type", "sandbox".into()),
        ("io.kubernetes.cri.sandbox-name", name.into()),
        ("io.kubernetes.cri.sandbox-namespace", "shop".into()),
    ]
}

fn run_sandbox(c: &Containerd, id: &str) -> Ran {
    let ann = sandbox_annotations(id);
    let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
    c.run_detached(id, &ann, &["sleep", "3600"])
}

#[test]
fn containerd_privileged_sandbox_gets_an_extension_for_its_lifetime() {
    let Some(c) = containerd_or_skip() else { return };
    ctrd::require_exit_with_pid();
    let id = "kt-sandbox";
    let r = run_sandbox(&c, id);
    assert!(r.status.success(), "ctr run: {}{}\n{}", r.out(), r.err(), c.log());
    let paths = ExtensionPaths::new(&NodeLayout::under(&c.node_root), id);
    wait_for("the extension's socket", TIMEOUT, || paths.socket.exists());
    assert_eq!(mode_of(&paths.socket), 0o600);
    let ext = read_pid_file(&paths.pid_file).unwrap();
    let shim = c.runc_shim_pid(id).expect("runc's long-running shim");
    let argv = cmdline(ext);
    assert!(argv.windows(2).any(|w| w == ["--exit-with-pid", &shim.to_string()]), "{argv:?} follows {shim}");

    // The extension answers; a runc container has no QEMU, so inspect fails, clearly and fast.
    let ps = katactl(&paths.socket, &["ps"]);
    assert!(ps.status.success(), "katactl ps: {}", ps.err());
    assert!(ps.out().starts_with("SANDBOX"), "{}", ps.out());
    let inspect = katactl(&paths.socket, &["inspect", id]);
    assert!(!inspect.status.success());
    assert!(inspect.err().contains(id) && inspect.err().contains("not found"), "{}", inspect.err());

    // The container works as it would without katamaran.
    let e = c.exec(id, "e1", &["sh", "-c", "echo hello from $(hostname); exit 3"]);
    assert_eq!(e.status.code(), Some(3), "exit code through exec: {}", e.err());
    assert!(e.out().contains("hello from"), "{}", e.out());

    // Teardown through the Task API: the shim exits, the extension with it.
    c.ctr_ok(&["task", "delete", "--force", id]);
    assert!(exits_within(ext, TIMEOUT), "the extension outlived its sandbox");
    wait_for("the socket to go", TIMEOUT, || !paths.socket.exists());
    wait_for("the pid file to go", TIMEOUT, || !paths.pid_file.exists());
    assert!(!alive(shim));
    c.ctr_ok(&["container", "delete", id]);
}

#[test]
fn containerd_privileged_killing_the_extension_leaves_the_container_alone() {
    let Some(c) = containerd_or_skip() else { return };
    ctrd::require_exit_with_pid();
    let id = "kt-robust";
    let r = run_sandbox(&c, id);
    assert!(r.status.success(), "ctr run: {}{}\n{}", r.out(), r.err(), c.log());
    let paths = ExtensionPaths::new(&NodeLayout::under(&c.node_root), id);
    wait_for("the extension's socket", TIMEOUT, || paths.socket.exists());
    let ext = read_pid_file(&paths.pid_file).unwrap();
    kill(ext);
    assert!(exits_within(ext, TIMEOUT));

    let e = c.exec(id, "e1", &["echo", "still here"]);
    assert!(e.status.success(), "{}", e.err());
    assert_eq!(e.out().trim(), "still here");
    let tasks = c.ctr_ok(&["task", "list"]);
    assert!(tasks.lines().any(|l| l.starts_with(id) && l.contains("RUNNING")), "{tasks}");

    // The killed extension left its socket; the wrapper's delete, which containerd runs once the
    // shim is gone, clears it.
    assert!(paths.socket.exists(), "a SIGKILLed server cannot remove its socket");
    c.remove(id);
    wait_for("delete to clear the stale socket", TIMEOUT, || {
        !paths.socket.exists() && !paths.pid_file.exists()
    });
}

#[test]
fn containerd_privileged_plain_containers_and_refusals() {
    let Some(c) = containerd_or_skip() else { return };
    let layout = NodeLayout::under(&c.node_root);

    // `ctr run` without CRI annotations: a working container, no extension.
    let r = c.run_detached("kt-plain", &[], &["sleep", "3600"]);
    assert!(r.status.success(), "ctr run: {}{}\n{}", r.out(), r.err(), c.log());
    let e = c.exec("kt-plain", "e1", &["echo", "plain"]);
    assert_eq!(e.out().trim(), "plain");
    assert!(!ExtensionPaths::new(&layout, "kt-plain").pid_file.exists());
    assert!(pids_with(&["--root", &c.node_root.to_string_lossy()]).is_empty(), "no extension");
    c.remove("kt-plain");

    // A live server on the socket: the sandbox is refused before any shim starts.
    let held = ExtensionPaths::new(&layout, "kt-held");
    std::fs::create_dir_all(held.socket.parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&held.socket).unwrap();
    let r = run_sandbox(&c, "kt-held");
    assert!(!r.status.success());
    assert!(r.err().contains("a live server already holds the extension socket"), "{}", r.err());
    assert_eq!(c.runc_shim_pid("kt-held"), None, "no shim was started");
    assert!(held.socket.exists(), "someone else's socket is left alone");
    drop(listener);
    c.remove("kt-held");

    // A missing delegate: containerd reports the wrapper's message.
    c.configure("/nonexistent/containerd-shim-gone-v2");
    let r = run_sandbox(&c, "kt-nodelegate");
    assert!(!r.status.success());
    assert!(r.err().contains("delegate shim /nonexistent/containerd-shim-gone-v2 not found"), "{}", r.err());
    c.configure("containerd-shim-runc-v2");
    c.remove("kt-nodelegate");
}
