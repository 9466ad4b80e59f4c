#!/bin/sh
# katamaran node installer, run by the DaemonSet's init container (privileged, hostPID, the
# host's directories under $HOST_ROOT). Idempotent: a second run changes nothing and restarts
# nothing. Exits non-zero, so that the init container fails visibly, when it cannot register the
# runtime with containerd: it asks the host's own containerd (`containerd config dump`) whether
# the runtime is there before it restarts anything.
#
#   install.sh            install or update katamaran on this node
#   install.sh uninstall  remove everything install put on the node
#
# containerd: katamaran's runtime tables go into the main configuration between BEGIN/END marks,
# in the syntax of its version: 2 (containerd 1.6/1.7; plugins."io.containerd.grpc.v1.cri") or
# 3 (containerd 2.x; plugins."io.containerd.cri.v1.runtime"); a missing file is created. The
# node's `imports` (kata-deploy's /opt/kata/containerd/config.d/ drop-in) are left as they are.
#
# Environment (defaults in brackets):
#   HOST_ROOT           where the host's / is mounted [/host]
#   SRC_BIN             directory holding katamaran's binaries in the image [/usr/local/bin]
#   FILES_DIR           the drop-ins (ConfigMap katamaran-node-files) [/etc/katamaran-install]
#   HOST_IP             this node's address, the extensions' --node-address [none: warn]
#   KATA_SHIM           Kata's containerd-shim-kata-v2 on the host [searched]
#   KATA_CONFIG         Kata's QEMU configuration on the host [searched]
#   CONTAINERD_CONFIG   containerd's main configuration on the host [/etc/containerd/config.toml]
#   CONTAINERD          the host's containerd binary, asked to check the result [containerd]
#   RESTART_CONTAINERD  restart containerd when its configuration changed [true]
#   HOST_EXEC           prefix that runs a command in the host's namespaces
#                       [nsenter --target 1 --mount --uts --ipc --net --pid --]
set -eu

HOST_ROOT=${HOST_ROOT:-/host}
SRC_BIN=${SRC_BIN:-/usr/local/bin}
FILES_DIR=${FILES_DIR:-/etc/katamaran-install}
RESTART_CONTAINERD=${RESTART_CONTAINERD:-true}
HOST_EXEC=${HOST_EXEC:-nsenter --target 1 --mount --uts --ipc --net --pid --}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
CONTAINERD=${CONTAINERD:-containerd}

BIN_DIR=/opt/katamaran/bin
KATA_DIR=/opt/katamaran/kata
SHIM_CONFIG=/etc/katamaran/shim.toml
# Where installers before this one put the runtime (an imported drop-in); removed on sight.
LEGACY_DROPIN=/etc/containerd/conf.d/katamaran.toml
# The RuntimeClass handler = the containerd runtime's name, and its shim type.
HANDLER=kata-katamaran
RUNTIME_TYPE=io.containerd.katamaran.v2
# Where each configuration version keeps CRI runtimes.
CRI_V2='plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
CRI_V3='plugins."io.containerd.cri.v1.runtime".containerd.runtimes'
MARK='# added by katamaran'
BEGIN_MARK='# BEGIN katamaran runtime (deploy/node/install.sh; removed by its uninstall)'
END_MARK='# END katamaran runtime'
BINARIES="containerd-shim-katamaran-v2 katamaran-agent katactl"
MODULES="sch_plug ipip ip_gre ip6_tunnel ip6_gre"

log() { echo "katamaran-install: $*"; }
warn() { echo "katamaran-install: warning: $*" >&2; }
die() { echo "katamaran-install: error: $*" >&2; exit 1; }
host() { $HOST_EXEC "$@"; }

changed=false

# put SRC DEST MODE: atomic copy when DEST differs. Every failure ends the script.
put() {
  if [ -f "$HOST_ROOT$2" ] && cmp -s "$1" "$HOST_ROOT$2"; then
    return 0
  fi
  mkdir -p "$(dirname "$HOST_ROOT$2")" || die "cannot create $(dirname "$2") on the host"
  cp "$1" "$HOST_ROOT$2.katamaran-new" || die "cannot write $2 on the host"
  chmod "$3" "$HOST_ROOT$2.katamaran-new"
  mv -f "$HOST_ROOT$2.katamaran-new" "$HOST_ROOT$2" || die "cannot write $2 on the host"
  log "installed $2"
}

# host_find PATH...: the first path that exists on the host (Kata may live anywhere there).
host_find() {
  for p in "$@"; do
    if host test -e "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

restart_containerd() {
  if [ "$RESTART_CONTAINERD" != true ]; then
    warn "containerd's configuration changed; restart containerd to pick it up (RESTART_CONTAINERD=$RESTART_CONTAINERD)"
    return 0
  fi
  log "restarting containerd (running containers keep running: their shims are separate processes)"
  host systemctl restart containerd || warn "could not restart containerd; restart it by hand"
}

# config_version FILE: the root `version` of a containerd configuration (keys before the first
# table header); "none" when absent.
config_version() {
  awk '
    /^[[:space:]]*\[/ { exit }
    /^[[:space:]]*version[[:space:]]*=/ { v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); sub(/[[:space:]]*(#.*)?$/, "", v); print v; found = 1; exit }
    END { if (!found) print "none" }
  ' "$1"
}

# has_tables FILE: whether the configuration has any table (so a missing version means 1).
has_tables() {
  grep -q '^[[:space:]]*\[' "$1"
}

# without_ours FILE: the configuration without what any katamaran install added (the runtime
# block, marked lines, the drop-in import of earlier installers).
without_ours() {
  awk -v begin="$BEGIN_MARK" -v end="$END_MARK" -v mark="$MARK" -v entry="\"$LEGACY_DROPIN\", " '
    $0 == begin { skipping = 1; next }
    skipping { if ($0 == end) skipping = 0; next }
    substr($0, length($0) - length(mark) + 1) == mark { next }
    { i = index($0, entry); if (i) $0 = substr($0, 1, i - 1) substr($0, i + length(entry)); print }
  ' "$1"
}

# runtime_block VERSION: the runtime tables between the markers, in the syntax of the main
# configuration's version (the ConfigMap's file is version 2; version 3 keeps runtimes in the
# CRI runtime plugin).
runtime_block() {
  grep -q '^version = 2$' "$FILES_DIR/containerd-katamaran.toml" ||
    die "$FILES_DIR/containerd-katamaran.toml is not a version 2 containerd configuration"
  echo "$BEGIN_MARK"
  if [ "$1" = 3 ]; then
    echo "# (version 3 form of deploy/containerd/katamaran.toml)"
    grep -v '^version = ' "$FILES_DIR/containerd-katamaran.toml" |
      sed 's/"io\.containerd\.grpc\.v1\.cri"\.containerd\.runtimes/"io.containerd.cri.v1.runtime".containerd.runtimes/g'
  else
    grep -v '^version = ' "$FILES_DIR/containerd-katamaran.toml"
  fi
  echo "$END_MARK"
}

# write_main SRC: replaces the main configuration with SRC (atomically); dies when it cannot.
write_main() {
  main="$HOST_ROOT$CONTAINERD_CONFIG"
  if ! { cp "$1" "$main.katamaran-new" && mv -f "$main.katamaran-new" "$main"; } 2>/dev/null; then
    rm -f "$main.katamaran-new" 2>/dev/null || true
    die "cannot write $CONTAINERD_CONFIG on the host"
  fi
}

# register_runtime: katamaran's runtime tables in containerd's main configuration, then the
# host's containerd asked whether it sees the runtime; dies (the main configuration restored)
# when it does not.
#
# The tables go into the main file, not into an imported drop-in: containerd before 2.0 merges
# imports a whole plugin section at a time, so a drop-in that names the CRI plugin replaces the
# node's whole CRI configuration (sandbox image, runc's options, registries). Imports the node
# has (kata-deploy's on containerd 2.x) are kept as they are.
register_runtime() {
  main="$HOST_ROOT$CONTAINERD_CONFIG"
  main_state=kept # kept | created | edited
  tmp=$(mktemp)
  if [ ! -e "$main" ]; then
    version=2 # read by containerd 1.6 to 2.x
    mkdir -p "$(dirname "$main")" || die "cannot create $(dirname "$CONTAINERD_CONFIG") on the host"
    { echo "version = 2  $MARK"; runtime_block 2; } > "$tmp"
    write_main "$tmp"
    main_state=created
    log "created $CONTAINERD_CONFIG with runtime $HANDLER"
  else
    if [ ! -f "$main" ] || [ ! -r "$main" ]; then
      die "$CONTAINERD_CONFIG is not a readable file"
    fi
    without_ours "$main" > "$tmp.base"
    version=$(config_version "$tmp.base")
    add_version=false
    if [ "$version" = none ] && ! has_tables "$tmp.base"; then
      version=2 add_version=true # nothing configured yet
    fi
    case "$version" in
      2|3) ;;
      none|1) rm -f "$tmp" "$tmp.base"
              die "$CONTAINERD_CONFIG is a version 1 configuration: migrate it (containerd config migrate, containerd >= 1.7) and run again" ;;
      *) rm -f "$tmp" "$tmp.base"; die "$CONTAINERD_CONFIG has version = $version; this installer knows versions 2 and 3" ;;
    esac
    {
      [ "$add_version" = false ] || echo "version = 2  $MARK"
      cat "$tmp.base"
      # The block starts on a line of its own.
      [ -z "$(tail -c 1 "$tmp.base")" ] || echo
      runtime_block "$version"
    } > "$tmp"
    rm -f "$tmp.base"
    if ! cmp -s "$tmp" "$main"; then
      cp -p "$main" "$main.katamaran-backup" 2>/dev/null || die "cannot back up $CONTAINERD_CONFIG on the host"
      write_main "$tmp"
      main_state=edited
      log "added runtime $HANDLER to $CONTAINERD_CONFIG (backup: $CONTAINERD_CONFIG.katamaran-backup)"
    fi
  fi
  rm -f "$tmp"
  if [ -e "$HOST_ROOT$LEGACY_DROPIN" ]; then
    rm -f "$HOST_ROOT$LEGACY_DROPIN" || die "cannot remove $LEGACY_DROPIN"
    log "removed $LEGACY_DROPIN of an earlier katamaran (its runtime is now in $CONTAINERD_CONFIG)"
    changed=true
  fi
  [ "$main_state" = kept ] || changed=true

  # containerd's own reading of the result, before anything restarts.
  table="$CRI_V2.$HANDLER"
  [ "$version" = 2 ] || table="$CRI_V3.$HANDLER"
  if ! dump=$(host "$CONTAINERD" --config "$CONTAINERD_CONFIG" config dump 2>&1); then
    restore_main
    die "containerd cannot read $CONTAINERD_CONFIG with katamaran's runtime (the original is back): $dump"
  fi
  if ! printf '%s\n' "$dump" | awk -v header="[$table]" -v want="runtime_type = \"$RUNTIME_TYPE\"" '
      { line = $0; gsub(/^[[:space:]]+|[[:space:]]+$/, "", line) }
      line == header { inside = 1; next }
      inside && substr(line, 1, 1) == "[" { inside = 0 }
      inside && line == want { found = 1 }
      END { exit !found }'; then
    restore_main
    die "containerd does not see runtime $HANDLER ($RUNTIME_TYPE) in [$table] (an imported file may replace the CRI section: containerd before 2.0 merges imports a whole plugin at a time); the original $CONTAINERD_CONFIG is back"
  fi
  log "containerd sees runtime $HANDLER (runtime_type $RUNTIME_TYPE, configuration version $version)"
}

# restore_main: undoes this run's change of the main configuration.
restore_main() {
  main="$HOST_ROOT$CONTAINERD_CONFIG"
  case "$main_state" in
    created) rm -f "$main" ;;
    edited) mv -f "$main.katamaran-backup" "$main" ;;
  esac
}

install() {
  for b in $BINARIES; do
    [ -x "$SRC_BIN/$b" ] || die "$SRC_BIN/$b missing from the image"
    put "$SRC_BIN/$b" "$BIN_DIR/$b" 0755
  done

  # Kata: its QEMU configuration, copied so that only kata-katamaran pods get our drop-in.
  kata_config=${KATA_CONFIG:-$(host_find \
    /opt/kata/share/defaults/kata-containers/configuration-qemu.toml \
    /usr/share/defaults/kata-containers/configuration-qemu.toml \
    /etc/kata-containers/configuration.toml)} ||
    die "no Kata Containers QEMU configuration on this node (install Kata first, or set KATA_CONFIG)"
  tmp=$(mktemp)
  host cat "$kata_config" > "$tmp" || die "cannot read $kata_config on the host"
  put "$tmp" "$KATA_DIR/configuration-qemu.toml" 0644
  rm -f "$tmp"
  put "$FILES_DIR/kata-50-katamaran.toml" "$KATA_DIR/config.d/50-katamaran.toml" 0644

  kata_shim=${KATA_SHIM:-$(host_find \
    /opt/kata/bin/containerd-shim-kata-v2 \
    /usr/local/bin/containerd-shim-kata-v2 \
    /usr/bin/containerd-shim-kata-v2)} ||
    die "containerd-shim-kata-v2 not found on this node (install Kata first, or set KATA_SHIM)"

  # The wrapper's configuration.
  tmp=$(mktemp)
  {
    echo "# Written by the katamaran DaemonSet (deploy/node/install.sh); changes are overwritten."
    echo "delegate = \"$kata_shim\""
    echo "agent = \"$BIN_DIR/katamaran-agent\""
    if [ -n "${HOST_IP:-}" ]; then
      echo "node_address = [\"$HOST_IP\"]"
    fi
  } > "$tmp"
  [ -n "${HOST_IP:-}" ] || warn "HOST_IP unset: extensions get no --node-address and cannot be a migration source"
  put "$tmp" "$SHIM_CONFIG" 0644
  rm -f "$tmp"

  register_runtime

  # Kernel modules of the production path; without them katamaran falls back (route mode,
  # tap-queue buffering) and says so per migration.
  for m in $MODULES; do
    host modprobe "$m" >/dev/null 2>&1 || warn "kernel module $m not available: migrations fall back (see docs/INSTALL.md)"
  done

  if [ "$changed" = true ]; then
    restart_containerd
  fi
  log "done"
}

uninstall() {
  for f in "$LEGACY_DROPIN" "$SHIM_CONFIG"; do
    if [ -e "$HOST_ROOT$f" ]; then
      rm -f "$HOST_ROOT$f"
      log "removed $f"
      changed=true
    fi
  done
  rm -rf "$HOST_ROOT/opt/katamaran" "$HOST_ROOT/etc/katamaran"
  log "removed /opt/katamaran and /etc/katamaran"
  # Only what install added goes (the runtime block, its marked lines); later edits of the main
  # configuration stay.
  main="$HOST_ROOT$CONTAINERD_CONFIG"
  if [ -f "$main" ]; then
    tmp=$(mktemp)
    without_ours "$main" > "$tmp"
    if ! cmp -s "$tmp" "$main"; then
      if grep -q '[^[:space:]]' "$tmp"; then
        write_main "$tmp"
      else
        rm -f "$main" # install created it: nothing of the host's is in it
      fi
      log "removed runtime $HANDLER from $CONTAINERD_CONFIG"
      changed=true
    fi
    rm -f "$tmp" "$main.katamaran-backup"
  fi
  if [ "$changed" = true ]; then
    restart_containerd
  fi
  log "done"
}

case "${1:-install}" in
  install) install ;;
  uninstall) uninstall ;;
  *) die "usage: install.sh [install|uninstall]" ;;
esac
