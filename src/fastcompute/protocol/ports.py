"""The wire schema of ports and security groups (Neutron's shapes), decoded with the request.

``instance.spawn``'s ``networks``, ``instance.attach_port`` and ``instance.set_security_groups``
carry these; msgspec checks types and ranges in the same pass that decodes the request, and
the validation stage (``fastcompute.compute.validate``, with ``fastcompute.network``'s checks)
what types cannot say (a MAC's form, a rule's protocol and ports), before the manager.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from msgspec import Meta, Struct

IFNAMSIZ: Final = 15
"""The longest Linux interface name (the kernel's IFNAMSIZ less the NUL)."""

ShortId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+\Z")]
PortNumber = Annotated[int, Meta(ge=0, le=65535)]
# What the kernel takes as an interface name: no '/', ':', whitespace or control characters.
IfName = Annotated[str, Meta(min_length=1, max_length=IFNAMSIZ, pattern=r"^[^/:\s\x00-\x1f\x7f]+$")]
Address = Annotated[str, Meta(min_length=1, max_length=64)]


class SecurityGroupRule(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One Neutron security-group rule; an absent field matches anything."""

    direction: Literal["ingress", "egress"]
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    protocol: Annotated[str, Meta(max_length=32)] | Annotated[int, Meta(ge=0, le=255)] | None = None
    port_range_min: PortNumber | None = None
    port_range_max: PortNumber | None = None
    remote_ip_prefix: Address | None = None


class SecurityGroup(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A Neutron security group: its id and its rules (allow rules; the rest is denied)."""

    id: ShortId
    rules: list[SecurityGroupRule] = []


class HostRoute(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A route of a subnet (Neutron's ``host_routes`` entry): ``destination`` a CIDR."""

    destination: Address
    nexthop: Address


class FixedIp(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """An address of the port and the prefix length of its subnet; the subnet's gateway, DNS
    servers and routes (Neutron's ``gateway_ip``, ``dns_nameservers``, ``host_routes``) are
    optional and reach the guest in its config drive's ``network_data.json``."""

    ip: Address
    prefix: Annotated[int, Meta(ge=0, le=128)]
    gateway: Address | None = None
    dns_nameservers: Annotated[list[Address], Meta(max_length=16)] = []
    routes: Annotated[list[HostRoute], Meta(max_length=64)] = []


class PortNetwork(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The network a port is on: an existing bridge to use, a VLAN, the MTU."""

    id: ShortId
    bridge: IfName | None = None
    vlan: Annotated[int, Meta(ge=1, le=4094)] | None = None
    mtu: Annotated[int, Meta(ge=68, le=65535)] | None = None


class Port(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A Neutron port as ``instance.spawn``'s ``networks`` and ``instance.attach_port`` give it."""

    id: ShortId
    mac: Annotated[str, Meta(max_length=32)]
    network: PortNetwork
    fixed_ips: list[FixedIp] = []
    port_security_enabled: bool = True
    security_groups: list[SecurityGroup] = []
