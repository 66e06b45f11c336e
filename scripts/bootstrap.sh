#!/usr/bin/env bash
# Brings a fresh Debian 12 machine (run as root) to the point where the agent builds and the
# tests run: the apt packages that are missing, a .venv, and an editable build of the package.
# Idempotent and quick when nothing changed, so every make target can call it.
set -euo pipefail
cd "$(dirname "$0")/.."

# build: compiler, headers and pkg-config for libvirt-python and the Cython core;
# run/test: qemu-img (disk images), nftables (security groups), iproute2; virt-xml-validate
# (libvirt-clients, with xmllint from libxml2-utils) checks the KVM domain XML against libvirt's
# schema on hosts that cannot run KVM guests;
# test/bench: cloud-init (its own code reads the config drives in the tests) and genisoimage
# (the rival of the config drive writer: what Nova runs); run/test: ovmf (the UEFI firmware
# libvirt picks for hw:firmware_type=uefi) and swtpm with swtpm-tools (swtpm_setup, which libvirt
# runs to make a vTPM's state) for hw:tpm_version guests; novnc (the console proxy serves its
# page) and chromium (the console test opens that page headless); spice-html5 (the page the proxy
# serves for spice-html5 consoles).
APT_PACKAGES=(build-essential pkg-config libvirt-dev qemu-utils libnftables1 nftables iproute2
  libvirt-clients libxml2-utils cloud-init genisoimage ovmf swtpm swtpm-tools novnc chromium spice-html5)

source scripts/apt.sh
mapfile -t missing < <(apt_missing "${APT_PACKAGES[@]}")
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then missing+=(python3-venv); fi
if ! "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  missing+=(python3-dev)
fi
apt_install bootstrap "${missing[@]}"

VENV=.venv
export PATH="$PWD/$VENV/bin:$PATH"
stamp=$VENV/.bootstrap-stamp
want=$(cat pyproject.toml meson.build scripts/bootstrap.sh scripts/apt.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "bootstrap: preparing $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Build requirements in the venv itself: the editable install rebuilds the Cython core on import
# and needs them at hand (no isolated build env).
"$VENV/bin/python" -m pip install -q "meson-python>=0.16" "meson>=1.3" "cython>=3.0.10" ninja setuptools wheel
"$VENV/bin/python" -m pip install -q --no-build-isolation \
  -Ceditable-verbose=false -Cbuild-dir=build/editable -e ".[test]"
echo "$want" > "$stamp"
echo "bootstrap: ready"
