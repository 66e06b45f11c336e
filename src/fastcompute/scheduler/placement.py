"""OpenStack Placement: an async client and the agent's sync of its host into Placement.

The agent stays the truth: its claims decide, Placement only mirrors them for the fleet's
schedulers. So nothing here ever blocks the agent. ``PlacementSync`` takes updates
synchronously into a queue keyed by what they change (the provider's inventory and traits,
one entry per consumer), so a later update replaces an unsent earlier one, and a single
background task writes them, in batches, retrying with backoff until Placement answers.

Generations are handled as Placement asks: the provider generation is re-read on a 409 and
the write retried; a consumer we believe new is written with ``consumer_generation: null``
in a batched ``POST /allocations`` and, if Placement already knows it (a retry of a write
that had succeeded, a restart), re-read and written alone with ``PUT``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid as uuid_mod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from fastcompute.config import PlacementConfig
from fastcompute.resources.classes import RESOURCE_CLASSES, ResourceClass
from fastcompute.resources.tracker import Claim

log = logging.getLogger("fastcompute.placement")

_INVENTORY_FIELDS = ("total", "reserved", "allocation_ratio", "min_unit", "max_unit", "step_size")
CONSUMER_TYPE = "INSTANCE"


class PlacementError(Exception):
    """Placement answered with an error that a retry will not fix by itself."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"Placement answered {status}: {text[:500]}")
        self.status = status
        self.text = text


class Unavailable(Exception):
    """Placement could not be reached, timed out or failed (5xx): try again later."""


class Conflict(PlacementError):
    """409: a generation moved under us (``concurrent``), or the write conflicts with what
    Placement holds (over capacity, inventory in use)."""

    @property
    def concurrent(self) -> bool:
        """Whether a generation moved: re-read and retry."""
        return "placement.concurrent_update" in self.text


# Placement's request and response bodies are its JSON documents (providers, inventories,
# allocations, candidates), kept as decoded maps: Placement's API, not ours, defines them.
class PlacementClient:
    """The Placement REST calls the agent and the scheduler need, over one httpx client."""

    def __init__(self, url: str, *, token: str = "admin", microversion: str = "1.39",
                 timeout_s: float = 30.0, connect_timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"X-Auth-Token": token, "OpenStack-API-Version": f"placement {microversion}",
                     "Accept": "application/json"},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        )

    @classmethod
    def from_config(cls, cfg: PlacementConfig) -> PlacementClient:
        """A client for the ``[placement]`` section."""
        return cls(cfg.url, token=cfg.token, microversion=cfg.microversion,
                   timeout_s=cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s)

    async def request(self, method: str, path: str, body: Any = None,
                      ok: tuple[int, ...] = (200, 201, 204)) -> httpx.Response:
        """One request; a status outside ``ok`` raises Conflict, PlacementError or Unavailable."""
        try:
            r = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{method} {path}: {exc!r}") from exc
        if r.status_code in ok:
            return r
        if r.status_code == 409:
            raise Conflict(r.status_code, r.text)
        if r.status_code >= 500:
            raise Unavailable(f"{method} {path}: {r.status_code} {r.text[:300]}")
        raise PlacementError(r.status_code, f"{method} {path}: {r.text}")

    async def get(self, path: str) -> Any:
        """GET a document (decoded JSON)."""
        return (await self.request("GET", path)).json()

    async def provider(self, rp_uuid: str) -> dict[str, Any] | None:
        """The resource provider, or None when Placement does not know it."""
        r = await self.request("GET", f"/resource_providers/{rp_uuid}", ok=(200, 404))
        return None if r.status_code == 404 else dict(r.json())

    async def provider_by_name(self, name: str) -> dict[str, Any] | None:
        """The resource provider called ``name``, or None."""
        rps = (await self.get(f"/resource_providers?name={name}"))["resource_providers"]
        return dict(rps[0]) if rps else None

    async def create_provider(self, rp_uuid: str, name: str) -> dict[str, Any]:
        """Create a root resource provider (409 when the name or uuid is taken)."""
        r = await self.request("POST", "/resource_providers", {"uuid": rp_uuid, "name": name})
        return dict(r.json())

    async def set_inventories(self, rp_uuid: str, generation: int, inventories: dict[str, Any]) -> int:
        """Replace the provider's inventories; returns its new generation."""
        r = await self.request("PUT", f"/resource_providers/{rp_uuid}/inventories",
                               {"resource_provider_generation": generation, "inventories": inventories})
        return int(r.json()["resource_provider_generation"])

    async def known_traits(self, names: list[str]) -> set[str]:
        """Which of ``names`` Placement knows."""
        if not names:
            return set()
        return set((await self.get("/traits?name=in:" + ",".join(names)))["traits"])

    async def create_trait(self, name: str) -> None:
        """Create a ``CUSTOM_`` trait (no-op when it exists)."""
        await self.request("PUT", f"/traits/{name}", ok=(201, 204))

    async def set_traits(self, rp_uuid: str, generation: int, traits: list[str]) -> int:
        """Replace the provider's traits; returns its new generation."""
        r = await self.request("PUT", f"/resource_providers/{rp_uuid}/traits",
                               {"resource_provider_generation": generation, "traits": traits})
        return int(r.json()["resource_provider_generation"])

    async def provider_allocations(self, rp_uuid: str) -> dict[str, dict[str, int]]:
        """consumer -> resources of every allocation against the provider."""
        allocs = (await self.get(f"/resource_providers/{rp_uuid}/allocations"))["allocations"]
        return {c: dict(a["resources"]) for c, a in allocs.items()}

    async def consumer(self, consumer: str) -> dict[str, Any]:
        """``GET /allocations/{consumer}``: its allocations, generation, project and user."""
        return dict(await self.get(f"/allocations/{consumer}"))

    async def put_allocations(self, consumer: str, body: dict[str, Any]) -> None:
        """Replace one consumer's allocations (409 on a stale consumer generation)."""
        await self.request("PUT", f"/allocations/{consumer}", body)

    async def post_allocations(self, bodies: dict[str, dict[str, Any]]) -> None:
        """Replace several consumers' allocations at once (all or nothing)."""
        await self.request("POST", "/allocations", bodies)

    async def delete_allocations(self, consumer: str) -> None:
        """Remove all of a consumer's allocations (no-op when it has none)."""
        await self.request("DELETE", f"/allocations/{consumer}", ok=(204, 404))

    async def allocation_candidates(self, resources: Mapping[ResourceClass, int], required: list[str] | None = None,
                                    forbidden: list[str] | None = None, limit: int | None = None
                                    ) -> dict[str, Any]:
        """``GET /allocation_candidates``: providers that fit, with their summaries."""
        params = {"resources": ",".join(f"{rc}:{n}" for rc, n in sorted(resources.items()) if n)}
        traits = list(required or []) + ["!" + t for t in forbidden or []]
        if traits:
            params["required"] = ",".join(traits)
        if limit:
            params["limit"] = str(limit)
        try:
            r = await self._http.get("/allocation_candidates", params=params)
        except httpx.HTTPError as exc:
            raise Unavailable(f"GET /allocation_candidates: {exc!r}") from exc
        if r.status_code != 200:
            if r.status_code >= 500:
                raise Unavailable(f"GET /allocation_candidates: {r.status_code}")
            raise PlacementError(r.status_code, r.text)
        return dict(r.json())

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()


def placement_inventory(inventory: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """host.info's inventory in Placement's shape: the standard classes with a total."""
    out: dict[str, dict[str, Any]] = {}
    for rc, inv in inventory.items():
        if rc not in RESOURCE_CLASSES or not inv.get("total"):
            continue
        entry = {k: inv[k] for k in _INVENTORY_FIELDS if k in inv}
        # Placement refuses reserved > total, which a small test host with the default
        # reserved memory can reach; it can hand out nothing either way.
        entry["reserved"] = min(int(entry.get("reserved", 0)), int(inv["total"]))
        entry["max_unit"] = max(1, min(int(entry.get("max_unit", inv["total"])), int(inv["total"])))
        out[rc] = entry
    return out


def claims_of(tracker_claims: Mapping[str, Claim]) -> dict[str, tuple[str, dict[str, int]]]:
    """``Tracker.claims`` (uuid -> Claim) as ``PlacementSync`` takes allocations."""
    return {u: (c.project_id, {rc: n for rc, n in c.resources.items()}) for u, c in tracker_claims.items()}


def load_or_create_uuid(path: Path) -> str:
    """The provider uuid kept in ``path``; a new one is written on first use."""
    try:
        text = path.read_text().strip()
        return str(uuid_mod.UUID(text))
    except (FileNotFoundError, ValueError):
        new = str(uuid_mod.uuid4())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(new + "\n")
        tmp.replace(path)
        return new


_INVENTORY = "\x00inventory"  # the queue key of the provider's inventory and traits
_HEAL = "\x00heal"  # the queue key of a heal (compare with Placement, fix the differences)


class PlacementSync:
    """Keeps this host's resource provider, inventories, traits and allocations in Placement.

    All public methods but ``start``, ``drain`` and ``close`` only queue work and return at
    once. ``held`` (what the agent holds: consumer -> (project, resources)) is updated as they
    are called, so a heal always compares Placement with the agent's current state.
    """

    def __init__(self, cfg: PlacementConfig, host: str, state_dir: Path) -> None:
        self.cfg = cfg
        self.host = host
        self.uuid_path = state_dir / "placement-rp-uuid"
        self.rp_uuid = load_or_create_uuid(self.uuid_path)
        self.client = PlacementClient.from_config(cfg)
        self.held: dict[str, tuple[str, dict[str, int]]] = {}
        self._inventory: tuple[dict[str, Any], list[str]] = ({}, [])
        # Queue: key -> op; dict order is the order of first arrival.
        self._pending: dict[str, tuple[str, Any]] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._generation: int | None = None  # the provider's, None = unknown / not registered
        self._written: set[str] = set()  # consumers Placement knows (their generation is not null)
        self._known_traits: set[str] = set()
        self._unknown_traits: set[str] = set()  # standard-looking names Placement does not know
        self.failures = 0  # consecutive failed rounds (for logs, tests and metrics)
        self.rejected: dict[str, str] = {}  # consumer -> why Placement refused its allocation
        self._heal_timer: asyncio.TimerHandle | None = None

    # -- the agent's side: queue and return ------------------------------------------------------

    async def start(self, inventory: Mapping[str, Mapping[str, Any]], traits: list[str],
                    allocations: dict[str, tuple[str, dict[str, int]]]) -> None:
        """Register, set inventory and traits and heal allocations, all in the background."""
        self.held = {c: (p, dict(r)) for c, (p, r) in allocations.items()}
        self.update_inventory(inventory, traits)
        self._queue(_HEAL, ("heal", None))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def update_inventory(self, inventory: Mapping[str, Mapping[str, Any]], traits: list[str]) -> None:
        """Queue the provider's new inventory and traits (the last call wins; no-op if unchanged)."""
        wanted = (placement_inventory(inventory), sorted(set(traits)))
        if wanted == self._inventory and self._generation is not None:
            return
        self._inventory = wanted
        self._queue(_INVENTORY, ("inventory", None))

    def sync_claims(self, claims: dict[str, tuple[str, dict[str, int]]]) -> None:
        """Queue whatever makes Placement's allocations equal ``claims`` (consumer ->
        (project, amounts)), compared with what was queued before: the agent can call this
        with all its claims whenever its usage changed, instead of hooking every claim."""
        for consumer in [c for c in self.held if c not in claims]:
            self.remove_allocation(consumer)
        for consumer, (project_id, resources) in claims.items():
            amounts = {rc: int(n) for rc, n in resources.items() if n}
            if self.held.get(consumer) != (project_id, amounts):
                self.set_allocation(consumer, project_id, amounts)

    def set_allocation(self, consumer: str, project_id: str, resources: dict[str, int]) -> None:
        """Queue the allocation of an instance the agent claimed."""
        amounts = {rc: int(n) for rc, n in resources.items() if n}
        self.held[consumer] = (project_id, amounts)
        self._queue(consumer, ("set", (project_id, amounts)))

    def remove_allocation(self, consumer: str) -> None:
        """Queue the removal of an instance's allocation (it was deleted or its claim released)."""
        self.held.pop(consumer, None)
        self._queue(consumer, ("remove", None))

    def _queue(self, key: str, op: tuple[str, Any]) -> None:
        self._pending.pop(key, None)
        self._pending[key] = op
        self._idle.clear()
        self._wake.set()

    def _heal_later(self, delay_s: float = 30.0) -> None:
        if self._heal_timer is None:
            def fire() -> None:
                self._heal_timer = None
                self._queue(_HEAL, ("heal", None))

            self._heal_timer = asyncio.get_running_loop().call_later(delay_s, fire)

    @property
    def pending(self) -> int:
        """Updates not yet written."""
        return len(self._pending)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued is written; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the writer (what is still queued is dropped: the next start heals it)."""
        if self._heal_timer is not None:
            self._heal_timer.cancel()
            self._heal_timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.client.close()

    # -- the writer --------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.1
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, {}
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._requeue(batch)
                self.failures += 1
                if self.failures == 1 or self.failures % 20 == 0:
                    log.warning("Placement at %s: %s; %d updates queued, retrying",
                                self.cfg.url, exc, len(self._pending))
                if not isinstance(exc, Unavailable | Conflict):
                    log.exception("Placement update failed")
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            if self.failures:
                log.info("Placement at %s answers again after %d failed attempts", self.cfg.url, self.failures)
                self.failures = 0
                # What happened to Placement while it was away is unknown (a restored backup,
                # writes of other agents): compare again.
                self._queue(_HEAL, ("heal", None))
            delay = 0.1

    def _requeue(self, batch: dict[str, tuple[str, Any]]) -> None:
        """Put back what was not written, unless a newer update for the same key came since."""
        newer, self._pending = self._pending, {}
        for key, op in batch.items():
            if key not in newer:
                self._pending[key] = op
        self._pending.update(newer)

    async def _write(self, batch: dict[str, tuple[str, Any]]) -> None:
        """Write one batch; on an exception what is left of ``batch`` is requeued by the caller,
        so each part removes itself from ``batch`` once it is written."""
        if self._generation is None:
            await self._register()
            batch.setdefault(_INVENTORY, ("inventory", None))
        if _INVENTORY in batch:
            await self._write_inventory()
            del batch[_INVENTORY]
        if _HEAL in batch:
            await self._heal(batch)
            del batch[_HEAL]
        removes = [c for c, (kind, _) in batch.items() if kind == "remove"]
        for c in removes:
            await self.client.delete_allocations(c)
            self._written.discard(c)
            self.rejected.pop(c, None)
            del batch[c]
        sets = [c for c, (kind, _) in batch.items() if kind == "set"]
        fresh = [c for c in sets if c not in self._written]
        for i in range(0, len(fresh), max(1, self.cfg.batch_size)):
            chunk = fresh[i:i + max(1, self.cfg.batch_size)]
            bodies = {c: self._body(c, batch[c][1], None) for c in chunk}
            try:
                await self.client.post_allocations(bodies)
            except Conflict:
                # Some consumer of the chunk exists already: write them one by one.
                continue
            self._written.update(chunk)
            for c in chunk:
                self.rejected.pop(c, None)
                del batch[c]
        for c in [c for c in sets if c in batch]:
            try:
                await self._write_one(c, batch[c][1])
            except PlacementError as exc:
                if isinstance(exc, Conflict) and exc.concurrent:
                    raise
                # Placement refuses this allocation (over its capacity: its inventory or
                # ratios differ from the agent's). Retrying it now would hold up everything
                # behind it; a later heal writes it once the inventories agree.
                log.error("Placement refused the allocation of %s: %s", c, exc)
                self.rejected[c] = str(exc)
                self._heal_later()
            del batch[c]

    def _body(self, consumer: str, value: tuple[str, dict[str, int]], generation: int | None,
              others: dict[str, Any] | None = None) -> dict[str, Any]:
        project_id, resources = value
        allocations = dict(others or {})
        allocations[self.rp_uuid] = {"resources": resources}
        return {"allocations": allocations, "project_id": project_id, "user_id": self.cfg.user_id,
                "consumer_generation": generation, "consumer_type": CONSUMER_TYPE}

    async def _write_one(self, consumer: str, value: tuple[str, dict[str, int]], attempts: int = 5) -> None:
        """Read the consumer (generation, allocations on other providers) and replace ours."""
        for attempt in range(attempts):
            current = await self.client.consumer(consumer)
            others = {rp: a for rp, a in current.get("allocations", {}).items() if rp != self.rp_uuid}
            body = self._body(consumer, value, current.get("consumer_generation"), others)
            try:
                await self.client.put_allocations(consumer, body)
            except Conflict as exc:
                if not exc.concurrent or attempt == attempts - 1:
                    raise
                continue
            self._written.add(consumer)
            self.rejected.pop(consumer, None)
            return

    async def _remove_ours(self, consumer: str, attempts: int = 5) -> None:
        """Take this provider out of a consumer's allocations, keeping its others."""
        for attempt in range(attempts):
            current = await self.client.consumer(consumer)
            allocations = current.get("allocations", {})
            if self.rp_uuid not in allocations:
                return
            others = {rp: a for rp, a in allocations.items() if rp != self.rp_uuid}
            if not others:
                await self.client.delete_allocations(consumer)
                return
            body = {"allocations": others, "project_id": current["project_id"],
                    "user_id": current["user_id"], "consumer_generation": current["consumer_generation"],
                    "consumer_type": current.get("consumer_type", CONSUMER_TYPE)}
            try:
                await self.client.put_allocations(consumer, body)
                return
            except Conflict as exc:
                if not exc.concurrent or attempt == attempts - 1:
                    raise

    async def _register(self) -> None:
        rp = await self.client.provider(self.rp_uuid)
        if rp is None:
            try:
                rp = await self.client.create_provider(self.rp_uuid, self.host)
                log.info("registered resource provider %s (%s) in Placement", self.host, self.rp_uuid)
            except Conflict:
                # The name is taken by a provider of another uuid: this host's state dir was
                # lost and recreated. Take that provider over, as a re-installed nova-compute
                # with the same host name would.
                rp = await self.client.provider_by_name(self.host)
                if rp is None:
                    raise
                self.rp_uuid = str(rp["uuid"])
                self.uuid_path.write_text(self.rp_uuid + "\n")
                log.warning("resource provider %s exists as %s: adopted", self.host, self.rp_uuid)
            self._written.clear()
        self._generation = int(rp["generation"])

    async def _refresh_generation(self) -> None:
        rp = await self.client.provider(self.rp_uuid)
        if rp is None:
            # Placement lost the provider (a new database): register and heal everything.
            self._generation = None
            self._queue(_HEAL, ("heal", None))
            raise Unavailable(f"resource provider {self.rp_uuid} vanished from Placement")
        self._generation = int(rp["generation"])

    async def _write_inventory(self, attempts: int = 5) -> None:
        inventory, traits = self._inventory
        await self._ensure_traits(traits)
        usable = sorted(t for t in traits if t in self._known_traits)
        for attempt in range(attempts):
            assert self._generation is not None
            try:
                self._generation = await self.client.set_inventories(self.rp_uuid, self._generation, inventory)
                self._generation = await self.client.set_traits(self.rp_uuid, self._generation, usable)
                return
            except Conflict:
                if attempt == attempts - 1:
                    raise
                await self._refresh_generation()

    async def _ensure_traits(self, traits: list[str]) -> None:
        missing = [t for t in traits if t not in self._known_traits and t not in self._unknown_traits]
        if not missing:
            return
        known = await self.client.known_traits(missing)
        for t in missing:
            if t not in known and t.startswith("CUSTOM_"):
                await self.client.create_trait(t)
                known.add(t)
        for t in sorted(set(missing) - known):
            log.warning("trait %s is not a standard trait of this Placement: not reported", t)
            self._unknown_traits.add(t)
        self._known_traits |= known

    async def _heal(self, batch: dict[str, tuple[str, Any]]) -> None:
        """Make Placement's allocations on our provider equal ``held``.

        Consumers with an update in ``batch`` or queued are left to it.
        """
        there = await self.client.provider_allocations(self.rp_uuid)
        busy = set(batch) | set(self._pending)
        removed = fixed = 0
        for consumer, resources in there.items():
            if consumer in busy:
                continue
            mine = self.held.get(consumer)
            if mine is None:
                await self._remove_ours(consumer)
                removed += 1
                continue
            self._written.add(consumer)
            if resources != mine[1]:
                batch[consumer] = ("set", mine)
                fixed += 1
        for consumer, value in self.held.items():
            if consumer not in there and consumer not in busy:
                batch[consumer] = ("set", value)
                fixed += 1
        self._written -= {c for c in self._written if c not in there and c not in self.held}
        if removed or fixed:
            log.info("healed Placement: %d allocations removed, %d written", removed, fixed)
