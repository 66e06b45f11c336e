"""The wire contract from a client written with nothing but pyzmq and msgpack.

``PlainClient`` below is all a client in another language would have: it imports nothing from
fastcompute. Bad input of every kind gets its typed error, with ``details.field`` naming the
field and the request id echoed when it can be read, and the agent lives on.
"""

from __future__ import annotations

import os
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from agent_fixtures import AgentProcess, recv_events, sub_socket

TIMEOUT_MS = 20_000


class PlainClient:
    """A contract client on one socket: DEALER (one frame) or REQ (ZeroMQ adds the delimiter)."""

    def __init__(self, endpoint: str, socket_type: int = zmq.DEALER) -> None:
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(socket_type)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.n = 0

    def __enter__(self) -> PlainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def next_id(self) -> str:
        self.n += 1
        return f"plain-{os.getpid()}-{self.n}"

    def send_raw(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self) -> dict[str, Any]:
        assert self.sock.poll(TIMEOUT_MS), "no reply from the agent"
        reply = msgpack.unpackb(self.sock.recv())
        assert isinstance(reply, dict)
        return reply

    def raw(self, frame: bytes) -> dict[str, Any]:
        self.send_raw(frame)
        return self.recv()

    def request(self, msg: Any) -> dict[str, Any]:
        return self.raw(msgpack.packb(msg))

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"v": 1, "id": self.next_id(), "op": op}
        if args is not None:
            msg["args"] = args
        reply = self.request(msg)
        assert reply["id"] == msg["id"]
        return reply


def spawn(image: Path, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"name": "plain", "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
                            "image": {"url": image.as_uri()}}
    args.update(over)
    return args


def assert_error(reply: dict[str, Any], code: str, rid: str, field: str | None = None) -> None:
    assert reply["v"] == 1 and reply["ok"] is False, reply
    assert reply["id"] == rid, reply
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"]["message"], str) and len(reply["error"]["message"]) > 10
    if field is not None:
        assert reply["error"]["details"]["field"] == field, reply["error"]


def assert_alive(agent: AgentProcess) -> None:
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    with PlainClient(agent.control) as c:
        assert c.call("ping")["ok"] is True


@pytest.mark.parametrize("socket_type", [zmq.DEALER, zmq.REQ], ids=["DEALER", "REQ"])
def test_plain_client_runs_an_instance(agent: AgentProcess, image_file: Path, socket_type: int) -> None:
    with PlainClient(agent.control, socket_type) as c:
        pong = c.call("ping")
        assert pong["v"] == 1 and pong["ok"] is True
        assert isinstance(pong["result"]["version"], str) and pong["result"]["uptime_s"] >= 0
        assert c.call("ping", {})["ok"] is True
        info = c.call("host.info")["result"]
        assert info["hypervisor"]["uri"] == "test:///default"
        assert set(info["inventory"]) >= {"VCPU", "PCPU", "MEMORY_MB", "DISK_GB"}
        rec = c.call("instance.spawn", spawn(image_file, wait=True))["result"]
        assert rec["vm_state"] == "active"
        assert c.call("instance.stop", {"uuid": rec["uuid"]})["result"]["vm_state"] == "stopped"
        data = c.call("instance.console", {"uuid": rec["uuid"]})["result"]["data"]
        assert isinstance(data, bytes)
        assert c.call("instance.delete", {"uuid": rec["uuid"]})["result"] == {"uuid": rec["uuid"], "deleted": True}
        gone = c.call("instance.get", {"uuid": rec["uuid"]})
        assert gone["ok"] is False and gone["error"]["code"] == "NOT_FOUND"


# The documented result shapes (docs/PROTOCOL.md), keys in the order the agent sends them.
HOST_INFO_KEYS = ["hostname", "hypervisor", "topology", "inventory", "usage", "traits", "generation",
                  "instances", "enabled", "disabled_reason", "numa_host", "server_groups"]
INVENTORY_KEYS = ["total", "reserved", "allocation_ratio", "min_unit", "max_unit", "step_size"]
CELL_KEYS = ["id", "cpus", "siblings", "memory_mb", "pages"]


def assert_host_info_shape(info: dict[str, Any]) -> None:
    assert list(info) == HOST_INFO_KEYS, list(info)
    assert list(info["hypervisor"]) == ["uri", "type", "version"]
    assert list(info["topology"]) == ["cells"] and info["topology"]["cells"]
    for cell in info["topology"]["cells"]:
        assert list(cell) == CELL_KEYS
        assert all(list(pool) == ["size_kb", "total"] for pool in cell["pages"])
    assert set(info["inventory"]) == {"VCPU", "PCPU", "MEMORY_MB", "DISK_GB"} == set(info["usage"])
    assert all(list(inv) == INVENTORY_KEYS for inv in info["inventory"].values())
    assert all(isinstance(n, int) for n in info["usage"].values())
    assert isinstance(info["traits"], list) and isinstance(info["generation"], int)
    assert isinstance(info["instances"], int) and isinstance(info["enabled"], bool)
    assert list(info["numa_host"]) == ["cells"] and isinstance(info["server_groups"], dict)


def test_host_results_and_events_keep_their_documented_shape(agent: AgentProcess, image_file: Path) -> None:
    events = sub_socket(agent.events, ["host.resources"])
    try:
        with PlainClient(agent.control) as c:
            pong = c.call("ping")["result"]
            assert list(pong) == ["version", "uptime_s"] and isinstance(pong["uptime_s"], float)
            info = c.call("host.info")["result"]
            assert_host_info_shape(info)
            assert info["enabled"] is True and info["disabled_reason"] is None and info["instances"] == 0
            rec = c.call("instance.spawn", spawn(image_file, wait=True, metadata={
                "fastcompute:server_group": "web"}))["result"]
            got = recv_events(events, 10.0, until=lambda _t, body: body["instances"] == 1)
            assert got and got[-1][0] == "host.resources"
            assert_host_info_shape(got[-1][1])
            assert got[-1][1]["server_groups"] == {"web": [rec["uuid"]]}
            off = c.call("host.set_enabled", {"enabled": False, "reason": "maintenance"})["result"]
            assert_host_info_shape(off)
            assert off["enabled"] is False and off["disabled_reason"] == "maintenance"
            assert "COMPUTE_STATUS_DISABLED" in off["traits"]
            gone = c.call("instance.delete", {"uuid": rec["uuid"]})["result"]
            assert list(gone.items()) == [("uuid", rec["uuid"]), ("deleted", True)]
    finally:
        events.close()


@pytest.mark.parametrize("socket_type", [zmq.DEALER, zmq.REQ], ids=["DEALER", "REQ"])
def test_undecodable_frames_get_a_reply_with_empty_id(agent: AgentProcess, socket_type: int) -> None:
    with PlainClient(agent.control, socket_type) as c:
        for frame in (b"\xc1", b"", b"hello, agent", msgpack.packb([1, "ping"]), msgpack.packb("ping"),
                      msgpack.packb({"v": 1, "id": "x", "op": "ping"})[:-2]):
            assert_error(c.raw(frame), "BAD_REQUEST", "")
    assert_alive(agent)


def test_pipelined_requests_on_one_dealer_are_matched_by_id(agent: AgentProcess, image_file: Path) -> None:
    missing = str(uuid_mod.uuid4())
    with PlainClient(agent.control) as c:
        sent: dict[str, str] = {}
        for i in range(60):
            rid = c.next_id()
            kind = ("ping", "host.info", "instance.get", "instance.spawn")[i % 4]
            msg: dict[str, Any] = {"v": 1, "id": rid, "op": kind}
            if kind == "instance.get":
                msg["args"] = {"uuid": missing}
            if kind == "instance.spawn":
                msg["args"] = spawn(image_file, name=f"pipe-{i}", wait=True)
            c.send_raw(msgpack.packb(msg))
            sent[rid] = kind
        replies = {}
        for _ in sent:
            r = c.recv()
            assert r["id"] not in replies
            replies[r["id"]] = r
    assert set(replies) == set(sent)
    for rid, kind in sent.items():
        r = replies[rid]
        if kind == "ping":
            assert r["ok"] and "uptime_s" in r["result"]
        elif kind == "host.info":
            assert r["ok"] and "inventory" in r["result"]
        elif kind == "instance.get":
            assert not r["ok"] and r["error"]["code"] == "NOT_FOUND"
        else:
            assert r["ok"] and r["result"]["vm_state"] == "active"
    listed = agent.call("instance.list")
    assert len(listed) == 15 and {r["name"] for r in listed} == {f"pipe-{i}" for i in range(3, 60, 4)}


# Each case: a request map, the id the reply must carry, the field details must name.
GOOD_UUID = "0b7c7e2a-5c3e-4a55-9a51-2c4a4f6f7d10"
BAD_ENVELOPES: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing v", {"id": "r1", "op": "ping"}, "r1", "v"),
    ("missing id", {"v": 1, "op": "ping"}, "", "id"),
    ("missing op", {"v": 1, "id": "r3"}, "r3", "op"),
    ("v not int", {"v": "1", "id": "r4", "op": "ping"}, "r4", "v"),
    ("id not str", {"v": 1, "id": 42, "op": "ping"}, "", "id"),
    ("id empty", {"v": 1, "id": "", "op": "ping"}, "", "id"),
    ("id too long", {"v": 1, "id": "x" * 129, "op": "ping"}, "", "id"),
    ("op not str", {"v": 1, "id": "r8", "op": ["ping"]}, "r8", "op"),
    ("op empty", {"v": 1, "id": "r9", "op": ""}, "r9", "op"),
    ("args not map", {"v": 1, "id": "r10", "op": "ping", "args": [1]}, "r10", "args"),
    ("wrong version", {"v": 2, "id": "r11", "op": "ping"}, "r11", "v"),
    ("version zero", {"v": 0, "id": "r12", "op": "ping"}, "r12", "v"),
]


def test_bad_envelopes_get_bad_request_with_their_id(agent: AgentProcess) -> None:
    with PlainClient(agent.control) as c:
        for name, msg, rid, _field in BAD_ENVELOPES:
            reply = c.request(msg)
            assert reply["ok"] is False and reply["error"]["code"] == "BAD_REQUEST", (name, reply)
            assert reply["id"] == rid, (name, reply)
    assert_alive(agent)


def test_bad_envelopes_name_the_field(agent: AgentProcess) -> None:
    wrong = []
    with PlainClient(agent.control) as c:
        for name, msg, _rid, field in [*BAD_ENVELOPES, ("unknown key", {"v": 1, "id": "u1", "op": "ping",
                                                                         "extra": True}, "u1", "extra")]:
            reply = c.request(msg)
            if reply["error"].get("details", {}).get("field") != field:
                wrong.append((name, reply["error"]))
    assert wrong == []


def test_unknown_envelope_key_is_bad_request(agent: AgentProcess) -> None:
    with PlainClient(agent.control) as c:
        reply = c.request({"v": 1, "id": "u2", "op": "ping", "extra": True})
    assert_error(reply, "BAD_REQUEST", "u2")
    assert reply["error"]["details"]["field"] == "extra"
    assert_alive(agent)


def test_invalid_utf8_is_bad_request(agent: AgentProcess) -> None:
    frames = [
        b"\x81\xa2\xff\xfe\x01",                                       # a key
        b"\x84\xa1v\x01\xa2id\xa2\xff\xfe\xa2op\xa4ping\xa4args\x80",   # the id
        b"\x83\xa1v\x01\xa2id\xa2u8\xa2op\xa2\xff\xfe",                 # the op
    ]
    with PlainClient(agent.control) as c:
        codes = [c.raw(f)["error"]["code"] for f in frames]
    assert codes == ["BAD_REQUEST"] * 3


def _bad_args(image_uri: str) -> list[tuple[str, str, dict[str, Any], str]]:
    def sp(**over: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"name": "bad", "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
                                "image": {"url": image_uri}}
        for k, v in over.items():
            if k.startswith("flavor_"):
                args["flavor"] = {**args["flavor"], k[7:]: v}
            else:
                args[k] = v
        return args

    no_name = sp()
    del no_name["name"]
    no_flavor = sp()
    del no_flavor["flavor"]
    no_disk = sp()
    del no_disk["flavor"]["disk_gb"]
    return [
        ("ping unknown arg", "ping", {"x": 1}, "args.x"),
        ("get missing uuid", "instance.get", {}, "args.uuid"),
        ("get uuid not str", "instance.get", {"uuid": 5}, "args.uuid"),
        ("get invalid uuid", "instance.get", {"uuid": "not-a-uuid"}, "args.uuid"),
        ("get unknown arg", "instance.get", {"uuid": GOOD_UUID, "verbose": True}, "args.verbose"),
        ("spawn missing name", "instance.spawn", no_name, "args.name"),
        ("spawn missing flavor", "instance.spawn", no_flavor, "args.flavor"),
        ("spawn missing disk_gb", "instance.spawn", no_disk, "args.flavor.disk_gb"),
        ("spawn name empty", "instance.spawn", sp(name=""), "args.name"),
        ("spawn vcpus str", "instance.spawn", sp(flavor_vcpus="2"), "args.flavor.vcpus"),
        ("spawn vcpus zero", "instance.spawn", sp(flavor_vcpus=0), "args.flavor.vcpus"),
        ("spawn vcpus huge", "instance.spawn", sp(flavor_vcpus=10**6), "args.flavor.vcpus"),
        ("spawn memory negative", "instance.spawn", sp(flavor_memory_mb=-1), "args.flavor.memory_mb"),
        ("spawn disk float", "instance.spawn", sp(flavor_disk_gb=1.5), "args.flavor.disk_gb"),
        ("spawn flavor unknown key", "instance.spawn", sp(flavor_gpus=1), "args.flavor.gpus"),
        ("spawn image unknown key", "instance.spawn", sp(image={"url": image_uri, "size": 3}), "args.image.size"),
        ("spawn unknown key", "instance.spawn", sp(color="red"), "args.color"),
        ("spawn invalid uuid", "instance.spawn", sp(uuid="1234"), "args.uuid"),
        ("spawn wait not bool", "instance.spawn", sp(wait="yes"), "args.wait"),
        ("spawn metadata not map", "instance.spawn", sp(metadata=["a"]), "args.metadata"),
        ("spawn unknown hw spec", "instance.spawn", sp(flavor_extra_specs={"hw:warp_drive": "on"}),
         "args.flavor.extra_specs.hw:warp_drive"),
        ("spawn bad cpu_policy", "instance.spawn", sp(flavor_extra_specs={"hw:cpu_policy": "greedy"}),
         "args.flavor.extra_specs.hw:cpu_policy"),
        ("spawn bad quota value", "instance.spawn", sp(flavor_extra_specs={"quota:cpu_shares": "lots"}),
         "args.flavor.extra_specs.quota:cpu_shares"),
        ("spawn image empty", "instance.spawn", sp(image={}), "args.image"),
        ("stop timeout negative", "instance.stop", {"uuid": GOOD_UUID, "timeout_s": -1}, "args.timeout_s"),
        ("reboot hard not bool", "instance.reboot", {"uuid": GOOD_UUID, "hard": "yes"}, "args.hard"),
        ("list bad vm_state", "instance.list", {"vm_state": "sleeping"}, "args.vm_state"),
        ("console tail zero", "instance.console", {"uuid": GOOD_UUID, "tail_bytes": 0}, "args.tail_bytes"),
    ]


def test_bad_args_name_the_field(agent: AgentProcess, image_file: Path) -> None:
    cases = _bad_args(image_file.as_uri())
    with PlainClient(agent.control) as c:
        for name, op, args, field in cases:
            reply = c.call(op, args)
            assert reply["ok"] is False, name
            assert reply["error"]["code"] == "BAD_REQUEST", (name, reply["error"])
            assert reply["error"]["details"]["field"] == field, (name, reply["error"])
    # Nothing was created or claimed by any of them.
    assert agent.call("instance.list") == []
    assert set(agent.call("host.info")["usage"].values()) == {0}
    assert_alive(agent)


def test_unknown_op(agent: AgentProcess) -> None:
    with PlainClient(agent.control) as c:
        reply = c.request({"v": 1, "id": "op1", "op": "instance.teleport", "args": {}})
    assert_error(reply, "UNKNOWN_OP", "op1")
    assert "instance.teleport" in reply["error"]["message"]
    assert_alive(agent)


def test_oversized_frame_default_limit(agent: AgentProcess) -> None:
    big = msgpack.packb({"v": 1, "id": "big1", "op": "ping", "args": {"pad": "x" * (1 << 20)}})
    assert len(big) > 1 << 20
    with PlainClient(agent.control) as c:
        assert_error(c.raw(big), "BAD_REQUEST", "", "<frame>")
        # Just under the limit, a frame is decoded (and here refused for its unknown key).
        under = msgpack.packb({"v": 1, "id": "big2", "op": "ping", "args": {"pad": "x" * ((1 << 20) - 100)}})
        assert len(under) <= 1 << 20
        assert_error(c.raw(under), "BAD_REQUEST", "big2", "args.pad")
    assert_alive(agent)


def test_oversized_frame_configured_limit(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config="[agent]\nmax_frame_bytes = 2048\n")
    with PlainClient(agent.control) as c:
        small = c.call("instance.spawn", spawn(image_file, wait=True))
        assert small["ok"] is True
        meta = {f"k{i}": "v" * 40 for i in range(60)}
        frame = msgpack.packb({"v": 1, "id": "m1", "op": "instance.spawn",
                               "args": spawn(image_file, metadata=meta)})
        assert len(frame) > 2048
        assert_error(c.raw(frame), "BAD_REQUEST", "", "<frame>")
    assert len(agent.call("instance.list")) == 1
    assert_alive(agent)


def test_bad_input_flood_leaves_the_agent_serving(agent: AgentProcess) -> None:
    """Garbage interleaved with good requests: every frame is answered, the good ones correctly."""
    rng = __import__("random").Random(7)
    with PlainClient(agent.control) as c:
        expected_ok = 0
        for i in range(200):
            if i % 5 == 0:
                c.send_raw(msgpack.packb({"v": 1, "id": f"good-{i}", "op": "ping"}))
                expected_ok += 1
            else:
                c.send_raw(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        replies = [c.recv() for _ in range(200)]
    oks = [r for r in replies if r["ok"]]
    assert len(oks) == expected_ok and all(r["id"].startswith("good-") for r in oks)
    assert all(r["error"]["code"] in ("BAD_REQUEST", "UNKNOWN_OP") for r in replies if not r["ok"])
    assert_alive(agent)
