#!/usr/bin/env bash
# Installs what building and testing katamaran needs on Debian 12: apt packages and cargo tools.
# Idempotent: installs only what is missing. Used by hack/test.sh and hack/demo.sh.
set -euo pipefail

APT_PACKAGES=(
  qemu-system-x86   # the VMs: lab guests, the real-QEMU QMP tests, the kernel lab VM
  qemu-utils        # qemu-img for disk images
  busybox-static    # the guest initramfs userland
  cpio kmod xz-utils zstd # packing the initramfs, reading kernel modules
  iproute2 iputils-ping socat jq wget python3 # lab plumbing, its QMP helper and the baseline
  containerd        # the real containerd the shim wrapper and the deployed agents are tested with
  runc util-linux   # its runtime; nsenter and unshare for the deployment-shaped lab
  ca-certificates
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "deps: installing apt packages: ${missing[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "deps: cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
if [[ "${KMR_NO_FUZZ:-}" != 1 ]]; then
  cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
fi
