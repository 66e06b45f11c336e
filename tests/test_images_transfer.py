"""What a move copies: data past holes, a digest that does not depend on where the holes are,
and a qcow2 overlay re-pointed at this host's base and grown (checked by qemu-img)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fastcompute.images import transfer
from fastcompute.images.formats import adopt_overlay, create_overlay


def sparse(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)


def copy_through_chunks(src: Path, dst: Path, chunk: int) -> int:
    """Copy as a destination does; returns how many reads it took."""
    sink = transfer.Sink(dst, src.stat().st_size)
    offset, reads = 0, 0
    try:
        while True:
            start, data, eof = transfer.read_data(src.parent, src.name, offset, chunk)
            reads += 1
            sink.write(start, data)
            offset = start + len(data)
            if eof:
                return reads
    finally:
        sink.close()


def test_a_sparse_file_arrives_equal_and_sparse(tmp_path: Path) -> None:
    src = tmp_path / "src" / "disk"
    src.parent.mkdir()
    pieces = {0: os.urandom(5000), 300 << 20: os.urandom(70000), (1 << 30) - 10: b"end-marker"}
    sparse(src, 1 << 30, pieces)
    dst = tmp_path / "disk"
    reads = copy_through_chunks(src, dst, 1 << 16)
    assert reads < 10  # a GiB of holes costs no reads
    with dst.open("rb") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            assert f.read(len(data)) == data
    assert dst.stat().st_size == 1 << 30 and dst.stat().st_blocks * 512 < 8 << 20
    assert transfer.digest(dst) == transfer.digest(src)


def test_digest_sees_contents_not_holes(tmp_path: Path) -> None:
    data = os.urandom(3000)
    holey, dense = tmp_path / "holey", tmp_path / "dense"
    sparse(holey, 4 << 20, {2 << 20: data})
    dense.write_bytes(bytes(2 << 20) + data + bytes((4 << 20) - (2 << 20) - len(data)))
    assert transfer.digest(holey) == transfer.digest(dense)
    sparse(dense, 4 << 20, {2 << 20: data[:-1] + b"\x00" if data[-1] else data[:-1] + b"\x01"})
    assert transfer.digest(holey) != transfer.digest(dense)
    sparse(dense, 5 << 20, {2 << 20: data})
    assert transfer.digest(holey) != transfer.digest(dense)  # the size counts


def test_only_plain_files_of_the_directory_are_read(tmp_path: Path) -> None:
    (tmp_path / "inst").mkdir()
    (tmp_path / "secret").write_bytes(b"not yours")
    (tmp_path / "inst" / "link").symlink_to(tmp_path / "secret")
    for name in ("../secret", "link", ".hidden", ""):
        with pytest.raises(OSError):
            transfer.read_data(tmp_path / "inst", name, 0, 16)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_adopted_overlay_points_at_the_new_base_and_grows(tmp_path: Path) -> None:
    old_base, new_base = tmp_path / "a" / "_base" / "k", tmp_path / "b-host-base-dir" / "_base" / "k"
    for base in (old_base, new_base):
        base.parent.mkdir(parents=True)
        base.write_bytes(os.urandom(1 << 20))
    disk = tmp_path / "disk"
    create_overlay(disk, 1 << 30, str(old_base), "raw")
    adopt_overlay(disk, str(new_base), 3 << 30)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert (info["virtual-size"], info["backing-filename"]) == (3 << 30, str(new_base))
    subprocess.run(["qemu-img", "check", str(disk)], check=True, capture_output=True)
    adopt_overlay(disk, str(old_base), 1 << 30)  # never shrinks
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert (info["virtual-size"], info["backing-filename"]) == (3 << 30, str(old_base))
