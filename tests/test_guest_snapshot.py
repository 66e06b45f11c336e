"""Snapshot and shelve of a real QEMU guest (TCG) through the agent: the guest writes a marker
to its disk through its serial shell, is snapshotted while it runs (its writes going to an
overlay merged back afterwards), and a new guest spawned from the snapshot has the marker;
shelved, it costs the host nothing, and unshelved it has the marker still.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, free_port, wait_for_state
from glance_fixtures import Glance, glance
from guest_fixtures import READY, agent_domain_name, guest_image, libvirtd, virsh_names
from image_workflow_fixtures import disk_of, glance_config, glance_held, glance_image, glance_images, read_guest
from network_fixtures import links, port, remove_owned
from test_guest_agent import MEMORY_MB, agent_config, conn, guest_agent, wait_console

pytestmark = pytest.mark.guest
__all__ = ["conn", "glance", "guest_agent", "guest_image", "libvirtd"]

MARK_AT = 1023 << 20  # the last MiB of the guest's 1 GiB /dev/vda


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the guests' serial sockets."""
    d = Path(tempfile.mkdtemp(prefix="fcs-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def shell(sock_path: Path, command: str, timeout_s: float = 120.0) -> bytes:
    """Run ``command`` in the guest's root shell on its serial console; what came back."""
    nonce = uuid_mod.uuid4().hex[:8]
    status = re.compile(f"done-{nonce}-([0-9]+)".encode())
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        s.settimeout(1.0)
        s.sendall(f"{command}; echo done-{nonce}-$?\r".encode())
        seen = b""
        deadline = time.monotonic() + timeout_s
        while (found := status.search(seen)) is None:
            assert time.monotonic() < deadline, f"no answer from the guest: {seen[-500:]!r}"
            with contextlib.suppress(TimeoutError):
                seen += s.recv(65536)
    assert found.group(1) == b"0", seen[-500:]
    return seen


def test_snapshot_of_a_running_guest_and_shelve(guest_agent: Callable[..., AgentProcess], conn: Any,
                                                guest_image: Path, glance: Glance, socket_dir: Path) -> None:
    agent = guest_agent(agent_config() + glance_config(glance) +
                        f'[console]\nenabled = true\nlisten = "127.0.0.1:{free_port()}"\nsocket_dir = "{socket_dir}"\n')
    rec = agent.call("instance.spawn", {
        "name": "snap", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
        "image": {"url": guest_image.as_uri()}, "wait": True})
    uuid = rec["uuid"]
    wait_console(agent, uuid, READY)
    marker = os.urandom(16).hex()
    shell(socket_dir / f"{uuid}.sock",
          f"printf {marker} | dd of=/dev/vda bs=1M seek=1023 conv=notrunc,fsync 2>/dev/null")

    done = agent.call("instance.snapshot", {"uuid": uuid, "name": "running-guest"})
    assert glance_image(glance, done["image_id"])["status"] == "active"  # type: ignore[index]
    dom = conn.lookupByUUIDString(uuid)
    assert dom.isActive()  # it kept running, on its own disk again (the overlay merged back)
    assert f"<source file='{disk_of(agent, uuid)}'".encode() in dom.XMLDesc(0).encode()
    assert not (disk_of(agent, uuid).parent / "disk.snap").exists()
    log = agent.log()
    assert "writes go to" in log and "merged back" in log and "(active block commit)" in log
    # It still writes to its disk after the merge.
    shell(socket_dir / f"{uuid}.sock", "printf after | dd of=/dev/vda bs=1M seek=1022 conv=notrunc,fsync 2>/dev/null")

    child = agent.call("instance.spawn", {
        "name": "child", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
        "image": {"id": done["image_id"]}, "wait": True})
    assert child["vm_state"] == "active", child
    wait_console(agent, child["uuid"], READY)
    seen = shell(socket_dir / f"{child['uuid']}.sock",
                 "dd if=/dev/vda bs=1M skip=1023 count=1 2>/dev/null | head -c 32")
    assert marker.encode() in seen
    agent.call("instance.delete", {"uuid": child["uuid"]})

    off = agent.call("instance.shelve", {"uuid": uuid})
    assert off["vm_state"] == "shelved_offloaded"
    assert agent_domain_name(uuid) not in virsh_names()
    usage = agent.call("host.info")["usage"]
    assert usage.get("MEMORY_MB", 0) == 0 and usage.get("VCPU", 0) == 0
    back = agent.call("instance.unshelve", {"uuid": uuid})
    assert back["vm_state"] == "active"
    wait_console(agent, uuid, READY)
    seen = shell(socket_dir / f"{uuid}.sock", "dd if=/dev/vda bs=1M skip=1022 count=2 2>/dev/null | tr -d '\\000'")
    assert marker.encode() in seen and b"after" in seen
    assert read_guest(disk_of(agent, uuid), MARK_AT, 32) == marker.encode()


def test_a_real_guest_unshelved_on_another_agent_keeps_its_port_and_disk(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, glance: Glance,
        tmp_path: Path) -> None:
    made = []
    for name in ("a", "b"):
        tag = uuid_mod.uuid4().hex[:6]
        sockets = Path(tempfile.mkdtemp(prefix=f"fs{name}-"))
        made.append((guest_agent(agent_config() + glance_config(glance) +
                                 f'[network]\nowner = "fct{tag}"\nbridge_prefix = "b{tag}"\ntap_prefix = "t{tag[:3]}"\n'
                                 f'[console]\nenabled = true\nlisten = "127.0.0.1:{free_port()}"\n'
                                 f'socket_dir = "{sockets}"\n'), f"fct{tag}", f"t{tag[:3]}", sockets))
    (a, owner_a, tap_a, sockets_a), (b, owner_b, tap_b, sockets_b) = made
    guest_port = port("10.79.0.2", network="shelf")
    try:
        uuid = a.call("instance.spawn", {
            "name": "mover", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
            "image": {"url": guest_image.as_uri()}, "networks": [guest_port], "wait": True})["uuid"]
        wait_console(a, uuid, "FASTCOMPUTE-NET ip=10.79.0.2/24")
        wait_console(a, uuid, READY)
        marker = os.urandom(16).hex()
        shell(sockets_a / f"{uuid}.sock",
              f"printf {marker} | dd of=/dev/vda bs=1M seek=1023 conv=notrunc,fsync 2>/dev/null")

        assert a.call("instance.shelve", {"uuid": uuid})["vm_state"] == "shelved_offloaded"
        assert agent_domain_name(uuid) not in virsh_names()
        assert f"{tap_a}{guest_port['id']}"[:15] not in links()
        moving = a.call("instance.get_shelved", {"uuid": uuid})
        rec = b.call("instance.unshelve", {"uuid": uuid, "shelved": moving})
        assert rec["vm_state"] == "active" and rec["uuid"] == uuid
        wait_console(b, uuid, "FASTCOMPUTE-NET ip=10.79.0.2/24")  # the same port's address
        wait_console(b, uuid, READY)
        xml = conn.lookupByUUIDString(uuid).XMLDesc(0)
        assert f"<mac address='{guest_port['mac']}'/>" in xml and str(b.state_dir) in xml
        assert f"{tap_b}{guest_port['id']}"[:15] in links()
        seen = shell(sockets_b / f"{uuid}.sock", "dd if=/dev/vda bs=1M skip=1023 count=1 2>/dev/null | head -c 32")
        assert marker.encode() in seen
        a.call("instance.delete", {"uuid": uuid})  # the first agent forgets it; it runs on
        assert conn.lookupByUUIDString(uuid).isActive()
        b.call("instance.delete", {"uuid": uuid})
    finally:
        for owner in (owner_a, owner_b):
            remove_owned(owner)
        for d in (sockets_a, sockets_b):
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("host_down", [False, True], ids=["guest-runs-on", "host-went-down"])
def test_kill_9_mid_snapshot_of_a_running_guest_merges_its_overlay_back(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, glance: Glance,
        socket_dir: Path, host_down: bool) -> None:
    agent = guest_agent(agent_config() + glance_config(glance) + f'[console]\nenabled = true\n'
                        f'listen = "127.0.0.1:{free_port()}"\nsocket_dir = "{socket_dir}"\n')
    uuid = agent.call("instance.spawn", {
        "name": "crash", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
        "image": {"url": guest_image.as_uri()}, "wait": True})["uuid"]
    wait_console(agent, uuid, READY)
    disk = disk_of(agent, uuid)
    overlay = disk.parent / "disk.snap"
    write = "printf {} | dd of=/dev/vda bs=1M seek=1023 conv=notrunc,fsync 2>/dev/null"

    def snapshot() -> None:
        # The agent is killed under it: no reply is coming, and the snapshot goes on in the
        # agent whether its client waits or not.
        with contextlib.suppress(Exception), agent.client(timeout_s=3) as c:
            c.call("instance.snapshot", {"uuid": uuid, "name": "doomed"})

    with glance_held(glance), concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(snapshot)
        deadline = time.monotonic() + 60
        while not overlay.exists():  # the guest writes to the overlay; the agent waits for Glance
            assert time.monotonic() < deadline, agent.log()[-2000:]
            time.sleep(0.02)
        image_id = agent.call("instance.get", {"uuid": uuid})["snapshot_id"]
        agent.kill()
    assert f"<source file='{overlay}'" in conn.lookupByUUIDString(uuid).XMLDesc(0)
    shell(socket_dir / f"{uuid}.sock", write.format("inoverlay"))  # lands in the overlay
    if host_down:
        conn.lookupByUUIDString(uuid).destroy()

    agent.start()
    rec = wait_for_state(agent, uuid, "active")
    assert rec["snapshot_id"] is None and glance_image(glance, image_id) is None and glance_images(glance, uuid) == []
    dom = conn.lookupByUUIDString(uuid)
    assert dom.isActive() and f"<source file='{disk}'" in dom.XMLDesc(0) and not overlay.exists()
    assert ("(qemu-img commit)" if host_down else "(active block commit)") in agent.log()
    if host_down:
        wait_console(agent, uuid, READY, count=2)  # booted again, from its own disk
    assert read_guest(disk, MARK_AT, 9) == b"inoverlay"  # what it wrote meanwhile was merged in
    shell(socket_dir / f"{uuid}.sock", write.format("survived"))
    assert read_guest(disk, MARK_AT, 8) == b"survived"
