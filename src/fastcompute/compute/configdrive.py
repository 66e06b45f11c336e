"""What a guest is told about itself at boot, as the documents of OpenStack's metadata.

:func:`instance_metadata` is the one builder of those documents: a pure function of an
instance's record, its ports and its :class:`Bootstrap` data, returning every file of Nova's
config drive layout by path. The config drive (``images.iso``) writes them to an ISO image;
a metadata service serves the same bytes over HTTP (``openstack/latest/meta_data.json`` is
``/openstack/latest/meta_data.json``), so that both paths tell a guest the same thing.

The layout is Nova's (``nova/virt/configdrive.py`` and ``nova/api/metadata/base.py``):
``openstack/<version>/`` for every version Nova writes and ``latest``, each with
``meta_data.json``, ``user_data`` (when given), ``vendor_data.json`` (from 2013-10-17),
``network_data.json`` (from 2015-10-15) and ``vendor_data2.json`` (from 2016-10-06); and
``ec2/<version>/meta-data.json`` and ``user-data``. cloud-init reads the newest version it
knows (``2018-08-27`` today), others read ``latest``. Drives leave out the EC2 versions of
``[guest] config_drive_skip_versions``, which by default are Nova's (all but ``2009-04-04`` and
``latest``): two directories a version (ISO 9660 and Joliet), a sector each, were a fifth of a
drive's size.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import re
import unicodedata
from collections.abc import Collection
from typing import Any, Final

import msgspec

from fastcompute.config import GuestConfig
from fastcompute.protocol import InstanceRecord, KeyPair, SpawnArgs
from fastcompute.protocol.ports import FixedIp, Port

LABEL: Final = "config-2"
"""The volume label cloud-init and other readers look for."""

OPENSTACK_VERSIONS: Final = ("2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
                             "2016-10-06", "2017-02-22", "2018-08-27", "2020-10-14", "latest")
EC2_VERSIONS: Final = ("1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
                       "2008-02-01", "2008-09-01", "2009-04-04", "latest")
# The first version of each file (the rest are in every version): Havana added static vendor
# data, Liberty network_data.json, Newton dynamic vendor data.
_SINCE: Final = {"vendor_data.json": "2013-10-17", "network_data.json": "2015-10-15",
                 "vendor_data2.json": "2016-10-06"}


class Bootstrap(msgspec.Struct, kw_only=True):
    """What a spawn told the agent for its guest beside the record: kept in the store (with
    the state directory's permissions) to re-make the drive, never in a record or an event,
    since ``admin_pass`` and ``user_data`` are the tenant's secrets."""

    hostname: str
    user_data: bytes | None = None
    key_pairs: list[KeyPair] = []
    admin_pass: str | None = None
    vendor_data: dict[str, Any] | None = None
    launch_index: int = 0
    availability_zone: str = "nova"
    config_drive: bool = True


def default_hostname(name: str, uuid: str) -> str:
    """An RFC 1123 label made from an instance name, as Nova makes one from a display name:
    accents dropped, lowercase, every run of other characters a hyphen, 63 characters at
    most; ``server-<uuid>`` when nothing of the name is left."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    label = re.sub(r"[^a-z0-9]+", "-", ascii_name).strip("-")[:63].rstrip("-")
    return label or f"server-{uuid}"


def decode_user_data(text: str) -> bytes:
    """User data as a spawn carries it (base64, line breaks allowed) decoded; ValueError
    (binascii.Error) when it is not base64."""
    return base64.b64decode("".join(text.split()), validate=True)


def bootstrap_of(args: SpawnArgs, uuid: str, cfg: GuestConfig) -> Bootstrap:
    """A (validated) spawn's bootstrap data; ``cfg`` gives the defaults."""
    return Bootstrap(
        hostname=args.hostname or default_hostname(args.name, uuid),
        user_data=decode_user_data(args.user_data) if args.user_data is not None else None,
        key_pairs=list(args.key_pairs),
        admin_pass=args.admin_pass,
        vendor_data=args.vendor_data,
        launch_index=args.launch_index,
        availability_zone=cfg.availability_zone,
        config_drive=cfg.config_drive if args.config_drive is None else args.config_drive,
    )


def meta_data(rec: InstanceRecord, boot: Bootstrap) -> dict[str, Any]:
    """``meta_data.json``: who the instance is, its metadata and its keys.

    ``public_keys`` holds the SSH keys by name (what cloud-init puts in ``authorized_keys``);
    ``keys`` every key pair with its type.
    """
    doc: dict[str, Any] = {
        "uuid": rec.uuid,
        "name": rec.name,
        "hostname": boot.hostname,
        "launch_index": boot.launch_index,
        "availability_zone": boot.availability_zone,
        "project_id": rec.project_id,
        "meta": dict(rec.metadata),
        "public_keys": {k.name: k.public_key for k in boot.key_pairs if k.type == "ssh"},
        "keys": [{"name": k.name, "type": k.type, "data": k.public_key} for k in boot.key_pairs],
        "devices": [],
    }
    if boot.admin_pass is not None:
        doc["admin_pass"] = boot.admin_pass
    return doc


def link_id(port: Port) -> str:
    """A port's link in ``network_data.json``: its tap's name by os-vif's rule."""
    return ("tap" + port.id)[:14]


def _netmask(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return str(network.netmask)


def _routes(fixed: FixedIp) -> list[dict[str, str]]:
    routes = []
    if fixed.gateway is not None:
        anywhere = ipaddress.ip_network("0.0.0.0/0" if ipaddress.ip_address(fixed.ip).version == 4 else "::/0")
        routes.append({"network": str(anywhere.network_address), "netmask": _netmask(anywhere),
                       "gateway": fixed.gateway})
    for r in fixed.routes:
        dest = ipaddress.ip_network(r.destination, strict=False)
        routes.append({"network": str(dest.network_address), "netmask": _netmask(dest), "gateway": r.nexthop})
    return routes


def network_data(ports: list[Port], default_mtu: int = 1500) -> dict[str, Any]:
    """``network_data.json`` in Neutron's shape: a link per port (MAC, MTU), a network per
    fixed IP (address, netmask, routes, DNS), and the DNS servers of all as services.

    ``default_mtu`` is the MTU of a port whose network gives none (``[network] default_mtu``).
    """
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    dns: list[str] = []
    for port in ports:
        link = link_id(port)
        links.append({"id": link, "vif_id": port.id, "type": "bridge",
                      "mtu": port.network.mtu or default_mtu, "ethernet_mac_address": port.mac.lower()})
        for fixed in port.fixed_ips:
            iface = ipaddress.ip_interface(f"{fixed.ip}/{fixed.prefix}")
            networks.append({
                "id": f"network{len(networks)}",
                "type": f"ipv{iface.version}",
                "link": link,
                "ip_address": str(iface.ip),
                "netmask": _netmask(iface.network),
                "routes": _routes(fixed),
                "network_id": port.network.id,
                "services": [{"type": "dns", "address": a} for a in fixed.dns_nameservers],
            })
            dns.extend(a for a in fixed.dns_nameservers if a not in dns)
    return {"links": links, "networks": networks, "services": [{"type": "dns", "address": a} for a in dns]}


def ec2_meta_data(rec: InstanceRecord, ports: list[Port], boot: Bootstrap) -> dict[str, Any]:
    """``ec2/<version>/meta-data.json``: the EC2 view of the same instance."""
    ssh = [k for k in boot.key_pairs if k.type == "ssh"]
    ipv4 = [f.ip for p in ports for f in p.fixed_ips if ipaddress.ip_address(f.ip).version == 4]
    doc: dict[str, Any] = {
        "instance-id": "i-" + rec.uuid.replace("-", "")[:8],
        "ami-id": "ami-" + (rec.image.id or "00000000"),
        "ami-launch-index": boot.launch_index,
        "hostname": boot.hostname,
        "local-hostname": boot.hostname,
        "placement": {"availability-zone": boot.availability_zone},
        "public-keys": {str(i): {"_name": f"{i}={k.name}", "openssh-key": k.public_key} for i, k in enumerate(ssh)},
        "reservation-id": "r-" + rec.uuid.replace("-", "")[-8:],
        "security-groups": sorted({g.id for p in ports for g in p.security_groups}),
        "block-device-mapping": {"ami": "vda", "root": "/dev/vda"},
    }
    if ipv4:
        doc["local-ipv4"] = ipv4[0]
    if ports:
        doc["mac"] = ports[0].mac.lower().replace("-", ":")
    return doc


@functools.lru_cache(maxsize=8)
def _plan(user_data: bool, skip_ec2: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Every path of the documents and which document it holds (``ec2`` the EC2 metadata):
    the same for all instances with user data or all without, so made once."""
    plan = []
    for version in OPENSTACK_VERSIONS:
        for name in ("meta_data.json", "vendor_data.json", "network_data.json", "vendor_data2.json",
                     *(("user_data",) if user_data else ())):
            since = _SINCE.get(name)
            if since is None or version == "latest" or version >= since:
                plan.append((f"openstack/{version}/{name}", name))
    for version in EC2_VERSIONS:
        if version not in skip_ec2:
            plan.append((f"ec2/{version}/meta-data.json", "ec2"))
            if user_data:
                plan.append((f"ec2/{version}/user-data", "user_data"))
    return tuple(plan)


def instance_metadata(rec: InstanceRecord, ports: list[Port], boot: Bootstrap, *, default_mtu: int = 1500,
                      skip_ec2: Collection[str] = ()) -> dict[str, bytes]:
    """Every file of the instance's metadata by its path (``openstack/latest/user_data``): a
    pure function of its record, its ports and its bootstrap data, which the config drive and
    the metadata service both serve (a drive without the EC2 versions in ``skip_ec2``)."""
    enc = msgspec.json.encode
    docs = {
        "meta_data.json": enc(meta_data(rec, boot)),
        "vendor_data.json": enc(boot.vendor_data or {}),
        "network_data.json": enc(network_data(ports, default_mtu)),
        # Dynamic vendor data comes from services Nova calls at boot; there are none here.
        "vendor_data2.json": b"{}",
        "ec2": enc(ec2_meta_data(rec, ports, boot)),
    }
    if boot.user_data is not None:
        docs["user_data"] = boot.user_data
    return {path: docs[name] for path, name in _plan(boot.user_data is not None, tuple(skip_ec2))}
