#!/usr/bin/env bash
# QEMU as `hack/lab.sh vm` starts it, with KMR_BENCH_APPEND added to the kernel command line.
# The benchmark passes this file as KMR_QEMU to start the guest's dirty-memory workload without
# changing the guest image (see test/bench/src/guest.rs). `exec` keeps the pid and leaves
# QEMU's own command line (/proc/PID/cmdline) as lab.sh and katamaran expect it.
set -euo pipefail
real=${KMR_BENCH_REAL_QEMU:-qemu-system-x86_64}
extra=${KMR_BENCH_APPEND:?KMR_BENCH_APPEND is not set}
args=()
while (($#)); do
    if [[ $1 == -append && $# -ge 2 ]]; then
        args+=(-append "$2 $extra")
        shift 2
    else
        args+=("$1")
        shift
    fi
done
exec "$real" "${args[@]}"
