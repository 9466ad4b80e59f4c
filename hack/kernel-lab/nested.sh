#!/usr/bin/env bash
# Measures whether QEMU inside the kernel lab VM (nested TCG) is fast enough for a full migration
# there: boots the lab VM with this machine's qemu-system-x86_64 (and its libraries and
# firmware) inside, which boots the lab guest image and reports how long that took.
# A measurement for docs/KERNEL-LAB.md, not a test: it prints KERNEL-LAB-NESTED lines.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: hack/kernel-lab/nested.sh [--out DIR] [--deadline SECONDS] [--memory MB] [--help]

Needs the lab image (hack/kernel-lab/build.sh --out DIR) and qemu-system-x86_64 on this machine.
  --out DIR            lab image directory (default: .lab/kernel-lab); the nested image is written
                       to DIR/nested/ and the console to DIR/nested/console.log
  --deadline SECONDS   kill the outer VM after this long (default: 900)
  --memory MB          outer VM memory (default: 1024; the nested guest gets 128)
Prints: KERNEL-LAB-NESTED ready=<s> (nested QEMU start → the guest's READY line, seconds of
the outer VM's clock) and the nested guest's own uptime at READY.
EOF
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$ROOT/.lab/kernel-lab"
DEADLINE=900
MEMORY=1024
while (($#)); do
  case "$1" in
    --out) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --deadline) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; DEADLINE="$2"; shift 2 ;;
    --memory) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; MEMORY="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "kernel-lab/nested.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
QEMU="$(command -v qemu-system-x86_64)" || { echo "kernel-lab/nested.sh: qemu-system-x86_64 is not installed" >&2; exit 2; }
for f in "$OUT/vmlinuz" "$OUT/initramfs.img" "$OUT/guest/vmlinuz" "$OUT/guest/initramfs.img"; do
  [[ -f "$f" ]] || { echo "kernel-lab/nested.sh: missing $f (run hack/kernel-lab/build.sh)" >&2; exit 2; }
done
firmware() {
  local name="$1" dir
  for dir in /usr/share/qemu /usr/share/seabios; do
    [[ -f "$dir/$name" ]] && { echo "$dir/$name"; return; }
  done
  echo "kernel-lab/nested.sh: firmware $name not found" >&2
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/katamaran-nested.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
RFS="$WORK/root"
mkdir -p "$RFS/nested/fw" "$RFS/bin"
# The binary, at its own path (it finds its modules relative to it), and every library the
# loader resolves, at the same paths.
install -D -m 0755 "$QEMU" "$RFS/usr/bin/qemu-system-x86_64"
for lib in $(ldd "$QEMU" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | sort -u); do
  install -D -m 0755 "$(readlink -f "$lib")" "$RFS$lib"
done
# Debian builds the TCG accelerator as a loadable module of QEMU's.
MODDIR=/usr/lib/x86_64-linux-gnu/qemu
install -D -m 0755 "$MODDIR/accel-tcg-x86_64.so" "$RFS$MODDIR/accel-tcg-x86_64.so"
for fw in bios-256k.bin linuxboot_dma.bin kvmvapic.bin; do
  cp "$(firmware "$fw")" "$RFS/nested/fw/$fw"
done
cp "$OUT/guest/vmlinuz" "$OUT/guest/initramfs.img" "$RFS/nested/"
cat >"$RFS/init" <<'INIT'
#!/bin/sh
# Nested-QEMU measurement: PID 1 of the outer lab VM.
PATH=/bin
export PATH
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
echo "KERNEL-LAB-KERNEL $(uname -r)"
up() { cut -d' ' -f1 /proc/uptime; }
start="$(up)"
/usr/bin/qemu-system-x86_64 -L /nested/fw -accel tcg,tb-size=64 -m 128 -nodefaults -no-reboot -display none \
  -serial file:/tmp/nested.log -monitor none \
  -kernel /nested/vmlinuz -initrd /nested/initramfs.img \
  -append "console=ttyS0 quiet panic=-1 katamaran.ip=10.0.2.15/24 katamaran.id=nested" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= &
qemu=$!
ready=""
while kill -0 "$qemu" 2>/dev/null; do
  if grep -q KATAMARAN-GUEST-READY /tmp/nested.log 2>/dev/null; then ready="$(up)"; break; fi
  if grep -q KATAMARAN-GUEST-FAILED /tmp/nested.log 2>/dev/null; then break; fi
  usleep 200000
done
grep -a KATAMARAN-GUEST /tmp/nested.log
if [ -n "$ready" ]; then
  echo "KERNEL-LAB-NESTED ready=$(awk -v a="$start" -v b="$ready" 'BEGIN {printf "%.1f", b - a}')s" \
    "guest=$(grep -a -o 'uptime=[0-9.]*s' /tmp/nested.log | head -n1)"
else
  echo "KERNEL-LAB-NESTED failed (qemu ended or the guest failed)"
  tail -n 20 /tmp/nested.log
fi
kill "$qemu" 2>/dev/null
poweroff -f
INIT
chmod 0755 "$RFS/init"
(cd "$RFS" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -1 >"$WORK/nested.cpio.gz"
mkdir -p "$OUT/nested"
cat "$OUT/initramfs.img" "$WORK/nested.cpio.gz" >"$OUT/nested/initramfs.img"
echo "kernel-lab/nested.sh: nested image $(du -k "$OUT/nested/initramfs.img" | cut -f1) KiB; booting" >&2

timeout --kill-after=10 "$DEADLINE" \
  qemu-system-x86_64 -accel tcg -m "$MEMORY" -smp 2 \
    -kernel "$OUT/vmlinuz" -initrd "$OUT/nested/initramfs.img" -append "console=ttyS0 quiet panic=-1" \
    -nographic -no-reboot -nic none </dev/null 2>&1 | tee "$OUT/nested/console.log"
grep -a -q "KERNEL-LAB-NESTED ready=" "$OUT/nested/console.log"
