"""Where a running domain's consoles are, read from its live XML (libvirt fills in the port
it chose for a graphics server with ``autoport`` only while the domain runs)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from fastcompute.errors import Conflict
from fastcompute.hypervisor.spec import ConsoleEndpoint, ConsoleKind


def endpoint(domain_xml: str, kind: ConsoleKind, uuid: str) -> ConsoleEndpoint:
    """The ``kind`` console of the domain described by ``domain_xml`` (its live XML).

    Conflict when the domain has no such console or does not run (no port assigned).
    """
    devices = ET.fromstring(domain_xml).find("devices")
    if devices is None:
        raise Conflict(f"instance {uuid} has no {kind} console", {"uuid": uuid, "type": kind})
    if kind == "serial":
        for serial in devices.findall("serial[@type='unix']"):
            source = serial.find("source")
            if source is not None and source.get("mode", "bind") == "bind" and source.get("path"):
                return ConsoleEndpoint(kind="serial", path=source.get("path"))
        raise Conflict(f"instance {uuid} has no interactive serial console (only its log)",
                       {"uuid": uuid, "type": kind})
    for graphics in devices.findall(f"graphics[@type='{kind}']"):
        port = int(graphics.get("port", "-1"))
        if port <= 0:
            raise Conflict(f"instance {uuid} is not running: its {kind} console has no port",
                           {"uuid": uuid, "type": kind})
        listen = graphics.find("listen[@type='address']")
        host = (listen.get("address") if listen is not None else None) or graphics.get("listen") or "127.0.0.1"
        # A server listening on every address is reached on loopback from here.
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return ConsoleEndpoint(kind=kind, host=host, port=port)
    raise Conflict(f"instance {uuid} has no {kind} console", {"uuid": uuid, "type": kind})
