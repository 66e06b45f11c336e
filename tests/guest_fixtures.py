"""Real guests for tests and benchmarks: the libvirtd daemons, the project's guest image, and
the pieces to boot that image directly with libvirt-python (the baseline the agent is held to).

The image (scripts/guest-image.sh) is a raw FAT disk with syslinux, a Debian cloud kernel and a
busybox initramfs whose /init prints, on the serial console::

    FASTCOMPUTE-GUEST-UP uptime=<seconds since the kernel started> uuid=<SMBIOS uuid>
    FASTCOMPUTE-DISK dev=vda bytes=1048576 md5=<md5 of the first MiB of its disk>
    FASTCOMPUTE-GUEST-READY                       (acpid runs: the power button works now)
    FASTCOMPUTE-GUEST-POWEROFF                    (the power button was pressed)

docs/GUESTS.md has the details and the timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST_IMAGE_SCRIPT = REPO / "scripts" / "guest-image.sh"
LIBVIRTD_SCRIPT = REPO / "scripts" / "libvirtd.sh"
SYSTEM_URI = "qemu:///system"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")

MARKER = "FASTCOMPUTE-GUEST-UP"
READY = "FASTCOMPUTE-GUEST-READY"
POWEROFF = "FASTCOMPUTE-GUEST-POWEROFF"
_MARKER_RE = re.compile(rb"FASTCOMPUTE-GUEST-UP uptime=([0-9.]+) uuid=(\S+)")
_DISK_RE = re.compile(rb"FASTCOMPUTE-DISK dev=(\S+)(?: bytes=(\d+) md5=([0-9a-f]{32}))?")

# Domains booted directly (not through the agent) carry this, so that a run can find and remove
# what an earlier, interrupted run left behind without touching anyone else's domains.
DIRECT_NAMESPACE = "http://fastcompute.org/xmlns/direct-guest/1.0"
DIRECT_PREFIX = "fcdirect-"


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """``qemu:///system`` with virtlogd and libvirtd running; stops at the end what it started."""
    holder = str(os.getpid())
    try:
        out = subprocess.run(["bash", str(LIBVIRTD_SCRIPT), "start", holder], check=True,
                             capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"scripts/libvirtd.sh start failed:\n{e.stdout}\n{e.stderr}")
    yield out.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(LIBVIRTD_SCRIPT), "stop", holder], check=False, timeout=120)


def ignore_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr; tests look at the exceptions instead."""


def open_quietly(uri: str) -> Any:
    """A libvirt connection to ``uri``, with libvirt's own error printing off."""
    import libvirt

    libvirt.registerErrorHandler(ignore_libvirt_errors, None)
    return libvirt.open(uri)


@pytest.fixture(name="conn")
def direct_conn(libvirtd: str) -> Iterator[Any]:
    """``conn``: a connection to the real hypervisor, with no direct guest left over from
    earlier runs."""
    import libvirt

    c = open_quietly(libvirtd)
    remove_leftover_direct_guests(c)
    yield c
    with contextlib.suppress(libvirt.libvirtError):
        c.close()  # dead already if a test restarted libvirtd


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The cached guest image (built on first use, a few seconds; then a hash)."""
    try:
        out = subprocess.run(["bash", str(GUEST_IMAGE_SCRIPT)], check=True, capture_output=True,
                             text=True, timeout=900)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"scripts/guest-image.sh failed:\n{e.stdout}\n{e.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


# -- the console ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Boot:
    """One boot seen on a console: the guest's uptime when /init printed its marker."""

    uptime_s: float
    uuid: str


def boots(console: Path) -> list[Boot]:
    """Every boot marker on a console file so far, oldest first (a missing file has none)."""
    try:
        data = console.read_bytes()
    except FileNotFoundError:
        return []
    return [Boot(float(m[1]), m[2].decode()) for m in _MARKER_RE.finditer(data)]


def disk_read(console: Path) -> tuple[str, int, str] | None:
    """The guest's report of reading its own disk: (device, bytes, md5), or None before it."""
    try:
        m = _DISK_RE.search(console.read_bytes())
    except FileNotFoundError:
        return None
    if m is None:
        return None
    return m[1].decode(), int(m[2] or 0), (m[3] or b"").decode()


def wait_for_console(console: Path, text: str, *, count: int = 1, timeout_s: float = 180.0,
                     poll_s: float = 0.05) -> float:
    """Wait until ``text`` appears ``count`` times on the console; returns the monotonic time it
    was seen. Raises TimeoutError with the console's tail otherwise."""
    needle = text.encode()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if console.read_bytes().count(needle) >= count:
                return time.monotonic()
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            tail = console.read_bytes()[-2000:].decode(errors="replace") if console.exists() else "<no file>"
            raise TimeoutError(f"{text!r} x{count} not on {console} within {timeout_s}s; tail:\n{tail}")
        time.sleep(poll_s)


def first_mib_md5(path: Path) -> str:
    """md5 of the first MiB of a raw file: what the guest must report reading from its disk."""
    with path.open("rb") as f:
        return hashlib.md5(f.read(1 << 20)).hexdigest()


# -- guests booted directly -------------------------------------------------------------------

def make_overlay(image: Path, overlay: Path) -> None:
    """A qcow2 overlay over the raw image, as the agent gives each instance."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.resolve()), "-F", "raw",
                    str(overlay)], check=True)


def direct_domain_xml(name: str, uuid: str, disk: Path, console: Path, *, memory_mib: int = 128,
                      vcpus: int = 1, domain_type: str = "qemu") -> str:
    """The domain XML for one directly booted guest: the same shape as the agent's (TCG, BIOS
    boot from a virtio qcow2 disk, serial console to a file, ACPI, stop on poweroff/crash)."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid
    meta = ET.SubElement(dom, "metadata")
    ET.SubElement(meta, "fcd:guest", {"xmlns:fcd": DIRECT_NAMESPACE})
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    d = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="qcow2")
    ET.SubElement(d, "source", file=str(disk))
    ET.SubElement(d, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    console_el = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console_el, "source", path=str(console))
    ET.SubElement(console_el, "target", type="serial", port="0")
    # libvirt adds a USB controller and a balloon by default; the guest uses neither.
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


@dataclass
class DirectGuest:
    """A guest started directly with libvirt-python, with its files."""

    name: str
    uuid: str
    overlay: Path
    console: Path
    domain: Any = None


def prepare_direct_guest(image: Path, workdir: Path, index: int = 0) -> DirectGuest:
    """Name, overlay and console path of a new direct guest (nothing started yet)."""
    uuid = str(uuidlib.uuid4())
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = workdir / f"guest{index}.qcow2"
    make_overlay(image, overlay)
    return DirectGuest(f"{DIRECT_PREFIX}{uuid}", uuid, overlay, workdir / f"guest{index}.console")


def start_direct_guest(conn: Any, guest: DirectGuest) -> None:
    """Create (start, not define) the guest's transient domain."""
    guest.domain = conn.createXML(direct_domain_xml(guest.name, guest.uuid, guest.overlay, guest.console), 0)


def destroy_direct_guest(conn: Any, guest: DirectGuest) -> None:
    """Stop the guest if it runs, and remove its overlay and console file."""
    import libvirt

    try:
        conn.lookupByUUIDString(guest.uuid).destroy()
    except libvirt.libvirtError as e:
        if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise
    guest.overlay.unlink(missing_ok=True)
    guest.console.unlink(missing_ok=True)
    qemu_log(guest.name).unlink(missing_ok=True)


def qemu_log(name: str) -> Path:
    """The QEMU log virtlogd keeps per domain name; it outlives the domain unless removed."""
    return QEMU_LOG_DIR / f"{name}.log"


def remove_leftover_direct_guests(conn: Any) -> list[str]:
    """Destroy (and undefine) direct guests an interrupted earlier run left; their names."""
    import libvirt

    gone = []
    for dom in conn.listAllDomains(0):
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, DIRECT_NAMESPACE)
        except libvirt.libvirtError:
            continue
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
        gone.append(dom.name())
        qemu_log(dom.name()).unlink(missing_ok=True)
    return gone


# -- guests driven by an agent ----------------------------------------------------------------

SAVE_DIR = Path("/var/lib/libvirt/qemu/save")


def agent_domain_name(uuid: str) -> str:
    """libvirt's name of the domain an agent made for instance ``uuid``."""
    return f"fc-{uuid}"


def managed_save_file(uuid: str) -> Path:
    """Where libvirt keeps the managed save (Nova's suspend) of an agent's instance."""
    return SAVE_DIR / f"{agent_domain_name(uuid)}.save"


def domains_under(conn: Any, root: Path) -> dict[str, Any]:
    """Domains (running or only defined) whose XML names a file under ``root``, by uuid: those
    of an agent whose state dir is under ``root``, and no one else's."""
    import libvirt

    found = {}
    needle = str(root.resolve())
    for dom in conn.listAllDomains(0):
        try:
            if needle in dom.XMLDesc(0):
                found[dom.UUIDString()] = dom
        except libvirt.libvirtError:
            continue  # vanished while we looked
    return found


def remove_domains_under(conn: Any, root: Path) -> list[str]:
    """Destroy and undefine (with any managed save and QEMU log) every domain under ``root``;
    their names. For the teardown of agent tests, whatever state the agent left."""
    import libvirt

    gone = []
    for dom in domains_under(conn, root).values():
        name = dom.name()
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                if dom.hasManagedSaveImage():
                    dom.managedSaveRemove()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)  # a UEFI guest's NVRAM too
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
        qemu_log(name).unlink(missing_ok=True)
        gone.append(name)
    return gone


def virsh_names() -> set[str]:
    """Every domain name ``virsh list --all`` shows on the real hypervisor."""
    out = subprocess.run(["virsh", "-c", SYSTEM_URI, "list", "--all", "--name"], capture_output=True,
                         text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def virsh(*args: str) -> str:
    """Run one virsh command on the real hypervisor, as an operator outside the agent would."""
    return subprocess.run(["virsh", "-q", "-c", SYSTEM_URI, *args], capture_output=True, text=True,
                          check=True).stdout
