"""Volumes through real agents on libvirt's test hypervisor: every connection type's disk as
libvirt holds it, bad input refused with nothing half attached, attach/detach/extend on running
and stopped instances, restarts, delete, and booting from a volume without local disk.

The tests that read domain XML run the agent in this process (libvirt's test hypervisor lives
inside the agent's process); the others run agents as subprocesses, as a client sees them.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import msgspec
import pytest
from agent_fixtures import AgentProcess, call_error, spawn_args, spawn_in_state
from test_guest_cpu import VALIDATE, kvm_guest, running_agent

from fastcompute.compute.records import VolumeConnection
from fastcompute.compute.volumes import disk_of
from fastcompute.errors import BadRequest, Conflict, NotFound
from fastcompute.hypervisor.libvirt.xml import build
from fastcompute.protocol.volumes import ConnectionInfo, VolumeRecord

PASSWORD = "chap-secret-0123"
ISCSI = {"driver_volume_type": "iscsi", "data": {
    "target_portal": "127.0.0.1:3260", "target_iqn": "iqn.2026-12.org.fastcompute:vol1", "target_lun": 1,
    "auth_method": "CHAP", "auth_username": "fcuser", "auth_password": PASSWORD,
    "qos_specs": {"total_bytes_sec": "10485760", "read_iops_sec": 200, "consumer_thing": "x"},
    "discard": True, "target_discovered": False, "volume_id": "v-iscsi"}}
NBD = {"driver_volume_type": "nbd", "data": {"host": "127.0.0.1", "port": 10810, "export_name": "vol2"}}
RBD = {"driver_volume_type": "rbd", "data": {
    "name": "volumes/volume-3", "hosts": ["10.0.0.1", "10.0.0.2"], "ports": ["6789", "6789"],
    "auth_enabled": True, "auth_username": "cinder", "secret_uuid": "7a6e5f4d-3c2b-1a09-8877-665544332211",
    "access_mode": "ro", "cluster_name": "ceph"}}


def local(path: Path, kind: str = "local") -> dict[str, Any]:
    return {"driver_volume_type": kind, "data": {"device_path": str(path)}}


def volume(vid: str, info: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {"id": vid, "connection_info": info, **over}


def disks_of(xml: str) -> dict[str, ET.Element]:
    """A domain's disks by their device name."""
    out = {}
    for d in ET.fromstring(xml).iterfind("devices/disk"):
        target = d.find("target")
        assert target is not None
        out[target.get("dev", "")] = d
    return out


def test_every_connection_type_is_the_disk_libvirt_holds(tmp_path: Path, image_file: Path) -> None:
    lun = tmp_path / "lun.img"
    lun.write_bytes(b"\0" * 4096)

    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default") as (agent, client):
            rec = await client.call("instance.spawn", spawn_args(image_file, wait=True))
            uuid = rec["uuid"]
            for vid, info, extra in (("v-iscsi", ISCSI, {}), ("v-nbd", NBD, {"serial": "nbd-serial"}),
                                     ("v-rbd", RBD, {"device_name": "/dev/sdb", "bus": "scsi"}),
                                     ("v-local", local(lun), {"read_only": True}),
                                     ("v-file", local(lun, "file"), {"device_name": "vdk"})):
                rec = await client.call("instance.attach_volume", {"uuid": uuid, "volume": volume(vid, info, **extra)})
            assert [(v["volume_id"], v["device_name"], v["status"]) for v in rec["volumes"]] == [
                ("v-iscsi", "/dev/vdb", "attached"), ("v-nbd", "/dev/vdc", "attached"),
                ("v-rbd", "/dev/sdb", "attached"), ("v-local", "/dev/vdd", "attached"),
                ("v-file", "/dev/vdk", "attached")]
            # The record tells clients what is attached, never how it is reached.
            assert PASSWORD not in repr(rec) and "connection_info" not in repr(rec)
            disks = disks_of(await agent.driver.domain_xml(uuid, persistent=True))
            assert set(disks) == {"vda", "vdb", "vdc", "sdb", "vdd", "vdk", "hda"}

            iscsi = disks["vdb"]
            assert iscsi.get("type") == "network"
            src = iscsi.find("source")
            assert src is not None and src.get("protocol") == "iscsi"
            assert src.get("name") == "iqn.2026-12.org.fastcompute:vol1/1"
            host = src.find("host")
            assert host is not None and (host.get("name"), host.get("port")) == ("127.0.0.1", "3260")
            auth = iscsi.find("auth")
            secret = auth.find("secret") if auth is not None else None
            assert auth is not None and auth.get("username") == "fcuser"
            assert secret is not None and secret.get("type") == "iscsi" and secret.get("uuid")
            assert iscsi.findtext("serial") == "v-iscsi"
            assert iscsi.findtext("iotune/total_bytes_sec") == "10485760"
            assert iscsi.findtext("iotune/read_iops_sec") == "200"
            driver = iscsi.find("driver")
            assert driver is not None and driver.get("discard") == "unmap"

            nbd = disks["vdc"].find("source")
            assert nbd is not None and (nbd.get("protocol"), nbd.get("name")) == ("nbd", "vol2")
            assert [h.get("port") for h in nbd.iterfind("host")] == ["10810"]
            assert disks["vdc"].findtext("serial") == "nbd-serial"

            rbd = disks["sdb"]
            rsrc = rbd.find("source")
            assert rsrc is not None and (rsrc.get("protocol"), rsrc.get("name")) == ("rbd", "volumes/volume-3")
            assert [h.get("name") for h in rsrc.iterfind("host")] == ["10.0.0.1", "10.0.0.2"]
            rsecret = rbd.find("auth/secret")
            assert rsecret is not None and rsecret.get("type") == "ceph"
            assert rsecret.get("uuid") == RBD["data"]["secret_uuid"]  # type: ignore[index]
            assert rbd.find("readonly") is not None  # access_mode ro
            target = rbd.find("target")
            assert target is not None and target.get("bus") == "scsi"

            lsrc = disks["vdd"].find("source")
            assert disks["vdd"].get("type") == "file" and lsrc is not None and lsrc.get("file") == str(lun)
            assert disks["vdd"].find("readonly") is not None
            assert disks["vdk"].get("type") == "file"

            for vid in ("v-iscsi", "v-rbd", "v-file"):
                rec = await client.call("instance.detach_volume", {"uuid": uuid, "volume_id": vid})
            assert [v["volume_id"] for v in rec["volumes"]] == ["v-nbd", "v-local"]
            assert set(disks_of(await agent.driver.domain_xml(uuid, persistent=True))) == {"vda", "vdc", "vdd", "hda"}

    asyncio.run(run())


def test_a_restarted_agent_defines_the_volumes_its_record_has(tmp_path: Path, image_file: Path) -> None:
    async def first() -> str:
        async with running_agent(tmp_path, "", "test:///default") as (_agent, client):
            rec = await client.call("instance.spawn", spawn_args(image_file, wait=True))
            await client.call("instance.attach_volume", {"uuid": rec["uuid"], "volume": volume("v1", NBD)})
            await client.call("instance.attach_volume", {"uuid": rec["uuid"], "volume": volume("v2", ISCSI)})
            await client.call("instance.detach_volume", {"uuid": rec["uuid"], "volume_id": "v1"})
            return str(rec["uuid"])

    async def second(uuid: str) -> None:
        # The test hypervisor went with the first agent: the domain is re-created from the record.
        async with running_agent(tmp_path, "", "test:///default") as (agent, client):
            rec = await client.call("instance.get", {"uuid": uuid})
            assert [(v["volume_id"], v["device_name"]) for v in rec["volumes"]] == [("v2", "/dev/vdc")]
            disks = disks_of(await agent.driver.domain_xml(uuid, persistent=True))
            assert set(disks) == {"vda", "vdc", "hda"}
            src = disks["vdc"].find("source")
            assert src is not None and src.get("protocol") == "iscsi"

    uuid = asyncio.run(first())
    asyncio.run(second(uuid))


def test_boot_from_volume_has_no_local_root_and_claims_no_disk(tmp_path: Path) -> None:
    bdm = [{"boot_index": 0, "source_type": "volume", "destination_type": "volume", "volume_id": "root-vol",
            "connection_info": ISCSI, "delete_on_termination": True},
           {"boot_index": -1, "source_type": "volume", "destination_type": "volume", "volume_id": "data-vol",
            "connection_info": NBD}]

    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default") as (agent, client):
            before = (await client.call("host.info"))["usage"]
            args = {"name": "bfv", "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 20}, "image": {},
                    "block_device_mapping": bdm, "wait": True}
            rec = await client.call("instance.spawn", args)
            assert rec["vm_state"] == "active", rec
            usage = (await client.call("host.info"))["usage"]
            assert usage["DISK_GB"] == before["DISK_GB"] and usage["MEMORY_MB"] == before["MEMORY_MB"] + 64
            assert [(v["volume_id"], v["device_name"], v["boot_index"]) for v in rec["volumes"]] == [
                ("root-vol", "/dev/vda", 0), ("data-vol", "/dev/vdb", None)]
            disks = disks_of(await agent.driver.domain_xml(rec["uuid"], persistent=True))
            assert set(disks) == {"vda", "vdb", "hda"}
            boot = disks["vda"].find("boot")
            assert disks["vda"].get("type") == "network" and boot is not None and boot.get("order") == "1"
            # No local root disk was made.
            assert not (tmp_path / "state" / "instances" / rec["uuid"] / "disk").exists()
            with pytest.raises(Conflict):
                await client.call("instance.detach_volume", {"uuid": rec["uuid"], "volume_id": "root-vol"})
            await client.call("instance.reboot", {"uuid": rec["uuid"], "hard": True})
            assert set(disks_of(await agent.driver.domain_xml(rec["uuid"], persistent=True))) == {"vda", "vdb", "hda"}
            await client.call("instance.delete", {"uuid": rec["uuid"]})
            assert (await client.call("host.info"))["usage"] == before

    asyncio.run(run())


def _without(info: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(info)
    del out["data"][key]
    return out


def _with(info: dict[str, Any], **data: Any) -> dict[str, Any]:
    out = copy.deepcopy(info)
    out["data"].update(data)
    return out


BAD = [
    (volume("v", {"driver_volume_type": "fibre_channel", "data": {}}),
     "args.volume.connection_info.driver_volume_type"),
    (volume("v", _without(ISCSI, "target_iqn")), "args.volume.connection_info.data.target_iqn"),
    (volume("v", _without(ISCSI, "auth_password")), "args.volume.connection_info.data.auth_password"),
    (volume("v", _with(ISCSI, target_portal="127.0.0.1:99999")), "args.volume.connection_info.data.target_portal"),
    (volume("v", _with(ISCSI, encrypted=True)), "args.volume.connection_info.data.encrypted"),
    (volume("v", _with(ISCSI, qos_specs={"total_iops_sec": "lots"})),
     "args.volume.connection_info.data.qos_specs.total_iops_sec"),
    (volume("v", _with(RBD, ports=["6789"])), "args.volume.connection_info.data.ports"),
    (volume("v", _without(RBD, "secret_uuid")), "args.volume.connection_info.data.secret_uuid"),
    (volume("v", _without(NBD, "host")), "args.volume.connection_info.data.host"),
    (volume("v", {"driver_volume_type": "local", "data": {"device_path": "relative/path"}}),
     "args.volume.connection_info.data.device_path"),
    (volume("v", NBD, device_name="/dev/sdc"), "args.volume.device_name"),
    (volume("v", NBD, bus="ide"), "args.volume.bus"),
    (volume("v", NBD, size=1), "args.volume.size"),
    ({"connection_info": NBD}, "args.volume.id"),
]


def test_bad_volumes_are_bad_requests_naming_the_field_and_nothing_is_attached(
        agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    uuid = rec["uuid"]
    for vol, field in BAD:
        err = call_error(agent, "instance.attach_volume", {"uuid": uuid, "volume": vol})
        assert isinstance(err, BadRequest) and err.details["field"] == field, (field, err)
    missing = call_error(agent, "instance.attach_volume",
                         {"uuid": uuid, "volume": volume("v", local(tmp_path / "no-such-file"))})
    assert isinstance(missing, NotFound) and missing.details["field"].endswith("device_path")
    assert agent.call("instance.get", {"uuid": uuid})["volumes"] == []

    agent.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v", NBD, device_name="vdf")})
    assert isinstance(call_error(agent, "instance.attach_volume", {"uuid": uuid, "volume": volume("v", NBD)}), Conflict)
    taken = call_error(agent, "instance.attach_volume", {"uuid": uuid, "volume": volume("w", NBD, device_name="vdf")})
    assert isinstance(taken, Conflict) and taken.details["field"] == "args.volume.device_name"
    assert isinstance(call_error(agent, "instance.detach_volume", {"uuid": uuid, "volume_id": "nope"}), NotFound)
    assert isinstance(call_error(agent, "instance.extend_volume",
                                 {"uuid": uuid, "volume_id": "nope", "new_size_bytes": 1 << 30}), NotFound)
    nobody = "00000000-0000-0000-0000-000000000000"
    assert isinstance(call_error(agent, "instance.attach_volume", {"uuid": nobody, "volume": volume("x", NBD)}),
                      NotFound)
    assert [v["volume_id"] for v in agent.call("instance.get", {"uuid": uuid})["volumes"]] == ["v"]


BAD_MAPPINGS = [
    ([{"source_type": "volume", "boot_index": 0, "connection_info": NBD}], "args.block_device_mapping[0].volume_id"),
    ([{"source_type": "volume", "boot_index": 0, "volume_id": "a"}], "args.block_device_mapping[0].connection_info"),
    ([{"source_type": "blank", "destination_type": "local"}], "args.block_device_mapping[0].source_type"),
    ([{"source_type": "volume", "boot_index": 0, "volume_id": "a", "connection_info": NBD},
      {"source_type": "volume", "boot_index": 0, "volume_id": "b", "connection_info": NBD}],
     "args.block_device_mapping"),
    ([{"source_type": "volume", "volume_id": "a", "connection_info": NBD},
      {"source_type": "volume", "volume_id": "a", "connection_info": NBD}], "args.block_device_mapping[1].volume_id"),
    ([{"source_type": "volume", "volume_id": "a", "connection_info": _without(NBD, "host")}],
     "args.block_device_mapping[0].connection_info.data.host"),
    ([{"source_type": "image", "destination_type": "local", "boot_index": 1}],
     "args.block_device_mapping[0].boot_index"),
]


def test_bad_block_device_mappings_are_bad_requests_and_claim_nothing(agent: AgentProcess, image_file: Path) -> None:
    before = agent.call("host.info")["usage"]
    for mapping, field in BAD_MAPPINGS:
        err = call_error(agent, "instance.spawn", spawn_args(image_file, block_device_mapping=mapping))
        assert isinstance(err, BadRequest) and err.details["field"] == field, (field, err)
    # Without a boot volume the image is needed, as without a mapping.
    no_image = call_error(agent, "instance.spawn", {**spawn_args(image_file), "image": {}})
    assert isinstance(no_image, BadRequest) and no_image.details["field"] == "args.image"
    assert agent.call("host.info")["usage"] == before
    assert agent.call("instance.list") == []


@pytest.mark.parametrize("state", ["active", "stopped"])
def test_attach_extend_detach_on_a_running_and_a_stopped_instance(agent: AgentProcess, image_file: Path,
                                                                   state: str) -> None:
    rec = spawn_in_state(agent, image_file, state)
    uuid = rec["uuid"]
    rec = agent.call("instance.attach_volume", {"uuid": uuid, "volume": volume("data", ISCSI)})
    assert rec["vm_state"] == state and rec["task_state"] is None
    assert rec["volumes"][0]["status"] == "attached" and rec["volumes"][0]["serial"] == "data"
    rec = agent.call("instance.extend_volume", {"uuid": uuid, "volume_id": "data", "new_size_bytes": 2 << 30})
    assert rec["volumes"][0]["size_bytes"] == 2 << 30
    shrink = call_error(agent, "instance.extend_volume", {"uuid": uuid, "volume_id": "data", "new_size_bytes": 1 << 30})
    assert isinstance(shrink, BadRequest) and shrink.details["field"] == "args.new_size_bytes"
    agent.restart()
    rec = agent.call("instance.get", {"uuid": uuid})
    assert rec["vm_state"] == state
    assert [(v["volume_id"], v["size_bytes"], v["status"]) for v in rec["volumes"]] == [("data", 2 << 30, "attached")]
    if state == "stopped":
        assert agent.call("instance.start", {"uuid": uuid})["vm_state"] == "active"
    rec = agent.call("instance.detach_volume", {"uuid": uuid, "volume_id": "data"})
    assert rec["volumes"] == []
    agent.restart()
    assert agent.call("instance.get", {"uuid": uuid})["volumes"] == []


def test_volumes_need_an_instance_that_runs_or_is_stopped(agent: AgentProcess, image_file: Path) -> None:
    rec = spawn_in_state(agent, image_file, "suspended")
    err = call_error(agent, "instance.attach_volume", {"uuid": rec["uuid"], "volume": volume("v", NBD)})
    assert isinstance(err, Conflict) and err.details["vm_state"] == "suspended"


def test_delete_of_an_instance_with_volumes_leaves_nothing(agent: AgentProcess, image_file: Path) -> None:
    before = agent.call("host.info")["usage"]
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    agent.call("instance.attach_volume", {"uuid": rec["uuid"], "volume": volume("v", ISCSI)})
    agent.call("instance.delete", {"uuid": rec["uuid"]})
    assert agent.call("instance.list") == []
    assert agent.call("host.info")["usage"] == before
    # The volume can go to another instance at once.
    other = agent.call("instance.spawn", spawn_args(image_file, name="other", wait=True))
    rec = agent.call("instance.attach_volume", {"uuid": other["uuid"], "volume": volume("v", ISCSI)})
    assert [v["volume_id"] for v in rec["volumes"]] == ["v"]


def test_cli_verbs_attach_extend_and_detach(agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    import json
    import sys

    rec = agent.call("instance.spawn", spawn_args(image_file, name="clivm", wait=True))
    info = tmp_path / "conn.json"
    info.write_text(json.dumps(NBD))
    def cli(verb: str, *args: str) -> Any:
        done = subprocess.run([sys.executable, "-m", "fastcompute.cli", verb, "--endpoint", agent.control, "--json",
                               *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    out = cli("attach-volume", "clivm", "vol9", "--connection-info", f"@{info}", "--device-name", "/dev/vde")
    assert [(v["volume_id"], v["device_name"]) for v in out["volumes"]] == [("vol9", "/dev/vde")]
    out = cli("extend-volume", "clivm", "vol9", str(3 << 30))
    assert out["volumes"][0]["size_bytes"] == 3 << 30
    out = cli("detach-volume", "clivm", "vol9")
    assert out["volumes"] == []
    assert rec["uuid"] == out["uuid"]


@pytest.mark.skipif(VALIDATE is None, reason="virt-xml-validate (Debian's libvirt-clients) is not installed")
def test_every_volume_disk_is_valid_for_libvirts_schema(tmp_path: Path) -> None:
    """The volume disks of a QEMU guest (CHAP and cephx auth, QoS, discard, serial, alias,
    read-only, SCSI) against libvirt's own RelaxNG schema."""
    instance = str(uuid_mod.uuid4())
    lun = tmp_path / "lun.img"
    lun.write_bytes(b"\0" * 4096)
    vols = []
    for i, (vid, info, bus) in enumerate((("v-iscsi", ISCSI, "virtio"), ("v-nbd", NBD, "virtio"),
                                          ("v-rbd", RBD, "scsi"), ("v-file", local(lun, "file"), "virtio"))):
        conn = VolumeConnection(connection_info=msgspec.convert(info, ConnectionInfo), source_kind="file")
        rec = VolumeRecord(volume_id=vid, driver_volume_type=info["driver_volume_type"],
                           device_name=f"/dev/{'sd' if bus == 'scsi' else 'vd'}{'bcde'[i]}", bus=bus,
                           serial=vid, read_only=vid == "v-rbd")
        vols.append(disk_of(instance, rec, conn))
    spec = kvm_guest(uuid=instance, virt_type="qemu", cpu_mode="custom", cpu_model="qemu64", cpu_features=[],
                     disks=[*kvm_guest().disks, *vols])
    path = tmp_path / "domain.xml"
    path.write_text(build(spec))
    assert VALIDATE is not None
    run = subprocess.run([VALIDATE, str(path), "domain"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    disks = disks_of(path.read_text())
    assert {"vdb", "vdc", "sdd", "vde"} <= set(disks)
    alias = disks["vdb"].find("alias")
    assert alias is not None and alias.get("name", "").startswith("ua-vol-")
