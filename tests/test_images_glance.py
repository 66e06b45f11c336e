"""Images fetched by id from a real OpenStack Image service (Glance) on loopback."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from glance_fixtures import Glance, UploadRefused, glance, identity

from fastcompute.config import ImagesConfig
from fastcompute.errors import ImageError
from fastcompute.images.cache import ImageCache, ImageSpec

__all__ = ["glance"]

MiB = 1 << 20
GiB = 1 << 30

pytestmark = pytest.mark.anyio


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        yield ex


@pytest.fixture
async def cache(
    glance: Glance, tmp_path: Path, executor: concurrent.futures.Executor
) -> AsyncIterator[ImageCache]:
    """The agent's cache, acting as a member of project "agent-project"."""
    cfg = ImagesConfig(
        glance_endpoint=glance.endpoint,
        glance_token="unused-without-keystone",
        glance_headers=[f"{k}: {v}" for k, v in identity("agent-project").items()],
    )
    c = ImageCache(tmp_path / "state", cfg, executor)
    yield c
    await c.close()


def _image(size: int = 3 * MiB) -> bytes:
    data = bytearray(os.urandom(size))
    data[MiB : 2 * MiB] = bytes(MiB)
    return bytes(data)


def _files(state: Path) -> list[Path]:
    return [p for p in state.rglob("*") if p.is_file()]


async def test_public_image_is_fetched_and_verified(
    glance: Glance, cache: ImageCache, tmp_path: Path
) -> None:
    data = _image()
    image = glance.upload(data, project="other-project", visibility="public")
    assert image["os_hash_algo"] == "sha512"
    disk = await cache.prepare_disk("vm-1", ImageSpec(id=image["id"]), 1)
    [base] = cache.list_bases()
    assert base.source.endswith(f"/v2/images/{image['id']}") and base.users == ["vm-1"]
    with open(tmp_path / "state" / "_base" / base.key, "rb") as f:
        assert f.read() == data
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


async def test_request_checksum_is_checked_too(glance: Glance, cache: ImageCache) -> None:
    data = _image()
    image = glance.upload(data, project="other-project", visibility="public")
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    await cache.prepare_disk("vm-ok", ImageSpec(id=image["id"], checksum=good), 1)
    with pytest.raises(ImageError, match="requested checksum"):
        await cache.prepare_disk(
            "vm-bad", ImageSpec(id=image["id"], checksum="sha256:" + "0" * 64), 1
        )


async def test_private_image_of_another_project_is_refused(
    glance: Glance, cache: ImageCache, tmp_path: Path
) -> None:
    image = glance.upload(_image(), project="other-project", visibility="private")
    with pytest.raises(ImageError, match="not found") as info:
        await cache.prepare_disk("vm-2", ImageSpec(id=image["id"]), 1)
    assert info.value.code == "IMAGE_ERROR"
    assert _files(tmp_path / "state") == []


async def test_private_image_of_own_project_is_fetched(glance: Glance, cache: ImageCache) -> None:
    image = glance.upload(_image(), project="agent-project", visibility="private")
    await cache.prepare_disk("vm-3", ImageSpec(id=image["id"]), 1)


async def test_tampered_store_fails_glance_hash(
    glance: Glance, cache: ImageCache, tmp_path: Path
) -> None:
    data = _image()
    image = glance.upload(data, project="other-project", visibility="public")
    stored = glance.stored_file(image["id"])
    tampered = bytearray(stored.read_bytes())
    tampered[-1] ^= 0xFF
    stored.write_bytes(bytes(tampered))
    with pytest.raises(ImageError, match="failed verification: its sha512 is"):
        await cache.prepare_disk("vm-4", ImageSpec(id=image["id"]), 1)
    assert _files(tmp_path / "state") == []


def _qcow2_of_an_image(tmp_path: Path) -> tuple[Path, Path]:
    """A raw test image and its qcow2 conversion (by qemu-img), both in ``tmp_path``."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(_image())
    qcow = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    return raw, qcow


async def test_qcow2_image_from_glance(
    glance: Glance, cache: ImageCache, tmp_path: Path
) -> None:
    raw, qcow = _qcow2_of_an_image(tmp_path)
    image = glance.upload(qcow.read_bytes(), project="p", disk_format="qcow2", visibility="public")
    disk = await cache.prepare_disk("vm-5", ImageSpec(id=image["id"]), 1)
    out = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(out)], check=True)
    with open(out, "rb") as f:
        assert f.read(raw.stat().st_size) == raw.read_bytes()


async def test_qcow2_registered_as_raw_is_refused(
    glance: Glance, cache: ImageCache, tmp_path: Path
) -> None:
    _raw, qcow = _qcow2_of_an_image(tmp_path)
    try:
        image = glance.upload(qcow.read_bytes(), project="p", disk_format="raw",
                              visibility="public")
    except UploadRefused as exc:
        pytest.skip(f"this Glance already refuses the mismatch itself ({exc.status})")
    with pytest.raises(ImageError, match="claims to be raw but its bytes are qcow2"):
        await cache.prepare_disk("vm-6", ImageSpec(id=image["id"]), 1)
    assert _files(tmp_path / "state") == []


async def test_unsupported_glance_format_is_refused_before_download(
    glance: Glance, cache: ImageCache, tmp_path: Path
) -> None:
    vmdk = tmp_path / "x.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    image = glance.upload(vmdk.read_bytes(), project="p", disk_format="vmdk", visibility="public")
    with pytest.raises(ImageError, match="disk_format 'vmdk'"):
        await cache.prepare_disk("vm-7", ImageSpec(id=image["id"]), 1)


async def test_unknown_image_id(cache: ImageCache) -> None:
    with pytest.raises(ImageError, match="not found"):
        await cache.prepare_disk("vm-8", ImageSpec(id="00000000-0000-0000-0000-000000000000"), 1)
