"""The wire schema of contract version 1: typed requests, replies and error codes.

Decoding and validation happen in one msgspec pass per frame: the envelope first (with ``args``
kept raw), then ``args`` against the op's own struct (``fastcompute.protocol.ops``). Nothing
here knows about libvirt, the store or sockets. ``invalid`` and ``invalid_from`` make every
BAD_REQUEST of the agent: ``invalid request: <field>: <reason>``, the field in ``details``.
"""

from __future__ import annotations

import re
import uuid as uuid_mod
from typing import Annotated, Any, Final, Literal, TypedDict, get_args

import msgspec
from msgspec import Meta, Raw, Struct

from fastcompute.errors import AgentError, BadRequest
from fastcompute.hypervisor.spec import HostCell, HypervisorInfo
from fastcompute.protocol.ports import Port, SecurityGroup
from fastcompute.protocol.volumes import BlockDevice, VolumeConnectionSpec, VolumeId, VolumeRecord, VolumeSpec
from fastcompute.resources.numa_types import HostUsage

VERSION: Final = 1


VM_STATES: Final = ("building", "active", "stopped", "paused", "suspended", "error", "deleted", "rescued",
                    "soft_deleted", "shelved", "shelved_offloaded", "resized")

# Control characters (C0, DEL, C1) end up in the hypervisor's definitions, logs and terminals, where a NUL cuts a
# name short and an escape sequence rewrites a person's screen: no text field carries them.
# Patterns end in \Z, not $: msgspec matches with re.search, where $ also matches before a
# final newline ("active\n" would pass as "active").
_PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*\Z"
RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
Name = Annotated[str, Meta(min_length=1, max_length=255, pattern=_PRINTABLE)]
ShortStr = Annotated[str, Meta(max_length=255, pattern=_PRINTABLE)]
Id = Annotated[str, Meta(min_length=1, max_length=255, pattern=_PRINTABLE)]
_HEX = "[0-9a-fA-F]"
UuidStr = Annotated[str, Meta(pattern=f"^{_HEX}{{8}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{12}}\\Z")]


class _Args(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every op's arguments: unknown keys are a BAD_REQUEST."""


class NoArgs(_Args):
    """An op without arguments."""


class Envelope(Struct, forbid_unknown_fields=True):
    """A request frame; ``args`` stays raw until the op is known."""

    v: int
    id: RequestId
    op: Annotated[str, Meta(min_length=1, max_length=64)]
    args: Raw = Raw(b"\x80")


class _IdOnly(Struct):
    """Lenient view of a frame, to echo the id of a request that failed validation."""

    id: Any = ""


class Flavor(_Args):
    """What the guest gets: CPUs, memory, root disk and Nova's extra specs."""

    vcpus: Annotated[int, Meta(ge=1, le=1024)]
    memory_mb: Annotated[int, Meta(ge=1, le=16 * 1024 * 1024)]
    disk_gb: Annotated[int, Meta(ge=0, le=65536)]
    extra_specs: dict[Id, ShortStr] = {}


class Image(_Args):
    """Where the root disk's image comes from."""

    id: Id | None = None
    url: Annotated[str, Meta(min_length=1, max_length=4096, pattern=_PRINTABLE)] | None = None
    checksum: Id | None = None
    disk_format: Annotated[str, Meta(pattern=r"^(raw|qcow2)\Z")] | None = None


class SpawnImage(Image):
    """A spawn's image: :class:`Image` and the tenant's token for the Image service, used for
    this build's Glance requests and never stored, logged or put in a record."""

    token: Annotated[str, Meta(min_length=1, max_length=8192)] | None = None

    def without_token(self) -> Image:
        """The image as the instance's record keeps it."""
        return Image(id=self.id, url=self.url, checksum=self.checksum, disk_format=self.disk_format)


# RFC 1123 host name label: ASCII letters, digits and inner hyphens, 63 at most.
Hostname = Annotated[str, Meta(min_length=1, max_length=63,
                               pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")]
MAX_USER_DATA: Final = 65535
"""The most bytes of user data a spawn may carry, once decoded (Nova's limit)."""
# Base64 of MAX_USER_DATA bytes, with room for line breaks some encoders put in.
_USER_DATA_B64 = 4 * ((MAX_USER_DATA + 2) // 3) + 4096


class KeyPair(_Args):
    """A tenant's key pair as Nova's ``os-keypairs`` gives it: an SSH public key (one
    ``authorized_keys`` line) or an x509 certificate in PEM."""

    name: Name
    public_key: Annotated[str, Meta(min_length=1, max_length=16384)]
    type: Literal["ssh", "x509"] = "ssh"


class SpawnArgs(_Args):
    """``instance.spawn``.

    ``hostname`` .. ``config_drive`` are what the guest is told at boot (its config drive and
    metadata): ``user_data`` is base64; ``config_drive`` None means ``[guest] config_drive``.
    ``block_device_mapping`` (Nova's) attaches volumes at spawn; a volume with ``boot_index`` 0
    is the boot disk, and the instance then has no local root disk.
    """

    name: Name
    flavor: Flavor
    image: SpawnImage
    uuid: UuidStr | None = None
    project_id: Id = "default"
    networks: list[Port] = []
    metadata: Annotated[dict[ShortStr, ShortStr], Meta(max_length=128)] = {}
    wait: bool = False
    hostname: Hostname | None = None
    user_data: Annotated[str, Meta(max_length=_USER_DATA_B64)] | None = None
    key_pairs: Annotated[list[KeyPair], Meta(max_length=100)] = []
    admin_pass: Annotated[str, Meta(min_length=1, max_length=255, pattern=_PRINTABLE)] | None = None
    vendor_data: dict[ShortStr, Any] | None = None
    config_drive: bool | None = None
    launch_index: Annotated[int, Meta(ge=0, le=65535)] = 0
    block_device_mapping: Annotated[list[BlockDevice], Meta(max_length=26)] = []


class UuidArgs(_Args):
    """Ops that name one instance."""

    uuid: UuidStr


_StopWait = Annotated[float, Meta(ge=0, le=3600, description="seconds of graceful shutdown before forcing")]


class StopArgs(_Args):
    """``instance.stop``."""

    uuid: UuidStr
    timeout_s: _StopWait | None = None


class RebuildArgs(_Args):
    """``instance.rebuild``: the image the new root disk is made from (its token as a spawn's)."""

    uuid: UuidStr
    image: SpawnImage


class RescueArgs(_Args):
    """``instance.rescue``: the image the rescue system boots from (None: the instance's own)."""

    uuid: UuidStr
    image: SpawnImage | None = None


class RebootArgs(_Args):
    """``instance.reboot``."""

    uuid: UuidStr
    hard: Annotated[bool, Meta(description="re-create the domain (recovers stopped and failed instances)")] = False


class ListArgs(_Args):
    """``instance.list``."""

    project_id: Id | None = None
    vm_state: Annotated[str, Meta(pattern="^(" + "|".join(VM_STATES) + r")\Z")] | None = None


class ConsoleArgs(_Args):
    """``instance.console``."""

    uuid: UuidStr
    tail_bytes: Annotated[int, Meta(ge=1, le=16 * 1024 * 1024)] = 64 * 1024


ConsoleType = Literal["novnc", "serial", "spice-html5"]
CONSOLE_TYPES: Final[tuple[str, ...]] = get_args(ConsoleType)


class GetConsoleArgs(_Args):
    """``instance.get_console``: a one-time URL of an instance's console."""

    uuid: UuidStr
    type: ConsoleType


class ConsoleUrl(msgspec.Struct, frozen=True):
    """The reply of ``instance.get_console``: the URL holds a one-time token that expires at
    ``expires_at`` (Unix time)."""

    uuid: str
    type: str
    url: str
    expires_at: float


# A user name as useradd takes it (and a Windows account's, with a trailing $).
UserName = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z_][A-Za-z0-9._-]*\$?\Z")]


class SetPasswordArgs(_Args):
    """``instance.set_password``: a user's password in the guest, set through its guest
    agent. The password is never stored, logged, put in a reply or an event."""

    uuid: UuidStr
    password: Annotated[str, Meta(min_length=1, max_length=255, pattern=_PRINTABLE)]
    user: UserName = "root"

    def __repr__(self) -> str:
        # Whatever prints the args (a log line, a traceback's locals) never shows the password.
        return f"SetPasswordArgs(uuid={self.uuid!r}, user={self.user!r}, password=<hidden>)"


class PasswordSet(msgspec.Struct, frozen=True):
    """The reply of ``instance.set_password`` (it holds no secret)."""

    uuid: str
    user: str


class Quiesced(msgspec.Struct, frozen=True):
    """The reply of ``instance.quiesce`` and ``instance.unquiesce``: how many file systems
    the guest agent froze or thawed."""

    uuid: str
    filesystems: int


class AttachPortArgs(_Args):
    """``instance.attach_port`` (extension)."""

    uuid: UuidStr
    port: Port


class DetachPortArgs(_Args):
    """``instance.detach_port`` (extension)."""

    uuid: UuidStr
    port_id: Id


class SecurityGroupsArgs(_Args):
    """``instance.set_security_groups`` (extension): Neutron's port update."""

    uuid: UuidStr
    port_id: Id
    security_groups: list[SecurityGroup]


class AttachVolumeArgs(_Args):
    """``instance.attach_volume``: Cinder's connection to a volume, attached to the guest."""

    uuid: UuidStr
    volume: VolumeSpec


class DetachVolumeArgs(_Args):
    """``instance.detach_volume``."""

    uuid: UuidStr
    volume_id: VolumeId


class ExtendVolumeArgs(_Args):
    """``instance.extend_volume``: the volume has grown (Cinder extended it) to
    ``new_size_bytes``; the guest is told."""

    uuid: UuidStr
    volume_id: VolumeId
    new_size_bytes: Annotated[int, Meta(ge=1, le=1 << 60)]


class SetEnabledArgs(_Args):
    """``host.set_enabled`` (extension): take the host out of scheduling, or back in."""

    enabled: bool
    reason: ShortStr | None = None


class PruneArgs(_Args):
    """``images.prune`` (extension)."""

    max_age_s: Annotated[float, Meta(ge=0)] | None = None


class StatsArgs(_Args):
    """``instance.stats`` (extension): one instance, or all when ``uuid`` is left out."""

    uuid: UuidStr | None = None


_Wait = Annotated[bool, Meta(description="reply when the move is over (resized, or failed) instead of once it started")]


class MigrateArgs(_Args):
    """``instance.migrate``: a cold move to another host, the flavor kept."""

    uuid: UuidStr
    destination: Annotated[Id, Meta(description="the host to move to (one of [[migration.peers]])")]
    wait: _Wait = False


class ResizeArgs(_Args):
    """``instance.resize``: a cold move to a new flavor, on this host or another."""

    uuid: UuidStr
    flavor: Flavor
    destination: Id | None = None
    wait: _Wait = False


class MoveRequest(_Args):
    """``migration.prepare`` (between agents): the move claim on the destination."""

    peer: Id
    id: UuidStr
    uuid: UuidStr
    kind: Literal["migrate", "resize"]
    flavor: Flavor
    vm_state: Literal["active", "stopped"]
    disk_format: Literal["qcow2", "raw"]
    instance: bytes
    """The instance as the source keeps it (MessagePack), opaque to the protocol."""


class PeerArgs(_Args):
    """Ops between agents that name one move: ``peer`` is the calling agent's host name."""

    peer: Id
    id: UuidStr


class MovedFile(_Args):
    """One file of a moving instance: its name in the instance's directory, size, digest."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")]
    size: Annotated[int, Meta(ge=0)]
    digest: Annotated[str, Meta(max_length=128)]


class FinishArgs(PeerArgs):
    """``migration.finish`` (between agents): copy these files from the source and start there."""

    files: Annotated[list[MovedFile], Meta(max_length=64)]


class ReadArgs(PeerArgs):
    """``migration.read`` (between agents): the next data of a moving instance's file."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")]
    offset: Annotated[int, Meta(ge=0)]
    length: Annotated[int, Meta(ge=1, le=32 << 20)]


class Chunk(Struct):
    """The reply of ``migration.read``: ``data`` found at ``offset`` (the first data at or past
    the offset asked for: holes are skipped); ``eof`` when there is no more."""

    offset: int
    data: bytes
    eof: bool


class LiveMigrateArgs(_Args):
    """``instance.live_migrate``: move a running instance to another host while it runs."""

    uuid: UuidStr
    destination: Annotated[Id, Meta(description="the host to move to (one of [[migration.peers]])")]
    block_migration: Annotated[Literal["auto", "true", "false"], Meta(
        description="copy the local disks with the memory (auto: as this host's storage needs; "
                    "false needs instance storage shared with the destination)")] = "auto"
    wait: Annotated[bool, Meta(description="reply when the guest runs at the destination (or the move failed) "
                                           "instead of once the destination is ready for it")] = False


class LivePrepareArgs(_Args):
    """``migration.live_prepare`` (between agents): the destination's claim, disks, config
    drive and ports for an incoming live migration."""

    peer: Id
    id: UuidStr
    uuid: UuidStr
    flavor: Flavor
    disk_format: Literal["qcow2", "raw"]
    instance: bytes
    """The instance as the source keeps it (MessagePack), opaque to the protocol."""
    console: bytes = b""
    """The end of the guest's console log at the source, continued at the destination."""


class NumaCell(Struct, kw_only=True):
    """One guest NUMA cell's placement in the instance record."""

    cell: int
    host_cell: int
    cpus: list[int]
    memory_mb: int
    pagesize_kb: int | None = None
    # Guest vCPU (its number as a string: every map on the wire has string keys, so that a
    # MessagePack client with default settings decodes it) to host pCPU. Integer keys are
    # still read, from records stored before, and made strings.
    pinning: dict[str | int, int] | None = None

    def __post_init__(self) -> None:
        if self.pinning is not None:
            self.pinning = {str(vcpu): pcpu for vcpu, pcpu in self.pinning.items()}


class Fault(Struct):
    """Why an instance is in ``error``."""

    code: str
    message: str


class InstanceRecord(Struct, kw_only=True):
    """The instance record of the contract: the body of replies and ``instance.<uuid>`` events."""

    uuid: str
    name: str
    project_id: str
    vm_state: str
    task_state: str | None
    power_state: str
    flavor: Flavor
    image: Image
    host: str
    numa: list[NumaCell] | None
    created_at: str
    updated_at: str
    fault: Fault | None = None
    metadata: dict[str, str] = {}
    volumes: list[VolumeRecord] = []
    snapshot_id: str | None = None
    """The image the snapshot under way uploads to, then the last snapshot's image."""
    shelved_image_id: str | None = None
    """While shelved: the snapshot unshelve builds the instance from."""


class Reply(Struct, omit_defaults=True):
    """A successful reply."""

    v: int
    id: str
    ok: bool
    result: Any = None


class ErrorBody(Struct, omit_defaults=True):
    """The ``error`` of a failed reply."""

    code: str
    message: str
    # Free-form: each error code has its own details (a field, a resource class, a uuid...).
    details: dict[str, Any] | None = None


class ErrorReply(Struct):
    """A failed reply."""

    v: int
    id: str
    ok: bool
    error: ErrorBody


# -- the results of the ops that do not reply with an instance record ---------------------------
# Field order is the order of the keys on the wire.


class PingResult(Struct):
    """``ping``."""

    version: str
    uptime_s: float


class Deleted(Struct):
    """``instance.delete``."""

    uuid: str
    deleted: bool


class Inventory(TypedDict):
    """One resource class's inventory, in Placement's fields."""

    total: int
    reserved: int
    allocation_ratio: float
    min_unit: int
    max_unit: int
    step_size: int


class Topology(Struct):
    """``host.info``'s topology: the host's NUMA cells as the hypervisor reports them."""

    cells: list[HostCell]


class HostInfo(Struct, kw_only=True):
    """``host.info`` and ``host.set_enabled``, and the body of ``host.resources`` events.

    ``inventory`` and ``usage`` are keyed by Placement resource class (a string, so that a
    scheduler reads an agent that knows a class it does not). ``generation``, ``instances``,
    ``enabled``, ``disabled_reason``, ``numa_host`` and ``server_groups`` are extensions.
    """

    hostname: str
    hypervisor: HypervisorInfo
    topology: Topology
    inventory: dict[str, Inventory]
    usage: dict[str, int]
    traits: list[str]
    generation: int
    instances: int
    enabled: bool
    disabled_reason: str | None
    numa_host: HostUsage | None
    server_groups: dict[str, list[str]]


# Instance metadata keys a scheduler sets on the members of a server group; the agent reports
# each group's members on this host in host.info and host.resources (``server_groups``).
SERVER_GROUP_KEY: Final = "fastcompute:server_group"
SERVER_GROUP_POLICY_KEY: Final = "fastcompute:server_group_policy"

_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_id_decoder = msgspec.msgpack.Decoder(_IdOnly)
_encoder = msgspec.msgpack.Encoder()
_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
# msgspec decodes nested arrays and maps recursively and raises RecursionError at the
# interpreter's recursion limit (a few hundred levels deep, depending on the stack in use).
TOO_DEEP: Final = "nested too deep: arrays and maps may nest a few hundred levels at most"


def invalid(field: str, reason: str) -> BadRequest:
    """The BAD_REQUEST of a request field: the message and ``details.field`` name it."""
    return BadRequest(f"invalid request: {field}: {reason}", {"field": field, "reason": reason})


def invalid_from(exc: msgspec.MsgspecError, prefix: str) -> BadRequest:
    """The BAD_REQUEST of a msgspec error, the field named from its ``- at `$...``` path
    under ``prefix`` (``args``, ``args.networks[0]``): the one reader of those paths."""
    m = _AT.match(str(exc))
    reason = m.group("reason") if m else str(exc)
    path = (m.group("path") or "") if m else ""
    field = prefix + path
    named = reason.startswith(("Object contains unknown field", "Object missing required field"))
    if named and "`" in reason:
        # msgspec points at the map; the field a person must fix is the one it names.
        field = field + "." + reason.split("`")[1]
    return invalid(field.lstrip(".") or "<frame>", reason)


def parse_uint(text: str) -> int | None:
    """``text`` as a non-negative integer written in ASCII digits, else None.

    ``str.isdigit`` accepts ``²`` and other digits ``int`` refuses (or reads, as it does
    Arabic-Indic ones); every integer carried in a string (extra specs, protocol numbers)
    goes through here.
    """
    stripped = text.strip()
    if not stripped or not stripped.isascii() or not stripped.isdigit():
        return None
    return int(stripped)


def request_id_of(frame: bytes) -> str:
    """The request id of a frame, if one can be read at all; ``""`` otherwise."""
    try:
        rid = _id_decoder.decode(frame).id
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return ""
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else ""


def decode_envelope(frame: bytes) -> Envelope:
    """Decode a request frame's envelope; raises BadRequest with the offending field."""
    try:
        env = _envelope_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise invalid_from(exc, "") from None
    except RecursionError:
        raise invalid("<frame>", TOO_DEEP) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(
            "the frame is not a MessagePack map: send {v, id, op, args}",
            {"field": "<frame>", "reason": str(exc)},
        ) from None
    if env.v != VERSION:
        raise BadRequest(
            f"unsupported protocol version {env.v}; this agent speaks version {VERSION}",
            {"field": "v", "reason": f"expected {VERSION}"},
        )
    return env


def normalise_uuid(value: str) -> str:
    """The canonical lowercase, hyphenated form of a uuid string."""
    return str(uuid_mod.UUID(value))


def encode_ok(request_id: str, result: Any) -> bytes:
    """Encode a successful reply."""
    return _encoder.encode(Reply(VERSION, request_id, True, result))


def encode_error(request_id: str, error: AgentError) -> bytes:
    """Encode a failed reply from a typed error."""
    return _encoder.encode(
        ErrorReply(VERSION, request_id, False, ErrorBody(error.code, error.message, error.details))
    )


def encode(obj: Any) -> bytes:
    """Encode any wire value (structs, maps, lists) as MessagePack."""
    return _encoder.encode(obj)


class SnapshotArgs(_Args):
    """``instance.snapshot``: the new image's name and extra properties."""

    uuid: UuidStr
    name: Name
    properties: Annotated[dict[Id, ShortStr], Meta(max_length=64)] = {}


class Snapshotted(msgspec.Struct, frozen=True):
    """The reply of ``instance.snapshot``: the new image in the Image service."""

    uuid: str
    image_id: str
    name: str
    size: int


class ShelvedInstance(Struct, kw_only=True):
    """An offloaded instance as another agent unshelves it: its record, its ports, the
    snapshot it is built from (None: it boots from a volume) and what its guest is told at
    boot (without its password)."""

    record: InstanceRecord
    image_id: Id | None
    ports: list[Port] = []
    bootstrap: dict[str, Any] | None = None


class UnshelveArgs(_Args):
    """``instance.unshelve``: ``shelved`` carries an instance offloaded on another agent, and
    ``volumes`` this host's connection of each of its volumes."""

    uuid: UuidStr
    shelved: ShelvedInstance | None = None
    volumes: Annotated[list[VolumeConnectionSpec], Meta(max_length=26)] = []


class InstanceCopy(Struct, kw_only=True):
    """An instance as ``instance.export`` gives it, for a rebuild on another host should its
    own go down (``instance.evacuate``): its record, ports and what its guest is told at boot
    (without its password). The caller keeps it, as Nova's database keeps the instance."""

    record: InstanceRecord
    ports: list[Port] = []
    bootstrap: dict[str, Any] | None = None


class EvacuateArgs(_Args):
    """``instance.evacuate`` (to the destination): rebuild an instance of a host that is down."""

    uuid: UuidStr
    instance: Annotated[InstanceCopy, Meta(description="the instance as instance.export last gave it")]
    source: Annotated[Id | None, Meta(description="the host it was on (default: instance.record.host)")] = None


class EvacuatedArgs(_Args):
    """``migration.evacuated`` (destination to source): these instances live on the caller now;
    an empty list only asks whether the source answers."""

    peer: Id
    uuids: Annotated[list[UuidStr], Meta(max_length=4096)] = []


class DrainArgs(_Args):
    """``host.drain`` (extension): take the host out of scheduling and move its instances away."""

    live: Annotated[bool, Meta(description="move running instances live (cold drains are not built: false "
                                           "is refused)")] = True
    concurrency: Annotated[int, Meta(ge=1, le=8, description="moves under way at once")] = 3
    wait: Annotated[bool, Meta(description="reply with the final report instead of once the drain started")] = False


class PeerHostArgs(_Args):
    """``migration.host_info`` (between agents): the callee's ``host.info``, for a drain's placement."""

    peer: Id


class DrainMoved(Struct, kw_only=True):
    """An instance a drain moved, and where to."""

    uuid: str
    destination: str


class DrainFailed(Struct, kw_only=True):
    """An instance a drain could not move: the error code and why."""

    uuid: str
    code: str
    message: str


class DrainReport(Struct, kw_only=True):
    """``host.drain``'s reply and the body of its ``host.drain`` events: counts so far, and
    ``done`` once every instance has moved or been reported."""

    host: str
    done: bool
    total: int
    running: int
    moved: list[DrainMoved]
    failed: list[DrainFailed]
