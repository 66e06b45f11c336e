"""Cold migration and resize of a real guest through two agents, each inside its libvirt host's
namespace (scripts/libvirt-hosts.sh), set up as tests/test_guest_live_migration_agents.py sets
them up.

A resize to the other host stops the guest at A, takes its disk to B with the new flavor and
boots it there: it finds what it wrote to its disk, a disk of the new size and the new memory,
while A holds the old claim and files. ``instance.revert_resize`` boots it at A again as it
was (what it wrote at B is gone with B's copy); ``instance.migrate`` then
``instance.confirm_resize`` leave it at B alone, claimed there alone.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fixtures import disk_dirs
from guest_fixtures import guest_image
from test_guest_live_migration import Host, hosts
from test_guest_live_migration_agents import MEMORY_MB, Pair, at_alone, boot, started, usage
from test_guest_snapshot import shell

pytestmark = pytest.mark.guest
__all__ = ["guest_image", "hosts"]

BIGGER_MB = 192
BIGGER = {"vcpus": 1, "memory_mb": BIGGER_MB, "disk_gb": 2}
GIB = 1 << 30


@pytest.fixture
def pair(hosts: tuple[Host, Host], tmp_path: Path) -> Iterator[Pair]:
    yield from started(Pair(tmp_path, hosts))


def answering(pair: Pair, host: str, uuid: str, timeout_s: float = 180.0) -> None:
    """Wait until the guest's shell on its console at ``host`` answers (after a cold move it
    boots there first; what is typed before its shell runs is lost)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            shell(pair.socket_of(host, uuid), "true", timeout_s=5)
            return
        except (AssertionError, OSError):
            assert time.monotonic() < deadline, f"the guest's shell at {host} does not answer"
            time.sleep(1)


def write_at(pair: Pair, host: str, uuid: str, mib: int, marker: str) -> None:
    shell(pair.socket_of(host, uuid),
          f"printf {marker} | dd of=/dev/vda bs=1M seek={mib} conv=notrunc,fsync 2>/dev/null")


def read_at(pair: Pair, host: str, uuid: str, mib: int) -> bytes:
    return shell(pair.socket_of(host, uuid), f"dd if=/dev/vda bs=1M skip={mib} count=1 2>/dev/null | head -c 32")


def guest_sees(pair: Pair, host: str, uuid: str) -> tuple[int, int]:
    """The disk's size in bytes and the memory in KiB, as the guest's kernel has them."""
    out = shell(pair.socket_of(host, uuid), "echo SIZE $(cat /sys/block/vda/size) "
                                            "MEM $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)")
    found = re.findall(rb"SIZE (\d+) MEM (\d+)", out)
    assert found, out[-500:]
    return int(found[-1][0]) * 512, int(found[-1][1])


def test_a_real_guest_resized_to_the_other_host_reverted_then_migrated_and_confirmed(
        pair: Pair, guest_image: Path) -> None:
    a, b = pair.agents["host-a"], pair.agents["host-b"]
    uuid = boot(pair, guest_image)
    kept, dropped = os.urandom(16).hex(), os.urandom(16).hex()
    write_at(pair, "host-a", uuid, 1023, kept)
    size_a, memory_a = guest_sees(pair, "host-a", uuid)
    assert size_a == GIB

    rec = a.call("instance.resize", {"uuid": uuid, "flavor": BIGGER, "destination": "host-b", "wait": True})
    assert (rec["host"], rec["vm_state"], rec["flavor"]["memory_mb"]) == ("host-b", "resized", BIGGER_MB)
    answering(pair, "host-b", uuid)
    assert kept.encode() in read_at(pair, "host-b", uuid, 1023)
    size_b, memory_b = guest_sees(pair, "host-b", uuid)
    assert size_b == 2 * GIB and memory_b > memory_a + 32 * 1024
    # Until confirmed or reverted, A keeps the old claim and the files to go back to.
    assert (usage(a), usage(b)) == (MEMORY_MB, BIGGER_MB)
    assert disk_dirs(a) == {uuid + "_resize"}
    write_at(pair, "host-b", uuid, 1022, dropped)
    assert dropped.encode() in read_at(pair, "host-b", uuid, 1022)

    rec = b.call("instance.revert_resize", {"uuid": uuid})
    assert (rec["host"], rec["flavor"]["memory_mb"], rec["vm_state"]) == ("host-a", MEMORY_MB, "active")
    at_alone(a, b, uuid, "host-a")
    answering(pair, "host-a", uuid)
    assert guest_sees(pair, "host-a", uuid) == (GIB, memory_a)
    assert kept.encode() in read_at(pair, "host-a", uuid, 1023)
    assert dropped.encode() not in read_at(pair, "host-a", uuid, 1022)

    rec = a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert (rec["host"], rec["vm_state"], rec["flavor"]["memory_mb"]) == ("host-b", "resized", MEMORY_MB)
    answering(pair, "host-b", uuid)
    rec = b.call("instance.confirm_resize", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"]) == ("active", None)
    at_alone(b, a, uuid, "host-b")
    assert kept.encode() in read_at(pair, "host-b", uuid, 1023)
