#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine (as root): build katamaran, bring up the two-node
# lab, boot a real VM in a Kata-shaped sandbox on node-a, and migrate it to node-b with
# katamaran while a UDP probe sends 1000 packets/s at it. Prints the probe's verdict and the
# migration's result table, then tears the lab down (also on failure or Ctrl-C).
#
#   hack/demo.sh [--local-storage|--shared-storage] [--rate PPS] [--keep]
#
#   --shared-storage  disks on storage both nodes see (default)
#   --local-storage   two node-local disks, mirrored over NBD before the RAM phase
#   --rate PPS        probe rate (default 1000)
#   --keep            leave the lab up afterwards (hack/lab.sh down removes it)
set -euo pipefail
cd "$(dirname "$0")/.."

storage=shared rate=1000 keep=0
while (($#)); do
    case "$1" in
        --shared-storage) storage=shared ;;
        --local-storage) storage=local ;;
        --rate) rate=${2:?--rate needs a value}; shift ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $rate =~ ^[0-9]+$ && $rate -gt 0 ]] || { echo "demo: --rate must be a positive integer" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "demo: needs root (network namespaces, taps, QEMU)" >&2; exit 2; }

export KMR_LAB_ROOT=${KMR_LAB_ROOT:-/run/katamaran-demo} KMR_LAB_PREFIX=${KMR_LAB_PREFIX:-kmr-demo-}
step() { printf '\n==> %s\n' "$*" >&2; }

step "installing build and lab dependencies"
KMR_NO_FUZZ=1 hack/deps.sh
step "building katamaran (release)"
cargo build --release --locked -p katamaran-shim-ext -p katamaran-probe --bins
export KMR_PROBE=$PWD/target/release/katamaran-probe
bin=$PWD/target/release
step "building the guest image (cached)"
hack/guest/build.sh

work=$(mktemp -d /tmp/katamaran-demo.XXXXXX)
agents=()
cleanup() {
    local rc=$?
    for p in "${agents[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${agents[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    if ((keep == 0)); then hack/lab.sh down >/dev/null 2>&1 || hack/lab.sh down || true; fi
    ((rc == 0)) || echo "demo: failed (exit $rc); logs in $work" >&2
    exit "$rc"
}
trap cleanup EXIT INT TERM

step "two-node lab: client, router, node-a, node-b"
hack/lab.sh down >/dev/null 2>&1 || true
hack/lab.sh up
hack/lab.sh sandbox node-a web-0 --ip 10.244.1.10 --ip6 fd00:244::10
if [[ $storage == local ]]; then disks=local:2; mode=(); else disks=shared:1; mode=(--shared-storage); fi
hack/lab.sh vm node-a web-0 --mem 128 --disks "$disks"

step "node agents (one per node, in the node's namespace)"
for n in a b; do
    addr4=10.201.0.1$([[ $n == a ]] && echo 1 || echo 2)
    addr6=fd00:201::1$([[ $n == a ]] && echo 1 || echo 2)
    ip netns exec "${KMR_LAB_PREFIX}node-$n" env KATAMARAN_LOG=info \
        KATAMARAN_ALLOWED_ROOTS="${KMR_GUEST_DIR:-$PWD/hack/guest/out}:$KMR_LAB_ROOT/shared" "$bin/katamaran-agent" node \
        --root "$KMR_LAB_ROOT/node-$n" --node-address "$addr4,$addr6" --node-interface eth0 \
        --host-proc /proc/$$ >"$work/agent-$n.log" 2>&1 &
    agents+=($!)
done
for n in a b; do
    for _ in $(seq 100); do [[ -S $KMR_LAB_ROOT/node-$n/run/katamaran/agent.sock ]] && break; sleep 0.05; done
done

step "probe: UDP echo at $rate packets/s from the client namespace"
hack/lab.sh probe --target 10.244.1.10:7 --rate "$rate" --wait-ready 20s \
    --stop-file "$work/stop" --json "$work/probe.json" >"$work/probe.log" 2>&1 &
probe=$!
sleep 2

step "katamaran: migrating web-0 from node-a to node-b ($storage storage)"
rc=0
"$bin/katactl" -r "unix://$KMR_LAB_ROOT/node-a/run/katamaran/agent.sock" migrate web-0 \
    --to "unix://$KMR_LAB_ROOT/node-b/run/katamaran/agent.sock" "${mode[@]}" || rc=$?
sleep 2
touch "$work/stop"
wait "$probe" || true

step "the guest after the move (HTTP from the client)"
hack/lab.sh exec client wget -q -T 3 -O - http://10.244.1.10/ || echo "(no HTTP answer)"
echo
step "probe verdict"
cat "$work/probe.log"
lost=$(jq -r .lost "$work/probe.json" 2>/dev/null || true)
echo
if ((rc == 0)) && [[ ${lost:-x} == 0 ]]; then
    echo "demo: VM migrated with 0 lost packets"
else
    echo "demo: migration exit code $rc, lost packets: ${lost:-unknown}" >&2
    exit 1
fi
