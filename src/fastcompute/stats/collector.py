"""Per-instance statistics: cgroup sampling, hypervisor domain stats, rates, and the collector.

Two sources give the same :class:`InstanceSample`, so callers do not care which one a guest
has: the compiled cgroup sampler (:class:`Sampler`, for QEMU guests whose cgroup is found with
:func:`cgroup_of_pid`) and the hypervisor driver's ``domain_stats`` (one call for every
domain; the only source for the embedded test hypervisor, which has no processes).
:class:`Rates` turns successive samples into CPU %, bytes/s and ops/s, and
:class:`StatsCollector` ties it together for the agent: each ``await collector.collect()``
follows the current instance set, samples everything in the executor, and returns one rate
record per instance, ready for ``host.stats`` and ``instance.stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict

import msgspec

from fastcompute import _core
from fastcompute.errors import HypervisorError, NotFound
from fastcompute.hypervisor.spec import DomainStats

log = logging.getLogger(__name__)

LIBVIRT = "libvirt"
"""Source of an instance whose stats come from the hypervisor driver (domain UUID = instance
UUID). ``"libvirt:{domain_uuid}"`` names a different domain UUID."""

COUNTERS = (*_core.CGROUP_SAMPLE_FIELDS, "net_rx_bytes", "net_tx_bytes")


class InstanceSample(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of one instance's counters; None where the source does not say.

    ``at`` is ``time.monotonic()`` at the read (for rates); CPU times are nanoseconds since the
    cgroup or domain started, memory figures bytes now (``memory_peak_bytes`` the high-water
    mark), I/O figures bytes and operations since start.
    """

    at: float
    source: str
    cpu_ns: int | None = None
    user_ns: int | None = None
    system_ns: int | None = None
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    swap_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    read_ops: int | None = None
    write_ops: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None


# ---------------------------------------------------------------------------------------------
# Where the cgroups are


@dataclass(frozen=True)
class CgroupLayout:
    """The host's cgroup mounts: v1 controller -> mount point, and the v2 (unified) mount."""

    v1: Mapping[str, str] = field(default_factory=dict)
    unified: str | None = None
    unified_controllers: frozenset[str] = frozenset()

    @property
    def version(self) -> str:
        """``v1``, ``v2`` or ``hybrid`` (v1 controllers beside a unified hierarchy)."""
        if self.v1 and self.unified:
            return "hybrid"
        return "v2" if self.unified else "v1"

    def mounts(self) -> Iterator[str]:
        """Every cgroup mount point, the unified one last."""
        yield from dict.fromkeys(self.v1.values())
        if self.unified:
            yield self.unified


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(path: str) -> str:
    # mountinfo escapes blanks, tabs, newlines and backslashes as \ooo
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), path)


_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio")


def detect_layout(mountinfo: str = "/proc/self/mountinfo") -> CgroupLayout:
    """Read the cgroup mounts of this process's mount namespace from ``mountinfo``."""
    v1: dict[str, str] = {}
    unified: str | None = None
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, opts = pre.split(), post.split()
            if len(fields) < 5 or len(opts) < 3 or fields[3] != "/":
                continue
            mountpoint = _unescape(fields[4])
            if opts[0] == "cgroup2" and unified is None:
                unified = mountpoint
            elif opts[0] == "cgroup":
                for opt in opts[2].split(","):
                    if opt in _V1_CONTROLLERS or opt.startswith("name="):
                        v1.setdefault(opt, mountpoint)
    controllers: frozenset[str] = frozenset()
    if unified:
        with contextlib.suppress(OSError):
            controllers = frozenset(Path(unified, "cgroup.controllers").read_text().split())
    return CgroupLayout(v1=v1, unified=unified, unified_controllers=controllers)


_layout_lock = threading.Lock()
_layout: CgroupLayout | None = None


def host_layout() -> CgroupLayout:
    """This host's layout, detected once."""
    global _layout
    with _layout_lock:
        if _layout is None:
            _layout = detect_layout()
        return _layout


@dataclass(frozen=True)
class CgroupPaths:
    """One cgroup's directories: v1 ``cpuacct``/``memory``/``blkio`` and the v2 ``unified`` one.

    For each of CPU, memory and I/O the v1 directory is read when given (the controller is
    mounted there), else the v2 one, whose files exist only for controllers enabled in v2.
    """

    cpuacct: str | None = None
    memory: str | None = None
    blkio: str | None = None
    unified: str | None = None

    def counts_cpu(self) -> bool:
        """Whether CPU time is read from this cgroup (v1 cpuacct, or v2 ``cpu.stat``)."""
        return bool(self.cpuacct) or (
            self.unified is not None and os.path.exists(os.path.join(self.unified, "cpu.stat"))
        )

    @property
    def key(self) -> str:
        """A stable name for the cgroup: its first directory."""
        for d in (self.unified, self.cpuacct, self.memory, self.blkio):
            if d:
                return d
        raise NotFound("empty cgroup paths")

    def stat_files(self) -> list[tuple[str, str]]:
        """``(file name, path)`` of the stats files to read, existing or not."""
        groups = (
            (self.cpuacct, ("cpuacct.usage", "cpuacct.stat"), ("cpu.stat",)),
            (
                self.memory,
                (
                    "memory.usage_in_bytes",
                    "memory.max_usage_in_bytes",
                    "memory.memsw.usage_in_bytes",
                ),
                ("memory.current", "memory.peak", "memory.swap.current"),
            ),
            (
                self.blkio,
                ("blkio.throttle.io_service_bytes", "blkio.throttle.io_serviced"),
                ("io.stat",),
            ),
        )
        files = []
        for v1_dir, v1_names, v2_names in groups:
            if v1_dir:
                files += [(n, os.path.join(v1_dir, n)) for n in v1_names]
            elif self.unified:
                files += [(n, os.path.join(self.unified, n)) for n in v2_names]
        return files

    @classmethod
    def from_dir(cls, path: str, layout: CgroupLayout | None = None) -> CgroupPaths:
        """The cgroup at ``path`` in every hierarchy where it exists.

        ``path`` is a directory under any cgroup mount (``/sys/fs/cgroup/memory/machine/x``,
        ``/sys/fs/cgroup/unified/x``, ``/sys/fs/cgroup/x``) or a cgroup path as in
        ``/proc/<pid>/cgroup`` (``/machine/x``). The same relative path is looked up under the
        other mounts, as libvirt and systemd create a guest's cgroup at the same place in each.
        """
        layout = layout or host_layout()
        path = os.path.normpath(path)
        rel = path
        for mount in sorted(layout.mounts(), key=len, reverse=True):
            if path == mount or path.startswith(mount + "/"):
                rel = path[len(mount):] or "/"
                break

        def at(mount: str | None) -> str | None:
            if mount is None:
                return None
            d = os.path.normpath(mount + "/" + rel.lstrip("/"))
            return d if os.path.isdir(d) else None

        paths = cls(
            cpuacct=at(layout.v1.get("cpuacct")),
            memory=at(layout.v1.get("memory")),
            blkio=at(layout.v1.get("blkio")),
            unified=at(layout.unified),
        )
        if paths == cls():
            raise NotFound(f"no cgroup {path}")
        return paths


Source = str | CgroupPaths
"""A guest's stats source: a cgroup (directory or :class:`CgroupPaths`) or :data:`LIBVIRT`."""


# libvirt puts a guest's vCPU and emulator threads in children of the guest's cgroup
_LIBVIRT_CHILDREN = ("emulator", "vcpu", "iothread")


def _guest_scope(path: str) -> str:
    head, _, last = path.rstrip("/").rpartition("/")
    if last.startswith(_LIBVIRT_CHILDREN) and (last == "emulator" or last[-1:].isdigit()):
        return head or "/"
    return path


def _proc_cgroups(pid: int | str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as ``{controller: path}``; the v2 hierarchy under ``""``."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NotFound(f"no process {pid}") from exc
    out: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for ctl in controllers.split(","):
            out[ctl] = path
    return out


def cgroup_of_pid(pid: int, layout: CgroupLayout | None = None) -> CgroupPaths:
    """The cgroup of a guest's QEMU process, from ``/proc/<pid>/cgroup``.

    libvirt moves the QEMU main thread into an ``emulator`` child of the guest's cgroup (and
    vCPU threads into ``vcpuN``); the guest's own cgroup, the parent, is returned, so that its
    counters cover every thread of the guest. A hierarchy where the process sits in the root
    or in the agent's own cgroup is left out: that cgroup is shared, its counters are not the
    guest's (libvirt skips controllers it cannot use, e.g. a cpuacct not co-mounted with cpu).
    NotFound when no hierarchy has a cgroup of the guest's own.
    """
    layout = layout or host_layout()
    theirs = _proc_cgroups(pid)
    mine = _proc_cgroups("self")
    dirs: dict[str, str] = {}
    for ctl, field_name, mount in (
        ("", "unified", layout.unified),
        ("cpuacct", "cpuacct", layout.v1.get("cpuacct")),
        ("memory", "memory", layout.v1.get("memory")),
        ("blkio", "blkio", layout.v1.get("blkio")),
    ):
        path = theirs.get(ctl)
        if mount is None or path is None or path == "/" or path == mine.get(ctl):
            continue
        dirs[field_name] = os.path.normpath(mount + "/" + _guest_scope(path).lstrip("/"))
    if not dirs:
        raise NotFound(f"process {pid} has no cgroup of its own")
    return CgroupPaths(**dirs)


def guest_source(guest_pid: Callable[[], int | None], mode: str = "auto") -> Source:
    """The stats source of a running guest, for ``StatsCollector``'s ``sources()``.

    ``guest_pid`` finds the pid of the guest's process (the driver's ``guest_pid``): None when
    the hypervisor runs guests without one (the test hypervisor), NotFound when it should have
    one but has not. ``mode`` is the ``[stats] source`` setting: ``libvirt`` gives
    :data:`LIBVIRT`; ``cgroup`` the cgroup of that process (NotFound when there is none);
    ``auto`` that cgroup when it counts the guest's CPU time, else :data:`LIBVIRT` (a host
    where libvirt could not give the guest its own CPU cgroup has no cgroup figure for CPU).
    A guest without a process of its own always gives :data:`LIBVIRT`. Resolve it again after
    every start or reboot: a new QEMU process may live in a new cgroup.
    """
    if mode == LIBVIRT:
        return LIBVIRT
    try:
        pid = guest_pid()
        if pid is None:
            return LIBVIRT
        paths = cgroup_of_pid(pid)
    except NotFound:
        if mode == "auto":
            return LIBVIRT
        raise
    if mode == "auto" and not paths.counts_cpu():
        return LIBVIRT
    return paths


# ---------------------------------------------------------------------------------------------
# The sampler


_NF = len(_core.CGROUP_SAMPLE_FIELDS)


class CgroupSnapshot(Mapping[str, InstanceSample]):
    """One ``Sampler.sample()``: compact rows, read as a mapping key -> :class:`InstanceSample`.

    ``names`` lists the cgroups read, ``data`` holds their numbers row by row (an
    ``array('q')``, ``CGROUP_SAMPLE_FIELDS`` order, -1 = unknown), ``vanished`` maps the keys
    of the cgroups that disappeared since the last sample to the errno their read gave; those
    were dropped from the sampler.
    """

    __slots__ = ("_index", "at", "data", "names", "vanished")

    def __init__(self, at: float, names: list[str], data: Any, vanished: dict[str, int]) -> None:
        self.at = at
        self.names = names
        self.data = data
        self.vanished = vanished
        self._index: dict[str, int] | None = None

    def row(self, i: int) -> tuple[int | None, ...]:
        """The numbers of the i-th cgroup, None where unknown."""
        return tuple(None if x < 0 else x for x in self.data[i * _NF:(i + 1) * _NF])

    def __getitem__(self, key: str) -> InstanceSample:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.names)}
        row = zip(_core.CGROUP_SAMPLE_FIELDS, self.row(self._index[key]), strict=True)
        return InstanceSample(at=self.at, source="cgroup", **dict(row))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


CgroupRef = str | CgroupPaths


class Sampler:
    """A set of cgroups whose stats files stay open, sampled together by the compiled core.

    ``Sampler(cgroup_dirs)`` opens each cgroup's files; ``add(dir)`` and ``remove(key)`` keep
    the set in step with the instances (a few ``open``/``close`` calls each); ``sample()``
    re-reads them all in one pass without the GIL. A cgroup that disappears is dropped and
    reported in ``CgroupSnapshot.vanished``; ``sample()`` does not raise for it. Safe to call
    from several threads (one lock; calls are serialised).
    """

    def __init__(
        self, cgroup_dirs: Iterable[CgroupRef] = (), *, layout: CgroupLayout | None = None
    ) -> None:
        self._layout = layout or host_layout()
        self._core = _core.CgroupSampler()
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._next = 1
        for d in cgroup_dirs:
            self.add(d)

    def add(self, cgroup: CgroupRef, key: str | None = None) -> str:
        """Start sampling a cgroup (a directory, a cgroup path or :class:`CgroupPaths`).

        Returns its key in the snapshots: ``key`` when given, else the directory as given (or
        ``CgroupPaths.key``). Raises :class:`NotFound` when the cgroup has no readable stats
        file and ``KeyError`` when the key is already sampled.
        """
        paths = (
            cgroup if isinstance(cgroup, CgroupPaths) else CgroupPaths.from_dir(cgroup, self._layout)
        )
        name = key if key is not None else (cgroup if isinstance(cgroup, str) else paths.key)
        fds: list[tuple[int, int]] = []
        try:
            for file_name, path in paths.stat_files():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                fds.append((_core.CGROUP_FILE_KINDS[file_name], fd))
            if not fds:
                raise NotFound(f"cgroup {name} has no stats files")
            with self._lock:
                if name in self._ids:
                    raise KeyError(f"cgroup {name} is already sampled")
                cid = self._next
                self._core.add(cid, fds)
                self._next += 1
                self._ids[name] = cid
                self._names[cid] = name
        except BaseException:
            for _, fd in fds:
                os.close(fd)
            raise
        return name

    def remove(self, key: str) -> bool:
        """Stop sampling a cgroup and close its files; False when it was not sampled."""
        with self._lock:
            cid = self._ids.pop(key, None)
            if cid is None:
                return False
            del self._names[cid]
            return bool(self._core.remove(cid))

    def sample(self) -> CgroupSnapshot:
        """Read every cgroup once (blocking: a few microseconds per cgroup)."""
        with self._lock:
            ids, values, gone = self._core.sample()
            at = time.monotonic()
            names = self._names
            keys = [names[i] for i in ids]
            vanished = {}
            for cid, err in gone:
                name = names.pop(cid)
                del self._ids[name]
                vanished[name] = err
        if vanished:
            log.info("cgroups vanished: %s", ", ".join(sorted(vanished)))
        return CgroupSnapshot(at, keys, values, vanished)

    def keys(self) -> list[str]:
        """The keys of the cgroups being sampled."""
        with self._lock:
            return list(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def close(self) -> None:
        """Close every file; the sampler is empty afterwards and may be reused."""
        with self._lock:
            self._core.close()
            self._ids.clear()
            self._names.clear()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Rates


class StatsRecord(TypedDict):
    """One instance's record in ``host.stats`` and ``instance.stats`` (docs/STATS.md): the
    sample's counters, then the rates since the previous sample; keys in wire order."""

    source: str
    at: float
    cpu_ns: int | None
    user_ns: int | None
    system_ns: int | None
    memory_bytes: int | None
    memory_peak_bytes: int | None
    swap_bytes: int | None
    read_bytes: int | None
    write_bytes: int | None
    read_ops: int | None
    write_ops: int | None
    net_rx_bytes: int | None
    net_tx_bytes: int | None
    interval_s: float | None
    cpu_pct: float | None
    cpu_user_pct: float | None
    cpu_system_pct: float | None
    read_bytes_per_s: float | None
    write_bytes_per_s: float | None
    read_ops_per_s: float | None
    write_ops_per_s: float | None
    net_rx_bytes_per_s: float | None
    net_tx_bytes_per_s: float | None


def _delta(new: int | None, old: int | None) -> int | None:
    # A counter that went backwards belongs to a new cgroup or domain: no rate this time.
    if new is None or old is None or new < old:
        return None
    return new - old


def _per_s(new: int | None, old: int | None, dt: float) -> float | None:
    d = _delta(new, old)
    return None if d is None else round(d / dt, 3)


def _pct(new_ns: int | None, old_ns: int | None, dt: float) -> float | None:
    # CPU time over the interval as a percentage of one CPU.
    d = _delta(new_ns, old_ns)
    return None if d is None else round(d / (dt * 1e9) * 100.0, 3)


class Rates:
    """Successive samples per key -> rate records.

    ``update(samples)`` returns, for every key in ``samples``, a :class:`StatsRecord` with the
    sample's counters and: ``cpu_pct`` (100 = one host CPU busy), ``cpu_user_pct``,
    ``cpu_system_pct``, ``*_per_s`` for I/O bytes and operations and network bytes,
    ``interval_s`` since that key's previous sample, and ``at`` (Unix time). Rates are None on
    a key's first sample. Keys absent from ``samples`` are forgotten.
    """

    def __init__(self) -> None:
        self._prev: dict[str, InstanceSample] = {}

    def update(
        self, samples: Mapping[str, InstanceSample], wall: float | None = None
    ) -> dict[str, StatsRecord]:
        """Rate records for ``samples``; see the class docstring."""
        wall = time.time() if wall is None else wall
        out: dict[str, StatsRecord] = {}
        none = _NO_SAMPLE
        for key, s in samples.items():
            prev = self._prev.get(key)
            dt = s.at - prev.at if prev is not None else 0.0
            p = prev if prev is not None and dt > 0 else none
            out[key] = StatsRecord(
                source=s.source, at=wall,
                cpu_ns=s.cpu_ns, user_ns=s.user_ns, system_ns=s.system_ns, memory_bytes=s.memory_bytes,
                memory_peak_bytes=s.memory_peak_bytes, swap_bytes=s.swap_bytes, read_bytes=s.read_bytes,
                write_bytes=s.write_bytes, read_ops=s.read_ops, write_ops=s.write_ops,
                net_rx_bytes=s.net_rx_bytes, net_tx_bytes=s.net_tx_bytes,
                interval_s=dt if dt > 0 else None,
                cpu_pct=_pct(s.cpu_ns, p.cpu_ns, dt),
                cpu_user_pct=_pct(s.user_ns, p.user_ns, dt),
                cpu_system_pct=_pct(s.system_ns, p.system_ns, dt),
                read_bytes_per_s=_per_s(s.read_bytes, p.read_bytes, dt),
                write_bytes_per_s=_per_s(s.write_bytes, p.write_bytes, dt),
                read_ops_per_s=_per_s(s.read_ops, p.read_ops, dt),
                write_ops_per_s=_per_s(s.write_ops, p.write_ops, dt),
                net_rx_bytes_per_s=_per_s(s.net_rx_bytes, p.net_rx_bytes, dt),
                net_tx_bytes_per_s=_per_s(s.net_tx_bytes, p.net_tx_bytes, dt),
            )
        self._prev = dict(samples)
        return out


# The previous sample of a key that has none (or none usable): every rate is None.
_NO_SAMPLE = InstanceSample(at=0.0, source="")


# ---------------------------------------------------------------------------------------------
# The collector


class SamplerMetrics(Protocol):
    """What the collector reports to (``fastcompute.metrics.Metrics`` has it)."""

    def observe_sampler(self, seconds: float, cgroups: int) -> None:
        """One sampling pass took ``seconds`` and read ``cgroups`` cgroups."""


class StatsCollector:
    """Per-instance stats for the agent: ``await collect()`` at the stats interval.

    ``sources()`` (called on the loop) returns the current ``{instance_uuid: source}``: a
    cgroup (directory or :class:`CgroupPaths`, e.g. from :func:`cgroup_of_pid`) or
    :data:`LIBVIRT` (``"libvirt:{domain_uuid}"`` when the domain UUID differs). Cgroup sources
    are sampled by one :class:`Sampler` that follows the set; the others by one call of
    ``domain_stats({domain_uuid: instance_uuid})`` (the driver's ``domain_stats``). The
    blocking part runs in ``executor``.
    ``collect()`` returns ``{instance_uuid: record}`` (see :class:`Rates`) and keeps it for
    :meth:`last`. An instance whose cgroup or domain cannot be read is left out, never an error.
    """

    def __init__(
        self,
        sources: Callable[[], Mapping[str, Source]],
        executor: Executor | None = None,
        *,
        domain_stats: Callable[[Mapping[str, str]], Mapping[str, DomainStats]] | None = None,
        metrics: SamplerMetrics | None = None,
        layout: CgroupLayout | None = None,
    ) -> None:
        self._sources = sources
        self._executor = executor
        self._domain_stats = domain_stats
        self._metrics = metrics
        self._sampler = Sampler(layout=layout)
        self._sampled: dict[str, Source] = {}
        self._rates = Rates()
        self._last: dict[str, StatsRecord] = {}
        self._gather_lock = threading.Lock()
        self.vanished: dict[str, int] = {}
        """Instances whose cgroup vanished in the last pass -> errno of the failed read."""

    async def collect(self) -> dict[str, StatsRecord]:
        """Sample every instance once and return its rate record, by instance UUID."""
        wanted = dict(self._sources())
        loop = asyncio.get_running_loop()
        samples = await loop.run_in_executor(self._executor, self._gather, wanted)
        records = self._rates.update(samples)
        self._last = records
        return records

    def last(self, uuid: str | None = None) -> dict[str, StatsRecord]:
        """The last records: all of them, or ``{uuid: record}``; NotFound when it has none."""
        if uuid is None:
            return dict(self._last)
        rec = self._last.get(uuid)
        if rec is None:
            raise NotFound(f"no stats for instance {uuid}")
        return {uuid: rec}

    def close(self) -> None:
        """Close the cgroup files."""
        self._sampler.close()
        self._sampled.clear()

    def _gather(self, wanted: Mapping[str, Source]) -> dict[str, InstanceSample]:
        # Two overlapping collect() calls must not both reconcile the sampler's set.
        with self._gather_lock:
            return self._gather_locked(wanted)

    def _gather_locked(self, wanted: Mapping[str, Source]) -> dict[str, InstanceSample]:
        cgroups = {u: s for u, s in wanted.items() if not _is_libvirt(s)}
        for uuid in list(self._sampled):
            if cgroups.get(uuid) != self._sampled[uuid]:
                self._sampler.remove(uuid)
                del self._sampled[uuid]
        for uuid, src in cgroups.items():
            if uuid not in self._sampled:
                try:
                    self._sampler.add(src, key=uuid)
                except NotFound as exc:
                    log.debug("no cgroup stats for %s: %s", uuid, exc)
                    continue
                self._sampled[uuid] = src
        t0 = time.perf_counter()
        snap = self._sampler.sample()
        if self._metrics is not None:
            self._metrics.observe_sampler(time.perf_counter() - t0, len(snap))
        for uuid in snap.vanished:
            self._sampled.pop(uuid, None)
        self.vanished = dict(snap.vanished)
        samples: dict[str, InstanceSample] = dict(snap.items())
        domains = {_domain_uuid(u, s): u for u, s in wanted.items() if _is_libvirt(s)}
        if domains and self._domain_stats is not None:
            try:
                read = self._domain_stats(domains)
            except HypervisorError as exc:
                log.warning("reading domain stats failed: %s", exc.message)
            else:
                samples.update(
                    (u, InstanceSample(source=LIBVIRT, **msgspec.structs.asdict(d))) for u, d in read.items())
        return samples


def _is_libvirt(src: Source) -> bool:
    return isinstance(src, str) and (src == LIBVIRT or src.startswith(LIBVIRT + ":"))


def _domain_uuid(uuid: str, src: Source) -> str:
    assert isinstance(src, str)
    return src.partition(":")[2] or uuid
