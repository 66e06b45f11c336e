"""The domain XML the libvirt driver writes is accepted by libvirt and says what the claim decided."""

from __future__ import annotations

import uuid as uuid_mod
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from fastcompute.hypervisor.libvirt.xml import build, cpulist
from fastcompute.hypervisor.spec import Disk, GuestCell, GuestSpec, Interface, Limits
from fastcompute.images import disks


def _defined(spec: GuestSpec) -> ET.Element:
    """The domain as libvirt's test driver keeps it after defining ``build(spec)``."""
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(build(spec))
        try:
            return ET.fromstring(dom.XMLDesc())
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_cpulist_compresses_runs() -> None:
    assert cpulist([5, 0, 1, 2, 3, 8, 9]) == "0-3,5,8-9"
    assert cpulist([]) == ""


def test_numa_pinned_guest_round_trips_through_libvirt() -> None:
    u = str(uuid_mod.uuid4())
    spec = GuestSpec(
        uuid=u, name="web <1> & 'x'", project_id="p", vcpus=4, memory_mb=2048,
        disks=[Disk(role="root", source="/var/lib/x/disk", format="qcow2")], console_path="/var/lib/x/console.log",
        cells=[GuestCell(0, [0, 1], 1024, 0, 2048), GuestCell(1, [2, 3], 1024, 1, 2048)],
        vcpupin={0: [4], 1: [5], 2: [12], 3: [13]}, emulatorpin=[4, 5, 12, 13],
        limits=Limits(cpu_shares=2048, cpu_quota=50000, cpu_period=100000,
                      disk_read_iops_sec=100, disk_write_bytes_sec=1 << 20),
        interfaces=[Interface("tapabc", "52:54:00:00:00:01", 1450)],
    )
    root = _defined(spec)
    assert root.findtext("uuid") == u
    assert {p.get("vcpu"): p.get("cpuset") for p in root.findall("cputune/vcpupin")} == {
        "0": "4", "1": "5", "2": "12", "3": "13"}
    assert root.find("cputune/emulatorpin").get("cpuset") == "4-5,12-13"
    assert root.findtext("cputune/shares") == "2048"
    assert root.findtext("cputune/quota") == "50000"
    assert [(c.get("id"), c.get("cpus")) for c in root.findall("cpu/numa/cell")] == [("0", "0-1"), ("1", "2-3")]
    assert [(m.get("cellid"), m.get("nodeset")) for m in root.findall("numatune/memnode")] == [("0", "0"), ("1", "1")]
    assert [p.get("size") for p in root.findall("memoryBacking/hugepages/page")] == ["2048", "2048"]
    assert root.findtext("devices/disk/iotune/read_iops_sec") == "100"
    assert root.find("devices/interface/target").get("dev") == "tapabc"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:00:00:01"
    name = root.find("metadata/{http://fastcompute.org/xmlns/instance/1.0}instance")
    assert name is not None and name.findtext("{http://fastcompute.org/xmlns/instance/1.0}name") == "web <1> & 'x'"
    assert root.findtext("on_poweroff") == "destroy" and root.findtext("on_crash") == "destroy"


def test_address_hints_reach_the_guest_as_smbios_oem_strings() -> None:
    def defined(**over: object) -> ET.Element:
        spec = GuestSpec(uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vcpus=1,
                         memory_mb=64, console_path="/var/lib/x/console.log", **over)  # type: ignore[arg-type]
        return _defined(spec)

    root = defined(oem_strings=["fc.ip=10.0.0.2/24", "a<b&c"])
    assert [e.text for e in root.findall("sysinfo[@type='smbios']/oemStrings/entry")] == ["fc.ip=10.0.0.2/24", "a<b&c"]
    assert root.find("os/smbios").get("mode") == "sysinfo"  # type: ignore[union-attr]
    plain = defined()
    assert plain.find("sysinfo") is None and plain.find("os/smbios") is None


def _disks(root: ET.Element) -> list[dict[str, str | None]]:
    out = []
    for d in root.findall("devices/disk"):
        src, tgt, boot = d.find("source"), d.find("target"), d.find("boot")
        assert src is not None and tgt is not None
        out.append({"type": d.get("type"), "device": d.get("device"), "dev": tgt.get("dev"), "bus": tgt.get("bus"),
                    "source": src.get("file") or src.get("dev") or src.get("name"),
                    "format": d.find("driver").get("type"),  # type: ignore[union-attr]
                    "boot": boot.get("order") if boot is not None else None,
                    "readonly": "yes" if d.find("readonly") is not None else None})
    return out


def test_several_disks_with_boot_order_round_trip_through_libvirt() -> None:
    idir = Path("/var/lib/fc/instances/x")
    spec = GuestSpec(
        uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vcpus=1, memory_mb=64, console_path="/c.log",
        disks=[
            disks.file_disk(idir, "rescue", "qcow2", boot_order=1),
            disks.file_disk(idir, "root", "qcow2", boot_order=2),
            disks.file_disk(idir, "ephemeral", "qcow2"),
            disks.file_disk(idir, "config", "qcow2"),
            Disk(role="volume", source="/dev/mapper/vol", source_kind="block"),
            Disk(role="volume", source="pool/vol-2", source_kind="network", protocol="rbd",
                 hosts=[("10.0.0.9", 6789)], bus="scsi"),
        ],
        limits=Limits(disk_read_iops_sec=50),
    )
    root = _defined(spec)
    # libvirt keeps disks grouped by bus, whatever order they were given in
    by_dev = sorted(_disks(root), key=lambda d: str(d["dev"]))
    assert by_dev == [
        # the config drive's role fixes its format, device and bus, whatever the instance disks are
        {"type": "file", "device": "cdrom", "dev": "hda", "bus": "ide", "source": str(idir / "disk.config"),
         "format": "raw", "boot": None, "readonly": "yes"},
        {"type": "network", "device": "disk", "dev": "sda", "bus": "scsi", "source": "pool/vol-2",
         "format": "raw", "boot": None, "readonly": None},
        {"type": "file", "device": "disk", "dev": "vda", "bus": "virtio", "source": str(idir / "disk.rescue"),
         "format": "qcow2", "boot": "1", "readonly": None},
        {"type": "file", "device": "disk", "dev": "vdb", "bus": "virtio", "source": str(idir / "disk"),
         "format": "qcow2", "boot": "2", "readonly": None},
        {"type": "file", "device": "disk", "dev": "vdc", "bus": "virtio", "source": str(idir / "disk.local"),
         "format": "qcow2", "boot": None, "readonly": None},
        {"type": "block", "device": "disk", "dev": "vdd", "bus": "virtio", "source": "/dev/mapper/vol",
         "format": "raw", "boot": None, "readonly": None},
    ]
    # per-device boot orders replace the <os> boot device (libvirt refuses both)
    assert root.find("os/boot") is None
    host = root.find("devices/disk[@type='network']/source/host")
    assert host is not None and (host.get("name"), host.get("port")) == ("10.0.0.9", "6789")
    assert [d.findtext("iotune/read_iops_sec") for d in root.findall("devices/disk")] == ["50"] * 6


def test_a_spawned_instance_boots_from_its_one_root_disk() -> None:
    idir = Path("/var/lib/fc/instances/y")
    spec = GuestSpec(uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vcpus=1, memory_mb=64,
                     console_path="/c.log", disks=disks.spawn_disks(idir, "qcow2"))
    assert _disks(_defined(spec)) == [
        {"type": "file", "device": "disk", "dev": "vda", "bus": "virtio", "source": str(idir / "disk"),
         "format": "qcow2", "boot": "1", "readonly": None}]


def test_twenty_seven_disks_get_distinct_names() -> None:
    spec = GuestSpec(uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vcpus=1, memory_mb=64,
                     console_path="/c.log",
                     disks=[Disk(role="volume", source=f"/v/{i}") for i in range(27)])
    names = sorted((str(d["dev"]) for d in _disks(_defined(spec))), key=lambda n: (len(n), n))
    assert names[:2] == ["vda", "vdb"] and names[25:] == ["vdz", "vdaa"]


def test_machine_firmware_and_cpu_model_reach_the_domain() -> None:
    spec = GuestSpec(uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vcpus=2, memory_mb=64,
                     console_path="/c.log", machine="pc", cpu_model="Haswell",
                     cells=[GuestCell(0, [0, 1], 64, 0)])
    root = _defined(spec)
    assert root.find("os/type").get("machine") == "pc"  # type: ignore[union-attr]
    assert root.findtext("cpu/model") == "Haswell"
    assert [c.get("cpus") for c in root.findall("cpu/numa/cell")] == ["0-1"]
