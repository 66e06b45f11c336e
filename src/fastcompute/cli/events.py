"""``fastcompute events``: watch the agent's event stream, a line per event (``--json``: one
JSON object per line, for scripts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.parse
from typing import Any

from fastcompute.cli.common import curve, json_default, out
from fastcompute.rpc.client import subscribe


def default_events(control: str) -> str:
    """The events endpoint of an agent laid out as by default: the control port plus one."""
    parts = urllib.parse.urlsplit(control)
    if parts.scheme != "tcp" or parts.port is None:
        return control
    return f"tcp://{parts.hostname}:{parts.port + 1}"


def summary(topic: str, body: Any) -> str:
    """One event as a person reads it."""
    if not isinstance(body, dict):
        return json.dumps(body, default=json_default)
    if topic.startswith("instance."):
        text = (f"{body.get('uuid', '')[:8]}  {body.get('name')}  {body.get('vm_state')}"
                f"/{body.get('task_state') or '-'}  power {body.get('power_state')}")
        fault = body.get("fault")
        return text + (f"  fault {fault['code']}: {fault['message']}" if fault else "")
    if topic.startswith("progress."):
        total = body.get("total")
        return f"{str(body.get('uuid', ''))[:8]}  {body.get('stage')}  {body.get('done')}/{total if total else '?'} B"
    if topic == "host.resources":
        usage = body.get("usage", {})
        inv = body.get("inventory", {})
        return "  ".join(f"{rc} {used}/{inv.get(rc, {}).get('total', '?')}" for rc, used in usage.items())
    if topic == "host.stats":
        return f"{len(body.get('instances', {}))} instances sampled"
    return json.dumps(body, default=json_default, sort_keys=True)


async def _watch(a: argparse.Namespace) -> int:
    seen = 0
    async for topic, body in subscribe(a.events or default_events(a.endpoint), a.topic, curve=curve(a)):
        if a.json:
            print(json.dumps({"topic": topic, "at": time.time(), "body": body}, default=json_default), flush=True)
        else:
            out.print(f"{time.strftime('%H:%M:%S')}  [bold]{topic.split('.')[0]}[/]  {summary(topic, body)}",
                      highlight=False, soft_wrap=True)
        seen += 1
        if a.count and seen >= a.count:
            break
    return 0


def watch(a: argparse.Namespace) -> int:
    """``fastcompute events``: until interrupted, or ``--count`` events."""
    try:
        return asyncio.run(_watch(a))
    except KeyboardInterrupt:
        return 0


def add_verb(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``events`` verb, into the ``fastcompute`` parser's subcommands."""
    ev = sub.add_parser("events", parents=[common], help="watch the event stream (instance, progress, host)")
    ev.add_argument("topic", nargs="*", help="topic prefixes, e.g. instance. or progress.<uuid> (default: all)")
    ev.add_argument("--events", default=os.environ.get("FASTCOMPUTE_EVENTS"),
                    help="the agent's events endpoint (env FASTCOMPUTE_EVENTS; default: the control port + 1)")
    ev.add_argument("--count", type=int, help="exit after this many events")
    ev.set_defaults(fn=watch)
