"""Verbs on the agent and its host: run the agent, keys, config, ping, host, images."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from fastcompute import config as config_mod
from fastcompute.cli.common import client, emit, err, out


def run_agent(a: argparse.Namespace) -> int:
    """``fastcompute agent``: the agent in the foreground."""
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


def keys(a: argparse.Namespace) -> int:
    """``fastcompute keys``: a CURVE key pair."""
    import zmq.auth

    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(d, a.name)
    os.chmod(secret, 0o600)
    emit(a, {"public": str(public), "secret": str(secret)},
         lambda r: out.print(f"public key  {r['public']}\nsecret key  {r['secret']} (keep it private)"))
    return 0


def show_config(_a: argparse.Namespace) -> int:
    """``fastcompute config``: the default config file."""
    print(config_mod.render_defaults())
    return 0


def ping(a: argparse.Namespace) -> int:
    """``fastcompute ping``."""
    with client(a) as c:
        r = c.call("ping")
    emit(a, r, lambda r: out.print(f"agent {r['version']} up {r['uptime_s']:.1f}s at {a.endpoint}"))
    return 0


def host(a: argparse.Namespace) -> int:
    """``fastcompute host``: inventory, usage and NUMA cells."""
    with client(a) as c:
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

    emit(a, r, human)
    return 0


def images(a: argparse.Namespace) -> int:
    """``fastcompute images``: the base image cache, pruned first with ``--prune``."""
    with client(a) as c:
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

    emit(a, bases, human)
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
