//! The node agent deployed in a pod that is not hostNetwork: with `--host-netns` its node work
//! happens in the host's namespace, not in the one the process runs in.
//!
//! The privileged test makes two namespaces: "host" (an address on a veth, standing for the
//! node) and "pod" (where the engine runs, standing for the agent's pod). Without root it
//! skips (tier `netns`). The flag's validation runs unprivileged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;

use katamaran::host::netns::connect_from;
use katamaran::net::{create_netns, remove_netns, IpPrefix, NetOps, NetnsHandle, RouteSpec, VethSpec};
use katamaran::node::{Node, NodeConfig};
use katamaran::sandbox::NodeLayout;
use katamaran_test_skip::{skip, Tier};

/// A namespace made for one test; removed on drop.
struct Ns {
    path: PathBuf,
}

impl Ns {
    fn new(tag: &str) -> Self {
        let path = PathBuf::from(format!("/run/netns/kt-hostns-{}-{tag}", std::process::id()));
        create_netns(&path).unwrap();
        Self { path }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = remove_netns(&self.path) {
            eprintln!("cleanup of {}: {e}", self.path.display());
        }
    }
}

const HOST_ADDR: &str = "10.203.0.1";
const VM_PREFIX: &str = "10.203.9.5/32";

#[test]
fn node_work_happens_in_the_host_namespace_not_the_process_one() {
    if !nix::unistd::Uid::effective().is_root() {
        skip(Tier::Netns, "needs root");
        return;
    }
    let (host, pod) = (Ns::new("host"), Ns::new("pod"));
    let tmp = tempfile::tempdir().unwrap();

    // The engine runs on a thread that entered "pod", with its runtime there: every socket the
    // runtime itself creates lands in "pod", as in the agent's container.
    let pod_fd = std::fs::File::open(&pod.path).unwrap();
    let host_path = host.path.clone();
    let pod_path = pod.path.clone();
    let root = tmp.path().to_owned();
    std::thread::spawn(move || {
        nix::sched::setns(pod_fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let host_ns = NetnsHandle::open(&host_path).unwrap();
            let pod_ns = NetnsHandle::open(&pod_path).unwrap();
            // A host has its loopback up; local connections go through it.
            let lo = host_ns.link("lo").await.unwrap().id;
            host_ns.set_link_up(&lo, true).await.unwrap();
            let h0 = host_ns
                .create_veth(&VethSpec { name: "kt-h0".into(), peer: "kt-h1".into(), peer_netns: None })
                .await
                .unwrap();
            host_ns.set_link_up(&h0, true).await.unwrap();
            let h1 = host_ns.link("kt-h1").await.unwrap().id;
            host_ns.set_link_up(&h1, true).await.unwrap();
            host_ns.add_address(&h0, format!("{HOST_ADDR}/24").parse().unwrap()).await.unwrap();

            let mut cfg = NodeConfig::new(NodeLayout::under(&root));
            cfg.node_addresses = vec![HOST_ADDR.parse().unwrap()];
            cfg.host_netns = Some(host_path.clone());
            let node = Node::new(cfg).unwrap();
            assert_eq!(node.node_netns().path(), host_path);

            // The data listener is bound on the host's address, although this process's
            // namespace does not have it, and serves from this runtime.
            let listener = node.data_listener().await.unwrap();
            let addr = listener.local_addr();
            assert_eq!(addr.ip(), HOST_ADDR.parse::<IpAddr>().unwrap());
            assert_ne!(addr.port(), 0);
            let within = std::time::Duration::from_secs(5);
            tokio::time::timeout(within, connect_from(&host_ns, addr))
                .await
                .expect("connect within 5 s")
                .expect("the data listener answers in the host namespace");
            let from_pod =
                tokio::time::timeout(within, connect_from(&pod_ns, addr)).await.expect("fails at once");
            assert!(from_pod.is_err(), "the pod namespace has no such address: {from_pod:?}");

            // A route made through the node's NetOps appears in the host namespace only.
            let vm: IpPrefix = VM_PREFIX.parse().unwrap();
            node.node_netns().add_route(&RouteSpec::dev(vm, h0.clone())).await.unwrap();
            assert_eq!(host_ns.routes(vm).await.unwrap().len(), 1);
            assert!(pod_ns.routes(vm).await.unwrap().is_empty());
            node.node_netns().delete_route(&RouteSpec::dev(vm, h0)).await.unwrap();
        });
    })
    .join()
    .unwrap();
}

#[test]
fn without_the_flag_the_node_is_the_process_namespace() {
    let node = Node::new(NodeConfig::new(NodeLayout::under(&std::env::temp_dir()))).unwrap();
    assert_eq!(node.node_netns().path(), std::path::Path::new("/proc/self/ns/net"));
}

#[test]
fn bad_host_paths_are_usage_errors_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");
    for (flag, value) in [
        ("--host-netns", "/etc/hostname"),
        ("--host-netns", "/proc/self/ns/uts"),
        ("--host-netns", "/nonexistent/ns/net"),
        ("--host-proc", "/nonexistent"),
        ("--state-dir", "relative/dir"),
        ("--kubeconfig", "/nonexistent/kubeconfig"),
        // Events required, and no API at hand (no kubeconfig, not in a pod).
        ("--kube-events", "on"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_katamaran-agent"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args(["node", "--root"])
            .arg(tmp.path())
            .arg("--socket")
            .arg(&socket)
            .args([flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && err.contains(value), "{flag} {value}: {err}");
        assert!(!socket.exists(), "nothing served");
    }
}
