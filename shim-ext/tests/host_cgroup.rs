//! A VM's cgroup on the real cgroupfs: the child is moved before exec into a fresh cgroup in
//! every hierarchy, and nothing is left once it is gone.
//!
//! Needs root and a mounted cgroupfs (a skip of tier `cgroup` otherwise). Runs as well on cgroup v1
//! (this machine: hybrid, no systemd) as on v2; `sleep` stands for QEMU.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use katamaran::host::cgroup::{self, HierarchyKind};
use katamaran::host::placement::{self, Placement, PlacementConfig, Policy};
use katamaran_test_skip::{skip, Tier};

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root".into());
    }
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    if cgroup::parse_mountinfo(&mi).is_empty() {
        return Some("no cgroup hierarchy under /sys/fs/cgroup".into());
    }
    None
}

/// Kills and reaps the child even when an assertion fails.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cfg: PlacementConfig, tag: &str) {
    let hierarchies = cgroup::parse_mountinfo(&std::fs::read_to_string(&cfg.mountinfo).unwrap());
    let name = format!("kmr-test-{}-{tag}", std::process::id());
    let own_cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();

    let placement = Placement::create(&cfg, &name).expect("create the VM cgroup");
    assert_eq!(placement.leaves().len(), hierarchies.len(), "one directory per hierarchy");
    assert_eq!(placement::leaves_of(&cfg, &name).unwrap(), placement.leaves(), "found again from the name");
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    placement.apply(&mut cmd);
    let child = Reaped(cmd.spawn().expect("spawn into the cgroup"));
    let pid = child.0.id();

    // /proc/<pid>/cgroup names the new cgroup in every hierarchy (memory in particular), not
    // the test's own.
    let rel = cfg.parent.join(&name);
    let seen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for h in &hierarchies {
        let ctrl = match &h.kind {
            HierarchyKind::Unified => String::new(),
            HierarchyKind::V1 { controllers } => controllers[0].clone(),
        };
        assert!(
            cgroup::proc_cgroup_is(&seen, &ctrl, &rel),
            "{ctrl:?} hierarchy: {seen}\n(test's own: {own_cgroups})"
        );
    }
    if hierarchies.iter().any(|h| h.has("memory")) {
        assert!(cgroup::proc_cgroup_is(&seen, "memory", &rel), "{seen}");
        let limit = placement.leaves().iter().find(|l| l.starts_with(cfg.root.join("memory"))).unwrap();
        let got = std::fs::read_to_string(limit.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(got.trim(), (256u64 << 20).to_string());
    }
    // A second VM of the same name is refused while this one lives.
    assert!(Placement::create(&cfg, &name).is_err());
    // And its cgroup cannot be removed while the process is inside.
    assert!(placement.remove().is_err(), "rmdir of a populated cgroup fails");

    drop(child);
    placement.remove().expect("remove after the exit");
    for l in placement.leaves() {
        assert!(!l.exists(), "{} left behind", l.display());
    }
    // The shared parent is the test's own here: nothing else may be in it.
    for h in &hierarchies {
        let parent = cfg.root.join(&h.rel).join(&cfg.parent);
        std::fs::remove_dir(&parent).unwrap_or_else(|e| panic!("{} not empty: {e}", parent.display()));
    }
}

fn config(parent: &str) -> PlacementConfig {
    PlacementConfig {
        parent: PathBuf::from(format!("{parent}-{}", std::process::id())),
        memory_max: Some(256 << 20),
        policy: Policy::Required,
        ..PlacementConfig::default()
    }
}

#[test]
fn sleep_runs_in_a_fresh_cgroup_and_nothing_is_left() {
    if let Some(why) = skip_reason() {
        skip(Tier::Cgroup, why);
        return;
    }
    run(config("katamaran-test"), "own");
}

#[test]
fn through_a_host_process_view_and_its_cgroup_namespace() {
    if let Some(why) = skip_reason() {
        skip(Tier::Cgroup, why);
        return;
    }
    // As the agent does from a pod with `--host-proc /proc/1`; our own process stands for the
    // host's init here: its root, its mountinfo, its cgroup namespace (entered by the child).
    let cfg = PlacementConfig { ..PlacementConfig::host_of(Path::new("/proc/self")) };
    let cfg =
        PlacementConfig { parent: config("katamaran-test-ns").parent, memory_max: Some(256 << 20), ..cfg };
    assert_eq!(cfg.cgroupns.as_deref(), Some(Path::new("/proc/self/ns/cgroup")));
    run(cfg, "ns");
}

#[test]
fn a_vm_moved_out_survives_a_kill_of_everything_in_the_agents_cgroup() {
    if let Some(why) = skip_reason() {
        skip(Tier::Cgroup, why);
        return;
    }
    let cfg = config("katamaran-test-kill");
    let hierarchies = cgroup::parse_mountinfo(&std::fs::read_to_string(&cfg.mountinfo).unwrap());
    let pid = std::process::id();
    let container = Placement::create(&cfg, &format!("agent-{pid}")).unwrap();
    let vm_cgroup = Placement::create(&cfg, &format!("kmr-{pid}")).unwrap();

    // The agent: a process in its container's cgroup.
    let mut a = Command::new("sleep");
    a.arg("30");
    container.apply(&mut a);
    let mut agent = Reaped(a.spawn().unwrap());
    // The VM: born in the agent's cgroup, as the agent's child is, and moved out before exec.
    let mut v = Command::new("sleep");
    v.arg("30");
    container.apply(&mut v);
    vm_cgroup.apply(&mut v);
    let mut vm = Reaped(v.spawn().unwrap());

    // What containerd's runc shim does when a hostPID container's init exits: SIGKILL every
    // process in the container's cgroup (runc lists them through one v1 hierarchy or v2).
    let mut killed = Vec::new();
    for leaf in container.leaves() {
        for line in std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap().lines() {
            let p: i32 = line.trim().parse().unwrap();
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            killed.push(p.unsigned_abs());
        }
    }
    assert!(killed.contains(&agent.0.id()), "the agent is in its container's cgroup: {killed:?}");
    assert!(!killed.contains(&vm.0.id()), "the VM is not: {killed:?}");
    let status = agent.0.wait().unwrap();
    assert!(!status.success(), "the agent was killed: {status}");
    assert!(vm.0.try_wait().unwrap().is_none(), "the VM still runs");

    drop(vm);
    drop(agent);
    vm_cgroup.remove().unwrap();
    container.remove().unwrap();
    for h in &hierarchies {
        std::fs::remove_dir(cfg.root.join(&h.rel).join(&cfg.parent)).unwrap();
    }
}
