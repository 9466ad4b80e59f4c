#!/usr/bin/env bash
# Builds the kernel lab VM: the lab guest image (hack/guest/build.sh) with the production-path
# modules, plus the static katamaran-kernel-lab runner, shim-ext's privileged netns tests as a
# static binary, katamaran-agent and the QEMU stand-in (for the engine-cutover check), and an
# /init that runs them and powers off. See docs/KERNEL-LAB.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: hack/kernel-lab/build.sh [--out DIR] [--cache DIR] [--force] [--help]

Builds the kernel lab image:
  DIR/vmlinuz         Debian's cloud kernel (from the guest image)
  DIR/initramfs.img   the guest initramfs (busybox, modules) followed by a second archive with
                      /init, /bin/katamaran-kernel-lab, /bin/katamaran-net-netns-tests,
                      /bin/katamaran-agent and /bin/katamaran-qemu-standin
                      (the kernel unpacks concatenated archives in order; later files win)
  DIR/manifest.json   the guest manifest, binary hashes, inputs and output hashes
  DIR/guest/          the guest image built with the lab's extra modules

  --out DIR    output directory (default: .lab/kernel-lab)
  --cache DIR  where the guest build keeps downloaded .debs (default: hack/guest/out/cache)
  --force      rebuild the guest image and the lab image even when their inputs are unchanged
  -h, --help   this text

Cached: the cargo builds are incremental; the guest image and the final archive are rebuilt
only when the hash of their inputs changes. No root needed.
Exit status: 0 built or up to date, 1 build error, 2 usage error, 3 a Debian package could not
be resolved or downloaded (no package lists, or no network).
EOF
}

die() { echo "kernel-lab/build.sh: error: $*" >&2; exit 1; }
log() { echo "kernel-lab/build.sh: $*" >&2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$ROOT/.lab/kernel-lab"
CACHE=""
FORCE=0
while (($#)); do
  case "$1" in
    --out) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --cache) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; CACHE="$2"; shift 2 ;;
    --cache=*) CACHE="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "kernel-lab/build.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# What the checks need beyond the guest's virtio modules: veth and tun for the topologies and
# the suite's tap test; the ingress qdisc, u32 and mirred for the suite's tcfilter test; the
# production path itself: sch_plug and the four tunnel kinds. Debian builds all of them as
# modules, and the initramfs has no modprobe to load them on demand.
MODULES="veth tun sch_ingress cls_u32 act_mirred sch_plug ipip ip_gre ip6_tunnel ip6_gre"
TARGET="x86_64-unknown-linux-gnu"
# The same flags as hack/guest/build.sh, so the two builds share the target directory's
# artifacts instead of rebuilding each other's.
STATIC_RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols"
EPOCH=0

for tool in cargo cpio gzip sha256sum readelf find sort sed; do
  command -v "$tool" >/dev/null || die "missing tool: $tool (hack/deps.sh installs what is needed)"
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/katamaran-kernel-lab.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- static binaries ------------------------------------------------------------------------------
# An explicit --target keeps these RUSTFLAGS away from the host builds in the shared target dir;
# CARGO_ENCODED_RUSTFLAGS would override RUSTFLAGS (cargo sets it for build scripts and tests).
unset CARGO_ENCODED_RUSTFLAGS
static_cargo() {
  (cd "$ROOT" && RUSTFLAGS="$STATIC_RUSTFLAGS" cargo "$@" --release --locked --target "$TARGET")
}

log "building katamaran-kernel-lab, katamaran-agent and katamaran-qemu-standin (static)"
static_cargo build -p katamaran-kernel-lab -p katamaran-shim-ext -p katamaran-qemu-standin \
  --bin katamaran-kernel-lab --bin katamaran-agent --bin katamaran-qemu-standin 2>"$WORK/cargo.log" \
  || { cat "$WORK/cargo.log" >&2; die "cargo build of the lab's programs failed"; }
TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
RELEASE="${TARGET_DIR:-$ROOT/target}/$TARGET/release"
RUNNER="$RELEASE/katamaran-kernel-lab"
AGENT="$RELEASE/katamaran-agent"
STANDIN="$RELEASE/katamaran-qemu-standin"
for bin in "$RUNNER" "$AGENT" "$STANDIN"; do
  [[ -x "$bin" ]] || die "built program not found at $bin"
done

log "building shim-ext's net_netns tests (static)"
static_cargo test --no-run -p katamaran-shim-ext --test net_netns --message-format=json \
  >"$WORK/suite.json" 2>"$WORK/cargo.log" \
  || { cat "$WORK/cargo.log" >&2; die "cargo test --no-run of shim-ext's net_netns failed"; }
# The test target's compiler-artifact message names the executable.
SUITE="$(grep '"kind":\["test"\]' "$WORK/suite.json" | grep '"name":"net_netns"' \
  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)"
[[ -n "$SUITE" && -x "$SUITE" ]] || die "cargo did not report the net_netns test executable"

for bin in "$RUNNER" "$SUITE" "$AGENT" "$STANDIN"; do
  if LC_ALL=C readelf -l "$bin" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "$bin is dynamically linked; the initramfs has no libc"
  fi
done

# --- the guest image with the modules ---------------------------------------------------------------
guest_args=(--out "$OUT/guest" --extra-modules "$MODULES")
[[ -z "$CACHE" ]] || guest_args+=(--cache "$CACHE")
((FORCE == 0)) || guest_args+=(--force)
set +e
"$ROOT/hack/guest/build.sh" "${guest_args[@]}"
rc=$?
set -e
case "$rc" in
  0) ;;
  3) echo "kernel-lab/build.sh: cannot fetch packages (see above)" >&2; exit 3 ;;
  *) die "hack/guest/build.sh failed with status $rc" ;;
esac
GUEST="$OUT/guest"

# --- up to date? ----------------------------------------------------------------------------------
INPUTS_HASH="$({
  cat "$GUEST/.inputs.sha256"
  sha256sum "$RUNNER" "$SUITE" "$AGENT" "$STANDIN" "$HERE/init" "$HERE/build.sh" | awk '{print $1}'
} | sha256sum | awk '{print $1}')"
if ((FORCE == 0)) && [[ -f "$OUT/.inputs.sha256" && -f "$OUT/vmlinuz" && -f "$OUT/initramfs.img" && -f "$OUT/manifest.json" ]] \
  && [[ "$(cat "$OUT/.inputs.sha256")" == "$INPUTS_HASH" ]]; then
  log "up to date: $OUT (inputs $INPUTS_HASH)"
  exit 0
fi

# --- the lab's archive, appended to a copy of the guest's ---------------------------------------------
RFS="$WORK/root"
mkdir -p "$RFS/bin" "$RFS/etc/katamaran"
install -m 0755 "$HERE/init" "$RFS/init"
install -m 0755 "$RUNNER" "$RFS/bin/katamaran-kernel-lab"
install -m 0755 "$SUITE" "$RFS/bin/katamaran-net-netns-tests"
install -m 0755 "$AGENT" "$RFS/bin/katamaran-agent"
install -m 0755 "$STANDIN" "$RFS/bin/katamaran-qemu-standin"
echo "$INPUTS_HASH" >"$RFS/etc/katamaran/kernel-lab.inputs"
# Reproducible: fixed modes and mtimes, sorted entries, owner 0.
find "$RFS" -type d -exec chmod 0755 {} +
find "$RFS" -type f ! -perm -u+x -exec chmod 0644 {} +
find "$RFS" -exec touch -h -d "@$EPOCH" {} +
(cd "$RFS" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
  | gzip -n -9 >"$WORK/lab.cpio.gz"
cat "$GUEST/initramfs.img" "$WORK/lab.cpio.gz" >"$WORK/initramfs.img"
cp "$GUEST/vmlinuz" "$WORK/vmlinuz"

# --- outputs --------------------------------------------------------------------------------------
sha() { sha256sum "$1" | awk '{print $1}'; }
{
  echo "{"
  printf '  "guest": %s,\n' "$(sed 's/^/  /' "$GUEST/manifest.json" | sed '1s/^  //')"
  printf '  "lab_modules": "%s",\n' "$MODULES"
  printf '  "runner_sha256": "%s",\n' "$(sha "$RUNNER")"
  printf '  "suite_sha256": "%s",\n' "$(sha "$SUITE")"
  printf '  "agent_sha256": "%s",\n' "$(sha "$AGENT")"
  printf '  "standin_sha256": "%s",\n' "$(sha "$STANDIN")"
  printf '  "inputs_sha256": "%s",\n' "$INPUTS_HASH"
  printf '  "sha256": {\n    "vmlinuz": "%s",\n    "initramfs.img": "%s"\n  }\n' \
    "$(sha "$WORK/vmlinuz")" "$(sha "$WORK/initramfs.img")"
  echo "}"
} >"$WORK/manifest.json"
for f in vmlinuz initramfs.img manifest.json; do
  mv -f "$WORK/$f" "$OUT/$f"
done
echo "$INPUTS_HASH" >"$OUT/.inputs.sha256"
log "built $OUT: initramfs.img ($(du -k "$OUT/initramfs.img" | cut -f1) KiB), runner $(du -k "$RUNNER" | cut -f1) KiB, suite $(du -k "$SUITE" | cut -f1) KiB, agent $(du -k "$AGENT" | cut -f1) KiB, stand-in $(du -k "$STANDIN" | cut -f1) KiB"
