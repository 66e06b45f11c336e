"""Image formats from the bytes: detection, qcow2 header checks and qcow2 overlays.

The inspector reads only the first bytes of a file and decides what it is, so that nothing
from an image (a backing file name, an external data file) is ever followed. The overlay
writer creates a qcow2 v3 file backed by a cached base without spawning ``qemu-img``: the
header, one refcount table, one refcount block and an empty L1 table are all a new overlay
has, and writing them is a few syscalls.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

QCOW2_MAGIC = b"QFI\xfb"
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
# How many bytes the detector needs: the qcow2 header with its extensions lives in cluster 0,
# and the ISO 9660 signature is at 32 KiB + 1.
PROBE_BYTES = 1 << 16

_EXT_END = 0x00000000
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION = 1 << 3
_INCOMPAT_EXTENDED_L2 = 1 << 4
_INCOMPAT_KNOWN = (
    _INCOMPAT_DIRTY | _INCOMPAT_CORRUPT | _INCOMPAT_DATA_FILE | _INCOMPAT_COMPRESSION
    | _INCOMPAT_EXTENDED_L2
)
# qcow2 v2/v3 header up to header_length (v3): big-endian.
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")

# Formats we recognise only to refuse them by name, with where their signature lives.
_OTHER_SIGNATURES: tuple[tuple[str, int, bytes], ...] = (
    ("vmdk", 0, b"KDMV"),
    ("vmdk", 0, b"# Disk DescriptorFile"),
    ("vhdx", 0, b"vhdxfile"),
    ("vpc", 0, b"conectix"),
    ("qed", 0, b"QEF\x00"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("vdi", 0x40, b"\x7f\x10\xda\xbe"),
    ("iso", 0x8001, b"CD001"),
    ("compressed archive (gzip)", 0, b"\x1f\x8b\x08"),
    ("compressed archive (xz)", 0, b"\xfd7zXZ\x00"),
    ("compressed archive (zstd)", 0, b"\x28\xb5\x2f\xfd"),
)


class FormatError(ValueError):
    """The bytes are not an image this agent will use; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageFormat:
    """What the inspector found: the format and the guest-visible (virtual) size."""

    format: str
    virtual_size: int


def inspect(path: Path) -> ImageFormat:
    """Detect the format of ``path`` from its bytes and check it is safe to use.

    Raw and qcow2 are accepted; a qcow2 naming a backing file or an external data file, an
    encrypted, corrupt or dirty one, and every other recognised format are refused with
    :class:`FormatError`.
    """
    with open(path, "rb") as f:
        head = f.read(PROBE_BYTES)
        size = os.fstat(f.fileno()).st_size
        if head[:4] == QCOW2_MAGIC:
            return ImageFormat("qcow2", _check_qcow2(head))
        for name, offset, signature in _OTHER_SIGNATURES:
            if head[offset : offset + len(signature)] == signature:
                raise FormatError(
                    f"the image is in {name} format; only raw and qcow2 are supported"
                )
        if size >= 512:
            # A VHD (vpc) keeps its signature in a footer at the end of the file.
            f.seek(size - 512)
            if f.read(8) == b"conectix":
                raise FormatError(
                    "the image is in vpc (VHD) format; only raw and qcow2 are supported"
                )
    return ImageFormat("raw", size)


def _check_qcow2(head: bytes) -> int:
    if len(head) < _HEADER.size:
        raise FormatError("the image has a truncated qcow2 header")
    (
        _magic, version, backing_offset, backing_size, cluster_bits, virtual_size,
        crypt_method, _l1_size, _l1_offset, _rt_offset, _rt_clusters, _nb_snapshots, _snap_offset,
    ) = _HEADER.unpack_from(head)
    if version not in (2, 3):
        raise FormatError(
            f"the image is qcow2 version {version}; only versions 2 and 3 are supported"
        )
    if backing_offset != 0 or backing_size != 0:
        raise FormatError(
            "the qcow2 image names a backing file; such images can make the guest read host "
            "files, so they are refused: flatten it first (qemu-img convert -O qcow2)"
        )
    if crypt_method != 0:
        raise FormatError("the qcow2 image is encrypted; encrypted images are not supported")
    if not 9 <= cluster_bits <= 21:
        raise FormatError(f"the qcow2 image has an invalid cluster size (2^{cluster_bits})")
    if version == 3:
        if len(head) < _HEADER.size + _HEADER_V3.size:
            raise FormatError("the image has a truncated qcow2 v3 header")
        incompatible, _compat, _autoclear, _refcount_order, header_length = _HEADER_V3.unpack_from(
            head, _HEADER.size
        )
        if incompatible & _INCOMPAT_DATA_FILE:
            raise FormatError(
                "the qcow2 image uses an external data file; such images can make the guest "
                "read host files, so they are refused: convert it first (qemu-img convert -O qcow2)"
            )
        if incompatible & _INCOMPAT_CORRUPT:
            raise FormatError(
                "the qcow2 image is marked corrupt; repair it with qemu-img check -r all"
            )
        if incompatible & _INCOMPAT_DIRTY:
            raise FormatError(
                "the qcow2 image is dirty (not closed cleanly); run qemu-img check -r all"
            )
        if incompatible & ~_INCOMPAT_KNOWN:
            raise FormatError(f"the qcow2 image needs unknown features (0x{incompatible:x})")
        _check_extensions(head, header_length)
    if virtual_size == 0:
        raise FormatError("the qcow2 image has a virtual size of 0")
    return int(virtual_size)


def _check_extensions(head: bytes, offset: int) -> None:
    # A data-file name extension without the incompatible bit would be ignored by qemu, but
    # refusing it costs nothing and closes the door on parsers that disagree.
    while offset + 8 <= len(head):
        ext_type, length = struct.unpack_from(">II", head, offset)
        if ext_type == _EXT_END:
            return
        if ext_type == _EXT_DATA_FILE:
            raise FormatError(
                "the qcow2 image names an external data file; such images can make the guest "
                "read host files, so they are refused"
            )
        offset += 8 + ((length + 7) & ~7)


def overlay_layout(
    virtual_size: int, backing_file: str, backing_format: str
) -> tuple[bytes, int, int]:
    """The bytes of a new overlay's cluster 0 and its refcount structures.

    Returns ``(header, clusters, file_length)``: the start of cluster 0 (header, extensions,
    backing file name), how many clusters the file has (each with refcount 1) and its length;
    see :func:`create_overlay`.
    """
    name = os.fsencode(backing_file)
    fmt = backing_format.encode()
    l2_entries = CLUSTER // 8
    l1_size = max(1, -(-virtual_size // (CLUSTER * l2_entries)))
    l1_clusters = -(-(l1_size * 8) // CLUSTER)
    refcount_table = 1 * CLUSTER
    l1_offset = 3 * CLUSTER
    clusters = 3 + l1_clusters
    header_length = _HEADER.size + _HEADER_V3.size
    ext = struct.pack(">II", _EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust((len(fmt) + 7) & ~7, b"\0")
    ext += struct.pack(">II", _EXT_END, 0)
    backing_offset = header_length + len(ext)
    if backing_offset + len(name) > CLUSTER or len(name) > 1023:
        raise ValueError(f"backing file name too long for a qcow2 header: {backing_file}")
    header = _HEADER.pack(
        QCOW2_MAGIC, 3, backing_offset, len(name), CLUSTER_BITS, virtual_size,
        0, l1_size, l1_offset, refcount_table, 1, 0, 0,
    ) + _HEADER_V3.pack(0, 0, 0, 4, header_length)
    if clusters > CLUSTER // 2:
        raise ValueError("virtual size too large for a single refcount block")
    return header + ext + name, clusters, clusters * CLUSTER


def create_overlay(path: Path, virtual_size: int, backing_file: str, backing_format: str) -> None:
    """Write a qcow2 v3 overlay of ``virtual_size`` bytes backed by ``backing_file``.

    Layout: cluster 0 the header (with the backing format extension and the backing file
    name), cluster 1 the refcount table, cluster 2 its single refcount block (16-bit
    refcounts), then the L1 table, all zero (every read falls through to the backing file).
    The size is rounded up to whole 512-byte sectors, as ``qemu-img create`` does. The file
    is created exclusively: an existing disk is never overwritten.
    """
    virtual_size = -(-virtual_size // 512) * 512
    header, clusters, length = overlay_layout(virtual_size, backing_file, backing_format)
    refcounts = struct.pack(f">{clusters}H", *([1] * clusters))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        os.pwrite(fd, struct.pack(">Q", 2 * CLUSTER), CLUSTER)
        os.pwrite(fd, refcounts, 2 * CLUSTER)
        os.ftruncate(fd, length)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


_REFCOUNTS_PER_BLOCK = CLUSTER // 2  # 16-bit refcounts
_L2_ENTRIES = CLUSTER // 8
_COPIED = 1 << 63


def stream_layout(virtual_size: int, clusters: list[int]) -> bytes:
    """The metadata of a standalone qcow2 v3 image whose data clusters follow it, in order.

    ``clusters`` are the guest cluster numbers (of :data:`CLUSTER` bytes, sorted, unique)
    that hold data; every other cluster reads as zeros. The returned bytes are the file's
    first clusters: the header, the refcount table and blocks, the L1 table and the L2 tables.
    The data clusters are then written one after the other, in the order of ``clusters``, so
    the whole image can be sent as a stream without seeking back.
    """
    l1_size = max(1, -(-virtual_size // (CLUSTER * _L2_ENTRIES)))
    l1_clusters = -(-(l1_size * 8) // CLUSTER)
    tables = sorted({c // _L2_ENTRIES for c in clusters})
    fixed = 1 + l1_clusters + len(tables) + len(clusters)
    rt_clusters, rb_clusters = 1, 1
    while True:
        total = fixed + rt_clusters + rb_clusters
        rb = -(-total // _REFCOUNTS_PER_BLOCK)
        rt = -(-(rb * 8) // CLUSTER)
        if (rb, rt) == (rb_clusters, rt_clusters):
            break
        rb_clusters, rt_clusters = rb, rt
    rt_at = 1
    rb_at = rt_at + rt_clusters
    l1_at = rb_at + rb_clusters
    l2_at = l1_at + l1_clusters
    data_at = l2_at + len(tables)
    meta = bytearray(data_at * CLUSTER)
    header_length = _HEADER.size + _HEADER_V3.size
    meta[:header_length] = _HEADER.pack(
        QCOW2_MAGIC, 3, 0, 0, CLUSTER_BITS, virtual_size, 0, l1_size, l1_at * CLUSTER,
        rt_at * CLUSTER, rt_clusters, 0, 0,
    ) + _HEADER_V3.pack(0, 0, 0, 4, header_length)
    for i in range(rb_clusters):
        struct.pack_into(">Q", meta, rt_at * CLUSTER + 8 * i, (rb_at + i) * CLUSTER)
    struct.pack_into(f">{total}H", meta, rb_at * CLUSTER, *([1] * total))
    table_of = {t: l2_at + i for i, t in enumerate(tables)}
    for t, at in table_of.items():
        struct.pack_into(">Q", meta, l1_at * CLUSTER + 8 * t, (at * CLUSTER) | _COPIED)
    for i, c in enumerate(clusters):
        entry = table_of[c // _L2_ENTRIES] * CLUSTER + 8 * (c % _L2_ENTRIES)
        struct.pack_into(">Q", meta, entry, ((data_at + i) * CLUSTER) | _COPIED)
    return bytes(meta)


def adopt_overlay(path: Path, backing_file: str, virtual_size: int) -> None:
    """Point a qcow2 overlay this agent made (on another host) at ``backing_file``, and grow it
    to ``virtual_size`` bytes when that is more than it has.

    The header's backing name is rewritten in cluster 0 (where ``create_overlay`` put it, with
    room to spare); growing only raises the size and the L1 table's length, which stays in the
    clusters it has (one cluster of L1 entries covers 4 TiB). Anything else: ValueError.
    """
    name = os.fsencode(backing_file)
    with path.open("r+b") as f:
        head = f.read(CLUSTER)
        if len(head) < _HEADER.size or head[:4] != QCOW2_MAGIC:
            raise ValueError(f"{path} is not a qcow2 file")
        fields = list(_HEADER.unpack_from(head))
        backing_offset, size, l1_size, l1_offset = fields[2], fields[5], fields[7], fields[8]
        if not backing_offset or backing_offset + len(name) > CLUSTER or len(name) > 1023:
            raise ValueError(f"{path} is not an overlay whose backing name can be rewritten")
        new_size = max(size, -(-virtual_size // 512) * 512)
        new_l1 = max(l1_size, -(-new_size // (CLUSTER * (CLUSTER // 8))))
        if -(-new_l1 * 8 // CLUSTER) > -(-l1_size * 8 // CLUSTER) or l1_offset % CLUSTER:
            raise ValueError(f"{path}: growing to {new_size} bytes needs a larger L1 table")
        old_name = fields[3]
        fields[3], fields[5], fields[7] = len(name), new_size, new_l1
        f.seek(0)
        f.write(_HEADER.pack(*fields))
        f.seek(backing_offset)
        f.write(name + bytes(max(0, old_name - len(name))))
        f.flush()
        os.fsync(f.fileno())
