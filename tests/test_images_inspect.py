"""The format inspector on hostile bytes: it refuses or accepts, and never does anything else."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcompute.images.formats import QCOW2_MAGIC, FormatError, create_overlay, inspect

GiB = 1 << 30


@pytest.fixture(scope="module")
def qcow2_header(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("inspect") / "valid.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    return path.read_bytes()[:4096]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_qcow2_headers_are_refused_or_safe(
    qcow2_header: bytes, tmp_path: Path, data: st.DataObject
) -> None:
    head = bytearray(qcow2_header)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(4, 200))
        head[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "mutated.qcow2"
    path.write_bytes(bytes(head))
    backing_offset, backing_size = struct.unpack_from(">QI", head, 8)
    try:
        fmt = inspect(path)
    except FormatError:
        return
    # Whatever is accepted is a qcow2 that names no other file.
    assert fmt.format == "qcow2"
    assert backing_offset == 0 and backing_size == 0
    assert not struct.unpack_from(">Q", head, 72)[0] & 4  # no external data file bit


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=0, max_size=2048))
def test_arbitrary_bytes_never_crash_the_inspector(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    try:
        fmt = inspect(path)
    except FormatError:
        return
    assert fmt.format in ("raw", "qcow2")
    if fmt.format == "raw":
        assert fmt.virtual_size == len(blob) and blob[:4] != QCOW2_MAGIC


def test_our_overlays_are_recognised_and_refused_as_images(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.write_bytes(b"x" * 512)
    create_overlay(tmp_path / "ov", GiB, str(base), "raw")
    with pytest.raises(FormatError, match="backing file"):
        inspect(tmp_path / "ov")
