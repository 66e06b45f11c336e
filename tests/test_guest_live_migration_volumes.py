"""Live migration of guests with volumes through two real agents, each in its libvirt host's
namespace (scripts/libvirt-hosts.sh, hosts lmva and lmvb of their own), with real targets:
``tgtd`` (iSCSI with CHAP) and ``qemu-storage-daemon`` (NBD) listening on fchosts0's address
in this namespace, which both hosts' QEMUs reach.

A guest writes a marker to its iSCSI volume. A migration held before the hypervisor is asked
has the destination's libvirt secret for the volume; the source agent is killed there, and
after its restart the guest runs at A alone with its volumes, B's secret gone. Then the guest
moves to B: it reads the marker there and writes new ones, which land in the targets' files
(the volumes were not copied: those files are their only copies), and A keeps no secret.
A guest booted from an iSCSI volume moves to B with no local root disk made there and no DISK_GB
claimed, and reads its boot disk there from the target.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import disk_dirs
from guest_fixtures import READY, guest_image, wait_for_console
from storage_fixtures import IscsiTarget, NbdExport, raw_file
from test_guest_live_migration import Host, libvirt_hosts
from test_guest_live_migration_agents import MEMORY_MB, Pair, at_alone, started
from test_guest_volumes import Shell

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["guest_image"]

MIB = 1 << 20
NAMES = ("lmva", "lmvb")
STORAGE = "10.251.0.1"  # fchosts0 in this namespace: the hosts' default route
HOLD = 'test_hold_step = "live_migrating"\ntest_hold_s = 120\n'


@pytest.fixture(scope="module")
def vhosts() -> Iterator[tuple[Host, Host]]:
    """Two libvirt hosts of this module's own (other tests' hosts may be in use)."""
    yield from libvirt_hosts(NAMES)


@pytest.fixture
def vpair(vhosts: tuple[Host, Host], tmp_path: Path) -> Iterator[Pair]:
    yield from started(Pair(tmp_path, vhosts, namespaces=("fc-lmva", "fc-lmvb")))


@pytest.fixture
def target(vhosts: tuple[Host, Host], tmp_path: Path) -> Iterator[IscsiTarget]:
    t = IscsiTarget(tmp_path, address=STORAGE, initiators="ALL")
    yield t
    t.stop()


def secrets_of(host: Host, uuid: str) -> list[str]:
    """The libvirt secrets the agent keeps for the instance on ``host``."""
    conn = libvirt.open(host.uri)
    try:
        return [s.usageID() for s in conn.listAllSecrets() if s.usageID().startswith(f"fastcompute-{uuid}-")]
    finally:
        conn.close()


def volumes(rec: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(v["volume_id"], v["device_name"], v["status"]) for v in rec["volumes"]]


def shell(pair: Pair, host: str, uuid: str) -> Shell:
    return Shell(pair.socket_of(host, uuid))


def test_a_guest_keeps_its_volumes_through_a_killed_migration_and_a_live_move(
        vpair: Pair, guest_image: Path, target: IscsiTarget, tmp_path: Path) -> None:
    a, b = vpair.agents["host-a"], vpair.agents["host-b"]
    ha, hb = vpair.hosts["host-a"], vpair.hosts["host-b"]
    vpair.configure("host-a", HOLD)
    a.restart()
    lun = raw_file(tmp_path / "lun.img", 64 * MIB)
    nbd_file = raw_file(tmp_path / "nbd.img", 32 * MIB)
    nbd = NbdExport(tmp_path, nbd_file, "data", host=STORAGE)
    try:
        uuid = str(a.call("instance.spawn", {
            "name": "volmig", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
            "image": {"url": guest_image.as_uri()}, "wait": True})["uuid"])
        wait_for_console(a.state_dir / "instances" / uuid / "console.log", READY)
        a.call("instance.attach_volume", {"uuid": uuid, "volume": {
            "id": "vol-iscsi", "connection_info": target.lun("mig", lun)}})
        rec = a.call("instance.attach_volume", {"uuid": uuid, "volume": {
            "id": "vol-nbd", "connection_info": nbd.connection_info(), "serial": "nbd-data"}})
        attached = volumes(rec)
        assert attached == [("vol-iscsi", "/dev/vdb", "attached"), ("vol-nbd", "/dev/vdc", "attached")]
        sa = shell(vpair, "host-a", uuid)
        sa.wait_for("cat /sys/block/vdb/serial", "vol-iscsi")
        marker = f"FCMARK-{uuid_mod.uuid4().hex[:12]}"
        sa.run(f"echo {marker} > /dev/vdb; sync")
        sa.close()
        assert lun.read_bytes()[:len(marker)] == marker.encode()
        assert len(secrets_of(ha, uuid)) == 1 and secrets_of(hb, uuid) == []

        # Held before the hypervisor is asked: B is ready, its secret made; A killed there.
        assert a.call("instance.live_migrate", {"uuid": uuid, "destination": "host-b"})["task_state"] == "migrating"
        assert len(secrets_of(hb, uuid)) == 1 and disk_dirs(b) == {uuid}
        a.kill()
        vpair.configure("host-a")
        a.start()
        rec = at_alone(a, b, uuid, "host-a")
        assert volumes(rec) == attached
        assert secrets_of(hb, uuid) == [] and len(secrets_of(ha, uuid)) == 1

        rec = a.call("instance.live_migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
        assert (rec["host"], rec["vm_state"], rec["task_state"]) == ("host-b", "active", None)
        at_alone(b, a, uuid, "host-b")
        assert volumes(b.call("instance.get", {"uuid": uuid})) == attached
        assert secrets_of(ha, uuid) == [] and len(secrets_of(hb, uuid)) == 1
        sb = shell(vpair, "host-b", uuid)
        assert marker in sb.run("dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 40")
        sb.run(f"echo {marker}-b > /dev/vdb; echo {marker}-nbd > /dev/vdc; sync")
        sb.close()
        # Written at B, found in the targets' files: the guest at B uses the same volumes.
        assert lun.read_bytes()[:len(marker) + 2] == f"{marker}-b".encode()
        assert nbd_file.read_bytes()[:len(marker) + 4] == f"{marker}-nbd".encode()
        # B holds the connections now: it detaches as A did.
        assert volumes(b.call("instance.detach_volume", {"uuid": uuid, "volume_id": "vol-nbd"})) == attached[:1]
    finally:
        nbd.stop()


def test_a_guest_booted_from_a_volume_moves_with_no_local_disk(
        vpair: Pair, guest_image: Path, target: IscsiTarget, tmp_path: Path) -> None:
    a, b = vpair.agents["host-a"], vpair.agents["host-b"]
    lun = tmp_path / "boot.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest_image), str(lun)], check=True)
    rec = a.call("instance.spawn", {
        "name": "bfv", "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 10}, "image": {}, "wait": True,
        "block_device_mapping": [{"boot_index": 0, "source_type": "volume", "destination_type": "volume",
                                  "volume_id": "root", "connection_info": target.lun("boot", lun)}]})
    uuid = str(rec["uuid"])
    wait_for_console(a.state_dir / "instances" / uuid / "console.log", READY)
    disk_gb = int(b.call("host.info")["usage"]["DISK_GB"])
    rec = a.call("instance.live_migrate", {"uuid": uuid, "destination": "host-b", "wait": True})
    assert rec["host"] == "host-b"
    at_alone(b, a, uuid, "host-b")
    assert int(b.call("host.info")["usage"]["DISK_GB"]) == disk_gb
    assert not (b.state_dir / "instances" / uuid / "disk").exists()
    assert volumes(b.call("instance.get", {"uuid": uuid})) == [("root", "/dev/vda", "attached")]
    sb = shell(vpair, "host-b", uuid)
    assert "root" in sb.run("cat /sys/block/vda/serial")
    # The guest at B reads its boot disk from the target's file.
    got = sb.run("dd if=/dev/vda bs=64k count=1 2>/dev/null | md5sum")
    sb.close()
    with lun.open("rb") as f:
        assert hashlib.md5(f.read(64 << 10)).hexdigest() in got
