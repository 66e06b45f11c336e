"""Rebuild, rescue and crash dump on a real QEMU guest (TCG) through the agent.

Two images that differ only by a marker past the guest image's file system (the project's
image, grown by a MiB that holds the marker): the guest reads the marker back from its disks
with dd through its serial shell. One guest through: an NMI (the kernel says so on its
console); a rebuild to the other image (its marker on vda); its boot sector zeroed (unbootable);
a rescue from its own image, whose rescue system sees the broken root disk as vdb (zero boot
sector, the marker) and repairs it; the agent killed (the guest stays rescued) and the rescue
system powered off from inside (the power sync keeps it rescued); an unrescue, after which it
boots from its own disk again.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_fixtures import AgentProcess, free_port
from guest_fixtures import READY, guest_image, libvirtd
from test_guest_agent import MEMORY_MB, agent_config, conn, console, guest_agent, wait_console, wait_record

pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "guest_agent", "guest_image", "libvirtd"]  # fixtures, by import

MIB = 1 << 20
ZERO_SECTOR_MD5 = "bf619eac0cdf3f68d496ea9344137e8b"  # md5 of 512 zero bytes


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the guests' serial sockets (a unix socket's path is short)."""
    d = Path(tempfile.mkdtemp(prefix="fcw-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def marked_image(guest_image: Path, directory: Path, name: str) -> tuple[Path, str, int]:
    """A copy of the guest image grown by a MiB whose first bytes are a marker of its own:
    (path, marker, the MiB the marker is at)."""
    size = guest_image.stat().st_size
    assert size % MIB == 0
    path = directory / f"{name}.img"
    shutil.copyfile(guest_image, path)
    marker = f"FCMARK-{name}-{uuid_mod.uuid4().hex[:8]}"
    with path.open("r+b") as f:
        f.truncate(size + MIB)
        f.seek(size)
        f.write(marker.encode())
    return path, marker, size // MIB


class Serial:
    """The guest's serial shell, through the unix socket QEMU listens on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, line: str, timeout_s: float = 30.0) -> None:
        """Type ``line`` into the shell and wait for its echo only (QEMU drops what a client
        that hangs up at once has sent and the guest has not read yet)."""
        deadline = time.monotonic() + timeout_s
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.path))
            s.settimeout(1.0)
            s.sendall(f"{line}\r".encode())
            seen = b""
            while line.encode() not in seen:
                assert time.monotonic() < deadline, f"no echo of {line!r} on the serial console: {seen[-500:]!r}"
                try:
                    seen += s.recv(65536)
                except TimeoutError:
                    continue

    def run(self, command: str, timeout_s: float = 120.0) -> str:
        """Run ``command`` in the guest's shell; its output (what it printed after ``OUT=``)."""
        tag = uuid_mod.uuid4().hex[:6]
        # The tag is computed in the guest: the echo of the typed line does not carry it.
        line = f'echo "{tag}$((1+1))=$({command})={tag}"\r'
        want_start, want_end = f"{tag}2=".encode(), f"={tag}".encode()
        deadline = time.monotonic() + timeout_s
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.path))
            s.settimeout(1.0)
            s.sendall(line.encode())
            seen = b""
            while time.monotonic() < deadline:
                try:
                    seen += s.recv(65536)
                except TimeoutError:
                    continue
                start = seen.find(want_start)
                if start >= 0 and (end := seen.find(want_end, start)) >= 0:
                    return seen[start + len(want_start):end].decode(errors="replace")
        pytest.fail(f"no answer to {command!r} on the serial console; seen: {seen[-800:]!r}")


def test_rebuild_rescue_unrescue_and_crash_dump_of_a_real_guest(
        guest_agent: Callable[..., AgentProcess], guest_image: Path, socket_dir: Path, tmp_path: Path) -> None:
    image_a, marker_a, at = marked_image(guest_image, tmp_path, "A")
    image_b, marker_b, _ = marked_image(guest_image, tmp_path, "B")
    agent = guest_agent(agent_config() + f'[console]\nenabled = true\nlisten = "127.0.0.1:{free_port()}"\n'
                        f'socket_dir = "{socket_dir}"\n')
    rec = agent.call("instance.spawn", {
        "name": "workflows", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
        "image": {"url": image_a.as_uri()}, "wait": True,
    })
    uuid = rec["uuid"]
    assert rec["vm_state"] == "active", rec["fault"]
    serial = Serial(socket_dir / f"{uuid}.sock")
    read_marker = f"dd if=/dev/%s bs=1048576 skip={at} count=1 2>/dev/null | head -c {len(marker_a)}"
    boot_sector = "dd if=/dev/%s bs=512 count=1 2>/dev/null | md5sum | cut -c1-32"
    wait_console(agent, uuid, READY)
    assert serial.run(read_marker % "vda") == marker_a

    # A crash dump: the guest's kernel reports the NMI on its console.
    assert b"NMI" not in console(agent, uuid)
    assert agent.call("instance.crash_dump", {"uuid": uuid})["vm_state"] == "active"
    wait_console(agent, uuid, "NMI received")

    # Rebuild to B: a new boot, from a disk with B's marker.
    rebuilt = agent.call("instance.rebuild", {"uuid": uuid, "image": {"url": image_b.as_uri()}})
    assert (rebuilt["vm_state"], rebuilt["power_state"], rebuilt["image"]["url"]) == (
        "active", "running", image_b.as_uri())
    wait_console(agent, uuid, READY, count=2)
    assert serial.run(read_marker % "vda") == marker_b

    # Unbootable: its boot sector zeroed.
    assert serial.run("dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; sync; echo done") == "done"
    assert serial.run(boot_sector % "vda") == ZERO_SECTOR_MD5

    # Rescue from its own image (now B): the rescue system boots from vda, the broken root disk is vdb.
    rescued = agent.call("instance.rescue", {"uuid": uuid})
    assert (rescued["vm_state"], rescued["power_state"]) == ("rescued", "running")
    wait_console(agent, uuid, READY, count=3)
    assert serial.run(boot_sector % "vdb") == ZERO_SECTOR_MD5
    assert serial.run(boot_sector % "vda") != ZERO_SECTOR_MD5
    assert serial.run(read_marker % "vdb") == marker_b
    # The repair a rescue is for: the boot sector back from the rescue disk (the same image).
    assert serial.run("dd if=/dev/vda of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; sync; echo done") == "done"

    # A kill -9 of the agent: the rescue domain is left running and the instance stays rescued.
    agent.kill()
    agent.start()
    assert wait_record(agent, uuid, "rescued", "running", 30)["image"]["url"] == image_b.as_uri()
    assert serial.run(read_marker % "vdb") == marker_b
    # The rescue system powers itself off: the power sync records it, still rescued.
    serial.send("poweroff -f")
    wait_record(agent, uuid, "rescued", "shutdown", 60)

    # Unrescue: it boots from its own (repaired) disk again, with one disk.
    back = agent.call("instance.unrescue", {"uuid": uuid})
    assert (back["vm_state"], back["power_state"]) == ("active", "running")
    wait_console(agent, uuid, READY, count=4)
    assert serial.run(read_marker % "vda") == marker_b
    assert serial.run("ls /dev | grep -c '^vd[a-z]$'") == "1"
    assert b"FASTCOMPUTE-DISK dev=vda" in console(agent, uuid)
    assert not (agent.state_dir / "instances" / uuid / "disk.rescue").exists()
    agent.call("instance.delete", {"uuid": uuid})
