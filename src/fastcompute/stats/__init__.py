"""Guest statistics: the cgroup sampler, the hypervisor's domain stats, rates and the collector."""

from fastcompute.stats.collector import (
    COUNTERS,
    LIBVIRT,
    CgroupLayout,
    CgroupPaths,
    CgroupRef,
    CgroupSnapshot,
    InstanceSample,
    Rates,
    Sampler,
    SamplerMetrics,
    Source,
    StatsCollector,
    cgroup_of_pid,
    detect_layout,
    guest_source,
    host_layout,
)

__all__ = [
    "COUNTERS",
    "LIBVIRT",
    "CgroupLayout",
    "CgroupPaths",
    "CgroupRef",
    "CgroupSnapshot",
    "InstanceSample",
    "Rates",
    "Sampler",
    "SamplerMetrics",
    "Source",
    "StatsCollector",
    "cgroup_of_pid",
    "detect_layout",
    "guest_source",
    "host_layout",
]
