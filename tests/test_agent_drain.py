"""Draining a host (``host.drain``) between real agents on the embedded test driver.

The test driver cannot migrate live (tests/test_guest_drain_agents.py moves real guests), so
what is checked here is everything around the moves: the host is disabled, what cannot move is
reported with its reason, a destination's refusals and a failed migration leave each instance
running where it was with nothing left at the peer, one drain at a time, and the CLI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from agent_fixtures import AgentProcess, call_error, disk_dirs
from test_agent_live_migration import URI
from test_agent_migration import config, pair, spawn, usage
from test_agent_security import make_keys

from fastcompute.errors import AgentError
from fastcompute.rpc.client import Client, Curve


def running_here(agent: AgentProcess, uuids: list[str]) -> None:
    for uuid in uuids:
        rec = agent.call("instance.get", {"uuid": uuid})
        assert (rec["vm_state"], rec["task_state"], rec["power_state"], rec["host"]) == (
            "active", None, "running", agent.call("host.info")["hostname"]), rec


def test_drain_without_peers_disables_the_host_and_reports_every_instance(make_agent: Any,
                                                                          image_file: Path) -> None:
    a = make_agent()
    running = [spawn(a, image_file, name=f"vm{i}") for i in range(2)]
    stopped = spawn(a, image_file, name="off")
    a.call("instance.stop", {"uuid": stopped, "timeout_s": 0})
    report = a.call("host.drain", {"wait": True})
    assert (report["done"], report["total"], report["running"], report["moved"]) == (True, 3, 0, [])
    why = {f["uuid"]: f for f in report["failed"]}
    assert set(why) == {*running, stopped}
    assert why[stopped]["code"] == "CONFLICT" and "stopped" in why[stopped]["message"]
    for uuid in running:
        assert why[uuid]["code"] == "NO_CAPACITY" and "no migration peers" in why[uuid]["message"]
    info = a.call("host.info")
    assert info["enabled"] is False and "COMPUTE_STATUS_DISABLED" in info["traits"]
    assert info["disabled_reason"] == "draining"
    running_here(a, running)
    assert usage(a) == 3 * 64
    # A host the operator disabled keeps the operator's reason through a drain.
    a.call("host.set_enabled", {"enabled": True})
    a.call("host.set_enabled", {"enabled": False, "reason": "disk replacement, ticket 42"})
    a.call("host.drain", {"wait": True})
    assert a.call("host.info")["disabled_reason"] == "disk replacement, ticket 42"


def test_bad_arguments_are_refused_and_change_nothing(make_agent: Any) -> None:
    a = make_agent()
    for args, field in (({"live": False}, "args.live"), ({"concurrency": 0}, "args.concurrency"),
                        ({"concurrency": 1000}, "args.concurrency"), ({"concurrency": "3"}, "args.concurrency"),
                        ({"bogus": 1}, "args.bogus")):
        err = call_error(a, "host.drain", args)
        assert (err.code, err.details.get("field")) == ("BAD_REQUEST", field), (args, err)
    assert a.call("host.info")["enabled"] is True


def test_failed_migrations_are_reported_and_leave_nothing_at_the_peer(make_agent: Any, image_file: Path) -> None:
    # B prepares each guest's side (claim, overlay, ports), then A's test hypervisor cannot
    # migrate: every guest must go on at A, B must be left with nothing.
    a, b = pair(make_agent, b_migration=URI)
    uuids = [spawn(a, image_file, name=f"vm{i}", config_drive=True) for i in range(4)]
    report = a.call("host.drain", {"concurrency": 3, "wait": True})
    assert report["moved"] == [] and report["done"] is True
    assert sorted(f["uuid"] for f in report["failed"]) == sorted(uuids)
    for f in report["failed"]:
        assert f["code"] == "HYPERVISOR_ERROR" and "migrate guests live" in f["message"], f
    running_here(a, uuids)
    assert (usage(a), usage(b), disk_dirs(b)) == (4 * 64, 0, set())
    assert b.call("instance.list") == []
    assert (a.call("host.info")["enabled"], b.call("host.info")["enabled"]) == (False, True)


def test_peers_filtered_out_or_refusing_are_named(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent)  # B has no [migration] libvirt_uri: it refuses live migrations
    uuid = spawn(a, image_file)
    failed = a.call("host.drain", {"wait": True})["failed"]
    assert [(f["uuid"], f["code"]) for f in failed] == [(uuid, "NO_CAPACITY")]
    assert "host-b: CONFLICT" in failed[0]["message"] and "libvirt_uri" in failed[0]["message"]
    b.call("host.set_enabled", {"enabled": False})  # the scheduler's filters: B is not a candidate
    failed = a.call("host.drain", {"wait": True})["failed"]
    assert "1 disabled" in failed[0]["message"] and "host-b:" not in failed[0]["message"], failed
    running_here(a, [uuid])
    assert (usage(b), disk_dirs(b)) == (0, set())


def test_a_second_drain_while_one_runs_is_a_conflict(make_agent: Any, image_file: Path) -> None:
    a, b = pair(make_agent, a_migration='test_hold_step = "live_migrating"\ntest_hold_s = 3\n', b_migration=URI)
    uuid = spawn(a, image_file)
    started = a.call("host.drain", {})
    assert (started["done"], started["total"], started["failed"]) == (False, 1, [])
    assert call_error(a, "host.drain", {"wait": True}).code == "CONFLICT"
    deadline = time.monotonic() + 60
    while True:  # once the first drain is over, a new one may start (and reports the same)
        try:
            report = a.call("host.drain", {"wait": True})
            break
        except AgentError as exc:
            assert exc.code == "CONFLICT" and time.monotonic() < deadline
            time.sleep(0.3)
    assert [(f["uuid"], f["code"]) for f in report["failed"]] == [(uuid, "HYPERVISOR_ERROR")]
    running_here(a, [uuid])
    assert (usage(b), disk_dirs(b)) == (0, set())


def test_cli_drain(make_agent: Any, image_file: Path) -> None:
    from test_cli import fc

    a = make_agent()
    uuid = spawn(a, image_file, name="web")
    proc = fc("drain", "--endpoint", a.control, check=False)
    assert proc.returncode == 1, proc  # something could not move
    assert uuid[:8] in proc.stdout and "NO_CAPACITY" in proc.stdout and "0 moved, 1 not moved" in proc.stdout
    proc = fc("drain", "--endpoint", a.control, "--json", check=False)
    report = json.loads(proc.stdout)
    assert [f["uuid"] for f in report["failed"]] == [uuid] and report["host"] == a.call("host.info")["hostname"]
    assert fc("drain", "--endpoint", a.control, "--concurrency", "0", check=False).returncode == 1


def test_over_curve_peers_read_each_others_host_info_and_nothing_more(make_agent: Any, image_file: Path,
                                                                       tmp_path: Path) -> None:
    pub = {n: make_keys(tmp_path / "keys", n) for n in ("host-a", "host-b", "admin")}
    z85 = {n: zmq.auth.load_certificate(p)[0].decode() for n, (p, _s) in pub.items()}
    a, b = make_agent(start=False), make_agent(start=False)
    for me, name, other, oname in ((a, "host-a", b, "host-b"), (b, "host-b", a, "host-a")):
        me.config_path.write_text(config(name, oname, other.control, peer_key=z85[oname], extra=(
            f'[security]\nserver_secret_key_file = "{pub[name][1]}"\nclient_public_keys = ["{z85["admin"]}"]\n')))
        me.curve = Curve.from_files(pub[name][0], pub["admin"][1])
        me.start()
    uuid = spawn(a, image_file)
    # A read B's host.info over the peer link (B is not "down"), then B refused the live move.
    failed = a.call("host.drain", {"wait": True})["failed"]
    assert [f["uuid"] for f in failed] == [uuid] and "host-b: CONFLICT" in failed[0]["message"], failed
    as_a = Curve.from_files(pub["host-b"][0], pub["host-a"][1])
    with Client(b.control, timeout_s=30, curve=as_a) as c:
        assert c.call("migration.host_info", {"peer": "host-a"})["hostname"] == "host-b"
        for op, args in (("host.drain", {}), ("migration.host_info", {"peer": "host-c"})):
            with pytest.raises(AgentError) as info:
                c.call(op, args)
            assert info.value.code == "FORBIDDEN", op
    assert call_error(b, "migration.host_info", {"peer": "host-a"}).code == "FORBIDDEN"  # an admin is no peer
    assert b.call("host.info")["enabled"] is True
