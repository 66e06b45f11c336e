"""Image benchmarks: the copier against its rivals, overlays against qemu-img, a spawn storm.

Every gate compares things measured in the same run, alternating, on medians. The copy files
are 256 MiB rather than the 1 GiB of the issue: one 1 GiB dense copy with fsync takes ~3 s
on these machines, and five methods times several rounds would make this one benchmark take
minutes. Every copy, the rivals' included, ends with an fsync of the destination: the agent
needs its disks durable, and comparing a synced copy with one still in the page cache would
measure the disk, not the copier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.server
import itertools
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastcompute import _core
from fastcompute.config import ImagesConfig
from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.images.cache import ImageCache, ImageSpec
from fastcompute.images.formats import create_overlay
from fastcompute.rpc.client import AsyncClient

MiB = 1 << 20

def copy_file(src: os.PathLike[str], dst: os.PathLike[str], progress: Any = None) -> tuple[int, str]:
    """The compiled copier on paths (it takes strings)."""
    return _core.copy_file(os.fspath(src), os.fspath(dst), progress)

COPY_SIZE = 256 * MiB
ROUNDS = 7
# Every method ends in the same kernel path (page cache, then one fsync): measured here over
# 12 alternating rounds, copy_file_range, sendfile and read/write copies of a dense file were
# equal within the noise, and each paired ratio still swings by 10-20% between runs on 2
# shared cores. "At least as fast" is therefore checked against each rival with this margin;
# the copier's real lead is on sparse files (holes are skipped) and in not spawning a process.
NOISE = 1.25


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_copy_source(path: Path, kind: str) -> None:
    block = hashlib.sha512(kind.encode()).digest() * (MiB // 64)
    with open(path, "wb") as f:
        if kind == "dense":
            for _ in range(COPY_SIZE // MiB):
                f.write(block)
        else:
            # 10% data: one MiB in every ten, the rest holes.
            f.truncate(COPY_SIZE)
            for off in range(0, COPY_SIZE, 10 * MiB):
                f.seek(off)
                f.write(block)
    _fsync(path)


def _rivals(src: Path, dst: Path) -> dict[str, Callable[[], None]]:
    def ours() -> None:
        copy_file(src, dst)

    def shutil_copyfile() -> None:
        shutil.copyfile(src, dst)
        _fsync(dst)

    def cp() -> None:
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=True)
        _fsync(dst)

    def qemu_img() -> None:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(dst)],
                       check=True)
        _fsync(dst)

    return {"copier": ours, "shutil.copyfile": shutil_copyfile, "cp": cp, "qemu-img": qemu_img}


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_copier_vs_rivals(benchmark: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_copy_source(src, kind)
    methods = _rivals(src, dst)
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)

    def one_round(record: bool = True) -> None:
        for name in order:
            dst.unlink(missing_ok=True)
            # Start every copy with no dirty pages around: the previous copy's writeback (or
            # another process's) must not be billed to this one.
            os.sync()
            t0 = time.perf_counter()
            methods[name]()
            if record:
                times[name].append(time.perf_counter() - t0)
            if name == "copier":
                assert dst.stat().st_blocks <= src.stat().st_blocks + 128
        order.reverse()  # alternate who goes first, so page-cache effects even out

    one_round(record=False)  # warm-up: the first copy of a fresh file pays for more than copying
    for _ in range(ROUNDS):
        one_round()
    benchmark.pedantic(methods["copier"], rounds=3, iterations=1)  # type: ignore[attr-defined]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    # Ratios are taken within each round, then their median: a round that ran while the disk
    # was busy slows every method in it alike, and pairing cancels that out.
    # Each rival is compared with the copier on its own (taking the fastest of three noisy
    # rivals per round would bias the gate by the noise alone).
    ratio = {
        k: statistics.median(times[k][r] / times["copier"][r] for r in range(ROUNDS))
        for k in methods if k != "copier"
    }
    vs_best = min(ratio.values())
    vs_shutil = ratio["shutil.copyfile"]
    report = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items())
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items())
    print(f"\n{kind} {COPY_SIZE // MiB} MiB (medians): {report}; rival / copier per round: "
          f"{ratios}; gates: every rival >= {1 / NOISE:.2f}x"
          + (", shutil >= 5x" if kind == "sparse" else ""))
    benchmark.extra_info.update(  # type: ignore[attr-defined]
        {**{f"{k}_ms": v * 1000 for k, v in med.items()}, "best_rival_ratio": vs_best}
    )
    assert vs_best >= 1 / NOISE, times
    if kind == "sparse":
        assert vs_shutil >= 5, times


def test_overlay_vs_qemu_img_create(
    benchmark: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\1" * MiB)
    size = 20 << 30
    n = 40

    def ours(i: int) -> None:
        create_overlay(tmp_path / f"ours-{i}", size, str(base), "raw")

    def qemu(i: int) -> None:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
             str(tmp_path / f"qemu-{i}"), str(size)],
            check=True,
        )

    t_ours: list[float] = []
    t_qemu: list[float] = []
    for i in range(n):
        for fn, acc in ((ours, t_ours), (qemu, t_qemu)) if i % 2 else ((qemu, t_qemu), (ours, t_ours)):
            t0 = time.perf_counter()
            fn(i)
            acc.append(time.perf_counter() - t0)
    counter = itertools.count(n)
    benchmark(lambda: ours(next(counter)))  # type: ignore[operator]
    ratio = statistics.median(t_qemu) / statistics.median(t_ours)
    print(f"\noverlay: agent {statistics.median(t_ours) * 1e6:.0f} us, qemu-img create "
          f"{statistics.median(t_qemu) * 1e6:.0f} us: {ratio:.0f}x")
    assert ratio >= 20


# ---- storm: the image part of a boot storm --------------------------------------------


class _Counting(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b""
    hits = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture
def http_image() -> Iterator[tuple[str, type[_Counting]]]:
    handler = type("Handler", (_Counting,), {"body": os.urandom(64 * MiB), "hits": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/img.raw", handler
    httpd.shutdown()
    httpd.server_close()


def test_storm_of_one_uncached_image(
    benchmark: pytest.FixtureRequest, memory_dir: Path, http_image: tuple[str, type[_Counting]]
) -> None:
    """200 disks of one uncached 64 MiB image: one download, and no more time than the
    download plus 200 disks from a cached base, plus 20%. The caches live on tmpfs: on this
    machine's root file system, making a file soon after deleting others costs up to 100x
    more, differently from round to round (bench/conftest.py)."""
    tmp_path = memory_dir
    url, handler = http_image
    spawns = 200

    async def storm(state: Path) -> float:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            cache = ImageCache(state, ImagesConfig(http_sources=["127.0.0.1"]), ex)
            t0 = time.perf_counter()
            await asyncio.gather(
                *(cache.prepare_disk(f"i{n}", ImageSpec(url=url), 1) for n in range(spawns))
            )
            took = time.perf_counter() - t0
            await cache.close()
            return took

    async def separately(state: Path) -> tuple[float, float]:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            cache = ImageCache(state, ImagesConfig(http_sources=["127.0.0.1"]), ex)
            t0 = time.perf_counter()
            await cache.prepare_disk("first", ImageSpec(url=url), 1)
            download = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.gather(
                *(cache.prepare_disk(f"i{n}", ImageSpec(url=url), 1) for n in range(spawns))
            )
            disks = time.perf_counter() - t0
            await cache.close()
            return download, disks

    storms: list[float] = []
    parts: list[tuple[float, float]] = []
    for r in range(7):
        hits = handler.hits
        # Alternate which goes first; pair within the round (the machine's load drifts).
        for kind in ("storm", "separately") if r % 2 else ("separately", "storm"):
            if kind == "storm":
                storms.append(asyncio.run(storm(tmp_path / f"storm-{r}")))
            else:
                parts.append(asyncio.run(separately(tmp_path / f"sep-{r}")))
        assert handler.hits == hits + 2  # one download each
        shutil.rmtree(tmp_path / f"storm-{r}")
        shutil.rmtree(tmp_path / f"sep-{r}")
    state = iter(range(100))
    benchmark.pedantic(  # type: ignore[attr-defined]
        lambda: asyncio.run(storm(tmp_path / f"b-{next(state)}")), rounds=1, iterations=1
    )
    t_storm = statistics.median(storms)
    t_download = statistics.median(p[0] for p in parts)
    t_disks = statistics.median(p[1] for p in parts)
    ratio = statistics.median(s / (d + k) for s, (d, k) in zip(storms, parts, strict=True))
    print(f"\nstorm of {spawns}: {t_storm * 1000:.0f} ms; download {t_download * 1000:.0f} ms + "
          f"{spawns} disks {t_disks * 1000:.0f} ms (medians); paired ratio {ratio:.2f} "
          "(gate <= 1.2)")
    assert ratio <= 1.2


# ---- the storm through the whole agent ----------------------------------------------------


async def _spawn_all(endpoint: str, url: str, n: int, tag: str) -> float:
    async with AsyncClient(endpoint, timeout_s=300) as c:
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(
            c.call("instance.spawn", {
                "name": f"{tag}{i}", "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
                "image": {"url": url}, "wait": True,
            })
            for i in range(n)
        ))
        took = time.perf_counter() - t0
        assert all(r["vm_state"] == "active" for r in recs), [r for r in recs if r["vm_state"] != "active"][:1]
        await asyncio.gather(*(c.call("instance.delete", {"uuid": r["uuid"]}) for r in recs))
        return took


def test_agent_storm_of_one_uncached_image(
    benchmark: Any, make_agent: Any, tmp_path: Path, http_image: tuple[str, type[_Counting]]
) -> None:
    """200 spawns of one uncached 64 MiB image on the embedded hypervisor: one download, and
    at most the download time plus 200 spawns of a cached image, plus 20%."""
    url, handler = http_image
    spawns = 200
    uri = write_test_host(tmp_path / "host.xml", cores=64, memory_gib=1024)
    agent = make_agent(config="[resources]\ndisk_gb = 1000000\n", hypervisor=uri)
    warm = f"{url}?warm"
    asyncio.run(_spawn_all(agent.control, warm, 1, "w"))
    storms: list[float] = []
    downloads: list[float] = []
    cached: list[float] = []
    for r in range(5):
        hits = handler.hits
        downloads.append(asyncio.run(_spawn_all(agent.control, f"{url}?one-{r}", 1, f"d{r}-")))
        # Alternate which storm goes first: a storm of 200 on 2 shared cores varies by 50%.
        for kind in ("cached", "storm") if r % 2 else ("storm", "cached"):
            if kind == "cached":
                cached.append(asyncio.run(_spawn_all(agent.control, warm, spawns, f"c{r}-")))
            else:
                storms.append(
                    asyncio.run(_spawn_all(agent.control, f"{url}?storm-{r}", spawns, f"s{r}-"))
                )
        assert handler.hits == hits + 2  # one download for the single spawn, one for the storm
    benchmark.pedantic(  # type: ignore[attr-defined]
        lambda: asyncio.run(_spawn_all(agent.control, f"{url}?bench", spawns, "b")),
        rounds=1, iterations=1,
    )
    t_storm, t_dl, t_cached = (statistics.median(x) for x in (storms, downloads, cached))
    # Paired per round, then the median: the machine's load drifts between rounds.
    ratio = statistics.median(s / (d + c) for s, d, c in zip(storms, downloads, cached, strict=True))
    print("\nrounds (ms): storm", [round(x * 1000) for x in storms], "download",
          [round(x * 1000) for x in downloads], "cached", [round(x * 1000) for x in cached])
    print(f"agent storm of {spawns} on one uncached 64 MiB image: {t_storm * 1000:.0f} ms; "
          f"one download+spawn {t_dl * 1000:.0f} ms + {spawns} spawns of a cached image "
          f"{t_cached * 1000:.0f} ms; paired ratio {ratio:.2f} (gate <= 1.2)")
    assert ratio <= 1.2
