"""A real QEMU guest (TCG) of the project's image booted through the agent under UEFI (OVMF,
picked by libvirt) with an emulated TPM 2.0 (swtpm): its init sees ``/sys/firmware/efi`` and
``/dev/tpm0`` and says so on the serial console; deleting it removes its NVRAM."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess
from guest_fixtures import READY, guest_image, libvirtd
from test_guest_agent import conn, guest_agent, wait_console

pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "guest_agent", "guest_image", "libvirtd"]
# With the 128 MiB of the BIOS tests, the kernel's EFI stub page-faults in OVMF: firmware and
# the 14 MB kernel's decompression need more.
MEMORY_MB = 256


def test_a_real_guest_boots_its_disk_under_uefi_with_a_vtpm(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path) -> None:
    if not Path("/usr/share/qemu/firmware").is_dir() or not Path("/usr/bin/swtpm").exists():
        pytest.skip("OVMF or swtpm is not installed (scripts/bootstrap.sh installs both)")
    agent = guest_agent()
    rec = agent.call("instance.spawn", {
        "name": "uefi", "image": {"url": guest_image.as_uri()}, "wait": True,
        "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1,
                   "extra_specs": {"hw:firmware_type": "uefi", "hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}},
    })
    uuid = rec["uuid"]
    assert rec["vm_state"] == "active", rec
    dom = ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(0))
    loader, nvram = dom.find("os/loader"), dom.find("os/nvram")
    assert loader is not None and (loader.text or "").startswith("/usr/share/OVMF/"), "libvirt picked OVMF"
    assert loader.get("secure") in (None, "no")
    assert nvram is not None and nvram.text
    assert Path(nvram.text).exists(), "the domain has its own NVRAM"
    tpm = dom.find("devices/tpm")
    assert tpm is not None and tpm.get("model") == "tpm-crb"
    backend = tpm.find("backend")
    assert backend is not None and (backend.get("type"), backend.get("version")) == ("emulator", "2.0")

    text = wait_console(agent, uuid, READY).decode(errors="replace")
    assert "FASTCOMPUTE-EFI bits=64" in text, text[-1500:]
    assert "FASTCOMPUTE-TPM dev=/dev/tpm0 version=2" in text, text[-1500:]
    assert re.search(r"FASTCOMPUTE-DISK dev=vda bytes=1048576 md5=[0-9a-f]{32}", text)

    agent.call("instance.delete", {"uuid": uuid})
    assert not Path(nvram.text).exists(), "the NVRAM went with the domain"


def test_real_qemu_starts_a_guest_with_every_applied_device(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path) -> None:
    """What the test hypervisor cannot say: QEMU under libvirt takes the domain of a flavor with
    every device key at once (q35, secure-boot OVMF with SMM, TPM 2.0, watchdog, rate-limited
    RNG, virtio video, three serial ports, a topology, PMU off, hidden KVM signature, packed
    virtqueues, total disk limits) and runs it. (Secure boot refuses the image's unsigned boot
    loader, so the guest's boot is not the point here.)"""
    if not Path("/usr/share/qemu/firmware").is_dir() or not Path("/usr/bin/swtpm").exists():
        pytest.skip("OVMF or swtpm is not installed (scripts/bootstrap.sh installs both)")
    agent = guest_agent()
    specs = {"hw:machine_type": "q35", "hw:firmware_type": "uefi", "os:secure_boot": "required",
             "hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb", "hw:watchdog_action": "pause",
             "hw_rng:rate_bytes": "4096", "hw_rng:rate_period": "1000", "hw:video_model": "virtio",
             "hw:serial_port_count": "3", "hw:cpu_sockets": "1", "hw:cpu_threads": "2", "hw:boot_menu": "true",
             "hw:pmu": "false", "hw:hide_hypervisor_id": "true", "hw:virtio_packed_ring": "true",
             "quota:disk_total_bytes_sec": "104857600", "quota:disk_total_iops_sec": "2000"}
    rec = agent.call("instance.spawn", {
        "name": "every-device", "image": {"url": guest_image.as_uri()}, "wait": True,
        "flavor": {"vcpus": 2, "memory_mb": MEMORY_MB, "disk_gb": 1, "extra_specs": specs}})
    assert (rec["vm_state"], rec["power_state"]) == ("active", "running"), rec
    dom = ET.fromstring(conn.lookupByUUIDString(rec["uuid"]).XMLDesc(0))
    loader = dom.find("os/loader")
    # The secure-boot build with Microsoft's keys enrolled (OVMF_CODE_4M.ms.fd on Debian).
    assert loader is not None and loader.get("secure") == "yes" and (loader.text or "").startswith("/usr/share/OVMF/")
    assert dom.find("features/smm[@state='on']") is not None
    cdrom = dom.find("devices/disk[@device='cdrom']/target")
    assert cdrom is not None and cdrom.get("bus") == "sata"
    assert len(dom.findall("devices/serial")) == 3
    agent.call("instance.delete", {"uuid": rec["uuid"]})


def test_a_real_host_publishes_the_tpm_and_secure_boot_it_has(
        guest_agent: Callable[..., AgentProcess]) -> None:
    """Debian's swtpm (TPM 1.2 and 2.0) and OVMF (a secure-boot build for q35), as libvirt's
    domain capabilities report them, become Nova's security traits of the host."""
    if not Path("/usr/share/qemu/firmware").is_dir() or not Path("/usr/bin/swtpm").exists():
        pytest.skip("OVMF or swtpm is not installed (scripts/bootstrap.sh installs both)")
    traits = set(guest_agent().call("host.info")["traits"])
    assert {"COMPUTE_SECURITY_TPM_1_2", "COMPUTE_SECURITY_TPM_2_0", "COMPUTE_SECURITY_TPM_TIS",
            "COMPUTE_SECURITY_TPM_CRB", "COMPUTE_SECURITY_UEFI_SECURE_BOOT"} <= traits, sorted(traits)
