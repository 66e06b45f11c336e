"""The /metrics endpoint, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastcompute.stats.metrics import Metrics, loop_lag_probe, parse_endpoint, start_http_server


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _v(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def test_endpoint_serves_what_the_agent_reported() -> None:
    m = Metrics()
    m.observe_request("instance.spawn", 0.002)
    m.observe_request("instance.spawn", 0.3)
    m.observe_request("instance.spawn", 0.01, "NO_CAPACITY")
    m.observe_request("host.info", 0.0001)
    m.set_instances({"active": 3, "building": 1})
    m.set_instances({"active": 4, "stopped": 2})
    m.set_resources({"VCPU": (64.0, 6.0, 3), "MEMORY_MB": (8192.0, 1536.0, 3)})
    m.image_cache(hit=True)
    m.image_cache(hit=True)
    m.image_cache(hit=False)
    m.observe_sampler(0.0012, 250)
    m.observe_loop_lag(0.004)
    server = start_http_server(m, "127.0.0.1", 0)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        v = _scrape(server.url)
    finally:
        server.stop()
    assert _v(v, "fastcompute_requests_total", op="instance.spawn", outcome="ok") == 2
    assert _v(v, "fastcompute_requests_total", op="instance.spawn", outcome="error") == 1
    assert _v(v, "fastcompute_errors_total", op="instance.spawn", code="NO_CAPACITY") == 1
    assert _v(v, "fastcompute_request_duration_seconds_count", op="instance.spawn") == 3
    assert _v(v, "fastcompute_request_duration_seconds_sum", op="instance.spawn") == pytest.approx(0.312)
    assert _v(v, "fastcompute_request_duration_seconds_bucket", op="instance.spawn", le="0.005") == 1
    assert _v(v, "fastcompute_request_duration_seconds_count", op="host.info") == 1
    assert _v(v, "fastcompute_instances", vm_state="active") == 4
    assert _v(v, "fastcompute_instances", vm_state="stopped") == 2
    assert _v(v, "fastcompute_instances", vm_state="building") == 0
    assert _v(v, "fastcompute_resource_capacity", resource_class="VCPU") == 64
    assert _v(v, "fastcompute_resource_claimed", resource_class="MEMORY_MB") == 1536
    assert _v(v, "fastcompute_claims", resource_class="VCPU") == 3
    assert _v(v, "fastcompute_image_cache_lookups_total", result="hit") == 2
    assert _v(v, "fastcompute_image_cache_lookups_total", result="miss") == 1
    assert _v(v, "fastcompute_sampler_cgroups") == 250
    assert _v(v, "fastcompute_sampler_duration_seconds_count") == 1
    assert _v(v, "fastcompute_event_loop_lag_last_seconds") == 0.004
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_registries_are_separate() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("x", 0.1)
    assert b"fastcompute_requests_total{" not in b.render()
    assert b'fastcompute_requests_total{op="x",outcome="ok"} 1.0' in a.render()


def test_loop_lag_probe_measures_a_blocked_loop() -> None:
    m = Metrics()

    async def scenario() -> None:
        probe = asyncio.create_task(loop_lag_probe(m, interval=0.01))
        await asyncio.sleep(0.02)
        time.sleep(0.2)  # the loop is blocked: the probe must see it late
        await asyncio.sleep(0.05)
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe

    asyncio.run(scenario())
    v = {s.name: s.value for f in text_string_to_metric_families(m.render().decode()) for s in f.samples
         if not s.labels}
    assert v["fastcompute_event_loop_lag_seconds_count"] >= 2
    assert v["fastcompute_event_loop_lag_seconds_sum"] >= 0.15


def test_parse_endpoint() -> None:
    assert parse_endpoint("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_endpoint("[::1]:9100") == ("::1", 9100)
    for bad in ("9100", "host:", ":9100", "host:port"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
