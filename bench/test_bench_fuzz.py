"""The wire fuzzer of ``tests/fuzz_wire.py`` for longer: tens of thousands of steps.

``make test`` runs a few thousand (``tests/test_fuzz_wire.py``); this runs 30,000 by default,
bounded to three minutes of steps, with the same seed and step variables
(``FASTCOMPUTE_FUZZ_SEED``, ``FASTCOMPUTE_FUZZ_STEPS``, ``FASTCOMPUTE_FUZZ_FAILFAST``). It gates on
nothing but the invariants: any violation fails it, with the seed, step and request to replay.
"""

from pathlib import Path
from typing import Any

from fuzz_wire import run_fuzz

BENCH_STEPS = 30_000


def test_bench_fuzz_wire(make_memory_agent: Any, image_file: Path) -> None:
    """A long seeded run of the wire fuzzer keeps every invariant."""
    agent = make_memory_agent(config="[quota]\ninstances = 1000\n")
    run_fuzz(agent, image_file, default_steps=BENCH_STEPS, time_limit_s=180.0, check_every=500, sweep_every=5000)
