"""The domain XML the agent writes is accepted by libvirt and says what the claim decided."""

from __future__ import annotations

import uuid as uuid_mod
import xml.etree.ElementTree as ET

import libvirt

from fastcompute.hypervisor.libvirt.xml import DiskSpec, DomainSpec, GuestCell, Interface, build, cpulist


def test_cpulist_compresses_runs() -> None:
    assert cpulist([5, 0, 1, 2, 3, 8, 9]) == "0-3,5,8-9"
    assert cpulist([]) == ""


def test_numa_pinned_guest_round_trips_through_libvirt() -> None:
    u = str(uuid_mod.uuid4())
    spec = DomainSpec(
        uuid=u, name="vm", instance_name="web <1> & 'x'", project_id="p", vcpus=4, memory_mb=2048,
        disk=DiskSpec("/var/lib/x/disk", "qcow2"), console_path="/var/lib/x/console.log",
        numa=[GuestCell(0, [0, 1], 1024, 0, 2048), GuestCell(1, [2, 3], 1024, 1, 2048)],
        vcpupin={0: [4], 1: [5], 2: [12], 3: [13]}, emulatorpin=[4, 5, 12, 13],
        cputune={"cpu_shares": 2048, "cpu_quota": 50000, "cpu_period": 100000},
        iotune={"read_iops_sec": 100, "write_bytes_sec": 1 << 20},
        interfaces=[Interface("tapabc", "52:54:00:00:00:01", 1450)],
    )
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(build(spec))
        try:
            root = ET.fromstring(dom.XMLDesc())
        finally:
            dom.undefine()
    finally:
        conn.close()
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
        spec = DomainSpec(uuid=str(uuid_mod.uuid4()), name="vm", instance_name="vm", project_id="p", vcpus=1,
                          memory_mb=64, disk=None, console_path="/var/lib/x/console.log", **over)  # type: ignore[arg-type]
        conn = libvirt.open("test:///default")
        try:
            dom = conn.defineXML(build(spec))
            try:
                return ET.fromstring(dom.XMLDesc())
            finally:
                dom.undefine()
        finally:
            conn.close()

    root = defined(oem_strings=["fc.ip=10.0.0.2/24", "a<b&c"])
    assert [e.text for e in root.findall("sysinfo[@type='smbios']/oemStrings/entry")] == ["fc.ip=10.0.0.2/24", "a<b&c"]
    assert root.find("os/smbios").get("mode") == "sysinfo"  # type: ignore[union-attr]
    plain = defined()
    assert plain.find("sysinfo") is None and plain.find("os/smbios") is None
