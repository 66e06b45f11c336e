"""Benchmarks reuse the tests' fixtures (a real agent subprocess, test hosts).

``make_memory_agent`` starts agents whose state directory (SQLite, instance disks) is on a
memory file system. The root file system of these machines is ext4 without a journal, where
creating a file within seconds of deleting others costs 0.5-0.8 ms (the kernel steps over the
recently freed inodes one by one), against 35 us on tmpfs: a storm benchmark that creates and
deletes thousands of disks would measure that, round after round differently, instead of the
agent. The storm benchmarks also report one round on the root file system, ungated.
"""

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent_fixtures import agent, agent_factory, image_file, make_agent

__all__ = ["agent", "image_file", "make_agent", "make_memory_agent", "memory_dir"]


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on /dev/shm (tmpfs), removed afterwards; ``tmp_path`` where there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        print("\nno /dev/shm here: the agents' state stays on the root file system")
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="fastcompute-bench-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_memory_agent(memory_dir: Path) -> Iterator[Any]:
    """``make_agent`` with the agents' state directories in ``memory_dir``."""
    yield from agent_factory(memory_dir)
