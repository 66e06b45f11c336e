"""Image sources, one module per scheme: file://, http(s):// and Glance v2.

Each fetches bytes into a temporary file of the cache and says what they are worth (digests,
size) or raises :class:`~fastcompute.errors.ImageError`. Deciding what to do with them
(verification, the cache, single flight) is :mod:`fastcompute.images.cache`'s business.
"""

from __future__ import annotations

import concurrent.futures

from fastcompute.config import ImagesConfig
from fastcompute.images.sources.common import (
    DIGESTS,
    Report,
    Sink,
    digests_for,
    hash_file,
    human,
    redact,
)
from fastcompute.images.sources.file import FileSource
from fastcompute.images.sources.glance import GlanceSource, glance_expectations
from fastcompute.images.sources.http import HttpSource, allowed


class Sources:
    """The sources of one cache: file:// copies, http(s) downloads and the Image service."""

    def __init__(self, cfg: ImagesConfig, executor: concurrent.futures.Executor) -> None:
        self.file = FileSource(cfg, executor)
        self.http = HttpSource(cfg)
        self.glance = GlanceSource(cfg, self.http.ssl_context)

    async def close(self) -> None:
        """Close the HTTP clients and the download threads (downloads must have ended)."""
        await self.glance.close()
        self.http.close()


__all__ = [
    "DIGESTS",
    "FileSource",
    "GlanceSource",
    "HttpSource",
    "Report",
    "Sink",
    "Sources",
    "allowed",
    "digests_for",
    "glance_expectations",
    "hash_file",
    "human",
    "redact",
]
