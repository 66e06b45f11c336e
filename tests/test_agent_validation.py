"""Validation before anything is recorded, from a client with nothing but pyzmq and msgpack.

Every malformed request is a ``BAD_REQUEST`` reply naming the field (``details.field``), sent
before a claim is taken or an instance recorded: a spawn that is refused leaves no instance
behind (``instance.get`` is NOT_FOUND, ``instance.list`` is empty), and the agent answers the
next request as before.
"""

from __future__ import annotations

import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgpack
import pytest
from agent_fixtures import AgentProcess, raw_request, spawn_args

_N = [0]


def call(agent: AgentProcess, op: str, args: Any) -> dict[str, Any]:
    """One request through plain pyzmq + msgpack; the reply map."""
    _N[0] += 1
    reply = raw_request(agent.control, None, raw=msgpack.packb({"v": 1, "id": f"val-{_N[0]}", "op": op, "args": args}))
    assert isinstance(reply, dict)
    return reply


def refused(agent: AgentProcess, op: str, args: Any, field: str) -> dict[str, Any]:
    """Assert a BAD_REQUEST naming ``field``; return the error body."""
    reply = call(agent, op, args)
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert error["code"] == "BAD_REQUEST", error
    assert error["details"]["field"] == field, error
    assert field in error["message"], error
    return error  # type: ignore[no-any-return]


def assert_nothing_recorded(agent: AgentProcess, uuid: str) -> None:
    got = call(agent, "instance.get", {"uuid": uuid})
    assert got["ok"] is False and got["error"]["code"] == "NOT_FOUND", got
    listed = call(agent, "instance.list", {})
    assert listed == {"v": 1, "id": listed["id"], "ok": True, "result": []}


BAD_SPAWNS: list[tuple[str, dict[str, Any], str]] = [
    ("ftp image", {"image": {"url": "ftp://images.example/cirros.img"}}, "args.image.url"),
    ("malformed checksum", {"image": {"url": "http://127.0.0.1:9/x.img", "checksum": "sha256:xyz"}},
     "args.image.checksum"),
    ("checksum of unknown algorithm", {"image": {"url": "http://127.0.0.1:9/x.img", "checksum": "crc32:00ff00ff"}},
     "args.image.checksum"),
    ("url port out of range", {"image": {"url": "http://127.0.0.1:99999/x.img"}}, "args.image.url"),
    ("url without a host", {"image": {"url": "http:///x.img"}}, "args.image.url"),
    ("image with neither id nor url", {"image": {}}, "args.image"),
    ("unknown quota key", {"flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1,
                                      "extra_specs": {"quota:cpu_sharez": "10"}}},
     "args.flavor.extra_specs.quota:cpu_sharez"),
    ("unknown hw key", {"flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1,
                                   "extra_specs": {"hw:cpu_polcy": "dedicated"}}},
     "args.flavor.extra_specs.hw:cpu_polcy"),
    ("superscript digit quota", {"flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1,
                                            "extra_specs": {"quota:cpu_shares": "\u00b2"}}},
     "args.flavor.extra_specs.quota:cpu_shares"),
    ("arabic-indic digit quota", {"flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1,
                                             "extra_specs": {"quota:disk_read_iops_sec": "\u0661\u0662"}}},
     "args.flavor.extra_specs.quota:disk_read_iops_sec"),
    ("superscript digit numa nodes", {"flavor": {"vcpus": 2, "memory_mb": 64, "disk_gb": 1,
                                                 "extra_specs": {"hw:numa_nodes": "\u00b2"}}},
     "args.flavor.extra_specs.hw:numa_nodes"),
    ("NUL in name", {"name": "vm\x00one"}, "args.name"),
    ("newline in name", {"name": "vm\none"}, "args.name"),
    ("trailing newline in name", {"name": "vm\n"}, "args.name"),
    ("trailing newline in a uuid", {"uuid": "6f741a5f-3ca3-407b-a748-9b17fbe63f05\n"}, "args.uuid"),
    ("space in a quota", {"flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1,
                                     "extra_specs": {"quota:cpu_period": " 1"}}},
     "args.flavor.extra_specs.quota:cpu_period"),
    ("NUL in project", {"project_id": "p\x00"}, "args.project_id"),
    ("superscript digit rule protocol", {"networks": [{
        "id": "p1", "mac": "fa:16:3e:00:00:01", "network": {"id": "n1"},
        "security_groups": [{"id": "sg", "rules": [{"direction": "ingress", "protocol": "\u00b2"}]}]}]},
     "args.networks[0].security_groups[0].rules[0].protocol"),
    ("bridge name with a slash", {"networks": [{"id": "p1", "mac": "fa:16:3e:00:00:01",
                                                "network": {"id": "n1", "bridge": "br/0"}}]},
     "args.networks[0].network.bridge"),
    ("bad MAC", {"networks": [{"id": "p1", "mac": "zz:16:3e:00:00:01", "network": {"id": "n1"}}]},
     "args.networks[0].mac"),
    ("port with an unknown field", {"networks": [{"id": "p1", "mac": "fa:16:3e:00:00:01", "network": {"id": "n1"},
                                                  "colour": "red"}]},
     "args.networks[0].colour"),
    ("rule with an unknown protocol", {"networks": [{
        "id": "p1", "mac": "fa:16:3e:00:00:01", "network": {"id": "n1"},
        "security_groups": [{"id": "sg", "rules": [{"direction": "ingress", "protocol": "tcpx"}]}]}]},
     "args.networks[0].security_groups[0].rules[0].protocol"),
]


@pytest.mark.parametrize(("what", "over", "field"), BAD_SPAWNS, ids=[c[0] for c in BAD_SPAWNS])
def test_a_malformed_spawn_is_refused_before_anything_is_recorded(
    agent: AgentProcess, image_file: Path, what: str, over: dict[str, Any], field: str
) -> None:
    uuid = str(uuid_mod.uuid4())
    args = spawn_args(image_file, uuid=uuid)
    args.update(over)
    refused(agent, "instance.spawn", args, field)
    assert_nothing_recorded(agent, uuid)
    assert call(agent, "ping", {})["ok"] is True


def test_deep_nesting_inside_args_is_a_bad_request(agent: AgentProcess, image_file: Path) -> None:
    deep: Any = "leaf"
    for _ in range(1000):
        deep = [deep]
    uuid = str(uuid_mod.uuid4())
    args = spawn_args(image_file, uuid=uuid)
    args["metadata"] = {"k": deep}
    # msgspec cannot skip over args this deep to read the envelope: the frame is refused.
    error = refused(agent, "instance.spawn", args, "<frame>")
    assert "deep" in error["message"]
    assert_nothing_recorded(agent, uuid)
    # Nesting in a field the op does not have, and in the envelope outside args, too.
    refused(agent, "ping", {"x": deep}, "<frame>")
    _N[0] += 1
    reply = raw_request(agent.control, None, raw=msgpack.packb({"v": 1, "id": "deep-env", "op": "ping",
                                                                "extra": deep}))
    assert reply["ok"] is False and reply["error"]["code"] == "BAD_REQUEST", reply
    assert call(agent, "ping", {})["ok"] is True


def test_security_groups_and_attach_are_checked_before_the_instance_is_looked_at(agent: AgentProcess) -> None:
    # The instance does not exist: a malformed request is refused for what it is, not NOT_FOUND.
    uuid = str(uuid_mod.uuid4())
    refused(agent, "instance.set_security_groups",
            {"uuid": uuid, "port_id": "p1",
             "security_groups": [{"id": "sg", "rules": [{"direction": "ingress", "protocol": "tcp",
                                                         "port_range_min": 90, "port_range_max": 80}]}]},
            "args.security_groups[0].rules[0].port_range_min")
    refused(agent, "instance.set_security_groups",
            {"uuid": uuid, "port_id": "p1", "security_groups": [{"id": "sg", "rules": [{"direction": "sideways"}]}]},
            "args.security_groups[0].rules[0].direction")
    refused(agent, "instance.attach_port",
            {"uuid": uuid, "port": {"id": "p1", "mac": "01:16:3e:00:00:01", "network": {"id": "n1"}}},
            "args.port.mac")
    refused(agent, "instance.attach_port",
            {"uuid": uuid, "port": {"id": "p1", "mac": "fa:16:3e:00:00:01", "network": {"id": "n1", "vlan": 5000}}},
            "args.port.network.vlan")
    missing = call(agent, "instance.attach_port",
                   {"uuid": uuid, "port": {"id": "p1", "mac": "fa:16:3e:00:00:01", "network": {"id": "n1"}}})
    assert missing["error"]["code"] == "NOT_FOUND", missing
