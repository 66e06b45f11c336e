"""ISO 9660 images (with Joliet and Rock Ridge) written in-process: config drives.

pycdlib lays out an image once per set of paths (its directories, records, path tables and
Rock Ridge entries); each image of those paths is that layout with the extents and lengths of
its own files patched in and their data after it. pycdlib puts file data last, a file's two
records (ISO 9660 and Joliet) hold nothing of it but its extent and length, and the volume
descriptors its total size. The patched layout depends only on the lengths of the files and
on which of them hold the same bytes, so the last few such shapes are kept: the drives of a boot
storm share a handful, and a drive then costs its documents and one pwritev (~7 us of Python
before the write), where pycdlib building one whole costs ~7 ms and Nova's genisoimage process
~14 ms for the same drive.

Readers see the Rock Ridge names (Linux, isoinfo -R) or the Joliet ones (Windows); the plain
ISO 9660 names, in upper case and with ``_`` for other characters, are for readers of neither.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import msgspec
import pycdlib

SECTOR = 2048
# The system area, sectors 0-15, is zeros in a config drive (no boot record, no hybrid MBR):
# it is left a hole in the file, 8 pages a drive never allocates.
_SYSTEM_AREA = 16 * SECTOR
_NOT_DCHAR = re.compile(r"[^A-Z0-9_]")
_LE, _BE = struct.Struct("<I"), struct.Struct(">I")
_VOLUME_SPACE_SIZE = 80  # in a primary or supplementary volume descriptor, both-endian


def _iso_name(part: str, is_file: bool) -> str:
    """A path component as an interchange level 3 identifier (d-characters, 30 at most)."""
    if not is_file:
        return _NOT_DCHAR.sub("_", part.upper())[:30]
    stem, _, ext = part.rpartition(".") if "." in part else (part, "", "")
    stem, ext = _NOT_DCHAR.sub("_", stem.upper()), _NOT_DCHAR.sub("_", ext.upper())
    return f"{stem[:29 - len(ext)]}.{ext};1"


def _both(value: int) -> bytes:
    return _LE.pack(value) + _BE.pack(value)


def _pycdlib_image(files: Mapping[str, bytes], label: str, publisher: str) -> tuple[bytes, dict[str, int]]:
    """The image pycdlib writes of ``files``, and the extent of each file's data."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label, pub_ident_str=publisher)
    made: dict[str, str] = {"": ""}
    try:
        for path, data in files.items():
            parts = path.split("/")
            for i in range(1, len(parts)):
                rel = "/".join(parts[:i])
                if rel not in made:
                    made[rel] = made["/".join(parts[:i - 1])] + "/" + _iso_name(parts[i - 1], False)
                    iso.add_directory(made[rel], rr_name=parts[i - 1], joliet_path="/" + rel)
            parent = made["/".join(parts[:-1])]
            iso.add_fp(io.BytesIO(data), len(data), parent + "/" + _iso_name(parts[-1], True),
                       rr_name=parts[-1], joliet_path="/" + path)
        out = io.BytesIO()
        iso.write_fp(out)
        extents = {path: iso.get_record(joliet_path="/" + path).extent_location() for path in files}
        return out.getvalue(), extents
    finally:
        iso.close()


class _Layout(msgspec.Struct, frozen=True):
    """An image's metadata for one set of paths: ``head`` the image up to the first file's
    data, ``order`` the paths in the order of their data, ``fields`` the offsets of each
    path's records' extent fields (its length follows), ``descriptors`` those of the volume
    descriptors' size fields."""

    head: bytes
    order: tuple[str, ...]
    fields: dict[str, tuple[int, ...]]
    descriptors: tuple[int, ...]


@functools.lru_cache(maxsize=32)
def _layout(paths: tuple[str, ...], label: str, publisher: str) -> _Layout:
    # One byte a file: each gets a sector of its own, and its extent and length are a pattern
    # found exactly where its two records are.
    image, extents = _pycdlib_image(dict.fromkeys(paths, b"\x00"), label, publisher)
    order = tuple(sorted(paths, key=extents.__getitem__))
    first = extents[order[0]] if order else len(image) // SECTOR
    last = first + len(order)
    if [extents[p] for p in order] != list(range(first, last)) or len(image) != last * SECTOR:
        raise RuntimeError("pycdlib no longer puts file data last, one sector after another")
    head = image[:first * SECTOR]
    if head[:_SYSTEM_AREA].count(0) != _SYSTEM_AREA:
        raise RuntimeError("pycdlib wrote something in the system area")
    fields: dict[str, tuple[int, ...]] = {}
    for path in order:
        pattern = _both(extents[path]) + _both(1)
        found = [m.start() for m in re.finditer(re.escape(pattern), head)]
        if len(found) != 2:
            raise RuntimeError(f"found {len(found)} directory records of {path}, not its ISO 9660 and Joliet ones")
        fields[path] = tuple(found)
    descriptors = []
    for sector in range(16, first):
        kind = head[sector * SECTOR]
        if kind == 255:
            break
        if kind in (1, 2):
            descriptors.append(sector * SECTOR + _VOLUME_SPACE_SIZE)
    return _Layout(head, order, fields, tuple(descriptors))


@functools.lru_cache(maxsize=16)
def _patched(paths: tuple[str, ...], label: str, publisher: str, groups: tuple[int, ...],
             lengths: tuple[int, ...]) -> bytes:
    """The layout of ``paths`` with their extents and lengths patched in: the ``i``-th path
    (in the order of their data) holds distinct data number ``g = groups[i]``, of
    ``lengths[g]`` bytes, the distinct data placed in their order after the layout.

    Kept for the last 16 shapes (2 MiB for config drives): the drives of a boot storm differ in
    content, not in these numbers (a name one character longer changes two lengths), and a
    copy of the layout with its two patches a file cost ~35 us a drive under the GIL, which a
    storm pays in every other thread's waits too."""
    layout = _layout(paths, label, publisher)
    head = bytearray(layout.head)
    sector = len(head) // SECTOR
    fields = []
    for length in lengths:
        fields.append(_both(sector) + _both(length))
        sector += (length + SECTOR - 1) // SECTOR
    for path, group in zip(layout.order, groups, strict=True):
        for offset in layout.fields[path]:
            head[offset:offset + 16] = fields[group]
    for offset in layout.descriptors:
        head[offset:offset + 8] = _both(sector)
    return bytes(head)


_ZEROS = memoryview(bytes(SECTOR))


def _parts(files: Mapping[str, bytes], label: str, publisher: str) -> list[bytes | memoryview]:
    """The image of ``files`` as the buffers that make it up, in order: the patched layout,
    then each distinct file's data and padding.

    Files of the same bytes (a document in every version directory) share one extent, as
    hard links do: a drive is then its layout and a few sectors of data."""
    paths = tuple(files)
    layout = _layout(paths, label, publisher)
    distinct: dict[bytes, int] = {}
    groups = tuple([distinct.setdefault(files[path], len(distinct)) for path in layout.order])
    parts: list[bytes | memoryview] = [_patched(paths, label, publisher, groups, tuple(map(len, distinct)))]
    for data in distinct:
        parts.append(data)
        pad = -len(data) % SECTOR
        if pad:
            parts.append(_ZEROS[:pad])
    return parts


def image(files: Mapping[str, bytes], label: str, publisher: str = "fastcompute") -> bytes:
    """The ISO image of ``files`` (relative paths with ``/``, directories made as needed),
    labelled ``label``."""
    return b"".join(_parts(files, label, publisher))


def _write_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    # One pwritev for the whole image (a regular file takes it whole); a short write goes on
    # from where it stopped.
    done = os.pwritev(fd, parts, offset)
    total = sum(map(len, parts))
    if done < total:
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            n = os.pwrite(fd, rest, offset + total - len(rest))
            rest = rest[n:]


def write(path: Path, files: Mapping[str, bytes], label: str, *, new: bool = False) -> None:
    """Write the image of ``files`` to ``path``, readable by its owner only (a config drive
    holds the tenant's user data and password).

    An existing image is replaced whole or not at all (written beside it, then renamed over
    it). ``new`` says there should be none yet, as in a build, whose resumption after a crash
    removes whatever it had half made: the image is then written at ``path`` directly, a
    file and a rename fewer (with the replacing way still taken if there is one after all).
    """
    parts = _parts(files, label, "fastcompute")
    parts[0] = memoryview(parts[0])[_SYSTEM_AREA:]
    target, fd = path, -1
    if new:
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if fd < 0:
        target = path.with_name(f".{path.name}.tmp")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            _write_all(fd, parts, _SYSTEM_AREA)
        finally:
            os.close(fd)
        if target is not path:
            os.rename(target, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise
