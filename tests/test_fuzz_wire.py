"""The seeded, bounded fuzz test of the wire (issue #19).

A real agent on libvirt's ``test:///default`` driver is driven by ``tests/fuzz_wire.py`` (a plain
pyzmq DEALER and ``msgpack``, nothing from fastcompute's client) with odd frames and well-formed
lifecycle ops over a small set of uuids, checking after every step that each request got one
typed, well-formed reply with its id, never ``INTERNAL``, and that a ping answers within 1 s;
and at quiescent points that usage is the sum of the live claims, nothing stays stuck with a
task, and instance directories match the live instances. Domains of ``test:///default`` live
inside the agent process, so the proxy for "no domain without a record" is a sweep that deletes
everything, checks ``instance.get`` and ``instance.console`` are ``NOT_FOUND`` for every uuid used,
then re-spawns each of those uuids with ``wait: true`` and requires ``active`` (a running domain
left behind under a uuid makes that spawn fail). See ``fuzz_wire.py`` for the details.

Environment:

- ``FASTCOMPUTE_FUZZ_SEED`` (default 19): the seed; a failure names it, with the step and the
  request, so ``FASTCOMPUTE_FUZZ_SEED=S FASTCOMPUTE_FUZZ_STEPS=<step + 1>`` replays the run up to it.
- ``FASTCOMPUTE_FUZZ_STEPS`` (default 3000): how many steps (``bench/test_bench_fuzz.py`` runs more).
- ``FASTCOMPUTE_FUZZ_FAILFAST=1``: stop at the first violation instead of listing every kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fuzz_wire import run_fuzz

DEFAULT_STEPS = 3000


def test_fuzz_wire(make_agent: Any, image_file: Path) -> None:
    """A few thousand seeded steps of odd frames and lifecycle ops keep every invariant."""
    # A quota of the default project that the fuzzer's few instances never reach, but an
    # explicit one, so that the quota path runs on every spawn.
    agent = make_agent(config="[quota]\ninstances = 1000\n")
    run_fuzz(agent, image_file, default_steps=DEFAULT_STEPS, time_limit_s=240.0)
