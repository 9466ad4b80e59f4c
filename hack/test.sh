#!/usr/bin/env bash
# The one test entry point: what CI runs (.ci/run) and what the README tells you to run.
# Installs what it needs, then: lint, every test tier this machine can run, the fuzz build.
# Tests that need root, network namespaces or QEMU run when those are present (CI is root) and
# print "skipped: <why>" otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/deps.sh

step() { printf '\n==> %s\n' "$*" >&2; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "guest image"
hack/guest/build.sh

step "tests"
cargo nextest run --workspace --locked --profile ci

step "fuzz targets build"
hack/fuzz.sh build
