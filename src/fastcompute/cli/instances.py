"""Verbs on instances: boot, list, show, console, and one verb per lifecycle op of
``protocol.OPS`` (start, stop, ..., delete), its options read from the op's args struct."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from fastcompute import protocol
from fastcompute.cli.common import client, emit, err, many, out, resolve
from fastcompute.cli.tables import instances_table, show

# Ops besides the lifecycle ones that act on each instance named, taking only its uuid.
_EACH = frozenset({"instance.delete", "instance.quiesce", "instance.unquiesce", "instance.force_delete",
                   "instance.crash_dump", "instance.get_shelved", "instance.migrate", "instance.confirm_resize",
                   "instance.revert_resize", "instance.live_migrate", "instance.live_migrate_abort"})
_SCALARS = (msgspec.inspect.BoolType, msgspec.inspect.FloatType, msgspec.inspect.IntType, msgspec.inspect.StrType,
            msgspec.inspect.NoneType)


def _spec_pairs(pairs: list[str]) -> dict[str, str]:
    specs = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--spec wants KEY=VALUE, not {p!r}")
        specs[key] = value
    return specs


def _boot(a: argparse.Namespace) -> int:
    image: dict[str, str] = {}
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
    results, failures = asyncio.run(many(a, "booting", reqs))
    emit(a, {"instances": results, "failures": failures}, lambda r: instances_table(r["instances"]))
    for f in failures:
        err.print(f"[red]failed[/] {f}")
    return 1 if failures else 0


def _list(a: argparse.Namespace) -> int:
    args = {k: v for k, v in (("project_id", a.project), ("vm_state", a.state)) if v}
    with client(a) as c:
        r = c.call("instance.list", args)
    emit(a, r, instances_table)
    return 0


def _show(a: argparse.Namespace) -> int:
    with client(a) as c:
        r = c.call("instance.get", {"uuid": resolve(c, [a.uuid])[0]})
    emit(a, r, show)
    return 0


def _console(a: argparse.Namespace) -> int:
    with client(a) as c:
        r = c.call("instance.console", {"uuid": resolve(c, [a.uuid])[0], "tail_bytes": a.tail})
    if a.json:
        print(json.dumps({"data": r["data"].decode("utf-8", "replace")}))
    else:
        sys.stdout.write(r["data"].decode("utf-8", "replace"))
    return 0


def _console_url(a: argparse.Namespace) -> int:
    with client(a) as c:
        r = c.call("instance.get_console", {"uuid": resolve(c, [a.uuid])[0], "type": a.type})
    if a.json:
        print(json.dumps(r))
    else:
        print(r["url"])
    return 0


def _set_password(a: argparse.Namespace) -> int:
    # Read, never an argument: a command line is visible to every user of the host (ps).
    password = getpass.getpass(f"password for {a.user}: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\r\n")
    with client(a) as c:
        r = c.call("instance.set_password", {"uuid": resolve(c, [a.uuid])[0], "user": a.user, "password": password})
    emit(a, r, lambda r: out.print(f"password of {r['user']} set in {r['uuid']}"))
    return 0


def _image_ref(given: str) -> dict[str, str]:
    """``--image`` of rebuild and rescue: a URL, a local file, or else an Image service id."""
    if "://" in given:
        return {"url": given}
    if Path(given).exists():
        return {"url": Path(given).resolve().as_uri()}
    return {"id": given}


def _connection_info(text: str) -> Any:
    """Cinder's connection info from JSON on the command line or, as ``@FILE``, in a file
    (which keeps a CHAP password out of the process list)."""
    try:
        return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--connection-info: {exc}") from None


def _attach_volume(a: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"id": a.volume_id, "connection_info": _connection_info(a.connection_info)}
    spec.update({k: v for k, v in (("device_name", a.device_name), ("bus", a.bus), ("serial", a.serial)) if v})
    if a.read_only:
        spec["read_only"] = True
    return _volume_op(a, "instance.attach_volume", {"volume": spec})


def _volume_op(a: argparse.Namespace, op: str, args: dict[str, Any]) -> int:
    with client(a) as c:
        r = c.call(op, {"uuid": resolve(c, [a.uuid])[0], **args})
    emit(a, r, show)
    return 0


def _resize(a: argparse.Namespace) -> int:
    flavor = {"vcpus": a.vcpus, "memory_mb": a.memory, "disk_gb": a.disk, "extra_specs": _spec_pairs(a.spec or [])}
    with client(a) as c:
        args: dict[str, Any] = {"uuid": resolve(c, [a.uuid])[0], "flavor": flavor, "wait": a.wait}
        if a.destination:
            args["destination"] = a.destination
        r = c.call("instance.resize", args)
    emit(a, r, show)
    return 0


def _export(a: argparse.Namespace) -> int:
    with client(a) as c:
        r = c.call("instance.export", {"uuid": resolve(c, [a.uuid])[0]})
    # MessagePack, not JSON: the bootstrap data holds bytes (user data). It holds the user
    # data too, so the file is the caller's only.
    fd = os.open(a.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.msgpack.encode(r))
    emit(a, r["record"], show)
    return 0


def _evacuate(a: argparse.Namespace) -> int:
    try:
        copy = msgspec.msgpack.decode(Path(a.file).read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        raise SystemExit(f"{a.file}: {exc}") from None
    args: dict[str, Any] = {"uuid": copy["record"]["uuid"], "instance": copy}
    if a.source:
        args["source"] = a.source
    with client(a) as c:
        r = c.call("instance.evacuate", args)
    emit(a, r, show)
    return 0


def _each(op: protocol.Op, options: list[str]) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        extra: dict[str, Any] = {name: getattr(a, name) for name in options if getattr(a, name) is not None}
        if isinstance(extra.get("image"), str):
            extra["image"] = _image_ref(extra["image"])
        with client(a) as c:
            uuids = resolve(c, a.uuid)
            if a.all:
                uuids += [r["uuid"] for r in c.call("instance.list")]
        if not uuids:
            raise SystemExit(f"fastcompute {op.verb}: name instances (uuid, uuid prefix or name) or give --all")
        results, failures = asyncio.run(many(a, str(op.verb), [(op.name, {"uuid": u, **extra}) for u in uuids]))

        def human(r: dict[str, Any]) -> None:
            recs = [x for x in r["results"] if "vm_state" in x]
            if recs:
                instances_table(recs)
            else:
                out.print(f"{len(r['results'])} done")

        emit(a, {"results": results, "failures": failures}, human)
        for f in failures:
            err.print(f"[red]failed[/] {f}")
        return 1 if failures else 0

    return run


def _scalar(field: msgspec.structs.FieldInfo) -> bool:
    """Whether a field is one option's value: a scalar, or an image (``--image``, see
    ``_image_ref``); other maps and structs, e.g. a snapshot's properties, are for clients of
    the wire, not the command line."""
    if field.name == "image":
        return True
    info = msgspec.inspect.type_info(field.type)
    kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return all(isinstance(k.type if isinstance(k, msgspec.inspect.Metadata) else k, _SCALARS) for k in kinds)


def _add_option(p: argparse.ArgumentParser, field: msgspec.structs.FieldInfo) -> None:
    """An option for one field of an op's args: a flag for a bool, a typed value otherwise."""
    info = msgspec.inspect.type_info(field.type)
    kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    help_ = None
    for k in kinds:
        if isinstance(k, msgspec.inspect.Metadata):
            help_ = (k.extra_json_schema or {}).get("description", help_)
    plain = [k.type if isinstance(k, msgspec.inspect.Metadata) else k for k in kinds]
    flag = "--" + field.name.replace("_", "-")
    if any(isinstance(k, msgspec.inspect.StructType) for k in plain):
        p.add_argument(flag, dest=field.name, help="image URL, local file or Image service id")
    elif any(isinstance(k, msgspec.inspect.BoolType) for k in plain):
        p.add_argument(flag, dest=field.name, action="store_true", default=None, help=help_)
    elif any(isinstance(k, msgspec.inspect.FloatType) for k in plain):
        p.add_argument(flag, dest=field.name, type=float, help=help_)
    else:
        p.add_argument(flag, dest=field.name, type=int if any(
            isinstance(k, msgspec.inspect.IntType) for k in plain) else str, help=help_)


def add_verbs(sub: Any, common: argparse.ArgumentParser) -> None:
    """The instance verbs, into the ``fastcompute`` parser's subcommands."""
    ops = protocol.OPS
    b = sub.add_parser("boot", parents=[common], help=ops["instance.spawn"].help)
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

    ls = sub.add_parser("list", parents=[common], help=ops["instance.list"].help)
    ls.add_argument("--project")
    ls.add_argument("--state", help="only this vm_state")
    ls.set_defaults(fn=_list)

    sh = sub.add_parser("show", parents=[common], help=ops["instance.get"].help)
    sh.add_argument("uuid", help="uuid, uuid prefix or name")
    sh.set_defaults(fn=_show)

    co = sub.add_parser("console", parents=[common], help=ops["instance.console"].help)
    co.add_argument("uuid", help="uuid, uuid prefix or name")
    co.add_argument("--tail", type=int, default=64 * 1024, help="bytes from the end")
    co.set_defaults(fn=_console)

    cu = sub.add_parser("console-url", parents=[common], help=ops["instance.get_console"].help)
    cu.add_argument("uuid", help="uuid, uuid prefix or name")
    cu.add_argument("--type", choices=protocol.schema.CONSOLE_TYPES, default="novnc", help="which console")
    cu.set_defaults(fn=_console_url)

    sp = sub.add_parser("set-password", parents=[common], help=ops["instance.set_password"].help
                        + "; the password is read from the terminal, or a line of standard input")
    sp.add_argument("uuid", help="uuid, uuid prefix or name")
    sp.add_argument("--user", default="root", help="the user in the guest")
    sp.set_defaults(fn=_set_password)

    av = sub.add_parser("attach-volume", parents=[common], help=ops["instance.attach_volume"].help)
    av.add_argument("uuid", help="uuid, uuid prefix or name")
    av.add_argument("volume_id")
    av.add_argument("--connection-info", required=True, help="Cinder's connection info: JSON, or @FILE")
    av.add_argument("--device-name", help="the guest's device, e.g. /dev/vdb (default: the next free one)")
    av.add_argument("--bus", choices=["virtio", "scsi", "sata"])
    av.add_argument("--serial", help="the disk's serial (default: the volume id)")
    av.add_argument("--read-only", action="store_true")
    av.set_defaults(fn=_attach_volume)
    dv = sub.add_parser("detach-volume", parents=[common], help=ops["instance.detach_volume"].help)
    dv.add_argument("uuid", help="uuid, uuid prefix or name")
    dv.add_argument("volume_id")
    dv.set_defaults(fn=lambda a: _volume_op(a, "instance.detach_volume", {"volume_id": a.volume_id}))
    ev = sub.add_parser("extend-volume", parents=[common], help=ops["instance.extend_volume"].help)
    ev.add_argument("uuid", help="uuid, uuid prefix or name")
    ev.add_argument("volume_id")
    ev.add_argument("new_size_bytes", type=int, help="the volume's size now, in bytes")
    ev.set_defaults(fn=lambda a: _volume_op(a, "instance.extend_volume",
                                            {"volume_id": a.volume_id, "new_size_bytes": a.new_size_bytes}))
    rs = sub.add_parser("resize", parents=[common], help=ops["instance.resize"].help
                        + "; then resize-confirm or resize-revert it where it is now")
    rs.add_argument("uuid", help="uuid, uuid prefix or name")
    rs.add_argument("--vcpus", type=int, required=True)
    rs.add_argument("--memory", type=int, required=True, help="MiB")
    rs.add_argument("--disk", type=int, required=True, help="GiB (never less than now)")
    rs.add_argument("--spec", action="append", help="flavor extra spec KEY=VALUE (repeatable)")
    rs.add_argument("--destination", help="the host to move to (default: this one, where allowed)")
    rs.add_argument("--wait", action="store_true", help="return when the instance is resized (or the move failed)")
    rs.set_defaults(fn=_resize)

    ex = sub.add_parser("export", parents=[common], help=ops["instance.export"].help
                        + "; keep the file to evacuate the instance should its host go down")
    ex.add_argument("uuid", help="uuid, uuid prefix or name")
    ex.add_argument("--output", required=True, help="the file to write (MessagePack; it holds the user data)")
    ex.set_defaults(fn=_export)
    eva = sub.add_parser("evacuate", parents=[common], help=ops["instance.evacuate"].help
                         + " (--endpoint: the host to rebuild it on)")
    eva.add_argument("file", help="what export wrote while the instance's host was up")
    eva.add_argument("--source", help="the host that is down (default: the instance's host in the file)")
    eva.set_defaults(fn=_evacuate)

    for op in ops.values():
        if op.verb is None or not (op.transition is not None or op.name in _EACH):
            continue
        sp = sub.add_parser(op.verb, parents=[common], help=op.help)
        sp.add_argument("uuid", nargs="*", help="uuids, uuid prefixes or names")
        sp.add_argument("--all", action="store_true", help=f"{op.verb} every instance")
        options = [f for f in msgspec.structs.fields(op.args) if f.name != "uuid" and _scalar(f)]
        for field in options:
            _add_option(sp, field)
        sp.set_defaults(fn=_each(op, [f.name for f in options]))
