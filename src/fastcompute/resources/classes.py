"""Placement's resource classes that this host reports, in the order inventories list them."""

from __future__ import annotations

from typing import Literal

ResourceClass = Literal["VCPU", "PCPU", "MEMORY_MB", "DISK_GB"]

RESOURCE_CLASSES: tuple[ResourceClass, ...] = ("VCPU", "PCPU", "MEMORY_MB", "DISK_GB")
