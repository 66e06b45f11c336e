"""Reading a flavor's extra specs: the refusal every checker raises, and the readers that
NUMA constraints (``resources.numa``) and machine and devices (``compute.hardware``) share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from fastcompute.errors import BadRequest

_C = TypeVar("_C", bound=str)


def bad(key: str, reason: str) -> BadRequest:
    """BAD_REQUEST for the extra spec ``key``; callers prefix the field with its place."""
    return BadRequest(f"flavor extra spec {key}: {reason}", details={"field": key, "reason": reason})


def choice(specs: Mapping[str, str], key: str, allowed: tuple[_C, ...]) -> _C | None:
    """``specs[key]`` as one of ``allowed`` (None when absent); BAD_REQUEST otherwise."""
    value = specs.get(key)
    if value is None:
        return None
    for option in allowed:
        if value == option:
            return option
    raise bad(key, f"must be one of {', '.join(allowed)}, not {value!r}")
