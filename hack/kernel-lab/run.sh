#!/usr/bin/env bash
# Boots the kernel lab VM built by hack/kernel-lab/build.sh under QEMU (TCG), streams its
# console to stdout and a log, and exits with the status of the checks run inside it.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: hack/kernel-lab/run.sh [--out DIR] [--log FILE] [--deadline SECONDS] [--only CHECKS]
                              [--check-timeout DURATION] [--memory MB] [--smp N] [--help]

  --out DIR            image directory from build.sh (default: .lab/kernel-lab)
  --log FILE           console log (default: DIR/console.log)
  --deadline SECONDS   kill the VM after this long (default: 420)
  --only CHECKS        comma-separated checks to run (default: all; see
                       `katamaran-kernel-lab --list`): features, plug, tunnel-ipip, tunnel-gre,
                       tunnel-ip6ip6, tunnel-ip6gre, cutover, cutover-controlled,
                       netns-suite
  --check-timeout D    deadline of each check inside the VM, e.g. 180s (the runner's default)
  --memory MB          guest memory (default: 512)
  --smp N              guest CPUs (default: 2)
  -h, --help           this text

The console shows KERNEL-LAB-KERNEL, KERNEL-LAB-MODULES, one KERNEL-LAB-CHECK line per check,
KERNEL-LAB-RESULT {json} and KERNEL-LAB-EXIT status=N.
Exit status: the runner's (0 every check passed, 1 a check failed, 3 the checks could not
run), 2 usage error or no image, 124 the deadline passed, 125 the VM ended without reporting.
EOF
}

die_usage() { echo "kernel-lab/run.sh: $*" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$ROOT/.lab/kernel-lab"
LOG=""
DEADLINE=420
ONLY=""
CHECK_TIMEOUT=""
MEMORY=512
SMP=2
while (($#)); do
  case "$1" in
    --out) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --log) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; LOG="$2"; shift 2 ;;
    --deadline) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; DEADLINE="$2"; shift 2 ;;
    --only) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; ONLY="$2"; shift 2 ;;
    --check-timeout) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; CHECK_TIMEOUT="$2"; shift 2 ;;
    --memory) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; MEMORY="$2"; shift 2 ;;
    --smp) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; SMP="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "kernel-lab/run.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$DEADLINE" =~ ^[0-9]+$ ]] || die_usage "--deadline wants whole seconds, got $DEADLINE"
[[ "$ONLY" =~ ^[a-z0-9,-]*$ ]] || die_usage "--only wants comma-separated check names, got $ONLY"
[[ "$CHECK_TIMEOUT" =~ ^[0-9a-z.]*$ ]] || die_usage "--check-timeout wants a duration like 180s"
command -v qemu-system-x86_64 >/dev/null || die_usage "qemu-system-x86_64 is not installed"
[[ -f "$OUT/vmlinuz" && -f "$OUT/initramfs.img" ]] \
  || die_usage "no image in $OUT (run hack/kernel-lab/build.sh first)"
LOG="${LOG:-$OUT/console.log}"
mkdir -p "$(dirname "$LOG")"

# quiet: printing kernel messages on a serial port costs seconds under TCG.
APPEND="console=ttyS0 quiet panic=-1"
[[ -z "$ONLY" ]] || APPEND+=" katamaran.lab.only=$ONLY"
[[ -z "$CHECK_TIMEOUT" ]] || APPEND+=" katamaran.lab.check_timeout=$CHECK_TIMEOUT"

# /dev/kvm exists on the lab machines but hangs: TCG only. The VM needs no NIC (the checks build
# their own namespaces). -no-reboot turns a kernel panic (panic=-1 reboots) into QEMU exiting.
# timeout kills QEMU at the deadline (and SIGKILLs it 10 s later if it lingers); --foreground
# keeps QEMU in this script's process group, so whoever stops the group (Ctrl-C, a test
# runner's timeout) stops QEMU with it.
set +e
timeout --foreground --kill-after=10 "$DEADLINE" \
  qemu-system-x86_64 -accel tcg -m "$MEMORY" -smp "$SMP" \
    -kernel "$OUT/vmlinuz" -initrd "$OUT/initramfs.img" -append "$APPEND" \
    -nographic -no-reboot -nic none </dev/null 2>&1 | tee "$LOG"
qemu_rc=${PIPESTATUS[0]}
set -e

if ((qemu_rc == 124 || qemu_rc == 137)); then
  echo "kernel-lab/run.sh: the VM did not finish within ${DEADLINE}s (log: $LOG)" >&2
  exit 124
fi
status="$(tr -d '\r' <"$LOG" | sed -n 's/.*KERNEL-LAB-EXIT status=\([0-9]*\).*/\1/p' | tail -n1)"
if [[ -z "$status" ]]; then
  echo "kernel-lab/run.sh: the VM ended (qemu status $qemu_rc) without reporting (log: $LOG)" >&2
  exit 125
fi
exit "$status"
