"""Real cgroups for the stats tests and benchmarks, made under the host's detected layout.

``CgroupFactory(version)`` makes cgroups below one fresh parent (``fastcompute-test-<id>``) in
every hierarchy the version uses (v1: the cpuacct, memory and blkio controllers; v2: the
unified hierarchy) and removes all of them at ``cleanup()``, moving any process still inside
back to the hierarchy's root first, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

from fastcompute.stats.collector import CgroupLayout, host_layout

V1_CONTROLLERS = ("cpuacct", "memory", "blkio")


def available_versions(layout: CgroupLayout | None = None) -> list[str]:
    """The cgroup versions this host lets the tests create cgroups in."""
    layout = layout or host_layout()
    out = []
    if all(c in layout.v1 for c in V1_CONTROLLERS):
        out.append("v1")
    if layout.unified:
        out.append("v2")
    return out


class CgroupFactory:
    """Creates test cgroups of one version and removes every one of them at cleanup()."""

    def __init__(self, version: str, layout: CgroupLayout | None = None) -> None:
        self.version = version
        self.layout = layout or host_layout()
        self.parent = f"fastcompute-test-{uuid.uuid4().hex[:10]}"
        if version == "v1":
            self.roots = [self.layout.v1[c] for c in V1_CONTROLLERS]
        else:
            assert self.layout.unified
            self.roots = [self.layout.unified]
        self._made: list[str] = []
        for root in self.roots:
            os.mkdir(os.path.join(root, self.parent))

    def dirs(self, rel: str) -> list[str]:
        """The directories of cgroup ``rel`` in each hierarchy used."""
        return [os.path.join(root, self.parent, rel) for root in self.roots]

    def make(self, rel: str) -> str:
        """Create cgroup ``rel`` (parents first) and return the directory to sample."""
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self._made:
                continue
            for d in self.dirs(sub):
                os.mkdir(d)
            self._made.append(sub)
        return self.dirs(rel)[0]

    def enter(self, rel: str, pid: int) -> None:
        """Move process ``pid`` into cgroup ``rel`` in every hierarchy."""
        for d in self.dirs(rel):
            Path(d, "cgroup.procs").write_text(str(pid))

    def remove(self, rel: str) -> None:
        """Remove cgroup ``rel`` (and its children), moving out any process left inside."""
        for root, d in zip(self.roots, self.dirs(rel), strict=True):
            _rmtree(root, d)
        self._made = [m for m in self._made if m != rel and not m.startswith(rel + "/")]

    def cleanup(self) -> None:
        """Remove every cgroup made, and the parent."""
        for root in self.roots:
            _rmtree(root, os.path.join(root, self.parent))
        self._made.clear()


def _rmtree(root: str, d: str) -> None:
    if not os.path.isdir(d):
        return
    for entry in os.scandir(d):
        if entry.is_dir(follow_symlinks=False):
            _rmtree(root, entry.path)
    with contextlib.suppress(OSError):
        for pid in Path(d, "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                Path(root, "cgroup.procs").write_text(pid)
    os.rmdir(d)


def block_device_of(path: str) -> str | None:
    """``MAJ:MIN`` of the whole disk holding ``path`` (what blkio rules need), or None."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sys_dev = Path("/sys/dev/block", dev)
    if not sys_dev.exists():
        return None
    if (sys_dev / "partition").exists():
        return (sys_dev.resolve().parent / "dev").read_text().strip()
    return dev


BURNER = r"""
import mmap, os, sys, time
mode, io_path = sys.argv[1], sys.argv[2]
sys.stdin.readline()                      # wait until the test moved us into the cgroup
if mode == "spin":
    print("ready", flush=True)
    while True:
        pass
buf = bytearray(64 << 20)
for i in range(0, len(buf), 4096):        # touch every page: charged to the cgroup
    buf[i] = 1
if io_path:
    mm = mmap.mmap(-1, 1 << 20)           # page-aligned, as O_DIRECT wants
    mm.write(b"x" * (1 << 20))
    fd = os.open(io_path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT)
    os.write(fd, mm)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(io_path, os.O_RDONLY | os.O_DIRECT)
    os.readv(fd, [mm])
    os.close(fd)
start = time.process_time()
while time.process_time() - start < 0.3:  # 0.3 s of CPU, however busy the machine is
    pass
print("ready", flush=True)
sys.stdin.readline()
"""


class Burner:
    """A child process that, once told, burns 64 MiB, 0.3 s of CPU and 1 MiB of direct I/O."""

    def __init__(self, mode: str = "once", io_path: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BURNER, mode, io_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.pid = self.proc.pid

    def go(self) -> None:
        """Start the work and wait until it is done (or, for ``spin``, started)."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        """Kill the child and reap it."""
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()
