"""Rebuild against its floor in the same run: ``instance.rebuild`` of an instance from the image
it already has vs ``instance.delete`` + ``instance.spawn`` (``wait``) of the same image, one
instance after another, on the test driver with the agent's state on tmpfs.

A rebuild does more durable steps than a spawn (task, made disk, swap, launch, each recorded),
but no claim, no port validation and no record made or removed. Gated loosely: at most 1.5x.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from agent_fixtures import spawn_args

INSTANCES = 40
ROUNDS = 3
GATE = 1.5


def _rebuilds(c: Any, uuids: list[str], image: Path) -> float:
    t = time.perf_counter()
    for u in uuids:
        rec = c.call("instance.rebuild", {"uuid": u, "image": {"url": image.as_uri()}})
        assert rec["vm_state"] == "active", rec
    return time.perf_counter() - t


def _respawns(c: Any, uuids: list[str], image: Path) -> float:
    t = time.perf_counter()
    for u in uuids:
        c.call("instance.delete", {"uuid": u})
        rec = c.call("instance.spawn", spawn_args(image, uuid=u, wait=True))
        assert rec["vm_state"] == "active", rec
    return time.perf_counter() - t


def test_rebuild_vs_delete_and_spawn(make_memory_agent: Any, image_file: Path) -> None:
    agent = make_memory_agent("[resources]\ndisk_gb = 100000\n")
    with agent.client() as c:
        uuids = [c.call("instance.spawn", spawn_args(image_file, name=f"b{i}", wait=True))["uuid"]
                 for i in range(INSTANCES)]
        rebuild_t, respawn_t = [], []
        for _ in range(ROUNDS):
            rebuild_t.append(_rebuilds(c, uuids, image_file))
            respawn_t.append(_respawns(c, uuids, image_file))
    ratio = statistics.median(rebuild_t) / statistics.median(respawn_t)
    print(f"\nrebuild {statistics.median(rebuild_t) / INSTANCES * 1e3:.2f} ms, delete + spawn "
          f"{statistics.median(respawn_t) / INSTANCES * 1e3:.2f} ms, ratio {ratio:.2f} (gate <= {GATE})")
    assert ratio <= GATE
