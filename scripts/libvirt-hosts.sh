#!/usr/bin/env bash
# Several libvirt hosts on one machine, for tests of what moves between hosts (live migration).
#
#   scripts/libvirt-hosts.sh start NAME   a host NAME: its own network namespace fc-NAME, joined
#                                         to the others by the bridge fchosts0, and in it a
#                                         libvirtd of its own listening on TCP; prints its
#                                         address and URI (qemu+tcp://ADDRESS/system)
#   scripts/libvirt-hosts.sh stop NAME    stop its daemon and its guests, remove the namespace
#   scripts/libvirt-hosts.sh status       the hosts there are
#
# Each host's libvirtd runs in a private mount and UTS namespace inside the network namespace:
# a tmpfs over /run/libvirt and, over /var/lib/libvirt, /etc/libvirt, /var/log/libvirt and
# /var/cache/libvirt, directories of its own under $FASTCOMPUTE_HOSTS_STATE/NAME (a copy of the
# machine's /etc/libvirt). It has a host UUID of its own (libvirt refuses to migrate to a host
# with its own UUID, and this machine has no SMBIOS to give one), listens on its address with
# no authentication (tests only: the namespaces are reachable from this machine alone), runs
# QEMU as root, writes guests' output to files (no virtlogd) and is started under the name
# libvirtd-NAME, so that nothing looking for the system libvirtd by name finds it. Facts behind
# this are in shared/GUIDE.md section 3; the packages are scripts/libvirtd.sh's.
set -euo pipefail

STATE="${FASTCOMPUTE_HOSTS_STATE:-/run/fastcompute-hosts}"
BRIDGE=fchosts0
NET=10.251.0
REAPER="$(cd "$(dirname "$0")" && pwd)/reaper.py"
log() { echo "libvirt-hosts.sh: $*" >&2; }

# A host's number (its address's last byte): the first free one from 2, kept in its directory.
host_number() {
  local name="$1" n
  if [ -f "$STATE/$name/number" ]; then cat "$STATE/$name/number"; return; fi
  for n in $(seq 2 250); do
    grep -qx "$n" "$STATE"/*/number 2>/dev/null || { echo "$n"; return; }
  done
  log "no free host number"; exit 1
}

ensure_bridge() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
}

ensure_namespace() {
  local name="$1" n="$2" ns="fc-$1" outer="fch$2" inner="fcg$2"
  ip netns list | grep -qw "^$ns" || ip netns add "$ns"
  if ! ip link show "$outer" >/dev/null 2>&1; then
    ip link add "$outer" type veth peer name "$inner"
    ip link set "$inner" netns "$ns"
    ip link set "$outer" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$inner" name eth0
    ip -n "$ns" addr add "$NET.$n/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$NET.1"
  fi
}

write_config() {
  local name="$1" n="$2" dir="$STATE/$1" addr="$NET.$2"
  mkdir -p "$dir"/{lib,log,cache,run}
  if [ ! -d "$dir/etc" ]; then
    cp -a /etc/libvirt "$dir/etc"
    # The machine's qemu.conf (scripts/libvirtd.sh's settings) is the start; ours are appended
    # last, so that they win.
    cat >>"$dir/etc/qemu.conf" <<EOF
user = "root"
group = "root"
migration_address = "$addr"
stdio_handler = "file"
remember_owner = 0
EOF
    cat >"$dir/etc/libvirtd.conf" <<EOF
listen_tls = 0
listen_tcp = 1
listen_addr = "$addr"
auth_tcp = "none"
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
EOF
  fi
  mkdir -p "$dir/lib/qemu" "$dir/lib/images" "$dir/log/qemu" "$dir/cache/qemu"
  echo "$n" >"$dir/number"
}

running_pid() {
  local pid
  pid="$(cat "$STATE/$1/libvirtd.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "libvirtd-$1" ]; then echo "$pid"; fi
}

# What the hosts' resolver sees (`ip netns exec` puts /etc/netns/NS/* over /etc/*): every
# host's name, so that libvirt's default URIs (the NBD server of a storage migration is named
# by the destination's host name) resolve at once; and no name server, so that any other
# look-up fails at once instead of timing out on one this namespace cannot reach.
write_names() {
  local d n hosts="127.0.0.1 localhost"$'\n'
  for d in "$STATE"/*/; do
    [ -f "$d/number" ] || continue
    n="$(basename "$d")"
    hosts+="$NET.$(cat "$d/number") fc-$n"$'\n'
  done
  for d in "$STATE"/*/; do
    [ -f "$d/number" ] || continue
    n="$(basename "$d")"
    mkdir -p "/etc/netns/fc-$n"
    printf '%s' "$hosts" >"/etc/netns/fc-$n/hosts"
    echo "nameserver 127.0.0.1" >"/etc/netns/fc-$n/resolv.conf"
  done
}

start_daemon() {
  local name="$1" dir="$STATE/$1"
  [ -n "$(running_pid "$name")" ] && return
  ln -sf /usr/sbin/libvirtd "$dir/libvirtd-$name"
  # The daemon's own mount namespace holds the bind mounts; they go when it exits.
  ip netns exec "fc-$name" unshare --mount --uts --propagation private bash -c "
    set -e
    hostname 'fc-$name'
    mount -t tmpfs tmpfs /run/libvirt 2>/dev/null || { mkdir -p /run/libvirt; mount -t tmpfs tmpfs /run/libvirt; }
    for d in lib:/var/lib/libvirt etc:/etc/libvirt log:/var/log/libvirt cache:/var/cache/libvirt; do
      mkdir -p \"\${d#*:}\"
      mount --bind '$dir'/\"\${d%%:*}\" \"\${d#*:}\"
    done
    umask 022
    # Under reaper.py, which reaps the QEMUs that libvirtd kills as soon as they exit (see there).
    setsid /usr/bin/python3 '$REAPER' '$dir/libvirtd-$name' --listen -d -p '$dir/libvirtd.pid' \
      </dev/null >>'$dir/reaper.log' 2>&1 9>&- &
  "
  for _ in $(seq 100); do [ -n "$(running_pid "$name")" ] && return; sleep 0.1; done
  log "libvirtd-$name did not start: $(cat "$dir/reaper.log" 2>/dev/null)"; exit 1
}

wait_ready() {
  local uri="$1"
  for _ in $(seq 600); do
    virsh -q -c "$uri" version >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "$uri did not answer within 60 s"; exit 1
}

stop_host() {
  local name="$1" dir="$STATE/$1" pid n
  pid="$(running_pid "$name")"
  if [ -n "$pid" ]; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  # Guests outlive their libvirtd: whatever still runs in the namespace goes with it.
  if ip netns list | grep -qw "^fc-$name"; then
    for pid in $(ip netns pids "fc-$name" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "fc-$name"
  fi
  n="$(cat "$dir/number" 2>/dev/null || true)"
  [ -n "$n" ] && ip link del "fch$n" 2>/dev/null || true
  rm -rf "$dir" "/etc/netns/fc-$name"
  write_names
  if [ -z "$(ls -A "$STATE" 2>/dev/null | grep -v '^\.' || true)" ]; then ip link del "$BRIDGE" 2>/dev/null || true; fi
}

cmd="${1:-status}"
mkdir -p "$STATE"
exec 9>"$STATE/.lock"
flock 9
case "$cmd" in
  start)
    name="${2:?usage: $0 start NAME}"
    [[ "$name" =~ ^[a-z0-9]{1,8}$ ]] || { log "a host name is 1-8 lower-case letters or digits"; exit 2; }
    bash "$(dirname "$0")/libvirtd.sh" setup
    n="$(host_number "$name")"
    ensure_bridge
    ensure_namespace "$name" "$n"
    write_config "$name" "$n"
    write_names
    # libvirtd probes every QEMU binary at its first start (seconds); the probe's results are
    # the same for every host here, and libvirt checks a cached one against the binaries, the
    # kernel and the CPU before it trusts it.
    caps="$STATE/$name/cache/qemu/capabilities"
    if [ -d "$STATE/.qemu-capabilities" ]; then mkdir -p "$caps" && cp -a "$STATE/.qemu-capabilities/." "$caps/"; fi
    start_daemon "$name"
    uri="qemu+tcp://$NET.$n/system"
    wait_ready "$uri"
    [ -d "$STATE/.qemu-capabilities" ] || cp -a "$caps" "$STATE/.qemu-capabilities"
    echo "$NET.$n $uri"
    ;;
  stop)
    stop_host "${2:?usage: $0 stop NAME}"
    ;;
  status)
    for d in "$STATE"/*/; do
      [ -d "$d" ] || continue
      name="$(basename "$d")"
      echo "$name address=$NET.$(cat "$d/number") pid=$(running_pid "$name")"
    done
    ;;
  *)
    echo "usage: $0 start NAME | stop NAME | status" >&2
    exit 2
    ;;
esac
