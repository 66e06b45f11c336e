"""Hostile clients against a real agent (issue #19): a peer that never reads, oversized envelopes,
requests in flight per connection, replies keyed by client, the retry window's memory, idle
/metrics connections, and the state directory's modes."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgpack
import zmq
from agent_fixtures import AgentProcess, free_port, scrape, spawn_args

from fastcompute.rpc.client import AsyncClient

MANY = "[resources]\ncpu_allocation_ratio = 1000.0\nram_allocation_ratio = 100.0\ndisk_gb = 1000000\n"
SMALL = {"vcpus": 1, "memory_mb": 16, "disk_gb": 1}


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def dealer(endpoint: str, routing_id: bytes | None = None, **opts: int) -> zmq.Socket[Any]:
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.connect(endpoint)
    return s


def ask(s: zmq.Socket[Any], rid: str, op: str, args: dict[str, Any] | None = None,
        timeout_ms: int = 30_000) -> bytes:
    msg: dict[str, Any] = {"v": 1, "id": rid, "op": op}
    if args is not None:
        msg["args"] = args
    s.send(msgpack.packb(msg))
    assert s.poll(timeout_ms), f"no reply to {op}"
    return s.recv()  # type: ignore[no-any-return]


def test_a_client_that_never_reads_is_bounded_and_others_stay_fast(make_agent: Any) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    agent: AgentProcess = make_agent(config=f'[stats]\nmetrics = "{metrics}"\n')
    assert agent.proc is not None
    pid = agent.proc.pid
    other = dealer(agent.control)
    hog = dealer(agent.control, SNDHWM=0)
    try:
        for i in range(200):  # warm up both, so the baseline holds what serving costs anyway
            msgpack.unpackb(ask(other, f"warm-{i}", "ping"))
        baseline = status_kib(pid, "VmHWM")
        ping = msgpack.packb({"v": 1, "id": "hog", "op": "ping"})
        for _ in range(200_000):
            hog.send(ping)
        worst = 0.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            t = time.perf_counter()
            reply = msgpack.unpackb(ask(other, f"fair-{t}", "ping"))
            worst = max(worst, time.perf_counter() - t)
            assert reply["ok"] is True
            served = sum(v for (name, labels), v in scrape(f"http://{metrics}/metrics").items()
                         if name == "fastcompute_requests_total"
                         and (("op", "ping") in labels or ("op", "<refused>") in labels))
            if served >= 200_000:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the agent did not get through the hog's requests")
        grown_mib = (status_kib(pid, "VmHWM") - baseline) / 1024
        assert grown_mib < 64, f"the agent's peak memory grew by {grown_mib:.0f} MiB"
        assert worst < 0.5, f"another client's ping waited {worst:.2f}s"
        # The hog is still a client: what it reads now is answered.
        while hog.poll(200):
            hog.recv()
        assert msgpack.unpackb(ask(hog, "hog-reads", "ping"))["id"] == "hog-reads"
    finally:
        other.close()
        hog.close()


def test_an_oversized_envelope_is_not_echoed(agent: AgentProcess) -> None:
    s = dealer(agent.control)
    try:
        request = msgpack.packb({"v": 1, "id": "env-1", "op": "ping"})
        s.send_multipart([b"x" * (8 << 20), request])
        assert s.poll(10_000), "no reply"
        frames = s.recv_multipart()
        assert len(frames) == 1 and len(frames[0]) < 4096, [len(f) for f in frames]
        reply = msgpack.unpackb(frames[0])
        assert reply["error"]["code"] == "BAD_REQUEST" and reply["error"]["details"]["field"] == "<envelope>"
        # A proxy's routing frames (short ones) are still fine and mirrored.
        s.send_multipart([b"hop-1", b"", request])
        assert s.poll(10_000)
        hop, empty, body = s.recv_multipart()
        assert (hop, empty) == (b"hop-1", b"") and msgpack.unpackb(body)["ok"] is True
    finally:
        s.close()


def test_a_frame_over_max_message_bytes_drops_the_connection(make_agent: Any) -> None:
    agent: AgentProcess = make_agent(config="[agent]\nmax_frame_bytes = 2048\nmax_message_bytes = 65536\n")
    s = dealer(agent.control)
    try:
        s.send(b"\x81" + b"x" * 100_000)
        assert not s.poll(2000), "a frame over max_message_bytes was answered"
        # Between the two limits, the contract's BAD_REQUEST.
        fresh = dealer(agent.control)
        try:
            fresh.send(b"y" * 4096)
            assert fresh.poll(10_000)
            assert msgpack.unpackb(fresh.recv())["error"]["details"]["field"] == "<frame>"
        finally:
            fresh.close()
    finally:
        s.close()


def test_requests_in_flight_per_connection_are_capped(make_agent: Any, image_file: Path) -> None:
    agent: AgentProcess = make_agent(config="[agent]\nmax_inflight_per_peer = 2\n" + MANY)
    s = dealer(agent.control)
    try:
        for i in range(12):
            s.send(msgpack.packb({"v": 1, "id": f"cap-{i}", "op": "instance.spawn",
                                  "args": spawn_args(image_file, name=f"c{i}", flavor=SMALL, wait=True)}))
        replies = []
        for _ in range(12):
            assert s.poll(60_000)
            replies.append(msgpack.unpackb(s.recv()))
    finally:
        s.close()
    busy = [r for r in replies if not r["ok"]]
    assert {r["error"]["code"] for r in busy} == {"BUSY"} and busy, replies
    assert all(r["id"].startswith("cap-") for r in busy)
    assert len(replies) - len(busy) >= 2
    # Another connection is not held back by that one's limit.
    assert agent.call("ping")["uptime_s"] >= 0


def test_replies_are_keyed_by_client_not_only_by_request_id(agent: AgentProcess, image_file: Path) -> None:
    a, b = dealer(agent.control, b"tenant-a"), dealer(agent.control, b"tenant-b")
    try:
        first_a = ask(a, "shared-id", "instance.spawn", spawn_args(image_file, name="a-vm"))
        first_b = ask(b, "shared-id", "instance.spawn", spawn_args(image_file, name="b-vm"))
        assert msgpack.unpackb(first_a)["result"]["name"] == "a-vm"
        assert msgpack.unpackb(first_b)["result"]["name"] == "b-vm"
    finally:
        a.close()
        b.close()
    # The same client on a new connection (same routing id) gets its own first reply back. Until
    # the agent has seen the old connection close, ZeroMQ ignores a new one with its id: retry.
    assert _ask_on_new_connection(agent, b"tenant-a", "shared-id", "instance.spawn",
                                  spawn_args(image_file, name="a-vm")) == first_a
    assert sorted(r["name"] for r in agent.call("instance.list")) == ["a-vm", "b-vm"]


def _ask_on_new_connection(agent: AgentProcess, routing_id: bytes, rid: str, op: str,
                           args: dict[str, Any]) -> bytes:
    for _ in range(30):
        s = dealer(agent.control, routing_id)
        try:
            s.send(msgpack.packb({"v": 1, "id": rid, "op": op, "args": args}))
            if s.poll(2_000):
                return s.recv()  # type: ignore[no-any-return]
        finally:
            s.close()
    raise AssertionError(f"no reply to {op} on a new connection as {routing_id!r}")


def _spawn_many(agent: AgentProcess, image: Path, n: int) -> list[str]:
    async def storm() -> list[str]:
        uuids: list[str] = []
        async with AsyncClient(agent.control, timeout_s=300) as c:
            for start in range(0, n, 500):  # within the requests one connection may have in flight
                recs = await asyncio.gather(*(
                    c.call("instance.spawn", spawn_args(image, name=f"m{i}", flavor=SMALL))
                    for i in range(start, min(n, start + 500))))
                uuids += [r["uuid"] for r in recs]
        return uuids

    return asyncio.run(storm())


def test_read_replies_are_not_kept_for_the_window(make_agent: Any, image_file: Path) -> None:
    agent: AgentProcess = make_agent(config=MANY)
    assert agent.proc is not None
    uuids = _spawn_many(agent, image_file, 2000)
    s = dealer(agent.control)
    try:
        ask(s, "list-warm", "instance.list")
        before = status_kib(agent.proc.pid, "VmRSS")
        for i in range(300):
            ask(s, f"list-{i}", "instance.list")
        grown_mib = (status_kib(agent.proc.pid, "VmRSS") - before) / 1024
        assert grown_mib < 60, f"300 instance.list replies held {grown_mib:.0f} MiB"
        # A repeated read id reads again: nothing of the first reply was kept.
        agent.call("instance.delete", {"uuid": uuids[0]})
        assert len(msgpack.unpackb(ask(s, "list-0", "instance.list"))["result"]) == 1999
    finally:
        s.close()


def test_retry_window_over_its_byte_budget_still_replays(make_agent: Any, image_file: Path) -> None:
    agent: AgentProcess = make_agent(config="[agent]\nidempotency_max_bytes = 20000\n" + MANY)
    s = dealer(agent.control)
    try:
        chosen = [str(uuid_mod.uuid4()) for _ in range(60)]
        firsts = [ask(s, f"b-{i}", "instance.spawn", spawn_args(image_file, name=f"b{i}", uuid=u, flavor=SMALL))
                  for i, u in enumerate(chosen)]
        agent.call("instance.delete", {"uuid": chosen[0]})
        # The oldest replies left memory; a retry reads the request log instead of spawning again.
        assert ask(s, "b-0", "instance.spawn", spawn_args(image_file, name="b0", uuid=chosen[0], flavor=SMALL)) \
            == firsts[0]
        assert len(agent.call("instance.list")) == 59
    finally:
        s.close()


def test_idle_metrics_connections_cost_no_thread_each(make_agent: Any) -> None:
    port = free_port()
    agent: AgentProcess = make_agent(config=f'[stats]\nmetrics = "127.0.0.1:{port}"\nmetrics_idle_timeout_s = 2.0\n')
    assert agent.proc is not None
    tasks = Path(f"/proc/{agent.proc.pid}/task")
    url = f"http://127.0.0.1:{port}/metrics"
    scrape(url)
    threads = len(list(tasks.iterdir()))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
    try:
        time.sleep(0.5)
        assert len(list(tasks.iterdir())) <= threads + 1
        # A scrape still gets through: the connection idle longest makes room for it.
        assert scrape(url)
        time.sleep(2.5)
        idle[-1].settimeout(5)
        assert idle[-1].recv(1) == b"", "an idle connection outlived metrics_idle_timeout_s"
    finally:
        for c in idle:
            c.close()


def test_state_directory_is_private_whatever_the_umask(make_agent: Any, image_file: Path) -> None:
    old = os.umask(0o022)
    try:
        agent: AgentProcess = make_agent()
    finally:
        os.umask(old)
    agent.call("instance.spawn", spawn_args(image_file, wait=True))
    agent.call("host.set_enabled", {"enabled": True})
    paths = [agent.state_dir, *agent.state_dir.rglob("*")]
    assert any(p.name == "fastcompute.sqlite" for p in paths)
    assert any(p.parent.name == "instances" for p in paths)
    loose = {str(p.relative_to(agent.state_dir.parent)): oct(stat.S_IMODE(p.lstat().st_mode))
             for p in paths if not p.is_symlink() and p.lstat().st_mode & 0o077}
    assert not loose, loose
