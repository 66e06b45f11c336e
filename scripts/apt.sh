# Sourced by the scripts that need Debian packages (bootstrap.sh, libvirtd.sh, guest-image.sh).

# apt_missing PACKAGE...: prints those of the packages dpkg does not have installed.
apt_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

# apt_install WHO [apt-get install option...] PACKAGE...: installs the packages (quietly, no
# questions asked), saying so as WHO; nothing happens when none is given.
apt_install() {
  local who=$1 opts=() pkgs=()
  shift
  for a in "$@"; do
    case "$a" in -*) opts+=("$a") ;; *) pkgs+=("$a") ;; esac
  done
  [ ${#pkgs[@]} -gt 0 ] || return 0
  echo "$who: installing apt packages: ${pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${opts[@]}" "${pkgs[@]}" >/dev/null
}
