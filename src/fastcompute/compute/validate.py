"""The validation stage: every check a request can fail without looking at the host's state.

It runs on the decoded args (``protocol.ops.decode_args`` already checked types, ranges and
unknown fields) and before the manager: an image's URL, checksum and format, every ``hw:`` and
``quota:`` extra spec of a flavor, the form of ports (MAC, addresses) and of security-group
rules. A request that fails here is a BAD_REQUEST naming the field, and nothing has been
claimed, recorded or published. What needs the host's state (a port id or MAC another
instance holds, an instance's vm_state, capacity) stays with the manager.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import msgspec

from fastcompute import protocol
from fastcompute.compute import cpu, hardware
from fastcompute.compute.configdrive import decode_user_data
from fastcompute.compute.guest import QUOTA_LIMITS, VIF_SHAPING
from fastcompute.errors import BadRequest
from fastcompute.images.cache import check_url, parse_checksum
from fastcompute.network import check_ports, check_rule
from fastcompute.protocol import (
    MAX_USER_DATA,
    AttachPortArgs,
    Flavor,
    Image,
    KeyPair,
    RebuildArgs,
    RescueArgs,
    SecurityGroupsArgs,
    SpawnArgs,
)
from fastcompute.protocol.ports import Port, SecurityGroup
from fastcompute.protocol.schema import AttachVolumeArgs, UnshelveArgs
from fastcompute.protocol.volumes import (
    QOS_KEYS,
    BlockDevice,
    ConnectionInfo,
    IscsiConnection,
    RbdConnection,
    VolumeSpec,
    boot_volume,
    split_portal,
)
from fastcompute.resources import numa
from fastcompute.resources.numa_types import NumaRequest

QUOTA_KEYS: Final = frozenset(QUOTA_LIMITS) | frozenset(VIF_SHAPING)
_INT64_MAX: Final = 2**63 - 1  # libvirt's cputune and iotune values are 64-bit
MAX_VENDOR_DATA: Final = 65535
"""The most bytes of a spawn's vendor data, encoded as JSON."""
# One authorized_keys line: the key's type, its base64 blob, a comment (no line break: a
# second line would be a second key).
_SSH_KEY = re.compile(r"^(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp(?:256|384|521)"
                      r"|sk-(?:ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) ([A-Za-z0-9+/]+={0,2})(?: [^\r\n]*)?$")
_PEM = re.compile(r"^-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END CERTIFICATE-----\r?\n?$")

_A = TypeVar("_A")


def _renamed(exc: BadRequest, field: str) -> BadRequest:
    """``exc`` (raised by another module with its own field name) as the stage's BAD_REQUEST."""
    reason = str((exc.details or {}).get("reason") or exc.message)
    return protocol.invalid(field, reason)


def flavor_request(flavor: Flavor) -> NumaRequest | None:
    """Check a flavor's extra specs; return its NUMA request (None for a floating guest).

    ``hw:`` keys are Nova's and checked by ``numa.constraints`` (the NUMA and CPU-policy ones)
    and ``hardware.hardware`` (machine, firmware, devices, CPU topology; also ``os:``,
    ``hw_rng:``, ``hw_video:`` and the image-property spellings it takes); ``quota:`` keys must
    be known and non-negative integers in ASCII digits, disk totals not mixed with their read
    and write halves, a network peak or burst only with its average; ``trait:`` keys name a
    trait and say required or forbidden. Keys of other namespaces are left to the scheduler,
    as Nova leaves them. Errors are BAD_REQUEST naming the key.
    """
    prefix = "args.flavor.extra_specs."
    for key, value in flavor.extra_specs.items():
        if key.startswith(cpu.TRAIT_PREFIX) and (problem := cpu.trait_problem(key, value)) is not None:
            raise protocol.invalid(prefix + key, problem)
        if key.startswith("quota:"):
            if key not in QUOTA_KEYS:
                raise protocol.invalid(prefix + key, f"unknown quota: key; known: {', '.join(sorted(QUOTA_KEYS))}")
            # Digits alone: libvirt takes the value as written, so " 1" is no number here.
            number = protocol.parse_uint(value) if value.isascii() and value.isdigit() else None
            if number is None or number > _INT64_MAX:
                raise protocol.invalid(prefix + key, f"must be a non-negative integer, not {value!r}")
    _quota_combinations(flavor.extra_specs, prefix)
    try:
        hardware.hardware(flavor.extra_specs, flavor.vcpus)
    except BadRequest as exc:
        raise _renamed(exc, prefix + str((exc.details or {}).get("field", ""))) from None
    try:
        request = numa.constraints(
            {"vcpus": flavor.vcpus, "memory_mb": flavor.memory_mb, "extra_specs": flavor.extra_specs})
    except BadRequest as exc:
        field = str((exc.details or {}).get("field", ""))
        raise _renamed(exc, prefix + field if field.startswith("hw:") else "args.flavor." + field) from None
    try:
        # Again with the guest's NUMA cells, which its CPU topology must not split a core across.
        hardware.hardware(flavor.extra_specs, flavor.vcpus, hardware.cell_cpus(request))
    except BadRequest as exc:
        raise _renamed(exc, prefix + str((exc.details or {}).get("field", ""))) from None
    return request


def _quota_combinations(specs: dict[str, str], prefix: str) -> None:
    # libvirt refuses a total limit beside a read or write one of the same kind, and a
    # bandwidth peak or burst without its average.
    for kind in ("bytes", "iops"):
        total = f"quota:disk_total_{kind}_sec"
        if total in specs and any(f"quota:disk_{d}_{kind}_sec" in specs for d in ("read", "write")):
            raise protocol.invalid(prefix + total, f"cannot be set with quota:disk_read_{kind}_sec or "
                                                   f"quota:disk_write_{kind}_sec")
    for way in ("inbound", "outbound"):
        for what in ("peak", "burst"):
            key = f"quota:vif_{way}_{what}"
            if key in specs and f"quota:vif_{way}_average" not in specs:
                raise protocol.invalid(prefix + key, f"needs quota:vif_{way}_average")


def check_image(image: Image) -> None:
    """An image needs an id or a URL the cache can fetch; a checksum must be well formed."""
    if image.id is None and image.url is None:
        raise protocol.invalid("args.image", "needs an id or a url")
    if image.url is not None:
        try:
            check_url(image.url)
        except BadRequest as exc:
            raise _renamed(exc, "args.image.url") from None
    if image.checksum is not None:
        try:
            parse_checksum(image.checksum)
        except BadRequest as exc:
            raise _renamed(exc, "args.image.checksum") from None


def check_port_forms(ports: Sequence[Port], field: str, one: bool = False) -> None:
    """MACs, addresses and rules of ports, on their own and among themselves (not against the
    host's other ports: that is the manager's check). ``one``: ``field`` names a single port."""
    try:
        check_ports(ports, (), field_name=field)
    except BadRequest as exc:
        name = str((exc.details or {}).get("field", field))
        raise _renamed(exc, name.replace(f"{field}[0]", field, 1) if one else name) from None


def check_groups(groups: Sequence[SecurityGroup], field: str) -> None:
    """Every rule of security groups can be enforced as written."""
    for g, group in enumerate(groups):
        for r, rule in enumerate(group.rules):
            where = f"{field}[{g}].rules[{r}]"
            try:
                check_rule(rule, where)
            except BadRequest as exc:
                raise _renamed(exc, str((exc.details or {}).get("field", where))) from None


def _base64_ok(blob: str) -> bool:
    try:
        base64.b64decode("".join(blob.split()), validate=True)
    except binascii.Error:
        return False
    return True


def check_key_pairs(keys: Sequence[KeyPair], field: str) -> None:
    """Key names are unique; an SSH key is one ``authorized_keys`` line, an x509 key one PEM
    certificate, each with a readable base64 body."""
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key.name in seen:
            raise protocol.invalid(f"{field}[{i}].name", f"key pair {key.name!r} is given twice")
        seen.add(key.name)
        m = (_SSH_KEY if key.type == "ssh" else _PEM).match(key.public_key.strip() if key.type == "ssh"
                                                          else key.public_key)
        if m is None or not _base64_ok(m.group(1)):
            what = ("an SSH public key on one line (type, base64 key, optional comment)" if key.type == "ssh"
                    else "one PEM certificate (-----BEGIN CERTIFICATE-----)")
            raise protocol.invalid(f"{field}[{i}].public_key", f"must be {what}")


def check_subnets(ports: Sequence[Port], field: str, one: bool = False) -> None:
    """The gateway, DNS servers and routes of ports' fixed IPs are addresses (a route's
    destination a network) of the fixed IP's own family."""
    for p, port in enumerate(ports):
        for f, fixed in enumerate(port.fixed_ips):
            where = f"{field}.fixed_ips[{f}]" if one else f"{field}[{p}].fixed_ips[{f}]"
            family = ipaddress.ip_address(fixed.ip).version  # check_port_forms read it already
            wanted: list[tuple[str, str, bool]] = []
            if fixed.gateway is not None:
                wanted.append((f"{where}.gateway", fixed.gateway, False))
            wanted += [(f"{where}.dns_nameservers[{d}]", a, False) for d, a in enumerate(fixed.dns_nameservers)]
            for r, route in enumerate(fixed.routes):
                wanted += [(f"{where}.routes[{r}].destination", route.destination, True),
                           (f"{where}.routes[{r}].nexthop", route.nexthop, False)]
            for name, text, is_network in wanted:
                try:
                    value = (ipaddress.ip_network(text, strict=False) if is_network
                             else ipaddress.ip_address(text))
                except ValueError:
                    raise protocol.invalid(name, f"{text!r} is not an IP {'network' if is_network else 'address'}"
                                           ) from None
                if value.version != family:
                    raise protocol.invalid(name, f"must be IPv{family}, as the fixed IP {fixed.ip} is")


def check_bootstrap(a: SpawnArgs) -> None:
    """User data is base64 of at most MAX_USER_DATA bytes, vendor data JSON of at most
    MAX_VENDOR_DATA bytes, key pairs well formed (the hostname's form is the schema's)."""
    if a.user_data is not None:
        try:
            size = len(decode_user_data(a.user_data))
        except binascii.Error:
            raise protocol.invalid("args.user_data", "must be base64") from None
        if size > MAX_USER_DATA:
            raise protocol.invalid("args.user_data", f"is {size} bytes decoded; at most {MAX_USER_DATA} are allowed")
    if a.vendor_data is not None:
        try:
            size = len(msgspec.json.encode(a.vendor_data))
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise protocol.invalid("args.vendor_data", f"must be JSON: {exc}") from None
        if size > MAX_VENDOR_DATA:
            raise protocol.invalid("args.vendor_data",
                                   f"is {size} bytes as JSON; at most {MAX_VENDOR_DATA} are allowed")
    check_key_pairs(a.key_pairs, "args.key_pairs")


def check_connection(conn: ConnectionInfo, field: str) -> None:
    """What the connection-info types cannot say: QoS values are integers, an iSCSI portal has
    a port number and CHAP both a user and a password, RBD monitors a port each and cephx a
    user and a secret; encrypted volumes are refused (this agent has no key manager)."""
    d = conn.data
    if d.encrypted:
        raise protocol.invalid(f"{field}.data.encrypted", "encrypted volumes are not supported by this agent")
    for key, value in (d.qos_specs or {}).items():
        if key not in QOS_KEYS:
            continue
        number = value if isinstance(value, int) else protocol.parse_uint(value)
        if number is None or number > _INT64_MAX:
            raise protocol.invalid(f"{field}.data.qos_specs.{key}", "must be a non-negative integer")
    if isinstance(conn, IscsiConnection):
        if split_portal(conn.data.target_portal) is None:
            raise protocol.invalid(f"{field}.data.target_portal", "must be host:port with a port from 1 to 65535")
        if conn.data.auth_method is not None:
            for key in ("auth_username", "auth_password"):
                if getattr(conn.data, key) is None:
                    raise protocol.invalid(f"{field}.data.{key}", "CHAP needs a user name and a password")
    elif isinstance(conn, RbdConnection):
        r = conn.data
        if len(r.ports) != len(r.hosts) or any(protocol.parse_uint(str(p)) not in range(1, 65536) for p in r.ports):
            raise protocol.invalid(f"{field}.data.ports", "needs a port number (1 to 65535) for each of the hosts")
        if r.auth_enabled:
            for key in ("auth_username", "secret_uuid"):
                if getattr(r, key) is None:
                    raise protocol.invalid(f"{field}.data.{key}", "cephx (auth_enabled) needs a user and a secret")


def _check_device(device_name: str | None, bus: str | None, field: str) -> None:
    prefix = {"virtio": "vd", "scsi": "sd", "sata": "sd"}[bus or "virtio"]
    if device_name is not None and not device_name.removeprefix("/dev/").startswith(prefix):
        raise protocol.invalid(field, f"a {bus or 'virtio'} disk's name starts with {prefix}")


def check_volume(spec: VolumeSpec, field: str) -> None:
    """A volume to attach: its connection and its device name (of its bus)."""
    check_connection(spec.connection_info, f"{field}.connection_info")
    _check_device(spec.device_name, spec.bus, f"{field}.device_name")


def check_mapping(mapping: Sequence[BlockDevice], field: str) -> None:
    """A spawn's block device mapping: volumes Cinder connected (the agent creates none), at
    most one boot device, each volume once; the image as local root only as the boot device."""
    seen: set[str] = set()
    boots = 0
    for i, b in enumerate(mapping):
        f = f"{field}[{i}]"
        boots += b.boot_index == 0
        if b.source_type == "image" and b.destination_type == "local":
            if b.boot_index != 0:
                raise protocol.invalid(f"{f}.boot_index", "the image is the local root disk: boot_index 0")
            continue
        if b.source_type != "volume" or b.destination_type != "volume":
            raise protocol.invalid(f"{f}.source_type", "only volume to volume (a volume Cinder created and "
                                   "connected) and image to local (the root disk) are supported here")
        if b.volume_id is None:
            raise protocol.invalid(f"{f}.volume_id", "a volume mapping needs the volume's id")
        if b.connection_info is None:
            raise protocol.invalid(f"{f}.connection_info", "a volume mapping needs Cinder's connection info")
        if b.volume_id in seen:
            raise protocol.invalid(f"{f}.volume_id", f"volume {b.volume_id} is mapped twice")
        seen.add(b.volume_id)
        check_connection(b.connection_info, f"{f}.connection_info")
        _check_device(b.device_name, b.disk_bus, f"{f}.device_name")
    if boots > 1:
        raise protocol.invalid(field, "at most one device may have boot_index 0")


def _spawn(a: SpawnArgs) -> None:
    check_mapping(a.block_device_mapping, "args.block_device_mapping")
    if boot_volume(a.block_device_mapping) is None or a.image.id is not None or a.image.url is not None:
        check_image(a.image)
    flavor_request(a.flavor)
    check_port_forms(a.networks, "args.networks")
    check_subnets(a.networks, "args.networks")
    check_bootstrap(a)


def _attach(a: AttachPortArgs) -> None:
    check_port_forms([a.port], "args.port", one=True)
    check_subnets([a.port], "args.port", one=True)


def _groups(a: SecurityGroupsArgs) -> None:
    check_groups(a.security_groups, "args.security_groups")


def _rescue(a: RescueArgs) -> None:
    if a.image is not None:
        check_image(a.image)
def _attach_volume(a: AttachVolumeArgs) -> None:
    check_volume(a.volume, "args.volume")


def _unshelve(a: UnshelveArgs) -> None:
    if a.volumes and a.shelved is None:
        raise protocol.invalid("args.volumes", "only an instance offloaded on another agent (args.shelved) "
                               "takes this host's volume connections")
    seen: set[str] = set()
    for i, v in enumerate(a.volumes):
        if v.id in seen:
            raise protocol.invalid(f"args.volumes[{i}].id", f"volume {v.id} is given twice")
        seen.add(v.id)
        check_connection(v.connection_info, f"args.volumes[{i}].connection_info")


_CHECKS: Final[dict[type[Any], Callable[[Any], None]]] = {
    SpawnArgs: _spawn,
    AttachPortArgs: _attach,
    SecurityGroupsArgs: _groups,
    RebuildArgs: lambda a: check_image(a.image),
    RescueArgs: _rescue,
    AttachVolumeArgs: _attach_volume,
    UnshelveArgs: _unshelve,
}


def request(args: _A) -> _A:
    """Check decoded args beyond their types and return them with their ``uuid`` (if any) in
    canonical form; raises BAD_REQUEST naming the field."""
    check = _CHECKS.get(type(args))
    if check is not None:
        check(args)
    uuid = getattr(args, "uuid", None)
    if isinstance(uuid, str):
        args.uuid = protocol.normalise_uuid(uuid)  # type: ignore[attr-defined]
    return args
