"""Prometheus metrics of the agent, on their own registry, served over HTTP.

One :class:`Metrics` object per agent holds every series; the server, the manager, the image
cache, the network and the stats collector call its small methods (``observe_request``,
``set_instances``, ``set_resources``, ``image_cache``, ``observe_network_batch``,
``observe_sampler``, ``observe_loop_lag``).
:func:`start_http_server` serves ``/metrics`` from one thread for all connections (loopback by
default, bounded in connections and idle time) and returns a handle to stop it;
:func:`loop_lag_probe` is a coroutine that measures how late the event loop wakes up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SAMPLER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST.encode()
_MAX_REQUEST_HEAD = 16384


class Metrics:
    """Every series of the agent, on ``self.registry`` (never the process-global one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fastcompute_requests", "Requests answered, by op and outcome (ok or error)",
            ["op", "outcome"], registry=r,
        )
        self.request_seconds = Histogram(
            "fastcompute_request_duration_seconds", "Time from request decoded to reply sent, by op",
            ["op"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter(
            "fastcompute_errors", "Error replies, by op and error code", ["op", "code"], registry=r,
        )
        self.instances = Gauge(
            "fastcompute_instances", "Instances on this host, by vm_state", ["vm_state"], registry=r,
        )
        self.resource_capacity = Gauge(
            "fastcompute_resource_capacity",
            "What may be claimed of a resource class (total x ratio - reserved)",
            ["resource_class"], registry=r,
        )
        self.resource_claimed = Gauge(
            "fastcompute_resource_claimed", "Amount of a resource class held by claims",
            ["resource_class"], registry=r,
        )
        self.claims = Gauge(
            "fastcompute_claims", "Claims holding some of a resource class", ["resource_class"],
            registry=r,
        )
        self.image_cache_lookups = Counter(
            "fastcompute_image_cache_lookups", "Base-image cache lookups, by result (hit or miss)",
            ["result"], registry=r,
        )
        self._cache_hits = self.image_cache_lookups.labels("hit")
        self._cache_misses = self.image_cache_lookups.labels("miss")
        self.network_batch_size = Histogram(
            "fastcompute_network_batch_size", "Changes run together by the network (plug, unplug, other)",
            ["kind"], buckets=_BATCH_SIZE_BUCKETS, registry=r,
        )
        self.network_batch_seconds = Histogram(
            "fastcompute_network_batch_duration_seconds", "Time of one batch of network changes",
            ["kind"], buckets=_WAIT_BUCKETS, registry=r,
        )
        self.sampler_seconds = Histogram(
            "fastcompute_sampler_duration_seconds", "Time of one cgroup sampling pass",
            buckets=_SAMPLER_BUCKETS, registry=r,
        )
        self.cgroups_sampled = Gauge(
            "fastcompute_sampler_cgroups", "Cgroups read by the last sampling pass", registry=r,
        )
        self.loop_lag = Histogram(
            "fastcompute_event_loop_lag_seconds", "How late the event loop ran a timed wake-up",
            buckets=_WAIT_BUCKETS, registry=r,
        )
        self.loop_lag_last = Gauge(
            "fastcompute_event_loop_lag_last_seconds", "The last measured event loop lag",
            registry=r,
        )
        self._vm_states: set[str] = set()
        self._request_children: dict[str, tuple[Counter, Counter, Histogram]] = {}
        self._resource_classes: set[str] = set()

    def observe_request(self, op: str, seconds: float, error_code: str | None = None) -> None:
        """One request of ``op`` answered after ``seconds``; ``error_code`` when it failed."""
        # labels() hashes and validates its arguments on every call: the children of the few
        # ops are kept, since this runs for every request.
        children = self._request_children.get(op)
        if children is None:
            children = self._request_children[op] = (
                self.requests.labels(op, "ok"), self.requests.labels(op, "error"), self.request_seconds.labels(op))
        ok, failed, seconds_of_op = children
        (ok if error_code is None else failed).inc()
        seconds_of_op.observe(seconds)
        if error_code is not None:
            self.errors.labels(op, error_code).inc()

    def set_instances(self, by_vm_state: Mapping[str, int]) -> None:
        """The instance count per vm_state; states missing from the mapping become 0."""
        for state in self._vm_states - by_vm_state.keys():
            self.instances.labels(state).set(0)
        for state, n in by_vm_state.items():
            self.instances.labels(state).set(n)
        self._vm_states |= by_vm_state.keys()

    def set_resources(self, by_class: Mapping[str, tuple[float, float, int]]) -> None:
        """Per resource class ``(capacity, claimed, claims)``; missing classes become 0."""
        for rc in self._resource_classes - by_class.keys():
            self.resource_claimed.labels(rc).set(0)
            self.claims.labels(rc).set(0)
        for rc, (capacity, claimed, claims) in by_class.items():
            self.resource_capacity.labels(rc).set(capacity)
            self.resource_claimed.labels(rc).set(claimed)
            self.claims.labels(rc).set(claims)
        self._resource_classes |= by_class.keys()

    def image_cache(self, hit: bool) -> None:
        """One base-image cache lookup, a hit or a miss."""
        (self._cache_hits if hit else self._cache_misses).inc()

    def observe_network_batch(self, kind: str, size: int, seconds: float) -> None:
        """The network ran ``size`` changes of ``kind`` as one batch in ``seconds``."""
        self.network_batch_size.labels(kind).observe(size)
        self.network_batch_seconds.labels(kind).observe(seconds)

    def observe_sampler(self, seconds: float, cgroups: int) -> None:
        """One sampling pass took ``seconds`` and read ``cgroups`` cgroups."""
        self.sampler_seconds.observe(seconds)
        self.cgroups_sampled.set(cgroups)

    def observe_loop_lag(self, seconds: float) -> None:
        """The event loop woke up ``seconds`` later than asked."""
        self.loop_lag.observe(seconds)
        self.loop_lag_last.set(seconds)

    def render(self) -> bytes:
        """The text exposition of every series (what ``/metrics`` serves)."""
        return bytes(prometheus_client.generate_latest(self.registry))


class MetricsServer:
    """A running ``/metrics`` endpoint: one thread, its own event loop, every connection.

    A thread per connection (prometheus_client's server) lets each idle client cost a thread;
    here a connection costs a few objects, at most ``max_connections`` are open (past it, the
    one waiting longest for its request is closed), and one that sends no complete request
    within ``idle_timeout_s`` is closed. Each answer closes its connection.
    """

    def __init__(self, metrics: Metrics, host: str, port: int, max_connections: int, idle_timeout_s: float) -> None:
        self.host = host
        self.port = port
        self._metrics = metrics
        self._max = max_connections
        self._idle_timeout_s = idle_timeout_s
        self._open = 0
        self._waiting: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        """Bind and start serving; raises what the bind raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        """Stop serving, close every connection and wait for the server thread to end."""
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        try:
            server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_REQUEST_HEAD)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        async with server:
            await self._stopped.wait()
            server.close()
            for w in list(self._waiting):
                w.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        self._waiting[writer] = None
        if self._open > self._max:
            oldest = next(iter(self._waiting))
            oldest.transport.abort()  # its own task sees the connection end and cleans up
            self._waiting.pop(oldest, None)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._idle_timeout_s)
            self._waiting.pop(writer, None)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method not in (b"GET", b"HEAD"):
                status, body = b"405 Method Not Allowed", b"only GET\n"
            elif path not in (b"/metrics", b"/"):
                status, body = b"404 Not Found", b"see /metrics\n"
            else:
                status, body = b"200 OK", self._metrics.render()
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + _CONTENT_TYPE
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + (body if method == b"GET" else b""))
            await asyncio.wait_for(writer.drain(), self._idle_timeout_s)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open -= 1
            self._waiting.pop(writer, None)
            writer.transport.abort()


def start_http_server(metrics: Metrics, host: str = "127.0.0.1", port: int = 0, max_connections: int = 64,
                      idle_timeout_s: float = 10.0) -> MetricsServer:
    """Serve ``metrics`` on ``http://host:port/metrics`` from one daemon thread.

    ``port`` 0 picks a free port (read it back from the result). Blocking only for the bind.
    """
    server = MetricsServer(metrics, host, port, max_connections, idle_timeout_s)
    server.start()
    return server


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> ``(host, port)``; ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"metrics endpoint {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def loop_lag_probe(metrics: Metrics, interval: float = 0.5) -> None:
    """Measure the event loop's lag every ``interval`` seconds, forever (cancel to stop).

    The lag is how much later than asked a ``sleep(interval)`` returns: time the loop spent on
    other callbacks or blocked, i.e. how long any request may wait before it is even read.
    """
    while True:
        start = time.monotonic()
        await asyncio.sleep(interval)
        metrics.observe_loop_lag(max(0.0, time.monotonic() - start - interval))
