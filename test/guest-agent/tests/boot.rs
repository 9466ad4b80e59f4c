//! Boots the lab guest image (hack/guest/build.sh) under QEMU with TCG and checks what the lab
//! relies on: the READY line on the serial console, zero loss through the UDP echo, the HTTP
//! page, and disk logs that the checker accepts — and in which it finds a corrupted or a
//! removed record.
//!
//! Needs `qemu-system-x86_64` and the image; builds the image with the script when missing (the
//! script caches). Skips with a reason when QEMU is absent or Debian's packages cannot be fetched.
//! `KATAMARAN_GUEST_OUT=DIR` uses a prebuilt image directory instead of running the script.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use katamaran_probe::ProbeConfig;
use katamaran_test_skip::{skip, Tier};
use serde_json::Value;

const READY: &str = "KATAMARAN-GUEST-READY";
const RECORD: u64 = 4096;
/// TCG boots the image in ~4–6 s here; a loaded CI machine gets plenty of slack.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The image directory, built when needed; `Err` is the reason to skip.
fn image() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("KATAMARAN_GUEST_OUT") {
        let dir = PathBuf::from(dir);
        return if dir.join("vmlinuz").is_file() && dir.join("initramfs.img").is_file() {
            Ok(dir)
        } else {
            Err(format!("KATAMARAN_GUEST_OUT={} has no vmlinuz/initramfs.img", dir.display()))
        };
    }
    let script = repo_root().join("hack/guest/build.sh");
    let out = Command::new(&script).output().map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    match out.status.code() {
        Some(0) => Ok(repo_root().join("hack/guest/out")),
        // Debian's packages are out of reach: not this code's failure.
        Some(3) => {
            Err(format!("guest image cannot be built: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
        _ => panic!("hack/guest/build.sh failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

fn qemu_present() -> bool {
    Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free udp port").port()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free tcp port").port()
}

/// A running QEMU; killed and reaped on drop, so a failing test leaves no VM behind.
struct Vm {
    child: Child,
    lines: Receiver<String>,
    console: Arc<Mutex<String>>,
}

impl Vm {
    fn boot(kernel: &Path, initrd: &Path, append: &str, udp: u16, tcp: u16, disks: &[PathBuf]) -> Vm {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "128", "-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append])
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=udp:127.0.0.1:{udp}-:7,hostfwd=tcp:127.0.0.1:{tcp}-:80"),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0"]);
        for disk in disks {
            cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio", disk.display()));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu");
        let (tx, lines) = mpsc::channel();
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let (tx, console) = (tx.clone(), Arc::clone(&console));
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut c) = console.lock() {
                        c.push_str(&line);
                        c.push('\n');
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Vm { child, lines, console }
    }

    fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits for the line containing `marker`; panics on a failure marker, an exit or the deadline.
    fn wait_for(&mut self, marker: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(line) if line.contains("KATAMARAN-GUEST-FAILED") || line.contains("Kernel panic") => {
                    panic!("guest failed: {line}\n--- console ---\n{}", self.console())
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {marker} in time\n--- console ---\n{}", self.console())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("qemu exited ({:?})\n--- console ---\n{}", self.child.try_wait(), self.console())
                }
            }
        }
    }

    /// SIGTERM (QEMU shuts down cleanly), then waits; SIGKILL if it takes too long.
    fn shutdown(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16) -> Value {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the guest's http");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    stream.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) =
        response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("page is not JSON ({e}): {body}"))
}

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_katamaran-guest")).args(args).output().expect("run katamaran-guest")
}

fn disk_check(image: &Path) -> (Option<i32>, Value) {
    let out = agent(&["disk-check", "--json", "--image", image.to_str().expect("utf-8 path")]);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("disk-check JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), report)
}

#[test]
fn boots_the_guest_image_under_qemu() {
    if !qemu_present() {
        skip(Tier::Qemu, "qemu-system-x86_64 is not installed");
        return;
    }
    let out = match image() {
        Ok(dir) => dir,
        Err(why) => {
            skip(Tier::Qemu, why);
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let disks = [dir.path().join("vda.raw"), dir.path().join("vdb.raw")];
    for (disk, mib) in disks.iter().zip([16u64, 8]) {
        std::fs::File::create(disk).and_then(|f| f.set_len(mib << 20)).expect("create disk");
    }
    let (udp, tcp) = (free_udp_port(), free_tcp_port());
    let append = "console=ttyS0 quiet panic=-1 katamaran.ip=10.0.2.15/24 katamaran.gw=10.0.2.2 \
                  katamaran.ip6=fd00::15/64 katamaran.gw6=fe80::2 katamaran.id=boot-test \
                  katamaran.disks=vda,vdb katamaran.writer_rate=50";

    let started = Instant::now();
    let mut vm = Vm::boot(&out.join("vmlinuz"), &out.join("initramfs.img"), append, udp, tcp, &disks);
    let ready = vm.wait_for(READY, started + BOOT_DEADLINE);
    let boot_time = started.elapsed();
    eprintln!("boot: {ready} after {:.2} s (QEMU start to READY, TCG)", boot_time.as_secs_f64());
    assert!(ready.contains("services=udp-echo,http,disk-vda,disk-vdb"), "{ready}");

    // Zero loss through slirp's forward to the guest's echo.
    let mut cfg = ProbeConfig::new(SocketAddr::from(([127, 0, 0, 1], udp)));
    cfg.rate = 200;
    cfg.duration = Duration::from_secs(2);
    cfg.wait_ready = Some(Duration::from_secs(30));
    let report = katamaran_probe::run(&cfg).expect("probe run");
    eprintln!("{report}");
    assert_eq!((report.sent, report.received, report.lost), (400, 400, 0));
    assert_eq!((report.duplicated, report.reordered), (0, 0));

    let page = http_get(tcp);
    eprintln!("page: {page}");
    assert_eq!(page["instance"], "boot-test");
    assert_eq!(page["hostname"], "boot-test");
    assert!(page["uptime_ms"].as_u64().is_some_and(|ms| ms > 0), "{page}");
    let written_vda = page["disk_records"]["vda"].as_u64().expect("vda progress on the page");
    assert!(page["disk_records"]["vdb"].as_u64().is_some(), "{page}");

    vm.shutdown();

    for disk in &disks {
        let (code, r) = disk_check(disk);
        assert_eq!(code, Some(0), "{}: {r}", disk.display());
        assert_eq!(r["ok"], true);
        assert_eq!(r["first_seq"], 0);
        assert!(r["records"].as_u64().is_some_and(|n| n > 0), "{r}");
    }
    let (_, vda) = disk_check(&disks[0]);
    // Every record the page reported as durable is on the image.
    assert!(vda["last_seq"].as_u64().is_some_and(|last| last >= written_vda), "{vda} vs page {written_vda}");
    let image = std::fs::read(&disks[0]).expect("read vda");
    let records = vda["records"].as_u64().expect("records");
    assert!(records >= 8, "need a few records to damage, have {records}");

    // A flipped byte inside record 3 is reported as corrupt at that record's offset.
    let corrupt = dir.path().join("corrupt.raw");
    let mut bytes = image.clone();
    bytes[(3 * RECORD + 100) as usize] ^= 0xFF;
    std::fs::write(&corrupt, &bytes).expect("write corrupt copy");
    let (code, r) = disk_check(&corrupt);
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(r["ok"], false);
    assert_eq!(r["errors"][0]["offset"], 3 * RECORD);
    assert_eq!(r["errors"][0]["kind"], "corrupt");

    // Record 5 removed (the rest shifted down) is a gap at offset 5 × 4096.
    let gap = dir.path().join("gap.raw");
    let mut bytes = image.clone();
    let (at, len) = ((5 * RECORD) as usize, RECORD as usize);
    bytes.drain(at..at + len);
    bytes.extend(std::iter::repeat_n(0u8, len));
    std::fs::write(&gap, &bytes).expect("write gap copy");
    let (code, r) = disk_check(&gap);
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(r["errors"][0]["offset"], 5 * RECORD);
    assert_eq!(r["errors"][0]["kind"], "gap");
    assert_eq!(r["error_count"], 1, "{r}");

    // The storage-migration check: the first 6 records are a prefix of the whole log; the
    // corrupted copy is not.
    let prefix = dir.path().join("prefix.raw");
    let mut bytes = image[..(6 * RECORD) as usize].to_vec();
    bytes.resize(image.len(), 0);
    std::fs::write(&prefix, &bytes).expect("write prefix copy");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let same = agent(&["disk-compare", "--json", "--prefix", &path(&prefix), "--full", &path(&disks[0])]);
    assert_eq!(same.status.code(), Some(0), "{}", String::from_utf8_lossy(&same.stdout));
    let differs = agent(&["disk-compare", "--json", "--prefix", &path(&corrupt), "--full", &path(&disks[0])]);
    assert_eq!(differs.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&differs.stdout).expect("compare JSON");
    assert_eq!(r["first_mismatch_offset"], 3 * RECORD);
}
