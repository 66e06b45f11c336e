"""Placing spawns across a fleet of agents: a live view, Nova's filters and weighers, retries.

The agents are the truth: each claims atomically, and a spawn it cannot fit is ``NO_CAPACITY``.
The scheduler only keeps a *view* of the fleet, from every agent's ``host.info`` at start and
its ``host.resources`` events after, adjusted for the spawns it has in flight and from their
replies and refusals, to send each spawn where it will most likely fit and best by the
configured weights. A refusal or a dead host moves the spawn to the next host, up to
``max_attempts`` hosts. With Placement, ``GET /allocation_candidates`` replaces the view's
capacity and trait filters.

Filters (in order): host alive, not disabled (``COMPUTE_STATUS_DISABLED``), not tried yet for
this spawn, capacity per resource class (``(total - reserved) * allocation_ratio - used``),
required and forbidden traits, server group (affinity: the group's host; anti-affinity: a host
without a member), and the NUMA fitter's pre-check for flavors with a NUMA topology when the
agent publishes ``numa_host``. Weighers: Nova's RAM, CPU and disk weighers (free amounts,
min-max normalised over the hosts that passed, times a multiplier); ``pack`` negates them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import logging
import os
import sys
import time
import uuid as uuid_mod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from fastcompute import _core
from fastcompute.errors import AgentError, Busy, HypervisorError, NoCapacity, QuotaExceeded
from fastcompute.protocol import (
    SERVER_GROUP_KEY,
    SERVER_GROUP_POLICY_KEY,
    Flavor,
    HostInfo,
    InstanceRecord,
    SpawnArgs,
    boot_volume,
    invalid_from,
)
from fastcompute.resources import numa
from fastcompute.resources.classes import RESOURCE_CLASSES
from fastcompute.resources.numa_types import HostUsage, Limits, NumaRequest
from fastcompute.resources.tracker import Tracker
from fastcompute.rpc.client import ClientTimeout, Link, error_from_reply
from fastcompute.scheduler.placement import PlacementClient, Unavailable

log = logging.getLogger("fastcompute.scheduler")

DISABLED = "COMPUTE_STATUS_DISABLED"
POLICIES = ("affinity", "anti-affinity")
# A confirmed spawn that no host.resources event has taken in after this long (the agent
# publishes within 100 ms of a change) is assumed counted: deletes by others hid it.
UNREPORTED_TTL_S = 2.0
# Errors that say something about the host rather than the request: try the next host.
_HOST_ERRORS = (NoCapacity, Busy, QuotaExceeded, HypervisorError)


class NoValidHost(NoCapacity):
    """No host of the fleet passes the filters (or every attempt was refused)."""


class HostDown(ConnectionError):
    """The agent's connection dropped while a request was in flight."""


@dataclass(frozen=True)
class Weights:
    """Nova's weigher multipliers; positive spreads, and ``pack`` negates them all."""

    ram: float = 1.0
    cpu: float = 1.0
    disk: float = 0.0
    strategy: str = "spread"

    def multipliers(self) -> tuple[float, float, float]:
        """(ram, cpu, disk) with the strategy's sign."""
        sign = -1.0 if self.strategy == "pack" else 1.0
        return sign * self.ram, sign * self.cpu, sign * self.disk


@dataclass(frozen=True)
class Group:
    """A server group: its members are placed together (affinity) or apart (anti-affinity)."""

    name: str
    policy: str

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"server group policy must be one of {POLICIES}, not {self.policy!r}")


@dataclass
class Placed:
    """A spawn the scheduler placed: the agent's record, where, and after how many attempts."""

    host: str
    record: InstanceRecord
    attempts: int
    refused_by: list[str] = field(default_factory=list)


# Requests are 4-tuples in RESOURCE_CLASSES' order (VCPU, PCPU, MEMORY_MB, DISK_GB): indexes
# into HostView.free.


class HostView:
    """What the scheduler believes of one agent."""

    __slots__ = (
        "_numa_compiled",
        "alive",
        "capacity",
        "control",
        "credit",
        "disabled",
        "events",
        "free",
        "generation",
        "held_back",
        "inflight",
        "instances",
        "limits",
        "link",
        "max_unit",
        "members",
        "name",
        "numa_host",
        "room",
        "sent_members",
        "traits",
        "unreported",
        "usage",
    )

    def __init__(self, name: str, control: str = "", events: str = "") -> None:
        self.name = name
        self.control = control
        self.events = events
        self.alive = False
        self.traits: frozenset[str] = frozenset()
        self.disabled = False
        self.capacity = [0, 0, 0, 0]
        # The most of each class one instance may have here (Placement's max_unit).
        self.max_unit = [0, 0, 0, 0]
        self.usage = [0, 0, 0, 0]
        # Spawns sent and not answered: counted as used so that concurrent decisions spread.
        self.inflight: dict[str, tuple[int, int, int, int]] = {}
        # Spawns the agent confirmed that its last host.resources did not count yet, oldest
        # first, with when they were confirmed; and how many claims its events counted whose
        # replies are still on the way (they are the oldest in flight). Events carry the
        # agent's instance count: its growth says how many of ours they took in.
        self.unreported: collections.deque[tuple[float, tuple[int, int, int, int]]] = collections.deque()
        self.credit = 0
        self.instances = -1
        # What unreported and in-flight spawns add to the reported usage, kept as a sum.
        self.held_back = [0, 0, 0, 0]
        self.link: Any = None  # the scheduler's connection to this agent
        self.free = [0, 0, 0, 0]
        self.room = [0, 0, 0, 0]
        self.numa_host: HostUsage | None = None
        self._numa_compiled: _core.NumaHost | None = None
        self.limits = Limits(cpu_allocation_ratio=1.0, ram_allocation_ratio=1.0)
        self.generation = -1
        self.members: dict[str, set[str]] = {}  # group -> instance uuids on this host
        # Members this scheduler sent here, and when: kept until an event has had time to list them.
        self.sent_members: dict[str, tuple[str, float]] = {}

    def update(self, info: HostInfo) -> None:
        """Take an agent's ``host.info`` / ``host.resources`` body."""
        inv, usage = info.inventory, info.usage
        cap = []
        max_unit = []
        for rc in RESOURCE_CLASSES:
            i = inv.get(rc)
            if i and i["total"]:
                cap.append(int((i["total"] - i["reserved"]) * i["allocation_ratio"]))
                max_unit.append(i["max_unit"])
            else:
                cap.append(0)
                max_unit.append(0)
        self.capacity = cap
        self.max_unit = max_unit
        self.usage = [usage.get(rc, 0) for rc in RESOURCE_CLASSES]
        self.traits = frozenset(info.traits)
        self.disabled = DISABLED in self.traits or not info.enabled
        self.numa_host = info.numa_host
        self._numa_compiled = None
        vcpu, ram = inv.get("VCPU"), inv.get("MEMORY_MB")
        self.limits = Limits(
            cpu_allocation_ratio=vcpu["allocation_ratio"] if vcpu else 1.0,
            ram_allocation_ratio=ram["allocation_ratio"] if ram else 1.0,
        )
        self.generation = info.generation
        self.take_members(info.server_groups)
        count = info.instances
        grown = max(0, count - self.instances) if self.instances >= 0 else 0
        self.instances = count
        horizon = time.monotonic() - UNREPORTED_TTL_S
        while self.unreported and (grown > 0 or self.unreported[0][0] < horizon):
            _, req = self.unreported.popleft()
            self._add(self.held_back, req, -1)
            grown -= 1
        self.credit = min(self.credit + max(0, grown), len(self.inflight))
        self.recompute()

    def take_members(self, groups: dict[str, list[str]]) -> None:
        """The agent's members of each group here, plus those sent here lately (an event may
        predate their claim): members deleted behind the scheduler's back leave the view."""
        horizon = time.monotonic() - UNREPORTED_TTL_S
        self.sent_members = {i: (g, at) for i, (g, at) in self.sent_members.items()
                             if at > horizon or i in self.inflight}
        members = {g: set(uuids) for g, uuids in groups.items()}
        for instance, (group, _at) in self.sent_members.items():
            members.setdefault(group, set()).add(instance)
        self.members = members

    def add_member(self, group: str, instance: str) -> None:
        """A member of ``group`` is being sent here."""
        self.members.setdefault(group, set()).add(instance)
        self.sent_members[instance] = (group, time.monotonic())

    def drop_member(self, group: str, instance: str) -> None:
        """A member sent here was refused or lost."""
        self.members.get(group, set()).discard(instance)
        self.sent_members.pop(instance, None)

    def reset(self) -> None:
        """Forget what the last events said (the agent restarted or reconnected)."""
        self.unreported.clear()
        self.held_back = [0, 0, 0, 0]
        self.credit = 0
        self.instances = -1
        self.generation = -1

    def confirmed(self, instance: str) -> None:
        """The agent answered a spawn we sent with its record: it holds the claim."""
        req = self.inflight.pop(instance)
        self._add(self.held_back, req, -1)
        if self.credit > 0:
            self.credit -= 1
        else:
            self.unreported.append((time.monotonic(), req))
            self._add(self.held_back, req, 1)
        self.recompute()

    def sent(self, instance: str, req: tuple[int, int, int, int]) -> None:
        """A spawn is on its way to this host: count it as used."""
        self.inflight[instance] = req
        self._add(self.held_back, req, 1)
        self.recompute()

    @staticmethod
    def _add(total: list[int], req: tuple[int, int, int, int], sign: int) -> None:
        total[0] += sign * req[0]
        total[1] += sign * req[1]
        total[2] += sign * req[2]
        total[3] += sign * req[3]

    def abandoned(self, instance: str) -> None:
        """A spawn we sent was refused or lost: it holds nothing here (as far as we know)."""
        req = self.inflight.pop(instance, None)
        if req is not None:
            self._add(self.held_back, req, -1)
        self.credit = min(self.credit, len(self.inflight))
        self.recompute()

    def recompute(self) -> None:
        """Free amounts from capacity, usage and the spawns in flight."""
        cap, used, back = self.capacity, self.usage, self.held_back
        free = [cap[0] - used[0] - back[0], cap[1] - used[1] - back[1],
                cap[2] - used[2] - back[2], cap[3] - used[3] - back[3]]
        # The oldest spawns in flight that the events already counted (usually none).
        for req in itertools.islice(self.inflight.values(), self.credit):
            self._add(free, req, 1)
        self.free = free
        # What one more instance may have: free, but at most max_unit of each class.
        most = self.max_unit
        self.room = [min(free[0], most[0]), min(free[1], most[1]), min(free[2], most[2]), min(free[3], most[3])]

    def numa_fits(self, request: NumaRequest) -> bool:
        """The NUMA fitter's answer on this host's last published NUMA usage (True if unknown)."""
        if self.numa_host is None:
            return True
        if self._numa_compiled is None:
            self._numa_compiled = numa.compile_host(self.numa_host)
        return numa.fit(self._numa_compiled, request, self.limits) is not None


_FLAVORS: dict[tuple[Any, ...], tuple[tuple[int, int, int, int], NumaRequest | None]] = {}


def request_tuple(flavor: Flavor) -> tuple[tuple[int, int, int, int], NumaRequest | None]:
    """A flavor's amounts per class (pinned vCPUs as PCPU) and its NUMA request (or None).

    Raises BadRequest for invalid extra specs, before any host is asked. Storms repeat one
    flavor: the answer is remembered (the request is only read, never changed).
    """
    key = (flavor.vcpus, flavor.memory_mb, flavor.disk_gb, tuple(sorted(flavor.extra_specs.items())))
    known = _FLAVORS.get(key)
    if known is None:
        if len(_FLAVORS) > 4096:
            _FLAVORS.clear()
        known = _FLAVORS[key] = _request_tuple(flavor)
    return known


def _request_tuple(flavor: Flavor) -> tuple[tuple[int, int, int, int], NumaRequest | None]:
    numa_request = numa.constraints({"vcpus": flavor.vcpus, "memory_mb": flavor.memory_mb,
                                     "extra_specs": flavor.extra_specs})
    amounts = Tracker.request_of(flavor.vcpus, flavor.memory_mb, flavor.disk_gb, numa_request)
    return (amounts["VCPU"], amounts["PCPU"], amounts["MEMORY_MB"], amounts["DISK_GB"]), numa_request


def select(hosts: Iterable[HostView], req: tuple[int, int, int, int], weights: Weights, *,
           numa_request: NumaRequest | None = None, required: frozenset[str] = frozenset(),
           forbidden: frozenset[str] = frozenset(), group: Group | None = None,
           exclude: frozenset[str] | set[str] = frozenset(), only: dict[str, list[int]] | None = None,
           ) -> tuple[HostView | None, dict[str, int]]:
    """The best host for ``req`` by the filters and weighers, and why hosts were filtered out.

    ``only`` restricts the choice to those hosts and takes their free amounts from it (the
    Placement candidates). Returns ``(None, reasons)`` when no host passes.
    """
    v, p, m, d = req
    passed: list[HostView] = []
    frees: list[list[int]] = []
    reasons = {"down": 0, "disabled": 0, "tried": 0, "capacity": 0, "traits": 0, "group": 0, "numa": 0}
    gname = group.name if group is not None else ""
    anti = group is not None and group.policy == "anti-affinity"
    # Affinity binds a member to the hosts that have members, once there are any.
    affine = group is not None and group.policy == "affinity" and any(h.members.get(gname) for h in hosts)
    for h in hosts:
        if not h.alive:
            reasons["down"] += 1
            continue
        if h.disabled:
            reasons["disabled"] += 1
            continue
        if exclude and h.name in exclude:
            reasons["tried"] += 1
            continue
        if only is None:
            room = h.room
            if room[0] < v or room[1] < p or room[2] < m or room[3] < d:
                reasons["capacity"] += 1
                continue
            free = h.free
        else:
            found = only.get(h.name)
            if found is None:
                reasons["capacity"] += 1
                continue
            free = found
        if (required and not required <= h.traits) or (forbidden and not forbidden.isdisjoint(h.traits)):
            reasons["traits"] += 1
            continue
        # Members here refuse an anti-affine member; none here refuse an affine one.
        if group is not None and (anti if h.members.get(gname) else affine):
            reasons["group"] += 1
            continue
        if numa_request is not None and not h.numa_fits(numa_request):
            reasons["numa"] += 1
            continue
        passed.append(h)
        frees.append(free)
    if not passed:
        return None, {k: n for k, n in reasons.items() if n}
    # Each weigher scales its free amount to [0, 1] over the passing hosts. The score is built
    # a column at a time in comprehensions: weighing host by host was half of a decision.
    mr, mc, md = weights.multipliers()
    scores: list[float] | None = None
    for idx, mult in ((2, mr), (0, mc), (3, md)):
        if not mult or len(passed) == 1:
            continue
        col = [f[idx] for f in frees]
        lo, hi = min(col), max(col)
        if hi > lo:
            k = mult / (hi - lo)
            scores = [(c - lo) * k for c in col] if scores is None else [
                s + (c - lo) * k for s, c in zip(scores, col, strict=True)]
    if scores is None:
        return passed[0], {}
    return passed[max(range(len(scores)), key=scores.__getitem__)], {}


class _Agent:
    """One agent's control connection (a DEALER that queues nothing for a dead peer) and its
    event subscription, feeding a HostView."""

    def __init__(self, sched: Scheduler, view: HostView, ctx: zmq.asyncio.Context) -> None:
        self.sched = sched
        self.view = view
        view.link = self
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # Only completed connections get messages: a spawn is never queued for an agent that
        # is down, to run there later after it was placed elsewhere.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(view.control)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, "host.resources")
        self.sub.connect(view.events)
        self._prefix = os.urandom(6).hex() + "-"
        self._ids = itertools.count(1)
        self._link = Link(self.sock)
        self._dec = msgspec.msgpack.Decoder(HostInfo)
        self.tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        # A refresh rebuilds the view (group members too) from the agent: one at a time.
        self.refreshing = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._events()), loop.create_task(self._watch())]

    async def _events(self) -> None:
        while True:
            _topic, body = await self.sub.recv_multipart()
            try:
                info = self._dec.decode(body)
            except msgspec.DecodeError:
                continue
            self.sched._on_resources(self.view, info)

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                self.mark_down(f"connection to {self.view.control} lost")
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                # Only now does ZMQ_IMMEDIATE let requests through (not at the TCP connect).
                self.connected.set()
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED and not self.view.alive:
                # Back (or first up): its usage may have changed while it was away.
                self.sched._revive(self)

    def mark_down(self, why: str) -> None:
        if self.view.alive:
            log.warning("host %s is down: %s", self.view.name, why)
        self.view.alive = False
        self._link.fail_all(HostDown(f"{self.view.name} went down with a request in flight"))
        self.sched._changed()

    def mark_up(self) -> None:
        self.view.alive = True

    async def call(self, op: str, args: dict[str, Any] | None, timeout_s: float) -> Any:
        """One request; its result, its typed error, ClientTimeout or HostDown."""
        rid = self._prefix + str(next(self._ids))
        try:
            reply = await self._link.request(rid, op, args, timeout_s, self.view.name)
        except zmq.Again:
            # With ZMQ_IMMEDIATE a send only fails when no connection is up: the host is down.
            raise HostDown(f"{self.view.name} is not connected") from None
        if reply.get("ok"):
            return reply.get("result")
        raise error_from_reply(reply.get("error") or {})

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._link.close()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.sub.close(linger=0)


@dataclass(frozen=True)
class Endpoint:
    """An agent's control and event endpoints."""

    control: str
    events: str

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``CONTROL,EVENTS``, e.g. ``tcp://10.0.0.5:7780,tcp://10.0.0.5:7781``."""
        control, sep, events = text.partition(",")
        if not sep or not control or not events:
            raise ValueError(f"an agent is CONTROL,EVENTS, not {text!r}")
        return cls(control.strip(), events.strip())


class Scheduler:
    """Places spawns on a fleet of agents. Use as ``async with Scheduler(endpoints) as s:``."""

    def __init__(self, endpoints: Iterable[Endpoint], *, weights: Weights | None = None,
                 max_attempts: int = 3, timeout_s: float = 30.0, placement: PlacementClient | None = None
                 ) -> None:
        self.endpoints = list(endpoints)
        self.weights = weights or Weights()
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.placement = placement
        self.hosts: dict[str, HostView] = {}
        self._agents: list[_Agent] = []
        self._ctx = zmq.asyncio.Context()
        self._change = asyncio.Event()
        self._waiters = 0
        self._rp_names: dict[str, str] = {}  # Placement provider uuid -> host name
        # Spawns sent to a host that died or timed out before answering: it may have claimed
        # them. When it is back, they are deleted there (instance uuid -> host name).
        self.orphans: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.inflight = 0

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to every agent and read its host.info and instances (server groups).

        An agent that does not answer is kept as down; its events or a reconnection bring it in.
        """
        for i, ep in enumerate(self.endpoints):
            view = HostView(f"?{i}:{ep.control}", ep.control, ep.events)
            agent = _Agent(self, view, self._ctx)
            agent.refreshing = True  # the refresh below; the monitor's first "connected" is not another
            agent.start()
            self._agents.append(agent)
        await asyncio.gather(*(self._refresh(a) for a in self._agents))
        for a in self._agents:
            a.refreshing = False
            if not a.view.alive:
                self._revive(a)

    def _revive(self, agent: _Agent) -> None:
        """Refresh a host that is down until it answers (in the background, once per host)."""
        if agent.refreshing:
            return
        agent.refreshing = True

        async def run() -> None:
            try:
                while not agent.view.alive:
                    await self._refresh(agent)
                    if not agent.view.alive:
                        await asyncio.sleep(1.0)
            finally:
                agent.refreshing = False

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, agent: _Agent) -> None:
        try:
            await asyncio.wait_for(agent.connected.wait(), min(self.timeout_s, 10.0))
        except TimeoutError:
            log.warning("agent %s: no connection", agent.view.control)
            return
        try:
            info = msgspec.convert(await agent.call("host.info", None, min(self.timeout_s, 10.0)), HostInfo)
            records = msgspec.convert(await agent.call("instance.list", None, self.timeout_s), list[InstanceRecord])
        except (ClientTimeout, HostDown, AgentError) as exc:
            log.warning("agent %s does not answer: %s", agent.view.control, exc)
            return
        except msgspec.ValidationError as exc:
            log.warning("agent %s answers in another shape: %s", agent.view.control, exc)
            return
        view = agent.view
        name = info.hostname or view.name
        if view.name != name:
            self.hosts.pop(view.name, None)
            view.name = name
        if name in self.hosts and self.hosts[name] is not view:
            raise ValueError(f"two agents report the host name {name!r}: give each its own [agent] host")
        self.hosts[name] = view
        held = {r.uuid for r in records}
        orphans = [u for u, h in self.orphans.items() if h == name and u in held]
        for u in [u for u, h in self.orphans.items() if h == name and u not in held]:
            del self.orphans[u]  # it never claimed it
        # Orphans are about to be deleted: they are no group's members here.
        groups = {g: [u for u in uuids if u not in orphans]
                  for g, uuids in info.server_groups.items()}
        view.reset()
        view.update(msgspec.structs.replace(info, server_groups=groups))
        agent.mark_up()
        self._changed()
        for instance in orphans:
            await self._delete_orphan(agent, instance)

    async def _delete_orphan(self, agent: _Agent, instance: str) -> None:
        """Delete a spawn that reached a host which went down before answering, and that was
        since placed elsewhere or reported failed: the caller knows it only from there."""
        try:
            await agent.call("instance.delete", {"uuid": instance}, self.timeout_s)
        except (ClientTimeout, HostDown, AgentError) as exc:
            log.warning("could not delete orphan %s on %s: %s", instance, agent.view.name, exc)
            return
        log.info("deleted orphan %s on %s (placed elsewhere while it was down)", instance, agent.view.name)
        self.orphans.pop(instance, None)

    def _on_resources(self, view: HostView, info: HostInfo) -> None:
        if view.name not in self.hosts:
            return
        gen = info.generation
        # A smaller generation is either an older event or a restarted agent; the latter
        # comes with a reconnection, which refreshes the view from host.info.
        if gen < view.generation:
            return
        if not view.alive:
            # Back from the dead: read it whole (usage, group members, orphans to delete).
            for a in self._agents:
                if a.view is view:
                    self._revive(a)
            return
        view.update(info)
        self._changed()

    def _changed(self) -> None:
        if self._waiters:
            self._change.set()
            self._change = asyncio.Event()

    async def _candidates(self, req: tuple[int, int, int, int], required: frozenset[str],
                          forbidden: frozenset[str]) -> dict[str, list[int]]:
        """Hosts Placement offers for ``req``, with their free amounts by Placement's count."""
        assert self.placement is not None
        resources = dict(zip(RESOURCE_CLASSES, req, strict=True))
        doc = await self.placement.allocation_candidates(resources, sorted(required), sorted(forbidden))
        if any(u not in self._rp_names for u in doc.get("provider_summaries", {})):
            rps = (await self.placement.get("/resource_providers"))["resource_providers"]
            self._rp_names = {rp["uuid"]: rp["name"] for rp in rps}
        out: dict[str, list[int]] = {}
        for rp_uuid, summary in doc.get("provider_summaries", {}).items():
            name = self._rp_names.get(rp_uuid)
            if name is None:
                continue
            res = summary.get("resources", {})
            free = [int(res[rc]["capacity"] - res[rc]["used"]) if rc in res else 0 for rc in RESOURCE_CLASSES]
            view = self.hosts.get(name)
            if view is not None:
                for r in view.inflight.values():
                    for i in range(4):
                        free[i] -= r[i]
            out[name] = free
        return out

    async def spawn(self, args: dict[str, Any], *, group: Group | None = None,
                    required: Iterable[str] = (), forbidden: Iterable[str] = ()) -> Placed:
        """Place one ``instance.spawn`` (its wire args) and send it; the placed record.

        Raises NoValidHost when no host passes or every attempt was refused, and the agent's
        error for failures that are not the host's (BAD_REQUEST, IMAGE_ERROR, CONFLICT...).
        """
        try:
            wanted = msgspec.convert(args, SpawnArgs)
        except msgspec.ValidationError as exc:
            raise invalid_from(exc, "args") from None
        # The scheduler reads the typed copy; the agent gets the caller's map as written.
        args = dict(args)
        instance = wanted.uuid or str(uuid_mod.uuid4())
        args["uuid"] = instance
        req, numa_request = request_tuple(wanted.flavor)
        if boot_volume(wanted.block_device_mapping) is not None:
            req = (*req[:3], 0)  # booted from a volume: no local root disk, as the agent claims
        if group is not None:
            args["metadata"] = {**wanted.metadata, SERVER_GROUP_KEY: group.name,
                                SERVER_GROUP_POLICY_KEY: group.policy}
        need, avoid = frozenset(required), frozenset(forbidden)
        tried: list[str] = []
        refusals: list[str] = []
        while len(tried) < self.max_attempts:
            only = None
            if self.placement is not None:
                try:
                    only = await self._candidates(req, need, avoid)
                except Unavailable as exc:
                    log.warning("Placement unavailable (%s): using the fleet view", exc)
            host, reasons = select(self.hosts.values(), req, self.weights, numa_request=numa_request,
                                   required=need, forbidden=avoid, group=group, exclude=set(tried), only=only)
            if host is None:
                if self.inflight and set(reasons) <= {"capacity", "numa", "group", "down"}:
                    # Spawns in flight hold capacity in the view until they are answered:
                    # wait for one to finish before saying that nothing fits.
                    self._waiters += 1
                    try:
                        await self._change.wait()
                    finally:
                        self._waiters -= 1
                    continue
                raise NoValidHost(self._why(reasons, refusals),
                                  {"filtered": reasons, "refusals": refusals, "uuid": instance})
            tried.append(host.name)
            try:
                rec = await self._send(host, instance, req, args, group)
            except (ClientTimeout, HostDown) as exc:
                refusals.append(f"{host.name}: {exc}")
                self.orphans[instance] = host.name
                for a in self._agents:
                    if a.view is host and isinstance(exc, ClientTimeout):
                        a.mark_down(str(exc))
                continue
            except _HOST_ERRORS as exc:
                refusals.append(f"{host.name}: {exc.code}: {exc.message}")
                if isinstance(exc, NoCapacity):
                    self._learn_refusal(host, exc.details or {})
                continue
            return Placed(host=host.name, record=rec, attempts=len(tried), refused_by=refusals)
        raise NoValidHost(f"{len(tried)} hosts refused the spawn: " + "; ".join(refusals),
                          {"refusals": refusals, "uuid": instance})

    async def _send(self, host: HostView, instance: str, req: tuple[int, int, int, int],
                    args: dict[str, Any], group: Group | None) -> InstanceRecord:
        agent: _Agent = host.link
        host.sent(instance, req)
        if group is not None:
            host.add_member(group.name, instance)
        self.inflight += 1
        ok = False
        try:
            rec = msgspec.convert(await agent.call("instance.spawn", args, self.timeout_s), InstanceRecord)
            ok = True
            return rec
        finally:
            self.inflight -= 1
            if ok:
                host.confirmed(instance)
            else:
                host.abandoned(instance)
                if group is not None:
                    host.drop_member(group.name, instance)
            self._changed()

    @staticmethod
    def _learn_refusal(host: HostView, details: dict[str, Any]) -> None:
        rc, free = details.get("resource_class"), details.get("free")
        if rc in RESOURCE_CLASSES and isinstance(free, int):
            i = RESOURCE_CLASSES.index(rc)
            host.usage[i] = host.capacity[i] - free
            host.recompute()

    def _why(self, reasons: dict[str, int], refusals: list[str]) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in reasons.items())
        text = f"no host fits ({parts or 'no hosts'})"
        if refusals:
            text += "; refused by " + "; ".join(refusals)
        return text

    async def close(self) -> None:
        """Close every connection."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(a.close() for a in self._agents))
        if self.placement is not None:
            await self.placement.close()
        self._ctx.term()


# -- the CLI -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """``fastcompute schedule``'s options."""
    p = argparse.ArgumentParser(prog="fastcompute schedule",
                                description="place spawns across agents (filters, weighers, retries)")
    p.add_argument("--agent", action="append", required=True, metavar="CONTROL,EVENTS",
                   help="an agent's control and event endpoints; repeat for each agent")
    p.add_argument("--name", default="vm", help="instance name (with -N appended when --count > 1)")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--memory", type=int, default=512, help="MiB")
    p.add_argument("--disk", type=int, default=1, help="GiB")
    p.add_argument("--spec", action="append", metavar="KEY=VALUE", help="flavor extra spec (Nova's keys)")
    p.add_argument("--image", help="image path or URL")
    p.add_argument("--image-id", help="image id (Glance)")
    p.add_argument("--project", default="default")
    p.add_argument("--group", help="server group name")
    p.add_argument("--policy", choices=POLICIES, default="anti-affinity", help="the group's policy")
    p.add_argument("--require", action="append", default=[], metavar="TRAIT")
    p.add_argument("--forbid", action="append", default=[], metavar="TRAIT")
    p.add_argument("--strategy", choices=("spread", "pack"), default="spread")
    p.add_argument("--ram-weight", type=float, default=1.0)
    p.add_argument("--cpu-weight", type=float, default=1.0)
    p.add_argument("--disk-weight", type=float, default=0.0)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64, help="spawns in flight at once")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds an agent has to answer")
    p.add_argument("--placement", metavar="URL", help="use Placement's allocation candidates")
    p.add_argument("--placement-token", default="admin")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


async def run_storm(sched: Scheduler, spawns: list[dict[str, Any]], *, concurrency: int = 64,
                    group: Group | None = None, required: Iterable[str] = (), forbidden: Iterable[str] = (),
                    on_done: Any = None) -> tuple[list[Placed], list[tuple[dict[str, Any], AgentError]]]:
    """Place many spawns with at most ``concurrency`` in flight; (placed, failed)."""
    placed: list[Placed] = []
    failed: list[tuple[dict[str, Any], AgentError]] = []
    slots = asyncio.Semaphore(max(1, concurrency))

    async def one(args: dict[str, Any]) -> None:
        async with slots:
            try:
                placed.append(await sched.spawn(args, group=group, required=required, forbidden=forbidden))
            except AgentError as exc:
                failed.append((args, exc))
        if on_done is not None:
            on_done()

    await asyncio.gather(*(one(a) for a in spawns))
    return placed, failed


async def _main_async(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    image: dict[str, str] = {}
    if a.image:
        image["url"] = a.image if "://" in a.image else Path(a.image).resolve().as_uri()
    if a.image_id:
        image["id"] = a.image_id
    specs = dict(s.split("=", 1) for s in a.spec or [] if "=" in s)
    flavor = {"vcpus": a.vcpus, "memory_mb": a.memory, "disk_gb": a.disk, "extra_specs": specs}
    names = [a.name] if a.count == 1 else [f"{a.name}-{i}" for i in range(1, a.count + 1)]
    spawns = [{"name": n, "flavor": flavor, "image": image, "project_id": a.project} for n in names]
    placement = PlacementClient(a.placement, token=a.placement_token) if a.placement else None
    weights = Weights(a.ram_weight, a.cpu_weight, a.disk_weight, a.strategy)
    group = Group(a.group, a.policy) if a.group else None
    started = time.monotonic()
    async with Scheduler([Endpoint.parse(e) for e in a.agent], weights=weights, max_attempts=a.max_attempts,
                         timeout_s=a.timeout, placement=placement) as sched:
        columns = (TextColumn("scheduling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, disable=a.json or a.count < 2) as bar:
            task = bar.add_task("scheduling", total=len(spawns))
            placed, failed = await run_storm(sched, spawns, concurrency=a.concurrency, group=group,
                                             required=a.require, forbidden=a.forbid,
                                             on_done=lambda: bar.advance(task))
    elapsed = time.monotonic() - started
    per_host: dict[str, int] = {}
    for p in placed:
        per_host[p.host] = per_host.get(p.host, 0) + 1
    if a.json:
        print(json.dumps({
            "placed": [{"uuid": p.record.uuid, "name": p.record.name, "host": p.host,
                        "attempts": p.attempts, "refused_by": p.refused_by} for p in placed],
            "failed": [{"name": s["name"], "code": e.code, "message": e.message} for s, e in failed],
            "per_host": per_host, "elapsed_s": round(elapsed, 3),
        }))
    else:
        from rich.table import Table

        table = Table("host", "instances")
        for h, n in sorted(per_host.items()):
            table.add_row(h, str(n))
        Console().print(table)
        err.print(f"{len(placed)} placed, {len(failed)} failed in {elapsed:.2f}s")
        for s, e in failed:
            err.print(f"[red]failed[/] {s['name']}: {e.code}: {e.message}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``fastcompute schedule ...``: place ``--count`` spawns across the ``--agent``s."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        endpoints = [Endpoint.parse(e) for e in a.agent]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    del endpoints
    try:
        return asyncio.run(_main_async(a))
    except AgentError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1

