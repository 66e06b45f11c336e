"""Live moves between two real agents on the embedded test driver: what can be checked without
a hypervisor that migrates (tests/test_guest_live_migration_agents.py has the real guests).

The test driver cannot migrate: a destination whose [migration] libvirt_uri says where its
libvirtd would be prepares everything (claim, root overlay from the same base, config drive,
console log; for a volume-backed instance no root overlay and no DISK_GB), then the source's
hypervisor fails the migration: the guest must go on at the source untouched, its volumes
attached, and nothing may be left at the destination. (The test driver has no libvirt secrets:
that the destination's go with an aborted migration is checked on real hosts.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import call_error, disk_dirs
from test_agent_migration import gone, pair, spawn, usage
from test_agent_volume_workflows import _bfv
from test_agent_volumes import ISCSI, NBD, local, volume

from fastcompute.rpc.client import ClientTimeout

URI = 'libvirt_uri = "qemu+tcp://127.0.0.1/system"\n'  # where B's libvirtd would be: B prepares


def test_destination_without_a_migration_uri_refuses(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    uuid = spawn(a, image_file)
    err = call_error(a, "instance.live_migrate", {"uuid": uuid, "destination": "host-b"})
    assert err.code == "CONFLICT" and "libvirt_uri" in err.message
    rec = a.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("active", None, "running")
    assert (usage(a), usage(b), disk_dirs(b)) == (64, 0, set())


def test_failed_migration_leaves_the_guest_at_the_source_and_nothing_at_the_destination(
        make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, b_migration=URI)
    uuid = spawn(a, image_file, config_drive=True)
    (a.state_dir / "instances" / uuid / "console.log").write_bytes(b"login: earlier line\n")
    err = call_error(a, "instance.live_migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert err.code == "HYPERVISOR_ERROR" and "migrate guests live" in err.message, err  # B was ready
    rec = a.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"], rec["host"]) == (
        "active", None, "running", "host-a")
    gone(b, uuid)
    assert (usage(a), usage(b), disk_dirs(b)) == (64, 0, set())
    assert disk_dirs(a) == {uuid}
    # The move is over: the instance can be asked to move again, and to abort nothing.
    assert call_error(a, "instance.live_migrate_abort", {"uuid": uuid}).code == "CONFLICT"


def test_live_migrate_refusals(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, b_migration=URI)
    uuid = spawn(a, image_file)
    err = call_error(a, "instance.live_migrate", {"uuid": uuid, "destination": "host-a"})
    assert (err.code, err.details.get("field")) == ("BAD_REQUEST", "args.destination")
    err = call_error(a, "instance.live_migrate", {"uuid": uuid, "destination": "host-b", "block_migration": "false"})
    assert (err.code, err.details.get("field")) == ("BAD_REQUEST", "args.block_migration")
    assert call_error(a, "instance.live_migrate", {"uuid": uuid, "destination": "host-z"}).code in (
        "BAD_REQUEST", "NOT_FOUND", "FORBIDDEN")
    a.call("instance.stop", {"uuid": uuid, "timeout_s": 0})
    assert call_error(a, "instance.live_migrate", {"uuid": uuid, "destination": "host-b"}).code == "CONFLICT"
    assert (usage(a), usage(b), disk_dirs(b)) == (64, 0, set())


@pytest.mark.parametrize(("step", "killed"), [("live_prep", "a"), ("live_migrating", "a"), ("live_migrating", "b")])
def test_kill_9_before_the_switch_over_leaves_the_guest_at_the_source_alone(
        make_agent: Any, image_file: Path, step: str, killed: str) -> None:
    # B killed: A goes on after a short hold, whether B is back by then or not.
    hold = f'test_hold_step = "{step}"\ntest_hold_s = {60 if killed == "a" else 3}\n'
    a, b = pair(make_agent, a_migration=hold, b_migration=URI)
    uuid = spawn(a, image_file, config_drive=True)
    if step == "live_prep":
        with pytest.raises(ClientTimeout), a.client(timeout_s=2) as c:  # the reply waits for B's answer
            c.call("instance.live_migrate", {"uuid": uuid, "destination": "host-b"})
    else:
        assert a.call("instance.live_migrate", {"uuid": uuid, "destination": "host-b"})["task_state"] == "migrating"
        assert usage(b) == 64 and disk_dirs(b) == {uuid}  # B made its side
    victim = a if killed == "a" else b
    victim.kill()
    if killed == "a":
        a.config_path.write_text(a.config_path.read_text().replace(hold, ""))
    victim.start()
    deadline = time.monotonic() + 60
    while a.call("instance.get", {"uuid": uuid})["task_state"] is not None or usage(b) or disk_dirs(b):
        assert time.monotonic() < deadline, (a.log()[-2000:], b.log()[-2000:])
        time.sleep(0.2)
    rec = a.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["power_state"], rec["host"]) == ("active", "running", "host-a")
    gone(b, uuid)
    assert (usage(a), disk_dirs(a)) == (64, {uuid})


def _disk_gb(agent: Any) -> int:
    return int(agent.call("host.info")["usage"]["DISK_GB"])


def _volumes(rec: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(v["volume_id"], v["device_name"], v["status"]) for v in rec["volumes"]]


@pytest.mark.parametrize("backed", [False, True], ids=["attached", "volume-backed"])
def test_volumes_go_with_the_live_migration_and_stay_when_it_fails(
        make_agent: Any, image_file: Path, backed: bool) -> None:
    # Held before the hypervisor is asked: B's side can be looked at, then the test driver
    # fails the migration.
    hold = 'test_hold_step = "live_migrating"\ntest_hold_s = 3\n'
    a, b = pair(make_agent, a_migration=hold, b_migration=URI)
    if backed:
        uuid = a.call("instance.spawn", _bfv(config_drive=True))["uuid"]
    else:
        uuid = spawn(a, image_file, config_drive=True)
        a.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v1", ISCSI)})
        a.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v2", NBD)})
    before = _volumes(a.call("instance.get", {"uuid": uuid}))
    disk_a = _disk_gb(a)
    assert a.call("instance.live_migrate", {"uuid": uuid, "destination": "host-b"})["task_state"] == "migrating"
    # B prepared: a claim (no DISK_GB for a volume-backed instance), no root overlay for one.
    assert usage(b) == 64 and disk_dirs(b) == {uuid}
    assert _disk_gb(b) == (0 if backed else disk_a)
    made = {p.name for p in (b.state_dir / "instances" / uuid).iterdir()}
    assert ("disk" in made) is not backed and "disk.config" in made, made
    rec = wait_for_task(a, uuid)
    assert (rec["vm_state"], rec["power_state"], rec["host"]) == ("active", "running", "host-a")
    assert _volumes(rec) == before and len(before) == 2
    gone(b, uuid)
    assert (usage(b), _disk_gb(b), disk_dirs(b)) == (0, 0, set())
    if not backed:  # A still holds the connections: it detaches as before
        assert _volumes(a.call("instance.detach_volume", {"uuid": uuid, "volume_id": "v2"})) == before[:1]


def test_volumes_on_host_paths_refuse_the_live_migration(make_agent: Any, image_file: Path, tmp_path: Path) -> None:
    lun = tmp_path / "lun.img"
    lun.write_bytes(b"\0" * (1 << 20))
    a, b = pair(make_agent, b_migration=URI)
    uuid = spawn(a, image_file)
    a.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v1", NBD)})
    a.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v2", local(lun, "file"))})
    err = call_error(a, "instance.live_migrate", {"uuid": uuid, "destination": "host-b"})
    assert err.code == "CONFLICT" and err.details["volumes"] == ["v2"], err
    rec = a.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["host"]) == ("active", None, "host-a")
    assert [v["volume_id"] for v in rec["volumes"]] == ["v1", "v2"]
    assert (usage(b), disk_dirs(b)) == (0, set())


def wait_for_task(agent: Any, uuid: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The instance once no task runs on it."""
    deadline = time.monotonic() + timeout_s
    while (rec := agent.call("instance.get", {"uuid": uuid}))["task_state"] is not None:
        assert time.monotonic() < deadline, (agent.log()[-2000:], rec)
        time.sleep(0.2)
    return dict(rec)
