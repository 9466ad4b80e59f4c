#!/usr/bin/env bash
# The benchmark (as root, on Debian 12): builds katamaran, the probe and the benchmark (release)
# and the guest image, then runs katamaran-bench: katamaran's migrations in the two-node lab side
# by side with bare QEMU, the data-plane relay against a direct stream, and the cutover's route
# swap through netlink against spawned `ip` processes. Prints tables; see docs/PERFORMANCE.md.
#
#   hack/bench.sh [--quick] [katamaran-bench options]
#
#   (no options)          the default cases, 3 runs each (about 15 minutes on 2 quiet CPUs)
#   --quick               one run of 128m-idle-shared-1000 and short micro-benchmarks (~1 min)
#   --runs N              runs per case and driver
#   --cases LIST          default | all | names like 512m-dirty-local-5000, comma-separated
#   --json PATH           also write every run as JSON
#   --help                every option of katamaran-bench
#
# Every run has a lab of its own (hack/lab.sh, unique root and namespace prefix) that is torn
# down afterwards, also on failure; labs of tests running at the same time take turns.
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
for a in "$@"; do
    case $a in
        --quick) args+=(--runs 1 --cases 128m-idle-shared-1000 --relay-mib 256 --relay-runs 3 --netlink-iterations 200 --spawn-iterations 50) ;;
        -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; args+=(--help) ;;
        *) args+=("$a") ;;
    esac
done
if [[ " ${args[*]} " != *" --help "* ]]; then
    [[ $(id -u) == 0 ]] || { echo "bench: needs root (network namespaces, taps, QEMU)" >&2; exit 2; }
    KMR_NO_FUZZ=1 hack/deps.sh
fi
cargo build --release --locked -p katamaran-shim-ext -p katamaran-probe -p katamaran-bench --bins >&2
[[ " ${args[*]} " == *" --help "* ]] || hack/guest/build.sh >&2
export KMR_PROBE=$PWD/target/release/katamaran-probe
exec target/release/katamaran-bench "${args[@]}"
