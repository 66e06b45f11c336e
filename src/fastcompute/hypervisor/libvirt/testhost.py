"""Node files for libvirt's test driver: hosts larger than ``test:///default``'s.

``test:///default`` is a 16-CPU, 6 GiB host, too small for a demo of a boot storm or for NUMA
work; libvirt's test driver also takes a node file (``test:///path/host.xml``) that describes
the host. ``make run`` writes a dense one with ``python -m fastcompute.hypervisor.libvirt.testhost``,
and the tests and benchmarks write the sizes they need with :func:`write_test_host`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def test_host_xml(*, cells: int, sockets: int, cores: int, threads: int, memory_gib: int) -> str:
    """The node file of a host with ``sockets * cores * threads`` CPUs over ``cells`` NUMA cells.

    ``cores`` is per socket. libvirt lists no NUMA cells for such a host, so the agent derives
    them (even split of CPUs and memory).
    """
    cpus = sockets * cores * threads
    return (
        "<node>\n  <cpu>\n    <mhz>2600</mhz>\n    <model>x86_64</model>\n"
        f"    <nodes>{cells}</nodes>\n    <sockets>{sockets}</sockets>\n    <cores>{cores}</cores>\n"
        f"    <threads>{threads}</threads>\n    <active>{cpus}</active>\n  </cpu>\n"
        f"  <memory>{memory_gib * 1024 * 1024}</memory>\n</node>\n"
    )


def write_test_host(path: Path, *, cells: int = 2, sockets: int = 2, cores: int = 16, threads: int = 2,
                    memory_gib: int = 256) -> str:
    """Write a node file and return its ``test:///…`` URI (the defaults: a dense 64-CPU host)."""
    path.write_text(test_host_xml(cells=cells, sockets=sockets, cores=cores, threads=threads, memory_gib=memory_gib))
    return "test://" + str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    """``python -m fastcompute.hypervisor.libvirt.testhost FILE``: write a node file, print its URI."""
    p = argparse.ArgumentParser(prog="python -m fastcompute.hypervisor.libvirt.testhost",
                                description="Write a libvirt test-driver host description and print its URI.")
    p.add_argument("path", type=Path)
    p.add_argument("--cells", type=int, default=2)
    p.add_argument("--sockets", type=int, default=2)
    p.add_argument("--cores", type=int, default=16, help="per socket")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-gib", type=int, default=256)
    a = p.parse_args(argv)
    print(write_test_host(a.path, cells=a.cells, sockets=a.sockets, cores=a.cores, threads=a.threads,
                          memory_gib=a.memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
