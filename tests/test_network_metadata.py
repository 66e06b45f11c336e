"""The metadata service: guests in namespaces plugged as ports ask 169.254.169.254 over real
bridges, nftables and sockets; cloud-init's own code reads the answers."""

from __future__ import annotations

import asyncio
import json
import socket

import msgspec
import pytest
from metadata_fixtures import METADATA_IP, http_get, metadata_world, off_loop
from network_fixtures import in_netns, sh, tables

from fastcompute.network import Network
from fastcompute.network.metadata import answer

pytestmark = pytest.mark.anyio

CLOUD_INIT = """
import json, sys
from cloudinit.sources.helpers import openstack
res = openstack.MetadataReader("http://169.254.169.254", timeout=2, retries=0).read_v2()
net = openstack.convert_net_json(res["networkdata"], known_macs={sys.argv[1]: "eth0"})
print(json.dumps({"metadata": res["metadata"], "ec2": res["ec2-metadata"], "net": net}))
"""


async def cloud_init_reads(ns: str, mac: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "/usr/bin/python3", "-c", CLOUD_INIT, mac,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out)
    return result


async def meta_uuid(ns: str) -> str | None:
    got = await off_loop(http_get, ns, "/openstack/latest/meta_data.json")
    if got is None or got[0] != 200:
        return None
    return str(json.loads(got[1])["uuid"])


async def test_cloud_init_reads_the_metadata_of_its_own_instance_through_the_gateway() -> None:
    async with metadata_world() as w:
        guest, rec = await w.guest("10.61.0.5", meta={"role": "web"})
        got = await cloud_init_reads(guest.ns, guest.mac)
        md = got["metadata"]
        assert isinstance(md, dict)
        assert (md["uuid"], md["name"], md["project_id"], md["meta"]) == (rec.uuid, rec.name, "p1", {"role": "web"})
        assert md["hostname"] == "vm-10-61-0-5" and md["local-hostname"] == "vm-10-61-0-5"
        ec2 = got["ec2"]
        assert isinstance(ec2, dict)
        assert ec2["local-ipv4"] == "10.61.0.5" and ec2["mac"] == guest.mac
        assert ec2["instance-id"] == "i-" + rec.uuid.replace("-", "")[:8]
        assert ec2["placement"] == {"availability-zone": "nova"}
        net = got["net"]
        assert isinstance(net, dict)
        physical = [c for c in net["config"] if c["type"] == "physical"]
        assert [(c["name"], c["mac_address"]) for c in physical] == [("eth0", guest.mac)]
        assert [(s["type"], s["address"], s["netmask"]) for s in physical[0]["subnets"]] == [
            ("static", "10.61.0.5", "255.255.255.0")
        ]


async def test_two_guests_on_one_bridge_each_get_their_own_documents() -> None:
    async with metadata_world() as w:
        a, rec_a = await w.guest("10.62.0.5")
        b, rec_b = await w.guest("10.62.0.6")
        assert a.plugged.bridge == b.plugged.bridge
        for _ in range(3):
            assert await meta_uuid(a.ns) == rec_a.uuid
            assert await meta_uuid(b.ns) == rec_b.uuid
        got = await off_loop(http_get, b.ns, "/latest/meta-data/local-ipv4")
        assert got == (200, b"10.62.0.6")


async def test_the_same_address_on_two_networks_gets_each_its_own_instance() -> None:
    async with metadata_world() as w:
        a, rec_a = await w.guest("10.63.0.5", network="net1")
        b, rec_b = await w.guest("10.63.0.5", network="net2")
        assert a.plugged.bridge != b.plugged.bridge
        assert w.service.bridges == {a.plugged.bridge, b.plugged.bridge}
        results = await asyncio.gather(*(meta_uuid(g.ns) for g in (a, b, a, b)))
        assert results == [rec_a.uuid, rec_b.uuid, rec_a.uuid, rec_b.uuid]


async def test_nothing_but_a_ports_own_address_through_its_bridge_is_answered() -> None:
    async with metadata_world() as w:
        guest, rec = await w.guest("10.64.0.5")
        assert await meta_uuid(guest.ns) == rec.uuid
        cfg = w.cfg
        # The host itself (169.254.169.254 is not ours from the host: it is never tried, it may
        # be the host's own cloud), and a namespace on the bridge that is no port.
        assert await off_loop(http_get, None, "/", cfg.address, cfg.port) is None
        assert await off_loop(http_get, None, "/", "127.0.0.1", cfg.port) is None
        stranger = w.plain_ns(guest.plugged.bridge, "10.64.0.9")
        assert await off_loop(http_get, stranger, "/openstack/latest/meta_data.json") is None
        sh("ip", "-n", stranger, "route", "add", f"{cfg.address}/32", "dev", "eth0")
        assert await off_loop(http_get, stranger, "/", cfg.address, cfg.port) is None
        sh("ip", "-n", stranger, "route", "add", "default", "via", "10.64.0.1")
        assert await off_loop(http_get, stranger, "/openstack/latest/meta_data.json") is None
        # The stranger takes the guest's address (as the wire could): still nothing.
        sh("ip", "-n", guest.ns, "link", "set", "eth0", "down")
        sh("ip", "-n", stranger, "addr", "del", "10.64.0.9/24", "dev", "eth0")
        sh("ip", "-n", stranger, "addr", "add", "10.64.0.5/24", "dev", "eth0")
        sh("ip", "-n", stranger, "route", "replace", "default", "via", "10.64.0.1")
        assert await off_loop(http_get, stranger, "/openstack/latest/meta_data.json") is None
        sh("ip", "-n", stranger, "link", "set", "eth0", "down")
        sh("ip", "-n", guest.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", guest.ns, "route", "add", "default", "via", "10.64.0.1")
        # The guest from an address that is not its port's: the spoof chain drops it.
        sh("ip", "-n", guest.ns, "addr", "add", "10.64.0.77/24", "dev", "eth0")

        def spoofed() -> bool:
            s = in_netns(guest.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.settimeout(0.8)
            with s:
                s.bind(("10.64.0.77", 0))
                try:
                    s.connect((METADATA_IP, 80))
                except OSError:
                    return False
                return True

        assert not await off_loop(spoofed)
        assert await meta_uuid(guest.ns) == rec.uuid
        # A port whose instance the agent does not know (any more) is refused.
        del w.instances[rec.uuid]
        assert await off_loop(http_get, guest.ns, "/openstack/latest/meta_data.json") == (403, b"")
        assert w.service.refused == 1


async def test_a_port_without_port_security_gets_no_answer() -> None:
    async with metadata_world() as w:
        guest, _ = await w.guest("10.65.0.5", security=False)
        assert w.service.bridges == set()
        assert await off_loop(http_get, guest.ns, "/openstack/latest/meta_data.json", METADATA_IP, 80, 0.5) is None


async def test_keep_alive_get_only_and_bounded_requests() -> None:
    async with metadata_world(max_request_bytes=1024) as w:
        guest, rec = await w.guest("10.66.0.5")

        def session() -> list[bytes]:
            s = in_netns(guest.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.settimeout(2)
            answers = []
            with s:
                s.connect((METADATA_IP, 80))
                for path in ("/openstack/latest/meta_data.json", "/latest/meta-data/", "/nowhere"):
                    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += s.recv(1)
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    body = b""
                    while len(body) < length:
                        body += s.recv(length - len(body))
                    answers.append(head.split(b"\r\n")[0] + b" " + body)
            return answers

        one, listing, missing = await off_loop(session)
        assert one.startswith(b"HTTP/1.1 200 OK ") and rec.uuid.encode() in one
        assert listing.startswith(b"HTTP/1.1 200 OK ") and b"instance-id\n" in listing and b"placement/" in listing
        assert missing == b"HTTP/1.1 404 Not Found "

        def raw(request: bytes) -> bytes:
            s = in_netns(guest.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.settimeout(2)
            with s:
                s.connect((METADATA_IP, 80))
                s.sendall(request)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data

        posted = await off_loop(raw, b"POST /openstack HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405 ")
        huge = await off_loop(raw, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 431 ")


def test_the_paths_of_both_trees() -> None:
    from metadata_fixtures import documents_of, record

    docs = documents_of(record("a"), [])
    meta = msgspec.json.decode(docs["openstack/latest/meta_data.json"])
    for version in ("latest", "2012-08-10", "2018-08-27"):
        assert answer(docs, f"/openstack/{version}/meta_data.json") == docs["openstack/latest/meta_data.json"]
    assert (answer(docs, "/openstack") or b"").endswith(b"2018-08-27\n2020-10-14\nlatest")
    assert answer(docs, "/openstack/2099-01-01/meta_data.json") is None
    assert answer(docs, "/openstack/latest/user_data") is None  # none given: 404, as Nova
    assert answer(docs, "/2009-04-04/meta-data/instance-id") == ("i-" + meta["uuid"].replace("-", "")[:8]).encode()
    assert answer(docs, "/latest/meta-data/placement/availability-zone") == b"nova"
    assert answer(docs, "/latest/meta-data/../../etc/passwd") is None
    assert b"meta-data/" in (answer(docs, "/latest") or b"")


async def test_reconciliation_keeps_the_metadata_chains_and_turning_it_off_removes_them() -> None:
    async with metadata_world() as w:
        guest, rec = await w.guest("10.69.0.5")
        wanted = {rec.uuid: w.instances[rec.uuid][1]}
        assert not (await w.lab.net.reconcile(wanted)).changed
        assert await meta_uuid(guest.ns) == rec.uuid
        names = {c["chain"]["name"] for c in tables(w.lab.owner)["inet"] if "chain" in c}
        assert names >= {"metadata_nat", "metadata_in"}
        plain = Network(w.lab.cfg)  # the same tables, the service off: a different layout
        try:
            assert (await plain.reconcile(wanted)).rebuilt_tables
            names = {c["chain"]["name"] for c in tables(w.lab.owner)["inet"] if "chain" in c}
            assert not names & {"metadata_nat", "metadata_in"}
            assert not (await plain.reconcile(wanted)).changed
        finally:
            plain.close()
