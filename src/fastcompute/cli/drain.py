"""``fastcompute drain``: empty a host (``host.drain``), with a progress bar fed by its
``host.drain`` events, then a table of where each instance went or why it stayed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fastcompute import protocol
from fastcompute.cli.common import curve, emit, err, out
from fastcompute.cli.events import default_events
from fastcompute.cli.tables import short_uuids
from fastcompute.rpc.client import AsyncClient, subscribe

# How long the event subscription is given to connect before the drain is asked for, so the
# bar sees its first events (a late subscriber only misses counts: the reply has the report).
_SUBSCRIBE_S = 0.3


async def _follow(a: argparse.Namespace, bar: Progress, task: TaskID) -> None:
    async for _topic, body in subscribe(a.events or default_events(a.endpoint), ["host.drain"], curve=curve(a)):
        if isinstance(body, dict):
            moved, failed = len(body.get("moved", [])), len(body.get("failed", []))
            bar.update(task, total=body.get("total") or None, completed=moved + failed,
                       description=f"drain: {moved} moved, {failed} not, {body.get('running', 0)} moving")


async def _drain(a: argparse.Namespace) -> Any:
    args = {"live": True, "concurrency": a.concurrency, "wait": True}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=a.json) as bar:
        task = bar.add_task("drain: starting", total=None)
        follower = asyncio.get_running_loop().create_task(_follow(a, bar, task))
        try:
            await asyncio.sleep(_SUBSCRIBE_S)
            async with AsyncClient(a.endpoint, timeout_s=a.timeout, curve=curve(a)) as c:
                report = await c.call("host.drain", args)
            bar.update(task, total=report["total"], completed=len(report["moved"]) + len(report["failed"]))
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    return report


def _table(report: dict[str, Any]) -> None:
    rows = [(m["uuid"], f"[green]moved[/] to {m['destination']}", "") for m in report["moved"]]
    rows += [(f["uuid"], f"[red]{f['code']}[/]", f["message"]) for f in report["failed"]]
    n = short_uuids([r[0] for r in rows]) if out.width < 140 else 36
    t = Table(show_edge=False, header_style="bold", pad_edge=False)
    t.add_column("UUID", no_wrap=True, min_width=n)
    t.add_column("RESULT", no_wrap=True)
    t.add_column("WHY", ratio=1, overflow="fold")
    for uuid, result, why in sorted(rows):
        t.add_row(uuid[:n], result, why)
    if rows:
        out.print(t)
    out.print(f"host {report['host']} (disabled): {len(report['moved'])} moved, "
              f"{len(report['failed'])} not moved, of {report['total']}")


def run(a: argparse.Namespace) -> int:
    """``fastcompute drain``: 0 when every instance moved, 1 when some could not."""
    report = asyncio.run(_drain(a))
    emit(a, report, _table)
    return 0 if not report["failed"] else 1


def add_verb(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``drain`` verb, into the ``fastcompute`` parser's subcommands."""
    dr = sub.add_parser("drain", parents=[common], help=protocol.OPS["host.drain"].help)
    dr.add_argument("--concurrency", type=int, default=3, help="live migrations under way at once (1-8)")
    dr.add_argument("--events", default=os.environ.get("FASTCOMPUTE_EVENTS"),
                    help="the agent's events endpoint, for the progress bar (default: the control port + 1)")
    dr.set_defaults(fn=run)
