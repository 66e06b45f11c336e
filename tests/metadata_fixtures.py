"""Scaffolding for the metadata service's tests and benchmark: a Lab whose Network carries the
steering rules, a MetadataService following it, and HTTP from inside stand-in guests."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from network_fixtures import EGRESS_ALL, Guest, Lab, group, in_netns, port, sh

from fastcompute.compute.configdrive import Bootstrap, default_hostname, instance_metadata
from fastcompute.config import MetadataConfig, NetworkConfig
from fastcompute.network import Network
from fastcompute.network.metadata import Documents, MetadataService, documents_lookup
from fastcompute.protocol.ports import Port
from fastcompute.protocol.schema import Flavor, Image, InstanceRecord

METADATA_IP = "169.254.169.254"


def record(name: str, project: str = "p1", meta: dict[str, str] | None = None) -> InstanceRecord:
    """An instance record as the manager keeps it."""
    return InstanceRecord(
        uuid=str(uuid.uuid4()), name=name, project_id=project, vm_state="active", task_state=None,
        power_state="running", flavor=Flavor(vcpus=1, memory_mb=256, disk_gb=1), image=Image(id="img-1"),
        host="h", numa=None, created_at="", updated_at="", metadata=meta or {},
    )  # fmt: skip


def documents_of(rec: InstanceRecord, ports: list[Port]) -> Documents:
    """An instance's documents as the agent builds them for one spawned with nothing to bootstrap."""
    return instance_metadata(rec, ports, Bootstrap(hostname=default_hostname(rec.name, rec.uuid)))


class World:
    """A Lab, its metadata service and the instances it knows (uuid -> (record, ports))."""

    def __init__(self, lab: Lab, cfg: MetadataConfig) -> None:
        self.lab = lab
        self.cfg = cfg
        self.instances: dict[str, tuple[InstanceRecord, list[Port]]] = {}
        self.routers: dict[str, str] = {}  # bridge -> the namespace of its network's router
        self.service = MetadataService(cfg, documents_lookup(lab.net.port_at, self.documents))

    def documents(self, instance_uuid: str) -> Documents | None:
        """The lookup's documents, built as the agent builds them."""
        found = self.instances.get(instance_uuid)
        return None if found is None else documents_of(*found)

    async def guest(self, ip: str, *, network: str = "net1", meta: dict[str, str] | None = None,
                    **kw: Any) -> tuple[Guest, InstanceRecord]:  # fmt: skip
        """An instance with one port (egress open, no ingress rules) and its stand-in guest,
        whose default route (and so its way to 169.254.169.254) is the network's router at .1."""
        rec = record(f"vm {ip}", meta=meta)
        groups = [group(EGRESS_ALL)] if kw.get("security", True) else []
        raw = port(ip, network=network, groups=groups, **kw)
        plugged = await self.lab.net.plug(rec.uuid, [raw])
        ports = await self.lab.net.validate([raw], instance_uuid=rec.uuid)
        self.instances[rec.uuid] = (rec, ports)
        g = self.lab.guest_for(plugged[0], ip)
        gateway = ip.rsplit(".", 1)[0] + ".1"
        if plugged[0].bridge not in self.routers:
            self.routers[plugged[0].bridge] = self.plain_ns(plugged[0].bridge, gateway)
        sh("ip", "-n", g.ns, "route", "add", "default", "via", gateway)
        await self.service.settled()
        return g, rec

    def plain_ns(self, bridge: str, ip: str) -> str:
        """A namespace on ``bridge`` that is no port (a router, the wire), at ``ip``; its way to
        169.254.169.254 is on-link."""
        ns = f"{self.lab.owner}-{len(self.lab.namespaces)}"
        sh("ip", "netns", "add", ns)
        self.lab.namespaces.append(ns)
        host_end = f"{self.lab.owner}x{len(self.lab.namespaces)}"
        self.lab.extra_links.append(host_end)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", host_end, "master", bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", f"{METADATA_IP}/32", "dev", "eth0")
        return ns


@contextlib.asynccontextmanager
async def metadata_world(**overrides: Any) -> AsyncIterator[World]:
    """A Lab whose tables steer 169.254.169.254:80 to a MetadataService that follows it."""
    owner = "fcm" + uuid.uuid4().hex[:5]
    cfg = MetadataConfig(port=random.randrange(20000, 30000), **overrides)
    ncfg = NetworkConfig(owner=owner, bridge_prefix=owner[:6] + "b")
    lab = Lab(owner, ncfg, Network(ncfg, metadata=(cfg.address, cfg.port)))
    world = World(lab, cfg)
    try:
        world.service.follow(lab.net)
        yield world
    finally:
        await world.service.close()
        lab.cleanup()


def http_get(ns: str | None, path: str, host: str = METADATA_IP, port: int = 80, timeout: float = 1.0,
             headers: Mapping[str, str] | None = None) -> tuple[int, bytes] | None:  # fmt: skip
    """One GET from namespace ``ns`` (None: the host): (status, body), or None when no
    connection opens or no answer comes."""

    def make() -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    s = make() if ns is None else in_netns(ns, make)
    s.settimeout(timeout)
    with s:
        try:
            s.connect((host, port))
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return None
    return int(head.split(b" ")[1]), body


async def off_loop(fn: Any, *args: Any) -> Any:
    """Run blocking client code in a thread, so the service's loop keeps answering."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
