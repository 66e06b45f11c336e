"""The guest's CPU: floating guests fenced off the pinned pCPUs, CPU modes, required traits as
required CPU features, and the KVM domain XML checked against libvirt's schema.

The fencing test runs a real agent in this process, so that each domain's XML can be read
back from libvirt's test hypervisor, which lives inside the agent's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import subprocess
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import free_port, spawn_args

from fastcompute.agent import Agent
from fastcompute.compute.cpu import HostCpu, guest_features
from fastcompute.config import Config, load
from fastcompute.errors import BadRequest, HypervisorError, NoCapacity
from fastcompute.hypervisor.libvirt import capabilities
from fastcompute.hypervisor.libvirt.driver import LibvirtDriver
from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.hypervisor.libvirt.xml import build
from fastcompute.hypervisor.spec import Disk, GuestCell, GuestSpec, Interface, Limits
from fastcompute.resources import cpusets
from fastcompute.rpc.client import AsyncClient


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, config: str, uri: str,
                        images: str = "") -> AsyncIterator[tuple[Agent, AsyncClient]]:
    """A real agent on loopback in this event loop, and a client of it (``images``: more lines
    of its ``[images]`` section)."""
    control, events = free_port(), free_port()
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\ncontrol = "tcp://127.0.0.1:{control}"\n'
        f'events = "tcp://127.0.0.1:{events}"\n[hypervisor]\nuri = "{uri}"\n'
        f'[images]\nfile_roots = ["/"]\n{images}\n[stats]\ninterval_s = 0\n' + config)
    cfg: Config = load(path)
    agent = Agent(cfg)
    await agent.start()
    try:
        async with AsyncClient(cfg.agent.control) as client:
            yield agent, client
    finally:
        await agent.stop()


def cpu_sets(xml: str, host_cpus: set[int]) -> tuple[dict[int, set[int]], set[int], ET.Element]:
    """Where libvirt lets each vCPU and the emulator threads of a domain run, read from its XML
    as libvirt applies it: a vCPU's vcpupin, else <vcpu cpuset>, else every host CPU; the
    emulator's emulatorpin, else <vcpu cpuset>, else every host CPU."""
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    assert vcpu is not None and vcpu.text is not None
    default = cpusets.parse(vcpu.get("cpuset")) if vcpu.get("cpuset") else set(host_cpus)
    allowed = {v: set(default) for v in range(int(vcpu.text))}
    for pin in root.findall("cputune/vcpupin"):
        allowed[int(pin.get("vcpu", "-1"))] = cpusets.parse(pin.get("cpuset", ""))
    emulatorpin = root.find("cputune/emulatorpin")
    emulator = cpusets.parse(emulatorpin.get("cpuset", "")) if emulatorpin is not None else set(default)
    return allowed, emulator, root


# (kind, vcpus, extra specs): pinned kinds have dedicated vCPUs; the others float.
KINDS: list[tuple[str, int, dict[str, str]]] = [
    ("floating", 1, {}),
    ("floating", 4, {}),
    ("floating-numa", 2, {"hw:numa_nodes": "1"}),
    ("floating-numa-share", 2, {"hw:numa_nodes": "1", "hw:emulator_threads_policy": "share"}),
    ("pinned", 1, {"hw:cpu_policy": "dedicated"}),
    ("pinned", 2, {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "require"}),
    ("pinned-isolate", 2, {"hw:cpu_policy": "dedicated", "hw:emulator_threads_policy": "isolate"}),
    ("pinned-share", 2, {"hw:cpu_policy": "dedicated", "hw:emulator_threads_policy": "share"}),
    ("mixed", 3, {"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "1-2"}),
]


@pytest.mark.parametrize("shared_set", ["", "0-7,80-87,160-167,240-247"], ids=["shared-unset", "shared-set"])
def test_no_floating_cpu_overlaps_a_dedicated_pcpu_over_200_random_guests(tmp_path: Path, image_file: Path,
                                                                         shared_set: str) -> None:
    uri = write_test_host(tmp_path / "host.xml", cells=4, sockets=4, cores=40, threads=2, memory_gib=1024)
    host_cpus = set(range(320))
    dedicated = cpusets.parse("16-79,96-159,176-239,256-319")
    shared = cpusets.parse(shared_set) if shared_set else host_cpus - dedicated
    config = (f'[resources]\ncpu_dedicated_set = "16-79,96-159,176-239,256-319"\ncpu_shared_set = "{shared_set}"\n'
              "disk_gb = 100000\n")
    rng = random.Random(18)
    picks = [rng.choice(KINDS) for _ in range(200)]

    async def run() -> dict[str, tuple[str, dict[str, Any], str]]:
        async with running_agent(tmp_path, config, uri) as (agent, client):
            async def one(i: int, kind: str, vcpus: int, specs: dict[str, str]) -> tuple[str, dict[str, Any], str]:
                flavor = {"vcpus": vcpus, "memory_mb": 64, "disk_gb": 1, "extra_specs": specs}
                args = spawn_args(image_file, name=f"g{i}", flavor=flavor, wait=True)
                rec = await client.call("instance.spawn", args)
                assert rec["vm_state"] == "active", rec
                return kind, rec, await agent.driver.domain_xml(rec["uuid"])

            done = await asyncio.gather(*(one(i, *pick) for i, pick in enumerate(picks)))
            return {rec["uuid"]: (kind, rec, xml) for kind, rec, xml in done}

    guests = asyncio.run(run())
    assert len(guests) == 200
    assert {kind for kind, _, _ in guests.values()} == {k for k, _, _ in KINDS}
    taken: dict[int, str] = {}  # pCPU -> the guest it is pinned to (vCPU or isolated emulator)
    floating: dict[str, set[int]] = {}
    for uuid, (kind, rec, xml) in guests.items():
        allowed, emulator, root = cpu_sets(xml, host_cpus)
        assert root.find("cpu") is not None and root.find("cpu").get("mode") == "host-model"  # type: ignore[union-attr]
        pinning = {int(v): p for cell in rec["numa"] or [] for v, p in (cell["pinning"] or {}).items()}
        own = set(pinning.values())
        for vcpu, cpus in allowed.items():
            if vcpu in pinning:
                assert cpus == {pinning[vcpu]} and cpus <= dedicated
                for p in cpus:
                    assert taken.setdefault(p, uuid) == uuid, f"pCPU {p} pinned twice"
            else:
                assert cpus and cpus <= shared, (kind, vcpu, sorted(cpus))
                floating.setdefault(uuid, set()).update(cpus)
        if kind == "pinned-isolate":
            (extra,) = emulator
            assert extra in dedicated and extra not in own
            assert taken.setdefault(extra, uuid) == uuid
        elif kind in ("pinned-share", "floating-numa-share") and shared_set:
            assert emulator == shared
        elif kind.startswith("floating"):
            assert emulator <= shared
            floating[uuid] |= emulator
        else:
            assert emulator <= own | shared and emulator & own
    assert floating, "the mix has floating guests"
    for uuid, cpus in floating.items():
        assert not cpus & dedicated, (guests[uuid][0], sorted(cpus & dedicated))
        assert not cpus & set(taken), "a floating guest may run on a pinned pCPU"


def test_required_cpu_traits_become_required_features_and_others_are_refused(tmp_path: Path,
                                                                             image_file: Path) -> None:
    """test:///default's CPU has the features pae and nonpae (traits HW_CPU_X86_PAE, _NONPAE)."""
    config = '[resources]\ncustom_traits = ["CUSTOM_FAST_DISK"]\n'

    async def run() -> None:
        async with running_agent(tmp_path, config, "test:///default") as (agent, client):
            def flavor(**specs: str) -> dict[str, Any]:
                return {"vcpus": 1, "memory_mb": 64, "disk_gb": 1, "extra_specs": specs}

            rec = await client.call("instance.spawn", spawn_args(image_file, wait=True, flavor=flavor(
                **{"trait:HW_CPU_X86_PAE": "required", "trait:CUSTOM_FAST_DISK": "required",
                   "trait:HW_CPU_X86_AVX512F": "forbidden"})))
            root = ET.fromstring(await agent.driver.domain_xml(rec["uuid"]))
            assert [(f.get("policy"), f.get("name")) for f in root.findall("cpu/feature")] == [("require", "pae")]
            plain = await client.call("instance.spawn", spawn_args(image_file, wait=True))
            root = ET.fromstring(await agent.driver.domain_xml(plain["uuid"]))
            assert root.findall("cpu/feature") == [], "a guest gets no feature it was not placed for"
            for specs, missing, present in (({"trait:HW_CPU_X86_AVX2": "required"}, ["HW_CPU_X86_AVX2"], []),
                                            ({"trait:HW_CPU_X86_NONPAE": "forbidden"}, [], ["HW_CPU_X86_NONPAE"]),
                                            ({"trait:CUSTOM_GPU": "required"}, ["CUSTOM_GPU"], [])):
                with pytest.raises(NoCapacity) as info:
                    await client.call("instance.spawn", spawn_args(image_file, flavor=flavor(**specs)))
                assert (info.value.details or {}).get("missing") == missing
                assert (info.value.details or {}).get("forbidden") == present
            for key, value in (("trait:HW_CPU_X86_PAE", "preferred"), ("trait:hw_cpu_x86_pae", "required")):
                with pytest.raises(BadRequest) as bad:
                    await client.call("instance.spawn", spawn_args(image_file, flavor=flavor(**{key: value})))
                assert (bad.value.details or {}).get("field") == f"args.flavor.extra_specs.{key}"
            usage = (await client.call("host.info"))["usage"]
            assert usage["VCPU"] == 2, "refused spawns hold nothing"

    asyncio.run(run())


def test_guest_features_are_the_extra_flags_and_the_required_traits_only() -> None:
    host = HostCpu(shared=[0], mode="custom", model="qemu64", extra_flags=["pcid"],
                   features={"HW_CPU_X86_AVX2": "avx2", "HW_CPU_X86_SSE4_2": "sse4.2", "HW_CPU_X86_AES": "aes"},
                   traits=frozenset({"HW_CPU_X86_AVX2", "HW_CPU_X86_SSE4_2", "HW_CPU_X86_AES"}))
    specs = {"trait:HW_CPU_X86_SSE4_2": "required", "trait:HW_CPU_X86_AVX2": "required",
             "trait:HW_CPU_X86_AES": "forbidden", "trait:CUSTOM_X": "required"}
    assert guest_features(specs, host) == ["pcid", "avx2", "sse4.2"]
    assert guest_features({}, host) == ["pcid"]


def test_cpu_modes_follow_the_domain_type_and_libvirts_domain_capabilities() -> None:
    tcg = ("<domainCapabilities><domain>qemu</domain><cpu><mode name='host-passthrough' supported='no'/>"
           "<mode name='maximum' supported='yes'/><mode name='host-model' supported='yes'>"
           "<model fallback='forbid'>EPYC</model></mode><mode name='custom' supported='yes'/></cpu>"
           "</domainCapabilities>")
    assert capabilities.cpu_modes(tcg) == {"host-passthrough": False, "maximum": True, "host-model": True,
                                           "custom": True}

    async def run() -> None:
        drv = LibvirtDriver("test:///default", 1)
        await drv.connect(lambda _e: None)
        try:
            assert await drv.virt_type("auto") == "test"
            assert await drv.guest_cpu("test", "auto", []) == ("host-model", None)
            assert await drv.guest_cpu("qemu", "auto", []) == ("custom", "qemu64")
            assert await drv.guest_cpu("qemu", "auto", ["Haswell"]) == ("custom", "Haswell")
            assert await drv.guest_cpu("kvm", "auto", []) == ("host-model", None)
            assert await drv.guest_cpu("kvm", "host-passthrough", []) == ("host-passthrough", None)
            with pytest.raises(HypervisorError, match="cpu_models"):
                await drv.guest_cpu("kvm", "custom", [])
        finally:
            await drv.close()

    asyncio.run(run())


def kvm_guest(**over: Any) -> GuestSpec:
    """A pinned two-cell guest on huge pages, as the agent describes one for a KVM host."""
    fields: dict[str, Any] = dict(
        uuid=str(uuid_mod.uuid4()), name="vm <1> & 'x'", project_id="p", vcpus=4, memory_mb=2048,
        console_path="/var/lib/fastcompute/instances/x/console.log",
        disks=[Disk(role="root", source="/var/lib/fastcompute/instances/x/disk", format="qcow2", boot_order=1),
               Disk(role="config", source="/var/lib/fastcompute/instances/x/disk.config", device="cdrom",
                    bus="sata", read_only=True)],
        interfaces=[Interface("tap12345678-90", "fa:16:3e:00:00:01", 1450)],
        cells=[GuestCell(0, [0, 1], 1024, 0, 2048), GuestCell(1, [2, 3], 1024, 1, 2048)],
        vcpupin={0: [4], 1: [5], 2: [36], 3: [37]}, emulatorpin=[6],
        limits=Limits(cpu_shares=2048, disk_read_iops_sec=500), oem_strings=["fc.ip=10.0.0.5/24"],
        virt_type="kvm", cpu_mode="host-model", cpu_features=["avx2", "sse4.2"])
    fields.update(over)
    return GuestSpec(**fields)


VALIDATE = shutil.which("virt-xml-validate")


@pytest.mark.skipif(VALIDATE is None, reason="virt-xml-validate (Debian's libvirt-clients) is not installed")
@pytest.mark.parametrize("spec", [
    kvm_guest(),
    kvm_guest(cpu_mode="host-passthrough"),
    kvm_guest(cpu_mode="custom", cpu_model="Haswell-noTSX", firmware="uefi", machine="q35"),
    kvm_guest(cells=[], vcpupin={}, cpuset=[0, 1, 2, 3, 32, 33], emulatorpin=[0, 1, 2, 3, 32, 33], vcpus=2),
    kvm_guest(virt_type="qemu", cpu_mode="custom", cpu_model="qemu64", cpu_features=[]),
], ids=["host-model-pinned-numa", "host-passthrough", "custom-uefi-q35", "floating", "tcg-qemu64"])
def test_kvm_domain_xml_is_valid_for_libvirts_schema(tmp_path: Path, spec: GuestSpec) -> None:
    """This host cannot run KVM guests, so the KVM domain is checked against libvirt's own
    RelaxNG schema instead: host-model CPU with required features, pinning, NUMA, huge pages."""
    path = tmp_path / "domain.xml"
    path.write_text(build(spec))
    assert VALIDATE is not None
    run = subprocess.run([VALIDATE, str(path), "domain"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    root = ET.fromstring(path.read_text())
    assert root.get("type") == spec.virt_type
    cpu = root.find("cpu")
    assert cpu is not None and cpu.get("mode") == spec.cpu_mode
    assert [f.get("name") for f in cpu.findall("feature")] == spec.cpu_features


def test_broken_domain_xml_fails_the_schema(tmp_path: Path) -> None:
    """The schema check can fail: a CPU mode libvirt does not know is refused."""
    if VALIDATE is None:
        pytest.skip("virt-xml-validate (Debian's libvirt-clients) is not installed")
    path = tmp_path / "domain.xml"
    path.write_text(build(kvm_guest()).replace("mode='host-model'", "mode='host-modle'"))
    run = subprocess.run([VALIDATE, str(path), "domain"], capture_output=True, text=True, check=False)
    assert run.returncode != 0
