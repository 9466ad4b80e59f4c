//! Feeds command lines from "a migration source" to the parser, the allowlist and the incoming
//! rewrite.
//!
//! Property: nothing panics, and a command line the destination accepts holds only options of a
//! short list written here (not the allowlist's own tables) and only paths under the sandbox's
//! state directory, the allowed roots or the disks katamaran created, or one of four fixed host
//! paths — with no `..`. The kernel command line (`-append`) is guest-only text and not checked.
//!
//! Input: the first byte picks the mode. Even: the rest is a NUL-separated argv, like
//! `/proc/<pid>/cmdline`. Odd: a structured command line built from QEMU's option names and value
//! fragments (kinds, keys, safe and hostile paths), so accepted command lines are frequent.

#![no_main]

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use katamaran::sandbox::cmdline::{split_opts, IncomingRewrite, QemuCmdline};
use katamaran::sandbox::qemu_options::QEMU_OPTIONS;
use libfuzzer_sys::fuzz_target;

const STATE: &str = "/run/katamaran/incoming/abc";
const SOURCE: &str = "/run/vc/vm/abc";
const ROOT: &str = "/opt/kata";
const DISK: &str = "/run/katamaran/incoming/abc/disks/drive-0.img";
const FIXED: &[&str] = &["/dev/urandom", "/dev/random", "/dev/shm", "/dev/hugepages"];

/// What the output may contain, written independently of the allowlist.
const OUTPUT_OPTIONS: &[&str] = &[
    "D",
    "S",
    "accel",
    "append",
    "bios",
    "blockdev",
    "chardev",
    "cpu",
    "device",
    "display",
    "drive",
    "enable-kvm",
    "fsdev",
    "global",
    "incoming",
    "initrd",
    "kernel",
    "m",
    "machine",
    "name",
    "netdev",
    "no-reboot",
    "no-shutdown",
    "no-user-config",
    "nodefaults",
    "nographic",
    "numa",
    "object",
    "overcommit",
    "pflash",
    "pidfile",
    "qmp",
    "rtc",
    "sandbox",
    "serial",
    "smp",
    "uuid",
    "vga",
];

const FRAGMENTS: &[&str] = &[
    "q35",
    "tap",
    "socket",
    "file",
    "user",
    "bridge",
    "vhost-user",
    "none",
    "raw",
    "qcow2",
    "virtio-net-pci",
    "vfio-pci",
    "loader",
    "memory-backend-file",
    "memory-backend-ram",
    "rng-random",
    "secret",
    "iothread",
    "local",
    "id=x",
    "id=drive-0",
    "node-name=drive-0",
    "driver=file",
    "driver=raw",
    "if=none",
    "format=raw",
    "server=on",
    "wait=off",
    "fd=3",
    "fds=3:4",
    "vhost=on",
    "script=no",
    "script=/bin/sh",
    "ifname=tap0",
    "share=on",
    "size=1G",
    "mem-path=/dev/shm",
    "mem-path=/dev/mem",
    "mem-path=/opt/kata/img",
    "filename=/dev/urandom",
    "filename=/etc/shadow",
    "file=/opt/kata/a.img",
    "file=/dev/sda",
    "file=/run/vc/vm/abc/d.img",
    "file.filename=/opt/kata/x",
    "file.driver=file",
    "path=/run/vc/vm/abc/c.sock",
    "path=/run/vc/vm/abc/../../../etc/x",
    "path=/run/vc/vm/other/qmp.sock",
    "path=/",
    "unix:/run/vc/vm/abc/q.sock",
    "unix:fd=3",
    "unix:path=/tmp/q.sock",
    "mon:stdio",
    "stdio",
    "chardev:c",
    "file:/run/vc/vm/abc/console.log",
    "file:/etc/x",
    "/opt/kata/vmlinuz",
    "/opt/kata/../etc/passwd",
    "/etc/passwd",
    "/run/vc/vm/abc/pid",
    "/run/vc/vm/abcd/pid",
    "/opt/kata/./x",
    "/opt/katax/y",
    "kvm-pit.lost_tick_policy=discard",
    "romfile=/etc/passwd",
    "romfile=",
    "a,,b",
    "/opt/kata/a,,/etc/shadow",
    "{\"driver\":\"file\",\"filename\":\"/dev/sda\"}",
    "{\"driver\":\"file\",\"filename\":\"/opt/kata/x\"}",
    "defer",
    "..",
    "",
];

fn structured(data: &[u8]) -> Vec<String> {
    let mut argv = vec!["qemu".to_owned()];
    for chunk in data.chunks(4) {
        let pick = |i: usize| usize::from(chunk.get(i).copied().unwrap_or(0));
        let name = QEMU_OPTIONS[pick(0) % QEMU_OPTIONS.len()].0;
        argv.push(format!("-{name}"));
        let parts = 1 + pick(1) % 3;
        let value: Vec<&str> =
            (0..parts).map(|k| FRAGMENTS[(pick(2) * (k + 1) + pick(3) * k) % FRAGMENTS.len()]).collect();
        argv.push(value.join(","));
    }
    argv
}

fn clean(path: &Path) -> bool {
    path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn path_ok(token: &str) -> bool {
    let Some(start) = token.find('/') else { return true };
    let path = &token[start..];
    if FIXED.contains(&path) {
        return true;
    }
    let p = Path::new(path);
    clean(p)
        && !path.contains("/./")
        && !path.ends_with("/.")
        && [STATE, ROOT, DISK].iter().any(|root| p.starts_with(root))
}

fn tokens(value: &str) -> Vec<String> {
    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Object(m) => m.values().for_each(|v| strings(v, out)),
            serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(value) {
        let mut out = Vec::new();
        strings(&json, &mut out);
        return out;
    }
    split_opts(value)
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    let argv: Vec<String> = if mode % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        std::iter::once("qemu").chain(text.split('\0')).map(str::to_owned).collect()
    } else {
        structured(rest)
    };
    let Ok(cmd) = QemuCmdline::parse(&argv) else { return };
    let rewrite = IncomingRewrite {
        qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
        state_dir: STATE.into(),
        source_state_dirs: vec![SOURCE.into()],
        tap_name: "tap0_kata".into(),
        disk_paths: BTreeMap::from([("drive-0".to_owned(), PathBuf::from(DISK))]),
        allowed_roots: vec![ROOT.into()],
    };
    let Ok(out) = rewrite.apply(&cmd) else { return };
    let accepted = QemuCmdline::parse(&out.argv).expect("the output parses");
    for arg in &accepted.args {
        assert!(OUTPUT_OPTIONS.contains(&arg.name.as_str()), "accepted -{} from {argv:?}", arg.name);
        if arg.name == "append" {
            continue;
        }
        for token in tokens(arg.value.as_deref().unwrap_or_default()) {
            assert!(path_ok(&token), "accepted -{} {token:?} from {argv:?}", arg.name);
        }
    }
    assert_eq!(accepted.values("incoming").collect::<Vec<_>>(), ["defer"], "{argv:?}");
});
