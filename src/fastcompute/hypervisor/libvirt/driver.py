"""The libvirt driver: every call runs in a worker thread; events arrive on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, cast

import libvirt
import libvirt_qemu
import libvirtaio

from fastcompute.errors import Conflict, HypervisorError, NotFound
from fastcompute.hypervisor.driver import DomainInfo, PowerEvent
from fastcompute.hypervisor.libvirt import capabilities, consoles, secrets, stats
from fastcompute.hypervisor.libvirt.migration import Migration
from fastcompute.hypervisor.libvirt.names import domain_name, qemu_pid
from fastcompute.hypervisor.libvirt.xml import (
    NAMESPACE,
    USER_ALIAS,
    build,
    disk_aliases,
    disk_snapshot,
    disk_target,
    disk_targets,
    disk_xml,
    interface_xml,
)
from fastcompute.hypervisor.spec import (
    ConsoleEndpoint,
    ConsoleKind,
    CpuMode,
    Disk,
    DomainStats,
    GuestSpec,
    HostFacts,
    HostFeatures,
    HypervisorInfo,
    Interface,
    MigrationPolicy,
    MigrationProgress,
    MigrationResult,
    MigrationTarget,
)
from fastcompute.workers import Workers

log = logging.getLogger("fastcompute.hypervisor")
T = TypeVar("T")

_STATE = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutdown",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
_event_loop_registered = False

# What libvirt answers when a guest's agent is not connected to its channel, does not answer
# guest-sync, or answers too late.
_NO_AGENT: Final = frozenset({libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                              libvirt.VIR_ERR_OPERATION_TIMEOUT})


# Starting a domain can fail for a moment: the kernel's BPF verifier, loading the device
# program libvirt puts on a guest's cgroup, gives up with EAGAIN when a signal reaches the
# loading thread, which happened to one guest of a CI boot storm of eight. Another try works.
_TRANSIENT: Final = os.strerror(errno.EAGAIN)
START_TRIES: Final = 3
DETACH_TRIES: Final = 3
"""How many times a live detach is asked of a guest that has not released the device."""


def start_domain(dom: Any, pause_s: float = 0.05) -> None:
    """Start a defined domain, trying again (up to START_TRIES in all) after a transient error."""
    for attempt in range(1, START_TRIES + 1):
        try:
            dom.create()
            return
        except libvirt.libvirtError as exc:
            message = exc.get_error_message() or str(exc)
            if _TRANSIENT not in message or attempt == START_TRIES:
                raise
            log.warning("starting %s failed (%s); trying again", dom.name(), message)
            time.sleep(pause_s * attempt)


def _quiet_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and logged instead."""


class LibvirtDriver:
    """Drives one libvirt connection; ``qemu_run_dir`` is where libvirt keeps QEMU pid files."""

    def __init__(self, uri: str, workers: int, *, qemu_run_dir: str = "/run/libvirt/qemu") -> None:
        self.uri = uri
        self.qemu_run_dir = qemu_run_dir
        # libvirt's test driver runs every call under one driver-wide lock, so more threads only
        # add contention there; a real hypervisor answers calls for many domains at once.
        self._pool = Workers(1 if uri.startswith("test:") else workers, "libvirt")
        self._conn: Any = None
        self._on_event: Callable[[PowerEvent], None] | None = None
        self._closing = False
        self._reconnect: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._migrations: dict[str, Migration] = {}
        # (domain uuid, device alias) -> the detach waiting for the guest to release it
        self._removals: dict[tuple[str, str], asyncio.Future[None]] = {}

    @property
    def _undefine(self) -> int:
        # A UEFI guest's NVRAM (its firmware variables) goes with its domain, where a plain
        # undefine refuses; the test hypervisor has no NVRAM and takes no flag.
        return 0 if self.uri.startswith("test:") else libvirt.VIR_DOMAIN_UNDEFINE_NVRAM

    @property
    def _secrets(self) -> bool:
        # libvirt's test hypervisor has no secrets: its network disks name theirs unchecked.
        return not self.uri.startswith("test:")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._pool.run(fn, *args)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from None

    # -- connection ----------------------------------------------------------------------------

    async def connect(self, on_power_event: Callable[[PowerEvent], None]) -> None:
        """Open the connection and subscribe to lifecycle events."""
        global _event_loop_registered
        if not _event_loop_registered:
            libvirt.registerErrorHandler(_quiet_libvirt_errors, None)
            libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
            _event_loop_registered = True
        self._on_event = on_power_event
        await self._open()

    async def _open(self) -> None:
        conn = await self._call(libvirt.open, self.uri)
        # The in-process test driver has no other client: every change of a domain's state is
        # one this agent made and recorded, and its events would only cost a dispatch each.
        if not self.uri.startswith("test:"):
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._device_removed, None)
            conn.registerCloseCallback(self._closed, None)
            conn.setKeepAlive(5, 3)
        self._conn = conn
        self.connected.set()

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        if self._closing:
            return
        log.warning("libvirt connection to %s closed (reason %d); reconnecting", self.uri, reason)
        self.connected.clear()
        self._conn = None
        self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                await self._open()
            except HypervisorError as exc:
                log.info("libvirt not back yet (%s); retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.warning("reconnected to %s and re-subscribed to events", self.uri)
            return

    async def close(self) -> None:
        """Close the connection and the worker threads."""
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(HypervisorError):
                await self._call(conn.close)
        self._pool.shutdown()

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        state = {
            libvirt.VIR_DOMAIN_EVENT_STARTED: "running",
            libvirt.VIR_DOMAIN_EVENT_RESUMED: "running",
            libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
            libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "suspended",
        }.get(event)
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED:
                state = "suspended"
            elif detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED:
                state = "crashed"
            else:
                state = "shutdown"
        if state is not None and self._on_event is not None:
            self._on_event(PowerEvent(dom.UUIDString(), state))

    def _device_removed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        waiter = self._removals.get((dom.UUIDString(), alias))
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _ready(self) -> Any:
        if self._conn is None:
            try:
                await asyncio.wait_for(self.connected.wait(), 30)
            except TimeoutError:
                raise HypervisorError(f"no connection to the hypervisor at {self.uri}") from None
        return self._conn

    # -- facts ---------------------------------------------------------------------------------

    async def host_facts(self) -> HostFacts:
        """The host's cells, CPU features and which hypervisor this is, from libvirt."""
        conn = await self._ready()

        def facts() -> HostFacts:
            v = conn.getVersion()
            version = f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
            about = HypervisorInfo(self.uri, conn.getType(), version)
            return capabilities.host_facts(conn.getCapabilities(), conn.getInfo(), about)

        return await self._call(facts)

    async def virt_type(self, wanted: str) -> str:
        """The domain type guests get, logged with the reason: ``test`` on the test driver;
        for ``wanted`` auto, kvm where the host offers it, else qemu (TCG); kvm falls back to
        qemu on a host that offers no KVM; qemu stays qemu."""
        if self.uri.startswith("test:"):
            log.info("domain type test: %s is libvirt's test hypervisor", self.uri)
            return "test"
        if wanted == "qemu":
            log.info("domain type qemu (TCG): [hypervisor] domain_type is qemu")
            return "qemu"
        missing = await self._kvm_missing()
        if missing is None:
            log.info("domain type kvm: domain_type is %s, /dev/kvm is there and libvirt offers KVM domains", wanted)
            return "kvm"
        if wanted == "kvm":
            log.warning("domain_type kvm asked for, but %s; falling back to qemu (TCG)", missing)
        else:
            log.info("domain type qemu (TCG): domain_type is auto and %s", missing)
        return "qemu"

    async def _kvm_missing(self) -> str | None:
        """Why this host cannot have KVM guests, or None when /dev/kvm is there and libvirt
        offers KVM domains.

        It cannot tell whether a KVM guest will actually run (on some nested hosts KVM guests
        stop with an emulation failure), which is why ``auto`` is not the default.
        """
        if not os.path.exists("/dev/kvm"):
            return "there is no /dev/kvm"
        conn = await self._ready()
        try:
            await self._call(conn.getDomainCapabilities, None, None, None, "kvm")
        except HypervisorError as exc:
            return f"libvirt offers no KVM domain ({exc.message})"
        return None

    async def guest_cpu(self, virt_type: str, wanted: str, models: list[str]) -> tuple[CpuMode, str | None]:
        """The CPU mode (and, for ``custom``, the model) guests get, logged with the reason.

        ``auto`` is host-model on kvm and on the test hypervisor, and on qemu (TCG) the custom
        model ``models[0]`` or qemu64 (QEMU's own TCG model: a host-model CPU would be
        emulated feature by feature); where libvirt's domain capabilities report host-model
        unsupported, the custom model too. A configured mode they report unsupported for
        ``virt_type`` (host-passthrough on TCG) is a HypervisorError, as is custom without a
        model.
        """
        mode: CpuMode
        if wanted == "auto":
            mode = "custom" if virt_type == "qemu" else "host-model"
        elif wanted in ("host-model", "host-passthrough", "custom"):
            mode = cast("CpuMode", wanted)
        else:
            raise HypervisorError(f"[hypervisor] cpu_mode {wanted!r} is not a CPU mode")
        model = None
        if mode == "custom":
            if models:
                model = models[0]
            elif wanted == "auto":
                model = "qemu64"
            else:
                raise HypervisorError("[hypervisor] cpu_mode custom needs a model in cpu_models")
        if not self.uri.startswith("test:"):
            supported = await self._cpu_modes(virt_type)
            if supported is not None and not supported.get(mode, False):
                if wanted != "auto":
                    raise HypervisorError(f"[hypervisor] cpu_mode {mode}: libvirt reports it unsupported for "
                                          f"{virt_type} domains on this host")
                log.warning("libvirt reports %s unsupported for %s domains here; guests get a custom CPU",
                            mode, virt_type)
                mode, model = "custom", models[0] if models else "qemu64"
        log.info("guest CPU: %s%s (cpu_mode %s, domain type %s)", mode, f" {model}" if model else "",
                 wanted, virt_type)
        return mode, model

    async def _cpu_modes(self, virt_type: str) -> dict[str, bool] | None:
        """Which CPU modes libvirt supports for ``virt_type`` domains (domain capabilities),
        or None when it cannot say."""
        conn = await self._ready()
        try:
            caps = await self._call(conn.getDomainCapabilities, None, None, None, virt_type)
        except HypervisorError:
            return None
        return capabilities.cpu_modes(caps)

    async def host_features(self, virt_type: str) -> HostFeatures:
        """What guests of ``virt_type`` can have here (UEFI, secure boot, vTPM, machine types),
        from libvirt's capabilities, logged. The test hypervisor is taken to have everything;
        a host whose libvirt cannot say has none of it."""
        if self.uri.startswith("test:"):
            return HostFeatures(uefi=True, secure_boot=True, tpm_versions=["1.2", "2.0"],
                                tpm_models=["tpm-tis", "tpm-crb"])
        conn = await self._ready()
        try:
            caps = await self._call(conn.getCapabilities)
            pc = await self._call(conn.getDomainCapabilities, None, "x86_64", None, virt_type)
        except HypervisorError as exc:
            log.warning("no domain capabilities (%s): guests get no UEFI, secure boot or vTPM", exc.message)
            return HostFeatures()
        try:
            q35: str | None = await self._call(conn.getDomainCapabilities, None, "x86_64", "q35", virt_type)
        except HypervisorError:
            q35 = None
        found = capabilities.host_features(pc, q35, caps)
        log.info("guest features: UEFI %s, secure boot %s, vTPM versions %s (models %s), %d machine types",
                 "yes" if found.uefi else "no", "yes" if found.secure_boot else "no",
                 ", ".join(found.tpm_versions) or "none", ", ".join(found.tpm_models) or "none", len(found.machines))
        return found

    # -- domains -------------------------------------------------------------------------------

    def _lookup(self, conn: Any, uuid: str) -> Any:
        return conn.lookupByUUIDString(uuid)

    @staticmethod
    def _power(dom: Any) -> str:
        state = dom.state()[0]
        if state == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage():
            return "suspended"
        return _STATE.get(state, "nostate")

    async def launch(self, guest: GuestSpec, start: bool) -> str:
        """Define a guest's domain and (optionally) start it; returns its power state."""
        conn = await self._ready()
        xml = build(guest)

        def run() -> str:
            if self._secrets:
                secrets.define(conn, guest.uuid, [d.auth for d in guest.disks if d.auth is not None])
            dom = conn.defineXML(xml)
            if start:
                try:
                    start_domain(dom)
                except libvirt.libvirtError:
                    dom.undefineFlags(self._undefine)
                    raise
                return "running"
            return "shutdown"

        return await self._call(run)

    async def power_on(self, uuid: str) -> str:
        """Start a defined domain (restoring its managed save if it has one)."""
        conn = await self._ready()

        def run() -> str:
            dom = self._lookup(conn, uuid)
            if not dom.isActive():
                start_domain(dom)
            return self._power(dom)

        return await self._call(run)

    async def power_off(self, uuid: str, timeout_s: float) -> str:
        """ACPI shutdown, waiting up to ``timeout_s``; then a forced stop."""
        conn = await self._ready()
        dom = await self._call(self._lookup, conn, uuid)

        def begin() -> bool:
            if dom.hasManagedSaveImage():
                dom.managedSaveRemove()
            if not dom.isActive():
                return False
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED or timeout_s <= 0:
                dom.destroy()
                return False
            dom.shutdown()
            return True

        if await self._call(begin):
            deadline = time.monotonic() + timeout_s
            delay = 0.01
            while await self._call(dom.isActive):
                if time.monotonic() >= deadline:
                    log.info("domain %s ignored ACPI shutdown for %.0fs; forcing it off", uuid, timeout_s)
                    try:
                        await self._call(dom.destroy)
                    except HypervisorError:
                        if await self._call(dom.isActive):
                            raise
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        return "shutdown"

    async def pause(self, uuid: str) -> str:
        """Pause a running domain."""
        return await self._simple(uuid, lambda d: d.suspend())

    async def unpause(self, uuid: str) -> str:
        """Resume a paused domain."""
        return await self._simple(uuid, lambda d: d.resume())

    async def suspend(self, uuid: str) -> str:
        """Managed save: the guest's memory goes to disk and the domain stops."""
        return await self._simple(uuid, lambda d: d.managedSave())

    async def reboot(self, uuid: str, hard: bool) -> str:
        """Soft (ACPI) or hard (destroy and start again) reboot."""

        def do(dom: Any) -> None:
            if hard:
                if dom.hasManagedSaveImage():
                    dom.managedSaveRemove()
                if dom.isActive():
                    dom.destroy()
                start_domain(dom)
            else:
                dom.reboot()

        return await self._simple(uuid, do)

    async def _simple(self, uuid: str, action: Callable[[Any], object]) -> str:
        conn = await self._ready()

        def run() -> str:
            dom = self._lookup(conn, uuid)
            action(dom)
            return self._power(dom)

        return await self._call(run)

    async def attach_interface(self, uuid: str, iface: Interface, guest: GuestSpec) -> None:
        """Add an interface to a domain: live and persistent where the driver can hot-plug,
        else (libvirt's test driver) by defining ``guest``, taking effect at next start."""
        await self._change_device(uuid, interface_xml(iface, guest), build(guest), attach=True)

    async def detach_interface(self, uuid: str, iface: Interface, guest: GuestSpec) -> None:
        """Remove an interface from a domain (see ``attach_interface``)."""
        await self._change_device(uuid, interface_xml(iface, guest), build(guest), attach=False)

    async def _change_device(self, uuid: str, device_xml: str, domain_xml: str, attach: bool) -> None:
        conn = await self._ready()
        await self._call(self._device, conn, uuid, device_xml, domain_xml, attach)

    # -- volumes --------------------------------------------------------------------------------

    async def attach_volume(self, uuid: str, disk: Disk, guest: GuestSpec) -> None:
        """Add a volume's disk (``disk.target`` its device): live and persistent on a running
        domain, persistent on a stopped one (libvirt's test hypervisor, which cannot hot-plug:
        by defining ``guest``). Its secret is defined first; when the attach fails (QEMU cannot
        reach the target, say) the secret goes again, and the domain is as it was."""
        conn = await self._ready()
        assert disk.target is not None
        device = disk_xml(disk, disk.target)
        domain = build(guest)

        def run() -> None:
            if self._secrets:
                secrets.define(conn, uuid, [disk.auth] if disk.auth is not None else [])
            try:
                self._device(conn, uuid, device, domain, attach=True)
            except BaseException:
                if self._secrets:
                    secrets.remove(conn, disk.auth)
                raise

        await self._call(run)

    async def prepare_volumes(self, uuid: str, guest: GuestSpec) -> None:
        """Make ready here the volumes of a guest that is to arrive (a live migration's
        destination): the secrets its network disks name. The disks themselves are reached by
        QEMU, which connects when the guest comes; nothing is attached on the host."""
        if not self._secrets:
            return
        conn = await self._ready()
        await self._call(secrets.define, conn, uuid, [d.auth for d in guest.disks if d.auth is not None])

    def _device(self, conn: Any, uuid: str, device_xml: str, domain_xml: str, attach: bool,
                live: bool = True) -> None:
        """Attach or detach a device, live too on a running domain (unless not ``live``); a
        hypervisor that cannot (libvirt's test driver) gets the domain defined as ``domain_xml``."""
        dom = self._lookup(conn, uuid)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if live and dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            (dom.attachDeviceFlags if attach else dom.detachDeviceFlags)(device_xml, flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            conn.defineXML(domain_xml)

    async def detach_volume(self, uuid: str, disk: Disk, guest: GuestSpec, timeout_s: float) -> None:
        """Remove a volume's disk. A running guest must release the device first (QEMU's
        detach is a request to the guest): the request is sent, the device-removed event
        awaited, the request sent again, up to ``DETACH_TRIES`` times within ``timeout_s``;
        a device still there after that is a HypervisorError and stays attached (live and
        persistent). Then the persistent definition loses it and its secret goes."""
        conn = await self._ready()
        assert disk.target is not None
        device = disk_xml(disk, disk.target)
        domain = build(guest)
        dom = await self._call(self._lookup, conn, uuid)
        # The test hypervisor cannot unplug: its guest loses the disk at its next start.
        if await self._call(dom.isActive) and not self.uri.startswith("test:"):
            await self._release(conn, dom, uuid, disk, device, timeout_s)

        def persistent() -> None:
            try:
                self._device(conn, uuid, device, domain, attach=False, live=False)
            except libvirt.libvirtError as exc:
                # Gone from both definitions already (the live detach took the persistent one).
                if exc.get_error_code() not in (libvirt.VIR_ERR_DEVICE_MISSING, libvirt.VIR_ERR_OPERATION_FAILED):
                    raise
            if self._secrets:
                secrets.remove(conn, disk.auth)

        await self._call(persistent)

    async def _release(self, conn: Any, dom: Any, uuid: str, disk: Disk, device: str, timeout_s: float) -> None:
        key = (uuid, USER_ALIAS + (disk.alias or ""))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._removals[key] = waiter
        dev = disk.target

        def present() -> bool:
            return dev in disk_targets(dom.XMLDesc(0))

        def ask() -> None:
            try:
                dom.detachDeviceFlags(device, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                # Already on its way out (an earlier request the guest is still acting on),
                # or gone: the event or the look that follows says which.
                if exc.get_error_code() not in (libvirt.VIR_ERR_DEVICE_MISSING, libvirt.VIR_ERR_OPERATION_FAILED,
                                                libvirt.VIR_ERR_OPERATION_INVALID):
                    raise

        try:
            for attempt in range(1, DETACH_TRIES + 1):
                if not await self._call(present):
                    return
                await self._call(ask)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), timeout_s / DETACH_TRIES)
                    return
                log.info("guest %s has not released %s yet (try %d of %d)", uuid, dev, attempt, DETACH_TRIES)
            if await self._call(present):
                raise HypervisorError(f"the guest of {uuid} did not release {dev} within {timeout_s:g}s; "
                                      "it stays attached (try again, or stop the instance and detach)")
        finally:
            self._removals.pop(key, None)

    async def extend_volume(self, uuid: str, disk: Disk, size_bytes: int) -> bool:
        """Tell a running domain that a volume's disk is now ``size_bytes`` (blockResize);
        False when the domain does not run (its guest reads the size at its next start) or
        the hypervisor cannot resize (libvirt's test hypervisor)."""
        conn = await self._ready()

        def run() -> bool:
            dom = self._lookup(conn, uuid)
            if not dom.isActive():
                return False
            try:
                dom.blockResize(disk.target, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                return False
            return True

        return await self._call(run)

    async def volume_devices(self, uuid: str) -> dict[str, str]:
        """The disks of the domain (live when it runs) that carry our alias: alias -> device."""
        conn = await self._ready()
        return disk_aliases(await self._call(lambda: str(self._lookup(conn, uuid).XMLDesc(0))))

    async def destroy(self, uuid: str) -> None:
        """Stop and undefine a domain, with its managed save; absent domains are fine."""
        conn = await self._ready()

        def run() -> None:
            try:
                dom = self._lookup(conn, uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                if self._secrets:
                    secrets.remove_instance(conn, uuid)  # an attach interrupted before its domain existed
                return
            name = dom.name()
            if dom.isActive():
                dom.destroy()
            if dom.hasManagedSaveImage():
                dom.managedSaveRemove()
            dom.undefineFlags(self._undefine)
            if self._secrets:
                secrets.remove_instance(conn, uuid)
            if self.uri.startswith("qemu:"):
                # libvirt keeps the QEMU log of a domain forever; a deleted instance leaves nothing.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/var/log/libvirt/qemu/{name}.log")

        await self._call(run)

    async def info(self, uuid: str) -> DomainInfo | None:
        """A domain's state, or None when it does not exist."""
        conn = await self._ready()

        def run() -> DomainInfo | None:
            try:
                dom = self._lookup(conn, uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            return self._describe(dom)

        return await self._call(run)

    def _describe(self, dom: Any) -> DomainInfo:
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE)
            ours = True
        except libvirt.libvirtError:
            ours = False
        return DomainInfo(dom.UUIDString(), self._power(dom), ours, bool(dom.hasManagedSaveImage()))

    async def list_domains(self) -> list[DomainInfo]:
        """Every domain of the hypervisor, ours or not."""
        conn = await self._ready()

        def run() -> list[DomainInfo]:
            found = []
            for dom in conn.listAllDomains():
                try:
                    found.append(self._describe(dom))
                except libvirt.libvirtError as exc:
                    # Gone between the listing and the look: someone else's transient domain,
                    # or one being deleted right now.
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return found

        return await self._call(run)

    async def domain_xml(self, uuid: str, persistent: bool = False) -> str:
        """A domain's XML as libvirt holds it, live or (``persistent``) its definition (for
        tests and an operator's debugging; the test hypervisor lives inside the agent's
        process, so this is the only way to see it)."""
        conn = await self._ready()
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if persistent else 0
        return await self._call(lambda: str(self._lookup(conn, uuid).XMLDesc(flags)))

    async def console_endpoint(self, uuid: str, kind: ConsoleKind) -> ConsoleEndpoint:
        """Where the running domain's ``kind`` console is, from its live XML (NotFound without
        a domain, Conflict when it has no such console or does not run)."""
        conn = await self._ready()

        def run() -> str:
            try:
                return str(self._lookup(conn, uuid).XMLDesc(0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise NotFound(f"no domain for instance {uuid}", {"uuid": uuid}) from None
                raise

        return consoles.endpoint(await self._call(run), kind, uuid)

    # -- the guest agent ------------------------------------------------------------------------

    async def guest_agent_ping(self, uuid: str, timeout_s: float) -> bool:
        """Whether the running guest's QEMU guest agent answers ``guest-ping`` within
        ``timeout_s``. On the test hypervisor a running guest's agent is the test driver
        itself, which answers setUserPassword, fsFreeze and fsThaw."""
        test = self.uri.startswith("test:")

        def ping(dom: Any) -> None:
            if not test:
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', max(1, round(timeout_s)), 0)

        try:
            await self._agent(uuid, timeout_s, ping)
        except Conflict:
            return False
        return True

    async def set_password(self, uuid: str, user: str, password: str, timeout_s: float) -> None:
        """Set ``user``'s password in the guest through its agent (``guest-set-user-password``)."""
        await self._agent(uuid, timeout_s, lambda dom: dom.setUserPassword(user, password, 0), secret=password)

    async def freeze_filesystems(self, uuid: str, timeout_s: float) -> int:
        """Freeze the guest's file systems (``guest-fsfreeze-freeze``); how many it froze."""
        return int(await self._agent(uuid, timeout_s, lambda dom: dom.fsFreeze()))

    async def thaw_filesystems(self, uuid: str, timeout_s: float) -> int:
        """Thaw the guest's file systems (``guest-fsfreeze-thaw``); how many it thawed."""
        return int(await self._agent(uuid, timeout_s, lambda dom: dom.fsThaw()))

    async def _agent(self, uuid: str, timeout_s: float, command: Callable[[Any], T], secret: str = "") -> T:
        """Run a guest-agent command on a running domain: NotFound without a domain, Conflict
        when it does not run or its agent is not there or does not answer in time."""
        conn = await self._ready()
        test = self.uri.startswith("test:")

        def run() -> T:
            dom = self._lookup(conn, uuid)
            if not dom.isActive() or dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                raise Conflict(f"instance {uuid} is not running: its guest agent cannot answer", {"uuid": uuid})
            if not test:
                # The agent's answer is awaited for this long, not libvirt's default (for ever).
                dom.agentSetResponseTimeout(max(1, round(timeout_s)), 0)
            return command(dom)

        try:
            return await self._pool.run(run)
        except libvirt.libvirtError as exc:
            message = exc.get_error_message() or str(exc)
            if secret:
                message = message.replace(secret, "***")
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"no domain for instance {uuid}", {"uuid": uuid}) from None
            if code in _NO_AGENT:
                raise Conflict(f"instance {uuid}: the guest runs no guest agent, or it does not answer "
                               f"({message})", {"uuid": uuid, "reason": "no guest agent"}) from None
            if code == libvirt.VIR_ERR_OPERATION_INVALID:
                raise Conflict(f"instance {uuid}: {message}", {"uuid": uuid}) from None
            raise HypervisorError(f"libvirt: {message}") from None

    # -- disk snapshots -------------------------------------------------------------------------

    async def freeze_disk(self, uuid: str, disk: str, overlay: str) -> bool:
        """Make the running domain's ``disk`` a point-in-time copy: a disk-only external
        snapshot sends its writes to the new qcow2 ``overlay`` from here on. False when nothing
        writes ``disk`` anyway (the domain does not run, or the test hypervisor's disks)."""
        if self.uri.startswith("test:"):
            return False
        conn = await self._ready()

        def run() -> bool:
            dom = self._lookup(conn, uuid)
            if not dom.isActive():
                return False
            snapshot, _target = disk_snapshot(dom.XMLDesc(0), disk, overlay)
            dom.snapshotCreateXML(snapshot, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
            log.info("domain %s: writes go to %s while %s is copied", uuid, overlay, disk)
            return True

        try:
            return await self._call(run)
        except ValueError as exc:
            raise HypervisorError(f"instance {uuid}: {exc}") from None

    async def merge_disk(self, uuid: str, disk: str, overlay: str) -> None:
        """Merge ``overlay`` (from :meth:`freeze_disk`) back into ``disk`` and remove it: an
        active block commit into its backing file, then a pivot, while the guest runs; with
        ``qemu-img commit`` when the domain no longer runs (a crash in between)."""
        conn = await self._ready()

        def target() -> tuple[Any, str | None]:
            try:
                dom = self._lookup(conn, uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None, None
                raise
            return dom, (disk_target(dom.XMLDesc(0), overlay) if dom.isActive() else None)

        dom, dev = await self._call(target)
        if dev is None:
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "commit", "-q", "-f", "qcow2", overlay,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise HypervisorError(f"merging {overlay} back failed: {err.decode(errors='replace')[-300:]}")
        else:
            flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
            await self._call(lambda: dom.blockCommit(dev, None, None, 0, flags))
            while True:
                info = await self._call(lambda: dom.blockJobInfo(dev, 0))
                if info and info.get("end", 0) > 0 and info.get("cur") == info.get("end"):
                    break
                if not info:
                    raise HypervisorError(f"the block commit of {overlay} ended before it was ready")
                await asyncio.sleep(0.05)
            await self._call(lambda: dom.blockJobAbort(dev, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT))
            while await self._call(lambda: dom.blockJobInfo(dev, 0)):
                await asyncio.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(overlay)
        log.info("domain %s: %s merged back into %s (%s)", uuid, overlay, disk,
                 "active block commit" if dev is not None else "qemu-img commit")

    # -- statistics ----------------------------------------------------------------------------

    async def live_migrate(self, uuid: str, target: MigrationTarget, policy: MigrationPolicy,
                           on_progress: Callable[[MigrationProgress], None]) -> MigrationResult:
        """Move a running guest to ``target`` while it runs (see ``hypervisor.libvirt.migration``)."""
        if self.uri.startswith("test:"):
            raise HypervisorError("the test hypervisor cannot migrate guests live")
        if uuid in self._migrations:
            raise Conflict(f"instance {uuid} is already migrating")
        conn = await self._ready()
        dom = await self._call(self._lookup, conn, uuid)
        running = await self._call(dom.XMLDesc, 0)
        migration = self._migrations[uuid] = Migration(dom, target, policy, running)
        try:
            return await migration.run(self._call, on_progress)
        finally:
            del self._migrations[uuid]

    async def abort_migration(self, uuid: str) -> bool:
        """Abort a live migration under way; False when there is none."""
        migration = self._migrations.get(uuid)
        if migration is None:
            return False
        await self._call(migration.abort, "aborted by request")
        return True

    def domain_stats(self, domains: Mapping[str, str]) -> dict[str, DomainStats]:
        """Counters of the active domains in ``domains`` (domain UUID -> key), in one call.

        Blocking, for a worker thread: a libvirt connection may be used from any thread, and
        the stats read need not wait behind lifecycle calls in the driver's own workers.
        """
        conn = self._conn
        if conn is None:
            raise HypervisorError(f"no connection to the hypervisor at {self.uri}")
        try:
            return stats.read(conn, domains)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from None

    def guest_pid(self, uuid: str) -> int | None:
        """The pid of a running guest's QEMU process; None on the test driver, which runs
        guests in its own process. NotFound when libvirt has no pid file for it. Blocking."""
        if self.uri.startswith("test:"):
            return None
        return qemu_pid(domain_name(uuid), self.qemu_run_dir)

    async def inject_nmi(self, uuid: str) -> None:
        """Send a non-maskable interrupt to a running domain (``virDomainInjectNMI``): a
        kernel set up for it panics and dumps; Conflict when the domain does not run."""
        conn = await self._ready()

        def run() -> None:
            dom = self._lookup(conn, uuid)
            if not dom.isActive():
                raise Conflict(f"instance {uuid} is not running: there is no guest to interrupt", {"uuid": uuid})
            dom.injectNMI(0)

        try:
            await self._pool.run(run)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise Conflict(f"instance {uuid} has no domain: there is no guest to interrupt",
                               {"uuid": uuid}) from None
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from None
