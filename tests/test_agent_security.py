"""CURVE: keys from ``fastcompute keys``, an allow-list of client keys, no reply at all for anyone
else, events encrypted too; without keys, no bind beyond loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth
from agent_fixtures import AgentProcess, free_port, recv_events, spawn_args, sub_socket

from fastcompute.rpc.client import Client, ClientTimeout, Curve


def make_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Run ``fastcompute keys``; return the (public, secret) key files it reports."""
    out = subprocess.run([sys.executable, "-m", "fastcompute.cli", "keys", "--dir", str(directory),
                          "--name", name, "--json"], check=True, capture_output=True, text=True).stdout
    paths = json.loads(out)
    return Path(paths["public"]), Path(paths["secret"])


def keypair(secret_file: Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    return public, secret


@pytest.fixture
def curve_agent(make_agent: Any, tmp_path: Path) -> dict[str, Any]:
    """An agent with a server key that admits two clients: one from a key directory, one by
    its Z85 public key in the config; a third key pair is known to nobody."""
    keys = tmp_path / "keys"
    allowed_dir = tmp_path / "allowed"
    allowed_dir.mkdir()
    server_pub, server_sec = make_keys(keys, "server")
    _alice_pub, alice_sec = make_keys(allowed_dir, "alice")
    alice_sec = alice_sec.rename(keys / alice_sec.name)  # only public keys in the allow dir
    bob_pub, bob_sec = make_keys(keys, "bob")
    _mallory_pub, mallory_sec = make_keys(keys, "mallory")
    bob_z85 = zmq.auth.load_certificate(bob_pub)[0].decode()
    agent: AgentProcess = make_agent(start=False, config=(
        "[security]\n"
        f'server_secret_key_file = "{server_sec}"\n'
        f'client_public_keys = ["{bob_z85}"]\n'
        f'client_public_keys_dir = "{allowed_dir}"\n'))
    agent.start(wait=False)
    alice = Curve.from_files(server_pub, alice_sec)
    deadline = time.monotonic() + 60
    while True:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
        try:
            with Client(agent.control, timeout_s=0.5, curve=alice) as c:
                c.call("ping")
            break
        except ClientTimeout:
            assert time.monotonic() < deadline, agent.log()
    return {"agent": agent, "server_pub": server_pub, "alice": alice,
            "bob": Curve.from_files(server_pub, bob_sec), "mallory": Curve.from_files(server_pub, mallory_sec),
            "server_public": zmq.auth.load_certificate(server_pub)[0]}


def test_keys_writes_a_usable_pair(tmp_path: Path) -> None:
    public, secret = make_keys(tmp_path, "node1")
    assert public == tmp_path / "node1.key" and secret == tmp_path / "node1.key_secret"
    pub_a, _ = zmq.auth.load_certificate(public)
    pub_b, sec_b = zmq.auth.load_certificate(secret)
    assert pub_a == pub_b and sec_b is not None and len(pub_a) == 40
    assert secret.stat().st_mode & 0o077 == 0, "the secret key must not be readable by others"


def test_allowed_clients_get_replies(curve_agent: dict[str, Any], image_file: Path) -> None:
    agent = curve_agent["agent"]
    for who in ("alice", "bob"):
        with Client(agent.control, timeout_s=30, curve=curve_agent[who]) as c:
            assert "uptime_s" in c.call("ping")
            rec = c.call("instance.spawn", spawn_args(image_file, name=who, wait=True))
            assert rec["vm_state"] == "active"


def plain_curve_request(endpoint: str, server_public: bytes, pair: tuple[bytes, bytes] | None,
                        timeout_ms: int) -> Any:
    """One ping with plain pyzmq, as a CURVE client (``pair``) or without CURVE; None if no reply."""
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if pair is not None:
        s.curve_serverkey = server_public
        s.curve_publickey, s.curve_secretkey = pair
    s.connect(endpoint)
    try:
        s.send(msgpack.packb({"v": 1, "id": "curve-1", "op": "ping"}))
        return msgpack.unpackb(s.recv()) if s.poll(timeout_ms) else None
    finally:
        s.close()


def test_unknown_or_missing_keys_get_no_reply_at_all(curve_agent: dict[str, Any], tmp_path: Path) -> None:
    agent = curve_agent["agent"]
    server_public = curve_agent["server_public"]
    mallory = (curve_agent["mallory"].public, curve_agent["mallory"].secret)
    alice = (curve_agent["alice"].public, curve_agent["alice"].secret)
    assert plain_curve_request(agent.control, server_public, mallory, 2000) is None
    assert plain_curve_request(agent.control, server_public, None, 2000) is None
    # A client that has the wrong server key cannot talk to this agent either.
    _, other_server_sec = make_keys(tmp_path / "other", "server")
    assert plain_curve_request(agent.control, keypair(other_server_sec)[0], alice, 2000) is None
    # The allowed key, through the same plain pyzmq code, is answered: the refusals were real.
    reply = plain_curve_request(agent.control, server_public, alice, 10_000)
    assert reply is not None and reply["ok"] is True and reply["id"] == "curve-1"
    assert agent.proc.poll() is None


def test_events_require_curve(curve_agent: dict[str, Any], image_file: Path) -> None:
    agent = curve_agent["agent"]
    alice = curve_agent["alice"]
    good = sub_socket(agent.events, ["host.resources"], (curve_agent["server_public"], alice.public, alice.secret))
    plain = sub_socket(agent.events, ["host.resources"])
    mallory = curve_agent["mallory"]
    stranger = sub_socket(agent.events, ["host.resources"],
                          (curve_agent["server_public"], mallory.public, mallory.secret))
    try:
        with Client(agent.control, timeout_s=30, curve=alice) as c:
            c.call("instance.spawn", spawn_args(image_file, wait=True))
        seen = recv_events(good, 15.0, until=lambda t, b: b["usage"]["VCPU"] == 1)
        assert seen and seen[-1][1]["usage"]["VCPU"] == 1
        assert recv_events(plain, 1.0) == []
        assert recv_events(stranger, 0.5) == []
    finally:
        for s in (good, plain, stranger):
            s.close()


def exit_code(agent: AgentProcess, timeout_s: float = 10.0) -> int | None:
    """The agent's exit code, or None (after killing it) if it is still running after ``timeout_s``."""
    assert agent.proc is not None
    try:
        return agent.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        agent.kill()
        return None


def test_non_loopback_bind_without_keys_is_refused(make_agent: Any) -> None:
    for which in ("control", "events"):
        agent: AgentProcess = make_agent(start=False)
        setattr(agent, which, f"tcp://0.0.0.0:{free_port()}")
        agent.start(wait=False)
        code = exit_code(agent)
        log = agent.log()
        assert "refusing to bind" in log and "0.0.0.0" in log and "CURVE" in log, log
        assert "Traceback" not in log
        assert code is not None and code != 0, f"{which}: the agent did not exit"


def test_loopback_and_ipc_without_keys_are_served(make_agent: Any, tmp_path: Path) -> None:
    agent: AgentProcess = make_agent(start=False)
    agent.control = f"ipc://{tmp_path}/control.sock"
    agent.start()
    with Client(agent.control, timeout_s=10) as c:
        assert "uptime_s" in c.call("ping")
