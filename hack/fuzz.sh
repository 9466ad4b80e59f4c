#!/usr/bin/env bash
# Builds (and optionally runs) the cargo-fuzz targets of the parsers that read bytes from QEMU or
# the network. Only a stable toolchain exists here: cargo-fuzz needs nightly-only compiler flags
# (-Zsanitizer), which RUSTC_BOOTSTRAP=1 unlocks on the stable compiler.
#   hack/fuzz.sh build            build every target (CI)
#   hack/fuzz.sh run TARGET [SECS] fuzz one target for SECS seconds (default 60)
set -euo pipefail
cd "$(dirname "$0")/../shim-ext"
export RUSTC_BOOTSTRAP=1
cmd=${1:-build}
case "$cmd" in
  build) cargo fuzz build --dev ;;
  run)
    target=${2:?usage: hack/fuzz.sh run TARGET [SECS]}
    cargo fuzz run --dev "$target" -- -max_total_time="${3:-60}" ;;
  list) cargo fuzz list ;;
  *) echo "usage: hack/fuzz.sh build | run TARGET [SECS] | list" >&2; exit 2 ;;
esac
