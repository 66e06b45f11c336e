"""The guest device names of a guest's disks (``vda``, ``sdb``, ``hdc``): a prefix per bus, and
for each disk its own ``target`` or the next name of its bus that no disk claims.

The renderer names the devices with :func:`assign`; the volume workflow picks a free name with
:func:`free_name`, so an attached volume keeps its name across restarts and detaches by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from fastcompute.hypervisor.spec import Disk

PREFIX: Final = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}
"""The device-name prefix of each bus (SCSI and SATA disks share ``sd``)."""


def name(prefix: str, index: int) -> str:
    """The index-th device name with ``prefix``: vda..vdz, vdaa, vdab, ..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return prefix + letters


def assign(disks: Sequence[Disk]) -> list[str]:
    """The device name of each disk, in order: its ``target``, or the first name of its bus's
    prefix that neither an explicit target nor an earlier disk has."""
    taken = {d.target for d in disks if d.target is not None}
    out: list[str] = []
    next_index: dict[str, int] = {}
    for d in disks:
        if d.target is not None:
            out.append(d.target)
            continue
        prefix = PREFIX[d.bus]
        i = next_index.get(prefix, 0)
        while name(prefix, i) in taken:
            i += 1
        dev = name(prefix, i)
        next_index[prefix] = i + 1
        taken.add(dev)
        out.append(dev)
    return out


def free_name(disks: Sequence[Disk], bus: str, wanted: str | None = None,
              also_taken: Iterable[str] = ()) -> str | None:
    """A device name for a new disk on ``bus``: ``wanted`` if it is free and of the bus's
    prefix, else the first free name of the prefix; None when ``wanted`` is taken or of
    another bus."""
    taken = set(assign(disks)) | set(also_taken)
    prefix = PREFIX[bus]
    if wanted is not None:
        return wanted if wanted.startswith(prefix) and wanted not in taken else None
    i = 0
    while name(prefix, i) in taken:
        i += 1
    return name(prefix, i)
