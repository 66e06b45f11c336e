"""The floor of a real boot storm: N guests started directly with libvirt-python.

The agent's boot storm is measured against this in the same run: the same image, the same
overlay per guest, the same domain shape (``guest_fixtures.direct_domain_xml``), the same console
marker, with nothing between the caller and libvirt but a thread per guest.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest_fixtures import (
    DirectGuest,
    boots,
    destroy_direct_guest,
    prepare_direct_guest,
    start_direct_guest,
)


@dataclass(frozen=True)
class DirectStorm:
    """What one storm measured. Wall times are seconds from the storm's start (before the first
    overlay was made) to the moment each guest's marker was seen on its console."""

    total_s: float
    per_guest_s: list[float]
    uptimes_s: list[float]

    @property
    def guests_per_minute(self) -> float:
        """Guests brought to their marker per minute of wall time."""
        return 60.0 * len(self.per_guest_s) / self.total_s


def storm_direct(conn: Any, n: int, image: Path, workdir: Path, *, timeout_s: float = 300.0,
                 poll_s: float = 0.02) -> DirectStorm:
    """Start ``n`` guests at once (overlay + ``createXML`` each, one thread per guest), wait for
    every console marker, and destroy the guests and their files whatever happened."""
    guests = [DirectGuest(f"pending-{i}", "", workdir / f"guest{i}.qcow2", workdir / f"guest{i}.console")
              for i in range(n)]
    workdir.mkdir(parents=True, exist_ok=True)

    def launch(i: int) -> None:
        # Making the overlay is part of what a spawn does, so it is inside the timed region.
        g = prepare_direct_guest(image, workdir, i)
        guests[i] = g
        start_direct_guest(conn, g)

    seen: dict[int, float] = {}
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=n) as pool:
            launched = [pool.submit(launch, i) for i in range(n)]
            deadline = t0 + timeout_s
            while len(seen) < n:
                for i, g in enumerate(guests):
                    if i not in seen and boots(g.console):
                        seen[i] = time.monotonic() - t0
                if any(f.done() and f.exception() is not None for f in launched):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n - len(seen)} of {n} guests showed no marker within {timeout_s}s:\n"
                                       + "\n".join(_tail(g.console) for i, g in enumerate(guests) if i not in seen))
                time.sleep(poll_s)
            for f in launched:
                f.result()
        per_guest = [seen[i] for i in range(n)]
        uptimes = [boots(g.console)[0].uptime_s for g in guests]
        return DirectStorm(max(per_guest), per_guest, uptimes)
    finally:
        for g in guests:
            if g.uuid:
                destroy_direct_guest(conn, g)
            else:
                g.overlay.unlink(missing_ok=True)
                g.console.unlink(missing_ok=True)


def _tail(console: Path) -> str:
    try:
        text = console.read_bytes()[-1500:].decode(errors="replace")
    except FileNotFoundError:
        text = "<no console file>"
    return f"--- {console.name}:\n{text}"


def boot_direct(conn: Any, n: int, image: Path, workdir: Path) -> tuple[float, list[float]]:
    """Seconds from the start of a direct storm of ``n`` guests to the last guest's marker, and
    each guest's seconds to its marker (see ``storm_direct``)."""
    storm = storm_direct(conn, n, image, workdir)
    return storm.total_s, storm.per_guest_s


__all__ = ["DirectStorm", "boot_direct", "storm_direct"]
