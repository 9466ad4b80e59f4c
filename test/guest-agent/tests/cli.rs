//! The `katamaran-guest` binary as the lab calls it: disk-writer on a file, then disk-check and
//! disk-compare with their JSON reports and exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_katamaran-guest")).args(args).output().expect("run katamaran-guest")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn writer_output_passes_the_checker_and_a_damaged_copy_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(1 << 20)).expect("disk");
    let status = dir.path().join("status");
    let ready = dir.path().join("ready/disk");
    let out = agent(&[
        "disk-writer",
        "--device",
        s(&disk),
        "--rate",
        "1000",
        "--count",
        "30",
        "--status-dir",
        s(&status),
        "--ready-file",
        s(&ready),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ready.exists());
    assert_eq!(std::fs::read_to_string(status.join("disk.img")).expect("status").trim(), "29");

    let out = agent(&["disk-check", "--json", "--image", s(&disk)]);
    assert_eq!(out.status.code(), Some(0));
    let r = json(&out);
    assert_eq!(
        (r["records"].as_u64(), r["first_seq"].as_u64(), r["last_seq"].as_u64()),
        (Some(30), Some(0), Some(29))
    );
    assert_eq!(r["ok"], true);
    assert_eq!(r["errors"], serde_json::json!([]));

    let mut bytes = std::fs::read(&disk).expect("read");
    bytes[7 * 4096 + 9] ^= 0x10;
    let damaged = dir.path().join("damaged.img");
    std::fs::write(&damaged, &bytes).expect("write");
    let out = agent(&["disk-check", "--json", "--image", s(&damaged)]);
    assert_eq!(out.status.code(), Some(1));
    let r = json(&out);
    assert_eq!(r["errors"][0]["kind"], "corrupt");
    assert_eq!(r["errors"][0]["offset"], 7 * 4096);

    let out = agent(&["disk-compare", "--json", "--prefix", s(&damaged), "--full", s(&disk)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["first_mismatch_offset"], 7 * 4096);
    let out = agent(&["disk-compare", "--prefix", s(&disk), "--full", s(&disk)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 30 records"));
}

#[test]
fn usage_errors_exit_2_and_run_errors_exit_3() {
    let out = agent(&["disk-check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`--image` is required"));
    assert_eq!(agent(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(agent(&["udp-echo", "--port", "seven"]).status.code(), Some(2));
    let out = agent(&["disk-check", "--image", "/nonexistent/image"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed to open /nonexistent/image"));
    assert!(agent(&["help"]).status.success());
}
