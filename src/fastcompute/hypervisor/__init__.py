"""The hypervisor: the driver interface the manager uses, the libvirt driver, the domain XML."""

from .driver import DomainInfo, Driver, PowerEvent
from .libvirt_driver import LibvirtDriver

__all__ = ["DomainInfo", "Driver", "LibvirtDriver", "PowerEvent"]
