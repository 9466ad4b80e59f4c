# shellcheck shell=bash disable=SC2034 # constants are used by the scripts that source this
# Helpers shared by hack/lab.sh and hack/naive-migrate.sh. Sourced, never run.
#
# Everything the lab creates is named from two knobs so that several labs (a developer's and a
# test's) can live on one machine and `down` can find all of one lab's pieces:
#   KMR_LAB_PREFIX  network-namespace prefix (default "kmr-lab-"; must end in "-")
#   KMR_LAB_ROOT    directory holding every file (default /run/katamaran-lab)

KMR_LAB_ROOT=${KMR_LAB_ROOT:-/run/katamaran-lab}
KMR_LAB_PREFIX=${KMR_LAB_PREFIX:-kmr-lab-}
LAB_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KMR_GUEST_DIR=${KMR_GUEST_DIR:-$LAB_REPO/hack/guest/out}
KMR_QEMU=${KMR_QEMU:-qemu-system-x86_64}
LAB_PY=${KMR_PYTHON:-python3}
LAB_QMP="$LAB_REPO/hack/lab/qmp.py"

# The marker tells `down` that a directory really is a lab root before it deletes it.
LAB_MARKER=.katamaran-lab
LAB_META="$KMR_LAB_ROOT/.lab"

# Addresses of the fixed topology (see docs/LAB.md).
CLIENT_V4=10.200.0.2;   ROUTER_CLIENT_V4=10.200.0.1
CLIENT_V6=fd00:200::2;  ROUTER_CLIENT_V6=fd00:200::1
ROUTER_V4=10.201.0.1;   ROUTER_V6=fd00:201::1
NODE_A_V4=10.201.0.11;  NODE_A_V6=fd00:201::11
NODE_B_V4=10.201.0.12;  NODE_B_V6=fd00:201::12
# calico-style gateways the guest uses; nobody owns them, the node answers by proxy.
POD_GW_V4=169.254.1.1;  POD_GW_V6=fe80::1
# calico's MAC for every host-side pod veth, so that gateway is the same L2 peer on any node.
NODE_VETH_MAC=ee:ee:ee:ee:ee:ee

LAB_NODES=(node-a node-b)

log()  { printf 'lab: %s\n' "$*" >&2; }
die()  { printf 'lab: error: %s\n' "$*" >&2; exit 1; }
warn() { printf 'lab: warning: %s\n' "$*" >&2; }

# Monotonic-enough wall clock in seconds with microseconds (bash 5).
now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

require_cmds() {
    local c missing=()
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
    ((${#missing[@]} == 0)) || die "missing required commands: ${missing[*]}"
}

require_root() {
    [[ $(id -u) == 0 ]] || die "the lab needs root (network namespaces, veth, tap, tc); run as root"
}

validate_knobs() {
    [[ $KMR_LAB_PREFIX =~ ^[a-z][a-z0-9-]{0,22}-$ ]] ||
        die "KMR_LAB_PREFIX '$KMR_LAB_PREFIX' must match [a-z][a-z0-9-]*- (at most 24 chars)"
    [[ $KMR_LAB_ROOT == /* && $KMR_LAB_ROOT != / ]] ||
        die "KMR_LAB_ROOT '$KMR_LAB_ROOT' must be an absolute path other than /"
}

ns_name() { printf '%s%s' "$KMR_LAB_PREFIX" "$1"; }
sb_ns_name() { printf '%ssb-%s-%s' "$KMR_LAB_PREFIX" "$1" "$2"; }
ns_exists() { [[ -e /run/netns/$1 ]]; }

valid_node() {
    case $1 in node-a | node-b) return 0 ;; *) die "unknown node '$1' (expected node-a or node-b)" ;; esac
}
node_v4() { case $1 in node-a) echo "$NODE_A_V4" ;; node-b) echo "$NODE_B_V4" ;; esac; }
node_v6() { case $1 in node-a) echo "$NODE_A_V6" ;; node-b) echo "$NODE_B_V6" ;; esac; }

valid_id() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] ||
        die "sandbox id '$1' must be 1-64 chars of [A-Za-z0-9_.-] starting alphanumeric"
}
valid_v4() {
    [[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || die "'$1' is not an IPv4 address"
    local i
    for i in 1 2 3 4; do ((BASH_REMATCH[i] <= 255)) || die "'$1' is not an IPv4 address"; done
}
valid_v6() { [[ $1 =~ ^[0-9A-Fa-f:]+$ && $1 == *:* ]] || die "'$1' is not an IPv6 address"; }
valid_mac() { [[ $1 =~ ^[0-9a-f]{2}(:[0-9a-f]{2}){5}$ ]] || die "'$1' is not a lower-case MAC address"; }

# Stable per-id identifiers, so the same sandbox id gets the same MAC, UUID and veth name on both
# nodes: a migrated guest keeps its MAC and the destination sandbox must match it.
id_hash() { printf '%s' "$1" | md5sum | cut -c1-32; }
id_mac() { local h; h=$(id_hash "mac:$1"); printf '02:%s:%s:%s:%s:%s' "${h:0:2}" "${h:2:2}" "${h:4:2}" "${h:6:2}" "${h:8:2}"; }
id_uuid() { local h; h=$(id_hash "uuid:$1"); printf '%s-%s-4%s-8%s-%s' "${h:0:8}" "${h:8:4}" "${h:13:3}" "${h:17:3}" "${h:20:12}"; }
id_veth() { local h; h=$(id_hash "veth:$1"); printf 'kmr%s' "${h:0:8}"; }

# Kata-shaped paths of one sandbox on one node.
node_root() { printf '%s/%s' "$KMR_LAB_ROOT" "$1"; }
vm_dir() { printf '%s/run/vc/vm/%s' "$(node_root "$1")" "$2"; }
sbs_dir() { printf '%s/run/vc/sbs/%s' "$(node_root "$1")" "$2"; }
bundle_dir() { printf '%s/run/containerd/io.containerd.runtime.v2.task/k8s.io/%s' "$(node_root "$1")" "$2"; }
meta_file() { printf '%s/sandboxes/%s/%s.env' "$LAB_META" "$1" "$2"; }

# Runs `key=value` sysctl writes inside a namespace in one process. Writing /proc/sys directly
# keeps procps out of the lab's requirements.
ns_sysctl() {
    local ns=$1
    shift
    # shellcheck disable=SC2016 # expanded by the inner shell
    ip netns exec "$ns" sh -c '
        for kv in "$@"; do
            k=${kv%%=*}; v=${kv#*=}
            printf "%s" "$v" > "/proc/sys/$(printf "%s" "$k" | tr . /)" || exit 1
        done' sh "$@"
}

ensure_ns() {
    local ns=$1
    if ! ns_exists "$ns"; then
        ip netns add "$ns"
    fi
    ip -n "$ns" link set lo up
    # New links must be born without DAD (a tentative address delays the first packets by ~1 s)
    # and without rp_filter (asymmetric paths are normal during a migration).
    ns_sysctl "$ns" net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0 \
        net.ipv6.conf.default.accept_ra=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.rp_filter=0
}

link_exists() { ip -n "$1" link show dev "$2" >/dev/null 2>&1; }

# Loads a sandbox's metadata (IP, IP6, MAC, NETNS, VETH) into SB_* variables.
load_sandbox() {
    local node=$1 id=$2 f
    f=$(meta_file "$node" "$id")
    [[ -f $f ]] || die "no sandbox '$id' on $node (create it with: lab.sh sandbox $node $id --ip ADDR)"
    SB_IP="" SB_IP6="" SB_MAC="" SB_NETNS="" SB_VETH="" SB_DISKS="" SB_MEM=""
    # shellcheck disable=SC1090
    source "$f"
}

# A zombie counts as gone: a daemonized QEMU's parent is init, which may reap it late.
pid_alive() {
    [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null || return 1
    local state
    state=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

# The pid in a VM's pidfile when that process is alive and still a QEMU (pids get reused).
vm_pid() {
    local pidfile pid
    pidfile="$(vm_dir "$1" "$2")/pid"
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc 0-9 <"$pidfile")
    [[ -n $pid ]] && pid_alive "$pid" || return 1
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == *qemu-system* ]] || return 1
    printf '%s' "$pid"
}

# Deadline helpers on $EPOCHREALTIME (bash 5): `deadline SECS` prints an absolute time,
# `past DEADLINE` succeeds once it has passed.
deadline() { awk -v n="$(now)" -v g="$1" 'BEGIN { printf "%.6f", n + g }'; }
past() { awk -v n="$(now)" -v d="$1" 'BEGIN { exit !(n > d) }'; }

# Stops every given pid: TERM to all, KILL to those still alive after $grace seconds, then waits
# (bounded) until they are gone. Returns non-zero if any survived.
stop_pids() {
    local grace=$1 pid dl left
    shift
    (($# > 0)) || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    dl=$(deadline "$grace")
    while :; do
        left=0
        for pid in "$@"; do pid_alive "$pid" && left=1; done
        ((left)) || return 0
        past "$dl" && break
        sleep 0.05
    done
    for pid in "$@"; do pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
    dl=$(deadline 5)
    while :; do
        left=0
        for pid in "$@"; do pid_alive "$pid" && left=1; done
        ((left)) || return 0
        past "$dl" && return 1
        sleep 0.05
    done
}

# Pids of QEMUs that belong to this lab: their command line names a path under the lab root.
lab_qemu_pids() {
    # Builtins only: this walks every process, and a fork per process costs ~0.5 s.
    local p argv0 args
    for p in /proc/[0-9]*; do
        IFS= read -r -d "" argv0 2>/dev/null <"$p/cmdline" || continue
        [[ $argv0 == *qemu-system* ]] || continue
        mapfile -d "" args 2>/dev/null <"$p/cmdline" || continue
        [[ "${args[*]}" == *"$KMR_LAB_ROOT/"* ]] && printf '%s\n' "${p#/proc/}"
    done
    return 0
}

lab_netns_list() {
    local f
    for f in /run/netns/"$KMR_LAB_PREFIX"*; do
        [[ -e $f ]] && printf '%s\n' "${f#/run/netns/}"
    done
    return 0
}

# The probe binary: $KMR_PROBE, else the workspace's build output (built on demand).
probe_bin() {
    local target=${CARGO_TARGET_DIR:-$LAB_REPO/target} p
    if [[ -n ${KMR_PROBE:-} ]]; then
        [[ -x $KMR_PROBE ]] || die "KMR_PROBE=$KMR_PROBE is not executable"
        printf '%s' "$KMR_PROBE"
        return
    fi
    for p in "$target/release/katamaran-probe" "$target/debug/katamaran-probe"; do
        [[ -x $p ]] && { printf '%s' "$p"; return; }
    done
    log "building katamaran-probe (set KMR_PROBE to use another binary)"
    (cd "$LAB_REPO" && cargo build -q -p katamaran-probe) >&2 || die "could not build katamaran-probe"
    [[ -x $target/debug/katamaran-probe ]] || die "cargo built no $target/debug/katamaran-probe"
    printf '%s' "$target/debug/katamaran-probe"
}

qmp() { "$LAB_PY" "$LAB_QMP" "$@"; }
