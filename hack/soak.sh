#!/usr/bin/env bash
# The soak (a benchmark, not CI): one lab guest moved back and forth between node-a and node-b
# under a 1000 pps probe, optionally with a fault from the ownership fault matrix in every move.
# Prints a table per outcome: moves completed, cancelled/rolled back, refused cancels, packets
# lost while the source kept the VM, times the VM ran in two places or none (must be 0),
# reboots, leftovers. Needs root and QEMU (installs them like hack/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'USAGE'
usage: hack/soak.sh [--migrations N] [--faults] [--seed S]

  --migrations N   moves to make (default 50; alternating direction after each completed move)
  --faults         give every move a fault drawn from the matrix (cancel through the source or
                   the destination in RAM, cancel past the commit, source agent killed before
                   or after the commit, a panic in the source task)
  --seed S         the fault draw's seed (default fixed: runs are reproducible)
USAGE
}

n=50 faults=0 seed=""
while (($#)); do
  case "$1" in
    --migrations) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "soak: --migrations takes a positive number" >&2; exit 2; }; n=$2; shift 2 ;;
    --faults) faults=1; shift ;;
    --seed) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || { echo "soak: --seed takes a number" >&2; exit 2; }; seed=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "soak: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $(id -u) -eq 0 ]] || { echo "soak: needs root (network namespaces, QEMU)" >&2; exit 2; }

KMR_NO_FUZZ=1 hack/deps.sh
hack/guest/build.sh >/dev/null
export KMR_SOAK_MIGRATIONS=$n KMR_SOAK_FAULTS=$faults
[[ -n "$seed" ]] && export KMR_SOAK_SEED=$seed
exec cargo test --locked -p katamaran-e2e --test soak -- --ignored --nocapture --test-threads 1
