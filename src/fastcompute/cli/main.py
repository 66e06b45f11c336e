"""The ``fastcompute`` command: the agent itself, key and config helpers, and a client.

Client commands print tables for people and, with ``--json``, JSON for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fastcompute import config as config_mod
from fastcompute.errors import AgentError
from fastcompute.rpc.client import AsyncClient, Client, Curve

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7780"
out = Console()
err = Console(stderr=True)


# -- agent ---------------------------------------------------------------------------------------

def _run_agent(a: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(a.config)
        cfg = config_mod.with_overrides(cfg, "agent", control=a.control, events=a.events,
                                        state_dir=a.state_dir, host=a.host, log_level=a.log_level)
        cfg = config_mod.with_overrides(cfg, "hypervisor", uri=a.hypervisor)
        cfg = config_mod.with_overrides(cfg, "stats", metrics=a.metrics)
        cfg = config_mod.with_overrides(cfg, "placement", url=a.placement)
        if a.file_root:
            cfg = config_mod.with_overrides(cfg, "images", file_roots=[*cfg.images.file_roots, *a.file_root])
        if a.http_source:
            cfg = config_mod.with_overrides(cfg, "images", http_sources=[*cfg.images.http_sources, *a.http_source])
    except config_mod.ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    logging.basicConfig(
        level=cfg.agent.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    from fastcompute.agent import Agent

    agent = Agent(cfg)
    try:
        uvloop.run(agent.run())
    except ValueError as exc:
        logging.getLogger("fastcompute").error("%s", exc)
        return 2
    return 0


def _keys(a: argparse.Namespace) -> int:
    import zmq.auth

    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(d, a.name)
    os.chmod(secret, 0o600)
    _emit(a, {"public": str(public), "secret": str(secret)},
          lambda r: out.print(f"public key  {r['public']}\nsecret key  {r['secret']} (keep it private)"))
    return 0


def _config(_a: argparse.Namespace) -> int:
    print(config_mod.render_defaults())
    return 0


# -- client helpers -------------------------------------------------------------------------------

def _curve(a: argparse.Namespace) -> Curve | None:
    if a.server_key and a.client_key:
        return Curve.from_files(a.server_key, a.client_key)
    return None


def _client(a: argparse.Namespace) -> Client:
    return Client(a.endpoint, timeout_s=a.timeout, curve=_curve(a))


def _emit(a: argparse.Namespace, result: Any, human: Callable[[Any], None]) -> None:
    if a.json:
        print(json.dumps(result, indent=2, default=_json_default))
    else:
        human(result)


def _json_default(o: object) -> Any:
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    raise TypeError(type(o).__name__)


def _instances_table(records: list[dict[str, Any]]) -> None:
    t = Table(show_edge=False, header_style="bold")
    t.add_column("UUID", no_wrap=True, min_width=36)
    for col in ("NAME", "PROJECT", "VM STATE", "TASK", "POWER", "VCPUS", "MEM MB", "DISK GB"):
        t.add_column(col)
    for r in sorted(records, key=lambda r: (r["created_at"], r["uuid"])):
        f = r["flavor"]
        t.add_row(r["uuid"], r["name"], r["project_id"], _colour_state(r["vm_state"]),
                  r["task_state"] or "-", r["power_state"], str(f["vcpus"]), str(f["memory_mb"]),
                  str(f["disk_gb"]))
    out.print(t)
    out.print(f"{len(records)} instances")


def _colour_state(state: str) -> str:
    colour = {"active": "green", "error": "red", "building": "yellow", "stopped": "dim"}.get(state)
    return f"[{colour}]{state}[/]" if colour else state


def _show(r: dict[str, Any]) -> None:
    t = Table(show_header=False, show_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k in ("uuid", "name", "project_id", "vm_state", "task_state", "power_state", "host",
              "created_at", "updated_at"):
        t.add_row(k, str(r.get(k)))
    t.add_row("flavor", json.dumps(r["flavor"]))
    t.add_row("image", json.dumps(r["image"]))
    if r.get("numa"):
        t.add_row("numa", json.dumps(r["numa"]))
    if r.get("fault"):
        t.add_row("fault", f"[red]{r['fault']['code']}[/]: {r['fault']['message']}")
    out.print(t)


def _ping(a: argparse.Namespace) -> int:
    with _client(a) as c:
        r = c.call("ping")
    _emit(a, r, lambda r: out.print(f"agent {r['version']} up {r['uptime_s']:.1f}s at {a.endpoint}"))
    return 0


def _host(a: argparse.Namespace) -> int:
    with _client(a) as c:
        r = c.call("host.info")

    def human(r: dict[str, Any]) -> None:
        hv = r["hypervisor"]
        out.print(f"[bold]{r['hostname']}[/]  {hv['type']} {hv['version']}  {hv['uri']}")
        t = Table(show_edge=False, header_style="bold")
        for col in ("CLASS", "TOTAL", "RESERVED", "RATIO", "USED", "FREE"):
            t.add_column(col, justify="right")
        for rc, inv in r["inventory"].items():
            cap = int((inv["total"] - inv["reserved"]) * inv["allocation_ratio"])
            used = r["usage"].get(rc, 0)
            t.add_row(rc, str(inv["total"]), str(inv["reserved"]), f"{inv['allocation_ratio']:g}",
                      str(used), str(cap - used))
        out.print(t)
        cells = r["topology"]["cells"]
        out.print("NUMA cells: " + ", ".join(
            f"{c['id']}: {len(c['cpus'])} CPUs {c['memory_mb']} MiB" for c in cells))

    _emit(a, r, human)
    return 0


def _spec_pairs(pairs: list[str]) -> dict[str, str]:
    specs = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--spec wants KEY=VALUE, not {p!r}")
        specs[key] = value
    return specs


async def _many(a: argparse.Namespace, label: str, requests: list[tuple[str, dict[str, Any]]]
                ) -> tuple[list[Any], list[str]]:
    """Send many requests at once on one DEALER, with a progress bar."""
    results: list[Any] = []
    failures: list[str] = []
    async with AsyncClient(a.endpoint, timeout_s=a.timeout, curve=_curve(a)) as c:
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


def _boot(a: argparse.Namespace) -> int:
    image: dict[str, Any] = {}
    if a.image:
        image["url"] = a.image if "://" in a.image else Path(a.image).resolve().as_uri()
    if a.image_id:
        image["id"] = a.image_id
    if a.checksum:
        image["checksum"] = a.checksum
    flavor = {"vcpus": a.vcpus, "memory_mb": a.memory, "disk_gb": a.disk,
              "extra_specs": _spec_pairs(a.spec or [])}
    names = [a.name] if a.count == 1 else [f"{a.name}-{i}" for i in range(1, a.count + 1)]
    reqs = [("instance.spawn", {"name": n, "flavor": flavor, "image": image,
                                "project_id": a.project, "wait": a.wait}) for n in names]
    results, failures = asyncio.run(_many(a, "booting", reqs))
    _emit(a, {"instances": results, "failures": failures}, lambda r: _instances_table(r["instances"]))
    for f in failures:
        err.print(f"[red]failed[/] {f}")
    return 1 if failures else 0


def _list(a: argparse.Namespace) -> int:
    args = {k: v for k, v in (("project_id", a.project), ("vm_state", a.state)) if v}
    with _client(a) as c:
        r = c.call("instance.list", args)
    _emit(a, r, _instances_table)
    return 0


def _one(op: str) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        extra: dict[str, Any] = {}
        if op == "instance.reboot":
            extra["hard"] = a.hard
        if op == "instance.stop" and a.timeout_s is not None:
            extra["timeout_s"] = a.timeout_s
        reqs = [(op, {"uuid": u, **extra}) for u in a.uuid]
        if op == "instance.delete" and a.all:
            with _client(a) as c:
                reqs += [(op, {"uuid": r["uuid"]}) for r in c.call("instance.list")]
        results, failures = asyncio.run(_many(a, op.split(".")[1], reqs))

        def human(r: dict[str, Any]) -> None:
            recs = [x for x in r["results"] if "vm_state" in x]
            if recs:
                _instances_table(recs)
            else:
                out.print(f"{len(r['results'])} done")

        _emit(a, {"results": results, "failures": failures}, human)
        for f in failures:
            err.print(f"[red]failed[/] {f}")
        return 1 if failures else 0

    return run


def _show_cmd(a: argparse.Namespace) -> int:
    with _client(a) as c:
        r = c.call("instance.get", {"uuid": a.uuid})
    _emit(a, r, _show)
    return 0


def _images(a: argparse.Namespace) -> int:
    with _client(a) as c:
        if a.prune:
            args = {"max_age_s": a.max_age} if a.max_age is not None else {}
            removed = c.call("images.prune", args)["removed"]
            if not a.json:
                out.print(f"pruned {len(removed)} unused base images")
        bases = c.call("images.list")

    def human(bases: list[dict[str, Any]]) -> None:
        t = Table(show_edge=False, header_style="bold")
        t.add_column("KEY")
        t.add_column("SOURCE", overflow="fold")
        for col in ("FORMAT", "SIZE MiB", "ON DISK MiB", "AGE", "USERS"):
            t.add_column(col)
        for b in sorted(bases, key=lambda b: -b["last_used"]):
            t.add_row(b["key"][:12], b["source"], b["format"], f"{b['virtual_size'] / 2**20:.1f}",
                      f"{b['allocated'] / 2**20:.1f}", _age(b["age_s"]), str(len(b["users"])))
        out.print(t)
        out.print(f"{len(bases)} base images, {sum(b['allocated'] for b in bases) / 2**20:.1f} MiB on disk")

    _emit(a, bases, human)
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _console(a: argparse.Namespace) -> int:
    with _client(a) as c:
        r = c.call("instance.console", {"uuid": a.uuid, "tail_bytes": a.tail})
    if a.json:
        print(json.dumps({"data": r["data"].decode("utf-8", "replace")}))
    else:
        sys.stdout.write(r["data"].decode("utf-8", "replace"))
    return 0


# -- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastcompute`` command."""
    p = argparse.ArgumentParser(prog="fastcompute", description="fastcompute compute agent and client")
    sub = p.add_subparsers(dest="command", required=True)

    ag = sub.add_parser("agent", help="run the agent in the foreground")
    ag.add_argument("--config", help="TOML config file (see `fastcompute config`)")
    ag.add_argument("--control", help="ROUTER endpoint for requests")
    ag.add_argument("--events", help="PUB endpoint for events")
    ag.add_argument("--state-dir", help="directory for the store, disks and logs")
    ag.add_argument("--hypervisor", help="libvirt URI (test:///default, qemu:///system)")
    ag.add_argument("--host", help="this host's name in host.info")
    ag.add_argument("--metrics", help="HOST:PORT for the Prometheus endpoint")
    ag.add_argument("--placement", help="OpenStack Placement URL to keep in step with this host")
    ag.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    ag.add_argument("--file-root", action="append", metavar="DIR",
                    help="a directory file:// images may come from (repeatable; added to [images] file_roots)")
    ag.add_argument("--http-source", action="append", metavar="PREFIX",
                    help="a URL prefix or host http(s) images may come from "
                         "(repeatable; added to [images] http_sources)")
    ag.set_defaults(fn=_run_agent)

    k = sub.add_parser("keys", help="generate a CURVE key pair")
    k.add_argument("--dir", default=".", help="where to write NAME.key and NAME.key_secret")
    k.add_argument("--name", default="fastcompute", help="base name of the key files")
    k.add_argument("--json", action="store_true", help="print JSON")
    k.set_defaults(fn=_keys)

    cf = sub.add_parser("config", help="print the default config file with every key documented")
    cf.set_defaults(fn=_config)

    # `schedule` has its own parser (fastcompute.scheduler); main() hands it the rest of the line.
    sub.add_parser("schedule", add_help=False,
                   help="place spawns across several agents (see `fastcompute schedule --help`)")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint", default=os.environ.get("FASTCOMPUTE_ENDPOINT", DEFAULT_ENDPOINT),
                        help="the agent's control endpoint (env FASTCOMPUTE_ENDPOINT)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    common.add_argument("--server-key", help="the agent's CURVE public key file (NAME.key)")
    common.add_argument("--client-key", help="this client's CURVE secret key file (NAME.key_secret)")

    sub.add_parser("ping", parents=[common], help="check that the agent answers").set_defaults(fn=_ping)
    sub.add_parser("host", parents=[common], help="host inventory and usage").set_defaults(fn=_host)

    b = sub.add_parser("boot", parents=[common], help="spawn one or many instances")
    b.add_argument("name")
    b.add_argument("--count", type=int, default=1)
    b.add_argument("--vcpus", type=int, default=1)
    b.add_argument("--memory", type=int, default=512, help="MiB")
    b.add_argument("--disk", type=int, default=1, help="GiB")
    b.add_argument("--image", help="image URL or local path")
    b.add_argument("--image-id", help="image id in the Image service")
    b.add_argument("--checksum", help="expected image checksum, e.g. sha256:...")
    b.add_argument("--project", default="default")
    b.add_argument("--spec", action="append", help="flavor extra spec KEY=VALUE (repeatable)")
    b.add_argument("--wait", action="store_true", help="return when the instances are active or failed")
    b.set_defaults(fn=_boot)

    ls = sub.add_parser("list", parents=[common], help="list instances")
    ls.add_argument("--project")
    ls.add_argument("--state", help="only this vm_state")
    ls.set_defaults(fn=_list)

    sh = sub.add_parser("show", parents=[common], help="one instance in detail")
    sh.add_argument("uuid")
    sh.set_defaults(fn=_show_cmd)

    for name in ("start", "stop", "pause", "unpause", "suspend", "resume", "reboot", "delete"):
        sp = sub.add_parser(name, parents=[common], help=f"{name} instances")
        sp.add_argument("uuid", nargs="*" if name == "delete" else "+")
        if name == "reboot":
            sp.add_argument("--hard", action="store_true")
        if name == "stop":
            sp.add_argument("--timeout-s", type=float, help="graceful shutdown wait before forcing")
        if name == "delete":
            sp.add_argument("--all", action="store_true", help="delete every instance")
        sp.set_defaults(fn=_one("instance." + name))

    im = sub.add_parser("images", parents=[common], help="the base image cache (size, age, users)")
    im.add_argument("--prune", action="store_true", help="remove bases no instance uses")
    im.add_argument("--max-age", type=float, help="with --prune: only bases unused this many seconds")
    im.set_defaults(fn=_images)

    co = sub.add_parser("console", parents=[common], help="the serial console log")
    co.add_argument("uuid")
    co.add_argument("--tail", type=int, default=64 * 1024, help="bytes from the end")
    co.set_defaults(fn=_console)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastcompute`` command."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["schedule"]:
        from fastcompute.scheduler import fleet as scheduler

        return scheduler.main(args[1:])
    a = build_parser().parse_args(args)
    try:
        return int(a.fn(a))
    except AgentError as exc:
        err.print(f"[red]{exc.code}[/]: {exc.message}")
        return 1
    except TimeoutError as exc:
        err.print(f"[red]timeout[/]: {exc}")
        return 1

