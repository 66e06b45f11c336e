"""The image cache through the agent: listing, pruning, progress events, cache metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
from agent_fixtures import AgentProcess, spawn_args, sub_socket


def test_images_list_prune_and_cli(make_agent: Any, tmp_path: Path) -> None:
    agent: AgentProcess = make_agent()
    a_img, b_img = tmp_path / "a.raw", tmp_path / "b.raw"
    a_img.write_bytes(os.urandom(1 << 20))
    b_img.write_bytes(os.urandom(2 << 20))
    keep = agent.call("instance.spawn", spawn_args(a_img, wait=True))
    gone = agent.call("instance.spawn", spawn_args(b_img, wait=True))
    bases = {b["source"]: b for b in agent.call("images.list")}
    assert bases[a_img.as_uri()]["users"] == [keep["uuid"]]
    assert bases[b_img.as_uri()]["virtual_size"] == 2 << 20
    agent.call("instance.delete", {"uuid": gone["uuid"]})

    out = subprocess.run([sys.executable, "-m", "fastcompute.cli", "images", "--endpoint", agent.control,
                          "--prune", "--max-age", "0", "--json"], capture_output=True, text=True, check=True)
    left = json.loads(out.stdout)
    assert [b["source"] for b in left] == [a_img.as_uri()]
    assert not any((agent.state_dir / "_base").glob(f"{bases[b_img.as_uri()]['key']}*"))
    table = subprocess.run([sys.executable, "-m", "fastcompute.cli", "images", "--endpoint", agent.control],
                           capture_output=True, text=True, check=True).stdout
    assert "1 base images" in table and "a.raw" in table


def test_a_slow_copy_reports_progress_events(make_agent: Any, tmp_path: Path) -> None:
    agent: AgentProcess = make_agent(config='[images]\ndisk_mode = "flat"\n')
    img = tmp_path / "big.raw"
    with img.open("wb") as f:
        f.write(os.urandom(64 << 20))
    sub = sub_socket(agent.events, ["progress."])
    try:
        rec = agent.call("instance.spawn", spawn_args(img, wait=True))
        assert rec["vm_state"] == "active"
        events = []
        while sub.poll(1000):
            topic, body = sub.recv_multipart()
            events.append((topic.decode(), msgspec.msgpack.decode(body)))
    finally:
        sub.close()
    assert events, "no progress events"
    assert all(t == f"progress.{rec['uuid']}" for t, _ in events)
    stages = {e["stage"] for _, e in events}
    assert stages <= {"download", "convert", "copy"} and stages
    last = events[-1][1]
    assert last["total"] is not None and last["done"] == last["total"]
