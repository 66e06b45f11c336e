"""The links of ports: names, taps, bridges and VLAN sub-interfaces, through netlink.

Every link the agent makes carries an alias ``<owner>:<kind>:...`` so that unplugging and
reconciliation remove only what the agent made. Bridges, VLANs and listings go through
pyroute2's IPRoute; the one request on the plug path (a tap's set-up) and link deletions go
through :class:`RawLinks`, packed by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

from fastcompute.config import NetworkConfig
from fastcompute.errors import AgentError, Conflict
from fastcompute.network.netlink import (
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    attr,
    error_of,
    message,
    messages,
    raise_error,
)
from fastcompute.network.ports import Plugged, bad, normal_mac
from fastcompute.network.shaping import Shaping, shape_tap
from fastcompute.protocol.ports import IFNAMSIZ, Port, PortNetwork

_IFF_UP: Final = 1
_TUNSETIFF: Final = 0x400454CA
_TUNSETPERSIST: Final = 0x400454CB
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_IFF_TUN_EXCL: Final = 0x8000
_RTM_NEWLINK: Final = 16
_RTM_DELLINK: Final = 17

_IFLA_ADDRESS: Final = 1
_IFLA_MTU: Final = 4
_IFLA_MASTER: Final = 10
_IFLA_IFALIAS: Final = 20
_IFLA_GROUP: Final = 27


class Names:
    """The names and aliases of an agent's links, from ``[network]``."""

    def __init__(self, cfg: NetworkConfig) -> None:
        self.cfg = cfg

    def tap(self, port_id: str) -> str:
        """The port's tap: the prefix then the port id, cut at 15 characters (as os-vif)."""
        return (self.cfg.tap_prefix + port_id)[:IFNAMSIZ]

    def bridge(self, network: PortNetwork) -> str:
        """The network's bridge: the given one, or the prefix then the network id."""
        return network.bridge or (self.cfg.bridge_prefix + network.id)[:IFNAMSIZ]

    def vlan(self, vlan: int) -> str:
        """The VLAN sub-interface of the physical interface for ``vlan``."""
        name = f"{self.cfg.physical_interface}.{vlan}"
        return name if len(name) <= IFNAMSIZ else f"{self.cfg.owner[:6]}v{vlan}"

    def alias(self, kind: str, *parts: str) -> str:
        """The alias that marks a link as this agent's: ``<owner>:<kind>:<parts>``."""
        return ":".join((self.cfg.owner, kind, *parts))

    @property
    def doomed_group(self) -> int:
        """The link group this agent puts its links in just before deleting them by group.

        A hash of the owner tag in 2**30..2**31-1: clear of the default group 0 and of the small
        numbers administrators use, and within what ``ip link ... group N`` accepts."""
        digest = int.from_bytes(hashlib.blake2b(self.cfg.owner.encode(), digest_size=4).digest())
        return digest & 0x3FFFFFFF | 1 << 30


def ifindex(name: str) -> int | None:
    """The index of the link named ``name``, None when there is none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def create_tap(name: str) -> bool:
    """Make a persistent tap (no owner, no packet info); False when the name is taken.

    Taps are made with the tun device's ioctls: the kernel refuses to make them over
    rtnetlink, and pyroute2 does the same."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_TUN_EXCL))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
        return True
    finally:
        os.close(fd)


# Every link the agent makes or re-makes goes (back) to the default group; see set_up.
_GROUP_DEFAULT: Final = attr(_IFLA_GROUP, struct.pack("=I", 0))


class RawLinks:
    """Link changes on the plug path, over a plain rtnetlink socket.

    A plug needs one RTM_NEWLINK whose reply is a bare acknowledgement. pyroute2's generic
    attribute machinery spends more time encoding that request and decoding replies than the
    kernel spends on the change, so this small request is packed here with ``struct``;
    everything else (bridges, VLANs, listings) goes through pyroute2's IPRoute.
    """

    def __init__(self, doomed_group: int) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self._sock.bind((0, 0))
        self._seq = 0
        self._doomed = attr(_IFLA_GROUP, struct.pack("=I", doomed_group))

    def _request(self, msg_type: int, index: int, flags: int, attrs: bytes) -> None:
        self._seq += 1
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, _IFF_UP if flags else 0) + attrs
        self._sock.send(message(msg_type, NLM_F_REQUEST | NLM_F_ACK, self._seq, body))
        while True:
            data = self._sock.recv(65536)
            for kind, seq, start, _ in messages(data):
                if kind == NLMSG_ERROR and seq == self._seq:
                    if error := error_of(data, start):
                        raise_error(error, "netlink")
                    return

    def set_up(self, index: int, *, master: int, mtu: int, address: str, alias: str) -> None:
        """Give a link its master, MTU, MAC and alias and bring it up, in one request.

        The link also goes (back) to group 0: a tap marked for deletion by a run that died
        before deleting it must not go with the next group deletion once it is wanted again.
        """
        attrs = (
            attr(_IFLA_MASTER, struct.pack("=I", master))
            + _GROUP_DEFAULT
            + attr(_IFLA_MTU, struct.pack("=I", mtu))
            + attr(_IFLA_ADDRESS, bytes.fromhex(address.replace(":", "")))
            + attr(_IFLA_IFALIAS, alias.encode() + b"\0")
        )
        self._request(_RTM_NEWLINK, index, _IFF_UP, attrs)

    def delete(self, index: int) -> None:
        """Delete a link."""
        self._request(_RTM_DELLINK, index, 0, b"")

    def delete_many(self, indexes: Sequence[int]) -> None:
        """Delete links, several in one request; links already gone are skipped.

        The kernel waits for an RCU grace period after every unregistration request (19 ms
        for a tap here), so links deleted one by one cost that each. Marked with this agent's
        doomed group and deleted by group, they cost it once.
        """
        if len(indexes) == 1:
            with contextlib.suppress(OSError):
                self.delete(indexes[0])
            return
        marked = []
        for index in indexes:
            with contextlib.suppress(OSError):
                self._request(_RTM_NEWLINK, index, 0, self._doomed)
                marked.append(index)
        if marked:
            try:
                self._request(_RTM_DELLINK, 0, 0, self._doomed)
            except OSError:
                for index in marked:
                    with contextlib.suppress(OSError):
                        self.delete(index)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


class Links:
    """Makes and removes the links of ports; blocking (run it in the network's worker)."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.cfg = names.cfg
        self._ipr: Any = None
        self._raw: RawLinks | None = None
        self._bridges: dict[str, int] = {}  # bridges (with their VLAN link) checked, by name

    @property
    def ipr(self) -> Any:
        """pyroute2's IPRoute, opened on first use."""
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    @property
    def raw(self) -> RawLinks:
        """The hand-packed rtnetlink socket, opened on first use."""
        if self._raw is None:
            self._raw = RawLinks(self.names.doomed_group)
        return self._raw

    def close(self) -> None:
        """Close both netlink sockets (later calls open them again)."""
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def link(self, name: str) -> Any | None:
        """The link named ``name`` as pyroute2 lists it, None when there is none."""
        try:
            links = self.ipr.get_links(ifname=name)
        except Exception as exc:  # pyroute2 raises NetlinkError(ENODEV) for a missing name
            if getattr(exc, "code", None) == errno.ENODEV:
                return None
            raise
        return links[0] if links else None

    def ensure_bridge(self, network: PortNetwork, mtu: int, made: list[str]) -> int:
        """Make (or check) the network's bridge and VLAN link; its index."""
        name = self.names.bridge(network)
        index = ifindex(name)
        if index is not None and self._bridges.get(name) == index:
            return index
        ipr = self.ipr
        link = self.link(name)
        if link is None:
            ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
            link = self.link(name)
            assert link is not None
            made.append(name)
            ipr.link("set", index=link["index"], ifalias=self.names.alias("bridge", network.id), state="up")
        elif link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "bridge":
            raise Conflict(f"{name} exists and is not a bridge", {"field": "network.bridge", "reason": "not a bridge"})
        bridge_index: int = link["index"]
        if network.vlan is not None:
            vname = self.names.vlan(network.vlan)
            vlink = self.link(vname)
            if vlink is None:
                phys = self.link(self.cfg.physical_interface)
                if phys is None:
                    raise bad("network.vlan", f"physical interface {self.cfg.physical_interface} not found")
                try:
                    ipr.link("add", ifname=vname, kind="vlan", link=phys["index"], vlan_id=network.vlan, mtu=mtu)
                except Exception as exc:
                    if getattr(exc, "code", None) == errno.EOPNOTSUPP:
                        raise AgentError(f"cannot make {vname}: this kernel has no 802.1Q VLAN support") from exc
                    raise
                vlink = self.link(vname)
                assert vlink is not None
                made.append(vname)
                alias = self.names.alias("vlan", network.id)
                ipr.link("set", index=vlink["index"], ifalias=alias, master=bridge_index, state="up")
            elif vlink.get("master") != bridge_index:
                ipr.link("set", index=vlink["index"], master=bridge_index, state="up")
        self._bridges[name] = bridge_index
        return bridge_index

    def ensure_tap(self, instance_uuid: str, port: Port, bridge_index: int, mtu: int, made: list[str],
                   shaping: Shaping | None = None) -> str:
        """Make (or fix) the port's tap on the bridge, with its inbound limit; its name."""
        tap = self.names.tap(port.id)
        alias = self.names.alias("tap", instance_uuid, port.id)
        mac = normal_mac(port.mac) or port.mac
        # The host end must not carry the guest's MAC, or the bridge would learn it on the
        # wrong side; libvirt and os-vif use fe: in the first octet for the same reason.
        address = "fe" + mac[2:]
        if create_tap(tap):
            made.append(tap)
            index = ifindex(tap)
            assert index is not None
            self.raw.set_up(index, master=bridge_index, mtu=mtu, address=address, alias=alias)
            if shaping:
                shape_tap(self.ipr, index, shaping, fresh=True)
            return tap
        link = self.link(tap)
        assert link is not None
        if link.get("ifalias") != alias:
            raise Conflict(f"{tap} exists and is not this port's tap", {"field": "id", "reason": "tap name in use"})
        wanted = {"ifalias": alias, "address": address, "mtu": mtu, "master": bridge_index, "group": 0}
        if any(link.get(k) != v for k, v in wanted.items()) or not link["flags"] & _IFF_UP:
            self.raw.set_up(link["index"], master=bridge_index, mtu=mtu, address=address, alias=alias)
        shape_tap(self.ipr, link["index"], shaping, fresh=False)
        return tap

    def delete(self, names: Iterable[str]) -> None:
        """Delete links this agent made (the record or this call says so)."""
        self.raw.delete_many([i for name in names if (i := ifindex(name)) is not None])

    def ensure_port(self, p: Plugged, made: list[str]) -> None:
        """Make (or fix) the port's bridge, VLAN link and tap; names of links made go in ``made``."""
        bridge_index = self.ensure_bridge(p.port.network, p.mtu, made)
        self.ensure_tap(p.instance_uuid, p.port, bridge_index, p.mtu, made, p.shaping)

    def shape(self, ports: Iterable[Plugged]) -> None:
        """Bring the existing taps of ``ports`` to their inbound limits."""
        for p in ports:
            if (index := ifindex(p.tap)) is not None:
                shape_tap(self.ipr, index, p.shaping, fresh=False)

    def our_taps(self, ports: Iterable[tuple[str, str]]) -> list[str]:
        """The taps of (instance, port id) pairs that exist and are ours."""
        taps = []
        for instance_uuid, pid in ports:
            link = self.link(self.names.tap(pid))
            if link is not None and link.get("ifalias") == self.names.alias("tap", instance_uuid, pid):
                taps.append(self.names.tap(pid))
        return taps

    def drop_bridge(self, network: PortNetwork) -> None:
        """Delete the network's bridge and its VLAN link if we made them and no other link is
        on the bridge (the caller knows that no port of the record is)."""
        name = self.names.bridge(network)
        bridge = self.link(name)
        if bridge is None or bridge.get("ifalias") != self.names.alias("bridge", network.id):
            return
        members = [link for link in self.ipr.get_links() if link.get("master") == bridge["index"]]
        ours = self.names.alias("vlan", network.id)
        if any(link.get("ifalias") != ours for link in members):
            return
        for link in members:
            self.ipr.link("del", index=link["index"])
        self.ipr.link("del", index=bridge["index"])
        self._bridges.pop(name, None)

    def remove_strays(self, wanted: Sequence[Plugged]) -> list[str]:
        """Delete every link of ours that no wanted port needs; their names.

        Checked bridges are forgotten too, so that each is checked again."""
        self._bridges.clear()
        names = self.names
        owner_prefix = self.cfg.owner + ":"
        ours = {
            link.get("ifname"): link
            for link in self.ipr.get_links()
            if (link.get("ifalias") or "").startswith(owner_prefix)
        }
        wanted_taps = {p.tap: names.alias("tap", p.instance_uuid, p.port.id) for p in wanted}
        wanted_bridges = {p.bridge for p in wanted}
        wanted_vlans = {names.vlan(p.port.network.vlan) for p in wanted if p.port.network.vlan is not None}
        removed = []
        for name, link in ours.items():
            kind = (link.get("ifalias") or "").split(":")[1:2]
            keep = (
                (kind == ["tap"] and wanted_taps.get(name) == link.get("ifalias"))
                or (kind == ["bridge"] and name in wanted_bridges)
                or (kind == ["vlan"] and name in wanted_vlans)
            )
            if not keep:
                with contextlib.suppress(Exception):
                    self.ipr.link("del", index=link["index"])
                removed.append(name)
        return removed
