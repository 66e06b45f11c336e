"""Test scaffolding for the network module: stand-in guests in network namespaces, traffic.

A stand-in guest is a network namespace joined to the port's bridge by a veth pair whose host
end takes the place (name, alias, MAC, MTU, master) of the tap that the agent made, so traffic
crosses the same bridge and the same nftables rules as a guest's tap would. Fixtures may shell
out to ``ip``; the product never does. Every address used lives only inside the namespaces
the tests make. Sockets are opened inside a namespace from a short-lived thread that joins
it, so the traffic code runs in-process without a subprocess per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import netns as pr_netns

from fastcompute.config import NetworkConfig
from fastcompute.network import Network, PluggedPort

T = TypeVar("T")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (fixtures only), raising with its stderr when it fails."""
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


def run(coro: Any) -> Any:
    """Run one coroutine of the module under test to completion."""
    return asyncio.run(coro)


def run_together(*coros: Any, errors: bool = False) -> list[Any]:
    """Run coroutines at once on one loop, so that the changes they queue batch; their results
    in order (with ``errors``, exceptions among them instead of the first one raised)."""

    async def together() -> list[Any]:
        return await asyncio.gather(*coros, return_exceptions=errors)

    return asyncio.run(together())


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a thread that has joined namespace ``ns`` (sockets keep that namespace)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            pr_netns.setns(ns)
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def tables(owner: str) -> dict[str, Any]:
    """Both of the owner's nftables tables as ``nft -j`` lists them (empty when absent)."""
    out: dict[str, Any] = {}
    for family in ("bridge", "inet"):
        proc = sh("nft", "-j", "list", "table", family, owner, check=False)
        if proc.returncode == 0:
            out[family] = json.loads(proc.stdout)["nftables"][1:]
    return out


def rule_chains(owner: str) -> set[str]:
    """Names of the security-group chains (not the fixed ones) in the owner's tables."""
    names = set()
    for objs in tables(owner).values():
        for obj in objs:
            name = obj.get("chain", {}).get("name", "")
            if name[:2] in ("e-", "i-"):
                names.add(name)
    return names


def elements(owner: str) -> dict[str, list[Any]]:
    """The elements of every set and map in the owner's tables, by name."""
    out: dict[str, list[Any]] = {}
    for objs in tables(owner).values():
        for obj in objs:
            body = obj.get("set") or obj.get("map")
            if body is not None:
                out[body["name"]] = body.get("elem", [])
    return out


def mentions(owner: str, tap: str) -> bool:
    """Whether anything in the owner's tables names the tap."""
    return tap in json.dumps(tables(owner))


def link_names() -> set[str]:
    """Names of all links in the host namespace."""
    return set(links())


def links() -> dict[str, dict[str, Any]]:
    """All links in the host namespace by name, with their details (``ip -j -d link show``)."""
    return {link["ifname"]: link for link in json.loads(sh("ip", "-j", "-d", "link", "show").stdout)}


def ping(ns: str, dst: str, timeout: float = 0.6) -> bool:
    """One ICMP echo from namespace ``ns`` to ``dst``; True when the reply arrives in time."""
    sock = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    ident = random.randrange(1, 0xFFFF)
    packet = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + os.urandom(16))
    packet[2:4] = struct.pack("!H", _checksum(bytes(packet)))
    with sock:
        sock.sendto(bytes(packet), (dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                return False
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, got_id = struct.unpack("!BBHH", data[ihl : ihl + 6])
            if addr[0] == dst and kind == 0 and got_id == ident:
                return True
    return False


def connect(ns: str, dst: str, port: int, timeout: float = 0.8) -> socket.socket | None:
    """A TCP connection from namespace ``ns`` to ``dst:port``, or None when it does not open."""
    s = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
    except OSError:
        s.close()
        return None
    return s


@dataclass
class Guest:
    """A stand-in guest: a namespace whose eth0 is the far end of the port's veth."""

    ns: str
    ip: str
    mac: str
    plugged: PluggedPort

    def ping(self, dst: str, timeout: float = 0.6) -> bool:
        """One ICMP echo to ``dst``; True when the reply arrives in time."""
        return ping(self.ns, dst, timeout)

    def listen(self, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A TCP (or UDP) socket listening on ``port`` inside the guest."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                s.listen(8)
            return s

        return in_netns(self.ns, make)

    def connect(self, dst: str, port: int, timeout: float = 0.8) -> socket.socket | None:
        """A TCP connection to ``dst:port`` from the guest, or None when it does not open."""
        return connect(self.ns, dst, port, timeout)

    def raw_send(self, frame: bytes) -> None:
        """Put an Ethernet frame on the guest's eth0 as it is (for spoofing)."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            s.bind(("eth0", 0))
            return s

        with in_netns(self.ns, make) as s:
            s.send(frame)


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, dport: int, payload: bytes) -> bytes:
    """An Ethernet + IPv4 + UDP frame with the given (possibly forged) source."""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.randrange(0xFFFF), 0, 64, 17, 0,
            socket.inet_aton(src_ip), socket.inet_aton(dst_ip),
        )
    )  # fmt: skip
    ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    return eth + bytes(ip) + udp


def received(sock: socket.socket, timeout: float = 0.5) -> list[bytes]:
    """Datagrams that reach a UDP socket within ``timeout``."""
    got = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            break
    return got


@dataclass
class Lab:
    """One test's network world: a Network with its own tables and tags, guests, cleanup."""

    owner: str
    cfg: NetworkConfig
    net: Network
    namespaces: list[str] = field(default_factory=list)
    extra_links: list[str] = field(default_factory=list)

    def guest_for(self, plugged: PluggedPort, ip: str, prefix: int = 24) -> Guest:
        """Replace the port's tap by a veth into a new namespace configured as the guest."""
        ns = f"{self.owner}-{len(self.namespaces)}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        info = json.loads(sh("ip", "-j", "-d", "link", "show", plugged.tap).stdout)[0]
        alias = info["ifalias"]
        sh("ip", "link", "del", plugged.tap)
        peer = f"{self.owner}p{len(self.namespaces)}"
        sh("ip", "link", "add", plugged.tap, "mtu", str(plugged.mtu), "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "link", "set", plugged.tap, "alias", alias, "address", "fe" + plugged.mac[2:],
           "master", plugged.bridge, "up")  # fmt: skip
        sh("ip", "-n", ns, "link", "set", peer, "name", "eth0", "address", plugged.mac, "mtu", str(plugged.mtu))
        sh("ip", "-n", ns, "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return Guest(ns, ip, plugged.mac, plugged)

    def links(self, ports: Iterable[Mapping[str, Any]] = (), names: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """The host's links that could be this test's, by name, with their details: those whose
        alias carries the owner's tag, those named with the bridge prefix (tagged or not: a leak
        may come before the tag), the taps of ``ports`` (wire ports the test plugs), the test's
        ``extra_links`` and ``names``. Links of other owners, which other tests and agents on
        the host make and change meanwhile, are left out, so comparing two of these snapshots
        sees exactly what this test's network did."""
        mine = {self.net.tap_name(p["id"]) for p in ports} | set(self.extra_links) | set(names)
        return {
            name: link
            for name, link in links().items()
            if name in mine
            or name.startswith(self.cfg.bridge_prefix)
            or (link.get("ifalias") or "").startswith(self.owner + ":")
        }

    def link_names(self, ports: Iterable[Mapping[str, Any]] = (), names: Iterable[str] = ()) -> set[str]:
        """Names of the links that could be this test's (see ``links``)."""
        return set(self.links(ports, names))

    def cleanup(self) -> None:
        """Remove every namespace, link and table this test made, whatever state it is in."""
        self.net.close()
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        remove_owned(self.owner, self.extra_links)


def remove_owned(owner: str, extra_links: Iterable[str] = ()) -> None:
    """Delete the links whose alias carries ``owner``'s tag (and ``extra_links``) and both of
    ``owner``'s nftables tables: what a test's network or agent made, whatever state it is in."""
    extra = set(extra_links)
    for link in json.loads(sh("ip", "-j", "link", "show").stdout):
        if link.get("ifalias", "").startswith(owner + ":") or link["ifname"] in extra:
            sh("ip", "link", "del", link["ifname"], check=False)
    for family in ("bridge", "inet"):
        sh("nft", "delete", "table", family, owner, check=False)


def port(
    ip: str,
    *,
    network: str = "net1",
    groups: list[dict[str, Any]] | None = None,
    prefix: int = 24,
    mac: str | None = None,
    vlan: int | None = None,
    security: bool = True,
) -> dict[str, Any]:
    """A port as the wire gives it, with a fresh id and a MAC derived from the IP."""
    last = [int(x) for x in ip.split(".")]
    net: dict[str, Any] = {"id": network}
    if vlan is not None:
        net["vlan"] = vlan
    return {
        "id": str(uuid.uuid4()),
        "mac": mac or f"fa:16:3e:{last[1]:02x}:{last[2]:02x}:{last[3]:02x}",
        "network": net,
        "fixed_ips": [{"ip": ip, "prefix": prefix}],
        "port_security_enabled": security,
        "security_groups": groups if groups is not None else [],
    }


def group(*rules: dict[str, Any], gid: str | None = None) -> dict[str, Any]:
    """A security group of the given rules."""
    return {"id": gid or str(uuid.uuid4()), "rules": list(rules)}


def rule(direction: str, protocol: str | None = None, lo: int | None = None, hi: int | None = None,
         remote: str | None = None, ethertype: str = "IPv4") -> dict[str, Any]:  # fmt: skip
    """One security-group rule."""
    r: dict[str, Any] = {"direction": direction, "ethertype": ethertype}
    if protocol is not None:
        r["protocol"] = protocol
    if lo is not None:
        r["port_range_min"] = lo
        r["port_range_max"] = hi if hi is not None else lo
    if remote is not None:
        r["remote_ip_prefix"] = remote
    return r


EGRESS_ALL = rule("egress")


@contextlib.contextmanager
def make_lab(**overrides: Any) -> Iterator[Lab]:
    """A Lab with a unique owner tag, bridge prefix and tables, cleaned up on exit."""
    owner = "fct" + uuid.uuid4().hex[:5]
    cfg = NetworkConfig(owner=owner, bridge_prefix=owner[:6] + "b", **overrides)
    lab = Lab(owner, cfg, Network(cfg))
    try:
        yield lab
    finally:
        lab.cleanup()


def namespace_on_bridge(ns: str, host_end: str, bridge: str, address: str) -> None:
    """A namespace ``ns`` whose ``eth0`` (at ``address``, CIDR) is joined to ``bridge`` by a veth
    whose host end is ``host_end``: a client on a guest's network that is no port (no rules of
    its own). Delete ``host_end`` (at once, with its peer), then the namespace, to remove it: a
    deleted namespace's links go only later, in the kernel's own time."""
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", host_end, "master", bridge, "up")
    sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
