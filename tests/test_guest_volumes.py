"""Volumes on real QEMU guests (TCG) with real storage on loopback: ``tgtd`` exporting files
as iSCSI LUNs (CHAP through a libvirt secret) and ``qemu-storage-daemon`` exporting NBD, both
reached by QEMU's own initiators.

A guest writes a marker to a volume through its serial shell, the volume is detached (the
guest releases it) and attached to a second guest, which reads the marker; a guest boots from
an iSCSI volume with no local disk; an extended volume shows its new size in the guest; a kill
-9 of the agent during an attach and during a detach leaves nothing half attached once the
agent is back; a volume stays through a rescue and comes back (secret and all) after a shelve
and unshelve; a guest whose boot volume cannot boot is rescued from a rescue disk the firmware
boots instead, repaired, and boots from its volume again. The RBD disk's XML and its secret
check are tested against libvirt without a Ceph cluster (none can run here).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, call_error, free_port
from glance_fixtures import Glance, glance
from guest_fixtures import READY, guest_image, libvirtd
from image_workflow_fixtures import glance_config
from storage_fixtures import (
    CHAP_PASSWORD,
    IscsiTarget,
    NbdExport,
    SilentTarget,
    iscsi,
    nbd_exports,
    raw_file,
)
from test_guest_agent import conn, guest_agent, wait_console
from test_guest_console import socket_dir

from fastcompute.errors import AgentError
from fastcompute.rpc.client import ClientTimeout

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "glance", "guest_agent", "guest_image", "iscsi", "libvirtd", "nbd_exports", "socket_dir"]

MIB = 1 << 20


def config(socket_dir: Path, detach_timeout_s: float = 30.0) -> str:
    """Real guests with their serial consoles on unix sockets (the tests' shells)."""
    return (f'[hypervisor]\ndomain_type = "qemu"\nshutdown_timeout_s = 5\n'
            f"volume_detach_timeout_s = {detach_timeout_s}\n"
            f'[console]\nenabled = true\nlisten = "127.0.0.1:{free_port()}"\nsocket_dir = "{socket_dir}"\n'
            "[stats]\ninterval_s = 0\n")


class Shell:
    """The root shell on a guest's serial console (its unix socket)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.settimeout(1.0)

    def run(self, command: str, timeout_s: float = 120.0) -> str:
        """Run ``command``; its output (between two markers the shell echoes)."""
        tag = uuid_mod.uuid4().hex[:8]
        # The markers are built by the shell, so the echo of the typed line does not match them.
        self.sock.sendall(f"echo FC-BEGIN-{tag}; {command}; echo FC-END-$((1+1))-{tag}\r".encode())
        seen = b""
        deadline = time.monotonic() + timeout_s
        end = f"FC-END-2-{tag}".encode()
        while end not in seen:
            assert time.monotonic() < deadline, f"no answer to {command!r}: {seen[-400:]!r}"
            try:
                seen += self.sock.recv(65536)
            except TimeoutError:
                continue
        out = seen[:seen.index(end)].decode(errors="replace")
        begin = out.rfind(f"FC-BEGIN-{tag}\r\n")
        return out[begin + len(f"FC-BEGIN-{tag}\r\n"):] if begin >= 0 else out

    def wait_for(self, command: str, want: str, timeout_s: float = 60.0) -> str:
        """Run ``command`` until its output holds ``want``."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.run(command)
            if want in out:
                return out
            assert time.monotonic() < deadline, f"{command!r} never showed {want!r}: {out!r}"
            time.sleep(0.5)

    def close(self) -> None:
        """Hang up (the shell stays, for the next connection)."""
        self.sock.close()


@pytest.fixture
def shells() -> Iterator[Callable[[Path, str], Shell]]:
    """Factory of shells on guests' serial sockets, closed at the end."""
    opened: list[Shell] = []

    def open_(socket_dir: Path, uuid: str) -> Shell:
        s = Shell(socket_dir / f"{uuid}.sock")
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


def boot(agent: AgentProcess, image: Path, name: str, **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = agent.call("instance.spawn", {
        "name": name, "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 1},
        "image": {"url": image.as_uri()}, "wait": True, **over})
    assert rec["vm_state"] == "active", rec
    return rec


def disk_devs(conn: Any, uuid: str, flags: int = 0) -> set[str]:
    root = ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(flags))
    return {t.get("dev", "") for t in root.iterfind("devices/disk/target")}


def our_secrets(conn: Any, uuid: str) -> list[str]:
    return [s.usageID() for s in conn.listAllSecrets() if s.usageID().startswith(f"fastcompute-{uuid}-")]


def test_a_marker_moves_between_guests_on_iscsi_and_nbd_volumes(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path,
        iscsi: IscsiTarget, nbd_exports: list[NbdExport], shells: Callable[[Path, str], Shell],
        tmp_path: Path) -> None:
    agent = guest_agent(config(socket_dir))
    a, b = (boot(agent, guest_image, n)["uuid"] for n in ("vol-a", "vol-b"))
    lun = raw_file(tmp_path / "lun.img", 64 * MIB)
    info = iscsi.lun("marker", lun)
    nbd_file = raw_file(tmp_path / "nbd.img", 32 * MIB)
    nbd_exports.append(NbdExport(tmp_path, nbd_file, "data"))
    wait_console(agent, a, READY)
    wait_console(agent, b, READY)
    sa, sb = shells(socket_dir, a), shells(socket_dir, b)

    # iSCSI with CHAP: the password reaches QEMU through a libvirt secret of the instance.
    rec = agent.call("instance.attach_volume", {"uuid": a, "volume": {"id": "vol-iscsi", "connection_info": info}})
    assert [(v["device_name"], v["status"]) for v in rec["volumes"]] == [("/dev/vdb", "attached")]
    assert len(our_secrets(conn, a)) == 1
    assert "vdb" in disk_devs(conn, a) and "vdb" in disk_devs(conn, a, libvirt.VIR_DOMAIN_XML_INACTIVE)
    sa.wait_for("cat /sys/block/vdb/serial", "vol-iscsi")
    marker = f"FCMARK-{uuid_mod.uuid4().hex[:12]}"
    sa.run(f"echo {marker} > /dev/vdb; sync")
    assert lun.read_bytes()[:len(marker)] == marker.encode()

    rec = agent.call("instance.detach_volume", {"uuid": a, "volume_id": "vol-iscsi"})
    assert rec["volumes"] == [] and our_secrets(conn, a) == []
    assert "vdb" not in disk_devs(conn, a) and "vdb" not in disk_devs(conn, a, libvirt.VIR_DOMAIN_XML_INACTIVE)
    sa.wait_for("ls /sys/block", "vda")
    assert "vdb" not in sa.run("ls /sys/block")

    agent.call("instance.attach_volume", {"uuid": b, "volume": {"id": "vol-iscsi", "connection_info": info}})
    sb.wait_for("cat /sys/block/vdb/serial", "vol-iscsi")
    assert marker in sb.run("dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 40")

    # NBD from qemu-storage-daemon: written by b, read on the host's file.
    rec = agent.call("instance.attach_volume", {"uuid": b, "volume": {
        "id": "vol-nbd", "connection_info": nbd_exports[0].connection_info(), "serial": "nbd-data"}})
    assert [v["device_name"] for v in rec["volumes"]] == ["/dev/vdb", "/dev/vdc"]
    sb.wait_for("cat /sys/block/vdc/serial", "nbd-data")
    sb.run(f"echo {marker}-nbd > /dev/vdc; sync")
    agent.call("instance.detach_volume", {"uuid": b, "volume_id": "vol-nbd"})
    assert nbd_file.read_bytes()[:len(marker) + 4] == f"{marker}-nbd".encode()

    # A target that refuses the connection: a typed error, nothing of it left anywhere.
    before = disk_devs(conn, b), disk_devs(conn, b, libvirt.VIR_DOMAIN_XML_INACTIVE)
    closed = {"driver_volume_type": "nbd", "data": {"host": "127.0.0.1", "port": nbd_exports[0].port + 1,
                                                   "export_name": "nope"}}
    err = call_error(agent, "instance.attach_volume", {"uuid": b, "volume": {"id": "gone", "connection_info": closed}})
    assert err.code == "HYPERVISOR_ERROR", err
    wrong = {**info, "data": {**info["data"], "auth_password": "not-the-password"}}
    err = call_error(agent, "instance.attach_volume",
                     {"uuid": a, "volume": {"id": "bad-chap", "connection_info": wrong}})
    assert err.code == "HYPERVISOR_ERROR" and "not-the-password" not in err.message, err
    assert (disk_devs(conn, b), disk_devs(conn, b, libvirt.VIR_DOMAIN_XML_INACTIVE)) == before
    assert [v["volume_id"] for v in agent.call("instance.get", {"uuid": b})["volumes"]] == ["vol-iscsi"]
    assert agent.call("instance.get", {"uuid": a})["volumes"] == [] and our_secrets(conn, a) == []

    # Delete: the volume's connection and secret go, the volume stays.
    agent.call("instance.delete", {"uuid": b})
    assert our_secrets(conn, b) == []
    assert lun.read_bytes()[:len(marker)] == marker.encode()
    assert CHAP_PASSWORD.encode() not in agent.log_path.read_bytes()


def test_extend_shows_the_new_size_in_the_guest(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path,
        shells: Callable[[Path, str], Shell], tmp_path: Path) -> None:
    agent = guest_agent(config(socket_dir))
    uuid = boot(agent, guest_image, "extend")["uuid"]
    vol = raw_file(tmp_path / "grow.img", 16 * MIB)
    wait_console(agent, uuid, READY)
    shell = shells(socket_dir, uuid)
    info = {"driver_volume_type": "file", "data": {"device_path": str(vol)}}
    agent.call("instance.attach_volume", {"uuid": uuid, "volume": {"id": "grow", "connection_info": info}})
    shell.wait_for("cat /sys/block/vdb/size", str(16 * MIB // 512))
    # The volume grows (Cinder's part), then the guest is told.
    with vol.open("r+b") as f:
        f.truncate(48 * MIB)
    rec = agent.call("instance.extend_volume", {"uuid": uuid, "volume_id": "grow", "new_size_bytes": 48 * MIB})
    assert rec["volumes"][0]["size_bytes"] == 48 * MIB
    shell.wait_for("cat /sys/block/vdb/size", str(48 * MIB // 512))


def test_a_guest_boots_from_an_iscsi_volume_with_no_local_disk(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path,
        iscsi: IscsiTarget, tmp_path: Path) -> None:
    agent = guest_agent(config(socket_dir))
    lun = tmp_path / "boot.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest_image), str(lun)], check=True)
    info = iscsi.lun("boot", lun)
    before = agent.call("host.info")["usage"]
    rec = agent.call("instance.spawn", {
        "name": "bfv", "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 10}, "image": {}, "wait": True,
        "block_device_mapping": [{"boot_index": 0, "source_type": "volume", "destination_type": "volume",
                                  "volume_id": "root", "connection_info": info}]})
    assert rec["vm_state"] == "active", rec
    uuid = rec["uuid"]
    assert agent.call("host.info")["usage"]["DISK_GB"] == before["DISK_GB"]
    wait_console(agent, uuid, READY)
    disks = ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(0)).findall("devices/disk")
    boot_disk = next(d for d in disks if d.find("target").get("dev") == "vda")  # type: ignore[union-attr]
    assert boot_disk.get("type") == "network" and boot_disk.find("source").get("protocol") == "iscsi"  # type: ignore[union-attr]
    assert not (agent.state_dir / "instances" / uuid / "disk").exists()
    agent.call("instance.delete", {"uuid": uuid})
    assert our_secrets(conn, uuid) == [] and lun.exists()


def cut_short(agent: AgentProcess, op: str, args: dict[str, Any]) -> None:
    """Send a request the agent is killed during: its reply never comes, or comes as an error."""
    with contextlib.suppress(AgentError, ClientTimeout):
        agent.call(op, args)


def test_kill_9_during_attach_and_detach_leaves_nothing_half_attached(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path,
        iscsi: IscsiTarget, shells: Callable[[Path, str], Shell], tmp_path: Path) -> None:
    agent = guest_agent(config(socket_dir, detach_timeout_s=6))
    uuid = boot(agent, guest_image, "crash")["uuid"]
    wait_console(agent, uuid, READY)
    base = disk_devs(conn, uuid), disk_devs(conn, uuid, libvirt.VIR_DOMAIN_XML_INACTIVE)

    # An attach that hangs on a target that never answers (CHAP: a secret is defined first).
    silent = SilentTarget()
    hang = {"driver_volume_type": "iscsi", "data": {
        "target_portal": f"127.0.0.1:{silent.port}", "target_iqn": "iqn.2026-12.org.fastcompute:silent",
        "auth_method": "CHAP", "auth_username": "u", "auth_password": "hanging-password"}}
    threading.Thread(target=lambda: cut_short(agent, "instance.attach_volume", {
        "uuid": uuid, "volume": {"id": "hang", "connection_info": hang}}), daemon=True).start()
    assert silent.accepted.wait(60), "QEMU never connected to the target"
    assert [v["status"] for v in agent.call("instance.get", {"uuid": uuid})["volumes"]] == ["attaching"]
    agent.kill()
    silent.stop()  # QEMU's connection fails, its attach with it
    agent.start()
    rec = agent.call("instance.get", {"uuid": uuid})
    assert rec["volumes"] == [] and rec["vm_state"] == "active"
    assert (disk_devs(conn, uuid), disk_devs(conn, uuid, libvirt.VIR_DOMAIN_XML_INACTIVE)) == base
    assert our_secrets(conn, uuid) == []

    # A detach the guest cannot carry out (it is paused), then kill -9 while the agent waits.
    info = iscsi.lun("crash", raw_file(tmp_path / "crash.img", 16 * MIB))
    agent.call("instance.attach_volume", {"uuid": uuid, "volume": {"id": "v", "connection_info": info}})
    shells(socket_dir, uuid).wait_for("cat /sys/block/vdb/serial", "v")
    agent.call("instance.pause", {"uuid": uuid})
    threading.Thread(target=lambda: cut_short(agent, "instance.detach_volume", {"uuid": uuid, "volume_id": "v"}),
                     daemon=True).start()
    deadline = time.monotonic() + 30
    while agent.call("instance.get", {"uuid": uuid})["volumes"][0]["status"] != "detaching":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    agent.kill()
    agent.start()
    # The guest is still paused: the restarted agent's detach cannot finish either, so the
    # volume is recorded as attached, as the guest and both definitions still have it.
    rec = agent.call("instance.get", {"uuid": uuid})
    assert [(v["volume_id"], v["status"]) for v in rec["volumes"]] == [("v", "attached")], rec
    assert "vdb" in disk_devs(conn, uuid, libvirt.VIR_DOMAIN_XML_INACTIVE) and len(our_secrets(conn, uuid)) == 1
    agent.call("instance.unpause", {"uuid": uuid})
    rec = agent.call("instance.detach_volume", {"uuid": uuid, "volume_id": "v"})
    assert rec["volumes"] == [] and our_secrets(conn, uuid) == []
    assert (disk_devs(conn, uuid), disk_devs(conn, uuid, libvirt.VIR_DOMAIN_XML_INACTIVE)) == base


def test_an_rbd_volume_is_a_network_disk_libvirt_accepts_with_the_operators_secret(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path) -> None:
    """No Ceph here: the disk is attached to a stopped guest (its definition, which libvirt
    checks) and the operator's secret must exist; nothing connects to a monitor."""
    agent = guest_agent(config(socket_dir))
    uuid = boot(agent, guest_image, "rbd")["uuid"]
    agent.call("instance.stop", {"uuid": uuid})
    secret_uuid = str(uuid_mod.uuid4())
    rbd = {"driver_volume_type": "rbd", "data": {
        "name": "volumes/volume-1", "hosts": ["192.0.2.1", "192.0.2.2"], "ports": ["6789", "3300"],
        "auth_enabled": True, "auth_username": "cinder", "secret_uuid": secret_uuid}}
    err = call_error(agent, "instance.attach_volume", {"uuid": uuid, "volume": {"id": "r", "connection_info": rbd}})
    assert err.code == "NOT_FOUND" and secret_uuid in err.message, err
    assert agent.call("instance.get", {"uuid": uuid})["volumes"] == []
    secret = conn.secretDefineXML(f"<secret ephemeral='no' private='yes'><uuid>{secret_uuid}</uuid>"
                                  f"<usage type='ceph'><name>test-{secret_uuid}</name></usage></secret>")
    try:
        agent.call("instance.attach_volume", {"uuid": uuid, "volume": {"id": "r", "connection_info": rbd}})
        disk = next(d for d in ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE)).iterfind("devices/disk") if d.find("target").get("dev") == "vdb")  # type: ignore[union-attr]
        src = disk.find("source")
        assert src is not None and (src.get("protocol"), src.get("name")) == ("rbd", "volumes/volume-1")
        assert [(h.get("name"), h.get("port")) for h in src.iterfind("host")] == [("192.0.2.1", "6789"),
                                                                                  ("192.0.2.2", "3300")]
        auth_secret = disk.find(".//auth/secret")
        assert auth_secret is not None and auth_secret.get("uuid") == secret_uuid
        agent.call("instance.detach_volume", {"uuid": uuid, "volume_id": "r"})
        agent.call("instance.delete", {"uuid": uuid})
        # The operator's secret is not the agent's to remove.
        assert conn.secretLookupByUUIDString(secret_uuid).UUIDString() == secret_uuid
    finally:
        secret.undefine()


def test_a_restart_attaches_what_the_record_has_and_detaches_what_it_does_not(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path,
        nbd_exports: list[NbdExport], shells: Callable[[Path, str], Shell], tmp_path: Path) -> None:
    agent = guest_agent(config(socket_dir))
    uuid = boot(agent, guest_image, "reconcile")["uuid"]
    kept = NbdExport(tmp_path, raw_file(tmp_path / "kept.img", 16 * MIB), "kept")
    stranger = NbdExport(tmp_path, raw_file(tmp_path / "stranger.img", 16 * MIB), "stranger")
    nbd_exports.extend([kept, stranger])
    wait_console(agent, uuid, READY)
    shell = shells(socket_dir, uuid)
    agent.call("instance.attach_volume",
               {"uuid": uuid, "volume": {"id": "kept", "connection_info": kept.connection_info()}})
    shell.wait_for("cat /sys/block/vdb/serial", "kept")
    agent.kill()

    # Behind the agent's back: its volume leaves the domain, a disk with an alias of its form comes.
    dom = conn.lookupByUUIDString(uuid)
    both = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    vdb = next(d for d in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk")
               if d.find("target").get("dev") == "vdb")  # type: ignore[union-attr]
    dom.detachDeviceFlags(ET.tostring(vdb, encoding="unicode"), both)
    deadline = time.monotonic() + 60
    while "vdb" in disk_devs(conn, uuid):
        assert time.monotonic() < deadline, "the guest did not release vdb"
        time.sleep(0.1)
    dom.attachDeviceFlags(
        f"<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='stranger'>"
        f"<host name='127.0.0.1' port='{stranger.port}'/></source><target dev='vdx' bus='virtio'/>"
        f"<alias name='ua-vol-00000000000000000000'/></disk>", both)
    # The guest names disks in the order it finds them, whatever their target: this one is its vdb.
    shell.wait_for("ls /sys/block", "vdb")

    agent.start()
    rec = agent.call("instance.get", {"uuid": uuid})
    assert [(v["volume_id"], v["device_name"], v["status"]) for v in rec["volumes"]] == [
        ("kept", "/dev/vdb", "attached")]
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        devs = disk_devs(conn, uuid, flags)
        assert "vdb" in devs and "vdx" not in devs, (flags, devs)
    shell.wait_for("cat /sys/block/vd*/serial", "kept")
    # The stranger is gone from the guest too: the CD-ROM, the root disk and the volume, no more.
    blocks = shell.run("ls /sys/block").split()
    assert len(blocks) == 3 and {"sr0", "vda"} < set(blocks), blocks


def test_a_volume_stays_through_rescue_and_comes_back_after_shelve(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path,
        iscsi: IscsiTarget, glance: Glance, shells: Callable[[Path, str], Shell], tmp_path: Path) -> None:
    agent = guest_agent(config(socket_dir) + glance_config(glance, "[compute]\nshelved_offload_time_s = 0\n"))
    uuid = boot(agent, guest_image, "vol-rescue")["uuid"]
    lun = raw_file(tmp_path / "lun.img", 16 * MIB)
    marker = f"FCMARK-{uuid_mod.uuid4().hex[:12]}"
    with lun.open("r+b") as f:
        f.write(marker.encode())
    agent.call("instance.attach_volume", {"uuid": uuid, "volume": {"id": "vol-keep",
                                                                   "connection_info": iscsi.lun("keep", lun)}})
    wait_console(agent, uuid, READY)
    shell = shells(socket_dir, uuid)
    # A mark on the root disk, far from its file systems: found again on the rescued guest's vdc.
    root_mark = f"FCROOT-{uuid_mod.uuid4().hex[:12]}"
    shell.run(f"echo {root_mark} | dd of=/dev/vda bs=1M seek=900 conv=notrunc 2>/dev/null; sync")
    shell.close()
    read = "dd if=/dev/{} bs=1M skip={} count=1 2>/dev/null | head -c 40"

    # Rescued: the rescue disk is vda, the volume (its CHAP secret too) is still vdb, the root vdc.
    rescued = agent.call("instance.rescue", {"uuid": uuid, "image": {"url": guest_image.as_uri()}})
    assert rescued["vm_state"] == "rescued" and len(our_secrets(conn, uuid)) == 1
    wait_console(agent, uuid, READY, count=2)
    shell = shells(socket_dir, uuid)
    shell.wait_for("cat /sys/block/vdb/serial", "vol-keep")
    assert marker in shell.run(read.format("vdb", 0))
    assert root_mark in shell.run(read.format("vdc", 900))
    assert root_mark not in shell.run(read.format("vda", 900))
    shell.close()
    agent.call("instance.unrescue", {"uuid": uuid})

    # Offloaded: no domain and no secret; unshelved: connected again, the same device.
    shelved = agent.call("instance.shelve", {"uuid": uuid})
    assert shelved["vm_state"] == "shelved_offloaded" and [v["volume_id"] for v in shelved["volumes"]] == ["vol-keep"]
    assert our_secrets(conn, uuid) == [] and uuid not in {d.UUIDString() for d in conn.listAllDomains()}
    assert agent.call("instance.unshelve", {"uuid": uuid})["vm_state"] == "active"
    assert len(our_secrets(conn, uuid)) == 1
    wait_console(agent, uuid, READY)  # a new console log: the offload removed the old one
    shell = shells(socket_dir, uuid)
    shell.wait_for("cat /sys/block/vdb/serial", "vol-keep")
    assert marker in shell.run(read.format("vdb", 0))
    assert root_mark in shell.run(read.format("vda", 900))  # the root disk came back from the snapshot
    agent.call("instance.delete", {"uuid": uuid})
    assert our_secrets(conn, uuid) == [] and lun.read_bytes()[:len(marker)] == marker.encode()


def test_a_guest_booted_from_a_volume_is_rescued_from_a_rescue_disk_and_repaired(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path, socket_dir: Path,
        iscsi: IscsiTarget, shells: Callable[[Path, str], Shell], tmp_path: Path) -> None:
    agent = guest_agent(config(socket_dir))
    lun = tmp_path / "boot.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest_image), str(lun)], check=True)
    with lun.open("r+b") as f:
        f.write(bytes(512))  # its boot sector gone: the firmware finds nothing to boot on it
    rec = agent.call("instance.spawn", {
        "name": "bfv-rescue", "flavor": {"vcpus": 1, "memory_mb": 128, "disk_gb": 1}, "image": {}, "wait": True,
        "block_device_mapping": [{"boot_index": 0, "source_type": "volume", "destination_type": "volume",
                                  "volume_id": "root", "connection_info": iscsi.lun("bfv-rescue", lun)}]})
    uuid = rec["uuid"]

    # Stable device rescue: the firmware boots the rescue disk (vdb), the volume stays vda.
    rescued = agent.call("instance.rescue", {"uuid": uuid, "image": {"url": guest_image.as_uri()}})
    assert rescued["vm_state"] == "rescued" and len(our_secrets(conn, uuid)) == 1
    wait_console(agent, uuid, READY)
    shell = shells(socket_dir, uuid)
    assert shell.run("cat /sys/block/vda/serial").strip() == "root"
    sector = "dd if=/dev/{} bs=512 count=1 2>/dev/null | md5sum | cut -c1-32"
    assert shell.run(sector.format("vda")).strip() != shell.run(sector.format("vdb")).strip()
    shell.run("dd if=/dev/vdb of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; sync")
    shell.close()

    # Unrescued: it boots from its (repaired) volume again, the rescue disk gone.
    assert agent.call("instance.unrescue", {"uuid": uuid})["vm_state"] == "active"
    wait_console(agent, uuid, READY, count=2)
    shell = shells(socket_dir, uuid)
    assert shell.run("ls /sys/block | grep -c '^vd'").strip() == "1"
    assert shell.run("cat /sys/block/vda/serial").strip() == "root"
    assert not (agent.state_dir / "instances" / uuid / "disk.rescue").exists()
    agent.call("instance.delete", {"uuid": uuid})
    assert our_secrets(conn, uuid) == []
