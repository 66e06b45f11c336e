"""Times Nova's own numa_fit_instance_to_host on corpus cases; run with a Nova venv's python.

Usage: python nova_numa_driver.py CORPUS.jsonl REPEATS
Prints one JSON object: {case id: [best seconds per call, fits]}. Each call gets freshly
built Nova objects (Nova writes into the request), built outside the timed region.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Any

warnings.simplefilter("ignore")

from nova import objects  # noqa: E402
from nova.virt import hardware  # noqa: E402

objects.register_all()


def host_topology(host: dict[str, Any]) -> Any:
    cells = []
    for c in host["cells"]:
        cells.append(
            objects.NUMACell(
                id=c["id"],
                cpuset=set(c["cpuset"]),
                pcpuset=set(c["pcpuset"]),
                memory=c["memory"],
                cpu_usage=c["cpu_usage"],
                memory_usage=c["memory_usage"],
                pinned_cpus=set(c["pinned_cpus"]),
                siblings=[set(s) for s in c["siblings"]],
                mempages=[
                    objects.NUMAPagesTopology(
                        size_kb=p["size_kb"], total=p["total"], used=p["used"],
                        reserved=p["reserved"],
                    )
                    for p in c["mempages"]
                ],
                network_metadata=objects.NetworkMetadata(physnets=set(), tunneled=False),
                socket=c.get("socket"),
            )
        )
    return objects.NUMATopology(cells=cells)


def instance_topology(request: dict[str, Any]) -> Any:
    cells = [
        objects.InstanceNUMACell(
            id=x["id"],
            cpuset=set(x["cpuset"]),
            pcpuset=set(x["pcpuset"]),
            memory=x["memory"],
            pagesize=x["pagesize"],
            cpu_policy=x["cpu_policy"],
            cpu_thread_policy=x["cpu_thread_policy"],
        )
        for x in request["cells"]
    ]
    topology = objects.InstanceNUMATopology(cells=cells)
    if request.get("emulator_threads_policy"):
        topology.emulator_threads_policy = request["emulator_threads_policy"]
    return topology


def main() -> None:
    path, repeats = sys.argv[1], int(sys.argv[2])
    out: dict[str, list[Any]] = {}
    with open(path) as f:
        cases = [json.loads(line) for line in f if line.strip()]
    for case in cases:
        host = host_topology(case["host"])
        lim = case["limits"]
        limits = objects.NUMATopologyLimits(**lim) if lim else None
        best = float("inf")
        fits = False
        for _ in range(repeats):
            request = instance_topology(case["request"])
            t = time.perf_counter()
            got = hardware.numa_fit_instance_to_host(host, request, None, limits=limits)
            best = min(best, time.perf_counter() - t)
            fits = got is not None
        out[case["id"]] = [best, fits]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
