#!/usr/bin/env bash
# The naive baseline: live-migrate the lab's VM from node-a to node-b with plain QMP and move the
# router's route only after the destination resumes — no cutover at STOP, no buffering. Every
# packet that reaches node-a between STOP and the route switch is lost; this script measures how
# many, with the probe at 1000 pps, over several runs. katamaran exists to bring that to zero.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lab/lib.sh
source "$HERE/lab/lib.sh"
LAB="$HERE/lab.sh"

usage() {
    cat <<'USAGE'
usage: hack/naive-migrate.sh [options]

Boots a VM on node-a (shared storage), starts a destination on node-b with `-incoming defer`,
runs the probe from the client, migrates with plain QMP (migrate-incoming + migrate over a unix
socket), switches the router's route after RESUME, and prints the probe's report per run.

  --runs N            runs, each with a freshly booted VM          (default 3)
  --rate PPS          probe rate                                    (default 1000)
  --id ID             sandbox id                                    (default naive0)
  --ip A / --ip6 A6   pod addresses                 (default 10.244.1.10 / fd00:244::10)
  --mem MIB           guest memory                                  (default 128)
  --before SECS       probe time before the migration starts       (default 2)
  --after SECS        probe time after the route switch            (default 2)
  --max-bandwidth B   migration bandwidth, bytes/s (QEMU 7.2's default is 32 MiB/s)
                                                                    (default 1073741824)
  --json-dir DIR      also keep each run's probe report and timeline here
  --keep              leave the lab and the last run's VMs up

The lab is brought up if needed (hack/lab.sh up) and taken down at the end if this script
brought it up, unless --keep. Environment as for hack/lab.sh (KMR_LAB_ROOT, KMR_LAB_PREFIX, ...).
USAGE
}

runs=3 rate=1000 id=naive0 ip=10.244.1.10 ip6=fd00:244::10 mem=128 before=2 after=2
bandwidth=1073741824 json_dir="" keep=0
while (($#)); do
    case $1 in
    --runs) runs=${2:?}; shift 2 ;;
    --rate) rate=${2:?}; shift 2 ;;
    --id) id=${2:?}; shift 2 ;;
    --ip) ip=${2:?}; shift 2 ;;
    --ip6) ip6=${2:?}; shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    --before) before=${2:?}; shift 2 ;;
    --after) after=${2:?}; shift 2 ;;
    --max-bandwidth) bandwidth=${2:?}; shift 2 ;;
    --json-dir) json_dir=${2:?}; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
for n in "$runs" "$rate" "$mem" "$bandwidth"; do [[ $n =~ ^[0-9]+$ ]] || die "'$n' is not a number"; done
for n in "$before" "$after"; do [[ $n =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "'$n' is not a number of seconds"; done
require_root
require_cmds ip python3
validate_knobs
valid_id "$id"
valid_v4 "$ip"
valid_v6 "$ip6"

brought_up=0
ns_exists "$(ns_name router)" || brought_up=1
"$LAB" up
probe=$(probe_bin)
export KMR_PROBE=$probe
[[ -z $json_dir ]] || mkdir -p "$json_dir"
work=$LAB_META/naive
mkdir -p "$work"

probe_pid=""
cleanup() {
    local rc=$?
    if [[ -n $probe_pid ]] && pid_alive "$probe_pid"; then stop_pids 2 "$probe_pid" || true; fi
    if ((!keep)); then
        "$LAB" rm node-b "$id" >/dev/null 2>&1 || true
        "$LAB" rm node-a "$id" >/dev/null 2>&1 || true
        ((brought_up)) && { "$LAB" down || rc=1; }
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The route change the naive operator makes after RESUME: both families, one `ip -batch`.
cat >"$work/converge.batch" <<BATCH
route replace $ip/32 via $NODE_B_V4 proto static
route replace $ip6/128 via $NODE_B_V6 proto static
BATCH

summaries=()
for ((run = 1; run <= runs; run++)); do
    log "naive run $run/$runs"
    "$LAB" rm node-b "$id" >/dev/null
    "$LAB" rm node-a "$id" >/dev/null
    "$LAB" sandbox node-a "$id" --ip "$ip" --ip6 "$ip6"
    "$LAB" vm node-a "$id" --mem "$mem" --disks shared:1 >/dev/null
    "$LAB" sandbox node-b "$id" --ip "$ip" --ip6 "$ip6"
    "$LAB" vm node-b "$id" --mem "$mem" --disks shared:1 --incoming

    report=$work/probe-$run.json timeline=$work/timeline-$run.json stop=$work/probe-$run.stop
    rm -f "$report" "$timeline" "$stop"
    "$LAB" probe --target "$ip:7" --rate "$rate" --duration 1h --wait-ready 30s \
        --stop-file "$stop" --json "$report" 2>"$work/probe-$run.log" &
    probe_pid=$!
    # A measured stretch of normal traffic before the move (a window of the measurement, not a
    # synchronisation: the probe's --wait-ready already waited for the first echo).
    sleep "$before"
    pid_alive "$probe_pid" || { cat "$work/probe-$run.log" >&2; die "the probe exited early"; }

    qmp naive-migrate \
        --src "$(vm_dir node-a "$id")/extra-monitor.sock" \
        --dst "$(vm_dir node-b "$id")/extra-monitor.sock" \
        --uri "unix:$(vm_dir node-b "$id")/migrate.sock" \
        --router-ns "$(ns_name router)" --converge-batch "$work/converge.batch" \
        --max-bandwidth "$bandwidth" >"$timeline"
    sleep "$after"

    touch "$stop"
    wait "$probe_pid" || die "the probe failed: $(cat "$work/probe-$run.log")"
    probe_pid=""
    echo "== run $run: probe report"
    cat "$work/probe-$run.log"
    echo "== run $run: migration timeline"
    cat "$timeline"
    [[ -z $json_dir ]] || cp "$report" "$timeline" "$json_dir/"
    summaries+=("$(python3 - "$report" "$timeline" "$run" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); t = json.load(open(sys.argv[2]))
print(f"{sys.argv[3]:>3} {r['sent']:>6} {r['lost']:>5} {r['duplicated']:>4} {r['reordered']:>4} "
      f"{r['longest_gap_ms']:>9.1f} {t['stop_to_resume_ms']:>10.1f} {t['resume_to_route_ms']:>10.1f} "
      f"{t['blackout_ms']:>10.1f} {t['total_time_ms']:>8}")
PY
)")
done

echo
echo "naive baseline: ${rate} pps, ${mem} MiB guest, shared storage, route switched after RESUME"
echo "run   sent  lost  dup reord  gap_ms  stop→resume resume→route  blackout  total_ms"
printf '%s\n' "${summaries[@]}"
