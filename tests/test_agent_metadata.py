"""The metadata service through the agent: a spawned instance's port, taken over by a stand-in
guest, reads its own instance's documents; SIGTERM stops the listeners and takes their address
off the bridge."""

from __future__ import annotations

import json
import random
import uuid as uuid_mod
from pathlib import Path
from typing import Any

from agent_fixtures import spawn_args
from metadata_fixtures import http_get
from network_fixtures import Lab, links, remove_owned, sh

from fastcompute.config import NetworkConfig
from fastcompute.network import Network, PluggedPort


def _port(pid: str, ip: str) -> dict[str, Any]:
    return {
        "id": pid, "mac": f"52:54:00:68:00:{ip.rsplit('.', 1)[1]:0>2}", "network": {"id": "md"},
        "fixed_ips": [{"ip": ip, "prefix": 24}],
        "security_groups": [{"id": "out", "rules": [{"direction": "egress", "ethertype": "IPv4"}]}],
    }  # fmt: skip


def test_a_guest_of_the_agent_reads_its_own_metadata_and_sigterm_cleans_up(make_agent: Any, image_file: Path) -> None:
    tag = uuid_mod.uuid4().hex[:6]
    owner, md_port = f"fct{tag}", random.randrange(20000, 30000)
    config = (f'[network]\nowner = "{owner}"\nbridge_prefix = "b{tag}"\ntap_prefix = "t{tag[:3]}"\n'
              f"[metadata]\nport = {md_port}\n")  # fmt: skip
    agent = make_agent(config=config)
    cfg = NetworkConfig(owner=owner, bridge_prefix=f"b{tag}")
    lab = Lab(owner, cfg, Network(cfg))
    try:
        recs = [agent.call("instance.spawn", spawn_args(image_file, name=f"web-{i}", wait=True,
                                                          metadata={"n": str(i)}, networks=[_port(f"p{tag}{i}", ip)]))
                for i, ip in enumerate(("10.68.0.5", "10.68.0.6"))]  # fmt: skip
        bridge = f"b{tag}md"
        guests = [
            lab.guest_for(PluggedPort(port_id=f"p{tag}{i}", tap=f"t{tag[:3]}p{tag}{i}"[:15],
                                      mac=f"52:54:00:68:00:0{5 + i}", mtu=1500, bridge=bridge), ip)
            for i, ip in enumerate(("10.68.0.5", "10.68.0.6"))
        ]  # fmt: skip
        router = f"{owner}-r"
        sh("ip", "netns", "add", router)
        lab.namespaces.append(router)
        lab.extra_links.append(f"{owner}r")
        sh("ip", "link", "add", f"{owner}r", "type", "veth", "peer", "name", "eth0", "netns", router)
        sh("ip", "link", "set", f"{owner}r", "master", bridge, "up")
        sh("ip", "-n", router, "addr", "add", "10.68.0.1/24", "dev", "eth0")
        sh("ip", "-n", router, "link", "set", "eth0", "up")
        for g in guests:
            sh("ip", "-n", g.ns, "route", "add", "default", "via", "10.68.0.1")
        assert any(a.get("local") == "169.254.169.252" for a in links()[bridge].get("addr_info", []) + _addrs(bridge))
        for g, rec in zip(guests, recs, strict=True):
            got = http_get(g.ns, "/openstack/latest/meta_data.json", timeout=3)
            assert got is not None and got[0] == 200
            meta = json.loads(got[1])
            assert (meta["uuid"], meta["name"], meta["meta"]) == (rec["uuid"], rec["name"], rec["metadata"])
        assert agent.terminate() == 0
        assert not any(a.get("local") == "169.254.169.252" for a in _addrs(bridge))
        assert http_get(guests[0].ns, "/openstack/latest/meta_data.json", timeout=0.5) is None
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.terminate()
        lab.cleanup()
        remove_owned(owner)


def _addrs(link: str) -> list[dict[str, Any]]:
    out = json.loads(sh("ip", "-j", "addr", "show", "dev", link).stdout)
    info: list[dict[str, Any]] = out[0].get("addr_info", []) if out else []
    return info
