"""What every client verb shares: the consoles, ``--json`` output, clients, and naming
instances by a uuid prefix or a name as well as by their uuid."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fastcompute.errors import AgentError, NotFound
from fastcompute.rpc.client import AsyncClient, Client, Curve

out = Console()
err = Console(stderr=True)
_FULL_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


def curve(a: argparse.Namespace) -> Curve | None:
    """The CURVE keys of ``--server-key``/``--client-key``, when both are given."""
    if a.server_key and a.client_key:
        return Curve.from_files(a.server_key, a.client_key)
    return None


def client(a: argparse.Namespace) -> Client:
    """A synchronous client of ``--endpoint``."""
    return Client(a.endpoint, timeout_s=a.timeout, curve=curve(a))


def emit(a: argparse.Namespace, result: Any, human: Callable[[Any], None]) -> None:
    """Print ``result`` as JSON with ``--json``, else the way ``human`` shows it."""
    if a.json:
        print(json.dumps(result, indent=2, default=json_default))
    else:
        human(result)


def json_default(o: object) -> Any:
    """JSON for what MessagePack carries and JSON has not (bytes)."""
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    raise TypeError(type(o).__name__)


def resolve(c: Client, names: list[str]) -> list[str]:
    """Full uuids for what a person typed: a uuid, a unique uuid prefix (``list`` shows
    short ones) or a unique instance name. NOT_FOUND names what matched none or several."""
    if all(_FULL_UUID.match(n) for n in names):
        return names
    records = c.call("instance.list")
    uuids = []
    for n in names:
        if _FULL_UUID.match(n):
            uuids.append(n)
            continue
        hits = {r["uuid"] for r in records if r["uuid"].startswith(n.lower()) or r["name"] == n}
        if len(hits) != 1:
            how = "no instance" if not hits else f"{len(hits)} instances"
            raise NotFound(f"{how} match {n!r}; give more of the uuid", {"uuid": n})
        uuids.append(hits.pop())
    return uuids


async def many(a: argparse.Namespace, label: str, requests: list[tuple[str, dict[str, Any]]]
               ) -> tuple[list[Any], list[str]]:
    """Send many requests at once on one DEALER, with a progress bar."""
    results: list[Any] = []
    failures: list[str] = []
    async with AsyncClient(a.endpoint, timeout_s=a.timeout, curve=curve(a)) as c:
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, disable=a.json or len(requests) < 2) as bar:
            task = bar.add_task(label, total=len(requests))

            async def one(op: str, args: dict[str, Any]) -> None:
                try:
                    results.append(await c.call(op, args))
                except AgentError as exc:
                    failures.append(f"{exc.code}: {exc.message}")
                bar.advance(task)

            await asyncio.gather(*(one(op, args) for op, args in requests))
    return results, failures
