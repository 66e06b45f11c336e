"""Volumes through the other workflows, on real agents on libvirt's test hypervisor: rescue
(volumes stay, the rescue disk boots), rebuild (volumes stay; a volume-backed instance is
refused), snapshot (the root disk only; a volume-backed instance is refused), shelve and
unshelve (volumes disconnected with the domain and connected again; a volume-backed instance
is offloaded at once and claims no DISK_GB), and the scheduler's disk filter.

The agents run in this process: the domain XML is read from libvirt's test hypervisor, which
lives in the agent's process.
"""

from __future__ import annotations

import asyncio
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import call_error, spawn_args, wait_for_state
from glance_fixtures import Glance, glance
from image_workflow_fixtures import download, glance_config, glance_images, write_marker
from scheduler_fixtures import agent_config
from test_agent_migration import pair
from test_agent_volumes import ISCSI, NBD, _with, local, volume
from test_guest_cpu import running_agent

from fastcompute.errors import BadRequest, Conflict
from fastcompute.scheduler.fleet import Endpoint, NoValidHost, Scheduler

__all__ = ["glance"]

MiB = 1 << 20
CONFIG = ("hda", "disk.config", None)


def _bfv(**over: Any) -> dict[str, Any]:
    """A spawn booting from an iSCSI volume, an NBD volume second."""
    bdm = [{"boot_index": 0, "source_type": "volume", "destination_type": "volume", "volume_id": "root-vol",
            "connection_info": ISCSI},
           {"boot_index": -1, "source_type": "volume", "destination_type": "volume", "volume_id": "data-vol",
            "connection_info": NBD}]
    return {"name": "bfv", "flavor": {"vcpus": 1, "memory_mb": 64, "disk_gb": 20}, "image": {},
            "block_device_mapping": bdm, "wait": True, **over}


def _layout(xml: str) -> list[tuple[str, str, str | None]]:
    """A domain's disks as libvirt holds them (ordered by bus and device name): device name,
    what backs it (a file's name, a network disk's protocol), its boot order."""
    out = []
    for d in ET.fromstring(xml).iterfind("devices/disk"):
        target, source, boot = d.find("target"), d.find("source"), d.find("boot")
        assert target is not None and source is not None
        what = source.get("protocol") or Path(source.get("file") or source.get("dev") or "").name
        out.append((target.get("dev", ""), what, boot.get("order") if boot is not None else None))
    return out


def _glance(glance: Glance) -> str:
    """The ``[images]`` lines of an agent saving its snapshots to ``glance``."""
    return glance_config(glance).removeprefix("[images]\n")


def _lun(tmp_path: Path) -> Path:
    """A file a ``file`` volume connection names."""
    lun = tmp_path / "lun.img"
    lun.write_bytes(bytes(4096))
    return lun


def _image(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(MiB))
    return path


def test_rescue_keeps_the_volumes_and_boots_the_rescue_disk(tmp_path: Path, image_file: Path) -> None:
    rescue_image = _image(tmp_path, "rescue.raw")

    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default") as (agent, client):
            rec = await client.call("instance.spawn", spawn_args(image_file, wait=True))
            uuid = rec["uuid"]
            await client.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v1", NBD)})
            rescued = await client.call("instance.rescue", {"uuid": uuid, "image": {"url": rescue_image.as_uri()}})
            assert rescued["vm_state"] == "rescued" and [v["volume_id"] for v in rescued["volumes"]] == ["v1"]
            # The rescue disk boots; the root disk follows; the volume keeps its name.
            assert _layout(await agent.driver.domain_xml(uuid, persistent=True)) == [
                ("vda", "disk.rescue", "1"), ("vdb", "nbd", None), ("vdc", "disk", None), CONFIG]
            await client.call("instance.unrescue", {"uuid": uuid})
            assert _layout(await agent.driver.domain_xml(uuid, persistent=True)) == [
                ("vda", "disk", "1"), ("vdb", "nbd", None), CONFIG]

            # Booted from a volume: the rescue disk boots, every volume stays (stable device rescue).
            bfv = (await client.call("instance.spawn", _bfv()))["uuid"]
            with pytest.raises(BadRequest) as err:
                await client.call("instance.rescue", {"uuid": bfv})
            assert err.value.details["field"] == "args.image"
            assert (await client.call("instance.get", {"uuid": bfv}))["vm_state"] == "active"
            await client.call("instance.rescue", {"uuid": bfv, "image": {"url": rescue_image.as_uri()}})
            assert _layout(await agent.driver.domain_xml(bfv, persistent=True)) == [
                ("vda", "iscsi", None), ("vdb", "nbd", None), ("vdc", "disk.rescue", "1"), CONFIG]
            back = await client.call("instance.unrescue", {"uuid": bfv})
            assert back["vm_state"] == "active"
            assert _layout(await agent.driver.domain_xml(bfv, persistent=True)) == [
                ("vda", "iscsi", "1"), ("vdb", "nbd", None), CONFIG]
            assert not (tmp_path / "state" / "instances" / bfv / "disk.rescue").exists()

    asyncio.run(run())


def test_rebuild_keeps_the_volumes_and_refuses_a_volume_backed_instance_which_shelves_without_glance(
        tmp_path: Path, image_file: Path) -> None:
    other = _image(tmp_path, "other.raw")
    lun = _lun(tmp_path)

    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default") as (agent, client):
            rec = await client.call("instance.spawn", spawn_args(image_file, wait=True))
            uuid = rec["uuid"]
            await client.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v1", local(lun, "file"))})
            rebuilt = await client.call("instance.rebuild", {"uuid": uuid, "image": {"url": other.as_uri()}})
            assert rebuilt["image"]["url"] == other.as_uri()
            assert [(v["volume_id"], v["status"]) for v in rebuilt["volumes"]] == [("v1", "attached")]
            assert _layout(await agent.driver.domain_xml(uuid, persistent=True)) == [
                ("vda", "disk", "1"), ("vdb", "lun.img", None), CONFIG]

            bfv = await client.call("instance.spawn", _bfv())
            with pytest.raises(Conflict) as err:
                await client.call("instance.rebuild", {"uuid": bfv["uuid"], "image": {"url": other.as_uri()}})
            assert "boots from a volume" in err.value.message
            after = await client.call("instance.get", {"uuid": bfv["uuid"]})
            assert (after["vm_state"], after["task_state"]) == ("active", None) and after["image"] == bfv["image"]
            # Its shelve makes no image: it needs no Image service (this agent has none).
            shelved = await client.call("instance.shelve", {"uuid": bfv["uuid"]})
            assert shelved["vm_state"] == "shelved_offloaded"
            assert (await client.call("instance.unshelve", {"uuid": bfv["uuid"]}))["vm_state"] == "active"

    asyncio.run(run())


def test_snapshot_saves_the_root_disk_only_and_refuses_a_volume_backed_instance(
        tmp_path: Path, image_file: Path, glance: Glance) -> None:
    lun = tmp_path / "lun.img"
    vol_marker, root_marker = os.urandom(4096), os.urandom(4096)
    lun.write_bytes(vol_marker * 16)

    async def run() -> None:
        async with running_agent(tmp_path, "", "test:///default", _glance(glance)) as (_agent, client):
            rec = await client.call("instance.spawn", spawn_args(image_file, wait=True))
            uuid = rec["uuid"]
            write_marker(tmp_path / "state" / "instances" / uuid / "disk", 600 * 1024, root_marker)
            await client.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v1", local(lun, "file"))})
            snap = await client.call("instance.snapshot", {"uuid": uuid, "name": "with-volume"})
            data = download(glance, snap["image_id"], tmp_path / "snap.qcow2").read_bytes()
            assert root_marker in data and vol_marker not in data
            after = await client.call("instance.get", {"uuid": uuid})
            assert [(v["volume_id"], v["status"]) for v in after["volumes"]] == [("v1", "attached")]

            bfv = (await client.call("instance.spawn", _bfv()))["uuid"]
            with pytest.raises(Conflict) as err:
                await client.call("instance.snapshot", {"uuid": bfv, "name": "bfv"})
            assert "boots from a volume" in err.value.message
            assert glance_images(glance, bfv) == []
            assert (await client.call("instance.get", {"uuid": bfv}))["task_state"] is None

    asyncio.run(run())


def test_shelve_disconnects_the_volumes_and_unshelve_connects_them_again(
        tmp_path: Path, image_file: Path, glance: Glance) -> None:
    lun = _lun(tmp_path)

    async def run() -> None:
        config = "[compute]\nshelved_offload_time_s = 0\n"
        async with running_agent(tmp_path, config, "test:///default", _glance(glance)) as (agent, client):
            before = (await client.call("host.info"))["usage"]
            rec = await client.call("instance.spawn", spawn_args(image_file, wait=True))
            uuid = rec["uuid"]
            await client.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v1", local(lun, "file"))})
            await client.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v2", ISCSI)})
            shelved = await client.call("instance.shelve", {"uuid": uuid})
            assert shelved["vm_state"] == "shelved_offloaded"
            assert [v["volume_id"] for v in shelved["volumes"]] == ["v1", "v2"]  # the attachments stay
            assert await agent.driver.info(uuid) is None
            back = await client.call("instance.unshelve", {"uuid": uuid})
            assert back["vm_state"] == "active"
            assert _layout(await agent.driver.domain_xml(uuid, persistent=True)) == [
                ("vda", "disk", "1"), ("vdb", "lun.img", None), ("vdc", "iscsi", None), CONFIG]

            # Booted from a volume: no image, offloaded at once, no DISK_GB when unshelved.
            bfv = (await client.call("instance.spawn", _bfv()))["uuid"]
            shelved = await client.call("instance.shelve", {"uuid": bfv})
            assert (shelved["vm_state"], shelved["shelved_image_id"]) == ("shelved_offloaded", None)
            assert glance_images(glance, bfv) == []
            assert (await client.call("instance.get_shelved", {"uuid": bfv}))["image_id"] is None
            usage = (await client.call("host.info"))["usage"]
            back = await client.call("instance.unshelve", {"uuid": bfv})
            assert back["vm_state"] == "active"
            assert [v["volume_id"] for v in back["volumes"]] == ["root-vol", "data-vol"]
            grown = (await client.call("host.info"))["usage"]
            assert grown["DISK_GB"] == usage["DISK_GB"] and grown["MEMORY_MB"] == usage["MEMORY_MB"] + 64
            assert _layout(await agent.driver.domain_xml(bfv, persistent=True)) == [
                ("vda", "iscsi", "1"), ("vdb", "nbd", None), CONFIG]
            for u in (uuid, bfv):
                await client.call("instance.delete", {"uuid": u})
            assert (await client.call("host.info"))["usage"] == before

    asyncio.run(run())


def test_unshelve_on_another_agent_connects_the_volumes_it_is_given(make_agent: Any) -> None:
    a, b = make_agent(), make_agent()
    uuid = a.call("instance.spawn", _bfv())["uuid"]
    assert a.call("instance.shelve", {"uuid": uuid})["vm_state"] == "shelved_offloaded"
    moving = a.call("instance.get_shelved", {"uuid": uuid})
    # What the instance's volumes are reached through on b (Cinder's answer for b's connector).
    here = [{"id": "root-vol", "connection_info": NBD},
            {"id": "data-vol", "connection_info": _with(ISCSI, target_lun=7)}]
    assert ISCSI["data"]["auth_password"] not in repr(moving)  # a's connections never leave it
    for wrong in ([], here[:1], [*here, {"id": "other", "connection_info": NBD}]):
        err = call_error(b, "instance.unshelve", {"uuid": uuid, "shelved": moving, "volumes": wrong})
        assert (err.code, err.details["field"]) == ("BAD_REQUEST", "args.volumes"), wrong
    bad = [here[0], {"id": "data-vol", "connection_info": _with(ISCSI, target_portal="h:99999")}]
    err = call_error(b, "instance.unshelve", {"uuid": uuid, "shelved": moving, "volumes": bad})
    assert err.details["field"] == "args.volumes[1].connection_info.data.target_portal"
    err = call_error(a, "instance.unshelve", {"uuid": uuid, "volumes": here})
    assert err.details["field"] == "args.volumes"
    assert b.call("instance.list") == [] and not b.call("host.info")["usage"]["MEMORY_MB"]

    on_b = b.call("instance.unshelve", {"uuid": uuid, "shelved": moving, "volumes": here})
    assert on_b["vm_state"] == "active" and on_b["host"] == b.call("host.info")["hostname"]
    assert [(v["volume_id"], v["driver_volume_type"], v["device_name"], v["boot_index"]) for v in on_b["volumes"]] == [
        ("root-vol", "nbd", "/dev/vda", 0), ("data-vol", "iscsi", "/dev/vdb", None)]
    assert b.call("host.info")["usage"]["DISK_GB"] == 0
    # b holds the connections now: it detaches the data volume as any of its own.
    assert [v["volume_id"] for v in b.call("instance.detach_volume", {"uuid": uuid, "volume_id": "data-vol"})[
        "volumes"]] == ["root-vol"]


def test_scheduler_counts_no_local_disk_for_a_boot_volume(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config=agent_config("small-disk").replace("disk_gb = 100000", "disk_gb = 10"))
    too_big = {"vcpus": 1, "memory_mb": 64, "disk_gb": 50}  # more than the host's disk

    async def run() -> None:
        async with Scheduler([Endpoint(agent.control, agent.events)], timeout_s=20) as s:
            with pytest.raises(NoValidHost):
                await s.spawn({"name": "local", "flavor": too_big, "image": {"url": image_file.as_uri()}})
            placed = await s.spawn(_bfv(flavor=too_big))
            assert placed.record.vm_state == "active"
            assert agent.call("host.info")["usage"]["DISK_GB"] == 0

    asyncio.run(run())


def test_migration_moves_the_volumes_with_the_instance(make_agent: Any, image_file: Path, tmp_path: Path) -> None:
    lun = _lun(tmp_path)
    a, b = pair(make_agent)
    uuid = a.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    a.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v1", local(lun, "file"))})
    a.call("instance.attach_volume", {"uuid": uuid, "volume": volume("v2", ISCSI)})
    rec = a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert (rec["vm_state"], rec["host"]) == ("resized", "host-b")
    moved = b.call("instance.confirm_resize", {"uuid": uuid})
    assert [(v["volume_id"], v["device_name"], v["status"]) for v in moved["volumes"]] == [
        ("v1", "/dev/vdb", "attached"), ("v2", "/dev/vdc", "attached")]
    # The destination holds their connections: it detaches them as the source would have.
    assert b.call("instance.detach_volume", {"uuid": uuid, "volume_id": "v2"})["volumes"][0]["volume_id"] == "v1"


def test_migration_of_a_volume_backed_instance(make_agent: Any) -> None:
    a, b = pair(make_agent)
    uuid = a.call("instance.spawn", _bfv())["uuid"]
    try:
        rec = a.call("instance.migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    finally:
        # Refused or not, nothing is lost: the instance runs on one host with its volumes.
        where = a if uuid in {r["uuid"] for r in a.call("instance.list")} else b
        here = wait_for_state(where, uuid, "active" if where is a else "resized", 30)
        assert [v["volume_id"] for v in here["volumes"]] == ["root-vol", "data-vol"]
    assert (rec["vm_state"], rec["host"]) == ("resized", "host-b")
    assert b.call("host.info")["usage"]["DISK_GB"] == 0
    moved = b.call("instance.confirm_resize", {"uuid": uuid})
    assert [v["volume_id"] for v in moved["volumes"]] == ["root-vol", "data-vol"]
    # A smaller root disk in the flavor is no shrink: the root is the volume (Nova's rule).
    smaller = {**moved["flavor"], "disk_gb": 1, "memory_mb": 96}
    back = b.call("instance.resize", {"uuid": uuid, "destination": "host-a", "flavor": smaller, "wait": True})
    assert (back["host"], back["flavor"]["disk_gb"]) == ("host-a", 1)
    a.call("instance.confirm_resize", {"uuid": uuid})
    assert a.call("host.info")["usage"]["DISK_GB"] == b.call("host.info")["usage"]["DISK_GB"] == 0
