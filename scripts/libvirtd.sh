#!/usr/bin/env bash
# Makes qemu:///system usable in this container, and undoes only what it did.
#
#   scripts/libvirtd.sh start [HOLDER]   install what is missing, start virtlogd and libvirtd if
#                                        they are not running, wait until qemu:///system answers
#   scripts/libvirtd.sh stop [HOLDER]    drop HOLDER; when no live holder is left and no domain
#                                        runs, stop the daemons this script started (never one it
#                                        found running)
#   scripts/libvirtd.sh restart-libvirtd restart libvirtd only (for tests of an agent that must
#                                        reconnect); records it as started by us
#   scripts/libvirtd.sh status           what runs, what we started, who holds it
#   scripts/libvirtd.sh setup            only install what is missing and prepare the machine
#                                        (scripts/libvirt-hosts.sh runs daemons of its own)
#
# HOLDER is a process id (default: the caller's), so that two test runs sharing the daemons do not
# stop them under each other; holders whose process is gone no longer count. Both commands are
# idempotent. Machine facts behind the set-up are in shared/GUIDE.md section 3.
set -euo pipefail

STATE="${FASTCOMPUTE_LIBVIRTD_STATE:-/run/fastcompute-libvirtd}"
URI=qemu:///system
APT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils qemu-block-extra tgt)
QEMU_CONF=/etc/libvirt/qemu.conf

REAPER="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/reaper.py"
log() { echo "libvirtd.sh: $*" >&2; }

ensure_packages() {
  # shellcheck source=scripts/apt.sh
  source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
  local -a missing
  mapfile -t missing < <(apt_missing "${APT_PACKAGES[@]}")
  apt_install "$(basename "$0" .sh)" --no-install-recommends "${missing[@]}"
}

# The packages' maintainer scripts expect a systemd host: in a container the user and groups,
# the log directory and a qemu.conf that runs QEMU as root (no ownership games on our image
# files) are missing, and libvirtd refuses to start QEMU without them.
ensure_host_setup() {
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  id libvirt-qemu >/dev/null 2>&1 ||
    useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt /etc/libvirt
  touch "$QEMU_CONF"
  set_conf user '"root"'
  set_conf group '"root"'
}

# Sets KEY = VALUE in qemu.conf, replacing an active setting and leaving comments alone.
set_conf() {
  local key="$1" value="$2"
  if grep -qE "^\s*$key\s*=" "$QEMU_CONF"; then
    grep -qE "^\s*$key\s*=\s*$value\s*$" "$QEMU_CONF" || sed -i -E "s|^\s*$key\s*=.*|$key = $value|" "$QEMU_CONF"
  else
    echo "$key = $value" >>"$QEMU_CONF"
  fi
}

# The pid of a running daemon NAME, from its pid file, or nothing.
daemon_pid() {
  local name="$1" pid
  pid="$(cat "/run/$name.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ]; then
    echo "$pid"
    return
  fi
  # A daemon started without our pid file location (or by hand) still counts as running.
  pgrep -x "$name" | head -n1 || true
}

start_daemon() {
  local name="$1" pid
  pid="$(daemon_pid "$name")"
  if [ -n "$pid" ]; then
    return
  fi
  # Closing fd 9 keeps our lock out of the daemon, which would otherwise hold it for ever. The
  # daemon's umask is the distribution's, not the caller's: started from a test process whose
  # in-process agent set 077, libvirtd made vTPM state directories swtpm's user cannot enter.
  # reaper.py reaps the QEMUs libvirtd stops as soon as they exit (this machine's PID 1 takes
  # a second or two, and libvirtd waits for it each time a guest stops).
  (umask 022; setsid /usr/bin/python3 "$REAPER" "$name" -d </dev/null >>"$STATE/reaper.log" 2>&1 9>&- &)
  for _ in $(seq 100); do
    pid="$(daemon_pid "$name")"
    [ -n "$pid" ] && break
    sleep 0.1
  done
  [ -n "$pid" ] || { log "$name did not start"; exit 1; }
  echo "$pid" >"$STATE/started.$name"
  log "started $name (pid $pid)"
}

wait_ready() {
  for _ in $(seq 300); do
    virsh -q -c "$URI" version >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "$URI did not answer within 30 s"
  exit 1
}

live_holders() {
  local f pid
  for f in "$STATE"/holder.*; do
    [ -e "$f" ] || continue
    pid="${f##*/holder.}"
    if kill -0 "$pid" 2>/dev/null; then echo "$pid"; else rm -f "$f"; fi
  done
}

stop_started() {
  local name pid
  for name in libvirtd virtlogd; do
    [ -f "$STATE/started.$name" ] || continue
    pid="$(cat "$STATE/started.$name")"
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ]; then
      kill -TERM "$pid"
      for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      log "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/started.$name"
  done
}

cmd="${1:-status}"
holder="${2:-$PPID}"
mkdir -p "$STATE"
exec 9>"$STATE/.lock"
flock 9
case "$cmd" in
  start)
    ensure_packages
    ensure_host_setup
    start_daemon virtlogd
    start_daemon libvirtd
    touch "$STATE/holder.$holder"
    wait_ready
    echo "$URI"
    ;;
  stop)
    rm -f "$STATE/holder.$holder"
    active="$(virsh -q -c "$URI" list --name 2>/dev/null | grep . || true)"
    if [ -n "$(live_holders)" ]; then
      log "still held by: $(live_holders | tr '\n' ' ')"
    elif [ -n "$active" ]; then
      # QEMU outlives libvirtd: stopping it now would orphan these guests, whoever owns them.
      log "not stopping: domains still running: $(echo "$active" | tr '\n' ' ')"
    else
      stop_started
    fi
    ;;
  restart-libvirtd)
    pid="$(daemon_pid libvirtd)"
    if [ -n "$pid" ]; then
      kill -TERM "$pid"
      for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
    fi
    start_daemon libvirtd
    wait_ready
    ;;
  setup)
    ensure_packages
    ensure_host_setup
    ;;
  status)
    for name in virtlogd libvirtd; do
      pid="$(daemon_pid "$name")"
      started=no
      [ -f "$STATE/started.$name" ] && started=yes
      echo "$name pid=${pid:-none} started_by_us=$started"
    done
    echo "holders: $(live_holders | tr '\n' ' ')"
    ;;
  *)
    echo "usage: $0 start|stop [HOLDER] | restart-libvirtd | status | setup" >&2
    exit 2
    ;;
esac
