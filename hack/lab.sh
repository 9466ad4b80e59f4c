#!/usr/bin/env bash
# The two-node lab: network namespaces for a client, a router and two Kubernetes-like nodes, with
# Kata-shaped sandboxes (netns + veth + tap + tc mirred filters) running real QEMU (TCG) guests.
# See docs/LAB.md for the topology, the paths and how each piece mirrors Kata.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lab/lib.sh
source "$HERE/lab/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lab/kata.sh
source "$HERE/lab/kata.sh"

usage() {
    cat <<'USAGE'
usage: hack/lab.sh COMMAND [ARGS...]

Lab lifecycle
  up                      create the client, router, node-a and node-b namespaces (idempotent)
  down                    kill every process the lab started, delete its namespaces and files,
                          then verify; exits non-zero listing anything left behind
  status                  namespaces, sandboxes, VMs (pid, alive) and the router's pod routes

Sandboxes and VMs
  sandbox NODE ID --ip A [--ip6 A6] [--mac M]
                          a Kata-shaped pod sandbox on NODE: netns, eth0 (veth) with the pod
                          IP/MAC, tap0_kata, tc mirred filters both ways, node routes + proxy
                          ARP/NDP, OCI bundle. The router learns the pod IP only if no node
                          advertises it yet (first placement).
  vm NODE ID [--mem MIB] [--disks none|shared:N|local:N] [--disk-size SIZE]
             [--writer-rate N] [--incoming] [--node-paths] [--timeout SECS]
                          start QEMU for the sandbox the way Kata does and wait for
                          KATAMARAN-GUEST-READY on the serial console (unless --incoming, which
                          starts a destination with `-incoming defer` and returns at once);
                          --node-paths: QEMU names its files /run/vc/vm/ID, as on a real node,
                          with the node's run/vc mounted there in a mount namespace of its own
  kill-vm NODE ID         stop the sandbox's QEMU (TERM, then KILL)
  rm NODE ID              kill-vm, then delete the sandbox (netns, routes, files, local disks)
  converge ID NODE        the CNI converges: the router's routes for the pod move to NODE

Using the lab
  exec TARGET CMD...      run CMD in client | router | node-a | node-b | NODE/ID (a sandbox)
  probe ARGS...           run katamaran-probe in the client namespace (e.g. --target IP:7)
  qmp NODE ID [--extra] COMMAND [JSON-ARGS]
                          one QMP command on qmp.sock (or Kata's extra-monitor.sock)
  paths NODE ID           KEY=VALUE lines: netns, addresses, Kata paths, disk images

Environment
  KMR_LAB_ROOT     every file of the lab lives here          (default /run/katamaran-lab)
  KMR_LAB_PREFIX   prefix of every network namespace          (default kmr-lab-)
  KMR_GUEST_DIR    vmlinuz + initramfs.img                    (default hack/guest/out)
  KMR_QEMU         QEMU binary                                (default qemu-system-x86_64)
  KMR_PROBE        katamaran-probe binary                     (default: workspace target dir)
USAGE
}

bad_usage() {
    printf 'usage: hack/lab.sh %s\n' "$1" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# up

cmd_up() {
    [[ ${1:-} != -h && ${1:-} != --help ]] || { usage; return; }
    require_root
    require_cmds ip tc md5sum awk
    local t0 c r ns node
    t0=$(now)
    if [[ -d $KMR_LAB_ROOT && ! -e $KMR_LAB_ROOT/$LAB_MARKER ]] &&
        [[ -n $(ls -A "$KMR_LAB_ROOT") ]]; then
        die "$KMR_LAB_ROOT exists, is not empty and is not a lab root; choose another KMR_LAB_ROOT"
    fi
    mkdir -p "$KMR_LAB_ROOT"
    # The marker goes first so that `down` after an interrupted `up` may delete the root.
    printf 'prefix=%s\n' "$KMR_LAB_PREFIX" >"$KMR_LAB_ROOT/$LAB_MARKER"
    mkdir -p "$LAB_META/sandboxes" "$KMR_LAB_ROOT/shared" \
        "$KMR_LAB_ROOT/node-a/disks" "$KMR_LAB_ROOT/node-b/disks"

    c=$(ns_name client)
    r=$(ns_name router)
    for ns in "$c" "$r" "$(ns_name node-a)" "$(ns_name node-b)"; do ensure_ns "$ns"; done

    # The router forwards between the client subnet and the cluster L2 and must not teach nodes
    # shortcuts with ICMP redirects: the pod routes on the router are the thing under test.
    ns_sysctl "$r" net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
        net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.default.send_redirects=0
    link_exists "$r" br0 || ip -n "$r" link add br0 type bridge mcast_snooping 0
    ip -n "$r" link set br0 up
    ip -n "$r" addr replace "$ROUTER_V4/24" dev br0
    ip -n "$r" -6 addr replace "$ROUTER_V6/64" dev br0 nodad

    link_exists "$r" to-client || ip -n "$r" link add to-client type veth peer name eth0 netns "$c"
    ip -n "$r" link set to-client up
    ip -n "$r" addr replace "$ROUTER_CLIENT_V4/24" dev to-client
    ip -n "$r" -6 addr replace "$ROUTER_CLIENT_V6/64" dev to-client nodad
    ip -n "$c" link set eth0 up
    ip -n "$c" addr replace "$CLIENT_V4/24" dev eth0
    ip -n "$c" -6 addr replace "$CLIENT_V6/64" dev eth0 nodad
    ip -n "$c" route replace default via "$ROUTER_CLIENT_V4"
    ip -n "$c" -6 route replace default via "$ROUTER_CLIENT_V6"

    for node in "${LAB_NODES[@]}"; do
        ns=$(ns_name "$node")
        ns_sysctl "$ns" net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
            net.ipv4.conf.all.accept_redirects=0 net.ipv4.conf.default.accept_redirects=0 \
            net.ipv6.conf.all.accept_redirects=0 net.ipv6.conf.default.accept_redirects=0
        link_exists "$r" "to-$node" || ip -n "$r" link add "to-$node" type veth peer name eth0 netns "$ns"
        ip -n "$r" link set "to-$node" master br0 up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" addr replace "$(node_v4 "$node")/24" dev eth0
        ip -n "$ns" -6 addr replace "$(node_v6 "$node")/64" dev eth0 nodad
        ip -n "$ns" route replace default via "$ROUTER_V4"
        ip -n "$ns" -6 route replace default via "$ROUTER_V6"
    done
    log "up in $(elapsed "$t0")s (root $KMR_LAB_ROOT, namespaces ${KMR_LAB_PREFIX}*)"
}

# ---------------------------------------------------------------------------------------------
# down

cmd_down() {
    [[ ${1:-} != -h && ${1:-} != --help ]] || { usage; return; }
    require_root
    validate_knobs
    local t0 f pid ns pids=() leftovers=()
    t0=$(now)

    # QEMUs first (pidfiles, then any QEMU whose command line names our root: one killed before
    # it wrote its pidfile), then whatever else still runs inside the lab's namespaces.
    for f in "$KMR_LAB_ROOT"/node-*/run/vc/vm/*/pid; do
        [[ -s $f ]] || continue
        pid=$(tr -dc 0-9 <"$f")
        [[ -n $pid ]] && [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == *qemu-system* ]] && pids+=("$pid")
    done
    while read -r pid; do [[ -n $pid ]] && pids+=("$pid"); done < <(lab_qemu_pids)
    while read -r ns; do
        [[ -n $ns ]] || continue
        while read -r pid; do
            # Never the caller itself, should someone run `down` from inside the lab.
            [[ -n $pid && $pid != "$$" && $pid != "$PPID" ]] && pids+=("$pid")
        done < <(ip netns pids "$ns" 2>/dev/null || true)
    done < <(lab_netns_list)
    if ((${#pids[@]})); then
        mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
        log "stopping ${#pids[@]} process(es): ${pids[*]}"
        stop_pids 3 "${pids[@]}" || true
    fi

    while read -r ns; do
        [[ -n $ns ]] || continue
        ip netns del "$ns" 2>/dev/null || { umount "/run/netns/$ns" 2>/dev/null || true; rm -f "/run/netns/$ns"; }
    done < <(lab_netns_list)

    if [[ -d $KMR_LAB_ROOT ]]; then
        if [[ -e $KMR_LAB_ROOT/$LAB_MARKER ]] || [[ -z $(ls -A "$KMR_LAB_ROOT") ]]; then
            rm -rf --one-file-system "$KMR_LAB_ROOT"
        else
            warn "$KMR_LAB_ROOT has no $LAB_MARKER marker; not deleting it"
        fi
    fi

    while read -r ns; do [[ -n $ns ]] && leftovers+=("netns $ns"); done < <(lab_netns_list)
    while read -r pid; do
        [[ -n $pid ]] && leftovers+=("qemu pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)")
    done < <(lab_qemu_pids)
    for pid in "${pids[@]}"; do pid_alive "$pid" && leftovers+=("process $pid ($(cat "/proc/$pid/comm" 2>/dev/null))"); done
    [[ -e $KMR_LAB_ROOT ]] && leftovers+=("files under $KMR_LAB_ROOT")
    if ((${#leftovers[@]})); then
        printf 'lab: down left behind:\n' >&2
        printf '  %s\n' "${leftovers[@]}" >&2
        exit 1
    fi
    log "down in $(elapsed "$t0")s, nothing left behind"
}

# ---------------------------------------------------------------------------------------------
# status

cmd_status() {
    [[ ${1:-} != -h && ${1:-} != --help ]] || { usage; return; }
    local ns f node id pid alive r
    r=$(ns_name router)
    echo "root:      $KMR_LAB_ROOT$([[ -e $KMR_LAB_ROOT/$LAB_MARKER ]] || echo ' (absent)')"
    echo "netns:     $(lab_netns_list | tr '\n' ' ')"
    echo "sandboxes:"
    for f in "$LAB_META"/sandboxes/*/*.env; do
        [[ -e $f ]] || continue
        node=$(basename "$(dirname "$f")")
        id=$(basename "$f" .env)
        load_sandbox "$node" "$id"
        pid="-" alive=no
        if pid=$(vm_pid "$node" "$id"); then alive=yes; else pid="-"; fi
        printf '  %-7s %-16s ip=%s ip6=%s mac=%s netns=%s vm_pid=%s alive=%s\n' \
            "$node" "$id" "$SB_IP" "${SB_IP6:--}" "$SB_MAC" \
            "$(ns_exists "$SB_NETNS" && echo "$SB_NETNS" || echo "MISSING:$SB_NETNS")" "$pid" "$alive"
    done
    if ns_exists "$r"; then
        echo "router pod routes:"
        ip -n "$r" route show proto static 2>/dev/null | sed 's/^/  /'
        ip -n "$r" -6 route show proto static 2>/dev/null | sed 's/^/  /'
    fi
}

# ---------------------------------------------------------------------------------------------
# sandbox

cmd_sandbox() {
    local node=${1:-} id=${2:-} ip="" ip6="" mac=""
    [[ -n $node && $node != -h && $node != --help && -n $id ]] || bad_usage 'sandbox NODE ID --ip A [--ip6 A6] [--mac M]'
    shift 2
    while (($#)); do
        case $1 in
        --ip) ip=${2:?--ip needs an address}; shift 2 ;;
        --ip6) ip6=${2:?--ip6 needs an address}; shift 2 ;;
        --mac) mac=${2:?--mac needs an address}; shift 2 ;;
        *) die "sandbox: unknown argument '$1'" ;;
        esac
    done
    require_root
    valid_node "$node"
    valid_id "$id"
    [[ -n $ip ]] || die "sandbox: --ip is required"
    valid_v4 "$ip"
    [[ -z $ip6 ]] || valid_v6 "$ip6"
    mac=${mac:-$(id_mac "$id")}
    valid_mac "$mac"
    local nodens sb veth meta r
    nodens=$(ns_name "$node")
    r=$(ns_name router)
    ns_exists "$nodens" || die "the lab is not up (no namespace $nodens); run: lab.sh up"
    sb=$(sb_ns_name "$node" "$id")
    veth=$(id_veth "$id")
    meta=$(meta_file "$node" "$id")
    if [[ -f $meta ]] && ns_exists "$sb"; then
        load_sandbox "$node" "$id"
        [[ $SB_IP == "$ip" && $SB_IP6 == "$ip6" && $SB_MAC == "$mac" ]] ||
            die "sandbox $id on $node exists with ip=$SB_IP ip6=$SB_IP6 mac=$SB_MAC; rm it first"
        log "sandbox $id on $node already exists"
        return
    fi
    if ns_exists "$sb"; then
        # Left by an interrupted `sandbox` or `rm`: start again from nothing.
        warn "removing the half-built sandbox namespace $sb"
        ip netns del "$sb"
    fi

    # What CNI (calico-style) sets up: a veth whose pod end is eth0 with a /32 and a default
    # route via a link-local gateway that the node answers for by proxy ARP/NDP.
    ensure_ns "$sb"
    link_exists "$nodens" "$veth" && ip -n "$nodens" link del "$veth"
    # The node end gets calico's fixed MAC on every node: the guest's neighbour entry for its
    # gateway must stay valid when the VM wakes up on another node.
    ip -n "$nodens" link add "$veth" address "$NODE_VETH_MAC" type veth peer name eth0 netns "$sb"
    ip -n "$sb" link set eth0 address "$mac" up
    ip -n "$sb" addr add "$ip/32" dev eth0
    ip -n "$sb" route add "$POD_GW_V4" dev eth0 scope link
    ip -n "$sb" route add default via "$POD_GW_V4" dev eth0
    if [[ -n $ip6 ]]; then
        ip -n "$sb" -6 addr add "$ip6/128" dev eth0 nodad
        ip -n "$sb" -6 route add default via "$POD_GW_V6" dev eth0
    fi

    # What Kata adds for the tcfilter interworking model: a tap for QEMU and ingress mirred
    # redirects both ways, so every frame on eth0 reaches the guest and vice versa.
    ip -n "$sb" tuntap add dev tap0_kata mode tap
    ip -n "$sb" link set tap0_kata mtu "$(ip -n "$sb" -o link show dev eth0 | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')" up
    tc -n "$sb" qdisc add dev eth0 ingress
    tc -n "$sb" filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 \
        action mirred egress redirect dev tap0_kata
    tc -n "$sb" qdisc add dev tap0_kata ingress
    tc -n "$sb" filter add dev tap0_kata parent ffff: protocol all u32 match u8 0 0 \
        action mirred egress redirect dev eth0

    # The node side: the pod's /32 and /128 point at the veth, and the node answers the guest's
    # ARP/NS for the gateway (proxy delay 0: the default 0.8 s random delay stalls first packets).
    ip -n "$nodens" link set "$veth" up
    ns_sysctl "$nodens" "net.ipv4.conf.$veth.proxy_arp=1" "net.ipv4.neigh.$veth.proxy_delay=0" \
        "net.ipv6.conf.$veth.proxy_ndp=1" "net.ipv6.neigh.$veth.proxy_delay=0"
    ip -n "$nodens" -6 neigh replace proxy "$POD_GW_V6" dev "$veth"
    ip -n "$nodens" route replace "$ip/32" dev "$veth" scope link
    [[ -z $ip6 ]] || ip -n "$nodens" -6 route replace "$ip6/128" dev "$veth"

    # First placement: the cluster learns the pod on this node. A second sandbox with the same
    # IP (a migration destination) leaves the route alone until `converge`.
    if [[ -z $(ip -n "$r" route show exact "$ip/32") ]]; then
        ip -n "$r" route add "$ip/32" via "$(node_v4 "$node")" proto static
    fi
    if [[ -n $ip6 && -z $(ip -n "$r" -6 route show exact "$ip6/128") ]]; then
        ip -n "$r" -6 route add "$ip6/128" via "$(node_v6 "$node")" proto static
    fi

    write_bundle "$node" "$id" "$sb"
    mkdir -p "$(sbs_dir "$node" "$id")" "$(vm_dir "$node" "$id")" "$(dirname "$meta")"
    cat >"$meta" <<META
SB_IP=$ip
SB_IP6=$ip6
SB_MAC=$mac
SB_NETNS=$sb
SB_VETH=$veth
META
    log "sandbox $id on $node: netns $sb, eth0 $mac $ip${ip6:+ $ip6}, node veth $veth"
}

# ---------------------------------------------------------------------------------------------
# vm

cmd_vm() {
    local node=${1:-} id=${2:-} mem=128 disks=none disk_size=64M rate=50 incoming=0 node_paths=0 timeout=180
    [[ -n $node && $node != -h && $node != --help && -n $id ]] || bad_usage 'vm NODE ID [--mem MIB] [--disks none|shared:N|local:N] [--disk-size SIZE] [--writer-rate N] [--incoming] [--node-paths] [--timeout SECS]'
    shift 2
    while (($#)); do
        case $1 in
        --mem) mem=${2:?}; shift 2 ;;
        --disks) disks=${2:?}; shift 2 ;;
        --disk-size) disk_size=${2:?}; shift 2 ;;
        --writer-rate) rate=${2:?}; shift 2 ;;
        --incoming) incoming=1; shift ;;
        --node-paths) node_paths=1; shift ;;
        --timeout) timeout=${2:?}; shift 2 ;;
        *) die "vm: unknown argument '$1'" ;;
        esac
    done
    require_root
    require_cmds "$KMR_QEMU" truncate
    valid_node "$node"
    valid_id "$id"
    [[ $mem =~ ^[0-9]+$ ]] || die "vm: --mem takes MiB, got '$mem'"
    [[ $rate =~ ^[0-9]+$ ]] || die "vm: --writer-rate takes records per second, got '$rate'"
    [[ $timeout =~ ^[0-9]+$ ]] || die "vm: --timeout takes seconds, got '$timeout'"
    [[ $disk_size =~ ^[0-9]+[KMG]?$ ]] || die "vm: --disk-size like 64M, got '$disk_size'"
    local kind=none count=0
    case $disks in
    none) ;;
    shared:[1-4] | local:[1-4]) kind=${disks%%:*}; count=${disks#*:} ;;
    *) die "vm: --disks takes none, shared:N or local:N (N 1-4), got '$disks'" ;;
    esac
    load_sandbox "$node" "$id"
    ns_exists "$SB_NETNS" || die "sandbox netns $SB_NETNS is gone; run: lab.sh rm $node $id"
    local kernel=$KMR_GUEST_DIR/vmlinuz initrd=$KMR_GUEST_DIR/initramfs.img
    [[ -r $kernel && -r $initrd ]] ||
        die "no guest image in $KMR_GUEST_DIR (vmlinuz, initramfs.img); build it: hack/guest/build.sh"

    local vm pid other
    vm=$(vm_dir "$node" "$id")
    if pid=$(vm_pid "$node" "$id"); then
        die "the VM of $id on $node is already running (pid $pid); lab.sh kill-vm $node $id first"
    fi
    # Kata's socket paths must fit sun_path (108 bytes) under this root.
    ((${#vm} + 20 < 108)) || die "socket path $vm/extra-monitor.sock is too long for a unix socket; use a shorter KMR_LAB_ROOT or id"
    for other in "${LAB_NODES[@]}"; do
        [[ $other == "$node" ]] && continue
        if ((!incoming)) && [[ $kind == shared ]] && pid=$(vm_pid "$other" "$id"); then
            die "$id runs on $other (pid $pid) and uses the shared disks; a fresh VM would wipe them"
        fi
    done
    mkdir -p "$vm"
    rm -f "$vm/pid" "$vm/qmp.sock" "$vm/extra-monitor.sock" "$vm/console.log"

    local i img dir names=() imgs=() drive_args=() letters=abcd
    for ((i = 0; i < count; i++)); do
        if [[ $kind == shared ]]; then dir=$KMR_LAB_ROOT/shared; else dir=$(node_root "$node")/disks; fi
        img=$dir/$id-disk$i.img
        mkdir -p "$dir"
        if ((incoming)) && [[ $kind == shared ]]; then
            [[ -f $img ]] || die "vm --incoming: shared disk $img does not exist (the source creates it)"
        else
            # A fresh disk: the guest's writer starts at offset 0 and the checker reads until the
            # first zero block, so old records must not survive.
            rm -f "$img"
            truncate -s "$disk_size" "$img"
        fi
        names+=("vd${letters:i:1}")
        imgs+=("$img")
        drive_args+=(-drive "id=drive-$i,file=$img,aio=threads,format=raw,if=none,readonly=off"
            -device "virtio-blk-pci,drive=drive-$i,id=virtio-blk-$i")
    done

    local append="console=ttyS0 quiet panic=1 katamaran.ip=$SB_IP/32 katamaran.gw=$POD_GW_V4"
    [[ -z $SB_IP6 ]] || append+=" katamaran.ip6=$SB_IP6/128 katamaran.gw6=$POD_GW_V6"
    append+=" katamaran.id=$id katamaran.writer_rate=$rate"
    ((count == 0)) || append+=" katamaran.disks=$(IFS=,; echo "${names[*]}")"

    # The paths QEMU itself names: the lab's, or with --node-paths the node's own /run/vc/vm/ID.
    local qvm=$vm
    ((node_paths)) && qvm=/run/vc/vm/$id
    # Kata's shape: -name/-uuid, two QMP sockets (the shim keeps qmp.sock; extra-monitor.sock is
    # Kata's `extra_monitor_socket`, the one katamaran uses), pidfile + daemonize, the tap by name
    # with the pod's MAC on the guest NIC, raw drives on virtio-blk. TCG: /dev/kvm hangs here.
    # shellcheck disable=SC2054 # commas belong to QEMU's option syntax
    local args=(
        -name "sandbox-$id" -uuid "$(id_uuid "$id")"
        -machine q35 -accel tcg -cpu max -m "${mem}M" -smp 1
        -qmp "unix:$qvm/qmp.sock,server=on,wait=off"
        -qmp "unix:$qvm/extra-monitor.sock,server=on,wait=off"
        -pidfile "$qvm/pid" -daemonize
        -no-user-config -nodefaults -nographic --no-reboot
        -rtc base=utc,driftfix=slew,clock=host
        -object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0
        -netdev tap,id=network-0,ifname=tap0_kata,script=no,downscript=no
        -device "virtio-net-pci,netdev=network-0,mac=$SB_MAC,id=net-0"
        "${drive_args[@]}"
        -kernel "$kernel" -initrd "$initrd" -append "$append"
        -serial "file:$qvm/console.log"
    )
    ((incoming)) && args+=(-incoming defer)

    local t0
    t0=$(now)
    local launch=(ip netns exec "$SB_NETNS")
    if ((node_paths)); then
        # A mount namespace of QEMU's own (it keeps it after -daemonize): an empty /run with the
        # node's run/vc at /run/vc. Nothing is mounted or created on the host.
        require_cmds unshare
        # shellcheck disable=SC2016 # expanded by the inner shell
        launch+=(unshare --mount --propagation private sh -c
            'mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/vc && mount --bind "$1" /run/vc && shift && exec "$@"'
            sh "$(node_root "$node")/run/vc")
    fi
    "${launch[@]}" "$KMR_QEMU" "${args[@]}" ||
        die "QEMU failed to start for $id on $node (its error is above)"
    pid=$(vm_pid "$node" "$id") || die "QEMU started but $vm/pid names no live QEMU"
    printf '%s\n' "${imgs[@]}" >"$vm/disks"
    write_persist "$node" "$id" "$pid" running

    if ((incoming)); then
        log "vm $id on $node: pid $pid, waiting for an incoming migration (-incoming defer)"
        return
    fi
    local dl
    dl=$(deadline "$timeout")
    until grep -qa KATAMARAN-GUEST-READY "$vm/console.log" 2>/dev/null; do
        if grep -qa KATAMARAN-GUEST-FAILED "$vm/console.log" 2>/dev/null; then
            tail -n 30 "$vm/console.log" >&2
            stop_pids 3 "$pid" || true
            die "guest $id reported KATAMARAN-GUEST-FAILED (QEMU stopped); console tail above"
        fi
        if ! pid_alive "$pid"; then
            tail -n 30 "$vm/console.log" >&2 2>/dev/null || true
            die "QEMU (pid $pid) exited before the guest was ready; console tail above"
        fi
        if past "$dl"; then
            tail -n 30 "$vm/console.log" >&2 2>/dev/null || true
            stop_pids 3 "$pid" || true
            die "guest $id not ready within ${timeout}s (QEMU stopped); console tail above"
        fi
        sleep 0.05
    done
    log "vm $id on $node: pid $pid, ready in $(elapsed "$t0")s"
    printf 'boot_to_ready_s=%s\n' "$(elapsed "$t0")"
}

cmd_kill_vm() {
    local node=${1:-} id=${2:-} pid
    [[ -n $node && -n $id ]] || bad_usage 'kill-vm NODE ID'
    require_root
    valid_node "$node"
    valid_id "$id"
    if pid=$(vm_pid "$node" "$id"); then
        stop_pids 5 "$pid" || die "QEMU pid $pid survived SIGKILL"
        [[ -f $(meta_file "$node" "$id") ]] && write_persist "$node" "$id" 0 stopped
        log "vm $id on $node stopped (pid $pid)"
    else
        log "vm $id on $node is not running"
    fi
}

cmd_rm() {
    local node=${1:-} id=${2:-} r other keep_shared=0 img
    [[ -n $node && -n $id ]] || bad_usage 'rm NODE ID'
    require_root
    valid_node "$node"
    valid_id "$id"
    cmd_kill_vm "$node" "$id"
    r=$(ns_name router)
    if [[ -f $(meta_file "$node" "$id") ]]; then
        load_sandbox "$node" "$id"
        if ns_exists "$r"; then
            ip -n "$r" route show exact "$SB_IP/32" | grep -q "via $(node_v4 "$node") " &&
                ip -n "$r" route del "$SB_IP/32"
            [[ -n $SB_IP6 ]] && ip -n "$r" -6 route show exact "$SB_IP6/128" | grep -q "via $(node_v6 "$node") " &&
                ip -n "$r" -6 route del "$SB_IP6/128"
        fi
        ns_exists "$SB_NETNS" && ip netns del "$SB_NETNS"
    fi
    for other in "${LAB_NODES[@]}"; do
        [[ $other != "$node" && -f $(meta_file "$other" "$id") ]] && keep_shared=1
    done
    rm -rf "$(vm_dir "$node" "$id")" "$(sbs_dir "$node" "$id")" "$(bundle_dir "$node" "$id")" \
        "$(meta_file "$node" "$id")"
    rm -f "$(node_root "$node")/disks/$id"-disk*.img
    if ((!keep_shared)); then
        for img in "$KMR_LAB_ROOT/shared/$id"-disk*.img; do rm -f "$img"; done
    fi
    log "sandbox $id on $node removed"
}

cmd_converge() {
    local id=${1:-} node=${2:-} r f
    [[ -n $id && -n $node ]] || bad_usage 'converge ID NODE'
    require_root
    valid_id "$id"
    valid_node "$node"
    load_sandbox "$node" "$id"
    r=$(ns_name router)
    f=$(mktemp)
    # One `ip -batch` so both families move in one process, as close together as a shell allows.
    {
        echo "route replace $SB_IP/32 via $(node_v4 "$node") proto static"
        [[ -z $SB_IP6 ]] || echo "route replace $SB_IP6/128 via $(node_v6 "$node") proto static"
    } >"$f"
    ip -n "$r" -batch "$f" || { rm -f "$f"; die "converge: route replace failed"; }
    rm -f "$f"
    log "converged: $id ($SB_IP${SB_IP6:+ $SB_IP6}) routed to $node"
}

cmd_exec() {
    local target=${1:-} ns
    [[ -n $target && $# -ge 2 ]] || bad_usage 'exec client|router|node-a|node-b|NODE/ID CMD...'
    shift
    case $target in
    client | router | node-a | node-b) ns=$(ns_name "$target") ;;
    node-a/* | node-b/*) valid_id "${target#*/}"; ns=$(sb_ns_name "${target%%/*}" "${target#*/}") ;;
    *) die "exec: unknown target '$target' (client, router, node-a, node-b or NODE/ID)" ;;
    esac
    ns_exists "$ns" || die "exec: namespace $ns does not exist"
    exec ip netns exec "$ns" "$@"
}

cmd_probe() {
    local bin c
    require_root
    c=$(ns_name client)
    ns_exists "$c" || die "the lab is not up (no namespace $c)"
    bin=$(probe_bin)
    exec ip netns exec "$c" "$bin" "$@"
}

cmd_qmp() {
    local node=${1:-} id=${2:-} sock=qmp.sock
    [[ -n $node && -n $id && $# -ge 3 ]] || bad_usage 'qmp NODE ID [--extra] COMMAND [JSON-ARGS]'
    shift 2
    [[ $1 == --extra ]] && { sock=extra-monitor.sock; shift; }
    valid_node "$node"
    valid_id "$id"
    qmp cmd "$(vm_dir "$node" "$id")/$sock" "$@"
}

cmd_paths() {
    local node=${1:-} id=${2:-} vm
    [[ -n $node && -n $id ]] || bad_usage 'paths NODE ID'
    valid_node "$node"
    valid_id "$id"
    load_sandbox "$node" "$id"
    vm=$(vm_dir "$node" "$id")
    cat <<PATHS
NETNS=$SB_NETNS
NETNS_PATH=/run/netns/$SB_NETNS
NODE_NETNS=$(ns_name "$node")
NODE_VETH=$SB_VETH
IP=$SB_IP
IP6=$SB_IP6
MAC=$SB_MAC
VM_DIR=$vm
QMP=$vm/qmp.sock
EXTRA_MONITOR=$vm/extra-monitor.sock
PIDFILE=$vm/pid
CONSOLE=$vm/console.log
SBS_DIR=$(sbs_dir "$node" "$id")
PERSIST=$(sbs_dir "$node" "$id")/persist.json
BUNDLE=$(bundle_dir "$node" "$id")
CONFIG_JSON=$(bundle_dir "$node" "$id")/config.json
DISKS=$( [[ -f $vm/disks ]] && tr '\n' ' ' <"$vm/disks" | sed 's/ $//')
PATHS
}

main() {
    local cmd=${1:-}
    [[ -n $cmd ]] || { usage >&2; exit 2; }
    shift
    validate_knobs
    case $cmd in
    -h | --help | help) usage ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    sandbox) cmd_sandbox "$@" ;;
    vm) cmd_vm "$@" ;;
    kill-vm) cmd_kill_vm "$@" ;;
    rm) cmd_rm "$@" ;;
    converge) cmd_converge "$@" ;;
    exec) cmd_exec "$@" ;;
    probe) cmd_probe "$@" ;;
    qmp) cmd_qmp "$@" ;;
    paths) cmd_paths "$@" ;;
    *) die "unknown command '$cmd' (see hack/lab.sh --help)" ;;
    esac
}

main "$@"
