"""A real QEMU guest boots from a disk the image cache made: the agent-written qcow2 overlay over
the cached base, BIOS -> syslinux -> kernel, and reads the image's bytes through it."""

from __future__ import annotations

import concurrent.futures
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_fixtures import (
    DIRECT_PREFIX,
    MARKER,
    READY,
    DirectGuest,
    destroy_direct_guest,
    disk_read,
    first_mib_md5,
    guest_image,
    libvirtd,
    start_direct_guest,
    wait_for_console,
)

from fastcompute.config import ImagesConfig
from fastcompute.images.cache import ImageCache, ImageSpec

libvirt = pytest.importorskip("libvirt")

pytestmark = [pytest.mark.guest, pytest.mark.anyio]
__all__ = ["guest_image", "libvirtd"]

BOOT_TIMEOUT_S = 120.0


@pytest.fixture
def conn(libvirtd: str) -> Iterator[Any]:
    c = libvirt.open(libvirtd)
    yield c
    c.close()


async def test_guest_boots_from_the_agents_overlay(
    conn: Any, guest_image: Path, tmp_path: Path
) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        cache = ImageCache(tmp_path / "state", ImagesConfig(disk_mode="cow", file_roots=[str(guest_image.parent)]), ex)
        uuid = str(uuidlib.uuid4())
        try:
            disk = await cache.prepare_disk(uuid, ImageSpec(url=guest_image.as_uri()), 1)
        finally:
            await cache.close()
    guest = DirectGuest(f"{DIRECT_PREFIX}{uuid}", uuid, disk, tmp_path / "console.log")
    try:
        start_direct_guest(conn, guest)
        wait_for_console(guest.console, MARKER, timeout_s=BOOT_TIMEOUT_S)
        wait_for_console(guest.console, READY, timeout_s=BOOT_TIMEOUT_S)
        assert disk_read(guest.console) == ("vda", 1 << 20, first_mib_md5(guest_image))
    finally:
        destroy_direct_guest(conn, guest)
