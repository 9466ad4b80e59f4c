use super::*;

/// The shape of a command line Kata's Go runtime gives QEMU (trimmed; fds as Kata passes them).
fn kata_argv() -> Vec<String> {
    let vm = "/run/vc/vm/abc";
    [
        "/opt/kata/bin/qemu-system-x86_64",
        "-name",
        "sandbox-abc,debug-threads=on",
        "-uuid",
        "0e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7",
        "-machine",
        "q35,accel=kvm",
        "-cpu",
        "host,pmu=off",
        "-qmp",
        "unix:fd=3,server=on,wait=off",
        "-qmp",
        &format!("unix:path={vm}/extra-monitor.sock,server=on,wait=off"),
        "-m",
        "2048M,slots=10,maxmem=12G",
        "-device",
        "virtio-serial-pci,disable-modern=false,id=serial0",
        "-device",
        "virtconsole,chardev=charconsole0,id=console0",
        "-chardev",
        &format!("socket,id=charconsole0,path={vm}/console.sock,server=on,wait=off"),
        "-device",
        "vhost-vsock-pci,disable-modern=false,vhostfd=4,id=vsock-1,guest-cid=1",
        "-netdev",
        "tap,id=network-0,vhost=on,vhostfds=5:6,fds=7:8",
        "-device",
        "driver=virtio-net-pci,netdev=network-0,mac=02:42:ac:11:00:02,disable-modern=false,mq=on,vectors=6",
        "-drive",
        "id=drive-0,file=/var/lib/disks/data.img,aio=threads,format=raw,if=none,cache=none",
        "-device",
        "virtio-blk-pci,drive=drive-0,id=virtio-disk0",
        "-vga",
        "none",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "--no-reboot",
        "-object",
        "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on",
        "-kernel",
        "/opt/kata/share/kata-containers/vmlinux.container",
        "-append",
        "tsc=reliable console=hvc0 quiet",
        "-pidfile",
        &format!("{vm}/pid"),
        "-D",
        &format!("{vm}/qemu.log"),
        "-smp",
        "1,cores=1,threads=1,sockets=12,maxcpus=12",
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
    let table: [(&[&str], &str); 3] = [
        (&[], "empty command line"),
        (&["qemu", "stray"], "\"stray\""),
        (&["qemu", "-m"], "-m lacks its argument"),
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
    assert_eq!(
        opts_of(argv, "chardev"),
        ["socket,id=charconsole0,path=/run/katamaran/incoming/abc/console.sock,server=on,wait=off"]
    );
    assert!(!argv.iter().any(|a| a.contains("/run/vc/vm/abc")), "no source state path left: {argv:?}");
    assert!(!argv.iter().any(|a| a.contains("fds=") || a.contains("vhostfd")), "{argv:?}");
    // Everything else is carried over unchanged, in order.
    assert_eq!(
        opts_of(argv, "object"),
        ["memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on"]
    );
    assert_eq!(
        opts_of(argv, "drive"),
        ["id=drive-0,file=/var/lib/disks/data.img,aio=threads,format=raw,if=none,cache=none"]
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
    rw.disk_paths.insert("disk1".into(), "/dst/one,new.img".into());
    rw.disk_paths.insert("disk2".into(), "/dst/two.img".into());
    let out = rw.apply(&QemuCmdline::parse(&argv).expect("parse")).expect("rewrite");
    let drive = opts_of(&out.argv, "drive")[0];
    assert!(drive.ends_with("file=/dst/data.img") && !drive.contains("/var/lib"), "{drive}");
    let blockdevs = opts_of(&out.argv, "blockdev");
    assert_eq!(blockdevs[0], "driver=raw,node-name=disk1,file.driver=file,file.filename=/dst/one,,new.img");
    let json: serde_json::Value = serde_json::from_str(blockdevs[1]).expect("json");
    assert_eq!(json["file"]["filename"], "/dst/two.img");
}

#[test]
fn refused_and_unmigratable_options() {
    let table: [(&[&str], &str); 5] = [
        (&["-plugin", "file=/tmp/evil.so"], "-plugin"),
        (&["-readconfig", "/etc/shadow"], "-readconfig"),
        (&["-add-fd", "fd=3,set=1"], "-add-fd"),
        (&["-netdev", "bridge,id=n,br=br0"], "bridge"),
        (&["-netdev", "socket,id=n,fd=9"], "inherited fd"),
    ];
    for (extra, want) in table {
        let mut argv = vec!["qemu".to_string()];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let err =
            rewrite().apply(&QemuCmdline::parse(&argv).expect("parse")).expect_err("refused").to_string();
        assert!(err.contains(want), "{extra:?}: {err}");
    }
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
        "stdio",
        "-chardev",
        "socket,id=con,fd=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = rewrite().apply(&QemuCmdline::parse(&argv).expect("parse")).expect("rewrite");
    assert!(!out.argv.iter().any(|a| a.contains("mon0") || a == "-monitor" || a == "-mon"), "{:?}", out.argv);
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
