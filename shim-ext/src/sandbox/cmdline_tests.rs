use super::*;

/// A representative command line of Kata's Go runtime (govmm `qemu.go`, x86_64 defaults: nvdimm
/// guest image, virtio-fs, vsock, a multi-queue tap with vhost, fds as Kata passes them) plus a
/// drive on shared storage.
fn kata_argv() -> Vec<String> {
    let vm = "/run/vc/vm/abc";
    [
        "/opt/kata/bin/qemu-system-x86_64",
        "-name",
        "sandbox-abc,debug-threads=on",
        "-uuid",
        "0e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7",
        "-machine",
        "q35,accel=kvm,nvdimm=on",
        "-cpu",
        "host,pmu=off",
        "-qmp",
        "unix:fd=3,server=on,wait=off",
        "-qmp",
        &format!("unix:path={vm}/extra-monitor.sock,server=on,wait=off"),
        "-m",
        "2048M,slots=10,maxmem=12G",
        "-device",
        "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis=1,shpc=off,addr=2,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
        "-device",
        "virtio-serial-pci,disable-modern=false,id=serial0",
        "-device",
        "virtconsole,chardev=charconsole0,id=console0",
        "-chardev",
        &format!("socket,id=charconsole0,path={vm}/console.sock,server=on,wait=off"),
        "-device",
        "nvdimm,id=nv0,memdev=mem0,unarmed=on",
        "-object",
        "memory-backend-file,id=mem0,mem-path=/opt/kata/share/kata-containers/kata-containers.img,size=268435456,readonly=on",
        "-device",
        "virtio-scsi-pci,id=scsi0,disable-modern=false",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
        "-device",
        "vhost-vsock-pci,disable-modern=false,vhostfd=4,id=vsock-1,guest-cid=1",
        "-chardev",
        &format!("socket,id=char-fs,path={vm}/vhost-fs.sock"),
        "-device",
        "vhost-user-fs-pci,chardev=char-fs,tag=kataShared,queue-size=1024",
        "-netdev",
        "tap,id=network-0,vhost=on,vhostfds=5:6,fds=7:8",
        "-device",
        "driver=virtio-net-pci,netdev=network-0,mac=02:42:ac:11:00:02,disable-modern=false,mq=on,vectors=6",
        "-drive",
        "id=drive-0,file=/srv/shared/data.img,aio=threads,format=raw,if=none,cache=none",
        "-device",
        "virtio-blk-pci,drive=drive-0,id=virtio-disk0",
        "-rtc",
        "base=utc,driftfix=slew,clock=host",
        "-global",
        "kvm-pit.lost_tick_policy=discard",
        "-vga",
        "none",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "--no-reboot",
        "-object",
        "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on",
        "-numa",
        "node,memdev=dimm1",
        "-kernel",
        "/opt/kata/share/kata-containers/vmlinux.container",
        "-append",
        "tsc=reliable no_timer_check root=/dev/pmem0p1 rootflags=dax,data=ordered ro console=hvc0 quiet",
        "-pidfile",
        &format!("{vm}/pid"),
        "-D",
        &format!("{vm}/qemu.log"),
        "-smp",
        "1,cores=1,threads=1,sockets=12,maxcpus=12",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-object",
        "iothread,id=iothread-1",
        "-device",
        "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on",
        "-daemonize",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn rewrite() -> IncomingRewrite {
    IncomingRewrite {
        qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
        state_dir: "/run/katamaran/incoming/abc".into(),
        source_state_dirs: vec!["/run/vc/vm/abc".into()],
        tap_name: "tap0_kata".into(),
        disk_paths: BTreeMap::new(),
        allowed_roots: vec!["/opt/kata".into(), "/srv/shared".into()],
    }
}

fn opts_of<'a>(argv: &'a [String], name: &str) -> Vec<&'a str> {
    argv.windows(2).filter(|w| w[0] == format!("-{name}")).map(|w| w[1].as_str()).collect()
}

#[test]
fn parse_round_trips_argv() {
    let argv = kata_argv();
    let cmd = QemuCmdline::parse(&argv).expect("parse");
    assert_eq!(cmd.program, "/opt/kata/bin/qemu-system-x86_64");
    assert!(cmd.args.iter().any(|a| a.name == "daemonize" && a.value.is_none()));
    assert!(cmd.args.iter().any(|a| a.name == "no-reboot"), "--long options parse");
    let again = cmd.to_argv();
    assert_eq!(again.len(), argv.len());
    assert_eq!(QemuCmdline::parse(&again).expect("reparse"), cmd);
}

#[test]
fn parse_errors_name_the_problem() {
    let table: [(&[&str], &str); 6] = [
        (&[], "empty command line"),
        (&["qemu", "stray"], "\"stray\""),
        (&["qemu", "-m"], "-m lacks its argument"),
        // An unknown option is refused, not guessed to take an argument or not.
        (&["qemu", "-frobnicate", "x"], "-frobnicate is not an option of QEMU 7.2 or 10.x"),
        // A flag never swallows what follows it, so a value after one is a stray word.
        (&["qemu", "-nographic", "/etc/shadow"], "after -nographic"),
        (&["qemu", "-daemonize", "yes"], "\"yes\" after -daemonize, which takes no argument"),
    ];
    for (argv, want) in table {
        let err = QemuCmdline::parse(argv).expect_err("must fail").to_string();
        assert!(err.contains(want), "{argv:?}: {err}");
    }
}

#[test]
fn kata_cmdline_becomes_incoming() {
    let cmd = QemuCmdline::parse(&kata_argv()).expect("parse");
    let out = rewrite().apply(&cmd).expect("rewrite");
    let argv = &out.argv;
    assert_eq!(argv[0], "/usr/bin/qemu-system-x86_64", "binary is ours, not the source's");
    assert!(!argv.iter().any(|a| a == "-daemonize"));
    assert_eq!(opts_of(argv, "qmp"), ["unix:/run/katamaran/incoming/abc/qmp.sock,server=on,wait=off"]);
    assert_eq!(opts_of(argv, "pidfile"), ["/run/katamaran/incoming/abc/pid"]);
    assert_eq!(opts_of(argv, "D"), ["/run/katamaran/incoming/abc/qemu.log"]);
    assert_eq!(argv[argv.len() - 2..], ["-incoming".to_string(), "defer".to_string()]);
    assert_eq!(out.qmp_socket, Path::new("/run/katamaran/incoming/abc/qmp.sock"));
    assert_eq!(
        opts_of(argv, "netdev"),
        ["tap,id=network-0,vhost=on,ifname=tap0_kata,script=no,downscript=no,queues=2"]
    );
    let devices = opts_of(argv, "device");
    assert!(devices.contains(&"vhost-vsock-pci,disable-modern=false,id=vsock-1,guest-cid=1"), "{devices:?}");
    assert!(devices.iter().any(|d| d.contains("mac=02:42:ac:11:00:02")), "guest MAC kept");
    assert!(!argv.iter().any(|a| a.contains("/run/vc/vm/abc")), "no source state path left: {argv:?}");
    assert!(!argv.iter().any(|a| a.contains("fds=") || a.contains("vhostfd")), "{argv:?}");
    // Everything else is carried over unchanged, in order.
    assert_eq!(
        opts_of(argv, "object"),
        [
            "memory-backend-file,id=mem0,mem-path=/opt/kata/share/kata-containers/kata-containers.img,size=268435456,readonly=on",
            "rng-random,id=rng0,filename=/dev/urandom",
            "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on",
            "iothread,id=iothread-1",
        ]
    );
    assert_eq!(
        opts_of(argv, "drive"),
        ["id=drive-0,file=/srv/shared/data.img,aio=threads,format=raw,if=none,cache=none"]
    );
    assert_eq!(
        opts_of(argv, "chardev"),
        [
            "socket,id=charconsole0,path=/run/katamaran/incoming/abc/console.sock,server=on,wait=off",
            "socket,id=char-fs,path=/run/katamaran/incoming/abc/vhost-fs.sock",
        ]
    );
}

#[test]
fn local_storage_points_drives_at_new_images() {
    let mut argv = kata_argv();
    argv.extend(
        [
            "-blockdev",
            "driver=raw,node-name=disk1,file.driver=file,file.filename=/src/one.img",
            "-blockdev",
            r#"{"driver":"raw","node-name":"disk2","file":{"driver":"file","filename":"/src/two.img"}}"#,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut rw = rewrite();
    rw.disk_paths.insert("drive-0".into(), "/dst/data.img".into());
    rw.disk_paths.insert("disk1".into(), "/dst/one-new.img".into());
    rw.disk_paths.insert("disk2".into(), "/dst/two.img".into());
    let out = rw.apply(&QemuCmdline::parse(&argv).expect("parse")).expect("rewrite");
    let drive = opts_of(&out.argv, "drive")[0];
    assert!(drive.ends_with("file=/dst/data.img") && !drive.contains("/var/lib"), "{drive}");
    let blockdevs = opts_of(&out.argv, "blockdev");
    assert_eq!(blockdevs[0], "driver=raw,node-name=disk1,file.driver=file,file.filename=/dst/one-new.img");
    let json: serde_json::Value = serde_json::from_str(blockdevs[1]).expect("json");
    assert_eq!(json["file"]["filename"], "/dst/two.img");
}

#[test]
fn monitors_and_their_chardevs_go() {
    let argv: Vec<String> = [
        "qemu",
        "-chardev",
        "socket,id=mon0,fd=3",
        "-mon",
        "chardev=mon0,mode=control",
        "-monitor",
        "unix:/run/vc/vm/abc/hmp.sock,server=on,wait=off",
        "-chardev",
        "socket,id=con,fd=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = rewrite().apply(&QemuCmdline::parse(&argv).expect("parse")).expect("rewrite");
    assert!(
        !out.argv
            .iter()
            .any(|a| a.contains("mon0") || a.contains("hmp.sock") || a == "-monitor" || a == "-mon"),
        "{:?}",
        out.argv
    );
    assert_eq!(
        opts_of(&out.argv, "chardev"),
        ["socket,id=con,path=/run/katamaran/incoming/abc/con.sock,server=on,wait=off"]
    );
}

#[test]
fn option_splitting_honours_escaped_commas() {
    assert_eq!(split_opts("a,b=c,,d,e"), ["a", "b=c,d", "e"]);
    assert_eq!(join_opts(&["a", "b=c,d"]), "a,b=c,,d");
    assert_eq!(split_opts(""), [""]);
}

#[test]
fn reads_proc_style_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cmdline");
    std::fs::write(&path, ["qemu", "-m", "128", "-daemonize", ""].join("\0")).expect("write");
    let cmd = QemuCmdline::from_proc_file(&path).expect("parse");
    assert_eq!(cmd.values("m").collect::<Vec<_>>(), ["128"]);
    let err = QemuCmdline::from_proc_file(&dir.path().join("gone")).expect_err("missing").to_string();
    assert!(err.contains("gone"), "{err}");
}

/// The lab's Kata-shaped command line (`hack/lab.sh vm`) as the e2e migration tests run it: its
/// kernel and shared disks are outside the VM directory, under roots the lab's agents allow.
#[test]
fn lab_cmdline_is_accepted() {
    let lab = "/run/katamaran-lab";
    let vm = format!("{lab}/node-a/run/vc/vm/web");
    let guest = "/src/katamaran/hack/guest/out";
    let argv: Vec<String> = [
        "qemu-system-x86_64",
        "-name",
        "sandbox-web",
        "-uuid",
        "8c2f1d3e-0000-4000-8000-0000000000a1",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "128M",
        "-smp",
        "1",
        "-qmp",
        &format!("unix:{vm}/qmp.sock,server=on,wait=off"),
        "-qmp",
        &format!("unix:{vm}/extra-monitor.sock,server=on,wait=off"),
        "-pidfile",
        &format!("{vm}/pid"),
        "-daemonize",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "--no-reboot",
        "-rtc",
        "base=utc,driftfix=slew,clock=host",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
        "-netdev",
        "tap,id=network-0,ifname=tap0_kata,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=network-0,mac=02:00:00:00:00:01,id=net-0",
        "-drive",
        &format!("id=drive-0,file={lab}/shared/web-disk0.img,aio=threads,format=raw,if=none,readonly=off"),
        "-device",
        "virtio-blk-pci,drive=drive-0,id=virtio-blk-0",
        "-drive",
        &format!(
            "id=drive-1,file={lab}/node-a/disks/web-disk1.img,aio=threads,format=raw,if=none,readonly=off"
        ),
        "-device",
        "virtio-blk-pci,drive=drive-1,id=virtio-blk-1",
        "-kernel",
        &format!("{guest}/vmlinuz"),
        "-initrd",
        &format!("{guest}/initramfs.img"),
        "-append",
        "console=ttyS0 quiet panic=1 katamaran.ip=10.0.0.5/32 katamaran.gw=169.254.1.1 katamaran.id=web",
        "-serial",
        &format!("file:{vm}/console.log"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let state = format!("{lab}/node-b/run/katamaran/incoming/web");
    let rw = IncomingRewrite {
        qemu_binary: "qemu-system-x86_64".into(),
        state_dir: state.clone().into(),
        source_state_dirs: vec![vm.clone().into()],
        tap_name: "tap0_kata".into(),
        // Local storage: the destination's own image replaces drive-1.
        disk_paths: [("drive-1".to_owned(), PathBuf::from(format!("{state}/disks/drive-1.img")))].into(),
        allowed_roots: vec![guest.into(), format!("{lab}/shared").into()],
    };
    let out =
        rw.apply(&QemuCmdline::parse(&argv).expect("parse")).expect("the lab's command line is accepted");
    assert_eq!(opts_of(&out.argv, "serial"), [format!("file:{state}/console.log")]);
    assert_eq!(opts_of(&out.argv, "kernel"), [format!("{guest}/vmlinuz")]);
    let drives = opts_of(&out.argv, "drive");
    assert!(drives[0].contains(&format!("file={lab}/shared/web-disk0.img")), "{drives:?}");
    assert!(drives[1].ends_with(&format!("file={state}/disks/drive-1.img")), "{drives:?}");
    // Without the lab's roots its shared disk and kernel are refused: the roots let them through.
    let strict = IncomingRewrite { allowed_roots: Vec::new(), ..rw };
    let err =
        strict.apply(&QemuCmdline::parse(&argv).expect("parse")).expect_err("outside roots").to_string();
    assert!(err.contains("-drive") && err.contains("outside the allowed roots"), "{err}");
}

/// Each hostile option (added to an otherwise valid command line) is refused with an error naming
/// the option and, where it is one, the property; the state directory is never created.
#[test]
fn hostile_command_lines_are_refused() {
    let vm = "/run/vc/vm/abc";
    let table: &[(&[&str], &[&str])] = &[
        (&["-serial", "mon:stdio"], &["-serial", "mon:stdio"]),
        (&["-serial", "stdio"], &["-serial"]),
        (&["-serial", "file:/etc/cron.d/evil"], &["-serial", "\"file\"", "outside"]),
        (&["-monitor", "stdio"], &["-monitor", "not a unix socket"]),
        (&["-qmp", "tcp:0.0.0.0:4444,server=on"], &["-qmp"]),
        (&["-drive", "file=/dev/sda,if=none,id=d"], &["-drive", "\"file\"", "host device"]),
        (&["-drive", "file=/srv/shared/x.img,format=qcow2,if=none,id=d"], &["-drive", "\"format\""]),
        (&["-blockdev", "driver=file,node-name=x,filename=/dev/sda"], &["-blockdev", "\"filename\""]),
        (&["-chardev", "file,id=x,path=/etc/shadow"], &["-chardev", "\"file\""]),
        (&["-chardev", "socket,id=x,path=/run/vc/vm/other/qmp.sock"], &["-chardev", "\"path\"", "outside"]),
        (&["-virtfs", "local,path=/,mount_tag=x,security_model=none"], &["-virtfs"]),
        (&["-fsdev", "local,id=f,path=/,security_model=none"], &["-fsdev", "\"path\"", "outside"]),
        (&["-plugin", "file=/tmp/evil.so"], &["-plugin"]),
        (&["-readconfig", "/etc/shadow"], &["-readconfig"]),
        (&["-add-fd", "fd=3,set=1"], &["-add-fd"]),
        (&["-netdev", "user,id=n"], &["-netdev", "\"user\""]),
        (&["-netdev", "tap,id=n,script=/bin/sh"], &["-netdev", "\"script\""]),
        (&["-netdev", "tap,id=n,helper=/usr/lib/qemu/qemu-bridge-helper"], &["-netdev", "\"helper\""]),
        (&["-netdev", "bridge,id=n,br=br0"], &["-netdev", "\"bridge\""]),
        (&["-object", "memory-backend-file,id=m,size=1G,mem-path=/dev/mem"], &["-object", "\"mem-path\""]),
        (
            &["-object", "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/other"],
            &["-object", "\"mem-path\""],
        ),
        (&["-object", "secret,id=s,file=/etc/shadow"], &["-object", "\"secret\""]),
        (&["-object", "rng-random,id=r,filename=/etc/shadow"], &["-object", "\"filename\""]),
        (&["-kernel", "/etc/passwd"], &["-kernel", "outside the allowed roots"]),
        (&["-kernel", "/opt/kata/../../etc/shadow"], &["-kernel", "'..'"]),
        (&["-initrd", "kata/initrd.img"], &["-initrd", "absolute"]),
        (&["-initrd", "/opt/kata/initrd.img,/etc/shadow"], &["-initrd", "comma"]),
        (&["-pflash", "/opt/kata/vars.fd,file:/etc/x"], &["-pflash", "comma"]),
        (&["-drive", "file=/srv/shared/../../etc/shadow,if=none,id=d"], &["-drive", "'..'"]),
        (
            &["-chardev", "socket,id=c,path=/run/vc/vm/abc/../../../../etc/x.sock,server=on"],
            &["-chardev", "'..'"],
        ),
        (&["-pidfile", "/etc/cron.d/x"], &["-pidfile", "outside"]),
        (&["-incoming", "tcp:0:4444"], &["-incoming"]),
        (&["-device", "vfio-pci,host=0000:00:01.0"], &["-device", "\"vfio-pci\""]),
        (&["-device", "loader,file=/etc/shadow"], &["-device", "\"loader\""]),
        (&["-device", "virtio-net-pci,romfile=/etc/passwd"], &["-device", "\"romfile\""]),
        (&["-global", "virtio-net-pci.romfile=/etc/passwd"], &["-global", "\"romfile\""]),
        (&["-global", "loader.file=/etc/shadow"], &["-global", "loader.file"]),
        (&["-machine", "q35,dumpdtb=x"], &["-machine", "\"dumpdtb\""]),
        (&["-run-with", "user=nobody"], &["-run-with"]),
        (&["-mon", "chardev=c,mode=readline,x=1"], &["-mon", "\"x\""]),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("incoming");
    for (extra, want) in table {
        let mut argv = vec!["qemu".to_string(), "-machine".into(), "q35".into()];
        argv.extend(extra.iter().map(|s| s.replace("/run/vc/vm/abc", vm)));
        let rw = IncomingRewrite { state_dir: state.clone(), ..rewrite() };
        let err = rw.apply(&QemuCmdline::parse(&argv).expect("parse")).expect_err("refused").to_string();
        for w in *want {
            assert!(err.contains(w), "{extra:?}: {err:?} lacks {w:?}");
        }
        assert!(!state.exists(), "{extra:?} created {}", state.display());
    }
}

#[test]
fn path_checks_are_lexical_and_component_wise() {
    use super::super::allowlist::{lexically_clean, under_any};
    let roots = [PathBuf::from("/opt/kata"), PathBuf::from("/run/katamaran/incoming/abc")];
    let table = [
        ("/opt/kata/vmlinuz", true),
        ("/opt/kata", true),
        ("/opt/katalyst/vmlinuz", false),
        ("/run/katamaran/incoming/abcdef/x.sock", false),
        ("/opt/kata/../etc/shadow", false),
        ("/opt/kata/./vmlinuz", false),
        ("/opt/kata/.", false),
        ("opt/kata/vmlinuz", false),
        ("/etc/passwd", false),
    ];
    for (path, ok) in table {
        let p = Path::new(path);
        assert_eq!(lexically_clean(p) && under_any(p, &roots), ok, "{path}");
    }
    assert!(!under_any(Path::new("/etc/passwd"), &[PathBuf::from("/")]), "/ is never a root");
}
