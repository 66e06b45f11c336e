"""Evacuate between real agents on the embedded test driver: an instance of an agent killed
with kill -9 rebuilt on its peer with the same uuid, metadata and bootstrap data; the dead
agent's copy dropped when it comes back; refused while the source answers; kill -9 of the
destination in the middle of it.
"""

from __future__ import annotations

import base64
import json
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, call_error, disk_dirs, spawn_args
from network_fixtures import links, remove_owned
from test_agent_image_workflows import crash_during
from test_agent_migration import gone, pair, usage

USER_DATA = b"#!/bin/sh\necho evacuated-user-data\n"
FAST = "evacuate_probe_s = 1\n"


def spawned(agent: AgentProcess, image: Path, **over: Any) -> str:
    rec = agent.call("instance.spawn", spawn_args(
        image, wait=True, metadata={"role": "web"}, user_data=base64.b64encode(USER_DATA).decode(),
        config_drive=True, **over))
    assert rec["vm_state"] == "active", rec
    return str(rec["uuid"])


def nothing_at(agent: AgentProcess, uuid: str, timeout_s: float = 30.0) -> None:
    """No record, claim or files of ``uuid`` left at ``agent``."""
    gone(agent, uuid)
    deadline = time.monotonic() + timeout_s
    while usage(agent) or disk_dirs(agent):
        assert time.monotonic() < deadline, (usage(agent), disk_dirs(agent))
        time.sleep(0.1)


def evacuated(agent: AgentProcess, uuid: str, host: str = "host-b") -> dict[str, Any]:
    """The instance runs at ``agent`` (``host``) with what it had: metadata, bootstrap data, claim."""
    rec = agent.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"], rec["host"]) == ("active", None, "running", host)
    assert rec["metadata"] == {"role": "web"}
    assert USER_DATA in (agent.state_dir / "instances" / uuid / "disk.config").read_bytes()
    assert usage(agent) == 64 and disk_dirs(agent) == {uuid}
    return dict(rec)


def test_evacuate_from_a_dead_host_and_its_return_drops_its_copy(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, a_migration=FAST, b_migration=FAST)
    uuid = spawned(a, image_file)
    copy = a.call("instance.export", {"uuid": uuid})
    assert copy["bootstrap"]["user_data"] == USER_DATA and copy["bootstrap"].get("admin_pass") is None
    a.kill()

    rec = b.call("instance.evacuate", {"uuid": uuid, "instance": copy})
    assert rec["uuid"] == uuid and rec["name"] == "vm"
    evacuated(b, uuid)

    a.start()  # its start-up learns the instance lives at host-b and drops its copy
    nothing_at(a, uuid)
    evacuated(b, uuid)
    # Its copy stays dropped across another restart (and host-b's mark is settled).
    a.kill()
    a.start()
    nothing_at(a, uuid)
    evacuated(b, uuid)
    b.call("instance.delete", {"uuid": uuid})
    nothing_at(b, uuid)


def test_a_source_back_while_the_destination_is_down_drops_its_copy_once_it_is_up(make_agent: Any,
                                                                                  image_file: Path) -> None:
    a, b = pair(make_agent, a_migration=FAST, b_migration=FAST)
    uuid = spawned(a, image_file)
    copy = a.call("instance.export", {"uuid": uuid})
    a.kill()
    b.call("instance.evacuate", {"uuid": uuid, "instance": copy})
    b.kill()
    a.start()  # nobody tells it: it runs its copy again, the only one running
    assert a.call("instance.get", {"uuid": uuid})["power_state"] == "running"
    b.start()  # asked again by host-a, and telling host-a: the copy there goes
    deadline = time.monotonic() + 30
    while a.call("instance.list"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    nothing_at(a, uuid)
    evacuated(b, uuid)


def test_an_agent_asks_its_peers_at_start_only_when_it_has_instances_they_could_have_taken(
        make_agent: Any, image_file: Path) -> None:
    asked = "could not ask host-b which instances it evacuated from here"
    a, b = pair(make_agent, a_migration=FAST, b_migration=FAST)  # host-a starts before host-b is up
    assert asked not in a.log()
    spawned(a, image_file)
    b.kill()
    a.kill()
    a.start()
    assert asked in a.log()


@pytest.fixture
def net_pair(make_agent: Any) -> Any:
    """host-a and host-b, peers, each with its own network names (taps on this machine)."""
    tags = [uuid_mod.uuid4().hex[:6] for _ in range(2)]
    nets = [f'[network]\nowner = "fct{t}"\nbridge_prefix = "b{t}"\ntap_prefix = "t{t[:3]}"\n' for t in tags]
    a, b = pair(make_agent, a_extra=nets[0], b_extra=nets[1], a_migration=FAST, b_migration=FAST)
    yield (a, f"t{tags[0][:3]}"), (b, f"t{tags[1][:3]}")
    for agent in (a, b):
        if agent.proc is not None and agent.proc.poll() is None:
            agent.terminate()
    for t in tags:
        remove_owned(f"fct{t}")


def test_the_evacuated_instance_keeps_its_port_and_the_returning_source_unplugs_only_its_own(
        net_pair: Any, image_file: Path) -> None:
    (a, tap_a), (b, tap_b) = net_pair
    port = {"id": "evacport1", "mac": "52:54:00:79:00:01", "network": {"id": "ev", "mtu": 1400},
            "fixed_ips": [{"ip": "10.79.0.11", "prefix": 24}]}
    uuid = spawned(a, image_file, networks=[port])
    copy = a.call("instance.export", {"uuid": uuid})
    assert [p["id"] for p in copy["ports"]] == ["evacport1"]
    a.kill()  # its tap stays, as on a host whose agent died
    assert f"{tap_a}evacport1"[:15] in links()

    b.call("instance.evacuate", {"uuid": uuid, "instance": copy})
    evacuated(b, uuid)
    assert f"{tap_b}evacport1"[:15] in links()
    a.start()
    nothing_at(a, uuid)
    assert f"{tap_a}evacport1"[:15] not in links()
    assert f"{tap_b}evacport1"[:15] in links()
    assert b.call("instance.get", {"uuid": uuid})["power_state"] == "running"


def test_evacuate_is_refused_while_the_source_answers(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, a_migration=FAST, b_migration=FAST)
    uuid = spawned(a, image_file)
    copy = a.call("instance.export", {"uuid": uuid})
    e = call_error(b, "instance.evacuate", {"uuid": uuid, "instance": copy})
    assert (e.code, e.details["source"]) == ("CONFLICT", "host-a")
    nothing_at(b, uuid)
    assert a.call("instance.get", {"uuid": uuid})["power_state"] == "running" and usage(a) == 64


def test_evacuate_refusals(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, a_migration=FAST, b_migration=FAST)
    uuid = spawned(a, image_file)
    copy = a.call("instance.export", {"uuid": uuid})
    other = "00000000-0000-4000-8000-000000000001"
    e = call_error(b, "instance.evacuate", {"uuid": other, "instance": copy})
    assert (e.code, e.details["field"]) == ("BAD_REQUEST", "args.instance.record.uuid")
    e = call_error(b, "instance.evacuate", {"uuid": uuid, "instance": copy, "source": "host-z"})
    assert e.code == "FORBIDDEN"
    e = call_error(a, "instance.evacuate", {"uuid": uuid, "instance": copy})
    assert (e.code, e.details["field"]) == ("BAD_REQUEST", "args.source")
    nothing_at(b, uuid)


@pytest.mark.parametrize("step", ["evacuate:recorded", "evacuate:fetched", "evacuate:launched"])
def test_kill_9_of_the_destination_mid_evacuate_rolls_it_back(make_agent: Any, image_file: Path,
                                                               step: str) -> None:
    a, b = pair(make_agent, a_migration=FAST, b_migration=FAST)
    uuid = spawned(a, image_file)
    copy = a.call("instance.export", {"uuid": uuid})
    a.kill()
    args = {"uuid": uuid, "instance": copy}
    crash_during(b, step, "instance.evacuate", args)
    nothing_at(b, uuid)  # rolled back: nothing held, so the evacuate can be asked again
    b.call("instance.evacuate", args)
    evacuated(b, uuid)
    a.start()
    nothing_at(a, uuid)


def test_cli_export_and_evacuate(make_agent: Any, image_file: Path, tmp_path: Path) -> None:
    from test_cli import fc, fc_json

    a, b = pair(make_agent, a_migration=FAST, b_migration=FAST)
    uuid = spawned(a, image_file, name="web")
    saved = tmp_path / "web.fcx"
    fc("export", "web", "--output", str(saved), "--endpoint", a.control)
    assert saved.stat().st_mode & 0o077 == 0
    a.kill()
    rec = fc_json("evacuate", str(saved), "--endpoint", b.control)
    assert (rec["uuid"], rec["host"]) == (uuid, "host-b")
    evacuated(b, uuid)


# -- the scheduler picks the destination ---------------------------------------------------------

FULL = "[resources]\nreserved_host_memory_mb = 6000\n"
# Room for a 256 MiB guest, but less free memory than host-a: spreading alone would pick host-a.
TIGHT = "[resources]\nreserved_host_memory_mb = 2500\n"
BIG = {"vcpus": 1, "memory_mb": 256, "disk_gb": 1}


def trio(make_agent: Any) -> tuple[AgentProcess, AgentProcess, AgentProcess]:
    """Agents host-a, host-b (too full for a 256 MiB guest) and host-c (less room than host-a),
    each the others' peer."""
    agents = [make_agent(start=False) for _ in range(3)]
    names = ["host-a", "host-b", "host-c"]
    for i, agent in enumerate(agents):
        peers = "".join(f'[[migration.peers]]\nhost = "{names[j]}"\ncontrol = "{agents[j].control}"\n'
                        for j in range(3) if j != i)
        agent.config_path.write_text(f'[agent]\nhost = "{names[i]}"\n{["", FULL, TIGHT][i]}\n'
                                     f"[migration]\nretry_interval_s = 0.3\ncall_timeout_s = 5\n{FAST}\n{peers}")
        agent.start()
    return agents[0], agents[1], agents[2]


def fleet(*agents: AgentProcess) -> list[str]:
    return [f"{x.control},{x.events}" for x in agents]


def test_the_scheduler_resizes_to_a_host_with_room_not_the_source(make_agent: Any, image_file: Path) -> None:
    import asyncio

    from fastcompute.scheduler import Endpoint, Scheduler
    from fastcompute.scheduler.moves import move

    a, b, c = trio(make_agent)
    uuid = spawned(a, image_file)

    async def run() -> Any:
        async with Scheduler([Endpoint.parse(e) for e in fleet(a, b, c)]) as sched:
            return await move(sched, "resize", uuid=uuid, flavor=BIG, wait=True)

    placed = asyncio.run(run())
    assert (placed.host, placed.record.host, placed.record.vm_state) == ("host-c", "host-c", "resized")
    assert usage(b) == 0 and disk_dirs(b) == set()
    c.call("instance.confirm_resize", {"uuid": uuid})
    nothing_at(a, uuid)
    assert usage(c) == 256


def test_the_scheduler_evacuates_to_a_host_with_room_and_says_when_none_has(make_agent: Any, image_file: Path,
                                                                            tmp_path: Path) -> None:
    from test_cli import fc

    a, b, c = trio(make_agent)
    uuid = spawned(a, image_file, flavor=BIG)
    saved = tmp_path / "vm.fcx"
    fc("export", uuid, "--output", str(saved), "--endpoint", a.control)
    c.kill()
    a.kill()
    # host-b has no room and host-c is down: no host but the source would do.
    agents = [x for e in fleet(a, b, c) for x in ("--agent", e)]
    failed = fc("move", "evacuate", str(saved), *agents, "--timeout", "3", check=False)
    assert failed.returncode == 1 and "NO_CAPACITY" in failed.stderr, failed.stderr
    nothing_at(b, uuid)
    c.start()
    done = fc("move", "evacuate", str(saved), *agents, "--timeout", "10", "--json")
    assert json.loads(done.stdout)["host"] == "host-c"
    rec = c.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["power_state"], rec["host"]) == ("active", "running", "host-c")
    a.start()
    nothing_at(a, uuid)
