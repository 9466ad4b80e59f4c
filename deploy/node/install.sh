#!/bin/sh
# katamaran node installer, run by the DaemonSet's init container (privileged, hostPID, the
# host's directories under $HOST_ROOT). Idempotent: a second run changes nothing and restarts
# nothing.
#
#   install.sh            install or update katamaran on this node
#   install.sh uninstall  remove everything install put on the node
#
# Environment (defaults in brackets):
#   HOST_ROOT           where the host's / is mounted [/host]
#   SRC_BIN             directory holding katamaran's binaries in the image [/usr/local/bin]
#   FILES_DIR           the drop-ins (ConfigMap katamaran-node-files) [/etc/katamaran-install]
#   HOST_IP             this node's address, the extensions' --node-address [none: warn]
#   KATA_SHIM           Kata's containerd-shim-kata-v2 on the host [searched]
#   KATA_CONFIG         Kata's QEMU configuration on the host [searched]
#   RESTART_CONTAINERD  restart containerd when its configuration changed [true]
#   HOST_EXEC           prefix that runs a command in the host's namespaces
#                       [nsenter --target 1 --mount --uts --ipc --net --pid --]
set -eu

HOST_ROOT=${HOST_ROOT:-/host}
SRC_BIN=${SRC_BIN:-/usr/local/bin}
FILES_DIR=${FILES_DIR:-/etc/katamaran-install}
RESTART_CONTAINERD=${RESTART_CONTAINERD:-true}
HOST_EXEC=${HOST_EXEC:-nsenter --target 1 --mount --uts --ipc --net --pid --}

BIN_DIR=/opt/katamaran/bin
KATA_DIR=/opt/katamaran/kata
SHIM_CONFIG=/etc/katamaran/shim.toml
CONTAINERD_CONFIG=/etc/containerd/config.toml
CONTAINERD_DROPIN=/etc/containerd/conf.d/katamaran.toml
IMPORTS='imports = ["/etc/containerd/conf.d/*.toml"]'
BINARIES="containerd-shim-katamaran-v2 katamaran-agent katactl"
MODULES="sch_plug ipip ip_gre ip6_tunnel ip6_gre"

log() { echo "katamaran-install: $*"; }
warn() { echo "katamaran-install: warning: $*" >&2; }
die() { echo "katamaran-install: error: $*" >&2; exit 1; }
host() { $HOST_EXEC "$@"; }

changed=false

# put SRC DEST MODE: atomic copy; notes whether DEST changed.
put() {
  if [ -f "$HOST_ROOT$2" ] && cmp -s "$1" "$HOST_ROOT$2"; then
    return 0
  fi
  mkdir -p "$(dirname "$HOST_ROOT$2")"
  cp "$1" "$HOST_ROOT$2.katamaran-new"
  chmod "$3" "$HOST_ROOT$2.katamaran-new"
  mv -f "$HOST_ROOT$2.katamaran-new" "$HOST_ROOT$2"
  log "installed $2"
  return 1
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

install() {
  for b in $BINARIES; do
    [ -x "$SRC_BIN/$b" ] || die "$SRC_BIN/$b missing from the image"
    put "$SRC_BIN/$b" "$BIN_DIR/$b" 0755 || true
  done

  # Kata: its QEMU configuration, copied so that only kata-katamaran pods get our drop-in.
  kata_config=${KATA_CONFIG:-$(host_find \
    /opt/kata/share/defaults/kata-containers/configuration-qemu.toml \
    /usr/share/defaults/kata-containers/configuration-qemu.toml \
    /etc/kata-containers/configuration.toml)} ||
    die "no Kata Containers QEMU configuration on this node (install Kata first, or set KATA_CONFIG)"
  tmp=$(mktemp)
  host cat "$kata_config" > "$tmp" || die "cannot read $kata_config on the host"
  put "$tmp" "$KATA_DIR/configuration-qemu.toml" 0644 || true
  rm -f "$tmp"
  put "$FILES_DIR/kata-50-katamaran.toml" "$KATA_DIR/config.d/50-katamaran.toml" 0644 || true

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
  put "$tmp" "$SHIM_CONFIG" 0644 || true
  rm -f "$tmp"

  # containerd: the runtime drop-in, and an imports line if the main configuration lacks one.
  put "$FILES_DIR/containerd-katamaran.toml" "$CONTAINERD_DROPIN" 0644 || changed=true
  main="$HOST_ROOT$CONTAINERD_CONFIG"
  if [ ! -e "$main" ]; then
    mkdir -p "$(dirname "$main")"
    printf 'version = 2\n%s  # added by katamaran\n' "$IMPORTS" > "$main"
    log "created $CONTAINERD_CONFIG importing conf.d"
    changed=true
  elif grep -q 'conf\.d' "$main"; then
    :
  elif grep -q '^[[:space:]]*imports[[:space:]]*=' "$main"; then
    warn "$CONTAINERD_CONFIG has an imports list without /etc/containerd/conf.d/*.toml: add it by hand"
  else
    cp "$main" "$main.katamaran-backup"
    { echo "$IMPORTS  # added by katamaran"; cat "$main.katamaran-backup"; } > "$main.katamaran-new"
    mv -f "$main.katamaran-new" "$main"
    log "added conf.d imports to $CONTAINERD_CONFIG (backup: $CONTAINERD_CONFIG.katamaran-backup)"
    changed=true
  fi

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
  for f in "$CONTAINERD_DROPIN" "$SHIM_CONFIG"; do
    if [ -e "$HOST_ROOT$f" ]; then
      rm -f "$HOST_ROOT$f"
      log "removed $f"
      changed=true
    fi
  done
  rm -rf "$HOST_ROOT/opt/katamaran" "$HOST_ROOT/etc/katamaran"
  log "removed /opt/katamaran and /etc/katamaran"
  # Only the line install added goes; later edits of the main configuration stay.
  main="$HOST_ROOT$CONTAINERD_CONFIG"
  if [ -f "$main" ] && grep -q '# added by katamaran$' "$main"; then
    sed -i '/# added by katamaran$/d' "$main"
    rm -f "$main.katamaran-backup"
    log "removed katamaran's imports line from $CONTAINERD_CONFIG"
    changed=true
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
