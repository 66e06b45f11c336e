"""A real agent in a subprocess on loopback ports, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from fastcompute.rpc.client import Client, Curve


def _ephemeral_range() -> range:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return range(lo, hi + 1)


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and no earlier call returned.

    Taken below the kernel's ephemeral range: a port from that range can be handed to any
    outgoing connection (every client of every agent makes some) between this check and the
    agent's bind. Never the same port twice in a process: an agent's control and events ports
    are asked for one after the other and bound only when it starts, so a second call that
    found the first port still free would give both the same one.
    """
    ephemeral = _ephemeral_range()
    rng = random.Random()
    while True:
        port = rng.randrange(10000, 32768)
        if port in ephemeral or port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port


# Where the tests' file:// images live: their temporary directories and the project's cache
# (the guest image); their http images are served on loopback. An agent takes no file:// and
# no http(s) image by default.
FILE_ROOTS = ["--file-root", tempfile.gettempdir(),
              "--file-root", str(Path(__file__).resolve().parent.parent / ".cache"),
              "--http-source", "127.0.0.1"]


class AgentProcess:
    """An agent subprocess with its own state dir, ports and config."""

    def __init__(self, base: Path, config: str = "", hypervisor: str = "test:///default",
                 netns: str | None = None, address: str = "127.0.0.1") -> None:
        self.base = base
        self.netns = netns
        """The network namespace the agent runs in (``ip netns exec``), reached at ``address``."""
        self.curve: Curve | None = None
        """The CURVE keys this test's calls use (an agent on another address needs them)."""
        base.mkdir(parents=True, exist_ok=True)
        self.state_dir = base / "state"
        self.config_path = base / "agent.toml"
        self.config_path.write_text(config)
        self.hypervisor = hypervisor
        # In a namespace of its own, every port is free.
        self.control = f"tcp://{address}:{free_port() if netns is None else 7780}"
        self.events = f"tcp://{address}:{free_port() if netns is None else 7781}"
        self.log_path = base / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        """Environment variables the agent starts with besides the tests' own."""

    def start(self, wait: bool = True) -> None:
        """Start the agent and wait until it answers ping."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*(["ip", "netns", "exec", self.netns] if self.netns else []),
             sys.executable, "-m", "fastcompute.cli", "agent", "--config", str(self.config_path),
             "--state-dir", str(self.state_dir), "--control", self.control, "--events", self.events,
             "--hypervisor", self.hypervisor, *FILE_ROOTS],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
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
                with self.client(timeout_s=0.5) as c:
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
        return Client(self.control, timeout_s=timeout_s, curve=self.curve)

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
    yield from agent_factory(tmp_path)


def agent_factory(root: Path) -> Iterator[Any]:
    """The body of ``make_agent`` with the agents' directories under ``root``."""
    agents: list[AgentProcess] = []

    def make(config: str = "", hypervisor: str = "test:///default", start: bool = True) -> AgentProcess:
        a = AgentProcess(root / f"agent{len(agents)}", config, hypervisor)
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


class GatedImage:
    """An image served over HTTP on 127.0.0.1 that holds every request until ``release()``;
    ``asked`` is set once a request has come in (a build is then fetching it)."""

    def __init__(self, data: bytes) -> None:
        self.gate = threading.Event()
        self.asked = threading.Event()
        gate, asked = self.gate, self.asked

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, body: bool) -> None:
                asked.set()
                gate.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                with contextlib.suppress(OSError):
                    self._send(True)

            def do_HEAD(self) -> None:
                with contextlib.suppress(OSError):
                    self._send(False)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/image.raw"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        """Let every held request (and every later one) through."""
        self.gate.set()

    def close(self) -> None:
        """Release and stop serving."""
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gated_image() -> Iterator[GatedImage]:
    """A 1 MiB image whose download waits until the test releases it."""
    img = GatedImage(os.urandom(1 << 20))
    yield img
    img.close()


def spawn_args(image: Path, name: str = "vm", **over: Any) -> dict[str, Any]:
    """Arguments of a small valid instance.spawn."""
    args: dict[str, Any] = {
        "name": name,
        "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1},
        "image": {"url": image.as_uri()},
    }
    args.update(over)
    return args


# -- helpers for the agent test suite (tests/test_agent_*.py, tests/test_cli.py) ---------------

def call_error(agent: AgentProcess, op: str, args: dict[str, Any] | None = None) -> Any:
    """Send one request that must fail; return the typed error it raised."""
    from fastcompute.errors import AgentError

    with pytest.raises(AgentError) as info:
        agent.call(op, args)
    return info.value


def wait_for_state(agent: AgentProcess, uuid: str, vm_state: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll ``instance.get`` until the instance is in ``vm_state`` with no task; return the record."""
    deadline = time.monotonic() + timeout_s
    rec: dict[str, Any] = {}
    with agent.client() as c:
        while time.monotonic() < deadline:
            rec = c.call("instance.get", {"uuid": uuid})
            if rec["vm_state"] == vm_state and rec["task_state"] is None:
                return rec
            time.sleep(0.05)
    pytest.fail(f"instance {uuid} did not reach {vm_state} within {timeout_s}s; last: {rec}")


def spawn_in_state(agent: AgentProcess, image: Path, state: str, /, **over: Any) -> dict[str, Any]:
    """A new instance brought to ``state`` (active, stopped, paused, suspended or error)."""
    args = spawn_args(image, name=f"vm-{state}", wait=True)
    if state == "error":
        args["image"] = {"url": (image.parent / "no-such-image.raw").as_uri()}
    args.update(over)
    rec = agent.call("instance.spawn", args)
    want_build = "error" if state == "error" else "active"
    assert rec["vm_state"] == want_build, rec
    op = {"stopped": "instance.stop", "paused": "instance.pause", "suspended": "instance.suspend"}.get(state)
    if op is not None:
        rec = agent.call(op, {"uuid": rec["uuid"]})
        assert rec["vm_state"] == state, rec
    return rec  # type: ignore[no-any-return]


def node_uri(directory: Path, *, nodes: int, sockets: int, cores: int, threads: int,
             memory_mib: int, name: str = "host.xml") -> str:
    """A libvirt test-driver URI for a custom host (a node file without domains)."""
    cpus = nodes * sockets * cores * threads
    path = directory / name
    path.write_text(
        "<node>\n  <cpu>\n"
        f"    <nodes>{nodes}</nodes>\n    <sockets>{sockets}</sockets>\n"
        f"    <cores>{cores}</cores>\n    <threads>{threads}</threads>\n"
        f"    <active>{cpus}</active>\n    <mhz>2400</mhz>\n    <model>x86_64</model>\n"
        f"  </cpu>\n  <memory>{memory_mib * 1024}</memory>\n</node>\n"
    )
    return "test://" + str(path.resolve())


def sub_socket(endpoint: str, topics: list[str], curve: tuple[bytes, bytes, bytes] | None = None,
               settle_s: float = 0.5) -> zmq.Socket[Any]:
    """A plain pyzmq SUB socket on the agent's events; ``curve`` is (server public, public, secret).

    ZeroMQ drops what a PUB sends before the subscription reaches it, so this waits
    ``settle_s`` after connecting.
    """
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
    for t in topics:
        s.setsockopt_string(zmq.SUBSCRIBE, t)
    s.connect(endpoint)
    time.sleep(settle_s)
    return s


def recv_events(sock: zmq.Socket[Any], timeout_s: float, until: Any = None) -> list[tuple[str, Any]]:
    """Collect ``(topic, body)`` events (bodies decoded with plain msgpack) until ``until(topic,
    body)`` is true or ``timeout_s`` passes."""
    import msgpack

    got: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        topic, body = sock.recv_multipart()
        got.append((topic.decode(), msgpack.unpackb(body)))
        if until is not None and until(*got[-1]):
            break
    return got


def disk_dirs(agent: AgentProcess) -> set[str]:
    """The instance directories (disks) present under the agent's state dir."""
    root = agent.state_dir / "instances"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page parsed as Prometheus would: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
