"""Live migration through the agents against libvirt's own, in the same run: a TCG guest of the
project's image (1 vCPU, 128 MiB, a qcow2 overlay of the same base) moved between the same two
libvirt hosts (scripts/libvirt-hosts.sh) by ``instance.live_migrate`` (``wait``) of two agents in
the hosts' namespaces, and by ``virsh migrate --live --p2p --copy-storage-inc`` of a guest
started directly from the agent's guest's own domain XML (its own files, config drive and tap),
rounds alternating, each guest moved there and back.

The agents' move also prepares the destination (claim, overlay, config, ports) and cleans the
source. Both start from the same downtime limit (the agents' ``downtime_start_ms``, set on the
rival with ``virsh migrate-setmaxdowntime``); the downtime of each (libvirt's measure of the
guest's stop at the switch-over) is reported; the goal for an idle guest is under 100 ms.

Every move, the agents' and the rival's alike, starts SETTLE_S after the one before it ended.
Without that pause the ratio read 0.77 to 2.0 in different runs, the favoured side flipping from
run to run and holding within one, with the same memory moved, the same QEMU command lines and
migration parameters, and the agents' own steps 1-2% of a move. The gap was in the destination
QEMU's main thread zeroing the transparent huge pages its incoming RAM is written to (perf: 0.39
s of ``clear_page_erms`` a move for the slow guest, 0.20 s for the fast one), so its receive
rate fell and the move took a third pass. This machine is itself a VM whose balloon reports
memory free for two seconds to its own host; how fast fresh memory faults in then depends on
what was freed just before (the previous move's source QEMU), that is on the moves' timing, not
on who drives them (the likely mechanism, not proven: touching and freeing memory before a move
did not even the two out; the pause does). With the pause both start equally cold: medians of
ten moves each 1.23-1.36 s, ratios 0.93-1.05 in six runs of five rounds here, 1.02 in one of
four. GATE is the issue's 1.2; OWN_GATE bounds the agents' move against the migration call
inside it (their preparing, switching and cleaning). The libvirt hosts run under
scripts/reaper.py: without it each move also waited 1.2-2.0 s for this machine's PID 1 to reap
the source's QEMU (docs/MIGRATION.md).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_fixtures import READY, guest_image, make_overlay, wait_for_console
from test_guest_live_migration import Host, hosts
from test_guest_live_migration_agents import Pair, boot, started

from fastcompute.config import MigrationConfig
from fastcompute.rpc.client import subscribe

pytestmark = pytest.mark.guest
__all__ = ["guest_image", "hosts"]

ROUNDS = 4
SETTLE_S = 2.5  # longer than the two seconds after which this VM hands freed memory back
GATE = 1.2
OWN_GATE = 1.3
DOWNTIME_MS = MigrationConfig().downtime_start_ms


@pytest.fixture
def pair(hosts: tuple[Host, Host], tmp_path: Path) -> Iterator[Pair]:
    yield from started(Pair(tmp_path, hosts, consoles=False))


class Direct:
    """A guest started directly on host A's libvirtd, with an overlay on each side: the agent's
    guest as libvirt has it (same devices, CPU model, machine, NIC, config drive), renamed, with
    its own files and tap, and no metadata."""

    def __init__(self, hosts: tuple[Host, Host], image: Path, workdir: Path, agent_xml: str) -> None:
        self.hosts = hosts
        self.image = image
        self.uuid = str(uuid_mod.uuid4())
        self.name = "lmbench-" + self.uuid[:8]
        self.disks = [workdir / "a.qcow2", workdir / "b.qcow2"]
        self.xml = []
        for i, disk in enumerate(self.disks):
            path = workdir / f"dom{i}.xml"
            path.write_text(self._shape(agent_xml, disk, workdir / f"console{i}.log"))
            self.xml.append(path)
        self.console = workdir / "console0.log"
        make_overlay(image, self.disks[0])
        virsh(hosts[0].uri, "create", str(self.xml[0]))
        self.at = 0

    def _shape(self, agent_xml: str, disk: Path, console: Path) -> str:
        dom = ET.fromstring(agent_xml)
        for tag, value in (("name", self.name), ("uuid", self.uuid)):
            el = dom.find(tag)
            assert el is not None
            el.text = value
        for parent, tags in ((dom, ("metadata", "seclabel")), (dom.find("devices"), ("graphics",))):
            assert parent is not None
            for tag in tags:
                for el in parent.findall(tag):
                    parent.remove(el)
        devices = dom.find("devices")
        assert devices is not None
        for d in devices.findall("disk"):
            source = d.find("source")
            if source is None:
                devices.remove(d)
            elif d.get("device") == "cdrom":
                # The agent's config drive, copied: its own on each side, as the agents have.
                drive = disk.with_suffix(".iso")
                shutil.copyfile(source.get("file", ""), drive)
                source.set("file", str(drive))
            else:
                source.set("file", str(disk))
        # The same NIC on a tap of its own, which libvirt makes on each side (the agents' is
        # theirs); unplugged, as the agents' guest's bridge is not the rival's business.
        for n, iface in enumerate(devices.findall("interface")):
            for el in iface.findall("mac"):
                el.set("address", f"52:54:00:fe:{int(self.uuid[:2], 16):02x}:{n:02x}")
            for el in iface.findall("target"):
                el.attrib = {"dev": f"lmb{self.uuid[:8]}{n}"}
        for source in [*devices.findall("serial/source"), *devices.findall("console/source")]:
            source.attrib = {"path": str(console), "append": "on"}
        for el in [*devices.findall("serial"), *devices.findall("console")]:
            el.set("type", "file")
            for log in el.findall("log"):
                el.remove(log)
        return ET.tostring(dom, encoding="unicode")

    def move(self) -> tuple[float, int | None]:
        """Move it to the other host; the wall time and the downtime libvirt measured."""
        src, dst = self.at, 1 - self.at
        self.disks[dst].unlink(missing_ok=True)
        make_overlay(self.image, self.disks[dst])
        virsh(self.hosts[src].uri, "migrate-setmaxdowntime", self.name, str(DOWNTIME_MS))
        t = time.perf_counter()
        virsh(self.hosts[src].uri, "migrate", "--live", "--p2p", "--copy-storage-inc", "--migrate-disks", "vda",
              "--xml", str(self.xml[dst]), "--migrateuri", f"tcp://{self.hosts[dst].address}",
              "--disks-uri", f"tcp://{self.hosts[dst].address}", self.name, self.hosts[dst].uri)
        took = time.perf_counter() - t
        self.at = dst
        info = virsh(self.hosts[dst].uri, "domjobinfo", self.name, "--completed")
        downtime = next((int(line.split(":")[1].split()[0]) for line in info.splitlines()
                         if line.startswith("Total downtime:")), None)
        return took, downtime

    def remove(self) -> None:
        for h in self.hosts:
            subprocess.run(["virsh", "-c", h.uri, "destroy", self.name], capture_output=True, check=False)


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(["virsh", "-c", uri, *args], check=True, capture_output=True, text=True,
                          timeout=600).stdout


def agent_move(pair: Pair, uuid: str, src: str, dst: str) -> tuple[float, float, int | None]:
    """``instance.live_migrate`` with ``wait``, SETTLE_S after subscribing to its events (which
    takes half a second of it): its time, and the migration call's time and the downtime its
    last event gives."""
    agent = pair.agents[src]

    async def run() -> tuple[float, float, int | None]:
        events = subscribe(agent.events, [f"migration.{uuid}"], curve=agent.curve)
        got: list[Any] = []

        async def listen() -> None:
            async for _topic, body in events:
                if body.get("done"):
                    got.append(body)
                    return

        listener = asyncio.get_running_loop().create_task(listen())
        await asyncio.sleep(SETTLE_S)
        t = time.perf_counter()
        await asyncio.to_thread(agent.call, "instance.live_migrate", {"uuid": uuid, "destination": dst, "wait": True})
        took = time.perf_counter() - t
        await asyncio.wait_for(listener, 10)
        return took, float(got[0]["total_s"]), got[0]["downtime_ms"]

    return asyncio.run(run())


def test_live_migration_through_the_agents_vs_virsh(pair: Pair, hosts: tuple[Host, Host], guest_image: Path,
                                                    tmp_path: Path) -> None:
    uuid = boot(pair, guest_image)
    direct = Direct(hosts, guest_image, tmp_path, virsh(hosts[0].uri, "dumpxml", "--inactive", uuid))
    try:
        wait_for_console(direct.console, READY)
        ours: list[float] = []
        calls: list[float] = []
        theirs: list[float] = []
        downtimes: dict[str, list[int | None]] = {"agents": [], "virsh": []}
        where = ["host-a", "host-b"]
        for _ in range(ROUNDS):
            for _leg in range(2):
                took, call, down = agent_move(pair, uuid, where[0], where[1])
                ours.append(took)
                calls.append(call)
                downtimes["agents"].append(down)
                where.reverse()
                time.sleep(SETTLE_S)
                took, down = direct.move()
                theirs.append(took)
                downtimes["virsh"].append(down)
    finally:
        direct.remove()
    move_s, call_s, virsh_s = (statistics.median(x) for x in (ours, calls, theirs))
    ratio, own = move_s / virsh_s, move_s / call_s
    print(f"\nlive migration through the agents {move_s:.2f} s (the migration call in it {call_s:.2f} s: "
          f"ratio {own:.2f}, gate <= {OWN_GATE}), virsh {virsh_s:.2f} s: ratio {ratio:.2f} (the issue's 1.2; "
          f"gate <= {GATE}); moves s: agents {' '.join(f'{x:.2f}' for x in ours)}, "
          f"virsh {' '.join(f'{x:.2f}' for x in theirs)}; downtime ms: agents {downtimes['agents']}, "
          f"virsh {downtimes['virsh']} (goal < 100 for an idle guest)")
    assert own <= OWN_GATE
    assert ratio <= GATE
