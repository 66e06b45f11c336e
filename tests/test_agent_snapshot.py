"""instance.snapshot through a real agent (test hypervisor) to the real Glance of the tests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import recv_events, spawn_args, sub_socket, wait_for_state
from glance_fixtures import Glance, glance
from image_workflow_fixtures import (
    disk_of,
    download,
    glance_config,
    glance_held,
    glance_image,
    glance_images,
    read_guest,
    same_content,
    wait_task,
    write_marker,
)

from fastcompute.errors import BadRequest, Conflict, ImageError

__all__ = ["glance"]

MiB = 1 << 20


def test_snapshot_is_a_glance_image_a_new_instance_boots_from(make_agent: Any, glance: Glance,
                                                                image_file: Path, tmp_path: Path) -> None:
    agent = make_agent(config=glance_config(glance))
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, project_id="tenant-a"))
    uuid = rec["uuid"]
    marker = os.urandom(4096)
    write_marker(disk_of(agent, uuid), 700 * MiB, marker)
    events = sub_socket(agent.events, [f"instance.{uuid}", f"progress.{uuid}"])

    done = agent.call("instance.snapshot", {"uuid": uuid, "name": "snap-1", "properties": {"purpose": "test"}})

    assert agent.call("instance.get", {"uuid": uuid})["vm_state"] == "active"  # it kept running
    image = glance_image(glance, done["image_id"])
    assert image is not None and image["status"] == "active" and image["disk_format"] == "qcow2"
    assert image["image_type"] == "snapshot" and image["instance_uuid"] == uuid and image["owner"] == "tenant-a"
    assert image["base_image_ref"] == image_file.as_uri() and image["purpose"] == "test"
    assert image["min_disk"] == 1 and image["min_ram"] == 64
    # Only the clusters with data were sent: the image's base (1 MiB) and the marker's cluster.
    assert image["size"] == done["size"] < 2 * MiB
    got = download(glance, done["image_id"], tmp_path / "snap.qcow2")
    assert same_content(got, disk_of(agent, uuid))

    seen = recv_events(events, 5.0)
    tasks: list[str | None] = []
    for t, b in seen:
        if t == f"instance.{uuid}" and (not tasks or tasks[-1] != b["task_state"]):
            tasks.append(b["task_state"])
    assert tasks[:3] == ["image_snapshot", "image_pending_upload", "image_uploading"] and tasks[-1] is None
    ids = {b["snapshot_id"] for t, b in seen if t == f"instance.{uuid}"}
    assert done["image_id"] in ids
    assert any(t == f"progress.{uuid}" and b["stage"] == "upload" for t, b in seen)

    child = agent.call("instance.spawn", {**spawn_args(image_file, wait=True), "image": {"id": done["image_id"]}})
    assert child["vm_state"] == "active", child
    assert read_guest(disk_of(agent, child["uuid"]), 700 * MiB, len(marker)) == marker
    assert not list((agent.state_dir / "instances" / uuid).glob("*.snap*"))


def test_snapshot_refusals_leave_nothing(make_agent: Any, glance: Glance, image_file: Path) -> None:
    agent = make_agent(config=glance_config(glance))
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    uuid = rec["uuid"]
    with pytest.raises(BadRequest) as bad:
        agent.call("instance.snapshot", {"uuid": uuid, "name": ""})
    assert bad.value.details["field"] == "args.name"
    agent.call("instance.shelve", {"uuid": uuid})
    with pytest.raises(Conflict):
        agent.call("instance.snapshot", {"uuid": uuid, "name": "x"})
    assert [i["name"] for i in glance_images(glance, uuid)] == [f"{rec['name']}-shelved"]
    wait_for_state(agent, uuid, "shelved_offloaded")


def test_snapshot_without_glance_is_conflict(agent: Any, image_file: Path) -> None:
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    with pytest.raises(Conflict):
        agent.call("instance.snapshot", {"uuid": rec["uuid"], "name": "x"})
    assert agent.call("instance.get", {"uuid": rec["uuid"]})["task_state"] is None


def _snapshot_in_background(agent: Any, uuid: str, raising: bool = False) -> concurrent.futures.Future[Any]:
    def call(timeout_s: float = 30) -> Any:
        with agent.client(timeout_s=timeout_s) as c:
            return c.call("instance.snapshot", {"uuid": uuid, "name": "doomed"})

    def quietly() -> Any:
        # The agent is killed under it: no reply is coming, and the snapshot goes on in the
        # agent whether its client waits or not.
        with contextlib.suppress(Exception):
            return call(timeout_s=3)

    return concurrent.futures.ThreadPoolExecutor(1).submit(call if raising else quietly)


def _recorded_image(agent: Any, uuid: str) -> str:
    """The snapshot's image id, once recorded: the task is written a step before it."""
    deadline = time.monotonic() + 30
    while (image_id := agent.call("instance.get", {"uuid": uuid})["snapshot_id"]) is None:
        assert time.monotonic() < deadline, "the snapshot's image id was never recorded"
        time.sleep(0.01)
    return str(image_id)


@pytest.mark.parametrize("step", ["image_snapshot", "image_uploading"])
def test_kill_9_mid_snapshot_leaves_no_image_and_no_file(make_agent: Any, glance: Glance, image_file: Path,
                                                         step: str) -> None:
    agent = make_agent(config=glance_config(glance))
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    # Enough data that the upload is still going when the test looks.
    write_marker(disk_of(agent, uuid), 64 * MiB, os.urandom(48 * MiB))
    if step == "image_snapshot":
        with glance_held(glance):  # the agent waits for Glance to create the image
            pending = _snapshot_in_background(agent, uuid)
            wait_task(agent, uuid, step)
            image_id = _recorded_image(agent, uuid)
            agent.kill()
    else:
        pending = _snapshot_in_background(agent, uuid)
        wait_task(agent, uuid, step)
        with glance_held(glance):
            image_id = _recorded_image(agent, uuid)
            agent.kill()
    pending.result()
    assert image_id
    agent.start()
    rec = wait_for_state(agent, uuid, "active")
    assert rec["snapshot_id"] is None
    assert glance_image(glance, image_id) is None and glance_images(glance, uuid) == []
    # No overlay, no temporary file: only what the instance had.
    assert {p.name for p in (agent.state_dir / "instances" / uuid).iterdir()} == {"disk", "disk.info", "disk.config"}
    # And the next snapshot works.
    assert glance_image(glance, agent.call("instance.snapshot", {"uuid": uuid, "name": "again"})["image_id"])


def test_a_failed_upload_deletes_its_image(make_agent: Any, glance: Glance, image_file: Path) -> None:
    # Glance stops answering mid-upload for longer than the agent waits.
    agent = make_agent(config=glance_config(glance, "read_timeout_s = 3.0\n"))
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    write_marker(disk_of(agent, uuid), 64 * MiB, os.urandom(48 * MiB))
    pending = _snapshot_in_background(agent, uuid, raising=True)
    wait_task(agent, uuid, "image_uploading")
    with glance_held(glance):
        image_id = agent.call("instance.get", {"uuid": uuid})["snapshot_id"]
        time.sleep(4.0)  # the upload gives up; the agent's delete of the image then waits for Glance
    with pytest.raises(ImageError):
        pending.result()
    rec = agent.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["snapshot_id"]) == ("active", None, None)
    assert glance_image(glance, image_id) is None and glance_images(glance, uuid) == []
    assert {p.name for p in (agent.state_dir / "instances" / uuid).iterdir()} == {"disk", "disk.info", "disk.config"}
