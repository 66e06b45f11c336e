"""Fixtures shared by the test modules (each area keeps its own in tests/<area>_fixtures.py)."""

import pytest
from agent_fixtures import agent, gated_image, image_file, make_agent

__all__ = ["agent", "gated_image", "image_file", "make_agent"]


@pytest.fixture
def anyio_backend() -> str:
    """The async tests (``pytest.mark.anyio``) run on asyncio."""
    return "asyncio"
