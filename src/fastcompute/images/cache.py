"""Images: sources, the verified single-flight base cache, inspection and instance disks.

A boot storm is mostly an image problem: a hundred spawns of one new image must cost one
download, one verification and a hundred cheap disks. :class:`ImageCache` keeps base images
under ``state_dir/_base``; each is fetched once (concurrent callers wait on the one fetch in
flight), verified against the checksums that came with it, inspected from its bytes, stored
raw, and only then renamed into place, so a crash never leaves a half image that looks whole.
Instance disks live at ``state_dir/instances/<uuid>/disk``: a qcow2 overlay written by the
agent itself (``cow``), or a private sparse copy made by the Cython copier (``flat``). Fetching
lives in :mod:`fastcompute.images.sources` (a module per scheme), formats and overlays in
:mod:`fastcompute.images.formats`. A source URL's credentials (``user:password@``, a signed
query string) are used to fetch it and nowhere else: logs, messages and the side files below
show it redacted.

Layout of the cache, per base ``<key>`` (a digest of its source)::

    _base/<key>          the raw image, complete and verified
    _base/<key>.json     what it is: source (redacted), digests of the fetched bytes, format, sizes;
                         its mtime is the base's last use
    _base/.tmp-*         fetches in progress (removed at start-up: a crash leftover)
    instances/<uuid>/disk       the instance disk
    instances/<uuid>/disk.info  which base the disk was made from (the cache's "users")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import logging
import os
import secrets
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from fastcompute.config import ImagesConfig
from fastcompute.errors import BadRequest, Conflict, ImageError
from fastcompute.images import disks, formats
from fastcompute.images.formats import FormatError, inspect
from fastcompute.images.sources import (
    Sources,
    allowed,
    glance_expectations,
    hash_file,
    human,
    redact,
)
from fastcompute.images.sources.glance import GlanceSource
from fastcompute.workers import Workers

log = logging.getLogger(__name__)

GiB = 1 << 30
Progress = Callable[[str, int, int | None], None]
"""``progress(stage, done_bytes, total_bytes_or_None)``; stages: download, convert, copy."""

_TMP_PREFIX = ".tmp-"


class ImageSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Where an instance's image comes from, as the spawn request gave it.

    ``id`` names an image of the configured Image service (Glance); ``url`` is a ``file://``,
    ``http://`` or ``https://`` source. ``checksum`` (``sha256:<hex>`` or ``sha512:<hex>``) is
    checked against the fetched bytes. ``disk_format`` is what the requester claims (``raw``
    or ``qcow2``); when given it must match what the bytes say.
    """

    id: str | None = None
    url: str | None = None
    checksum: str | None = None
    disk_format: str | None = None


class BaseInfo(msgspec.Struct, kw_only=True):
    """One cached base image, as ``fastcompute images`` lists it."""

    key: str
    source: str
    format: str
    size: int
    allocated: int
    virtual_size: int
    fetched_at: float
    last_used: float
    age_s: float
    users: list[str]


class _Meta(msgspec.Struct, kw_only=True):
    """The sidecar of a base: written before the base is renamed into place."""

    source: str
    format: str
    virtual_size: int
    fetched_bytes: int
    digests: dict[str, str]
    fetched_at: float


class _DiskInfo(msgspec.Struct, kw_only=True):
    base: str
    mode: str


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``sha256:<hex>`` / ``sha512:<hex>`` into ``(algo, hex)``; BadRequest otherwise."""
    algo, sep, value = checksum.partition(":")
    algo = algo.lower()
    value = value.lower()
    lengths = {"sha256": 64, "sha512": 128}
    if not sep or algo not in lengths:
        raise BadRequest(f"image checksum must be sha256:<hex> or sha512:<hex>, not {checksum!r}")
    if len(value) != lengths[algo] or any(c not in "0123456789abcdef" for c in value):
        raise BadRequest(f"image checksum {checksum!r} is not a {algo} hex digest")
    return algo, value


def check_url(url: str) -> None:
    """Refuse an image URL this cache cannot fetch: a scheme other than ``file``, ``http`` or
    ``https``, an http(s) URL without a host, or a port outside 1-65535. BadRequest otherwise."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # an unclosed IPv6 bracket, for one
        raise BadRequest(f"image url: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("file", "http", "https"):
        raise BadRequest(f"image url scheme {scheme!r} is not supported: use file, http or https")
    if scheme == "file":
        return
    try:
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"image url port: {exc}") from None
    if not parts.hostname:
        raise BadRequest("an http(s) image url needs a host")
    if port == 0:
        raise BadRequest("image url port 0 is not a port a server listens on")


@dataclass(slots=True)
class _Flight:
    """One fetch in progress; callers of the same image subscribe to its progress."""

    task: asyncio.Task[_Meta] | None = None
    listeners: list[Progress] = field(default_factory=list)
    waiters: int = 0

    def report(self, stage: str, done: int, total: int | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(stage, done, total)
            except Exception:  # a broken listener must not fail everybody's download
                log.exception("image progress listener failed")


class ImageCache:
    """The base-image cache of one agent and the instance disks made from it."""

    def __init__(
        self,
        state_dir: Path,
        cfg: ImagesConfig,
        executor: concurrent.futures.Executor,
    ) -> None:
        if cfg.disk_mode not in ("cow", "flat"):
            raise ValueError(f"[images] disk_mode must be cow or flat, not {cfg.disk_mode!r}")
        self.cfg = cfg
        self.base_dir = Path(state_dir) / "_base"
        self.instances_dir = Path(state_dir) / "instances"
        self._executor = executor
        # Instance disks are made and removed in a boot storm by the thousand: batched workers
        # hand results back in one loop wake-up per batch, where an executor costs a future
        # chain and a wake-up per call. Few threads: each syscall of an overlay's making hands
        # the interpreter lock back and forth, and a storm of 1,000 ran ~5% slower with 4
        # threads than with 2 (the work is short; a flat-mode copy is bound by the disk).
        self._disks = Workers(max(1, cfg.disk_threads), "disk")
        self._flights: dict[str, _Flight] = {}
        self._pins: dict[str, int] = {}
        self._uses: dict[str, int] = {}
        self._pruning: dict[str, asyncio.Future[None]] = {}
        self._digest_locks: dict[str, asyncio.Lock] = {}
        # Bases known to be in place: a spawn of a cached image then needs no disk look-up
        # (_make_disk checks the base still exists, in the worker it runs in anyway).
        self._known: dict[str, _Meta] = {}
        self.on_lookup: Callable[[bool], object] | None = None
        """Told of every base look-up: True when it needed no fetch of its own (a cache hit)."""
        self._sources = Sources(cfg, executor)
        # Flights their last caller left (a delete, a cancelled spawn): being stopped.
        self._abandoned: set[asyncio.Task[_Meta]] = set()
        self._closed = False
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    # ---- public API -------------------------------------------------------------------

    def glance(self) -> GlanceSource:
        """The configured Image service, for images made here (snapshots)."""
        return self._sources.glance

    @property
    def executor(self) -> concurrent.futures.Executor:
        """The worker threads of the cache's file work."""
        return self._executor

    def disk_format(self) -> str:
        """The format of the instance disks this cache makes (qcow2 overlays or raw copies)."""
        return "qcow2" if self.cfg.disk_mode == "cow" else "raw"

    async def prepare_disk(
        self,
        instance_uuid: str,
        image: ImageSpec,
        disk_gb: int,
        progress: Progress | None = None,
        role: str = "root",
        beside: Callable[[Path], object] | None = None,
    ) -> Path:
        """Make ``instance_uuid``'s disk of ``role`` (its root disk unless said) from ``image``,
        sized ``disk_gb`` GiB; return its path.

        ``beside`` makes the instance's other files (its config drive), given the instance's
        directory: in the worker job that makes the disk, after it, so that a build's files
        cost one hand-off to a thread.

        The base is fetched and verified once however many callers ask at the same time.
        ``disk_gb`` 0 means the image's own virtual size. Raises :class:`ImageError` (or
        :class:`BadRequest` for a malformed spec, :class:`Conflict` if the disk exists);
        on failure no base and no instance disk is left behind.
        """
        key, source = self._source_key(image)
        if image.checksum:
            parse_checksum(image.checksum)  # malformed: BadRequest before any work
        with self._pinned(key):
            try:
                return await self._prepare(instance_uuid, key, source, image, disk_gb, progress, role, beside)
            except _BaseVanished:
                # Removed behind the cache's back since it was last seen: fetch it again, once.
                self._known.pop(key, None)
                try:
                    return await self._prepare(instance_uuid, key, source, image, disk_gb, progress, role, beside)
                except _BaseVanished:
                    raise ImageError(
                        f"the cached base of image {source} keeps disappearing"
                    ) from None

    async def fetch_base(
        self,
        image: ImageSpec,
        disk_gb: int,
        progress: Progress | None = None,
        *,
        token: str | None = None,
    ) -> None:
        """Have ``image``'s base cached and verified, fetching it if needed; make no disk.

        A build calls this before it takes a build slot, so that a slow download holds no
        slot a spawn of a cached image needs. Fetching stops at ``disk_gb`` GiB (0: at
        ``[images] max_image_bytes``). ``token`` is the requesting tenant's Glance token: an
        image given by id is then looked up with it, cached or not, so that the Image service
        decides whether this tenant may use it. Cancelling the caller stops the download when
        no other caller waits for it.
        """
        key, source = self._source_key(image)
        if image.checksum:
            parse_checksum(image.checksum)
        if token and image.id is not None:
            await self._sources.glance.meta(image.id, token)
        with self._pinned(key):
            await self._ensure_base(key, source, image, progress, self._fetch_limit(disk_gb), token)

    def is_cached(self, image: ImageSpec) -> bool:
        """Whether ``image``'s base is cached and verified already (``fetch_base`` would fetch
        nothing); a malformed spec is not, and ``fetch_base`` then raises its error."""
        try:
            key, _ = self._source_key(image)
        except (BadRequest, ImageError):
            return False
        return key in self._known and key not in self._pruning

    @contextlib.contextmanager
    def _pinned(self, key: str) -> Iterator[None]:
        self._pins[key] = self._pins.get(key, 0) + 1
        self._uses[key] = self._uses.get(key, 0) + 1
        try:
            yield
        finally:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]

    def _fetch_limit(self, disk_gb: int) -> int:
        """The most bytes a fetch for a ``disk_gb`` GiB disk takes before it stops."""
        if disk_gb <= 0:
            return self.cfg.max_image_bytes
        disk = disk_gb * GiB
        # A qcow2 file holds its tables besides the guest's data (under 0.1% with 64 KiB
        # clusters): a qcow2 image that fits the disk must not be cut short for them.
        return min(self.cfg.max_image_bytes, disk + disk // 256 + (1 << 20))

    async def _prepare(
        self,
        instance_uuid: str,
        key: str,
        source: str,
        image: ImageSpec,
        disk_gb: int,
        progress: Progress | None,
        role: str,
        beside: Callable[[Path], object] | None,
    ) -> Path:
        want = parse_checksum(image.checksum) if image.checksum else None
        meta = await self._ensure_base(key, source, image, progress, self._fetch_limit(disk_gb))
        if want is not None and want[0] not in meta.digests:
            meta = await self._add_digest(key, source, meta, want[0])
        if want is not None and meta.digests.get(want[0]) != want[1]:
            raise ImageError(
                f"image {source} does not match the requested checksum: {want[0]} is "
                f"{meta.digests.get(want[0])}, the request says {want[1]}",
                {"source": source},
            )
        # Whole sectors: a guest disk cannot end mid-sector (an odd-sized raw image can).
        size = disk_gb * GiB if disk_gb > 0 else -(-meta.virtual_size // 512) * 512
        if meta.virtual_size > size:
            raise ImageError(
                f"image {source} has a virtual size of {human(meta.virtual_size)}, larger "
                f"than the flavor's {disk_gb} GiB disk: choose a flavor with at least "
                f"{-(-meta.virtual_size // GiB)} GiB",
                {"virtual_size": meta.virtual_size, "disk_gb": disk_gb},
            )
        loop = asyncio.get_running_loop()
        copy_progress: Callable[[int, int], object] | None = None
        if progress is not None:
            cb = progress

            def copy_progress(done: int, total: int) -> None:
                loop.call_soon_threadsafe(cb, "copy", done, total)

        made = self._disks.run(self._make_disk, instance_uuid, key, size, copy_progress, role, beside)
        try:
            return await asyncio.shield(made)
        except asyncio.CancelledError:
            # The thread cannot be stopped mid-copy: let it finish, then take back the disk
            # it made, so a cancelled spawn leaves nothing behind either.
            with contextlib.suppress(Exception):
                await made
                if role == "root":
                    await self._disks.run(disks.remove_files, self._instance_dir(instance_uuid))
                else:
                    await self.remove_role_disk(instance_uuid, role)
            raise

    async def adopt_disk(self, instance_uuid: str, image: ImageSpec, disk_gb: int) -> None:
        """Make a root disk copied from another host this host's own: its image's base cached
        here (fetched if need be), an overlay pointed at it, the disk grown to ``disk_gb``."""
        key, source = self._source_key(image)
        with self._pinned(key):
            if self.cfg.disk_mode == "cow":
                await self._ensure_base(key, source, image, None, self._fetch_limit(disk_gb))
            await self._disks.run(self._adopt, instance_uuid, key, disk_gb * GiB)

    def _adopt(self, instance_uuid: str, key: str, size: int) -> None:
        idir = self._instance_dir(instance_uuid)
        disk = disks.path(idir, "root")
        (idir / disks.INFO).write_bytes(msgspec.json.encode(_DiskInfo(base=key, mode=self.cfg.disk_mode)))
        try:
            if self.cfg.disk_mode == "cow":
                formats.adopt_overlay(disk, str(self.base_dir / key), size)
            elif size > disk.stat().st_size:
                os.truncate(disk, size)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot take over the disk of instance {instance_uuid}: {exc}") from exc

    async def remove_disk(self, instance_uuid: str) -> None:
        """Remove an instance's directory: its disk, the disk's record and whatever else the
        instance left there (a console log); nothing happens if there is none."""
        await self._disks.run(shutil.rmtree, self._instance_dir(instance_uuid), True)

    async def remove_role_disk(self, instance_uuid: str, role: str) -> None:
        """Remove an instance's disk of ``role`` and its record; nothing happens if there is none."""
        await self._disks.run(disks.remove, self._instance_dir(instance_uuid), role)

    async def promote_disk(self, instance_uuid: str, made: str, role: str) -> bool:
        """Make an instance's disk of role ``made`` its disk of ``role``, the old one gone
        (:func:`disks.promote`); False if there is no disk of ``made``."""
        return await self._disks.run(disks.promote, self._instance_dir(instance_uuid), made, role)

    def list_bases(self) -> list[BaseInfo]:
        """The cached bases with size, age and the instances using them (blocking: reads disk)."""
        users = self._scan_users()
        now = time.time()
        out = []
        for key in sorted(self._base_keys()):
            base = self.base_dir / key
            sidecar = self.base_dir / f"{key}.json"
            try:
                st = base.stat()
                meta = msgspec.json.decode(sidecar.read_bytes(), type=_Meta)
                last_used = sidecar.stat().st_mtime
            except (OSError, msgspec.DecodeError):
                continue
            out.append(
                BaseInfo(
                    key=key,
                    source=meta.source,
                    format=meta.format,
                    size=st.st_size,
                    allocated=st.st_blocks * 512,
                    virtual_size=meta.virtual_size,
                    fetched_at=meta.fetched_at,
                    last_used=last_used,
                    age_s=max(0.0, now - last_used),
                    users=sorted(users.get(key, [])),
                )
            )
        return out

    async def prune(self, max_age_s: float | None = None) -> list[str]:
        """Remove bases unused by any instance for ``max_age_s`` (default: the config's).

        A base with an instance disk made from it, or with a spawn or fetch in progress, is
        never removed. Returns the keys removed.
        """
        age = self.cfg.cache_max_age_s if max_age_s is None else max_age_s
        loop = asyncio.get_running_loop()
        uses_before = dict(self._uses)
        bases = await loop.run_in_executor(self._executor, self.list_bases)
        removed = []
        for b in bases:
            key = b.key
            if b.users or b.age_s < age or key in self._flights or self._pins.get(key):
                continue
            if self._uses.get(key) != uses_before.get(key) or key in self._pruning:
                # A spawn used it while we were scanning: its disk may not have been seen.
                continue
            done: asyncio.Future[None] = loop.create_future()
            self._pruning[key] = done
            self._known.pop(key, None)
            try:
                await loop.run_in_executor(self._executor, self._delete_base, key)
                removed.append(key)
                log.info(
                    "image cache: removed base %s (%s), unused for %.0f s",
                    key, b.source, b.age_s,
                )
            finally:
                del self._pruning[key]
                done.set_result(None)
        return removed

    async def run_cleaner(self, stop: asyncio.Event) -> None:
        """Prune the cache every ``cleaner_interval_s`` until ``stop`` is set."""
        interval = self.cfg.cleaner_interval_s
        if interval <= 0:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await self.prune()
            except Exception:  # the cleaner must outlive one bad pass
                log.exception("image cache cleaner failed")

    async def close(self) -> None:
        """Abandon fetches in flight (their temporary files are removed) and close clients."""
        self._closed = True
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        tasks += self._abandoned
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._sources.close()
        self._disks.shutdown()

    # ---- the base: single flight ------------------------------------------------------

    def _source_key(self, image: ImageSpec) -> tuple[str, str]:
        if image.disk_format is not None and image.disk_format not in ("raw", "qcow2"):
            raise ImageError(
                f"image disk_format {image.disk_format!r} is not supported: use raw or qcow2"
            )
        if image.id is not None:
            if not self.cfg.glance_endpoint:
                raise ImageError(
                    "the image is given by id but no Image service is configured "
                    "([images] glance_endpoint)"
                )
            source = f"glance:{self.cfg.glance_endpoint.rstrip('/')}/v2/images/{image.id}"
        elif image.url is not None:
            check_url(image.url)
            if not image.url.lower().startswith("file:") and not allowed(image.url, self.cfg.http_sources):
                # Before the cache is looked at: a base fetched while the URL was allowed
                # is not served once it no longer is.
                raise ImageError(
                    f"image {redact(image.url)} is not under the http(s) sources this agent "
                    "fetches from ([images] http_sources; empty = none)",
                    {"source": redact(image.url)},
                )
            source = image.url
        else:
            raise BadRequest("image needs an id or a url")
        # The key is a digest of the whole URL (two signed URLs of one object are two bases);
        # what the cache shows and writes down is the URL without its credentials.
        return hashlib.sha256(source.encode()).hexdigest()[:40], redact(source)

    async def _ensure_base(
        self,
        key: str,
        source: str,
        image: ImageSpec,
        progress: Progress | None,
        limit: int,
        token: str | None = None,
    ) -> _Meta:
        while True:
            while key in self._pruning:
                await self._pruning[key]
            known = self._known.get(key)
            if known is not None:
                meta = known
                self._count_lookup(True)
                break
            flight = self._flights.get(key)
            if flight is not None:
                self._count_lookup(True)
            else:
                # The flight covers looking on disk too: a hundred callers arriving together
                # cost one look-up and at most one fetch.
                flight = _Flight()
                self._flights[key] = flight
                flight.task = asyncio.create_task(
                    self._load(key, source, image, flight, limit, token)
                )
                flight.task.add_done_callback(functools.partial(self._landed, key, flight))
            if progress is not None:
                flight.listeners.append(progress)
            assert flight.task is not None
            flight.waiters += 1
            try:
                meta = await asyncio.shield(flight.task)
                break
            except _RequestRefused as exc:
                if exc.expects == _expectations(image, limit):
                    raise
                # Another caller's checksum, claim or size was refused, not this image's
                # for this caller: fetch again.
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if self._closed or not flight.task.cancelled() or me is None or me.cancelling():
                    raise
                # Joined a flight its other callers had just left: start one of our own.
            finally:
                flight.waiters -= 1
                if progress is not None:
                    with contextlib.suppress(ValueError):
                        flight.listeners.remove(progress)
                if not flight.waiters and not flight.task.done():
                    self._abandon(key, flight)
        if image.disk_format is not None and image.disk_format != meta.format:
            raise _claim_error(source, image.disk_format, meta.format)
        return meta

    def _landed(self, key: str, flight: _Flight, _task: object) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _abandon(self, key: str, flight: _Flight) -> None:
        """Stop a fetch no caller waits for any more (its spawns were deleted or cancelled)."""
        assert flight.task is not None
        log.info("image cache: nobody waits for %s any more; stopping its fetch", key)
        flight.task.cancel()
        self._landed(key, flight, None)
        self._abandoned.add(flight.task)
        flight.task.add_done_callback(self._abandoned.discard)

    async def _load(
        self,
        key: str,
        source: str,
        image: ImageSpec,
        flight: _Flight,
        limit: int,
        token: str | None,
    ) -> _Meta:
        loop = asyncio.get_running_loop()
        meta = await loop.run_in_executor(self._executor, self._read_meta, key)
        self._count_lookup(meta is not None)
        if meta is None:
            try:
                meta = await self._fetch(key, source, image, flight, limit, token)
            except ImageError as exc:
                if (
                    not isinstance(exc, _RequestRefused)
                    and limit < self.cfg.max_image_bytes
                    and "limit" in (exc.details or {})
                ):
                    # Too large for this caller's flavor, maybe not for another's.
                    raise _RequestRefused(image, limit, exc.message, exc.details) from None
                raise
        self._known[key] = meta
        return meta

    def _count_lookup(self, hit: bool) -> None:
        if self.on_lookup is not None:
            self.on_lookup(hit)

    async def _fetch(
        self,
        key: str,
        source: str,
        image: ImageSpec,
        flight: _Flight,
        limit: int,
        token: str | None,
    ) -> _Meta:
        loop = asyncio.get_running_loop()
        tmp = self.base_dir / f"{_TMP_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"
        expected: dict[str, str] = {}
        claimed: str | None = None
        wanted = {parse_checksum(image.checksum)[0]} if image.checksum else set()
        started = time.monotonic()
        log.info("image cache: fetching %s", source)
        try:
            if image.id is not None:
                glance = self._sources.glance
                info = await glance.meta(image.id, token)
                expected, claimed = glance_expectations(info, limit)
                if image.disk_format is not None and image.disk_format != claimed:
                    raise _RequestRefused(
                        image,
                        limit,
                        f"image {image.id} is {claimed} in the Image service but the request "
                        f"says {image.disk_format}",
                    )
                digests, fetched = await self._sources.http.download(
                    glance.url(image.id, "/file"), glance.headers(token), tmp,
                    {*expected, *wanted}, flight.report, limit,
                    also_allowed=(self.cfg.glance_endpoint,),
                )
            else:
                assert image.url is not None
                fetch = (self._sources.file.fetch if source.startswith("file:")
                         else functools.partial(self._sources.http.download, headers={}))
                digests, fetched = await fetch(
                    image.url, tmp=tmp, algos=wanted, report=flight.report, limit=limit
                )
            for algo, value in expected.items():
                if digests.get(algo) != value:
                    raise ImageError(
                        f"image {source} failed verification: its {algo} is {digests.get(algo)}, "
                        f"the Image service says {value}; the download was discarded",
                        {"source": source},
                    )
            try:
                fmt = await loop.run_in_executor(self._executor, inspect, tmp)
            except FormatError as exc:
                raise ImageError(f"image {source} refused: {exc}", {"source": source}) from exc
            if claimed is not None and claimed != fmt.format:
                raise _claim_error(source, claimed, fmt.format)
            # The request's own expectations come last: when they fail, the caller that started
            # the fetch is refused and the bytes discarded, and the callers waiting on the same
            # image with other expectations fetch it again (see _ensure_base).
            if image.checksum:
                algo, value = parse_checksum(image.checksum)
                if digests[algo] != value:
                    raise _RequestRefused(
                        image,
                        limit,
                        f"image {source} does not match the requested checksum: {algo} is "
                        f"{digests[algo]}, the request says {value}; the download was discarded",
                        {"source": source},
                    )
            if image.disk_format is not None and image.disk_format != fmt.format:
                err = _claim_error(source, image.disk_format, fmt.format)
                raise _RequestRefused(image, limit, err.message, err.details)
            if fmt.virtual_size > self.cfg.max_image_bytes:
                raise ImageError(
                    f"image {source} has a virtual size of {human(fmt.virtual_size)}, above the "
                    f"limit of {human(self.cfg.max_image_bytes)} ([images] max_image_bytes)"
                )
            if fmt.format == "qcow2":
                await self._convert_to_raw(tmp, source, fmt.virtual_size, flight)
            meta = _Meta(
                source=source,
                format=fmt.format,
                virtual_size=fmt.virtual_size,
                fetched_bytes=fetched,
                digests=digests,
                fetched_at=time.time(),
            )
            await loop.run_in_executor(self._executor, self._commit_base, key, tmp, meta)
        except BaseException:
            for path in (tmp, tmp.with_name(tmp.name + ".raw")):
                await loop.run_in_executor(self._executor, _unlink_quietly, path)
            raise
        log.info(
            "image cache: %s ready as %s (%s fetched in %.1f s)",
            source, key, human(fetched), time.monotonic() - started,
        )
        return meta

    async def _add_digest(self, key: str, source: str, meta: _Meta, algo: str) -> _Meta:
        """Hash a cached raw base for a digest not computed when it was fetched."""
        lock = self._digest_locks.setdefault(key, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            fresh = await loop.run_in_executor(self._executor, self._read_meta, key)
            if fresh is not None and algo in fresh.digests:
                return fresh
            if meta.format != "raw":
                raise ImageError(
                    f"the cached image {source} has no {algo} digest to check the request's "
                    "checksum against; prune it (fastcompute images --prune) to fetch it again"
                )
            digest = await loop.run_in_executor(
                self._executor, hash_file, self.base_dir / key, {algo}
            )
            meta = msgspec.structs.replace(meta, digests={**meta.digests, **digest})
            await loop.run_in_executor(
                self._executor, _write_atomic, self.base_dir / f"{key}.json",
                msgspec.json.encode(meta),
            )
            self._known[key] = meta
            return meta

    # ---- conversion, commit, disks (worker threads) -----------------------------------

    async def _convert_to_raw(
        self, tmp: Path, source: str, virtual_size: int, flight: _Flight
    ) -> None:
        # Bases are kept raw (Nova's force_raw_images): overlays and flat copies then only
        # ever see one format, and qemu never parses a downloaded qcow2 at guest run time.
        # The header was checked first, so qemu-img follows no backing or data file.
        raw = tmp.with_name(tmp.name + ".raw")
        flight.report("convert", 0, virtual_size)
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(tmp), str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise ImageError(
                f"image {source} is not a valid qcow2 image: "
                f"{err.decode(errors='replace').strip()[-300:]}"
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _fsync_replace, raw, tmp)
        flight.report("convert", virtual_size, virtual_size)

    def _commit_base(self, key: str, tmp: Path, meta: _Meta) -> None:
        # The sidecar goes first: a base file exists only with its description beside it.
        sidecar = self.base_dir / f"{key}.json"
        _write_atomic(sidecar, msgspec.json.encode(meta))
        os.rename(tmp, self.base_dir / key)
        _fsync_dir(self.base_dir)

    def _read_meta(self, key: str) -> _Meta | None:
        if not (self.base_dir / key).exists():
            return None
        try:
            return msgspec.json.decode((self.base_dir / f"{key}.json").read_bytes(), type=_Meta)
        except (OSError, msgspec.DecodeError):
            return None

    def _instance_dir(self, instance_uuid: str) -> Path:
        if not instance_uuid or "/" in instance_uuid or instance_uuid.startswith("."):
            raise BadRequest(f"invalid instance uuid {instance_uuid!r}")
        return self.instances_dir / instance_uuid

    def _make_disk(
        self,
        instance_uuid: str,
        key: str,
        size: int,
        progress: Callable[[int, int], object] | None,
        role: str,
        beside: Callable[[Path], object] | None,
    ) -> Path:
        idir = self._instance_dir(instance_uuid)
        idir.mkdir(parents=True, exist_ok=True)
        disk = disks.path(idir, role)
        info = disks.info_path(idir, role)
        base = self.base_dir / key
        if disk.exists():
            raise Conflict(f"instance {instance_uuid} already has a disk at {disk}")
        if not base.exists():
            raise _BaseVanished(key)
        # The record goes first, so that the cleaner never sees a disk whose base looks unused.
        info.write_bytes(msgspec.json.encode(_DiskInfo(base=key, mode=self.cfg.disk_mode)))
        try:
            with contextlib.suppress(OSError):
                os.utime(self.base_dir / f"{key}.json")
            disks.make_from_base(disk, size, base, self.cfg.disk_mode, progress)
            if beside is not None:
                beside(idir)
        except OSError as exc:
            self._unmake(idir, role)
            raise ImageError(f"cannot create the {role} disk of instance {instance_uuid}: {exc}") from exc
        except BaseException:
            self._unmake(idir, role)
            raise
        return disk

    @staticmethod
    def _unmake(idir: Path, role: str) -> None:
        # A failed root disk is a failed spawn: nothing of the instance stays. A disk of
        # another role is made beside an instance that lives on.
        if role == "root":
            disks.remove_files(idir)
        else:
            disks.remove(idir, role)

    def _delete_base(self, key: str) -> None:
        _unlink_quietly(self.base_dir / key)
        _unlink_quietly(self.base_dir / f"{key}.json")
        _fsync_dir(self.base_dir)

    def _base_keys(self) -> list[str]:
        try:
            names = os.listdir(self.base_dir)
        except FileNotFoundError:
            return []
        return [n for n in names if not n.startswith(".") and not n.endswith(".json")]

    def _scan_users(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        try:
            entries = os.listdir(self.instances_dir)
        except FileNotFoundError:
            return users
        made = [role for role, r in disks.ROLES.items() if r.file is not None and r.format is None]
        for name in entries:
            for role in made:
                try:
                    raw = disks.info_path(self.instances_dir / name, role).read_bytes()
                    info = msgspec.json.decode(raw, type=_DiskInfo)
                except (OSError, msgspec.DecodeError):
                    continue
                if name not in users.setdefault(info.base, []):
                    users[info.base].append(name)
        return users

    def _remove_leftovers(self) -> None:
        # A crash mid-fetch leaves .tmp-* files (never mistaken for bases, but wasted space),
        # and a crash between the sidecar and the rename leaves a sidecar without a base.
        for name in os.listdir(self.base_dir):
            path = self.base_dir / name
            if name.startswith(_TMP_PREFIX):
                log.info("image cache: removing %s left by an interrupted fetch", name)
                _unlink_quietly(path)
            elif name.endswith(".json") and not (self.base_dir / name[: -len(".json")]).exists():
                _unlink_quietly(path)


class _BaseVanished(Exception):
    """The base a disk was to be made from is no longer on disk."""


class _RequestRefused(ImageError):
    """The fetched image is fine but not what the request that started the fetch expects."""

    def __init__(
        self, image: ImageSpec, limit: int, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details)
        self.expects = _expectations(image, limit)


def _expectations(
    image: ImageSpec, limit: int
) -> tuple[tuple[str, str] | None, str | None, int]:
    return (parse_checksum(image.checksum) if image.checksum else None), image.disk_format, limit


def _claim_error(source: str, claimed: str, actual: str) -> ImageError:
    return ImageError(
        f"image {source} claims to be {claimed} but its bytes are {actual}; it was refused "
        f"(a {actual} image served as {claimed} could expose host files or corrupt the guest)",
        {"source": source, "claimed": claimed, "detected": actual},
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _fsync_replace(src: Path, dst: Path) -> None:
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise


__all__ = ["BaseInfo", "ImageCache", "ImageSpec", "parse_checksum"]
