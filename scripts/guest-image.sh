#!/usr/bin/env bash
# Builds the project's own cloud-style guest image and prints its path on stdout (last line).
#
# The image is a raw disk holding a FAT file system with syslinux in its boot sector, a Debian
# cloud kernel (unpacked from the Debian package, not installed) and a busybox-static initramfs,
# so a guest boots it BIOS -> syslinux -> kernel exactly as it would boot a cloud image, from a
# qcow2 overlay. The same file system is an EFI system partition too: UEFI firmware (OVMF) finds
# systemd-boot at the removable-media path EFI/BOOT/BOOTX64.EFI, which boots the same kernel and
# initramfs with the same command line. Everything is made without mounting anything (mkfs.vfat, syslinux, mcopy), so it
# works in an unprivileged-looking container as well. docs/GUESTS.md describes what the guest does.
#
# The result is cached under .cache/guest-image/<hash of this script>/disk.img (or
# $FASTCOMPUTE_GUEST_CACHE/<hash>/disk.img): a changed script builds a new image, an unchanged one
# costs a hash. Concurrent callers wait on a lock and share the one build.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(dirname "$(dirname "$SCRIPT")")"
CACHE_ROOT="${FASTCOMPUTE_GUEST_CACHE:-$REPO/.cache/guest-image}"
KEY="$(sha256sum "$SCRIPT" | cut -c1-16)"
OUT_DIR="$CACHE_ROOT/$KEY"
IMAGE="$OUT_DIR/disk.img"
IMAGE_MIB=32
# The modules the init loads, in dependency order (the package ships no modules.dep: depmod
# runs at install time, and we do not install).
MODULES=(
  drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
  drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk
  net/core/failover drivers/net/net_failover drivers/net/virtio_net
  drivers/acpi/button drivers/input/evdev
  # the guest agent's virtio-serial port (org.qemu.guest_agent.0), answered by /bin/fc-qga
  drivers/char/virtio_console
  # the config drive: an IDE CD-ROM (ata_piix on the pc machine type) holding ISO 9660
  drivers/scsi/scsi_common drivers/scsi/scsi_mod drivers/ata/libata drivers/ata/ata_piix
  drivers/cdrom/cdrom drivers/scsi/sr_mod fs/isofs/isofs
)
APT_PACKAGES=(syslinux syslinux-common mtools dosfstools busybox-static cpio systemd-boot-efi)
# Under TCG on a loaded host the vCPU can miss the kernel's early timer check, which then
# panics ("IO-APIC + timer doesn't work"), and the TSC calibrates wrong, so uptime ran several
# times faster than the wall clock: skip the check and keep time by the HPET.
CMDLINE="console=ttyS0 quiet no_timer_check clocksource=hpet"

log() { echo "guest-image: $*" >&2; }

ensure_packages() {
  # shellcheck source=scripts/apt.sh
  source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
  local -a missing
  mapfile -t missing < <(apt_missing "${APT_PACKAGES[@]}")
  apt_install "$(basename "$0" .sh)" "${missing[@]}"
}

# The init of the guest. It runs as PID 1 from the initramfs and must never exit (the kernel
# would panic), so after its checks it waits for the ACPI power button forever.
write_init() {
  cat >"$1" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node, so PID 1 starts without output: talk to the serial port.
exec </dev/ttyS0 >/dev/ttyS0 2>&1
for m in $(cat /etc/modules); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
# acpid turns the power button (an input event from the button driver) into /etc/acpi/PWRF/*.
# It starts before the marker, so that a host which saw the marker can rely on ACPI power-off
# and reboot; a press before this point is lost.
acpid -c /etc/acpi -l /dev/null
# The guest agent (docs/GUESTS.md), in the background: it waits for its port.
fc-qga </dev/null &

uuid=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null || echo unknown)
read -r up _ </proc/uptime
clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)
echo "FASTCOMPUTE-GUEST-UP uptime=$up uuid=$uuid clock=${clock:-unknown}"
# The firmware the guest booted from, and its TPM (the CRB and TIS drivers are built in).
[ -d /sys/firmware/efi ] && echo "FASTCOMPUTE-EFI bits=$(cat /sys/firmware/efi/fw_platform_size 2>/dev/null)"
[ -c /dev/tpm0 ] && echo "FASTCOMPUTE-TPM dev=/dev/tpm0 version=$(cat /sys/class/tpm/tpm0/tpm_version_major)"

# Read our own boot disk: the first MiB through the block layer, so a host can check that the
# guest sees the bytes it was given.
dev=none
for i in 1 2 3 4 5 6 7 8 9 10; do
  for d in vda sda; do [ -b /dev/$d ] && dev=$d && break 2; done
  sleep 0.2
done
if [ "$dev" != none ]; then
  sum=$(dd if=/dev/$dev bs=1048576 count=1 2>/dev/null | md5sum | cut -d' ' -f1)
  echo "FASTCOMPUTE-DISK dev=$dev bytes=1048576 md5=$sum"
else
  echo "FASTCOMPUTE-DISK dev=none"
fi

# Per-guest settings come as fc.KEY=VALUE words, from the kernel command line (direct kernel boot)
# or from SMBIOS OEM strings (type 11), which libvirt sets per domain through <sysinfo>.
settings="$(cat /proc/cmdline) $(strings -n 3 /sys/firmware/dmi/entries/11-*/raw 2>/dev/null)"
ip=; gw=; from=smbios
for w in $settings; do
  case "$w" in
    fc.ip=*) ip=${w#fc.ip=} ;;
    fc.gw=*) gw=${w#fc.gw=} ;;
  esac
done

# The config drive (ISO 9660 labelled config-2, OpenStack's layout), when there is one: who we
# are, our keys, and our address, which then replaces the SMBIOS one. busybox has no JSON
# parser; the documents are compact JSON, cut at each '{' into one object a line.
cd_dev=
for i in 1 2 3 4 5 6 7 8 9 10; do
  cd_dev=$(findfs LABEL=config-2 2>/dev/null) && break
  cd_dev=
  [ -b /dev/sr0 ] && cd_dev=/dev/sr0 && break
  sleep 0.2
done
if [ -n "$cd_dev" ] && mkdir -p /mnt/config && mount -t iso9660 -o ro "$cd_dev" /mnt/config; then
  md=/mnt/config/openstack/latest/meta_data.json
  nd=/mnt/config/openstack/latest/network_data.json
  cd_uuid=$(tr '{' '\n' <"$md" | sed -n 's/^"uuid":"\([^"]*\)".*/\1/p')
  cd_host=$(tr '{' '\n' <"$md" | sed -n 's/.*"hostname":"\([^"]*\)".*/\1/p' | head -n 1)
  cd_keys=$(tr '{' '\n' <"$md" | sed -n 's/^"name":"\([^"]*\)","type":.*/\1/p' | tr '\n' ',')
  [ -n "$cd_host" ] && hostname "$cd_host"
  echo "FASTCOMPUTE-CONFIG-DRIVE dev=$cd_dev uuid=$cd_uuid hostname=$cd_host keys=${cd_keys%,}"
  # The first IPv4 network: its address and netmask, and the first default route after it.
  set -- $(tr '{' '\n' <"$nd" | awk -F'"' '
    /"type":"ipv4"/ && !ip { for (i = 1; i < NF; i++) { if ($i == "ip_address") ip = $(i + 2)
                                                        if ($i == "netmask") mask = $(i + 2) }; next }
    ip && !gw && /"network":"0\.0\.0\.0","netmask":"0\.0\.0\.0"/ {
      for (i = 1; i < NF; i++) if ($i == "gateway") gw = $(i + 2) }
    END { print ip, mask, gw }')
  if [ -n "${1:-}" ] && [ -n "${2:-}" ]; then
    eval "$(ipcalc -p "$1" "$2")"
    ip="$1/$PREFIX"; gw=${3:-}; from=config-drive
  fi
fi
if [ -n "$ip" ]; then
  ip link set lo up
  ip link set eth0 up && ip addr add "$ip" dev eth0
  [ -n "$gw" ] && ip route add default via "$gw"
  mkdir -p /www && echo "fastcompute-guest $uuid" >/www/index.html
  httpd -p 80 -h /www
  echo "FASTCOMPUTE-NET ip=$ip gw=${gw:-none} from=$from"
fi

# The metadata service: who we are, asked of http://169.254.169.254/. The address has no on-link
# answer, so only a guest with a default gateway can reach it. In the background, so the boot
# never waits for it: where there is no service (or no gateway answering yet) it costs a few
# bounded attempts (busybox wget has no timeout of its own) and nothing on the way to READY.
if [ -n "$gw" ]; then
  (
    md_uuid=
    for i in 1 2 3 4 5; do
      md_uuid=$(timeout 4 wget -q -O - http://169.254.169.254/openstack/latest/meta_data.json 2>/dev/null |
                tr '{' '\n' | sed -n 's/^"uuid":"\([^"]*\)".*/\1/p')
      [ -n "$md_uuid" ] && break
      sleep 1
    done
    if [ -n "$md_uuid" ]; then
      echo "FASTCOMPUTE-METADATA uuid=$md_uuid attempts=$i"
    else
      echo "FASTCOMPUTE-METADATA unreachable attempts=$i"
    fi
  ) &
fi

echo "FASTCOMPUTE-GUEST-READY"
# Something for a graphical (VNC) console to show: the kernel prints only on ttyS0.
echo "fastcompute guest $uuid ready" >/dev/tty0 2>/dev/null
# A shell on the serial console, for interactive sessions (the console proxy's); what it
# prints lands in the console log too.
while :; do sh; sleep 1; done
INIT
  chmod 755 "$1"
}

# A tiny QEMU guest agent: JSON lines on the virtio-serial port org.qemu.guest_agent.0, the
# handful of commands libvirt sends for setUserPassword, fsFreeze/fsThaw and a ping. busybox
# has no JSON parser; libvirt's commands are one compact object a line, so sed picks the fields.
# The password never reaches the console or a file other than /etc/shadow (as a hash).
write_qga() {
  cat >"$1" <<'QGA'
#!/bin/sh
port=
for i in $(seq 1 50); do
  for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename "$(dirname "$n")") && break 2
  done
  sleep 0.2
done
[ -n "$port" ] || { echo "FASTCOMPUTE-QGA no port"; exit 0; }
frozen=/tmp/qga-frozen
field() { printf '%s\n' "$2" | sed -n "s/.*\"$1\" *: *\"\\([^\"]*\\)\".*/\\1/p"; }
error() { printf '{"error":{"class":"GenericError","desc":"%s"}}\n' "$1"; }
set_password() {
  user=$(field username "$1")
  case "$user" in ''|*[!A-Za-z0-9._-]*) error "invalid user name"; return ;; esac
  grep -q "^$user:" /etc/passwd || { error "user $user does not exist"; return; }
  # (a JSON writer may send base64's / as \/: base64 has no backslash of its own)
  hash=$(field password "$1" | tr -d '\\' | base64 -d | mkpasswd -m sha512) || { error "cannot hash the password"; return; }
  awk -F: -v OFS=: -v u="$user" -v h="$hash" '$1 == u { $2 = h } { print }' /etc/shadow >/etc/shadow.new &&
    mv /etc/shadow.new /etc/shadow
  echo "FASTCOMPUTE-PASSWORD user=$user set" >/dev/ttyS0
  echo '{"return":{}}'
}
# Freezes the mounted block-device file systems that can be frozen (this guest runs from its
# initramfs: only the config drive is mounted, and iso9660 cannot be, so the honest count is 0).
freeze() {
  [ -s "$frozen.state" ] && { error "file systems are frozen already"; return; }
  sync
  : >"$frozen"
  while read -r dev dir _; do
    case "$dev" in /dev/*) fsfreeze --freeze "$dir" 2>/dev/null && echo "$dir" >>"$frozen" ;; esac
  done </proc/mounts
  echo frozen >"$frozen.state"
  printf '{"return":%d}\n' "$(wc -l <"$frozen")"
}
thaw() {
  n=0
  if [ -f "$frozen" ]; then
    while read -r dir; do fsfreeze --unfreeze "$dir" 2>/dev/null && n=$((n + 1)); done <"$frozen"
  fi
  rm -f "$frozen" "$frozen.state"
  printf '{"return":%d}\n' "$n"
}
answer() {
  case "$(field execute "$1")" in
    guest-sync) printf '{"return":%s}\n' "$(printf '%s\n' "$1" | sed -n 's/.*"id" *: *\([0-9]*\).*/\1/p')" ;;
    guest-sync-delimited) printf '\377{"return":%s}\n' "$(printf '%s\n' "$1" | sed -n 's/.*"id" *: *\([0-9]*\).*/\1/p')" ;;
    guest-ping) echo '{"return":{}}' ;;
    guest-info) echo '{"return":{"version":"fastcompute-qga-1","supported_commands":[]}}' ;;
    guest-set-user-password) set_password "$1" ;;
    guest-fsfreeze-freeze) freeze ;;
    guest-fsfreeze-thaw) thaw ;;
    guest-fsfreeze-status) if [ -s "$frozen.state" ]; then echo '{"return":"frozen"}'; else echo '{"return":"thawed"}'; fi ;;
    *) printf '{"error":{"class":"CommandNotFound","desc":"command %s not found"}}\n' "$(field execute "$1")" ;;
  esac
}
echo "FASTCOMPUTE-QGA port=$port"
# read keeps what came before a newline, so a command split over several writes is one line;
# a read with nothing (the host end is not connected yet) is an end of file: open again.
while :; do
  exec 3<>"$port"
  while IFS= read -r line <&3 || [ -n "$line" ]; do
    line=$(printf '%s' "$line" | tr -d '\377\r')
    [ -n "$line" ] && answer "$line" >&3
    line=
  done
  exec 3>&-
  sleep 0.2
done
QGA
  chmod 755 "$1"
}

# Downloads (into ./deb) the kernel package the cloud-kernel metapackage currently names.
download_kernel() {
  local kpkg
  kpkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
  [ -n "$kpkg" ] || return 1
  log "downloading $kpkg"
  # apt would drop to the _apt user, who cannot write into our private build directory.
  (cd deb && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null)
}

build() {
  local work="$1" kver deb mod
  cd "$work"
  mkdir -p deb
  if ! download_kernel; then
    # No package lists yet, or stale ones naming a kernel the archive has replaced since.
    log "refreshing the package lists"
    apt-get update -qq
    download_kernel
  fi
  deb="$(ls deb/*.deb)"
  dpkg -x "$deb" kernel
  kver="$(ls kernel/lib/modules)"

  mkdir -p root/bin root/sbin root/proc root/sys root/dev root/tmp root/mnt root/etc/acpi/PWRF root/lib/modules
  cp /bin/busybox root/bin/busybox
  for a in $(root/bin/busybox --list); do
    [ "$a" = busybox ] || ln -s busybox "root/bin/$a"
  done
  : >root/etc/modules
  for mod in "${MODULES[@]}"; do
    cp "kernel/lib/modules/$kver/kernel/$mod.ko" "root/lib/modules/$(basename "$mod").ko"
    basename "$mod" >>root/etc/modules
  done
  printf '#!/bin/sh\necho FASTCOMPUTE-GUEST-POWEROFF >/dev/ttyS0\npoweroff -f\n' >root/etc/acpi/PWRF/00000080
  chmod 755 root/etc/acpi/PWRF/00000080
  write_init root/init
  write_qga root/bin/fc-qga
  # Users for the guest agent's guest-set-user-password (busybox's login reads /etc/shadow).
  printf 'root:x:0:0:root:/root:/bin/sh\n' >root/etc/passwd
  printf 'root:*:0:0:99999:7:::\n' >root/etc/shadow
  chmod 600 root/etc/shadow
  (cd root && find . | LC_ALL=C sort | cpio -o -H newc --quiet --owner 0:0) | gzip -9n >initrd.gz

  cat >syslinux.cfg <<EOF
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND $CMDLINE
EOF
  printf 'timeout 0\ndefault fastcompute.conf\n' >loader.conf
  printf 'title fastcompute guest\nlinux /vmlinuz\ninitrd /initrd.gz\noptions %s\n' "$CMDLINE" >fastcompute.conf
  truncate -s "${IMAGE_MIB}M" disk.img
  mkfs.vfat -n FCGUEST disk.img >/dev/null
  syslinux --install disk.img
  mcopy -i disk.img "kernel/boot/vmlinuz-$kver" ::vmlinuz
  mcopy -i disk.img initrd.gz ::initrd.gz
  mcopy -i disk.img syslinux.cfg ::syslinux.cfg
  mmd -i disk.img ::EFI ::EFI/BOOT ::loader ::loader/entries
  mcopy -i disk.img /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::EFI/BOOT/BOOTX64.EFI
  mcopy -i disk.img loader.conf ::loader/loader.conf
  mcopy -i disk.img fastcompute.conf ::loader/entries/fastcompute.conf
  {
    echo "kernel=$kver"
    echo "kernel_package=$(basename "$deb")"
    echo "busybox=$(dpkg-query -W -f='${Version}' busybox-static)"
    echo "syslinux=$(dpkg-query -W -f='${Version}' syslinux)"
    echo "systemd_boot=$(dpkg-query -W -f='${Version}' systemd-boot-efi)"
    echo "first_mib_md5=$(head -c 1048576 disk.img | md5sum | cut -d' ' -f1)"
  } >manifest
}

main() {
  if [ -f "$IMAGE" ]; then
    echo "$IMAGE"
    return
  fi
  mkdir -p "$CACHE_ROOT"
  exec 9>"$CACHE_ROOT/.lock"
  flock 9
  if [ -f "$IMAGE" ]; then
    echo "$IMAGE"
    return
  fi
  ensure_packages
  work="$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  local t0=$SECONDS
  (build "$work")
  mkdir -p "$OUT_DIR.tmp"
  mv "$work/disk.img" "$work/manifest" "$OUT_DIR.tmp/"
  chmod 644 "$OUT_DIR.tmp/disk.img"
  rm -rf "$OUT_DIR"
  mv "$OUT_DIR.tmp" "$OUT_DIR"
  # Images built by earlier versions of this script are stale: keep only the current one.
  find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" ! -name '.build.*' -exec rm -rf {} +
  log "built $IMAGE in $((SECONDS - t0)) s"
  echo "$IMAGE"
}

main "$@"
