"""Live migration through the libvirt driver, between two real libvirt hosts on this machine
(scripts/libvirt-hosts.sh: a network namespace and a libvirtd each).

A TCG guest of the project's image moves from host A to host B while it runs: its disk (a
qcow2 overlay) is mirrored into the overlay B made beforehand from the same base, a counter it
prints on its serial console keeps counting across the move, and it reads the same bytes from
its disk afterwards. A guest that dirties memory faster than the bandwidth allows is steered
(its downtime limit raised step by step) and then aborted on its timeout, still running on A
and left nowhere on B.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from guest_fixtures import READY, guest_image, make_overlay, wait_for_console

from fastcompute.errors import HypervisorError
from fastcompute.hypervisor.driver import PowerEvent
from fastcompute.hypervisor.libvirt.driver import LibvirtDriver
from fastcompute.hypervisor.spec import Disk, GuestSpec, MigrationPolicy, MigrationProgress, MigrationTarget

pytestmark = pytest.mark.guest
__all__ = ["guest_image"]

HOSTS_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "libvirt-hosts.sh"
HOSTS = ("lma", "lmb")


class Host(msgspec.Struct, frozen=True):
    """One libvirt host: its address and its libvirt URI."""

    address: str
    uri: str


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two libvirt hosts, each in its own network namespace; removed at the end."""
    yield from libvirt_hosts(HOSTS)


def libvirt_hosts(names: tuple[str, str]) -> Iterator[tuple[Host, Host]]:
    """The libvirt hosts ``names`` (namespaces fc-NAME), started; removed at the end."""
    made = []
    try:
        for name in names:
            out = subprocess.run(["bash", str(HOSTS_SCRIPT), "start", name], check=True, capture_output=True,
                                 text=True, timeout=300)
            address, uri = out.stdout.split()[-2:]
            made.append(Host(address, uri))
        yield made[0], made[1]
    finally:
        for name in names:
            subprocess.run(["bash", str(HOSTS_SCRIPT), "stop", name], check=False, timeout=120)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory (unix sockets' paths are short) for both hosts' instance files."""
    path = Path(tempfile.mkdtemp(prefix="lm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _on_power(_event: PowerEvent) -> None:
    """Power events are not what these tests look at."""


def guest_on(side: Path, image: Path, uuid: str) -> GuestSpec:
    """The guest as host ``side`` (a directory of its instance files) describes it."""
    side.mkdir(exist_ok=True)
    disk = side / "disk"
    if not disk.exists():
        make_overlay(image, disk)
    return GuestSpec(uuid=uuid, name="migrant", project_id="p", vcpus=1, memory_mb=128,
                     console_path=str(side / "console.log"), console_socket=str(side / "console.sock"),
                     disks=[Disk(role="root", source=str(disk), format="qcow2", boot_order=1)],
                     virt_type="qemu")


class Move(msgspec.Struct, frozen=True):
    """A guest on host A and where it goes: the same guest as host B describes it."""

    uuid: str
    on_a: GuestSpec
    on_b: GuestSpec
    to_b: MigrationTarget


@pytest.fixture
def move(hosts: tuple[Host, Host], guest_image: Path, workdir: Path) -> Move:
    """A new guest's files on both hosts (B's overlay made beforehand from the same base)."""
    uuid = str(uuid_mod.uuid4())
    on_a, on_b = guest_on(workdir / "a", guest_image, uuid), guest_on(workdir / "b", guest_image, uuid)
    b = hosts[1]
    return Move(uuid, on_a, on_b, MigrationTarget(uri=b.uri, address=b.address, guest=on_b, copy_roles=["root"]))


def type_into(sock_path: str, line: str) -> None:
    """Type a line into the guest's serial shell."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        s.sendall(line.encode() + b"\n")
        time.sleep(0.3)


def ticks(console: Path) -> list[int]:
    """The counter the guest prints, as seen on a console log so far."""
    return [int(m) for m in re.findall(rb"TICK (\d+)\r?\n", console.read_bytes())] if console.exists() else []


Hosts = tuple[Host, Host]
Body = Callable[[LibvirtDriver, LibvirtDriver, Move], Awaitable[None]]


def _run(hosts: Hosts, move: Move, body: Body) -> None:
    async def run() -> None:
        a, b = hosts
        da, db = LibvirtDriver(a.uri, 2), LibvirtDriver(b.uri, 2)
        await da.connect(_on_power)
        await db.connect(_on_power)
        try:
            await body(da, db, move)
        finally:
            for d in (da, db):
                with contextlib.suppress(HypervisorError):
                    await d.destroy(move.uuid)
                await d.close()

    asyncio.run(run())


def scenario(hosts: Hosts, move: Move, body: Body) -> None:
    """Run ``body`` with a driver on each host, in a process of its own: libvirt dispatches its
    events on one event loop per process, bound at the first connection (as in the agent), and
    other tests of this run have bound theirs already. The guest is removed from both hosts at
    the end; a failed assertion's traceback is the child's output."""
    child = multiprocessing.get_context("spawn").Process(target=_run, args=(hosts, move, body))
    child.start()
    child.join(600)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, f"the scenario {body.__name__} failed in its process (exit {child.exitcode})"


async def boot_busy_guest(driver: LibvirtDriver, guest: GuestSpec) -> None:
    """Start the guest and have it dirty 24 MiB of memory over and over (more than 32 MiB/s
    can send in the longest stop the tests allow) while it prints a counter."""
    console, shell = Path(guest.console_path), guest.console_socket or ""
    await driver.launch(guest, start=True)
    await asyncio.to_thread(wait_for_console, console, READY)
    type_into(shell, "dd if=/dev/urandom of=/src bs=1M count=24 2>/dev/null; echo DIRTYING; "
                     "while :; do cat /src > /dst; done &")
    await asyncio.to_thread(wait_for_console, console, "DIRTYING", timeout_s=120)
    type_into(shell, "i=0; while :; do echo TICK $i; i=$((i+1)); sleep 0.5; done &")


async def _moves_and_keeps_running(da: LibvirtDriver, db: LibvirtDriver, move: Move) -> None:
    uuid, on_a, on_b = move.uuid, move.on_a, move.on_b
    console_a, console_b = Path(on_a.console_path), Path(on_b.console_path)
    assert await da.launch(on_a, start=True) == "running"
    await asyncio.to_thread(wait_for_console, console_a, READY)
    type_into(on_a.console_socket or "", "i=0; while :; do echo TICK $i; i=$((i+1)); sleep 0.2; done &")
    type_into(on_a.console_socket or "", "dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum")
    await asyncio.to_thread(wait_for_console, console_a, "TICK 5")
    before = re.findall(rb"([0-9a-f]{32})  -", console_a.read_bytes())
    result = await da.live_migrate(uuid, move.to_b, MigrationPolicy(), lambda _p: None)
    assert result.total_s > 0 and result.fallback == "none"
    assert result.downtime_ms is not None and 0 <= result.downtime_ms < 10_000
    on_dest = await db.info(uuid)
    assert on_dest is not None and on_dest.power_state == "running"
    left = await da.info(uuid)
    assert left is not None and left.power_state != "running"  # defined, stopped: the caller's to remove
    last_on_a = max(ticks(console_a))
    await asyncio.to_thread(wait_for_console, console_b, f"TICK {last_on_a + 5}")
    # The counter went on where it was: no reboot, no restart of the shell.
    assert min(ticks(console_b)) <= last_on_a + 2
    type_into(on_b.console_socket or "", "dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum")
    deadline = time.monotonic() + 60
    after: list[bytes] = []
    while not after and time.monotonic() < deadline:
        after = re.findall(rb"([0-9a-f]{32})  -", console_b.read_bytes())
        await asyncio.sleep(0.2)
    assert before and after and after[-1] == before[-1]
    assert not await da.abort_migration(uuid)  # nothing under way any more


def test_a_running_guest_moves_with_its_disk_and_keeps_running(hosts: Hosts, move: Move) -> None:
    scenario(hosts, move, _moves_and_keeps_running)


async def _steered_then_aborted(da: LibvirtDriver, db: LibvirtDriver, move: Move) -> None:
    uuid, on_a = move.uuid, move.on_a
    policy = MigrationPolicy(downtime_start_ms=10, downtime_max_ms=100, downtime_steps=3, fallback="none",
                             timeout_s=15.0, bandwidth_mib_s=32)
    await boot_busy_guest(da, on_a)
    seen: list[MigrationProgress] = []
    with pytest.raises(HypervisorError, match="not done after 15 s"):
        await da.live_migrate(uuid, move.to_b, policy, seen.append)
    assert seen and seen[-1].memory_total > 0
    # Steered: each pass that left as much to send raised the limit a step.
    limits = [p.downtime_limit_ms for p in seen]
    assert limits[0] == 10 and max(limits) > 10 and limits == sorted(limits)
    assert max(p.iteration for p in seen) >= 2
    here = await da.info(uuid)
    assert here is not None and here.power_state == "running"
    assert await db.info(uuid) is None
    console = Path(on_a.console_path)
    await asyncio.to_thread(wait_for_console, console, f"TICK {max(ticks(console)) + 2}")


def test_a_migration_that_cannot_converge_is_steered_then_aborted(hosts: Hosts, move: Move) -> None:
    scenario(hosts, move, _steered_then_aborted)


async def _ended_by_post_copy(da: LibvirtDriver, db: LibvirtDriver, move: Move) -> None:
    uuid, on_a, on_b = move.uuid, move.on_a, move.on_b
    policy = MigrationPolicy(downtime_start_ms=10, downtime_max_ms=50, downtime_steps=1, fallback="post-copy",
                             fallback_after_s=8.0, timeout_s=120.0, bandwidth_mib_s=32)
    await boot_busy_guest(da, on_a)
    result = await da.live_migrate(uuid, move.to_b, policy, lambda _p: None)
    assert result.fallback == "post-copy" and result.total_s >= 8.0
    on_dest = await db.info(uuid)
    assert on_dest is not None and on_dest.power_state == "running"
    last = max(ticks(Path(on_a.console_path)))
    await asyncio.to_thread(wait_for_console, Path(on_b.console_path), f"TICK {last + 2}")


def test_post_copy_ends_a_migration_that_cannot_converge(hosts: Hosts, move: Move) -> None:
    scenario(hosts, move, _ended_by_post_copy)
