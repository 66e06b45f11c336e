"""A real agent in a subprocess on loopback ports, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from fastcompute.client import Client


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    """An agent subprocess with its own state dir, ports and config."""

    def __init__(self, base: Path, config: str = "", hypervisor: str = "test:///default") -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.state_dir = base / "state"
        self.config_path = base / "agent.toml"
        self.config_path.write_text(config)
        self.hypervisor = hypervisor
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.events = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = base / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        """Start the agent and wait until it answers ping."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastcompute.cli", "agent", "--config", str(self.config_path),
             "--state-dir", str(self.state_dir), "--control", self.control, "--events", self.events,
             "--hypervisor", self.hypervisor],
            stdout=log, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until ping succeeds (or fail the test with the agent's log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(self.control, timeout_s=0.5) as c:
                    c.call("ping")
                return
            except TimeoutError:
                continue
        pytest.fail(f"agent did not answer within {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        """The agent's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout_s: float = 60.0) -> Client:
        """A synchronous client of this agent."""
        return Client(self.control, timeout_s=timeout_s)

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """One request, result or typed error."""
        with self.client() as c:
            return c.call(op, args)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        """Stop cleanly and start again on the same state."""
        self.terminate()
        self.start()


def raw_request(endpoint: str, request: Any, *, socket_type: int = zmq.DEALER, raw: bytes | None = None,
                timeout_ms: int = 10_000) -> Any:
    """Send one request with plain pyzmq and return the decoded reply map."""
    ctx = zmq.Context.instance()
    s = ctx.socket(socket_type)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send(raw if raw is not None else msgspec.msgpack.encode(request))
        assert s.poll(timeout_ms), "no reply"
        return msgspec.msgpack.decode(s.recv())
    finally:
        s.close()


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``make_agent(config="...", hypervisor=...)`` starts an agent; all are stopped at the end."""
    agents: list[AgentProcess] = []

    def make(config: str = "", hypervisor: str = "test:///default", start: bool = True) -> AgentProcess:
        a = AgentProcess(tmp_path / f"agent{len(agents)}", config, hypervisor)
        agents.append(a)
        if start:
            a.start()
        return a

    yield make
    for a in agents:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
            try:
                a.proc.wait(30)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()


@pytest.fixture
def agent(make_agent: Any) -> AgentProcess:
    """One agent on the embedded test hypervisor."""
    return make_agent()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small raw image (random bytes, so it is not mistaken for any format)."""
    path = tmp_path_factory.mktemp("images") / "tiny.raw"
    path.write_bytes(os.urandom(1 << 20))
    return path


def spawn_args(image: Path, name: str = "vm", **over: Any) -> dict[str, Any]:
    """Arguments of a small valid instance.spawn."""
    args: dict[str, Any] = {
        "name": name,
        "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
        "image": {"url": image.as_uri()},
    }
    args.update(over)
    return args
