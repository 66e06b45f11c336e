"""What an instance is told: its metadata documents as files, by path, as a config drive holds them.

``instance_documents`` is the one seam: it gives ``{path: bytes}`` with the OpenStack tree
(``openstack/latest/meta_data.json``, ``network_data.json``, ``vendor_data.json``,
``vendor_data2.json``, ``user_data`` when there is any) and the EC2 metadata as one JSON file
(``ec2/latest/meta-data.json``), the layout of Nova's config drive. The metadata service serves
these same files (and walks the EC2 JSON for the EC2 paths), so once the config drive's builder
exists, this function is the place to call it instead.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from fastcompute.protocol.ports import Port
from fastcompute.protocol.schema import InstanceRecord

Documents = dict[str, bytes]

OPENSTACK = "openstack/latest/"
EC2_JSON = "ec2/latest/meta-data.json"
USER_DATA = OPENSTACK + "user_data"


def _hostname(name: str) -> str:
    """An RFC 1123 label from the instance's name (as Nova sanitizes it)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "instance"


def _network_data(ports: Sequence[Port]) -> dict[str, Any]:
    """``network_data.json`` in Neutron's shape from the ports as the agent knows them."""
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    for i, port in enumerate(ports):
        link_id = f"tap{port.id[:11]}"
        links.append({"id": link_id, "vif_id": port.id, "type": "bridge",
                      "ethernet_mac_address": port.mac.lower().replace("-", ":"),
                      "mtu": port.network.mtu})  # fmt: skip
        for j, fixed in enumerate(port.fixed_ips):
            iface = ipaddress.ip_interface(f"{fixed.ip}/{fixed.prefix}")
            networks.append({
                "id": f"network{i}-{j}", "link": link_id, "network_id": port.network.id,
                "type": "ipv4" if iface.version == 4 else "ipv6",
                "ip_address": str(iface.ip), "netmask": str(iface.netmask), "routes": [],
            })  # fmt: skip
    return {"links": links, "networks": networks, "services": []}


def instance_documents(record: InstanceRecord, ports: Sequence[Port]) -> Documents:
    """The instance's metadata files, by path (see the module's docstring)."""
    hostname = _hostname(record.name)
    meta = {
        "uuid": record.uuid,
        "name": record.name,
        "hostname": hostname,
        "launch_index": 0,
        "availability_zone": "nova",
        "project_id": record.project_id,
        "meta": dict(record.metadata),
        "public_keys": {},
        "keys": [],
        "devices": [],
    }
    first_v4 = next(
        (f.ip for p in ports for f in p.fixed_ips if ipaddress.ip_address(f.ip).version == 4), ""
    )
    ec2 = {
        "instance-id": "i-" + record.uuid.replace("-", "")[:8],
        "ami-id": "ami-" + (record.image.id or "0" * 8).replace("-", "")[:8],
        "ami-launch-index": 0,
        "instance-type": f"{record.flavor.vcpus}vcpu-{record.flavor.memory_mb}mb",
        "hostname": hostname,
        "local-hostname": hostname,
        "local-ipv4": first_v4,
        "mac": ports[0].mac.lower().replace("-", ":") if ports else "",
        "placement": {"availability-zone": "nova"},
        "reservation-id": "r-" + record.uuid.replace("-", "")[-8:],
        "security-groups": sorted({g.id for p in ports for g in p.security_groups}),
        "block-device-mapping": {"ami": "vda", "root": "/dev/vda"},
    }
    enc = msgspec.json.encode
    return {
        OPENSTACK + "meta_data.json": enc(meta),
        OPENSTACK + "network_data.json": enc(_network_data(ports)),
        OPENSTACK + "vendor_data.json": b"{}",
        OPENSTACK + "vendor_data2.json": b"{}",
        EC2_JSON: enc(ec2),
    }
