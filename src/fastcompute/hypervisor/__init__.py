"""The hypervisor: the driver interface the manager uses, the libvirt driver, the domain XML."""

from fastcompute.hypervisor.driver import DomainInfo, Driver, PowerEvent
from fastcompute.hypervisor.libvirt.driver import LibvirtDriver

__all__ = ["DomainInfo", "Driver", "LibvirtDriver", "PowerEvent"]
