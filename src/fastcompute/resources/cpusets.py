"""CPU lists as Linux and Nova write them (``0-3,8,^2``): the one parser of the package.

Every range is bounded before it is expanded: a list is text from a flavor or a config
file, and ``0-9999999`` must be refused at once, not after building a set of ten million
ids.
"""

from __future__ import annotations

import re

# Linux's largest CONFIG_NR_CPUS: no host has a CPU id at or above it.
MAX_CPUS = 8192

_PART = re.compile(r"(\d+)(?:\s*-\s*(\d+))?", re.ASCII)  # \d alone takes other scripts' digits


class CpuListError(ValueError):
    """A CPU list that is malformed or names an id at or above its bound."""


class CpuOutOfRange(CpuListError):
    """A CPU list naming an id at or above its bound (``cpu``, the highest it named)."""

    def __init__(self, cpu: int, limit: int, what: str) -> None:
        super().__init__(f"{what} {cpu} is at or above the limit of {limit}")
        self.cpu = cpu


def parse(spec: str, limit: int = MAX_CPUS, *, what: str = "CPU") -> set[int]:
    """The ids of ``spec``: comma-separated singles (``7``), ranges (``0-3``) and exclusions
    (``^2``, ``^4-5``), whitespace ignored.

    Raises ``CpuListError`` for malformed text or a range whose end is below its start, and
    ``CpuOutOfRange`` for any id (excluded ones too) at or above ``limit``; ``what`` names
    the ids in its message (``vCPU`` for a flavor's lists).
    """
    include: set[int] = set()
    exclude: set[int] = set()
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        target = include
        if part.startswith("^"):
            target, part = exclude, part[1:].strip()
        match = _PART.fullmatch(part)
        if match is None:
            raise CpuListError(f"invalid CPU list {spec!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise CpuListError(f"invalid CPU range {part!r}")
        if high >= limit:
            raise CpuOutOfRange(high, limit, what)
        target.update(range(low, high + 1))
    return include - exclude

