"""Huge pages kept for the host ([resources] reserved_huge_pages) are never given to guests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastcompute.config import QuotaConfig, ResourcesConfig
from fastcompute.errors import NoCapacity
from fastcompute.resources import numa
from fastcompute.resources.tracker import HostCell, PagePool, Tracker

FLAVOR = {"vcpus": 2, "memory_mb": 256, "extra_specs": {"hw:mem_page_size": "2MB"}}


def tracker(reserved: list[str]) -> Tracker:
    cell = HostCell(0, list(range(8)), [[i] for i in range(8)], 4096, [PagePool(4, 4096 * 256), PagePool(2048, 200)])
    cfg = ResourcesConfig(disk_gb=100, reserved_host_memory_mb=0, reserved_huge_pages=reserved)
    return Tracker([cell], cfg, QuotaConfig(), Path("/"))


def test_reserved_huge_pages_are_kept_from_guests() -> None:
    request = numa.constraints(FLAVOR)
    free = tracker([])
    claim = free.claim("a", "p", 2, 256, 1, request)
    assert claim.numa_placement is not None and claim.numa_placement["cells"][0]["pagesize"] == 2048

    kept = tracker(["node:0,size:2048,count:100"])
    with pytest.raises(NoCapacity):
        kept.claim("a", "p", 2, 256, 1, request)
    assert kept.usage["MEMORY_MB"] == 0 and not kept.claims


def test_a_malformed_reservation_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="reserved_huge_pages"):
        tracker(["node:0,count:3"])
