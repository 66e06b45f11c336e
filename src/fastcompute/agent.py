"""The agent process: builds the parts, starts them in order, and stops them cleanly.

Start: store → hypervisor connection → resource tracker → manager (load + reconcile) →
sockets. Stop (SIGTERM/SIGINT): refuse new requests, finish those in flight and the builds in
progress, flush the store, close the sockets and the hypervisor connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from fastcompute import protocol
from fastcompute.compute import validate
from fastcompute.compute.crashdump import crash_dump
from fastcompute.compute.drain import Drain
from fastcompute.compute.evacuate import Evacuations
from fastcompute.compute.guestagent import GuestAgent
from fastcompute.compute.livemigration import LiveMigrations
from fastcompute.compute.manager import Manager
from fastcompute.compute.peers import peer_keys
from fastcompute.compute.ports import Ports
from fastcompute.compute.rebuild import Rebuild
from fastcompute.compute.rescue import Rescue
from fastcompute.compute.shelve import Shelver
from fastcompute.compute.snapshot import Snapshots
from fastcompute.compute.softdelete import SoftDelete
from fastcompute.compute.volumes import Volumes
from fastcompute.config import Config
from fastcompute.console import ConsoleProxy, Tokens
from fastcompute.errors import Conflict, NotFound
from fastcompute.hypervisor.libvirt.driver import LibvirtDriver
from fastcompute.images.cache import ImageCache
from fastcompute.network import Network
from fastcompute.network.metadata import Documents, MetadataService, documents_lookup
from fastcompute.protocol.schema import GetConsoleArgs
from fastcompute.resources.tracker import Tracker, cpu_traits
from fastcompute.rpc.replies import entry_size
from fastcompute.rpc.server import Handler, Server
from fastcompute.scheduler.placement import PlacementSync, claims_of
from fastcompute.stats.collector import Source, StatsCollector, guest_source
from fastcompute.stats.metrics import Metrics, MetricsServer, loop_lag_probe, parse_endpoint, start_http_server
from fastcompute.store import Store

log = logging.getLogger("fastcompute.agent")


class Agent:
    """One fastcompute agent: the manager behind a ZeroMQ server."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.agent.state_dir)
        self.store = Store(self.state_dir / "fastcompute.sqlite")
        self.driver = LibvirtDriver(cfg.hypervisor.uri, cfg.agent.worker_threads,
                                    qemu_run_dir=cfg.stats.qemu_run_dir)
        # Blocking file work (image fetches, copies, disk creation) runs here, never on the loop.
        self.io_pool = ThreadPoolExecutor(max_workers=cfg.agent.worker_threads, thread_name_prefix="io")
        self.images: ImageCache | None = None
        self.network: Network | None = None
        self.metadata: MetadataService | None = None
        self.consoles: ConsoleProxy | None = None
        self.placement: PlacementSync | None = None
        self.manager: Manager | None = None
        self.rebuilds: Rebuild | None = None
        self.rescues: Rescue | None = None
        self.soft_delete: SoftDelete | None = None
        self.server: Server | None = None
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self._stat_sources: dict[str, Source] = {}
        self.stats = StatsCollector(lambda: self._stat_sources, self.io_pool,
                                    domain_stats=self.driver.domain_stats, metrics=self.metrics)
        self._stop = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self.snapshots: Snapshots | None = None
        self.shelver: Shelver | None = None
        self.evacuations: Evacuations | None = None
        self.live: LiveMigrations | None = None
        self.drain: Drain | None = None

    def _handlers(self, m: Manager) -> dict[str, Handler]:
        """One handler per op of ``protocol.OPS``: the validation stage, then the manager.

        Lifecycle ops (those with a transition) share one handler, which passes the op's
        other args (``hard``, ``timeout_s``) on by name.
        """

        async def ping(_a: Any) -> Any:
            return m.ping()

        async def host_info(_a: Any) -> Any:
            return m.host_info()

        soft = self.soft_delete
        assert soft is not None and self.rebuilds is not None and self.rescues is not None
        rebuilds, rescues = self.rebuilds, self.rescues
        ports, moves = Ports(m), m.migrations
        guest_agent, vols = GuestAgent(m, self.cfg.hypervisor), Volumes(m, self.cfg.hypervisor)

        async def get(a: protocol.UuidArgs) -> Any:
            return m.get(a.uuid)

        async def list_(a: protocol.ListArgs) -> Any:
            return m.list_instances(a.project_id, a.vm_state)

        async def get_console(a: GetConsoleArgs) -> Any:
            if self.consoles is None:
                raise Conflict("consoles are not enabled on this host ([console] enabled)", {"type": a.type})
            return await self.consoles.get_console(m.get(a.uuid), a.type)

        async def images_list(_a: Any) -> Any:
            assert self.images is not None
            bases = await asyncio.get_running_loop().run_in_executor(self.io_pool, self.images.list_bases)
            return msgspec.to_builtins(bases)

        async def images_prune(a: protocol.PruneArgs) -> Any:
            assert self.images is not None
            return {"removed": await self.images.prune(a.max_age_s)}

        async def stats(a: protocol.StatsArgs) -> Any:
            if a.uuid is None:
                return self.stats.last()
            m.get(a.uuid)
            return self.stats.last(a.uuid)

        live, drain = self.live, self.drain
        assert live is not None and drain is not None
        snapshots, shelver = self.snapshots, self.shelver
        assert snapshots is not None and shelver is not None

        async def get_shelved(a: protocol.UuidArgs) -> Any:
            return shelver.get_shelved(a.uuid)

        evacuations = self.evacuations
        assert evacuations is not None

        async def export(a: protocol.UuidArgs) -> Any:
            return evacuations.export(a.uuid)

        own: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "ping": ping,
            "host.info": host_info,
            "instance.delete": lambda a: soft.delete(a.uuid),
            "instance.get": get,
            "instance.list": list_,
            "instance.console": lambda a: m.console(a.uuid, a.tail_bytes),
            "instance.get_console": get_console,
            "instance.set_password": lambda a: guest_agent.set_password(a.uuid, a.user, a.password),
            "instance.quiesce": lambda a: guest_agent.quiesce(a.uuid),
            "instance.unquiesce": lambda a: guest_agent.unquiesce(a.uuid),
            "instance.stats": stats,
            "host.set_enabled": lambda a: m.set_enabled(a.enabled, a.reason),
            "images.list": images_list,
            "images.prune": images_prune,
            "instance.attach_port": lambda a: ports.attach(a.uuid, a.port),
            "instance.detach_port": lambda a: ports.detach(a.uuid, a.port_id),
            "instance.set_security_groups": lambda a: ports.set_security_groups(a.uuid, a.port_id, a.security_groups),
            "instance.rebuild": lambda a: rebuilds.rebuild(a.uuid, a.image),
            "instance.rescue": lambda a: rescues.rescue(a.uuid, a.image),
            "instance.unrescue": lambda a: rescues.unrescue(a.uuid),
            "instance.restore": lambda a: soft.restore(a.uuid),
            "instance.force_delete": lambda a: soft.force_delete(a.uuid),
            "instance.crash_dump": lambda a: crash_dump(m, a.uuid),
            "instance.attach_volume": lambda a: vols.attach(a.uuid, a.volume),
            "instance.detach_volume": lambda a: vols.detach(a.uuid, a.volume_id),
            "instance.extend_volume": lambda a: vols.extend(a.uuid, a.volume_id, a.new_size_bytes),
            "instance.snapshot": lambda a: snapshots.snapshot(a.uuid, a.name, a.properties),
            "instance.shelve": lambda a: shelver.shelve(a.uuid),
            "instance.shelve_offload": lambda a: shelver.offload(a.uuid),
            "instance.unshelve": lambda a: shelver.unshelve(a.uuid, a.shelved, a.volumes),
            "instance.get_shelved": get_shelved,
            "instance.migrate": lambda a: moves.start(a.uuid, "migrate", a.destination, None, a.wait),
            "instance.resize": lambda a: moves.start(a.uuid, "resize", a.destination, a.flavor, a.wait),
            "instance.confirm_resize": lambda a: moves.confirm(a.uuid),
            "instance.revert_resize": lambda a: moves.revert(a.uuid),
            "migration.prepare": moves.prepare,
            "migration.finish": moves.finish,
            "migration.read": moves.read,
            "migration.status": moves.status,
            "migration.abort": moves.abort,
            "migration.confirm": moves.peer_confirm,
            "migration.revert": moves.peer_revert,
            "instance.export": export,
            "instance.evacuate": evacuations.evacuate,
            "migration.evacuated": evacuations.evacuated,
            "migration.evacuees": evacuations.evacuees,
            "instance.live_migrate": lambda a: live.start(a.uuid, a.destination, a.block_migration, a.wait),
            "instance.live_migrate_abort": lambda a: live.abort(a.uuid),
            "migration.live_prepare": live.prepare,
            "migration.live_finish": live.finish,
            "migration.live_status": live.status,
            "migration.live_abort": live.abort_incoming,
            "host.drain": drain.drain,
            "migration.host_info": host_info,
        }

        def lifecycle(op: protocol.Op) -> Callable[[Any], Awaitable[Any]]:
            short = op.name.removeprefix("instance.")

            async def run(a: Any) -> Any:
                rest = {f: getattr(a, f) for f in a.__struct_fields__ if f != "uuid"}
                return await m.transition(short, a.uuid, **rest)

            return run

        def staged(call: Callable[[Any], Awaitable[Any]]) -> Handler:
            async def run(a: Any, _rid: str) -> Any:
                return await call(validate.request(a))

            return run

        async def spawn(a: protocol.SpawnArgs, rid: str) -> Any:
            return await m.spawn(validate.request(a), rid)

        handlers: dict[str, Handler] = {"instance.spawn": spawn}
        for name, op in protocol.OPS.items():
            if name in own:
                handlers[name] = staged(own[name])
            elif op.transition is not None:
                handlers[name] = staged(lifecycle(op))
        assert set(handlers) == set(protocol.OPS), set(protocol.OPS) ^ set(handlers)

        async def local(op: str, args: dict[str, Any]) -> Any:
            # A move on this host calls its own peer ops directly, decoded as off the wire.
            return await handlers[op](msgspec.convert(args, protocol.OP_ARGS[op]), "")

        moves.peers.local = local
        return handlers

    async def start(self) -> None:
        """Open everything and start serving."""
        cfg = self.cfg
        # Guests' disks, consoles and the request log are tenants' data, whatever the umask.
        os.umask(0o077)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        await self.store.open()
        server = Server(cfg.agent, cfg.security, self.store, {}, observe=self.metrics.observe_request,
                        peers=peer_keys(cfg.migration))
        self.server = server
        self.images = ImageCache(self.state_dir, cfg.images, self.io_pool)
        self.images.on_lookup = self.metrics.image_cache
        md = cfg.metadata
        self.network = Network(cfg.network, self.io_pool, (md.address, md.port) if md.enabled else None)
        self.network.on_batch = self.metrics.observe_network_batch
        manager = Manager(cfg, self.store, self.driver, self.images, self.network, server.publish)
        self.manager = manager
        # Before the manager's start-up: they tell it how to finish their interrupted tasks.
        self.rebuilds, self.rescues = Rebuild(manager), Rescue(manager)
        self.soft_delete = SoftDelete(manager, cfg.compute)
        # Before the manager's start-up: it finishes or rolls back their interrupted tasks.
        self.snapshots = Snapshots(manager)
        self.shelver = Shelver(manager, self.snapshots)
        self.evacuations = Evacuations(manager)
        self.live = LiveMigrations(manager.migrations)
        self.drain = Drain(self.live)
        if md.enabled:
            # Before the manager's start-up reconciles the ports: that tells it the bridges to serve.
            self.metadata = MetadataService(md, documents_lookup(self.network.port_at, self._documents))
            self.metadata.follow(self.network)
        if cfg.console.enabled:
            # Before any domain is (re)started: QEMU binds the guests' serial sockets there.
            sockets = Path(cfg.console.socket_dir)
            sockets.mkdir(parents=True, exist_ok=True)
            sockets.chmod(0o700)
        await self.driver.connect(manager.on_power_event)
        facts = await self.driver.host_facts()
        tracker = Tracker(facts.cells, cfg.resources, cfg.quota, self.state_dir)
        await manager.start(tracker, facts.hypervisor,
                            sorted(set(cpu_traits(facts.cpu_features)) | set(cfg.resources.custom_traits)),
                            facts.cpu_features)
        if cfg.placement.url:
            # Never waits for Placement: registration, inventory and healing run in the background.
            self.placement = PlacementSync(cfg.placement, manager.hostname, self.state_dir)
            now = manager.host_info()
            await self.placement.start(now.inventory, now.traits, claims_of(tracker.claims))
        server.handlers = self._handlers(manager)
        server.project_of = lambda uuid: (s.record.project_id if (s := manager.instances.get(uuid)) else None)
        server.remember(await self.store.load_replies(cfg.agent.idempotency_max_bytes, entry_size))
        server.bind()
        if cfg.console.enabled:
            self.consoles = ConsoleProxy(cfg.console, Tokens(self.store, cfg.console.token_ttl_s),
                                         self.driver.console_endpoint)
            await self.consoles.start()
        if cfg.stats.metrics:
            host, port = parse_endpoint(cfg.stats.metrics)
            self.metrics_server = start_http_server(self.metrics, host, port, cfg.stats.metrics_max_connections,
                                                    cfg.stats.metrics_idle_timeout_s)
        server.start()
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._every(cfg.agent.sync_power_state_interval_s, manager.sync_power_states)),
            loop.create_task(self._resources_loop()),
            loop.create_task(self._every(60.0, self._expire)),
            loop.create_task(self.images.run_cleaner(self._stop)),
            loop.create_task(self.shelver.run_offloader(self._stop)),
            loop.create_task(self._every(cfg.migration.retry_interval_s, manager.migrations.tick)),
            loop.create_task(self._every(cfg.migration.retry_interval_s, self.evacuations.tick)),
        ]
        if cfg.compute.reclaim_instance_interval_s > 0:
            # Nova reclaims every interval; half of it (at most a minute) bounds the overstay.
            period = min(60.0, max(0.5, cfg.compute.reclaim_instance_interval_s / 2))
            self._background.append(loop.create_task(self._every(period, self.soft_delete.reclaim)))
        if cfg.stats.interval_s > 0:
            self._background.append(loop.create_task(self._every(cfg.stats.interval_s, self._publish_stats)))
        if cfg.stats.loop_lag_interval_s > 0:
            self._background.append(loop.create_task(loop_lag_probe(self.metrics, cfg.stats.loop_lag_interval_s)))
        log.info("agent %s serving %s, events on %s, hypervisor %s, state in %s",
                 manager.hostname, server.endpoints["control"], server.endpoints["events"],
                 cfg.hypervisor.uri, self.state_dir)
        if self.metrics_server is not None:
            log.info("metrics at %s", self.metrics_server.url)

    def _documents(self, uuid: str) -> Documents | None:
        """The metadata documents of an instance (the metadata service's lookup)."""
        return self.manager.metadata_documents(uuid) if self.manager is not None else None

    async def _every(self, period: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await fn()
            except Exception:
                log.exception("periodic task %s failed", getattr(fn, "__name__", fn))

    async def _expire(self) -> None:
        assert self.server is not None
        self.server.expire()
        now = time.time()
        await self.store.write([Store.expire_replies(now), Store.expire_console_tokens(now)])

    async def _publish_stats(self) -> None:
        """Sample every running guest and publish ``host.stats``."""
        m, s = self.manager, self.server
        assert m is not None and s is not None
        running = [u for u, st in m.instances.items() if st.record.power_state == "running"]
        for gone in self.stats.vanished:
            self._stat_sources.pop(gone, None)  # a new QEMU process: find its cgroup again
        unknown = [u for u in running if u not in self._stat_sources]
        if unknown:
            mode, driver = self.cfg.stats.source, self.driver

            def resolve() -> dict[str, Source]:
                found: dict[str, Source] = {}
                for u in unknown:
                    try:
                        found[u] = guest_source(functools.partial(driver.guest_pid, u), mode)
                    except NotFound:
                        continue
                return found

            resolved = await asyncio.get_running_loop().run_in_executor(self.io_pool, resolve)
            self._stat_sources.update(resolved)
        keep = set(running)
        self._stat_sources = {u: src for u, src in self._stat_sources.items() if u in keep}
        records = await self.stats.collect()
        s.publish("host.stats", {"host": m.hostname, "at": time.time(), "instances": records})

    async def _resources_loop(self) -> None:
        """host.resources: soon after a change (coalesced), and at least every interval."""
        m, s = self.manager, self.server
        assert m is not None and s is not None
        last = 0.0
        while True:
            await asyncio.sleep(0.1)
            due = time.monotonic() - last >= self.cfg.agent.resources_interval_s
            if m.take_resources_dirty() or due:
                info = m.host_info()
                s.publish("host.resources", info)
                self._update_gauges()
                if self.placement is not None and m.tracker is not None:
                    self.placement.update_inventory(info.inventory, info.traits)
                    self.placement.sync_claims(claims_of(m.tracker.claims))
                last = time.monotonic()

    def _update_gauges(self) -> None:
        m, t = self.manager, self.manager.tracker if self.manager else None
        assert m is not None and t is not None
        by_state: dict[str, int] = {}
        for st in m.instances.values():
            by_state[st.record.vm_state] = by_state.get(st.record.vm_state, 0) + 1
        self.metrics.set_instances(by_state)
        claims = {rc: sum(1 for c in t.claims.values() if c.resources.get(rc)) for rc in t.usage}
        self.metrics.set_resources({rc: (t.capacity(rc), used, claims[rc]) for rc, used in t.usage.items()})

    def request_stop(self) -> None:
        """Ask the agent to shut down (signal handlers call this)."""
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
        except BaseException:
            # Whatever did start (worker threads, sockets, the store) must not keep a process
            # that failed to start alive.
            await self.stop()
            raise
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        """Finish in-flight work, make the store consistent, close everything."""
        log.info("shutting down: finishing requests in flight")
        if self.server is not None:
            await self.server.drain(30.0)
        if self.manager is not None:
            await self.manager.drain(30.0)
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.server is not None:
            await self.server.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.consoles is not None:
            await self.consoles.close()
        self.stats.close()
        if self.placement is not None:
            if self.manager is not None and self.manager.tracker is not None:
                self.placement.sync_claims(claims_of(self.manager.tracker.claims))
            if not await self.placement.drain(5.0):
                log.warning("Placement did not take every update before shutdown; the next start heals it")
            await self.placement.close()
        if self.images is not None:
            await self.images.close()
        if self.metadata is not None:
            await self.metadata.close()
        if self.network is not None:
            self.network.close()
        await self.store.close()
        await self.driver.close()
        self.io_pool.shutdown(wait=True)
        log.info("stopped")
