"""Shelve, offload and unshelve through real agents (test hypervisor) and the real Glance."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import disk_dirs, spawn_args, wait_for_state
from glance_fixtures import Glance, glance
from image_workflow_fixtures import (
    disk_of,
    glance_config,
    glance_held,
    glance_image,
    glance_images,
    read_guest,
    wait_task,
    write_marker,
)
from network_fixtures import links, remove_owned
from placement_fixtures import PlacementServer, placement, placement_venv

from fastcompute.errors import Conflict, NoCapacity

__all__ = ["glance", "placement", "placement_venv"]

MiB = 1 << 20


def _used(agent: Any) -> dict[str, int]:
    return {rc: n for rc, n in agent.call("host.info")["usage"].items() if n}


def test_shelve_offloads_at_once_and_unshelve_brings_it_back(make_agent: Any, glance: Glance,
                                                             image_file: Path) -> None:
    agent = make_agent(config=glance_config(glance))
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, metadata={"k": "v"}))
    uuid = rec["uuid"]
    marker = os.urandom(8192)
    write_marker(disk_of(agent, uuid), 300 * MiB, marker)
    assert _used(agent)

    shelved = agent.call("instance.shelve", {"uuid": uuid})
    assert shelved["vm_state"] == "shelved_offloaded" and shelved["task_state"] is None
    assert shelved["power_state"] == "nostate" and shelved["numa"] is None
    image_id = shelved["shelved_image_id"]
    assert glance_image(glance, image_id)["status"] == "active"  # type: ignore[index]
    assert _used(agent) == {} and uuid not in disk_dirs(agent)  # the host pays nothing for it
    with pytest.raises(Conflict):
        agent.call("instance.start", {"uuid": uuid})

    back = agent.call("instance.unshelve", {"uuid": uuid})
    assert back["vm_state"] == "active" and back["uuid"] == uuid and back["metadata"] == {"k": "v"}
    assert back["shelved_image_id"] is None and _used(agent)
    assert read_guest(disk_of(agent, uuid), 300 * MiB, len(marker)) == marker
    assert glance_image(glance, image_id) is None  # the snapshot is gone once used
    agent.call("instance.delete", {"uuid": uuid})
    assert _used(agent) == {}


def test_offload_waits_for_the_configured_time(make_agent: Any, glance: Glance, image_file: Path) -> None:
    agent = make_agent(config=glance_config(glance, "[compute]\nshelved_offload_time_s = 1.5\n"))
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    rec = agent.call("instance.shelve", {"uuid": uuid})
    assert rec["vm_state"] == "shelved" and _used(agent)  # still holding its claim
    wait_for_state(agent, uuid, "shelved_offloaded", timeout_s=30)
    assert _used(agent) == {}
    # A shelved (not yet offloaded) instance unshelves by starting again; deleting an
    # offloaded one deletes its snapshot.
    image_id = agent.call("instance.get", {"uuid": uuid})["shelved_image_id"]
    agent.call("instance.delete", {"uuid": uuid})
    assert glance_image(glance, image_id) is None


def test_shelved_instance_unshelves_by_starting_and_offloads_on_request(make_agent: Any, glance: Glance,
                                                                        image_file: Path) -> None:
    agent = make_agent(config=glance_config(glance, "[compute]\nshelved_offload_time_s = -1\n"))
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    rec = agent.call("instance.shelve", {"uuid": uuid})
    assert rec["vm_state"] == "shelved" and rec["power_state"] == "shutdown"
    back = agent.call("instance.unshelve", {"uuid": uuid})
    assert back["vm_state"] == "active" and back["power_state"] == "running"
    assert glance_images(glance, uuid) == []
    agent.call("instance.shelve", {"uuid": uuid})
    off = agent.call("instance.shelve_offload", {"uuid": uuid})
    assert off["vm_state"] == "shelved_offloaded" and _used(agent) == {}


def test_unshelve_that_no_longer_fits_is_no_capacity_and_holds_nothing(make_agent: Any, glance: Glance,
                                                                      image_file: Path) -> None:
    agent = make_agent(config=glance_config(glance))
    inv = agent.call("host.info")["inventory"]["MEMORY_MB"]
    big = (inv["total"] - inv["reserved"]) * inv["allocation_ratio"] * 0.6
    flavor = {"vcpus": 1, "memory_mb": int(big), "disk_gb": 1}
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True, flavor=flavor))["uuid"]
    agent.call("instance.shelve", {"uuid": uuid})
    other = agent.call("instance.spawn", spawn_args(image_file, wait=True, flavor=flavor))
    assert other["vm_state"] == "active"
    used = _used(agent)
    with pytest.raises(NoCapacity):
        agent.call("instance.unshelve", {"uuid": uuid})
    rec = agent.call("instance.get", {"uuid": uuid})
    assert rec["vm_state"] == "shelved_offloaded" and rec["task_state"] is None
    assert _used(agent) == used and uuid not in disk_dirs(agent)
    agent.call("instance.delete", {"uuid": other["uuid"]})
    assert agent.call("instance.unshelve", {"uuid": uuid})["vm_state"] == "active"


def _port(pid: str, mac: str, ip: str) -> dict[str, Any]:
    return {"id": pid, "mac": mac, "network": {"id": "sh", "mtu": 1400}, "fixed_ips": [{"ip": ip, "prefix": 24}]}


@pytest.fixture
def two_net_agents(make_agent: Any, glance: Glance) -> Any:
    """Two agents with their own network names, both saving to Glance."""
    made = []
    for _ in range(2):
        tag = uuid_mod.uuid4().hex[:6]
        net = f'[network]\nowner = "fct{tag}"\nbridge_prefix = "b{tag}"\ntap_prefix = "t{tag[:3]}"\n'
        made.append((make_agent(config=glance_config(glance, net)), f"fct{tag}", f"t{tag[:3]}"))
    yield made
    for agent, owner, _ in made:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.terminate()
        remove_owned(owner)


def test_unshelve_on_another_agent_with_the_same_ports(two_net_agents: Any, glance: Glance,
                                                       image_file: Path) -> None:
    (a, _, tap_a), (b, _, tap_b) = two_net_agents
    port = _port("shelfport1", "52:54:00:78:00:01", "10.78.0.11")
    rec = a.call("instance.spawn", spawn_args(image_file, wait=True, networks=[port], metadata={"role": "db"}))
    uuid = rec["uuid"]
    marker = os.urandom(4096)
    write_marker(disk_of(a, uuid), 900 * MiB, marker)
    assert f"{tap_a}shelfport1"[:15] in links()
    a.call("instance.shelve", {"uuid": uuid})
    assert f"{tap_a}shelfport1"[:15] not in links() and _used(a) == {}

    moving = a.call("instance.get_shelved", {"uuid": uuid})
    assert moving["image_id"] and [p["id"] for p in moving["ports"]] == ["shelfport1"]
    assert moving["bootstrap"] is None or moving["bootstrap"].get("admin_pass") is None
    on_b = b.call("instance.unshelve", {"uuid": uuid, "shelved": moving})
    assert on_b["vm_state"] == "active" and on_b["uuid"] == uuid and on_b["metadata"] == {"role": "db"}
    assert on_b["host"] == b.call("host.info")["hostname"]
    assert f"{tap_b}shelfport1"[:15] in links()
    assert read_guest(disk_of(b, uuid), 900 * MiB, len(marker)) == marker
    assert _used(b) and _used(a) == {}
    # The agent it came from forgets it on delete; the moved instance is not touched.
    a.call("instance.delete", {"uuid": uuid})
    assert b.call("instance.get", {"uuid": uuid})["vm_state"] == "active"
    assert f"{tap_b}shelfport1"[:15] in links()


def test_unshelve_elsewhere_that_fails_leaves_it_where_it_was(two_net_agents: Any, glance: Glance,
                                                              image_file: Path) -> None:
    (a, _, _), (b, _, _) = two_net_agents
    uuid = a.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    a.call("instance.shelve", {"uuid": uuid})
    moving = a.call("instance.get_shelved", {"uuid": uuid})
    glance_lost = dict(moving, image_id=str(uuid_mod.uuid4()))
    with pytest.raises(Exception):  # noqa: B017 - any typed error: the image is not there
        b.call("instance.unshelve", {"uuid": uuid, "shelved": glance_lost})
    assert b.call("instance.list") == [] and _used(b) == {}
    assert a.call("instance.get", {"uuid": uuid})["vm_state"] == "shelved_offloaded"


def _in_background(agent: Any, op: str, uuid: str) -> concurrent.futures.Future[Any]:
    def call() -> Any:
        with contextlib.suppress(Exception), agent.client(timeout_s=15) as c:  # the agent is killed under it
            return c.call(op, {"uuid": uuid})

    return concurrent.futures.ThreadPoolExecutor(1).submit(call)


def test_kill_9_mid_shelve_rolls_back(make_agent: Any, glance: Glance, image_file: Path) -> None:
    agent = make_agent(config=glance_config(glance))
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    with glance_held(glance):
        _in_background(agent, "instance.shelve", uuid)
        wait_task(agent, uuid, "shelving")
        agent.kill()
    agent.start()
    rec = wait_for_state(agent, uuid, "active")
    assert rec["shelved_image_id"] is None and glance_images(glance, uuid) == []
    assert agent.call("instance.shelve", {"uuid": uuid})["vm_state"] == "shelved_offloaded"


def test_kill_9_mid_unshelve_rolls_back_to_offloaded(make_agent: Any, glance: Glance, image_file: Path) -> None:
    agent = make_agent(config=glance_config(glance))
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    image_id = agent.call("instance.shelve", {"uuid": uuid})["shelved_image_id"]
    with glance_held(glance):  # the unshelve waits for the snapshot's download
        _in_background(agent, "instance.unshelve", uuid)
        wait_task(agent, uuid, "unshelving")
        assert _used(agent)
        agent.kill()
    agent.start()
    rec = wait_for_state(agent, uuid, "shelved_offloaded")
    assert rec["shelved_image_id"] == image_id and _used(agent) == {} and uuid not in disk_dirs(agent)
    assert agent.call("instance.unshelve", {"uuid": uuid})["vm_state"] == "active"
    assert _used(agent) and glance_image(glance, image_id) is None


def _allocated(placement: PlacementServer, host: str, uuid: str, want: bool, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = uuid in placement.provider_view(host)["allocations"]
        except (KeyError, IndexError, AssertionError):
            got = None
        if got is want:
            return
        assert time.monotonic() < deadline, f"allocation of {uuid} in Placement: {got}, wanted {want}"
        time.sleep(0.1)


def test_offload_gives_back_the_placement_allocation(make_agent: Any, glance: Glance, placement: PlacementServer,
                                                     image_file: Path) -> None:
    host = f"shelve-{uuid_mod.uuid4().hex[:8]}"
    agent = make_agent(config=glance_config(glance) + f'[placement]\nurl = "{placement.url}"\nretry_max_s = 0.5\n'
                       f'[agent]\nhost = "{host}"\n')
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    _allocated(placement, host, uuid, True)
    agent.call("instance.shelve", {"uuid": uuid})
    _allocated(placement, host, uuid, False)
    agent.call("instance.unshelve", {"uuid": uuid})
    _allocated(placement, host, uuid, True)
