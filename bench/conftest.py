"""Benchmarks reuse the tests' fixtures (a real agent subprocess, test hosts)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent_fixtures import agent, image_file, make_agent

__all__ = ["agent", "image_file", "make_agent"]
