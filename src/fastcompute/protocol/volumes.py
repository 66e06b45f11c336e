"""The wire schema of volumes (Cinder's and Nova's shapes), decoded with the request.

A volume reaches the agent as Cinder's ``connection_info``: a ``driver_volume_type`` and its
``data``. Each type is a struct tagged by that key, so an unknown type or a missing field is a
BAD_REQUEST naming the field in the same msgspec pass that decodes the request. Keys Cinder adds
that the agent does not use are ignored, as Nova ignores them. ``instance.attach_volume``
carries a :class:`VolumeSpec`, ``instance.spawn`` a ``block_device_mapping`` of
:class:`BlockDevice`; the instance record shows its attachments as :class:`VolumeRecord`
(never their connection data: CHAP passwords stay in the agent's store).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from msgspec import Meta, Struct

_PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*\Z"
Text = Annotated[str, Meta(min_length=1, max_length=255, pattern=_PRINTABLE)]
VolumeId = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:-]+\Z")]
HostName = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:\[\]-]+\Z")]
PortNumber = Annotated[int, Meta(ge=1, le=65535)]
SecretUuid = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                                         r"[0-9a-fA-F]{12}\Z")]
AbsPath = Annotated[str, Meta(min_length=2, max_length=4096, pattern=r"^/[^\x00-\x1f\x7f]*\Z")]
# Nova's device names: /dev/vdb or vdb; the prefix must fit the bus (checked with the bus).
DeviceName = Annotated[str, Meta(max_length=32, pattern=r"^(/dev/)?(vd|sd|hd)[a-z]{1,3}\Z")]
VolumeBus = Literal["virtio", "scsi", "sata"]
QosValue = Annotated[int, Meta(ge=0)] | Annotated[str, Meta(max_length=32)]

QOS_KEYS: Final = ("total_bytes_sec", "read_bytes_sec", "write_bytes_sec", "total_iops_sec",
                   "read_iops_sec", "write_iops_sec", "total_bytes_sec_max", "read_bytes_sec_max",
                   "write_bytes_sec_max", "total_iops_sec_max", "read_iops_sec_max",
                   "write_iops_sec_max", "size_iops_sec")
"""The ``qos_specs`` keys that become the volume disk's I/O limits (Nova's list); other keys
(a back end's own) are ignored."""


class _Data(Struct, kw_only=True, frozen=True):
    """What every type's ``data`` may carry: front-end QoS, discard, the access mode."""

    qos_specs: dict[Text, QosValue] | None = None
    discard: bool = False
    access_mode: Literal["rw", "ro"] = "rw"
    encrypted: bool = False


class IscsiData(_Data, frozen=True):
    """An iSCSI LUN, reached by QEMU's own initiator; CHAP when ``auth_method`` is CHAP."""

    target_portal: HostName
    target_iqn: Text
    target_lun: Annotated[int, Meta(ge=0, le=16383)] = 0
    auth_method: Literal["CHAP", "chap"] | None = None
    auth_username: Text | None = None
    auth_password: Annotated[str, Meta(min_length=1, max_length=255)] | None = None


class NbdData(_Data, frozen=True):
    """An NBD export (``qemu-storage-daemon``, ``qemu-nbd`` or any NBD server)."""

    host: HostName
    port: PortNumber = 10809
    export_name: Annotated[str, Meta(max_length=255, pattern=_PRINTABLE)] = ""


class RbdData(_Data, frozen=True):
    """A Ceph RBD image ``name`` (``pool/image``) on the monitors ``hosts``:``ports``; with
    ``auth_enabled``, the cephx user and the libvirt secret (the operator's) holding its key."""

    name: Text
    hosts: Annotated[list[HostName], Meta(min_length=1, max_length=16)]
    ports: Annotated[list[PortNumber | Annotated[str, Meta(max_length=5)]], Meta(max_length=16)]
    auth_enabled: bool = False
    auth_username: Text | None = None
    secret_uuid: SecretUuid | None = None
    secret_type: Literal["ceph"] = "ceph"


class LocalData(_Data, frozen=True):
    """A path on this host: a block device or a file the operator provides."""

    device_path: AbsPath


class IscsiConnection(Struct, tag_field="driver_volume_type", tag="iscsi", kw_only=True, frozen=True):
    """``driver_volume_type: iscsi``."""

    data: IscsiData


class NbdConnection(Struct, tag_field="driver_volume_type", tag="nbd", kw_only=True, frozen=True):
    """``driver_volume_type: nbd``."""

    data: NbdData


class RbdConnection(Struct, tag_field="driver_volume_type", tag="rbd", kw_only=True, frozen=True):
    """``driver_volume_type: rbd``."""

    data: RbdData


class LocalConnection(Struct, tag_field="driver_volume_type", tag="local", kw_only=True, frozen=True):
    """``driver_volume_type: local``: a block device (or a file) at ``device_path``."""

    data: LocalData


class FileConnection(Struct, tag_field="driver_volume_type", tag="file", kw_only=True, frozen=True):
    """``driver_volume_type: file``: a file at ``device_path``."""

    data: LocalData


ConnectionInfo = IscsiConnection | NbdConnection | RbdConnection | LocalConnection | FileConnection
"""Cinder's ``connection_info``, by its ``driver_volume_type``."""


class VolumeSpec(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A volume to attach: its id, how to reach it, and how the guest sees it (``serial``
    defaults to the id, so guests find it as ``/dev/disk/by-id/virtio-<id>``)."""

    id: VolumeId
    connection_info: ConnectionInfo
    device_name: DeviceName | None = None
    bus: VolumeBus | None = None
    read_only: bool | None = None
    serial: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+\Z")] | None = None


class BlockDevice(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One entry of a spawn's ``block_device_mapping`` (Nova's BDM v2): a volume
    (``source_type`` and ``destination_type`` volume, with its ``connection_info``), or the
    image as the local root disk (``image`` to ``local``, the default without a mapping).
    ``boot_index`` 0 is the boot disk; None or negative: not bootable."""

    source_type: Literal["volume", "image", "blank", "snapshot"]
    destination_type: Literal["volume", "local"] = "volume"
    boot_index: Annotated[int, Meta(ge=-1, le=255)] | None = None
    volume_id: VolumeId | None = None
    connection_info: ConnectionInfo | None = None
    delete_on_termination: bool = False
    device_name: DeviceName | None = None
    disk_bus: VolumeBus | None = None
    read_only: bool | None = None


AttachStatus = Literal["attaching", "attached", "detaching"]


class VolumeRecord(Struct, kw_only=True):
    """A volume of an instance as its record shows it: ``device_name`` the guest's device
    (``/dev/vdb``), ``status`` attached, or attaching/detaching while an op (or the
    reconciliation after a crash) is under way."""

    volume_id: str
    driver_volume_type: str
    device_name: str
    bus: VolumeBus
    serial: str
    read_only: bool = False
    boot_index: int | None = None
    delete_on_termination: bool = False
    size_bytes: int | None = None
    status: AttachStatus = "attached"



def split_portal(portal: str, default_port: int = 3260) -> tuple[str, int] | None:
    """An iSCSI ``target_portal`` (``host:port``, ``[v6]:port`` or a bare host) as host and
    port; None when the port is not a port number."""
    host, port = portal, str(default_port)
    if portal.startswith("["):
        end = portal.find("]")
        if end < 0:
            return None
        host, rest = portal[1:end], portal[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif portal.count(":") == 1:
        host, port = portal.split(":")
    if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


class VolumeConnectionSpec(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A volume's connection on the host an instance comes to: what Cinder answers Nova for
    that host (``volumes`` of ``instance.unshelve`` of an instance offloaded elsewhere)."""

    id: VolumeId
    connection_info: ConnectionInfo


def boot_volume(mapping: list[BlockDevice]) -> BlockDevice | None:
    """The volume a spawn boots from (its ``boot_index`` 0), or None for a local root disk."""
    return next((b for b in mapping if b.boot_index == 0 and b.source_type == "volume"), None)


def volume_type(conn: ConnectionInfo) -> str:
    """A connection's ``driver_volume_type`` (its struct's tag)."""
    return str(type(conn).__struct_config__.tag)
