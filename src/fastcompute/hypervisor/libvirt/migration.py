"""Live migration of one domain to another libvirt host, steered while it runs.

libvirt's peer-to-peer migration (the source's libvirtd talks to the destination's) moves the
memory, and with ``VIR_MIGRATE_NON_SHARED_INC`` mirrors the chosen disks over NBD into files
the destination made beforehand from the same base. The call blocks until the end, so it runs
in a thread of its own (a host draining several guests must not take every worker of the
driver's pool), while a watcher reads the job's statistics twice a second and steers:

- the downtime limit (how long the guest may be stopped for the switch-over) starts low and is
  raised a step each time a new pass over the guest's memory starts without the memory left to
  send having shrunk by a tenth since the pass before: the guest dirties memory about as fast
  as it is sent, and only a longer final stop can end it;
- after ``fallback_after_s`` without an end, post-copy (when the policy says so) switches over
  at once and fetches the rest on demand; auto-converge, asked for from the start, lets QEMU
  throttle the guest's vCPUs by itself when it sees no convergence;
- after ``timeout_s`` the job is aborted: libvirt then resumes the guest here and removes what
  it had started at the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import libvirt

from fastcompute.errors import HypervisorError
from fastcompute.hypervisor import targets
from fastcompute.hypervisor.libvirt.xml import NAMESPACE, PREFIX, build
from fastcompute.hypervisor.spec import (
    MigrationFallback,
    MigrationPolicy,
    MigrationProgress,
    MigrationResult,
    MigrationTarget,
)

POLL_S = 0.5
ET.register_namespace(PREFIX, NAMESPACE)  # the instance's metadata keeps its prefix when rewritten
# A pass over memory that leaves at least this share of what the previous one left has not
# converged.
_NOT_CONVERGING = 0.9


def flags(policy: MigrationPolicy, copy_disks: bool) -> int:
    """The migration flags: live, peer to peer, the guest kept defined at the destination;
    disks mirrored when any is copied; the policy's fallback enabled from the start (libvirt
    accepts neither later)."""
    f: int = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
    if copy_disks:
        f |= libvirt.VIR_MIGRATE_NON_SHARED_INC
    if policy.fallback == "auto-converge":
        f |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    elif policy.fallback == "post-copy":
        f |= libvirt.VIR_MIGRATE_POSTCOPY
    return f


def copied_disks(target: MigrationTarget) -> list[str]:
    """The target devices of the disks to mirror: those of ``target.copy_roles``."""
    return [dev for disk, dev in zip(target.guest.disks, targets.assign(target.guest.disks), strict=True)
            if disk.role in target.copy_roles]


def _device_key(dev: ET.Element, seen: dict[str, int]) -> tuple[str, ...]:
    """What names a device in both definitions: a disk its target, an interface its MAC, a
    controller its type and index, anything else its place among its kind."""
    if dev.tag == "disk" and (t := dev.find("target")) is not None:
        return ("disk", t.get("dev", ""))
    if dev.tag == "interface" and (mac := dev.find("mac")) is not None:
        return ("interface", mac.get("address", "").lower())
    if dev.tag == "controller":
        return ("controller", dev.get("type", ""), dev.get("index", "0"))
    seen[dev.tag] = seen.get(dev.tag, -1) + 1
    return (dev.tag, str(seen[dev.tag]))


def with_addresses(xml: str, running: str) -> str:
    """The destination's definition ``xml`` with the device addresses the guest has here
    (``running``, its live definition), and the controllers libvirt added here.

    The guest's hardware must not change under it: a volume or an interface plugged in while it
    ran sits where a free slot was then, where the destination, given all its devices at once,
    would place it elsewhere (libvirt refuses such a migration)."""
    dest, here = ET.fromstring(xml), ET.fromstring(running)
    devices, have = dest.find("devices"), here.find("devices")
    if devices is None or have is None:
        return xml
    seen: dict[str, int] = {}
    theirs = {_device_key(d, seen): d for d in have}
    seen = {}
    mine = {_device_key(d, seen): d for d in devices}
    for key, dev in theirs.items():
        if key[0] == "controller" and key not in mine:
            devices.append(dev)
            continue
        address = dev.find("address")
        if (to := mine.get(key)) is not None and address is not None and to.find("address") is None:
            to.append(address)
    return ET.tostring(dest, encoding="unicode")


def params(target: MigrationTarget, policy: MigrationPolicy, running: str | None = None) -> dict[str, Any]:
    """The migration's parameters: the guest's definition at the destination (with the
    device addresses of ``running``, the guest's definition here), and where its memory and
    disks are sent (its address, not its host name, which need not resolve here)."""
    xml = build(target.guest)
    if running is not None:
        xml = with_addresses(xml, running)
    copied = copied_disks(target)
    p: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{target.address}",
    }
    if copied:
        p[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = copied
        p[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"tcp://{target.address}"
    if policy.bandwidth_mib_s:
        p[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = policy.bandwidth_mib_s
    return p


def downtime_limit(policy: MigrationPolicy, step: int) -> int:
    """The downtime limit after ``step`` raises (0: the start), in ms."""
    step = min(step, policy.downtime_steps)
    if policy.downtime_steps == 0:
        return policy.downtime_start_ms
    span = policy.downtime_max_ms - policy.downtime_start_ms
    return policy.downtime_start_ms + span * step // policy.downtime_steps


class Steering:
    """The steering decisions of one migration, from its statistics (pure: tested alone)."""

    def __init__(self, policy: MigrationPolicy) -> None:
        self.policy = policy
        self.step = 0
        self.fallback: MigrationFallback = "none"
        self._iteration = 0
        self._left_at_pass: int | None = None

    @property
    def limit_ms(self) -> int:
        """The downtime limit now."""
        return downtime_limit(self.policy, self.step)

    def raise_limit(self, iteration: int, memory_remaining: int) -> bool:
        """Whether to raise the downtime limit now that the statistics show ``iteration``."""
        if iteration <= self._iteration:
            return False
        self._iteration = iteration
        before, self._left_at_pass = self._left_at_pass, memory_remaining
        if iteration < 2 or before is None or self.step >= self.policy.downtime_steps:
            return False
        if memory_remaining >= before * _NOT_CONVERGING:
            self.step += 1
            return True
        return False

    def post_copy_now(self, elapsed_s: float) -> bool:
        """Whether to switch to post-copy now (once, by policy, after ``fallback_after_s``)."""
        due = elapsed_s >= self.policy.fallback_after_s
        if self.policy.fallback == "post-copy" and self.fallback == "none" and due:
            self.fallback = "post-copy"
            return True
        return False


def _stat(stats: dict[str, Any], key: str) -> int:
    return int(stats.get(key, 0) or 0)


def progress(stats: dict[str, Any], elapsed_s: float, steering: Steering) -> MigrationProgress:
    """A progress report from the job's statistics."""
    fallback = steering.fallback
    if fallback == "none" and _stat(stats, "auto_converge_throttle") > 0:
        fallback = steering.fallback = "auto-converge"
    return MigrationProgress(
        elapsed_s=elapsed_s, memory_remaining=_stat(stats, "memory_remaining"),
        memory_total=_stat(stats, "memory_total"), disk_remaining=_stat(stats, "disk_remaining"),
        disk_total=_stat(stats, "disk_total"), iteration=_stat(stats, "memory_iteration"),
        downtime_limit_ms=steering.limit_ms, fallback=fallback)


class Migration:
    """One live migration of ``dom`` under way; ``run`` drives it to its end."""

    def __init__(self, dom: Any, target: MigrationTarget, policy: MigrationPolicy, running: str) -> None:
        self.dom = dom
        self.dest_uri = target.uri
        self.policy = policy
        self.steering = Steering(policy)
        self._flags = flags(policy, bool(copied_disks(target)))
        self._params = params(target, policy, running)
        self.aborted: str | None = None

    def abort(self, why: str) -> None:
        """Abort the migration (the guest goes on here); the reason ends up in its error."""
        self.aborted = why
        # No job (yet, or any more): the migration's own end says what happened.
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.abortJob()

    async def run(self, call: Callable[..., Any], on_progress: Callable[[MigrationProgress], None]) -> MigrationResult:
        """Run the migration; ``call`` runs a short libvirt call in the driver's workers."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        start = time.monotonic()

        def settle(exc: BaseException | None) -> None:
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        def migrate() -> None:
            try:
                self.dom.migrateToURI3(self.dest_uri, self._params, self._flags)
            except BaseException as exc:  # handed to the loop, raised there
                loop.call_soon_threadsafe(settle, exc)
            else:
                loop.call_soon_threadsafe(settle, None)

        await call(self.dom.migrateSetMaxDowntime, self.steering.limit_ms, 0)
        threading.Thread(target=migrate, name=f"migrate-{self.dom.UUIDString()[:8]}", daemon=True).start()
        try:
            while not done.done():
                await asyncio.wait([done], timeout=POLL_S)
                if done.done():
                    break
                await self._steer(call, on_progress, time.monotonic() - start)
            await done
        except libvirt.libvirtError as exc:
            why = f" ({self.aborted})" if self.aborted else ""
            raise HypervisorError(f"live migration to {self.dest_uri} failed{why}: {exc.get_error_message()}",
                                  {"destination": self.dest_uri, "aborted": self.aborted}) from None
        except asyncio.CancelledError:
            self.abort("cancelled")
            raise
        total = time.monotonic() - start
        downtime: int | None = None
        try:
            stats = await call(self.dom.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            downtime = _stat(stats, "downtime") if "downtime" in stats else None
        except HypervisorError:
            pass  # the statistics of a finished job are a report, not the outcome
        return MigrationResult(total_s=total, downtime_ms=downtime, downtime_limit_ms=self.steering.limit_ms,
                               fallback=self.steering.fallback)

    async def _steer(self, call: Callable[..., Any], on_progress: Callable[[MigrationProgress], None],
                     elapsed: float) -> None:
        if elapsed >= self.policy.timeout_s:
            self.abort(f"not done after {self.policy.timeout_s:g} s")
            return
        try:
            stats = await call(self.dom.jobStats, 0)
        except HypervisorError:
            return  # between the job's phases: nothing to read this time
        s = self.steering
        if s.raise_limit(_stat(stats, "memory_iteration"), _stat(stats, "memory_remaining")):
            # The switch-over may have begun: the limit then no longer matters.
            with contextlib.suppress(HypervisorError):
                await call(self.dom.migrateSetMaxDowntime, s.limit_ms, 0)
        if s.post_copy_now(elapsed):
            try:
                await call(self.dom.migrateStartPostCopy, 0)
            except HypervisorError:
                s.fallback = "none"
        on_progress(progress(stats, elapsed, s))
