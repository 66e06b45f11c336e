"""Draining a host against the same moves one after another, in the same run: GUESTS TCG
guests of the project's image (1 vCPU, 128 MiB, a qcow2 overlay of the same base) on libvirt
host A (scripts/libvirt-hosts.sh).

- ``host.drain`` (``concurrency`` 3, ``wait``) of agent A, its guests going to agent B;
- as many guests started directly on A's libvirtd from the agent's guest's domain XML (their
  own files, no config drive), each moved by ``virsh migrate --live --p2p --copy-storage-inc``
  to B, one after another.

The ratio is the drain's wall time over the sum of the direct moves'. Six guests: two full
rounds of three. Measured here: 0.48-0.49 (the issue's goal is 0.5). Each migration is
CPU-bound under TCG, so three at once on two cores take ~2.9 s each against ~2.0 s alone, and
two rounds cannot do better than about 0.48: the gate, 0.6, leaves room for the load of other
work on the machine (docs/MIGRATION.md, *Draining a host*).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_fixtures import READY, guest_image, wait_for_console
from test_bench_live_migration import Direct, virsh
from test_guest_drain_agents import boot_many
from test_guest_live_migration import Host, hosts
from test_guest_live_migration_agents import Pair, started

pytestmark = pytest.mark.guest
__all__ = ["guest_image", "hosts"]

GUESTS = 6
GATE = 0.6


@pytest.fixture
def pair(hosts: tuple[Host, Host], tmp_path: Path) -> Iterator[Pair]:
    yield from started(Pair(tmp_path, hosts, consoles=False))


def test_drain_vs_sequential_virsh_migrations(pair: Pair, hosts: tuple[Host, Host], guest_image: Path,
                                             tmp_path: Path) -> None:
    a = pair.agents["host-a"]
    uuids = boot_many(a, guest_image, GUESTS)
    xml = virsh(hosts[0].uri, "dumpxml", "--inactive", uuids[0])
    directs: list[Direct] = []
    try:
        for i in range(GUESTS):
            (tmp_path / f"d{i}").mkdir()
            directs.append(Direct(hosts, guest_image, tmp_path / f"d{i}", xml))
        for d in directs:
            wait_for_console(d.console, READY, timeout_s=300)
        sequential = [d.move()[0] for d in directs]
        t = time.perf_counter()
        with a.client(timeout_s=900) as c:
            report = c.call("host.drain", {"concurrency": 3, "wait": True})
        drained = time.perf_counter() - t
    finally:
        for d in directs:
            d.remove()
    assert report["failed"] == [] and len(report["moved"]) == GUESTS, report
    ratio = drained / sum(sequential)
    print(f"\ndrain of {GUESTS} guests (concurrency 3) {drained:.2f} s, {GUESTS} sequential virsh migrations "
          f"{sum(sequential):.2f} s ({', '.join(f'{s:.2f}' for s in sequential)}), ratio {ratio:.2f} "
          f"(gate <= {GATE}, goal 0.5)")
    assert ratio <= GATE
