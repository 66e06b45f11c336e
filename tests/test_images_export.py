"""A disk chain streamed as a standalone qcow2 image (images/export.py, formats.stream_layout):
qemu-img finds the result consistent and reading the same as the chain, and only clusters
holding data are in it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
from pathlib import Path

import pytest

from fastcompute.errors import ImageError
from fastcompute.images import export
from fastcompute.images.formats import CLUSTER, create_overlay, inspect, stream_layout

MiB = 1 << 20


def _write(chain: export.ChainExport, to: Path) -> None:
    async def run() -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool, to.open("wb") as f:
            async for chunk in export.stream(chain, pool):
                f.write(chunk)

    asyncio.run(run())


def _check(path: Path) -> str:
    run = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True).returncode == 0


def test_overlay_and_base_stream_as_one_sparse_qcow2(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    with base.open("wb") as f:
        f.truncate(64 * MiB)
        f.seek(MiB)
        f.write(os.urandom(3 * MiB + 100))  # ends inside a cluster
    top = tmp_path / "disk"
    create_overlay(top, 3 << 30, str(base), "raw")  # 3 GiB: 6 L2 tables' worth of guest space
    for cmd in ("write -P 0x5a 2M 1M", "write -P 0x11 700M 100k", "write -P 0x22 2100M 64k", "write -z 1M 64k",
                "write -P 0x33 3071M 1M"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(top)], check=True, capture_output=True)

    chain = export.plan(top)
    assert chain.files == [str(top), str(base)] and chain.virtual_size == 3 << 30
    out = tmp_path / "snap.qcow2"
    _write(chain, out)
    assert out.stat().st_size == chain.size
    assert _same(out, top)
    assert inspect(out).format == "qcow2"  # no backing file: the agent's own inspector takes it
    # Only clusters with data: the base's 3 MiB + 100 bytes (49 clusters, less the 64 KiB
    # overwritten with zeros), the 100 KiB (2), the 64 KiB (1) and the last MiB (16).
    assert len(chain.clusters) == 48 + 2 + 1 + 16
    assert f"{len(chain.clusters)}/" in _check(out)


def test_a_raw_disk_streams_too(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(256 * MiB)
        f.seek(200 * MiB)
        f.write(os.urandom(5 * MiB))
    chain = export.plan(disk)
    out = tmp_path / "out.qcow2"
    _write(chain, out)
    assert _same(out, disk) and len(chain.clusters) * CLUSTER == 5 * MiB


def test_layout_with_several_refcount_blocks_is_consistent(tmp_path: Path) -> None:
    # 40000 data clusters (2.4 GiB) need two refcount blocks: the data is left as a hole, which
    # qemu-img check does not read.
    clusters = list(range(0, 80000, 2))
    meta = stream_layout(6 << 30, clusters)
    path = tmp_path / "big.qcow2"
    with path.open("wb") as f:
        f.write(meta)
        f.truncate(len(meta) + len(clusters) * CLUSTER)
    assert "40000/98304" in _check(path)


def test_a_compressed_chain_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"compressible" * MiB)
    compressed = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(compressed)], check=True)
    with pytest.raises(ImageError, match="no plain host offset"):
        export.plan(compressed)
