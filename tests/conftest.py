"""Fixtures shared by the test modules (each area keeps its own in tests/<area>_fixtures.py)."""

from agent_fixtures import agent, image_file, make_agent

__all__ = ["agent", "image_file", "make_agent"]
