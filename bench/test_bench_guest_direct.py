"""Measures (no gate): a storm of 2 real guests started directly with libvirt-python, the
baseline that the agent's boot storm is compared with. Prints the seconds to the last console
marker and the guests per minute; the guests' teardown is not part of the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from guest_direct import storm_direct
from guest_fixtures import DIRECT_PREFIX, direct_conn, guest_image, libvirtd

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["direct_conn", "guest_image", "libvirtd"]


def test_direct_storm_of_two(conn: Any, guest_image: Path, tmp_path: Path) -> None:
    s = storm_direct(conn, 2, guest_image, tmp_path / "storm")
    print(f"\ndirect storm N=2: last marker {s.total_s:.2f}s, per guest "
          f"{', '.join(f'{t:.2f}' for t in s.per_guest_s)}s (guest uptime "
          f"{', '.join(f'{u:.2f}' for u in s.uptimes_s)}s), {s.guests_per_minute:.1f} guests/min")
    assert len(s.per_guest_s) == 2
    assert not any((tmp_path / "storm").iterdir())
    assert not [d for d in conn.listAllDomains(0) if d.name().startswith(DIRECT_PREFIX)]
