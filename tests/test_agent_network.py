"""Ports through the agent: spawn plugs them, ops change them, delete and restart clean up."""

from __future__ import annotations

import json
import subprocess
import time
import uuid as uuid_mod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, free_port, scrape, spawn_args
from network_fixtures import links, remove_owned

from fastcompute.errors import BadRequest, Conflict, NotFound


def nft_tables() -> set[tuple[str, str]]:
    out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {(e["table"]["family"], e["table"]["name"]) for e in json.loads(out)["nftables"] if "table" in e}


def port(pid: str, mac: str, ip: str, net: str) -> dict[str, Any]:
    return {
        "id": pid, "mac": mac, "network": {"id": net, "mtu": 1400},
        "fixed_ips": [{"ip": ip, "prefix": 24}],
        "security_groups": [{"id": "ssh", "rules": [
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
             "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "10.77.0.0/24"}]}],
    }


@pytest.fixture(params=[""], ids=["plain"])
def net_agent(make_agent: Any, request: pytest.FixtureRequest) -> Any:
    """An agent with its own network names; ``request.param`` is more of its config."""
    tag = uuid_mod.uuid4().hex[:6]
    owner = f"fct{tag}"
    config = f'[network]\nowner = "{owner}"\nbridge_prefix = "b{tag}"\ntap_prefix = "t{tag[:3]}"\n'
    agent = make_agent(config=config + request.param)
    yield agent, owner, f"b{tag}", f"t{tag[:3]}"
    if agent.proc is not None and agent.proc.poll() is None:
        agent.terminate()
    remove_owned(owner)


def test_spawn_plugs_ports_and_delete_removes_exactly_them(net_agent: Any, image_file: Path) -> None:
    agent, owner, bprefix, tprefix = net_agent
    p1 = port("aaaa1111-2222", "52:54:00:77:00:01", "10.77.0.11", "n1")
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, networks=[p1]))
    assert rec["vm_state"] == "active"
    have = links()
    tap, bridge = f"{tprefix}aaaa1111-2222"[:15], f"{bprefix}n1"[:15]
    assert tap in have and bridge in have
    assert have[tap]["master"] == bridge and have[tap]["mtu"] == 1400 and have[bridge]["mtu"] == 1400
    assert {("bridge", owner), ("inet", owner)} <= nft_tables()

    with pytest.raises(Conflict):  # the same MAC on the same network
        agent.call("instance.spawn", spawn_args(image_file, networks=[dict(p1, id="bbbb")]))
    with pytest.raises(BadRequest) as bad:
        agent.call("instance.spawn", spawn_args(image_file, networks=[dict(p1, id="cccc", mac="nope")]))
    assert bad.value.details["field"].startswith("args.networks[0]")

    p2 = port("dddd3333", "52:54:00:77:00:02", "10.77.0.12", "n1")
    agent.call("instance.attach_port", {"uuid": rec["uuid"], "port": p2})
    tap2 = f"{tprefix}dddd3333"[:15]
    assert links()[tap2]["master"] == bridge
    agent.call("instance.set_security_groups", {"uuid": rec["uuid"], "port_id": "dddd3333", "security_groups": []})
    agent.call("instance.detach_port", {"uuid": rec["uuid"], "port_id": "dddd3333"})
    assert tap2 not in links() and tap in links()
    with pytest.raises(NotFound):
        agent.call("instance.detach_port", {"uuid": rec["uuid"], "port_id": "dddd3333"})

    agent.call("instance.delete", {"uuid": rec["uuid"]})
    after = links()
    assert tap not in after and bridge not in after
    assert not any((link.get("ifalias") or "").startswith(owner + ":") for link in after.values())


def test_restart_remakes_missing_taps_and_drops_strays(net_agent: Any, image_file: Path) -> None:
    agent: AgentProcess
    agent, owner, bprefix, tprefix = net_agent
    p1 = port("eeee5555", "52:54:00:77:00:05", "10.77.0.15", "n2")
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, networks=[p1]))
    tap = f"{tprefix}eeee5555"[:15]
    agent.terminate()
    subprocess.run(["ip", "link", "del", tap], check=True)
    stray = f"{tprefix}stray"[:15]
    subprocess.run(["ip", "tuntap", "add", "dev", stray, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", stray, "alias", f"{owner}:tap:gone:stray"], check=True)
    agent.start()
    have = links()
    assert tap in have and have[tap]["master"] == f"{bprefix}n2"[:15]
    assert stray not in have
    assert agent.call("instance.get", {"uuid": rec["uuid"]})["vm_state"] == "active"
    agent.call("instance.delete", {"uuid": rec["uuid"]})
    agent.restart()
    assert (("bridge", owner) not in nft_tables()) and (("inet", owner) not in nft_tables())


def test_a_port_given_to_an_instance_that_failed_to_plug_it_stays_its_own_until_deleted(
    net_agent: Any, image_file: Path
) -> None:
    agent, _owner, _bprefix, tprefix = net_agent
    p = port("eeee5555", "52:54:00:77:00:05", "10.77.0.15", "n5")
    broken = dict(p, network={"id": "n5", "bridge": "lo"})  # lo is no bridge: the build fails
    failed = agent.call("instance.spawn", spawn_args(image_file, wait=True, networks=[broken]))
    assert failed["vm_state"] == "error"
    with pytest.raises(Conflict) as err:  # the failed instance still holds the port id
        agent.call("instance.spawn", spawn_args(image_file, wait=True, networks=[p]))
    assert err.value.details == {"port_id": "eeee5555"}
    agent.call("instance.delete", {"uuid": failed["uuid"]})
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, networks=[p]))
    assert rec["vm_state"] == "active"
    assert f"{tprefix}eeee5555"[:15] in links()
    agent.call("instance.delete", {"uuid": rec["uuid"]})


METRICS_PORT = free_port()


@pytest.mark.parametrize("net_agent", [f'[stats]\nmetrics = "127.0.0.1:{METRICS_PORT}"\n'], indirect=True)
def test_spawns_at_once_are_plugged_in_batches_the_metrics_count(net_agent: Any, image_file: Path) -> None:
    agent, owner, _bprefix, _tprefix = net_agent
    ports = [port(f"ffff{i:04d}", f"52:54:00:77:01:{i:02x}", f"10.77.1.{i + 1}", "n6") for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        recs = list(pool.map(lambda p: agent.call("instance.spawn", spawn_args(image_file, wait=True, networks=[p])),
                             ports))  # fmt: skip
        assert all(r["vm_state"] == "active" for r in recs)
        list(pool.map(lambda r: agent.call("instance.delete", {"uuid": r["uuid"]}), recs))
    assert not any((link.get("ifalias") or "").startswith(owner + ":") for link in links().values())
    time.sleep(0.2)
    m = scrape(f"http://127.0.0.1:{METRICS_PORT}/metrics")
    for kind in ("plug", "unplug"):
        changes = m[("fastcompute_network_batch_size_sum", (("kind", kind),))]
        batches = m[("fastcompute_network_batch_size_count", (("kind", kind),))]
        assert changes == 12, f"every {kind} is counted once"
        assert 1 <= batches < 12, f"12 {kind}s at once ran as {batches} batches: none ran together"
        assert m[("fastcompute_network_batch_duration_seconds_count", (("kind", kind),))] == batches
