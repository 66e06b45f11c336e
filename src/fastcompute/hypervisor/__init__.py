"""The hypervisor: the neutral guest description and the driver interface.

The libvirt driver is ``fastcompute.hypervisor.libvirt.driver.LibvirtDriver``; it is not
imported here, so that using these types does not load libvirt.
"""

from fastcompute.hypervisor.driver import DomainInfo, Driver, PowerEvent
from fastcompute.hypervisor.spec import (
    Disk,
    DomainStats,
    GuestCell,
    GuestSpec,
    HostCell,
    HostFacts,
    HypervisorInfo,
    Interface,
    Limits,
    PagePool,
)

__all__ = [
    "Disk",
    "DomainInfo",
    "DomainStats",
    "Driver",
    "GuestCell",
    "GuestSpec",
    "HostCell",
    "HostFacts",
    "HypervisorInfo",
    "Interface",
    "Limits",
    "PagePool",
    "PowerEvent",
]
