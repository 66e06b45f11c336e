"""A flavor's ``quota:vif_*`` limits hold a real QEMU guest's (TCG) traffic: two guests of the
project's image on one bridge, one with inbound and outbound averages set and one without;
a namespace on the bridge fetches a file from each guest's HTTP server (the guest's outbound
traffic) and each guest fetches a file from the namespace (its inbound traffic). The limited
guest's transfers run at about the limit, well below the unlimited guest's.

A behaviour check, not a benchmark: the rates are asserted loosely (under twice the limit, and
under half of what the unlimited guest gets on the same machine in the same run).

The agent shapes its taps itself (an htb class on the tap, a limit in its bridge table: htb
and nftables only, which this machine's kernel, without sfq or a police action, has); libvirt
is not asked to."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess
from guest_fixtures import READY, guest_image, libvirtd
from network_fixtures import (
    EGRESS_ALL,
    connect,
    group,
    in_netns,
    namespace_on_bridge,
    ping,
    port,
    remove_owned,
    rule,
    sh,
)
from test_guest_agent import MEMORY_MB, agent_config, conn, guest_agent, wait_console
from test_guest_console import socket_dir

pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "guest_agent", "guest_image", "libvirtd", "socket_dir"]

LIMIT_KIB_S = 256  # quota:vif_*_average, in KiB/s as Nova and libvirt take it
SIZE = 2 * 1024 * 1024  # 8 s at the limit; the limits' initial burst (one second's worth) is a small part
SERVER_PORT = 8080
TRANSFER_TIMEOUT_S = 120.0


class SerialShell:
    """The guest's serial console (the root shell the image runs there), held open: QEMU drops
    what a client sent and the guest's UART has not taken yet when the client goes, so the
    connection stays until the answer is seen (in ``instance.console``); what the guest prints
    to it is read and dropped, so that it never waits on us."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.sock.recv(65536):
                pass

    def type(self, line: str) -> None:
        """Type a line (and Enter)."""
        self.sock.sendall(line.encode() + b"\r")

    def close(self) -> None:
        """Let the console go (only once the answer to what was typed is seen)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(5)


def root_qdisc(tap: str) -> str:
    """The kind of the tap's root qdisc, as tc names it."""
    first = sh("tc", "qdisc", "show", "dev", tap, "root").stdout.split()
    return first[1] if len(first) > 1 else ""


def fetch_rate(ns: str, ip: str) -> float:
    """KiB/s of a GET of the guest's ``/big`` from the namespace (the guest's outbound traffic)."""
    sock = connect(ns, ip, 80, timeout=5.0)
    assert sock is not None, f"the guest {ip} does not take connections on port 80"
    with sock:
        sock.settimeout(TRANSFER_TIMEOUT_S)
        start = time.monotonic()
        sock.sendall(b"GET /big HTTP/1.0\r\nHost: guest\r\n\r\n")
        got = 0
        while chunk := sock.recv(65536):
            got += len(chunk)
        elapsed = time.monotonic() - start
    assert got > SIZE, f"got {got} bytes of the guest's {SIZE}-byte file"
    return SIZE / 1024 / elapsed


class Server:
    """An HTTP server of one ``SIZE``-byte answer in the namespace, timing each transfer from
    the request to the client's close (busybox wget closes once it has the body)."""

    def __init__(self, ns: str) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", SERVER_PORT))
            s.listen(4)
            return s

        self.sock = in_netns(ns, make)
        self.sock.settimeout(TRANSFER_TIMEOUT_S)

    def serve_one(self) -> tuple[threading.Thread, list[float]]:
        """Serve the next request in a thread; the list gets its KiB/s."""
        rates: list[float] = []

        def run() -> None:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(TRANSFER_TIMEOUT_S)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                start = time.monotonic()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             + f"Content-Length: {SIZE}\r\n\r\n".encode() + bytes(SIZE))
                while conn.recv(65536):
                    pass
                rates.append(SIZE / 1024 / (time.monotonic() - start))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, rates


def test_vif_quotas_limit_a_real_guests_traffic_both_ways(guest_agent: Callable[..., AgentProcess], conn: Any,
                                                          guest_image: Path, socket_dir: Path) -> None:
    tag = uuid_mod.uuid4().hex[:6]
    owner = f"fcw{tag}"
    agent = guest_agent(agent_config() + f'[network]\nowner = "{owner}"\nbridge_prefix = "w{tag}"\n'
                        f'tap_prefix = "u{tag[:3]}"\n[console]\nenabled = true\nlisten = "127.0.0.1:0"\n'
                        f'socket_dir = "{socket_dir}"\n')
    web = [group(EGRESS_ALL, rule("ingress", "icmp"), rule("ingress", "tcp", 80, remote="10.77.0.0/24"))]
    limits = {"quota:vif_inbound_average": str(LIMIT_KIB_S), "quota:vif_outbound_average": str(LIMIT_KIB_S)}
    ns, host_end = f"{owner}-c", f"{owner}v"
    guests: dict[str, tuple[str, str]] = {}  # name -> (uuid, ip)
    server: Server | None = None
    shells: dict[str, SerialShell] = {}
    try:
        for name, ip, specs in (("limited", "10.77.0.2", limits), ("free", "10.77.0.3", {})):
            rec = agent.call("instance.spawn", {
                "name": name, "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1, "extra_specs": specs},
                "image": {"url": guest_image.as_uri()}, "networks": [port(ip, network=f"n{tag}", groups=web)],
                "wait": True,
            })
            guests[name] = (rec["uuid"], ip)
            assert rec["vm_state"] == "active", (rec, agent.log()[-3000:])
        # libvirt is not asked to shape: the agent does, on the taps, once libvirt has started
        # the guest (and put its own qdisc on them).
        for name, (uuid, _ip) in guests.items():
            iface = ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(0)).find("devices/interface")
            assert iface is not None and iface.find("bandwidth") is None, name
            target = iface.find("target")
            assert target is not None
            tap = target.get("dev", "")
            deadline = time.monotonic() + 30
            while name == "limited" and "htb" not in root_qdisc(tap) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ("htb" in root_qdisc(tap)) == (name == "limited"), (name, root_qdisc(tap), agent.log()[-4000:])

        bridge = f"w{tag}n{tag}"[:15]
        namespace_on_bridge(ns, host_end, bridge, "10.77.0.1/24")
        server = Server(ns)
        for name, (uuid, ip) in guests.items():
            wait_console(agent, uuid, READY)
            # A file for the guest's HTTP server to send (its /www is in RAM). The marker's
            # arithmetic is only done by the shell, so the typed line's echo never matches it.
            shells[name] = SerialShell(socket_dir / f"{uuid}.sock")
            shells[name].type(f"dd if=/dev/zero of=/www/big bs=1024 count={SIZE // 1024} 2>/dev/null"
                              " && echo FC-BIG-$((20+1))")
            wait_console(agent, uuid, "FC-BIG-21")
            assert any(ping(ns, ip, timeout=2.0) for _ in range(15)), f"the {name} guest never answered a ping"

        rates: dict[str, dict[str, float]] = {}
        for name, (uuid, ip) in guests.items():
            outbound = fetch_rate(ns, ip)
            thread, got = server.serve_one()
            shells[name].type(f"wget -q -O /dev/null http://10.77.0.1:{SERVER_PORT}/big && echo FC-GOT-$((40+2))")
            wait_console(agent, uuid, "FC-GOT-42", timeout_s=TRANSFER_TIMEOUT_S)
            thread.join(TRANSFER_TIMEOUT_S)
            assert got, f"the {name} guest's download was not served"
            rates[name] = {"outbound": outbound, "inbound": got[0]}

        print("vif rates (KiB/s):", rates)
        for direction in ("outbound", "inbound"):
            limited, free = rates["limited"][direction], rates["free"][direction]
            assert limited < 2 * LIMIT_KIB_S, (direction, rates)
            assert limited < free / 2, (direction, rates)
    finally:
        for shell in shells.values():
            shell.close()
        if server is not None:
            server.sock.close()
        sh("ip", "link", "del", host_end, check=False)
        sh("ip", "netns", "del", ns, check=False)
        for uuid, _ip in guests.values():
            with contextlib.suppress(Exception):  # the fixture destroys what is left
                agent.call("instance.delete", {"uuid": uuid})
        remove_owned(owner)

