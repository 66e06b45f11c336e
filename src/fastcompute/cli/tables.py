"""Instance tables that fit the terminal: the columns and the uuid length follow its width."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from fastcompute.cli.common import out

_SHORT_UUID = 8
# Terminal widths from which the table shows the project and disk (MEDIUM) and whole uuids (WIDE).
_MEDIUM = 110
_WIDE = 140


def short_uuids(uuids: list[str]) -> int:
    """The shortest uuid prefix length, from 8, that tells these uuids apart."""
    n = _SHORT_UUID
    while n < 36 and len({u[:n] for u in uuids}) < len(uuids):
        n += 1
    return n


def colour_state(state: str) -> str:
    """A vm_state coloured for a terminal."""
    colour = {"active": "green", "error": "red", "building": "yellow", "stopped": "dim"}.get(state)
    return f"[{colour}]{state}[/]" if colour else state


def instances_table(records: list[dict[str, Any]]) -> None:
    """The instances, oldest first, in the columns the terminal has room for."""
    width = out.width
    records = sorted(records, key=lambda r: (r["created_at"], r["uuid"]))
    n = 36 if width >= _WIDE else short_uuids([r["uuid"] for r in records])
    medium = width >= _MEDIUM
    t = Table(show_edge=False, header_style="bold", pad_edge=False)
    t.add_column("UUID", no_wrap=True, min_width=n)
    t.add_column("NAME", no_wrap=True, overflow="ellipsis", ratio=1, min_width=4)
    if medium:
        t.add_column("PROJECT", no_wrap=True, overflow="ellipsis", max_width=16)
    for col in ("STATE", "TASK", "POWER"):
        t.add_column(col, no_wrap=True)
    for col in ("CPU", "MEM MB", *(("DISK GB",) if medium else ())):
        t.add_column(col, no_wrap=True, justify="right")
    for r in records:
        f = r["flavor"]
        row = [r["uuid"][:n], r["name"], *((r["project_id"],) if medium else ()), colour_state(r["vm_state"]),
               r["task_state"] or "-", r["power_state"], str(f["vcpus"]), str(f["memory_mb"]),
               *((str(f["disk_gb"]),) if medium else ())]
        t.add_row(*row)
    out.print(t)
    out.print(f"{len(records)} instances")


def show(r: dict[str, Any]) -> None:
    """One instance record, a field a line."""
    t = Table(show_header=False, show_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k in ("uuid", "name", "project_id", "vm_state", "task_state", "power_state", "host",
              "created_at", "updated_at"):
        t.add_row(k, str(r.get(k)))
    t.add_row("flavor", json.dumps(r["flavor"]))
    t.add_row("image", json.dumps(r["image"]))
    if r.get("numa"):
        t.add_row("numa", json.dumps(r["numa"]))
    if r.get("fault"):
        t.add_row("fault", f"[red]{r['fault']['code']}[/]: {r['fault']['message']}")
    out.print(t)
