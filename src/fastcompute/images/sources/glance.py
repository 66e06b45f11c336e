"""Glance v2 images: the image's record (on the loop) and its data (an http transfer); and the
other way, a new image (a snapshot) created, its data streamed up, or deleted when it failed.

The Image service is asked with the requesting tenant's token when the spawn request carries
one (``image.token``), so that Glance decides what that tenant may see; otherwise with the
agent's own ``[images] glance_token``. A token is only ever put in a request header: it is
never logged, stored or put in a message.
"""

from __future__ import annotations

import hashlib
import ssl
import urllib.parse
from collections.abc import AsyncIterable, Callable
from typing import Any

import httpx

from fastcompute.config import ImagesConfig
from fastcompute.errors import ImageError
from fastcompute.images.sources.common import human


class GlanceSource:
    """Reads image records from the configured Image service."""

    def __init__(self, cfg: ImagesConfig, ssl_context: Callable[[], ssl.SSLContext]) -> None:
        self.cfg = cfg
        self._ssl_context = ssl_context
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            c = self.cfg
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(
                    connect=c.connect_timeout_s, read=c.read_timeout_s, write=c.read_timeout_s,
                    pool=None,
                ),
                verify=self._ssl_context(),
                follow_redirects=True,
                trust_env=False,
            )
        return self._client

    def url(self, image_id: str, suffix: str = "") -> str:
        """The Glance v2 URL of an image, or of its data with suffix ``/file``."""
        quoted = urllib.parse.quote(image_id, safe="")
        return f"{self.cfg.glance_endpoint.rstrip('/')}/v2/images/{quoted}{suffix}"

    def headers(self, token: str | None = None) -> dict[str, str]:
        """The token (the tenant's when given, else the agent's) and the configured headers."""
        headers = {}
        for line in self.cfg.glance_headers:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip()] = value.strip()
        if token or self.cfg.glance_token:
            headers["X-Auth-Token"] = token or self.cfg.glance_token
        return headers

    async def meta(self, image_id: str, token: str | None = None) -> dict[str, Any]:
        """Glance's record of an image (GET /v2/images/{id}); errors are ImageError."""
        try:
            resp = await self._http().get(self.url(image_id), headers=self.headers(token))
        except httpx.HTTPError as exc:
            raise ImageError(
                f"the Image service at {self.cfg.glance_endpoint} cannot be reached: "
                f"{exc or type(exc).__name__}"
            ) from exc
        whose = "the request's token" if token else "this agent's project"
        if resp.status_code == 404:
            raise ImageError(
                f"image {image_id} not found in the Image service (or not visible to {whose})",
                {"image_id": image_id},
            )
        if resp.status_code in (401, 403):
            check = "the request's token" if token else "[images] glance_token"
            raise ImageError(
                f"the Image service refused access to image {image_id} ({resp.status_code}): "
                f"check {check}",
                {"image_id": image_id},
            )
        if resp.status_code != 200:
            raise ImageError(
                f"the Image service answered {resp.status_code} for image {image_id}",
                {"image_id": image_id},
            )
        try:
            info = resp.json()
        except ValueError as exc:
            raise ImageError(f"the Image service sent invalid JSON for image {image_id}") from exc
        if not isinstance(info, dict):
            raise ImageError(f"the Image service sent invalid metadata for image {image_id}")
        return info

    def _unreachable(self, exc: httpx.HTTPError) -> ImageError:
        return ImageError(f"the Image service at {self.cfg.glance_endpoint} cannot be reached: "
                          f"{exc or type(exc).__name__}")

    async def create(self, body: dict[str, Any]) -> str:
        """Create an image record (``queued``, no data yet); its id."""
        try:
            resp = await self._http().post(f"{self.cfg.glance_endpoint.rstrip('/')}/v2/images",
                                           headers=self.headers(), json=body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code != 201:
            raise ImageError(f"the Image service refused to create image {body.get('name')!r} "
                             f"({resp.status_code}): {resp.text[:300]}", {"status": resp.status_code})
        image_id = resp.json().get("id")
        if not isinstance(image_id, str):
            raise ImageError("the Image service created an image without an id")
        return image_id

    async def upload(self, image_id: str, data: AsyncIterable[bytes], size: int | None = None) -> None:
        """Stream an image's data; with its ``size`` known, as one body of that length (a
        WSGI server reads it faster than a chunked one)."""
        headers = {**self.headers(), "Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        try:
            resp = await self._http().put(self.url(image_id, "/file"), content=data, headers=headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code != 204:
            raise ImageError(f"the Image service refused the data of image {image_id} "
                             f"({resp.status_code}): {resp.text[:300]}", {"image_id": image_id})

    async def delete(self, image_id: str) -> bool:
        """Delete an image; False when it was already gone."""
        try:
            resp = await self._http().delete(self.url(image_id), headers=self.headers())
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code == 404:
            return False
        if resp.status_code != 204:
            raise ImageError(f"the Image service refused to delete image {image_id} ({resp.status_code})",
                             {"image_id": image_id})
        return True


def glance_expectations(info: dict[str, Any], limit: int) -> tuple[dict[str, str], str]:
    """Check Glance's image record; return the digests to verify and the claimed format."""
    image_id = info.get("id", "?")
    status = info.get("status")
    if status != "active":
        raise ImageError(f"image {image_id} is {status}, not active, in the Image service")
    fmt = info.get("disk_format")
    if fmt not in ("raw", "qcow2"):
        raise ImageError(
            f"image {image_id} has disk_format {fmt!r} in the Image service; only raw and "
            "qcow2 are supported"
        )
    container = info.get("container_format")
    if container not in (None, "bare"):
        raise ImageError(
            f"image {image_id} has container_format {container!r}; only bare is supported"
        )
    size = info.get("size")
    if isinstance(size, int) and size > limit:
        raise ImageError(
            f"image {image_id} is {human(size)}, above the limit of {human(limit)} (the "
            "flavor's disk, or [images] max_image_bytes)"
        )
    expected: dict[str, str] = {}
    algo, value = info.get("os_hash_algo"), info.get("os_hash_value")
    if isinstance(algo, str) and isinstance(value, str) and algo and value:
        if algo.lower() not in hashlib.algorithms_available:
            raise ImageError(
                f"image {image_id} is hashed with {algo}, which this host cannot check"
            )
        expected[algo.lower()] = value.lower()
    elif isinstance(info.get("checksum"), str) and info["checksum"]:
        expected["md5"] = info["checksum"].lower()
    else:
        raise ImageError(
            f"image {image_id} has no hash in the Image service (os_hash_value, checksum): "
            "it cannot be verified"
        )
    return expected, str(fmt)
