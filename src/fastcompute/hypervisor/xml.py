"""The domain XML for an instance: what libvirt is asked to run, built from plain data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import msgspec

NAMESPACE = "http://fastcompute.org/xmlns/instance/1.0"
PREFIX = "fastcompute"


class DiskSpec(msgspec.Struct, frozen=True):
    """The instance's root disk."""

    path: str
    format: str = "raw"


class DomainSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the XML needs about one instance."""

    uuid: str
    name: str
    instance_name: str
    project_id: str
    vcpus: int
    memory_mb: int
    disk: DiskSpec | None
    console_path: str
    domain_type: str = "test"
    arch: str = "x86_64"


def domain_name(uuid: str) -> str:
    """libvirt's name of an instance's domain."""
    return "fc-" + uuid


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def build(spec: DomainSpec) -> str:
    """The domain XML of an instance."""
    dom = ET.Element("domain", type=spec.domain_type)
    _sub(dom, "name", domain_name(spec.uuid))
    _sub(dom, "uuid", spec.uuid)
    meta = _sub(dom, "metadata")
    ours = ET.SubElement(meta, f"{PREFIX}:instance", {f"xmlns:{PREFIX}": NAMESPACE})
    _sub(ours, f"{PREFIX}:name", spec.instance_name)
    _sub(ours, f"{PREFIX}:project", spec.project_id)
    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch=spec.arch)
    _sub(os_el, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")
    # The power-state logic reads a powered-off or crashed guest from its domain state, so the
    # domain must stop (not restart) on both; a guest-initiated reboot restarts in place.
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    if spec.disk is not None:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=spec.disk.format)
        _sub(disk, "source", file=spec.disk.path)
        _sub(disk, "target", dev="vda", bus="virtio")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.console_path)
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=spec.console_path)
    _sub(console, "target", type="serial", port="0")
    return ET.tostring(dom, encoding="unicode")
