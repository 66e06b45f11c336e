"""The kernel's file formats as the sampler parses them, libvirt's domain stats, and rates.

The cgroup versions this host does not enable (here: v2 memory and io) are still parsed: the
sampler reads regular files holding the kernel's text through the same descriptors-and-pread
path, and must agree with the plain-Python reference parser.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcompute.errors import NotFound
from fastcompute.hypervisor.libvirt.stats import domain_stats_flags, from_domain_stats
from fastcompute.hypervisor.spec import DomainStats
from fastcompute.stats.collector import (
    COUNTERS,
    CgroupLayout,
    CgroupPaths,
    InstanceSample,
    Rates,
    Sampler,
    detect_layout,
)
from fastcompute.stats.reference import read_cgroup

MiB = 1 << 20
V2_NAMES = ("cpu.stat", "memory.current", "memory.peak", "memory.swap.current", "io.stat")


def _sample_files(paths: CgroupPaths) -> tuple[tuple[int | None, ...], list[int]]:
    with Sampler() as sampler:
        sampler.add(paths)
        snap = sampler.sample()
    return snap.row(0), read_cgroup(paths.stat_files())


def test_v2_files(tmp_path: Path) -> None:
    texts = {
        "cpu.stat": "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 0\n"
        "nr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n",
        "memory.current": "73400320\n",
        "memory.peak": "104857600\n",
        "memory.swap.current": "4096\n",
        "io.stat": "8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n"
        "8:0 rbytes=90430464 wbytes=299008000 rios=8950 wios=1252 dbytes=50331648 dios=3021\n",
    }
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    row, ref = _sample_files(CgroupPaths(unified=str(tmp_path)))
    assert row == (
        1_500_000_000, 1_000_000_000, 500_000_000, 73400320, 104857600, 4096,
        1459200 + 90430464, 314773504 + 299008000, 192 + 8950, 353 + 1252,
    )
    assert list(row) == ref


def test_v1_files(tmp_path: Path) -> None:
    blkio = "".join(
        f"{dev} {op} {n}\n"
        for dev, ns in (("8:16", (4096, 8192)), ("8:0", (100, 200)))
        for op, n in (("Read", ns[0]), ("Write", ns[1]), ("Sync", 0), ("Async", sum(ns)),
                      ("Discard", 0), ("Total", sum(ns)))
    ) + "Total 12588\n"
    texts = {
        "cpuacct.usage": "2000000000\n",
        "cpuacct.stat": "user 150\nsystem 50\n",
        "memory.usage_in_bytes": "1048576\n",
        "memory.max_usage_in_bytes": "2097152\n",
        "memory.memsw.usage_in_bytes": "1056768\n",
        "blkio.throttle.io_service_bytes": blkio,
        "blkio.throttle.io_serviced": "Total 0\n",
    }
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    d = str(tmp_path)
    row, ref = _sample_files(CgroupPaths(cpuacct=d, memory=d, blkio=d))
    tick = 1_000_000_000 // 100
    assert row == (2_000_000_000, 150 * tick, 50 * tick, 1048576, 2097152, 8192,
                   4196, 8392, 0, 0)
    assert list(row) == ref


def test_missing_files_read_as_unknown(tmp_path: Path) -> None:
    # a kernel without memory.peak or swap accounting: those fields are None, the rest are read
    (tmp_path / "memory.current").write_text("4096\n")
    with Sampler() as sampler:
        sampler.add(CgroupPaths(unified=str(tmp_path)), key="k")
        s = sampler.sample()["k"]
    assert s.memory_bytes == 4096
    assert (s.memory_peak_bytes, s.swap_bytes, s.cpu_ns, s.read_bytes) == (None, None, None, None)


_counter = st.integers(min_value=0, max_value=2**53)
_device = st.tuples(st.integers(1, 259), st.integers(0, 255)).map(lambda t: f"{t[0]}:{t[1]}")


@settings(max_examples=60, deadline=None)
@given(
    devices=st.lists(st.tuples(_device, st.lists(_counter, min_size=6, max_size=6)), max_size=40),
    # up to ~30 years of CPU time: ticks and microseconds still fit in int64 nanoseconds
    cpu=st.lists(st.integers(0, 10**11), min_size=3, max_size=3),
)
def test_parsers_agree_with_reference(
    devices: list[tuple[str, list[int]]], cpu: list[int]
) -> None:
    io_stat = "".join(
        f"{dev} rbytes={c[0]} wbytes={c[1]} rios={c[2]} wios={c[3]} dbytes={c[4]} dios={c[5]}\n"
        for dev, c in devices
    )
    blkio = "".join(
        f"{dev} Read {c[0]}\n{dev} Write {c[1]}\n{dev} Sync {c[2]}\n{dev} Async {c[3]}\n"
        f"{dev} Discard {c[4]}\n{dev} Total {c[0] + c[1]}\n"
        for dev, c in devices
    ) + f"Total {sum(c[0] + c[1] for _, c in devices)}\n"
    with tempfile.TemporaryDirectory() as v1, tempfile.TemporaryDirectory() as v2:
        Path(v2, "io.stat").write_text(io_stat)
        Path(v2, "cpu.stat").write_text(
            f"usage_usec {cpu[0]}\nuser_usec {cpu[1]}\nsystem_usec {cpu[2]}\n")
        Path(v1, "blkio.throttle.io_service_bytes").write_text(blkio)
        Path(v1, "cpuacct.stat").write_text(f"user {cpu[1]}\nsystem {cpu[2]}\n")
        for paths in (CgroupPaths(unified=v2), CgroupPaths(cpuacct=v1, blkio=v1)):
            present = [(n, p) for n, p in paths.stat_files() if Path(p).exists()]
            with Sampler() as sampler:
                sampler.add(paths, key="k")
                snap = sampler.sample()
            assert list(snap.data) == read_cgroup(present)


def test_domain_stats_from_the_test_hypervisor() -> None:
    conn = libvirt.open("test:///default")
    try:
        doms = conn.listAllDomains()
        raw = conn.getAllDomainStats(*domain_stats_flags())
        mapping = {doms[0].UUIDString(): "instance-1"}
        samples = from_domain_stats(raw, mapping, at=10.0)
    finally:
        conn.close()
    assert list(samples) == ["instance-1"]
    assert isinstance(samples["instance-1"], DomainStats)
    assert samples["instance-1"].at == 10.0
    assert from_domain_stats(raw, {}) == {}


def test_domain_stats_of_a_qemu_guest() -> None:
    # The test hypervisor reports only state: the counters below are the keys a QEMU domain
    # reports (libvirt's virConnectGetAllDomainStats documentation), on a real domain object.
    rec = {
        "state.state": 1, "cpu.time": 5_000_000_000, "cpu.user": 3_000_000_000,
        "cpu.system": 1_000_000_000, "balloon.current": 131072, "balloon.rss": 65536,
        "block.count": 2, "block.0.rd.bytes": 100, "block.0.wr.bytes": 200,
        "block.0.rd.reqs": 1, "block.0.wr.reqs": 2, "block.1.rd.bytes": 1000,
        "block.1.wr.bytes": 2000, "block.1.rd.reqs": 10, "block.1.wr.reqs": 20,
        "net.count": 1, "net.0.rx.bytes": 7, "net.0.tx.bytes": 9,
    }
    conn = libvirt.open("test:///default")
    try:
        dom = conn.listAllDomains()[0]
        s = from_domain_stats([(dom, rec)], {dom.UUIDString(): "i-1"}, at=1.0)["i-1"]
    finally:
        conn.close()
    assert (s.cpu_ns, s.user_ns, s.system_ns) == (5_000_000_000, 3_000_000_000, 1_000_000_000)
    assert s.memory_bytes == 65536 * 1024
    assert (s.read_bytes, s.write_bytes, s.read_ops, s.write_ops) == (1100, 2200, 11, 22)
    assert (s.net_rx_bytes, s.net_tx_bytes) == (7, 9)


def test_rates() -> None:
    rates = Rates()
    first = rates.update({"a": InstanceSample(at=100.0, source="cgroup", cpu_ns=0, read_bytes=0)})
    assert first["a"]["cpu_pct"] is None and first["a"]["interval_s"] is None
    second = rates.update(
        {"a": InstanceSample(at=102.0, source="cgroup", cpu_ns=3_000_000_000, read_bytes=4096,
                             memory_bytes=MiB)},
        wall=1234.0,
    )["a"]
    assert second["cpu_pct"] == pytest.approx(150.0)
    assert second["read_bytes_per_s"] == pytest.approx(2048.0)
    assert second["write_bytes_per_s"] is None
    assert second["memory_bytes"] == MiB and second["interval_s"] == pytest.approx(2.0)
    assert second["at"] == 1234.0
    # the documented record (docs/STATS.md), keys in the order clients receive them
    assert list(second) == ["source", "at", *COUNTERS, "interval_s", "cpu_pct", "cpu_user_pct",
                            "cpu_system_pct", "read_bytes_per_s", "write_bytes_per_s", "read_ops_per_s",
                            "write_ops_per_s", "net_rx_bytes_per_s", "net_tx_bytes_per_s"]
    # a counter going backwards is a new cgroup: no rate, not a negative one
    third = rates.update({"a": InstanceSample(at=104.0, source="cgroup", cpu_ns=10, read_bytes=0)})
    assert third["a"]["cpu_pct"] is None and third["a"]["read_bytes_per_s"] is None
    # a key left out is forgotten: when it comes back it starts over
    rates.update({})
    assert rates.update({"a": InstanceSample(at=106.0, source="cgroup", cpu_ns=20)})["a"][
        "cpu_pct"] is None



MOUNTINFO_V2 = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
30 27 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""

MOUNTINFO_V1 = """\
31 25 0:27 / /sys/fs/cgroup/systemd rw shared:9 - cgroup cgroup rw,xattr,name=systemd
34 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw shared:12 - cgroup cgroup rw,cpu,cpuacct
35 25 0:31 / /sys/fs/cgroup/memory rw shared:13 - cgroup cgroup rw,memory
37 25 0:31 /nested /mnt/memory-bind rw - cgroup cgroup rw,memory
36 25 0:32 / /sys/fs/cgroup/blk\\040io rw shared:14 - cgroup cgroup rw,blkio
"""


@pytest.mark.parametrize(
    ("text", "version", "v1", "unified"),
    [
        (MOUNTINFO_V2, "v2", {}, "/sys/fs/cgroup"),
        (
            MOUNTINFO_V1,
            "v1",
            {
                "name=systemd": "/sys/fs/cgroup/systemd",
                "cpu": "/sys/fs/cgroup/cpu,cpuacct",
                "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                "memory": "/sys/fs/cgroup/memory",
                "blkio": "/sys/fs/cgroup/blk io",
            },
            None,
        ),
    ],
)
def test_layouts_of_other_hosts(
    tmp_path: Path, text: str, version: str, v1: dict[str, str], unified: str | None
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(text)
    layout = detect_layout(str(mountinfo))
    assert layout.version == version
    assert dict(layout.v1) == v1 and layout.unified == unified


def test_from_dir_on_a_pure_v2_layout(tmp_path: Path) -> None:
    layout = CgroupLayout(unified=str(tmp_path))
    (tmp_path / "machine.slice" / "vm.scope").mkdir(parents=True)
    by_dir = CgroupPaths.from_dir(str(tmp_path / "machine.slice" / "vm.scope"), layout)
    by_cgroup_path = CgroupPaths.from_dir("/machine.slice/vm.scope", layout)
    assert by_dir == by_cgroup_path == CgroupPaths(unified=str(tmp_path / "machine.slice" / "vm.scope"))
    assert [n for n, _ in by_dir.stat_files()] == list(V2_NAMES)
    with pytest.raises(NotFound):
        CgroupPaths.from_dir("/machine.slice/gone.scope", layout)

