"""The instance as the agent keeps it: the wire record and what only the agent needs, and the
record fields derived from a claim."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from fastcompute.compute import configdrive
from fastcompute.errors import BadRequest
from fastcompute.hypervisor.spec import SourceKind
from fastcompute.images.cache import ImageSpec
from fastcompute.protocol import Image, InstanceRecord, NumaCell
from fastcompute.protocol.ports import Port
from fastcompute.protocol.volumes import ConnectionInfo
from fastcompute.resources.numa_types import NumaRequest, Placement


class VolumeConnection(msgspec.Struct, kw_only=True):
    """How an attached volume is reached (Cinder's connection info, CHAP passwords and all:
    never in a record) and, for a path, whether it is a block device or a file."""

    connection_info: ConnectionInfo
    source_kind: SourceKind = "network"


class Stored(msgspec.Struct, kw_only=True):
    """An instance as the store keeps it: the wire record plus what only the agent needs
    (``volumes``: the connection of each volume of ``record.volumes``, by volume id)."""

    record: InstanceRecord
    digest: str
    request_id: str | None = None
    ports: list[Port] = []
    bootstrap: configdrive.Bootstrap | None = None
    rebuild: Image | None = None
    """The image a rebuild under way makes the new root disk from (until it is the record's)."""
    rescue: Image | None = None
    """The rescue image while the instance is being rescued or is rescued: its domain then boots
    from the rescue disk, with the root disk second."""
    soft_deleted_at: float | None = None
    """When a soft delete stopped the instance (epoch seconds): its reclaim is due an interval later."""
    volumes: dict[str, VolumeConnection] = {}
    pending_image: str | None = None
    """An image a snapshot of this instance is making in the Image service: recorded before
    it is created there, cleared once it is complete; one left by a crash is deleted."""
    shelved_at: float | None = None
    """When the instance was shelved (the offload timer's start)."""


def portable_bootstrap(stored: Stored) -> dict[str, Any] | None:
    """An instance's bootstrap data as another agent re-makes its drive from it: without the
    password, which nothing keeps beyond the first boot's drive (as in Nova)."""
    if stored.bootstrap is None:
        return None
    boot: dict[str, Any] = msgspec.to_builtins(msgspec.structs.replace(stored.bootstrap, admin_pass=None),
                                               builtin_types=(bytes,))
    return boot


def bootstrap_of(raw: dict[str, Any] | None, field: str) -> configdrive.Bootstrap | None:
    """Bootstrap data another agent gave (``portable_bootstrap``); BAD_REQUEST naming ``field``."""
    if raw is None:
        return None
    try:
        return msgspec.convert(raw, configdrive.Bootstrap)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid bootstrap data: {exc}", {"field": field}) from None


def now() -> str:
    """The current time as an RFC 3339 UTC string."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def image_spec(rec: InstanceRecord) -> ImageSpec:
    """The image of an instance as the image cache takes it."""
    return spec_of(rec.image)


def spec_of(i: Image) -> ImageSpec:
    """An image of the wire as the image cache takes it."""
    return ImageSpec(id=i.id, url=i.url, checksum=i.checksum, disk_format=i.disk_format)


def numa_cells(request: NumaRequest | None, placement: Placement | None) -> list[NumaCell] | None:
    """The record's ``numa`` field: one entry per guest cell, with its pinning if dedicated."""
    if request is None or placement is None:
        return None
    cells = []
    for i, (want, got) in enumerate(zip(request["cells"], placement["cells"], strict=True)):
        # String keys: a map on the wire has string keys, which any MessagePack client decodes.
        pinning: dict[str | int, int] | None = {str(v): p for v, p in got["pinning"]} or None
        cells.append(NumaCell(cell=i, host_cell=got["host_cell"], cpus=sorted(want["cpuset"] + want["pcpuset"]),
                              memory_mb=want["memory"], pagesize_kb=got.get("pagesize"), pinning=pinning))
    return cells
