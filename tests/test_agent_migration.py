"""Cold moves between two real agents on the embedded test driver: migrate, resize, confirm,
revert, auto-confirm, refusals, peers' authorization, and kill -9 of either agent at each step.

Both agents run on this machine, each with its own state dir, host name and hypervisor; the
destination pulls the disks from the source over the peer link. After every case the instance
is in exactly one place, claimed on exactly one host, and no directory is left over.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth
from agent_fixtures import AgentProcess, call_error, disk_dirs, free_port, spawn_args, wait_for_state
from test_agent_console import status_of
from test_agent_security import make_keys

from fastcompute.errors import AgentError, Conflict
from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.rpc.client import Client, ClientTimeout, Curve


def config(name: str, peer: str, peer_control: str, extra: str = "", migration: str = "",
           peer_key: str = "") -> str:
    return (f'[agent]\nhost = "{name}"\n{extra}\n'
            f"[migration]\nretry_interval_s = 0.3\ncall_timeout_s = 5\nfinish_timeout_s = 10\n{migration}\n"
            f'[[migration.peers]]\nhost = "{peer}"\ncontrol = "{peer_control}"\npublic_key = "{peer_key}"\n')


def pair(make_agent: Any, a_extra: str = "", b_extra: str = "", a_migration: str = "",
         b_migration: str = "", hypervisor: str = "test:///default") -> tuple[AgentProcess, AgentProcess]:
    """Agents host-a and host-b, each the other's peer (started)."""
    a, b = make_agent(start=False, hypervisor=hypervisor), make_agent(start=False, hypervisor=hypervisor)
    a.config_path.write_text(config("host-a", "host-b", b.control, a_extra, a_migration))
    b.config_path.write_text(config("host-b", "host-a", a.control, b_extra, b_migration))
    a.start()
    b.start()
    return a, b


def usage(agent: AgentProcess) -> int:
    return int(agent.call("host.info")["usage"]["MEMORY_MB"])


def spawn(agent: AgentProcess, image: Path, **over: Any) -> str:
    rec = agent.call("instance.spawn", spawn_args(image, wait=True, **over))
    assert rec["vm_state"] == "active", rec
    return str(rec["uuid"])


def mark_disk(agent: AgentProcess, uuid: str) -> bytes:
    """Data far into the root disk (past a hole) and a console line: what must arrive."""
    marker = os.urandom(4096)
    idir = agent.state_dir / "instances" / uuid
    with (idir / "disk").open("r+b") as f:
        f.seek(64 << 20)
        f.write(marker)
    (idir / "console.log").write_bytes(b"login: earlier line\n")
    return marker


def virtual_size(disk: Path) -> int:
    return int(struct.unpack(">Q", disk.read_bytes()[24:32])[0])


def backing(disk: Path) -> str:
    head = disk.read_bytes()[:65536]
    offset, size = struct.unpack(">QI", head[8:20])
    return head[offset:offset + size].decode()


def gone(agent: AgentProcess, uuid: str) -> None:
    assert call_error(agent, "instance.get", {"uuid": uuid}).code == "NOT_FOUND"


def settled_at(agent: AgentProcess, other: AgentProcess, uuid: str, memory_mb: int = 64,
               timeout_s: float = 60.0) -> dict[str, Any]:
    """The instance is active on ``agent`` alone, claimed there alone, nothing left at ``other``."""
    rec = wait_for_state(agent, uuid, "active", timeout_s)
    assert rec["power_state"] == "running"
    gone(other, uuid)
    deadline = time.monotonic() + timeout_s
    while usage(other) or disk_dirs(other) or usage(agent) != memory_mb:
        assert time.monotonic() < deadline, (usage(other), disk_dirs(other), usage(agent))
        time.sleep(0.1)
    assert disk_dirs(agent) == {uuid}
    return rec


def test_migrate_moves_disk_console_and_claim_then_confirm(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    uuid = spawn(a, image_file)
    marker = mark_disk(a, uuid)

    rec = a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert (rec["vm_state"], rec["task_state"], rec["host"]) == ("resized", None, "host-b")
    assert b.call("instance.get", {"uuid": uuid})["power_state"] == "running"
    gone(a, uuid)
    # Until confirmed, the source still holds the old claim (and the files for a revert).
    assert (usage(a), usage(b)) == (64, 64)
    assert disk_dirs(a) == {uuid + "_resize"}
    disk = b.state_dir / "instances" / uuid / "disk"
    with disk.open("rb") as f:
        f.seek(64 << 20)
        assert f.read(4096) == marker
    assert os.stat(disk).st_blocks * 512 < 16 << 20  # the hole stayed a hole
    assert backing(disk).startswith(str(b.state_dir / "_base"))
    assert b.call("instance.console", {"uuid": uuid})["data"].endswith(b"earlier line\n")
    assert (b.state_dir / "instances" / uuid / "disk.config").exists()

    rec = b.call("instance.confirm_resize", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"]) == ("active", None)
    settled_at(b, a, uuid)
    assert call_error(b, "instance.confirm_resize", {"uuid": uuid}).code == "CONFLICT"


def test_resize_up_then_revert_brings_back_flavor_disk_and_host(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    uuid = spawn(a, image_file)
    marker = mark_disk(a, uuid)
    big = {"vcpus": 2, "memory_mb": 128, "disk_gb": 2}
    rec = a.call("instance.resize", {"uuid": uuid, "flavor": big, "destination": "host-b", "wait": True})
    assert rec["flavor"]["memory_mb"] == 128 and rec["vm_state"] == "resized"
    assert (usage(a), usage(b)) == (64, 128)
    assert virtual_size(b.state_dir / "instances" / uuid / "disk") == 2 << 30

    rec = b.call("instance.revert_resize", {"uuid": uuid})
    assert (rec["host"], rec["flavor"]["memory_mb"], rec["vm_state"]) == ("host-a", 64, "active")
    settled_at(a, b, uuid)
    disk = a.state_dir / "instances" / uuid / "disk"
    assert virtual_size(disk) == 1 << 30
    with disk.open("rb") as f:
        f.seek(64 << 20)
        assert f.read(4096) == marker
    # Back where it was, it can move again.
    a.call("instance.resize", {"uuid": uuid, "flavor": big, "destination": "host-b", "wait": True})
    b.call("instance.confirm_resize", {"uuid": uuid})
    settled_at(b, a, uuid, memory_mb=128)


def test_stopped_instance_moves_stopped(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    uuid = spawn(a, image_file)
    a.call("instance.stop", {"uuid": uuid, "timeout_s": 0})
    rec = a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert (rec["vm_state"], rec["power_state"]) == ("resized", "shutdown")
    b.call("instance.revert_resize", {"uuid": uuid})
    rec = wait_for_state(a, uuid, "stopped")
    assert rec["power_state"] == "shutdown"
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert b.call("instance.confirm_resize", {"uuid": uuid})["vm_state"] == "stopped"
    assert (usage(a), usage(b), disk_dirs(a)) == (0, 64, set())


def test_pinned_guest_is_pinned_again_at_the_destination(make_agent: Any, image_file: Path, tmp_path: Path) -> None:
    uri = write_test_host(tmp_path / "host.xml", cells=1, sockets=1, cores=8, threads=1, memory_gib=16)
    a, b = pair(make_agent, a_extra='[resources]\ncpu_dedicated_set = "4-5"\n',
                b_extra='[resources]\ncpu_dedicated_set = "6-7"\n', hypervisor=uri)
    pinned = {"vcpus": 2, "memory_mb": 256, "disk_gb": 1, "extra_specs": {"hw:cpu_policy": "dedicated"}}
    uuid = spawn(a, image_file, flavor=pinned)

    def pcpus(agent: AgentProcess) -> set[int]:
        return set(agent.call("instance.get", {"uuid": uuid})["numa"][0]["pinning"].values())

    assert pcpus(a) == {4, 5}
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert pcpus(b) == {6, 7}
    pcpu = [int(x.call("host.info")["usage"]["PCPU"]) for x in (a, b)]
    assert pcpu == [2, 2]  # the source's pins are held until the move ends
    b.call("instance.revert_resize", {"uuid": uuid})
    wait_for_state(a, uuid, "active")
    assert pcpus(a) == {4, 5}
    assert [int(x.call("host.info")["usage"]["PCPU"]) for x in (a, b)] == [2, 0]


def test_deleting_a_resized_instance_drops_the_sources_hold(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    uuid = spawn(a, image_file)
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    b.call("instance.delete", {"uuid": uuid})
    deadline = time.monotonic() + 30
    while usage(a) or disk_dirs(a):
        assert time.monotonic() < deadline, (usage(a), disk_dirs(a))
        time.sleep(0.1)
    assert (usage(b), disk_dirs(b)) == (0, set())
    gone(a, uuid)
    gone(b, uuid)


def test_resize_refusals(make_agent: Any, image_file: Path) -> None:
    a, _b = pair(make_agent)
    uuid = spawn(a, image_file)
    smaller = {"vcpus": 1, "memory_mb": 64, "disk_gb": 0}
    err = call_error(a, "instance.resize", {"uuid": uuid, "flavor": smaller, "destination": "host-b"})
    assert (err.code, err.details["field"]) == ("BAD_REQUEST", "args.flavor.disk_gb")
    err = call_error(a, "instance.resize", {"uuid": uuid, "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 1}})
    assert (err.code, err.details["field"]) == ("BAD_REQUEST", "args.destination")  # same host is off
    err = call_error(a, "instance.migrate", {"uuid": uuid, "destination": "host-a"})
    assert (err.code, err.details["field"]) == ("BAD_REQUEST", "args.destination")
    assert call_error(a, "instance.migrate", {"uuid": uuid, "destination": "host-z"}).code == "FORBIDDEN"
    a.call("instance.pause", {"uuid": uuid})
    assert call_error(a, "instance.migrate", {"uuid": uuid, "destination": "host-b"}).code == "CONFLICT"
    assert a.call("instance.get", {"uuid": uuid})["vm_state"] == "paused"


def test_resize_on_the_same_host(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, a_extra="[compute]\nallow_resize_to_same_host = true\n")
    uuid = spawn(a, image_file)
    rec = a.call("instance.resize", {"uuid": uuid, "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 1},
                                     "wait": True})
    assert (rec["host"], rec["vm_state"], rec["flavor"]["memory_mb"]) == ("host-a", "resized", 128)
    assert usage(a) == 64 + 128
    assert disk_dirs(a) == {uuid, uuid + "_resize"}
    a.call("instance.revert_resize", {"uuid": uuid})
    settled_at(a, b, uuid)
    a.call("instance.resize", {"uuid": uuid, "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 1},
                               "wait": True})
    a.call("instance.confirm_resize", {"uuid": uuid})
    settled_at(a, b, uuid, memory_mb=128)


def test_auto_confirm_after_the_window(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, b_extra="[compute]\nresize_confirm_window_s = 1.0\n")
    uuid = spawn(a, image_file)
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    settled_at(b, a, uuid)


def test_no_capacity_at_the_destination_changes_nothing(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, b_extra="[resources]\nreserved_host_memory_mb = 6000\n")
    uuid = spawn(a, image_file)
    before = a.call("instance.get", {"uuid": uuid})
    err = call_error(a, "instance.resize", {"uuid": uuid, "destination": "host-b",
                                            "flavor": {"vcpus": 1, "memory_mb": 256, "disk_gb": 1}})
    assert err.code == "NO_CAPACITY"
    after = a.call("instance.get", {"uuid": uuid})
    assert {k: after[k] for k in ("vm_state", "task_state", "power_state", "flavor", "host")} == \
        {k: before[k] for k in ("vm_state", "task_state", "power_state", "flavor", "host")}
    assert (usage(a), usage(b), disk_dirs(b)) == (64, 0, set())


def test_peer_ops_check_who_calls(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    move = "0b5f5b8e-6a4c-4c3e-9d8e-3f1e2d4c5b6a"
    # Without CURVE the allow-list is by host name and endpoint: an unlisted host is refused.
    err = call_error(b, "migration.status", {"peer": "host-z", "id": move})
    assert err.code == "FORBIDDEN"
    assert b.call("migration.status", {"peer": "host-a", "id": move}) == {"status": "none"}
    err = call_error(a, "migration.read", {"peer": "host-b", "id": move, "name": "disk", "offset": 0, "length": 4096})
    assert err.code == "NOT_FOUND"
    uuid = spawn(a, image_file)
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    # Only an instance's own files can be named (the move's id aside).
    with pytest.raises(AgentError) as info:
        a.call("migration.read", {"peer": "host-b", "id": move, "name": "../fastcompute.sqlite",
                                  "offset": 0, "length": 16})
    assert info.value.code == "BAD_REQUEST"


def test_a_destination_that_does_not_list_the_source_refuses_it(make_agent: Any, image_file: Path) -> None:
    a, b = make_agent(start=False), make_agent(start=False)
    a.config_path.write_text(config("host-a", "host-b", b.control))
    b.config_path.write_text(config("host-b", "host-x", a.control))  # a's endpoint, another name
    a.start()
    b.start()
    uuid = spawn(a, image_file)
    err = call_error(a, "instance.migrate", {"uuid": uuid, "destination": "host-b"})
    assert (err.code, err.details["peer"]) == ("FORBIDDEN", "host-a")
    rec = a.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("active", None, "running")
    assert (usage(a), usage(b), disk_dirs(b)) == (64, 0, set())


def test_curve_peers_move_and_nobody_else_may_call_peer_ops(make_agent: Any, image_file: Path,
                                                            tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    pa, sa = make_keys(keys, "host-a")
    pb, sb = make_keys(keys, "host-b")
    _pc, admin_secret = make_keys(keys, "admin")
    admin_public = zmq.auth.load_certificate(admin_secret)[0].decode()
    z85 = {p: zmq.auth.load_certificate(p)[0].decode() for p in (pa, pb)}
    a, b = make_agent(start=False), make_agent(start=False)
    for me, name, sec, other, oname, opub in ((a, "host-a", sa, b, "host-b", pb), (b, "host-b", sb, a, "host-a", pa)):
        me.config_path.write_text(config(
            name, oname, other.control, peer_key=z85[opub],
            extra=f'[security]\nserver_secret_key_file = "{sec}"\nclient_public_keys = ["{admin_public}"]\n'))
        me.start(wait=False)
    admin = {a.control: Curve.from_files(pa, admin_secret), b.control: Curve.from_files(pb, admin_secret)}

    def call(agent: AgentProcess, op: str, args: dict[str, Any] | None = None, curve: Curve | None = None) -> Any:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(agent.control, timeout_s=30, curve=curve or admin[agent.control]) as c:
                    return c.call(op, args)
            except ClientTimeout:
                assert time.monotonic() < deadline, agent.log()

    call(a, "ping")
    call(b, "ping")
    rec = call(a, "instance.spawn", spawn_args(image_file, wait=True))
    moved = call(a, "instance.migrate", {"uuid": rec["uuid"], "destination": "host-b", "wait": True})
    assert (moved["host"], moved["vm_state"]) == ("host-b", "resized")
    call(b, "instance.confirm_resize", {"uuid": rec["uuid"]})
    assert call(a, "host.info")["usage"]["MEMORY_MB"] == 0

    move = {"peer": "host-a", "id": "0b5f5b8e-6a4c-4c3e-9d8e-3f1e2d4c5b6a"}
    with pytest.raises(AgentError) as info:
        call(b, "migration.status", move)  # an admin is no peer
    assert info.value.code == "FORBIDDEN"
    as_a = Curve.from_files(pb, sa)
    assert call(b, "migration.status", move, curve=as_a) == {"status": "none"}
    with pytest.raises(AgentError) as info:
        call(b, "migration.status", {**move, "peer": "host-c"}, curve=as_a)  # only in its own name
    assert info.value.code == "FORBIDDEN"
    with pytest.raises(AgentError) as info:
        call(b, "instance.list", curve=as_a)  # and a peer is nothing else
    assert info.value.code == "FORBIDDEN"


# -- kill -9 -------------------------------------------------------------------------------------

def send_and_forget(agent: AgentProcess, op: str, args: dict[str, Any]) -> zmq.Socket[Any]:
    """Send a request without waiting for its reply (the caller closes the socket)."""
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(agent.control)
    s.send(msgpack.packb({"v": 1, "id": "move-1", "op": op, "args": args}))
    return s


def wait_task(agent: AgentProcess, uuid: str, task: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (rec := agent.call("instance.get", {"uuid": uuid}))["task_state"] != task:
        assert time.monotonic() < deadline, rec
        time.sleep(0.05)


HOLD = 'test_hold_step = "{}"\ntest_hold_s = 30\n'


@pytest.mark.parametrize(("step", "task"), [("prep", "resize_prep"), ("migrating", "resize_migrating"),
                                            ("finishing", "resize_migrated")])
def test_kill_9_of_the_source_at_each_step_undoes_the_move(make_agent: Any, image_file: Path,
                                                          step: str, task: str) -> None:
    a, b = pair(make_agent, a_migration=HOLD.format(step))
    uuid = spawn(a, image_file)
    marker = mark_disk(a, uuid)
    s = send_and_forget(a, "instance.resize", {"uuid": uuid, "destination": "host-b",
                                               "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 1}})
    wait_task(a, uuid, task)
    if step != "prep":
        assert usage(b) == 128  # the move claim is held there
    a.kill()
    s.close()
    a.config_path.write_text(a.config_path.read_text().replace(HOLD.format(step), ""))
    a.start()
    rec = settled_at(a, b, uuid)
    assert rec["flavor"]["memory_mb"] == 64
    with (a.state_dir / "instances" / uuid / "disk").open("rb") as f:
        f.seek(64 << 20)
        assert f.read(4096) == marker


def test_kill_9_of_the_destination_while_copying_undoes_the_move(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, b_migration=HOLD.format("copying"))
    uuid = spawn(a, image_file)
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b"})
    wait_task(a, uuid, "resize_migrated")
    time.sleep(0.5)  # the destination is holding in its copying step
    b.kill()
    b.config_path.write_text(b.config_path.read_text().replace(HOLD.format("copying"), ""))
    b.start()
    settled_at(a, b, uuid)


def test_kill_9_of_the_destination_before_the_copy_ends_in_one_place(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, a_migration=HOLD.format("finishing").replace("30", "3"))
    uuid = spawn(a, image_file)
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b"})
    wait_task(a, uuid, "resize_migrated")
    assert usage(b) == 64
    b.kill()
    time.sleep(4)  # the source finds the destination gone, and keeps asking
    assert a.call("instance.get", {"uuid": uuid})["power_state"] != "running"
    b.start()
    # The source's finish may reach the restarted destination (the move then ends there) or
    # time out first (it is then undone): either way, one place.
    deadline = time.monotonic() + 60
    while True:
        here = [r for r in (a.call("instance.list"), b.call("instance.list")) if r and r[0]["task_state"] is None]
        if here:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    if here[0][0]["host"] == "host-b":
        # The destination shows the move ended once its finish is done; the source records
        # that when the finish's reply reaches it, and a confirm in between is CONFLICT.
        while True:
            try:
                b.call("instance.confirm_resize", {"uuid": uuid})
                break
            except Conflict as exc:
                assert exc.message.endswith("is running here") and time.monotonic() < deadline
                time.sleep(0.1)
        settled_at(b, a, uuid)
    else:
        settled_at(a, b, uuid)


def test_kill_9_of_either_agent_once_resized_keeps_the_move(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    uuid = spawn(a, image_file)
    a.call("instance.resize", {"uuid": uuid, "destination": "host-b", "wait": True,
                               "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 1}})
    a.kill()
    b.kill()
    a.start()
    b.start()
    rec = b.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["power_state"]) == ("resized", "running")
    gone(a, uuid)
    assert (usage(a), usage(b)) == (64, 128)
    assert disk_dirs(a) == {uuid + "_resize"}
    b.call("instance.revert_resize", {"uuid": uuid})
    settled_at(a, b, uuid)


def test_cli_verbs(make_agent: Any, image_file: Path) -> None:
    from test_cli import fc, fc_json

    a, b = pair(make_agent)
    uuid = spawn(a, image_file, name="web")
    moved = fc_json("migrate", "web", "--destination", "host-b", "--wait", "--endpoint", a.control)
    assert moved["failures"] == [] and moved["results"][0]["host"] == "host-b"
    fc("resize-revert", "web", "--endpoint", b.control)
    settled_at(a, b, uuid)
    rec = fc_json("resize", "web", "--vcpus", "2", "--memory", "96", "--disk", "1", "--destination", "host-b",
                  "--wait", "--endpoint", a.control)
    assert (rec["vm_state"], rec["flavor"]["memory_mb"]) == ("resized", 96)
    fc("resize-confirm", "web", "--endpoint", b.control)
    settled_at(b, a, uuid, memory_mb=96)


def test_the_move_does_not_need_its_client(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, a_migration=HOLD.format("migrating").replace("30", "1"))
    uuid = spawn(a, image_file)
    s = send_and_forget(a, "instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    wait_task(a, uuid, "resize_migrating")
    s.close()  # the client is gone (as after a kill -9) before the move is over
    deadline = time.monotonic() + 60
    while not b.call("instance.list"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert wait_for_state(b, uuid, "resized")["power_state"] == "running"
    b.call("instance.confirm_resize", {"uuid": uuid})
    settled_at(b, a, uuid)


def test_revert_while_the_source_is_down_finishes_when_it_is_back(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)
    uuid = spawn(a, image_file)
    a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    a.kill()
    assert call_error(b, "instance.revert_resize", {"uuid": uuid}).code == "BUSY"
    gone(b, uuid)  # its copy here is gone; the instance waits on its old host
    b.kill()  # and the destination's retries survive a restart too
    b.start()
    a.start()
    deadline = time.monotonic() + 30
    while not a.call("instance.list"):  # until the destination's next try
        assert time.monotonic() < deadline
        time.sleep(0.1)
    settled_at(a, b, uuid)


def test_a_move_spends_the_sources_console_urls(make_agent: Any, image_file: Path, tmp_path: Path) -> None:
    port = free_port()
    console = f'[console]\nenabled = true\nlisten = "127.0.0.1:{port}"\nsocket_dir = "{tmp_path / "s"}"\n'
    a, b = pair(make_agent, a_extra=console)
    uuid = spawn(a, image_file)
    url = a.call("instance.get_console", {"uuid": uuid, "type": "serial"})["url"]
    assert a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})["host"] == "host-b"
    assert b.call("instance.get", {"uuid": uuid})["vm_state"] == "resized"
    # The guest is no longer behind the source's proxy: a URL handed out before the move is refused.
    assert status_of(url) == 403
