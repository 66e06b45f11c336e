"""The guest image and the libvirtd set-up, proven without the agent: a real QEMU guest (TCG)
boots the project's image BIOS -> syslinux -> kernel from a qcow2 overlay, reports on its serial
console, reads its own disk, reboots, and powers off when ACPI asks."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_fixtures import (
    LIBVIRTD_SCRIPT,
    MARKER,
    POWEROFF,
    READY,
    DirectGuest,
    boots,
    destroy_direct_guest,
    direct_conn,
    disk_read,
    first_mib_md5,
    guest_image,
    libvirtd,
    prepare_direct_guest,
    start_direct_guest,
    wait_for_console,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["direct_conn", "guest_image", "libvirtd"]

# Generous for TCG on 2 shared cores (a boot takes ~6 s alone), bounded so a hang fails the run.
BOOT_TIMEOUT_S = 120.0


@pytest.fixture
def guest(conn: Any, guest_image: Path, tmp_path: Path) -> Iterator[DirectGuest]:
    """A direct guest's files, destroyed with its domain at the end whatever happened."""
    g = prepare_direct_guest(guest_image, tmp_path / "guest")
    yield g
    destroy_direct_guest(conn, g)
    assert not g.overlay.exists()
    assert not g.console.exists()


def _domain_gone(conn: Any, uuid: str) -> bool:
    try:
        return not conn.lookupByUUIDString(uuid).isActive()
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise


def test_image_boots_reads_its_disk_reboots_and_powers_off(conn: Any, guest: DirectGuest,
                                                           guest_image: Path) -> None:
    start_direct_guest(conn, guest)

    wait_for_console(guest.console, MARKER, timeout_s=BOOT_TIMEOUT_S)
    first = boots(guest.console)
    assert len(first) == 1
    # The guest names itself by the UUID the domain was given (SMBIOS), and its uptime is the
    # guest's own clock: a boot of a few seconds, not zero and not hours.
    assert first[0].uuid == guest.uuid
    assert 0.0 < first[0].uptime_s < BOOT_TIMEOUT_S

    # libvirt's reboot of a QEMU guest is an ACPI request plus a reset once the guest has shut
    # down: the same domain boots the image a second time and says so. The init listens for ACPI
    # before it prints the marker, so the request is not lost however soon it comes.
    guest.domain.reboot(0)
    wait_for_console(guest.console, MARKER, count=2, timeout_s=BOOT_TIMEOUT_S)
    assert [b.uuid for b in boots(guest.console)] == [guest.uuid, guest.uuid]
    assert guest.domain.isActive()

    # What the guest read from its virtio disk through the overlay is the image's first MiB.
    wait_for_console(guest.console, READY, timeout_s=BOOT_TIMEOUT_S)
    assert disk_read(guest.console) == ("vda", 1 << 20, first_mib_md5(guest_image))

    guest.domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    wait_for_console(guest.console, POWEROFF, timeout_s=BOOT_TIMEOUT_S)
    # on_poweroff=destroy on a transient domain: powering off makes it vanish.
    wait_until(lambda: _domain_gone(conn, guest.uuid), BOOT_TIMEOUT_S)
    assert guest.name not in subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                                            capture_output=True, text=True, check=True).stdout


def wait_until(predicate: Any, timeout_s: float) -> None:
    """Poll ``predicate`` until it is true, or fail."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(0.05)


def _status() -> dict[str, str]:
    out = subprocess.run(["bash", str(LIBVIRTD_SCRIPT), "status"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[0]: line for line in out.splitlines()}


def test_libvirtd_script_is_idempotent_and_waits_for_every_holder(libvirtd: str) -> None:
    before = _status()
    # Another user of the daemons: a process that is alive for the length of the test.
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            started = subprocess.run(["bash", str(LIBVIRTD_SCRIPT), "start", str(other.pid)],
                                     capture_output=True, text=True, check=True)
            assert started.stdout.strip() == libvirtd
            # Already running: nothing new started, the same daemons answer.
            assert _status()["libvirtd"] == before["libvirtd"]
            assert _status()["virtlogd"] == before["virtlogd"]
            assert str(other.pid) in _status()["holders:"]

            # That user leaving does not stop the daemons this session still holds.
            subprocess.run(["bash", str(LIBVIRTD_SCRIPT), "stop", str(other.pid)], check=True,
                           capture_output=True)
            assert str(other.pid) not in _status()["holders:"]
            assert _status()["libvirtd"] == before["libvirtd"]
            libvirt.open(libvirtd).close()
        finally:
            other.kill()
