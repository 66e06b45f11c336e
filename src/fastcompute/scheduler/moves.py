"""Destinations for moves the caller gives none: ``instance.migrate``, ``instance.resize`` and
``instance.evacuate`` placed by the fleet's filters and weighers (``fleet.select``), as spawns
are, plus "not the source".

An agent sees no fleet, so the choice is the scheduler's: it finds the instance's host (each
live agent is asked ``instance.get``; for an evacuate, the host in the instance's exported
copy, which is down), filters the other hosts by the flavor (the new one for a resize) and the
instance's server group, and sends the move: a migrate or resize to the source agent naming
the chosen host, an evacuate to the chosen host itself. A refusal that is the host's
(``NO_CAPACITY``...) moves on to the next host, up to ``max_attempts``; other errors are the
move's and are raised.

``fastcompute move migrate|resize|evacuate ... --agent CONTROL,EVENTS ...`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal

import msgspec

from fastcompute.errors import AgentError, NotFound
from fastcompute.protocol import SERVER_GROUP_KEY, SERVER_GROUP_POLICY_KEY, Flavor, InstanceRecord, invalid_from
from fastcompute.rpc.client import ClientTimeout
from fastcompute.scheduler.fleet import (
    _HOST_ERRORS,
    POLICIES,
    Endpoint,
    Group,
    HostDown,
    NoValidHost,
    Placed,
    Scheduler,
    request_tuple,
    select,
)

Kind = Literal["migrate", "resize", "evacuate"]


async def locate(sched: Scheduler, uuid: str) -> tuple[str, InstanceRecord]:
    """The host an instance is on (and its record), asking each live agent; NOT_FOUND if none has it."""
    for name, view in list(sched.hosts.items()):
        if not view.alive:
            continue
        try:
            got = await view.link.call("instance.get", {"uuid": uuid}, sched.timeout_s)
        except (NotFound, ClientTimeout, HostDown):
            continue
        rec = msgspec.convert(got, InstanceRecord)
        if rec.task_state is None:
            return name, rec
    raise NotFound(f"no live agent of the fleet has instance {uuid} (settled)", {"uuid": uuid})


def group_of(rec: InstanceRecord) -> Group | None:
    """The server group an instance's metadata names (as the scheduler marked it), or None."""
    name, policy = rec.metadata.get(SERVER_GROUP_KEY), rec.metadata.get(SERVER_GROUP_POLICY_KEY)
    return Group(name, policy) if name and policy in POLICIES else None


async def move(sched: Scheduler, kind: Kind, *, uuid: str | None = None, flavor: dict[str, Any] | None = None,
               copy: dict[str, Any] | None = None, wait: bool = False) -> Placed:
    """Place and send one move (``copy``: for an evacuate, what ``instance.export`` gave);
    the record the agent answered, where, and after how many attempts."""
    if kind == "evacuate":
        assert copy is not None
        try:
            rec = msgspec.convert(copy.get("record"), InstanceRecord)
        except msgspec.ValidationError as exc:
            raise invalid_from(exc, "copy.record") from None
        source, uuid = rec.host, rec.uuid
    else:
        assert uuid is not None
        source, rec = await locate(sched, uuid)
    try:
        wanted = msgspec.convert(flavor, Flavor) if flavor is not None else rec.flavor
    except msgspec.ValidationError as exc:
        raise invalid_from(exc, "args.flavor") from None
    req, numa_request = request_tuple(wanted)
    group = group_of(rec)
    tried = {source}
    refusals: list[str] = []
    while len(tried) <= sched.max_attempts:
        host, reasons = select(sched.hosts.values(), req, sched.weights, numa_request=numa_request, group=group,
                               exclude=tried)
        if host is None:
            why = ", ".join(f"{n} {k}" for k, n in reasons.items()) or "no other hosts"
            raise NoValidHost(f"no host but the source fits the {kind} ({why})" + "".join(f"; {r}" for r in refusals),
                              {"filtered": reasons, "refusals": refusals, "uuid": uuid})
        tried.add(host.name)
        try:
            if kind == "evacuate":
                got = await host.link.call("instance.evacuate", {"uuid": uuid, "instance": copy}, sched.timeout_s)
            else:
                args: dict[str, Any] = {"uuid": uuid, "destination": host.name, "wait": wait}
                if kind == "resize":
                    args["flavor"] = msgspec.to_builtins(wanted)
                got = await sched.hosts[source].link.call(f"instance.{kind}", args, sched.timeout_s)
        except (ClientTimeout, HostDown) as exc:
            if kind != "evacuate":
                raise  # the source's answer is lost: the move's state is for it to tell
            refusals.append(f"{host.name}: {exc}")
            continue
        except _HOST_ERRORS as exc:
            refusals.append(f"{host.name}: {exc.code}: {exc.message}")
            continue
        return Placed(host=host.name, record=msgspec.convert(got, InstanceRecord), attempts=len(tried) - 1,
                      refused_by=refusals)
    raise NoValidHost(f"{len(tried) - 1} hosts refused the {kind}: " + "; ".join(refusals),
                      {"refusals": refusals, "uuid": uuid})


def build_parser() -> argparse.ArgumentParser:
    """``fastcompute move``'s options."""
    p = argparse.ArgumentParser(prog="fastcompute move",
                                description="migrate, resize or evacuate an instance to a host the scheduler picks")
    p.add_argument("kind", choices=("migrate", "resize", "evacuate"))
    p.add_argument("instance", help="the instance's uuid; for evacuate, the file `fastcompute export` wrote")
    p.add_argument("--agent", action="append", required=True, metavar="CONTROL,EVENTS",
                   help="an agent's control and event endpoints; repeat for each agent of the fleet")
    p.add_argument("--vcpus", type=int, help="resize: the new flavor's vCPUs")
    p.add_argument("--memory", type=int, help="resize: MiB")
    p.add_argument("--disk", type=int, help="resize: GiB")
    p.add_argument("--spec", action="append", metavar="KEY=VALUE", help="resize: flavor extra spec")
    p.add_argument("--wait", action="store_true", help="migrate/resize: reply when the move is over")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds an agent has to answer")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


async def _main_async(a: argparse.Namespace) -> int:
    flavor = None
    if a.kind == "resize":
        if a.vcpus is None or a.memory is None or a.disk is None:
            print("error: resize needs --vcpus, --memory and --disk", file=sys.stderr)
            return 2
        specs = dict(s.split("=", 1) for s in a.spec or [] if "=" in s)
        flavor = {"vcpus": a.vcpus, "memory_mb": a.memory, "disk_gb": a.disk, "extra_specs": specs}
    copy = None
    if a.kind == "evacuate":
        try:
            copy = msgspec.msgpack.decode(Path(a.instance).read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            print(f"error: {a.instance}: {exc}", file=sys.stderr)
            return 2
    async with Scheduler([Endpoint.parse(e) for e in a.agent], max_attempts=a.max_attempts,
                         timeout_s=a.timeout) as sched:
        placed = await move(sched, a.kind, uuid=None if copy else a.instance, flavor=flavor, copy=copy,
                            wait=a.wait)
    out = {"uuid": placed.record.uuid, "host": placed.host, "vm_state": placed.record.vm_state,
           "attempts": placed.attempts, "refused_by": placed.refused_by}
    print(json.dumps(out) if a.json else f"{a.kind} of {placed.record.uuid}: to {placed.host} "
          f"({placed.record.vm_state}, {placed.attempts} attempt(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fastcompute move ...``."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_main_async(a))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
