"""Flavor -> NUMA request (``fastcompute.numa.constraints``): Nova 34's numa_get_constraints.

Every corpus case with a flavor pairs it with the request Nova made of it; the error cases
check that contradictory specs are BAD_REQUEST naming the extra spec.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from numa_fixtures import corpus

from fastcompute.errors import BadRequest
from fastcompute.resources import numa

FLAVORED = {case["id"]: case for case in corpus() if case["flavor"] is not None}


@pytest.mark.parametrize("case_id", sorted(FLAVORED))
def test_request_equals_novas(case_id: str) -> None:
    case = FLAVORED[case_id]
    assert numa.constraints(case["flavor"]) == case["request"]


def flavor(vcpus: int = 4, memory_mb: int = 2048, **specs: str) -> dict[str, Any]:
    return {
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "extra_specs": {k.replace("__", ":").replace("_dot_", "."): v for k, v in specs.items()},
    }


def test_plain_flavor_has_no_numa_topology() -> None:
    assert numa.constraints(flavor(hw__cpu_sockets="2", quota__cpu_shares="1024")) is None


def test_dedicated_flavor_is_one_pinned_node() -> None:
    request = numa.constraints(flavor(2, 1024, hw__cpu_policy="dedicated"))
    assert request == {
        "numa_nodes": 1,
        "emulator_threads_policy": None,
        "cells": [
            {
                "id": 0,
                "cpuset": [],
                "pcpuset": [0, 1],
                "memory": 1024,
                "pagesize": None,
                "cpu_policy": "dedicated",
                "cpu_thread_policy": None,
            }
        ],
    }


@pytest.mark.parametrize(
    ("size", "kib"), [("small", -1), ("large", -2), ("any", -3), ("2048", 2048), ("2MB", 2048),
                      ("1GB", 1048576), ("1GiB", 1048576)]
)
def test_page_sizes(size: str, kib: int) -> None:
    request = numa.constraints(flavor(hw__mem_page_size=size))
    assert request is not None
    assert [c["pagesize"] for c in request["cells"]] == [kib]


def test_mixed_mask_with_explicit_cpus() -> None:
    request = numa.constraints(
        flavor(4, 2048, hw__cpu_policy="mixed", hw__cpu_dedicated_mask="2-3")
    )
    assert request is not None
    assert request["cells"][0]["cpuset"] == [0, 1]
    assert request["cells"][0]["pcpuset"] == [2, 3]


def test_manual_nodes_split_cpus_and_memory_as_given() -> None:
    request = numa.constraints(
        flavor(
            3, 3072, hw__numa_nodes="2", hw__numa_cpus_dot_0="0", hw__numa_mem_dot_0="1024",
            hw__numa_cpus_dot_1="1-2", hw__numa_mem_dot_1="2048",
        )
    )
    assert request is not None
    assert [(c["cpuset"], c["memory"]) for c in request["cells"]] == [([0], 1024), ([1, 2], 2048)]


@pytest.mark.parametrize(
    ("specs", "vcpus", "memory_mb", "field"),
    [
        ({"hw:numa_nodes": "3"}, 4, 2048, "hw:numa_nodes"),
        ({"hw:numa_nodes": "2"}, 4, 2049, "hw:numa_nodes"),
        ({"hw:numa_nodes": "0"}, 4, 2048, "hw:numa_nodes"),
        ({"hw:numa_nodes": "two"}, 4, 2048, "hw:numa_nodes"),
        ({"hw:cpu_policy": "pinned"}, 4, 2048, "hw:cpu_policy"),
        ({"hw:cpu_thread_policy": "isolate"}, 4, 2048, "hw:cpu_thread_policy"),
        ({"hw:cpu_policy": "shared", "hw:cpu_thread_policy": "prefer"}, 4, 2048,
         "hw:cpu_thread_policy"),
        ({"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "always"}, 4, 2048,
         "hw:cpu_thread_policy"),
        ({"hw:emulator_threads_policy": "isolate"}, 4, 2048, "hw:emulator_threads_policy"),
        ({"hw:cpu_policy": "mixed"}, 4, 2048, "hw:cpu_dedicated_mask"),
        ({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "0-3"}, 4, 2048,
         "hw:cpu_dedicated_mask"),
        ({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "3-9"}, 4, 2048,
         "hw:cpu_dedicated_mask"),
        ({"hw:cpu_policy": "dedicated", "hw:cpu_dedicated_mask": "^0"}, 4, 2048,
         "hw:cpu_dedicated_mask"),
        ({"hw:mem_page_size": "huge"}, 4, 2048, "hw:mem_page_size"),
        ({"hw:mem_page_size": "0"}, 4, 2048, "hw:mem_page_size"),
        ({"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-1", "hw:numa_mem.0": "1024",
          "hw:numa_cpus.1": "2", "hw:numa_mem.1": "1024"}, 4, 2048, "hw:numa_cpus.0"),
        ({"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-2", "hw:numa_mem.0": "1024",
          "hw:numa_cpus.1": "2-3", "hw:numa_mem.1": "1024"}, 4, 2048, "hw:numa_cpus.1"),
        ({"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-1", "hw:numa_mem.0": "1024",
          "hw:numa_cpus.1": "2-4", "hw:numa_mem.1": "1024"}, 4, 2048, "hw:numa_cpus.1"),
        ({"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-1", "hw:numa_mem.0": "1024",
          "hw:numa_cpus.1": "2-3", "hw:numa_mem.1": "512"}, 4, 2048, "hw:numa_mem.0"),
        ({"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-1", "hw:numa_mem.0": "1024",
          "hw:numa_cpus.1": "2-3"}, 4, 2048, "hw:numa_mem.1"),
        ({"hw:numa_nodes": "1", "hw:numa_cpus.1": "0-3", "hw:numa_mem.1": "2048"}, 4, 2048,
         "hw:numa_cpus.1"),
        ({"hw:numa_cpus.0": "0-3"}, 4, 2048, "hw:numa_cpus.0"),
        ({"hw:numa_node": "2"}, 4, 2048, "hw:numa_node"),
    ],
)
def test_contradictory_specs_are_bad_requests_naming_the_key(
    specs: dict[str, str], vcpus: int, memory_mb: int, field: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        numa.constraints({"vcpus": vcpus, "memory_mb": memory_mb, "extra_specs": specs})
    assert caught.value.code == "BAD_REQUEST"
    assert caught.value.details is not None
    assert caught.value.details["field"] == field
    assert field in caught.value.message


@pytest.mark.parametrize("bad", [{"vcpus": 0, "memory_mb": 1}, {"vcpus": 1, "memory_mb": "1"}])
def test_flavor_sizes_must_be_positive_integers(bad: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        numa.constraints({**bad, "extra_specs": {}})


@pytest.mark.parametrize("key, value", [("hw:numa_cpus.0", "0-9999999"), ("hw:numa_cpus.0", "0,^5-9999999"),
                                        ("hw:cpu_dedicated_mask", "^0-9999999")])
def test_huge_cpu_ranges_are_refused_before_they_are_expanded(key: str, value: str) -> None:
    """A range far beyond the flavor's vCPUs is refused from its bounds: a 1-vCPU flavor naming
    ten million vCPUs costs no memory to refuse (expanding it took 1.1 GiB and a second)."""
    specs = {"hw:numa_nodes": "1", "hw:numa_mem.0": "1024", key: value}
    if key == "hw:cpu_dedicated_mask":
        specs = {"hw:cpu_policy": "mixed", key: value}
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest) as err:
            numa.constraints({"vcpus": 1, "memory_mb": 1024, "extra_specs": specs})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.details["field"] == key
    assert "9999999" in err.value.message
    assert peak < 1 << 20
