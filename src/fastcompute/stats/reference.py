"""Plain-Python reading of cgroup stats files: the oracle and baseline for the sampler.

It reads the same files as the Cython sampler (``fastcompute._core.CgroupSampler``) the way a
plain Python agent would, opening, reading and closing every file on every pass, and parses
them into the same ten numbers (``CGROUP_SAMPLE_FIELDS`` order, -1 where unknown). The tests
compare the two on real cgroups; the benchmarks measure the sampler against it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

FIELDS = (
    "cpu_ns", "user_ns", "system_ns", "memory_bytes", "memory_peak_bytes", "swap_bytes",
    "read_bytes", "write_bytes", "read_ops", "write_ops",
)
_IDX = {name: i for i, name in enumerate(FIELDS)}
_IO_STAT = {"rbytes": "read_bytes", "wbytes": "write_bytes", "rios": "read_ops", "wios": "write_ops"}
_TICK_NS = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") or 100)


def _first_int(text: str) -> int:
    parts = text.split()
    return int(parts[0]) if parts and parts[0].isdigit() else -1


def _add(values: list[int], field: str, x: int) -> None:
    i = _IDX[field]
    values[i] = x if values[i] < 0 else values[i] + x


def parse_into(name: str, text: str, values: list[int], memsw: list[int]) -> None:
    """Parse one stats file's text (file ``name``) into ``values``; v1 memsw goes to memsw[0]."""
    if name == "cpuacct.usage":
        values[_IDX["cpu_ns"]] = _first_int(text)
    elif name in ("cpuacct.stat", "cpu.stat"):
        for line in text.splitlines():
            key, _, num = line.partition(" ")
            if not num.strip().isdigit():
                continue
            n = int(num)
            if name == "cpu.stat":
                field = {"usage_usec": "cpu_ns", "user_usec": "user_ns", "system_usec": "system_ns"}
                if key in field:
                    values[_IDX[field[key]]] = n * 1000
            elif key in ("user", "system"):
                values[_IDX[key + "_ns"]] = n * _TICK_NS
    elif name in ("memory.usage_in_bytes", "memory.current"):
        values[_IDX["memory_bytes"]] = _first_int(text)
    elif name in ("memory.max_usage_in_bytes", "memory.peak"):
        values[_IDX["memory_peak_bytes"]] = _first_int(text)
    elif name == "memory.memsw.usage_in_bytes":
        memsw[0] = _first_int(text)
    elif name == "memory.swap.current":
        values[_IDX["swap_bytes"]] = _first_int(text)
    elif name.startswith("blkio."):
        unit = "ops" if name.endswith("io_serviced") else "bytes"
        for f in ("read_", "write_"):
            values[_IDX[f + unit]] = max(values[_IDX[f + unit]], 0)
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and ":" in parts[0] and parts[2].isdigit():
                if parts[1] == "Read":
                    _add(values, "read_" + unit, int(parts[2]))
                elif parts[1] == "Write":
                    _add(values, "write_" + unit, int(parts[2]))
    elif name == "io.stat":
        for io_field in _IO_STAT.values():
            values[_IDX[io_field]] = 0
        for line in text.splitlines():
            for token in line.split()[1:]:
                key, _, num = token.partition("=")
                if key in _IO_STAT and num.isdigit():
                    _add(values, _IO_STAT[key], int(num))


def read_cgroup(files: Sequence[tuple[str, str]]) -> list[int]:
    """Read and parse one cgroup's files, given as ``(file name, path)`` pairs."""
    values = [-1] * len(FIELDS)
    memsw = [-1]
    for name, path in files:
        with open(path) as f:
            text = f.read()
        parse_into(name, text, values, memsw)
    mem = values[_IDX["memory_bytes"]]
    if memsw[0] >= 0 and mem >= 0:
        values[_IDX["swap_bytes"]] = max(memsw[0] - mem, 0)
    return values
