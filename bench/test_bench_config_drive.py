"""Config drives: their cost against Nova's way of making them, and against spawns without one.

- one drive written in-process (the documents built, the ISO written to its file) vs Nova's
  way with the same documents: the tree written to a temporary directory and ``genisoimage``
  run on it with Nova's arguments; at least DRIVE_GATE times faster.
- a storm of 1,000 spawns with config drives vs the same storm without, in the same agent: the
  issue's goal is STORM_GOAL of its rate; the gate is STORM_GATE. Twelve pairs of storms, each
  pair back to back and in turns first; the reading is the median of the pairs' ratios. On
  this machine, whose speed changes from second to second, single pairs read 0.64-1.21 in one
  run, so five rounds (as before 2026-12-07) could not tell 0.8 from 0.85.

  History: 0.75-0.81 with the drive written on the event loop (session 5); 0.66-0.83 with it
  written in the disk job that makes the root disk (2026-12-05/06); 0.73-0.89, median 0.79,
  with Nova's default EC2 versions only (130 KiB, not 162) and the system area a hole. Since
  then the documents' paths are planned once and the patched layout is kept per shape
  (``iso._patched``): 73 us of Python a drive became ~25. Six runs of this benchmark then read
  0.80-0.90, median 0.87, and 0.78 in a clean-clone ``.ci/run`` (after ``make test``).

  What a drive still costs a spawn, measured inside the agent during storms: the documents
  ~30 us on the event loop; the write ~120-190 us of CPU in the disk worker, nearly all of it
  the kernel's (a 128 KiB file made on tmpfs: 24 pages); libvirt's parsing of a second disk
  ~150-200 us on its one thread (libxml2's XPath, malloc). Tried and not kept, as they did
  not move the ratio beyond its noise: the write in one C call without the GIL, or holding
  the GIL through it; the drive written before the build takes its slot (the storm is bound
  by the work of all threads, not by the slots); four disk threads; a lazier GC.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgspec
import pytest
from agent_fixtures import AgentProcess, spawn_args

from fastcompute.compute import configdrive
from fastcompute.config import GuestConfig
from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.images import iso
from fastcompute.protocol import Flavor, Image, InstanceRecord, KeyPair
from fastcompute.protocol.ports import Port
from fastcompute.rpc.client import AsyncClient, Client

DRIVE_GATE = 20.0
STORM_GOAL = 0.8
STORM_GATE = 0.7  # below the readings' spread (0.78-0.90), above a drive costing a third of a spawn
DRIVE_ROUNDS = 15
STORM = 1000
STORM_ROUNDS = 12
SSH_KEY = "ssh-ed25519 " + base64.b64encode(bytes(51)).decode() + " bench@host"


def _documents() -> dict[str, bytes]:
    """A typical instance's drive: one port with a gateway and DNS, a key, 2 KiB of user data."""
    rec = InstanceRecord(uuid=str(uuid_mod.uuid4()), name="bench", project_id="p", vm_state="building",
                         task_state="spawning", power_state="nostate", flavor=Flavor(vcpus=1, memory_mb=64, disk_gb=1),
                         image=Image(id="img"), host="h", numa=None, created_at="t", updated_at="t",
                         metadata={"role": "web"})
    port = msgspec.convert({"id": "p1", "mac": "fa:16:3e:00:00:01", "network": {"id": "n1"},
                            "fixed_ips": [{"ip": "10.0.0.5", "prefix": 24, "gateway": "10.0.0.1",
                                           "dns_nameservers": ["10.0.0.2"]}]}, Port)
    boot = configdrive.Bootstrap(hostname="bench", user_data=b"#cloud-config\n" + b"x" * 2048,
                                 key_pairs=[KeyPair(name="k", public_key=SSH_KEY)])
    return configdrive.instance_metadata(rec, [port], boot, skip_ec2=GuestConfig().config_drive_skip_versions)


def _ours(files: dict[str, bytes], out: Path) -> float:
    t = time.perf_counter()
    iso.write(out, files, configdrive.LABEL)
    return time.perf_counter() - t


def _nova(files: dict[str, bytes], out: Path) -> float:
    """Nova's ConfigDriveBuilder: the tree in a temporary directory, then genisoimage."""
    t = time.perf_counter()
    tree = Path(tempfile.mkdtemp(prefix="cd_gen_"))
    try:
        for rel, data in files.items():
            path = tree / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        subprocess.run(["genisoimage", "-o", str(out), "-ldots", "-allow-lowercase", "-allow-multidot", "-l",
                        "-publisher", "fastcompute", "-quiet", "-J", "-r", "-V", configdrive.LABEL, str(tree)],
                       check=True, stderr=subprocess.DEVNULL)
    finally:
        shutil.rmtree(tree)
    return time.perf_counter() - t


@pytest.mark.skipif(shutil.which("genisoimage") is None, reason="genisoimage is not installed")
def test_config_drive_in_process_vs_genisoimage(benchmark: Any, tmp_path: Path) -> None:
    ours: list[float] = []
    nova: list[float] = []
    for i in range(DRIVE_ROUNDS):
        # The documents are built inside the timed part for ours only: Nova builds them too,
        # in its own process, before it writes the tree.
        t = time.perf_counter()
        files = _documents()
        build = time.perf_counter() - t
        ours.append(build + _ours(files, tmp_path / f"ours{i}.iso"))
        nova.append(_nova(files, tmp_path / f"nova{i}.iso"))
    files = _documents()
    benchmark.pedantic(lambda: iso.write(tmp_path / "b.iso", files, configdrive.LABEL), rounds=5)
    ratio = statistics.median(nova) / statistics.median(ours)
    benchmark.extra_info.update(ours_ms=statistics.median(ours) * 1e3, genisoimage_ms=statistics.median(nova) * 1e3,
                                ratio=ratio, files=len(files))
    print(f"\nconfig drive of {len(files)} files: in-process {statistics.median(ours) * 1e3:.2f} ms, "
          f"genisoimage {statistics.median(nova) * 1e3:.2f} ms: {ratio:.1f}x (gate {DRIVE_GATE}x)")
    assert ratio >= DRIVE_GATE, f"in-process config drive only {ratio:.1f}x faster than genisoimage"


async def _storm(endpoint: str, image: Path, n: int, drive: bool) -> float:
    async with AsyncClient(endpoint, timeout_s=600) as c:
        t = time.perf_counter()
        recs = await asyncio.gather(*(
            c.call("instance.spawn", spawn_args(image, name=f"s{i}", wait=True, config_drive=drive,
                                                user_data=base64.b64encode(b"#cloud-config\n").decode(),
                                                key_pairs=[{"name": "k", "public_key": SSH_KEY}]))
            for i in range(n)))  # fmt: skip
        rate = n / (time.perf_counter() - t)
        assert all(r["vm_state"] == "active" for r in recs)
        await asyncio.gather(*(c.call("instance.delete", {"uuid": r["uuid"]}) for r in recs))
        return rate


@pytest.mark.slow
def test_storm_with_config_drives_vs_without(benchmark: Any, make_memory_agent: Any, tmp_path: Path) -> None:
    uri = write_test_host(tmp_path / "host.xml", cores=64, memory_gib=1024)
    agent: AgentProcess = make_memory_agent(config="[resources]\ndisk_gb = 1000000\n", hypervisor=uri)
    image = tmp_path / "image.raw"
    image.write_bytes(bytes(1 << 20))
    with Client(agent.control) as c:
        c.call("instance.delete", {"uuid": c.call("instance.spawn", spawn_args(image, wait=True))["uuid"]})
    with_drive: list[float] = []
    without: list[float] = []
    for i in range(STORM_ROUNDS):
        # Each pair's two storms run back to back, in turns first, so that a pair sees one
        # state of this machine (whose speed changes from second to second) and neither side
        # always follows the other's deletes.
        for drive in (False, True) if i % 2 == 0 else (True, False):
            (with_drive if drive else without).append(asyncio.run(_storm(agent.control, image, STORM, drive)))
    benchmark.pedantic(lambda: asyncio.run(_storm(agent.control, image, STORM, True)), rounds=1)
    ratio = statistics.median(w / wo for w, wo in zip(with_drive, without, strict=True))
    benchmark.extra_info.update(with_drive_per_s=statistics.median(with_drive),
                                without_per_s=statistics.median(without), ratio=ratio)
    print(f"\nstorm of {STORM}: {statistics.median(with_drive):.0f}/s with config drives, "
          f"{statistics.median(without):.0f}/s without: {ratio:.2f}, the median of {STORM_ROUNDS} pairs "
          f"{sorted(round(w / wo, 2) for w, wo in zip(with_drive, without, strict=True))} "
          f"(gate {STORM_GATE}, goal {STORM_GOAL})")
    assert ratio >= STORM_GATE, f"spawns with config drives ran at {ratio:.2f} of the rate without"
