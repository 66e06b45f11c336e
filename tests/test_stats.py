"""The cgroup sampler against real cgroups made by the tests, on each cgroup version the host has."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from stats_fixtures import Burner, CgroupFactory, available_versions, block_device_of

from fastcompute.errors import NotFound
from fastcompute.hypervisor.libvirt.names import qemu_pid
from fastcompute.stats.collector import (
    LIBVIRT,
    CgroupPaths,
    Sampler,
    cgroup_of_pid,
    detect_layout,
    guest_source,
    host_layout,
)
from fastcompute.stats.reference import read_cgroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups needs root")

MiB = 1 << 20


@pytest.fixture(params=available_versions())
def cgroups(request: pytest.FixtureRequest) -> Iterator[CgroupFactory]:
    factory = CgroupFactory(request.param)
    try:
        yield factory
    finally:
        factory.cleanup()


def _memory_in(factory: CgroupFactory) -> bool:
    return factory.version == "v1" or "memory" in factory.layout.unified_controllers


def test_layout_names_the_mounted_hierarchies() -> None:
    layout = detect_layout()
    assert layout == host_layout()
    for mount in layout.mounts():
        assert Path(mount, "cgroup.procs").exists()
    if layout.unified:
        assert Path(layout.unified, "cgroup.controllers").exists()
    assert layout.version in ("v1", "v2", "hybrid")


def test_burning_process_moves_the_numbers(cgroups: CgroupFactory, tmp_path: Path) -> None:
    d = cgroups.make("guest")
    dev = block_device_of(str(tmp_path))
    if cgroups.version == "v1" and dev:
        # v1 counts a cgroup's block I/O in blkio.throttle.* only for devices with a throttle
        # rule (libvirt sets one per disk for iotune); a limit nobody reaches turns it on.
        for rule in ("read_bps_device", "write_bps_device"):
            Path(cgroups.dirs("guest")[2], f"blkio.throttle.{rule}").write_text(f"{dev} {1 << 40}")
    burner = Burner(io_path=str(tmp_path / "io") if dev else "")
    try:
        cgroups.enter("guest", burner.pid)
        with Sampler([d]) as sampler:
            before = sampler.sample()[d]
            burner.go()
            after = sampler.sample()[d]
    finally:
        burner.stop()
    assert before.source == "cgroup"
    assert after.cpu_ns is not None and before.cpu_ns is not None
    assert after.cpu_ns - before.cpu_ns >= 250_000_000
    assert after.user_ns is not None and after.user_ns > (before.user_ns or 0)
    assert after.system_ns is not None
    if _memory_in(cgroups):
        assert after.memory_bytes is not None and after.memory_bytes >= 64 * MiB
        assert after.memory_peak_bytes is not None
        assert after.memory_peak_bytes >= after.memory_bytes
    else:
        assert after.memory_bytes is None
    if dev and (cgroups.version == "v1" or "io" in cgroups.layout.unified_controllers):
        assert after.write_bytes is not None and after.write_bytes >= MiB
        assert after.read_bytes is not None and after.read_bytes >= MiB
        assert after.write_ops is not None and after.write_ops > (before.write_ops or 0)
        assert after.read_ops is not None and after.read_ops > (before.read_ops or 0)


def test_sampler_agrees_with_plain_python(cgroups: CgroupFactory) -> None:
    d = cgroups.make("idle")
    burner = Burner()
    try:
        cgroups.enter("idle", burner.pid)
        burner.go()
        # The burner now sleeps on stdin: its counters hold still while both read them.
        paths = CgroupPaths.from_dir(d)
        with Sampler([d]) as sampler:
            snap = sampler.sample()
        assert list(snap.data) == read_cgroup(
            [(n, p) for n, p in paths.stat_files() if os.path.exists(p)]
        )
    finally:
        burner.stop()


def test_vanished_cgroup_is_dropped_and_reported(cgroups: CgroupFactory) -> None:
    dirs = [cgroups.make(f"g{i}") for i in range(3)]
    with Sampler(dirs) as sampler:
        assert set(sampler.sample()) == set(dirs)
        cgroups.remove("g1")
        snap = sampler.sample()
        assert set(snap) == {dirs[0], dirs[2]}
        assert set(snap.vanished) == {dirs[1]}
        assert dirs[1] not in sampler and len(sampler) == 2
        again = sampler.sample()
        assert set(again) == {dirs[0], dirs[2]} and not again.vanished


def test_add_and_remove_follow_the_instances(cgroups: CgroupFactory) -> None:
    a, b = cgroups.make("a"), cgroups.make("b")
    fds_before = len(os.listdir("/proc/self/fd"))
    with Sampler() as sampler:
        assert sampler.add(a, key="inst-a") == "inst-a"
        assert sampler.add(b) == b
        with pytest.raises(KeyError):
            sampler.add(b)
        assert set(sampler.sample()) == {"inst-a", b}
        assert sampler.remove("inst-a") and not sampler.remove("inst-a")
        assert set(sampler.sample()) == {b}
        with pytest.raises(NotFound):
            sampler.add(cgroups.dirs("never-made")[0])
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_thousand_cgroups(cgroups: CgroupFactory) -> None:
    dirs = [cgroups.make(f"c{i:04d}") for i in range(1000)]
    with Sampler(dirs) as sampler:
        snap = sampler.sample()
        assert len(snap) == 1000 and not snap.vanished
        # Empty cgroups: no CPU, no I/O; the numbers read as zeros, not as unknown.
        assert all(snap[d].cpu_ns == 0 for d in dirs)
        for d in dirs[::250]:
            paths = CgroupPaths.from_dir(d)
            files = [(n, p) for n, p in paths.stat_files() if os.path.exists(p)]
            assert list(snap[d].__struct_fields__) and snap.row(snap.names.index(d)) == tuple(
                None if x < 0 else x for x in read_cgroup(files)
            )
        for i in range(0, 1000, 2):
            cgroups.remove(f"c{i:04d}")
        snap = sampler.sample()
        assert len(snap) == 500 and len(snap.vanished) == 500
        assert set(snap.vanished) == set(dirs[::2])


def test_cgroup_of_pid_finds_the_guest_not_its_emulator_child(cgroups: CgroupFactory) -> None:
    # libvirt's layout: the QEMU main thread lives in <guest>/emulator
    cgroups.make("machine/qemu-1-guest/emulator")
    guest_dirs = cgroups.dirs("machine/qemu-1-guest")
    burner = Burner()
    try:
        cgroups.enter("machine/qemu-1-guest/emulator", burner.pid)
        paths = cgroup_of_pid(burner.pid)
        if cgroups.version == "v1":
            assert (paths.cpuacct, paths.memory, paths.blkio) == tuple(guest_dirs)
        else:
            assert paths.unified == guest_dirs[0]
        with Sampler() as sampler:
            key = sampler.add(paths, key="guest")
            burner.go()
            sample = sampler.sample()[key]
        assert sample.cpu_ns is not None and sample.cpu_ns >= 250_000_000
    finally:
        burner.stop()
    with pytest.raises(NotFound):
        cgroup_of_pid(burner.pid)


def test_guest_source_from_the_qemu_pid_file(cgroups: CgroupFactory, tmp_path: Path) -> None:
    cgroups.make("machine/qemu-2-vm/emulator")
    burner = Burner()
    try:
        cgroups.enter("machine/qemu-2-vm/emulator", burner.pid)
        (tmp_path / "vm.pid").write_text(f"{burner.pid}\n")
        source = guest_source(lambda: qemu_pid("vm", str(tmp_path)), "auto")
        assert isinstance(source, CgroupPaths)
        assert source == cgroup_of_pid(burner.pid)
        assert guest_source(lambda: qemu_pid("vm", str(tmp_path)), "libvirt") == LIBVIRT
        # no pid file
        assert guest_source(lambda: qemu_pid("other", str(tmp_path)), "auto") == LIBVIRT
        with pytest.raises(NotFound):
            guest_source(lambda: qemu_pid("other", str(tmp_path)), "cgroup")
        # a hypervisor that runs guests in no process of their own (the test driver)
        assert guest_source(lambda: None, "cgroup") == LIBVIRT
    finally:
        burner.stop()
