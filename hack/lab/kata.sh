# shellcheck shell=bash
# Writers of the files Kata and containerd leave on a node, in the shapes katamaran reads:
#   <node>/run/containerd/io.containerd.runtime.v2.task/k8s.io/<id>/config.json  (OCI bundle)
#   <node>/run/vc/sbs/<id>/persist.json                                          (Kata state)
# Values are validated before they get here (ids, addresses, MACs), so no JSON escaping is needed.

# The OCI runtime spec containerd hands the shim for a pod sandbox. katamaran reads the network
# namespace path and the CRI annotations from it.
write_bundle() {
    local node=$1 id=$2 netns=$3 dir
    dir=$(bundle_dir "$node" "$id")
    mkdir -p "$dir/rootfs"
    cat >"$dir/config.json.tmp" <<JSON
{
  "ociVersion": "1.1.0",
  "process": {
    "terminal": false,
    "user": { "uid": 65535, "gid": 65535 },
    "args": [ "/pause" ],
    "env": [ "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" ],
    "cwd": "/"
  },
  "root": { "path": "rootfs", "readonly": true },
  "hostname": "$id",
  "annotations": {
    "io.kubernetes.cri.container-type": "sandbox",
    "io.kubernetes.cri.sandbox-id": "$id",
    "io.kubernetes.cri.sandbox-name": "$id",
    "io.kubernetes.cri.sandbox-namespace": "default",
    "io.kubernetes.cri.sandbox-uid": "$(id_uuid "pod:$id")",
    "io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/default_${id}_$(id_uuid "pod:$id")",
    "io.katacontainers.pkg.oci.container_type": "pod_sandbox",
    "katamaran.lab/node": "$node"
  },
  "linux": {
    "namespaces": [
      { "type": "pid" },
      { "type": "ipc" },
      { "type": "uts" },
      { "type": "mount" },
      { "type": "network", "path": "/run/netns/$netns" }
    ],
    "cgroupsPath": "kubepods-besteffort-pod$(id_hash "pod:$id" | cut -c1-12).slice:cri-containerd:$id"
  }
}
JSON
    mv "$dir/config.json.tmp" "$dir/config.json"
}

# A subset of Kata's persist.json (Go field names of persistapi.SandboxState). The interworking
# model 2 is Kata's NetXConnectTCFilterModel.
write_persist() {
    local node=$1 id=$2 pid=$3 state=$4 dir
    dir=$(sbs_dir "$node" "$id")
    mkdir -p "$dir"
    load_sandbox "$node" "$id"
    cat >"$dir/persist.json.tmp" <<JSON
{
  "PersistVersion": 2,
  "State": { "State": "$state" },
  "SandboxContainer": "$id",
  "HypervisorState": {
    "Pid": $pid,
    "UUID": "$(id_uuid "$id")",
    "Type": "qemu"
  },
  "Network": {
    "NetworkID": "/run/netns/$SB_NETNS",
    "NetworkCreated": false,
    "Endpoints": [
      {
        "Type": "virtual",
        "Veth": {
          "NetPair": {
            "TapInterface": { "Name": "br0_kata", "TAPIface": { "Name": "tap0_kata", "HardAddr": "$SB_MAC" } },
            "VirtIface": { "Name": "eth0", "HardAddr": "$SB_MAC" },
            "NetInterworkingModel": 2
          }
        }
      }
    ]
  }
}
JSON
    mv "$dir/persist.json.tmp" "$dir/persist.json"
}
