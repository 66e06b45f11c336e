"""Rebuild, rescue/unrescue, soft delete/restore/reclaim/force delete and crash dump through a
real agent on the test hypervisor: what each op does, what it refuses, and what a restart after
a kill -9 at each of its steps leaves (the op completed or rolled back, no made disk left over,
the claim held once).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, call_error, spawn_in_state, wait_for_state

from fastcompute.compute.tasks import CRASH_AT_ENV


@pytest.fixture(scope="module")
def other_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second small raw image, other bytes than ``image_file``'s."""
    path = tmp_path_factory.mktemp("images") / "other.raw"
    path.write_bytes(os.urandom(1 << 20))
    return path


def users(agent: AgentProcess, image: Path) -> list[str]:
    """The instances whose disks the cached base of ``image`` backs."""
    for base in agent.call("images.list"):
        if base["source"] == image.as_uri():
            return list(base["users"])
    return []


def instance_files(agent: AgentProcess, uuid: str) -> set[str]:
    return {p.name for p in (agent.state_dir / "instances" / uuid).iterdir()}


def leftovers(agent: AgentProcess, uuid: str) -> set[str]:
    """Files of an op's making that must not outlive it: made disks, their records, half copies."""
    return {n for n in instance_files(agent, uuid) if "rebuild" in n or "rescue" in n or n.endswith(".tmp")}


# -- rebuild -----------------------------------------------------------------------------------


def test_rebuild_makes_a_new_root_disk_from_the_new_image(agent: AgentProcess, image_file: Path,
                                                          other_image: Path) -> None:
    rec = spawn_in_state(agent, image_file, "active", metadata={"role": "web"})
    uuid = rec["uuid"]
    usage = agent.call("host.info")["usage"]
    assert users(agent, image_file) == [uuid]

    after = agent.call("instance.rebuild", {"uuid": uuid, "image": {"url": other_image.as_uri()}})

    assert (after["vm_state"], after["task_state"], after["power_state"]) == ("active", None, "running")
    assert after["image"]["url"] == other_image.as_uri()
    assert (after["uuid"], after["metadata"], after["created_at"]) == (uuid, {"role": "web"}, rec["created_at"])
    assert agent.call("host.info")["usage"] == usage  # the same claim, not a second one
    assert users(agent, other_image) == [uuid] and users(agent, image_file) == []
    assert leftovers(agent, uuid) == set()


def test_rebuild_of_a_stopped_instance_leaves_it_stopped(agent: AgentProcess, image_file: Path,
                                                         other_image: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "stopped")["uuid"]
    after = agent.call("instance.rebuild", {"uuid": uuid, "image": {"url": other_image.as_uri()}})
    assert (after["vm_state"], after["power_state"]) == ("stopped", "shutdown")
    assert users(agent, other_image) == [uuid]


def test_rebuild_refusals(agent: AgentProcess, image_file: Path, other_image: Path) -> None:
    new = {"url": other_image.as_uri()}
    for state in ("paused", "suspended"):
        uuid = spawn_in_state(agent, image_file, state)["uuid"]
        err = call_error(agent, "instance.rebuild", {"uuid": uuid, "image": new})
        assert err.code == "CONFLICT" and err.details["vm_state"] == state
    failed = spawn_in_state(agent, image_file, "error")["uuid"]
    err = call_error(agent, "instance.rebuild", {"uuid": failed, "image": new})
    assert err.code == "CONFLICT" and err.details["reason"] == "no claim"
    active = spawn_in_state(agent, image_file, "active")["uuid"]
    err = call_error(agent, "instance.rebuild", {"uuid": active, "image": {}})
    assert err.code == "BAD_REQUEST" and err.details["field"] == "args.image"
    err = call_error(agent, "instance.rebuild", {"uuid": active, "image": {"url": "ftp://x/y"}})
    assert err.code == "BAD_REQUEST" and err.details["field"] == "args.image.url"


def test_failed_rebuild_leaves_the_instance_as_it_was(agent: AgentProcess, image_file: Path) -> None:
    rec = spawn_in_state(agent, image_file, "active")
    uuid = rec["uuid"]
    missing = (image_file.parent / "no-such-image.raw").as_uri()
    err = call_error(agent, "instance.rebuild", {"uuid": uuid, "image": {"url": missing}})
    assert err.code in ("IMAGE_ERROR", "NOT_FOUND", "BAD_REQUEST"), err
    now = agent.call("instance.get", {"uuid": uuid})
    assert (now["vm_state"], now["task_state"], now["power_state"]) == ("active", None, "running")
    assert now["image"] == rec["image"] and now["fault"] is None
    assert leftovers(agent, uuid) == set() and users(agent, image_file) == [uuid]


# -- rescue ------------------------------------------------------------------------------------


def test_rescue_and_unrescue(agent: AgentProcess, image_file: Path, other_image: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    usage = agent.call("host.info")["usage"]

    rescued = agent.call("instance.rescue", {"uuid": uuid, "image": {"url": other_image.as_uri()}})
    assert (rescued["vm_state"], rescued["task_state"], rescued["power_state"]) == ("rescued", None, "running")
    assert rescued["image"]["url"] == image_file.as_uri()  # the instance's image is its own still
    assert {"disk", "disk.rescue"} <= instance_files(agent, uuid)
    assert users(agent, other_image) == [uuid] and users(agent, image_file) == [uuid]
    assert agent.call("host.info")["usage"] == usage

    # Nova's rules: a rescued instance is unrescued (or deleted) first; a crash dump is allowed.
    for op in ("instance.stop", "instance.reboot", "instance.rescue", "instance.restore", "instance.pause"):
        err = call_error(agent, op, {"uuid": uuid})
        assert err.code == "CONFLICT" and err.details["vm_state"] == "rescued", op
    err = call_error(agent, "instance.rebuild", {"uuid": uuid, "image": {"url": other_image.as_uri()}})
    assert err.code == "CONFLICT" and err.details["vm_state"] == "rescued"
    assert agent.call("instance.crash_dump", {"uuid": uuid})["vm_state"] == "rescued"

    back = agent.call("instance.unrescue", {"uuid": uuid})
    assert (back["vm_state"], back["task_state"], back["power_state"]) == ("active", None, "running")
    assert leftovers(agent, uuid) == set() and users(agent, other_image) == []
    assert agent.call("host.info")["usage"] == usage


def test_rescue_defaults_to_the_instances_own_image_and_survives_restarts(agent: AgentProcess,
                                                                          image_file: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "stopped")["uuid"]
    assert agent.call("instance.rescue", {"uuid": uuid})["vm_state"] == "rescued"
    assert "disk.rescue" in instance_files(agent, uuid)
    # The test hypervisor loses its domains with the agent: the rescue domain is made again.
    agent.restart()
    rec = agent.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("rescued", None, "running")
    assert agent.call("instance.unrescue", {"uuid": uuid})["vm_state"] == "active"


def test_rescue_refusals(agent: AgentProcess, image_file: Path) -> None:
    for state in ("paused", "suspended"):
        uuid = spawn_in_state(agent, image_file, state)["uuid"]
        err = call_error(agent, "instance.rescue", {"uuid": uuid})
        assert err.code == "CONFLICT" and err.details["vm_state"] == state
    active = spawn_in_state(agent, image_file, "active")["uuid"]
    err = call_error(agent, "instance.unrescue", {"uuid": active})
    assert err.code == "CONFLICT" and err.details["allowed"] == ["rescued"]
    err = call_error(agent, "instance.rescue", {"uuid": active, "image": {"url": "relative/path"}})
    assert err.code == "BAD_REQUEST" and err.details["field"] == "args.image.url"


# -- soft delete -------------------------------------------------------------------------------

SOFT = "[compute]\nreclaim_instance_interval_s = 3600\n"


def test_soft_delete_keeps_the_instance_until_restored(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(SOFT)
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    usage = agent.call("host.info")["usage"]

    kept = agent.call("instance.delete", {"uuid": uuid})
    assert (kept["vm_state"], kept["task_state"], kept["power_state"]) == ("soft_deleted", None, "shutdown")
    assert agent.call("host.info")["usage"] == usage  # resources still held
    assert "disk" in instance_files(agent, uuid)
    agent.restart()
    assert agent.call("instance.get", {"uuid": uuid})["vm_state"] == "soft_deleted"

    for op in ("instance.start", "instance.reboot", "instance.rescue", "instance.crash_dump", "instance.unrescue"):
        err = call_error(agent, op, {"uuid": uuid})
        assert err.code == "CONFLICT" and err.details["vm_state"] == "soft_deleted", op
    err = call_error(agent, "instance.rebuild", {"uuid": uuid, "image": {"url": image_file.as_uri()}})
    assert err.code == "CONFLICT" and err.details["vm_state"] == "soft_deleted"
    back = agent.call("instance.restore", {"uuid": uuid})
    assert (back["vm_state"], back["task_state"], back["power_state"]) == ("active", None, "running")
    assert call_error(agent, "instance.restore", {"uuid": uuid}).code == "CONFLICT"


def test_force_delete_and_delete_of_a_soft_deleted_instance_delete_at_once(make_agent: Any,
                                                                           image_file: Path) -> None:
    agent = make_agent(SOFT)
    a = spawn_in_state(agent, image_file, "active")["uuid"]
    b = spawn_in_state(agent, image_file, "stopped")["uuid"]
    assert agent.call("instance.force_delete", {"uuid": a}) == {"uuid": a, "deleted": True}
    assert agent.call("instance.delete", {"uuid": b})["vm_state"] == "soft_deleted"
    assert agent.call("instance.delete", {"uuid": b}) == {"uuid": b, "deleted": True}
    assert agent.call("instance.list") == []
    assert agent.call("host.info")["usage"]["MEMORY_MB"] == 0
    # A failed build holds nothing to keep: its delete is at once too.
    failed = spawn_in_state(agent, image_file, "error")["uuid"]
    assert agent.call("instance.delete", {"uuid": failed}) == {"uuid": failed, "deleted": True}


def test_soft_deleted_instances_are_reclaimed_after_the_interval(make_agent: Any, image_file: Path) -> None:
    agent = make_agent("[compute]\nreclaim_instance_interval_s = 1\n")
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    assert agent.call("instance.delete", {"uuid": uuid})["vm_state"] == "soft_deleted"
    deadline = time.monotonic() + 30
    while agent.call("instance.list"):
        assert time.monotonic() < deadline, "not reclaimed"
        time.sleep(0.2)
    assert agent.call("host.info")["usage"]["MEMORY_MB"] == 0
    assert not (agent.state_dir / "instances" / uuid).exists()


def test_a_restored_instance_is_not_reclaimed(make_agent: Any, image_file: Path) -> None:
    agent = make_agent("[compute]\nreclaim_instance_interval_s = 1\n")
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    assert agent.call("instance.delete", {"uuid": uuid})["vm_state"] == "soft_deleted"
    assert agent.call("instance.restore", {"uuid": uuid})["vm_state"] == "active"
    time.sleep(3)  # several reclaim periods (half a second each) over an interval's end
    assert agent.call("instance.get", {"uuid": uuid})["vm_state"] == "active"


def test_delete_without_an_interval_is_at_once(agent: AgentProcess, image_file: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    assert agent.call("instance.delete", {"uuid": uuid}) == {"uuid": uuid, "deleted": True}
    assert call_error(agent, "instance.restore", {"uuid": uuid}).code == "NOT_FOUND"


# -- crash dump --------------------------------------------------------------------------------


def test_crash_dump_runs_in_novas_states_only(agent: AgentProcess, image_file: Path) -> None:
    active = spawn_in_state(agent, image_file, "active")
    rec = agent.call("instance.crash_dump", {"uuid": active["uuid"]})
    assert (rec["vm_state"], rec["task_state"]) == ("active", None)
    for state in ("stopped", "suspended"):
        uuid = spawn_in_state(agent, image_file, state)["uuid"]
        err = call_error(agent, "instance.crash_dump", {"uuid": uuid})
        assert err.code == "CONFLICT" and err.details["vm_state"] == state
    # Allowed in error (Nova's rule), but a failed build has no guest to interrupt.
    failed = spawn_in_state(agent, image_file, "error")["uuid"]
    assert call_error(agent, "instance.crash_dump", {"uuid": failed}).code == "CONFLICT"


# -- kill -9 at each step ----------------------------------------------------------------------


def crash_during(agent: AgentProcess, step: str, op: str, args: dict[str, Any]) -> None:
    """Restart ``agent`` so that it kills itself at ``step``, send ``op``, and see it die there."""
    agent.terminate()
    agent.env[CRASH_AT_ENV] = step
    agent.start()

    def send() -> None:
        try:
            with agent.client(timeout_s=2) as c:
                c.call(op, args)
        except Exception:
            pass  # the agent dies under the request: no reply is the point

    threading.Thread(target=send, daemon=True).start()
    assert agent.proc is not None
    assert agent.proc.wait(30) == -9, f"the agent did not die at {step}:\n{agent.log()}"
    del agent.env[CRASH_AT_ENV]
    agent.start()


REBUILD_STEPS = {"rebuild:recorded": "rolled back", "rebuild:disk-made": "rolled back",
                 "rebuild:destroyed": "rolled back", "rebuild:spawning": "done", "rebuild:promoted": "done",
                 "rebuild:launched": "done"}


@pytest.mark.parametrize("step", REBUILD_STEPS)
def test_kill_9_during_rebuild(agent: AgentProcess, image_file: Path, other_image: Path, step: str) -> None:
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    usage = agent.call("host.info")["usage"]
    crash_during(agent, step, "instance.rebuild", {"uuid": uuid, "image": {"url": other_image.as_uri()}})
    rec = wait_for_state(agent, uuid, "active")
    assert rec["power_state"] == "running"
    image = other_image if REBUILD_STEPS[step] == "done" else image_file
    assert rec["image"]["url"] == image.as_uri()
    assert users(agent, image) == [uuid]
    assert agent.call("host.info")["usage"] == usage
    assert leftovers(agent, uuid) == set()


RESCUE_STEPS = ("rescue:recorded", "rescue:disk-made", "rescue:destroyed", "rescue:launched")
UNRESCUE_STEPS = ("unrescue:recorded", "unrescue:destroyed", "unrescue:disk-removed", "unrescue:launched")


@pytest.mark.parametrize("step", RESCUE_STEPS + UNRESCUE_STEPS)
def test_kill_9_during_rescue_or_unrescue(agent: AgentProcess, image_file: Path, other_image: Path,
                                          step: str) -> None:
    """A rescue interrupted is rolled back (active, no rescue disk); an unrescue is finished."""
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    usage = agent.call("host.info")["usage"]
    if step.startswith("unrescue"):
        agent.call("instance.rescue", {"uuid": uuid, "image": {"url": other_image.as_uri()}})
        crash_during(agent, step, "instance.unrescue", {"uuid": uuid})
    else:
        crash_during(agent, step, "instance.rescue", {"uuid": uuid, "image": {"url": other_image.as_uri()}})
    rec = wait_for_state(agent, uuid, "active")
    assert rec["power_state"] == "running" and rec["fault"] is None
    assert agent.call("host.info")["usage"] == usage
    assert leftovers(agent, uuid) == set() and users(agent, other_image) == []
    # Rescuable again: nothing of the interrupted op is in the way.
    assert agent.call("instance.rescue", {"uuid": uuid})["vm_state"] == "rescued"


@pytest.mark.parametrize("step", ["soft-delete:recorded", "soft-delete:stopped", "restore:recorded",
                                  "restore:started"])
def test_kill_9_during_soft_delete_or_restore(make_agent: Any, image_file: Path, step: str) -> None:
    agent = make_agent(SOFT)
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    usage = agent.call("host.info")["usage"]
    if step.startswith("restore"):
        agent.call("instance.delete", {"uuid": uuid})
        crash_during(agent, step, "instance.restore", {"uuid": uuid})
        rec = wait_for_state(agent, uuid, "active")
        assert rec["power_state"] == "running"
    else:
        crash_during(agent, step, "instance.delete", {"uuid": uuid})
        rec = wait_for_state(agent, uuid, "soft_deleted")
        assert rec["power_state"] == "shutdown"
        assert agent.call("instance.restore", {"uuid": uuid})["vm_state"] == "active"
    assert agent.call("host.info")["usage"] == usage


def test_kill_9_during_rebuild_of_a_stopped_instance_keeps_it_stopped(agent: AgentProcess, image_file: Path,
                                                                      other_image: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "stopped")["uuid"]
    crash_during(agent, "rebuild:promoted", "instance.rebuild", {"uuid": uuid, "image": {"url": other_image.as_uri()}})
    rec = wait_for_state(agent, uuid, "stopped")
    assert rec["image"]["url"] == other_image.as_uri() and rec["power_state"] == "shutdown"
    assert leftovers(agent, uuid) == set()
