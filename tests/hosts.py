"""Node files for libvirt's test driver: hosts larger than test:///default's."""

from __future__ import annotations

from pathlib import Path


def write_test_host(path: Path, *, cells: int = 2, sockets: int = 2, cores: int = 16, threads: int = 2,
                    memory_gib: int = 256) -> str:
    """Write a node file and return its ``test:///…`` URI.

    ``cores`` is per socket; the host has ``sockets * cores * threads`` CPUs split evenly over
    ``cells``. libvirt lists no NUMA cells for such a host, so the agent derives them.
    """
    cpus = sockets * cores * threads
    path.write_text(
        "<node>\n  <cpu>\n    <mhz>2600</mhz>\n    <model>x86_64</model>\n"
        f"    <nodes>{cells}</nodes>\n    <sockets>{sockets}</sockets>\n    <cores>{cores}</cores>\n"
        f"    <threads>{threads}</threads>\n    <active>{cpus}</active>\n  </cpu>\n"
        f"  <memory>{memory_gib * 1024 * 1024}</memory>\n</node>\n"
    )
    return "test://" + str(path.resolve())
