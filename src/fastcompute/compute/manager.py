"""The instance state machine: the only writer of instance state.

Every op takes the instance's lock, checks that the current state allows it (Nova's rules),
records the task, drives the hypervisor, and commits the outcome to the store before the reply
and the ``instance.<uuid>`` event go out. Builds are bounded by a semaphore; claims are taken
before anything is recorded and released exactly once when a build fails or an instance is
deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import shutil
import socket
import time
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from fastcompute import protocol
from fastcompute.config import Config
from fastcompute.errors import AgentError, BadRequest, Conflict, HypervisorError, NotFound
from fastcompute.hypervisor import Driver, PowerEvent
from fastcompute.hypervisor.libvirt.xml import DiskSpec, DomainSpec, GuestCell, Interface, build, interface_xml
from fastcompute.images.cache import ImageCache, ImageSpec
from fastcompute.network import Network
from fastcompute.protocol import Fault, Flavor, InstanceRecord, NumaCell, SpawnArgs
from fastcompute.protocol.ports import Port, SecurityGroup
from fastcompute.resources import numa
from fastcompute.resources.numa_types import NumaRequest, Placement
from fastcompute.resources.tracker import Claim, Tracker
from fastcompute.store import Store

log = logging.getLogger("fastcompute.manager")

Publish = Callable[[str, Any], None]

# vm_state an op needs, the task it runs under, and the vm_state it leads to.
_TRANSITIONS: dict[str, tuple[frozenset[str], str, str]] = {
    "start": (frozenset({"stopped"}), "powering-on", "active"),
    "stop": (frozenset({"active", "paused", "suspended"}), "powering-off", "stopped"),
    "pause": (frozenset({"active"}), "pausing", "paused"),
    "unpause": (frozenset({"paused"}), "unpausing", "active"),
    "suspend": (frozenset({"active", "paused"}), "suspending", "suspended"),
    "resume": (frozenset({"suspended"}), "resuming", "active"),
    "reboot": (frozenset({"active"}), "rebooting", "active"),
    "reboot-hard": (frozenset({"active", "paused", "stopped", "suspended", "error"}), "rebooting-hard", "active"),
}

_VM_STATE_OF_POWER = {
    "running": "active",
    "paused": "paused",
    "suspended": "suspended",
    "shutdown": "stopped",
    "crashed": "stopped",
}

_QUOTA_KEYS = frozenset({
    "quota:cpu_shares", "quota:cpu_quota", "quota:cpu_period", "quota:disk_read_bytes_sec",
    "quota:disk_write_bytes_sec", "quota:disk_read_iops_sec", "quota:disk_write_iops_sec",
})


class Stored(msgspec.Struct, kw_only=True):
    """An instance as the store keeps it: the wire record plus what only the agent needs."""

    record: InstanceRecord
    digest: str
    request_id: str | None = None
    ports: list[Port] = []


def now() -> str:
    """The current time as an RFC 3339 UTC string."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def flavor_request(flavor: Flavor) -> NumaRequest | None:
    """Validate a flavor's extra specs; return its NUMA request (None for a floating guest).

    ``hw:`` keys are Nova's and checked by ``numa.constraints``; ``quota:`` keys must be known
    and non-negative integers. Errors are BAD_REQUEST naming the key.
    """
    prefix = "args.flavor.extra_specs."
    for key, value in flavor.extra_specs.items():
        if key.startswith("quota:"):
            if key not in _QUOTA_KEYS:
                raise BadRequest(f"unknown extra spec {key!r}", {"field": prefix + key, "reason": "unknown quota: key"})
            if not value.isdigit():
                raise BadRequest(f"{key} must be a non-negative integer, not {value!r}",
                                 {"field": prefix + key, "reason": "not a non-negative integer"})
    try:
        return numa.constraints(
            {"vcpus": flavor.vcpus, "memory_mb": flavor.memory_mb, "extra_specs": flavor.extra_specs})
    except BadRequest as exc:
        field = str((exc.details or {}).get("field", ""))
        field = prefix + field if field.startswith("hw:") else "args.flavor." + field
        details = {**(exc.details or {}), "field": field}
        raise BadRequest(exc.message, details) from None


def _image_spec(rec: InstanceRecord) -> ImageSpec:
    i = rec.image
    return ImageSpec(id=i.id, url=i.url, checksum=i.checksum, disk_format=i.disk_format)


def numa_cells(request: NumaRequest | None, placement: Placement | None) -> list[NumaCell] | None:
    """The record's ``numa`` field: one entry per guest cell, with its pinning if dedicated."""
    if request is None or placement is None:
        return None
    cells = []
    for i, (want, got) in enumerate(zip(request["cells"], placement["cells"], strict=True)):
        # String keys: a map on the wire has string keys, which any MessagePack client decodes.
        pinning: dict[str | int, int] | None = {str(v): p for v, p in got["pinning"]} or None
        cells.append(NumaCell(cell=i, host_cell=got["host_cell"], cpus=sorted(want["cpuset"] + want["pcpuset"]),
                              memory_mb=want["memory"], pagesize_kb=got.get("pagesize"), pinning=pinning))
    return cells


_PORT_STATES = frozenset({"active", "stopped", "paused", "suspended"})


def _prefixed(details: dict[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    if not details or "field" not in details:
        return details
    return {**details, "field": prefix + str(details["field"])}


def _address_hints(ports: list[Port]) -> list[str]:
    """``fc.ip=ADDR/PREFIX`` for the first port's first IPv4 address: how a guest without DHCP
    (the project's test image, for one) learns the address its port's rules let through."""
    for port in ports[:1]:
        for fixed in port.fixed_ips:
            if ipaddress.ip_address(fixed.ip).version == 4:
                return [f"fc.ip={fixed.ip}/{fixed.prefix}"]
    return []


class Manager:
    """Owns the instances of this host and every change to them."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        driver: Driver,
        images: ImageCache,
        network: Network,
        publish: Publish,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.driver = driver
        self.images = images
        self.network = network
        self.publish = publish
        self.state_dir = Path(cfg.agent.state_dir)
        self.hostname = cfg.agent.host or socket.gethostname()
        self.instances: dict[str, Stored] = {}
        self.tracker: Tracker | None = None
        self.hypervisor_facts: dict[str, Any] = {}
        self.traits: list[str] = []
        self.enabled = True
        self.disabled_reason: str | None = None
        self.domain_type = "test"
        self._locks: dict[str, asyncio.Lock] = {}
        # port id -> the instance it is given to, so that a spawn's check does not walk them all
        self._port_owners: dict[str, str] = {}
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._build_slots = asyncio.Semaphore(cfg.agent.max_concurrent_builds)
        self._digest_encoder = msgspec.msgpack.Encoder(order="deterministic")
        self._resources_dirty = False
        self.started_at = time.monotonic()

    # -- start-up ------------------------------------------------------------------------------

    async def start(self, tracker: Tracker, facts: dict[str, Any], traits: list[str]) -> None:
        """Load the store, take the stored claims, and reconcile with the hypervisor."""
        self.tracker = tracker
        self.hypervisor_facts = facts
        self.traits = traits
        if self.driver.uri.startswith("test:"):
            self.domain_type = "test"
        elif self.cfg.hypervisor.domain_type == "kvm" and not await self.driver.supports_kvm():
            log.warning("domain_type kvm asked for, but this host offers no KVM; falling back to qemu (TCG)")
            self.domain_type = "qemu"
        else:
            self.domain_type = self.cfg.hypervisor.domain_type
        loaded = await self.store.load()
        status = loaded.settings.get("host_status") or {}
        self.enabled = bool(status.get("enabled", True))
        self.disabled_reason = status.get("reason")
        dec = msgspec.msgpack.Decoder(Stored)
        for uuid, _rid, body in loaded.instances:
            self.instances[uuid] = dec.decode(body)
            self._locks[uuid] = asyncio.Lock()
            self._own_ports(uuid, self.instances[uuid].ports)
        claims = Store.decode_rows(loaded.claims, Claim)
        stale = []
        for uuid, claim in claims.items():
            if uuid in self.instances:
                tracker.restore(uuid, claim)
            else:
                stale.append(uuid)
        if stale:
            log.warning("dropping %d claims of instances the store does not know", len(stale))
            await self.store.write([Store.delete_claim(u) for u in stale])
        await self.reconcile()

    async def reconcile(self) -> None:
        """Bring the store and the hypervisor into agreement after a (re)start."""
        wanted = {u: s.ports for u, s in self.instances.items()
                  if s.ports and s.record.vm_state not in ("error", "deleted")}
        report = await self.network.reconcile(wanted)
        if report.changed:
            log.info("network reconciled: %s", report)
        domains = {d.uuid: d for d in await self.driver.list_domains()}
        for d in domains.values():
            if d.ours and d.uuid not in self.instances:
                log.warning("domain %s carries fastcompute metadata but is unknown to the store; "
                            "leaving it alone", d.uuid)
        inst_root = self.state_dir / "instances"
        if inst_root.is_dir():
            for entry in inst_root.iterdir():
                if entry.name not in self.instances:
                    log.warning("removing leftover files of unknown instance %s", entry.name)
                    await self.images.remove_disk(entry.name)
                    shutil.rmtree(entry, ignore_errors=True)
        for uuid, stored in list(self.instances.items()):
            rec = stored.record
            try:
                await self._reconcile_one(uuid, rec, domains.get(uuid))
            except AgentError as exc:
                log.error("could not reconcile instance %s: %s", uuid, exc.message)

    async def _reconcile_one(self, uuid: str, rec: InstanceRecord, dom: Any) -> None:
        if rec.task_state == "deleting":
            log.info("finishing the interrupted delete of %s", uuid)
            await self._delete_locked(uuid)
            return
        if rec.vm_state == "building":
            log.info("resuming the interrupted build of %s", uuid)
            # Start the build over: whatever it had made before the crash may be half-made.
            if dom is not None:
                await self.driver.destroy(uuid)
            await self.images.remove_disk(uuid)
            self._start_build(uuid)
            return
        if rec.vm_state in ("error", "deleted"):
            return
        if dom is None:
            log.info("instance %s has no domain (host or hypervisor restarted); re-creating it %s",
                     uuid, rec.vm_state)
            power = await self._recreate(uuid, rec.vm_state)
            await self._commit(uuid, vm_state=rec.vm_state, task_state=None, power_state=power)
            return
        if rec.task_state is not None:
            vm_state = _VM_STATE_OF_POWER.get(dom.power_state, rec.vm_state)
            log.info("instance %s was interrupted while %s; it is %s", uuid, rec.task_state, vm_state)
            await self._commit(uuid, vm_state=vm_state, task_state=None, power_state=dom.power_state)
        elif dom.power_state != rec.power_state:
            await self._sync_one(uuid, dom.power_state)

    async def _recreate(self, uuid: str, vm_state: str) -> str:
        start = vm_state in ("active", "paused", "suspended")
        power = await self.driver.launch(self._domain_xml(uuid), start=start)
        if vm_state == "paused":
            power = await self.driver.pause(uuid)
        elif vm_state == "suspended":
            power = await self.driver.suspend(uuid)
        return power

    # -- helpers ---------------------------------------------------------------------------------

    def _get(self, uuid: str) -> Stored:
        stored = self.instances.get(uuid)
        if stored is None:
            raise NotFound(f"no instance {uuid} on this host", {"uuid": uuid})
        return stored

    def instance_dir(self, uuid: str) -> Path:
        """Where an instance's files (disk, console log) live."""
        return self.state_dir / "instances" / uuid

    def _domain_xml(self, uuid: str, skip_taps: frozenset[str] = frozenset()) -> str:
        rec = self.instances[uuid].record
        disk_path = self.instance_dir(uuid) / "disk"
        domain_type = self.domain_type
        return build(DomainSpec(
            uuid=uuid,
            name=rec.name,
            instance_name=rec.name,
            project_id=rec.project_id,
            vcpus=rec.flavor.vcpus,
            memory_mb=rec.flavor.memory_mb,
            disk=DiskSpec(str(disk_path), self.images.disk_format()),
            console_path=str(self.instance_dir(uuid) / "console.log"),
            domain_type=domain_type,
            interfaces=[Interface(p.tap, p.mac, p.mtu) for p in self.network.plugged(uuid) if p.tap not in skip_taps],
            oem_strings=_address_hints(self.instances[uuid].ports),
            **self._placement_xml(uuid),
        ))

    def _placement_xml(self, uuid: str) -> dict[str, Any]:
        """Pinning, NUMA cells and limits of an instance, for its domain XML."""
        specs = self.instances[uuid].record.flavor.extra_specs
        out: dict[str, Any] = {
            "cputune": {k[6:]: int(v) for k, v in specs.items() if k in _QUOTA_KEYS and k.startswith("quota:cpu_")},
            "iotune": {k[11:]: int(v) for k, v in specs.items() if k in _QUOTA_KEYS and k.startswith("quota:disk_")},
        }
        claim = self.tracker.claims.get(uuid) if self.tracker is not None else None
        if claim is None or claim.numa_request is None or claim.numa_placement is None:
            return out
        host_cells = {c["id"]: c for c in self.tracker.numa_host["cells"]} if self.tracker else {}
        cells: list[GuestCell] = []
        vcpupin: dict[int, list[int]] = {}
        for i, (want, got) in enumerate(zip(claim.numa_request["cells"], claim.numa_placement["cells"], strict=True)):
            cells.append(GuestCell(i, sorted(want["cpuset"] + want["pcpuset"]), want["memory"], got["host_cell"],
                                   got.get("pagesize")))
            for vcpu, pcpu in got["pinning"]:
                vcpupin[vcpu] = [pcpu]
            for vcpu in want["cpuset"]:
                vcpupin[vcpu] = list(host_cells[got["host_cell"]]["cpuset"])
        # Emulator threads go to the pCPUs reserved for them (emulator_threads_policy=isolate),
        # else they share the guest's own CPUs, as Nova places them.
        reserved = [p for got in claim.numa_placement["cells"] for p in (got.get("cpuset_reserved") or [])]
        out.update(numa=cells, vcpupin=vcpupin,
                   emulatorpin=reserved or sorted({p for pins in vcpupin.values() for p in pins}))
        return out

    async def _commit(self, uuid: str, *, extra: list[Any] | None = None, **changes: Any) -> InstanceRecord:
        """Apply state changes, make them durable, then publish the event."""
        stored = self.instances[uuid]
        rec = stored.record
        for key, value in changes.items():
            setattr(rec, key, value)
        rec.updated_at = now()
        await self.store.write(
            [self.store.put_instance(uuid, rec.project_id, stored.request_id, stored), *(extra or [])]
        )
        self.publish("instance." + uuid, rec)
        return rec

    def _progress(self, uuid: str) -> Callable[[str, int, int | None], None]:
        """A progress callback for a build's image work: ``progress.<uuid>`` events, at most
        two a second per stage (and always the last of a stage)."""
        last_stage = [""]
        last_at = [0.0]

        def report(stage: str, done: int, total: int | None) -> None:
            t = time.monotonic()
            finished = total is not None and done >= total
            if stage == last_stage[0] and t - last_at[0] < 0.5 and not finished:
                return
            last_stage[0], last_at[0] = stage, t
            self.publish("progress." + uuid, {"uuid": uuid, "stage": stage, "done": done, "total": total})

        return report

    def _mark_resources_changed(self) -> None:
        self._resources_dirty = True

    def take_resources_dirty(self) -> bool:
        """Whether usage changed since the last call (for coalesced host.resources events)."""
        dirty, self._resources_dirty = self._resources_dirty, False
        return dirty

    # -- queries ---------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """``ping``."""
        from fastcompute import __version__

        return {"version": __version__, "uptime_s": round(time.monotonic() - self.started_at, 3)}

    def host_info(self) -> dict[str, Any]:
        """``host.info``."""
        t = self.tracker
        assert t is not None
        return {
            "hostname": self.hostname,
            "hypervisor": self.hypervisor_facts,
            "topology": t.topology(),
            "inventory": t.inventory,
            "usage": dict(t.usage),
            "traits": self.traits + ([] if self.enabled else ["COMPUTE_STATUS_DISABLED"]),
            "generation": t.generation,
            "instances": len(self.instances),
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "numa_host": t.numa_host,
            "server_groups": self._server_groups(),
        }

    def _server_groups(self) -> dict[str, list[str]]:
        """The instances of each server group on this host, as the scheduler marked them
        (``metadata[SERVER_GROUP_KEY]``): how schedulers learn that a member is gone."""
        groups: dict[str, list[str]] = {}
        for uuid, stored in self.instances.items():
            name = stored.record.metadata.get(protocol.SERVER_GROUP_KEY)
            if name:
                groups.setdefault(name, []).append(uuid)
        return groups

    async def set_enabled(self, enabled: bool, reason: str | None) -> dict[str, Any]:
        """``host.set_enabled`` (extension): an operator takes the host out of scheduling or back.

        Schedulers see the ``COMPUTE_STATUS_DISABLED`` trait; spawns sent here directly still run.
        """
        tracker = self.tracker
        assert tracker is not None
        await self.store.write([self.store.put_setting("host_status", {"enabled": enabled, "reason": reason})])
        self.enabled, self.disabled_reason = enabled, (None if enabled else reason)
        tracker.generation += 1
        self._mark_resources_changed()
        log.warning("host %s by the operator%s", "enabled" if enabled else "disabled",
                    f": {reason}" if reason else "")
        return self.host_info()

    def get(self, uuid: str) -> InstanceRecord:
        """``instance.get``."""
        return self._get(uuid).record

    def list_instances(self, project_id: str | None, vm_state: str | None) -> list[InstanceRecord]:
        """``instance.list``."""
        return [
            s.record for s in self.instances.values()
            if (project_id is None or s.record.project_id == project_id)
            and (vm_state is None or s.record.vm_state == vm_state)
        ]

    async def console(self, uuid: str, tail_bytes: int) -> dict[str, bytes]:
        """``instance.console``: the tail of the serial console log."""
        self._get(uuid)
        path = self.instance_dir(uuid) / "console.log"

        def read() -> bytes:
            try:
                with path.open("rb") as f:
                    size = f.seek(0, 2)
                    f.seek(max(0, size - tail_bytes))
                    return f.read()
            except FileNotFoundError:
                return b""

        return {"data": await asyncio.get_running_loop().run_in_executor(None, read)}

    # -- spawn -----------------------------------------------------------------------------------

    async def spawn(self, args: SpawnArgs, request_id: str | None) -> InstanceRecord:
        """``instance.spawn``: claim, record, reply ``building``; the build goes on in a task."""
        tracker = self.tracker
        assert tracker is not None
        uuid = protocol.normalise_uuid(args.uuid) if args.uuid else str(uuid_mod.uuid4())
        if args.image.id is None and args.image.url is None:
            raise BadRequest("image needs an id or a url", {"field": "args.image", "reason": "empty"})
        numa_request = flavor_request(args.flavor)
        ports = await self._validate_ports(args.networks, uuid)
        digest = hashlib.sha1(
            self._digest_encoder.encode(msgspec.structs.replace(args, uuid=uuid, wait=False))
        ).hexdigest()
        existing = self.instances.get(uuid)
        if existing is not None:
            if existing.digest != digest:
                raise Conflict(f"instance {uuid} exists with other arguments", {"uuid": uuid})
            return await self._after_spawn(uuid, args.wait)
        claim = tracker.claim(uuid, args.project_id, args.flavor.vcpus, args.flavor.memory_mb,
                              args.flavor.disk_gb, numa_request)
        ts = now()
        rec = InstanceRecord(
            uuid=uuid, name=args.name, project_id=args.project_id, vm_state="building",
            task_state="spawning", power_state="nostate", flavor=args.flavor, image=args.image,
            host=self.hostname, numa=numa_cells(numa_request, claim.numa_placement), created_at=ts,
            updated_at=ts, metadata=args.metadata,
        )
        stored = Stored(record=rec, digest=digest, request_id=request_id, ports=ports)
        self.instances[uuid] = stored
        self._locks[uuid] = asyncio.Lock()
        self._own_ports(uuid, ports)
        try:
            await self.store.write([
                self.store.put_instance(uuid, rec.project_id, request_id, stored),
                self.store.put_claim(uuid, rec.project_id, claim),
            ])
        except BaseException:
            del self.instances[uuid]
            del self._locks[uuid]
            self._disown_ports(uuid, ports)
            tracker.release(uuid)
            raise
        self._mark_resources_changed()
        self.publish("instance." + uuid, rec)
        self._start_build(uuid)
        return await self._after_spawn(uuid, args.wait)

    async def _after_spawn(self, uuid: str, wait: bool) -> InstanceRecord:
        build = self._builds.get(uuid)
        if wait and build is not None:
            await asyncio.shield(build)
        return self._get(uuid).record

    def _start_build(self, uuid: str) -> None:
        task = asyncio.get_running_loop().create_task(self._build(uuid))
        self._builds[uuid] = task
        task.add_done_callback(lambda _t: self._builds.pop(uuid, None))

    async def _build(self, uuid: str) -> None:
        async with self._locks[uuid], self._build_slots:
            rec = self.instances[uuid].record
            try:
                await self.images.prepare_disk(uuid, _image_spec(rec), rec.flavor.disk_gb, self._progress(uuid))
                if self.instances[uuid].ports:
                    await self.network.plug(uuid, self.instances[uuid].ports)
                power = await self.driver.launch(self._domain_xml(uuid), start=True)
            except AgentError as exc:
                await self._fail_build(uuid, exc)
                return
            except Exception as exc:
                log.exception("build of %s failed unexpectedly", uuid)
                await self._fail_build(uuid, AgentError(f"build failed: {exc}"))
                return
            await self._commit(uuid, vm_state="active", task_state=None, power_state=power)

    async def _fail_build(self, uuid: str, exc: AgentError) -> None:
        log.warning("build of %s failed: %s %s", uuid, exc.code, exc.message)
        tracker = self.tracker
        assert tracker is not None
        try:
            await self.driver.destroy(uuid)
        except HypervisorError as cleanup:
            log.error("could not remove the domain of failed build %s: %s", uuid, cleanup.message)
        await self.images.remove_disk(uuid)
        await self.network.unplug(uuid)
        tracker.release(uuid)
        self._mark_resources_changed()
        await self._commit(uuid, vm_state="error", task_state=None, power_state="nostate",
                           fault=Fault(exc.code, exc.message), extra=[Store.delete_claim(uuid)])

    # -- lifecycle ops ---------------------------------------------------------------------------

    async def transition(self, op: str, uuid: str, **kw: Any) -> InstanceRecord:
        """Run one lifecycle op (start, stop, pause, ...) under the instance's lock."""
        name = "reboot-hard" if op == "reboot" and kw.get("hard") else op
        allowed, task, target = _TRANSITIONS[name]
        self._check(uuid, op, allowed)
        async with self._locks[uuid]:
            rec = self._check(uuid, op, allowed).record
            await self._commit(uuid, task_state=task)
            try:
                power = await self._drive(name, uuid, **kw)
            except AgentError as exc:
                await self._commit(uuid, task_state=None)
                if isinstance(exc, HypervisorError):
                    raise HypervisorError(f"{op} of {uuid} failed: {exc.message}") from None
                raise
            return await self._commit(uuid, vm_state=target, task_state=None, power_state=power,
                                      fault=rec.fault if target != "active" else None)

    def _check(self, uuid: str, op: str, allowed: frozenset[str]) -> Stored:
        stored = self._get(uuid)
        rec = stored.record
        if rec.task_state is not None:
            raise Conflict(f"cannot {op} instance {uuid}: it is busy {rec.task_state}",
                           {"vm_state": rec.vm_state, "task_state": rec.task_state})
        if rec.vm_state not in allowed:
            raise Conflict(
                f"cannot {op} instance {uuid} while it is {rec.vm_state}; "
                f"{op} needs {' or '.join(sorted(allowed))}",
                {"vm_state": rec.vm_state, "allowed": sorted(allowed)},
            )
        return stored

    async def _drive(self, name: str, uuid: str, **kw: Any) -> str:
        d = self.driver
        timeout = kw.get("timeout_s")
        stop_wait = float(timeout) if timeout is not None else self.cfg.hypervisor.shutdown_timeout_s
        actions: dict[str, Callable[[], Awaitable[str]]] = {
            "start": lambda: d.power_on(uuid),
            "stop": lambda: d.power_off(uuid, stop_wait),
            "pause": lambda: d.pause(uuid),
            "unpause": lambda: d.unpause(uuid),
            "suspend": lambda: d.suspend(uuid),
            "resume": lambda: d.power_on(uuid),
            "reboot": lambda: d.reboot(uuid, False),
            "reboot-hard": lambda: self._hard_reboot(uuid),
        }
        return await actions[name]()

    async def _hard_reboot(self, uuid: str) -> str:
        if await self.driver.info(uuid) is not None:
            return await self.driver.reboot(uuid, True)
        # Nova's hard reboot re-creates the domain from the record, which also recovers an
        # instance whose domain was lost or whose build failed; a failed build gave back its
        # claim and its disk, so it takes them again first (or fails with nothing held).
        tracker = self.tracker
        assert tracker is not None
        rec = self.instances[uuid].record
        reclaimed = uuid not in tracker.claims
        if reclaimed:
            claim = tracker.claim(uuid, rec.project_id, rec.flavor.vcpus, rec.flavor.memory_mb,
                                  rec.flavor.disk_gb, flavor_request(rec.flavor))
            await self.store.write([self.store.put_claim(uuid, rec.project_id, claim)])
            rec.numa = numa_cells(claim.numa_request, claim.numa_placement)
            self._mark_resources_changed()
        try:
            if not (self.instance_dir(uuid) / "disk").exists():
                await self.images.prepare_disk(uuid, _image_spec(rec), rec.flavor.disk_gb, self._progress(uuid))
            if self.instances[uuid].ports:
                await self.network.plug(uuid, self.instances[uuid].ports)
            return await self.driver.launch(self._domain_xml(uuid), start=True)
        except AgentError:
            if reclaimed:
                await self.images.remove_disk(uuid)
                await self.network.unplug(uuid)
                tracker.release(uuid)
                rec.numa = None
                await self.store.write([Store.delete_claim(uuid)])
                self._mark_resources_changed()
            raise

    async def _validate_ports(self, raw: list[dict[str, Any]], uuid: str) -> list[Port]:
        if not raw:
            return []
        try:
            ports = await self.network.validate(raw, instance_uuid=uuid)
        except AgentError as exc:
            raise type(exc)(exc.message, _prefixed(exc.details, "args.")) from None
        for p in ports:
            if self._port_owners.get(p.id, uuid) != uuid:
                raise Conflict(f"port {p.id} belongs to another instance on this host", {"port_id": p.id})
        return ports

    def _own_ports(self, uuid: str, ports: Iterable[Port]) -> None:
        for p in ports:
            self._port_owners[p.id] = uuid

    def _disown_ports(self, uuid: str, ports: Iterable[Port]) -> None:
        for p in ports:
            if self._port_owners.get(p.id) == uuid:
                del self._port_owners[p.id]

    async def attach_port(self, uuid: str, raw: dict[str, Any]) -> InstanceRecord:
        """``instance.attach_port`` (extension): plug a port and add it to the domain."""
        self._check(uuid, "attach a port to", _PORT_STATES)
        async with self._locks[uuid]:
            stored = self._check(uuid, "attach a port to", _PORT_STATES)
            port = (await self._validate_ports([raw], uuid))[0]
            if any(p.id == port.id for p in stored.ports):
                raise Conflict(f"port {port.id} is already attached to {uuid}", {"port_id": port.id})
            plugged = await self.network.plug(uuid, [*stored.ports, port])
            tap = next(p for p in plugged if p.port_id == port.id)
            try:
                await self.driver.attach_interface(uuid, interface_xml(Interface(tap.tap, tap.mac, tap.mtu)),
                                                   self._domain_xml(uuid))
            except AgentError:
                await self.network.unplug(uuid, [port.id])
                raise
            stored.ports = [*stored.ports, port]
            self._own_ports(uuid, [port])
            return await self._commit(uuid)

    async def detach_port(self, uuid: str, port_id: str) -> InstanceRecord:
        """``instance.detach_port`` (extension): remove a port from the domain and unplug it."""
        self._check(uuid, "detach a port from", _PORT_STATES)
        async with self._locks[uuid]:
            stored = self._check(uuid, "detach a port from", _PORT_STATES)
            plugged = next((p for p in self.network.plugged(uuid) if p.port_id == port_id), None)
            if plugged is None or not any(p.id == port_id for p in stored.ports):
                raise NotFound(f"instance {uuid} has no port {port_id}", {"port_id": port_id})
            self._disown_ports(uuid, [p for p in stored.ports if p.id == port_id])
            stored.ports = [p for p in stored.ports if p.id != port_id]
            await self.driver.detach_interface(
                uuid, interface_xml(Interface(plugged.tap, plugged.mac, plugged.mtu)),
                self._domain_xml(uuid, skip_taps=frozenset({plugged.tap})))
            await self.network.unplug(uuid, [port_id])
            return await self._commit(uuid)

    async def set_security_groups(self, uuid: str, port_id: str, groups: list[dict[str, Any]]) -> InstanceRecord:
        """``instance.set_security_groups`` (extension): Neutron's port update, in one transaction."""
        stored = self._get(uuid)
        async with self._locks[uuid]:
            port = next((p for p in stored.ports if p.id == port_id), None)
            if port is None:
                raise NotFound(f"instance {uuid} has no port {port_id}", {"port_id": port_id})
            try:
                await self.network.set_security_groups(port_id, groups)
            except AgentError as exc:
                raise type(exc)(exc.message, _prefixed(exc.details, "args.")) from None
            new_groups = [msgspec.convert(g, SecurityGroup) for g in groups]
            stored.ports = [msgspec.structs.replace(p, security_groups=new_groups) if p.id == port_id else p
                            for p in stored.ports]
            return await self._commit(uuid)

    async def delete(self, uuid: str) -> dict[str, Any]:
        """``instance.delete``: allowed from every state; releases disk, network and claim."""
        self._get(uuid)
        async with self._locks[uuid]:
            self._get(uuid)
            await self._commit(uuid, task_state="deleting")
            await self._delete_locked(uuid)
        self._locks.pop(uuid, None)
        return {"uuid": uuid, "deleted": True}

    async def _delete_locked(self, uuid: str) -> None:
        tracker = self.tracker
        assert tracker is not None
        await self.driver.destroy(uuid)
        await self.images.remove_disk(uuid)
        await self.network.unplug(uuid)
        stored = self.instances[uuid]
        await self.store.write([Store.delete_instance(uuid), Store.delete_claim(uuid)])
        tracker.release(uuid)
        del self.instances[uuid]
        self._disown_ports(uuid, stored.ports)
        self._mark_resources_changed()
        rec = stored.record
        rec.vm_state, rec.task_state, rec.power_state, rec.updated_at = "deleted", None, "nostate", now()
        self.publish("instance." + uuid, rec)

    # -- power-state sync ------------------------------------------------------------------------

    def on_power_event(self, event: PowerEvent) -> None:
        """A lifecycle event from the hypervisor (on the event loop)."""
        stored = self.instances.get(event.uuid)
        if stored is None or stored.record.task_state is not None or self._locks[event.uuid].locked():
            return
        if stored.record.power_state != event.power_state:
            asyncio.get_running_loop().create_task(self._sync_one(event.uuid, event.power_state))

    async def sync_power_states(self) -> None:
        """The periodic sync: what events missed (Nova's _sync_power_states)."""
        domains = {d.uuid: d for d in await self.driver.list_domains()}
        for uuid, stored in list(self.instances.items()):
            rec = stored.record
            if rec.task_state is not None or rec.vm_state in ("building", "error"):
                continue
            dom = domains.get(uuid)
            power = dom.power_state if dom is not None else "nostate"
            if power != rec.power_state:
                await self._sync_one(uuid, power)

    async def _sync_one(self, uuid: str, power: str) -> None:
        lock = self._locks.get(uuid)
        if lock is None or lock.locked():
            return
        async with lock:
            stored = self.instances.get(uuid)
            if stored is None or stored.record.task_state is not None:
                return
            rec = stored.record
            vm_state = rec.vm_state
            if vm_state in ("active", "paused") and power in ("shutdown", "crashed"):
                log.warning("instance %s stopped behind our back (%s); marking it stopped", uuid, power)
                vm_state = "stopped"
            elif vm_state == "stopped" and power in ("running", "paused"):
                log.warning("instance %s should be stopped but is %s; stopping it", uuid, power)
                power = await self.driver.power_off(uuid, 0)
            if vm_state != rec.vm_state or power != rec.power_state:
                await self._commit(uuid, vm_state=vm_state, power_state=power)

    # -- shutdown --------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Wait for builds in progress to finish (or leave them to the next start-up)."""
        builds = list(self._builds.values())
        if builds:
            log.info("waiting up to %.0fs for %d builds in progress", timeout_s, len(builds))
            _done, pending = await asyncio.wait(builds, timeout=timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("%d builds left to finish at the next start-up", len(pending))

