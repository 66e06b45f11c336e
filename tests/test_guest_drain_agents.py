"""Draining a real host: ``host.drain`` of agent A, in the namespace of libvirt host A
(scripts/libvirt-hosts.sh), live-migrates its TCG guests to agent B, three at a time.

GUESTS guests (eight, as the issue asks: this 2-core TCG machine boots and drains them in
about 80 s; more than the drain's concurrency, so moves wait for a slot) boot on A; after the
drain every one runs on B (active, its console still answering), A has no instance, claim or
disk left and is disabled, and each host's usage is what it holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agent_fixtures import AgentProcess, disk_dirs, wait_for_state
from guest_fixtures import READY, guest_image, wait_for_console
from test_guest_live_migration import hosts
from test_guest_live_migration_agents import MEMORY_MB, Events, Pair, pair, type_into, usage

pytestmark = pytest.mark.guest
__all__ = ["guest_image", "hosts", "pair"]

GUESTS = 8


def boot_many(a: AgentProcess, image: Path, n: int) -> list[str]:
    """``n`` guests booted on A side by side, their shells ready."""
    uuids = [str(a.call("instance.spawn", {"name": f"drained{i}", "image": {"url": image.as_uri()},
                                           "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1}})["uuid"])
             for i in range(n)]
    for uuid in uuids:
        wait_for_state(a, uuid, "active", 300)
        wait_for_console(a.state_dir / "instances" / uuid / "console.log", READY, timeout_s=300)
    return uuids


def test_drain_moves_every_guest_to_the_other_host(pair: Pair, guest_image: Path) -> None:
    a, b = pair.agents["host-a"], pair.agents["host-b"]
    uuids = boot_many(a, guest_image, GUESTS)
    events = Events(a, ["host.drain"])
    with a.client(timeout_s=900) as c:
        report = c.call("host.drain", {"concurrency": 3, "wait": True})
    progress = events.stop()
    assert report["failed"] == [], report["failed"]
    assert sorted((m["uuid"], m["destination"]) for m in report["moved"]) == sorted((u, "host-b") for u in uuids)
    # Progress: counts that only grow, at most three moves at once, and the final report last.
    assert progress and progress[-1]["done"] is True and len(progress[-1]["moved"]) == GUESTS
    assert max(p["running"] for p in progress) <= 3
    done = [len(p["moved"]) for p in progress]
    assert done == sorted(done)

    for uuid in uuids:
        rec = b.call("instance.get", {"uuid": uuid})
        assert (rec["host"], rec["vm_state"], rec["task_state"], rec["power_state"]) == (
            "host-b", "active", None, "running"), rec
    assert a.call("instance.list") == [] and disk_dirs(a) == set()
    info = a.call("host.info")
    assert info["enabled"] is False and info["instances"] == 0
    deadline = time.monotonic() + 60
    while usage(a) or usage(b) != GUESTS * MEMORY_MB:
        assert time.monotonic() < deadline, (usage(a), usage(b))
        time.sleep(0.3)
    assert disk_dirs(b) == set(uuids)
    # The guests go on at B: each one's shell answers there.
    for uuid in uuids:
        type_into(pair.socket_of("host-b", uuid), f"echo STILL-{uuid[:8]}")
        wait_for_console(b.state_dir / "instances" / uuid / "console.log", f"STILL-{uuid[:8]}", timeout_s=60)
