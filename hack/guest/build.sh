#!/usr/bin/env bash
# Builds the katamaran lab guest: Debian's cloud kernel + a busybox initramfs with the static
# katamaran-guest agent. See hack/guest/README.md for the interface (kernel parameters, outputs).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: hack/guest/build.sh [--out DIR] [--cache DIR] [--extra-modules "MOD ..."] [--force] [--help]

Builds the lab guest image from Debian packages:
  DIR/vmlinuz         Debian's cloud kernel (the package linux-image-cloud-amd64 depends on)
  DIR/initramfs.img   gzip newc cpio: busybox-static, katamaran-guest, virtio modules, /init
  DIR/manifest.json   kernel package + version, busybox version, modules, sha256 of outputs

  --out DIR            output directory (default: hack/guest/out)
  --cache DIR          where downloaded .debs are kept and reused (default: hack/guest/out/cache,
                       shared by every --out)
  --extra-modules "M"  more kernel modules to ship and load at boot, with their dependencies,
                       e.g. "sch_plug ipip ip_gre ip6_tunnel ip6_gre" for a kernel-lab image
  --force              rebuild even when the inputs' hash is unchanged
  -h, --help           this text

Needs: apt-get (package lists present: run `apt-get update` once), dpkg-deb, depmod (kmod),
cpio, gzip, xz/zstd for compressed modules, cargo. No root needed.
Exit status: 0 built or up to date, 1 build error, 2 usage error, 3 a Debian package could not
be resolved or downloaded (no package lists, or no network).
EOF
}

die() { echo "guest/build.sh: error: $*" >&2; exit 1; }
die_fetch() { echo "guest/build.sh: cannot fetch packages: $*" >&2; exit 3; }
log() { echo "guest/build.sh: $*" >&2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$HERE/out"
CACHE="$HERE/out/cache"
EXTRA_MODULES=""
FORCE=0
while (($#)); do
  case "$1" in
    --out) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --cache) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; CACHE="$2"; shift 2 ;;
    --cache=*) CACHE="${1#*=}"; shift ;;
    --extra-modules) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; EXTRA_MODULES="$2"; shift 2 ;;
    --extra-modules=*) EXTRA_MODULES="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "guest/build.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Modules the guest needs for its virtio NIC and disks; the rest come from --extra-modules.
BASE_MODULES="virtio_pci virtio_net virtio_blk"
KERNEL_META="linux-image-cloud-amd64"
BUSYBOX_PKG="busybox-static"
AGENT_TARGET="x86_64-unknown-linux-gnu"
# Fixed timestamp for every archive entry: the same inputs give the same bytes.
EPOCH=0

for tool in apt-get apt-cache dpkg-deb depmod cpio gzip sha256sum cargo find sort awk; do
  command -v "$tool" >/dev/null || die "missing tool: $tool (hack/deps.sh installs what is needed)"
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/katamaran-guest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- the agent, static ---------------------------------------------------------------------------
# An explicit --target keeps these RUSTFLAGS away from the host builds in the shared target dir.
log "building katamaran-guest (static)"
# CARGO_ENCODED_RUSTFLAGS would override RUSTFLAGS (it is set when run from a cargo build script).
unset CARGO_ENCODED_RUSTFLAGS
if ! (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build --release --locked -p katamaran-guest-agent --target "$AGENT_TARGET") 2>"$WORK/cargo.log"; then
  cat "$WORK/cargo.log" >&2
  die "cargo build of katamaran-guest failed"
fi
TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
AGENT="${TARGET_DIR:-$ROOT/target}/$AGENT_TARGET/release/katamaran-guest"
[[ -x "$AGENT" ]] || die "built agent not found at $AGENT"
if LC_ALL=C readelf -l "$AGENT" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  die "$AGENT is dynamically linked; the initramfs has no libc"
fi

# --- Debian packages ------------------------------------------------------------------------------
# fetch PKG: prints the path of PKG's .deb in the cache, downloading the candidate version once.
fetch() {
  local pkg="$1" version deb
  version="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [[ -z "$version" || "$version" == "(none)" ]]; then
    # Offline but cached: use what is there rather than fail.
    deb="$(find "$CACHE" -maxdepth 1 -name "${pkg}_*.deb" | LC_ALL=C sort | tail -n1)"
    [[ -n "$deb" ]] || die_fetch "apt knows no candidate for $pkg (run: apt-get update)"
    log "apt has no candidate for $pkg; using cached $(basename "$deb")"
    echo "$deb"
    return
  fi
  # apt names files with the epoch's colon escaped: busybox-static_1%3a1.35.0-4_amd64.deb
  local pattern="${pkg}_${version//:/%3a}_*.deb"
  deb="$(find "$CACHE" -maxdepth 1 -name "$pattern" | head -n1)"
  if [[ -z "$deb" ]]; then
    log "downloading $pkg $version"
    (cd "$CACHE" && apt-get download -qq "$pkg=$version" 2>"$WORK/apt.err") \
      || { cat "$WORK/apt.err" >&2; die_fetch "apt-get download $pkg=$version failed"; }
    deb="$(find "$CACHE" -maxdepth 1 -name "$pattern" | head -n1)"
    [[ -n "$deb" ]] || die "apt-get download $pkg=$version left no $pattern in $CACHE"
  fi
  echo "$deb"
}

# The meta package's dependency names the versioned kernel image package.
KERNEL_PKG="$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
if [[ -z "$KERNEL_PKG" ]]; then
  cached="$(find "$CACHE" -maxdepth 1 -name 'linux-image-*-cloud-amd64_*.deb' | LC_ALL=C sort | tail -n1)"
  [[ -n "$cached" ]] || die_fetch "cannot resolve $KERNEL_META (run: apt-get update)"
  KERNEL_PKG="$(basename "$cached" | cut -d_ -f1)"
  log "apt cannot resolve $KERNEL_META; using cached $KERNEL_PKG"
fi
KERNEL_DEB="$(fetch "$KERNEL_PKG")"
BUSYBOX_DEB="$(fetch "$BUSYBOX_PKG")"
KERNEL_VERSION="$(dpkg-deb -f "$KERNEL_DEB" Version)"
BUSYBOX_VERSION="$(dpkg-deb -f "$BUSYBOX_DEB" Version)"

# --- up to date? ----------------------------------------------------------------------------------
EXTRA_SORTED="$(tr ',' ' ' <<<"$EXTRA_MODULES" | xargs -n1 | LC_ALL=C sort -u | tr '\n' ' ' | sed 's/ $//')"
INPUTS_HASH="$({
  sha256sum "$KERNEL_DEB" "$BUSYBOX_DEB" "$AGENT" "$HERE/init" "$HERE/build.sh" | awk '{print $1}'
  echo "modules: $BASE_MODULES | $EXTRA_SORTED"
} | sha256sum | awk '{print $1}')"
if ((FORCE == 0)) && [[ -f "$OUT/.inputs.sha256" && -f "$OUT/vmlinuz" && -f "$OUT/initramfs.img" && -f "$OUT/manifest.json" ]] \
  && [[ "$(cat "$OUT/.inputs.sha256")" == "$INPUTS_HASH" ]]; then
  log "up to date: $OUT (inputs $INPUTS_HASH)"
  exit 0
fi

# --- kernel and modules ---------------------------------------------------------------------------
log "extracting $KERNEL_PKG $KERNEL_VERSION"
dpkg-deb -x "$KERNEL_DEB" "$WORK/kernel"
KREL="$(basename "$(find "$WORK/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")"
[[ -n "$KREL" ]] || die "$KERNEL_PKG has no /lib/modules/<release>"
KMOD="$WORK/kernel/lib/modules/$KREL"
VMLINUZ="$WORK/kernel/boot/vmlinuz-$KREL"
CONFIG="$WORK/kernel/boot/config-$KREL"
[[ -f "$VMLINUZ" && -f "$CONFIG" ]] || die "$KERNEL_PKG lacks boot/vmlinuz-$KREL or boot/config-$KREL"
# The package ships no modules.dep (its postinst runs depmod): make one.
depmod -b "$WORK/kernel" "$KREL" || die "depmod failed for $KREL"

declare -A MOD_PATH=() VISITED=()
while IFS= read -r line; do
  path="${line%%:*}"
  name="$(basename "$path")"
  name="${name%%.ko*}"
  MOD_PATH["${name//-/_}"]="$path"
done <"$KMOD/modules.dep"

is_builtin() {
  local name="${1//-/_}"
  sed 's#.*/##; s#\.ko$##; s#-#_#g' "$KMOD/modules.builtin" | grep -qx "$name"
}

ORDER=()
# visit NAME: depth first, dependencies before the module (modules.dep lists them unordered
# for our purposes), each once.
visit() {
  local name="${1//-/_}" path deps dep
  [[ -z "${VISITED[$name]:-}" ]] || return 0
  VISITED["$name"]=1
  path="${MOD_PATH[$name]:-}"
  [[ -n "$path" ]] || die "module $name is in neither modules.dep nor modules.builtin of $KREL"
  deps="$(awk -F': *' -v p="$path" '$1 == p {print $2}' "$KMOD/modules.dep")"
  for dep in $deps; do
    dep="$(basename "$dep")"
    visit "${dep%%.ko*}"
  done
  ORDER+=("$path")
}

for m in $BASE_MODULES $EXTRA_SORTED; do
  if is_builtin "$m"; then
    log "module $m is built into $KREL"
  else
    visit "$m"
  fi
  # The config line a reader would check (when the symbol follows the module's name).
  cfg="$(grep -E "^CONFIG_${m^^}=" "$CONFIG" || true)"
  [[ -z "$cfg" ]] || log "  $cfg"
done
log "modules (load order): ${ORDER[*]##*/}"

# --- root file system -----------------------------------------------------------------------------
RFS="$WORK/root"
mkdir -p "$RFS"/{bin,dev,proc,sys,run,tmp,root,etc/katamaran,lib/modules}
dpkg-deb -x "$BUSYBOX_DEB" "$WORK/busybox"
install -m 0755 "$WORK/busybox/bin/busybox" "$RFS/bin/busybox"
for applet in $("$RFS/bin/busybox" --list); do
  [[ "$applet" == busybox ]] || ln -s busybox "$RFS/bin/$applet"
done
install -m 0755 "$AGENT" "$RFS/bin/katamaran-guest"
install -m 0755 "$HERE/init" "$RFS/init"
: >"$RFS/etc/katamaran/modules"
for path in "${ORDER[@]}"; do
  file="$(basename "$path")"
  case "$file" in
    *.ko) cp "$KMOD/$path" "$RFS/lib/modules/$file" ;;
    # busybox insmod reads plain ELF only: decompress here.
    *.ko.xz) xz -dc "$KMOD/$path" >"$RFS/lib/modules/${file%.xz}"; file="${file%.xz}" ;;
    *.ko.zst) zstd -qdc "$KMOD/$path" >"$RFS/lib/modules/${file%.zst}"; file="${file%.zst}" ;;
    *.ko.gz) gzip -dc "$KMOD/$path" >"$RFS/lib/modules/${file%.gz}"; file="${file%.gz}" ;;
    *) die "unknown module file type: $file" ;;
  esac
  echo "$file" >>"$RFS/etc/katamaran/modules"
done
echo "katamaran-guest" >"$RFS/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$RFS/etc/passwd"

# Reproducible archive: fixed modes and mtimes, sorted entries, owner 0, no inode numbers.
find "$RFS" -type d -exec chmod 0755 {} +
find "$RFS" -type f ! -perm -u+x -exec chmod 0644 {} +
find "$RFS" -exec touch -h -d "@$EPOCH" {} +
(cd "$RFS" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
  | gzip -n -9 >"$WORK/initramfs.img"
cp "$VMLINUZ" "$WORK/vmlinuz"

# --- outputs --------------------------------------------------------------------------------------
sha() { sha256sum "$1" | awk '{print $1}'; }
json_list() { local first=1 x; printf '['; for x in "$@"; do ((first)) || printf ', '; first=0; printf '"%s"' "$x"; done; printf ']'; }
mods=()
while IFS= read -r m; do mods+=("${m%.ko}"); done <"$RFS/etc/katamaran/modules"
read -r -a extra_arr <<<"$EXTRA_SORTED" || true
cat >"$WORK/manifest.json" <<EOF
{
  "kernel_package": "$KERNEL_PKG",
  "kernel_version": "$KERNEL_VERSION",
  "kernel_release": "$KREL",
  "busybox_package": "$BUSYBOX_PKG",
  "busybox_version": "$BUSYBOX_VERSION",
  "modules": $(json_list "${mods[@]}"),
  "extra_modules": $(json_list "${extra_arr[@]}"),
  "agent_sha256": "$(sha "$AGENT")",
  "inputs_sha256": "$INPUTS_HASH",
  "sha256": {
    "vmlinuz": "$(sha "$WORK/vmlinuz")",
    "initramfs.img": "$(sha "$WORK/initramfs.img")"
  }
}
EOF
for f in vmlinuz initramfs.img manifest.json; do
  mv -f "$WORK/$f" "$OUT/$f"
done
echo "$INPUTS_HASH" >"$OUT/.inputs.sha256"
log "built $OUT: vmlinuz ($KREL), initramfs.img ($(du -k "$OUT/initramfs.img" | cut -f1) KiB), manifest.json"
