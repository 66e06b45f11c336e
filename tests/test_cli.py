"""The ``fastcompute`` command against a running agent: human output and ``--json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import msgspec
from agent_fixtures import AgentProcess

from fastcompute.config import Config


def fc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``fastcompute ARGS`` (wide terminal, so tables are not cut)."""
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    env.pop("FASTCOMPUTE_ENDPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "fastcompute.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    if check:
        assert proc.returncode == 0, f"fastcompute {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def fc_json(*args: str) -> Any:
    return json.loads(fc(*args, "--json").stdout)


def test_ping_and_host(agent: AgentProcess) -> None:
    ep = ("--endpoint", agent.control)
    human = fc("ping", *ep).stdout
    assert "agent" in human and agent.control in human and "up" in human
    pong = fc_json("ping", *ep)
    assert set(pong) == {"version", "uptime_s"}
    host = fc("host", *ep).stdout
    for word in ("VCPU", "PCPU", "MEMORY_MB", "DISK_GB", "test:///default", "NUMA cells"):
        assert word in host, word
    info = fc_json("host", *ep)
    assert info["inventory"]["VCPU"]["total"] == 16 and info["usage"]["VCPU"] == 0


def test_boot_list_show_stop_delete(agent: AgentProcess, image_file: Path) -> None:
    ep = ("--endpoint", agent.control)
    booted = fc_json("boot", "web", "--count", "3", "--image", str(image_file), "--memory", "64",
                     "--vcpus", "2", "--project", "shop", "--wait", *ep)
    assert booted["failures"] == []
    recs = booted["instances"]
    assert sorted(r["name"] for r in recs) == ["web-1", "web-2", "web-3"]
    assert {(r["vm_state"], r["project_id"], r["flavor"]["vcpus"]) for r in recs} == {("active", "shop", 2)}
    uuids = sorted(r["uuid"] for r in recs)
    assert agent.call("host.info")["usage"]["VCPU"] == 6

    table = fc("list", *ep).stdout
    assert all(u in table for u in uuids) and "web-2" in table and "3 instances" in table
    assert sorted(r["uuid"] for r in fc_json("list", *ep)) == uuids
    assert fc_json("list", "--state", "stopped", *ep) == []
    assert len(fc_json("list", "--project", "shop", *ep)) == 3

    shown = fc("show", uuids[0], *ep).stdout
    assert uuids[0] in shown and "active" in shown and "shop" in shown
    assert fc_json("show", uuids[0], *ep)["uuid"] == uuids[0]

    stopped = fc_json("stop", uuids[0], uuids[1], *ep)
    assert stopped["failures"] == [] and {r["vm_state"] for r in stopped["results"]} == {"stopped"}
    assert agent.call("instance.get", {"uuid": uuids[1]})["power_state"] == "shutdown"
    human_stop = fc("stop", uuids[2], *ep).stdout
    assert uuids[2] in human_stop and "stopped" in human_stop
    assert len(fc_json("list", "--state", "stopped", *ep)) == 3

    deleted = fc_json("delete", "--all", *ep)
    assert deleted["failures"] == []
    assert sorted(r["uuid"] for r in deleted["results"]) == uuids
    assert agent.call("instance.list") == []
    assert agent.call("host.info")["usage"]["VCPU"] == 0
    assert "0 instances" in fc("list", *ep).stdout


def test_errors_exit_non_zero_with_the_code(agent: AgentProcess, image_file: Path) -> None:
    ep = ("--endpoint", agent.control)
    missing = "5d9b5e58-0f8e-4f56-a3a6-1f1b9f3f7e11"
    proc = fc("show", missing, *ep, check=False)
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr and missing in proc.stderr
    proc = fc("boot", "huge", "--image", str(image_file), "--memory", "100000", *ep, check=False)
    assert proc.returncode == 1 and "NO_CAPACITY" in proc.stderr
    uuid = agent.call("instance.spawn", {"name": "x", "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
                                         "image": {"url": image_file.as_uri()}, "wait": True})["uuid"]
    proc = fc("start", uuid, *ep, check=False)
    assert proc.returncode == 1 and "CONFLICT" in proc.stderr and "active" in proc.stderr


def test_no_agent_times_out_cleanly() -> None:
    proc = fc("ping", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "0.5", check=False)
    assert proc.returncode == 1 and "timeout" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


def test_config_prints_the_defaults_as_toml() -> None:
    text = fc("config").stdout
    parsed = tomllib.loads(text)
    assert parsed == msgspec.to_builtins(Config())
    # Every key is documented: a comment line precedes each assignment.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 4, line


def test_config_output_runs_an_agent(make_agent: Any) -> None:
    """What ``fastcompute config`` prints is a valid config file for the agent."""
    agent: AgentProcess = make_agent(config=fc("config").stdout)
    assert agent.call("host.info")["hypervisor"]["uri"] == "test:///default"


def fc80(*args: str) -> str:
    """``fastcompute ARGS`` in an 80-column terminal: what a new user's first window shows."""
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    env.pop("FASTCOMPUTE_ENDPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "fastcompute.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_list_fits_80_columns_with_short_uuids_that_verbs_take(agent: AgentProcess, image_file: Path) -> None:
    ep = ("--endpoint", agent.control)
    booted = fc_json("boot", "database-primary", "--count", "2", "--image", str(image_file), "--memory", "64",
                     "--project", "shop", "--wait", *ep)["instances"]
    table = fc80("list", *ep)
    lines = table.splitlines()
    assert all(len(line) <= 80 for line in lines), table
    header = [cell.strip() for cell in lines[0].split("\u2503")]
    assert header[:2] == ["UUID", "NAME"] and "STATE" in header and "POWER" in header, table
    for r in booted:
        row = next(line for line in lines if line.startswith(r["uuid"][:8]))
        # Whole words, not one letter a column: the name, the state and the power state.
        assert r["name"] in row and "active" in row and "running" in row, table
    assert "2 instances" in table
    # A wide terminal shows whole uuids and the project.
    wide = fc("list", *ep).stdout
    assert all(r["uuid"] in wide for r in booted) and "shop" in wide
    # The short uuid the table shows (and the name) name the instance for every verb.
    short = booted[0]["uuid"][:8]
    assert fc_json("show", short, *ep)["uuid"] == booted[0]["uuid"]
    stopped = fc_json("stop", short, booted[1]["name"], *ep)
    assert sorted(r["uuid"] for r in stopped["results"]) == sorted(r["uuid"] for r in booted)
    proc = fc("show", "ffffffff0", *ep, check=False)
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr and "ffffffff0" in proc.stderr


def _watch(agent: AgentProcess, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastcompute.cli", "events", "--endpoint", agent.control,
                             "--events", agent.events, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _until_done(agent: AgentProcess, proc: subprocess.Popen[str], image_file: Path) -> str:
    """Spawn and delete instances until ``events --count`` has seen enough (a SUB socket misses
    what is published before it has joined)."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        rec = agent.call("instance.spawn", {"name": "watched", "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
                                            "image": {"url": image_file.as_uri()}, "wait": True})
        agent.call("instance.delete", {"uuid": rec["uuid"]})
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    return stdout


def test_events_prints_a_line_per_event_and_json_with_json(agent: AgentProcess, image_file: Path) -> None:
    human = _until_done(agent, _watch(agent, "instance.", "--count", "3"), image_file)
    lines = human.splitlines()
    assert len(lines) == 3, human
    for line in lines:
        assert " instance " in f" {line} " and "watched" in line and "power" in line, line
    assert any("building/spawning" in line for line in lines) or any("active/-" in line for line in lines), human
    machine = _until_done(agent, _watch(agent, "instance.", "--count", "2", "--json"), image_file)
    events = [json.loads(line) for line in machine.splitlines()]
    assert len(events) == 2
    for e in events:
        assert e["topic"] == "instance." + e["body"]["uuid"] and e["body"]["name"] == "watched"


def test_a_misspelt_config_value_stops_the_agent_naming_the_key(tmp_path: Path) -> None:
    """``source = "cgrop"`` is not taken as some default: the agent does not start."""
    path = tmp_path / "agent.toml"
    path.write_text('[stats]\nsource = "cgrop"\n')
    proc = fc("agent", "--config", str(path), "--state-dir", str(tmp_path / "state"), check=False)
    assert proc.returncode == 2
    assert "stats.source" in proc.stderr and "cgrop" in proc.stderr


def test_rebuild_rescue_unrescue_and_crash_dump_verbs(agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    ep = ("--endpoint", agent.control)
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(1 << 20))
    uuid = fc_json("boot", "vm", "--image", str(image_file), "--memory", "64", "--wait", *ep)["instances"][0]["uuid"]
    rebuilt = fc_json("rebuild", uuid, "--image", str(other), *ep)
    assert rebuilt["failures"] == [] and rebuilt["results"][0]["image"] == {"url": other.as_uri(), "id": None,
                                                                          "checksum": None, "disk_format": None}
    assert fc_json("rescue", uuid, *ep)["results"][0]["vm_state"] == "rescued"
    assert fc_json("crash-dump", uuid, *ep)["failures"] == []
    assert fc_json("unrescue", uuid, *ep)["results"][0]["vm_state"] == "active"
    assert fc_json("force-delete", uuid, *ep)["results"] == [{"uuid": uuid, "deleted": True}]
