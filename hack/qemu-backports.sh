#!/usr/bin/env bash
# QEMU 10.x from Debian's bookworm-backports, unpacked into a private prefix next to Debian 12's
# own QEMU 7.2: nothing is installed system-wide and apt's own state is untouched. Prints the
# path of the unpacked qemu-system-x86_64, for KMR_QEMU (the lab), the agents' --qemu, or PATH
# (the two-QEMU tests look QEMU up on PATH).
#
#   hack/qemu-backports.sh [--prefix DIR]     (default: /var/cache/katamaran/qemu-backports)
#
#   PATH=$(dirname "$(hack/qemu-backports.sh)"):$PATH cargo nextest run --test qemu_phases
#
# Needs root only for apt's download of the package lists; the packages are unpacked with
# dpkg-deb -x. Run again to pick up a newer backport.
set -euo pipefail

prefix=/var/cache/katamaran/qemu-backports
while (($#)); do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "qemu-backports: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# apt reads relative Dir:: paths from /, not from here.
prefix=$(realpath -m "$prefix")
apt_dir=$prefix/apt
root=$prefix/root
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc"
echo "deb http://deb.debian.org/debian bookworm-backports main" >"$apt_dir/etc/sources.list"
opts=(
    -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache::Archives=$apt_dir/archives"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
)
apt-get "${opts[@]}" -qq update >&2
# apt-get update succeeds even when an index could not be fetched.
if ! compgen -G "$apt_dir/lists/*bookworm-backports*Packages*" >/dev/null; then
    echo "qemu-backports: no package index for bookworm-backports in $apt_dir/lists (network?)" >&2
    exit 1
fi
packages=(qemu-system-x86 qemu-system-common qemu-system-data)
(cd "$apt_dir/archives" && rm -f ./*.deb && apt-get "${opts[@]}" -qq download "${packages[@]/%//bookworm-backports}" >&2)
rm -rf "$root.new"
mkdir -p "$root.new"
for deb in "$apt_dir"/archives/*.deb; do
    dpkg-deb -x "$deb" "$root.new"
done
rm -rf "$root"
mv "$root.new" "$root"
qemu=$root/usr/bin/qemu-system-x86_64
missing=$(ldd "$qemu" | grep 'not found' || true)
if [[ -n $missing ]]; then
    echo "qemu-backports: $qemu lacks libraries:" >&2
    echo "$missing" >&2
    exit 1
fi
echo "qemu-backports: $("$qemu" --version | head -1) in $root" >&2
echo "$qemu"
