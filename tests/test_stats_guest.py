"""A real QEMU guest under libvirtd: its cgroup found from the QEMU pid, sampled, and checked
against what libvirt itself reports for the same domain."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_fixtures import (
    READY,
    DirectGuest,
    destroy_direct_guest,
    guest_image,
    libvirtd,
    prepare_direct_guest,
    start_direct_guest,
    wait_for_console,
)

from fastcompute.hypervisor.libvirt import stats as libvirt_stats
from fastcompute.hypervisor.libvirt.names import qemu_pid
from fastcompute.hypervisor.libvirt.stats import domain_stats_flags, from_domain_stats
from fastcompute.stats.collector import (
    CgroupPaths,
    Sampler,
    StatsCollector,
    guest_source,
    host_layout,
)

libvirt = pytest.importorskip("libvirt")

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(os.geteuid() != 0, reason="libvirtd and cgroups need root"),
]
__all__ = ["guest_image", "libvirtd"]

MiB = 1 << 20


@pytest.fixture
def booted(libvirtd: str, guest_image: Path, tmp_path: Path) -> Iterator[tuple[Any, DirectGuest]]:
    # No sweep of leftover direct guests here: other test runs may share the daemon right now.
    conn = libvirt.open(libvirtd)
    guest = prepare_direct_guest(guest_image, tmp_path / "guest")
    try:
        start_direct_guest(conn, guest)
        wait_for_console(guest.console, READY, timeout_s=180.0)
        yield conn, guest
    finally:
        destroy_direct_guest(conn, guest)
        conn.close()


def _libvirt_sample(conn: Any, uuid: str) -> Any:
    return from_domain_stats(conn.getAllDomainStats(*domain_stats_flags()), {uuid: uuid})[uuid]


def test_guest_cgroup_agrees_with_libvirt(booted: tuple[Any, DirectGuest]) -> None:
    conn, guest = booted
    source = guest_source(lambda: qemu_pid(guest.name), "cgroup")
    assert isinstance(source, CgroupPaths)
    # the guest's own cgroup (libvirt's machine scope), not the emulator/vcpu children
    # libvirt puts its threads in
    assert source.key.rstrip("/").endswith(".libvirt-qemu") or ".scope" in source.key
    with Sampler() as sampler:
        sampler.add(source, key=guest.uuid)
        before = _libvirt_sample(conn, guest.uuid)
        cg = sampler.sample()[guest.uuid]
        after = _libvirt_sample(conn, guest.uuid)
        assert before.cpu_ns is not None and after.cpu_ns is not None
        if source.counts_cpu():
            # libvirt's cpu.time is the same cgroup's CPU counter: ours lies between its reads
            assert cg.cpu_ns is not None and before.cpu_ns <= cg.cpu_ns <= after.cpu_ns
            assert guest_source(lambda: qemu_pid(guest.name), "auto") == source
        else:
            # libvirt gave the guest no CPU cgroup of its own (here: cpuacct is not co-mounted
            # with cpu); the shared one is not read, and auto falls back to libvirt
            assert cg.cpu_ns is None
            assert guest_source(lambda: qemu_pid(guest.name), "auto") == "libvirt"
        if source.memory or "memory" in host_layout().unified_controllers:
            # QEMU's RAM for a 128 MiB TCG guest plus its own code: tens of MiB at least
            assert cg.memory_bytes is not None and cg.memory_bytes >= 16 * MiB
        # the guest read its own disk while booting; QEMU's block counters say so
        assert after.read_bytes is not None and after.read_bytes >= MiB
        assert after.read_ops is not None and after.read_ops > 0

        conn.lookupByUUIDString(guest.uuid).destroy()
        gone = sampler.sample()
        assert guest.uuid not in gone and guest.uuid in gone.vanished


async def _collect_twice(collector: StatsCollector) -> dict[str, Any]:
    import asyncio

    await collector.collect()
    await asyncio.sleep(0.5)
    return await collector.collect()


def test_collector_on_a_guest_both_ways(booted: tuple[Any, DirectGuest]) -> None:
    import asyncio

    conn, guest = booted
    sources = {"by-cgroup": guest_source(lambda: qemu_pid(guest.name), "cgroup"),
               "by-libvirt": f"libvirt:{guest.uuid}"}
    collector = StatsCollector(lambda: sources, None, domain_stats=lambda d: libvirt_stats.read(conn, d))
    try:
        records = asyncio.run(_collect_twice(collector))
    finally:
        collector.close()
    cg, lv = records["by-cgroup"], records["by-libvirt"]
    assert cg["source"] == "cgroup" and lv["source"] == "libvirt"
    # a TCG guest keeps QEMU busy: libvirt sees it use the CPU, and so does the cgroup if it
    # counts CPU time at all
    assert lv["cpu_pct"] > 0
    assert cg["cpu_pct"] is None or cg["cpu_pct"] > 0
    assert cg["memory_bytes"] is None or cg["memory_bytes"] >= 16 * MiB
