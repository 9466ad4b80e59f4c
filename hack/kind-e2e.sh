#!/usr/bin/env bash
# kind end-to-end test of katamaran for CI machines whose kind nodes can run Kata VMs: creates a
# kind cluster (one control plane, two workers, Calico), installs Kata Containers with
# kata-deploy, builds and loads the katamaran images, applies deploy/, starts a Kata pod
# (runtimeClassName kata-katamaran) running a UDP echo and a probe pod sending 1000 datagrams/s
# at it, runs `kubectl migrate pod ... --to <the other worker>`, and fails unless the migration
# succeeded and the probe lost nothing. Logs are collected on failure; the cluster is deleted on
# exit (also on failure or Ctrl-C) unless --keep.
#
# Needs: docker (a running engine), kind, kubectl, helm, jq, cargo; /dev/kvm on the host, which
# kind's privileged node containers pass to Kata (on a cloud VM: nested virtualisation).
# NOT runnable on katamaran's build machine: it has no Docker engine and its /dev/kvm hangs; the
# lab tests (docs/LAB.md, kubectl-migrate/tests/lab_e2e.rs) cover the same flow there.
#
#   hack/kind-e2e.sh [--cluster NAME] [--rate PPS] [--keep] [--host-build] [--work DIR]
#
#   --cluster NAME  kind cluster name (default katamaran-e2e; an existing one is refused)
#   --rate PPS      probe rate, datagrams per second (default 1000)
#   --keep          leave the cluster up afterwards (kind delete cluster --name NAME removes it)
#   --host-build    build with the host's cargo instead of in a rust:bookworm container (the
#                   images are Debian 12: host binaries must not need a newer glibc)
#   --work DIR      where logs and reports go (default: a new directory under /tmp)
#
# Pinned versions (override through the environment): KATA_VERSION, CALICO_VERSION,
# KIND_NODE_IMAGE (empty: kind's default), RUST_BUILDER_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

KATA_VERSION=${KATA_VERSION:-3.27.0}
KATA_CHART=${KATA_CHART:-oci://ghcr.io/kata-containers/kata-deploy-charts/kata-deploy}
CALICO_VERSION=${CALICO_VERSION:-v3.29.3}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
RUST_BUILDER_IMAGE=${RUST_BUILDER_IMAGE:-rust:1-bookworm}
TOOLS_IMAGE=katamaran-e2e-tools:dev
E2E_NS=katamaran-e2e
POD=web-0
# Bounds of each wait (seconds); nested virtualisation is slow.
WAIT_INSTALL=${WAIT_INSTALL:-900}
WAIT_POD=${WAIT_POD:-600}

cluster=katamaran-e2e rate=1000 keep=0 host_build=0 work=
while (($#)); do
    case "$1" in
        --cluster) cluster=${2:?--cluster needs a name}; shift ;;
        --rate) rate=${2:?--rate needs a value}; shift ;;
        --keep) keep=1 ;;
        --host-build) host_build=1 ;;
        --work) work=${2:?--work needs a directory}; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "kind-e2e: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $rate =~ ^[0-9]+$ && $rate -gt 0 ]] || { echo "kind-e2e: --rate must be a positive integer" >&2; exit 2; }

step() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "kind-e2e: $*" >&2; exit 1; }

step "checking prerequisites"
for tool in docker kind kubectl helm jq cargo; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed (see --help)"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
[[ -c /dev/kvm ]] || die "/dev/kvm is missing: Kata needs KVM in the kind nodes (enable nested virtualisation)"
for nested in /sys/module/kvm_intel/parameters/nested /sys/module/kvm_amd/parameters/nested; do
    if [[ -r $nested ]] && ! grep -qiE '^(y|1)' "$nested"; then
        echo "kind-e2e: warning: $nested is $(cat "$nested"): Kata VMs inside kind may fail to start" >&2
    fi
done
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    die "a kind cluster named $cluster exists already; delete it or pass --cluster"
fi

work=${work:-$(mktemp -d /tmp/katamaran-kind-e2e.XXXXXX)}
mkdir -p "$work/bin"
export KUBECONFIG=$work/kubeconfig
export PATH=$work/bin:$PATH
created=0

collect_logs() {
    step "collecting logs into $work/logs"
    mkdir -p "$work/logs"
    kubectl get nodes -o wide --show-labels >"$work/logs/nodes.txt" 2>&1 || true
    kubectl get pods -A -o wide >"$work/logs/pods.txt" 2>&1 || true
    kubectl get events -A --sort-by=.lastTimestamp >"$work/logs/events.txt" 2>&1 || true
    kubectl -n "$E2E_NS" describe pods >"$work/logs/e2e-pods.txt" 2>&1 || true
    kubectl -n "$E2E_NS" exec probe -- cat /tmp/probe.log >"$work/logs/probe.log" 2>&1 || true
    kubectl -n katamaran-system logs -l app.kubernetes.io/name=katamaran-agent --all-containers \
        --prefix --tail=-1 >"$work/logs/katamaran-agents.log" 2>&1 || true
    kubectl -n kube-system logs -l name=kata-deploy --all-containers --prefix --tail=-1 \
        >"$work/logs/kata-deploy.log" 2>&1 || true
    kind export logs "$work/logs/kind" --name "$cluster" >/dev/null 2>&1 || true
    echo "kind-e2e: agent log tail:" >&2
    tail -n 40 "$work/logs/katamaran-agents.log" >&2 || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((rc != 0 && created)); then collect_logs; fi
    if ((created && !keep)); then
        step "deleting kind cluster $cluster"
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || echo "kind-e2e: could not delete cluster $cluster" >&2
    fi
    if ((rc == 0)); then
        echo "kind-e2e: passed; reports in $work" >&2
    else
        echo "kind-e2e: FAILED (exit $rc); logs and reports in $work" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for WHAT SECONDS CMD...: runs CMD until it succeeds or the deadline passes.
wait_for() {
    local what=$1 limit=$2 start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - start < limit)) || die "timed out after ${limit}s waiting for $what"
        sleep 2
    done
}

step "building katamaran (release)"
packages=(-p katamaran-shim-ext -p katamaran-probe -p katamaran-guest-agent)
if ((host_build)); then
    cargo build --release --locked "${packages[@]}"
    bins=$repo/target/release
else
    # Built where the images' glibc comes from, so the binaries run in them whatever the host is.
    docker run --rm --user "$(id -u):$(id -g)" -v "$repo:/src" -w /src \
        -e CARGO_HOME=/src/target/kind-e2e/cargo-home -e CARGO_TARGET_DIR=/src/target/kind-e2e \
        "$RUST_BUILDER_IMAGE" cargo build --release --locked "${packages[@]}"
    bins=$repo/target/kind-e2e/release
fi
# The plugin runs here, on the host.
cargo build --release --locked -p kubectl-migrate
install -m 0755 "$repo/target/release/kubectl-migrate" "$work/bin/kubectl-migrate"

step "building images"
# The katamaran node image: deploy/'s own Dockerfile over a context holding deploy/ and the
# binaries where that Dockerfile expects them (target/release/).
image=${KATAMARAN_IMAGE:-$(awk '$1 == "image:" || $2 == "image:" { print $NF; exit }' deploy/daemonset.yaml)}
[[ -n $image ]] || die "no image: line in deploy/daemonset.yaml (set KATAMARAN_IMAGE)"
dockerfile=${KATAMARAN_DOCKERFILE:-$(find deploy -name Dockerfile -print -quit)}
[[ -n $dockerfile ]] || die "no Dockerfile under deploy/ (set KATAMARAN_DOCKERFILE)"
ctx=$work/image-context
mkdir -p "$ctx/target/release"
cp -r deploy "$ctx/"
cp "$bins"/katamaran-agent "$bins"/containerd-shim-katamaran-v2 "$bins"/katactl "$ctx/target/release/"
docker build -q -f "$ctx/$dockerfile" -t "$image" "$ctx" >/dev/null
# The test workload and probe: the lab's guest tool (udp-echo) and the probe.
mkdir -p "$work/tools"
cp "$bins"/katamaran-probe "$bins"/katamaran-guest "$work/tools/"
cat >"$work/tools/Dockerfile" <<'EOF'
FROM debian:12-slim
COPY katamaran-probe katamaran-guest /usr/local/bin/
EOF
docker build -q -t "$TOOLS_IMAGE" "$work/tools" >/dev/null

step "creating kind cluster $cluster (1 control plane, 2 workers)"
cat >"$work/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  # Calico instead of kindnet: katamaran plumbs incoming sandboxes calico-style (docs/ENGINE.md).
  disableDefaultCNI: true
  podSubnet: 192.168.0.0/16
nodes:
  - role: control-plane
  - role: worker
    extraMounts: [{hostPath: /dev/kvm, containerPath: /dev/kvm}]
  - role: worker
    extraMounts: [{hostPath: /dev/kvm, containerPath: /dev/kvm}]
# No containerd patch: the DaemonSet's installer adds the kata-katamaran runtime to each node's
# config.toml itself (deploy/node/install.sh).
EOF
node_image=()
[[ -z $KIND_NODE_IMAGE ]] || node_image=(--image "$KIND_NODE_IMAGE")
created=1
kind create cluster --name "$cluster" --config "$work/kind.yaml" --kubeconfig "$KUBECONFIG" \
    "${node_image[@]}" --wait 0s
mapfile -t workers < <(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
((${#workers[@]} == 2)) || die "expected 2 workers, found: ${workers[*]}"
src=${workers[0]} dst=${workers[1]}

step "installing Calico $CALICO_VERSION"
kubectl apply -f "https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/calico.yaml" >/dev/null
kubectl wait --for=condition=Ready nodes --all --timeout="${WAIT_INSTALL}s"

step "installing Kata Containers $KATA_VERSION (kata-deploy)"
helm install kata-deploy "$KATA_CHART" --version "$KATA_VERSION" --namespace kube-system \
    --wait --timeout "${WAIT_INSTALL}s" >/dev/null
# kata-deploy labels a node once Kata is installed and containerd restarted there.
for w in "${workers[@]}"; do
    kubectl wait --for=jsonpath='{.metadata.labels.katacontainers\.io/kata-runtime}'=true \
        "node/$w" --timeout="${WAIT_INSTALL}s"
done

step "loading images and applying deploy/"
kind load docker-image --name "$cluster" "$image" "$TOOLS_IMAGE"
kubectl label node "$src" katamaran.io/e2e=source --overwrite
kubectl label node "$dst" katamaran.io/e2e=destination --overwrite
# The agents' CA (docs/INSTALL.md step 2): the DaemonSet's pods mount it and start only with it.
kubectl apply -f deploy/namespace.yaml
"$bins"/katamaran-agent ca init | kubectl apply -f -
kubectl apply -k deploy/
kubectl -n katamaran-system rollout status daemonset/katamaran-agent --timeout="${WAIT_INSTALL}s"
for w in "${workers[@]}"; do
    wait_for "the kata-katamaran runtime in containerd on $w" 120 \
        bash -c "docker exec '$w' containerd config dump | grep -q 'runtimes.kata-katamaran'"
done

step "workload: $POD (Kata, UDP echo) on $src; probe on the control plane"
kubectl create namespace "$E2E_NS"
kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $POD
  namespace: $E2E_NS
spec:
  runtimeClassName: kata-katamaran
  nodeSelector: {katamaran.io/e2e: source}
  containers:
    - name: echo
      image: $TOOLS_IMAGE
      imagePullPolicy: Never
      command: [/usr/local/bin/katamaran-guest, udp-echo, --port, "7"]
---
apiVersion: v1
kind: Pod
metadata:
  name: probe
  namespace: $E2E_NS
spec:
  # Off both workers, so its datagrams cross the cluster network before and after the move.
  nodeSelector: {node-role.kubernetes.io/control-plane: ""}
  tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
  containers:
    - name: probe
      image: $TOOLS_IMAGE
      imagePullPolicy: Never
      command: [sleep, infinity]
EOF
kubectl -n "$E2E_NS" wait --for=condition=Ready "pod/$POD" pod/probe --timeout="${WAIT_POD}s"
pod_ip=$(kubectl -n "$E2E_NS" get pod "$POD" -o jsonpath='{.status.podIP}')
[[ -n $pod_ip ]] || die "pod $POD has no IP"
pexec() { kubectl -n "$E2E_NS" exec probe -- "$@"; }
# The echo answers before anything is measured.
pexec katamaran-probe --target "$pod_ip:7" --rate 100 --count 100 --wait-ready 120s --fail-on-loss

step "probe: $rate datagrams/s at $pod_ip:7 from the control plane"
pexec sh -c "rm -f /tmp/stop /tmp/probe.json; nohup katamaran-probe --target '$pod_ip:7' --rate $rate \
    --duration 1h --wait-ready 60s --stop-file /tmp/stop --json /tmp/probe.json </dev/null >/tmp/probe.log 2>&1 &"
# Traffic before the move: part of the measurement, not a synchronisation.
sleep 5

step "kubectl migrate pod $POD -n $E2E_NS --to $dst"
rc=0
kubectl migrate pod "$POD" -n "$E2E_NS" --to "$dst" -o json --timeout 15m >"$work/migrate.json" || rc=$?
# Traffic after the move: the VM must go on answering from the destination.
sleep 5
pexec touch /tmp/stop
wait_for "the probe's report" 60 kubectl -n "$E2E_NS" exec probe -- test -s /tmp/probe.json
pexec cat /tmp/probe.json >"$work/probe.json"

step "result"
jq -r '"migration \(.migrationId): \(.result); QEMU downtime \(.downtimeMs) ms, STOP→route swap \(.stopToRouteSwapNs) ns, RESUME→plug release \(.resumeToPlugReleaseNs) ns, plug drops \(.plugDroppedPackets), total \(.totalMs) ms"' \
    "$work/migrate.json" || cat "$work/migrate.json"
jq -r '"probe: sent \(.sent) received \(.received) lost \(.lost) duplicated \(.duplicated) reordered \(.reordered) longest gap \(.longest_gap_ms) ms"' \
    "$work/probe.json"
((rc == 0)) || die "kubectl migrate exited $rc"
[[ $(jq -r .result "$work/migrate.json") == succeeded ]] || die "the migration did not succeed"
[[ $(jq -r .destination.node "$work/migrate.json") == "$dst" ]] || die "the VM did not move to $dst"
sent=$(jq -r .sent "$work/probe.json") lost=$(jq -r .lost "$work/probe.json")
dup=$(jq -r .duplicated "$work/probe.json")
((sent >= rate * 5)) || die "the probe sent only $sent datagrams"
((lost == 0 && dup == 0)) || die "the probe lost $lost and duplicated $dup datagrams"
echo "kind-e2e: $POD moved from $src to $dst with 0 of $sent datagrams lost" >&2
