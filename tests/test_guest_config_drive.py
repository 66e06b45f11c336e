"""A real QEMU guest (TCG) of the project's image reads the config drive the agent made: its
init mounts the IDE CD-ROM labelled config-2, prints who it is and its keys on the serial
console, and takes its address from ``network_data.json``, at which a namespace pings it."""

from __future__ import annotations

import re
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess
from guest_fixtures import READY, guest_image, libvirtd
from network_fixtures import EGRESS_ALL, group, namespace_on_bridge, ping, port, remove_owned, rule, sh
from test_config_drive import CERT, SSH_KEY
from test_guest_agent import MEMORY_MB, agent_config, conn, guest_agent, wait_console

pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "guest_agent", "guest_image", "libvirtd"]


def test_a_real_guest_reads_its_config_drive_and_is_reached_at_its_address(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path) -> None:
    tag = uuid_mod.uuid4().hex[:6]
    owner = f"fcg{tag}"
    agent = guest_agent(agent_config() + f'[network]\nowner = "{owner}"\nbridge_prefix = "g{tag}"\n'
                        f'tap_prefix = "h{tag[:3]}"\n')
    guest_port = port("10.79.0.2", network=f"n{tag}", groups=[group(EGRESS_ALL, rule("ingress", "icmp"))])
    guest_port["fixed_ips"][0].update(gateway="10.79.0.1", dns_nameservers=["10.79.0.3"])
    ns, host_end = f"{owner}-c", f"{owner}v"
    try:
        rec = agent.call("instance.spawn", {
            "name": "Config Drive Guest", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
            "image": {"url": guest_image.as_uri()}, "networks": [guest_port], "wait": True,
            "key_pairs": [{"name": "alice", "public_key": SSH_KEY},
                          {"name": "corp-ca", "type": "x509", "public_key": CERT}],
        })
        uuid = rec["uuid"]
        # The drive is a read-only IDE CD-ROM of the domain.
        dom = ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(0))
        cdrom = dom.find("devices/disk[@device='cdrom']")
        assert cdrom is not None and cdrom.find("readonly") is not None
        target, source = cdrom.find("target"), cdrom.find("source")
        assert target is not None and target.get("bus") == "ide"
        assert source is not None and source.get("file") == str(agent.state_dir / "instances" / uuid / "disk.config")

        text = wait_console(agent, uuid, "FASTCOMPUTE-CONFIG-DRIVE").decode(errors="replace")
        line = re.search(r"FASTCOMPUTE-CONFIG-DRIVE dev=(\S*) uuid=(\S*) hostname=(\S*) keys=(\S*)", text)
        assert line is not None, text[-1500:]
        assert line.group(1).startswith("/dev/sr")
        assert (line.group(2), line.group(3), line.group(4)) == (uuid, "config-drive-guest", "alice,corp-ca")
        wait_console(agent, uuid, "FASTCOMPUTE-NET ip=10.79.0.2/24 gw=10.79.0.1 from=config-drive")
        wait_console(agent, uuid, READY)

        bridge = f"g{tag}n{tag}"[:15]
        namespace_on_bridge(ns, host_end, bridge, "10.79.0.1/24")
        assert any(ping(ns, "10.79.0.2", timeout=2.0) for _ in range(15)), "the guest never answered a ping"
        sh("ip", "link", "del", host_end)  # now: the namespace's links go only later
        sh("ip", "netns", "del", ns)
        agent.call("instance.delete", {"uuid": uuid})
    finally:
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", host_end, check=False)
        remove_owned(owner)
