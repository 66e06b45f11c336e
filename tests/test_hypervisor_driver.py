"""Starting a domain through a transient libvirt failure.

The failure seen in a CI boot storm (libvirt: "failed to load cgroup BPF prog: Resource
temporarily unavailable", the kernel's verifier interrupted by a signal) cannot be caused on
demand, so a real domain of libvirt's test driver is wrapped and its first starts fail as that
one did; everything else is the real domain.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from fastcompute.hypervisor.libvirt import driver as libvirt_driver

XML = """<domain type='test'><name>retry-{n}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type>hvm</type></os></domain>"""


def _error(message: str) -> libvirt.libvirtError:
    libvirt.virResetLastError()
    return libvirt.libvirtError(message)


class FailingFirst:
    """A real domain whose first ``failures`` starts raise ``error``."""

    def __init__(self, dom: Any, failures: int, error: str) -> None:
        self.dom, self.failures, self.error, self.tries = dom, failures, error, 0

    def create(self) -> None:
        self.tries += 1
        if self.tries <= self.failures:
            raise _error(self.error)
        self.dom.create()

    def name(self) -> str:
        return str(self.dom.name())


@pytest.fixture
def dom() -> Iterator[Any]:
    conn = libvirt.open("test:///default")
    d = conn.defineXML(XML.format(n=id(conn)))
    yield d
    if d.isActive():
        d.destroy()
    d.undefine()
    conn.close()


TRANSIENT = "failed to load cgroup BPF prog: Resource temporarily unavailable"


def test_a_start_that_fails_for_a_moment_is_tried_again(dom: Any) -> None:
    wrapped = FailingFirst(dom, 2, TRANSIENT)
    libvirt_driver.start_domain(wrapped, pause_s=0)
    assert wrapped.tries == 3 and dom.isActive()


def test_a_start_that_keeps_failing_gives_up_with_the_error(dom: Any) -> None:
    wrapped = FailingFirst(dom, 5, TRANSIENT)
    with pytest.raises(libvirt.libvirtError, match="temporarily unavailable"):
        libvirt_driver.start_domain(wrapped, pause_s=0)
    assert wrapped.tries == libvirt_driver.START_TRIES and not dom.isActive()


def test_other_errors_are_not_tried_again(dom: Any) -> None:
    wrapped = FailingFirst(dom, 1, "internal error: process exited while connecting to monitor")
    with pytest.raises(libvirt.libvirtError, match="process exited"):
        libvirt_driver.start_domain(wrapped, pause_s=0)
    assert wrapped.tries == 1 and not dom.isActive()
