"""The ``fastcompute`` command: the agent itself, key and config helpers, and a client.

Client commands print tables for people and, with ``--json``, JSON for scripts. The verbs live
by group: ``host`` (agent, keys, config, ping, host, images), ``instances`` (boot, list, show,
console and the lifecycle verbs of ``protocol.OPS``), ``events``, ``drain``.
"""

from __future__ import annotations

import argparse
import os
import sys

from fastcompute.cli import drain, events, host, instances
from fastcompute.cli.common import err
from fastcompute.errors import AgentError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7780"


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
    ag.set_defaults(fn=host.run_agent)

    k = sub.add_parser("keys", help="generate a CURVE key pair")
    k.add_argument("--dir", default=".", help="where to write NAME.key and NAME.key_secret")
    k.add_argument("--name", default="fastcompute", help="base name of the key files")
    k.add_argument("--json", action="store_true", help="print JSON")
    k.set_defaults(fn=host.keys)

    cf = sub.add_parser("config", help="print the default config file with every key documented")
    cf.set_defaults(fn=host.show_config)

    # `schedule` has its own parser (fastcompute.scheduler); main() hands it the rest of the line.
    sub.add_parser("schedule", add_help=False,
                   help="place spawns across several agents (see `fastcompute schedule --help`)")

    sub.add_parser("move", add_help=False,
                   help="migrate, resize or evacuate to a host the scheduler picks (see `fastcompute move --help`)")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint", default=os.environ.get("FASTCOMPUTE_ENDPOINT", DEFAULT_ENDPOINT),
                        help="the agent's control endpoint (env FASTCOMPUTE_ENDPOINT)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    common.add_argument("--server-key", help="the agent's CURVE public key file (NAME.key)")
    common.add_argument("--client-key", help="this client's CURVE secret key file (NAME.key_secret)")

    sub.add_parser("ping", parents=[common], help="check that the agent answers").set_defaults(fn=host.ping)
    sub.add_parser("host", parents=[common], help="host inventory and usage").set_defaults(fn=host.host)
    instances.add_verbs(sub, common)

    im = sub.add_parser("images", parents=[common], help="the base image cache (size, age, users)")
    im.add_argument("--prune", action="store_true", help="remove bases no instance uses")
    im.add_argument("--max-age", type=float, help="with --prune: only bases unused this many seconds")
    im.set_defaults(fn=host.images)

    events.add_verb(sub, common)
    drain.add_verb(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastcompute`` command."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["schedule"]:
        from fastcompute.scheduler import fleet as scheduler

        return scheduler.main(args[1:])
    if args[:1] == ["move"]:
        from fastcompute.scheduler import moves

        return moves.main(args[1:])
    a = build_parser().parse_args(args)
    try:
        return int(a.fn(a))
    except AgentError as exc:
        err.print(f"[red]{exc.code}[/]: {exc.message}")
        return 1
    except TimeoutError as exc:
        err.print(f"[red]timeout[/]: {exc}")
        return 1
