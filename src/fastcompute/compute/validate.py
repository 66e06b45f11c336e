"""The validation stage: every check a request can fail without looking at the host's state.

It runs on the decoded args (``protocol.ops.decode_args`` already checked types, ranges and
unknown fields) and before the manager: an image's URL, checksum and format, every ``hw:`` and
``quota:`` extra spec of a flavor, the form of ports (MAC, addresses) and of security-group
rules. A request that fails here is a BAD_REQUEST naming the field, and nothing has been
claimed, recorded or published. What needs the host's state (a port id or MAC another
instance holds, an instance's vm_state, capacity) stays with the manager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from fastcompute import protocol
from fastcompute.compute import cpu
from fastcompute.compute.guest import QUOTA_LIMITS
from fastcompute.errors import BadRequest
from fastcompute.images.cache import check_url, parse_checksum
from fastcompute.network import check_ports, check_rule
from fastcompute.protocol import AttachPortArgs, Flavor, Image, SecurityGroupsArgs, SpawnArgs
from fastcompute.protocol.ports import Port, SecurityGroup
from fastcompute.resources import numa
from fastcompute.resources.numa_types import NumaRequest

QUOTA_KEYS: Final = frozenset(QUOTA_LIMITS)
_INT64_MAX: Final = 2**63 - 1  # libvirt's cputune and iotune values are 64-bit

_A = TypeVar("_A")


def _renamed(exc: BadRequest, field: str) -> BadRequest:
    """``exc`` (raised by another module with its own field name) as the stage's BAD_REQUEST."""
    reason = str((exc.details or {}).get("reason") or exc.message)
    return protocol.invalid(field, reason)


def flavor_request(flavor: Flavor) -> NumaRequest | None:
    """Check a flavor's extra specs; return its NUMA request (None for a floating guest).

    ``hw:`` keys are Nova's and checked by ``numa.constraints``; ``quota:`` keys must be known
    and non-negative integers in ASCII digits; ``trait:`` keys name a trait and say required or
    forbidden. Keys of other namespaces are left to the scheduler, as Nova leaves them.
    Errors are BAD_REQUEST naming the key.
    """
    prefix = "args.flavor.extra_specs."
    for key, value in flavor.extra_specs.items():
        if key.startswith(cpu.TRAIT_PREFIX) and (problem := cpu.trait_problem(key, value)) is not None:
            raise protocol.invalid(prefix + key, problem)
        if key.startswith("quota:"):
            if key not in QUOTA_KEYS:
                raise protocol.invalid(prefix + key, f"unknown quota: key; known: {', '.join(sorted(QUOTA_KEYS))}")
            number = protocol.parse_uint(value)
            if number is None or number > _INT64_MAX:
                raise protocol.invalid(prefix + key, f"must be a non-negative integer, not {value!r}")
    try:
        return numa.constraints(
            {"vcpus": flavor.vcpus, "memory_mb": flavor.memory_mb, "extra_specs": flavor.extra_specs})
    except BadRequest as exc:
        field = str((exc.details or {}).get("field", ""))
        raise _renamed(exc, prefix + field if field.startswith("hw:") else "args.flavor." + field) from None


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


def _spawn(a: SpawnArgs) -> None:
    check_image(a.image)
    flavor_request(a.flavor)
    check_port_forms(a.networks, "args.networks")


def _attach(a: AttachPortArgs) -> None:
    check_port_forms([a.port], "args.port", one=True)


def _groups(a: SecurityGroupsArgs) -> None:
    check_groups(a.security_groups, "args.security_groups")


_CHECKS: Final[dict[type[Any], Callable[[Any], None]]] = {
    SpawnArgs: _spawn,
    AttachPortArgs: _attach,
    SecurityGroupsArgs: _groups,
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
