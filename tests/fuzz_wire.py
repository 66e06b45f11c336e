"""A seeded, bounded fuzzer of the agent's wire contract (issue #19), shared by
``tests/test_fuzz_wire.py`` (a few thousand steps, in ``make test``) and
``bench/test_bench_fuzz.py`` (tens of thousands, in ``make bench``).

It talks to a real agent with nothing but pyzmq (one DEALER for the fuzzed requests, another
for pings) and ``msgpack``, plus a small hand-written MessagePack writer for what ``msgpack``
refuses to produce (nesting deeper than its recursion limit, duplicate keys, strings that are
not UTF-8).

Every step is a pure function of ``random.Random(seed)`` and the step number: the generator
never looks at a reply, so the same seed sends the same requests in the same order (only the
timing, and so the interleaving of concurrent requests, differs between runs). A step is one of

- an odd frame: not MessagePack, not a map, wrong types, huge strings, deep nesting, extra
  ZeroMQ frames, frames over the limit, unknown ops and fields, NULs, Unicode digits,
  out-of-range integers, floats where integers go, bad URLs, duplicate keys, ...;
- one well-formed op on a small set of uuids (spawn with small flavors and a 1 MiB raw image,
  start, stop, pause, unpause, suspend, resume, soft and hard reboot, delete, get, list,
  console, host.info, ...);
- a burst of such ops sent back to back without waiting (replies matched by id);
- a retry of an earlier request with its id, whose reply must be the first one byte for byte.

Checked after every step: each request got exactly one reply within ``REPLY_TIMEOUT_S``, the
reply is a map ``{v: 1, id, ok, result | error: {code, message}}`` with the request's id
mirrored (``""`` allowed only for odd frames), the code is one of the contract's and never
``INTERNAL``, what the contract says an odd frame must get (``BAD_REQUEST``, ``UNKNOWN_OP``) it
gets, and a ping sent on another socket right after the step's requests, so while they run, is
answered within ``PING_LIMIT_S``.

Checked at quiescent points (every ``check_every`` steps and at the end, once no instance has a
task under way, waiting at most ``SETTLE_S``): no instance keeps a ``task_state``; no fault is
``INTERNAL``; ``host.info`` usage (VCPU, PCPU, MEMORY_MB, DISK_GB) equals the sum of the flavors
of the instances that hold a claim (every listed one but those in ``error``, which gave theirs
back) and ``instances`` the number listed; the instance directories under the state dir are
exactly those of the listed instances not in ``error``; the uuids whose last op was a sequential
spawn or delete exist or not as that op said; the agent's peak RSS stays under a bound.

Domains of ``test:///default`` live inside the agent process, so no other process can list
them. The proxy chosen: a sweep (every ``sweep_every`` steps and at the end) deletes every
instance, checks that ``instance.get`` and ``instance.console`` of every uuid used are
``NOT_FOUND``, usage is zero and no instance directory is left, then spawns every uuid used
again with ``wait: true``: a domain leaked under that uuid (its name is derived from the uuid)
is still running, so defining and starting the new one fails and the spawn ends in ``error``
instead of ``active``. The sweep then deletes them and checks usage is zero again. A leaked
domain that is defined but shut off is not seen by this proxy.

Violations are collected (each distinct kind once, with how often it recurred) so that one run
lists every defect it meets; ``failfast`` stops at the first. Each one names the seed, the step
and the exact request (as a Python literal in terms of this module, and the frames in hex when
they are short) so that it can be replayed.
"""

from __future__ import annotations

import math
import os
import random
import struct
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
from agent_fixtures import AgentProcess, disk_dirs

from fastcompute.protocol import schema

ERROR_CODES = frozenset({
    "BAD_REQUEST", "UNKNOWN_OP", "NOT_FOUND", "CONFLICT", "NO_CAPACITY", "QUOTA_EXCEEDED",
    "IMAGE_ERROR", "HYPERVISOR_ERROR", "BUSY", "INTERNAL", "FORBIDDEN",
})
# docs/PROTOCOL.md: replies of read-only ops are not kept once answered (a retry reads afresh),
# and an envelope frame is at most 255 bytes (a ZeroMQ routing id's limit); a request with a
# longer one is BAD_REQUEST, answered without its envelope so that nothing of it is echoed.
READ_ONLY_OPS = frozenset({
    "ping", "host.info", "images.list", "instance.get", "instance.list", "instance.console", "instance.stats",
})
MAX_ENVELOPE_FRAME = 255
VM_STATES = frozenset(schema.VM_STATES)  # the record's states, as the protocol declares them
RESOURCE_CLASSES = ("VCPU", "PCPU", "MEMORY_MB", "DISK_GB")
MAX_FRAME = 1 << 20  # the agent's default max_frame_bytes
REPLY_TIMEOUT_S = 30.0
PING_LIMIT_S = 1.0
SETTLE_S = 20.0
MAX_RSS_MB = 512


# -- a MessagePack writer for what msgpack.packb will not write -------------------------------

@dataclass(frozen=True)
class Nest:
    """``depth`` arrays (``kind="list"``) or single-key maps ``{"a": ...}`` around ``leaf``.

    Written iteratively, so any depth fits (``msgpack.packb`` stops at 511).
    """

    depth: int
    kind: str = "list"
    leaf: Any = 0


@dataclass(frozen=True)
class Pairs:
    """A map written from ``items`` as they are: duplicate keys stay duplicated."""

    items: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True)
class Verbatim:
    """Bytes spliced into the frame as they are (an invalid UTF-8 string, a reserved byte)."""

    data: bytes


def _header(n: int, fix: int, fix_max: int, b16: int, b32: int) -> bytes:
    if n <= fix_max:
        return bytes([fix | n])
    if n < 1 << 16:
        return bytes([b16]) + struct.pack(">H", n)
    return bytes([b32]) + struct.pack(">I", n)


def pack(obj: Any) -> bytes:
    """MessagePack of ``obj``, understanding ``Nest``, ``Pairs`` and ``Verbatim``."""
    out = bytearray()
    _pack_into(out, obj)
    return bytes(out)


def _pack_into(out: bytearray, obj: Any) -> None:
    if isinstance(obj, Verbatim):
        out += obj.data
    elif isinstance(obj, Nest):
        unit = b"\x91" if obj.kind == "list" else b"\x81\xa1a"
        out += unit * obj.depth
        _pack_into(out, obj.leaf)
    elif isinstance(obj, Pairs):
        out += _header(len(obj.items), 0x80, 15, 0xDE, 0xDF)
        for k, v in obj.items:
            _pack_into(out, k)
            _pack_into(out, v)
    elif isinstance(obj, dict):
        _pack_into(out, Pairs(tuple(obj.items())))
    elif isinstance(obj, list | tuple):
        out += _header(len(obj), 0x90, 15, 0xDC, 0xDD)
        for v in obj:
            _pack_into(out, v)
    else:
        out += msgpack.packb(obj, use_bin_type=True)


def show(obj: Any) -> str:
    """``obj`` as a Python expression over this module's names, long runs and nests shortened
    exactly (``'x' * 4096``, ``Nest(1000, 'map', 0)``), so a failure message can be replayed."""
    if isinstance(obj, str | bytes) and len(obj) > 64:
        if len(set(obj)) == 1:
            return f"{obj[:1]!r} * {len(obj)}"
        head = obj[:1]
        if obj == head * len(obj):
            return f"{head!r} * {len(obj)}"
    if isinstance(obj, str | bytes) and len(obj) > 64:
        # Runs of one character after a short prefix (how the generator makes big strings).
        for cut in range(1, 17):
            rest = obj[cut:]
            if rest and len(set(rest)) == 1:
                return f"{obj[:cut]!r} + {rest[:1]!r} * {len(rest)}"
        return repr(obj)
    if isinstance(obj, Nest):
        return f"Nest({obj.depth}, {obj.kind!r}, {show(obj.leaf)})"
    if isinstance(obj, Pairs):
        return "Pairs((" + ", ".join(f"({show(k)}, {show(v)})" for k, v in obj.items) + ",))"
    if isinstance(obj, Verbatim):
        return f"Verbatim({obj.data!r})"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{show(k)}: {show(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(show(v) for v in obj) + "]"
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"float({str(obj)!r})"
    return repr(obj)


# -- steps -------------------------------------------------------------------------------------

@dataclass
class Message:
    """One request of a step: the frames sent, how to show them, and what the reply must be."""

    frames: list[bytes]
    shown: str
    tag: str  # the generator that made it (odd) or the op (well-formed): names its defects
    rid: str | None  # the id the reply must echo; None: "" or the id the frame carries
    sent_ids: tuple[Any, ...] = ()  # the ids the frame carries (a map may repeat the key)
    odd: bool = False
    must: str | None = None  # the code the contract requires (odd frames)
    op: str | None = None
    uuid: str | None = None  # normalised, for well-formed ops on one instance
    replay_of: Message | None = None

    def describe(self) -> str:
        """The request, exactly enough to send it again."""
        text = self.shown
        if len(self.frames) > 1:
            text += f"   [ZeroMQ frames: {[show(f) if len(f) > 64 else f for f in self.frames[:-1]]} + request]"
        if sum(len(f) for f in self.frames) <= 400:
            text += "\n    hex: " + " | ".join(f.hex() for f in self.frames)
        return text


@dataclass
class Step:
    """What one step sends: one message, or several at once (a burst)."""

    n: int
    kind: str
    messages: list[Message]


@dataclass
class Violation:
    """A broken invariant, first seen at ``step``; ``count`` is how often its kind recurred."""

    key: tuple[str, ...]
    step: int
    text: str
    count: int = 1


SMALL_FLAVORS: tuple[dict[str, Any], ...] = (
    {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
    {"vcpus": 2, "memory_mb": 128, "disk_gb": 1},
    {"vcpus": 1, "memory_mb": 32, "disk_gb": 1, "extra_specs": {"quota:cpu_shares": "512"}},
    {"vcpus": 1, "memory_mb": 48, "disk_gb": 0},  # the 1 MiB image does not fit: build ends in error
)

UNICODE_DIGITS = ("²", "٣", "๕", "١٢", "Ⅻ", "\U0001d7d7", "१०", "½", "⁴2", "٣\x00")


class Generator:
    """Makes the steps of one seed."""

    def __init__(self, seed: int, image: Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.image_url = image.as_uri()
        self.missing_url = (image.parent / "fuzz-no-such-image.raw").as_uri()
        self.uuids = [str(uuid_mod.UUID(int=self.rng.getrandbits(128), version=4)) for _ in range(4)]
        self.fresh: list[str] = []  # uuids made up for single spawns since the last sweep
        self.history: deque[Message] = deque(maxlen=64)  # answered requests, for retries
        self._odd: list[Callable[[str], tuple[Any, str, str | None]]] = [
            self._not_msgpack, self._not_a_map, self._bad_envelope, self._unknown_fields,
            self._bad_args, self._bad_flavor, self._bad_extra_specs, self._bad_image, self._bad_names,
            self._deep, self._huge, self._unknown_op, self._bad_ports, self._duplicate_keys,
            self._odd_but_valid,
        ]

    # helpers --------------------------------------------------------------------------------

    def rid(self, n: int, i: int = 0) -> str:
        """A request id no other request of this run uses."""
        return f"fz{self.seed}-{n}-{i}"

    def pick_uuid(self) -> str:
        """A uuid of the small set, or now and then one no instance has."""
        if self.rng.random() < 0.05:
            u = str(uuid_mod.UUID(int=self.rng.getrandbits(128), version=4))
            if len(self.fresh) < 16:
                self.fresh.append(u)
            return u
        return self.rng.choice(self.uuids)

    def spelled(self, u: str) -> str:
        """A uuid as a client may spell it: canonical, upper case or without hyphens."""
        r = self.rng.random()
        return u.upper() if r < 0.1 else u.replace("-", "") if r < 0.2 else u

    def spawn_args(self, u: str | None) -> dict[str, Any]:
        """Arguments of a small spawn (sometimes one whose build fails)."""
        rng = self.rng
        args: dict[str, Any] = {
            "name": f"fz-{rng.randrange(3)}",
            "flavor": dict(rng.choice(SMALL_FLAVORS)),
            "image": {"url": self.missing_url if rng.random() < 0.08 else self.image_url},
        }
        if u is not None:
            args["uuid"] = self.spelled(u)
        if rng.random() < 0.3:
            args["wait"] = True
        if rng.random() < 0.1:
            args["project_id"] = rng.choice(["p1", "p2"])
        if rng.random() < 0.1:
            args["metadata"] = {"k": rng.choice(["a", "b"])}
        return args

    def well_formed(self, n: int, i: int) -> Message:
        """One valid request of the lifecycle over the small uuid set."""
        rng = self.rng
        rid = self.rid(n, i)
        u = self.pick_uuid()
        op = rng.choices(
            ["instance.spawn", "instance.start", "instance.stop", "instance.pause", "instance.unpause",
             "instance.suspend", "instance.resume", "instance.reboot", "instance.delete", "instance.get",
             "instance.list", "instance.console", "host.info", "ping", "images.list", "instance.stats",
             "host.set_enabled", "images.prune"],
            weights=[14, 6, 6, 5, 5, 5, 5, 8, 9, 5, 3, 3, 2, 1, 1, 1, 1, 1],
        )[0]
        args: dict[str, Any] | None
        if op == "instance.spawn":
            args = self.spawn_args(u)
        elif op in ("host.info", "ping", "images.list"):
            args = None if rng.random() < 0.5 else {}
        elif op == "instance.list":
            args = rng.choice([{}, {"vm_state": rng.choice(sorted(VM_STATES))}, {"project_id": "default"}])
        elif op == "instance.stats":
            args = rng.choice([{}, {"uuid": u}])
        elif op == "host.set_enabled":
            args = {"enabled": rng.random() < 0.7}
            if rng.random() < 0.5:
                args["reason"] = "fuzz"
        elif op == "images.prune":
            args = rng.choice([{}, {"max_age_s": 0}, {"max_age_s": 3600.0}])
        else:
            args = {"uuid": self.spelled(u)}
            if op == "instance.stop" and rng.random() < 0.7:
                args["timeout_s"] = rng.choice([0, 0.0, 0.2, 1])
            elif op == "instance.reboot":
                args["hard"] = rng.random() < 0.5
            elif op == "instance.console" and rng.random() < 0.5:
                args["tail_bytes"] = rng.choice([1, 100, 16 * 1024 * 1024])
        req: dict[str, Any] = {"v": 1, "id": rid, "op": op}
        if args is not None:
            req["args"] = args
        target = u if op.startswith("instance.") and args and "uuid" in args else None
        msg = Message([pack(req)], show(req), op, rid, sent_ids=(rid,), op=op, uuid=target)
        self.history.append(msg)
        return msg

    # odd frames: each returns (object or raw bytes, tag, the code the contract requires) ------

    def odd(self, n: int) -> Message:
        """A frame a hostile or broken client might send."""
        rng = self.rng
        rid = self.rid(n)
        obj, tag, must = rng.choice(self._odd)(rid)
        if isinstance(obj, bytes):
            frame, shown = obj, f"raw bytes {show(obj)}"
        else:
            frame, shown = pack(obj), show(obj)
        frames = [frame]
        r = rng.random()
        if r < 0.06:
            # Extra leading ZeroMQ frames: the reply must come back with the same envelope.
            extra = rng.choice([b"", b"x", b"\x00" * 5, b"e" * 4096])
            frames = [extra, frame] if rng.random() < 0.7 else [extra, b"", frame]
            tag += "+extra-frame"
            if len(extra) > MAX_ENVELOPE_FRAME:
                tag, must = "extra-frame-over-envelope-limit", "BAD_REQUEST"
        elif r < 0.065:
            # A leading frame over the limit: the request as a whole is over it.
            frames = [b"E" * (MAX_FRAME + rng.choice([1, 7 << 20])), frame]
            tag, must = "extra-frame-over-limit", "BAD_REQUEST"
        if isinstance(obj, Pairs):
            sent_ids = tuple(v for k, v in obj.items if k == "id")
        else:
            sent_ids = (obj.get("id"),) if isinstance(obj, dict) else ()
        target = None
        if isinstance(obj, dict) and obj.get("op") == "instance.spawn" and isinstance(obj.get("args"), dict):
            try:
                target = str(uuid_mod.UUID(obj["args"]["uuid"]))
            except (KeyError, TypeError, ValueError, AttributeError):
                target = None
        return Message(frames, shown, tag, None, sent_ids=sent_ids, odd=True, must=must,
                       op="instance.spawn" if target else None, uuid=target)

    def _not_msgpack(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        good = pack({"v": 1, "id": rid, "op": "ping"})
        frame = rng.choice([
            b"", b"\xc1", b"hello, agent", b"\xff" * 9, b"\x00",
            good[: rng.randrange(1, len(good))],  # truncated
            good + b"\x01",  # trailing bytes
            bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64))),
            b"\xdf\xff\xff\xff\xff",  # a map announcing 4 billion pairs
            b"\xdd\x7f\xff\xff\xff",  # an array announcing 2 billion items
            b"\xdb\xff\xff\xff\xf0abc",  # a string announcing 4 GiB
        ])
        return frame, "not-msgpack", "BAD_REQUEST"

    def _not_a_map(self, rid: str) -> tuple[Any, str, str | None]:
        v = self.rng.choice([[1, rid, "ping"], "ping", 1, None, True, 1.5, b"ping", [], -1,
                             msgpack.ExtType(1, b"x"), Nest(self.rng.choice([10, 600, 3000]))])
        return v, "not-a-map", "BAD_REQUEST"

    def _bad_envelope(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        req: dict[str, Any] = {"v": 1, "id": rid, "op": "ping"}
        key = rng.choice(["v", "id", "op", "args", "missing"])
        if key == "v":
            req["v"] = rng.choice([0, 2, -1, 1.0, "1", True, None, 2**64 - 1, -(2**63), [1]])
        elif key == "id":
            req["id"] = rng.choice(["", "x" * 129, 7, None, b"bytes-id", ["a"], {"a": 1}, 1.5,
                                    Verbatim(b"\xa2\xff\xfe")])
        elif key == "op":
            req["op"] = rng.choice(["", 5, None, b"ping", ["ping"], "o" * 65, Verbatim(b"\xa4\xc3\x28ab")])
        elif key == "args":
            req["args"] = rng.choice([[], "x", 1, None, True, b"\x80", 2.5, [{}]])
        else:
            del req[rng.choice(["v", "id", "op"])]
        return req, f"envelope-{key}", "BAD_REQUEST"

    def _unknown_fields(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        where = rng.choice(["envelope", "args", "flavor", "image"])
        name = rng.choice(["extra", "Uuid", "wait ", "", "\x00", "é", "args"])
        if where == "envelope":
            req: dict[str, Any] = {"v": 1, "id": rid, "op": "ping", name: 1}
            if name == "args":
                req = {"v": 1, "id": rid, "op": "ping", "agrs": {}}
        elif where == "args":
            req = {"v": 1, "id": rid, "op": "instance.get",
                   "args": {"uuid": rng.choice(self.uuids), name or "zz": True}}
        else:
            args = self.spawn_args(rng.choice(self.uuids))
            args[where][name or "zz"] = 1
            req = {"v": 1, "id": rid, "op": "instance.spawn", "args": args}
        return req, f"unknown-field-{where}", "BAD_REQUEST"

    def _bad_args(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        op = rng.choice(["instance.get", "instance.stop", "instance.reboot", "instance.console",
                         "instance.delete", "instance.list", "host.set_enabled", "images.prune",
                         "instance.start"])
        u = rng.choice(self.uuids)
        args: dict[str, Any] = {"uuid": u}
        what = rng.choice(["uuid", "missing", "timeout", "hard", "tail", "list", "enabled", "prune"])
        if what == "uuid":
            args["uuid"] = rng.choice([
                5, None, "", "not-a-uuid", u + "0", u[:-1], u.replace("-", "_"), u + "\x00",
                u[:-1] + "\x00", "٣" * 32, u[:8] + "-" + "\uff11" * 4 + u[13:], b"x" * 16,
                -(2**63), [u], {"uuid": u}, u.replace("-", "--", 1),
            ])
            if op in ("instance.list", "host.set_enabled", "images.prune"):
                op = "instance.get"
        elif what == "missing":
            args = {}
            op = rng.choice(["instance.get", "instance.delete", "host.set_enabled", "instance.reboot"])
        elif what == "timeout":
            op = "instance.stop"
            args["timeout_s"] = rng.choice([-1, -0.5, 3601, 1e308, float("nan"), float("inf"),
                                            float("-inf"), "1", 2**64 - 1, True, [1]])
        elif what == "hard":
            op = "instance.reboot"
            args["hard"] = rng.choice([1, 0, "true", None, 1.0, [True]])
        elif what == "tail":
            op = "instance.console"
            args["tail_bytes"] = rng.choice([0, -1, 2**64 - 1, 2**63, 16 * 1024 * 1024 + 1, 1.0, 1.5, "64",
                                             float("nan"), None])
        elif what == "list":
            op = "instance.list"
            args = rng.choice([{"vm_state": "ACTIVE"}, {"vm_state": "deleted\x00"}, {"vm_state": 1},
                               {"project_id": ""}, {"project_id": "p" * 256}, {"vm_state": "active|error"},
                               {"vm_state": "active\n"}])
        elif what == "enabled":
            op = "host.set_enabled"
            args = rng.choice([{"enabled": 1}, {"enabled": "false"}, {"enabled": None},
                               {"enabled": True, "reason": "r" * 256}, {"enabled": True, "reason": 5}])
        else:
            op = "images.prune"
            args = {"max_age_s": rng.choice([-1, float("nan"), float("-inf"), "0", [0], -1e-300])}
        return {"v": 1, "id": rid, "op": op, "args": args}, f"args-{what}", "BAD_REQUEST"

    def _bad_flavor(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        args = self.spawn_args(rng.choice(self.uuids))
        key = rng.choice(["vcpus", "memory_mb", "disk_gb", "flavor", "extra_specs"])
        if key == "flavor":
            args["flavor"] = rng.choice([None, [], "small", 1, {}, {"vcpus": 1}])
        elif key == "extra_specs":
            args["flavor"]["extra_specs"] = rng.choice([[], "x", {"hw:cpu_policy": 1}, {"": "x"},
                                                        {"k" * 256: "v"}, {"x": "v" * 256}, {1: "x"}])
        else:
            args["flavor"][key] = rng.choice([0, -1, 1.0, 1.5, "1", "\u0661", True, None, 2**31, 2**63, 2**64 - 1,
                                              -(2**63), float("nan"), [1]])
            if key == "disk_gb" and args["flavor"][key] == 0:
                args["flavor"][key] = -1
        return {"v": 1, "id": rid, "op": "instance.spawn", "args": args}, f"flavor-{key}", "BAD_REQUEST"

    def _bad_extra_specs(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        args = self.spawn_args(rng.choice(self.uuids))
        quota = rng.choice(["quota:cpu_shares", "quota:cpu_quota", "quota:cpu_period",
                            "quota:disk_read_bytes_sec", "quota:disk_write_iops_sec"])
        choice = rng.choice([
            (quota, rng.choice(UNICODE_DIGITS), "quota-unicode-digit"),
            (quota, rng.choice(["-1", "1.5", "", " 1", "1e3", "0x10", "+5", "1_000", "99999999999999999999999",
                                "NaN", "1\x00"]), "quota-not-integer"),
            ("hw:numa_nodes", rng.choice(["0", "-1", "²", "2.0", "x", "1000000", ""]), "numa-nodes"),
            ("hw:cpu_policy", rng.choice(["DEDICATED", "", "shared\x00", "x" * 255]), "cpu-policy"),
            ("hw:mem_page_size", rng.choice(["0", "2XB", "-2MB", "99999999999999GB", "²MB", "1.5GB"]), "page-size"),
            ("hw:no_such_key", "1", "unknown-hw-key"),
            ("quota:no_such", "1", "unknown-quota-key"),
            ("hw:numa_cpus.0", rng.choice(["0-", "-1", "5-2", "0,,1", "²", "0-99999", "0-9999999", "a-b", "^0"]),
             "numa-cpus"),
            ("hw:numa_mem.0", rng.choice(["-1", "x", "²", "1.5"]), "numa-mem"),
            ("hw:cpu_dedicated_mask", rng.choice(["^", "^x", "0-", "²"]), "dedicated-mask"),
            ("hw:cpu_thread_policy", rng.choice(["ISOLATE", "x"]), "thread-policy"),
        ])
        key, value, tag = choice
        specs: dict[str, str] = {key: value}
        if tag in ("numa-cpus", "numa-mem"):
            specs["hw:numa_nodes"] = "1"
        args["flavor"]["extra_specs"] = specs
        # Unknown quota keys and invalid values are BAD_REQUEST by the contract; the NUMA ones
        # that happen to be valid may fit or not (NO_CAPACITY), so only their codes are checked.
        must = "BAD_REQUEST" if tag.startswith(("quota", "unknown")) else None
        return {"v": 1, "id": rid, "op": "instance.spawn", "args": args}, f"extra-specs-{tag}", must

    def _bad_image(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        args = self.spawn_args(self.pick_uuid())
        image = rng.choice([
            {}, {"url": ""}, {"id": ""}, {"url": 5}, {"url": None, "id": None},
            {"url": "http://127.0.0.1:99999/x.raw"}, {"url": "http://127.0.0.1:0/x.raw"},
            {"url": "http://127.0.0.1:-1/x.raw"}, {"url": "http://[::1/x.raw"}, {"url": "http://127.0.0.1:1/x.raw"},
            {"url": "http://127.0.0.1:1x/x.raw"}, {"url": "ftp://127.0.0.1/x.raw"}, {"url": "file:///etc/passwd"},
            {"url": "file://" + "/a" * 2000}, {"url": self.image_url + "\x00"}, {"url": "file:"},
            {"url": "//127.0.0.1/x"}, {"url": self.image_url + "/../../../../etc/passwd"},
            {"url": self.image_url, "checksum": rng.choice(["", "sha256:zz", "md5:00", "sha256:" + "0" * 64,
                                                            "sha512:" + "f" * 128, "sha256"])},
            {"url": self.image_url, "disk_format": rng.choice(["qcow2", "vmdk", "RAW", ""])},
            {"id": "no-such-image"},  # no Image service configured
            {"url": "http://127.0.0.1:1/x.raw" + "\x00"}, {"url": "http://user@:1/"},
        ])
        args["image"] = image
        return {"v": 1, "id": rid, "op": "instance.spawn", "args": args}, "image", None

    def _bad_names(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        args = self.spawn_args(self.pick_uuid())
        field_ = rng.choice(["name", "project_id", "metadata"])
        if field_ == "name":
            args["name"] = rng.choice(["", "a\x00b", "\x00", "n" * 256, "n" * 255, "é" * 255, "<x>&'\"",
                                       "\ud7ff\ue000", "a\nb", "]]>", "\x1b[31m", 5, None])
        elif field_ == "project_id":
            args["project_id"] = rng.choice(["", "p\x00", "p" * 256, "../x", 1])
        else:
            args["metadata"] = rng.choice([{"k": 1}, {"k": "v" * 256}, {"k" * 256: "v"}, [], "x",
                                           {f"k{i}": "v" for i in range(129)}, {"\x00": "\x00"}, {"": ""}])
        return {"v": 1, "id": rid, "op": "instance.spawn", "args": args}, f"text-{field_}", None

    def _deep(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        depth = rng.choice([5, 64, 200, 511, 1000, 2000, 5000])
        nest = Nest(depth, rng.choice(["list", "map"]), rng.choice([0, "x", {}, []]))
        where = rng.choice(["args", "args-field", "envelope-field", "metadata", "flavor", "networks"])
        if where == "args":
            req: Any = {"v": 1, "id": rid, "op": rng.choice(["ping", "instance.get"]), "args": nest}
        elif where == "args-field":
            req = {"v": 1, "id": rid, "op": "instance.get", "args": {"uuid": nest}}
        elif where == "envelope-field":
            req = {"v": 1, "id": rid, "op": "ping", "deep": nest}
        else:
            args = self.spawn_args(rng.choice(self.uuids))
            if where == "metadata":
                args["metadata"] = {"k": nest}
            elif where == "flavor":
                args["flavor"]["extra_specs"] = {"hw:x": nest}
            else:
                args["networks"] = [{"id": nest}]
            req = {"v": 1, "id": rid, "op": "instance.spawn", "args": args}
        return req, f"deep-{where}", "BAD_REQUEST"

    def _huge(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        size = rng.choice([300, 70_000, MAX_FRAME - 200, MAX_FRAME + 1, 3 * MAX_FRAME])
        where = rng.choice(["id", "op", "name", "url", "unknown", "metadata", "raw"])
        big = "h" * size
        if where == "raw":
            return b"\x00" * size, f"huge-raw-{'over' if size > MAX_FRAME else 'under'}", "BAD_REQUEST"
        req: dict[str, Any] = {"v": 1, "id": rid, "op": "ping"}
        if where in ("id", "op"):
            req[where] = big
        elif where == "unknown":
            req["padding"] = big
        else:
            args = self.spawn_args(rng.choice(self.uuids))
            if where == "name":
                args["name"] = big
            elif where == "url":
                args["image"] = {"url": "file:///" + big}
            else:
                args["metadata"] = {"k": big}
            req = {"v": 1, "id": rid, "op": "instance.spawn", "args": args}
        over = len(pack(req)) > MAX_FRAME
        # Every field here has a length limit below 300 but the URL (4096).
        must = None if where == "url" and size < 4000 and not over else "BAD_REQUEST"
        return req, f"huge-{where}-{'over' if over else 'under'}", must

    def _unknown_op(self, rid: str) -> tuple[Any, str, str | None]:
        op = self.rng.choice(["instance.Spawn", "instance.", "host", "ping ", "pïng", "instance.teleport",
                              "__init__", "handlers", "x\x00", "instance.spawn\x00", "../ping", "PING", "_drive",
                              "instance.spawn ", "u" * 64])
        return {"v": 1, "id": rid, "op": op, "args": {}}, "unknown-op", "UNKNOWN_OP"

    def _bad_ports(self, rid: str) -> tuple[Any, str, str | None]:
        # Always invalid (no MAC or a bad one, no network): nothing is ever plugged on this host.
        rng = self.rng
        port = rng.choice([{}, {"id": "p1"}, {"id": "p1", "mac": "zz", "network": {"id": "n1"}, "fixed_ips": []},
                           {"id": 5, "mac": None}, {"id": "p1", "mac": "fa:16:3e:00:00:01", "network": "n1"},
                           {"id": "p" * 300}])
        u = rng.choice(self.uuids)
        req = rng.choice([
            {"v": 1, "id": rid, "op": "instance.attach_port", "args": {"uuid": u, "port": port}},
            {"v": 1, "id": rid, "op": "instance.attach_port", "args": {"uuid": u, "port": [port]}},
            {"v": 1, "id": rid, "op": "instance.spawn", "args": {**self.spawn_args(u), "networks": [port]}},
            {"v": 1, "id": rid, "op": "instance.spawn", "args": {**self.spawn_args(u), "networks": port}},
            {"v": 1, "id": rid, "op": "instance.detach_port", "args": {"uuid": u, "port_id": rng.choice(["", "x", 1])}},
            {"v": 1, "id": rid, "op": "instance.set_security_groups",
             "args": {"uuid": u, "port_id": "x", "security_groups": rng.choice([[{}], "x", [{"id": 1}]])}},
        ])
        return req, f"ports-{req['op']}", None

    def _duplicate_keys(self, rid: str) -> tuple[Any, str, str | None]:
        rng = self.rng
        u = rng.choice(self.uuids)
        pairs = rng.choice([
            (("v", 1), ("id", rid), ("op", "ping"), ("op", "host.info")),
            (("v", 1), ("id", rid), ("id", rid + "b"), ("op", "ping")),
            (("v", 1), ("v", 2), ("id", rid), ("op", "ping")),
            (("v", 1), ("id", rid), ("op", "instance.get"), ("args", Pairs((("uuid", u), ("uuid", 5))))),
            (("v", 1), ("id", rid), ("op", "ping"), (1, 1)),
            (("v", 1), ("id", rid), ("op", "ping"), (None, 1)),
        ])
        return Pairs(pairs), "duplicate-keys", None

    def _odd_but_valid(self, rid: str) -> tuple[Any, str, str | None]:
        # Legal but unusual: args written as an empty map, bin where nothing is read, limits.
        rng = self.rng
        u = rng.choice(self.uuids)
        req = rng.choice([
            {"v": 1, "id": "i" * 128, "op": "ping"},
            {"v": 1, "id": "\x00", "op": "ping"},
            {"v": 1, "id": "🙂" * 32, "op": "ping"},
            {"v": 1, "id": rid, "op": "instance.console", "args": {"uuid": u.upper(), "tail_bytes": 1}},
            {"v": 1, "id": rid, "op": "instance.get", "args": {"uuid": u.replace("-", "")}},
            {"v": 1, "id": rid, "op": "instance.list", "args": {"project_id": "\x00"}},
            {"v": 1, "id": rid, "op": "ping", "args": Pairs(())},
        ])
        return req, "odd-but-valid", None

    # steps ----------------------------------------------------------------------------------

    def step(self, n: int) -> Step:
        """The ``n``-th step."""
        r = self.rng.random()
        if r < 0.45:
            return Step(n, "odd", [self.odd(n)])
        if r < 0.88:
            return Step(n, "op", [self.well_formed(n, 0)])
        if r < 0.97 or not self.history:
            count = self.rng.randrange(2, 6)
            return Step(n, "burst", [self.well_formed(n, i) for i in range(count)])
        # A retry of an earlier request with the same id: it must not run again.
        first = self.rng.choice(list(self.history))
        return Step(n, "retry", [Message(first.frames, first.shown, first.tag, first.rid, sent_ids=first.sent_ids,
                                         op=first.op, uuid=None, replay_of=first)])


# -- the runner and its checks ---------------------------------------------------------------

TRANSIENT = frozenset({"BUSY", "HYPERVISOR_ERROR", "INTERNAL"})


class FuzzAbort(Exception):
    """The run cannot go on (the agent died or stopped answering, or failfast)."""


def _short(value: Any, limit: int = 600) -> str:
    text = show(value) if not isinstance(value, bytes) or len(value) <= limit else f"<{len(value)} bytes>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set (VmHWM) of a process, in MiB; None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Agent:
    """What the fuzzer needs of the agent under test (``tests/agent_fixtures.AgentProcess`` fits)."""

    control: str
    pid: int
    alive: Callable[[], bool]
    disk_dirs: Callable[[], set[str]]
    log: Callable[[], str]


class Fuzzer:
    """Runs the steps of one seed against one agent and collects the violations."""

    def __init__(self, agent: Agent, image: Path, seed: int, steps: int, *, check_every: int = 250,
                 sweep_every: int = 1000, time_limit_s: float = 600.0, max_violations: int = 50,
                 failfast: bool = False) -> None:
        if not agent.control.startswith("tcp://127.0.0.1:") and not agent.control.startswith("ipc://"):
            raise ValueError(f"the fuzzer talks to 127.0.0.1 only, not {agent.control}")
        self.agent = agent
        self.seed = seed
        self.steps = steps
        self.check_every = check_every
        self.sweep_every = sweep_every
        self.time_limit_s = time_limit_s
        self.max_violations = max_violations
        self.failfast = failfast
        self.gen = Generator(seed, image)
        self.image_url = image.as_uri()
        ctx = zmq.Context.instance()
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        self.ping_sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        for s in (self.sock, self.ping_sock):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(agent.control)
        self.violations: dict[tuple[str, ...], Violation] = {}
        self.first_replies: dict[str, bytes] = {}
        self.model: dict[str, bool | None] = {}  # uuid -> exists, per the last sequential spawn/delete
        self.recent: dict[str, deque[str]] = {}
        self.codes: dict[str, int] = {}
        self.steps_run = 0
        self.max_ping_s = 0.0
        self.checks = 0
        self._calls = 0
        self._step = 0

    def close(self) -> None:
        """Close the sockets."""
        self.sock.close()
        self.ping_sock.close()

    # reporting ------------------------------------------------------------------------------

    def violation(self, key: tuple[str, ...], text: str) -> None:
        """Record a broken invariant (each kind once, then counted)."""
        # A defect is the same with or without extra ZeroMQ frames around the request.
        key = tuple(k.split("+")[0] for k in key)
        known = self.violations.get(key)
        if known is not None:
            known.count += 1
            return
        v = Violation(key, self._step, f"seed={self.seed} step={self._step}: {text}")
        self.violations[key] = v
        if self.failfast or len(self.violations) >= self.max_violations:
            raise FuzzAbort(v.text)

    def report(self) -> str:
        """Every violation, with how to replay the run."""
        lines = [f"{len(self.violations)} kinds of violation in {self.steps_run} steps of seed {self.seed} "
                 f"(replay: FASTCOMPUTE_FUZZ_SEED={self.seed} FASTCOMPUTE_FUZZ_STEPS=<step + 1>):"]
        for v in sorted(self.violations.values(), key=lambda v: v.step):
            again = f" [seen {v.count} times]" if v.count > 1 else ""
            lines.append(f"- {v.text}{again}")
        return "\n".join(lines)

    def summary(self) -> str:
        """What the run did, for the test's output."""
        codes = ", ".join(f"{k}={v}" for k, v in sorted(self.codes.items()))
        return (f"fuzz seed={self.seed}: {self.steps_run}/{self.steps} steps, {self.checks} quiescent checks, "
                f"max ping {self.max_ping_s * 1000:.0f} ms, replies: {codes}")

    # the run --------------------------------------------------------------------------------

    def run(self) -> list[Violation]:
        """Run every step (within the time limit) and the final checks; return the violations."""
        deadline = time.monotonic() + self.time_limit_s
        try:
            for n in range(self.steps):
                if time.monotonic() > deadline:
                    break
                self._step = n
                self.execute(self.gen.step(n))
                self.steps_run = n + 1
                if not self.agent.alive():
                    self.violation(("agent-died",), "the agent exited:\n" + self.agent.log()[-3000:])
                    raise FuzzAbort("agent died")
                if (n + 1) % self.check_every == 0:
                    self.quiescent()
                if (n + 1) % self.sweep_every == 0:
                    self.sweep()
            self.quiescent()
            self.sweep()
        except FuzzAbort:
            pass
        return list(self.violations.values())

    def execute(self, step: Step) -> None:
        """Send a step's requests and a ping, then check every reply."""
        for m in step.messages:
            self.sock.send_multipart(m.frames)
        ping_id = f"ping-{self.seed}-{step.n}"
        ping_sent = time.monotonic()
        self.ping_sock.send(pack({"v": 1, "id": ping_id, "op": "ping"}))
        pending = list(step.messages)
        got: list[tuple[Message, dict[str, Any]]] = []
        ping_done = False
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.ping_sock, zmq.POLLIN)
        deadline = ping_sent + REPLY_TIMEOUT_S
        while (pending or not ping_done) and (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000) + 1))
            if self.ping_sock in ready:
                ping_done |= self._take_ping(ping_id, ping_sent, step)
            if self.sock in ready:
                frames = self.sock.recv_multipart()
                matched = self._match(pending, frames, step)
                if matched is not None:
                    got.append(matched)
        for m in pending:
            self.violation(("no-reply", m.tag), f"no reply within {REPLY_TIMEOUT_S:.0f}s to {self._context(m, step)}")
        if not ping_done:
            self.violation(("ping-timeout",), f"ping got no reply within {REPLY_TIMEOUT_S:.0f}s while "
                           f"{self._context(step.messages[0], step)} was in flight")
            raise FuzzAbort("agent stopped answering")
        self._update_model(step, got)

    def _take_ping(self, ping_id: str, sent: float, step: Step) -> bool:
        reply = msgpack.unpackb(self.ping_sock.recv(), raw=False, strict_map_key=False)
        if not isinstance(reply, dict) or reply.get("id") != ping_id:
            return False  # a late reply to an earlier ping
        took = time.monotonic() - sent
        self.max_ping_s = max(self.max_ping_s, took)
        if reply.get("ok") is not True:
            self.violation(("ping-failed",), f"ping failed: {_short(reply)}")
        elif took > PING_LIMIT_S:
            self.violation(("ping-slow", step.messages[0].tag),
                           f"ping took {took:.2f}s (limit {PING_LIMIT_S}s) while this was in flight: "
                           f"{self._context(step.messages[0], step)}")
        return True

    def _context(self, m: Message, step: Step) -> str:
        text = f"request ({step.kind}): {m.describe()}"
        others = [o for o in step.messages if o is not m]
        if others:
            text += "\n    sent together with:\n" + "\n".join(f"      {o.shown}" for o in others)
        return text

    def _match(self, pending: list[Message], frames: list[bytes], step: Step) -> tuple[Message, dict[str, Any]] | None:
        body = frames[-1]
        try:
            reply = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # any decoding failure of the agent's reply is a finding
            self.violation(("reply-undecodable",), f"reply is not MessagePack ({exc}): {body[:200]!r}")
            return None
        if not isinstance(reply, dict):
            self.violation(("reply-not-map",), f"reply is not a map: {_short(reply)}")
            return None
        rid = reply.get("id")
        m = next((p for p in pending if p.rid is not None and p.rid == rid), None)
        if m is None:
            m = next((p for p in pending if p.rid is None and (rid == "" or rid in p.sent_ids)), None)
        if m is None:
            self.violation(("reply-unmatched",), f"a reply matches no request in flight: {_short(reply)}; "
                           f"in flight: {[p.shown[:200] for p in pending]}")
            return None
        pending.remove(m)
        envelope = m.frames[:-1]
        if any(len(f) > MAX_ENVELOPE_FRAME for f in envelope):
            envelope = []
        if frames[:-1] != envelope:
            self.violation(("envelope-not-mirrored", m.tag),
                           f"reply envelope {[_short(f, 80) for f in frames[:-1]]} is not the request's: "
                           f"{self._context(m, step)}")
        self.check_reply(m, reply, body, step)
        return m, reply

    def check_reply(self, m: Message, reply: dict[str, Any], body: bytes, step: Step) -> None:
        """The contract's rules for one reply."""
        def bad(kind: str, why: str) -> None:
            self.violation((kind, m.tag), f"{why}\n  {self._context(m, step)}\n  reply: {_short(reply)}")

        ok = reply.get("ok")
        error = reply.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        self.codes[code or "ok"] = self.codes.get(code or "ok", 0) + 1
        if m.uuid is not None:
            self.recent.setdefault(m.uuid, deque(maxlen=6)).append(f"step {step.n} ({step.kind}): "
                                                                     f"{m.shown[:300]} -> {code or 'ok'}")
        if reply.get("v") != 1 or not isinstance(reply.get("id"), str) or not isinstance(ok, bool):
            bad("reply-malformed", "the reply lacks v: 1, a string id or a boolean ok")
            return
        if ok:
            if "result" not in reply or "error" in reply:
                bad("reply-malformed", "a successful reply without a result (or with an error)")
        elif not isinstance(error, dict) or code not in ERROR_CODES or not isinstance(error.get("message"), str) \
                or not error["message"]:
            bad("reply-malformed", "a failed reply without an error {code from the contract, message}")
            return
        if code == "INTERNAL":
            bad("INTERNAL", "INTERNAL reply")
        if m.must is not None and code != m.must and code != "INTERNAL":
            bad("wrong-code", f"the contract says {m.must}, the agent said {code or 'ok'}")
        if m.replay_of is not None and m.op not in READ_ONLY_OPS:
            first = self.first_replies.get(m.rid or "")
            if first is not None and first != body:
                bad("retry-not-replayed", f"a retry with the same id got another reply; first: {_short(first)}")
        elif m.rid is not None and not m.odd and code not in TRANSIENT:
            self.first_replies.setdefault(m.rid, body)
        result = reply.get("result")
        for rec in result if isinstance(result, list) else [result]:
            fault = rec.get("fault") if isinstance(rec, dict) else None
            if isinstance(fault, dict) and fault.get("code") == "INTERNAL":
                # A build or op that failed on an unexpected exception: a bug, as the reply code would be.
                u = str(rec.get("uuid", ""))
                self.violation(("fault-INTERNAL", str(fault.get("message", ""))[:30]),
                               f"instance {u} is in error with an INTERNAL fault: {_short(fault)}\n"
                               f"  {self._context(m, step)}\n    its last requests:\n{self._history(u)}")
        if ok and m.op == "instance.spawn":
            rec = reply.get("result")
            if not isinstance(rec, dict) or rec.get("vm_state") not in VM_STATES:
                bad("spawn-result", "a spawn's result is not an instance record")
            elif rec.get("task_state") == "deleting" or rec.get("vm_state") == "deleted":
                bad("spawn-acked-while-deleting", "a spawn was acknowledged with the record of an instance "
                    "being deleted: the client is told it has an instance that is about to vanish")
            elif m.uuid is not None and rec.get("uuid") != m.uuid:
                bad("spawn-result", f"the spawn's record has uuid {rec.get('uuid')}, not {m.uuid}")

    def _update_model(self, step: Step, got: list[tuple[Message, dict[str, Any]]]) -> None:
        for m, reply in got:
            if m.uuid is None or m.op not in ("instance.spawn", "instance.delete"):
                continue
            if step.kind == "burst":
                self.model[m.uuid] = None  # concurrent: either order is right
            elif reply.get("ok") is True:
                self.model[m.uuid] = m.op == "instance.spawn"

    # helpers for the checks -----------------------------------------------------------------

    def call(self, op: str, args: dict[str, Any] | None = None, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """One request of the checker itself; its reply map (INTERNAL is also recorded)."""
        self._calls += 1
        rid = f"chk-{self.seed}-{self._calls}"
        req: dict[str, Any] = {"v": 1, "id": rid, "op": op}
        if args is not None:
            req["args"] = args
        self.sock.send(pack(req))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            reply = msgpack.unpackb(self.sock.recv_multipart()[-1], raw=False, strict_map_key=False)
            if isinstance(reply, dict) and reply.get("id") == rid:
                if not reply.get("ok") and reply.get("error", {}).get("code") == "INTERNAL":
                    self.violation(("INTERNAL", "check " + op), f"INTERNAL reply to {show(req)}: {_short(reply)}")
                return reply
        self.violation(("no-reply", "check " + op), f"no reply within {timeout_s:.0f}s to {show(req)}")
        raise FuzzAbort("agent stopped answering")

    def result(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """The result of a check request that must succeed."""
        reply = self.call(op, args)
        if reply.get("ok") is not True:
            self.violation(("check-failed", op), f"{op} {_short(args)} failed: {_short(reply)}")
            raise FuzzAbort(f"{op} failed")
        return reply["result"]

    def settle(self) -> list[dict[str, Any]]:
        """Wait (bounded) until no instance has a task under way; the last listing."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            recs: list[dict[str, Any]] = self.result("instance.list", {})
            if all(r.get("task_state") is None for r in recs) or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)

    def _history(self, uuid: str) -> str:
        return "\n".join("      " + h for h in self.recent.get(uuid, ())) or "      (none)"

    # quiescent checks -----------------------------------------------------------------------

    def quiescent(self) -> None:
        """The invariants that hold once every task has settled."""
        self.checks += 1
        recs = self.settle()
        listed = {r["uuid"] for r in recs}
        for r in recs:
            if r.get("task_state") is not None:
                self.violation(("stuck-task", str(r["task_state"])),
                               f"instance {r['uuid']} still {r['vm_state']}/{r['task_state']} after {SETTLE_S:.0f}s "
                               f"of quiet: {_short(r)}\n    its last requests:\n{self._history(r['uuid'])}")
            fault = r.get("fault")
            if isinstance(fault, dict) and fault.get("code") == "INTERNAL":
                self.violation(("fault-INTERNAL",), f"instance {r['uuid']} has an INTERNAL fault: {_short(fault)}\n"
                               f"    its last requests:\n{self._history(r['uuid'])}")
        info = self.result("host.info")
        held = [r for r in recs if r.get("vm_state") != "error"]
        want = {"VCPU": sum(r["flavor"]["vcpus"] for r in held), "PCPU": 0,
                "MEMORY_MB": sum(r["flavor"]["memory_mb"] for r in held),
                "DISK_GB": sum(r["flavor"]["disk_gb"] for r in held)}
        usage = {rc: info["usage"].get(rc, 0) for rc in RESOURCE_CLASSES}
        if usage != want:
            self.violation(("usage",), f"host.info usage {usage} is not the sum of the live claims {want}; "
                           f"instances: {[(r['uuid'], r['vm_state'], r['task_state']) for r in recs]}")
        if info.get("instances", len(recs)) != len(recs):
            self.violation(("instance-count",), f"host.info says {info.get('instances')} instances, "
                           f"instance.list {len(recs)}")
        dirs = self.agent.disk_dirs()
        want_dirs = {r["uuid"] for r in held}
        if dirs != want_dirs:
            extra = dirs - want_dirs
            self.violation(("disk-dirs", "extra" if extra else "missing"),
                           f"instance directories {sorted(dirs)} are not those of the instances holding a disk "
                           f"{sorted(want_dirs)}; extra {sorted(extra)}, missing {sorted(want_dirs - dirs)}\n" +
                           "\n".join(f"    last requests on {u}:\n{self._history(u)}" for u in dirs ^ want_dirs))
        for u, exists in self.model.items():
            if exists is not None and (u in listed) != exists:
                self.violation(("vanished" if exists else "resurrected",),
                               f"instance {u} should {'exist' if exists else 'be gone'} after its last sequential "
                               f"{'spawn' if exists else 'delete'}, but it {'is gone' if exists else 'exists'}\n"
                               f"    its last requests:\n{self._history(u)}")
        rss = peak_rss_mb(self.agent.pid)
        if rss is not None and rss > MAX_RSS_MB:
            self.violation(("rss",), f"the agent's peak RSS is {rss:.0f} MiB, over {MAX_RSS_MB} MiB")
        # Heal what is stuck (delete waits for nothing here), so one defect does not hide others.
        for r in recs:
            if r.get("task_state") is not None:
                self.call("instance.delete", {"uuid": r["uuid"]})
                self.model[r["uuid"]] = None

    def sweep(self) -> None:
        """Delete everything and check nothing is left; re-spawn every uuid used (the domain proxy)."""
        recs = self.settle()
        for r in recs:
            reply = self.call("instance.delete", {"uuid": r["uuid"]})
            if reply.get("ok") is not True:
                self.violation(("sweep-delete", str(reply.get("error", {}).get("code"))),
                               f"delete of {r['uuid']} ({r['vm_state']}/{r['task_state']}) failed: {_short(reply)}")
        used = [*self.gen.uuids, *self.gen.fresh, *(r["uuid"] for r in recs)]
        used = list(dict.fromkeys(used))
        for u in used:
            for op in ("instance.get", "instance.console"):
                reply = self.call(op, {"uuid": u})
                if reply.get("error", {}).get("code") != "NOT_FOUND":
                    self.violation(("not-gone", op), f"after deleting everything, {op} of {u} is not NOT_FOUND: "
                                   f"{_short(reply)}\n    its last requests:\n{self._history(u)}")
        self._check_empty("after deleting everything")
        for u in used:
            args = {"uuid": u, "name": "fz-sweep", "flavor": dict(SMALL_FLAVORS[0]),
                    "image": {"url": self.image_url}, "wait": True}
            reply = self.call("instance.spawn", args)
            rec = reply.get("result") if reply.get("ok") else None
            if not isinstance(rec, dict) or rec.get("vm_state") != "active":
                self.violation(("respawn",), f"after deleting everything, a new spawn of {u} did not become active "
                               f"(a domain left behind under its uuid?): {_short(reply)}\n"
                               f"    its last requests:\n{self._history(u)}")
            self.call("instance.delete", {"uuid": u})
            self.model[u] = False
        self._check_empty("after the re-spawns were deleted")
        self.gen.fresh.clear()

    def _check_empty(self, when: str) -> None:
        recs = self.result("instance.list", {})
        info = self.result("host.info")
        usage = {rc: info["usage"].get(rc, 0) for rc in RESOURCE_CLASSES}
        dirs = self.agent.disk_dirs()
        if recs or any(usage.values()) or dirs:
            self.violation(("not-empty", when), f"{when}: instances {[r['uuid'] for r in recs]}, "
                           f"usage {usage}, directories {sorted(dirs)}")


# -- the entry point of the test and the benchmark ------------------------------------------

DEFAULT_SEED = 19


def fuzz_agent(agent: AgentProcess) -> Agent:
    """The view of a started ``AgentProcess`` that the fuzzer needs."""
    assert agent.proc is not None
    proc = agent.proc
    return Agent(control=agent.control, pid=proc.pid, alive=lambda: proc.poll() is None,
                 disk_dirs=lambda: disk_dirs(agent), log=agent.log)


def run_fuzz(agent: AgentProcess, image: Path, *, default_steps: int, time_limit_s: float,
             check_every: int = 250, sweep_every: int = 1000) -> None:
    """Run the fuzzer with the environment's seed and step count; fail with every violation."""
    seed = int(os.environ.get("FASTCOMPUTE_FUZZ_SEED", DEFAULT_SEED))
    steps = int(os.environ.get("FASTCOMPUTE_FUZZ_STEPS", default_steps))
    failfast = os.environ.get("FASTCOMPUTE_FUZZ_FAILFAST", "") not in ("", "0")
    fuzzer = Fuzzer(fuzz_agent(agent), image, seed, steps, check_every=check_every, sweep_every=sweep_every,
                    time_limit_s=time_limit_s, failfast=failfast)
    try:
        violations = fuzzer.run()
    finally:
        fuzzer.close()
    print("\n" + fuzzer.summary())
    assert not violations, fuzzer.report()
    # A run that did next to nothing proves nothing: the time limit must not eat the steps.
    assert fuzzer.steps_run >= min(steps, 500), fuzzer.summary()
