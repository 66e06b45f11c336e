"""Memory sizes with units, as Nova's flavors and config and libvirt's XML write them.

One table for every parser: ``K``/``KB``/``KiB`` and the like all mean powers of 1024 (as in
Nova's ``hw:mem_page_size`` and ``reserved_huge_pages``, and libvirt's ``unit`` attributes).
"""

from __future__ import annotations

import re

# KiB per unit, by lower-case prefix letter ("" = a bare number, in KiB).
_KIB = {"": 1, "k": 1, "m": 1024, "g": 1024**2, "t": 1024**3}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE | re.ASCII)


def size_kib(text: str) -> int:
    """A size such as ``2048``, ``2M``, ``2MB``, ``1GiB`` in KiB (a bare number is KiB).

    Raises ``ValueError`` for anything else.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 2048, 2MB or 1GiB")
    return int(match.group(1)) * _KIB[match.group(2).lower()]


def to_kib(value: int, unit: str) -> int:
    """``value`` in libvirt's ``unit`` (``b``, ``bytes``, ``KiB``, ``MiB``, ``GiB``...) as KiB;
    an unknown unit is taken as KiB, libvirt's default."""
    unit = unit.strip().lower()
    if unit in ("b", "bytes"):
        return value // 1024
    return value * _KIB.get(unit[:1], 1)
