"""A fleet of three real agents on loopback ports, each on a test host of its own size."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_fixtures import AgentProcess

from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.hypervisor.spec import HypervisorInfo
from fastcompute.protocol import HostInfo, Inventory, Topology
from fastcompute.scheduler.fleet import Endpoint

# name -> write_test_host arguments. VCPU capacity at the default 16x ratio: 64, 128, 512.
SIZES: dict[str, dict[str, int]] = {
    "small": {"cells": 1, "sockets": 1, "cores": 2, "threads": 2, "memory_gib": 16},
    "medium": {"cells": 2, "sockets": 1, "cores": 4, "threads": 2, "memory_gib": 32},
    "large": {"cells": 2, "sockets": 2, "cores": 8, "threads": 2, "memory_gib": 64},
}
FLAVOR = {"vcpus": 1, "memory_mb": 128, "disk_gb": 1}


def synthetic_info(inventory: dict[str, tuple[int, int, float]], usage: dict[str, int],
                   traits: list[str]) -> HostInfo:
    """A ``host.info`` as an agent would send it, for a view without an agent: ``inventory``
    maps a class to (total, reserved, allocation_ratio); one instance may take all of it."""
    inv = {rc: Inventory(total=total, reserved=reserved, allocation_ratio=ratio, min_unit=1,
                         max_unit=int((total - reserved) * ratio), step_size=1)
           for rc, (total, reserved, ratio) in inventory.items()}
    return HostInfo(hostname="synthetic", hypervisor=HypervisorInfo("test:///default", "TEST", "0.0.0"),
                    topology=Topology([]), inventory=inv, usage=usage, traits=traits, generation=0,
                    instances=0, enabled=True, disabled_reason=None, numa_host=None, server_groups={})


def agent_config(name: str, extra: str = "", traits: list[str] | None = None) -> str:
    """An agent config: its host name, disk large enough never to be the limit, its custom
    traits, no stats."""
    return (f'[agent]\nhost = "{name}"\n{extra}\n[resources]\ndisk_gb = 100000\n'
            f"custom_traits = {json.dumps(traits or [])}\n[stats]\ninterval_s = 0\n")


@dataclass
class Fleet:
    """Three agents by size name, and the host name each reports."""

    agents: dict[str, AgentProcess]
    hostnames: dict[str, str]

    def endpoints(self, names: list[str] | None = None) -> list[Endpoint]:
        """The scheduler's view of the agents."""
        return [Endpoint(a.control, a.events) for n, a in self.agents.items() if names is None or n in names]

    def info(self, name: str) -> dict[str, Any]:
        """``host.info`` of one agent."""
        return self.agents[name].call("host.info")  # type: ignore[no-any-return]

    def capacity(self, name: str, rc: str = "VCPU") -> int:
        """How much of ``rc`` the agent may hand out."""
        inv = self.info(name)["inventory"][rc]
        return int((inv["total"] - inv["reserved"]) * inv["allocation_ratio"])

    def instances(self, name: str) -> set[str]:
        """The uuids the agent holds."""
        return {r["uuid"] for r in self.agents[name].call("instance.list")}


def start_fleet(make_agent: Any, base: Path, extra_config: str = "", suffix: str = "",
                traits: dict[str, list[str]] | None = None) -> Fleet:
    """Start the three agents (in parallel) and wait for them; host names are the size names
    plus ``suffix`` (tests sharing one Placement give each fleet its own names); ``traits``
    gives hosts custom traits by size name."""
    agents: dict[str, AgentProcess] = {}
    for name, size in SIZES.items():
        uri = write_test_host(base / f"{name}.xml", **size)
        config = agent_config(name + suffix, extra_config, (traits or {}).get(name))
        agents[name] = make_agent(config=config, hypervisor=uri, start=False)
    for a in agents.values():
        a.start(wait=False)
    for a in agents.values():
        a.wait_ready()
    return Fleet(agents, {name: name + suffix for name in agents})


def after(n: int, action: Callable[[], object]) -> Callable[[], None]:
    """A ``run_storm`` ``on_done`` that calls ``action`` once, when the ``n``-th spawn is done
    (an agent killed or Placement stopped mid-storm)."""
    done = itertools.count(1)

    def on_done() -> None:
        if next(done) == n:
            action()

    return on_done


def spawns(image: Path, count: int, prefix: str = "vm", **flavor: Any) -> list[dict[str, Any]]:
    """``count`` spawn arguments of the small flavor (overridden by ``flavor``)."""
    return [{"name": f"{prefix}-{i}", "flavor": {**FLAVOR, **flavor}, "image": {"url": image.as_uri()}}
            for i in range(count)]
