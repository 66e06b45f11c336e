"""A disk chain read as one standalone qcow2 stream, for an upload that stages nothing on disk.

``qemu-img map`` says, for every extent of the guest's view of a chain (an overlay and its
backing files), whether it holds data and where: in which layer and at which offset of that
layer's file. Only clusters holding data are sent; the qcow2 metadata that places them
(:func:`fastcompute.images.formats.stream_layout`) is computed from the map before the first
byte, and each data cluster is then read straight from the layer file that holds it. Zeros
and unallocated ranges cost nothing, and no second copy of the disk is ever written.

The chain must not change while it is read: the caller freezes it first (a stopped guest, a
disk-only snapshot that takes a running guest's writes, or the test hypervisor, whose disks
nothing writes).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from fastcompute.errors import ImageError
from fastcompute.images.formats import CLUSTER, stream_layout

_CHUNK_CLUSTERS = 64  # 4 MiB reads


@dataclass(frozen=True, slots=True)
class _Extent:
    start: int
    length: int
    layer: int | None
    """Index into the chain's files of the layer holding the data; None: reads as zeros."""
    offset: int


@dataclass(frozen=True, slots=True)
class ChainExport:
    """A frozen chain as the qcow2 image that will be sent: its metadata, its data clusters."""

    files: list[str]
    virtual_size: int
    extents: list[_Extent]
    clusters: list[int]
    metadata: bytes

    @property
    def size(self) -> int:
        """The bytes of the qcow2 image (metadata and data clusters)."""
        return len(self.metadata) + len(self.clusters) * CLUSTER


def _qemu_img_json(*args: str) -> object:
    import subprocess

    # -U: the chain may be open in a running QEMU (frozen under a disk-only snapshot).
    run = subprocess.run(["qemu-img", *args[:1], "-U", "--output=json", *args[1:]],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise ImageError(f"qemu-img {args[0]} failed: {run.stderr.strip()[-300:]}")
    return json.loads(run.stdout)


def plan(top: Path) -> ChainExport:
    """Map the chain under ``top`` (blocking: a worker thread's)."""
    chain = _qemu_img_json("info", "--backing-chain", str(top))
    assert isinstance(chain, list)
    files = [str(layer["filename"]) for layer in chain]
    virtual_size = int(chain[0]["virtual-size"])
    raw_map = _qemu_img_json("map", str(top))
    assert isinstance(raw_map, list)
    extents: list[_Extent] = []
    wanted: set[int] = set()
    for e in raw_map:
        start, length = int(e["start"]), int(e["length"])
        if not e.get("data") or e.get("zero"):
            extents.append(_Extent(start, length, None, 0))
            continue
        if "offset" not in e or e.get("compressed"):
            raise ImageError(f"disk {top}: a data extent at {start} has no plain host offset "
                             "(compressed or not in a file); it cannot be read directly")
        extents.append(_Extent(start, length, int(e["depth"]), int(e["offset"])))
        wanted.update(range(start // CLUSTER, (start + length - 1) // CLUSTER + 1))
    clusters = sorted(wanted)
    return ChainExport(files, virtual_size, extents, clusters, stream_layout(virtual_size, clusters))


def _read(export: ChainExport, fds: list[int], start: int, length: int) -> bytes:
    """The guest's bytes ``[start, start + length)`` of the chain."""
    out = bytearray(length)
    starts = [e.start for e in export.extents]
    i = max(0, bisect.bisect_right(starts, start) - 1)
    pos, end = start, start + length
    while pos < end and i < len(export.extents):
        e = export.extents[i]
        stop = min(end, e.start + e.length)
        if stop > pos and e.layer is not None:
            want = stop - pos
            got = os.preadv(fds[e.layer], [memoryview(out)[pos - start : stop - start]],
                            e.offset + pos - e.start)
            if got != want:
                raise ImageError(f"short read of {export.files[e.layer]} at {e.offset + pos - e.start}")
        pos = max(pos, stop)
        i += 1
    return bytes(out)


async def stream(export: ChainExport, executor: concurrent.futures.Executor,
                 progress: Callable[[int, int], None] | None = None) -> AsyncIterator[bytes]:
    """The qcow2 image of ``export``: its metadata, then its data clusters, read in a worker."""
    loop = asyncio.get_running_loop()
    fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in export.files]
    try:
        sent = len(export.metadata)
        yield export.metadata
        clusters = export.clusters
        i = 0
        while i < len(clusters):
            # A run of consecutive clusters is one read.
            j = i + 1
            while j < len(clusters) and j - i < _CHUNK_CLUSTERS and clusters[j] == clusters[j - 1] + 1:
                j += 1
            data = await loop.run_in_executor(executor, _read, export, fds, clusters[i] * CLUSTER,
                                              (j - i) * CLUSTER)
            sent += len(data)
            yield data
            if progress is not None:
                progress(sent, export.size)
            i = j
    finally:
        for fd in fds:
            os.close(fd)
