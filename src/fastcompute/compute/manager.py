"""The instance state machine: the only writer of instance state.

Every op takes the instance's lock, checks that the current state allows it (Nova's rules),
records the task, drives the hypervisor, and commits the outcome to the store before the reply
and the ``instance.<uuid>`` event go out. Builds are bounded by a semaphore; claims are taken
before anything is recorded and released exactly once when a build fails or an instance is
deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import socket
import time
import uuid as uuid_mod
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from fastcompute import protocol
from fastcompute.compute import configdrive, guest, volumes
from fastcompute.compute.cpu import HostCpu, check_traits, trait_features
from fastcompute.compute.hardware import check_host, hardware, security_traits
from fastcompute.compute.migration import Migrations
from fastcompute.compute.records import Stored, image_spec, now, numa_cells
from fastcompute.compute.validate import flavor_request
from fastcompute.config import Config
from fastcompute.errors import AgentError, Conflict, HypervisorError, NotFound
from fastcompute.hypervisor import DomainInfo, Driver, GuestSpec, HypervisorInfo, Interface, PowerEvent
from fastcompute.hypervisor.spec import HostFeatures
from fastcompute.images import disks, iso
from fastcompute.images.cache import ImageCache
from fastcompute.network import Network
from fastcompute.protocol import Deleted, Fault, HostInfo, InstanceRecord, Inventory, PingResult, SpawnArgs
from fastcompute.protocol.ports import Port
from fastcompute.resources.tracker import Claim, Tracker
from fastcompute.store import Store

log = logging.getLogger("fastcompute.manager")

Publish = Callable[[str, Any], None]

# The lifecycle ops by their short name ("stop"): their rules are declared in protocol.ops.
_LIFECYCLE: dict[str, protocol.Op] = {
    op.name.removeprefix("instance."): op for op in protocol.OPS.values() if op.transition is not None
}
# What the guest agent's ops need: a running guest (a paused one's agent cannot answer).
_ACTIVE = frozenset({"active"})

_VM_STATE_OF_POWER = {
    "running": "active",
    "paused": "paused",
    "suspended": "suspended",
    "shutdown": "stopped",
    "crashed": "stopped",
}

# States in which an instance has nothing on this host (no domain, disk, plugged port, claim).
_HOSTLESS = frozenset({"error", "deleted", "shelved_offloaded"})


def prefixed(details: dict[str, object] | None, prefix: str) -> dict[str, object] | None:
    """An error's details with ``prefix`` before the field they name (a port's checks name its
    fields; the op's reply names them under ``args.``)."""
    if not details or "field" not in details:
        return details
    return {**details, "field": prefix + str(details["field"])}


def _typed(exc: Exception, what: str) -> AgentError:
    """The typed error an op's reply (or a build's fault) carries for ``exc``.

    Anything but an AgentError is a bug met while driving the instance: it is logged with its
    traceback, and the client learns which op failed on this host and why, not just INTERNAL.
    """
    if isinstance(exc, AgentError):
        return exc
    log.error("%s failed unexpectedly", what, exc_info=exc)
    return HypervisorError(f"{what} failed: {exc}")


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
        network.shaping_of = lambda uuid: guest.port_shaping(self.instances.get(uuid))
        self.publish = publish
        self.state_dir = Path(cfg.agent.state_dir)
        self.hostname = cfg.agent.host or socket.gethostname()
        self.instances: dict[str, Stored] = {}
        self.tracker: Tracker | None = None
        self.hypervisor_facts: HypervisorInfo | None = None
        self.traits: list[str] = []
        self.enabled = True
        self.disabled_reason: str | None = None
        self.domain_type = "test"
        self.host_cpu: HostCpu | None = None
        self.host_features = HostFeatures()
        self._locks: dict[str, asyncio.Lock] = {}
        # port id -> the instance it is given to, so that a spawn's check does not walk them all
        self._port_owners: dict[str, str] = {}
        self._builds: dict[str, asyncio.Task[InstanceRecord | None]] = {}
        # uuid -> deletes of it asked for and not yet over: a spawn of one is CONFLICT, and a
        # build in progress stops before its next stage
        self._deleting: Counter[str] = Counter()
        self._build_slots = asyncio.Semaphore(cfg.agent.max_concurrent_builds)
        # A build's image fetch, which runs before the build takes a slot and which a delete
        # or the agent stopping cancels; and the tenant's Glance token of a spawn, kept in
        # memory only until its build has fetched (never stored, logged or in a record).
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self._image_tokens: dict[str, str] = {}
        self._digest_encoder = msgspec.msgpack.Encoder(order="deterministic")
        self._resources_dirty = False
        self.started_at = time.monotonic()
        # The workflows of other modules (compute/rebuild.py, rescue.py, snapshot.py...): how
        # start-up finishes or rolls back their tasks (task_state, "" for an instance with no
        # task -> True when that settled the instance, False to reconcile it as usual), and
        # what a delete also removes (their images).
        self.resumers: dict[str, Callable[[str, DomainInfo | None], Awaitable[bool]]] = {}
        self.on_delete: list[Callable[[Stored], Awaitable[None]]] = []
        # Start-up steps of other modules before anything is reconciled (compute/evacuate.py
        # drops the instances evacuated elsewhere while this host was down).
        self.before_reconcile: list[Callable[[], Awaitable[None]]] = []
        self.migrations = Migrations(self)
        self._held: set[str] = set()  # what moves hold: the start-up leaves it to them

    # -- start-up ------------------------------------------------------------------------------

    async def start(self, tracker: Tracker, facts: HypervisorInfo, traits: list[str],
                    cpu_features: Iterable[str] = ()) -> None:
        """Load the store, take the stored claims, and reconcile with the hypervisor.

        ``traits`` are the host's CPU and custom traits (its TPM and secure-boot ones are added
        here), ``cpu_features`` its CPU's feature names."""
        self.tracker = tracker
        self.hypervisor_facts = facts
        self.domain_type = await self.driver.virt_type(self.cfg.hypervisor.domain_type)
        self.host_features = await self.driver.host_features(self.domain_type)
        self.traits = sorted(set(traits) | set(security_traits(self.host_features)))
        hv = self.cfg.hypervisor
        mode, model = await self.driver.guest_cpu(self.domain_type, hv.cpu_mode, hv.cpu_models)
        self.host_cpu = HostCpu(shared=tracker.shared_cpus, shared_configured=bool(self.cfg.resources.cpu_shared_set),
                                mode=mode, model=model, extra_flags=hv.cpu_model_extra_flags,
                                features=trait_features(cpu_features), traits=frozenset(self.traits))
        loaded = await self.store.load()
        status = loaded.settings.get("host_status") or {}
        self.enabled = bool(status.get("enabled", True))
        self.disabled_reason = status.get("reason")
        dec = msgspec.msgpack.Decoder(Stored)
        for uuid, _rid, body in loaded.instances:
            self.instances[uuid] = dec.decode(body)
            self._locks[uuid] = asyncio.Lock()
            self._own_ports(uuid, self.instances[uuid].ports)
        self._held = self.migrations.load(loaded.migrations)
        claims = Store.decode_rows(loaded.claims, Claim)
        stale = []
        for uuid, claim in claims.items():
            if uuid in self.instances or uuid in self._held:
                tracker.restore(uuid, claim)
            else:
                stale.append(uuid)
        if stale:
            log.warning("dropping %d claims of instances the store does not know", len(stale))
            await self.store.write([Store.delete_claim(u) for u in stale])
        for step in self.before_reconcile:
            await step()
        await self.reconcile()

    async def reconcile(self) -> None:
        """Bring the store and the hypervisor into agreement after a (re)start."""
        wanted = {u: s.ports for u, s in self.instances.items()
                  if s.ports and s.record.vm_state not in _HOSTLESS and u not in self._held}
        wanted.update(self.migrations.incoming_ports())
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
                if entry.name not in self.instances and entry.name not in self._held:
                    log.warning("removing leftover files of unknown instance %s", entry.name)
                    await self.images.remove_disk(entry.name)
                    shutil.rmtree(entry, ignore_errors=True)
        for uuid, stored in [(u, s) for u, s in self.instances.items() if u not in self._held]:
            rec = stored.record
            try:
                await self._reconcile_one(uuid, rec, domains.get(uuid))
            except AgentError as exc:
                log.error("could not reconcile instance %s: %s", uuid, exc.message)

    async def _reconcile_one(self, uuid: str, rec: InstanceRecord, dom: DomainInfo | None) -> None:
        resume = self.resumers.get(rec.task_state or "")
        if resume is not None and await resume(uuid, dom):
            return
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
        if rec.vm_state in _HOSTLESS:
            return
        await volumes.settle(self, uuid, dom is not None, self.cfg.hypervisor.volume_detach_timeout_s)
        if self._drive_wanted(uuid) and not disks.path(self.instance_dir(uuid), "config").exists():
            log.info("re-making the missing config drive of %s", uuid)
            await self._write_config_drive(uuid)
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
        start = vm_state in ("active", "paused", "suspended", "rescued") or (
            vm_state == "resized" and self.instances[uuid].record.power_state == "running")
        power = await self.driver.launch(self._guest(uuid), start=start)
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

    def _guest(self, uuid: str, skip_taps: frozenset[str] = frozenset(), stored: Stored | None = None) -> GuestSpec:
        """The instance as the driver is to run it (without the taps in ``skip_taps``);
        ``stored``: one not (yet) this host's, an incoming live migration's."""
        stored = stored or self.instances[uuid]
        idir = self.instance_dir(uuid)
        tracker = self.tracker
        drive = stored.bootstrap is not None and stored.bootstrap.config_drive
        return guest.guest_spec(
            stored.record, stored.ports, idir,
            disks=volumes.instance_disks(uuid, stored, idir, self.images.disk_format(), drive),
            interfaces=[Interface(p.tap, p.mac, p.mtu) for p in self.network.plugged(uuid) if p.tap not in skip_taps],
            claim=tracker.claims.get(uuid) if tracker is not None else None,
            numa_host=tracker.numa_host if tracker is not None else None,
            virt_type=self.domain_type,
            host_cpu=self.host_cpu,
            console=self.cfg.console,
        )

    def _drive_wanted(self, uuid: str) -> bool:
        boot = self.instances[uuid].bootstrap
        return boot is not None and boot.config_drive

    def metadata_documents(self, uuid: str) -> dict[str, bytes] | None:
        """What the instance is told by the metadata service: the documents of its config drive
        and the EC2 versions a drive leaves out (an instance stored before bootstrap data existed
        is told what its record says)."""
        stored = self.instances.get(uuid)
        if stored is None:
            return None
        boot = stored.bootstrap or configdrive.Bootstrap(
            hostname=configdrive.default_hostname(stored.record.name, uuid),
            availability_zone=self.cfg.guest.availability_zone)
        return configdrive.instance_metadata(stored.record, stored.ports, boot,
                                             default_mtu=self.cfg.network.default_mtu)

    def _config_drive(self, uuid: str, new: bool = False, stored: Stored | None = None) -> Callable[[Path], None]:
        """The writer of an instance's config drive into its directory, its documents made now
        from its record, ports and bootstrap data (``new``: a build's first, see ``iso.write``;
        ``stored``: the instance as a move brings it, before it is this host's)."""
        stored = stored or self.instances[uuid]
        assert stored.bootstrap is not None
        files = configdrive.instance_metadata(stored.record, stored.ports, stored.bootstrap,
                                              default_mtu=self.cfg.network.default_mtu,
                                              skip_ec2=self.cfg.guest.config_drive_skip_versions)

        def write(instance_dir: Path) -> None:
            iso.write(disks.path(instance_dir, "config"), files, configdrive.LABEL, new=new)
        return write

    async def _write_config_drive(self, uuid: str) -> None:
        """(Re-)make an instance's config drive."""
        # On the loop: ~0.2 ms of work (images.iso), less than a hand-off to a thread costs.
        self._config_drive(uuid)(self.instance_dir(uuid))

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

    # The volume workflow (compute/volumes.py) records and describes guests as these ops do.
    commit, guest_spec = _commit, _guest

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

    def ping(self) -> PingResult:
        """``ping``."""
        from fastcompute import __version__

        return PingResult(__version__, round(time.monotonic() - self.started_at, 3))

    def host_info(self) -> HostInfo:
        """``host.info``."""
        t, hypervisor = self.tracker, self.hypervisor_facts
        assert t is not None and hypervisor is not None
        inventory: dict[str, Inventory] = {rc: inv for rc, inv in t.inventory.items()}
        usage: dict[str, int] = {rc: used for rc, used in t.usage.items()}
        return HostInfo(
            hostname=self.hostname,
            hypervisor=hypervisor,
            topology=t.topology(),
            inventory=inventory,
            usage=usage,
            traits=self.traits + ([] if self.enabled else ["COMPUTE_STATUS_DISABLED"]),
            generation=t.generation,
            instances=len(self.instances),
            enabled=self.enabled,
            disabled_reason=self.disabled_reason,
            numa_host=t.numa_host,
            server_groups=self._server_groups(),
        )

    def _server_groups(self) -> dict[str, list[str]]:
        """The instances of each server group on this host, as the scheduler marked them
        (``metadata[SERVER_GROUP_KEY]``): how schedulers learn that a member is gone."""
        groups: dict[str, list[str]] = {}
        for uuid, stored in self.instances.items():
            name = stored.record.metadata.get(protocol.SERVER_GROUP_KEY)
            if name:
                groups.setdefault(name, []).append(uuid)
        return groups

    async def set_enabled(self, enabled: bool, reason: str | None) -> HostInfo:
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
        ports = await self._validate_ports(args.networks, uuid)
        token, image = args.image.token, args.image.without_token()
        # The token is no part of what the instance is: a retry with a fresh token is the
        # same request.
        digest = hashlib.sha1(
            self._digest_encoder.encode(msgspec.structs.replace(args, uuid=uuid, wait=False, image=image))
        ).hexdigest()
        if uuid in self._deleting:
            raise Conflict(f"instance {uuid} is being deleted; spawn it again once it is gone",
                           {"uuid": uuid, "task_state": "deleting"})
        existing = self.instances.get(uuid)
        if existing is not None:
            if existing.digest != digest:
                raise Conflict(f"instance {uuid} exists with other arguments", {"uuid": uuid})
            return await self._after_spawn(uuid, args.wait)
        vols, conns = volumes.from_mapping(args)
        local_gb = 0 if protocol.boot_volume(args.block_device_mapping) else args.flavor.disk_gb
        claim = self.claim_flavor(uuid, args.project_id, args.flavor, local_gb)
        ts = now()
        rec = InstanceRecord(
            uuid=uuid, name=args.name, project_id=args.project_id, vm_state="building",
            task_state="spawning", power_state="nostate", flavor=args.flavor, image=image,
            host=self.hostname, numa=numa_cells(claim.numa_request, claim.numa_placement), created_at=ts,
            updated_at=ts, metadata=args.metadata, volumes=vols,
        )
        stored = Stored(record=rec, digest=digest, request_id=request_id, ports=ports,
                        bootstrap=configdrive.bootstrap_of(args, uuid, self.cfg.guest), volumes=conns)
        self.instances[uuid] = stored
        lock = self._locks[uuid] = asyncio.Lock()
        self._own_ports(uuid, ports)
        # The build is known from here on (a spawn retried while the record is written waits
        # for it) but starts no stage before the lock is let go, with the record durable.
        if token:
            self._image_tokens[uuid] = token
        async with lock:
            self._start_build(uuid)
            try:
                await self.store.write([
                    self.store.put_instance(uuid, rec.project_id, request_id, stored),
                    self.store.put_claim(uuid, rec.project_id, claim),
                ])
            except BaseException:
                del self.instances[uuid]
                del self._locks[uuid]
                self._image_tokens.pop(uuid, None)
                self._disown_ports(uuid, ports)
                tracker.release(uuid)
                raise
        self._mark_resources_changed()
        self.publish("instance." + uuid, rec)
        return await self._after_spawn(uuid, args.wait)

    def claim_flavor(self, uuid: str, project_id: str, flavor: protocol.Flavor, disk_gb: int | None = None) -> Claim:
        """Claim what a guest of ``flavor`` needs here (``disk_gb``: its local disk, the
        flavor's unless said), once the host is seen to have the CPU traits and devices the
        flavor asks for: for a spawn, an unshelve and an incoming move alike. NO_CAPACITY (or
        QUOTA_EXCEEDED) when it does not fit; nothing is held then."""
        tracker = self.tracker
        assert tracker is not None
        if self.host_cpu is not None:
            check_traits(flavor.extra_specs, self.host_cpu)
        check_host(hardware(flavor.extra_specs, flavor.vcpus), self.host_features, flavor.extra_specs)
        return tracker.claim(uuid, project_id, flavor.vcpus, flavor.memory_mb,
                             flavor.disk_gb if disk_gb is None else disk_gb, flavor_request(flavor))

    async def _after_spawn(self, uuid: str, wait: bool) -> InstanceRecord:
        build = self._builds.get(uuid)
        if wait and build is not None:
            built = await asyncio.shield(build)
            if built is not None:
                return built
        rec = self._get(uuid).record
        if wait and uuid in self._deleting:
            # The build stopped for a delete asked while the spawn waited (the uuid stays
            # reserved until the record is gone): there is no instance to hand over, only one
            # about to vanish.
            raise Conflict(f"instance {uuid} was deleted before its build finished",
                           {"uuid": uuid, "task_state": "deleting"})
        return rec

    def _start_build(self, uuid: str) -> None:
        task = asyncio.get_running_loop().create_task(self._build(uuid, self.instances[uuid]))
        self._builds[uuid] = task

        def done(t: asyncio.Task[InstanceRecord | None]) -> None:
            # A build of an earlier instance of this uuid must not forget the current one's.
            if self._builds.get(uuid) is t:
                del self._builds[uuid]

        task.add_done_callback(done)

    async def _build(self, uuid: str, stored: Stored) -> InstanceRecord | None:
        """Fetch the image, make the disk, plug the ports, launch the domain: each stage under
        the instance's lock, and only while ``stored`` is still the instance and no delete of it
        is asked for. Returns the record the build left (None when it stopped or failed): what a
        spawn that waited for it answers, even if a delete takes the lock the moment it is let go
        (a build stopped by a delete leaves that spawn CONFLICT instead).

        A delete so waits for one stage at most (it cancels a fetch), and a build never works on
        an instance that was deleted (or deleted and spawned again) under it: that delete has
        undone what it made. The fetch runs before the build takes a slot: slots bound the
        builds themselves, and downloads must not hold the slots that spawns of cached images need.
        """
        if not await self._stage(uuid, stored, self._build_fetch):
            return None
        async with self._build_slots:
            for stage in (self._build_disk, self._build_ports, self._build_domain):
                if not await self._stage(uuid, stored, stage):
                    return None
        # A copy: the record is changed in place by whatever runs next (a delete's task).
        return msgspec.structs.replace(stored.record)

    async def _stage(self, uuid: str, stored: Stored, stage: Callable[[str, Stored], Awaitable[bool]]) -> bool:
        """Run one build stage under the instance's lock; False when the build is to stop."""
        lock = self._locks.get(uuid)
        if lock is None:
            return False
        async with lock:
            if self.instances.get(uuid) is not stored or uuid in self._deleting:
                log.info("build of %s stopped: the instance is deleted or being deleted", uuid)
                return False
            try:
                return await stage(uuid, stored)
            except Exception as exc:
                await self._fail_build(uuid, _typed(exc, f"build of {uuid}"))
                return False

    async def _build_fetch(self, uuid: str, stored: Stored) -> bool:
        return volumes.boots_from_volume(stored) or await self._fetch_image(uuid, stored.record)

    async def _build_disk(self, uuid: str, stored: Stored) -> bool:
        # The config drive is written in the worker job that makes the root disk.
        drive = self._config_drive(uuid, new=True) if self._drive_wanted(uuid) else None
        await self._prepare_root(uuid, stored.record, drive)
        return True

    async def _prepare_root(self, uuid: str, rec: InstanceRecord, drive: Callable[[Path], None] | None = None) -> None:
        """The local root disk from the image (and the config drive beside it, with ``drive``);
        an instance booted from a volume only gets its directory (and its drive)."""
        if volumes.boots_from_volume(self.instances[uuid]):
            self.instance_dir(uuid).mkdir(parents=True, exist_ok=True)
            if drive is not None:
                drive(self.instance_dir(uuid))
        else:
            await self.images.prepare_disk(uuid, image_spec(rec), rec.flavor.disk_gb, self._progress(uuid),
                                           beside=drive)

    async def _build_ports(self, uuid: str, stored: Stored) -> bool:
        if stored.ports:
            await self.network.plug(uuid, stored.ports)
        return True

    async def _build_domain(self, uuid: str, _stored: Stored) -> bool:
        power = await self.driver.launch(self._guest(uuid), start=True)
        await self._commit(uuid, vm_state="active", task_state=None, power_state=power)
        return True

    async def _fetch_image(self, uuid: str, rec: InstanceRecord) -> bool:
        """Fetch a build's image; False when a delete or the agent stopping cancelled it (the
        instance is then left as it is: to the delete, or to the next start-up's resume)."""
        token = self._image_tokens.pop(uuid, None)
        image = image_spec(rec)
        if token is None and self.images.is_cached(image):
            # A boot storm of a cached image: nothing to fetch, so no task to cancel either.
            return True
        fetch = asyncio.get_running_loop().create_task(self.images.fetch_base(
            image, rec.flavor.disk_gb, self._progress(uuid), token=token,
        ))
        self._fetches[uuid] = fetch
        try:
            await fetch
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not fetch.cancelled() or me is None or me.cancelling():
                raise
            log.info("image fetch of %s cancelled", uuid)
            return False
        finally:
            del self._fetches[uuid]
        return True

    async def _fail_build(self, uuid: str, exc: AgentError) -> None:
        log.warning("build of %s failed: %s %s", uuid, exc.code, exc.message)
        released = await self._undo(uuid)
        await self._commit(uuid, vm_state="error", task_state=None, power_state="nostate",
                           fault=Fault(exc.code, exc.message), extra=released)

    async def _undo(self, uuid: str) -> list[Any]:
        """Take away an instance's domain, disk and ports, and give back its claim unless its
        domain could not be removed; returns the store changes that go with it. Every step is
        tried whatever the others did: one failing must not leave the rest held."""
        tracker = self.tracker
        assert tracker is not None
        domain_gone = True
        for what, step in (("domain", self.driver.destroy), ("disk", self.images.remove_disk),
                           ("ports", self.network.unplug)):
            try:
                await step(uuid)
            except Exception as exc:
                log.error("could not remove the %s of %s: %s", what, uuid, exc,
                          exc_info=not isinstance(exc, AgentError))
                domain_gone = domain_gone and what != "domain"
        if not domain_gone:
            return []
        tracker.release(uuid)
        self._mark_resources_changed()
        return [Store.delete_claim(uuid)]

    # -- lifecycle ops ---------------------------------------------------------------------------

    async def transition(self, op: str, uuid: str, **kw: Any) -> InstanceRecord:
        """Run one lifecycle op (start, stop, pause, ...) under the instance's lock; ``kw`` are
        the op's other args (``hard``, ``timeout_s``)."""
        hard = bool(kw.get("hard"))
        name = op + "-hard" if hard else op
        allowed, task, target = _LIFECYCLE[op].rule(hard)
        before = self._check(uuid, op, allowed)
        async with self._locks[uuid]:
            self._same(uuid, before)
            rec = self._check(uuid, op, allowed).record
            await self._commit(uuid, task_state=task)
            try:
                power = await self._drive(name, uuid, **kw)
            except BaseException as exc:
                # Whatever stopped the op, the instance is not left busy with it.
                await self._commit(uuid, task_state=None)
                if isinstance(exc, HypervisorError):
                    raise HypervisorError(f"{op} of {uuid} failed: {exc.message}") from None
                if isinstance(exc, AgentError) or not isinstance(exc, Exception):
                    raise
                raise _typed(exc, f"{op} of {uuid}") from None
            return await self._commit(uuid, vm_state=target, task_state=None, power_state=power,
                                      fault=rec.fault if target != "active" else None)

    @contextlib.asynccontextmanager
    async def held(self, uuid: str, op: str, allowed: frozenset[str] = _ACTIVE) -> AsyncIterator[Stored]:
        """The instance under its lock, with no task under way and in a vm_state of ``allowed``
        (active unless said), for an op of another module: CONFLICT naming its state otherwise,
        NOT_FOUND if it went while the op waited for the lock."""
        before = self._check(uuid, op, allowed)
        async with self._locks[uuid]:
            self._same(uuid, before)
            yield self._check(uuid, op, allowed)

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

    def _same(self, uuid: str, stored: Stored) -> Stored:
        """Once an op holds the lock it waited for: the instance must still be the one it asked
        about, not gone, nor deleted and spawned again (whose lock is another)."""
        if self.instances.get(uuid) is not stored:
            raise NotFound(f"no instance {uuid} on this host (it was deleted)", {"uuid": uuid})
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
            bfv = volumes.boots_from_volume(self.instances[uuid])
            claim = tracker.claim(uuid, rec.project_id, rec.flavor.vcpus, rec.flavor.memory_mb,
                                  0 if bfv else rec.flavor.disk_gb, flavor_request(rec.flavor))
            await self.store.write([self.store.put_claim(uuid, rec.project_id, claim)])
            rec.numa = numa_cells(claim.numa_request, claim.numa_placement)
            self._mark_resources_changed()
        try:
            if not disks.path(self.instance_dir(uuid), "root").exists():
                await self._prepare_root(uuid, rec)
            if self._drive_wanted(uuid) and not disks.path(self.instance_dir(uuid), "config").exists():
                await self._write_config_drive(uuid)
            if self.instances[uuid].ports:
                await self.network.plug(uuid, self.instances[uuid].ports)
            return await self.driver.launch(self._guest(uuid), start=True)
        except BaseException:
            if reclaimed and (released := await self._undo(uuid)):
                rec.numa = None
                await self.store.write(released)
            raise

    async def _validate_ports(self, wanted: list[Port], uuid: str) -> list[Port]:
        """The ports (checked in form by the validation stage) against those of this host."""
        if not wanted:
            return []
        try:
            ports = await self.network.validate(wanted, instance_uuid=uuid)
        except AgentError as exc:
            raise type(exc)(exc.message, prefixed(exc.details, "args.")) from None
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

    async def delete(self, uuid: str, only_if: str | None = None) -> Deleted:
        """``instance.delete``: allowed from every state (``only_if``: only from that vm_state,
        else nothing is done); releases disk, network and claim.

        The uuid is reserved from the request on (a spawn of it is CONFLICT) until the record is
        gone; a build under way stops at its next stage, and its image fetch is cancelled.
        """
        stored = self._get(uuid)
        self._deleting[uuid] += 1
        try:
            fetch = self._fetches.get(uuid)
            if fetch is not None:
                fetch.cancel()  # the build then gives the lock back at once
            async with self._locks[uuid]:
                self._same(uuid, stored)
                if only_if is not None and stored.record.vm_state != only_if:
                    return Deleted(uuid, False)
                await self._commit(uuid, task_state="deleting")
                await self._delete_locked(uuid)
        finally:
            self._deleting[uuid] -= 1
            if not self._deleting[uuid]:
                del self._deleting[uuid]
        return Deleted(uuid, True)

    async def _delete_locked(self, uuid: str) -> None:
        tracker = self.tracker
        assert tracker is not None
        stored = self.instances[uuid]
        if stored.record.vm_state != "shelved_offloaded":  # else nothing is here (it may run elsewhere)
            await self.driver.destroy(uuid)
        await self.images.remove_disk(uuid)
        await self.network.unplug(uuid)
        for also in self.on_delete:
            await also(stored)
        await self.store.write([Store.delete_instance(uuid), Store.delete_claim(uuid),
                                Store.delete_console_tokens(uuid), *await self.migrations.on_delete(uuid)])
        tracker.release(uuid)
        del self.instances[uuid]
        # Whoever still waits for this lock finds the instance gone; a new spawn gets its own.
        self._locks.pop(uuid, None)
        self._disown_ports(uuid, stored.ports)
        self._mark_resources_changed()
        rec = stored.record
        rec.vm_state, rec.task_state, rec.power_state, rec.updated_at = "deleted", None, "nostate", now()
        self.publish("instance." + uuid, rec)

    # -- power-state sync ------------------------------------------------------------------------

    def on_power_event(self, event: PowerEvent) -> None:
        """A lifecycle event from the hypervisor (on the event loop)."""
        if event.power_state == "running":  # a started guest's taps lost their limits (network/shaping.py)
            asyncio.get_running_loop().create_task(self.network.reshape(event.uuid))
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
            elif vm_state in ("stopped", "soft_deleted") and power in ("running", "paused"):
                log.warning("instance %s should be stopped but is %s; stopping it", uuid, power)
                power = await self.driver.power_off(uuid, 0)
            if vm_state != rec.vm_state or power != rec.power_state:
                await self._commit(uuid, vm_state=vm_state, power_state=power)

    # -- shutdown --------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Wait for builds in progress to finish (or leave them to the next start-up)."""
        for fetch in self._fetches.values():
            fetch.cancel()  # a download may take an hour; the build resumes at the next start
        builds = list(self._builds.values())
        if builds:
            log.info("waiting up to %.0fs for %d builds in progress", timeout_s, len(builds))
            _done, pending = await asyncio.wait(builds, timeout=timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("%d builds left to finish at the next start-up", len(pending))
        await self.migrations.drain(timeout_s)

