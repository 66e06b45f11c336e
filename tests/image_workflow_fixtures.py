"""Agents that save images to the real Glance of the tests, and what a test checks of Glance."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from agent_fixtures import AgentProcess
from glance_fixtures import Glance, identity

# The agent acts in Glance as an admin of its own service project: snapshots are owned by
# the instance's project (Nova's "owner"), which only an admin may set for another project.
AGENT_IDENTITY = identity("service", "admin,member,reader")


def glance_config(glance: Glance, extra: str = "") -> str:
    """An agent config whose images (and snapshots) go to ``glance``."""
    headers = ", ".join(f'"{k}: {v}"' for k, v in AGENT_IDENTITY.items())
    return f'[images]\nglance_endpoint = "{glance.endpoint}"\nglance_headers = [{headers}]\n{extra}'


def glance_image(glance: Glance, image_id: str) -> dict[str, Any] | None:
    """Glance's record of an image, None when it does not exist (or is deleted)."""
    r = httpx.get(f"{glance.endpoint}/v2/images/{image_id}", headers=AGENT_IDENTITY, timeout=30)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return dict(r.json())


def glance_images(glance: Glance, instance_uuid: str) -> list[dict[str, Any]]:
    """Every image Glance has (in any state) made from ``instance_uuid``."""
    r = httpx.get(f"{glance.endpoint}/v2/images", params={"instance_uuid": instance_uuid, "limit": 100},
                  headers=AGENT_IDENTITY, timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["images"])


def download(glance: Glance, image_id: str, to: Path) -> Path:
    """An image's data, as a file."""
    with httpx.stream("GET", f"{glance.endpoint}/v2/images/{image_id}/file", headers=AGENT_IDENTITY,
                      timeout=60) as r:
        assert r.status_code == 200
        with to.open("wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)
    return to


def disk_of(agent: AgentProcess, uuid: str) -> Path:
    """An instance's root disk file."""
    return agent.state_dir / "instances" / uuid / "disk"


def same_content(a: Path, b: Path) -> bool:
    """Whether two disk images read the same to a guest (``qemu-img compare``)."""
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


def write_marker(disk: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into a qcow2 disk at the guest offset ``offset``, as its guest would."""
    with tempfile.NamedTemporaryFile() as src:
        src.write(data)
        src.flush()
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {src.name} {offset} {len(data)}", str(disk)],
                       check=True, capture_output=True)


def read_guest(disk: Path, offset: int, length: int) -> bytes:
    """What a guest reads from a disk image at ``offset``."""
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(raw)], check=True, capture_output=True)
        with raw.open("rb") as f:
            f.seek(offset)
            return f.read(length)


@contextlib.contextmanager
def glance_held(glance: Glance) -> Iterator[None]:
    """Glance stopped (SIGSTOP, its workers too) inside the block: a request to it waits there."""
    children = Path(f"/proc/{glance.pid}/task/{glance.pid}/children").read_text().split()
    pids = [glance.pid, *(int(c) for c in children)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def wait_task(agent: AgentProcess, uuid: str, task: str, timeout_s: float = 30.0) -> None:
    """Poll until the instance is busy with ``task``."""
    deadline = time.monotonic() + timeout_s
    with agent.client() as c:
        while time.monotonic() < deadline:
            if c.call("instance.get", {"uuid": uuid})["task_state"] == task:
                return
            time.sleep(0.01)
    raise AssertionError(f"instance {uuid} never got to {task}")
