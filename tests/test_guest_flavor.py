"""Every flavor key the agent accepts is applied (what it did read back from libvirt's domain
XML, through a real agent), or refused with BAD_REQUEST naming the key; what the host
cannot give is NO_CAPACITY."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import spawn_args
from test_guest_cpu import kvm_guest, running_agent

from fastcompute.compute import hardware
from fastcompute.compute.guest import guest_spec
from fastcompute.errors import BadRequest, NoCapacity
from fastcompute.hypervisor.libvirt import capabilities
from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.hypervisor.libvirt.xml import build
from fastcompute.hypervisor.spec import CpuTopology, GuestSpec, HostFeatures, Limits, Rng, Tpm
from fastcompute.protocol import Flavor, Image, InstanceRecord
from fastcompute.resources import cpusets, numa
from fastcompute.resources.tracker import Claim


def _get(root: ET.Element, path: str) -> str | None:
    """``path``'s text, or with ``@attr`` at its end that attribute; None when absent."""
    at = path.rfind("@")
    elem_path, attr = (path[:at], path[at + 1:]) if at > path.rfind("]") else (path, "")
    elem = root.find(elem_path.rstrip("/") or ".")
    if elem is None:
        return None
    return elem.get(attr) if attr else (elem.text or "")


# (vcpus, extra specs, {path in the domain XML: what libvirt has there (None: absent)})
APPLIED: list[tuple[int, dict[str, str], dict[str, str | None]]] = [
    (1, {}, {"os@firmware": None, "devices/tpm": None, "devices/watchdog": None, "cpu/topology": None,
             "devices/rng@model": "virtio", "devices/rng/backend": "/dev/urandom", "devices/rng/rate": None,
             "os/bootmenu": None, "features/pmu": None, "features/kvm": None, "memoryBacking": None}),
    (1, {"hw:machine_type": "q35"}, {"os/type@machine": "q35", "devices/disk[@device='cdrom']/target@bus": "sata"}),
    (1, {"hw_machine_type": "pc-i440fx-7.2"}, {"os/type@machine": "pc-i440fx-7.2"}),
    (1, {"hw:firmware_type": "uefi"}, {"os@firmware": "efi",
                                       "os/firmware/feature[@name='secure-boot']@enabled": "no"}),
    (1, {"hw_firmware_type": "uefi"}, {"os@firmware": "efi"}),
    (1, {"hw:firmware_type": "bios"}, {"os@firmware": None}),
    (1, {"hw:firmware_type": "uefi", "hw:machine_type": "q35", "os:secure_boot": "required"},
     {"os/firmware/feature[@name='secure-boot']@enabled": "yes",
      "os/firmware/feature[@name='enrolled-keys']@enabled": "yes", "features/smm@state": "on"}),
    (1, {"hw:firmware_type": "uefi", "os:secure_boot": "disabled"},
     {"os/firmware/feature[@name='secure-boot']@enabled": "no", "features/smm": None}),
    (1, {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"},
     {"devices/tpm@model": "tpm-crb", "devices/tpm/backend@type": "emulator", "devices/tpm/backend@version": "2.0"}),
    (1, {"hw:tpm_version": "1.2"}, {"devices/tpm@model": "tpm-tis", "devices/tpm/backend@version": "1.2"}),
    (1, {"hw:watchdog_action": "reset"}, {"devices/watchdog@model": "i6300esb", "devices/watchdog@action": "reset"}),
    (1, {"hw:watchdog_action": "poweroff"}, {"devices/watchdog@action": "poweroff"}),
    (1, {"hw:watchdog_action": "disabled"}, {"devices/watchdog": None}),
    (1, {"hw_rng:allowed": "false"}, {"devices/rng": None}),
    (1, {"hw_rng:allowed": "True", "hw_rng:rate_bytes": "1024", "hw_rng:rate_period": "2000"},
     {"devices/rng/rate@bytes": "1024", "devices/rng/rate@period": "2000"}),
    (1, {"hw_rng:rate_bytes": "0"}, {"devices/rng@model": "virtio", "devices/rng/rate": None}),
    (1, {"hw:video_model": "virtio"}, {"devices/video/model@type": "virtio"}),
    (1, {"hw_video_model": "vga"}, {"devices/video/model@type": "vga"}),
    (1, {"hw:serial_port_count": "3"}, {"devices/serial[@type='file']/target@port": "0",
                                        "devices/serial[3]/target@port": "2", "devices/serial[4]": None}),
    (1, {"hw:serial_port_count": "1"}, {"devices/serial[2]": None}),
    (4, {"hw:cpu_sockets": "2"}, {"cpu/topology@sockets": "2", "cpu/topology@cores": "2",
                                  "cpu/topology@threads": "1"}),
    (8, {"hw:cpu_sockets": "1", "hw:cpu_cores": "4", "hw:cpu_threads": "2"},
     {"cpu/topology@sockets": "1", "cpu/topology@cores": "4", "cpu/topology@threads": "2"}),
    (8, {"hw:cpu_max_sockets": "2", "hw:cpu_max_threads": "1"},
     {"cpu/topology@sockets": "2", "cpu/topology@cores": "4", "cpu/topology@threads": "1"}),
    (4, {"hw:cpu_threads": "2"}, {"cpu/topology@sockets": "2", "cpu/topology@cores": "1",
                                  "cpu/topology@threads": "2"}),
    (1, {"hw:boot_menu": "yes"}, {"os/bootmenu@enable": "yes"}),
    (1, {"hw:boot_menu": "false"}, {"os/bootmenu": None}),
    (1, {"hw:pmu": "false"}, {"features/pmu@state": "off"}),
    (1, {"hw:pmu": "true"}, {"features/pmu@state": "on"}),
    (1, {"hw:hide_hypervisor_id": "true"}, {"features/kvm/hidden@state": "on"}),
    (1, {"hw:locked_memory": "true", "hw:mem_page_size": "small"}, {"memoryBacking/locked": ""}),
    (1, {"hw:virtio_packed_ring": "true"}, {"devices/disk[@device='disk']/driver@packed": "on",
                                            "devices/disk[@device='cdrom']/driver@packed": None}),
    (1, {"hw:vif_multiqueue_enabled": "false", "hw:mem_encryption": "false"}, {"devices/interface": None}),
    (1, {"quota:disk_total_bytes_sec": "10485760", "quota:disk_total_iops_sec": "300"},
     {"devices/disk/iotune/total_bytes_sec": "10485760", "devices/disk/iotune/total_iops_sec": "300",
      "devices/disk/iotune/read_bytes_sec": None}),
]


def test_every_applied_flavor_key_shows_in_the_domain_libvirt_holds(tmp_path: Path, image_file: Path) -> None:
    async def run() -> list[tuple[dict[str, str], ET.Element]]:
        async with running_agent(tmp_path, "", "test:///default") as (agent, client):
            async def one(i: int, vcpus: int, specs: dict[str, str]) -> tuple[dict[str, str], ET.Element]:
                flavor = {"vcpus": vcpus, "memory_mb": 64, "disk_gb": 1, "extra_specs": specs}
                args = spawn_args(image_file, name=f"g{i}", flavor=flavor, wait=True)
                rec = await client.call("instance.spawn", args)
                assert rec["vm_state"] == "active", (specs, rec)
                return specs, ET.fromstring(await agent.driver.domain_xml(rec["uuid"]))

            return await asyncio.gather(*(one(i, v, s) for i, (v, s, _) in enumerate(APPLIED)))

    for (specs, root), (_, _, want) in zip(asyncio.run(run()), APPLIED, strict=True):
        got = {path: _get(root, path) for path in want}
        assert got == want, specs


# (extra specs, the key named, a word of the reason)
REFUSED: list[tuple[int, dict[str, str], str, str]] = [
    (1, {"hw:mem_encryption": "true"}, "hw:mem_encryption", "SEV"),
    (1, {"hw:vif_multiqueue_enabled": "yes"}, "hw:vif_multiqueue_enabled", "one queue"),
    (1, {"hw:viommu_model": "intel"}, "hw:viommu_model", "IOMMU"),
    (1, {"hw_video:ram_max_mb": "64"}, "hw_video:ram_max_mb", "image properties"),
    (1, {"hw:firmware_type": "coreboot"}, "hw:firmware_type", "bios or uefi"),
    (1, {"hw_firmware_type": "efi"}, "hw_firmware_type", "bios or uefi"),
    (1, {"hw:firmware_type": "uefi", "hw_firmware_type": "bios"}, "hw_firmware_type", "says"),
    (1, {"hw:machine_type": "virt"}, "hw:machine_type", "q35"),
    (1, {"os:secure_boot": "required"}, "os:secure_boot", "uefi"),
    (1, {"os:secure_boot": "required", "hw:firmware_type": "uefi"}, "os:secure_boot", "q35"),
    (1, {"os:secure_boot": "optional"}, "os:secure_boot", "disabled, required"),
    (1, {"os:boot_order": "1"}, "os:boot_order", "unknown"),
    (1, {"hw:tpm_model": "tpm-crb"}, "hw:tpm_model", "hw:tpm_version"),
    (1, {"hw:tpm_model": "tpm-crb", "hw:tpm_version": "1.2"}, "hw:tpm_model", "2.0"),
    (1, {"hw:tpm_version": "3.0"}, "hw:tpm_version", "1.2, 2.0"),
    (1, {"hw:watchdog_action": "explode"}, "hw:watchdog_action", "must be one of"),
    (1, {"hw_rng:allowed": "maybe"}, "hw_rng:allowed", "true or false"),
    (1, {"hw_rng:allowed": "false", "hw_rng:rate_bytes": "10"}, "hw_rng:rate_bytes", "RNG"),
    (1, {"hw_rng:rate_period": "10"}, "hw_rng:rate_period", "rate_bytes"),
    (1, {"hw_rng:model": "virtio"}, "hw_rng:model", "unknown"),
    (1, {"hw:rng_allowed": "true"}, "hw:rng_allowed", "unknown"),
    (1, {"hw:video_model": "matrox"}, "hw:video_model", "virtio"),
    (1, {"hw:serial_port_count": "0"}, "hw:serial_port_count", "from 1 to 4"),
    (1, {"hw:serial_port_count": "5"}, "hw:serial_port_count", "from 1 to 4"),
    (4, {"hw:cpu_sockets": "3"}, "hw:cpu_sockets", "divide"),
    (8, {"hw:cpu_sockets": "2", "hw:cpu_cores": "2", "hw:cpu_threads": "1"}, "hw:cpu_sockets", "not the flavor's 8"),
    (4, {"hw:cpu_sockets": "4", "hw:cpu_max_sockets": "2"}, "hw:cpu_sockets", "above"),
    (8, {"hw:cpu_max_sockets": "1", "hw:cpu_max_cores": "2", "hw:cpu_max_threads": "2"}, "hw:cpu_max_sockets",
     "no sockets"),
    (1, {"hw:cpu_cores": "0"}, "hw:cpu_cores", "integer"),
    (1, {"hw:locked_memory": "true"}, "hw:locked_memory", "hw:mem_page_size"),
    (1, {"hw:mem_encryption_model": "amd-sev"}, "hw:mem_encryption_model", "unknown"),
    (1, {"hw:cpu_realtime": "yes"}, "hw:cpu_realtime", "unknown"),
    (1, {"quota:disk_total_bytes_sec": "1", "quota:disk_read_bytes_sec": "1"}, "quota:disk_total_bytes_sec",
     "cannot be set"),
    (1, {"quota:vif_inbound_peak": "100"}, "quota:vif_inbound_peak", "quota:vif_inbound_average"),
    (1, {"quota:vif_outbound_burst": "100"}, "quota:vif_outbound_burst", "quota:vif_outbound_average"),
    (1, {"quota:vif_outbound_average": "-1"}, "quota:vif_outbound_average", "non-negative"),
]


def test_refused_flavor_keys_are_bad_request_naming_the_key(tmp_path: Path, image_file: Path) -> None:
    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default") as (_agent, client):
            for vcpus, specs, key, reason in REFUSED:
                flavor = {"vcpus": vcpus, "memory_mb": 64, "disk_gb": 1, "extra_specs": specs}
                with pytest.raises(BadRequest) as info:
                    await client.call("instance.spawn", spawn_args(image_file, flavor=flavor))
                details = info.value.details or {}
                assert details.get("field") == f"args.flavor.extra_specs.{key}", (specs, details)
                assert reason in str(details.get("reason")), (specs, details)
            assert await client.call("instance.list") == [], "nothing was recorded"

    asyncio.run(run())


def test_what_the_host_lacks_is_no_capacity(tmp_path: Path, image_file: Path) -> None:
    """A host without OVMF, secure-boot firmware or swtpm, or without a machine type, takes no
    guest that needs it (as a scheduler would have placed it elsewhere)."""
    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default") as (agent, client):
            agent.manager.host_features = HostFeatures(machines=["pc", "pc-i440fx-7.2", "q35"], uefi=True,
                                                       tpm_versions=["2.0"], tpm_models=["tpm-tis"])
            for specs, key in (({"hw:machine_type": "pc-q35-9.9"}, "hw:machine_type"),
                               ({"hw:firmware_type": "uefi", "hw:machine_type": "q35", "os:secure_boot": "required"},
                                "os:secure_boot"),
                               ({"hw:tpm_version": "1.2"}, "hw:tpm_version"),
                               ({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, "hw:tpm_model")):
                flavor = {"vcpus": 1, "memory_mb": 64, "disk_gb": 1, "extra_specs": specs}
                with pytest.raises(NoCapacity) as info:
                    await client.call("instance.spawn", spawn_args(image_file, flavor=flavor))
                assert (info.value.details or {}).get("field") == key, specs
            agent.manager.host_features = HostFeatures()
            with pytest.raises(NoCapacity, match="OVMF"):
                await client.call("instance.spawn", spawn_args(image_file, flavor={
                    "vcpus": 1, "memory_mb": 64, "disk_gb": 1, "extra_specs": {"hw:firmware_type": "uefi"}}))
            assert (await client.call("host.info"))["usage"]["VCPU"] == 0, "refused spawns hold nothing"

    asyncio.run(run())


def test_the_hardware_keys_are_the_ones_numa_lets_through() -> None:
    """Every hw: key the NUMA stage accepts as not its own is applied or refused by
    compute.hardware, and no other."""
    assert numa._OTHER_HW_KEYS == hardware.HW_KEYS


@pytest.mark.parametrize(("vcpus", "specs", "want"), [
    (4, {"hw:cpu_max_sockets": "4"}, (4, 1, 1)),          # Nova's order: most sockets x cores
    (4, {"hw:cpu_max_sockets": "1"}, (1, 4, 1)),
    (4, {"hw:cpu_max_sockets": "1", "hw:cpu_max_cores": "2"}, (1, 2, 2)),
    (6, {"hw:cpu_cores": "3"}, (2, 3, 1)),
    (12, {"hw:cpu_threads": "2", "hw:cpu_cores": "3"}, (2, 3, 2)),
    (16, {"hw:cpu_sockets": "2", "hw:cpu_max_cores": "4"}, (2, 4, 2)),
    (1024, {"hw:cpu_max_sockets": "2"}, (2, 512, 1)),
])
def test_topology_is_the_one_nova_picks(vcpus: int, specs: dict[str, str], want: tuple[int, int, int]) -> None:
    assert hardware.topology(specs, vcpus) == CpuTopology(*want)


def test_host_features_are_read_from_libvirts_domain_capabilities() -> None:
    pc = ("<domainCapabilities><os supported='yes'><enum name='firmware'><value>efi</value></enum>"
          "<loader supported='yes'><enum name='secure'><value>no</value></enum></loader></os><devices>"
          "<tpm supported='yes'><enum name='model'><value>tpm-tis</value><value>tpm-crb</value></enum>"
          "<enum name='backendModel'><value>passthrough</value><value>emulator</value></enum>"
          "<enum name='backendVersion'><value>1.2</value><value>2.0</value></enum></tpm></devices>"
          "</domainCapabilities>")
    q35 = pc.replace("<value>no</value></enum></loader>", "<value>yes</value><value>no</value></enum></loader>")
    caps = ("<capabilities><guest><os_type>hvm</os_type><arch name='x86_64'><machine canonical='pc-i440fx-7.2'>pc"
            "</machine><machine>pc-q35-7.2</machine><domain type='qemu'><machine canonical='pc-q35-7.2'>q35</machine>"
            "</domain></arch></guest><guest><os_type>hvm</os_type><arch name='i686'><machine>isapc</machine></arch>"
            "</guest></capabilities>")
    got = capabilities.host_features(pc, q35, caps)
    assert got == HostFeatures(machines=["pc", "pc-i440fx-7.2", "pc-q35-7.2", "q35"], uefi=True, secure_boot=True,
                               tpm_versions=["1.2", "2.0"], tpm_models=["tpm-tis", "tpm-crb"])
    bare = "<domainCapabilities><os supported='yes'/><devices><tpm supported='no'/></devices></domainCapabilities>"
    assert capabilities.host_features(bare, None, caps) == HostFeatures(machines=got.machines)
    no_swtpm = pc.replace("<value>emulator</value>", "")
    assert capabilities.host_features(no_swtpm, pc, caps).tpm_versions == []
    assert not capabilities.host_features(pc, pc, caps).secure_boot


VALIDATE = shutil.which("virt-xml-validate")


@pytest.mark.skipif(VALIDATE is None, reason="virt-xml-validate (Debian's libvirt-clients) is not installed")
@pytest.mark.parametrize("over", [
    {"firmware": "uefi", "machine": "q35", "secure_boot": True, "tpm": Tpm("tpm-crb", "2.0"), "watchdog": "pause",
     "rng": Rng(1024, 1000), "video": "virtio", "serial_ports": 4, "topology": CpuTopology(2, 1, 2),
     "boot_menu": True, "pmu": False, "hide_hypervisor": True, "locked_memory": True, "packed_ring": True,
     "limits": Limits(disk_total_bytes_sec=1, disk_total_iops_sec=2)},
    {"firmware": "uefi", "tpm": Tpm("tpm-tis", "1.2"), "rng": Rng(), "video": "none"},
], ids=["everything", "uefi-tis"])
def test_the_devices_domain_xml_is_valid_for_libvirts_schema(tmp_path: Path, over: dict[str, Any]) -> None:
    path = tmp_path / "domain.xml"
    path.write_text(build(kvm_guest(**over)))
    assert VALIDATE is not None
    run = subprocess.run([VALIDATE, str(path), "domain"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_stored_instance_with_a_key_now_refused_keeps_the_default_devices(tmp_path: Path) -> None:
    """An instance an older agent recorded with a key it accepted and dropped (and that a spawn
    would now refuse) is still described, as it was made, rather than failing on restart."""
    def record(specs: dict[str, str]) -> InstanceRecord:
        return InstanceRecord(uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vm_state="active",
                              task_state=None, power_state="running",
                              flavor=Flavor(vcpus=2, memory_mb=64, disk_gb=1, extra_specs=specs), image=Image(id="i"),
                              host="h", numa=None, created_at="t", updated_at="t")

    def spec(specs: dict[str, str]) -> GuestSpec:
        return guest_spec(record(specs), [], tmp_path, disks=[], interfaces=[], claim=None, numa_host=None,
                          virt_type="test")

    old = spec({"hw:mem_encryption": "true", "hw:watchdog_action": "reset"})
    assert (old.watchdog, old.rng, old.firmware) == (None, Rng(), "bios")
    new = spec({"hw:watchdog_action": "reset", "hw:cpu_threads": "2"})
    assert (new.watchdog, new.topology) == ("reset", CpuTopology(1, 1, 2))


SECURITY = ["COMPUTE_SECURITY_TPM_1_2", "COMPUTE_SECURITY_TPM_2_0", "COMPUTE_SECURITY_TPM_CRB",
            "COMPUTE_SECURITY_TPM_TIS", "COMPUTE_SECURITY_UEFI_SECURE_BOOT"]


@pytest.mark.parametrize(("features", "want"), [
    (HostFeatures(uefi=True, secure_boot=True, tpm_versions=["1.2", "2.0"], tpm_models=["tpm-tis", "tpm-crb"]),
     SECURITY),
    (HostFeatures(uefi=True, tpm_versions=["2.0"], tpm_models=["tpm-crb"]),
     ["COMPUTE_SECURITY_TPM_2_0", "COMPUTE_SECURITY_TPM_CRB"]),
    (HostFeatures(uefi=True, secure_boot=True, tpm_models=["tpm-tis"]), ["COMPUTE_SECURITY_UEFI_SECURE_BOOT"]),
    (HostFeatures(secure_boot=True), []),  # a secure flag without OVMF boots nothing
    (HostFeatures(tpm_versions=["1.2", "3.0"], tpm_models=["tpm-spapr"]), ["COMPUTE_SECURITY_TPM_1_2"]),
    (HostFeatures(), []),
], ids=["everything", "tpm2-crb", "secure-boot-no-swtpm", "no-ovmf", "unknown-versions", "nothing"])
def test_tpm_and_secure_boot_traits_follow_the_hosts_features(features: HostFeatures, want: list[str]) -> None:
    assert hardware.security_traits(features) == want


def test_the_hosts_security_traits_are_in_host_info_and_flavors_may_require_them(
        tmp_path: Path, image_file: Path) -> None:
    """The test hypervisor has OVMF with secure boot and swtpm: its agent reports every
    security trait, besides its CPU's, and a flavor requiring one is placed here."""
    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default") as (_agent, client):
            traits = (await client.call("host.info"))["traits"]
            assert set(SECURITY) <= set(traits)
            assert any(t.startswith("HW_CPU_X86_") for t in traits), "the CPU's traits are still there"
            flavor = {"vcpus": 1, "memory_mb": 64, "disk_gb": 1, "extra_specs": {
                "trait:COMPUTE_SECURITY_TPM_2_0": "required", "trait:COMPUTE_SECURITY_UEFI_SECURE_BOOT": "required",
                "hw:tpm_version": "2.0"}}
            rec = await client.call("instance.spawn", {**spawn_args(image_file, flavor=flavor), "wait": True})
            assert rec["vm_state"] == "active"
            flavor["extra_specs"] = {"trait:COMPUTE_SECURITY_TPM_2_0": "forbidden"}
            with pytest.raises(NoCapacity, match="forbidden traits COMPUTE_SECURITY_TPM_2_0"):
                await client.call("instance.spawn", spawn_args(image_file, flavor=flavor))

    asyncio.run(run())


def _mem(split: tuple[int, int]) -> dict[str, str]:
    return {"hw:numa_mem.0": str(split[0]), "hw:numa_mem.1": str(split[1])}


# (vcpus, extra specs with a NUMA request, the topology libvirt must hold)
NUMA_TOPOLOGIES: list[tuple[int, dict[str, str], tuple[int, int, int]]] = [
    (4, {"hw:numa_nodes": "2", "hw:cpu_threads": "2"}, (2, 1, 2)),
    (8, {"hw:numa_nodes": "2", "hw:cpu_sockets": "2", "hw:cpu_threads": "2"}, (2, 2, 2)),
    (6, {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-3", "hw:numa_cpus.1": "4-5", **_mem((32, 32)),
         "hw:cpu_threads": "2"}, (3, 1, 2)),
    # Nova's pick, 1 x 3 x 2, would split core 1 (vCPUs 2 and 3) over the cells 0-2 and 3-5.
    (6, {"hw:numa_nodes": "2", "hw:cpu_max_sockets": "1", "hw:cpu_max_cores": "3"}, (1, 2, 3)),
    (8, {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "require", "hw:numa_nodes": "2",
         "hw:cpu_threads": "2"}, (4, 1, 2)),
]
NUMA_REFUSED: list[tuple[int, dict[str, str], str]] = [
    (4, {"hw:numa_nodes": "2", "hw:cpu_threads": "4"}, "hw:cpu_threads"),
    (6, {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-2", "hw:numa_cpus.1": "3-5", **_mem((32, 32)),
         "hw:cpu_threads": "2"}, "hw:cpu_threads"),
    (4, {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0,2", "hw:numa_cpus.1": "1,3", **_mem((32, 32)),
         "hw:cpu_threads": "2"}, "hw:cpu_threads"),
    (4, {"hw:numa_nodes": "2", "hw:cpu_max_sockets": "1", "hw:cpu_max_cores": "1"}, "hw:cpu_max_cores"),
    (8, {"hw:cpu_policy": "dedicated", "hw:numa_nodes": "4", "hw:cpu_sockets": "1", "hw:cpu_cores": "2"},
     "hw:cpu_cores"),
]


def _cores_split(root: ET.Element) -> list[int]:
    """The cores (by QEMU's numbering of vCPUs) whose threads are in more than one of the
    domain's NUMA cells."""
    t = root.find("cpu/topology")
    assert t is not None
    threads = int(t.get("threads", "1"))
    cell_of = {vcpu: cell.get("id") for cell in root.findall("cpu/numa/cell")
               for vcpu in cpusets.parse(cell.get("cpus", ""))}
    vcpus = int(root.findtext("vcpu") or "0")
    assert sorted(cell_of) == list(range(vcpus)), "the cells hold every vCPU"
    return [core for core in range(vcpus // threads)
            if len({cell_of[core * threads + n] for n in range(threads)}) > 1]


def test_numa_guests_cells_hold_whole_cores_of_their_topology(tmp_path: Path, image_file: Path) -> None:
    """The <cpu><topology> and <numa><cell>s libvirt holds agree: no core's threads in two
    cells; a flavor that cannot have that is BAD_REQUEST naming the key that forces it, and
    records nothing."""
    uri = write_test_host(tmp_path / "host.xml")

    async def run() -> list[ET.Element]:
        async with running_agent(tmp_path, '[resources]\ncpu_dedicated_set = "8-31,40-63"\n', uri) as (agent, client):
            roots = []
            for i, (vcpus, specs, _want) in enumerate(NUMA_TOPOLOGIES):
                flavor = {"vcpus": vcpus, "memory_mb": 64, "disk_gb": 1, "extra_specs": specs}
                rec = await client.call("instance.spawn", spawn_args(image_file, name=f"n{i}", flavor=flavor,
                                                                     wait=True))
                assert rec["vm_state"] == "active", (specs, rec)
                roots.append(ET.fromstring(await agent.driver.domain_xml(rec["uuid"])))
            for vcpus, specs, key in NUMA_REFUSED:
                flavor = {"vcpus": vcpus, "memory_mb": 64, "disk_gb": 1, "extra_specs": specs}
                with pytest.raises(BadRequest) as info:
                    await client.call("instance.spawn", spawn_args(image_file, flavor=flavor))
                details = info.value.details or {}
                assert details.get("field") == f"args.flavor.extra_specs.{key}", (specs, details)
                assert "whole cores" in str(details.get("reason")), details
            assert len(await client.call("instance.list")) == len(NUMA_TOPOLOGIES)
            return roots

    for root, (_vcpus, specs, want) in zip(asyncio.run(run()), NUMA_TOPOLOGIES, strict=True):
        t = root.find("cpu/topology")
        assert t is not None, specs
        assert (int(t.get("sockets", "0")), int(t.get("cores", "0")), int(t.get("threads", "0"))) == want, specs
        assert len(root.findall("cpu/numa/cell")) == int(specs["hw:numa_nodes"]), specs
        assert _cores_split(root) == [], specs


def test_a_numa_guest_without_topology_keys_keeps_libvirts_one_socket_per_vcpu() -> None:
    assert hardware.topology({"hw:numa_nodes": "2"}, 4, ((0, 1), (2, 3))) is None
    assert hardware.topology({"hw:cpu_threads": "2"}, 4) == CpuTopology(2, 1, 2)
    assert hardware.topology({"hw:cpu_max_sockets": "1", "hw:cpu_max_cores": "3"}, 6) == CpuTopology(1, 3, 2), \
        "without NUMA cells Nova's pick stands"


def test_a_stored_numa_instance_whose_topology_splits_a_core_keeps_it_and_its_devices(tmp_path: Path) -> None:
    """An instance an older agent made with a core across two NUMA cells is described as it was
    made (its topology and devices) rather than refused or stripped on restart."""
    specs = {"hw:numa_nodes": "2", "hw:cpu_threads": "4", "hw:watchdog_action": "reset"}
    request = numa.constraints({"vcpus": 4, "memory_mb": 64, "extra_specs": specs})
    rec = InstanceRecord(uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vm_state="active", task_state=None,
                         power_state="running", flavor=Flavor(vcpus=4, memory_mb=64, disk_gb=1, extra_specs=specs),
                         image=Image(id="i"), host="h", numa=None, created_at="t", updated_at="t")
    claim = Claim(project_id="p", resources={"VCPU": 4, "MEMORY_MB": 64}, vcpus=4, memory_mb=64,
                  numa_request=request)
    spec = guest_spec(rec, [], tmp_path, disks=[], interfaces=[], claim=claim, numa_host=None, virt_type="test")
    assert (spec.topology, spec.watchdog) == (CpuTopology(1, 1, 4), "reset")
