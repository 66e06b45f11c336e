"""Two real QEMU guests (TCG) of the project's image on one bridge ask the agent's metadata
service at 169.254.169.254 for their ``meta_data.json``: each is told its own uuid, never the
other's, the instance being known by the port the request came in on."""

from __future__ import annotations

import random
import re
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess
from guest_fixtures import READY, guest_image, libvirtd
from network_fixtures import group, links, port, remove_owned, rule, sh
from test_guest_agent import MEMORY_MB, agent_config, conn, console, guest_agent, wait_console

pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "guest_agent", "guest_image", "libvirtd"]

# The guest gives up after 5 attempts of at most 4 s each, 1 s apart: its line (the uuid or
# "unreachable") is on the console within about 25 s of its network being up.
METADATA_LINE = re.compile(rb"FASTCOMPUTE-METADATA (uuid=(\S+)|unreachable) attempts=(\d+)")


def test_two_real_guests_on_one_bridge_each_read_their_own_uuid_from_the_metadata_service(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path) -> None:
    tag = uuid_mod.uuid4().hex[:6]
    owner, md_port = f"fcq{tag}", random.randrange(20000, 30000)
    agent = guest_agent(agent_config() + f'[network]\nowner = "{owner}"\nbridge_prefix = "q{tag}"\n'
                        f'tap_prefix = "m{tag[:3]}"\n[metadata]\nport = {md_port}\n')
    # The bridge and the network's router are there before the guests boot: the guests reach
    # 169.254.169.254 through their default gateway, which must answer ARP (nothing answers for
    # the address itself). The agent uses a bridge a port names and never removes it.
    bridge, router, router_end = f"q{tag}br", f"{owner}-r", f"{owner}r"
    # Port security on; the only thing the guests may send is TCP to port 80.
    web_out = [group(rule("egress", "tcp", 80))]
    ports = [port(ip, network=f"n{tag}", groups=web_out) for ip in ("10.81.0.11", "10.81.0.12")]
    for p in ports:
        p["network"]["bridge"] = bridge
        p["fixed_ips"][0]["gateway"] = "10.81.0.1"
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "link", "set", bridge, "up")
        sh("ip", "netns", "add", router)
        sh("ip", "link", "add", router_end, "type", "veth", "peer", "name", "eth0", "netns", router)
        sh("ip", "link", "set", router_end, "master", bridge, "up")
        sh("ip", "-n", router, "addr", "add", "10.81.0.1/24", "dev", "eth0")
        sh("ip", "-n", router, "link", "set", "eth0", "up")

        uuids = [agent.call("instance.spawn", {
            "name": f"md-{i}", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
            "image": {"url": guest_image.as_uri()}, "networks": [p], "wait": True,
        })["uuid"] for i, p in enumerate(ports)]  # fmt: skip
        assert all(links()[f"m{tag[:3]}{p['id']}"[:15]]["master"] == bridge for p in ports)

        told = []
        for u, ip in zip(uuids, ("10.81.0.11", "10.81.0.12"), strict=True):
            wait_console(agent, u, f"FASTCOMPUTE-NET ip={ip}/24 gw=10.81.0.1 from=config-drive")
            text = wait_console(agent, u, "FASTCOMPUTE-METADATA", timeout_s=60.0)
            line = METADATA_LINE.search(text)
            assert line is not None, text[-1500:]
            assert line.group(2) is not None, f"{u}: the metadata service never answered: {line.group(0)!r}"
            told.append(line.group(2).decode())
        assert told == uuids
        for u, other in zip(uuids, reversed(uuids), strict=True):
            wait_console(agent, u, READY)
            assert other.encode() not in console(agent, u)

        for u in uuids:
            agent.call("instance.delete", {"uuid": u})
    finally:
        sh("ip", "netns", "del", router, check=False)
        sh("ip", "link", "del", router_end, check=False)
        remove_owned(owner, [bridge])
