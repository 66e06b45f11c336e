"""StatsCollector: a real cgroup with a spinning process and a libvirt test domain, together."""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stats_fixtures import Burner, CgroupFactory, available_versions

from fastcompute.errors import NotFound
from fastcompute.hypervisor.libvirt import stats as libvirt_stats
from fastcompute.stats.collector import LIBVIRT, StatsCollector
from fastcompute.stats.metrics import Metrics

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups needs root")


def _gauge(metrics: Metrics, name: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    raise KeyError(name)


def test_collector_follows_the_instances() -> None:
    factory = CgroupFactory(available_versions()[0])
    conn = libvirt.open("test:///default")
    burner = Burner("spin")
    try:
        d = factory.make("guest")
        factory.enter("guest", burner.pid)
        burner.go()
        domain = conn.listAllDomains()[0].UUIDString()
        sources: dict[str, str] = {"i-cgroup": d, "i-libvirt": f"{LIBVIRT}:{domain}"}
        metrics = Metrics()

        async def scenario() -> None:
            with ThreadPoolExecutor(2) as pool:
                collector = StatsCollector(
                    lambda: sources, pool, domain_stats=lambda d: libvirt_stats.read(conn, d), metrics=metrics
                )
                first = await collector.collect()
                assert set(first) == {"i-cgroup", "i-libvirt"}
                assert first["i-cgroup"]["cpu_pct"] is None
                assert first["i-libvirt"]["source"] == "libvirt"
                await asyncio.sleep(0.3)
                second = await collector.collect()
                rec = second["i-cgroup"]
                assert rec["source"] == "cgroup" and rec["cpu_pct"] > 0
                assert rec["cpu_ns"] > first["i-cgroup"]["cpu_ns"]
                assert rec["interval_s"] > 0
                assert collector.last() == second
                assert collector.last("i-cgroup") == {"i-cgroup": rec}
                with pytest.raises(NotFound):
                    collector.last("no-such-instance")
                assert _gauge(metrics, "fastcompute_sampler_cgroups") == 1
                assert _gauge(metrics, "fastcompute_sampler_duration_seconds_count") == 2

                # The guest is deleted before the manager forgets it: dropped, reported, no error.
                burner.stop()
                factory.remove("guest")
                third = await collector.collect()
                assert set(third) == {"i-libvirt"}
                assert collector.vanished == {"i-cgroup": errno.ENODEV}
                assert set(await collector.collect()) == {"i-libvirt"}

                # A new cgroup for the same instance (e.g. after a hard reboot) is picked up.
                sources["i-cgroup"] = factory.make("guest2")
                assert set(await collector.collect()) == {"i-cgroup", "i-libvirt"}
                del sources["i-cgroup"]
                assert set(await collector.collect()) == {"i-libvirt"}
                collector.close()

        asyncio.run(scenario())
    finally:
        burner.stop()
        conn.close()
        factory.cleanup()
