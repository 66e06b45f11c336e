"""Host resources, capacity, quotas and the errors a user can provoke: NO_CAPACITY,
QUOTA_EXCEEDED, IMAGE_ERROR and BUSY, on the default test host and on custom node files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msgpack
import zmq
from agent_fixtures import (
    AgentProcess,
    call_error,
    disk_dirs,
    node_uri,
    spawn_args,
    spawn_in_state,
    wait_for_state,
)

RCS = {"VCPU", "PCPU", "MEMORY_MB", "DISK_GB"}


def test_host_info_of_the_default_test_host(agent: AgentProcess) -> None:
    info = agent.call("host.info")
    assert info["hypervisor"]["uri"] == "test:///default"
    assert info["hypervisor"]["type"] == "TEST"
    assert info["hypervisor"]["version"].count(".") == 2
    assert isinstance(info["hostname"], str) and info["hostname"]
    assert set(info["inventory"]) == RCS and set(info["usage"]) == RCS
    for inv in info["inventory"].values():
        assert set(inv) == {"total", "reserved", "allocation_ratio", "min_unit", "max_unit", "step_size"}
    inv = info["inventory"]
    # libvirt's default test host: 16 CPUs in two cells of 2 and 4 GiB (its capabilities; getInfo
    # says 3 GiB); Nova's default ratios and reserve.
    assert inv["VCPU"]["total"] == 16 and inv["VCPU"]["allocation_ratio"] == 16.0
    assert inv["PCPU"]["total"] == 0
    assert inv["MEMORY_MB"]["total"] == 6144 and inv["MEMORY_MB"]["reserved"] == 512
    assert inv["MEMORY_MB"]["allocation_ratio"] == 1.5
    assert inv["DISK_GB"]["allocation_ratio"] == 1.0 and inv["DISK_GB"]["total"] > 0
    cells = info["topology"]["cells"]
    assert sorted(c for cell in cells for c in cell["cpus"]) == list(range(16))
    assert [cell["memory_mb"] for cell in cells] == [2048, 4096]
    assert info["usage"] == dict.fromkeys(RCS, 0)
    assert isinstance(info["traits"], list)


def test_even_topology_derived_from_a_node_file(make_agent: Any, tmp_path: Path) -> None:
    uri = node_uri(tmp_path, nodes=2, sockets=2, cores=4, threads=2, memory_mib=65536)
    agent = make_agent(hypervisor=uri, config="[resources]\ndisk_gb = 500\n")
    info = agent.call("host.info")
    assert info["hypervisor"]["uri"] == uri
    cells = info["topology"]["cells"]
    assert [c["id"] for c in cells] == [0, 1]
    assert [c["cpus"] for c in cells] == [list(range(16)), list(range(16, 32))]
    assert all(c["memory_mb"] == 32768 for c in cells)
    # Threads of a core are siblings: pairs, here.
    assert cells[0]["siblings"][:2] == [[0, 1], [2, 3]] and all(len(s) == 2 for s in cells[1]["siblings"])
    assert info["inventory"]["VCPU"]["total"] == 32
    assert info["inventory"]["MEMORY_MB"]["total"] == 65536
    assert info["inventory"]["DISK_GB"]["total"] == 500


def test_configured_ratios_and_reserves(make_agent: Any, tmp_path: Path, image_file: Path) -> None:
    uri = node_uri(tmp_path, nodes=1, sockets=1, cores=8, threads=1, memory_mib=8192)
    agent = make_agent(hypervisor=uri, config=(
        "[resources]\ncpu_allocation_ratio = 2.0\nram_allocation_ratio = 1.0\nreserved_host_cpus = 2\n"
        "reserved_host_memory_mb = 1024\ndisk_gb = 40\nreserved_host_disk_mb = 10240\n"
        "cpu_dedicated_set = \"6-7\"\n"))
    inv = agent.call("host.info")["inventory"]
    assert (inv["VCPU"]["total"], inv["VCPU"]["reserved"], inv["VCPU"]["allocation_ratio"]) == (6, 2, 2.0)
    assert inv["PCPU"]["total"] == 2
    assert (inv["MEMORY_MB"]["total"], inv["MEMORY_MB"]["reserved"]) == (8192, 1024)
    assert (inv["DISK_GB"]["total"], inv["DISK_GB"]["reserved"]) == (40, 10)
    # (6 - 2) * 2 = 8 VCPUs may be given out: two instances of 4 fit, then nothing more. (One
    # of 8 would not: one instance gets at most max_unit = 6 VCPU, as Placement allows.)
    four = {"vcpus": 4, "memory_mb": 64, "disk_gb": 1}
    for name in ("a", "b"):
        agent.call("instance.spawn", spawn_args(image_file, name=name, wait=True, flavor=four))
    one = {"vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    exc = call_error(agent, "instance.spawn", spawn_args(image_file, flavor=one))
    assert exc.code == "NO_CAPACITY" and exc.details["resource_class"] == "VCPU"


def test_usage_follows_instances(agent: AgentProcess, image_file: Path) -> None:
    a = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    b = agent.call("instance.spawn", spawn_args(
        image_file, wait=True, flavor={"vcpus": 3, "memory_mb": 256, "disk_gb": 2}))
    assert agent.call("host.info")["usage"] == {"VCPU": 4, "PCPU": 0, "MEMORY_MB": 320, "DISK_GB": 3}
    agent.call("instance.stop", {"uuid": b["uuid"]})
    # A stopped instance keeps its resources (as in Nova).
    assert agent.call("host.info")["usage"]["VCPU"] == 4
    agent.call("instance.delete", {"uuid": b["uuid"]})
    assert agent.call("host.info")["usage"] == {"VCPU": 1, "PCPU": 0, "MEMORY_MB": 64, "DISK_GB": 1}
    agent.call("instance.delete", {"uuid": a["uuid"]})
    assert agent.call("host.info")["usage"] == dict.fromkeys(RCS, 0)


def test_no_capacity_for_a_flavor_larger_than_the_host(agent: AgentProcess, image_file: Path) -> None:
    for flavor, rc in (({"vcpus": 257, "memory_mb": 64, "disk_gb": 1}, "VCPU"),
                       ({"vcpus": 1, "memory_mb": 8449, "disk_gb": 1}, "MEMORY_MB"),
                       ({"vcpus": 1, "memory_mb": 64, "disk_gb": 65536}, "DISK_GB"),
                       ({"vcpus": 1, "memory_mb": 64, "disk_gb": 1,
                         "extra_specs": {"hw:cpu_policy": "dedicated"}}, "PCPU")):
        exc = call_error(agent, "instance.spawn", spawn_args(image_file, flavor=flavor))
        assert exc.code == "NO_CAPACITY", flavor
        assert exc.details["resource_class"] == rc and rc in exc.message
    assert agent.call("instance.list") == []
    assert agent.call("host.info")["usage"] == dict.fromkeys(RCS, 0)


def test_one_instance_may_not_have_more_than_max_unit(make_agent: Any, tmp_path: Path, image_file: Path) -> None:
    """128 CPUs at ratio 16 hold 2,048 VCPU, but one instance gets at most 128 (Placement's
    max_unit): a 1,024-vCPU guest is refused, a 128-vCPU one is not."""
    uri = node_uri(tmp_path, nodes=2, sockets=2, cores=32, threads=1, memory_mib=262144)
    agent = make_agent(hypervisor=uri)
    inventory = agent.call("host.info")["inventory"]["VCPU"]
    assert (inventory["total"], inventory["max_unit"], inventory["allocation_ratio"]) == (128, 128, 16.0)
    huge = {"vcpus": 1024, "memory_mb": 64, "disk_gb": 1}
    exc = call_error(agent, "instance.spawn", spawn_args(image_file, flavor=huge))
    assert exc.code == "NO_CAPACITY"
    assert exc.details["resource_class"] == "VCPU" and exc.details["max_unit"] == 128
    assert agent.call("instance.list") == []
    assert agent.call("host.info")["usage"]["VCPU"] == 0
    rec = agent.call("instance.spawn", spawn_args(image_file, flavor={"vcpus": 128, "memory_mb": 64, "disk_gb": 1}))
    assert rec["vm_state"] == "building"


def test_no_capacity_when_full_then_room_after_delete(make_agent: Any, tmp_path: Path, image_file: Path) -> None:
    uri = node_uri(tmp_path, nodes=1, sockets=1, cores=2, threads=1, memory_mib=4096)
    agent = make_agent(hypervisor=uri, config="[resources]\ncpu_allocation_ratio = 1.0\ndisk_gb = 100\n")
    first = spawn_in_state(agent, image_file, "active")
    spawn_in_state(agent, image_file, "stopped")
    exc = call_error(agent, "instance.spawn", spawn_args(image_file))
    assert exc.code == "NO_CAPACITY" and exc.details["resource_class"] == "VCPU"
    assert exc.details["free"] == 0 and exc.details["requested"] == 1
    assert len(agent.call("instance.list")) == 2
    agent.call("instance.delete", {"uuid": first["uuid"]})
    assert agent.call("instance.spawn", spawn_args(image_file, wait=True))["vm_state"] == "active"


def test_quota_exceeded(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config="[quota]\ninstances = 2\ncores = 3\n")
    spawn_in_state(agent, image_file, "active", project_id="a")
    spawn_in_state(agent, image_file, "stopped", project_id="a")
    exc = call_error(agent, "instance.spawn", spawn_args(image_file, project_id="a"))
    assert exc.code == "QUOTA_EXCEEDED" and exc.details["resource"] == "instances" and "a" in exc.message
    # Another project has its own quota; cores count too.
    spawn_in_state(agent, image_file, "active", project_id="b")
    exc = call_error(agent, "instance.spawn", spawn_args(
        image_file, project_id="b", flavor={"vcpus": 3, "memory_mb": 64, "disk_gb": 1}))
    assert exc.code == "QUOTA_EXCEEDED" and exc.details["resource"] == "cores"
    assert len(agent.call("instance.list", {"project_id": "a"})) == 2
    assert agent.call("host.info")["usage"]["VCPU"] == 3


def test_image_error_missing_file(agent: AgentProcess, image_file: Path) -> None:
    rec = spawn_in_state(agent, image_file, "error")
    assert rec["power_state"] == "nostate" and rec["task_state"] is None
    assert rec["fault"]["code"] == "IMAGE_ERROR" and "no-such-image" in rec["fault"]["message"]
    assert agent.call("instance.get", {"uuid": rec["uuid"]})["fault"] == rec["fault"]
    # A failed build holds nothing and leaves no disk; it stays listed until deleted.
    assert agent.call("host.info")["usage"] == dict.fromkeys(RCS, 0)
    assert not (agent.state_dir / "instances" / rec["uuid"] / "disk").exists()
    assert [r["vm_state"] for r in agent.call("instance.list")] == ["error"]
    agent.call("instance.delete", {"uuid": rec["uuid"]})
    assert disk_dirs(agent) == set()


def test_image_error_checksum_mismatch(agent: AgentProcess, image_file: Path) -> None:
    bad = agent.call("instance.spawn", {**spawn_args(image_file, wait=True),
                                        "image": {"url": image_file.as_uri(), "checksum": "sha256:" + "0" * 64}})
    assert bad["vm_state"] == "error" and bad["fault"]["code"] == "IMAGE_ERROR"
    assert "checksum" in bad["fault"]["message"]
    good_sum = "sha256:" + hashlib.sha256(image_file.read_bytes()).hexdigest()
    good = agent.call("instance.spawn", {**spawn_args(image_file, wait=True),
                                         "image": {"url": image_file.as_uri(), "checksum": good_sum}})
    assert good["vm_state"] == "active" and good["fault"] is None
    assert agent.call("host.info")["usage"]["VCPU"] == 1


def test_image_error_without_wait_shows_up_in_get(agent: AgentProcess, image_file: Path) -> None:
    rec = agent.call("instance.spawn", {**spawn_args(image_file),
                                        "image": {"url": (image_file.parent / "missing.qcow2").as_uri()}})
    assert rec["vm_state"] in ("building", "error")
    err = wait_for_state(agent, rec["uuid"], "error")
    assert err["fault"]["code"] == "IMAGE_ERROR"


def _burst(agent: AgentProcess, image_file: Path, n: int) -> tuple[zmq.Socket[Any], dict[str, Any], dict[str, Any]]:
    """Send ``n`` spawns (with wait) at once on one DEALER; return the socket, requests and replies."""
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(agent.control)
    msgs = {f"busy-{i}": {"v": 1, "id": f"busy-{i}", "op": "instance.spawn",
                          "args": spawn_args(image_file, name=f"b{i}", wait=True)} for i in range(n)}
    for m in msgs.values():
        s.send(msgpack.packb(m))
    replies = {}
    for _ in msgs:
        assert s.poll(60_000), "no reply"
        r = msgpack.unpackb(s.recv())
        replies[r["id"]] = r
    assert set(replies) == set(msgs)
    return s, msgs, replies


def test_busy_when_too_many_requests_in_flight(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config="[agent]\nmax_inflight_requests = 2\nmax_concurrent_builds = 1\n")
    s, msgs, replies = _burst(agent, image_file, 40)
    try:
        busy = [rid for rid, r in replies.items() if not r["ok"]]
        done = [rid for rid, r in replies.items() if r["ok"]]
        assert busy
        assert {replies[rid]["error"]["code"] for rid in busy} == {"BUSY"}
        assert "retry" in replies[busy[0]]["error"]["message"]
        assert len(agent.call("instance.list")) == len(done)
        # BUSY is not remembered: the same id retried when the agent is idle is executed.
        s.send(msgpack.packb(msgs[busy[0]]))
        assert s.poll(60_000)
        retry = msgpack.unpackb(s.recv())
        assert retry["id"] == busy[0]
        assert retry["ok"] is True and retry["result"]["vm_state"] == "active"
    finally:
        s.close()
    assert len(agent.call("instance.list")) == len(done) + 1


def test_busy_burst_still_admits_up_to_the_bound(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config="[agent]\nmax_inflight_requests = 2\nmax_concurrent_builds = 1\n")
    s, _msgs, replies = _burst(agent, image_file, 40)
    s.close()
    assert sum(1 for r in replies.values() if r["ok"]) >= 2
